"""Checkpoint files as files: weights-only round trip, atomic saves, retention, refusal of
pickled code, shape-mismatch reports, RNG state."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from config import get_config
from conftest import Exploit
from models import build_model
from utils import UserError
from utils.checkpoint_io import (
    CheckpointSaver,
    atomic_save,
    capture_rng_state,
    load_file,
    load_model_weights,
    restore_rng_state,
)


def _model(name="tiny_moat_0", num_classes=3):
    config = get_config().clone()
    config.defrost()
    config.merge_from_list(["MODEL.NAME", name, "MODEL.NUM_CLASSES", num_classes, "DATA.IMG_SIZE", 32])
    config.freeze()
    return build_model(config)


def test_round_trip_with_weights_only_and_usual_file_mode(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "config": {"A": [1, 2]}, "names": ["a"]}
    path = str(tmp_path / "c.pth")
    atomic_save(state, path)
    loaded = load_file(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 2
    assert os.stat(path).st_mode & 0o044  # readable by others like any file, not mkstemp's 0600


def test_crash_during_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    atomic_save({"epoch": 1}, path)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        atomic_save({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_file(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


def test_saver_keeps_last_best_and_the_newest_k_epoch_files(tmp_path):
    saver = CheckpointSaver(str(tmp_path), save_freq=1, keep=2)
    for epoch in range(4):
        saver.save({"epoch": epoch}, epoch, epoch_done=True, is_best=epoch == 1)
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "epoch_2.pth", "epoch_3.pth", "last.pth"]
    assert load_file(str(tmp_path / "best.pth"))["epoch"] == 1
    assert load_file(str(tmp_path / "last.pth"))["epoch"] == 3
    saver.save({"epoch": 4}, 4, epoch_done=False, is_best=False)  # mid-epoch: only last.pth
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "epoch_2.pth", "epoch_3.pth", "last.pth"]


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Exploit(str(marker))}, path)
    with pytest.raises(UserError, match="refused"):
        load_file(str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "not found"),
        (b"just some text\n", "not a"),
        (pickle.dumps([1, 2, 3]), "not a"),
    ],
)
def test_missing_or_non_checkpoint_files_are_one_line_user_errors(tmp_path, content, match):
    path = tmp_path / "x.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match) as err:
        load_file(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_weights_of_another_variant_list_the_mismatched_keys():
    with pytest.raises(UserError) as err:
        load_model_weights(_model("tiny_moat_0"), _model("tiny_moat_1").state_dict(), "other.pth")
    msg = str(err.value)
    assert "shape mismatch" in msg and "stem" in msg and "\n" not in msg


def test_pretrained_head_of_another_class_count_is_dropped_and_the_rest_loads():
    src, dst = _model(num_classes=10), _model(num_classes=3)
    dropped = load_model_weights(dst, src.state_dict(), "src.pth", drop_mismatched_head=True)
    assert dropped == ["head.fc.weight", "head.fc.bias"]
    assert torch.equal(
        dst.stem.state_dict()[next(iter(dst.stem.state_dict()))],
        src.stem.state_dict()[next(iter(src.stem.state_dict()))],
    )
    with pytest.raises(UserError, match="head.fc.weight"):  # without the option it is an error
        load_model_weights(_model(num_classes=3), src.state_dict(), "src.pth")


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    atomic_save({"rng": capture_rng_state(torch.device("cpu"))}, str(tmp_path / "r.pth"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_file(str(tmp_path / "r.pth"))["rng"], torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_text_file_given_as_a_checkpoint_says_what_it_is_without_cryptic_codes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, these are my notes\n")
    with pytest.raises(UserError) as err:
        load_file(str(path))
    assert str(err.value) == (
        f"{path}: not a PyTorch checkpoint (a file beginning b'hello, these are'; a checkpoint is a zip archive)"
    )
