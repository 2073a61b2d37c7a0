"""DP optimizers: wrappers that turn any ``torch.optim.Optimizer`` into DP-SGD.

Mirrors ``opacus.optimizers``: :class:`DPOptimizer` (flat clipping),
:class:`DPPerLayerOptimizer` (one bound per parameter), :class:`AdaClipDPOptimizer`
(adaptive clipping), :class:`DPOptimizerFastGradientClipping` (ghost clipping),
their data-parallel variants :class:`DistributedDPOptimizer`,
:class:`SimpleDistributedPerLayerOptimizer` (alias :class:`DistributedPerLayerOptimizer`)
and :class:`DistributedDPOptimizerFastGradientClipping`, the FSDP2 ghost optimizer
:class:`FSDPOptimizerFastGradientClipping`, and
:func:`get_optimizer_class`, which picks one from Opacus-style options.
"""

from __future__ import annotations

from typing import Optional

from dp_torch.optimizers.adaclipoptimizer import AdaClipDPOptimizer
from dp_torch.optimizers.ddp_perlayeroptimizer import DistributedPerLayerOptimizer
from dp_torch.optimizers.ddp_perlayeroptimizer import SimpleDistributedPerLayerOptimizer
from dp_torch.optimizers.ddpoptimizer import DistributedDPOptimizer
from dp_torch.optimizers.ddpoptimizer_fast_gradient_clipping import (
    DistributedDPOptimizerFastGradientClipping,
)
from dp_torch.optimizers.fsdpoptimizer_fast_gradient_clipping import FSDPOptimizerFastGradientClipping
from dp_torch.optimizers.optimizer import DPOptimizer
from dp_torch.optimizers.optimizer import LossScaleError
from dp_torch.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from dp_torch.optimizers.perlayeroptimizer import DPPerLayerOptimizer

__all__ = [
    "AdaClipDPOptimizer",
    "DPOptimizer",
    "DPOptimizerFastGradientClipping",
    "DPPerLayerOptimizer",
    "DistributedDPOptimizer",
    "DistributedDPOptimizerFastGradientClipping",
    "DistributedPerLayerOptimizer",
    "FSDPOptimizerFastGradientClipping",
    "LossScaleError",
    "SimpleDistributedPerLayerOptimizer",
    "get_optimizer_class",
]


def get_optimizer_class(
    clipping: str, distributed: bool, grad_sample_mode: Optional[str] = None
) -> type[DPOptimizer]:
    """The DP optimizer class for Opacus-style options (same combinations as Opacus).

    Args:
        clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"``.
        distributed: Whether training is data-parallel across processes.
        grad_sample_mode: How per-sample gradients are computed (``"hooks"``,
            ``"functorch"``, ``"ew"``, ``"ghost"``, ``"ghost_fsdp"``, ...); only the
            ghost modes change the choice.

    Returns:
        For ``distributed=False``: ``DPOptimizerFastGradientClipping`` (ghost mode,
        flat clipping), else ``DPOptimizer``, ``DPPerLayerOptimizer`` or
        ``AdaClipDPOptimizer``. For ``distributed=True``:
        ``DistributedDPOptimizerFastGradientClipping``, ``DistributedDPOptimizer``
        or ``SimpleDistributedPerLayerOptimizer``; ``FSDPOptimizerFastGradientClipping``
        for ``"ghost_fsdp"``.

    Raises:
        ValueError: For an unsupported combination: ghost modes need flat
            clipping, ``"ghost_fsdp"`` needs ``distributed=True``, and adaptive clipping is
            not available with ``distributed=True`` (its noised unclipped count
            would need a distributed mechanism of its own; Opacus has none either).
    """
    if clipping not in ("flat", "per_layer", "adaptive"):
        raise ValueError(
            f'clipping must be "flat", "per_layer" or "adaptive", got {clipping!r}.'
        )
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {distributed!r}.")
    if grad_sample_mode in ("ghost", "ghost_fsdp"):
        if clipping != "flat" or (grad_sample_mode == "ghost_fsdp" and not distributed):
            raise ValueError(
                f"Unsupported combination of parameters: clipping={clipping!r}, "
                f"distributed={distributed!r}, grad_sample_mode={grad_sample_mode!r}; ghost "
                'clipping supports only clipping="flat", and "ghost_fsdp" needs distributed=True.'
            )
        if grad_sample_mode == "ghost_fsdp":
            return FSDPOptimizerFastGradientClipping
        if distributed:
            return DistributedDPOptimizerFastGradientClipping
        return DPOptimizerFastGradientClipping
    if distributed:
        if clipping == "adaptive":
            raise ValueError(
                'Unsupported combination of parameters: clipping="adaptive" with '
                "distributed=True (the adaptive bound's noised unclipped count has no "
                'distributed implementation); use clipping="flat" or "per_layer".'
            )
        return {"flat": DistributedDPOptimizer, "per_layer": SimpleDistributedPerLayerOptimizer}[
            clipping
        ]
    return {
        "flat": DPOptimizer,
        "per_layer": DPPerLayerOptimizer,
        "adaptive": AdaClipDPOptimizer,
    }[clipping]
