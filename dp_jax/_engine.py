"""``PrivacyEngine`` for JAX: a loss, parameters, an optax optimizer and data in, DP-SGD out.

Mirrors :class:`dp_torch.PrivacyEngine` (``make_private``,
``make_private_with_epsilon``, ``get_epsilon``, ``save_checkpoint``,
``load_checkpoint``, the same privacy argument names) in JAX's functional idiom.
A step clips each example's gradient in a gradient function with the contract of
:func:`dp_jax.clipped_grad` (vmap or ghost clipping, ``psum``-ed over a mesh),
then :func:`dp_jax.transforms.dp_accumulate_clipped_sums` (or its adaptive twin)
accumulates the chunks of a logical batch, adds Gaussian noise
``N(0, (noise_multiplier * C)**2)`` once, divides by
``expected_batch_size = int(N * q)`` for ``loss_reduction="mean"`` and feeds the
user's optax optimizer; the accountant records one step at the logical rate ``q``.
In secure mode (``PrivacyEngine(secure_mode=True)``) the batches and the noise come
from OS entropy, the noise drawn on the host once per logical step.

Guarantee:
    If every update comes from ``train_logical_step`` (or ``step`` with
    ``apply_update=True`` exactly on each logical batch's last chunk, followed by
    :meth:`PrivacyEngine.record_step`) on batches of the returned Poisson iterator,
    the parameters are ``(engine.get_epsilon(delta), delta)``-DP with respect to
    adding or removing one example of ``data``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from dp_jax import _checkpoint
from dp_jax import _distributed
from dp_jax import _engine_args
from dp_jax import _fsdp
from dp_jax import _ghost
from dp_jax._data import PoissonBatches, ShuffledBatches, count_examples
from dp_jax._grads import ClipAux, clipped_grad
from dp_jax._host_noise import HostNoise, with_host_noise
from dp_jax._optimizer import build_optimizer
from dp_jax._step import make_step_fn
from dp_jax._training import PrivateTraining, TrainState
from dp_jax._types import PyTree
from dpcore import sampling as core_sampling
from dpcore.accounting import create_accountant, get_noise_multiplier
from dpcore.checks import check_bool

__all__ = ["PrivacyEngine", "PrivateTraining", "TrainState"]

logger = logging.getLogger(__name__)


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
        self.data: PyTree = None
        self._batches: Any = None
        self._place: Callable[[Any], Any] = lambda tree: tree
        self._sample_rate: Optional[float] = None
        self._noise_multiplier_of: Callable[[Any], float] | None = None

    # ------------------------------------------------------------------ planning

    def _check_data(self, data: PyTree) -> None:
        if self.data is None or data is self.data or len(self.accountant) == 0:
            return
        raise ValueError(
            f"PrivacyEngine has already spent privacy budget ({len(self.accountant)} steps) on "
            f"another data set ({type(self.data).__name__} at {id(self.data):#x}); got "
            f"{type(data).__name__} at {id(data):#x}. Accounting is per data set: use a new "
            "PrivacyEngine for a different data set, or pass the same object."
        )

    def _plan(self, **kwargs: Any) -> _engine_args.RunPlan:
        """Validate every argument of :meth:`make_private`; change nothing."""
        plan = _engine_args.plan_run(secure_mode=self.secure_mode, **kwargs)
        self._check_data(kwargs["data"])
        return plan

    # ------------------------------------------------------------------ make_private

    def make_private(
        self,
        *,
        loss_fn: Callable[[Any, Any], Any],
        params: PyTree,
        optimizer: optax.GradientTransformation,
        data: PyTree,
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
        param_sharding: Any = None,
        frozen_params: PyTree = None,
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
                (replicated state, :class:`dp_jax.distributed.ShardedBatches`). Works across
                processes after ``jax.distributed.initialize`` (secure-mode noise is
                then drawn by process 0 and broadcast). ``None``: one device.
            axis_name: The data axis of ``mesh``.
            param_sharding: With ``mesh``, split the parameters and the optimizer
                state over ``axis_name`` (FSDP-style) instead of replicating them:
                ``"fsdp"`` splits every array of at least
                :data:`dp_jax.distributed.FSDP_MIN_SIZE` elements on its largest
                dimension divisible by the axis size and replicates the rest; a
                pytree like ``params`` of ``jax.sharding.PartitionSpec`` (e.g. an
                edited :func:`dp_jax.distributed.fsdp_specs`) says it leaf by leaf.
                Every subtree of the optimizer state shaped like ``params`` is split
                like it. The batch is still split over ``axis_name``, and the step is
                one ``jax.jit`` computation of the one-device step (XLA gathers what
                each device needs): per-example norms over whole parameters, one
                Gaussian draw for the global parameters (the same as on one device
                for the same key), one accountant step per logical batch.
                ``None`` (default): replicated parameters.
            frozen_params: Non-trainable arrays the loss reads, e.g. the frozen base
                of a LoRA model; ``loss_fn`` is then called as ``loss_fn(params,
                example, frozen_params)``. They are arguments of the compiled step,
                never differentiated, clipped, noised or updated; with ``mesh``
                they are split like ``param_sharding="fsdp"`` splits parameters when
                that is the choice (leaves already placed on ``mesh`` keep their
                sharding), else replicated. Closing over frozen arrays in
                ``loss_fn`` instead makes them constants copied whole to every
                device.
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
        sharding = _fsdp.plan_sharding(param_sharding, params, mesh, axis_name, frozen_params)
        bound = _engine_args.clip_bound(max_grad_norm, clipping, params)
        grad_of = functools.partial(_make_grad_fn, clipping=clipping, bound=bound,
                                    microbatch_size=microbatch_size,
                                    grad_sample_mode=grad_sample_mode)
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
        parts = build_optimizer(
            optimizer=optimizer, params=params, clipping=clipping, max_grad_norm=bound,
            noise_multiplier=float(noise_multiplier), expected_batch_size=plan.expected_batch_size,
            loss_reduction=loss_reduction, key=_engine_args.noise_key(key, seed, self.secure_mode),
            adaptive_kwargs=adaptive_kwargs,
        )
        state = TrainState(
            params=params, opt_state=parts.tx.init(params), step=jnp.zeros((), jnp.int32)
        )
        place = _placement(mesh, sharding)
        host_noise = None
        if self.secure_mode:
            host_noise = HostNoise(params, parts, mesh, None if sharding is None else place)
        if mesh is not None:
            batches = _distributed.ShardedBatches(batches, mesh, axis_name=axis_name)
        if frozen_params is not None:  # arguments of every step: on the devices once
            frozen_params = (jax.device_put(frozen_params) if sharding is None
                             else sharding.place_frozen(frozen_params))
        step = _build_step(
            _StepParts(loss_fn, grad_of, parts.tx, parts.bound_of, frozen_params),
            host_noise, mesh, axis_name, sharding, state,
        )
        state = place(state)
        q = plan.sample_rate
        read_nm = parts.noise_multiplier_of

        def train_logical_step(state: TrainState, logical_batch: Sequence[Any]):
            return self._run_logical(step, state, logical_batch, q, read_nm)

        self.data = data
        self._batches = batches
        self._place = place
        self._sample_rate = q
        self._noise_multiplier_of = read_nm
        return PrivateTraining(
            state=state, step=step, batches=batches, train_logical_step=train_logical_step,
            optimizer=parts.tx, sample_rate=q, expected_batch_size=plan.expected_batch_size,
            noise_multiplier=float(noise_multiplier), max_grad_norm=max_grad_norm,
            frozen_params=frozen_params,
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
        params: PyTree,
        optimizer: optax.GradientTransformation,
        data: PyTree,
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
        q = _engine_args.resolve_sample_rate(sample_rate, batch_size, count_examples(data))
        _engine_args.check_int_or_none(steps, "steps")
        per_epoch = core_sampling.steps_per_epoch(q) if steps is None else steps
        total = core_sampling.steps_for_epochs(epochs, per_epoch)
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

        Save between logical steps. See :func:`dp_jax.checkpoint.save_checkpoint`. With several
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
        return self._place(state), extra


def _make_grad_fn(
    loss_fn: Callable, *, clipping: str, bound: Any, microbatch_size: Optional[int],
    grad_sample_mode: str,
) -> Callable[..., tuple[Any, ClipAux]]:
    """``grad_fn(params, batch, mask, *, max_grad_norm) -> (clipped_sum, ClipAux)``."""
    kind = "flat" if clipping == "adaptive" else clipping
    if grad_sample_mode == "vmap":
        return clipped_grad(loss_fn, bound, clipping=kind, microbatch_size=microbatch_size)
    return _ghost.ghost_clipped_grad(loss_fn, bound, clipping=kind)


def _placement(mesh: Any, sharding: Optional[_fsdp.ShardingPlan]) -> Callable[[Any], Any]:
    """How a state goes onto the devices: as it is, replicated on ``mesh``, or by ``sharding``."""
    if sharding is not None:
        return sharding.place
    if mesh is not None:
        return functools.partial(_distributed.replicate, mesh=mesh)
    return lambda tree: tree


class _StepParts(NamedTuple):
    """What the step is made of: the loss, how to clip it, the optimizer, the frozen arrays."""

    loss_fn: Callable
    grad_of: Callable[[Callable], Callable[..., tuple[Any, ClipAux]]]
    tx: optax.GradientTransformation
    bound_of: Callable[[Any], Any]
    frozen: PyTree


def _step_body(parts: _StepParts) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
    """The unjitted step; with frozen arrays they are its last argument, bound to the loss."""
    if parts.frozen is None:
        return make_step_fn(parts.grad_of(parts.loss_fn), parts.tx, parts.bound_of)

    def body(state: TrainState, batch: PyTree, mask: Any, apply_update: Any, noise: PyTree = None,
             count_noise: PyTree = None, frozen: PyTree = None):
        loss = functools.partial(_with_frozen, parts.loss_fn, frozen)
        inner = make_step_fn(parts.grad_of(loss), parts.tx, parts.bound_of)
        return inner(state, batch, mask, apply_update, noise, count_noise)

    return body


def _with_frozen(loss_fn: Callable, frozen: PyTree, params: PyTree, example: PyTree) -> Any:
    return loss_fn(params, example, frozen)


def _build_step(
    parts: _StepParts, host_noise: Optional[HostNoise], mesh: Any, axis_name: str,
    sharding: Optional[_fsdp.ShardingPlan], state: TrainState,
) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
    """``step(state, batch, mask, apply_update)``; ``apply_update`` is traced.

    One device: ``jit`` of the body. A mesh with replicated parameters: every device
    clips its rows in ``shard_map`` and the sums are ``psum``-ed. Sharded (or frozen)
    parameters: ``jit`` of the one-device body with the plan's output shardings. With
    ``host_noise`` (secure mode) the noise comes from the host on the chunk that applies
    the update; frozen arrays are bound as the jitted function's last argument.
    """
    clip = parts.grad_of
    if sharding is not None:
        parts = parts._replace(grad_of=lambda loss: sharding.gathered(clip(loss)))
    elif mesh is not None:
        parts = parts._replace(grad_of=lambda loss: _distributed.sharded_clipped_grad(
            clip(loss), mesh, axis_name=axis_name))
    body = _step_body(parts)
    if sharding is not None:
        jitted = sharding.jit(body, state)
    elif mesh is None:
        jitted = jax.jit(body)
    else:  # the new state and the metrics are the same on every device
        jitted = jax.jit(body, out_shardings=NamedSharding(mesh, PartitionSpec()))
    if parts.frozen is not None:
        jitted = functools.partial(jitted, frozen=parts.frozen)
    return jitted if host_noise is None else with_host_noise(jitted, host_noise)
