"""DP optimizers: wrappers that turn any ``torch.optim.Optimizer`` into DP-SGD.

Mirrors ``opacus.optimizers``: :class:`DPOptimizer` (flat clipping),
:class:`DPPerLayerOptimizer` (one bound per parameter), :class:`AdaClipDPOptimizer`
(adaptive clipping), :class:`DPOptimizerFastGradientClipping` (ghost clipping),
and :func:`get_optimizer_class`, which picks one from Opacus-style options.
"""

from __future__ import annotations

from typing import Optional

from dp_torch.optimizers.adaclipoptimizer import AdaClipDPOptimizer
from dp_torch.optimizers.optimizer import DPOptimizer
from dp_torch.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from dp_torch.optimizers.perlayeroptimizer import DPPerLayerOptimizer

__all__ = [
    "AdaClipDPOptimizer",
    "DPOptimizer",
    "DPOptimizerFastGradientClipping",
    "DPPerLayerOptimizer",
    "get_optimizer_class",
]

_DISTRIBUTED_NOT_YET = (
    "distributed=True: the distributed DP optimizers (DistributedDPOptimizer, "
    "SimpleDistributedPerLayerOptimizer, DistributedDPOptimizerFastGradientClipping) are "
    "not implemented yet; they will live with dp_torch.distributed. Use distributed=False."
)


def get_optimizer_class(
    clipping: str, distributed: bool, grad_sample_mode: Optional[str] = None
) -> type[DPOptimizer]:
    """The DP optimizer class for Opacus-style options (same combinations as Opacus).

    Args:
        clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"``.
        distributed: Whether training is data-parallel across processes.
        grad_sample_mode: How per-sample gradients are computed (``"hooks"``,
            ``"functorch"``, ``"ew"``, ``"ghost"``, ...); only ``"ghost"`` changes
            the choice.

    Returns:
        ``DPOptimizerFastGradientClipping`` for ghost mode with flat clipping,
        else ``DPOptimizer``, ``DPPerLayerOptimizer`` or ``AdaClipDPOptimizer``.

    Raises:
        ValueError: For an unsupported combination (ghost mode needs flat
            clipping; ``"ghost_fsdp"`` and every ``distributed=True`` optimizer are
            not implemented yet).
    """
    if clipping not in ("flat", "per_layer", "adaptive"):
        raise ValueError(
            f'clipping must be "flat", "per_layer" or "adaptive", got {clipping!r}.'
        )
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {distributed!r}.")
    if grad_sample_mode in ("ghost", "ghost_fsdp"):
        if clipping != "flat" or grad_sample_mode == "ghost_fsdp":
            raise ValueError(
                f"Unsupported combination of parameters: clipping={clipping!r}, "
                f"distributed={distributed!r}, grad_sample_mode={grad_sample_mode!r}; ghost "
                'clipping supports only clipping="flat" (and FSDP is not supported).'
            )
        if distributed:
            raise ValueError(_DISTRIBUTED_NOT_YET)
        return DPOptimizerFastGradientClipping
    if distributed:
        raise ValueError(_DISTRIBUTED_NOT_YET)
    return {
        "flat": DPOptimizer,
        "per_layer": DPPerLayerOptimizer,
        "adaptive": AdaClipDPOptimizer,
    }[clipping]
