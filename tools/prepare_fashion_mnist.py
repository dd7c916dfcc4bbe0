"""Convert Fashion-MNIST's idx files into an ImageFolder tree: OUT/{train,val}/<class>/<index>.png.

Reads the four original ``*-idx?-ubyte.gz`` files directly (gzip + numpy) because Debian's
``dataset-fashion-mnist`` package ships them re-gzipped, which torchvision's checksum check
rejects. ``--download`` falls back to torchvision's downloader where there is internet.
``val`` is the official 10,000-image test set. A finished tree is recorded in
OUT/.prepare_fashion_mnist.json; running again with the same options returns at once.

    python tools/prepare_fashion_mnist.py --out data_cache/fashion_mnist
    python tools/prepare_fashion_mnist.py --out /tmp/fm_small --per-class-train 500 --per-class-val 100
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, _REPO)

import numpy as np
from PIL import Image

from utils.progress import progress_bar

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Label order of the original dataset (https://github.com/zalandoresearch/fashion-mnist).
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASS_DIRS = tuple(re.sub(r"[^A-Za-z0-9-]+", "_", name) for name in CLASS_NAMES)
MANIFEST = ".prepare_fashion_mnist.json"
# idx format (http://yann.lecun.com/exdb/mnist/): magic 0x0000 <dtype> <ndim>, then ndim
# big-endian int32 sizes; Fashion-MNIST only uses unsigned bytes.
_IDX_UBYTE = 0x08


class SourceMissing(FileNotFoundError):
    """The idx files are not available; the message says how to get them."""


def how_to_get(src: str) -> str:
    names = ", ".join(f"{name}.gz" for pair in SPLIT_FILES.values() for name in pair)
    return (
        f"Fashion-MNIST idx files not found in {src} (need {names}). Get them with "
        f"`sudo apt-get install dataset-fashion-mnist` (installs them in {DEFAULT_SRC}), "
        f"or rerun with --download to fetch them with torchvision (needs internet), "
        f"or point --src at a folder that holds them."
    )


def read_idx(path: str) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, ">i4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} bytes of data for shape {shape} (truncated?)")
    return body.reshape(shape)


def find_sources(src: str) -> dict[str, tuple[str, str]] | None:
    """Paths of (images, labels) per split under ``src`` (``.gz`` or plain), or None if any lacks."""
    found = {}
    for split, names in SPLIT_FILES.items():
        paths = []
        for name in names:
            candidates = [os.path.join(src, name + ".gz"), os.path.join(src, name)]
            existing = [p for p in candidates if os.path.isfile(p)]
            if not existing:
                return None
            paths.append(existing[0])
        found[split] = tuple(paths)
    return found


def download(root: str) -> str:
    """Fetch the idx files with torchvision into ``root``; returns the folder holding them."""
    from torchvision.datasets import FashionMNIST  # imported late: only this path needs torch

    for train in (True, False):
        FashionMNIST(root, train=train, download=True)
    return os.path.join(root, "FashionMNIST", "raw")


def select(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class (all when None), in file order."""
    if per_class is None:
        return np.arange(len(labels))
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(chosen))


def _write_pngs(folder: str, images: np.ndarray, indices: np.ndarray) -> int:
    """Write ``images[k]`` as ``folder/<indices[k]>.png`` (grayscale); returns the count."""
    os.makedirs(folder, exist_ok=True)
    for image, index in zip(images, indices):
        # compress_level 1: the files barely shrink at higher levels, and encoding is the cost.
        Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.png"), compress_level=1)
    return len(indices)


def _disk_counts(out: str) -> dict[str, dict[str, int]]:
    counts = {}
    for split in SPLIT_FILES:
        counts[split] = {}
        for name in CLASS_DIRS:
            folder = os.path.join(out, split, name)
            counts[split][name] = (
                sum(1 for f in os.scandir(folder) if f.name.endswith(".png")) if os.path.isdir(folder) else 0
            )
    return counts


def _read_manifest(out: str) -> dict | None:
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_manifest(out: str, manifest: dict) -> None:
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))


def prepare(
    out: str,
    src: str = DEFAULT_SRC,
    per_class_train: int | None = None,
    per_class_val: int | None = None,
    allow_download: bool = False,
    jobs: int | None = None,
) -> dict:
    """Write (or confirm) the ImageFolder tree under ``out``; returns its manifest.

    Raises ``SourceMissing`` when the idx files are neither in ``src`` nor downloadable, and
    ``FileExistsError`` when ``out`` holds train/val folders this tool did not write.
    """
    request = {"per_class_train": per_class_train, "per_class_val": per_class_val}
    manifest = _read_manifest(out)
    if (
        manifest
        and manifest.get("complete")
        and manifest.get("request") == request
        and manifest.get("counts") == _disk_counts(out)
    ):
        return manifest

    sources = find_sources(src)
    if sources is None and allow_download:
        download_root = os.path.join(out, "_download")
        out_existed = os.path.isdir(out)
        try:
            sources = find_sources(download(download_root))
        except Exception as e:  # no network, proxy, HTTP error: all end in the same advice
            shutil.rmtree(download_root, ignore_errors=True)
            if not out_existed and os.path.isdir(out) and not os.listdir(out):
                os.rmdir(out)
            reason = " ".join(str(e).split())
            raise SourceMissing(f"{how_to_get(src)} The --download attempt failed: {reason}") from e
    if sources is None:
        raise SourceMissing(how_to_get(src))

    os.makedirs(out, exist_ok=True)
    present = [s for s in SPLIT_FILES if os.path.exists(os.path.join(out, s))]
    if present and manifest is None:
        raise FileExistsError(
            f"{out} already holds {'/'.join(present)} folders not written by "
            f"this tool; remove them or choose another --out"
        )
    _write_manifest(out, {"request": request, "complete": False})  # claims the folder
    for split in present:
        shutil.rmtree(os.path.join(out, split))
    partial = os.path.join(out, ".partial")
    shutil.rmtree(partial, ignore_errors=True)

    tasks = []
    for split, (images_path, labels_path) in sources.items():
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or len(images) != len(labels) or labels.max() >= len(CLASS_NAMES):
            raise ValueError(
                f"{images_path} / {labels_path}: {images.shape} images do not match "
                f"{labels.shape} labels in 0..{len(CLASS_NAMES) - 1}"
            )
        keep = select(labels, per_class_train if split == "train" else per_class_val)
        for c, name in enumerate(CLASS_DIRS):
            idx = keep[labels[keep] == c]
            # Chunks of ~2000 images keep both cores busy without much pickling per task.
            for chunk in np.array_split(idx, max(1, len(idx) // 2000)):
                tasks.append((os.path.join(partial, split, name), images[chunk], chunk))

    jobs = jobs or os.cpu_count() or 1
    bar = progress_bar(total=sum(len(task[2]) for task in tasks), desc="writing PNGs", unit="img")
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            for written in pool.map(_write_pngs, *zip(*tasks)):
                bar.update(written)
    else:
        for task in tasks:
            bar.update(_write_pngs(*task))
    bar.close()

    for split in SPLIT_FILES:
        os.replace(os.path.join(partial, split), os.path.join(out, split))
    os.rmdir(partial)
    manifest = {
        "request": request,
        "complete": True,
        "source": {s: list(p) for s, p in sources.items()},
        "classes": dict(zip(CLASS_DIRS, CLASS_NAMES)),
        "counts": _disk_counts(out),
    }
    _write_manifest(out, manifest)
    return manifest


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="root of the ImageFolder tree to write")
    parser.add_argument("--src", default=DEFAULT_SRC, help=f"folder with the four idx files (default: {DEFAULT_SRC})")
    parser.add_argument(
        "--per-class-train",
        type=int,
        default=None,
        metavar="N",
        help="keep the first N training images of each class (default: all 6000)",
    )
    parser.add_argument(
        "--per-class-val",
        type=int,
        default=None,
        metavar="N",
        help="keep the first N test images of each class (default: all 1000)",
    )
    parser.add_argument(
        "--download", action="store_true", help="when --src lacks the files, download them with torchvision"
    )
    parser.add_argument("--jobs", type=int, default=None, help="processes writing PNGs (default: all CPU cores)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    for flag in ("per_class_train", "per_class_val"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            print(f"error: --{flag.replace('_', '-')} must be > 0, got {value}", file=sys.stderr)
            return 2
    start = time.time()
    try:
        manifest = prepare(args.out, args.src, args.per_class_train, args.per_class_val, args.download, args.jobs)
    except (SourceMissing, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = {split: sum(c.values()) for split, c in manifest["counts"].items()}
    print(
        f"Fashion-MNIST ImageFolder tree in {args.out}: {sizes['train']} train / "
        f"{sizes['val']} val images, {len(CLASS_DIRS)} classes ({time.time() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
