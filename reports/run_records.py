"""A training run's records: one ``summary.csv`` row per epoch, ``curves.png`` drawn from it,
TensorBoard scalars, and the optional experiment trackers (``utils.trackers``).

Only the primary rank writes; on the other ranks every method is a no-op, so the trainer calls
them unconditionally.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from .plots import plot_training_curves
from .trackers import Tracker

logger = logging.getLogger(__name__)

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
    "reported_top1",  # the run's number if it ended with this epoch (TRAIN.REPORT)
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
    """``summary.csv``, ``curves.png`` and TensorBoard events in ``output_dir``, and ``trackers``
    (written by the primary rank)."""

    def __init__(
        self, output_dir: str, is_primary: bool, tensorboard: bool = True, trackers: Sequence[Tracker] = ()
    ) -> None:
        self.output_dir = output_dir
        self.is_primary = is_primary
        self.summary_path = os.path.join(output_dir, "summary.csv")
        self.curves_path = os.path.join(output_dir, "curves.png")
        self.writer: Optional[Any] = None
        if is_primary and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=output_dir)
        self.trackers: List[Tracker] = list(trackers) if is_primary else []
        # Tracker name -> run id, saved in checkpoints so that a resumed run continues the run.
        self.tracker_run_ids: Dict[str, str] = {}
        self._step = 0  # the latest optimizer step seen: trackers log epoch rows at it

    def start_trackers(self, run_ids: Optional[Dict[str, str]] = None) -> None:
        """Start every tracker, continuing the runs of ``run_ids`` (saved by a resumed checkpoint).

        The saved ids are kept, also those of trackers not started this time (not asked for,
        not installed, failing), so a later resume with them continues the same runs."""
        self.tracker_run_ids.update(run_ids or {})
        for tracker in list(self.trackers):
            run_id = self._guarded(tracker, "start", tracker.start, self.tracker_run_ids.get(tracker.name))
            if run_id is not None:
                self.tracker_run_ids[tracker.name] = run_id

    def keep_epochs_before(self, epoch: int) -> None:
        """On (re)start drop the rows of ``epoch`` and later: a resumed epoch is run again."""
        if not self.is_primary or not os.path.isfile(self.summary_path):
            return
        rows = [r for r in self._rows() if r.get("epoch", "").isdigit() and int(r["epoch"]) < epoch]
        tmp = self.summary_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in SUMMARY_FIELDS} for r in rows)
        os.replace(tmp, self.summary_path)

    def add_epoch(self, row: Dict[str, Any]) -> None:
        """Append ``row`` (the ``SUMMARY_FIELDS``) to summary.csv, redraw curves.png from all rows,
        and send its scalars to TensorBoard and the trackers (at the latest step)."""
        if not self.is_primary:
            return
        new = not os.path.isfile(self.summary_path)
        with open(self.summary_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self._draw_curves()
        scalars = {tag: row[key] for key, tag in _EPOCH_TAGS.items() if row[key] != ""}
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, row["epoch"])
            self.writer.flush()
        self._log_to_trackers(self._step, {**scalars, "epoch": row["epoch"]})

    def add_step(self, step: int, **scalars: float) -> None:
        """Per-step scalars, e.g. ``add_step(100, loss=2.3)`` -> ``train/loss``, to TensorBoard and
        the trackers."""
        self._step = step
        tagged = {f"train/{name}": value for name, value in scalars.items()}
        if self.writer is not None:
            for tag, value in tagged.items():
                self.writer.add_scalar(tag, value, step)
        self._log_to_trackers(step, tagged)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for tracker in list(self.trackers):
            self._guarded(tracker, "finish", tracker.finish)
        self.trackers = []

    def _rows(self) -> List[Dict[str, str]]:
        with open(self.summary_path, newline="") as f:
            return list(csv.DictReader(f))

    def _draw_curves(self) -> None:
        try:
            plot_training_curves(self._rows(), self.curves_path)
        except Exception as e:  # noqa: BLE001 - a figure must never stop a training run
            logger.warning(f"could not draw {self.curves_path}: {type(e).__name__}: {e}")

    def _log_to_trackers(self, step: int, metrics: Dict[str, Any]) -> None:
        for tracker in list(self.trackers):
            self._guarded(tracker, "log", tracker.log, step, metrics)

    def _guarded(self, tracker: Tracker, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``; a tracker that raises is switched off with a warning (returns None)."""
        try:
            return call(*args)
        except Exception as e:  # noqa: BLE001 - a tracker's outage must never stop a training run
            logger.warning(
                f"{tracker.name} {what} failed ({type(e).__name__}: {e}); no longer logging to {tracker.name}"
            )
            if tracker in self.trackers:
                self.trackers.remove(tracker)
            return None
