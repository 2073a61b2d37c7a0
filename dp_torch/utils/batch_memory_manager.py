"""Virtual steps: split large logical batches into physical chunks (mirrors Opacus).

A Poisson logical batch is split into chunks of at most ``max_physical_batch_size``
examples. The optimizer is told to skip every chunk but the last
(``signal_skip_step(True)``), so each chunk is clipped and added to
``p.summed_grad``, and noise is added once, at the end of the logical batch; the
step hook (the accountant) fires once per logical batch with the logical sample
rate. An empty logical batch yields one empty chunk, so the step still happens.

Under data parallelism (``DPDDP`` or ``DistributedDataParallel`` with a distributed
DP optimizer) each rank splits *its own* share of the logical batch, so ranks whose
Poisson shares differ in size take different numbers of physical chunks. That is
safe without extra communication: skipped chunks communicate nothing, and the only
collective of a logical step is the distributed optimizer's all-reduce at the last
chunk, which every rank reaches exactly once per logical batch (an empty share
still yields one chunk). A rank with fewer chunks waits in that all-reduce; every
rank's accountant steps once. (``make_private`` refuses DDP settings that would run
a collective per physical chunk; see :func:`dp_torch.distributed.check_ddp`.)

FSDP is the exception: it gathers parameters in every forward and backward pass, so
every rank must take the same number of chunks. Its optimizer agrees on the count once
per logical batch (one all-reduce of an integer) and each rank splits its share into
that many balanced chunks, possibly empty ones.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Optional

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, Sampler

from dp_torch.data_loader import loader_settings

from dp_torch.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)

__all__ = ["BatchMemoryManager", "BatchSplittingSampler", "LogicalBatchSplitter", "wrap_data_loader"]


def _check_max_batch_size(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _check_optimizer(optimizer: Any) -> None:
    if not callable(getattr(optimizer, "signal_skip_step", None)):
        raise TypeError(
            f"optimizer must be a dp_torch DPOptimizer (with signal_skip_step), got "
            f"{type(optimizer).__name__}."
        )


class BatchSplittingSampler(Sampler[list[int]]):
    """Batch sampler that splits each batch of ``sampler`` into chunks of ``<= max_batch_size``.

    Chunks are balanced (``np.array_split`` into ``ceil(n / max_batch_size)``
    parts) and keep the batch's order; their union is the logical batch. Before
    yielding a chunk it queues ``optimizer.signal_skip_step(True)`` for every
    chunk but the last and ``False`` for the last (the queue is consumed one
    signal per ``optimizer.step()``, so prefetching loaders stay in sync). An
    empty batch yields one empty chunk with ``False``. An optimizer whose ranks must take
    the same number of physical steps (FSDP, which communicates in every forward and
    backward pass) provides ``agree_on_chunks(count) -> int``, the largest count over the
    ranks; a rank's batch is then split into that many chunks, some possibly empty.

    Args:
        sampler: The logical batch sampler (yields index lists).
        max_batch_size: Largest physical chunk.
        optimizer: The DP optimizer to notify.
    """

    def __init__(self, *, sampler: Sampler[list[int]], max_batch_size: int, optimizer: Any) -> None:
        self.max_batch_size = _check_max_batch_size(max_batch_size, "max_batch_size")
        _check_optimizer(optimizer)
        self.sampler = sampler
        self.optimizer = optimizer

    def __iter__(self) -> Iterator[list[int]]:
        agree = getattr(self.optimizer, "agree_on_chunks", None)
        for batch in self.sampler:
            indices = np.asarray(batch, dtype=np.int64).reshape(-1)
            count = math.ceil(indices.size / self.max_batch_size)
            if agree is not None:
                count = agree(max(count, 1))
            if count == 0:
                self.optimizer.signal_skip_step(do_skip=False)
                yield []
                continue
            chunks = np.array_split(indices, count)
            for chunk in chunks[:-1]:
                self.optimizer.signal_skip_step(do_skip=True)
                yield chunk.tolist()
            self.optimizer.signal_skip_step(do_skip=False)
            yield chunks[-1].tolist()

    def __len__(self) -> int:
        """Expected number of chunks per epoch (at least one per logical batch)."""
        if isinstance(self.sampler, BatchSampler):
            expected = self.sampler.batch_size
        elif isinstance(
            self.sampler, (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)
        ):
            expected = self.sampler.sample_rate * self.sampler.num_samples
        else:
            return len(self.sampler)  # type: ignore[arg-type]
        logical = len(self.sampler)
        return max(logical, math.ceil(logical * expected / self.max_batch_size))


class LogicalBatchSplitter(Sampler[list[int]]):
    """Yield each logical (Poisson) batch of ``batch_sampler`` as exactly ``parts`` slices.

    The slices are consecutive and balanced (``np.array_split``: sizes differ by at most
    one, some are empty when the batch has fewer than ``parts`` rows), so a training loop
    that accumulates ``parts`` micro-batches per optimizer step (the ``Trainer``'s
    ``gradient_accumulation_steps``, Lightning's ``accumulate_grad_batches``) sees one
    logical batch per step. The split depends only on the batch's size: post-processing.
    Unlike :class:`BatchSplittingSampler` it signals nothing to the optimizer: the loop's
    own accumulation decides when the step is taken.

    Attributes:
        batch_sampler: The logical batch sampler (e.g. ``UniformWithReplacementSampler``).
        parts: Micro-batches per logical batch.
    """

    def __init__(self, batch_sampler: Sampler[list[int]], parts: int) -> None:
        """Wrap ``batch_sampler``.

        Args:
            batch_sampler: Yields one index list per logical batch.
            parts: Micro-batches per logical batch, ``>= 1``.

        Raises:
            ValueError: If ``parts`` is not an int ``>= 1``.
        """
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise ValueError(f"parts must be an int >= 1, got {parts!r}.")
        self.batch_sampler = batch_sampler
        self.parts = parts

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            for part in np.array_split(np.asarray(batch, dtype=np.int64).reshape(-1), self.parts):
                yield part.tolist()

    def __len__(self) -> int:
        return len(self.batch_sampler) * self.parts  # type: ignore[arg-type]


def wrap_data_loader(*, data_loader: DataLoader, max_batch_size: int, optimizer: Any) -> DataLoader:
    """A ``DataLoader`` like ``data_loader``, its batches split by :class:`BatchSplittingSampler`.

    Args:
        data_loader: The loader of logical batches (usually a ``DPDataLoader``).
        max_batch_size: Largest physical chunk.
        optimizer: The DP optimizer to notify.

    Returns:
        The new loader (same dataset, collate function, workers and other settings).
    """
    if data_loader.batch_sampler is None:
        raise ValueError("data_loader has no batch_sampler (batch_size=None); nothing to split.")
    return DataLoader(
        dataset=data_loader.dataset,
        batch_sampler=BatchSplittingSampler(
            sampler=data_loader.batch_sampler, max_batch_size=max_batch_size, optimizer=optimizer
        ),
        generator=data_loader.generator,
        **loader_settings(data_loader),
    )


class BatchMemoryManager:
    """Context manager that caps the physical batch size without changing the DP step.

    Inside the ``with`` block, iterate over the returned loader and train as
    usual (``loss.backward(); optimizer.step(); optimizer.zero_grad()``). Each
    logical (Poisson) batch arrives as chunks of at most
    ``max_physical_batch_size``; ``step()`` on all but the last chunk only clips
    and accumulates, and ``zero_grad()`` then keeps ``p.summed_grad``. The last
    chunk adds noise once, updates the parameters and fires the step hook once,
    so the result and the accounting equal those of one step on the whole
    logical batch.

    On exit, skip signals still queued (from a loop left early) are discarded.

    Example:
        >>> with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=64,
        ...                         optimizer=optimizer) as loader:
        ...     for x, y in loader:
        ...         criterion(model(x), y).backward()
        ...         optimizer.step()
        ...         optimizer.zero_grad()

    Args:
        data_loader: Loader of logical batches.
        max_physical_batch_size: Largest chunk that fits in memory.
        optimizer: The DP optimizer used in the loop.
    """

    def __init__(
        self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: Any
    ) -> None:
        self.max_physical_batch_size = _check_max_batch_size(
            max_physical_batch_size, "max_physical_batch_size"
        )
        _check_optimizer(optimizer)
        self.data_loader = data_loader
        self.optimizer = optimizer

    def __enter__(self) -> DataLoader:
        return wrap_data_loader(
            data_loader=self.data_loader,
            max_batch_size=self.max_physical_batch_size,
            optimizer=self.optimizer,
        )

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        queue = getattr(self.optimizer, "_step_skip_queue", None)
        if isinstance(queue, list):
            queue.clear()
