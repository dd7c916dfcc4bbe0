"""CPU data-parallel scaling: total training img/s of N ``torchrun`` processes vs one process.

The question: does ``torchrun --nproc_per_node=2`` on a CPU keep >= 0.9x the total training
throughput of one process using all cores? Each configuration runs as its own job (one plain
process for N=1, ``torchrun --standalone`` for N>1), built from the trainer's own pieces:
``models.build_model``, ``optimizer.build_optimizer`` (AdamW as the trainer builds it), ``utils.amp.NativeScaler``
with gradient clipping, DDP over gloo, the per-update preemption all-reduce, channels_last, and
``utils.distributed.init_distributed``'s thread split (cores // processes per node). The batch
is per process (as ``--batch-size`` is), so N processes train N x batch images per step; data
loading is left out (random tensors) so only the step scales. Configurations alternate for
``--rounds`` rounds so machine drift hits all alike; the table reports the median step time.

    python benchmarks/ddp_scaling.py --model tiny_moat_0 --nprocs 1,2 --batch-size 16 --rounds 3

Not a unit test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNED_MALLOC = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def worker(args: argparse.Namespace) -> None:
    """One rank: time ``--steps`` trainer-style steps after ``--warmup``; rank 0 prints JSON."""
    sys.path.insert(0, ROOT)
    import torch
    import torch.nn as nn

    from config import get_config
    from models import build_model
    from optimizer import build_optimizer
    from utils.amp import NativeScaler
    from utils.distributed import any_rank, init_distributed, teardown

    info = init_distributed("cpu")
    if not info.distributed:
        torch.set_num_threads(args.threads)
    config = get_config().clone()
    config.defrost()
    config.merge_from_list(["MODEL.NAME", args.model, "DATA.IMG_SIZE", args.img_size])
    config.freeze()
    torch.manual_seed(info.rank)
    model = build_model(config).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model, 1e-4)
    scaler = NativeScaler(info.device, enabled=False)
    model_fwd = nn.parallel.DistributedDataParallel(model) if info.distributed else model
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, config.MODEL.NUM_CLASSES, (args.batch_size,))
    params = [p for p in model.parameters() if p.requires_grad]
    times: List[float] = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = criterion(model_fwd(images), targets)
        scaler.backward(loss)
        scaler.step(optimizer, params, config.TRAIN.CLIP_GRAD)
        optimizer.zero_grad(set_to_none=True)
        any_rank(False, info)  # the trainer's per-update preemption check
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if info.is_primary:
        print(
            "RESULT " + json.dumps({"nprocs": info.world_size, "threads": torch.get_num_threads(), "times": times}),
            flush=True,
        )
    del model_fwd
    teardown(info)


def run_config(args: argparse.Namespace, nprocs: int) -> Dict:
    """Launch one configuration and return rank 0's RESULT record."""
    common = [
        "--worker",
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--img-size",
        str(args.img_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    script = os.path.abspath(__file__)
    if nprocs == 1:
        cmd = [sys.executable, script] + common
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nprocs}",
            script,
        ] + common
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # threads are set in the worker (--threads, or cores // processes), not inherited
    if args.malloc == "tuned":
        env["GLIBC_TUNABLES"] = TUNED_MALLOC
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny_moat_0")
    p.add_argument("--nprocs", default="1,2", help="comma-separated process counts; the first is the baseline")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configurations")
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="threads of the single-process run (torchrun runs split the cores)",
    )
    p.add_argument(
        "--malloc",
        choices=["default", "tuned"],
        default="tuned",
        help="'tuned': GLIBC_TUNABLES as in docs/benchmarks.md (finding 1)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return

    counts = [int(n) for n in args.nprocs.split(",")]
    times: Dict[int, List[float]] = {n: [] for n in counts}
    threads: Dict[int, int] = {}
    for r in range(args.rounds):
        for n in counts:
            result = run_config(args, n)
            times[n] += result["times"]
            threads[n] = result["threads"]
            print(
                f"round {r + 1}/{args.rounds}: {n} process(es) x {result['threads']} thread(s): "
                f"median {statistics.median(result['times']) * 1000:.0f} ms/step",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"{args.model}, batch {args.batch_size} per process, {args.img_size} px, fp32, channels_last, "
        f"malloc {args.malloc}, {args.rounds} rounds x {args.steps} steps, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| processes x threads | ms/step (median) | total img/s | x 1st row |")
    print("|---|---:|---:|---:|")
    base = None
    for n in counts:
        med = statistics.median(times[n])
        rate = n * args.batch_size / med
        base = base or rate
        print(f"| {n} x {threads[n]} | {med * 1000:.0f} | {rate:.2f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
