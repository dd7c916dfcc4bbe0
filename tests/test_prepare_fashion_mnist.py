"""tools/prepare_fashion_mnist.py: idx files -> balanced ImageFolder tree, on Debian's real files
(when installed) and on synthetic idx files written here, plus its errors."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from config import get_config
from data import build_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "prepare_fashion_mnist.py")
_spec = importlib.util.spec_from_file_location("prepare_fashion_mnist", TOOL)
pfm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = pfm  # so its process pool can pickle the worker function
_spec.loader.exec_module(pfm)


def write_idx_gz(path, array):
    """Write a uint8 array in idx format, gzipped (what the original dataset ships)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture
def synthetic_src(tmp_path):
    """idx.gz files with 4 train / 2 test images per class, labels interleaved, random pixels."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    arrays = {}
    for split, per_class in (("train", 4), ("val", 2)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images_name, labels_name = pfm.SPLIT_FILES[split]
        write_idx_gz(src / f"{images_name}.gz", images)
        write_idx_gz(src / f"{labels_name}.gz", labels)
        arrays[split] = images, labels
    return str(src), arrays


def read_tree(out, split):
    """{class dir: sorted file names} of one split."""
    root = os.path.join(out, split)
    return {c: sorted(os.listdir(os.path.join(root, c))) for c in sorted(os.listdir(root))}


def test_synthetic_idx_files_become_an_imagefolder_tree_with_exact_pixels(synthetic_src, tmp_path):
    src, arrays = synthetic_src
    out = str(tmp_path / "out")
    manifest = pfm.prepare(out, src=src, per_class_train=3, jobs=1)
    assert manifest["complete"]
    for split, per_class in (("train", 3), ("val", 2)):
        tree = read_tree(out, split)
        assert sorted(tree) == sorted(pfm.CLASS_DIRS) and "T-shirt_top" in tree
        images, labels = arrays[split]
        for c, name in enumerate(pfm.CLASS_DIRS):
            expected = np.flatnonzero(labels == c)[:per_class]  # first N of the class
            assert tree[name] == [f"{i:05d}.png" for i in expected]
            for i in expected:
                pixels = np.array(Image.open(os.path.join(out, split, name, f"{i:05d}.png")))
                assert np.array_equal(pixels, images[i])


def test_second_run_skips_a_complete_tree_and_rebuilds_on_other_counts(synthetic_src, tmp_path):
    src, _ = synthetic_src
    out = str(tmp_path / "out")
    pfm.prepare(out, src=src, per_class_train=2, per_class_val=1, jobs=1)
    marker = os.path.join(out, "train", "Bag", "marker.txt")
    open(marker, "w").close()
    pfm.prepare(out, src=src, per_class_train=2, per_class_val=1, jobs=1)
    assert os.path.exists(marker)  # untouched: nothing was rewritten
    os.remove(os.path.join(out, "val", "Bag", os.listdir(os.path.join(out, "val", "Bag"))[0]))
    manifest = pfm.prepare(out, src=src, per_class_train=2, per_class_val=1, jobs=1)
    assert manifest["counts"]["val"]["Bag"] == 1 and not os.path.exists(marker)  # repaired
    manifest = pfm.prepare(out, src=src, per_class_train=4, jobs=2)
    assert set(manifest["counts"]["train"].values()) == {4}
    assert set(manifest["counts"]["val"].values()) == {2}


def test_refuses_to_overwrite_folders_it_did_not_write(synthetic_src, tmp_path):
    src, _ = synthetic_src
    out = tmp_path / "out"
    (out / "train" / "mine").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by this tool"):
        pfm.prepare(str(out), src=src, jobs=1)
    assert (out / "train" / "mine").is_dir()


def test_truncated_idx_file_is_reported(synthetic_src, tmp_path):
    src, _ = synthetic_src
    path = os.path.join(src, "t10k-images-idx3-ubyte.gz")
    with gzip.open(path, "rb") as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        pfm.prepare(str(tmp_path / "out"), src=src, jobs=1)


def test_missing_source_exits_saying_how_to_get_the_files(tmp_path):
    result = subprocess.run(
        [sys.executable, TOOL, "--src", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr and "--download" in result.stderr
    assert str(tmp_path / "none") in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.skipif(
    pfm.find_sources(pfm.DEFAULT_SRC) is None, reason="Debian package dataset-fashion-mnist is not installed"
)
def test_debian_files_give_a_balanced_subset_the_data_pipeline_loads(tmp_path):
    out = str(tmp_path / "fm")
    result = subprocess.run(
        [sys.executable, TOOL, "--out", out, "--per-class-train", "5", "--per-class-val", "2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "50 train / 20 val images, 10 classes" in result.stdout
    labels = pfm.read_idx(os.path.join(pfm.DEFAULT_SRC, "train-labels-idx1-ubyte.gz"))
    assert len(labels) == 60000 and np.bincount(labels).tolist() == [6000] * 10
    first_boot = int(np.flatnonzero(labels == 9)[0])
    assert read_tree(out, "train")["Ankle_boot"][0] == f"{first_boot:05d}.png"

    config = get_config().clone()
    config.defrost()
    config.merge_from_list(
        ["DATA.DATA_PATH", out, "DATA.DATASET", "imagefolder", "MODEL.NUM_CLASSES", 10, "DATA.IMG_SIZE", 32]
    )
    config.freeze()
    dataset = build_dataset(False, config)
    assert len(dataset) == 20 and dataset.classes[0] == "Ankle_boot"
    image, target = dataset[0]
    assert image.shape == (3, 32, 32) and target == 0


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_is_drawn_only_on_a_terminal(tty, synthetic_src, monkeypatch, tmp_path):
    stderr = io.StringIO()
    monkeypatch.setattr(stderr, "isatty", lambda: tty)
    monkeypatch.setattr(sys, "stderr", stderr)
    pfm.prepare(str(tmp_path / "out"), synthetic_src[0], jobs=1)
    assert ("writing PNGs" in stderr.getvalue()) == tty
