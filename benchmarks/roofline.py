"""The two numbers before any GPU timing: arithmetic and the fewest bytes a forward must move.

For each model this counts, per image, the FLOPs of its convolutions, linear layers and attention
and the bytes they must read and write at the given activation width (every input read once,
every output written once, weights once per batch). Norms, activations, pads and adds are taken
as fused into a neighbouring kernel and cost nothing, so the bytes are a floor no compiler beats.
Divided by a card's measured rates (bf16 matrix throughput, device-to-device copy bandwidth),
each gives a floor time; the larger one says what bounds the model. A training step moves about
three times the forward's bytes (forward, input gradient, weight gradient) plus what BatchNorm's
statistics re-read.

    python benchmarks/roofline.py --models moat_0,coatnet_0_rw_224,tiny_moat_0,coatnet_nano_rw_224
    python benchmarks/roofline.py --measure cuda     # the floors at this card's measured rates

The counts run on the meta device: no weights, no arithmetic, seconds on any machine.
``--measure`` first times the two ceilings on a device (a 1 GiB device-to-device copy, bytes read
plus written; an 8192^3 bf16 matrix product on random data, median of 10 after warm-up).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm

import models  # noqa: F401 (registers the MOAT variants with timm)
from benchmarks.timing import median_seconds


def _numel(t: Optional[torch.Tensor]) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


class Tally(TorchFunctionMode):
    """Counts FLOPs and floor bytes of conv / linear / attention calls (activations ``width``
    bytes per element); every other function passes through uncounted."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.flops = 0
        self.bytes = 0
        self.by_kind: Dict[str, List[int]] = {}

    def _add(self, kind: str, flops: int, elements: int) -> None:
        self.flops += flops
        self.bytes += elements * self.width
        acc = self.by_kind.setdefault(kind, [0, 0])
        acc[0] += flops
        acc[1] += elements * self.width

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.conv2d:
            x, w = args[0], args[1]
            groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
            kind = "depthwise conv" if groups > 1 and groups == x.shape[1] else "conv"
            flops = 2 * out.numel() * (w.shape[1] * w.shape[2] * w.shape[3])
            self._add(kind, flops, x.numel() + w.numel() + out.numel())
        elif func is F.linear:
            x, w = args[0], args[1]
            self._add("linear", 2 * out.numel() * w.shape[1], x.numel() + w.numel() + out.numel())
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            flops = 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
            self._add("attention", flops, q.numel() + k.numel() + v.numel() + _numel(mask) + out.numel())
        return out


def tally(name: str, batch: int, img_size: int, width: int) -> Tally:
    try:
        with torch.device("meta"):
            model = timm.create_model(name)
    except NotImplementedError:  # some models' init reads tensor data (older timm/torch)
        model = timm.create_model(name).to("meta")
    model.eval()
    x = torch.empty(batch, 3, img_size, img_size, device="meta")
    mode = Tally(width)
    with torch.no_grad(), mode:
        model(x)
    return mode


def measure_ceilings(device: torch.device, copy_bytes: int = 2**30, matmul_size: int = 8192) -> Tuple[float, float]:
    """(TB/s, TFLOP/s) on ``device``: copy bandwidth counting bytes read and written, and the
    bf16 matrix-product rate on random data (zeros run faster than real data on some cards)."""
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), device)
    a, b = (torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_s = median_seconds(lambda: a @ b, device)
    return 2 * copy_bytes / copy_s / 1e12, 2 * matmul_size**3 / mm_s / 1e12


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="moat_0,coatnet_0_rw_224,tiny_moat_0,coatnet_nano_rw_224")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--bytes-per-element", type=int, default=2, help="activation width (2: bf16/fp16)")
    p.add_argument("--tflops", type=float, default=798.0, help="matrix throughput, TFLOP/s (H100 bf16, measured)")
    p.add_argument("--tbps", type=float, default=3.0, help="copy bandwidth, TB/s read+written (H100, measured)")
    p.add_argument("--baseline", default="coatnet_0_rw_224")
    p.add_argument("--measure", metavar="DEVICE", help="measure --tflops and --tbps on this device first")
    p.add_argument("--matmul-size", type=int, default=8192, help="with --measure: the square product's size")
    p.add_argument("--copy-mib", type=int, default=1024, help="with --measure: the copied buffer's MiB")
    args = p.parse_args(argv)
    if args.measure:
        device = torch.device(args.measure)
        args.tbps, args.tflops = measure_ceilings(device, args.copy_mib * 2**20, args.matmul_size)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"measured on {name}: copy {args.tbps:.2f} TB/s, bf16 matrix product {args.tflops:.0f} TFLOP/s")
    names = [n for n in args.models.split(",") if n]
    results = {n: tally(n, args.batch_size, args.img_size, args.bytes_per_element) for n in names}
    b = args.batch_size
    print(f"forward at {args.img_size} px, batch {b}, {args.bytes_per_element}-byte activations; "
          f"floors at {args.tflops:.0f} TFLOP/s and {args.tbps:.2f} TB/s\n")  # fmt: skip
    head = "| model | GFLOPs/img | MB/img (floor) | FLOP/byte | ms floor, math | ms floor, memory | bytes x baseline |"
    print(head + "\n|---|---:|---:|---:|---:|---:|---:|")
    base = results.get(args.baseline)
    for n, t in results.items():
        ratio = f"{t.bytes / base.bytes:.2f}" if base else "-"
        print(f"| {n} | {t.flops / b / 1e9:.2f} | {t.bytes / b / 1e6:.1f} | {t.flops / t.bytes:.0f} | "
              f"{t.flops / args.tflops / 1e9:.2f} | {t.bytes / args.tbps / 1e9:.2f} | {ratio} |")  # fmt: skip
    print("\n| model | kind | GFLOPs/img | MB/img |\n|---|---|---:|---:|")
    for n, t in results.items():
        for kind, (flops, nbytes) in sorted(t.by_kind.items(), key=lambda kv: -kv[1][1]):
            print(f"| {n} | {kind} | {flops / b / 1e9:.2f} | {nbytes / b / 1e6:.1f} |")


if __name__ == "__main__":
    main()
