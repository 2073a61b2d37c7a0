"""examples/jax_fsdp_lora.py: the smoke run on 4 host devices, and its refusals.

The script runs as a user runs it, in a subprocess (the test process's JAX has one
device); without a device count in ``XLA_FLAGS`` it must ask for 4 host devices itself.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

from examples import jax_fsdp_lora  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "jax_fsdp_lora.py"
HEADER = re.compile(r"^(\d+) devices; (\d+)/(\d+) adapter and (\d+)/(\d+) base arrays split; "
                    r"noise multiplier (\d+\.\d{3}); perplexity (\d+\.\d) \(chain (\d+\.\d)\)$")
EPOCH = re.compile(r"^epoch\s+(\d+)\s+perplexity\s+(\d+\.\d{2})\s+epsilon (\d+\.\d{2})$")
FINAL = re.compile(r"^dp_jax FSDP LoRA \((\d+) devices\): perplexity (\d+\.\d) -> (\d+\.\d) "
                   r"\(chain (\d+\.\d)\) at epsilon (\d+\.\d{2}) \(delta 1e-05\)$")


@pytest.fixture(scope="module")
def smoke_lines() -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # no device count: the script's 4
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def test_smoke_run_splits_the_model_over_four_devices_and_learns(smoke_lines):
    header = HEADER.match(smoke_lines[0])
    assert header, smoke_lines[0]
    devices, split_adapters, adapters, split_base, base = map(int, header.groups()[:5])
    assert devices == 4
    assert split_adapters >= 1 and split_base >= base // 2 and adapters == 28
    epochs = [EPOCH.match(line).groups() for line in smoke_lines[1:-1]]
    assert [int(e) for e, _, _ in epochs] == [1, 2]
    final = FINAL.match(smoke_lines[-1])
    assert final, smoke_lines[-1]
    start, end, floor, epsilon = map(float, final.groups()[1:])
    assert float(header.group(7)) == start
    assert end < 0.9 * start and end > floor  # visibly better, never below the chain itself
    # Calibrated for the smoke run's 2 epochs: the whole budget (8), never more.
    assert 7.9 <= epsilon <= 8.0 and float(epochs[-1][2]) == epsilon
    assert float(epochs[0][2]) < epsilon


def test_markov_tokens_follow_the_chain():
    chain = jax_fsdp_lora.markov_chain(8, seed=0)
    np.testing.assert_allclose(chain.sum(axis=1), 1.0)
    tokens = jax_fsdp_lora.markov_tokens(chain, 4000, 6, seed=1)
    assert tokens.shape == (4000, 6) and tokens.dtype == np.int32
    pairs = np.zeros((8, 8))
    np.add.at(pairs, (tokens[:, :-1].ravel(), tokens[:, 1:].ravel()), 1)
    frequencies = pairs / pairs.sum(axis=1, keepdims=True)
    assert np.max(np.abs(frequencies - chain)) < 0.05  # 20000 transitions
    uniform = np.full((3, 3), 1 / 3)
    assert abs(jax_fsdp_lora.chain_perplexity(uniform) - 3.0) < 1e-9


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--epsilon", "0"], ["--delta", "1"],
                                  ["--batch-size", "0"], ["--lr", "0"], ["--length", "1"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        jax_fsdp_lora.parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {argv[0]} " in err and "is out of range; see --help" in err
