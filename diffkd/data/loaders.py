"""DataLoaders for training and evaluation, epoch-keyed shuffling, and deterministic subsets.

Training order and augmentation are pure functions of (seed, epoch): call `loader.sampler.set_epoch(epoch)`
before every epoch, with or without DDP. The sampler forwards the epoch to the dataset's `set_epoch`, which
selects its augmentation draws. Workers are not persistent, so each epoch's workers see the current epoch.
"""
from __future__ import annotations

import itertools
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset


class EpochShuffleSampler(DistributedSampler):
    """Shuffles with a generator seeded by `seed + epoch` and shards the permutation across ranks (padding the
    last rank's share by repetition, as DistributedSampler does); `set_epoch` also reaches the dataset."""

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._last_iterated_epoch: int | None = None
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch; ``start`` skips this rank's first ``start`` samples of it (a run resumed mid-epoch
        continues with exactly the samples, and augmentations, the uninterrupted run would have seen)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in 0..{self.num_samples} (this rank's samples per epoch), got {start}")
        super().set_epoch(epoch)
        self.start = start
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        if self._last_iterated_epoch == self.epoch:
            warnings.warn(f"training sampler iterated twice at epoch {self.epoch}: the order and augmentation repeat. "
                          f"Call loader.sampler.set_epoch(epoch) before every epoch.", stacklevel=2)
        self._last_iterated_epoch = self.epoch
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """In-order evaluation shard: rank r gets indices r, r + R, r + 2R, ... Nothing is padded or dropped, so
    across ranks every sample is seen exactly once (all-reduce metric sums and counts, not per-rank means)."""

    def __init__(self, num_samples: int, *, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.num_replicas))


class SizeGroupedBatches(Sampler[list[int]]):
    """Evaluation batches of one image size each: the sampler's indices grouped by `sizes[index]` (groups in order
    of first appearance, indices in order within a group), each group cut into batches of `batch_size`.

    A batch of mixed sizes is padded to its largest image (torchvision's detection transform, the segmentation
    collate), which changes the predictions near the padding, so metrics would depend on the batch size; with
    one size per batch nothing is padded and every image is predicted as it would be alone (torchvision's
    references group by aspect ratio for the same reason)."""

    def __init__(self, sampler: Sampler[int], sizes: Sequence, batch_size: int):
        self.sampler, self.sizes, self.batch_size = sampler, list(sizes), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        groups: dict = {}
        for index in self.sampler:
            groups.setdefault(tuple(self.sizes[index]), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start:start + self.batch_size]

    def __len__(self) -> int:
        counts = Counter(tuple(self.sizes[index]) for index in self.sampler)
        return sum(-(-count // self.batch_size) for count in counts.values())


def _world() -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("build_loader(distributed=True) needs an initialised torch.distributed process group "
                         "(launch with torchrun and call torch.distributed.init_process_group first)")
    return dist.get_world_size(), dist.get_rank()


def build_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int = 0,
                 distributed: bool = False, seed: int = 0, drop_last: bool | None = None,
                 pin_memory: bool | None = None, collate_fn: Callable | None = None) -> DataLoader:
    """A DataLoader for training (shuffled, epoch-keyed, last incomplete batch dropped) or evaluation (in order,
    every sample once). With `distributed=True` each rank reads its own shard of the dataset.

    `drop_last` defaults to `train`: DiffKD's BatchNorm layers need at least 2 samples per batch. `pin_memory`
    defaults to whether CUDA is available. `collate_fn` builds a batch from a list of samples (default: torch's,
    which stacks; the detection and segmentation datasets need theirs, see diffkd.data.dense). An evaluation
    loader of a dataset with `image_sizes()` (one (height, width) per sample, e.g. a user's COCO or segmentation
    folder) batches images of one size together (`SizeGroupedBatches`), so that its metrics do not depend on the
    batch size.
    """
    minimum_batch = 2 if train else 1
    if batch_size < minimum_batch:
        reason = " (DiffKD's BatchNorm layers need at least 2 samples per batch)" if train else ""
        raise ValueError(f"batch_size must be >= {minimum_batch} for a {'training' if train else 'evaluation'} "
                         f"loader{reason}, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError(f"the {'training' if train else 'evaluation'} dataset is empty: {dataset!r}")
    drop_last = train if drop_last is None else drop_last
    num_replicas, rank = _world() if distributed else (1, 0)
    if train:
        sampler: Sampler[int] = EpochShuffleSampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
    else:
        sampler = ShardSampler(len(dataset), num_replicas=num_replicas, rank=rank)
    if drop_last and len(sampler) < batch_size:
        per_rank = f" ({len(sampler)} per rank across {num_replicas} ranks)" if num_replicas > 1 else ""
        raise ValueError(f"the dataset has {len(dataset)} samples{per_rank}, fewer than one batch of {batch_size}: "
                         f"dropping the incomplete last batch would leave no batch at all. Use a smaller batch "
                         f"size or more samples.")
    batching = dict(batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    if not train and hasattr(dataset, "image_sizes"):
        batching = dict(batch_sampler=SizeGroupedBatches(sampler, dataset.image_sizes(), batch_size))
    return DataLoader(
        dataset, **batching, num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, collate_fn=collate_fn,
        # Only seeds the workers' base seed, so that iterating never draws from the global RNG.
        generator=torch.Generator().manual_seed(seed),
    )


def subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """A deterministic n-sample subset for smoke runs and demos.

    Class-balanced when the dataset has `targets` (class counts differ by at most one, or a class is taken
    whole when it has too few samples); indices are kept in ascending order. Datasets with `select` (the
    in-memory ones and ImageFolder) return their own type, so augmentation and `set_epoch` keep working;
    others are wrapped in torch's Subset.
    """
    size = len(dataset)
    if not 1 <= n <= size:
        raise ValueError(f"subset size must be in 1..{size} (the dataset's size), got {n}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        shuffled_targets = torch.as_tensor(targets, dtype=torch.long)[order]
        sorted_targets, by_class = torch.sort(shuffled_targets, stable=True)
        counts = torch.bincount(sorted_targets)
        class_starts = torch.cumsum(counts, 0) - counts
        rank_in_class = torch.empty_like(by_class)
        rank_in_class[by_class] = torch.arange(size) - class_starts[sorted_targets]
        # Round-robin over classes: every class's k-th sample comes before any class's (k+1)-th.
        order = order[torch.argsort(rank_in_class * size + torch.arange(size))]
    chosen = torch.sort(order[:n]).values
    if hasattr(dataset, "select"):
        return dataset.select(chosen)
    return Subset(dataset, chosen.tolist())

