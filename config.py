"""Configuration tree for the MOAT trainer (yacs), in the shape of the Swin-Transformer trainer.

Precedence, lowest first: the defaults below, the YAML file given by ``--cfg`` (and the files
named by its ``BASE:`` list, resolved relative to it), ``--opts KEY VALUE ...``, then the named
command-line flags (``--batch-size`` etc.), as in the Swin trainer. The result is frozen before
anything is built, so no module can change it as a side effect. Unknown keys and values of the
wrong type are errors, never ignored.

A YAML file of the unofficial MOAT port or of the Swin trainer (or the config.json either saves) is
read through ``migration.py``: each of its keys mapped to this project's, ignored or refused, and
what was done collected in ``LoadedConfig.notes`` for the run's log.

Each key is declared once, beside its comment: a plain default, or ``one_of(...)`` /
``number(...)`` / ``pair(...)`` with what it accepts and what null means for it; the checks
(``validate_config``), the errors and the flags' choices (``choices_of``) all derive from that
declaration. The ``MODEL.MOAT`` keys are generated from the fields of ``models.MoatCfg`` (their
comments are the fields' docs); null, their default, keeps the variant's value.
"""

from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import yaml
from yacs.config import CfgNode as CN

from migration import Migration, explain, legacy_flag_values, migrate_tree
from models import moat_cfg_from_config
from models.config import FIELD_DOCS
from utils.errors import ConfigError

_NULL_IS_AN_ERROR = object()


@dataclass(frozen=True)
class Rule:
    """What one key accepts beyond its type (which yacs checks against the default): a set of
    ``choices``, or a range, or list ``lengths``; and what null (YAML ``null``, ``None``) means
    for it, when anything."""

    choices: Tuple[Any, ...] = ()
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    lengths: Tuple[int, ...] = ()
    null: Any = _NULL_IS_AN_ERROR
    note: str = ""  # added to the error, e.g. what 0 means

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is not accepted (the ``accepted: ...`` half of the error), or None."""
        if self.choices and value not in self.choices:
            return "accepted: " + ", ".join(repr(c) for c in self.choices)
        if self.lengths and (not isinstance(value, (list, tuple)) or len(value) not in self.lengths):
            return f"needs {' or '.join(map(str, self.lengths))} values" + (f" ({self.note})" if self.note else "")
        if self.low is not None or self.high is not None:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    return "must be a number: " + self.range_text()
                if (self.low is not None and (v < self.low or (self.low_open and v == self.low))) or (
                    self.high is not None and (v > self.high or (self.high_open and v == self.high))
                ):
                    return self.range_text()
        return None

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            brackets = ("(" if self.low_open else "[", ")" if self.high_open else "]")
            text = f"must be in {brackets[0]}{self.low:g}, {self.high:g}{brackets[1]}"
        elif self.low is not None:
            text = f"must be {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"must be {'<' if self.high_open else '<='} {self.high:g}"
        return text + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class _Declared:
    """A default and its rule, in the tree until the tree is sealed (``_seal``)."""

    default: Any
    rule: Rule


def one_of(*choices: Any, null: Any = _NULL_IS_AN_ERROR) -> _Declared:
    """A key taking one of ``choices``; the first is the default."""
    return _Declared(choices[0], Rule(choices=tuple(choices), null=null))


def number(default: Any, low=None, high=None, *, low_open=False, high_open=False, null=_NULL_IS_AN_ERROR, note=""):
    """A number in a range (ends included unless ``*_open``)."""
    return _Declared(default, Rule(low=low, high=high, low_open=low_open, high_open=high_open, null=null, note=note))


def values(
    default: list, lengths: Tuple[int, ...], low=None, high=None, *, low_open=False, null=_NULL_IS_AN_ERROR, note=""
):
    """A list of ``lengths`` numbers, each in the range."""
    return _Declared(default, Rule(lengths=lengths, low=low, high=high, low_open=low_open, null=null, note=note))


def text(default: str = "") -> _Declared:
    """A string where null means the empty string (unset: a path, a name, a policy left out)."""
    return _Declared(default, Rule(null=""))


class _Node(CN):
    """A node of the defaults tree while it is declared: its values may be ``_Declared``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, _Declared):
            self[name] = value
        else:
            super().__setattr__(name, value)


_C = _Node()

# YAML files this one inherits from (paths relative to the file that names them).
_C.BASE = [""]

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = _Node()
# Images per process per micro-step (the global batch is this x world size x accumulation steps).
_C.DATA.BATCH_SIZE = number(128, low=1)
# Root of the dataset: holds TRAIN_SPLIT/ and VAL_SPLIT/ class folders.
_C.DATA.DATA_PATH = text("")
# 'imagenet' (ImageNet-1K, 1000 classes expected), 'imagenet22k' (ImageNet-22K, the fall 2011
# release: 21,841 classes expected; 14M images, so DATA.FORMAT shards is recommended) or
# 'imagefolder' (any class-folder tree).
_C.DATA.DATASET = one_of("imagenet", "imagefolder", "imagenet22k")
# Sub-folder names of the two splits under DATA_PATH.
_C.DATA.TRAIN_SPLIT = "train"
_C.DATA.VAL_SPLIT = "val"
# Validate on N images of every class held out of the train split (never trained on) instead of
# reading VAL_SPLIT, for data that has no validation split (ImageNet-22K). Which images: per
# class, drawn by a generator seeded with the class's name alone, so the same ones in every run,
# format and process count; a class keeps at least one training image. 0 = read VAL_SPLIT.
_C.DATA.VAL_HOLDOUT = number(0, low=0, null=0, note="0 = read DATA.VAL_SPLIT")
# Input resolution (square); must be divisible by the model's total stride (32 for every registered
# variant) and each attention window must divide its stage's feature map at this size.
_C.DATA.IMG_SIZE = number(224, low=1)
# Resampling used by the train and eval transforms: 'bicubic', 'bilinear' or 'random'.
_C.DATA.INTERPOLATION = one_of("bicubic", "bilinear", "random")
# Eval transform: resize the short side to IMG_SIZE / CROP_PCT, then center-crop IMG_SIZE
# (0.875 gives the classic 256 -> 224). 1.0 resizes the short side to IMG_SIZE and center-crops
# the long side (no margin); TEST.CROP False squashes the whole image instead.
_C.DATA.CROP_PCT = number(0.875, low=0.0, high=1.0, low_open=True)
# Per-channel normalisation (ImageNet mean/std, as the authors train).
_C.DATA.MEAN = values([0.485, 0.456, 0.406], (3,), note="one per RGB channel")
_C.DATA.STD = values([0.229, 0.224, 0.225], (3,), low=0.0, low_open=True, note="one per RGB channel, each > 0")
# Pin host memory in the loaders (ignored on CPU-only runs).
_C.DATA.PIN_MEMORY = True
# Normalise (and randomly erase) batches on the device: the loader workers hand over uint8 images
# and the device does the float conversion, normalisation and random erasing, overlapped with
# the previous step on CUDA (data/device_loader.py). 'auto' = on for CUDA, off on CPU; 'on';
# 'off' (the float path: everything in the workers, bit-identical resume).
_C.DATA.NORMALIZE_ON_DEVICE = one_of("auto", "on", "off")
# Loader worker processes per training process.
_C.DATA.NUM_WORKERS = number(8, low=0)
# Skip (count and log once) unreadable or truncated images instead of failing fast; for zips and
# shards also map lines naming a missing member, samples without or with a bad label, and samples
# cut off by a truncated shard (counted and logged at start-up).
_C.DATA.SKIP_BAD_IMAGES = False
# How the images are stored under DATA_PATH (README "Data formats"): 'folder' (TRAIN_SPLIT/ and
# VAL_SPLIT/ class folders), 'zip' (Swin's layout: <split>.zip + <split>_map.txt, --zip) or
# 'shards' (WebDataset tar shards + a shard index, see TRAIN_SHARDS).
_C.DATA.FORMAT = one_of("folder", "zip", "shards")
# FORMAT 'zip' only, Swin's --cache-mode: 'no' reads the zip on demand, 'part' keeps this rank's
# 1/world-size of the train images in RAM and samples only those, 'full' keeps all of them on
# every rank. Validation caches its own part unless 'no'.
_C.DATA.CACHE_MODE = one_of("part", "no", "full")
# FORMAT 'shards' only: the shard index JSON (tools/make_shards.py writes <split>.json), a folder
# of .tar shards, or a pattern ('train-{000000..000146}.tar', 'train-*.tar'), relative to
# DATA_PATH unless absolute. Empty: DATA_PATH/<split>.json, else DATA_PATH/<split>-*.tar.
_C.DATA.TRAIN_SHARDS = text("")
_C.DATA.VAL_SHARDS = text("")
# Text file of class names in label order, one per line ('' = the data's own classes). Label k is
# line k in every format; classes the map does not name are skipped (a subset trains without
# copying the data); MODEL.NUM_CLASSES must equal the number of names. The val split may hold any
# part of the map, the train split every class that val holds.
_C.DATA.CLASS_MAP = text("")

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = _Node()
# Model family; only 'moat' exists.
_C.MODEL.TYPE = one_of("moat")
# Variant: moat_0..moat_4, tiny_moat_0..tiny_moat_3, each also as <name>_no_pe; or a new name for
# an architecture defined by the MODEL.MOAT keys. Outputs go to OUTPUT/NAME/TAG.
_C.MODEL.NAME = "moat_0"
# Weights-only initialisation (a checkpoint of ours or a safetensors file); a head of another
# shape is dropped. Resolution-agnostic: the relative-bias tables resize themselves.
_C.MODEL.PRETRAINED = text("")
# From a checkpoint that holds EMA weights, initialise from the EMA (the better model after a full
# run, and what the authors released); False takes the raw weights.
_C.MODEL.PRETRAINED_EMA = True
# The classifier of MODEL.PRETRAINED: 'auto' loads it when its shape fits and starts a fresh one
# otherwise; 'drop' always starts a fresh one (MaxViT's fine-tunes do, even on the same classes);
# 'map' takes the checkpoint's rows of this run's classes, matched by class name (the 1,000
# ImageNet-1K synsets of a 21,841-class ImageNet-22K head), an error when a name is missing.
_C.MODEL.PRETRAINED_HEAD = one_of("auto", "drop", "map")
# Full training state to resume from; empty means auto-resume from the output folder.
_C.MODEL.RESUME = text("")
# Number of classes of the head; checked against the number of class folders in the data.
_C.MODEL.NUM_CLASSES = number(1000, low=1)
# Dropout before the classifier.
_C.MODEL.DROP_RATE = number(0.0, low=0.0, high=1.0, high_open=True, null=0.0)
# Stochastic-depth rate; null keeps the variant's published rate.
_C.MODEL.DROP_PATH_RATE = number(None, low=0.0, high=1.0, high_open=True, null=None)
# Label smoothing (used when Mixup/CutMix are off; with them, folded into the soft targets).
_C.MODEL.LABEL_SMOOTHING = number(0.1, low=0.0, high=1.0, high_open=True, null=0.0)
# Architecture: one key per field of models.MoatCfg, named after it in upper case (the drop-path
# rate is MODEL.DROP_PATH_RATE above), with the field's documentation as its comment
# (``describe_key``, docs/architecture.md). null, the default, keeps the value of the registered
# variant MODEL.NAME; a value overrides it. A MODEL.NAME that is not a registered variant is a new
# architecture: STEM_DIMS, DEPTHS, DIMS and STAGE_TYPES are then required and every other key
# left null takes the official MOAT value. README "Custom architectures".
_C.MODEL.MOAT = _Node()
MOAT_KEYS = {f"MODEL.MOAT.{name.upper()}": name for name in FIELD_DOCS if name != "drop_path_rate"}
for _key in MOAT_KEYS:
    _C.MODEL.MOAT[_key.rsplit(".", 1)[1]] = _Declared(None, Rule(null=None))
# CUDA training: run each MBConv's depthwise conv -> BatchNorm -> GELU through fused Triton
# kernels (models/fused_depthwise.py; same function, to float rounding). Off until a GPU
# benchmark shows a gain (docs/benchmarks.md).
_C.MODEL.FUSED_DEPTHWISE = False

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = _Node()
_C.TRAIN.START_EPOCH = number(0, low=0)
# The defaults below are the ImageNet-1K recipe at 224 (docs/recipes.md gives each value's source).
_C.TRAIN.EPOCHS = number(300, low=1)
# Linear warmup, in epochs: it keeps its share of the run at any total batch (32 epochs = 9,984
# updates of 4,096 images on ImageNet-1K, the official 10,000 updates to within 0.2%).
_C.TRAIN.WARMUP_EPOCHS = number(32, low=0, null=0)
# Linear warmup in optimizer updates (after accumulation); when > 0 it replaces WARMUP_EPOCHS.
# A count of updates, so it is exact at one total batch only: at another batch the same images
# take another number of updates (WARMUP_EPOCHS keeps them). 0 = use WARMUP_EPOCHS.
_C.TRAIN.WARMUP_STEPS = number(0, low=0, null=0, note="0 = use TRAIN.WARMUP_EPOCHS")
_C.TRAIN.WEIGHT_DECAY = number(0.05, low=0.0, null=0.0)
# Learning rates for a total batch of 512; scaled linearly by the actual total batch / 512
# (3.75e-4 per 512 = 3e-3 at the recipe's batch of 4,096).
_C.TRAIN.BASE_LR = number(3.75e-4, low=0.0, low_open=True)
_C.TRAIN.WARMUP_LR = number(0.0, low=0.0, null=0.0)
_C.TRAIN.MIN_LR = number(1.25e-6, low=0.0, null=0.0)
# Clip the global gradient norm to this value; 0 or null disables clipping (the norm is still logged).
_C.TRAIN.CLIP_GRAD = number(1.0, low=0.0, null=0.0)
# Resume from OUTPUT/.../last when it exists and MODEL.RESUME is empty.
_C.TRAIN.AUTO_RESUME = True
# Micro-steps per optimizer update (gradient accumulation).
_C.TRAIN.ACCUMULATION_STEPS = number(1, low=1, null=1)
# Re-compute blocks in backward to save memory (gradient checkpointing).
_C.TRAIN.USE_CHECKPOINT = False
# Compile the training forward and backward with torch.compile (validation stays eager).
_C.TRAIN.COMPILE = False
# torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs: less launch overhead for small
# models on GPU), 'max-autotune' (searches kernel configs: slow first steps, fastest later) or
# 'max-autotune-no-cudagraphs'.
_C.TRAIN.COMPILE_MODE = one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# CUDA: warn about every host-device sync inside training steps (log steps and saves excepted);
# a debugging aid, each sync stalls the host until the GPU drains.
_C.TRAIN.SYNC_DEBUG = False
# Also save a resumable checkpoint every N optimizer steps inside an epoch; 0 disables.
_C.TRAIN.SAVE_STEPS = number(0, low=0, null=0, note="0 disables")
# Layer-wise learning-rate decay for fine-tuning (1.0 disables): the head gets the full LR,
# each earlier block the previous one's LR times this factor.
_C.TRAIN.LAYER_DECAY = number(1.0, low=0.0, high=1.0, low_open=True, null=1.0)
# Train only the head (linear probing); the backbone is frozen and kept in eval mode.
_C.TRAIN.FREEZE_BACKBONE = False

_C.TRAIN.LR_SCHEDULER = _Node()
# 'cosine', 'linear' or 'step'; all with linear warmup, stepped per optimizer update.
_C.TRAIN.LR_SCHEDULER.NAME = one_of("cosine", "linear", "step")
# Epoch interval between decays (step scheduler only).
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = number(30, low=0.0, low_open=True)
# LR multiplier at each decay (step scheduler only).
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = number(0.1, low=0.0)

_C.TRAIN.OPTIMIZER = _Node()
# 'adamw' or 'sgd'.
_C.TRAIN.OPTIMIZER.NAME = one_of("adamw", "sgd")
_C.TRAIN.OPTIMIZER.EPS = number(1e-8, low=0.0, low_open=True)
_C.TRAIN.OPTIMIZER.BETAS = values([0.9, 0.999], (2,), low=0.0, high=1.0)
# SGD momentum and Nesterov.
_C.TRAIN.OPTIMIZER.MOMENTUM = number(0.9, low=0.0, high=1.0)
_C.TRAIN.OPTIMIZER.NESTEROV = True

_C.TRAIN.EMA = _Node()
# Keep an exponential moving average of the weights and validate it each epoch.
_C.TRAIN.EMA.ENABLE = True
_C.TRAIN.EMA.DECAY = number(0.9999, low=0.0, high=1.0, high_open=True)
# How the decay ramps up over the first updates (t = optimizer updates so far, 1 at the first):
# 'tf' as TensorFlow's ExponentialMovingAverage given the step count, min(DECAY, (1 + t) / (10 + t)),
# averaging from the initial weights (the recipes); 'timm' timm's warmup, min(DECAY, 1 - t^(-2/3)),
# a copy at the first update; 'none' a copy at the first update, then DECAY. Replaces
# TRAIN.EMA.WARMUP (True = 'timm', False = 'none'), which older files still say.
_C.TRAIN.EMA.RAMP = one_of("tf", "timm", "none")

# Which number a run reports (the log's last line, summary.csv's reported_top1, --eval's "reported").
_C.TRAIN.REPORT = _Node()
# 'last': the top-1 of the final epoch's checkpoint (last.pth), as the MOAT paper reports; 'best':
# the highest top-1 of any epoch (best.pth). best.pth is written either way.
_C.TRAIN.REPORT.CHECKPOINT = one_of("last", "best")
# Whose top-1 it is, and whose top-1 chooses best.pth: 'ema' (the EMA weights, the model's when
# TRAIN.EMA.ENABLE is False) or 'model' (the raw weights); both are validated every epoch.
# Replaces TRAIN.EMA.SELECT_BEST (True = 'ema', False = 'model'), which older files still say.
_C.TRAIN.REPORT.WEIGHTS = one_of("ema", "model")

# -----------------------------------------------------------------------------
# Augmentation
# -----------------------------------------------------------------------------
_C.AUG = _Node()
# Color jitter factor (used when AUTO_AUGMENT is empty).
_C.AUG.COLOR_JITTER = number(0.4, low=0.0, null=0.0)
# timm auto-augment policy string; empty (or null) disables it. The recipe's RandAugment, 2 ops at
# magnitude 15: timm clips magnitudes to 10 unless 'mmax' raises the cap.
_C.AUG.AUTO_AUGMENT = text("rand-m15-n2-mmax15")
# Scale and aspect-ratio ranges of the train random-resized crop (timm's defaults).
_C.AUG.SCALE = values([0.08, 1.0], (2,), low=0.0, high=1.0, note="min, max in (0, 1]")
_C.AUG.RATIO = values([0.75, 1.3333333333333333], (2,), low=0.0, note="min, max > 0")
# Random erasing probability, mode and count.
_C.AUG.REPROB = number(0.0, low=0.0, high=1.0, null=0.0)
_C.AUG.REMODE = one_of("pixel", "const", "rand")
_C.AUG.RECOUNT = number(1, low=1)
# Mixup alpha (0 disables), CutMix alpha (0 disables), CutMix min/max ratio (empty = unused).
_C.AUG.MIXUP = number(0.8, low=0.0, null=0.0)
_C.AUG.CUTMIX = number(0.0, low=0.0, null=0.0)
_C.AUG.CUTMIX_MINMAX = values([], (0, 2), low=0.0, high=1.0, null=[], note="empty, or min and max in [0, 1]")
# Probability of applying Mixup or CutMix to a batch, and of switching to CutMix when both on.
_C.AUG.MIXUP_PROB = number(1.0, low=0.0, high=1.0)
_C.AUG.MIXUP_SWITCH_PROB = number(0.5, low=0.0, high=1.0)
# 'batch', 'pair' or 'elem'.
_C.AUG.MIXUP_MODE = one_of("batch", "pair", "elem")

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = _Node()
# Eval transform: True resizes the short side (see DATA.CROP_PCT) and center-crops a square;
# False resizes the whole image to IMG_SIZE x IMG_SIZE, changing its aspect ratio (no crop).
_C.TEST.CROP = True

# -----------------------------------------------------------------------------
# Experiment trackers (optional: neither package is a requirement; asking for one that is not
# installed logs a warning and the run goes on). The tracker's run id is saved in the
# checkpoints, so a resumed run continues the same tracker run.
# -----------------------------------------------------------------------------
_C.TRACKING = _Node()
# Log per-step and per-epoch metrics to Weights & Biases (--log-wandb; `pip install wandb`).
_C.TRACKING.WANDB = False
# wandb project; "" lets wandb decide (WANDB_PROJECT, else its default project).
_C.TRACKING.WANDB_PROJECT = text("")
# wandb entity (user or team); "" lets wandb decide (WANDB_ENTITY, else the logged-in user).
_C.TRACKING.WANDB_ENTITY = text("")
# wandb mode: 'online', 'offline' (logs stay in OUTPUT/.../wandb; `wandb sync` uploads them),
# 'disabled', or "" for wandb's own default (WANDB_MODE, else online).
_C.TRACKING.WANDB_MODE = one_of("", "online", "offline", "disabled", null="")
# Log per-step and per-epoch metrics to MLflow (--log-mlflow; `pip install mlflow`).
_C.TRACKING.MLFLOW = False
# MLflow tracking URI (e.g. http://host:5000, file:./mlruns); "" lets MLflow decide
# (MLFLOW_TRACKING_URI, else ./mlruns).
_C.TRACKING.MLFLOW_TRACKING_URI = text("")
# MLflow experiment name; "" uses MLflow's default experiment.
_C.TRACKING.MLFLOW_EXPERIMENT = text("")

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Mixed precision: 'auto' (CUDA: bf16 where supported, else fp16; CPU: bf16 only with AMX, where it
# trains faster than fp32, else off), 'off', 'fp16' or 'bf16'.
_C.AMP = one_of("auto", "off", "fp16", "bf16")
# Keep the model and its inputs in channels_last (NHWC) memory: the fast layout of oneDNN's and
# cuDNN's convolutions; MOAT-0 trains 2.3x faster on CPU at 224 px (docs/benchmarks.md). Only the
# strides change: outputs match NCHW to float rounding and checkpoints load in either layout.
_C.CHANNELS_LAST = True
# NVIDIA apex opt level: O1 or O2 need apex installed; O0 is full precision, the same as AMP 'off'
# (read as that, apex or not); empty (or null) means torch.amp (AMP).
_C.AMP_OPT_LEVEL = one_of("", "O0", "O1", "O2", null="")
# Root of all outputs; a run writes to OUTPUT/MODEL.NAME/TAG.
_C.OUTPUT = "output"
_C.TAG = "default"
# Keep an epoch checkpoint every SAVE_FREQ epochs, the newest KEEP_CHECKPOINTS of them.
_C.SAVE_FREQ = number(1, low=1)
_C.KEEP_CHECKPOINTS = number(3, low=0)
# Log every PRINT_FREQ steps.
_C.PRINT_FREQ = number(10, low=1)
_C.SEED = number(0, low=0)
# 'auto' (CUDA when available), 'cuda' or 'cpu'.
_C.DEVICE = one_of("auto", "cuda", "cpu")


def _seal(node: CN, prefix: str = "") -> Dict[str, Rule]:
    """Replace every declared value of the tree by its default; returns each leaf's rule (a
    plain default gets the plain rule: its type only, and null is an error)."""
    rules: Dict[str, Rule] = {}
    for name in list(node):
        key, value = f"{prefix}{name}", node[name]
        if isinstance(value, CN):
            rules.update(_seal(value, key + "."))
        elif isinstance(value, _Declared):
            dict.__setitem__(node, name, value.default)
            rules[key] = value.rule
        elif key != "BASE":
            rules[key] = Rule()
    return rules


RULES: Dict[str, Rule] = _seal(_C)
_C = CN(_C)  # from here on a plain yacs tree


def choices_of(key: str) -> Tuple[Any, ...]:
    """The values ``key`` accepts (for a flag's ``choices``), without the empty 'unset' one."""
    return tuple(c for c in RULES[key].choices if c != "")


def describe_key(key: str) -> str:
    """What a key is for: its ``MoatCfg`` field's documentation for the MODEL.MOAT keys."""
    return FIELD_DOCS[MOAT_KEYS[key]] if key in MOAT_KEYS else ""


# Keys of older versions that described a launch (--eval, --throughput, the launcher's rank)
# rather than the experiment; a saved config.yaml that still has them loads without them.
_RETIRED_KEYS = ("EVAL_MODE", "THROUGHPUT_MODE", "LOCAL_RANK")

# Keys another key replaced: old key -> (new key, {old value: new value}). Files, saved
# config.yaml files and --opts that still name the old key load with the same meaning.
_RENAMED_KEYS = {
    "TRAIN.EMA.WARMUP": ("TRAIN.EMA.RAMP", {True: "timm", False: "none"}),
    "TRAIN.EMA.SELECT_BEST": ("TRAIN.REPORT.WEIGHTS", {True: "ema", False: "model"}),
}

# argparse destination of each named flag -> the config key it sets.
_FLAG_KEYS = {
    "batch_size": "DATA.BATCH_SIZE",
    "data_path": "DATA.DATA_PATH",
    "dataset": "DATA.DATASET",
    "data_format": "DATA.FORMAT",
    "cache_mode": "DATA.CACHE_MODE",
    "class_map": "DATA.CLASS_MAP",
    "pretrained": "MODEL.PRETRAINED",
    "resume": "MODEL.RESUME",
    "accumulation_steps": "TRAIN.ACCUMULATION_STEPS",
    "use_checkpoint": "TRAIN.USE_CHECKPOINT",
    "compile": "TRAIN.COMPILE",
    "sync_debug": "TRAIN.SYNC_DEBUG",
    "channels_last": "CHANNELS_LAST",
    "amp": "AMP",
    "amp_opt_level": "AMP_OPT_LEVEL",
    "output": "OUTPUT",
    "tag": "TAG",
    "seed": "SEED",
    "device": "DEVICE",
    "log_wandb": "TRACKING.WANDB",
    "log_mlflow": "TRACKING.MLFLOW",
}


def _upgrade_unset_spellings(tree: dict) -> dict:
    """Older files spelt an unset architecture key -1, [] or "" (and the variant's drop-path rate
    as a negative number); today that is null. Returns the tree with those values as None."""
    model = tree.get("MODEL")
    if not isinstance(model, dict):
        return tree
    moat = model.get("MOAT")
    if isinstance(moat, dict):
        for name, value in list(moat.items()):
            if value == -1 or value == [] or value == "" or value == -1.0:
                moat[name] = None
    rate = model.get("DROP_PATH_RATE")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate < 0:
        model["DROP_PATH_RATE"] = None
    return tree


def _renamed(key: str, value: Any, source: str) -> Tuple[str, Any]:
    """The successor of an old ``key`` (``_RENAMED_KEYS``) and what ``value`` means there."""
    new_key, meanings = _RENAMED_KEYS[key]
    if not isinstance(value, bool):
        accepted = ", ".join(repr(v) for v in meanings)
        raise ConfigError(f"{source}: invalid {key}={value!r}: accepted: {accepted} (or use {new_key})")
    return new_key, meanings[value]


def _upgrade_renamed_keys(tree: dict, source: Optional[str]) -> dict:
    """``tree`` (nested dicts) with each old key of ``_RENAMED_KEYS`` replaced by its successor.
    ``source`` names the file in errors (an old key with a value it never took, or an old and a
    new key that disagree); None reads leniently (a saved config: the new key wins)."""
    for old in _RENAMED_KEYS:
        *parents, leaf = old.split(".")
        node: Any = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        try:
            new_key, meaning = _renamed(old, value, source or "config")
        except ConfigError:
            if source is None:
                continue
            raise
        *parents, leaf = new_key.split(".")
        target = tree
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                break
        else:
            if leaf not in target:
                target[leaf] = meaning
            elif target[leaf] != meaning and source is not None:
                raise ConfigError(
                    f"{source}: {old}: {value} means {new_key} {meaning!r}, but {new_key} is {target[leaf]!r}: "
                    f"keep {new_key} only"
                )
    return tree


def _as_declared_value(key: str, value: Any) -> Any:
    """An int given for a float key as that float (yacs would refuse ``CLIP_GRAD: 5``)."""
    try:
        default = get_key(_C, key)
    except KeyError:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _as_declared(tree: dict, prefix: str = "") -> dict:
    """``_as_declared_value`` for every leaf of a nested ``tree``."""
    return {
        k: _as_declared(v, f"{prefix}{k}.") if isinstance(v, dict) else _as_declared_value(f"{prefix}{k}", v)
        for k, v in tree.items()
    }


def _read_config_file(cfg_file: str, inherited: Optional[str] = None) -> List[Tuple[str, dict, Optional[Migration]]]:
    """``(file, tree of this project's keys, how it was migrated)`` for ``cfg_file`` and the
    files of its ``BASE`` list, those first. A file of the MOAT port or of the Swin trainer is
    read through ``migration.migrate_tree`` (its keys mapped, ignored or refused); ``inherited``
    is the trainer of the files that name it in their BASE."""
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"config file not found: {cfg_file}")
    try:
        with open(cfg_file, "r") as f:
            yaml_cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{cfg_file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(yaml_cfg, dict):
        raise ConfigError(f"{cfg_file}: expected a mapping of config keys at the top level")
    chain: List[Tuple[str, dict, Optional[Migration]]] = []
    bases = yaml_cfg.pop("BASE", None) or [""]
    for base in bases:
        if base:
            chain += _read_config_file(os.path.join(os.path.dirname(cfg_file), base), inherited)
    bases_trainer = next((m.trainer for _, _, m in reversed(chain) if m is not None), None)
    migrated = migrate_tree(yaml_cfg, cfg_file, bases_trainer or inherited)
    if migrated is not None:
        tree = dict(migrated.tree)
    else:
        tree = {k: v for k, v in yaml_cfg.items() if k not in _RETIRED_KEYS}
        tree = _upgrade_renamed_keys(_upgrade_unset_spellings(tree), cfg_file)
    tree["BASE"] = bases  # as yacs merges it: the config keeps the last file's list
    chain.append((cfg_file, tree, migrated))
    return chain


def _merge_chain(config: CN, chain: List[Tuple[str, dict, Optional[Migration]]]) -> None:
    """Merge the trees of ``_read_config_file`` into a defrosted ``config``, in order."""
    for path, tree, migrated in chain:
        try:
            config.merge_from_other_cfg(CN(_as_declared(_upgrade_unset_spellings(copy.deepcopy(tree)))))
        except (KeyError, ValueError, AssertionError) as e:
            message = _yacs_message(e)
            if migrated is not None and "Non-existent" in message:
                message += f" (a key of neither this project nor {migrated.trainer}: docs/migrating.md)"
            raise ConfigError(f"{path}: {message}") from None


def _update_config_from_file(config: CN, cfg_file: str) -> List[Migration]:
    """Merge ``cfg_file`` into ``config``, its ``BASE`` files first; returns how the files of
    other trainers among them were read."""
    chain = _read_config_file(cfg_file)
    config.defrost()
    _merge_chain(config, chain)
    config.freeze()
    return [m for _, _, m in chain if m is not None]


def migrated_config_tree(cfg_file: str) -> Tuple[dict, List[Migration]]:
    """``cfg_file`` and its BASE files merged into one tree of this project's keys (a config file
    of the MOAT port or the Swin trainer read as this project's), and how each was read. The tree
    is checked the way ``--cfg`` checks a file (``tools/migrate_config.py`` writes it)."""
    chain = _read_config_file(cfg_file)
    migrations = [m for _, _, m in chain if m is not None]
    config = _C.clone()
    _merge_chain(config, chain)
    try:
        validate_config(config)
    except ConfigError as e:
        raise ConfigError(explain(str(e), migrations)) from None
    merged: dict = {}
    for _, tree, _ in chain:
        tree = copy.deepcopy({k: v for k, v in tree.items() if k != "BASE"})
        _merge_into(merged, _as_declared(_upgrade_unset_spellings(tree)))
    return merged, migrations


def _merge_into(tree: dict, other: dict) -> None:
    """Deep-merge ``other`` into ``tree`` (yacs' order: ``other``'s values win)."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge_into(tree[key], value)
        else:
            tree[key] = copy.deepcopy(value)


def _yacs_message(e: Exception) -> str:
    msg = e.args[0] if e.args else str(e)
    return str(msg).replace("\n", " ")


@dataclass(frozen=True)
class LoadedConfig:
    """A frozen config and what loading it has to tell the run's log (how the files and flags of
    other trainers were read); main.py logs the notes once its logger exists."""

    config: CN
    notes: Tuple[str, ...] = ()


def load_config(args: argparse.Namespace) -> LoadedConfig:
    """Defaults, then ``--cfg``, ``--opts`` and the named flags (``update_config``), frozen."""
    config = _C.clone()
    notes = update_config(config, args)
    return LoadedConfig(config, tuple(notes))


def update_config(config: CN, args: argparse.Namespace) -> List[str]:
    """Apply ``--cfg``, ``--opts`` and the named flags to ``config`` (in that order); returns the
    notes to log (``LoadedConfig.notes``)."""
    migrations = _update_config_from_file(config, args.cfg)
    config.defrost()
    if getattr(args, "opts", None):
        if len(args.opts) % 2:
            raise ConfigError(f"--opts needs KEY VALUE pairs, got an odd number of items: {args.opts}")
        pairs = [(key, CN._decode_cfg_value(value)) for key, value in zip(args.opts[::2], args.opts[1::2])]
        pairs = [_renamed(key, value, "--opts") if key in _RENAMED_KEYS else (key, value) for key, value in pairs]
        pairs = [(key, _as_declared_value(key, value)) for key, value in pairs]
        try:
            config.merge_from_list([item for pair in pairs for item in pair])
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"--opts: {_yacs_message(e)}") from None
        _upgrade_unset_spellings(config)

    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:  # unset flags (all default to None) leave the config alone
            set_key(config, key, value)
    legacy, flag_notes = legacy_flag_values(args)
    for key, value in legacy.items():
        set_key(config, key, value)

    try:
        validate_config(config)
    except ConfigError as e:
        raise ConfigError(explain(str(e), migrations)) from None
    config.freeze()
    return [line for m in migrations for line in m.log_lines()] + flag_notes


def validate_config(config: CN) -> None:
    """Reject values no run could use, naming the key and what it accepts: each key against its
    declared rule (null becomes what the rule says it means, or is an error), then the checks
    that involve several keys, then the architecture. ``config`` must be defrosted."""
    for key, rule in RULES.items():
        value = get_key(config, key)
        if value is None:
            if rule.null is _NULL_IS_AN_ERROR:
                default = get_key(_C, key)
                raise ConfigError(f"invalid {key}=None: null is not accepted here (the default is {default!r})")
            set_key(config, key, rule.null)
            continue
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"invalid {key}={value!r}: {problem}")

    def check(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            raise ConfigError(f"invalid {key}={value!r}: {accepted}")

    if config.AMP_OPT_LEVEL == "O0":  # apex's full precision: AMP off, with or without apex
        check(config.AMP in ("auto", "off"), "AMP", config.AMP, "contradicts AMP_OPT_LEVEL 'O0' (full precision)")
        config.AMP, config.AMP_OPT_LEVEL = "off", ""
    scale, ratio = config.AUG.SCALE, config.AUG.RATIO
    check(0 < scale[0] <= scale[1], "AUG.SCALE", scale, "two floats 0 < min <= max <= 1")
    check(0 < ratio[0] <= ratio[1], "AUG.RATIO", ratio, "two floats 0 < min <= max")
    mixing = config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0 or len(config.AUG.CUTMIX_MINMAX) > 0
    check(
        not mixing or config.DATA.BATCH_SIZE % 2 == 0,
        "DATA.BATCH_SIZE",
        config.DATA.BATCH_SIZE,
        "must be even while Mixup/CutMix is on (timm mixes each batch with its flipped self); "
        "or set AUG.MIXUP 0 AUG.CUTMIX 0",
    )
    check(
        not (config.DATA.VAL_HOLDOUT and config.DATA.FORMAT == "zip" and config.DATA.CACHE_MODE == "part"),
        "DATA.VAL_HOLDOUT",
        config.DATA.VAL_HOLDOUT,
        "cannot split a DATA.CACHE_MODE part cache (each rank caches a fixed part of the train split); "
        "use DATA.CACHE_MODE no or full",
    )
    _validate_architecture(config)


def _validate_architecture(config: CN) -> None:
    """MODEL.NAME, the MODEL.MOAT keys, MODEL.DROP_PATH_RATE and DATA.IMG_SIZE together describe a
    buildable model; the checks live with the model (models/build.py) and name the key."""
    try:
        moat_cfg_from_config(config)
    except ValueError as e:  # models.MoatConfigError, its message names the config key
        raise ConfigError(str(e)) from None


def get_config(args: argparse.Namespace | None = None) -> CN:
    """A fresh, frozen config: defaults, then ``args`` applied when given."""
    if args is not None:
        return load_config(args).config
    config = _C.clone()
    config.freeze()
    return config


def with_values(config: CN, updates: dict) -> CN:
    """A frozen copy of ``config`` with ``updates`` (``{"DATA.IMG_SIZE": 288, ...}``) set; ``config``
    itself when nothing changes."""
    if all(get_key(config, key) == value for key, value in updates.items()):
        return config
    config = config.clone()
    config.defrost()
    for key, value in updates.items():
        set_key(config, key, value)
    config.freeze()
    return config


def get_key(config: CN, key: str) -> Any:
    """The value of dotted ``key`` (``"TRAIN.EMA.DECAY"``); ``KeyError`` naming it when absent."""
    node = config
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def set_key(config: CN, key: str, value: Any) -> None:
    """Set dotted ``key`` of a defrosted ``config``."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def config_from_dict(*trees: dict) -> CN:
    """A frozen config: today's defaults overlaid with each of ``trees`` in turn (``config_to_dict``
    trees, e.g. what a checkpoint saved). Keys the defaults no longer know are skipped, not
    rejected: an old checkpoint stays loadable after the config grows or loses a key."""
    config = _C.clone()
    for tree in trees:
        upgraded = _upgrade_renamed_keys(_upgrade_unset_spellings(copy.deepcopy(tree)), None)
        for key, value in _flatten(upgraded).items():
            try:
                default = get_key(config, key)
            except KeyError:
                continue
            if isinstance(default, CN):
                continue
            if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
                value = type(default)(value)
            set_key(config, key, value)
    config.freeze()
    return config


def config_to_dict(config: CN) -> dict:
    """The config as plain Python containers (safe for ``torch.load(weights_only=True)``)."""

    def convert(node):
        if isinstance(node, CN):
            return {k: convert(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [convert(v) for v in node]
        return node

    return convert(config)


# ------------------------------------------------------------------------------ run folder
# Keys that may differ between launches of the same run without mixing two experiments.
# OUTPUT/TAG: a run folder that was moved or copied is still the same run.
_LAUNCH_KEYS = {
    "MODEL.RESUME",
    "TRAIN.AUTO_RESUME",
    "DATA.NUM_WORKERS",
    "DATA.NORMALIZE_ON_DEVICE",
    "DATA.PIN_MEMORY",
    "DATA.DATA_PATH",
    "DATA.TRAIN_SHARDS",
    "DATA.VAL_SHARDS",
    "PRINT_FREQ",
    "DEVICE",
    "OUTPUT",
    "TAG",
    "TRAIN.SYNC_DEBUG",  # a debugging aid: warnings only
    "TRAIN.REPORT.CHECKPOINT",  # which number the log states, not what is trained
    # Where a run is logged to does not change what it trains.
    "TRACKING.WANDB",
    "TRACKING.WANDB_PROJECT",
    "TRACKING.WANDB_ENTITY",
    "TRACKING.WANDB_MODE",
    "TRACKING.MLFLOW",
    "TRACKING.MLFLOW_TRACKING_URI",
    "TRACKING.MLFLOW_EXPERIMENT",
    *_RETIRED_KEYS,
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(old: dict, new: dict, ignore=_LAUNCH_KEYS) -> list:
    """``KEY: old -> new`` for every config key that differs (launch-only keys ignored)."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if k not in ignore and a.get(k) != b.get(k)
    ]


RUN_CONFIG = "config.yaml"


def run_config_changes(config: CN, output_dir: str) -> list:
    """How the config of the run already in ``output_dir`` (its ``config.yaml``) differs from
    ``config`` (``config_differences``); empty for a new folder or the same run.

    Keys the earlier run's code did not have yet count as their defaults, not as changes.
    """
    path = os.path.join(output_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        old = yaml.safe_load(f) or {}
    return config_differences(config_to_dict(config_from_dict(old)), config_to_dict(config))


def save_run_config(config: CN, output_dir: str) -> None:
    """Write ``output_dir/config.yaml`` atomically: the config the run's checkpoints were made with."""
    path = os.path.join(output_dir, RUN_CONFIG)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.dump())
    os.replace(tmp, path)
