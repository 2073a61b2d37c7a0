"""``torch.func`` fallback for layers without a registered grad sampler.

The layer's forward is re-run, one example at a time under ``vmap``, as a function of its
trainable parameters; ``grad`` of ``<output, backprops>`` is that example's gradient. The
fallback therefore needs a deterministic forward (no dropout inside the layer) and a
single tensor output. The re-run runs under the autocast setting of the forward (see
:class:`AutocastState`), so a layer of float32 parameters called under ``torch.autocast``
is re-run in the same low-precision dtype and its per-example gradients come back in the
parameters' dtype. Positional and keyword tensor inputs whose batch dimension has the
batch size are split per example; other inputs are passed whole to every example (so an
unbatched tensor whose leading size happens to equal the batch size would be split: pass
such constants as module attributes instead). When ``vmap`` cannot trace a layer
(data-dependent control flow, unsupported operators), a plain loop of per-example
``autograd.grad`` calls is used instead, so the result is the same, only slower.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "AutocastState",
    "GradSampleRerunError",
    "capture_suspended",
    "check_rerun",
    "ft_compute_per_sample_gradient",
    "is_capture_suspended",
    "make_functional",
    "prepare_layer",
]

_STATE = threading.local()

#: Largest re-run difference put down to rounding, relative to the output's magnitude.
_RERUN_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}


class GradSampleRerunError(ValueError):
    """A layer's per-example re-run does not reproduce its forward output."""


@dataclasses.dataclass(frozen=True)
class AutocastState:
    """The ``torch.autocast`` setting a layer's forward ran under.

    Attributes:
        device_type: The device type autocast applies to (``"cuda"``, ``"cpu"``, ...).
        dtype: The autocast dtype, or ``None`` when autocast was off.
    """

    device_type: str
    dtype: Optional[torch.dtype] = None

    @classmethod
    def current(cls, device_type: str) -> "AutocastState":
        """The setting in force now for ``device_type`` (call it in the forward pass)."""
        on = torch.is_autocast_enabled(device_type)
        return cls(device_type, torch.get_autocast_dtype(device_type) if on else None)

    def context(self) -> contextlib.AbstractContextManager:
        """A context that puts this setting in force (autocast explicitly off when ``dtype`` is ``None``)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)


def _float_dtypes(tensors: Iterable[Any]) -> set:
    return {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}


def _inferred_autocast(device_type: str, params: Sequence[torch.Tensor], inputs: Sequence[Any],
                       output_dtype: torch.dtype) -> AutocastState:
    """The autocast setting a forward must have had, judged from the dtypes it left.

    Without autocast a layer sees one floating dtype; parameters, inputs and output of
    different floating dtypes (float32 weights, bfloat16 output) are autocast's mark, and
    its dtype is the narrowest of them.
    """
    seen = _float_dtypes([*params, *inputs]) | ({output_dtype} if output_dtype.is_floating_point else set())
    if len(seen) < 2:
        return AutocastState(device_type)
    return AutocastState(device_type, min(seen, key=lambda d: torch.finfo(d).bits))


def _autocast_candidates(device_type: str, first: AutocastState) -> list[AutocastState]:
    """``first``, then (for a forward whose dtypes did not show autocast) the low-precision settings."""
    if first.dtype is not None:
        return [first]
    return [first] + [AutocastState(device_type, d) for d in (torch.bfloat16, torch.float16)]


@contextlib.contextmanager
def capture_suspended() -> Iterator[None]:
    """Context in which the forward hooks of this package capture nothing.

    Used while the fallback re-runs a layer's forward, so that the re-run is not mistaken
    for a new call of the layer.
    """
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


def is_capture_suspended() -> bool:
    """Whether :func:`capture_suspended` is active in this thread."""
    return getattr(_STATE, "depth", 0) > 0


def make_functional(mod: nn.Module, disable_autograd_tracking: bool = False) -> tuple[Any, tuple]:
    """Split a module into a function of its parameters and the parameters themselves.

    The replacement of the retired ``functorch.make_functional``: ``fmodel(params, *args,
    **kwargs)`` runs a copy of ``mod`` (buffers included) with ``params`` in place of its
    parameters, in ``mod.named_parameters()`` order.

    Args:
        mod: The module.
        disable_autograd_tracking: Return detached parameters.

    Returns:
        ``(fmodel, params)``.
    """
    named = dict(mod.named_parameters())
    names = list(named)
    stateless = copy.deepcopy(mod)
    if hasattr(stateless, "allow_grad_accumulation"):
        stateless.allow_grad_accumulation()

    def fmodel(new_params: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        return functional_call(stateless, dict(zip(names, new_params)), args, kwargs)

    params = tuple(named.values())
    if disable_autograd_tracking:
        params = tuple(p.detach() for p in params)
    return fmodel, params


def prepare_layer(layer: nn.Module, batch_first: bool = True) -> None:
    """Check that ``layer`` can use the ``torch.func`` fallback (Opacus-compatible name).

    Nothing needs preparing ahead of time here; the check is the useful part.

    Args:
        layer: The layer.
        batch_first: Unused; kept for Opacus compatibility.

    Raises:
        NotImplementedError: If the layer has buffers (their statistics mix examples, as
            in BatchNorm) or is an ``nn.EmbeddingBag`` (which has its own sampler).
    """
    del batch_first
    if any(True for _ in layer.buffers()):
        raise NotImplementedError(
            f"{type(layer).__name__} has buffers, so its per-sample gradients are not defined "
            "(e.g. BatchNorm mixes examples); replace it (ModuleValidator.fix) or freeze it."
        )
    if isinstance(layer, nn.EmbeddingBag):
        raise NotImplementedError("nn.EmbeddingBag has a registered grad sampler; do not force torch.func on it.")


def _split_params(layer: nn.Module, params: Sequence[torch.Tensor]) -> tuple[list[str], dict, list]:
    wanted = {id(p) for p in params}
    names: list[str] = []
    values: list[torch.Tensor] = []
    frozen: dict[str, torch.Tensor] = {}
    for name, p in layer.named_parameters():
        if id(p) in wanted:
            names.append(name)
            values.append(p.detach())
        else:
            frozen[name] = p.detach()
    for name, b in layer.named_buffers():
        frozen[name] = b
    return names, frozen, values


def _batched(value: Any, batch: int) -> Optional[int]:
    return 0 if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch else None


def ft_compute_per_sample_gradient(
    layer: nn.Module,
    activations: Sequence[Any],
    backprops: torch.Tensor,
    *,
    params: Optional[Sequence[torch.Tensor]] = None,
    batch_dim: int = 0,
    expected_output: Optional[torch.Tensor] = None,
    autocast: Optional[AutocastState] = None,
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-example gradients of ``layer``'s parameters by re-running it under ``torch.func``.

    Args:
        layer: The layer.
        activations: Its positional inputs, batch first, as the forward received them.
            Optional attributes: ``kwargs`` (keyword inputs), ``in_dims`` and
            ``kwarg_in_dims`` (``0`` for the inputs that carry the batch, ``None`` for the
            others). By default an input carries the batch when it is a tensor whose first
            dimension has the batch size.
        backprops: Gradient of the loss with respect to the layer output, batch first (in
            the output's dtype: bfloat16 or float16 under autocast).
        params: The parameters to differentiate (default: the layer's trainable ones).
        batch_dim: Where the layer itself expects the batch dimension (``1`` for
            ``batch_first=False``); each example is re-inserted there with size 1.
        expected_output: The layer's output in the forward pass, batch first. When given,
            the per-example re-runs must reproduce it (see :func:`check_rerun`).
        autocast: The autocast setting of the forward (:meth:`AutocastState.current`
            taken in the forward pass). When ``None`` it is inferred: mixed floating dtypes
            among parameters, inputs and output mean autocast in the narrowest of them;
            otherwise the layer is re-run without autocast and, if that does not reproduce
            ``expected_output``, under bfloat16 and then float16 autocast.

    Returns:
        ``{param: grad_sample}`` with shapes ``[batch, *param.shape]``, in the parameters'
        dtype, or in the autocast dtype when the re-run ran under autocast (as the grad
        samplers give them; the optimizer takes norms and sums in float32).

    Raises:
        GradSampleRerunError: If the re-runs do not reproduce ``expected_output``.
    """
    if params is None:
        params = [p for p in layer.parameters() if p.requires_grad]
    names, frozen, values = _split_params(layer, params)
    if not names:
        return {}
    call = _ExampleCall.of(layer, names, frozen, activations, backprops.shape[0], batch_dim)
    grads, state = _reproducing_rerun(call, values, backprops, expected_output, autocast)
    by_id = {id(p): p for p in params}
    named = dict(layer.named_parameters())
    return {by_id[id(named[n])]: _in_compute_dtype(g, state) for n, g in zip(names, grads)}


def _in_compute_dtype(grad_sample: torch.Tensor, state: AutocastState) -> torch.Tensor:
    """A gradient of a re-run under autocast in the autocast dtype, as a grad sampler gives it.

    Autocast's casts make the gradient of a float32 parameter a float32 copy of a
    low-precision one, so the conversion keeps its value; the dtype tells the checks of the
    pass (and the reader) the precision the gradient was computed in.
    """
    narrow = state.dtype
    if narrow is None or not grad_sample.is_floating_point():
        return grad_sample
    return grad_sample.to(narrow) if torch.finfo(grad_sample.dtype).bits > torch.finfo(narrow).bits else grad_sample


def _reproducing_rerun(call: "_ExampleCall", values: list, backprops: torch.Tensor,
                       expected: Optional[torch.Tensor], given: Optional[AutocastState]) -> tuple[list, AutocastState]:
    """The re-run under the first autocast setting that reproduces ``expected`` (the first setting without it).

    Raises:
        GradSampleRerunError: The first setting's, if no setting reproduces ``expected``.
    """
    first_error = None
    for state in _settings_to_try(given, values, call, backprops, expected):
        grads, outs = call.per_sample_grads(values, backprops, state)
        if expected is None:
            return grads, state
        try:
            check_rerun(type(call.layer).__name__, outs, expected, compute_dtype=state.dtype)
            return grads, state
        except GradSampleRerunError as err:
            first_error = first_error or err
    raise first_error


def _settings_to_try(given: Optional[AutocastState], values: Sequence[torch.Tensor], call: "_ExampleCall",
                     backprops: torch.Tensor, expected: Optional[torch.Tensor]) -> list[AutocastState]:
    """The autocast settings to re-run under, most likely first (only one without ``expected``)."""
    if given is not None:
        return [given]
    device_type = backprops.device.type
    output_dtype = expected.dtype if expected is not None else backprops.dtype
    inferred = _inferred_autocast(device_type, values, [*call.args, *call.kwargs.values()], output_dtype)
    candidates = _autocast_candidates(device_type, inferred)
    return candidates if expected is not None else candidates[:1]


@dataclasses.dataclass
class _ExampleCall:
    """One layer call split into what each example re-run gets (see :meth:`of`)."""

    layer: nn.Module
    names: list
    frozen: dict
    args: tuple
    in_dims: tuple
    kwargs: dict
    batched_kwargs: dict
    fixed_kwargs: dict
    batch_dim: int

    @classmethod
    def of(cls, layer: nn.Module, names: list, frozen: dict, activations: Sequence[Any], batch: int,
           batch_dim: int) -> "_ExampleCall":
        kwargs = dict(getattr(activations, "kwargs", {}) or {})
        in_dims = tuple(getattr(activations, "in_dims", None) or (_batched(a, batch) for a in activations))
        kw_dims = dict(getattr(activations, "kwarg_in_dims", None)
                       or {k: _batched(v, batch) for k, v in kwargs.items()})
        batched = {k: v for k, v in kwargs.items() if kw_dims.get(k) is not None}
        fixed = {k: v for k, v in kwargs.items() if kw_dims.get(k) is None}
        return cls(layer, names, frozen, tuple(activations), in_dims, kwargs, batched, fixed, batch_dim)

    def example_loss(self, state: AutocastState) -> Any:
        """``(values, args, kwargs, backprops) -> (<output, backprops>, output)`` of one example."""
        layer, bd = self.layer, self.batch_dim

        def loss(vals: tuple, example_args: tuple, example_kwargs: dict,
                 example_backprops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            full = tuple(a.unsqueeze(bd) if d is not None else a for a, d in zip(example_args, self.in_dims))
            full_kwargs = {**self.fixed_kwargs, **{k: v.unsqueeze(bd) for k, v in example_kwargs.items()}}
            with capture_suspended(), state.context():
                out = functional_call(layer, {**self.frozen, **dict(zip(self.names, vals))}, full, full_kwargs)
            if not isinstance(out, torch.Tensor):
                raise NotImplementedError(
                    f"{type(layer).__name__} returns {type(out).__name__}; the torch.func fallback "
                    "needs a layer with a single tensor output."
                )
            return (out * example_backprops.unsqueeze(bd)).sum(), out.detach().movedim(bd, 0)[0]

        return loss

    def per_sample_grads(self, values: list, backprops: torch.Tensor,
                         state: AutocastState) -> tuple[list, Optional[torch.Tensor]]:
        """The per-example gradients and outputs under ``state`` (``vmap``, or a loop if it cannot trace)."""
        example_loss = self.example_loss(state)
        try:
            return vmap(grad(example_loss, has_aux=True), in_dims=(None, self.in_dims, 0, 0))(
                tuple(values), self.args, self.batched_kwargs, backprops
            )
        except (RuntimeError, NotImplementedError, ValueError):
            return _loop_per_sample_gradient(example_loss, values, self.args, self.in_dims,
                                             self.batched_kwargs, backprops)


def _loop_per_sample_gradient(
    example_loss: Any, values: list, args: tuple, in_dims: tuple, batched_kwargs: dict, backprops: torch.Tensor
) -> list[torch.Tensor]:
    """The slow path: one ``autograd.grad`` per example; also returns the examples' outputs."""
    per_param: list[list[torch.Tensor]] = [[] for _ in values]
    outs: list[torch.Tensor] = []
    for i in range(backprops.shape[0]):
        leaves = tuple(v.detach().requires_grad_(True) for v in values)
        example_args = tuple(a[i] if d is not None else a for a, d in zip(args, in_dims))
        example_kwargs = {k: v[i] for k, v in batched_kwargs.items()}
        with torch.enable_grad():
            loss, out = example_loss(leaves, example_args, example_kwargs, backprops[i])
            gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        outs.append(out)
        for slot, g, v in zip(per_param, gs, values):
            slot.append(torch.zeros_like(v) if g is None else g)
    grads = [torch.stack(slot) if slot else v.new_zeros((0, *v.shape)) for slot, v in zip(per_param, values)]
    return grads, (torch.stack(outs) if outs else None)


def check_rerun(name: str, outputs: Optional[torch.Tensor], expected: torch.Tensor,
                compute_dtype: Optional[torch.dtype] = None) -> None:
    """Raise unless the per-example re-runs of a layer reproduce its forward output.

    A layer with randomness (dropout inside it) or whose output depends on other examples
    of the batch gives other outputs when re-run one example at a time, and the per-example
    gradients of the re-runs would not be those of the forward pass.

    Args:
        name: The layer's class name (for the message).
        outputs: The re-runs' outputs, batch first (``None`` for an empty batch).
        expected: The forward pass's output, batch first.
        compute_dtype: The autocast dtype of the forward, if any: the rounding allowed is
            that of the narrower of it and the output's dtype (a float32 output of bfloat16
            products carries bfloat16 rounding, and one example alone may round otherwise
            than the batch).

    Raises:
        GradSampleRerunError: If they differ by more than rounding.
    """
    if outputs is None or expected.numel() == 0:
        return
    wide = torch.promote_types(expected.dtype, torch.float32)
    got, want = outputs.to(wide).reshape(expected.shape), expected.to(wide)
    diff = float((got - want).abs().max())
    scale = float(want.abs().max())
    tolerance = max(_RERUN_TOLERANCE.get(d, 5e-2) for d in (expected.dtype, compute_dtype or expected.dtype))
    if diff > tolerance * scale + torch.finfo(wide).tiny:
        raise GradSampleRerunError(
            f"{name} gives other outputs when re-run one example at a time (largest difference "
            f"{diff:.3e}, output magnitude {scale:.3e}), so per-example gradients computed from the "
            "re-runs would not be those of this forward pass. The layer has randomness (dropout "
            "inside it: move the dropout out of the layer or set its probability to 0) or mixes "
            "the examples of the batch (which per-example privacy does not allow)."
        )
