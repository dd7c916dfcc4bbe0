"""Config tree: BASE inheritance, precedence of flags and --opts, and one-line errors for
unknown keys, wrong types and invalid values (each naming the key and what is accepted)."""
from __future__ import annotations

import pytest

from config import ConfigError, config_to_dict, get_config
from main import get_args_parser


def _args(*argv):
    return get_args_parser().parse_args(list(argv))


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_base_files_merge_first_and_the_child_overrides_them(tmp_path):
    _write(tmp_path / "base.yaml", "TRAIN:\n  EPOCHS: 7\n  BASE_LR: 0.002\n")
    child = _write(tmp_path / "child.yaml", "BASE: ['base.yaml']\nTRAIN:\n  EPOCHS: 9\n")
    config = get_config(_args("--cfg", child))
    assert config.TRAIN.EPOCHS == 9 and config.TRAIN.BASE_LR == 0.002


def test_flags_override_yaml_and_opts_override_everything(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "DATA:\n  BATCH_SIZE: 16\n")
    config = get_config(_args("--cfg", cfg, "--batch-size", "32", "--tag", "x",
                              "--opts", "TRAIN.EPOCHS", "3", "MODEL.NAME", "tiny_moat_1"))
    assert (config.DATA.BATCH_SIZE, config.TAG, config.TRAIN.EPOCHS, config.MODEL.NAME) == \
        (32, "x", 3, "tiny_moat_1")
    assert config.is_frozen()


@pytest.mark.parametrize("yaml_value,flags,expected", [
    ("true", [], True), ("false", [], False),  # an absent switch leaves the file's value
    ("true", ["--no-channels-last"], False), ("false", ["--channels-last"], True),
])
def test_channels_last_switch_overrides_the_file_both_ways(tmp_path, yaml_value, flags, expected):
    cfg = _write(tmp_path / "c.yaml", f"CHANNELS_LAST: {yaml_value}\n")
    assert get_config(_args("--cfg", cfg, *flags)).CHANNELS_LAST is expected


def test_absent_store_true_flags_leave_the_config_alone(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "TRAIN:\n  COMPILE: true\n  USE_CHECKPOINT: true\n")
    config = get_config(_args("--cfg", cfg))
    assert config.TRAIN.COMPILE and config.TRAIN.USE_CHECKPOINT and not config.EVAL_MODE


def test_every_config_file_loads_and_every_variant_has_one():
    import glob
    import os

    from models import list_variants
    folder = os.path.join(os.path.dirname(__file__), "..", "configs")
    for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
        get_config(_args("--cfg", path))
    for variant in list_variants():
        assert get_config(_args("--cfg", os.path.join(folder, f"{variant}.yaml"))).MODEL.NAME == variant
        if variant.startswith("moat_") and not variant.endswith("_no_pe"):
            ft = get_config(_args("--cfg", os.path.join(folder, f"{variant}_384_ft.yaml")))
            assert (ft.MODEL.NAME, ft.DATA.IMG_SIZE) == (variant, 384)


@pytest.mark.parametrize("opts, key, accepted", [
    (["TRAIN.NOT_A_KEY", "1"], "TRAIN.NOT_A_KEY", "Non-existent"),
    (["TRAIN.EPOCHS", "many"], "TRAIN.EPOCHS", "Type mismatch"),
    (["TRAIN.BASE_LR", "-0.1"], "TRAIN.BASE_LR", "must be"),
    (["DATA.BATCH_SIZE", "0"], "DATA.BATCH_SIZE", "must be > 0"),
    (["MODEL.NAME", "moat_9"], "MODEL.NAME", "tiny_moat_0"),
    (["TRAIN.OPTIMIZER.NAME", "lion"], "TRAIN.OPTIMIZER.NAME", "'adamw', 'sgd'"),
    (["TRAIN.LR_SCHEDULER.NAME", "poly"], "TRAIN.LR_SCHEDULER.NAME", "'cosine', 'linear', 'step'"),
    (["AMP_OPT_LEVEL", "O7"], "AMP_OPT_LEVEL", "'O1'"),
    (["DATA.BATCH_SIZE", "5"], "DATA.BATCH_SIZE", "even while Mixup/CutMix is on"),
])
def test_bad_values_are_one_line_errors_naming_key_and_accepted_values(tmp_path, opts, key, accepted):
    cfg = _write(tmp_path / "c.yaml", "MODEL:\n  NAME: tiny_moat_0\n")
    with pytest.raises(ConfigError) as err:
        get_config(_args("--cfg", cfg, "--opts", *opts))
    msg = str(err.value)
    assert "\n" not in msg and key in msg and accepted in msg


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "TRAIN:\n  EPOCH: 3\n")
    with pytest.raises(ConfigError, match="EPOCH"):
        get_config(_args("--cfg", cfg))


def test_unknown_flag_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        get_args_parser().parse_args(["--cfg", "x.yaml", "--epochs", "3"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --epochs" in capsys.readouterr().err


def test_old_launchers_local_rank_flag_is_accepted(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = _write(tmp_path / "c.yaml", "MODEL:\n  NAME: tiny_moat_0\n")
    assert get_config(_args("--cfg", cfg, "--local_rank", "1")).LOCAL_RANK == 1
    assert get_config(_args("--cfg", cfg, "--local-rank", "1")).LOCAL_RANK == 1


def test_config_to_dict_is_plain_containers_for_weights_only_checkpoints(tmp_path):
    import torch
    d = config_to_dict(get_config())
    torch.save({"config": d}, tmp_path / "c.pth")
    assert torch.load(tmp_path / "c.pth", weights_only=True)["config"] == d
