"""``DPDataLoader``: a DataLoader with Poisson sampling and empty-batch support.

Mirrors ``opacus.data_loader``. Poisson sampling makes batch sizes random
(``Binomial(N, q)``) and sometimes zero; an empty batch is still a DP-SGD step,
so the loader must produce it with the right structure: every tensor of the
batch gets shape ``[0, *example_shape]`` and the dtype a real batch would have,
for tuples, lists, dicts and namedtuples alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from numbers import Number
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    default_collate,
)

from dp_torch.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)

__all__ = [
    "CollateFnWithEmpty",
    "DPDataLoader",
    "dtype_safe",
    "loader_settings",
    "shape_safe",
    "switch_generator",
    "wrap_collate_with_empty",
]

logger = logging.getLogger(__name__)

CollateFn = Callable[[list[Any]], Any]


class _Missing:
    """Picklable marker for "no example given" (survives the trip to worker processes)."""

    def __reduce__(self) -> str:
        return "_NO_EXAMPLE"

    def __repr__(self) -> str:
        return "<no example>"


_NO_EXAMPLE = _Missing()
_LEAF_SCALARS = (str, bytes, Number, type(None))


def shape_safe(x: Any) -> tuple:
    """``x.shape`` as a tuple, or ``()`` when ``x`` has no shape."""
    return tuple(getattr(x, "shape", ()))


def dtype_safe(x: Any) -> Union[torch.dtype, type]:
    """``x.dtype``, or ``type(x)`` when ``x`` has no dtype."""
    return getattr(x, "dtype", type(x))


class CollateFnWithEmpty:
    """Collate function wrapper that turns an empty index list into an empty batch.

    For a non-empty batch it calls the wrapped collate function unchanged. For an
    empty one it returns the structure a real batch has, with zero rows: every
    tensor (or numpy array) gets its batch axis set to 0, containers keep their
    type, and a per-example list of non-tensor values (e.g. strings) becomes
    empty. The structure comes from, in order: ``example`` (one data set item,
    collated alone; ``DPDataLoader`` passes ``dataset[0]``), else the first
    non-empty batch seen, else ``sample_empty_shapes``/``dtypes`` (a list of
    tensors), else ``[]``. Only the structure is kept, never data.

    Args:
        collator_fn: The collate function (``None``: batches are returned as lists).
        batch_first: Batch axis is 0; if ``False`` it is 1 for tensors with at
            least two dimensions (0 for vectors).
        rand_on_empty: Return one row of random 0/1 values instead of zero rows
            (data-independent, so still private, but it adds a fake example).
        sample_empty_shapes: Opacus' fallback shapes (``(0, *shape)`` per field).
        dtypes: Opacus' fallback dtypes, one per field.
        example: One data set item used to learn the batch structure.
    """

    def __init__(
        self,
        collator_fn: Optional[CollateFn],
        batch_first: bool = True,
        rand_on_empty: bool = False,
        sample_empty_shapes: Optional[Sequence[tuple]] = None,
        dtypes: Optional[Sequence[Union[torch.dtype, type]]] = None,
        example: Any = _NO_EXAMPLE,
    ) -> None:
        if collator_fn is not None and not callable(collator_fn):
            raise TypeError(f"collate_fn must be callable or None, got {collator_fn!r}.")
        self.wrapped_collator_fn = collator_fn
        self.batch_first = batch_first
        self.rand_on_empty = rand_on_empty
        self.sample_empty_shapes = sample_empty_shapes
        self.dtypes = dtypes
        self._has_example = not isinstance(example, _Missing)
        self._example = example if self._has_example else None
        self._has_template = False
        self._template: Any = None

    def _collate(self, batch: list[Any]) -> Any:
        return batch if self.wrapped_collator_fn is None else self.wrapped_collator_fn(batch)

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) > 0:
            output = self._collate(batch)
            if not self._has_template and not self._has_example:
                self._set_template(output)
            return output
        if not self._has_template and self._has_example:
            self._set_template(self._collate([self._example]))
        if self._has_template:
            return self._fresh(self._template)
        if self.sample_empty_shapes is not None and self.dtypes is not None:
            logger.warning("First batch is empty; returning zero-row fallback tensors.")
            return [torch.zeros(s, dtype=d) for s, d in zip(self.sample_empty_shapes, self.dtypes)]
        logger.warning("First batch is empty and its structure is unknown; returning [].")
        return []

    def _set_template(self, collated: Any) -> None:
        self._template = self._make_empty(collated)
        self._has_template = True

    def _batch_axis(self, ndim: int) -> int:
        return 0 if self.batch_first or ndim < 2 else 1

    def _empty_tensor(self, sample: torch.Tensor) -> torch.Tensor:
        if sample.dim() == 0:
            raise TypeError(
                "collate_fn returned a 0-d tensor, which has no batch axis; an empty batch "
                "cannot be formed from it. Return batched tensors."
            )
        shape = list(sample.shape)
        shape[self._batch_axis(len(shape))] = 1 if self.rand_on_empty else 0
        if self.rand_on_empty:
            return torch.randint(0, 2, shape, dtype=sample.dtype, device=sample.device)
        return torch.empty(shape, dtype=sample.dtype, device=sample.device)

    def _make_empty(self, sample: Any) -> Any:
        """Zero-row copy of the structure of a collated batch."""
        if torch.is_tensor(sample):
            return self._empty_tensor(sample)
        if isinstance(sample, np.ndarray):
            return self._empty_tensor(torch.from_numpy(sample)).numpy()
        if isinstance(sample, Mapping):
            items = {k: self._make_empty(v) for k, v in sample.items()}
            try:
                return type(sample)(items)
            except TypeError:
                return items
        if _is_namedtuple(sample):
            return type(sample)(*[self._make_empty(v) for v in sample])
        if isinstance(sample, (list, tuple)):
            if sample and all(isinstance(v, _LEAF_SCALARS) for v in sample):
                return type(sample)()  # a per-example list of plain values (e.g. strings)
            return type(sample)([self._make_empty(v) for v in sample])
        raise TypeError(
            f"Unsupported batch type: {type(sample).__name__}. An empty batch can be built only "
            "from tensors, numpy arrays, dicts, lists and tuples (of those); returning anything "
            "else for an empty batch could leak data. Make collate_fn return those types."
        )

    def _fresh(self, template: Any) -> Any:
        """A new container tree around the (immutable, zero-row) template leaves."""
        if self.rand_on_empty:
            return self._make_empty(template)
        if isinstance(template, Mapping):
            items = {k: self._fresh(v) for k, v in template.items()}
            try:
                return type(template)(items)
            except TypeError:
                return items
        if isinstance(template, (list, tuple)):
            converted = [self._fresh(v) for v in template]
            if _is_namedtuple(template):
                return type(template)(*converted)
            return type(template)(converted)
        return template.clone() if torch.is_tensor(template) else template


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def wrap_collate_with_empty(
    *,
    collate_fn: Optional[CollateFn],
    batch_first: bool = True,
    rand_on_empty: bool = False,
    sample_empty_shapes: Optional[Sequence[tuple]] = None,
    dtypes: Optional[Sequence[Union[torch.dtype, type]]] = None,
    example: Any = _NO_EXAMPLE,
) -> CollateFnWithEmpty:
    """Wrap ``collate_fn`` so that an empty index list gives a correctly shaped empty batch.

    Args:
        collate_fn: The collate function to wrap (``None``: lists are returned).
        batch_first: See :class:`CollateFnWithEmpty`.
        rand_on_empty: See :class:`CollateFnWithEmpty`.
        sample_empty_shapes: Fallback shapes (Opacus compatibility).
        dtypes: Fallback dtypes (Opacus compatibility).
        example: One data set item from which the batch structure is learnt.

    Returns:
        The wrapper (picklable if ``collate_fn`` and ``example`` are, so it works
        with worker processes).
    """
    return CollateFnWithEmpty(
        collate_fn,
        batch_first=batch_first,
        rand_on_empty=rand_on_empty,
        sample_empty_shapes=sample_empty_shapes,
        dtypes=dtypes,
        example=example,
    )


_CONFLICTING = ("batch_size", "shuffle", "sampler", "batch_sampler")


class DPDataLoader(DataLoader):
    """A ``DataLoader`` that always samples batches by Poisson sampling.

    Every example joins every batch independently with probability
    ``sample_rate``; batch sizes are ``Binomial(len(dataset), sample_rate)``,
    there are ``round(1 / sample_rate)`` batches per epoch, and an empty batch is
    produced as zero-row tensors with the structure and dtypes of a real batch
    (see :class:`CollateFnWithEmpty`). Usually built with
    :meth:`from_data_loader`.

    Randomness: ``secure_mode=True`` uses OS entropy; ``seed`` gives dpcore's
    reproducible plan (identical to the JAX backend's); a ``torch.Generator``
    is turned into such a seed (and also seeds worker processes, as in torch);
    with neither, the seed is drawn from torch's default generator when the
    loader is built, so ``torch.manual_seed`` makes the batches repeat (Opacus'
    reproducibility contract).

    Attributes:
        sample_rate: Poisson inclusion probability ``q``.
        distributed: Whether the sampler is sharded across ranks.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        collate_fn: Optional[CollateFn] = None,
        drop_last: bool = False,
        generator: Optional[torch.Generator] = None,
        distributed: bool = False,
        batch_first: bool = True,
        rand_on_empty: bool = False,
        seed: Optional[int] = None,
        secure_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create the loader.

        Args:
            dataset: A map-style dataset (``__len__`` and ``__getitem__``).
            sample_rate: ``q`` with ``0 < q <= 1``.
            collate_fn: Collate function (default ``default_collate``).
            drop_last: Ignored (meaningless for Poisson batches; a log message says so).
            generator: Optional ``torch.Generator`` (see the class docstring).
            distributed: Shard with :class:`DistributedUniformWithReplacementSampler`.
            batch_first: See :class:`CollateFnWithEmpty`.
            rand_on_empty: See :class:`CollateFnWithEmpty`.
            seed: Optional dpcore sampling seed (exclusive with ``generator``).
            secure_mode: Sample from OS entropy; refuses ``seed`` and ``generator``.
            **kwargs: Other ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...).

        Raises:
            ValueError: For an ``IterableDataset``, an empty dataset, an invalid
                ``sample_rate``, or a ``DataLoader`` argument that conflicts with
                Poisson sampling (``batch_size``, ``shuffle``, ``sampler``,
                ``batch_sampler``).
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError("Poisson sampling is not supported for an IterableDataset; "
                             "use a map-style dataset.")
        conflicting = sorted(k for k in _CONFLICTING if k in kwargs)
        if conflicting:
            raise ValueError(
                f"DPDataLoader chooses batches by Poisson sampling; remove {conflicting} "
                "(the batch size follows from sample_rate)."
            )
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool, got {distributed!r}.")
        num_samples = len(dataset)  # type: ignore[arg-type]
        if distributed:
            batch_sampler: Sampler = DistributedUniformWithReplacementSampler(
                total_size=num_samples, sample_rate=sample_rate, generator=generator,
                seed=seed, secure_mode=secure_mode,
            )
        else:
            batch_sampler = UniformWithReplacementSampler(
                num_samples=num_samples, sample_rate=sample_rate, generator=generator,
                seed=seed, secure_mode=secure_mode,
            )
        if drop_last:
            logger.warning("Ignoring drop_last=True: it does not apply to Poisson batches.")
        if isinstance(collate_fn, CollateFnWithEmpty):
            collate_fn = collate_fn.wrapped_collator_fn
        self.sample_rate = batch_sampler.sample_rate
        self.distributed = distributed
        super().__init__(
            dataset=dataset,
            batch_sampler=batch_sampler,
            collate_fn=wrap_collate_with_empty(
                collate_fn=default_collate if collate_fn is None else collate_fn,
                batch_first=batch_first,
                rand_on_empty=rand_on_empty,
                example=dataset[0],
            ),
            generator=generator,
            **kwargs,
        )

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        distributed: bool = False,
        generator: Optional[torch.Generator] = None,
        batch_first: bool = True,
        rand_on_empty: bool = False,
        seed: Optional[int] = None,
        secure_mode: bool = False,
    ) -> DPDataLoader:
        """A ``DPDataLoader`` with ``data_loader``'s settings and rate ``1 / len(data_loader)``.

        Keeps ``num_workers``, ``collate_fn``, ``pin_memory``, ``timeout``,
        ``worker_init_fn``, ``multiprocessing_context``, ``prefetch_factor``,
        ``persistent_workers``, ``pin_memory_device`` and ``in_order``; the
        expected batch size stays the original batch size.

        Args:
            data_loader: A ``DataLoader`` over a map-style dataset.
            distributed: Shard across ranks.
            generator: Source of randomness; defaults to ``data_loader.generator``
                (except in secure mode).
            batch_first: See :class:`CollateFnWithEmpty`.
            rand_on_empty: See :class:`CollateFnWithEmpty`.
            seed: Optional dpcore sampling seed (exclusive with ``generator``).
            secure_mode: Sample from OS entropy.

        Returns:
            The new loader (``data_loader`` is not modified).
        """
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a DataLoader, got {type(data_loader).__name__}.")
        if isinstance(data_loader.dataset, IterableDataset):
            raise ValueError("Uniform sampling is not supported for IterableDataset")
        if generator is None and seed is None and not secure_mode:
            generator = data_loader.generator
        return cls(
            dataset=data_loader.dataset, sample_rate=1 / len(data_loader), generator=generator,
            distributed=distributed, batch_first=batch_first, rand_on_empty=rand_on_empty,
            seed=seed, secure_mode=secure_mode, **loader_settings(data_loader),
        )


def loader_settings(data_loader: DataLoader) -> dict[str, Any]:
    """The settings of ``data_loader`` that a loader rebuilt from it keeps.

    Workers, collate function, memory pinning, timeout and the optional settings of newer
    torch releases; not the dataset, sampler or generator, which the caller chooses.

    Args:
        data_loader: The loader to copy settings from.
    """
    settings = {
        name: getattr(data_loader, name)
        for name in ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                     "multiprocessing_context", "prefetch_factor", "persistent_workers")
    }
    settings.update(
        (name, getattr(data_loader, name)) for name in ("pin_memory_device", "in_order") if hasattr(data_loader, name)
    )
    return settings


def _is_supported_batch_sampler(sampler: Any) -> bool:
    return isinstance(
        sampler,
        (BatchSampler, UniformWithReplacementSampler, DistributedUniformWithReplacementSampler),
    )


def switch_generator(
    *, data_loader: DataLoader, generator: Optional[torch.Generator]
) -> DataLoader:
    """A ``DataLoader`` like ``data_loader`` whose sampling randomness comes from ``generator``.

    The batch sampler is shared with ``data_loader`` and changed in place (as in
    Opacus): a ``BatchSampler``'s inner sampler gets the generator; a Poisson
    sampler is re-seeded from it (a fresh stream).

    Args:
        data_loader: A loader whose batch sampler is a ``BatchSampler`` or one of
            the Poisson samplers.
        generator: The new ``torch.Generator`` (or ``None``).

    Returns:
        The new ``DataLoader``.

    Raises:
        ValueError: If the loader has no supported batch sampler, or the inner
            sampler has no ``generator`` attribute.
    """
    batch_sampler = data_loader.batch_sampler
    if batch_sampler is None or not _is_supported_batch_sampler(batch_sampler):
        raise ValueError(
            "Non-batch processing is not supported: the data loader needs a BatchSampler or a "
            f"Poisson batch sampler, got {type(batch_sampler).__name__}."
        )
    if isinstance(batch_sampler, BatchSampler):
        if not hasattr(batch_sampler.sampler, "generator"):
            raise ValueError("Target sampler doesn't have generator attribute: nothing to switch")
        batch_sampler.sampler.generator = generator
    else:
        batch_sampler.generator = generator
    return DataLoader(
        dataset=data_loader.dataset, batch_sampler=batch_sampler, generator=generator,
        **loader_settings(data_loader),
    )
