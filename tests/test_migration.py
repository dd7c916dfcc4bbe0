"""Users of the unofficial MOAT port and of the Swin trainer switch without friction: their shipped
YAML files and saved config.json (``tests/data/port``, ``tests/data/swin``: written in their format
from their public key lists) load and build, every key mapped, ignored or refused in one line;
meanings never change silently; their flags, the commands of their READMEs, the port's zip maps
and their checkpoints get an answer (a run, or one line that says why and what to use instead).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml
from yacs.config import CfgNode

import main as trainer
from checkpoints import read_checkpoint, resume_path
from config import ConfigError, get_config, load_config
from conftest import Exploit, cli_env, free_port, read_log
from migration import PORT, SWIN, dialect_of, table_entry
from models import MOAT_CFGS, build_model, moat_cfg_from_config
from tools.make_zip_dataset import make_zip_dataset
from tools.migrate_config import main as migrate_main
from utils.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PORT_DIR = os.path.join(HERE, "data", "port")
SWIN_DIR = os.path.join(HERE, "data", "swin")
PORT_FILES = sorted(glob.glob(os.path.join(PORT_DIR, "configs", "*.yaml"))) + [os.path.join(PORT_DIR, "config.json")]
SWIN_FILES = sorted(glob.glob(os.path.join(SWIN_DIR, "configs", "**", "*.yaml"), recursive=True)) + [
    os.path.join(SWIN_DIR, "config.json")
]
# What shrinks a run of theirs to a test: a tiny model at 32 px, one epoch, the 3 classes of
# conftest's image tree (their data is ImageNet, ours is not).
TINY = ["MODEL.NAME", "tiny_moat_0", "DATA.IMG_SIZE", "32", "DATA.DATASET", "imagefolder", "MODEL.NUM_CLASSES", "3",
        "TRAIN.EPOCHS", "1", "DATA.NUM_WORKERS", "0", "AMP", "off"]  # fmt: skip


def _load(*argv: str):
    return load_config(trainer.get_args_parser().parse_args(list(argv)))


def _rel(path: str) -> str:
    return os.path.relpath(path, HERE)


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _port_yaml(**moat: str) -> str:
    """The port's moat_0.yaml with the MODEL.MOAT keys in ``moat`` replaced (text, their format)."""
    keys = {"EMBED_DIM": "64", "DEPTHS": "(2, 3, 7, 2)", "DIM_HEAD": "32", "WINDOW_SIZE": "(7, 7)",
            "USE_WINDOW": "False", "POOL": '"avg"', "CHANNELS": "(96, 192, 384, 768)", **moat}  # fmt: skip
    return "MODEL:\n  TYPE: MOAT\n  NAME: moat_0_224\n  MOAT:\n" + "".join(f"    {k}: {v}\n" for k, v in keys.items())


# ------------------------------------------------------------------------------- config files
@pytest.mark.parametrize("path", PORT_FILES + SWIN_FILES, ids=_rel)
def test_their_config_files_and_saved_configs_load_and_build(path):
    loaded = _load("--cfg", path)
    with torch.device("meta"):  # the real architecture, without allocating moat_4's weights
        model = build_model(loaded.config)
    assert model.num_classes == loaded.config.MODEL.NUM_CLASSES
    trainer_name = PORT if path.startswith(PORT_DIR) else SWIN
    assert loaded.notes[0].startswith(f"{path}: a ") and trainer_name in loaded.notes[0].splitlines()[0]
    assert all("\n" not in note for note in loaded.notes[1:])  # the table is one record, each note one line


@pytest.mark.parametrize("path", PORT_FILES + SWIN_FILES, ids=_rel)
def test_every_key_of_theirs_has_an_entry_and_a_row_in_docs_migrating(path):
    from migration import _flatten

    with open(path) as f:
        tree = yaml.safe_load(f)
    trainer_name = dialect_of(tree)
    assert trainer_name == (PORT if path.startswith(PORT_DIR) else SWIN)
    with open(os.path.join(REPO, "docs", "migrating.md")) as f:
        doc = f.read()
    for key in _flatten(tree):
        if key == "BASE":
            continue
        entry = table_entry(trainer_name, key)
        assert entry is not None, f"{key} of {trainer_name} has no entry in migration.py"
        assert f"`{entry}`" in doc, f"docs/migrating.md has no row for `{entry}`"


@pytest.mark.parametrize("name", sorted(n for n in MOAT_CFGS if not n.endswith("_no_pe")))
def test_the_ports_architecture_keys_land_on_the_official_variant_they_name(name):
    loaded = _load("--cfg", os.path.join(PORT_DIR, "configs", f"{name}.yaml"))
    config = loaded.config
    assert (config.MODEL.TYPE, config.MODEL.NAME) == ("moat", name)  # its moat_0_224 is moat_0
    assert all(value is None for value in config.MODEL.MOAT.values())  # what it says is the variant's own
    assert moat_cfg_from_config(config).replace(drop_path_rate=0.0) == MOAT_CFGS[name].replace(drop_path_rate=0.0)
    table = loaded.notes[0]
    assert "MODEL.MOAT.EMBED_DIM" in table and "MODEL.MOAT.STEM_DIMS" in table and "MODEL.MOAT.CHANNELS" in table
    assert any(n.startswith("the port's model differed from the official MOAT") for n in loaded.notes)


def test_a_port_name_of_no_variant_is_a_new_architecture_in_the_ports_layout(tmp_path):
    text = _port_yaml(EMBED_DIM="16", CHANNELS="(16, 32, 64, 128)").replace("moat_0_224", "my_moat")
    config = _load("--cfg", _write(tmp_path, "mine.yaml", text)).config
    cfg = moat_cfg_from_config(config)
    assert config.MODEL.NAME == "my_moat" and cfg.stem_dims == (16, 16) and cfg.dims == (16, 32, 64, 128)
    assert cfg.stage_types == ("mbconv", "mbconv", "moat", "moat") and cfg.depths == (2, 3, 7, 2)


@pytest.mark.parametrize(
    "use_window, size, img_size, windows",
    [
        ("False", "(7, 7)", 224, (None, None, None, None)),  # the port's default: global attention
        ("False", "(7, 7)", 256, (None, None, None, None)),  # global at any size, no divisibility error
        ("False", "(7, 8)", 224, (None, None, None, None)),  # an unused window may be anything
        ("True", "(7, 7)", 224, (None, None, 7, 7)),  # windows in both attention stages
    ],
)
def test_the_ports_window_size_keeps_its_meaning_global_unless_use_window(
    tmp_path, use_window, size, img_size, windows
):
    text = _port_yaml(WINDOW_SIZE=size, USE_WINDOW=use_window) + f"DATA:\n  IMG_SIZE: {img_size}\n"
    config = _load("--cfg", _write(tmp_path, "port.yaml", text)).config
    assert moat_cfg_from_config(config).stage_windows == windows


@pytest.mark.parametrize(
    "text, key, why",
    [
        (_port_yaml(POOL='"max"'), "MODEL.MOAT.POOL='max'", "average pooling"),
        (_port_yaml(IN_CHANS="1"), "MODEL.MOAT.IN_CHANS=1", "RGB"),
        (_port_yaml(WINDOW_SIZE="(7, 14)", USE_WINDOW="True"), "MODEL.MOAT.WINDOW_SIZE=[7, 14]", "non-square"),
        (
            "MODEL:\n  TYPE: swin\nTRAIN:\n  OPTIMIZER:\n    NAME: fused_lamb\n",
            "TRAIN.OPTIMIZER.NAME='fused_lamb'",
            "LAMB",
        ),
    ],
)
def test_what_this_project_cannot_express_is_refused_in_one_line_naming_file_and_key(tmp_path, text, key, why):
    path = _write(tmp_path, "theirs.yaml", text)
    with pytest.raises(ConfigError) as err:
        _load("--cfg", path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: {key}") and why in msg


def test_a_mapped_key_goes_through_the_rules_and_the_error_names_the_key_it_came_from(tmp_path):
    path = _write(tmp_path, "port.yaml", _port_yaml(DIM_HEAD="40"))
    with pytest.raises(ConfigError) as err:
        _load("--cfg", path)
    msg = str(err.value)
    assert msg.startswith("invalid MODEL.MOAT.DIMS=") and "not divisible by MODEL.MOAT.HEAD_DIM 40" in msg
    assert f"MODEL.MOAT.HEAD_DIM is MODEL.MOAT.DIM_HEAD of {path}" in msg and "\n" not in msg


@pytest.mark.parametrize("section, trainer_name", [("MOAT:\n    EMBED_DIM: 64\n", PORT), ("TYPE: swin\n", SWIN)])
def test_an_old_drop_rate_says_what_it_does_here(tmp_path, section, trainer_name):
    path = _write(tmp_path, "old.yaml", f"MODEL:\n  DROP_RATE: 0.1\n  {section}")
    loaded = _load("--cfg", path)
    assert loaded.config.MODEL.DROP_RATE == 0.1
    (note,) = [n for n in loaded.notes if n.startswith("MODEL.DROP_RATE 0.1")]
    assert trainer_name in note and "here it is dropout before the classifier only" in note


def test_a_saved_config_keeps_its_settings_but_not_its_scaled_learning_rates():
    loaded = _load("--cfg", os.path.join(PORT_DIR, "config.json"))
    config, default = loaded.config, get_config()
    assert (config.TRAIN.BASE_LR, config.TRAIN.MIN_LR) == (default.TRAIN.BASE_LR, default.TRAIN.MIN_LR)
    (lr_note,) = [n for n in loaded.notes if n.startswith("ignored TRAIN.BASE_LR 0.0008")]
    assert "x 512 / that run's total batch" in lr_note
    # The port's recipe values come along; its launch state and the run folder do not.
    assert (config.TRAIN.CLIP_GRAD, config.TRAIN.WARMUP_EPOCHS) == (2.0, 20)
    assert (config.AUG.REPROB, config.AUG.CUTMIX) == (0.25, 1.0)
    assert config.AUG.CUTMIX_MINMAX == [] and config.TRAIN.ACCUMULATION_STEPS == 1  # null: off; 0 meant 1
    assert (config.OUTPUT, config.MODEL.NAME, config.AMP) == ("output", "moat_0", "fp16")
    assert any(n.startswith("ignored EVAL_MODE, LOCAL_RANK, THROUGHPUT_MODE: launch state") for n in loaded.notes)
    warmup = "TRAIN.WARMUP_EPOCHS 20: the unofficial MOAT port ran this warmup inside the cosine schedule"
    assert any(n.startswith(warmup) for n in loaded.notes)


def test_swin_nulls_mean_off_where_swin_meant_off_and_are_one_line_elsewhere(tmp_path):
    saved = os.path.join(SWIN_DIR, "config.json")
    config = _load("--cfg", saved, "--opts", "TRAIN.CLIP_GRAD", "None").config
    assert config.TRAIN.CLIP_GRAD == 0.0 and config.AUG.CUTMIX_MINMAX == []
    with open(saved) as f:
        text = f.read().replace("NUM_CLASSES: 1000", "NUM_CLASSES: null")
    with pytest.raises(ConfigError) as err:
        _load("--cfg", _write(tmp_path, "config.json", text))
    assert str(err.value) == "invalid MODEL.NUM_CLASSES=None: null is not accepted here (the default is 1000)"


def test_swins_architecture_is_not_built_and_the_log_says_which_moat_is(tmp_path):
    loaded = _load("--cfg", os.path.join(SWIN_DIR, "configs", "swin", "swin_base_patch4_window7_224_22k.yaml"))
    config = loaded.config
    assert (config.MODEL.NAME, config.DATA.DATASET, config.MODEL.NUM_CLASSES) == ("moat_0", "imagefolder", 21841)
    assert any(n.startswith("ignored MODEL.TYPE, MODEL.NAME, MODEL.SWIN.*: a Swin Transformer") for n in loaded.notes)
    assert any("fall11_whole" in n for n in loaded.notes)  # Swin's 22K layout is not read: says so


def test_a_key_of_neither_trainer_says_so_in_one_line(tmp_path):
    path = _write(tmp_path, "swin.yaml", "MODEL:\n  TYPE: swin\nTRAIN:\n  EPOCH: 30\n")
    with pytest.raises(ConfigError) as err:
        _load("--cfg", path)
    assert str(err.value) == (
        f"{path}: Non-existent config key: TRAIN.EPOCH (a key of neither this project nor the Swin trainer: "
        "docs/migrating.md)"
    )


def test_migrate_config_writes_a_config_of_this_project_that_loads_the_same(tmp_path, capsys):
    for path in (os.path.join(PORT_DIR, "config.json"), os.path.join(PORT_DIR, "configs", "moat_2.yaml")):
        out = str(tmp_path / f"{os.path.basename(path)}.yaml")
        assert migrate_main([path, "-o", out]) == 0
        assert "read as this project's keys" in capsys.readouterr().err
        migrated = _load("--cfg", out)
        assert migrated.notes == ()  # a config of this project now
        assert migrated.config == _load("--cfg", path).config
        assert migrate_main([path, "-o", out]) == 2  # never overwrites
        assert "exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags", [["--disable_amp"], ["--amp-opt-level", "O0"]])
def test_swins_no_amp_flags_mean_amp_off_with_or_without_apex(flags, monkeypatch, capsys):
    cfg = os.path.join(SWIN_DIR, "configs", "swin", "swin_tiny_patch4_window7_224.yaml")
    loaded = _load("--cfg", cfg, *flags)
    assert (loaded.config.AMP, loaded.config.AMP_OPT_LEVEL) == ("off", "")
    assert any(n.startswith(f"{flags[0]}") and "--amp off" in n for n in loaded.notes)
    monkeypatch.setattr(trainer, "apex_available", lambda: False)
    code = trainer.main(["--cfg", cfg, *flags, "--data-path", "/no/such/data", "--throughput", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "apex" not in err and "/no/such/data" in err  # past the AMP checks, stopped by the data


def test_disable_amp_and_another_amp_contradict_in_one_line():
    with pytest.raises(ConfigError, match="--disable_amp contradicts --amp bf16"):
        _load("--cfg", PORT_FILES[0], "--disable_amp", "--amp", "bf16")


@pytest.mark.parametrize(
    "optim, expected",
    [("adamw", "adamw"), ("sgd", "sgd"), ("fused_adam", "adamw"), ("fused_lamb", None), ("lion", None)],
)
def test_swins_optim_flag_sets_the_optimizer_or_says_what_exists(optim, expected):
    if expected is None:
        with pytest.raises(ConfigError) as err:
            _load("--cfg", PORT_FILES[0], "--optim", optim)
        assert "\n" not in str(err.value) and "adamw" in str(err.value)
    else:
        assert _load("--cfg", PORT_FILES[0], "--optim", optim).config.TRAIN.OPTIMIZER.NAME == expected


def test_swins_kernel_flags_are_accepted_with_a_note_and_the_ports_debug_is_a_pointer(monkeypatch):
    monkeypatch.setenv("PT_OUTPUT_DIR", "/mnt/output")
    notes = _load("--cfg", PORT_FILES[0], "--fused_window_process", "--fused_layernorm").notes
    assert any(n.startswith("--fused_window_process: Swin's fused window-shift kernel") for n in notes)
    assert any(n.startswith("--fused_layernorm: Swin's fused LayerNorm kernel") for n in notes)
    assert any(n.startswith("PT_OUTPUT_DIR=/mnt/output is not read here") for n in notes)
    with pytest.raises(ConfigError, match=r"^--debug .* --throughput"):
        _load("--cfg", PORT_FILES[0], "--debug")
    helps = {a.option_strings[0]: a.help for a in trainer.get_args_parser()._actions}
    for flag in ("--disable_amp", "--optim", "--fused_window_process", "--fused_layernorm", "--debug"):
        assert helps[flag]


# Every flag of the port's and Swin's main.py (their argparse), and the one environment variable.
THEIR_FLAGS = ["--cfg", "--opts", "--batch-size", "--dataset", "--data-path", "--zip", "--cache-mode", "--pretrained",
               "--resume", "--accumulation-steps", "--use-checkpoint", "--disable_amp", "--amp-opt-level", "--output",
               "--tag", "--eval", "--throughput", "--debug", "--local_rank", "--fused_window_process",
               "--fused_layernorm", "--optim"]  # fmt: skip


def test_every_flag_of_theirs_is_known_here_and_has_a_row_in_docs_migrating():
    known = {s for a in trainer.get_args_parser()._actions for s in a.option_strings}
    with open(os.path.join(REPO, "docs", "migrating.md")) as f:
        rows = [line for line in f if line.startswith("| `--") or line.startswith("| `PT_OUTPUT_DIR`")]
    for flag in THEIR_FLAGS:
        assert flag in known, flag
        assert any(row.startswith(f"| `{flag}") for row in rows), f"docs/migrating.md has no row for {flag}"


# ------------------------------------------------------------------ their README commands, tiny
# Every main.py command of the port's README and of Swin's get_started.md, as written there (the
# launcher prefix is the test's business: the slow test below runs one through it).
PORT_README = [
    "--cfg configs/moat_0.yaml --data-path <imagenet-path> --batch-size 128",
    "--cfg configs/moat_1.yaml --data-path <imagenet-path> --batch-size 128",
    "--cfg configs/moat_2.yaml --data-path <imagenet-path> --batch-size 128",
    "--cfg configs/moat_3.yaml --data-path <imagenet-path> --batch-size 128 --accumulation-steps 2 --use-checkpoint",
    "--cfg configs/moat_0.yaml --data-path <imagenet-path> --batch-size 128 --output <output-directory> "
    "--tag <job-tag>",
]
SWIN_README = [
    "--eval --cfg configs/swin/swin_base_patch4_window7_224.yaml --resume swin_base_patch4_window7_224.pth "
    "--data-path <imagenet-path>",
    "--cfg configs/swin/swin_tiny_patch4_window7_224.yaml --data-path <imagenet-path> --batch-size 128",
    "--cfg configs/swin/swin_small_patch4_window7_224.yaml --data-path <imagenet-path> --batch-size 128",
    "--cfg configs/swin/swin_base_patch4_window7_224.yaml --data-path <imagenet-path> --batch-size 64 "
    "--accumulation-steps 2 --use-checkpoint",
    "--cfg configs/swin/swin_base_patch4_window7_224_22k.yaml --data-path <imagenet22k-path> --batch-size 64 "
    "--accumulation-steps 8 --use-checkpoint",
    "--cfg configs/swin/swin_base_patch4_window12_384_finetune.yaml --pretrained swin_base_patch4_window7_224.pth "
    "--data-path <imagenet-path> --batch-size 64 --accumulation-steps 2 --use-checkpoint",
    "--cfg configs/swin/swin_base_patch4_window7_224_22kto1k_finetune.yaml --pretrained "
    "swin_base_patch4_window7_224_22k.pth --data-path <imagenet-path> --batch-size 64 --accumulation-steps 2",
    "--cfg configs/swin/swin_tiny_patch4_window7_224.yaml --data-path <imagenet-path> --batch-size 64 --throughput "
    "--disable_amp",
    "--cfg configs/swin/swin_tiny_patch4_window7_224.yaml --data-path <imagenet-path> --batch-size 128 --zip "
    "--cache-mode part --opts TRAIN.EPOCHS 100 TRAIN.WARMUP_EPOCHS 5",
]
README_COMMANDS = [(PORT_DIR, c) for c in PORT_README] + [(SWIN_DIR, c) for c in SWIN_README]


def _as_test(repo: str, command: str, data: str, zip_data: str, checkpoint: str, out: str) -> list:
    """``command`` with their paths replaced by the test's, the batch cut to the tiny data's, and
    ``TINY`` added to (or merged into) its ``--opts``."""
    argv = []
    for word in command.split():
        if word.startswith("configs/"):
            word = os.path.join(repo, word)
        elif word in ("<imagenet-path>", "<imagenet22k-path>"):
            word = zip_data if "--zip" in command else data
        elif word.endswith(".pth"):
            word = checkpoint
        elif word == "<output-directory>":
            word = out
        elif word == "<job-tag>":
            word = "job"
        elif argv and argv[-1] == "--batch-size":
            word = "4"
        argv.append(word)
    if "--output" not in argv:
        argv = ["--output", out, *argv]
    if "--opts" in argv:  # last in every command that has it
        return argv + TINY
    return argv + ["--opts", *TINY]


@pytest.fixture(scope="module")
def zip_data(image_tree, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("zip"))
    make_zip_dataset(image_tree, out)
    return out


@pytest.fixture(scope="module")
def port_run(image_tree, tmp_path_factory) -> str:
    """The port's README training command, tiny: its run folder (its last.pth serves as "their"
    checkpoint wherever a README command names one)."""
    out = str(tmp_path_factory.mktemp("port_run"))
    argv = _as_test(PORT_DIR, PORT_README[0], image_tree, "", "", out)
    assert trainer.main(argv) == 0
    return os.path.join(out, "tiny_moat_0", "default")


def test_the_ports_readme_training_runs_and_logs_the_table_once(port_run):
    log = read_log(port_run)
    assert log.count("a config file of the unofficial MOAT port, read as this project's keys") == 1
    assert log.count("the port's model differed from the official MOAT") == 1
    assert "  MODEL.MOAT.CHANNELS" in log and "-> MODEL.MOAT.DIMS" in log
    assert os.path.isfile(os.path.join(port_run, "last.pth"))


@pytest.mark.parametrize("repo, command", README_COMMANDS, ids=[c[:60] for _, c in README_COMMANDS])
def test_each_readme_command_of_theirs_parses_and_loads(repo, command, tmp_path):
    argv = _as_test(repo, command, "data", "zip", "x.pth", str(tmp_path))
    args = trainer.get_args_parser().parse_args(argv)
    config = load_config(args).config
    assert config.MODEL.NAME == "tiny_moat_0"
    if "--use-checkpoint" in command:
        assert config.TRAIN.USE_CHECKPOINT
    if "--disable_amp" in command:
        assert config.AMP == "off"
    if "--zip" in command:
        assert (config.DATA.FORMAT, config.DATA.CACHE_MODE) == ("zip", "part")


@pytest.mark.slow
@pytest.mark.parametrize("repo, command", README_COMMANDS, ids=[c[:60] for _, c in README_COMMANDS])
def test_each_readme_command_of_theirs_runs_a_tiny_training_or_evaluation(
    repo, command, image_tree, zip_data, port_run, tmp_path
):
    checkpoint = str(tmp_path / "theirs.pth")  # a checkpoint of this project, where they name theirs
    shutil.copyfile(os.path.join(port_run, "last.pth"), checkpoint)
    assert trainer.main(_as_test(repo, command, image_tree, zip_data, checkpoint, str(tmp_path / "out"))) == 0


@pytest.mark.slow
def test_the_ports_readme_command_runs_under_torch_distributed_launch(image_tree, tmp_path):
    argv = _as_test(PORT_DIR, PORT_README[0], image_tree, "", "", str(tmp_path))
    launcher = ["-m", "torch.distributed.launch", "--nproc_per_node", "1", "--master_port", str(free_port())]
    proc = subprocess.run(
        [sys.executable, *launcher, "main.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=cli_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------- zips
def test_the_ports_zip_maps_train(image_tree, zip_data, tmp_path):
    root = str(tmp_path / "port_zip")
    shutil.copytree(zip_data, root)
    for split in ("train", "val"):  # the port's map lines: '<split>.zip@/<path>\t<label>'
        path = os.path.join(root, f"{split}_map.txt")
        with open(path) as f:
            lines = [f"{split}.zip@/{line}" for line in f]
        with open(path, "w") as f:
            f.writelines(lines)
    with zipfile.ZipFile(os.path.join(root, "val.zip")) as zf:  # a line names no member as it is
        assert lines[0].split("\t")[0] not in zf.namelist()
    argv = _as_test(PORT_DIR, PORT_README[0], root, "", "", str(tmp_path / "out"))
    assert trainer.main(argv + ["DATA.FORMAT", "zip"]) == 0
    assert "data (zip): 24 train images" in read_log(str(tmp_path / "out" / "tiny_moat_0" / "default"))


# ------------------------------------------------------------------------------- checkpoints
def _saved_config(repo: str) -> CfgNode:
    with open(os.path.join(repo, "config.json")) as f:
        return CfgNode(yaml.safe_load(f))


def _their_checkpoint(path, weights, config=None) -> str:
    """A checkpoint as their save_checkpoint writes it: weights, optimizer and schedule state,
    epoch, max accuracy, and the yacs config object itself (pickled)."""
    state = {
        "model": {name: torch.zeros(2) for name in weights},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "lr_scheduler": {"last_epoch": 4},
        "max_accuracy": 0.0,
        "epoch": 4,
    }
    if config is not None:
        state["config"] = config
    torch.save(state, path)
    return str(path)


PORT_WEIGHTS = ["stem.0.weight", "MBConv1.0.main_path.0.weight", "MOAT1.0.moat_attention.attention.proj.weight",
                "head.weight"]  # fmt: skip
SWIN_WEIGHTS = ["patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table", "norm.weight",
                "head.weight"]  # fmt: skip


@pytest.mark.parametrize("pickled", [True, False], ids=["as-saved", "config-stripped"])
def test_a_port_checkpoint_is_recognised_and_pointed_to_the_converted_official_weights(tmp_path, pickled):
    path = _their_checkpoint(tmp_path / "ckpt_epoch_4.pth", PORT_WEIGHTS, _saved_config(PORT_DIR) if pickled else None)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: a checkpoint of the unofficial MOAT port")
    assert "do not map onto this project's models" in msg and "tools/convert_deeplab2.py" in msg
    assert ("a pickled yacs.config.CfgNode under 'config'" in msg) == pickled


def test_a_swin_checkpoint_is_recognised_as_no_moat_model(tmp_path):
    path = _their_checkpoint(tmp_path / "ckpt_epoch_4.pth", SWIN_WEIGHTS, _saved_config(SWIN_DIR))
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: a Swin Transformer checkpoint") and "tools/convert_deeplab2.py" in msg
    assert "yacs.config.CfgNode under 'config'" in msg and "\n" not in msg


def test_the_refusal_of_pickled_objects_names_them_and_their_key_without_running_them(tmp_path, port_run):
    ours = torch.load(os.path.join(port_run, "last.pth"), map_location="cpu", weights_only=True)
    path = str(tmp_path / "ours_with_a_cfgnode.pth")
    torch.save({**ours, "config": _saved_config(PORT_DIR)}, path)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert "refused to load: it holds a pickled yacs.config.CfgNode under 'config'" in str(err.value)
    marker = tmp_path / "pwned"
    torch.save({"model": ours["model"], "extra": [1, {"x": Exploit(str(marker))}]}, path)
    with pytest.raises(UserError, match=r"a pickled (io|builtins)\.open under 'extra'"):
        read_checkpoint(path)
    assert not marker.exists()


def test_auto_resume_over_a_folder_holding_the_ports_checkpoint_is_refused_in_one_line(tmp_path, caplog):
    _their_checkpoint(tmp_path / "ckpt_epoch_4.pth", PORT_WEIGHTS, _saved_config(PORT_DIR))
    logger = logging.getLogger("test_migration")
    with caplog.at_level(logging.WARNING, logger="test_migration"), pytest.raises(UserError) as err:
        resume_path(str(tmp_path), "", True, logger)
    assert "holds checkpoints of which none can resume this run (ckpt_epoch_4.pth" in str(err.value)
    assert "unofficial MOAT port" in caplog.text


@pytest.mark.parametrize("flag", ["--pretrained", "--resume"])
def test_their_checkpoints_given_to_pretrained_or_eval_end_in_one_line(flag, image_tree, tmp_path, capsys):
    path = _their_checkpoint(tmp_path / "swin_tiny_patch4_window7_224.pth", SWIN_WEIGHTS)
    cfg = os.path.join(SWIN_DIR, "configs", "swin", "swin_tiny_patch4_window7_224.yaml")
    argv = ["--cfg", cfg, flag, path, "--data-path", image_tree, "--batch-size", "4", "--output", str(tmp_path / "out")]
    argv += ["--opts", *TINY]
    assert trainer.main(argv + (["--eval"] if flag == "--resume" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: a Swin Transformer checkpoint") and "\n" not in err
