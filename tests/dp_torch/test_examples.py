"""The runnable dp_torch examples: a quick smoke run and the full accuracy target."""

from __future__ import annotations

import math
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from examples import torch_digits  # noqa: E402

FINAL_LINE = re.compile(
    r"^dp_torch digits: test accuracy (\d\.\d{3}) at epsilon (\d+\.\d{2}) \(delta 1e-05\)$"
)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_smoke_run_prints_result_line_and_returns_figures(capsys):
    result = torch_digits.main(["--smoke"])
    out, err = capsys.readouterr()
    match = FINAL_LINE.match(_last_line(out))
    assert match, f"unexpected last line: {_last_line(out)!r}"
    assert 0.0 <= result["accuracy"] <= 1.0
    assert math.isfinite(result["epsilon"]) and 0.0 < result["epsilon"] <= 3.0
    assert float(match.group(1)) == pytest.approx(result["accuracy"], abs=5e-4)
    assert float(match.group(2)) == pytest.approx(result["epsilon"], abs=5e-3)
    assert result["epochs"] == torch_digits.SMOKE_EPOCHS
    # The progress bar (stderr) shows the loss and the epsilon spent.
    assert "epsilon=" in err and "loss=" in err


def test_same_seed_same_result_and_state_restored(capsys):
    import torch

    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    first = torch_digits.main(["--smoke", "--no-progress", "--seed", "5", "--threads", "1"])
    second = torch_digits.main(["--smoke", "--no-progress", "--seed", "5", "--threads", "1"])
    capsys.readouterr()
    assert first["accuracy"] == second["accuracy"]
    assert first["train_loss"] == second["train_loss"]
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng_state)


@pytest.mark.parametrize(
    "argv", [["--epsilon", "-1"], ["--epochs", "0"], ["--batch-size", "5000"], ["--lr", "0"]]
)
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        torch_digits.main(argv)
    assert argv[0] in capsys.readouterr().err


@pytest.mark.slow
def test_full_run_reaches_90_percent_at_epsilon_3(capsys):
    result = torch_digits.main(["--no-progress"])
    capsys.readouterr()
    assert result["accuracy"] >= 0.90
    # Calibrated to the target: at most 3, and not wastefully below it.
    assert 2.9 <= result["epsilon"] <= 3.0
