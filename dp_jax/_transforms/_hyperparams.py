"""Read the injected noise multiplier and clipping bound back from an optimizer state."""

from __future__ import annotations

from typing import Any

import optax

from dp_jax._transforms._adaptive import AdaptiveClipState, DPAccumulateAdaptiveState
from dp_jax._types import PyTree


def _find_states(tree: PyTree, kinds: tuple[type, ...]) -> list[Any]:
    if isinstance(tree, kinds):
        return [tree]
    found = []
    if isinstance(tree, (tuple, list)):
        for sub in tree:
            found.extend(_find_states(sub, kinds))
    elif isinstance(tree, dict):
        for sub in tree.values():
            found.extend(_find_states(sub, kinds))
    return found


def current_hyperparams(opt_state: PyTree) -> dict[str, Any]:
    """Read ``noise_multiplier`` and ``max_grad_norm`` from an optimizer state.

    Looks for an ``optax.inject_hyperparams`` state (anywhere in ``opt_state``)
    whose ``hyperparams`` hold them; a bound not injected there is taken from an
    :class:`AdaptiveClipState` or :class:`DPAccumulateAdaptiveState` (its current
    bound) when there is one.

    Args:
        opt_state: The state returned by ``init`` / ``update``.

    Returns:
        A dict with ``"noise_multiplier"`` and, when found, ``"max_grad_norm"``
        (scalar arrays; ``float()`` them on the host to record them in the accountant).

    Raises:
        ValueError: If no injected ``noise_multiplier`` is found.
    """
    kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    out: dict[str, Any] = {}
    for state in _find_states(opt_state, kinds):
        for name in ("noise_multiplier", "max_grad_norm"):
            if name in state.hyperparams and name not in out:
                out[name] = state.hyperparams[name]
    if "max_grad_norm" not in out:
        adaptive = _find_states(opt_state, (AdaptiveClipState, DPAccumulateAdaptiveState))
        if adaptive:
            out["max_grad_norm"] = adaptive[0].max_grad_norm
    if "noise_multiplier" not in out:
        raise ValueError(
            "opt_state holds no injected noise_multiplier; build the optimizer with "
            "optax.inject_hyperparams(dp_sgd, static_args=('key', 'expected_batch_size'))(...)."
        )
    return out
