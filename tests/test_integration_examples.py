"""The integration examples: an ``accelerate`` loop and optax.contrib's loop with dp_jax's name.

``examples/accelerate_digits.py`` (dp_torch) and ``examples/optax_contrib_dropin.py``
(dp_jax) both train on the digits at epsilon 3: the smoke run must learn (chance is 0.1) and
spend a calibrated budget; the full run must reach 90 %.
"""

from __future__ import annotations

import importlib

import pytest

#: (example module, start of its result line, needed package).
EXAMPLES = [
    ("accelerate_digits", "accelerate digits: test accuracy", "accelerate"),
    ("optax_contrib_dropin", "optax.contrib drop-in: test accuracy", "optax"),
]


def _example(name: str, needs: str):
    pytest.importorskip(needs)
    return importlib.import_module(f"examples.{name}")


@pytest.mark.parametrize(("name", "line", "needs"), EXAMPLES)
def test_smoke_run_learns_at_the_calibrated_epsilon(name, line, needs, capsys):
    result = _example(name, needs).main(["--smoke"])
    assert line in capsys.readouterr().out
    assert result["accuracy"] > 0.5
    assert 2.5 <= result["epsilon"] <= 3.0


@pytest.mark.slow
@pytest.mark.parametrize(("name", "line", "needs"), EXAMPLES)
def test_full_run_reaches_90_percent_at_epsilon_3(name, line, needs, capsys):
    result = _example(name, needs).main([])
    capsys.readouterr()
    assert result["accuracy"] >= 0.90 and result["epsilon"] <= 3.0
