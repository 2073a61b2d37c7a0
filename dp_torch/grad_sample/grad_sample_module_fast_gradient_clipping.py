"""Fast gradient clipping and ghost clipping (mirrors Opacus' module of the same name).

In this mode one backward pass computes the per-example gradient *norms*
(``per_sample_gradient_norms``, L2 over all trainable parameters) and keeps what it needs
to form the clipped sum ``sum_i c_i grad_i`` afterwards (book-keeping, see
:mod:`dp_torch.grad_sample._clipped_sum`): :meth:`add_clipped_sum` adds it to ``p.grad``
without a second backward pass.
:class:`dp_torch.utils.fast_gradient_clipping_utils.DPLossFastGradientClipping` runs both steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn as nn

from . import _registry
from ._clipped_sum import ClippedSumStore, compute_dtype
from ._param_uses import ParameterUseTracker
from ._rows import check_rows
from ._tied import tied_norms, tied_pair
from .grad_sample_module import POISSON_ACCUMULATION_ERROR, GradSampleHooks, _Activations, _CallRecord
from .gsm_base import AbstractGradSampleModule, check_wrapper_args

logger = logging.getLogger(__name__)

__all__ = [
    "GradSampleHooksFastGradientClipping",
    "GradSampleModuleFastGradientClipping",
    "clipping_coefficients",
    "create_norm_sample",
]

#: Constant added to the norm in the clip factor (docs/design.md, Semantics; as in Opacus).
CLIP_EPSILON = 1e-6


def clipping_coefficients(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / (norm + 1e-6))`` per example; a non-finite norm gives 0.

    Args:
        norms: Per-example norms ``[B]``.
        max_grad_norm: The clipping bound ``C``.

    Returns:
        The clip factors, same shape and dtype as ``norms``.
    """
    finite = torch.isfinite(norms)
    safe = torch.where(finite, norms, torch.zeros_like(norms))
    coef = (max_grad_norm / (safe + CLIP_EPSILON)).clamp(max=1.0)
    return torch.where(finite, coef, torch.zeros_like(coef))


def create_norm_sample(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int) -> None:
    """Set ``param._norm_sample`` to the per-example L2 norms of ``grad_sample``.

    Args:
        param: The parameter.
        grad_sample: Its per-example gradients ``[B, *param.shape]``.
        max_batch_len: Unused; kept for Opacus compatibility.
    """
    del max_batch_len
    if param.requires_grad:
        flat = grad_sample.reshape(grad_sample.shape[0], math.prod(grad_sample.shape[1:]))
        param._norm_sample = flat.norm(2, dim=-1)


def _reject_batch_coupled_layers(module: nn.Module) -> None:
    """Ghost clipping forms the clipped sum from each layer's batch gradient (of row-scaled
    output gradients), so it needs layers whose batch gradient is the sum of the per-example
    gradients."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq and m.weight.requires_grad:
            raise NotImplementedError(
                f"Layer {name or '<root>'} ({type(m).__name__}) has scale_grad_by_freq=True: its batch "
                "gradient divides by batch-wide token counts, so it is not a sum of per-example "
                "gradients and the clipped sum would be wrong; use "
                "grad_sample_mode='hooks' or scale_grad_by_freq=False."
            )


class GradSampleHooksFastGradientClipping(GradSampleHooks):
    """Hooks computing per-example gradient norms (ghost / fast gradient clipping).

    Attributes:
        NORM_SAMPLERS: The registry ``{layer class: norm sampler}``.
        max_grad_norm: The clipping bound ``C``.
        use_ghost_clipping: Use norm samplers where registered (else materialise everywhere).
        trainable_parameters: The model's trainable parameters at construction.
        num_nonfinite_grad_samples: Examples seen so far whose norm was not finite.
    """

    NORM_SAMPLERS = _registry.NORM_SAMPLERS
    #: Off: autograd computes no parameter gradient in this mode, so there is no sum to compare;
    #: uses outside the owning layers are caught in forward by the parameter-use tracker.
    CHECK_PASS_SUMS = False

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        strict: bool = True,
        force_functorch: bool = False,
        max_grad_norm: float = 1.0,
        use_ghost_clipping: bool = True,
    ):
        """Attach the hooks.

        Args:
            m: The model.
            batch_first: ``True`` when layer inputs are ``[batch, ...]``.
            loss_reduction: ``"mean"`` or ``"sum"``.
            strict: See :class:`GradSampleHooks`.
            force_functorch: Use the ``torch.func`` fallback for every layer without a norm
                sampler (and for every layer when ``use_ghost_clipping`` is ``False``).
            max_grad_norm: The clipping bound ``C > 0``.
            use_ghost_clipping: Use norm samplers (ghost clipping) where registered.

        Raises:
            ValueError: If ``max_grad_norm`` is not a finite positive number, or see
                :class:`GradSampleHooks`.
            TypeError: If ``use_ghost_clipping`` is not a bool.
            NotImplementedError: If an embedding layer has ``scale_grad_by_freq=True`` (its batch
                gradient is not a sum of per-example gradients), or see :class:`GradSampleHooks`.
        """
        check_wrapper_args(m, batch_first, loss_reduction)
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not (
            math.isfinite(max_grad_norm) and max_grad_norm > 0
        ):
            raise ValueError(
                f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}; ghost clipping "
                "supports one flat bound (per-layer bounds need grad_sample_mode='hooks')."
            )
        if not isinstance(use_ghost_clipping, bool):
            raise TypeError(f"use_ghost_clipping must be a bool, got {use_ghost_clipping!r}.")
        _reject_batch_coupled_layers(m)
        self.max_grad_norm = float(max_grad_norm)
        self.use_ghost_clipping = use_ghost_clipping
        self.num_nonfinite_grad_samples = 0
        self._per_sample_gradient_norms: Optional[torch.Tensor] = None
        self._touched: set = set()
        self._output_edges: list = []
        self._summed_pass = False
        self._kept = ClippedSumStore()
        GradSampleHooks.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction,
            strict=strict, force_functorch=force_functorch,
        )
        self.trainable_parameters = [p for p in m.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ results

    @property
    def per_sample_gradient_norms(self) -> torch.Tensor:
        """Per-example gradient norms ``[B]`` of the last backward pass (not private: debug only).

        Raises:
            AttributeError: Before the first backward pass.
        """
        if self._per_sample_gradient_norms is None:
            raise AttributeError(
                "per_sample_gradient_norms is not set; run a forward and backward pass of the "
                "model first."
            )
        return self._per_sample_gradient_norms

    @per_sample_gradient_norms.setter
    def per_sample_gradient_norms(self, value: Optional[torch.Tensor]) -> None:
        self._per_sample_gradient_norms = value

    def get_norm_sample(self) -> torch.Tensor:
        """Per-example gradient norms ``[B]`` of the last backward pass (L2 over all parameters)."""
        return self.per_sample_gradient_norms

    def get_clipping_coef(self) -> torch.Tensor:
        """Per-example clip factors ``min(1, C / (norm + 1e-6))``, 0 for a non-finite norm."""
        return clipping_coefficients(self.per_sample_gradient_norms, self.max_grad_norm)

    def add_clipped_sum(self, coef: torch.Tensor) -> None:
        """Add ``sum_i coef[i] * grad_i`` of the last backward pass to every trainable ``p.grad``.

        Formed from what the norm pass kept (no second backward pass); the kept tensors are
        released afterwards, so each pass's sum can be added once.

        Args:
            coef: Per-example factors ``[B]``, usually :meth:`get_clipping_coef`.

        Raises:
            ValueError: If ``coef`` does not have one factor per example of the pass, or if
                nothing was kept (no backward pass since the last sum).
        """
        norms = self._per_sample_gradient_norms
        if norms is None or not self._kept:
            raise ValueError(
                "add_clipped_sum: no backward pass was kept since the last clipped sum; run the "
                "forward pass and loss.backward() through DPLossFastGradientClipping first."
            )
        if coef.shape != norms.shape:
            raise ValueError(
                f"add_clipped_sum: coef must have shape {tuple(norms.shape)} (one factor per "
                f"example of the pass), got {tuple(coef.shape)}."
            )
        self._kept.add_clipped_sum(coef, self._grad_samples_of_call)

    def discard_clipped_sum(self) -> None:
        """Release what the last pass kept for the clipped sum without adding it anywhere."""
        self._kept.clear()

    def log_module_gradient_sample_mode(self, module: nn.Module, *, force_functorch: bool = False,
                                        use_ghost_clipping: bool = True) -> None:
        """Log (level INFO) how each hooked layer of ``module`` gets its per-example norms.

        One line per layer: ghost clipping (a norm sampler), fast gradient clipping with the
        layer's grad sampler, or fast gradient clipping with the ``torch.func`` fallback.

        Args:
            module: The model (or a part of it).
            force_functorch: Whether the ``torch.func`` fallback replaces every grad sampler.
            use_ghost_clipping: Whether norm samplers are used where registered.
        """
        for layer, _ in self.iterate_submodules(module):
            name = self._module_names.get(layer, type(layer).__name__)
            if use_ghost_clipping and _registry.find_sampler(self.NORM_SAMPLERS, layer) is not None:
                how = "ghost clipping"
            elif not force_functorch and _registry.find_sampler(self.GRAD_SAMPLERS, layer) is not None:
                how = "fast gradient clipping (grad sampler)"
            else:
                how = "fast gradient clipping (torch.func fallback)"
            logger.info("Module name: %s, module type: %s, under %s.", name, type(layer).__name__, how)

    # ------------------------------------------------------------------ forward side

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        """Install the hooks of :class:`GradSampleHooks` and the parameter-use tracker."""
        super().add_hooks(loss_reduction=loss_reduction, batch_first=batch_first, force_functorch=force_functorch)
        owned = {id(p) for params in self._owned.values() for p in params}
        unowned = tuple(p for p in self._module.parameters() if p.requires_grad and id(p) not in owned)
        self._use_tracker = ParameterUseTracker(self._owned, self._param_names, unowned, self._tracker_aliases())
        self._use_tracker.install(self.autograd_grad_sample_hooks)

    def _tracker_aliases(self) -> Any:
        """``None``, or for models running on parameter stand-ins the function mapping them to
        the registered parameters (see :class:`ParameterUseTracker`)."""
        return None

    def _enter_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super()._enter_forward(module, args, kwargs)
        if self.hooks_enabled:
            self._use_tracker.enter()

    def _exit_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        super()._exit_forward(module, args, output)
        self._use_tracker.exit()

    def _check_outside_uses(self) -> None:
        """Refuse a pass whose forward used a parameter outside the layers that own it."""
        outside = self._use_tracker.take()
        if outside:
            raise ValueError(
                f"Parameters {outside} were used outside the layers that own them during the "
                "forward pass (e.g. F.linear(x, self.fc.weight) in a parent's forward, or a layer "
                "left without hooks by strict=False): ghost clipping computes per-example norms "
                "and the clipped sum from the hooked owning layers' calls only, so that use would "
                "escape the clipping. Call the layer itself, freeze the parameters, or use "
                "grad_sample_mode='hooks'."
            )

    def _on_new_call(self, record: _CallRecord, output: torch.Tensor) -> None:
        super()._on_new_call(record, output)
        self._output_edges.append(torch.autograd.graph.get_gradient_edge(output))

    @contextlib.contextmanager
    def summed_loss_pass(self) -> Iterator[None]:
        """Within it, backward passes are of the *sum* of the per-example losses, whatever
        ``loss_reduction``: their backprops are the per-example gradients already, so the
        ``1/batch`` of a mean is not undone, and the kept output gradients are autograd's own
        tensors rather than rescaled copies (which would double their memory until the
        clipped sum). Used by :class:`~dp_torch.utils.fast_gradient_clipping_utils.DPTensorFastGradientClipping`.
        """
        previous, self._summed_pass = self._summed_pass, True
        try:
            yield
        finally:
            self._summed_pass = previous

    def _backprops_of_mean_loss(self) -> bool:
        return super()._backprops_of_mean_loss() and not self._summed_pass

    def take_output_edges(self) -> list:
        """Gradient edges of the hooked layer outputs recorded since the last backward pass.

        A first backward pass needs the gradients at these edges only, not the parameter
        gradients, so ``torch.autograd.grad(loss, edges)`` skips every weight-gradient product.
        """
        edges, self._output_edges = self._output_edges, []
        return edges

    # ------------------------------------------------------------------ backward side

    def _norm_sampler_for(self, module: nn.Module) -> Any:
        if not self.use_ghost_clipping:
            return None
        return _registry.find_sampler(self.NORM_SAMPLERS, module)

    def _call_concatenator(self, module: nn.Module) -> Any:
        if not self.use_ghost_clipping:
            return None
        return _registry.find_call_concatenator(self.NORM_SAMPLERS, module)

    def _process_call(self, record: Any, activations: _Activations, backprops: torch.Tensor) -> None:
        self._note_batch(record)
        first_use = not record.token[0]
        single = first_use and all(
            self._uses.get(id(p), 0) <= 1 and id(p) not in self._touched for p in record.params
        )
        self._release_uses([id(p) for p in record.params], record.token)
        self._touched.update(id(p) for p in record.params)
        norm_sampler = self._norm_sampler_for(record.module)
        if norm_sampler is not None:
            backprops = backprops.to(compute_dtype(backprops))
        if norm_sampler is not None and single and not self._materialise(record, activations, backprops):
            self._set_norms(record, activations, backprops)
        elif norm_sampler is not None and not single:
            self._stash_call(record, activations, backprops)
        else:
            self._accumulate_call(record, activations, backprops)
            for p in record.params:
                done = id(p) not in self._uses and id(p) not in self._stashed_params
                if done and id(p) in self._pending:
                    self._finalize_param(p)

    def _materialise(self, record: Any, activations: _Activations, backprops: torch.Tensor) -> bool:
        """Whether a call is cheaper to keep as per-example gradients than as its tensors.

        The clipped sum needs either the call's inputs and output gradients (then a
        batch-gradient product) or the per-example gradients (then only ``tensordot(c, .)``).
        When the per-example gradients take no more memory than the call's tensors (norm
        layers, narrow layers over long sequences), materialising them costs about one
        weight-gradient product and saves both the norm work and the later product.
        """
        if self.force_functorch or _registry.find_sampler(self.GRAD_SAMPLERS, record.module) is None:
            return False
        rows = backprops.shape[0]
        sample_size = rows * sum(p.numel() for p in record.params if p.requires_grad)
        call_size = backprops.numel() + sum(a.numel() for a in activations if isinstance(a, torch.Tensor))
        return sample_size <= call_size

    def _set_norms(self, record: Any, activations: _Activations, backprops: torch.Tensor) -> None:
        """Norms of a call from its layer's norm sampler; the call is kept for the clipped sum."""
        norms = self._norm_sampler_for(record.module)(record.module, activations, backprops)
        for p, norm in self._registered_keys(norms).items():
            if p.requires_grad:
                p._norm_sample = norm
        self._kept.keep_call(record, activations, backprops)

    def _finalize_param(self, p: torch.Tensor) -> None:
        current = getattr(p, "_current_grad_sample", None)
        if current is not None:
            current = current.to(compute_dtype(current))
            create_norm_sample(param=p, grad_sample=current, max_batch_len=current.shape[0])
            self._kept.keep_samples(p, current)
            del p._current_grad_sample
        self._pending.pop(id(p), None)
        p.grad_sample = None

    def _check_accumulation(self) -> None:
        """Under :meth:`forbid_grad_accumulation`, refuse a first pass while ``p.grad`` still
        holds (non-zero) clipped gradients of an earlier batch: in this mode there is no
        ``p.grad_sample`` to look at, so the guard reads ``p.grad`` instead."""
        if self.grad_accumulation_allowed:
            return
        grads = [p.grad for p in self._trainable_parameters() if p.grad is not None]
        if grads and bool(torch.stack([g.detach().abs().sum() for g in grads]).sum() != 0):
            raise ValueError(POISSON_ACCUMULATION_ERROR.replace("p.grad_sample is set", "p.grad is not zero"))

    def _discard_pending(self) -> None:
        super()._discard_pending()
        self._kept.clear()

    def _start_pass_state(self) -> None:
        self._kept.clear()
        self._touched = set()
        self._stashed_params = set()
        self._stash = []
        self._per_sample_gradient_norms = None
        for p in self._model_parameters():
            if hasattr(p, "_norm_sample"):
                del p._norm_sample

    def _components(self) -> list[list]:
        """Group stashed calls into sets of layers that share parameters."""
        by_module = self._stash_by_module()
        param_owner: dict = {}
        parent = {m: m for m in by_module}

        def find(m: Any) -> Any:
            while parent[m] is not m:
                m = parent[m]
            return m

        for module, entries in by_module.items():
            for p in entries[0][0].params:
                other = param_owner.setdefault(id(p), module)
                if other is not module:
                    parent[find(module)] = find(other)
        groups: dict = {}
        for module in by_module:
            groups.setdefault(find(module), []).append(module)
        return [[by_module[m] for m in members] for members in groups.values()]

    def _flush_stash(self) -> None:
        try:
            for component in self._components():
                calls = [entry for entries in component for entry in entries]
                merged = None
                if len(component) == 1 and not any(id(p) in self._pending for p in calls[0][0].params):
                    merged = self._merge_calls(calls)
                tied = None if merged is not None or self._any_pending(calls) else tied_pair(component)
                if merged is not None:
                    record, acts, backprops = merged
                    self._set_norms(record, acts, backprops)
                elif tied is not None:
                    self._set_tied_norms(*tied)
                else:
                    for record, acts, backprops in calls:
                        self._accumulate_call(record, acts, backprops)
        finally:
            self._stash = []
            self._stashed_params = set()

    def _any_pending(self, calls: list) -> bool:
        return any(id(p) in self._pending for record, _, _ in calls for p in record.params)

    def _set_tied_norms(self, emb: tuple, out: tuple) -> None:
        """Norms of an embedding and the output layer tied to it, without per-example tables
        (see :mod:`._tied`); both calls are kept for the clipped sum."""
        for p, norm in self._registered_keys(tied_norms(emb, out)).items():
            if p.requires_grad:
                p._norm_sample = norm
        for call in (emb, out):
            self._kept.keep_call(*call)

    def _check_norm_rows(self, named: list) -> None:
        """Every per-example norm of the pass must have one row per example; on a mismatch
        the pass's norms are cleared, so no clip factor can be read from them."""
        try:
            check_rows([(name, n.shape[0]) for name, n in named], self._pass_batch(), "per-example norm")
        except BaseException:
            self._clear_norms()
            raise

    def _clear_norms(self) -> None:
        self._kept.clear()
        for p in self._model_parameters():
            if hasattr(p, "_norm_sample"):
                del p._norm_sample
        self._per_sample_gradient_norms = None

    def _finish_pass(self) -> None:
        try:
            self._check_outside_uses()
        except BaseException:
            self._discard_pending()
            self._clear_norms()
            raise
        self._flush_stash()
        for p in list(self._pending.values()):
            self._finalize_param(p)
        self._pending = {}
        self._output_edges = []
        named = [(self._param_names.get(id(p), "<unnamed>"), p._norm_sample) for p in self._model_parameters()
                 if p.requires_grad and hasattr(p, "_norm_sample")]
        if not named:
            self._per_sample_gradient_norms = None
            return
        self._check_norm_rows(named)
        norms = [n for _, n in named]
        dtype = torch.float32
        for n in norms:
            dtype = torch.promote_types(dtype, n.dtype)
        total = torch.zeros(norms[0].shape[0], dtype=dtype, device=norms[0].device)
        for n in norms:
            total += n.to(dtype).pow(2)
        self._per_sample_gradient_norms = total.sqrt()
        self.num_nonfinite_grad_samples += int((~torch.isfinite(self._per_sample_gradient_norms)).sum())


class GradSampleModuleFastGradientClipping(GradSampleHooksFastGradientClipping, AbstractGradSampleModule):
    """``nn.Module`` wrapper for fast gradient / ghost clipping (Opacus-compatible).

    Example:
        >>> gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
        >>> loss_fn = DPLossFastGradientClipping(gsm, optimizer, nn.CrossEntropyLoss())
        >>> loss = loss_fn(gsm(x), y)
        >>> loss.backward()  # p.grad = sum_i c_i grad_i
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        strict: bool = True,
        force_functorch: bool = False,
        max_grad_norm: float = 1.0,
        use_ghost_clipping: bool = True,
    ):
        """Wrap ``m``; see :class:`GradSampleHooksFastGradientClipping` for the arguments."""
        check_wrapper_args(m, batch_first, loss_reduction)
        nn.Module.__init__(self)
        GradSampleHooksFastGradientClipping.__init__(
            self, m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
            force_functorch=force_functorch, max_grad_norm=max_grad_norm,
            use_ghost_clipping=use_ghost_clipping,
        )
        self.grad_accumulation_hook = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model."""
        return self._module(*args, **kwargs)
