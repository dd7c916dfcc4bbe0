"""Config tree: BASE inheritance, precedence of flags and --opts, and one-line errors for
unknown keys, wrong types and invalid values (each naming the key and what is accepted)."""

from __future__ import annotations

import os

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
    config = get_config(
        _args(
            "--cfg", cfg, "--batch-size", "32", "--tag", "x", "--opts", "TRAIN.EPOCHS", "3", "MODEL.NAME", "tiny_moat_1"
        )
    )
    assert (config.DATA.BATCH_SIZE, config.TAG, config.TRAIN.EPOCHS, config.MODEL.NAME) == (32, "x", 3, "tiny_moat_1")
    assert config.is_frozen()


@pytest.mark.parametrize(
    "yaml_value,flags,expected",
    [
        ("true", [], True),
        ("false", [], False),  # an absent switch leaves the file's value
        ("true", ["--no-channels-last"], False),
        ("false", ["--channels-last"], True),
    ],
)
def test_channels_last_switch_overrides_the_file_both_ways(tmp_path, yaml_value, flags, expected):
    cfg = _write(tmp_path / "c.yaml", f"CHANNELS_LAST: {yaml_value}\n")
    assert get_config(_args("--cfg", cfg, *flags)).CHANNELS_LAST is expected


def test_absent_store_true_flags_leave_the_config_alone(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "TRAIN:\n  COMPILE: true\n  USE_CHECKPOINT: true\n")
    config = get_config(_args("--cfg", cfg))
    assert config.TRAIN.COMPILE and config.TRAIN.USE_CHECKPOINT


def test_every_config_file_loads_and_every_variant_has_one():
    import glob

    from models import list_variants

    folder = os.path.join(os.path.dirname(__file__), "..", "configs")
    for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
        get_config(_args("--cfg", path))
    for variant in list_variants():
        assert get_config(_args("--cfg", os.path.join(folder, f"{variant}.yaml"))).MODEL.NAME == variant
        if variant.startswith("moat_") and not variant.endswith("_no_pe"):
            ft = get_config(_args("--cfg", os.path.join(folder, f"{variant}_384_ft.yaml")))
            assert (ft.MODEL.NAME, ft.DATA.IMG_SIZE) == (variant, 384)


@pytest.mark.parametrize(
    "opts, key, accepted",
    [
        (["TRAIN.NOT_A_KEY", "1"], "TRAIN.NOT_A_KEY", "Non-existent"),
        (["TRAIN.EPOCHS", "many"], "TRAIN.EPOCHS", "Type mismatch"),
        (["TRAIN.BASE_LR", "-0.1"], "TRAIN.BASE_LR", "must be"),
        (["DATA.BATCH_SIZE", "0"], "DATA.BATCH_SIZE", "must be >= 1"),
        (["MODEL.NAME", "moat_9"], "MODEL.NAME", "tiny_moat_0"),
        (["TRAIN.OPTIMIZER.NAME", "lion"], "TRAIN.OPTIMIZER.NAME", "'adamw', 'sgd'"),
        (["TRAIN.LR_SCHEDULER.NAME", "poly"], "TRAIN.LR_SCHEDULER.NAME", "'cosine', 'linear', 'step'"),
        (["AMP_OPT_LEVEL", "O7"], "AMP_OPT_LEVEL", "'O1'"),
        (["DATA.BATCH_SIZE", "5"], "DATA.BATCH_SIZE", "even while Mixup/CutMix is on"),
    ],
)
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


def test_old_launchers_local_rank_flag_is_accepted_and_launch_state_stays_out_of_the_config():
    parser = get_args_parser()
    assert parser.parse_args(["--cfg", "c.yaml", "--local_rank", "1"]).local_rank == 1
    assert parser.parse_args(["--cfg", "c.yaml", "--local-rank", "1"]).local_rank == 1
    assert not {"EVAL_MODE", "THROUGHPUT_MODE", "LOCAL_RANK"} & set(get_config())


def test_a_saved_config_of_an_older_version_with_launch_keys_still_loads(tmp_path):
    cfg = _write(
        tmp_path / "old.yaml", "EVAL_MODE: false\nLOCAL_RANK: 3\nTHROUGHPUT_MODE: false\nMODEL:\n  NAME: tiny_moat_0\n"
    )
    assert get_config(_args("--cfg", cfg)).MODEL.NAME == "tiny_moat_0"


def test_config_differences_name_the_changed_keys_and_ignore_launch_keys():
    from config import config_differences

    old = {
        "TRAIN": {"BASE_LR": 0.1, "AUTO_RESUME": True, "SYNC_DEBUG": True},
        "LOCAL_RANK": 0,
        "DATA": {"MEAN": [1, 2]},
    }
    new = {"TRAIN": {"BASE_LR": 0.2, "AUTO_RESUME": False, "SYNC_DEBUG": False}, "DATA": {"MEAN": (1, 2)}}
    assert config_differences(old, new) == ["TRAIN.BASE_LR: 0.1 -> 0.2"]


def test_config_to_dict_is_plain_containers_for_weights_only_checkpoints(tmp_path):
    import torch

    d = config_to_dict(get_config())
    torch.save({"config": d}, tmp_path / "c.pth")
    assert torch.load(tmp_path / "c.pth", weights_only=True)["config"] == d


# ------------------------------------------------------------------ architecture keys (MODEL.MOAT)
def _build(config):
    from models import build_model

    return build_model(config)


def test_unset_keys_keep_the_variant_and_set_keys_override_it(tmp_path):
    cfg = _write(
        tmp_path / "c.yaml",
        "MODEL:\n  NAME: tiny_moat_0\n  MOAT:\n    DEPTHS: [1, 2, 2, 1]\n"
        "    HEAD_DIM: 16\n    EXPAND_RATIO: 6.0\n    POS_EMBED: false\n",
    )
    config = get_config(_args("--cfg", cfg, "--opts", "MODEL.MOAT.KERNEL_SIZE", "5", "MODEL.NUM_CLASSES", "3"))
    model = _build(config)
    assert model.cfg.depths == (1, 2, 2, 1) and model.cfg.head_dim == 16 and model.cfg.kernel_size == 5
    assert model.cfg.expand_ratio == 6.0 and model.cfg.pos_embed is False
    assert model.cfg.stem_dims == (32, 32) and model.cfg.dims == (32, 64, 128, 256)  # unset: tiny_moat_0's
    assert model.stages[2].blocks[0].attn.num_heads == 8 and model.stages[2].blocks[0].attn.rel_pos is None
    default = get_config(_args("--cfg", _write(tmp_path / "d.yaml", "MODEL:\n  NAME: tiny_moat_0\n")))
    from models import MOAT_CFGS, moat_cfg_from_config

    assert moat_cfg_from_config(default) == MOAT_CFGS["tiny_moat_0"]


def test_a_new_name_builds_the_architecture_its_keys_define(tmp_path):
    cfg = _write(
        tmp_path / "c.yaml",
        "MODEL:\n  NAME: my_moat\n  NUM_CLASSES: 5\n  DROP_PATH_RATE: 0.1\n"
        "  MOAT:\n    STEM_DIMS: [16, 16]\n    DEPTHS: [1, 1, 2]\n    DIMS: [32, 64, 96]\n"
        "    STAGE_TYPES: [mbconv, moat, moat]\n    WINDOW_SIZE: [0, 2]\nDATA:\n  IMG_SIZE: 64\n",
    )
    model = _build(get_config(_args("--cfg", cfg)))
    assert model.cfg.dims == (32, 64, 96) and model.num_classes == 5 and model.cfg.drop_path_rate == 0.1
    assert model.window_size == (None, None, 2) and model.cfg.head_dim == 32  # unset: the official value
    # Native bias windows: the 224-px maps of the attention stages (stride 8 and 16).
    assert [s.blocks[0].attn.rel_pos.native_window for s in model.stages[1:]] == [28, 14]


@pytest.mark.parametrize("missing", ["STEM_DIMS", "DEPTHS", "DIMS", "STAGE_TYPES"])
def test_a_new_name_without_a_required_key_is_a_one_line_error_naming_it(tmp_path, missing):
    keys = {"STEM_DIMS": "[16, 16]", "DEPTHS": "[1, 1]", "DIMS": "[32, 64]", "STAGE_TYPES": "[mbconv, moat]"}
    body = "".join(f"    {k}: {v}\n" for k, v in keys.items() if k != missing)
    cfg = _write(tmp_path / "c.yaml", f"MODEL:\n  NAME: my_moat\n  MOAT:\n{body}")
    with pytest.raises(ConfigError) as err:
        get_config(_args("--cfg", cfg))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("invalid MODEL.NAME='my_moat': not a registered variant")
    assert msg.endswith(f"must set MODEL.MOAT.{missing}")


@pytest.mark.parametrize(
    "opts, key, needle",
    [
        (["MODEL.MOAT.HEAD_DIM", "48"], "MODEL.MOAT.DIMS", "not divisible by MODEL.MOAT.HEAD_DIM 48"),
        (["MODEL.MOAT.DIMS", "[32, 64, 100, 256]"], "MODEL.MOAT.DIMS", "width 100 of attention stage 3"),
        (
            ["MODEL.MOAT.STAGE_TYPES", "['mbconv', 'mbconv', 'conv', 'moat']"],
            "MODEL.MOAT.STAGE_TYPES",
            "unknown block type 'conv'",
        ),
        (["MODEL.MOAT.DEPTHS", "[2, 3]"], "MODEL.MOAT.DIMS", "but MODEL.MOAT.DEPTHS [2, 3] has 2"),
        (["MODEL.MOAT.STAGE_TYPES", "['mbconv', 'moat']"], "MODEL.MOAT.STAGE_TYPES", "MODEL.MOAT.DEPTHS [2, 3, 7, 2]"),
        (["MODEL.MOAT.STRIDES", "[2, 2]"], "MODEL.MOAT.STRIDES", "has 2 entries"),
        (["MODEL.MOAT.WINDOW_SIZE", "[7, 0, 0]"], "MODEL.MOAT.WINDOW_SIZE", "one per attention ('moat') stage (2)"),
        (
            ["MODEL.MOAT.WINDOW_SIZE", "[5, 0]"],
            "MODEL.MOAT.WINDOW_SIZE",
            "window 5 of stage 3 does not divide its 14x14 feature map at DATA.IMG_SIZE 224",
        ),
        (["DATA.IMG_SIZE", "100"], "DATA.IMG_SIZE", "multiple of the total stride 32"),
        (["MODEL.MOAT.STRIDES", "[2, 2, 2, 4]", "DATA.IMG_SIZE", "224"], "DATA.IMG_SIZE", "total stride 64"),
        (["MODEL.MOAT.POOL_SIZE", "4"], "MODEL.MOAT.POOL_SIZE", "2 (classification), 3"),
        (["MODEL.MOAT.BN_MOMENTUM", "0.0"], "MODEL.MOAT.BN_MOMENTUM", "(0, 1]"),
        (["MODEL.MOAT.NORM_LAYER", "'instancenorm'"], "MODEL.MOAT.NORM_LAYER", "batchnorm2d"),
        (["MODEL.MOAT.POS_EMBED", "'yes'"], "MODEL.MOAT.POS_EMBED", "true or false"),
    ],
)
def test_invalid_architecture_keys_are_one_line_errors_naming_the_key(tmp_path, opts, key, needle):
    cfg = _write(tmp_path / "c.yaml", "MODEL:\n  NAME: tiny_moat_0\nDATA:\n  IMG_SIZE: 224\n")
    with pytest.raises(ConfigError) as err:
        get_config(_args("--cfg", cfg, "--opts", *opts))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"invalid {key}=") and needle in msg


@pytest.mark.parametrize("window", [[14, 0], [0, 0, 14, 0]])
def test_window_size_is_per_attention_stage_or_per_stage(tmp_path, window):
    cfg = _write(tmp_path / "c.yaml", f"MODEL:\n  NAME: tiny_moat_0\n  MOAT:\n    WINDOW_SIZE: {window}\n")
    model = _build(get_config(_args("--cfg", cfg)))
    assert model.window_size == (None, None, 14, None)


def test_example_architectures_load_and_describe_what_their_names_say():
    import glob

    from models import moat_cfg_from_config

    folder = os.path.join(os.path.dirname(__file__), "..", "configs", "examples")
    paths = sorted(glob.glob(os.path.join(folder, "*.yaml")))
    assert len(paths) >= 2
    cfgs = {os.path.basename(p): moat_cfg_from_config(get_config(_args("--cfg", p))) for p in paths}
    assert cfgs["tiny_moat_0_window.yaml"].window_size == (None, None, 7, None)
    five = cfgs["my_moat_5stage.yaml"]
    assert five.num_stages == 5 and five.total_stride == 32


# ---------------------------------------------------------------------------- declared keys
def _leaf_keys() -> list:
    from config import RULES

    return sorted(RULES)


@pytest.mark.parametrize("key", _leaf_keys())
def test_every_key_given_null_either_means_what_its_rule_says_or_is_one_line(tmp_path, key):
    from config import RULES, get_key

    cfg = _write(tmp_path / "c.yaml", "MODEL:\n  NAME: tiny_moat_0\n")
    try:
        config = get_config(_args("--cfg", cfg, "--opts", key, "None"))
    except ConfigError as e:
        assert str(e).startswith(f"invalid {key}=None: null is not accepted here") and "\n" not in str(e)
        return
    null = RULES[key].null
    assert get_key(config, key) == null  # what null means for this key (None: unset)


@pytest.mark.parametrize("key", _leaf_keys())
def test_every_key_given_a_value_of_the_wrong_type_is_one_line(tmp_path, key):
    from config import get_key

    default = get_key(get_config(), key)
    wrong = "[1, 2, 3]" if isinstance(default, str) else "'not-a-value'"
    if isinstance(default, list):
        wrong = "'not-a-list'"
    cfg = _write(tmp_path / "c.yaml", "MODEL:\n  NAME: tiny_moat_0\n")
    with pytest.raises(ConfigError) as err:
        get_config(_args("--cfg", cfg, "--opts", key, wrong))
    assert "\n" not in str(err.value) and key.split(".")[-1] in str(err.value), str(err.value)


def test_swin_style_nulls_mean_off_where_swin_meant_off(tmp_path):
    cfg = _write(
        tmp_path / "c.yaml",
        "MODEL:\n  NAME: tiny_moat_0\nAUG:\n  CUTMIX_MINMAX: null\nTRAIN:\n  CLIP_GRAD: null\n",
    )
    config = get_config(_args("--cfg", cfg))
    assert config.AUG.CUTMIX_MINMAX == [] and config.TRAIN.CLIP_GRAD == 0.0


def test_a_whole_number_for_a_float_key_is_that_float(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "MODEL:\n  NAME: tiny_moat_0\nTRAIN:\n  CLIP_GRAD: 5\n")
    config = get_config(_args("--cfg", cfg, "--opts", "TRAIN.WEIGHT_DECAY", "0"))
    assert config.TRAIN.CLIP_GRAD == 5.0 and isinstance(config.TRAIN.CLIP_GRAD, float)
    assert config.TRAIN.WEIGHT_DECAY == 0.0 and isinstance(config.TRAIN.WEIGHT_DECAY, float)


def test_the_architecture_keys_are_the_moatcfg_fields_with_their_docs():
    from dataclasses import fields

    from config import describe_key
    from models import MoatCfg

    config = get_config()
    names = [f.name for f in fields(MoatCfg) if f.name != "drop_path_rate"]
    assert list(config.MODEL.MOAT) == [n.upper() for n in names]
    assert all(config.MODEL.MOAT[n.upper()] is None for n in names)  # one spelling of unset
    for f in fields(MoatCfg):
        if f.name != "drop_path_rate":
            assert describe_key(f"MODEL.MOAT.{f.name.upper()}") == f.metadata["doc"] != ""


def test_older_files_spelling_unset_as_minus_one_or_empty_still_mean_unset(tmp_path):
    cfg = _write(
        tmp_path / "old.yaml",
        "MODEL:\n  NAME: tiny_moat_0\n  DROP_PATH_RATE: -1.0\n  MOAT:\n    DEPTHS: []\n    HEAD_DIM: -1\n"
        "    NORM_LAYER: ''\n    WINDOW_SIZE: [7, 0]\nDATA:\n  IMG_SIZE: 224\n",
    )
    config = get_config(_args("--cfg", cfg))
    assert (config.MODEL.MOAT.DEPTHS, config.MODEL.MOAT.HEAD_DIM, config.MODEL.MOAT.NORM_LAYER) == (None, None, None)
    assert config.MODEL.DROP_PATH_RATE is None and config.MODEL.MOAT.WINDOW_SIZE == [7, 0]
    from config import config_from_dict

    saved = config_from_dict({"MODEL": {"MOAT": {"KERNEL_SIZE": -1, "DIMS": []}, "DROP_PATH_RATE": -1.0}})
    assert saved.MODEL.MOAT.KERNEL_SIZE is None and saved.MODEL.MOAT.DIMS is None and saved.MODEL.DROP_PATH_RATE is None


def test_the_flags_offer_exactly_the_values_their_keys_accept():
    import main as trainer
    from config import RULES

    parser = trainer.get_args_parser()
    flags = {a.dest: a for a in parser._actions if a.choices}
    for dest, key in (("dataset", "DATA.DATASET"), ("data_format", "DATA.FORMAT"), ("cache_mode", "DATA.CACHE_MODE"),
                      ("amp", "AMP"), ("amp_opt_level", "AMP_OPT_LEVEL"), ("device", "DEVICE")):  # fmt: skip
        assert tuple(flags[dest].choices) == tuple(c for c in RULES[key].choices if c != ""), dest
