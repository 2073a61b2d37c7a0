"""What ``PrivacyEngine.make_private`` returns: the train state and the training bundle."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import optax

from dp_jax._data import PhysicalChunk
from dp_jax._types import PyTree

__all__ = ["PrivateTraining", "TrainState"]


class TrainState(NamedTuple):
    """The whole state of a private run (a pytree).

    Attributes:
        params: The model parameters.
        opt_state: The optimizer state: the DP accumulator (clipped-sum buffer,
            PRNG key, noise settings) chained in front of the user's optimizer.
        step: int32 count of applied (logical) updates.
    """

    params: PyTree
    opt_state: PyTree
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
        frozen_params: The ``frozen_params`` of ``make_private`` as the step receives
            them (on the mesh, split or replicated), or ``None``; use them to evaluate
            ``loss_fn(state.params, example, frozen_params)``.
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
    frozen_params: Any = None
