"""MOAT weights as a timm hub folder: ``config.json`` + ``model.safetensors``, written by timm's
own ``timm.models.save_for_hf``, so timm's loaders read it back::

    import models  # registers MOAT with timm
    model = timm.create_model("local-dir:FOLDER", pretrained=True)  # timm >= 1.0.16
    model = timm.create_model("hf-hub:USER/REPO", pretrained=True)  # after `hf upload USER/REPO FOLDER .`

``config.json`` holds the architecture (a registered name, plus ``model_args`` for every
:class:`~models.config.MoatCfg` field that differs from it), the class names (``label_names``)
and the ``pretrained_cfg`` timm's data pipeline reads: input size, crop, interpolation, mean/std,
class count, and for converted weights the release they come from (``origin_url``).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from .config import MOAT_CFGS, MoatCfg
from .moat import TEST_CFG

__all__ = ["HUB_WEIGHTS", "hub_architecture", "save_timm_folder"]

HUB_WEIGHTS = "model.safetensors"
# Keys of ``preprocessing`` (the eval preprocessing the weights were trained or released with).
PREPROCESSING_KEYS = ("img_size", "crop_pct", "interpolation", "mean", "std", "crop")


def _registered_cfg(name: str) -> Optional[MoatCfg]:
    return TEST_CFG if name == "test_moat" else MOAT_CFGS.get(name)


def hub_architecture(name: str, cfg: MoatCfg) -> Tuple[str, Dict[str, Any]]:
    """``(architecture, model_args)`` that rebuild ``cfg`` through ``timm.create_model``: ``name``
    when it is registered, else ``moat_0``; ``model_args`` holds every field that differs from
    that architecture's (training-only ``drop_path_rate`` left out)."""
    from timm.models import is_model

    base = _registered_cfg(name) if is_model(name) else None
    if base is None:
        name, base = "moat_0", MOAT_CFGS["moat_0"]
    ours, theirs = cfg.to_dict(), base.to_dict()
    args = {k: v for k, v in ours.items() if v != theirs[k] and k != "drop_path_rate"}
    return name, args


def save_timm_folder(
    model: nn.Module,
    folder: str,
    class_names: Sequence[str],
    preprocessing: Mapping[str, Any],
    origin_url: Optional[str] = None,
) -> str:
    """Write ``model`` (a MOAT, any architecture) to ``folder`` in timm's hub layout; returns it.

    ``preprocessing``: ``img_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std`` (0..1
    pixels) and ``crop`` (False: the whole image squashed to ``img_size``), as the trainer's eval
    transform uses them. Raises ValueError naming the key for values that do not fit the model.
    """
    import huggingface_hub
    import timm
    from timm.models._hub import has_hf_hub, save_for_hf  # timm.models re-exports it only in newer releases

    if not has_hf_hub():
        raise RuntimeError(
            f"timm {timm.__version__} cannot use huggingface_hub {huggingface_hub.__version__} "
            "(timm releases before huggingface_hub 1.0 need huggingface_hub<1.0)"
        )

    missing = [k for k in PREPROCESSING_KEYS if k not in preprocessing]
    if missing:
        raise ValueError(f"preprocessing lacks {', '.join(missing)} (needs {', '.join(PREPROCESSING_KEYS)})")
    size, stride = int(preprocessing["img_size"]), model.cfg.total_stride
    if size <= 0 or size % stride:
        raise ValueError(f"preprocessing img_size={size}: not a positive multiple of the model's stride {stride}")
    if len(class_names) != model.num_classes:
        raise ValueError(f"class_names: {len(class_names)} names for a {model.num_classes}-class head")
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    architecture, model_args = hub_architecture(name, model.cfg)
    crop = bool(preprocessing["crop"])
    pretrained_cfg = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "input_size": (model.in_chans, size, size),
        "pool_size": (size // stride, size // stride),
        # timm's eval transform: resize to size / crop_pct and centre-crop, or squash the whole
        # image to the size (crop_pct 1), as the trainer does without TEST.CROP.
        "crop_pct": float(preprocessing["crop_pct"]) if crop else 1.0,
        "crop_mode": "center" if crop else "squash",
        "interpolation": str(preprocessing["interpolation"]),
        "mean": tuple(float(v) for v in preprocessing["mean"]),
        "std": tuple(float(v) for v in preprocessing["std"]),
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "fixed_input_size": False,
        "license": "apache-2.0",
        "paper_ids": "arXiv:2210.01820",
    }
    if origin_url:
        pretrained_cfg["origin_url"] = origin_url
    # save_for_hf records model.pretrained_cfg (timm 1.0.9 takes no other way to pass it).
    saved = model.__dict__.get("pretrained_cfg")
    model.pretrained_cfg = pretrained_cfg
    try:
        save_for_hf(
            model,
            folder,
            model_config={"label_names": list(class_names)},
            model_args=model_args or None,
            safe_serialization=True,
        )
    finally:
        if saved is None:
            del model.pretrained_cfg
        else:
            model.pretrained_cfg = saved
    return os.fspath(folder)
