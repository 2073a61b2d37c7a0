"""``DPTrainer``: DP-SGD in the Hugging Face ``Trainer`` on a tiny GPT-2 with PEFT LoRA adapters.

The model is the zoo's ``gpt2_lora`` (float64, LoRA on the attention projections, only the
adapters train). Each test trains a few logical steps with SGD and a constant learning
rate and checks one promise of :mod:`dp_torch.integrations.transformers`: the noise-free
update is the DP-SGD definition (a loop of single-sequence backward passes), epsilon in
the logs is the accountant's, gradient accumulation adds the noise once per logical
batch, the epsilon stop, and a checkpoint resume that continues the ledger.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from dp_torch.accountants import create_accountant  # noqa: E402
from dp_torch.integrations.transformers import (  # noqa: E402
    PRIVACY_STATE_NAME,
    DPTrainer,
    LogicalBatchSplitter,
    PrivacyArguments,
    causal_lm_per_example_loss,
)
from tests.tolerance import assert_close  # noqa: E402
from tests.zoo.test_torch_zoo import _trainable, relative_error  # noqa: E402
from tests.zoo.torch_models import VOCAB, build  # noqa: E402

pytestmark = [
    # peft reads an attribute that transformers deprecates; not ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

N = 12  # training sequences
SEQ = 6
DELTA = 1e-5


class Sequences(torch.utils.data.Dataset):
    """``N`` random sequences; the first tokens of every third one are ignored (label -100)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(3, VOCAB, (N, SEQ), generator=gen)
        self.labels = self.tokens.clone()
        self.labels[::3, :2] = -100

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.labels[i]}


@pytest.fixture(scope="module")
def base_model() -> torch.nn.Module:
    return build("gpt2_lora", torch.float64).model


def _args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_pin_memory=False, seed=3,
    )
    settings.update(overrides)
    return TrainingArguments(str(tmp_path), **settings)


def _trainer(model, tmp_path, privacy: PrivacyArguments, **kwargs) -> DPTrainer:
    trainer_kwargs = {k: kwargs.pop(k) for k in ("grad_sample_mode", "max_physical_batch_size",
                                                 "noise_generator") if k in kwargs}
    return DPTrainer(model=model, args=_args(tmp_path, **kwargs), train_dataset=Sequences(),
                     privacy_args=privacy, **trainer_kwargs)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in _trainable(model)]


def _sequence_grads(model: torch.nn.Module, data: Sequences, i: int) -> list[torch.Tensor]:
    outputs = model(input_ids=data.tokens[i : i + 1])
    loss = causal_lm_per_example_loss(outputs, data.labels[i : i + 1]).sum()
    return list(torch.autograd.grad(loss, _trainable(model)))


def _first_logical_batch(trainer: DPTrainer) -> list[int]:
    splitter = trainer.get_train_dataloader().batch_sampler
    assert isinstance(splitter, LogicalBatchSplitter)
    return list(next(iter(copy.deepcopy(splitter.batch_sampler))))


@pytest.mark.parametrize(
    "mode, physical",
    [("hooks", None), ("ghost", None), pytest.param("hooks", 1, marks=pytest.mark.slow),
     pytest.param("ghost", 2, marks=pytest.mark.slow)],
    ids=["hooks", "ghost", "hooks-physical-1", "ghost-physical-2"],
)
def test_noise_free_update_is_the_dp_sgd_definition(base_model, tmp_path, mode, physical):
    """Clip each sequence's gradient, sum over the Poisson batch, divide by the expected size."""
    data = Sequences()
    reference = copy.deepcopy(base_model)
    per_sequence = [_sequence_grads(reference, data, i) for i in range(N)]
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in grads)) for grads in per_sequence])
    bound = float(norms.median())
    model = copy.deepcopy(base_model)
    trainer = _trainer(model, tmp_path, PrivacyArguments(noise_multiplier=0.0, max_grad_norm=bound),
                       grad_sample_mode=mode, max_physical_batch_size=physical)
    batch = _first_logical_batch(trainer)
    factors = {i: min(1.0, bound / (float(norms[i]) + 1e-6)) for i in batch}
    assert len(batch) > 1 and 0 < sum(f < 1 for f in factors.values()) < len(batch)
    expected = [sum(factors[i] * per_sequence[i][k] for i in batch) / 6
                for k in range(len(per_sequence[0]))]
    before = _params(model)
    trainer.train()
    update = [b - a for b, a in zip(before, _params(model))]
    assert relative_error(update, expected) < 1e-9


def test_epsilon_in_the_logs_is_the_accountants(base_model, tmp_path):
    trainer = _trainer(copy.deepcopy(base_model), tmp_path,
                       PrivacyArguments(noise_multiplier=1.3, target_delta=DELTA), max_steps=2)
    trainer.train()
    logged = [entry["epsilon"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and logged[0] < logged[1]
    engine = trainer.privacy_engine
    assert len(engine.accountant) == 2  # one step per logical batch, not per micro-batch
    assert logged[-1] == engine.get_epsilon(DELTA) == trainer.state.log_history[-1]["epsilon"]
    independent = create_accountant("rdp")
    independent.step(noise_multiplier=1.3, sample_rate=6 / N, num_steps=2)
    assert_close(logged[-1], independent.get_epsilon(DELTA), rtol=1e-12)
    assert all(entry["grad_norm"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_gradient_accumulation_adds_noise_once_per_logical_batch(base_model, tmp_path):
    """Two micro-batches of 3 and one of 6: same Poisson batches, same noise, same model."""
    finals = []
    for per_device, accumulation in ((6, 1), (3, 2)):
        model = copy.deepcopy(base_model)
        trainer = _trainer(
            model, tmp_path / str(accumulation), PrivacyArguments(noise_multiplier=2.0),
            noise_generator=torch.Generator().manual_seed(11), max_steps=1, learning_rate=0.1,
            per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        )
        trainer.train()
        assert len(trainer.privacy_engine.accountant) == 1
        finals.append(_params(model))
    start = _params(base_model)
    moved = [f - s for f, s in zip(finals[0], start)]
    assert relative_error([f - s for f, s in zip(finals[1], start)], moved) < 1e-9


def _epsilons(noise: float, steps: int) -> list[float]:
    accountant = create_accountant("rdp")
    out = []
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=6 / N)
        out.append(accountant.get_epsilon(DELTA))
    return out


@pytest.mark.slow
def test_training_stops_before_the_step_that_exceeds_the_budget(base_model, tmp_path):
    eps = _epsilons(2.0, 3)
    stop = (eps[1] + eps[2]) / 2
    trainer = _trainer(copy.deepcopy(base_model), tmp_path,
                       PrivacyArguments(noise_multiplier=2.0, stop_at_epsilon=stop), max_steps=10)
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.get_epsilon() == pytest.approx(eps[1], rel=1e-12) and trainer.get_epsilon() <= stop


def test_a_budget_too_small_for_one_step_is_refused(base_model, tmp_path):
    trainer = _trainer(copy.deepcopy(base_model), tmp_path,
                       PrivacyArguments(noise_multiplier=2.0, stop_at_epsilon=_epsilons(2.0, 1)[0] / 2))
    with pytest.raises(ValueError, match="stop_at_epsilon"):
        trainer.train()
    assert len(trainer.privacy_engine.accountant) == 0


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_the_ledger_and_the_run(base_model, tmp_path):
    def run(model, **kwargs):
        trainer = _trainer(model, tmp_path, PrivacyArguments(noise_multiplier=1.0),
                           noise_generator=torch.Generator().manual_seed(5), max_steps=3,
                           learning_rate=0.1, save_strategy="steps", save_steps=2, **kwargs)
        return trainer

    whole_model = copy.deepcopy(base_model)
    whole = run(whole_model)
    whole.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / PRIVACY_STATE_NAME).is_file()
    resumed_model = copy.deepcopy(base_model)
    resumed = run(resumed_model)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert resumed.privacy_engine.accountant.history == whole.privacy_engine.accountant.history
    assert resumed.get_epsilon() == whole.get_epsilon()
    assert relative_error(_params(resumed_model), _params(whole_model)) < 1e-12


def test_resume_without_the_privacy_state_is_refused(base_model, tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    trainer = _trainer(copy.deepcopy(base_model), tmp_path, PrivacyArguments(noise_multiplier=1.0))
    with pytest.raises(FileNotFoundError, match=PRIVACY_STATE_NAME):
        trainer.load_privacy_state(str(tmp_path / "checkpoint-1"))


def test_logical_batches_split_into_equal_slices():
    batches = [[0, 1, 2, 3, 4], [], [7]]
    assert list(LogicalBatchSplitter(batches, 2)) == [[0, 1, 2], [3, 4], [], [], [7], []]
    assert len(LogicalBatchSplitter(batches, 2)) == 6
    with pytest.raises(ValueError, match="parts"):
        LogicalBatchSplitter(batches, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({}, "exactly one"), ({"noise_multiplier": 1.0, "target_epsilon": 1.0}, "exactly one"),
     ({"noise_multiplier": -1.0}, "noise_multiplier"), ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "max_grad_norm"),
     ({"noise_multiplier": 1.0, "target_delta": 1.0}, "target_delta")],
)
def test_privacy_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacyArguments(**kwargs)


def test_sequence_loss_is_the_mean_over_labelled_tokens():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4], [0, -100, -100, 4]])
    losses = causal_lm_per_example_loss(type("Out", (), {"logits": logits})(), labels)
    token = torch.nn.functional.cross_entropy(logits[1, 2:3], labels[1, 3:4])
    assert_close(float(losses[1]), float(token), rtol=1e-12)
    full = torch.nn.functional.cross_entropy(logits[0, :3], labels[0, 1:])
    assert_close(float(losses[0]), float(full), rtol=1e-12)


def test_example_smoke_run_learns_within_budget(capsys):
    from examples import hf_trainer_lora

    result = hf_trainer_lora.main(["--smoke", "--grad-sample-mode", "hooks"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("dp_torch Trainer + LoRA: loss ") and f"epsilon {result['epsilon']:.2f}" in last
    assert 0 < result["epsilon"] <= 8.0 and result["logged_epsilon"][-1] == result["epsilon"]
    assert result["after"]["loss"] < result["before"]["loss"]
    assert result["after"]["accuracy"] > result["before"]["accuracy"] + 0.05
