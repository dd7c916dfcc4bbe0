"""The stride-2 depthwise convolutions of MOAT's first blocks, with and without their pad copy.

TensorFlow's 'SAME' padding of a 3x3 stride-2 convolution on an even map pads one row and column
at the bottom/right only. torch convolutions pad symmetrically, so the model pads a copy first
(``F.pad``, then the convolution): one more pass over the 4x-expanded tensor, forward and
backward. The same function without the copy: a 4x4 kernel whose first row and column are zero,
with symmetric padding 1 (window ``2j-1 .. 2j+2``, the zero weights on ``2j-1``). This times,
forward and backward after the GELU that precedes the convolution in the block:

- ``pad + conv3x3``: what ``models/moat.py`` does (timm's ``Conv2dSame``);
- ``conv4x4, no pad copy``: the zero-bordered kernel, symmetric padding;
- ``pad + conv3x3, compiled``: inductor, which writes the pad in the GELU's kernel.

    python benchmarks/depthwise_variants.py --device cuda --dtype bf16

Shapes: MOAT-0 at 224 px (channels x input size): 384x112, 768x56, 1536x28, 3072x14.
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pad_then_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.pad(F.gelu(x), (0, 1, 0, 1)), w, stride=2, groups=w.shape[0])


def conv4x4(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """TF 'SAME' stride 2 on even maps with no padded copy (see the module docstring)."""
    return F.conv2d(F.gelu(x), F.pad(w, (1, 0, 1, 0)), stride=2, padding=1, groups=w.shape[0])


def variants(compile_ok: bool = True) -> Dict[str, Callable]:
    out = {"pad + conv3x3": pad_then_conv, "conv4x4, no pad copy": conv4x4}
    if compile_ok:
        out["pad + conv3x3, compiled"] = torch.compile(pad_then_conv, dynamic=False)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shapes", default="384x112,768x56,1536x28,3072x14", help="comma list of CHANNELSxSIZE")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    table = variants(not args.no_compile)
    print(f"device {device.type}, torch {torch.__version__}, {args.dtype}, batch {args.batch_size}, channels_last")
    print("\n| shape | variant | ms fwd+bwd | x pad + conv3x3 | rel. error out | rel. error dx | rel. error dw |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        c, n = (int(v) for v in shape.split("x"))
        x = torch.randn(args.batch_size, c, n, n, device=device).to(dtype=dtype, memory_format=torch.channels_last)
        w = (torch.randn(c, 1, 3, 3, device=device) * 0.3).to(dtype).requires_grad_()
        x.requires_grad_()
        grad = torch.randn(args.batch_size, c, n // 2, n // 2, device=device).to(dtype)
        ref_x, ref_w = (t.detach().double().requires_grad_() for t in (x, w))
        ref = pad_then_conv(ref_x, ref_w)
        ref.backward(grad.double())
        base = None
        for name, fn in table.items():
            x.grad = w.grad = None
            try:
                out = fn(x, w)
                out.backward(grad)
                errs = [((a.double() - b).norm() / b.norm()).item()
                        for a, b in ((out, ref), (x.grad, ref_x.grad), (w.grad, ref_w.grad))]  # fmt: skip
                seconds = median_seconds(lambda f=fn, x=x, w=w, g=grad: f(x, w).backward(g), device, args.steps)
            except Exception as e:  # a variant this build cannot run: report, go on
                print(f"| {shape} | {name} | failed: {str(e).strip().splitlines()[0][:80]} | | | | |")
                continue
            base = base or seconds
            print(f"| {shape} | {name} | {seconds * 1e3:.3f} | {base / seconds:.2f} | "
                  f"{errs[0]:.1e} | {errs[1]:.1e} | {errs[2]:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
