"""Configs and flags of the two trainers this one replaces, read as this project's.

The unofficial PyTorch MOAT port (``RooKichenn/pytorch-MOAT``, a fork of the Swin trainer) and the
Swin-Transformer trainer (``microsoft/Swin-Transformer``) share a yacs config tree, ``--flags``
and a saved ``config.json`` (a full yacs dump). ``config.py`` hands every YAML file it loads to
:func:`migrate_tree`; a file of either trainer comes back as a tree of this project's keys, and
each of its keys is accounted for in one of three ways:

* mapped to its equivalent here (a row of the one table the run logs: old key -> key here, value);
  keys with the same name and meaning are counted, not listed;
* ignored with one logged line, when it has no effect here (``MLP_RATIO``, ``EVAL_MODE``,
  ``FUSED_*``, Swin's architecture ...), or a logged line when its meaning here differs
  (``MODEL.DROP_RATE``);
* refused with a one-line :class:`ConfigError` naming the file, the key and why, when this project
  cannot express it (a max-pool head, a non-square window, LAMB).

Mapped keys then go through ``config.validate_config`` like any other. The run logs the notes once
its logger exists (``config.LoadedConfig.notes``). :func:`add_legacy_flags` and
:func:`legacy_flag_values` do the same for the two trainers' command-line flags. docs/migrating.md
lists every key and flag.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from yacs.config import CfgNode

from models.config import MOAT_CFGS
from utils.errors import ConfigError

PORT = "the unofficial MOAT port"
SWIN = "the Swin trainer"

# The port's MOAT: what it built differs from the official architecture in these places (its
# classification/moat.py); the weights it trained therefore fit no model of this project.
PORT_MODEL_DIFFERS = (
    "its stem has no norm, its downsampling shortcuts max-pool, its MBConv runs the depthwise conv "
    "before the 1x1 expansion, its head has no LayerNorm"
)
# The port's fixed layout: two MBConv stages, then two MOAT stages.
PORT_STAGE_TYPES = ["mbconv", "mbconv", "moat", "moat"]
# What the port's config.py gives a key a file leaves out (a new architecture name needs them).
PORT_ARCH_DEFAULTS = {"EMBED_DIM": 64, "DEPTHS": [2, 3, 7, 2], "CHANNELS": [96, 192, 384, 768], "DIM_HEAD": 32}
# Head size both trainers gave each DATA.DATASET (their build_loader overwrote MODEL.NUM_CLASSES).
DATASET_CLASSES = {"imagenet": 1000, "imagewoof": 10, "imagenet22K": 21841}
SWIN_TYPES = ("swin", "swinv2", "swin_moe", "swin_mlp")
SWIN_ARCH_SECTIONS = ("MODEL.SWIN.", "MODEL.SWINV2.", "MODEL.SWIN_MOE.", "MODEL.SWIN_MLP.")
# Keys only a config of one trainer has: they tell whose a file is.
_PORT_SIGNS = tuple(
    f"MODEL.MOAT.{k}" for k in ("EMBED_DIM", "CHANNELS", "DIM_HEAD", "USE_WINDOW", "POOL", "MLP_RATIO", "IN_CHANS")
) + ("MODEL.MOAT.IMG_SIZE", "MODEL.SPEC", "DEBUG_MODE")
_SWIN_SIGNS = (
    *SWIN_ARCH_SECTIONS,
    "MODEL.SIMMIM.",
    "AMP_ENABLE",
    "ENABLE_AMP",
    "FUSED_WINDOW_PROCESS",
    "FUSED_LAYERNORM",
    "DATA.MASK_PATCH_SIZE",
    "DATA.MASK_RATIO",
    "TRAIN.LR_SCHEDULER.WARMUP_PREFIX",
    "TRAIN.LR_SCHEDULER.GAMMA",
    "TRAIN.LR_SCHEDULER.MULTISTEPS",
    "TRAIN.MOE.",
    "TEST.SEQUENTIAL",
    "TEST.SHUFFLE",
)
# Keys a saved config.json has and a shipped YAML never: the launch state both trainers dumped.
_SAVED_SIGNS = ("LOCAL_RANK", "EVAL_MODE", "THROUGHPUT_MODE")


@dataclass(frozen=True)
class Row:
    """One mapped key: ``old`` (the other trainer's) -> ``new`` (this project's) with ``value``;
    ``unset``: the value equals what the named variant has, so the key is left null."""

    old: str
    new: str
    value: Any
    remark: str = ""
    unset: bool = False


@dataclass
class Migration:
    """How one file of another trainer was read: its keys here (``tree``), the mapped ``rows``,
    the logged ``notes`` (one line each) and how many keys kept their name and meaning."""

    source: str
    trainer: str  # PORT or SWIN
    saved: bool  # a saved config.json (a full dump), not a shipped YAML
    tree: Dict[str, Any]
    rows: List[Row] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    kept: int = 0

    def log_lines(self) -> List[str]:
        """What the run logs: the table (one record of several lines), then one line per note."""
        kind = "a saved config" if self.saved else "a config file"
        head = f"{self.source}: {kind} of {self.trainer}, read as this project's keys"
        width_old = max([len(r.old) for r in self.rows] + [8])
        width_new = max([len(r.new) for r in self.rows] + [8])
        table = [f"  {'old key'.ljust(width_old)} -> {'key here'.ljust(width_new)} value"] if self.rows else []
        for r in self.rows:
            value = "null (unset)" if r.unset else show(r.value)
            remark = f"  ({r.remark})" if r.remark else ""
            table.append(f"  {r.old.ljust(width_old)} -> {r.new.ljust(width_new)} {value}{remark}")
        kept = f"  {self.kept} other key(s) have the same name and meaning here"
        return ["\n".join([head + ":", *table, kept]), *self.notes]


def show(value: Any) -> str:
    """A value as YAML users read it: lists for tuples, null for None."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


# ------------------------------------------------------------------------------------ reading
def dialect_of(tree: Mapping[str, Any]) -> Optional[str]:
    """PORT, SWIN, or None for this project's own files (and files that say nothing of theirs)."""
    flat = _flatten(tree)
    if flat.get("MODEL.TYPE") == "MOAT" or any(_has(flat, sign) for sign in _PORT_SIGNS):
        return PORT
    if flat.get("MODEL.TYPE") in SWIN_TYPES or any(_has(flat, sign) for sign in _SWIN_SIGNS):
        return SWIN
    if "DATA.ZIP_MODE" in flat:  # both have it; it began as Swin's
        return SWIN
    return None


def migrate_tree(tree: Mapping[str, Any], source: str, inherited: Optional[str] = None) -> Optional[Migration]:
    """``tree`` (a YAML file's mapping, without ``BASE``) in this project's keys, or None when it
    is a file of this project. ``inherited``: the trainer of the files it names in ``BASE``
    (a file that only overrides a few keys of theirs says nothing of whose it is)."""
    trainer = dialect_of(tree) or inherited
    if trainer is None:
        return None
    flat = {k: CfgNode._decode_cfg_value(v) if isinstance(v, str) else v for k, v in _flatten(tree).items()}
    saved = any(k in flat for k in _SAVED_SIGNS)
    m = _Migrator(source, trainer, saved, flat)
    m.run()
    return Migration(source, trainer, saved, _unflatten(m.out), m.rows, m.note_lines(), m.kept)


def explain(message: str, migrations: Sequence[Migration]) -> str:
    """``message`` (a config error naming keys) with the keys of other trainers that set them."""
    sources = [
        f"{row.new} is {row.old} of {m.source}"
        for m in migrations
        for row in m.rows
        if not row.unset and row.old != row.new and re.search(rf"\b{re.escape(row.new)}\b", message)
    ]
    return f"{message} ({'; '.join(sources)})" if sources else message


class _Migrator:
    """Reads one flattened foreign tree; the handlers below fill ``out``, ``rows`` and notes."""

    def __init__(self, source: str, trainer: str, saved: bool, flat: Dict[str, Any]) -> None:
        self.source, self.trainer, self.saved, self.flat = source, trainer, saved, flat
        self.out: Dict[str, Any] = {}
        self.rows: List[Row] = []
        self.kept = 0
        self._ignored: Dict[str, List[str]] = {}  # reason -> the keys it covers (in order)
        self._notes: List[str] = []
        self.handled: set = set()  # keys a handler of another key has read
        # The port's default MODEL.NAME is moat_0_224: a file without one describes moat_0's.
        self.variant = port_variant(flat.get("MODEL.NAME", "moat_0_224")) if trainer == PORT else None

    # -- outcomes
    def keep(self, key: str, value: Any) -> None:
        self.out[key] = value
        self.kept += 1

    def map(self, old: str, new: str, value: Any, remark: str = "") -> None:
        self.out[new] = value
        self.rows.append(Row(old, new, value, remark))

    def unset(self, old: str, new: str, value: Any, remark: str) -> None:
        self.rows.append(Row(old, new, value, remark, unset=True))

    def ignore(self, key: str, reason: str, shown: Optional[str] = None) -> None:
        keys = self._ignored.setdefault(reason, [])
        if (shown or key) not in keys:
            keys.append(shown or key)

    def note(self, text: str) -> None:
        self._notes.append(text)

    def refuse(self, key: str, value: Any, why: str) -> None:
        raise ConfigError(f"{self.source}: {key}={show(value)} of {self.trainer}: {why}")

    def note_lines(self) -> List[str]:
        ignored = [f"ignored {', '.join(keys)}: {reason}" for reason, keys in self._ignored.items()]
        return ignored + self._notes

    # -- the walk
    def run(self) -> None:
        table = PORT_KEYS if self.trainer == PORT else SWIN_KEYS
        for key, value in self.flat.items():
            if key in self.handled:
                continue
            entry = _entry(table, key)
            if entry is None:  # a key of this project's, or one neither trainer has (refused later)
                self.keep(key, value)
            else:
                table[entry](self, key, value)
        if self.trainer == PORT and self.variant is None and "MODEL.NAME" in self.flat:
            self._port_new_architecture()
        describes_model = any(k in ("MODEL.TYPE", "MODEL.NAME") or k.startswith("MODEL.MOAT.") for k in self.flat)
        if self.trainer == PORT and describes_model:
            name = self.variant or self.flat["MODEL.NAME"]
            self.note(
                f"the port's model differed from the official MOAT ({PORT_MODEL_DIFFERS}): MODEL.NAME {name!r} is the "
                "official architecture here, and checkpoints of the port do not load into it"
            )

    def _port_new_architecture(self) -> None:
        """A MODEL.NAME that names no variant: the port's layout, its keys or the port's defaults."""
        for old, value in PORT_ARCH_DEFAULTS.items():
            if f"MODEL.MOAT.{old}" not in self.flat:
                _port_arch(self, f"MODEL.MOAT.{old}", value, remark="the port's default")
        self.map("MODEL.NAME", "MODEL.MOAT.STAGE_TYPES", PORT_STAGE_TYPES, "the port's layout")


Handler = Callable[[_Migrator, str, Any], None]


def table_entry(trainer: str, key: str) -> Optional[str]:
    """The entry of the key tables that reads ``key`` of ``trainer``'s: the key itself, or its
    section (``"MODEL.SWIN.*"``); None for a key neither trainer has (docs/migrating.md lists
    every entry)."""
    entry = _entry(PORT_KEYS if trainer == PORT else SWIN_KEYS, key)
    return f"{entry}*" if entry is not None and entry.endswith(".") else entry


def _entry(table: Mapping[str, Handler], key: str) -> Optional[str]:
    """``key``, or the section (``"MODEL.SWIN."``) of ``table`` that holds it, or None."""
    if key in table:
        return key
    return next((prefix for prefix in table if prefix.endswith(".") and key.startswith(prefix)), None)


def _same(m: _Migrator, key: str, value: Any) -> None:
    m.keep(key, value)


def _ignored(reason: str, section: Optional[str] = None) -> Handler:
    return lambda m, key, value: m.ignore(key, reason, shown=f"{section}*" if section else None)


# ---------------------------------------------------------------------------- shared handlers
def _dataset_and_classes(m: _Migrator, key: str, value: Any) -> None:
    """DATA.DATASET and MODEL.NUM_CLASSES together: both trainers sized the head by the dataset
    and overwrote MODEL.NUM_CLASSES with it; here the key is the head's size, checked against the
    data."""
    m.handled.update({"DATA.DATASET", "MODEL.NUM_CLASSES"})
    dataset = m.flat.get("DATA.DATASET")
    classes = m.flat.get("MODEL.NUM_CLASSES")
    if classes is None and "MODEL.NUM_CLASSES" in m.flat:
        m.keep("MODEL.NUM_CLASSES", None)  # null: the key's rule says it is an error
    if dataset == "imagewoof" and m.trainer == PORT:
        m.map("DATA.DATASET", "DATA.DATASET", "imagefolder", "Imagewoof's class folders")
    elif dataset == "imagenet22K" and m.trainer == SWIN:
        m.map("DATA.DATASET", "DATA.DATASET", "imagefolder", "class folders")
        m.note(
            "DATA.DATASET 'imagenet22K': Swin's layout (fall11_whole/ + ILSVRC2011fall_whole_map_{train,val}.txt) is "
            "not read here; give ImageNet-22K as DATA_PATH/train/ and DATA_PATH/val/ class folders (README 'Data')"
        )
    elif dataset is not None:
        m.keep("DATA.DATASET", dataset)
    head = DATASET_CLASSES.get(dataset if dataset is not None else "imagenet")
    if dataset in ("imagewoof", "imagenet22K") and head != classes:
        m.map(
            "MODEL.NUM_CLASSES" if classes is not None else "DATA.DATASET",
            "MODEL.NUM_CLASSES",
            head,
            f"{m.trainer} sized the head by DATA.DATASET {dataset!r}",
        )
    elif classes is not None:
        m.keep("MODEL.NUM_CLASSES", classes)
        if head is not None and classes != head:
            m.note(
                f"MODEL.NUM_CLASSES {classes}: {m.trainer} replaced it by the class count of DATA.DATASET "
                f"{dataset or 'imagenet'!r} ({head}) before building the model; here it is the head's size, "
                f"checked against the data (another dataset: --dataset imagefolder)"
            )


def _zip_mode(m: _Migrator, key: str, value: Any) -> None:
    m.map(key, "DATA.FORMAT", "zip" if value else "folder")


def _drop_rate(m: _Migrator, key: str, value: Any) -> None:
    m.keep(key, value)
    if value:
        where = (
            "to the output of every attention projection"
            if m.trainer == PORT
            else "after the patch embedding and inside every attention and MLP"
        )
        m.note(
            f"MODEL.DROP_RATE {value}: {m.trainer} applied this dropout {where}; "
            "here it is dropout before the classifier only (the official MOAT has no other)"
        )


def _drop_path_rate(m: _Migrator, key: str, value: Any) -> None:
    m.keep(key, value)
    if m.trainer == SWIN:
        m.note(
            f"MODEL.DROP_PATH_RATE {value}: Swin's rate for its own model, kept; "
            "--opts MODEL.DROP_PATH_RATE None takes the MOAT variant's published rate"
        )
    elif m.variant and value is not None and value != MOAT_CFGS[m.variant].drop_path_rate:
        m.note(
            f"MODEL.DROP_PATH_RATE {value}: kept; the official {m.variant} trains with "
            f"{MOAT_CFGS[m.variant].drop_path_rate} (docs/recipes.md)"
        )


def _learning_rate(m: _Migrator, key: str, value: Any) -> None:
    if not m.saved:
        m.keep(key, value)
        return
    m.ignore(
        key,
        f"a saved config holds {m.trainer}'s rates after scaling by that run's total batch / 512, and not "
        "how many GPUs it had; here the rates are per 512 images and the recipe's apply: to keep that run's "
        "rate, set TRAIN.BASE_LR (WARMUP_LR, MIN_LR) to the saved value x 512 / that run's total batch",
        shown=f"{key} {show(value)}",
    )


def _warmup_epochs(m: _Migrator, key: str, value: Any) -> None:
    m.keep(key, value)
    scheduler = m.flat.get("TRAIN.LR_SCHEDULER.NAME", "cosine")
    # Their cosine counted from update 0 (the port; Swin with WARMUP_PREFIX False), so did their
    # step decays; their linear schedule, like every schedule here, starts after the warmup.
    prefix = m.trainer == SWIN and m.flat.get("TRAIN.LR_SCHEDULER.WARMUP_PREFIX", True)
    inside = (scheduler == "cosine" and not prefix) or scheduler == "step"
    if value and inside:
        m.note(
            f"TRAIN.WARMUP_EPOCHS {value}: {m.trainer} ran this warmup inside the {scheduler} schedule (which "
            "counted from update 0); here the schedule starts where the warmup ends"
        )


def _accumulation_steps(m: _Migrator, key: str, value: Any) -> None:
    if value == 0:
        m.map(key, key, 1, "0 meant no accumulation there")
    else:
        m.keep(key, value)


def _scheduler(m: _Migrator, key: str, value: Any) -> None:
    m.keep(key, value)  # 'multistep' (Swin's SimMIM) is refused by the key's rule, naming the choices
    if value == "linear":
        m.note(
            f"TRAIN.LR_SCHEDULER.NAME 'linear': {m.trainer}'s linear schedule ends at 1% of the peak LR and "
            "ignores MIN_LR; here it ends at TRAIN.MIN_LR (set it to 1% of BASE_LR for the same)"
        )


def _optimizer(m: _Migrator, key: str, value: Any) -> None:
    if value == "fused_adam":
        m.map(key, key, "adamw", "apex FusedAdam in its default AdamW mode")
    elif value == "fused_lamb":
        m.refuse(key, value, "LAMB is not available here (TRAIN.OPTIMIZER.NAME adamw or sgd)")
    else:
        m.keep(key, value)


def _auto_augment(m: _Migrator, key: str, value: Any) -> None:
    if value == "none":
        m.map(key, key, "", "off: 'none' there, empty here")
    else:
        m.keep(key, value)


def _output(m: _Migrator, key: str, value: Any) -> None:
    """A saved config holds the run folder (OUTPUT/MODEL.NAME/TAG joined), a file the root."""
    if not m.saved:
        if value == "":
            m.ignore(key, "empty: --output's default 'output' applied there, and applies here")
        else:
            m.keep(key, value)
        return
    run = os.path.join(str(m.flat.get("MODEL.NAME", "")), str(m.flat.get("TAG", "default")))
    path = str(value).rstrip("/")
    if path.endswith("/" + run) or path == run:
        root = path[: -len(run)].rstrip("/") or "."
        m.map(key, key, root, f"the saved {path!r} is the run folder OUTPUT/MODEL.NAME/TAG: its root")
    else:
        m.keep(key, value)
        m.note(f"OUTPUT {show(value)}: the saved run's own folder (PT_OUTPUT_DIR?); this run writes below it")


_LAUNCH_STATE = "launch state saved with the config, not a setting (--eval, --throughput and the launcher say it here)"

COMMON_KEYS: Dict[str, Handler] = {
    "DATA.DATASET": _dataset_and_classes,
    "MODEL.NUM_CLASSES": _dataset_and_classes,
    "DATA.ZIP_MODE": _zip_mode,
    "MODEL.DROP_RATE": _drop_rate,
    "MODEL.DROP_PATH_RATE": _drop_path_rate,
    "TRAIN.BASE_LR": _learning_rate,
    "TRAIN.WARMUP_LR": _learning_rate,
    "TRAIN.MIN_LR": _learning_rate,
    "TRAIN.WARMUP_EPOCHS": _warmup_epochs,
    "TRAIN.ACCUMULATION_STEPS": _accumulation_steps,
    "TRAIN.LR_SCHEDULER.NAME": _scheduler,
    "TRAIN.OPTIMIZER.NAME": _optimizer,
    "AUG.AUTO_AUGMENT": _auto_augment,
    "OUTPUT": _output,
    "EVAL_MODE": _ignored(_LAUNCH_STATE),
    "THROUGHPUT_MODE": _ignored(_LAUNCH_STATE),
    "LOCAL_RANK": _ignored(_LAUNCH_STATE),
}
# Keys of both with the same name and meaning here (listed so that docs and tests can enumerate
# them; an unlisted key of this project's passes unchanged too).
SAME_KEYS = (
    "DATA.BATCH_SIZE",
    "DATA.DATA_PATH",
    "DATA.IMG_SIZE",
    "DATA.INTERPOLATION",
    "DATA.CACHE_MODE",
    "DATA.PIN_MEMORY",
    "DATA.NUM_WORKERS",
    "MODEL.RESUME",
    "MODEL.LABEL_SMOOTHING",
    "TRAIN.START_EPOCH",
    "TRAIN.EPOCHS",
    "TRAIN.WEIGHT_DECAY",
    "TRAIN.CLIP_GRAD",
    "TRAIN.AUTO_RESUME",
    "TRAIN.USE_CHECKPOINT",
    "TRAIN.LR_SCHEDULER.DECAY_EPOCHS",
    "TRAIN.LR_SCHEDULER.DECAY_RATE",
    "TRAIN.OPTIMIZER.EPS",
    "TRAIN.OPTIMIZER.BETAS",
    "TRAIN.OPTIMIZER.MOMENTUM",
    "AUG.COLOR_JITTER",
    "AUG.REPROB",
    "AUG.REMODE",
    "AUG.RECOUNT",
    "AUG.MIXUP",
    "AUG.CUTMIX",
    "AUG.CUTMIX_MINMAX",
    "AUG.MIXUP_PROB",
    "AUG.MIXUP_SWITCH_PROB",
    "AUG.MIXUP_MODE",
    "TEST.CROP",
    "TAG",
    "SAVE_FREQ",
    "PRINT_FREQ",
    "SEED",
)
COMMON_KEYS.update({key: _same for key in SAME_KEYS})


# ------------------------------------------------------------------------------------- the port
def port_variant(name: Any) -> Optional[str]:
    """The registered variant a port MODEL.NAME names (``moat_0_224`` -> ``moat_0``), or None."""
    name = str(name)
    if name in MOAT_CFGS:
        return name
    match = re.fullmatch(r"(.+)_\d+", name)
    return match.group(1) if match and match.group(1) in MOAT_CFGS else None


def _port_type(m: _Migrator, key: str, value: Any) -> None:
    if value == "MOAT":
        m.map(key, key, "moat")
    else:
        m.keep(key, value)  # refused by the key's rule


def _port_name(m: _Migrator, key: str, value: Any) -> None:
    if m.variant is not None:
        remark = "the official architecture it names" if m.variant != value else ""
        m.map(key, key, m.variant, remark)
    else:
        m.map(key, key, value, "no variant of that name: a new architecture in the port's layout")


def _port_arch(m: _Migrator, key: str, value: Any, remark: str = "") -> None:
    """EMBED_DIM, DEPTHS, CHANNELS, DIM_HEAD: the MoatCfg field each describes; left unset where
    the file says what the named official variant has."""
    name = key.rsplit(".", 1)[1]
    field_name, new_value = {
        "EMBED_DIM": ("stem_dims", [value, value]),  # the port's stem: two convs of EMBED_DIM
        "DEPTHS": ("depths", _as_list(value)),
        "CHANNELS": ("dims", _as_list(value)),
        "DIM_HEAD": ("head_dim", value),
    }[name]
    new = f"MODEL.MOAT.{field_name.upper()}"
    official = getattr(MOAT_CFGS[m.variant], field_name) if m.variant else None
    if official is not None and _as_list(official) == new_value:
        m.unset(key, new, new_value, f"{m.variant}'s own")
    else:
        m.map(key, new, new_value, remark)


def _port_window(m: _Migrator, key: str, value: Any) -> None:
    """WINDOW_SIZE with USE_WINDOW: the port attended globally unless USE_WINDOW, and then in
    WINDOW_SIZE windows in both attention stages."""
    m.handled.update({"MODEL.MOAT.WINDOW_SIZE", "MODEL.MOAT.USE_WINDOW"})
    old = " + ".join(k for k in ("MODEL.MOAT.WINDOW_SIZE", "MODEL.MOAT.USE_WINDOW") if k in m.flat)
    size = m.flat.get("MODEL.MOAT.WINDOW_SIZE", (7, 7))
    if not m.flat.get("MODEL.MOAT.USE_WINDOW", False):
        window = None
        remark = "global attention: USE_WINDOW is off"
    else:
        sides = _as_list(size) if isinstance(size, (list, tuple)) else [size, size]
        if len(sides) != 2 or sides[0] != sides[1]:
            m.refuse(
                "MODEL.MOAT.WINDOW_SIZE",
                size,
                "a non-square window cannot be expressed here (MODEL.MOAT.WINDOW_SIZE holds one side per stage)",
            )
        window = [sides[0], sides[0]]
        remark = f"{sides[0]}x{sides[0]} windows in both attention stages: USE_WINDOW is on"
    official = MOAT_CFGS[m.variant].window_size if m.variant else None
    if m.variant and window is None and official is None:
        m.unset(old, "MODEL.MOAT.WINDOW_SIZE", None, remark)
    else:
        m.map(old, "MODEL.MOAT.WINDOW_SIZE", window, remark)


def _port_pool(m: _Migrator, key: str, value: Any) -> None:
    if value == "avg":
        m.ignore(key, "the port's head averaged the final map, as MOAT's head does")
    else:
        m.refuse(key, value, "only average pooling before the head exists here (MOAT's head mean-pools)")


def _port_in_chans(m: _Migrator, key: str, value: Any) -> None:
    if value == 3:
        m.ignore(key, "RGB input, as here")
    else:
        m.refuse(key, value, "this project trains on RGB images (3 input channels)")


def _port_amp_opt_level(m: _Migrator, key: str, value: Any) -> None:
    if value == "O0":
        m.map(key, "AMP", "off", "apex O0: full precision")
    elif value in ("O1", "O2"):
        m.map(key, "AMP", "fp16", f"apex {value}: fp16 mixed precision; --amp-opt-level {value} keeps apex")
    else:
        m.ignore(key, "the port's --amp-opt-level flag (default O1) always replaced it")


PORT_KEYS: Dict[str, Handler] = {
    **COMMON_KEYS,
    "MODEL.TYPE": _port_type,
    "MODEL.NAME": _port_name,
    "MODEL.SPEC": _ignored("an empty section the port never read"),
    "MODEL.MOAT.EMBED_DIM": _port_arch,
    "MODEL.MOAT.DEPTHS": _port_arch,
    "MODEL.MOAT.CHANNELS": _port_arch,
    "MODEL.MOAT.DIM_HEAD": _port_arch,
    "MODEL.MOAT.WINDOW_SIZE": _port_window,
    "MODEL.MOAT.USE_WINDOW": _port_window,
    "MODEL.MOAT.POOL": _port_pool,
    "MODEL.MOAT.IN_CHANS": _port_in_chans,
    "MODEL.MOAT.MLP_RATIO": _ignored("unused by the port's model too (MOAT blocks have no MLP)"),
    "MODEL.MOAT.IMG_SIZE": _ignored(
        "the input size the port built its attention for (it had to equal DATA.IMG_SIZE); the model here "
        "takes DATA.IMG_SIZE and resizes its relative-position tables"
    ),
    "AMP_OPT_LEVEL": _port_amp_opt_level,
    "DEBUG_MODE": _ignored("the port's --debug (no data loaders) does not exist here"),
}


# ------------------------------------------------------------------------------------- Swin
_SWIN_MODEL = (
    "a Swin Transformer, which this project does not build: the model is MODEL.NAME's MOAT "
    "(default moat_0; choose one with --opts MODEL.NAME <variant>)"
)


def _swin_amp_enable(m: _Migrator, key: str, value: Any) -> None:
    if value:
        m.map(key, "AMP", "fp16", "Swin's torch.amp autocast is fp16; --amp auto picks bf16 where supported")
    else:
        m.map(key, "AMP", "off")


SWIN_KEYS: Dict[str, Handler] = {
    **COMMON_KEYS,
    "MODEL.TYPE": _ignored(_SWIN_MODEL),
    "MODEL.NAME": _ignored(_SWIN_MODEL),
    **{section: _ignored(_SWIN_MODEL, section) for section in SWIN_ARCH_SECTIONS},
    "MODEL.SIMMIM.": _ignored("SimMIM pre-training (Swin's main_simmim_pt.py)", "MODEL.SIMMIM."),
    "MODEL.PRETRAINED": _same,
    "DATA.MASK_PATCH_SIZE": _ignored("SimMIM pre-training masks"),
    "DATA.MASK_RATIO": _ignored("SimMIM pre-training masks"),
    "TRAIN.LAYER_DECAY": _same,
    "TRAIN.LR_SCHEDULER.WARMUP_PREFIX": _ignored("here the schedule always starts where the warmup ends"),
    "TRAIN.LR_SCHEDULER.GAMMA": _ignored("Swin's multistep schedule only"),
    "TRAIN.LR_SCHEDULER.MULTISTEPS": _ignored("Swin's multistep schedule only"),
    "TRAIN.MOE.": _ignored("Swin-MoE (main_moe.py)", "TRAIN.MOE."),
    "TEST.SEQUENTIAL": _ignored("the order of the validation images: the metrics do not depend on it"),
    "TEST.SHUFFLE": _ignored("the order of the validation images: the metrics do not depend on it"),
    "AMP_ENABLE": _swin_amp_enable,
    "AMP_OPT_LEVEL": _ignored("deprecated and unused by the Swin trainer (AMP_ENABLE decides)"),
    "ENABLE_AMP": _ignored("read by Swin's SimMIM scripts only"),
    "FUSED_WINDOW_PROCESS": _ignored("Swin's fused window-shift kernel; MOAT has no shifted windows"),
    "FUSED_LAYERNORM": _ignored("Swin's fused LayerNorm kernel; no effect on MOAT"),
}


# ------------------------------------------------------------------------------------- flags
def add_legacy_flags(parser: argparse.ArgumentParser) -> None:
    """The Swin trainer's and the port's flags that ``main.py`` has under another name or not at
    all: accepted with their meaning here (``legacy_flag_values``), or refused with a pointer."""
    group = parser.add_argument_group("flags of the Swin trainer and the MOAT port (docs/migrating.md)")
    group.add_argument(
        "--disable_amp", "--disable-amp", action="store_true", default=None, help="Swin's spelling of --amp off"
    )
    group.add_argument(
        "--optim",
        metavar="NAME",
        help="Swin's optimizer override: TRAIN.OPTIMIZER.NAME (adamw or sgd; fused_adam reads as adamw)",
    )
    group.add_argument(
        "--fused_window_process",
        "--fused-window-process",
        action="store_true",
        default=None,
        help="Swin's fused window-shift kernel: no effect on MOAT (a note is logged)",
    )
    group.add_argument(
        "--fused_layernorm",
        "--fused-layernorm",
        action="store_true",
        default=None,
        help="Swin's fused LayerNorm kernel: no effect on MOAT (a note is logged)",
    )
    group.add_argument(
        "--debug", action="store_true", default=None, help="the port's mode without data loaders: not available here"
    )


def legacy_flag_values(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> Tuple[Dict[str, Any], List[str]]:
    """The config keys the legacy flags set (``{"AMP": "off"}``) and the notes to log; a flag
    this project cannot honour is a one-line ``ConfigError`` pointing to what to use instead."""
    values: Dict[str, Any] = {}
    notes: List[str] = []
    if getattr(args, "debug", None):
        raise ConfigError(
            "--debug (the port's mode that builds no data loaders) does not exist here: to check a config, "
            "run --throughput, or a short training with --opts TRAIN.EPOCHS 1"
        )
    amp = getattr(args, "amp", None)
    if getattr(args, "amp_opt_level", None) == "O0":
        notes.append("--amp-opt-level O0: full precision, the same as --amp off (apex is not needed)")
    if getattr(args, "disable_amp", None):
        if amp not in (None, "off"):
            raise ConfigError(f"--disable_amp contradicts --amp {amp}: give one of them")
        values["AMP"] = "off"
        notes.append("--disable_amp: Swin's spelling of --amp off")
    optim = getattr(args, "optim", None)
    if optim is not None:
        name = optim.lower()
        if name == "fused_lamb":
            raise ConfigError("--optim fused_lamb: LAMB is not available here; --optim adamw or sgd")
        if name == "fused_adam":
            notes.append("--optim fused_adam: apex FusedAdam in its default AdamW mode, TRAIN.OPTIMIZER.NAME adamw")
            name = "adamw"
        values["TRAIN.OPTIMIZER.NAME"] = name
    for flag, what in (
        ("fused_window_process", "Swin's fused window-shift kernel; MOAT has no shifted windows"),
        ("fused_layernorm", "Swin's fused LayerNorm kernel; no effect on MOAT"),
    ):
        if getattr(args, flag, None):
            notes.append(f"--{flag}: {what}: ignored")
    if environ.get("PT_OUTPUT_DIR"):
        notes.append(
            f"PT_OUTPUT_DIR={environ['PT_OUTPUT_DIR']} is not read here (the port wrote its run there): "
            "this run writes to OUTPUT/MODEL.NAME/TAG (--output, --tag)"
        )
    return values, notes


# ------------------------------------------------------------------------------------ helpers
def _has(flat: Mapping[str, Any], sign: str) -> bool:
    return any(k.startswith(sign) for k in flat) if sign.endswith(".") else sign in flat


def _as_list(value: Any) -> Any:
    return [_as_list(v) for v in value] if isinstance(value, (list, tuple)) else value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"A.B": leaf}``; an empty section is a leaf of its own (``MODEL.SPEC: {}``)."""
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
