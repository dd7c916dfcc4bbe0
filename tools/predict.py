"""Classify images with a trained MOAT: top-k class names and probabilities per image.

Reads a trainer checkpoint or a safetensors file from ``tools/export.py``; the class names and
the eval preprocessing come from the file, and the transform is the trainer's own eval transform
(``data.build_transform(False, config)``), so a prediction here equals what validation computed.

    python tools/predict.py output/tiny_moat_0/default/best.pth photo.jpg more_photos/ --topk 3
    python tools/predict.py model.safetensors images/ --csv predictions.csv --batch-size 64

Weights: by default the EMA weights when the checkpoint has them (the trainer reports the EMA as
its model when EMA is on); ``--no-ema`` takes the raw weights, ``--ema`` insists on the EMA.
Errors (missing file, unreadable image, wrong variant, class-count mismatch) are one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, _REPO)

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from checkpoints import add_weights_choice, load_for_inference
from data.datasets import load_rgb
from data.transforms import build_transform
from utils.amp import autocast_factory, resolve_amp_dtype
from utils.distributed import resolve_device
from utils.errors import UserError, run_tool
from utils.progress import progress_bar


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "MOAT predict", add_help=add_help, description="Top-k predictions of a trained MOAT on image files and folders."
    )
    parser.add_argument("checkpoint", help="trainer checkpoint (.pth) or exported .safetensors")
    parser.add_argument(
        "inputs",
        nargs="+",
        help="image files and/or folders (searched recursively for " + " ".join(IMG_EXTENSIONS) + ")",
    )
    parser.add_argument(
        "--variant", default=None, help="expected variant; required only for files that do not name theirs"
    )
    parser.add_argument("--topk", type=int, default=5, help="classes to report per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2, help="image-decoding worker processes")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="'auto' uses CUDA when available"
    )
    parser.add_argument(
        "--amp",
        choices=("off", "bf16", "fp16", "auto"),
        default="off",
        help="autocast precision (default off: full precision, exact scores)",
    )
    add_weights_choice(parser, verb="use")
    parser.add_argument(
        "--csv", default=None, metavar="OUT", help="also write path,top1_class,top1_prob,... rows to OUT"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print per-image lines")
    return parser


def find_images(inputs: Sequence[str]) -> Tuple[List[str], bool]:
    """Image paths from files and (recursively, sorted) folders; also whether a folder was given.

    A named file is taken whatever its extension (the user asked for it); in folders only image
    extensions count, as in torchvision's ``ImageFolder``.
    """
    paths, any_folder = [], False
    for item in inputs:
        if os.path.isdir(item):
            any_folder = True
            found = []
            for root, dirs, files in os.walk(item, followlinks=True):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
            if not found:
                raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) found in folder: {item}")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"input not found: {item}")
    return paths, any_folder


class ImageFiles(Dataset):
    """Decoded, transformed images; a file that cannot be read yields an error string, not an
    exception, so the main process can name it in one line whatever the number of workers."""

    def __init__(self, paths: Sequence[str], transform: Callable, img_size: int) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, str]:
        path = self.paths[index]
        try:
            image = load_rgb(path)  # the trainer's decoder: same pixels as validation
        except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return torch.zeros(3, self.img_size, self.img_size), f"cannot read image {path}: {reason}"
        return self.transform(image), ""


def _write_csv(path: str, rows: List[Tuple[str, List[Tuple[str, float]]]], topk: int) -> None:
    header = ["path"]
    for k in range(1, topk + 1):
        header += [f"top{k}_class", f"top{k}_prob"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for image, preds in rows:
            writer.writerow([image] + [v for name, p in preds for v in (name, f"{p:.6f}")])


def predict(args: argparse.Namespace) -> List[Tuple[str, List[Tuple[str, float]]]]:
    """(image path, [(class name, probability)] best first) for every input image."""
    if args.topk < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise UserError("--topk and --batch-size must be >= 1 and --num-workers >= 0")
    paths, any_folder = find_images(args.inputs)
    device = resolve_device(args.device, 0)
    model, meta = load_for_inference(args.checkpoint, variant=args.variant, device=device, use_ema=args.use_ema)
    # Inference only: fold the BatchNorms into the convolutions and use the fast conv layout
    # (both equal to float rounding; docs/benchmarks.md has the measured gain).
    model = model.reparameterize().to(memory_format=torch.channels_last)
    autocast = autocast_factory(device, resolve_amp_dtype(args.amp, device))
    topk = min(args.topk, meta.num_classes)
    dataset = ImageFiles(paths, build_transform(False, meta.config), meta.preprocessing["img_size"])
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=min(args.num_workers, len(paths)),
        pin_memory=device.type == "cuda",
    )

    # A bar only for folders (a handful of named files needs none) and only on a terminal.
    bar = progress_bar(total=len(paths), desc="predict", unit="img", enabled=any_folder)
    results, start = [], 0
    for images, errors in loader:
        bad = next((e for e in errors if e), None)
        if bad:
            bar.close()
            raise UserError(bad)
        # The model is loaded outside inference mode on purpose: parameters created inside it
        # are inference tensors, which the relative-bias cache cannot version-check.
        with torch.inference_mode(), autocast():
            logits = model(images.to(device, non_blocking=True, memory_format=torch.channels_last))
        probs, indices = logits.float().softmax(dim=-1).topk(topk, dim=-1)
        for i in range(len(images)):
            preds = [(meta.class_names[c], p) for c, p in zip(indices[i].tolist(), probs[i].tolist())]
            results.append((paths[start + i], preds))
            if not args.quiet:
                line = ", ".join(f"{name} ({p:.4f})" for name, p in preds)
                bar.write(f"{paths[start + i]}: {line}", file=sys.stdout)
        start += len(images)
        bar.update(len(images))
    bar.close()
    if args.csv:
        _write_csv(args.csv, results, topk)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: the exit code (0, or 2 for a user error)."""
    return run_tool("predict.py", lambda: predict(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
