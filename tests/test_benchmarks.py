"""Smoke runs of the benchmark scripts at toy sizes: they must run and print their tables (the
numbers themselves are checked by nobody here; see docs/benchmarks.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Each test runs a benchmark script end to end in a subprocess.
pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_model_throughput_prints_train_infer_and_reparam_rows_with_ratios():
    out = _run(
        "benchmarks/model_throughput.py",
        "--models",
        "tiny_moat_0",
        "--modes",
        "train,infer",
        "--reparam",
        "off,on",
        "--channels-last",
        "on",
        "--img-size",
        "32",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--memory",
        "off",
        "--threads",
        "1",
        "--baseline",
        "tiny_moat_0:infer:plain",
    )
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| tiny_moat_0")}
    # A folded model cannot train: no 'train ... reparam' row.
    assert set(rows) == {"tiny_moat_0 train fp32 CL", "tiny_moat_0 infer fp32 CL", "tiny_moat_0 infer fp32 CL reparam"}
    assert rows["tiny_moat_0 infer fp32 CL"].rstrip(" |").endswith("1.00")


def test_ddp_scaling_runs_one_process_and_a_two_process_torchrun():
    out = _run(
        "benchmarks/ddp_scaling.py",
        "--model",
        "tiny_moat_0",
        "--nprocs",
        "1,2",
        "--img-size",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--threads",
        "1",
    )
    assert re.search(r"^\| 1 x 1 \| \d+ \| [\d.]+ \| 1\.00 \|$", out, re.M), out
    assert re.search(r"^\| 2 x 1 \| \d+ \| [\d.]+ \| [\d.]+ \|$", out, re.M), out


def test_profile_model_prints_the_op_table_of_a_folded_model():
    out = _run(
        "benchmarks/profile_model.py",
        "--model",
        "tiny_moat_0",
        "--mode",
        "infer",
        "--reparam",
        "--img-size",
        "32",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
    )
    assert "tiny_moat_0 infer reparam" in out and "aten::mkldnn_convolution" in out
    assert "aten::native_batch_norm" not in out  # every BatchNorm was folded away


def test_gpu_suite_runs_every_step_on_the_cpu_at_toy_sizes_and_ends_with_its_summary(tmp_path):
    """The one-shot GPU script's plumbing (fused kernels through Triton's interpreter, lever
    table, trainer runs, resume, eval, fp16, throughput table, profile, summary with floors and
    decisions), so a lent GPU's minutes are not lost to a typo. Compiling is tested elsewhere
    and takes minutes on a CPU."""
    summary = tmp_path / "summary.json"
    skip = "train --compile,profile moat_0 train compiled,lever 1: max-autotune"
    out = _run("benchmarks/gpu_suite.py", "--device", "cpu", "--quick", "--workers", "1", "--skip", skip,
               "--json", str(summary))  # fmt: skip
    import json

    steps = {s["name"]: s for s in json.loads(summary.read_text())}
    compiling = ("train --compile", "profile moat_0 train compiled", "lever 1: max-autotune")
    assert all(steps[name]["status"] == "skipped" for name in compiling)
    assert all(s["status"] == "ok" for name, s in steps.items() if name not in compiling), steps
    assert steps["resume to epoch 2"]["result"] == "auto-resumed after epoch 0"
    assert "x the model-only train row" in steps["train bf16 (amp auto)"]["result"]
    assert steps["fused depthwise kernels"]["result"].startswith("fused errors at")
    assert "Distance from the byte floor" in out and "| tiny_moat_0+fused_depthwise train fp32 CL |" in out
    assert "Targets and lever decisions" in out and "- fused depthwise numerics on this card:" in out


def test_loader_throughput_prints_a_row_per_format_and_worker_count():
    out = _run(
        "benchmarks/loader_throughput.py",
        "--workers",
        "0",
        "1",
        "--num-images",
        "16",
        "--num-classes",
        "2",
        "--source-size",
        "60",
        "40",
        "--batch-size",
        "4",
        "--batches",
        "1",
        "--warmup",
        "0",
        "--img-size",
        "32",
        "--shard-size",
        "5",
        "--threads",
        "1",
    )
    rows = re.findall(r"^\| ([\w-]+) \| (\d) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, re.M)
    assert rows == [(f, w) for f in ("folder", "zip", "zip-cache", "shards") for w in ("0", "1")], out
