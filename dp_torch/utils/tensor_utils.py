"""Per-sample tensor helpers (mirrors ``opacus.utils.tensor_utils``).

* per-sample norms of per-sample gradients (:func:`calc_sample_norms`,
  :func:`calc_sample_norms_one_layer`), always accumulated in float32 or wider;
* :func:`sum_over_all_but_batch_and_last_n`, used by the normalisation layers' samplers;
* sliding-window extraction for convolutions (:func:`unfold2d`, :func:`unfold3d`,
  :func:`filter_dilated_rows`): the ``[B, C * prod(kernel), L]`` layout of
  ``torch.nn.functional.unfold``, for 4-D and 5-D inputs, with ``padding="same"`` and
  ``"valid"`` as the convolution layers accept them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Union

import torch
import torch.nn.functional as F

__all__ = [
    "calc_sample_norms",
    "calc_sample_norms_one_layer",
    "filter_dilated_rows",
    "sum_over_all_but_batch_and_last_n",
    "unfold2d",
    "unfold3d",
]

IntOrTuple = Union[int, Sequence[int]]


def calc_sample_norms_one_layer(param: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of ``param`` ``[B, ...]`` (one per example), float32 or wider.

    Args:
        param: Per-sample gradients of one parameter, batch first.

    Returns:
        A ``[B]`` tensor.
    """
    dtype = torch.promote_types(param.dtype, torch.float32)
    return torch.linalg.vector_norm(param.reshape(param.shape[0], -1), dim=1, dtype=dtype)


def calc_sample_norms(
    named_params: Iterable[tuple[str, torch.Tensor]], *, flat: bool = True
) -> list[torch.Tensor]:
    """Per-example norms of several per-sample gradient tensors.

    Args:
        named_params: ``(name, tensor)`` pairs, each tensor ``[B, ...]`` with the same ``B``.
        flat: ``True``: one ``[B]`` tensor, the norm over *all* tensors together (DP-SGD's
            per-example norm); ``False``: one ``[B]`` tensor per input tensor.

    Returns:
        A list of ``[B]`` tensors (of length one when ``flat``).

    Raises:
        ValueError: If ``named_params`` is empty or the batch sizes differ.
    """
    norms = [calc_sample_norms_one_layer(p) for _, p in named_params]
    if not norms:
        raise ValueError("named_params is empty; pass at least one (name, per-sample tensor) pair.")
    sizes = {n.shape[0] for n in norms}
    if len(sizes) > 1:
        raise ValueError(f"per-sample tensors have different batch sizes {sorted(sizes)}; they must agree.")
    if not flat:
        return norms
    dtype = norms[0].dtype
    for n in norms[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    stacked = torch.stack([n.to(dtype) for n in norms], dim=0)
    return [torch.linalg.vector_norm(stacked, dim=0)]


def sum_over_all_but_batch_and_last_n(tensor: torch.Tensor, n_dims: int) -> torch.Tensor:
    """Sum ``tensor`` over every dimension but the first (batch) and the last ``n_dims``.

    Args:
        tensor: ``[B, ..., X_1, ..., X_n]``.
        n_dims: How many trailing dimensions to keep.

    Returns:
        ``[B, X_1, ..., X_n]`` (``tensor`` itself when there is nothing to sum).

    Example:
        >>> sum_over_all_but_batch_and_last_n(torch.ones(2, 3, 4, 5), n_dims=1).shape
        torch.Size([2, 5])
    """
    if isinstance(n_dims, bool) or not isinstance(n_dims, int) or not 0 <= n_dims < tensor.dim():
        raise ValueError(
            f"n_dims must be an int in [0, {tensor.dim() - 1}] for a {tensor.dim()}-D tensor, got {n_dims!r}."
        )
    dims = list(range(1, tensor.dim() - n_dims))
    return tensor.sum(dim=dims) if dims else tensor


def _triple(value: IntOrTuple, name: str, rank: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * rank
    values = tuple(value)
    if len(values) != rank or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be an int or {rank} ints, got {value!r}.")
    return values


def _pads(
    padding: Union[str, IntOrTuple], kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding per spatial dimension, as the convolution layers do."""
    rank = len(kernel)
    if padding == "valid":
        return [(0, 0)] * rank
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int or {rank} ints, got {padding!r}.")
    return [(p, p) for p in _triple(padding, "padding", rank)]


def _unfold(
    x: torch.Tensor, kernel: tuple[int, ...], padding: Union[str, IntOrTuple],
    stride: tuple[int, ...], dilation: tuple[int, ...],
) -> torch.Tensor:
    """Sliding windows of ``x`` ``[B, C, *spatial]`` as ``[B, C * prod(kernel), L]``."""
    rank = len(kernel)
    flat_pad = [p for pair in reversed(_pads(padding, kernel, dilation)) for p in pair]
    windows = F.pad(x, flat_pad)
    reach = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    for axis in range(rank):
        windows = windows.unfold(2 + axis, reach[axis], stride[axis])
    # [B, C, *out_positions, *reach] -> keep every dilation-th element of each window
    windows = filter_dilated_rows(windows, dilation, reach, kernel)
    batch, channels = x.shape[0], x.shape[1]
    positions = math.prod(windows.shape[2:2 + rank])
    order = [0, 1, *range(2 + rank, 2 + 2 * rank), *range(2, 2 + rank)]
    return windows.permute(order).reshape(batch, channels * math.prod(kernel), positions)


def _checked_unfold(
    tensor: torch.Tensor, name: str, layout: str, kernel_size: IntOrTuple,
    padding: Union[str, IntOrTuple], stride: IntOrTuple, dilation: IntOrTuple,
) -> torch.Tensor:
    """Checks that ``tensor`` has one dim per letter of ``layout``, then unfolds it."""
    spatial = layout.count(",") - 1
    if tensor.dim() != spatial + 2:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(tensor.shape)}.")
    kernel = _triple(kernel_size, "kernel_size", spatial)
    return _unfold(tensor, kernel, padding, _triple(stride, "stride", spatial),
                   _triple(dilation, "dilation", spatial))


def unfold2d(
    input: torch.Tensor,
    *,
    kernel_size: IntOrTuple,
    padding: Union[str, IntOrTuple],
    stride: IntOrTuple,
    dilation: IntOrTuple,
) -> torch.Tensor:
    """``torch.nn.functional.unfold`` for ``[B, C, H, W]``, also accepting ``"same"`` / ``"valid"``.

    Args:
        input: ``[B, C, H, W]``.
        kernel_size: Window size (int or pair).
        padding: Zero padding per side (int or pair), ``"same"`` (the extra element of an
            odd total goes after, as in ``nn.Conv2d``) or ``"valid"``.
        stride: Step between windows.
        dilation: Spacing of the window elements.

    Returns:
        ``[B, C * kh * kw, L]`` with ``L`` the number of window positions.
    """
    return _checked_unfold(input, "input", "[B, C, H, W]", kernel_size, padding, stride, dilation)


def unfold3d(
    tensor: torch.Tensor,
    *,
    kernel_size: IntOrTuple,
    padding: Union[str, IntOrTuple] = 0,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
) -> torch.Tensor:
    """The 3-D counterpart of :func:`unfold2d` (``torch.nn.functional.unfold`` is 2-D only).

    Args:
        tensor: ``[B, C, D, H, W]``.
        kernel_size: Window size (int or triple).
        padding: Zero padding per side (int or triple), ``"same"`` or ``"valid"``.
        stride: As in :func:`unfold2d`, an int or a triple.
        dilation: As in :func:`unfold2d`, an int or a triple.

    Returns:
        ``[B, C * kd * kh * kw, L]``; the convolution ``F.conv3d(tensor, w)`` equals
        ``w.view(C_out, -1) @ unfold3d(tensor, ...)`` reshaped to the output positions.

    Raises:
        ValueError: If ``tensor`` is not 5-D or an argument is malformed.
    """
    return _checked_unfold(tensor, "tensor", "[B, C, D, H, W]", kernel_size, padding, stride, dilation)


def filter_dilated_rows(
    tensor: torch.Tensor,
    dilation: Sequence[int],
    dilated_kernel_size: Sequence[int],
    kernel_size: Sequence[int],
) -> torch.Tensor:
    """Keep every ``dilation``-th element of the windows in the last ``len(kernel_size)`` dims.

    A dilated window spans ``dilated_kernel_size = dilation * (kernel_size - 1) + 1``
    elements of which only every ``dilation``-th one meets a kernel weight.

    Args:
        tensor: ``[..., *dilated_kernel_size]``.
        dilation: Spacing per window dimension.
        dilated_kernel_size: Span of a window per dimension.
        kernel_size: Number of kernel elements per dimension.

    Returns:
        ``[..., *kernel_size]``.
    """
    rank = len(kernel_size)
    first = tensor.dim() - rank
    for axis in range(rank):
        dim = first + axis
        if tensor.shape[dim] != dilated_kernel_size[axis]:
            raise ValueError(
                f"tensor has size {tensor.shape[dim]} in window dimension {axis}, expected "
                f"dilated_kernel_size[{axis}]={dilated_kernel_size[axis]}."
            )
        if dilation[axis] != 1:
            index = torch.arange(0, dilated_kernel_size[axis], dilation[axis], device=tensor.device)
            tensor = tensor.index_select(dim, index)
    return tensor
