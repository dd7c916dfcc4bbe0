"""Optimizer param groups (no decay for norms, biases and relative-bias tables), the linear LR
scaling rule, SGD/Nesterov, layer decay and fused kernels. A frozen backbone's optimizer is
tested with ``main.freeze_backbone`` in tests/test_main.py."""

from __future__ import annotations

import pytest
import torch

from config import get_config
from models import build_model
from optimizer import build_optimizer, scaled_lrs


def _config(**opts):
    config = get_config().clone()
    config.defrost()
    config.merge_from_list(["MODEL.NAME", "tiny_moat_0", "MODEL.NUM_CLASSES", 3, "DATA.IMG_SIZE", 32])
    for key, value in opts.items():
        config.merge_from_list([key.replace("__", "."), value])
    config.freeze()
    return config


@pytest.fixture(scope="module")
def model():
    return build_model(_config())


def _decay_of(optimizer):
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def test_no_weight_decay_for_1d_params_biases_and_relative_bias_tables(model):
    optimizer = build_optimizer(_config(), model, lr=1e-3)
    decay = _decay_of(optimizer)
    no_wd = model.no_weight_decay()
    assert no_wd, "the model should name its relative-bias tables"
    for name, p in model.named_parameters():
        expect_none = p.ndim <= 1 or name.endswith(".bias") or name in no_wd
        assert decay[id(p)] == (0.0 if expect_none else 0.05), name
    assert len(decay) == sum(1 for _ in model.parameters())  # every parameter is optimised once


def test_lr_scales_linearly_with_total_batch_over_512():
    config = _config(
        DATA__BATCH_SIZE=64, TRAIN__ACCUMULATION_STEPS=2, TRAIN__BASE_LR=1e-3, TRAIN__WARMUP_LR=1e-6, TRAIN__MIN_LR=1e-5
    )
    lrs = scaled_lrs(config, world_size=8)
    # 64 x 8 x 2 = 1024 images per update = 2 x the reference batch of 512.
    assert lrs.base == pytest.approx(2e-3) and lrs.warmup == pytest.approx(2e-6)
    assert lrs.min == pytest.approx(2e-5)
    # The ImageNet recipe's 3.75e-4 per 512 is its official 3e-3 at a total batch of 4,096.
    assert scaled_lrs(_config(DATA__BATCH_SIZE=128), world_size=32).base == pytest.approx(3e-3)


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_uses_momentum_and_the_configured_nesterov(model, nesterov):
    optimizer = build_optimizer(
        _config(TRAIN__OPTIMIZER__NAME="sgd", TRAIN__OPTIMIZER__NESTEROV=nesterov, TRAIN__OPTIMIZER__MOMENTUM=0.8),
        model,
        lr=0.1,
    )
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["nesterov"] is nesterov and group["momentum"] == 0.8 and group["lr"] == 0.1


def test_adamw_gets_betas_and_eps_from_config(model):
    optimizer = build_optimizer(_config(TRAIN__OPTIMIZER__EPS=1e-6), model, lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["eps"] == 1e-6 and optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_layer_decay_gives_the_head_full_lr_and_the_stem_the_smallest(model):
    optimizer = build_optimizer(_config(TRAIN__LAYER_DECAY=0.5), model, lr=1e-3)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    stem = (
        scale[id(model.stem.conv1.weight)] if hasattr(model.stem, "conv1") else scale[id(next(model.stem.parameters()))]
    )
    head = scale[id(model.head.fc.weight)]
    assert head == 1.0 and stem < 1e-3  # 0.5 ** (number of blocks + 1)


def test_fused_kernels_only_for_cuda_parameters_and_never_under_apex(model):
    # CPU keeps torch's default step (bit-identical resume, see optimizer._fused_supported).
    assert not any(g["fused"] for g in build_optimizer(_config(), model, 1e-3).param_groups)
    if torch.cuda.is_available():  # reason: fused kernels are chosen for CUDA parameters only
        cuda_model = build_model(_config()).cuda()
        assert all(g["fused"] for g in build_optimizer(_config(), cuda_model, 1e-3).param_groups)
        sgd = build_optimizer(_config(TRAIN__OPTIMIZER__NAME="sgd"), cuda_model, 1e-3)
        assert all(g["fused"] for g in sgd.param_groups)
        apex = build_optimizer(_config(AMP_OPT_LEVEL="O1"), cuda_model, 1e-3)
        assert not any(g["fused"] for g in apex.param_groups)
