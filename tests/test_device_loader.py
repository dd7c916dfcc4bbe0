"""uint8 batches normalised on the device (``DATA.NORMALIZE_ON_DEVICE``): the same tensors as the
float path of the workers, random erasing on the device, and training through main.py."""

from __future__ import annotations

import os

import pytest
import torch

import main as trainer
from config import get_config
from data import build_loader
from data.device_loader import normalize_on_device

CPU = torch.device("cpu")


def config_for(data_path: str, **opts):
    config = get_config().clone()
    config.defrost()
    pairs = ["DATA.DATA_PATH", data_path, "DATA.DATASET", "imagefolder", "MODEL.NUM_CLASSES", 3,
             "DATA.IMG_SIZE", 32, "DATA.BATCH_SIZE", 4, "DATA.NUM_WORKERS", 0]  # fmt: skip
    for key, value in opts.items():
        pairs += [key.replace("__", "."), value]
    config.merge_from_list(pairs)
    config.freeze()
    return config


def batches(loader, epoch: int = 0):
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    return [(x.float(), y) for x, y in loader]


def test_auto_means_cuda_only_and_on_off_force_it(image_tree):
    config = config_for(image_tree)
    assert not normalize_on_device(config, CPU) and normalize_on_device(config, torch.device("cuda"))
    assert normalize_on_device(config_for(image_tree, DATA__NORMALIZE_ON_DEVICE="on"), CPU)
    assert not normalize_on_device(config_for(image_tree, DATA__NORMALIZE_ON_DEVICE="off"), torch.device("cuda"))
    assert not normalize_on_device(config_for(image_tree, DATA__NORMALIZE_ON_DEVICE="on"), None)


@pytest.mark.parametrize("split", [2, 3])  # train loader, val loader
def test_device_normalised_batches_equal_the_float_path_without_random_erasing(image_tree, split):
    """Same per-sample seeds, same RandAugment and crops: only where the float conversion and
    normalisation happen differs, so the batches agree to float rounding."""
    reference = build_loader(config_for(image_tree, AUG__REPROB=0.0))[split]
    on_device = build_loader(config_for(image_tree, AUG__REPROB=0.0, DATA__NORMALIZE_ON_DEVICE="on"))
    image = on_device[split].loader.dataset[(0, 1)][0]  # a uint8 tensor (older timm: a uint8 array)
    assert str(image.dtype) in ("torch.uint8", "uint8")  # the workers stop at uint8
    want, got = batches(reference), batches(on_device[split])
    assert len(want) == len(got) > 0
    for (x_want, y_want), (x_got, y_got) in zip(want, got):
        assert torch.equal(y_want, y_got)
        torch.testing.assert_close(x_got, x_want, rtol=0, atol=2e-6)


def test_random_erasing_runs_on_the_device_batch(image_tree):
    """REPROB 1 in 'const' mode: every image gets an erased rectangle of zeros (the normalised mean)."""
    config = config_for(image_tree, AUG__REPROB=1.0, AUG__REMODE="const", DATA__NORMALIZE_ON_DEVICE="on")
    torch.manual_seed(0)
    for images, _ in batches(build_loader(config)[2]):
        assert all((image == 0).all(dim=0).sum() > 0 for image in images)


def test_training_with_device_normalisation_matches_the_float_path_through_main(image_tree, tiny_cfg, tmp_path):
    """Without random erasing nothing random moves: the epoch's losses agree to float rounding."""
    from conftest import read_summary

    rows = {}
    for mode in ("off", "on"):
        cfg = tiny_cfg(TRAIN={"EPOCHS": 1}, AUG={"REPROB": 0.0}, DATA={"NORMALIZE_ON_DEVICE": mode})
        out = tmp_path / mode
        assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(out)]) == 0
        (rows[mode],) = read_summary(os.path.join(out, "tiny_moat_0", "default"))
    for key in ("train_loss", "val_loss"):
        assert float(rows["on"][key]) == pytest.approx(float(rows["off"][key]), rel=1e-4), key
