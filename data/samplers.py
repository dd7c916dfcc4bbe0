"""Samplers: a resumable, seeded training order and an exact (unpadded) distributed eval split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sized

import numpy as np
from torch.utils.data import DistributedSampler, Sampler

from .datasets import SampleKey

_MASK64 = (1 << 64) - 1


def sample_seeds(seed: int, epoch: int, indices: list[int] | np.ndarray) -> list[int]:
    """Per-sample augmentation seeds, a pure function of (seed, epoch, dataset index).

    The epoch's base comes from ``numpy.random.SeedSequence`` (a proper mixer, so seeds of
    nearby epochs are unrelated); each index is then mixed in with splitmix64, hand-written
    because it vectorises in numpy (a SeedSequence per sample costs ~10 us, too slow for
    ImageNet-sized epochs). Values are 63-bit so they suit ``torch.manual_seed`` and ``random.seed``.
    """
    base = int(np.random.SeedSequence([seed & _MASK64, epoch & _MASK64]).generate_state(1, np.uint64)[0])
    z = np.asarray(indices, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(base)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).tolist()


class ResumableSampler(DistributedSampler):
    """Training order: torch's ``DistributedSampler`` shuffle plus exact mid-epoch resume.

    The order of an epoch is a function of (seed, epoch, num_replicas, rank) only, and it works
    for a single process too (``num_replicas=1, rank=0``, no process group needed). It yields
    ``(index, sample_seed)`` keys: ``ClassFolderDataset`` seeds the augmentation of each sample
    from the second element, so a sample looks the same whichever worker loads it.

    ``len()`` stays the full per-rank epoch length even after ``set_start_index`` so step counts
    and LR schedules computed from ``len(loader)`` do not move on resume.
    """

    def __init__(
        self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0, drop_last: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; also cancels any ``set_start_index`` of the previous epoch."""
        super().set_epoch(epoch)
        self.start_index = 0

    def set_start_index(self, start_index: int) -> None:
        """Make iterations of the current epoch begin at this rank's ``start_index``-th sample.

        To resume after ``k`` finished batches of size ``B`` (train loader with ``drop_last``),
        pass ``k * B``: the remaining batches are exactly those the uninterrupted run had.
        """
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start index {start_index} outside [0, {self.num_samples}] (samples per rank this epoch)")
        self.start_index = start_index

    def epoch_indices(self) -> list[int]:
        """This rank's full dataset-index order for the current epoch (ignores the start index)."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[SampleKey]:
        indices = self.epoch_indices()[self.start_index :]
        return iter(zip(indices, sample_seeds(self.seed, self.epoch, indices)))


class ShardedEvalSampler(Sampler[int]):
    """Rank ``r`` of ``R`` gets indices ``r, r + R, r + 2R, ...`` of the whole dataset, in order.

    Hand-written because torch's ``DistributedSampler`` either pads with duplicates or drops
    the tail; here the ranks' parts are disjoint and cover the dataset exactly, so correct counts
    summed over ranks equal a single-process evaluation (ranks may differ by one sample).
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.num_items = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_items, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_items, self.num_replicas))


def rank_subset(num_items: int, num_replicas: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s fixed part of a dataset: indices ``rank, rank + R, rank + 2R, ...``.

    The part a rank keeps in RAM under ``DATA.CACHE_MODE part`` (as Swin's ``CachedImageFolder``
    does), and the part ``ShardedEvalSampler`` gives it, so validation reads only cached images.
    """
    return np.arange(rank, num_items, num_replicas)


class RankSubsetSampler(ResumableSampler):
    """Training order over one rank's fixed subset of the dataset (``DATA.CACHE_MODE part``).

    Swin's ``SubsetRandomSampler`` with the resume of ``ResumableSampler``: the subset is a
    function of (dataset size, world size, rank) only (:func:`rank_subset`); within it the epoch's
    order is ``torch.randperm`` seeded with ``seed + epoch``, torch's ``DistributedSampler``
    formula, so with one process the order equals ``ResumableSampler``'s. Every rank yields
    ``ceil(N / world size)`` keys (a shorter subset repeats the start of its own order, as
    ``DistributedSampler`` pads), so all ranks run the same number of steps.
    """

    def __init__(self, indices: np.ndarray, num_samples: int, seed: int = 0) -> None:
        super().__init__(indices, num_replicas=1, rank=0, seed=seed)
        self.subset = np.asarray(indices, dtype=np.int64)
        # DistributedSampler pads its permutation up to total_size by repeating its start.
        self.num_samples = self.total_size = num_samples

    def epoch_indices(self) -> list[int]:
        return self.subset[super().epoch_indices()].tolist()


@dataclass(frozen=True)
class BatchLayout:
    """How a run cuts an epoch's sample order into steps: ``batch_size`` per process and
    micro-step, ``world_size`` processes, ``accumulation_steps`` micro-steps per update."""

    batch_size: int
    world_size: int
    accumulation_steps: int = 1

    @property
    def global_batch(self) -> int:
        """Samples per micro-step, all processes together."""
        return self.batch_size * self.world_size

    @property
    def samples_per_update(self) -> int:
        return self.global_batch * self.accumulation_steps

    def describe(self) -> str:
        return f"batch {self.batch_size} x {self.world_size} process(es) x {self.accumulation_steps} accumulation"


def continue_epoch_at(samples_done: int, layout: BatchLayout) -> Optional[int]:
    """The micro-batch at which ``layout`` continues an epoch exactly after its first
    ``samples_done`` samples, or None when that is not the start of an update.

    ``ResumableSampler`` gives rank ``r`` of ``W`` the positions ``r, r + W, ...`` of one padded
    permutation whose first N entries do not depend on ``W``; after ``k`` batches of ``B`` on
    every rank the run has consumed exactly positions ``0 .. k*B*W - 1``. Any layout whose
    samples per update divide that count therefore continues at the next unseen sample, neither
    repeating nor skipping one. (``RankSubsetSampler`` orders per rank; the same rule holds
    there as long as the world size is unchanged.)
    """
    if samples_done < 0 or samples_done % layout.samples_per_update:
        return None
    return samples_done // layout.global_batch
