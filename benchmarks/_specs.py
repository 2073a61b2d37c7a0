"""The reference shapes of the benchmark models, shared by the torch and flax twins.

:mod:`benchmarks.models` (PyTorch) and :mod:`benchmarks.models_flax` (flax) build the same
architectures; both take the names, batch sizes, sequence lengths, vocabularies and class
counts from here. Nothing here imports torch or JAX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["LANGUAGE_MODELS", "MODEL_NAMES", "ModelSpec", "SPECS", "check_name"]


@dataclass(frozen=True)
class ModelSpec:
    """Reference shapes of one benchmark model.

    Attributes:
        name: Key used by ``build_model``.
        title: Human-readable description for reports (without the sequence length).
        batch: Batch size of the published reference table (the GPU batch).
        seq_len: Sequence length for token models, else ``None``.
        vocab: Vocabulary size for token models, else ``None``.
        num_classes: Number of output classes (the vocabulary for the language model,
            whose labels are the next token at every position).
        width: Model width of the transformers (``d``), else ``None``.
        heads: Attention heads of the transformers, else ``None``.
    """

    name: str
    title: str
    batch: int
    seq_len: Optional[int]
    vocab: Optional[int]
    num_classes: int
    width: Optional[int] = None
    heads: Optional[int] = None


SPECS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", "MLP 784-512-512-10", 1024, None, None, 10),
    "cnn": ModelSpec("cnn", "4-conv CNN, 32x32x3", 512, None, None, 10),
    "lstm": ModelSpec("lstm", "embedding + LSTM(256), vocab 8000", 256, 64, 8000, 2),
    "transformer": ModelSpec("transformer", "transformer, d 256, 4 layers", 64, 128, 8000, 2,
                             256, 4),
    "transformer-768": ModelSpec("transformer-768", "transformer, d 768, 4 layers", 32, 128,
                                 8000, 2, 768, 12),
    "gpt2": ModelSpec("gpt2", "GPT-2 LM, d 256, 4 layers", 32, 128, 8000, 8000, 256, 4),
}
MODEL_NAMES: tuple[str, ...] = tuple(SPECS)
#: Models trained on next-token prediction: labels ``[B, T]``, logits ``[B, T, vocab]``, and
#: the loss of an example is the mean over its positions.
LANGUAGE_MODELS: tuple[str, ...] = ("gpt2",)


def check_name(name: Any) -> None:
    """Refuse a model name that is not in :data:`SPECS`.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    if name not in SPECS:
        raise ValueError(f"name must be one of {list(MODEL_NAMES)}, got {name!r}.")

