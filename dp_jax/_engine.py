"""``PrivacyEngine`` for JAX: a loss, parameters, an optax optimizer and data in, DP-SGD out.

Mirrors :class:`dp_torch.PrivacyEngine` (``make_private``,
``make_private_with_epsilon``, ``get_epsilon``, ``save_checkpoint``,
``load_checkpoint``, the same privacy argument names) in JAX's functional idiom:
``make_private`` returns a :class:`PrivateTraining` bundle with the initial
:class:`TrainState`, a jitted ``step`` function, the Poisson ``batches`` and a
``train_logical_step`` helper that also records the accountant step.

What a step means is fixed by :mod:`dpcore` (DESIGN section 3): each example's
gradient is clipped (L2 over all parameters, or per parameter), the clipped sums
of the physical chunks of one logical batch are accumulated, Gaussian noise
``N(0, (noise_multiplier * C)**2)`` is added ONCE per logical batch,
``loss_reduction="mean"`` divides by ``expected_batch_size = int(N * q)`` (never
the realised batch size), the result goes through the user's optax optimizer,
and the accountant records one step with the logical sample rate ``q``.

How a step is built. Clipping happens before the optax transformation, in a
*gradient function* with the contract of :func:`dp_jax.clipped_grad`:
``grad_fn(params, batch, mask, *, max_grad_norm) -> (clipped_sum, ClipAux)``
(``grad_sample_mode="vmap"``: :func:`dp_jax.clipped_grad`; ``"ghost"``: ghost
clipping, which never forms per-example gradients). The bound passed in is read
from the optimizer state (the injected ``max_grad_norm``, or the adaptive
bound), so changing it between logical steps changes both the clipping and the
noise. With ``mesh=`` the gradient function is :func:`dp_jax.sharded_clipped_grad`:
each device clips its rows and the sums and counts are ``psum``-ed. Then
:func:`dp_jax.dp_accumulate_sums` (or its adaptive twin) accumulates, noises
once and feeds the optimizer. The loss metric is :attr:`ClipAux.loss`: the
forward pass runs once per step.

Guarantee: if every update comes from ``train_logical_step`` (or ``step`` with
``apply_update=True`` exactly on each logical batch's last chunk, followed by
:meth:`PrivacyEngine.record_step`) on batches of the returned Poisson iterator,
the parameters are ``(engine.get_epsilon(delta), delta)``-DP with respect to adding
or removing one example of ``data``.

Secure mode. ``PrivacyEngine(secure_mode=True)`` refuses every seed and key.
The Poisson batches come from OS entropy (``dpcore.sampling`` in secure mode),
and so does the noise: the optax transformation is built without a PRNG key
(``key=None``), and on the chunk that ends each logical batch ``step`` draws the
Gaussian noise on the host from :class:`dpcore.noise.NoiseSource` in secure mode
(OS entropy, the sum of four inverse-CDF normals, hardened against the
floating-point attacks of Mironov 2012; see its docstring for the limits) with
standard deviation ``sigma * C`` for the current multiplier and bound, and feeds
it to the jitted step through the transformation's ``noise=`` argument. The
noise is drawn once per LOGICAL step; the other chunks get a cached all-zero
tree that the accumulator ignores, so there is still one compile per bucket.
Cost: every logical step draws ``4 * P`` OS-entropy normals on the host
(``P`` = number of parameters; about 0.2 s per million parameters on a 2-core
CPU) and copies a params-sized array to the device, and ``step`` becomes a
Python wrapper that needs a concrete ``apply_update``.
The noise is cast to each parameter's dtype before the copy (rounding to
float32 is not hardened). Nothing secret is kept in the state, so a secure
checkpoint holds no key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from dp_jax import _checkpoint
from dp_jax import _distributed
from dp_jax import _ghost
from dp_jax import _transforms
from dp_jax import _tree
from dp_jax._data import PhysicalChunk, PoissonBatches, ShuffledBatches
from dp_jax._grads import ClipAux, clipped_grad
from dp_jax._step import make_step_fn
from dpcore._checks import check_bool, check_choice, check_int
from dpcore import clipping as core_clipping
from dpcore import noise as core_noise
from dpcore import sampling as core_sampling
from dpcore.accounting import create_accountant, get_noise_multiplier

__all__ = ["PrivacyEngine", "PrivateTraining", "TrainState"]

logger = logging.getLogger(__name__)

_CLIPPINGS = ("flat", "per_layer", "adaptive")
_GRAD_SAMPLE_MODES = ("vmap", "ghost")
_LOSS_REDUCTIONS = ("mean", "sum")
_ADAPTIVE_KWARGS = (
    "target_unclipped_quantile",
    "clipbound_learning_rate",
    "max_clipbound",
    "min_clipbound",
    "unclipped_num_std",
)


class TrainState(NamedTuple):
    """The whole state of a private run (a pytree).

    Attributes:
        params: The model parameters.
        opt_state: The optimizer state: the DP accumulator (clipped-sum buffer,
            PRNG key, noise settings) chained in front of the user's optimizer.
        step: int32 count of applied (logical) updates.
    """

    params: Any
    opt_state: Any
    step: jax.Array


@dataclasses.dataclass
class PrivateTraining:
    """What :meth:`PrivacyEngine.make_private` returns.

    Attributes:
        state: The initial :class:`TrainState`.
        step: Jitted ``step(state, batch, mask, apply_update) -> (state, metrics)``;
            compiled once per bucket shape (``apply_update`` is a traced bool). It
            clips and accumulates one physical chunk and, when ``apply_update`` is
            true, adds the noise once and applies the optimizer update.
            ``metrics``: ``"loss"`` (mean loss over the chunk's unmasked rows) and
            ``"applied"``. It does not touch the accountant: call
            :meth:`PrivacyEngine.record_step` after each logical batch, or use
            :attr:`train_logical_step`. In secure mode it is a host wrapper around
            the jitted step that draws the noise when ``apply_update`` is true
            (so ``apply_update`` must be a concrete bool there).
        batches: The Poisson :class:`~dp_jax.PoissonBatches` iterator.
        train_logical_step: ``(state, logical_batch) -> (state, metrics)``: runs the
            chunks of one logical batch and records one accountant step.
        optimizer: The full optax transformation (DP aggregation + base optimizer).
        sample_rate: The logical sampling rate ``q``.
        expected_batch_size: ``int(N * q)`` (``None`` only for ``loss_reduction="sum"``
            with ``N * q < 1``).
        noise_multiplier: The noise multiplier used (the accounted one).
        max_grad_norm: The clipping bound(s) (the initial bound for adaptive clipping).
    """

    state: TrainState
    step: Callable[..., tuple[TrainState, dict[str, Any]]]
    batches: Any
    train_logical_step: Callable[[TrainState, Sequence[PhysicalChunk]], tuple[TrainState, dict]]
    optimizer: optax.GradientTransformation
    sample_rate: float
    expected_batch_size: Optional[int]
    noise_multiplier: float
    max_grad_norm: Any


# --------------------------------------------------------------------------- checks


def _check_optimizer(optimizer: Any) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation (with init and update), got "
            f"{type(optimizer).__name__}; pass e.g. optax.sgd(0.1). The engine chains the DP "
            "aggregation in front of it."
        )


def _check_int_or_none(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1 or None, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}.")


def _check_max_grad_norm(max_grad_norm: Any, clipping: str, params: Any) -> None:
    if clipping == "per_layer":
        leaves = jax.tree_util.tree_leaves(params)
        bounds = max_grad_norm
        if jax.tree_util.tree_structure(max_grad_norm) == jax.tree_util.tree_structure(params):
            bounds = jax.tree_util.tree_leaves(max_grad_norm)
        if not isinstance(bounds, (list, tuple)) or len(bounds) != len(leaves):
            raise ValueError(
                f'clipping="per_layer" needs max_grad_norm as one bound per parameter leaf '
                f"({len(leaves)} leaves), as a pytree like params or a list in leaf order; got "
                f"{max_grad_norm!r}."
            )
        core_clipping.per_layer_noise_norm([float(b) for b in bounds])
        return
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real):
        raise ValueError(
            f"clipping={clipping!r} needs max_grad_norm as one float > 0, got {max_grad_norm!r}; "
            'for one bound per parameter use clipping="per_layer".'
        )
    core_noise.noise_std(1.0, max_grad_norm)


def _noise_norm(max_grad_norm: Any, clipping: str, params: Any) -> float:
    if clipping != "per_layer":
        return float(max_grad_norm)
    bounds = max_grad_norm
    if jax.tree_util.tree_structure(max_grad_norm) == jax.tree_util.tree_structure(params):
        bounds = jax.tree_util.tree_leaves(max_grad_norm)
    return core_clipping.per_layer_noise_norm([float(b) for b in bounds])


def _check_adaptive_kwargs(
    kwargs: Mapping[str, Any], clipping: str, noise_multiplier: float, max_grad_norm: Any,
    expected_batch_size: Optional[int],
) -> None:
    if clipping != "adaptive":
        if kwargs:
            raise TypeError(
                f"make_private got unexpected keyword arguments {sorted(kwargs)} for "
                f"clipping={clipping!r}; {list(_ADAPTIVE_KWARGS)} belong to "
                'clipping="adaptive", and no other extra argument is accepted.'
            )
        return
    unknown = sorted(set(kwargs) - set(_ADAPTIVE_KWARGS))
    if unknown:
        raise TypeError(
            f'clipping="adaptive" takes only the keyword arguments {list(_ADAPTIVE_KWARGS)}; '
            f"unexpected {unknown}."
        )
    if expected_batch_size is None:
        raise ValueError(
            'clipping="adaptive" needs expected_batch_size = int(N * sample_rate) >= 1; use a '
            "larger sample_rate."
        )
    spec = core_clipping.AdaptiveClipping(initial_max_grad_norm=max_grad_norm, **kwargs)
    spec.gradient_noise_multiplier(noise_multiplier, expected_batch_size)


def _data_size(data: Any) -> int:
    probe = PoissonBatches(data, 1.0, steps=1, seed=0, buckets=[1])
    return probe.num_samples


def _resolve_sample_rate(sample_rate: Any, batch_size: Any, num_samples: int) -> float:
    if (sample_rate is None) == (batch_size is None):
        raise ValueError(
            f"make_private needs exactly one of sample_rate and batch_size, got "
            f"sample_rate={sample_rate!r} and batch_size={batch_size!r}; pass sample_rate=q, or "
            "batch_size=B for q = B / len(data) (the EXPECTED Poisson batch size)."
        )
    if batch_size is not None:
        _check_int_or_none(batch_size, "batch_size")
        if batch_size > num_samples:
            raise ValueError(
                f"batch_size={batch_size} exceeds the data size {num_samples}; the sample rate "
                "batch_size / len(data) must be at most 1."
            )
        return batch_size / num_samples
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise TypeError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}.")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")
    return float(sample_rate)


def _expected_batch_size(num_samples: int, q: float, loss_reduction: str) -> Optional[int]:
    try:
        return core_sampling.expected_batch_size(num_samples, q)
    except ValueError:
        if loss_reduction == "sum":
            return None
        raise


def _steps_for_epochs(epochs: Any, steps_per_epoch: int) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real):
        raise TypeError(f"epochs must be a number > 0, got {epochs!r}.")
    if not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}.")
    total = float(epochs) * steps_per_epoch
    nearest = round(total)
    steps = nearest if abs(total - nearest) < 1e-9 * max(1.0, total) else math.ceil(total)
    return max(1, int(steps))


def _noise_key(key: Any, seed: Optional[int], secure_mode: bool) -> Optional[jax.Array]:
    if secure_mode:
        return None  # key-free transformation: the noise comes from the host (OS entropy)
    if key is not None:
        return key
    if seed is not None:
        return jax.random.fold_in(jax.random.key(seed), 0x6E6F6973)  # "nois"
    return jax.random.key(secrets.randbits(63))


@dataclasses.dataclass(frozen=True)
class _Plan:
    num_samples: int
    sample_rate: float
    expected_batch_size: Optional[int]


# --------------------------------------------------------------------------- engine


class PrivacyEngine:
    """Entry point: turn a per-example loss, parameters, an optax optimizer and data into DP-SGD.

    The engine owns the accountant; :meth:`make_private` returns the training
    bundle; :meth:`get_epsilon` reads the budget spent.

    Example:
        >>> engine = PrivacyEngine()
        >>> private = engine.make_private(
        ...     loss_fn=loss_fn, params=params, optimizer=optax.sgd(0.1),
        ...     data={"x": x, "y": y}, sample_rate=0.01, noise_multiplier=1.1,
        ...     max_grad_norm=1.0, seed=0)
        >>> state = private.state
        >>> for logical_batch in private.batches:
        ...     state, metrics = private.train_logical_step(state, logical_batch)
        >>> engine.get_epsilon(1e-5)

    Attributes:
        accountant: The :mod:`dpcore` accountant (``"rdp"`` by default); its history
            is the privacy ledger.
        secure_mode: Whether sampling and noise come from OS entropy (the noise
            from :class:`dpcore.noise.NoiseSource`, hardened; see the module
            docstring for the guarantee and its cost).
    """

    def __init__(self, *, accountant: str = "rdp", secure_mode: bool = False) -> None:
        """Create the engine and its accountant.

        Args:
            accountant: Registered accountant kind: ``"rdp"`` (default), ``"prv"``,
                ``"pld"``, ``"gdp"``.
            secure_mode: OS-entropy sampling and hardened OS-entropy noise drawn on
                the host; refuses every seed and key.

        Raises:
            ValueError: If ``accountant`` is not registered.
            TypeError: If ``secure_mode`` is not a bool.
        """
        check_bool(secure_mode, "secure_mode")
        self.accountant = create_accountant(accountant)
        self.secure_mode = secure_mode
        self.data: Any = None
        self._batches: Any = None
        self._mesh: Any = None
        self._sample_rate: Optional[float] = None
        self._noise_multiplier_of: Callable[[Any], float] | None = None

    # ------------------------------------------------------------------ planning

    def _check_data(self, data: Any) -> None:
        if self.data is None or data is self.data or len(self.accountant) == 0:
            return
        raise ValueError(
            f"PrivacyEngine has already spent privacy budget ({len(self.accountant)} steps) on "
            f"another data set ({type(self.data).__name__} at {id(self.data):#x}); got "
            f"{type(data).__name__} at {id(data):#x}. Accounting is per data set: use a new "
            "PrivacyEngine for a different data set, or pass the same object."
        )

    def _plan(
        self, *, loss_fn: Any, params: Any, optimizer: Any, data: Any, noise_multiplier: Any,
        max_grad_norm: Any, sample_rate: Any, batch_size: Any, steps: Any, clipping: Any,
        poisson_sampling: Any, max_physical_batch_size: Any, loss_reduction: Any, key: Any,
        seed: Any, microbatch_size: Any, grad_sample_mode: Any,
        adaptive_kwargs: Mapping[str, Any],
    ) -> _Plan:
        """Validate every argument of :meth:`make_private`; change nothing."""
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(params, example) -> scalar, got "
                f"{type(loss_fn).__name__}."
            )
        _check_optimizer(optimizer)
        check_bool(poisson_sampling, "poisson_sampling")
        check_choice(loss_reduction, "loss_reduction", _LOSS_REDUCTIONS,
                      ' "mean" divides the noised sum by the expected batch size.')
        check_choice(clipping, "clipping", _CLIPPINGS)
        check_choice(grad_sample_mode, "grad_sample_mode", _GRAD_SAMPLE_MODES,
                     ' "vmap" clips vmapped per-example gradients; "ghost" uses ghost clipping.')
        _check_int_or_none(steps, "steps")
        _check_int_or_none(max_physical_batch_size, "max_physical_batch_size")
        _check_int_or_none(microbatch_size, "microbatch_size")
        if grad_sample_mode == "ghost" and microbatch_size is not None:
            raise ValueError(
                f'grad_sample_mode="ghost" does not take microbatch_size (got '
                f"{microbatch_size!r}): ghost clipping never stores per-example gradients. Pass "
                "microbatch_size=None, "
                'or grad_sample_mode="vmap" to bound vmap\'s memory with microbatches.'
            )
        if self.secure_mode and (seed is not None or key is not None):
            raise ValueError(
                f"Passing a seed or key is prohibited in secure mode: got seed={seed!r}, "
                f"key={key!r}. Pass neither (secure sampling and noise keys come from OS "
                "entropy), or PrivacyEngine(secure_mode=False) for reproducible runs."
            )
        if self.secure_mode and not poisson_sampling:
            raise ValueError(
                "secure_mode=True requires poisson_sampling=True: the accountant's guarantee "
                "assumes Poisson batches, and shuffled batches come from a seedable generator."
            )
        if seed is not None:
            check_int(seed, "seed", 0)
        core_noise.noise_std(noise_multiplier, 1.0)
        _check_max_grad_norm(max_grad_norm, clipping, params)
        num_samples = _data_size(data)
        q = _resolve_sample_rate(sample_rate, batch_size, num_samples)
        m = _expected_batch_size(num_samples, q, loss_reduction)
        if not poisson_sampling and m is None:
            raise ValueError("poisson_sampling=False needs int(N * sample_rate) >= 1.")
        _check_adaptive_kwargs(adaptive_kwargs, clipping, noise_multiplier, max_grad_norm, m)
        self._check_data(data)
        return _Plan(num_samples=num_samples, sample_rate=q, expected_batch_size=m)

    # ------------------------------------------------------------------ make_private

    def make_private(
        self,
        *,
        loss_fn: Callable[[Any, Any], Any],
        params: Any,
        optimizer: optax.GradientTransformation,
        data: Any,
        noise_multiplier: float,
        max_grad_norm: Any,
        sample_rate: Optional[float] = None,
        batch_size: Optional[int] = None,
        steps: Optional[int] = None,
        clipping: str = "flat",
        poisson_sampling: bool = True,
        max_physical_batch_size: Optional[int] = None,
        loss_reduction: str = "mean",
        key: Any = None,
        seed: Optional[int] = None,
        microbatch_size: Optional[int] = None,
        grad_sample_mode: str = "vmap",
        mesh: Any = None,
        axis_name: str = "data",
        **adaptive_kwargs: Any,
    ) -> PrivateTraining:
        """Build the private training step, state and Poisson batches.

        Args:
            loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example (the batch
                pytree without its leading axis); see :func:`dp_jax.linen_loss` and
                :func:`dp_jax.nnx_loss`.
            params: The initial parameters (a pytree).
            optimizer: The base optax optimizer, e.g. ``optax.sgd(0.1)``; it receives
                the noised, averaged gradient once per logical batch.
            data: Arrays / pytree of arrays with leading axis ``N``, or an indexable
                dataset (see :class:`dp_jax.PoissonBatches`). ``N`` is the privacy unit.
            noise_multiplier: ``sigma >= 0``: noise std over the clipping norm.
            max_grad_norm: Clipping bound ``C > 0``; for ``clipping="per_layer"`` one
                bound per parameter leaf (pytree like ``params`` or list in leaf order),
                noise scaled by ``sqrt(sum C_i**2)``; for ``"adaptive"`` the initial bound.
            sample_rate: Poisson rate ``q``; give this or ``batch_size``.
            batch_size: Expected batch size; ``q = batch_size / N``.
            steps: Logical batches per pass over ``batches`` (default ``round(1 / q)``).
            clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"``.
            poisson_sampling: ``True`` (required for the guarantee). ``False`` gives
                shuffled fixed-size batches of ``int(N * q)``; the accountant still
                records ``q``, which is then only an approximation.
            max_physical_batch_size: Largest physical chunk; bigger logical batches
                are split (virtual steps), never truncated. Works with every clipping
                mode (adaptive clipping clips all chunks of a logical batch with the
                same bound and moves it once per logical batch).
            loss_reduction: ``"mean"`` (divide by ``int(N * q)``) or ``"sum"``.
            key: JAX PRNG key for the noise (default: derived from ``seed``, else
                fresh entropy). Refused in secure mode.
            seed: Seed of the Poisson sampler (and of the noise key when ``key`` is
                ``None``). Refused in secure mode.
            microbatch_size: Compute per-example gradients in chunks of this size
                (memory only; the result is identical). ``"vmap"`` mode only.
            grad_sample_mode: How the clipped sum is computed: ``"vmap"``
                (:func:`dp_jax.clipped_grad`, per-example gradients by
                ``jax.vmap``) or ``"ghost"`` (:func:`dp_jax.ghost_clipped_grad`:
                norms from layer inputs and output gradients, no per-example
                gradients for Dense/Embed layers; other layers fall back to vmap).
                Same semantics, same privacy.
            mesh: A ``jax.sharding.Mesh`` (:func:`dp_jax.data_mesh`) for data-parallel
                training: every chunk is sharded along ``axis_name``, each device
                clips its own rows, the clipped sums and counts are ``psum``-ed, the
                noise is added once to the global sum from the replicated state, and
                the returned state, step and batches are placed on the mesh
                (replicated state, :class:`dp_jax.ShardedBatches`). Works across
                processes after ``jax.distributed.initialize`` (secure-mode noise is
                then drawn by process 0 and broadcast). ``None``: one device.
            axis_name: The data axis of ``mesh``.
            **adaptive_kwargs: For ``clipping="adaptive"`` only:
                ``target_unclipped_quantile``, ``clipbound_learning_rate``,
                ``max_clipbound``, ``min_clipbound``, ``unclipped_num_std``.

        Returns:
            A :class:`PrivateTraining`.

        Raises:
            TypeError: On an argument of the wrong type or an unexpected keyword.
            ValueError: On an invalid value (the message names it), a seed or key in
                secure mode, or a different data set after budget was spent.
        """
        plan = self._plan(
            loss_fn=loss_fn, params=params, optimizer=optimizer, data=data,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            sample_rate=sample_rate, batch_size=batch_size, steps=steps, clipping=clipping,
            poisson_sampling=poisson_sampling, max_physical_batch_size=max_physical_batch_size,
            loss_reduction=loss_reduction, key=key, seed=seed, microbatch_size=microbatch_size,
            grad_sample_mode=grad_sample_mode, adaptive_kwargs=adaptive_kwargs,
        )
        if mesh is not None:
            _distributed._check_axis(mesh, axis_name)
        bound = _clip_bound(max_grad_norm, clipping, params)
        grad_fn = _make_grad_fn(loss_fn, clipping, bound, microbatch_size, grad_sample_mode)
        if poisson_sampling:
            batches: Any = PoissonBatches(
                data, plan.sample_rate, steps=steps,
                seed=None if self.secure_mode else seed, secure_mode=self.secure_mode,
                max_physical_batch_size=max_physical_batch_size,
            )
        else:
            batches = ShuffledBatches(
                data, plan.expected_batch_size, seed=seed,
                max_physical_batch_size=max_physical_batch_size,
            )
        parts = _build_optimizer(
            optimizer=optimizer, params=params, clipping=clipping, max_grad_norm=bound,
            noise_multiplier=float(noise_multiplier), expected_batch_size=plan.expected_batch_size,
            loss_reduction=loss_reduction, key=_noise_key(key, seed, self.secure_mode),
            adaptive_kwargs=adaptive_kwargs,
        )
        host_noise = _HostNoise(params, parts, mesh) if self.secure_mode else None
        state = TrainState(
            params=params, opt_state=parts.tx.init(params), step=jnp.zeros((), jnp.int32)
        )
        if mesh is not None:
            grad_fn = _distributed.sharded_clipped_grad(grad_fn, mesh, axis_name=axis_name)
            batches = _distributed.ShardedBatches(batches, mesh, axis_name=axis_name)
            state = _distributed.replicate(state, mesh)
        step = _build_step(grad_fn, parts.tx, parts.bound_of, host_noise, mesh)
        q = plan.sample_rate
        read_nm = parts.noise_multiplier_of

        def train_logical_step(state: TrainState, logical_batch: Sequence[Any]):
            return self._run_logical(step, state, logical_batch, q, read_nm)

        self.data = data
        self._batches = batches
        self._mesh = mesh
        self._sample_rate = q
        self._noise_multiplier_of = read_nm
        return PrivateTraining(
            state=state, step=step, batches=batches, train_logical_step=train_logical_step,
            optimizer=parts.tx, sample_rate=q, expected_batch_size=plan.expected_batch_size,
            noise_multiplier=float(noise_multiplier), max_grad_norm=max_grad_norm,
        )

    def _run_logical(
        self, step: Callable, state: TrainState, logical_batch: Sequence[Any], q: float,
        read_nm: Callable[[Any], float],
    ) -> tuple[TrainState, dict[str, Any]]:
        chunks = list(logical_batch)
        if not chunks:
            raise ValueError(
                "logical_batch has no chunks; an empty Poisson batch is one all-masked chunk "
                "(as PoissonBatches yields it), so that the noise is still added."
            )
        metrics: dict[str, Any] = {}
        last = len(chunks) - 1
        for i, (batch, mask) in enumerate(chunks):
            state, metrics = step(state, batch, mask, i == last)
        self.record_step(state, sample_rate=q, noise_multiplier=read_nm(state.opt_state))
        return state, metrics

    def record_step(
        self, state: Any = None, *, sample_rate: Optional[float] = None,
        noise_multiplier: Optional[float] = None,
    ) -> None:
        """Record one logical step in the accountant (done by ``train_logical_step``).

        Call it after each logical batch when driving ``PrivateTraining.step``
        yourself.

        Args:
            state: The :class:`TrainState` after the step; the noise multiplier is
                read from its optimizer state when hyperparameters are injected.
            sample_rate: Override of the logical rate (default: the one of
                ``make_private``).
            noise_multiplier: Override of the multiplier.

        Raises:
            ValueError: Before ``make_private``, or on invalid values.
        """
        if self._sample_rate is None or self._noise_multiplier_of is None:
            raise ValueError("record_step needs make_private to have been called first.")
        q = self._sample_rate if sample_rate is None else sample_rate
        if noise_multiplier is None:
            if state is None:
                raise ValueError("record_step needs state= or noise_multiplier=.")
            noise_multiplier = self._noise_multiplier_of(state.opt_state)
        self.accountant.step(noise_multiplier=float(noise_multiplier), sample_rate=q)

    def make_private_with_epsilon(
        self,
        *,
        loss_fn: Callable[[Any, Any], Any],
        params: Any,
        optimizer: optax.GradientTransformation,
        data: Any,
        target_epsilon: float,
        target_delta: float,
        epochs: float,
        max_grad_norm: Any,
        sample_rate: Optional[float] = None,
        batch_size: Optional[int] = None,
        steps: Optional[int] = None,
        **kwargs: Any,
    ) -> PrivateTraining:
        """:meth:`make_private` with the noise multiplier calibrated to a budget.

        The multiplier is the one :func:`dpcore.accounting.get_noise_multiplier` finds
        with this engine's accountant kind for ``epochs * steps_per_epoch`` logical
        steps at the logical sample rate, so training that many steps ends with
        ``get_epsilon(target_delta) <= target_epsilon``.

        Args:
            loss_fn: See :meth:`make_private`.
            params: See :meth:`make_private`.
            optimizer: See :meth:`make_private`.
            data: See :meth:`make_private`.
            target_epsilon: Budget epsilon ``> 0``.
            target_delta: Budget delta in ``(0, 1)``.
            epochs: Planned passes over ``batches`` (each ``steps`` or ``round(1/q)``
                logical steps).
            max_grad_norm: See :meth:`make_private`.
            sample_rate: See :meth:`make_private`.
            batch_size: See :meth:`make_private`.
            steps: See :meth:`make_private`.
            **kwargs: ``epsilon_tolerance`` goes to the calibration, ``noise_multiplier``
                is refused, everything else to :meth:`make_private`.

        Returns:
            As :meth:`make_private`.

        Raises:
            ValueError: As :meth:`make_private`, if ``noise_multiplier`` is also given,
                for an unreachable budget, or if the accountant already recorded steps.
        """
        if "noise_multiplier" in kwargs:
            raise ValueError(
                f"make_private_with_epsilon got both noise_multiplier={kwargs['noise_multiplier']!r} "
                f"and target_epsilon={target_epsilon!r}; the multiplier is calibrated from the "
                "budget. Pass only one: use make_private for a fixed multiplier."
            )
        if len(self.accountant) > 0:
            raise ValueError(
                f"make_private_with_epsilon calibrates a fresh budget, but this engine's "
                f"accountant already recorded {len(self.accountant)} steps; the total would "
                f"exceed target_epsilon={target_epsilon!r}. Use a new PrivacyEngine, or "
                "make_private(noise_multiplier=...)."
            )
        q = _resolve_sample_rate(sample_rate, batch_size, _data_size(data))
        _check_int_or_none(steps, "steps")
        per_epoch = core_sampling.steps_per_epoch(q) if steps is None else steps
        total = _steps_for_epochs(epochs, per_epoch)
        tolerance = kwargs.pop("epsilon_tolerance", 0.01)
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=q,
            steps=total, accountant=self.accountant.mechanism(), epsilon_tolerance=tolerance,
        )
        return self.make_private(
            loss_fn=loss_fn, params=params, optimizer=optimizer, data=data,
            noise_multiplier=sigma, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
            batch_size=batch_size, steps=steps, **kwargs,
        )

    # ------------------------------------------------------------------ budget

    def get_epsilon(self, delta: float, **kwargs: Any) -> float:
        """The epsilon spent so far at ``delta`` (an upper bound, except for ``"gdp"``).

        Args:
            delta: Target delta in ``(0, 1)``.
            **kwargs: Accountant options (e.g. ``alphas`` for RDP).

        Returns:
            Epsilon (``0.0`` before the first step).
        """
        return self.accountant.get_epsilon(delta, **kwargs)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        path: Any,
        state: TrainState,
        batches: Any = None,
        *,
        checkpoint_dict: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Save parameters, optimizer state (PRNG key included), sampler position and ledger.

        Save between logical steps. See :func:`dp_jax.save_checkpoint`. With several
        JAX processes (``jax.distributed``) call it on every process: only process 0
        writes (its sampler position is the one all processes follow).

        Args:
            path: File path or binary file object (``.npz`` content).
            state: The :class:`TrainState`.
            batches: The batches whose position to save (default: the last
                ``make_private``'s).
            checkpoint_dict: Extra JSON-serialisable entries.
        """
        if jax.process_index() != 0:
            return
        _checkpoint.save_checkpoint(
            path, state, batches=batches if batches is not None else self._batches,
            accountant=self.accountant, checkpoint_dict=checkpoint_dict,
        )

    def load_checkpoint(
        self, path: Any, template: TrainState, batches: Any = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restore a checkpoint of :meth:`save_checkpoint` (all or nothing).

        Call it after ``make_private`` with the same arguments; pass the returned
        initial state as ``template``. The accountant's history is replaced by the
        saved ledger (no step lost or counted twice) and the sampler resumes.

        Args:
            path: File path or binary file object.
            template: A state with the saved structure (``PrivateTraining.state``).
            batches: Batches to restore the position into (default: the last
                ``make_private``'s).

        Returns:
            ``(state, checkpoint_dict)``.
        """
        state, extra = _checkpoint.load_checkpoint(
            path, template, batches=batches if batches is not None else self._batches,
            accountant=self.accountant,
        )
        if self._mesh is not None:
            state = _distributed.replicate(state, self._mesh)
        return state, extra


# --------------------------------------------------------------------------- building blocks


def _clip_bound(max_grad_norm: Any, clipping: str, params: Any) -> Any:
    """The (validated) bound as the gradient function and the transformation take it."""
    if clipping != "per_layer":
        return float(max_grad_norm)
    if jax.tree_util.tree_structure(max_grad_norm) == jax.tree_util.tree_structure(params):
        return max_grad_norm
    return list(max_grad_norm)


def _make_grad_fn(
    loss_fn: Callable, clipping: str, bound: Any, microbatch_size: Optional[int],
    grad_sample_mode: str,
) -> Callable[..., tuple[Any, ClipAux]]:
    """``grad_fn(params, batch, mask, *, max_grad_norm) -> (clipped_sum, ClipAux)``."""
    kind = "flat" if clipping == "adaptive" else clipping
    if grad_sample_mode == "vmap":
        return clipped_grad(loss_fn, bound, clipping=kind, microbatch_size=microbatch_size)
    return _ghost.ghost_clipped_grad(loss_fn, bound, clipping=kind)


class _DPParts(NamedTuple):
    """The DP transformation and how to read its current settings from its state.

    Attributes:
        tx: ``dp_multi_steps(dp accumulator, optimizer)``; takes clipped sums.
        noise_multiplier_of: Host: the multiplier the accountant records.
        bound_of: Traced: the bound to clip the next chunk with (what the
            transformation adds noise for).
        noise_std_of: Host: ``sigma * C`` on the sum for the next release.
        count_std: Adaptive clipping's count-noise std (``None`` otherwise).
    """

    tx: optax.GradientTransformation
    noise_multiplier_of: Callable[[Any], float]
    bound_of: Callable[[Any], Any]
    noise_std_of: Callable[[Any], float]
    count_std: Optional[float]


def _build_optimizer(
    *, optimizer: Any, params: Any, clipping: str, max_grad_norm: Any, noise_multiplier: float,
    expected_batch_size: Optional[int], loss_reduction: str, key: Optional[jax.Array],
    adaptive_kwargs: Mapping[str, Any],
) -> _DPParts:
    """The clipped-sum accumulator (hyperparameters injected) gated in front of ``optimizer``."""
    m = 1 if expected_batch_size is None else expected_batch_size  # "sum" never divides
    if clipping == "adaptive":
        return _build_adaptive(optimizer, max_grad_norm, noise_multiplier, m, loss_reduction,
                               key, adaptive_kwargs)
    static = ("expected_batch_size", "key", "loss_reduction", "clipping")
    if clipping == "per_layer":  # a list or pytree of bounds cannot be injected
        static += ("max_grad_norm",)
    dp_part = optax.inject_hyperparams(_transforms.dp_accumulate_sums, static_args=static)(
        max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier, expected_batch_size=m,
        key=key, loss_reduction=loss_reduction, clipping=clipping,
    )

    def read_injected(opt_state: Any) -> float:
        value = _transforms.current_hyperparams(opt_state)["noise_multiplier"]
        return _host_float(value, requested=noise_multiplier)

    def bound_of(opt_state: Any) -> Any:
        if clipping == "per_layer":
            return max_grad_norm
        return opt_state.dp_state.hyperparams["max_grad_norm"]

    def noise_std_of(opt_state: Any) -> float:
        sigma = float(_tree.host_array(opt_state.dp_state.hyperparams["noise_multiplier"]))
        if clipping == "per_layer":
            return sigma * _noise_norm(max_grad_norm, clipping, params)
        return sigma * float(_tree.host_array(bound_of(opt_state)))

    tx = _transforms.dp_multi_steps(dp_part, optimizer)
    return _DPParts(tx, read_injected, bound_of, noise_std_of, None)


def _build_adaptive(
    optimizer: Any, max_grad_norm: float, noise_multiplier: float, m: int, loss_reduction: str,
    key: Optional[jax.Array], adaptive_kwargs: Mapping[str, Any],
) -> _DPParts:
    spec = core_clipping.AdaptiveClipping(initial_max_grad_norm=max_grad_norm, **adaptive_kwargs)
    dp_part = _transforms.dp_accumulate_sums_adaptive(
        noise_multiplier, spec, m, key, loss_reduction=loss_reduction
    )
    z_grad = spec.gradient_noise_multiplier(noise_multiplier, m)

    def read_fixed(opt_state: Any) -> float:
        del opt_state
        return noise_multiplier

    def bound_of(opt_state: Any) -> Any:
        return opt_state.dp_state.max_grad_norm

    def noise_std_of(opt_state: Any) -> float:
        return z_grad * float(_tree.host_array(bound_of(opt_state)))

    tx = _transforms.dp_multi_steps(dp_part, optimizer)
    return _DPParts(tx, read_fixed, bound_of, noise_std_of, spec.count_noise_std(m))


def _host_float(value: Any, *, requested: float) -> float:
    """The Python float a (possibly float32) hyperparameter stands for.

    Without x64, ``optax.inject_hyperparams`` keeps hyperparameters as float32
    arrays, so ``1.1`` comes back as ``1.100000023841858``. The ledger records
    the value the user asked for, as ``dp_torch`` does: ``requested`` when the
    state still holds it, else the shortest decimal that rounds to the same
    float32 (what a user who set ``0.77`` in the state wrote).
    """
    array = _tree.host_array(value)
    if array.dtype != np.float32:
        return float(array)
    if np.float32(requested) == np.float32(array):
        return float(requested)
    return float(str(np.float32(array)))


class _HostNoise:
    """Secure-mode noise, drawn on the host from :class:`dpcore.noise.NoiseSource` (OS entropy).

    Float64 draws in JAX leaf order with std ``sigma * C`` read from the state,
    cast to each leaf's dtype and copied to the device (a params-sized transfer
    per logical step); then the adaptive count noise, if any.
    """

    def __init__(self, params: Any, parts: _DPParts, mesh: Any = None) -> None:
        leaves, self._treedef = jax.tree_util.tree_flatten(params)
        self._specs = [(tuple(np.shape(x)), jnp.result_type(x)) for x in leaves]
        self._count_dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        self._std_of = parts.noise_std_of
        self._count_std = parts.count_std
        self._source = core_noise.NoiseSource(secure_mode=True)
        self._mesh = mesh
        self._zeros: Any = None

    def draw(self, opt_state: Any) -> tuple[Any, Any]:
        """Fresh noise for the release that ends the current logical batch."""
        std = self._std_of(opt_state)
        noise = [np.asarray(self._source.normal(shape, std), dtype) for shape, dtype in self._specs]
        count = None
        if self._count_std is not None:
            count = np.asarray(self._source.normal((), self._count_std), self._count_dtype)
        return self._place((self._treedef.unflatten(noise), count))

    def _place(self, tree: Any) -> Any:
        """On the device, or replicated on the mesh with process 0's draw everywhere."""
        if self._mesh is None:
            return jax.device_put(tree)
        if jax.process_count() > 1:  # one draw for all processes: process 0's
            tree = multihost_utils.broadcast_one_to_all(tree)
        return _distributed.replicate(tree, self._mesh)

    def zeros(self) -> tuple[Any, Any]:
        """Placeholder for chunks that only accumulate (ignored; cached on the device)."""
        if self._zeros is None:
            noise = [jnp.zeros(shape, dtype) for shape, dtype in self._specs]
            count = None if self._count_std is None else jnp.zeros((), self._count_dtype)
            self._zeros = (self._treedef.unflatten(noise), count)
            if self._mesh is not None:
                self._zeros = _distributed.replicate(self._zeros, self._mesh)
        return self._zeros


def _with_host_noise(jitted: Callable, host_noise: _HostNoise) -> Callable:
    """``step(state, batch, mask, apply_update)`` that feeds host noise to ``jitted``."""

    def step(state: TrainState, batch: Any, mask: Any, apply_update: Any):
        if isinstance(apply_update, jax.core.Tracer):
            raise TypeError(
                "In secure mode step needs a concrete apply_update (a Python or numpy bool): the "
                "noise is drawn on the host when it is true. Call it outside jax.jit."
            )
        apply = bool(np.asarray(apply_update))
        noise, count_noise = host_noise.draw(state.opt_state) if apply else host_noise.zeros()
        return jitted(state, batch, mask, apply, noise, count_noise)

    return step


def _build_step(
    grad_fn: Callable[..., tuple[Any, ClipAux]], tx: optax.GradientTransformation,
    bound_of: Callable[[Any], Any], host_noise: Optional[_HostNoise] = None, mesh: Any = None,
) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
    """``jit(step)(state, batch, mask, apply_update)``; ``apply_update`` is traced.

    With ``host_noise`` (secure mode) the jitted step is wrapped so the noise
    comes from the host on the chunk that applies the update.
    """
    body = make_step_fn(grad_fn, tx, bound_of)
    if mesh is None:
        jitted = jax.jit(body)
    else:  # the new state and the metrics are the same on every device
        jitted = jax.jit(body, out_shardings=NamedSharding(mesh, PartitionSpec()))
    return jitted if host_noise is None else _with_host_noise(jitted, host_noise)
