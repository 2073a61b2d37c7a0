"""``DPOptimizer``: DP-SGD on top of any ``torch.optim.Optimizer``.

One logical step of DP-SGD, split into named phases that can be called, tested
and overridden one at a time:

1. :meth:`DPOptimizer.clip_and_accumulate`: per-example L2 norm over *all*
   trainable parameters, clip factor ``min(1, C / (norm + 1e-6))`` (a non-finite
   norm gives factor 0 and the example is dropped), clipped sum added to
   ``p.summed_grad``;
2. :meth:`DPOptimizer.add_noise`: ``N(0, (sigma * C)**2)`` added once to the sum,
   result in ``p.grad``;
3. :meth:`DPOptimizer.scale_grad`: ``loss_reduction="mean"`` divides by the
   *expected* batch size (never the realised one), ``"sum"`` does not divide;
4. the step hook (privacy accounting), then the wrapped optimizer's ``step``.

Norms, factors, sums and noise are float32 or wider whatever the model's dtype, and a
``torch.amp.GradScaler`` loss scale is divided out of the per-example gradients (see
:mod:`dp_torch.optimizers._mixed_precision`).

The rules are those of :mod:`dpcore.clipping` and :mod:`dpcore.noise`; the tests
compare against that numpy reference math.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from dp_torch.grad_sample._rows import check_rows
from dp_torch.optimizers import _mixed_precision as mp
from dp_torch.optimizers.utils import params as _trainable_params
from dpcore import clipping as core_clipping
from dpcore import noise as core_noise

__all__ = ["DPOptimizer", "LossScaleError", "NoiseGenerator"]

LossScaleError = mp.LossScaleError

logger = logging.getLogger(__name__)

#: What ``generator=`` accepts: a ``torch.Generator`` (as in Opacus), a
#: :class:`dpcore.noise.NoiseSource` (framework-neutral stream shared with the JAX
#: backend), or ``None`` (torch's default generator, or OS entropy in secure mode).
NoiseGenerator = Union[torch.Generator, core_noise.NoiseSource, None]

#: Per-parameter clip factors (``None`` where a parameter has no per-sample
#: gradient) and the boolean mask of the examples that are kept (finite norm).
ClipFactors = tuple[list[Optional[torch.Tensor]], torch.Tensor]

_NOT_CLEARED = (
    "Gradients haven't been cleared since the last optimizer step. "
    "In order to obtain privacy guarantees you must call optimizer.zero_grad() "
    "on each step"
)


# --------------------------------------------------------------------------- processed flags


def _mark_as_processed(obj: Union[torch.Tensor, list[torch.Tensor], None]) -> None:
    """Tag a gradient tensor (or each tensor of a list) as already used by a step.

    DP-SGD must never reuse a gradient in two noise-adding steps; the tag lets the
    next step detect a missing ``zero_grad()``. Only ``p.grad_sample`` and
    ``p.summed_grad`` are tagged.
    """
    if isinstance(obj, torch.Tensor):
        obj._processed = True
    elif isinstance(obj, list):
        for tensor in obj:
            tensor._processed = True


def _check_processed_flag_tensor(x: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``x`` was tagged by :func:`_mark_as_processed`."""
    if hasattr(x, "_processed"):
        raise ValueError(_NOT_CLEARED)


def _check_processed_flag(obj: Union[torch.Tensor, list[torch.Tensor], None]) -> None:
    """Raise ``ValueError`` if a tensor, or any tensor of a list, was already used."""
    if isinstance(obj, torch.Tensor):
        _check_processed_flag_tensor(obj)
    elif isinstance(obj, list):
        for tensor in obj:
            _check_processed_flag_tensor(tensor)


def _wrapped_attribute(name: str, doc: str) -> property:
    """A property that reads and writes attribute ``name`` of ``self.original_optimizer``."""

    def get(self: Any) -> Any:
        return getattr(self.original_optimizer, name)

    def set_(self: Any, value: Any) -> None:
        setattr(self.original_optimizer, name, value)

    return property(get, set_, doc=doc)


# --------------------------------------------------------------------------- noise


def _check_generator(generator: Any, secure_mode: Any) -> NoiseGenerator:
    """Validate the ``generator`` / ``secure_mode`` pair; return the generator."""
    if not isinstance(secure_mode, bool):
        raise TypeError(f"secure_mode must be a bool, got {secure_mode!r}.")
    if generator is None:
        return None
    if isinstance(generator, core_noise.NoiseSource):
        if secure_mode and not generator.secure_mode:
            raise ValueError(
                "secure_mode=True was given with a seeded dpcore.noise.NoiseSource "
                f"(seed={generator.seed!r}); its noise is predictable. Pass generator=None "
                "or dpcore.noise.NoiseSource(secure_mode=True)."
            )
        return generator
    if isinstance(generator, torch.Generator):
        if secure_mode:
            raise ValueError(
                f"secure_mode=True was given with generator={generator!r}; a torch.Generator "
                "can be seeded, so its noise is predictable. Secure noise comes from OS "
                "entropy: pass generator=None (or dpcore.noise.NoiseSource(secure_mode=True))."
            )
        return generator
    raise TypeError(
        f"generator must be a torch.Generator, a dpcore.noise.NoiseSource or None, got "
        f"{type(generator).__name__}."
    )


def _generate_noise(
    std: float,
    reference: torch.Tensor,
    generator: NoiseGenerator = None,
    secure_mode: bool = False,
) -> torch.Tensor:
    """Gaussian noise with mean 0 and standard deviation ``std``, shaped like ``reference``.

    * ``torch.Generator`` or ``None`` (not secure): ``torch.normal`` in the
      reference's dtype, drawn on the generator's device and moved to the
      reference's device. ``std == 0`` gives zeros and draws nothing (as Opacus).
    * :class:`dpcore.noise.NoiseSource` (reproducibility mode): the float64 draw
      ``source.normal(shape, std)`` cast to the reference's dtype and device, so
      a JAX run sharing the source adds identical noise. The source is called
      even when ``std == 0`` to keep its stream position independent of it.
    * ``secure_mode=True``: the hardened OS-entropy sampler of
      ``NoiseSource(secure_mode=True)`` (the sum of four inverse-CDF normals from
      ``os.urandom``, scaled by ``1/2``), returned in **float64**; see
      :meth:`DPOptimizer.add_noise` for why the addition is done at that precision.

    Args:
        std: Standard deviation ``>= 0``.
        reference: Tensor whose shape, device and dtype the noise takes.
        generator: Noise source (see :data:`NoiseGenerator`).
        secure_mode: Use the hardened sampler (refuses seeded generators).

    Returns:
        The noise tensor (float64 in secure mode, else the reference's dtype).
    """
    shape = tuple(reference.shape)
    if secure_mode or isinstance(generator, core_noise.NoiseSource):
        source = generator if generator is not None else core_noise.NoiseSource(secure_mode=True)
        if secure_mode and not source.secure_mode:
            raise ValueError("secure_mode=True needs a secure NoiseSource or generator=None.")
        draw = torch.from_numpy(np.ascontiguousarray(source.normal(shape, std)))
        if secure_mode:
            return draw.to(_wide_device(reference.device))
        return draw.to(device=reference.device, dtype=reference.dtype)
    if std == 0:
        return torch.zeros_like(reference)
    device = generator.device if generator is not None else reference.device
    noise = torch.normal(
        mean=0.0, std=std, size=shape, generator=generator, device=device, dtype=reference.dtype
    )
    return noise.to(reference.device)


def _wide_device(device: torch.device) -> torch.device:
    """Where float64 arithmetic for ``device`` is done (MPS has no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def _noised(summed: torch.Tensor, noise: torch.Tensor, *, into_noise: bool = False) -> torch.Tensor:
    """``summed + noise`` in the parameter dtype; a float64 noise is added exactly, rounded once.

    With ``into_noise`` (``noise`` is a fresh tensor of the caller's, used nowhere else) the sum
    of equal dtypes is written into ``noise`` instead of a new tensor: the same values (addition
    is commutative), one allocation fewer.
    """
    if noise.dtype == summed.dtype:
        if into_noise and noise.device == summed.device and noise.shape == summed.shape:
            return noise.add_(summed)
        return summed + noise
    work = _wide_device(summed.device)
    wide = summed.to(device=work, dtype=torch.float64) + noise.to(work)
    return wide.to(device=summed.device, dtype=summed.dtype)


# --------------------------------------------------------------------------- per-sample helpers


def _flat_grad_sample(p: torch.Tensor) -> Optional[torch.Tensor]:
    """``p.grad_sample`` as one ``[B, *p.shape]`` tensor, or ``None`` when there is none."""
    grad_sample = getattr(p, "grad_sample", None)
    if grad_sample is None:
        return None
    if isinstance(grad_sample, torch.Tensor):
        flat = grad_sample
    elif isinstance(grad_sample, list):
        if not grad_sample:
            return None
        flat = torch.cat(grad_sample, dim=0)
    else:
        raise ValueError(
            f"Unexpected grad_sample type: {type(grad_sample).__name__}; expected a tensor of "
            f"shape [batch, *param.shape] or a list of such tensors."
        )
    if tuple(flat.shape[1:]) != tuple(p.shape):
        raise ValueError(
            f"grad_sample has shape {tuple(flat.shape)} but its parameter has shape "
            f"{tuple(p.shape)}; expected [batch_size, *param.shape]."
        )
    return flat


def _has_nonzero_grad(p: torch.Tensor) -> bool:
    """Whether a backward pass wrote a non-zero ``p.grad`` (checked only on empty steps)."""
    return p.grad is not None and bool(p.grad.ne(0).any())


def _num_accumulated(p: torch.Tensor) -> int:
    """Number of backward passes stored in ``p.grad_sample`` (0 when there is none)."""
    grad_sample = getattr(p, "grad_sample", None)
    if grad_sample is None:
        return 0
    if isinstance(grad_sample, torch.Tensor):
        return 1
    if isinstance(grad_sample, list):
        return len(grad_sample)
    raise ValueError(f"Unexpected grad_sample type: {type(grad_sample).__name__}")


def _row_norms(g: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-row L2 norms of ``g`` (``[batch, ...]``), computed in at least float32."""
    numel = math.prod(g.shape[1:])
    return torch.linalg.vector_norm(g.reshape(batch, numel), ord=2, dim=1, dtype=mp.accumulation_dtype(g))


def _clip_factor(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / (norm + 1e-6))`` with factor 0 for a non-finite norm (dpcore's rule)."""
    factor = (max_grad_norm / (norms + core_clipping.CLIP_EPSILON)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factor, torch.zeros_like(factor))


def _rows_mask(keep: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return keep.to(g.device).reshape((-1,) + (1,) * (g.dim() - 1))


# --------------------------------------------------------------------------- saved DP state


def _generator_kind(optimizer: DPOptimizer) -> str:
    """``"secure"``, ``"torch.Generator"``, ``"NoiseSource"`` or ``"default"`` (torch's own)."""
    generator = optimizer.generator
    if optimizer.secure_mode:
        return "secure"
    if isinstance(generator, torch.Generator):
        return "torch.Generator"
    if isinstance(generator, core_noise.NoiseSource):
        return "NoiseSource"
    return "default"


def _generator_state(optimizer: DPOptimizer) -> dict[str, Any]:
    """The state of the optimizer's noise source, tagged with its kind."""
    kind = _generator_kind(optimizer)
    if kind == "secure":
        return {"kind": kind}
    if kind == "torch.Generator":
        return {"kind": kind, "state": optimizer.generator.get_state()}
    if kind == "NoiseSource":
        return {"kind": kind, "state": optimizer.generator.state_dict()}
    cuda = sorted({p.device.index or 0 for p in optimizer.params if p.device.type == "cuda"})
    return {
        "kind": kind,
        "cpu": torch.get_rng_state(),
        "cuda": {index: torch.cuda.get_rng_state(index) for index in cuda},
    }


def _generator_loader(optimizer: DPOptimizer, saved: Any) -> Callable[[], None]:
    """Check that ``saved`` fits the optimizer's noise source; return the function loading it."""
    kind = saved.get("kind") if isinstance(saved, Mapping) else None
    current = _generator_kind(optimizer)
    if current == "secure" or kind == "secure":
        return lambda: None  # OS entropy has no state; a secure run never takes a seeded one
    if kind != current:
        raise ValueError(
            f"the saved DP state's noise came from a {kind!r} source but this optimizer's noise "
            f"generator is {current!r}; pass the same kind of noise_generator to make_private "
            "(a torch.Generator, a dpcore.noise.NoiseSource, or None for torch's default "
            "generator) before loading the state."
        )
    generator = optimizer.generator
    if kind == "torch.Generator":
        return lambda: generator.set_state(saved["state"])
    if kind == "NoiseSource":
        return lambda: generator.load_state_dict(saved["state"])

    def restore_default() -> None:
        torch.set_rng_state(saved["cpu"])
        for index, state in saved.get("cuda", {}).items():
            torch.cuda.set_rng_state(state, index)

    return restore_default


def _check_saved_bounds(optimizer: DPOptimizer, saved: Mapping[str, Any]) -> str:
    """Validate the saved clipping bound(s) against ``optimizer``; return their key."""
    per_layer = getattr(optimizer, "max_grad_norms", None) is not None
    key = "max_grad_norms" if per_layer else "max_grad_norm"
    if key not in saved:
        raise ValueError(
            f"the saved DP state was written by a {saved.get('class')} but this optimizer is a "
            f"{type(optimizer).__name__}; use the same clipping mode as the saved run."
        )
    if not per_layer:
        core_noise.noise_std(1.0, saved[key])
        return key
    core_clipping.per_layer_noise_norm(saved[key])
    if len(saved[key]) != len(optimizer.max_grad_norms):
        raise ValueError(
            f"the saved DP state has {len(saved[key])} per-layer bounds, this optimizer "
            f"{len(optimizer.max_grad_norms)}; load it into an optimizer over the same parameters."
        )
    return key


# --------------------------------------------------------------------------- optimizer


class DPOptimizer(Optimizer):
    """Wrap a ``torch.optim.Optimizer`` so that each step is a DP-SGD step.

    The parameters must carry per-sample gradients in ``p.grad_sample`` (shape
    ``[B, *p.shape]``, or a list of such tensors after several backward passes),
    as produced by ``dp_torch.GradSampleModule``. Each (logical) step clips every
    example's gradient to ``max_grad_norm`` in L2 over all parameters, sums,
    adds ``N(0, (noise_multiplier * max_grad_norm)**2)`` once per coordinate,
    divides by ``expected_batch_size`` for ``loss_reduction="mean"``, calls the
    step hook (privacy accounting) and then the wrapped optimizer's ``step``.

    Guarantee: with Poisson-sampled batches of rate ``q``, one step is the
    sampled Gaussian mechanism with multiplier ``noise_multiplier`` and
    sensitivity ``max_grad_norm`` under add/remove-one neighbouring data sets;
    the accountant attached through :meth:`attach_step_hook` composes it.

    Empty batches are real steps: a parameter with no per-sample gradient (or
    one with zero rows) contributes zero, the noise is still added and the step
    hook still fires.

    Mixed precision: per-example norms, clip factors, the clipped sum
    (``p.summed_grad``) and the noise are float32 (float64 for a float64 model)
    whatever the dtype of the model, its activations or its per-sample gradients
    (``torch.autocast``, or a ``model.to(torch.bfloat16)``); a bfloat16 or float16
    parameter gets ``p.grad`` rounded to its dtype once, after noise and scaling.
    With ``torch.amp.GradScaler`` (``scaler.scale(loss).backward();
    scaler.step(optimizer); scaler.update()``) the scaler hands the loss scale to
    this optimizer, which divides it out of the per-example gradients before
    clipping, so clipping and noise are those of the unscaled loss. A step whose
    scaled gradients overflowed raises :class:`LossScaleError` before anything is
    updated or accounted, instead of being skipped (a skip would depend on the
    batch without noise); use a fixed scale small enough for your gradients, or
    bfloat16, which needs no scaler.

    Where this differs from Opacus 1.6 and why: ``docs/opacus_differences.md``.

    Attributes:
        original_optimizer: The wrapped optimizer.
        noise_multiplier: ``sigma`` (read by the accountant at every step; noise
            schedulers change it).
        max_grad_norm: The clipping bound ``C``.
        expected_batch_size: Denominator of ``"mean"`` (may be ``None`` for ``"sum"``).
        loss_reduction: ``"mean"`` or ``"sum"``.
        step_hook: Called as ``step_hook(self)`` after each noise-adding step.
        generator: Noise source (see :data:`NoiseGenerator`).
        secure_mode: Whether noise is hardened and drawn from OS entropy.
        num_nonfinite_grad_samples: Examples dropped so far for a non-finite norm.

    Example:
        >>> model = GradSampleModule(nn.Linear(4, 2))
        >>> opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                   noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=32)
    """

    #: Key under which :meth:`load_state_dict` takes the DP settings (:meth:`dp_state_dict`).
    DP_STATE_KEY = "dp_optimizer"

    #: ``torch.amp.GradScaler.step`` hands over the loss scale instead of unscaling ``p.grad``.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator: NoiseGenerator = None,
        secure_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create the wrapper (validates every argument before changing anything).

        Args:
            optimizer: The optimizer to wrap (any ``torch.optim.Optimizer``).
            noise_multiplier: ``sigma >= 0``; the noise std is ``sigma * max_grad_norm``.
            max_grad_norm: Clipping bound ``C > 0``.
            expected_batch_size: ``int(N * q) >= 1``, the averaging denominator of
                ``loss_reduction="mean"`` (required then; ignored for ``"sum"``).
            loss_reduction: ``"mean"`` or ``"sum"``; must match the loss.
            generator: ``torch.Generator``, ``dpcore.noise.NoiseSource`` or ``None``.
            secure_mode: Harden the noise against floating-point attacks and draw
                it from OS entropy; refuses a seedable ``generator``.
            **kwargs: Accepted and ignored (Opacus compatibility).

        Raises:
            TypeError: If ``optimizer`` or ``generator`` has the wrong type.
            ValueError: On any invalid value.
        """
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "create e.g. torch.optim.SGD(model.parameters(), lr=...) first."
            )
        self._check_environment()
        max_grad_norm = self._noise_bound(optimizer, max_grad_norm)
        core_noise.noise_std(noise_multiplier, max_grad_norm)  # validates both
        _check_reduction(loss_reduction, expected_batch_size)
        generator = _check_generator(generator, secure_mode)
        if kwargs:
            logger.debug("DPOptimizer ignores extra arguments %s", sorted(kwargs))

        self.original_optimizer = optimizer
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.loss_reduction = loss_reduction
        self.expected_batch_size = expected_batch_size
        self.step_hook: Optional[Callable[[DPOptimizer], None]] = None
        self.generator = generator
        self.secure_mode = secure_mode
        self.num_nonfinite_grad_samples = 0
        self._step_skip_queue: list[bool] = []
        self._is_last_step_skipped = False
        self._loss_scale: Optional[mp.LossScale] = None
        for p in self.params:
            p.summed_grad = None
        self._finish_setup()

    # ----------------------------------------------------------------- passthrough

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters of every param group, in order."""
        return _trainable_params(self)

    def _check_environment(self) -> None:
        """Check what the optimizer needs around it, before anything else (DDP: a process group)."""

    def _finish_setup(self) -> None:
        """The last step of construction, once every setting is in place (FSDP: the ranks agree
        on the noise generator)."""

    def _noise_bound(self, optimizer: Optimizer, max_grad_norm: Any) -> Any:
        """The sensitivity ``C`` the noise is scaled by, from the ``max_grad_norm`` argument.

        Args:
            optimizer: The optimizer being wrapped (already type-checked).
            max_grad_norm: The constructor argument.

        Returns:
            ``max_grad_norm`` itself here; per-layer clipping derives it from a list of bounds.
        """
        return max_grad_norm

    param_groups = _wrapped_attribute(
        "param_groups", "The wrapped optimizer's ``param_groups`` (shared, not copied)."
    )
    state = _wrapped_attribute("state", "The wrapped optimizer's per-parameter state.")
    defaults = _wrapped_attribute("defaults", "The wrapped optimizer's default hyperparameters.")

    def __repr__(self) -> str:
        return self.original_optimizer.__repr__()

    def state_dict(self) -> dict:
        """The wrapped optimizer's ``state_dict`` (the DP settings are :meth:`dp_state_dict`)."""
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict``, and the DP settings when it holds them; all or nothing.

        The DP settings are an extra entry under :attr:`DP_STATE_KEY`, e.g.
        ``{**opt.state_dict(), DPOptimizer.DP_STATE_KEY: opt.dp_state_dict()}``; they
        are checked before anything changes. Without that entry only the wrapped
        optimizer is loaded.

        Args:
            state_dict: A dict returned by :meth:`state_dict`, possibly with the extra entry.

        Raises:
            ValueError: If the DP entry does not fit this optimizer (see
                :meth:`load_dp_state_dict`).
        """
        wrapped = dict(state_dict)
        dp_state = wrapped.pop(self.DP_STATE_KEY, None)
        apply = None if dp_state is None else self._dp_state_loader(dp_state)
        self.original_optimizer.load_state_dict(wrapped)
        if apply is not None:
            apply()

    def dp_state_dict(self) -> dict[str, Any]:
        """The DP settings: everything a resumed run needs besides the wrapped optimizer.

        Returns:
            ``class`` (this class's name), ``noise_multiplier``,
            ``num_nonfinite_grad_samples``, ``noise_generator`` (the noise source's
            state, tagged with its kind: a ``torch.Generator``'s, a ``NoiseSource``'s,
            torch's default generators' when none was given, nothing in secure
            mode), ``max_grad_norm`` (the current adaptive bound for adaptive
            clipping) or ``max_grad_norms`` (per-layer clipping), and
            ``expected_batch_size``.
        """
        state: dict[str, Any] = {
            "class": type(self).__name__,
            "noise_multiplier": self.noise_multiplier,
            "num_nonfinite_grad_samples": self.num_nonfinite_grad_samples,
            "noise_generator": _generator_state(self),
        }
        norms = getattr(self, "max_grad_norms", None)
        if norms is not None:
            state["max_grad_norms"] = list(norms)
        else:
            state["max_grad_norm"] = self.max_grad_norm
        state["expected_batch_size"] = self.expected_batch_size
        return state

    def load_dp_state_dict(self, dp_state: Mapping[str, Any]) -> None:
        """Restore :meth:`dp_state_dict`'s settings; all checked before any is set.

        ``expected_batch_size`` and ``num_nonfinite_grad_samples`` are optional
        (kept, and reset to 0, when absent).

        Args:
            dp_state: A dict returned by :meth:`dp_state_dict`.

        Raises:
            ValueError: If it is malformed, was written with another clipping mode
                or number of per-layer bounds, or its noise came from another kind
                of noise source.
        """
        self._dp_state_loader(dp_state)()

    def _dp_state_loader(self, saved: Any) -> Callable[[], None]:
        """Validate ``saved`` (a :meth:`dp_state_dict`); return the function applying it."""
        if not isinstance(saved, Mapping) or "noise_multiplier" not in saved:
            raise ValueError(
                "the saved DP state (a checkpoint's dp_optimizer_state_dict) must be a dict from "
                f"DPOptimizer.dp_state_dict() with a 'noise_multiplier', got {type(saved).__name__}."
            )
        key = _check_saved_bounds(self, saved)
        core_noise.noise_std(saved["noise_multiplier"], 1.0)
        batch_size = saved.get("expected_batch_size", self.expected_batch_size)
        _check_reduction(self.loss_reduction, batch_size)
        load_generator = _generator_loader(self, saved.get("noise_generator", {}))

        def apply() -> None:
            self.noise_multiplier = saved["noise_multiplier"]
            if key == "max_grad_norms":
                self.max_grad_norms = [float(c) for c in saved[key]]
            else:
                self.max_grad_norm = saved[key]
            self.expected_batch_size = batch_size
            self.num_nonfinite_grad_samples = int(saved.get("num_nonfinite_grad_samples", 0))
            load_generator()

        return apply

    # ----------------------------------------------------------------- per-sample views

    def _get_flat_grad_sample(self, p: torch.Tensor) -> torch.Tensor:
        """``p.grad_sample`` as one tensor (a list is concatenated along the batch axis).

        Raises:
            ValueError: If ``p`` has no ``grad_sample`` or it is ``None``.
        """
        if not hasattr(p, "grad_sample"):
            raise ValueError("Per sample gradient not found. Are you using GradSampleModule?")
        flat = _flat_grad_sample(p)
        if flat is None:
            raise ValueError(
                "Per sample gradient is not initialized. Not updated in backward pass?"
            )
        return flat

    @property
    def grad_samples(self) -> list[torch.Tensor]:
        """One flat per-sample gradient tensor per parameter.

        A parameter without a per-sample gradient (nothing sampled, or not reached
        by the backward pass) is shown as zeros with the batch size of the others
        (``[0, *p.shape]`` when no parameter has one).
        """
        flats = [_flat_grad_sample(p) for p in self.params]
        batch = next((g.shape[0] for g in flats if g is not None), 0)
        return [
            g if g is not None else p.new_zeros((batch, *p.shape))
            for p, g in zip(self.params, flats)
        ]

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes accumulated in ``p.grad_sample`` since the last ``zero_grad``.

        Normally 1. An empty step (no parameter has a per-sample gradient) counts as
        1. The accountant multiplies the sample rate by it, ``scale_grad`` the
        denominator.

        Raises:
            ValueError: If parameters disagree on the number of accumulated passes.
        """
        counts = {_num_accumulated(p) for p in self.params} - {0}
        if len(counts) > 1:
            raise ValueError(
                f"Number of accumulated steps is inconsistent across parameters: {sorted(counts)}; "
                "call optimizer.zero_grad() after each step."
            )
        return counts.pop() if counts else 1

    # ----------------------------------------------------------------- skip / hooks

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Queue whether the next ``step()`` only clips and accumulates (``True``) or is full.

        Used by :class:`~dp_torch.utils.batch_memory_manager.BatchMemoryManager`:
        every physical chunk but the last of a logical batch is skipped, so the
        clipped sums accumulate in ``p.summed_grad`` (which ``zero_grad`` then
        keeps) and noise is added once, at the end of the logical batch.

        Args:
            do_skip: ``True`` to skip noise and the parameter update at the next step.
        """
        self._step_skip_queue.append(do_skip)

    def _check_skip_next_step(self, pop_next: bool = True) -> bool:
        """The oldest queued skip signal (popped unless ``pop_next=False``); ``False`` if none."""
        if not self._step_skip_queue:
            return False
        return self._step_skip_queue.pop(0) if pop_next else self._step_skip_queue[0]

    def attach_step_hook(self, fn: Callable[[DPOptimizer], None]) -> None:
        """Call ``fn(self)`` after every noise-adding step (replaces any previous hook).

        Fires once per logical step, after noise and scaling and before the
        parameter update; most often the privacy accountant's hook.

        Args:
            fn: The hook.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}.")
        self.step_hook = fn

    # ----------------------------------------------------------------- phases

    def _collect_grad_samples(self) -> tuple[list[Optional[torch.Tensor]], int]:
        """Validate and flatten every ``p.grad_sample``; return them and the batch size."""
        params = self.params
        for p in params:
            _check_processed_flag(getattr(p, "grad_sample", None))
            _check_processed_flag(getattr(p, "summed_grad", None))
        flats = [_flat_grad_sample(p) for p in params]
        if all(g is None for g in flats) and any(_has_nonzero_grad(p) for p in params):
            raise ValueError(
                "Per sample gradient not found. Are you using GradSampleModule? The parameters "
                "have a non-zero .grad but no .grad_sample; wrap the model in "
                "dp_torch.GradSampleModule."
            )
        rows = [(getattr(p, "_dp_torch_name", f"params[{i}]"), g.shape[0])
                for i, (p, g) in enumerate(zip(params, flats)) if g is not None]
        check_rows(rows, None, "per-sample gradient (all backward passes since zero_grad)")
        return flats, (rows[0][1] if rows else 0)

    def _per_example_norms(
        self, flats: Sequence[Optional[torch.Tensor]], batch: int
    ) -> Optional[torch.Tensor]:
        """L2 norm of each example's gradient over all parameters (``None`` if none has one)."""
        present = [g for g in flats if g is not None]
        if not present:
            return None
        device = present[0].device
        per_param = torch.stack([self._example_norms(g, batch).to(device) for g in present], dim=1)
        return torch.linalg.vector_norm(per_param, ord=2, dim=1)

    def _example_norms(self, g: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-example norms of one parameter's per-sample gradients, float32 or wider, with a
        ``GradScaler``'s loss scale divided out."""
        norms = _row_norms(g, batch)
        return norms if self._loss_scale is None else norms * self._loss_scale.inverse

    def _check_loss_scale(self, keep: torch.Tensor) -> None:
        """Under a ``GradScaler``, refuse a step whose scaled gradients overflowed anywhere.

        Raises:
            LossScaleError: If the scaler found inf/NaN in ``p.grad`` or a per-example
                gradient is not finite (nothing has been changed).
        """
        scale = self._loss_scale
        if scale is None:
            return
        overflow = scale.found_inf or (keep.numel() > 0 and not bool(keep.all()))
        if self._overflow_on_any_rank(overflow):
            raise LossScaleError(mp.overflow_message(scale))

    def _overflow_on_any_rank(self, overflow: bool) -> bool:
        """Whether any process of the step saw an overflow (one process here: its own flag)."""
        return overflow

    def _clip_factors(self, flats: Sequence[Optional[torch.Tensor]], batch: int) -> ClipFactors:
        """Per-parameter clip factors (``[B]`` each, ``None`` where there is no
        per-sample gradient) and the mask of kept (finite-norm) examples.

        Flat clipping: one factor per example, from its norm over all parameters.
        """
        norms = self._per_example_norms(flats, batch)
        if norms is None:
            return [None] * len(flats), torch.ones(0, dtype=torch.bool)
        factor = _clip_factor(norms, self.max_grad_norm)
        return [factor if g is not None else None for g in flats], torch.isfinite(norms)

    def clip_and_accumulate(self) -> None:
        """Clip each example's gradient and add the clipped sum to ``p.summed_grad``.

        Per-example norm over all parameters, factor ``min(1, C / (norm + 1e-6))``,
        non-finite norm: factor 0 and the example's rows zeroed (counted in
        :attr:`num_nonfinite_grad_samples`). A parameter without per-sample
        gradient adds zeros. Norms, factors and ``p.summed_grad`` are float32 or
        wider; in a ``GradScaler`` step the loss scale is divided out of the norms
        and the sum. Marks ``p.grad_sample`` as processed.

        Raises:
            ValueError: If gradients were not cleared since the last step, or the
                per-sample gradients are inconsistent. Nothing is changed then.
            LossScaleError: In a ``GradScaler`` step whose scaled gradients
                overflowed. Nothing is changed then.
        """
        flats, batch = self._collect_grad_samples()
        factors, keep = self._clip_factors(flats, batch)
        self._check_loss_scale(keep)
        dropped = int((~keep).sum()) if keep.numel() else 0
        self.num_nonfinite_grad_samples += dropped
        inverse = 1.0 if self._loss_scale is None else self._loss_scale.inverse
        for p, g, factor in zip(self.params, flats, factors):
            dtype = mp.accumulation_dtype(p)
            if g is None:
                contribution = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            else:
                g = g.to(dtype)
                if dropped:
                    g = g.masked_fill(~_rows_mask(keep, g), 0.0)
                scale = (factor * inverse).to(device=g.device, dtype=dtype)
                contribution = torch.einsum("i,i...", scale, g).to(p.device)
            summed = getattr(p, "summed_grad", None)
            p.summed_grad = contribution if summed is None else summed + contribution
            _mark_as_processed(getattr(p, "grad_sample", None))

    def add_noise(self) -> None:
        """Add ``N(0, (noise_multiplier * max_grad_norm)**2)`` to ``p.summed_grad`` into ``p.grad``.

        Noise is drawn parameter by parameter in :attr:`params` order, in the dtype
        of ``p.summed_grad`` (float32 or wider), and added there; a narrower
        parameter's ``p.grad`` is the rounding of that sum. With a
        :class:`dpcore.noise.NoiseSource` it is the source's float64 draw cast to
        that dtype (bit-identical to the JAX backend's).

        Secure mode, and how it differs from Opacus: Opacus sums four float32
        ``torch.normal`` draws from a CSPRNG generator and adds the result to the
        float32 gradient, so two roundings of different scales remain between the
        real-valued mechanism and the released value. Here the noise is dpcore's
        OS-entropy sampler (sum of four inverse-CDF normals, each from 64 bits of
        ``os.urandom``, see :class:`dpcore.noise.NoiseSource`), kept in float64,
        and the clipped sum (exact in float64) and the noise are added in float64;
        the result is rounded to the parameter dtype **once**. To float64 accuracy
        the released gradient is therefore the rounding of the exact Gaussian
        mechanism's output, i.e. a post-processing of it, rather than a function of
        the sparse set of float32 normal samples that floating-point attacks
        exploit. Limits: the float64 sampler is itself discrete (see dpcore), and
        drawing on the CPU costs time proportional to the model size.

        Raises:
            ValueError: If ``p.summed_grad`` was already used by a step (missing
                ``zero_grad()``) or was never computed.
        """
        params = self.params
        for p in params:
            summed = getattr(p, "summed_grad", None)
            if summed is None:
                raise ValueError(
                    "p.summed_grad is not set; call clip_and_accumulate() before add_noise()."
                )
            _check_processed_flag(summed)
        std = self._noise_std()
        for p in params:
            mp.set_grad(p, _noised(p.summed_grad, self._noise_like(p.summed_grad, std), into_noise=True))
            _mark_as_processed(p.summed_grad)

    def _noise_like(self, summed: torch.Tensor, std: float) -> torch.Tensor:
        """A fresh noise tensor for ``summed`` (see :func:`_generate_noise`); FSDP draws a shard."""
        return _generate_noise(std, summed, self.generator, self.secure_mode)

    def _noise_std(self) -> float:
        """Standard deviation of the gradient noise: ``noise_multiplier * max_grad_norm``."""
        return core_noise.noise_std(self.noise_multiplier, self.max_grad_norm)

    def _averaging_denominator(self) -> int:
        return core_clipping.averaging_denominator("mean", self.expected_batch_size)

    def scale_grad(self) -> None:
        """Apply ``loss_reduction`` to ``p.grad``.

        ``"mean"``: divide by ``expected_batch_size * accumulated_iterations`` (never
        by the realised batch size, which would leak it). ``"sum"``: nothing. A
        narrower parameter's gradient is divided in float32 and rounded once.
        """
        if self.loss_reduction != "mean":
            for p in self.params:
                mp.drop_wide_grad(p)
            return
        denominator = self._averaging_denominator() * self.accumulated_iterations
        for p in self.params:
            mp.divide_grad(p, denominator)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Clear ``p.grad``, ``p.grad_sample`` and, unless the step was skipped, ``p.summed_grad``.

        ``p.grad_sample`` and ``p.summed_grad`` are always set to ``None``;
        ``set_to_none`` only affects ``p.grad`` (passed to the wrapped optimizer).

        Args:
            set_to_none: Set ``p.grad`` to ``None`` instead of zeroing it.
        """
        for p in self.params:
            p.grad_sample = None
            mp.drop_wide_grad(p)
            if not self._is_last_step_skipped:
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> bool:
        """Everything a DP step does before the wrapped optimizer's ``step``.

        Clip and accumulate; if the step is signalled as skipped, stop there
        (returns ``False``). Otherwise add noise, scale, call the step hook
        (returns ``True``). An optimizer without trainable parameters returns
        ``True`` at once.

        Args:
            closure: Unused (kept for Opacus compatibility).

        Returns:
            Whether the wrapped optimizer should step.
        """
        if not self.params:
            return True
        self._accumulate_batch()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook is not None:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def _accumulate_batch(self) -> None:
        """The first phase of :meth:`pre_step`: fold this batch into ``summed_grad``."""
        self.clip_and_accumulate()

    @contextlib.contextmanager
    def _step_context(self) -> Any:
        """The context of one step's phases: autocast off (the DP arithmetic is float32 even
        when ``step()`` is called inside ``torch.autocast``) and the loss scale a
        ``GradScaler`` handed over, if any."""
        with contextlib.ExitStack() as stack:
            for device_type in sorted({p.device.type for p in self.params}):
                if torch.amp.is_autocast_available(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            try:
                self._loss_scale = mp.read_loss_scale(self)
                yield
            except BaseException:
                mp.forget_loss_scale(self)  # the scaler removes them only after a step that returned
                raise
            finally:
                self._loss_scale = None

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Run ``closure`` (if given, with grad enabled), the DP phases, then the wrapped step.

        Called by ``GradScaler.step``, the loss scale it hands over is divided out of
        the per-example gradients (see the class docstring).

        Args:
            closure: Re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss if a closure was given, else the wrapped optimizer's
            return value (``None`` when the step was skipped).

        Raises:
            LossScaleError: In a ``GradScaler`` step whose scaled gradients overflowed,
                or after ``scaler.unscale_(optimizer)``; nothing is updated or accounted.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._step_context():
            full = self.pre_step()
        if not full:
            return loss
        result = self.original_optimizer.step()
        return loss if closure is not None else result


def _check_reduction(loss_reduction: Any, expected_batch_size: Any) -> None:
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(
            f'loss_reduction must be "mean" or "sum", got {loss_reduction!r}; use the '
            "reduction of your loss function."
        )
    if loss_reduction == "mean":
        if expected_batch_size is None:
            raise ValueError(
                'expected_batch_size is required with loss_reduction="mean" (it is the '
                "averaging denominator); pass int(len(dataset) * sample_rate)."
            )
        core_clipping.averaging_denominator("mean", expected_batch_size)
