"""The reference shapes of the four benchmark models, shared by the torch and flax twins.

:mod:`benchmarks.models` (PyTorch) and :mod:`benchmarks.models_flax` (flax) build the same
architectures; both take the names, batch sizes, sequence lengths, vocabularies and class
counts from here. Nothing here imports torch or JAX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["MODEL_NAMES", "ModelSpec", "SPECS", "check_name"]


@dataclass(frozen=True)
class ModelSpec:
    """Reference shapes of one benchmark model.

    Attributes:
        name: Key used by ``build_model``.
        title: Human-readable description for reports (without the sequence length).
        batch: Batch size of the published reference table (the GPU batch).
        seq_len: Sequence length for token models, else ``None``.
        vocab: Vocabulary size for token models, else ``None``.
        num_classes: Number of output classes.
    """

    name: str
    title: str
    batch: int
    seq_len: Optional[int]
    vocab: Optional[int]
    num_classes: int


SPECS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", "MLP 784-512-512-10", 1024, None, None, 10),
    "cnn": ModelSpec("cnn", "4-conv CNN, 32x32x3", 512, None, None, 10),
    "lstm": ModelSpec("lstm", "embedding + LSTM(256), vocab 8000", 256, 64, 8000, 2),
    "transformer": ModelSpec("transformer", "transformer, d 256, 4 layers", 64, 128, 8000, 2),
}
MODEL_NAMES: tuple[str, ...] = tuple(SPECS)


def check_name(name: Any) -> None:
    """Refuse a model name that is not in :data:`SPECS`.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    if name not in SPECS:
        raise ValueError(f"name must be one of {list(MODEL_NAMES)}, got {name!r}.")
