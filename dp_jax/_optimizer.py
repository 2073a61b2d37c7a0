"""The DP optimizer the engine builds: the clipped-sum accumulator gated in front of the user's.

Guarantee:
    The noise multiplier the accountant records (``noise_multiplier_of``) is the
    one the transformation adds noise with for the current state, and the bound
    the chunks are clipped with (``bound_of``) is the one it adds noise for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import _transforms
from dp_jax import _tree
from dp_jax._types import PyTree
from dpcore import clipping as core_clipping

__all__ = ["DPParts", "build_optimizer"]


def _noise_norm(max_grad_norm: Any, clipping: str, params: PyTree) -> float:
    if clipping != "per_layer":
        return float(max_grad_norm)
    bounds = max_grad_norm
    if jax.tree_util.tree_structure(max_grad_norm) == jax.tree_util.tree_structure(params):
        bounds = jax.tree_util.tree_leaves(max_grad_norm)
    return core_clipping.per_layer_noise_norm([float(b) for b in bounds])


class DPParts(NamedTuple):
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


def build_optimizer(
    *, optimizer: Any, params: PyTree, clipping: str, max_grad_norm: Any, noise_multiplier: float,
    expected_batch_size: Optional[int], loss_reduction: str, key: Optional[jax.Array],
    adaptive_kwargs: Mapping[str, Any],
) -> DPParts:
    """The clipped-sum accumulator (hyperparameters injected) gated in front of ``optimizer``."""
    m = 1 if expected_batch_size is None else expected_batch_size  # "sum" never divides
    if clipping == "adaptive":
        return _build_adaptive(optimizer, max_grad_norm, noise_multiplier, m, loss_reduction,
                               key, adaptive_kwargs)
    static = ("expected_batch_size", "key", "loss_reduction", "clipping")
    if clipping == "per_layer":  # a list or pytree of bounds cannot be injected
        static += ("max_grad_norm",)
    accumulator = _transforms.dp_accumulate_clipped_sums
    # float32 or wider whatever the parameters' dtype: optax would store the hyperparameters in
    # the parameters' dtype, and a bfloat16 noise multiplier (1.3 -> 1.296875) is not the
    # noise the accountant records.
    dp_part = optax.inject_hyperparams(accumulator, static_args=static, hyperparam_dtype=_hyper_dtype(params))(
        max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier, expected_batch_size=m,
        key=key, loss_reduction=loss_reduction, clipping=clipping,
    )

    def read_injected(opt_state: PyTree) -> float:
        value = _transforms.current_hyperparams(opt_state)["noise_multiplier"]
        return _host_float(value, requested=noise_multiplier)

    def bound_of(opt_state: PyTree) -> Any:
        if clipping == "per_layer":
            return max_grad_norm
        return opt_state.dp_state.hyperparams["max_grad_norm"]

    def noise_std_of(opt_state: PyTree) -> float:
        sigma = float(_tree.host_array(opt_state.dp_state.hyperparams["noise_multiplier"]))
        if clipping == "per_layer":
            return sigma * _noise_norm(max_grad_norm, clipping, params)
        return sigma * float(_tree.host_array(bound_of(opt_state)))

    tx = _transforms.dp_multi_steps(dp_part, optimizer)
    return DPParts(tx, read_injected, bound_of, noise_std_of, None)


def _build_adaptive(
    optimizer: Any, max_grad_norm: float, noise_multiplier: float, m: int, loss_reduction: str,
    key: Optional[jax.Array], adaptive_kwargs: Mapping[str, Any],
) -> DPParts:
    spec = core_clipping.AdaptiveClipping(initial_max_grad_norm=max_grad_norm, **adaptive_kwargs)
    dp_part = _transforms.dp_accumulate_clipped_sums_adaptive(
        noise_multiplier, spec, m, key, loss_reduction=loss_reduction
    )
    z_grad = spec.gradient_noise_multiplier(noise_multiplier, m)

    def read_fixed(opt_state: PyTree) -> float:
        del opt_state
        return noise_multiplier

    def bound_of(opt_state: PyTree) -> Any:
        return opt_state.dp_state.max_grad_norm

    def noise_std_of(opt_state: PyTree) -> float:
        return z_grad * float(_tree.host_array(bound_of(opt_state)))

    tx = _transforms.dp_multi_steps(dp_part, optimizer)
    return DPParts(tx, read_fixed, bound_of, noise_std_of, spec.count_noise_std(m))


def _hyper_dtype(params: PyTree) -> Any:
    """The widest floating dtype among ``params`` and float32: the injected hyperparameters' dtype."""
    dtype = jnp.float32
    for leaf in jax.tree_util.tree_leaves(params):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            dtype = jnp.promote_types(dtype, jnp.result_type(leaf))
    return dtype


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
