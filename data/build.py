"""``build_loader``: datasets (any ``DATA.FORMAT``), samplers, loaders and Mixup from the DATA / AUG keys.

Reproducibility (what makes a resumed run bit-identical):

* Order: ``ResumableSampler`` permutes with torch's ``DistributedSampler`` generator seeded by
  ``SEED + epoch``, so the order is a function of (SEED, epoch, world size, rank).
  ``sampler.set_start_index(k * BATCH_SIZE)`` resumes an epoch after ``k`` batches.
* Augmentation: each training sample is transformed under RNGs seeded from
  (SEED, epoch, dataset index) (see ``samplers.sample_seeds``), inside ``__getitem__``, and the
  caller's RNG states are restored afterwards. Hence a sample's crop/RandAugment/erasing does not
  depend on NUM_WORKERS, on which worker loads it, or on the world size, and a run resumed
  mid-epoch sees the same augmented tensors for its remaining batches. Worker seeds do not matter;
  the loaders get their own ``torch.Generator`` so creating an iterator does not draw from the
  main process's global torch RNG.
* Preemption: the loaders' workers ignore SIGTERM/SIGINT (``utils.preemption``), which
  ``torchrun`` and SLURM deliver to them too; the trainer handles the signal, saves and stops
  them.
* Mixup/CutMix runs in the main process and draws from the global ``numpy.random`` (timm's
  ``Mixup``); data loading leaves that stream untouched, so seeding or checkpointing numpy's
  global state in the trainer is all that is needed.

Formats (``DATA.FORMAT``) and what resume guarantees for each. Every format indexes its images
0..N-1 in the order of the class-folder tree it was made from (``tools/make_zip_dataset.py`` and
``tools/make_shards.py`` keep ImageFolder's order), and serves the same ``(index, seed)`` keys,
so the same data gives the same batches, bit for bit, in every format:

* ``folder``: class folders (``ClassFolderDataset``); exact resume as above.
* ``zip`` (Swin layout, ``data.zip_dataset``): with ``CACHE_MODE no`` or ``full`` the sampler is
  ``ResumableSampler`` over all images, as for folders. With ``part`` each rank keeps a fixed
  subset in RAM, indices ``rank, rank + W, ...`` (a function of the dataset, the world size W and
  the rank only), and ``RankSubsetSampler`` permutes only that subset, by (SEED, epoch), padded
  to ``ceil(N / W)`` per rank. A resume with the same world size is exact; a different world
  size gives every rank another subset (and the trainer already warns that RNG states are not
  restored). With one process, ``part`` is exactly ``no``/``full``/``folder``.
* ``shards`` (WebDataset tars + index, ``data.shards``): random access, ``ResumableSampler``
  over all samples; exact resume like folders. Shard boundaries play no part in the order, so
  uneven shard sizes and counts need nothing special; ranks read disjoint samples apart from the
  up to W-1 repeats that pad the last round (torch's ``DistributedSampler``), as for folders.

In every format the train loader drops the last partial batch (``drop_last``) and validation
reads the exact val set, unpadded, split over ranks by ``ShardedEvalSampler``.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
from typing import NamedTuple

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from config import with_values
from utils.distributed import DistInfo
from utils.errors import ConfigError, UserError
from utils.preemption import leave_stop_signals_to_trainer, stop_signals_blocked

from .class_map import check_class_coverage, read_class_map
from .datasets import ClassFolderDataset, DataError, KeyedImageDataset, check_same_classes
from .device_loader import fast_collate, normalize_on_device, wrap_for_device
from .holdout import SplitView, split_holdout
from .samplers import RankSubsetSampler, ResumableSampler, ShardedEvalSampler, rank_subset
from .shards import ShardDataset, resolve_shards
from .transforms import build_transform
from .zip_dataset import ZipImageDataset

logger = logging.getLogger(__name__)

IMAGENET_NUM_CLASSES = 1000
# Classes each DATA.DATASET expects ('imagefolder': any number); ImageNet-22K is the fall 2011 release.
EXPECTED_CLASSES = {"imagenet": IMAGENET_NUM_CLASSES, "imagenet22k": 21841}


class Loaders(NamedTuple):
    """What ``build_loader`` builds: the two datasets, their loaders and the Mixup/CutMix
    function (None when both are off). Training entries are None for evaluation."""

    train_dataset: KeyedImageDataset | None
    val_dataset: KeyedImageDataset
    train: DataLoader | None
    val: DataLoader
    mixup: Mixup | None


class TrainerDataLoader(DataLoader):
    """torch's ``DataLoader`` whose workers leave SIGTERM/SIGINT to the trainer: they start with
    the signals blocked, then ignore SIGINT and any SIGTERM not sent by the trainer
    (``utils.preemption``), so a preemption signal sent to the whole process group or to every
    process cannot kill them before the trainer saves."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("num_workers", 0) > 0:
            kwargs["worker_init_fn"] = functools.partial(leave_stop_signals_to_trainer, trainer_pid=os.getpid())
        super().__init__(*args, **kwargs)

    def __iter__(self):
        with stop_signals_blocked():  # workers are forked here (once, with persistent workers)
            return super().__iter__()


def build_dataset(
    is_train: bool,
    config: CfgNode,
    native_classes: list[str] | None = None,
    allow_fewer_classes: bool = False,
    uint8: bool = False,
    check_count: bool = True,
    info: DistInfo | None = None,
) -> KeyedImageDataset:
    """The train or val split of ``DATA.DATA_PATH`` in ``DATA.FORMAT``, with its transform.

    Checks the number of classes against ``MODEL.NUM_CLASSES`` (and against
    ``EXPECTED_CLASSES`` of ``DATA.DATASET``; with ``DATA.CLASS_MAP``, the map's length instead) so a wrong
    head size fails here in one line rather than as a CUDA assert or a silently wrong model.
    ``native_classes``: the train split's names of the zip map / shard class indices, for the
    val split (Swin's val maps have no class folders to read names from). ``allow_fewer_classes``
    accepts up to ``MODEL.NUM_CLASSES`` classes: evaluation may score a subset of the model's
    classes (ImageNet-A/-R style), matched to them by name by the caller. ``uint8``: images
    stay uint8 (``build_transform``), for normalisation on the device. ``check_count`` False
    leaves the class-count check (``check_class_count``) to the caller. ``info``: this process's
    place in the job (a zip cache keeps this rank's part); None is a single process.
    """
    data = config.DATA
    if not data.DATA_PATH:
        raise DataError("no data path given: set DATA.DATA_PATH (--data-path)")
    if not os.path.isdir(data.DATA_PATH):
        raise DataError(f"data path not found: {data.DATA_PATH} (DATA.DATA_PATH / --data-path)")
    class_map = read_class_map(data.CLASS_MAP) if data.CLASS_MAP else None
    if class_map is not None and len(class_map) != config.MODEL.NUM_CLASSES:
        raise ConfigError(
            f"DATA.CLASS_MAP {data.CLASS_MAP} names {len(class_map)} classes, but MODEL.NUM_CLASSES is "
            f"{config.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES {len(class_map)}"
        )
    split = data.TRAIN_SPLIT if is_train else data.VAL_SPLIT
    transform = build_transform(is_train, config, uint8=uint8)
    # SKIP_BAD_IMAGES applies to val too: opting in means "never stop for a bad file"; the
    # substituted val samples are logged like the train ones.
    if data.FORMAT == "zip":
        world_size, rank = (info.world_size, info.rank) if info is not None else (1, 0)
        # Validation reads only this rank's part (ShardedEvalSampler), so caching more is waste
        # (Swin caches val in 'part' mode too).
        cache_mode = data.CACHE_MODE if is_train or data.CACHE_MODE == "no" else "part"
        dataset = ZipImageDataset(
            os.path.join(data.DATA_PATH, f"{split}.zip"),
            os.path.join(data.DATA_PATH, f"{split}_map.txt"),
            transform,
            native_classes=native_classes,
            class_map=class_map,
            cache_mode=cache_mode,
            rank=rank,
            world_size=world_size,
            skip_bad_images=data.SKIP_BAD_IMAGES,
        )
    elif data.FORMAT == "shards":
        index, shards, _ = resolve_shards(data.TRAIN_SHARDS if is_train else data.VAL_SHARDS, data.DATA_PATH, split)
        dataset = ShardDataset(
            index or shards,
            transform,
            native_classes=native_classes,
            num_classes=config.MODEL.NUM_CLASSES if class_map is None else None,
            class_map=class_map,
            skip_bad_images=data.SKIP_BAD_IMAGES,
        )
    else:
        dataset = ClassFolderDataset(
            os.path.join(data.DATA_PATH, split),
            transform=transform,
            skip_bad_images=data.SKIP_BAD_IMAGES,
            class_map=class_map,
        )
    if check_count:
        check_class_count(dataset, config, allow_fewer=allow_fewer_classes)
    return dataset


def check_class_count(dataset: KeyedImageDataset, config: CfgNode, allow_fewer: bool = False) -> None:
    """The dataset's classes against ``MODEL.NUM_CLASSES`` (and ``EXPECTED_CLASSES`` of
    ``DATA.DATASET``); a class map was checked against the count already. ``allow_fewer`` accepts up
    to ``MODEL.NUM_CLASSES`` (subset evaluation)."""
    data = config.DATA
    if data.CLASS_MAP:
        return
    found = len(dataset.classes)
    if allow_fewer and found <= config.MODEL.NUM_CLASSES:
        return
    what = "class folders" if data.FORMAT == "folder" else "classes"
    expected = EXPECTED_CLASSES.get(data.DATASET)
    if expected is not None and found != expected:
        raise DataError(
            f"found {found} {what} in {dataset.root}, but DATA.DATASET '{data.DATASET}' "
            f"expects {expected}; for another dataset use "
            f"DATA.DATASET imagefolder (--dataset imagefolder) and MODEL.NUM_CLASSES {found}"
        )
    if found != config.MODEL.NUM_CLASSES:
        raise DataError(
            f"found {found} {what} in {dataset.root}, but MODEL.NUM_CLASSES is "
            f"{config.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES {found}"
        )


def part_cache_resume_note(config: CfgNode, saved: int, world_size: int, position) -> str | None:
    """What a resume changes in the data when it cannot continue exactly: a ``CACHE_MODE part``
    checkpoint written by ``saved`` processes, another number than ``world_size`` (every rank's
    subset depends on it). From an epoch's end (``position.epoch_complete``) that is a note for
    the log; mid-epoch the epoch's order cannot be continued, so the resume is refused
    (``UserError`` naming both process counts)."""
    if config.DATA.FORMAT != "zip" or config.DATA.CACHE_MODE != "part" or saved == world_size:
        return None
    if not position.epoch_complete:
        raise UserError(
            f"DATA.CACHE_MODE part: the checkpoint stopped inside epoch {position.epoch} with {saved} "
            f"process(es) and this run has {world_size}; each rank's part of the images depends on the number of "
            f"processes, so the epoch cannot continue exactly: finish it with {saved} process(es)"
        )
    return (
        f"DATA.CACHE_MODE part: the checkpoint was written by {saved} process(es), this run has {world_size}, "
        "so every rank trains on another part of the train images"
    )


def build_holdout_split(
    config: CfgNode, uint8: bool, info: DistInfo | None, with_train: bool
) -> tuple[SplitView | None, SplitView]:
    """``DATA.VAL_HOLDOUT``: the train split, read once, as the training set (None without
    ``with_train``) and the validation set of the images held out of it (``data.holdout``);
    ``VAL_SPLIT`` is not read. Evaluation reads the train split's index only, uncached."""
    if not with_train and config.DATA.FORMAT == "zip" and config.DATA.CACHE_MODE != "no":
        config = with_values(config, {"DATA.CACHE_MODE": "no"})
    base = build_dataset(True, config, uint8=uint8, check_count=False, info=info)
    train, held_out = split_holdout(
        base, config.DATA.VAL_HOLDOUT, base.transform, build_transform(False, config, uint8=uint8)
    )
    if len(held_out) == 0:
        raise DataError(f"{base.root}: no class has two images, so DATA.VAL_HOLDOUT has nothing to hold out")
    if not with_train:
        check_class_count(held_out, config, allow_fewer=True)
    return (train if with_train else None), held_out


def build_mixup(config: CfgNode) -> Mixup | None:
    """timm ``Mixup`` (Mixup/CutMix + label smoothing into soft targets), or None when both are off.

    Its output targets are [B, NUM_CLASSES] soft labels (use ``SoftTargetCrossEntropy``); it
    needs an even batch, which the train loader's ``drop_last`` guarantees for even BATCH_SIZE.
    """
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX):
        return None
    return Mixup(
        mixup_alpha=aug.MIXUP,
        cutmix_alpha=aug.CUTMIX,
        cutmix_minmax=list(aug.CUTMIX_MINMAX) or None,
        prob=aug.MIXUP_PROB,
        switch_prob=aug.MIXUP_SWITCH_PROB,
        mode=aug.MIXUP_MODE,
        label_smoothing=config.MODEL.LABEL_SMOOTHING,
        num_classes=config.MODEL.NUM_CLASSES,
    )


def build_loader(config: CfgNode, info: DistInfo | None = None, with_train: bool = True) -> Loaders:
    """The datasets, loaders and Mixup of ``config`` for the process ``info`` describes (None: a
    single process on the CPU). Without ``with_train`` (evaluation) only the val split is read,
    and it may hold fewer classes than the model (``build_dataset``); the train entries are None.

    ``info.device``: where the batches are used. When ``DATA.NORMALIZE_ON_DEVICE`` applies there
    (``device_loader.normalize_on_device``), the workers deliver uint8 batches and the loaders
    are wrapped to normalise (and, for training, randomly erase) them on the device; the batches
    then arrive on the device already.

    Train loader: ``ResumableSampler`` (call ``sampler.set_epoch(e)`` every epoch and
    ``sampler.set_start_index(i)`` to resume mid-epoch), ``drop_last=True``. Val loader: each rank
    gets a disjoint part of the exact val set (no padding), in order. Batches are
    ``(images [B, 3, IMG_SIZE, IMG_SIZE] float, targets [B] int64)``.
    Raises ``DataError`` (one line naming the path) for any problem with the data on disk.
    """
    world_size, rank = (info.world_size, info.rank) if info is not None else (1, 0)
    device = info.device if info is not None else torch.device("cpu")
    uint8 = normalize_on_device(config, device)
    if config.DATA.DATASET == "imagenet22k" and config.DATA.FORMAT == "folder":
        logger.info(
            "ImageNet-22K as 14M files in class folders: DATA.FORMAT shards (tools/make_shards.py) packs them into "
            "a few thousand tar files"
        )
    if config.DATA.VAL_HOLDOUT:
        dataset_train, dataset_val = build_holdout_split(config, uint8, info, with_train)
    else:
        # Training: the two splits are compared before either is counted, so a class folder that
        # only one split has is named as such rather than as a wrong MODEL.NUM_CLASSES.
        dataset_train = build_dataset(True, config, uint8=uint8, check_count=False, info=info) if with_train else None
        dataset_val = build_dataset(
            False,
            config,
            native_classes=getattr(dataset_train, "native_classes", None),
            allow_fewer_classes=not with_train,
            uint8=uint8,
            check_count=not with_train,
            info=info,
        )
    sampler_train = None
    if dataset_train is not None:
        if config.DATA.CLASS_MAP:
            check_class_coverage(dataset_train, dataset_val, config.DATA.CLASS_MAP)
        else:
            check_same_classes(dataset_train, dataset_val)
        check_class_count(dataset_train, config)
        if config.DATA.FORMAT == "zip" and config.DATA.CACHE_MODE == "part":
            subset = rank_subset(len(dataset_train), world_size, rank)
            per_rank = math.ceil(len(dataset_train) / world_size)
            sampler_train = RankSubsetSampler(subset, per_rank, seed=config.SEED)
        else:
            sampler_train = ResumableSampler(dataset_train, num_replicas=world_size, rank=rank, seed=config.SEED)
        if len(sampler_train) < config.DATA.BATCH_SIZE:
            raise DataError(
                f"{dataset_train.root} has {len(dataset_train)} images "
                f"({len(sampler_train)} per process), fewer than DATA.BATCH_SIZE="
                f"{config.DATA.BATCH_SIZE}: no full training batch"
            )
    sampler_val = ShardedEvalSampler(dataset_val, num_replicas=world_size, rank=rank)

    num_workers = config.DATA.NUM_WORKERS
    common = dict(
        batch_size=config.DATA.BATCH_SIZE,
        num_workers=num_workers,
        pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    if uint8:
        common["collate_fn"] = fast_collate  # uint8 batch without a float copy
    if num_workers > 0 and config.DATA.FORMAT == "zip" and config.DATA.CACHE_MODE != "no":
        # Forked workers share the RAM cache's pages; spawn/forkserver (Python 3.14's default on
        # Linux) would pickle a copy of it into every worker.
        if "fork" in multiprocessing.get_all_start_methods():
            common["multiprocessing_context"] = "fork"
    data_loader_train = None
    if dataset_train is not None:
        data_loader_train = TrainerDataLoader(
            dataset_train,
            sampler=sampler_train,
            drop_last=True,
            generator=torch.Generator().manual_seed(config.SEED + rank),
            **common,
        )
    data_loader_val = TrainerDataLoader(
        dataset_val,
        sampler=sampler_val,
        shuffle=False,
        drop_last=False,
        generator=torch.Generator().manual_seed(config.SEED + rank),
        **common,
    )
    logger.info(
        "data (%s): %s%d val images (%s), %d classes; rank %d/%d",
        config.DATA.FORMAT,
        f"{len(dataset_train)} train images ({dataset_train.root}), " if dataset_train is not None else "",
        len(dataset_val),
        dataset_val.root,
        len(dataset_val.classes),
        rank,
        world_size,
    )
    if uint8:
        if data_loader_train is not None:
            data_loader_train = wrap_for_device(data_loader_train, config, device, is_train=True)
        data_loader_val = wrap_for_device(data_loader_val, config, device, is_train=False)
    return Loaders(
        dataset_train, dataset_val, data_loader_train, data_loader_val, build_mixup(config) if with_train else None
    )
