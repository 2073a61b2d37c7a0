"""Helpers for ``torch.nn.utils.rnn.PackedSequence`` (mirrors ``opacus.utils.packed_sequences``).

A ``PackedSequence`` stores its sequences sorted by decreasing length, time step by
time step: ``batch_sizes[t]`` is the number of sequences longer than ``t``. The
helpers here recover per-sequence information from that layout.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence

__all__ = ["compute_seq_lengths", "unpacked_indices"]


def _check_batch_sizes(batch_sizes: torch.Tensor) -> torch.Tensor:
    if not isinstance(batch_sizes, torch.Tensor) or batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
        raise ValueError(
            "batch_sizes must be a non-empty 1-D tensor (PackedSequence.batch_sizes), got "
            f"{batch_sizes!r}."
        )
    sizes = batch_sizes.to("cpu", torch.long)
    if bool((sizes[1:] > sizes[:-1]).any()) or int(sizes[-1]) < 1:
        raise ValueError(
            f"batch_sizes must be positive and non-increasing, got {sizes.tolist()}; pass the "
            "batch_sizes of a PackedSequence."
        )
    return sizes


def compute_seq_lengths(batch_sizes: torch.Tensor) -> list[int]:
    """The length of each sequence of a packed batch, in the packed (sorted) order.

    Sequence ``i`` of the sorted batch is present at every time step ``t`` with
    ``batch_sizes[t] > i``, so its length is the number of such steps. The result is the
    ``lengths`` argument that ``pack_padded_sequence`` would need for the sorted batch
    (non-increasing).

    Args:
        batch_sizes: ``PackedSequence.batch_sizes``.

    Returns:
        ``batch_sizes[0]`` lengths, longest first.

    Raises:
        ValueError: If ``batch_sizes`` is empty, not 1-D, or increases somewhere.

    Example:
        >>> compute_seq_lengths(torch.tensor([3, 2, 2, 1]))
        [4, 3, 1]
    """
    sizes = _check_batch_sizes(batch_sizes)
    rows = torch.arange(int(sizes[0])).unsqueeze(1)
    return (sizes.unsqueeze(0) > rows).sum(dim=1).tolist()


def unpacked_indices(packed: PackedSequence) -> list[int]:
    """The caller's batch position of each sequence, in the packed (sorted) order.

    Entry ``i`` is the index, in the batch given to ``pack_padded_sequence`` /
    ``pack_sequence``, of the ``i``-th longest sequence (``packed.sorted_indices``, or
    ``0, 1, ...`` for a batch packed with ``enforce_sorted=True``).

    Args:
        packed: The packed batch.
    """
    if not isinstance(packed, PackedSequence):
        raise TypeError(f"packed must be a PackedSequence, got {type(packed).__name__}.")
    if packed.sorted_indices is None:
        return list(range(int(packed.batch_sizes[0])))
    return packed.sorted_indices.tolist()
