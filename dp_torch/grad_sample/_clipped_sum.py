"""Book-keeping for ghost clipping: the clipped sum without a second backward pass (internal).

The norm pass of ghost clipping sees, for every hooked layer call, the call's inputs
(activations) and the gradient of the loss at its output (backprops). A layer's parameter
gradient is linear in its backprops, so once the clip factors ``c`` are known, the layer's
share of the clipped sum ``sum_i c_i grad_i`` is the layer's *batch* gradient for the
backprops scaled row by row by ``c`` (Bu et al. 2023, "book-keeping"). This module keeps
what the norm pass saw and forms that sum afterwards:

* calls whose norms came from a norm sampler are kept as ``(record, activations,
  backprops)``; their sum comes from the layer's batch-gradient sampler
  (:data:`~dp_torch.grad_sample._registry.BATCH_GRAD_SAMPLERS`) or, without one, from its
  per-example gradients for the scaled backprops, summed over the batch;
* parameters whose per-example gradients were materialised for their norms keep those
  gradients; their sum is ``tensordot(c, grad_samples)``.

The sums are formed in at least float32 and added to ``p.grad`` (created if absent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import _registry

__all__ = ["ClippedSumStore", "compute_dtype"]

#: ``(record, activations, backprops) -> {param: per-example gradients}`` of one call.
GradSamplesOfCall = Callable[[Any, Any, torch.Tensor], dict]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype per-example quantities of ``t`` are computed in: at least float32."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def _row_scaled(t: torch.Tensor, coef: torch.Tensor, dropped: bool = True) -> torch.Tensor:
    """``t`` (batch first) with row ``i`` multiplied by ``coef[i]``, in >= float32.

    With ``dropped`` (some factor is 0: an example whose norm was not finite), a row with
    factor 0 becomes exactly 0, also where it held ``inf`` or ``nan``.
    """
    rows = t.shape[0]
    dtype = compute_dtype(t)
    factors = coef[:rows].to(device=t.device, dtype=dtype).view(rows, *([1] * (t.dim() - 1)))
    scaled = t.to(dtype) * factors
    if not dropped:
        return scaled
    return torch.where(factors == 0, torch.zeros((), dtype=dtype, device=t.device), scaled)


def _rows_zeroed(activations: Any, coef: torch.Tensor) -> Any:
    """``activations`` with the batch rows of dropped examples (factor 0) set to 0, so that no
    ``0 * inf`` of such an example reaches a product."""
    keep = (coef != 0).to(torch.float64)
    zeroed = [_row_scaled(a, keep).to(a.dtype) if d == 0 and a.is_floating_point() else a
              for a, d in zip(activations, activations.in_dims)]
    return type(activations)(zeroed, activations.kwargs, activations.in_dims, activations.kwarg_in_dims)


def _weighted_rows(grad_sample: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``sum_i coef[i] * grad_sample[i]`` as one matrix-vector product, in >= float32."""
    dtype = compute_dtype(grad_sample)
    factors = coef[: grad_sample.shape[0]].to(device=grad_sample.device, dtype=dtype)
    return torch.tensordot(factors, grad_sample.to(dtype), dims=1)


def _add_to_grad(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p.grad += value``; a ``p.grad`` that is still ``None`` becomes ``value`` itself (the
    callers hand over tensors of their own, see :func:`_owned_sums`)."""
    value = value.to(device=p.device, dtype=p.dtype)
    if p.grad is None:
        p.grad = value.reshape(p.shape)
    else:
        p.grad.add_(value.reshape(p.shape))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _owned_sums(sums: dict, activations: Any) -> dict:
    """A batch-gradient sampler's sums, each copied unless it is a tensor of its own.

    A sum may become ``p.grad`` itself, which is later changed in place, so it must not be
    a view, one of the call's inputs, or a tensor returned for another parameter too.
    """
    inputs = {_storage(t) for t in (*activations, *activations.kwargs.values()) if isinstance(t, torch.Tensor)}
    owned = {}
    for p, value in sums.items():
        whole = value._base is None and value.untyped_storage().nbytes() == value.numel() * value.element_size()
        if not whole or _storage(value) in inputs:
            value = value.clone()
        inputs.add(_storage(value))
        owned[p] = value
    return owned


class ClippedSumStore:
    """What one ghost norm pass keeps so that :meth:`add_clipped_sum` can form the clipped sum.

    Attributes:
        calls: ``[(record, activations, backprops)]`` of calls with norm-sampled parameters.
        samples: ``{id(param): (param, per-example gradients)}`` of materialised parameters.
    """

    def __init__(self, add: Callable[[torch.Tensor, torch.Tensor], None] = _add_to_grad,
                 registered: Callable[[dict], dict] = lambda sums: sums) -> None:
        """An empty store.

        Args:
            add: ``add(p, value)`` adds a parameter's clipped sum (full shape, >= float32) to
                ``p.grad``; FSDP's reduce-scatters it into the shard.
            registered: Re-keys a batch-gradient sampler's ``{parameter: sum}`` by the
                model's registered parameters (identity unless the layers ran on stand-ins).
        """
        self.calls: list = []
        self.samples: dict = {}
        self._add = add
        self._registered = registered

    def __bool__(self) -> bool:
        return bool(self.calls or self.samples)

    def keep_call(self, record: Any, activations: Any, backprops: torch.Tensor) -> None:
        """Keep a call whose per-example norms came from a norm sampler."""
        self.calls.append((record, activations, backprops))

    def keep_samples(self, p: torch.Tensor, grad_sample: torch.Tensor) -> None:
        """Keep a parameter's materialised per-example gradients ``[B, *p.shape]``."""
        self.samples[id(p)] = (p, grad_sample)

    def clear(self) -> None:
        """Drop everything kept (a new pass, an error, or the sum was formed)."""
        self.calls = []
        self.samples = {}

    def add_clipped_sum(self, coef: torch.Tensor, grad_samples_of_call: GradSamplesOfCall) -> None:
        """Add ``sum_i coef[i] * grad_i`` of every kept parameter to its ``p.grad``; clear the store.

        Args:
            coef: The clip factors ``[B]``.
            grad_samples_of_call: Per-example gradients of a call, for layers without a
                batch-gradient sampler.
        """
        try:
            coef = coef.detach()
            dropped = not bool((coef != 0).all())
            while self.calls:  # released one by one, so p.grad grows as the kept tensors shrink
                record, activations, backprops = self.calls.pop()
                if dropped:
                    activations = _rows_zeroed(activations, coef)
                self._add_call(record, activations, _row_scaled(backprops, coef, dropped), grad_samples_of_call)
                del record, activations, backprops
            while self.samples:
                p, grad_sample = self.samples.popitem()[1]
                self._add(p, _row_scaled(grad_sample, coef).sum(dim=0) if dropped
                          else _weighted_rows(grad_sample, coef))
        finally:
            self.clear()

    def _add_call(self, record: Any, activations: Any, scaled: torch.Tensor,
                  grad_samples_of_call: GradSamplesOfCall) -> None:
        sampler = _registry.find_sampler(_registry.BATCH_GRAD_SAMPLERS, record.module)
        if sampler is not None:
            sums = _owned_sums(self._registered(sampler(record.module, activations, scaled)), activations)
        else:
            sums = {p: gs.sum(dim=0) for p, gs in grad_samples_of_call(record, activations, scaled).items()}
        owned = {id(p) for p in record.params}
        for p, value in sums.items():
            if p.requires_grad and id(p) in owned:
                self._add(p, value)
