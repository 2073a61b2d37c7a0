"""``PrivacyEngine``: make a PyTorch model, optimizer and data loader differentially private.

Mirrors ``opacus.privacy_engine`` (Opacus 1.x API: ``make_private``,
``make_private_with_epsilon``, ``get_epsilon``, ``save_checkpoint``,
``load_checkpoint``). What one step means is fixed by :mod:`dpcore` (DESIGN
section 3): each example's gradient is clipped to ``max_grad_norm`` (L2 over all
trainable parameters), the clipped sum gets ``N(0, (noise_multiplier * C)**2)``
noise once per logical step, ``loss_reduction="mean"`` divides by
``expected_batch_size = int(N * sample_rate)`` (never the realised batch size),
and the accountant records one step per logical step with the logical
``sample_rate = 1 / len(data_loader)``.

Guarantee: if every batch comes from the returned (Poisson) data loader and every
update from the returned optimizer, the trained model is
``(privacy_engine.get_epsilon(delta), delta)``-DP with respect to adding or
removing one example of ``data_loader.dataset``.

Differences from Opacus 1.6, each deliberate (Opacus is unsafe or surprising there):

* the default accountant is ``"rdp"`` (as in the Opacus 1.x migration guide;
  Opacus 1.6 switched to ``"prv"``); ``"prv"`` and ``"pld"`` are the tight ones;
* no warning on the happy path: the "secure RNG turned off" notice is logged at
  INFO level on the ``dp_torch.privacy_engine`` logger instead of ``warnings.warn``;
* secure mode needs no ``torchcsprng``: noise and sampling come from OS entropy
  through :mod:`dpcore` (see :class:`~dp_torch.optimizers.DPOptimizer`), and it
  refuses any generator or seed, a pre-made seeded ``DPDataLoader`` and
  ``poisson_sampling=False`` (a shuffled loader draws its order from torch's
  seedable RNG, and the accountant assumes Poisson sampling anyway);
* every argument is validated before anything is changed, and if wrapping fails
  half-way the hooks added to the model are removed again;
* unknown ``**optimizer_kwargs`` raise ``TypeError`` (Opacus silently ignores
  them, so a misspelled adaptive-clipping option went unnoticed);
* an engine whose accountant has recorded steps refuses a *different* data set
  (``ValueError``; Opacus warns), and ``make_private_with_epsilon`` refuses to
  calibrate a fresh budget on top of steps already spent (Opacus warns that the
  overall budget will be exceeded); see those methods for the ways forward;
* ``make_private_with_epsilon`` calibrates for ``epochs * len(data_loader)``
  steps, the number the returned loader really takes (Opacus uses
  ``int(epochs / sample_rate)``, which floating point can make one short);
* ``criterion`` defaults to a fresh ``nn.CrossEntropyLoss(reduction=loss_reduction)``
  instead of one instance shared by every call;
* checkpoints also hold the DP optimizer's noise multiplier and clipping bound
  (the adaptive bound included), the noise generator's state, and the Poisson
  sampler's position, so a run resumed in a fresh process continues bit for bit;
  ``load_checkpoint`` is all-or-nothing and returns only the user's own keys;
  ``torch.load`` runs with ``weights_only=True`` unless ``torch_load_kwargs`` says
  otherwise;
* a ``DistributedDataParallel`` model has its gradient synchronisation switched
  off (plus a local-only communication hook), so DDP never all-reduces unclipped
  gradients (Opacus lets DDP average them in hooks mode, then overwrites them) and
  runs no collective of its own; DDP settings that would still communicate are
  refused (see :func:`dp_torch.distributed.check_ddp`); FSDP is refused with
  ``NotImplementedError``.

Distributed training (``DPDDP`` or ``DistributedDataParallel`` model, see
:mod:`dp_torch.distributed`): every rank calls ``make_private`` with a loader over
the *whole* data set; the sample rate ``q = 1 / len(data_loader)`` is global, each
rank Poisson-samples its shard with it, ``expected_batch_size = int(N * q)`` is
global, the optimizer is the distributed variant (noise once, on rank 0, then one
all-reduce per logical step), and every rank's accountant records the same steps.
``save_checkpoint`` writes on rank 0 only; ``load_checkpoint`` works on any world
size, including one process without a process group.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import numbers
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, BinaryIO, Optional, Union

import torch
from torch import nn, optim
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset

from dp_torch.accountants import create_accountant
from dp_torch.accountants.utils import get_noise_multiplier
from dp_torch.data_loader import DPDataLoader
from dp_torch import distributed as dp_distributed
from dp_torch.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from dp_torch.grad_sample import (
    AbstractGradSampleHooks,
    AbstractGradSampleModule,
    GradSampleHooksFastGradientClipping,
    GradSampleModule,
    get_gsm_class,
    prepare_module,
)
from dp_torch.grad_sample.utils import GRAD_SAMPLE_MODES, check_mode_arguments
from dp_torch.optimizers import DPOptimizer, DPPerLayerOptimizer, get_optimizer_class
from dp_torch.optimizers.utils import params as _trainable_params
from dp_torch.schedulers import _GradClipScheduler, _NoiseScheduler
from dp_torch.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from dp_torch.validators.module_validator import ModuleValidator
from dpcore._checks import check_bool, check_choice
from dpcore import clipping as core_clipping
from dpcore import noise as core_noise
from dpcore import sampling as core_sampling
from dpcore.accounting import validate_history

try:  # FSDP2 (torch >= 2.6); absent from trimmed builds
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # pragma: no cover - depends on the torch build
    _FSDPModule = None

__all__ = ["CHECKPOINT_KEYS", "PrivacyEngine"]

logger = logging.getLogger(__name__)

_CLIPPINGS = ("flat", "per_layer", "adaptive")
_GRAD_SAMPLE_MODES = GRAD_SAMPLE_MODES
_LOSS_REDUCTIONS = ("mean", "sum")
_ADAPTIVE_KWARGS = (
    "target_unclipped_quantile",
    "clipbound_learning_rate",
    "max_clipbound",
    "min_clipbound",
    "unclipped_num_std",
)

#: Checkpoint keys written by :meth:`PrivacyEngine.save_checkpoint`; user keys may not use them.
CHECKPOINT_KEYS = (
    "module_state_dict",
    "privacy_accountant_state_dict",
    "optimizer_state_dict",
    "noise_scheduler_state_dict",
    "grad_clip_scheduler_state_dict",
    "dp_optimizer_state_dict",
    "data_loader_sampler_state_dict",
    "dp_torch_checkpoint_version",
)
_CHECKPOINT_VERSION = 1

PathOrFile = Union[str, os.PathLike, BinaryIO, IO[bytes]]
NoiseGenerator = Union[torch.Generator, core_noise.NoiseSource, None]


# --------------------------------------------------------------------------- argument checks


def _check_data_loader(data_loader: Any) -> None:
    if not isinstance(data_loader, DataLoader):
        raise TypeError(
            f"data_loader must be a torch.utils.data.DataLoader, got "
            f"{type(data_loader).__name__}; see the 'No DataLoader' section of the migration "
            "guide for training without one."
        )


def _unwrap_optimizer(optimizer: Any) -> optim.Optimizer:
    if isinstance(optimizer, DPOptimizer):
        return optimizer.original_optimizer
    if not isinstance(optimizer, optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; create "
            "it from the model's parameters, e.g. torch.optim.SGD(model.parameters(), lr=0.05)."
        )
    return optimizer


def _check_parameters(module: nn.Module, optimizer: optim.Optimizer) -> None:
    """Every parameter the optimizer updates must belong to ``module`` (Opacus' check)."""
    owned = {id(p) for p in module.parameters()}
    names = {id(p): n for n, p in module.named_parameters()}
    foreign = [
        p for group in optimizer.param_groups for p in group["params"] if id(p) not in owned
    ]
    if foreign:
        shapes = [tuple(p.shape) for p in foreign[:3]]
        raise ValueError(
            "Module parameters are different than optimizer Parameters: the optimizer updates "
            f"{len(foreign)} tensor(s) that are not parameters of module (shapes {shapes}"
            f"{', ...' if len(foreign) > 3 else ''}); the module has "
            f"{sorted(names.values())[:5]}{' ...' if len(names) > 5 else ''}. Build the optimizer "
            "from module.parameters() of the module you pass."
        )


def _check_noise_generator(generator: Any, secure_mode: bool) -> None:
    if generator is None:
        return
    if not isinstance(generator, (torch.Generator, core_noise.NoiseSource)):
        raise TypeError(
            "noise_generator must be a torch.Generator, a dpcore.noise.NoiseSource or None, got "
            f"{type(generator).__name__}."
        )
    secure_source = isinstance(generator, core_noise.NoiseSource) and generator.secure_mode
    if secure_mode and not secure_source:
        raise ValueError(
            f"Passing a seed or generator is prohibited in secure mode: got noise_generator="
            f"{generator!r}, whose noise is predictable. Pass noise_generator=None (secure noise "
            "comes from OS entropy), or PrivacyEngine(secure_mode=False) for reproducible runs."
        )


def _distributed_kind(module: nn.Module) -> Optional[str]:
    """The name of the distributed wrapper around ``module``, or ``None``."""
    inner = module._module if isinstance(module, AbstractGradSampleModule) else module
    for candidate in (module, inner):
        if isinstance(candidate, DPDDP):
            return "DifferentiallyPrivateDistributedDataParallel"
        if isinstance(candidate, DDP):
            return "torch DistributedDataParallel"
        if _FSDPModule is not None and isinstance(candidate, _FSDPModule):
            return "FSDP"
    return None


def _torch_ddp(module: nn.Module) -> Optional[DDP]:
    """The ``torch`` ``DistributedDataParallel`` wrapper of ``module`` (or inside its GSM), if any."""
    inner = module._module if isinstance(module, AbstractGradSampleModule) else module
    for candidate in (module, inner):
        if isinstance(candidate, DDP):
            return candidate
    return None


def _check_distributed(
    module: nn.Module, clipping: str, grad_sample_mode: str, data_loader: DataLoader
) -> bool:
    """Whether ``module`` is data-parallel; raise for a combination that cannot be private."""
    kind = _distributed_kind(module)
    if kind is None:
        return False
    if kind == "FSDP":
        raise NotImplementedError(
            "make_private got an FSDP model; dp_torch supports data parallelism through DPDDP or "
            "torch DistributedDataParallel only (Opacus' ghost_fsdp mode is not provided)."
        )
    dp_distributed.require_process_group(f"make_private with a {kind} model")
    get_optimizer_class(clipping=clipping, distributed=True, grad_sample_mode=grad_sample_mode)
    ddp = _torch_ddp(module)
    if ddp is not None:
        dp_distributed.check_ddp(ddp)
    if isinstance(data_loader, DPDataLoader) and not data_loader.distributed:
        raise ValueError(
            f"make_private got a {kind} model with a non-distributed DPDataLoader: every rank "
            "would sample the whole data set, so an example could be used by several ranks in "
            "one step and the accounting would be wrong. Pass the plain DataLoader (make_private "
            "builds the distributed one) or DPDataLoader(..., distributed=True)."
        )
    return True


def _check_bound(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def _check_max_grad_norm(max_grad_norm: Any, clipping: str, optimizer: optim.Optimizer) -> None:
    if clipping == "per_layer" and isinstance(max_grad_norm, (list, tuple)):
        for i, bound in enumerate(max_grad_norm):
            _check_bound(bound, f"max_grad_norm[{i}]")
    try:
        core_clipping.clipping_spec("flat" if clipping == "adaptive" else clipping, max_grad_norm)
    except TypeError as err:
        if clipping == "per_layer":
            raise ValueError(
                f'clipping="per_layer" needs max_grad_norm as a list with one bound per trainable '
                f"parameter of the optimizer, got {max_grad_norm!r}; pass e.g. [1.0] * "
                "len(list(model.parameters()))."
            ) from None
        raise ValueError(
            f"clipping={clipping!r} needs max_grad_norm as one float > 0, got {max_grad_norm!r}; "
            'for one bound per parameter use clipping="per_layer".'
        ) from err
    if clipping == "per_layer":
        n_params = len(_trainable_params(optimizer))
        if len(max_grad_norm) != n_params:
            raise ValueError(
                f'clipping="per_layer": max_grad_norm has {len(max_grad_norm)} bounds but the '
                f"optimizer has {n_params} trainable parameters; pass one bound per parameter, "
                "in the optimizer's parameter order."
            )


def _check_optimizer_kwargs(
    kwargs: Mapping[str, Any],
    clipping: str,
    noise_multiplier: float,
    max_grad_norm: Any,
    expected_batch_size: Optional[int],
) -> None:
    if clipping != "adaptive":
        if kwargs:
            raise TypeError(
                f"make_private got unexpected keyword arguments {sorted(kwargs)} for "
                f"clipping={clipping!r}; {list(_ADAPTIVE_KWARGS)} belong to "
                'clipping="adaptive", and no other extra argument is accepted.'
            )
        return
    unknown = sorted(set(kwargs) - set(_ADAPTIVE_KWARGS))
    missing = [name for name in _ADAPTIVE_KWARGS if name not in kwargs]
    if unknown or missing:
        raise TypeError(
            f'clipping="adaptive" takes exactly the keyword arguments {list(_ADAPTIVE_KWARGS)} '
            f"(as Opacus' AdaClipDPOptimizer); missing {missing}, unexpected {unknown}."
        )
    if expected_batch_size is None:
        raise ValueError(
            'clipping="adaptive" needs expected_batch_size = int(len(dataset) * sample_rate) >= 1; '
            "use a data loader with fewer, larger batches."
        )
    spec = core_clipping.AdaptiveClipping(initial_max_grad_norm=max_grad_norm, **kwargs)
    spec.gradient_noise_multiplier(noise_multiplier, expected_batch_size)


def _dataset_size(data_loader: DataLoader) -> int:
    try:
        size = len(data_loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"data_loader.dataset ({type(data_loader.dataset).__name__}) has no len(); private "
            "training needs a map-style dataset of known size."
        ) from None
    if size < 1:
        raise ValueError("data_loader.dataset is empty; private training needs at least one example.")
    return size


def _sample_rate(data_loader: DataLoader) -> float:
    """The logical sampling rate: the loader's own for a ``DPDataLoader``, else ``1/len``."""
    if isinstance(data_loader, DPDataLoader):
        return data_loader.sample_rate
    try:
        n_batches = len(data_loader)
    except TypeError:
        raise ValueError(
            "len(data_loader) is undefined; the sampling rate is 1 / len(data_loader), so use a "
            "DataLoader over a map-style dataset with a batch_size."
        ) from None
    if n_batches < 1:
        raise ValueError(f"data_loader has {n_batches} batches; it needs at least one.")
    return 1.0 / n_batches


def _expected_batch_size(
    num_samples: int, sample_rate: float, loss_reduction: str
) -> Optional[int]:
    try:
        return core_sampling.expected_batch_size(num_samples, sample_rate)
    except ValueError:
        if loss_reduction == "sum":
            return None  # not needed: "sum" never divides
        raise


def _steps_for_epochs(epochs: Any, steps_per_epoch: int) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real):
        raise TypeError(f"epochs must be a number > 0, got {epochs!r}.")
    if not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}.")
    total = float(epochs) * steps_per_epoch
    nearest = round(total)
    steps = nearest if abs(total - nearest) < 1e-9 * max(1.0, total) else math.ceil(total)
    return max(1, int(steps))


def _calibration_kwarg_names(accountant: Any) -> set[str]:
    """Keyword arguments of ``accountant.get_epsilon`` (besides ``delta``), plus ``epsilon_tolerance``."""
    names = {"epsilon_tolerance"}
    for name, param in inspect.signature(accountant.get_epsilon).parameters.items():
        if name != "delta" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            names.add(name)
    return names


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What ``make_private`` will build, decided before anything is changed."""

    optimizer: optim.Optimizer
    criterion: Any
    distributed: bool
    sample_rate: float
    expected_batch_size: Optional[int]


# --------------------------------------------------------------------------- checkpoint helpers


def _generator_state(optimizer: DPOptimizer) -> dict[str, Any]:
    """The state of the optimizer's noise source, tagged with its kind."""
    generator = optimizer.generator
    if optimizer.secure_mode:
        return {"kind": "secure"}
    if isinstance(generator, torch.Generator):
        return {"kind": "torch.Generator", "state": generator.get_state()}
    if isinstance(generator, core_noise.NoiseSource):
        return {"kind": "NoiseSource", "state": generator.state_dict()}
    cuda = sorted({p.device.index or 0 for p in optimizer.params if p.device.type == "cuda"})
    return {
        "kind": "default",
        "cpu": torch.get_rng_state(),
        "cuda": {index: torch.cuda.get_rng_state(index) for index in cuda},
    }


def _restore_generator(optimizer: DPOptimizer, saved: Mapping[str, Any]) -> Callable[[], None]:
    """Check that ``saved`` fits the optimizer's noise source; return the function that loads it."""
    kind = saved.get("kind") if isinstance(saved, Mapping) else None
    generator = optimizer.generator
    if optimizer.secure_mode or kind == "secure":
        return lambda: None  # OS entropy has no state; a secure run never takes a seeded one
    current = (
        "torch.Generator" if isinstance(generator, torch.Generator)
        else "NoiseSource" if isinstance(generator, core_noise.NoiseSource)
        else "default"
    )
    if kind != current:
        raise ValueError(
            f"the checkpoint's noise came from a {kind!r} source but this optimizer's noise "
            f"generator is {current!r}; pass the same kind of noise_generator to make_private "
            "(a torch.Generator, a dpcore.noise.NoiseSource, or None for torch's default "
            "generator) before load_checkpoint."
        )
    if kind == "torch.Generator":
        return lambda: generator.set_state(saved["state"])
    if kind == "NoiseSource":
        return lambda: generator.load_state_dict(saved["state"])

    def restore_default() -> None:
        torch.set_rng_state(saved["cpu"])
        for index, state in saved.get("cuda", {}).items():
            torch.cuda.set_rng_state(state, index)

    return restore_default


def _dp_optimizer_state(optimizer: DPOptimizer) -> dict[str, Any]:
    state: dict[str, Any] = {
        "class": type(optimizer).__name__,
        "noise_multiplier": optimizer.noise_multiplier,
        "num_nonfinite_grad_samples": optimizer.num_nonfinite_grad_samples,
        "noise_generator": _generator_state(optimizer),
    }
    if isinstance(optimizer, DPPerLayerOptimizer):
        state["max_grad_norms"] = list(optimizer.max_grad_norms)
    else:
        state["max_grad_norm"] = optimizer.max_grad_norm  # the adaptive bound for AdaClip
    return state


def _stateful_sampler(data_loader: Optional[DataLoader]) -> Any:
    """The Poisson batch sampler behind ``data_loader`` (through BatchMemoryManager), or ``None``."""
    sampler = getattr(data_loader, "batch_sampler", None)
    while sampler is not None:
        if callable(getattr(sampler, "state_dict", None)) and callable(
            getattr(sampler, "load_state_dict", None)
        ):
            return sampler
        sampler = getattr(sampler, "sampler", None)
    return None


def _process_rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _toggle_ddp_prefix(key: str) -> str:
    """``key`` with the ``module.`` of a DDP wrapper added or removed (after a GSM's ``_module.``)."""
    head = "_module." if key.startswith("_module.") else ""
    rest = key[len(head):]
    if rest.startswith("module."):
        return head + rest[len("module."):]
    return head + "module." + rest


def _match_ddp_prefix(saved: Any, module: nn.Module) -> Any:
    """``saved`` re-keyed across a DDP wrapper's ``module.`` prefix when that makes the keys match.

    A checkpoint of ``GradSampleModule(DPDDP(net))`` has keys ``_module.module.*``, one of
    ``GradSampleModule(net)`` has ``_module.*``; either loads into the other. Anything else
    is returned unchanged (and ``load_state_dict`` reports the mismatch as usual).
    """
    if not isinstance(saved, Mapping):
        return saved
    target = set(module.state_dict().keys())
    if set(saved) == target:
        return saved
    toggled = {_toggle_ddp_prefix(k): v for k, v in saved.items()}
    if len(toggled) == len(saved) and set(toggled) == target:
        return type(saved)(toggled) if isinstance(saved, dict) else toggled
    return saved


def _module_snapshot(module: nn.Module) -> dict[str, Any]:
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in module.state_dict().items()
    }


def _apply_all(steps: list[tuple[Callable[[], Any], Callable[[], None], Callable[[Any], None]]]) -> None:
    """Run ``(snapshot, apply, restore)`` steps in order; on an error undo the done ones."""
    done: list[tuple[Callable[[Any], None], Any]] = []
    try:
        for snapshot, apply, restore in steps:
            saved = snapshot()
            done.append((restore, saved))
            apply()
    except BaseException:
        for restore, saved in reversed(done):
            restore(saved)
        raise


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
        """Raise if ``module`` cannot be trained privately.

        Args:
            module: The model.
            optimizer: Unused (Opacus signature).
            data_loader: Unused (Opacus signature).

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
            _check_existing_wrapper(module, batch_first, loss_reduction, grad_sample_mode, max_grad_norm)
            return module
        kwargs: dict[str, Any] = {"batch_first": batch_first, "loss_reduction": loss_reduction}
        if grad_sample_mode == "ghost":
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
        optimizer = _unwrap_optimizer(optimizer)
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

    def _plan(
        self,
        *,
        module: Any,
        optimizer: Any,
        data_loader: Any,
        criterion: Any,
        noise_multiplier: Any,
        max_grad_norm: Any,
        batch_first: Any,
        loss_reduction: Any,
        poisson_sampling: Any,
        clipping: Any,
        noise_generator: Any,
        grad_sample_mode: Any,
        wrap_model: Any,
        rand_on_empty: Any,
        optimizer_kwargs: Mapping[str, Any],
    ) -> _Plan:
        """Validate every ``make_private`` argument; change nothing."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
        base_optimizer = _unwrap_optimizer(optimizer)
        _check_data_loader(data_loader)
        for name, value in (
            ("batch_first", batch_first),
            ("poisson_sampling", poisson_sampling),
            ("wrap_model", wrap_model),
            ("rand_on_empty", rand_on_empty),
        ):
            check_bool(value, name)
        check_choice(loss_reduction, "loss_reduction", _LOSS_REDUCTIONS,
                      " It must be the reduction of your loss over the batch.")
        check_choice(clipping, "clipping", _CLIPPINGS)
        check_choice(grad_sample_mode, "grad_sample_mode", _GRAD_SAMPLE_MODES,
                      " (Opacus' 'ghost_fsdp' and 'ghost_tp' are not provided.)")
        check_mode_arguments(grad_sample_mode, wrap_model=wrap_model, batch_first=batch_first)
        if grad_sample_mode == "ghost" and clipping != "flat":
            raise ValueError(
                f'grad_sample_mode="ghost" supports only clipping="flat", got clipping={clipping!r}; '
                'use grad_sample_mode="hooks" for per-layer or adaptive clipping.'
            )
        _check_noise_generator(noise_generator, self.secure_mode)
        core_noise.noise_std(noise_multiplier, 1.0)  # validates noise_multiplier
        _check_max_grad_norm(max_grad_norm, clipping, base_optimizer)
        _check_parameters(module, base_optimizer)
        distributed = _check_distributed(module, clipping, grad_sample_mode, data_loader)
        if isinstance(data_loader.dataset, IterableDataset) and poisson_sampling:
            raise ValueError(
                "Poisson sampling needs a map-style dataset; data_loader.dataset is an "
                "IterableDataset. Use a map-style Dataset (with __len__ and __getitem__)."
            )
        if self.secure_mode and not poisson_sampling:
            raise ValueError(
                "secure_mode=True requires poisson_sampling=True: a shuffled or sequential "
                "DataLoader draws its order from torch's seedable RNG, and the accountant's "
                "guarantee assumes Poisson batches anyway."
            )
        if self.secure_mode and isinstance(data_loader, DPDataLoader) and not getattr(
            data_loader.batch_sampler, "secure_mode", False
        ):
            raise ValueError(
                "secure_mode=True was given a DPDataLoader whose sampler is not secure (seeded or "
                "pseudo-random); pass the original DataLoader and let make_private build a "
                "secure DPDataLoader."
            )
        num_samples = _dataset_size(data_loader)
        sample_rate = _sample_rate(data_loader)
        expected_batch_size = _expected_batch_size(num_samples, sample_rate, loss_reduction)
        _check_optimizer_kwargs(
            optimizer_kwargs, clipping, noise_multiplier, max_grad_norm, expected_batch_size
        )
        if wrap_model and isinstance(module, AbstractGradSampleModule):
            _check_existing_wrapper(module, batch_first, loss_reduction, grad_sample_mode, max_grad_norm)
        criterion = _check_criterion(criterion, grad_sample_mode, loss_reduction)
        self._check_dataset(data_loader.dataset)
        self.validate(module=module, optimizer=None, data_loader=None)
        return _Plan(
            optimizer=base_optimizer,
            criterion=criterion,
            distributed=distributed,
            sample_rate=sample_rate,
            expected_batch_size=expected_batch_size,
        )

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
            if grad_sample_mode == "ghost":
                dp_criterion = self._prepare_criterion(
                    module=wrapped, optimizer=dp_optimizer, criterion=plan.criterion,
                    loss_reduction=loss_reduction,
                )
            ddp = _torch_ddp(module)
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
        _check_data_loader(data_loader)
        steps = _steps_for_epochs(epochs, len(data_loader))
        calibration_names = _calibration_kwarg_names(self.accountant)
        calibration = {k: v for k, v in kwargs.items() if k in calibration_names}
        rest = {k: v for k, v in kwargs.items() if k not in calibration_names}
        noise_multiplier = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=_sample_rate(data_loader),
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
        optimizer's noise multiplier, clipping bound(s) (the current adaptive bound
        included) and noise-generator state (a ``torch.Generator``'s state, a
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
        user = dict(checkpoint_dict or {})
        clash = sorted(set(user) & set(CHECKPOINT_KEYS))
        if clash:
            raise ValueError(
                f"checkpoint_dict uses reserved keys {clash}; rename them (the engine writes "
                f"{list(CHECKPOINT_KEYS)})."
            )
        if optimizer is not None and getattr(optimizer, "_is_last_step_skipped", False):
            raise ValueError(
                "save_checkpoint was called in the middle of a logical batch (the optimizer holds "
                "clipped gradients of skipped BatchMemoryManager chunks, which a checkpoint does not "
                "keep); save after the optimizer step that adds the noise."
            )
        if _distributed_kind(module) is not None and _process_rank() != 0:
            return  # rank 0 writes; the ranks hold the same module, optimizer and ledger
        checkpoint = dict(user)
        checkpoint["dp_torch_checkpoint_version"] = _CHECKPOINT_VERSION
        checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        checkpoint["privacy_accountant_state_dict"] = self.accountant.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
            if isinstance(optimizer, DPOptimizer):
                checkpoint["dp_optimizer_state_dict"] = _dp_optimizer_state(optimizer)
        if noise_scheduler is not None:
            checkpoint["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
        if grad_clip_scheduler is not None:
            checkpoint["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
        sampler = _stateful_sampler(data_loader if data_loader is not None else self._data_loader)
        if sampler is not None:
            checkpoint["data_loader_sampler_state_dict"] = sampler.state_dict()
        torch.save(checkpoint, path, **(torch_save_kwargs or {}))

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
        load_kwargs = {"weights_only": True, **(torch_load_kwargs or {})}
        checkpoint = torch.load(path, **load_kwargs)
        if not isinstance(checkpoint, Mapping) or not {
            "module_state_dict", "privacy_accountant_state_dict"
        } <= set(checkpoint):
            raise ValueError(
                f"{path!r} is not a PrivacyEngine checkpoint: it needs the keys "
                "'module_state_dict' and 'privacy_accountant_state_dict'."
            )
        steps = self._checkpoint_steps(
            checkpoint, module, optimizer, noise_scheduler, grad_clip_scheduler,
            module_load_dict_kwargs or {}, data_loader,
        )
        _apply_all(steps)
        return {k: v for k, v in checkpoint.items() if k not in CHECKPOINT_KEYS}

    def _checkpoint_steps(
        self,
        checkpoint: Mapping[str, Any],
        module: nn.Module,
        optimizer: Optional[DPOptimizer],
        noise_scheduler: Optional[_NoiseScheduler],
        grad_clip_scheduler: Optional[_GradClipScheduler],
        module_kwargs: dict[str, Any],
        data_loader: Optional[DataLoader],
    ) -> list:
        """Validate what can be validated up front; return ``(snapshot, apply, restore)`` steps."""
        accountant_state = checkpoint["privacy_accountant_state_dict"]
        if not isinstance(accountant_state, Mapping) or "history" not in accountant_state:
            raise ValueError("the checkpoint's privacy_accountant_state_dict has no 'history'.")
        validate_history(accountant_state["history"])
        acc = self.accountant
        module_state = _match_ddp_prefix(checkpoint["module_state_dict"], module)
        steps: list = [
            (lambda: _module_snapshot(module),
             lambda: module.load_state_dict(module_state, **module_kwargs),
             module.load_state_dict),
            (acc.state_dict, lambda: acc.load_state_dict(accountant_state), acc.load_state_dict),
        ]
        optimizer_state = checkpoint.get("optimizer_state_dict")
        if (optimizer is not None) != (optimizer_state is not None):
            warnings.warn(
                f"the checkpoint {'has' if optimizer_state is not None else 'has no'} optimizer "
                f"state but optimizer={'None' if optimizer is None else 'given'}; the optimizer "
                "state is not restored.",
                UserWarning,
                stacklevel=3,
            )
        if optimizer is not None and optimizer_state is not None:
            steps.append((lambda: copy.deepcopy(optimizer.state_dict()),
                          lambda: optimizer.load_state_dict(optimizer_state),
                          optimizer.load_state_dict))
        dp_state = checkpoint.get("dp_optimizer_state_dict")
        if isinstance(optimizer, DPOptimizer) and dp_state is not None:
            steps.append(_dp_optimizer_step(optimizer, dp_state, module))
        for scheduler, key in ((noise_scheduler, "noise_scheduler_state_dict"),
                               (grad_clip_scheduler, "grad_clip_scheduler_state_dict")):
            if scheduler is not None and key in checkpoint:
                steps.append(_scheduler_step(scheduler, checkpoint[key]))
        sampler_state = checkpoint.get("data_loader_sampler_state_dict")
        if sampler_state is not None:
            sampler = _stateful_sampler(data_loader if data_loader is not None else self._data_loader)
            if sampler is None:
                warnings.warn(
                    "the checkpoint holds the Poisson sampler's position but there is no data loader "
                    "to restore it into; call make_private before load_checkpoint (or pass "
                    "data_loader=) to continue with the same batches.",
                    UserWarning,
                    stacklevel=3,
                )
            else:
                steps.append((sampler.state_dict, lambda: sampler.load_state_dict(sampler_state),
                              sampler.load_state_dict))
        return steps


# --------------------------------------------------------------------------- helpers (engine)


def _check_existing_wrapper(
    module: AbstractGradSampleModule,
    batch_first: bool,
    loss_reduction: str,
    grad_sample_mode: str,
    max_grad_norm: Any,
) -> None:
    expected = get_gsm_class(grad_sample_mode)
    mismatch = (
        module.batch_first != batch_first
        or module.loss_reduction != loss_reduction
        or type(module) is not expected
        or (grad_sample_mode == "ghost" and getattr(module, "max_grad_norm", None) != max_grad_norm)
        or (grad_sample_mode != "ghost" and isinstance(module, GradSampleModule)
            and module.force_functorch != (grad_sample_mode == "functorch"))
    )
    if mismatch:
        raise ValueError(
            "Pre-existing GradSampleModule doesn't match the new arguments: it has "
            f"type={type(module).__name__}, batch_first={module.batch_first}, "
            f"loss_reduction={module.loss_reduction!r}"
            + (f", max_grad_norm={module.max_grad_norm!r}" if hasattr(module, "max_grad_norm") else "")
            + f"; requested grad_sample_mode={grad_sample_mode!r} ({expected.__name__}), "
            f"batch_first={batch_first}, loss_reduction={loss_reduction!r}"
            + (f", max_grad_norm={max_grad_norm!r}" if grad_sample_mode == "ghost" else "")
            + ". Pass the plain nn.Module instead."
        )


def _check_criterion(criterion: Any, grad_sample_mode: str, loss_reduction: str) -> Any:
    if criterion is None:
        return nn.CrossEntropyLoss(reduction=loss_reduction)
    if not callable(criterion):
        raise TypeError(f"criterion must be callable (a loss), got {type(criterion).__name__}.")
    reduction = getattr(criterion, "reduction", loss_reduction)
    if grad_sample_mode == "ghost" and reduction != loss_reduction:
        raise ValueError(
            f"criterion.reduction={reduction!r} differs from loss_reduction={loss_reduction!r}; "
            "ghost clipping needs them equal (pass a criterion with the same reduction)."
        )
    return criterion


def _dp_optimizer_step(optimizer: DPOptimizer, saved: Any, module: Any) -> tuple:
    """Checkpoint step restoring the DP optimizer's settings and noise generator.

    A ghost-clipping module clips inside the backward pass with its own bound, which
    must stay the optimizer's bound (the noise is scaled by the latter): it is
    restored together with the optimizer's.
    """
    if not isinstance(saved, Mapping) or "noise_multiplier" not in saved:
        raise ValueError("the checkpoint's dp_optimizer_state_dict is malformed.")
    per_layer = isinstance(optimizer, DPPerLayerOptimizer)
    key = "max_grad_norms" if per_layer else "max_grad_norm"
    if key not in saved:
        raise ValueError(
            f"the checkpoint was written by a {saved.get('class')} but this optimizer is a "
            f"{type(optimizer).__name__}; use the same clipping mode as the saved run."
        )
    core_noise.noise_std(saved["noise_multiplier"], 1.0)
    if per_layer:
        core_clipping.per_layer_noise_norm(saved[key])
        if len(saved[key]) != len(optimizer.max_grad_norms):
            raise ValueError(
                f"the checkpoint has {len(saved[key])} per-layer bounds, this optimizer "
                f"{len(optimizer.max_grad_norms)}."
            )
    else:
        core_noise.noise_std(1.0, saved[key])
    restore_generator = _restore_generator(optimizer, saved.get("noise_generator", {}))
    ghost = module if isinstance(module, GradSampleHooksFastGradientClipping) else None

    def snapshot() -> dict[str, Any]:
        state = _dp_optimizer_state(optimizer)
        state["module_max_grad_norm"] = None if ghost is None else ghost.max_grad_norm
        return state

    def apply() -> None:
        optimizer.noise_multiplier = saved["noise_multiplier"]
        if per_layer:
            optimizer.max_grad_norms = [float(c) for c in saved[key]]
        else:
            optimizer.max_grad_norm = saved[key]
            if ghost is not None:
                ghost.max_grad_norm = float(saved[key])
        optimizer.num_nonfinite_grad_samples = int(saved.get("num_nonfinite_grad_samples", 0))
        restore_generator()

    def restore(state: dict[str, Any]) -> None:
        optimizer.noise_multiplier = state["noise_multiplier"]
        if per_layer:
            optimizer.max_grad_norms = state["max_grad_norms"]
        else:
            optimizer.max_grad_norm = state["max_grad_norm"]
        if ghost is not None:
            ghost.max_grad_norm = state["module_max_grad_norm"]
        optimizer.num_nonfinite_grad_samples = state["num_nonfinite_grad_samples"]
        _restore_generator(optimizer, state["noise_generator"])()

    return snapshot, apply, restore


def _scheduler_step(scheduler: Any, saved: Any) -> tuple:
    if not isinstance(saved, Mapping):
        raise ValueError(f"a scheduler state in the checkpoint is not a dict: {type(saved).__name__}.")
    return (lambda: copy.deepcopy(scheduler.state_dict()),
            lambda: scheduler.load_state_dict(dict(saved)),
            scheduler.load_state_dict)
