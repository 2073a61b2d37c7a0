"""Small real models from ``transformers`` (and ``peft``) configs, and a plain-torch
``EmbeddingBag`` classifier, for the torch zoo tests.

Every builder makes a randomly initialised model from a local config (nothing is
downloaded), with dropout 0, in train mode, and a batch for it. A :class:`ZooCase` knows
how to compute one loss per example, so a test can compare the library's clipped sum with
the definition: a loop of single-example backward passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["BUILDERS", "ZooCase", "build"]

BATCH = 6
SEQ = 5
VOCAB = 37


@dataclasses.dataclass
class ZooCase:
    """A model, a batch and its per-example loss.

    Attributes:
        name: Short name of the model.
        model: The model (train mode, dropout 0).
        inputs: Keyword inputs of the whole batch (batch first).
        target: Targets of the whole batch (batch first).
        loss: ``(model output, target) -> per-example losses [B]`` with ``reduction`` ``"sum"``
            over everything but the batch.
        criterion: A loss module for ghost mode (its ``reduction="none"`` output, summed over
            every dimension but the first, is ``loss``).
        prepare: ``criterion input`` from the model output (e.g. logits moved to ``[B, V, T]``).
    """

    name: str
    model: nn.Module
    inputs: dict
    target: torch.Tensor
    criterion: nn.Module
    prepare: Callable[[Any], torch.Tensor]

    @property
    def batch_size(self) -> int:
        """Number of examples in the batch."""
        return int(self.target.shape[0])

    def example(self, i: int) -> tuple[dict, torch.Tensor]:
        """Inputs and target of example ``i`` alone (a batch of one)."""
        return {k: v[i : i + 1] for k, v in self.inputs.items()}, self.target[i : i + 1]

    def per_example_loss(self, model: nn.Module, inputs: dict, target: torch.Tensor) -> torch.Tensor:
        """Per-example losses ``[b]`` of ``model`` on a batch (sum over tokens/classes)."""
        old = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            losses = self.criterion(self.prepare(model(**inputs)), target)
        finally:
            self.criterion.reduction = old
        return losses.reshape(losses.shape[0], -1).sum(dim=1)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _sequence_logits(out: Any) -> torch.Tensor:
    return _logits(out).permute(0, 2, 1)  # [B, V, T] for CrossEntropyLoss over tokens


def _tokens(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)


def _lm_case(name: str, model: nn.Module, gen: torch.Generator) -> ZooCase:
    ids = _tokens(gen)
    return ZooCase(name, model, {"input_ids": ids}, torch.roll(ids, -1, dims=1),
                   nn.CrossEntropyLoss(reduction="sum"), _sequence_logits)


def _classifier_case(name: str, model: nn.Module, inputs: dict, classes: int, gen: torch.Generator) -> ZooCase:
    target = torch.randint(0, classes, (BATCH,), generator=gen)
    return ZooCase(name, model, inputs, target, nn.CrossEntropyLoss(reduction="sum"), _logits)


def gpt2(gen: torch.Generator) -> ZooCase:
    """GPT-2 language model (tied input/output embedding, position ids broadcast)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=1, eos_token_id=2)
    return _lm_case("gpt2", GPT2LMHeadModel(cfg), gen)


def gpt2_lora(gen: torch.Generator) -> ZooCase:
    """GPT-2 with PEFT LoRA adapters on the attention projections (only they train)."""
    from peft import LoraConfig, get_peft_model

    base = gpt2(gen)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj"],
                     fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(base.model, cfg)
    return dataclasses.replace(base, name="gpt2_lora", model=model)


def bert(gen: torch.Generator) -> ZooCase:
    """BERT sequence classifier (position and token-type ids broadcast against the batch)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    inputs = {"input_ids": _tokens(gen), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}
    return _classifier_case("bert", BertForSequenceClassification(cfg), inputs, 3, gen)


def roberta(gen: torch.Generator) -> ZooCase:
    """RoBERTa sequence classifier (position ids derived from the tokens)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=SEQ + 4, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
    inputs = {"input_ids": _tokens(gen)}
    return _classifier_case("roberta", RobertaForSequenceClassification(cfg), inputs, 3, gen)


def _keep_float64_rmsnorm(model: nn.Module) -> None:
    """Make Llama's RMSNorm compute in float64 for a float64 model.

    ``LlamaRMSNorm`` computes in float32 whatever the input dtype (meant to *widen* half
    precision), so a float64 Llama is only float32-accurate, and the clipped sum of ghost
    clipping (from each example's backprops scaled after that rounding) differs
    from the loop of single examples by float32 rounding. Computing in the wider of float32
    and the input dtype keeps the model's intent and makes float64 exact.
    """
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class WideRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            wide = torch.promote_types(hidden_states.dtype, torch.float32)
            h = hidden_states.to(wide)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * h.to(hidden_states.dtype)

    for module in model.modules():
        if type(module) is LlamaRMSNorm:
            module.__class__ = WideRMSNorm


def llama(gen: torch.Generator) -> ZooCase:
    """Llama language model (RMSNorm, rotary embeddings, gated MLP, grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = LlamaForCausalLM(cfg)
    _keep_float64_rmsnorm(model)
    return _lm_case("llama", model, gen)


def vit(gen: torch.Generator) -> ZooCase:
    """ViT image classifier (patch conv, class token and position embeddings as parameters)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=24, num_labels=3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    inputs = {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=gen)}
    return _classifier_case("vit", ViTForImageClassification(cfg), inputs, 3, gen)


def resnet(gen: torch.Generator) -> ZooCase:
    """transformers' ResNet classifier with its BatchNorms replaced by GroupNorm."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from dp_torch.validators import ModuleValidator

    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=3)
    model = ModuleValidator.fix(ResNetForImageClassification(cfg))
    inputs = {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=gen)}
    return _classifier_case("resnet", model, inputs, 3, gen)


class BagClassifier(nn.Module):
    """Two ``EmbeddingBag`` encoders of the same tokens (weighted sum with a padding id, and
    mean) feeding a linear classifier."""

    def __init__(self, dim: int = 8, classes: int = 3):
        super().__init__()
        self.weighted = nn.EmbeddingBag(VOCAB, dim, mode="sum", padding_idx=3)
        self.mean = nn.EmbeddingBag(VOCAB, dim, mode="mean")
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, input_ids: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
        bags = [self.weighted(input_ids, per_sample_weights=token_weights), self.mean(input_ids)]
        return self.head(torch.tanh(torch.cat(bags, dim=1)))


def embedding_bag(gen: torch.Generator) -> ZooCase:
    """Bag-of-words classifier from ``nn.EmbeddingBag`` (per-sample weights, padding id, mean)."""
    ids = _tokens(gen)
    ids[0, :2] = 3  # padding tokens
    inputs = {"input_ids": ids, "token_weights": torch.rand(BATCH, SEQ, generator=gen)}
    return _classifier_case("embedding_bag", BagClassifier(), inputs, 3, gen)


class _MLP(nn.Module):
    def __init__(self, width: int = 32, classes: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_lora(gen: torch.Generator) -> ZooCase:
    """A plain-torch MLP with PEFT LoRA adapters on both layers (only they train); the
    adapters are wide enough that ghost mode takes their norm samplers."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["fc1", "fc2"], init_lora_weights=False)
    model = get_peft_model(_MLP(), cfg)
    return _classifier_case("mlp_lora", model, {"x": torch.randn(BATCH, 32, generator=gen)}, 3, gen)


BUILDERS: dict[str, Callable[[torch.Generator], ZooCase]] = {
    "mlp_lora": mlp_lora,
    "embedding_bag": embedding_bag,
    "gpt2": gpt2,
    "bert": bert,
    "roberta": roberta,
    "llama": llama,
    "vit": vit,
    "gpt2_lora": gpt2_lora,
    "resnet": resnet,
}


def build(name: str, dtype: torch.dtype, seed: int = 0) -> ZooCase:
    """Build the zoo case ``name`` in ``dtype`` (train mode, inputs converted to ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    case = BUILDERS[name](gen)
    case.model.to(dtype).train()
    case.inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.inputs.items()}
    return case
