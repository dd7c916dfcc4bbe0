"""The fine-tuning recipes of docs/finetune.md, end to end through ``main.py`` subprocesses.

Each run takes a shipped config as its BASE and only swaps in the tiny model, tiny images and one
epoch (and leaves out the test config's augmentation), so the configs' own keys (LAYER_DECAY,
FREEZE_BACKBONE, augmentation, EMA) are what runs.
The pretrained checkpoint is the shared 3-class, 32 px ``reference_run``.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from conftest import REPO, load_checkpoint, make_image_tree, read_log, read_summary

CONFIGS = os.path.join(REPO, "configs")
FT_384 = os.path.join(CONFIGS, "moat_0_384_ft.yaml")
TRANSFER_FT = os.path.join(CONFIGS, "transfer", "tiny_moat_2_imagefolder_finetune.yaml")
LINEAR_PROBE = os.path.join(CONFIGS, "transfer", "tiny_moat_2_imagefolder_linear_probe.yaml")
HEAD = ("head.fc.weight", "head.fc.bias")


def _init_weights(path: str) -> dict:
    """The weights ``--pretrained`` starts from: the EMA when the checkpoint has one."""
    obj = load_checkpoint(path)
    return obj.get("model_ema") or obj["model"]


def _train(run_cli, cfg: str, data: str, out: str, pretrained: str) -> str:
    proc = run_cli(
        [
            "--cfg",
            cfg,
            "--data-path",
            data,
            "--output",
            out,
            "--tag",
            "t",
            "--pretrained",
            pretrained,
            "--device",
            "cpu",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(out, "tiny_moat_0", "t")


@pytest.fixture(scope="module")
def pretrained(reference_run) -> str:
    return os.path.join(reference_run, "last.pth")


@pytest.fixture(scope="module")
def two_class_tree(tmp_path_factory) -> str:
    """A new task: 2 classes under other names (red and green images), 4 train images each."""
    return make_image_tree(
        str(tmp_path_factory.mktemp("two_class")), train_per_class=4, val_per_class=2, classes=["cat", "dog"]
    )


@pytest.mark.parametrize("path", [FT_384, TRANSFER_FT, LINEAR_PROBE])
def test_shipped_fine_tune_configs_load(path):
    from config import get_config

    config = get_config(argparse.Namespace(cfg=path, opts=None))
    if path == FT_384:
        assert (config.DATA.IMG_SIZE, config.TRAIN.EPOCHS, config.TRAIN.EMA.ENABLE) == (384, 30, True)
    elif path == TRANSFER_FT:
        assert (config.TRAIN.LAYER_DECAY, config.TRAIN.FREEZE_BACKBONE) == (0.75, False)
    else:
        assert config.TRAIN.FREEZE_BACKBONE and config.AUG.MIXUP == config.AUG.CUTMIX == 0.0


@pytest.mark.slow
def test_fine_tune_at_higher_resolution_loads_weights_only_and_keeps_table_shapes(
    pretrained, image_tree, tiny_cfg, run_cli, tmp_path
):
    # The 384 recipe, scaled down: a 32 px checkpoint fine-tuned at 64 px on the same classes.
    cfg = tiny_cfg(
        BASE=[FT_384],
        MODEL={"NAME": "tiny_moat_0", "NUM_CLASSES": 3},
        DATA={"IMG_SIZE": 64},
        TRAIN={"EPOCHS": 1, "WARMUP_EPOCHS": 0},
        AUG=None,
    )
    run_dir = _train(run_cli, cfg, image_tree, str(tmp_path), pretrained)

    log = read_log(run_dir)
    # MaxViT's fine-tunes start a fresh head, also on the same classes (MODEL.PRETRAINED_HEAD drop).
    dropped = "dropped the head (head.fc.weight, head.fc.bias): MODEL.PRETRAINED_HEAD drop, it starts fresh"
    assert f"loaded pretrained EMA weights from {pretrained}; {dropped}" in log
    ckpt, old = load_checkpoint(os.path.join(run_dir, "last.pth")), load_checkpoint(pretrained)
    # Weights only: a fresh run (epoch 0, its own optimizer steps), not a resume of epoch 1.
    assert (ckpt["epoch"], ckpt["step"]) == (0, 6) and "resumed" not in log
    new = ckpt["model"]
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in old["model"].items()}
    assert any("relative_position_bias_table" in k for k in new)
    assert not torch.equal(new["head.fc.weight"], old["model"]["head.fc.weight"])
    # The recipe reports, and chooses best.pth by, the EMA's top-1 (TRAIN.REPORT.WEIGHTS).
    (row,) = read_summary(run_dir)
    assert float(row["max_accuracy"]) == float(row["ema_top1"]) == pytest.approx(ckpt["max_accuracy"], abs=1e-3)


@pytest.mark.slow
def test_transfer_with_layer_decay_reinitialises_head_and_decays_lr_with_depth(
    pretrained, two_class_tree, tiny_cfg, run_cli, tmp_path
):
    cfg = tiny_cfg(
        BASE=[TRANSFER_FT],
        MODEL={"NAME": "tiny_moat_0", "NUM_CLASSES": 2},
        TRAIN={"EPOCHS": 1, "WARMUP_EPOCHS": 0},
        AUG=None,
    )
    run_dir = _train(run_cli, cfg, two_class_tree, str(tmp_path), pretrained)

    assert "dropped the head (head.fc.weight, head.fc.bias)" in read_log(run_dir)
    ckpt, old = load_checkpoint(os.path.join(run_dir, "last.pth")), load_checkpoint(pretrained)["model"]
    new = ckpt["model"]
    assert new["head.fc.weight"].shape == (2, old["head.fc.weight"].shape[1])
    assert new["head.fc.bias"].shape == (2,)
    assert not torch.equal(new["stem.conv1.weight"], old["stem.conv1.weight"])  # full fine-tune
    assert ckpt["class_names"] == ["cat", "dog"]

    # The saved optimizer's groups in their order of parameters, named through an identical model.
    from config import get_config
    from models import build_model
    from optimizer import build_optimizer

    config = get_config(argparse.Namespace(cfg=cfg, opts=None))
    model = build_model(config)
    names = {id(p): n for n, p in model.named_parameters()}
    built = build_optimizer(config, model, lr=1.0)
    saved = ckpt["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in saved] == [len(g["params"]) for g in built.param_groups]
    scale_of = {names[id(p)]: g["lr_scale"] for g, s in zip(built.param_groups, saved) for p in g["params"]}
    head_lr = max(g["lr"] for g in saved)
    for group in saved:  # the schedule applies each group's scale
        assert group["lr"] == pytest.approx(head_lr * group["lr_scale"])
    # 14 blocks + stem + head: the stem gets 0.75^15, the last block 0.75, the head 1.
    assert scale_of["stem.conv1.weight"] == pytest.approx(0.75**15)
    assert scale_of["stages.3.blocks.1.attn.proj.weight"] == pytest.approx(0.75)
    assert scale_of["head.fc.weight"] == scale_of["head.norm.weight"] == 1.0
    in_model_order = [scale_of[n] for n, _ in model.named_parameters()]
    assert in_model_order == sorted(in_model_order) and len(set(in_model_order)) == 16


@pytest.mark.slow
def test_linear_probe_trains_only_the_new_head_and_keeps_backbone_bit_identical(
    pretrained, two_class_tree, tiny_cfg, run_cli, tmp_path
):
    # Two epochs so the head is seen changing between the saved epochs while the backbone is not.
    cfg = tiny_cfg(
        BASE=[LINEAR_PROBE],
        MODEL={"NAME": "tiny_moat_0", "NUM_CLASSES": 2},
        TRAIN={"EPOCHS": 2, "WARMUP_EPOCHS": 0},
        AUG=None,
    )
    run_dir = _train(run_cli, cfg, two_class_tree, str(tmp_path), pretrained)

    assert "dropped the head (head.fc.weight, head.fc.bias)" in read_log(run_dir)
    old = _init_weights(pretrained)
    epochs = [load_checkpoint(os.path.join(run_dir, f"epoch_{e}.pth"))["model"] for e in (0, 1)]
    for new in epochs:
        assert new.keys() == old.keys()
        # Parameters and BatchNorm buffers (running stats, num_batches_tracked) alike.
        changed = [k for k in old if k not in HEAD and not torch.equal(new[k], old[k])]
        assert not changed, f"frozen backbone tensors changed: {changed[:5]}"
        assert new["head.fc.weight"].shape == (2, old["head.fc.weight"].shape[1])
    assert any(k.endswith("running_mean") for k in old)
    assert not torch.equal(epochs[0]["head.fc.weight"], epochs[1]["head.fc.weight"])
    assert not torch.equal(epochs[0]["head.fc.bias"], epochs[1]["head.fc.bias"])
    # Only the head is in the optimizer.
    saved = load_checkpoint(os.path.join(run_dir, "last.pth"))["optimizer"]
    assert sum(len(g["params"]) for g in saved["param_groups"]) == 2
