"""Tests of dp_jax's Poisson batches (fixed bucket shapes, masks, splitting, resume)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dp_jax import PhysicalChunk, PoissonBatches, poisson_batches
from dpcore import sampling as core_sampling


def _indices(logical):
    """The example indices of one logical batch (data is arange(N))."""
    return np.concatenate([np.asarray(batch)[mask] for batch, mask in logical])


def test_same_seed_same_indices_as_dpcore_sampler():
    n, q, seed = 500, 0.03, 11
    batches = poisson_batches(np.arange(n), q, seed=seed)
    reference = core_sampling.PoissonSampler(n, q, seed=seed)
    got = [_indices(logical) for logical in batches]
    want = list(reference)
    assert len(got) == len(want) == round(1 / q)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_chunks_have_bucket_shapes_and_padding_is_masked_valid_rows():
    n, q = 300, 0.05
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(n)
    batches = poisson_batches({"x": x, "y": y}, q, seed=3)
    assert batches.buckets == core_sampling.bucket_sizes(int(n * q))
    for logical in batches:
        for chunk in logical:
            assert isinstance(chunk, PhysicalChunk)
            size = chunk.mask.shape[0]
            assert size in batches.buckets
            assert chunk.batch["x"].shape == (size, 3) and chunk.batch["y"].shape == (size,)
            assert chunk.mask.dtype == bool
            # every row is a real example (padding repeats a valid index)
            assert np.all(chunk.batch["x"][:, 0] == chunk.batch["y"])
            # unmasked rows come first, padding after
            k = int(chunk.mask.sum())
            assert chunk.mask[:k].all() and not chunk.mask[k:].any()


def test_batch_sizes_follow_binomial_and_reject_wrong_rate():
    n, q, steps = 400, 0.05, 2000
    batches = poisson_batches(np.arange(n), q, steps=steps, seed=7, buckets=[n])
    sizes = np.array([int(logical[0].mask.sum()) for logical in batches])
    support = np.arange(0, 60)

    def chi2_pvalue(rate):
        pmf = stats.binom.pmf(support, n, rate)
        # pool the tails into the end bins so every expected count is >= 5
        expected = pmf * steps
        observed = np.bincount(np.clip(sizes, 0, support[-1]), minlength=support.size)
        lo = np.searchsorted(np.cumsum(expected), 5.0)
        hi = support.size - np.searchsorted(np.cumsum(expected[::-1]), 5.0)
        e = np.concatenate([[expected[: lo + 1].sum()], expected[lo + 1 : hi - 1],
                            [expected[hi - 1 :].sum() + stats.binom.sf(support[-1], n, rate) * steps]])
        o = np.concatenate([[observed[: lo + 1].sum()], observed[lo + 1 : hi - 1],
                            [observed[hi - 1 :].sum()]])
        e = e * o.sum() / e.sum()
        return stats.chisquare(o, e).pvalue

    assert chi2_pvalue(q) > 1e-3
    assert chi2_pvalue(1.2 * q) < 1e-6


def test_oversized_batch_is_split_never_truncated():
    n, q = 200, 0.5
    batches = poisson_batches(np.arange(n), q, seed=1, max_physical_batch_size=16)
    reference = core_sampling.PoissonSampler(n, q, seed=1)
    assert max(batches.buckets) == 16
    for logical, want in zip(batches, reference):
        assert len(logical) == -(-want.size // 16)
        assert all(chunk.mask.shape[0] <= 16 for chunk in logical)
        np.testing.assert_array_equal(_indices(logical), want)


def test_empty_batch_is_one_all_masked_chunk():
    batches = poisson_batches(np.arange(50), 0.001, steps=20, seed=0)
    logicals = list(batches)
    assert len(logicals) == 20
    empties = [lg for lg in logicals if not any(c.mask.any() for c in lg)]
    assert empties, "expected empty Poisson batches at q=0.001, N=50"
    for logical in empties:
        assert len(logical) == 1 and logical[0].mask.shape == (batches.buckets[0],)


class _Dataset:
    """A map-style dataset returning (x, y) tuples."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((2,), i, np.float32), np.int64(i)


def test_indexable_dataset_is_stacked_with_numpy():
    batches = poisson_batches(_Dataset(120), 0.1, seed=5)
    reference = core_sampling.PoissonSampler(120, 0.1, seed=5)
    for logical, want in zip(batches, reference):
        got = np.concatenate([np.asarray(b[1])[m] for b, m in logical])
        np.testing.assert_array_equal(got, want)
        for (x, y), mask in logical:
            assert x.shape == (mask.shape[0], 2) and np.all(x[:, 0] == y)


def test_state_dict_resumes_exactly():
    data = np.arange(100)
    first = poisson_batches(data, 0.1, steps=30, seed=9)
    it = iter(first)
    for _ in range(12):
        next(it)
    state = first.state_dict()
    rest_original = [_indices(lg) for lg in it]
    second = poisson_batches(data, 0.1, steps=30, seed=123)
    second.load_state_dict(state)
    rest_resumed = [_indices(lg) for lg in second]
    assert len(rest_original) == len(rest_resumed) == 18
    for a, b in zip(rest_original, rest_resumed):
        np.testing.assert_array_equal(a, b)


def test_jax_key_seeds_reproducibly():
    import jax

    a = [_indices(lg) for lg in poisson_batches(np.arange(80), 0.1, key=jax.random.key(4))]
    b = [_indices(lg) for lg in poisson_batches(np.arange(80), 0.1, key=jax.random.key(4))]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": 1, "secure_mode": True}, ValueError, "secure_mode"),
        ({"seed": 1, "key": 0}, ValueError, "both seed"),
        ({"buckets": [4, 2]}, ValueError, "increasing"),
        ({"buckets": [8, 64], "max_physical_batch_size": 16}, ValueError, "max_physical"),
        ({"max_physical_batch_size": 0}, ValueError, "max_physical_batch_size"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        poisson_batches(np.arange(10), 0.2, **kwargs)


def test_bad_data_and_rate_raise():
    with pytest.raises(TypeError, match="data must be"):
        PoissonBatches(object(), 0.1)
    with pytest.raises(ValueError, match="leading axis"):
        poisson_batches({"x": np.zeros((3, 2)), "y": np.zeros(4)}, 0.5)
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_batches(np.arange(10), 1.5)


def test_secure_mode_draws_without_seed():
    batches = poisson_batches(np.arange(64), 0.25, steps=3, secure_mode=True)
    logicals = list(batches)
    assert len(logicals) == 3 and batches.sampler.secure_mode
