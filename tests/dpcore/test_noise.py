"""Tests for dpcore.noise.

Oracles: Kolmogorov-Smirnov tests against N(0, (sigma C)^2) that must also reject
0.9x and 1.1x the scale; numpy's PCG64 normal stream stated directly; the normal
quantile function (scipy.stats.norm.isf) for the secure sampler's bit layout.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

import dpcore.noise as noise_module
from dpcore.noise import NoiseSource, NoiseSpec, gaussian_noise_like, noise_std
from tests.tolerance import assert_close

SIGMA, C = 1.3, 0.7
STD = SIGMA * C
NUM = 200_000


def _ks_pvalues(samples: np.ndarray, std: float) -> tuple[float, float, float]:
    return tuple(
        float(stats.kstest(samples, "norm", args=(0.0, factor * std)).pvalue)
        for factor in (1.0, 0.9, 1.1)
    )


# ----------------------------------------------------------------------------- spec


def test_noise_std_and_spec() -> None:
    assert_close(noise_std(SIGMA, C), STD, rtol=1e-15)
    assert noise_std(0.0, 2.0) == 0.0
    assert_close(NoiseSpec(SIGMA, C).std, STD, rtol=1e-15)
    with pytest.raises(ValueError, match="noise_multiplier"):
        NoiseSpec(-1.0, 1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        NoiseSpec(1.0, 0.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        noise_std(1.0, float("nan"))


# ----------------------------------------------------------------------------- distribution


def test_seeded_noise_has_std_sigma_c_and_wrong_scales_are_rejected() -> None:
    samples = NoiseSource(seed=2024).normal((NUM,), STD)
    assert samples.dtype == np.float64
    right, low, high = _ks_pvalues(samples, STD)
    assert right > 1e-2
    assert low < 1e-12 and high < 1e-12


def test_secure_noise_has_std_sigma_c_and_wrong_scales_are_rejected() -> None:
    samples = NoiseSource(secure_mode=True).normal((NUM,), STD)
    right, low, high = _ks_pvalues(samples, STD)
    assert right > 1e-6  # unseedable: a false failure has probability 1e-6
    assert low < 1e-12 and high < 1e-12


def test_secure_noise_sums_four_inverse_cdf_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    # word layout: bit 0 = sign, bits 12..63 = k, u = (k + 1/2) 2^-53, |z| = Phi^-1(1 - u)
    ks = [2**51, 2**50, 3 * 2**50, 12345]
    signs = [0, 1, 0, 1]
    words = np.array([(k << 12) | s for k, s in zip(ks, signs)], dtype=np.uint64)
    stream = iter(words)
    monkeypatch.setattr(
        noise_module, "_os_words", lambda n: np.array([next(stream) for _ in range(n)])
    )
    got = NoiseSource(secure_mode=True).normal((1,), 2.0)
    assert next(stream, None) is None  # exactly four draws were used
    zs = [(-1.0 if s else 1.0) * stats.norm.isf((k + 0.5) / 2.0**53) for k, s in zip(ks, signs)]
    assert_close(got, np.array([2.0 * sum(zs) / math.sqrt(4)]), rtol=1e-13)


def test_secure_mode_refuses_seed() -> None:
    with pytest.raises(ValueError, match=r"seed=3.*secure_mode=True"):
        NoiseSource(seed=3, secure_mode=True)


def test_secure_draws_are_unpredictable() -> None:
    a = NoiseSource(secure_mode=True).normal((8,), 1.0)
    b = NoiseSource(secure_mode=True).normal((8,), 1.0)
    assert not np.array_equal(a, b)


# ----------------------------------------------------------------------------- reproducibility


def test_seeded_stream_is_the_pcg64_normal_stream() -> None:
    source = NoiseSource(seed=17)
    got = [source.normal((3, 2), 0.5), source.normal(4, 2.0)]
    rng = np.random.Generator(np.random.PCG64(17))
    expected = [rng.standard_normal((3, 2)) * 0.5, rng.standard_normal(4) * 2.0]
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))
    again = NoiseSource(seed=17).normal((3, 2), 0.5)
    assert np.array_equal(again, got[0])
    assert not np.array_equal(NoiseSource(seed=18).normal((3, 2), 0.5), got[0])


def test_zero_std_gives_zeros_but_advances_the_stream() -> None:
    a, b = NoiseSource(seed=5), NoiseSource(seed=5)
    assert not a.normal((4,), 0.0).any()
    b.normal((4,), 1.0)
    assert np.array_equal(a.normal((3,), 1.0), b.normal((3,), 1.0))


def test_state_round_trip_continues_the_stream() -> None:
    source = NoiseSource(seed=99)
    source.normal((10,), 1.0)
    saved = json.loads(json.dumps(source.state_dict()))
    expected = source.normal((5, 3), 1.5)
    resumed = NoiseSource(seed=1)
    resumed.load_state_dict(saved)
    assert np.array_equal(resumed.normal((5, 3), 1.5), expected)


def test_load_state_dict_validates_before_mutating() -> None:
    source = NoiseSource(seed=4)
    before = source.state_dict()
    with pytest.raises(ValueError, match="secure_mode"):
        source.load_state_dict(NoiseSource(secure_mode=True).state_dict())
    with pytest.raises(ValueError, match="PCG64"):
        source.load_state_dict(dict(before, bit_generator_state={"bit_generator": "Philox"}))
    with pytest.raises(ValueError, match="state_dict"):
        source.load_state_dict({"nothing": 1})
    assert source.state_dict() == before
    secure = NoiseSource(secure_mode=True)
    with pytest.raises(ValueError, match="secure_mode"):
        secure.load_state_dict(before)


def test_gaussian_noise_like_draws_in_list_order() -> None:
    arrays = [np.zeros((2, 3), dtype=np.float32), np.zeros(4), np.zeros(())]
    got = gaussian_noise_like(arrays, 0.3, NoiseSource(seed=8))
    source = NoiseSource(seed=8)
    expected = [source.normal(a.shape, 0.3) for a in arrays]
    assert [g.shape for g in got] == [(2, 3), (4,), ()]
    assert all(g.dtype == np.float64 for g in got)
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))


def test_argument_errors() -> None:
    source = NoiseSource(seed=0)
    with pytest.raises(ValueError, match="std"):
        source.normal((2,), -1.0)
    with pytest.raises(ValueError, match="shape"):
        source.normal((2, -1), 1.0)
    with pytest.raises(ValueError, match="seed"):
        NoiseSource(seed=-1)
    with pytest.raises(TypeError, match="NoiseSource"):
        gaussian_noise_like([np.zeros(2)], 1.0, source=None)  # type: ignore[arg-type]
