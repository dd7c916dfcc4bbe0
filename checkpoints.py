"""The checkpoint format: what this project's files hold, written and read in this one module.

Every reader (resume, ``--pretrained``, ``--eval``, predict, export, torch.hub) goes through
:func:`read_checkpoint`, which turns any file it understands into one :class:`CheckpointRecord`:
the architecture, the class count and names, the eval preprocessing, the weights (model and EMA)
and, for training checkpoints, the training state and its :class:`Position`. Writers build their
files here too: :func:`training_checkpoint` (the trainer), :func:`weights_checkpoint` (converted
official weights) and :func:`save_safetensors` (exports).

Files understood (``load_file`` reads every one with ``weights_only=True``):

* a training checkpoint (``last.pth``, ``best.pth``, ``epoch_N.pth``): weights, EMA, optimizer,
  schedule, scaler, position, RNG states, the run's config and architecture;
* a weights checkpoint (``tools/convert_deeplab2.py``): one set of weights (``converted_from``
  says which), architecture, config, class names;
* an export (``.safetensors``, ``tools/export.py``): one set of weights, string metadata;
* a bare state dict, or a foreign safetensors file, when the caller names the variant.

``format_version`` is written into every file; files without one are version 1 (the same layout,
before the field existed) and read the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from yacs.config import CfgNode

from config import config_from_dict, config_to_dict
from models import MoatCfg, create_moat, list_variants, moat_cfg_from_config, resolve_cfg
from models.moat import strip_wrapper_prefixes
from utils.checkpoint_io import BEST, LAST, PickledObjectsError, load_file, load_model_weights
from utils.errors import UserError

FORMAT_VERSION = 2
HEAD_WEIGHT = "head.fc.weight"  # the classifier's weight: its rows are the class count

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
_SAFETENSORS_FORMAT = "1"


# ------------------------------------------------------------------------------------ position
@dataclass(frozen=True, order=True)
class Position:
    """How far training had come when a checkpoint was written; positions compare in training
    order (a finished epoch after any point inside it)."""

    epoch: int
    epoch_complete: bool
    samples_done: int  # of the epoch's global order (all of it once the epoch is complete)
    step: int  # optimizer updates so far
    batches_done: int = field(default=0, compare=False)  # micro-batches of the epoch, per rank

    def describe(self) -> str:
        if self.epoch_complete:
            return f"end of epoch {self.epoch}, step {self.step}"
        return f"epoch {self.epoch}, batch {self.batches_done}, step {self.step}"


def _position_of(obj: Dict[str, Any]) -> Position:
    order = obj.get("data_order") or {}
    batches = int(obj.get("batches_done", 0))
    global_batch = int(order.get("batch_size", 0)) * int(order.get("world_size", obj.get("world_size", 1)))
    complete = bool(obj.get("epoch_complete", True))
    samples = int(order.get("samples_done", batches * global_batch))
    return Position(int(obj["epoch"]), complete, samples, int(obj.get("step", 0)), batches)


# -------------------------------------------------------------------------------------- record
@dataclass
class CheckpointRecord:
    """What one file holds, whatever its kind (``training``, ``weights``, ``export``,
    ``state_dict``)."""

    path: str
    kind: str
    format_version: int
    model_name: Optional[str]
    state_dicts: Dict[str, Dict[str, torch.Tensor]]  # 'model', and 'ema' when saved
    class_names: Optional[List[str]] = None
    config: Optional[CfgNode] = None  # the saved trainer config on today's defaults
    model_cfg: Optional[Dict[str, Any]] = None  # the recorded architecture, MoatCfg.to_dict()
    preprocessing: Dict[str, Any] = field(default_factory=dict)
    single_set: Optional[str] = None  # files with one set of weights: 'ema' or 'raw'
    training: Optional[Dict[str, Any]] = None  # optimizer, schedule, scaler, RNG, counters
    position: Optional[Position] = None
    provenance: Optional[Dict[str, Any]] = None  # converted_from: where converted weights came from
    epoch: Optional[int] = None
    legacy_model_args: Dict[str, Any] = field(default_factory=dict)  # older safetensors

    @property
    def resumable(self) -> bool:
        return self.training is not None

    @property
    def has_ema(self) -> bool:
        return "ema" in self.state_dicts

    @property
    def num_classes(self) -> Optional[int]:
        """The classifier's output count, from the weights (the head is what the file holds)."""
        weight = self.state_dicts["model"].get(HEAD_WEIGHT)
        return int(weight.shape[0]) if weight is not None else None

    def weights(self, use_ema: Optional[bool] = None) -> Tuple[Dict[str, torch.Tensor], str]:
        """``(state_dict, 'ema' or 'raw')``. ``use_ema`` None takes the EMA when the file has it
        (what the trainer reports when EMA is on); True requires it; False the raw weights."""
        if self.single_set is not None and not self.has_ema:
            if use_ema and self.single_set != "ema":
                raise UserError(f"{self.path}: EMA weights requested, but this file holds the {self.single_set} ones")
            if use_ema is False and self.single_set == "ema":
                raise UserError(
                    f"{self.path}: raw weights requested (--no-ema), but this file holds the EMA weights only"
                    + (" (convert with --raw for the raw ones)" if self.provenance else "")
                )
            return self.state_dicts["model"], self.single_set
        if use_ema and not self.has_ema:
            raise UserError(
                f"{self.path}: EMA weights requested (--ema), but the checkpoint has no "
                "'model_ema' (trained with TRAIN.EMA.ENABLE False?)"
            )
        take_ema = self.has_ema if use_ema is None else bool(use_ema)
        return (self.state_dicts["ema"], "ema") if take_ema else (self.state_dicts["model"], "raw")

    def architecture(self) -> MoatCfg:
        """The file's architecture: its ``model_cfg`` record; else the saved config's
        ``MODEL.NAME`` and ``MODEL.MOAT`` keys; else the registered variant (older safetensors:
        with the window and pool sizes they recorded)."""
        try:
            if self.model_cfg:
                return MoatCfg.from_dict(self.model_cfg)
            if self.config is not None:
                return moat_cfg_from_config(self.config)
            if self.model_name not in list_variants():
                raise UserError(
                    f"{self.path}: holds weights of {self.model_name!r}, which is not a registered variant, "
                    f"and records no architecture (model_cfg); accepted: {', '.join(list_variants())}"
                )
            overrides = {}
            if "window_size" in self.legacy_model_args:
                overrides["window_size"] = [int(w or 0) for w in self.legacy_model_args["window_size"]]
            if "pool_size" in self.legacy_model_args:
                overrides["pool_size"] = int(self.legacy_model_args["pool_size"])
            return resolve_cfg(self.model_name, overrides)
        except ValueError as e:  # MoatConfigError: names the field
            if isinstance(e, UserError):
                raise
            raise UserError(f"{self.path}: the recorded architecture is invalid: {e}") from None


# ------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str, variant: Optional[str] = None, mmap: bool = False) -> CheckpointRecord:
    """The record of ``path``; ``variant`` names the model of files that do not name theirs
    (and must match the one a file names). ``mmap`` maps the tensors instead of reading them
    (cheap when only the position or the metadata are needed). Every problem is a one-line
    ``UserError`` naming the file."""
    try:
        obj = load_file(path, mmap=mmap)
    except PickledObjectsError as e:  # whose checkpoint it is says more than what it pickles
        foreign = foreign_model(path, e.model_keys)
        if foreign is not None:
            raise UserError(f"{foreign}; it also holds {e.describe()}, which is refused (weights_only)") from None
        raise
    if path.endswith(".safetensors"):
        record = _read_safetensors(path, obj)
    else:
        record = _read_torch_file(path, obj)
    foreign = foreign_model(path, record.state_dicts["model"])
    if foreign is not None:
        raise UserError(foreign)
    if variant is not None and record.model_name is not None and variant != record.model_name:
        raise UserError(f"wrong variant: {path} holds {record.model_name} weights, not {variant}")
    record.model_name = record.model_name or variant
    return record


def _read_torch_file(path: str, obj: Dict[str, Any]) -> CheckpointRecord:
    state_dicts = {"model": _state_dict(obj, path)}
    if isinstance(obj.get("model_ema"), dict):
        state_dicts["ema"] = strip_wrapper_prefixes(obj["model_ema"])
    saved = obj.get("config") if isinstance(obj.get("config"), dict) else None
    provenance = obj.get("converted_from") if isinstance(obj.get("converted_from"), dict) else None
    resumable = "optimizer" in obj and "epoch" in obj
    kind = "training" if resumable else "weights" if ("model" in obj or "state_dict" in obj) else "state_dict"
    config = config_from_dict(saved) if saved is not None else None
    epoch = obj.get("epoch")
    record = CheckpointRecord(
        path=path,
        kind=kind,
        format_version=int(obj.get("format_version", 1)),
        model_name=obj.get("model_name") or (saved or {}).get("MODEL", {}).get("NAME"),
        state_dicts=state_dicts,
        class_names=[str(c) for c in obj["class_names"]] if obj.get("class_names") is not None else None,
        config=config,
        model_cfg=obj.get("model_cfg") if isinstance(obj.get("model_cfg"), dict) else None,
        preprocessing=preprocessing_from_config(config) if config is not None else {},
        single_set=provenance.get("weights") if provenance and not state_dicts.get("ema") else None,
        training={k: v for k, v in obj.items() if k not in _WEIGHT_KEYS} if resumable else None,
        position=_position_of(obj) if resumable else None,
        provenance=provenance,
        epoch=epoch if isinstance(epoch, int) else None,
    )
    _check_class_count(record, (saved or {}).get("MODEL", {}).get("NUM_CLASSES"))
    return record


_WEIGHT_KEYS = ("model", "model_ema")

# Weight names that give away the model of another trainer: the unofficial MOAT port (its stage
# modules) and the Swin trainer (its patch embedding and layers).
_PORT_WEIGHTS = ("MBConv1.", "MBConv2.", "MOAT1.", "MOAT2.")
_SWIN_WEIGHTS = ("patch_embed.", "layers.")
_CONVERTED_WEIGHTS = (
    "to start from pretrained MOAT, convert the official weights with tools/convert_deeplab2.py "
    "and pass them to --pretrained"
)


def foreign_model(path: str, weight_names: Any) -> Optional[str]:
    """Why ``path`` holds no MOAT of this project's, when its weight names are those of the
    unofficial port's model or of a Swin Transformer; None otherwise."""
    names = [n.split("module.", 1)[-1] if n.startswith("module.") else n for n in weight_names]
    port = [n for n in names if n.startswith(_PORT_WEIGHTS)]
    if port:
        return (
            f"{path}: a checkpoint of the unofficial MOAT port (weights such as {port[0]}): that model is not the "
            f"official MOAT architecture, so its weights do not map onto this project's models; {_CONVERTED_WEIGHTS}"
        )
    if all(any(n.startswith(prefix) for n in names) for prefix in _SWIN_WEIGHTS):
        return (
            f"{path}: a Swin Transformer checkpoint (weights patch_embed.*, layers.*), not a MOAT model: its "
            f"weights cannot initialise one; {_CONVERTED_WEIGHTS}"
        )
    return None


def _read_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> CheckpointRecord:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata() or {})
    variant = metadata.get(META_VARIANT)
    num_classes = int(metadata[META_NUM_CLASSES]) if META_NUM_CLASSES in metadata else None
    preprocessing = _json_field(metadata, META_PREPROCESSING, path, {})
    epoch = metadata.get(META_EPOCH, "")
    record = CheckpointRecord(
        path=path,
        kind="export",
        format_version=int(metadata.get(META_FORMAT, "1") or 1),
        model_name=variant,
        state_dicts={"model": strip_wrapper_prefixes(tensors)},
        class_names=_json_field(metadata, META_CLASS_NAMES, path, None),
        model_cfg=_json_field(metadata, META_MODEL_CFG, path, None),
        preprocessing=preprocessing,
        single_set=metadata.get(META_WEIGHTS, "raw"),
        epoch=int(epoch) if epoch.lstrip("-").isdigit() else None,
        legacy_model_args=_json_field(metadata, META_MODEL_ARGS, path, {}),
    )
    _check_class_count(record, num_classes)
    return record


def _check_class_count(record: CheckpointRecord, recorded: Optional[int]) -> None:
    found = record.num_classes
    if found is None:
        return
    if recorded is not None and int(recorded) != found:
        raise UserError(
            f"{record.path}: class-count mismatch: the weights have {found} classes, the metadata says {recorded}"
        )
    if record.class_names is not None and len(record.class_names) != found:
        raise UserError(
            f"{record.path}: class-count mismatch: the weights have {found} classes, "
            f"but {len(record.class_names)} class names are stored"
        )


def _state_dict(obj: Dict[str, Any], path: str) -> Dict[str, torch.Tensor]:
    """The model weights of a loaded file: ``model``, a wrapper's ``state_dict``, or the file
    itself as a bare state dict."""
    if isinstance(obj.get("model"), dict):
        sd = obj["model"]
    elif isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    else:
        sd = obj
    if not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{path}: not a model checkpoint (no 'model' state dict of tensors inside)")
    return strip_wrapper_prefixes(sd)


def _json_field(metadata: Dict[str, str], key: str, path: str, default: Any) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata field {key!r} is not valid JSON") from None


def preprocessing_from_config(config: CfgNode) -> Dict[str, Any]:
    """The eval preprocessing of ``config`` as plain JSON-able values ('random' interpolation is
    a training augmentation: evaluation uses bicubic, so that is what is recorded)."""
    interpolation = config.DATA.INTERPOLATION
    return {
        "img_size": int(config.DATA.IMG_SIZE),
        "crop_pct": float(config.DATA.CROP_PCT),
        "interpolation": "bicubic" if interpolation == "random" else interpolation,
        "mean": [float(v) for v in config.DATA.MEAN],
        "std": [float(v) for v in config.DATA.STD],
        "crop": bool(config.TEST.CROP),
    }


# ------------------------------------------------------------------------------------ models
@dataclass
class ModelMeta:
    """What a loaded model is, for the tools that use or export it: the file's variant and
    architecture, class names, eval preprocessing, a full config, which weights were loaded."""

    variant: str
    num_classes: int
    class_names: List[str]
    preprocessing: Dict[str, Any]
    config: CfgNode
    weights: str  # 'ema' or 'raw'
    source: str
    epoch: Optional[int] = None
    model_cfg: Dict[str, Any] = field(default_factory=dict)


def load_for_inference(
    path: str, variant: Optional[str] = None, device: str | torch.device = "cpu", use_ema: Optional[bool] = None
) -> Tuple[nn.Module, ModelMeta]:
    """The model ``path`` holds, in eval mode on ``device``, and what the file says about it.

    The architecture comes from the file (custom architectures included), the class count from
    its head; ``use_ema`` as in :meth:`CheckpointRecord.weights`. A bare state dict needs
    ``variant``.
    """
    record = read_checkpoint(path, variant=variant)
    if record.model_name is None:
        raise UserError(f"{path}: the file does not name its variant; pass it explicitly (e.g. --variant moat_0)")
    if record.num_classes is None:
        raise UserError(f"{path}: no classifier weights ({HEAD_WEIGHT!r}) in the file")
    state_dict, which = record.weights(use_ema)
    arch = record.architecture()
    config = _config_of(record)
    # Inference needs none of the training-time options (gradient checkpointing, drop path).
    model = create_moat(record.model_name, cfg=arch.replace(drop_path_rate=0.0), num_classes=record.num_classes)
    load_model_weights(model, state_dict, path if record.kind != "export" else f"{path} ({record.model_name})")
    model.to(device).eval()
    meta = ModelMeta(
        variant=record.model_name,
        num_classes=record.num_classes,
        class_names=record.class_names or [f"class_{i}" for i in range(record.num_classes)],
        preprocessing=preprocessing_from_config(config),
        config=config,
        weights=which,
        source=path,
        epoch=record.epoch,
        model_cfg=arch.to_dict(),
    )
    return model, meta


def _config_of(record: CheckpointRecord) -> CfgNode:
    """A full frozen config for ``record``: its saved one, else today's defaults with what the
    file records (model, classes, preprocessing)."""
    tree: Dict[str, Any] = {"MODEL": {"NAME": record.model_name, "NUM_CLASSES": record.num_classes}}
    if record.config is not None:
        return config_from_dict(config_to_dict(record.config), tree)
    data = {
        cfg_key: record.preprocessing[key]
        for key, cfg_key in (
            ("img_size", "IMG_SIZE"),
            ("crop_pct", "CROP_PCT"),
            ("interpolation", "INTERPOLATION"),
            ("mean", "MEAN"),
            ("std", "STD"),
        )
        if key in record.preprocessing
    }
    tree["DATA"] = data
    if "crop" in record.preprocessing:
        tree["TEST"] = {"CROP": bool(record.preprocessing["crop"])}
    return config_from_dict(tree)


def add_weights_choice(parser: argparse.ArgumentParser, verb: str = "use") -> None:
    """``--ema`` / ``--no-ema`` (``args.use_ema``: True, False, or None for "EMA when present"),
    the choice every tool passes to :func:`load_for_inference`."""
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=None,
                     help=f"{verb} the EMA weights (error if the checkpoint has none)")  # fmt: skip
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", default=None,
                     help=f"{verb} the raw weights (default: EMA when present)")  # fmt: skip


# ------------------------------------------------------------------------------------- writing
def training_checkpoint(
    *,
    model: nn.Module,
    ema: Optional[nn.Module],
    training_state: Dict[str, Any],
    config: CfgNode,
    class_names: List[str],
    position: Position,
    layout: Any,
) -> Dict[str, Any]:
    """The trainer's checkpoint: plain containers and tensors, so ``torch.load(weights_only=True)``
    loads it. ``training_state``: optimizer, lr_scheduler, scaler, rng_state, epoch_loss,
    max_accuracy, tracker_run_ids (the trainer's own state dicts)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        **({"model_ema": ema.state_dict()} if ema is not None else {}),
        **training_state,
        "epoch": position.epoch,
        "batches_done": position.batches_done,
        "epoch_complete": position.epoch_complete,
        "step": position.step,
        "config": config_to_dict(config),
        "class_names": list(class_names),
        "model_name": config.MODEL.NAME,
        # The architecture as data: inference tools rebuild custom architectures from it.
        "model_cfg": model.cfg.to_dict(),
        "world_size": layout.world_size,
        # The data order is a function of SEED and the epoch (the sampler permutes by SEED +
        # epoch); the run has consumed the first samples_done samples of the epoch's global
        # order, which any batch layout whose samples per update divide it continues exactly.
        "data_order": {
            "seed": config.SEED,
            "epoch": position.epoch,
            "batches_done": position.batches_done,
            "batch_size": layout.batch_size,
            "world_size": layout.world_size,
            "accumulation_steps": layout.accumulation_steps,
            "samples_done": position.samples_done,
        },
        "torch_version": str(torch.__version__),
    }


def weights_checkpoint(
    model: nn.Module, model_name: str, class_names: List[str], config_tree: Dict[str, Any], provenance: Dict[str, Any]
) -> Dict[str, Any]:
    """A weights-only checkpoint (converted official weights): ``--pretrained``, predict, export
    and the hub read it; ``provenance`` says where the weights came from and which set they are."""
    return {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "model_name": model_name,
        "model_cfg": model.cfg.to_dict(),
        "class_names": list(class_names),
        "config": config_tree,
        "converted_from": provenance,
    }


def safetensors_metadata(meta: ModelMeta) -> Dict[str, str]:
    """The string-valued metadata :func:`read_checkpoint` reads back from an export."""
    return {
        "format": "pt",
        META_FORMAT: _SAFETENSORS_FORMAT,
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
    """Write ``model``'s weights (BatchNorm statistics included: weights for inference) and
    ``meta`` to ``path``; returns ``path``. ``extra_metadata`` (strings) rides along, e.g. where
    converted weights came from; readers ignore it."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata={**(extra_metadata or {}), **safetensors_metadata(meta)})
    return path


# --------------------------------------------------------------------------------- resume choice
@dataclass
class FolderScan:
    """The checkpoints of a run folder, by training position: ``resumable`` furthest first
    (``last.pth`` first among equals), and the files that cannot resume the run, with why."""

    resumable: List[CheckpointRecord]
    unusable: List[Tuple[str, str]]

    @property
    def newest(self) -> Optional[CheckpointRecord]:
        return self.resumable[0] if self.resumable else None


def scan_run_folder(folder: str) -> FolderScan:
    """Read the position of every ``*.pth`` in ``folder`` (tensors memory-mapped, each file once
    however many hard links it has). File times play no part: a copied or restored folder gives
    its files new times in any order."""
    resumable: List[CheckpointRecord] = []
    unusable: List[Tuple[str, str]] = []
    seen: Dict[Tuple[int, int], CheckpointRecord] = {}
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder)) if os.path.isdir(folder) else []
    for path in paths:
        if not path.endswith(".pth") or not os.path.isfile(path):
            continue
        stat = os.stat(path)
        same = seen.get((stat.st_dev, stat.st_ino))
        if same is not None:  # a hard link of a file read already (best.pth / epoch_N.pth)
            resumable.append(_relinked(same, path))
            continue
        try:
            record = read_checkpoint(path, mmap=True)
        except UserError as e:
            unusable.append((path, str(e)))
            continue
        if not record.resumable:
            unusable.append((path, f"{path}: weights only, not a resumable training checkpoint"))
            continue
        seen[(stat.st_dev, stat.st_ino)] = record
        resumable.append(record)
    names_last = {LAST: 0}
    resumable.sort(key=lambda r: (r.position, -names_last.get(os.path.basename(r.path), 1)), reverse=True)
    return FolderScan(resumable, unusable)


def _relinked(record: CheckpointRecord, path: str) -> CheckpointRecord:
    from dataclasses import replace

    return replace(record, path=path)


def supersede_later_checkpoints(folder: str, position: Optional[Position], log: Callable[[str], None]) -> List[str]:
    """Move the checkpoints of ``folder`` that are further than ``position`` (None: a fresh start,
    every checkpoint this run would write over) into ``superseded-<time>/``: kept, never
    overwritten, and out of auto-resume's sight. For a run restarted from an older point on
    purpose. Returns their new paths."""
    scan = scan_run_folder(folder)
    later = [r for r in scan.resumable if position is None or r.position > position]
    paths = [r.path for r in later]
    if position is None:  # a fresh start also writes over unusable files of its own names
        paths += [p for p, _ in scan.unusable if _is_run_checkpoint_name(os.path.basename(p))]
    if not paths:
        return []
    target = os.path.join(folder, time.strftime("superseded-%Y%m%d-%H%M%S"))
    os.makedirs(target, exist_ok=True)
    moved = []
    for path in paths:
        dst = os.path.join(target, os.path.basename(path))
        shutil.move(path, dst)
        moved.append(dst)
    start = "a fresh start" if position is None else f"this start ({position.describe()})"
    newest = f", the newest at {later[0].position.describe()}" if later else ""
    log(
        f"{len(moved)} checkpoint(s) in {folder} are further along than {start}{newest}: moved to "
        f"{target}/ ({', '.join(os.path.basename(p) for p in moved)}) so that this run does not overwrite them"
    )
    return moved


def _is_run_checkpoint_name(name: str) -> bool:
    return name in (LAST, BEST) or (name.startswith("epoch_") and name.endswith(".pth"))


def resume_path(folder: str, resume: str, auto_resume: bool, log: Any) -> Optional[str]:
    """Where a training run in ``folder`` starts, chosen by training position, never by file
    times: an explicit ``resume`` (checkpoints of the folder that are further along are moved
    aside, kept); else, with ``auto_resume``, the furthest checkpoint of the folder that loads
    (``last.pth`` among equals); else a fresh start. A folder holding checkpoints of which none can
    resume the run is refused in one line: the user decides, nothing is overwritten. ``log`` is a
    logger (``info`` for the choice, ``warning`` for what was skipped or moved)."""
    scan = scan_run_folder(folder)
    if resume:
        record = read_checkpoint(resume, mmap=True)
        newest = scan.newest
        if record.resumable and newest is not None and newest.position > record.position:
            supersede_later_checkpoints(folder, record.position, log.warning)
        return resume
    if not auto_resume:
        supersede_later_checkpoints(folder, None, log.warning)
        return None
    for _, why in scan.unusable:
        log.warning(f"skipping unusable checkpoint: {why}")
    newest = scan.newest
    if newest is None:
        if scan.unusable:
            names = ", ".join(os.path.basename(p) for p, _ in scan.unusable)
            raise UserError(
                f"{folder} holds checkpoints of which none can resume this run ({names}; the log says why): "
                "move them away, resume one explicitly with --resume, or use another --tag / --output"
            )
        return None
    log.info(f"auto-resuming from {newest.path} ({newest.position.describe()})")
    return newest.path


def load_pretrained(
    path: str,
    model: nn.Module,
    use_ema: bool,
    log: Any,
    head: str = "auto",
    class_names: Optional[List[str]] = None,
) -> List[str]:
    """Weights only (the EMA when the file has it and ``use_ema``), the classifier as ``head``
    (MODEL.PRETRAINED_HEAD) says: 'auto' loads it when its shape fits and keeps the model's fresh
    one otherwise; 'drop' always keeps the fresh one; 'map' takes the file's rows of
    ``class_names`` (this run's classes in label order), matched by the names the file records.
    Returns the head keys that start fresh."""
    record = read_checkpoint(path)
    use_ema = use_ema and record.has_ema
    state = dict(record.state_dicts["ema" if use_ema else "model"])
    note = ""
    if head == "auto":
        fresh = load_model_weights(model, state, path, drop_mismatched_head=True)
        if fresh:
            note = f"; dropped the head ({', '.join(fresh)}): its shape differs, it starts fresh"
    else:
        own = _classifier_state(model)
        if head == "drop":
            fresh = list(own)
            state.update(own)
            note = f"; dropped the head ({', '.join(fresh)}): MODEL.PRETRAINED_HEAD drop, it starts fresh"
        elif head == "map":
            fresh = []
            state.update(_mapped_head(record, state, own, class_names or []))
            note = (
                f"; mapped the head: this run's {len(class_names or [])} classes taken by name from the "
                f"{len(record.class_names or [])}-class head"
            )
        else:
            raise ValueError(f"head must be 'auto', 'drop' or 'map', got {head!r}")
        load_model_weights(model, state, path)
    log.info(f"loaded pretrained {'EMA' if use_ema else 'model'} weights from {path}{note}")
    return fresh


def _classifier_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's classifier (``get_classifier()``) parameters as they are now, by state-dict key."""
    classifier = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is classifier)
    return {f"{prefix}.{name}": p.detach().clone() for name, p in classifier.named_parameters()}


def _mapped_head(
    record: CheckpointRecord, state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], class_names: List[str]
) -> Dict[str, torch.Tensor]:
    """The rows of ``state``'s classifier whose class names (``record.class_names``) are
    ``class_names``, in that order: an ImageNet-22K head cut down to the ImageNet-1K classes.
    A name the file lacks, or a file without names, is a one-line ``UserError``."""
    path, saved = record.path, record.class_names
    if not saved:
        raise UserError(
            f"{path}: records no class names, which MODEL.PRETRAINED_HEAD map needs to match the head's rows; "
            "use MODEL.PRETRAINED_HEAD drop (a fresh head)"
        )
    row_of: Dict[str, int] = {}
    for i, name in enumerate(saved):
        row_of.setdefault(name, i)
    missing = [name for name in class_names if name not in row_of]
    if missing:
        raise UserError(
            f"{path}: MODEL.PRETRAINED_HEAD map: {len(missing)} of this run's {len(class_names)} classes are not "
            f"among the checkpoint's {len(saved)} (first: {', '.join(missing[:3])}); use MODEL.PRETRAINED_HEAD drop"
        )
    rows = torch.tensor([row_of[name] for name in class_names], dtype=torch.long)
    mapped = {}
    for key, tensor in own.items():
        source = state.get(key)
        if source is None or source.shape[0] != len(saved) or source.shape[1:] != tensor.shape[1:]:
            found = "no such tensor" if source is None else f"shape {tuple(source.shape)}"
            raise UserError(
                f"{path}: cannot map {key} ({found}) onto this model's {tuple(tensor.shape)} "
                f"for {len(saved)} recorded classes"
            )
        if tensor.shape[0] != len(class_names):
            raise UserError(
                f"MODEL.PRETRAINED_HEAD map: the model's head has {tensor.shape[0]} classes, "
                f"the data {len(class_names)}"
            )
        mapped[key] = source.index_select(0, rows)
    return mapped


__all__ = [
    "BEST",
    "FORMAT_VERSION",
    "LAST",
    "CheckpointRecord",
    "FolderScan",
    "ModelMeta",
    "Position",
    "add_weights_choice",
    "load_for_inference",
    "foreign_model",
    "load_pretrained",
    "preprocessing_from_config",
    "read_checkpoint",
    "resume_path",
    "safetensors_metadata",
    "save_safetensors",
    "scan_run_folder",
    "supersede_later_checkpoints",
    "training_checkpoint",
    "weights_checkpoint",
]
