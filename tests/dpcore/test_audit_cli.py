"""``dpcore audit``: runs both backends' canary audits as subprocesses and reports them."""

from __future__ import annotations

import json

import pytest

from dpcore import cli
from dpcore._audit_run import audit_backends, format_reports

TINY = ["--noise-multiplier", "1.0", "--sample-rate", "0.1", "--steps", "10", "--num-canaries", "100",
        "--trials", "400", "--seed", "0"]


def test_audit_runs_both_backends_on_a_tiny_setup(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["audit", *TINY]) == 0
    out = capsys.readouterr().out
    for backend in ("torch", "jax"):
        assert f"{backend}: no evidence against the claim" in out
        assert sum(line.startswith(backend) and " step " in line for line in out.splitlines()) == 5
        assert sum(line.startswith(backend) and " run " in line for line in out.splitlines()) == 5
    assert "lower bound on epsilon" in out


def test_audit_json_holds_each_backend_report(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["audit", "--backend", "torch", "--json", *TINY]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert list(reports) == ["torch"]
    part = reports["torch"]["run"]
    assert len(part["deltas"]) == len(part["claimed_epsilons"]) == len(part["audited_epsilons"])
    assert all(a <= c for a, c in zip(part["audited_epsilons"], part["claimed_epsilons"]))


def test_format_reports_shows_a_flagged_backend() -> None:
    report = {"flagged": True, "step": {"deltas": [1e-5], "claimed_epsilon": [1.0], "audited_epsilon": [3.0],
                                        "flagged": True, "reasons": ["noise std 0.0 (expected 1.0)"]}}
    text = format_reports({"jax": report})
    assert "jax     step  1e-05" in text and "3.000" in text
    assert "jax: FLAGGED: noise std 0.0 (expected 1.0)" in text


@pytest.mark.parametrize("bad", [["--backend", "tf"], ["--noise-multiplier", "0"], ["--sample-rate", "2"],
                                 ["--steps", "0"]])
def test_bad_arguments_exit_2_naming_the_flag(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", *bad])
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_unknown_backend_in_python_api_raises() -> None:
    with pytest.raises(ValueError, match="backends"):
        audit_backends(("tensorflow",), noise_multiplier=1.0)
