"""Differentially private LoRA fine-tuning of a small GPT-2 with the Hugging Face ``Trainer``.

The task and the model are those of ``examples/gpt2_finetune.py`` (generated counting
sequences, a randomly initialised local GPT-2; nothing is downloaded), but only PEFT
LoRA adapters (rank 8, on every attention and MLP projection) train, and the training
loop is ``transformers.Trainer``'s, made private by
:class:`dp_torch.integrations.transformers.DPTrainer`: Poisson logical batches of
``--batch-size * --accumulation`` sequences in expectation, each sequence's gradient
clipped at ``--max-grad-norm``, noise once per logical batch, and a noise multiplier
calibrated so that the run spends at most ``--epsilon`` at ``--delta``. The
``Trainer``'s logs carry ``epsilon``.

It prints the held-out next-token loss and accuracy before and after training, and the
epsilon spent. Usage::

    python examples/hf_trainer_lora.py            # full run
    python examples/hf_trainer_lora.py --smoke    # a few seconds, for the tests

The last line printed is, for example::

    dp_torch Trainer + LoRA: loss 3.49 -> 3.17, accuracy 0.001 -> 0.482 at epsilon 8.00 (delta 1e-05)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Optional

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dp_torch.integrations.transformers import DPTrainer, PrivacyArguments  # noqa: E402
from examples import gpt2_finetune as task  # noqa: E402
from examples._cli import digits_parser, parse_checked  # noqa: E402
from examples._common import run_torch_isolated  # noqa: E402

__all__ = ["Sequences", "main", "parse_args"]

#: Training sequences of the full run and of ``--smoke``.
TRAIN = {False: 4096, True: 512}
#: Epochs of ``--smoke``.
SMOKE_EPOCHS = 2


class Sequences(torch.utils.data.Dataset):
    """Token sequences as ``Trainer`` examples: ``input_ids`` and ``labels`` (the same ids)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        """Keep ``tokens`` (``[count, SEQ_LEN]``)."""
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``--smoke``: 512 sequences, 2 epochs).

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The options.
    """
    parser = digits_parser(__doc__.split("\n\n")[0], hidden=False, lr_help="AdamW learning rate",
                           batch_help="micro-batch (per_device_train_batch_size)")
    parser.set_defaults(epsilon=8.0, epochs=4, batch_size=64, lr=0.02)
    add = parser.add_argument
    add("--accumulation", type=int, default=4,
        help="micro-batches per logical batch (gradient_accumulation_steps, default %(default)d)")
    add("--grad-sample-mode", choices=("hooks", "ghost"), default="ghost",
        help="how per-example gradients are clipped (default %(default)s)")
    add("--threads", type=int, default=1, help="torch intra-op threads (default %(default)d)")
    add("--smoke", action="store_true", help="tiny run for the tests")
    args = parse_checked(parser, argv, train_size=TRAIN[False], smoke_epochs=SMOKE_EPOCHS,
                         extra_checks=lambda a: [("--accumulation", a.accumulation, a.accumulation >= 1),
                                                 ("--threads", a.threads, a.threads >= 1)])
    args.train = TRAIN[args.smoke]
    if args.batch_size * args.accumulation > args.train:
        parser.error(f"--batch-size * --accumulation = {args.batch_size * args.accumulation} exceeds "
                     f"the {args.train} training sequences; lower either.")
    return args


def _lora_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = task.build_model(task.SMOKE)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_proj", "c_fc"])
    return get_peft_model(base, config)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(task.DATA_SEED)
    train = task.make_sequences(args.train, generator)
    test = task.make_sequences(256, generator)
    model = _lora_model(args.seed)
    before = task.evaluate(model, test)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            out, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation, num_train_epochs=args.epochs,
            learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0,
            logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
            disable_tqdm=True, seed=args.seed, dataloader_pin_memory=False,
            log_level="error",
        )
        privacy = PrivacyArguments(target_epsilon=args.epsilon, target_delta=args.delta,
                                   max_grad_norm=args.max_grad_norm)
        trainer = DPTrainer(model=model, args=training, train_dataset=Sequences(train),
                            privacy_args=privacy, grad_sample_mode=args.grad_sample_mode)
        trainer.train()
    return {"before": before, "after": task.evaluate(model, test), "epsilon": trainer.get_epsilon(),
            "delta": args.delta, "steps": trainer.state.global_step,
            "logged_epsilon": [e["epsilon"] for e in trainer.state.log_history if "epsilon" in e]}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train, print the held-out figures before and after and the epsilon spent.

    Args:
        argv: Command-line arguments (see :func:`parse_args`).

    Returns:
        ``before`` and ``after`` (held-out ``loss``, ``perplexity``, ``accuracy``),
        ``epsilon``, ``delta``, ``steps`` (logical steps), ``logged_epsilon`` (the
        ``epsilon`` of each ``Trainer`` log entry) and ``seconds``.
    """
    args = parse_args(argv)
    result = run_torch_isolated(_run, args)
    before, after = result["before"], result["after"]
    print(f"dp_torch Trainer + LoRA: loss {before['loss']:.2f} -> {after['loss']:.2f}, accuracy "
          f"{before['accuracy']:.3f} -> {after['accuracy']:.3f} at epsilon {result['epsilon']:.2f} "
          f"(delta {result['delta']:g})", flush=True)
    return result


if __name__ == "__main__":
    main()
