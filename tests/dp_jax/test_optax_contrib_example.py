"""``examples/optax_contrib_dropin.py``: optax.contrib's dpsgd loop with the name swapped."""

from __future__ import annotations

import pytest

from examples import optax_contrib_dropin


def test_smoke_run_learns_at_the_calibrated_epsilon(capsys):
    result = optax_contrib_dropin.main(["--smoke"])
    assert "optax.contrib drop-in: test accuracy" in capsys.readouterr().out
    assert result["accuracy"] > 0.5  # ten classes: chance is 0.1
    assert 2.9 <= result["epsilon"] <= 3.0


@pytest.mark.slow
def test_full_run_reaches_90_percent_at_epsilon_3(capsys):
    result = optax_contrib_dropin.main([])
    capsys.readouterr()
    assert result["accuracy"] >= 0.90 and 2.9 <= result["epsilon"] <= 3.0
