"""examples/jax_sharded_digits.py: smoke run on 4 host devices, the accuracy target, and
the same run split over two processes.

The script runs as a user runs it, in a subprocess (the test process's JAX already has
one device); without ``XLA_FLAGS`` it must ask for 4 host devices itself.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("sklearn")

from examples import jax_sharded_digits  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "jax_sharded_digits.py"
FINAL_LINE = re.compile(
    r"^dp_jax sharded digits \((\d+) devices\): test accuracy (\d\.\d{3}) at epsilon "
    r"(\d+\.\d{2}) \(delta 1e-05\)$"
)
EPOCH_LINE = re.compile(r"^epoch\s+(\d+)\s+loss (\d+\.\d{3})\s+epsilon (\d+\.\d{2})$")
TIMEOUT = 300


FAST = "--xla_backend_optimization_level=0"  # about half the compile time


def _env(xla_flags: str = FAST) -> dict[str, str]:
    """The environment of a run; ``XLA_FLAGS`` sets no device count unless asked to."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"  # the 4 host devices, even where a GPU is visible
    env["XLA_FLAGS"] = xla_flags
    return env


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env or _env(), cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _parse(stdout: str) -> tuple[tuple[int, float, float], list[tuple[int, float, float]]]:
    lines = [line for line in stdout.strip().splitlines() if not line.startswith("[Gloo]")]
    final = FINAL_LINE.match(lines[-1])
    assert final, f"unexpected last line: {lines[-1]!r}"
    epochs = [m.groups() for m in map(EPOCH_LINE.match, lines) if m]
    return ((int(final.group(1)), float(final.group(2)), float(final.group(3))),
            [(int(e), float(loss), float(eps)) for e, loss, eps in epochs])


@pytest.fixture(scope="module")
def smoke():
    return _parse(_run("--smoke").stdout)


def test_smoke_run_uses_four_host_devices_and_spends_the_budget(smoke):
    (devices, accuracy, epsilon), epochs = smoke
    assert devices == 4  # XLA_FLAGS set no count: the script asked for 4 host devices
    assert 0.0 <= accuracy <= 1.0
    # Calibrated for the smoke run's 2 epochs: all of the budget, never more.
    assert 2.9 <= epsilon <= 3.0
    assert [e for e, _, _ in epochs] == [1, 2]
    assert epochs[0][2] < epochs[1][2] == epsilon  # epsilon grows with the steps
    assert all(loss > 0 for _, loss, _ in epochs)


@pytest.mark.slow
def test_existing_device_count_is_respected():
    done = _run("--smoke", "--devices", "2",
                env=_env(f"{FAST} --xla_force_host_platform_device_count=3"))
    (devices, _, _), _ = _parse(done.stdout)
    assert devices == 2
    assert "3 devices" not in done.stdout


@pytest.mark.parametrize(
    "argv", [["--epsilon", "-1"], ["--epochs", "0"], ["--batch-size", "5000"], ["--lr", "0"],
             ["--devices", "0"], ["--num-processes", "2"], ["--process-id", "1"],
             ["--coordinator", "127.0.0.1:1"]]
)
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        jax_sharded_digits.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(smoke, tmp_path):
    """2 processes x 2 host devices: the 4-device run, batch indices from process 0."""
    port = str(_free_port())
    env = _env(f"{FAST} --xla_force_host_platform_device_count=2")
    common = ["--smoke", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    with open(tmp_path / "p1.log", "w", encoding="utf-8") as log:
        other = subprocess.Popen([sys.executable, str(SCRIPT), *common, "--process-id", "1"],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            lead = subprocess.run([sys.executable, str(SCRIPT), *common, "--process-id", "0"],
                                  capture_output=True, text=True, timeout=TIMEOUT, env=env,
                                  cwd=ROOT, check=False)
            assert other.wait(timeout=60) == 0
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()
    assert lead.returncode == 0, lead.stderr[-3000:]
    (devices, accuracy, epsilon), epochs = _parse(lead.stdout)
    (_, smoke_accuracy, smoke_epsilon), smoke_epochs = smoke
    assert devices == 4 and epsilon == smoke_epsilon
    # Same batches, same key, same mesh size: the same training up to the order of the
    # float32 all-reduce (gloo across processes, in-process otherwise).
    assert abs(accuracy - smoke_accuracy) <= 2 / 360
    for (_, loss, eps), (_, smoke_loss, smoke_eps) in zip(epochs, smoke_epochs, strict=True):
        assert abs(loss - smoke_loss) <= 2e-3 and eps == smoke_eps
    assert "dp_jax sharded digits" not in (tmp_path / "p1.log").read_text(encoding="utf-8")


@pytest.mark.slow
def test_full_run_reaches_90_percent_at_epsilon_3():
    (devices, accuracy, epsilon), _ = _parse(_run().stdout)
    assert devices == 4
    assert accuracy >= 0.90
    assert 2.9 <= epsilon <= 3.0
