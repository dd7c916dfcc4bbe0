"""End to end on real data: tiny-MOAT learns Fashion-MNIST through ``main.py``.

A balanced subset (300 train / 50 val images per class, upsampled 28 -> 32 px) is made from the
Debian package's idx files by ``tools/prepare_fashion_mnist.py``; one run is shared by the tests.
Chance is 10%; a broken model, loss, schedule or data pipeline stays far below the 70% bar.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, cli_env, read_summary

FMNIST = "/usr/share/datasets/fashion-mnist"
PER_CLASS_TRAIN, PER_CLASS_VAL = 300, 50
MIN_TOP1 = 70.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
        reason="needs Debian's dataset-fashion-mnist (`make test` and .ci/run install it)",
    ),
]  # reason: real data


@pytest.fixture(scope="module")
def fmnist_tree(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("fmnist") / "tree")
    subprocess.run(
        [
            sys.executable,
            "tools/prepare_fashion_mnist.py",
            "--out",
            out,
            "--src",
            FMNIST,
            "--per-class-train",
            str(PER_CLASS_TRAIN),
            "--per-class-val",
            str(PER_CLASS_VAL),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def fmnist_cfg(tmp_path_factory) -> str:
    """The demo config, shortened: 3 epochs at batch 64 (46 steps each), 1 warm-up epoch."""
    cfg = {
        "BASE": [os.path.join(REPO, "configs", "fashion_mnist_tiny_moat_0.yaml")],
        "DATA": {"BATCH_SIZE": 64, "NUM_WORKERS": 0, "PIN_MEMORY": False},
        "TRAIN": {"EPOCHS": 3, "WARMUP_EPOCHS": 1, "BASE_LR": 0.016},
        "AMP": "off",
        "SEED": 0,
    }
    path = str(tmp_path_factory.mktemp("fmnist_cfg") / "fmnist.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def run_main(args, launcher=None) -> subprocess.CompletedProcess:
    prefix = [sys.executable]
    if launcher:
        prefix += ["-m", "torch.distributed.run", "--standalone", *launcher]
    proc = subprocess.run(
        [*prefix, "main.py", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=900, env=cli_env()
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, fmnist_tree, fmnist_cfg) -> str:
    out = str(tmp_path_factory.mktemp("fmnist_out"))
    run_main(["--cfg", fmnist_cfg, "--data-path", fmnist_tree, "--output", out, "--tag", "straight"])
    return os.path.join(out, "tiny_moat_0", "straight")


def test_tiny_moat_learns_fashion_mnist_well_above_chance(straight_run):
    rows = read_summary(straight_run)
    assert len(rows) == 3
    top1 = float(rows[-1]["val_top1"])
    assert top1 >= MIN_TOP1, f"val top-1 {top1:.1f}% after 3 epochs"
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_eval_of_the_saved_checkpoint_reproduces_the_logged_top1(straight_run, fmnist_tree, fmnist_cfg, tmp_path):
    logged = float(read_summary(straight_run)[-1]["val_top1"])
    proc = run_main(
        [
            "--cfg",
            fmnist_cfg,
            "--data-path",
            fmnist_tree,
            "--output",
            str(tmp_path),
            "--eval",
            "--resume",
            os.path.join(straight_run, "last.pth"),
        ]
    )
    found = re.findall(r"model Acc@1 ([0-9.]+)", proc.stdout + proc.stderr)
    assert found, proc.stdout[-2000:]
    assert float(found[-1]) == pytest.approx(logged, abs=1e-3)


def test_resumed_run_ends_with_the_same_metrics_as_a_straight_run(straight_run, fmnist_tree, fmnist_cfg, tmp_path):
    # epoch_0.pth is exactly what a run stopped after its first epoch (epoch 0) leaves behind.
    stopped = tmp_path / "tiny_moat_0" / "resumed"
    stopped.mkdir(parents=True)
    shutil.copy(os.path.join(straight_run, "epoch_0.pth"), stopped / "last.pth")
    run_main(["--cfg", fmnist_cfg, "--data-path", fmnist_tree, "--output", str(tmp_path), "--tag", "resumed"])
    resumed, straight = read_summary(str(stopped)), read_summary(straight_run)
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in straight[1:]]
    for key in ("val_top1", "val_top5", "val_loss", "train_loss"):
        assert resumed[-1][key] == straight[-1][key], key


def test_two_process_torchrun_reaches_a_similar_accuracy(straight_run, fmnist_tree, fmnist_cfg, tmp_path):
    # Same global batch (2 x 32), so the same LR and number of updates as the 1-process run.
    run_main(
        [
            "--cfg",
            fmnist_cfg,
            "--data-path",
            fmnist_tree,
            "--output",
            str(tmp_path),
            "--tag",
            "ddp",
            "--batch-size",
            "32",
        ],
        launcher=["--nproc_per_node=2"],
    )
    ddp = float(read_summary(str(tmp_path / "tiny_moat_0" / "ddp"))[-1]["val_top1"])
    single = float(read_summary(straight_run)[-1]["val_top1"])
    assert ddp >= MIN_TOP1
    assert abs(ddp - single) <= 8.0, (ddp, single)
