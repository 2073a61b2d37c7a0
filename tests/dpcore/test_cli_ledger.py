"""``dpcore calibrate --target-delta`` and ``dpcore epsilon --ledger``.

Oracle for the ledger: each accountant's own API on the same history; the JSON
numbers must be exactly equal (floats round-trip through JSON bit for bit).
"""

from __future__ import annotations

import json
import re
import warnings

import pytest

from dpcore.accounting import (
    GDPAccountant,
    GDPApproximationWarning,
    PLDAccountant,
    PRVAccountant,
    RDPAccountant,
)
from dpcore.cli import main
from dpcore.ledger import Ledger, save_ledger

DELTA = 1e-5
HISTORY = [(1.1, 0.01, 300), (0.9, 0.02, 100), (1.1, 0.01, 50)]
SCHEDULE = ["--sample-rate", "0.04", "--epochs", "90"]


def _run(argv: list[str], capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def _exits_2(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- calibrate --target-delta
def test_target_delta_is_an_alias_of_delta(capsys) -> None:
    base = ["calibrate", "--target-epsilon", "8", *SCHEDULE]
    by_delta = _run([*base, "--delta", "1e-5"], capsys)
    assert _run([*base, "--target-delta", "1e-5"], capsys) == by_delta
    assert _run([*base, "--delta", "1e-5", "--target-delta", "0.00001"], capsys) == by_delta


def test_conflicting_deltas_are_an_error_naming_both(capsys) -> None:
    err = _exits_2(["calibrate", "--target-epsilon", "8", *SCHEDULE, "--delta", "1e-5",
                    "--target-delta", "1e-6"], capsys)
    assert "--delta 1e-05 and --target-delta 1e-06 disagree" in err


def test_calibrate_needs_a_delta(capsys) -> None:
    err = _exits_2(["calibrate", "--target-epsilon", "8", *SCHEDULE], capsys)
    assert "one of the arguments --delta --target-delta is required" in err


def test_bad_target_delta_is_named(capsys) -> None:
    err = _exits_2(["calibrate", "--target-epsilon", "8", *SCHEDULE, "--target-delta", "2"], capsys)
    assert re.search(r"--target-delta must be in \(0, 1\)", err)


# ---------------------------------------------------------------- epsilon --ledger
def _own_api() -> dict[str, float]:
    """Each accountant's epsilon for HISTORY, through its own class and methods."""
    values = {}
    for kind, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant), ("pld", PLDAccountant),
                      ("gdp", GDPAccountant)):
        accountant = cls()
        for sigma, q, steps in HISTORY:
            accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GDPApproximationWarning)
            values[kind] = accountant.get_epsilon(DELTA)
    return values


@pytest.fixture(scope="module")
def expected() -> dict[str, float]:
    return _own_api()


@pytest.fixture
def ledger_file(tmp_path):
    accountant = RDPAccountant()
    for sigma, q, steps in HISTORY:
        accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    path = tmp_path / "run.json"
    save_ledger(accountant, path)
    return path


def test_ledger_json_equals_every_accountants_own_api(ledger_file, expected, capsys) -> None:
    out = _run(["epsilon", "--ledger", str(ledger_file), "--delta", "1e-5", "--json"], capsys)
    report = json.loads(out)
    assert {k: v["epsilon"] for k, v in report["epsilon"].items()} == expected
    assert report["total_steps"] == 450 and report["mechanism"] == "rdp"
    assert [tuple(e.values()) for e in report["entries"]] == HISTORY


def test_ledger_table_lists_entries_and_accountants(ledger_file, expected, capsys) -> None:
    out = _run(["epsilon", "--ledger", str(ledger_file), "--delta", "1e-5"], capsys)
    assert "3 entries, 450 steps" in out
    assert "noise_multiplier=0.9 sample_rate=0.02 steps=100" in out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
            if line.split()[0] in expected}
    assert rows == {k: round(v, 6) for k, v in expected.items()}


def test_one_accountant_and_a_state_dict_file(tmp_path, expected, capsys) -> None:
    accountant = PRVAccountant()
    accountant.history = HISTORY
    path = tmp_path / "state.json"
    path.write_text(json.dumps(accountant.state_dict()))
    report = json.loads(_run(["epsilon", "--ledger", str(path), "--delta", "1e-5",
                              "--accountant", "pld", "--json"], capsys))
    assert report["epsilon"]["pld"]["epsilon"] == expected["pld"] and report["mechanism"] == "prv"


def test_schedule_json_is_a_one_entry_ledger(capsys) -> None:
    report = json.loads(_run(["epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.01",
                              "--steps", "300", "--delta", "1e-5", "--accountant", "rdp",
                              "--json"], capsys))
    oracle = RDPAccountant()
    oracle.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=300)
    assert report["epsilon"]["rdp"]["epsilon"] == oracle.get_epsilon(DELTA)
    assert report["ledger"] is None and report["total_steps"] == 300


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--steps", "3"], "--ledger replaces the schedule; drop --steps"),
        (["--noise-multiplier", "1", "--epochs", "2"], "drop --noise-multiplier, --epochs"),
    ],
)
def test_ledger_with_schedule_flags_is_refused(ledger_file, extra, match, capsys) -> None:
    assert match in _exits_2(["epsilon", "--ledger", str(ledger_file), "--delta", "1e-5", *extra],
                             capsys)


def test_unreadable_ledger_is_named(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    assert f"--ledger '{bad}' cannot be re-accounted: not a dp-parity ledger" in _exits_2(
        ["epsilon", "--ledger", str(bad), "--delta", "1e-5"], capsys)
    assert "cannot be re-accounted" in _exits_2(
        ["epsilon", "--ledger", str(tmp_path / "missing.json"), "--delta", "1e-5"], capsys)


def test_schedule_without_sigma_names_it(capsys) -> None:
    err = _exits_2(["epsilon", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5"], capsys)
    assert "the following arguments are required: --noise-multiplier" in err


# ---------------------------------------------------------------- ledgers of real runs
def _reaccounted(accountant, tmp_path, capsys) -> dict:
    path = tmp_path / "run.json"
    save_ledger(accountant, path)
    report = json.loads(_run(["epsilon", "--ledger", str(path), "--delta", "1e-5", "--json"],
                             capsys))
    for kind, row in report["epsilon"].items():
        oracle = Ledger.from_accountant(accountant).to_accountant(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GDPApproximationWarning)
            assert row["epsilon"] == oracle.get_epsilon(DELTA)
    return report


def test_ledger_of_a_dp_torch_run(tmp_path, capsys) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    from dp_torch import PrivacyEngine

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    model = torch.nn.Linear(3, 1)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=10), noise_multiplier=1.2, max_grad_norm=1.0)
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    report = _reaccounted(engine.accountant, tmp_path, capsys)
    assert report["entries"] == [{"noise_multiplier": 1.2, "sample_rate": 0.25, "num_steps": 4}]


def test_ledger_of_a_dp_jax_run(tmp_path, capsys) -> None:
    jnp = pytest.importorskip("jax.numpy")
    import numpy as np
    import optax

    from dp_jax import PrivacyEngine

    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(40, 3)).astype(np.float32),
            "y": rng.normal(size=40).astype(np.float32)}

    def loss(params, example):
        return (jnp.dot(example["x"], params["w"]) - example["y"]) ** 2

    engine = PrivacyEngine()
    private = engine.make_private(
        loss_fn=loss, params={"w": jnp.zeros(3, jnp.float32)}, optimizer=optax.sgd(0.1),
        data=data, sample_rate=0.25, noise_multiplier=1.25, max_grad_norm=1.0, seed=0)
    state = private.state
    for k, logical in zip(range(3), private.batches):
        state, _ = private.train_logical_step(state, logical)
    report = _reaccounted(engine.accountant, tmp_path, capsys)
    assert report["entries"] == [{"noise_multiplier": 1.25, "sample_rate": 0.25, "num_steps": 3}]
