"""MOAT model family; importing this package registers every variant with timm."""

from .build import build_model, moat_cfg_from_config, moat_overrides_from_config
from .config import MOAT_CFGS, MoatCfg, MoatConfigError, resolve_cfg
from .moat import MOAT, create_moat, list_variants

__all__ = [
    "MOAT",
    "MOAT_CFGS",
    "MoatCfg",
    "MoatConfigError",
    "build_model",
    "create_moat",
    "list_variants",
    "moat_cfg_from_config",
    "moat_overrides_from_config",
    "resolve_cfg",
]
