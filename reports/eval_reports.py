"""The files ``main.py --eval`` writes, in an ``eval/`` folder beside the evaluated checkpoint.

For checkpoint ``<stem>.pth`` evaluated at ``<size>`` px, with ``<weights>`` ``model`` and, when
the checkpoint has one, ``ema``:

    eval/<stem>-<size>.json                      top-1/top-5/loss/images per weights, model name,
                                                 checkpoint, preprocessing, config digest, classes
    eval/<stem>-<size>-<weights>-per_class.csv   support, accuracy, precision, recall, f1 per class
    eval/<stem>-<size>-<weights>-confusion.png   confusion matrix, or the most confused pairs
    eval/<stem>-sizes.csv                        with --eval-sizes: one row per size and weights

Accuracies are in percent, as everywhere in this project. Files are written to a temporary name
and renamed; evaluating the same checkpoint at the same size again replaces its reports.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from yacs.config import CfgNode

from utils.metrics import per_class_metrics

from .plots import plot_confusion

EVAL_DIR = "eval"
SIZES_FIELDS = ["img_size", "crop_pct", "weights", "top1", "top5", "loss", "images"]


def reports_dir(checkpoint: str, fallback: str, logger: logging.Logger) -> str:
    """``<folder of checkpoint>/eval``, made if needed; ``<fallback>/eval`` when that folder
    cannot be written (e.g. weights on a read-only share), said in the log."""
    folder = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), EVAL_DIR)
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    other = os.path.join(os.path.abspath(fallback), EVAL_DIR)
    logger.warning(f"cannot write to {folder}: eval reports go to {other}")
    os.makedirs(other, exist_ok=True)
    return other


def report_base(checkpoint: str, img_size: int) -> str:
    """``<checkpoint stem>-<size>``, the common start of one evaluation's file names."""
    return f"{os.path.splitext(os.path.basename(checkpoint))[0]}-{img_size}"


def config_digest(config: CfgNode) -> str:
    """sha256 of the config's YAML dump: equal digests, equal configs."""
    return hashlib.sha256(config.dump().encode()).hexdigest()


def _replace_with(path: str, write: Any) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)
    return path


def write_per_class_csv(path: str, class_names: Sequence[str], confusion: torch.Tensor) -> str:
    """One row per class: the ``per_class_metrics`` of ``confusion`` and the class it is most
    often mistaken for."""
    metrics = per_class_metrics(confusion)
    off = confusion.clone()
    off.fill_diagonal_(0)
    worst_count, worst = off.max(dim=1)
    fields = ["class", "index", "support", "correct", "predicted", "accuracy", "precision", "recall", "f1"]
    fields += ["most_confused_with", "most_confused_count"]

    def write(f: Any) -> None:
        writer = csv.writer(f)
        writer.writerow(fields)
        for i, name in enumerate(class_names):
            confused = int(worst_count[i])
            writer.writerow(
                [name, i]
                + [metrics[k][i] for k in ("support", "correct", "predicted")]
                + [round(metrics[k][i], 4) for k in ("accuracy", "precision", "recall", "f1")]
                + [class_names[int(worst[i])] if confused else "", confused]
            )

    return _replace_with(path, write)


def write_json(path: str, obj: Dict[str, Any]) -> str:
    return _replace_with(path, lambda f: json.dump(obj, f, indent=1))


def write_eval_reports(
    folder: str,
    base: str,
    *,
    summary: Dict[str, Any],
    results: Dict[str, Dict[str, float]],
    confusions: Dict[str, torch.Tensor],
    class_names: Sequence[str],
) -> str:
    """Write ``<base>.json`` (``summary`` plus ``results`` and the names of the other files) and,
    per weights, the per-class CSV and the confusion PNG; returns the JSON's path."""
    files: Dict[str, Dict[str, str]] = {}
    for weights, confusion in confusions.items():
        csv_name = f"{base}-{weights}-per_class.csv"
        png_name = f"{base}-{weights}-confusion.png"
        write_per_class_csv(os.path.join(folder, csv_name), class_names, confusion)
        title = f"{summary['model_name']} {weights} @ {summary['img_size']} px"
        plot_confusion(confusion, class_names, os.path.join(folder, png_name), title)
        files[weights] = {"per_class": csv_name, "confusion": png_name}
    report = dict(summary)
    report["results"] = {
        weights: {"top1": m["acc1"], "top5": m["acc5"], "loss": m["loss"], "images": m["n"]}
        for weights, m in results.items()
    }
    report["files"] = files
    return write_json(os.path.join(folder, f"{base}.json"), report)


def sizes_rows(img_size: int, crop_pct: float, results: Dict[str, Dict[str, float]]) -> List[Dict[str, Any]]:
    """The ``<stem>-sizes.csv`` rows of one size: one per weights."""
    return [
        {
            "img_size": img_size,
            "crop_pct": crop_pct,
            "weights": weights,
            "top1": round(m["acc1"], 4),
            "top5": round(m["acc5"], 4),
            "loss": round(m["loss"], 6),
            "images": m["n"],
        }
        for weights, m in results.items()
    ]


def write_sizes_table(path: str, rows: Sequence[Dict[str, Any]]) -> str:
    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=SIZES_FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    return _replace_with(path, write)


def format_sizes_table(rows: Sequence[Dict[str, Any]], title: Optional[str] = None) -> str:
    """The size sweep as an aligned text table (for the log)."""
    header = ["size", "crop", "weights", "top-1", "top-5", "loss", "images"]
    body = [
        [str(r["img_size"]), f"{r['crop_pct']:.3f}", r["weights"], f"{r['top1']:.3f}", f"{r['top5']:.3f}"]
        + [f"{r['loss']:.4f}", str(r["images"])]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header, *body]]
    return "\n".join(([title] if title else []) + lines)
