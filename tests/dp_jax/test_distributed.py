"""Data-parallel DP-SGD over a device mesh (dp_jax._distributed).

The test process has already imported JAX with one CPU device, so every multi-device
check runs in a subprocess: ``_dist_checks.py`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (one run, many checks, arrays
back in an ``.npz``), and ``_dist_worker.py`` started twice for the two-process test
(``jax.distributed.initialize`` on 127.0.0.1, 2 CPU devices each).

Oracles: the single-device step (the whole batch through ``clipped_grad`` and the same
optax chain, same PRNG key) to float64 rounding; the closed-form per-example gradients
of least squares clipped in numpy; Kolmogorov-Smirnov tests that accept the noise
``sigma C / m`` and reject ``sqrt(2)`` and ``sqrt(4)`` times it (noise added per device);
the dpcore sampler's batch for the rows each process reads.
"""

from __future__ import annotations

import math
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import dp_jax  # noqa: E402
from dp_jax import _distributed as dist  # noqa: E402
from dp_jax import _sharded_batches  # noqa: E402
from dpcore import sampling as core_sampling  # noqa: E402
from tests.dp_jax import _dist_checks as checks  # noqa: E402
from tests.dp_jax import _dist_common as common  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
RTOL = 1e-12  # float64: the sharded sum adds the same terms in another order
ALPHA = 1e-3  # KS significance: accept p > ALPHA at the right scale, reject below it
SUBPROCESS_TIMEOUT = 240


def _env(devices: int | None = None) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # Optimisation level 0 roughly halves the compile time; the checks are about values.
    flags = ["--xla_backend_optimization_level=0"]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    # JAX_PLATFORMS=cpu: the host devices are the mesh even where a GPU is visible.
    return dict(os.environ, PYTHONPATH=path, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")


def _group(results: np.lib.npyio.NpzFile, name: str, what: str) -> dict[str, np.ndarray]:
    prefix = f"{name}|{what}|"
    return {k[len(prefix):]: results[k] for k in results.files if k.startswith(prefix)}


def _one(results: np.lib.npyio.NpzFile, name: str, what: str) -> np.ndarray:
    return results[f"{name}|{what}|"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.npz"
    done = subprocess.run(
        [sys.executable, str(HERE / "_dist_checks.py"), str(out)], capture_output=True,
        text=True, timeout=SUBPROCESS_TIMEOUT, env=_env(4), cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = np.load(out)
    assert int(loaded["devices||"]) == 4
    return loaded


# --------------------------------------------------------------------------- in process (1 device)


def test_data_mesh_is_one_axis_over_all_devices():
    mesh = dist.data_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.size == jax.device_count()
    assert dist.data_mesh(axis_name="batch").axis_names == ("batch",)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"devices": []}, "devices is empty"), ({"axis_name": ""}, "axis_name"),
     ({"axis_name": 3}, "axis_name")],
)
def test_data_mesh_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dist.data_mesh(**kwargs)


def test_data_mesh_refuses_a_repeated_device():
    device = jax.devices()[0]
    with pytest.raises(ValueError, match="repeats a device"):
        dist.data_mesh([device, device])


def test_pad_to_multiple_masks_padded_rows_that_repeat_row_zero():
    batch = {"x": np.arange(26.0).reshape(13, 2), "y": np.arange(13)}
    mask = np.ones(13, bool)
    mask[4] = False
    padded, padded_mask = dist.pad_to_multiple(batch, mask, 4)
    assert padded["x"].shape == (16, 2) and padded["y"].shape == (16,)
    np.testing.assert_array_equal(padded["x"][:13], batch["x"])
    np.testing.assert_array_equal(padded["x"][13:], np.repeat(batch["x"][:1], 3, axis=0))
    np.testing.assert_array_equal(padded_mask, np.concatenate([mask, [False] * 3]))
    same, same_mask = dist.pad_to_multiple(batch, None, 13)
    assert same["x"].shape == (13, 2) and same_mask.all()


def test_pad_to_multiple_of_an_empty_batch_is_all_masked_zeros():
    padded, mask = dist.pad_to_multiple({"x": np.zeros((0, 3))}, np.zeros(0, bool), 2)
    assert padded["x"].shape == (2, 3) and not mask.any()
    np.testing.assert_array_equal(padded["x"], 0.0)


@pytest.mark.parametrize(
    "multiple, mask, match",
    [(0, None, "multiple"), (True, None, "multiple"), (2.0, None, "multiple"),
     (2, np.ones(4, bool), r"mask must have shape \(3,\)")],
)
def test_pad_to_multiple_refuses_bad_arguments(multiple, mask, match):
    with pytest.raises(ValueError, match=match):
        dist.pad_to_multiple({"x": np.zeros((3, 2))}, mask, multiple)


def _linear_loss(params, example):
    return 0.5 * (example["x"] @ params - example["y"]) ** 2


def test_make_sharded_step_refuses_bad_arguments():
    mesh = dist.data_mesh()
    grad_fn = dp_jax.clipped_grad(_linear_loss, 1.0)
    with pytest.raises(TypeError, match="tx must be an optax"):
        dist.make_sharded_step(grad_fn, object(), mesh)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        dist.make_sharded_step(grad_fn, optax.sgd(0.1), "mesh")
    with pytest.raises(ValueError, match="axis_name='batch' is not an axis"):
        dist.make_sharded_step(grad_fn, optax.sgd(0.1), mesh, axis_name="batch")
    with pytest.raises(TypeError, match="bound_of must be callable"):
        dist.make_sharded_step(grad_fn, optax.sgd(0.1), mesh, bound_of=1.0)
    with pytest.raises(TypeError, match="grad_fn must be callable"):
        dist.make_sharded_step(None, optax.sgd(0.1), mesh)


def _linear_problem():
    rng = np.random.default_rng(11)
    x, y, w = rng.normal(size=(7, 3)), rng.normal(size=7), rng.normal(size=3)
    mask = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    return {"x": x, "y": y}, mask, w


def _clipped_sum_numpy(x, y, w, mask, c):
    """Closed form: g_i = (x_i . w - y_i) x_i, clipped to C (with the clip factor's 1e-6), summed."""
    grads = (x @ w - y)[:, None] * x
    norms = np.linalg.norm(grads, axis=1)
    factors = np.minimum(1.0, c / (norms + 1e-6))
    return (grads * (factors * mask)[:, None]).sum(axis=0)


def test_step_with_host_noise_is_the_closed_form_update_on_one_device():
    data, mask, w = _linear_problem()
    m, lr, c = 5, 0.3, 0.8
    tx = optax.chain(optax.scale(1.0 / m),
                     dp_jax.add_gaussian_noise(1.0, c, m, jax.random.key(0)), optax.sgd(lr))
    mesh = dist.data_mesh()
    step = dist.make_sharded_step(dp_jax.clipped_grad(_linear_loss, c), tx, mesh)
    params = jnp.asarray(w)
    state = dist.replicate(dp_jax.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)),
                           mesh)
    noise = np.array([0.5, -1.0, 2.0])  # reproducibility mode: noise on the sum scale
    batch, sharded_mask = dist.shard_batch(data, mask, mesh)
    new, metrics = step(state, batch, sharded_mask, True, noise=noise)
    expected = w - lr * (_clipped_sum_numpy(data["x"], data["y"], w, mask, c) + noise) / m
    assert_close(np.asarray(new.params), expected, rtol=RTOL)
    losses = 0.5 * (data["x"] @ w - data["y"]) ** 2
    assert_close(float(metrics["loss"]), losses[mask].mean(), rtol=RTOL)
    assert bool(metrics["applied"]) and int(new.step) == 1


def test_apply_update_false_does_not_count_a_step_and_reaches_the_transformation():
    data, mask, w = _linear_problem()
    seen = []

    def update(updates, state, params=None, *, apply_update, clip_aux, **extra):
        del params, extra
        seen.append(clip_aux)
        scale = jnp.where(apply_update, -1.0, 0.0)
        return jax.tree_util.tree_map(lambda u: scale * u, updates), state

    tx = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
    mesh = dist.data_mesh()
    step = dist.make_sharded_step(dp_jax.clipped_grad(_linear_loss, 0.8), tx, mesh)
    params = jnp.asarray(w)
    state = dp_jax.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    held, metrics = step(state, data, mask, False)
    assert not bool(metrics["applied"]) and int(held.step) == 0
    assert_close(np.asarray(held.params), w, rtol=0.0)
    applied, _ = step(state, data, mask, True)
    assert_close(np.asarray(applied.params),
                 w - _clipped_sum_numpy(data["x"], data["y"], w, mask, 0.8), rtol=RTOL)
    assert isinstance(seen[0], dp_jax.ClipAux)  # the (global) clipping statistics reach tx


def test_plain_transformation_gets_no_extra_arguments_and_refuses_host_noise():
    data, mask, w = _linear_problem()
    tx = optax.GradientTransformation(optax.sgd(1.0).init,
                                      lambda u, s, p=None: optax.sgd(1.0).update(u, s, p))
    mesh = dist.data_mesh()
    step = dist.make_sharded_step(dp_jax.clipped_grad(_linear_loss, 0.8), tx, mesh)
    params = jnp.asarray(w)
    state = dp_jax.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    new, _ = step(state, data, mask, True)
    assert_close(np.asarray(new.params),
                 w - _clipped_sum_numpy(data["x"], data["y"], w, mask, 0.8), rtol=RTOL)
    with pytest.raises(ValueError, match="noise= was given but tx takes no extra arguments"):
        step(state, data, mask, True, noise=np.zeros(3))


def test_sharded_batches_on_one_device_are_the_poisson_batches():
    mesh = dist.data_mesh()
    sharded = dist.ShardedBatches(common.poisson_batches(), mesh)
    plain = common.poisson_batches()
    assert len(sharded) == len(plain) == common.STEPS
    for got, want in zip(sharded, plain):
        assert len(got) == len(want) == 1
        assert_close(
            {"x": np.asarray(got[0].batch["x"]), "y": np.asarray(got[0].batch["y"]),
             "mask": np.asarray(got[0].mask)},
            {"x": want[0].batch["x"], "y": want[0].batch["y"], "mask": want[0].mask}, rtol=0.0)
        assert got[0].batch["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert sharded.state_dict() == plain.state_dict()


def test_sharded_batches_refuses_what_is_not_poisson_batches():
    with pytest.raises(TypeError, match="batches must be a dp_jax.PoissonBatches"):
        dist.ShardedBatches([np.arange(3)], dist.data_mesh())


def test_broadcast_buffer_lengths_come_from_the_buckets():
    buckets = (4, 8, 16)
    assert [_sharded_batches._broadcast_length(n, buckets) for n in (0, 4, 5, 16, 17, 40)] == [
        5, 5, 9, 17, 33, 49]


# --------------------------------------------------------------------------- 4 host devices


CASE_NAMES = [checks.case_name(*case) for case in checks.CASES]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sharded_steps_equal_single_device_steps(results, name):
    """Three Poisson steps: same batches, same losses, same parameters (noise included)."""
    np.testing.assert_array_equal(_one(results, name, "sharded_counts"),
                                  _one(results, name, "single_counts"))
    assert_close(_one(results, name, "sharded_loss"), _one(results, name, "single_loss"),
                 rtol=RTOL)
    single = _group(results, name, "single")
    assert len(single) == 4
    assert_close(_group(results, name, "sharded"), single, rtol=RTOL, atol=1e-15)
    assert int(_one(results, name, "step")) == common.STEPS


@pytest.mark.parametrize("name", [case[0] for case in checks.ENGINE_CASES])
def test_engine_on_a_mesh_equals_the_engine_on_one_device(results, name):
    """make_private(mesh=...) trains the same model and accounts the same epsilon."""
    single = _group(results, name, "single")
    assert len(single) == 4
    assert_close(_group(results, name, "sharded"), single, rtol=RTOL, atol=1e-15)
    eps_sharded, eps_single = _one(results, name, "eps")
    assert eps_sharded == eps_single > 0
    assert (_one(results, name, "device_copies") == 1).all()
    if "virtual" in name:  # batches of ~12 rows in chunks of <= 5: a real virtual step
        assert _one(results, name, "chunks").max() >= 2


def test_ghost_engine_on_a_mesh_equals_vmap_on_one_device(results):
    """Ghost clipping inside shard_map (virtual steps, 4 devices) = vmap clipping, 1 device."""
    assert int(_one(results, "ghost-engine", "ghost_leaves")) == 4  # both kernels, both biases
    single = _group(results, "ghost-engine", "single")
    assert_close(_group(results, "ghost-engine", "sharded"), single, rtol=1e-10, atol=1e-15)
    start = _group(results, "ghost-engine", "start")
    assert any(not np.allclose(single[k], start[k]) for k in start)  # it trained


def test_secure_engine_on_a_mesh_keeps_devices_identical(results):
    """Host noise is replicated: every device applies the same noised update."""
    assert (_one(results, "engine-secure", "device_copies") == 1).all()
    params = _group(results, "engine-secure", "params")
    assert all(np.isfinite(v).all() for v in params.values())
    start = common.flat(common.init_params())
    assert any(not np.array_equal(params[k], start[k]) for k in start)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_state_is_identical_on_every_device(results, name):
    devices = int(name.split("-")[2].removesuffix("dev"))
    shards = _group(results, name, "shards")
    assert {s.shape[0] for s in shards.values()} == {devices}
    for path, stacked in shards.items():
        for copy in stacked[1:]:
            np.testing.assert_array_equal(copy, stacked[0], err_msg=path)  # bit for bit
    params = {k.removeprefix(".params"): v[0] for k, v in shards.items() if k.startswith(".params")}
    assert_close(params, _group(results, name, "sharded"), rtol=0.0)
    assert set(_one(results, name, "param_specs")) == {"P()"}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_device_gets_an_equal_share_of_the_padded_batch(results, name):
    devices = int(name.split("-")[2].removesuffix("dev"))
    rows = _one(results, name, "rows_per_device")
    assert rows.shape == (common.STEPS, devices)
    assert (rows == common.BUCKETS[0] // devices).all()


@pytest.mark.parametrize("devices, padded", [(4, 16), (2, 14)])
def test_masked_and_padded_rows_contribute_nothing(results, devices, padded):
    name = f"masked-{devices}dev"
    assert int(_one(results, name, "padded_rows")) == padded
    sharded = _group(results, name, "sharded")
    assert all(np.isfinite(v).all() for v in sharded.values())  # the NaN rows were masked
    assert_close(sharded, _group(results, name, "single"), rtol=RTOL, atol=1e-15)
    aux = _one(results, name, "sharded_aux")
    assert_close(aux, _one(results, name, "single_aux"), rtol=RTOL)
    assert aux[1] == 11 and aux[3] == 0  # 11 real rows, no non-finite norm among them
    assert_close(_one(results, name, "sharded_norms"), _one(results, name, "single_norms"),
                 rtol=RTOL)


def test_psummed_clipped_sum_is_the_closed_form(results):
    x, y, w, mask = (_one(results, "linear", k) for k in ("x", "y", "w", "mask"))
    assert_close(_one(results, "linear", "sharded"), _clipped_sum_numpy(x, y, w, mask, 0.7),
                 rtol=RTOL)
    assert int(_one(results, "linear", "num_examples")) == int(mask.sum())


def _ks_p(samples: np.ndarray, scale: float) -> float:
    return stats.kstest(samples / scale, "norm").pvalue


def test_noise_is_added_once_to_the_psummed_sum(results):
    draws = _one(results, "noise", "draws")
    std = float(_one(results, "noise", "std"))
    assert draws.size == checks.NOISE_KEYS * checks.NOISE_DIM
    assert _ks_p(draws, std) > ALPHA
    assert _ks_p(draws, 0.9 * std) < ALPHA and _ks_p(draws, 1.1 * std) < ALPHA
    # Noise drawn on every device and then summed would be sqrt(4) (or, for two of the
    # four, sqrt(2)) times larger.
    assert _ks_p(draws, math.sqrt(4) * std) < ALPHA
    assert _ks_p(draws, math.sqrt(2) * std) < ALPHA


def test_split_batches_keep_every_example_in_chunks_rounded_to_the_devices(results):
    """Buckets (5, 7) on 4 devices: chunks of 8 (7 rounded up), nothing lost or repeated."""
    expected = list(core_sampling.PoissonSampler(common.N, common.Q, steps=common.STEPS,
                                                 seed=common.SEED))
    assert max(b.size for b in expected) > 7  # at least one batch is split
    sizes = _one(results, "chunks", "sizes")
    assert set(sizes) <= {8} and len(sizes) == sum(_one(results, "chunks", "per_step"))
    chunks_per_step = [max(1, -(-b.size // 7)) for b in expected]  # 7: the largest bucket
    assert list(_one(results, "chunks", "per_step")) == chunks_per_step
    np.testing.assert_array_equal(_one(results, "chunks", "rows_per_step"),
                                  [b.size for b in expected])
    np.testing.assert_array_equal(_one(results, "chunks", "rows"), np.concatenate(expected))


def test_batch_that_does_not_divide_the_devices_is_refused(results):
    message = str(_one(results, "errors", "uneven"))
    assert "13 rows, not a multiple of the 4 devices" in message
    assert "pad_to_multiple" in message


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_processes(out: pathlib.Path, extra: list[str], timeout: float):
    """Start the two workers; return (return codes, logs, seconds). Kills them on timeout."""
    port = _free_port()
    procs, logs = [], []
    start = time.monotonic()
    for pid in range(2):
        log = open(out / f"log{pid}.txt", "w", encoding="utf-8")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "_dist_worker.py"), "--process-id", str(pid),
             "--num-processes", "2", "--port", str(port), "--out", str(out), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
        ))
    codes = []
    try:
        for proc in procs:
            left = max(1.0, timeout - (time.monotonic() - start))
            codes.append(proc.wait(timeout=left))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    elapsed = time.monotonic() - start
    texts = [(out / f"log{pid}.txt").read_text(encoding="utf-8") for pid in range(2)]
    return codes, texts, elapsed


def _global_padded_batches() -> list[np.ndarray]:
    """The padded index rows of each step, as the dpcore sampler draws them."""
    rows = []
    for indices in core_sampling.PoissonSampler(common.N, common.Q, steps=common.STEPS,
                                                seed=common.SEED):
        (padded, _), = core_sampling.pad_to_buckets(indices, common.BUCKETS)
        rows.append(padded)
    return rows


def test_two_processes_equal_one_device(tmp_path):
    codes, logs, _ = _run_processes(tmp_path, [], timeout=SUBPROCESS_TIMEOUT)
    assert codes == [0, 0], f"worker logs:\n{logs[0][-3000:]}\n----\n{logs[1][-3000:]}"
    grad_fn = dp_jax.clipped_grad(common.loss_fn, common.C_FLAT)
    ref_params, ref_losses, _ = common.reference_run(
        grad_fn, common.make_tx(common.SIGMA, common.C_FLAT))
    expected = common.flat(ref_params)
    padded = _global_padded_batches()
    half = common.BUCKETS[0] // 2
    for pid in range(2):
        for k in range(common.STEPS):
            saved = np.load(tmp_path / f"p{pid}-step{k}.npz")
            assert int(saved["global_devices"]) == 4 and saved["local_ids"].size == 2
            # Each process read exactly the rows of the global batch on its two devices.
            np.testing.assert_array_equal(saved["read"], padded[k][pid * half:(pid + 1) * half])
            assert_close(float(saved["loss"]), ref_losses[k], rtol=RTOL)
        params = {k.removeprefix("shards|.params"): saved[k] for k in saved.files
                  if k.startswith("shards|.params")}
        for path, stacked in params.items():
            assert stacked.shape[0] == 2
            np.testing.assert_array_equal(stacked[1], stacked[0])
            assert_close(stacked[0], expected[path], rtol=RTOL, atol=1e-15)
    _check_engine_across_processes(tmp_path)


def _check_engine_across_processes(out: pathlib.Path) -> None:
    """PrivacyEngine(mesh=...) over 2 processes equals the one-device engine; its
    checkpoint (written by process 0) restores the same state; secure noise agrees."""
    _, kwargs = checks.ENGINE_CASES[0]
    single, eps_single, _ = checks._engine_run(None, kwargs)
    expected = common.flat(single.params)
    runs = [np.load(out / f"p{pid}-engine.npz") for pid in range(2)]
    assert float(runs[0]["eps"]) == float(runs[1]["eps"]) == eps_single
    assert int(runs[0]["ckpt_steps"]) == 1
    for run in runs:
        for what in ("seeded", "restored", "stepped", "secure"):
            for key in expected:
                stacked = run[f"{what}|{key}"]
                np.testing.assert_array_equal(stacked[1], stacked[0])  # both local devices
                np.testing.assert_array_equal(stacked[0], runs[0][f"{what}|{key}"][0])
        for key, value in expected.items():
            assert_close(run[f"seeded|{key}"][0], value, rtol=RTOL, atol=1e-15)
            np.testing.assert_array_equal(run[f"restored|{key}"], run[f"stepped|{key}"])
    assert float(runs[0]["loss"]) == float(runs[1]["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("dead", [1, 0])
def test_a_dead_process_makes_the_other_fail_within_the_heartbeat(tmp_path, dead):
    heartbeat = 5
    codes, logs, elapsed = _run_processes(
        tmp_path, ["--die-at", "1", "--die-process", str(dead), "--heartbeat", str(heartbeat)],
        timeout=90,
    )
    assert len(codes) == 2, f"a worker hung past the harness timeout:\n{logs[1 - dead][-3000:]}"
    assert codes[dead] == 17
    survivor = 1 - dead
    assert codes[survivor] != 0
    # JAX's own message: the coordination service saw the dead process (or gloo lost it).
    assert ("detected fatal errors" in logs[survivor]
            or "Gloo all-reduce failed" in logs[survivor]), logs[survivor][-3000:]
    # Startup and one step, then at most the heartbeat plus slack: never a hang.
    assert elapsed < 60
    # No process applied (or wrote) an update after the crash.
    written = sorted(p.name for p in tmp_path.glob("p*-step*.npz"))
    assert written == ["p0-step0.npz", "p1-step0.npz"]
