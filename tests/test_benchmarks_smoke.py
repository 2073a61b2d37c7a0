"""Rot checks for benchmarks/torch_step.py and benchmarks/gpu.sh: tiny sizes, run as a user would."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from benchmarks import _timing  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "torch_step.py"
MODES = ("nonprivate", "dp_torch-hooks", "dp_torch-ghost", "opacus-hooks", "opacus-ghost")
MODELS = ("mlp", "cnn", "lstm", "transformer")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")])))


def _run(tmp_path: pathlib.Path, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--json", str(out), *flags],
        capture_output=True, text=True, timeout=240, env=_env(), check=False,
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
    result, stdout = _run(tmp_path, "--no-memory", "--models", ",".join(MODELS))
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
    assert stdout.count("| MLP 784-512-512-10 | 2 | fp32 |") == 1
    assert stdout.count("| transformer, d 256, 4 layers, seq 8 | 2 | fp32 |") == 1
    assert "MiB" not in stdout
    assert result["table"] in stdout


def test_memory_is_measured_in_a_subprocess(tmp_path):
    result, stdout = _run(tmp_path, "--models", "mlp", "--modes", "dp_torch-hooks")
    (row,) = result["results"]
    assert row["memory_kind"] in ("rss-growth", "maxrss-growth (lower bound)")
    assert 0 <= row["peak_mib"] < 4096
    assert f" ms, {row['peak_mib']:.0f} MiB |" in stdout


def test_unknown_model_is_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "resnet"], capture_output=True, text=True,
        timeout=60, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 2 and "--models got 'resnet'" in done.stderr


def _opacus_ghost_refuses_tied_weights(row: dict) -> bool:
    return row["mode"] == "opacus-ghost" and "tying" in row.get("error", "")


def test_gpt2_steps_in_both_precisions(tmp_path):
    modes = ("nonprivate", "dp_torch-hooks", "dp_torch-ghost") + (
        ("opacus-ghost",) if _opacus_importable() else ())
    result, stdout = _run(tmp_path, "--no-memory", "--models", "gpt2", "--bf16",
                          "--modes", ",".join(modes))
    rows = {(r["model"], r["precision"], r["mode"]): r for r in result["results"]}
    assert set(rows) == {("gpt2", p, mode) for p in ("fp32", "bf16") for mode in modes}
    assert rows[("gpt2", "fp32", "nonprivate")]["params"] == 5_240_320
    for key, row in rows.items():
        if not _opacus_ghost_refuses_tied_weights(row):
            assert "error" not in row, f"{key}: {row.get('error')}"
            continue
        # Opacus cannot run GPT-2's tied head in ghost mode: the reason is printed.
        assert f"- gpt2 {row['precision']} opacus-ghost (step): {row['error']}" in stdout
    for (model, precision, mode), row in rows.items():  # ratios within one precision
        if mode != "nonprivate" and "median_ms" in row:
            base = rows[(model, precision, "nonprivate")]["median_ms"]
            assert row["vs_nonprivate"] == pytest.approx(row["median_ms"] / base)
    assert stdout.count("| GPT-2 LM, d 256, 4 layers, seq 8 | 2 | bf16 |") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_and_memory(tmp_path):
    result, stdout = _run(tmp_path, "--device", "cuda", "--models", "mlp,gpt2", "--bf16",
                          "--modes", "nonprivate,dp_torch-hooks,dp_torch-ghost")
    assert result["environment"]["gpu"]
    for row in result["results"]:
        assert "error" not in row, row.get("error")
        assert row["memory_kind"] == "cuda-peak" and row["peak_mib"] > 0


def test_cuda_without_a_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True,
                          text=True, timeout=60, check=False, env=_env())
    assert done.returncode == 2 and "torch.cuda.is_available() is False" in done.stderr


def test_precision_options():
    from benchmarks import torch_step

    assert _timing.precisions(torch_step.parse_args([])) == ["fp32"]
    assert _timing.precisions(torch_step.parse_args(["--bf16"])) == ["fp32", "bf16"]
    assert _timing.precisions(torch_step.parse_args(["--precision", "bf16"])) == ["bf16"]
    with pytest.raises(SystemExit):
        torch_step.parse_args(["--precision", "fp16"])


def _row(precision: str, mode: str, ms: float, **extra) -> dict:
    return {"model": "mlp", "mode": mode, "precision": precision, "title": "MLP",
            "seq_len": None, "batch": 8, "median_ms": ms, **extra}


def test_report_merges_runs_and_keeps_precisions_apart(tmp_path, capsys):
    first = [_row("fp32", "nonprivate", 2.0, peak_mib=10.0),
             _row("fp32", "dp_torch-ghost", 3.0, vs_nonprivate=1.5, peak_mib=20.4)]
    second = [_row("bf16", "nonprivate", 1.0),
              {**_row("bf16", "dp_torch-ghost", 0.0), "error": "ValueError: boom"}]
    del second[1]["median_ms"]
    for name, rows in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps({"results": rows}), encoding="utf-8")
    from benchmarks import torch_step

    out = torch_step.main(["--report", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                           str(tmp_path / "missing.json")])
    lines = out["table"].splitlines()
    assert lines[0].startswith("| model | batch | dtype | nonprivate | dp_torch-ghost |")
    assert lines[2] == "| MLP | 8 | fp32 | 2.00 ms, 10 MiB | 3.00 ms (1.5x), 20 MiB | - |"
    assert lines[3] == "| MLP | 8 | bf16 | 1.00 ms | fails | - |"
    assert lines[-1] == "- mlp bf16 dp_torch-ghost (step): ValueError: boom"
    assert "skipping" in capsys.readouterr().err


def test_gpu_script_dry_run_exercises_every_line(tmp_path):
    pytest.importorskip("jax")
    env = dict(_env(), PYTHON=sys.executable, GPU_SH_MODELS="mlp",
               GPU_SH_TORCH_MODES="nonprivate,dp_torch-ghost", GPU_SH_JAX_MODES="nonprivate")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run",
                           str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "skipped.txt").exists(), (tmp_path / "skipped.txt").read_text()
    environment = (tmp_path / "environment.txt").read_text(encoding="utf-8")
    assert "torch " in environment and "jax " in environment
    for name in ("torch_step.md", "jax_step.md"):
        table = (tmp_path / name).read_text(encoding="utf-8")
        assert "| MLP 784-512-512-10 | 2 | fp32 |" in table
        assert "| MLP 784-512-512-10 | 2 | bf16 |" in table
        assert table in done.stdout
    for name, count in (("torch_mlp.json", 4), ("jax_mlp.json", 2)):
        rows = json.loads((tmp_path / name).read_text(encoding="utf-8"))["results"]
        assert len(rows) == count and all("error" not in row for row in rows)


def test_gpu_script_skips_without_python(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, PYTHON=str(tmp_path / "no-python")))
    assert done.returncode == 0 and "skipping" in done.stderr
    assert not any(tmp_path.iterdir())
