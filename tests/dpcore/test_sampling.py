"""Tests for dpcore.sampling.

Oracles: the Binomial(N, q) law of Poisson batch sizes (chi-square goodness of
fit, which must also reject a wrong q); Binomial(steps, q) inclusion counts; a
pure-Python implementation of the PCG64 generator (128-bit LCG + XSL-RR output)
for the cross-platform pin; the single-process plan for the distributed union;
and direct set arithmetic for bucketing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from dpcore.sampling import (
    DistributedPoissonSampler,
    PoissonSampler,
    ShuffledBatchSampler,
    UniformWithReplacementSampler,
    bucket_sizes,
    expected_batch_size,
    pad_to_buckets,
    poisson_batches,
    shard_plan,
    steps_for_epochs,
    steps_per_epoch,
)

# ----------------------------------------------------------------------------- helpers


def _binomial_chi2_pvalue(sizes: np.ndarray, n: int, q: float, num_bins: int = 20) -> float:
    """Chi-square p-value of observed batch sizes against Binomial(n, q).

    Bins are cut at Binomial quantiles so every bin has a sizeable expected count.
    """
    cuts = np.unique(stats.binom.ppf(np.linspace(0, 1, num_bins + 1)[1:-1], n, q))
    probs = np.diff(np.concatenate([[0.0], stats.binom.cdf(cuts, n, q), [1.0]]))
    observed = np.bincount(np.searchsorted(cuts, sizes, side="left"), minlength=probs.size)
    expected = probs * sizes.size
    stat = float(np.sum((observed - expected) ** 2 / expected))
    return float(stats.chi2.sf(stat, df=probs.size - 1))


def _pcg64_uniforms(seed: int, count: int) -> list[float]:
    """Uniforms of numpy's Generator(PCG64(seed)).random, derived in pure Python.

    Only the seeding (SeedSequence -> initial 128-bit state and increment) is taken
    from numpy; the LCG step, the XSL-RR output function and the 53-bit float
    conversion are written out from the PCG64 specification.
    """
    init = np.random.PCG64(seed).state["state"]
    state, inc = init["state"], init["inc"]
    mult = 0x2360ED051FC65DA44385DF649FCCF645
    mask128, mask64 = (1 << 128) - 1, (1 << 64) - 1
    out = []
    for _ in range(count):
        state = (state * mult + inc) & mask128
        xored = ((state >> 64) ^ state) & mask64
        rot = state >> 122
        word = ((xored >> rot) | (xored << ((64 - rot) & 63))) & mask64
        out.append((word >> 11) / 2.0**53)
    return out


# ----------------------------------------------------------------------------- helpers API


def test_expected_batch_size_is_truncated_product() -> None:
    assert expected_batch_size(60000, 256 / 60000) == int(60000 * (256 / 60000))
    assert expected_batch_size(100, 0.29) == int(100 * 0.29)  # 28: truncation, as specified
    assert expected_batch_size(10, 1.0) == 10


def test_expected_batch_size_zero_raises_with_advice() -> None:
    with pytest.raises(ValueError, match=r"sample_rate.*loss_reduction=\"sum\""):
        expected_batch_size(100, 0.001)
    with pytest.raises(TypeError, match="num_samples"):
        expected_batch_size(10.0, 0.5)
    with pytest.raises(ValueError, match="sample_rate"):
        expected_batch_size(10, 0.0)


def test_expected_batch_size_sum_reduction_allows_zero() -> None:
    assert expected_batch_size(100, 0.001, "sum") is None  # "sum" never divides by it
    assert expected_batch_size(100, 0.29, "sum") == 28 == expected_batch_size(100, 0.29, "mean")
    with pytest.raises(ValueError, match="loss_reduction must be one of 'mean', 'sum', got 'avg'"):
        expected_batch_size(100, 0.5, "avg")
    with pytest.raises(ValueError, match="sample_rate"):
        expected_batch_size(100, 0.0, "sum")  # invalid input still raises


@pytest.mark.parametrize(
    "epochs, epoch_steps, steps",
    [(1, 7, 7), (2.5, 3, 8), (0.5, 7, 4), (1e-6, 3, 1), (3 / 17, 85, 15), (3 / 11, 55, 15)],
)
def test_steps_for_epochs_rounds_up_except_near_integers(
    epochs: float, epoch_steps: int, steps: int
) -> None:
    assert steps_for_epochs(epochs, epoch_steps) == steps
    product = epochs * epoch_steps
    if abs(product - round(product)) > 1e-6:
        assert steps == max(1, math.ceil(product))  # the closed form away from integers


def test_steps_for_epochs_near_integer_is_not_one_too_many() -> None:
    assert 3 / 17 * 85 > 15  # floating point lands just above 15
    assert steps_for_epochs(3 / 17, 85) == 15


@pytest.mark.parametrize(
    "epochs, epoch_steps, error, match",
    [
        (True, 3, TypeError, "epochs must be a number"),
        ("2", 3, TypeError, "epochs must be a number"),
        (0, 3, ValueError, "epochs must be a finite number > 0, got 0"),
        (math.inf, 3, ValueError, "epochs must be a finite number > 0, got inf"),
        (math.nan, 3, ValueError, "epochs must be a finite number"),
        (1.0, 0, ValueError, "epoch_steps must be an integer >= 1, got 0"),
        (1.0, 2.0, TypeError, "epoch_steps must be an integer"),
    ],
)
def test_steps_for_epochs_rejects_bad_arguments(
    epochs: object, epoch_steps: object, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        steps_for_epochs(epochs, epoch_steps)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "q, steps", [(0.01, 100), (0.4, 2), (0.3, 3), (1.0, 1), (0.003, 333), (0.9, 1)]
)
def test_steps_per_epoch_is_rounded_inverse(q: float, steps: int) -> None:
    assert steps_per_epoch(q) == steps == max(1, round(1 / q))


# ----------------------------------------------------------------------------- Poisson law


def test_batch_sizes_follow_binomial_and_wrong_q_is_rejected() -> None:
    n, q = 500, 0.04
    sizes = np.array([b.size for b in PoissonSampler(n, q, steps=3000, seed=2024)])
    assert _binomial_chi2_pvalue(sizes, n, q) > 1e-3
    assert _binomial_chi2_pvalue(sizes, n, 1.2 * q) < 1e-12
    assert _binomial_chi2_pvalue(sizes, n, 0.9 * q) < 1e-6


def test_inclusion_frequency_per_example_is_q() -> None:
    n, q, steps = 100, 0.1, 4000
    counts = np.zeros(n)
    for batch in PoissonSampler(n, q, steps=steps, seed=7):
        counts[batch] += 1

    def pvalue(rate: float) -> float:
        z2 = (counts - steps * rate) ** 2 / (steps * rate * (1 - rate))
        return float(stats.chi2.sf(z2.sum(), df=n))

    assert pvalue(q) > 1e-3
    assert pvalue(1.1 * q) < 1e-12
    assert np.max(np.abs(counts - steps * q)) < 5 * math.sqrt(steps * q * (1 - q))


def test_batches_are_sorted_unique_int64_in_range() -> None:
    for batch in PoissonSampler(57, 0.3, steps=20, seed=1):
        assert batch.dtype == np.int64 and batch.ndim == 1
        assert np.all(np.diff(batch) > 0)
        assert batch.size == 0 or (batch[0] >= 0 and batch[-1] < 57)


def test_empty_batches_are_real_steps() -> None:
    batches = poisson_batches(10, 1e-3, 50, seed=3)
    assert len(batches) == 50
    empty = [b for b in batches if b.size == 0]
    assert len(empty) >= 45
    assert all(b.dtype == np.int64 and b.shape == (0,) for b in empty)


def test_default_steps_and_len() -> None:
    sampler = PoissonSampler(100, 0.07, seed=0)
    assert len(sampler) == sampler.steps == round(1 / 0.07)
    assert len(list(sampler)) == len(sampler)
    assert len(PoissonSampler(100, 0.07, steps=3, seed=0)) == 3


# ----------------------------------------------------------------------------- determinism


def test_seeded_plans_are_reproducible_and_seed_dependent() -> None:
    a = poisson_batches(300, 0.05, 10, seed=11)
    b = [batch for batch in PoissonSampler(300, 0.05, steps=10, seed=11)]
    c = poisson_batches(300, 0.05, 10, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_plan_matches_pure_python_pcg64_derivation() -> None:
    """Pins the exact draw: batch t = {i : u[t*N + i] < q}, u the PCG64 uniform stream."""
    n, q, steps, seed = 13, 0.3, 4, 20240601
    uniforms = _pcg64_uniforms(seed, n * steps)
    expected = [
        [i for i in range(n) if uniforms[t * n + i] < q] for t in range(steps)
    ]
    got = poisson_batches(n, q, steps, seed)
    assert [b.tolist() for b in got] == expected
    # the same rule stated with numpy's public API
    rng = np.random.Generator(np.random.PCG64(seed))
    direct = [np.flatnonzero(rng.random(n) < q).tolist() for _ in range(steps)]
    assert direct == expected
    assert any(expected) and any(len(b) < n for b in expected)


def test_successive_epochs_continue_the_stream() -> None:
    sampler = PoissonSampler(40, 0.25, seed=5)
    first, second = list(sampler), list(sampler)
    flat = poisson_batches(40, 0.25, 2 * len(sampler), seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(first + second, flat))


def test_uniform_with_replacement_is_poisson() -> None:
    a = list(UniformWithReplacementSampler(80, 0.1, steps=6, seed=9))
    b = poisson_batches(80, 0.1, 6, seed=9)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- secure mode


def test_secure_mode_refuses_seed() -> None:
    with pytest.raises(ValueError, match=r"seed=0.*secure_mode=True"):
        PoissonSampler(10, 0.1, seed=0, secure_mode=True)
    with pytest.raises(ValueError, match=r"seed.*secure_mode"):
        DistributedPoissonSampler(10, 0.1, rank=0, world_size=2, seed=1, secure_mode=True)


def test_secure_mode_batch_sizes_follow_binomial() -> None:
    n, q = 500, 0.04
    sampler = PoissonSampler(n, q, steps=1500, secure_mode=True)
    sizes = np.array([b.size for b in sampler])
    # not seedable: a false failure has probability 1e-6
    assert _binomial_chi2_pvalue(sizes, n, q) > 1e-6
    assert _binomial_chi2_pvalue(sizes, n, 1.2 * q) < 1e-6
    assert sampler.state_dict()["bit_generator_state"] is None


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("consumed", [0, 3, 10])
def test_state_dict_resume_gives_identical_continuation(consumed: int) -> None:
    original = PoissonSampler(64, 0.1, seed=42)  # 10 steps per epoch
    it = iter(original)
    for _ in range(consumed):
        next(it)
    saved = json.loads(json.dumps(original.state_dict()))
    expected = list(it) + list(original)  # rest of this epoch, then a full epoch

    resumed = PoissonSampler(64, 0.1, seed=None)
    resumed.load_state_dict(saved)
    # a finished epoch (consumed == 10) makes the resumed sampler start a new one
    got = list(resumed) + (list(resumed) if consumed < 10 else [])
    assert len(got) == len(expected)
    assert all(np.array_equal(x, y) for x, y in zip(got, expected))


def test_load_state_dict_validates_before_mutating() -> None:
    sampler = PoissonSampler(64, 0.1, seed=1)
    before = sampler.state_dict()
    other = PoissonSampler(65, 0.1, seed=1).state_dict()
    with pytest.raises(ValueError, match="config"):
        sampler.load_state_dict(other)
    bad = dict(before, bit_generator_state={"bit_generator": "MT19937"})
    with pytest.raises(ValueError, match="PCG64"):
        sampler.load_state_dict(bad)
    with pytest.raises(ValueError, match="secure_mode"):
        sampler.load_state_dict(PoissonSampler(64, 0.1, secure_mode=True).state_dict())
    with pytest.raises(ValueError, match="batches_drawn"):
        sampler.load_state_dict(dict(before, batches_drawn=11))
    assert sampler.state_dict() == before


# ----------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_union_equals_single_process_plan(world_size: int) -> None:
    n, q, steps, seed = 103, 0.1, 25, 77
    single = poisson_batches(n, q, steps, seed)
    per_rank = [
        list(DistributedPoissonSampler(n, q, rank=r, world_size=world_size, steps=steps, seed=seed))
        for r in range(world_size)
    ]
    for t in range(steps):
        parts = [per_rank[r][t] for r in range(world_size)]
        for r, part in enumerate(parts):
            assert np.all(part % world_size == r)
            assert np.array_equal(part, shard_plan([single[t]], r, world_size)[0])
        union = np.sort(np.concatenate(parts))
        assert np.array_equal(union, single[t])
        assert sum(p.size for p in parts) == single[t].size  # disjoint


def test_distributed_secure_mode_stays_on_shard() -> None:
    sampler = DistributedPoissonSampler(50, 0.5, rank=1, world_size=3, steps=5, secure_mode=True)
    for batch in sampler:
        assert np.all(batch % 3 == 1)


def test_distributed_argument_errors() -> None:
    with pytest.raises(ValueError, match="rank"):
        DistributedPoissonSampler(10, 0.1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        DistributedPoissonSampler(10, 0.1, rank=0, world_size=0)


# ----------------------------------------------------------------------------- shuffled


def test_shuffled_batches_partition_each_epoch() -> None:
    sampler = ShuffledBatchSampler(23, 5, seed=0)
    assert len(sampler) == 5
    for _ in range(2):
        batches = list(sampler)
        assert [b.size for b in batches] == [5, 5, 5, 5, 3]
        assert sorted(np.concatenate(batches).tolist()) == list(range(23))
    dropped = list(ShuffledBatchSampler(23, 5, seed=0, drop_last=True))
    assert [b.size for b in dropped] == [5, 5, 5, 5]


def test_shuffled_permutation_rule_and_resume() -> None:
    sampler = ShuffledBatchSampler(17, 4, seed=3)
    rng = np.random.Generator(np.random.PCG64(3))
    perm = np.argsort(rng.random(17), kind="stable")
    it = iter(sampler)
    first = [next(it), next(it)]
    assert np.array_equal(np.concatenate(first), perm[:8])
    saved = json.loads(json.dumps(sampler.state_dict()))
    expected = list(it) + list(sampler)
    resumed = ShuffledBatchSampler(17, 4, seed=99)
    resumed.load_state_dict(saved)
    got = list(resumed) + list(resumed)
    assert all(np.array_equal(x, y) for x, y in zip(got, expected)) and len(got) == len(expected)


# ----------------------------------------------------------------------------- bucketing


@pytest.mark.parametrize("m", [1, 7, 64, 256, 1000])
def test_bucket_sizes_cover_six_sigma_and_increase(m: int) -> None:
    buckets = bucket_sizes(m)
    assert all(a < b for a, b in zip(buckets, buckets[1:]))
    assert buckets[0] >= 1 and len(buckets) <= 4
    assert buckets[-1] >= m + 6 * math.sqrt(m)
    capped = bucket_sizes(m, max_physical_batch_size=32)
    assert capped[-1] == min(32, buckets[-1]) and all(b <= 32 for b in capped)
    assert len(bucket_sizes(m, num_buckets=8)) <= 8
    assert bucket_sizes(m, num_buckets=1) == (buckets[-1],)


def test_pad_to_buckets_never_truncates_and_masks_are_exact() -> None:
    buckets = (3, 5, 8)
    rng = np.random.default_rng(0)
    for n in range(0, 30):
        indices = rng.permutation(1000)[:n] + 1  # never 0, so padding is recognisable
        chunks = pad_to_buckets(indices, buckets)
        assert len(chunks) == max(1, math.ceil(n / buckets[-1]))
        real = []
        for padded, mask in chunks:
            assert padded.dtype == np.int64 and mask.dtype == bool
            assert padded.size in buckets and mask.size == padded.size
            k = int(mask.sum())
            assert np.array_equal(mask, np.arange(mask.size) < k)  # exact prefix mask
            assert np.all(padded[~mask] == 0)
            # the chunk uses the smallest bucket that holds it
            assert padded.size == min(b for b in buckets if b >= k)
            real.append(padded[mask])
        assert np.array_equal(np.concatenate(real), indices)


def test_pad_empty_batch_gives_one_masked_chunk() -> None:
    chunks = pad_to_buckets(np.array([], dtype=np.int64), (4, 8))
    assert len(chunks) == 1
    padded, mask = chunks[0]
    assert padded.shape == (4,) and not mask.any()


def test_pad_to_buckets_argument_errors() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        pad_to_buckets(np.arange(3), (4, 4))
    with pytest.raises(ValueError, match="empty"):
        pad_to_buckets(np.arange(3), ())
    with pytest.raises(ValueError, match="1-D integer"):
        pad_to_buckets(np.zeros((2, 2), dtype=np.int64), (4,))
