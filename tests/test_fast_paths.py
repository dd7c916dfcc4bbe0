"""The optional GPU formulations of ``models/fast_paths.py`` compute the layers they replace: 1x1
convolutions as ``F.linear`` over the channel dim, and FlexAttention with a block-padded bias.

torch's CPU FlexAttention runs forward only (its backward raises on CPU in torch 2.14), so on a
CPU the bias gradient is checked through FlexAttention's eager reference implementation with the
device check lifted; the Triton kernel's own gradient needs a GPU (the CUDA test below, and the
GPU suite's attention table).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import fast_paths
from models.moat import MOAT, Attention, MoatCfg, explicit_attention

needs_flex = pytest.mark.skipif(
    not fast_paths.flex_available(), reason=f"torch {torch.__version__} has no FlexAttention"
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------ 1x1 as linear
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_1x1_equals_conv2d_in_float32(channels_last, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1, bias=bias)
    lin = copy.deepcopy(conv)
    assert fast_paths.use_linear_1x1(lin) == 1 and type(lin) is fast_paths.Conv1x1AsLinear
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv, lin = conv.to(memory_format=fmt), lin.to(memory_format=fmt)
    x = torch.randn(3, 24, 7, 9).contiguous(memory_format=fmt)
    outs = []
    for m in (conv, lin):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.ones_like(y) * torch.arange(y.numel()).view_as(y).sin())
        outs.append([y, xi.grad] + [p.grad for p in m.parameters()])
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_linear_1x1_is_as_accurate_as_conv2d_under_bf16_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 96, 1)
    lin = copy.deepcopy(conv)
    fast_paths.use_linear_1x1(lin)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    truth = F.conv2d(x.double(), conv.weight.double(), conv.bias.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_conv, y_lin = conv(x), lin(x)
    assert y_lin.dtype == y_conv.dtype == torch.bfloat16
    assert rel(y_lin, truth) <= 2 * rel(y_conv, truth) + 1e-3


def test_moat_with_linear_1x1_switches_every_plain_1x1_and_trains_the_same():
    torch.manual_seed(0)
    cfg = MoatCfg(stem_dims=(8, 8), depths=(1, 1, 1, 1), dims=(16, 16, 32, 32),
                  stage_types=("mbconv", "mbconv", "moat", "moat"))  # fmt: skip
    ref = MOAT(cfg, num_classes=5).to(memory_format=torch.channels_last)
    fast = copy.deepcopy(ref)
    fast.set_fast_paths(linear_1x1=True)
    plain_1x1 = [m for m in ref.modules() if type(m) is nn.Conv2d and m.kernel_size == (1, 1)]
    switched = [m for m in fast.modules() if type(m) is fast_paths.Conv1x1AsLinear]
    # Expansion, projection, strided shortcuts and the squeeze-excite convs; not the 3x3 stem.
    assert len(switched) == len(plain_1x1) >= 12
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for m in (ref, fast):
        F.cross_entropy(m(x), torch.tensor([1, 3])).backward()
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    total = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-6 * total, name
    fast.set_fast_paths(linear_1x1=False)
    assert not any(type(m) is fast_paths.Conv1x1AsLinear for m in fast.modules())


def test_linear_1x1_scripts_and_traces():
    m = nn.Conv2d(8, 4, 1)
    fast_paths.use_linear_1x1(m)
    x = torch.randn(1, 8, 3, 3)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))
    torch.testing.assert_close(torch.fx.symbolic_trace(m)(x), m(x))


# ----------------------------------------------------------------------------- FlexAttention
def _qkvb(batch: int, heads: int, n: int, dim: int = 32, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g).requires_grad_(grad) for _ in range(3))
    bias = (torch.randn(heads, n, n, generator=g) * 0.5).requires_grad_(grad)
    return q, k, v, bias


@needs_flex
@pytest.mark.parametrize("n", [49, 196])
def test_flex_with_padded_bias_gradients_equal_the_reference_through_the_eager_path(monkeypatch, n):
    """FlexAttention's own eager implementation (a dense computation that calls the score_mod
    on every (query, key) pair), with torch's CPU check lifted: the padded bias's gradient
    reaches the ``[heads, N, N]`` bias unchanged through the pad's backward."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    monkeypatch.setattr(fast_paths, "_compiled_flex", flex_module.flex_attention)
    q, k, v, bias = _qkvb(2, 3, n, grad=True)
    grad = torch.randn(2, 3, n, 32)
    got = fast_paths.flex_attention_padded_bias(q, k, v, bias, 32**-0.5)
    got.backward(grad)
    got_grads = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    ref = explicit_attention(q, k, v, bias, 32**-0.5)
    ref.backward(grad)
    assert rel(got, ref) < 1e-5
    for a, t in zip(got_grads, (q, k, v, bias)):
        assert rel(a, t.grad) < 1e-5


@needs_flex
def test_flex_forward_traces_without_graph_breaks_and_matches_on_the_cpu():
    q, k, v, bias = _qkvb(2, 3, 49)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: fast_paths.flex_attention_padded_bias(*a, 32**-0.5), backend="eager", fullgraph=True)
    with torch.no_grad():
        out = fn(q, k, v, bias)
    torch._dynamo.reset()
    assert rel(out, explicit_attention(q, k, v, bias, 32**-0.5)) < 1e-5


def test_attention_flag_leaves_cpu_tensors_on_sdpa():
    torch.manual_seed(0)
    attn = Attention(64, window_size=None, native_window=7)
    x = torch.randn(2, 7, 7, 64)
    ref = attn(x)
    attn.flex_attn = True
    torch.testing.assert_close(attn(x), ref, rtol=0, atol=0)


@pytest.mark.slow
@needs_flex
def test_flex_forward_compiled_for_the_cpu_matches():
    """torch's CPU FlexAttention kernel (inductor C++, inference only), 49 and 196 tokens."""
    torch._dynamo.reset()
    for n in (49, 196):
        q, k, v, bias = _qkvb(2, 3, n, seed=n)
        with torch.no_grad():
            out = fast_paths.flex_attention_padded_bias(q, k, v, bias, 32**-0.5)
        assert rel(out, explicit_attention(q, k, v, bias, 32**-0.5)) < 1e-4
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's Triton kernels need a GPU")
@needs_flex
@pytest.mark.parametrize("n", [49, 196])
def test_flex_with_padded_bias_matches_the_efficient_kernel_on_cuda(n):
    """The Triton kernels: output and every gradient, bias included, against SDPA's efficient
    kernel (the model's default), both against float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, bias = (t.detach().cuda() for t in _qkvb(8, 4, n))
    grad = torch.randn(8, 4, n, 32, device="cuda")
    truth_in = [t.double().requires_grad_() for t in (q, k, v, bias)]
    truth = explicit_attention(*truth_in, 32**-0.5)
    truth.backward(grad.double())
    results = {}
    for name in ("efficient", "flex"):
        leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v, bias)]
        if name == "flex":
            out = fast_paths.flex_attention_padded_bias(*leaves, 32**-0.5)
        else:
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                out = F.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3][None], scale=32**-0.5)
        out.backward(grad.to(out.dtype))
        results[name] = [rel(out, truth)] + [rel(t.grad, r.grad) for t, r in zip(leaves, truth_in)]
    for f, e in zip(results["flex"], results["efficient"]):
        assert f <= 2 * e + 1e-3, results


def test_asking_for_flex_attention_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr("models.moat.flex_available", lambda: False)
    model = MOAT(MoatCfg(stem_dims=(8,), depths=(1, 1), dims=(16, 32), stage_types=("mbconv", "moat")))
    with pytest.raises(ValueError, match=r"flex_attention needs FlexAttention, which torch .* lacks"):
        model.set_fast_paths(flex_attention=True)
