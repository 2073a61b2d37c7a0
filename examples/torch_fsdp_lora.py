"""Differentially private LoRA fine-tuning of a small Llama under FSDP2 (``torchrun``, CPU and gloo).

The task is the generated counting sequences of ``examples/gpt2_finetune.py`` (nothing is
downloaded). The model is ``transformers.LlamaForCausalLM`` built from a local
``LlamaConfig`` (2 layers, width 64, grouped-query attention, RMSNorm, rotary positions)
with random initialisation; the base stays frozen and PEFT LoRA adapters (rank 8) on every
attention and MLP projection train. A pre-trained checkpoint would take its place through
``from_pretrained`` with the rest unchanged.

Every process holds a shard of the model: each decoder layer is one FSDP2 unit
(``fully_shard``), the root another. ``PrivacyEngine.make_private_with_epsilon(...,
grad_sample_mode="ghost_fsdp")`` makes it private: each rank Poisson-samples its share of
the data at the global rate, clips each of its sequences' gradients (norms from the
gathered parameters), FSDP sums the clipped sums over the ranks into the shards, and the
noise is added once per logical step to every shard. ``BatchMemoryManager`` splits a
logical batch into physical chunks, the same number on every rank (FSDP communicates in
every forward and backward pass, so a rank with an empty chunk runs a zero-weighted
dummy sequence).

Usage (two processes on one machine)::

    torchrun --nproc_per_node 2 examples/torch_fsdp_lora.py
    torchrun --nproc_per_node 2 examples/torch_fsdp_lora.py --smoke   # seconds, for the tests

Rank 0 prints the held-out loss and accuracy before and after, and the epsilon spent; the
last line is, for example::

    dp_torch FSDP2 + LoRA (2 processes): loss 3.49 -> 2.44, accuracy 0.036 -> 0.993 at epsilon 7.99 (delta 1e-05)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dp_torch import PrivacyEngine  # noqa: E402
from dp_torch.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402
from examples import gpt2_finetune as task  # noqa: E402
from examples._cli import digits_parser, parse_checked  # noqa: E402

__all__ = ["FULL", "SMOKE", "build_model", "main", "parse_args", "shard"]


@dataclasses.dataclass(frozen=True)
class Setting:
    """Sizes of one run."""

    train: int
    test: int
    width: int
    layers: int
    batch_size: int
    epochs: int


FULL = Setting(train=4096, test=512, width=64, layers=2, batch_size=256, epochs=8)
SMOKE = Setting(train=512, test=128, width=32, layers=1, batch_size=64, epochs=2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``--smoke`` sets the sizes of :data:`SMOKE`)."""
    parser = digits_parser(__doc__.split("\n\n")[0], hidden=False, lr_help="Adam learning rate",
                           batch_help="expected Poisson batch of a logical step (all ranks)")
    parser.set_defaults(epsilon=8.0, epochs=FULL.epochs, batch_size=FULL.batch_size, lr=0.02)
    parser.add_argument("--physical-batch", type=int, default=64,
                        help="largest physical batch per rank (default %(default)d)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, 2 epochs")
    args = parse_checked(parser, argv, train_size=FULL.train, smoke_epochs=SMOKE.epochs,
                         extra_checks=lambda a: [("--physical-batch", a.physical_batch, a.physical_batch >= 1)])
    args.setting = SMOKE if args.smoke else FULL
    if args.smoke:
        args.batch_size = SMOKE.batch_size
    return args


def build_model(setting: Setting) -> nn.Module:
    """A random Llama with LoRA adapters on every projection (the base frozen)."""
    config = LlamaConfig(
        vocab_size=task.VOCAB, hidden_size=setting.width, intermediate_size=2 * setting.width,
        num_hidden_layers=setting.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=task.SEQ_LEN, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    base = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 units: every decoder layer, then the root (embeddings, final norm, head)."""
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _step_loss(criterion: Any, model: nn.Module, tokens: torch.Tensor) -> Any:
    """The chunk's loss; an empty chunk runs one dummy sequence with weight 0 (FSDP's collectives
    need every rank's forward and backward; a zero loss adds nothing to any gradient)."""
    if len(tokens) == 0:
        return task.next_token_loss(criterion, model, torch.zeros(1, task.SEQ_LEN, dtype=torch.long)) * 0.0
    return task.next_token_loss(criterion, model, tokens)


def evaluate(model: nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """Held-out next-token loss and accuracy (every rank runs it: the forward gathers shards)."""
    figures = task.evaluate(model, tokens)
    return {"loss": figures["loss"], "accuracy": figures["accuracy"]}


def _train(args: argparse.Namespace, engine: PrivacyEngine, model: nn.Module, optimizer: Any,
           criterion: Any, loader: DataLoader) -> None:
    for epoch in range(args.epochs):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=args.physical_batch,
                                optimizer=optimizer) as batches:
            for (tokens,) in batches:
                optimizer.zero_grad()
                _step_loss(criterion, model, tokens).backward()
                optimizer.step()
        if dist.get_rank() == 0:
            print(f"epoch {epoch + 1}: epsilon {engine.get_epsilon(args.delta):.2f}", flush=True)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(task.DATA_SEED)
    train, test = task.make_sequences(args.setting.train, generator), task.make_sequences(args.setting.test, generator)
    torch.manual_seed(args.seed)  # the same initialisation on every rank
    model = shard(build_model(args.setting))
    before = evaluate(model, test)
    loader = DataLoader(TensorDataset(train), batch_size=args.batch_size,
                        generator=torch.Generator().manual_seed(args.seed))
    engine = PrivacyEngine(accountant="rdp")
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped, optimizer, criterion, dp_loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.Adam(trainable, lr=args.lr), data_loader=loader,
        criterion=nn.CrossEntropyLoss(), target_epsilon=args.epsilon, target_delta=args.delta,
        epochs=args.epochs, max_grad_norm=args.max_grad_norm, grad_sample_mode="ghost_fsdp",
    )
    _train(args, engine, wrapped, optimizer, criterion, dp_loader)
    return {"before": before, "after": evaluate(wrapped, test), "epsilon": engine.get_epsilon(args.delta),
            "delta": args.delta, "steps": len(engine.accountant), "world_size": dist.get_world_size()}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Join the ``torchrun`` group (gloo), train, print the figures on rank 0; return them."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    try:
        result = _run(args)
    finally:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        before, after = result["before"], result["after"]
        print(f"dp_torch FSDP2 + LoRA ({result['world_size']} processes): loss {before['loss']:.2f} -> "
              f"{after['loss']:.2f}, accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} at "
              f"epsilon {result['epsilon']:.2f} (delta {result['delta']:g})", flush=True)
        assert math.isfinite(after["loss"])
    return result


if __name__ == "__main__":
    main()
