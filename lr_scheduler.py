"""Per-update learning-rate schedules with linear warmup (timm schedulers, stepped per
optimizer update rather than per epoch so warmup is smooth at any epoch length)."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler


def warmup_updates(config, updates_per_epoch: int) -> int:
    """Length of the linear warmup in optimizer updates: ``TRAIN.WARMUP_STEPS`` when it is > 0,
    else ``WARMUP_EPOCHS x updates_per_epoch``; at most all updates but the last, so the schedule
    always reaches its peak."""
    total = int(config.TRAIN.EPOCHS * updates_per_epoch)
    if config.TRAIN.WARMUP_STEPS > 0:
        warmup = int(config.TRAIN.WARMUP_STEPS)
    else:
        warmup = int(config.TRAIN.WARMUP_EPOCHS * updates_per_epoch)
    return min(warmup, max(total - 1, 0))


def build_scheduler(
    config, optimizer: torch.optim.Optimizer, updates_per_epoch: int, warmup_lr: float, min_lr: float
) -> Scheduler:
    """Schedule over ``EPOCHS x updates_per_epoch`` optimizer updates.

    Warmup runs linearly from ``warmup_lr`` to the optimizer's LR over ``warmup_updates(...)``
    updates (as a prefix), then: ``cosine`` decays to ``min_lr``; ``linear`` decays linearly to
    ``min_lr`` (timm's poly schedule with power 1); ``step`` multiplies by ``DECAY_RATE`` every
    ``DECAY_EPOCHS``. Call ``step_update(num_updates)`` after every optimizer update.
    Param groups with an ``lr_scale`` (layer decay) get the scaled value.
    """
    total = int(config.TRAIN.EPOCHS * updates_per_epoch)
    warmup = warmup_updates(config, updates_per_epoch)
    name = config.TRAIN.LR_SCHEDULER.NAME
    common = dict(warmup_t=warmup, warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False)
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=min_lr, cycle_limit=1, **common)
    if name == "linear":
        return PolyLRScheduler(
            optimizer, t_initial=max(total - warmup, 1), power=1.0, lr_min=min_lr, cycle_limit=1, **common
        )
    if name == "step":
        decay_t = max(int(config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS * updates_per_epoch), 1)
        return StepLRScheduler(optimizer, decay_t=decay_t, decay_rate=config.TRAIN.LR_SCHEDULER.DECAY_RATE, **common)
    raise ValueError(f"Invalid scheduler {name!r}. Only 'cosine', 'linear' and 'step' are supported.")
