"""Ghost clipping for FSDP2 models (Opacus' ``grad_sample_mode="ghost_fsdp"``).

A ``fully_shard``-ed model keeps its parameters sharded across ranks and gathers each
FSDP unit's parameters around the unit's forward and backward. Every rank runs the whole
model on its own examples, so each example's gradient (and its norm) is formed on the
rank that holds the example, from the gathered parameters: no per-example quantity
ever needs another rank. One ghost step on a rank:

1. the norm pass (one backward pass): ``torch.autograd.grad`` of the loss with respect to
   the hooked layer outputs only (no parameter gradient, so FSDP reduces nothing), during
   which the hooks compute each example's squared gradient norm per layer, stored on the
   *sharded* parameter the layer's gathered parameter stands for, and keep each call's
   inputs and output gradients (book-keeping, as single-device ghost clipping);
2. the clip factors ``c_i = min(1, C / (norm_i + 1e-6))``;
3. the clipped sum, parameter by parameter: the rank's ``sum_i c_i grad_i`` is formed at
   full size from the kept tensors and at once reduce-scattered (summed over the ranks)
   into the parameter's shard of ``p.grad``. At most one parameter's full-size gradient
   exists at a time, and no second backward pass (nor second all-gather) is needed.

The optimizer (:class:`~dp_torch.optimizers.FSDPOptimizerFastGradientClipping`) then adds
the noise to each shard.

Guarantee: after the step's backward, every rank's sharded ``p.grad`` is the shard of
``sum over all ranks' examples of c_i grad_i``, the quantity single-process ghost
clipping leaves in ``p.grad`` for the union of the batches. A collective that fails
(a peer crashed) raises :class:`~dp_torch.distributed.DistributedStepError` with every
``p.grad`` of the model cleared. The reduce-scatters run in the same order on every rank
(the order of the model's layer calls), as FSDP's own collectives require.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from dp_torch.distributed import DistributedStepError

from . import _fsdp, _registry
from ._clipped_sum import ClippedSumStore
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


def _reduce_scatter_add(p: torch.Tensor, value: torch.Tensor) -> None:
    """Add this rank's clipped sum ``value`` (full shape) for the sharded ``p``, summed over the
    ranks, to this rank's shard of ``p.grad`` (one reduce-scatter, in ``value``'s dtype)."""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(p, DTensor):
        raise RuntimeError(
            f"The clipped sum of a parameter of shape {tuple(p.shape)} is not for an FSDP-sharded "
            "parameter; every trainable parameter must be managed by fully_shard."
        )
    mesh = p.device_mesh
    full = value.to(device=p.to_local().device).reshape(p.shape).contiguous()
    partial = DTensor.from_local(full, mesh, [Partial()] * mesh.ndim, run_check=False,
                                 shape=p.shape, stride=full.stride())
    shard = partial.redistribute(mesh, p.placements).to(p.dtype)
    if p.grad is None:
        p.grad = shard
    else:
        p.grad.add_(shard)


class _FSDPGhost:
    """The FSDP2 parts shared by the hooks and the wrapper variants (a mixin, first base)."""

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = True, force_functorch: bool = False, max_grad_norm: float = 1.0,
                 use_ghost_clipping: bool = True):
        """Attach the hooks (arguments as :class:`GradSampleHooksFastGradientClipping`); the
        clipped sums are then reduce-scattered into the shards.

        Raises:
            ValueError: See :func:`check_fsdp_model`.
            NotImplementedError: For a trainable layer without a registered sampler.
        """
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
                         force_functorch=force_functorch, max_grad_norm=max_grad_norm,
                         use_ghost_clipping=use_ghost_clipping)
        try:
            self._fsdp_setup(m)
        except BaseException:
            self.cleanup()
            raise

    def _fsdp_setup(self, m: nn.Module) -> None:
        check_fsdp_model(m)
        _check_layers(self)
        self._registered_params = list(m.parameters())  # the sharded parameters
        self._kept = ClippedSumStore(add=_reduce_scatter_add, registered=self._registered_keys)
        self._aliases: dict[int, nn.Parameter] = {}

    def _model_parameters(self) -> list:
        registered = self.__dict__.get("_registered_params")
        return registered if registered is not None else super()._model_parameters()

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

    def _materialise(self, record: Any, activations: Any, backprops: torch.Tensor) -> bool:
        """Never under FSDP: that choice depends on the rank's batch size, and every rank must
        keep the same calls, so that their reduce-scatters pair up."""
        return False

    def add_clipped_sum(self, coef: torch.Tensor) -> None:
        """Reduce-scatter this pass's clipped sums into the shards of ``p.grad`` (a collective).

        Raises:
            RuntimeError: If the ranks would reduce different parameters or in another order
                (nothing is reduced then).
        """
        self._check_same_reductions()
        super().add_clipped_sum(coef)

    def _check_same_reductions(self) -> None:
        """All ranks must reduce the same parameters in the same order: compare digests."""
        order = [id(p) for record, _, _ in reversed(self._kept.calls) for p in record.params if p.requires_grad]
        order += [key for key in reversed(list(self._kept.samples))]
        names = "\n".join(self._param_names.get(key, "<unnamed>") for key in order)
        digests: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, hashlib.sha256(names.encode()).hexdigest())
        if len(set(digests)) > 1:
            self.discard_clipped_sum()
            raise RuntimeError(
                "The ranks' backward passes went through different layer calls (data-dependent "
                "control flow in the model?), so their reduce-scatters of the clipped sums would "
                "not pair up; nothing was reduced. Under FSDP every rank must call the same "
                "layers in the same order in each step."
            )

    @contextlib.contextmanager
    def collective_guard(self) -> Iterator[None]:
        """Turn a failed FSDP collective into :class:`DistributedStepError`, clearing ``p.grad``."""
        try:
            yield
        except RuntimeError as err:
            if not _raised_by_collective(err):
                raise
            for p in self._model_parameters():
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


class GradSampleModuleFastGradientClippingFSDP(_FSDPGhost, GradSampleModuleFastGradientClipping):
    """``nn.Module`` wrapper for ghost clipping of a ``fully_shard``-ed model (Opacus' name).

    Example:
        >>> model = FSDP2Wrapper(model)            # dp_torch.utils.fsdp_utils
        >>> model, optimizer, criterion, loader = PrivacyEngine().make_private(
        ...     module=model, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
        ...     noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost_fsdp")
        >>> criterion(model(x), y).backward()      # norms, then the reduce-scattered clipped sums
        >>> optimizer.step()
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model (a failed all-gather raises ``DistributedStepError``)."""
        with self.collective_guard():
            return self._module(*args, **kwargs)
