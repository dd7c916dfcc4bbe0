"""Train, evaluate or benchmark a MOAT model: the command line and the wiring.

    torchrun --nproc_per_node=8 main.py --cfg configs/moat_0.yaml --data-path /data/imagenet
    python main.py --cfg configs/tiny_moat_0.yaml --data-path DATA --device cpu
    python main.py --cfg configs/moat_0.yaml --data-path DATA --eval --resume best.pth
    python main.py --cfg configs/moat_0.yaml --data-path DATA --throughput

``main`` parses, ``run`` joins the process group and builds what the frozen config describes,
then hands it to ``engine.Trainer`` (training), ``evaluation.run_eval`` (``--eval``) or
``engine.measure_throughput`` (``--throughput``). Errors of the ``utils.errors`` hierarchy end
with one line on stderr and their exit code (2: bad input; 1: a run stopped to keep its files
safe).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import random
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from yacs.config import CfgNode

from checkpoints import CheckpointRecord, load_pretrained, read_checkpoint, resume_path
from config import RUN_CONFIG, choices_of, config_to_dict, load_config, run_config_changes, save_run_config
from data import Loaders, build_loader
from engine import Feed, ResumePoint, Trainer, build_criterion, build_ema, freeze_backbone, measure_throughput
from evaluation import EvalSizes, run_eval
from logger import close_logger, create_logger
from lr_scheduler import build_scheduler
from migration import add_legacy_flags
from models import build_model
from optimizer import build_optimizer, scaled_lrs
from reports.run_records import RunRecords
from reports.trackers import build_trackers
from utils import MoatError, PeerFailedError, UserError
from utils.amp import apex_available, autocast_factory, build_scaler, resolve_amp_dtype
from utils.checkpoint_io import BEST, LAST, CheckpointSaver
from utils.distributed import DistInfo, broadcast_object, init_distributed, is_peer_failure, on_every_rank, teardown
from utils.run_folder import LOCK_NAME, lock_run_folder, prepare_run_folder, remove_interrupted_saves

MODES = ("train", "eval", "throughput")


# ------------------------------------------------------------------------------------------ CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The trainer's flags; each one maps onto a config key (``--opts`` reaches the rest), except
    ``--eval``/``--eval-sizes``/``--eval-crop-pcts``/``--throughput`` and ``--local-rank``, which
    say how this launch runs, not what the experiment is, and so stay out of the saved config."""
    p = argparse.ArgumentParser("MOAT training and evaluation", add_help=add_help)
    p.add_argument("--cfg", required=True, metavar="FILE", help="YAML config (see configs/)")
    p.add_argument(
        "--opts",
        nargs="+",
        metavar="KEY VALUE",
        help="override config keys, e.g. --opts TRAIN.EPOCHS 100 DATA.IMG_SIZE 256",
    )
    p.add_argument("--batch-size", type=int, help="images per process per micro-step (DATA.BATCH_SIZE)")
    p.add_argument("--data-path", help="dataset root holding train/ and val/ (DATA.DATA_PATH)")
    p.add_argument("--dataset", choices=choices_of("DATA.DATASET"), help="DATA.DATASET")
    data_format = p.add_mutually_exclusive_group()
    data_format.add_argument(
        "--data-format", choices=choices_of("DATA.FORMAT"), help="how DATA_PATH stores the images (DATA.FORMAT)"
    )
    data_format.add_argument(
        "--zip",
        dest="data_format",
        action="store_const",
        const="zip",
        help="Swin's zipped layout: DATA_PATH/{train,val}.zip + {train,val}_map.txt (DATA.FORMAT zip)",
    )
    p.add_argument(
        "--cache-mode",
        choices=choices_of("DATA.CACHE_MODE"),
        help="zip only: keep this rank's part / all of the images in RAM (DATA.CACHE_MODE)",
    )
    p.add_argument("--class-map", metavar="FILE", help="class names in label order, one per line (DATA.CLASS_MAP)")
    p.add_argument("--pretrained", help="initialise from these weights only (MODEL.PRETRAINED)")
    p.add_argument("--resume", help="resume (or with --eval, evaluate) this checkpoint (MODEL.RESUME)")
    p.add_argument("--accumulation-steps", type=int, help="micro-steps per update (TRAIN.ACCUMULATION_STEPS)")
    # Switches default to None (not False) so that an absent flag leaves the config alone.
    p.add_argument(
        "--grad-checkpointing",
        "--use-checkpoint",
        dest="use_checkpoint",
        action="store_true",
        default=None,
        help="recompute blocks in backward to save memory (TRAIN.USE_CHECKPOINT)",
    )
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (TRAIN.COMPILE)")
    p.add_argument(
        "--sync-debug",
        action="store_true",
        default=None,
        help="CUDA: warn about host-device syncs inside training steps (TRAIN.SYNC_DEBUG)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC memory layout for the model and its inputs (CHANNELS_LAST, default on)",
    )
    p.add_argument(
        "--amp",
        choices=choices_of("AMP"),
        help="mixed precision (default: bf16 where supported, else fp16 on CUDA)",
    )
    p.add_argument(
        "--amp-opt-level",
        choices=choices_of("AMP_OPT_LEVEL"),
        help="NVIDIA apex AMP level: O1/O2 need apex; O0 is full precision (= --amp off), apex or not",
    )
    p.add_argument("--output", help="root of all outputs (OUTPUT); a run writes OUTPUT/MODEL.NAME/TAG")
    p.add_argument("--tag", help="run name (TAG)")
    p.add_argument(
        "--eval",
        action="store_true",
        help="only validate the checkpoint, then exit; reports go to <checkpoint folder>/eval/",
    )
    p.add_argument(
        "--eval-sizes",
        type=int,
        nargs="+",
        metavar="PX",
        help="with --eval: evaluate at each of these input sizes (default: DATA.IMG_SIZE)",
    )
    p.add_argument(
        "--eval-crop-pcts",
        type=float,
        nargs="+",
        metavar="PCT",
        help="with --eval-sizes: the eval crop of each size, in order (default: DATA.CROP_PCT at every size)",
    )
    p.add_argument("--throughput", action="store_true", help="only measure inference img/s, then exit")
    p.add_argument("--seed", type=int, help="SEED")
    p.add_argument("--device", choices=choices_of("DEVICE"), help="DEVICE")
    p.add_argument(
        "--log-wandb",
        action="store_true",
        default=None,
        help="also log to Weights & Biases when wandb is installed (TRACKING.WANDB; see TRACKING.*)",
    )
    p.add_argument(
        "--log-mlflow",
        action="store_true",
        default=None,
        help="also log to MLflow when mlflow is installed (TRACKING.MLFLOW; see TRACKING.*)",
    )
    # Old launchers (torch.distributed.launch) pass this; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    add_legacy_flags(p)  # the Swin trainer's and the MOAT port's other flags
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Parse, run, and turn the project's error types into one line + exit code (no traceback)."""
    args = get_args_parser().parse_args(argv)  # argparse itself exits 2 on unknown flags
    try:
        if args.amp_opt_level in ("O1", "O2") and not apex_available():
            raise UserError(
                "--amp-opt-level needs NVIDIA apex, which is not installed; "
                "use --amp {off,fp16,bf16} (torch.amp) instead"
            )
        if args.eval and args.throughput:
            raise UserError("--eval and --throughput exclude each other: pick one")
        mode = "eval" if args.eval else "throughput" if args.throughput else "train"
        sizes = EvalSizes.from_args(args)
        # Launchers pass LOCAL_RANK in the environment (torchrun) or as --local-rank (older ones).
        local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
        loaded = load_config(args)
        config = loaded.config
        if args.cache_mode and config.DATA.FORMAT != "zip":
            raise UserError(f"--cache-mode applies to zipped data (--zip), not DATA.FORMAT '{config.DATA.FORMAT}'")
        return run(config, mode, local_rank, eval_sizes=sizes, notes=loaded.notes)
    except PeerFailedError as e:  # the process that failed printed why
        return e.exit_code
    except MoatError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def run(
    config: CfgNode,
    mode: str = "train",
    local_rank: int = 0,
    eval_sizes: Optional[EvalSizes] = None,
    notes: Sequence[str] = (),
) -> int:
    """Join the process group, do the work (``mode`` in ``MODES``), always leave the group again.
    ``notes``: what loading the config has to say (``LoadedConfig.notes``), logged once.

    Under ``torchrun`` a process whose collective fails because another process died leaves
    quietly (``PeerFailedError``): the one that failed reports why, as the last line."""
    info = init_distributed(config.DEVICE, local_rank)
    clean = False
    try:
        output_dir = output_dir_of(config)
        # Every rank writes its log there; a training run also owns it until it ends.
        on_every_rank(lambda: prepare_run_folder(output_dir, run_files(mode, info.rank)), info)
        with lock_run_folder(output_dir, info) if mode == "train" else contextlib.nullcontext():
            code = _run_in_folder(config, mode, info, output_dir, eval_sizes or EvalSizes(), notes)
        clean = True
        return code
    except MoatError as e:
        # A failure every rank agreed on (``on_every_rank``) leaves them all at the same point: they
        # leave the group as on success, so none aborts in the middle of the others' teardown.
        clean = e.agreed_by_every_rank
        raise
    except RuntimeError as e:
        if info.distributed and is_peer_failure(e):
            logging.getLogger(f"moat.rank{info.rank}").error(f"stopped: a collective failed ({str(e)[:300]})")
            raise PeerFailedError() from e
        raise
    finally:
        close_logger()
        teardown(info, clean=clean)


def run_files(mode: str, rank: int) -> List[str]:
    """Names a run of ``mode`` writes in its folder: each must not be taken by a folder."""
    files = [f"log_rank{rank}.txt"]
    if mode == "train" and rank == 0:
        files += [RUN_CONFIG, "summary.csv", "curves.png", LOCK_NAME, LAST, BEST]
    return files


def output_dir_of(config: CfgNode) -> str:
    return os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_in_folder(
    config: CfgNode, mode: str, info: DistInfo, output_dir: str, eval_sizes: EvalSizes, notes: Sequence[str] = ()
) -> int:
    logger = create_logger(output_dir, info.rank)
    if info.is_primary:
        for note in notes:  # how the config files and flags of other trainers were read
            logger.info(note)
    if mode == "train" and info.is_primary:
        _take_over_folder(config, output_dir, logger)
    logger.info(
        f"device {info.device}, world size {info.world_size}, rank {info.rank}, "
        f"threads {torch.get_num_threads()}, output {output_dir}"
    )
    seed_everything(config.SEED + info.rank)
    if info.device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest kernels; TF32 for the fp32 matmuls/convs
        # that autocast leaves (bit-exact resume is a CPU guarantee, see README).
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    amp_dtype = None if config.AMP_OPT_LEVEL else resolve_amp_dtype(config.AMP, info.device)
    feed = Feed.of(config, info.device, autocast_factory(info.device, amp_dtype))
    precision = str(config.AMP_OPT_LEVEL and "apex " + config.AMP_OPT_LEVEL or amp_dtype or "off")
    logger.info(f"mixed precision: {precision}")

    if mode == "eval":
        return run_eval(config, info, logger, output_dir, eval_sizes, feed, precision)
    # Every rank reads the same folders: a data error they all meet is reported once.
    loaders = on_every_rank(lambda: build_loader(config, info), info)
    model = build_model(config).to(info.device, memory_format=feed.memory_format)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        f"model {config.MODEL.NAME}: {n_params / 1e6:.2f}M params, "
        f"{'channels_last' if config.CHANNELS_LAST else 'NCHW'}, {len(loaders.train_dataset.classes)} classes, "
        f"{len(loaders.train_dataset)} train / {len(loaders.val_dataset)} val images"
    )
    if mode == "throughput":
        measure_throughput(model, loaders.val, feed, logger=logger)
        return 0
    resume = choose_resume(config, output_dir, info, logger)
    if resume is None and config.MODEL.PRETRAINED:
        load_pretrained(
            config.MODEL.PRETRAINED,
            model,
            config.MODEL.PRETRAINED_EMA,
            logger,
            head=config.MODEL.PRETRAINED_HEAD,
            class_names=[str(c) for c in loaders.train_dataset.classes],
        )
    trainer = build_trainer(config, info, logger, output_dir, model, loaders, amp_dtype, feed)
    try:
        # Every rank restores the same file: a refusal (a layout that cannot continue the epoch)
        # is reported once.
        start = on_every_rank(
            lambda: trainer.restore(resume) if resume is not None else ResumePoint(config.TRAIN.START_EPOCH), info
        )
        # A resumed run continues the tracker runs its checkpoint names.
        trainer.records.start_trackers(resume.training.get("tracker_run_ids") if resume is not None else None)
        return trainer.fit(loaders.train, loaders.val, start)
    finally:
        trainer.records.close()


def _take_over_folder(config: CfgNode, output_dir: str, logger: logging.Logger) -> None:
    """Rank 0, holding the folder's lock: clear what interrupted saves left, and compare the
    folder's config with this run's (a changed one replaces it with the run's first checkpoint)."""
    removed, size = remove_interrupted_saves(output_dir)
    if removed:
        logger.info(f"removed {removed} temporary file(s) of interrupted saves ({size / 2**20:,.1f} MiB)")
    changed = run_config_changes(config, output_dir)
    if changed:
        logger.warning(
            f"{output_dir} holds a run with a different config ({'; '.join(changed)}); "
            "resuming from it mixes two experiments: use another --tag or --output "
            "to start fresh (config.yaml keeps the earlier config until this run saves a checkpoint)"
        )
    else:
        save_run_config(config, output_dir)


# ------------------------------------------------------------------------------------ training
def build_trainer(
    config: CfgNode,
    info: DistInfo,
    logger: logging.Logger,
    output_dir: str,
    model: nn.Module,
    loaders: Loaders,
    amp_dtype: Optional[torch.dtype],
    feed: Feed,
) -> Trainer:
    """What a training run needs around ``model`` (with its initial weights): the optimizer and
    its schedule, loss scaling, EMA, the DDP / compiled wrappers, the checkpoint saver and the
    run's records, handed to a ``Trainer``."""
    if config.TRAIN.FREEZE_BACKBONE:
        freeze_backbone(model)
    if info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif info.distributed:
        logger.info("SyncBatchNorm needs CUDA: on CPU each process keeps its own BatchNorm statistics")

    lrs = scaled_lrs(config, info.world_size)
    logger.info(
        f"learning rate {lrs.base:.3g} (BASE_LR {config.TRAIN.BASE_LR} x total batch "
        f"{config.DATA.BATCH_SIZE * info.world_size * config.TRAIN.ACCUMULATION_STEPS} / 512)"
    )
    optimizer = build_optimizer(config, model, lrs.base)
    scaler, model, optimizer = build_scaler(config, info.device, amp_dtype, model, optimizer)
    steps_per_epoch = len(loaders.train)
    if steps_per_epoch == 0:
        raise UserError(
            f"the training set is smaller than one batch ({config.DATA.BATCH_SIZE} x "
            f"{info.world_size} processes): lower --batch-size"
        )
    updates_per_epoch = math.ceil(steps_per_epoch / config.TRAIN.ACCUMULATION_STEPS)
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch, lrs.warmup, lrs.min)
    ema = build_ema(config, model)

    model_fwd = model
    if info.distributed:
        model_fwd = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    if config.TRAIN.COMPILE:
        mode = config.TRAIN.COMPILE_MODE
        # dynamic=False: training shapes are fixed, and a recompile with symbolic sizes (after a
        # size change in the same process) traces the relative-bias index math for minutes.
        model_fwd = torch.compile(model_fwd, mode=None if mode == "default" else mode, dynamic=False)
        logger.info(f"torch.compile, mode {mode}: the first steps compile the model")

    trackers = build_trackers(config, config_to_dict(config), output_dir, logger) if info.is_primary else []
    return Trainer(
        config=config,
        info=info,
        logger=logger,
        model=model,
        model_fwd=model_fwd,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        scaler=scaler,
        ema=ema,
        criterion=build_criterion(config, loaders.mixup),
        mixup_fn=loaders.mixup,
        feed=feed,
        saver=CheckpointSaver(output_dir, config.SAVE_FREQ, config.KEEP_CHECKPOINTS),
        records=RunRecords(output_dir, info.is_primary, trackers=trackers),
        class_names=[str(c) for c in loaders.train_dataset.classes],
        steps_per_epoch=steps_per_epoch,
    )


def choose_resume(
    config: CfgNode, output_dir: str, info: DistInfo, logger: logging.Logger
) -> Optional[CheckpointRecord]:
    """The checkpoint to resume from, or None. Rank 0 chooses (``resume_path``), every rank
    reads the chosen file (its tensors memory-mapped, shared between the processes of a node)."""
    choose = lambda: resume_path(output_dir, config.MODEL.RESUME, config.TRAIN.AUTO_RESUME, logger)  # noqa: E731
    path = on_every_rank(lambda: choose() if info.is_primary else None, info)
    path = broadcast_object(path, info)
    if path is None:
        return None
    return on_every_rank(lambda: read_checkpoint(path, mmap=True), info)


if __name__ == "__main__":
    code = main()
    # An error's traceback can keep a process group (or a DDP model holding one) alive in a
    # reference cycle; freed during interpreter shutdown, gloo may abort the process with
    # "terminate called without an active exception". Free it now, while the interpreter is whole.
    gc.collect()
    sys.exit(code)
