"""Crash safety: bit-exact resume after SIGKILL and after SIGTERM mid-epoch, divergence
that never overwrites a good checkpoint, one-line errors for bad data and checkpoints,
refusal of checkpoints carrying code, and a warning when an output folder holds another config.

The kill/SIGTERM tests run ``main.py`` as real subprocesses and compare their final ``last.pth``
tensor by tensor with the uninterrupted ``conftest.reference_run`` (same config and seed).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import main as trainer
from conftest import REPO, Exploit, cli_env, load_checkpoint, read_log
from utils.checkpoint_io import CheckpointSaver

RUN = ("tiny_moat_0", "default")


def assert_same_training_state(a_path, b_path):
    """Model, EMA and optimizer state of two checkpoints are bit-identical."""
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), f"optimizer {k} differs"


def _start(args):
    return subprocess.Popen(
        [sys.executable, "main.py", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_log(proc, log_path, needle, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(log_path):
            with open(log_path) as f:
                if needle in f.read():
                    return
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before '{needle}': {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for '{needle}'")


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _copy_run(src_dir, dst_root, names=("last.pth", "config.yaml", "summary.csv"), rename=None):
    dst = os.path.join(dst_root, *RUN)
    os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copy2(os.path.join(src_dir, name), os.path.join(dst, (rename or {}).get(name, name)))
    return dst


# ------------------------------------------------------------------------------- exact resume
@pytest.mark.slow
def test_sigkill_after_an_epoch_then_auto_resume_is_bit_identical(
    reference_run, image_tree, tiny_cfg, run_cli, tmp_path
):
    args = ["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", tmp_path]
    run_dir = os.path.join(tmp_path, *RUN)
    proc = _start(args)
    _wait_for_log(proc, os.path.join(run_dir, "log_rank0.txt"), "(epoch 0, batch 6, step 6)")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed during epoch 1, not finished
    assert load_checkpoint(os.path.join(run_dir, "last.pth"))["epoch"] == 0

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "auto-resuming from" in read_log(run_dir)
    assert_same_training_state(os.path.join(run_dir, "last.pth"), os.path.join(reference_run, "last.pth"))


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_the_position_exits_0_and_resumes_bit_identically(
    reference_run, image_tree, tiny_cfg, run_cli, tmp_path
):
    args = ["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", tmp_path]
    run_dir = os.path.join(tmp_path, *RUN)
    log_path = os.path.join(run_dir, "log_rank0.txt")
    proc = _start(args)
    # "start training" is logged once the handlers are in place; the run then stops after the
    # optimizer update in progress (normally the first of 12), mid-epoch.
    _wait_for_log(proc, log_path, "start training")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in read_log(run_dir)
    stopped = load_checkpoint(os.path.join(run_dir, "last.pth"))
    epoch, batches, step = stopped["epoch"], stopped["batches_done"], stopped["step"]
    assert not stopped["epoch_complete"] and 1 <= batches <= 6 and step == 6 * epoch + batches < 12
    assert stopped["data_order"]["batches_done"] == batches

    # Resume, also saving every 2 updates (periodic mid-epoch checkpoints; no effect on the math).
    resumed = run_cli(args + ["--opts", "TRAIN.SAVE_STEPS", "2"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = read_log(run_dir)
    assert f"resumed {os.path.join(run_dir, 'last.pth')}: epoch {epoch}, batch {batches}, step {step}" in log
    if step < 8:
        assert "saved last.pth (epoch 1, batch 2, step 8)" in log
    assert_same_training_state(os.path.join(run_dir, "last.pth"), os.path.join(reference_run, "last.pth"))


def test_periodic_step_checkpoints_record_the_position_inside_the_epoch(image_tree, tiny_cfg, tmp_path, monkeypatch):
    written = []  # what last.pth holds right after each save
    real_save = CheckpointSaver.save

    def save_and_read_back(self, *args, **kwargs):
        paths = real_save(self, *args, **kwargs)
        ckpt = load_checkpoint(paths[0])
        written.append((ckpt["epoch"], ckpt["batches_done"], ckpt["step"], ckpt["epoch_complete"]))
        assert ckpt["data_order"]["batches_done"] == ckpt["batches_done"]
        return paths

    monkeypatch.setattr(CheckpointSaver, "save", save_and_read_back)
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1, "WARMUP_EPOCHS": 0, "SAVE_STEPS": 2, "EMA": {"ENABLE": False}})
    assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path)]) == 0
    # Every 2 updates mid-epoch, then the end of the epoch (6 steps), which is not saved twice.
    assert written == [(0, 2, 2, False), (0, 4, 4, False), (0, 6, 6, True)]


# ------------------------------------------------------------------------------- divergence
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    reference_run, image_tree, tiny_cfg, tmp_path, capsys
):
    run_dir = _copy_run(reference_run, str(tmp_path), names=("epoch_0.pth",), rename={"epoch_0.pth": "last.pth"})
    good = _sha(os.path.join(run_dir, "last.pth"))
    code = trainer.main(
        [
            "--cfg",
            tiny_cfg(),
            "--data-path",
            image_tree,
            "--output",
            str(tmp_path),
            "--opts",
            "TRAIN.BASE_LR",
            "1e30",
            "TRAIN.CLIP_GRAD",
            "0.0",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert "non-finite loss" in err and "epoch 1" in err
    assert _sha(os.path.join(run_dir, "last.pth")) == good
    assert not glob.glob(os.path.join(run_dir, "epoch_*.pth")) and not os.path.exists(os.path.join(run_dir, "best.pth"))


# ---------------------------------------------------------------------------------- bad input
def _missing_root(root):
    shutil.rmtree(root)
    return root


def _truncated_image(root):
    path = os.path.join(root, "train", "red", "0.png")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:60])
    return path


# One error found while building the loaders, one while training (tests/test_data.py covers each
# kind of bad data on its own).
@pytest.mark.parametrize("damage", [_missing_root, _truncated_image])
def test_bad_data_is_a_one_line_error_naming_the_path(damage, image_tree, tiny_cfg, tmp_path, capsys):
    root = str(tmp_path / "data")
    shutil.copytree(image_tree, root)
    needle = damage(root)
    code = trainer.main(
        ["--cfg", tiny_cfg(TRAIN={"EPOCHS": 1}), "--data-path", root, "--output", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and needle in err, err


def test_skip_bad_images_option_trains_and_logs_each_skipped_file_once(image_tree, tiny_cfg, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(image_tree, root)
    bad = _truncated_image(root)
    cfg = tiny_cfg(DATA={"SKIP_BAD_IMAGES": True}, TRAIN={"EPOCHS": 2, "EMA": {"ENABLE": False}})
    assert trainer.main(["--cfg", cfg, "--data-path", root, "--output", str(tmp_path / "out")]) == 0
    log = read_log(os.path.join(tmp_path, "out", *RUN))
    assert log.count(f"skipping unreadable image {bad}") == 1


# --------------------------------------------------------------------------- bad checkpoints
def _bad_checkpoint(kind, tmp_path, reference_run):
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        data = open(os.path.join(reference_run, "last.pth"), "rb").read()
        path.write_bytes(data[: len(data) // 3])
        return str(path), "truncated or corrupt"
    if kind == "other_variant":
        from config import get_config
        from models import build_model

        config = get_config().clone()
        config.defrost()
        config.merge_from_list(["MODEL.NAME", "tiny_moat_1", "MODEL.NUM_CLASSES", 3])
        torch.save(
            {"model": build_model(config).state_dict(), "model_name": "tiny_moat_1", "epoch": 0, "optimizer": {}}, path
        )
        return str(path), "shape mismatch"
    if kind == "malicious":
        torch.save({"model": {}, "x": Exploit(str(tmp_path / "pwned"))}, path)
        return str(path), "refused to load"
    raise AssertionError(kind)


# Missing and non-checkpoint files are load_file's errors alike for every flag (tests/test_checkpoint.py).
@pytest.mark.parametrize("flag", [["--resume"], ["--pretrained"], ["--eval", "--resume"]])
@pytest.mark.parametrize("kind", ["truncated", "other_variant", "malicious"])
def test_bad_checkpoints_are_one_line_errors_and_code_never_runs(
    flag, kind, reference_run, image_tree, tiny_cfg, tmp_path, capsys
):
    path, needle = _bad_checkpoint(kind, tmp_path, reference_run)
    code = trainer.main(
        ["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", str(tmp_path / "out"), *flag, path]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and needle in err and path in err, err
    assert not (tmp_path / "pwned").exists()
    assert not glob.glob(os.path.join(tmp_path, "out", *RUN, "*.pth"))


def test_auto_resume_refuses_a_folder_holding_only_a_malicious_checkpoint_and_never_runs_it(
    image_tree, tiny_cfg, tmp_path, capsys
):
    run_dir = os.path.join(tmp_path, *RUN)
    os.makedirs(run_dir)
    torch.save({"model": {}, "x": Exploit(str(tmp_path / "pwned"))}, os.path.join(run_dir, "last.pth"))
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1, "EMA": {"ENABLE": False}})
    assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds checkpoints of which none can resume this run (last.pth" in err
    log = read_log(run_dir)
    assert "skipping unusable checkpoint" in log and "refused to load" in log
    assert not (tmp_path / "pwned").exists()
    assert not os.path.exists(os.path.join(run_dir, "summary.csv"))  # nothing trained, nothing written over


# ----------------------------------------------------------------------------------- outputs
def test_output_folder_with_another_config_warns_naming_the_keys(reference_run, image_tree, tiny_cfg, tmp_path):
    run_dir = _copy_run(reference_run, str(tmp_path))
    code = trainer.main(
        [
            "--cfg",
            tiny_cfg(),
            "--data-path",
            image_tree,
            "--output",
            str(tmp_path),
            "--opts",
            "TRAIN.WEIGHT_DECAY",
            "0.1",
        ]
    )
    assert code == 0  # nothing left to train: both epochs are done
    log = read_log(run_dir)
    assert "holds a run with a different config" in log and "TRAIN.WEIGHT_DECAY: 0.05 -> 0.1" in log


def test_auto_resume_skips_a_truncated_last_checkpoint_and_uses_the_newest_good_one(
    reference_run, image_tree, tiny_cfg, tmp_path
):
    run_dir = _copy_run(reference_run, str(tmp_path), names=("epoch_0.pth", "config.yaml"))
    data = open(os.path.join(reference_run, "last.pth"), "rb").read()
    with open(os.path.join(run_dir, "last.pth"), "wb") as f:  # a save torn by a crash (no atomic rename)
        f.write(data[: len(data) // 2])
    assert trainer.main(["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", str(tmp_path)]) == 0
    log = read_log(run_dir)
    warning = [line for line in log.splitlines() if "skipping unusable checkpoint" in line]
    assert len(warning) == 1 and "last.pth" in warning[0] and "truncated or corrupt" in warning[0]
    assert "auto-resuming from " + os.path.join(run_dir, "epoch_0.pth") in log
    assert_same_training_state(os.path.join(run_dir, "last.pth"), os.path.join(reference_run, "last.pth"))


def test_second_run_on_a_busy_folder_stops_naming_the_holder_and_a_killed_holder_blocks_nothing(
    image_tree, tiny_cfg, tmp_path, capsys
):
    run_dir = os.path.join(tmp_path, *RUN)
    os.makedirs(run_dir)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from utils.run_folder import RunFolderLock; "
            "RunFolderLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
            run_dir,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["--cfg", tiny_cfg(TRAIN={"EPOCHS": 1}), "--data-path", image_tree, "--output", str(tmp_path)]
        assert trainer.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and run_dir in err and f"pid {holder.pid} on " in err
        assert not os.path.exists(os.path.join(run_dir, "last.pth"))
        assert not os.path.exists(os.path.join(run_dir, "summary.csv"))
    finally:
        holder.kill()
        holder.wait()
    assert trainer.main(args) == 0  # the lock died with its process
    finished = load_checkpoint(os.path.join(run_dir, "last.pth"))
    assert (finished["epoch"], finished["epoch_complete"]) == (0, True)


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_naming_sizes_and_keeps_the_last_good_checkpoint(
    image_tree, tiny_cfg, tmp_path
):
    """A file-size limit makes every checkpoint write fail as a full disk would (EFBIG instead
    of ENOSPC): the run stops with exit code 1 and one line, and last.pth of epoch 0 survives."""
    import resource

    run_dir = os.path.join(tmp_path, *RUN)
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1})
    assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path)]) == 0
    last = os.path.join(run_dir, "last.pth")
    good = _sha(last)
    limit = os.path.getsize(last) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--cfg",
            cfg,
            "--data-path",
            image_tree,
            "--output",
            str(tmp_path),
            "--opts",
            "TRAIN.EPOCHS",
            "2",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"could not write {last}: File too large; it needs about" in err and " MiB free in " in err
    assert err.endswith(f"the newest intact checkpoint is {last}")
    assert _sha(last) == good and load_checkpoint(last)["epoch"] == 0
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
