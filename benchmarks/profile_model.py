"""Where one step's time goes: ``torch.profiler`` self-CPU/CUDA time per op for train or
inference steps of one model (after warm-up), as the op tables in docs/benchmarks.md quote.

    python benchmarks/profile_model.py --model moat_0 --mode infer --reparam --threads 2
    python benchmarks/profile_model.py --model moat_0 --device cuda --dtype bf16 --batch-size 128
    python benchmarks/profile_model.py --model moat_0 --device cuda --dtype bf16 --compile

With ``--compile`` the rows are the generated kernels (``triton_*``), which shows what inductor
fused and what it left to cuDNN / cuBLAS / the attention kernels.

Not a unit test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm

import models  # noqa: F401 (registers the MOAT variants with timm)
from benchmarks.timing import train_step

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moat_0", help="a MOAT variant or any timm model name")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (fp32: none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--reparam", action="store_true", help="infer only: timm.utils.reparameterize_model first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="profiled steps (times are their sum)")
    p.add_argument("--rows", type=int, default=15, help="ops listed, most expensive first")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = timm.create_model(args.model).to(device, memory_format=fmt)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    dtype = DTYPES[args.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    if args.mode == "train":
        model.train()
        fwd = torch.compile(model) if args.compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        step = train_step(fwd, opt, x, y, autocast)
    else:
        model.eval()
        if args.reparam:
            model = timm.utils.reparameterize_model(model, inplace=True)
        fwd = torch.compile(model) if args.compile else model

        def step() -> None:
            with torch.inference_mode(), autocast():
                fwd(x)

    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(
        f"{args.model} {args.mode}{' reparam' if args.reparam else ''}{' compiled' if args.compile else ''}, "
        f"{args.dtype}, batch {args.batch_size}, {args.img_size} px, "
        f"{'channels_last' if args.channels_last else 'NCHW'}, {args.steps} step(s), "
        f"threads {torch.get_num_threads()}"
    )
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
