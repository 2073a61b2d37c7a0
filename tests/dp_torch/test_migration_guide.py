"""Every snippet of the Opacus 1.x migration guide, with ``opacus`` replaced by ``dp_torch``.

One test per section of the Opacus 1.x migration guide. The snippets are
kept as close to the guide's text as possible (its names, its numbers); the guide
leaves the model, the data and the training loop to the reader, so those are filled
in with a small network and a synthetic data set.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD
from torch.utils.data import TensorDataset

from dp_torch import GradSampleModule, PrivacyEngine
from dp_torch.data_loader import DPDataLoader
from dp_torch.optimizers import DPOptimizer
from dp_torch.utils.batch_memory_manager import BatchMemoryManager
from dp_torch.validators import ModuleValidator, UnsupportedModuleError
from dpcore import accounting as core_accounting
from dpcore import sampling as core_sampling


class Net(nn.Module):
    """The guide's ``Net()``: a small classifier on 16 features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class NetWithBatchNorm(Net):
    """``Net`` with a BatchNorm layer, as in the guide's BatchNorm section."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def make_dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, (x[:, :4].argmax(dim=1)))


def train_one_epoch(model, optimizer, data_loader) -> list[int]:
    """"Now it's business as usual": the standard loop. Returns the batch sizes seen."""
    sizes = []
    for data, label in data_loader:
        loss = F.cross_entropy(model(data), label)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sizes.append(len(data))
    return sizes


def test_new_api_intro():
    torch.manual_seed(0)
    dataset = make_dataset(2048)
    # define your components as usual
    model = Net()
    optimizer = SGD(model.parameters(), lr=0.05)
    data_loader = torch.utils.data.DataLoader(dataset, batch_size=1024)
    # enter PrivacyEngine
    privacy_engine = PrivacyEngine()
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
    )
    # Now it's business as usual
    train_one_epoch(model, optimizer, data_loader)

    # model is wrapped with GradSampleModule, optimizer with DPOptimizer, and the
    # data loader is a DPDataLoader sampling Poisson batches.
    assert isinstance(model, GradSampleModule)
    assert isinstance(optimizer, DPOptimizer)
    assert isinstance(data_loader, DPDataLoader) and data_loader.sample_rate == 0.5
    assert privacy_engine.accountant.history == [(1.1, 0.5, 2)]


def test_simple_migration():
    torch.manual_seed(0)
    dataset = make_dataset(2048)
    target_delta = 1e-5
    alphas = [1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]

    model = Net()
    optimizer = SGD(model.parameters(), lr=0.05)
    # in addition to model and optimizer you now need access to a data loader
    data_loader = torch.utils.data.DataLoader(dataset, batch_size=1024)
    # PrivacyEngine's constructor doesn't accept training artifacts - they're instead passed to make_private
    privacy_engine = PrivacyEngine()
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model,  # Parameter names are required
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=1.3,
        max_grad_norm=1.0,
    )
    # Now it's business as usual
    train_one_epoch(model, optimizer, data_loader)

    eps = privacy_engine.get_epsilon(delta=target_delta)
    eps_custom = privacy_engine.get_epsilon(delta=target_delta, alphas=alphas)
    eps_acc, alpha = privacy_engine.accountant.get_privacy_spent(delta=target_delta, alphas=alphas)

    reference = core_accounting.RDPAccountant()  # sample_rate was inferred from the data loader
    reference.step(noise_multiplier=1.3, sample_rate=1 / 2, num_steps=2)
    assert eps == reference.get_epsilon(target_delta)
    assert eps_custom == eps_acc == reference.get_epsilon(target_delta, alphas=alphas)
    assert alpha in alphas

    # The old API is gone: no training artifacts in the constructor, no attach().
    with pytest.raises(TypeError):
        PrivacyEngine(model, sample_rate=0.01, alphas=[10, 100], noise_multiplier=1.3, max_grad_norm=1.0)
    assert not hasattr(privacy_engine, "attach") and not hasattr(privacy_engine, "get_privacy_spent")

    # "we rely on user to call optimizer.zero_grad() (but will still detect and throw an
    # exception if it's not done)"
    data, label = next(iter(data_loader))
    F.cross_entropy(model(data), label).backward()
    optimizer.step()
    with pytest.raises(ValueError):
        F.cross_entropy(model(data), label).backward()


def test_your_model_has_batchnorm():
    torch.manual_seed(0)
    dataset = make_dataset(256)
    model = NetWithBatchNorm()
    privacy_engine = PrivacyEngine()
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        privacy_engine.make_private(
            module=model, optimizer=SGD(model.parameters(), lr=0.05),
            data_loader=torch.utils.data.DataLoader(dataset, batch_size=64),
            noise_multiplier=1.0, max_grad_norm=1.0,
        )

    model = ModuleValidator.fix(model)

    assert isinstance(model.bn, nn.GroupNorm) and ModuleValidator.is_valid(model)
    optimizer = SGD(model.parameters(), lr=0.05)
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer,
        data_loader=torch.utils.data.DataLoader(dataset, batch_size=64),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    train_one_epoch(model, optimizer, data_loader)
    assert len(privacy_engine.accountant) == 4


def test_if_you_are_using_virtual_steps():
    torch.manual_seed(0)
    dataset = make_dataset(512)
    privacy_engine = PrivacyEngine()

    BATCH_SIZE = 128  # that's the logical batch size. You'll mostly be using this one across your code
    MAX_PHYSICAL_BATCH_SIZE = 32  # physical limit on batch size. You'll use this once

    model = Net()
    optimizer = SGD(model.parameters(), lr=0.05)
    data_loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE)

    model, optimizer, data_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=data_loader,
        noise_multiplier=1.0, max_grad_norm=1.0,
    )

    physical_sizes = []
    with BatchMemoryManager(
        data_loader=data_loader,
        max_physical_batch_size=MAX_PHYSICAL_BATCH_SIZE,
        optimizer=optimizer
    ) as new_data_loader:
        for data, label in new_data_loader:  # Note: you have to use new data loader initialized by the context manager
            # continue training as normal
            F.cross_entropy(model(data), label).backward()
            optimizer.step()
            optimizer.zero_grad()
            physical_sizes.append(len(data))

    assert max(physical_sizes) <= MAX_PHYSICAL_BATCH_SIZE
    assert len(physical_sizes) > 4  # logical batches of ~128 really were split
    # noise and accounting happen once per logical batch, at the logical sample rate
    assert privacy_engine.accountant.history == [(1.0, BATCH_SIZE / 512, 4)]


def test_when_you_know_privacy_budget_in_advance():
    torch.manual_seed(0)
    dataset = make_dataset(512)
    EPOCHS, EPSILON, DELTA, MAX_GRAD_NORM = 3, 4.0, 1e-5, 1.0
    privacy_engine = PrivacyEngine()
    model = Net()
    optimizer = SGD(model.parameters(), lr=0.05)
    data_loader = torch.utils.data.DataLoader(dataset, batch_size=64)

    model, optimizer, data_loader = privacy_engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        epochs=EPOCHS,
        target_epsilon=EPSILON,
        target_delta=DELTA,
        max_grad_norm=MAX_GRAD_NORM,
    )

    for _ in range(EPOCHS):
        train_one_epoch(model, optimizer, data_loader)
    assert len(privacy_engine.accountant) == EPOCHS * 8
    assert EPSILON - 0.05 < privacy_engine.get_epsilon(DELTA) <= EPSILON


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed():
    import dp_torch.layers

    from dp_torch.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    # "- from opacus.layers import DifferentiallyPrivateDistributedDataParallel as DPDDP": moved
    assert not hasattr(dp_torch.layers, "DifferentiallyPrivateDistributedDataParallel")
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        net = Net()
        expected = {k: v.clone() for k, v in net.state_dict().items()}
        model = DPDDP(net)
        assert model.module is net
        assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
        x = torch.randn(5, 16)
        assert torch.equal(model(x), net(x))
        # "Nothing has changed here": make_private takes the DPDDP model as it is.
        privacy_engine = PrivacyEngine()
        model, optimizer, data_loader = privacy_engine.make_private(
            module=model, optimizer=SGD(model.parameters(), lr=0.05),
            data_loader=torch.utils.data.DataLoader(make_dataset(64), batch_size=16),
            noise_multiplier=1.0, max_grad_norm=1.0,
        )
        assert type(optimizer).__name__ == "DistributedDPOptimizer"
        train_one_epoch(model, optimizer, data_loader)
        assert len(privacy_engine.accountant) == 4
    finally:
        torch.distributed.destroy_process_group()


def test_no_data_loader():
    torch.manual_seed(0)
    dataset = make_dataset(400)
    batch_size = 40
    sample_rate = batch_size / len(dataset)

    # business as usual
    model = Net()
    optimizer = SGD(model.parameters(), lr=0.05)

    # initialize privacy accountant
    from dp_torch.accountants import RDPAccountant

    accountant = RDPAccountant()

    # wrap model
    from dp_torch import GradSampleModule

    dp_model = GradSampleModule(model)

    # wrap optimizer
    from dp_torch.optimizers import DPOptimizer

    dp_optimizer = DPOptimizer(
        optimizer=optimizer,
        noise_multiplier=1.0,  # same as make_private arguments
        max_grad_norm=1.0,  # same as make_private arguments
        expected_batch_size=batch_size  # if you're averaging your gradients, you need to know the denominator
    )

    # attach accountant to track privacy for an optimizer
    dp_optimizer.attach_step_hook(
        accountant.get_optimizer_hook_fn(
            # this is an important parameter for privacy accounting. Should be equal to batch_size / len(dataset)
            sample_rate=sample_rate
        )
    )

    # A data source that is not a DataLoader: Poisson batches of indices from dpcore.
    x_all, y_all = dataset.tensors
    steps = 0
    for indices in core_sampling.PoissonSampler(len(dataset), sample_rate, seed=0):
        data, label = x_all[indices], y_all[indices]
        F.cross_entropy(dp_model(data), label).backward()
        dp_optimizer.step()
        dp_optimizer.zero_grad()
        steps += 1

    assert steps == 10
    assert accountant.history == [(1.0, sample_rate, steps)]
    reference = core_accounting.RDPAccountant()
    reference.step(noise_multiplier=1.0, sample_rate=sample_rate, num_steps=steps)
    assert accountant.get_epsilon(1e-5) == reference.get_epsilon(1e-5)
