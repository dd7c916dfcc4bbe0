"""MOAT model family; importing this package registers every variant with timm."""
from .build import build_model
from .moat import MOAT, MOAT_CFGS, MoatCfg, create_moat, list_variants

__all__ = ["MOAT", "MOAT_CFGS", "MoatCfg", "build_model", "create_moat", "list_variants"]
