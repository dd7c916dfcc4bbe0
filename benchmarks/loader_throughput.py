"""Images/s of the training loader (read + JPEG decode + timm train transform + Mixup) by data
format and worker count.

Shows whether data loading can feed the model: compare its img/s with the training img/s of
``benchmarks/model_throughput.py`` at the same batch size. Uses the real ``build_loader`` on the
same images stored as class folders (``folder``), a Swin-layout zip read on demand (``zip``) or
held in RAM (``zip-cache``, ``DATA.CACHE_MODE full``; with one process ``part`` holds the same)
and WebDataset shards (``shards``). Without ``--data-path`` it writes a synthetic ImageNet-like
JPEG tree into a temporary folder first; the zip and the shards are made from the tree with
``tools/make_zip_dataset.py`` and ``tools/make_shards.py`` unless ``--zip-path`` /
``--shard-path`` point at existing ones.

    python benchmarks/loader_throughput.py --workers 0 1 2
    python benchmarks/loader_throughput.py --formats folder shards --workers 1 2 4 8
    python benchmarks/loader_throughput.py --data-path /data/imagenet --dataset imagenet --workers 4 8 16
    python benchmarks/loader_throughput.py --opts AUG.AUTO_AUGMENT '' AUG.MIXUP 0.0 AUG.CUTMIX 0.0

``--threads`` sets the main process's torch intra-op threads (the 0-worker row transforms there;
workers always use 1). On a CPU busy with other work, several intra-op threads spin against
each other on the many tiny per-sample tensor ops and the 0-worker row can drop ~10x.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import get_config
from data import build_loader
from tools.make_shards import make_shards
from tools.make_zip_dataset import make_zip_dataset

# --formats name -> (DATA.FORMAT, DATA.CACHE_MODE)
FORMATS = {"folder": ("folder", "no"), "zip": ("zip", "no"), "zip-cache": ("zip", "full"), "shards": ("shards", "no")}


def make_jpeg_tree(root: str, num_images: int, num_classes: int, size: tuple[int, int]) -> None:
    """``root/{train,val}/class_k/*.jpg``: smooth random images plus noise, JPEG quality 90.

    Smooth content + mild noise gives ~ImageNet-like JPEG sizes and decode cost (pure noise would
    be several times larger and slower to decode than real photos).
    """
    rng = np.random.default_rng(0)
    for split, count in (("train", num_images), ("val", max(num_classes, num_images // 10))):
        for i in range(count):
            folder = os.path.join(root, split, f"class_{i % num_classes:03d}")
            os.makedirs(folder, exist_ok=True)
            low = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
            image = np.asarray(low.resize(size, Image.BICUBIC), dtype=np.float32)
            image += rng.normal(0, 8, image.shape)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def make_config(args: argparse.Namespace, data_path: str, num_workers: int, fmt: str = "folder"):
    num_classes = len([e for e in os.scandir(os.path.join(args.folder_path, "train")) if e.is_dir()])
    data_format, cache_mode = FORMATS[fmt]
    config = get_config().clone()
    config.defrost()
    config.merge_from_list(
        [
            "DATA.DATA_PATH",
            data_path,
            "DATA.FORMAT",
            data_format,
            "DATA.CACHE_MODE",
            cache_mode,
            "DATA.DATASET",
            args.dataset,
            "MODEL.NUM_CLASSES",
            num_classes,
            "DATA.IMG_SIZE",
            args.img_size,
            "DATA.BATCH_SIZE",
            args.batch_size,
            "DATA.NUM_WORKERS",
            num_workers,
            "SEED",
            0,
        ]
        + list(args.opts)
    )
    config.freeze()
    return config


def measure(config, batches: int, warmup: int) -> dict:
    """Time ``batches`` batches (after ``warmup``) of the train loader, Mixup included."""
    _, _, loader, _, mixup_fn = build_loader(config)

    def batch_stream(loader):
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    start = time.perf_counter()
    stream = batch_stream(loader)
    next(stream)
    first = time.perf_counter() - start  # worker start-up + first batch
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        x, y = next(stream)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        images += x.shape[0]
    elapsed = time.perf_counter() - start
    stream.close()
    del loader  # stops persistent workers before the next row starts its own
    return {"first_batch_s": first, "img_per_s": images / elapsed, "ms_per_batch": 1000 * elapsed / batches}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-path", default="", help="ImageFolder root with train/ and val/ (default: synthetic JPEGs in a temp dir)"
    )
    parser.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "imagenet"])
    parser.add_argument(
        "--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), help="data formats to measure"
    )
    parser.add_argument("--zip-path", default="", help="folder with train.zip/val.zip + maps (default: made)")
    parser.add_argument("--shard-path", default="", help="folder with train.json/val.json + shards (default: made)")
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard when making shards")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DATA.NUM_WORKERS values to measure")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches after the first")
    parser.add_argument("--num-images", type=int, default=512, help="synthetic train images")
    parser.add_argument("--num-classes", type=int, default=10, help="synthetic classes")
    parser.add_argument(
        "--source-size",
        type=int,
        nargs=2,
        default=[500, 375],
        metavar=("W", "H"),
        help="synthetic JPEG size (ImageNet's average is about 400x350)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in the main process (default: torch's default)"
    )
    parser.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="config overrides, e.g. AUG.AUTO_AUGMENT '' AUG.MIXUP 0.0",
    )
    return parser


def prepare_formats(args: argparse.Namespace, scratch: str) -> dict[str, str]:
    """``{format: DATA_PATH}``, converting the folder tree where no path was given."""
    paths = {}
    for fmt in args.formats:
        data_format = FORMATS[fmt][0]
        if data_format == "folder":
            paths[fmt] = args.folder_path
        elif data_format == "zip":
            if not args.zip_path:
                args.zip_path = os.path.join(scratch, "zip")
                start = time.perf_counter()
                make_zip_dataset(args.folder_path, args.zip_path)
                print(f"zipped the tree in {time.perf_counter() - start:.1f} s")
            paths[fmt] = args.zip_path
        else:
            if not args.shard_path:
                args.shard_path = os.path.join(scratch, "shards")
                start = time.perf_counter()
                make_shards(args.folder_path, args.shard_path, shard_size=args.shard_size)
                print(f"wrote shards of {args.shard_size} in {time.perf_counter() - start:.1f} s")
            paths[fmt] = args.shard_path
    return paths


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="loader_bench_")
    args.folder_path = args.data_path
    if not args.folder_path:
        args.folder_path = os.path.join(scratch.name, "folder")
        start = time.perf_counter()
        make_jpeg_tree(args.folder_path, args.num_images, args.num_classes, tuple(args.source_size))
        print(
            f"wrote {args.num_images} synthetic {args.source_size[0]}x{args.source_size[1]} JPEGs "
            f"to {args.folder_path} in {time.perf_counter() - start:.1f} s"
        )
    try:
        paths = prepare_formats(args, scratch.name)
        config = make_config(args, args.folder_path, 0)
        aug = config.AUG
        print(
            f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads in the main process)"
        )
        print(
            f"loader: batch {args.batch_size}, {args.img_size} px, auto_augment "
            f"'{aug.AUTO_AUGMENT}', re_prob {aug.REPROB}, mixup {aug.MIXUP} / cutmix {aug.CUTMIX}, "
            f"data {args.folder_path}"
        )
        print("img/s per worker: total / workers (0 workers: the main process loads)")
        print()
        print("| format | workers | first batch s | img/s | img/s per worker | ms/batch |")
        print("|---|---:|---:|---:|---:|---:|")
        for fmt in args.formats:
            for workers in args.workers:
                row = measure(make_config(args, paths[fmt], workers, fmt), args.batches, args.warmup)
                per_worker = row["img_per_s"] / max(workers, 1)
                print(
                    f"| {fmt} | {workers} | {row['first_batch_s']:.2f} | {row['img_per_s']:.1f} | "
                    f"{per_worker:.1f} | {row['ms_per_batch']:.1f} |",
                    flush=True,
                )
    finally:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
