"""Quick-start demo: Fashion-MNIST -> ImageFolder tree -> ``main.py`` training -> validation.

Runs the real CLI (``main.py --cfg configs/fashion_mnist_tiny_moat_0.yaml``), then re-validates the
best checkpoint with ``main.py --eval`` on the full 10,000-image test set and prints where the
checkpoint, log, TensorBoard events, summary, curves and eval reports are. ``make demo`` calls it inside the project's
virtualenv; extra arguments after ``--`` go to ``main.py`` (e.g. ``-- --opts TRAIN.EPOCHS 1``).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("configs", "fashion_mnist_tiny_moat_0.yaml")
MODEL_NAME = "tiny_moat_0"


def run(cmd: list[str], own_stderr: bool = False) -> str:
    """Run ``cmd`` in the project root, echoing its output; exit with its code on failure.

    ``own_stderr`` leaves the command this process's stderr (not captured), so a tool that draws
    a progress bar on a terminal can draw it there."""
    print("+ " + " ".join(cmd), flush=True)
    stderr = None if own_stderr else subprocess.STDOUT
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if proc.wait():
        sys.exit(f"demo: command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the tools")
    parser.add_argument("--data", default="data_cache/fashion_mnist_2000", help="ImageFolder tree to (re)use")
    parser.add_argument(
        "--per-class-train",
        type=int,
        default=2000,
        help="training images per class (6000 = all; 2000 keeps the whole demo under 10 minutes on 2 cores)",
    )
    parser.add_argument("--output", default="output/demo", help="OUTPUT root of the run")
    parser.add_argument("--tag", default="fashion_mnist", help="run name (TAG)")
    parser.add_argument("main_args", nargs="*", help="extra arguments for main.py (after --)")
    args = parser.parse_args()

    start = time.time()
    run(
        [
            args.python,
            "tools/prepare_fashion_mnist.py",
            "--out",
            args.data,
            "--per-class-train",
            str(args.per_class_train),
        ],
        own_stderr=True,
    )
    common = ["--cfg", CONFIG, "--data-path", args.data, "--output", args.output, "--tag", args.tag]
    run([args.python, "main.py", *common, *args.main_args])
    train_minutes = (time.time() - start) / 60

    run_dir = os.path.join(ROOT, args.output, MODEL_NAME, args.tag)
    best = os.path.join(run_dir, "best.pth")
    eval_log = run([args.python, "main.py", *common, "--eval", "--resume", best])
    match = re.findall(r"Acc@1 ([0-9.]+)", eval_log)
    with open(os.path.join(run_dir, "summary.csv")) as f:
        rows = list(csv.DictReader(f))

    events = sorted(n for n in os.listdir(run_dir) if n.startswith("events.out.tfevents"))
    print("\n" + "=" * 72)
    print(
        f"Fashion-MNIST demo finished in {(time.time() - start) / 60:.1f} min (data + training {train_minutes:.1f} min)"
    )
    print(f"epochs trained        : {len(rows)}")
    if match:
        print(f"best checkpoint top-1 : {match[-1]}% on the full 10,000-image test set (main.py --eval)")
    print(f"checkpoint            : {best}")
    print(f"log                   : {os.path.join(run_dir, 'log_rank0.txt')}")
    print(f"summary (per epoch)   : {os.path.join(run_dir, 'summary.csv')}")
    print(f"curves (per epoch)    : {os.path.join(run_dir, 'curves.png')}")
    print(f"eval reports          : {os.path.join(run_dir, 'eval')}  (per-class CSV, confusion matrix PNG, JSON)")
    print(f"TensorBoard events    : {run_dir}  ({len(events)} file(s); `tensorboard --logdir {args.output}`)")
    print("=" * 72)


if __name__ == "__main__":
    main()
