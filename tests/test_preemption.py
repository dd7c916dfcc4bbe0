"""Preemption on the path people launch: ``torchrun`` with loader workers (the default), SIGTERM or
SIGINT to torchrun, to every process as SLURM does, or to one rank. Every rank finishes its step,
one consistent mid-epoch checkpoint is written, every trainer exits 0, and the rerun ends
bit-identical to an uninterrupted run. Also the loader workers' own signal handling.

The runs use ``conftest.TINY_CONFIG``: two persistent loader workers per process.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, cli_env, launch_ranks, load_checkpoint, process_group_members, read_log
from data.build import TrainerDataLoader
from test_crash_safety import RUN, _wait_for_log


def _assert_same_model(a_path: str, b_path: str) -> None:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), f"optimizer {k} differs"


def _assert_stopped_mid_epoch(run_dir: str, signal_name: str, world_size: int = 2) -> dict:
    """Every rank logged the stop; last.pth is one mid-epoch checkpoint with every rank's RNG."""
    for rank in range(world_size):
        assert f"stopped by {signal_name}" in read_log(run_dir, rank) or "another rank" in read_log(run_dir, rank)
    stopped = load_checkpoint(os.path.join(run_dir, "last.pth"))
    assert not stopped["epoch_complete"] and len(stopped["rng_state"]) == world_size
    assert not glob.glob(os.path.join(run_dir, ".*.tmp"))
    return stopped


def _wait_all_started(procs_or_proc, run_dir: str, world_size: int = 2) -> None:
    procs = procs_or_proc if isinstance(procs_or_proc, list) else [procs_or_proc] * world_size
    for rank in range(world_size):  # both ranks handle the signals from here on
        _wait_for_log(procs[rank], os.path.join(run_dir, f"log_rank{rank}.txt"), "start training")


def _trainers_with_loader_workers(procs, workers: int = 2, timeout: float = 120) -> list:
    """Every pid of the trainers' process groups once each has its train loader's workers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        groups = [process_group_members(p.pid) for p in procs]
        if all(len(g) >= 1 + workers for g in groups):
            return [pid for g in groups for pid in g]
        time.sleep(0.01)
    pytest.fail("the loader workers did not start")


def _resume_matches_reference(args, run_cli, run_dir: str, reference_dir: str) -> None:
    resumed = run_cli(args, launcher=["--nproc_per_node=2"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {os.path.join(run_dir, 'last.pth')}" in read_log(run_dir)
    _assert_same_model(os.path.join(run_dir, "last.pth"), os.path.join(reference_dir, "last.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_torchrun_with_loader_workers_checkpoints_and_resumes_bit_identically(
    sig, ddp_reference, run_cli, tmp_path
):
    """torchrun forwards the signal to each worker's whole process group, loader workers included."""
    _, args, reference_dir = ddp_reference
    args = args + ["--output", tmp_path / "out"]
    run_dir = os.path.join(tmp_path, "out", *RUN)
    log_dir = tmp_path / "torchrun"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*launcher, "--log-dir", str(log_dir), "--redirects", "3", "main.py", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_all_started(proc, run_dir)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    # torchrun itself re-raises the signal it got (exit status 1, its own traceback); the ranks'
    # own output holds no traceback and no error.
    assert proc.returncode != 0 and "SignalException" in err
    rank_errors = sorted(glob.glob(str(log_dir / "**" / "stderr.log"), recursive=True))
    assert len(rank_errors) == 2
    for path in rank_errors:
        text = open(path).read()
        assert "Traceback" not in text and "error" not in text.lower(), text[-2000:]
    _assert_stopped_mid_epoch(run_dir, sig.name)
    _resume_matches_reference(args, run_cli, run_dir, reference_dir)


@pytest.mark.slow
def test_sigterm_to_every_process_like_slurm_each_trainer_exits_0_and_resumes_bit_identically(
    ddp_reference, run_cli, tmp_path
):
    """SLURM signals every process of the step: both trainers and all of their loader workers."""
    _, args, reference_dir = ddp_reference
    args = args + ["--output", tmp_path]
    run_dir = os.path.join(tmp_path, *RUN)
    procs = launch_ranks(args)
    _wait_all_started(procs, run_dir)
    pids = _trainers_with_loader_workers(procs)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    _assert_stopped_mid_epoch(run_dir, "SIGTERM")
    # The README's SLURM recipe requeues when the last line of rank 0's log says so.
    assert "stopped by" in read_log(run_dir).strip().splitlines()[-1]
    _resume_matches_reference(args, run_cli, run_dir, reference_dir)
    assert "stopped by" not in read_log(run_dir).strip().splitlines()[-1]  # finished: no requeue


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zip-part", "shards"])
def test_sigterm_to_every_process_in_the_zip_and_shard_formats_checkpoints_and_resumes(
    fmt, ddp_reference, zip_data, shard_data, run_cli, tmp_path
):
    """The archive formats hold open zips / shards and (zip part) a RAM cache in each worker."""
    cfg, args, reference_dir = ddp_reference
    data_path, flags = (
        (zip_data, ["--zip", "--cache-mode", "part"])
        if fmt == "zip-part"
        else (shard_data, ["--data-format", "shards"])
    )
    args = ["--cfg", cfg, "--data-path", data_path, "--accumulation-steps", "2", *flags, "--output", tmp_path]
    run_dir = os.path.join(tmp_path, *RUN)
    procs = launch_ranks(args)
    _wait_all_started(procs, run_dir)
    for pid in _trainers_with_loader_workers(procs):
        os.kill(pid, signal.SIGTERM)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    _assert_stopped_mid_epoch(run_dir, "SIGTERM")
    resumed = run_cli(args, launcher=["--nproc_per_node=2"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if fmt == "shards":  # the same order as class folders: the reference run, bit for bit
        _assert_same_model(os.path.join(run_dir, "last.pth"), os.path.join(reference_dir, "last.pth"))
    else:  # each rank trains on its cached part: its own order, the same number of updates
        assert load_checkpoint(os.path.join(run_dir, "last.pth"))["step"] == 4


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_update_and_each_exits_0(ddp_reference, run_cli, tmp_path):
    _, args, reference_dir = ddp_reference
    args = args + ["--output", tmp_path]
    run_dir = os.path.join(tmp_path, *RUN)
    procs = launch_ranks(args)
    _wait_all_started(procs, run_dir)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "stopped by SIGTERM" in read_log(run_dir, 1)
    assert "stopped by a signal on another rank" in read_log(run_dir, 0)
    _assert_stopped_mid_epoch(run_dir, "SIGTERM")
    _resume_matches_reference(args, run_cli, run_dir, reference_dir)


@pytest.mark.slow
def test_a_failing_rank_reports_one_line_and_the_other_rank_leaves_without_a_traceback(image_tree, tiny_cfg, tmp_path):
    root = tmp_path / "data"
    subprocess.run(["cp", "-r", image_tree, str(root)], check=True)
    bad = root / "train" / "red" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1})
    procs = launch_ranks(["--cfg", cfg, "--data-path", root, "--output", tmp_path / "out"])
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode != 0 and "Traceback" not in err, err[-3000:]
        errors.append(err.strip())
    reported = [e for e in errors if e]
    assert len(reported) == 1 and reported[0].count("\n") == 0, errors
    assert reported[0].startswith(f"error: unreadable image {bad}")


def _one_line_from_one_rank(args) -> str:
    errors = []
    for p in launch_ranks(args):
        _, err = p.communicate(timeout=180)
        assert p.returncode != 0 and "Traceback" not in err, err[-3000:]
        errors.append(err.strip())
    reported = [e for e in errors if e]
    assert len(reported) == 1 and reported[0].count("\n") == 0, errors
    return reported[0]


def test_a_data_error_every_rank_meets_is_reported_once(image_tree, tiny_cfg, tmp_path):
    """A class count that does not match the folders: both ranks find it, one line says so."""
    cfg = tiny_cfg(MODEL={"NUM_CLASSES": 5}, TRAIN={"EPOCHS": 1})
    line = _one_line_from_one_rank(["--cfg", cfg, "--data-path", image_tree, "--output", tmp_path / "out"])
    assert line.startswith("error: found 3 class folders"), line


def test_eval_errors_every_rank_meets_are_reported_once(reference_run, image_tree, tiny_cfg, tmp_path):
    """``--eval`` under torchrun: a missing checkpoint, then a data folder without a val split."""
    cfg = tiny_cfg()
    base = ["--cfg", cfg, "--output", tmp_path / "out", "--eval"]
    line = _one_line_from_one_rank(base + ["--data-path", image_tree, "--resume", tmp_path / "none.pth"])
    assert line.startswith("error: checkpoint not found"), line
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    subprocess.run(["cp", "-r", os.path.join(image_tree, "train"), str(train_only)], check=True)
    line = _one_line_from_one_rank(
        base + ["--data-path", train_only, "--resume", os.path.join(reference_run, "last.pth")]
    )
    assert line.startswith("error: ") and "val" in line, line


# --------------------------------------------------------------------------------- loader workers
class _Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.01)
        return torch.tensor(i)


def test_loader_workers_ignore_stop_signals_from_others_but_stop_when_the_trainer_terminates_them():
    loader = TrainerDataLoader(_Numbers(), batch_size=4, num_workers=2, persistent_workers=True)
    iterator = iter(loader)
    first = next(iterator)
    workers = list(iterator._workers)
    for w in workers:  # what torchrun's killpg or SLURM delivers to each worker
        subprocess.run(["kill", "-TERM", str(w.pid)], check=True)
        subprocess.run(["kill", "-INT", str(w.pid)], check=True)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    rest = [batch for batch in iterator]
    assert torch.equal(torch.cat([first, *rest]), torch.arange(64))
    for w in workers:  # the trainer's own terminate (multiprocessing at exit, DataLoader shutdown)
        w.terminate()
        w.join(timeout=10)
        assert not w.is_alive() and w.exitcode == 0
