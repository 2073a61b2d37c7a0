"""Noise spec, the reference noise rule, and seeded and secure Gaussian sources.

Rule (docs/design.md, Semantics): once per logical step, add ``N(0, (sigma * C)**2)`` to
each coordinate of the *sum* of clipped per-example gradients, where ``sigma``
is the noise multiplier and ``C`` the clipping norm (``sqrt(sum C_i**2)`` for
per-layer clipping).

:class:`NoiseSource` is the shared noise generator that lets both backends add
bit-identical noise (the "reproducibility mode"): both draw float64 noise from
the same seeded source, in the same order (parameter order, C order within a
parameter), and cast it to the parameter's dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import special

from dpcore.checks import check_noise_multiplier, check_pcg64_state, check_positive

__all__ = [
    "NoiseSource",
    "NoiseSpec",
    "gaussian_noise_like",
    "noise_std",
]

_STATE_VERSION = 1
_TWO_POW_MINUS_53 = 1.0 / 9007199254740992.0  # 2**-53


def noise_std(noise_multiplier: float, max_grad_norm: float) -> float:
    """Standard deviation of the noise added to the clipped sum: ``sigma * C``.

    Args:
        noise_multiplier: ``sigma >= 0``.
        max_grad_norm: ``C > 0`` (for per-layer clipping pass ``sqrt(sum C_i**2)``).

    Returns:
        ``sigma * C``.
    """
    return check_noise_multiplier(noise_multiplier) * check_positive(max_grad_norm, "max_grad_norm")


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
    """The public noise parameters of DP-SGD.

    Attributes:
        noise_multiplier: ``sigma >= 0`` (the accounted multiplier).
        max_grad_norm: Sensitivity ``C > 0`` of the clipped sum.
    """

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(
            self, "max_grad_norm", check_positive(self.max_grad_norm, "max_grad_norm")
        )

    @property
    def std(self) -> float:
        """``noise_multiplier * max_grad_norm``."""
        return self.noise_multiplier * self.max_grad_norm


def _check_shape(shape: Any) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}.") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
            raise ValueError(f"shape must contain non-negative ints, got {shape!r}.")
    return tuple(int(d) for d in dims)


def _check_std(std: Any) -> float:
    if isinstance(std, bool) or not isinstance(std, numbers.Real):
        raise TypeError(f"std must be a real number >= 0, got {std!r}.")
    x = float(std)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}; use noise_std(sigma, C).")
    return x


def _os_words(n: int) -> np.ndarray:
    """``n`` independent uniformly random 64-bit words from the OS entropy pool."""
    return np.frombuffer(secrets.token_bytes(8 * n), dtype="<u8")


def _secure_standard_normal(n: int) -> np.ndarray:
    """One standard normal per 64 OS-entropy bits, by inversion of the CDF.

    Bit 0 is the sign; the next 52 bits ``k`` give ``u = (k + 1/2) 2**-53`` in
    ``(0, 1/2)``, and ``|z| = -ndtri(u)``. The lower half of the inverse CDF is
    accurate to a few ulp; the construction is exactly symmetric and never
    produces an infinity (``|z| <= 8.29``).
    """
    words = _os_words(n)
    sign = np.where((words & np.uint64(1)) == 1, -1.0, 1.0)
    k = (words >> np.uint64(12)).astype(np.float64)
    u = (k + 0.5) * _TWO_POW_MINUS_53
    return sign * -special.ndtri(u)


class NoiseSource:
    """Gaussian noise, seeded (reproducible) or from OS entropy (secure).

    Seeded mode: ``normal(shape, std)`` is
    ``std * np.random.Generator(np.random.PCG64(seed)).standard_normal(shape)``,
    continuing one stream, so two backends that share a ``NoiseSource`` (or two
    sources with the same seed called in the same order) add bit-identical float64
    noise. The stream is fixed for a given numpy version (numpy may change its normal
    sampler between versions; the Poisson sampling plan does not depend on this).

    Secure mode (``secure_mode=True``, no seed): every output is
    ``std * (z_1 + ... + z_k) / sqrt(k)`` with ``k = SECURE_NUM_DRAWS = 4``
    independent standard normals ``z_j`` produced by inverting the normal CDF at
    uniforms built from OS entropy (:func:`secrets.token_bytes`).

    Guarantee and limits of the hardening. Naive floating-point Gaussian samplers
    produce a sparse, invertible set of outputs: from a released value
    ``x + noise`` an attacker can test which candidate ``x`` makes the implied
    noise reachable, breaking DP (Mironov 2012 for the Laplace case; Jin et al.
    2022 against Opacus; Holohan and Braghin 2021). With ``k`` summed draws each
    released value is reachable from about ``2**(53 (k - 1))`` combinations of
    draws, so the membership test becomes computationally infeasible for ``k = 4``
    (the same idea
    as Opacus' secure mode, which sums four draws and divides by two; Holohan and
    Braghin, section 5.1). This is a computational defence, not a proof of DP for
    floating-point arithmetic: each ``z_j`` is quantised (its uniform has 53 bits),
    so each draw stops at ``|z_j| <= 8.29`` and the output at
    ``8.29 * sqrt(k) = 16.6`` standard deviations (a tail mass below ``2**-53`` per
    draw is missing); rounding when the noise is added to a float32 gradient is not
    addressed (precision-based attacks on the final addition remain possible in
    principle); and timing side channels are out of scope. An exactly private
    alternative would be a discrete Gaussian sampler (Canonne, Kamath and Steinke
    2020), which is not implemented.

    Args:
        seed: Non-negative integer for a reproducible stream; ``None`` seeds from
            fresh entropy (unpredictable, but not hardened).
        secure_mode: Use the hardened OS-entropy sampler; refuses a seed.

    Raises:
        ValueError: If a seed is given with ``secure_mode=True``.
    """

    SECURE_NUM_DRAWS = 4

    def __init__(self, seed: int | None = None, secure_mode: bool = False) -> None:
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool, got {secure_mode!r}.")
        if seed is not None and secure_mode:
            raise ValueError(
                f"seed={seed!r} was given with secure_mode=True; secure noise comes from OS "
                f"entropy and cannot be seeded. Pass seed=None, or secure_mode=False for "
                f"reproducible (not secure) noise."
            )
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0
        ):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}.")
        self.seed = None if seed is None else int(seed)
        self.secure_mode = secure_mode
        self._rng = None if secure_mode else np.random.Generator(np.random.PCG64(self.seed))

    def normal(self, shape: int | Sequence[int], std: float) -> np.ndarray:
        """Draw float64 noise of the given shape with mean 0 and standard deviation ``std``.

        A draw is made even when ``std == 0`` so the stream position does not depend on it.

        Args:
            shape: Output shape.
            std: Standard deviation ``>= 0``.

        Returns:
            A float64 array.
        """
        dims = _check_shape(shape)
        s = _check_std(std)
        if self._rng is not None:
            return self._rng.standard_normal(dims) * s
        k = self.SECURE_NUM_DRAWS
        size = math.prod(dims)
        total = np.zeros(size, dtype=np.float64)
        for _ in range(k):
            total += _secure_standard_normal(size)
        return (total * (s / math.sqrt(k))).reshape(dims)

    def state_dict(self) -> dict[str, Any]:
        """The stream position as a JSON-serialisable dict (no state in secure mode)."""
        return {
            "version": _STATE_VERSION,
            "secure_mode": self.secure_mode,
            "bit_generator_state": None
            if self._rng is None
            else copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume the stream from :meth:`state_dict`; validated before any change.

        Raises:
            ValueError: If the dict is malformed or mixes secure and seeded modes (a
                secure source never takes a seeded state: it would become predictable).
        """
        if not isinstance(state_dict, Mapping) or "secure_mode" not in state_dict:
            raise ValueError(
                f"state_dict must come from NoiseSource.state_dict(), got {state_dict!r}."
            )
        if state_dict["secure_mode"] != self.secure_mode:
            raise ValueError(
                f"state_dict has secure_mode={state_dict['secure_mode']!r} but this source has "
                f"secure_mode={self.secure_mode!r}; create the source with the same mode."
            )
        if self._rng is None:
            return
        self._rng.bit_generator.state = check_pcg64_state(state_dict.get("bit_generator_state"))


def gaussian_noise_like(
    arrays: Sequence[Any], std: float, source: NoiseSource
) -> list[np.ndarray]:
    """One float64 noise array per input array, drawn in list order from ``source``.

    Args:
        arrays: Arrays (or anything with a ``shape``) giving the shapes.
        std: Standard deviation (see :func:`noise_std`).
        source: The :class:`NoiseSource` to draw from.

    Returns:
        A list of float64 arrays with the same shapes.
    """
    if not isinstance(source, NoiseSource):
        raise TypeError(f"source must be a NoiseSource, got {type(source).__name__}.")
    s = _check_std(std)
    shapes = [tuple(a.shape) if hasattr(a, "shape") else np.shape(a) for a in arrays]
    return [source.normal(shape, s) for shape in shapes]
