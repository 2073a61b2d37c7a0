"""Per-example loss functions from flax models (linen and nnx).

``dp_jax`` differentiates a loss of ONE example, ``loss_fn(params, example)``,
and vectorises it with ``jax.vmap``. These helpers build that function from a
flax model: the example's input gets a batch axis of size 1, goes through the
model, and the single output row is compared with the example's label.

An *example* is a pair ``(x, y)`` (tuple or list) or a mapping with the keys
``input_key`` (default ``"x"``) and ``label_key`` (default ``"y"``), as produced by
:func:`dp_jax.poisson_batches` from ``(x, y)`` or ``{"x": x, "y": y}`` data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import jax.numpy as jnp
import optax
from flax import nnx

from dp_jax._types import PyTree

__all__ = ["linen_loss", "nnx_loss", "nnx_merge", "nnx_split_params"]

LossSpec = Union[str, Callable[[Any, Any], Any]]


def _mse(pred: Any, target: Any) -> Any:
    return jnp.mean(jnp.square(pred - target))


def _cross_entropy(logits: Any, label: Any) -> Any:
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(label, jnp.int32))


_LOSSES: dict[str, Callable[[Any, Any], Any]] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
}


def _resolve_loss(loss: LossSpec) -> Callable[[Any, Any], Any]:
    if callable(loss):
        return loss
    if isinstance(loss, str) and loss in _LOSSES:
        return _LOSSES[loss]
    raise ValueError(
        f"loss must be one of {sorted(_LOSSES)} or a callable (output, label) -> scalar, got "
        f"{loss!r}."
    )


def _split_example(example: PyTree, input_key: str, label_key: str) -> tuple[Any, Any]:
    if isinstance(example, Mapping):
        return example[input_key], example[label_key]
    x, y = example
    return x, y


def linen_loss(
    module: Any,
    loss: LossSpec = "cross_entropy",
    *,
    variables: Mapping[str, Any] | None = None,
    input_key: str = "x",
    label_key: str = "y",
    **apply_kwargs: Any,
) -> Callable[[Any, Any], Any]:
    """``loss_fn(params, example)`` for a ``flax.linen`` module.

    The model runs as ``module.apply({"params": params, **variables}, x[None],
    **apply_kwargs)[0]`` on one example, so every layer sees a batch of one: a
    layer that mixes examples (BatchNorm in training mode) cannot leak across the
    batch, but it would compute nonsense; check the module with
    :func:`dp_jax.validate` first.

    Args:
        module: A linen module (or the :class:`dp_jax.GroupNormLinen` from
            :func:`dp_jax.fix`); anything with linen's ``apply``.
        loss: ``"cross_entropy"`` (integer labels, softmax cross-entropy), ``"mse"``
            (mean squared error over the output) or a callable
            ``loss(output, label) -> scalar`` for one example.
        variables: Non-trainable collections to pass along, e.g. frozen
            ``{"batch_stats": ...}``; they are not differentiated.
        input_key: The input's key when examples are mappings.
        label_key: The label's key when examples are mappings.
        **apply_kwargs: Extra keyword arguments of ``module.apply`` (e.g. ``train=False``).

    Returns:
        ``loss_fn(params, example) -> scalar``.
    """
    loss_of = _resolve_loss(loss)
    extra = dict(variables or {})
    if "params" in extra:
        raise ValueError("variables must not contain 'params'; params are loss_fn's argument.")

    def loss_fn(params: PyTree, example: PyTree) -> Any:
        x, y = _split_example(example, input_key, label_key)
        out = module.apply({"params": params, **extra}, jnp.asarray(x)[None], **apply_kwargs)
        return loss_of(out[0], y)

    return loss_fn


def nnx_split_params(model: nnx.Module) -> tuple[Any, Any, Any]:
    """Split an nnx model into ``(graphdef, params, rest)`` (``nnx.split`` on ``nnx.Param``).

    ``params`` (an ``nnx.State`` pytree) is what DP training differentiates;
    ``rest`` holds every other variable (batch statistics, RNG counters), which
    stays fixed.

    Args:
        model: The nnx model.

    Returns:
        ``(graphdef, params, rest)``.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def nnx_merge(graphdef: Any, params: PyTree, rest: Any) -> nnx.Module:
    """Rebuild the nnx model from :func:`nnx_split_params`' parts (e.g. trained params).

    Args:
        graphdef: The graph definition.
        params: The (trained) parameters.
        rest: The other variables.

    Returns:
        A new model object.
    """
    return nnx.merge(graphdef, params, rest)


def nnx_loss(
    graphdef: Any,
    rest: Any,
    loss: LossSpec = "cross_entropy",
    *,
    input_key: str = "x",
    label_key: str = "y",
    **call_kwargs: Any,
) -> Callable[[Any, Any], Any]:
    """``loss_fn(params, example)`` for an nnx model split by :func:`nnx_split_params`.

    Each call merges ``graphdef``, ``params`` and ``rest`` into a model (pure, so it
    can be traced, vmapped and differentiated) and evaluates it on ``x[None]``.
    Changes the model makes to its own non-parameter state are discarded.

    Args:
        graphdef: From :func:`nnx_split_params`.
        rest: The non-parameter state from :func:`nnx_split_params`.
        loss: As in :func:`linen_loss`.
        input_key: The input's key when examples are mappings.
        label_key: The label's key when examples are mappings.
        **call_kwargs: Extra keyword arguments of the model's ``__call__``.

    Returns:
        ``loss_fn(params, example) -> scalar``.
    """
    loss_of = _resolve_loss(loss)

    def loss_fn(params: PyTree, example: PyTree) -> Any:
        x, y = _split_example(example, input_key, label_key)
        model = nnx.merge(graphdef, params, rest)
        out = model(jnp.asarray(x)[None], **call_kwargs)
        return loss_of(out[0], y)

    return loss_fn
