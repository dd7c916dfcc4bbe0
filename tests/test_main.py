"""End-to-end CPU runs of ``main.py``: training writes what it promises, ``--eval`` reproduces the
training's validation without training, auto-resume/``--resume``/``--pretrained``, throughput,
one-line user errors, and a 2-process ``torchrun`` (gloo) run whose eval equals a 1-process eval.

The reference 2-epoch run is a real subprocess (``conftest.reference_run``); the other runs call
``main.main(argv)`` in-process to save interpreter start-up time.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil

import pytest
import torch

import main as trainer
from conftest import CLASSES, make_image_tree, write_every_image_mode

ACC_RE = re.compile(r"\* (model|ema) Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) \((\d+) images")


def read_summary(run_dir):
    with open(os.path.join(run_dir, "summary.csv"), newline="") as f:
        return list(csv.DictReader(f))


def read_log(run_dir, rank=0):
    with open(os.path.join(run_dir, f"log_rank{rank}.txt")) as f:
        return f.read()


def accuracies(log_text):
    """{'model': (top1, top5, loss, n), 'ema': ...} from the last eval lines of a log."""
    found = {}
    for name, top1, top5, loss, n in ACC_RE.findall(log_text):
        found[name] = (float(top1), float(top5), float(loss), int(n))
    return found


def test_two_epoch_run_writes_checkpoints_summary_logs_and_tensorboard(reference_run):
    names = set(os.listdir(reference_run))
    assert {
        "last.pth",
        "best.pth",
        "epoch_0.pth",
        "epoch_1.pth",
        "config.yaml",
        "log_rank0.txt",
        "summary.csv",
    } <= names
    assert any(n.startswith("events.out.tfevents") for n in names)

    rows = read_summary(reference_run)
    assert [r["epoch"] for r in rows] == ["0", "1"]
    # LR at the end of each epoch: base after the 1-epoch warmup, MIN_LR at the end; both scaled
    # by the total batch 4 / 512 (BASE_LR 0.1, MIN_LR 1e-3 in the test config).
    assert float(rows[0]["lr"]) == pytest.approx(0.1 * 4 / 512)
    assert float(rows[1]["lr"]) == pytest.approx(1e-3 * 4 / 512)
    for row in rows:
        assert 0.0 < float(row["train_loss"]) < 5.0 and 0.0 < float(row["val_loss"]) < 10.0
        assert float(row["val_top5"]) == 100.0  # 3 classes: top-5 always hits
        assert row["ema_top1"] != ""

    ckpt = torch.load(os.path.join(reference_run, "last.pth"), map_location="cpu", weights_only=True)
    for key in (
        "model",
        "model_ema",
        "optimizer",
        "lr_scheduler",
        "scaler",
        "epoch",
        "step",
        "max_accuracy",
        "config",
        "class_names",
        "model_name",
        "rng_state",
    ):
        assert key in ckpt, key
    assert (ckpt["epoch"], ckpt["step"], ckpt["model_name"]) == (1, 12, "tiny_moat_0")
    assert ckpt["class_names"] == sorted(CLASSES) and ckpt["config"]["MODEL"]["NUM_CLASSES"] == 3
    assert ckpt["max_accuracy"] == pytest.approx(max(float(r["val_top1"]) for r in rows), abs=1e-3)
    first = torch.load(os.path.join(reference_run, "epoch_0.pth"), map_location="cpu", weights_only=True)
    assert not torch.equal(first["model"]["head.fc.weight"], ckpt["model"]["head.fc.weight"])

    log = read_log(reference_run)
    assert "Train: [1/2][5/6]" in log and "grad_norm" in log and "loss_scale" in log


def test_eval_reproduces_the_training_validation_and_never_trains(reference_run, image_tree, tiny_cfg, tmp_path):
    def run_files():  # the evaluated run's own files; --eval adds its reports under eval/ only
        return {p: os.path.getmtime(p) for p in glob.glob(os.path.join(reference_run, "*")) if not p.endswith("eval")}

    before = run_files()
    code = trainer.main(
        [
            "--cfg",
            tiny_cfg(),
            "--data-path",
            image_tree,
            "--output",
            str(tmp_path),
            "--eval",
            "--resume",
            os.path.join(reference_run, "last.pth"),
        ]
    )
    assert code == 0
    run_dir = os.path.join(tmp_path, "tiny_moat_0", "default")
    acc = accuracies(read_log(run_dir))
    last = read_summary(reference_run)[-1]
    assert acc["model"][0] == pytest.approx(float(last["val_top1"]), abs=1e-3)
    assert acc["model"][2] == pytest.approx(float(last["val_loss"]), abs=1e-4)
    assert acc["ema"][0] == pytest.approx(float(last["ema_top1"]), abs=1e-3)
    assert acc["model"][3] == 9
    # The report beside the checkpoint holds the same numbers.
    with open(os.path.join(reference_run, "eval", "last-32.json")) as f:
        report = json.load(f)
    assert report["results"]["model"]["top1"] == pytest.approx(acc["model"][0], abs=1e-3)
    assert report["results"]["ema"]["loss"] == pytest.approx(acc["ema"][2], abs=1e-4)
    # Nothing trained or written: no checkpoint, summary or config in the eval output, and the
    # evaluated run's files untouched.
    assert not glob.glob(os.path.join(run_dir, "*.pth")) and "Train:" not in read_log(run_dir)
    assert not os.path.exists(os.path.join(run_dir, "summary.csv"))
    assert before == run_files()


def test_eval_needs_only_the_val_folder(reference_run, image_tree, tiny_cfg, tmp_path):
    shutil.copytree(os.path.join(image_tree, "val"), tmp_path / "data" / "val")
    checkpoint = shutil.copy2(os.path.join(reference_run, "last.pth"), tmp_path / "last.pth")
    argv = ["--cfg", tiny_cfg(), "--data-path", str(tmp_path / "data"), "--output", str(tmp_path / "out")]
    assert trainer.main(argv + ["--eval", "--resume", str(checkpoint)]) == 0
    log = read_log(os.path.join(tmp_path, "out", "tiny_moat_0", "default"))
    assert accuracies(log)["model"][0] == pytest.approx(float(read_summary(reference_run)[-1]["val_top1"]), abs=1e-3)
    assert os.path.isfile(tmp_path / "eval" / "last-32.json")
    # Training still needs its train split.
    assert trainer.main(argv) == 2


def test_training_runs_channels_last_and_its_checkpoint_evaluates_the_same_in_nchw(
    reference_run, image_tree, tiny_cfg, tmp_path
):
    ckpt = torch.load(os.path.join(reference_run, "last.pth"), map_location="cpu", weights_only=True)
    convs = [v for v in ckpt["model"].values() if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1]
    assert convs and all(
        v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() for v in convs
    )  # CHANNELS_LAST defaults on, and torch.save keeps strides
    code = trainer.main(
        [
            "--cfg",
            tiny_cfg(),
            "--data-path",
            image_tree,
            "--output",
            str(tmp_path),
            "--eval",
            "--no-channels-last",
            "--resume",
            os.path.join(reference_run, "last.pth"),
        ]
    )
    log = read_log(os.path.join(tmp_path, "tiny_moat_0", "default"))
    assert code == 0 and "NCHW" in log
    last = read_summary(reference_run)[-1]
    top1, _, loss, n = accuracies(log)["model"]
    assert n == 9 and top1 == pytest.approx(float(last["val_top1"]), abs=1e-3)
    assert loss == pytest.approx(float(last["val_loss"]), rel=1e-4)


def test_bf16_autocast_eval_runs_on_cpu(reference_run, image_tree, tiny_cfg, tmp_path):
    code = trainer.main(
        [
            "--cfg",
            tiny_cfg(),
            "--data-path",
            image_tree,
            "--output",
            str(tmp_path),
            "--eval",
            "--amp",
            "bf16",
            "--resume",
            os.path.join(reference_run, "last.pth"),
        ]
    )
    log = read_log(os.path.join(tmp_path, "tiny_moat_0", "default"))
    assert code == 0 and "mixed precision: torch.bfloat16" in log
    top1, _, loss, n = accuracies(log)["model"]
    assert n == 9 and 0.0 <= top1 <= 100.0 and loss > 0


def test_auto_resume_continues_after_the_last_finished_epoch(reference_run, image_tree, tiny_cfg, tmp_path):
    run_dir = tmp_path / "tiny_moat_0" / "default"
    run_dir.mkdir(parents=True)
    for name in ("last.pth", "config.yaml", "summary.csv"):
        shutil.copy2(os.path.join(reference_run, name), run_dir / name)
    code = trainer.main(
        ["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", str(tmp_path), "--opts", "TRAIN.EPOCHS", "3"]
    )
    assert code == 0
    log = read_log(run_dir)
    assert "auto-resuming from" in log and "epochs 2..2" in log and "Train: [0/3]" not in log
    rows = read_summary(run_dir)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[:2] == read_summary(reference_run)  # earlier rows kept as they were
    assert torch.load(run_dir / "last.pth", weights_only=True)["step"] == 18
    # The schedule follows the new config (3 epochs): a warning says it moved.
    assert "LR schedule differs" in log


def test_resume_flag_wins_over_auto_resume(reference_run, tiny_cfg, image_tree):
    from config import get_config
    from logger import create_logger
    from utils.distributed import init_distributed

    args = trainer.get_args_parser().parse_args(
        ["--cfg", tiny_cfg(), "--data-path", image_tree, "--resume", os.path.join(reference_run, "epoch_0.pth")]
    )
    config = get_config(args)
    info = init_distributed("cpu")
    logger = create_logger("", 0, name="test_resume_choice")
    path, obj = trainer.choose_resume(config, reference_run, info, logger)
    assert path.endswith("epoch_0.pth") and obj["epoch"] == 0
    config.defrost()
    config.MODEL.RESUME = ""
    path, obj = trainer.choose_resume(config, reference_run, info, logger)
    assert path.endswith("last.pth") and obj["epoch"] == 1
    config.TRAIN.AUTO_RESUME = False
    assert trainer.choose_resume(config, reference_run, info, logger) is None


def test_pretrained_fine_tunes_at_another_resolution_and_class_count(reference_run, tiny_cfg, tmp_path):
    data = make_image_tree(str(tmp_path / "data2"), train_per_class=4, val_per_class=1, classes=["a", "b"])
    cfg = tiny_cfg(
        MODEL={"NUM_CLASSES": 2},
        DATA={"IMG_SIZE": 64},
        TRAIN={"EPOCHS": 1, "WARMUP_EPOCHS": 0, "EMA": {"ENABLE": False}},
    )
    code = trainer.main(
        [
            "--cfg",
            cfg,
            "--data-path",
            data,
            "--output",
            str(tmp_path / "out"),
            "--pretrained",
            os.path.join(reference_run, "best.pth"),
        ]
    )
    assert code == 0
    run_dir = os.path.join(tmp_path, "out", "tiny_moat_0", "default")
    log = read_log(run_dir)
    assert "loaded pretrained EMA weights" in log and "dropped the head (head.fc.weight, head.fc.bias)" in log
    new = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)["model"]
    old = torch.load(os.path.join(reference_run, "best.pth"), weights_only=True)["model"]
    assert new["head.fc.weight"].shape == (2, old["head.fc.weight"].shape[1])
    # Relative-bias tables keep their shape across resolutions (the model resizes them itself).
    tables = [k for k in old if "relative_position_bias_table" in k]
    assert tables and all(new[k].shape == old[k].shape for k in tables)


def test_throughput_reports_images_per_second_and_exits(image_tree, tiny_cfg, tmp_path):
    code = trainer.main(["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", str(tmp_path), "--throughput"])
    run_dir = os.path.join(tmp_path, "tiny_moat_0", "default")
    rate = re.search(r"batch_size 4 throughput ([\d.]+) img/s", read_log(run_dir))
    assert code == 0 and rate and float(rate.group(1)) > 0
    assert not glob.glob(os.path.join(run_dir, "*.pth"))


def test_mixup_gives_soft_target_cross_entropy_and_plain_ce_otherwise():
    from timm.loss import SoftTargetCrossEntropy

    from config import get_config
    from data import build_mixup

    config = get_config().clone()
    config.defrost()
    config.MODEL.NUM_CLASSES = 3
    config.freeze()
    mixup = build_mixup(config)
    assert isinstance(trainer.build_criterion(config, mixup), SoftTargetCrossEntropy)
    plain = trainer.build_criterion(config, None)
    assert isinstance(plain, torch.nn.CrossEntropyLoss) and plain.label_smoothing == 0.1
    x, y = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4))


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--data-path", "/nonexistent/data"], "/nonexistent/data"),
        (["--opts", "TRAIN.NO_SUCH_KEY", "1"], "TRAIN.NO_SUCH_KEY"),
        (["--resume", "/nonexistent/last.pth"], "/nonexistent/last.pth"),
        (["--eval"], "--eval needs --resume"),
        (["--amp-opt-level", "O1"], "apex"),
        (["--device", "cuda"], "CUDA is not available"),
    ],
)
def test_user_errors_are_one_line_on_stderr_with_exit_code_2(extra, needle, image_tree, tiny_cfg, tmp_path, capsys):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")  # reason: this error only exists without CUDA
    argv = ["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", str(tmp_path), *extra]
    assert trainer.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err


def test_cli_user_error_has_no_traceback(run_cli, tiny_cfg, tmp_path):
    proc = run_cli(["--cfg", tiny_cfg(), "--data-path", tmp_path / "missing", "--output", tmp_path])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert str(tmp_path / "missing") in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_train_and_eval_equals_one_process_eval(ddp_reference, image_tree, tmp_path):
    cfg, _, run_dir = ddp_reference
    assert os.path.isfile(os.path.join(run_dir, "log_rank1.txt"))
    ckpt = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng_state"]) == 2
    two = accuracies(read_log(run_dir))["model"]

    code = trainer.main(
        [
            "--cfg",
            cfg,
            "--data-path",
            image_tree,
            "--output",
            str(tmp_path / "one"),
            "--eval",
            "--resume",
            os.path.join(run_dir, "last.pth"),
        ]
    )
    assert code == 0
    one = accuracies(read_log(os.path.join(tmp_path, "one", "tiny_moat_0", "default")))["model"]
    assert two[3] == one[3] == 9  # every val image exactly once, no padding duplicates
    assert two[0] == one[0] and two[1] == one[1]
    assert two[2] == pytest.approx(one[2], abs=1e-3)  # logged with 4 decimals


def test_linear_probe_trains_only_the_classifier_and_keeps_batchnorm_statistics(
    reference_run, image_tree, tiny_cfg, tmp_path
):
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1, "FREEZE_BACKBONE": True, "EMA": {"ENABLE": False}})
    pretrained = os.path.join(reference_run, "best.pth")
    assert (
        trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path), "--pretrained", pretrained])
        == 0
    )
    new = torch.load(os.path.join(tmp_path, "tiny_moat_0", "default", "last.pth"), weights_only=True)["model"]
    old = torch.load(pretrained, weights_only=True)["model_ema"]  # --pretrained takes the EMA
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed == {"head.fc.weight", "head.fc.bias"}  # BN running stats included in "unchanged"


def test_fp16_with_grad_scaler_trains_on_cpu_and_saves_the_scaler(image_tree, tiny_cfg, tmp_path):
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1, "EMA": {"ENABLE": False}})
    assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path), "--amp", "fp16"]) == 0
    ckpt = torch.load(os.path.join(tmp_path, "tiny_moat_0", "default", "last.pth"), weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert "mixed precision: torch.float16" in read_log(os.path.join(tmp_path, "tiny_moat_0", "default"))


def test_short_run_without_augmentation_learns_the_colour_classes(image_tree, tiny_cfg, tmp_path):
    # BN momentum 0.5: with the official 0.01 the running statistics lag far behind in 18 steps
    # and eval mode is at chance whatever the weights learned.
    cfg = tiny_cfg(
        AUG={"MIXUP": 0.0, "CUTMIX": 0.0, "AUTO_AUGMENT": "", "REPROB": 0.0},
        MODEL={"NUM_CLASSES": 3, "MOAT": {"BN_MOMENTUM": 0.5}},
        TRAIN={"EPOCHS": 3, "BASE_LR": 0.2, "EMA": {"ENABLE": False}},
    )
    assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path)]) == 0
    rows = read_summary(os.path.join(tmp_path, "tiny_moat_0", "default"))
    first, last = rows[0], rows[-1]
    assert float(last["val_loss"]) < min(0.9, float(first["val_loss"]))  # chance is ln 3 = 1.10
    assert float(last["val_top1"]) > 50.0


def test_default_recipe_trains_on_a_folder_of_every_image_mode_with_two_workers(tiny_cfg, tmp_path):
    """The shipped augmentation (RandAugment, random erasing, Mixup/CutMix) over L, LA, P, RGBA,
    CMYK, 16-bit, 1x1, very wide and EXIF-rotated files, decoded in loader workers."""
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            write_every_image_mode(folder, seed=c)
    cfg = tiny_cfg(DATA={"NUM_WORKERS": 2, "BATCH_SIZE": 6}, TRAIN={"EPOCHS": 1})
    assert trainer.main(["--cfg", cfg, "--data-path", str(tmp_path / "data"), "--output", str(tmp_path / "out")]) == 0
    (row,) = read_summary(os.path.join(tmp_path, "out", "tiny_moat_0", "default"))
    assert float(row["train_loss"]) > 0 and row["val_top1"] != ""
    assert f"({3 * 10} images" in read_log(os.path.join(tmp_path, "out", "tiny_moat_0", "default"))


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "examples")


@pytest.mark.parametrize(
    "example, overrides, run_name, stages",
    [
        # 7x7 windows need the 14x14 stage-3 map of 224 px; at 64 px that map is 4x4, so 2x2 windows.
        (
            "tiny_moat_0_window.yaml",
            {"DATA": {"IMG_SIZE": 64}, "MODEL": {"MOAT": {"WINDOW_SIZE": [2, 0]}}},
            os.path.join("tiny_moat_0", "window7"),
            4,
        ),
        ("my_moat_5stage.yaml", {}, os.path.join("my_moat_5stage", "default"), 5),
    ],
)
def test_example_architectures_train_an_epoch_through_main(
    example, overrides, run_name, stages, image_tree, tiny_cfg, tmp_path, capsys
):
    sections = {
        "BASE": [os.path.join(EXAMPLES, example)],
        "MODEL": {"NUM_CLASSES": 3},
        "TRAIN": {"EPOCHS": 1, "WARMUP_EPOCHS": 0, "EMA": {"ENABLE": False}},
    }
    for key, value in overrides.items():
        sections[key] = {**sections.get(key, {}), **value}
    cfg = tiny_cfg(**sections)
    assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path)]) == 0
    run_dir = os.path.join(tmp_path, run_name)
    assert [r["epoch"] for r in read_summary(run_dir)] == ["0"]
    ckpt = torch.load(os.path.join(run_dir, "last.pth"), map_location="cpu", weights_only=True)
    assert {int(k.split(".")[1]) for k in ckpt["model"] if k.startswith("stages.")} == set(range(stages))
    assert ckpt["config"]["MODEL"]["NAME"] == run_name.split(os.sep)[0]
    # The same YAML rebuilds the architecture to evaluate its checkpoint.
    assert (
        trainer.main(
            [
                "--cfg",
                cfg,
                "--data-path",
                image_tree,
                "--output",
                str(tmp_path / "eval"),
                "--eval",
                "--resume",
                os.path.join(run_dir, "last.pth"),
            ]
        )
        == 0
    )
    same = accuracies(read_log(os.path.join(tmp_path, "eval", run_name)))["model"]
    assert same[3] == 9
    # The checkpoint alone is enough: --eval under a plain tiny_moat_0 config (same image size)
    # rebuilds the recorded architecture and gives the same numbers.
    plain = tiny_cfg(DATA=overrides.get("DATA", {}))
    assert (
        trainer.main(
            [
                "--cfg",
                plain,
                "--data-path",
                image_tree,
                "--output",
                str(tmp_path / "plain"),
                "--eval",
                "--resume",
                os.path.join(run_dir, "last.pth"),
            ]
        )
        == 0
    )
    assert accuracies(read_log(os.path.join(tmp_path, "plain", "tiny_moat_0", "default")))["model"] == same
    if overrides:  # the example's own windows do not fit the small test image: a one-line error
        capsys.readouterr()
        cfg = tiny_cfg(BASE=[os.path.join(EXAMPLES, example)], DATA={"IMG_SIZE": 64})
        assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: invalid MODEL.MOAT.WINDOW_SIZE=[") and "\n" not in err
        assert "does not divide its 4x4 feature map at DATA.IMG_SIZE 64" in err
