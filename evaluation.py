"""``main.py --eval``: which checkpoint, with which preprocessing and architecture, at which sizes,
and the reports (``reports.eval_reports``) that come out of it. Never trains.

The checkpoint decides what it can know better than the run's config: its architecture (custom
ones included, from its ``model_cfg``) and its normalisation (``DATA.MEAN/STD``); the config
decides the data, the resolution(s) and the crop.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn
from yacs.config import CfgNode

from checkpoints import BEST, CheckpointRecord, preprocessing_from_config, read_checkpoint, scan_run_folder
from config import with_values
from data import build_loader
from engine import Feed, evaluate
from models import build_model, create_moat, moat_overrides_from_config
from reports.eval_reports import (
    config_digest,
    format_sizes_table,
    report_base,
    reports_dir,
    sizes_rows,
    write_eval_reports,
    write_sizes_table,
)
from utils import UserError
from utils.checkpoint_io import load_model_weights
from utils.class_subset import ClassSubset, match_classes, present_labels
from utils.distributed import DistInfo, on_every_rank
from utils.metrics import ConfusionMatrix


def run_eval(
    config: CfgNode,
    info: DistInfo,
    logger: logging.Logger,
    output_dir: str,
    eval_sizes: "EvalSizes",
    feed: Feed,
    precision: str,
) -> int:
    """``--eval``: choose the checkpoint, adopt its preprocessing and architecture, read the val
    split only (a val folder alone is enough), validate the checkpoint (its EMA too, when it has
    one) at every size, and write the reports (``reports.eval_reports``) to
    ``<checkpoint folder>/eval/``. Never trains.

    A val set with fewer classes than the model is scored on its own classes, matched by name
    to the checkpoint's (``utils.class_subset``).
    """
    # Every rank reads the same checkpoint: an error they all meet is reported once.
    record = on_every_rank(lambda: checkpoint_to_evaluate(config, output_dir, logger), info)
    source = record.path
    config = with_checkpoint_preprocessing(config, record, logger)
    config = on_every_rank(lambda: with_checkpoint_classes(config, record, logger), info)
    # Every rank reads the same folder: a data error they all meet is reported once.
    loaders = on_every_rank(lambda: build_loader(config, info, with_train=False), info)
    dataset_val, loader_val = loaders.val_dataset, loaders.val
    model = build_model_for(config, record).to(info.device, memory_format=feed.memory_format)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        f"model {model_name_of(config, record)}: {n_params / 1e6:.2f}M params, "
        f"{'channels_last' if config.CHANNELS_LAST else 'NCHW'}, {len(dataset_val.classes)} classes, "
        f"{len(dataset_val)} val images"
    )
    pairs = eval_sizes.pairs(config)
    for img_size, _ in pairs:  # every size is checked before anything is evaluated
        try:
            model.cfg.check_img_size(img_size)
        except ValueError as e:
            raise UserError(f"cannot evaluate at {img_size} px: {e}") from None
    num_outputs = model.get_classifier().out_features
    subset = match_classes(dataset_val.classes, present_labels(dataset_val), record.class_names, num_outputs, source)
    class_names = subset.names if subset is not None else [str(c) for c in dataset_val.classes]
    if subset is not None:
        logger.info(
            f"scoring {len(subset.names)} of the {num_outputs} classes of {source} (the val set's, "
            "matched by name): logits restricted to them"
        )
    weights = dict(record.state_dicts)
    folder = reports_dir(source, output_dir, logger) if info.is_primary else ""
    table = []
    for img_size, crop_pct in pairs:
        sized = with_values(config, {"DATA.IMG_SIZE": img_size, "DATA.CROP_PCT": crop_pct})
        loader = loader_val if sized is config else build_loader(sized, info, with_train=False).val
        logger.info(f"evaluating {source} at {img_size} px (crop {crop_pct})")
        results, confusions = {}, {}
        for name, state in weights.items():
            load_model_weights(model, state, source)
            confusion = ConfusionMatrix(len(class_names), info.device)
            results[name] = evaluate(
                model,
                loader,
                feed,
                logger=logger,
                print_freq=config.PRINT_FREQ,
                name=name,
                subset=subset,
                confusion=confusion,
                show_progress=info.is_primary,
            )
            confusions[name] = confusion.compute()  # collective: every rank takes part
        table += sizes_rows(img_size, crop_pct, results)
        reported = reported_result(config, record, results)
        logger.info(f"at {img_size} px: {describe_reported(reported, record)}")
        if info.is_primary:
            summary = eval_summary(sized, record, dataset_val, subset, class_names, precision, info)
            path = write_eval_reports(
                folder,
                report_base(source, img_size),
                summary={**summary, "reported": reported},
                results=results,
                confusions=confusions,
                class_names=class_names,
            )
            logger.info(f"eval reports: {path} (and the per-class CSV and confusion PNG beside it)")
    if eval_sizes.sweep:
        logger.info(format_sizes_table(table, title=f"{source} by input size:"))
        if info.is_primary:
            stem = os.path.splitext(os.path.basename(source))[0]
            logger.info(f"size table: {write_sizes_table(os.path.join(folder, f'{stem}-sizes.csv'), table)}")
    return 0


def reported_result(config: CfgNode, record: CheckpointRecord, results: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    """The eval JSON's "reported": which entry of ``results`` is the recipe's number
    (TRAIN.REPORT.WEIGHTS: the EMA's when the file has one), whether those weights are an EMA,
    and whether ``record`` is the checkpoint the recipe reports (TRAIN.REPORT.CHECKPOINT: the
    final epoch's, or the best one's). ``is_last`` / ``is_best`` are null where the file cannot
    say: weights without a training position; ``is_best`` without a ``best.pth`` beside the file
    (the file is the best when ``best.pth`` holds the same training position: a hard link, or a
    copy of one)."""
    weights = "ema" if config.TRAIN.REPORT.WEIGHTS == "ema" and "ema" in results else "model"
    single = record.single_set if not record.has_ema else None
    is_last = is_best = None
    position = record.position
    if position is not None and record.config is not None:
        is_last = position.epoch_complete and position.epoch == record.config.TRAIN.EPOCHS - 1
        best = os.path.join(os.path.dirname(os.path.abspath(record.path)), BEST)
        if os.path.isfile(best):
            try:
                is_best = read_checkpoint(best, mmap=True).position == position
            except UserError:
                is_best = None
    checkpoint = config.TRAIN.REPORT.CHECKPOINT
    return {
        "weights": weights,
        "ema": weights == "ema" or single == "ema",
        "top1": results[weights]["acc1"],
        "top5": results[weights]["acc5"],
        "checkpoint": checkpoint,
        "is_last": is_last,
        "is_best": is_best,
        "is_reported_checkpoint": is_last if checkpoint == "last" else is_best,
    }


def describe_reported(reported: Dict[str, Any], record: CheckpointRecord) -> str:
    """``reported`` (``reported_result``) as a sentence for the log."""
    text = (
        f"reported top-1 {reported['top1']:.3f}: the {'EMA' if reported['ema'] else 'raw'} weights "
        f"('{reported['weights']}') of {record.path}"
    )
    matches, checkpoint = reported["is_reported_checkpoint"], reported["checkpoint"]
    epochs = record.config.TRAIN.EPOCHS if record.config is not None else None
    if record.position is None:
        return text + f", a file without a training position (TRAIN.REPORT.CHECKPOINT {checkpoint} cannot be checked)"
    where = f"epoch {record.position.epoch}" + (f" of 0..{epochs - 1}" if epochs else "")
    if matches:
        return text + f", the {checkpoint} checkpoint of its run ({where})"
    if matches is None:
        return text + f" ({where}; whether it is the {checkpoint} checkpoint is not recorded)"
    return text + f" ({where}): not the {checkpoint} checkpoint of its run, which TRAIN.REPORT.CHECKPOINT reports"


def checkpoint_to_evaluate(config: CfgNode, output_dir: str, logger: logging.Logger) -> CheckpointRecord:
    """The checkpoint ``--eval`` scores: MODEL.RESUME, MODEL.PRETRAINED, or the run folder's
    furthest checkpoint."""
    source = config.MODEL.RESUME or config.MODEL.PRETRAINED
    if source:
        return read_checkpoint(source)
    scan = scan_run_folder(output_dir)
    for _, why in scan.unusable:
        logger.warning(f"skipping unusable checkpoint: {why}")
    if scan.newest is None:
        raise UserError(
            f"--eval needs --resume CHECKPOINT or --pretrained WEIGHTS (no checkpoint found in {output_dir})"
        )
    return scan.newest


def with_checkpoint_preprocessing(config: CfgNode, record: CheckpointRecord, logger: logging.Logger) -> CfgNode:
    """The config with the normalisation (DATA.MEAN/STD) the checkpoint was trained with: a model
    evaluated with other statistics loses accuracy for no reason (converted official weights use
    mean/std 0.5 for some variants). Resolution and crop stay the config's, so any size can be
    evaluated."""
    saved = record.preprocessing
    if "mean" not in saved or "std" not in saved:
        return config
    mean, std = [float(v) for v in saved["mean"]], [float(v) for v in saved["std"]]
    if (mean, std) == (list(config.DATA.MEAN), list(config.DATA.STD)):
        return config
    logger.info(f"normalising with {record.path}'s DATA.MEAN {mean} / DATA.STD {std}")
    return with_values(config, {"DATA.MEAN": mean, "DATA.STD": std})


def with_checkpoint_classes(config: CfgNode, record: CheckpointRecord, logger: logging.Logger) -> CfgNode:
    """The config with MODEL.NUM_CLASSES of the checkpoint's head: the head is the checkpoint's
    whatever the config says, and a val folder may hold fewer classes (subset evaluation)."""
    classes = record.num_classes
    if classes is None or classes == config.MODEL.NUM_CLASSES:
        return config
    logger.info(
        f"{record.path} has a {classes}-class head (MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES}): "
        "evaluating with the checkpoint's"
    )
    return with_values(config, {"MODEL.NUM_CLASSES": classes})


def build_model_for(config: CfgNode, record: CheckpointRecord) -> nn.Module:
    """The config's model, or, when ``record`` holds an architecture (``model_cfg``), that one:
    ``--eval`` rebuilds what the file holds, custom architectures included. Attention windows
    the config sets explicitly (MODEL.MOAT.WINDOW_SIZE) still apply."""
    if not record.model_cfg:
        return build_model(config)
    overrides = {k: v for k, v in moat_overrides_from_config(config).items() if k == "window_size"}
    try:
        cfg = record.architecture().replace(**overrides)
        cfg.check_img_size(config.DATA.IMG_SIZE)
    except ValueError as e:
        raise UserError(f"cannot evaluate the checkpoint's architecture at this config: {e}") from None
    return create_moat(
        model_name_of(config, record),
        cfg=cfg,
        num_classes=config.MODEL.NUM_CLASSES,
        drop_rate=config.MODEL.DROP_RATE,
    )


def model_name_of(config: CfgNode, record: CheckpointRecord) -> str:
    if record.model_cfg:
        return str(record.model_name or config.MODEL.NAME)
    return config.MODEL.NAME


@dataclass(frozen=True)
class EvalSizes:
    """``--eval-sizes`` and ``--eval-crop-pcts``: the resolutions one ``--eval`` run covers.

    Without ``crop_pcts`` every size keeps the config's ``DATA.CROP_PCT`` (resize the short side
    to size / CROP_PCT, center-crop size): the usual way a model trained at one size is
    measured at others. Given, ``crop_pcts[i]`` is the crop of ``sizes[i]``.
    """

    sizes: Tuple[int, ...] = ()
    crop_pcts: Tuple[float, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EvalSizes":
        sizes, crops = tuple(args.eval_sizes or ()), tuple(args.eval_crop_pcts or ())
        if (sizes or crops) and not args.eval:
            raise UserError("--eval-sizes and --eval-crop-pcts need --eval")
        if crops and not sizes:
            raise UserError("--eval-crop-pcts needs --eval-sizes (one crop per size)")
        if crops and len(crops) != len(sizes):
            raise UserError(f"--eval-crop-pcts needs one value per size: {len(sizes)} sizes, {len(crops)} crops")
        if any(s <= 0 for s in sizes) or len(set(sizes)) != len(sizes):
            raise UserError(f"--eval-sizes must be distinct positive sizes, got {list(sizes)}")
        if any(not 0.0 < c <= 1.0 for c in crops):
            raise UserError(f"--eval-crop-pcts must lie in (0, 1], got {list(crops)}")
        return cls(sizes, crops)

    @property
    def sweep(self) -> bool:
        return bool(self.sizes)

    def pairs(self, config: CfgNode) -> List[Tuple[int, float]]:
        """``(img_size, crop_pct)`` per evaluation, in order (the config's alone by default)."""
        sizes = self.sizes or (config.DATA.IMG_SIZE,)
        crops = self.crop_pcts or (config.DATA.CROP_PCT,) * len(sizes)
        return list(zip(sizes, crops))


def eval_summary(
    config: CfgNode,
    record: CheckpointRecord,
    dataset_val,
    subset: Optional[ClassSubset],
    class_names: List[str],
    precision: str,
    info: DistInfo,
) -> Dict[str, Any]:
    """What an eval report says besides the numbers: which model, file, preprocessing and classes."""
    classes = (
        subset.describe()
        if subset is not None
        else {
            "subset": False,
            "count": len(class_names),
            "of": len(class_names),
            "names": list(class_names),
        }
    )
    return {
        "model_name": model_name_of(config, record),
        "checkpoint": os.path.abspath(record.path),
        "epoch": record.epoch,
        "img_size": int(config.DATA.IMG_SIZE),
        "preprocessing": preprocessing_from_config(config),
        "config_sha256": config_digest(config),
        "val_root": os.path.abspath(str(dataset_val.root)),
        # Images per class held out of val_root, the train split (DATA.VAL_HOLDOUT); 0: a val split.
        "val_holdout": int(config.DATA.VAL_HOLDOUT),
        "classes": classes,
        "precision": precision,
        "world_size": info.world_size,
    }
