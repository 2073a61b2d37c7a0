"""The public argument checks of dpcore.checks and their compatibility path."""

import pytest

from dpcore import checks


def test_checks_return_normalised_values():
    assert checks.check_num_steps(3.0) == 3
    assert checks.check_sample_rate(1) == 1.0
    assert checks.check_int(2, "n", minimum=1) == 2
    assert checks.check_choice("rdp", "accountant", ("rdp", "prv")) == "rdp"


@pytest.mark.parametrize(
    ("check", "value", "error"),
    [
        (checks.check_sample_rate, 0.0, ValueError),
        (checks.check_delta, 1.0, ValueError),
        (checks.check_noise_multiplier, -1.0, ValueError),
        (checks.check_noise_multiplier, True, TypeError),
        (checks.check_num_steps, 1.5, TypeError),
    ],
)
def test_checks_refuse_bad_values(check, value, error):
    with pytest.raises(error, match="got"):
        check(value)


def test_bool_int_and_choice_name_the_argument():
    with pytest.raises(TypeError, match="flag"):
        checks.check_bool(1, "flag")
    with pytest.raises(ValueError, match="steps"):
        checks.check_int(-1, "steps")
    with pytest.raises(ValueError, match="hint text"):
        checks.check_choice("x", "mode", ("a",), " hint text")

