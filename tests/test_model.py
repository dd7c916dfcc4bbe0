"""The MOAT model family: official architecture facts, resolution agnosticism, the timm API and
architectures from a MoatCfg (any depth, width, block mix and number of stages)."""

import copy
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models.config import MoatCfg, MoatConfigError, resolve_cfg
from models.moat import (
    MOAT_CFGS,
    Attention,
    AvgPool2dTFSame,
    MBConvBlock,
    MOATBlock,
    RelativePositionBias,
    create_moat,
    list_variants,
)

# Official trainable-parameter counts (1000-class head) from deeplab2's moat_test.py.
OFFICIAL_PARAMS = {
    "moat_0": (27_846_892, 27_777_544),
    "moat_1": (41_598_448, 41_467_864),
    "moat_2": (73_422_408, 73_248_296),
    "moat_3": (189_958_040, 189_536_280),
    "moat_4": (483_214_184, 482_539_368),
    "tiny_moat_0": (3_355_348, 3_332_232),
    "tiny_moat_1": (5_122_895, 5_094_000),
    "tiny_moat_2": (9_772_741, 9_732_288),
    "tiny_moat_3": (19_534_390, 19_476_600),
}
PARAM_CASES = [(n, pe, counts[0] if pe else counts[1]) for n, counts in OFFICIAL_PARAMS.items() for pe in (True, False)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**kwargs) -> nn.Module:
    return create_moat("tiny_moat_0", num_classes=10, **kwargs)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "name,pe,expected", PARAM_CASES, ids=[f"{n}{'' if pe else '_no_pe'}" for n, pe, _ in PARAM_CASES]
)
def test_trainable_parameter_count_equals_official(name, pe, expected):
    variant = name if pe else f"{name}_no_pe"
    with torch.device("meta"):  # the big variants cost nothing on the meta device
        model = timm.create_model(variant)
        # The same architecture written out field by field, as a user would for a new model.
        spelled_out = create_moat("spelled_out", cfg=MoatCfg.from_dict(MOAT_CFGS[variant].to_dict()))
    assert isinstance(model.cfg, MoatCfg) and model.cfg == MOAT_CFGS[variant]
    assert model.cfg.pos_embed is pe
    assert count_trainable(model) == count_trainable(spelled_out) == expected


def test_parameter_count_does_not_depend_on_input_size_or_window():
    a = count_trainable(create_moat("tiny_moat_0"))
    b = count_trainable(create_moat("tiny_moat_0", window_size=(14, 7), pool_size=3))
    assert a == b == OFFICIAL_PARAMS["tiny_moat_0"][0]


def test_all_variants_registered_in_timm_with_published_defaults():
    names = set(timm.list_models("*moat*"))
    assert set(list_variants()) <= names
    assert len(list_variants()) == 18
    with torch.device("meta"):
        model = timm.create_model("moat_0", num_classes=10, drop_path_rate=0.1)
    assert model.get_classifier().out_features == 10
    last = model.stages[-1].blocks[-1]
    n_blocks = sum(MOAT_CFGS["moat_0"].depths)
    assert last.drop_path.drop_prob == pytest.approx(0.1 * (n_blocks - 1) / n_blocks)
    with torch.device("meta"):
        default = timm.create_model("moat_3")
    n_blocks = sum(MOAT_CFGS["moat_3"].depths)
    assert default.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.6 * (n_blocks - 1) / n_blocks)


def test_drop_path_rate_grows_linearly_and_covers_both_moat_branches():
    model = create_moat("tiny_moat_0", drop_path_rate=0.4)
    blocks = [b for s in model.stages for b in s.blocks]
    n = len(blocks)
    for b_idx, block in enumerate(blocks):
        expected = 0.4 * b_idx / n
        branches = [block.mbconv.drop_path, block.drop_path] if isinstance(block, MOATBlock) else [block.drop_path]
        for dp in branches:
            assert getattr(dp, "drop_prob", 0.0) == pytest.approx(expected)


def test_block_structure_matches_official_facts():
    model = create_moat("tiny_moat_0")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    assert all(m.approximate == "none" for m in model.modules() if isinstance(m, nn.GELU))
    first = model.stages[0].blocks[0]
    assert isinstance(first.shortcut.pool, AvgPool2dTFSame)
    assert isinstance(first.shortcut.conv, nn.Identity)  # tiny_moat_0 stage 1 is 32 -> 32
    assert first.conv1_1x1.out_channels == 4 * 32  # expansion by OUTPUT channels on strided blocks
    assert first.conv1_1x1.bias is None and first.conv3_1x1.bias is not None
    assert first.conv2_kxk.stride == (2, 2) and first.conv2_kxk.groups == 128
    assert isinstance(first.se.act, nn.SiLU) and first.se.fc1.out_channels == 8
    moat_block = model.stages[2].blocks[0]
    assert isinstance(moat_block.mbconv.se, nn.Identity)
    assert moat_block.attn.rel_pos.relative_position_bias_table.shape == (4, 27, 27)
    assert model.stages[3].blocks[0].attn.rel_pos.relative_position_bias_table.shape == (8, 13, 13)
    assert isinstance(model.stages[1].blocks[0].shortcut.conv, nn.Conv2d)
    assert model.head.norm.eps == 1e-5
    assert create_moat("tiny_moat_0_no_pe").stages[2].blocks[0].attn.rel_pos is None


def test_init_is_normal_002_with_zero_biases():
    model = create_moat("moat_0")
    w = model.stages[2].blocks[0].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert w.abs().max().item() > 2.5 * 0.02  # plain normal, not truncated at 2 std
    assert torch.count_nonzero(model.stages[2].blocks[0].attn.qkv.bias) == 0
    table = model.stages[2].blocks[0].attn.rel_pos.relative_position_bias_table
    assert abs(table.std().item() - 0.02) < 2e-3


@pytest.mark.parametrize("size", [224, 256, 384])
def test_output_shape_at_several_input_sizes(size):
    model = tiny().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)
        assert model.forward_features(torch.randn(1, 3, size, size)).shape == (1, 256, size // 32, size // 32)


def test_non_square_input():
    with torch.no_grad():
        assert tiny().eval()(torch.randn(1, 3, 64, 96)).shape == (1, 10)


def test_window_attention_at_448():
    model = tiny(window_size=(14, 7)).eval()
    assert model.stages[2].blocks[0].attn.window_size == 14
    assert model.stages[3].blocks[0].attn.window_size == 7
    with torch.no_grad():
        assert model(torch.randn(1, 3, 448, 448)).shape == (1, 10)


def test_window_attention_equals_global_when_window_is_the_whole_map():
    model = tiny().eval()
    windowed = tiny(window_size=(4, 2)).eval()
    windowed.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)  # maps of 4x4 and 2x2 in the MOAT stages
    with torch.no_grad():
        torch.testing.assert_close(model(x), windowed(x))


def test_window_partition_round_trip_matches_manual_windows():
    attn = Attention(64, window_size=2, native_window=14).eval()
    x = torch.randn(1, 4, 4, 64)
    with torch.no_grad():
        out = attn(x)
        # Each 2x2 window attends only inside itself: run the top-left window alone.
        ref = Attention(64, window_size=None, native_window=14).eval()
        ref.load_state_dict(attn.state_dict())
        torch.testing.assert_close(out[:, :2, :2], ref(x[:, :2, :2]))


def test_bad_arguments_raise_value_error_naming_the_value():
    with pytest.raises(ValueError, match="moat_9"):
        create_moat("moat_9")
    model = tiny().eval()
    with pytest.raises(ValueError, match="100x100"):
        model(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="window 5"):
        tiny(window_size=(5, 0)).eval()(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="48"):
        Attention(48)
    with pytest.raises(ValueError, match="pool_size"):
        tiny(pool_size=4)


def test_tf_same_average_pool_excludes_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = AvgPool2dTFSame(3, 2)(x)
    # Keras 'SAME' pads one row/col at the bottom/right and averages only real cells.
    assert out[0, 0, 0, 0] == x[0, 0, 0:3, 0:3].mean()
    assert out[0, 0, 1, 1] == x[0, 0, 2:4, 2:4].mean()
    torch.testing.assert_close(AvgPool2dTFSame(2, 2)(x), F.avg_pool2d(x, 2, 2))


def test_strided_conv_uses_tf_same_alignment():
    block = MBConvBlock(8, 8, stride=2)
    dw = block.conv2_kxk
    x = torch.randn(1, 32, 8, 8)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), dw.weight, None, 2, 0, 1, dw.groups)
    torch.testing.assert_close(dw(x), ref)


def reference_bias(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Spec formula written with loops: bias[n, (i,j), (x,y)] = table'[n, x-i+h-1, y-j+w-1]."""
    resized = F.interpolate(table[None], size=(2 * h - 1, 2 * w - 1), mode="bilinear", align_corners=False)[0]
    bias = torch.empty(table.shape[0], h * w, h * w)
    for i in range(h):
        for j in range(w):
            for x in range(h):
                for y in range(w):
                    bias[:, i * w + j, x * w + y] = resized[:, x - i + h - 1, y - j + w - 1]
    return bias


@pytest.mark.parametrize("h,w", [(7, 7), (3, 4), (9, 9)])
def test_relative_bias_gather_and_resize_follow_the_spec(h, w):
    rel = RelativePositionBias(num_heads=2, native_window=7)
    nn.init.normal_(rel.relative_position_bias_table, std=1.0)
    got = rel.compute(h, w)
    torch.testing.assert_close(got, reference_bias(rel.relative_position_bias_table.detach(), h, w))


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,w", [(7, 7), (14, 14), (3, 4)])
def test_relative_bias_rows_are_aligned_so_sdpa_takes_the_mask_without_a_padded_copy(h, w, dtype, grad):
    """SDPA's memory-efficient kernel copies (pads) a mask on every call unless every stride but
    the last is a multiple of 8 and the last is 1; the bias is laid out that way from the start."""
    rel = RelativePositionBias(num_heads=3, native_window=7)
    nn.init.normal_(rel.relative_position_bias_table, std=1.0)
    with torch.set_grad_enabled(grad):
        bias = rel(h, w, dtype)
    mask = bias.unsqueeze(0)
    assert mask.dtype == dtype and mask.stride(-1) == 1
    assert all(s % 8 == 0 for s in mask.stride()[:-1]), mask.stride()
    want = reference_bias(rel.relative_position_bias_table.detach(), h, w).to(dtype)
    torch.testing.assert_close(bias.detach(), want)


def test_relative_bias_at_native_size_is_the_table_itself():
    rel = RelativePositionBias(num_heads=2, native_window=7)
    assert rel.resized_table(7, 7) is rel.relative_position_bias_table


def test_relative_bias_is_cached_without_grad_and_refreshed_when_the_table_changes():
    rel = RelativePositionBias(num_heads=2, native_window=7)
    with torch.no_grad():
        first = rel(5, 5, torch.float32)
        assert rel(5, 5, torch.float32) is first
        rel.relative_position_bias_table.add_(1.0)  # what an optimizer step does
        refreshed = rel(5, 5, torch.float32)
    assert refreshed is not first
    torch.testing.assert_close(refreshed, first + 1.0)
    # With grad enabled the bias is recomputed and differentiable.
    biased = rel(5, 5, torch.float32)
    assert biased.requires_grad
    biased.sum().backward()
    assert rel.relative_position_bias_table.grad.abs().sum() > 0


def test_same_weights_run_at_two_resolutions_with_fixed_table_shapes():
    model = tiny().eval()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
        model(torch.randn(1, 3, 288, 288))  # stage-3 table resized 27x27 -> 35x35
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    reloaded = tiny().eval()
    reloaded.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 288, 288)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reloaded(x))


def set_fused(model: nn.Module, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = fused


@pytest.mark.parametrize("size,window", [(256, None), (448, (14, 7))])
def test_sdpa_equals_explicit_attention(size, window):
    model = tiny(window_size=window).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fused = model(x)
        set_fused(model, False)
        explicit = model(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)


def test_gradient_reaches_every_parameter_including_relative_tables():
    model = tiny(drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert len(model.no_weight_decay()) == 9  # one table per MOAT block (7 + 2)


def test_eval_output_of_a_sample_does_not_depend_on_the_rest_of_the_batch():
    model = tiny().eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=1e-4, atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    model = tiny(drop_path_rate=0.3).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)

    def grads(m):
        torch.manual_seed(123)
        m(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    recomputed = {"n": 0}
    original = MBConvBlock.forward

    def counting_forward(self, inp):
        recomputed["n"] += 1
        return original(self, inp)

    g_plain = grads(model)
    MBConvBlock.forward = counting_forward
    try:
        g_ckpt = grads(ckpt)
    finally:
        MBConvBlock.forward = original
    # Every block runs once forward and once again during backward.
    assert recomputed["n"] == 2 * sum(len(s.blocks) for s in ckpt.stages)
    for n in g_plain:
        torch.testing.assert_close(g_plain[n], g_ckpt[n], rtol=1e-4, atol=1e-6, msg=n)


def test_channels_last_gives_the_same_output():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_forward_and_backward_on_cpu():
    model = tiny().train()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    table = model.stages[2].blocks[0].attn.rel_pos.relative_position_bias_table
    assert table.grad is not None and table.grad.dtype == torch.float32
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 256, 256)).dtype == torch.bfloat16


def test_reset_classifier_and_forward_head():
    model = tiny().eval()
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model.num_classes == 5
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats).shape == (1, 5)
        assert model.forward_head(feats, pre_logits=True).shape == (1, 256)
        model.reset_classifier(0)
        assert model(x).shape == (1, 256)


def test_forward_intermediates_give_four_stage_maps_after_gelu():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape) for f in feats] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]
        torch.testing.assert_close(feats[-1], F.gelu(final))
        backbone = timm.create_model("tiny_moat_0", features_only=True).eval()
        backbone.load_state_dict(model.state_dict(), strict=False)
        assert [f.shape[1] for f in backbone(x)] == [32, 64, 128, 256]


@pytest.mark.parametrize(
    "indices,expected",
    [
        (None, [0, 1, 2, 3]),
        (1, [3]),
        (2, [2, 3]),
        ([-1], [3]),
        ([0, -2], [0, 2]),
        ((1,), [1]),
    ],
)
def test_intermediate_indices_accept_negative_and_int_forms(indices, expected):
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    channels = [32, 64, 128, 256]
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        assert [f.shape[1] for f in feats] == [channels[i] for i in expected]
        _, early = model.forward_intermediates(x, indices=indices, stop_early=True)
        assert [f.shape[1] for f in early] == [channels[i] for i in expected]
        assert model.prune_intermediate_layers(indices) == expected
        assert len(model.stages) == max(expected) + 1  # [-1] keeps all four stages
        pruned = model.forward_intermediates(x, indices=expected, intermediates_only=True)
        assert [f.shape[1] for f in pruned] == [channels[i] for i in expected]
        assert model(x).shape == (
            1,
            channels[max(expected)],
            64 // 2 ** (max(expected) + 2),
            64 // 2 ** (max(expected) + 2),
        )  # no head left


@pytest.mark.parametrize("indices", [[4], [-5], 0, 5])
def test_intermediate_indices_out_of_range_are_value_errors(indices):
    with pytest.raises(ValueError, match="stage indices"):
        tiny().forward_intermediates(torch.randn(1, 3, 64, 64), indices=indices)
    with pytest.raises(ValueError, match="stage indices"):
        tiny().prune_intermediate_layers(indices)


def test_features_only_takes_negative_out_indices():
    backbone = timm.create_model("tiny_moat_0", features_only=True, out_indices=(-2, -1)).eval()
    with torch.no_grad():
        assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == [128, 256]
    assert backbone.feature_info.reduction() == [16, 32]


# ------------------------------------------------------------------- architectures from a config
def test_keyword_overrides_change_the_architecture_as_asked():
    model = timm.create_model(
        "tiny_moat_0",
        stem_dims=(16, 24, 32),
        depths=(1, 2, 3, 1),
        dims=(32, 64, 96, 192),
        head_dim=48,
        expand_ratio=6,
        se_ratio=0.5,
        kernel_size=5,
        pool_size=3,
        window_size=(2, None),
        pos_embed_size=(4, 2),
        act_layer="silu",
        se_act_layer="relu",
        bn_eps=1e-5,
        bn_momentum=0.1,
        ln_eps=1e-6,
        head_hidden_size=64,
        num_classes=7,
    ).eval()
    assert [len(s.blocks) for s in model.stages] == [1, 2, 3, 1]
    assert [
        s.blocks[-1].conv3_1x1.out_channels if i < 2 else s.blocks[-1].mbconv.conv3_1x1.out_channels
        for i, s in enumerate(model.stages)
    ] == [32, 64, 96, 192]
    assert [model.stem.conv1.out_channels, model.stem.conv2.out_channels, model.stem.conv3.out_channels] == [16, 24, 32]
    first = model.stages[0].blocks[0]
    assert first.conv1_1x1.out_channels == 6 * 32 and first.conv2_kxk.weight.shape[-1] == 5
    assert first.se.fc1.out_channels == 16 and isinstance(first.se.act, nn.ReLU)
    assert first.shortcut.pool.pool_size == 3 and isinstance(first.act1, nn.SiLU)
    attn = model.stages[2].blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.window_size) == (2, 48, 2)
    assert attn.rel_pos.relative_position_bias_table.shape == (2, 7, 7)
    assert model.stages[3].blocks[0].attn.rel_pos.relative_position_bias_table.shape == (4, 3, 3)
    assert model.stages[3].blocks[0].attn.window_size is None
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.stages[2].blocks[0].attn_norm.eps == 1e-6 and model.head.norm.eps == 1e-6
    assert model.head.pre_logits.fc.out_features == 64 and model.get_classifier().in_features == 64
    assert model.cfg.depths == (1, 2, 3, 1) and model.cfg.expand_ratio == 6
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_five_stage_hybrid_with_a_stride_one_stage():
    cfg = MoatCfg(
        stem_dims=(16,),
        depths=(1, 1, 2, 1, 1),
        dims=(16, 32, 64, 64, 128),
        stage_types=("mbconv", "mbconv", "moat", "moat", "moat"),
        strides=(2, 2, 2, 1, 2),
        window_size=(2, 0, 0),
    )
    model = create_moat("hybrid5", cfg=cfg, num_classes=3).eval()
    assert len(model.stages) == 5 and model.cfg == cfg
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 16, 32]
    assert model.window_size == (None, None, 2, None, None)
    # The native bias window is the stage's 224-px map: 14 at stride 16 (twice), 7 at stride 32.
    assert [s.blocks[0].attn.rel_pos.native_window for s in model.stages[2:]] == [14, 14, 7]
    assert isinstance(model.stages[3].blocks[0].mbconv.shortcut, nn.Identity)  # stride 1, 64 -> 64
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
        maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[-2, -1], intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 4, 4), (128, 2, 2)]
    backbone = create_moat("hybrid5", cfg=cfg, features_only=True)
    assert backbone.feature_info.channels() == [16, 32, 64, 64, 128]


def test_total_stride_follows_the_strides_and_is_checked_on_input():
    cfg = MOAT_CFGS["tiny_moat_0"].replace(
        depths=(1, 1, 1, 1, 1), dims=(32, 64, 128, 256, 256), stage_types=("mbconv", "mbconv", "moat", "moat", "moat")
    )
    assert cfg.total_stride == 64 and cfg.stage_pos_embed_sizes == (None, None, 14, 7, 4)
    model = create_moat("stride64", cfg=cfg, num_classes=2).eval()
    with pytest.raises(ValueError, match="not divisible by 64"):
        model(torch.randn(1, 3, 96, 96))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, 2)


def test_stem_has_one_norm_and_activation_between_consecutive_convs():
    one = create_moat("tiny_moat_0", stem_dims=(32,))
    assert [n for n, _ in one.stem.named_children()] == ["conv1"]
    three = create_moat("tiny_moat_0", stem_dims=(16, 16, 32))
    assert [n for n, _ in three.stem.named_children()] == ["conv1", "norm1", "act1", "conv2", "norm2", "act2", "conv3"]
    assert three.stem.conv1.stride == (2, 2) and three.stem.conv3.stride == (1, 1)


def test_norm_layer_by_name_and_batchnorm_folding_skips_other_norms():
    model = create_moat("tiny_moat_0", norm_layer="layernorm2d", bn_eps=1e-6).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, timm.layers.LayerNorm2d)]
    assert len(norms) > 3 * sum(model.cfg.depths) and all(m.eps == 1e-6 for m in norms[:-1])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(model.reparameterize()(x), ref, rtol=0, atol=0)


def test_se_ratio_zero_removes_squeeze_excite():
    model = create_moat("tiny_moat_0", se_ratio=0)
    assert all(isinstance(b.se, nn.Identity) for s in model.stages[:2] for b in s.blocks)
    assert count_trainable(model) < OFFICIAL_PARAMS["tiny_moat_0"][0]


def test_window_size_per_stage_equals_per_attention_stage():
    a = tiny(window_size=(2, 0)).eval()
    b = tiny(window_size=(0, 0, 2, 0)).eval()
    assert a.cfg == b.cfg and a.window_size == b.window_size == (None, None, 2, None)
    assert tiny(window_size=0).cfg.window_size is None and tiny(window_size=(0, 0)).cfg == tiny().cfg


@pytest.mark.parametrize(
    "overrides,field,needle",
    [
        (dict(stage_types=("mbconv", "mbconv", "conv", "moat")), "stage_types", "unknown block type 'conv'"),
        (dict(stage_types=("mbconv", "moat")), "stage_types", "has 2 entries"),
        (dict(dims=(32, 64, 100, 256)), "dims", "not divisible by head_dim 32"),
        (dict(head_dim=48), "dims", "width 128 of attention stage 3"),
        (dict(depths=(2, 3, 7)), "dims", "depths [2, 3, 7] has 3"),
        (dict(strides=(2, 2, 2)), "strides", "has 3 entries"),
        (dict(window_size=(7, 7, 7)), "window_size", "one per stage (4) or one per attention"),
        (dict(window_size=(7, 0, 0, 0)), "window_size", "stage 1 is an 'mbconv' stage"),
        (dict(window_size=(-1, 0)), "window_size", "ints >= 0"),
        (dict(stem_dims=()), "stem_dims", "must not be empty"),
        (dict(kernel_size=4), "kernel_size", "odd"),
        (dict(expand_ratio=0), "expand_ratio", "> 0"),
        (dict(se_ratio=1.5), "se_ratio", "[0, 1]"),
        (dict(pool_size=4), "pool_size", "2 (classification), 3"),
        (dict(pos_embed="yes"), "pos_embed", "true or false"),
        (dict(norm_layer="layernorm"), "norm_layer", "batchnorm2d"),
        (dict(act_layer="swishy"), "act_layer", "timm activation"),
        (dict(bn_momentum=0.0), "bn_momentum", "(0, 1]"),
        (dict(head_hidden_size=-1), "head_hidden_size", ">= 0"),
        (dict(drop_path_rate=1.0), "drop_path_rate", "[0, 1)"),
    ],
)
def test_invalid_architectures_are_one_line_errors_naming_the_field(overrides, field, needle):
    with pytest.raises(MoatConfigError) as err:
        timm.create_model("tiny_moat_0", **overrides)
    msg = str(err.value)
    assert err.value.field == field and "\n" not in msg
    assert msg.startswith(f"invalid MOAT config {field}=") and needle in msg


def test_unknown_field_and_unknown_argument_are_rejected():
    # An unknown keyword is a TypeError, as for any Python callable (timm's model contract).
    with pytest.raises(TypeError, match="unknown MOAT arguments: \\['depth'\\]"):
        timm.create_model("tiny_moat_0", depth=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="unknown MOAT config field"):
        MOAT_CFGS["tiny_moat_0"].replace(depth=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="unknown MOAT config field"):
        MoatCfg.from_dict({**MOAT_CFGS["tiny_moat_0"].to_dict(), "heads": 4})


def test_a_new_name_needs_the_required_fields():
    with pytest.raises(MoatConfigError, match="a new architecture must set dims, stage_types$"):
        create_moat("my_moat", stem_dims=(16, 16), depths=(1, 1))
    model = create_moat(
        "my_moat", stem_dims=(16, 16), depths=(1, 1), dims=(32, 64), stage_types=("mbconv", "moat"), num_classes=4
    )
    assert model.pretrained_cfg["architecture"] == "my_moat" and model.num_classes == 4
    assert model.cfg == resolve_cfg(
        "my_moat", dict(stem_dims=[16, 16], depths=[1, 1], dims=[32, 64], stage_types=["mbconv", "moat"])
    )


def test_cfg_round_trips_through_json_and_rebuilds_the_same_model():
    model = create_moat("tiny_moat_1_no_pe", depths=(1, 2, 2, 1), window_size=(2, 0), head_hidden_size=32)
    data = json.loads(json.dumps(model.cfg.to_dict()))
    assert data["norm_layer"] == "batchnorm2d" and data["act_layer"] == "gelu" and data["pos_embed"] is False
    assert data["depths"] == [1, 2, 2, 1] and data["window_size"] == [None, None, 2, None]
    cfg = MoatCfg.from_dict(data)
    assert cfg == model.cfg and hash(cfg) == hash(model.cfg)
    rebuilt = create_moat("anything", cfg=cfg)
    rebuilt.load_state_dict(model.state_dict())  # same keys and shapes, strict
    with pytest.raises(MoatConfigError, match="stem_dims"):
        MoatCfg.from_dict({k: v for k, v in data.items() if k != "stem_dims"})


def test_build_model_reads_the_trainer_config():
    from config import get_config

    cfg = get_config()
    cfg.defrost()
    cfg.MODEL.NAME = "tiny_moat_1_no_pe"
    cfg.MODEL.NUM_CLASSES = 7
    cfg.MODEL.MOAT.WINDOW_SIZE = [14, 0]
    cfg.TRAIN.USE_CHECKPOINT = True
    model = models.build_model(cfg)
    assert model.num_classes == 7 and model.grad_checkpointing
    assert model.stages[2].blocks[0].attn.window_size == 14 and model.stages[3].blocks[0].attn.window_size is None
    assert model.stages[2].blocks[0].attn.rel_pos is None
    assert model.stages[-1].blocks[-1].drop_path.__class__ is nn.Identity  # tiny_moat_1 default rate 0.0


def test_build_model_applies_the_configured_batchnorm_momentum():
    from config import get_config

    cfg = get_config()
    cfg.defrost()
    cfg.MODEL.NAME = "tiny_moat_0"
    assert all(m.momentum == 0.01 for m in models.build_model(cfg).modules() if isinstance(m, nn.BatchNorm2d))
    cfg.MODEL.MOAT.BN_MOMENTUM = 0.1
    assert all(m.momentum == 0.1 for m in models.build_model(cfg).modules() if isinstance(m, nn.BatchNorm2d))


def test_bn_momentum_is_a_model_argument_reachable_from_timm():
    model = timm.create_model("tiny_moat_0", bn_momentum=0.1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 and m.eps == 1e-3 for m in bns)
    with pytest.raises(ValueError, match="bn_momentum"):
        create_moat("tiny_moat_0", bn_momentum=0.0)


# ------------------------------------------------------------ speed paths equal the plain path
def test_squeeze_excite_equals_timm_semodule_in_values_and_gradients():
    from timm.layers import SEModule

    from models.moat import SqueezeExcite

    fast = SqueezeExcite(64, rd_channels=8, act_layer=nn.SiLU)
    plain = SEModule(64, rd_channels=8, act_layer=nn.SiLU)
    plain.load_state_dict(fast.state_dict())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 64, 6, 6).contiguous(memory_format=memory_format)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_fast, out_plain = fast(xa), plain(xb)
        assert torch.equal(out_fast, out_plain)
        g = torch.randn_like(out_fast)
        out_fast.backward(g)
        out_plain.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 accumulation keeps bf16 exact too
        xb16 = torch.randn(2, 64, 6, 6).bfloat16()
        assert torch.equal(fast(xb16), plain(xb16))


def test_bias_gather_gradient_equals_advanced_indexing():
    rel = RelativePositionBias(num_heads=3, native_window=7)
    nn.init.normal_(rel.relative_position_bias_table, std=1.0)
    table = rel.relative_position_bias_table
    index = rel.build_index(7, 7)
    g = torch.randn(3, 49, 49)
    rel.compute(7, 7).backward(g)
    fast_grad = table.grad.clone()
    table.grad = None
    table.flatten(1)[:, index].backward(g)  # the plain gather
    torch.testing.assert_close(fast_grad, table.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_step_gradients_equal_the_explicit_reference_path(channels_last):
    """The fused path (SDPA, fast SE, gather) gives the same loss and gradients as the plain
    explicit-attention path, in both memory layouts."""
    torch.manual_seed(3)
    fast = tiny().train()
    ref = copy.deepcopy(fast)
    set_fused(ref, False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast = fast.to(memory_format=fmt)
    x = torch.randn(2, 3, 64, 64)
    loss_fast = fast(x.contiguous(memory_format=fmt)).logsumexp(-1).sum()
    loss_ref = ref(x).logsumexp(-1).sum()
    loss_fast.backward()
    loss_ref.backward()
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    # Tolerance relative to the largest gradient: some gradients are analytically zero (a bias
    # right before a BatchNorm), so a per-tensor relative error would compare rounding noise.
    scale = max(p.grad.abs().max() for p in ref.parameters())
    for n, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-3, atol=5e-5 * scale, msg=n)


def test_model_built_and_run_under_inference_mode():
    with torch.inference_mode():
        model = tiny().eval()
        first = model(torch.ones(1, 3, 64, 64))
        torch.testing.assert_close(model(torch.ones(1, 3, 64, 64)), first)


def _randomize_batchnorm_statistics(model: nn.Module) -> None:
    """Non-trivial BN affine and running stats, so folding them is actually exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_reparameterize_folds_every_batchnorm_and_keeps_the_output(channels_last):
    model = tiny()
    _randomize_batchnorm_statistics(model)
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(2, 3, 96, 64).contiguous(memory_format=fmt)
    with torch.no_grad():
        ref = model(x)
        via_timm = timm.utils.reparameterize_model(model)  # a folded deep copy
        folded = copy.deepcopy(model).reparameterize()
        folded.reparameterize()  # a second call is a no-op
        out, out_timm = folded(x), via_timm(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0  # the original is untouched
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_timm, out, rtol=0, atol=0)
    convs = [
        m.weight
        for m in folded.modules()
        if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[-1] > 1
    ]
    assert all(w.is_contiguous(memory_format=fmt) for w in convs)


def test_reparameterize_refuses_a_model_in_training_mode():
    with pytest.raises(RuntimeError, match="model.eval"):
        tiny().reparameterize()


# ------------------------------------------------------- TorchScript, torch.fx, timm's contract
def _test_moat() -> nn.Module:
    """timm's test_moat: windowed + global attention, padded 3x3 shortcut pool, 5x5 depthwise."""
    torch.manual_seed(0)
    model = timm.create_model("test_moat", num_classes=7)
    _randomize_batchnorm_statistics(model)
    return model.eval()


def _fx_tracer_kwargs() -> dict:
    from timm.models import get_notrace_functions, get_notrace_modules

    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def test_torch_jit_script_gives_the_eager_output_at_any_size():
    model = _test_moat()
    with torch.no_grad():
        scripted = torch.jit.script(model)
        for shape in ((2, 3, 64, 64), (1, 3, 96, 128)):  # the scripted relative bias resizes too
            x = torch.randn(shape)
            torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="not divisible by 16"):
        scripted(torch.randn(1, 3, 72, 64))


def test_create_feature_extractor_returns_a_stage_at_any_size_and_trains():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _test_moat()
    extractor = create_feature_extractor(
        model, return_nodes={"stages.2": "stage3", "stages.3": "stage4"}, tracer_kwargs=_fx_tracer_kwargs()
    )
    seen = {}
    model.stages[2].register_forward_hook(lambda m, i, o: seen.setdefault("stage3", o))
    for shape in ((1, 3, 64, 64), (2, 3, 96, 128)):  # one graph serves every size (leaf helpers)
        seen.clear()
        x = torch.randn(shape)
        with torch.no_grad():
            feats = extractor(x)
            model(x)
        torch.testing.assert_close(feats["stage3"], seen["stage3"], rtol=0, atol=0)
        assert feats["stage4"].shape == (shape[0], 64, shape[2] // 16, shape[3] // 16)
    extractor.train()
    sum(f.mean() for f in extractor(torch.randn(2, 3, 64, 64)).values()).backward()
    grads = {n: p.grad for n, p in extractor.named_parameters()}  # the model's own parameters
    assert grads and not [n for n, g in grads.items() if g is None]
    assert model.stem.conv1.weight.grad is not None


def test_features_only_by_fx_are_the_stage_outputs_the_getter_activates():
    torch.manual_seed(0)
    by_fx = timm.create_model("test_moat", features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)  # the same weights: the wrappers come after the model's initialisation
    by_getter = timm.create_model("test_moat", features_only=True).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        fx_feats, getter_feats = by_fx(x), by_getter(x)
    assert [f.shape[1] for f in fx_feats] == [16, 32, 48, 64]
    for fx_feat, getter_feat in zip(fx_feats, getter_feats):  # the getter adds the official GELU
        torch.testing.assert_close(F.gelu(fx_feat), getter_feat, rtol=0, atol=0)


def test_pruned_forward_features_end_at_the_activated_tap():
    model = _test_moat()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([3], prune_head=False)
        torch.testing.assert_close(kept(x), expected, rtol=0, atol=0)
        for i in range(4):
            for prune_head, prune_norm in ((True, False), (False, True), (True, True)):
                pruned = copy.deepcopy(model)
                pruned.prune_intermediate_layers([i], prune_head=prune_head, prune_norm=prune_norm)
                torch.testing.assert_close(pruned.forward_features(x), taps[i], rtol=0, atol=0)
    assert isinstance(model.final_act, nn.Identity)  # the unpruned model's features are the raw stage
    # A classifier put back on a pruned model reads the tap (the hidden layer went with the head).
    pruned = copy.deepcopy(model)
    pruned.prune_intermediate_layers([1])
    pruned.reset_classifier(5, "avg")
    with torch.no_grad():
        logits = pruned(x)
        torch.testing.assert_close(logits, pruned.head.fc(taps[1].mean((2, 3))))
    assert logits.shape == (2, 5) and pruned.num_features == pruned.head_hidden_size == 32


def test_device_and_dtype_keywords_create_the_model_there_and_in_chans_is_recorded():
    model = timm.create_model("moat_4", device="meta", dtype=torch.bfloat16, in_chans=1)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "meta" for t in tensors)
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.bfloat16}
    assert model.in_chans == 1 and model.stem.conv1.in_channels == 1
    out = model.forward_features(torch.randn(1, 1, 224, 224, device="meta", dtype=torch.bfloat16))
    assert out.shape == (1, 2048, 7, 7) and out.dtype == torch.bfloat16
