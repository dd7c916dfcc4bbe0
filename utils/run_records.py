"""A training run's records: one ``summary.csv`` row per epoch and TensorBoard scalars.

Only the primary rank writes; on the other ranks every method is a no-op, so the trainer calls
them unconditionally.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Dict, Optional

SUMMARY_FIELDS = [
    "epoch",
    "train_loss",
    "lr",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_top1",
    "ema_top5",
    "max_accuracy",
    "epoch_time_s",
]

# summary.csv column -> TensorBoard tag of the per-epoch scalars.
_EPOCH_TAGS = {
    "train_loss": "epoch/train_loss",
    "val_top1": "val/top1",
    "val_top5": "val/top5",
    "val_loss": "val/loss",
    "ema_top1": "val/ema_top1",
}


class RunRecords:
    """``summary.csv`` and TensorBoard events in ``output_dir`` (written by the primary rank)."""

    def __init__(self, output_dir: str, is_primary: bool, tensorboard: bool = True) -> None:
        self.output_dir = output_dir
        self.is_primary = is_primary
        self.summary_path = os.path.join(output_dir, "summary.csv")
        self.writer: Optional[Any] = None
        if is_primary and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=output_dir)

    def keep_epochs_before(self, epoch: int) -> None:
        """On (re)start drop the rows of ``epoch`` and later: a resumed epoch is run again."""
        if not self.is_primary or not os.path.isfile(self.summary_path):
            return
        with open(self.summary_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) < epoch]
        tmp = self.summary_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in SUMMARY_FIELDS} for r in rows)
        os.replace(tmp, self.summary_path)

    def add_epoch(self, row: Dict[str, Any]) -> None:
        """Append ``row`` (the ``SUMMARY_FIELDS``) to summary.csv and its scalars to TensorBoard."""
        if not self.is_primary:
            return
        new = not os.path.isfile(self.summary_path)
        with open(self.summary_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, tag in _EPOCH_TAGS.items():
                if row[key] != "":
                    self.writer.add_scalar(tag, row[key], row["epoch"])
            self.writer.flush()

    def add_step(self, step: int, **scalars: float) -> None:
        """Per-step TensorBoard scalars, e.g. ``add_step(100, loss=2.3)`` -> ``train/loss``."""
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
