"""The fused depthwise -> BatchNorm -> GELU kernels (``models/fused_depthwise.py``) compute what
MOAT's ``conv2_kxk -> norm2 -> act2`` modules compute: output, the gradients of the input, the
depthwise weight and the BatchNorm affine, and the running-statistics update, in float32 and
bfloat16, for the shapes MOAT uses. No GPU needed: Triton's interpreter (``TRITON_INTERPRET=1``)
runs the same kernels on CPU tensors, one program at a time, so the exhaustive shape sweep is
marked slow (and runs with larger tiles, up to 1,024 pixels x 256 channels, which the interpreter
executes many times faster; the tile edges are covered by the fast tests at the GPU tile sizes).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from models import build_model  # noqa: E402
from models import fused_depthwise as fd  # noqa: E402
from models.config import MOAT_CFGS  # noqa: E402
from models.moat import DEFAULT_IMG_SIZE, MOAT, MBConvBlock, MoatCfg  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.zeros, InterpretedFunction)


if DEVICE.type == "cpu" and not _interpreting():
    # reason: without a GPU the kernels run only through Triton's interpreter, set before triton's import
    pytest.skip(
        "no GPU and triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it)",
        allow_module_level=True,
    )


def reference_modules(channels: int, stride: int, kernel: int = 3, seed: int = 0):
    """``conv2_kxk, norm2, act2`` of an MBConvBlock with ``channels`` expanded channels, with
    random weights, BatchNorm affine and running statistics (MOAT's defaults: eps 1e-3,
    momentum 0.01)."""
    torch.manual_seed(seed)
    block = MBConvBlock(channels, channels, stride, expand_ratio=1.0, se_ratio=0.0, kernel_size=kernel)
    conv, norm, act = block.conv2_kxk, block.norm2, block.act2
    with torch.no_grad():
        conv.weight.normal_(0, 0.3)
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
        norm.running_mean.normal_(0, 0.1)
        norm.running_var.uniform_(0.5, 1.5)
    return conv.to(DEVICE), norm.to(DEVICE), act


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_reference(conv, norm, act, x, grad, dtype=None):
    """Output, (dx, dw, dgamma, dbeta) and the updated (running mean, running var, count) of the
    modules; ``dtype`` bf16 runs them under autocast, float64 in float64."""
    conv, norm = copy.deepcopy(conv), copy.deepcopy(norm)
    if dtype == torch.float64:
        conv, norm = conv.double(), norm.double()
        x = x.double()
    x = x.detach().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = act(norm(conv(x)))
    y.backward(grad.to(y.dtype))
    grads = (x.grad, conv.weight.grad, norm.weight.grad, norm.bias.grad)
    return y.detach(), grads, (norm.running_mean, norm.running_var, norm.num_batches_tracked)


def run_fused(conv, norm, x, grad, dtype):
    w, g, b = (p.detach().clone().requires_grad_() for p in (conv.weight, norm.weight, norm.bias))
    rm, rv, nbt = (t.clone() for t in (norm.running_mean, norm.running_var, norm.num_batches_tracked))
    x = x.detach().to(dtype).requires_grad_()
    y = fd.fused_dwconv_bn_gelu(x, w, g, b, conv.stride[0], norm.eps, rm, rv, nbt, norm.momentum)
    y.backward(grad.to(y.dtype))
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == w.dtype
    return y.detach(), (x.grad, w.grad, g.grad, b.grad), (rm, rv, nbt), x


def check(
    n: int,
    c: int,
    h: int,
    w: int,
    stride: int,
    dtype=torch.float32,
    channels_last: bool = True,
    k: int = 3,
    bf16_bound: float = 0.0,
    truth_dtype: torch.dtype = torch.float64,
):
    """Fused against the modules in ``truth_dtype`` (and, in bf16, against the modules' own bf16
    error, or with ``bf16_bound`` against a fixed relative bound: the modules in bf16 on a CPU
    without bf16 kernels take seconds per shape, as do float64 depthwise convolutions)."""
    conv, norm, act = reference_modules(c, stride, k)
    x = torch.randn(n, c, h, w, device=DEVICE) * 1.5 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ho, wo = math.ceil(h / stride), math.ceil(w / stride)
    grad = torch.randn(n, c, ho, wo, device=DEVICE)
    truth = run_reference(conv, norm, act, x, grad, truth_dtype)
    y, grads, stats, xin = run_fused(conv, norm, x, grad, dtype)
    # Layouts follow the input, as cuDNN's do.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.shape == (n, c, ho, wo) and y.is_contiguous(memory_format=fmt)
    assert grads[0].stride() == xin.stride()
    names = ("output", "d input", "d weight", "d gamma", "d beta")
    if dtype == torch.float32:
        for name, a, b in zip(names, (y, *grads), (truth[0], *truth[1])):
            assert rel(a, b) < (2e-5 if truth_dtype == torch.float64 else 1e-4), (name, rel(a, b))
        for a, b in zip(stats[:2], truth[2][:2]):
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)
    elif bf16_bound:
        for name, a, b in zip(names, (y, *grads), (truth[0], *truth[1])):
            assert rel(a, b) < bf16_bound, (name, rel(a, b))
    else:
        # No worse than the reference modules in the same precision (autocast), measured
        # against the float64 truth.
        ref = run_reference(conv, norm, act, x, grad, dtype)
        for name, a, r, t in zip(names, (y, *grads), (ref[0], *ref[1]), (truth[0], *truth[1])):
            assert rel(a, t) <= 2 * rel(r, t) + 2e-3, (name, rel(a, t), rel(r, t))
        for a, b in zip(stats[:2], truth[2][:2]):
            assert rel(a, b) < 1e-2
    assert int(stats[2]) == int(truth[2][2]) == int(norm.num_batches_tracked) + 1


# ------------------------------------------------------------------------------------ fast tier
@pytest.mark.parametrize(
    "n, c, h, w, stride, channels_last",
    [
        (2, 40, 9, 9, 1, True),  # channels not a multiple of the tile, odd map
        (2, 40, 8, 8, 2, True),  # even map, stride 2: TF 'SAME' pads bottom/right only
        (1, 24, 7, 7, 2, True),  # odd map, stride 2: one row/column on each side; batch 1
        (2, 16, 6, 10, 2, False),  # non-square, NCHW
    ],
)
def test_fused_equals_the_reference_modules_in_float32(n, c, h, w, stride, channels_last):
    check(n, c, h, w, stride, torch.float32, channels_last)


def test_fused_is_as_accurate_as_the_reference_modules_in_bfloat16():
    check(2, 40, 10, 10, 2, torch.bfloat16)
    check(2, 40, 9, 9, 1, torch.bfloat16)


def test_per_program_statistics_combine_exactly_across_many_tiles(monkeypatch):
    """One program per channel block loops over every tile: the in-kernel (count, mean, M2)
    combination, not only torch's across programs, carries the statistics; and a large mean
    (cancellation in a naive sum of squares) keeps the variance."""
    monkeypatch.setattr(fd, "_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(fd, "_BLOCK_P", 16)
    check(3, 24, 9, 11, 1)
    conv, norm, _ = reference_modules(8, 1)
    x = torch.randn(2, 8, 12, 12, device=DEVICE).contiguous(memory_format=torch.channels_last) + 100.0
    d = conv(x)
    _, d_fused, mean, var = torch.ops.moat.dw_bn_gelu_fwd(x, conv.weight, norm.weight, norm.bias, 1, 1e-3)
    torch.testing.assert_close(d_fused, d, rtol=1e-5, atol=1e-4)
    ref_var, ref_mean = torch.var_mean(d.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, ref_mean.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var, ref_var.float(), rtol=1e-4, atol=1e-6)


def test_a_5x5_kernel_too():
    check(2, 8, 9, 9, 1, k=5)
    check(2, 8, 10, 10, 2, k=5)


def test_one_value_per_channel_is_an_error_as_in_batchnorm():
    conv, norm, act = reference_modules(8, 2)
    x = torch.randn(1, 8, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        act(norm(conv(x)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fd.fused_dwconv_bn_gelu(x, conv.weight, norm.weight, norm.bias, 2, 1e-3)


def test_custom_ops_pass_torch_opcheck():
    """Schema, fake-tensor (meta) shapes and strides, autograd registration and AOT dispatch, of
    both ops (the backward one with a channels_last weight, as ``model.to(channels_last)`` makes
    it)."""
    torch.manual_seed(0)
    for stride in (1, 2):
        x = torch.randn(2, 8, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(8, 1, 3, 3, device=DEVICE, requires_grad=True)
        g = torch.rand(8, device=DEVICE, requires_grad=True)
        b = torch.randn(8, device=DEVICE, requires_grad=True)
        torch.library.opcheck(torch.ops.moat.dw_bn_gelu_fwd.default, (x, w, g, b, stride, 1e-3))
        with torch.no_grad():
            y, d, mean, var = torch.ops.moat.dw_bn_gelu_fwd(x, w, g, b, stride, 1e-3)
        w_cl = w.detach().contiguous(memory_format=torch.channels_last)
        args = (torch.randn_like(y), x.detach(), w_cl, d, mean, var, g.detach(), b.detach(), stride, 1e-3)
        torch.library.opcheck(torch.ops.moat.dw_bn_gelu_bwd.default, args)


def test_compiles_into_one_graph_with_forward_and_backward(monkeypatch):
    """``torch.compile(fullgraph=True)`` fails on any graph break; AOTAutograd traces the op's
    backward through its registered formula into the compiled backward. Same values as eager."""
    monkeypatch.setattr(fd, "_device_supported", lambda x: True)
    conv, norm, act = reference_modules(16, 2)
    x = torch.randn(2, 16, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        module_norm, inp = copy.deepcopy(norm), x.detach().requires_grad_()
        conv.weight.grad = None

        def forward(t, module_norm=module_norm):
            return fd.dwconv_bn_gelu(t, conv, module_norm, act)

        fn = torch.compile(forward, backend="aot_eager", fullgraph=True) if compiled else forward
        y = fn(inp)
        y.square().sum().backward()
        results.append((y.detach(), inp.grad, conv.weight.grad.clone(), module_norm.running_var.clone()))
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_dispatch_uses_the_modules_on_cpu_and_wherever_the_kernels_do_not_apply(monkeypatch):
    conv, norm, act = (m.cpu() for m in reference_modules(16, 2))
    x = torch.randn(2, 16, 8, 8)
    # CPU tensors: the modules themselves, bit for bit.
    a, b = copy.deepcopy(norm), copy.deepcopy(norm)
    torch.testing.assert_close(fd.dwconv_bn_gelu(x, conv, a, act), act(b(conv(x))), rtol=0, atol=0)
    assert fd.fused_supported(conv, norm, act)
    assert fd.fused_supported(*reference_modules(16, 1)[:2], act)  # static symmetric padding
    assert not fd.fused_supported(conv, norm.eval(), act)  # running statistics: not fused
    assert not fd.fused_supported(conv, nn.Identity(), act)  # folded by reparameterize()
    assert not fd.fused_supported(conv, norm.train(), nn.GELU(approximate="tanh"))
    assert not fd.fused_supported(nn.Conv2d(16, 16, 3, padding=1), norm, act)  # not depthwise
    assert not fd.fused_supported(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), norm, act)


def small_moat(**kwargs) -> MOAT:
    torch.manual_seed(0)
    cfg = MoatCfg(
        stem_dims=(8, 8), depths=(2, 1, 1, 1), dims=(16, 16, 32, 32), stage_types=("mbconv", "mbconv", "moat", "moat")
    )
    return MOAT(cfg, num_classes=5, **kwargs).to(DEVICE, memory_format=torch.channels_last)


def test_moat_with_fused_depthwise_trains_like_the_reference(monkeypatch):
    """Every MBConv (and MOAT block's MBConv) through the kernels: same loss, every parameter's
    gradient and every BatchNorm's running statistics after a step."""
    monkeypatch.setattr(fd, "_device_supported", lambda x: True)
    ref, fused = small_moat(), small_moat(fused_depthwise=True)
    assert all(m.fused_depthwise for m in fused.modules() if isinstance(m, MBConvBlock))
    assert not any(m.fused_depthwise for m in ref.modules() if isinstance(m, MBConvBlock))
    x = torch.randn(3, 3, 64, 64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (3,), device=DEVICE)
    for model in (ref, fused):
        F.cross_entropy(model(x), y).backward()
    # Per parameter, with an absolute floor: a bias in front of a train-mode BatchNorm (the
    # stem conv's) has gradient zero in exact arithmetic, so there both are rounding noise.
    total = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-6 * total, name
    for (name, b), c in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)
    assert ref.state_dict().keys() == fused.state_dict().keys()


def test_trainer_key_turns_the_fused_path_on():
    from config import get_config

    config = get_config()
    config.defrost()
    config.MODEL.NAME = "tiny_moat_0"
    assert not any(getattr(m, "fused_depthwise", False) for m in build_model(config).modules())
    config.MODEL.FUSED_DEPTHWISE = True
    blocks = [m for m in build_model(config).modules() if isinstance(m, MBConvBlock)]
    assert len(blocks) == 14 and all(m.fused_depthwise for m in blocks)


# ------------------------------------------------------------------------------------ slow tier
def moat_depthwise_shapes():
    """(channels, input size, stride, kernel) of every depthwise conv of every registered
    variant at 224 px and at its default size."""
    shapes = set()
    for name, cfg in MOAT_CFGS.items():
        for img in sorted({224, DEFAULT_IMG_SIZE[name]}):
            size = math.ceil(img / 2)  # the stem's stride
            for depth, dim, stride in zip(cfg.depths, cfg.dims, cfg.stage_strides):
                channels = int(dim * cfg.expand_ratio)
                shapes.add((channels, size, stride, cfg.kernel_size))
                size = math.ceil(size / stride)
                if depth > 1:
                    shapes.add((channels, size, 1, cfg.kernel_size))
    return sorted(shapes)


def bf16_shapes(shapes):
    """One shape per (map size, stride) of ``shapes``, the one with the fewest channels, plus the
    most channels at the smallest map: every way the pixel tiles and the TF-SAME padding fall,
    and the longest channel tiling, at a tenth of the full sweep's element count."""
    chosen = {}
    for c, size, stride, k in shapes:
        chosen.setdefault((size, stride), (c, size, stride, k))
    widest = max(shapes, key=lambda s: (s[0], -s[1]))
    return sorted(set(chosen.values()) | {widest})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_depthwise_shape_of_every_variant_at_batch_1(monkeypatch, dtype):
    """fp32: every shape; bf16 (the same arithmetic, other loads and stores): ``bf16_shapes``."""
    monkeypatch.setattr(fd, "_block_c", lambda c: min(256, triton.next_power_of_2(c)))
    shapes = moat_depthwise_shapes()
    assert len(shapes) == 96 and (384, 112, 2, 3) in shapes and (8192, 7, 1, 3) in shapes
    if dtype == torch.bfloat16:
        shapes = bf16_shapes(shapes)
        assert (8192, 7, 1, 3) in shapes and {(s[1], s[2]) for s in shapes} == {
            (s[1], s[2]) for s in moat_depthwise_shapes()
        }
    for c, size, stride, k in shapes:
        out_pixels = math.ceil(size / stride) ** 2
        monkeypatch.setattr(fd, "_BLOCK_P", min(1024, triton.next_power_of_2(out_pixels)))
        # Against the float32 modules (float64 depthwise convolutions are slow on a CPU); bf16
        # with a fixed bound (the fast test holds its errors to the bf16 modules' own).
        check(1, c, size, size, stride, dtype, k=k, bf16_bound=2e-2, truth_dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("size", [5, 13, 15, 17, 28])
def test_small_odd_and_even_maps_with_both_strides(size):
    for stride in (1, 2):
        check(2, 72, size, size, stride)
        check(1, 72, size, size + 2, stride, channels_last=False)


@pytest.mark.slow
def test_inductor_compiles_a_block_with_the_op_on_the_cpu(monkeypatch):
    """The default backend (inductor, C++ on the CPU) around the opaque op: same step."""
    monkeypatch.setattr(fd, "_device_supported", lambda x: True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MBConvBlock(16, 32, stride=2, se_ratio=0.25).to(DEVICE, memory_format=torch.channels_last)
    eager.fused_depthwise = True
    compiled = copy.deepcopy(eager)
    fwd = torch.compile(compiled, fullgraph=True, dynamic=False)
    x = torch.randn(2, 16, 16, 16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    for f in (eager, fwd):
        f(x).square().mean().backward()
    torch._dynamo.reset()
    total = torch.cat([p.grad.flatten() for p in eager.parameters()]).norm()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        # (pre_norm's bias feeds a train-mode BatchNorm: zero gradient up to rounding.)
        assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-6 * total, name
