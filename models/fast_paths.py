"""Optional formulations of MOAT layers for GPU speed, each off by default and numerically the
layer it replaces (tests/test_fast_paths.py): 1x1 convolutions as matrix products over the
channel dim, and attention through FlexAttention with the relative bias padded to whole blocks.
The fused depthwise/BatchNorm/GELU kernels are in ``models/fused_depthwise.py``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Conv1x1AsLinear",
    "FLEX_BLOCK",
    "FLEX_MIN_TOKENS",
    "flex_attention_padded_bias",
    "flex_available",
    "use_linear_1x1",
]


class Conv1x1AsLinear(nn.Conv2d):
    """A 1x1 convolution computed as ``F.linear`` over the channel dim of the NHWC view.

    Same parameters (and state-dict keys) as the ``nn.Conv2d`` it replaces. With channels_last
    activations the NHWC view and the result's NCHW view are free permutes, and the product is a
    plain matrix multiplication: under ``torch.compile`` inductor sees an ``mm`` it can give a
    Triton template with fused prologue/epilogue (``max-autotune``), where a convolution stays an
    opaque cuDNN call. NCHW inputs work too (the permuted input is copied by the matmul) and come
    out channels_last.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
        return y.permute(0, 3, 1, 2)


def _is_plain_1x1(m: nn.Module) -> bool:
    return (
        type(m) in (nn.Conv2d, Conv1x1AsLinear)
        and m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.padding == (0, 0)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def use_linear_1x1(model: nn.Module, enable: bool = True) -> int:
    """Switch every plain 1x1 ``nn.Conv2d`` of ``model`` to :class:`Conv1x1AsLinear` (or back);
    returns how many modules were switched. Only the class changes (it adds no state), so
    parameters, optimizer state and checkpoints are untouched."""
    target = Conv1x1AsLinear if enable else nn.Conv2d
    count = 0
    for m in model.modules():
        if _is_plain_1x1(m) and type(m) is not target:
            m.__class__ = target
            count += 1
    return count


# FlexAttention's Triton kernels work in blocks of up to 128 tokens (forward and backward) and
# evaluate score_mod at the padded positions of the last block too.
FLEX_BLOCK = 128
# The model sends shorter sequences to SDPA: below one block FlexAttention was measured slower
# than the efficient kernel (0.42x at 49 tokens, 1.55x at 196; H100, torch 2.11).
FLEX_MIN_TOKENS = FLEX_BLOCK
_compiled_flex: Optional[Callable] = None


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex() -> Callable:
    """``flex_attention`` compiled once (uncompiled it runs a slow reference); inside a compiled
    model dynamo inlines it into the model's graph."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_attention_padded_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` through FlexAttention, the ``[heads, N, N]`` bias
    added by a ``score_mod``.

    The bias is zero-padded to whole ``FLEX_BLOCK``-token blocks first: the kernel calls the
    score_mod for the padded query and key positions of a partial block as well, and with an
    unpadded bias those indices fall outside it (seen on an H100 with torch 2.11 as a wrong bias
    gradient at 49 tokens). In the padded tensor they address entries that the final slice
    (``F.pad``'s backward) drops. q, k, v: ``[B, heads, N, head_dim]``.
    """
    score_mod = None
    if bias is not None:
        n = bias.shape[-1]
        pad = -(-n // FLEX_BLOCK) * FLEX_BLOCK - n
        padded = F.pad(bias, (0, pad, 0, pad))

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + padded[h, q_idx, kv_idx]

    return _flex()(q, k, v, score_mod=score_mod, scale=scale)
