"""Parameters and optimizer state split over a mesh (``make_private(param_sharding=...)``).

The multi-device runs happen in a subprocess (``_fsdp_checks.py`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``): the test process has one CPU
device. Every case trains on 2 or 4 devices with the parameters split and, with the
same seed and key, on one device (the oracle), in float64.

Oracles and tolerances:

* the one-device run on the union of the batches: the sharded run adds the same
  terms in another order, so parameters agree to a relative ``RTOL = 1e-10``
  (observed ~1e-15) with and without noise;
* the noise alone (first step of the noisy run minus the noise-free run, SGD, so
  ``-lr * noise / m``) equals the one-device run's draw for the same key to
  ``RTOL`` relative to its largest entry;
* secure mode (OS-entropy noise): a Kolmogorov-Smirnov test accepts the
  Gaussian noise ``lr * sigma * C / m`` and rejects ``sqrt(2)`` times it;
* the addressable shard shapes: what the FSDP rule says is split is split.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dp_jax  # noqa: E402
from dp_jax import _fsdp  # noqa: E402
from dp_jax import distributed as dist  # noqa: E402
from tests.dp_jax import _fsdp_checks as checks  # noqa: E402
from tests.tolerance import assert_close, rel_err  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
RTOL = 1e-10
ALPHA = 1e-3
TIMEOUT = 600


def _run_checks(tmp_path_factory, devices: int, suite: str) -> np.lib.npyio.NpzFile:
    out = tmp_path_factory.mktemp(f"fsdp-{suite}-{devices}") / "results.npz"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    flags = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4"
    env = dict(os.environ, PYTHONPATH=path, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, str(HERE / "_fsdp_checks.py"), str(out), str(devices), suite],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return np.load(out)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return _run_checks(tmp_path_factory, 2, "quick")


@pytest.fixture(scope="module", params=[2, 4], ids=["2dev", "4dev"])
def slow(request, tmp_path_factory):
    return _run_checks(tmp_path_factory, request.param, "slow")


def _group(results, name: str, what: str) -> dict[str, np.ndarray]:
    prefix = f"{name}|{what}|"
    return {k[len(prefix):]: results[k] for k in results.files if k.startswith(prefix)}


def _cases(results) -> list[str]:
    return sorted({k.split("|")[0] for k in results.files if k.endswith("|m|")}
                  - {"secure", "checkpoint"})


# --------------------------------------------------------------------------- the checks


def _check_matches_one_device(results, name: str) -> None:
    """Zero noise and same-key noise: the sharded run is the one-device run."""
    for what in ("zero", "noisy"):
        assert_close(_group(results, name, f"sharded_{what}"),
                     _group(results, name, f"single_{what}"), rtol=RTOL)
    noisy = _group(results, name, "single_noisy")
    zero = _group(results, name, "single_zero")
    assert max(rel_err(noisy[k], zero[k]) for k in zero) > 1e-3  # the noise is not nothing
    assert float(results[f"{name}|sharded_eps|"]) == float(results[f"{name}|single_eps|"])


def _check_same_noise(results, name: str) -> None:
    """The noise of the first step, as drawn for the global parameters from the same key."""
    sharded = _group(results, name, "sharded_noise")
    single = _group(results, name, "single_noise")
    scale = max(float(np.max(np.abs(v))) for v in single.values())
    assert scale > 0.0
    assert_close(sharded, single, rtol=0.0, atol=RTOL * scale)


def _expected_shard(global_shape: tuple[int, ...], devices: int, min_size: int) -> tuple:
    spec = _fsdp._fsdp_spec(global_shape, "data", devices, min_size)
    shape = list(global_shape)
    for dim, entry in enumerate(spec):
        if entry is not None:
            shape[dim] //= devices
    return tuple(shape)


def _check_split(shards: dict[str, np.ndarray], devices: int, min_size: int) -> int:
    """Every leaf's first shard has the FSDP rule's shape; returns how many are split."""
    split = 0
    for path, (global_shape, local_shape) in shards.items():
        want = _expected_shard(tuple(int(d) for d in global_shape), devices, min_size)
        assert tuple(local_shape) == want, path
        split += tuple(local_shape) != tuple(global_shape)
    return split


# --------------------------------------------------------------------------- 2 devices (quick)


QUICK = "mlp-flat-vmap-2dev"


def test_two_devices_give_the_one_device_update_with_and_without_noise(quick):
    assert int(quick["devices||"]) == 4
    _check_matches_one_device(quick, QUICK)


def test_two_devices_draw_the_one_device_noise_for_the_same_key(quick):
    _check_same_noise(quick, QUICK)


def test_two_devices_split_the_parameters_and_the_optimizer_state(quick):
    params = _group(quick, QUICK, "param_shards")
    assert [tuple(v[1]) for v in params.values()] == [(64,), (16, 32), (64,)]  # b1, w1, w2
    opt = _group(quick, QUICK, "opt_shards")
    split = {path for path, (g, local) in opt.items() if tuple(g) != tuple(local)}
    # The clipped-sum accumulator and SGD's momentum are split like w1, the rest whole.
    assert split == {".dp_state.inner_state.grad_sum['w1']", ".inner_state[0].trace['w1']"}
    assert _check_split(opt, 2, _fsdp.FSDP_MIN_SIZE) == 2


def test_a_spec_that_does_not_divide_its_dimension_is_refused_before_any_change(quick):
    message = str(quick["errors|uneven|"])
    assert message.startswith("ValueError: param_sharding['b1']=P('data',)")
    assert "(65,)" in message and "does not divide 65" in message and '"fsdp"' in message
    assert int(quick["errors|steps_after|"]) == 0 and bool(quick["errors|data_after|"])


def test_a_checkpoint_of_split_state_loads_split_with_the_same_values(quick):
    assert_close(_group(quick, "checkpoint", "loaded"), _group(quick, "checkpoint", "saved"),
                 rtol=0.0)
    assert _check_split(_group(quick, "checkpoint", "param_shards"), 2, _fsdp.FSDP_MIN_SIZE) == 1
    assert _check_split(_group(quick, "checkpoint", "opt_shards"), 2, _fsdp.FSDP_MIN_SIZE) == 3


# --------------------------------------------------------------------------- 2 and 4 devices (slow)


@pytest.mark.slow
def test_sharded_models_give_the_one_device_update(slow):
    names = _cases(slow)
    want = {"gpt", "lora", "lora_frozen"} | ({"mlp"} if int(slow["mesh_devices||"]) == 4 else set())
    assert {n.split("-")[0] for n in names} == want
    for name in names:
        _check_matches_one_device(slow, name)
        _check_same_noise(slow, name)


@pytest.mark.slow
def test_sharded_models_split_every_divisible_leaf(slow):
    devices = int(slow["mesh_devices||"])
    for name in _cases(slow):
        min_size = _fsdp.FSDP_MIN_SIZE if name.startswith("mlp") else 1
        assert _check_split(_group(slow, name, "param_shards"), devices, min_size) >= 1, name
        assert _check_split(_group(slow, name, "opt_shards"), devices, min_size) >= 2, name
        if name.startswith("lora_frozen"):  # placed beforehand: they keep their split
            assert _check_split(_group(slow, name, "frozen_shards"), devices, 1) >= 10


@pytest.mark.slow
def test_secure_mode_adds_gaussian_noise_of_the_right_scale_to_split_parameters(slow):
    noise = np.concatenate([v.ravel() for v in _group(slow, "secure", "noise").values()])
    std = checks.LR * checks.SIGMA * 0.5 / int(slow["secure|m|"])
    assert stats.kstest(noise / std, "norm").pvalue > ALPHA
    assert stats.kstest(noise / (np.sqrt(2) * std), "norm").pvalue < ALPHA
    assert int(slow["secure|steps|"]) == 1
    shards = _group(slow, "secure", "param_shards")
    assert _check_split(shards, int(slow["mesh_devices||"]), _fsdp.FSDP_MIN_SIZE) == 1


# --------------------------------------------------------------------------- in process (1 device)


def _mlp_kwargs(**overrides):
    model = checks.mlp()
    kwargs = {"loss_fn": model.loss_fn, "params": model.params, "data": model.data,
              "optimizer": optax.sgd(0.1), "noise_multiplier": 1.0, "max_grad_norm": 1.0,
              "sample_rate": 0.2}
    return {**kwargs, **overrides}


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"param_sharding": "fsdp"}, ValueError,
         r"param_sharding='fsdp' needs a mesh .* but mesh=None; pass mesh=dp_jax.data_mesh\(\)"),
        ({"param_sharding": "zero3", "mesh": "MESH"}, ValueError,
         r"param_sharding must be one of \['fsdp'\], None or a pytree of PartitionSpec; got "
         r"'zero3'\. Use \"fsdp\""),
        ({"param_sharding": {"w1": P()}, "mesh": "MESH"}, ValueError,
         r"param_sharding must be .* with the structure of params .*fsdp_specs"),
        ({"param_sharding": "SPECS_WITH_A_STRING", "mesh": "MESH"}, TypeError,
         r"param_sharding\['w1'\] must be a jax.sharding.PartitionSpec, got 'data'"),
        ({"param_sharding": "SPECS_WITH_AXIS_MODEL", "mesh": "MESH"}, ValueError,
         r"param_sharding\['w1'\]=P\('model',\) names mesh axes \['model'\] that the mesh"),
        ({"param_sharding": "SPECS_TOO_LONG", "mesh": "MESH"}, ValueError,
         r"param_sharding\['b2'\]=P\('data',\) names 1 dimensions but the parameter has shape"),
    ],
)
def test_bad_sharding_arguments_are_refused_and_change_nothing(overrides, error, match):
    mesh = dist.data_mesh()
    model = checks.mlp()
    replicated = jax.tree_util.tree_map(lambda _: P(), model.params)
    specials = {
        "MESH": mesh,
        "SPECS_WITH_A_STRING": dict(replicated, w1="data"),
        "SPECS_WITH_AXIS_MODEL": dict(replicated, w1=P("model")),
        "SPECS_TOO_LONG": dict(replicated, b2=P("data")),
    }
    overrides = {k: specials.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    engine = dp_jax.PrivacyEngine()
    with pytest.raises(error, match=match):
        engine.make_private(**_mlp_kwargs(**overrides))
    assert len(engine.accountant) == 0 and engine.data is None
    engine.make_private(**_mlp_kwargs(mesh=mesh, param_sharding="fsdp"))  # still usable


def test_fsdp_rule_splits_the_largest_divisible_dimension_of_large_arrays():
    rule = _fsdp._fsdp_spec
    assert rule((16, 64), "data", 4, 1024) == P(None, "data")  # the larger dimension
    assert rule((64, 64), "data", 4, 1024) == P("data")  # the first of equal ones
    assert rule((66, 20), "data", 4, 1) == P(None, "data")  # 66 is not divisible by 4
    assert rule((30, 7), "data", 4, 1) == P()  # nothing divisible: replicated
    assert rule((16, 63), "data", 4, 1024) == P()  # 1008 elements: small, replicated
    assert rule((), "data", 4, 0) == P()
    with pytest.raises(ValueError, match="min_size must be an int >= 0, got -1"):
        dist.fsdp_specs({"w": jnp.zeros(3)}, dist.data_mesh(), min_size=-1)


def _train(private):
    state = private.state
    for logical in private.batches:
        state, _ = private.train_logical_step(state, logical)
    return state


@pytest.mark.parametrize("on_mesh, mode", [(False, "vmap"), (True, "vmap"), (False, "ghost")],
                         ids=["one-device", "mesh", "one-device-ghost"])
def test_frozen_params_are_the_same_loss_as_a_closure(on_mesh, mode):
    model = checks.mlp()
    frozen = {"w2": model.params["w2"], "b2": model.params["b2"]}
    trainable = {"w1": model.params["w1"], "b1": model.params["b1"]}

    def with_frozen(p, ex, f):
        return model.loss_fn({**p, **f}, ex)

    def closure(p, ex):
        return model.loss_fn({**p, **frozen}, ex)

    kwargs = _mlp_kwargs(params=trainable, seed=0, key=jax.random.key(1), steps=2,
                         grad_sample_mode=mode)
    kwargs.pop("loss_fn")
    mesh = {"mesh": dist.data_mesh()} if on_mesh else {}  # replicated: the compiled step
    got = dp_jax.PrivacyEngine().make_private(loss_fn=with_frozen, frozen_params=frozen,
                                              **kwargs, **mesh)
    want = dp_jax.PrivacyEngine().make_private(loss_fn=closure, **kwargs)
    assert_close(jax.tree_util.tree_map(np.asarray, got.frozen_params),
                 jax.tree_util.tree_map(np.asarray, frozen), rtol=0.0)
    assert_close(jax.tree_util.tree_map(np.asarray, _train(got).params),
                 jax.tree_util.tree_map(np.asarray, _train(want).params), rtol=1e-6)
