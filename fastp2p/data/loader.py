"""Batching on ``torch.utils.data.DataLoader``: worker processes, deterministic per-epoch shuffling, cheap collate.

Batch contract: ``loader.epoch(e)`` (or plain ``for A, B in loader``) yields ``(A, B)``: float32 NCHW tensors in
[-1, 1] on ``device``; ``A`` the source / network input (``input_nc`` channels), ``B`` the target (``output_nc``).
``loader.batches(e)`` yields the full ``Batch(A, B, paths, bad)`` when the file names are wanted.

Epochs. ``len(loader)`` is the number of batches per epoch: ``ceil(n / batch_size)``, or ``floor`` with ``drop_last``.
Like the reference (``drop_last=False``), the last partial batch is kept by default, so every pair is seen exactly once
per epoch. The order is a permutation drawn from a ``torch.Generator`` seeded from ``(seed, epoch)`` and the jitter of
each item from ``(seed, epoch, index)`` (see datasets.py), so an epoch's batches are identical for any ``num_workers``,
and ``loader.epoch(e, start=k)`` resumes mid-epoch with exactly batches k, k+1, ... of that epoch (skipped batches are
never loaded). Plain iteration runs epoch ``loader.next_epoch`` (``set_epoch``) and, when that epoch was consumed to
the end, advances it by one; an epoch abandoned midway (max_steps) is not advanced.

Sharding (data-parallel training, one loader per rank): ``shard_id`` / ``num_shards`` give each rank a slice of the
same ``(seed, epoch)`` permutation, ``DistributedSampler``'s semantics: rank ``r`` takes positions ``r, r + k, r + 2k,
...`` (``k = num_shards``), so the ranks' step-``s`` batches together are exactly the step-``s`` batch of one process
with a ``k`` times larger batch. Every rank must run the same number of steps (each step is a collective), so the
permutation is made a multiple of ``k`` long: padded with its own first items by default (every pair is seen at
least once per epoch, at most ``k - 1`` of them twice), or cut short with ``drop_last`` (at most ``k - 1`` pairs,
different ones each epoch, are skipped). ``len(loader)`` is then the batches per epoch of one rank.

The sampler yields ``(epoch, index)`` keys rather than bare indices, so persistent workers (which hold a copy of the
dataset made when they started) always know the epoch without any broadcast.

Bad files (``skip_bad``) found while decoding inside workers travel back in ``Batch.bad``; the loader merges them into
the main process's ``dataset.bad_files`` (deduplicated by path) before yielding the batch, so after an epoch
``loader.bad_files`` / ``dataset.bad_files`` lists every file skipped so far, whatever process found it.

Errors (no ``skip_bad``) raised in a worker also come back in-band: DataLoader would re-raise a worker's ``DataError``
as a ``RuntimeError`` holding the worker's traceback (it rebuilds exceptions from one message string, and
``DataError`` takes two arguments), so the worker returns the error as a value and the main process raises the same
one-line ``DataError`` / ``UserError`` that ``num_workers=0`` gives.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from ..errors import DataError, UserError
from .datasets import BadFile, Pair, PairDataset, derive_seed

log = logging.getLogger("fastp2p.data")

# Key slot that no item index can take (derive_seed maps -1 to 2**64 - 1): keeps the shuffle and worker-seed streams
# apart from the per-item jitter streams derive_seed(seed, epoch, index).
_NOT_AN_INDEX = -1


class Batch(NamedTuple):
    A: torch.Tensor  # (N, input_nc, H, W) float32 in [-1, 1]
    B: torch.Tensor  # (N, output_nc, H, W) float32 in [-1, 1]
    paths: list[str]
    bad: tuple[BadFile, ...]  # files skipped while producing this batch (skip_bad)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    if get_worker_info() is not None:
        # In a worker default_collate stacks straight into shared memory: the batch reaches the main process with no
        # further copy (a plain stack would be copied into shared memory again when pickled).
        return default_collate(tensors)
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0)  # a view, no copy
    # In the main process numpy, not torch.stack: torch splits the copy across its intra-op threads, and with the other
    # core busy (the training step, another job) each call then waits for a scheduler tick (measured 7 ms per stack).
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def collate(items: Sequence[Pair]) -> Batch:
    """Stack items into a ``Batch`` (one copy of the pixels). Items of different sizes (possible only with
    ``--preprocess none/scale_width/crop`` on images of different sizes) give a ``UserError`` naming them."""
    shapes = {(tuple(it.A.shape), tuple(it.B.shape)) for it in items}
    if len(shapes) > 1:
        listing = ", ".join(f"{it.path} {tuple(it.A.shape[1:])}" for it in items[:4])
        more = ", ..." if len(items) > 4 else ""
        raise UserError(f"--batch_size: pairs in one batch have different sizes after preprocessing ({listing}{more}); "
                        f"use a fixed-size --preprocess (e.g. resize_and_crop) or --batch_size 1")
    return Batch(
        _stack([it.A for it in items]),
        _stack([it.B for it in items]),
        [it.path for it in items],
        tuple(entry for it in items for entry in it.bad),
    )


@dataclass(frozen=True)
class _Failure:
    """A ``UserError`` carried as a value from a worker to the main process (see the module docstring)."""

    path: str | None  # None: a plain UserError whose message is `problem`
    problem: str

    @classmethod
    def of(cls, e: UserError) -> _Failure:
        return cls(e.path, e.problem) if isinstance(e, DataError) else cls(None, str(e))

    def error(self) -> UserError:
        return UserError(self.problem) if self.path is None else DataError(self.path, self.problem)


class _Guarded(Dataset):
    """The dataset as the DataLoader sees it: user errors become ``_Failure`` values instead of exceptions."""

    def __init__(self, dataset: PairDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Pair | _Failure:
        try:
            return self.dataset[key]
        except UserError as e:
            return _Failure.of(e)


def _collate_guarded(items: Sequence[Pair | _Failure]) -> Batch | _Failure:
    for it in items:
        if isinstance(it, _Failure):
            return it
    try:
        return collate(items)  # type: ignore[arg-type]
    except UserError as e:
        return _Failure.of(e)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` keys: a fresh permutation per epoch from ``torch.Generator`` seeded with
    ``(seed, epoch)`` when shuffling, else ``0..n-1``; with ``num_shards > 1`` only shard ``shard_id``'s slice of it
    (see the module docstring)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, shard_id: int = 0, num_shards: int = 1,
                 drop_last: bool = False):
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} outside 0..{num_shards - 1} (num_shards {num_shards})")
        self.n, self.seed, self.shuffle = n, int(seed), shuffle
        self.shard_id, self.num_shards, self.drop_last = int(shard_id), int(num_shards), drop_last
        self.epoch = 0
        self.start = 0  # items of the shard's order to skip (mid-epoch resume)

    @property
    def shard_len(self) -> int:
        """Items per epoch in this shard (the same for every shard)."""
        if self.num_shards == 1:
            return self.n
        return self.n // self.num_shards if self.drop_last else math.ceil(self.n / self.num_shards)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _NOT_AN_INDEX))
        return torch.randperm(self.n, generator=g).tolist()

    def shard(self, epoch: int) -> list[int]:
        """This shard's indices of ``epoch``, in order: every ``num_shards``-th item of the epoch's permutation, padded
        with (or cut to) a multiple of ``num_shards`` first so every shard has ``shard_len`` items."""
        order = self.order(epoch)
        if self.num_shards == 1:
            return order
        total = self.shard_len * self.num_shards
        if total > len(order):  # pad cyclically (more than once when there are fewer pairs than shards)
            order = (order * math.ceil(total / max(1, len(order))))[:total]
        return order[:total][self.shard_id::self.num_shards]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for i in self.shard(epoch)[self.start:])

    def __len__(self) -> int:
        return max(0, self.shard_len - self.start)


class EpochLoader:
    """The batch/epoch protocol every loader backend shares (torch, DALI, gpu-cache): subclasses provide
    ``batches(epoch, start)``, ``__len__``, ``close()`` and a ``dataset``; this adds ``epoch``, plain iteration,
    ``bad_files`` and ``with``."""

    dataset: PairDataset
    next_epoch: int = 0

    def batches(self, epoch: int | None = None, start: int = 0) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def bad_files(self) -> list[BadFile]:
        return self.dataset.bad_files

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(A, B)`` batches of ``epoch``, from batch ``start`` (``0 <= start <= len(self)``) on."""
        for batch in self.batches(epoch, start):
            yield batch.A, batch.B

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.next_epoch
        yield from self.epoch(epoch)
        self.next_epoch = epoch + 1


def _init_worker(worker_id: int) -> None:
    """Each DataLoader worker process: one intra-op thread, and stop signals left to the main process.

    Threads: a worker decodes and crops one item at a time; more than one torch thread per worker only multiplies
    the threads competing for the cores the training step uses (DataLoader sets 1 too; this keeps it whatever the
    torch version). Signals: a signal sent to the whole process group (a terminal's Ctrl-C, Slurm, Kubernetes,
    ``timeout``) would otherwise kill the workers mid-batch, and DataLoader then raises "worker ... is killed by
    signal" in the main process before it can save. The main process stops them when it closes the loader; if it
    dies, each worker's parent watchdog ends it."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def effective_workers(num_workers: int, cores: int | None = None) -> int:
    """``num_workers`` capped by the cores this process may use (its affinity mask, shared with the other training
    processes of this machine under torchrun). More worker processes than cores only take turns on them; the batches
    are the same for any worker count (every item's randomness is seeded from ``(seed, epoch, index)``)."""
    from ..perf import available_cores, local_processes, thread_plan

    return thread_plan(num_workers, available_cores() if cores is None else cores, local_processes())[1]


class PairLoader(EpochLoader):
    """A DataLoader over a ``PairDataset`` with epoch bookkeeping; build it with ``make_loader``."""

    def __init__(self, dataset: PairDataset, batch_size: int, num_workers: int, seed: int, drop_last: bool = False,
                 pin_memory: bool | None = None, device: str | torch.device = "cpu", shuffle: bool = True,
                 prefetch_factor: int = 2, shard_id: int = 0, num_shards: int = 1):
        if batch_size < 1:
            raise UserError(f"--batch_size must be >= 1 (got {batch_size})")
        if num_workers < 0:
            raise UserError(f"--num_workers must be >= 0 (got {num_workers})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = torch.device(device)
        if pin_memory is None:  # pinned host memory only helps (and only exists) for copies to a CUDA device
            pin_memory = self.device.type == "cuda" and torch.cuda.is_available()
        self.pin_memory = pin_memory
        self.sampler = EpochSampler(len(dataset), seed, shuffle, shard_id, num_shards, drop_last)
        self.next_epoch = 0  # the epoch plain iteration runs
        self.requested_workers = num_workers
        num_workers = effective_workers(num_workers)
        if num_workers < self.requested_workers:
            log.info("--num_workers %d: using %d, the cores this process may use (the batches are the same)",
                     self.requested_workers, num_workers)
        self.num_workers = num_workers
        workers = num_workers > 0
        self._loader = DataLoader(
            _Guarded(dataset),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collate_guarded,
            pin_memory=pin_memory,
            drop_last=drop_last,
            # Workers start once and live across epochs (the dataset index and decoded state are not rebuilt).
            persistent_workers=workers,
            worker_init_fn=_init_worker,
            prefetch_factor=prefetch_factor if workers else None,
            # DataLoader draws each iterator's worker base seed from this generator; without one it would draw from
            # (and so advance) the global torch RNG that model init and dropout use. Items never use worker seeds.
            generator=torch.Generator().manual_seed(derive_seed(seed, _NOT_AN_INDEX, _NOT_AN_INDEX)),
        )

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next plain ``for A, B in loader`` runs (for resuming)."""
        self.next_epoch = int(epoch)

    def __len__(self) -> int:
        n = self.sampler.shard_len
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch: int | None = None, start: int = 0) -> Iterator[Batch]:
        """Full batches (with paths) of ``epoch`` (default ``self.next_epoch``, which is not advanced), from batch
        ``start`` on. One iteration at a time: starting another one abandons the previous."""
        epoch = self.next_epoch if epoch is None else int(epoch)
        if not 0 <= start <= len(self):
            raise ValueError(f"start batch {start} outside 0..{len(self)} (batches per epoch)")
        self.sampler.set_epoch(epoch, start * self.batch_size)
        self.dataset.set_epoch(epoch)
        on_host = self.device.type == "cpu"
        for batch in self._loader:
            if isinstance(batch, _Failure):
                self.close()  # before the error can land in a reference cycle (see close())
                raise batch.error()
            for path, problem in batch.bad:  # found in a worker: the worker already logged it
                self.dataset.record_bad(path, problem, warn=False)
            if not on_host:
                batch = batch._replace(A=batch.A.to(self.device, non_blocking=self.pin_memory),
                                       B=batch.B.to(self.device, non_blocking=self.pin_memory))
            yield batch

    def close(self) -> None:
        """Stop the worker processes now (a later iteration starts new ones). Call it (or use ``with``) when done.

        Without it, persistent workers stop when the DataLoader's iterator is freed. Freed by reference counting that is
        immediate, but a loader caught in a reference cycle (e.g. via a stored exception's traceback) is freed by the
        cyclic GC, which runs multiprocessing's queue finalizers *before* the iterator's ``__del__``: the workers never
        get their stop message and ``__del__`` blocks ~5 s per worker before killing them."""
        it = getattr(self._loader, "_iterator", None)
        self._loader._iterator = None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def make_loader(dataset: PairDataset, batch_size: int, num_workers: int, seed: int, drop_last: bool = False,
                pin_memory: bool | None = None, device: str | torch.device = "cpu", shuffle: bool = True,
                prefetch_factor: int = 2, shard_id: int = 0, num_shards: int = 1) -> PairLoader:
    """A ``PairLoader`` (see the module docstring for the batch and epoch contract). ``num_workers > 0`` uses that many
    persistent worker processes, each keeping ``prefetch_factor`` batches in flight; ``pin_memory=None`` pins host
    batches when ``device`` is CUDA and CUDA is available. ``shard_id`` / ``num_shards``: this rank's slice of every
    epoch for data-parallel training (pass the rank and the world size)."""
    return PairLoader(dataset, batch_size, num_workers, seed, drop_last=drop_last, pin_memory=pin_memory,
                      device=device, shuffle=shuffle, prefetch_factor=prefetch_factor, shard_id=shard_id,
                      num_shards=num_shards)
