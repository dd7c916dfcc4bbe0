"""One-shot GPU check: the speed levers, the throughput table, profiles, the trainer end to end.

Meant for a fresh GPU machine with torch, torchvision and timm preinstalled and no network
(``benchmarks/gpu_suite.sh`` installs carried wheels such as yacs first). Every step runs as a
subprocess with its own time limit, so one failure is reported and the rest still run. Steps run
in order of what a short GPU lease most needs (speed first) and ``--budget`` skips those that
would not fit; the last thing printed is one table of every step (status, seconds, result).

    python benchmarks/gpu_suite.py --budget 570 --logs $OUT # the speed decisions first, ~9.5 minutes
    python benchmarks/gpu_suite.py --only "lever 1: max-autotune" --logs $OUT   # one step
    python benchmarks/gpu_suite.py --device cpu --quick     # the same plumbing at toy sizes (tests)

Steps, in order of what a short GPU lease most needs (decisions first): the card's copy bandwidth
and matrix rate with the models' floors at them (``roofline.py --measure``); the fused depthwise
kernels against the model's modules, eager and compiled, per MOAT-0 shape (numerics checked:
the step fails if a fused error exceeds twice the modules'); MOAT's attention through the
efficient kernel and FlexAttention (unpadded and block-padded bias, the bias gradient checked);
the levers table: MOAT-0 and CoAtNet-0 training, eager and compiled, and MOAT-0 compiled with each
lever (fused depthwise, FlexAttention, 1x1 convs as linear), interleaved in one run; lever 1:
MOAT-0 compiled with ``max-autotune-no-cudagraphs`` and ``max-autotune`` (compile time measured)
and the 1x1-as-linear variant under autotuning; then the standing checks: ``main.py`` on a
synthetic folder of ImageNet-sized JPEGs with the shipped default recipe (MOAT-0 for an epoch
with ``--amp auto`` and ``--sync-debug``, through ``torchrun`` with NCCL and SyncBatchNorm on 2+
GPUs, and with ``--compile``, each giving the trainer's img/s); the model-only throughput table
(inference and the tiny models); auto-resume; ``--eval`` of ``best.pth``; fp16 with the
GradScaler; profiles; the depthwise pad-copy table. Every throughput row is also printed with
its distance from its byte floor (ms measured / ms floor, forward floor x 3 for training), and
the summary ends with the lever decisions.
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
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every model of the throughput table trains with MOAT-0's recipe rate, as the trainer rows do.
DROP_PATH = "0.2"
STEP_TIME_RE = re.compile(r"Train: \[(\d+)/\d+\]\[(\d+)/(\d+)\].*?time [\d.]+ \(([\d.]+)\)")
CEILINGS_RE = re.compile(r"copy ([\d.]+) TB/s, bf16 matrix product ([\d.]+) TFLOP/s")
# A lever is worth turning on when its row beats the plain compiled row of the same run by more
# than run-to-run noise (interleaved rows on one card: about 1-2 %).
LEVER_GAIN = 1.02
# The fused kernels' errors against float64 may be at most this multiple of the modules' (plus
# 1e-3 absolute, for errors at the float32 rounding level).
FUSED_ERROR_FACTOR = 2.0


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
    p.add_argument("--logs", help="folder to keep every step's log in (logs.tar.gz, refreshed after each step)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader workers")
    p.add_argument("--skip", default="", help="comma list of step names to skip")
    p.add_argument("--only", default="", help="comma list of step names: run only these")
    p.add_argument(
        "--budget", type=float, default=0, help="seconds: skip steps whose estimate no longer fits (0: no limit)"
    )
    return p.parse_args(argv)


def run(cmd: List[str], log_path: str, timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root, output to ``log_path``; a timeout is a failed step."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            return subprocess.run(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired:
            log.write(f"\n[gpu_suite] timed out after {timeout:.0f} s\n")
            return subprocess.CompletedProcess(cmd, 124)


def tail(path: str, lines: int = 3) -> str:
    with open(path, errors="replace") as f:
        return " | ".join(line.strip() for line in f.read().splitlines()[-lines:])


def _write_class(args) -> None:
    import numpy as np
    from PIL import Image

    folder, seed, count, size = args
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.BILINEAR)
        img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def make_jpeg_folder(root: str, classes: int, train: int, val: int, size: tuple, workers: int = 1) -> str:
    """Class folders of random-texture JPEGs at ImageNet's typical size (quality 90)."""
    jobs = [
        (os.path.join(root, split, f"class_{c:03d}"), seed * 1000 + c, count, size)
        for seed, (split, count) in enumerate((("train", train), ("val", val)))
        for c in range(classes)
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_class, jobs))
    else:
        for job in jobs:
            _write_class(job)
    return root


def model_base(name: str) -> str:
    """``moat_0+fused_depthwise`` -> ``moat_0`` (options change kernels, not the function)."""
    return name.split("+")[0]


def floor_ms(model: str, mode: str, batch: int, img: int, width: int, tbps: float) -> float:
    """The byte floor of one step (``roofline.py``: the forward's fewest bytes at ``tbps``; a
    training step three times that)."""
    sys.path.insert(0, ROOT)
    from benchmarks.roofline import tally

    forward = tally(model_base(model), batch, img, width).bytes / (tbps * 1e12) * 1e3
    return forward * (3 if mode == "train" else 1)


def floor_table(rows: Iterable[dict], floors: Dict[tuple, float]) -> List[str]:
    """Markdown lines: each throughput row's ms/step, its floor and the distance (measured /
    floor). ``floors`` maps (model, mode) to floor ms."""
    out = ["| row | ms/step | ms floor | x floor |", "|---|---:|---:|---:|"]
    for r in rows:
        floor = floors.get((r["model"], r["mode"]))
        if floor:
            out.append(f"| {r['label']} | {r['ms_step']:.1f} | {floor:.2f} | {r['ms_step'] / floor:.1f} |")
    return out


def _find(rows: List[dict], model: str, compiled: bool, compile_mode: str = "default") -> Optional[dict]:
    for r in rows:
        if r["model"] == model and r["mode"] == "train" and bool(r["compile"]) == compiled:
            if not compiled or r.get("compile_mode", "default") == compile_mode:
                return r
    return None


def lever_decisions(rows: List[dict], moat: str, coatnet: str = "") -> List[str]:
    """The targets and each lever's verdict from training rows of one interleaved run: MOAT
    compiled against CoAtNet eager (target >= 1.0, stretch 1.25) and compiled (>= 0.70); every
    other compiled MOAT row against the plain MOAT row compiled in the same mode (a lever), or a
    plain row in another mode against the default mode (lever 1). On when it gains more than
    ``LEVER_GAIN`` - 1; peak memory and first-step (compile) time beside."""
    out = []
    base = _find(rows, moat, True)
    for compiled, target in ((False, "target >= 1.00, stretch 1.25"), (True, "target >= 0.70")):
        ref = _find(rows, coatnet, compiled) if coatnet else None
        if base and ref:
            what = "compiled" if compiled else "eager"
            out.append(f"- {moat} compiled / {coatnet} {what}: {base['img_s'] / ref['img_s']:.2f}x ({target})")
    for r in rows:
        if r["mode"] != "train" or not r["compile"] or model_base(r["model"]) != moat or r is base:
            continue
        mode = r.get("compile_mode", "default")
        ref = _find(rows, moat, True, mode) if r["model"] != moat else base
        if ref is None:
            continue
        ratio = r["img_s"] / ref["img_s"]
        mem = r.get("peak_mib", float("nan")) / ref.get("peak_mib", float("nan"))
        verdict = "ON (gains)" if ratio >= LEVER_GAIN else "off (no gain beyond noise)"
        out.append(
            f"- {r['label']}: {ratio:.3f}x {ref['label']}, peak memory {mem:.2f}x, first step "
            f"{r.get('first_step_s', float('nan')):.0f} s vs {ref.get('first_step_s', float('nan')):.0f} s: {verdict}"
        )
    return out


def fused_kernel_check(text: str) -> tuple:
    """(ok, message) from ``depthwise_variants.py``'s fused table: every error of the ``fused``
    rows within ``FUSED_ERROR_FACTOR`` x the ``modules`` row's of the same shape + 1e-3."""
    rows: Dict[tuple, List[float]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[1] in ("modules", "fused") and "failed" not in cells[2]:
            try:
                rows[(cells[0], cells[1])] = [float(c) for c in cells[5:]]
            except ValueError:
                continue
    shapes = sorted({shape for shape, _ in rows})
    if not shapes or not all((shape, "fused") in rows and (shape, "modules") in rows for shape in shapes):
        return False, "no fused rows to compare (see the log)"
    worst = max(
        f / (FUSED_ERROR_FACTOR * m + 1e-3)
        for shape in shapes
        for f, m in zip(rows[(shape, "fused")], rows[(shape, "modules")])
    )
    return worst <= 1.0, f"fused errors at {worst:.2g} of the allowed bound ({len(shapes)} shapes)"


def summary_rows(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "summary.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def trainer_img_per_s(log_path: str, batch: int, world: int) -> Optional[float]:
    """Steady-state img/s of the last epoch in a trainer log: the step time between a logged step
    a quarter into the epoch (loader workers started, kernels chosen) and the last logged step,
    from the running averages the log prints (``time val (avg)``)."""
    with open(log_path, errors="replace") as f:
        found = [(int(e), int(i), int(n), float(avg)) for e, i, n, avg in STEP_TIME_RE.findall(f.read())]
    if not found:
        return None
    last_epoch = [(i, avg) for e, i, n, avg in found if e == found[-1][0]]
    steps = found[-1][2]
    later = [(i, avg) for i, avg in last_epoch if i >= max(1, steps // 4)]
    if len(later) < 2:
        return None
    (a, avg_a), (b, avg_b) = later[0], later[-1]
    seconds = (avg_b * (b + 1) - avg_a * (a + 1)) / (b - a)
    return batch * world / seconds if seconds > 0 else None


class Suite:
    """The steps, their shared paths and sizes, and the summary they fill in."""

    def __init__(self, args: argparse.Namespace, gpus: int) -> None:
        self.args, self.gpus, self.quick = args, gpus, args.quick
        self.work = args.work or tempfile.mkdtemp(prefix="moat_gpu_suite_")
        os.makedirs(self.work, exist_ok=True)
        self.steps: List[Step] = []
        self.started = time.time()
        self.skip = {s for s in args.skip.split(",") if s}
        self.only = {s for s in args.only.split(",") if s}
        q = self.quick
        self.img = 32 if q else 224
        self.batch = 8 if q else 128
        self.moat = "tiny_moat_0" if q else "moat_0"
        self.data = os.path.join(self.work, "data")
        self.cfg = os.path.join(self.work, "suite.yaml")
        self.out = os.path.join(self.work, "out")
        self.launcher = [f"--nproc_per_node={gpus}"] if gpus > 1 else None
        self.model_only: Dict[tuple, float] = {}  # (model, compiled) -> model-only train img/s
        self.tbps: Optional[float] = None  # measured by the roofline step
        self.decisions: List[str] = []

    # -- bookkeeping
    def remaining(self) -> float:
        if not self.args.budget:
            return float("inf")
        return self.args.budget - (time.time() - self.started)

    def attempt(self, name: str, estimate: float, body: Callable[[Step, float], None]) -> None:
        """Run ``body(step, time_limit)`` unless skipped or out of budget; record the outcome."""
        s = Step(name)
        self.steps.append(s)
        if name in self.skip or (self.only and name not in self.only):
            return
        left = self.remaining()
        if estimate > left:
            s.result = f"out of budget (needs ~{estimate:.0f} s, {max(0, left):.0f} s left)"
            print(f"[gpu_suite] {name}: skipped, {s.result}", flush=True)
            return
        s.status = "running"
        print(f"[gpu_suite] {name} ...", flush=True)
        t0 = time.time()
        try:
            body(s, min(left, 900))
        except Exception as e:  # a broken step must not cost the remaining ones
            s.status, s.result = "FAILED", f"{type(e).__name__}: {e}"
        s.seconds = time.time() - t0
        print(f"[gpu_suite] {s.name}: {s.status} ({s.seconds:.0f} s) {s.result}", flush=True)
        self.keep_logs()

    def done(self, s: Step, ok: bool, result: str) -> None:
        s.status, s.result = ("ok" if ok else "FAILED"), result

    def log(self, name: str) -> str:
        return os.path.join(self.work, name + ".log")

    def keep_logs(self) -> None:
        if not self.args.logs:
            return
        os.makedirs(self.args.logs, exist_ok=True)
        with tarfile.open(os.path.join(self.args.logs, "logs.tar.gz"), "w:gz") as tar:
            for name in sorted(os.listdir(self.work)):
                if name.endswith(".log"):
                    tar.add(os.path.join(self.work, name), arcname=name)

    def trainer(self, *extra: str, launcher: Optional[List[str]] = None) -> List[str]:
        prefix = [sys.executable]
        if launcher:
            prefix += ["-m", "torch.distributed.run", "--standalone", *launcher]
        cmd = ["main.py", "--cfg", self.cfg, "--data-path", self.data, "--output", self.out]
        return [*prefix, *cmd, "--device", self.args.device, *extra]

    def run_dir(self, tag: str, model: str = "tiny_moat_0") -> str:
        """OUTPUT/MODEL.NAME/TAG of a trainer run (the suite's config trains tiny_moat_0)."""
        return os.path.join(self.out, model, tag)

    def add_model_only_ratios(self) -> None:
        """Trainer img/s per GPU next to the throughput table's model-only train row (same model,
        same compile setting), once both steps have run."""
        for st in self.steps:
            rate, ref = st.details.get("trainer_img_per_s"), None
            if rate is not None:
                ref = self.model_only.get((self.moat, bool(st.details["compiled"])))
            if ref:
                st.result += f"; {rate / ref:.2f}x the model-only train row ({ref:.0f} img/s)"

    # -- steps
    def environment(self, s: Step, limit: float) -> None:
        import timm
        import torch

        env = f"torch {torch.__version__}, timm {timm.__version__}"
        if self.gpus:
            env += f", {self.gpus} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
            smi = shutil.which("nvidia-smi")
            if smi:
                out = subprocess.run(
                    [smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                )
                env += f", driver/memory {out.stdout.strip().splitlines()[0] if out.stdout else '?'}"
        env += f", {os.cpu_count()} CPUs"
        self.done(s, True, env)

    def roofline(self, s: Step, limit: float) -> None:
        """The card's two ceilings, measured, and the floors of the table's models at them."""
        log = self.log("roofline")
        cmd = [sys.executable, "benchmarks/roofline.py", "--measure", self.args.device]
        if self.quick:
            cmd += ["--matmul-size", "256", "--copy-mib", "16", "--models", "tiny_moat_0", "--baseline", "tiny_moat_0"]
        proc = run(cmd, log, limit)
        with open(log, errors="replace") as f:
            text = f.read()
        measured = re.findall(r"measured on .*", text)
        self.done(s, proc.returncode == 0 and bool(measured), measured[-1] if measured else tail(log))
        ceilings = CEILINGS_RE.findall(text)
        if ceilings:
            self.tbps = float(ceilings[-1][0])
        if proc.returncode == 0:
            print(text)

    def synthetic_data(self, s: Step, limit: float) -> None:
        size = (64, 48) if self.quick else (500, 375)
        classes, n_train, n_val = (3, 16, 4) if self.quick else (10, 640, 20)
        make_jpeg_folder(self.data, classes, n_train, n_val, size, workers=1 if self.quick else self.args.workers)
        with open(self.cfg, "w") as f:
            f.write(
                f"BASE: [{os.path.join(ROOT, 'configs', 'tiny_moat_0.yaml')!r}]\n"
                f"DATA: {{DATASET: imagefolder, IMG_SIZE: {self.img}, BATCH_SIZE: {self.batch}, "
                f"NUM_WORKERS: {self.args.workers}}}\n"
                f"MODEL: {{NUM_CLASSES: {classes}}}\n"
                "TRAIN: {EPOCHS: 2, WARMUP_EPOCHS: 1}\nPRINT_FREQ: 5\n"
            )
        self.done(s, True, f"{classes} classes x {n_train} train / {n_val} val JPEGs of {size[0]}x{size[1]}")

    def throughput(self, s: Step, limit: float) -> None:
        """The model-only throughput table (inference and the tiny models; MOAT-0/CoAtNet-0 training
        is the levers table's)."""
        log, table_json = self.log("throughput"), os.path.join(self.work, "throughput.json")
        if self.quick:
            models, compiled, base = "tiny_moat_0,coatnet_nano_rw_224", ["--compile", "off"], "coatnet_nano_rw_224"
        else:
            models, base = "moat_0,coatnet_0_rw_224,tiny_moat_0,coatnet_nano_rw_224", "coatnet_0_rw_224"
            wanted = "tiny_moat_0:train,coatnet_0_rw_224:infer,moat_0:infer"
            compiled = ["--compile", "off,on", "--compiled-models", wanted]
        cmd = [sys.executable, "benchmarks/model_throughput.py", "--device", self.args.device, "--models", models,
               "--modes", "train,infer", "--dtype", self.dtype,
               "--channels-last", "on", *compiled, "--batch-size", str(2 if self.quick else self.batch),
               "--img-size", "224", "--warmup", "1" if self.quick else "3",
               "--steps", "1" if self.quick else "10",
               "--json", table_json, "--memory", "off" if self.quick else "on", "--drop-path-rate", DROP_PATH,
               "--baseline", f"{base}:eager", "--baseline", "coatnet_nano_rw_224:eager"]  # fmt: skip
        proc = run(cmd, log, limit)
        self.done(s, proc.returncode == 0, "see the table above" if proc.returncode == 0 else tail(log))
        if proc.returncode == 0:
            with open(log) as f:
                print(f.read())
            with open(table_json) as f:
                rows = json.load(f)["rows"]
            for r in rows:
                if r["mode"] == "train":
                    self.model_only.setdefault((r["model"], r["compile"]), r["img_s"])
            self.print_floors(rows, 224, 2 if self.quick else self.batch)

    @property
    def width(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    def print_floors(self, rows: List[dict], img: int, batch: int) -> None:
        """Each row's distance from its byte floor at the measured bandwidth."""
        tbps = self.tbps or 3.0
        floors = {}
        for r in rows:
            key = (r["model"], r["mode"])
            if key not in floors:
                floors[key] = floor_ms(r["model"], r["mode"], batch, img, self.width, tbps)
        source = "measured" if self.tbps else "assumed (no roofline step)"
        print(f"\nDistance from the byte floor ({tbps:.2f} TB/s {source}, {self.width}-byte activations):\n")
        print("\n".join(floor_table(rows, floors)) + "\n")

    def _throughput_step(self, s: Step, name: str, cmd: List[str], limit: float, img: int, batch: int) -> List[dict]:
        """Run ``model_throughput.py`` (``cmd`` without --json), print its table and the floor
        distances; returns its rows."""
        log, table_json = self.log(name), os.path.join(self.work, name + ".json")
        proc = run(cmd + ["--json", table_json], log, limit)
        self.done(s, proc.returncode == 0, "see the table above" if proc.returncode == 0 else tail(log))
        if proc.returncode != 0:
            return []
        with open(log) as f:
            print(f.read())
        with open(table_json) as f:
            rows = json.load(f)["rows"]
        self.print_floors(rows, img, batch)
        for r in rows:
            if r["mode"] == "train" and r.get("compile_mode", "default") == "default":
                self.model_only.setdefault((r["model"], r["compile"]), r["img_s"])
        return rows

    def _models_cmd(self, models: str, extra: List[str]) -> List[str]:
        img, batch = (224, 2) if self.quick else (224, self.batch)
        return [sys.executable, "benchmarks/model_throughput.py", "--device", self.args.device, "--models", models,
                "--modes", "train", "--dtype", self.dtype, "--channels-last", "on",
                "--batch-size", str(batch), "--img-size", str(img), "--warmup", "1" if self.quick else "2",
                "--steps", "1" if self.quick else "10", "--memory", "off" if self.quick else "on",
                "--drop-path-rate", DROP_PATH, *extra]  # fmt: skip

    def levers(self, s: Step, limit: float) -> None:
        """MOAT-0 against CoAtNet-0 (eager and compiled) and MOAT-0 compiled with each lever, one
        interleaved run; the decisions go to the summary."""
        moat, coat = ("tiny_moat_0", "coatnet_nano_rw_224") if self.quick else ("moat_0", "coatnet_0_rw_224")
        variants = [f"{moat}+fused_depthwise", f"{moat}+flex_attention", f"{moat}+linear_1x1"]
        models = ",".join([coat, moat, *variants])
        if self.quick:  # plumbing only: compiling takes minutes on a CPU
            extra = ["--compile", "off", "--eager-models", f"{coat},{moat},{variants[0]}"]
        else:
            extra = ["--compile", "off,on", "--eager-models", f"{coat},{moat},{variants[0]}",
                     "--compiled-models", models]  # fmt: skip
        extra += ["--baseline", f"{coat}:train:eager", "--baseline", f"{coat}:train:compiled",
                  "--baseline", f"{moat}:train:compiled"]  # fmt: skip
        rows = self._throughput_step(
            s, "levers", self._models_cmd(models, extra), limit, 224, 2 if self.quick else self.batch
        )
        self.decisions += lever_decisions(rows, moat, coat)

    def autotune(self, s: Step, limit: float) -> None:
        """Lever 1: ``max-autotune-no-cudagraphs`` and ``max-autotune`` against the default mode,
        and the 1x1-as-linear variant under autotuning (where its matmuls get Triton templates)."""
        moat = "tiny_moat_0" if self.quick else "moat_0"
        modes = ["default", "max-autotune-no-cudagraphs", "max-autotune"]
        wanted = [f"{moat}:train:{m}" for m in modes] + [f"{moat}+linear_1x1:train:max-autotune-no-cudagraphs"]
        extra = ["--compile", "on", "--compile-mode", ",".join(modes), "--compiled-models", ",".join(wanted),
                 "--baseline", f"{moat}:train:compiled:default"]  # fmt: skip
        rows = self._throughput_step(
            s,
            "autotune",
            self._models_cmd(f"{moat},{moat}+linear_1x1", extra),
            limit,
            224,
            2 if self.quick else self.batch,
        )
        self.decisions += [
            line for line in lever_decisions(rows, moat, "") if not line.startswith(f"- {moat} compiled /")
        ]

    def fused_kernels(self, s: Step, limit: float) -> None:
        """The fused depthwise kernels against the modules per MOAT-0 shape: time, distance from
        the floor, and the numerics (the step fails on a fused error beyond the bound)."""
        cmd = [sys.executable, "benchmarks/depthwise_variants.py", "--device", self.args.device, "--dtype", self.dtype,
               "--tables", "fused", "--tbps", f"{self.tbps or 3.0:.3f}"]  # fmt: skip
        if self.quick:
            cmd += ["--batch-size", "2", "--steps", "1", "--fused-shapes", "16x9s1,16x8s2", "--no-compile"]
        log = self.log("fused_kernels")
        # On a CPU the kernels run only in Triton's interpreter, set before triton is imported.
        env = dict(os.environ, TRITON_INTERPRET="1") if self.args.device == "cpu" else None
        proc = run(cmd, log, limit, env=env)
        with open(log, errors="replace") as f:
            text = f.read()
        ok, message = fused_kernel_check(text)
        self.done(s, proc.returncode == 0 and ok, message if proc.returncode == 0 else tail(log))
        self.decisions.append(f"- fused depthwise numerics on this card: {message}")
        print(text)

    def _table_step(self, s: Step, name: str, cmd: List[str], limit: float) -> None:
        """Run a benchmark script whose output is a table, and print the table."""
        log = self.log(name)
        proc = run(cmd, log, limit)
        self.done(s, proc.returncode == 0, "table above" if proc.returncode == 0 else tail(log))
        if proc.returncode == 0:
            with open(log) as f:
                print(f.read())

    @property
    def dtype(self) -> str:
        return "fp32" if self.args.device == "cpu" else "bf16"

    def profile(self, s: Step, limit: float, compiled: bool) -> None:
        cmd = [sys.executable, "benchmarks/profile_model.py", "--model", self.moat, "--mode", "train",
               "--device", self.args.device, "--batch-size", str(self.batch), "--img-size", str(self.img),
               "--dtype", self.dtype, "--steps", "1" if self.quick else "3",
               "--rows", "25" if compiled else "20"] + (["--compile"] if compiled else [])  # fmt: skip
        self._table_step(s, "profile_compiled" if compiled else "profile", cmd, limit)

    def attention(self, s: Step, limit: float) -> None:
        """The efficient kernel (the model's) and FlexAttention with the unpadded and the
        block-padded bias: lever 4's speed and its bias gradient."""
        cmd = [sys.executable, "benchmarks/attention_variants.py", "--device", self.args.device, "--dtype", self.dtype,
               "--only", "efficient aligned,math,flex,flex, padded bias"]  # fmt: skip
        if self.quick:
            cmd = cmd[:-2] + ["--batch-size", "2", "--steps", "1", "--shapes", "2x49", "--only", "math"]
        self._table_step(s, "attention", cmd, limit)

    def depthwise(self, s: Step, limit: float) -> None:
        cmd = [sys.executable, "benchmarks/depthwise_variants.py", "--device", self.args.device, "--dtype", self.dtype,
               "--tables", "pad"]  # fmt: skip
        if self.quick:
            cmd += ["--batch-size", "2", "--steps", "1", "--shapes", "8x14", "--no-compile"]
        self._table_step(s, "depthwise", cmd, limit)

    def _speed_opts(self, *opts: str) -> List[str]:
        """One epoch of MOAT-0 (``self.moat``) with the recipe of the suite's config."""
        return [
            "--opts",
            "MODEL.NAME",
            self.moat,
            "TRAIN.EPOCHS",
            "1",
            "PRINT_FREQ",
            "2" if self.quick else "10",
            *opts,
        ]

    def _rate(self, s: Step, log: str, compiled: bool, world: int = 1) -> Optional[str]:
        """The trainer's steady img/s (all ``world`` processes) from its log; per GPU it is
        kept for the model-only ratio."""
        rate = trainer_img_per_s(log, self.batch, world)
        if rate is None:
            return None
        s.details.update(trainer_img_per_s=rate / world, compiled=float(compiled))
        per_gpu = f", {rate / world:.0f} per GPU" if world > 1 else ""
        return f"{rate:.0f} img/s{per_gpu} (batch {self.batch}/GPU, {self.args.workers} workers)"

    def train_bf16(self, s: Step, limit: float) -> None:
        """``--amp auto`` (bf16) with ``--sync-debug``: the trainer's img/s (loader, device
        normalisation, Mixup/CutMix, EMA and logging included) and any host sync per step."""
        log = self.log("train_bf16")
        cmd = self.trainer("--tag", "bf16", "--sync-debug", *self._speed_opts(), launcher=self.launcher)
        proc = run(cmd, log, limit)
        world = self.gpus if self.launcher else 1
        rows, rate = summary_rows(self.run_dir("bf16", self.moat)), self._rate(s, log, compiled=False, world=world)
        with open(log, errors="replace") as f:
            syncs = [line.split("sync debug: ", 1)[1].strip() for line in f if "sync debug: " in line]
        ok = proc.returncode == 0 and len(rows) == 1 and rate is not None
        what = "DDP/NCCL + SyncBatchNorm" if self.launcher else "1 GPU" if self.gpus else "CPU"
        sync_note = f"; {syncs[-1]}" if syncs else ""
        self.done(s, ok, f"{what}, {rate}, val top-1 {rows[-1]['val_top1']}{sync_note}" if ok else tail(log))

    def train_compiled(self, s: Step, limit: float) -> None:
        log = self.log("train_compile")
        proc = run(self.trainer("--tag", "compile", *self._speed_opts("TRAIN.COMPILE", "True")), log, limit)
        rate = self._rate(s, log, compiled=True)
        ok = proc.returncode == 0 and rate is not None
        self.done(s, ok, rate if ok else tail(log))

    def resume(self, s: Step, limit: float) -> None:
        log = self.log("resume")
        opts = self._speed_opts()
        opts[opts.index("TRAIN.EPOCHS") + 1] = "2"
        proc = run(self.trainer("--tag", "bf16", *opts, launcher=self.launcher), log, limit)
        rows = summary_rows(self.run_dir("bf16", self.moat))
        ok = proc.returncode == 0 and [r["epoch"] for r in rows] == ["0", "1"]
        self.done(s, ok, "auto-resumed after epoch 0" if ok else tail(log))

    def eval_best(self, s: Step, limit: float) -> None:
        log = self.log("eval")
        best = os.path.join(self.run_dir("bf16", self.moat), "best.pth")
        cmd = self.trainer("--eval", "--resume", best, "--opts", "MODEL.NAME", self.moat)
        cmd[cmd.index("--output") + 1] = os.path.join(self.work, "eval")
        proc = run(cmd, log, limit)
        with open(log, errors="replace") as f:
            acc = re.findall(r"\* model Acc@1 ([\d.]+)", f.read())
        self.done(s, proc.returncode == 0 and bool(acc), f"top-1 {acc[-1]}" if acc else tail(log))

    def train_fp16(self, s: Step, limit: float) -> None:
        import torch

        log = self.log("train_fp16")
        proc = run(self.trainer("--tag", "fp16", "--amp", "fp16", "--opts", "TRAIN.EPOCHS", "1"), log, limit)
        scale = 0.0
        if proc.returncode == 0:
            ckpt = torch.load(os.path.join(self.run_dir("fp16"), "last.pth"), weights_only=True, map_location="cpu")
            scale = float(ckpt["scaler"].get("scale", 0)) if ckpt.get("scaler") else 0.0
        self.done(s, scale > 0, f"loss scale {scale:g}" if scale > 0 else tail(log))

    # -- the plan
    def run_all(self) -> None:
        """The steps in priority order, with estimated seconds on one H100 (CUDA) or at toy
        sizes on a CPU: the speed decisions first (about 9 minutes), then the trainer checks."""
        cuda = self.args.device == "cuda"
        self.attempt("environment", 5, self.environment)
        self.attempt("roofline", 20, self.roofline)
        self.attempt("fused depthwise kernels", 90 if cuda else 60, self.fused_kernels)
        self.attempt("attention kernels", 40 if cuda else 30, self.attention)
        self.attempt("levers: compiled training", 330 if cuda else 120, self.levers)
        self.attempt("lever 1: max-autotune", 360 if cuda else 600, self.autotune)
        self.attempt("synthetic data", 30, self.synthetic_data)
        self.attempt("train bf16 (amp auto)", 70 if cuda else 60, self.train_bf16)
        self.attempt("train --compile", 130 if cuda else 300, self.train_compiled)
        self.attempt("throughput table", 180 if cuda else 60, self.throughput)
        self.attempt("resume to epoch 2", 40, self.resume)
        self.attempt("eval best.pth", 20, self.eval_best)
        self.attempt("train fp16 (GradScaler)", 40, self.train_fp16)
        self.attempt("profile moat_0 train", 40 if cuda else 30, lambda s, t: self.profile(s, t, compiled=False))
        self.attempt("depthwise pad variants", 60 if cuda else 30, self.depthwise)
        self.attempt("profile moat_0 train compiled", 60 if cuda else 300, lambda s, t: self.profile(s, t, True))

    def print_summary(self) -> None:
        print(f"\nGPU suite summary ({time.time() - self.started:.0f} s in all; logs in {self.work})\n")
        print("| step | status | seconds | result |")
        print("|---|---|---:|---|")
        for st in self.steps:
            print(f"| {st.name} | {st.status} | {st.seconds:.0f} | {st.result} |")
        if self.decisions:
            print("\nTargets and lever decisions (ratios between rows of one interleaved run):\n")
            print("\n".join(self.decisions))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch  # after argparse: --help works without it

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and not gpus:
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    suite = Suite(args, gpus)
    suite.run_all()
    suite.add_model_only_ratios()
    suite.print_summary()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([st.__dict__ for st in suite.steps], f, indent=1)
    suite.keep_logs()
    if not args.work:
        shutil.rmtree(suite.work, ignore_errors=True)
    return 0 if all(st.status in ("ok", "skipped") for st in suite.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
