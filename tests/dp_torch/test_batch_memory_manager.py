"""Tests of dp_torch.utils.batch_memory_manager: virtual steps equal one big step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from dp_torch.data_loader import DPDataLoader
from dp_torch.optimizers import DPOptimizer
from dp_torch.utils.batch_memory_manager import (
    BatchMemoryManager,
    BatchSplittingSampler,
    wrap_data_loader,
)
from dpcore import sampling as core_sampling
from dpcore.noise import NoiseSource
from tests.tolerance import assert_close

N, Q = 60, 0.2


class Recorder:
    """Stands in for a DPOptimizer: records the skip signals."""

    def __init__(self):
        self.signals = []

    def signal_skip_step(self, do_skip=True):
        self.signals.append(do_skip)


def dataset(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g, dtype=torch.float64) * 2,
                         torch.randn(n, 2, generator=g, dtype=torch.float64))


def set_hand_grad_samples(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.no_grad():
        residual = x @ model.weight.T + model.bias - y
        model.weight.grad_sample = torch.einsum("bo,bi->boi", residual, x)
        model.bias.grad_sample = residual.clone()


def model_and_optimizer(noise_multiplier=0.0, generator=None, loss_reduction="mean"):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), noise_multiplier=noise_multiplier,
        max_grad_norm=1.5, expected_batch_size=int(N * Q), loss_reduction=loss_reduction,
        generator=generator,
    )
    return model, opt


def train(loader, model, opt):
    for x, y in loader:
        set_hand_grad_samples(model, x, y)
        opt.step()
        opt.zero_grad()


# --------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("max_size", [1, 3, 7, 100])
def test_chunks_respect_the_max_and_cover_the_logical_batch(max_size):
    logical = [list(range(10)), [], [3, 5, 8], list(range(20, 41))]
    recorder = Recorder()
    sampler = BatchSplittingSampler(sampler=logical, max_batch_size=max_size, optimizer=recorder)
    chunks = list(sampler)
    assert all(len(c) <= max_size for c in chunks)
    # regroup chunks by the skip signals: a False closes a logical batch
    regrouped, current = [], []
    for chunk, skip in zip(chunks, recorder.signals):
        current += chunk
        if not skip:
            regrouped.append(current)
            current = []
    assert regrouped == logical
    assert len(recorder.signals) == len(chunks)
    assert recorder.signals.count(False) == len(logical)  # one full step per logical batch


def test_empty_logical_batch_yields_one_empty_chunk():
    recorder = Recorder()
    chunks = list(BatchSplittingSampler(sampler=[[]], max_batch_size=4, optimizer=recorder))
    assert chunks == [[]] and recorder.signals == [False]


def test_len_and_validation():
    base = BatchSampler(SequentialSampler(range(100)), batch_size=10, drop_last=False)
    assert len(BatchSplittingSampler(sampler=base, max_batch_size=4, optimizer=Recorder())) == 25
    dp = DPDataLoader(dataset(), sample_rate=Q, seed=0)
    split = BatchSplittingSampler(
        sampler=dp.batch_sampler, max_batch_size=100, optimizer=Recorder()
    )
    assert len(split) == len(dp.batch_sampler)  # at least one chunk per logical batch
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        BatchMemoryManager(data_loader=dp, max_physical_batch_size=0, optimizer=Recorder())
    with pytest.raises(TypeError, match="signal_skip_step"):
        BatchMemoryManager(data_loader=dp, max_physical_batch_size=2, optimizer=object())


def test_wrap_data_loader_keeps_dataset_and_collate():
    dp = DPDataLoader(dataset(), sample_rate=Q, seed=0)
    wrapped = wrap_data_loader(data_loader=dp, max_batch_size=2, optimizer=Recorder())
    assert wrapped.dataset is dp.dataset and wrapped.collate_fn is dp.collate_fn
    assert isinstance(wrapped.batch_sampler, BatchSplittingSampler)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("max_size", [1, 4])
def test_virtual_steps_equal_one_big_step_per_logical_batch(max_size):
    seed = 11
    model_big, opt_big = model_and_optimizer()
    train(DPDataLoader(dataset(), sample_rate=Q, seed=seed), model_big, opt_big)

    model, opt = model_and_optimizer()
    accountant_steps = []
    opt.attach_step_hook(
        lambda o: accountant_steps.append((o.noise_multiplier, Q * o.accumulated_iterations))
    )
    chunk_sizes = []
    with BatchMemoryManager(data_loader=DPDataLoader(dataset(), sample_rate=Q, seed=seed),
                            max_physical_batch_size=max_size, optimizer=opt) as loader:
        for x, y in loader:
            chunk_sizes.append(len(x))
            set_hand_grad_samples(model, x, y)
            opt.step()
            opt.zero_grad()
    logical = core_sampling.poisson_batches(N, Q, core_sampling.steps_per_epoch(Q), seed)
    assert max(chunk_sizes) <= max_size
    assert sum(chunk_sizes) == sum(len(b) for b in logical)
    assert accountant_steps == [(0.0, Q)] * len(logical)  # once per logical batch, rate q
    assert_close(
        [p.detach().numpy() for p in model.parameters()],
        [p.detach().numpy() for p in model_big.parameters()],
        rtol=1e-10, atol=1e-12,
    )


def test_empty_logical_batch_still_steps_with_noise():
    model, opt = model_and_optimizer(noise_multiplier=1.0, generator=NoiseSource(seed=2))
    hooks = []
    opt.attach_step_hook(hooks.append)
    loader = DPDataLoader(dataset(), sample_rate=1 / N, seed=3)  # mostly empty batches
    logical = core_sampling.poisson_batches(N, 1 / N, N, 3)
    assert any(len(b) == 0 for b in logical)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as dl:
        for x, y in dl:
            before, steps_before = model.weight.detach().clone(), len(hooks)
            set_hand_grad_samples(model, x, y)
            opt.step()
            full_step = len(hooks) > steps_before
            assert full_step or len(x) == 2  # only a non-final chunk is skipped
            assert torch.equal(model.weight.detach(), before) != full_step  # noise moved it
            opt.zero_grad()
    assert len(hooks) == len(logical)


def test_noise_is_added_once_per_logical_batch():
    # zero gradients; every logical batch is split into several chunks; the released
    # gradient of each logical step must be N(0, (sigma C)^2), not k times that variance
    sigma, c, q, n = 1.0, 1.5, 0.5, 40
    data = TensorDataset(torch.zeros(n, 1))
    model = nn.Linear(1, 400, bias=False)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma,
                      max_grad_norm=c, expected_batch_size=None, loss_reduction="sum",
                      generator=torch.Generator().manual_seed(0))
    released, chunks = [], 0
    loader = DPDataLoader(data, sample_rate=q, seed=5)
    for _ in range(25):  # 25 epochs of 2 logical steps = 50 logical steps
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=4, optimizer=opt) as dl:
            for (x,) in dl:
                chunks += 1
                model.weight.grad_sample = torch.zeros(len(x), 400, 1)
                if opt.pre_step():
                    released.append(model.weight.grad.detach().numpy().ravel().copy())
                opt.zero_grad()
    assert len(released) == 50 and chunks > 4 * len(released)
    noise = np.concatenate(released)
    assert stats.kstest(noise, "norm", args=(0.0, sigma * c)).pvalue > 1e-4
    for wrong in (0.9 * sigma * c, 1.1 * sigma * c, np.sqrt(2) * sigma * c):
        assert stats.kstest(noise, "norm", args=(0.0, wrong)).pvalue < 1e-12


def test_exit_discards_pending_skip_signals():
    model, opt = model_and_optimizer()
    loader = DPDataLoader(dataset(), sample_rate=0.9, seed=1)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=5, optimizer=opt) as dl:
        for x, y in dl:
            break  # leave in the middle of a logical batch
        assert opt._step_skip_queue == [True]  # the first chunk of 9+ examples was signalled
    assert opt._step_skip_queue == []


def test_plain_batch_sampler_loader_is_split():
    data = dataset(10)
    plain = DataLoader(data, batch_size=5)
    recorder = Recorder()
    with BatchMemoryManager(data_loader=plain, max_physical_batch_size=2, optimizer=recorder) as dl:
        sizes = [len(x) for x, _ in dl]
    assert sizes == [2, 2, 1, 2, 2, 1]
    assert recorder.signals.count(False) == 2
