"""Build the model the trainer's config describes."""

from __future__ import annotations

import torch.nn as nn

from .config import FIELD_NAMES, MoatCfg, MoatConfigError, resolve_cfg
from .moat import create_moat

# MoatCfg fields (and checked values) whose trainer key is not MODEL.MOAT.<FIELD>.
_KEYS = {"name": "MODEL.NAME", "img_size": "DATA.IMG_SIZE", "drop_path_rate": "MODEL.DROP_PATH_RATE"}


def config_key(field: str) -> str:
    """The trainer config key of a MoatCfg field (``depths`` -> ``MODEL.MOAT.DEPTHS``)."""
    return _KEYS.get(field, f"MODEL.MOAT.{field.upper()}")


def moat_overrides_from_config(config) -> dict:
    """The MoatCfg fields the trainer config sets: the ``MODEL.MOAT`` keys that are not null, and
    ``MODEL.DROP_PATH_RATE`` when not null (null keeps the variant's value)."""
    overrides = {}
    for field in FIELD_NAMES:
        value = config.MODEL.DROP_PATH_RATE if field == "drop_path_rate" else config.MODEL.MOAT.get(field.upper())
        if value is not None:
            overrides[field] = list(value) if isinstance(value, (list, tuple)) else value
    return overrides


def moat_cfg_from_config(config) -> MoatCfg:
    """The architecture ``config`` describes, checked: variant ``MODEL.NAME`` with the set
    ``MODEL.MOAT.*`` keys (and ``MODEL.DROP_PATH_RATE``) overriding its fields, or, for a name that
    is not registered, the new architecture those keys define; ``DATA.IMG_SIZE`` must fit it.

    Raises :class:`MoatConfigError` (a ValueError) whose message names the config key.
    """
    overrides = moat_overrides_from_config(config)
    try:
        cfg = resolve_cfg(config.MODEL.NAME, overrides)
        cfg.check_img_size(config.DATA.IMG_SIZE)
    except MoatConfigError as e:
        # Show a key's value as the config spells it ([7, 0], not the per-stage [None, None, 7, None]).
        value = overrides.get(e.field, e.value)
        raise MoatConfigError(e.field, value, e.reason, key_of=config_key) from None
    return cfg


def build_model(config) -> nn.Module:
    """The MOAT ``config`` describes (``moat_cfg_from_config``) with its head and regularisation."""
    if config.MODEL.TYPE != "moat":
        raise ValueError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}; accepted: 'moat'")
    model = create_moat(
        config.MODEL.NAME,
        cfg=moat_cfg_from_config(config),
        num_classes=config.MODEL.NUM_CLASSES,
        drop_rate=config.MODEL.DROP_RATE,
        fused_depthwise=config.MODEL.FUSED_DEPTHWISE,
    )
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    return model
