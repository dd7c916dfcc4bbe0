"""Data formats (Swin-style zips with RAM caches, WebDataset shards) and DATA.CLASS_MAP.

Every dataset here is converted from conftest's tiny PNG tree with the repository's own tools, so
the zip and shard datasets index the same images in the same order as the folder dataset: the
tests hold them to the folder path bit for bit (batches, trained weights, resume after SIGKILL),
then damage the files to check that every kind of bad input is a one-line error naming the file
and member, or is skipped and counted under DATA.SKIP_BAD_IMAGES.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import zipfile

import numpy as np
import pytest
import torch
import webdataset as wds

import main as trainer
from checkpoints import Position
from config import get_config
from conftest import CLASSES
from data import ShardDataset, ZipImageDataset, build_dataset, build_loader, part_cache_resume_note
from data.samplers import RankSubsetSampler, rank_subset
from test_crash_safety import _start, _wait_for_log, assert_same_training_state
from tools.make_shards import index_only, make_shards
from tools.make_zip_dataset import make_zip_dataset
from utils.errors import ConfigError, DataError, UserError

RUN = ("tiny_moat_0", "default")
FORMATS = {  # name -> (DATA.FORMAT, extra config keys)
    "zip-no": ("zip", {"CACHE_MODE": "no"}),
    "zip-part": ("zip", {"CACHE_MODE": "part"}),
    "zip-full": ("zip", {"CACHE_MODE": "full"}),
    "shards": ("shards", {}),
}


def data_path_of(fmt: str, image_tree: str, zip_data: str, shard_data: str) -> str:
    return {"folder": image_tree, "zip": zip_data, "shards": shard_data}[fmt]


def make_config(data_path: str, data_format: str = "folder", **data_keys):
    """The test suite's tiny config (32 px, batch 4, 3 classes) on ``data_path``."""
    config = get_config().clone()
    config.defrost()
    config.merge_from_list(
        ["DATA.DATA_PATH", data_path, "DATA.FORMAT", data_format, "DATA.DATASET", "imagefolder"]
        + ["MODEL.NUM_CLASSES", 3, "DATA.IMG_SIZE", 32, "DATA.BATCH_SIZE", 4, "DATA.NUM_WORKERS", 0]
    )
    for key, value in data_keys.items():
        config.merge_from_list([f"DATA.{key}", value])
    config.freeze()
    return config


def batches(loader, epoch: int = 1):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def copy_of(src: str, tmp_path) -> str:
    dst = str(tmp_path / "data")
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------ same data, same batches
@pytest.mark.parametrize("name", FORMATS)
def test_every_format_gives_the_folder_batches_bit_for_bit(name, image_tree, zip_data, shard_data):
    fmt, keys = FORMATS[name]
    folder = build_loader(make_config(image_tree))
    other = build_loader(make_config(data_path_of(fmt, image_tree, zip_data, shard_data), fmt, **keys))
    assert other[0].classes == folder[0].classes == sorted(CLASSES)
    assert list(other[0].targets) == list(folder[0].targets)
    assert_same_batches(batches(other[2]), batches(folder[2]))  # train: augmented, epoch 1
    assert_same_batches(list(other[3]), list(folder[3]))  # val


def test_zip_cache_modes_hold_the_images_each_rank_needs(zip_data):
    train = os.path.join(zip_data, "train.zip"), os.path.join(zip_data, "train_map.txt")
    assert len(ZipImageDataset(*train, cache_mode="no").cached_indices) == 0
    assert len(ZipImageDataset(*train, cache_mode="full", rank=1, world_size=2).cached_indices) == 24
    parts = [ZipImageDataset(*train, cache_mode="part", rank=r, world_size=3).cached_indices for r in range(3)]
    assert [p.tolist() for p in parts] == [rank_subset(24, 3, r).tolist() for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(24))


@pytest.mark.parametrize("num_items, world_size", [(24, 2), (23, 2), (10, 3)])
def test_part_mode_ranks_sample_disjoint_fixed_subsets_in_equal_numbers_resumably(num_items, world_size):
    per_rank = -(-num_items // world_size)
    orders = []
    for rank in range(world_size):
        sampler = RankSubsetSampler(rank_subset(num_items, world_size, rank), per_rank, seed=5)
        sampler.set_epoch(3)
        full = list(sampler)
        assert len(full) == len(sampler) == per_rank
        assert {i for i, _ in full} == set(rank_subset(num_items, world_size, rank).tolist())
        sampler.set_start_index(2)
        assert list(sampler) == full[2:]
        again = RankSubsetSampler(rank_subset(num_items, world_size, rank), per_rank, seed=5)
        again.set_epoch(3)
        assert list(again) == full  # a function of (subset, seed, epoch) only
        again.set_epoch(4)
        assert list(again) != full
        orders.append({i for i, _ in full})
    assert set().union(*orders) == set(range(num_items))
    assert sum(len(o) for o in orders) == num_items  # disjoint


def test_resuming_zip_part_on_another_world_size_notes_it_and_refuses_mid_epoch(zip_data):
    config = make_config(zip_data, "zip", CACHE_MODE="part")
    mid_epoch = Position(3, False, 40, 15, 5)
    assert part_cache_resume_note(config, 2, 2, mid_epoch) is None  # same world size: exact
    with pytest.raises(UserError, match=r"inside epoch 3 with 2 process\(es\) and this run has 1.*finish it with 2"):
        part_cache_resume_note(config, 2, 1, mid_epoch)
    note = part_cache_resume_note(config, 2, 1, Position(3, True, 48, 18, 6))
    assert "written by 2 process(es), this run has 1" in note and "another part" in note
    assert part_cache_resume_note(make_config(zip_data, "zip", CACHE_MODE="full"), 2, 1, mid_epoch) is None


def test_swin_flat_val_map_takes_the_class_names_of_the_train_map(zip_data, tmp_path):
    root = copy_of(zip_data, tmp_path)
    rewrite_zip(root, "val", lambda name, data: [(name.replace("/", "_"), data)])  # Swin: val images flat
    rewrite_map(root, "val", lambda lines: [line.replace("/", "_") for line in lines])
    folder_val = build_loader(make_config(zip_data, "zip"))[1]
    train, val = build_loader(make_config(root, "zip"))[:2]
    assert val.classes == train.classes == sorted(CLASSES) and list(val.targets) == list(folder_val.targets)


def test_shards_read_by_webdataset_hold_the_same_samples_as_the_index(shard_data):
    index = ShardDataset(os.path.join(shard_data, "train.json"))
    streamed = list(wds.WebDataset(os.path.join(shard_data, "train-{000000..000004}.tar"), shardshuffle=False))
    assert len(streamed) == len(index) == 24
    for i, sample in enumerate(streamed):
        assert sample["png"] == index.encoded_bytes(i) and int(sample["cls"]) == index.targets[i]


def test_index_only_indexes_shards_made_elsewhere_like_make_shards(shard_data, tmp_path):
    folder = str(tmp_path / "s")
    os.makedirs(folder)
    for name in os.listdir(shard_data):
        if name.endswith(".tar"):
            shutil.copy(os.path.join(shard_data, name), folder)
    assert index_only(folder, ("train", "val")) == {"train": (5, 24), "val": (2, 9)}
    ours, made = ShardDataset(os.path.join(shard_data, "train.json")), ShardDataset(os.path.join(folder, "train.json"))
    assert made.classes == ["0", "1", "2"] and ours.classes == sorted(CLASSES)  # no names without the tree
    assert list(made.targets) == list(ours.targets)
    assert [made.encoded_bytes(i) for i in range(24)] == [ours.encoded_bytes(i) for i in range(24)]
    scanned = ShardDataset(sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("train-")))
    assert list(scanned.targets) == list(ours.targets)  # a pattern without an index: scanned at start-up


def test_make_shards_shuffle_seed_spreads_the_same_samples_over_the_shards(image_tree, shard_data, tmp_path):
    make_shards(image_tree, str(tmp_path), shard_size=5, splits=("train",), shuffle_seed=1)
    shuffled, ordered = ShardDataset(str(tmp_path / "train.json")), ShardDataset(os.path.join(shard_data, "train.json"))
    pairs = sorted((shuffled.encoded_bytes(i), shuffled.targets[i]) for i in range(24))
    assert pairs == sorted((ordered.encoded_bytes(i), ordered.targets[i]) for i in range(24))
    assert list(shuffled.targets) != list(ordered.targets)


def test_dataset_tools_never_overwrite_and_store_members_uncompressed(image_tree, zip_data, shard_data):
    with zipfile.ZipFile(os.path.join(zip_data, "train.zip")) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        assert zf.read("red/0.png") == open(os.path.join(image_tree, "train", "red", "0.png"), "rb").read()
    before = {n: os.path.getmtime(os.path.join(zip_data, n)) for n in os.listdir(zip_data)}
    with pytest.raises(Exception, match="exists; remove it"):
        make_zip_dataset(image_tree, zip_data)
    with pytest.raises(Exception, match="exists; remove it"):
        make_shards(image_tree, shard_data)
    assert {n: os.path.getmtime(os.path.join(zip_data, n)) for n in os.listdir(zip_data)} == before


# ------------------------------------------------------------------------------ config and flags
def test_zip_flag_cache_mode_and_class_map_set_their_config_keys(tiny_cfg, image_tree, tmp_path, capsys):
    args = trainer.get_args_parser().parse_args(
        ["--cfg", tiny_cfg(), "--zip", "--cache-mode", "full", "--class-map", "m.txt"]
    )
    config = get_config(args)
    assert (config.DATA.FORMAT, config.DATA.CACHE_MODE, config.DATA.CLASS_MAP) == ("zip", "full", "m.txt")
    with pytest.raises(SystemExit):  # --zip and --data-format exclude each other
        trainer.get_args_parser().parse_args(["--cfg", "x", "--zip", "--data-format", "shards"])
    capsys.readouterr()
    args = ["--cfg", tiny_cfg(), "--data-path", image_tree, "--cache-mode", "no", "--output", str(tmp_path)]
    code = trainer.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --cache-mode applies to zipped data (--zip), not DATA.FORMAT 'folder'"
    code = trainer.main(args[:-2] + ["--opts", "DATA.FORMAT", "tfrecord"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: invalid DATA.FORMAT='tfrecord': accepted: 'folder', 'zip', 'shards'"


# ------------------------------------------------------------------------------------ class maps
def write_map(tmp_path, names) -> str:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(names) + "\n")
    return str(path)


@pytest.mark.parametrize("fmt", ["folder", "zip", "shards"])
def test_class_map_subset_and_order_define_the_labels_in_every_format(fmt, image_tree, zip_data, shard_data, tmp_path):
    path = data_path_of(fmt, image_tree, zip_data, shard_data)
    folder = build_dataset(True, make_config(image_tree))
    names = ["red", "blue"]  # a subset, in another order than the folders' (blue, green, red)
    config = make_config(path, fmt, CLASS_MAP=write_map(tmp_path, names))
    config.defrost()
    config.MODEL.NUM_CLASSES = 2
    config.freeze()
    train, val = build_loader(config)[:2]
    assert train.classes == val.classes == names
    expected = [names.index(folder.classes[t]) for t in folder.targets if folder.classes[t] in names]
    assert list(train.targets) == expected and len(train) == 16 and len(val) == 6
    image, target = train[(0, 1)]
    assert image.shape == (3, 32, 32) and target == expected[0]


def test_class_map_lets_val_hold_a_subset_but_not_a_class_train_lacks(image_tree, tmp_path, caplog):
    root = copy_of(image_tree, tmp_path)
    shutil.rmtree(os.path.join(root, "val", "green"))  # an ImageNet-R-style val: only some classes
    config = make_config(root, CLASS_MAP=write_map(tmp_path, ["green", "red", "blue"]))
    train, val = build_loader(config)[:2]
    assert sorted(set(val.targets)) == [1, 2] and train.classes == val.classes == ["green", "red", "blue"]

    shutil.rmtree(os.path.join(root, "train", "blue"))
    with pytest.raises(DataError) as err:
        build_loader(config)
    assert "class 'blue'" in str(err.value) and os.path.join(root, "train") in str(err.value)

    shutil.rmtree(os.path.join(root, "val", "blue"))  # now absent from the data entirely: allowed
    with caplog.at_level(logging.WARNING, logger="data.class_map"):
        build_loader(config)
    assert "have no images in train or val (blue)" in caplog.text


def test_class_map_errors_name_the_file_and_key(image_tree, tmp_path):
    with pytest.raises(ConfigError, match="names 2 classes, but MODEL.NUM_CLASSES is 3"):
        build_dataset(True, make_config(image_tree, CLASS_MAP=write_map(tmp_path, ["red", "blue"])))
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=f"class map not found: {missing}"):
        build_dataset(True, make_config(image_tree, CLASS_MAP=missing))
    with pytest.raises(DataError, match=r"classes.txt:3: class 'red' repeats line 1"):
        build_dataset(True, make_config(image_tree, CLASS_MAP=write_map(tmp_path, ["red", "blue", "red"])))


# -------------------------------------------------------------------------------- bad input: zip
def rewrite_map(root: str, split: str, edit) -> str:
    path = os.path.join(root, f"{split}_map.txt")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(edit(lines)) + "\n")
    return path


def rewrite_zip(root: str, split: str, keep) -> str:
    """Rewrite <split>.zip with the members ``keep(name)`` accepts (and any extra ones it returns)."""
    path = os.path.join(root, f"{split}.zip")
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            for new_name, new_data in keep(name, data):
                zf.writestr(new_name, new_data)
    return path


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_zip_map_line_naming_a_missing_member_is_an_error_or_skipped_and_counted(zip_data, tmp_path, caplog):
    root = copy_of(zip_data, tmp_path)
    rewrite_zip(root, "train", lambda name, data: [] if name == "green/3.png" else [(name, data)])
    zip_path, map_path = os.path.join(root, "train.zip"), os.path.join(root, "train_map.txt")
    with pytest.raises(DataError) as err:
        build_dataset(True, make_config(root, "zip"))
    assert one_line(err).startswith(f"{map_path}:12: 'green/3.png' is not in {zip_path}")
    with caplog.at_level(logging.WARNING, logger="data.zip_dataset"):
        dataset = build_dataset(True, make_config(root, "zip", SKIP_BAD_IMAGES=True))
    assert len(dataset) == 23 and dataset.num_dropped == 1 and "skipped 1 line(s)" in caplog.text


def test_zip_member_without_a_map_line_is_counted_in_a_warning_and_not_used(zip_data, tmp_path, caplog):
    root = copy_of(zip_data, tmp_path)
    rewrite_zip(
        root, "train", lambda name, data: [(name, data)] + ([("extra/x.png", data)] if name == "red/0.png" else [])
    )
    with caplog.at_level(logging.WARNING, logger="data.zip_dataset"):
        dataset = build_dataset(True, make_config(root, "zip"))
    assert len(dataset) == 24
    assert (
        f"{os.path.join(root, 'train.zip')}: 1 member(s) have no line in" in caplog.text
        and "extra/x.png" in caplog.text
    )


@pytest.mark.parametrize(
    "line, needle",
    [
        ("red/0.png 2", "expected '<path inside the zip>\\t<class index>'"),
        ("red/0.png\tseven", "got 'red/0.png\\tseven'"),
    ],
)
def test_zip_malformed_map_line_names_file_and_line(zip_data, tmp_path, line, needle):
    root = copy_of(zip_data, tmp_path)
    map_path = rewrite_map(root, "train", lambda lines: lines[:4] + [line] + lines[4:])
    with pytest.raises(DataError) as err:
        build_dataset(True, make_config(root, "zip"))
    assert one_line(err).startswith(f"{map_path}:5: ") and needle in str(err.value)


def test_zip_label_out_of_range_is_an_error_or_skipped(zip_data, tmp_path):
    root = copy_of(zip_data, tmp_path)
    map_path = rewrite_map(root, "val", lambda lines: [lines[0].split("\t")[0] + "\t7"] + lines[1:])
    with pytest.raises(DataError) as err:
        build_loader(make_config(root, "zip"))
    assert one_line(err).startswith(f"{map_path}:1: class index 7 outside 0..2")
    val = build_loader(make_config(root, "zip", SKIP_BAD_IMAGES=True))[1]
    assert len(val) == 8 and val.num_dropped == 1


def test_truncated_zip_is_a_one_line_error_naming_it(zip_data, tmp_path, tiny_cfg, capsys):
    root = copy_of(zip_data, tmp_path)
    path = os.path.join(root, "train.zip")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    code = trainer.main(["--cfg", tiny_cfg(), "--data-path", root, "--zip", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith(f"error: {path}: not a readable zip file (BadZipFile")
    assert not os.path.exists(os.path.join(tmp_path, "out", *RUN, "last.pth"))


@pytest.mark.parametrize("cache_mode", ["no", "part"])
def test_zip_damaged_member_is_an_unreadable_image_naming_zip_and_member(zip_data, tmp_path, cache_mode):
    root = copy_of(zip_data, tmp_path)
    path = rewrite_zip(root, "train", lambda name, data: [(name, data[:60] if name == "blue/2.png" else data)])
    config = make_config(root, "zip", CACHE_MODE=cache_mode)
    with pytest.raises(DataError) as err:
        for _ in build_loader(config)[2]:
            pass
    assert one_line(err).startswith(f"unreadable image {path}:blue/2.png (")
    train, _, loader, _, _ = build_loader(make_config(root, "zip", CACHE_MODE=cache_mode, SKIP_BAD_IMAGES=True))
    assert sum(len(y) for _, y in loader) == 24
    assert train.num_skipped == 1 and train.skipped_files == [f"{path}:blue/2.png"]


# ----------------------------------------------------------------------------- bad input: shards
def shard_copy(shard_data, tmp_path, index: bool = True) -> str:
    root = copy_of(shard_data, tmp_path)
    if not index:
        for split in ("train", "val"):
            os.remove(os.path.join(root, f"{split}.json"))
    return root


def truncate_file(path: str, keep: int) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep])


@pytest.mark.parametrize("index", [True, False])
def test_truncated_shard_is_an_error_naming_shard_and_member_or_skipped_and_counted(shard_data, tmp_path, index):
    root = shard_copy(shard_data, tmp_path, index)
    shard = os.path.join(root, "train-000002.tar")
    offsets = json.load(open(os.path.join(shard_data, "train.json")))["shardlist"][2]["offsets"]
    truncate_file(shard, offsets[3] + 100)  # samples 3 and 4 of this shard (indices 13, 14) are cut off
    with pytest.raises(DataError) as err:
        build_dataset(True, make_config(root, "shards"))
    assert one_line(err).startswith(f"{shard}:00000013_") and "truncated" in str(err.value)
    dataset = build_dataset(True, make_config(root, "shards", SKIP_BAD_IMAGES=True))
    # The index knows both cut samples; a scan stops at the cut one (what follows is gone).
    assert len(dataset) == 22 and dataset.num_dropped == (2 if index else 1)


def test_shard_changed_after_indexing_is_an_error(shard_data, tmp_path):
    root = shard_copy(shard_data, tmp_path)
    with open(os.path.join(root, "val-000001.tar"), "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(DataError, match="changed after it was indexed; rebuild the index"):
        build_dataset(False, make_config(root, "shards", SKIP_BAD_IMAGES=True))


def rewrite_shard(path: str, edit) -> None:
    """Rewrite a shard's samples through ``edit(sample) -> sample or None`` (webdataset in and out)."""
    samples = [dict(s) for s in wds.WebDataset(path, shardshuffle=False)]
    with wds.TarWriter(path) as sink:
        for sample in samples:
            sample = edit(sample)
            if sample is not None:
                sink.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: {k: v for k, v in s.items() if k != "cls"}, "no label (.cls member)"),
        (lambda s: {**s, "cls": b"9"}, "label 9 outside 0..2"),
        (lambda s: {**s, "cls": b"dog"}, "label b'dog' is not a class index"),
    ],
    ids=["no-label", "label-out-of-range", "label-not-a-number"],
)
def test_bad_shard_labels_are_errors_naming_shard_and_member_or_skipped(shard_data, tmp_path, edit, needle):
    root = shard_copy(shard_data, tmp_path, index=False)  # shards made elsewhere: scanned at start-up
    shard = os.path.join(root, "train-000001.tar")
    rewrite_shard(shard, lambda s: edit(s) if s["__key__"].startswith("00000006") else s)
    with pytest.raises(DataError) as err:
        build_dataset(True, make_config(root, "shards"))
    assert one_line(err).startswith(f"{shard}:00000006_") and needle in str(err.value)
    dataset = build_dataset(True, make_config(root, "shards", SKIP_BAD_IMAGES=True))
    assert len(dataset) == 23 and dataset.num_dropped == 1


def test_corrupt_image_in_a_shard_is_an_unreadable_image_naming_shard_and_member(shard_data, tmp_path):
    root = shard_copy(shard_data, tmp_path)
    shard = os.path.join(root, "train-000000.tar")
    offset = json.load(open(os.path.join(root, "train.json")))["shardlist"][0]["offsets"][1]
    with open(shard, "r+b") as f:
        f.seek(offset + 20)
        f.write(b"\xff" * 200)
    with pytest.raises(DataError) as err:
        for _ in build_loader(make_config(root, "shards"))[2]:
            pass
    assert one_line(err).startswith(f"unreadable image {shard}:00000001_1.png (")


def test_empty_shard_list_is_an_error_naming_the_pattern_or_index(shard_data, tmp_path, tiny_cfg, capsys):
    root = shard_copy(shard_data, tmp_path)
    with pytest.raises(DataError, match=f"no shard matches {os.path.join(root, 'nothing-')}"):
        build_dataset(True, make_config(root, "shards", TRAIN_SHARDS="nothing-{000000..000003}.tar"))
    index = os.path.join(root, "train.json")
    json.dump({"wids_version": 1, "shardlist": []}, open(index, "w"))
    code = trainer.main(
        ["--cfg", tiny_cfg(), "--data-path", root, "--data-format", "shards", "--output", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {index}: empty shardlist (no shard)"


# ----------------------------------------------------------------------- end to end through main.py
def train_args(tiny_cfg, data_path: str, fmt: str, output, **data_keys):
    cfg = tiny_cfg(DATA={"FORMAT": fmt, **data_keys})
    return ["--cfg", cfg, "--data-path", data_path, "--output", str(output)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zip-part", "zip-no", "shards"])
def test_each_format_trains_two_epochs_to_the_folder_runs_weights_and_accuracy(
    name, reference_run, image_tree, zip_data, shard_data, tiny_cfg, tmp_path
):
    fmt, keys = FORMATS[name]
    args = train_args(tiny_cfg, data_path_of(fmt, image_tree, zip_data, shard_data), fmt, tmp_path, **keys)
    assert trainer.main(args) == 0
    run_dir = os.path.join(tmp_path, *RUN)
    assert (
        open(os.path.join(run_dir, "summary.csv")).read().splitlines()[1].split(",")[4:7]
        == open(os.path.join(reference_run, "summary.csv")).read().splitlines()[1].split(",")[4:7]
    )  # epoch 0: val loss, top-1, top-5
    assert_same_training_state(os.path.join(run_dir, "last.pth"), os.path.join(reference_run, "last.pth"))
    saved = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert saved["class_names"] == sorted(CLASSES) and saved["config"]["DATA"]["FORMAT"] == fmt


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zip-part", "shards"])
def test_sigkill_after_an_epoch_then_auto_resume_is_bit_identical_in_each_format(
    name, reference_run, image_tree, zip_data, shard_data, tiny_cfg, run_cli, tmp_path
):
    fmt, keys = FORMATS[name]
    args = train_args(tiny_cfg, data_path_of(fmt, image_tree, zip_data, shard_data), fmt, tmp_path, **keys)
    run_dir = os.path.join(tmp_path, *RUN)
    proc = _start(args)
    _wait_for_log(proc, os.path.join(run_dir, "log_rank0.txt"), "(epoch 0, batch 6, step 6)")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "auto-resuming from" in open(os.path.join(run_dir, "log_rank0.txt")).read()
    assert_same_training_state(os.path.join(run_dir, "last.pth"), os.path.join(reference_run, "last.pth"))


@pytest.mark.slow
def test_torchrun_two_processes_on_shards_equal_the_folder_run(ddp_reference, shard_data, run_cli, tmp_path):
    _, args, reference_dir = ddp_reference
    args = [a if a != args[3] else shard_data for a in args] + ["--data-format", "shards", "--output", tmp_path]
    proc = run_cli(args, launcher=["--nproc_per_node=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(os.path.join(tmp_path, *RUN, "last.pth"), weights_only=True)
    b = torch.load(os.path.join(reference_dir, "last.pth"), weights_only=True)
    assert a["step"] == b["step"] == 4
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.mark.slow
def test_torchrun_two_processes_on_zip_part_cache_train_each_rank_on_its_own_part(
    ddp_reference, zip_data, run_cli, tmp_path
):
    cfg, args, _ = ddp_reference
    args = [a if a != args[3] else zip_data for a in args]
    args += ["--zip", "--cache-mode", "part", "--output", tmp_path]
    proc = run_cli(args, launcher=["--nproc_per_node=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = os.path.join(tmp_path, *RUN)
    for rank, val_part in ((0, 5), (1, 4)):  # val: 9 images, rank r caches r, r + 2, ...
        log = open(os.path.join(run_dir, f"log_rank{rank}.txt")).read()
        assert "train.zip: caching 12 of 24 images" in log and f"val.zip: caching {val_part} of 9 images" in log
    saved = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert saved["step"] == 4 and saved["world_size"] == 2
