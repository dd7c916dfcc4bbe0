"""Convert the authors' released MOAT ImageNet checkpoints (deeplab2, TensorFlow) to our formats.

    python tools/convert_deeplab2.py moat0_imagenet_1k_224_w_position_embedding.tar.gz --model moat_0 \
        --output moat0_official.pth
    python tools/convert_deeplab2.py ckpt/model.ckpt --model tiny_moat_2_no_pe --raw --output tiny2.safetensors
    python tools/convert_deeplab2.py moat2_imagenet_22k_and_1k_384_w_position_embedding.tar.gz --model moat_2 \
        --timm-folder hub/moat_2.deeplab2_in22k_ft_in1k_384

CHECKPOINT is a release ``.tar.gz`` as downloaded (unpacked into a temporary folder), a folder
holding one checkpoint, or a checkpoint prefix (``path/model.ckpt`` of ``model.ckpt.index`` and
``model.ckpt.data-*``). The files are read by ``tools/tf_bundle.py``: no TensorFlow needed.

The output is a trainer checkpoint (``torch.load(weights_only=True)``: ``model``, ``model_name``,
``class_names``, ``config``, ``converted_from``) that ``tools/predict.py``, ``tools/export.py``,
``hubconf.py`` and ``main.py --pretrained`` / ``--eval --resume`` accept; an output ending in
``.safetensors`` (or ``--safetensors``, next to the ``.pth``) is the format of ``tools/export.py``.
The saved config carries the release's input size and normalisation (option 1: ImageNet mean/std;
option 2: mean 127.5, std 127.5 on 0..255 pixels, i.e. 0.5/0.5 in the trainer's 0..1 convention).
``--timm-folder DIR`` (with or instead of ``--output``) writes timm's hub layout (``models/hub.py``:
``config.json`` with that preprocessing, the class names and the release URL, ``model.safetensors``)
for ``timm.create_model('local-dir:DIR', pretrained=True)`` or, pushed, ``hf-hub:``.

Mapping (``deeplab2_rules``), read off our model's modules, so any MOAT built from MBConv and
MOAT blocks maps: stem ``conv_0``/``norm_0``/``conv_1``; block ``block_SS_BB`` (stage, index)
with ``pre_norm``, ``expand_conv``, ``expand_norm``, ``depthwise_conv``, ``depthwise_norm``,
``se/{reduce,expand}_conv2d``, ``shrink_conv``, ``shortcut_conv``, and in MOAT blocks
``attention_norm`` and ``attention/{q,k,v,o,relative_position_embedding}``; head
``final_layer_norm`` and ``logits_head``. Keras kernels ``[kh, kw, in, out]`` become
``[out, in, kh, kw]``, depthwise ``[kh, kw, C, 1]`` becomes ``[C, 1, kh, kw]``; q/k/v
``[C, heads, 32]`` are stacked into the fused ``qkv`` Linear (rows q, k, v; head-major), o
``[heads, 32, C]`` becomes ``proj``; relative tables keep their ``[heads, 2P-1, 2P-1]`` layout
(both index key minus query); the head kernel ``[1, 1, C, classes]`` becomes a Linear.

Weights: the EMA copies (``<name>/ExponentialMovingAverage``) by default, falling back to the
raw value for non-trainable variables (BatchNorm moving statistics) that have no EMA copy;
``--raw`` takes the raw variables. Without a classification head in the file, the backbone is
converted and the head starts fresh. Without BatchNorm moving statistics, ``--calibrate-bn
FOLDER`` re-estimates them (cumulative average over ``--calibrate-images`` training images, eval
transform, no gradient). Leftover checkpoint entries (other than optimizer slots and
``global_step``) are listed; a missing variable, a damaged file or a wrong ``--model`` (a shape
mismatch, leftover blocks the model lacks, position embeddings for a ``_no_pe`` model) is a
one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, _REPO)

import numpy as np
import torch
import torch.nn as nn

from models.moat import MOAT, MBConvBlock, MOATBlock, create_moat, list_variants
from tools.tf_bundle import BundleError, BundleReader
from utils.errors import UserError, run_tool

__all__ = [
    "ConversionError",
    "ConversionReport",
    "NORMALIZATION",
    "RELEASES",
    "Release",
    "Rule",
    "calibrate_bn",
    "convert",
    "convert_weights",
    "converted_config",
    "deeplab2_rules",
    "load_deeplab2",
    "open_checkpoint",
    "release_table",
]

EMA_SUFFIX = "/ExponentialMovingAverage"
SCOPE = "moat/"
RELEASE_URL = "https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/"
# Optimizer state and step counters a training checkpoint may carry; never model weights.
_IGNORED = re.compile(
    r"(^|/)(Momentum|Adam(_\d+)?|AdamW(_\d+)?|RMSProp(_\d+)?|Adagrad|Adadelta(_\d+)?|Ftrl(_\d+)?|"
    r"LARS(_\d+)?|LAMB(_\d+)?|Nadam(_\d+)?|Nesterov)$|^(global_step|beta1_power|beta2_power)$"
)


class ConversionError(UserError):
    """The checkpoint does not fit the model, or the request cannot be met: one line, exit 2."""


# --------------------------------------------------------------------------------------- releases
@dataclass(frozen=True)
class Release:
    """One released checkpoint, as listed in deeplab2's
    ``g3doc/projects/moat_imagenet_pretrained_checkpoints.md``."""

    file: str
    img_size: int
    normalization: int  # 1 or 2, see NORMALIZATION
    top1: float  # ImageNet-1K val top-1 reported there
    data: str


def _release(stem: str, data_tag: str, size: int, pe: bool, option: int, top1: float, data: str) -> Release:
    return Release(
        f"{stem}_imagenet_{data_tag}_{size}_{'w' if pe else 'wo'}_position_embedding.tar.gz", size, option, top1, data
    )


RELEASES: Dict[str, Release] = {
    "moat_0": _release("moat0", "1k", 224, True, 1, 83.3, "ImageNet-1K"),
    "moat_1": _release("moat1", "1k", 224, True, 1, 84.2, "ImageNet-1K"),
    "moat_2": _release("moat2", "22k_and_1k", 384, True, 2, 87.5, "ImageNet-22K + 1K"),
    "moat_3": _release("moat3", "22k_and_1k", 512, True, 2, 88.4, "ImageNet-22K + 1K"),
    "moat_4": _release("moat4", "22k_and_1k", 512, True, 2, 89.1, "ImageNet-22K + 1K"),
    "moat_0_no_pe": _release("moat0", "1k", 224, False, 1, 83.0, "ImageNet-1K"),
    "moat_1_no_pe": _release("moat1", "1k", 224, False, 1, 84.1, "ImageNet-1K"),
    "moat_2_no_pe": _release("moat2", "22k_and_1k", 384, False, 2, 87.2, "ImageNet-22K + 1K"),
    "moat_3_no_pe": _release("moat3", "22k_and_1k", 512, False, 2, 88.2, "ImageNet-22K + 1K"),
    "moat_4_no_pe": _release("moat4", "22k_and_1k", 512, False, 2, 88.9, "ImageNet-22K + 1K"),
    "tiny_moat_0": _release("tiny_moat0", "1k", 256, True, 1, 76.6, "ImageNet-1K"),
    "tiny_moat_1": _release("tiny_moat1", "1k", 256, True, 1, 79.2, "ImageNet-1K"),
    "tiny_moat_2": _release("tiny_moat2", "1k", 256, True, 1, 81.7, "ImageNet-1K"),
    "tiny_moat_3": _release("tiny_moat3", "1k", 256, True, 1, 83.3, "ImageNet-1K"),
    "tiny_moat_0_no_pe": _release("tiny_moat0", "1k", 256, False, 1, 76.0, "ImageNet-1K"),
    "tiny_moat_1_no_pe": _release("tiny_moat1", "1k", 256, False, 1, 78.9, "ImageNet-1K"),
    "tiny_moat_2_no_pe": _release("tiny_moat2", "1k", 256, False, 1, 81.3, "ImageNet-1K"),
    "tiny_moat_3_no_pe": _release("tiny_moat3", "1k", 256, False, 1, 83.0, "ImageNet-1K"),
}

# Input normalisation options of the release notes: (mean, std) on 0..255 pixels.
NORMALIZATION: Dict[int, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    1: ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    2: ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
}


def release_table() -> str:
    """The README's "Official weights" table, generated from ``RELEASES``."""
    rows = [
        "| file (deeplab2 release) | `--model` | data | input size | normalisation | top-1 (IN-1k val) |",
        "|---|---|---|---:|---|---:|",
    ]
    for name, r in RELEASES.items():
        option = "option 1 (ImageNet mean/std)" if r.normalization == 1 else "option 2 (mean 127.5, std 127.5)"
        rows.append(
            f"| [{r.file}]({RELEASE_URL}{r.file}) | `{name}` | {r.data} | {r.img_size} | {option} | {r.top1:.1f}% |"
        )
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------- mapping
@dataclass(frozen=True)
class Rule:
    """One tensor of our state dict and the deeplab2 variables (names without the ``moat/``
    scope) it is made of, their Keras shapes, and the layout change."""

    target: str
    sources: Tuple[str, ...]
    tf_shapes: Tuple[Tuple[int, ...], ...]
    convert: Callable[..., np.ndarray]
    trainable: bool = True


def _conv_rules(target: str, source: str, conv: nn.Conv2d) -> List[Rule]:
    out_c, in_c, kh, kw = conv.weight.shape
    if conv.groups == 1:
        rules = [
            Rule(f"{target}.weight", (f"{source}/kernel",), ((kh, kw, in_c, out_c),), lambda k: k.transpose(3, 2, 0, 1))
        ]
    elif conv.groups == out_c and in_c == 1:
        rules = [
            Rule(
                f"{target}.weight",
                (f"{source}/depthwise_kernel",),
                ((kh, kw, out_c, 1),),
                lambda k: k.transpose(2, 3, 0, 1),
            )
        ]
    else:
        raise ConversionError(f"no deeplab2 layout for the grouped convolution {target}")
    if conv.bias is not None:
        rules.append(Rule(f"{target}.bias", (f"{source}/bias",), ((out_c,),), lambda b: b))
    return rules


def _norm_rules(target: str, source: str, norm: nn.Module) -> List[Rule]:
    c = norm.weight.shape[0]
    rules = [
        Rule(f"{target}.weight", (f"{source}/gamma",), ((c,),), lambda g: g),
        Rule(f"{target}.bias", (f"{source}/beta",), ((c,),), lambda b: b),
    ]
    if isinstance(norm, nn.BatchNorm2d):
        rules += [
            Rule(f"{target}.running_mean", (f"{source}/moving_mean",), ((c,),), lambda m: m, False),
            Rule(f"{target}.running_var", (f"{source}/moving_variance",), ((c,),), lambda v: v, False),
        ]
    return rules


def _mbconv_rules(target: str, source: str, block: MBConvBlock) -> List[Rule]:
    rules = []
    shortcut = block.shortcut
    if isinstance(shortcut, nn.Sequential):  # strided: pool, then a conv only when widths differ
        shortcut = shortcut.conv
    if isinstance(shortcut, nn.Conv2d):
        conv_target = f"{target}.shortcut.conv" if isinstance(block.shortcut, nn.Sequential) else f"{target}.shortcut"
        rules += _conv_rules(conv_target, f"{source}/shortcut_conv", shortcut)
    rules += _norm_rules(f"{target}.pre_norm", f"{source}/pre_norm", block.pre_norm)
    rules += _conv_rules(f"{target}.conv1_1x1", f"{source}/expand_conv", block.conv1_1x1)
    rules += _norm_rules(f"{target}.norm1", f"{source}/expand_norm", block.norm1)
    rules += _conv_rules(f"{target}.conv2_kxk", f"{source}/depthwise_conv", block.conv2_kxk)
    rules += _norm_rules(f"{target}.norm2", f"{source}/depthwise_norm", block.norm2)
    if not isinstance(block.se, nn.Identity):
        rules += _conv_rules(f"{target}.se.fc1", f"{source}/se/reduce_conv2d", block.se.fc1)
        rules += _conv_rules(f"{target}.se.fc2", f"{source}/se/expand_conv2d", block.se.fc2)
    rules += _conv_rules(f"{target}.conv3_1x1", f"{source}/shrink_conv", block.conv3_1x1)
    return rules


def _fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    # [C, heads, 32] each -> rows (q | k | v), each head-major, as Attention splits qkv's output.
    return np.concatenate([w.reshape(w.shape[0], -1).T for w in (q, k, v)], axis=0)


def _attention_rules(target: str, source: str, attn: nn.Module) -> List[Rule]:
    dim = attn.proj.weight.shape[0]
    heads, head_dim = attn.num_heads, attn.qkv.weight.shape[0] // (3 * attn.num_heads)
    qkv = tuple(f"{source}/{p}" for p in "qkv")
    rules = [
        Rule(f"{target}.qkv.weight", tuple(f"{n}/weight" for n in qkv), ((dim, heads, head_dim),) * 3, _fuse_qkv),
        Rule(
            f"{target}.qkv.bias",
            tuple(f"{n}/bias" for n in qkv),
            ((heads, head_dim),) * 3,
            lambda q, k, v: np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)]),
        ),
        Rule(
            f"{target}.proj.weight",
            (f"{source}/o/weight",),
            ((heads, head_dim, dim),),
            lambda o: o.reshape(heads * head_dim, dim).T,
        ),
        Rule(f"{target}.proj.bias", (f"{source}/o/bias",), ((dim,),), lambda b: b),
    ]
    if attn.rel_pos is not None:
        table = attn.rel_pos.relative_position_bias_table
        rules.append(
            Rule(
                f"{target}.rel_pos.relative_position_bias_table",
                (f"{source}/relative_position_embedding",),
                (tuple(table.shape),),
                lambda t: t,
            )
        )
    return rules


def deeplab2_rules(model: MOAT) -> List[Rule]:
    """Every weight of ``model`` (all of its state dict but ``num_batches_tracked``, which TF has
    no counterpart for) with the deeplab2 variables it comes from."""
    rules = _conv_rules("stem.conv1", "stem/conv_0", model.stem.conv1)
    rules += _norm_rules("stem.norm1", "stem/norm_0", model.stem.norm1)
    rules += _conv_rules("stem.conv2", "stem/conv_1", model.stem.conv2)
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage.blocks):
            target, source = f"stages.{s}.blocks.{b}", f"block_{s:02d}_{b:02d}"
            if isinstance(block, MOATBlock):
                rules += _mbconv_rules(f"{target}.mbconv", source, block.mbconv)
                rules += _norm_rules(f"{target}.attn_norm", f"{source}/attention_norm", block.attn_norm)
                rules += _attention_rules(f"{target}.attn", f"{source}/attention", block.attn)
            elif isinstance(block, MBConvBlock):
                rules += _mbconv_rules(target, source, block)
            else:
                raise ConversionError(f"no deeplab2 mapping for {type(block).__name__} at {target}")
    rules += _norm_rules("head.norm", "final_layer_norm", model.head.norm)
    fc = model.head.fc
    if isinstance(fc, nn.Linear):
        classes, c = fc.weight.shape
        rules += [
            Rule("head.fc.weight", ("logits_head/kernel",), ((1, 1, c, classes),), lambda k: k[0, 0].T),
            Rule("head.fc.bias", ("logits_head/bias",), ((classes,),), lambda b: b),
        ]
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    targets = [r.target for r in rules]
    if len(set(targets)) != len(targets) or set(targets) != expected:
        raise ConversionError(
            f"the deeplab2 mapping does not cover this model: unmapped "
            f"{sorted(expected - set(targets))[:4]}, unknown {sorted(set(targets) - expected)[:4]}"
        )
    sources = [n for r in rules for n in r.sources]
    assert len(set(sources)) == len(sources), "a deeplab2 variable mapped twice"
    return rules


def candidate_names(source: str) -> List[str]:
    """Checkpoint names a deeplab2 variable may have, preferred first: the graph-mode name under
    ``moat/``, the name without that scope, and for the stem the Keras eager name (deeplab2's
    loader looks stem variables up with an added ``moat/stem/`` scope)."""
    names = [SCOPE + source, source]
    if source.startswith("stem/"):
        names.append(source[len("stem/") :])
    return names


# ------------------------------------------------------------------------------------- conversion
@dataclass
class ConversionReport:
    """What the converter found and used (also saved as ``converted_from``)."""

    weights: str  # 'ema' or 'raw'
    entries: int  # checkpoint entries
    used: int = 0  # entries read
    ema: int = 0  # of those, EMA copies
    raw: int = 0  # of those, raw variables
    raw_fallback: int = 0  # non-trainable read raw because no EMA copy exists
    renamed: int = 0  # found under an alternative name (no 'moat/' scope, ...)
    bn_statistics: str = "checkpoint"  # 'checkpoint', 'missing', or 'calibrated: ...'
    head: str = "checkpoint"  # 'checkpoint' or 'fresh'
    ignored: List[str] = field(default_factory=list)  # optimizer slots, global_step
    leftover: List[str] = field(default_factory=list)  # anything else not used
    global_step: Optional[int] = None


def _find(reader: BundleReader, source: str, ema: bool) -> Optional[str]:
    for name in candidate_names(source):
        if (name + EMA_SUFFIX if ema else name) in reader.entries:
            return name + EMA_SUFFIX if ema else name
    return None


def _pick(reader: BundleReader, source: str, trainable: bool, use_ema: bool) -> Tuple[Optional[str], str]:
    """(checkpoint name or None, the name to report when missing)."""
    if use_ema:
        found = _find(reader, source, ema=True)
        if found is None and not trainable:
            found = _find(reader, source, ema=False)
        return found, SCOPE + source + EMA_SUFFIX
    return _find(reader, source, ema=False), SCOPE + source


def head_classes(reader: BundleReader) -> Optional[int]:
    """Classes of the checkpoint's ``logits_head``, or None when it has no head."""
    for ema in (True, False):
        name = _find(reader, "logits_head/kernel", ema)
        if name is not None and len(reader.entries[name].shape) == 4:
            return int(reader.entries[name].shape[-1])
    return None


_BLOCK = re.compile(r"^(?:moat/)?(block_\d+_\d+)/")


def _check_leftovers(leftover: List[str], rules: List[Rule], label: str) -> None:
    """Leftovers that mean the wrong variant, not a stray variable: blocks the model lacks (a
    deeper variant of the same widths, e.g. moat_1 as moat_0) or position embeddings for a
    ``_no_pe`` model. Either would convert "successfully" into a model that is not the release."""
    blocks = {m.group(1) for r in rules for s in r.sources if (m := _BLOCK.match(s))}
    for name in leftover:
        m = _BLOCK.match(name)
        if m and m.group(1) not in blocks:
            raise ConversionError(
                f"{name}: the checkpoint has a block ({m.group(1)}) that {label} lacks "
                f"(wrong --model? a deeper variant has the same widths)"
            )
        if "relative_position_embedding" in name:
            raise ConversionError(
                f"{name}: the checkpoint has relative position embeddings and {label} has "
                f"none (wrong --model? use the variant without _no_pe)"
            )


def convert_weights(
    reader: BundleReader,
    model: MOAT,
    weights: str = "auto",
    allow_missing_bn: bool = False,
    label: str = "the model",
    log: Callable[[str], None] = lambda s: None,
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """``model``'s full state dict filled from ``reader``, and a report.

    Args:
        weights: 'ema' (EMA copies, required), 'raw', or 'auto' (EMA when the file has any).
        allow_missing_bn: a file without any BatchNorm moving statistics converts (they stay
            0 / 1, to be calibrated); otherwise it is an error.
        label: how errors name the model (the ``--model`` value).
    Raises:
        ConversionError: a variable missing or of the wrong shape (the first named, in model order).
    """
    has_ema = any(n.endswith(EMA_SUFFIX) for n in reader.entries)
    if weights == "auto":
        weights = "ema" if has_ema else "raw"
        if not has_ema:
            log("note: the checkpoint has no EMA copies (/ExponentialMovingAverage): converting the raw weights")
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema', 'raw' or 'auto', got {weights!r}")
    use_ema = weights == "ema"
    report = ConversionReport(weights=weights, entries=len(reader))
    rules = deeplab2_rules(model)

    head_present = head_classes(reader) is not None
    bn_rules = [r for r in rules if not r.trainable]
    bn_missing = bool(bn_rules) and all(_pick(reader, r.sources[0], False, use_ema)[0] is None for r in bn_rules)
    if bn_missing:
        report.bn_statistics = "missing"
        if not allow_missing_bn:
            raise ConversionError(
                f"the checkpoint holds no BatchNorm moving statistics (e.g. {SCOPE}{bn_rules[0].sources[0]}); "
                f"re-estimate them with --calibrate-bn TRAIN_IMAGE_FOLDER"
            )

    def absent_but_optional(rule: Rule) -> bool:
        if bn_missing and not rule.trainable:
            return True  # left at 0 / 1 for --calibrate-bn
        # Without logits_head the whole head may be absent (a backbone release): it starts fresh.
        return (
            not head_present
            and rule.target.startswith("head.")
            and _pick(reader, rule.sources[0], rule.trainable, use_ema)[0] is None
        )

    chosen: Dict[str, List[str]] = {}
    problems: List[str] = []
    for rule in rules:
        if absent_but_optional(rule):
            continue
        names = []
        for source, want in zip(rule.sources, rule.tf_shapes):
            name, wanted = _pick(reader, source, rule.trainable, use_ema)
            if name is None:
                hint = " (wrong --model?)"
                if use_ema and _find(reader, source, ema=False) is not None:
                    hint = " (its raw value is there: --raw converts the raw weights)"
                elif not use_ema and _find(reader, source, ema=True) is not None:
                    hint = " (only its EMA copy is there: convert with --ema)"
                problems.append(f"variable missing from the checkpoint: {wanted}{hint}")
                continue
            got = tuple(reader.entries[name].shape)
            if got != tuple(want):
                problems.append(
                    f"{name}: shape {list(got)} in the checkpoint, but {label} needs {list(want)} (wrong --model?)"
                )
            names.append(name)
        if len(names) == len(rule.sources):
            chosen[rule.target] = names
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConversionError(problems[0] + more)

    known = {c + suffix for r in rules for s in r.sources for c in candidate_names(s) for suffix in ("", EMA_SUFFIX)}
    for name in reader.entries:
        if name not in known:
            (report.ignored if _IGNORED.search(name) else report.leftover).append(name)
    _check_leftovers(report.leftover, rules, label)

    state = dict(model.state_dict())  # unconverted entries (num_batches_tracked, a fresh head) as they are
    by_target = {r.target: r for r in rules}
    for target, names in chosen.items():
        arrays = [reader.read(n) for n in names]
        value = np.ascontiguousarray(by_target[target].convert(*arrays))
        tensor = torch.from_numpy(value).to(state[target].dtype)
        if tensor.shape != state[target].shape:  # a mapping bug, not a user error
            raise AssertionError(
                f"{target}: converted to {tuple(tensor.shape)}, model has {tuple(state[target].shape)}"
            )
        state[target] = tensor
        for n in names:
            report.used += 1
            report.ema += n.endswith(EMA_SUFFIX)
            report.raw += not n.endswith(EMA_SUFFIX)
            report.raw_fallback += use_ema and not n.endswith(EMA_SUFFIX)
            report.renamed += not n.startswith(SCOPE)

    if not head_present:
        report.head = "fresh"
        log(
            "note: the checkpoint has no classification head (moat/logits_head): converting the "
            "backbone; the head starts fresh"
        )
    if "global_step" in reader.entries and reader.entries["global_step"].shape == ():
        with contextlib.suppress(BundleError):
            report.global_step = int(reader.read("global_step"))
    return state, report


def load_deeplab2(
    checkpoint: str,
    model: Union[str, MOAT],
    weights: str = "auto",
    allow_missing_bn: bool = False,
    num_classes: Optional[int] = None,
    pool_size: int = 2,
    verify_crc: bool = True,
    label: Optional[str] = None,
    log: Callable[[str], None] = lambda s: None,
) -> Tuple[MOAT, ConversionReport, str]:
    """A MOAT holding the weights of a deeplab2 checkpoint (archive, folder or prefix).

    ``model`` is a registered variant name (built with the checkpoint's class count, or
    ``num_classes`` when the file has no head, and ``pool_size``) or an already-built MOAT, filled
    in place: the way in for architectures that are not registered. Returns
    ``(model, report, checkpoint prefix)``.
    """
    label = label or (model if isinstance(model, str) else "the model")
    if isinstance(model, str) and model not in list_variants():
        raise ConversionError(f"unknown --model {model!r}; accepted: {', '.join(list_variants())}")
    with open_checkpoint(checkpoint, verify_crc=verify_crc, log=log) as (reader, prefix):
        log(f"reading {prefix}: {len(reader)} entries")
        found = head_classes(reader)
        if found and num_classes and num_classes != found:
            raise ConversionError(
                f"the checkpoint's head has {found} classes, not {num_classes} (--num-classes, "
                f"--class-names); for another class count, convert, then fine-tune with "
                f"main.py --pretrained"
            )
        if isinstance(model, str):
            torch.manual_seed(0)  # a fresh head (no head in the file) is reproducible
            model = create_moat(model, num_classes=found or num_classes or 1000, pool_size=pool_size)
        state, report = convert_weights(
            reader, model, weights=weights, allow_missing_bn=allow_missing_bn, label=label, log=log
        )
    model.load_state_dict(state)
    return model.eval(), report, prefix


# ------------------------------------------------------------------------------------ checkpoints
def _find_prefixes(folder: str) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f[: -len(".index")]) for f in sorted(files) if f.endswith(".index")]
    return found


def _state_file_prefix(folder: str) -> Optional[str]:
    """The checkpoint a TF ``checkpoint`` state file names, if any."""
    path = os.path.join(folder, "checkpoint")
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', f.read(), re.M)
    return os.path.join(folder, m.group(1)) if m else None


def _prefix_in(folder: str, source: str) -> str:
    prefixes = _find_prefixes(folder)
    if len(prefixes) == 1:
        return prefixes[0]
    for root in sorted({os.path.dirname(p) for p in prefixes}):
        named = _state_file_prefix(root)
        if named and named in prefixes:
            return named
    if not prefixes:
        raise ConversionError(f"{source}: no TensorFlow checkpoint (*.index file) inside")
    names = ", ".join(os.path.relpath(p, folder) for p in prefixes[:5])
    raise ConversionError(f"{source}: holds several checkpoints ({names}); unpack it and pass one prefix")


@contextlib.contextmanager
def open_checkpoint(
    path: str, verify_crc: bool = True, log: Callable[[str], None] = lambda s: None
) -> Iterator[Tuple[BundleReader, str]]:
    """``(reader, prefix)`` for a release archive, a folder or a checkpoint prefix; an archive is
    unpacked into a temporary folder that is removed afterwards."""
    with contextlib.ExitStack() as stack:
        if os.path.isfile(path) and not path.endswith(".index") and ".data-" not in os.path.basename(path):
            if not tarfile.is_tarfile(path):
                raise ConversionError(
                    f"{path}: neither a .tar.gz archive nor a checkpoint prefix "
                    f"(pass PREFIX for PREFIX.index + PREFIX.data-*)"
                )
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="moat_convert_"))
            log(f"unpacking {path} into {folder}")
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(folder, filter="data")  # no absolute paths, links out, devices
            except (tarfile.TarError, EOFError, OSError, ValueError) as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConversionError(f"{path}: cannot unpack ({reason})") from None
            prefix = _prefix_in(folder, path)
        elif os.path.isdir(path):
            prefix = _prefix_in(path, path)
        else:
            prefix = re.sub(r"(\.index|\.data-\d+-of-\d+)$", "", path)
        reader = stack.enter_context(BundleReader(prefix, verify_crc=verify_crc))
        yield reader, prefix


def _plain(value):
    """A plain-container copy for ``torch.load(weights_only=True)`` and JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def converted_config(
    variant: str,
    num_classes: int,
    img_size: int,
    normalization: int,
    crop_pct: Optional[float] = None,
    pool_size: int = 2,
) -> dict:
    """The trainer's default config tree (``config.config_to_dict``) with the release's model,
    classes, input size and normalisation (0..1 convention: option 2 is mean = std = 0.5)."""
    from config import config_to_dict, get_config

    tree = config_to_dict(get_config())
    mean, std = NORMALIZATION[normalization]
    tree["MODEL"]["NAME"] = variant
    tree["MODEL"]["NUM_CLASSES"] = int(num_classes)
    tree["MODEL"]["MOAT"]["POOL_SIZE"] = int(pool_size)
    tree["DATA"]["IMG_SIZE"] = int(img_size)
    tree["DATA"]["MEAN"] = [round(m / 255.0, 6) for m in mean]
    tree["DATA"]["STD"] = [round(s / 255.0, 6) for s in std]
    # The authors' eval crop is not published; 384/512 evaluation conventionally uses no crop
    # margin (as configs/*_384_ft.yaml), 224/256 the default 0.875.
    if crop_pct is None:
        crop_pct = 1.0 if img_size >= 384 else tree["DATA"]["CROP_PCT"]
    tree["DATA"]["CROP_PCT"] = float(crop_pct)
    return tree


# --------------------------------------------------------------------------------- BN calibration
@torch.no_grad()
def calibrate_bn(
    model: nn.Module,
    folder: str,
    config_tree: dict,
    num_images: int = 4000,
    batch_size: int = 64,
    num_workers: int = 4,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> int:
    """Re-estimate every BatchNorm's running mean / variance over ``num_images`` images of
    ``folder`` (searched recursively, a seeded random subset), with the eval transform of
    ``config_tree``; returns the number of images used.

    Cumulative average (``momentum=None``) of the batch statistics, BatchNorms in train mode and
    everything else in eval mode (no drop path), no gradient: ``torch.optim.swa_utils.update_bn``
    without its ``model.train()``. For files released without moving statistics.
    """
    from torch.utils.data import DataLoader

    from config import config_from_dict
    from data.transforms import build_transform
    from tools.predict import ImageFiles, find_images

    paths, _ = find_images([folder])
    if num_images < 1:
        raise ConversionError("--calibrate-images must be >= 1")
    # A random subset in random order: sorted paths put one class per batch, and the mean of
    # per-batch variances would then miss the variance between classes.
    paths = random.Random(seed).sample(paths, min(num_images, len(paths)))
    config = config_from_dict(config_tree)
    dataset = ImageFiles(paths, build_transform(False, config), config.DATA.IMG_SIZE)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=min(num_workers, len(paths)))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.to(device).eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for images, errors in loader:
            bad = next((e for e in errors if e), None)
            if bad:
                raise ConversionError(bad)
            model(images.to(device))
            seen += len(images)
            log(f"calibrating BatchNorm statistics: {seen}/{len(paths)} images")
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return seen


# ------------------------------------------------------------------------------------------- CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "MOAT convert deeplab2",
        add_help=add_help,
        description="Convert a released deeplab2 MOAT TensorFlow checkpoint to a trainer checkpoint "
        "or safetensors file (no TensorFlow needed).",
    )
    parser.add_argument("checkpoint", help="release .tar.gz, a folder with one checkpoint, or a checkpoint prefix")
    parser.add_argument("--model", required=True, help="our variant name (see the README's official weights table)")
    parser.add_argument("--output", help="output file: .pth (trainer checkpoint) or .safetensors")
    parser.add_argument(
        "--timm-folder", metavar="DIR", help="also (or only) write a timm hub folder: config.json + model.safetensors"
    )
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument(
        "--ema",
        dest="weights",
        action="store_const",
        const="ema",
        default="auto",
        help="the EMA weights (default when the file has them; error if it has none)",
    )
    ema.add_argument("--raw", dest="weights", action="store_const", const="raw", help="the raw (non-EMA) weights")
    parser.add_argument(
        "--safetensors", action="store_true", help="also write OUTPUT with the suffix .safetensors next to the .pth"
    )
    parser.add_argument(
        "--class-names", metavar="FILE", help="class names, one per line (default: class_0, class_1, ...)"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="head size when the file has no classification head (default 1000)",
    )
    parser.add_argument(
        "--img-size", type=int, default=None, help="DATA.IMG_SIZE to record (default: the release's input size)"
    )
    parser.add_argument(
        "--normalization",
        type=int,
        choices=(1, 2),
        default=None,
        help="input normalisation option of the release notes (default: the release's)",
    )
    parser.add_argument(
        "--crop-pct",
        type=float,
        default=None,
        help="DATA.CROP_PCT to record (default 0.875 below 384 px, 1.0 from 384)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        choices=(2, 3),
        default=2,
        help="MODEL.MOAT.POOL_SIZE to record: the shortcut pooling, no weights (default 2, "
        "deeplab2's value for classification; the releases do not state theirs)",
    )
    parser.add_argument(
        "--calibrate-bn",
        metavar="FOLDER",
        help="re-estimate the BatchNorm statistics over training images in FOLDER "
        "(for files without moving statistics)",
    )
    parser.add_argument("--calibrate-images", type=int, default=4000, help="images for --calibrate-bn (default 4000)")
    parser.add_argument("--batch-size", type=int, default=64, help="--calibrate-bn batch size")
    parser.add_argument("--num-workers", type=int, default=4, help="--calibrate-bn decoding workers")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="--calibrate-bn device ('auto' uses CUDA when available)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum verification")
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_class_names(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise ConversionError(f"class-names file not found: {path}")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ConversionError(f"{path}: no class names in the file")
    return names


def convert(args: argparse.Namespace, model: Optional[nn.Module] = None) -> Dict[str, str]:
    """Run the conversion ``args`` describe; returns ``{format: path}`` of the files written.

    ``model``: an already-built MOAT to fill instead of ``create_moat(args.model)`` (custom
    architectures); ``args.model`` then only names it in the files.
    """
    from checkpoints import ModelMeta, preprocessing_from_config, save_safetensors, weights_checkpoint
    from config import config_from_dict
    from utils.checkpoint_io import atomic_save

    release = RELEASES.get(args.model)
    img_size = args.img_size or (release.img_size if release else 224)
    if img_size <= 0 or img_size % 32:
        raise ConversionError(f"--img-size must be a positive multiple of 32, got {img_size}")
    option = args.normalization or (release.normalization if release else 1)
    class_names = _read_class_names(args.class_names) if args.class_names else None
    output = args.output
    if output is None and not args.timm_folder:
        raise ConversionError("nothing to write: give --output FILE and/or --timm-folder DIR")
    if output is None:
        outputs = {}
    elif output.endswith(".safetensors"):
        outputs = {"safetensors": output}
    else:
        outputs = {"pth": output}
        if args.safetensors:
            outputs["safetensors"] = os.path.splitext(output)[0] + ".safetensors"

    model, report, prefix = load_deeplab2(
        args.checkpoint,
        model if model is not None else args.model,
        weights=args.weights,
        allow_missing_bn=bool(args.calibrate_bn),
        verify_crc=not args.no_verify,
        label=args.model,
        log=_log,
        num_classes=args.num_classes or (len(class_names) if class_names else None),
        pool_size=args.pool_size,
    )
    num_classes = model.num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise ConversionError(f"{args.class_names}: {len(class_names)} class names for a {num_classes}-class head")
    class_names = class_names or [f"class_{i}" for i in range(num_classes)]
    if num_classes == 1001:
        _log("note: 1001 classes: probably TF-slim's background class at index 0 (ImageNet folders have 1000)")

    what = "EMA" if report.weights == "ema" else "raw"
    _log(
        f"weights: {what}: {report.used} entries used ({report.ema} EMA copies, {report.raw} raw"
        + (f", of which {report.raw_fallback} non-trainable without EMA copy" if report.raw_fallback else "")
        + ")"
        + (f"; {report.renamed} found under an alternative name" if report.renamed else "")
    )
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    _log(
        f"BatchNorm moving statistics: {'found' if report.bn_statistics == 'checkpoint' else 'not in the checkpoint'}"
        f" ({n_bn} layers)"
    )
    if report.ignored:
        _log(f"ignored {len(report.ignored)} optimizer-slot / step entries")
    if report.leftover:
        _log(f"leftover checkpoint entries (not used): {len(report.leftover)}")
        for name in report.leftover:
            _log(f"  {name}")

    config_tree = converted_config(args.model, num_classes, img_size, option, args.crop_pct, args.pool_size)
    if args.calibrate_bn:
        from utils.distributed import resolve_device

        device = resolve_device(args.device, 0)
        seen = calibrate_bn(
            model,
            args.calibrate_bn,
            config_tree,
            args.calibrate_images,
            args.batch_size,
            args.num_workers,
            device,
            log=_log,
        )
        model.to("cpu")
        replaced = " (replacing the checkpoint's)" if report.bn_statistics == "checkpoint" else ""
        report.bn_statistics = f"calibrated over {seen} images of {args.calibrate_bn}{replaced}"
        _log(f"BatchNorm statistics {report.bn_statistics}")

    mean, std = NORMALIZATION[option]
    converted_from = _plain(
        {
            "source": args.checkpoint,
            "checkpoint": os.path.basename(prefix),
            "format": "deeplab2 TF1 name-based checkpoint",
            "weights": report.weights,
            "entries": report.entries,
            "used": report.used,
            "ema_entries_used": report.ema,
            "raw_entries_used": report.raw,
            "bn_statistics": report.bn_statistics,
            "head": report.head,
            "ignored": report.ignored,
            "leftover": report.leftover,
            "global_step": report.global_step,
            "normalization": {"option": option, "mean_0_255": list(mean), "std_0_255": list(std)},
            "tool": "tools/convert_deeplab2.py",
        }
    )
    written = {}
    if "pth" in outputs:
        os.makedirs(os.path.dirname(os.path.abspath(outputs["pth"])), exist_ok=True)
        atomic_save(weights_checkpoint(model, args.model, class_names, config_tree, converted_from), outputs["pth"])
        written["pth"] = outputs["pth"]
    if "safetensors" in outputs:
        config = config_from_dict(config_tree)
        meta = ModelMeta(
            variant=args.model,
            num_classes=num_classes,
            class_names=class_names,
            preprocessing=preprocessing_from_config(config),
            config=config,
            weights=report.weights,
            source=args.checkpoint,
            model_cfg=model.cfg.to_dict(),
        )
        save_safetensors(
            model,
            meta,
            outputs["safetensors"],
            extra_metadata={"moat.converted_from": json.dumps(converted_from, sort_keys=True)},
        )
        written["safetensors"] = outputs["safetensors"]
    if args.timm_folder:
        from models.hub import save_timm_folder

        preprocessing = preprocessing_from_config(config_from_dict(config_tree))
        origin = RELEASE_URL + release.file if release else None
        written["timm-folder"] = save_timm_folder(model, args.timm_folder, class_names, preprocessing, origin)
    for path in written.values():
        print(
            f"wrote {path} ({args.model}, {what} weights, {num_classes} classes, {img_size} px, "
            f"normalisation option {option})"
        )
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: the exit code (0, or 2 for a user error)."""
    return run_tool("convert_deeplab2.py", lambda: convert(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
