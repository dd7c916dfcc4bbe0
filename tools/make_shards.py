"""Write a class-folder tree as WebDataset tar shards plus the shard index the trainer reads.

    OUT/train-000000.tar ...   '<key>.<ext>' (the image file's bytes, as they are) and
                               '<key>.cls' (the class index) per sample; at most --shard-size each
    OUT/train.json             shard index: a wids descriptor plus per-sample byte offsets,
                               sizes and labels, and the class names (data/shards.py)
    OUT/val-000000.tar ..., OUT/val.json

Class index = the sorted class-folder order of SRC/train (torchvision's ImageFolder order), and
samples follow ImageFolder's order, so ``DATA.FORMAT shards`` gives the same dataset indices,
hence the same batches, as ``DATA.FORMAT folder`` on SRC. The trainer reads the shards in any
order; for streaming readers (webdataset, timm) that shuffle only within a buffer, use
``--shuffle-seed`` to spread the classes over the shards. Existing outputs are never
overwritten; each shard is written under a temporary name and renamed when complete.
``--index-only DIR`` writes the index of shards made elsewhere (DIR/<split>-*.tar -> <split>.json).

    python tools/make_shards.py /data/imagenet /data/imagenet_shards --shard-size 1000
    python main.py --cfg configs/moat_0.yaml --data-path /data/imagenet_shards --data-format shards
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np
import webdataset as wds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import scan_shard, write_index
from tools.make_zip_dataset import progress, split_samples
from utils.errors import DataError, MoatError, UserError


def sample_key(index: int, path: str) -> str:
    """A WebDataset key (no dots: the key runs to the first one) that keeps the file's stem."""
    stem = os.path.splitext(os.path.basename(path))[0].replace(".", "_")
    return f"{index:08d}_{stem}"


def write_split(
    samples: list[tuple[str, int]], classes: list[str], out: str, split: str, shard_size: int
) -> tuple[int, int]:
    """Write one split's shards and index; returns (shards, samples)."""
    entries = []
    with progress(len(samples), split) as bar:
        for start in range(0, len(samples), shard_size):
            path = os.path.join(out, f"{split}-{len(entries):06d}.tar")
            tmp = path + ".tmp"
            # Fixed mtime: the same input gives byte-identical shards.
            with wds.TarWriter(tmp, mtime=0) as sink:
                for index in range(start, min(start + shard_size, len(samples))):
                    file, label = samples[index]
                    with open(file, "rb") as f:
                        data = f.read()
                    ext = os.path.splitext(file)[1].lstrip(".").lower()
                    sink.write({"__key__": sample_key(index, file), ext: data, "cls": label})
                    bar.update()
            os.replace(tmp, path)
            entry, problems = scan_shard(path)
            if problems or entry["nsamples"] != min(shard_size, len(samples) - start):
                raise DataError(f"{path}: wrote {entry['nsamples']} readable samples ({problems[:1]})")
            entries.append(entry)
    write_index(os.path.join(out, f"{split}.json"), entries, classes, split)
    return len(entries), len(samples)


def make_shards(
    src: str,
    out: str,
    shard_size: int = 1000,
    splits: tuple[str, ...] = ("train", "val"),
    shuffle_seed: int | None = None,
) -> dict[str, tuple[int, int]]:
    """Write the shards and index of each split; returns ``{split: (shards, samples)}``."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if not os.path.isdir(src):
        raise UserError(f"source folder not found: {src}")
    for split in splits:
        existing = glob.glob(os.path.join(out, f"{split}-*.tar")) + glob.glob(os.path.join(out, f"{split}.json"))
        if existing:
            raise UserError(f"{existing[0]} exists; remove it or choose another output folder (nothing was written)")
    os.makedirs(out, exist_ok=True)
    counts = {}
    for split, (classes, samples) in split_samples(src, splits).items():
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(samples))
            samples = [samples[i] for i in order]
        counts[split] = write_split(samples, classes, out, split, shard_size)
    return counts


def index_only(folder: str, splits: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Write <split>.json for shards made elsewhere (no class names: their labels are the .cls values)."""
    counts = {}
    for split in splits:
        shards = sorted(glob.glob(os.path.join(folder, f"{split}-*.tar")))
        if not shards:
            continue
        index_path = os.path.join(folder, f"{split}.json")
        if os.path.exists(index_path):
            raise UserError(f"{index_path} exists; remove it first (nothing was written)")
        entries = []
        for path in shards:
            entry, problems = scan_shard(path)
            if problems:
                member, reason = problems[0]
                raise DataError(f"{path}:{member}: {reason} ({len(problems)} such sample(s) in this shard)")
            entries.append(entry)
        write_index(index_path, entries, None, split)
        counts[split] = (len(entries), sum(e["nsamples"] for e in entries))
    if not counts:
        raise UserError(f"no <split>-*.tar shards in {folder} for splits {', '.join(splits)}")
    return counts


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", nargs="?", help="class-folder tree holding SRC/<split>/<class>/<images>")
    parser.add_argument("out", nargs="?", help="output folder for the shards and <split>.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (the last one holds the rest)")
    parser.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="split folders; the first one names the classes"
    )
    parser.add_argument("--shuffle-seed", type=int, default=None, help="shuffle the samples over the shards")
    parser.add_argument("--index-only", metavar="DIR", help="only index DIR/<split>-*.tar made elsewhere")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.index_only is None and (args.src is None or args.out is None):
        parser.error("SRC and OUT are required (or --index-only DIR)")
    try:
        if args.index_only is not None:
            counts = index_only(args.index_only, tuple(args.splits))
        else:
            counts = make_shards(args.src, args.out, args.shard_size, tuple(args.splits), args.shuffle_seed)
    except MoatError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(", ".join(f"{split}: {n} samples in {k} shards" for split, (k, n) in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
