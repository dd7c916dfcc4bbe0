"""MOAT's attention alone, forward + backward, through each kernel that can run it.

MOAT-0's attention at 224 px runs on 14x14 maps (196 tokens, 12 heads) and 7x7 maps (49 tokens,
24 heads), head dim 32, with a learned relative-position bias as an additive float mask whose
gradient trains the bias table. This times one attention call (forward and backward, q/k/v and
the bias all needing gradients) per variant and checks each against a float32 reference:

- ``efficient aligned``: SDPA's memory-efficient kernel with the bias rows padded to 8 elements,
  as ``models.moat.RelativePositionBias`` lays them out (no copy inside SDPA);
- ``efficient unaligned``: the same kernel with a contiguous ``[heads, N, N]`` bias, which SDPA
  pads (copies) on every call when N is not a multiple of 8;
- ``cudnn``: SDPA's cuDNN backend (where this torch build accepts a float mask there);
- ``math``: ``models.moat.explicit_attention`` (the reference path, softmax in float32);
- ``flex``: ``torch.nn.attention.flex_attention`` compiled, the bias added by a ``score_mod``;
- ``flex, padded bias``: the same with the bias padded to whole 128-token blocks, so the kernel's
  padded positions index inside it;
- ``flash, no bias``: a lower bound that ignores the bias (not MOAT's function).

    python benchmarks/attention_variants.py --device cuda --dtype bf16

Not a unit test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_seconds  # noqa: E402
from models.moat import explicit_attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def aligned_bias(bias: torch.Tensor) -> torch.Tensor:
    """``bias`` as a view into a buffer whose rows are padded to 8 elements."""
    heads, n, _ = bias.shape
    buf = bias.new_zeros(heads, n, -(-n // 8) * 8)
    buf[..., :n] = bias
    return buf[..., :n]


def variants() -> Dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend, align: bool):
        def run(q, k, v, bias, scale):
            mask = (aligned_bias(bias) if align else bias).unsqueeze(0)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

        return run

    def flash(q, k, v, bias, scale):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    out = {
        "efficient aligned": sdpa(SDPBackend.EFFICIENT_ATTENTION, True),
        "efficient unaligned": sdpa(SDPBackend.EFFICIENT_ATTENTION, False),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, True),
        "math": lambda q, k, v, bias, scale: explicit_attention(q, k, v, bias, scale),
        "flash, no bias": flash,
    }
    try:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)

        def flex(q, k, v, bias, scale):
            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[h, q_idx, kv_idx]

            return compiled(q, k, v, score_mod=score_mod, scale=scale)

        out["flex"] = flex

        def flex_padded(q, k, v, bias, scale):
            # The kernel works in blocks of 128 tokens and calls score_mod on the padded positions
            # too: a bias padded to whole blocks keeps those reads (and gradient writes) in bounds.
            n = bias.shape[-1]
            pad = -(-n // 128) * 128 - n
            padded = F.pad(bias, (0, pad, 0, pad))

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + padded[h, q_idx, kv_idx]

            return compiled(q, k, v, score_mod=score_mod, scale=scale)

        out["flex, padded bias"] = flex_padded
    except ImportError:
        pass
    return out


def time_variant(fn, q, k, v, bias, scale, steps: int, device) -> float:
    def once():
        out = fn(q, k, v, bias, scale)
        out.backward(torch.ones_like(out))

    return median_seconds(once, device, repeats=steps)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--shapes", default="12x196,24x49", help="comma list of HEADSxTOKENS (MOAT-0 at 224 px: 12x196,24x49)"
    )
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", default=None, help="comma list of variant names to run")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    table = variants()
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    print(f"device {device.type}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} "
          f"torch {torch.__version__}, {args.dtype}, batch {args.batch_size}, head dim {args.head_dim}")  # fmt: skip
    print("\n| shape | variant | ms fwd+bwd | x efficient aligned | rel. error out | rel. error d(bias) |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        heads, n = (int(s) for s in shape.split("x"))
        scale = args.head_dim**-0.5

        def leaf(*size, std=1.0):
            return (torch.randn(*size, device=device) * std).to(dtype).requires_grad_()

        q, k, v = (leaf(args.batch_size, heads, n, args.head_dim) for _ in range(3))
        bias = leaf(heads, n, n, std=0.5)
        grad_out = torch.randn(args.batch_size, heads, n, args.head_dim, device=device)
        ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
        ref = explicit_attention(*ref_inputs, scale)
        ref.backward(grad_out.double())
        ref_bias_grad = ref_inputs[3].grad
        base = None
        for name, fn in table.items():
            for t in (q, k, v, bias):
                t.grad = None
            try:
                out = fn(q, k, v, bias, scale)
                out.backward(grad_out.to(out.dtype))
                err = ((out.double() - ref).norm() / ref.norm()).item()
                if "no bias" in name:
                    gerr = float("nan")
                else:
                    gerr = ((bias.grad.double() - ref_bias_grad).norm() / ref_bias_grad.norm()).item()
                seconds = time_variant(fn, q, k, v, bias, scale, args.steps, device)
            except Exception as e:  # a backend this build or card lacks: report, go on
                msg = str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__
                print(f"| {shape} | {name} | failed: {msg} | | | |")
                continue
            if name == "efficient aligned":
                base = seconds
            ratio = f"{base / seconds:.2f}" if base else "-"
            print(f"| {shape} | {name} | {seconds * 1e3:.3f} | {ratio} | {err:.1e} | {gerr:.1e} |")


if __name__ == "__main__":
    main()
