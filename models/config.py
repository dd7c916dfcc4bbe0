"""MOAT architectures as data: one frozen dataclass describes a network, the registered variants
are instances of it, and every invalid combination is a one-line error naming the field.

In the manner of timm's ``MaxxVitCfg``, but flat: each field is also a keyword of
``timm.create_model('moat_0', <field>=...)`` and a trainer key ``MODEL.MOAT.<FIELD>`` (upper case),
so one name travels unchanged from Python to YAML. The defaults are the authors' values
(deeplab2 ``model/pixel_encoder/moat.py`` and ``model/layers/moat_blocks.py``); see
``docs/architecture.md``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

__all__ = [
    "MOAT_CFGS",
    "MoatCfg",
    "MoatConfigError",
    "BLOCK_TYPES",
    "CONV_NORM_LAYERS",
    "FIELD_DOCS",
    "FIELD_NAMES",
    "REQUIRED_FIELDS",
    "POS_EMBED_IMG_SIZE",
    "resolve_cfg",
]

# Block types a stage can hold (deeplab2 moat.py: MOAT._build_block accepts exactly these two).
BLOCK_TYPES = ("mbconv", "moat")
# timm norm names usable on [B, C, H, W] maps (the conv path); all take ``eps``, BatchNorm also
# ``momentum``.
CONV_NORM_LAYERS = ("batchnorm2d", "batchnorm", "groupnorm", "groupnorm1", "layernorm2d", "rmsnorm2d")
# Input size at which the relative-bias tables have their native size: the default table of an
# attention stage covers that stage's feature map at this size (14 at stride 16, 7 at stride 32).
POS_EMBED_IMG_SIZE = 224


class MoatConfigError(ValueError):
    """An invalid architecture: ``field`` (a :class:`MoatCfg` field, or ``name`` / ``img_size``),
    the offending ``value`` and why. With ``key_of`` every field name in the message is spelt
    ``key_of(field)`` (a trainer config key, say)."""

    def __init__(self, field: str, value: Any, reason: str, key_of: Optional[Callable[[str], str]] = None) -> None:
        self.field, self.value, self.reason, self.key_of = field, value, reason, key_of
        # Field names in the reason are written as `field`, so each reader gets its own spelling.
        name = key_of or (lambda f: f)
        reason = re.sub(r"`(\w+)`", lambda m: name(m.group(1)), reason)
        head = name(field) if key_of else f"MOAT config {field}"
        super().__init__(f"invalid {head}={_plain(value)!r}: {reason}")


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (JSON and YAML spell sequences as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_REQUIRED = object()


def _doc(text: str, default: Any = _REQUIRED) -> Any:
    """A dataclass field with its documentation (``fields(MoatCfg)[i].metadata['doc']``)."""
    if default is _REQUIRED:
        return field(metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class MoatCfg:
    """One MOAT architecture. Per-stage sequences have one entry per stage; stage i's first block
    has stride ``strides[i]``. Defaults are the official values.

    ``window_size`` and ``pos_embed_size`` accept one value per stage or one per attention
    ('moat') stage (an int or None means every attention stage); ``None`` / ``0`` is global
    attention, and the stored form is per stage (None where global or not attention) or ``None``
    when every stage is global. ``pos_embed_size`` None derives each attention stage's table from
    its feature-map size at ``POS_EMBED_IMG_SIZE`` (224) px.
    """

    # Each field's ``doc`` is also the comment of its trainer key MODEL.MOAT.<FIELD> (config.py
    # generates the keys from these fields); [brackets]: the official value.
    # --- stem and stages (required for a new architecture)
    stem_dims: Tuple[int, ...] = _doc(
        "Stem conv widths; the first conv has stride 2, a norm and activation sit between two convs. "
        "[two convs, e.g. [64, 64] for moat_0]"
    )
    depths: Tuple[int, ...] = _doc("Blocks per stage; the number of entries is the number of stages (any, not only 4).")
    dims: Tuple[int, ...] = _doc("Output channels per stage.")
    stage_types: Tuple[str, ...] = _doc(
        "Block type per stage: 'mbconv' (MBConv with squeeze-excite) or 'moat' (MBConv without SE, then "
        "LayerNorm + multi-head self-attention). [mbconv, mbconv, moat, moat]"
    )
    strides: Optional[Tuple[int, ...]] = _doc(
        "Stride of each stage's first block (TF 'SAME'); the total stride, 2 x their product, must divide "
        "the input size. [2 per stage]",
        None,
    )
    # --- convolution (MBConv blocks and the MBConv half of MOAT blocks)
    expand_ratio: float = _doc("Width of the 1x1 expansion, times the block's OUTPUT channels. [4.0]", 4.0)
    se_ratio: float = _doc(
        "Squeeze-excite width in MBConv stages, times the output channels; 0 removes it. [0.25]", 0.25
    )
    kernel_size: int = _doc("Depthwise conv kernel (odd). [3]", 3)
    pool_size: int = _doc("Average-pool size of the strided shortcut: 2 (classification) or 3 (dense tasks). [2]", 2)
    # --- attention (MOAT blocks)
    head_dim: int = _doc("Channels per attention head; every attention stage's width must divide by it. [32]", 32)
    window_size: Optional[Tuple[Optional[int], ...]] = _doc(
        "Attention window: one value per attention ('moat') stage, or one per stage (0 for 'mbconv' stages); "
        "0 means global attention over the whole map. Each window must divide its stage's feature map (stage-3 "
        "map 14 and stage-4 map 7 at 224 px for the official layout; [14, 0] is the authors' detection "
        "setting). [global everywhere]",
        None,
    )
    pos_embed: bool = _doc("Learned relative position bias in attention (the *_no_pe variants set false). [true]", True)
    pos_embed_size: Optional[Tuple[Optional[int], ...]] = _doc(
        "Native relative-bias window P per attention stage (or per stage, 0 for 'mbconv'): the table has "
        "(2P-1)^2 entries per head and is resized to the actual window; 0 derives it from the stage's feature "
        "map at 224 px. [14 at stride 16, 7 at stride 32]",
        None,
    )
    # --- layers, by timm name
    norm_layer: str = _doc(
        "Norm of the stem and the conv path, a timm name: batchnorm2d, groupnorm, layernorm2d, ... "
        "['batchnorm2d'; the trainer makes it SyncBatchNorm under DDP on CUDA]",
        "batchnorm2d",
    )
    act_layer: str = _doc(
        "Activation of the stem and the conv path, a timm name (gelu is the exact erf form). ['gelu']", "gelu"
    )
    se_act_layer: str = _doc("Activation inside squeeze-excite, a timm name. ['silu' (swish)]", "silu")
    bn_eps: float = _doc("Epsilon of the conv-path norm. [0.001, Keras' BatchNormalization default]", 1e-3)
    bn_momentum: float = _doc(
        "BatchNorm running-stat momentum (PyTorch convention). 0.01 is the official value (Keras 0.99), right "
        "for ImageNet-length schedules; runs of a few thousand steps need ~0.1, or the running statistics lag "
        "the weights and eval accuracy collapses while train loss looks fine. [0.01]",
        0.01,
    )
    ln_eps: float = _doc("Epsilon of the attention LayerNorm and of the head's LayerNorm. [1e-05]", 1e-5)
    # --- head and regularisation
    head_hidden_size: int = _doc(
        "Head: mean pool -> LayerNorm -> Linear; a width > 0 inserts Linear(width) + tanh before the "
        "classifier (timm's NormMlpClassifierHead). [0]",
        0,
    )
    drop_path_rate: float = _doc("Stochastic depth: block b of N drops with rate * b / N.", 0.0)

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ derived per-stage values
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_strides(self) -> Tuple[int, ...]:
        return self.strides if self.strides is not None else (2,) * self.num_stages

    @property
    def stage_windows(self) -> Tuple[Optional[int], ...]:
        """Attention window per stage; None for global attention and for MBConv stages."""
        return self.window_size if self.window_size is not None else (None,) * self.num_stages

    @property
    def reductions(self) -> Tuple[int, ...]:
        """Output stride of each stage (the stem has stride 2)."""
        out, r = [], 2
        for s in self.stage_strides:
            r *= s
            out.append(r)
        return tuple(out)

    @property
    def total_stride(self) -> int:
        return self.reductions[-1]

    @property
    def stage_pos_embed_sizes(self) -> Tuple[Optional[int], ...]:
        """Native relative-bias window P per stage (table ``2P-1`` square); None without one."""
        if not self.pos_embed:
            return (None,) * self.num_stages
        if self.pos_embed_size is not None:
            return self.pos_embed_size
        return _default_pos_embed_sizes(self.stage_types, self.stage_strides)

    def feature_sizes(self, img_size: int) -> Tuple[int, ...]:
        """Side of each stage's output map for a square ``img_size`` input (TF 'SAME': ceil)."""
        return _map_sizes(img_size, self.stage_strides)

    def check_img_size(self, img_size: int) -> None:
        """Raise :class:`MoatConfigError` unless ``img_size`` fits this architecture: divisible by
        the total stride, and every attention window divides its stage's feature map."""
        if img_size <= 0 or img_size % self.total_stride:
            raise MoatConfigError(
                "img_size",
                img_size,
                f"must be a positive multiple of the total stride {self.total_stride} (2 x the product of `strides`)",
            )
        for i, (window, size) in enumerate(zip(self.stage_windows, self.feature_sizes(img_size))):
            if window is not None and size % window:
                raise MoatConfigError(
                    "window_size",
                    _plain(self.window_size),
                    f"window {window} of stage {i + 1} does not divide its {size}x{size} feature map "
                    f"at `img_size` {img_size}; use a divisor of {size} or 0 (global attention)",
                )

    # ------------------------------------------------------------------------ copies and storage
    def replace(self, **overrides: Any) -> "MoatCfg":
        """A copy with ``overrides`` (field -> value) applied and checked."""
        _check_field_names(overrides)
        return replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able values (lists, numbers, strings, None), layer names as strings."""
        return {k: _plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MoatCfg":
        """Inverse of :meth:`to_dict`; unknown fields are an error."""
        _check_field_names(data)
        missing = [f for f in REQUIRED_FIELDS if f not in data]
        if missing:
            raise MoatConfigError(
                missing[0], None, "required (a MoatCfg needs " + ", ".join(f"`{f}`" for f in REQUIRED_FIELDS) + ")"
            )
        return cls(**dict(data))


FIELD_NAMES: Tuple[str, ...] = tuple(f.name for f in fields(MoatCfg))
FIELD_DOCS: Dict[str, str] = {f.name: f.metadata["doc"] for f in fields(MoatCfg)}
REQUIRED_FIELDS: Tuple[str, ...] = ("stem_dims", "depths", "dims", "stage_types")


def _check_field_names(names) -> None:
    unknown = sorted(set(names) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown MOAT config field(s) {', '.join(unknown)}; accepted: {', '.join(FIELD_NAMES)}")


def _map_sizes(img_size: int, strides: Sequence[int]) -> Tuple[int, ...]:
    size, out = math.ceil(img_size / 2), []
    for s in strides:
        size = math.ceil(size / s)
        out.append(size)
    return tuple(out)


def _default_pos_embed_sizes(stage_types: Sequence[str], strides: Sequence[int]) -> Tuple[Optional[int], ...]:
    sizes = _map_sizes(POS_EMBED_IMG_SIZE, strides)
    return tuple(s if t == "moat" else None for t, s in zip(stage_types, sizes))


# ----------------------------------------------------------------------------------- validation
def _fail(field: str, value: Any, reason: str) -> None:
    raise MoatConfigError(field, value, reason)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_tuple(cfg: MoatCfg, name: str) -> Tuple[int, ...]:
    value = getattr(cfg, name)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        _fail(name, value, "must be a list of positive ints")
    if not value:
        _fail(name, value, "must not be empty")
    if not all(_is_int(v) and v > 0 for v in value):
        _fail(name, value, "must be a list of positive ints")
    return tuple(value)


def _set(cfg: MoatCfg, name: str, value: Any) -> None:
    object.__setattr__(cfg, name, value)  # normalising a frozen dataclass in __post_init__


def _per_stage(cfg: MoatCfg, name: str, value: Any, what: str, unset: str) -> Optional[Tuple[Optional[int], ...]]:
    """``value`` given per stage or per attention stage -> per stage (None where unset or not an
    attention stage), or None when it is unset everywhere. Entries are ints > 0; None and 0 mean
    ``unset``."""
    attn = [i for i, t in enumerate(cfg.stage_types) if t == "moat"]
    n = cfg.num_stages
    if value is None or _is_int(value):
        per_attn = [value] * len(attn)
    elif isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        _fail(
            name,
            value,
            f"must be an int, None, or a list with one {what} per stage ({n}) or per attention stage ({len(attn)})",
        )
    elif len(value) == len(attn):
        per_attn = list(value)
    elif len(value) == n:
        for i, v in enumerate(value):
            if i not in attn and v not in (None, 0):
                _fail(name, value, f"stage {i + 1} is an 'mbconv' stage (no attention): its entry must be 0 or null")
        per_attn = [value[i] for i in attn]
    else:
        _fail(
            name,
            value,
            f"has {len(value)} entries; needs one per stage ({n}) or one per "
            f"attention ('moat') stage ({len(attn)}) of `stage_types` {list(cfg.stage_types)}",
        )
    for v in per_attn:
        if not (v is None or (_is_int(v) and v >= 0)):
            _fail(name, value, f"entries must be ints >= 0 or null (0 / null: {unset})")
    stage = [None] * n
    for i, v in zip(attn, per_attn):
        stage[i] = v or None
    return None if all(v is None for v in stage) else tuple(stage)


def _validate(cfg: MoatCfg) -> None:
    _set(cfg, "stem_dims", _int_tuple(cfg, "stem_dims"))
    depths = _int_tuple(cfg, "depths")
    _set(cfg, "depths", depths)
    n = len(depths)
    dims = _int_tuple(cfg, "dims")
    if len(dims) != n:
        _fail("dims", dims, f"has {len(dims)} entries but `depths` {list(depths)} has {n} (one per stage)")
    _set(cfg, "dims", dims)
    types = cfg.stage_types
    if isinstance(types, str) or not isinstance(types, Sequence):
        _fail(
            "stage_types",
            types,
            "must be a list with one block type per stage, each " + ", ".join(map(repr, BLOCK_TYPES)),
        )
    types = tuple(types)
    for i, t in enumerate(types):
        if t not in BLOCK_TYPES:
            _fail(
                "stage_types",
                types,
                f"unknown block type {t!r} in stage {i + 1}; accepted: {', '.join(map(repr, BLOCK_TYPES))}",
            )
    if len(types) != n:
        _fail("stage_types", types, f"has {len(types)} entries but `depths` {list(depths)} has {n} (one per stage)")
    _set(cfg, "stage_types", types)
    if cfg.strides is not None:
        strides = _int_tuple(cfg, "strides")
        if len(strides) != n:
            _fail("strides", strides, f"has {len(strides)} entries but `depths` {list(depths)} has {n} (one per stage)")
        _set(cfg, "strides", None if all(s == 2 for s in strides) else strides)

    if not (_is_number(cfg.expand_ratio) and cfg.expand_ratio > 0):
        _fail("expand_ratio", cfg.expand_ratio, "must be a number > 0")
    if not (_is_number(cfg.se_ratio) and 0 <= cfg.se_ratio <= 1):
        _fail("se_ratio", cfg.se_ratio, "must be a number in [0, 1] (0: no squeeze-excite)")
    if not (_is_int(cfg.kernel_size) and cfg.kernel_size > 0 and cfg.kernel_size % 2):
        _fail("kernel_size", cfg.kernel_size, "must be a positive odd int")
    if cfg.pool_size not in (2, 3) or not _is_int(cfg.pool_size):
        _fail("pool_size", cfg.pool_size, "accepted: 2 (classification), 3 (dense tasks)")

    if not (_is_int(cfg.head_dim) and cfg.head_dim > 0):
        _fail("head_dim", cfg.head_dim, "must be a positive int")
    for i, (t, d) in enumerate(zip(types, dims)):
        if t == "moat" and d % cfg.head_dim:
            _fail("dims", dims, f"width {d} of attention stage {i + 1} is not divisible by `head_dim` {cfg.head_dim}")
    _set(cfg, "window_size", _per_stage(cfg, "window_size", _plain_seq(cfg.window_size), "window", "global attention"))
    if not isinstance(cfg.pos_embed, bool):
        _fail("pos_embed", cfg.pos_embed, "must be true or false")
    sizes = _per_stage(
        cfg, "pos_embed_size", _plain_seq(cfg.pos_embed_size), "size", "the stage's feature-map size at 224 px"
    )
    if sizes is not None:
        default = _default_pos_embed_sizes(types, cfg.stage_strides)
        sizes = tuple(s if s is not None else d for s, d in zip(sizes, default))
        sizes = None if sizes == default else sizes
    _set(cfg, "pos_embed_size", sizes)

    _check_layer_name(cfg, "norm_layer", norm=True)
    _check_layer_name(cfg, "act_layer")
    _check_layer_name(cfg, "se_act_layer")
    for name in ("bn_eps", "ln_eps"):
        if not (_is_number(getattr(cfg, name)) and getattr(cfg, name) > 0):
            _fail(name, getattr(cfg, name), "must be a number > 0")
    if not (_is_number(cfg.bn_momentum) and 0 < cfg.bn_momentum <= 1):
        _fail("bn_momentum", cfg.bn_momentum, "must be in (0, 1]")
    if not (_is_int(cfg.head_hidden_size) and cfg.head_hidden_size >= 0):
        _fail("head_hidden_size", cfg.head_hidden_size, "must be an int >= 0 (0: no hidden layer)")
    if not (_is_number(cfg.drop_path_rate) and 0 <= cfg.drop_path_rate < 1):
        _fail("drop_path_rate", cfg.drop_path_rate, "must be in [0, 1)")


def _plain_seq(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_layer_name(cfg: MoatCfg, name: str, norm: bool = False) -> None:
    from timm.layers import get_act_layer

    value = getattr(cfg, name)
    if norm:
        if value not in CONV_NORM_LAYERS:
            _fail(name, value, "accepted (timm names): " + ", ".join(CONV_NORM_LAYERS))
        return
    try:
        ok = isinstance(value, str) and value != "" and get_act_layer(value) is not None
    except KeyError:
        ok = False
    if not ok:
        _fail(name, value, "not a timm activation name (e.g. 'gelu', 'gelu_tanh', 'silu', 'relu')")


# ------------------------------------------------------------------------------------ variants
def _moat(stem: int, depths: Tuple[int, ...], width: int, drop_path_rate: float) -> MoatCfg:
    """The official layout: two stem convs, MBConv, MBConv, MOAT, MOAT, widths doubling."""
    return MoatCfg(
        stem_dims=(stem, stem),
        depths=depths,
        dims=(width, 2 * width, 4 * width, 8 * width),
        stage_types=("mbconv", "mbconv", "moat", "moat"),
        drop_path_rate=drop_path_rate,
    )


# deeplab2 moat.py: moat{0..4}_config / tiny_moat{0..3}_config; the drop-path rates are
# 1 - survival_prob of _get_moat_config_via_model_name.
_BASE_CFGS: Dict[str, MoatCfg] = {
    "moat_0": _moat(64, (2, 3, 7, 2), 96, 0.2),
    "moat_1": _moat(64, (2, 6, 14, 2), 96, 0.3),
    "moat_2": _moat(128, (2, 6, 14, 2), 128, 0.3),
    "moat_3": _moat(160, (2, 12, 28, 2), 160, 0.6),
    "moat_4": _moat(256, (2, 12, 28, 2), 256, 0.7),
    "tiny_moat_0": _moat(32, (2, 3, 7, 2), 32, 0.0),
    "tiny_moat_1": _moat(40, (2, 3, 7, 2), 40, 0.0),
    "tiny_moat_2": _moat(56, (2, 3, 7, 2), 56, 0.0),
    "tiny_moat_3": _moat(80, (2, 3, 7, 2), 80, 0.1),
}
# Every variant also exists without position embedding (deeplab2's no_relative_pe override).
MOAT_CFGS: Dict[str, MoatCfg] = {
    **_BASE_CFGS,
    **{f"{n}_no_pe": c.replace(pos_embed=False) for n, c in _BASE_CFGS.items()},
}


def resolve_cfg(name: str, overrides: Optional[Mapping[str, Any]] = None, base: Optional[MoatCfg] = None) -> MoatCfg:
    """The architecture called ``name`` with ``overrides`` (field -> value) applied and checked.

    ``base`` defaults to the registered variant ``name``. A name that is neither registered nor
    given a ``base`` is a new architecture: ``overrides`` must then hold every required field
    (``stem_dims``, ``depths``, ``dims``, ``stage_types``); the others take the official defaults.
    Raises :class:`MoatConfigError` (a ValueError) naming the field.
    """
    overrides = dict(overrides or {})
    _check_field_names(overrides)
    if base is None:
        base = MOAT_CFGS.get(name)
    if base is not None:
        return base.replace(**overrides)
    missing = [f for f in REQUIRED_FIELDS if f not in overrides]
    if missing:
        raise MoatConfigError(
            "name",
            name,
            f"not a registered variant (accepted: {', '.join(MOAT_CFGS)}); a new "
            f"architecture must set " + ", ".join(f"`{f}`" for f in missing),
        )
    return MoatCfg(**overrides)
