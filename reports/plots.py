"""PNG figures for people who do not run TensorBoard: training curves and confusion reports.

Drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no display, no global
backend switch), written to a temporary file and renamed so a reader never sees half a PNG.
Figure sizes are fixed (``*_SIZE`` in pixels) so the files look the same from run to run.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import torch

DPI = 100
CURVES_SIZE = (1500, 450)  # width, height in pixels: train loss | lr | val top-1
MATRIX_SIZE = (900, 900)  # the full confusion matrix (up to MATRIX_MAX_CLASSES classes)
PAIRS_SIZE = (1000, 800)  # the most confused pairs, for more classes than that
MATRIX_MAX_CLASSES = 30
TOP_PAIRS = 25


def _figure(size: Tuple[int, int]) -> Any:
    # Imported here: matplotlib takes ~0.5 s to import and most processes never draw.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str) -> str:
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)
    return path


def _floats(rows: Sequence[Dict[str, str]], key: str) -> Tuple[List[int], List[float]]:
    """(epochs, values) of the rows where ``key`` holds a number (EMA columns may be empty)."""
    epochs, values = [], []
    for row in rows:
        try:
            value = float(row.get(key, ""))
        except ValueError:
            continue
        if math.isfinite(value):
            epochs.append(int(row["epoch"]))
            values.append(value)
    return epochs, values


def plot_training_curves(rows: Sequence[Dict[str, str]], path: str) -> str:
    """Train loss, learning rate and val top-1 (model and EMA) per epoch, from ``summary.csv``
    rows (strings, as ``csv.DictReader`` gives them)."""
    fig = _figure(CURVES_SIZE)
    loss_ax, lr_ax, acc_ax = fig.subplots(1, 3)
    loss_ax.plot(*_floats(rows, "train_loss"), marker="o", label="train")
    loss_ax.plot(*_floats(rows, "val_loss"), marker="o", label="val")
    loss_ax.set(title="loss", xlabel="epoch")
    loss_ax.legend()
    lr_ax.plot(*_floats(rows, "lr"), marker="o")
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    acc_ax.plot(*_floats(rows, "val_top1"), marker="o", label="model")
    ema = _floats(rows, "ema_top1")
    if ema[0]:
        acc_ax.plot(*ema, marker="o", label="EMA")
    acc_ax.set(title="val top-1 (%)", xlabel="epoch")
    acc_ax.legend()
    for ax in (loss_ax, lr_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def plot_confusion(confusion: "torch.Tensor", class_names: Sequence[str], path: str, title: str) -> str:
    """The confusion matrix (rows: true class, columns: predicted) for up to
    ``MATRIX_MAX_CLASSES`` classes; beyond that, whose 1000x1000 cells nobody can read, a bar
    chart of the ``TOP_PAIRS`` most confused (true -> predicted) pairs. ``confusion`` is a
    ``[K, K]`` int64 tensor of counts."""
    from utils.metrics import most_confused_pairs

    counts = confusion.numpy()
    if len(class_names) <= MATRIX_MAX_CLASSES:
        return _plot_matrix(counts, class_names, path, title)
    return _plot_pairs(most_confused_pairs(confusion, TOP_PAIRS), counts.sum(axis=1), class_names, path, title)


def _plot_matrix(counts: np.ndarray, class_names: Sequence[str], path: str, title: str) -> str:
    fig = _figure(MATRIX_SIZE)
    ax = fig.subplots()
    k = len(class_names)
    # Row-normalised colours (share of the true class), raw counts as text.
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ticks = list(range(k))
    ax.set_xticks(ticks, labels=class_names, rotation=90)
    ax.set_yticks(ticks, labels=class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    dark = shares[i, j] > 0.5
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if dark else "black")
    return _save(fig, path)


def _plot_pairs(
    pairs: Sequence[Tuple[int, int, int]], support: np.ndarray, class_names: Sequence[str], path: str, title: str
) -> str:
    fig = _figure(PAIRS_SIZE)
    ax = fig.subplots()
    labels = [f"{class_names[t]} \u2192 {class_names[p]}" for t, p, _ in pairs]
    values = [c for _, _, c in pairs]
    bars = ax.barh(range(len(pairs)), values, color="tab:red")
    ax.set_yticks(range(len(pairs)), labels=labels)
    ax.invert_yaxis()  # the most confused pair on top
    ax.bar_label(bars, labels=[f"{c} ({100.0 * c / max(int(support[t]), 1):.0f}%)" for t, _, c in pairs], padding=3)
    ax.set(
        xlabel="images of the true class predicted as the other (share of the true class)",
        title=f"{title}: the {len(pairs)} most confused pairs (true \u2192 predicted)",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    if not pairs:
        ax.text(0.5, 0.5, "no confusions", transform=ax.transAxes, ha="center", va="center")
    return _save(fig, path)
