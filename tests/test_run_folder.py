"""The run folder: checked before any work (one line naming the path), locked by one run without
the lock reaching forked children, cleared of interrupted saves; later save failures keep the
last good checkpoint; the run config follows the checkpoints."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

import main as trainer
from conftest import REPO, load_checkpoint, read_log
from test_crash_safety import RUN, _copy_run
from utils.checkpoint_io import CheckpointSaver, atomic_save
from utils.errors import CheckpointWriteError, UserError
from utils.run_folder import RunFolderLock, prepare_run_folder, remove_interrupted_saves


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _main(cfg, data, output, *extra):
    return trainer.main(["--cfg", cfg, "--data-path", data, "--output", str(output), *map(str, extra)])


# ------------------------------------------------------------------------------ checked first
def test_a_file_where_the_output_folder_should_be_is_one_line_before_any_work(image_tree, tiny_cfg, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    assert _main(tiny_cfg(), image_tree, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: cannot create run folder") and str(tmp_path / "out") in err


def test_a_checkpoint_name_taken_by_a_folder_is_one_line_before_any_work(image_tree, tiny_cfg, tmp_path, capsys):
    run_dir = tmp_path / "out" / os.path.join(*RUN)
    (run_dir / "last.pth").mkdir(parents=True)
    assert _main(tiny_cfg(), image_tree, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    taken = run_dir / "last.pth"
    assert err == f"error: {taken} is a folder, but the run writes a file of that name there: move it away"
    assert sorted(os.listdir(run_dir)) == ["last.pth"]  # nothing trained, not even a log


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only file system (a tmpfs mounted read-only; root only)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        # reason: mounting needs root and a kernel that allows it
        pytest.skip(f"cannot mount a read-only file system here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_file_system_is_one_line_before_any_work(image_tree, tiny_cfg, read_only_folder, capsys):
    assert _main(tiny_cfg(), image_tree, read_only_folder) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: cannot create run folder {os.path.join(read_only_folder, *RUN)} "
        f"({read_only_folder / RUN[0]}): Read-only file system (--output / --tag)"
    )


def test_prepare_run_folder_accepts_a_writable_folder_and_names_what_is_in_the_way(tmp_path):
    prepare_run_folder(str(tmp_path / "a" / "b"), ["last.pth"])
    assert os.listdir(tmp_path / "a" / "b") == []  # the write probe leaves nothing
    (tmp_path / "a" / "b" / "log_rank1.txt").mkdir()
    with pytest.raises(UserError, match="log_rank1.txt is a folder"):
        prepare_run_folder(str(tmp_path / "a" / "b"), ["last.pth", "log_rank1.txt"])


# ----------------------------------------------------------------------------------- the lock
def test_the_lock_dies_with_its_holder_even_when_forked_children_outlive_it(tmp_path):
    """Loader workers are forked children that live on for seconds after a SIGKILL of the
    trainer; they must not keep the folder locked."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from utils.run_folder import RunFolderLock
        RunFolderLock(sys.argv[1]).acquire()
        if os.fork() == 0:  # a 'loader worker' that outlives the holder
            time.sleep(60)
            os._exit(0)
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} on "):
            RunFolderLock(str(tmp_path)).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        lock = RunFolderLock(str(tmp_path))
        lock.acquire()  # at once, although the child still runs
        lock.release()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


# ------------------------------------------------------------------------- interrupted saves
def test_temporary_files_of_interrupted_saves_are_removed_at_the_next_start_and_counted(
    reference_run, image_tree, tiny_cfg, tmp_path
):
    run_dir = _copy_run(reference_run, str(tmp_path))
    for name in (".last.pth.k2j3h4.tmp", ".best.pth.123.tmp", "config.yaml.tmp"):
        with open(os.path.join(run_dir, name), "wb") as f:
            f.write(b"x" * 1024)
    keep = os.path.join(run_dir, "notes.tmp")
    open(keep, "w").close()
    assert _main(tiny_cfg(), image_tree, tmp_path) == 0  # both epochs were done already
    assert "removed 3 temporary file(s) of interrupted saves" in read_log(run_dir)
    assert [n for n in os.listdir(run_dir) if n.endswith(".tmp")] == ["notes.tmp"]


def test_remove_interrupted_saves_counts_files_and_bytes(tmp_path):
    (tmp_path / ".epoch_3.pth.abc.tmp").write_bytes(b"12345")
    (tmp_path / "last.pth").write_bytes(b"keep")
    assert remove_interrupted_saves(str(tmp_path)) == (1, 5)
    assert os.listdir(tmp_path) == ["last.pth"]


# ----------------------------------------------------------------------------- later failures
def test_a_save_that_fails_later_is_one_line_naming_the_intact_checkpoint(tmp_path):
    saver = CheckpointSaver(str(tmp_path), save_freq=1, keep=3)
    saver.save({"epoch": 0}, 0, epoch_done=True, is_best=True)
    shutil.rmtree(tmp_path / "epoch_0.pth", ignore_errors=True)
    (tmp_path / "best.pth").unlink()
    (tmp_path / "best.pth").mkdir()  # taken by a folder after the run started
    with pytest.raises(CheckpointWriteError) as e:
        saver.save({"epoch": 1}, 1, epoch_done=True, is_best=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"could not write {tmp_path / 'best.pth'}: Is a directory")
    assert message.endswith(f"the newest intact checkpoint is {tmp_path / 'last.pth'}")
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_a_save_onto_a_folder_is_a_checkpoint_write_error_and_leaves_no_temp(tmp_path):
    (tmp_path / "last.pth").mkdir()
    with pytest.raises(CheckpointWriteError, match=f"could not write {tmp_path / 'last.pth'}: Is a directory$"):
        atomic_save({"epoch": 0}, str(tmp_path / "last.pth"))
    assert os.listdir(tmp_path) == ["last.pth"]


# ------------------------------------------------------------------------------- run config
def test_a_diverged_run_leaves_the_folder_config_as_it_was(reference_run, image_tree, tiny_cfg, tmp_path, capsys):
    run_dir = _copy_run(reference_run, str(tmp_path), names=("epoch_0.pth", "config.yaml"))
    os.replace(os.path.join(run_dir, "epoch_0.pth"), os.path.join(run_dir, "last.pth"))
    before = _sha(os.path.join(run_dir, "config.yaml"))
    assert _main(tiny_cfg(), image_tree, tmp_path, "--opts", "TRAIN.BASE_LR", "1e30", "TRAIN.CLIP_GRAD", "0.0") == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert _sha(os.path.join(run_dir, "config.yaml")) == before
    assert "TRAIN.BASE_LR: 0.1 -> 1e+30" in read_log(run_dir)
    # The original command resumes without a config warning.
    assert _main(tiny_cfg(), image_tree, tmp_path) == 0
    assert read_log(run_dir).count("holds a run with a different config") == 1
