"""Load a trained MOAT for inference, from a trainer checkpoint or an exported safetensors file.

One loader serves ``tools/predict.py``, ``tools/export.py`` and ``hubconf.py`` so the three agree
on which weights (raw or EMA) a file yields, on the class names, and on the preprocessing: the
eval transform is rebuilt from the saved config with the trainer's own ``build_transform``, never
re-implemented, so predictions match validation exactly.

Files understood:

* a trainer checkpoint (``torch.save`` dict: ``model``, optional ``model_ema``, ``config``,
  ``model_cfg`` (the architecture, ``MoatCfg.to_dict()``), ``class_names``, ``model_name``,
  ``epoch``), loaded with ``weights_only=True``;
* a safetensors file written by :func:`save_safetensors` (weights plus metadata: variant,
  architecture, class names, preprocessing);
* a bare state dict or a foreign safetensors file, when the caller names the variant (default
  preprocessing and generic class names then apply).

Every problem (missing file, wrong variant, class-count mismatch, weights of another shape) is a
``UserError`` with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from yacs.config import CfgNode

from models import MoatCfg, create_moat, list_variants, moat_cfg_from_config, resolve_cfg

from .checkpoint import load_file, load_model_weights, model_state_from
from .errors import UserError

__all__ = [
    "ModelMeta",
    "UserError",
    "build_eval_transform",
    "config_from_dict",
    "load_model_for_inference",
    "preprocessing_from_config",
    "save_safetensors",
    "safetensors_metadata",
]

# Keys of the safetensors metadata (all values are strings, as the format requires).
META_FORMAT = "moat.format"  # version of this metadata layout
META_VARIANT = "moat.variant"
META_NUM_CLASSES = "moat.num_classes"
META_CLASS_NAMES = "moat.class_names"  # JSON list
META_PREPROCESSING = "moat.preprocessing"  # JSON dict, see preprocessing_from_config
META_MODEL_ARGS = "moat.model_args"  # JSON dict: window_size, pool_size (older files)
META_MODEL_CFG = "moat.model_cfg"  # JSON dict: the architecture, MoatCfg.to_dict()
META_WEIGHTS = "moat.weights"  # 'ema' or 'raw'
META_EPOCH = "moat.epoch"
_FORMAT_VERSION = "1"


@dataclass
class ModelMeta:
    """What a weights file says about its model, beyond the tensors.

    ``config`` is a full (frozen) trainer config: the saved one for trainer checkpoints, the
    defaults updated from the metadata for safetensors files. ``preprocessing`` is its eval
    part (``img_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``, ``crop``).
    """

    variant: str
    num_classes: int
    class_names: List[str]
    preprocessing: Dict[str, Any]
    config: CfgNode
    weights: str  # 'ema' or 'raw': which weights were loaded
    source: str  # the file path
    epoch: Optional[int] = None
    model_cfg: Dict[str, Any] = field(default_factory=dict)  # the architecture, MoatCfg.to_dict()


# --------------------------------------------------------------------------------------- command line
def add_weights_choice(parser: "argparse.ArgumentParser", verb: str = "use") -> None:
    """``--ema`` / ``--no-ema`` (``args.use_ema``: True, False, or None for "EMA when present"),
    the choice every tool passes to :func:`load_model_for_inference`."""
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=None,
                     help=f"{verb} the EMA weights (error if the checkpoint has none)")  # fmt: skip
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", default=None,
                     help=f"{verb} the raw weights (default: EMA when present)")  # fmt: skip


# ------------------------------------------------------------------------------------------ config
def config_from_dict(saved: Dict[str, Any]) -> CfgNode:
    """A frozen config: today's defaults overlaid with ``saved`` (a ``config_to_dict`` tree).

    Keys the current defaults no longer know are skipped rather than rejected: an old
    checkpoint must stay loadable after the config grows or loses a key.
    """
    from config import get_config  # the repo-root config module

    config = get_config().clone()
    config.defrost()

    def overlay(node: CfgNode, values: Dict[str, Any]) -> None:
        for key, value in values.items():
            if key not in node:
                continue
            if isinstance(node[key], CfgNode):
                if isinstance(value, dict):
                    overlay(node[key], value)
            elif isinstance(node[key], (list, tuple)) and isinstance(value, (list, tuple)):
                node[key] = type(node[key])(value)
            else:
                node[key] = value

    overlay(config, saved)
    config.freeze()
    return config


def preprocessing_from_config(config: CfgNode) -> Dict[str, Any]:
    """The eval preprocessing of ``config`` as plain JSON-able values (for export metadata).

    'random' interpolation is a training augmentation; the eval transform uses bicubic, so the
    resolved value is what is recorded.
    """
    interpolation = config.DATA.INTERPOLATION
    return {
        "img_size": int(config.DATA.IMG_SIZE),
        "crop_pct": float(config.DATA.CROP_PCT),
        "interpolation": "bicubic" if interpolation == "random" else interpolation,
        "mean": [float(v) for v in config.DATA.MEAN],
        "std": [float(v) for v in config.DATA.STD],
        "crop": bool(config.TEST.CROP),
    }


def _config_from_metadata(variant: str, num_classes: int, preprocessing: Dict[str, Any]) -> CfgNode:
    """Defaults updated with what a safetensors file records (the rest does not affect eval)."""
    data = {}
    keys = {
        "img_size": "IMG_SIZE",
        "crop_pct": "CROP_PCT",
        "interpolation": "INTERPOLATION",
        "mean": "MEAN",
        "std": "STD",
    }
    for key, cfg_key in keys.items():
        if key in preprocessing:
            data[cfg_key] = preprocessing[key]
    tree: Dict[str, Any] = {"DATA": data, "MODEL": {"NAME": variant, "NUM_CLASSES": num_classes}}
    if "crop" in preprocessing:
        tree["TEST"] = {"CROP": bool(preprocessing["crop"])}
    return config_from_dict(tree)


def _architecture(
    variant: str,
    recorded: Optional[Dict[str, Any]],
    saved_config: Optional[CfgNode],
    model_args: Dict[str, Any],
    path: str,
) -> MoatCfg:
    """The file's architecture: its ``model_cfg`` record; else the saved trainer config's
    ``MODEL.NAME`` and ``MODEL.MOAT`` keys; else (older safetensors) the registered variant with the
    recorded window and pool sizes."""
    try:
        if recorded:
            return MoatCfg.from_dict(recorded)
        if saved_config is not None:
            return moat_cfg_from_config(saved_config)
        if variant not in list_variants():
            raise UserError(
                f"{path}: holds weights of {variant!r}, which is not a registered variant, "
                f"and records no architecture (model_cfg); accepted: {', '.join(list_variants())}"
            )
        overrides = {}
        if "window_size" in model_args:
            overrides["window_size"] = [int(w or 0) for w in model_args["window_size"]]
        if "pool_size" in model_args:
            overrides["pool_size"] = int(model_args["pool_size"])
        return resolve_cfg(variant, overrides)
    except ValueError as e:  # MoatConfigError: names the field
        raise UserError(f"{path}: the recorded architecture is invalid: {e}") from None


def build_eval_transform(meta: ModelMeta) -> Callable:
    """PIL image -> ``[3, img_size, img_size]`` tensor, exactly the trainer's eval transform."""
    from data.transforms import build_transform  # repo-root data package; keeps this import light

    return build_transform(False, meta.config)


# ----------------------------------------------------------------------------------------- loading
def _head_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    weight = state_dict.get("head.fc.weight")
    return int(weight.shape[0]) if weight is not None else None


def _read_safetensors_metadata(path: str) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def _json_field(metadata: Dict[str, str], key: str, path: str, default: Any) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata field {key!r} is not valid JSON") from None


def load_model_for_inference(
    path: str,
    variant: Optional[str] = None,
    device: str | torch.device = "cpu",
    use_ema: Optional[bool] = None,
) -> Tuple[nn.Module, ModelMeta]:
    """The model stored in ``path``, in eval mode on ``device``, and what the file says about it.

    Args:
        path: a trainer checkpoint, a safetensors file from ``tools/export.py``, or a bare state
            dict / foreign safetensors file (then ``variant``, a registered name, is required).
        variant: the expected variant. When the file names one, a different ``variant`` is an
            error (loading moat_0 weights as tiny_moat_0 can only fail later, less clearly).
        device: where the model goes.
        use_ema: None (default) takes the EMA weights when the checkpoint has them, because the
            trainer validates and reports the EMA as its model when EMA is on; True requires
            them; False takes the raw weights. A safetensors file holds one set and ignores it
            unless True is asked of a file exported without EMA.

    The architecture comes from the file (custom architectures included); the number of classes
    from the weights' head, and class names or a config that disagree with it are a class-count
    mismatch error.
    """
    obj = load_file(path)  # one-line UserError for missing, unreadable or unsafe files
    is_safetensors = path.endswith(".safetensors")
    model_args: Dict[str, Any] = {}
    saved_config = None
    if is_safetensors:
        metadata = _read_safetensors_metadata(path)
        state_dict = model_state_from(obj, path)
        saved_variant = metadata.get(META_VARIANT)
        recorded = _json_field(metadata, META_MODEL_CFG, path, None)
        class_names = _json_field(metadata, META_CLASS_NAMES, path, None)
        preprocessing = _json_field(metadata, META_PREPROCESSING, path, {})
        model_args = _json_field(metadata, META_MODEL_ARGS, path, {})
        weights = metadata.get(META_WEIGHTS, "raw")
        if use_ema and weights != "ema":
            raise UserError(f"{path}: EMA weights requested, but this file holds the {weights} weights")
        saved_classes = int(metadata[META_NUM_CLASSES]) if META_NUM_CLASSES in metadata else None
        epoch = int(metadata[META_EPOCH]) if metadata.get(META_EPOCH, "").lstrip("-").isdigit() else None
    else:
        has_ema = isinstance(obj.get("model_ema"), dict)
        # A converted release (tools/convert_deeplab2.py) holds one set in 'model' and says which.
        converted = obj.get("converted_from") if isinstance(obj.get("converted_from"), dict) else {}
        converted_weights = converted.get("weights") if not has_ema else None
        if use_ema and not has_ema and converted_weights != "ema":
            raise UserError(
                f"{path}: EMA weights requested (--ema), but the checkpoint has no "
                f"'model_ema' (trained with TRAIN.EMA.ENABLE False?)"
            )
        if use_ema is False and converted_weights == "ema":
            raise UserError(
                f"{path}: raw weights requested (--no-ema), but this converted checkpoint "
                f"holds the EMA weights only (convert with --raw for the raw ones)"
            )
        take_ema = has_ema if use_ema is None else bool(use_ema)
        state_dict = model_state_from(obj, path, prefer_ema=take_ema)
        weights = converted_weights if converted_weights in ("ema", "raw") else ("ema" if take_ema else "raw")
        saved = obj.get("config") if isinstance(obj.get("config"), dict) else None
        recorded = obj.get("model_cfg") if isinstance(obj.get("model_cfg"), dict) else None
        saved_variant = obj.get("model_name") or (saved or {}).get("MODEL", {}).get("NAME")
        class_names = obj.get("class_names")
        saved_classes = (saved or {}).get("MODEL", {}).get("NUM_CLASSES")
        preprocessing = {}
        epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
        if saved is not None:
            saved_config = config_from_dict(saved)

    if variant is not None and saved_variant is not None and variant != saved_variant:
        raise UserError(f"wrong variant: {path} holds {saved_variant} weights, not {variant}")
    variant = variant or saved_variant
    if variant is None:
        raise UserError(f"{path}: the file does not name its variant; pass it explicitly (e.g. --variant moat_0)")
    if variant not in list_variants() and not recorded and saved_config is None:
        raise UserError(
            f"unknown MOAT variant {variant!r} and {path} records no architecture; "
            f"accepted: {', '.join(list_variants())}"
        )

    num_classes = _head_classes(state_dict)
    if num_classes is None:
        raise UserError(f"{path}: no classifier weights ('head.fc.weight') in the file")
    if saved_classes is not None and int(saved_classes) != num_classes:
        raise UserError(
            f"{path}: class-count mismatch: the weights have {num_classes} classes, the metadata says {saved_classes}"
        )
    if class_names is not None and len(class_names) != num_classes:
        raise UserError(
            f"{path}: class-count mismatch: the weights have {num_classes} classes, "
            f"but {len(class_names)} class names are stored"
        )
    class_names = (
        [str(c) for c in class_names] if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    )

    arch = _architecture(variant, recorded, saved_config, model_args, path)
    if saved_config is not None:
        config = saved_config.clone()
        config.defrost()
        config.MODEL.NAME = variant
        config.MODEL.NUM_CLASSES = num_classes
        config.freeze()
    else:
        config = _config_from_metadata(variant, num_classes, preprocessing)
    # Inference needs none of the training-time options (gradient checkpointing, drop path).
    model = create_moat(variant, cfg=arch.replace(drop_path_rate=0.0), num_classes=num_classes)
    load_model_weights(model, state_dict, path if not is_safetensors else f"{path} ({variant})")
    model.to(device).eval()
    meta = ModelMeta(
        variant=variant,
        num_classes=num_classes,
        class_names=class_names,
        preprocessing=preprocessing_from_config(config),
        config=config,
        weights=weights,
        source=path,
        epoch=epoch,
        model_cfg=arch.to_dict(),
    )
    return model, meta


# ------------------------------------------------------------------------------------------ saving
def safetensors_metadata(meta: ModelMeta) -> Dict[str, str]:
    """The string-valued metadata :func:`load_model_for_inference` reads back."""
    return {
        "format": "pt",
        META_FORMAT: _FORMAT_VERSION,
        META_VARIANT: meta.variant,
        META_NUM_CLASSES: str(meta.num_classes),
        META_CLASS_NAMES: json.dumps(list(meta.class_names)),
        META_PREPROCESSING: json.dumps(meta.preprocessing, sort_keys=True),
        META_MODEL_CFG: json.dumps(meta.model_cfg, sort_keys=True),
        META_WEIGHTS: meta.weights,
        META_EPOCH: "" if meta.epoch is None else str(meta.epoch),
    }


def save_safetensors(
    model: nn.Module, meta: ModelMeta, path: str, extra_metadata: Optional[Dict[str, str]] = None
) -> str:
    """Write ``model``'s weights (only) and ``meta`` to ``path``; returns ``path``.

    Buffers such as BatchNorm running statistics are included (they are weights for inference);
    tensors are copied to contiguous CPU memory, as safetensors requires. ``extra_metadata``
    (string values) rides along, e.g. where converted weights came from; readers ignore it.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata={**(extra_metadata or {}), **safetensors_metadata(meta)})
    return path
