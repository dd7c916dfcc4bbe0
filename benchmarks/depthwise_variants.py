"""MOAT's depthwise convolutions: the pad copy of the stride-2 ones, and the fused kernels.

TensorFlow's 'SAME' padding of a 3x3 stride-2 convolution on an even map pads one row and column
at the bottom/right only. torch convolutions pad symmetrically, so the model pads a copy first
(``F.pad``, then the convolution): one more pass over the 4x-expanded tensor, forward and
backward. The same function without the copy: a 4x4 kernel whose first row and column are zero,
with symmetric padding 1 (window ``2j-1 .. 2j+2``, the zero weights on ``2j-1``). This times,
forward and backward after the GELU that precedes the convolution in the block:

- ``pad + conv3x3``: what ``models/moat.py`` does (timm's ``Conv2dSame``);
- ``conv4x4, no pad copy``: the zero-bordered kernel, symmetric padding;
- ``pad + conv3x3, compiled``: inductor, which writes the pad in the GELU's kernel.

A second table times MBConv's ``conv2_kxk -> norm2 -> act2`` in training mode (BatchNorm with
batch statistics), forward and backward, and checks output and every gradient (input, depthwise
weight, BatchNorm weight and bias) against float64:

- ``modules``: the model's modules (cuDNN convolution, BatchNorm, GELU);
- ``modules, compiled``: the same through inductor;
- ``fused``: ``models/fused_depthwise.py``'s Triton kernels (CUDA; on a CPU only with
  ``TRITON_INTERPRET=1`` set before triton is imported).

Each row also gives its distance from the byte floor (``x floor``): the op's input and output
bytes read/written once, times 3 for forward + backward (``benchmarks/roofline.py``'s
convention), at ``--tbps``.

    python benchmarks/depthwise_variants.py --device cuda --dtype bf16

Shapes: MOAT-0 at 224 px (channels x input size): 384x112, 768x56, 1536x28, 3072x14; the fused
table adds the stride-1 blocks (``384x56s1`` ...).
Not a unit test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_seconds  # noqa: E402
from models.fused_depthwise import fused_dwconv_bn_gelu  # noqa: E402
from models.moat import MBConvBlock  # noqa: E402

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


MOAT0_DEPTHWISE = "384x112s2,384x56s1,768x56s2,768x28s1,1536x28s2,1536x14s1,3072x14s2,3072x7s1"


def fused_variants(compile_ok: bool = True, device_ok: bool = True) -> Dict[str, Callable]:
    """``fn(x, conv, norm, act) -> y`` for each way of running conv -> norm -> act (training)."""

    def modules(x, conv, norm, act):
        return act(norm(conv(x)))

    def fused(x, conv, norm, act):
        return fused_dwconv_bn_gelu(
            x, conv.weight, norm.weight, norm.bias, conv.stride[0], norm.eps,
            norm.running_mean, norm.running_var, norm.num_batches_tracked, norm.momentum,
        )  # fmt: skip

    out = {"modules": modules}
    if compile_ok:
        out["modules, compiled"] = torch.compile(modules, dynamic=False)
    if device_ok:
        out["fused"] = fused
    return out


def fused_table(args, device: torch.device, dtype: torch.dtype) -> None:
    print(f"\n3x3 depthwise -> BatchNorm (batch statistics) -> GELU, forward + backward, "
          f"{args.dtype}, batch {args.batch_size}, channels_last; floor at {args.tbps} TB/s")  # fmt: skip
    print("\n| shape | variant | ms fwd+bwd | x modules | x floor | rel. error out | dx | dw | d gamma | d beta |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # Triton runs on CUDA, or on the CPU in its interpreter (set before triton is imported).
    device_ok = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if not device_ok:
        print("(no fused rows: on a CPU the kernels need TRITON_INTERPRET=1)")
    table = fused_variants(not args.no_compile, device_ok)
    for shape in args.fused_shapes.split(","):
        dims, stride = shape.split("s")
        c, n = (int(v) for v in dims.split("x"))
        stride = int(stride)
        torch._dynamo.reset()  # one compiled entry per shape: stay clear of dynamo's recompile limit
        torch.manual_seed(0)
        block = MBConvBlock(c, c, stride, expand_ratio=1.0, se_ratio=0.0).to(device)
        conv, norm, act = block.conv2_kxk, block.norm2, block.act2
        with torch.no_grad():
            conv.weight.normal_(0, 0.3)
            norm.weight.normal_(1, 0.2)
            norm.bias.normal_(0, 0.2)
        x = torch.randn(args.batch_size, c, n, n, device=device).to(memory_format=torch.channels_last)
        no = -(-n // stride)
        grad = torch.randn(args.batch_size, c, no, no, device=device).to(memory_format=torch.channels_last)
        ref_mods = [m.double() for m in (copy.deepcopy(conv), copy.deepcopy(norm))]
        ref_x = x.double().requires_grad_()
        ref = act(ref_mods[1](ref_mods[0](ref_x)))
        ref.backward(grad.double())
        refs = [ref, ref_x.grad, ref_mods[0].weight.grad, ref_mods[1].weight.grad, ref_mods[1].bias.grad]
        elem = 2 if dtype != torch.float32 else 4
        floor_s = 3 * (x.numel() + grad.numel()) * elem / (args.tbps * 1e12)
        base = None
        for name, fn in table.items():
            params = [conv.weight, norm.weight, norm.bias]
            xin = x.detach().to(dtype).requires_grad_()

            def once(fn=fn, xin=xin, mods=(conv, norm, act), grad=grad):
                with autocast:
                    y = fn(xin, *mods)
                y.backward(grad.to(y.dtype))
                return y

            try:
                for t in [xin, *params]:
                    t.grad = None
                y = once()
                got = [y, xin.grad, *(p.grad for p in params)]
                errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, refs)]
                seconds = median_seconds(once, device, args.steps)
            except Exception as e:  # a variant this build cannot run: report, go on
                msg = str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__
                print(f"| {shape} | {name} | failed: {msg} | | | | | | | |")
                continue
            base = base or seconds
            print(f"| {shape} | {name} | {seconds * 1e3:.3f} | {base / seconds:.2f} | {seconds / floor_s:.1f} | "
                  + " | ".join(f"{e:.1e}" for e in errs) + " |")  # fmt: skip


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shapes", default="384x112,768x56,1536x28,3072x14", help="comma list of CHANNELSxSIZE")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    p.add_argument("--tables", default="pad,fused", help="comma list of pad (the pad copy), fused (the kernels)")
    p.add_argument(
        "--fused-shapes", default=MOAT0_DEPTHWISE, help="comma list of CHANNELSxSIZEsSTRIDE for the fused table"
    )
    p.add_argument("--tbps", type=float, default=3.0, help="copy bandwidth for the floor column (TB/s)")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    tables = args.tables.split(",")
    print(f"device {device.type}, torch {torch.__version__}, {args.dtype}, batch {args.batch_size}, channels_last")
    if "pad" in tables:
        pad_table(args, device, dtype)
    if "fused" in tables:
        fused_table(args, device, dtype)


def pad_table(args, device: torch.device, dtype: torch.dtype) -> None:
    table = variants(not args.no_compile)
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
