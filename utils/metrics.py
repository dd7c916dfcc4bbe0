"""Running averages and exact, world-size-independent classification accuracy.

Validation sums correct counts and sample counts over ranks (each rank sees a disjoint,
non-padded part of the validation set), so a 2-process eval gives the same numbers as a
1-process eval of the same checkpoint.
"""

from __future__ import annotations

from typing import Dict, Sequence

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
    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """``logits`` [B, K], ``target`` [B] class indices, ``loss_sum`` summed over the batch."""
        maxk = min(max(self.topk), logits.shape[1])
        pred = logits.topk(maxk, dim=1).indices  # [B, maxk]
        hit = pred.eq(target[:, None])
        row = [loss_sum.double(), torch.tensor(float(target.numel()), dtype=torch.float64, device=logits.device)]
        row += [hit[:, : min(k, maxk)].any(dim=1).sum().double() for k in self.topk]
        self.totals += torch.stack(row)

    def compute(self) -> Dict[str, float]:
        """Sum over ranks and return loss (mean), acc{k} (percent) and n."""
        totals = all_reduce_sum(self.totals.clone()).tolist()
        n = max(totals[1], 1.0)
        out = {"loss": totals[0] / n, "n": int(totals[1])}
        for k, correct in zip(self.topk, totals[2:]):
            out[f"acc{k}"] = 100.0 * correct / n
        return out
