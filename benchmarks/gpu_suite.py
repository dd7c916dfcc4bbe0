"""One-shot GPU check: the trainer end to end, the throughput table, a profile, one summary.

Meant for a fresh GPU machine with torch, torchvision and timm preinstalled and no network
(``benchmarks/gpu_suite.sh`` installs carried wheels such as yacs first). Every step runs as a
subprocess with its own time limit, so one failure is reported and the rest still run; the last
thing printed is one table of every step (status, seconds, the numbers that matter).

    python benchmarks/gpu_suite.py                          # CUDA, about 8 minutes on an H100
    python benchmarks/gpu_suite.py --device cpu --quick     # the same plumbing in a minute (tests)

Trainer steps (``main.py`` on a synthetic JPEG folder of ImageNet-sized images): bf16 by
``--amp auto`` for 2 epochs, auto-resume to a third, ``--eval`` of ``best.pth``, fp16 with the
GradScaler, ``--compile``, and a longer MOAT-0 run whose logged step time gives the trainer's
img/s next to the model-only img/s of the throughput table (loader, normalisation, EMA and
logging included). With 2+ GPUs the bf16 run goes through ``torchrun`` (NCCL, SyncBatchNorm).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_TIME_RE = re.compile(r"Train: \[(\d+)/\d+\]\[(\d+)/(\d+)\].*?time [\d.]+ \(([\d.]+)\)")


@dataclass
class Step:
    name: str
    status: str = "skipped"
    seconds: float = 0.0
    result: str = ""
    details: Dict[str, float] = field(default_factory=dict)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("MOAT GPU suite", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the plumbing, measures nothing")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--json", help="also write the summary to this JSON file")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader workers")
    p.add_argument("--skip", default="", help="comma list of step names to skip")
    return p.parse_args(argv)


def run(cmd: List[str], log_path: str, timeout: int, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root, output to ``log_path``; a timeout is a failed step."""
    with open(log_path, "w") as log:
        try:
            return subprocess.run(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired:
            log.write(f"\n[gpu_suite] timed out after {timeout} s\n")
            return subprocess.CompletedProcess(cmd, 124)


def tail(path: str, lines: int = 3) -> str:
    with open(path, errors="replace") as f:
        return " | ".join(line.strip() for line in f.read().splitlines()[-lines:])


def make_jpeg_folder(root: str, classes: int, train: int, val: int, size: tuple) -> str:
    """Class folders of random-texture JPEGs at ImageNet's typical size (quality 90)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c:03d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize(size, Image.BILINEAR)
                img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return root


def trainer_cmd(args, cfg: str, data: str, out: str, *extra: str, launcher: Optional[List[str]] = None) -> List[str]:
    prefix = [sys.executable]
    if launcher:
        prefix += ["-m", "torch.distributed.run", "--standalone", *launcher]
    return [*prefix, "main.py", "--cfg", cfg, "--data-path", data, "--output", out, "--device", args.device, *extra]


def summary_rows(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "summary.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def trainer_img_per_s(log_path: str, batch: int, world: int) -> Optional[float]:
    """Steady-state img/s of the last epoch in a trainer log: the step time between its second
    and its last logged step, from the running averages the log prints (``time val (avg)``)."""
    with open(log_path, errors="replace") as f:
        found = [(int(e), int(i), float(avg)) for e, i, _, avg in STEP_TIME_RE.findall(f.read())]
    last_epoch = [(i, avg) for e, i, avg in found if e == found[-1][0]] if found else []
    if len(last_epoch) < 3:
        return None
    (a, avg_a), (b, avg_b) = last_epoch[1], last_epoch[-1]
    seconds = (avg_b * (b + 1) - avg_a * (a + 1)) / (b - a)
    return batch * world / seconds if seconds > 0 else None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch  # after argparse: --help works without it

    skip = {s for s in args.skip.split(",") if s}
    work = args.work or tempfile.mkdtemp(prefix="moat_gpu_suite_")
    os.makedirs(work, exist_ok=True)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and not gpus:
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    quick = args.quick
    steps: List[Step] = []
    started = time.time()

    def step(name: str) -> Optional[Step]:
        s = Step(name)
        steps.append(s)
        if name in skip:
            return None
        s.status = "running"
        print(f"[gpu_suite] {name} ...", flush=True)
        return s

    def finish(s: Step, ok: bool, result: str, t0: float) -> None:
        s.status, s.result, s.seconds = ("ok" if ok else "FAILED"), result, time.time() - t0
        print(f"[gpu_suite] {s.name}: {s.status} ({s.seconds:.0f} s) {result}", flush=True)

    # -- environment
    s = step("environment")
    t0 = time.time()
    import timm

    env = f"torch {torch.__version__}, timm {timm.__version__}"
    if gpus:
        env += f", {gpus} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            )
            env += f", driver/memory {out.stdout.strip().splitlines()[0] if out.stdout else '?'}"
    finish(s, True, env, t0)

    # -- data
    size = (64, 48) if quick else (500, 375)
    classes, n_train, n_val = (3, 16, 4) if quick else (10, 256, 20)
    img = 32 if quick else 224
    batch = 8 if quick else 128
    data = os.path.join(work, "data")
    s = step("synthetic data")
    t0 = time.time()
    make_jpeg_folder(data, classes, n_train, n_val, size)
    finish(s, True, f"{classes} classes x {n_train} train / {n_val} val JPEGs of {size[0]}x{size[1]}", t0)

    cfg = os.path.join(work, "suite.yaml")
    with open(cfg, "w") as f:
        f.write(
            f"BASE: [{os.path.join(ROOT, 'configs', 'tiny_moat_0.yaml')!r}]\n"
            f"DATA: {{DATASET: imagefolder, IMG_SIZE: {img}, BATCH_SIZE: {batch}, NUM_WORKERS: {args.workers}}}\n"
            f"MODEL: {{NUM_CLASSES: {classes}}}\n"
            "TRAIN: {EPOCHS: 2, WARMUP_EPOCHS: 1}\nPRINT_FREQ: 5\n"
        )
    out = os.path.join(work, "out")
    limit = 300

    # -- trainer: bf16 (auto), resume, eval, fp16, compile
    launcher = [f"--nproc_per_node={gpus}"] if gpus > 1 else None
    s = step("train bf16 (amp auto)")
    if s:
        t0 = time.time()
        log = os.path.join(work, "train_bf16.log")
        proc = run(trainer_cmd(args, cfg, data, out, "--tag", "bf16", launcher=launcher), log, limit)
        rows = summary_rows(os.path.join(out, "tiny_moat_0", "bf16"))
        ok = proc.returncode == 0 and len(rows) == 2
        what = "DDP/NCCL + SyncBatchNorm" if launcher else "1 GPU" if gpus else "CPU"
        result = f"{what}, val top-1 {rows[-1]['val_top1']}" if ok else tail(log)
        finish(s, ok, result, t0)

    s = step("resume to epoch 3")
    if s:
        t0 = time.time()
        log = os.path.join(work, "resume.log")
        cmd = trainer_cmd(args, cfg, data, out, "--tag", "bf16", "--opts", "TRAIN.EPOCHS", "3", launcher=launcher)
        proc = run(cmd, log, limit)
        rows = summary_rows(os.path.join(out, "tiny_moat_0", "bf16"))
        ok = proc.returncode == 0 and [r["epoch"] for r in rows] == ["0", "1", "2"]
        finish(s, ok, "auto-resumed after epoch 1" if ok else tail(log), t0)

    s = step("eval best.pth")
    if s:
        t0 = time.time()
        log = os.path.join(work, "eval.log")
        best = os.path.join(out, "tiny_moat_0", "bf16", "best.pth")
        proc = run(trainer_cmd(args, cfg, data, os.path.join(work, "eval"), "--eval", "--resume", best), log, limit)
        with open(log, errors="replace") as f:
            acc = re.findall(r"\* model Acc@1 ([\d.]+)", f.read())
        finish(s, proc.returncode == 0 and bool(acc), f"top-1 {acc[-1]}" if acc else tail(log), t0)

    s = step("train fp16 (GradScaler)")
    if s:
        t0 = time.time()
        log = os.path.join(work, "train_fp16.log")
        extra = ["--tag", "fp16", "--amp", "fp16", "--opts", "TRAIN.EPOCHS", "1"]
        proc = run(trainer_cmd(args, cfg, data, out, *extra), log, limit)
        ok = proc.returncode == 0
        if ok:
            ckpt = torch.load(os.path.join(out, "tiny_moat_0", "fp16", "last.pth"), weights_only=True)
            scale = float(ckpt["scaler"].get("scale", 0)) if ckpt.get("scaler") else 0.0
            ok = scale > 0
        finish(s, ok, f"loss scale {scale:g}" if ok else tail(log), t0)

    s = step("train --compile")
    if s:
        t0 = time.time()
        log = os.path.join(work, "train_compile.log")
        extra = ["--tag", "compile", "--compile", "--opts", "TRAIN.EPOCHS", "1"]
        proc = run(trainer_cmd(args, cfg, data, out, *extra), log, 600)
        rows = summary_rows(os.path.join(out, "tiny_moat_0", "compile"))
        ok = proc.returncode == 0 and len(rows) == 1
        finish(s, ok, f"train loss {rows[0]['train_loss']}" if ok else tail(log), t0)

    # -- the trainer's own speed vs the model alone
    s = step("trainer img/s (moat_0)")
    if s:
        t0 = time.time()
        log = os.path.join(work, "trainer_speed.log")
        name = "tiny_moat_0" if quick else "moat_0"
        extra = [
            "--tag",
            "speed",
            "--opts",
            "MODEL.NAME",
            name,
            "TRAIN.EPOCHS",
            "2",
            "PRINT_FREQ",
            "2" if quick else "5",
        ]
        proc = run(trainer_cmd(args, cfg, data, out, *extra), log, limit)
        rate = trainer_img_per_s(log, batch, max(1, gpus))
        ok = proc.returncode == 0 and rate is not None
        if ok:
            s.details["trainer_img_per_s"] = rate
        finish(
            s, ok, f"{rate:.0f} img/s (second epoch, batch {batch}, {args.workers} workers)" if ok else tail(log), t0
        )

    # -- model throughput table
    s = step("throughput table")
    if s:
        t0 = time.time()
        log = os.path.join(work, "throughput.log")
        table_json = os.path.join(work, "throughput.json")
        models = (
            "tiny_moat_0,coatnet_nano_rw_224" if quick else "moat_0,coatnet_0_rw_224,tiny_moat_0,coatnet_nano_rw_224"
        )
        cmd = [sys.executable, "benchmarks/model_throughput.py", "--device", args.device, "--models", models,
               "--modes", "train,infer", "--dtype", "fp32" if args.device == "cpu" else "bf16",
               "--channels-last", "on", "--compile", "off" if quick else "off,on",
               "--batch-size", str(2 if quick else batch), "--img-size", "224", "--warmup", "1" if quick else "3",
               "--steps", "1" if quick else "10", "--json", table_json, "--memory", "off" if quick else "on",
               "--baseline", "coatnet_0_rw_224" if not quick else "coatnet_nano_rw_224",
               "--baseline", "coatnet_nano_rw_224"]  # fmt: skip
        proc = run(cmd, log, 600 if not quick else 300)
        ok = proc.returncode == 0
        finish(s, ok, "see the table above" if ok else tail(log), t0)
        if ok:
            with open(log) as f:
                print(f.read())
            trainer_step = next((st for st in steps if st.name == "trainer img/s (moat_0)"), None)
            if trainer_step is not None and "trainer_img_per_s" in trainer_step.details:
                with open(table_json) as f:
                    rows = json.load(f)["rows"]
                name = "tiny_moat_0" if quick else "moat_0"
                model_only = next((r["img_s"] for r in rows if r["model"] == name and r["mode"] == "train"
                                   and not r["compile"]), None)  # fmt: skip
                if model_only:
                    ratio = trainer_step.details["trainer_img_per_s"] / model_only
                    trainer_step.result += f"; {ratio:.2f}x the model-only train row ({model_only:.0f} img/s)"

    s = step("profile moat_0 train")
    if s:
        t0 = time.time()
        log = os.path.join(work, "profile.log")
        name = "tiny_moat_0" if quick else "moat_0"
        cmd = [sys.executable, "benchmarks/profile_model.py", "--model", name, "--mode", "train",
               "--device", args.device, "--batch-size", str(batch), "--img-size", str(img), "--rows", "15"]  # fmt: skip
        proc = run(cmd, log, 300)
        finish(s, proc.returncode == 0, "op table in profile.log" if proc.returncode == 0 else tail(log), t0)
        if proc.returncode == 0:
            with open(log) as f:
                print(f.read())

    # -- summary
    print(f"\nGPU suite summary ({time.time() - started:.0f} s in all; logs in {work})\n")
    print("| step | status | seconds | result |")
    print("|---|---|---:|---|")
    for st in steps:
        print(f"| {st.name} | {st.status} | {st.seconds:.0f} | {st.result} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([st.__dict__ for st in steps], f, indent=1)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(st.status in ("ok", "skipped") for st in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
