"""``PrivacyEngine``: make a PyTorch model, optimizer and data loader differentially private.

Mirrors ``opacus.privacy_engine`` (Opacus 1.x API: ``make_private``,
``make_private_with_epsilon``, ``get_epsilon``, ``save_checkpoint``,
``load_checkpoint``). What one step means is fixed by :mod:`dpcore` (docs/design.md,
Semantics): each example's gradient is clipped to ``max_grad_norm`` (L2 over all
trainable parameters), the clipped sum gets ``N(0, (noise_multiplier * C)**2)``
noise once per logical step, ``loss_reduction="mean"`` divides by
``expected_batch_size = int(N * sample_rate)`` (never the realised batch size),
and the accountant records one step per logical step with the logical
``sample_rate = 1 / len(data_loader)``.

Guarantee:
    If every batch comes from the returned (Poisson) data loader and every update from
    the returned optimizer, the trained model is ``(privacy_engine.get_epsilon(delta),
    delta)``-DP with respect to adding or removing one example of
    ``data_loader.dataset``.
"""

from __future__ import annotations

import logging
import os
from typing import IO, Any, BinaryIO, Optional, Union

import torch
from torch import nn, optim
from torch.utils.data import DataLoader

from dp_torch import _checkpoint
from dp_torch import _engine_checks as checks
from dp_torch import distributed as dp_distributed
from dp_torch._checkpoint import CHECKPOINT_KEYS
from dp_torch.accountants import create_accountant
from dp_torch.accountants.utils import get_noise_multiplier
from dp_torch.data_loader import DPDataLoader
from dp_torch.grad_sample import AbstractGradSampleHooks, AbstractGradSampleModule, prepare_module
from dp_torch.grad_sample.utils import GHOST_MODES
from dp_torch.optimizers import DPOptimizer, get_optimizer_class
from dp_torch.schedulers import _GradClipScheduler, _NoiseScheduler
from dp_torch.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from dp_torch.validators.module_validator import ModuleValidator
from dpcore import noise as core_noise
from dpcore import sampling as core_sampling
from dpcore.checks import check_bool

__all__ = ["CHECKPOINT_KEYS", "PrivacyEngine"]

logger = logging.getLogger(__name__)

PathOrFile = Union[str, os.PathLike, BinaryIO, IO[bytes]]
NoiseGenerator = Union[torch.Generator, core_noise.NoiseSource, None]


# --------------------------------------------------------------------------- engine


class PrivacyEngine:
    """Main entry point: turn a model, optimizer and data loader into DP-SGD ones.

    The engine owns the privacy accountant. ``make_private`` wraps the training
    objects and attaches the accountant to the optimizer, which records one step
    per logical (noise-adding) step; ``get_epsilon`` reads the budget spent.

    Example:
        >>> privacy_engine = PrivacyEngine()
        >>> model, optimizer, data_loader = privacy_engine.make_private(
        ...     module=model, optimizer=optimizer, data_loader=data_loader,
        ...     noise_multiplier=1.1, max_grad_norm=1.0)
        >>> ...  # train as usual
        >>> privacy_engine.get_epsilon(delta=1e-5)

    Attributes:
        accountant: The :mod:`dpcore` accountant (``RDPAccountant`` by default); its
            ``history`` is the privacy ledger.
        secure_mode: Whether noise and sampling come from OS entropy.
        secure_rng: Always ``None`` (Opacus keeps a torchcsprng generator here;
            dp_torch's secure randomness comes from :mod:`dpcore`).
        dataset: The data set of the last ``make_private`` call.
    """

    def __init__(self, *, accountant: str = "rdp", secure_mode: bool = False) -> None:
        """Create the engine and its accountant.

        Args:
            accountant: Registered accountant kind: ``"rdp"`` (default), ``"prv"``,
                ``"pld"``, ``"gdp"`` or a custom one (see
                :func:`dp_torch.accountants.register_accountant`).
            secure_mode: Draw noise and Poisson batches from OS entropy, harden the
                noise against floating-point attacks and refuse every seed.

        Raises:
            ValueError: If ``accountant`` is not registered.
            TypeError: If ``secure_mode`` is not a bool.
        """
        check_bool(secure_mode, "secure_mode")
        self.accountant = create_accountant(accountant)
        self.secure_mode = secure_mode
        self.secure_rng = None
        self.dataset: Any = None
        self._data_loader: Optional[DataLoader] = None
        if not secure_mode:
            logger.info(
                "Secure mode is off: noise and sampling use seedable pseudo-random generators. "
                "Fine for experiments; use PrivacyEngine(secure_mode=True) for the final run."
            )

    # ------------------------------------------------------------------ compatibility

    def is_compatible(
        self,
        *,
        module: nn.Module,
        optimizer: Optional[optim.Optimizer],
        data_loader: Optional[DataLoader],
    ) -> bool:
        """Whether ``module`` can be trained privately (see :class:`ModuleValidator`).

        Args:
            module: The model.
            optimizer: Unused (Opacus signature).
            data_loader: Unused (Opacus signature).

        Returns:
            ``True`` if :meth:`validate` would pass.
        """
        return ModuleValidator.is_valid(module)

    def validate(
        self,
        *,
        module: nn.Module,
        optimizer: Optional[optim.Optimizer],
        data_loader: Optional[DataLoader],
    ) -> None:
        """Raise if ``module`` cannot be trained privately (arguments as :meth:`is_compatible`).

        Raises:
            UnsupportedModuleError: Listing every problem; ``ModuleValidator.fix``
                repairs those that say so (e.g. BatchNorm -> GroupNorm).
        """
        ModuleValidator.validate(module, strict=True)

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """Return a fixed copy of ``module`` (``ModuleValidator.fix``) after validating it.

        Args:
            module: The model; it is not modified.

        Returns:
            The fixed copy.

        Raises:
            UnsupportedModuleError: If a problem remains that no fixer handles.
        """
        module = ModuleValidator.fix(module)
        ModuleValidator.validate(module, strict=True)
        return module

    # ------------------------------------------------------------------ preparation

    def _prepare_model(
        self,
        module: nn.Module,
        *,
        batch_first: bool = True,
        max_grad_norm: Union[float, list[float]] = 1.0,
        loss_reduction: str = "mean",
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
    ) -> Union[AbstractGradSampleModule, AbstractGradSampleHooks]:
        """Validate ``module`` and attach per-sample-gradient machinery for ``grad_sample_mode``.

        A module that already is a ``GradSampleModule`` is returned as is if its
        settings match (else ``ValueError``).
        """
        self.validate(module=module, optimizer=None, data_loader=None)
        if wrap_model and isinstance(module, AbstractGradSampleModule):
            checks.check_existing_wrapper(
                module, batch_first, loss_reduction, grad_sample_mode, max_grad_norm
            )
            return module
        kwargs: dict[str, Any] = {"batch_first": batch_first, "loss_reduction": loss_reduction}
        if grad_sample_mode in GHOST_MODES:
            kwargs["max_grad_norm"] = max_grad_norm
        return prepare_module(module, grad_sample_mode, wrap_model, **kwargs)

    def _prepare_data_loader(
        self,
        data_loader: DataLoader,
        *,
        poisson_sampling: bool,
        distributed: bool,
        batch_first: bool = True,
        rand_on_empty: bool = False,
    ) -> DataLoader:
        """The Poisson ``DPDataLoader`` for ``data_loader`` (or ``data_loader`` itself).

        A ``DPDataLoader`` is returned unchanged (its sampling is already Poisson);
        with ``poisson_sampling=False`` the loader is returned unchanged (its
        batches do not match the accountant's assumption: an approximation).
        """
        if isinstance(data_loader, DPDataLoader) or not poisson_sampling:
            return data_loader
        return DPDataLoader.from_data_loader(
            data_loader,
            distributed=distributed,
            batch_first=batch_first,
            rand_on_empty=rand_on_empty,
            secure_mode=self.secure_mode,
        )

    def _prepare_optimizer(
        self,
        *,
        optimizer: optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: Union[float, list[float]],
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        distributed: bool = False,
        clipping: str = "flat",
        noise_generator: NoiseGenerator = None,
        grad_sample_mode: str = "hooks",
        **kwargs: Any,
    ) -> DPOptimizer:
        """Wrap ``optimizer`` in the DP optimizer class for ``clipping`` and ``grad_sample_mode``."""
        optimizer = checks.unwrap_optimizer(optimizer)
        optim_class = get_optimizer_class(
            clipping=clipping, distributed=distributed, grad_sample_mode=grad_sample_mode
        )
        return optim_class(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=noise_generator,
            secure_mode=self.secure_mode,
            **kwargs,
        )

    def _prepare_criterion(
        self,
        *,
        module: Union[AbstractGradSampleModule, AbstractGradSampleHooks],
        optimizer: DPOptimizer,
        criterion: Any,
        loss_reduction: str = "mean",
        **kwargs: Any,
    ) -> DPLossFastGradientClipping:
        """The ghost-clipping loss wrapper that runs both backward passes."""
        return DPLossFastGradientClipping(module, optimizer, criterion, loss_reduction)

    # ------------------------------------------------------------------ make_private

    def _check_dataset(self, dataset: Any) -> None:
        if self.dataset is None or dataset is self.dataset or len(self.accountant) == 0:
            return
        raise ValueError(
            f"PrivacyEngine has already spent privacy budget ({len(self.accountant)} steps) on "
            f"another data set ({type(self.dataset).__name__} at {id(self.dataset):#x}); got "
            f"{type(dataset).__name__} at {id(dataset):#x}. Accounting is per data set: use a "
            "new PrivacyEngine for a different data set. If both objects hold the same data, pass "
            "the same Dataset object, or move the ledger to a new engine with "
            "new_engine.accountant.load_state_dict(old_engine.accountant.state_dict())."
        )

    def _plan(self, **arguments: Any) -> checks.Plan:
        """Validate every ``make_private`` argument; change nothing.

        Args:
            **arguments: ``make_private``'s arguments, the extra keywords as
                ``optimizer_kwargs`` (see :func:`dp_torch._engine_checks.plan_make_private`).

        Returns:
            What ``make_private`` will build.
        """
        plan = checks.plan_make_private(secure_mode=self.secure_mode, **arguments)
        self._check_dataset(arguments["data_loader"].dataset)
        self.validate(module=arguments["module"], optimizer=None, data_loader=None)
        return plan

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: Union[float, list[float]],
        criterion: Any = None,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: NoiseGenerator = None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        **optimizer_kwargs: Any,
    ) -> Union[
        tuple[Union[AbstractGradSampleModule, AbstractGradSampleHooks], DPOptimizer, DataLoader],
        tuple[
            Union[AbstractGradSampleModule, AbstractGradSampleHooks],
            DPOptimizer,
            DPLossFastGradientClipping,
            DataLoader,
        ],
    ]:
        """Wrap the model, optimizer and data loader for DP-SGD.

        * the model computes per-example gradients (``GradSampleModule``; for
          ``grad_sample_mode="ghost"`` per-example norms,
          ``GradSampleModuleFastGradientClipping``);
        * the optimizer clips, adds noise once per logical step, averages over
          ``expected_batch_size`` for ``"mean"``, and reports each step to
          :attr:`accountant` with the logical ``sample_rate``;
        * the data loader samples Poisson batches at ``sample_rate = 1 /
          len(data_loader)`` (empty batches included, as zero-row tensors).

        Args:
            module: The model (in training mode, validated by ``ModuleValidator``).
            optimizer: An optimizer over ``module``'s parameters.
            data_loader: A ``DataLoader`` over a map-style dataset; its number of
                batches sets the sampling rate, its dataset the privacy unit.
            noise_multiplier: ``sigma >= 0``: noise std over clipping bound.
            max_grad_norm: Clipping bound ``C > 0``; for ``clipping="per_layer"`` a
                list with one bound per trainable parameter (noise uses
                ``sqrt(sum C_i**2)``); for ``"adaptive"`` the initial bound.
            criterion: Loss for ghost mode (wrapped and returned); default
                ``nn.CrossEntropyLoss(reduction=loss_reduction)``. Unused otherwise.
            batch_first: Whether layer inputs are ``[batch, ...]``.
            loss_reduction: ``"mean"`` or ``"sum"``, the reduction of your loss.
            poisson_sampling: ``True`` (required for the guarantee): replace the
                loader by a Poisson ``DPDataLoader``. ``False`` keeps the loader
                (the accountant's epsilon is then only an approximation).
            clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"``.
            noise_generator: ``torch.Generator`` or ``dpcore.noise.NoiseSource`` for
                reproducible noise; ``None`` uses torch's default generator (OS
                entropy in secure mode, where a generator is refused).
            grad_sample_mode: ``"hooks"``, ``"functorch"``, ``"ghost"``, ``"ew"``
                (batch-first wrapper only) or ``"no_op"`` (no per-sample gradients are
                computed: set ``p.grad_sample`` on every trainable parameter after each
                backward pass yourself).
            wrap_model: ``True`` returns a wrapper module; ``False`` attaches hooks
                to ``module`` itself and returns the hooks object (keep training
                ``module``; call ``hooks.cleanup()`` when done).
            rand_on_empty: Empty Poisson batches become one random row instead of
                zero rows (see :class:`~dp_torch.data_loader.DPDataLoader`).
            **optimizer_kwargs: For ``clipping="adaptive"`` exactly
                ``target_unclipped_quantile``, ``clipbound_learning_rate``,
                ``max_clipbound``, ``min_clipbound``, ``unclipped_num_std`` (see
                :class:`~dp_torch.optimizers.AdaClipDPOptimizer`); nothing else.

        Returns:
            ``(module, optimizer, data_loader)``, or for ``grad_sample_mode="ghost"``
            ``(module, optimizer, criterion, data_loader)`` (Opacus 1.6's order).

        Raises:
            TypeError: On an argument of the wrong type or an unexpected keyword.
            ValueError: On an invalid value (the message names it), optimizer
                parameters that are not the module's, a seed or generator in secure
                mode, or a different data set after budget was spent.
            UnsupportedModuleError: If the model has layers unfit for DP training.
            NotImplementedError: For an FSDP model.

        Distributed models (``DPDDP`` or ``DistributedDataParallel``; see
        :mod:`dp_torch.distributed`): call ``make_private`` on every rank with a
        loader over the whole data set whose ``batch_size`` is the *global*
        expected batch; the loader becomes a distributed Poisson loader (each rank
        samples its shard with the global rate), the optimizer the distributed
        variant of the one chosen by ``clipping``/``grad_sample_mode``
        (``"adaptive"`` is refused), and a DDP model stops synchronising gradients
        (:func:`dp_torch.distributed.disable_gradient_sync`), so that unclipped
        gradients never leave a rank.
        """
        plan = self._plan(
            module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            batch_first=batch_first, loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling, clipping=clipping,
            noise_generator=noise_generator, grad_sample_mode=grad_sample_mode,
            wrap_model=wrap_model, rand_on_empty=rand_on_empty, optimizer_kwargs=optimizer_kwargs,
        )
        pre_wrapped = wrap_model and isinstance(module, AbstractGradSampleModule)
        accumulation_was_allowed = getattr(module, "grad_accumulation_allowed", True)
        wrapped = self._prepare_model(
            module, batch_first=batch_first, max_grad_norm=max_grad_norm,
            loss_reduction=loss_reduction, grad_sample_mode=grad_sample_mode, wrap_model=wrap_model,
        )
        try:
            if poisson_sampling:
                wrapped.forbid_grad_accumulation()
            dp_loader = self._prepare_data_loader(
                data_loader, poisson_sampling=poisson_sampling, distributed=plan.distributed,
                batch_first=batch_first, rand_on_empty=rand_on_empty,
            )
            dp_optimizer = self._prepare_optimizer(
                optimizer=plan.optimizer, noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm, expected_batch_size=plan.expected_batch_size,
                loss_reduction=loss_reduction, distributed=plan.distributed, clipping=clipping,
                noise_generator=noise_generator, grad_sample_mode=grad_sample_mode,
                **optimizer_kwargs,
            )
            dp_optimizer.attach_step_hook(
                self.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate)
            )
            dp_criterion = None
            if grad_sample_mode in GHOST_MODES:
                dp_criterion = self._prepare_criterion(
                    module=wrapped, optimizer=dp_optimizer, criterion=plan.criterion,
                    loss_reduction=loss_reduction,
                )
            ddp = checks.torch_ddp(module)
            if ddp is not None:
                dp_distributed.disable_gradient_sync(ddp)  # last: a DDP hook cannot be removed
        except BaseException:
            if pre_wrapped:
                if accumulation_was_allowed:
                    wrapped.allow_grad_accumulation()
            else:
                wrapped.cleanup()
            raise
        self.dataset = data_loader.dataset
        self._data_loader = dp_loader
        if dp_criterion is not None:
            return wrapped, dp_optimizer, dp_criterion, dp_loader
        return wrapped, dp_optimizer, dp_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: Union[int, float],
        max_grad_norm: Union[float, list[float]],
        criterion: Any = None,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: NoiseGenerator = None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        **kwargs: Any,
    ) -> tuple:
        """:meth:`make_private` with the noise multiplier calibrated to a privacy budget.

        The multiplier is the one :func:`~dp_torch.accountants.utils.get_noise_multiplier`
        finds with this engine's accountant kind for ``epochs * len(data_loader)``
        steps at ``sample_rate = 1 / len(data_loader)``: training that many steps
        ends with ``get_epsilon(target_delta) <= target_epsilon``.

        Args:
            module: See :meth:`make_private`.
            optimizer: See :meth:`make_private`.
            data_loader: See :meth:`make_private`.
            target_epsilon: Budget epsilon ``> 0`` at the end of training.
            target_delta: Budget delta in ``(0, 1)``.
            epochs: Planned number of epochs ``> 0``.
            max_grad_norm: See :meth:`make_private`.
            criterion: See :meth:`make_private`.
            batch_first: See :meth:`make_private`.
            loss_reduction: See :meth:`make_private`.
            poisson_sampling: See :meth:`make_private`.
            clipping: See :meth:`make_private`.
            noise_generator: See :meth:`make_private`.
            grad_sample_mode: See :meth:`make_private`.
            wrap_model: See :meth:`make_private`.
            rand_on_empty: See :meth:`make_private`.
            **kwargs: ``epsilon_tolerance`` and the accountant's ``get_epsilon``
                options (e.g. ``alphas`` for RDP, ``eps_error`` for PRV) go to the
                calibration; the rest to :meth:`make_private` (adaptive clipping).

        Returns:
            As :meth:`make_private`.

        Raises:
            ValueError: As :meth:`make_private`, for an unreachable budget, or if
                this engine's accountant already recorded steps: the calibration
                assumes a fresh budget, so spending it on top of earlier steps would
                exceed ``target_epsilon`` (Opacus only warns). Use a new engine for
                a new budget, or ``make_private`` with an explicit multiplier.
        """
        if len(self.accountant) > 0:
            raise ValueError(
                f"make_private_with_epsilon calibrates a fresh budget, but this engine's "
                f"accountant already recorded {len(self.accountant)} steps; the total would exceed "
                f"target_epsilon={target_epsilon!r}. Use a new PrivacyEngine for a new budget, or "
                "make_private(noise_multiplier=...) to continue with a multiplier of your choice."
            )
        checks.check_data_loader(data_loader)
        n_batches = len(data_loader)
        sample_rate = checks.sample_rate(data_loader)
        steps = core_sampling.steps_for_epochs(epochs, n_batches)
        calibration_names = checks.calibration_kwarg_names(self.accountant)
        calibration = {k: v for k, v in kwargs.items() if k in calibration_names}
        rest = {k: v for k, v in kwargs.items() if k not in calibration_names}
        noise_multiplier = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=self.accountant.mechanism(),
            **calibration,
        )
        return self.make_private(
            module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            batch_first=batch_first, loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling, clipping=clipping, noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode, wrap_model=wrap_model, rand_on_empty=rand_on_empty,
            **rest,
        )

    # ------------------------------------------------------------------ budget

    def get_epsilon(self, delta: float, **kwargs: Any) -> float:
        """The epsilon spent so far at ``delta`` (an upper bound, except for ``"gdp"``).

        Args:
            delta: Target delta in ``(0, 1)``.
            **kwargs: Accountant options, e.g. ``alphas=[...]`` for RDP or
                ``eps_error=...`` for PRV.

        Returns:
            Epsilon (``0.0`` before the first step).
        """
        return self.accountant.get_epsilon(delta, **kwargs)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        *,
        path: PathOrFile,
        module: nn.Module,
        optimizer: Optional[DPOptimizer] = None,
        noise_scheduler: Optional[_NoiseScheduler] = None,
        grad_clip_scheduler: Optional[_GradClipScheduler] = None,
        checkpoint_dict: Optional[dict[str, Any]] = None,
        module_state_dict_kwargs: Optional[dict[str, Any]] = None,
        torch_save_kwargs: Optional[dict[str, Any]] = None,
        data_loader: Optional[DataLoader] = None,
    ) -> None:
        """Save everything a private run needs to continue exactly where it stopped.

        Written with ``torch.save``: the module's and optimizer's state dicts, the
        accountant's history (the privacy ledger), the schedulers' states, the DP
        optimizer's settings (:meth:`~dp_torch.optimizers.DPOptimizer.dp_state_dict`:
        noise multiplier, clipping bound(s) with the current adaptive bound, expected
        batch size, and noise-generator state: a ``torch.Generator``'s state, a
        ``NoiseSource``'s state, or torch's default generator when none was given;
        nothing in secure mode), the Poisson sampler's position, and the user's
        ``checkpoint_dict`` entries. Save between logical steps, with a loader
        without worker processes (workers prefetch, so the sampler runs ahead).

        Args:
            path: File path or binary file object.
            module: The (wrapped) model; its ``state_dict()`` is saved.
            optimizer: The DP optimizer, if any.
            noise_scheduler: A noise scheduler whose state to save.
            grad_clip_scheduler: A clipping-bound scheduler whose state to save.
            checkpoint_dict: Extra entries to store (not modified); their keys must
                not be one of :data:`CHECKPOINT_KEYS`.
            module_state_dict_kwargs: Passed to ``module.state_dict()``.
            torch_save_kwargs: Passed to ``torch.save()``.
            data_loader: Loader whose sampler position to save; default: the loader
                returned by this engine's last ``make_private``.

        Distributed models (``DPDDP`` / ``DistributedDataParallel``): only rank 0
        writes; on the other ranks the call returns at once without a collective, so
        calling it on every rank and calling it on rank 0 only both work (add a
        ``torch.distributed.barrier()`` before other ranks read the file). The
        ranks hold identical parameters, optimizer states and ledgers; the noise
        generator saved is rank 0's (the only one that adds noise) and the sampler
        position is rank 0's (see :meth:`load_checkpoint`).

        Raises:
            ValueError: On a user key that clashes with an engine key, or when called
                in the middle of a logical batch (``BatchMemoryManager`` chunks).
        """
        _checkpoint.save_checkpoint(
            path=path, accountant=self.accountant, module=module, optimizer=optimizer,
            schedulers=_schedulers(noise_scheduler, grad_clip_scheduler),
            checkpoint_dict=checkpoint_dict, module_state_dict_kwargs=module_state_dict_kwargs,
            torch_save_kwargs=torch_save_kwargs,
            data_loader=data_loader if data_loader is not None else self._data_loader,
        )

    def load_checkpoint(
        self,
        *,
        path: PathOrFile,
        module: nn.Module,
        optimizer: Optional[DPOptimizer] = None,
        noise_scheduler: Optional[_NoiseScheduler] = None,
        grad_clip_scheduler: Optional[_GradClipScheduler] = None,
        module_load_dict_kwargs: Optional[dict[str, Any]] = None,
        torch_load_kwargs: Optional[dict[str, Any]] = None,
        data_loader: Optional[DataLoader] = None,
    ) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save_checkpoint`; all or nothing.

        Call it after ``make_private`` (so the objects exist): the accountant's
        history is replaced by the saved one (no step lost or counted twice), the
        module, optimizer, schedulers, DP optimizer settings, noise generator and
        sampler position are restored. If any part fails to load, everything
        loaded so far is rolled back and the error is raised.

        Args:
            path: File path or binary file object.
            module: The (wrapped) model to load into.
            optimizer: The DP optimizer to load into.
            noise_scheduler: A noise scheduler to restore.
            grad_clip_scheduler: A clipping-bound scheduler to restore.
            module_load_dict_kwargs: Passed to ``module.load_state_dict()``.
            torch_load_kwargs: Passed to ``torch.load()`` (default ``weights_only=True``;
                pass ``{"weights_only": False}`` for user entries that need pickle).
            data_loader: Loader whose sampler position to restore; default: the
                loader returned by this engine's last ``make_private``.

        Any world size: a checkpoint written by rank 0 of a ``W``-process run loads
        on every rank of a run with any number of processes, and into a single
        process without a process group. The module keys are matched across the
        ``module.`` prefix that ``DPDDP``/``DistributedDataParallel`` adds. Every
        rank takes rank 0's noise-generator state (only rank 0 adds noise). The
        Poisson sampler keeps its position in the epoch and, when it is seeded, its
        random stream: a seeded sampler draws the full-length uniform vector each
        step whatever the world size, so with a seed shared by all ranks the
        resumed run's global batches (the union over ranks) are exactly those the
        saved run would have drawn next, for any new world size with the same
        sampler kind (the distributed sampler's ``shuffle`` relabelling depends on
        the epoch, not on the world size; a single-process sampler has none, so its
        batches differ while following the same distribution). Samplers seeded
        differently on each rank take rank 0's stream on every rank (each
        example is still included independently with the global rate); a secure
        sampler keeps drawing from OS entropy and only resumes its position.

        Returns:
            The user's entries (the ``checkpoint_dict`` given to ``save_checkpoint``).

        Raises:
            ValueError: If the file is not such a checkpoint, a part does not fit
                (e.g. another kind of noise generator), or the ledger is malformed.

        Warns:
            UserWarning: When exactly one of ``optimizer`` and the saved optimizer
                state is present (as Opacus), or when the checkpoint has a sampler
                position but there is no loader to restore it into.
        """
        return _checkpoint.load_checkpoint(
            path=path, accountant=self.accountant, module=module, optimizer=optimizer,
            schedulers=_schedulers(noise_scheduler, grad_clip_scheduler),
            module_load_dict_kwargs=module_load_dict_kwargs, torch_load_kwargs=torch_load_kwargs,
            data_loader=data_loader if data_loader is not None else self._data_loader,
        )


def _schedulers(
    noise_scheduler: Optional[_NoiseScheduler], grad_clip_scheduler: Optional[_GradClipScheduler]
) -> dict[str, Any]:
    """The schedulers by checkpoint key, in the order they are saved and restored."""
    return {
        "noise_scheduler_state_dict": noise_scheduler,
        "grad_clip_scheduler_state_dict": grad_clip_scheduler,
    }
