"""DP-SGD in the Hugging Face ``transformers.Trainer``: :class:`DPTrainer`.

``DPTrainer`` is a ``Trainer`` whose training steps are DP-SGD steps as
docs/design.md (Semantics) defines them:

- **Poisson batches.** The logical batch is ``per_device_train_batch_size *
  gradient_accumulation_steps`` in expectation: each training example joins each
  logical batch independently with rate ``q = logical / len(train_dataset)``
  (:class:`~dp_torch.data_loader.DPDataLoader`), and ``round(1 / q)`` logical batches
  make an epoch. Each logical batch reaches the ``Trainer`` as exactly
  ``gradient_accumulation_steps`` micro-batches (consecutive slices of it, some
  possibly empty), so the ``Trainer``'s gradient accumulation *is* the virtual step.
- **Clipping per example, noise once per logical batch.** Every micro-batch (split
  further into physical batches of at most ``max_physical_batch_size`` rows when
  given) runs forward and backward, and its clipped per-example gradients are added to
  the DP optimizer's running sum (a skipped step, as ``BatchMemoryManager`` does).
  The ``Trainer``'s optimizer step, once per logical batch, adds
  ``N(0, (noise_multiplier * max_grad_norm)**2)`` once, divides by the expected
  logical batch size, records one step in the accountant and updates the parameters.
- **Per-example losses.** The loss of a sequence is the mean of its token losses over
  the labels that are not ``-100`` (:func:`causal_lm_per_example_loss`); a classifier's
  is its cross-entropy (:func:`classification_per_example_loss`); any other can be
  passed as ``per_example_loss``.
- **The budget in the logs.** Every ``Trainer`` log entry carries ``epsilon``, read
  from the engine's accountant at ``PrivacyArguments.target_delta``; ``grad_norm`` is
  the norm of the private (noised, averaged) gradient. With
  ``PrivacyArguments.stop_at_epsilon`` an :class:`EpsilonStopCallback` ends training
  before the step that would exceed it.
- **Checkpoints.** Every ``Trainer`` checkpoint folder also holds
  :data:`PRIVACY_STATE_NAME`: the accountant's ledger, the DP optimizer's settings and
  noise-generator state (:meth:`~dp_torch.optimizers.DPOptimizer.dp_state_dict`) and
  the Poisson sampler's position; ``train(resume_from_checkpoint=...)`` restores them,
  so the resumed run continues the same epsilon and the same random streams.

Guarantee:
    If training runs through :meth:`DPTrainer.train` with a fixed ``train_dataset``,
    the trained parameters are ``(trainer.get_epsilon(delta), delta)``-DP with respect
    to adding or removing one example of ``train_dataset`` (one row: one sequence). The
    training ``loss`` in the ``Trainer``'s logs is *not* private (as in Opacus and
    dp-transformers): it is the plain mean of the sampled examples' losses.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from dp_torch._checkpoint import PRIVACY_STATE_NAME, read_privacy_state
from dp_torch.accountants.utils import get_noise_multiplier
from dp_torch.data_loader import DPDataLoader
from dp_torch.optimizers import DPOptimizer
from dp_torch.privacy_engine import NoiseGenerator, PrivacyEngine
from dp_torch.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from dp_torch.utils.batch_memory_manager import LogicalBatchSplitter

__all__ = [
    "GRAD_SAMPLE_MODES",
    "PRIVACY_STATE_NAME",
    "DPTrainer",
    "EpsilonStopCallback",
    "LogicalBatchSplitter",
    "PrivacyArguments",
    "causal_lm_per_example_loss",
    "classification_per_example_loss",
]

logger = logging.getLogger(__name__)

#: The ``grad_sample_mode`` values :class:`DPTrainer` accepts.
GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch")
#: ``(model outputs, labels) -> one loss per example [B]``.
PerExampleLoss = Callable[[Any, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- arguments


def _check_positive(value: Any, name: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class PrivacyArguments:
    """What makes the training private: the mechanism and the budget (public values only).

    Give exactly one of ``noise_multiplier`` and ``target_epsilon``. With
    ``target_epsilon`` the noise multiplier is calibrated (with ``accountant``) so
    that the whole planned run (``TrainingArguments.max_steps`` if set, else
    ``num_train_epochs`` epochs of ``round(1 / q)`` logical steps) spends at most
    ``target_epsilon`` at ``target_delta``.

    Attributes:
        max_grad_norm: Clipping bound ``C > 0`` of each example's gradient (L2 over all
            trainable parameters). ``TrainingArguments.max_grad_norm`` (clipping of the
            batch gradient) is switched off by :class:`DPTrainer`.
        noise_multiplier: ``sigma >= 0``; the noise std is ``sigma * C``.
        target_epsilon: Budget to calibrate ``sigma`` for.
        target_delta: Delta of the reported epsilon (and of the calibration).
        accountant: ``"rdp"`` (default), ``"prv"``, ``"pld"`` or ``"gdp"``.
        stop_at_epsilon: If set, stop training before the step that would make
            epsilon (at ``target_delta``) exceed it (:class:`EpsilonStopCallback`).
        secure_mode: Poisson sampling and noise from OS entropy (no seeds).
    """

    max_grad_norm: float = 1.0
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    target_delta: float = 1e-5
    accountant: str = "rdp"
    stop_at_epsilon: Optional[float] = None
    secure_mode: bool = False

    def __post_init__(self) -> None:
        """Validate every field.

        Raises:
            ValueError: If not exactly one of ``noise_multiplier`` and
                ``target_epsilon`` is given, or a value is out of range.
        """
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier and target_epsilon, got "
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}."
            )
        _check_positive(self.max_grad_norm, "max_grad_norm")
        if self.noise_multiplier is not None:
            _check_positive(self.noise_multiplier, "noise_multiplier", allow_zero=True)
        for name in ("target_epsilon", "stop_at_epsilon"):
            if getattr(self, name) is not None:
                _check_positive(getattr(self, name), name)
        if not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta!r}.")
        if not isinstance(self.secure_mode, bool):
            raise ValueError(f"secure_mode must be a bool, got {self.secure_mode!r}.")


# --------------------------------------------------------------------------- losses


def _logits(outputs: Any) -> torch.Tensor:
    logits = outputs["logits"] if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(
            f"the model's output ({type(outputs).__name__}) has no logits; pass "
            "per_example_loss=... to DPTrainer to compute one loss per example."
        )
    return logits


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 or wider (a bf16/fp16 cross-entropy loses the small losses)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def causal_lm_per_example_loss(
    outputs: Any, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Next-token loss of each sequence: the mean of its token losses over non-ignored labels.

    Token ``t + 1`` is predicted from the logits at position ``t`` (the shift every
    ``*ForCausalLM`` model applies to ``labels``). A sequence whose labels are all
    ``ignore_index`` has loss 0 (and gradient 0).

    Args:
        outputs: Model outputs with ``logits`` ``[B, T, V]``.
        labels: ``[B, T]`` token ids, ``ignore_index`` where no loss is wanted.
        ignore_index: Label value excluded from the loss.

    Returns:
        ``[B]`` losses, float32 or wider.
    """
    logits = _wide(_logits(outputs))[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    token = F.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=ignore_index, reduction="none"
    )
    counts = (targets != ignore_index).sum(dim=1).clamp(min=1)
    return token.sum(dim=1) / counts.to(token.dtype)


def classification_per_example_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example of a classifier (logits ``[B, C]``, labels ``[B]``).

    Args:
        outputs: Model outputs with ``logits`` ``[B, C]``.
        labels: ``[B]`` class indices.

    Returns:
        ``[B]`` losses, float32 or wider.
    """
    logits = _wide(_logits(outputs))
    if logits.dim() != 2:
        raise ValueError(
            f"classification_per_example_loss needs logits [B, C], got shape {tuple(logits.shape)}; "
            "pass per_example_loss=... to DPTrainer for this model."
        )
    return F.cross_entropy(logits, labels.to(logits.device), reduction="none")


def _is_causal_lm(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


# --------------------------------------------------------------------------- batches


def _rows(inputs: Mapping[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(f"the batch has no tensor with a batch dimension (keys {sorted(inputs)}).")


def _physical_batches(
    inputs: Mapping[str, Any], max_rows: Optional[int]
) -> Iterator[dict[str, Any]]:
    """``inputs`` in row slices of at most ``max_rows`` (all of it when ``None``)."""
    rows = _rows(inputs)
    if max_rows is None or rows <= max_rows:
        yield dict(inputs)
        return
    for start in range(0, rows, max_rows):
        yield {
            k: v[start : start + max_rows]
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v
            for k, v in inputs.items()
        }


# --------------------------------------------------------------------------- callbacks


class EpsilonStopCallback(TrainerCallback):
    """Stop a :class:`DPTrainer` before the step that would spend more than ``target_epsilon``.

    After every optimizer step it asks the trainer's accountant what epsilon one more
    logical step would give; if that exceeds ``target_epsilon`` it sets
    ``control.should_training_stop``, so the step is never taken. ``DPTrainer`` adds it
    itself for ``PrivacyArguments.stop_at_epsilon``.

    Attributes:
        trainer: The trainer whose budget is watched.
        target_epsilon: The epsilon not to exceed.
        delta: The delta of that epsilon (default: the trainer's ``target_delta``).
    """

    def __init__(self, trainer: DPTrainer, target_epsilon: float, delta: Optional[float] = None) -> None:
        """Create the callback (add it with ``trainer.add_callback``).

        Args:
            trainer: The :class:`DPTrainer`.
            target_epsilon: Epsilon not to exceed, ``> 0``.
            delta: Delta of that epsilon; default the trainer's ``target_delta``.
        """
        _check_positive(target_epsilon, "target_epsilon")
        self.trainer = trainer
        self.target_epsilon = float(target_epsilon)
        self.delta = delta

    def _next_exceeds(self) -> bool:
        return self.trainer.epsilon_after_next_step(self.delta) > self.target_epsilon

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Refuse to start when even the first step would exceed the budget.

        Raises:
            ValueError: If one more step already exceeds ``target_epsilon``.
        """
        if self._next_exceeds():
            raise ValueError(
                f"one more step would spend epsilon {self.trainer.epsilon_after_next_step(self.delta):.4g} "
                f"> stop_at_epsilon={self.target_epsilon:g}; nothing is left to train with. Raise "
                "the budget or the noise multiplier."
            )
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Set ``control.should_training_stop`` if the next step would exceed the budget."""
        if self._next_exceeds():
            logger.info("Stopping at step %d: the next step would exceed epsilon %g.",
                        state.global_step, self.target_epsilon)
            control.should_training_stop = True
        return control


class _PrivacyStateCallback(TrainerCallback):
    """Writes the privacy state into each checkpoint and records the private gradient norm."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        self.trainer._record_private_grad_norm()
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.trainer.save_privacy_state(folder)
        return control


# --------------------------------------------------------------------------- trainer


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD (see the module docstring).

    Construct it as a ``Trainer``, plus ``privacy_args``; everything else (the
    optimizer from ``TrainingArguments.optim``, its scheduler, logging, evaluation,
    checkpoints, PEFT models) is the ``Trainer``'s. The model gets dp_torch's
    per-sample-gradient hooks in place (``make_private(wrap_model=False)``), so
    ``trainer.model`` stays the user's model: ``save_model`` and PEFT adapters save as
    usual.

    Example:
        >>> trainer = DPTrainer(
        ...     model=model, args=TrainingArguments("out", per_device_train_batch_size=64,
        ...                                         gradient_accumulation_steps=4),
        ...     train_dataset=train,
        ...     privacy_args=PrivacyArguments(target_epsilon=8.0, max_grad_norm=1.0))
        >>> trainer.train()
        >>> trainer.get_epsilon()

    Attributes:
        privacy_args: The :class:`PrivacyArguments`.
        privacy_engine: The :class:`~dp_torch.PrivacyEngine` (its accountant is the ledger).
        grad_sample_mode: ``"hooks"``, ``"ghost"`` or ``"functorch"``.
        max_physical_batch_size: Largest number of rows per forward/backward pass, or
            ``None`` (each micro-batch at once).
        per_example_loss: ``(outputs, labels) -> [B]`` losses.
    """

    def __init__(
        self,
        *args: Any,
        privacy_args: PrivacyArguments,
        grad_sample_mode: str = "hooks",
        max_physical_batch_size: Optional[int] = None,
        per_example_loss: Optional[PerExampleLoss] = None,
        noise_generator: NoiseGenerator = None,
        **kwargs: Any,
    ) -> None:
        """Create the trainer.

        Args:
            *args: ``Trainer`` arguments (``model``, ``args``, ``data_collator``, ...).
            privacy_args: The privacy settings.
            grad_sample_mode: How per-example gradients are clipped: ``"hooks"``,
                ``"ghost"`` (per-example norms only, less memory) or ``"functorch"``.
                All clip the same gradients.
            max_physical_batch_size: Split each micro-batch into forward/backward passes
                of at most this many rows (bounds memory; changes no result).
            per_example_loss: ``(outputs, labels) -> [B]`` losses; default
                :func:`causal_lm_per_example_loss` for a causal LM (PEFT-wrapped or
                not), else :func:`classification_per_example_loss`.
            noise_generator: ``torch.Generator`` or ``dpcore.noise.NoiseSource`` of the
                noise; ``None`` uses torch's default generator (seeded by the ``Trainer``).
            **kwargs: ``Trainer`` keyword arguments.

        Raises:
            TypeError: If ``privacy_args`` is not a :class:`PrivacyArguments`.
            ValueError: On an invalid option, ``fp16`` training (use ``bf16``), or a
                train dataset without a length.
            NotImplementedError: For more than one process or GPU.
        """
        if not isinstance(privacy_args, PrivacyArguments):
            raise TypeError(f"privacy_args must be a PrivacyArguments, got {type(privacy_args).__name__}.")
        _check_mode_and_rows(grad_sample_mode, max_physical_batch_size)
        super().__init__(*args, **kwargs)
        self._check_training_args()
        self.privacy_args = privacy_args
        self.grad_sample_mode = grad_sample_mode
        self.max_physical_batch_size = max_physical_batch_size
        self.per_example_loss: PerExampleLoss = per_example_loss or (
            causal_lm_per_example_loss if _is_causal_lm(self.model) else classification_per_example_loss
        )
        self.noise_generator = noise_generator
        self.privacy_engine = PrivacyEngine(
            accountant=privacy_args.accountant, secure_mode=privacy_args.secure_mode
        )
        self._poisson_loader: Optional[DPDataLoader] = None
        self._micro_loader: Optional[DataLoader] = None
        self._dp_optimizer: Optional[DPOptimizer] = None
        self._grad_sample_hooks: Any = None
        self._resume_dir: Optional[str] = None
        self._private_grad_norm: Optional[float] = None
        self.add_callback(_PrivacyStateCallback(self))
        if privacy_args.stop_at_epsilon is not None:
            self.add_callback(EpsilonStopCallback(self, privacy_args.stop_at_epsilon))

    def _check_training_args(self) -> None:
        args = self.args
        if args.fp16:
            raise ValueError("DPTrainer does not support fp16 (a loss scaler); use bf16=True instead.")
        if args.world_size > 1 or args.n_gpu > 1:
            raise NotImplementedError(
                f"DPTrainer runs in one process on one device (world_size={args.world_size}, "
                f"n_gpu={args.n_gpu}); for several, use dp_torch.distributed directly."
            )
        if args.max_grad_norm:
            logger.info("DPTrainer clips each example's gradient (PrivacyArguments.max_grad_norm); "
                        "TrainingArguments.max_grad_norm=%g is set to 0.", args.max_grad_norm)
            args.max_grad_norm = 0.0

    # ------------------------------------------------------------------ views

    @property
    def dp_optimizer(self) -> Optional[DPOptimizer]:
        """The DP optimizer (``None`` before training creates it)."""
        return self._dp_optimizer

    @property
    def logical_batch_size(self) -> int:
        """Expected logical batch: ``per_device_train_batch_size * gradient_accumulation_steps``."""
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    @property
    def sample_rate(self) -> float:
        """Poisson rate ``q = logical_batch_size / len(train_dataset)``."""
        return self._poisson().sample_rate

    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """Epsilon spent so far (the engine's accountant).

        Args:
            delta: Delta; default ``privacy_args.target_delta``.

        Returns:
            Epsilon (``0.0`` before the first step).
        """
        return self.privacy_engine.get_epsilon(self._delta(delta))

    def epsilon_after_next_step(self, delta: Optional[float] = None) -> float:
        """Epsilon that one more logical step would give (the ledger is not changed).

        Args:
            delta: Delta; default ``privacy_args.target_delta``.

        Returns:
            The epsilon after one more step with the current noise multiplier.
        """
        accountant = copy.deepcopy(self.privacy_engine.accountant)
        accountant.step(noise_multiplier=self._require_optimizer().noise_multiplier,
                        sample_rate=self.sample_rate)
        return accountant.get_epsilon(self._delta(delta))

    def _delta(self, delta: Optional[float]) -> float:
        return self.privacy_args.target_delta if delta is None else delta

    def _require_optimizer(self) -> DPOptimizer:
        if self._dp_optimizer is None:
            raise RuntimeError("the DP optimizer does not exist yet; it is created by train().")
        return self._dp_optimizer

    # ------------------------------------------------------------------ data

    def _poisson(self) -> DPDataLoader:
        if self._poisson_loader is None:
            self.get_train_dataloader()
        assert self._poisson_loader is not None
        return self._poisson_loader

    def get_train_dataloader(self) -> DataLoader:
        """The micro-batch loader: Poisson logical batches, each as ``gradient_accumulation_steps`` slices.

        Built once (later calls return the same loader, so the sampler's position is
        kept). The dataset and collator are those the ``Trainer`` would use (unused
        columns removed); an empty slice is a zero-row batch.

        Returns:
            A ``DataLoader`` over :class:`LogicalBatchSplitter` batches.

        Raises:
            ValueError: If the logical batch exceeds the data set.
        """
        if self._micro_loader is None:
            base = super().get_train_dataloader()
            self._poisson_loader = self._make_poisson_loader(base.dataset, base.collate_fn)
            self._micro_loader = DataLoader(
                self._poisson_loader.dataset,
                batch_sampler=LogicalBatchSplitter(
                    self._poisson_loader.batch_sampler, self.args.gradient_accumulation_steps
                ),
                collate_fn=self._poisson_loader.collate_fn,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )
        return self._micro_loader

    def _make_poisson_loader(self, dataset: Any, collate_fn: Any) -> DPDataLoader:
        size = len(dataset)
        if self.logical_batch_size > size:
            raise ValueError(
                f"the logical batch (per_device_train_batch_size * gradient_accumulation_steps = "
                f"{self.logical_batch_size}) exceeds the {size} training examples; lower either."
            )
        generator = None
        if not self.privacy_args.secure_mode:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            generator = torch.Generator().manual_seed(seed)
        return DPDataLoader(
            dataset, sample_rate=self.logical_batch_size / size, collate_fn=collate_fn,
            generator=generator, secure_mode=self.privacy_args.secure_mode,
        )

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        """The loader unchanged: the Poisson sampler resumes its own position (from the checkpoint).

        Args:
            dataloader: The training loader.
            num_batches: Micro-batches the ``Trainer`` would skip (already restored).

        Returns:
            ``dataloader``.
        """
        return dataloader

    # ------------------------------------------------------------------ optimizer

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The ``Trainer``'s optimizer made private by :meth:`PrivacyEngine.make_private`.

        The hooks are attached to ``self.model`` in place; the noise multiplier is
        ``privacy_args.noise_multiplier`` or calibrated to ``target_epsilon``. When
        resuming, the privacy state of the checkpoint is restored here.

        Args:
            model: As ``Trainer.create_optimizer``.

        Returns:
            The :class:`~dp_torch.optimizers.DPOptimizer`.
        """
        if self._dp_optimizer is None:
            optimizer = super().create_optimizer(model)
            self.optimizer = self._make_private(optimizer)
        if self._resume_dir is not None:
            self.load_privacy_state(self._resume_dir)
            self._resume_dir = None
        return self.optimizer

    def _make_private(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        out = self.privacy_engine.make_private(
            module=self.model, optimizer=optimizer, data_loader=self._poisson(),
            noise_multiplier=self._noise_multiplier(),
            max_grad_norm=self.privacy_args.max_grad_norm, grad_sample_mode=self.grad_sample_mode,
            wrap_model=False, noise_generator=self.noise_generator,
        )
        self._grad_sample_hooks, self._dp_optimizer = out[0], out[1]
        return self._dp_optimizer

    def _planned_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return math.ceil(self.args.num_train_epochs * len(self._poisson()))

    def _noise_multiplier(self) -> float:
        privacy = self.privacy_args
        if privacy.noise_multiplier is not None:
            return privacy.noise_multiplier
        return get_noise_multiplier(
            target_epsilon=privacy.target_epsilon, target_delta=privacy.target_delta,
            sample_rate=self.sample_rate, steps=self._planned_steps(),
            accountant=self.privacy_engine.accountant.mechanism(),
        )

    # ------------------------------------------------------------------ steps

    def compute_per_example_loss(
        self, model: nn.Module, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, Any]:
        """One loss per example: the forward pass without ``labels``, then ``per_example_loss``.

        Args:
            model: The model.
            inputs: A batch with ``labels``.

        Returns:
            ``([B] losses, model outputs)``.

        Raises:
            ValueError: If the batch has no ``labels`` or the losses are not ``[B]``.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(f"DPTrainer needs 'labels' in each batch (got keys {sorted(inputs)}).")
        outputs = model(**inputs)
        losses = self.per_example_loss(outputs, labels)
        if losses.shape != (labels.shape[0],):
            raise ValueError(
                f"per_example_loss returned shape {tuple(losses.shape)}; it must return one loss "
                f"per example, shape ({labels.shape[0]},)."
            )
        return losses, outputs

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """The mean of the per-example losses (used for evaluation; training uses them one by one).

        Args:
            model: The model.
            inputs: A batch with ``labels``.
            return_outputs: Also return the model outputs.
            num_items_in_batch: Unused (each example's loss is already normalised).

        Returns:
            The loss, or ``(loss, outputs)``.
        """
        losses, outputs = self.compute_per_example_loss(model, inputs)
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> torch.Tensor:
        """Clip and add one micro-batch's per-example gradients to the logical batch's sum.

        Each physical batch runs forward and backward and a *skipped* DP step (clip and
        accumulate, no noise, no update); the gradients are then cleared, so nothing
        non-private is left in ``p.grad``. The ``Trainer``'s optimizer step at the end of
        the logical batch adds the noise once. Empty batches skip the forward pass.

        Args:
            model: The model.
            inputs: One micro-batch (with ``labels``).
            num_items_in_batch: Unused.

        Returns:
            The sum of the micro-batch's losses over the expected logical batch size
            (summed over the micro-batches: the logical batch's mean loss, not private).
        """
        model.train()
        optimizer = self._require_optimizer()
        inputs = self._prepare_inputs(inputs)
        total = torch.zeros((), device=self.args.device)
        for batch in _physical_batches(inputs, self.max_physical_batch_size):
            if _rows(batch) == 0:
                continue
            optimizer.zero_grad(set_to_none=True)  # keeps the running sum of this logical batch
            with self.compute_loss_context_manager():
                losses, _ = self.compute_per_example_loss(model, batch)
            self._backward(losses)
            optimizer.signal_skip_step(True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += losses.detach().sum().to(total.device)
        return total / optimizer.expected_batch_size

    def _backward(self, losses: torch.Tensor) -> None:
        """Backward of the mean loss; in ghost mode the clipped backward of the per-example losses."""
        if self.grad_sample_mode == "ghost":
            DPTensorFastGradientClipping(
                self._grad_sample_hooks, self._dp_optimizer, losses, "mean"
            ).backward()
        else:
            losses.mean().backward()

    def _record_private_grad_norm(self) -> None:
        grads = [p.grad for p in self._require_optimizer().params if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]) if grads else None
        self._private_grad_norm = None if norms is None else float(torch.linalg.vector_norm(norms))

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Log as the ``Trainer`` does, with ``epsilon`` added and ``grad_norm`` made private.

        ``epsilon`` is the engine's at ``privacy_args.target_delta``; ``grad_norm``
        becomes the norm of the last step's noised, averaged gradient (the
        ``Trainer``'s own is taken before the noise).

        Args:
            logs: The values to log.
            start_time: As ``Trainer.log``.
        """
        if self._dp_optimizer is not None:
            logs = dict(logs)
            logs["epsilon"] = self.get_epsilon()
            if "grad_norm" in logs:
                logs["grad_norm"] = self._private_grad_norm
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def save_privacy_state(self, checkpoint_dir: str) -> None:
        """Write :data:`PRIVACY_STATE_NAME` into ``checkpoint_dir``.

        It holds the accountant's state (the ledger), the DP optimizer's
        :meth:`~dp_torch.optimizers.DPOptimizer.dp_state_dict` and the Poisson
        sampler's position. Called for every ``Trainer`` checkpoint.

        Args:
            checkpoint_dir: The checkpoint folder (created if missing).
        """
        state = {
            "accountant": self.privacy_engine.accountant.state_dict(),
            "dp_optimizer": self._require_optimizer().dp_state_dict(),
            "sampler": self._poisson().batch_sampler.state_dict(),
        }
        os.makedirs(checkpoint_dir, exist_ok=True)
        torch.save(state, os.path.join(checkpoint_dir, PRIVACY_STATE_NAME))

    def load_privacy_state(self, checkpoint_dir: str) -> None:
        """Restore what :meth:`save_privacy_state` wrote (``train(resume_from_checkpoint=...)`` calls it).

        The DP optimizer's settings are checked before anything changes; then the
        ledger and the sampler position are replaced.

        Args:
            checkpoint_dir: The checkpoint folder.

        Raises:
            FileNotFoundError: If the folder has no :data:`PRIVACY_STATE_NAME` (resuming
                without the ledger would under-report epsilon).
            ValueError: If a part does not fit this trainer.
        """
        state = read_privacy_state(checkpoint_dir, "DPTrainer")
        self._require_optimizer().load_dp_state_dict(state["dp_optimizer"])
        self.privacy_engine.accountant.load_state_dict(state["accountant"])
        self._poisson().batch_sampler.load_state_dict(state["sampler"])

    def train(
        self,
        resume_from_checkpoint: Optional[Union[str, bool]] = None,
        trial: Any = None,
        ignore_keys_for_eval: Optional[list[str]] = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train``; a resumed run also restores the privacy state of the checkpoint.

        Args:
            resume_from_checkpoint: A checkpoint folder, or ``True`` for the last one in
                ``args.output_dir``.
            trial: As ``Trainer.train``.
            ignore_keys_for_eval: As ``Trainer.train``.
            **kwargs: As ``Trainer.train``.

        Returns:
            The ``Trainer``'s ``TrainOutput``.

        Raises:
            ValueError: If ``resume_from_checkpoint=True`` and there is no checkpoint.
        """
        if isinstance(resume_from_checkpoint, bool):
            resume_from_checkpoint = (
                _last_checkpoint(self.args.output_dir) if resume_from_checkpoint else None
            )
        self._resume_dir = resume_from_checkpoint
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)


def _last_checkpoint(output_dir: str) -> str:
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        raise ValueError(f"resume_from_checkpoint=True but {output_dir!r} holds no checkpoint.")
    return last


def _check_mode_and_rows(grad_sample_mode: Any, max_physical_batch_size: Any) -> None:
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}.")
    if max_physical_batch_size is not None and (
        not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1
    ):
        raise ValueError(
            f"max_physical_batch_size must be None or an int >= 1, got {max_physical_batch_size!r}."
        )
