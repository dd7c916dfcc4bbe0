"""Train and eval image transforms, both built by timm from the DATA / AUG / TEST config keys."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform
from yacs.config import CfgNode

from utils.errors import ConfigError


def build_transform(is_train: bool, config: CfgNode, uint8: bool = False) -> Callable:
    """PIL image -> normalised float tensor [3, IMG_SIZE, IMG_SIZE].

    Train: timm's ImageNet recipe (random-resized crop, flip, RandAugment or color jitter,
    random erasing). Eval: resize the short side to floor(IMG_SIZE / CROP_PCT) and center-crop
    (``TEST.CROP``), or squash straight to IMG_SIZE x IMG_SIZE. Both upsample small inputs
    (e.g. 28x28 Fashion-MNIST) like any other.

    ``uint8``: stop before the float conversion (timm's ``use_prefetcher`` form): a uint8
    ``[3, IMG_SIZE, IMG_SIZE]`` image, 4x less to collate, pin and copy; normalisation and random
    erasing then run on the device (``data.device_loader``).
    """
    data, aug = config.DATA, config.AUG
    mean, std = tuple(data.MEAN), tuple(data.STD)
    if is_train:
        try:
            transform = create_transform(
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
                use_prefetcher=uint8,
            )
        except (AssertionError, KeyError) as e:  # timm's policy parser asserts on unknown parts
            raise ConfigError(
                f"invalid AUG.AUTO_AUGMENT={aug.AUTO_AUGMENT!r}: timm cannot parse it "
                f"({e or type(e).__name__}); e.g. 'rand-m9-mstd0.5-inc1', 'v0', "
                "'augmix-m5-w4-d2', or '' for none"
            ) from None
        _patch_posterize(transform)
        return transform
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
        use_prefetcher=uint8,
    )


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, with ``bits_to_keep <= 0`` giving a black image.

    Why: timm's ``PosterizeIncreasing`` asks to keep 0 bits at magnitude 10 (reached by
    ``rand-m9-mstd0.5-inc1``, Swin's and DeiT's policy) and ``Posterize`` at magnitudes below 3. Pillow
    before 13 masked every bit away (a black image, as the reference TensorFlow RandAugment
    does); Pillow 13 raises ``ValueError`` instead, which crashed training in its first batches.
    Keeping the black image keeps the augmentation distribution unchanged.
    """
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


def _augment_ops(transform: Any) -> Iterator[Any]:
    """Every timm ``AugmentOp`` inside a transform: RandAugment and AugMix keep them in ``ops``,
    AutoAugment in ``policy`` (a list of sub-policies)."""
    for t in getattr(transform, "transforms", [transform]):
        yield from getattr(t, "ops", [])
        for sub_policy in getattr(t, "policy", []):
            yield from sub_policy


def _patch_posterize(transform: Any) -> None:
    """Point this transform's posterize ops at :func:`posterize` (timm's op registry stays as is)."""
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
