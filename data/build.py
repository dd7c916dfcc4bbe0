"""``build_loader``: datasets, samplers, loaders and Mixup from the DATA / AUG config keys.

Reproducibility (what makes a resumed run bit-identical):

* Order: ``ResumableSampler`` permutes with torch's ``DistributedSampler`` generator seeded by
  ``SEED + epoch``, so the order is a function of (SEED, epoch, world size, rank).
  ``sampler.set_start_index(k * BATCH_SIZE)`` resumes an epoch after ``k`` batches.
* Augmentation: each training sample is transformed under RNGs seeded from
  (SEED, epoch, dataset index) (see ``samplers.sample_seeds``), inside ``__getitem__``, and the
  caller's RNG states are restored afterwards. Hence a sample's crop/RandAugment/erasing does not
  depend on NUM_WORKERS, on which worker loads it, or on the world size, and a run resumed
  mid-epoch sees the same augmented tensors for its remaining batches. Worker seeds do not matter,
  so no ``worker_init_fn`` is needed; the loaders get their own ``torch.Generator`` so creating
  an iterator does not draw from the main process's global torch RNG.
* Mixup/CutMix runs in the main process and draws from the global ``numpy.random`` (timm's
  ``Mixup``); data loading leaves that stream untouched, so seeding or checkpointing numpy's
  global state in the trainer is all that is needed.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from timm.data import Mixup
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from .datasets import ClassFolderDataset, DataError, check_same_classes
from .samplers import ResumableSampler, ShardedEvalSampler
from .transforms import build_transform

logger = logging.getLogger(__name__)

IMAGENET_NUM_CLASSES = 1000


def _world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def build_dataset(is_train: bool, config: CfgNode, allow_fewer_classes: bool = False) -> ClassFolderDataset:
    """The train or val split under ``DATA.DATA_PATH`` with its transform.

    Checks the number of class folders against ``MODEL.NUM_CLASSES`` (and against 1000 for
    ``DATA.DATASET 'imagenet'``) so a wrong head size fails here in one line rather than as
    a CUDA assert or a silently wrong model. ``allow_fewer_classes`` accepts up to
    ``MODEL.NUM_CLASSES`` classes: evaluation may score a subset of the model's classes
    (ImageNet-A/-R style), matched to them by name by the caller.
    """
    data = config.DATA
    if not data.DATA_PATH:
        raise DataError("no data path given: set DATA.DATA_PATH (--data-path)")
    if not os.path.isdir(data.DATA_PATH):
        raise DataError(f"data path not found: {data.DATA_PATH} (DATA.DATA_PATH / --data-path)")
    root = os.path.join(data.DATA_PATH, data.TRAIN_SPLIT if is_train else data.VAL_SPLIT)
    # SKIP_BAD_IMAGES applies to val too: opting in means "never stop for a bad file"; the
    # substituted val samples are logged like the train ones.
    dataset = ClassFolderDataset(
        root, transform=build_transform(is_train, config), skip_bad_images=data.SKIP_BAD_IMAGES
    )
    found = len(dataset.classes)
    if allow_fewer_classes and found <= config.MODEL.NUM_CLASSES:
        return dataset
    if data.DATASET == "imagenet" and found != IMAGENET_NUM_CLASSES:
        raise DataError(
            f"found {found} class folders in {root}, but DATA.DATASET 'imagenet' "
            f"expects {IMAGENET_NUM_CLASSES}; for another class-folder tree use "
            f"DATA.DATASET imagefolder (--dataset imagefolder) and MODEL.NUM_CLASSES {found}"
        )
    if found != config.MODEL.NUM_CLASSES:
        raise DataError(
            f"found {found} class folders in {root}, but MODEL.NUM_CLASSES is "
            f"{config.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES {found}"
        )
    return dataset


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


def build_loader(
    config: CfgNode, with_train: bool = True
) -> tuple[ClassFolderDataset | None, ClassFolderDataset, DataLoader | None, DataLoader, Mixup | None]:
    """``(dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn)``; reads
    ``config`` only. Without ``with_train`` (evaluation) only the val split is read, and it may
    hold fewer classes than the model (``build_dataset``); the train entries are None.

    Train loader: ``ResumableSampler`` (call ``sampler.set_epoch(e)`` every epoch and
    ``sampler.set_start_index(i)`` to resume mid-epoch), ``drop_last=True``. Val loader: each rank
    gets a disjoint part of the exact val set (no padding), in order. Batches are
    ``(images [B, 3, IMG_SIZE, IMG_SIZE] float, targets [B] int64)``.
    Raises ``DataError`` (one line naming the path) for any problem with the data on disk.
    """
    world_size, rank = _world()
    dataset_train = build_dataset(True, config) if with_train else None
    dataset_val = build_dataset(False, config, allow_fewer_classes=not with_train)
    if dataset_train is not None:
        check_same_classes(dataset_train, dataset_val)
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
    data_loader_train = None
    if dataset_train is not None:
        data_loader_train = DataLoader(
            dataset_train,
            sampler=sampler_train,
            drop_last=True,
            generator=torch.Generator().manual_seed(config.SEED + rank),
            **common,
        )
    data_loader_val = DataLoader(
        dataset_val,
        sampler=sampler_val,
        shuffle=False,
        drop_last=False,
        generator=torch.Generator().manual_seed(config.SEED + rank),
        **common,
    )
    logger.info(
        "data: %s%d val images (%s), %d classes; rank %d/%d",
        f"{len(dataset_train)} train images ({dataset_train.root}), " if dataset_train is not None else "",
        len(dataset_val),
        dataset_val.root,
        len(dataset_val.classes),
        rank,
        world_size,
    )
    mixup_fn = build_mixup(config) if with_train else None
    return dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn
