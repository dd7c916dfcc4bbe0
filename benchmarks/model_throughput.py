"""Model throughput: training step (fwd + bwd + AdamW) and inference, side by side.

Every row (model x mode x dtype x layout x compile) is built once, warmed up, then timed one
step at a time in round-robin order, so drift in machine load (other processes on a shared box)
hits every row alike; each row reports the median step time. Prints a Markdown table.

Example (the CPU numbers in docs/benchmarks.md):

    python benchmarks/model_throughput.py --models moat_0,coatnet_0_rw_224 --modes train \\
        --dtype fp32,bf16 --batch-size 8 --threads 2 --baseline coatnet_0_rw_224

Model names take ``+option`` suffixes, boolean keyword arguments of the model set to True, so two
formulations of one model are rows of one run: ``moat_0+fused_depthwise``, ``moat_0+flex_attention``,
``moat_0+linear_1x1`` (``MOAT.set_fast_paths``). ``--compile-mode`` adds compiled rows per
``torch.compile`` mode.

Columns: img/s = batch / median step time; GMACs/img from ``FlopCounterMode`` on one forward
(MACs = FLOPs / 2, attention counted through the math SDPA backend because the CPU flash kernel
has no FLOP formula); GMAC/s = GMACs/img x img/s (for train rows still the *forward* MACs, so
rows compare per forward-FLOP); peak memory: CUDA ``max_memory_allocated`` over the timed steps
less what the other rows keep resident (so each row reads as if alone on the card),
CPU the growth of the process's peak RSS (``ru_maxrss``) over warm-up steps run in a fresh
subprocess per row (RSS includes allocator caching, so it is an upper bound on tensor memory);
ratio columns divide img/s by that of the ``--baseline`` row (fields the spec leaves out are
taken from the row itself, so ``--baseline coatnet_0_rw_224`` compares like with like; a compile
mode the baseline model has no row for falls back to its default-mode row); ``first step s``: the
wall time of each row's first warm-up step, which for compiled rows is the compile time (plus one
step).

Not a unit test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm

import models  # noqa: F401 (registers the MOAT variants with timm)
from benchmarks.timing import train_step

MODES = ("train", "infer")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ONOFF = {"on": True, "off": False}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def split_model(name: str):
    """``'moat_0+fused_depthwise'`` -> ``('moat_0', {'fused_depthwise': True})``."""
    base, *options = name.split("+")
    return base, {opt: True for opt in options if opt}


@dataclass(frozen=True)
class RowSpec:
    model: str
    mode: str
    dtype: str
    channels_last: bool
    compile: bool
    reparam: bool = False
    compile_mode: str = "default"

    @property
    def label(self) -> str:
        mode = f" {self.compile_mode}" if self.compile and self.compile_mode != "default" else ""
        return (
            f"{self.model} {self.mode} {self.dtype}"
            f"{' CL' if self.channels_last else ''}{' compiled' if self.compile else ''}{mode}"
            f"{' reparam' if self.reparam else ''}"
        )


@dataclass
class Row:
    spec: RowSpec
    step: Callable[[], None]
    times: List[float] = field(default_factory=list)
    gmacs: float = float("nan")
    peak_mib: float = float("nan")
    first_step_s: float = float("nan")

    batch: int = 0
    stat: Callable[[List[float]], float] = statistics.median

    @property
    def img_s(self) -> float:
        return self.batch / self.stat(self.times) if self.times else float("nan")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "MOAT model throughput", add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--models",
        default="moat_0,coatnet_0_rw_224",
        help="comma list: MOAT variants (moat_0, tiny_moat_0, ...) or any timm model name, each with "
        "optional +option suffixes (boolean model arguments set to True, e.g. moat_0+fused_depthwise)",
    )
    p.add_argument("--modes", default="train,infer", help="comma list of train, infer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dtype", default="fp32", help="comma list of fp32, bf16 (autocast), fp16 (autocast, CUDA)")
    p.add_argument("--channels-last", default="off", help="comma list of on, off")
    p.add_argument("--compile", default="off", help="comma list of on, off (torch.compile)")
    p.add_argument(
        "--compile-mode",
        default="default",
        help="comma list of torch.compile modes for the compiled rows: " + ", ".join(COMPILE_MODES),
    )
    p.add_argument(
        "--compiled-models",
        default=None,
        help="comma list of model or model:mode (e.g. moat_0,coatnet_0_rw_224:infer): build compiled "
        "rows only for these (default: every row); compiling takes a minute or more per row on a GPU; "
        "model:mode:compile-mode limits a compile mode other than default to those rows",
    )
    p.add_argument(
        "--eager-models",
        default=None,
        help="comma list of model or model:mode: build eager rows only for these (default: every row)",
    )
    p.add_argument(
        "--reparam",
        default="off",
        help="comma list of on, off: inference rows after timm.utils.reparameterize_model "
        "(MOAT folds its BatchNorms into the convolutions); train rows stay off",
    )
    p.add_argument(
        "--drop-path-rate",
        type=float,
        default=None,
        help="stochastic depth for every model (default: each model's own; MOAT variants carry the "
        "official rate, timm's CoAtNets 0): set it to compare training steps like with like",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    p.add_argument(
        "--stat",
        default="median",
        choices=["median", "min"],
        help="step-time statistic behind img/s and the ratios; 'min' estimates the "
        "uncontended speed on a machine shared with bursty jobs",
    )
    p.add_argument(
        "--adamw",
        default="fused",
        choices=["fused", "foreach", "loop"],
        help="AdamW implementation for train rows (same for every row)",
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="row spec model[:mode][:dtype][:cl|nocl][:compiled|eager][:<compile mode>][:reparam|plain]; "
        "repeatable, one ratio column each; omitted fields match the row being compared",
    )
    p.add_argument(
        "--memory", default="on", choices=["on", "off"], help="peak-memory column (CPU: one subprocess per row)"
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--import-file",
        action="append",
        default=[],
        help="python file to import first (e.g. one registering a reference copy of a model "
        "under other names, to compare two versions in one run); repeatable",
    )
    p.add_argument(
        "--malloc",
        default="default",
        choices=["default", "tuned"],
        help="'tuned' re-runs this script with glibc malloc told to keep freed memory "
        "(no mmap/trim for big blocks): on VMs where fresh pages are costly this "
        "removes per-step page faults; see docs/benchmarks.md",
    )
    p.add_argument("--measure-memory-row", default=None, help=argparse.SUPPRESS)
    return p


def _split(value: str, allowed=None, what="value") -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise SystemExit(f"invalid {what} {bad}; accepted: {', '.join(allowed)}")
    return items


def _wanted(filter_list, model: str, mode: str, compile_mode: str = "default") -> bool:
    """Whether ``--compiled-models`` / ``--eager-models`` (None: all) select this row: entries
    ``model``, ``model:mode`` or ``model:mode:compile-mode`` (a compile mode other than the
    default must be named)."""
    if filter_list is None:
        return True
    wanted = _split(filter_list)
    if compile_mode != "default":
        return f"{model}:{mode}:{compile_mode}" in wanted
    return model in wanted or f"{model}:{mode}" in wanted or f"{model}:{mode}:default" in wanted


def row_specs(args) -> List[RowSpec]:
    specs = []
    compile_modes = _split(args.compile_mode, COMPILE_MODES, "--compile-mode")
    for model, mode, dtype, cl, comp, rep in itertools.product(
        _split(args.models),
        _split(args.modes, MODES, "mode"),
        _split(args.dtype, DTYPES, "dtype"),
        _split(args.channels_last, ONOFF, "--channels-last"),
        _split(args.compile, ONOFF, "--compile"),
        _split(args.reparam, ONOFF, "--reparam"),
    ):
        if dtype == "fp16" and args.device != "cuda":
            raise SystemExit("fp16 autocast is only benchmarked on cuda; use fp32 or bf16 on cpu")
        if ONOFF[rep] and (mode == "train" or not has_reparameterization(split_model(model)[0])):
            continue  # a folded model cannot train; a model without a fold would repeat its plain row
        if not ONOFF[comp]:
            if _wanted(args.eager_models, model, mode):
                specs.append(RowSpec(model, mode, dtype, ONOFF[cl], False, ONOFF[rep]))
            continue
        for cmode in compile_modes:
            if _wanted(args.compiled_models, model, mode, cmode):
                specs.append(RowSpec(model, mode, dtype, ONOFF[cl], True, ONOFF[rep], cmode))
    return specs


def has_reparameterization(name: str) -> bool:
    """Whether ``timm.utils.reparameterize_model`` changes this model."""
    try:
        with torch.device("meta"):  # no weights: instant
            model = timm.create_model(name)
    except NotImplementedError:  # some models' init reads tensor data (older timm/torch)
        model = timm.create_model(name)
    return any(hasattr(m, "reparameterize") or hasattr(m, "fuse") for m in model.modules() if m is not model)


def build_row(spec: RowSpec, args, device: torch.device) -> Row:
    """Model, optimizer and a fixed batch for one row; returns a closure running one step."""
    torch.manual_seed(0)
    name, kwargs = split_model(spec.model)
    if args.drop_path_rate is not None:
        kwargs["drop_path_rate"] = args.drop_path_rate
    model = timm.create_model(name, num_classes=1000, **kwargs).to(device)
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    dtype = DTYPES[spec.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    if spec.reparam:
        model = timm.utils.reparameterize_model(model.eval(), inplace=True)
    cmode = None if spec.compile_mode == "default" else spec.compile_mode
    fwd = torch.compile(model, mode=cmode) if spec.compile else model

    if spec.mode == "train":
        model.train()
        opt_kwargs = {"fused": True} if args.adamw == "fused" else {"foreach": args.adamw == "foreach"}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **opt_kwargs)
        step = train_step(fwd, opt, x, y, autocast)
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast():
                fwd(x)

    row = Row(spec, step, batch=args.batch_size, stat=min if args.stat == "min" else statistics.median)
    row.model = model  # kept for the FLOP count
    row.input = x
    row.optimizer = opt if spec.mode == "train" else None
    return row


def persistent_bytes(row: Row) -> int:
    """Bytes a row keeps between steps (parameters, buffers, optimizer state, its batch): with
    every row resident on one device, a row's own peak is its step's growth plus these."""
    tensors = list(row.model.parameters()) + list(row.model.buffers()) + [row.input]
    if row.optimizer is not None:
        tensors += [t for state in row.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def count_gmacs(model: nn.Module, x: torch.Tensor) -> float:
    """Forward GMACs per image (FLOPs / 2), attention through the countable math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x[:1])
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_memory_subprocess(spec: RowSpec, args) -> float:
    """CPU peak-RSS growth (MiB) of warm-up steps of one row, in a fresh process."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--measure-memory-row",
        json.dumps(spec.__dict__),
        "--batch-size",
        str(args.batch_size),
        "--img-size",
        str(args.img_size),
        "--device",
        args.device,
        *itertools.chain(*(("--import-file", f) for f in args.import_file)),
        "--warmup",
        str(max(1, min(args.warmup, 2))),
        "--adamw",
        args.adamw,
    ]
    if args.drop_path_rate is not None:
        cmd += ["--drop-path-rate", str(args.drop_path_rate)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"memory measurement failed for {spec.label}: {out.stderr[-500:]}", file=sys.stderr)
        return float("nan")


def _memory_child(args) -> None:
    spec = RowSpec(**json.loads(args.measure_memory_row))
    row = build_row(spec, args, torch.device(args.device))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):
        row.step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)  # ru_maxrss is in KiB on Linux


def _matches(base: str, row: RowSpec) -> RowSpec:
    """Resolve a baseline spec against a row: fields the spec omits come from the row."""
    parts = base.split(":")
    fields = dict(
        model=parts[0],
        mode=row.mode,
        dtype=row.dtype,
        channels_last=row.channels_last,
        compile=row.compile,
        reparam=row.reparam,
        compile_mode=row.compile_mode,
    )
    for part in parts[1:]:
        if part in MODES:
            fields["mode"] = part
        elif part in DTYPES:
            fields["dtype"] = part
        elif part in ("cl", "nocl"):
            fields["channels_last"] = part == "cl"
        elif part in ("compiled", "eager"):
            fields["compile"] = part == "compiled"
        elif part in ("reparam", "plain"):
            fields["reparam"] = part == "reparam"
        elif part in COMPILE_MODES:
            fields["compile"], fields["compile_mode"] = True, part
        else:
            accepted = MODES + tuple(DTYPES) + ("cl", "nocl", "compiled", "eager", "reparam", "plain") + COMPILE_MODES
            raise SystemExit(f"bad baseline field {part!r} in {base!r}; accepted: {', '.join(accepted)}")
    if not fields["compile"]:
        fields["compile_mode"] = "default"
    return RowSpec(**fields)


def find_baseline(rows: Dict[RowSpec, "Row"], base: str, spec: RowSpec):
    """The row ``base`` names for ``spec``; a compile mode taken from the row that the baseline
    model was not run in falls back to its default-mode compiled row."""
    ref = rows.get(_matches(base, spec))
    if ref is None and spec.compile_mode != "default" and not any(p in COMPILE_MODES for p in base.split(":")):
        ref = rows.get(replace(_matches(base, spec), compile_mode="default"))
    return ref


def machine_line(args, device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"device {device.type}: {name}; torch {torch.__version__}, timm {timm.__version__}; "
        f"threads {torch.get_num_threads()}; cpu capability {torch.backends.cpu.get_cpu_capability()}; "
        f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )


def import_files(paths: List[str]) -> None:
    import importlib.util

    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


# Keep freed blocks in the heap: big activations are otherwise mmap'ed and unmapped every step,
# and each fresh page costs a (zeroing) page fault. 4 GiB mmap threshold, 16 GiB trim threshold.
TUNED_MALLOC = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def main(args) -> None:
    if args.malloc == "tuned" and os.environ.get("GLIBC_TUNABLES") != TUNED_MALLOC:
        env = dict(os.environ, GLIBC_TUNABLES=TUNED_MALLOC)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)
    import_files(args.import_file)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.measure_memory_row:
        _memory_child(args)
        return
    specs = row_specs(args)
    rows: Dict[RowSpec, Row] = {}
    for spec in specs:
        rows[spec] = build_row(spec, args, device)
    gmacs_by_model: Dict[str, float] = {}
    for row in rows.values():
        key, options = split_model(row.spec.model)
        if key not in gmacs_by_model:
            # Options change the kernels, not the arithmetic: counted on the plain model.
            model = row.model if not options else timm.create_model(key, num_classes=1000).to(device)
            gmacs_by_model[key] = count_gmacs(model, row.input)
        row.gmacs = gmacs_by_model[key]
    if args.memory == "on" and device.type == "cpu":
        for row in rows.values():
            row.peak_mib = measure_memory_subprocess(row.spec, args)
    start_load = os.getloadavg()[0]
    for row in rows.values():
        for i in range(args.warmup):
            t0 = time.perf_counter()
            row.step()
            if i == 0:
                _sync(device)
                row.first_step_s = time.perf_counter() - t0
                print(f"{row.spec.label}: first step {row.first_step_s:.1f} s", file=sys.stderr, flush=True)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peaks: Dict[RowSpec, int] = {}
    own = {spec: persistent_bytes(row) for spec, row in rows.items()} if device.type == "cuda" else {}
    for rep in range(args.steps):  # round-robin: one step of every row per repeat
        if rep:
            print(
                f"repeat {rep}/{args.steps}: "
                + ", ".join(f"{r.spec.label} {r.times[-1] * 1e3:.0f} ms" for r in rows.values()),
                file=sys.stderr,
                flush=True,
            )
        for row in rows.values():
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                others = torch.cuda.memory_allocated(device) - own[row.spec]
            t0 = time.perf_counter()
            row.step()
            _sync(device)
            row.times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                # The other rows' resident state is left out: each row's own peak.
                peak = torch.cuda.max_memory_allocated(device) - others
                peaks[row.spec] = max(peaks.get(row.spec, 0), peak)
    for spec, peak in peaks.items():
        rows[spec].peak_mib = peak / 2**20

    print(
        machine_line(args, device).replace("load avg", "load avg at end")
        + f" (1-min load at timing start {start_load:.2f})"
    )
    end_load = os.getloadavg()[0]
    print(
        f"batch {args.batch_size}, {args.img_size}px, warmup {args.warmup}, {args.stat} of {args.steps} "
        f"interleaved steps, AdamW {args.adamw}; load avg at end {end_load:.2f}"
    )
    print()
    bases = args.baseline
    head = ["row", "img/s", "ms/step (median)", "ms/step (min)", "GMACs/img", "GMAC/s", "peak MiB", "first step s"]
    head += [f"x {b}" for b in bases]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    results = []
    for spec, row in rows.items():
        med = statistics.median(row.times)
        ratios = []
        for b in bases:
            ref = find_baseline(rows, b, spec)
            ratios.append(row.img_s / ref.img_s if ref else float("nan"))
        cells = [
            spec.label,
            f"{row.img_s:.2f}",
            f"{med * 1e3:.0f}",
            f"{min(row.times) * 1e3:.0f}",
            f"{row.gmacs:.2f}",
            f"{row.gmacs * row.img_s:.1f}",
            f"{row.peak_mib:.0f}",
            f"{row.first_step_s:.1f}",
        ] + ["-" if r != r else f"{r:.2f}" for r in ratios]
        print("| " + " | ".join(cells) + " |")
        results.append(
            dict(
                **spec.__dict__,
                img_s=row.img_s,
                ms_step=med * 1e3,
                gmacs=row.gmacs,
                peak_mib=row.peak_mib,
                first_step_s=row.first_step_s,
                label=spec.label,
                ratios=dict(zip(bases, ratios)),
                times=row.times,
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_line(args, device), args=vars(args), rows=results), f, indent=1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
