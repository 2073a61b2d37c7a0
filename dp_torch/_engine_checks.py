"""Argument checks of :class:`dp_torch.PrivacyEngine`, run before anything is changed.

:func:`plan_make_private` validates every argument of ``make_private`` and
returns what it will build (:class:`Plan`); the other functions check one
argument each, or read a value off the data loader (sampling rate, data set size).

Guarantee: a check only reads its arguments; an error leaves the module,
optimizer and data loader as they were.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn, optim
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset

from dp_torch import distributed as dp_distributed
from dp_torch.data_loader import DPDataLoader
from dp_torch.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from dp_torch.grad_sample import AbstractGradSampleModule, GradSampleModule, get_gsm_class
from dp_torch.grad_sample.utils import GHOST_MODES, GRAD_SAMPLE_MODES, check_mode_arguments
from dp_torch.optimizers import DPOptimizer, get_optimizer_class
from dp_torch.optimizers.utils import params as _trainable_params
from dpcore import clipping as core_clipping
from dpcore import noise as core_noise
from dpcore import sampling as core_sampling
from dpcore.checks import check_bool, check_choice

try:  # FSDP2 (torch >= 2.6); absent from trimmed builds
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # pragma: no cover - depends on the torch build
    _FSDPModule = None

CLIPPINGS = ("flat", "per_layer", "adaptive")
LOSS_REDUCTIONS = ("mean", "sum")
ADAPTIVE_KWARGS = core_clipping.ADAPTIVE_OPTIONS


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``make_private`` will build, decided before anything is changed."""

    optimizer: optim.Optimizer
    criterion: Any
    distributed: bool
    sample_rate: float
    expected_batch_size: Optional[int]


# --------------------------------------------------------------------------- single arguments


def check_data_loader(data_loader: Any) -> None:
    """Raise ``TypeError`` unless ``data_loader`` is a torch ``DataLoader``."""
    if not isinstance(data_loader, DataLoader):
        raise TypeError(
            f"data_loader must be a torch.utils.data.DataLoader, got "
            f"{type(data_loader).__name__}; see the 'No DataLoader' section of the migration "
            "guide for training without one."
        )


def unwrap_optimizer(optimizer: Any) -> optim.Optimizer:
    """The plain torch optimizer (a ``DPOptimizer``'s wrapped one); ``TypeError`` otherwise."""
    if isinstance(optimizer, DPOptimizer):
        return optimizer.original_optimizer
    if not isinstance(optimizer, optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; create "
            "it from the model's parameters, e.g. torch.optim.SGD(model.parameters(), lr=0.05)."
        )
    return optimizer


def check_parameters(module: nn.Module, optimizer: optim.Optimizer) -> None:
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


def check_noise_generator(generator: Any, secure_mode: bool) -> None:
    """A ``torch.Generator``, a ``NoiseSource`` or ``None``; in secure mode a secure one only."""
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


def distributed_kind(module: nn.Module) -> Optional[str]:
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


def torch_ddp(module: nn.Module) -> Optional[DDP]:
    """The ``torch`` ``DistributedDataParallel`` wrapper of ``module`` (or inside its GSM), if any."""
    inner = module._module if isinstance(module, AbstractGradSampleModule) else module
    for candidate in (module, inner):
        if isinstance(candidate, DDP):
            return candidate
    return None


def _refuse_fsdp_mode(kind: Optional[str], grad_sample_mode: str) -> None:
    """An FSDP model needs ``"ghost_fsdp"``, and ``"ghost_fsdp"`` an FSDP model."""
    if kind == "FSDP":
        raise NotImplementedError(
            f"make_private got an FSDP2 (fully_shard) model with grad_sample_mode="
            f"{grad_sample_mode!r}; sharded models are supported in ghost clipping only: pass "
            "grad_sample_mode='ghost_fsdp' (per-layer and adaptive clipping are not available "
            "under FSDP)."
        )
    raise ValueError(
        f"grad_sample_mode='ghost_fsdp' needs a model sharded with FSDP2, got "
        f"{'a ' + kind + ' model' if kind else 'an unsharded model'}; shard it with "
        "dp_torch.utils.fsdp_utils.FSDP2Wrapper(model) (or torch.distributed.fsdp.fully_shard), "
        "or use grad_sample_mode='ghost'."
    )


def check_distributed(
    module: nn.Module, clipping: str, grad_sample_mode: str, data_loader: DataLoader
) -> bool:
    """Whether ``module`` is data-parallel; raise for a combination that cannot be private."""
    kind = distributed_kind(module)
    if (kind == "FSDP") != (grad_sample_mode == "ghost_fsdp"):
        _refuse_fsdp_mode(kind, grad_sample_mode)
    if kind is None:
        return False
    dp_distributed.require_process_group(f"make_private with a {kind} model")
    get_optimizer_class(clipping=clipping, distributed=True, grad_sample_mode=grad_sample_mode)
    ddp = torch_ddp(module)
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


def check_max_grad_norm(max_grad_norm: Any, clipping: str, optimizer: optim.Optimizer) -> None:
    """One bound ``> 0``, or for ``"per_layer"`` one per trainable parameter of ``optimizer``."""
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


def check_optimizer_kwargs(
    kwargs: Mapping[str, Any], clipping: str, noise_multiplier: float, max_grad_norm: Any,
    expected_batch_size: Optional[int],
) -> None:
    """Extra keyword arguments: exactly the adaptive-clipping ones, and only for ``"adaptive"``."""
    core_clipping.check_adaptive_options(
        kwargs, clipping, noise_multiplier, max_grad_norm, expected_batch_size, require_all=True,
        batch_hint="use a data loader with fewer, larger batches.",
    )


def dataset_size(data_loader: DataLoader) -> int:
    """``len(data_loader.dataset)``, which must be known and ``>= 1``."""
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


def sample_rate(data_loader: DataLoader) -> float:
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


def calibration_kwarg_names(accountant: Any) -> set[str]:
    """Keyword arguments of ``accountant.get_epsilon`` (besides ``delta``), plus ``epsilon_tolerance``."""
    names = {"epsilon_tolerance"}
    for name, param in inspect.signature(accountant.get_epsilon).parameters.items():
        if name != "delta" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            names.add(name)
    return names


def check_existing_wrapper(
    module: AbstractGradSampleModule,
    batch_first: bool,
    loss_reduction: str,
    grad_sample_mode: str,
    max_grad_norm: Any,
) -> None:
    """A pre-wrapped module must have been wrapped with the requested settings."""
    expected = get_gsm_class(grad_sample_mode)
    mismatch = (
        module.batch_first != batch_first
        or module.loss_reduction != loss_reduction
        or type(module) is not expected
        or (grad_sample_mode in GHOST_MODES and getattr(module, "max_grad_norm", None) != max_grad_norm)
        or (grad_sample_mode not in GHOST_MODES and isinstance(module, GradSampleModule)
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
            + (f", max_grad_norm={max_grad_norm!r}" if grad_sample_mode in GHOST_MODES else "")
            + ". Pass the plain nn.Module instead."
        )


def check_criterion(criterion: Any, grad_sample_mode: str, loss_reduction: str) -> Any:
    """The loss to use: ``criterion``, or a fresh ``CrossEntropyLoss`` when it is ``None``."""
    if criterion is None:
        return nn.CrossEntropyLoss(reduction=loss_reduction)
    if not callable(criterion):
        raise TypeError(f"criterion must be callable (a loss), got {type(criterion).__name__}.")
    reduction = getattr(criterion, "reduction", loss_reduction)
    if grad_sample_mode in GHOST_MODES and reduction != loss_reduction:
        raise ValueError(
            f"criterion.reduction={reduction!r} differs from loss_reduction={loss_reduction!r}; "
            "ghost clipping needs them equal (pass a criterion with the same reduction)."
        )
    return criterion


# --------------------------------------------------------------------------- make_private


def _check_options(
    loss_reduction: Any, clipping: Any, grad_sample_mode: Any, flags: Mapping[str, Any]
) -> None:
    """The boolean flags and the string options, and the pairs of them that do not combine."""
    for name, value in flags.items():
        check_bool(value, name)
    check_choice(loss_reduction, "loss_reduction", LOSS_REDUCTIONS,
                 " It must be the reduction of your loss over the batch.")
    check_choice(clipping, "clipping", CLIPPINGS)
    check_choice(grad_sample_mode, "grad_sample_mode", GRAD_SAMPLE_MODES,
                 " (Opacus' 'ghost_tp' is not provided.)")
    check_mode_arguments(grad_sample_mode, wrap_model=flags["wrap_model"],
                         batch_first=flags["batch_first"])
    if grad_sample_mode in GHOST_MODES and clipping != "flat":
        raise ValueError(
            f'grad_sample_mode="{grad_sample_mode}" supports only clipping="flat", got clipping={clipping!r}; '
            'use grad_sample_mode="hooks" for per-layer or adaptive clipping.'
        )


def _check_sampling(data_loader: DataLoader, poisson_sampling: bool, secure_mode: bool) -> None:
    """Poisson sampling needs a map-style data set; secure mode needs secure Poisson sampling."""
    if isinstance(data_loader.dataset, IterableDataset) and poisson_sampling:
        raise ValueError(
            "Poisson sampling needs a map-style dataset; data_loader.dataset is an "
            "IterableDataset. Use a map-style Dataset (with __len__ and __getitem__)."
        )
    if secure_mode and not poisson_sampling:
        raise ValueError(
            "secure_mode=True requires poisson_sampling=True: a shuffled or sequential "
            "DataLoader draws its order from torch's seedable RNG, and the accountant's "
            "guarantee assumes Poisson batches anyway."
        )
    if secure_mode and isinstance(data_loader, DPDataLoader) and not getattr(
        data_loader.batch_sampler, "secure_mode", False
    ):
        raise ValueError(
            "secure_mode=True was given a DPDataLoader whose sampler is not secure (seeded or "
            "pseudo-random); pass the original DataLoader and let make_private build a "
            "secure DPDataLoader."
        )


def plan_make_private(
    *,
    secure_mode: bool,
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
) -> Plan:
    """Validate the arguments of ``make_private`` (all but the data set and the module's layers).

    Args:
        secure_mode: The engine's secure mode.
        module: As ``make_private``; so are the other arguments.
        optimizer: The optimizer.
        data_loader: The data loader.
        criterion: The ghost-clipping loss, or ``None``.
        noise_multiplier: ``sigma``.
        max_grad_norm: The clipping bound(s).
        batch_first: Layout flag.
        loss_reduction: ``"mean"`` or ``"sum"``.
        poisson_sampling: Poisson flag.
        clipping: Clipping mode.
        noise_generator: Noise source.
        grad_sample_mode: Per-sample gradient mode.
        wrap_model: Wrapper flag.
        rand_on_empty: Empty-batch flag.
        optimizer_kwargs: The extra keyword arguments.

    Returns:
        The :class:`Plan`.

    Raises:
        TypeError: On an argument of the wrong type or an unexpected keyword.
        ValueError: On an invalid value or combination (the message names it).
        NotImplementedError: For an FSDP model in a mode other than ``"ghost_fsdp"``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    base_optimizer = unwrap_optimizer(optimizer)
    check_data_loader(data_loader)
    flags = {"batch_first": batch_first, "poisson_sampling": poisson_sampling,
             "wrap_model": wrap_model, "rand_on_empty": rand_on_empty}
    _check_options(loss_reduction, clipping, grad_sample_mode, flags)
    check_noise_generator(noise_generator, secure_mode)
    core_noise.noise_std(noise_multiplier, 1.0)  # validates noise_multiplier
    check_max_grad_norm(max_grad_norm, clipping, base_optimizer)
    check_parameters(module, base_optimizer)
    distributed = check_distributed(module, clipping, grad_sample_mode, data_loader)
    _check_sampling(data_loader, poisson_sampling, secure_mode)
    num_samples = dataset_size(data_loader)
    rate = sample_rate(data_loader)
    batch_size = core_sampling.expected_batch_size(num_samples, rate, loss_reduction)
    check_optimizer_kwargs(optimizer_kwargs, clipping, noise_multiplier, max_grad_norm, batch_size)
    if wrap_model and isinstance(module, AbstractGradSampleModule):
        check_existing_wrapper(module, batch_first, loss_reduction, grad_sample_mode, max_grad_norm)
    return Plan(
        optimizer=base_optimizer,
        criterion=check_criterion(criterion, grad_sample_mode, loss_reduction),
        distributed=distributed,
        sample_rate=rate,
        expected_batch_size=batch_size,
    )
