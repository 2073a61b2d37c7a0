"""The README's main job runs end to end (smoke size)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_demo_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--smoke"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "privacy plan (dpcore)" in out and "calibrated noise multiplier" in out
    for kind in ("rdp", "prv", "pld", "gdp"):
        assert f"   {kind}" in out
    assert "dp_torch digits: test accuracy" in out
    assert "dp_jax digits: test accuracy" in out
    assert "PyTorch (dp_torch)" in out and "JAX (dp_jax)" in out
    assert "== parity (conformance, MLP, float64)" in out and "all pass" in out
