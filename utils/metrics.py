"""Running averages and exact, world-size-independent classification accuracy.

Validation sums correct counts and sample counts over ranks (each rank sees a disjoint,
non-padded part of the validation set), so a 2-process eval gives the same numbers as a
1-process eval of the same checkpoint.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from .distributed import all_reduce_sum


class AverageMeter:
    """Current value and running average (host-side floats: update only at log steps on GPU)."""

    def __init__(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


class ClassificationTotals:
    """Device-side sums of loss, correct top-k and samples; no host sync until ``compute``."""

    def __init__(self, device: torch.device, topk: Sequence[int] = (1, 5)) -> None:
        self.topk = tuple(topk)
        # [loss_sum, n, correct@k...] in float64 so sums over ImageNet stay exact.
        self.totals = torch.zeros(2 + len(self.topk), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, K], ``target`` [B] class indices, ``loss_sum`` summed over the batch.

        Returns the top-1 predictions [B], the ones counted here (a ``ConfusionMatrix`` fed with
        them agrees with acc1 even where logits tie)."""
        maxk = min(max(self.topk), logits.shape[1])
        pred = logits.topk(maxk, dim=1).indices  # [B, maxk]
        hit = pred.eq(target[:, None])
        row = [loss_sum.double(), torch.tensor(float(target.numel()), dtype=torch.float64, device=logits.device)]
        row += [hit[:, : min(k, maxk)].any(dim=1).sum().double() for k in self.topk]
        self.totals += torch.stack(row)
        return pred[:, 0]

    def compute(self) -> Dict[str, float]:
        """Sum over ranks and return loss (mean), acc{k} (percent) and n."""
        totals = all_reduce_sum(self.totals.clone()).tolist()
        n = max(totals[1], 1.0)
        out = {"loss": totals[0] / n, "n": int(totals[1])}
        for k, correct in zip(self.topk, totals[2:]):
            out[f"acc{k}"] = 100.0 * correct / n
        return out


class ConfusionMatrix:
    """Device-side ``[K, K]`` int64 counts (row: true class, column: predicted class).

    Updated per batch without a host sync; ``compute`` sums it over ranks once, so like
    ``ClassificationTotals`` it is exact under DDP (every val image counted once). 1000 classes
    take 8 MB.
    """

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target`` [B]: predicted and true class indices in ``[0, K)``."""
        k = self.num_classes
        pairs = target.long() * k + pred.long()
        self.counts += torch.bincount(pairs, minlength=k * k).view(k, k)

    def compute(self) -> torch.Tensor:
        """The matrix summed over ranks, on the CPU."""
        return all_reduce_sum(self.counts.clone()).cpu()


def per_class_metrics(confusion: torch.Tensor) -> Dict[str, List[float]]:
    """Per-class ``support``, ``correct``, ``predicted``, and ``accuracy``, ``precision``,
    ``recall``, ``f1`` in percent, from a ``[K, K]`` confusion matrix (rows: true classes).

    A class's accuracy is the share of its images classified as it, which for single-label data
    is also its recall; so the support-weighted mean of ``recall`` is the overall top-1. A class
    never predicted has precision 0 (scikit-learn's convention).
    """
    counts = confusion.double()
    correct = counts.diagonal()
    support = counts.sum(dim=1)
    predicted = counts.sum(dim=0)
    recall = 100.0 * correct / support.clamp(min=1)
    precision = 100.0 * correct / predicted.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {
        "support": support.long().tolist(),
        "correct": correct.long().tolist(),
        "predicted": predicted.long().tolist(),
        "accuracy": recall.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
    }


def most_confused_pairs(confusion: torch.Tensor, n: int) -> List[Tuple[int, int, int]]:
    """The ``n`` largest off-diagonal cells as ``(true class, predicted class, count)``, largest
    first (ties by class indices); cells with count 0 are left out."""
    off = confusion.clone().long()
    off.fill_diagonal_(0)
    counts, index = torch.sort(off.flatten(), descending=True, stable=True)
    k = confusion.shape[1]
    return [(i // k, i % k, c) for c, i in zip(counts[:n].tolist(), index[:n].tolist()) if c > 0]
