"""Resume mid-epoch under another batch layout (batch size, number of processes, accumulation):
it continues at the exact next sample of the epoch's order, or stops at start with one line
naming what changed and what to do. Never a traceback, never silent re-training."""

from __future__ import annotations

import itertools
import os
import shutil
import signal

import pytest

import main as trainer
from conftest import launch_ranks, load_checkpoint, read_log
from data.samplers import BatchLayout, ResumableSampler, continue_epoch_at
from test_crash_safety import RUN
from test_preemption import _trainers_with_loader_workers, _wait_all_started
from utils.checkpoint_io import CheckpointSaver

LAYOUTS = [BatchLayout(b, w, a) for b, w, a in itertools.product((2, 3, 4), (1, 2, 3), (1, 2))]


def _consumed(num_items: int, layout: BatchLayout, start_batch: int, batches: int, epoch: int = 3) -> list:
    """Dataset indices the ranks of ``layout`` train on in batches [start_batch, start_batch + batches)."""
    taken = []
    for rank in range(layout.world_size):
        sampler = ResumableSampler(range(num_items), num_replicas=layout.world_size, rank=rank, seed=7)
        sampler.set_epoch(epoch)
        sampler.set_start_index(start_batch * layout.batch_size)
        order = [i for i, _ in sampler]
        taken += order[: batches * layout.batch_size]
    return taken


@pytest.mark.parametrize("old", LAYOUTS, ids=str)
def test_any_layout_that_continues_an_epoch_neither_repeats_nor_skips_a_sample(old):
    num_items = 97
    steps = (num_items // old.world_size) // old.batch_size
    for updates in range(1, steps // old.accumulation_steps):
        done = updates * old.samples_per_update
        seen = _consumed(num_items, old, 0, updates * old.accumulation_steps)
        for new in LAYOUTS:
            start = continue_epoch_at(done, new)
            if start is None:
                assert done % new.samples_per_update
                continue
            rest_batches = (num_items - done) // new.global_batch
            rest = _consumed(num_items, new, start, rest_batches)
            assert not set(seen) & set(rest), (old, new, updates)  # nothing repeated
            # nothing skipped: seen + rest is a prefix of the epoch's order, whatever the layouts
            full = _consumed(num_items, BatchLayout(1, 1), 0, num_items)
            assert sorted(seen + rest) == sorted(full[: len(seen) + len(rest)]), (old, new, updates)


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def mid_epoch_checkpoint(tmp_path_factory, image_tree, tiny_cfg):
    """``(cfg, path)``: a real mid-epoch checkpoint of a 1-process run, batch 4, after 3 of the 6
    batches of epoch 0 (12 samples), written by the trainer's periodic save (TRAIN.SAVE_STEPS)."""
    out = tmp_path_factory.mktemp("mid_epoch")
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1, "SAVE_STEPS": 3})
    kept = str(out / "mid.pth")
    real_save = CheckpointSaver.save

    def keep_mid_epoch(self, state, epoch, epoch_done, is_best):
        paths = real_save(self, state, epoch, epoch_done, is_best)
        if not epoch_done:
            shutil.copyfile(paths[0], kept)
        return paths

    CheckpointSaver.save = keep_mid_epoch
    try:
        assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(out / "run")]) == 0
    finally:
        CheckpointSaver.save = real_save
    ckpt = load_checkpoint(kept)
    assert (ckpt["epoch"], ckpt["batches_done"], ckpt["epoch_complete"]) == (0, 3, False)
    assert ckpt["data_order"]["samples_done"] == 12
    return tiny_cfg(TRAIN={"EPOCHS": 2}), kept


def _resume(cfg, path, image_tree, output, *extra):
    run_dir = os.path.join(output, *RUN)
    os.makedirs(run_dir)
    shutil.copyfile(path, os.path.join(run_dir, "last.pth"))
    code = trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(output), *map(str, extra)])
    return code, run_dir


def test_resume_with_half_the_batch_continues_at_the_next_sample_and_maps_the_schedule(
    mid_epoch_checkpoint, image_tree, tmp_path
):
    cfg, path = mid_epoch_checkpoint
    code, run_dir = _resume(cfg, path, image_tree, tmp_path, "--batch-size", "2")
    assert code == 0
    log = read_log(run_dir)
    # 12 samples seen at batch 4 = 6 batches of 2; 12 batches of 2 per epoch (one update each).
    assert "this run has batch 2 x 1 process(es) x 1 accumulation" in log
    assert "continue at update 6 of 24, the same point of training (epoch 0, 12 samples in)" in log
    assert f"resumed {os.path.join(run_dir, 'last.pth')}: epoch 0, batch 6, step 6" in log
    assert "config changed" not in log
    final = load_checkpoint(os.path.join(run_dir, "last.pth"))
    assert (final["epoch"], final["step"], final["data_order"]["batch_size"]) == (1, 24, 2)


@pytest.mark.parametrize(
    "extra, layout, fits",
    [
        (["--batch-size", "8"], "batch 8 x 1 process(es) x 1 accumulation", "use --batch-size 4 or 6 or 12 with"),
        (["--accumulation-steps", "2"], "batch 4 x 1 process(es) x 2 accumulation", "use --batch-size 2 or 6 with"),
    ],
)
def test_resume_with_a_layout_that_cannot_continue_the_epoch_is_one_line_and_changes_nothing(
    extra, layout, fits, mid_epoch_checkpoint, image_tree, tmp_path, capsys
):
    cfg, path = mid_epoch_checkpoint
    code, run_dir = _resume(cfg, path, image_tree, tmp_path, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith(f"error: {os.path.join(run_dir, 'last.pth')} stopped inside epoch 0 after 12 samples")
    assert f"this run's {layout} takes" in err and fits in err
    assert open(os.path.join(run_dir, "last.pth"), "rb").read() == open(path, "rb").read()
    assert not os.path.exists(os.path.join(run_dir, "summary.csv"))


@pytest.mark.slow
def test_two_processes_to_one_continues_the_epoch_at_the_next_sample(image_tree, tiny_cfg, run_cli, tmp_path):
    """A 2-process run stopped mid-epoch (SIGTERM) resumes on one process at the sample where
    it stopped: 8 samples per micro-step then, 4 now."""
    cfg = tiny_cfg(TRAIN={"EPOCHS": 2, "EMA": {"ENABLE": False}})
    args = ["--cfg", cfg, "--data-path", image_tree, "--output", tmp_path]
    run_dir = os.path.join(tmp_path, *RUN)
    procs = launch_ranks(args)
    _wait_all_started(procs, run_dir)
    _trainers_with_loader_workers(procs)
    procs[0].send_signal(signal.SIGTERM)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    stopped = load_checkpoint(os.path.join(run_dir, "last.pth"))
    if stopped["epoch_complete"]:
        # reason: the signal landed at an epoch's end; nothing mid-epoch to test
        pytest.skip("the signal arrived at the end of an epoch")
    batches = stopped["batches_done"]
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = read_log(run_dir)
    assert "was written with batch 4 x 2 process(es) x 1 accumulation, this run has batch 4 x 1" in log
    assert f"epoch {stopped['epoch']}, batch {2 * batches}," in log  # 8 samples per batch then, 4 now
    assert "RNG states not restored" in log
    final = load_checkpoint(os.path.join(run_dir, "last.pth"))
    assert final["epoch"] == 1 and final["epoch_complete"] and final["world_size"] == 1
