"""docs/recipes.md and the shipped ImageNet configs say the same thing.

The table between the ``recipe-table`` markers states, per config, what a run does at a total
batch of 4,096; each row is recomputed here from the config through the trainer's own code (the LR
scaling of ``optimizer.scaled_lrs``, the warmup of ``lr_scheduler.build_scheduler``, the model's
drop path), so a config change without the table, or the table without the config, fails.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re

import pytest
import torch

from conftest import REPO

DOC = os.path.join(REPO, "docs", "recipes.md")
CONFIGS = os.path.join(REPO, "configs")
# Training images of ImageNet-1K and of ImageNet-22K (fall 2011, 21,841 classes).
IMAGES = {1000: 1_281_167, 21841: 14_197_122}
TOTAL_BATCH = 4096
MEAN_STD = {"imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "0.5": ([0.5] * 3, [0.5] * 3)}


def _table() -> dict:
    text = open(DOC).read()
    block = text.split("<!-- recipe-table:start -->")[1].split("<!-- recipe-table:end -->")[0]
    lines = [line.strip() for line in block.strip().splitlines()]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        row = dict(zip(header, cells))
        rows[row["config"].strip("`")] = row
    return rows


def _shipped() -> list:
    """The ImageNet configs: every variant file, its 384 fine-tune, and the ImageNet-22K ones."""
    paths = glob.glob(os.path.join(CONFIGS, "*moat_*.yaml")) + glob.glob(os.path.join(CONFIGS, "imagenet22k", "*.yaml"))
    return sorted(os.path.relpath(p, CONFIGS) for p in paths if "fashion_mnist" not in p)


def _pair(cell: str) -> tuple:
    a, b = cell.split("/")
    return a.strip(), b.strip()


def _effective(name: str) -> dict:
    """What the config does at a total batch of 4,096 (32 processes x 128 images)."""
    from config import get_config
    from lr_scheduler import build_scheduler
    from models import moat_cfg_from_config
    from optimizer import scaled_lrs

    config = get_config(argparse.Namespace(cfg=os.path.join(CONFIGS, name), opts=None))
    config.defrost()
    config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS = 128, 1
    config.freeze()
    lrs = scaled_lrs(config, world_size=TOTAL_BATCH // 128)
    # Images held out for validation do not train (assuming every class has more of them).
    train_images = IMAGES[config.MODEL.NUM_CLASSES] - config.DATA.VAL_HOLDOUT * config.MODEL.NUM_CLASSES
    updates_per_epoch = train_images // TOTAL_BATCH  # the train loader drops the last batch
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lrs.base)
    scheduler = build_scheduler(config, optimizer, updates_per_epoch, lrs.warmup, lrs.min)
    ema = config.TRAIN.EMA
    mean_std = (list(config.DATA.MEAN), list(config.DATA.STD))
    return {
        "config": config,
        "epochs": config.TRAIN.EPOCHS,
        "size": config.DATA.IMG_SIZE,
        "eval": (math.floor(config.DATA.IMG_SIZE / config.DATA.CROP_PCT), config.DATA.IMG_SIZE),
        "lr": (lrs.base, lrs.min),
        "warmup_lr": lrs.warmup,
        "warmup": scheduler.warmup_t,
        "weight decay": config.TRAIN.WEIGHT_DECAY,
        "clip": config.TRAIN.CLIP_GRAD,
        "RandAugment": config.AUG.AUTO_AUGMENT,
        "mixing": (config.AUG.MIXUP, config.AUG.CUTMIX),
        "erasing": config.AUG.REPROB,
        "smoothing": config.MODEL.LABEL_SMOOTHING,
        "EMA": f"{ema.DECAY:g} {ema.RAMP}" if ema.ENABLE else "off",
        "drop path": moat_cfg_from_config(config).drop_path_rate,
        "mean/std": next((k for k, v in MEAN_STD.items() if v == mean_std), repr(mean_std)),
        "classes": config.MODEL.NUM_CLASSES,
        "val": f"{config.DATA.VAL_HOLDOUT} held out" if config.DATA.VAL_HOLDOUT else config.DATA.VAL_SPLIT,
        # What the run reports: the weights fall back to the model's without an EMA.
        "report": (config.TRAIN.REPORT.CHECKPOINT, config.TRAIN.REPORT.WEIGHTS if ema.ENABLE else "model"),
        "head": config.MODEL.PRETRAINED_HEAD,
    }


def test_the_table_has_one_row_per_shipped_imagenet_config():
    assert sorted(_table()) == _shipped()


@pytest.mark.parametrize("name", _shipped())
def test_table_row_is_what_the_config_does_at_batch_4096(name):
    row, got = _table()[name], _effective(name)
    assert int(row["epochs"]) == got["epochs"]
    assert int(row["size"]) == got["size"]
    assert tuple(int(x) for x in _pair(row["eval"])) == got["eval"]
    assert tuple(float(x) for x in _pair(row["peak / min LR"])) == pytest.approx(got["lr"], rel=1e-9)
    assert int(row["warmup updates"]) == got["warmup"]
    assert float(row["weight decay"]) == pytest.approx(got["weight decay"], rel=1e-9)
    assert float(row["clip"]) == got["clip"]
    assert row["RandAugment"].strip("`") == got["RandAugment"]
    assert tuple(float(x) for x in _pair(row["Mixup / CutMix"])) == got["mixing"]
    assert float(row["erasing"]) == got["erasing"]
    assert float(row["smoothing"]) == got["smoothing"]
    assert row["EMA"] == got["EMA"]
    assert float(row["drop path"]) == pytest.approx(got["drop path"])
    assert row["mean/std"] == got["mean/std"]
    assert int(row["classes"]) == got["classes"]
    assert row["val"] == got["val"]
    assert _pair(row["report"]) == got["report"]
    assert row["head"] == got["head"]


@pytest.mark.parametrize("name", _shipped())
def test_every_recipe_warms_up_from_zero_or_not_at_all(name):
    got = _effective(name)
    assert got["warmup_lr"] == 0.0 or got["warmup"] == 0


def test_the_documented_scaling_of_the_1k_recipe():
    """BASE_LR 3.75e-4 per 512 is the official 3e-3 at 4,096; 32 epochs are 9,984 updates there."""
    got = _effective("moat_0.yaml")
    assert got["config"].TRAIN.BASE_LR * TOTAL_BATCH / 512 == pytest.approx(3e-3)
    assert got["config"].TRAIN.WARMUP_EPOCHS == 32 and got["config"].TRAIN.WARMUP_STEPS == 0
    assert abs(got["warmup"] - 10_000) / 10_000 < 0.002
    text = open(DOC).read()
    assert re.search(r"3\.75e-4 and 1\.25e-6", text) and "9,984 updates at 4,096" in text


def test_the_imagenet_recipes_report_the_last_checkpoint_and_ramp_the_ema_as_tensorflow():
    """The MOAT paper reports the last checkpoint; Google's trainers evaluate the EMA and ramp its
    decay with the step count; MaxViT's fine-tunes start a fresh head."""
    for name in _shipped():
        got = _effective(name)
        assert got["report"] == ("last", "ema") and got["EMA"] == "0.9999 tf", name
        assert got["head"] == ("drop" if name.endswith("_ft.yaml") else "auto"), name
        assert (got["val"] == "2 held out") == (got["classes"] == 21841), name


def test_the_documented_22k_epoch():
    """2 images of each of the 21,841 classes are held out: 3,455 updates of 4,096 per epoch."""
    got = _effective("imagenet22k/moat_2_22k.yaml")
    assert got["config"].DATA.DATASET == "imagenet22k" and got["warmup"] == 3 * 3455
    assert "3,455 updates per epoch" in open(DOC).read()
