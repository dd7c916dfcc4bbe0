"""Train and eval image transforms, both built by timm from the DATA / AUG / TEST config keys."""
from __future__ import annotations

from typing import Callable

from timm.data import create_transform
from yacs.config import CfgNode


def build_transform(is_train: bool, config: CfgNode) -> Callable:
    """PIL image -> normalised float tensor [3, IMG_SIZE, IMG_SIZE].

    Train: timm's ImageNet recipe (random-resized crop, flip, RandAugment or color jitter,
    random erasing). Eval: resize the short side to floor(IMG_SIZE / CROP_PCT) and center-crop
    (``TEST.CROP``), or squash straight to IMG_SIZE x IMG_SIZE. Both upsample small inputs
    (e.g. 28x28 Fashion-MNIST) like any other.
    """
    data, aug = config.DATA, config.AUG
    mean, std = tuple(data.MEAN), tuple(data.STD)
    if is_train:
        return create_transform(
            input_size=data.IMG_SIZE,
            is_training=True,
            scale=tuple(aug.SCALE),
            ratio=tuple(aug.RATIO),
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT or None,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            interpolation=data.INTERPOLATION,
            mean=mean,
            std=std,
        )
    # 'random' interpolation is a train-time augmentation; eval must be deterministic.
    interpolation = "bicubic" if data.INTERPOLATION == "random" else data.INTERPOLATION
    return create_transform(
        input_size=data.IMG_SIZE,
        is_training=False,
        interpolation=interpolation,
        crop_pct=data.CROP_PCT if config.TEST.CROP else 1.0,
        # 'squash' with crop_pct 1.0 is Resize((IMG_SIZE, IMG_SIZE)) followed by a no-op crop.
        crop_mode="center" if config.TEST.CROP else "squash",
        mean=mean,
        std=std,
    )
