"""Clipping specs (flat, per-layer, adaptive) and the numpy reference math.

Semantics (docs/design.md):

* per-example norm: the L2 norm over *all* trainable parameters of one
  example's gradient;
* clip factor: ``min(1, C / (norm + 1e-6))``; a non-finite norm gives factor 0
  (the example is dropped, never propagated) and is counted;
* per-layer clipping: parameter ``i`` is clipped to its own ``C_i`` and the
  noise uses ``C = sqrt(sum_i C_i**2)``;
* averaging: ``"mean"`` divides by the expected batch size, ``"sum"`` by 1.

The functions here compute in float64 and are the oracle the backends' tests
compare against. Per-example gradients are given as a sequence of arrays, one
per parameter, whose first axis is the example.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Optional, Union

import numpy as np

from dpcore.checks import check_noise_multiplier, check_positive, check_probability

__all__ = [
    "ADAPTIVE_OPTIONS",
    "CLIP_EPSILON",
    "AdaptiveClipping",
    "ClippingSpec",
    "FlatClipping",
    "PerLayerClipping",
    "adaptive_clip_update",
    "adaptive_noise_multipliers",
    "check_adaptive_options",
    "averaging_denominator",
    "clip_and_sum",
    "clip_and_sum_per_layer",
    "clip_factor",
    "clipping_spec",
    "count_nonfinite",
    "count_unclipped",
    "per_example_norms",
    "per_layer_noise_norm",
]

#: The constant added to the norm in the clip factor (as in Opacus).
CLIP_EPSILON = 1e-6

#: The options of adaptive clipping besides the initial bound (Opacus' AdaClipDPOptimizer's).
ADAPTIVE_OPTIONS = (
    "target_unclipped_quantile",
    "clipbound_learning_rate",
    "max_clipbound",
    "min_clipbound",
    "unclipped_num_std",
)


# --------------------------------------------------------------------------- reference math


def _norm_array(norms: Any) -> np.ndarray:
    arr = np.asarray(norms, dtype=np.float64)
    if np.any(arr[np.isfinite(arr)] < 0):
        raise ValueError(f"norms must be >= 0 (or non-finite), got a negative value in {norms!r}.")
    return arr


def clip_factor(norms: Any, max_grad_norm: float) -> np.ndarray:
    """Per-example clip factor ``min(1, C / (norm + 1e-6))``; non-finite norm gives 0.

    Args:
        norms: Per-example norms (any shape), ``>= 0``; ``nan``/``inf`` allowed.
        max_grad_norm: The clipping bound ``C > 0``.

    Returns:
        float64 array of factors in ``[0, 1]``, same shape as ``norms``.
    """
    c = check_positive(max_grad_norm, "max_grad_norm")
    arr = _norm_array(norms)
    finite = np.isfinite(arr)
    safe = np.where(finite, arr, 0.0)
    return np.where(finite, np.minimum(1.0, c / (safe + CLIP_EPSILON)), 0.0)


def count_nonfinite(norms: Any) -> int:
    """Number of non-finite (``nan`` or ``inf``) entries of ``norms``."""
    return int(np.count_nonzero(~np.isfinite(np.asarray(norms, dtype=np.float64))))


def count_unclipped(norms: Any, max_grad_norm: float) -> int:
    """Number of examples with a finite norm ``<= C`` (Andrew et al.'s ``b_i = 1``).

    This is the raw count that adaptive clipping privatises (see
    :func:`adaptive_clip_update`). Opacus' AdaClip counts ``clip factor >= 1``
    instead, i.e. ``norm <= C - 1e-6``; the two differ only on ``(C - 1e-6, C]``.
    """
    c = check_positive(max_grad_norm, "max_grad_norm")
    arr = _norm_array(norms)
    return int(np.count_nonzero(np.isfinite(arr) & (arr <= c)))


def _check_grads(per_example_grads: Sequence[Any]) -> list[np.ndarray]:
    if isinstance(per_example_grads, np.ndarray) or not isinstance(per_example_grads, Sequence):
        raise TypeError(
            f"per_example_grads must be a list of arrays (one per parameter, first axis = "
            f"example), got {type(per_example_grads).__name__}."
        )
    if not per_example_grads:
        raise ValueError("per_example_grads is empty; pass one array per trainable parameter.")
    grads = [np.asarray(g) for g in per_example_grads]
    sizes = {g.shape[0] if g.ndim else None for g in grads}
    if None in sizes or len(sizes) != 1:
        shapes = [g.shape for g in grads]
        raise ValueError(
            f"every per-example gradient needs the same leading (example) axis, got shapes "
            f"{shapes}."
        )
    return grads


def _param_sq_norms(g: np.ndarray) -> np.ndarray:
    flat = g.reshape(g.shape[0], math.prod(g.shape[1:])).astype(np.float64)
    return np.einsum("ij,ij->i", flat, flat)


def per_example_norms(per_example_grads: Sequence[np.ndarray]) -> np.ndarray:
    """L2 norm of each example's gradient over all parameters (float64).

    Args:
        per_example_grads: One array per parameter, shape ``(B, *param_shape)``.

    Returns:
        Array of shape ``(B,)``. A non-finite entry gives a non-finite norm. The sum of
        squares is formed in float64, so float64 entries above ``~1e154`` overflow to
        an infinite norm (such an example is then dropped by :func:`clip_factor`).
    """
    grads = _check_grads(per_example_grads)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sqrt(sum(_param_sq_norms(g) for g in grads))


def _weighted_sum(g: np.ndarray, factors: np.ndarray) -> np.ndarray:
    g64 = g.astype(np.float64)
    keep = (factors > 0).reshape((-1,) + (1,) * (g.ndim - 1))
    g64 = np.where(keep, g64, 0.0)  # a dropped example's nan/inf must not propagate
    return np.tensordot(factors, g64, axes=(0, 0))


def clip_and_sum(per_example_grads: Sequence[np.ndarray], max_grad_norm: float) -> list[np.ndarray]:
    """Flat clipping: scale each example by its clip factor and sum over the batch.

    Args:
        per_example_grads: One array per parameter, shape ``(B, *param_shape)``.
        max_grad_norm: The clipping bound ``C``.

    Returns:
        One float64 array of shape ``param_shape`` per parameter; examples with a
        non-finite norm contribute exactly zero.
    """
    grads = _check_grads(per_example_grads)
    factors = clip_factor(per_example_norms(grads), max_grad_norm)
    return [_weighted_sum(g, factors) for g in grads]


def _check_norm_tuple(values: Any, name: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise TypeError(
            f"{name} must be a sequence of positive floats (one per parameter), got {values!r}."
        )
    if len(values) == 0:
        raise ValueError(f"{name} must contain at least one clipping bound, got {values!r}.")
    return tuple(check_positive(v, f"{name}[{i}]") for i, v in enumerate(values))


def clip_and_sum_per_layer(
    per_example_grads: Sequence[np.ndarray], max_grad_norms: Sequence[float]
) -> list[np.ndarray]:
    """Per-layer clipping: parameter ``i`` of each example is clipped to ``C_i``, then summed.

    An example with a non-finite norm in *any* parameter is dropped from every
    parameter's sum (as in flat clipping, the whole example is discarded).

    Args:
        per_example_grads: One array per parameter, shape ``(B, *param_shape)``.
        max_grad_norms: One bound ``C_i > 0`` per parameter.

    Returns:
        One float64 array of shape ``param_shape`` per parameter.
    """
    grads = _check_grads(per_example_grads)
    bounds = _check_norm_tuple(max_grad_norms, "max_grad_norms")
    if len(bounds) != len(grads):
        raise ValueError(
            f"max_grad_norms has {len(bounds)} entries but there are {len(grads)} parameters; "
            f"pass one bound per trainable parameter."
        )
    with np.errstate(over="ignore", invalid="ignore"):
        norms = [np.sqrt(_param_sq_norms(g)) for g in grads]
    all_finite = np.logical_and.reduce([np.isfinite(n) for n in norms])
    out = []
    for g, n, c in zip(grads, norms, bounds):
        factors = np.where(all_finite, clip_factor(n, c), 0.0)
        out.append(_weighted_sum(g, factors))
    return out


def per_layer_noise_norm(max_grad_norms: Sequence[float]) -> float:
    """The sensitivity of per-layer clipping: ``sqrt(sum_i C_i**2)``."""
    bounds = _check_norm_tuple(max_grad_norms, "max_grad_norms")
    return math.sqrt(math.fsum(c * c for c in bounds))


def averaging_denominator(loss_reduction: str, expected_batch_size: int) -> int:
    """What the noised gradient sum is divided by.

    Args:
        loss_reduction: ``"mean"`` or ``"sum"``.
        expected_batch_size: ``int(N * q) >= 1`` (never the realised batch size,
            which would leak it).

    Returns:
        ``expected_batch_size`` for ``"mean"``, ``1`` for ``"sum"``.
    """
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f'loss_reduction must be "mean" or "sum", got {loss_reduction!r}.')
    if isinstance(expected_batch_size, bool) or not isinstance(
        expected_batch_size, numbers.Integral
    ):
        raise TypeError(
            f"expected_batch_size must be an int >= 1, got {expected_batch_size!r}; use "
            f"dpcore.sampling.expected_batch_size(num_samples, sample_rate)."
        )
    if expected_batch_size < 1:
        raise ValueError(f"expected_batch_size must be >= 1, got {expected_batch_size!r}.")
    return int(expected_batch_size) if loss_reduction == "mean" else 1


# --------------------------------------------------------------------------- adaptive clipping


def _default_count_std(expected_batch_size: int) -> float:
    return expected_batch_size / 20.0


def adaptive_noise_multipliers(
    noise_multiplier: float, unclipped_num_std: float | None, expected_batch_size: int
) -> float:
    """Noise multiplier left for the gradient when adaptive clipping also noises a count.

    Each step releases two Gaussian mechanisms on the same Poisson batch: the
    clipped gradient sum (sensitivity ``C``, noise ``z_grad * C``) and the centred
    unclipped count ``sum_i (b_i - 1/2)`` (sensitivity ``1/2``, noise
    ``sigma_b``). Scaling each output by its noise standard deviation, one example
    moves the pair by at most ``sqrt(z_grad**-2 + (2 sigma_b)**-2)`` in L2, so the
    pair is exactly a Gaussian mechanism with multiplier ``z`` where
    ``z**-2 = z_grad**-2 + (2 sigma_b)**-2`` (Andrew et al. 2021, Theorem 1).
    Solving for the gradient part::

        z_grad = (z**-2 - (2 sigma_b)**-2) ** -0.5

    The accountant then steps with the user's ``z`` and sample rate.

    Args:
        noise_multiplier: The user's (accounted) multiplier ``z >= 0``; ``0`` gives 0.
        unclipped_num_std: ``sigma_b``, noise std on the count in count units;
            ``None`` uses Andrew et al.'s suggestion ``expected_batch_size / 20``.
        expected_batch_size: ``m >= 1``.

    Returns:
        ``z_grad``, the multiplier to use for the gradient noise (``>= z``).

    Raises:
        ValueError: If ``2 sigma_b <= z``: the count alone would already spend the
            whole budget. Increase ``unclipped_num_std`` or lower the multiplier.
    """
    z = check_noise_multiplier(noise_multiplier)
    m = averaging_denominator("mean", expected_batch_size)
    sigma_b = (
        _default_count_std(m)
        if unclipped_num_std is None
        else check_positive(unclipped_num_std, "unclipped_num_std")
    )
    if z == 0.0:
        return 0.0
    if 2.0 * sigma_b <= z:
        raise ValueError(
            f"unclipped_num_std={sigma_b!r} is too small for noise_multiplier={z!r}: the "
            f"count noise alone has effective multiplier 2 * unclipped_num_std = "
            f"{2.0 * sigma_b!r} <= {z!r}, leaving no budget for the gradient. Use "
            f"unclipped_num_std > noise_multiplier / 2 (e.g. expected_batch_size / 20 = "
            f"{_default_count_std(m)!r})."
        )
    return (z**-2 - (2.0 * sigma_b) ** -2) ** -0.5


def adaptive_clip_update(
    max_grad_norm: float,
    unclipped_count: float,
    noise_on_count: float,
    expected_batch_size: int,
    target_unclipped_quantile: float,
    learning_rate: float,
    min_clipbound: float,
    max_clipbound: float,
    *,
    batch_size: int,
) -> float:
    """One geometric update of the clipping bound (Andrew et al. 2021).

    The privatised statistic is the *centred* count
    ``s = sum_i (b_i - 1/2) = unclipped_count - batch_size / 2`` (sensitivity 1/2,
    which is what :func:`adaptive_noise_multipliers` accounts for). The noised
    fraction and the update are::

        b = clip((s + noise_on_count) / expected_batch_size + 1/2, 0, 1)
        C <- clip(C * exp(-learning_rate * (b - target_unclipped_quantile)),
                  min_clipbound, max_clipbound)

    ``batch_size`` (the realised size) only enters the statistic *before* the
    noise; it is not released. Dividing by the public expected batch size keeps
    the update a post-processing of the noised count.

    Differences from Opacus 1.6 ``AdaClipDPOptimizer``: Opacus noises the raw,
    uncentred count (sensitivity 1) yet splits the budget with ``2 * sigma_b``
    (the formula for sensitivity 1/2), under-charging the count query; it divides
    by the realised batch size, which is not privatised; and it counts
    ``clip factor >= 1`` rather than ``norm <= C``. The geometric update itself
    is the same.

    Args:
        max_grad_norm: Current bound ``C > 0``.
        unclipped_count: Number of batch examples with finite norm ``<= C``
            (see :func:`count_unclipped`).
        noise_on_count: One draw of ``N(0, sigma_b**2)``.
        expected_batch_size: ``m >= 1``.
        target_unclipped_quantile: ``gamma`` in ``[0, 1]``.
        learning_rate: ``eta >= 0``.
        min_clipbound: Lower bound on ``C``.
        max_clipbound: Upper bound on ``C``.
        batch_size: The realised batch size (``>= unclipped_count``).

    Returns:
        The new bound.
    """
    c = check_positive(max_grad_norm, "max_grad_norm")
    m = averaging_denominator("mean", expected_batch_size)
    gamma = check_probability(target_unclipped_quantile, "target_unclipped_quantile")
    eta = _check_nonnegative(learning_rate, "learning_rate")
    lo, hi = _check_bounds(min_clipbound, max_clipbound)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 0
    ):
        raise ValueError(f"batch_size must be an int >= 0 (the realised size), got {batch_size!r}.")
    count = _check_nonnegative(unclipped_count, "unclipped_count")
    if count > batch_size:
        raise ValueError(
            f"unclipped_count={unclipped_count!r} exceeds batch_size={batch_size!r}; the count "
            f"is of examples in this batch."
        )
    noise = float(noise_on_count)
    if not math.isfinite(noise):
        raise ValueError(f"noise_on_count must be finite, got {noise_on_count!r}.")
    frac = (count - batch_size / 2.0 + noise) / m + 0.5
    frac = min(1.0, max(0.0, frac))
    return min(hi, max(lo, c * math.exp(-eta * (frac - gamma))))


def _check_nonnegative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {value!r}.")
    x = float(value)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return x


def _check_bounds(min_clipbound: Any, max_clipbound: Any) -> tuple[float, float]:
    lo = check_positive(min_clipbound, "min_clipbound")
    hi = check_positive(max_clipbound, "max_clipbound")
    if lo >= hi:
        raise ValueError(
            f"min_clipbound must be < max_clipbound, got min_clipbound={min_clipbound!r}, "
            f"max_clipbound={max_clipbound!r}."
        )
    return lo, hi


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class FlatClipping:
    """Clip each example's whole gradient to ``max_grad_norm``.

    Attributes:
        max_grad_norm: The bound ``C > 0``; the noise std is ``sigma * C``.
    """

    max_grad_norm: float
    kind: ClassVar[str] = "flat"

    def __post_init__(self) -> None:
        c = check_positive(self.max_grad_norm, "max_grad_norm")
        object.__setattr__(self, "max_grad_norm", c)

    @property
    def noise_norm(self) -> float:
        """The sensitivity the noise is scaled by: ``max_grad_norm``."""
        return self.max_grad_norm


@dataclasses.dataclass(frozen=True)
class PerLayerClipping:
    """Clip parameter ``i`` of each example to ``max_grad_norms[i]``.

    Attributes:
        max_grad_norms: One bound per trainable parameter, in parameter order.
    """

    max_grad_norms: tuple[float, ...]
    kind: ClassVar[str] = "per_layer"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "max_grad_norms", _check_norm_tuple(self.max_grad_norms, "max_grad_norms")
        )

    @property
    def noise_norm(self) -> float:
        """The sensitivity ``sqrt(sum C_i**2)`` the noise is scaled by."""
        return per_layer_noise_norm(self.max_grad_norms)


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive (quantile-tracking) flat clipping, after Andrew et al. 2021.

    Each step the bound moves geometrically towards the
    ``target_unclipped_quantile`` of the per-example norms, using a noised count
    (see :func:`adaptive_clip_update`); the gradient noise multiplier is reduced so
    that gradient and count together cost exactly the user's noise multiplier
    (see :func:`adaptive_noise_multipliers`).

    Attributes:
        initial_max_grad_norm: Starting bound, within ``[min_clipbound, max_clipbound]``.
        target_unclipped_quantile: Target fraction ``gamma`` of unclipped examples.
        clipbound_learning_rate: Geometric step size ``eta >= 0``.
        max_clipbound: Upper limit of the bound.
        min_clipbound: Lower limit of the bound.
        unclipped_num_std: Std ``sigma_b`` of the count noise (count units); ``None``
            means ``expected_batch_size / 20``.
    """

    initial_max_grad_norm: float
    target_unclipped_quantile: float = 0.5
    clipbound_learning_rate: float = 0.2
    max_clipbound: float = 1e8
    min_clipbound: float = 1e-8
    unclipped_num_std: float | None = None
    kind: ClassVar[str] = "adaptive"

    def __post_init__(self) -> None:
        init = check_positive(self.initial_max_grad_norm, "initial_max_grad_norm")
        gamma = check_probability(self.target_unclipped_quantile, "target_unclipped_quantile")
        eta = _check_nonnegative(self.clipbound_learning_rate, "clipbound_learning_rate")
        lo, hi = _check_bounds(self.min_clipbound, self.max_clipbound)
        if not lo <= init <= hi:
            raise ValueError(
                f"initial_max_grad_norm={init!r} must lie in [min_clipbound, max_clipbound] = "
                f"[{lo!r}, {hi!r}]."
            )
        std = self.unclipped_num_std
        if std is not None:
            std = check_positive(std, "unclipped_num_std")
        for name, value in (
            ("initial_max_grad_norm", init),
            ("target_unclipped_quantile", gamma),
            ("clipbound_learning_rate", eta),
            ("min_clipbound", lo),
            ("max_clipbound", hi),
            ("unclipped_num_std", std),
        ):
            object.__setattr__(self, name, value)

    @property
    def max_grad_norm(self) -> float:
        """The starting bound (alias of ``initial_max_grad_norm``)."""
        return self.initial_max_grad_norm

    def count_noise_std(self, expected_batch_size: int) -> float:
        """``sigma_b``: ``unclipped_num_std`` or ``expected_batch_size / 20`` if unset."""
        m = averaging_denominator("mean", expected_batch_size)
        return _default_count_std(m) if self.unclipped_num_std is None else self.unclipped_num_std

    def gradient_noise_multiplier(self, noise_multiplier: float, expected_batch_size: int) -> float:
        """See :func:`adaptive_noise_multipliers`."""
        return adaptive_noise_multipliers(
            noise_multiplier, self.count_noise_std(expected_batch_size), expected_batch_size
        )

    def update(
        self,
        max_grad_norm: float,
        unclipped_count: float,
        noise_on_count: float,
        expected_batch_size: int,
        *,
        batch_size: int,
    ) -> float:
        """See :func:`adaptive_clip_update` (this spec's hyperparameters filled in)."""
        return adaptive_clip_update(
            max_grad_norm,
            unclipped_count,
            noise_on_count,
            expected_batch_size,
            self.target_unclipped_quantile,
            self.clipbound_learning_rate,
            self.min_clipbound,
            self.max_clipbound,
            batch_size=batch_size,
        )


ClippingSpec = Union[FlatClipping, PerLayerClipping, AdaptiveClipping]


def clipping_spec(
    kind: str | ClippingSpec,
    max_grad_norm: float | Sequence[float] | None = None,
    **kwargs: Any,
) -> ClippingSpec:
    """Convert Opacus-style string options to a clipping spec (use at the API boundary).

    Args:
        kind: ``"flat"``, ``"per_layer"`` or ``"adaptive"`` (an existing spec is
            returned unchanged when no other argument is given).
        max_grad_norm: A float for ``"flat"`` and ``"adaptive"`` (the initial bound);
            a sequence with one bound per parameter for ``"per_layer"``.
        **kwargs: For ``"adaptive"`` only: the other :class:`AdaptiveClipping` fields.

    Returns:
        The spec.
    """
    if isinstance(kind, (FlatClipping, PerLayerClipping, AdaptiveClipping)):
        if max_grad_norm is not None or kwargs:
            raise ValueError("clipping_spec(spec) takes no further arguments when given a spec.")
        return kind
    if kind not in ("flat", "per_layer", "adaptive"):
        raise ValueError(
            f'clipping must be "flat", "per_layer" or "adaptive", got {kind!r}.'
        )
    if max_grad_norm is None:
        raise ValueError(f"clipping={kind!r} needs max_grad_norm.")
    if kwargs and kind != "adaptive":
        raise TypeError(
            f"clipping={kind!r} takes only max_grad_norm; unexpected {sorted(kwargs)} "
            f'(these are options of clipping="adaptive").'
        )
    is_seq = isinstance(max_grad_norm, (Sequence, np.ndarray)) and not isinstance(
        max_grad_norm, (str, bytes)
    )
    if kind == "per_layer":
        if not is_seq:
            raise TypeError(
                f'clipping="per_layer" needs max_grad_norm as a list with one bound per '
                f"parameter, got {max_grad_norm!r}."
            )
        return PerLayerClipping(tuple(max_grad_norm))
    if is_seq:
        raise TypeError(
            f"clipping={kind!r} needs a single float max_grad_norm, got a sequence "
            f'{max_grad_norm!r}; use clipping="per_layer" for one bound per parameter.'
        )
    if kind == "flat":
        return FlatClipping(max_grad_norm)
    return AdaptiveClipping(initial_max_grad_norm=max_grad_norm, **kwargs)


def check_adaptive_options(
    options: Mapping[str, Any], clipping: str, noise_multiplier: float, max_grad_norm: Any,
    expected_batch_size: Optional[int], *, require_all: bool, batch_hint: str,
) -> None:
    """An engine's extra keyword arguments: adaptive-clipping options, only for ``"adaptive"``.

    Args:
        options: The extra keyword arguments.
        clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"``.
        noise_multiplier: The gradient noise multiplier (checked against the budget split).
        max_grad_norm: The initial bound.
        expected_batch_size: ``int(N * q)``, or ``None`` when it rounds to 0.
        require_all: Whether every option of :data:`ADAPTIVE_OPTIONS` must be given.
        batch_hint: How to get a larger expected batch, for the error message.

    Raises:
        TypeError: On an unexpected (or, with ``require_all``, missing) option.
        ValueError: On invalid values, or ``expected_batch_size`` ``None`` for ``"adaptive"``.
    """
    if clipping != "adaptive":
        if options:
            raise TypeError(
                f"make_private got unexpected keyword arguments {sorted(options)} for "
                f"clipping={clipping!r}; {list(ADAPTIVE_OPTIONS)} belong to "
                'clipping="adaptive", and no other extra argument is accepted.'
            )
        return
    unknown = sorted(set(options) - set(ADAPTIVE_OPTIONS))
    missing = [name for name in ADAPTIVE_OPTIONS if name not in options] if require_all else []
    if unknown or missing:
        which = "exactly" if require_all else "only"
        raise TypeError(
            f'clipping="adaptive" takes {which} the keyword arguments {list(ADAPTIVE_OPTIONS)}; '
            f"missing {missing}, unexpected {unknown}."
        )
    if expected_batch_size is None:
        raise ValueError(f'clipping="adaptive" needs expected_batch_size = int(N * sample_rate) >= 1; {batch_hint}')
    spec = AdaptiveClipping(initial_max_grad_norm=max_grad_norm, **options)
    spec.gradient_noise_multiplier(noise_multiplier, expected_batch_size)
