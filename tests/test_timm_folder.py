"""MOAT weights in timm's own formats: the hub folder of ``models/hub.py`` loads through
``local-dir:`` and ``hf-hub:`` (served from disk: no network), trainer and converter files load
through ``pretrained_cfg_overlay=dict(file=...)``, and every variant names its official release."""

import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import models.hub as hub
from models import MOAT_CFGS, create_moat, list_variants
from tools import convert_deeplab2 as convert

PREPROCESSING = dict(
    img_size=96, crop_pct=0.9, interpolation="bilinear", mean=[0.5, 0.4, 0.3], std=[0.2] * 3, crop=True
)
CLASS_NAMES = ["cat", "dog", "owl"]
HAS_LOCAL_DIR = hasattr(timm.models._hub, "load_model_config_from_path")


def custom_model() -> torch.nn.Module:
    """A trained-looking custom architecture: windowed attention, padded pool, other depths."""
    torch.manual_seed(0)
    cfg = MOAT_CFGS["tiny_moat_0"].replace(depths=(1, 1, 2, 1), window_size=(3, 0), pool_size=3)
    model = create_moat("my_moat", cfg=cfg, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero biases / unit norms left
    return model.eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def folder(tmp_path):
    model = custom_model()
    path = hub.save_timm_folder(model, str(tmp_path / "hub"), CLASS_NAMES, PREPROCESSING, origin_url="https://x/y")
    return model, path


def check_loaded(model, loaded) -> None:
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)
    # drop_path_rate is training-only and not recorded (as timm's exports omit drop rates).
    assert loaded.cfg == model.cfg.replace(drop_path_rate=loaded.cfg.drop_path_rate)
    assert loaded.pretrained_cfg["label_names"] == CLASS_NAMES
    data = timm.data.resolve_data_config(model=loaded)
    assert tuple(data["input_size"]) == (3, 96, 96) and data["crop_pct"] == 0.9 and data["interpolation"] == "bilinear"
    assert list(data["mean"]) == PREPROCESSING["mean"] and list(data["std"]) == PREPROCESSING["std"]


def test_folder_holds_timms_layout_with_the_architecture_and_preprocessing(folder):
    model, path = folder
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    # Not registered: the closest registered architecture plus every field that differs from it.
    assert config["architecture"] == "moat_0" and config["num_classes"] == 3
    assert config["model_args"]["depths"] == [1, 1, 2, 1] and config["model_args"]["pool_size"] == 3
    assert config["label_names"] == CLASS_NAMES
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 96, 96] and cfg["pool_size"] == [3, 3] and cfg["crop_mode"] == "center"
    assert cfg["origin_url"] == "https://x/y" and cfg["num_classes"] == 3
    assert "label_names" not in model.pretrained_cfg  # the model's own cfg is left as it was


@pytest.mark.skipif(not HAS_LOCAL_DIR, reason=f"timm {timm.__version__} has no 'local-dir:' model source")
def test_local_dir_builds_the_model_and_loads_the_weights(folder):
    model, path = folder
    check_loaded(model, timm.create_model(f"local-dir:{path}", pretrained=True))


def test_the_same_folder_on_the_hub_loads_with_hf_hub(folder, monkeypatch):
    model, path = folder
    served = []

    def download(repo_id=None, filename=None, *args, **kwargs):  # hf_hub_download, from disk
        served.append((repo_id, filename))
        return os.path.join(path, filename)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    check_loaded(model, timm.create_model("hf-hub:someone/my_moat", pretrained=True))
    assert ("someone/my_moat", "model.safetensors") in served


def test_a_registered_variant_is_recorded_by_name_without_model_args(tmp_path):
    model = timm.create_model("tiny_moat_0", num_classes=3)
    path = hub.save_timm_folder(model, str(tmp_path), CLASS_NAMES, {**PREPROCESSING, "crop": False})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["architecture"] == "tiny_moat_0"
    assert not {k: v for k, v in config.get("model_args", {}).items() if k in hub.MoatCfg.__dataclass_fields__}
    # Without TEST.CROP the trainer squashes the whole image to the input size.
    assert config["pretrained_cfg"]["crop_mode"] == "squash" and config["pretrained_cfg"]["crop_pct"] == 1.0


@pytest.mark.parametrize(
    "preprocessing,needle",
    [({**PREPROCESSING, "img_size": 100}, "img_size=100"), ({"img_size": 96}, "preprocessing lacks crop_pct")],
)
def test_bad_preprocessing_is_a_one_line_error_naming_the_key(tmp_path, preprocessing, needle):
    with pytest.raises(ValueError, match=needle):
        hub.save_timm_folder(custom_model(), str(tmp_path), CLASS_NAMES, preprocessing)
    with pytest.raises(ValueError, match="class_names: 2 names for a 3-class head"):
        hub.save_timm_folder(custom_model(), str(tmp_path), CLASS_NAMES[:2], PREPROCESSING)


def _two_weight_sets():
    torch.manual_seed(0)
    raw = timm.create_model("tiny_moat_0", num_classes=3).state_dict()
    ema = timm.create_model("tiny_moat_0", num_classes=3).state_dict()
    return raw, ema


def test_pretrained_overlay_file_loads_a_trainer_checkpoint_ema_first(tmp_path):
    raw, ema = _two_weight_sets()
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": raw, "model_ema": ema, "epoch": 3, "config": {"MODEL": {"NAME": "tiny_moat_0"}}}, path)
    model = timm.create_model(
        "tiny_moat_0", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=path, num_classes=3)
    )
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    # timm's load_checkpoint (and create_model's checkpoint_path) read it the same way.
    model = timm.create_model("tiny_moat_0", num_classes=3)
    timm.models.load_checkpoint(model, path)
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    # A converted checkpoint holds only ``model``.
    torch.save({"model": raw, "model_name": "tiny_moat_0", "converted_from": {"weights": "ema"}}, path)
    model = timm.create_model(
        "tiny_moat_0", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=path, num_classes=3)
    )
    assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)


def test_a_whole_checkpoint_given_as_state_dict_is_unwrapped_by_the_filter(tmp_path):
    raw, ema = _two_weight_sets()
    checkpoint = {"model": {f"module.{k}": v for k, v in raw.items()}, "model_ema": ema, "epoch": 3}
    model = timm.create_model(
        "tiny_moat_0", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(state_dict=checkpoint, num_classes=3)
    )
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    del checkpoint["model_ema"]
    model = timm.create_model(
        "tiny_moat_0", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(state_dict=checkpoint, num_classes=3)
    )
    assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)


@pytest.mark.parametrize("name", list_variants())
def test_every_variant_names_the_official_release_it_converts_from(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.origin_url == convert.RELEASE_URL + convert.RELEASES[name].file
    assert f"{convert.RELEASES[name].img_size} px" in cfg.notes[0]
    assert not cfg.has_weights  # no PyTorch weights are published: nothing for timm to download


def test_test_moat_is_a_timm_model_but_not_a_variant():
    assert "test_moat" in timm.list_models("*moat*") and "test_moat" not in list_variants()
    model = timm.create_model("test_moat").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 1000) and F.gelu(model.forward_features(x)).shape[1] == 64
