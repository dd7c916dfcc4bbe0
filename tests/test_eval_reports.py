"""What ``main.py --eval`` reports and the run's other human-facing outputs: the JSON, per-class
CSV and confusion PNG against a hand count, the size sweep against separate evaluations, subset
evaluation of a 10-class checkpoint on a 3-class val folder, the same numbers from 2 processes,
``curves.png``, the optional trackers (fake ``wandb``/``mlflow`` modules) and progress bars.

The checkpoints here are a very small MOAT written in-process (``write_checkpoint``); its head is
scaled up so its predictions differ from image to image and the confusion matrix is not one column.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main as trainer
from config import get_config
from conftest import make_image_tree
from data import ClassFolderDataset, build_transform
from models import MoatCfg, create_moat
from reports import plots
from reports.run_records import RunRecords
from reports.trackers import build_trackers

PROBE_ARCH = MoatCfg(
    stem_dims=(8, 8), depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), stage_types=("mbconv", "mbconv", "moat", "moat")
)
PROBE_NAME = "eval_probe"


def probe_model(num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_moat(PROBE_NAME, cfg=PROBE_ARCH, num_classes=num_classes)
    with torch.no_grad():
        model.head.fc.weight.mul_(200.0)  # spread the logits: predictions then vary between images
    return model.eval()


def write_checkpoint(path: str, class_names, ema: bool = True, seed: int = 0) -> str:
    """A trainer-style checkpoint (weights, architecture, class names) of the probe model."""
    ckpt = {
        "model": probe_model(len(class_names), seed).state_dict(),
        "class_names": list(class_names),
        "model_name": PROBE_NAME,
        "model_cfg": PROBE_ARCH.to_dict(),
        "epoch": 3,
    }
    if ema:
        ckpt["model_ema"] = probe_model(len(class_names), seed + 1).state_dict()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path)
    return path


def eval_argv(cfg: str, data: str, checkpoint: str, out: str, *extra: str) -> list:
    return ["--cfg", cfg, "--data-path", data, "--output", out, "--eval", "--resume", checkpoint, *extra]


def hand_count(checkpoint: str, cfg: str, data: str, weights: str = "model", img_size: int = 32, crop_pct=None):
    """(confusion [true][predicted] as nested lists, mean CE loss, the outputs that win over all
    outputs) computed here, one image at a time, from the model's own predictions over ``val/``
    with the eval transform; a val set of fewer classes is scored on its classes' outputs only."""
    ckpt = torch.load(checkpoint, weights_only=True)
    classes = ckpt["class_names"]
    model = create_moat(PROBE_NAME, cfg=MoatCfg.from_dict(ckpt["model_cfg"]), num_classes=len(classes))
    model.load_state_dict(ckpt["model_ema" if weights == "ema" else "model"])
    model.eval()
    opts = ["DATA.IMG_SIZE", str(img_size)] + (["DATA.CROP_PCT", str(crop_pct)] if crop_pct else [])
    config = get_config(trainer.get_args_parser().parse_args(["--cfg", cfg, "--data-path", data, "--opts", *opts]))
    dataset = ClassFolderDataset(os.path.join(data, "val"), transform=build_transform(False, config))
    columns = [classes.index(name) for name in dataset.classes]  # the val classes' outputs
    k = len(columns)
    counts = [[0] * k for _ in range(k)]
    losses, winners = [], set()
    with torch.no_grad():
        for i in range(len(dataset)):
            image, label = dataset[i]
            every = model(image[None])[0]
            winners.add(int(every.argmax()))
            logits = every[columns]
            counts[label][int(logits.argmax())] += 1
            losses.append(float(F.cross_entropy(logits[None], torch.tensor([label]))))
    return counts, sum(losses) / len(losses), winners


def read_csv(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------- JSON, CSV, PNG by hand
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, image_tree, tiny_cfg):
    """One ``--eval`` of a 3-class probe checkpoint with EMA: (checkpoint, cfg, eval folder, JSON)."""
    root = tmp_path_factory.mktemp("evaluated")
    checkpoint = write_checkpoint(str(root / "run" / "best.pth"), ["blue", "green", "red"])
    cfg = tiny_cfg()
    assert trainer.main(eval_argv(cfg, image_tree, checkpoint, str(root / "out"))) == 0
    folder = str(root / "run" / "eval")
    with open(os.path.join(folder, "best-32.json")) as f:
        return checkpoint, cfg, folder, json.load(f)


def test_eval_json_holds_the_numbers_and_what_was_evaluated(evaluated, image_tree):
    checkpoint, cfg, folder, report = evaluated
    assert report["model_name"] == PROBE_NAME and report["checkpoint"] == os.path.abspath(checkpoint)
    assert report["img_size"] == 32 and report["epoch"] == 3
    assert report["preprocessing"] == {
        "img_size": 32,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "crop": True,
    }
    assert len(report["config_sha256"]) == 64 and int(report["config_sha256"], 16) >= 0
    assert report["classes"] == {"subset": False, "count": 3, "of": 3, "names": ["blue", "green", "red"]}
    assert set(report["results"]) == {"model", "ema"}
    for weights in ("model", "ema"):
        counts, loss, _ = hand_count(checkpoint, cfg, image_tree, weights=weights)
        got = report["results"][weights]
        assert got["images"] == 9
        assert got["top1"] == pytest.approx(100.0 * sum(counts[i][i] for i in range(3)) / 9)
        assert got["top5"] == 100.0  # 3 classes
        assert got["loss"] == pytest.approx(loss, rel=1e-4)
        assert set(report["files"][weights]) == {"per_class", "confusion"}
        assert all(os.path.isfile(os.path.join(folder, name)) for name in report["files"][weights].values())


def test_per_class_csv_is_the_hand_counted_confusion_matrix(evaluated, image_tree):
    checkpoint, cfg, folder, report = evaluated
    for weights in ("model", "ema"):
        counts, _, _ = hand_count(checkpoint, cfg, image_tree, weights=weights)
        assert sum(1 for j in range(3) if any(counts[i][j] for i in range(3))) >= 2  # a real matrix
        rows = read_csv(os.path.join(folder, f"best-32-{weights}-per_class.csv"))
        assert [r["class"] for r in rows] == ["blue", "green", "red"]
        for i, row in enumerate(rows):
            predicted = sum(counts[t][i] for t in range(3))
            assert (int(row["support"]), int(row["correct"]), int(row["predicted"])) == (3, counts[i][i], predicted)
            assert float(row["recall"]) == pytest.approx(100.0 * counts[i][i] / 3, abs=1e-3)
            assert float(row["accuracy"]) == float(row["recall"])
            assert float(row["precision"]) == pytest.approx(100.0 * counts[i][i] / max(predicted, 1), abs=1e-3)
            wrong = {j: counts[i][j] for j in range(3) if j != i}
            worst = max(wrong, key=lambda j: (wrong[j], -j))
            assert int(row["most_confused_count"]) == wrong[worst]
            if wrong[worst]:
                assert row["most_confused_with"] == ["blue", "green", "red"][worst]


def test_support_weighted_recall_is_the_top1(evaluated):
    _, _, folder, report = evaluated
    for weights in ("model", "ema"):
        rows = read_csv(os.path.join(folder, f"best-32-{weights}-per_class.csv"))
        support = [int(r["support"]) for r in rows]
        weighted = sum(s * float(r["recall"]) for s, r in zip(support, rows)) / sum(support)
        assert weighted == pytest.approx(report["results"][weights]["top1"], abs=1e-3)


def test_confusion_pngs_open_as_images_of_the_expected_size(evaluated, tmp_path):
    _, _, folder, report = evaluated
    for weights in ("model", "ema"):
        with Image.open(os.path.join(folder, report["files"][weights]["confusion"])) as image:
            assert image.format == "PNG" and image.size == plots.MATRIX_SIZE
    # Over MATRIX_MAX_CLASSES classes the figure is the most-confused-pairs bar chart.
    k = plots.MATRIX_MAX_CLASSES + 10
    confusion = torch.eye(k, dtype=torch.int64) * 5
    confusion[3, 7], confusion[12, 1] = 4, 2
    path = plots.plot_confusion(confusion, [f"n{i:08d}" for i in range(k)], str(tmp_path / "pairs.png"), "many")
    with Image.open(path) as image:
        assert image.size == plots.PAIRS_SIZE


def test_most_confused_pairs_are_the_largest_off_diagonal_cells():
    from utils.metrics import most_confused_pairs

    confusion = torch.tensor([[9, 1, 4], [0, 8, 0], [2, 4, 7]])
    assert most_confused_pairs(confusion, 3) == [(0, 2, 4), (2, 1, 4), (2, 0, 2)]
    assert most_confused_pairs(torch.eye(3, dtype=torch.int64), 5) == []


# ------------------------------------------------------------------------------- size sweep
def test_size_sweep_equals_separate_evals_at_each_size(image_tree, tiny_cfg, tmp_path):
    checkpoint = write_checkpoint(str(tmp_path / "run" / "last.pth"), ["blue", "green", "red"], ema=False)
    folder = tmp_path / "run" / "eval"
    cfg = tiny_cfg()
    sweep = ["--eval-sizes", "32", "64", "--eval-crop-pcts", "0.875", "1.0"]
    assert trainer.main(eval_argv(cfg, image_tree, checkpoint, str(tmp_path / "out"), *sweep)) == 0
    swept = {size: json.loads((folder / f"last-{size}.json").read_text()) for size in (32, 64)}
    table = read_csv(str(folder / "last-sizes.csv"))
    assert [(r["img_size"], r["crop_pct"], r["weights"]) for r in table] == [
        ("32", "0.875", "model"),
        ("64", "1.0", "model"),
    ]
    for size, crop in ((32, 0.875), (64, 1.0)):
        opts = ["--opts", "DATA.IMG_SIZE", str(size), "DATA.CROP_PCT", str(crop)]
        assert trainer.main(eval_argv(cfg, image_tree, checkpoint, str(tmp_path / "out"), *opts)) == 0
        alone = json.loads((folder / f"last-{size}.json").read_text())
        assert alone["results"] == swept[size]["results"]
        assert alone["preprocessing"] == swept[size]["preprocessing"]
        assert alone["preprocessing"]["crop_pct"] == crop
        assert alone["config_sha256"] == swept[size]["config_sha256"]
        row = next(r for r in table if int(r["img_size"]) == size)
        assert float(row["top1"]) == pytest.approx(alone["results"]["model"]["top1"], abs=1e-3)
    assert swept[32]["config_sha256"] != swept[64]["config_sha256"]


def test_a_size_the_attention_windows_do_not_divide_is_a_one_line_error(
    reference_run, image_tree, tiny_cfg, tmp_path, capsys
):
    # 4x4 windows in stage 3: its 4x4 map at 64 px fits, its 6x6 map at 96 px does not.
    cfg = tiny_cfg(DATA={"IMG_SIZE": 64}, MODEL={"MOAT": {"WINDOW_SIZE": [4, 0]}})
    checkpoint = os.path.join(reference_run, "last.pth")
    argv = eval_argv(cfg, image_tree, checkpoint, str(tmp_path), "--eval-sizes", "64", "96")
    assert trainer.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot evaluate at 96 px") and "\n" not in err and "6x6" in err
    assert not os.path.exists(os.path.join(reference_run, "eval", "last-64.json"))  # checked before evaluating


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--eval-sizes", "64"], "need --eval"),
        (["--eval", "--eval-sizes", "32", "64", "--eval-crop-pcts", "0.9"], "one value per size"),
        (["--eval", "--eval-sizes", "32", "32"], "distinct"),
        (["--eval", "--eval-sizes", "32", "--eval-crop-pcts", "1.5"], "(0, 1]"),
    ],
)
def test_eval_size_flag_mistakes_are_one_line_errors(extra, needle, image_tree, tiny_cfg, tmp_path, capsys):
    assert trainer.main(["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err


# ------------------------------------------------------------------------------ subset eval
TEN_CLASSES = ["cat", "green", "dog", "red", "owl", "fox", "blue", "elk", "yak", "emu"]


def test_ten_class_checkpoint_is_scored_on_a_three_class_val_folder_alone(tiny_cfg, tmp_path):
    data = make_image_tree(str(tmp_path / "data"), train_per_class=0, val_per_class=3)
    shutil.rmtree(tmp_path / "data" / "train")  # --eval needs the val folder only
    checkpoint = write_checkpoint(str(tmp_path / "run" / "best.pth"), TEN_CLASSES, ema=False)
    cfg = tiny_cfg(MODEL={"NUM_CLASSES": 3})  # the head size comes from the checkpoint (10)
    assert trainer.main(eval_argv(cfg, data, checkpoint, str(tmp_path / "out"))) == 0
    report = json.loads((tmp_path / "run" / "eval" / "best-32.json").read_text())
    assert report["classes"] == {
        "subset": True,
        "count": 3,
        "of": 10,
        "names": ["blue", "green", "red"],
        "checkpoint_indices": [6, 1, 3],
    }
    counts, loss, winners = hand_count(checkpoint, cfg, data)
    got = report["results"]["model"]
    assert got["images"] == 9 and got["loss"] == pytest.approx(loss, rel=1e-4)
    assert got["top1"] == pytest.approx(100.0 * sum(counts[i][i] for i in range(3)) / 9)
    assert winners - {6, 1, 3}  # restricting matters: over all 10 outputs some image goes elsewhere
    rows = read_csv(str(tmp_path / "run" / "eval" / "best-32-model-per_class.csv"))
    assert [r["class"] for r in rows] == ["blue", "green", "red"]


def test_a_val_class_the_checkpoint_lacks_is_a_one_line_error_naming_it(tiny_cfg, tmp_path, capsys):
    data = make_image_tree(str(tmp_path / "data"), train_per_class=0, val_per_class=1, classes=["red", "purple"])
    checkpoint = write_checkpoint(str(tmp_path / "run" / "best.pth"), TEN_CLASSES, ema=False)
    cfg = tiny_cfg(MODEL={"NUM_CLASSES": 10})
    assert trainer.main(eval_argv(cfg, data, checkpoint, str(tmp_path / "out"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: val class 'purple' is not one of the 10 classes of") and "\n" not in err


def test_match_classes_maps_labels_to_checkpoint_outputs_and_restricts_to_present_labels():
    from utils.class_subset import match_classes

    assert match_classes(["a", "b"], [0, 1], ["a", "b"], 2, "ckpt") is None  # nothing to restrict
    assert match_classes(["x", "y"], [0, 1], None, 2, "ckpt") is None  # no names: outputs = labels
    # A dataset whose classes are a full class map but whose images hold labels 1 and 3 only.
    subset = match_classes(["a", "b", "c", "d"], [1, 3], ["d", "c", "b", "a"], 4, "ckpt")
    assert (subset.names, subset.logit_index, subset.label_map) == (["b", "d"], [2, 0], [-1, 0, -1, 1])
    logits, target = subset.apply(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([3]))
    assert logits.tolist() == [[2.0, 0.0]] and target.tolist() == [1]
    with pytest.raises(ValueError, match="stores no class names"):
        match_classes(["a"], [0], None, 2, "ckpt")


# ----------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_two_process_eval_gives_the_same_json_numbers_as_one(image_tree, tiny_cfg, run_cli, tmp_path):
    cfg = tiny_cfg()
    reports = {}
    for procs in (1, 2):
        checkpoint = write_checkpoint(str(tmp_path / f"run{procs}" / "best.pth"), ["blue", "green", "red"])
        launcher = [f"--nproc_per_node={procs}"] if procs > 1 else None
        proc = run_cli(eval_argv(cfg, image_tree, checkpoint, str(tmp_path / "out")), launcher=launcher)
        assert proc.returncode == 0, proc.stderr[-3000:]
        folder = tmp_path / f"run{procs}" / "eval"
        reports[procs] = json.loads((folder / "best-32.json").read_text())
        reports[procs]["per_class"] = read_csv(str(folder / "best-32-model-per_class.csv"))
    one, two = reports[1], reports[2]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["results"]["model"]["images"] == 9  # 5 + 4 images, none padded
    for weights in ("model", "ema"):
        a, b = one["results"][weights], two["results"][weights]
        assert (a["top1"], a["top5"], a["images"]) == (b["top1"], b["top5"], b["images"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert one["per_class"] == two["per_class"]


# ------------------------------------------------------------------------- curves and trackers
def test_training_redraws_curves_png_beside_summary_csv(reference_run):
    with Image.open(os.path.join(reference_run, "curves.png")) as image:
        assert image.format == "PNG" and image.size == plots.CURVES_SIZE


def _row(epoch: int, ema="") -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0 - 0.1 * epoch,
        "lr": 1e-3,
        "val_loss": 1.1,
        "val_top1": 30.0 + epoch,
        "val_top5": 90.0,
        "ema_top1": ema,
        "ema_top5": ema,
        "max_accuracy": 30.0 + epoch,
        "epoch_time_s": 1.0,
    }


class FakeWandb(types.ModuleType):
    """Records the calls the wandb tracker makes (``init`` returns a run with an ``id``)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return types.SimpleNamespace(id=kwargs.get("id") or "run-1")

    def log(self, metrics, step=None):
        self.calls.append(("log", step, dict(metrics)))

    def finish(self):
        self.calls.append(("finish",))


class FakeMlflow(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("mlflow")
        self.calls = []

    def set_tracking_uri(self, uri):
        self.calls.append(("set_tracking_uri", uri))

    def set_experiment(self, name):
        self.calls.append(("set_experiment", name))

    def start_run(self, run_id=None, run_name=None):
        self.calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "ml-1"))

    def log_dict(self, obj, name):
        self.calls.append(("log_dict", name))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("log_metrics", step, dict(metrics)))

    def end_run(self):
        self.calls.append(("end_run",))


def tracking_config(**keys):
    config = get_config().clone()
    config.defrost()
    for key, value in keys.items():
        config.TRACKING[key] = value
    config.freeze()
    return config


def test_run_records_send_steps_and_epochs_to_trackers_and_redraw_curves(monkeypatch, tmp_path):
    wandb, mlflow = FakeWandb(), FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    config = tracking_config(
        WANDB=True, WANDB_PROJECT="moat", WANDB_MODE="offline", MLFLOW=True, MLFLOW_EXPERIMENT="exp"
    )
    logger = logging.getLogger("test_trackers")
    trackers = build_trackers(config, {"MODEL": {"NAME": "moat_0"}}, str(tmp_path), logger)
    records = RunRecords(str(tmp_path), is_primary=True, tensorboard=False, trackers=trackers)
    records.start_trackers(None)
    assert records.tracker_run_ids == {"wandb": "run-1", "mlflow": "ml-1"}
    records.add_step(6, loss=0.9, lr=1e-3)
    records.add_epoch(_row(0))
    with Image.open(records.curves_path) as image:
        assert image.size == plots.CURVES_SIZE
    records.add_step(12, loss=0.8, lr=1e-4)
    records.add_epoch(_row(1, ema=31.0))
    records.close()

    init = wandb.calls[0]
    assert init[0] == "init" and init[1]["project"] == "moat" and init[1]["mode"] == "offline"
    assert "id" not in init[1] and init[1]["config"] == {"MODEL": {"NAME": "moat_0"}}
    logs = [c for c in wandb.calls if c[0] == "log"]
    assert logs[0] == ("log", 6, {"train/loss": 0.9, "train/lr": 1e-3})
    assert logs[1] == (
        "log",
        6,
        {"epoch/train_loss": 1.0, "val/top1": 30.0, "val/top5": 90.0, "val/loss": 1.1, "epoch": 0},
    )
    assert logs[3][:2] == ("log", 12) and logs[3][2]["val/ema_top1"] == 31.0 and logs[3][2]["epoch"] == 1
    assert wandb.calls[-1] == ("finish",)
    assert mlflow.calls[:3] == [
        ("set_experiment", "exp"),
        ("start_run", None, "moat_0/default"),
        ("log_dict", "config.json"),
    ]
    assert ("log_metrics", 12, {"train/loss": 0.8, "train/lr": 1e-4}) in mlflow.calls
    assert mlflow.calls[-1] == ("end_run",)


def test_trackers_continue_the_saved_run_ids(monkeypatch, tmp_path):
    wandb, mlflow = FakeWandb(), FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    config = tracking_config(WANDB=True, MLFLOW=True, MLFLOW_TRACKING_URI="file:./mlruns")
    trackers = build_trackers(config, {}, str(tmp_path), logging.getLogger("test_trackers"))
    records = RunRecords(str(tmp_path), is_primary=True, tensorboard=False, trackers=trackers)
    records.start_trackers({"wandb": "abc123", "mlflow": "run-9", "other": "kept"})
    assert wandb.calls[0][1]["id"] == "abc123" and wandb.calls[0][1]["resume"] == "allow"
    assert ("start_run", "run-9", None) in mlflow.calls and ("set_tracking_uri", "file:./mlruns") in mlflow.calls
    assert records.tracker_run_ids == {"wandb": "abc123", "mlflow": "run-9", "other": "kept"}
    records.close()


def test_a_missing_tracker_package_is_a_warning_and_a_failing_tracker_is_switched_off(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    logger = logging.getLogger("test_trackers")
    with caplog.at_level(logging.WARNING):
        assert build_trackers(tracking_config(WANDB=True), {}, str(tmp_path), logger) == []
    (record,) = caplog.records
    assert "--log-wandb" in record.getMessage() and "pip install wandb" in record.getMessage()
    assert "\n" not in record.getMessage()

    broken = FakeWandb()
    broken.log = lambda metrics, step=None: 1 / 0
    monkeypatch.setitem(sys.modules, "wandb", broken)
    trackers = build_trackers(tracking_config(WANDB=True), {}, str(tmp_path), logger)
    records = RunRecords(str(tmp_path), is_primary=True, tensorboard=False, trackers=trackers)
    records.start_trackers()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        records.add_step(1, loss=1.0)  # raises inside the tracker: logged, tracker dropped
        records.add_step(2, loss=1.0)
    assert records.trackers == [] and len(caplog.records) == 1 and "ZeroDivisionError" in caplog.text
    records.close()


def test_tracking_keys_are_checked_and_do_not_count_as_a_changed_experiment(tmp_path):
    from config import config_differences, config_to_dict
    from utils import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("TRACKING:\n  WANDB_MODE: sometimes\n")
    with pytest.raises(ConfigError, match="TRACKING.WANDB_MODE"):
        get_config(trainer.get_args_parser().parse_args(["--cfg", str(cfg)]))
    logged = tracking_config(WANDB=True, WANDB_PROJECT="p", MLFLOW=True, MLFLOW_TRACKING_URI="file:./m")
    assert config_differences(config_to_dict(get_config()), config_to_dict(logged)) == []


@pytest.mark.slow
def test_log_wandb_run_saves_its_run_id_and_a_resumed_run_continues_it(monkeypatch, tiny_cfg, tmp_path):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    data = make_image_tree(str(tmp_path / "data"), train_per_class=2, val_per_class=1)  # 1 step per epoch
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1, "WARMUP_EPOCHS": 0, "EMA": {"ENABLE": False}})
    argv = ["--cfg", cfg, "--data-path", data, "--output", str(tmp_path), "--log-wandb"]
    assert trainer.main(argv) == 0
    last = os.path.join(tmp_path, "tiny_moat_0", "default", "last.pth")
    assert torch.load(last, weights_only=True)["tracker_run_ids"] == {"wandb": "run-1"}
    assert "id" not in wandb.calls[0][1]
    assert any(c[0] == "log" and "val/top1" in c[2] for c in wandb.calls) and wandb.calls[-1] == ("finish",)

    wandb.calls.clear()
    assert trainer.main(argv + ["--opts", "TRAIN.EPOCHS", "2"]) == 0  # auto-resumes from last.pth
    assert wandb.calls[0][1]["id"] == "run-1" and wandb.calls[0][1]["resume"] == "allow"
    assert torch.load(last, weights_only=True)["tracker_run_ids"] == {"wandb": "run-1"}


# ----------------------------------------------------------------------------- progress bars
class _Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_eval_draws_a_progress_bar_only_on_a_terminal(tty, monkeypatch, evaluated, image_tree, tiny_cfg):
    from engine import Feed, evaluate

    checkpoint, cfg, _, _ = evaluated
    config = get_config(trainer.get_args_parser().parse_args(["--cfg", cfg, "--data-path", image_tree]))
    dataset = ClassFolderDataset(os.path.join(image_tree, "val"), transform=build_transform(False, config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    model = create_moat(PROBE_NAME, cfg=PROBE_ARCH, num_classes=3).eval()
    stderr = _Terminal(tty)
    monkeypatch.setattr(sys, "stderr", stderr)
    logger = logging.getLogger("test_progress")
    feed = Feed(torch.device("cpu"), torch.contiguous_format, lambda: torch.autocast("cpu", enabled=False))
    metrics = evaluate(model, loader, feed, logger=logger, show_progress=True)
    assert metrics["n"] == 9
    drawn = stderr.getvalue()
    if tty:
        assert "eval model" in drawn and "/3 [" in drawn  # a tqdm frame: "eval model: ... 0/3 [00:00<?"
    else:
        assert drawn == ""
