"""Build the model the trainer's config describes."""
from __future__ import annotations

import torch.nn as nn

from .moat import create_moat


def build_model(config) -> nn.Module:
    """MOAT variant ``config.MODEL.NAME`` with the config's head, regularisation and attention."""
    if config.MODEL.TYPE != "moat":
        raise ValueError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}; accepted: 'moat'")
    drop_path = config.MODEL.DROP_PATH_RATE
    model = create_moat(
        config.MODEL.NAME,
        num_classes=config.MODEL.NUM_CLASSES,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=None if drop_path < 0 else drop_path,
        window_size=tuple(w or None for w in config.MODEL.MOAT.WINDOW_SIZE),
        pool_size=config.MODEL.MOAT.POOL_SIZE,
        bn_momentum=config.MODEL.MOAT.BN_MOMENTUM,
    )
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    return model
