"""End-to-end behaviour of PrivacyEngine.make_private: what a training loop actually gets.

Oracles: vanilla PyTorch training on the same batches (exact equality where the
arithmetic is exact), batch-size-1 backward passes of a plain copy of the model,
dpcore's numpy clipping reference, the normal distribution (KS) and the binomial
distribution (chi-square).
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_torch import PrivacyEngine
from dp_torch.data_loader import DPDataLoader
from dp_torch.utils.batch_memory_manager import BatchMemoryManager
from dpcore import clipping as core_clipping
from dpcore import sampling as core_sampling
from tests.tolerance import assert_close

HUGE_CLIP = 1e6


# --------------------------------------------------------------------------- builders


def _dyadic(model: nn.Module, seed: int) -> nn.Module:
    """Cast to float64 and set every weight to a multiple of 1/8 in [-1/2, 1/2]."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape, generator=g).double() / 8)
    return model


def dyadic_linear() -> nn.Module:
    return _dyadic(nn.Linear(4, 2), 0)


def dyadic_mlp() -> nn.Module:
    return _dyadic(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), 1)


def dyadic_conv() -> nn.Module:
    return _dyadic(nn.Sequential(
        nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)
    ), 2)


def integer_dataset(n: int) -> TensorDataset:
    """Small integer inputs and targets (stored as float64)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (n, 4), generator=g).double()
    y = torch.randint(-2, 3, (n, 2), generator=g).double()
    return TensorDataset(x, y)


def classification_dataset(n: int, dim: int = 5, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(4)
    return TensorDataset(
        torch.randn(n, dim, generator=g, dtype=torch.float64),
        torch.randint(0, classes, (n,), generator=g),
    )


def mlp64(dim: int = 5, classes: int = 3) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, classes)).double()


def loader(dataset, batch_size, seed=0, **kwargs) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


def sgd(model: nn.Module, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def train_step(model, optimizer, criterion, x, y) -> None:
    criterion(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def batches(dl, steps):
    """The first ``steps`` batches of ``dl`` over as many epochs as needed."""
    while True:
        for batch in dl:
            if steps == 0:
                return
            steps -= 1
            yield batch


# --------------------------------------------------------------------------- equals vanilla

# Exactness needs exact arithmetic: inputs, targets and initial weights are small dyadic
# numbers, every learning rate and denominator a power of two, so each sum is exact in
# float64 whatever its order. The weights gain bits at every step; in the two-layer
# models the products outgrow the 53-bit mantissa after two steps, and from then on the
# per-example sum (einsum, then a sum over examples) and autograd's matmul round
# differently. Those models are therefore compared exactly for two steps, and over
# longer runs to float64 rounding (the "mean"-on-Poisson and ghost tests below).
EXACT_CASES = [(dyadic_linear, 12), (dyadic_mlp, 2), (dyadic_conv, 2)]
EXACT_IDS = ["linear-12-steps", "mlp-2-steps", "conv-2-steps"]


def _zero_noise_twins(make_model, num_examples, lr, batch_size, **options):
    """A vanilla model with its SGD and its private copy made private without noise.

    Returns:
        ``(vanilla, v_opt, private, engine, (model, optimizer, data_loader))``.
    """
    dataset = integer_dataset(num_examples)
    vanilla = make_model()
    private = copy.deepcopy(vanilla)
    engine = PrivacyEngine()
    made = engine.make_private(
        module=private, optimizer=sgd(private, lr), data_loader=loader(dataset, batch_size),
        noise_multiplier=0.0, max_grad_norm=HUGE_CLIP, **options,
    )
    return vanilla, sgd(vanilla, lr), private, engine, made


@pytest.mark.parametrize(("make_model", "steps"), EXACT_CASES, ids=EXACT_IDS)
def test_zero_noise_huge_clip_mean_equals_vanilla_exactly(make_model, steps):
    """loss_reduction="mean", fixed batches of the expected size (8): bit-identical to SGD."""
    vanilla, v_opt, private, engine, (model, optimizer, dl) = _zero_noise_twins(
        make_model, 32, 1 / 16, 8, poisson_sampling=False)
    assert dl.batch_size == 8 and optimizer.expected_batch_size == 8
    criterion = nn.MSELoss()
    for x, y in batches(dl, steps):
        train_step(model, optimizer, criterion, x, y)
        train_step(vanilla, v_opt, criterion, x, y)
    for p_dp, p_v in zip(private.parameters(), vanilla.parameters()):
        assert torch.equal(p_dp, p_v)
    assert not torch.equal(next(private.parameters()), next(make_model().parameters()))
    assert engine.accountant.history == [(0.0, 1 / 4, steps)]


@pytest.mark.parametrize(("make_model", "steps"), EXACT_CASES, ids=EXACT_IDS)
def test_zero_noise_huge_clip_sum_equals_vanilla_on_same_poisson_batches(make_model, steps):
    """loss_reduction="sum" on the engine's own Poisson batches: bit-identical to SGD."""
    vanilla, v_opt, private, engine, (model, optimizer, dl) = _zero_noise_twins(
        make_model, 24, 1 / 64, 3, loss_reduction="sum")
    assert isinstance(dl, DPDataLoader)
    criterion = nn.MSELoss(reduction="sum")
    sizes = []
    for x, y in batches(dl, steps):
        sizes.append(len(x))
        train_step(model, optimizer, criterion, x, y)
        train_step(vanilla, v_opt, criterion, x, y)
    assert len(set(sizes)) > 1  # really Poisson batches
    for p_dp, p_v in zip(private.parameters(), vanilla.parameters()):
        assert torch.equal(p_dp, p_v)


def test_zero_noise_huge_clip_mean_poisson_matches_vanilla_with_expected_denominator():
    """"mean" on Poisson batches: vanilla must divide the summed loss by expected_batch_size.

    Not bit-identical: the per-example gradients of a mean loss are recovered as
    ``(dl/dy / B) * B`` for a realised batch size ``B`` that is not a power of two,
    and the batch reduction order differs; the result agrees to float64 rounding.
    """
    dataset = classification_dataset(40)
    vanilla = mlp64()
    private = copy.deepcopy(vanilla)
    v_opt = sgd(vanilla, 0.1, momentum=0.9)
    engine = PrivacyEngine()
    model, optimizer, dl = engine.make_private(
        module=private, optimizer=sgd(private, 0.1, momentum=0.9), data_loader=loader(dataset, 5),
        noise_multiplier=0.0, max_grad_norm=HUGE_CLIP,
    )
    ebs = core_sampling.expected_batch_size(40, 1 / 8)
    assert optimizer.expected_batch_size == ebs == 5
    dp_loss, v_loss = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    sizes = []
    for x, y in batches(dl, 16):
        sizes.append(len(x))
        train_step(model, optimizer, dp_loss, x, y)
        v_loss(vanilla(x), y).div(ebs).backward()
        v_opt.step()
        v_opt.zero_grad()
    assert len(set(sizes)) > 1
    for p_dp, p_v in zip(private.parameters(), vanilla.parameters()):
        assert_close(p_dp.detach(), p_v.detach(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- clipping


def per_example_grads(model: nn.Module, criterion, x, y) -> list[list[torch.Tensor]]:
    """Oracle: one backward pass per example on a plain copy of the model."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        criterion(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    return out


def clipped_contributions(model, optimizer, dl, criterion):
    """Run BatchMemoryManager with physical batches of one example and record what
    each example adds to the optimizer's clipped sum (``p.summed_grad``)."""
    params = list(model.parameters())
    contributions, examples = [], []
    with BatchMemoryManager(data_loader=dl, max_physical_batch_size=1, optimizer=optimizer) as bdl:
        previous = [torch.zeros_like(p) for p in params]
        for x, y in bdl:
            criterion(model(x), y).backward()
            optimizer.step()
            if len(x):
                current = [p.summed_grad.detach().clone() for p in params]
                contributions.append([c - b for c, b in zip(current, previous)])
                examples.append((x, y))
                previous = current
            if not optimizer._is_last_step_skipped:
                previous = [torch.zeros_like(p) for p in params]
            optimizer.zero_grad()
    return contributions, examples


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_each_example_contribution_is_clipped(clipping):
    dataset = classification_dataset(30)
    model = mlp64()
    plain = copy.deepcopy(model)
    n_params = len(list(model.parameters()))
    bound = 0.3 if clipping == "flat" else [0.05 * (i + 1) for i in range(n_params)]
    engine = PrivacyEngine()
    dp_model, optimizer, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader(dataset, 10), noise_multiplier=0.0, max_grad_norm=bound,
        clipping=clipping, loss_reduction="sum",
    )
    criterion = nn.CrossEntropyLoss(reduction="sum")
    contributions, examples = clipped_contributions(dp_model, optimizer, dl, criterion)
    assert len(contributions) > 10
    clipped_any = False
    for contribution, (x, y) in zip(contributions, examples):
        raw = per_example_grads(plain, criterion, x, y)[0]
        if clipping == "flat":
            norm = float(torch.sqrt(sum(c.pow(2).sum() for c in contribution)))
            assert norm <= bound * (1 + 1e-12)
            raw_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in raw)))
            factors = [min(1.0, bound / (raw_norm + core_clipping.CLIP_EPSILON))] * n_params
            clipped_any |= raw_norm > bound
        else:
            factors = []
            for c, g, c_i in zip(contribution, raw, bound):
                assert float(c.norm()) <= c_i * (1 + 1e-12)
                factors.append(min(1.0, c_i / (float(g.norm()) + core_clipping.CLIP_EPSILON)))
                clipped_any |= float(g.norm()) > c_i
        assert_close([c.numpy() for c in contribution],
                     [(f * g).numpy() for f, g in zip(factors, raw)], rtol=1e-10, atol=1e-15)
    assert clipped_any


def test_full_batch_clipped_sum_matches_dpcore_reference():
    dataset = classification_dataset(20)
    model = mlp64()
    plain = copy.deepcopy(model)
    engine = PrivacyEngine()
    dp_model, optimizer, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader(dataset, 20, shuffle=False), noise_multiplier=0.0, max_grad_norm=0.2,
        loss_reduction="sum", poisson_sampling=False,
    )
    criterion = nn.CrossEntropyLoss(reduction="sum")
    x, y = next(iter(dl))
    criterion(dp_model(x), y).backward()
    optimizer.step()
    grads = per_example_grads(plain, criterion, x, y)
    stacked = [np.stack([g[j].numpy() for g in grads]) for j in range(len(grads[0]))]
    expected = core_clipping.clip_and_sum(stacked, 0.2)
    assert_close([p.grad.numpy() for p in model.parameters()], expected, rtol=1e-10, atol=1e-15)


# --------------------------------------------------------------------------- noise and sampling


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_update_noise_std_is_sigma_c_over_expected_batch_size(loss_reduction):
    """With zero per-example gradients the update is pure noise: KS against N(0, std^2)."""
    sigma, clip = 1.3, 0.7
    dataset = TensorDataset(torch.randn(100, 200, generator=torch.Generator().manual_seed(6)))
    model = nn.Linear(200, 100)
    engine = PrivacyEngine()
    dp_model, optimizer, dl = engine.make_private(
        module=model, optimizer=sgd(model, 1.0), data_loader=loader(dataset, 10),
        noise_multiplier=sigma, max_grad_norm=clip, loss_reduction=loss_reduction,
        noise_generator=torch.Generator().manual_seed(7),
    )
    ebs = core_sampling.expected_batch_size(100, 0.1)
    std = sigma * clip / (ebs if loss_reduction == "mean" else 1)
    draws = []
    for step, (x,) in enumerate(dl):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        (dp_model(x) * 0.0).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        draws.extend(-p.detach().reshape(-1).numpy() for p in model.parameters())
        if step == 1:
            break
    z = np.concatenate(draws).astype(np.float64)
    assert z.size == 2 * (200 * 100 + 100)
    assert stats.kstest(z / std, "norm").pvalue > 1e-3
    for wrong in (0.9, 1.1):
        assert stats.kstest(z / (wrong * std), "norm").pvalue < 1e-6


def test_poisson_batch_sizes_are_binomial():
    n, batch = 60, 6
    dataset = TensorDataset(torch.arange(n, dtype=torch.float64).unsqueeze(1))
    model = nn.Linear(1, 1).double()
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset, batch), noise_multiplier=1.0, max_grad_norm=1.0,
    )
    assert isinstance(dl, DPDataLoader) and dl.sample_rate == 1 / 10 and len(dl) == 10
    sizes = np.array([len(x) for _ in range(300) for (x,) in dl])
    assert sizes.size == 3000 and (sizes == 0).any()

    def chi2_pvalue(q):
        edges = [0, 3, 4, 5, 6, 7, 8, 9, 11]  # bins [0,3), [3,4), ..., [11, n]
        pmf = stats.binom.pmf(np.arange(n + 1), n, q)
        expected = [pmf[lo:hi].sum() for lo, hi in zip(edges, edges[1:] + [n + 1])]
        observed = [np.sum((sizes >= lo) & (sizes < hi)) for lo, hi in zip(edges, edges[1:] + [n + 1])]
        return stats.chisquare(observed, np.array(expected) * sizes.size).pvalue

    assert chi2_pvalue(0.1) > 1e-3
    assert chi2_pvalue(0.115) < 1e-6 and chi2_pvalue(0.085) < 1e-6


# --------------------------------------------------------------------------- ghost mode


@pytest.mark.parametrize("noise_multiplier", [0.0, 0.8])
def test_ghost_mode_equals_hooks_mode(noise_multiplier):
    """Same batches, same noise stream: ghost clipping gives the hooks-mode update."""
    dataset = classification_dataset(40)
    results = []
    for mode in ("hooks", "ghost"):
        model = mlp64()
        engine = PrivacyEngine()
        out = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
            data_loader=loader(dataset, 8, seed=9), noise_multiplier=noise_multiplier,
            max_grad_norm=0.25, grad_sample_mode=mode,
            noise_generator=torch.Generator().manual_seed(10),
        )
        if mode == "ghost":
            dp_model, optimizer, criterion, dl = out
        else:
            (dp_model, optimizer, dl), criterion = out, nn.CrossEntropyLoss()
        for _ in range(2):
            for x, y in dl:
                train_step(dp_model, optimizer, criterion, x, y)
        results.append([p.detach().clone() for p in model.parameters()])
        assert len(engine.accountant) == 10
    assert_close([p.numpy() for p in results[1]], [p.numpy() for p in results[0]], rtol=1e-10, atol=1e-12)
    assert not torch.equal(results[0][0], mlp64()[0].weight)


# --------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize("mode", ["hooks", "ghost", "hooks+bmm"])
def test_training_loop_survives_empty_poisson_batches(mode):
    """q = 1/30 on 30 examples: about a third of the batches are empty; each is a real step."""
    dataset = classification_dataset(30)
    outcomes = {}
    for sigma in (0.0, 1.0):
        model = mlp64()
        engine = PrivacyEngine()
        out = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(dataset, 1, seed=11), noise_multiplier=sigma, max_grad_norm=1.0,
            grad_sample_mode="ghost" if mode == "ghost" else "hooks",
            noise_generator=torch.Generator().manual_seed(12),
        )
        dp_model, optimizer, dl = (out[0], out[1], out[-1])
        criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
        changed_on_empty = []
        with contextlib.ExitStack() as stack:
            source = dl
            if mode == "hooks+bmm":
                source = stack.enter_context(BatchMemoryManager(
                    data_loader=dl, max_physical_batch_size=1, optimizer=optimizer))
            for x, y in source:
                before = [p.detach().clone() for p in model.parameters()]
                train_step(dp_model, optimizer, criterion, x, y)
                if len(x) == 0:
                    assert x.shape == (0, 5) and y.shape == (0,) and y.dtype == torch.long
                    changed_on_empty.append(
                        any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
        assert engine.accountant.history == [(sigma, 1 / 30, 30)]
        outcomes[sigma] = changed_on_empty
    assert len(outcomes[0.0]) >= 3
    assert not any(outcomes[0.0])  # no noise: an empty step leaves the weights alone
    assert all(outcomes[1.0])  # with noise: an empty step still adds noise
