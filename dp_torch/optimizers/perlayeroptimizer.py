"""``DPPerLayerOptimizer``: DP-SGD with one clipping bound per parameter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch.optim import Optimizer

from dp_torch.optimizers.optimizer import ClipFactors, DPOptimizer, _clip_factor
from dp_torch.optimizers.utils import params as _trainable_params
from dpcore import clipping as core_clipping

__all__ = ["DPPerLayerOptimizer"]


class DPPerLayerOptimizer(DPOptimizer):
    """:class:`~dp_torch.optimizers.DPOptimizer` with per-layer (per-parameter) clipping.

    Parameter ``i`` of each example is clipped to its own bound ``C_i``
    (``max_grad_norm[i]``, in :attr:`params` order); the per-example gradient then
    has norm at most ``C = sqrt(sum_i C_i**2)``, which is the sensitivity the noise
    is scaled by (``std = noise_multiplier * C``). :attr:`max_grad_norm` is that
    combined ``C`` and is derived from :attr:`max_grad_norms`: change the list to
    change the bounds (a gradient-clipping scheduler refuses this optimizer, since
    scaling ``C`` alone would decouple noise from clipping).

    An example whose norm is non-finite in any parameter is dropped from every
    parameter's sum (dpcore's ``clip_and_sum_per_layer``).

    Arguments are those of :class:`~dp_torch.optimizers.DPOptimizer` except
    ``max_grad_norm``: one bound ``C_i > 0`` per trainable parameter.
    """

    def _noise_bound(self, optimizer: Optimizer, max_grad_norm: Sequence[float]) -> float:
        """Keep the bounds in :attr:`max_grad_norms`; return ``sqrt(sum_i C_i**2)``.

        Raises:
            ValueError: If the number of bounds differs from the number of
                trainable parameters, or any bound is invalid.
        """
        combined = core_clipping.per_layer_noise_norm(max_grad_norm)  # validates the list
        n_params = len(_trainable_params(optimizer))
        if len(max_grad_norm) != n_params:
            raise ValueError(
                f"max_grad_norm has {len(max_grad_norm)} bounds but the optimizer has "
                f"{n_params} trainable parameters; pass one bound per parameter."
            )
        self.max_grad_norms = [float(c) for c in max_grad_norm]
        return combined

    @property
    def max_grad_norm(self) -> float:
        """The noise sensitivity ``sqrt(sum_i C_i**2)`` (read-only; set ``max_grad_norms``)."""
        return core_clipping.per_layer_noise_norm(self.max_grad_norms)

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        if not math.isclose(float(value), self.max_grad_norm, rel_tol=1e-12):
            raise ValueError(
                f"max_grad_norm of a DPPerLayerOptimizer is sqrt(sum C_i**2) = "
                f"{self.max_grad_norm!r} and cannot be set to {value!r}; change "
                "max_grad_norms (one bound per parameter) instead."
            )

    def _clip_factors(self, flats: Sequence[Optional[torch.Tensor]], batch: int) -> ClipFactors:
        """One factor per (example, parameter) from that parameter's own norm and bound."""
        if len(self.max_grad_norms) != len(flats):
            raise ValueError(
                f"max_grad_norms has {len(self.max_grad_norms)} entries but there are "
                f"{len(flats)} trainable parameters."
            )
        present = [g for g in flats if g is not None]
        if not present:
            return [None] * len(flats), torch.ones(0, dtype=torch.bool)
        device = present[0].device
        norms = [None if g is None else self._example_norms(g, batch).to(device) for g in flats]
        keep = torch.stack([torch.isfinite(n) for n in norms if n is not None]).all(dim=0)
        factors = [
            None if n is None else torch.where(keep, _clip_factor(n, c), torch.zeros_like(n))
            for n, c in zip(norms, self.max_grad_norms)
        ]
        return factors, keep
