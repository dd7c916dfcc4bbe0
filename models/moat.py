"""MOAT: Alternating Mobile Convolution and Attention (Yang et al., ICLR 2023), in PyTorch.

A faithful port of the authors' TensorFlow model (google-research/deeplab2 ``moat.py``,
``moat_blocks.py``, ``moat_attention.py``); ``docs/architecture.md`` describes what this file
builds and where each detail comes from. Where the widely copied unofficial port differs
(depthwise before expansion, max-pool shortcut, halved expansion on strided blocks, no final
norm, bias tied to one input size) this file follows the official code.

Layout: ``stem`` -> ``stages`` (the official variants: MBConv, MBConv, MOAT, MOAT; the first
block of each has a stride) -> ``head`` (mean pool -> LayerNorm -> Linear). The architecture is
a :class:`~models.config.MoatCfg`; every registered variant is one
(``timm.create_model('moat_0')`` once ``models`` is imported) and keyword arguments override its
fields (``timm.create_model('moat_0', depths=(2, 3, 5, 2))``).
"""

# No ``from __future__ import annotations``: torch.fx copies forward's annotations into the code
# it generates, and TorchScript cannot read them back as strings (fx + script).
import contextlib
import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    LayerNorm2d,
    NormMlpClassifierHead,
    SEModule,
    create_conv2d,
    get_act_layer,
    get_norm_layer,
)
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    register_notrace_function,
    register_notrace_module,
)
from timm.models._features import feature_take_indices

# timm.utils, not timm.models: the latter re-exports it only in some releases (not 1.0.29).
from timm.utils import reparameterize_model
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint

from .config import FIELD_NAMES, MOAT_CFGS, MoatCfg, resolve_cfg
from .fast_paths import FLEX_MIN_TOKENS, flex_attention_padded_bias, flex_available, use_linear_1x1
from .fused_depthwise import dwconv_bn_gelu

__all__ = ["MOAT", "MoatCfg", "MOAT_CFGS", "checkpoint_filter_fn", "create_moat", "list_variants"]

# Official defaults of the building blocks when used on their own (a MOAT passes its config's).
_BATCH_NORM = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)  # Keras BatchNormalization(0.99, 1e-3)
_LAYER_NORM_EPS = 1e-5

# Published ImageNet-1K top-1 and each variant's default input size (the resolution the authors
# trained at: 224 for MOAT, 256 for tiny-MOAT); the no-PE variants have no published number.
PUBLISHED_TOP1: Dict[str, float] = {
    "moat_0": 83.3,
    "moat_1": 84.2,
    "tiny_moat_0": 76.6,
    "tiny_moat_1": 79.2,
    "tiny_moat_2": 81.7,
    "tiny_moat_3": 83.3,
}
DEFAULT_IMG_SIZE: Dict[str, int] = {n: 256 if n.startswith("tiny_") else 224 for n in MOAT_CFGS}


def list_variants() -> List[str]:
    """Names of all MOAT variants, as registered with timm."""
    return list(MOAT_CFGS)


def conv_norm_layer(cfg: MoatCfg) -> Callable[[int], nn.Module]:
    """``norm(channels)`` for the conv path: ``cfg.norm_layer`` with ``bn_eps`` (and
    ``bn_momentum`` for BatchNorm)."""
    layer = get_norm_layer(cfg.norm_layer)
    if issubclass(layer, nn.modules.batchnorm._BatchNorm):
        return partial(layer, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
    return partial(layer, eps=cfg.bn_eps)


def act_layer_class(name: str) -> Callable[[], nn.Module]:
    """timm's activation by name, except 'gelu' -> torch's ``nn.GELU`` (exact erf form): timm
    maps it to a wrapper of the same ``F.gelu``, which exporters and tests know less well."""
    return nn.GELU if name == "gelu" else get_act_layer(name)


def _init_weights(module: nn.Module) -> None:
    # Official init: plain (not truncated) Normal(0, 0.02) kernels, zero biases; norms 1 / 0.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_notrace_module  # torch.fx: the padding depends on the input size (a leaf, like timm's AvgPool2dSame)
class AvgPool2dTFSame(nn.Module):
    """Average pool with TensorFlow 'SAME' padding that excludes padded cells from the mean.

    Why hand-written: timm's ``AvgPool2dSame`` counts the zero padding in the mean and torch's
    ``padding=`` pads both sides symmetrically; Keras pads right/bottom and excludes the pad.
    Pool size 2 on the even maps MOAT sees needs no padding and runs as a plain ``avg_pool2d``.
    """

    def __init__(self, pool_size: int, stride: int = 2) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = _tf_same_pad([x.shape[-2], x.shape[-1]], self.pool_size, self.stride)
        if sum(pad) == 0:
            return F.avg_pool2d(x, self.pool_size, self.stride)
        summed = F.avg_pool2d(F.pad(x, pad), self.pool_size, self.stride, divisor_override=1)
        ones = torch.ones([1, 1, x.shape[-2], x.shape[-1]], dtype=x.dtype, device=x.device)
        counts = F.avg_pool2d(F.pad(ones, pad), self.pool_size, self.stride, divisor_override=1)
        return summed / counts


def _tf_same_pad(size: List[int], kernel: int, stride: int) -> List[int]:
    """F.pad amounts [left, right, top, bottom] of TensorFlow 'SAME' padding for ``size`` [H, W]."""
    pads: List[int] = []
    for s in [size[1], size[0]]:
        total = max((-(-s // stride) - 1) * stride + kernel - s, 0)  # -(-s // stride): ceil(s / stride)
        pads += [total // 2, total - total // 2]
    return pads


def _require_eval(*norms: nn.BatchNorm2d) -> None:
    if any(n.training for n in norms):
        raise RuntimeError("reparameterize() folds BatchNorm running statistics: call model.eval() first")


def _fold_input_bn(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """A 1x1 conv (no padding) equal to ``conv(bn(x))`` in eval mode.

    torch's ``fuse_conv_bn_eval`` folds a BN that *follows* a conv; MOAT's pre-norm comes before
    the expansion conv, so it is folded by hand: ``W (s x + t) + b = (W s) x + (W t + b)``.
    """
    assert conv.kernel_size == (1, 1) and conv.groups == 1 and not bn.training
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, 1, bias=True, device=conv.weight.device, dtype=conv.weight.dtype
    ).train(conv.training)
    # Element-wise on the 4-D weight, so its memory layout carries over.
    fused.weight = nn.Parameter(conv.weight * scale.view(1, -1, 1, 1))
    bias = conv.weight.flatten(1) @ shift
    fused.bias = nn.Parameter(bias + conv.bias if conv.bias is not None else bias)
    return fused


class SqueezeExcite(SEModule):
    """timm's ``SEModule`` (same parameters, same values) with a cheaper squeeze gradient.

    ``x.mean`` backward writes ``grad / (H*W)`` at the full expanded size; the backward of
    ``sum`` is a free broadcast and the division runs on the pooled ``[B, C, 1, 1]`` tensor.
    Accumulating in float32 then rounding keeps it bit-identical to ``mean`` under bf16 too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.sum((2, 3), keepdim=True, dtype=torch.float32).div(x.shape[-2] * x.shape[-1]).to(x.dtype)
        x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        return x * self.gate(x_se)


class Stem(nn.Sequential):
    """3x3 convs with bias, the first with stride 2, a norm and activation between consecutive
    convs and nothing after the last (the next block's pre-norm follows). Official: two convs,
    ``conv1 -> norm1 -> act1 -> conv2``."""

    def __init__(
        self,
        in_chans: int,
        widths: Sequence[int],
        norm_layer: Callable[[int], nn.Module] = _BATCH_NORM,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        for i, width in enumerate(widths):
            self.add_module(
                f"conv{i + 1}", create_conv2d(in_chans, width, 3, stride=2 if i == 0 else 1, padding="same", bias=True)
            )
            if i < len(widths) - 1:
                self.add_module(f"norm{i + 1}", norm_layer(width))
                self.add_module(f"act{i + 1}", act_layer())
            in_chans = width

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference only: fold each BatchNorm into the conv before it (see
        ``MBConvBlock.reparameterize``)."""
        for name, module in list(self.named_children()):
            if isinstance(module, nn.BatchNorm2d):
                _require_eval(module)
                conv_name = "conv" + name[len("norm") :]
                setattr(self, conv_name, fuse_conv_bn_eval(getattr(self, conv_name), module))
                setattr(self, name, nn.Identity())


class MBConvBlock(nn.Module):
    """Pre-norm inverted residual: norm -> 1x1 expand (``expand_ratio`` x OUTPUT channels) ->
    norm-act -> kxk depthwise (stride) -> norm-act -> [SE] -> 1x1 project (bias) -> drop path ->
    + shortcut.

    The shortcut of a strided block is a 'SAME' average pool followed by a 1x1 conv (bias) only
    when the channel count changes. ``se_ratio`` 0 drops the squeeze-excite (MOAT blocks).
    ``fused_depthwise`` (``MOAT.set_fast_paths``) runs depthwise -> norm -> act through the fused
    kernels of ``models/fused_depthwise.py`` on CUDA in training mode.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        kernel_size: int = 3,
        pool_size: int = 2,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = _BATCH_NORM,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        se_act_layer: Callable[[], nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        self.fused_depthwise = False  # an instance attribute: TorchScript sees no class attributes
        mid_chs = int(out_chs * expand_ratio)
        if stride > 1:
            pool = AvgPool2dTFSame(pool_size, stride)
            proj = nn.Conv2d(in_chs, out_chs, 1, bias=True) if in_chs != out_chs else nn.Identity()
            self.shortcut = nn.Sequential()
            self.shortcut.add_module("pool", pool)
            self.shortcut.add_module("conv", proj)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, bias=True)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = norm_layer(in_chs)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm1 = norm_layer(mid_chs)
        self.act1 = act_layer()
        self.conv2_kxk = create_conv2d(
            mid_chs, mid_chs, kernel_size, stride=stride, padding="same", depthwise=True, bias=False
        )
        self.norm2 = norm_layer(mid_chs)
        self.act2 = act_layer()
        self.se = (
            SqueezeExcite(mid_chs, rd_channels=max(1, int(se_ratio * out_chs)), act_layer=se_act_layer)
            if se_ratio > 0
            else nn.Identity()
        )
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, 1, bias=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.conv1_1x1(self.pre_norm(x))
        x = self.act1(self.norm1(x))
        if self.fused_depthwise:
            x = self._fused_depthwise(x)
        else:
            x = self.act2(self.norm2(self.conv2_kxk(x)))
        x = self.conv3_1x1(self.se(x))
        return self.drop_path(x) + shortcut

    @torch.jit.unused
    def _fused_depthwise(self, x):
        # type: (Tensor) -> Tensor
        # (A type comment: TorchScript cannot resolve postponed annotations of an unused method.)
        return dwconv_bn_gelu(x, self.conv2_kxk, self.norm2, self.act2)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference only: fold the three BatchNorms into the two convolutions.

        ``pre_norm`` and ``norm1`` go into the 1x1 expansion, ``norm2`` into the depthwise conv
        (exact up to float rounding, also with TF 'same' padding: the BN follows that conv). Saves
        three memory passes per block, two of them over the 4x expanded tensor. The state dict
        changes (no BN keys, conv biases), so load weights first; called by
        ``MOAT.reparameterize`` and by timm's ``reparameterize_model``.
        """
        if not isinstance(self.norm1, nn.BatchNorm2d):
            return  # already folded
        _require_eval(self.pre_norm, self.norm1, self.norm2)
        self.conv1_1x1 = fuse_conv_bn_eval(_fold_input_bn(self.pre_norm, self.conv1_1x1), self.norm1)
        self.conv2_kxk = fuse_conv_bn_eval(self.conv2_kxk, self.norm2)
        self.pre_norm, self.norm1, self.norm2 = nn.Identity(), nn.Identity(), nn.Identity()


@register_notrace_module  # torch.fx: the window size and the caches depend on the input (a leaf module)
class RelativePositionBias(nn.Module):
    """Learned relative-position bias with a fixed-size table resized to any attention window.

    The table keeps the official shape ``[heads, 2P-1, 2P-1]`` (P = 14 in stage 3, 7 in stage 4)
    whatever the input, so one checkpoint serves every resolution. For an ``h x w`` window it is
    resized bilinearly (half-pixel centres) to ``[heads, 2h-1, 2w-1]`` and gathered as
    ``bias[n, (i, j), (x, y)] = table[n, x - i + h - 1, y - j + w - 1]`` (key minus query, the
    official sign).

    Caching: the gather index is built once per window size. The gathered bias itself is cached
    when no gradient is needed (eval, ``torch.no_grad``) and re-used until the table changes
    (tracked through its in-place version counter, which optimizer steps and ``load_state_dict``
    bump); in training it is recomputed so gradients reach the table. TorchScript compiles the
    uncached path (same values), as the caches are Python dicts.
    """

    __jit_ignored_attributes__ = ["_index_cache", "_bias_cache"]

    def __init__(self, num_heads: int, native_window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.native_window = native_window
        size = 2 * native_window - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, size, size))
        self._index_cache: Dict[Tuple[int, int, torch.device], torch.Tensor] = {}
        self._bias_cache: Dict[Tuple[int, int, torch.dtype, torch.device], Tuple[int, torch.Tensor]] = {}

    @staticmethod
    def build_index(h: int, w: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """``[h*w, h*w]`` flat indices into a ``[2h-1, 2w-1]`` table (query rows, key columns)."""
        return _relative_index(h, w, device)

    @torch.jit.unused
    def _index(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """``[h*w, padded(h*w)]`` gather index: ``build_index`` plus columns that point one past
        the table (a zero appended in ``compute``), so each bias row is a multiple of
        ``BIAS_ALIGNMENT`` long (unpadded under ``torch.jit.trace``, for exports)."""
        if torch.jit.is_tracing():  # exports: no padding, whose width would freeze at the traced size
            return _relative_index(h, w, device)
        if torch.compiler.is_compiling():  # keep compiling from seeing new tensor attributes
            return _padded_index(h, w, device)
        key = (h, w, device)
        index = self._index_cache.get(key)
        if index is None:
            index = _padded_index(h, w, device)
            self._index_cache[key] = index
        return index

    def resized_table(self, h: int, w: int) -> torch.Tensor:
        """The table resized to ``[heads, 2h-1, 2w-1]`` (the table itself at the native size)."""
        table = self.relative_position_bias_table
        # A trace (TorchScript, ONNX) must keep the resize even at the native size, where it is
        # the identity, or the exported graph would only be valid at that size.
        if table.shape[-2] == 2 * h - 1 and table.shape[-1] == 2 * w - 1 and not torch.jit.is_tracing():
            return table
        # antialias=False matches TF2's tf.image.resize(method='bilinear') default.
        size = (2 * h - 1, 2 * w - 1)
        return F.interpolate(table.float().unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]

    def compute(self, h: int, w: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Bias ``[heads, h*w, h*w]`` for an ``h x w`` window, always recomputed.

        The result is a view into a ``[heads, h*w, padded(h*w)]`` buffer: its rows start at
        multiples of ``BIAS_ALIGNMENT`` elements, the layout the fused attention kernels need for
        a mask. Otherwise SDPA pads (copies) the mask on every call, and torch.compile may lay
        the padded copy out in a way the CUDA backward rejects.
        """
        table = self.resized_table(h, w)
        if torch.jit.is_scripting():
            index = _padded_index(h, w, table.device)
        else:
            index = self._index(h, w, table.device)
        n = h * w
        # index_select (backward: index_add_) rather than advanced indexing (backward: a sorting
        # index_put_ with accumulate): same values, a cheaper gradient in training. The appended
        # zero fills the padding columns.
        flat = F.pad(table.flatten(1), [0, 1])
        bias = flat.index_select(1, index.flatten()).view(-1, n, index.shape[1])
        if dtype is not None:
            bias = bias.to(dtype)  # before slicing: a copy of the sliced view would lose the layout
        return bias[:, :, :n]

    def forward(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.compute(h, w, dtype)
        else:
            return self._cached(h, w, dtype)

    @torch.jit.unused
    def _cached(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        table = self.relative_position_bias_table
        # Inference tensors (a model built under torch.inference_mode) have no version counter.
        cacheable = (
            not (torch.is_grad_enabled() and table.requires_grad)
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and not table.is_inference()
        )
        if not cacheable:
            return self.compute(h, w, dtype)
        key = (h, w, dtype, table.device)
        cached = self._bias_cache.get(key)
        if cached is not None and cached[0] == table._version:
            return cached[1]
        bias = self.compute(h, w, dtype)
        self._bias_cache = {k: v for k, v in self._bias_cache.items() if v[0] == table._version}
        self._bias_cache[key] = (table._version, bias)
        return bias

    def _apply(self, fn, recurse=True):
        # Device or dtype moves make cached tensors stale.
        self._index_cache.clear()
        self._bias_cache.clear()
        return super()._apply(fn, recurse)


# Rows of the relative-bias mask start at multiples of this many elements: SDPA's memory-efficient
# kernel takes a mask as is when every stride but the last is a multiple of 8 (and pads a copy of
# it on every call otherwise).
BIAS_ALIGNMENT = 8


def _aligned(n: int, alignment: int = BIAS_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def _relative_index(h: int, w: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``[h*w, h*w]`` flat indices into a ``[2h-1, 2w-1]`` table (query rows, key columns)."""
    i, j = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    i, j = i.flatten(), j.flatten()
    rel_h = i[None, :] - i[:, None] + h - 1  # key row - query row
    rel_w = j[None, :] - j[:, None] + w - 1  # key col - query col
    return rel_h * (2 * w - 1) + rel_w


def _padded_index(h: int, w: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``_relative_index`` with extra columns pointing at the zero appended after the table."""
    n = h * w
    zero_slot = (2 * h - 1) * (2 * w - 1)
    index = torch.full((n, _aligned(n)), zero_slot, dtype=torch.long, device=device)
    index[:, :n] = _relative_index(h, w, device)
    return index


class Attention(nn.Module):
    """Multi-head self-attention over ``[B, H, W, C]`` maps, global or in non-overlapping windows.

    q, k, v (one fused projection, each ``dim`` wide: ``dim / head_dim`` heads of ``head_dim``
    channels, with bias), scale ``head_dim^-0.5``, optional relative bias as an additive float
    mask, output projection with bias. ``fused_attn`` (default True) selects
    ``F.scaled_dot_product_attention``; the explicit path (softmax in float32) is the reference.
    ``flex_attn`` (``MOAT.set_fast_paths``) runs CUDA tensors through FlexAttention instead.
    """

    def __init__(
        self,
        dim: int,
        window_size: Optional[int] = None,
        native_window: int = 14,
        pos_embed: bool = True,
        head_dim: int = 32,
    ) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention channels {dim} are not divisible by the head dim {head_dim}")
        if window_size is not None and window_size <= 0:
            raise ValueError(f"window_size must be a positive int or None (global), got {window_size}")
        self.fused_attn = True
        self.flex_attn = False
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.rel_pos = RelativePositionBias(self.num_heads, native_window) if pos_embed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = window_dims(H, W, self.window_size)
        x = window_partition(x, wh, ww)  # [B * nW, wh * ww, C]
        Bw, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(Bw, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rel_pos(wh, ww, q.dtype) if self.rel_pos is not None else None
        if self.flex_attn:
            x = self._flex_attention(q, k, v, bias)
        elif self.fused_attn:
            # A 4-D mask: torch's CPU flash kernel takes only 2-D / 4-D masks and silently falls
            # back to the (5x slower) math path for the 3-D one.
            mask = bias.unsqueeze(0) if bias is not None else None
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            x = explicit_attention(q, k, v, bias, self.scale)
        x = self.proj(x.transpose(1, 2).reshape(Bw, N, C))
        return window_reverse(x, wh, ww, B, H, W)

    @torch.jit.unused
    def _flex_attention(self, q, k, v, bias):
        # type: (Tensor, Tensor, Tensor, Optional[Tensor]) -> Tensor
        # CUDA only (torch's CPU FlexAttention has no backward), and only windows of at least one
        # whole kernel block: at 49 tokens FlexAttention measured 0.42x the efficient kernel.
        if q.is_cuda and q.shape[-2] >= FLEX_MIN_TOKENS:
            return flex_attention_padded_bias(q, k, v, bias, self.scale)
        mask = bias.unsqueeze(0) if bias is not None else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """Reference attention ``softmax(q k^T * scale + bias) v`` with the softmax in float32."""
    attn = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        attn = attn + bias
    attn = attn.float().softmax(dim=-1).to(v.dtype)
    return attn @ v


# The window helpers branch on the input size: torch.fx records each as one call
# (register_notrace_function), so a traced graph stays valid at every input size. Their names
# are public because torch.fx wraps no function whose name starts with an underscore.
@register_notrace_function
def window_dims(H: int, W: int, window_size: Optional[int]) -> Tuple[int, int]:
    """The attention window for an ``H x W`` map: the whole map under global attention."""
    if window_size is None:
        return H, W
    if H % window_size != 0 or W % window_size != 0:
        raise ValueError(
            f"attention window {window_size} does not divide the {H}x{W} feature map; "
            f"pick a window that divides it or use global attention (window 0)"
        )
    return window_size, window_size


@register_notrace_function
def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * nW, wh * ww, C]`` (a plain flatten under global attention)."""
    B, H, W, C = x.shape
    if wh == H and ww == W:
        return x.reshape(B, H * W, C)
    x = x.view(B, H // wh, wh, W // ww, ww, C).transpose(2, 3)
    return x.reshape(-1, wh * ww, C)


@register_notrace_function
def window_reverse(x: torch.Tensor, wh: int, ww: int, B: int, H: int, W: int) -> torch.Tensor:
    """Inverse of ``window_partition``: back to ``[B, H, W, C]``."""
    C = x.shape[-1]
    if wh == H and ww == W:
        return x.reshape(B, H, W, C)
    x = x.view(B, H // wh, W // ww, wh, ww, C).transpose(2, 3)
    return x.reshape(B, H, W, C)


class MOATBlock(nn.Module):
    """MBConv without SE (own residual and drop path), then LayerNorm -> attention -> drop path
    -> residual. No MLP, no layer scale. Both branches drop independently at the same rate."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        window_size: Optional[int] = None,
        native_window: int = 14,
        pos_embed: bool = True,
        pool_size: int = 2,
        drop_path: float = 0.0,
        expand_ratio: float = 4.0,
        kernel_size: int = 3,
        head_dim: int = 32,
        ln_eps: float = _LAYER_NORM_EPS,
        norm_layer: Callable[[int], nn.Module] = _BATCH_NORM,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.mbconv = MBConvBlock(
            in_chs,
            out_chs,
            stride,
            expand_ratio=expand_ratio,
            se_ratio=0.0,
            kernel_size=kernel_size,
            pool_size=pool_size,
            drop_path=drop_path,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        self.attn_norm = nn.LayerNorm(out_chs, eps=ln_eps)
        self.attn = Attention(out_chs, window_size, native_window, pos_embed, head_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mbconv(x)
        # NCHW -> NHWC is a free view when the model runs channels_last.
        y = self.attn(self.attn_norm(x.permute(0, 2, 3, 1)))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class MoatStage(nn.Module):
    """A stage of blocks; its first block carries the stage's stride."""

    def __init__(self, blocks: List[nn.Module]) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                # Non-reentrant checkpointing restores the RNG, so drop path masks repeat exactly.
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class MOAT(nn.Module):
    """MOAT classifier / backbone. Input ``[B, in_chans, H, W]`` with H and W multiples of the
    total stride (32 for the official layouts).

    Args:
        cfg: the architecture (``MOAT_CFGS[name]`` for a registered variant, or any
            :class:`~models.config.MoatCfg`); kept as ``model.cfg`` after ``**kwargs`` apply.
        num_classes: classifier width (0 removes the classifier).
        in_chans: input channels.
        drop_rate: dropout before the classifier.
        global_pool: 'avg' (the official head) or '' (no pooling).
        device, dtype: where and in which dtype to create the parameters (``device='meta'``
            allocates nothing), as every timm model takes them.
        fused_depthwise, flex_attention, linear_1x1: GPU speed options, off by default; see
            :meth:`set_fast_paths`.
        **kwargs: :class:`~models.config.MoatCfg` fields that override ``cfg`` (``depths=``,
            ``dims=``, ``window_size=``, ``pool_size=``, ``bn_momentum=``, ``drop_path_rate=``,
            ...). ``drop_path_rate=None`` keeps the config's rate. ``window_size`` takes None / 0
            (global), an int for every attention stage, or one value per attention stage or per
            stage, e.g. ``(14, None)`` for the two MOAT stages of the official variants.
    """

    def __init__(
        self,
        cfg: MoatCfg,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        fused_depthwise: bool = False,
        flex_attention: bool = False,
        linear_1x1: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if "drop_path_rate" in kwargs and kwargs["drop_path_rate"] is None:
            del kwargs["drop_path_rate"]
        unknown = sorted(set(kwargs) - set(FIELD_NAMES))
        if unknown:  # a TypeError, as for any Python callable given a keyword it does not take
            raise TypeError(f"unknown MOAT arguments: {unknown}; accepted: MoatCfg fields and {_MOAT_ARGS}")
        cfg = cfg.replace(**kwargs)
        # The device as a context (torch >= 2.0) creates every parameter there directly, through
        # timm's layers too, whatever their version; the dtype is applied once at the end.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(cfg, num_classes, in_chans, drop_rate, global_pool)
        if dtype is not None:
            self.to(dtype=dtype)
        if fused_depthwise or flex_attention or linear_1x1:
            self.set_fast_paths(fused_depthwise, flex_attention, linear_1x1)

    def _build(self, cfg: MoatCfg, num_classes: int, in_chans: int, drop_rate: float, global_pool: str) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.total_stride = cfg.total_stride
        self.drop_rate = drop_rate
        self.window_size = cfg.stage_windows
        self.num_features = cfg.dims[-1]
        self.head_hidden_size = cfg.head_hidden_size or self.num_features
        self.grad_checkpointing = False

        norm_layer = conv_norm_layer(cfg)
        act_layer = act_layer_class(cfg.act_layer)
        conv_args = dict(
            expand_ratio=cfg.expand_ratio,
            kernel_size=cfg.kernel_size,
            pool_size=cfg.pool_size,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        self.stem = Stem(in_chans, cfg.stem_dims, norm_layer, act_layer)
        self.feature_info = []
        total_blocks = sum(cfg.depths)
        block_idx = 0
        in_chs = cfg.stem_dims[-1]
        stages = []
        per_stage = zip(
            cfg.depths,
            cfg.dims,
            cfg.stage_types,
            cfg.stage_strides,
            cfg.stage_windows,
            cfg.stage_pos_embed_sizes,
            cfg.reductions,
        )
        for stage_idx, (depth, dim, kind, stride, window, pe_size, reduction) in enumerate(per_stage):
            blocks = []
            for i in range(depth):
                block_stride = stride if i == 0 else 1
                dpr = cfg.drop_path_rate * block_idx / total_blocks
                if kind == "mbconv":
                    blocks.append(
                        MBConvBlock(
                            in_chs,
                            dim,
                            block_stride,
                            se_ratio=cfg.se_ratio,
                            drop_path=dpr,
                            se_act_layer=act_layer_class(cfg.se_act_layer),
                            **conv_args,
                        )
                    )
                else:  # 'moat' (MoatCfg accepts no other block type)
                    blocks.append(
                        MOATBlock(
                            in_chs,
                            dim,
                            block_stride,
                            window_size=window,
                            native_window=pe_size,
                            pos_embed=cfg.pos_embed,
                            drop_path=dpr,
                            head_dim=cfg.head_dim,
                            ln_eps=cfg.ln_eps,
                            **conv_args,
                        )
                    )
                in_chs = dim
                block_idx += 1
            stages.append(MoatStage(blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.ModuleList(stages)
        self.head = NormMlpClassifierHead(
            self.num_features,
            num_classes,
            hidden_size=cfg.head_hidden_size or None,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=cfg.ln_eps),
        )
        # Dense-task features are the stage outputs after the activation (official endpoints).
        self.feature_act = act_layer()
        # Applied to forward_features' output: the identity, until pruning for backbone use drops
        # the head's norm; then forward_features ends at the (activated) tap, as features_only.
        self.final_act = nn.Identity()
        self.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, RelativePositionBias):
                nn.init.normal_(m.relative_position_bias_table, std=0.02)
            elif isinstance(m, LayerNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Relative-bias tables (1-D params, norms and biases are excluded by the optimizer)."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, in timm's format (used for layer-wise LR decay)."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    @torch.no_grad()
    def reparameterize(self) -> "MOAT":
        """Fold every BatchNorm into its convolution for inference (in place; returns self).

        Outputs stay equal to float rounding; the model can no longer be trained or load a
        training state dict. A shortcut for ``timm.utils.reparameterize_model(model, inplace=True)``,
        which calls the blocks' ``reparameterize``.
        """
        return reparameterize_model(self, inplace=True)

    @torch.jit.ignore
    def set_fast_paths(
        self,
        fused_depthwise: Optional[bool] = None,
        flex_attention: Optional[bool] = None,
        linear_1x1: Optional[bool] = None,
    ) -> None:
        """Switch the GPU speed options (None leaves one as it is); each computes the same
        function as the default layers, to float rounding, and changes no parameter:

        - ``fused_depthwise``: every MBConv's depthwise conv -> BatchNorm -> GELU through the
          fused Triton kernels (``models/fused_depthwise.py``), for CUDA tensors in training mode;
        - ``flex_attention``: attention through FlexAttention with a block-padded relative bias
          (``models/fast_paths.py``), for CUDA tensors and windows of at least 128 tokens;
        - ``linear_1x1``: every 1x1 convolution as a matrix product over the channel dim.
        """
        if flex_attention and not flex_available():
            raise ValueError(
                f"flex_attention needs FlexAttention, which torch {torch.__version__} lacks (torch >= 2.5)"
            )
        for m in self.modules():
            if fused_depthwise is not None and isinstance(m, MBConvBlock):
                m.fused_depthwise = fused_depthwise
            if flex_attention is not None and isinstance(m, Attention):
                m.flex_attn = flex_attention
        if linear_1x1 is not None:
            use_linear_1x1(self, linear_1x1)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        if isinstance(self.head.fc, nn.Linear):
            _init_weights(self.head.fc)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W]`` -> last stage map ``[B, C, H/stride, W/stride]``."""
        check_input(x, self.total_stride)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.final_act(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs for dense tasks, after the activation (GELU) as the authors use them.

        Args:
            indices: stage indices to return (negative count from the end), or an int n for the
                last n stages; default all.
            norm: unused (MOAT has no per-stage norm); kept for timm's signature.
            stop_early: stop after the last requested stage.
            intermediates_only: return only the list of stage maps.
        Returns:
            ``(final_features, [stage maps [B, C_i, H/r_i, W/r_i]])`` in stage order (``r_i`` the
            stage's reduction in ``feature_info``), or just the list.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = _take_indices(len(self.stages), indices)
        check_input(x, self.total_stride)
        intermediates = []
        x = self.stem(x)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.feature_act(x))
        if intermediates_only:
            return intermediates
        return self.final_act(x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last of ``indices`` and, with ``prune_head``, the head (the
        head's LayerNorm goes with it, or alone with ``prune_norm``) for backbone use. Returns
        the indices as non-negative stage numbers, for ``forward_intermediates``."""
        take_indices, max_index = _take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            # The head's norm and hidden layer fit the last stage only: they go, and the head takes
            # the tap's width, so a later reset_classifier sizes a classifier for the tap. (timm's
            # reset(..., reset_other=True) without in_features, spelt out for timm 1.0.9 too.)
            width = self.cfg.dims[max_index]
            self.head.norm, self.head.pre_logits = nn.Identity(), nn.Identity()
            self.head.hidden_size, self.head.in_features, self.head.num_features = None, width, width
            self.reset_classifier(0, "")
            self.num_features = self.head_hidden_size = width
        if prune_head or prune_norm:
            self.head.norm = nn.Identity()
            # forward_features now ends at the last tap, activated as forward_intermediates gives it.
            self.final_act = act_layer_class(self.cfg.act_layer)().train(self.training)
        return take_indices


_MOAT_ARGS = "num_classes, in_chans, drop_rate, global_pool, device, dtype, fused_depthwise, flex_attention, linear_1x1"


# torch.fx records the check as one call (it branches on the input shape); TorchScript compiles it.
@register_notrace_function
def check_input(x: torch.Tensor, stride: int) -> None:
    """One-line errors for inputs the model cannot take (skipped while tracing or compiling)."""
    if not torch.jit.is_scripting():
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
    if x.ndim != 4:
        raise ValueError(f"MOAT expects a [B, C, H, W] input, got shape {list(x.shape)}")
    H, W = x.shape[-2], x.shape[-1]
    if H % stride != 0 or W % stride != 0:
        raise ValueError(f"input size {H}x{W} is not divisible by {stride} (this MOAT's output stride)")


def _take_indices(num_stages: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices`` (None: all, int n: the last n, negatives from the end),
    with a ValueError rather than an AssertionError for an index out of range."""
    try:
        return feature_take_indices(num_stages, indices)
    except AssertionError as e:
        raise ValueError(f"stage indices {indices!r}: {e}") from None


def _cfg(img_size: int = 224, stride: int = 32, **kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, img_size, img_size),
        "pool_size": (img_size // stride, img_size // stride),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "fixed_input_size": False,
        "license": "apache-2.0",
        **kwargs,
    }


# The authors' released ImageNet checkpoints (deeplab2 g3doc/projects/
# moat_imagenet_pretrained_checkpoints.md), one per architecture with and without position
# embedding: file stem, training data, input size. tools/convert_deeplab2.py converts them.
DEEPLAB2_RELEASE_URL = "https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/"
_RELEASES: Dict[str, Tuple[str, str, int]] = {
    "moat_0": ("moat0", "1k", 224),
    "moat_1": ("moat1", "1k", 224),
    "moat_2": ("moat2", "22k_and_1k", 384),
    "moat_3": ("moat3", "22k_and_1k", 512),
    "moat_4": ("moat4", "22k_and_1k", 512),
    "tiny_moat_0": ("tiny_moat0", "1k", 256),
    "tiny_moat_1": ("tiny_moat1", "1k", 256),
    "tiny_moat_2": ("tiny_moat2", "1k", 256),
    "tiny_moat_3": ("tiny_moat3", "1k", 256),
}


def release_url(name: str) -> str:
    """URL of the deeplab2 release that variant ``name`` converts from."""
    pe = not name.endswith("_no_pe")
    stem, data, size = _RELEASES[name if pe else name[: -len("_no_pe")]]
    return f"{DEEPLAB2_RELEASE_URL}{stem}_imagenet_{data}_{size}_{'w' if pe else 'wo'}_position_embedding.tar.gz"


def _variant_cfg(name: str) -> dict:
    _, data, size = _RELEASES[name[: -len("_no_pe")] if name.endswith("_no_pe") else name]
    return _cfg(
        DEFAULT_IMG_SIZE[name],
        origin_url=release_url(name),
        paper_ids="arXiv:2210.01820",
        paper_name="MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision Models",
        notes=(
            f"No PyTorch weights are published: tools/convert_deeplab2.py converts the authors' release at "
            f"origin_url (ImageNet-{data.replace('_and_', ' + ')}, {size} px) to a file or a timm hub folder.",
        ),
    )


# A small custom architecture for tests, as timm registers ``test_*`` models: one stem conv,
# windowed and global attention, a 5x5 depthwise kernel, the padded 3x3 shortcut pool, a stride-1
# last stage, a hidden head layer. Not a variant (``list_variants()`` leaves it out).
TEST_CFG = MoatCfg(
    stem_dims=(16,),
    depths=(1, 1, 2, 1),
    dims=(16, 32, 48, 64),
    stage_types=("mbconv", "moat", "moat", "moat"),
    strides=(2, 2, 2, 1),
    kernel_size=5,
    pool_size=3,
    head_dim=16,
    window_size=(4, None, None),
    pos_embed_size=(4, 7, 7),
    head_hidden_size=32,
)

# timm picks these up at registration (module-level ``default_cfgs``). No weights are published
# for PyTorch: ``pretrained=True`` needs ``pretrained_cfg_overlay=dict(file=...)`` or a hub folder
# (``models.hub``) through ``local-dir:`` / ``hf-hub:``.
default_cfgs = generate_default_cfgs(
    {**{name: _variant_cfg(name) for name in MOAT_CFGS}, "test_moat": _cfg(224, TEST_CFG.total_stride)}
)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model weights in what timm's pretrained loader read: a state dict as is, or a whole
    trainer checkpoint (given as ``pretrained_cfg_overlay=dict(state_dict=...)``, which timm does
    not unwrap) by its ``model_ema`` weights, else ``model``; DDP / compile prefixes dropped.
    Files are unwrapped by timm itself (``model_ema``, then ``model``)."""
    for key in ("model_ema", "model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return strip_wrapper_prefixes(state_dict)


def strip_wrapper_prefixes(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``state_dict`` without the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def create_moat(name: str, pretrained: bool = False, cfg: Optional[MoatCfg] = None, **kwargs) -> MOAT:
    """Build the MOAT called ``name``, like timm's ``_create_maxxvit``.

    ``name`` is a registered variant (``list_variants()``), or any name with ``cfg`` (a
    :class:`~models.config.MoatCfg`), or a new name whose required fields (``stem_dims``,
    ``depths``, ``dims``, ``stage_types``) are all given as keywords. Keywords that are MoatCfg
    fields override the architecture; the rest go to :class:`MOAT` and timm's builder
    (``num_classes``, ``features_only``, ``out_indices``, ``pretrained_cfg_overlay``, ...).
    """
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in FIELD_NAMES}
    if "drop_path_rate" in overrides and overrides["drop_path_rate"] is None:
        del overrides["drop_path_rate"]  # None: the variant's rate
    if name == "test_moat" and cfg is None:
        cfg = TEST_CFG
    cfg = resolve_cfg(name, overrides, base=cfg)
    if name not in default_cfgs:  # spare timm's "no pretrained configuration" warning
        size = math.ceil(224 / cfg.total_stride) * cfg.total_stride
        kwargs.setdefault("pretrained_cfg", _cfg(size, cfg.total_stride))
    return build_model_with_cfg(
        MOAT,
        name,
        pretrained,
        cfg=cfg,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(cfg.num_stages))),
        **kwargs,
    )


@register_model
def moat_0(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_0", pretrained, **kwargs)


@register_model
def moat_1(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_1", pretrained, **kwargs)


@register_model
def moat_2(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_2", pretrained, **kwargs)


@register_model
def moat_3(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_3", pretrained, **kwargs)


@register_model
def moat_4(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_4", pretrained, **kwargs)


@register_model
def tiny_moat_0(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("tiny_moat_0", pretrained, **kwargs)


@register_model
def tiny_moat_1(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("tiny_moat_1", pretrained, **kwargs)


@register_model
def tiny_moat_2(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("tiny_moat_2", pretrained, **kwargs)


@register_model
def tiny_moat_3(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("tiny_moat_3", pretrained, **kwargs)


@register_model
def moat_0_no_pe(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_0_no_pe", pretrained, **kwargs)


@register_model
def moat_1_no_pe(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_1_no_pe", pretrained, **kwargs)


@register_model
def moat_2_no_pe(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_2_no_pe", pretrained, **kwargs)


@register_model
def moat_3_no_pe(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_3_no_pe", pretrained, **kwargs)


@register_model
def moat_4_no_pe(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("moat_4_no_pe", pretrained, **kwargs)


@register_model
def tiny_moat_0_no_pe(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("tiny_moat_0_no_pe", pretrained, **kwargs)


@register_model
def tiny_moat_1_no_pe(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("tiny_moat_1_no_pe", pretrained, **kwargs)


@register_model
def tiny_moat_2_no_pe(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("tiny_moat_2_no_pe", pretrained, **kwargs)


@register_model
def tiny_moat_3_no_pe(pretrained: bool = False, **kwargs) -> MOAT:
    return create_moat("tiny_moat_3_no_pe", pretrained, **kwargs)


@register_model
def test_moat(pretrained: bool = False, **kwargs) -> MOAT:
    """``TEST_CFG``: a small custom MOAT that timm's model tests run in seconds."""
    return create_moat("test_moat", pretrained, **kwargs)
