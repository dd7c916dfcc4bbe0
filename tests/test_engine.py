"""The training story without the CLI: a ``Trainer`` built from its trainer_parts trains, saves a
checkpoint whose record says where it stopped, and restores it into a fresh trainer; ``run_eval``
scores it directly."""

from __future__ import annotations

import json
import os

import torch

from checkpoints import Position, read_checkpoint
from config import with_values
from engine import Feed, ResumePoint
from evaluation import EvalSizes, run_eval
from logger import create_logger
from utils.amp import autocast_factory
from utils.distributed import init_distributed


def test_a_trainer_built_from_its_parts_trains_saves_and_restores_its_position(trainer_parts, tmp_path):
    trainer, loaders, _ = trainer_parts()
    assert trainer.fit(loaders.train, loaders.val, ResumePoint(0)) == 0
    record = read_checkpoint(str(tmp_path / "last.pth"))
    assert record.position == Position(0, True, 24, 6)
    assert record.training["max_accuracy"] == trainer.progress.max_accuracy

    fresh, _, _ = trainer_parts(**{"TRAIN.EPOCHS": 2})
    start = fresh.restore(record)
    assert (start.epoch, start.batch, fresh.progress.step) == (1, 0, 6)
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name
    assert fresh.optimizer.state_dict()["state"].keys() == trainer.optimizer.state_dict()["state"].keys()


def test_state_dict_is_the_record_a_reader_sees(trainer_parts):
    trainer, _, config = trainer_parts()
    state = trainer.state_dict(epoch=0, batches_done=3, epoch_complete=False)
    assert state["data_order"] == {
        "seed": 0,
        "epoch": 0,
        "batches_done": 3,
        "batch_size": 4,
        "world_size": 1,
        "accumulation_steps": 1,
        "samples_done": 12,
    }
    assert state["model_cfg"] == trainer.model.cfg.to_dict() and state["class_names"] == ["blue", "green", "red"]


def test_run_eval_scores_a_checkpoint_directly(trainer_parts, tmp_path):
    trainer, loaders, config = trainer_parts()
    trainer.fit(loaders.train, loaders.val, ResumePoint(0))
    info = init_distributed("cpu")
    config = with_values(config, {"MODEL.RESUME": str(tmp_path / "last.pth")})
    logger = create_logger(str(tmp_path / "eval_logs"), 0, name="test_engine")
    feed = Feed.of(config, info.device, autocast_factory(info.device, None))
    assert run_eval(config, info, logger, str(tmp_path), EvalSizes(), feed, "off") == 0
    with open(os.path.join(tmp_path, "eval", "last-32.json")) as f:
        report = json.load(f)
    assert report["epoch"] == 0 and set(report["results"]) == {"model", "ema"}
    assert report["results"]["model"]["images"] == 9
