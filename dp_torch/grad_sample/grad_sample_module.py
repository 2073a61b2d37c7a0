"""Per-sample gradients from hooks (mirrors ``opacus.grad_sample.grad_sample_module``).

A forward hook on every layer that owns trainable parameters records its inputs; a
gradient hook on the layer's output hands them, with the backprops, to the layer's grad
sampler (or the ``torch.func`` fallback), and the per-example gradients of a backward
pass become ``p.grad_sample``.
"""

from __future__ import annotations

import logging
import weakref
from functools import partial
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from . import _registry
from ._rows import GradSampleBatchSizeError, broadcast_call, check_rows, check_sums, leading_batch_size, parameter_names
from .embedding import embedding_bag_unsupported_reason
from .functorch import AutocastState, ft_compute_per_sample_gradient, is_capture_suspended
from .gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule, check_wrapper_args

__all__ = [
    "GradSampleHooks",
    "GradSampleModule",
    "POISSON_ACCUMULATION_ERROR",
    "create_or_accumulate_grad_sample",
    "promote_current_grad_sample",
]

logger = logging.getLogger(__name__)

#: Message of the ValueError raised by the gradient-accumulation guard.
POISSON_ACCUMULATION_ERROR = (
    "Poisson sampling is not compatible with gradient accumulation: this backward pass would "
    "add per-sample gradients to ones that were not cleared (p.grad_sample is set), which "
    "merges two Poisson batches into one and breaks the privacy accounting. Call "
    "optimizer.step() and optimizer.zero_grad() after every forward/backward pass, or use "
    "dp_torch.utils.batch_memory_manager.BatchMemoryManager to split a large logical batch "
    "into physical ones."
)


#: Attribute set on the accumulation buffers this module allocates: only those are added to
#: in place (a sampler's output may alias autograd's gradient buffer and is never modified).
_OWNED_FLAG = "_dp_torch_owned_grad_sample"


def _owned(t: torch.Tensor) -> torch.Tensor:
    setattr(t, _OWNED_FLAG, True)
    return t


def create_or_accumulate_grad_sample(
    *, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int
) -> None:
    """Add ``grad_sample`` to ``param._current_grad_sample`` (created as zeros if absent).

    The buffer has ``max_batch_len`` rows; a contribution with fewer rows (a time step of a
    packed sequence) fills the first rows. A contribution with more rows grows the buffer.
    A buffer allocated here is added to in place; a sampler's output stored as the buffer
    (first contribution) is never modified, the first addition copies it.

    Args:
        param: The parameter.
        grad_sample: Per-example gradients, shape ``[b, *param.shape]``.
        max_batch_len: The batch size of the current backward pass.
    """
    if not param.requires_grad:
        return
    rows = grad_sample.shape[0]
    current = getattr(param, "_current_grad_sample", None)
    if current is None:
        size = max(int(max_batch_len), rows)
        if size == rows:
            param._current_grad_sample = grad_sample
            return
        current = _owned(grad_sample.new_zeros((size, *grad_sample.shape[1:])))
        current[:rows] = grad_sample
    elif (
        getattr(current, _OWNED_FLAG, False)
        and current.shape[0] >= rows
        and current.device == grad_sample.device
        and torch.promote_types(current.dtype, grad_sample.dtype) == current.dtype
    ):
        current[:rows] += grad_sample
    elif current.shape[0] == rows:
        # Out of place: the stored tensor may be a sampler's output that aliases autograd's
        # gradient buffer, which must not be modified.
        current = _owned(current + grad_sample)
    else:
        size = max(current.shape[0], rows)
        grown = torch.zeros((size, *current.shape[1:]), dtype=torch.promote_types(current.dtype, grad_sample.dtype),
                            device=current.device)
        grown[: current.shape[0]] = current
        grown[:rows] += grad_sample
        current = _owned(grown)
    param._current_grad_sample = current


def promote_current_grad_sample(p: nn.Parameter) -> None:
    """End of a backward pass: move ``p._current_grad_sample`` into ``p.grad_sample``.

    ``p.grad_sample`` becomes that tensor, or, when it already holds an earlier pass, a list
    of the passes (gradient accumulation; the optimizer concatenates them).

    Args:
        p: The parameter.
    """
    current = getattr(p, "_current_grad_sample", None)
    if current is None:
        return
    previous = getattr(p, "grad_sample", None)
    if previous is None:
        p.grad_sample = current
    elif isinstance(previous, list):
        previous.append(current)
    else:
        p.grad_sample = [previous, current]
    del p._current_grad_sample


class _Activations(list):
    """The positional inputs of one layer call, batch first.

    Attributes:
        kwargs: The keyword inputs of the call (those that carry the batch, batch first).
        in_dims: ``0`` for positional inputs that carry the batch, ``None`` for the others.
        kwarg_in_dims: The same for the keyword inputs.
    """

    def __init__(self, values: Iterable[Any], kwargs: dict, in_dims: tuple, kwarg_in_dims: Optional[dict] = None):
        super().__init__(values)
        self.kwargs = kwargs
        self.in_dims = in_dims
        self.kwarg_in_dims = kwarg_in_dims if kwarg_in_dims is not None else {k: None for k in kwargs}


class _CallRecord:
    """What a forward hook remembers about one call of a layer until its backward."""

    __slots__ = ("module", "args", "kwargs", "batch_dim", "max_batch_len", "params", "token",
                 "forward_batch", "output", "output_version", "autocast", "__weakref__")

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict, batch_dim: int,
                 max_batch_len: Optional[int], params: list, forward_batch: Optional[int] = None):
        self.module = module
        self.forward_batch = forward_batch
        self.args = args
        self.kwargs = kwargs
        self.batch_dim = batch_dim
        self.max_batch_len = max_batch_len
        self.params = params
        self.token = [False]  # set once the call's backprops have been consumed
        self.output: Optional[torch.Tensor] = None  # kept for layers re-run by torch.func
        self.output_version = 0
        self.autocast: Optional[AutocastState] = None  # the forward's autocast, for the re-run


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _is_rnn_linear(module: nn.Module) -> bool:
    return any(cls.__name__ == "RNNLinear" for cls in type(module).__mro__)


def _trainable(params: Iterable[torch.Tensor]) -> list:
    seen: set = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _batch_grad_is_sum(module: nn.Module) -> bool:
    """Whether the layer's batch gradient is the sum of its per-example gradients.

    Not so for embeddings with ``scale_grad_by_freq=True``, whose batch gradient divides by
    token counts over the whole batch (their per-example gradients use each example's own).
    """
    return not any(getattr(m, "scale_grad_by_freq", False) for m in module.modules())


def _unsupported_reason(module: nn.Module) -> str:
    """Why a layer with trainable parameters has no per-sample gradients ("" if it has them)."""
    if any(True for _ in module.buffers()):
        return (
            f"{type(module).__name__} has trainable parameters and buffers, so its per-sample "
            "gradients are not defined (its statistics mix examples); replace it (e.g. BatchNorm -> "
            "GroupNorm via ModuleValidator.fix) or freeze it."
        )
    if isinstance(module, nn.EmbeddingBag):
        return embedding_bag_unsupported_reason(module)
    return ""


class GradSampleHooks(AbstractGradSampleHooks):
    """Hooks that compute per-sample gradients, attached to a model without wrapping it.

    After ``loss.backward()``, every trainable parameter ``p`` of the model has
    ``p.grad_sample`` of shape ``[batch, *p.shape]``: the gradient of each example's loss
    (with ``loss_reduction="mean"`` the ``1/batch`` of the mean is undone). Frozen
    parameters get none.

    Attributes:
        GRAD_SAMPLERS: The registry ``{layer class: grad sampler}`` (shared by all classes).
        hooks_enabled: Whether the hooks currently record anything.
        grad_accumulation_allowed: ``False`` after :meth:`forbid_grad_accumulation`.
        force_functorch: Whether every layer uses the ``torch.func`` fallback.
    """

    GRAD_SAMPLERS = _registry.GRAD_SAMPLERS
    #: Whether each pass checks that the per-sample gradients add up to the parameter's
    #: gradient (see :func:`check_sums`).
    CHECK_PASS_SUMS = True

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        strict: bool = True,
        force_functorch: bool = False,
    ):
        """Attach the hooks.

        Args:
            m: The model.
            batch_first: ``True`` when layer inputs are ``[batch, ...]``, ``False`` when
                ``[K, batch, ...]`` (RNN style). Layers whose class is (a subclass of) a
                class named ``RNNLinear``, or that set ``_grad_sample_batch_first``, use
                their own setting, as the DP recurrent layers feed them ``[batch, ...]``.
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss aggregates the batch.
            strict: If ``True``, raise ``NotImplementedError`` when a trainable layer has
                buffers (e.g. BatchNorm); if ``False``, such layers without a sampler get no
                hooks and their parameters no ``grad_sample`` (best effort).
            force_functorch: Use the ``torch.func`` fallback for every layer.

        Raises:
            TypeError: If an argument has the wrong type.
            ValueError: If ``loss_reduction`` is invalid or hooks are already attached to ``m``.
            NotImplementedError: If ``strict`` and the model has a trainable layer with buffers.
        """
        check_wrapper_args(m, batch_first, loss_reduction)
        for name, value in (("strict", strict), ("force_functorch", force_functorch)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}.")
        if hasattr(m, "autograd_grad_sample_hooks"):
            raise ValueError(
                "Trying to add hooks twice to the same model: it already has per-sample-gradient "
                "hooks; call remove_hooks() (or to_standard_module()) on the first wrapper first."
            )
        self.validate(module=m, strict=strict)
        AbstractGradSampleHooks.__init__(self, m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.strict = strict
        self.hooks_enabled = False
        self.grad_accumulation_allowed = True
        self.force_functorch = force_functorch
        self._owned: dict = {}
        self._pending: dict = {}
        self._pass_low_dtype: Optional[torch.dtype] = None
        self._active_pass: Optional[int] = None
        self._uses: dict = {}
        self._stash: list = []
        self._stashed_params: set = set()
        self._forward_batch: Optional[int] = None
        self._forward_stack: list = []
        self._pass_batches: set = set()
        self._pass_grads: dict = {}
        self.add_hooks(loss_reduction=loss_reduction, batch_first=batch_first, force_functorch=force_functorch)

    # ------------------------------------------------------------------ installation

    def iterate_submodules(self, module: nn.Module) -> Iterator[tuple[nn.Module, list]]:
        """Yield ``(layer, owned trainable parameters)`` for every layer that gets hooks.

        A layer with directly owned trainable parameters is hooked. If it has a registered
        sampler, its children are visited too and it owns only its direct parameters;
        otherwise the ``torch.func`` fallback handles it whole (all its parameters) and its
        children are not visited.

        Args:
            module: The model or a submodule.
        """
        direct = _trainable(module.parameters(recurse=False))
        if direct and _unsupported_reason(module):
            return  # only reachable with strict=False: best effort, no hooks
        if direct:
            has_sampler = _registry.find_sampler(self.GRAD_SAMPLERS, module) is not None
            if has_sampler:
                yield module, direct
            else:
                yield module, _trainable(module.parameters())
                return
        for child in module.children():
            yield from self.iterate_submodules(child)

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        """Install the forward hooks (the backward side is registered per call).

        Args:
            loss_reduction: ``"mean"`` or ``"sum"``.
            batch_first: Whether the batch is dimension 0.
            force_functorch: Use the ``torch.func`` fallback for every layer.

        Raises:
            ValueError: If the model already has hooks.
        """
        check_wrapper_args(self._module, batch_first, loss_reduction)
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model; call remove_hooks() first.")
        plan = list(self.iterate_submodules(self._module))
        self.loss_reduction = loss_reduction
        self.batch_first = batch_first
        self.force_functorch = force_functorch
        handles: list = []
        self._module.autograd_grad_sample_hooks = handles
        self.autograd_grad_sample_hooks = handles
        self._owned = {}
        self._param_names = parameter_names(self._module)
        for p in self._module.parameters():
            p._dp_torch_name = self._param_names[id(p)]
        self._module_names = {m: name or "<root>" for name, m in self._module.named_modules(remove_duplicate=False)}
        handles.append(self._module.register_forward_pre_hook(self._enter_forward, with_kwargs=True))
        for module, owned in plan:
            self._owned[module] = owned
            handles.append(module.register_forward_hook(self.capture_activations_hook, with_kwargs=True))
        handles.append(self._module.register_forward_hook(self._exit_forward, always_call=True))
        if self.CHECK_PASS_SUMS:
            for module, owned in plan:
                if _batch_grad_is_sum(module):
                    handles.extend(p.register_hook(partial(self._record_pass_grad, p)) for p in owned)
        self.enable_hooks()

    def remove_hooks(self) -> None:
        """Remove the hooks (gradient hooks of graphs still alive become no-ops)."""
        self.disable_hooks()
        handles = getattr(self, "autograd_grad_sample_hooks", None)
        if handles is not None:
            while handles:
                handles.pop().remove()
            del self.autograd_grad_sample_hooks
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            delattr(self._module, "autograd_grad_sample_hooks")
        self._owned = {}

    def disable_hooks(self) -> None:
        """Turn every hook into a no-op until :meth:`enable_hooks`."""
        self.hooks_enabled = False

    def enable_hooks(self) -> None:
        """Undo :meth:`disable_hooks` (hooks are enabled on creation)."""
        self.hooks_enabled = True

    def forbid_grad_accumulation(self) -> None:
        """Raise ``ValueError`` on a backward pass while ``p.grad_sample`` is still set.

        Required with Poisson sampling, where each batch must be a separate step.
        """
        self.grad_accumulation_allowed = False

    def allow_grad_accumulation(self) -> None:
        """Let backward passes accumulate: ``p.grad_sample`` becomes a list of batches."""
        self.grad_accumulation_allowed = True

    # ------------------------------------------------------------------ validation

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> list[NotImplementedError]:
        """Check that per-sample gradients are defined for every trainable layer.

        A layer with buffers (BatchNorm's running statistics) mixes examples, so its
        per-sample gradients do not exist; an ``EmbeddingBag`` in mode ``"max"`` or with
        ``scale_grad_by_freq`` has no sampler.

        Args:
            module: The model.
            strict: Raise instead of returning the errors.

        Returns:
            The list of problems (empty when the model is supported).

        Raises:
            NotImplementedError: If ``strict`` and a problem was found.
        """
        errors = []
        for name, m in module.named_modules():
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                continue
            reason = _unsupported_reason(m)
            if reason:
                errors.append(NotImplementedError(f"Layer {name or '<root>'}: {reason}"))
        if strict and errors:
            raise NotImplementedError(errors)
        return errors

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        """Whether per-sample gradients of this single layer can be computed.

        Unlike Opacus 1.6 (which deprecates this and always answers ``True``), the answer is
        real: ``False`` for layers with buffers and unsupported ``EmbeddingBag`` settings;
        every other layer has a sampler or the ``torch.func`` fallback. Submodules are not
        checked.

        Args:
            module: The layer.
        """
        if _unsupported_reason(module):
            return False
        return True

    # ------------------------------------------------------------------ forward side

    def _batch_dim(self, module: nn.Module) -> int:
        override = getattr(module, "_grad_sample_batch_first", None)
        if override is None and _is_rnn_linear(module):
            override = True
        first = self.batch_first if override is None else bool(override)
        return 0 if first else 1

    def _enter_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Root pre-hook: remember the batch size of this forward pass (restored on exit)."""
        self._forward_stack.append(self._forward_batch)
        self._forward_batch = leading_batch_size(args, kwargs, 0 if self.batch_first else 1)

    def _exit_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._forward_batch = self._forward_stack.pop() if self._forward_stack else None

    def _broadcast_if_needed(self, module: nn.Module, args: tuple, kwargs: dict,
                             output: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
        """Expand the call of a layer whose output has one row while the batch has more."""
        bd = self._batch_dim(module)
        batch = self._forward_batch
        if (batch is None or batch == 1 or output.dim() <= bd or output.shape[bd] != 1
                or getattr(module, "max_batch_len", None) is not None):
            return output, args, kwargs
        return broadcast_call(self._module_names.get(module, type(module).__name__), output, args, kwargs, bd, batch)

    def capture_activations_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook: remember the call's inputs and hook its output's gradient.

        Returns:
            The output expanded to the batch when the layer returned one row for a larger
            batch (a broadcast input, see :func:`broadcast_call`), else ``None``.
        """
        if not self.hooks_enabled or is_capture_suspended() or not torch.is_grad_enabled():
            return None
        params = [p for p in self._owned.get(module, ()) if p.requires_grad]
        if not params:
            return None
        if not isinstance(output, torch.Tensor):
            raise NotImplementedError(
                f"{type(module).__name__} returned {type(output).__name__}; per-sample gradients "
                "need layers with trainable parameters to return a single tensor (use the DP "
                "version of the layer, e.g. DPMultiheadAttention, or freeze it)."
            )
        if output.grad_fn is None:
            return None
        original = output
        output, args, kwargs = self._broadcast_if_needed(module, args, kwargs, output)
        record = _CallRecord(
            module,
            tuple(_detach(a) for a in args),
            {k: _detach(v) for k, v in kwargs.items()},
            self._batch_dim(module),
            getattr(module, "max_batch_len", None),
            params,
            self._forward_batch,
        )
        if self._uses_fallback(module):
            record.output, record.output_version = output.detach(), output._version
            record.autocast = AutocastState.current(output.device.type)
        self._on_new_call(record, output)
        output.register_hook(partial(self._capture_backprops, record))
        return None if output is original else output

    def _on_new_call(self, record: _CallRecord, output: torch.Tensor) -> None:
        """Count the call as a pending use of its parameters until its backward (or its death)."""
        for p in record.params:
            self._uses[id(p)] = self._uses.get(id(p), 0) + 1
        weakref.finalize(record, self._release_uses, [id(p) for p in record.params], record.token)

    def _release_uses(self, ids: list, token: list) -> None:
        if token[0]:
            return
        token[0] = True
        for key in ids:
            left = self._uses.get(key, 0) - 1
            if left > 0:
                self._uses[key] = left
            else:
                self._uses.pop(key, None)

    # ------------------------------------------------------------------ backward side

    def _capture_backprops(self, record: Any, grad: torch.Tensor) -> None:
        if not self.hooks_enabled:
            return
        self._begin_pass()
        try:
            activations, backprops = self.rearrange_grad_samples(record, grad.detach())
            self._process_call(record, activations, backprops)
        except BaseException:
            self._discard_pending()
            raise

    def rearrange_grad_samples(self, record: Any, backprops: torch.Tensor) -> tuple[_Activations, torch.Tensor]:
        """Put the batch first and undo the ``1/batch`` of a mean loss.

        Args:
            record: The call's record.
            backprops: Gradient of the loss with respect to the call's output.

        Returns:
            ``(activations, backprops)``, both batch first.
        """
        bd = record.batch_dim
        if backprops.dim() <= bd:
            raise ValueError(
                f"{type(record.module).__name__} output has shape {tuple(backprops.shape)}, with no "
                f"batch dimension {bd}; check batch_first={self.batch_first}."
            )
        rows = backprops.shape[bd]
        if backprops.is_floating_point() and torch.finfo(backprops.dtype).bits < 32:
            self._pass_low_dtype = backprops.dtype
            backprops = backprops.float()  # per-example quantities in float32 (no fp16 overflow)
        if self._backprops_of_mean_loss():
            backprops = backprops * (record.max_batch_len if record.max_batch_len is not None else rows)

        def carries_batch(a: Any) -> bool:
            return isinstance(a, torch.Tensor) and a.dim() > bd and a.shape[bd] == rows

        in_dims = tuple(0 if carries_batch(a) else None for a in record.args)
        kw_dims = {k: 0 if carries_batch(v) else None for k, v in record.kwargs.items()}
        args, kwargs = record.args, dict(record.kwargs)
        if bd != 0:
            backprops = backprops.movedim(bd, 0)
            args = tuple(a.movedim(bd, 0) if d is not None else a for a, d in zip(args, in_dims))
            kwargs = {k: v.movedim(bd, 0) if kw_dims[k] is not None else v for k, v in kwargs.items()}
        return _Activations(args, kwargs, in_dims, kw_dims), backprops

    def _backprops_of_mean_loss(self) -> bool:
        """Whether this pass's backprops carry the ``1/batch`` of a mean loss (undone per call)."""
        return self.loss_reduction == "mean"

    def _uses_fallback(self, module: nn.Module) -> bool:
        """Whether the layer's per-sample gradients come from the ``torch.func`` re-run."""
        return self.force_functorch or _registry.find_sampler(self.GRAD_SAMPLERS, module) is None

    def _grad_samples_of_call(self, record: Any, activations: _Activations, backprops: torch.Tensor) -> dict:
        if self._uses_fallback(record.module):
            expected = record.output
            if expected is not None and expected._version != record.output_version:
                expected = None  # modified in place after the layer (ReLU(inplace=True)): unknown
            if expected is not None and record.batch_dim != 0:
                expected = expected.movedim(record.batch_dim, 0)
            return ft_compute_per_sample_gradient(
                record.module, activations, backprops, params=record.params, batch_dim=record.batch_dim,
                expected_output=expected, autocast=record.autocast,
            )
        sampler = _registry.find_sampler(self.GRAD_SAMPLERS, record.module)
        return self._registered_keys(sampler(record.module, activations, backprops))

    def _registered_keys(self, per_param: dict) -> dict:
        """A sampler's ``{parameter: value}`` keyed by the model's registered parameters.

        Samplers read a layer's parameters at backward time; this is the identity unless
        the model swaps in stand-ins around its forward and backward (FSDP2, see
        :mod:`dp_torch.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp`).
        """
        return per_param

    def _accumulate_call(self, record: Any, activations: _Activations, backprops: torch.Tensor) -> None:
        grad_samples = self._grad_samples_of_call(record, activations, backprops)
        max_len = record.max_batch_len if record.max_batch_len is not None else backprops.shape[0]
        owned = {id(p) for p in record.params}
        for p, gs in grad_samples.items():
            if p.requires_grad and id(p) in owned:
                create_or_accumulate_grad_sample(param=p, grad_sample=gs, max_batch_len=max_len)
                self._pending[id(p)] = p

    def _call_concatenator(self, module: nn.Module) -> Any:
        """The function merging this layer's calls for the sampler that will run, or ``None``."""
        if self.force_functorch:
            return None
        return _registry.find_call_concatenator(self.GRAD_SAMPLERS, module)

    def _note_batch(self, record: Any) -> None:
        """Remember the forward batch size of a call backpropagated in this pass."""
        if getattr(record, "forward_batch", None) is not None:
            self._pass_batches.add(record.forward_batch)

    def _pass_batch(self) -> Optional[int]:
        """The batch size of this pass's forward(s); raises when two sizes were mixed."""
        if len(self._pass_batches) > 1:
            raise GradSampleBatchSizeError(
                f"One backward pass went through forward passes with different batch sizes "
                f"{sorted(self._pass_batches)}; per-sample gradients need one batch per backward "
                "pass: call backward() on each forward's loss separately (with "
                "optimizer.step() in between, or BatchMemoryManager for virtual steps)."
            )
        return next(iter(self._pass_batches), None)

    def _record_pass_grad(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Parameter hook: keep the parameter's gradient of this pass for :meth:`_check_pass_sums`."""
        if not self.hooks_enabled or is_capture_suspended():
            return
        self._begin_pass()
        self._pass_grads[id(p)] = (p, grad)

    def _check_pass_sums(self) -> None:
        """Every parameter's per-sample gradients must add up to its gradient of the pass."""
        entries = []
        for key, (p, grad) in self._pass_grads.items():
            current = getattr(p, "_current_grad_sample", None) if key in self._pending else None
            divisor = current.shape[0] if current is not None and self.loss_reduction == "mean" else 1
            entries.append((self._param_names.get(key, "<unnamed>"), current, grad, max(divisor, 1)))
        check_sums(entries, self._pass_low_dtype)

    def _check_pending_rows(self) -> None:
        """Every per-sample gradient of this pass must have one row per example."""
        rows = [
            (self._param_names.get(key, "<unnamed>"), p._current_grad_sample.shape[0])
            for key, p in self._pending.items()
            if getattr(p, "_current_grad_sample", None) is not None
        ]
        check_rows(rows, self._pass_batch(), "per-sample gradient")

    def _process_call(self, record: Any, activations: _Activations, backprops: torch.Tensor) -> None:
        self._note_batch(record)
        ids = [id(p) for p in record.params]
        repeated = not record.token[0] and any(
            self._uses.get(key, 0) > 1 or key in self._stashed_params for key in ids
        )
        self._release_uses(ids, record.token)
        if repeated and self._call_concatenator(record.module) is not None:
            # A layer called several times (a recurrence): keep the calls and run the sampler
            # once on their concatenation at the end of the pass (see _flush_stash).
            self._stash_call(record, activations, backprops)
        else:
            self._accumulate_call(record, activations, backprops)

    # ------------------------------------------------------------------ merged calls

    def _stash_call(self, record: Any, activations: _Activations, backprops: torch.Tensor) -> None:
        self._stash.append((record, activations, backprops))
        self._stashed_params.update(id(p) for p in record.params)

    def _stash_by_module(self) -> dict:
        """The stashed calls grouped by layer, in order of first appearance."""
        by_module: dict = {}
        for entry in self._stash:
            by_module.setdefault(entry[0].module, []).append(entry)
        return by_module

    def _merge_calls(self, calls: list) -> Optional[tuple]:
        """Merge stashed calls of ONE layer into one ``(record, activations, backprops)`` call.

        The layer's concatenator puts the calls side by side along the sequence axis (rows
        of calls with fewer examples are zero-padded), so one sampler run gives the sum of
        the calls' per-example gradients.

        Args:
            calls: ``[(record, activations, backprops), ...]``, all of the same layer.

        Returns:
            The merged call, the single call itself, or ``None`` when the calls cannot be
            merged (no concatenator, or the calls do not share the same parameter list).
        """
        module = calls[0][0].module
        concat = self._call_concatenator(module)
        params = [id(p) for p in calls[0][0].params]
        if concat is None or any([id(p) for p in c[0].params] != params for c in calls):
            return None
        if len(calls) == 1:
            return calls[0]
        acts, backprops = concat(module, [(a, b) for _, a, b in calls])
        max_len = max(r.max_batch_len if r.max_batch_len is not None else b.shape[0] for r, _, b in calls)
        record = _CallRecord(module, (), {}, 0, max_len, list(calls[0][0].params))
        record.token[0] = True
        return record, _Activations(acts, {}, (0,), {}), backprops

    def _flush_stash(self) -> None:
        """End of a pass: per-sample gradients of the stashed calls, one sampler run per layer."""
        try:
            for calls in self._stash_by_module().values():
                merged = self._merge_calls(calls)
                for record, acts, backprops in [merged] if merged is not None else calls:
                    self._accumulate_call(record, acts, backprops)
        finally:
            self._stash = []
            self._stashed_params = set()

    # ------------------------------------------------------------------ pass bookkeeping

    def _trainable_parameters(self) -> list:
        return [p for p in self._model_parameters() if p.requires_grad]

    def _check_accumulation(self) -> None:
        if self.grad_accumulation_allowed:
            return
        if any(getattr(p, "grad_sample", None) is not None for p in self._trainable_parameters()):
            raise ValueError(POISSON_ACCUMULATION_ERROR)

    def _begin_pass(self) -> None:
        task = torch._C._current_graph_task_id()
        if self._active_pass is not None and task == self._active_pass:
            return
        self._check_accumulation()
        self._discard_pending()
        self._start_pass_state()
        self._active_pass = task
        torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)

    def _start_pass_state(self) -> None:
        """Extension point: reset per-pass state of subclasses."""

    def _discard_pending(self) -> None:
        for p in self._pending.values():
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
        self._pending = {}
        self._stash = []
        self._stashed_params = set()
        self._pass_batches = set()
        self._pass_grads = {}
        self._pass_low_dtype = None

    def _end_pass(self) -> None:
        try:
            self._finish_pass()
        finally:
            self._pending = {}
            self._pass_batches = set()
            self._pass_grads = {}
            self._active_pass = None

    def _finish_pass(self) -> None:
        try:
            self._flush_stash()
            self._check_pending_rows()
            self._check_pass_sums()
        except BaseException:
            self._discard_pending()
            raise
        for p in self._pending.values():
            promote_current_grad_sample(p)


class GradSampleModule(GradSampleHooks, AbstractGradSampleModule):
    """``nn.Module`` wrapper computing per-sample gradients with hooks (Opacus' ``GradSampleModule``).

    Example:
        >>> model = GradSampleModule(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> model._module[0].weight.grad_sample.shape
        torch.Size([8, 3, 4])
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        strict: bool = True,
        force_functorch: bool = False,
    ):
        """Wrap ``m``; see :class:`GradSampleHooks` for the arguments."""
        check_wrapper_args(m, batch_first, loss_reduction)
        nn.Module.__init__(self)
        GradSampleHooks.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction,
            strict=strict, force_functorch=force_functorch,
        )
        self.grad_accumulation_hook = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model."""
        return self._module(*args, **kwargs)
