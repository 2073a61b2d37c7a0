"""``examples/accelerate_digits.py``: the digits DP-SGD run inside an ``accelerate`` loop."""

from __future__ import annotations

import pytest

pytest.importorskip("accelerate")

from examples import accelerate_digits  # noqa: E402


def test_smoke_run_learns_and_spends_the_budget(capsys):
    result = accelerate_digits.main(["--smoke"])
    assert "accelerate digits: test accuracy" in capsys.readouterr().out
    assert result["accuracy"] > 0.5  # ten classes: chance is 0.1
    assert 2.5 <= result["epsilon"] <= 3.0


@pytest.mark.slow
def test_full_run_reaches_90_percent_at_epsilon_3(capsys):
    result = accelerate_digits.main([])
    capsys.readouterr()
    assert result["accuracy"] >= 0.90 and result["epsilon"] <= 3.0
