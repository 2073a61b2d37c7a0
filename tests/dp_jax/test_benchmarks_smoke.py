"""Rot checks for benchmarks/jax_step.py and benchmarks/models_flax.py.

The benchmark runs as a user would run it (a subprocess, ``--smoke``: tiny sizes, one
step). The flax models are checked against their PyTorch twins of
``benchmarks/models.py``: the same parameter counts and, with the weights converted, the
same logits.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import jax_step, models_flax  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "jax_step.py"
MODELS = ("mlp", "cnn", "lstm", "transformer")
MODES = ("nonprivate", "dp_jax", "dp_jax-ghost", "dp_jax-sgd", "optax-contrib")
PARAMS = {"mlp": 669_706, "cnn": 390_986, "lstm": 1_419_778, "transformer": 5_240_834,
          "transformer-768": 34_596_866, "gpt2": 5_240_320}


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # LLVM's optimisation level 0 cuts the compile time of the 16 tiny steps by about 3x;
    # a rot check does not care how fast the compiled code is.
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                   "--xla_backend_optimization_level=0"]))
    return dict(os.environ, PYTHONPATH=path, XLA_FLAGS=flags)


def test_every_model_and_mode_steps(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--models", ",".join(MODELS)],
        capture_output=True, text=True, timeout=240, env=_env(), check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    rows = {(row["model"], row["mode"]): row for row in result["results"]}
    assert set(rows) == {(model, mode) for model in MODELS for mode in MODES}
    for (model, mode), row in rows.items():
        assert "error" not in row, f"{model}/{mode}: {row.get('error')}"
        assert row["batch"] == 2 and len(row["step_ms"]) == 1
        assert 0 < row["median_ms"] < 60_000 and row["compile_s"] > 0
        assert row["memory_kind"] == "xla-plan" and row["peak_mib"] == row["plan_mib"] > 0
        # The smoke transformer's position table has 8 rows instead of 128.
        expected = PARAMS[model] - (120 * 256 if model == "transformer" else 0)
        if mode in MODES:
            assert row["params"] == expected
        if mode != "nonprivate":
            assert row["vs_nonprivate"] == pytest.approx(
                row["median_ms"] / rows[(model, "nonprivate")]["median_ms"])
        if mode.startswith("dp_jax"):
            assert row["vs_optax_contrib"] == pytest.approx(
                row["median_ms"] / rows[(model, "optax-contrib")]["median_ms"])
    assert rows[("transformer", "dp_jax")]["seq_len"] == 8
    assert rows[("lstm", "dp_jax")]["seq_len"] == 4
    assert result["environment"]["backend"] in ("cpu", "gpu", "cuda", "rocm", "tpu")
    assert result["environment"]["x64"] is False
    # The table is printed, one line per model.
    assert done.stdout.count("| MLP 784-512-512-10 | 2 | fp32 |") == 1
    assert done.stdout.count("| transformer, d 256, 4 layers, seq 8 | 2 | fp32 |") == 1
    assert result["table"] in done.stdout


def test_unknown_model_is_refused():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "resnet"], capture_output=True, text=True,
        timeout=60, check=False, env=_env(),
    )
    assert done.returncode == 2 and "--models got 'resnet'" in done.stderr


def test_microbatch_needs_profile(capsys):
    with pytest.raises(SystemExit):
        jax_step.parse_args(["--microbatch", "4"])
    assert "--microbatch 4 needs --profile" in capsys.readouterr().err


def test_markdown_table_shows_ratios():
    rows = [
        {"model": "mlp", "mode": "nonprivate", "title": "MLP", "seq_len": None, "batch": 8,
         "median_ms": 2.0},
        {"model": "mlp", "mode": "dp_jax", "title": "MLP", "seq_len": None, "batch": 8,
         "median_ms": 5.0, "vs_nonprivate": 2.5, "vs_optax_contrib": 1.25},
        {"model": "mlp", "mode": "optax-contrib", "title": "MLP", "seq_len": None, "batch": 8,
         "median_ms": 4.0, "vs_nonprivate": 2.0},
        {"model": "mlp", "mode": "dp_jax-sgd", "title": "MLP", "seq_len": None, "batch": 8,
         "error": "ValueError: boom"},
        {"model": "mlp", "mode": "dp_jax-ghost", "title": "MLP", "seq_len": None, "batch": 8,
         "median_ms": 3.0, "vs_nonprivate": 1.5, "vs_optax_contrib": 0.75},
    ]
    table = jax_step.markdown_table(rows, MODES).splitlines()
    assert table[0] == ("| model | batch | dtype | nonprivate | dp_jax | dp_jax-ghost | dp_jax-sgd | "
                        "optax-contrib | dp_jax / optax-contrib | dp_jax-ghost / optax-contrib | "
                        "dp_jax-sgd / optax-contrib |")
    assert table[2] == ("| MLP | 8 | fp32 | 2.00 ms | 5.00 ms (2.5x) | 3.00 ms (1.5x) | fails | "
                        "4.00 ms (2.0x) | 1.25 | 0.75 | - |")
    assert table[-1] == "- mlp fp32 dp_jax-sgd (step): ValueError: boom"


@pytest.mark.parametrize("name", tuple(PARAMS))
def test_flax_models_have_the_reference_parameter_counts(name):
    params = jax.eval_shape(lambda: models_flax.init_params(name))  # shapes only
    assert models_flax.count_parameters(params) == PARAMS[name]
    x, y = models_flax.make_batch(name, 3)
    lm = name in models_flax.LANGUAGE_MODELS
    for dtype in (jnp.float32, jnp.bfloat16):
        module = models_flax.build_model(name, dtype=dtype)
        out = jax.eval_shape(module.apply, {"params": params}, x)
        classes = models_flax.SPECS[name].num_classes
        assert out.shape == ((3, 128, classes) if lm else (3, classes)) and out.dtype == dtype
    assert y.shape == ((3, 128) if lm else (3,)) and y.dtype == np.int32
    if lm:  # the next token at every position
        assert np.array_equal(y[:, :-1], x[:, 1:])


# ------------------------------------------------------------------ twins of the torch models


def _t(tensor) -> np.ndarray:
    return tensor.detach().numpy().astype(np.float32)


def _dense(layer) -> dict[str, np.ndarray]:
    return {"kernel": _t(layer.weight).T, "bias": _t(layer.bias)}


def _norm(layer) -> dict[str, np.ndarray]:
    return {"scale": _t(layer.weight), "bias": _t(layer.bias)}


def _convert(name: str, model) -> dict:
    """Flax params holding the torch model's weights (kernels transposed, HWIO convs)."""
    if name == "mlp":
        return {f"fc{i}": _dense(getattr(model, f"fc{i}")) for i in (1, 2, 3)}
    if name == "cnn":
        convs = {f"conv{i}": {"kernel": _t(getattr(model, f"conv{i}").weight).transpose(2, 3, 1, 0),
                              "bias": _t(getattr(model, f"conv{i}").bias)} for i in (1, 2, 3, 4)}
        return {**convs, "fc": _dense(model.fc)}
    if name == "lstm":
        lstm = model.lstm
        return {
            "embedding": {"embedding": _t(model.embedding.weight)},
            "lstm": {"kernel_ih": _t(lstm.weight_ih_l0).T, "bias_ih": _t(lstm.bias_ih_l0),
                     "kernel_hh": _t(lstm.weight_hh_l0).T, "bias_hh": _t(lstm.bias_hh_l0)},
            "fc": _dense(model.fc),
        }
    if name == "gpt2":
        return _convert_gpt2(model.gpt2.transformer)
    blocks = {
        f"block{i}": {"ln1": _norm(b.ln1), "qkv": _dense(b.qkv), "proj": _dense(b.proj),
                      "ln2": _norm(b.ln2), "fc1": _dense(b.fc1), "fc2": _dense(b.fc2)}
        for i, b in enumerate(model.blocks)
    }
    return {"tokens": {"embedding": _t(model.tokens.weight)},
            "positions": {"embedding": _t(model.positions.weight)},
            **blocks, "ln": _norm(model.ln), "head": _dense(model.head)}


def _conv1d(layer) -> dict[str, np.ndarray]:
    """transformers' Conv1D keeps its weight as ``[in, out]``, flax's kernel layout."""
    return {"kernel": _t(layer.weight), "bias": _t(layer.bias)}


def _convert_gpt2(body) -> dict:
    blocks = {
        f"h{i}": {"ln1": _norm(b.ln_1), "qkv": _conv1d(b.attn.c_attn),
                  "proj": _conv1d(b.attn.c_proj), "ln2": _norm(b.ln_2),
                  "fc1": _conv1d(b.mlp.c_fc), "fc2": _conv1d(b.mlp.c_proj)}
        for i, b in enumerate(body.h)
    }
    return {"wte": {"embedding": _t(body.wte.weight)}, "wpe": {"embedding": _t(body.wpe.weight)},
            **blocks, "ln_f": _norm(body.ln_f)}


@pytest.mark.parametrize("name", MODELS + ("gpt2",))
def test_flax_models_compute_what_the_torch_models_compute(name):
    torch = pytest.importorskip("torch")
    if name == "gpt2":
        pytest.importorskip("transformers")
    from benchmarks import models as torch_models

    seq = {"lstm": 6, "transformer": 16, "gpt2": 16}.get(name)
    torch.manual_seed(0)
    model = torch_models.build_model(name, seq_len=seq)
    if name == "transformer":  # tiny embeddings: the first LayerNorm's epsilon (1e-5) matters
        with torch.no_grad():
            model.tokens.weight.mul_(1e-3)
            model.positions.weight.mul_(1e-3)
    inputs, _ = torch_models.make_batch(name, 3, seq_len=seq,
                                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(inputs).numpy()
    params = _convert(name, model)
    flax_params = models_flax.init_params(name, seq_len=seq)
    # Same tree and shapes as the flax model's own parameters.
    assert {k: np.shape(v) for k, v in _flat(params).items()} == {
        k: np.shape(v) for k, v in _flat(flax_params).items()}
    x = inputs.numpy()
    if name == "cnn":
        x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    elif seq is not None:
        x = x.astype(np.int32)  # token ids
    module = models_flax.build_model(name, seq_len=seq)
    got = module.apply({"params": params}, jnp.asarray(x))
    assert_close(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(_flat(dict(value), f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_slow_modes_get_fewer_rounds():
    # Fast enough: the rounds asked for.
    assert jax_step.rounds_for(0.1, steps=7, warmup=2, budget_s=30.0) == (2, 7)
    # 9 rounds of 4 s exceed 30 s: no warm-up, floor(30 / 4) = 7 timed rounds.
    assert jax_step.rounds_for(4.0, steps=10, warmup=2, budget_s=30.0) == (0, 7)
    # Never fewer than 3, never more than asked.
    assert jax_step.rounds_for(20.0, steps=7, warmup=2, budget_s=30.0) == (0, 3)
    assert jax_step.rounds_for(20.0, steps=1, warmup=0, budget_s=1.0) == (0, 1)


def test_fast_modes_run_in_blocks():
    # 4 ms < 20 ms: 1 + ceil(20 / 4) = 6 consecutive steps per round; capped at 25.
    assert jax_step.repeats_for(0.004, block_s=0.02) == 6
    assert jax_step.repeats_for(1e-5, block_s=0.02) == 25
    # Slow enough, or blocks off: one step per round.
    assert jax_step.repeats_for(0.02, block_s=0.02) == 1
    assert jax_step.repeats_for(0.004, block_s=0.0) == 1


def _recording_runners(*names: str) -> tuple[dict[str, Any], list[str]]:
    """Runners that do nothing but append their name to the returned call list."""
    calls: list[str] = []
    return {name: (lambda name=name: calls.append(name)) for name in names}, calls


def test_blocks_time_all_but_their_first_step():
    runners, calls = _recording_runners("fast", "slow")
    times = jax_step.time_interleaved(runners, steps=2, warmup=1, repeats={"fast": 3})
    assert calls == ["fast"] * 3 + ["slow"] + ["slow"] + ["fast"] * 3 + ["fast"] * 3 + ["slow"]
    assert len(times["fast"]) == 2 * 2 and len(times["slow"]) == 2


def test_interleaved_rounds_follow_the_per_mode_plan():
    runners, calls = _recording_runners("a", "b")
    times = jax_step.time_interleaved(runners, steps=4, warmup=1, rounds={"b": (0, 3)})
    assert len(times["a"]) == 4 and len(times["b"]) == 3
    assert calls.count("a") == 5 and calls.count("b") == 3
    # Round 0: a then b; round 1 rotates: b then a.
    assert calls[:4] == ["a", "b", "b", "a"]


def _run_smoke(tmp_path, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out), *flags],
                          capture_output=True, text=True, timeout=600, env=_env(), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8")), done.stdout


@pytest.mark.slow
def test_gpt2_steps_in_both_precisions(tmp_path):
    result, stdout = _run_smoke(tmp_path, "--models", "gpt2", "--bf16", "--modes",
                                "nonprivate,dp_jax,dp_jax-ghost,optax-contrib")
    rows = {(r["precision"], r["mode"]): r for r in result["results"]}
    assert len(rows) == 8
    for key, row in rows.items():
        assert "error" not in row, f"{key}: {row.get('error')}"
        assert row["params"] == PARAMS["gpt2"] and row["peak_mib"] > 0
    assert stdout.count("| GPT-2 LM, d 256, 4 layers, seq 8 | 2 | bf16 |") == 1


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU (or other accelerator)")
def test_accelerator_step_and_device_memory(tmp_path):
    result, _ = _run_smoke(tmp_path, "--models", "mlp,gpt2", "--bf16", "--memory", "process",
                           "--modes", "nonprivate,dp_jax-ghost")
    for row in result["results"]:
        assert "error" not in row, row.get("error")
        assert row["memory_kind"] == "device-peak" and row["peak_mib"] > 0
    assert result["environment"]["device_peak_mib"] > 0


@pytest.mark.slow
def test_memory_of_one_mode_in_a_subprocess():
    row = jax_step.measure_memory(jax_step.Config("mlp", "nonprivate", 4, None), warmup=0)
    assert row.get("memory_kind") in ("rss-growth", "maxrss-growth (lower bound)", "device-peak")
    assert 0 <= row["peak_mib"] < 4096
