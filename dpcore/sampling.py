"""Batch sampling plans for DP-SGD: Poisson, distributed Poisson, shuffled, bucketing.

The privacy analysis of DP-SGD (every accountant in :mod:`dpcore.accounting`)
assumes *Poisson sampling*: at each logical step every example of the data set
joins the batch independently with probability ``q = sample_rate``. The batch
size is therefore random (``Binomial(N, q)``), and a batch may be empty; an
empty batch is still a real step (noise is added and the accountant steps).

Reproducibility contract. A seeded sampler draws, for each step, ``N`` uniforms
with ``np.random.Generator(np.random.PCG64(seed)).random(N)`` and keeps the
examples whose uniform is ``< q``. ``Generator.random`` on PCG64 is specified
exactly (``(next_uint64 >> 11) * 2**-53``) and PCG64 is pure 128-bit integer
arithmetic, so the same seed gives the same batches on every platform and every
numpy >= 1.24, in PyTorch and in JAX alike.

Secure mode. ``secure_mode=True`` draws the uniforms from the operating
system's entropy pool (:func:`secrets.token_bytes`, i.e. ``os.urandom``),
53 random bits per uniform, vectorised; such a sampler refuses a seed.
"""

from __future__ import annotations

import copy
import math
import numbers
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dpcore.checks import check_choice, check_int, check_num_steps, check_pcg64_state, check_sample_rate

__all__ = [
    "DistributedPoissonSampler",
    "PoissonSampler",
    "ShuffledBatchSampler",
    "UniformWithReplacementSampler",
    "bucket_sizes",
    "check_buckets",
    "expected_batch_size",
    "pad_to_buckets",
    "poisson_batches",
    "shard_plan",
    "steps_for_epochs",
    "steps_per_epoch",
]

_TWO_POW_MINUS_53 = 1.0 / 9007199254740992.0  # 2**-53, exact in float64
_STATE_VERSION = 1


# --------------------------------------------------------------------------- checks


def _check_seed(seed: Any, secure_mode: Any) -> int | None:
    if not isinstance(secure_mode, bool):
        raise TypeError(f"secure_mode must be a bool, got {secure_mode!r}.")
    if seed is None:
        return None
    if secure_mode:
        raise ValueError(
            f"seed={seed!r} was given with secure_mode=True; a secure sampler draws from OS "
            f"entropy and cannot be seeded. Pass seed=None, or secure_mode=False for a "
            f"reproducible (not secure) plan."
        )
    return check_int(seed, "seed", 0)


# --------------------------------------------------------------------------- randomness


def _os_uniforms(n: int) -> np.ndarray:
    """``n`` uniforms on ``{k * 2**-53 : 0 <= k < 2**53}`` from OS entropy (float64)."""
    raw = np.frombuffer(secrets.token_bytes(8 * n), dtype="<u8")
    return (raw >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53


class _UniformStream:
    """A source of float64 uniforms: seeded PCG64, or OS entropy in secure mode."""

    def __init__(self, seed: int | None, secure_mode: bool) -> None:
        self.secure_mode = secure_mode
        self._rng = None if secure_mode else np.random.Generator(np.random.PCG64(seed))

    def uniforms(self, n: int) -> np.ndarray:
        if self._rng is None:
            return _os_uniforms(n)
        return self._rng.random(n)

    def get_state(self) -> dict[str, Any] | None:
        return None if self._rng is None else copy.deepcopy(self._rng.bit_generator.state)

    def set_state(self, state: dict[str, Any]) -> None:
        assert self._rng is not None
        self._rng.bit_generator.state = copy.deepcopy(state)



# --------------------------------------------------------------------------- helpers


def expected_batch_size(
    num_samples: int, sample_rate: float, loss_reduction: str = "mean"
) -> int | None:
    """Expected batch size ``int(num_samples * sample_rate)`` (docs/design.md, Semantics).

    This is the denominator of ``loss_reduction="mean"``; it is public (it does
    not depend on the realised batch, whose size would leak information).
    The product is truncated exactly as written, so both backends agree even where
    floating point rounds it just below an integer.

    Args:
        num_samples: Number of examples in the data set, ``>= 1``.
        sample_rate: Poisson sampling rate ``q`` with ``0 < q <= 1``.
        loss_reduction: ``"mean"`` (default) or ``"sum"``. ``"sum"`` never divides
            by the expected batch size, so there a product that truncates to 0
            gives ``None`` instead of an error.

    Returns:
        ``int(num_samples * sample_rate)``, at least 1; ``None`` only for
        ``loss_reduction="sum"`` when the product truncates to 0.

    Raises:
        ValueError: If the product truncates to 0 with ``loss_reduction="mean"``,
            or ``loss_reduction`` is neither ``"mean"`` nor ``"sum"``.
    """
    check_choice(loss_reduction, "loss_reduction", ("mean", "sum"))
    n = check_int(num_samples, "num_samples", 1)
    q = check_sample_rate(sample_rate)
    size = int(n * q)
    if size == 0 and loss_reduction == "sum":
        return None
    if size == 0:
        raise ValueError(
            f"expected batch size int(num_samples * sample_rate) = int({n} * {q!r}) is 0; "
            f"use a larger sample_rate (at least 1 / num_samples = {1.0 / n!r}) or "
            f'loss_reduction="sum", which does not divide by the expected batch size.'
        )
    return size


def steps_for_epochs(epochs: float, epoch_steps: int) -> int:
    """Number of steps in ``epochs`` epochs of ``epoch_steps`` steps each.

    ``epochs * epoch_steps`` rounded up, except that a product within a relative
    ``1e-9`` of an integer is that integer (``epochs=3 / 17`` of 85 steps is 15
    steps, not 16, although floating point gives ``15.000000000000002``); at
    least 1. Used to calibrate the noise for the number of steps a run takes.

    Args:
        epochs: Planned number of epochs, a finite number ``> 0`` (fractions allowed).
        epoch_steps: Steps per epoch, an integer ``>= 1`` (e.g. ``len(data_loader)``
            or :func:`steps_per_epoch`).

    Returns:
        The step count, ``>= 1``.

    Raises:
        TypeError: If ``epochs`` is not a real number or ``epoch_steps`` not an integer.
        ValueError: If ``epochs`` is not finite and ``> 0``, or ``epoch_steps < 1``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real):
        raise TypeError(f"epochs must be a number > 0, got {epochs!r}.")
    if not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}.")
    per_epoch = check_int(epoch_steps, "epoch_steps", 1)
    total = float(epochs) * per_epoch
    nearest = round(total)
    steps = nearest if abs(total - nearest) < 1e-9 * max(1.0, total) else math.ceil(total)
    return max(1, int(steps))


def steps_per_epoch(sample_rate: float) -> int:
    """Number of Poisson steps in one epoch: ``round(1 / sample_rate)``, at least 1.

    Python's ``round`` (ties to even) is used. Opacus' ``UniformWithReplacementSampler``
    uses ``int(1 / q)``; the two differ when ``1 / q`` has a fractional part above
    ``0.5`` (or exactly ``0.5`` with an odd integer part).

    Args:
        sample_rate: Poisson sampling rate ``q`` with ``0 < q <= 1``.

    Returns:
        The step count.
    """
    q = check_sample_rate(sample_rate)
    return max(1, round(1.0 / q))


# --------------------------------------------------------------------------- Poisson


class PoissonSampler:
    """Poisson batch plan: each example joins each batch independently with prob. ``q``.

    Iterating yields ``steps`` batches (one epoch), each a sorted ``int64`` numpy
    array of example indices, possibly empty. Successive iterations continue the
    random stream, so epochs differ. Each batch is drawn as
    ``np.flatnonzero(uniforms(num_samples) < sample_rate)`` where, for a seeded
    sampler, ``uniforms = np.random.Generator(np.random.PCG64(seed)).random``:
    bit-for-bit reproducible on every platform (see the module docstring).

    Checkpointing: :meth:`state_dict` captures the generator position and the
    number of batches already yielded in the current epoch; a sampler that loads
    it yields exactly the batches the original would have yielded next (the rest of
    the epoch, then new epochs). A new ``for`` loop over a sampler whose epoch was
    left unfinished resumes that epoch.

    Args:
        num_samples: Data set size ``N >= 1``.
        sample_rate: Inclusion probability ``q``, ``0 < q <= 1``.
        steps: Batches per epoch; defaults to :func:`steps_per_epoch` of ``q``.
        seed: Non-negative integer seed for a reproducible plan; ``None`` seeds
            from fresh entropy (not secure, but unpredictable).
        secure_mode: Draw from OS entropy (``os.urandom``) instead of PCG64;
            refuses a seed.

    Raises:
        ValueError: On an invalid argument, or a seed with ``secure_mode=True``.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        seed: int | None = None,
        secure_mode: bool = False,
    ) -> None:
        self.num_samples = check_int(num_samples, "num_samples", 1)
        self.sample_rate = check_sample_rate(sample_rate)
        self.steps = steps_per_epoch(self.sample_rate) if steps is None else check_num_steps(
            steps, "steps"
        )
        self.seed = _check_seed(seed, secure_mode)
        self.secure_mode = secure_mode
        self._stream = _UniformStream(self.seed, secure_mode)
        self._drawn = 0

    def __len__(self) -> int:
        return self.steps

    def _draw(self) -> np.ndarray:
        included = self._stream.uniforms(self.num_samples) < self.sample_rate
        return np.flatnonzero(included).astype(np.int64, copy=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._drawn >= self.steps:
            self._drawn = 0
        while self._drawn < self.steps:
            batch = self._draw()
            self._drawn += 1
            yield batch

    def _config(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the sampler's position as a JSON-serialisable dict.

        Returns:
            ``{"version", "config", "secure_mode", "bit_generator_state",
            "batches_drawn"}``; ``bit_generator_state`` is ``None`` in secure mode.
        """
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "secure_mode": self.secure_mode,
            "bit_generator_state": self._stream.get_state(),
            "batches_drawn": self._drawn,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; validates everything before changing state.

        Args:
            state_dict: A dict produced by :meth:`state_dict` of a sampler with the
                same configuration (and JSON round trips of it).

        Raises:
            ValueError: If the dict is malformed, was made by a sampler with another
                configuration, or mixes secure and seeded modes.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict from state_dict(), got {state_dict!r}.")
        missing = {"config", "secure_mode", "bit_generator_state", "batches_drawn"} - set(
            state_dict
        )
        if missing:
            raise ValueError(f"state_dict is missing keys {sorted(missing)}; pass state_dict().")
        if dict(state_dict["config"]) != self._config():
            raise ValueError(
                f"state_dict was made by a sampler with config {dict(state_dict['config'])}, "
                f"this sampler has {self._config()}; construct the sampler with the same "
                f"arguments before loading."
            )
        if state_dict["secure_mode"] != self.secure_mode:
            raise ValueError(
                f"state_dict has secure_mode={state_dict['secure_mode']!r} but this sampler has "
                f"secure_mode={self.secure_mode!r}; a secure sampler cannot take a seeded "
                f"stream (it would become predictable) and vice versa."
            )
        drawn = check_int(state_dict["batches_drawn"], "state_dict['batches_drawn']", 0)
        if drawn > self.steps:
            raise ValueError(
                f"state_dict['batches_drawn']={drawn} exceeds steps={self.steps}."
            )
        bit_state = None
        if not self.secure_mode:
            bit_state = check_pcg64_state(state_dict["bit_generator_state"])
        if bit_state is not None:
            self._stream.set_state(bit_state)
        self._drawn = drawn


class UniformWithReplacementSampler(PoissonSampler):
    """Opacus' name for :class:`PoissonSampler`; identical semantics.

    In Opacus, "uniform with replacement" means every batch is an independent
    Poisson draw (each example included with probability ``sample_rate``), which
    is exactly :class:`PoissonSampler`. One difference from Opacus: the default
    ``steps`` is ``round(1 / q)`` (docs/design.md, Semantics), not ``int(1 / q)``.
    Batches are numpy ``int64`` arrays; a PyTorch ``DataLoader`` accepts them as
    index lists.
    """


def poisson_batches(
    num_samples: int, sample_rate: float, steps: int, seed: int | None
) -> list[np.ndarray]:
    """Functional form: the first ``steps`` batches of ``PoissonSampler(..., seed=seed)``.

    Args:
        num_samples: Data set size ``N >= 1``.
        sample_rate: Inclusion probability ``q``.
        steps: Number of batches to draw.
        seed: Seed of the plan (``None``: fresh entropy, not reproducible).

    Returns:
        A list of ``steps`` sorted ``int64`` index arrays.
    """
    sampler = PoissonSampler(num_samples, sample_rate, steps=steps, seed=seed)
    return list(sampler)


class DistributedPoissonSampler(PoissonSampler):
    """Poisson sampling with the data set sharded across ``world_size`` ranks.

    Rank ``r`` owns indices ``r, r + world_size, r + 2 * world_size, ...`` (no
    padding: Poisson batches have no fixed size) and includes each of them with the
    *global* rate ``q``, so the union of all ranks' batches of a step is one Poisson
    batch of the whole data set and the accountant steps with ``q``. For a seeded
    sampler every rank draws the full length-``N`` uniform vector per step and keeps
    its own entries, so with a shared seed the union over ranks equals
    ``PoissonSampler(N, q, seed=seed)``'s batch exactly. In secure mode each rank
    draws OS-entropy uniforms for its own shard only (the union is still Poisson).

    Unlike Opacus' ``DistributedUniformWithReplacementSampler`` there is no shuffle
    before sharding (it is not needed for privacy: every example is still included
    independently with probability ``q``).

    Args:
        num_samples: Global data set size.
        sample_rate: Global inclusion probability ``q``.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of ranks.
        steps: Batches per epoch (default ``round(1 / q)``).
        seed: Seed shared by all ranks (``None``: fresh entropy per rank).
        secure_mode: OS-entropy sampling; refuses a seed.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        rank: int,
        world_size: int,
        steps: int | None = None,
        seed: int | None = None,
        secure_mode: bool = False,
    ) -> None:
        self.world_size = check_int(world_size, "world_size", 1)
        self.rank = check_int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank must satisfy 0 <= rank < world_size={self.world_size}, got {rank!r}."
            )
        super().__init__(num_samples, sample_rate, steps=steps, seed=seed, secure_mode=secure_mode)
        self.shard = np.arange(self.rank, self.num_samples, self.world_size, dtype=np.int64)

    def _draw(self) -> np.ndarray:
        if self.secure_mode:
            included = self._stream.uniforms(self.shard.size) < self.sample_rate
        else:
            included = self._stream.uniforms(self.num_samples)[self.shard] < self.sample_rate
        return self.shard[included]

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "rank": self.rank, "world_size": self.world_size}


def shard_plan(
    batches: Sequence[np.ndarray], rank: int, world_size: int
) -> list[np.ndarray]:
    """Restrict global batches to the indices rank ``rank`` owns (``i % world_size == rank``).

    Args:
        batches: Global index arrays (e.g. from :func:`poisson_batches`).
        rank: The rank, ``0 <= rank < world_size``.
        world_size: Number of ranks.

    Returns:
        One ``int64`` array per batch with this rank's indices, order preserved.
    """
    world_size = check_int(world_size, "world_size", 1)
    rank = check_int(rank, "rank", 0)
    if rank >= world_size:
        raise ValueError(f"rank must satisfy 0 <= rank < world_size={world_size}, got {rank}.")
    out = []
    for batch in batches:
        idx = np.asarray(batch, dtype=np.int64)
        out.append(idx[idx % world_size == rank])
    return out


# --------------------------------------------------------------------------- shuffled


class ShuffledBatchSampler:
    """Fixed-size batches from a shuffled permutation, one permutation per epoch.

    WARNING: this is NOT Poisson sampling. The accountants in
    :mod:`dpcore.accounting` analyse Poisson-subsampled Gaussian mechanisms; the
    privacy amplification they credit does not apply to shuffled fixed-size
    batches, so an epsilon computed with ``sample_rate = batch_size / N`` for this
    sampler is NOT a valid guarantee. Use it only for non-private baselines or
    with an accountant built for shuffling.

    Each epoch's permutation is ``np.argsort(rng.random(N), kind="stable")`` with
    ``rng = np.random.Generator(np.random.PCG64(seed))``, which is reproducible on
    every platform (unlike ``Generator.permutation``, whose algorithm may change).

    Args:
        num_samples: Data set size.
        batch_size: Examples per batch.
        seed: Seed (``None``: fresh entropy).
        drop_last: Drop the last, smaller batch of each epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.num_samples = check_int(num_samples, "num_samples", 1)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {drop_last!r}.")
        self.drop_last = drop_last
        self.seed = _check_seed(seed, False)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._epoch_state = copy.deepcopy(self._rng.bit_generator.state)
        self._perm: np.ndarray | None = None
        self._drawn = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _new_permutation(self) -> np.ndarray:
        return np.argsort(self._rng.random(self.num_samples), kind="stable").astype(np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._perm is None or self._drawn >= len(self):
            self._epoch_state = copy.deepcopy(self._rng.bit_generator.state)
            self._perm = self._new_permutation()
            self._drawn = 0
        while self._drawn < len(self):
            start = self._drawn * self.batch_size
            batch = self._perm[start : start + self.batch_size]
            self._drawn += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Return the position: generator state at the epoch start and batches drawn."""
        return {
            "version": _STATE_VERSION,
            "config": {"num_samples": self.num_samples, "batch_size": self.batch_size,
                       "drop_last": self.drop_last},
            "bit_generator_state": copy.deepcopy(self._epoch_state),
            "epoch_started": self._perm is not None,
            "batches_drawn": self._drawn,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (validated before any change).

        Raises:
            ValueError: If the dict is malformed or from another configuration.
        """
        config = {"num_samples": self.num_samples, "batch_size": self.batch_size,
                  "drop_last": self.drop_last}
        if not isinstance(state_dict, Mapping) or dict(state_dict.get("config", {})) != config:
            raise ValueError(
                f"state_dict must come from a ShuffledBatchSampler with config {config}, "
                f"got {state_dict!r}."
            )
        bit_state = check_pcg64_state(state_dict.get("bit_generator_state"))
        drawn = check_int(state_dict.get("batches_drawn"), "state_dict['batches_drawn']", 0)
        if drawn > len(self):
            raise ValueError(f"state_dict['batches_drawn']={drawn} exceeds len={len(self)}.")
        started = bool(state_dict.get("epoch_started"))
        self._rng.bit_generator.state = bit_state
        self._epoch_state = copy.deepcopy(bit_state)
        self._perm = self._new_permutation() if started else None
        self._drawn = drawn


# --------------------------------------------------------------------------- bucketing


def bucket_sizes(
    expected_batch_size: int,
    *,
    max_physical_batch_size: int | None = None,
    num_buckets: int | None = None,
) -> tuple[int, ...]:
    """A small increasing set of padded batch sizes for fixed-shape (jit) training.

    With expected size ``m`` the Poisson batch size has mean ``m`` and standard
    deviation ``sqrt(m (1 - q)) <= sqrt(m)``. The largest bucket is
    ``ceil(m + 6 sqrt(m))``, capped by ``max_physical_batch_size``. A Poisson batch
    exceeds ``ceil(m + 6 sqrt(m))`` with probability about ``1e-5`` for ``m = 1``,
    ``3e-7`` for ``m = 10`` and ``1e-8`` for ``m = 100`` (Poisson tail); such rare
    batches are split into several chunks, never truncated, by :func:`pad_to_buckets`.
    The smallest bucket is ``max(1, floor(m - 3 sqrt(m)))``; buckets are
    geometrically spaced in between, rounded up and de-duplicated.

    Args:
        expected_batch_size: ``m >= 1`` (see :func:`expected_batch_size`).
        max_physical_batch_size: Largest chunk that fits in memory, or ``None``.
        num_buckets: Number of buckets before de-duplication (default 4).

    Returns:
        Strictly increasing positive bucket sizes.
    """
    m = check_int(expected_batch_size, "expected_batch_size", 1)
    k = 4 if num_buckets is None else check_int(num_buckets, "num_buckets", 1)
    top = math.ceil(m + 6.0 * math.sqrt(m))
    if max_physical_batch_size is not None:
        top = min(top, check_int(max_physical_batch_size, "max_physical_batch_size", 1))
    low = min(top, max(1, math.floor(m - 3.0 * math.sqrt(m))))
    if k == 1 or low == top:
        return (top,)
    ratio = (top / low) ** (1.0 / (k - 1))
    sizes = {min(top, math.ceil(low * ratio**i - 1e-9)) for i in range(k - 1)} | {top}
    return tuple(sorted(sizes))


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Validate bucket sizes: a non-empty, strictly increasing sequence of ints >= 1."""
    try:
        values = tuple(buckets)
    except TypeError:
        raise TypeError(f"buckets must be a sequence of ints, got {buckets!r}.") from None
    if not values:
        raise ValueError("buckets must not be empty; use bucket_sizes(...) to make them.")
    checked = tuple(check_int(b, "buckets[i]", 1) for b in values)
    if any(a >= b for a, b in zip(checked, checked[1:])):
        raise ValueError(f"buckets must be strictly increasing, got {values!r}.")
    return checked


def pad_to_buckets(
    indices: np.ndarray, buckets: Sequence[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pad one logical batch to bucket sizes, splitting it if it is too large.

    A batch with more indices than the largest bucket is split into chunks of the
    largest bucket plus a remainder; the remainder (or a batch that fits) is padded
    to the smallest bucket that holds it. Nothing is ever truncated. Padded slots
    hold index ``0`` and have mask ``False``; the caller MUST make masked rows
    contribute exactly zero (multiply the per-example clipped gradient by the mask
    before summing), otherwise padding changes the sum and the privacy analysis no
    longer holds. An empty batch gives one chunk of the smallest bucket with an
    all-``False`` mask (the step still adds noise).

    Args:
        indices: 1-D integer array of example indices of one logical batch.
        buckets: Strictly increasing bucket sizes (see :func:`bucket_sizes`).

    Returns:
        A list of ``(padded_indices int64, mask bool)`` pairs; the concatenation of
        ``padded_indices[mask]`` over chunks equals ``indices``.
    """
    sizes = check_buckets(buckets)
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(
            f"indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}."
        )
    idx = idx.astype(np.int64, copy=False)
    largest = sizes[-1]
    chunks = [idx[i : i + largest] for i in range(0, idx.size, largest)] or [idx]
    out = []
    for chunk in chunks:
        size = next(b for b in sizes if b >= chunk.size)
        padded = np.zeros(size, dtype=np.int64)
        mask = np.zeros(size, dtype=bool)
        padded[: chunk.size] = chunk
        mask[: chunk.size] = True
        out.append((padded, mask))
    return out
