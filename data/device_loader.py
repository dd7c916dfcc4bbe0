"""uint8 batches from the loader workers, made float, normalised and randomly erased on the device.

Why: a float32 ImageNet batch of 128 at 224 px is 77 MB to collate, pin and copy per step, the
uint8 one 19 MB; normalisation and random erasing ('pixel' mode draws a normal sample per
erased pixel) cost the workers CPU time that a GPU spends in microseconds. timm's
``PrefetchLoader`` does this work on the device, on a side CUDA stream that overlaps the copy
of the next batch with the current step; the loader workers then run the transform without its
last float steps (``build_transform(..., uint8=True)``).

``DATA.NORMALIZE_ON_DEVICE`` chooses: 'auto' (on CUDA devices), 'on', 'off'. On CPU there is
nothing to overlap and the reference float path keeps random erasing inside the seeded
per-sample transform, so 'auto' stays off there.

What changes with it on: random erasing draws from the main process's RNGs, one batch ahead of
the step that uses it. Augmentation still does not depend on the number of workers, but a run
resumed mid-epoch re-draws the erasing of the first batch after the resume point (position and
everything else are exact; bit-identical resume is a CPU promise, where 'auto' is off).
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.data.loader import PrefetchLoader, fast_collate
from yacs.config import CfgNode

__all__ = ["fast_collate", "normalize_on_device", "wrap_for_device"]


def normalize_on_device(config: CfgNode, device: Optional[torch.device]) -> bool:
    """Whether the loaders deliver uint8 batches normalised on ``device`` (``DATA.NORMALIZE_ON_DEVICE``)."""
    choice = config.DATA.NORMALIZE_ON_DEVICE
    if device is None or choice == "off":
        return False
    return choice == "on" or device.type == "cuda"


def wrap_for_device(loader, config: CfgNode, device: torch.device, is_train: bool) -> PrefetchLoader:
    """``loader`` (uint8 batches) as float batches on ``device``, normalised with DATA.MEAN/STD,
    randomly erased (AUG.RE*) for training."""
    aug = config.AUG
    return PrefetchLoader(
        loader,
        mean=tuple(config.DATA.MEAN),
        std=tuple(config.DATA.STD),
        device=device,
        re_prob=aug.REPROB if is_train else 0.0,
        re_mode=aug.REMODE,
        re_count=aug.RECOUNT,
    )
