"""End-to-end CPU runs of ``main.py``: training writes what it promises, ``--eval`` reproduces the
training's validation without training, auto-resume/``--resume``/``--pretrained``, throughput,
one-line user errors, and a 2-process ``torchrun`` (gloo) run whose eval equals a 1-process eval.

The reference 2-epoch run is a real subprocess (``conftest.reference_run``); the other runs call
``main.main(argv)`` in-process to save interpreter start-up time.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil

import pytest
import torch

import main as trainer
from conftest import CLASSES, load_checkpoint, make_image_tree, read_log, read_summary, write_every_image_mode

ACC_RE = re.compile(r"\* (model|ema) Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) \((\d+) images")
# The last progress line of an epoch: the running mean loss over its 6 steps (PRINT_FREQ 1).
EPOCH_END_RE = re.compile(r"Train: \[(\d+)/2\]\[5/6\].*\tloss [\d.]+ \(([\d.]+)\)")


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
    # Each row holds that epoch's validation of the model and of its EMA, and its mean train loss.
    log = read_log(reference_run)
    evals = ACC_RE.findall(log)
    assert [name for name, *_ in evals] == ["model", "ema", "model", "ema"]
    train_loss = {int(epoch): float(mean) for epoch, mean in EPOCH_END_RE.findall(log)}
    for epoch, row in enumerate(rows):
        (_, top1, top5, loss, n), (_, ema_top1, ema_top5, _, ema_n) = evals[2 * epoch : 2 * epoch + 2]
        assert int(n) == int(ema_n) == 9
        assert float(row["val_top1"]) == pytest.approx(float(top1), abs=1e-3)
        assert float(row["val_top5"]) == float(top5) == 100.0  # 3 classes: top-5 always hits
        assert float(row["val_loss"]) == pytest.approx(float(loss), abs=1e-4)
        assert float(row["ema_top1"]) == pytest.approx(float(ema_top1), abs=1e-3)
        assert float(row["ema_top5"]) == float(ema_top5) == 100.0
        assert float(row["train_loss"]) == pytest.approx(train_loss[epoch], abs=1e-4)
    # best.pth by the top-1 of the reported weights: the EMA's (TRAIN.REPORT.WEIGHTS).
    top1 = [float(r["ema_top1"]) for r in rows]
    assert [float(r["max_accuracy"]) for r in rows] == [top1[0], max(top1)]

    ckpt = load_checkpoint(os.path.join(reference_run, "last.pth"))
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
    assert ckpt["max_accuracy"] == pytest.approx(max(top1), abs=1e-3)
    first = load_checkpoint(os.path.join(reference_run, "epoch_0.pth"))
    assert not torch.equal(first["model"]["head.fc.weight"], ckpt["model"]["head.fc.weight"])
    # best.pth is the first epoch with the highest top-1 (a tie does not replace it).
    assert load_checkpoint(os.path.join(reference_run, "best.pth"))["epoch"] == (1 if top1[1] > top1[0] else 0)
    # CHANNELS_LAST defaults on, and torch.save keeps the strides of the convolution weights.
    convs = [v for v in ckpt["model"].values() if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() for v in convs)


@pytest.mark.parametrize(
    "flags, log_line, loss_rel, top1_abs",
    [
        ([], "mixed precision: off", 1e-4, 1e-3),
        # The checkpoint was trained channels_last (the default): NCHW gives the same numbers.
        (["--no-channels-last"], "NCHW", 1e-4, 1e-3),
        # bf16 autocast on CPU: the loss to bf16 rounding, at most one of the 9 images flips.
        (["--amp", "bf16"], "mixed precision: torch.bfloat16", 2e-2, 100 / 9 + 1e-3),
    ],
    ids=["as-trained", "nchw", "bf16"],
)
def test_eval_reproduces_the_training_validation_and_never_trains(
    flags, log_line, loss_rel, top1_abs, reference_run, image_tree, tiny_cfg, tmp_path
):
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
            *flags,
            "--resume",
            os.path.join(reference_run, "last.pth"),
        ]
    )
    run_dir = os.path.join(tmp_path, "tiny_moat_0", "default")
    log = read_log(run_dir)
    assert code == 0 and log_line in log
    acc = accuracies(log)
    last = read_summary(reference_run)[-1]
    assert acc["model"][3] == acc["ema"][3] == 9
    assert acc["model"][0] == pytest.approx(float(last["val_top1"]), abs=top1_abs)
    assert acc["model"][2] == pytest.approx(float(last["val_loss"]), rel=loss_rel)
    assert acc["ema"][0] == pytest.approx(float(last["ema_top1"]), abs=top1_abs)
    # The report beside the checkpoint holds the same numbers.
    with open(os.path.join(reference_run, "eval", "last-32.json")) as f:
        report = json.load(f)
    assert report["results"]["model"]["top1"] == pytest.approx(acc["model"][0], abs=1e-3)
    assert report["results"]["ema"]["loss"] == pytest.approx(acc["ema"][2], abs=1e-4)
    # Nothing trained or written: no checkpoint, summary or config in the eval output, and the
    # evaluated run's own files untouched.
    assert not glob.glob(os.path.join(run_dir, "*.pth")) and "Train:" not in log
    assert not {"summary.csv", "config.yaml"} & set(os.listdir(run_dir))
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
    assert load_checkpoint(run_dir / "last.pth")["step"] == 18
    # The schedule follows the new config (3 epochs): a warning says it moved.
    assert "LR schedule differs" in log


def test_resume_flag_wins_over_auto_resume(reference_run, tiny_cfg, image_tree, tmp_path):
    from config import get_config
    from logger import create_logger
    from utils.distributed import init_distributed

    run_dir = str(tmp_path / "run")
    shutil.copytree(reference_run, run_dir)
    older = str(tmp_path / "epoch_0.pth")
    shutil.copyfile(os.path.join(run_dir, "epoch_0.pth"), older)
    args = trainer.get_args_parser().parse_args(["--cfg", tiny_cfg(), "--data-path", image_tree, "--resume", older])
    config = get_config(args)
    info = init_distributed("cpu")
    logger = create_logger("", 0, name="test_resume_choice")
    config.defrost()
    config.MODEL.RESUME = ""
    record = trainer.choose_resume(config, run_dir, info, logger)
    assert record.path.endswith("last.pth") and record.position.epoch == 1
    config.MODEL.RESUME = older
    record = trainer.choose_resume(config, run_dir, info, logger)
    assert record.path == older and record.position.epoch == 0
    config.MODEL.RESUME = ""
    config.TRAIN.AUTO_RESUME = False
    assert trainer.choose_resume(config, run_dir, info, logger) is None


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
    new = load_checkpoint(os.path.join(run_dir, "last.pth"))["model"]
    old = load_checkpoint(os.path.join(reference_run, "best.pth"))["model"]
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


def test_freeze_backbone_leaves_only_the_classifier_trainable_and_in_the_optimizer():
    """What TRAIN.FREEZE_BACKBONE wires up, with the trainer's own pieces: one step moves only
    head.fc (tests/test_finetune.py runs the linear-probe recipe end to end)."""
    from config import get_config
    from models import build_model
    from optimizer import build_optimizer

    config = get_config().clone()
    config.defrost()
    config.merge_from_list(["MODEL.NAME", "tiny_moat_0", "MODEL.NUM_CLASSES", 3, "TRAIN.FREEZE_BACKBONE", True])
    config.freeze()
    model = build_model(config)
    trainer.freeze_backbone(model)
    optimizer = build_optimizer(config, model, lr=0.1)
    head = {"head.fc.weight", "head.fc.bias"}
    params = dict(model.named_parameters())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(params[n]) for n in head}

    before = {n: p.detach().clone() for n, p in params.items()}
    loss = trainer.build_criterion(config, None)(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    assert {n for n, p in params.items() if p.grad is not None} == head
    assert {n for n, p in params.items() if not torch.equal(p, before[n])} == head


@pytest.mark.parametrize(
    "extra, needle",
    [
        # Bad config values, data and checkpoints: tests/test_config.py, test_data.py and
        # test_checkpoint.py test each error; tests/test_crash_safety.py takes some through main.
        (["--eval"], "--eval needs --resume"),
        (["--eval", "--throughput"], "exclude each other"),
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


def test_bad_config_key_on_the_command_line_is_one_line_with_exit_code_2_and_no_traceback(
    run_cli, image_tree, tiny_cfg, tmp_path
):
    proc = run_cli(
        ["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", tmp_path, "--opts", "TRAIN.NO_SUCH_KEY", "1"]
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in proc.stderr
    assert "TRAIN.NO_SUCH_KEY" in err and not os.listdir(tmp_path)  # stopped before any output


@pytest.mark.slow
def test_torchrun_two_processes_train_and_eval_equals_one_process_eval(ddp_reference, image_tree, tmp_path):
    cfg, _, run_dir = ddp_reference
    assert "world size 2, rank 1" in read_log(run_dir, rank=1)
    ckpt = load_checkpoint(os.path.join(run_dir, "last.pth"))
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


def test_fp16_with_grad_scaler_trains_on_cpu_and_saves_the_scaler(image_tree, tiny_cfg, tmp_path):
    cfg = tiny_cfg(TRAIN={"EPOCHS": 1, "EMA": {"ENABLE": False}})
    assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path), "--amp", "fp16"]) == 0
    run_dir = os.path.join(tmp_path, "tiny_moat_0", "default")
    ckpt = load_checkpoint(os.path.join(run_dir, "last.pth"))
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    log = read_log(run_dir)
    assert "mixed precision: torch.float16" in log
    # The saved scaler is the run's: the scale of its last step (65536 halved once per overflow).
    scale = ckpt["scaler"]["scale"]
    assert scale == float(re.findall(r"loss_scale ([\d.]+)", log)[-1]) and math.log2(scale) in range(17)


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
    assert math.isfinite(float(row["train_loss"])) and float(row["val_top5"]) == 100.0
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
    ckpt = load_checkpoint(os.path.join(run_dir, "last.pth"))
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
