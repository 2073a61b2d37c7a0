"""PyTorch Lightning integration: DPLightningDataModule and DPCallback.

Oracles: the DP-SGD definition (a loop of single-example backward passes, clip,
sum, divide by the expected batch size), dpcore's accountant for the logged
epsilon, and one unsplit logical step for gradient accumulation.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import dp_torch  # noqa: E402
from dp_torch.data_loader import DPDataLoader  # noqa: E402
from dp_torch.lightning import DPCallback, DPLightningDataModule, logical_loader  # noqa: E402
from dpcore.accounting import create_accountant  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

# Lightning's own warnings that the test settings provoke, each filtered where it fires:
# - train loaders without worker processes (fine for 40 toy examples);
# - Lightning 2.6's pytree helper calls a torch API that newer torch deprecates.
_LIGHTNING_NOISE = (
    pytest.mark.filterwarnings("ignore:The 'train_dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
)


def trains(test: Any) -> Any:
    """Mark a test that runs ``Trainer.fit``: filter the warnings listed above, nothing else."""
    for mark in _LIGHTNING_NOISE:
        test = mark(test)
    return test


N, DIM, DELTA = 40, 4, 1e-5


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, DIM, generator=g), torch.randint(0, 2, (N,), generator=g))


class ToyData(pl.LightningDataModule):
    """40 examples; train and validation loaders built once (so identity can be checked)."""

    def __init__(self, batch_size: int = 10) -> None:
        super().__init__()
        self.data = _dataset()
        self.train = DataLoader(self.data, batch_size=batch_size)
        self.val = DataLoader(self.data, batch_size=batch_size)

    def train_dataloader(self) -> DataLoader:
        return self.train

    def val_dataloader(self) -> DataLoader:
        return self.val


class ToyModule(pl.LightningModule):
    """MLP 4-6-2 with cross-entropy; remembers every training batch it saw."""

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(DIM, 6), nn.ReLU(), nn.Linear(6, 2))
        self.criterion = nn.CrossEntropyLoss()
        self.lr = lr
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        self.seen.append((x.clone(), y.clone()))
        return {"loss": self.criterion(self(x), y)}

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.criterion(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit(callback: DPCallback, *, steps: int, accumulate: int = 1, batch_size: int = 10,
         seed: int = 3, **trainer_kwargs: Any) -> tuple[ToyModule, pl.Trainer]:
    module = ToyModule()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, **{"logger": False, **trainer_kwargs}, callbacks=[callback],
    )
    data = DPLightningDataModule(ToyData(batch_size), generator=torch.Generator().manual_seed(seed))
    trainer.fit(module, datamodule=data)
    return module, trainer


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _dp_sgd_update(x: torch.Tensor, y: torch.Tensor, clip: float, expected: int) -> list[torch.Tensor]:
    """The DP-SGD definition at zero noise: per-example gradients, clip, sum, divide."""
    model = ToyModule()
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(y)):
        model.zero_grad()
        model.criterion(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return [t / expected for t in total]


def _callback(**kwargs: Any) -> DPCallback:
    settings = {"max_grad_norm": 0.5, "target_delta": DELTA, "noise_multiplier": 1.0}
    return DPCallback(**{**settings, **kwargs})


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("accumulate", [1, 2])
@trains
def test_zero_noise_step_is_the_dp_sgd_definition(mode, accumulate):
    callback = _callback(noise_multiplier=0.0, grad_sample_mode=mode)
    before = _params(ToyModule())
    module, trainer = _fit(callback, steps=1, accumulate=accumulate)
    x = torch.cat([b[0] for b in module.seen])
    y = torch.cat([b[1] for b in module.seen])
    assert len(module.seen) == accumulate and 0 < len(y) < N
    expected = int(N * logical_loader(trainer.train_dataloader).sample_rate)
    assert expected == 10 * accumulate
    update = [b - a for a, b in zip(_params(module), before)]  # lr = 1: theta_0 - theta_1
    assert_close(update, _dp_sgd_update(x, y, clip=0.5, expected=expected), rtol=1e-5, atol=1e-7)


def _accountant_epsilons(sigma: float, rate: float, steps: int) -> list[float]:
    accountant = create_accountant("rdp")
    epsilons = []
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
        epsilons.append(accountant.get_epsilon(DELTA))
    return epsilons


@trains
def test_epsilon_is_logged_every_step_and_is_the_accountants(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    callback = _callback()
    _, trainer = _fit(callback, steps=3, logger=logger, log_every_n_steps=1)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        logged = [float(row["epsilon"]) for row in csv.DictReader(f) if row["epsilon"]]
    expected = _accountant_epsilons(1.0, 0.25, 3)
    assert_close(logged, expected, rtol=1e-6)
    assert callback.epsilon() == pytest.approx(expected[-1], rel=1e-12)
    assert float(trainer.callback_metrics["epsilon"]) == pytest.approx(expected[-1], rel=1e-6)


def _one_logical_step(accumulate: int, batch_size: int) -> tuple[ToyModule, DPCallback]:
    callback = _callback(noise_generator=torch.Generator().manual_seed(11))
    module, _ = _fit(callback, steps=1, accumulate=accumulate, batch_size=batch_size)
    return module, callback


@trains
def test_accumulated_chunks_get_noise_once_like_one_logical_step():
    # Both runs sample at rate 1/2 with the same sampling seed, so the same logical batch:
    # two chunks of it under accumulate_grad_batches=2, the whole of it in one batch otherwise.
    split, split_callback = _one_logical_step(accumulate=2, batch_size=10)
    whole, whole_callback = _one_logical_step(accumulate=1, batch_size=20)
    assert len(split.seen) == 2 and len(whole.seen) == 1
    assert torch.equal(torch.cat([x for x, _ in split.seen]), whole.seen[0][0])
    assert_close(_params(split), _params(whole), rtol=1e-5, atol=1e-7)
    for callback in (split_callback, whole_callback):
        assert callback.privacy_engine.accountant.history == [(1.0, 0.5, 1)]
    # The noise is large against the clipped mean, so a second draw would show.
    noiseless, _ = _fit(_callback(noise_multiplier=0.0), steps=1, accumulate=2)
    assert not torch.allclose(_params(split)[0], _params(noiseless)[0], atol=1e-3)


@trains
def test_training_stops_before_exceeding_target_epsilon():
    epsilons = _accountant_epsilons(1.0, 0.25, 4)
    target = (epsilons[2] + epsilons[3]) / 2
    callback = _callback(target_epsilon=target)
    _, trainer = _fit(callback, steps=20)
    assert trainer.global_step == 3
    assert callback.epsilon() == pytest.approx(epsilons[2], rel=1e-12) and callback.epsilon() <= target


@trains
def test_noise_multiplier_calibrated_to_the_planned_steps():
    callback = _callback(noise_multiplier=None, target_epsilon=2.0)
    _, trainer = _fit(callback, steps=4)
    assert trainer.global_step == 4
    assert 1.9 <= callback.epsilon() <= 2.0


@trains
def test_one_step_over_budget_is_refused_before_training():
    callback = _callback(noise_multiplier=0.3, target_epsilon=0.01)
    with pytest.raises(ValueError, match="already exceeds target_epsilon"):
        _fit(callback, steps=2)
    assert len(callback.privacy_engine.accountant) == 0 and callback.optimizer is None


@trains
def test_non_poisson_train_loader_is_refused():
    module = ToyModule()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[_callback()])
    with pytest.raises(ValueError, match="needs a Poisson train loader"):
        trainer.fit(module, train_dataloaders=DataLoader(_dataset(), batch_size=10),
                    val_dataloaders=DataLoader(_dataset(), batch_size=10))


def test_trainer_gradient_clipping_is_refused():
    trainer = pl.Trainer(accelerator="cpu", gradient_clip_val=1.0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        _callback().setup(trainer, ToyModule(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"noise_multiplier": None}, "noise_multiplier, target_epsilon"),
     ({"target_delta": 0.0}, "target_delta"),
     ({"target_epsilon": -1.0}, "target_epsilon"),
     ({"grad_sample_mode": "ew"}, "grad_sample_mode")],
)
def test_bad_callback_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _callback(**kwargs)


def test_ghost_mode_without_criterion_attribute_is_refused():
    module = ToyModule()
    del module.criterion
    with pytest.raises(ValueError, match="criterion"):
        _callback(grad_sample_mode="ghost")._criterion(module)


def _batch_sizes(loader: DataLoader, epochs: int) -> list[int]:
    return [len(y) for _ in range(epochs) for _, y in loader]


def test_data_module_gives_poisson_batches_and_keeps_other_loaders():
    wrapped = ToyData(batch_size=10)
    data = DPLightningDataModule(wrapped, generator=torch.Generator().manual_seed(0))
    loader = data.train_dataloader()
    assert isinstance(loader, DPDataLoader) and loader.sample_rate == 0.25
    assert len(loader) == 4
    sizes = _batch_sizes(loader, epochs=100)
    assert len(set(sizes)) > 3
    # 400 batches of Binomial(40, 1/4): mean 10, standard error sqrt(7.5 / 400) ~ 0.14.
    assert abs(sum(sizes) / len(sizes) - 10) < 0.6
    assert data.val_dataloader() is wrapped.val


def test_data_module_splits_logical_batches_under_accumulation():
    data = DPLightningDataModule(ToyData(batch_size=10), generator=torch.Generator().manual_seed(0))
    data.trainer = pl.Trainer(accelerator="cpu", accumulate_grad_batches=2, logger=False,
                              enable_progress_bar=False, enable_model_summary=False)
    loader = data.train_dataloader()
    logical = logical_loader(loader)
    assert logical is not None and logical.sample_rate == 0.5 and len(loader) == 2 * len(logical)
    chunks = [y for _, y in loader]
    pairs = [len(a) + len(b) for a, b in zip(chunks[::2], chunks[1::2])]
    assert all(abs(len(a) - len(b)) <= 1 for a, b in zip(chunks[::2], chunks[1::2]))
    assert len(pairs) == 2 and all(0 <= p <= N for p in pairs)


def test_no_other_dp_torch_module_imports_lightning():
    root = Path(dp_torch.__file__).parent
    importers = [path.relative_to(root).as_posix() for path in root.rglob("*.py")
                 if re.search(r"^\s*(import|from)\s+(pytorch_)?lightning\b", path.read_text(), re.M)
                 and path.name != "lightning.py"]
    assert importers == []


@pytest.mark.slow
def test_import_dp_torch_does_not_import_lightning():
    code = "import sys, dp_torch; sys.exit(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.filterwarnings("ignore:The '(train|val)_dataloader' does not have many workers")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_example_smoke_run_improves_accuracy_and_prints_epsilon(capsys):
    pytest.importorskip("sklearn")
    from examples import lightning_mnist_like
    from tests.example_checks import check_result_line

    result = lightning_mnist_like.main(["--smoke", "--no-progress"])
    out = capsys.readouterr().out
    check_result_line(out, "dp_torch lightning digits", result, lightning_mnist_like.SMOKE_EPOCHS)
    assert "epoch 2: epsilon" in out
    assert result["accuracy"] > result["initial_accuracy"] + 0.3
