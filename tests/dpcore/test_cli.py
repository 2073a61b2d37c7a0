"""The dpcore command line: tables, calibration, plots and argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpcore.cli import main


def test_epsilon_table(capsys) -> None:
    assert main(["epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.004",
                 "--steps", "14000", "--delta", "1e-5", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    assert "steps=14000" in out
    row = next(line for line in out.splitlines() if line.startswith("rdp"))
    assert "best alpha" in row and float(row.split()[1]) > 2.0


def test_epsilon_all_accountants(capsys) -> None:
    assert main(["epsilon", "--noise-multiplier", "1.0", "--sample-rate", "0.01",
                 "--steps", "1000", "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    values = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[2:]}
    assert set(values) == {"rdp", "prv", "pld", "gdp"}
    assert round(values["rdp"], 4) == 2.1014 and values["pld"] < values["rdp"]
    assert "may under-report" in out


def test_epochs_become_steps(capsys) -> None:
    main(["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.04", "--epochs", "90",
          "--delta", "1e-5", "--accountant", "rdp"])
    assert "steps=2250" in capsys.readouterr().out


def test_calibrate(capsys) -> None:
    assert main(["calibrate", "--target-epsilon", "8", "--delta", "1e-5", "--sample-rate",
                 "0.04", "--epochs", "90"]) == 0
    assert round(float(capsys.readouterr().out), 3) == 1.416


def test_plot_writes_an_image(tmp_path, capsys) -> None:
    out = tmp_path / "curve.png"
    assert main(["plot", "--noise-multiplier", "1.1", "--sample-rate", "0.01", "--epochs", "5",
                 "--delta", "1e-5", "--points", "5", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["epsilon", "--noise-multiplier", "-1", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5"],
         "--noise-multiplier must be a number > 0, got '-1'"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "2", "--steps", "3", "--delta", "1e-5"],
         r"--sample-rate must be in \(0, 1\], got '2'"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "2.5", "--delta", "1e-5"],
         "--steps must be a whole number >= 1, got '2.5'"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "3", "--delta", "x"],
         "--delta must be a number, got 'x'"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--delta", "1e-5"],
         "one of the arguments --steps --epochs is required"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5",
          "--accountant", "foo"], "--accountant: invalid choice: 'foo'"),
        (["calibrate", "--target-epsilon", "0.1", "--delta", "1e-10", "--sample-rate", "1", "--steps", "10"],
         "target_epsilon=0.1 is unreachable"),
    ],
)
def test_bad_arguments_exit_2_naming_them(argv: list[str], match: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("command", [[], ["epsilon"], ["calibrate"], ["plot"]])
def test_help(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "dpcore", *command, "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: dpcore" in result.stdout
