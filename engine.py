"""The training story: ``Trainer.fit`` runs the epochs (train, validate model and EMA, record,
save), ``Trainer.train_one_epoch`` the steps, ``Trainer.restore`` a checkpoint's state;
``evaluate`` and ``measure_throughput`` also serve ``main.py --eval`` / ``--throughput``.

``main.py`` builds the pieces and hands them over by keyword; nothing here parses flags or builds
models. Host syncs (``.item()``) happen only at log steps and saves, never per step.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional

import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from yacs.config import CfgNode

from checkpoints import CheckpointRecord, Position, training_checkpoint
from config import save_run_config
from data.build import part_cache_resume_note
from data.samplers import BatchLayout, continue_epoch_at
from reports.run_records import RunRecords
from utils import NonFiniteLossError, UserError
from utils.amp import NativeScaler
from utils.checkpoint_io import BEST, LAST, CheckpointSaver, capture_rng_state, load_model_weights, restore_rng_state
from utils.class_subset import ClassSubset
from utils.distributed import DistInfo, all_reduce_sum, any_rank, gather_to_primary
from utils.metrics import AverageMeter, ClassificationTotals, ConfusionMatrix
from utils.preemption import PreemptionFlag
from utils.progress import logs_above, progress_bar
from utils.sync_check import StepSyncCheck

Autocast = Callable[[], ContextManager]


def memory_format_of(config: CfgNode) -> torch.memory_format:
    """Layout of the model's parameters and of every batch fed to it (``CHANNELS_LAST``)."""
    return torch.channels_last if config.CHANNELS_LAST else torch.contiguous_format


def memory_mb(device: torch.device) -> float:
    """Peak memory: allocated CUDA memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass(frozen=True)
class Feed:
    """How batches reach the model, chosen once per run: the device, the memory layout
    (``CHANNELS_LAST``) and the autocast context (``AMP``)."""

    device: torch.device
    memory_format: torch.memory_format
    autocast: Autocast

    @classmethod
    def of(cls, config: CfgNode, device: torch.device, autocast: Autocast) -> "Feed":
        return cls(device, memory_format_of(config), autocast)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        return targets.to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------- eval and speed
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    feed: Feed,
    *,
    logger: logging.Logger,
    print_freq: int = 10,
    name: str = "model",
    subset: Optional[ClassSubset] = None,
    confusion: Optional[ConfusionMatrix] = None,
    show_progress: bool = False,
) -> Dict[str, float]:
    """Top-1/top-5 and mean loss over the exact validation set (summed over ranks).

    Runs the unwrapped model: the ranks hold different numbers of batches, so no collective
    may happen per batch (DDP's buffer broadcast would). ``subset`` restricts the logits to the
    val set's classes (and maps its labels to them); ``confusion`` also counts (true, predicted)
    pairs, summed over ranks by the caller's ``confusion.compute()``. ``show_progress`` draws a
    bar on a terminal (``utils.progress``).
    """
    model.eval()
    device = feed.device
    totals = ClassificationTotals(device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    start = time.time()
    bar = progress_bar(loader, desc=f"eval {name}", unit="batch", enabled=show_progress)
    with logs_above(bar, logger):
        for idx, (images, target) in enumerate(bar):
            images, target = feed.images(images), feed.targets(target)
            with feed.autocast():
                output = model(images)
            output = output.float()
            if subset is not None:
                output, target = subset.apply(output, target)
            top1 = totals.update(output, target, criterion(output, target))
            if confusion is not None:
                confusion.update(top1, target)
            if idx % print_freq == 0:
                logger.info(f"Test ({name}): [{idx}/{len(loader)}]\t{memory_mb(device):.0f}MB")
    bar.close()
    metrics = totals.compute()
    logger.info(
        f" * {name} Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} "
        f"loss {metrics['loss']:.4f} ({metrics['n']} images, {time.time() - start:.1f}s)"
    )
    return metrics


@torch.no_grad()
def measure_throughput(
    model: nn.Module, loader, feed: Feed, *, logger: logging.Logger, warmup: int = 10, iters: int = 30
) -> float:
    """Inference images/s on the loader's first batch, after ``warmup`` untimed passes."""
    model.eval()
    images = feed.images(next(iter(loader))[0])
    sync = torch.cuda.synchronize if feed.device.type == "cuda" else (lambda: None)
    with feed.autocast():
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


def check_class_names(saved: Optional[List[str]], classes: List[str], source: str, logger: logging.Logger) -> None:
    """Warn when ``source`` was trained on other class names (``saved``) than the current dataset's."""
    if saved and list(saved) != [str(c) for c in classes]:
        logger.warning(
            f"{source} was trained on other class names than this dataset's "
            f"(first: {list(saved)[:3]} vs {[str(c) for c in classes][:3]})"
        )


# ------------------------------------------------------------------------------------ training
# ModelEmaV3 arguments of each TRAIN.EMA.RAMP. The trainer calls ``ema.update(model, step=t)``
# after optimizer update t (1 at the first), and timm's decay at step t is
# 1 - (1 + s / warmup_gamma)^(-warmup_power) with s = t - update_after_step - 1, capped at DECAY
# (0, a copy of the weights, when s <= 0). With gamma 9, power 1 and update_after_step -2 that
# is s / (9 + s) = (1 + t) / (10 + t), TensorFlow's ramp at update t, from the first update on.
EMA_RAMPS: Dict[str, Dict[str, Any]] = {
    "tf": dict(use_warmup=True, warmup_gamma=9.0, warmup_power=1.0, update_after_step=-2),
    "timm": dict(use_warmup=True),  # 1 - t^(-2/3)
    "none": dict(use_warmup=False),
}


def build_ema(config: CfgNode, model: nn.Module) -> Optional[ModelEmaV3]:
    """The EMA of ``model``'s weights (TRAIN.EMA), or None when off. It starts as a copy of
    ``model`` as it is now (after any --pretrained load), as TensorFlow's shadow variables start
    at the variables' initial values."""
    ema = config.TRAIN.EMA
    if not ema.ENABLE:
        return None
    return ModelEmaV3(model, decay=ema.DECAY, **EMA_RAMPS[ema.RAMP])


def build_criterion(config: CfgNode, mixup_fn) -> nn.Module:
    """Soft-target CE with Mixup/CutMix (label smoothing is folded into the mixed targets),
    else CE with label smoothing."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=config.MODEL.LABEL_SMOOTHING)


def freeze_backbone(model: nn.Module) -> None:
    """Linear probing: only the classifier keeps ``requires_grad`` (the trainer also keeps the
    backbone in eval mode, so its BatchNorm statistics stay frozen too)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)


@dataclass
class ResumePoint:
    """Where a (re)started run begins: epoch, micro-batch inside it, and the RNG state to
    restore once the epoch's loader iterator has been created (mid-epoch only)."""

    epoch: int
    batch: int = 0
    rng_state: Optional[Dict[str, Any]] = None


@dataclass
class Progress:
    """A run's progress: what a checkpoint saves of the trainer beyond its collaborators' own
    state dicts, and what ``Trainer.restore`` sets."""

    step: int = 0  # optimizer updates done (drives the schedule and EMA warmup)
    max_accuracy: float = 0.0  # the best epoch's top-1 of the reported weights (best.pth's)
    best_epoch: int = -1  # that epoch (-1: none yet, or a checkpoint older than the field)
    last_top1: Optional[float] = None  # the latest finished epoch's top-1 of the reported weights
    epoch_loss: List[float] = field(default_factory=lambda: [0.0, 0.0])  # sum, count of the epoch so far


@dataclass(kw_only=True)
class Trainer:
    """One training run: the collaborators a step uses, handed over by keyword, and the run's
    ``progress``.

    ``model`` is the unwrapped module (what is saved, validated and EMA-tracked); ``model_fwd``
    the DDP and/or compiled wrapper used for training forwards.
    """

    config: CfgNode
    info: DistInfo
    logger: logging.Logger
    model: nn.Module
    model_fwd: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: NativeScaler
    ema: Optional[ModelEmaV3]
    criterion: nn.Module
    mixup_fn: Optional[Callable]
    feed: Feed
    saver: CheckpointSaver
    records: RunRecords
    class_names: List[str]
    steps_per_epoch: int
    progress: Progress = field(default_factory=Progress)
    preemption: PreemptionFlag = field(default_factory=PreemptionFlag)
    _bad_at: Optional[torch.Tensor] = None  # first micro-step index with a non-finite loss, or -1

    @property
    def report_weights(self) -> str:
        """Whose top-1 is the run's number and chooses best.pth (TRAIN.REPORT.WEIGHTS): 'ema', or
        'model' (also when the run keeps no EMA)."""
        return "ema" if (self.config.TRAIN.REPORT.WEIGHTS == "ema" and self.ema is not None) else "model"

    def reported(self) -> Optional[str]:
        """The run's number as a sentence (TRAIN.REPORT): the last or the best epoch's top-1 of
        the reported weights; None before an epoch has finished."""
        if self.progress.last_top1 is None or self.progress.best_epoch < 0:
            return None
        progress, weights = self.progress, "EMA" if self.report_weights == "ema" else "model"
        best = f"{BEST}, epoch {progress.best_epoch}"
        if self.config.TRAIN.REPORT.CHECKPOINT == "best":
            return (
                f"reported top-1 {progress.max_accuracy:.2f}%: the {weights} weights of the best checkpoint "
                f"({best}); the last epoch's {progress.last_top1:.2f}%"
            )
        return (
            f"reported top-1 {progress.last_top1:.2f}%: the {weights} weights of the last checkpoint "
            f"({LAST}, epoch {self.config.TRAIN.EPOCHS - 1}); {progress.max_accuracy:.2f}% at the best ({best})"
        )

    @property
    def layout(self) -> BatchLayout:
        """This run's batch layout: per-process batch, processes, accumulation steps."""
        return BatchLayout(self.config.DATA.BATCH_SIZE, self.info.world_size, self.config.TRAIN.ACCUMULATION_STEPS)

    @property
    def updates_per_epoch(self) -> int:
        return math.ceil(self.steps_per_epoch / self.config.TRAIN.ACCUMULATION_STEPS)

    # -- the epoch loop ------------------------------------------------------------------------
    def fit(self, loader_train, loader_val, start: ResumePoint) -> int:
        """Train epochs ``start.epoch`` .. ``TRAIN.EPOCHS - 1``; returns the exit code (0)."""
        config = self.config
        if start.rng_state is not None and start.batch == 0:
            restore_rng_state(start.rng_state, self.info.device)  # before the loader draws seeds
            start = ResumePoint(start.epoch)
        self.records.keep_epochs_before(start.epoch)
        start_time = time.time()
        with self.preemption:
            # Logged once SIGTERM/SIGINT are handled: from here on a signal means "checkpoint and stop".
            if start.epoch >= config.TRAIN.EPOCHS:
                self.logger.info(
                    f"all {config.TRAIN.EPOCHS} epochs are done: nothing to train (raise TRAIN.EPOCHS to continue)"
                )
                self._log_reported()
                return 0
            self.logger.info(
                f"start training: epochs {start.epoch}..{config.TRAIN.EPOCHS - 1}, "
                f"{self.steps_per_epoch} steps/epoch; reported: the {self.report_weights}'s top-1 of the "
                f"{config.TRAIN.REPORT.CHECKPOINT} checkpoint, best.pth chosen by the {self.report_weights}'s top-1"
            )
            for epoch in range(start.epoch, config.TRAIN.EPOCHS):
                first = start if epoch == start.epoch else ResumePoint(epoch)
                if not self._fit_epoch(loader_train, loader_val, first):
                    return 0
        self.logger.info(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
        self._log_reported()
        return 0

    def _log_reported(self) -> None:
        sentence = self.reported()
        if sentence is not None:
            self.logger.info(sentence)

    def _fit_epoch(self, loader_train, loader_val, start: ResumePoint) -> bool:
        """Train, validate, record and save one epoch; False when a signal stopped the run."""
        epoch, epoch_start = start.epoch, time.time()
        sampler = loader_train.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if start.batch:
            if not hasattr(sampler, "set_start_index"):
                raise UserError(
                    "this checkpoint stopped mid-epoch but the train sampler cannot skip ahead (no set_start_index)"
                )
            sampler.set_start_index(start.batch * self.config.DATA.BATCH_SIZE)
        else:
            self.progress.epoch_loss = [0.0, 0.0]
        if self.train_one_epoch(loader_train, epoch, start.batch, start.rng_state):
            self.logger.info(f"stopped by {self._signal_name()}: checkpoint written, the next start resumes from it")
            return False

        metrics, ema_metrics = self.validate(loader_val)
        acc1 = (ema_metrics if self.report_weights == "ema" else metrics)["acc1"]
        # The first finished epoch always writes best.pth, even at 0% accuracy.
        best_missing = not os.path.exists(os.path.join(self.saver.output_dir, BEST))
        is_best = acc1 > self.progress.max_accuracy or best_missing
        self.progress.max_accuracy = max(self.progress.max_accuracy, acc1)
        self.progress.last_top1 = acc1
        if is_best:
            self.progress.best_epoch = epoch
        best = f"{self.progress.max_accuracy:.2f}% at epoch {self.progress.best_epoch}"
        self.logger.info(f"max accuracy ({self.report_weights}): {best}")
        self.records.add_epoch(self._epoch_row(epoch, metrics, ema_metrics, time.time() - epoch_start))
        self.save(epoch, self.steps_per_epoch, epoch_complete=True, is_best=is_best)
        if any_rank(self.preemption.requested, self.info) and epoch + 1 < self.config.TRAIN.EPOCHS:
            # Signalled during validation: the epoch checkpoint just written is the resume point.
            self.logger.info(
                f"stopped by {self._signal_name()} after the epoch's checkpoint; the next start resumes from it"
            )
            return False
        return True

    def validate(self, loader) -> tuple[Dict[str, float], Dict[str, float]]:
        """Metrics of the model and of its EMA (empty without EMA)."""
        kwargs = dict(logger=self.logger, print_freq=self.config.PRINT_FREQ)
        metrics = evaluate(self.model, loader, self.feed, name="model", **kwargs)
        ema_metrics = evaluate(self.ema.module, loader, self.feed, name="ema", **kwargs) if self.ema is not None else {}
        return metrics, ema_metrics

    def _signal_name(self) -> str:
        return self.preemption.signal_name or "a signal on another rank"

    # -- one epoch -----------------------------------------------------------------------------
    def train_one_epoch(
        self, loader, epoch: int, start_batch: int = 0, rng_state: Optional[Dict[str, Any]] = None
    ) -> bool:
        """One pass over this rank's part of the training set, from micro-batch ``start_batch``.

        Returns True when a preemption signal stopped it (after writing a mid-epoch checkpoint).
        """
        self._set_train_mode()
        self.optimizer.zero_grad(set_to_none=True)
        iterator = iter(loader)
        if rng_state is not None:
            # Mid-epoch resume: the iterator drew its seed; now continue the saved random streams.
            restore_rng_state(rng_state, self.info.device)
        with StepSyncCheck(self.config.TRAIN.SYNC_DEBUG, self.info.device, self.logger) as sync_check:
            return self._train_steps(iterator, epoch, start_batch, sync_check)

    def _train_steps(self, iterator, epoch: int, start_batch: int, sync_check: StepSyncCheck) -> bool:
        """The step loop of ``train_one_epoch``; host syncs only inside ``sync_check.paused()``."""
        config, info = self.config, self.info
        steps = self.steps_per_epoch
        accum = config.TRAIN.ACCUMULATION_STEPS
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        batch_time, loss_meter, norm_meter = AverageMeter(), AverageMeter(), AverageMeter()
        loss_sum = torch.zeros((), device=info.device)
        grad_norm = torch.zeros((), device=info.device)
        n_seen = 0
        end = time.time()
        for idx, (samples, targets) in enumerate(iterator, start=start_batch):
            samples, targets = self.feed.images(samples), self.feed.targets(targets)
            if self.mixup_fn is not None:
                samples, targets = self.mixup_fn(samples, targets)
            update = (idx + 1) % accum == 0 or idx + 1 == steps
            # Accumulation: skip DDP's gradient all-reduce on the micro-steps that do not update.
            no_sync = self.model_fwd.no_sync() if (info.distributed and not update) else contextlib.nullcontext()
            with no_sync:
                with self.feed.autocast():
                    outputs = self.model_fwd(samples)
                    loss = self.criterion(outputs, targets)
                self.scaler.backward(loss / accum, update=update)
            loss_sum += loss.detach()
            n_seen += 1
            if update:
                # Clips the full accumulated gradient; the norm is logged (inf/nan with fp16 just
                # makes the scaler skip this step, which is normal).
                grad_norm = self.scaler.step(self.optimizer, trainable, config.TRAIN.CLIP_GRAD)
                self.optimizer.zero_grad(set_to_none=True)
                self.progress.step += 1
                self.lr_scheduler.step_update(self.progress.step)
                if self.ema is not None:
                    self.ema.update(self.model, step=self.progress.step)
            self.record_finite(loss, idx, None if self.scaler.enabled or not update else grad_norm)
            batch_time.update(time.time() - end)
            end = time.time()

            if idx % config.PRINT_FREQ == 0 or idx + 1 == steps:
                with sync_check.paused():
                    self._log_step(epoch, idx, loss, grad_norm, batch_time, loss_meter, norm_meter)

            if update:
                stop = any_rank(self.preemption.requested, info)
                periodic = config.TRAIN.SAVE_STEPS and self.progress.step % config.TRAIN.SAVE_STEPS == 0
                if stop or (periodic and idx + 1 < steps):
                    with sync_check.paused():
                        self._fold_epoch_loss(loss_sum, n_seen)
                        loss_sum.zero_()
                        n_seen = 0
                        self.save(epoch, idx + 1, epoch_complete=False)
                    if stop:
                        return True
        with sync_check.paused():
            self._fold_epoch_loss(loss_sum, n_seen)
            self.check_finite(epoch)
        return False

    def _log_step(
        self,
        epoch: int,
        idx: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        batch_time: AverageMeter,
        loss_meter: AverageMeter,
        norm_meter: AverageMeter,
    ) -> None:
        """A log line (a host sync: reads the loss and gradient norm) and the step record."""
        config, steps = self.config, self.steps_per_epoch
        self.check_finite(epoch)
        loss_meter.update(loss.item())
        norm = float(grad_norm)
        if math.isfinite(norm):  # fp16 overflow steps (skipped by the scaler) stay out of the mean
            norm_meter.update(norm)
        else:
            norm_meter.val = norm
        lr = self.optimizer.param_groups[-1]["lr"]
        eta = datetime.timedelta(seconds=int(batch_time.avg * (steps - idx - 1)))
        self.logger.info(
            f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{steps}]\teta {eta} lr {lr:.6f}\t"
            f"time {batch_time.val:.4f} ({batch_time.avg:.4f})\tloss {loss_meter.val:.4f} "
            f"({loss_meter.avg:.4f})\tgrad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t"
            f"loss_scale {self.scaler.get_scale():.1f}\tmem {memory_mb(self.info.device):.0f}MB"
        )
        self.records.add_step(self.progress.step, loss=loss_meter.val, lr=lr, grad_norm=norm_meter.val)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.config.TRAIN.FREEZE_BACKBONE:  # linear probing: frozen BatchNorm statistics too
            self.model.eval()
            self.model.get_classifier().train()

    def _fold_epoch_loss(self, loss_sum: torch.Tensor, n: int) -> None:
        self.progress.epoch_loss[0] += float(loss_sum)
        self.progress.epoch_loss[1] += n

    def _epoch_loss_over_ranks(self) -> torch.Tensor:
        """[sum, count] of the epoch's train loss so far, over every rank (collective)."""
        return all_reduce_sum(torch.tensor(self.progress.epoch_loss, dtype=torch.float64, device=self.info.device))

    def _epoch_row(
        self, epoch: int, metrics: Dict[str, float], ema_metrics: Dict[str, float], seconds: float
    ) -> Dict[str, Any]:
        """The epoch's summary.csv row (collective: the train loss is summed over ranks)."""
        totals = self._epoch_loss_over_ranks()
        loss_sum, count = totals.tolist()
        acc1 = (ema_metrics if self.report_weights == "ema" else metrics)["acc1"]
        return {
            "epoch": epoch,
            "train_loss": round(loss_sum / max(count, 1), 6),
            "lr": self.optimizer.param_groups[-1]["lr"],
            "val_loss": round(metrics["loss"], 6),
            "val_top1": round(metrics["acc1"], 4),
            "val_top5": round(metrics["acc5"], 4),
            "ema_top1": round(ema_metrics["acc1"], 4) if ema_metrics else "",
            "ema_top5": round(ema_metrics["acc5"], 4) if ema_metrics else "",
            "max_accuracy": round(self.progress.max_accuracy, 4),
            # What the run reports if it ends with this epoch (TRAIN.REPORT).
            "reported_top1": round(
                self.progress.max_accuracy if self.config.TRAIN.REPORT.CHECKPOINT == "best" else acc1, 4
            ),
            "epoch_time_s": round(seconds, 2),
        }

    # -- checkpoints ---------------------------------------------------------------------------
    def position(self, epoch: int, batches_done: int, epoch_complete: bool) -> Position:
        return Position(
            epoch, epoch_complete, batches_done * self.layout.global_batch, self.progress.step, batches_done
        )

    def state_dict(self, epoch: int, batches_done: int, epoch_complete: bool) -> Dict[str, Any]:
        """The checkpoint (``checkpoints.training_checkpoint``): everything that decides the
        future of the run. Collective: every rank must call it (the RNG states of all ranks are
        gathered, the epoch's loss so far summed)."""
        rng = gather_to_primary(capture_rng_state(self.info.device), self.info)
        # Rank 0 continues the epoch's loss on resume, so it saves the sum over the ranks.
        epoch_loss = self._epoch_loss_over_ranks()
        return training_checkpoint(
            model=self.model,
            ema=self.ema.module if self.ema is not None else None,
            training_state={
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch_loss": epoch_loss.tolist(),
                "max_accuracy": self.progress.max_accuracy,
                "best_epoch": self.progress.best_epoch,
                "last_top1": self.progress.last_top1,
                "rng_state": rng,
                # Experiment-tracker runs (name -> run id): a resumed run logs to the same runs.
                "tracker_run_ids": dict(self.records.tracker_run_ids),
            },
            config=self.config,
            class_names=self.class_names,
            position=self.position(epoch, batches_done, epoch_complete),
            layout=self.layout,
        )

    def save(self, epoch: int, batches_done: int, epoch_complete: bool, is_best: bool = False) -> None:
        self.check_finite(epoch)  # never overwrite a good checkpoint with diverged weights
        state = self.state_dict(epoch, batches_done, epoch_complete)
        if self.info.is_primary:
            paths = self.saver.save(state, epoch, epoch_complete, is_best)
            # config.yaml describes the checkpoints: a changed config replaces it only once it has
            # one (a run that diverged before saving leaves the folder's config as it was).
            save_run_config(self.config, self.saver.output_dir)
            self.logger.info(
                f"saved {', '.join(os.path.basename(p) for p in paths)} "
                f"(epoch {epoch}, batch {batches_done}, step {self.progress.step})"
            )

    def restore(self, record: CheckpointRecord) -> ResumePoint:
        """Load a training checkpoint into this trainer; returns where the run continues."""
        path = record.path
        if not record.resumable:
            raise UserError(
                f"{path}: not a resumable training checkpoint (no optimizer state or epoch); "
                "use --pretrained to start from its weights"
            )
        state = record.training
        load_model_weights(self.model, record.state_dicts["model"], path)
        check_class_names(record.class_names, self.class_names, path, self.logger)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(
                f"{path}: optimizer state does not fit (another optimizer or frozen layers?): {e}"
            ) from None
        self.scaler.load_state_dict(state.get("scaler") or {})
        if self.ema is not None:
            if record.has_ema:
                load_model_weights(self.ema.module, record.state_dicts["ema"], path + " (model_ema)")
            else:
                self.logger.warning(f"{path} holds no EMA weights: the EMA restarts from the model")
                self.ema.module.load_state_dict(self.model.state_dict())
        last_top1 = state.get("last_top1")
        self.progress = Progress(
            max_accuracy=float(state.get("max_accuracy", 0.0)),
            best_epoch=int(state.get("best_epoch", -1)),
            last_top1=float(last_top1) if last_top1 is not None else None,
            # Rank 0 carries the epoch's loss so far (summed over the ranks that wrote it).
            epoch_loss=list(state.get("epoch_loss", [0.0, 0.0])) if self.info.is_primary else [0.0, 0.0],
        )
        start, self.progress.step = self._position_after(record)
        rng_states = state.get("rng_state") or []
        if len(rng_states) == self.info.world_size:
            start.rng_state = rng_states[self.info.rank]
        else:
            self.logger.warning(
                f"{path} was written by {len(rng_states)} process(es), this run has "
                f"{self.info.world_size}: RNG states not restored, so the resumed "
                "run is not bit-identical to an uninterrupted one"
            )
        self.logger.info(
            f"resumed {path}: epoch {start.epoch}, batch {start.batch}, step {self.progress.step}, "
            f"max accuracy {self.progress.max_accuracy:.2f}"
        )
        return start

    def _position_after(self, record: CheckpointRecord) -> tuple[ResumePoint, int]:
        """Where the run continues after ``record`` and its optimizer-update count, in this run's
        batch layout. A mid-epoch checkpoint continues at the exact next sample of the epoch's
        order, also under another batch size, process count or accumulation (``continue_epoch_at``);
        a layout that cannot is refused in one line. A changed layout maps the LR schedule by the
        position in training (epoch and samples), and says so."""
        path, position = record.path, record.position
        saved, now = saved_layout(record), self.layout
        note = part_cache_resume_note(self.config, saved.world_size, now.world_size, position)  # may refuse
        if note:
            self.logger.warning(note)
        if position.epoch_complete:
            start, updates_done = ResumePoint(position.epoch + 1), 0
        else:
            samples = position.samples_done
            batch = continue_epoch_at(samples, now)
            if batch is None:
                raise UserError(
                    f"{path} stopped inside epoch {position.epoch} after {samples} samples ({saved.describe()}); "
                    f"this run's {now.describe()} takes {now.samples_per_update} samples per update, which do not "
                    f"divide {samples}, so it cannot continue at the next sample: "
                    + _continuing_layouts(samples, now, even=self.mixup_fn is not None)
                )
            start, updates_done = ResumePoint(position.epoch, batch), batch // now.accumulation_steps
        step = position.step
        # The schedule follows the current config (so EPOCHS can be extended); say so if it moved.
        saved_schedule = record.training.get("lr_scheduler")
        if saved != now:
            step = start.epoch * self.updates_per_epoch + updates_done
            total = self.config.TRAIN.EPOCHS * self.updates_per_epoch
            self.logger.warning(
                f"{path} was written with {saved.describe()}, this run has {now.describe()}: "
                f"{now.samples_per_update} samples per update instead of {saved.samples_per_update}, "
                f"{self.updates_per_epoch} updates per epoch; the LR (scaled by the total batch) and the "
                f"schedule continue at update {step} of {total}, the same point of training "
                f"(epoch {start.epoch}, {start.batch * now.global_batch} samples in)"
            )
        elif saved_schedule and saved_schedule != self.lr_scheduler.state_dict():
            self.logger.warning(
                f"{path}: the LR schedule differs from the checkpoint's (config changed); following the current config"
            )
        self.lr_scheduler.step_update(step)
        return start, step

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
                f"non-finite loss or gradient at epoch {epoch}, {where} (global update {self.progress.step}); "
                "stopped without saving, the last good checkpoint is intact: lower TRAIN.BASE_LR, "
                "raise TRAIN.WARMUP_EPOCHS or check TRAIN.CLIP_GRAD / AMP"
            )


def saved_layout(record: CheckpointRecord) -> BatchLayout:
    """The batch layout a training checkpoint was written with (older files: from its config and
    world size)."""
    state = record.training or {}
    order = state.get("data_order") or {}
    config = record.config
    return BatchLayout(
        int(order.get("batch_size", config.DATA.BATCH_SIZE if config is not None else 1)),
        int(order.get("world_size", state.get("world_size", 1))),
        int(order.get("accumulation_steps", config.TRAIN.ACCUMULATION_STEPS if config is not None else 1)),
    )


def _continuing_layouts(samples: int, now: BatchLayout, even: bool) -> str:
    """What to do when ``now`` cannot continue an epoch after ``samples``: batch sizes that can
    (``even`` ones only while Mixup/CutMix needs them)."""
    fits = [
        b
        for b in range(2 if even else 1, 2 * now.batch_size + 1, 2 if even else 1)
        if continue_epoch_at(samples, BatchLayout(b, now.world_size, now.accumulation_steps)) is not None
    ]
    layout = f"with {now.world_size} process(es) and {now.accumulation_steps} accumulation"
    if fits:
        return f"use --batch-size {' or '.join(map(str, fits[-3:]))} {layout}, or the checkpoint's layout"
    return "resume with the checkpoint's layout to finish this epoch (any layout continues from an epoch's end)"
