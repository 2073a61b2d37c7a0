"""Real models from ``transformers`` and ``peft``: one DP-SGD step equals the definition.

For each model, mode and dtype: one step of ``PrivacyEngine.make_private`` (noise 0,
``loss_reduction="sum"``, SGD with learning rate 1, a bound at the median per-example norm
so that about half of the examples are clipped) moves the parameters by exactly
``sum_i min(1, C / (norm_i + 1e-6)) * grad_i``, where ``grad_i`` comes from a loop of
single-example backward passes (:func:`definition`). Also with ``BatchMemoryManager``
splitting the batch into physical batches, and with ``wrap_model=False``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

from dp_torch import PrivacyEngine
from dp_torch.utils.batch_memory_manager import BatchMemoryManager
from tests.zoo.torch_models import BUILDERS, ZooCase, build

pytest.importorskip("transformers")

pytestmark = [
    # peft reads an attribute that transformers deprecates; not ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # torch's vmap has no batching rule for EmbeddingBag (mode "functorch"): slow, not wrong.
    pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented"),
]

MODES = ("hooks", "ghost", "functorch")
DTYPES = (torch.float64, torch.float32)
#: Relative error allowed between the DP step and the definition, per dtype.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}
PHYSICAL = 4  # BatchMemoryManager's physical batch size (the logical batch has 6 examples)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _example_grads(case: ZooCase, model: nn.Module, i: int) -> list[torch.Tensor]:
    params = _trainable(model)
    inputs, target = case.example(i)
    loss = case.per_example_loss(model, inputs, target).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


@functools.lru_cache(maxsize=None)
def definition(name: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], float]:
    """The clipped sum from a loop of single-example backward passes, and the bound used.

    The bound is the median per-example norm, so about half of the examples are clipped.
    """
    case = build(name, dtype)
    model = copy.deepcopy(case.model)
    per_example = [_example_grads(case, model, i) for i in range(case.batch_size)]
    norms = [float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) for grads in per_example]
    bound = float(torch.tensor(norms).median())
    factors = [min(1.0, bound / (n + 1e-6)) for n in norms]
    assert 0 < sum(f < 1.0 for f in factors) < len(factors)
    clipped = [sum(f * grads[k] for f, grads in zip(factors, per_example)) for k in range(len(per_example[0]))]
    return clipped, bound


def _make_private(case: ZooCase, mode: str, bound: float, wrap_model: bool) -> tuple:
    model = copy.deepcopy(case.model)
    indices = torch.utils.data.TensorDataset(torch.arange(case.batch_size))
    loader = torch.utils.data.DataLoader(indices, batch_size=case.batch_size)
    optimizer = torch.optim.SGD(_trainable(model), lr=1.0)
    out = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=bound, loss_reduction="sum", grad_sample_mode=mode, poisson_sampling=False,
        wrap_model=wrap_model, criterion=copy.deepcopy(case.criterion) if mode == "ghost" else None,
    )
    forward = out[0] if wrap_model else model
    criterion = out[2] if mode == "ghost" else None
    return model, forward, out[1], criterion, out[-1]


def _backward(case: ZooCase, forward: nn.Module, criterion: object, idx: torch.Tensor) -> None:
    inputs = {k: v[idx] for k, v in case.inputs.items()}
    if criterion is None:
        case.per_example_loss(forward, inputs, case.target[idx]).sum().backward()
    else:
        criterion(case.prepare(forward(**inputs)), case.target[idx]).backward()


def dp_update(case: ZooCase, mode: str, bound: float, *, wrap_model: bool = True,
              physical: int | None = None) -> list[torch.Tensor]:
    """Parameters before minus after one DP-SGD step (lr 1, noise 0) on the whole batch."""
    model, forward, optimizer, criterion, loader = _make_private(case, mode, bound, wrap_model)
    before = [p.detach().clone() for p in _trainable(model)]
    if physical is None:
        _backward(case, forward, criterion, torch.arange(case.batch_size))
        optimizer.step()
    else:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                                optimizer=optimizer) as batches:
            for (idx,) in batches:
                _backward(case, forward, criterion, idx)
                optimizer.step()
                optimizer.zero_grad()
    return [b - p.detach() for b, p in zip(before, _trainable(model))]


def relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """``||actual - expected|| / ||expected||`` over all parameters, in float64."""
    num = sum(((a.double() - e.double()) ** 2).sum() for a, e in zip(actual, expected))
    den = sum((e.double() ** 2).sum() for e in expected)
    return float(torch.sqrt(num / den))


def _check(name: str, mode: str, dtype: torch.dtype, **kwargs: object) -> None:
    expected, bound = definition(name, dtype)
    err = relative_error(dp_update(build(name, dtype), mode, bound, **kwargs), expected)
    assert err <= RTOL[dtype], f"{name} {mode} {dtype}: relative error {err:.3e} > {RTOL[dtype]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_step_equals_definition(name: str, mode: str, dtype: torch.dtype) -> None:
    _check(name, mode, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_batch_memory_manager_equals_definition(name: str, mode: str) -> None:
    _check(name, mode, torch.float64, physical=PHYSICAL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_unwrapped_model_equals_definition(name: str, mode: str) -> None:
    _check(name, mode, torch.float64, wrap_model=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_float32_variants_equal_definition(name: str, mode: str) -> None:
    _check(name, mode, torch.float32, physical=PHYSICAL)
    _check(name, mode, torch.float32, wrap_model=False)


def test_definition_is_the_batch_gradient_without_clipping() -> None:
    """The oracle itself: unclipped, the per-example gradients sum to the batch gradient."""
    case = build("gpt2", torch.float64)
    model = copy.deepcopy(case.model)
    per_example = [_example_grads(case, model, i) for i in range(case.batch_size)]
    loss = case.per_example_loss(model, case.inputs, case.target).sum()
    batch = torch.autograd.grad(loss, _trainable(model))
    summed = [sum(g[k] for g in per_example) for k in range(len(batch))]
    assert relative_error(summed, list(batch)) < 1e-12

