"""Zip a class-folder tree into the Swin-Transformer layout: OUT/{train,val}.zip + {train,val}_map.txt.

Members are STORED (JPEG bytes as they are, no recompression) under '<class>/<file>', one
'<path inside the zip>\\t<class index>' map line per image. Class index = the sorted class-folder
order of SRC/train (torchvision's ImageFolder order), and images are listed in ImageFolder's
order, so ``DATA.FORMAT zip`` gives the same dataset indices, hence the same batches, as
``DATA.FORMAT folder`` on SRC. Val class folders must be train class folders (val may lack some).
Existing outputs are never overwritten; each file is written under a temporary name and renamed
when complete.

    python tools/make_zip_dataset.py /data/imagenet /data/imagenet_zip
    python main.py --cfg configs/moat_0.yaml --data-path /data/imagenet_zip --zip --cache-mode part
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.datasets import ClassFolderDataset
from utils.errors import MoatError, UserError


def split_samples(src: str, splits: tuple[str, ...]) -> dict[str, tuple[list[str], list[tuple[str, int]]]]:
    """``{split: (class names, [(path, class index)])}`` in ImageFolder order; every split is
    labelled by the first split's class folders (one-line errors for anything else)."""
    first = ClassFolderDataset(os.path.join(src, splits[0]))
    out = {splits[0]: (first.classes, first.samples)}
    for split in splits[1:]:
        root = os.path.join(src, split)
        dataset = ClassFolderDataset(root, class_map=first.classes)
        extra = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name not in first.classes)
        if extra:
            raise UserError(f"class folder {os.path.join(root, extra[0])} has no folder in {first.root}")
        out[split] = (first.classes, dataset.samples)
    return out


def progress(total: int, what: str) -> tqdm:
    """A tqdm bar on stderr when it is a terminal; silent otherwise (logs, CI)."""
    return tqdm(total=total, desc=what, unit="img", disable=not sys.stderr.isatty())


def write_zip_split(root: str, samples: list[tuple[str, int]], zip_path: str, map_path: str) -> None:
    """Write one split's zip and map (temporary names, renamed when complete)."""
    tmp_zip, tmp_map = zip_path + ".tmp", map_path + ".tmp"
    # strict_timestamps=False: files dated before 1980 (zip's epoch) get 1980 instead of an error.
    with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_STORED, strict_timestamps=False) as zf, open(tmp_map, "w") as f:
        with progress(len(samples), os.path.basename(zip_path)) as bar:
            for path, label in samples:
                member = os.path.relpath(path, root).replace(os.sep, "/")
                zf.write(path, member)
                f.write(f"{member}\t{label}\n")
                bar.update()
    os.replace(tmp_zip, zip_path)
    os.replace(tmp_map, map_path)


def make_zip_dataset(src: str, out: str, splits: tuple[str, ...] = ("train", "val")) -> dict[str, int]:
    """Write OUT/<split>.zip and OUT/<split>_map.txt for each split; returns images per split."""
    if not os.path.isdir(src):
        raise UserError(f"source folder not found: {src}")
    outputs = {split: (os.path.join(out, f"{split}.zip"), os.path.join(out, f"{split}_map.txt")) for split in splits}
    for path in (p for pair in outputs.values() for p in pair):
        if os.path.exists(path):
            raise UserError(f"{path} exists; remove it or choose another output folder (nothing was written)")
    os.makedirs(out, exist_ok=True)
    counts = {}
    for split, (_, samples) in split_samples(src, splits).items():
        write_zip_split(os.path.join(src, split), samples, *outputs[split])
        counts[split] = len(samples)
    return counts


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="class-folder tree holding SRC/<split>/<class>/<images>")
    parser.add_argument("out", help="output folder for <split>.zip and <split>_map.txt")
    parser.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="split folders; the first one names the classes"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        counts = make_zip_dataset(args.src, args.out, tuple(args.splits))
    except MoatError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(", ".join(f"{split}: {n} images" for split, n in counts.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
