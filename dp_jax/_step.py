"""The one DP step body shared by the engine and the data-parallel step.

A step clips one physical chunk into a clipped sum (``grad_fn``), hands the sum
to an optax transformation that accumulates it, adds the noise once per logical
batch and runs the optimizer, and applies the update. On one device ``grad_fn``
is :func:`dp_jax.clipped_grad` (or ghost clipping); over a mesh it is
:func:`dp_jax.sharded_clipped_grad`, which clips on every device and ``psum``\\ s
the sums and counts before the transformation sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax.numpy as jnp
import optax

from dp_jax._grads import ClipAux
from dp_jax._types import PyTree

__all__ = ["make_step_fn"]


def _takes_extra_args(tx: Any) -> bool:
    return isinstance(tx, optax.GradientTransformationExtraArgs)


def _tx_kwargs(tx: Any, aux: ClipAux, apply: Any, noise: PyTree, count_noise: PyTree) -> dict:
    """The keyword arguments ``tx.update`` takes (none for a plain transformation)."""
    if not _takes_extra_args(tx):
        if noise is not None or count_noise is not None:
            raise ValueError(
                "noise= was given but tx takes no extra arguments; wrap the noise "
                "transformation so that tx is an optax.GradientTransformationExtraArgs."
            )
        return {}
    kwargs: dict[str, Any] = {"clip_aux": aux, "apply_update": apply}
    if noise is not None:
        kwargs["noise"] = noise
    if count_noise is not None:
        kwargs["count_noise"] = count_noise
    return kwargs


def make_step_fn(
    grad_fn: Callable[..., tuple[Any, ClipAux]],
    tx: optax.GradientTransformation,
    bound_of: Optional[Callable[[Any], Any]] = None,
) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """The UNjitted step ``step(state, batch, mask, apply_update, noise=None, count_noise=None)``.

    1. ``grad_fn(params, batch, mask, max_grad_norm=bound_of(opt_state))`` gives the
       chunk's clipped sum and :class:`~dp_jax.ClipAux` (its ``loss`` is the metric:
       one forward pass per step);
    2. ``tx.update(clipped_sum, opt_state, params, clip_aux=aux,
       apply_update=apply_update[, noise=..., count_noise=...])`` (keywords only for
       an ``optax.GradientTransformationExtraArgs``; a plain transformation is
       applied at every call) accumulates and, on a logical batch's last chunk,
       adds the noise once and runs the optimizer;
    3. the update is applied and ``state.step`` advances by ``apply_update``.

    Args:
        grad_fn: ``grad_fn(params, batch, mask, max_grad_norm=None) -> (clipped_sum,
            ClipAux)``.
        tx: The transformation that takes the clipped SUM.
        bound_of: ``bound_of(opt_state) -> max_grad_norm`` when the bound lives in
            the optimizer state (injected or adaptive); ``None`` keeps ``grad_fn``'s.

    Returns:
        ``step``; ``state`` is any NamedTuple with fields ``params``, ``opt_state``
        and ``step``; metrics are ``{"loss", "applied"}``.
    """

    def step(state: Any, batch: PyTree, mask: Any, apply_update: Any, noise: PyTree = None,
             count_noise: PyTree = None) -> tuple[Any, dict[str, Any]]:
        mask = jnp.asarray(mask, dtype=bool)
        apply = jnp.asarray(apply_update, dtype=bool)
        bound = None if bound_of is None else bound_of(state.opt_state)
        clipped, aux = grad_fn(state.params, batch, mask, max_grad_norm=bound)
        kwargs = _tx_kwargs(tx, aux, apply, noise, count_noise)
        updates, opt_state = tx.update(clipped, state.opt_state, state.params, **kwargs)
        new_state = state._replace(
            params=optax.apply_updates(state.params, updates), opt_state=opt_state,
            step=state.step + apply.astype(jnp.asarray(state.step).dtype),
        )
        loss = aux.loss if aux.loss is not None else jnp.zeros(())
        return new_state, {"loss": loss, "applied": apply}

    return step
