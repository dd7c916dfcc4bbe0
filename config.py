"""Configuration tree for the MOAT trainer (yacs), in the shape of the Swin-Transformer trainer.

Precedence, lowest first: the defaults below, the YAML file given by ``--cfg`` (and the files
named by its ``BASE:`` list, resolved relative to it), ``--opts KEY VALUE ...``, then the named
command-line flags (``--batch-size`` etc.), as in the Swin trainer. The result is frozen before
anything is built, so no module can change it as a side effect. Unknown keys and values of the
wrong type are errors, never ignored.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from utils.errors import ConfigError

_C = CN()

# YAML files this one inherits from (paths relative to the file that names them).
_C.BASE = [""]

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Images per process per micro-step (the global batch is this x world size x accumulation steps).
_C.DATA.BATCH_SIZE = 128
# Root of the dataset: holds TRAIN_SPLIT/ and VAL_SPLIT/ class folders.
_C.DATA.DATA_PATH = ""
# 'imagenet' (ImageNet-1k layout, 1000 classes expected) or 'imagefolder' (any class-folder tree).
_C.DATA.DATASET = "imagenet"
# Sub-folder names of the two splits under DATA_PATH.
_C.DATA.TRAIN_SPLIT = "train"
_C.DATA.VAL_SPLIT = "val"
# Input resolution (square); must be divisible by the model's total stride (32 for every registered
# variant) and each attention window must divide its stage's feature map at this size.
_C.DATA.IMG_SIZE = 224
# Resampling used by the train and eval transforms: 'bicubic', 'bilinear' or 'random'.
_C.DATA.INTERPOLATION = "bicubic"
# Eval transform: resize the short side to IMG_SIZE / CROP_PCT, then center-crop IMG_SIZE
# (0.875 gives the classic 256 -> 224). 1.0 resizes the short side to IMG_SIZE and center-crops
# the long side (no margin); TEST.CROP False squashes the whole image instead.
_C.DATA.CROP_PCT = 0.875
# Per-channel normalisation (ImageNet mean/std, as the authors train).
_C.DATA.MEAN = [0.485, 0.456, 0.406]
_C.DATA.STD = [0.229, 0.224, 0.225]
# Pin host memory in the loaders (ignored on CPU-only runs).
_C.DATA.PIN_MEMORY = True
# Normalise (and randomly erase) batches on the device: the loader workers hand over uint8 images
# and the device does the float conversion, normalisation and random erasing, overlapped with
# the previous step on CUDA (data/device_loader.py). 'auto' = on for CUDA, off on CPU; 'on';
# 'off' (the float path: everything in the workers, bit-identical resume).
_C.DATA.NORMALIZE_ON_DEVICE = "auto"
# Loader worker processes per training process.
_C.DATA.NUM_WORKERS = 8
# Skip (count and log once) unreadable or truncated images instead of failing fast; for zips and
# shards also map lines naming a missing member, samples without or with a bad label, and samples
# cut off by a truncated shard (counted and logged at start-up).
_C.DATA.SKIP_BAD_IMAGES = False
# How the images are stored under DATA_PATH (README "Data formats"): 'folder' (TRAIN_SPLIT/ and
# VAL_SPLIT/ class folders), 'zip' (Swin's layout: <split>.zip + <split>_map.txt, --zip) or
# 'shards' (WebDataset tar shards + a shard index, see TRAIN_SHARDS).
_C.DATA.FORMAT = "folder"
# FORMAT 'zip' only, Swin's --cache-mode: 'no' reads the zip on demand, 'part' keeps this rank's
# 1/world-size of the train images in RAM and samples only those, 'full' keeps all of them on
# every rank. Validation caches its own part unless 'no'.
_C.DATA.CACHE_MODE = "part"
# FORMAT 'shards' only: the shard index JSON (tools/make_shards.py writes <split>.json), a folder
# of .tar shards, or a pattern ('train-{000000..000146}.tar', 'train-*.tar'), relative to
# DATA_PATH unless absolute. Empty: DATA_PATH/<split>.json, else DATA_PATH/<split>-*.tar.
_C.DATA.TRAIN_SHARDS = ""
_C.DATA.VAL_SHARDS = ""
# Text file of class names in label order, one per line ('' = the data's own classes). Label k is
# line k in every format; classes the map does not name are skipped (a subset trains without
# copying the data); MODEL.NUM_CLASSES must equal the number of names. The val split may hold any
# part of the map, the train split every class that val holds.
_C.DATA.CLASS_MAP = ""

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Model family; only 'moat' exists.
_C.MODEL.TYPE = "moat"
# Variant: moat_0..moat_4, tiny_moat_0..tiny_moat_3, each also as <name>_no_pe; or a new name for
# an architecture defined by the MODEL.MOAT keys. Outputs go to OUTPUT/NAME/TAG.
_C.MODEL.NAME = "moat_0"
# Weights-only initialisation (a checkpoint of ours or a safetensors file); a head of another
# shape is dropped. Resolution-agnostic: the relative-bias tables resize themselves.
_C.MODEL.PRETRAINED = ""
# From a checkpoint that holds EMA weights, initialise from the EMA (the better model after a full
# run, and what the authors released); False takes the raw weights.
_C.MODEL.PRETRAINED_EMA = True
# Full training state to resume from; empty means auto-resume from the output folder.
_C.MODEL.RESUME = ""
# Number of classes of the head; checked against the number of class folders in the data.
_C.MODEL.NUM_CLASSES = 1000
# Dropout before the classifier.
_C.MODEL.DROP_RATE = 0.0
# Stochastic-depth rate; a negative value means the variant's published default.
_C.MODEL.DROP_PATH_RATE = -1.0
# Label smoothing (used when Mixup/CutMix are off; with them, folded into the soft targets).
_C.MODEL.LABEL_SMOOTHING = 0.1
# Architecture (models/config.py MoatCfg; one key per field, named after it in upper case; the
# drop-path rate is MODEL.DROP_PATH_RATE above). A key left unset ([] for lists, -1 for numbers,
# "" for layer names, null for POS_EMBED) keeps the value of the registered variant MODEL.NAME;
# a key that is set overrides it. A MODEL.NAME that is not a registered variant is a new
# architecture: STEM_DIMS, DEPTHS, DIMS and STAGE_TYPES are then required and every other key
# left unset takes the official MOAT value (in brackets). docs/architecture.md, README "Custom
# architectures".
_C.MODEL.MOAT = CN()
# Stem conv widths; the first conv has stride 2, a norm and activation sit between two convs.
# [the official stem: two convs, e.g. [64, 64] for moat_0]
_C.MODEL.MOAT.STEM_DIMS = []
# Blocks per stage; the number of entries is the number of stages (any, not only 4).
_C.MODEL.MOAT.DEPTHS = []
# Output channels per stage.
_C.MODEL.MOAT.DIMS = []
# Block type per stage: 'mbconv' (MBConv with squeeze-excite) or 'moat' (MBConv without SE, then
# LayerNorm + multi-head self-attention). [mbconv, mbconv, moat, moat]
_C.MODEL.MOAT.STAGE_TYPES = []
# Stride of each stage's first block (TF 'SAME'); the total stride, 2 x their product, must divide
# DATA.IMG_SIZE. [2 per stage]
_C.MODEL.MOAT.STRIDES = []
# Width of the 1x1 expansion, times the block's OUTPUT channels. [4.0]
_C.MODEL.MOAT.EXPAND_RATIO = -1.0
# Squeeze-excite width in MBConv stages, times the output channels; 0 removes it. [0.25]
_C.MODEL.MOAT.SE_RATIO = -1.0
# Depthwise conv kernel (odd). [3]
_C.MODEL.MOAT.KERNEL_SIZE = -1
# Average-pool size of the strided shortcut: 2 (classification) or 3 (dense tasks). [2]
_C.MODEL.MOAT.POOL_SIZE = -1
# Channels per attention head; every attention stage's width must divide by it. [32]
_C.MODEL.MOAT.HEAD_DIM = -1
# Attention window: one value per attention ('moat') stage, or one per stage (0 for 'mbconv'
# stages); 0 means global attention over the whole map. Each window must divide its stage's
# feature map at DATA.IMG_SIZE (stage-3 map 14 and stage-4 map 7 at 224 px for the official
# layout; [14, 0] is the authors' detection setting). [global everywhere, e.g. [0, 0]]
_C.MODEL.MOAT.WINDOW_SIZE = []
# Learned relative position bias in attention (the *_no_pe variants set false). [true]
_C.MODEL.MOAT.POS_EMBED = None
# Native relative-bias window P per attention stage (or per stage, 0 for 'mbconv'): the table has
# (2P-1)^2 entries per head and is resized to the actual window. 0 derives it from the stage's
# feature map at 224 px. [derived: 14 at stride 16, 7 at stride 32]
_C.MODEL.MOAT.POS_EMBED_SIZE = []
# Norm of the stem and the conv path, a timm name: batchnorm2d, groupnorm, layernorm2d, ...
# ['batchnorm2d'; the trainer makes it SyncBatchNorm under DDP on CUDA]
_C.MODEL.MOAT.NORM_LAYER = ""
# Activation of the stem and the conv path, a timm name (gelu is the exact erf form). ['gelu']
_C.MODEL.MOAT.ACT_LAYER = ""
# Activation inside squeeze-excite, a timm name. ['silu' (swish)]
_C.MODEL.MOAT.SE_ACT_LAYER = ""
# Epsilon of the conv-path norm. [0.001, Keras' BatchNormalization default]
_C.MODEL.MOAT.BN_EPS = -1.0
# BatchNorm running-stat momentum (PyTorch convention). 0.01 is the official value (Keras 0.99),
# right for ImageNet-length schedules; runs of a few thousand steps need ~0.1, or the running
# statistics lag the weights and eval accuracy collapses while train loss looks fine. [0.01]
_C.MODEL.MOAT.BN_MOMENTUM = -1.0
# Epsilon of the attention LayerNorm and of the head's LayerNorm. [1e-05]
_C.MODEL.MOAT.LN_EPS = -1.0
# Head: mean pool -> LayerNorm -> Linear; a width > 0 inserts Linear(width) + tanh before the
# classifier (timm's NormMlpClassifierHead). [0]
_C.MODEL.MOAT.HEAD_HIDDEN_SIZE = -1
# CUDA training: run each MBConv's depthwise conv -> BatchNorm -> GELU through fused Triton
# kernels (models/fused_depthwise.py; same function, to float rounding). Off until a GPU
# benchmark shows a gain (docs/benchmarks.md).
_C.MODEL.FUSED_DEPTHWISE = False

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
# Learning rates for a total batch of 512; scaled linearly by the actual total batch / 512.
_C.TRAIN.BASE_LR = 1e-3
_C.TRAIN.WARMUP_LR = 1e-6
_C.TRAIN.MIN_LR = 1e-5
# Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged).
_C.TRAIN.CLIP_GRAD = 5.0
# Resume from OUTPUT/.../last when it exists and MODEL.RESUME is empty.
_C.TRAIN.AUTO_RESUME = True
# Micro-steps per optimizer update (gradient accumulation).
_C.TRAIN.ACCUMULATION_STEPS = 1
# Re-compute blocks in backward to save memory (gradient checkpointing).
_C.TRAIN.USE_CHECKPOINT = False
# Compile the training forward and backward with torch.compile (validation stays eager).
_C.TRAIN.COMPILE = False
# torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs: less launch overhead for small
# models on GPU), 'max-autotune' (searches kernel configs: slow first steps, fastest later) or
# 'max-autotune-no-cudagraphs'.
_C.TRAIN.COMPILE_MODE = "default"
# CUDA: warn about every host-device sync inside training steps (log steps and saves excepted);
# a debugging aid, each sync stalls the host until the GPU drains.
_C.TRAIN.SYNC_DEBUG = False
# Also save a resumable checkpoint every N optimizer steps inside an epoch; 0 disables.
_C.TRAIN.SAVE_STEPS = 0
# Layer-wise learning-rate decay for fine-tuning (1.0 disables): the head gets the full LR,
# each earlier block the previous one's LR times this factor.
_C.TRAIN.LAYER_DECAY = 1.0
# Train only the head (linear probing); the backbone is frozen and kept in eval mode.
_C.TRAIN.FREEZE_BACKBONE = False

_C.TRAIN.LR_SCHEDULER = CN()
# 'cosine', 'linear' or 'step'; all with linear warmup, stepped per optimizer update.
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"
# Epoch interval between decays (step scheduler only).
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# LR multiplier at each decay (step scheduler only).
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
# 'adamw' or 'sgd'.
_C.TRAIN.OPTIMIZER.NAME = "adamw"
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = [0.9, 0.999]
# SGD momentum and Nesterov.
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9
_C.TRAIN.OPTIMIZER.NESTEROV = True

_C.TRAIN.EMA = CN()
# Keep an exponential moving average of the weights and validate it each epoch.
_C.TRAIN.EMA.ENABLE = True
_C.TRAIN.EMA.DECAY = 0.9999
# Warm the decay up (timm ModelEmaV3 use_warmup) so short runs get a useful EMA.
_C.TRAIN.EMA.WARMUP = True
# Choose best.pth by the EMA's top-1 instead of the raw model's (both are logged every epoch).
_C.TRAIN.EMA.SELECT_BEST = False

# -----------------------------------------------------------------------------
# Augmentation
# -----------------------------------------------------------------------------
_C.AUG = CN()
# Color jitter factor (used when AUTO_AUGMENT is empty).
_C.AUG.COLOR_JITTER = 0.4
# timm auto-augment policy string; empty disables it.
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
# Scale and aspect-ratio ranges of the train random-resized crop (timm's defaults).
_C.AUG.SCALE = [0.08, 1.0]
_C.AUG.RATIO = [0.75, 1.3333333333333333]
# Random erasing probability, mode and count.
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
# Mixup alpha (0 disables), CutMix alpha (0 disables), CutMix min/max ratio (empty = unused).
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = []
# Probability of applying Mixup or CutMix to a batch, and of switching to CutMix when both on.
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# 'batch', 'pair' or 'elem'.
_C.AUG.MIXUP_MODE = "batch"

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Eval transform: True resizes the short side (see DATA.CROP_PCT) and center-crops a square;
# False resizes the whole image to IMG_SIZE x IMG_SIZE, changing its aspect ratio (no crop).
_C.TEST.CROP = True

# -----------------------------------------------------------------------------
# Experiment trackers (optional: neither package is a requirement; asking for one that is not
# installed logs a warning and the run goes on). The tracker's run id is saved in the
# checkpoints, so a resumed run continues the same tracker run.
# -----------------------------------------------------------------------------
_C.TRACKING = CN()
# Log per-step and per-epoch metrics to Weights & Biases (--log-wandb; `pip install wandb`).
_C.TRACKING.WANDB = False
# wandb project; "" lets wandb decide (WANDB_PROJECT, else its default project).
_C.TRACKING.WANDB_PROJECT = ""
# wandb entity (user or team); "" lets wandb decide (WANDB_ENTITY, else the logged-in user).
_C.TRACKING.WANDB_ENTITY = ""
# wandb mode: 'online', 'offline' (logs stay in OUTPUT/.../wandb; `wandb sync` uploads them),
# 'disabled', or "" for wandb's own default (WANDB_MODE, else online).
_C.TRACKING.WANDB_MODE = ""
# Log per-step and per-epoch metrics to MLflow (--log-mlflow; `pip install mlflow`).
_C.TRACKING.MLFLOW = False
# MLflow tracking URI (e.g. http://host:5000, file:./mlruns); "" lets MLflow decide
# (MLFLOW_TRACKING_URI, else ./mlruns).
_C.TRACKING.MLFLOW_TRACKING_URI = ""
# MLflow experiment name; "" uses MLflow's default experiment.
_C.TRACKING.MLFLOW_EXPERIMENT = ""

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Mixed precision: 'auto' (CUDA: bf16 where supported, else fp16; CPU: bf16 only with AMX, where it
# trains faster than fp32, else off), 'off', 'fp16' or 'bf16'.
_C.AMP = "auto"
# Keep the model and its inputs in channels_last (NHWC) memory: the fast layout of oneDNN's and
# cuDNN's convolutions; MOAT-0 trains 2.3x faster on CPU at 224 px (docs/benchmarks.md). Only the
# strides change: outputs match NCHW to float rounding and checkpoints load in either layout.
_C.CHANNELS_LAST = True
# NVIDIA apex opt level (O0-O2); only valid when apex is installed; empty means torch.amp.
_C.AMP_OPT_LEVEL = ""
# Root of all outputs; a run writes to OUTPUT/MODEL.NAME/TAG.
_C.OUTPUT = "output"
_C.TAG = "default"
# Keep an epoch checkpoint every SAVE_FREQ epochs, the newest KEEP_CHECKPOINTS of them.
_C.SAVE_FREQ = 1
_C.KEEP_CHECKPOINTS = 3
# Log every PRINT_FREQ steps.
_C.PRINT_FREQ = 10
_C.SEED = 0
# 'auto' (CUDA when available), 'cuda' or 'cpu'.
_C.DEVICE = "auto"

# Keys of older versions that described a launch (--eval, --throughput, the launcher's rank)
# rather than the experiment; a saved config.yaml that still has them loads without them.
_RETIRED_KEYS = ("EVAL_MODE", "THROUGHPUT_MODE", "LOCAL_RANK")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DATA_FORMATS = ("folder", "zip", "shards")
CACHE_MODES = ("no", "part", "full")

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


def _update_config_from_file(config: CN, cfg_file: str) -> None:
    """Merge ``cfg_file`` into ``config``, its ``BASE`` files first."""
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"config file not found: {cfg_file}")
    try:
        with open(cfg_file, "r") as f:
            yaml_cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{cfg_file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(yaml_cfg, dict):
        raise ConfigError(f"{cfg_file}: expected a mapping of config keys at the top level")
    for base in yaml_cfg.setdefault("BASE", [""]):
        if base:
            _update_config_from_file(config, os.path.join(os.path.dirname(cfg_file), base))
    for key in _RETIRED_KEYS:
        yaml_cfg.pop(key, None)
    config.defrost()
    try:
        config.merge_from_other_cfg(CN(yaml_cfg))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"{cfg_file}: {_yacs_message(e)}") from None
    config.freeze()


def _yacs_message(e: Exception) -> str:
    msg = e.args[0] if e.args else str(e)
    return str(msg).replace("\n", " ")


def update_config(config: CN, args: argparse.Namespace) -> None:
    """Apply ``--cfg``, ``--opts`` and the named flags to ``config`` (in that order)."""
    _update_config_from_file(config, args.cfg)
    config.defrost()
    if getattr(args, "opts", None):
        if len(args.opts) % 2:
            raise ConfigError(f"--opts needs KEY VALUE pairs, got an odd number of items: {args.opts}")
        try:
            config.merge_from_list(args.opts)
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"--opts: {_yacs_message(e)}") from None

    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:  # unset flags (all default to None) leave the config alone
            *parents, leaf = key.split(".")
            target = config
            for part in parents:
                target = target[part]
            target[leaf] = value

    validate_config(config)
    config.freeze()


def validate_config(config: CN) -> None:
    """Reject values no run could use, naming the key and what it accepts."""

    def check(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            raise ConfigError(f"invalid {key}={value!r}: {accepted}")

    check(config.MODEL.TYPE == "moat", "MODEL.TYPE", config.MODEL.TYPE, "accepted: 'moat'")
    check(
        config.DATA.DATASET in ("imagenet", "imagefolder"),
        "DATA.DATASET",
        config.DATA.DATASET,
        "accepted: 'imagenet', 'imagefolder'",
    )
    check(config.DATA.BATCH_SIZE > 0, "DATA.BATCH_SIZE", config.DATA.BATCH_SIZE, "must be > 0")
    check(
        config.DATA.INTERPOLATION in ("bicubic", "bilinear", "random"),
        "DATA.INTERPOLATION",
        config.DATA.INTERPOLATION,
        "accepted: 'bicubic', 'bilinear', 'random'",
    )
    check(0.0 < config.DATA.CROP_PCT <= 1.0, "DATA.CROP_PCT", config.DATA.CROP_PCT, "must be in (0, 1]")
    check(
        len(config.DATA.MEAN) == 3 and len(config.DATA.STD) == 3,
        "DATA.MEAN/DATA.STD",
        (config.DATA.MEAN, config.DATA.STD),
        "need three values each",
    )
    check(config.DATA.NUM_WORKERS >= 0, "DATA.NUM_WORKERS", config.DATA.NUM_WORKERS, "must be >= 0")
    check(
        config.DATA.FORMAT in DATA_FORMATS,
        "DATA.FORMAT",
        config.DATA.FORMAT,
        "accepted: " + ", ".join(repr(f) for f in DATA_FORMATS),
    )
    check(
        config.DATA.CACHE_MODE in CACHE_MODES,
        "DATA.CACHE_MODE",
        config.DATA.CACHE_MODE,
        "accepted: " + ", ".join(repr(m) for m in CACHE_MODES),
    )
    check(config.MODEL.NUM_CLASSES > 0, "MODEL.NUM_CLASSES", config.MODEL.NUM_CLASSES, "must be > 0")
    check(
        config.MODEL.DROP_PATH_RATE < 1.0,
        "MODEL.DROP_PATH_RATE",
        config.MODEL.DROP_PATH_RATE,
        "must be < 1 (negative = variant default)",
    )
    check(
        0.0 <= config.MODEL.LABEL_SMOOTHING < 1.0,
        "MODEL.LABEL_SMOOTHING",
        config.MODEL.LABEL_SMOOTHING,
        "must be in [0, 1)",
    )
    _validate_architecture(config)
    check(config.TRAIN.EPOCHS > 0, "TRAIN.EPOCHS", config.TRAIN.EPOCHS, "must be > 0")
    check(0 <= config.TRAIN.WARMUP_EPOCHS, "TRAIN.WARMUP_EPOCHS", config.TRAIN.WARMUP_EPOCHS, "must be >= 0")
    for key in ("BASE_LR", "WARMUP_LR", "MIN_LR", "WEIGHT_DECAY", "CLIP_GRAD"):
        check(config.TRAIN[key] >= 0, f"TRAIN.{key}", config.TRAIN[key], "must be >= 0")
    check(config.TRAIN.BASE_LR > 0, "TRAIN.BASE_LR", config.TRAIN.BASE_LR, "must be > 0")
    check(
        config.TRAIN.ACCUMULATION_STEPS >= 1,
        "TRAIN.ACCUMULATION_STEPS",
        config.TRAIN.ACCUMULATION_STEPS,
        "must be >= 1",
    )
    check(
        config.TRAIN.COMPILE_MODE in COMPILE_MODES,
        "TRAIN.COMPILE_MODE",
        config.TRAIN.COMPILE_MODE,
        "accepted: " + ", ".join(repr(m) for m in COMPILE_MODES),
    )
    check(config.TRAIN.SAVE_STEPS >= 0, "TRAIN.SAVE_STEPS", config.TRAIN.SAVE_STEPS, "must be >= 0")
    check(0.0 < config.TRAIN.LAYER_DECAY <= 1.0, "TRAIN.LAYER_DECAY", config.TRAIN.LAYER_DECAY, "must be in (0, 1]")
    check(
        config.TRAIN.LR_SCHEDULER.NAME in ("cosine", "linear", "step"),
        "TRAIN.LR_SCHEDULER.NAME",
        config.TRAIN.LR_SCHEDULER.NAME,
        "accepted: 'cosine', 'linear', 'step'",
    )
    check(
        config.TRAIN.OPTIMIZER.NAME in ("adamw", "sgd"),
        "TRAIN.OPTIMIZER.NAME",
        config.TRAIN.OPTIMIZER.NAME,
        "accepted: 'adamw', 'sgd'",
    )
    check(0.0 <= config.TRAIN.EMA.DECAY < 1.0, "TRAIN.EMA.DECAY", config.TRAIN.EMA.DECAY, "must be in [0, 1)")
    check(config.AMP in ("auto", "off", "fp16", "bf16"), "AMP", config.AMP, "accepted: 'auto', 'off', 'fp16', 'bf16'")
    check(
        config.AMP_OPT_LEVEL in ("", "O0", "O1", "O2"),
        "AMP_OPT_LEVEL",
        config.AMP_OPT_LEVEL,
        "accepted: '' (torch.amp), 'O0', 'O1', 'O2' (NVIDIA apex)",
    )
    check(config.DEVICE in ("auto", "cuda", "cpu"), "DEVICE", config.DEVICE, "accepted: 'auto', 'cuda', 'cpu'")
    check(
        config.TRACKING.WANDB_MODE in ("", "online", "offline", "disabled"),
        "TRACKING.WANDB_MODE",
        config.TRACKING.WANDB_MODE,
        "accepted: '' (wandb's default), 'online', 'offline', 'disabled'",
    )
    check(config.SAVE_FREQ >= 1, "SAVE_FREQ", config.SAVE_FREQ, "must be >= 1")
    check(config.KEEP_CHECKPOINTS >= 0, "KEEP_CHECKPOINTS", config.KEEP_CHECKPOINTS, "must be >= 0")
    check(config.PRINT_FREQ >= 1, "PRINT_FREQ", config.PRINT_FREQ, "must be >= 1")
    check(
        config.AUG.REMODE in ("const", "rand", "pixel"),
        "AUG.REMODE",
        config.AUG.REMODE,
        "accepted: 'const', 'rand', 'pixel'",
    )
    check(config.AUG.RECOUNT >= 1, "AUG.RECOUNT", config.AUG.RECOUNT, "must be >= 1")
    check(0.0 <= config.AUG.REPROB <= 1.0, "AUG.REPROB", config.AUG.REPROB, "must be in [0, 1]")
    check(
        config.AUG.MIXUP_MODE in ("batch", "pair", "elem"),
        "AUG.MIXUP_MODE",
        config.AUG.MIXUP_MODE,
        "accepted: 'batch', 'pair', 'elem'",
    )
    check(
        len(config.AUG.SCALE) == 2 and 0 < config.AUG.SCALE[0] <= config.AUG.SCALE[1] <= 1,
        "AUG.SCALE",
        config.AUG.SCALE,
        "two floats 0 < min <= max <= 1",
    )
    check(
        len(config.AUG.RATIO) == 2 and 0 < config.AUG.RATIO[0] <= config.AUG.RATIO[1],
        "AUG.RATIO",
        config.AUG.RATIO,
        "two floats 0 < min <= max",
    )
    check(len(config.AUG.CUTMIX_MINMAX) in (0, 2), "AUG.CUTMIX_MINMAX", config.AUG.CUTMIX_MINMAX, "empty or two floats")
    mixing = config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0 or len(config.AUG.CUTMIX_MINMAX) > 0
    check(
        not mixing or config.DATA.BATCH_SIZE % 2 == 0,
        "DATA.BATCH_SIZE",
        config.DATA.BATCH_SIZE,
        "must be even while Mixup/CutMix is on (timm mixes each batch with its flipped self); "
        "or set AUG.MIXUP 0 AUG.CUTMIX 0",
    )


def _validate_architecture(config: CN) -> None:
    """MODEL.NAME, the MODEL.MOAT keys, MODEL.DROP_PATH_RATE and DATA.IMG_SIZE together describe a
    buildable model; the checks live with the model (models/build.py) and name the key."""
    from models import moat_cfg_from_config  # local import: keeps config importable without torch

    try:
        moat_cfg_from_config(config)
    except ValueError as e:  # models.MoatConfigError, its message names the config key
        raise ConfigError(str(e)) from None


def get_config(args: argparse.Namespace | None = None) -> CN:
    """A fresh, frozen config: defaults, then ``args`` applied when given."""
    config = _C.clone()
    if args is not None:
        update_config(config, args)
    else:
        config.freeze()
    return config


def with_values(config: CN, updates: dict) -> CN:
    """A frozen copy of ``config`` with ``updates`` (``{"DATA.IMG_SIZE": 288, ...}``) set; ``config``
    itself when nothing changes."""
    if all(_get(config, key) == value for key, value in updates.items()):
        return config
    config = config.clone()
    config.defrost()
    for key, value in updates.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    config.freeze()
    return config


def _get(config: CN, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


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


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if nested else value
    return out


def save_run_config(config: CN, output_dir: str) -> list:
    """Write ``output_dir/config.yaml`` (atomically); returns how the config that was there
    differs from this one (``config_differences``), empty for a new folder or the same run.

    Keys the earlier run's code did not have yet count as their defaults, not as changes.
    """
    path = os.path.join(output_dir, "config.yaml")
    changed = []
    if os.path.isfile(path):
        with open(path) as f:
            old = yaml.safe_load(f) or {}
        changed = config_differences(_deep_merge(config_to_dict(get_config()), old), config_to_dict(config))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.dump())
    os.replace(tmp, path)
    return changed
