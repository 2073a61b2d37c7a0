"""examples/torch_ddp_digits.py: launched with torchrun on 2 processes, and in one process."""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from examples import torch_ddp_digits  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
FINAL_LINE = re.compile(
    r"^dp_torch DDP digits \((\d+) processes\): test accuracy (\d\.\d{3}) at epsilon "
    r"(\d+\.\d{2}) \(delta 1e-05\)$", re.MULTILINE,
)


def test_torchrun_two_processes_smoke():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / "torch_ddp_digits.py"), "--smoke", "--physical-batch", "48"],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = FINAL_LINE.findall(done.stdout)
    assert len(lines) == 1, done.stdout  # printed by rank 0 only
    processes, accuracy, epsilon = lines[0]
    assert processes == "2"
    assert 0.0 <= float(accuracy) <= 1.0
    assert 0.0 < float(epsilon) <= 3.0
    # rank 0's progress bar shows the loss and the epsilon spent
    assert "epsilon=" in done.stderr and "DP-SGD x2" in done.stderr


def test_one_process_without_torchrun(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = torch_ddp_digits.main(["--smoke", "--no-progress"])
    out = capsys.readouterr().out
    match = FINAL_LINE.search(out)
    assert match and match.group(1) == "1"
    assert float(match.group(2)) == pytest.approx(result["accuracy"], abs=5e-4)
    assert math.isfinite(result["epsilon"]) and 0.0 < result["epsilon"] <= 3.0
    assert result["steps"] == torch_ddp_digits.SMOKE_EPOCHS * math.ceil(1437 / 256)


@pytest.mark.parametrize("argv", [["--epsilon", "0"], ["--physical-batch", "0"],
                                  ["--timeout", "-1"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        torch_ddp_digits.main(argv)
    assert argv[0] in capsys.readouterr().err
