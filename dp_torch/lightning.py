"""Private training with PyTorch Lightning: a data module wrapper and a callback.

* :class:`DPLightningDataModule` (Opacus' name and behaviour) wraps a
  ``LightningDataModule`` and replaces its train loader by a Poisson
  :class:`~dp_torch.data_loader.DPDataLoader`; the validation, test and predict
  loaders and the data hooks are the wrapped module's.
* :class:`DPCallback` makes a ``LightningModule`` train privately: when training
  starts it attaches per-sample-gradient hooks to the module and wraps its
  optimizer in a DP optimizer (through :meth:`dp_torch.PrivacyEngine.make_private`),
  logs ``epsilon`` after every logical step and can stop before a target epsilon
  is exceeded.

Gradient accumulation (``Trainer(accumulate_grad_batches=k)``) is a virtual step:
the data module draws one Poisson logical batch of expected size ``k * batch_size``
and hands it to Lightning as ``k`` physical chunks; each chunk's examples are
clipped, the optimizer step at the end of the ``k`` chunks adds noise once and the
accountant records one step at the logical sampling rate.

This module needs Lightning (``pip install lightning``); ``import dp_torch`` does not.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "dp_torch.lightning needs PyTorch Lightning 2.x; install it with `pip install lightning`."
    ) from exc

from dp_torch.data_loader import DPDataLoader, loader_settings
from dp_torch.optimizers import DPOptimizer
from dp_torch.privacy_engine import PrivacyEngine
from dp_torch.utils.batch_memory_manager import LogicalBatchSplitter

__all__ = ["DPCallback", "DPLightningDataModule", "logical_loader"]

#: Attribute of a split train loader that holds its logical Poisson loader.
_LOGICAL = "dp_logical_loader"


def _split_loader(logical: DPDataLoader, chunks: int) -> DataLoader:
    """A loader over ``logical``'s batches, each cut into ``chunks`` physical batches."""
    loader = DataLoader(
        logical.dataset, batch_sampler=LogicalBatchSplitter(logical.batch_sampler, chunks),
        generator=logical.generator, **loader_settings(logical),
    )
    setattr(loader, _LOGICAL, logical)
    return loader


def logical_loader(loader: Any) -> Optional[DPDataLoader]:
    """The Poisson loader whose logical batches ``loader`` yields, or ``None``.

    Args:
        loader: A train loader: a ``DPDataLoader`` or a split loader made by
            :class:`DPLightningDataModule` for gradient accumulation.
    """
    if isinstance(loader, DPDataLoader):
        return loader
    inner = getattr(loader, _LOGICAL, None)
    return inner if isinstance(inner, DPDataLoader) else None


def _chunks_of(loader: Any) -> int:
    sampler = getattr(loader, "batch_sampler", None)
    return sampler.parts if isinstance(sampler, LogicalBatchSplitter) else 1


def _accumulation(trainer: Optional[pl.Trainer]) -> int:
    return 1 if trainer is None else int(trainer.accumulate_grad_batches)


class DPLightningDataModule(pl.LightningDataModule):
    """A ``LightningDataModule`` whose train loader samples Poisson batches.

    The train loader is the wrapped module's ``train_dataloader()`` turned into a
    :class:`~dp_torch.data_loader.DPDataLoader` with ``sample_rate = 1 /
    len(loader)`` (expected batch size: the original ``batch_size``), keeping its
    workers, collate function and other settings. Every other loader, the data
    hooks (``prepare_data``, ``setup``, ``teardown``, batch transfer) and the state
    dict are the wrapped module's.

    With ``Trainer(accumulate_grad_batches=k)`` a logical batch is ``k`` physical
    batches: the sampling rate becomes ``min(1, k / len(loader))`` and each Poisson
    batch comes as ``k`` consecutive chunks, so that :class:`DPCallback` adds noise
    once per logical batch.

    Args:
        datamodule: The data module to wrap.
        generator: Source of the sampling randomness (``None``: the wrapped train
            loader's generator, else torch's default generator).
    """

    def __init__(self, datamodule: pl.LightningDataModule,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(
                f"datamodule must be a lightning.pytorch.LightningDataModule, got "
                f"{type(datamodule).__name__}."
            )
        self.datamodule = datamodule
        self.generator = generator

    def prepare_data(self) -> None:
        """The wrapped module's ``prepare_data``."""
        self.datamodule.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        """The wrapped module's ``setup`` (it also gets this module's trainer)."""
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def teardown(self, stage: str) -> None:
        """The wrapped module's ``teardown``."""
        self.datamodule.teardown(stage)

    def train_dataloader(self) -> DataLoader:
        """The Poisson train loader (split into chunks under gradient accumulation)."""
        original = self.datamodule.train_dataloader()
        chunks = _accumulation(self.trainer)
        if chunks == 1:
            return DPDataLoader.from_data_loader(original, generator=self.generator)
        generator = self.generator if self.generator is not None else original.generator
        logical = DPDataLoader(
            original.dataset, sample_rate=min(1.0, chunks / len(original)),
            generator=generator, **loader_settings(original),
        )
        return _split_loader(logical, chunks)

    def val_dataloader(self) -> Any:
        """The wrapped module's validation loader(s)."""
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        """The wrapped module's test loader(s)."""
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        """The wrapped module's predict loader(s)."""
        return self.datamodule.predict_dataloader()

    def transfer_batch_to_device(self, batch: Any, device: torch.device,
                                 dataloader_idx: int) -> Any:
        """The wrapped module's ``transfer_batch_to_device``."""
        return self.datamodule.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The wrapped module's ``on_before_batch_transfer``."""
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The wrapped module's ``on_after_batch_transfer``."""
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped module's state dict."""
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the wrapped module's state dict."""
        self.datamodule.load_state_dict(state_dict)


def _positive(value: Any, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


class DPCallback(pl.Callback):
    """Train a ``LightningModule`` with DP-SGD (per-example clipping, Gaussian noise).

    When training starts, the callback validates the module, attaches
    per-sample-gradient hooks to it (the module itself stays the one Lightning
    trains) and replaces its optimizer by the DP optimizer of
    :meth:`dp_torch.PrivacyEngine.make_private`, whose accountant steps once per
    logical step at the train loader's sampling rate. The train loader must be
    Poisson: use :class:`DPLightningDataModule`, or return a
    :class:`~dp_torch.data_loader.DPDataLoader` from ``train_dataloader``.

    After every optimizer step, ``epsilon`` (at ``target_delta``) is logged with
    ``pl_module.log`` (to the progress bar and the logger). With
    ``target_epsilon``, training stops after the last step whose epsilon stays
    within the target (``trainer.should_stop``); a ``noise_multiplier`` of ``None``
    is calibrated so that the planned steps (``max_steps``, else ``max_epochs``
    epochs) end at the target.

    Gradient accumulation: Lightning divides the loss by ``accumulate_grad_batches``
    before the backward pass; the callback multiplies it back, so each example is
    clipped at ``max_grad_norm`` exactly as in one step over the whole logical batch.

    Ghost clipping (``grad_sample_mode="ghost"``): the module's criterion attribute
    (``criterion_attr``) is replaced by the DP loss wrapper during training, and
    ``training_step`` must return the loss in a dict (``{"loss": loss}``), because
    Lightning accepts a bare return value only if it is a ``torch.Tensor``.

    Guarantee: with Poisson batches, each logical step is the sampled Gaussian
    mechanism with multiplier ``noise_multiplier`` and sensitivity
    ``max_grad_norm``; the logged epsilon is the accountant's bound for the steps
    taken.

    Args:
        max_grad_norm: Clipping bound ``C > 0``.
        target_delta: The delta at which epsilon is reported.
        noise_multiplier: ``sigma >= 0``, or ``None`` to calibrate it to ``target_epsilon``.
        target_epsilon: Optional budget: stop before exceeding it.
        accountant: ``"rdp"``, ``"prv"``, ``"gdp"`` or ``"pld"``.
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ghost"``.
        clipping: ``"flat"`` or ``"per_layer"`` (``max_grad_norm`` a list then).
        loss_reduction: ``"mean"`` or ``"sum"``, the reduction of the module's loss.
        noise_generator: ``torch.Generator`` for reproducible noise.
        secure_mode: Noise from OS entropy, hardened (refuses ``noise_generator``).
        criterion_attr: Name of the module's loss attribute (ghost mode only).
        log_name: Name under which epsilon is logged.

    Attributes:
        privacy_engine: The engine (its ``accountant`` holds the ledger).
        optimizer: The DP optimizer while training (``None`` before).
    """

    def __init__(
        self,
        *,
        max_grad_norm: Union[float, list[float]],
        target_delta: float,
        noise_multiplier: Optional[float] = None,
        target_epsilon: Optional[float] = None,
        accountant: str = "rdp",
        grad_sample_mode: str = "hooks",
        clipping: str = "flat",
        loss_reduction: str = "mean",
        noise_generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
        criterion_attr: str = "criterion",
        log_name: str = "epsilon",
    ) -> None:
        if noise_multiplier is None and target_epsilon is None:
            raise ValueError("Give noise_multiplier, target_epsilon, or both.")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}.")
        _positive(target_epsilon, "target_epsilon", allow_none=True)
        if grad_sample_mode not in ("hooks", "functorch", "ghost"):
            raise ValueError(
                f'grad_sample_mode must be "hooks", "functorch" or "ghost", got {grad_sample_mode!r}.'
            )
        self.privacy_engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        self.max_grad_norm = max_grad_norm
        self.target_delta = target_delta
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.grad_sample_mode = grad_sample_mode
        self.clipping = clipping
        self.loss_reduction = loss_reduction
        self.noise_generator = noise_generator
        self.criterion_attr = criterion_attr
        self.log_name = log_name
        self.optimizer: Optional[DPOptimizer] = None
        self._hooks: Any = None
        self._undo: list[Any] = []
        self._sample_rate = 0.0
        self._last_step = 0
        self._chunks = 1
        self._passes = 0

    # ---------------------------------------------------------------- checks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse Trainer settings that would break the guarantee (before any work)."""
        if stage != "fit":
            return
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val!r}) clips the batch "
                "gradient, which DP-SGD replaces by per-example clipping: remove it and set "
                "DPCallback(max_grad_norm=...) instead."
            )
        if any(isinstance(c, pl.callbacks.GradientAccumulationScheduler) for c in trainer.callbacks):
            raise ValueError(
                "GradientAccumulationScheduler changes the logical batch during training; the "
                "sampling rate of a private run is fixed. Use a constant accumulate_grad_batches."
            )

    def _train_loader(self, trainer: pl.Trainer) -> DPDataLoader:
        loader = trainer.train_dataloader
        logical = logical_loader(loader)
        if logical is None:
            raise ValueError(
                f"DPCallback needs a Poisson train loader, got {type(loader).__name__}: wrap the "
                "data module in dp_torch.lightning.DPLightningDataModule, or return a "
                "dp_torch.data_loader.DPDataLoader from train_dataloader()."
            )
        chunks, accumulate = _chunks_of(loader), trainer.accumulate_grad_batches
        if chunks != accumulate:
            raise ValueError(
                f"The train loader splits each logical batch into {chunks} chunks but "
                f"accumulate_grad_batches={accumulate}; build the loader with "
                "DPLightningDataModule under the same Trainer so that the two agree."
            )
        return logical

    def _single_optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"DPCallback supports exactly one optimizer, configure_optimizers gave "
                f"{len(trainer.optimizers)}."
            )
        return trainer.optimizers[0]

    # ---------------------------------------------------------------- start

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the per-sample machinery and swap in the DP optimizer."""
        loader = self._train_loader(trainer)
        optimizer = self._single_optimizer(trainer)
        self._sample_rate = loader.sample_rate
        if self.noise_multiplier is None:
            self.noise_multiplier = self._calibrate(trainer, loader)
        self._check_budget()
        parts = self.privacy_engine.make_private(
            module=pl_module, optimizer=optimizer, data_loader=loader,
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            criterion=self._criterion(pl_module), loss_reduction=self.loss_reduction,
            clipping=self.clipping, noise_generator=self.noise_generator,
            grad_sample_mode=self.grad_sample_mode, wrap_model=False,
        )
        self._hooks, self.optimizer = parts[0], parts[1]
        self._undo.append(self._hooks.cleanup)
        if self.grad_sample_mode == "ghost":
            self._swap_attribute(pl_module, self.criterion_attr, parts[2])
        self._chunks = trainer.accumulate_grad_batches
        if self._chunks > 1:
            self._undo_loss_division(pl_module, self._chunks)
            if self.grad_sample_mode == "ghost":
                self._hooks.allow_grad_accumulation()  # p.grad sums the chunks' clipped sums
        trainer.strategy.optimizers = [self.optimizer]
        self._last_step = trainer.global_step

    def _criterion(self, pl_module: pl.LightningModule) -> Any:
        if self.grad_sample_mode != "ghost":
            return None
        criterion = getattr(pl_module, self.criterion_attr, None)
        if not callable(criterion):
            raise ValueError(
                f'grad_sample_mode="ghost" needs the module\'s loss as attribute '
                f"{self.criterion_attr!r} (e.g. self.criterion = nn.CrossEntropyLoss()), used in "
                f"training_step; found {criterion!r}. Set DPCallback(criterion_attr=...) otherwise."
            )
        return criterion

    def _swap_attribute(self, module: nn.Module, name: str, value: Any) -> None:
        """Set ``module.name = value`` for the run (a loss module may become a plain object)."""
        original = getattr(module, name)
        module._modules.pop(name, None)
        module.__dict__[name] = value

        def restore() -> None:
            module.__dict__.pop(name, None)
            setattr(module, name, original)

        self._undo.append(restore)

    def _undo_loss_division(self, pl_module: pl.LightningModule, factor: int) -> None:
        """Lightning divides the loss by ``factor``; scale it back before the backward pass.

        The per-example gradients are then those of the logical step (the backward
        pass starts from 1, multiplies by ``factor`` and divides by it: exact).
        """
        backward = pl_module.backward

        def undivided_backward(loss: Any, *args: Any, **kwargs: Any) -> None:
            backward(loss * factor, *args, **kwargs)

        pl_module.backward = undivided_backward  # type: ignore[method-assign]
        self._undo.append(lambda: pl_module.__dict__.pop("backward", None))

    def on_before_zero_grad(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                            optimizer: torch.optim.Optimizer) -> None:
        """A logical batch starts: no chunk of it has been folded yet."""
        self._passes = 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Clip a chunk that is not the last of its logical batch into the running sum.

        Its per-example gradients are clipped and added to ``p.summed_grad``, then
        dropped (as for a skipped step of ``BatchMemoryManager``); the optimizer
        step after the last chunk clips that one, adds noise once and divides by
        the logical expected batch size. Ghost clipping sums clipped gradients in
        the backward pass itself, so it needs nothing here.
        """
        self._passes += 1
        if self.optimizer is None or self.grad_sample_mode == "ghost":
            return
        if self._passes % self._chunks == 0:
            return
        self.optimizer.clip_and_accumulate()
        for p in self.optimizer.params:
            p.grad_sample = None

    def _calibrate(self, trainer: pl.Trainer, loader: DPDataLoader) -> float:
        from dp_torch.accountants.utils import get_noise_multiplier

        steps = trainer.max_steps
        if steps is None or steps < 0:
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                raise ValueError(
                    "noise_multiplier=None calibrates to the planned training length: set "
                    "Trainer(max_steps=...) or Trainer(max_epochs=...)."
                )
            steps = trainer.max_epochs * len(loader)
        return get_noise_multiplier(
            target_epsilon=self.target_epsilon, target_delta=self.target_delta,
            sample_rate=self._sample_rate, steps=steps,
            accountant=self.privacy_engine.accountant.mechanism(),
        )

    # ---------------------------------------------------------------- budget

    def epsilon(self) -> float:
        """The epsilon spent so far at ``target_delta``."""
        return self.privacy_engine.get_epsilon(self.target_delta)

    def _epsilon_after_next_step(self) -> float:
        future = copy.deepcopy(self.privacy_engine.accountant)
        future.step(noise_multiplier=self.noise_multiplier, sample_rate=self._sample_rate)
        return future.get_epsilon(self.target_delta)

    def _check_budget(self) -> None:
        if self.target_epsilon is None or self._epsilon_after_next_step() <= self.target_epsilon:
            return
        raise ValueError(
            f"One step at noise_multiplier={self.noise_multiplier!r} and sample_rate="
            f"{self._sample_rate!r} already exceeds target_epsilon={self.target_epsilon!r}: "
            "raise the noise multiplier or the target."
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """After an optimizer step: log epsilon, and stop before the target is passed."""
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        epsilon = self.epsilon()
        pl_module.log(self.log_name, epsilon, on_step=True, on_epoch=False, prog_bar=True)
        if self.target_epsilon is not None and self._epsilon_after_next_step() > self.target_epsilon:
            trainer.should_stop = True

    # ---------------------------------------------------------------- end

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks and restore the module (the ledger stays in :attr:`privacy_engine`)."""
        while self._undo:
            self._undo.pop()()
        self._hooks = None
