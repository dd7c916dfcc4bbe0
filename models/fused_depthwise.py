"""Depthwise convolution -> BatchNorm (batch statistics) -> exact GELU as fused Triton kernels.

MBConv's ``conv2_kxk -> norm2 -> act2`` on the 4x-expanded tensor is memory bound: cuDNN's
depthwise convolution reads the input and writes ``d``, BatchNorm reads ``d`` once for its batch
statistics and again to normalise, and the backward reads ``dy`` and ``d`` twice (reductions,
then the gradient) and writes the gradient of ``d`` for cuDNN's two depthwise backward kernels.
Here, in training mode:

- forward: one kernel convolves (TF 'SAME' padding by masking the loads, no padded copy), writes
  ``d`` and reduces its per-channel mean and M2 in the epilogue (Chan's parallel combination of
  per-tile statistics: no second pass over ``d``, no float atomics, deterministic); a second
  kernel writes ``y = gelu(bn(d))``.
- backward: one kernel reduces ``sum(g)`` and ``sum(g * xhat)`` (``g = dy * gelu'(z)``); a second
  applies the BatchNorm/GELU backward on load, writes the gradient of ``d`` once and reduces the
  depthwise weight gradient from it in the same pass; a third gathers the input gradient.

That is one pass over ``d`` fewer in the forward and one in the backward than the reference
modules (see docs/benchmarks.md for the byte count and the prediction). The BatchNorm/GELU of the
*previous* layer is not applied on load: each input element feeds K*K outputs, so the erf-based
GELU would be recomputed up to 9 times per element, which turns a bandwidth-bound kernel into an
arithmetic-bound one on current GPUs.

Why hand-written: neither cuDNN nor inductor fuse a convolution with the BatchNorm statistics of
its output (inductor leaves convolutions to cuDNN). The kernels are registered as torch custom ops
(``torch.ops.moat.dw_bn_gelu_fwd`` / ``_bwd``) with fake-tensor and autograd formulas, so
``torch.compile`` keeps them in its graph as opaque calls without a graph break.
``torch.library.custom_op`` rather than ``triton_op``: an opaque op also runs under
``torch.compile`` on the CPU (with ``TRITON_INTERPRET=1``), which is how it is tested without a
GPU; inductor would not fuse anything into a user Triton kernel either way.

Importing this module never needs triton or a GPU; :func:`dwconv_bn_gelu` runs the fused kernels
only for CUDA tensors in training mode and otherwise the given modules unchanged.
"""

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

try:  # triton ships with torch's CUDA wheels; without it the reference path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None

    class tl:  # noqa: N801 - stands in for triton.language in the kernels' signatures
        constexpr = None


__all__ = [
    "dwconv_bn_gelu",
    "fused_dwconv_bn_gelu",
    "fused_supported",
    "is_available",
    "tf_same_pad",
]


def is_available() -> bool:
    """Whether triton can be imported (it runs on CUDA, or on the CPU with ``TRITON_INTERPRET=1``)."""
    return triton is not None


def tf_same_pad(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """(output size, padding before) of TensorFlow 'SAME' padding along one dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2


# ----------------------------------------------------------------------------------------- kernels
# Plain functions, made Triton kernels on first use (``_kernel``), so that importing this module
# compiles nothing. Triton's interpreter (``TRITON_INTERPRET=1``, which has to be set before
# triton is first imported: its standard library is jitted then) runs them on CPU tensors; it needs
# the ``tl.constexpr`` annotations as objects, hence no ``from __future__ import annotations``
# in this module. All arithmetic is float32, the
# GELU exact: 0.5 z (1 + erf(z / sqrt 2)), derivative Phi(z) + z phi(z) with the constants
# 1 / sqrt(2) = 0.7071067811865476 and 1 / sqrt(2 pi) = 0.3989422804014327 written out (a kernel
# reads no Python globals). Tensors are addressed through their strides, so NCHW and
# channels_last both work (channels_last, the trainer's layout, gives contiguous channel vectors
# and coalesced loads).


def _dw_fwd(
    x_ptr, w_ptr, d_ptr, mean_ptr, m2_ptr,
    P, C, H, W, HO, WO, iters,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    K: tl.constexpr, S: tl.constexpr, PAD_T: tl.constexpr, PAD_L: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """d = depthwise conv of x (TF 'SAME' by masking); per program, the mean and M2 of its d."""
    pid_p = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    run_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for it in range(0, iters):
        offs_p = (pid_p * iters + it) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        ow = offs_p % WO
        oh = (offs_p // WO) % HO
        n = (offs_p // (WO * HO)).to(tl.int64)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for kh in tl.static_range(K):
            ih = oh * S - PAD_T + kh
            hok = pmask & (ih >= 0) & (ih < H)
            for kw in tl.static_range(K):
                iw = ow * S - PAD_L + kw
                ok = hok & (iw >= 0) & (iw < W)
                base = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
                ptrs = x_ptr + base[:, None] + offs_c[None, :] * sxc
                xv = tl.load(ptrs, mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                wv = tl.load(w_ptr + offs_c * (K * K) + (kh * K + kw), mask=cmask, other=0.0).to(tl.float32)
                acc += xv * wv[None, :]
        mask = pmask[:, None] & cmask[None, :]
        dout = acc.to(d_ptr.dtype.element_ty)
        dbase = n * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
        tl.store(d_ptr + dbase[:, None] + offs_c[None, :] * sdc, dout, mask=mask)
        # Statistics of the stored (rounded) values, as the reference BatchNorm sees them.
        dv = tl.where(mask, dout.to(tl.float32), 0.0)
        nb = tl.sum(pmask.to(tl.float32), axis=0)
        bmean = tl.sum(dv, axis=0) / tl.maximum(nb, 1.0)
        diff = tl.where(mask, dv - bmean[None, :], 0.0)
        bm2 = tl.sum(diff * diff, axis=0)
        total = run_n + nb
        delta = bmean - run_mean
        frac = nb / tl.maximum(total, 1.0)
        run_mean += delta * frac
        run_m2 += bm2 + delta * delta * run_n * frac
        run_n = total
    tl.store(mean_ptr + pid_p * C + offs_c, run_mean, mask=cmask)
    tl.store(m2_ptr + pid_p * C + offs_c, run_m2, mask=cmask)


def _bn_gelu_fwd(
    d_ptr, y_ptr, scale_ptr, shift_ptr,
    P, C, HO, WO,
    sdn, sdc, sdh, sdw, syn, syc, syh, syw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """y = gelu(d * scale + shift), the normalised value rounded to d's dtype first (as the
    reference BatchNorm's output is)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = offs_p < P
    cmask = offs_c < C
    mask = pmask[:, None] & cmask[None, :]
    ow = (offs_p % WO).to(tl.int64)
    oh = ((offs_p // WO) % HO).to(tl.int64)
    n = (offs_p // (WO * HO)).to(tl.int64)
    d = tl.load(d_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + offs_c, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=cmask, other=0.0)
    z = (d.to(tl.float32) * scale[None, :] + shift[None, :]).to(d.dtype).to(tl.float32)
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + offs_c[None, :] * syc, y.to(d.dtype), mask=mask)


def _bn_gelu_bwd_reduce(
    dy_ptr, d_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, sg_ptr, sgx_ptr,
    P, C, HO, WO, iters,
    sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per program: sum(g) and sum(g * xhat), g = dy * gelu'(z), xhat = (d - mean) * rstd."""
    pid_p = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    scale = tl.load(scale_ptr + offs_c, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=cmask, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_c, mask=cmask, other=0.0)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for it in range(0, iters):
        offs_p = (pid_p * iters + it) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        mask = pmask[:, None] & cmask[None, :]
        ow = (offs_p % WO).to(tl.int64)
        oh = ((offs_p // WO) % HO).to(tl.int64)
        n = (offs_p // (WO * HO)).to(tl.int64)
        dy = tl.load(dy_ptr + (n * sgn + oh * sgh + ow * sgw)[:, None] + offs_c[None, :] * sgc, mask=mask, other=0.0)
        dr = tl.load(d_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc, mask=mask, other=0.0)
        d = dr.to(tl.float32)
        z = (d * scale[None, :] + shift[None, :]).to(dr.dtype).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        g = tl.where(mask, dy.to(tl.float32) * (cdf + z * pdf), 0.0)
        xhat = (d - mean[None, :]) * rstd[None, :]
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * xhat, axis=0)
    tl.store(sg_ptr + pid_p * C + offs_c, sum_g, mask=cmask)
    tl.store(sgx_ptr + pid_p * C + offs_c, sum_gx, mask=cmask)


def _bn_gelu_bwd_dw(
    dy_ptr, d_ptr, x_ptr, dd_ptr, dw_ptr,
    scale_ptr, shift_ptr, a1_ptr, k1_ptr, k0_ptr,
    P, C, H, W, HO, WO, iters,
    sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
    K: tl.constexpr, S: tl.constexpr, PAD_T: tl.constexpr, PAD_L: tl.constexpr,
    KK_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dd = a1 * g + k1 * d + k0 (the BatchNorm/GELU backward, applied on load), stored in the
    layout of d; per program, the depthwise weight gradient sum(x_shifted * dd) of every tap."""
    pid_p = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    scale = tl.load(scale_ptr + offs_c, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=cmask, other=0.0)
    a1 = tl.load(a1_ptr + offs_c, mask=cmask, other=0.0)
    k1 = tl.load(k1_ptr + offs_c, mask=cmask, other=0.0)
    k0 = tl.load(k0_ptr + offs_c, mask=cmask, other=0.0)
    taps = tl.arange(0, KK_PAD)
    dw_acc = tl.zeros([KK_PAD, BLOCK_C], dtype=tl.float32)
    for it in range(0, iters):
        offs_p = (pid_p * iters + it) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        mask = pmask[:, None] & cmask[None, :]
        ow = offs_p % WO
        oh = (offs_p // WO) % HO
        n = (offs_p // (WO * HO)).to(tl.int64)
        oh64 = oh.to(tl.int64)
        ow64 = ow.to(tl.int64)
        dy = tl.load(
            dy_ptr + (n * sgn + oh64 * sgh + ow64 * sgw)[:, None] + offs_c[None, :] * sgc, mask=mask, other=0.0
        )
        dbase = n * sdn + oh64 * sdh + ow64 * sdw
        dr = tl.load(d_ptr + dbase[:, None] + offs_c[None, :] * sdc, mask=mask, other=0.0)
        d = dr.to(tl.float32)
        z = (d * scale[None, :] + shift[None, :]).to(dr.dtype).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        g = dy.to(tl.float32) * (cdf + z * pdf)
        dd = tl.where(mask, a1[None, :] * g + k1[None, :] * d + k0[None, :], 0.0)
        tl.store(dd_ptr + dbase[:, None] + offs_c[None, :] * sdc, dd.to(dd_ptr.dtype.element_ty), mask=mask)
        for kh in tl.static_range(K):
            ih = oh * S - PAD_T + kh
            hok = pmask & (ih >= 0) & (ih < H)
            for kw in tl.static_range(K):
                iw = ow * S - PAD_L + kw
                ok = hok & (iw >= 0) & (iw < W)
                base = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
                xv = tl.load(
                    x_ptr + base[:, None] + offs_c[None, :] * sxc, mask=ok[:, None] & cmask[None, :], other=0.0
                )
                contrib = tl.sum(xv.to(tl.float32) * dd, axis=0)
                dw_acc += tl.where(taps[:, None] == kh * K + kw, contrib[None, :], 0.0)
    out = dw_ptr + pid_p * (KK_PAD * C) + taps[:, None] * C + offs_c[None, :]
    tl.store(out, dw_acc, mask=(taps[:, None] < K * K) & cmask[None, :])


def _dw_bwd_dx(
    dd_ptr, w_ptr, dx_ptr,
    PI, C, H, W, HO, WO,
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
    K: tl.constexpr, S: tl.constexpr, PAD_T: tl.constexpr, PAD_L: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dx[i] = sum over taps of w[tap] * dd[o] with o * S - PAD + tap = i (a gather: each input
    position collects from the outputs that read it, so no atomics)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = offs_p < PI
    cmask = offs_c < C
    iw = offs_p % W
    ih = (offs_p // W) % H
    n = (offs_p // (W * H)).to(tl.int64)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(K):
        th = ih + PAD_T - kh
        oh = th // S
        hok = pmask & (th >= 0) & (oh < HO)
        if S > 1:
            hok = hok & (th % S == 0)
        for kw in tl.static_range(K):
            tw = iw + PAD_L - kw
            ow = tw // S
            ok = hok & (tw >= 0) & (ow < WO)
            if S > 1:
                ok = ok & (tw % S == 0)
            base = n * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
            ddv = tl.load(dd_ptr + base[:, None] + offs_c[None, :] * sdc, mask=ok[:, None] & cmask[None, :], other=0.0)
            wv = tl.load(w_ptr + offs_c * (K * K) + (kh * K + kw), mask=cmask, other=0.0).to(tl.float32)
            acc += ddv.to(tl.float32) * wv[None, :]
    xbase = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
    mask = pmask[:, None] & cmask[None, :]
    tl.store(dx_ptr + xbase[:, None] + offs_c[None, :] * sxc, acc.to(dx_ptr.dtype.element_ty), mask=mask)


_JITTED: Dict[str, Callable] = {}


def _kernel(fn: Callable) -> Callable:
    """``triton.jit(fn)``, made once."""
    if triton is None:
        raise RuntimeError("the fused depthwise kernels need triton (shipped with torch's CUDA wheels)")
    if fn.__name__ not in _JITTED:
        _JITTED[fn.__name__] = triton.jit(fn)
    return _JITTED[fn.__name__]


# --------------------------------------------------------------------------------- launch geometry
_BLOCK_P = 64  # output pixels per tile
_TARGET_PROGRAMS = 1024  # reductions: enough programs to fill an H100 (132 SMs) several times


def _block_c(c: int) -> int:
    return min(64, triton.next_power_of_2(c))


def _reduction_grid(p: int, c: int) -> Tuple[int, int, int]:
    """(programs along pixels, programs along channels, tiles per program) of the reducing
    kernels: a few programs per SM, each looping over its tiles, so the per-program partials
    that torch combines stay small."""
    grid_c = triton.cdiv(c, _block_c(c))
    tiles = triton.cdiv(p, _BLOCK_P)
    iters = max(1, triton.cdiv(tiles * grid_c, _TARGET_PROGRAMS))
    return triton.cdiv(tiles, iters), grid_c, iters


def _out_like(x: torch.Tensor, shape: Tuple[int, ...], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A new ``shape`` tensor in x's memory format (channels_last or contiguous)."""
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride: int) -> Tuple[int, int, int, int]:
    """(output height, output width, pad top, pad left) of TF 'SAME'."""
    k = weight.shape[-1]
    ho, pad_t = tf_same_pad(x.shape[2], k, stride)
    wo, pad_l = tf_same_pad(x.shape[3], k, stride)
    return ho, wo, pad_t, pad_l


# ---------------------------------------------------------------------------------------- the ops
@torch.library.custom_op(
    "moat::dw_bn_gelu_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor gamma, Tensor beta, int stride, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _fwd_op(
    x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, stride: int, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, d, mean, var): d the depthwise conv of x, mean/var its biased per-channel batch
    statistics (float32), y = gelu(batchnorm(d))."""
    nb, c, h, w = x.shape
    k = weight.shape[-1]
    ho, wo, pad_t, pad_l = _geometry(x, weight, stride)
    p = nb * ho * wo
    d = _out_like(x, (nb, c, ho, wo))
    grid_p, grid_c, iters = _reduction_grid(p, c)
    means = torch.empty(grid_p, c, dtype=torch.float32, device=x.device)
    m2s = torch.empty_like(means)
    weight = weight.contiguous()
    _kernel(_dw_fwd)[(grid_p, grid_c)](
        x, weight, d, means, m2s, p, c, h, w, ho, wo, iters, *x.stride(), *d.stride(),
        K=k, S=stride, PAD_T=pad_t, PAD_L=pad_l, BLOCK_P=_BLOCK_P, BLOCK_C=_block_c(c),
    )  # fmt: skip
    # Chan et al.'s combination of the per-program (count, mean, M2).
    span = iters * _BLOCK_P
    counts = (p - torch.arange(grid_p, device=x.device, dtype=torch.float32) * span).clamp(0, span)[:, None]
    mean = (counts * means).sum(0) / p
    var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / p
    scale = gamma.float() * torch.rsqrt(var + eps)
    shift = beta.float() - mean * scale
    y = torch.empty_like(d)
    _kernel(_bn_gelu_fwd)[(triton.cdiv(p, _BLOCK_P), grid_c)](
        d, y, scale, shift, p, c, ho, wo, *d.stride(), *y.stride(), BLOCK_P=_BLOCK_P, BLOCK_C=_block_c(c)
    )
    return y, d, mean, var


@_fwd_op.register_fake
def _fwd_fake(x, weight, gamma, beta, stride, eps):
    ho, wo, _, _ = _geometry(x, weight, stride)
    d = _out_like(x, (x.shape[0], x.shape[1], ho, wo))
    stat = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(d), d, stat, torch.empty_like(stat)


@torch.library.custom_op(
    "moat::dw_bn_gelu_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor d, Tensor mean, Tensor var, Tensor gamma, "
    "Tensor beta, int stride, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    d: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dgamma, dbeta) of ``_fwd_op``'s y."""
    nb, c, h, w = x.shape
    k = weight.shape[-1]
    ho, wo, pad_t, pad_l = _geometry(x, weight, stride)
    p = nb * ho * wo
    block_c = _block_c(c)
    grid_p, grid_c, iters = _reduction_grid(p, c)
    rstd = torch.rsqrt(var + eps)
    g32 = gamma.float()
    scale = g32 * rstd
    shift = beta.float() - mean * scale
    sums = torch.empty(2, grid_p, c, dtype=torch.float32, device=x.device)
    _kernel(_bn_gelu_bwd_reduce)[(grid_p, grid_c)](
        dy, d, scale, shift, mean, rstd, sums[0], sums[1], p, c, ho, wo, iters, *dy.stride(), *d.stride(),
        BLOCK_P=_BLOCK_P, BLOCK_C=block_c,
    )  # fmt: skip
    dbeta, dgamma = sums[0].sum(0), sums[1].sum(0)  # separate tensors: outputs may not alias
    # dd = gamma * rstd * (g - mean(g) - xhat * mean(g * xhat)) = a1 * g + k1 * d + k0.
    a1 = scale
    c2 = dgamma / p
    k1 = -a1 * c2 * rstd
    k0 = -a1 * (dbeta / p) - k1 * mean
    dd = torch.empty_like(d)
    kk_pad = triton.next_power_of_2(k * k)
    dw_parts = torch.empty(grid_p, kk_pad, c, dtype=torch.float32, device=x.device)
    _kernel(_bn_gelu_bwd_dw)[(grid_p, grid_c)](
        dy, d, x, dd, dw_parts, scale, shift, a1, k1, k0, p, c, h, w, ho, wo, iters,
        *dy.stride(), *d.stride(), *x.stride(),
        K=k, S=stride, PAD_T=pad_t, PAD_L=pad_l, KK_PAD=kk_pad, BLOCK_P=_BLOCK_P, BLOCK_C=block_c,
    )  # fmt: skip
    # In weight's own layout, as the fake kernel promises (empty_like).
    dweight = torch.empty_like(weight).copy_(dw_parts.sum(0)[: k * k].t().reshape(weight.shape))
    dx = torch.empty_like(x)
    _kernel(_dw_bwd_dx)[(triton.cdiv(nb * h * w, _BLOCK_P), grid_c)](
        dd, weight.contiguous(), dx, nb * h * w, c, h, w, ho, wo, *dd.stride(), *dx.stride(),
        K=k, S=stride, PAD_T=pad_t, PAD_L=pad_l, BLOCK_P=_BLOCK_P, BLOCK_C=block_c,
    )  # fmt: skip
    return dx, dweight, dgamma.to(gamma.dtype), dbeta.to(beta.dtype)


@_bwd_op.register_fake
def _bwd_fake(dy, x, weight, d, mean, var, gamma, beta, stride, eps):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(beta)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, gamma, beta, stride, eps = inputs
    _, d, mean, var = output
    ctx.save_for_backward(x, weight, d, mean, var, gamma, beta)
    ctx.stride, ctx.eps = stride, eps


def _backward(ctx, dy, _dd, _dmean, _dvar):
    # d, mean and var are outputs only so that they can be saved and update the running
    # statistics (without gradient); only y's gradient flows back.
    x, weight, d, mean, var, gamma, beta = ctx.saved_tensors
    dx, dweight, dgamma, dbeta = _bwd_op(dy, x, weight, d, mean, var, gamma, beta, ctx.stride, ctx.eps)
    return dx, dweight, dgamma, dbeta, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------- public entries
def fused_dwconv_bn_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    eps: float,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    num_batches_tracked: Optional[torch.Tensor] = None,
    momentum: float = 0.1,
) -> torch.Tensor:
    """``gelu(batch_norm(depthwise_conv_tf_same(x, weight), training=True))`` through the fused
    kernels, on any device triton runs on; updates the running statistics in place as
    ``nn.BatchNorm2d`` does (unbiased variance, ``momentum``). ``weight`` is ``[C, 1, K, K]``;
    under autocast x and weight are cast to the autocast dtype, as the convolution would be."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    ho, wo, _, _ = _geometry(x, weight, stride)
    n = x.shape[0] * ho * wo
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    y, _, mean, var = torch.ops.moat.dw_bn_gelu_fwd(x, weight.to(x.dtype), gamma, beta, stride, eps)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (n / (n - 1)), alpha=momentum)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
    return y


def fused_supported(conv: nn.Module, norm: nn.Module, act: nn.Module) -> bool:
    """Whether ``act(norm(conv(x)))`` is what the fused kernels compute: a bias-free depthwise
    square-kernel convolution with stride 1 or 2 and TF 'SAME' padding (timm's
    ``create_conv2d(padding='same')``), an affine ``BatchNorm2d`` in training mode with a momentum,
    and the exact GELU."""
    if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.BatchNorm2d) or type(act) is not nn.GELU:
        return False
    k = conv.kernel_size
    if k[0] != k[1] or conv.stride[0] != conv.stride[1] or conv.stride[0] not in (1, 2) or conv.bias is not None:
        return False
    if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels or conv.dilation != (1, 1):
        return False
    # Conv2dSame pads dynamically (TF 'SAME'); a static padding must be the symmetric one that
    # equals TF 'SAME' (stride 1, odd kernel).
    same = type(conv).__name__ == "Conv2dSame" or (
        conv.stride[0] == 1 and k[0] % 2 == 1 and tuple(conv.padding) == (k[0] // 2, k[0] // 2)
    )
    if not same:
        return False
    return (
        norm.training
        and norm.affine
        and norm.track_running_stats
        and norm.momentum is not None
        and (act.approximate == "none")
    )


def _device_supported(x: torch.Tensor) -> bool:
    return x.is_cuda and is_available()


def dwconv_bn_gelu(x: torch.Tensor, conv: nn.Module, norm: nn.Module, act: nn.Module) -> torch.Tensor:
    """``act(norm(conv(x)))``: the fused kernels for CUDA tensors when :func:`fused_supported`,
    the modules themselves otherwise (CPU, eval mode, a folded or replaced norm)."""
    if not (_device_supported(x) and fused_supported(conv, norm, act)):
        return act(norm(conv(x)))
    return fused_dwconv_bn_gelu(
        x,
        conv.weight,
        norm.weight,
        norm.bias,
        conv.stride[0],
        norm.eps,
        norm.running_mean,
        norm.running_var,
        norm.num_batches_tracked,
        norm.momentum,
    )
