"""Rot check for benchmarks/torch_step.py: tiny sizes, one step, run as a user would."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "torch_step.py"
MODES = ("nonprivate", "dp_torch-hooks", "dp_torch-ghost", "opacus-hooks", "opacus-ghost")
MODELS = ("mlp", "cnn", "lstm", "transformer")


def _run(tmp_path: pathlib.Path, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--json", str(out), *flags],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8")), done.stdout


def _opacus_importable() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_model_and_mode_steps(tmp_path):
    result, stdout = _run(tmp_path, "--no-memory")
    rows = {(row["model"], row["mode"]): row for row in result["results"]}
    modes = MODES if _opacus_importable() else MODES[:3]
    assert set(rows) == {(model, mode) for model in MODELS for mode in modes}
    for (model, mode), row in rows.items():
        assert "error" not in row, f"{model}/{mode}: {row.get('error')}"
        assert row["batch"] == 2 and len(row["step_ms"]) == 1
        assert 0 < row["median_ms"] < 60_000
        if mode != "nonprivate":
            assert row["vs_nonprivate"] == pytest.approx(
                row["median_ms"] / rows[(model, "nonprivate")]["median_ms"])
    # The time table has one line per model; without memory figures there is no memory table.
    assert stdout.count("| MLP 784-512-512-10 | 2 |") == 1
    assert stdout.count("| transformer, d 256, 4 layers, seq 8 | 2 |") == 1
    assert "MiB" not in stdout
    assert result["table"] in stdout


def test_memory_is_measured_in_a_subprocess(tmp_path):
    result, stdout = _run(tmp_path, "--models", "mlp", "--modes", "dp_torch-hooks")
    (row,) = result["results"]
    assert row["memory_kind"] in ("rss-growth", "maxrss-growth (lower bound)")
    assert 0 <= row["peak_mib"] < 4096
    assert f"| mlp | {row['peak_mib']:.0f} |" in stdout


def test_unknown_model_is_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "resnet"], capture_output=True, text=True,
        timeout=60, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 2 and "--models got 'resnet'" in done.stderr
