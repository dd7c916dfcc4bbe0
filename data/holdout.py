"""Validation images held out of the train split (``DATA.VAL_HOLDOUT``), for data that has no
validation split of its own, such as ImageNet-22K.

The train split is read once and serves as two datasets (``SplitView``): the held-out images with
the eval transform, and the rest, which is all that training ever sees, with the train transform.
Which images are held out depends on the data alone (``holdout_indices``): N per class, drawn by
a generator seeded with the class's name, among the class's images in dataset order (every format
keeps the order of the class-folder tree it was made from). So the same images are held out in
every run, seed, format, process count and ``--eval``, and a class's choice does not move when
other classes gain or lose images.
"""

from __future__ import annotations

import logging
import zlib
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .datasets import KeyedImageDataset

logger = logging.getLogger(__name__)

HOLDOUT_SEED = 0  # fixed: the held-out images must not change with the run's SEED


def holdout_indices(targets: Sequence[int], per_class: int, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)``: ascending dataset indices. Of every class, ``per_class`` images
    are held out, drawn uniformly without replacement by ``numpy.random.default_rng([HOLDOUT_SEED,
    crc32(class name)])`` from the class's images in dataset order; a class keeps at least one
    training image, so a class of k <= ``per_class`` images gives k - 1."""
    labels = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    order = np.argsort(labels, kind="stable")  # each class's images, in dataset order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    held = []
    for label in np.flatnonzero(counts > 1):
        count = int(counts[label])
        rng = np.random.default_rng([HOLDOUT_SEED, zlib.crc32(str(classes[label]).encode())])
        picks = rng.choice(count, size=min(per_class, count - 1), replace=False)
        held.append(order[starts[label] + picks])
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    keep = np.ones(len(labels), dtype=bool)
    keep[held_out] = False
    return np.flatnonzero(keep), held_out


class SplitView(KeyedImageDataset):
    """Samples ``indices`` of ``base``, decoded by ``base`` and transformed by ``transform``: one
    part of a split read once. Class names and ``root`` are the base's. Bad-image skipping stays
    within the view: a bad image is replaced by the view's next one, never by an image of the
    other part."""

    def __init__(self, base: KeyedImageDataset, indices: np.ndarray, transform: Callable | None, part: str) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.part = part
        self.classes = base.classes
        self.root = base.root
        self.targets = np.asarray(base.targets, dtype=np.int64)[self.indices]
        self._init_bad_image_flags(base.skip_bad_images)

    def _read(self, index: int) -> tuple[Image.Image, int]:
        return self.base._read(int(self.indices[index]))

    def sample_name(self, index: int) -> str:
        return self.base.sample_name(int(self.indices[index]))


def split_holdout(
    base: KeyedImageDataset, per_class: int, train_transform: Callable | None, eval_transform: Callable | None
) -> tuple[SplitView, SplitView]:
    """``(train, held_out)`` views of ``base`` (``holdout_indices``), logged."""
    train, held_out = holdout_indices(base.targets, per_class, base.classes)
    counts = np.bincount(np.asarray(base.targets, dtype=np.int64), minlength=len(base.classes))
    short = int(np.count_nonzero((counts > 0) & (counts <= per_class)))
    logger.info(
        "DATA.VAL_HOLDOUT %d: validating on %d images held out of %s (%d of each class%s), training on the other %d",
        per_class,
        len(held_out),
        base.root,
        per_class,
        f"; {short} classes of {per_class} or fewer images keep one for training" if short else "",
        len(train),
    )
    return SplitView(base, train, train_transform, "train"), SplitView(base, held_out, eval_transform, "held out")
