"""Ghost clipping for FSDP2 models (Opacus' ``grad_sample_mode="ghost_fsdp"``).

A ``fully_shard``-ed model keeps its parameters sharded across ranks and gathers each
FSDP unit's parameters around the unit's forward and backward. Every rank runs the whole
model on its own examples, so each example's gradient (and its norm) is formed on the
rank that holds the example, from the gathered parameters: no per-example quantity
ever needs another rank. One ghost step on a rank:

1. the norm pass: ``torch.autograd.grad`` of the loss with respect to the hooked layer
   outputs only (no parameter gradient, so FSDP reduces nothing), during which the hooks
   compute each example's squared gradient norm per layer, stored on the *sharded*
   parameter the layer's gathered parameter stands for;
2. the clip factors ``c_i = min(1, C / (norm_i + 1e-6))``;
3. the clipped pass: backward of ``sum_i c_i * loss_i`` over the same graph. Autograd
   forms each layer's clipped sum ``sum_i c_i grad_i`` for the rank's examples and FSDP
   reduce-scatters it, summed (not averaged: the divide factor is set to 1) over the
   ranks, into the sharded ``p.grad``.

Unlike single-device ghost clipping (book-keeping, one backward pass), the clipped sum
comes from a second backward pass here: it lets FSDP reduce-scatter each unit's sum as
soon as it exists, so no rank ever holds a full-size gradient of the whole model.
The optimizer (:class:`~dp_torch.optimizers.FSDPOptimizerFastGradientClipping`) then adds
the noise to each shard.

Guarantee: after both passes, every rank's sharded ``p.grad`` is the shard of
``sum over all ranks' examples of c_i grad_i``, the quantity single-process ghost
clipping leaves in ``p.grad`` for the union of the batches. A collective that fails in
either pass (a peer crashed) raises :class:`~dp_torch.distributed.DistributedStepError`
with every ``p.grad`` of the model cleared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from dp_torch.distributed import DistributedStepError

from . import _fsdp, _registry
from .grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)

__all__ = [
    "GradSampleHooksFastGradientClippingFSDP",
    "GradSampleModuleFastGradientClippingFSDP",
    "check_fsdp_model",
]


def check_fsdp_model(model: nn.Module) -> None:
    """Raise unless ``model`` can be trained with ``grad_sample_mode="ghost_fsdp"``.

    Args:
        model: The model.

    Raises:
        ValueError: If no module of ``model`` was passed to ``fully_shard``, or some
            trainable parameter is not managed by one (its gradient would stay local).
    """
    if not _fsdp.is_fsdp_model(model):
        raise ValueError(
            f"grad_sample_mode='ghost_fsdp' needs a model sharded with FSDP2, got a plain "
            f"{type(model).__name__}; shard it first with dp_torch.utils.fsdp_utils.FSDP2Wrapper(model) "
            "or torch.distributed.fsdp.fully_shard, or use grad_sample_mode='ghost'."
        )
    unmanaged = _fsdp.unmanaged_trainable(model)
    if unmanaged:
        raise ValueError(
            f"Trainable parameters {unmanaged[:5]}{' ...' if len(unmanaged) > 5 else ''} are not "
            "managed by fully_shard: FSDP would not sum their gradients over the ranks. Call "
            "fully_shard on the root module too (FSDP2Wrapper does), or freeze them."
        )


def _check_layers(hooks: GradSampleHooksFastGradientClipping) -> None:
    """Every hooked layer needs a norm or grad sampler: the ``torch.func`` fallback re-runs a
    layer with its registered parameters, which are shards under FSDP."""
    for layer in hooks._owned:
        known = (_registry.find_sampler(hooks.NORM_SAMPLERS, layer) is not None
                 or _registry.find_sampler(hooks.GRAD_SAMPLERS, layer) is not None)
        if hooks.force_functorch or not known:
            name = hooks._module_names.get(layer, type(layer).__name__)
            raise NotImplementedError(
                f"Layer {name} ({type(layer).__name__}) has no registered norm or grad sampler; "
                "under FSDP its per-example gradients cannot come from the torch.func fallback "
                "(it would run on parameter shards). Register a sampler with "
                "dp_torch.grad_sample.register_norm_sampler / register_grad_sampler, or freeze it."
            )


def _raised_by_collective(err: BaseException) -> bool:
    """Whether ``err`` came out of a ``torch.distributed`` collective (gloo raises a plain
    ``RuntimeError`` for a dead peer, NCCL a ``DistBackendError``)."""
    if isinstance(err, torch.distributed.DistBackendError):
        return True
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith("distributed_c10d.py"):
            return True
        tb = tb.tb_next
    return False


class _NothingKept:
    """The clipped-sum store of FSDP ghost mode: the clipped pass needs nothing kept."""

    def __bool__(self) -> bool:
        return False

    def keep_call(self, record: Any, activations: Any, backprops: torch.Tensor) -> None:
        """Drop the call (the clipped pass recomputes its contribution)."""

    def keep_samples(self, p: torch.Tensor, grad_sample: torch.Tensor) -> None:
        """Drop the per-example gradients (only their norms were needed)."""

    def clear(self) -> None:
        """Nothing to clear."""


class _FSDPGhost:
    """The FSDP2 parts shared by the hooks and the wrapper variants (a mixin)."""

    def _fsdp_setup(self, m: nn.Module) -> None:
        check_fsdp_model(m)
        _check_layers(self)
        self._kept = _NothingKept()
        self._aliases: dict[int, nn.Parameter] = {}
        for module in _fsdp.fsdp_modules(m):
            # FSDP sums the clipped sums over the ranks (the optimizer averages, once): divide
            # factor 1 and a plain SUM (a pre-multiplied sum is not available on every backend)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)

    def _current_aliases(self) -> dict[int, nn.Parameter]:
        self._aliases = _fsdp.unsharded_aliases(self._module)
        return self._aliases

    def _tracker_aliases(self) -> Any:
        return self._current_aliases

    def _registered_keys(self, per_param: dict) -> dict:
        """Key a sampler's output by the sharded parameters; a gathered parameter that maps to
        none raises (its norm would otherwise be dropped)."""
        out = {}
        for p, value in per_param.items():
            registered = self._aliases.get(id(p))
            if registered is None:
                registered = self._current_aliases().get(id(p))
            if registered is None and not _fsdp.is_sharded(p):
                raise RuntimeError(
                    f"A sampler returned a value for a parameter of shape {tuple(p.shape)} that "
                    "FSDP does not manage; every trainable parameter must be sharded by fully_shard."
                )
            out[registered if registered is not None else p] = value
        return out

    def add_clipped_sum(self, coef: torch.Tensor) -> None:
        """Not available under FSDP: the clipped sum comes from :meth:`clipped_backward`."""
        raise NotImplementedError(
            "Under FSDP the clipped sum is formed by a second backward pass: call "
            "clipped_backward(loss_per_sample, coef) (DPLossFastGradientClipping does)."
        )

    def clipped_backward(self, loss_per_sample: torch.Tensor, coef: torch.Tensor, scale: float = 1.0) -> None:
        """Backward of ``scale * sum_i coef[i] * loss_i`` with the hooks off; FSDP sums the result
        over the ranks into the sharded ``p.grad``.

        Args:
            loss_per_sample: The per-example losses ``[B]`` of the norm pass (graph retained).
            coef: The clip factors ``[B]``.
            scale: A loss scale (``GradScaler``), 1 without one.
        """
        weights = coef.detach().to(loss_per_sample.dtype) * scale
        # a dropped example (factor 0) may have a non-finite loss: 0 * inf must not reach the sum
        kept = torch.where(weights == 0, torch.zeros_like(loss_per_sample), loss_per_sample * weights)
        self.disable_hooks()
        try:
            kept.sum().backward()
        finally:
            self.enable_hooks()

    @contextlib.contextmanager
    def collective_guard(self) -> Iterator[None]:
        """Turn a failed FSDP collective into :class:`DistributedStepError`, clearing ``p.grad``."""
        try:
            yield
        except RuntimeError as err:
            if not _raised_by_collective(err):
                raise
            for p in self._module.parameters():
                p.grad = None
            self._discard_pending()
            raise DistributedStepError(
                f"An FSDP collective (all-gather or reduce-scatter) failed during the DP step "
                f"({type(err).__name__}: {str(err).strip()[:300]}). Usually a peer process crashed "
                "or did not reach this step within the process group's timeout. Nothing was applied: "
                "the gradients were cleared, and parameters, optimizer state and the privacy "
                "accountant are unchanged. Restart all ranks, e.g. from the last checkpoint."
            ) from err


class GradSampleHooksFastGradientClippingFSDP(_FSDPGhost, GradSampleHooksFastGradientClipping):
    """Ghost-clipping hooks on a ``fully_shard``-ed model (see the module docstring).

    Arguments are those of :class:`GradSampleHooksFastGradientClipping`; ``m`` must be
    sharded with FSDP2 (``fully_shard`` on the root and on the units inside it).
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = True, max_grad_norm: float = 1.0, force_functorch: bool = False,
                 use_ghost_clipping: bool = True):
        """Attach the hooks and set every FSDP unit to sum (not average) over ranks.

        Raises:
            ValueError: See :func:`check_fsdp_model`.
            NotImplementedError: For a trainable layer without a registered sampler.
        """
        GradSampleHooksFastGradientClipping.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
            force_functorch=force_functorch, max_grad_norm=max_grad_norm,
            use_ghost_clipping=use_ghost_clipping,
        )
        try:
            self._fsdp_setup(m)
        except BaseException:
            self.remove_hooks()
            raise


class GradSampleModuleFastGradientClippingFSDP(_FSDPGhost, GradSampleModuleFastGradientClipping):
    """``nn.Module`` wrapper for ghost clipping of a ``fully_shard``-ed model (Opacus' name).

    Example:
        >>> model = FSDP2Wrapper(model)            # dp_torch.utils.fsdp_utils
        >>> model, optimizer, criterion, loader = PrivacyEngine().make_private(
        ...     module=model, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
        ...     noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost_fsdp")
        >>> criterion(model(x), y).backward()      # norm pass + clipped pass
        >>> optimizer.step()
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = True, force_functorch: bool = False, max_grad_norm: float = 1.0,
                 use_ghost_clipping: bool = True):
        """Wrap ``m``; arguments as :class:`GradSampleModuleFastGradientClipping`.

        Raises:
            ValueError: See :func:`check_fsdp_model`.
            NotImplementedError: For a trainable layer without a registered sampler.
        """
        GradSampleModuleFastGradientClipping.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
            force_functorch=force_functorch, max_grad_norm=max_grad_norm,
            use_ghost_clipping=use_ghost_clipping,
        )
        try:
            self._fsdp_setup(m)
        except BaseException:
            self.cleanup()
            raise

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model (a failed all-gather raises ``DistributedStepError``)."""
        with self.collective_guard():
            return self._module(*args, **kwargs)
