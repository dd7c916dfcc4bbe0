"""tools/convert_deeplab2.py on the deeplab2 fixture (``tests/data/deeplab2_moat``: a small MOAT
checkpoint written by the authors' TensorFlow code, with that code's logits; its README says how).

The converted weights reproduce the official logits; every model tensor gets one checkpoint value;
the output loads in predict, export, torch.hub and ``main.py --pretrained``; damaged or mismatched
checkpoints are one-line errors; a file without BatchNorm statistics is recovered by calibration.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import main as trainer
from checkpoints import FORMAT_VERSION, load_for_inference
from conftest import REPO, make_image_tree
from data.transforms import build_transform
from models.moat import MOAT, MOAT_CFGS, MoatCfg, create_moat, list_variants
from tools import convert_deeplab2 as convert
from tools import export, predict
from tools.tf_bundle import BundleReader, write_bundle

FIXTURE = os.path.join(REPO, "tests", "data", "deeplab2_moat")
PREFIX = os.path.join(FIXTURE, "model.ckpt")
VARIANT = "deeplab2_fixture"  # the fixture's architecture, registered only inside these tests
EMA = "/ExponentialMovingAverage"
# Input normalisation option 1 of the release notes, as the fixture's README applies it.
MEAN = np.array([0.485, 0.456, 0.406]) * 255.0
STD = np.array([0.229, 0.224, 0.225]) * 255.0


# ------------------------------------------------------------------------------------- helpers
def fixture_cfg() -> MoatCfg:
    """The fixture's architecture: stem 16/16, blocks 2/2/2/1, widths 16/32/64/96, global attention."""
    return MoatCfg(
        stem_dims=(16, 16), depths=(2, 2, 2, 1), dims=(16, 32, 64, 96), stage_types=("mbconv", "mbconv", "moat", "moat")
    )


def fixture_model(pool_size: int = 2) -> MOAT:
    return MOAT(fixture_cfg(), num_classes=10, pool_size=pool_size)


@pytest.fixture
def registered(monkeypatch) -> str:
    """The fixture's architecture as a variant name, for the tools that build models by name."""
    monkeypatch.setitem(MOAT_CFGS, VARIANT, fixture_cfg())
    return VARIANT


def inputs(size: int) -> torch.Tensor:
    """The fixture's uint8 NHWC images, normalised (option 1) and transposed to NCHW."""
    images = np.load(os.path.join(FIXTURE, f"images_{size}_uint8.npy"))
    return torch.from_numpy(((images.astype(np.float64) - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2).copy())


def expected(name: str) -> np.ndarray:
    return np.load(os.path.join(FIXTURE, f"{name}.npy"))


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def logits(model: torch.nn.Module, size: int = 224) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(inputs(size)).numpy()


def error_line(err: str) -> str:
    """The error a failed run printed: its last stderr line (progress lines may precede it),
    with no traceback anywhere."""
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def run(argv, capsys):
    """``convert_deeplab2.main(argv)`` -> (exit code, stdout, stderr)."""
    code = convert.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tensors() -> dict:
    """Every fixture entry as a numpy array (to write edited copies from)."""
    with BundleReader(PREFIX) as reader:
        return {name: reader.read(name) for name in reader.entries}


def edited(tmp_path, tensors: dict, drop=(), **add) -> str:
    """A copy of the fixture checkpoint without the entries ``drop`` matches (substring) plus
    ``add``; returns its prefix."""
    kept = {n: v for n, v in tensors.items() if not any(d in n for d in drop)}
    kept.update(add)
    prefix = str(tmp_path / "edited" / "model.ckpt")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    write_bundle(prefix, kept)
    return prefix


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """The fixture converted by the CLI (EMA default) to a trainer checkpoint; crop 1.0 so that the
    eval transform leaves 224 px images untouched."""
    path = str(tmp_path_factory.mktemp("converted") / "fixture.pth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(MOAT_CFGS, VARIANT, fixture_cfg())
        assert convert.main([PREFIX, "--model", VARIANT, "--output", path, "--crop-pct", "1.0"]) == 0
    return path


# ------------------------------------------------------------------------------------- mapping
def test_every_model_tensor_receives_exactly_one_checkpoint_value():
    model = fixture_model()
    rules = convert.deeplab2_rules(model)
    targets = [r.target for r in rules]
    assert sorted(targets) == sorted(k for k in model.state_dict() if not k.endswith("num_batches_tracked"))
    sources = [s for r in rules for s in r.sources]
    assert len(sources) == len(set(sources)) == 135 + 44  # trainable + BN moving statistics

    with BundleReader(PREFIX) as reader:
        state, report = convert.convert_weights(reader, model)
        trainable = {n for n in reader.entries if n + EMA in reader.entries}
    assert report.weights == "ema" and report.used == 179
    assert report.ema == 135 and report.raw == report.raw_fallback == 44  # moving stats have no EMA copy
    assert report.bn_statistics == "checkpoint" and report.head == "checkpoint"
    assert {"moat/" + s for r in rules if r.trainable for s in r.sources} == trainable
    assert report.ignored == ["global_step", "moat/logits_head/kernel/Momentum"] and report.leftover == []
    assert report.global_step == 312500
    assert set(state) == set(model.state_dict())


@pytest.mark.parametrize("name", list_variants())
def test_every_registered_variant_maps_completely(name):
    with torch.device("meta"):
        model = create_moat(name)
    rules = convert.deeplab2_rules(model)  # raises if a tensor is unmapped
    tf_elements = sum(int(np.prod(s)) for r in rules if r.trainable for s in r.tf_shapes)
    assert tf_elements == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "weights, size, pool, name",
    [
        ("ema", 224, 2, "logits_ema_224"),
        ("ema", 288, 2, "logits_ema_288"),  # the relative tables are resized
        ("raw", 224, 2, "logits_raw_224"),
        ("ema", 224, 3, "logits_ema_224_pool3"),
    ],
)
def test_converted_weights_reproduce_the_official_logits(weights, size, pool, name):
    # An already-built model object (the way in for architectures that are not registered).
    model, report, _ = convert.load_deeplab2(PREFIX, fixture_model(pool), weights=weights)
    assert report.weights == weights
    assert rel(logits(model, size), expected(name)) < 1e-4


# --------------------------------------------------------------------------------- CLI outputs
def test_cli_writes_a_trainer_checkpoint_with_the_release_config_and_a_record(converted, capsys, tmp_path, registered):
    obj = torch.load(converted, map_location="cpu", weights_only=True)
    assert set(obj) == {"format_version", "model", "model_name", "model_cfg", "class_names", "config", "converted_from"}
    assert obj["format_version"] == FORMAT_VERSION
    assert obj["model_cfg"] == fixture_cfg().to_dict()
    assert obj["model_name"] == VARIANT and obj["class_names"] == [f"class_{i}" for i in range(10)]
    data = obj["config"]["DATA"]
    assert obj["config"]["MODEL"]["NAME"] == VARIANT and obj["config"]["MODEL"]["NUM_CLASSES"] == 10
    assert data["IMG_SIZE"] == 224 and data["CROP_PCT"] == 1.0
    assert data["MEAN"] == pytest.approx([0.485, 0.456, 0.406]) and data["STD"] == pytest.approx([0.229, 0.224, 0.225])
    record = obj["converted_from"]
    assert record["source"] == PREFIX and record["weights"] == "ema" and record["head"] == "checkpoint"
    assert record["bn_statistics"] == "checkpoint" and record["normalization"]["option"] == 1
    assert (record["entries"], record["used"], record["global_step"]) == (316, 179, 312500)
    model = fixture_model()
    model.load_state_dict(obj["model"])
    assert rel(logits(model), expected("logits_ema_224")) < 1e-4

    # Option 2 (MOAT-2/3/4): mean = std = 127.5 on 0..255 pixels is 0.5 / 0.5 on 0..1.
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
    code, out, err = run(
        [
            PREFIX,
            "--model",
            VARIANT,
            "--output",
            tmp_path / "o2.pth",
            "--normalization",
            "2",
            "--img-size",
            "288",
            "--class-names",
            names,
            "--raw",
        ],
        capsys,
    )
    assert code == 0, err
    obj = torch.load(tmp_path / "o2.pth", weights_only=True)
    assert obj["config"]["DATA"]["MEAN"] == [0.5] * 3 and obj["config"]["DATA"]["STD"] == [0.5] * 3
    assert obj["config"]["DATA"]["IMG_SIZE"] == 288 and obj["class_names"][3] == "thing 3"
    assert obj["converted_from"]["weights"] == "raw" and obj["converted_from"]["normalization"]["option"] == 2
    assert "weights: raw" in err and "BatchNorm moving statistics: found" in err
    assert f"wrote {tmp_path / 'o2.pth'}" in out


def test_cli_writes_a_timm_folder_with_the_release_url_and_preprocessing(registered, tmp_path, capsys, monkeypatch):
    import json

    import timm

    release = convert.Release("fixture_imagenet_1k_224_w_position_embedding.tar.gz", 224, 2, 1.0, "ImageNet-1K")
    monkeypatch.setitem(convert.RELEASES, VARIANT, release)
    folder = tmp_path / "hub"
    code, out, err = run([PREFIX, "--model", VARIANT, "--timm-folder", folder, "--crop-pct", "1.0"], capsys)
    assert code == 0, err
    assert f"wrote {folder}" in out and not (tmp_path / "fixture.pth").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "moat_0"  # not registered with timm: moat_0 + the differing fields
    assert config["label_names"] == [f"class_{i}" for i in range(10)]
    cfg = config["pretrained_cfg"]
    assert cfg["origin_url"] == convert.RELEASE_URL + release.file
    assert cfg["input_size"] == [3, 224, 224] and cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.5] * 3
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", lambda repo_id, filename, **kw: str(folder / filename))
    model = timm.create_model("hf-hub:someone/fixture", pretrained=True)
    assert rel(logits(model), expected("logits_ema_224")) < 1e-4
    code, _, err = run([PREFIX, "--model", VARIANT], capsys)
    assert code == 2 and "--output FILE and/or --timm-folder DIR" in error_line(err)


def test_cli_reports_the_weights_used_and_that_bn_statistics_were_found(registered, tmp_path, capsys):
    code, _, err = run([PREFIX, "--model", VARIANT, "--output", tmp_path / "c.pth"], capsys)
    assert code == 0
    assert "weights: EMA: 179 entries used (135 EMA copies, 44 raw, of which 44 non-trainable without EMA copy)" in err
    assert "BatchNorm moving statistics: found (22 layers)" in err
    assert "ignored 2 optimizer-slot / step entries" in err and "leftover" not in err


def test_pool_size_is_recorded_and_used_by_the_inference_loader(registered, tmp_path, capsys):
    code, _, err = run([PREFIX, "--model", VARIANT, "--output", tmp_path / "p3.pth", "--pool-size", "3"], capsys)
    assert code == 0, err
    model, meta = load_for_inference(str(tmp_path / "p3.pth"))
    assert meta.model_cfg["pool_size"] == 3
    assert rel(logits(model), expected("logits_ema_224_pool3")) < 1e-4


def test_predict_gives_the_official_probabilities(converted, registered, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(np.load(os.path.join(FIXTURE, "images_224_uint8.npy"))):
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "preds.csv"
    assert (
        predict.main([converted, str(folder), "--topk", "10", "--num-workers", "0", "--csv", str(out), "--quiet"]) == 0
    )
    want = torch.from_numpy(expected("logits_ema_224")).softmax(-1)
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    for row, probs in zip(rows, want):
        got = {row[1 + 2 * k]: float(row[2 + 2 * k]) for k in range(10)}
        assert got == pytest.approx({f"class_{c}": p.item() for c, p in enumerate(probs)}, abs=1e-4)


def test_export_writes_safetensors_and_torchscript_that_match(converted, registered, tmp_path, capsys):
    base = str(tmp_path / "exported")
    # Traced at 256: a trace at 224, where the stage-3/4 maps are the tables' native 14/7, skips
    # the table resize (models/moat.py returns the table itself there) and fails at other sizes.
    assert (
        export.main([converted, "--format", "safetensors", "torchscript", "--check", "-o", base, "--img-size", "256"])
        == 0
    )
    assert "check: reloaded weights equal" in capsys.readouterr().out
    model, meta = load_for_inference(base + ".safetensors")
    assert meta.variant == VARIANT and meta.weights == "ema"
    assert meta.preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert rel(logits(model), expected("logits_ema_224")) < 1e-4


def test_torch_hub_loads_the_converted_checkpoint(converted, registered):
    model = torch.hub.load(REPO, VARIANT, source="local", weights=converted)
    assert not model.training and model.moat_meta.weights == "ema"
    assert rel(logits(model), expected("logits_ema_224")) < 1e-4
    # The raw set was not converted: asking for it is an error, not a silent EMA.
    with pytest.raises(ValueError, match="holds the EMA weights only"):
        load_for_inference(converted, use_ema=False)


def test_safetensors_output_loads_for_inference_with_its_record(registered, tmp_path, capsys):
    path = tmp_path / "fixture.safetensors"
    code, out, _ = run([PREFIX, "--model", VARIANT, "--output", path, "--raw"], capsys)
    assert code == 0 and os.listdir(tmp_path) == ["fixture.safetensors"]
    model, meta = load_for_inference(str(path))
    assert meta.weights == "raw" and meta.variant == VARIANT
    assert rel(logits(model), expected("logits_raw_224")) < 1e-4
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert '"weights": "raw"' in f.metadata()["moat.converted_from"]

    code, _, _ = run([PREFIX, "--model", VARIANT, "--output", tmp_path / "both.pth", "--safetensors"], capsys)
    assert code == 0 and {"both.pth", "both.safetensors"} <= set(os.listdir(tmp_path))


def test_main_pretrained_starts_from_the_converted_weights(converted, registered, tiny_cfg, tmp_path):
    # A linear probe on 3 new classes: the head is dropped and re-initialised, the frozen backbone
    # (BatchNorm statistics included) must still be the converted weights after an epoch.
    data = make_image_tree(str(tmp_path / "data"), train_per_class=4, val_per_class=1)
    cfg = tiny_cfg(
        MODEL={"NAME": VARIANT, "NUM_CLASSES": 3},
        TRAIN={"EPOCHS": 1, "WARMUP_EPOCHS": 0, "FREEZE_BACKBONE": True, "EMA": {"ENABLE": False}},
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
            converted,
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    run_dir = tmp_path / "out" / VARIANT / "default"
    log = (run_dir / "log_rank0.txt").read_text()
    assert f"loaded pretrained model weights from {converted}; dropped the head" in log
    new = torch.load(run_dir / "last.pth", weights_only=True)["model"]
    old = torch.load(converted, weights_only=True)["model"]
    assert new["head.fc.weight"].shape == (3, 96)
    for key, value in old.items():
        if not key.startswith("head.fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(new[key], value), key


def test_main_eval_resume_validates_the_converted_checkpoint(converted, registered, tiny_cfg, tmp_path):
    # A 10-class val folder of fixture-like images (224 px, the eval transform leaves them as they
    # are); --eval must report the accuracy the converted model has on them.
    images = _varied_images(20, seed=3, size=224)
    for split in ("train", "val"):
        for i, image in enumerate(images):
            folder = tmp_path / "data" / split / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    cfg = tiny_cfg(MODEL={"NAME": VARIANT, "NUM_CLASSES": 10}, DATA={"IMG_SIZE": 224, "CROP_PCT": 1.0})
    code = trainer.main(
        [
            "--cfg",
            cfg,
            "--data-path",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "out"),
            "--eval",
            "--resume",
            converted,
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    log = (tmp_path / "out" / VARIANT / "default" / "log_rank0.txt").read_text()
    found = re.findall(r"\* (model|ema) Acc@1 ([\d.]+) Acc@5 [\d.]+ loss [\d.]+ \((\d+) images", log)
    assert [(name, n) for name, _, n in found] == [("model", "20")]  # one weight set: the EMA, as 'model'
    model, meta = load_for_inference(converted)
    transform = build_transform(False, meta.config)
    with torch.no_grad():
        predicted = model(torch.stack([transform(Image.fromarray(im)) for im in images])).argmax(-1)
    want = 100.0 * float((predicted == torch.arange(20) % 10).float().mean())
    assert float(found[0][1]) == pytest.approx(want, abs=0.01)


# ----------------------------------------------------------------------------------- variants
def test_release_archive_is_unpacked_and_its_checkpoint_found(registered, tmp_path, capsys):
    archive = tmp_path / "release.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001"):
            tar.add(os.path.join(FIXTURE, name), arcname=f"moat_release/{name}")
    code, _, err = run([archive, "--model", VARIANT, "--output", tmp_path / "a.pth"], capsys)
    assert code == 0, err
    assert f"unpacking {archive}" in err
    obj = torch.load(tmp_path / "a.pth", weights_only=True)
    assert obj["converted_from"]["source"] == str(archive) and obj["converted_from"]["checkpoint"] == "model.ckpt"
    model = fixture_model()
    model.load_state_dict(obj["model"])
    assert rel(logits(model), expected("logits_ema_224")) < 1e-4


def test_stem_under_its_eager_name_and_blocks_without_the_moat_scope_convert_the_same(tensors, tmp_path):
    renamed = {}
    for name, value in tensors.items():
        if name.startswith("moat/stem/"):
            name = name[len("moat/stem/") :]  # Keras eager name of the stem's layers
        elif name.startswith("moat/block_00"):
            name = name[len("moat/") :]
        renamed[name] = value
    prefix = str(tmp_path / "renamed.ckpt")
    write_bundle(prefix, renamed)
    model = fixture_model()
    with BundleReader(prefix) as reader:
        state, report = convert.convert_weights(reader, model)
    assert report.renamed > 0 and report.leftover == []
    model.load_state_dict(state)
    assert rel(logits(model), expected("logits_ema_224")) < 1e-4


def test_file_without_ema_converts_the_raw_weights_unless_ema_is_demanded(registered, tensors, tmp_path, capsys):
    prefix = edited(tmp_path, tensors, drop=[EMA])
    code, _, err = run([prefix, "--model", VARIANT, "--output", tmp_path / "r.pth"], capsys)
    assert code == 0 and "no EMA copies" in err and "weights: raw" in err
    assert torch.load(tmp_path / "r.pth", weights_only=True)["converted_from"]["weights"] == "raw"
    code, _, err = run([prefix, "--model", VARIANT, "--output", tmp_path / "e.pth", "--ema"], capsys)
    assert code == 2
    assert error_line(err) == (
        "convert_deeplab2.py: error: variable missing from the checkpoint: "
        "moat/stem/conv_0/kernel/ExponentialMovingAverage (its raw value is there: --raw "
        "converts the raw weights) (and 134 more problem(s))"
    )


def test_file_without_a_head_converts_the_backbone_with_a_fresh_head(registered, tensors, tmp_path, capsys):
    prefix = edited(tmp_path, tensors, drop=["logits_head", "final_layer_norm"])
    code, _, err = run([prefix, "--model", VARIANT, "--output", tmp_path / "b.pth", "--num-classes", "5"], capsys)
    assert code == 0, err
    assert "no classification head (moat/logits_head)" in err
    obj = torch.load(tmp_path / "b.pth", weights_only=True)
    assert obj["converted_from"]["head"] == "fresh" and obj["model"]["head.fc.weight"].shape == (5, 96)
    assert obj["converted_from"]["ignored"] == ["global_step"]  # the head's Momentum slot went too
    model = fixture_model()
    with BundleReader(PREFIX) as reader:
        state, _ = convert.convert_weights(reader, model)
    model.load_state_dict(state)
    converted = MOAT(fixture_cfg(), num_classes=5)
    converted.load_state_dict(obj["model"])
    with torch.no_grad():
        torch.testing.assert_close(
            converted.eval().forward_features(inputs(224)), model.eval().forward_features(inputs(224))
        )


# ------------------------------------------------------------------------------------- errors
def _missing_variable(tmp_path, tensors):
    prefix = edited(tmp_path, tensors, drop=["moat/block_01_00/shortcut_conv/bias/ExponentialMovingAverage"])
    return [prefix, "--model", VARIANT], (
        "variable missing from the checkpoint: moat/block_01_00/shortcut_conv/bias/ExponentialMovingAverage"
    )


def _wrong_model(tmp_path, tensors):
    return [PREFIX, "--model", "tiny_moat_0"], (
        "moat/stem/conv_0/kernel/ExponentialMovingAverage: shape "
        "[3, 3, 3, 16] in the checkpoint, but tiny_moat_0 needs "
        "[3, 3, 3, 32] (wrong --model?)"
    )


def _truncated_shard(tmp_path, tensors):
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        shutil.copy(os.path.join(FIXTURE, name), tmp_path / name)
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    return [tmp_path / "model.ckpt", "--model", VARIANT], f"{data}: truncated: "


def _missing_index(tmp_path, tensors):
    shutil.copy(os.path.join(FIXTURE, "model.ckpt.data-00000-of-00001"), tmp_path)
    return [tmp_path / "model.ckpt", "--model", VARIANT], f"checkpoint index not found: {tmp_path / 'model.ckpt.index'}"


@pytest.mark.parametrize(
    "case",
    [_missing_variable, _wrong_model, _truncated_shard, _missing_index],
    ids=["missing-variable", "wrong-model", "truncated-shard", "missing-index"],
)
def test_errors_are_one_line_with_exit_code_2_naming_the_variable_or_file(case, registered, tensors, tmp_path, capsys):
    argv, message = case(tmp_path, tensors)
    code, out, err = run([*argv, "--output", tmp_path / "out.pth"], capsys)
    assert code == 2 and out == ""
    error = error_line(err)
    assert error.startswith("convert_deeplab2.py: error: ") and message in error
    assert not os.path.exists(tmp_path / "out.pth")


def test_leftover_entries_are_listed_but_optimizer_slots_and_global_step_are_not(registered, tensors, tmp_path, capsys):
    extra = {
        "moat/block_00_00/unexpected/kernel": np.zeros((1, 1, 2, 2), np.float32),
        "moat/stem/conv_0/kernel/Adam_1": np.zeros((3, 3, 3, 16), np.float32),
    }
    prefix = edited(tmp_path, tensors, **extra)
    code, _, err = run([prefix, "--model", VARIANT, "--output", tmp_path / "l.pth"], capsys)
    assert code == 0
    assert "leftover checkpoint entries (not used): 1\n  moat/block_00_00/unexpected/kernel\n" in err
    assert "Momentum" not in err and "global_step" not in err and "Adam_1" not in err
    record = torch.load(tmp_path / "l.pth", weights_only=True)["converted_from"]
    assert record["leftover"] == ["moat/block_00_00/unexpected/kernel"]
    assert sorted(record["ignored"]) == [
        "global_step",
        "moat/logits_head/kernel/Momentum",
        "moat/stem/conv_0/kernel/Adam_1",
    ]


def test_checkpoints_of_deeper_or_position_embedding_variants_do_not_convert_into_smaller_models(tensors, tmp_path):
    # Same widths, one more block (as moat_1 is moat_0 with more blocks): not a stray leftover.
    deeper = {n.replace("block_02_01", "block_02_02"): v for n, v in tensors.items() if "block_02_01" in n}
    with pytest.raises(
        convert.ConversionError,
        match=r"^moat/block_02_02/\S+: the checkpoint has a block "
        r"\(block_02_02\) that the model lacks \(wrong --model",
    ):
        convert.load_deeplab2(edited(tmp_path / "deeper", tensors, **deeper), fixture_model())
    # Position embeddings into a _no_pe model: the trained tables would be dropped silently.
    no_pe = MOAT(replace(fixture_cfg(), pos_embed=False), num_classes=10)
    with pytest.raises(
        convert.ConversionError,
        match=r"relative_position_embedding\S*: the checkpoint has "
        r"relative position embeddings and the model has none",
    ):
        convert.load_deeplab2(PREFIX, no_pe)


def test_unknown_model_and_missing_bn_statistics_are_one_line_errors(registered, tensors, tmp_path, capsys):
    code, _, err = run([PREFIX, "--model", "moat_9", "--output", tmp_path / "x.pth"], capsys)
    assert code == 2 and error_line(err).startswith("convert_deeplab2.py: error: unknown --model 'moat_9'")
    prefix = edited(tmp_path, tensors, drop=["moving_"])
    code, _, err = run([prefix, "--model", VARIANT, "--output", tmp_path / "x.pth"], capsys)
    assert code == 2
    assert (
        "no BatchNorm moving statistics (e.g. moat/stem/norm_0/moving_mean); re-estimate them with --calibrate-bn"
    ) in error_line(err)


# ------------------------------------------------------------------------------ BN calibration
def _smooth_field(rng, size: int) -> np.ndarray:
    """The fixture's image 0 kind: a bilinearly upsampled random colour grid."""
    grid = int(rng.integers(2, 9))
    g = rng.uniform(0, 255, (grid, grid, 3))
    t = np.linspace(0, grid - 1, size)
    i0 = np.clip(np.floor(t).astype(int), 0, grid - 2)
    f = (t - i0)[:, None]
    rows = g[i0] * (1 - f[..., None]) + g[i0 + 1] * f[..., None]
    return rows[:, i0] * (1 - f[None, :, :]) + rows[:, i0 + 1] * f[None, :, :]


def _varied_images(n: int, seed: int, size: int = 64) -> np.ndarray:
    """The fixture images' kinds with variation: resized crops of the fixture images, new smooth
    colour fields, and tinted uniform noise, each with noise of random strength; uint8 NHWC."""
    rng = np.random.default_rng(seed)
    originals = [
        Image.fromarray(im) for s in (224, 288) for im in np.load(os.path.join(FIXTURE, f"images_{s}_uint8.npy"))
    ]
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            src = originals[int(rng.integers(len(originals)))]
            side = int(rng.integers(src.width // 2, src.width + 1))
            x, y = (int(v) for v in rng.integers(0, src.width - side + 1, 2))
            im = np.asarray(src.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR), np.float64)
        elif kind == 1:
            im = _smooth_field(rng, size)
        else:
            im = rng.uniform(0, 256, (size, size, 3)) * rng.uniform(0.3, 1.0) + rng.uniform(0, 100, 3)
        im = im + rng.normal(0, rng.uniform(0, 30), im.shape)
        if rng.random() < 0.5:
            im = im[:, ::-1]
        out.append(np.clip(im, 0, 255).astype(np.uint8))
    return np.stack(out)


def _normalised(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((images.astype(np.float64) - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2).copy())


@pytest.mark.slow
def test_bn_calibration_recovers_a_release_without_moving_statistics(registered, tensors, tmp_path, capsys):
    # The fixture's own moving statistics were perturbed far from any data's (re-estimating them on
    # the very images they came from moves the logits by ~115%), so the intact release here is the
    # fixture's weights with statistics as a release has them: those of its training images. Its
    # "training set" is 600 varied images of the fixture's kinds; their batch statistics become
    # the moving statistics (as make_fixture.py made its own before perturbing them).
    size, count = 64, 600
    images = _varied_images(count, seed=1, size=size)
    model = fixture_model()
    with BundleReader(PREFIX) as reader:
        state, _ = convert.convert_weights(reader, model)
    model.load_state_dict(state)
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        model(_normalised(images))
    stats = {
        f"moat/{r.sources[0]}": model.state_dict()[r.target].numpy()
        for r in convert.deeplab2_rules(model)
        if not r.trainable
    }
    intact = edited(tmp_path / "intact", tensors, **stats)
    stripped = edited(tmp_path / "stripped", tensors, drop=["moving_"])

    # The labelled training folder: every image as a PNG in the folder of the class the intact
    # converted model predicts for it (the eval transform at 64 px, crop 1.0, is the identity).
    code, _, err = run(
        [intact, "--model", VARIANT, "--output", tmp_path / "intact.pth", "--img-size", size, "--crop-pct", "1.0"],
        capsys,
    )
    assert code == 0, err
    reference, meta = load_for_inference(str(tmp_path / "intact.pth"))
    transform = build_transform(False, meta.config)
    with torch.no_grad():
        labels = reference(torch.stack([transform(Image.fromarray(im)) for im in images])).argmax(-1).numpy()
    folder = tmp_path / "train"
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(folder / f"class_{label}", exist_ok=True)
        paths.append(str(folder / f"class_{label}" / f"{i:04d}.png"))
        Image.fromarray(image).save(paths[-1])
    counts = np.bincount(labels, minlength=10)
    assert np.sum(counts >= 30) >= 3, counts  # varied labels, not one class

    def agreement(model) -> float:
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        with torch.no_grad():
            return float((model.eval()(batch).argmax(-1).numpy() == labels).mean())

    assert agreement(reference) > 0.99  # the PNG files reproduce the labelled inputs

    # Without statistics (running mean 0, variance 1) the model mostly disagrees.
    blank = fixture_model()
    with BundleReader(stripped) as reader:
        state, report = convert.convert_weights(reader, blank, allow_missing_bn=True)
    assert report.bn_statistics == "missing"
    blank.load_state_dict(state)
    before = agreement(blank)

    code, _, err = run(
        [
            stripped,
            "--model",
            VARIANT,
            "--output",
            tmp_path / "calibrated.pth",
            "--img-size",
            size,
            "--crop-pct",
            "1.0",
            "--calibrate-bn",
            folder,
            "--batch-size",
            "64",
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert "BatchNorm moving statistics: not in the checkpoint" in err
    calibrated, calibrated_meta = load_for_inference(str(tmp_path / "calibrated.pth"))
    assert calibrated_meta.preprocessing == meta.preprocessing
    record = torch.load(tmp_path / "calibrated.pth", weights_only=True)["converted_from"]
    assert record["bn_statistics"] == f"calibrated over {count} images of {folder}"
    after = agreement(calibrated)
    print(
        f"agreement with the intact model: {before:.3f} without statistics, {after:.3f} calibrated "
        f"(labels per class {counts.tolist()})"
    )
    assert before < 0.5 and after > 0.97


# ---------------------------------------------------------------------------------------- docs
def test_readme_official_weights_table_is_generated_from_the_release_list():
    readme = open(os.path.join(REPO, "README.md")).read()
    start, end = "<!-- official-weights:start -->", "<!-- official-weights:end -->"
    assert readme.split(start)[1].split(end)[0].strip() == convert.release_table().strip()
    assert len(convert.RELEASES) == 18 and set(convert.RELEASES) == {n for n in list_variants()}
