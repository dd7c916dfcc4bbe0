"""What the paper's protocol needs of the trainer: the number a run reports (TRAIN.REPORT), the
EMA ramped as TensorFlow ramps it (TRAIN.EMA.RAMP), validation held out of a train split without
a val split (DATA.VAL_HOLDOUT, DATA.DATASET imagenet22k), and the classifier of a fine-tune
(MODEL.PRETRAINED_HEAD); and that configs written before these keys load with their meaning."""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from test_data_formats import make_config

from checkpoints import load_pretrained, read_checkpoint, weights_checkpoint
from config import RULES, config_from_dict, config_to_dict, get_config, run_config_changes, with_values
from conftest import load_checkpoint, make_image_tree, read_log, read_summary
from data import build_loader
from data.build import check_class_count
from data.holdout import holdout_indices
from engine import EMA_RAMPS, Feed, ResumePoint, build_ema
from evaluation import EvalSizes, reported_result, run_eval
from logger import close_logger, create_logger
from models import build_model
from tools.make_shards import make_shards
from utils.amp import autocast_factory
from utils.distributed import init_distributed
from utils.errors import ConfigError, DataError, UserError

DECAY = 0.9999


def tf_decay(t: int, decay: float = DECAY) -> float:
    """TensorFlow's ExponentialMovingAverage(decay, num_updates=t): the decay of update t."""
    return min(decay, (1.0 + t) / (10.0 + t))


def config_of(cfg: str, *opts) -> object:
    return get_config(argparse.Namespace(cfg=cfg, opts=list(opts) or None))


# ----------------------------------------------------------------------------------- EMA ramp
def test_the_tf_ramp_is_tensorflows_decay_at_every_update():
    ema = build_ema(config_of(os.path.join("configs", "moat_0.yaml")), nn.Linear(2, 2))
    assert ema is not None and ema.decay == DECAY
    for t in range(1, 200_001):
        assert ema.get_decay(t) == pytest.approx(tf_decay(t), rel=0, abs=1e-12), t
    # (1 + t) / (10 + t) reaches 0.9999 at t = 89,990, which recipes.md quotes.
    assert ema.get_decay(89_989) < DECAY == ema.get_decay(89_990)
    assert ema.get_decay(1) == pytest.approx(2 / 11)  # no copy at the first update: an average


def test_the_other_ramps_copy_at_the_first_update():
    model = nn.Linear(2, 2)
    timm = build_ema(config_of(os.path.join("configs", "moat_0.yaml"), "TRAIN.EMA.RAMP", "timm"), model)
    none = build_ema(config_of(os.path.join("configs", "moat_0.yaml"), "TRAIN.EMA.RAMP", "none"), model)
    assert timm.get_decay(1) == none.get_decay(1) == 0.0
    for t in (2, 10, 1000, 93_600):
        assert timm.get_decay(t) == pytest.approx(min(DECAY, 1 - t ** (-2 / 3)))
        assert none.get_decay(t) == DECAY
    assert build_ema(config_of(os.path.join("configs", "moat_0.yaml"), "TRAIN.EMA.ENABLE", "False"), model) is None
    assert set(EMA_RAMPS) == set(RULES["TRAIN.EMA.RAMP"].choices)


class Tiny(nn.Module):
    """Weights and BatchNorm statistics: TensorFlow's EMA as MaxViT's code averages both."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def tf_average(initial: dict, states: list, decay: float = DECAY) -> dict:
    """TensorFlow's moving average in float64: the shadow starts at the initial values, then
    ``shadow -= (1 - d_t) * (shadow - value_t)`` after update t = 1, 2, ..."""
    shadow = {k: v.double().clone() for k, v in initial.items() if v.is_floating_point()}
    for t, state in enumerate(states, start=1):
        d = tf_decay(t, decay)
        for k in shadow:
            shadow[k] -= (1 - d) * (shadow[k] - state[k].double())
    return shadow


def test_the_tf_ramp_averages_the_weights_as_tensorflow_does():
    torch.manual_seed(0)
    model = Tiny()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ema = build_ema(config_of(os.path.join("configs", "moat_0.yaml"), "TRAIN.EMA.DECAY", "0.9"), model)
    states = []
    for t in range(1, 60):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves the BatchNorm statistics
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model, step=t)
    want = tf_average(initial, states, decay=0.9)
    for name, value in ema.module.state_dict().items():
        if name in want:
            torch.testing.assert_close(value.double(), want[name], rtol=1e-5, atol=1e-6)
    # Not the plain last weights, nor what a copy at the first update would give.
    assert not torch.allclose(ema.module.fc.weight, model.fc.weight)


def test_the_trainer_passes_the_update_count_the_tf_ramp_is_written_for(trainer_parts):
    """The EMA the trainer keeps after an epoch is TensorFlow's average of the weights after each
    of its 6 updates, from the weights the run started with."""
    trainer, loaders, _ = trainer_parts(**{"TRAIN.EMA.DECAY": 0.99})
    assert trainer.config.TRAIN.EMA.RAMP == "tf"
    initial = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    steps, states = [], []
    update = trainer.ema.update

    def recording_update(model, step=None):
        steps.append(step)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        update(model, step=step)

    trainer.ema.update = recording_update
    trainer.fit(loaders.train, loaders.val, ResumePoint(0))
    assert steps == [1, 2, 3, 4, 5, 6]
    want = tf_average(initial, states, decay=0.99)
    for name, value in trainer.ema.module.state_dict().items():
        if name in want:
            torch.testing.assert_close(value.double(), want[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------- the reported number
def test_a_run_reports_the_last_epochs_ema_top1_and_still_writes_best(reference_run):
    rows = read_summary(reference_run)
    assert [float(r["reported_top1"]) for r in rows] == [float(r["ema_top1"]) for r in rows]
    assert os.path.isfile(os.path.join(reference_run, "best.pth"))
    ema_top1 = [float(r["ema_top1"]) for r in rows]
    best_epoch = 1 if ema_top1[1] > ema_top1[0] else 0
    log = read_log(reference_run)
    assert (
        f"reported top-1 {ema_top1[1]:.2f}%: the EMA weights of the last checkpoint (last.pth, epoch 1); "
        f"{max(ema_top1):.2f}% at the best (best.pth, epoch {best_epoch})"
    ) in log.splitlines()[-1]
    last = load_checkpoint(os.path.join(reference_run, "last.pth"))
    assert (last["best_epoch"], last["last_top1"]) == (best_epoch, pytest.approx(ema_top1[1], abs=1e-3))
    # best.pth is chosen by the reported weights' top-1.
    assert load_checkpoint(os.path.join(reference_run, "best.pth"))["epoch"] == best_epoch


def test_the_best_mode_reports_the_best_epoch_and_the_model_weights_when_asked(trainer_parts):
    trainer, loaders, _ = trainer_parts(**{"TRAIN.REPORT.CHECKPOINT": "best", "TRAIN.REPORT.WEIGHTS": "model"})
    trainer.fit(loaders.train, loaders.val, ResumePoint(0))
    (row,) = read_summary(trainer.saver.output_dir)
    assert float(row["reported_top1"]) == float(row["max_accuracy"]) == float(row["val_top1"])
    assert trainer.reported().startswith(f"reported top-1 {float(row['val_top1']):.2f}%: the model weights of the best")
    trainer.progress.best_epoch, trainer.progress.max_accuracy, trainer.progress.last_top1 = 3, 80.0, 75.0
    assert trainer.reported() == (
        "reported top-1 80.00%: the model weights of the best checkpoint (best.pth, epoch 3); the last epoch's 75.00%"
    )


def test_without_an_ema_the_reported_weights_are_the_models(trainer_parts):
    trainer, _, _ = trainer_parts(**{"TRAIN.EMA.ENABLE": False})
    assert trainer.config.TRAIN.REPORT.WEIGHTS == "ema" and trainer.report_weights == "model"


def eval_json(config, checkpoint: str, tmp_path) -> dict:
    info = init_distributed("cpu")
    config = with_values(config, {"MODEL.RESUME": checkpoint})
    logger = create_logger(str(tmp_path / "eval_logs"), 0, name="test_protocol_eval")
    feed = Feed.of(config, info.device, autocast_factory(info.device, None))
    try:
        assert run_eval(config, info, logger, str(tmp_path), EvalSizes(), feed, "off") == 0
    finally:
        close_logger("test_protocol_eval")
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    with open(os.path.join(os.path.dirname(checkpoint), "eval", f"{stem}-32.json")) as f:
        return json.load(f)


def test_eval_json_says_which_number_is_reported_and_whether_the_file_is_that_checkpoint(
    reference_run, tiny_cfg, image_tree, tmp_path
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns("eval"))
    config = config_of(tiny_cfg(), "DATA.DATA_PATH", image_tree)
    rows = read_summary(str(run))
    best_epoch = load_checkpoint(str(run / "last.pth"))["best_epoch"]
    last = eval_json(config, str(run / "last.pth"), tmp_path)
    assert last["reported"] == {
        "weights": "ema",
        "ema": True,
        "top1": last["results"]["ema"]["top1"],
        "top5": last["results"]["ema"]["top5"],
        "checkpoint": "last",
        "is_last": True,
        "is_best": best_epoch == 1,
        "is_reported_checkpoint": True,
    }
    # The eval of last.pth is the number the run reported at its end.
    assert last["reported"]["top1"] == pytest.approx(float(rows[-1]["reported_top1"]), abs=1e-3)
    first = eval_json(with_values(config, {"TRAIN.REPORT.WEIGHTS": "model"}), str(run / "epoch_0.pth"), tmp_path)
    assert first["reported"]["weights"] == "model" and not first["reported"]["ema"]
    assert (first["reported"]["is_last"], first["reported"]["is_reported_checkpoint"]) == (False, False)
    assert first["reported"]["is_best"] == (best_epoch == 0)


def test_reported_of_a_weights_file_cannot_say_which_checkpoint_it_was(tmp_path):
    model = build_model(tiny_config(3))
    path = str(tmp_path / "w.pth")
    torch.save(weights_checkpoint(model, "tiny_moat_0", ["a", "b", "c"], {}, {"weights": "ema"}), path)
    record = read_checkpoint(path)
    results = {"model": {"acc1": 50.0, "acc5": 100.0}}
    got = reported_result(get_config(), record, results)
    assert got["weights"] == "model" and got["ema"] is True  # the file's one set is the EMA
    assert got["is_last"] is got["is_best"] is got["is_reported_checkpoint"] is None


# ---------------------------------------------------------------------- configs before the keys
OLD_KEYS = {
    (True, True): ("timm", "ema"),
    (False, False): ("none", "model"),
}


@pytest.mark.parametrize("warmup, select_best", list(OLD_KEYS))
def test_files_with_the_old_ema_keys_load_with_their_meaning(warmup, select_best, tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"TRAIN": {"EMA": {"WARMUP": warmup, "SELECT_BEST": select_best}}}))
    config = config_of(str(path))
    assert (config.TRAIN.EMA.RAMP, config.TRAIN.REPORT.WEIGHTS) == OLD_KEYS[warmup, select_best]
    opts = config_of(os.path.join("configs", "moat_0.yaml"), "TRAIN.EMA.WARMUP", str(warmup))
    assert opts.TRAIN.EMA.RAMP == OLD_KEYS[warmup, select_best][0]


def test_a_saved_config_of_the_old_keys_is_the_same_run(tmp_path):
    """A run folder's config.yaml written before the keys (every key, the old ones included)
    reads as the same experiment as the run config made from the same file today."""
    tree = config_to_dict(get_config())
    del tree["TRAIN"]["EMA"]["RAMP"], tree["TRAIN"]["REPORT"]
    tree["TRAIN"]["EMA"].update(WARMUP=False, SELECT_BEST=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    saved = config_from_dict(tree)
    assert (saved.TRAIN.EMA.RAMP, saved.TRAIN.REPORT.WEIGHTS) == ("none", "ema")
    same = config_of(str(tmp_path / "config.yaml"))
    assert run_config_changes(same, str(tmp_path)) == []
    changed = run_config_changes(get_config(), str(tmp_path))
    assert changed == ["TRAIN.EMA.RAMP: 'none' -> 'tf'"]


def test_old_and_new_ema_keys_that_disagree_are_one_line(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"TRAIN": {"EMA": {"WARMUP": True, "RAMP": "none"}}}))
    with pytest.raises(ConfigError) as e:
        config_of(str(path))
    assert str(e.value) == (
        f"{path}: TRAIN.EMA.WARMUP: True means TRAIN.EMA.RAMP 'timm', but TRAIN.EMA.RAMP is 'none': "
        "keep TRAIN.EMA.RAMP only"
    )
    path.write_text(yaml.safe_dump({"TRAIN": {"EMA": {"SELECT_BEST": "yes"}}}))
    with pytest.raises(
        ConfigError, match=r"invalid TRAIN.EMA.SELECT_BEST='yes': accepted: True, False \(or use TRAIN.REPORT.WEIGHTS\)"
    ):
        config_of(str(path))
    with pytest.raises(ConfigError, match=r"TRAIN.REPORT.CHECKPOINT='first': accepted: 'last', 'best'"):
        config_of(os.path.join("configs", "moat_0.yaml"), "TRAIN.REPORT.CHECKPOINT", "first")


# --------------------------------------------------------------------------- ImageNet-22K data
def test_imagenet22k_expects_21841_classes_in_one_line(image_tree, tiny_cfg):
    config = config_of(tiny_cfg(DATA={"DATASET": "imagenet22k"}), "DATA.DATA_PATH", image_tree)
    with pytest.raises(DataError) as e:
        build_loader(config)
    assert str(e.value) == (
        f"found 3 class folders in {os.path.join(image_tree, 'train')}, but DATA.DATASET 'imagenet22k' expects "
        "21841; for another dataset use DATA.DATASET imagefolder (--dataset imagefolder) and MODEL.NUM_CLASSES 3"
    )
    full = argparse.Namespace(classes=[f"n{i:08d}" for i in range(21841)], root="22k")
    check_class_count(full, with_values(config, {"MODEL.NUM_CLASSES": 21841}))


def test_holdout_takes_n_images_of_each_class_and_depends_on_the_class_alone():
    classes = ["a", "b", "c", "d"]
    targets = np.repeat([0, 1, 2, 3], [10, 3, 1, 7])
    train, held = holdout_indices(targets, 3, classes)
    assert np.bincount(targets[held], minlength=4).tolist() == [3, 2, 0, 3]  # every class keeps one
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(targets)))
    assert held.tolist() == holdout_indices(targets, 3, classes)[1].tolist()  # deterministic
    # Class 'd' gains images at the end and class 'a' disappears: 'b' holds out the same images.
    grown = np.repeat([1, 2, 3], [3, 1, 12])
    _, held2 = holdout_indices(grown, 3, classes)
    b_before, b_after = held[targets[held] == 1], held2[grown[held2] == 1]
    assert (b_before - 10).tolist() == b_after.tolist()
    # Not simply the first or last images of a class.
    a = sorted(held[targets[held] == 0].tolist())
    assert a != [0, 1, 2] and a != [7, 8, 9]


def holdout_loaders(data_path: str, fmt: str = "folder", with_train: bool = True, **keys):
    config = make_config(data_path, fmt, VAL_HOLDOUT=2, **keys)
    return build_loader(config, with_train=with_train)


def test_held_out_images_validate_and_never_train(image_tree, caplog):
    caplog.set_level(logging.INFO, logger="data.holdout")
    loaders = holdout_loaders(image_tree, VAL_SPLIT="no_such_split")  # the val split is not read
    train, val = loaders.train_dataset, loaders.val_dataset
    assert (len(train), len(val)) == (18, 6)
    train_files = {train.sample_name(i) for i in range(len(train))}
    val_files = {val.sample_name(i) for i in range(len(val))}
    assert not train_files & val_files and all(f"{os.sep}train{os.sep}" in f for f in val_files)
    assert sorted(np.bincount(val.targets).tolist()) == [2, 2, 2]
    assert "DATA.VAL_HOLDOUT 2: validating on 6 images held out of" in caplog.text
    # --eval validates on the same images, reading the train split only.
    alone = holdout_loaders(image_tree, with_train=False).val_dataset
    assert [alone.sample_name(i) for i in range(6)] == [val.sample_name(i) for i in range(6)]
    # The val transform, not the train one: the same tensor twice.
    x0, y0 = val[(0, 1)]
    x1, y1 = val[(0, 2)]
    assert torch.equal(x0, x1) and y0 == y1 and x0.shape == (3, 32, 32)


@pytest.fixture(scope="module")
def shard_data(image_tree, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shards"))
    make_shards(image_tree, out, shard_size=5)
    return out


def test_held_out_images_are_the_same_in_folders_and_shards(image_tree, shard_data):
    folder = holdout_loaders(image_tree).val
    shards = holdout_loaders(shard_data, "shards").val
    a, b = list(folder), list(shards)
    assert len(a) == len(b) == 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_holdout_refuses_a_part_cache_in_one_line():
    with pytest.raises(ConfigError, match="invalid DATA.VAL_HOLDOUT=2: cannot split a DATA.CACHE_MODE part cache"):
        config_of(os.path.join("configs", "moat_0.yaml"), "DATA.VAL_HOLDOUT", "2", "DATA.FORMAT", "zip")


def test_22k_configs_validate_on_held_out_images_and_load_the_head_as_recipes_md_says():
    pre = config_of(os.path.join("configs", "imagenet22k", "moat_3_22k.yaml"))
    ft = config_of(os.path.join("configs", "imagenet22k", "moat_3_22k_512_ft.yaml"))
    assert (pre.DATA.DATASET, pre.DATA.VAL_HOLDOUT, pre.MODEL.NUM_CLASSES) == ("imagenet22k", 2, 21841)
    assert (ft.DATA.DATASET, ft.DATA.VAL_HOLDOUT, ft.MODEL.PRETRAINED_HEAD) == ("imagenet", 0, "drop")


# ------------------------------------------------------------------------------ the fine-tune head
def tiny_config(num_classes: int = 5):
    return config_of(
        os.path.join("configs", "tiny_moat_0.yaml"), "DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", str(num_classes)
    )


@pytest.fixture
def five_class_weights(tmp_path) -> tuple:
    """A weights file of a 5-class tiny_moat_0 with class names, and that model."""
    torch.manual_seed(1)
    model = build_model(tiny_config(5))
    path = str(tmp_path / "five.pth")
    names = ["a", "b", "c", "d", "e"]
    torch.save(weights_checkpoint(model, "tiny_moat_0", names, {}, {"weights": "ema"}), path)
    return path, model


class Log:
    def __init__(self) -> None:
        self.lines = []

    def info(self, text: str) -> None:
        self.lines.append(text)


def fresh_model(num_classes: int) -> nn.Module:
    torch.manual_seed(2)
    return build_model(tiny_config(num_classes))


def test_auto_keeps_a_head_that_fits_and_drop_never_does(five_class_weights):
    path, source = five_class_weights
    kept = fresh_model(5)
    assert load_pretrained(path, kept, True, Log(), head="auto") == []
    assert torch.equal(kept.head.fc.weight, source.head.fc.weight)
    dropped, log = fresh_model(5), Log()
    init = dropped.head.fc.weight.clone()
    assert load_pretrained(path, dropped, True, log, head="drop") == ["head.fc.weight", "head.fc.bias"]
    assert torch.equal(dropped.head.fc.weight, init) and not torch.equal(init, source.head.fc.weight)
    assert torch.equal(dropped.stem.conv1.weight, source.stem.conv1.weight)  # the backbone is loaded
    assert torch.equal(dropped.head.norm.weight, source.head.norm.weight)
    assert log.lines == [
        f"loaded pretrained model weights from {path}; dropped the head (head.fc.weight, head.fc.bias): "
        "MODEL.PRETRAINED_HEAD drop, it starts fresh"
    ]


def test_map_takes_the_rows_of_this_runs_classes_by_name(five_class_weights):
    path, source = five_class_weights
    model, log = fresh_model(3), Log()
    assert load_pretrained(path, model, True, log, head="map", class_names=["d", "a", "c"]) == []
    rows = torch.tensor([3, 0, 2])
    assert torch.equal(model.head.fc.weight, source.head.fc.weight[rows])
    assert torch.equal(model.head.fc.bias, source.head.fc.bias[rows])
    assert torch.equal(model.stem.conv1.weight, source.stem.conv1.weight)
    assert log.lines == [
        f"loaded pretrained model weights from {path}; mapped the head: this run's 3 classes taken by name "
        "from the 5-class head"
    ]


def test_map_fails_in_one_line_when_a_class_name_is_missing(five_class_weights, tmp_path):
    path, source = five_class_weights
    with pytest.raises(UserError) as e:
        load_pretrained(path, fresh_model(3), True, Log(), head="map", class_names=["a", "x", "y"])
    assert str(e.value) == (
        f"{path}: MODEL.PRETRAINED_HEAD map: 2 of this run's 3 classes are not among the checkpoint's 5 "
        "(first: x, y); use MODEL.PRETRAINED_HEAD drop"
    )
    bare = str(tmp_path / "bare.pth")
    torch.save(source.state_dict(), bare)
    with pytest.raises(UserError, match="bare.pth: records no class names, which MODEL.PRETRAINED_HEAD map needs"):
        load_pretrained(bare, fresh_model(3), True, Log(), head="map", class_names=["a", "b", "c"])


@pytest.mark.slow
def test_a_fine_tune_maps_the_head_of_a_checkpoint_with_more_classes(reference_run, tiny_cfg, run_cli, tmp_path):
    """The 22K -> 1K fine-tune in small: the 3-class reference run's head cut to 2 of its classes."""
    data = make_image_tree(str(tmp_path / "two"), train_per_class=4, val_per_class=2, classes=["red", "green"])
    cfg = tiny_cfg(MODEL={"NUM_CLASSES": 2, "PRETRAINED_HEAD": "map"}, TRAIN={"EPOCHS": 1, "WARMUP_EPOCHS": 0})
    pretrained = os.path.join(reference_run, "last.pth")
    proc = run_cli(["--cfg", cfg, "--data-path", data, "--output", str(tmp_path / "out"), "--pretrained", pretrained])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(str(tmp_path / "out" / "tiny_moat_0" / "default"))
    assert "mapped the head: this run's 2 classes taken by name from the 3-class head" in log


@pytest.mark.slow
def test_a_run_validates_on_held_out_images_end_to_end(image_tree, tiny_cfg, run_cli, tmp_path):
    cfg = tiny_cfg(DATA={"VAL_HOLDOUT": 2, "VAL_SPLIT": "absent"}, TRAIN={"EPOCHS": 1, "WARMUP_EPOCHS": 0})
    proc = run_cli(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "tiny_moat_0" / "default"
    log = read_log(str(run))
    assert "18 train / 6 val images" in log and "DATA.VAL_HOLDOUT 2: validating on 6 images held out of" in log
    proc = run_cli(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path), "--eval"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "eval" / "last-32.json").read_text())
    assert report["results"]["ema"]["images"] == 6 and report["val_holdout"] == 2
