"""Opacus' reproducibility contract: outside secure mode ``torch.manual_seed`` alone fixes a run.

Poisson batches (a ``DPDataLoader`` built without ``seed`` or ``generator``, as
``make_private`` builds it) and the noise both derive from torch's default generator, so
the same seed repeats a run exactly and another seed changes it. Secure mode ignores
the seed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dp_torch import PrivacyEngine
from dp_torch.data_loader import DPDataLoader
from dp_torch.utils.uniform_sampler import UniformWithReplacementSampler

N = 40


def _run(seed: int, *, secure_mode: bool = False, steps: int = 2) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Batch indices and parameters after ``steps`` private steps of a fresh run."""
    torch.manual_seed(seed)
    data = TensorDataset(torch.arange(N, dtype=torch.float32).unsqueeze(1).repeat(1, 4), torch.arange(N) % 3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(secure_mode=secure_mode)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    indices: list[list[int]] = []
    batches = iter(loader.batch_sampler)
    for _ in range(steps):
        batch = next(batches)
        indices.append(batch)
        optimizer.zero_grad()
        x, y = data[batch] if batch else (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return indices, [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_same_seed_repeats_batches_and_noise() -> None:
    batches_a, params_a = _run(11)
    torch.randn(100)  # unrelated draws in between change nothing once the seed is set again
    batches_b, params_b = _run(11)
    assert batches_a == batches_b
    assert _same(params_a, params_b)


def test_another_seed_changes_batches_and_noise() -> None:
    batches_a, params_a = _run(11)
    batches_b, params_b = _run(12)
    assert batches_a != batches_b
    assert not _same(params_a, params_b)


def test_secure_mode_ignores_the_seed() -> None:
    batches_a, params_a = _run(11, secure_mode=True, steps=3)
    batches_b, params_b = _run(11, secure_mode=True, steps=3)
    assert batches_a != batches_b or not _same(params_a, params_b)


def test_dp_data_loader_and_sampler_follow_manual_seed() -> None:
    data = TensorDataset(torch.arange(N))

    def first_epoch() -> list[list[int]]:
        return list(DPDataLoader(data, sample_rate=0.2).batch_sampler)

    torch.manual_seed(5)
    a = first_epoch()
    torch.manual_seed(5)
    assert first_epoch() == a
    torch.manual_seed(6)
    assert first_epoch() != a
    torch.manual_seed(5)
    s1 = UniformWithReplacementSampler(num_samples=N, sample_rate=0.2)
    torch.manual_seed(5)
    s2 = UniformWithReplacementSampler(num_samples=N, sample_rate=0.2)
    assert s1.seed == s2.seed and list(s1) == list(s2)
    secure = UniformWithReplacementSampler(num_samples=N, sample_rate=0.2, secure_mode=True)
    assert secure.seed is None
