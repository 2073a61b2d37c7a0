"""Tests for dpcore.clipping.

Oracles: the clip-factor formula evaluated scalar by scalar with ``math``;
explicit per-example Python loops over flattened gradients; the closed form of
Andrew et al.'s Theorem 1 and a hand-derived geometric update.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from dpcore.clipping import (
    CLIP_EPSILON,
    AdaptiveClipping,
    FlatClipping,
    PerLayerClipping,
    adaptive_clip_update,
    adaptive_noise_multipliers,
    averaging_denominator,
    clip_and_sum,
    clip_and_sum_per_layer,
    clip_factor,
    clipping_spec,
    count_nonfinite,
    count_unclipped,
    per_example_norms,
    per_layer_noise_norm,
)
from tests.tolerance import assert_close

SHAPES = [(3, 4), (4,), (2, 2, 3)]


def _grads(batch: int, seed: int = 0) -> list[np.ndarray]:
    """Per-example gradients whose norms span ~0.01 to ~100 (both sides of C = 1)."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-2, 2, batch)
    return [rng.standard_normal((batch, *s)) * scales.reshape((-1,) + (1,) * len(s)) / 5
            for s in SHAPES]


def _example_flat(grads: list[np.ndarray], i: int) -> np.ndarray:
    return np.concatenate([g[i].ravel() for g in grads])


# ----------------------------------------------------------------------------- clip factor


def test_clip_factor_matches_formula_including_nonfinite() -> None:
    norms = [0.0, 0.3, 1.0 - 1e-6, 1.0, 1.0 + 1e-9, 2.5, 1e12, float("nan"), float("inf"),
             float("-inf")]
    c = 1.0
    expected = [min(1.0, c / (n + 1e-6)) if math.isfinite(n) else 0.0 for n in norms]
    assert_close(clip_factor(norms, c), np.array(expected), rtol=1e-15)
    assert count_nonfinite(norms) == 3
    assert CLIP_EPSILON == 1e-6
    assert clip_factor(np.array([]), 1.0).shape == (0,)


def test_clip_factor_argument_errors() -> None:
    with pytest.raises(ValueError, match="max_grad_norm"):
        clip_factor([1.0], 0.0)
    with pytest.raises(ValueError, match="norms must be >= 0"):
        clip_factor([-1.0], 1.0)


def test_count_unclipped_counts_finite_norms_at_most_c() -> None:
    assert count_unclipped([0.5, 1.0, 1.0 + 1e-12, float("nan"), 0.0, float("inf")], 1.0) == 3


# ----------------------------------------------------------------------------- norms


def test_per_example_norms_over_all_parameters() -> None:
    grads = _grads(9)
    expected = [float(np.linalg.norm(_example_flat(grads, i))) for i in range(9)]
    assert_close(per_example_norms(grads), np.array(expected), rtol=1e-13)
    assert per_example_norms([np.zeros((0, 3))]).shape == (0,)


def test_per_example_norms_rejects_mismatched_batch_axes() -> None:
    with pytest.raises(ValueError, match="leading"):
        per_example_norms([np.zeros((2, 3)), np.zeros((3, 3))])
    with pytest.raises(ValueError, match="empty"):
        per_example_norms([])


# ----------------------------------------------------------------------------- flat clipping


@pytest.mark.parametrize("c", [0.1, 1.0, 7.0])
def test_flat_clip_and_sum_matches_explicit_loop(c: float) -> None:
    grads = _grads(11, seed=1)
    expected = [np.zeros(g.shape[1:]) for g in grads]
    clipped_norms = []
    for i in range(11):
        norm = math.sqrt(sum(float(np.sum(g[i] ** 2)) for g in grads))
        factor = min(1.0, c / (norm + 1e-6))
        clipped_norms.append(factor * norm)
        for acc, g in zip(expected, grads):
            acc += factor * g[i]
    assert max(clipped_norms) <= c
    assert min(n for n in clipped_norms) < c  # some examples were not clipped ...
    assert sum(n > 0.99 * c for n in clipped_norms) >= 1  # ... and some were
    assert_close(clip_and_sum(grads, c), expected, rtol=1e-12, atol=1e-14)


def test_flat_clipping_drops_nonfinite_examples() -> None:
    grads = _grads(6, seed=2)
    poisoned = [g.copy() for g in grads]
    poisoned[1][2, 0] = np.nan
    poisoned[0][4, 1, 1] = np.inf
    keep = [0, 1, 3, 5]
    clean = [g[keep] for g in grads]
    assert count_nonfinite(per_example_norms(poisoned)) == 2
    result = clip_and_sum(poisoned, 1.0)
    assert all(np.all(np.isfinite(r)) for r in result)
    assert_close(result, clip_and_sum(clean, 1.0), rtol=1e-14)


def test_clip_and_sum_of_empty_batch_is_zero() -> None:
    out = clip_and_sum([np.zeros((0, 3, 2))], 1.0)
    assert out[0].shape == (3, 2) and not out[0].any()


# ----------------------------------------------------------------------------- per-layer clipping


def test_per_layer_clip_and_sum_matches_loop_and_bounds_each_parameter() -> None:
    grads = _grads(10, seed=3)
    bounds = (0.5, 0.2, 1.5)
    expected = [np.zeros(g.shape[1:]) for g in grads]
    for i in range(10):
        for acc, g, c in zip(expected, grads, bounds):
            norm = float(np.linalg.norm(g[i].ravel()))
            factor = min(1.0, c / (norm + 1e-6))
            assert factor * norm <= c
            acc += factor * g[i]
    assert_close(clip_and_sum_per_layer(grads, bounds), expected, rtol=1e-12, atol=1e-14)
    # flat clipping with C = sqrt(sum C_i^2) is a different operator
    flat = clip_and_sum(grads, per_layer_noise_norm(bounds))
    assert not np.allclose(flat[1], expected[1])


def test_per_layer_drops_the_whole_nonfinite_example() -> None:
    grads = _grads(5, seed=4)
    poisoned = [g.copy() for g in grads]
    poisoned[2][3, 0, 0, 0] = np.nan
    keep = [0, 1, 2, 4]
    bounds = [1.0, 1.0, 1.0]
    assert_close(clip_and_sum_per_layer(poisoned, bounds),
                 clip_and_sum_per_layer([g[keep] for g in grads], bounds), rtol=1e-14)


def test_per_layer_argument_errors() -> None:
    with pytest.raises(ValueError, match="one bound per trainable parameter"):
        clip_and_sum_per_layer(_grads(2), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"max_grad_norms\[1\]"):
        clip_and_sum_per_layer(_grads(2), [1.0, -1.0, 1.0])


def test_per_layer_noise_norm() -> None:
    assert_close(per_layer_noise_norm([3.0, 4.0]), 5.0, rtol=1e-15)
    assert_close(PerLayerClipping([1.0, 2.0, 2.0]).noise_norm, 3.0, rtol=1e-15)
    assert FlatClipping(2.5).noise_norm == 2.5


def test_averaging_denominator() -> None:
    assert averaging_denominator("mean", 256) == 256
    assert averaging_denominator("sum", 256) == 1
    with pytest.raises(ValueError, match="loss_reduction"):
        averaging_denominator("avg", 256)
    with pytest.raises(ValueError, match="expected_batch_size"):
        averaging_denominator("mean", 0)


# ----------------------------------------------------------------------------- adaptive clipping


def test_adaptive_noise_split_closed_form() -> None:
    # z = 1, sigma_b = 5: z_grad^-2 = 1 - 1/100  =>  z_grad = 1 / sqrt(0.99)
    assert_close(adaptive_noise_multipliers(1.0, 5.0, 100), 1.0 / math.sqrt(0.99), rtol=1e-14)
    for z, sigma_b in [(0.5, 1.0), (1.1, 12.8), (3.0, 1.6)]:
        z_grad = adaptive_noise_multipliers(z, sigma_b, 256)
        # the pair (gradient, centred count) composes to exactly one Gaussian with z
        assert_close(z_grad**-2 + (2 * sigma_b) ** -2, z**-2, rtol=1e-12)
        assert z_grad > z
    # default sigma_b = m / 20
    assert_close(adaptive_noise_multipliers(1.0, None, 200), 1.0 / math.sqrt(1 - 1 / 400),
                 rtol=1e-14)
    assert adaptive_noise_multipliers(0.0, 1.0, 10) == 0.0


def test_adaptive_noise_split_rejects_too_little_count_noise() -> None:
    with pytest.raises(ValueError, match="unclipped_num_std=0.5 is too small"):
        adaptive_noise_multipliers(1.0, 0.5, 100)
    with pytest.raises(ValueError, match="unclipped_num_std"):
        adaptive_noise_multipliers(2.0, 0.9, 100)


def test_adaptive_update_hand_derived() -> None:
    # m = 100, realised batch 100, 70 unclipped, count noise +5:
    # centred count 70 - 50 + 5 = 25, fraction 25 / 100 + 1/2 = 0.75,
    # C' = 1 * exp(-0.2 * (0.75 - 0.5)) = exp(-0.05)
    new = adaptive_clip_update(1.0, 70, 5.0, 100, 0.5, 0.2, 1e-8, 1e8, batch_size=100)
    assert_close(new, math.exp(-0.05), rtol=1e-15)
    # realised batch 80 of m = 100, 60 unclipped, noise -2: (60 - 40 - 2) / 100 + 0.5 = 0.68
    new = adaptive_clip_update(2.0, 60, -2.0, 100, 0.9, 0.5, 1e-8, 1e8, batch_size=80)
    assert_close(new, 2.0 * math.exp(-0.5 * (0.68 - 0.9)), rtol=1e-15)


def test_adaptive_update_clamps_fraction_and_bound() -> None:
    # a huge positive noise saturates the fraction at 1: C' = C exp(-eta (1 - gamma))
    new = adaptive_clip_update(1.0, 0, 1e9, 10, 0.5, 0.2, 1e-8, 1e8, batch_size=10)
    assert_close(new, math.exp(-0.1), rtol=1e-15)
    assert adaptive_clip_update(1.0, 0, -1e9, 10, 0.5, 10.0, 0.1, 2.0, batch_size=10) == 2.0
    assert adaptive_clip_update(1.0, 10, 1e9, 10, 0.0, 10.0, 0.5, 2.0, batch_size=10) == 0.5


def test_adaptive_update_argument_errors() -> None:
    with pytest.raises(ValueError, match="exceeds batch_size"):
        adaptive_clip_update(1.0, 11, 0.0, 10, 0.5, 0.2, 1e-8, 1e8, batch_size=10)
    with pytest.raises(ValueError, match="min_clipbound must be < max_clipbound"):
        adaptive_clip_update(1.0, 1, 0.0, 10, 0.5, 0.2, 2.0, 1.0, batch_size=10)
    with pytest.raises(TypeError, match="batch_size"):
        adaptive_clip_update(1.0, 1, 0.0, 10, 0.5, 0.2, 1e-8, 1e8)  # type: ignore[call-arg]


def test_adaptive_spec_update_and_noise_delegate() -> None:
    spec = AdaptiveClipping(1.0, target_unclipped_quantile=0.5, clipbound_learning_rate=0.2)
    assert spec.count_noise_std(100) == 5.0
    assert spec.gradient_noise_multiplier(1.0, 100) == adaptive_noise_multipliers(1.0, 5.0, 100)
    assert spec.update(1.0, 70, 5.0, 100, batch_size=100) == adaptive_clip_update(
        1.0, 70, 5.0, 100, 0.5, 0.2, 1e-8, 1e8, batch_size=100
    )
    assert AdaptiveClipping(1.0, unclipped_num_std=3.0).count_noise_std(100) == 3.0


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: FlatClipping(0.0), ValueError, "max_grad_norm must be a finite number > 0"),
        (lambda: FlatClipping(float("inf")), ValueError, "max_grad_norm"),
        (lambda: FlatClipping("1"), TypeError, "max_grad_norm must be a real number"),
        (lambda: PerLayerClipping(()), ValueError, "at least one clipping bound"),
        (lambda: PerLayerClipping((1.0, -2.0)), ValueError, r"max_grad_norms\[1\]"),
        (lambda: PerLayerClipping(1.0), TypeError, "sequence of positive floats"),
        (lambda: AdaptiveClipping(0.0), ValueError, "initial_max_grad_norm"),
        (lambda: AdaptiveClipping(10.0, max_clipbound=5.0), ValueError, r"\[min_clipbound"),
        (lambda: AdaptiveClipping(1.0, min_clipbound=2.0, max_clipbound=1.5), ValueError,
         "min_clipbound must be < max_clipbound"),
        (lambda: AdaptiveClipping(1.0, target_unclipped_quantile=1.5), ValueError,
         "target_unclipped_quantile must be in"),
        (lambda: AdaptiveClipping(1.0, clipbound_learning_rate=-0.1), ValueError,
         "clipbound_learning_rate"),
        (lambda: AdaptiveClipping(1.0, unclipped_num_std=0.0), ValueError, "unclipped_num_std"),
    ],
)
def test_spec_validation_errors(make, error, message) -> None:
    with pytest.raises(error, match=message):
        make()


def test_specs_are_frozen_and_normalised() -> None:
    spec = PerLayerClipping([1, 2])
    assert spec.max_grad_norms == (1.0, 2.0)
    assert FlatClipping(1).max_grad_norm == 1.0 and isinstance(FlatClipping(1).max_grad_norm, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.max_grad_norms = (3.0,)  # type: ignore[misc]
    assert FlatClipping(1.0) == FlatClipping(1.0)


def test_clipping_spec_converter() -> None:
    assert clipping_spec("flat", 1.5) == FlatClipping(1.5)
    assert clipping_spec("per_layer", [1.0, 2.0]) == PerLayerClipping((1.0, 2.0))
    ada = clipping_spec("adaptive", 0.5, target_unclipped_quantile=0.7)
    assert ada == AdaptiveClipping(0.5, target_unclipped_quantile=0.7)
    assert clipping_spec(ada) is ada
    with pytest.raises(ValueError, match='"flat", "per_layer" or "adaptive"'):
        clipping_spec("layerwise", 1.0)
    with pytest.raises(TypeError, match='use clipping="per_layer"'):
        clipping_spec("flat", [1.0, 2.0])
    with pytest.raises(TypeError, match="one bound per parameter"):
        clipping_spec("per_layer", 1.0)
    with pytest.raises(TypeError, match="options of clipping"):
        clipping_spec("flat", 1.0, target_unclipped_quantile=0.5)
    with pytest.raises(ValueError, match="needs max_grad_norm"):
        clipping_spec("flat")


def test_check_adaptive_options_names_unexpected_and_missing_options() -> None:
    from dpcore.clipping import ADAPTIVE_OPTIONS, check_adaptive_options

    good = dict(target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=10.0,
                min_clipbound=0.1, unclipped_num_std=20.0)
    assert set(good) == set(ADAPTIVE_OPTIONS)
    check_adaptive_options(good, "adaptive", 1.0, 1.0, 64, require_all=True, batch_hint="")
    check_adaptive_options({}, "adaptive", 1.0, 1.0, 64, require_all=False, batch_hint="")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['max_clipbound'\] for clipping='flat'"):
        check_adaptive_options({"max_clipbound": 1.0}, "flat", 1.0, 1.0, 64, require_all=True, batch_hint="")
    with pytest.raises(TypeError, match=r"missing \['unclipped_num_std'\], unexpected \['typo'\]"):
        options = {**good, "typo": 1}
        del options["unclipped_num_std"]
        check_adaptive_options(options, "adaptive", 1.0, 1.0, 64, require_all=True, batch_hint="")
    with pytest.raises(ValueError, match="expected_batch_size.*use a larger sample_rate"):
        check_adaptive_options(good, "adaptive", 1.0, 1.0, None, require_all=False,
                               batch_hint="use a larger sample_rate.")
