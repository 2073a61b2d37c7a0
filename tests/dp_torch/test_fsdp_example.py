"""examples/torch_fsdp_lora.py under torchrun (2 processes) and benchmarks/fsdp.py, run as a user would."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[2]
FINAL_LINE = re.compile(
    r"^dp_torch FSDP2 \+ LoRA \((\d+) processes\): loss (\d+\.\d\d) -> (\d+\.\d\d), accuracy "
    r"(\d\.\d{3}) -> (\d\.\d{3}) at epsilon (\d+\.\d\d) \(delta 1e-05\)$", re.MULTILINE)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_torchrun_two_processes_smoke() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / "torch_fsdp_lora.py"), "--smoke", "--physical-batch", "16"],
        capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = FINAL_LINE.findall(done.stdout)
    assert len(lines) == 1, done.stdout  # rank 0 only
    processes, loss_before, loss_after, _, _, epsilon = lines[0]
    assert processes == "2"
    assert float(loss_after) < float(loss_before)
    assert 0.0 < float(epsilon) <= 8.0
    assert "epoch 2: epsilon" in done.stdout


def test_bad_arguments_are_refused(capsys) -> None:
    from examples import torch_fsdp_lora

    with pytest.raises(SystemExit):
        torch_fsdp_lora.parse_args(["--physical-batch", "0"])
    assert "--physical-batch got 0" in capsys.readouterr().err


def test_fsdp_benchmark_smoke(tmp_path) -> None:
    out = tmp_path / "fsdp.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, env=_env(), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert {(r["mode"], r["world_size"]) for r in rows} == {(m, w) for m in ("nonprivate", "ghost_fsdp")
                                                            for w in (1, 2)}
    for row in rows:
        assert row["step_ms"] > 0 and row["peak_mib_per_rank"] >= 0 and len(row["peaks_mib"]) == row["world_size"]
        assert ("dp_vs_nonprivate" in row) == (row["mode"] == "ghost_fsdp")
