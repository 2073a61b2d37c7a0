"""Gaussian noise on a clipped sum, drawn from a JAX key or given by the caller.

Guarantee:
    :func:`add_gaussian_noise` adds ``N(0, (sigma C)^2)`` to every coordinate of
    the clipped sum (``C = sqrt(sum C_i^2)`` for per-layer bounds) before the
    public division by the expected batch size; with ``key=None`` it never draws
    noise itself and refuses an update without ``noise=``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import _tree
from dp_jax._transforms._validation import (
    _check_clipping,
    _check_expected_batch_size,
    _check_reduction,
    _check_sigma,
)
from dp_jax._types import PyTree
from dpcore import clipping as core_clipping


def _noise_norm(max_grad_norm: Any, clipping: str) -> Any:
    """Sensitivity of the clipped sum: ``C`` or ``sqrt(sum C_i^2)``."""
    if clipping == "flat":
        return max_grad_norm
    leaves = jax.tree_util.tree_leaves(max_grad_norm)
    concrete = [_tree.concrete_or_none(b) for b in leaves]
    if all(v is not None for v in concrete):
        return core_clipping.per_layer_noise_norm([float(v) for v in concrete])
    return jnp.sqrt(sum(jnp.square(jnp.asarray(b)) for b in leaves))


def _denominator(loss_reduction: str, expected_batch_size: Any) -> Any:
    return expected_batch_size if loss_reduction == "mean" else None


def _noise_settings(noise_multiplier: Any, max_grad_norm: Any, expected_batch_size: Any,
                    loss_reduction: str, clipping: Optional[str]) -> tuple[Any, Any]:
    """Check the arguments every noising transformation takes; its noise std and denominator.

    ``clipping=None`` infers it from ``max_grad_norm`` (one scalar: ``"flat"``).
    """
    _check_sigma(noise_multiplier)
    _check_reduction(loss_reduction)
    _check_expected_batch_size(expected_batch_size)
    if clipping is None:
        clipping = "flat" if np.ndim(max_grad_norm) == 0 and not isinstance(
            max_grad_norm, (list, tuple, dict)
        ) else "per_layer"
    _check_clipping(clipping, max_grad_norm)
    std = noise_multiplier * _noise_norm(max_grad_norm, clipping)
    return std, _denominator(loss_reduction, expected_batch_size)


def _scale(tree: PyTree, denominator: Any) -> PyTree:
    if denominator is None:
        return tree
    return jax.tree_util.tree_map(
        lambda x: x / jnp.asarray(denominator, jnp.result_type(x)), tree
    )


def noise_from_normals(normals_tree: PyTree, std: Any) -> PyTree:
    """Scale standard normals to noise: ``std * z`` leaf by leaf (pure, jit-friendly).

    Use it in reproducibility mode to turn standard normals drawn on the host
    (e.g. ``dpcore.noise.NoiseSource(seed).normal(shape, 1.0)`` per leaf, in JAX
    leaf order) into the ``noise=`` argument of the transformations' ``update``.
    The product is formed in the normals' dtype (float64 only with x64 enabled);
    for bit-identical parity with ``dp_torch`` draw ``source.normal(shape, std)``
    directly and pass that instead.

    Args:
        normals_tree: Pytree of arrays of standard normal draws.
        std: Standard deviation of the noise on the *sum*, ``sigma * C``.

    Returns:
        The pytree ``std * normals``.
    """
    return jax.tree_util.tree_map(lambda z: jnp.asarray(z) * std, normals_tree)


def _draw_noise(key: jax.Array, like: PyTree, std: Any) -> PyTree:
    """Standard normals times ``std``, in the (float32 or wider) dtypes of ``like``."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, x in zip(keys, leaves):
        dtype = jnp.result_type(x)
        out.append(jax.random.normal(k, jnp.shape(x), dtype) * jnp.asarray(std, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _cast_noise(noise: PyTree, like: PyTree) -> PyTree:
    if jax.tree_util.tree_structure(noise) != jax.tree_util.tree_structure(like):
        raise ValueError(
            f"noise must have the structure of the parameters "
            f"({jax.tree_util.tree_structure(like)}), got {jax.tree_util.tree_structure(noise)}."
        )
    return jax.tree_util.tree_map(
        lambda z, x: jnp.asarray(z).astype(jnp.result_type(x)), noise, like
    )


def _require_noise(value: Any, name: str) -> None:
    if value is None:
        raise ValueError(
            f"{name}=None, but this transformation was built with key=None (key-free, e.g. "
            f"secure mode) and cannot draw noise itself; pass {name}= drawn on the host, e.g. "
            "from dpcore.noise.NoiseSource(secure_mode=True), or build it with a JAX key."
        )


def _noise_and_scale(
    clipped_sum: PyTree, key: Optional[jax.Array], std: Any, denominator: Any,
    noise: PyTree = None, out_like: PyTree = None,
) -> tuple[Any, Optional[jax.Array]]:
    """``(clipped_sum + noise) / denominator`` and the advanced key (``None`` stays ``None``).

    The sum, the noise and the division are float32 or wider whatever the leaves'
    dtypes; the result is rounded once, to the dtypes of ``out_like`` (the
    parameters; ``None``: those of ``clipped_sum``).
    """
    if key is None:
        _require_noise(noise, "noise")
        next_key = None
    else:
        next_key, draw_key = jax.random.split(key)
    wide = _tree.tree_wide(clipped_sum)
    if noise is None:
        noise = _draw_noise(draw_key, wide, std)
    else:
        noise = _cast_noise(noise, wide)
    noised = jax.tree_util.tree_map(jnp.add, wide, noise)
    out = _scale(noised, denominator)
    return _tree.tree_cast_like(out, clipped_sum if out_like is None else out_like), next_key


class NoiseState(NamedTuple):
    """State of :func:`add_gaussian_noise`: the PRNG key, split at every update."""

    key: jax.Array


def add_gaussian_noise(
    noise_multiplier: Any,
    max_grad_norm: Any,
    expected_batch_size: Any,
    key: Optional[jax.Array],
    *,
    loss_reduction: str = "mean",
) -> optax.GradientTransformationExtraArgs:
    """Add ``N(0, (sigma * C / m)^2)`` to every coordinate of an averaged clipped sum.

    That is noise ``sigma * C`` on the *sum*, divided like the sum by
    ``m = expected_batch_size`` (``"mean"``) or by 1 (``"sum"``). ``max_grad_norm``
    may be per-layer bounds, then ``C = sqrt(sum C_i^2)``.
    ``update(updates, state, params=None, *, noise=None, **extra)``: with ``noise``
    (a params-shaped pytree of noise on the sum scale, drawn on the host; see the
    module docstring) that noise is used instead of the key's. The noise is drawn and
    added in float32 or wider; the result has the dtypes of ``updates``.

    Args:
        noise_multiplier: ``sigma >= 0``.
        max_grad_norm: The clipping bound(s) used before this transformation.
        expected_batch_size: ``int(N * q) >= 1``.
        key: A JAX PRNG key (secret; never reuse it for another run), or ``None``
            (key-free: ``noise=`` is then required).
        loss_reduction: ``"mean"`` or ``"sum"``.

    Returns:
        The transformation; its state is a :class:`NoiseState`.
    """
    std, denominator = _noise_settings(noise_multiplier, max_grad_norm, expected_batch_size,
                                       loss_reduction, None)

    def init_fn(params: PyTree) -> NoiseState:
        del params
        return NoiseState(key=key)

    def update_fn(updates, state, params=None, *, noise=None, **extra):
        del params, extra
        wide = _tree.tree_wide(updates)
        scaled, next_key = _noise_and_scale(_tree.tree_zeros_like(wide), state.key, std,
                                            denominator, noise)
        out = jax.tree_util.tree_map(jnp.add, wide, scaled)
        return _tree.tree_cast_like(out, updates), NoiseState(next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
