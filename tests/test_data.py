"""The data pipeline: transforms, one-line data errors, bad-image skipping, resumable seeded
sampling, exact distributed eval sharding and Mixup wiring (tiny PNG trees in tmp_path)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from config import get_config
from data import DataError, ResumableSampler, ShardedEvalSampler, build_dataset, build_loader

CLASSES = ["cat", "dog", "owl"]


def make_tree(root, classes=CLASSES, per_class=4, splits=("train", "val"), size=(28, 28)):
    """A class-folder tree of random grayscale PNGs; returns ``root`` as a str."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size, dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)


def make_config(data_path="", **opts):
    """Frozen default config for a tiny imagefolder run, with ``opts`` as KEY=value overrides."""
    config = get_config().clone()
    config.defrost()
    config.merge_from_list(
        [
            "DATA.DATA_PATH",
            data_path,
            "DATA.DATASET",
            "imagefolder",
            "MODEL.NUM_CLASSES",
            len(CLASSES),
            "DATA.IMG_SIZE",
            32,
            "DATA.BATCH_SIZE",
            4,
            "DATA.NUM_WORKERS",
            0,
        ]
    )
    for key, value in opts.items():
        config.merge_from_list([key.replace("__", "."), value])
    config.freeze()
    return config


def truncate(path, keep=60):
    with open(path, "rb") as f:
        head = f.read(keep)
    with open(path, "wb") as f:
        f.write(head)


# ----------------------------------------------------------------------------- data errors


def test_class_count_mismatch_names_path_count_and_config_key(tmp_path):
    root = make_tree(tmp_path)
    with pytest.raises(DataError) as err:
        build_dataset(True, make_config(root, MODEL__NUM_CLASSES=10))
    msg = str(err.value)
    assert os.path.join(root, "train") in msg and "found 3" in msg and "MODEL.NUM_CLASSES" in msg
    assert "\n" not in msg


def test_imagenet_dataset_requires_1000_class_folders(tmp_path):
    root = make_tree(tmp_path)
    with pytest.raises(DataError, match="DATA.DATASET 'imagenet' expects 1000"):
        build_dataset(True, make_config(root, DATA__DATASET="imagenet"))


def test_train_val_class_mismatch_names_both_paths_and_first_differing_class(tmp_path):
    root = make_tree(tmp_path, splits=("train",))
    make_tree(tmp_path, classes=["cat", "dog", "pig"], splits=("val",))
    with pytest.raises(DataError) as err:
        build_loader(make_config(root))
    msg = str(err.value)
    assert os.path.join(root, "train") in msg and os.path.join(root, "val") in msg
    assert "'owl'" in msg and "\n" not in msg


def test_missing_data_path_names_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"data path not found: {missing}"):
        build_loader(make_config(missing))
    with pytest.raises(DataError, match="DATA.DATA_PATH"):
        build_loader(make_config(""))


def test_missing_split_folder_names_the_folder(tmp_path):
    root = make_tree(tmp_path, splits=("train",))
    with pytest.raises(DataError, match=f"split folder not found: {os.path.join(root, 'val')}"):
        build_loader(make_config(root))


def test_empty_class_folder_names_the_folder(tmp_path):
    root = make_tree(tmp_path)
    for f in os.listdir(os.path.join(root, "val", "dog")):
        os.remove(os.path.join(root, "val", "dog", f))
    with pytest.raises(DataError, match=f"empty class folder.*{os.path.join(root, 'val', 'dog')}$"):
        build_loader(make_config(root))


def test_too_few_images_for_one_batch_is_an_error(tmp_path):
    root = make_tree(tmp_path, per_class=1)
    with pytest.raises(DataError, match="fewer than DATA.BATCH_SIZE=4"):
        build_loader(make_config(root))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_error_names_the_file_also_from_loader_workers(tmp_path, num_workers):
    root = make_tree(tmp_path)
    bad = os.path.join(root, "train", "dog", "2.png")
    truncate(bad)
    _, _, loader, _, _ = build_loader(make_config(root, DATA__NUM_WORKERS=num_workers))
    with pytest.raises(DataError) as err:
        for _ in loader:
            pass
    assert str(err.value).startswith(f"unreadable image {bad} (")
    assert "\n" not in str(err.value) and "DATA.SKIP_BAD_IMAGES" in str(err.value)


def test_skip_bad_images_substitutes_next_sample_and_logs_each_file_once(tmp_path, caplog):
    root = make_tree(tmp_path)
    bad = [os.path.join(root, "train", "cat", "1.png"), os.path.join(root, "train", "owl", "3.png")]
    for path in bad:
        truncate(path)
    with open(bad[1], "wb") as f:
        f.write(b"not an image at all")
    dataset_train, _, loader, _, _ = build_loader(make_config(root, DATA__SKIP_BAD_IMAGES=True))
    index = [p for p, _ in dataset_train.samples].index(bad[0])
    substitute, target = dataset_train[(index, 123)]
    assert torch.equal(substitute, dataset_train[(index + 1, 123)][0]) and target == 0
    with caplog.at_level(logging.WARNING, logger="data.datasets"):
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            assert sum(len(y) for _, y in loader) == len(loader) * 4
    assert dataset_train.num_skipped == 2 and sorted(dataset_train.skipped_files) == sorted(bad)
    logged = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert sorted(m.split()[3] for m in logged) == sorted(bad)


def test_skip_bad_images_counts_files_skipped_inside_loader_workers(tmp_path):
    root = make_tree(tmp_path)
    truncate(os.path.join(root, "train", "dog", "0.png"))
    dataset_train, _, loader, _, _ = build_loader(make_config(root, DATA__SKIP_BAD_IMAGES=True, DATA__NUM_WORKERS=1))
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for _ in loader:
            pass
    assert dataset_train.num_skipped == 1


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("world_size", [1, 2])
def test_train_order_is_a_function_of_seed_and_epoch_for_every_rank(world_size):
    data = range(23)

    def order(seed, epoch, rank):
        sampler = ResumableSampler(data, num_replicas=world_size, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    for rank in range(world_size):
        assert order(0, 3, rank) == order(0, 3, rank)
        assert order(0, 3, rank) != order(0, 4, rank) != order(1, 3, rank)
    ranks = [[i for i, _ in order(0, 3, r)] for r in range(world_size)]
    assert set().union(*ranks) == set(data)  # every sample seen (DistributedSampler pads)
    seeds = [s for r in range(world_size) for _, s in order(0, 3, r)]
    assert len(set(seeds)) == len(set(i for r in ranks for i in r))  # one seed per sample


@pytest.mark.parametrize("world_size", [1, 2])
def test_set_start_index_continues_with_the_tail_of_the_full_order(world_size):
    for rank in range(world_size):
        sampler = ResumableSampler(range(40), num_replicas=world_size, rank=rank, seed=7)
        sampler.set_epoch(2)
        full = list(sampler)
        sampler.set_start_index(8)
        assert list(sampler) == full[8:] and len(sampler) == len(full)
        sampler.set_epoch(3)  # a new epoch starts from its beginning again
        assert len(list(sampler)) == len(full)
        with pytest.raises(ValueError):
            sampler.set_start_index(len(full) + 1)


@pytest.mark.parametrize("num_items, world_size", [(10, 2), (11, 2), (11, 3), (2, 3)])
def test_eval_sampler_ranks_cover_the_exact_dataset_without_duplicates(num_items, world_size):
    parts = [list(ShardedEvalSampler(range(num_items), world_size, r)) for r in range(world_size)]
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(num_items))
    assert [len(p) for p in parts] == [
        len(ShardedEvalSampler(range(num_items), world_size, r)) for r in range(world_size)
    ]


# ----------------------------------------------------------------------------- loaders


def _batches(loader, epoch, start_index=0):
    loader.sampler.set_epoch(epoch)
    loader.sampler.set_start_index(start_index)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_resumed_epoch_reproduces_the_remaining_augmented_batches_for_any_worker_count(tmp_path):
    root = make_tree(tmp_path, per_class=8)
    config = make_config(root, AUG__AUTO_AUGMENT="rand-m9-mstd0.5-inc1", AUG__REPROB=0.5, DATA__INTERPOLATION="random")
    _, _, loader0, _, _ = build_loader(config)
    _, _, loader1, _, _ = build_loader(
        make_config(
            root,
            DATA__NUM_WORKERS=1,
            **{"AUG__AUTO_AUGMENT": "rand-m9-mstd0.5-inc1", "AUG__REPROB": 0.5, "DATA__INTERPOLATION": "random"},
        )
    )
    rng_before = torch.get_rng_state()
    full = _batches(loader0, epoch=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # loading leaves the caller's RNG alone
    resumed = _batches(loader1, epoch=1, start_index=2 * 4)
    assert len(full) == 6 and len(resumed) == 4
    for (x, y), (xr, yr) in zip(full[2:], resumed):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    other_epoch = _batches(loader0, epoch=2)
    assert not torch.equal(full[0][0], other_epoch[0][0])


def test_val_loader_keeps_order_and_every_sample(tmp_path):
    root = make_tree(tmp_path, per_class=3)
    config = make_config(root)
    _, dataset_val, _, loader_val, _ = build_loader(config)
    targets = torch.cat([y for _, y in loader_val]).tolist()
    assert targets == [t for _, t in dataset_val.samples] and len(targets) == 9
    assert config.DATA.DATA_PATH == root and config.is_frozen()


# ----------------------------------------------------------------------------- mixup


def test_mixup_is_off_when_mixup_and_cutmix_are_off(tmp_path):
    root = make_tree(tmp_path)
    assert build_loader(make_config(root, AUG__MIXUP=0.0, AUG__CUTMIX=0.0))[4] is None


def test_mixup_gives_label_smoothed_soft_targets(tmp_path):
    root = make_tree(tmp_path)
    mixup_fn = build_loader(make_config(root, AUG__MIXUP_PROB=0.0, MODEL__LABEL_SMOOTHING=0.3))[4]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    mixed, soft = mixup_fn(x.clone(), y)
    off, on = 0.3 / 3, 1 - 0.3 + 0.3 / 3
    assert soft.shape == (4, 3) and torch.equal(mixed, x)
    assert torch.allclose(soft, torch.full((4, 3), off).scatter(1, y[:, None], on))

    mixup_fn = build_loader(make_config(root, AUG__CUTMIX=0.0))[4]
    mixed, soft = mixup_fn(x.clone(), y)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    assert not torch.equal(mixed, x)


def test_a_class_folder_only_the_val_split_has_is_named_as_such_not_as_a_class_count(tmp_path):
    root = make_tree(tmp_path)
    os.makedirs(os.path.join(root, "val", "zebra"))
    Image.new("RGB", (8, 8)).save(os.path.join(root, "val", "zebra", "0.png"))
    with pytest.raises(DataError) as err:
        build_loader(make_config(root))
    assert "class folders differ between" in str(err.value) and "'zebra' is in" in str(err.value)
    assert "MODEL.NUM_CLASSES" not in str(err.value)
