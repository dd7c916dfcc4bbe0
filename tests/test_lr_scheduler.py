"""LR schedules stepped per optimizer update: warmup start/end values, final values, step
decay, and layer-decay scales applied by the scheduler."""

from __future__ import annotations

import pytest
import torch

from config import get_config
from lr_scheduler import build_scheduler

UPDATES_PER_EPOCH = 10


def _run(name, epochs=10, warmup_epochs=2, **extra):
    config = get_config().clone()
    config.defrost()
    config.merge_from_list(
        [
            "TRAIN.EPOCHS",
            epochs,
            "TRAIN.WARMUP_EPOCHS",
            warmup_epochs,
            "TRAIN.LR_SCHEDULER.NAME",
            name,
            *[x for k, v in extra.items() for x in (k.replace("__", "."), v)],
        ]
    )
    config.freeze()
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.5}], lr=1.0)
    scheduler = build_scheduler(config, optimizer, UPDATES_PER_EPOCH, warmup_lr=0.01, min_lr=0.001)
    lrs = [optimizer.param_groups[0]["lr"]]  # before the first update
    scaled = [optimizer.param_groups[1]["lr"]]
    for t in range(1, epochs * UPDATES_PER_EPOCH + 1):
        scheduler.step_update(t)
        lrs.append(optimizer.param_groups[0]["lr"])
        scaled.append(optimizer.param_groups[1]["lr"])
    return lrs, scaled


@pytest.mark.parametrize("name", ["cosine", "linear", "step"])
def test_warmup_starts_at_warmup_lr_and_ends_at_base_lr(name):
    lrs, _ = _run(name)
    warmup_end = 2 * UPDATES_PER_EPOCH
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[warmup_end // 2] == pytest.approx(0.01 + (1 - 0.01) / 2)  # linear ramp
    assert lrs[warmup_end] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:warmup_end], lrs[1 : warmup_end + 1]))


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_decay_reaches_min_lr_at_the_end(name):
    lrs, _ = _run(name)
    assert lrs[-1] == pytest.approx(0.001)
    middle = (2 * UPDATES_PER_EPOCH + len(lrs) - 1) // 2
    expect_middle = 0.001 + (1 - 0.001) * 0.5  # both are half-way at the midpoint of the decay
    assert lrs[middle] == pytest.approx(expect_middle, rel=1e-3)


def test_step_schedule_multiplies_by_decay_rate_every_decay_epochs():
    lrs, _ = _run("step", TRAIN__LR_SCHEDULER__DECAY_EPOCHS=3, TRAIN__LR_SCHEDULER__DECAY_RATE=0.1)
    w = 2 * UPDATES_PER_EPOCH
    assert lrs[w + 3 * UPDATES_PER_EPOCH - 1] == pytest.approx(1.0)
    assert lrs[w + 3 * UPDATES_PER_EPOCH] == pytest.approx(0.1)
    assert lrs[w + 6 * UPDATES_PER_EPOCH] == pytest.approx(0.01)


def test_layer_decay_scale_is_applied_to_every_value():
    lrs, scaled = _run("cosine")
    assert scaled == pytest.approx([0.5 * v for v in lrs])


def test_zero_warmup_starts_at_base_lr():
    lrs, _ = _run("cosine", warmup_epochs=0)
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.001)


def test_warmup_steps_replace_warmup_epochs_and_count_updates():
    # 7 updates of warmup, not WARMUP_EPOCHS (2) x 10: the peak comes at update 7 exactly.
    lrs, _ = _run("cosine", warmup_epochs=2, TRAIN__WARMUP_STEPS=7)
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[7] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:7], lrs[1:8]))
    assert all(a > b for a, b in zip(lrs[7:-1], lrs[8:]))
    assert lrs[-1] == pytest.approx(0.001)


@pytest.mark.parametrize(
    "warmup_epochs, warmup_steps, expected",
    [(2, 0, 20), (0, 0, 0), (0, 35, 35), (3, 5, 5), (0, 10_000, 99), (20, 0, 99)],
)
def test_warmup_updates_precedence_and_cap(warmup_epochs, warmup_steps, expected):
    from lr_scheduler import warmup_updates

    config = get_config().clone()
    config.defrost()
    config.merge_from_list(
        ["TRAIN.EPOCHS", 10, "TRAIN.WARMUP_EPOCHS", warmup_epochs, "TRAIN.WARMUP_STEPS", warmup_steps]
    )
    # 100 updates in all: a warmup longer than the run stops one update short of the end.
    assert warmup_updates(config, UPDATES_PER_EPOCH) == expected


def test_negative_warmup_steps_is_a_config_error(tmp_path):
    from config import ConfigError
    from main import get_args_parser

    cfg = tmp_path / "c.yaml"
    cfg.write_text("MODEL:\n  NAME: tiny_moat_0\n")
    args = get_args_parser().parse_args(["--cfg", str(cfg), "--opts", "TRAIN.WARMUP_STEPS", "-1"])
    with pytest.raises(ConfigError, match="TRAIN.WARMUP_STEPS"):
        get_config(args)
