"""tools/predict.py: top-k from a trainer checkpoint equals eval transform + model, CSV output,
EMA choice, and one-line errors (exit code 2) that name the problem."""

import csv
import os
import shutil

import pytest
import torch

from inference_helpers import CLASS_NAMES, edited_checkpoint, make_checkpoint, make_images, reference_probs
from tools import predict


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    checkpoint = make_checkpoint(str(root / "ckpt.pth"))
    images = make_images(str(root / "images" / "nested"))
    return checkpoint, str(root / "images"), images


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_top_k_equals_eval_transform_plus_model_and_csv_is_written(setup, tmp_path, capsys):
    checkpoint, folder, images = setup
    out = str(tmp_path / "preds.csv")
    # Two workers and a batch of 2 (5 images -> a ragged last batch) exercise the loader path.
    rc = predict.main([checkpoint, folder, "--topk", "2", "--batch-size", "2", "--num-workers", "2", "--csv", out])
    assert rc == 0
    want = reference_probs(checkpoint, images, "model_ema")  # EMA is the default
    rows = read_csv(out)
    assert [r["path"] for r in rows] == images  # recursive search, sorted
    stdout = capsys.readouterr().out.splitlines()
    assert len(stdout) == len(images)
    for row, probs, line in zip(rows, want, stdout):
        top = probs.topk(2)
        assert row["top1_class"] == CLASS_NAMES[top.indices[0]]
        assert row["top2_class"] == CLASS_NAMES[top.indices[1]]
        assert float(row["top1_prob"]) == pytest.approx(top.values[0].item(), abs=1e-5)
        assert line.startswith(f"{row['path']}: {row['top1_class']} (")


def test_no_ema_predicts_with_the_raw_weights(setup, tmp_path):
    checkpoint, _, images = setup
    out = str(tmp_path / "raw.csv")
    assert (
        predict.main(
            [checkpoint, *images[:2], "--no-ema", "--num-workers", "0", "--topk", "3", "--csv", out, "--quiet"]
        )
        == 0
    )
    raw, ema = reference_probs(checkpoint, images[:2], "model"), reference_probs(checkpoint, images[:2])
    assert not torch.allclose(raw, ema, atol=1e-4)  # the two weight sets really differ
    for row, probs in zip(read_csv(out), raw):
        got = {row[f"top{k}_class"]: float(row[f"top{k}_prob"]) for k in (1, 2, 3)}
        assert got == pytest.approx({c: p.item() for c, p in zip(CLASS_NAMES, probs)}, abs=1e-5)


def test_ema_requested_but_absent_is_a_one_line_error(setup, tmp_path, capsys):
    checkpoint, _, images = setup
    no_ema = edited_checkpoint(checkpoint, str(tmp_path / "no_ema.pth"), drop=["model_ema"])
    assert predict.main([no_ema, images[0], "--ema"]) == 2
    assert "model_ema" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_input", "input not found"),
        ("missing_checkpoint", "checkpoint not found"),
        ("unreadable_image", "cannot read image"),
        ("wrong_variant", "wrong variant"),
        ("class_count_mismatch", "class-count mismatch"),
        ("empty_folder", "no images"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(setup, tmp_path, capsys, case, expected):
    checkpoint, _, images = setup
    args = [checkpoint, images[0]]
    named = None
    if case == "missing_input":
        named = str(tmp_path / "nope.png")
        args = [checkpoint, named]
    elif case == "missing_checkpoint":
        named = str(tmp_path / "nope.pth")
        args = [named, images[0]]
    elif case == "unreadable_image":
        folder = tmp_path / "imgs"
        folder.mkdir()
        shutil.copy(images[0], folder / "a.png")
        named = str(folder / "b.png")
        with open(named, "wb") as f:
            f.write(b"not a png")
        args = [checkpoint, str(folder), "--num-workers", "1"]  # error travels from a worker
    elif case == "wrong_variant":
        args += ["--variant", "moat_0"]
    elif case == "class_count_mismatch":
        named = edited_checkpoint(checkpoint, str(tmp_path / "four.pth"), class_names=list("abcd"))
        args = [named, images[0]]
    elif case == "empty_folder":
        named = str(tmp_path / "empty")
        os.makedirs(named)
        args = [checkpoint, named]
    assert predict.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("predict.py: error:")
    assert expected in err
    if named:
        assert named in err
