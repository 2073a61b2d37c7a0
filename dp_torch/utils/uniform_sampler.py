"""Poisson batch samplers for PyTorch data loaders (mirrors ``opacus.utils.uniform_sampler``).

Both samplers draw through :mod:`dpcore.sampling`, so a given seed gives the
same batches in PyTorch and in JAX. They are *batch samplers*: each iteration
yields one list of example indices per step, possibly empty (an empty batch is
still a DP-SGD step: noise is added and the accountant steps).

Randomness, in order of precedence:

* ``secure_mode=True``: OS entropy (``os.urandom``); refuses ``seed`` and ``generator``;
* ``seed=``: dpcore's reproducible PCG64 stream (identical to ``dp_jax``'s);
* ``generator=`` (a ``torch.Generator``, as Opacus users pass): one 63-bit integer
  is drawn from it at construction and used as the dpcore seed, so a seeded
  generator gives a reproducible plan (not the same batches as Opacus, which
  samples with ``torch.rand``);
* neither: the same draw from torch's default generator, so ``torch.manual_seed(s)``
  before the sampler (or the ``DPDataLoader``, or ``make_private``) is built makes the
  batches repeat, as it does in Opacus.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from torch.utils.data import Sampler

from dpcore import sampling as core_sampling

__all__ = [
    "DistributedUniformWithReplacementSampler",
    "UniformWithReplacementSampler",
    "seed_from_default_generator",
    "seed_from_generator",
]

_SEED_HIGH = 2**63 - 1


def seed_from_generator(generator: torch.Generator) -> int:
    """A dpcore seed drawn deterministically from a ``torch.Generator``.

    Draws one integer in ``[0, 2**63 - 1)`` from ``generator`` (advancing it), so
    equal generator states give equal seeds.

    Args:
        generator: The torch generator.

    Returns:
        A non-negative int seed.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}."
        )
    draw = torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=generator.device)
    return int(draw.item())


def seed_from_default_generator() -> int:
    """A dpcore seed drawn from torch's default (CPU) generator, advancing it by one draw.

    This is what makes ``torch.manual_seed`` govern the Poisson batches of a sampler
    built without ``seed`` or ``generator``.
    """
    return int(torch.randint(0, _SEED_HIGH, (1,)).item())


def _resolve_seed(generator: Any, seed: Optional[int], secure_mode: Any) -> Optional[int]:
    """The dpcore seed: ``None`` in secure mode (OS entropy), else ``seed`` or one drawn."""
    if not isinstance(secure_mode, bool):
        raise TypeError(f"secure_mode must be a bool, got {secure_mode!r}.")
    if generator is not None and seed is not None:
        raise ValueError(
            f"pass either generator or seed, not both (got seed={seed!r} and a generator)."
        )
    if secure_mode and (generator is not None or seed is not None):
        raise ValueError(
            "secure_mode=True samples from OS entropy and refuses a seed or a generator (both "
            "make the batches predictable); pass generator=None and seed=None."
        )
    if secure_mode:
        return None
    if seed is not None:
        return seed
    if generator is None:
        return seed_from_default_generator()
    return seed_from_generator(generator)


class _PlanSampler(Sampler[list[int]]):
    """What both samplers share: a dpcore Poisson plan and the torch generator it was seeded from.

    Setting :attr:`generator` rebuilds the plan with the same configuration and a seed
    drawn from the new generator.
    """

    def __init__(
        self, plan_cls: type, plan_kwargs: dict[str, Any], generator: Optional[torch.Generator],
        seed: Optional[int], secure_mode: bool,
    ) -> None:
        resolved = _resolve_seed(generator, seed, secure_mode)
        self._plan = plan_cls(**plan_kwargs, seed=resolved, secure_mode=secure_mode)
        self._plan_kwargs = plan_kwargs
        self._generator = generator
        self.secure_mode = secure_mode

    @property
    def sample_rate(self) -> float:
        """Inclusion probability ``q`` (global, for the distributed sampler)."""
        return self._plan.sample_rate

    @property
    def steps(self) -> int:
        """Batches per epoch."""
        return self._plan.steps

    @property
    def seed(self) -> Optional[int]:
        """The dpcore seed of the plan (``None`` only in secure mode, where OS entropy is used)."""
        return self._plan.seed

    @property
    def generator(self) -> Optional[torch.Generator]:
        """The ``torch.Generator`` given, if any; setting one re-seeds the plan from it.

        Setting ``None`` re-seeds from torch's default generator (not in secure mode,
        which stays on OS entropy).
        """
        return self._generator

    @generator.setter
    def generator(self, generator: Optional[torch.Generator]) -> None:
        resolved = _resolve_seed(generator, None, self.secure_mode)
        self._plan = type(self._plan)(
            **self._plan_kwargs, seed=resolved, secure_mode=self.secure_mode
        )
        self._generator = generator

    def __len__(self) -> int:
        return self.steps


class UniformWithReplacementSampler(_PlanSampler):
    """Poisson sampling: each example joins each batch independently with prob. ``sample_rate``.

    Yields ``steps`` index lists per iteration (default ``round(1 / sample_rate)``;
    Opacus uses ``int(1 / sample_rate)``). Batch sizes are ``Binomial(N, q)``.
    Iterating again continues the random stream (a new epoch).

    Attributes:
        num_samples: Data set size.
        sample_rate: Inclusion probability ``q``.
        steps: Batches per iteration (epoch).
        secure_mode: Whether sampling uses OS entropy.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        generator: Optional[torch.Generator] = None,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
        secure_mode: bool = False,
    ) -> None:
        """Create the sampler (all arguments validated by dpcore).

        Args:
            num_samples: Data set size ``N >= 1``.
            sample_rate: ``q`` with ``0 < q <= 1``.
            generator: Optional ``torch.Generator``; a seed is drawn from it.
            steps: Batches per epoch (default ``round(1 / q)``).
            seed: Optional dpcore seed (exclusive with ``generator``).
            secure_mode: Draw from OS entropy; refuses ``seed`` and ``generator``.
        """
        plan_kwargs = {"num_samples": num_samples, "sample_rate": sample_rate, "steps": steps}
        super().__init__(core_sampling.PoissonSampler, plan_kwargs, generator, seed, secure_mode)

    @property
    def num_samples(self) -> int:
        """Data set size."""
        return self._plan.num_samples

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._plan:
            yield batch.tolist()

    def state_dict(self) -> dict[str, Any]:
        """The plan's position (dpcore ``PoissonSampler.state_dict``), JSON-serialisable."""
        return self._plan.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (validated by dpcore before any change).

        Also accepts the state of a :class:`DistributedUniformWithReplacementSampler`
        over the same data set, rate and steps (a checkpoint of a distributed run
        resumed in one process): the position in the epoch and, for a seeded
        sampler, the random stream carry over (see
        :func:`_plan_state_for`).
        """
        self._plan.load_state_dict(_plan_state_for(self._plan, state_dict))


_WORLD_KEYS = ("rank", "world_size")


def _plan_state_for(plan: core_sampling.PoissonSampler, state_dict: Any) -> Any:
    """A plan state re-targeted to ``plan``'s rank and world size (else returned unchanged).

    A seeded Poisson plan draws the full length-``N`` uniform vector each step
    whatever the sharding (:class:`dpcore.sampling.DistributedPoissonSampler`), so
    its stream position and ``batches_drawn`` mean the same for every rank and
    world size; only the ``rank``/``world_size`` entries of the config differ.
    They are replaced by ``plan``'s own when the rest of the config (data set
    size, rate, steps) agrees; dpcore then validates the state as usual. The
    distributed wrapper ``{"plan": ..., "epoch": ...}`` is unwrapped.
    """
    if isinstance(state_dict, Mapping) and set(state_dict) == {"plan", "epoch"}:
        state_dict = state_dict["plan"]
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("config"), Mapping):
        return state_dict
    own = dict(plan.state_dict()["config"])
    saved = dict(state_dict["config"])
    shared = {k: v for k, v in saved.items() if k not in _WORLD_KEYS}
    if shared != {k: v for k, v in own.items() if k not in _WORLD_KEYS}:
        return state_dict  # dpcore reports the mismatch
    return {**state_dict, "config": own}


def _distributed_rank_and_size(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "DistributedUniformWithReplacementSampler needs rank and world_size: pass them, or "
            "call torch.distributed.init_process_group() first."
        )
    return (
        torch.distributed.get_rank() if rank is None else rank,
        torch.distributed.get_world_size() if world_size is None else world_size,
    )


class DistributedUniformWithReplacementSampler(_PlanSampler):
    """Poisson sampling with the data set split across ranks.

    Rank ``r`` owns every ``world_size``-th position of the data set (of a
    permutation of it when ``shuffle=True``) and includes each owned example with
    the *global* rate ``q``; the union of all ranks' batches of a step is one
    Poisson batch of the whole data set, so the accountant steps with ``q``.
    Sampling is :class:`dpcore.sampling.DistributedPoissonSampler`: with a seed
    shared by all ranks and ``shuffle=False`` the union equals
    ``PoissonSampler(N, q, seed=seed)``'s batch exactly (the JAX backend's too).
    ``shuffle=True`` (Opacus' default) relabels positions through
    ``torch.randperm`` seeded with ``shuffle_seed + epoch``, as Opacus; the batch
    distribution is the same.

    Unlike Opacus, empty local batches are yielded (not skipped), so every rank
    takes the same number of steps and an empty step still adds noise.

    Attributes:
        total_size: Global data set size.
        sample_rate: Global inclusion probability.
        num_replicas: ``world_size``.
        rank: This rank.
        num_samples: Size of this rank's shard.
        num_batches: Batches per epoch.
        epoch: Epoch used for the shuffle (see :meth:`set_epoch`).
    """

    def __init__(
        self,
        *,
        total_size: int,
        sample_rate: float,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        secure_mode: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        """Create the sampler.

        Args:
            total_size: Global data set size.
            sample_rate: Global ``q``.
            shuffle: Permute the data set before sharding (per epoch).
            shuffle_seed: Seed of that permutation.
            steps: Batches per epoch (default ``round(1 / q)``).
            generator: Optional ``torch.Generator``; a seed is drawn from it.
            seed: Optional dpcore seed (use the same on every rank).
            secure_mode: OS-entropy sampling; refuses ``seed`` and ``generator``.
            rank: This rank (default: ``torch.distributed.get_rank()``).
            world_size: Number of ranks (default: ``torch.distributed.get_world_size()``).
        """
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {shuffle!r}.")
        if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int) or shuffle_seed < 0:
            raise ValueError(f"shuffle_seed must be an int >= 0, got {shuffle_seed!r}.")
        rank, world_size = _distributed_rank_and_size(rank, world_size)
        plan_kwargs = {"num_samples": total_size, "sample_rate": sample_rate, "rank": rank,
                       "world_size": world_size, "steps": steps}
        super().__init__(core_sampling.DistributedPoissonSampler, plan_kwargs, generator, seed,
                         secure_mode)
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.epoch = 0

    @property
    def total_size(self) -> int:
        """Global data set size."""
        return self._plan.num_samples

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self._plan.rank

    @property
    def num_replicas(self) -> int:
        """Number of ranks (``world_size``)."""
        return self._plan.world_size

    @property
    def num_samples(self) -> int:
        """Size of this rank's shard."""
        return int(self._plan.shard.size)

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        return self._plan.steps

    def _relabel(self) -> Optional[torch.Tensor]:
        if not self.shuffle:
            return None
        g = torch.Generator()
        g.manual_seed(self.shuffle_seed + self.epoch)
        return torch.randperm(self.total_size, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self._relabel()
        for batch in self._plan:
            yield batch.tolist() if perm is None else perm[torch.from_numpy(batch)].tolist()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shuffle (call it before each epoch).

        Args:
            epoch: Epoch number.
        """
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """The plan's position plus the shuffle epoch."""
        return {"plan": self._plan.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (validated before any change).

        Any world size: the state of a sampler with another ``rank`` or
        ``world_size`` (e.g. rank 0's, from a checkpoint of a run with a different
        number of processes) over the same data set, rate and steps is accepted,
        and so is a single-process :class:`UniformWithReplacementSampler` state
        (the epoch is then kept). The position in the epoch and, for a seeded
        sampler, the random stream carry over; with a seed shared by all ranks the
        union of the ranks' batches continues exactly as the saved run's would
        have. In secure mode only the position carries over.
        """
        if isinstance(state_dict, Mapping) and set(state_dict) == {"plan", "epoch"}:
            plan, epoch = state_dict["plan"], state_dict["epoch"]
        elif isinstance(state_dict, Mapping) and "config" in state_dict:
            plan, epoch = state_dict, self.epoch
        else:
            raise ValueError(
                f"state_dict must come from DistributedUniformWithReplacementSampler.state_dict() "
                f"(or UniformWithReplacementSampler.state_dict()), got {state_dict!r}."
            )
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ValueError(f"state_dict['epoch'] must be an int, got {epoch!r}.")
        self._plan.load_state_dict(_plan_state_for(self._plan, plan))
        self.epoch = epoch
