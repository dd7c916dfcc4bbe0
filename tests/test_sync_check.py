"""``--sync-debug``: the check toggles torch's sync debug mode around the steps, pauses it for
the intended syncs, and reports what it caught (run here without a GPU: the mode switch is
recorded instead of set)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from config import get_config
from utils.sync_check import StepSyncCheck


@pytest.fixture
def modes(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", seen.append)
    return seen


def test_counts_syncs_pauses_for_log_steps_and_passes_other_warnings_on(modes, caplog):
    logger = logging.getLogger("sync-test")
    with pytest.warns(DeprecationWarning, match="unrelated"):
        with caplog.at_level(logging.INFO, logger="sync-test"):
            with StepSyncCheck(True, torch.device("cuda"), logger) as check:
                for _ in range(3):
                    warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
                with check.paused():
                    pass
                warnings.warn("unrelated", DeprecationWarning, stacklevel=1)
    assert modes == ["warn", "default", "warn", "default"]
    assert "sync debug: 3 host-device syncs inside training steps" in caplog.text


def test_reports_a_clean_epoch(modes, caplog):
    with caplog.at_level(logging.INFO, logger="sync-test"):
        with StepSyncCheck(True, torch.device("cuda"), logging.getLogger("sync-test")):
            pass
    assert "no host-device sync inside training steps" in caplog.text


def test_does_nothing_on_a_cpu_or_when_off(modes):
    for enabled, device in ((True, "cpu"), (False, "cuda")):
        with StepSyncCheck(enabled, torch.device(device), logging.getLogger("sync-test")) as check:
            with check.paused():
                pass
    assert modes == []


def test_the_flag_sets_the_config_key(tmp_path):
    from main import get_args_parser

    cfg = tmp_path / "c.yaml"
    cfg.write_text("MODEL: {NAME: tiny_moat_0}\n")
    args = get_args_parser().parse_args(["--cfg", str(cfg), "--sync-debug"])
    assert get_config(args).TRAIN.SYNC_DEBUG is True
    assert get_config(get_args_parser().parse_args(["--cfg", str(cfg)])).TRAIN.SYNC_DEBUG is False
