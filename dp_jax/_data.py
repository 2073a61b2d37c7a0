"""Poisson batches with fixed shapes for ``jax.jit``.

DP-SGD's privacy analysis assumes Poisson sampling: every example joins every
logical batch independently with probability ``q``, so the batch size is
``Binomial(N, q)`` and varies from step to step. ``jax.jit`` compiles one
program per input shape, so each logical batch is padded to one of a few
*bucket* sizes (:func:`dpcore.sampling.bucket_sizes`) and carries a boolean
mask; a batch larger than the largest bucket is split into several physical
chunks (never truncated) and an empty batch becomes one all-masked chunk,
which is still a real step (noise is added, the accountant steps).

The indices come from :class:`dpcore.sampling.PoissonSampler`, so the same seed
gives the same batches here as in ``dpcore`` and in ``dp_torch``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from dp_jax._types import PyTree
from dpcore.checks import check_int
from dpcore import sampling as core_sampling

__all__ = [
    "PhysicalChunk",
    "PoissonBatches",
    "ShuffledBatches",
    "count_examples",
    "poisson_batches",
]

_STATE_VERSION = 1


class PhysicalChunk(NamedTuple):
    """One fixed-shape piece of a logical batch.

    Attributes:
        batch: The examples, a pytree of arrays whose leading axis is the bucket size.
            Padded rows repeat a valid example (index 0) so every row is finite.
        mask: Boolean numpy array of shape ``(bucket_size,)``; ``False`` on padded rows,
            which must contribute exactly zero to the gradient.
    """

    batch: PyTree
    mask: np.ndarray


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def _array_pytree_size(data: PyTree) -> int | None:
    """``N`` if ``data`` is an array or a non-list pytree of arrays sharing axis 0, else None."""
    if isinstance(data, list):
        return None
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves or not all(_is_array(leaf) for leaf in leaves):
        return None
    if any(leaf.ndim == 0 for leaf in leaves):
        raise ValueError(
            "data is a pytree of arrays but some leaf is a scalar (0-d); every leaf needs the "
            "examples on its leading axis, shape (N, ...)."
        )
    sizes = {int(leaf.shape[0]) for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"data's arrays disagree on the number of examples (leading axis sizes {sorted(sizes)}); "
            "every leaf must have shape (N, ...) with the same N."
        )
    return sizes.pop()


def _dataset_size(data: PyTree) -> int:
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(
            f"data must be an array, a pytree (dict/tuple) of arrays with a shared leading axis, "
            f"or an indexable dataset with __len__ and __getitem__; got {type(data).__name__}."
        )
    return len(data)


def count_examples(data: PyTree) -> int:
    """The number of examples ``N`` in ``data`` (arrays or an indexable dataset).

    Args:
        data: As :class:`PoissonBatches` takes it.

    Returns:
        ``N``.

    Raises:
        TypeError: If ``data`` is neither arrays nor an indexable dataset.
        ValueError: If ``data`` is empty, its arrays disagree on ``N`` or a leaf is a scalar.
    """
    size = _array_pytree_size(data)
    num_samples = size if size is not None else _dataset_size(data)
    if num_samples < 1:
        raise ValueError("data is empty; Poisson sampling needs at least one example.")
    return num_samples


def _stack_examples(examples: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *examples)


def _check_bucket_cap(buckets: tuple[int, ...], max_physical_batch_size: int | None) -> None:
    if max_physical_batch_size is not None and buckets[-1] > max_physical_batch_size:
        raise ValueError(
            f"buckets={list(buckets)} has a bucket larger than max_physical_batch_size="
            f"{max_physical_batch_size}; drop the larger buckets or raise the limit."
        )


def _seed_from_key(key: Any) -> int:
    """A non-negative 63-bit integer seed drawn from a JAX PRNG key."""
    bits = np.asarray(jax.random.bits(key, (2,), dtype=np.uint32), dtype=np.uint64)
    return int(((bits[0] << np.uint64(31)) ^ bits[1]) & np.uint64((1 << 63) - 1))


class _ChunkedBatches:
    """Logical batches of indices from a sampler, gathered and padded into fixed-shape chunks.

    Subclasses set ``sampler`` (iterable of index arrays, with ``len`` and
    ``state_dict``/``load_state_dict``), ``sample_rate``, ``buckets``,
    ``secure_mode`` and ``max_physical_batch_size``.

    Args:
        data: As :class:`PoissonBatches`.
    """

    sampler: Any
    sample_rate: float
    buckets: tuple[int, ...]
    secure_mode: bool
    max_physical_batch_size: int | None

    def __init__(self, data: PyTree) -> None:
        self.num_samples = count_examples(data)
        self._is_arrays = _array_pytree_size(data) is not None
        self.data = data

    def __len__(self) -> int:
        return len(self.sampler)

    def gather(self, indices: np.ndarray) -> Any:
        """The examples at ``indices`` as one pytree with leading axis ``len(indices)``.

        Args:
            indices: 1-D integer array of example indices.

        Returns:
            The stacked examples.
        """
        if self._is_arrays:
            return jax.tree_util.tree_map(lambda leaf: leaf[indices], self.data)
        return _stack_examples([self.data[int(i)] for i in indices])

    def chunks(self, indices: np.ndarray) -> list[PhysicalChunk]:
        """Pad (and if needed split) one logical batch of indices into fixed-shape chunks.

        Args:
            indices: The example indices of one logical batch.

        Returns:
            One or more :class:`PhysicalChunk`; an empty batch gives one all-masked chunk.
        """
        return [
            PhysicalChunk(self.gather(padded), mask)
            for padded, mask in core_sampling.pad_to_buckets(indices, self.buckets)
        ]

    def __iter__(self) -> Iterator[list[PhysicalChunk]]:
        for indices in self.sampler:
            yield self.chunks(indices)

    def state_dict(self) -> dict[str, Any]:
        """The position of the index stream (JSON-serialisable).

        Returns:
            ``{"version", "buckets", "sampler"}``.
        """
        return {
            "version": _STATE_VERSION,
            "buckets": list(self.buckets),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; validated before anything changes.

        Args:
            state_dict: A dict from :meth:`state_dict` of identically configured batches.

        Raises:
            ValueError: If malformed or made with other buckets or sampler settings.
        """
        if not isinstance(state_dict, Mapping) or not {"buckets", "sampler"} <= set(state_dict):
            raise ValueError(
                "state_dict must be a dict from PoissonBatches.state_dict() with keys 'buckets' "
                f"and 'sampler'; got {state_dict!r}."
            )
        saved = [int(b) for b in state_dict["buckets"]]
        if saved != list(self.buckets):
            raise ValueError(
                f"state_dict was made with buckets={saved}, these batches use "
                f"{list(self.buckets)}; construct them with the same buckets / "
                "max_physical_batch_size."
            )
        self.sampler.load_state_dict(state_dict["sampler"])



class PoissonBatches(_ChunkedBatches):
    """An iterator over Poisson logical batches, each a list of fixed-shape chunks.

    Iterating yields ``len(self)`` logical batches (one epoch of
    ``round(1 / sample_rate)`` steps unless ``steps`` is given); each is a list of
    one or more :class:`PhysicalChunk` ``(batch, mask)`` pairs. The concatenation of
    the chunks' unmasked rows is exactly the Poisson batch that
    :class:`dpcore.sampling.PoissonSampler` draws for the same ``seed``. A new
    ``for`` loop continues the random stream (epochs differ); an epoch left
    unfinished is resumed.

    Args:
        data: Either an array or a (non-list) pytree of arrays whose leaves share the
            leading axis ``N`` (numpy or JAX; gathered with fancy indexing), or any
            indexable dataset (``__len__`` and ``__getitem__`` returning a pytree per
            example; a Python list counts as a dataset), whose examples are stacked
            with numpy.
        sample_rate: Poisson inclusion probability ``q`` in ``(0, 1]``.
        steps: Logical batches per epoch (default ``round(1 / q)``).
        seed: Non-negative integer seed of the index stream (reproducible, not secure).
        key: A JAX PRNG key to derive the seed from instead of ``seed``.
        secure_mode: Draw the indices from OS entropy (refuses ``seed`` and ``key``).
        max_physical_batch_size: Largest chunk; bigger batches are split.
        buckets: Explicit strictly increasing bucket sizes; default
            ``dpcore.sampling.bucket_sizes(int(N * q), max_physical_batch_size=...)``.

    Attributes:
        num_samples: ``N``.
        sample_rate: ``q``.
        buckets: The bucket sizes (the only leading-axis sizes a chunk can have).
        sampler: The underlying :class:`dpcore.sampling.PoissonSampler`.

    Raises:
        TypeError: If ``data`` is neither arrays nor an indexable dataset.
        ValueError: On an invalid value, a ``seed``/``key`` in secure mode, or both of
            ``seed`` and ``key``.
    """

    def __init__(
        self,
        data: PyTree,
        sample_rate: float,
        *,
        steps: int | None = None,
        seed: int | None = None,
        key: Any = None,
        secure_mode: bool = False,
        max_physical_batch_size: int | None = None,
        buckets: Sequence[int] | None = None,
    ) -> None:
        if seed is not None and key is not None:
            raise ValueError(
                f"poisson_batches got both seed={seed!r} and key={key!r}; pass only one of them."
            )
        if secure_mode is True and key is not None:
            raise ValueError(
                "key was given with secure_mode=True; secure sampling draws from OS entropy and "
                "cannot be seeded. Pass key=None and seed=None."
            )
        super().__init__(data)
        if key is not None:
            seed = _seed_from_key(key)
        sampler = core_sampling.PoissonSampler(
            self.num_samples, sample_rate, steps=steps, seed=seed, secure_mode=secure_mode
        )
        if max_physical_batch_size is not None:
            check_int(max_physical_batch_size, "max_physical_batch_size", 1)
        if buckets is None:
            m = max(1, int(self.num_samples * sampler.sample_rate))
            sizes = core_sampling.bucket_sizes(m, max_physical_batch_size=max_physical_batch_size)
        else:
            sizes = core_sampling.check_buckets(buckets)
            _check_bucket_cap(sizes, max_physical_batch_size)
        self.sampler = sampler
        self.sample_rate = sampler.sample_rate
        self.secure_mode = secure_mode
        self.buckets: tuple[int, ...] = tuple(sizes)
        self.max_physical_batch_size = max_physical_batch_size


class ShuffledBatches(_ChunkedBatches):
    """Shuffled fixed-size batches in the same chunk format (NOT Poisson sampling).

    For non-private baselines and ``make_private(poisson_sampling=False)``: each
    epoch is a fresh permutation (:class:`dpcore.sampling.ShuffledBatchSampler`) cut
    into batches of ``batch_size`` (the last one smaller, padded and masked). The
    accountants assume Poisson sampling, so an epsilon reported for these batches
    is only an approximation.

    Args:
        data: As :class:`PoissonBatches`.
        batch_size: Examples per batch.
        seed: Seed of the permutations.
        max_physical_batch_size: Largest chunk; bigger batches are split.
    """

    def __init__(
        self,
        data: PyTree,
        batch_size: int,
        *,
        seed: int | None = None,
        max_physical_batch_size: int | None = None,
    ) -> None:
        super().__init__(data)
        self.sampler = core_sampling.ShuffledBatchSampler(self.num_samples, batch_size, seed=seed)
        top = batch_size
        if max_physical_batch_size is not None:
            top = min(batch_size, check_int(
                max_physical_batch_size, "max_physical_batch_size", 1))
        self.sample_rate = batch_size / self.num_samples
        self.secure_mode = False
        self.buckets = (top,)
        self.max_physical_batch_size = max_physical_batch_size


def poisson_batches(
    data: PyTree, sample_rate: float, *, steps: int | None = None, seed: int | None = None,
    key: Any = None, secure_mode: bool = False, max_physical_batch_size: int | None = None,
    buckets: Sequence[int] | None = None,
) -> PoissonBatches:
    """Build a :class:`PoissonBatches` iterator (see it for the arguments).

    Example:
        >>> batches = poisson_batches({"x": x, "y": y}, 0.01, seed=0)
        >>> for logical in batches:
        ...     for batch, mask in logical:
        ...         ...  # one jitted call per chunk; noise once per logical batch

    Returns:
        The iterator.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise TypeError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}.")
    return PoissonBatches(
        data, sample_rate, steps=steps, seed=seed, key=key, secure_mode=secure_mode,
        max_physical_batch_size=max_physical_batch_size, buckets=buckets,
    )
