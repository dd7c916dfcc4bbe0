"""The train and eval transforms on what users feed them: every shipped config's default
recipe over thousands of varied images, every augmentation op at every magnitude, every
documented AUG option, Mixup/CutMix in every mode, and every image mode a folder may hold."""

from __future__ import annotations

import glob
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from yacs.config import CfgNode

from config import ConfigError, get_config
from conftest import write_every_image_mode
from data import build_mixup, build_transform, load_rgb
from data.transforms import _augment_ops, posterize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def config_from(cfg_file: str | None = None, **opts) -> CfgNode:
    """A frozen config: defaults, then ``cfg_file`` (with its BASE chain), then ``opts``."""
    import argparse

    from config import update_config

    config = get_config().clone()
    config.defrost()
    if cfg_file:
        update_config(config, argparse.Namespace(cfg=cfg_file, opts=None))
        config.defrost()
    for key, value in opts.items():
        config.merge_from_list([key.replace("__", "."), value])
    config.freeze()
    return config


def varied_images(n: int, seed: int = 0) -> list[Image.Image]:
    """RGB images of many shapes (1x1 to very wide/tall) and contents (noise, flat, extremes)."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (2, 3), (7, 300), (300, 7), (16, 2000), (33, 47), (64, 64), (120, 90)]
    images = []
    for i in range(n):
        h, w = shapes[i % len(shapes)] if i < 2 * len(shapes) else rng.integers(4, 160, 2)
        kind = i % 4
        if kind == 0:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind == 1:
            pixels = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        elif kind == 2:
            pixels = np.full((h, w, 3), 255 * (i % 8 == 2), dtype=np.uint8)  # black or white
        else:
            ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
            pixels = np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8)
        images.append(Image.fromarray(np.ascontiguousarray(pixels)))
    return images


def _seeded(i: int) -> None:
    random.seed(i)
    np.random.seed(i)
    torch.manual_seed(i)


# ------------------------------------------------------------------- the shipped recipes


def test_every_shipped_train_recipe_transforms_thousands_of_varied_images():
    """The test that catches a rare augmentation crash: ~1 image in 700 drew 0-bit posterize
    under the default recipe. Configs sharing one recipe are pushed through once."""
    recipes = {}
    for cfg_file in SHIPPED_CONFIGS:
        config = config_from(cfg_file)
        transform = build_transform(True, config)
        recipes.setdefault(repr(transform), (cfg_file, config.DATA.IMG_SIZE, transform))
    assert len(recipes) >= 3  # 224/256/384 with RandAugment, the demo's, the linear probe's
    images = varied_images(64)
    per_recipe = 1500
    for cfg_file, size, transform in recipes.values():
        for i in range(per_recipe):
            _seeded(i)
            out = transform(images[i % len(images)])
            assert out.shape == (3, size, size) and out.dtype == torch.float32, cfg_file
            assert torch.isfinite(out).all(), cfg_file


@pytest.mark.parametrize("cfg_file", SHIPPED_CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_eval_transform_crops_to_img_size(cfg_file):
    config = config_from(cfg_file)
    transform = build_transform(False, config)
    size = config.DATA.IMG_SIZE
    for image in varied_images(16):
        assert transform(image).shape == (3, size, size)


# -------------------------------------------------------------------- augmentation ops

RAND_POLICIES = [
    "rand-m9-mstd0.5-inc1",
    "rand-m9-mstd0.5",
    "rand-m10-n3-mstd1.0-mmax15",
    "rand-m9-n2-mstd0.5-inc1-mmax12",
    "rand-m0",
    "rand-m7-n4-p0.9",
]
AUTO_POLICIES = ["v0", "v0r", "original", "originalr", "3a"]


@pytest.mark.parametrize("policy", RAND_POLICIES + AUTO_POLICIES + ["augmix-m5-w4-d2"])
def test_every_op_of_every_policy_runs_at_every_magnitude_including_the_clip(policy):
    config = config_from(AUG__AUTO_AUGMENT=policy, DATA__IMG_SIZE=32)
    ops = list(_augment_ops(build_transform(True, config)))
    assert ops, policy
    image = varied_images(1)[0].resize((40, 30))
    for op in ops:
        top = int(max(10, op.magnitude_max or 10))
        for magnitude in range(0, top + 3):  # beyond the top too: the op clips it
            op.magnitude, op.magnitude_std, op.prob = magnitude, 0.0, 1.0
            for i in range(3):  # ops with a random sign or level draw
                _seeded(i)
                out = op(image)
                assert out.size == image.size and out.mode == "RGB", (op.name, magnitude)


def test_zero_bit_posterize_gives_a_black_image_and_other_bit_counts_equal_pillow():
    image = varied_images(1)[0].resize((20, 10))
    assert np.asarray(posterize(image, 0)).max() == 0
    assert np.asarray(posterize(image, -2)).max() == 0
    assert np.asarray(posterize(image.convert("L"), 0)).max() == 0
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(posterize(image, bits)), np.asarray(ImageOps.posterize(image, bits)))
    assert posterize(image, 8) is image


def test_posterize_ops_keep_timm_magnitudes_only_the_op_function_changes():
    config = config_from(AUG__AUTO_AUGMENT="rand-m9-mstd0.5-inc1", DATA__IMG_SIZE=32)
    ops = list(_augment_ops(build_transform(True, config)))
    posterizers = [op for op in ops if op.name.startswith("Posterize")]
    assert posterizers and all(op.aug_fn is posterize for op in posterizers)
    # timm's level for magnitude 10 under inc1 is 0 bits: exactly the case made black.
    assert posterizers[0].level_fn(10, posterizers[0].hparams) == (0,)


@pytest.mark.parametrize(
    "opts",
    [
        dict(AUG__AUTO_AUGMENT="", AUG__COLOR_JITTER=0.4),
        dict(AUG__AUTO_AUGMENT="", AUG__COLOR_JITTER=0.0),
        dict(AUG__REMODE="const", AUG__REPROB=1.0),
        dict(AUG__REMODE="rand", AUG__REPROB=1.0, AUG__RECOUNT=3),
        dict(AUG__REMODE="pixel", AUG__REPROB=1.0, AUG__RECOUNT=2),
        dict(DATA__INTERPOLATION="random"),
        dict(DATA__INTERPOLATION="bilinear", AUG__SCALE=[0.5, 0.5], AUG__RATIO=[1.0, 1.0]),
    ],
)
def test_documented_train_options_transform_varied_images(opts):
    transform = build_transform(True, config_from(DATA__IMG_SIZE=64, **opts))
    for i, image in enumerate(varied_images(40)):
        _seeded(i)
        assert transform(image).shape == (3, 64, 64)


@pytest.mark.parametrize(
    "opts",
    [
        dict(DATA__CROP_PCT=1.0),
        dict(DATA__CROP_PCT=0.875),
        dict(DATA__CROP_PCT=0.95),
        dict(TEST__CROP=False),
        dict(DATA__INTERPOLATION="random"),
        dict(DATA__INTERPOLATION="bilinear"),
    ],
)
def test_eval_resize_and_crop_paths_give_img_size(opts):
    transform = build_transform(False, config_from(DATA__IMG_SIZE=64, **opts))
    for image in varied_images(16):
        assert transform(image).shape == (3, 64, 64)


def test_eval_transform_resizes_short_side_by_crop_pct_then_center_crops():
    resize, crop = build_transform(False, config_from(DATA__IMG_SIZE=224)).transforms[:2]
    assert resize.size == math.floor(224 / 0.875) == 256 and tuple(crop.size) == (224, 224)


def test_eval_transform_without_crop_squashes_to_img_size():
    transform = build_transform(False, config_from(DATA__IMG_SIZE=32, TEST__CROP=False))
    assert tuple(transform.transforms[0].size) == (32, 32)


# --------------------------------------------------------------------------- Mixup/CutMix


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize(
    "mixup, cutmix, minmax", [(0.8, 1.0, []), (0.8, 0.0, []), (0.0, 1.0, []), (0.0, 0.0, [0.2, 0.8])]
)
def test_mixup_and_cutmix_in_every_mode_give_soft_targets_that_sum_to_one(mode, mixup, cutmix, minmax):
    config = config_from(
        AUG__MIXUP=mixup, AUG__CUTMIX=cutmix, AUG__CUTMIX_MINMAX=minmax, AUG__MIXUP_MODE=mode, MODEL__NUM_CLASSES=5
    )
    mixup_fn = build_mixup(config)
    for seed in range(10):
        _seeded(seed)
        images = torch.rand(6, 3, 32, 32)
        out, target = mixup_fn(images.clone(), torch.randint(0, 5, (6,)))
        assert out.shape == images.shape and target.shape == (6, 5)
        assert torch.allclose(target.sum(1), torch.ones(6)) and torch.isfinite(out).all()


def test_odd_batch_with_mixup_is_a_config_error(tmp_path):
    import argparse

    from config import update_config

    cfg = tmp_path / "odd.yaml"
    cfg.write_text("DATA:\n  BATCH_SIZE: 5\n")
    with pytest.raises(ConfigError, match="DATA.BATCH_SIZE"):
        update_config(get_config().clone(), argparse.Namespace(cfg=str(cfg), opts=None))


# ------------------------------------------------------------------------ image decoding


def test_every_image_mode_decodes_to_rgb_and_sixteen_bit_keeps_its_values(tmp_path):
    paths = write_every_image_mode(tmp_path)
    decoded = {label: load_rgb(path) for label, path in paths.items()}
    assert all(img.mode == "RGB" for img in decoded.values())
    # 16-bit values v*257 come back as v (torchvision's loader clips them all to 255).
    gray = np.asarray(Image.open(paths["L"]))
    assert np.array_equal(np.asarray(decoded["I;16"])[..., 0], gray)
    # The EXIF-rotated photo is shown upright: 50 wide x 20 high stored, 20 x 50 displayed.
    assert decoded["EXIF-rotated"].size == (20, 50)
    assert decoded["1x1"].size == (1, 1)


def test_every_image_mode_goes_through_the_default_train_and_eval_transforms(tmp_path):
    paths = write_every_image_mode(tmp_path)
    config = config_from(DATA__IMG_SIZE=64)
    train, evaluate = build_transform(True, config), build_transform(False, config)
    for label, path in paths.items():
        for i in range(20):
            _seeded(i)
            assert train(load_rgb(path)).shape == (3, 64, 64), label
        assert evaluate(load_rgb(path)).shape == (3, 64, 64), label


def test_unparsable_auto_augment_policy_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="AUG.AUTO_AUGMENT='rand-m9-w0'"):
        build_transform(True, config_from(AUG__AUTO_AUGMENT="rand-m9-w0"))
