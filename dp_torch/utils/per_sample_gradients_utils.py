"""Check a model's per-sample gradients against a loop of batch-size-1 backward passes.

Mirrors ``opacus.utils.per_sample_gradients_utils``. The reference is the obvious,
slow method: run each example alone through a copy of the model, backpropagate an L1
loss against zeros, and stack the ordinary gradients
(:func:`compute_microbatch_grad_sample`). The library's answer comes from one batched
pass through the wrapper of a ``grad_sample_mode``
(:func:`compute_opacus_grad_sample`). :func:`check_per_sample_gradients_are_correct`
compares the two, for both loss reductions.

Example:
    >>> model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> check_per_sample_gradients_are_correct(torch.randn(16, 10), model)
    True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from dp_torch.grad_sample.utils import wrap_model
from dp_torch.utils.module_utils import clone_module, trainable_parameters

__all__ = [
    "ModelWithLoss",
    "check_per_sample_gradients_are_correct",
    "check_torch_version_for_ew_sample",
    "clone_module",
    "compute_grad_samples_microbatch_and_opacus",
    "compute_microbatch_grad_sample",
    "compute_microbatch_grad_sample_tensor_or_seq",
    "compute_opacus_grad_sample",
    "get_grad_sample_modes",
    "is_batch_empty",
    "unpack_packedsequences",
]

Batch = Union[torch.Tensor, PackedSequence, Sequence[Any]]

#: Modes whose wrapper fills ``p.grad_sample`` (the ones this module can check).
_CHECKABLE_MODES = ("hooks", "functorch", "ew")
_REDUCTIONS = ("mean", "sum")


def is_batch_empty(batch: Union[torch.Tensor, Sequence[torch.Tensor]]) -> bool:
    """Whether a batch (a tensor, or a sequence whose first element is a tensor) has no elements.

    Args:
        batch: The batch.
    """
    first = batch if isinstance(batch, torch.Tensor) else batch[0]
    return first.numel() == 0


def unpack_packedsequences(X: PackedSequence) -> list[torch.Tensor]:
    """The sequences of a packed batch as a list of ``[T_i, *features]`` tensors, in batch order.

    The order is the caller's: entry ``i`` is the ``i``-th sequence given to
    ``pack_sequence`` / ``pack_padded_sequence``, whatever ``enforce_sorted`` was.

    Args:
        X: The packed batch.

    Returns:
        One tensor per sequence, each cut to its own length.
    """
    if not isinstance(X, PackedSequence):
        raise TypeError(f"X must be a PackedSequence, got {type(X).__name__}.")
    padded, lengths = pad_packed_sequence(X, batch_first=True)
    return [padded[i, :length] for i, length in enumerate(lengths.tolist())]


def _is_args(x: Any) -> bool:
    """Whether ``x`` is a plain tuple of arguments (a ``PackedSequence`` is a namedtuple, not one)."""
    return isinstance(x, tuple) and not isinstance(x, PackedSequence)


def _packed_l1(criterion: nn.L1Loss, output: PackedSequence) -> torch.Tensor:
    """L1 loss of a packed output: the sum over all elements, or the mean of per-sequence means."""
    if criterion.reduction == "sum":
        return criterion(output.data, torch.zeros_like(output.data))
    sequences = unpack_packedsequences(output)
    losses = [criterion(s, torch.zeros_like(s)) for s in sequences]
    return torch.stack(losses).mean()


class ModelWithLoss(nn.Module):
    """A module followed by an L1 loss against zeros, so any module can be backpropagated.

    ``forward(x)`` calls the module on ``x`` (on ``*x`` when ``x`` is a tuple), takes
    the first element of a tuple output, and returns the L1 distance to zeros. For a
    ``PackedSequence`` output, ``"sum"`` sums over every element and ``"mean"`` averages
    the per-sequence mean losses (so each sequence weighs the same, as with padded
    batches of equal lengths).

    Attributes:
        supported_reductions: The accepted ``loss_reduction`` values.
        wrapped_module: The module.
        criterion: The ``nn.L1Loss``.
    """

    supported_reductions = ["mean", "sum"]

    def __init__(self, module: nn.Module, loss_reduction: str = "mean"):
        """Wrap ``module``.

        Args:
            module: The module to score.
            loss_reduction: ``"mean"`` or ``"sum"``.

        Raises:
            ValueError: If ``loss_reduction`` is not supported.
        """
        super().__init__()
        if loss_reduction not in self.supported_reductions:
            raise ValueError(
                f"loss_reduction must be one of {self.supported_reductions}, got {loss_reduction!r}."
            )
        self.wrapped_module = module
        self.criterion = nn.L1Loss(reduction=loss_reduction)

    def forward(self, x: Any) -> torch.Tensor:
        """The loss of the module's output on ``x``."""
        out = self.wrapped_module(*x) if _is_args(x) else self.wrapped_module(x)
        if _is_args(out):
            out = out[0]
        if isinstance(out, PackedSequence):
            return _packed_l1(self.criterion, out)
        return self.criterion(out, torch.zeros_like(out))


@contextlib.contextmanager
def _reproducible(module: nn.Module) -> Iterator[None]:
    """Deterministic kernels where torch has them, and seed 0, inside; the caller's state after.

    Kernels without a deterministic version (cuBLAS without ``CUBLAS_WORKSPACE_CONFIG``, for
    one) run anyway: the comparison has tolerances, and refusing would make the check
    unusable on a GPU. torch's notices about them are silenced here.
    """
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*deterministic", category=UserWarning)
        torch.manual_seed(0)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _check_reduction(loss_reduction: Any) -> None:
    if loss_reduction not in _REDUCTIONS:
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")


def _examples(x: Batch, batch_first: bool, chunk_method: Callable) -> Iterable[Any]:
    """The single examples of ``x`` (tensor rows, or the items of a list), via ``chunk_method``."""
    if isinstance(x, torch.Tensor) and not batch_first:
        x = x.transpose(0, 1)
    return chunk_method(x)


def compute_microbatch_grad_sample(
    x: Union[torch.Tensor, list[Any]],
    module: nn.Module,
    batch_first: bool = True,
    loss_reduction: str = "mean",
    chunk_method: Callable = iter,
) -> dict[str, torch.Tensor]:
    """Reference per-sample gradients: one ordinary backward pass per example.

    Every example runs alone (a batch of one) through a copy of ``module`` followed by
    :class:`ModelWithLoss`; its gradients are stacked along a new first dimension.
    ``module`` itself is not touched.

    Args:
        x: A batch tensor (``[B, ...]``, or ``[T, B, ...]`` when ``batch_first=False``) or a
            list of single examples (e.g. the sequences of a packed batch, each without a
            batch dimension; a tuple item is passed to the module as its arguments).
        module: The model.
        batch_first: Where the batch dimension of ``x`` and of the model's input is.
        loss_reduction: ``"mean"`` or ``"sum"``: the L1 loss's reduction over one
            example's output.
        chunk_method: Splits ``x`` into examples (default: iterate over the first
            dimension of the batch-first batch, or over the list).

    Returns:
        ``{parameter name: [B, *parameter.shape]}`` for every trainable parameter of ``module``.
    """
    _check_reduction(loss_reduction)
    scored = ModelWithLoss(clone_module(module), loss_reduction)
    params = dict(trainable_parameters(scored.wrapped_module))
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    with _reproducible(module):
        for example in _examples(x, batch_first, chunk_method):
            scored.zero_grad(set_to_none=True)
            if not _is_args(example):
                example = example.unsqueeze(0 if batch_first else 1)
            scored(example).backward()
            for name, p in params.items():
                grads[name].append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    return {name: torch.stack(g) if g else params[name].new_zeros((0, *params[name].shape))
            for name, g in grads.items()}


def _check_mode(grad_sample_mode: Any) -> None:
    if grad_sample_mode not in _CHECKABLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {_CHECKABLE_MODES} (the modes that fill "
            f"p.grad_sample), got {grad_sample_mode!r}; 'ghost' computes per-sample norms only "
            "and 'no_op' computes nothing."
        )


def compute_opacus_grad_sample(
    x: Union[torch.Tensor, PackedSequence],
    module: nn.Module,
    batch_first: bool = True,
    loss_reduction: str = "mean",
    grad_sample_mode: str = "hooks",
) -> dict[str, Optional[torch.Tensor]]:
    """Per-sample gradients as dp_torch computes them: one batched pass through the wrapper.

    A copy of ``module`` is wrapped for ``grad_sample_mode`` and scored with
    :class:`ModelWithLoss`; ``module`` itself is not touched.

    Args:
        x: The batch (a tensor or a ``PackedSequence``).
        module: The model.
        batch_first: Where the batch dimension is.
        loss_reduction: ``"mean"`` or ``"sum"``.
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ew"``.

    Returns:
        ``{parameter name: p.grad_sample}`` for every trainable parameter (``None`` where
        the wrapper produced none).
    """
    _check_reduction(loss_reduction)
    _check_mode(grad_sample_mode)
    with _reproducible(module):
        wrapped = wrap_model(
            clone_module(module), grad_sample_mode, batch_first=batch_first, loss_reduction=loss_reduction
        )
        try:
            ModelWithLoss(wrapped, loss_reduction)(x).backward()
            result = {name: getattr(p, "grad_sample", None)
                      for name, p in trainable_parameters(wrapped._module)}
        finally:
            wrapped.cleanup()
    return result


def check_torch_version_for_ew_sample() -> bool:
    """Whether ``grad_sample_mode="ew"`` can run with the installed torch: always ``True`` here.

    Opacus needs torch >= 1.13 for ExpandedWeights; dp_torch's ``"ew"`` mode runs on its
    own hooks engine (see :mod:`dp_torch.grad_sample.gsm_exp_weights`).
    """
    return True


def get_grad_sample_modes(use_ew: bool = False) -> list[str]:
    """The modes whose per-sample gradients can be checked here.

    Args:
        use_ew: Include ``"ew"``.

    Returns:
        ``["hooks", "functorch"]``, plus ``"ew"`` when asked.
    """
    modes = ["hooks", "functorch"]
    if use_ew and check_torch_version_for_ew_sample():
        modes.append("ew")
    return modes


def compute_microbatch_grad_sample_tensor_or_seq(
    x: Union[torch.Tensor, PackedSequence],
    module: nn.Module,
    batch_first: bool = True,
    loss_reduction: str = "mean",
) -> dict[str, torch.Tensor]:
    """:func:`compute_microbatch_grad_sample` for a tensor or a ``PackedSequence`` batch.

    A packed batch is split with :func:`unpack_packedsequences` (caller's order).
    """
    if isinstance(x, PackedSequence):
        x = unpack_packedsequences(x)
    return compute_microbatch_grad_sample(x, module, batch_first=batch_first, loss_reduction=loss_reduction)


def compute_grad_samples_microbatch_and_opacus(
    x: Union[torch.Tensor, PackedSequence],
    module: nn.Module,
    batch_first: bool = True,
    loss_reduction: str = "mean",
    grad_sample_mode: str = "hooks",
    chunk_method: Callable = iter,
) -> tuple[dict[str, torch.Tensor], dict[str, Optional[torch.Tensor]]]:
    """The reference and the library's per-sample gradients of the same batch.

    Args:
        x: The batch (a non-empty tensor or a ``PackedSequence``).
        module: The model.
        batch_first: Where the batch dimension is.
        loss_reduction: ``"mean"`` or ``"sum"``.
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ew"``.
        chunk_method: See :func:`compute_microbatch_grad_sample`.

    Returns:
        ``(reference, library)``, both keyed by parameter name.

    Raises:
        RuntimeError: If ``x`` is an empty tensor.
        ValueError: If the two computations do not cover the same parameters, or on an
            invalid ``loss_reduction`` / ``grad_sample_mode``.
    """
    _check_mode(grad_sample_mode)
    if isinstance(x, PackedSequence):
        examples: Any = unpack_packedsequences(x)
    elif is_batch_empty(x):
        raise RuntimeError("x is empty; pass a batch with at least one example.")
    else:
        examples = x
    reference = compute_microbatch_grad_sample(
        examples, module, batch_first=batch_first, loss_reduction=loss_reduction, chunk_method=chunk_method
    )
    library = compute_opacus_grad_sample(
        x, module, batch_first=batch_first, loss_reduction=loss_reduction, grad_sample_mode=grad_sample_mode
    )
    if reference.keys() != library.keys():
        raise ValueError(
            "the reference and the library cover different parameters: only in the reference "
            f"{sorted(reference.keys() - library.keys())}, only in the library "
            f"{sorted(library.keys() - reference.keys())}."
        )
    return reference, library


def _close(reference: torch.Tensor, library: Optional[torch.Tensor], atol: float, rtol: float) -> bool:
    if not isinstance(library, torch.Tensor) or library.shape != reference.shape:
        return False
    dtype = torch.promote_types(reference.dtype, library.dtype)
    return bool(torch.allclose(library.to(dtype), reference.to(dtype), rtol=rtol, atol=atol))


def check_per_sample_gradients_are_correct(
    x: Union[torch.Tensor, PackedSequence],
    module: nn.Module,
    *,
    batch_first: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    grad_sample_mode: str = "hooks",
) -> bool:
    """Whether the per-sample gradients of ``module`` on ``x`` match the batch-size-1 loop.

    Both loss reductions are checked; every trainable parameter's ``p.grad_sample`` must
    have the reference's shape and be ``torch.allclose`` to it.

    Args:
        x: A batch (tensor or ``PackedSequence``).
        module: The model (not modified).
        batch_first: Where the batch dimension is.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ew"``.

    Returns:
        ``True`` if every per-sample gradient matches.

    Raises:
        NotImplementedError: For ``"ew"`` with ``batch_first=False``.
        ValueError: For a mode that does not fill ``p.grad_sample``.
    """
    _check_mode(grad_sample_mode)
    if grad_sample_mode == "ew" and not batch_first:
        raise NotImplementedError(
            'grad_sample_mode="ew" needs batch_first=True, got batch_first=False.'
        )
    for loss_reduction in ("sum", "mean"):
        reference, library = compute_grad_samples_microbatch_and_opacus(
            x, module, batch_first=batch_first, loss_reduction=loss_reduction,
            grad_sample_mode=grad_sample_mode,
        )
        if not all(_close(reference[name], library[name], atol, rtol) for name in reference):
            return False
    return True
