"""Train, evaluate or benchmark a MOAT model: the trainer's entry point.

    torchrun --nproc_per_node=8 main.py --cfg configs/moat_0.yaml --data-path /data/imagenet
    python main.py --cfg configs/tiny_moat_0.yaml --data-path DATA --device cpu
    python main.py --cfg configs/moat_0.yaml --data-path DATA --eval --resume best.pth
    python main.py --cfg configs/moat_0.yaml --data-path DATA --throughput

``main`` -> ``run`` builds everything from the frozen config; ``train_one_epoch``, ``validate``
and ``throughput`` are the loops. User mistakes (bad flag, config, path, checkpoint, data) end
with a one-line message on stderr and exit code 2; a diverged run (NaN/Inf loss) with exit code 1.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from config import config_to_dict, get_config
from logger import close_logger, create_logger
from lr_scheduler import build_scheduler
from optimizer import build_optimizer, scaled_lrs
from utils import MoatError, NonFiniteLossError, UserError
from utils.amp import apex_available, autocast_factory, build_scaler, resolve_amp_dtype
from utils.checkpoint import (CheckpointSaver, capture_rng_state, config_differences, find_resumable,
                              load_file, load_model_weights, model_state_from, restore_rng_state)
from utils.distributed import (DistInfo, all_reduce_sum, any_rank, broadcast_object, gather_to_primary,
                               init_distributed, teardown)
from utils.run_lock import RunFolderLock
from utils.metrics import AverageMeter, ClassificationTotals
from utils.preemption import PreemptionFlag

SUMMARY_FIELDS = ["epoch", "train_loss", "lr", "val_loss", "val_top1", "val_top5", "ema_top1",
                  "ema_top5", "max_accuracy", "epoch_time_s"]


# ------------------------------------------------------------------------------------------ CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The trainer's flags; each one maps onto a config key (``--opts`` reaches the rest)."""
    p = argparse.ArgumentParser("MOAT training and evaluation", add_help=add_help)
    p.add_argument("--cfg", required=True, metavar="FILE", help="YAML config (see configs/)")
    p.add_argument("--opts", nargs="+", metavar="KEY VALUE",
                   help="override config keys, e.g. --opts TRAIN.EPOCHS 100 DATA.IMG_SIZE 256")
    p.add_argument("--batch-size", type=int, help="images per process per micro-step (DATA.BATCH_SIZE)")
    p.add_argument("--data-path", help="dataset root holding train/ and val/ (DATA.DATA_PATH)")
    p.add_argument("--dataset", choices=["imagenet", "imagefolder"], help="DATA.DATASET")
    p.add_argument("--pretrained", help="initialise from these weights only (MODEL.PRETRAINED)")
    p.add_argument("--resume", help="resume (or with --eval, evaluate) this checkpoint (MODEL.RESUME)")
    p.add_argument("--accumulation-steps", type=int, help="micro-steps per update (TRAIN.ACCUMULATION_STEPS)")
    # Switches default to None (not False) so that an absent flag leaves the config alone.
    p.add_argument("--use-checkpoint", action="store_true", default=None,
                   help="gradient checkpointing (saves memory)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (TRAIN.COMPILE)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout for the model and its inputs (CHANNELS_LAST, default on)")
    p.add_argument("--amp", choices=["off", "fp16", "bf16"],
                   help="mixed precision (default: bf16 where supported, else fp16 on CUDA)")
    p.add_argument("--amp-opt-level", choices=["O0", "O1", "O2"],
                   help="NVIDIA apex AMP level (only when apex is installed)")
    p.add_argument("--output", help="root of all outputs (OUTPUT); a run writes OUTPUT/MODEL.NAME/TAG")
    p.add_argument("--tag", help="run name (TAG)")
    p.add_argument("--eval", action="store_true", default=None, help="only validate the checkpoint, then exit")
    p.add_argument("--throughput", action="store_true", default=None,
                   help="only measure inference img/s, then exit")
    p.add_argument("--seed", type=int, help="SEED")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="DEVICE")
    # Old launchers (torch.distributed.launch) pass this; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Parse, run, and turn the user-error types into one line + exit code (no traceback)."""
    args = get_args_parser().parse_args(argv)  # argparse itself exits 2 on unknown flags
    try:
        if args.amp_opt_level and not apex_available():
            raise UserError("--amp-opt-level needs NVIDIA apex, which is not installed; "
                            "use --amp {off,fp16,bf16} (torch.amp) instead")
        config = get_config(args)
        return run(config)
    except MoatError as e:  # user errors (exit 2) and stopped runs (exit 1): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def run(config) -> int:
    """Join the process group, do the work, and always leave the group again."""
    info = init_distributed(config.DEVICE, config.LOCAL_RANK)
    clean = False
    try:
        code = _run(config, info)
        clean = True
        return code
    finally:
        close_logger()
        teardown(info, clean=clean)


def memory_format_of(config) -> torch.memory_format:
    """Layout of the model's parameters and of every batch fed to it (``CHANNELS_LAST``)."""
    return torch.channels_last if config.CHANNELS_LAST else torch.contiguous_format


def output_dir_of(config) -> str:
    return os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _run(config, info: DistInfo) -> int:
    output_dir = output_dir_of(config)
    os.makedirs(output_dir, exist_ok=True)
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    # A training run owns its folder until it ends (--eval and --throughput only read from it).
    with (lock_run_folder(output_dir, info) if training else contextlib.nullcontext()):
        return _run_in_folder(config, info, output_dir, training)


@contextlib.contextmanager
def lock_run_folder(output_dir: str, info: DistInfo) -> Iterator[None]:
    """Hold the folder's lock (taken by rank 0); every rank raises the same UserError when
    another run holds it."""
    lock = RunFolderLock(output_dir)
    error = None
    if info.is_primary:
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    error = broadcast_object(error, info)
    if error:
        raise UserError(error)
    try:
        yield
    finally:
        lock.release()


def _run_in_folder(config, info: DistInfo, output_dir: str, training: bool) -> int:
    from data import build_loader
    from models import build_model

    logger = create_logger(output_dir, info.rank)
    if training and info.is_primary:
        _check_and_save_config(config, output_dir, logger)
    logger.info(f"device {info.device}, world size {info.world_size}, rank {info.rank}, "
                f"threads {torch.get_num_threads()}, output {output_dir}")
    seed_everything(config.SEED + info.rank)
    if info.device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest kernels; TF32 for the fp32 matmuls/convs
        # that autocast leaves (bit-exact resume is a CPU guarantee, see README).
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    amp_dtype = None if config.AMP_OPT_LEVEL else resolve_amp_dtype(config.AMP, info.device)
    autocast = autocast_factory(info.device, amp_dtype)
    logger.info(f"mixed precision: {config.AMP_OPT_LEVEL and 'apex ' + config.AMP_OPT_LEVEL or amp_dtype or 'off'}")

    dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(config)
    class_names = [str(c) for c in dataset_train.classes]
    model = build_model(config).to(info.device, memory_format=memory_format_of(config))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model {config.MODEL.NAME}: {n_params / 1e6:.2f}M params, "
                f"{'channels_last' if config.CHANNELS_LAST else 'NCHW'}, {len(class_names)} classes, "
                f"{len(dataset_train)} train / {len(dataset_val)} val images")

    if config.THROUGHPUT_MODE:
        throughput(loader_val, model, autocast, info, logger, memory_format_of(config))
        return 0
    if config.EVAL_MODE:
        return evaluate_checkpoint(config, model, loader_val, dataset_val, autocast, info, logger, output_dir)
    return train(config, model, class_names, loader_train, loader_val, mixup_fn, amp_dtype, autocast,
                 info, logger, output_dir)


def _check_and_save_config(config, output_dir: str, logger) -> None:
    """Warn when the output folder holds a run with another config, then record this one."""
    import yaml
    path = os.path.join(output_dir, "config.yaml")
    if os.path.isfile(path):
        with open(path) as f:
            old = yaml.safe_load(f) or {}
        # Keys the old run's code did not have yet count as their defaults, not as changes.
        diffs = config_differences(_deep_merge(config_to_dict(get_config()), old), config_to_dict(config))
        if diffs:
            logger.warning(f"{output_dir} holds a run with a different config ({'; '.join(diffs)}); "
                           "resuming from it mixes two experiments: use another --tag or --output "
                           "to start fresh")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.dump())
    os.replace(tmp, path)


def _deep_merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --------------------------------------------------------------------------------------- eval
def evaluate_checkpoint(config, model: nn.Module, loader_val, dataset_val, autocast, info: DistInfo,
                        logger, output_dir: str) -> int:
    """``--eval``: validate the given checkpoint (its EMA too, when it has one). Never trains."""
    source = config.MODEL.RESUME or config.MODEL.PRETRAINED
    if not source:
        found = find_resumable(output_dir, logger.warning)
        if found is None:
            raise UserError(f"--eval needs --resume CHECKPOINT or --pretrained WEIGHTS "
                            f"(no checkpoint found in {output_dir})")
        source = found[0]
    obj = load_file(source)
    load_model_weights(model, model_state_from(obj, source), source)
    _check_class_names(obj, dataset_val.classes, source, logger)
    logger.info(f"evaluating {source}")
    validate(config, loader_val, model, autocast, info, logger, name="model")
    if isinstance(obj.get("model_ema"), dict):
        load_model_weights(model, model_state_from(obj, source, prefer_ema=True), source)
        validate(config, loader_val, model, autocast, info, logger, name="ema")
    return 0


def _check_class_names(obj: Dict[str, Any], classes, source: str, logger) -> None:
    saved = obj.get("class_names")
    if saved and list(saved) != [str(c) for c in classes]:
        logger.warning(f"{source} was trained on other class names than this dataset's "
                       f"(first: {list(saved)[:3]} vs {[str(c) for c in classes][:3]})")


@torch.no_grad()
def validate(config, loader, model: nn.Module, autocast, info: DistInfo, logger,
             name: str = "model") -> Dict[str, float]:
    """Top-1/top-5 and loss over the exact validation set (summed over ranks).

    Runs the unwrapped model: the ranks hold different numbers of batches, so no collective
    may happen per batch (DDP's buffer broadcast would).
    """
    model.eval()
    totals = ClassificationTotals(info.device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    start = time.time()
    fmt = memory_format_of(config)
    for idx, (images, target) in enumerate(loader):
        images = images.to(info.device, non_blocking=True, memory_format=fmt)
        target = target.to(info.device, non_blocking=True)
        with autocast():
            output = model(images)
        output = output.float()
        totals.update(output, target, criterion(output, target))
        if idx % config.PRINT_FREQ == 0:
            logger.info(f"Test ({name}): [{idx}/{len(loader)}]\t{_memory_mb(info.device):.0f}MB")
    metrics = totals.compute()
    logger.info(f" * {name} Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} "
                f"loss {metrics['loss']:.4f} ({metrics['n']} images, {time.time() - start:.1f}s)")
    return metrics


@torch.no_grad()
def throughput(loader, model: nn.Module, autocast, info: DistInfo, logger,
               memory_format: torch.memory_format = torch.contiguous_format,
               warmup: int = 10, iters: int = 30) -> float:
    """Inference images/s on the loader's first batch, after ``warmup`` untimed passes."""
    model.eval()
    images, _ = next(iter(loader))
    images = images.to(info.device, non_blocking=True, memory_format=memory_format)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    with autocast():
        for _ in range(warmup):
            model(images)
        sync()
        start = time.time()
        for _ in range(iters):
            model(images)
        sync()
    rate = iters * images.shape[0] / (time.time() - start)
    logger.info(f"batch_size {images.shape[0]} throughput {rate:.1f} img/s")
    return rate


# ------------------------------------------------------------------------------------- training
@dataclass
class Trainer:
    """Everything one training step touches, built once by ``train``."""
    config: Any
    info: DistInfo
    logger: Any
    model: nn.Module                  # unwrapped: what is saved, validated and EMA-tracked
    model_fwd: nn.Module              # DDP and/or compiled wrapper used for training forwards
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Any
    ema: Optional[ModelEmaV3]
    criterion: nn.Module
    mixup_fn: Optional[Callable]
    autocast: Callable[[], ContextManager]
    saver: CheckpointSaver
    class_names: List[str]
    preemption: PreemptionFlag
    writer: Any = None
    step: int = 0                     # optimizer updates done (drives the schedule and EMA warmup)
    max_accuracy: float = 0.0
    epoch_loss: List[float] = field(default_factory=lambda: [0.0, 0.0])  # sum, count (for resume)
    _bad_at: Optional[torch.Tensor] = None  # first micro-step index with a non-finite loss, or -1

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self, epoch: int, batches_done: int, epoch_complete: bool) -> Dict[str, Any]:
        """The checkpoint: everything that decides the future of the run (issue 5), as tensors
        and plain containers so ``torch.load(weights_only=True)`` loads it. Collective: every
        rank must call it (the RNG states of all ranks are gathered)."""
        rng = gather_to_primary(capture_rng_state(self.info.device), self.info)
        return {
            "model": self.model.state_dict(),
            **({"model_ema": self.ema.module.state_dict()} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "batches_done": batches_done,
            "epoch_complete": epoch_complete,
            "epoch_loss": list(self.epoch_loss),
            "step": self.step,
            "max_accuracy": self.max_accuracy,
            "config": config_to_dict(self.config),
            "class_names": list(self.class_names),
            "model_name": self.config.MODEL.NAME,
            "world_size": self.info.world_size,
            # The data order is a function of these (the sampler permutes by SEED + epoch); a
            # mid-epoch resume skips batches_done x batch_size samples of this rank's order.
            "data_order": {"seed": self.config.SEED, "epoch": epoch, "batches_done": batches_done,
                           "batch_size": self.config.DATA.BATCH_SIZE},
            "rng_state": rng,
            "torch_version": str(torch.__version__),
        }

    def save(self, epoch: int, batches_done: int, epoch_complete: bool, is_best: bool = False) -> None:
        self.check_finite(epoch)  # never overwrite a good checkpoint with diverged weights
        state = self.state_dict(epoch, batches_done, epoch_complete)
        if self.info.is_primary:
            paths = self.saver.save(state, epoch, epoch_complete, is_best)
            self.logger.info(f"saved {', '.join(os.path.basename(p) for p in paths)} "
                             f"(epoch {epoch}, batch {batches_done}, step {self.step})")

    # -- divergence ----------------------------------------------------------------------------
    def record_finite(self, loss: torch.Tensor, idx: int, grad_norm: Optional[torch.Tensor] = None) -> None:
        """Remember the first bad micro-step on the device: no host sync per step."""
        bad = ~torch.isfinite(loss.detach())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        if self._bad_at is None:
            self._bad_at = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._bad_at = torch.where(bad & (self._bad_at < 0), idx, self._bad_at)

    def check_finite(self, epoch: int) -> None:
        """Raise ``NonFiniteLossError`` when any rank saw a non-finite loss (a host sync: called at
        log steps and before every save)."""
        bad_at = -1 if self._bad_at is None else int(self._bad_at.item())
        if any_rank(bad_at >= 0, self.info):
            where = f"step {bad_at}" if bad_at >= 0 else "a step on another rank"
            raise NonFiniteLossError(
                f"non-finite loss or gradient at epoch {epoch}, {where} (global update {self.step}); "
                "stopped without saving, the last good checkpoint is intact: lower TRAIN.BASE_LR, "
                "raise TRAIN.WARMUP_EPOCHS or check TRAIN.CLIP_GRAD / AMP")


def build_criterion(config, mixup_fn: Optional[Callable]) -> nn.Module:
    """Soft-target CE with Mixup/CutMix (label smoothing is folded into the mixed targets),
    else CE with label smoothing."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=config.MODEL.LABEL_SMOOTHING)


def _set_train_mode(model: nn.Module, freeze_backbone: bool) -> None:
    model.train()
    if freeze_backbone:  # linear probing: frozen BatchNorm statistics too
        model.eval()
        model.get_classifier().train()


def train(config, model: nn.Module, class_names: List[str], loader_train, loader_val, mixup_fn,
          amp_dtype, autocast, info: DistInfo, logger, output_dir: str) -> int:
    """Build optimizer/schedule/EMA, resume, and run the epochs. Returns the exit code."""
    if config.TRAIN.FREEZE_BACKBONE:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
    if info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif info.distributed:
        logger.info("SyncBatchNorm needs CUDA: on CPU each process keeps its own BatchNorm statistics")

    lrs = scaled_lrs(config, info.world_size)
    logger.info(f"learning rate {lrs.base:.3g} (BASE_LR {config.TRAIN.BASE_LR} x total batch "
                f"{config.DATA.BATCH_SIZE * info.world_size * config.TRAIN.ACCUMULATION_STEPS} / 512)")
    optimizer = build_optimizer(config, model, lrs.base)
    scaler, model, optimizer = build_scaler(config, info.device, amp_dtype, model, optimizer)
    steps_per_epoch = len(loader_train)
    if steps_per_epoch == 0:
        raise UserError(f"the training set is smaller than one batch ({config.DATA.BATCH_SIZE} x "
                        f"{info.world_size} processes): lower --batch-size")
    updates_per_epoch = math.ceil(steps_per_epoch / config.TRAIN.ACCUMULATION_STEPS)
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch, lrs.warmup, lrs.min)

    # Weights: an explicit --resume wins, then auto-resume from the output folder, then --pretrained.
    resume = _choose_resume(config, output_dir, info, logger)
    if resume is None and config.MODEL.PRETRAINED:
        _load_pretrained(config.MODEL.PRETRAINED, model, config.MODEL.PRETRAINED_EMA, logger)
    ema = None
    if config.TRAIN.EMA.ENABLE:
        ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY, use_warmup=config.TRAIN.EMA.WARMUP)

    model_fwd = model
    if info.distributed:
        model_fwd = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if config.TRAIN.COMPILE:
        mode = config.TRAIN.COMPILE_MODE
        model_fwd = torch.compile(model_fwd, mode=None if mode == "default" else mode)
        logger.info(f"torch.compile, mode {mode}: the first steps compile the model")

    writer = None
    if info.is_primary:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=output_dir)
    trainer = Trainer(config, info, logger, model, model_fwd, optimizer, lr_scheduler, scaler, ema,
                      build_criterion(config, mixup_fn), mixup_fn, autocast,
                      CheckpointSaver(output_dir, config.SAVE_FREQ, config.KEEP_CHECKPOINTS),
                      class_names, PreemptionFlag(), writer)

    start_epoch, start_batch, rng_state = config.TRAIN.START_EPOCH, 0, None
    if resume is not None:
        start_epoch, start_batch, rng_state = _restore(trainer, *resume, steps_per_epoch)
    if rng_state is not None and start_batch == 0:
        restore_rng_state(rng_state, info.device)  # epoch boundary: before the loader draws seeds
        rng_state = None
    if info.is_primary:
        _rewrite_summary(output_dir, keep_before=start_epoch)

    best_by = "ema" if (config.TRAIN.EMA.SELECT_BEST and ema is not None) else "model"
    start_time = time.time()
    try:
        with trainer.preemption:
            # Logged once SIGTERM/SIGINT are handled: from here on a signal means "checkpoint and stop".
            if start_epoch >= config.TRAIN.EPOCHS:
                logger.info(f"all {config.TRAIN.EPOCHS} epochs are done: nothing to train "
                            "(raise TRAIN.EPOCHS to continue)")
            else:
                logger.info(f"start training: epochs {start_epoch}..{config.TRAIN.EPOCHS - 1}, "
                            f"{steps_per_epoch} steps/epoch, best.pth chosen by the {best_by}'s top-1")
            return _train_epochs(trainer, config, loader_train, loader_val, start_epoch, start_batch,
                                 rng_state, steps_per_epoch, best_by, output_dir, start_time)
    finally:
        if writer is not None:
            writer.close()


def _train_epochs(trainer: Trainer, config, loader_train, loader_val, start_epoch: int, start_batch: int,
                  rng_state, steps_per_epoch: int, best_by: str, output_dir: str, start_time: float) -> int:
    """The epoch loop: train, validate (model and EMA), record, save. Returns the exit code."""
    info, logger, model, ema = trainer.info, trainer.logger, trainer.model, trainer.ema
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        epoch_start = time.time()
        sampler = loader_train.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if start_batch:
            if not hasattr(sampler, "set_start_index"):
                raise UserError("this checkpoint stopped mid-epoch but the train sampler cannot "
                                "skip ahead (no set_start_index)")
            sampler.set_start_index(start_batch * loader_train.batch_size)
        else:
            trainer.epoch_loss = [0.0, 0.0]
        preempted = train_one_epoch(trainer, loader_train, epoch, steps_per_epoch, start_batch, rng_state)
        start_batch, rng_state = 0, None
        if preempted:
            logger.info(f"stopped by {trainer.preemption.signal_name or 'a signal on another rank'}: "
                        "checkpoint written, the next start resumes from it")
            return 0

        metrics = validate(config, loader_val, model, trainer.autocast, info, logger, name="model")
        ema_metrics = (validate(config, loader_val, ema.module, trainer.autocast, info, logger, name="ema")
                       if ema is not None else {})
        acc1 = (ema_metrics if best_by == "ema" else metrics)["acc1"]
        # The first finished epoch always writes best.pth, even at 0% accuracy.
        is_best = acc1 > trainer.max_accuracy or not os.path.exists(os.path.join(output_dir, "best.pth"))
        trainer.max_accuracy = max(trainer.max_accuracy, acc1)
        logger.info(f"max accuracy ({best_by}): {trainer.max_accuracy:.2f}%")
        row = _epoch_row(trainer, epoch, metrics, ema_metrics, time.time() - epoch_start)
        if info.is_primary:
            _append_summary(output_dir, row)
            _log_epoch_scalars(trainer.writer, row)
        trainer.save(epoch, steps_per_epoch, epoch_complete=True, is_best=is_best)
        if any_rank(trainer.preemption.requested, info) and epoch + 1 < config.TRAIN.EPOCHS:
            # Signalled during validation: the epoch checkpoint just written is the resume point.
            logger.info(f"stopped by {trainer.preemption.signal_name or 'a signal on another rank'} "
                        "after the epoch's checkpoint; the next start resumes from it")
            return 0

    logger.info(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return 0


def _choose_resume(config, output_dir: str, info: DistInfo, logger):
    """``(path, checkpoint)`` to resume from, or None. Rank 0 chooses, so all ranks agree."""
    if config.MODEL.RESUME:
        return config.MODEL.RESUME, load_file(config.MODEL.RESUME)
    if not config.TRAIN.AUTO_RESUME:
        return None
    path = None
    if info.is_primary:
        found = find_resumable(output_dir, logger.warning)
        path = found[0] if found else None
    path = broadcast_object(path, info)
    if path is None:
        return None
    logger.info(f"auto-resuming from {path}")
    return path, load_file(path)


def _load_pretrained(path: str, model: nn.Module, use_ema: bool, logger) -> None:
    obj = load_file(path)
    use_ema = use_ema and isinstance(obj.get("model_ema"), dict)
    dropped = load_model_weights(model, model_state_from(obj, path, prefer_ema=use_ema), path,
                                 drop_mismatched_head=True)
    logger.info(f"loaded pretrained {'EMA' if use_ema else 'model'} weights from {path}"
                + (f"; dropped the head ({', '.join(dropped)}): its shape differs, it starts fresh"
                   if dropped else ""))


def _restore(trainer: Trainer, path: str, obj: Dict[str, Any], steps_per_epoch: int):
    """Load a training checkpoint into ``trainer``; returns (start epoch, start batch, RNG state)."""
    missing = [k for k in ("model", "optimizer", "epoch") if k not in obj]
    if missing:
        raise UserError(f"{path}: not a resumable training checkpoint (missing {', '.join(missing)}); "
                        "use --pretrained to start from its weights")
    load_model_weights(trainer.model, model_state_from(obj, path), path)
    _check_class_names(obj, trainer.class_names, path, trainer.logger)
    try:
        trainer.optimizer.load_state_dict(obj["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"{path}: optimizer state does not fit (another optimizer or frozen "
                        f"layers?): {e}") from None
    trainer.scaler.load_state_dict(obj.get("scaler") or {})
    if trainer.ema is not None:
        if isinstance(obj.get("model_ema"), dict):
            load_model_weights(trainer.ema.module, obj["model_ema"], path + " (model_ema)")
        else:
            trainer.logger.warning(f"{path} holds no EMA weights: the EMA restarts from the model")
            trainer.ema.module.load_state_dict(trainer.model.state_dict())
    trainer.step = int(obj.get("step", 0))
    trainer.max_accuracy = float(obj.get("max_accuracy", 0.0))
    trainer.epoch_loss = list(obj.get("epoch_loss", [0.0, 0.0]))
    # The schedule follows the current config (so EPOCHS can be extended); say so if it moved.
    saved_sched = obj.get("lr_scheduler")
    if saved_sched and saved_sched != trainer.lr_scheduler.state_dict():
        trainer.logger.warning(f"{path}: the LR schedule differs from the checkpoint's "
                               "(config changed); following the current config")
    trainer.lr_scheduler.step_update(trainer.step)

    epoch = int(obj["epoch"])
    batches = int(obj.get("batches_done", steps_per_epoch))
    if obj.get("epoch_complete", True):
        start_epoch, start_batch = epoch + 1, 0
    else:
        start_epoch, start_batch = epoch, batches
    rng_states = obj.get("rng_state") or []
    rng = None
    if len(rng_states) == trainer.info.world_size:
        rng = rng_states[trainer.info.rank]
    else:
        trainer.logger.warning(f"{path} was written by {len(rng_states)} process(es), this run has "
                               f"{trainer.info.world_size}: RNG states not restored, so the resumed "
                               "run is not bit-identical to an uninterrupted one")
    trainer.logger.info(f"resumed {path}: epoch {start_epoch}, batch {start_batch}, step {trainer.step}, "
                        f"max accuracy {trainer.max_accuracy:.2f}")
    return start_epoch, start_batch, rng


def train_one_epoch(t: Trainer, loader, epoch: int, steps_per_epoch: int, start_batch: int = 0,
                    rng_state: Optional[Dict[str, Any]] = None) -> bool:
    """One pass over this rank's part of the training set, from micro-batch ``start_batch``.

    Returns True when a preemption signal stopped it (after writing a mid-epoch checkpoint).
    Host syncs (``.item()``) happen only at log steps and saves.
    """
    config, info = t.config, t.info
    accum = config.TRAIN.ACCUMULATION_STEPS
    _set_train_mode(t.model, config.TRAIN.FREEZE_BACKBONE)
    t.optimizer.zero_grad(set_to_none=True)
    trainable = [p for p in t.model.parameters() if p.requires_grad]
    batch_time, loss_meter, norm_meter = AverageMeter(), AverageMeter(), AverageMeter()
    loss_sum = torch.zeros((), device=info.device)
    grad_norm = torch.zeros((), device=info.device)
    n_seen = 0

    iterator = iter(loader)
    if rng_state is not None:
        # Mid-epoch resume: the iterator drew its seed; now continue the saved random streams.
        restore_rng_state(rng_state, info.device)
    fmt = memory_format_of(config)
    end = time.time()
    for idx, (samples, targets) in enumerate(iterator, start=start_batch):
        samples = samples.to(info.device, non_blocking=True, memory_format=fmt)
        targets = targets.to(info.device, non_blocking=True)
        if t.mixup_fn is not None:
            samples, targets = t.mixup_fn(samples, targets)
        update = (idx + 1) % accum == 0 or idx + 1 == steps_per_epoch
        # Accumulation: skip DDP's gradient all-reduce on the micro-steps that do not update.
        no_sync = t.model_fwd.no_sync() if (info.distributed and not update) else contextlib.nullcontext()
        with no_sync:
            with t.autocast():
                outputs = t.model_fwd(samples)
                loss = t.criterion(outputs, targets)
            t.scaler.backward(loss / accum, update=update)
        loss_sum += loss.detach()
        n_seen += 1
        if update:
            # Clips the full accumulated gradient; the norm is logged (inf/nan with fp16 just
            # makes the scaler skip this step, which is normal).
            grad_norm = t.scaler.step(t.optimizer, trainable, config.TRAIN.CLIP_GRAD)
            t.optimizer.zero_grad(set_to_none=True)
            t.step += 1
            t.lr_scheduler.step_update(t.step)
            if t.ema is not None:
                t.ema.update(t.model, step=t.step)
        t.record_finite(loss, idx, None if t.scaler.enabled or not update else grad_norm)
        batch_time.update(time.time() - end)
        end = time.time()

        if idx % config.PRINT_FREQ == 0 or idx + 1 == steps_per_epoch:
            t.check_finite(epoch)
            loss_meter.update(loss.item())
            norm = float(grad_norm)
            if math.isfinite(norm):  # fp16 overflow steps (skipped by the scaler) stay out of the mean
                norm_meter.update(norm)
            else:
                norm_meter.val = norm
            lr = t.optimizer.param_groups[-1]["lr"]
            eta = datetime.timedelta(seconds=int(batch_time.avg * (steps_per_epoch - idx - 1)))
            t.logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{steps_per_epoch}]\teta {eta} lr {lr:.6f}\t"
                f"time {batch_time.val:.4f} ({batch_time.avg:.4f})\tloss {loss_meter.val:.4f} "
                f"({loss_meter.avg:.4f})\tgrad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t"
                f"loss_scale {t.scaler.get_scale():.1f}\tmem {_memory_mb(info.device):.0f}MB")
            if t.writer is not None:
                t.writer.add_scalar("train/loss", loss_meter.val, t.step)
                t.writer.add_scalar("train/lr", lr, t.step)
                t.writer.add_scalar("train/grad_norm", norm_meter.val, t.step)

        if update:
            stop = any_rank(t.preemption.requested, info)
            periodic = config.TRAIN.SAVE_STEPS and t.step % config.TRAIN.SAVE_STEPS == 0
            if stop or (periodic and idx + 1 < steps_per_epoch):
                _fold_epoch_loss(t, loss_sum, n_seen)
                loss_sum.zero_()
                n_seen = 0
                t.save(epoch, idx + 1, epoch_complete=False)
                if stop:
                    return True
    _fold_epoch_loss(t, loss_sum, n_seen)
    t.check_finite(epoch)
    return False


def _fold_epoch_loss(t: Trainer, loss_sum: torch.Tensor, n: int) -> None:
    t.epoch_loss[0] += float(loss_sum)
    t.epoch_loss[1] += n


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


# -------------------------------------------------------------------------------- epoch records
def _epoch_row(t: Trainer, epoch: int, metrics: Dict[str, float], ema_metrics: Dict[str, float],
               seconds: float) -> Dict[str, Any]:
    totals = all_reduce_sum(torch.tensor(t.epoch_loss, dtype=torch.float64, device=t.info.device)).tolist()
    return {
        "epoch": epoch,
        "train_loss": round(totals[0] / max(totals[1], 1), 6),
        "lr": t.optimizer.param_groups[-1]["lr"],
        "val_loss": round(metrics["loss"], 6),
        "val_top1": round(metrics["acc1"], 4),
        "val_top5": round(metrics["acc5"], 4),
        "ema_top1": round(ema_metrics["acc1"], 4) if ema_metrics else "",
        "ema_top5": round(ema_metrics["acc5"], 4) if ema_metrics else "",
        "max_accuracy": round(t.max_accuracy, 4),
        "epoch_time_s": round(seconds, 2),
    }


def _rewrite_summary(output_dir: str, keep_before: int) -> None:
    """On (re)start keep only rows of epochs before ``keep_before``: a resumed epoch is re-run."""
    path = os.path.join(output_dir, "summary.csv")
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) < keep_before]
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in SUMMARY_FIELDS} for r in rows)
    os.replace(path + ".tmp", path)


def _append_summary(output_dir: str, row: Dict[str, Any]) -> None:
    path = os.path.join(output_dir, "summary.csv")
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _log_epoch_scalars(writer, row: Dict[str, Any]) -> None:
    if writer is None:
        return
    for key, tag in (("train_loss", "epoch/train_loss"), ("val_top1", "val/top1"), ("val_top5", "val/top5"),
                     ("val_loss", "val/loss"), ("ema_top1", "val/ema_top1")):
        if row[key] != "":
            writer.add_scalar(tag, row[key], row["epoch"])
    writer.flush()


if __name__ == "__main__":
    sys.exit(main())
