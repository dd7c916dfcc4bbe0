"""tools/export.py: safetensors round trip with metadata, TorchScript and ONNX (onnxruntime)
outputs equal to PyTorch, dynamic batch and dynamic image size for global attention."""

import json

import onnx
import pytest
import torch
from safetensors import safe_open

from checkpoints import load_for_inference
from data.transforms import build_transform
from inference_helpers import (
    CLASS_NAMES,
    CROP_PCT,
    IMG_SIZE,
    INTERPOLATION,
    MEAN,
    STD,
    VARIANT,
    make_checkpoint,
    make_images,
    reference_model,
)
from models import create_moat
from tools import export, predict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export of all three formats from a trained checkpoint, checked by the tool itself."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(str(root / "ckpt.pth"))
    # Relative-bias tables are ~0.02 after a few steps; at ~3 a bias that was frozen at the
    # traced size instead of resized with the input would show in the logits at other sizes.
    state = torch.load(checkpoint, weights_only=True)
    for key, value in state["model_ema"].items():
        if "relative_position_bias_table" in key:
            value.mul_(150.0)
    torch.save(state, checkpoint)
    base = str(root / "out" / "model")
    assert export.main([checkpoint, "--format", "safetensors", "torchscript", "onnx", "-o", base, "--check"]) == 0
    return checkpoint, export.output_paths(base, export.FORMATS)


def test_safetensors_round_trip_is_equal_and_carries_metadata(exported):
    checkpoint, paths = exported
    model, meta = load_for_inference(paths["safetensors"])
    want = torch.load(checkpoint, weights_only=True)["model_ema"]  # EMA by default
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (meta.variant, meta.class_names, meta.weights) == (VARIANT, CLASS_NAMES, "ema")
    assert meta.preprocessing == {
        "img_size": IMG_SIZE,
        "crop_pct": CROP_PCT,
        "interpolation": INTERPOLATION,
        "mean": list(MEAN),
        "std": list(STD),
        "crop": True,
    }
    with safe_open(paths["safetensors"], framework="pt") as f:
        raw_meta = f.metadata()
    assert json.loads(raw_meta["moat.class_names"]) == CLASS_NAMES
    # The eval transform rebuilt from the metadata equals the one from the checkpoint's config.
    _, ckpt_meta = load_for_inference(checkpoint)
    assert repr(build_transform(False, meta.config)) == repr(build_transform(False, ckpt_meta.config))


def test_predict_from_safetensors_equals_predict_from_checkpoint(exported, tmp_path):
    checkpoint, paths = exported
    images = make_images(str(tmp_path / "imgs"), count=3)
    outs = []
    for source in (checkpoint, paths["safetensors"]):
        out = str(tmp_path / f"{len(outs)}.csv")
        assert predict.main([source, *images, "--num-workers", "0", "--csv", out, "--quiet"]) == 0
        outs.append(open(out).read())
    assert outs[0] == outs[1]


def test_no_ema_export_holds_the_raw_weights(exported, tmp_path):
    checkpoint, _ = exported
    path = str(tmp_path / "raw.safetensors")
    assert export.main([checkpoint, "--format", "safetensors", "--no-ema", "-o", path]) == 0
    model, meta = load_for_inference(path)
    want = torch.load(checkpoint, weights_only=True)["model"]
    assert meta.weights == "raw" and all(torch.equal(model.state_dict()[k], want[k]) for k in want)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_output_equals_pytorch_at_two_batches_and_sizes(exported):
    checkpoint, paths = exported
    model = reference_model(checkpoint)
    cases = [(1, 64, 64), (3, 64, 64), (2, 96, 64)]
    assert export.check_export(model, "torchscript", paths["torchscript"], cases, atol=1e-5) < 1e-5
    extra = {"moat_meta.json": ""}
    torch.jit.load(paths["torchscript"], _extra_files=extra)
    assert json.loads(extra["moat_meta.json"])["moat.variant"] == VARIANT


def test_onnx_matches_pytorch_with_dynamic_batch_and_image_size(exported):
    checkpoint, paths = exported
    proto = onnx.load(paths["onnx"])
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert {p.key: p.value for p in proto.metadata_props}["moat.variant"] == VARIANT
    model = reference_model(checkpoint)
    cases = [(1, 64, 64), (4, 64, 64), (2, 96, 64), (1, 224, 224)]
    assert export.check_export(model, "onnx", paths["onnx"], cases) < 1e-3


def test_timm_folder_loads_in_timm_with_the_checkpoint_classes_and_preprocessing(exported, tmp_path, monkeypatch):
    import os

    import timm

    checkpoint, _ = exported
    folder = str(tmp_path / "hub")
    assert export.main([checkpoint, "--format", "timm-folder", "-o", folder, "--check"]) == 0
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["architecture"] == VARIANT and config["label_names"] == CLASS_NAMES
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, IMG_SIZE, IMG_SIZE] and cfg["num_classes"] == len(CLASS_NAMES)
    assert (cfg["crop_pct"], cfg["interpolation"], cfg["mean"], cfg["std"]) == (
        CROP_PCT,
        INTERPOLATION,
        [*MEAN],
        [*STD],
    )
    # As pushed to the Hub: hf-hub: (served from the folder) rebuilds the model with the EMA weights.
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", lambda repo_id, filename, **kw: f"{folder}/{filename}")
    loaded = timm.create_model("hf-hub:someone/tiny_moat_0-colours", pretrained=True).eval()
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference_model(checkpoint)(x), rtol=0, atol=0)
    assert export.output_paths("out/m", ["safetensors", "timm-folder"]) == {
        "safetensors": "out/m.safetensors",
        "timm-folder": "out/m-timm",
    }


def test_windowed_attention_gets_a_fixed_onnx_size():
    assert export.supports_dynamic_size(create_moat(VARIANT, num_classes=3))
    assert not export.supports_dynamic_size(create_moat(VARIANT, num_classes=3, window_size=(2, 0)))


def test_bad_img_size_is_a_one_line_error(exported, capsys):
    checkpoint, _ = exported
    assert export.main([checkpoint, "--format", "onnx", "--img-size", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_a_custom_architecture_rebuilds_from_the_file_alone_in_every_inference_path(tmp_path):
    """A checkpoint of a new architecture name (the 5-stage example) needs no config to load:
    predict, export (safetensors and back) and torch.hub rebuild it from its model_cfg."""
    import argparse
    import os

    from config import get_config
    from inference_helpers import REPO
    from models import moat_cfg_from_config

    config = get_config(
        argparse.Namespace(cfg=os.path.join(REPO, "configs", "examples", "my_moat_5stage.yaml"), opts=None)
    )
    cfg = moat_cfg_from_config(config)
    torch.manual_seed(0)
    model = create_moat("my_moat_5stage", cfg=cfg, num_classes=3).eval()
    path = str(tmp_path / "custom.pth")
    torch.save(
        {
            "model": model.state_dict(),
            "model_name": "my_moat_5stage",
            "model_cfg": cfg.to_dict(),
            "class_names": CLASS_NAMES,
        },
        path,
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    loaded, meta = load_for_inference(path)
    assert meta.variant == "my_moat_5stage" and len(loaded.stages) == 5
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    base = str(tmp_path / "custom")
    assert export.main([path, "--format", "safetensors", "-o", base]) == 0
    again, meta2 = load_for_inference(base + ".safetensors")
    assert meta2.model_cfg == cfg.to_dict()
    with torch.no_grad():
        assert torch.equal(again(x), want)
    hub = torch.hub.load(REPO, "moat_from_checkpoint", source="local", weights=base + ".safetensors")
    with torch.no_grad():
        assert torch.equal(hub(x), want)
    make_images(str(tmp_path / "img"), 2)
    assert predict.main([path, str(tmp_path / "img"), "--csv", str(tmp_path / "p.csv")]) == 0
