"""Mixed precision: bfloat16 autocast, bfloat16 parameters, float16 with ``GradScaler``.

Oracles: a loop of float32 single-example backward passes (the clipped sum by its
definition), and the Gaussian distribution for the noise (KS tests that also reject 0.9x
and 1.1x the scale).

Tolerance of a bfloat16 step, ``BF16_RTOL = 2e-2`` of the update's norm: the plain
(non-DP) bfloat16-autocast gradient of these models differs from the float32 one by
0.3-0.9%, and a clip factor ``min(1, C / norm)`` moves by at most the norm's relative
error, so the clipped sum carries the same error; 2e-2 leaves twice the worst of that.
The bound clips most examples, by different factors, and every case asserts that clip
factors off by 10% either way (norms rounded or scaled wrongly) and a missing clipping
land further than ``BF16_RTOL`` from the step, so the check would catch them.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from typing import Any, Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from dp_torch import GradSampleModule, PrivacyEngine
from dp_torch.grad_sample.functorch import AutocastState, ft_compute_per_sample_gradient
from dp_torch.optimizers import DistributedDPOptimizer, LossScaleError
from tests.dp_torch.test_distributed import single_group  # noqa: F401  (a fixture)
from tests.tolerance import assert_close
from tests.zoo.test_torch_zoo import relative_error
from tests.zoo.torch_models import ZooCase, build

pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

BF16_RTOL = 2e-2
FP16_RTOL = 1e-2  # float16 has 3 more mantissa bits than bfloat16
MODES = ("hooks", "functorch", "ghost")
ADAPTIVE = dict(target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=10.0,
                min_clipbound=0.01, unclipped_num_std=2.0)
KS_ACCEPT, KS_REJECT = 1e-3, 1e-6


# --------------------------------------------------------------------------- float32 oracle


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _per_example_grads(case: ZooCase) -> list[list[torch.Tensor]]:
    model = copy.deepcopy(case.model).float()
    grads = []
    for i in range(case.batch_size):
        inputs, target = case.example(i)
        inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
        loss = case.per_example_loss(model, inputs, target).sum()
        found = torch.autograd.grad(loss, _trainable(model), allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(found, _trainable(model))])
    return grads


def _bound(values: Iterable[float], fraction: float = 0.6) -> float:
    """``fraction`` of the geometric mean of the two middle values. With 0.6 most examples
    are clipped, by different factors (so a wrong factor shows); with 1, half are (so
    clipping at scaled norms, which clips all, shows). None sits on the bound."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return fraction * float(np.sqrt(ordered[mid - 1] * ordered[mid]))


@functools.lru_cache(maxsize=None)
def oracle(name: str) -> dict[str, Any]:
    """Float32 per-example gradients of zoo model ``name``, their norms and the bounds
    (flat, and per parameter; see :func:`_bound`)."""
    grads = _per_example_grads(build(name, torch.float32))
    per_param = np.array([[float(g.double().norm()) for g in row] for row in grads])
    norms = np.sqrt((per_param ** 2).sum(axis=1))
    bounds = [_bound(per_param[:, k]) or 1.0 for k in range(per_param.shape[1])]
    return dict(grads=grads, norms=norms, bound=_bound(norms), per_param=per_param, bounds=bounds)


def clipped_sum(name: str, *, norm_factor: float = 1.0, per_layer: bool = False,
                clip: bool = True) -> list[torch.Tensor]:
    """``sum_i c_i g_i`` from the float32 oracle, with the norms multiplied by ``norm_factor``
    (a wrong implementation's) or no clipping at all."""
    o = oracle(name)
    total = [torch.zeros_like(g, dtype=torch.float64) for g in o["grads"][0]]
    for i, row in enumerate(o["grads"]):
        for k, g in enumerate(row):
            norm, bound = (o["per_param"][i, k], o["bounds"][k]) if per_layer else (o["norms"][i], o["bound"])
            factor = min(1.0, bound / (norm_factor * norm + 1e-6)) if clip else 1.0
            total[k] += factor * g.double()
    return total


def assert_matches_oracle(update: list[torch.Tensor], name: str, rtol: float, per_layer: bool = False) -> None:
    """``update`` is the float32 clipped sum to ``rtol``, and wrong clippings are further off."""
    expected = clipped_sum(name, per_layer=per_layer)
    err = relative_error(update, expected)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol}"
    for wrong in (dict(norm_factor=1.1), dict(norm_factor=1 / 1.1), dict(clip=False)):
        off = relative_error(update, clipped_sum(name, per_layer=per_layer, **wrong))
        assert off > rtol, f"{name}: a clipping with {wrong} would pass too ({off:.3e} <= {rtol})"


# --------------------------------------------------------------------------- one DP step


def _private(model: nn.Module, batch: int, *, mode: str = "hooks", noise: float = 0.0,
             bound: Any = 1.0, clipping: str = "flat", criterion: Optional[nn.Module] = None,
             reduction: str = "sum", seed: Optional[int] = None, **extra: Any) -> tuple:
    """``make_private`` over one batch of ``batch`` examples with SGD (lr 1).

    Returns:
        ``(engine, (model, optimizer, criterion or None))``.
    """
    loader = DataLoader(TensorDataset(torch.arange(batch)), batch_size=batch)
    optimizer = torch.optim.SGD(_trainable(model), lr=1.0)
    engine = PrivacyEngine()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
        max_grad_norm=bound, loss_reduction=reduction, grad_sample_mode=mode, poisson_sampling=False,
        clipping=clipping, criterion=criterion, noise_generator=generator,
        **extra,
    )
    return engine, (out[0], out[1], out[2] if criterion is not None else None)


def zoo_update(name: str, mode: str, *, dtype: torch.dtype = torch.float32,
               autocast: Optional[torch.dtype] = torch.bfloat16, clipping: str = "flat") -> list[torch.Tensor]:
    """Parameters before minus after one noiseless DP step (forward and loss under autocast)."""
    case = build(name, dtype)
    o = oracle(name)
    bound = o["bounds"] if clipping == "per_layer" else o["bound"]
    criterion = copy.deepcopy(case.criterion) if mode == "ghost" else None
    extra = ADAPTIVE if clipping == "adaptive" else {}
    _, (model, optimizer, crit) = _private(case.model, case.batch_size, mode=mode, bound=bound,
                                              clipping=clipping, criterion=criterion, **extra)
    before = [p.detach().clone() for p in _trainable(model)]
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = case.prepare(model(**case.inputs))
        if mode == "ghost":
            loss = crit(out, case.target)
        else:
            loss = case.per_example_loss(model, case.inputs, case.target).sum()
    loss.backward()
    optimizer.step()
    return [b.float() - p.detach().float() for b, p in zip(before, _trainable(model))]


# --------------------------------------------------------------------------- (a) bf16 step == fp32 step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_bf16_autocast_step_equals_fp32_step(name: str, mode: str) -> None:
    """ViT's embeddings (float32 in and out, a bfloat16 convolution inside) make the
    ``torch.func`` re-run find the forward's autocast setting by retrying."""
    assert_matches_oracle(zoo_update(name, mode), name, BF16_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["llama", "roberta", "gpt2_lora"])
def test_bf16_autocast_step_equals_fp32_step_more_models(name: str, mode: str) -> None:
    assert_matches_oracle(zoo_update(name, mode), name, BF16_RTOL)


@pytest.mark.parametrize("clipping", ["per_layer", "adaptive"])
def test_bf16_autocast_per_layer_and_adaptive(clipping: str) -> None:
    update = zoo_update("bert", "hooks", clipping=clipping)
    assert_matches_oracle(update, "bert", BF16_RTOL, per_layer=clipping == "per_layer")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_bf16_parameters_step_equals_fp32_step(mode: str) -> None:
    """``model.to(torch.bfloat16)``: the whole forward is bfloat16, the DP arithmetic float32."""
    update = zoo_update("bert", mode, dtype=torch.bfloat16, autocast=None)
    assert_matches_oracle(update, "bert", BF16_RTOL)


def test_resnet_is_left_out_because_bf16_changes_its_plain_gradient() -> None:
    """Why ResNet is not in the list: bfloat16 moves even its plain gradient far beyond rounding."""
    case = build("resnet", torch.float32)

    def grads(enabled: bool) -> list[torch.Tensor]:
        case.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            case.per_example_loss(case.model, case.inputs, case.target).sum().backward()
        return [p.grad.clone() for p in _trainable(case.model)]

    assert relative_error(grads(True), grads(False)) > BF16_RTOL


# --------------------------------------------------------------------------- toy models: ew, fp16


def _toy(dtype: torch.dtype = torch.float32, width: int = 8) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, 3)).to(dtype)
    gen = torch.Generator().manual_seed(4)
    return model, torch.randn(8, 6, generator=gen).to(dtype), torch.randint(0, 3, (8,), generator=gen)


def _toy_bound(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The bound that clips half of the toy model's float32 per-example norms."""
    model = copy.deepcopy(model).float()
    norms = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1].float()), y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
    return _bound(norms, fraction=1.0)


def toy_update(mode: str, *, autocast: Optional[torch.dtype], scaler: Optional[torch.amp.GradScaler] = None,
               clipping: str = "flat", scale_loss: bool = True) -> tuple[list[torch.Tensor], Any]:
    """One noiseless DP step on the toy model; returns the update and the engine."""
    model, x, y = _toy()
    bound = _toy_bound(model, x, y)
    bound = [bound / 2] * len(list(model.parameters())) if clipping == "per_layer" else bound
    criterion = nn.CrossEntropyLoss(reduction="sum") if mode == "ghost" else None
    extra = ADAPTIVE if clipping == "adaptive" else {}
    engine, (dp_model, optimizer, crit) = _private(model, len(y), mode=mode, bound=bound, clipping=clipping,
                                                      criterion=criterion, **extra)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        out = dp_model(x)
    loss = (crit or nn.CrossEntropyLoss(reduction="sum"))(out.float(), y)
    if mode == "ghost":  # GradScaler.scale takes tensors only: the ghost loss takes the scaler
        loss.backward(scaler=scaler if scale_loss else None)
    else:
        (scaler.scale(loss) if scaler is not None and scale_loss else loss).backward()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return [b - p.detach() for b, p in zip(before, model.parameters())], engine


def test_ew_mode_bf16_autocast_equals_fp32() -> None:
    expected, _ = toy_update("hooks", autocast=None)
    got, _ = toy_update("ew", autocast=torch.bfloat16)
    assert relative_error(got, expected) <= BF16_RTOL


@pytest.mark.parametrize(("mode", "clipping"), [
    ("hooks", "flat"), ("functorch", "flat"), ("ew", "flat"), ("hooks", "per_layer"), ("hooks", "adaptive"),
])
def test_fp16_grad_scaler_clips_unscaled_gradients(mode: str, clipping: str) -> None:
    """A loss scale of 2**10 (which would clip every example if it reached the norms) gives the
    float32 step to float16 rounding, and the accountant records the step."""
    expected, _ = toy_update("hooks", autocast=None, clipping=clipping)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    got, engine = toy_update(mode, autocast=torch.float16, scaler=scaler, clipping=clipping)
    assert relative_error(got, expected) <= FP16_RTOL
    unscaled, _ = toy_update(mode, autocast=torch.float16, clipping=clipping)
    assert relative_error(got, unscaled) <= 1e-3
    assert len(engine.accountant) == 1
    assert scaler.get_scale() == 2.0**10  # no overflow, so no back-off


def test_fp16_grad_scaler_overflow_is_refused_not_skipped() -> None:
    """An overflowing scale raises before anything changes (no update, no accounting); after
    zero_grad and a smaller fixed scale, training goes on and every step taken is accounted."""
    model, x, y = _toy()
    engine, (dp_model, optimizer, _) = _private(model, len(y), bound=1.0, noise=1.0, seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)

    def iteration() -> None:
        with torch.autocast("cpu", dtype=torch.float16):
            out = dp_model(x)
        scaler.scale(nn.functional.cross_entropy(out.float(), y, reduction="sum")).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LossScaleError, match="overflowed"):
        iteration()
    assert_close([p.detach() for p in model.parameters()], before, rtol=0.0)
    assert len(engine.accountant) == 0 and optimizer.num_nonfinite_grad_samples == 0
    assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
    optimizer.zero_grad()
    scaler.update(new_scale=2.0**8)
    iteration()
    iteration()
    assert len(engine.accountant) == 2


@pytest.mark.usefixtures("single_group")
def test_distributed_optimizer_under_grad_scaler() -> None:
    """DDP: the clipped sum of unscaled gradients, and an overflow refused on every rank."""
    expected, _ = toy_update("hooks", autocast=None)
    model, x, y = _toy()
    bound = _toy_bound(model, x, y)
    dp_model = GradSampleModule(model, loss_reduction="sum")
    optimizer = DistributedDPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                       max_grad_norm=bound, expected_batch_size=len(y), loss_reduction="sum")
    before = [p.detach().clone() for p in model.parameters()]
    for scale in (2.0**30, 2.0**10):
        optimizer.zero_grad()
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        with torch.autocast("cpu", dtype=torch.float16):
            out = dp_model(x)
        scaler.scale(nn.functional.cross_entropy(out.float(), y, reduction="sum")).backward()
        if scale > 2.0**20:
            with pytest.raises(LossScaleError):
                scaler.step(optimizer)
        else:
            scaler.step(optimizer)
    update = [b - p.detach() for b, p in zip(before, model.parameters())]
    assert relative_error(update, expected) <= FP16_RTOL


def test_grad_scaler_unscale_before_step_is_refused() -> None:
    model, x, y = _toy()
    engine, (dp_model, optimizer, _) = _private(model, len(y))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with torch.autocast("cpu", dtype=torch.float16):
        out = dp_model(x)
    scaler.scale(nn.functional.cross_entropy(out.float(), y, reduction="sum")).backward()
    scaler.unscale_(optimizer)
    with pytest.raises(LossScaleError, match="unscale_"):
        scaler.step(optimizer)
    assert len(engine.accountant) == 0


def test_ghost_mode_with_a_grad_scaler_clips_unscaled_gradients() -> None:
    """``loss.backward(scaler=scaler)``: a scale of 2**10 (which would clip every example if it
    reached the norms) gives the float32 step to float16 rounding, accounted once."""
    expected, _ = toy_update("hooks", autocast=None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    got, engine = toy_update("ghost", autocast=torch.float16, scaler=scaler)
    assert relative_error(got, expected) <= FP16_RTOL
    unscaled, _ = toy_update("ghost", autocast=torch.float16)
    assert relative_error(got, unscaled) <= 1e-3
    assert len(engine.accountant) == 1 and scaler.get_scale() == 2.0**10


def test_ghost_mode_refuses_a_scale_its_backward_did_not_use() -> None:
    """A scaler step after a backward pass without the scaler (p.grad unscaled) is refused,
    as is a scaler passed to backward but a plain step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(torch.zeros(()))  # the scaler in use (say for another model's loss)
    with pytest.raises(LossScaleError, match="ran with no GradScaler but this step has loss scale 256"):
        toy_update("ghost", autocast=torch.float16, scaler=scaler, scale_loss=False)
    model, x, y = _toy()
    engine, (dp_model, optimizer, crit) = _private(model, len(y), mode="ghost",
                                                      criterion=nn.CrossEntropyLoss(reduction="sum"))
    crit(dp_model(x), y).backward(scaler=scaler)
    with pytest.raises(LossScaleError, match="ran with loss scale 256 but this step has no GradScaler"):
        optimizer.step()
    assert len(engine.accountant) == 0


def test_ghost_mode_overflow_is_refused_in_backward() -> None:
    """An overflowing scale raises in the backward pass: nothing reaches p.grad or the accountant."""
    model, x, y = _toy()
    engine, (dp_model, optimizer, crit) = _private(model, len(y), mode="ghost",
                                                      criterion=nn.CrossEntropyLoss(reduction="sum"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    with torch.autocast("cpu", dtype=torch.float16):
        out = dp_model(x)
    with pytest.raises(LossScaleError, match="overflowed"):
        crit(out.float(), y).backward(scaler=scaler)
    assert all(p.grad is None for p in model.parameters())
    assert len(engine.accountant) == 0


def test_ghost_mode_fp16_without_scaler_equals_fp32() -> None:
    expected, _ = toy_update("hooks", autocast=None)
    got, engine = toy_update("ghost", autocast=torch.float16)
    assert relative_error(got, expected) <= FP16_RTOL
    assert len(engine.accountant) == 1


# --------------------------------------------------------------------------- (b) noise std is exact


def _noise_grads(noise: float, *, dtype: torch.dtype, autocast: bool) -> list[torch.Tensor]:
    """``p.grad`` after one DP step ("mean" over 8 examples) on a 20k-parameter linear model."""
    torch.manual_seed(5)
    model = nn.Linear(128, 160).to(dtype)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(8, 128, generator=gen).to(dtype), torch.randn(8, 160, generator=gen)
    _, (dp_model, optimizer, _) = _private(model, 8, noise=noise, bound=1.0, reduction="mean", seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = dp_model(x)
    nn.functional.mse_loss(out.float(), y).backward()
    optimizer.step()
    for p in model.parameters():
        assert p.summed_grad.dtype == torch.float32 and p.grad.dtype == dtype
    return [p.grad.detach().double().reshape(-1) for p in model.parameters()]


@pytest.mark.parametrize(("dtype", "autocast"), [(torch.float32, True), (torch.bfloat16, False)],
                         ids=["bf16_autocast", "bf16_parameters"])
def test_noise_std_is_exact_in_bf16(dtype: torch.dtype, autocast: bool) -> None:
    """KS test of (update - clipped mean) / (sigma * C / B) against N(0, 1); it rejects 0.9x and 1.1x."""
    sigma, batch = 1.0, 8
    clean = torch.cat(_noise_grads(0.0, dtype=dtype, autocast=autocast))
    noisy = torch.cat(_noise_grads(sigma, dtype=dtype, autocast=autocast))
    z = ((noisy - clean) / (sigma * 1.0 / batch)).numpy()
    assert stats.kstest(z, "norm").pvalue > KS_ACCEPT
    for wrong in (0.9, 1.1):
        assert stats.kstest(wrong * z, "norm").pvalue < KS_REJECT


# --------------------------------------------------------------------------- pieces


def test_optimizer_arithmetic_stays_float32_inside_autocast() -> None:
    """``step()`` called inside ``torch.autocast`` still clips and sums in float32."""
    model, x, y = _toy(torch.bfloat16)
    _, (dp_model, optimizer, _) = _private(model, len(y), bound=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(dp_model(x).float(), y, reduction="sum").backward()
        flats = [p.grad_sample.float() for p in model.parameters()]
        optimizer.step()
    norms = torch.sqrt(sum((g.double().reshape(len(y), -1) ** 2).sum(dim=1) for g in flats))
    factors = torch.clamp(0.05 / (norms + 1e-6), max=1.0)
    expected = [torch.einsum("i,i...", factors, g.double()) for g in flats]
    assert_close([p.summed_grad for p in model.parameters()], expected, rtol=1e-5, atol=1e-9)
    assert all(p.summed_grad.dtype == torch.float32 for p in model.parameters())


def test_functorch_rerun_under_an_explicit_autocast_state() -> None:
    """Given the forward's autocast setting, the re-run uses it (bf16 products, float32 weights)."""
    layer = nn.Linear(5, 4)
    x = torch.randn(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    backprops = torch.randn(3, 4).to(torch.bfloat16)
    grads = ft_compute_per_sample_gradient(layer, [x], backprops, expected_output=out.detach(),
                                           autocast=AutocastState("cpu", torch.bfloat16))
    expected = torch.einsum("bo,bi->boi", backprops.float(), x.to(torch.bfloat16).float())
    assert grads[layer.weight].dtype == torch.bfloat16
    assert_close(grads[layer.weight].float(), expected, rtol=1e-2, atol=1e-2)
    assert AutocastState.current("cpu") == AutocastState("cpu")
