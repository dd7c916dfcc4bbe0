"""Shared by test_predict / test_export / test_hub: a briefly trained tiny_moat_0 checkpoint in the
trainer's format, made in-process (no main.py run), and a few PNG images.

The config deliberately differs from the defaults where the eval transform reads it (64 px,
bilinear, crop 0.8) so a loader that ignored the saved config would give other numbers.
"""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import config as config_module
import models  # noqa: F401 (registers the variants with timm)

VARIANT = "tiny_moat_0"
CLASS_NAMES = ["red", "green", "blue"]
IMG_SIZE, CROP_PCT, INTERPOLATION = 64, 0.8, "bilinear"
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)


def checkpoint_config(**model_overrides) -> dict:
    cfg = config_module.config_to_dict(config_module.get_config())
    cfg["MODEL"].update(NAME=VARIANT, NUM_CLASSES=len(CLASS_NAMES), **model_overrides)
    cfg["DATA"].update(
        IMG_SIZE=IMG_SIZE, CROP_PCT=CROP_PCT, INTERPOLATION=INTERPOLATION, MEAN=list(MEAN), STD=list(STD)
    )
    cfg["TEST"]["CROP"] = True
    return cfg


def make_checkpoint(path: str, with_ema: bool = True, class_names=CLASS_NAMES, **cfg_overrides) -> str:
    """Train tiny_moat_0 (3 classes) for a few steps on solid-colour batches and save it as the
    trainer does; the EMA is a snapshot taken mid-way, so raw and EMA weights differ."""
    torch.manual_seed(0)
    model = timm.create_model(VARIANT, num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    colors = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    ema = None
    for step in range(4):
        labels = torch.arange(6) % 3
        x = colors[labels][:, :, None, None].expand(-1, -1, IMG_SIZE, IMG_SIZE)
        x = x + 0.3 * torch.randn(6, 3, IMG_SIZE, IMG_SIZE)
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1:
            ema = copy.deepcopy(model)
    state = {
        "model": model.state_dict(),
        "config": checkpoint_config(**cfg_overrides),
        "class_names": list(class_names),
        "model_name": VARIANT,
        "epoch": 3,
        "max_accuracy": 50.0,
    }
    if with_ema:
        state["model_ema"] = ema.state_dict()
    torch.save(state, path)
    return path


def edited_checkpoint(src: str, dst: str, drop=(), **changes) -> str:
    """A copy of checkpoint ``src`` with keys dropped or replaced (cheaper than training again)."""
    state = torch.load(src, weights_only=True)
    for key in drop:
        del state[key]
    state.update(changes)
    torch.save(state, dst)
    return dst


def make_images(folder: str, count: int = 5) -> list:
    """Noisy solid-colour PNGs of assorted non-square sizes (resize and crop both matter)."""
    rng = np.random.default_rng(1)
    colors = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = 50 + 13 * i, 90 - 7 * i
        pixels = np.asarray(colors[i % 3])[None, None] + rng.normal(0, 30, (h, w, 3))
        path = os.path.join(folder, f"img_{i}.png")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def reference_transform():
    """The eval transform written out by hand from the documented recipe (not via our code)."""
    return T.Compose(
        [
            T.Resize(int(IMG_SIZE / CROP_PCT), interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(IMG_SIZE),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def reference_model(checkpoint: str, key: str = "model_ema") -> torch.nn.Module:
    """The checkpoint's weights loaded the plain way."""
    model = timm.create_model(VARIANT, num_classes=3)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)[key])
    return model.eval()


@torch.no_grad()
def reference_probs(checkpoint: str, images: list, key: str = "model_ema") -> torch.Tensor:
    """Softmax over the classes of each image, by hand: transform, stack, model."""
    transform = reference_transform()
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    return reference_model(checkpoint, key)(batch).softmax(-1)
