"""The checkpoint format (``checkpoints.py``): one record for every kind of file, format versions,
training positions, and auto-resume by position, never by file times."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import time

import pytest
import torch

import main as trainer
from checkpoints import (
    FORMAT_VERSION,
    Position,
    read_checkpoint,
    scan_run_folder,
    supersede_later_checkpoints,
    weights_checkpoint,
)
from conftest import load_checkpoint, read_log
from test_crash_safety import RUN, _copy_run
from utils.checkpoint_io import atomic_save
from utils.errors import UserError


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------------------------------ records
def test_a_training_checkpoint_reads_as_one_record_with_everything_a_reader_needs(reference_run):
    record = read_checkpoint(os.path.join(reference_run, "last.pth"))
    assert record.kind == "training" and record.resumable and record.format_version == FORMAT_VERSION
    assert record.model_name == "tiny_moat_0" and record.num_classes == 3
    assert record.class_names == ["blue", "green", "red"]
    assert record.architecture().dims == (32, 64, 128, 256)
    assert record.preprocessing["img_size"] == 32 and record.preprocessing["mean"] == [0.485, 0.456, 0.406]
    assert record.position == Position(1, True, 24, 12) and record.position.describe() == "end of epoch 1, step 12"
    assert set(record.state_dicts) == {"model", "ema"}
    ema, which = record.weights()
    assert which == "ema" and ema is record.state_dicts["ema"]
    assert record.weights(use_ema=False)[1] == "raw"


def test_files_without_a_format_version_are_version_1_and_read_the_same(reference_run, tmp_path):
    obj = load_checkpoint(os.path.join(reference_run, "last.pth"))
    del obj["format_version"]
    atomic_save(obj, str(tmp_path / "old.pth"))
    old, new = read_checkpoint(str(tmp_path / "old.pth")), read_checkpoint(os.path.join(reference_run, "last.pth"))
    assert (old.format_version, new.format_version) == (1, FORMAT_VERSION)
    assert (old.position, old.class_names, old.model_cfg) == (new.position, new.class_names, new.model_cfg)
    # Older files had no samples_done: the position comes from batches and the batch layout.
    del obj["data_order"]["samples_done"]
    obj.update(epoch_complete=False, batches_done=2)
    atomic_save(obj, str(tmp_path / "older.pth"))
    assert read_checkpoint(str(tmp_path / "older.pth")).position == Position(1, False, 8, 12, 2)


def test_a_weights_file_holds_one_named_set_and_says_which(reference_run, tmp_path):
    model, _ = __import__("checkpoints").load_for_inference(os.path.join(reference_run, "last.pth"))
    atomic_save(
        weights_checkpoint(model, "tiny_moat_0", ["r", "g", "b"], {}, {"weights": "ema"}), str(tmp_path / "w.pth")
    )
    record = read_checkpoint(str(tmp_path / "w.pth"))
    assert record.kind == "weights" and not record.resumable and record.single_set == "ema"
    assert record.weights()[1] == "ema" and record.weights(use_ema=True)[1] == "ema"
    with pytest.raises(UserError, match="holds the EMA weights only"):
        record.weights(use_ema=False)


def test_state_dict_prefixes_of_ddp_and_compile_go_and_a_non_model_file_is_one_line(tmp_path):
    atomic_save({"state_dict": {"module._orig_mod.w": torch.zeros(1)}}, str(tmp_path / "p.pth"))
    assert list(read_checkpoint(str(tmp_path / "p.pth")).state_dicts["model"]) == ["w"]
    atomic_save({"epoch": 3}, str(tmp_path / "q.pth"))
    with pytest.raises(UserError, match="not a model checkpoint"):
        read_checkpoint(str(tmp_path / "q.pth"))


def test_positions_compare_in_training_order():
    order = [
        Position(0, False, 4, 1),
        Position(0, False, 8, 2),
        Position(0, True, 24, 6),
        Position(1, False, 4, 7),
        Position(1, True, 24, 12),
    ]
    assert sorted(reversed(order)) == order


# --------------------------------------------------------------------------------- resume choice
def _tiny_checkpoint(path, epoch: int, complete: bool, batches: int, step: int) -> None:
    atomic_save(
        {
            "format_version": FORMAT_VERSION,
            "model": {"w": torch.full((1,), float(step))},
            "optimizer": {},
            "epoch": epoch,
            "epoch_complete": complete,
            "batches_done": batches,
            "step": step,
            "world_size": 1,
            "data_order": {"batch_size": 4, "world_size": 1, "samples_done": batches * 4},
        },
        str(path),
    )


def _folder(root) -> dict:
    """A run folder as a finished 2-epoch run leaves it (best from epoch 0), plus an older
    mid-epoch file: name -> step."""
    os.makedirs(root, exist_ok=True)
    _tiny_checkpoint(root / "epoch_0.pth", 0, True, 6, 6)
    _tiny_checkpoint(root / "mid.pth", 1, False, 3, 9)
    _tiny_checkpoint(root / "epoch_1.pth", 1, True, 6, 12)
    os.link(root / "epoch_1.pth", root / "last.pth")
    os.link(root / "epoch_0.pth", root / "best.pth")
    return {"epoch_0.pth": 6, "mid.pth": 9, "epoch_1.pth": 12, "last.pth": 12, "best.pth": 6}


def test_every_order_of_file_times_resumes_from_the_furthest_position_and_ties_go_to_last(tmp_path):
    steps = _folder(tmp_path / "run")
    names = sorted(steps)
    now = time.time()
    for order in itertools.permutations(names):
        for i, name in enumerate(order):  # a copy gives the files new times in any order
            os.utime(tmp_path / "run" / name, (now + i, now + i))
        scan = scan_run_folder(str(tmp_path / "run"))
        assert os.path.basename(scan.newest.path) == "last.pth", order
        assert [r.position.step for r in scan.resumable] == [12, 12, 9, 6, 6]


def test_an_unreadable_furthest_checkpoint_falls_back_to_the_next_position_with_one_line(tmp_path):
    _folder(tmp_path)
    for name in ("last.pth", "epoch_1.pth"):
        data = (tmp_path / name).read_bytes()
        os.unlink(tmp_path / name)
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    scan = scan_run_folder(str(tmp_path))
    assert os.path.basename(scan.newest.path) == "mid.pth"
    assert sorted(os.path.basename(p) for p, _ in scan.unusable) == ["epoch_1.pth", "last.pth"]
    assert all("\n" not in why and "truncated or corrupt" in why for _, why in scan.unusable)


def test_superseding_moves_only_what_is_further_and_keeps_it_intact(tmp_path):
    _folder(tmp_path)
    before = {n: _sha(tmp_path / n) for n in ("last.pth", "epoch_1.pth", "mid.pth")}
    logged = []
    moved = supersede_later_checkpoints(str(tmp_path), Position(1, False, 12, 9, 3), logged.append)
    assert sorted(os.path.basename(p) for p in moved) == ["epoch_1.pth", "last.pth"]
    assert sorted(os.listdir(tmp_path))[:3] == ["best.pth", "epoch_0.pth", "mid.pth"]
    assert all(_sha(p) == before[os.path.basename(p)] for p in moved)
    assert len(logged) == 1 and "the newest at end of epoch 1, step 12" in logged[0]
    assert os.path.basename(scan_run_folder(str(tmp_path)).newest.path) == "mid.pth"  # out of sight


# ---------------------------------------------------------------------------------- end to end
def _shuffle_times(run_dir, newest_first: str) -> None:
    """What ``cp -r`` may do: the oldest checkpoint ends up with the newest time."""
    now = time.time()
    for i, name in enumerate(sorted(os.listdir(run_dir))):
        os.utime(os.path.join(run_dir, name), (now - 100 + i, now - 100 + i))
    os.utime(os.path.join(run_dir, newest_first), (now, now))


def test_a_copied_run_folder_with_shuffled_times_resumes_from_the_furthest_position(
    reference_run, image_tree, tiny_cfg, tmp_path
):
    run_dir = _copy_run(reference_run, str(tmp_path), names=("epoch_0.pth", "epoch_1.pth", "last.pth", "best.pth"))
    _shuffle_times(run_dir, "epoch_0.pth")
    before = {n: _sha(os.path.join(run_dir, n)) for n in os.listdir(run_dir)}
    assert trainer.main(["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", str(tmp_path)]) == 0
    log = read_log(run_dir)
    assert f"auto-resuming from {os.path.join(run_dir, 'last.pth')} (end of epoch 1, step 12)" in log
    assert "all 2 epochs are done" in log
    assert {n: _sha(os.path.join(run_dir, n)) for n in before} == before  # nothing written over


def test_an_older_resume_keeps_the_newer_checkpoints_aside_and_says_so(reference_run, image_tree, tiny_cfg, tmp_path):
    run_dir = _copy_run(reference_run, str(tmp_path), names=("epoch_0.pth", "epoch_1.pth", "last.pth", "best.pth"))
    newer = {n: _sha(os.path.join(run_dir, n)) for n in ("epoch_1.pth", "last.pth")}
    older = os.path.join(tmp_path, "epoch_0_copy.pth")
    shutil.copyfile(os.path.join(run_dir, "epoch_0.pth"), older)
    args = ["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", str(tmp_path), "--resume", older]
    assert trainer.main(args) == 0
    log = read_log(run_dir)
    assert "are further along than this start (end of epoch 0, step 6), the newest at end of epoch 1, step 12" in log
    kept = [d for d in os.listdir(run_dir) if d.startswith("superseded-")]
    assert len(kept) == 1
    for name, sha in newer.items():  # kept, renamed into the folder, not overwritten
        assert _sha(os.path.join(run_dir, kept[0], name)) == sha
    final = load_checkpoint(os.path.join(run_dir, "last.pth"))
    assert (final["epoch"], final["step"]) == (1, 12)  # epoch 1 trained again from epoch 0


def test_a_folder_whose_checkpoints_cannot_resume_the_run_is_one_line_and_nothing_is_written(
    image_tree, tiny_cfg, tmp_path, capsys
):
    run_dir = os.path.join(tmp_path, *RUN)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "last.pth"), "wb") as f:
        f.write(b"PK\x03\x04 torn")
    before = _sha(os.path.join(run_dir, "last.pth"))
    assert trainer.main(["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{run_dir} holds checkpoints of which none can resume this run (last.pth" in err
    assert _sha(os.path.join(run_dir, "last.pth")) == before
    assert not os.path.exists(os.path.join(run_dir, "summary.csv"))


def test_a_fresh_start_without_auto_resume_moves_the_folder_s_checkpoints_aside(
    reference_run, image_tree, tiny_cfg, tmp_path
):
    run_dir = _copy_run(reference_run, str(tmp_path), names=("last.pth", "epoch_1.pth"))
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1, "AUTO_RESUME": False})
    assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path)]) == 0
    kept = [d for d in os.listdir(run_dir) if d.startswith("superseded-")]
    assert len(kept) == 1 and sorted(os.listdir(os.path.join(run_dir, kept[0]))) == ["epoch_1.pth", "last.pth"]
    assert "further along than a fresh start" in read_log(run_dir)


@pytest.mark.slow
def test_under_torchrun_a_copied_folder_resumes_from_the_furthest_position(ddp_reference, run_cli, tmp_path):
    _, args, reference_dir = ddp_reference
    run_dir = _copy_run(reference_dir, str(tmp_path), names=("epoch_0.pth", "epoch_1.pth", "last.pth", "best.pth"))
    # Resume from epoch 0 on purpose (the furthest position is epoch 1): rank 0 chooses for both.
    shutil.move(os.path.join(run_dir, "epoch_1.pth"), os.path.join(tmp_path, "later.pth"))
    os.unlink(os.path.join(run_dir, "last.pth"))
    shutil.copyfile(os.path.join(run_dir, "epoch_0.pth"), os.path.join(run_dir, "last.pth"))
    shutil.copyfile(os.path.join(tmp_path, "later.pth"), os.path.join(run_dir, "epoch_1.pth"))
    _shuffle_times(run_dir, "last.pth")
    proc = run_cli(args + ["--output", tmp_path], launcher=["--nproc_per_node=2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        assert f"resumed {os.path.join(run_dir, 'epoch_1.pth')}: epoch 2, batch 0, step 4" in read_log(run_dir, rank)
    assert _sha(os.path.join(run_dir, "epoch_1.pth")) == _sha(os.path.join(tmp_path, "later.pth"))
