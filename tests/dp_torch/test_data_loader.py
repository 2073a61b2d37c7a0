"""Tests of dp_torch.data_loader and dp_torch.utils.uniform_sampler."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, TensorDataset

from dp_torch.data_loader import CollateFnWithEmpty, DPDataLoader, switch_generator
from dp_torch.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from dpcore import sampling as core_sampling


def tensor_dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 4, generator=g), torch.randint(0, 5, (n,), generator=g))


def binomial_gof_pvalue(sizes: np.ndarray, n: int, q: float) -> float:
    """Chi-square goodness of fit of batch sizes to Binomial(n, q), tails merged."""
    pmf = stats.binom.pmf(np.arange(n + 1), n, q)
    expected = pmf * sizes.size
    keep = np.flatnonzero(expected >= 5)
    lo, hi = keep[0], keep[-1]
    edges = list(range(lo, hi + 1))
    obs = [np.sum(sizes <= lo)] + [np.sum(sizes == k) for k in edges[1:-1]] + [np.sum(sizes >= hi)]
    exp = [stats.binom.cdf(lo, n, q)] + list(pmf[lo + 1 : hi]) + [stats.binom.sf(hi - 1, n, q)]
    exp = np.asarray(exp) * sizes.size
    return float(stats.chisquare(obs, exp).pvalue)


# --------------------------------------------------------------------------- sampling law


def test_dp_data_loader_batch_sizes_are_binomial_and_reject_wrong_rate():
    n, q = 200, 0.05
    dataset = TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1))
    loader = DPDataLoader(dataset, sample_rate=q, seed=2024)
    sizes = []
    for _ in range(75):  # 75 epochs of 20 steps
        sizes += [len(x) for (x,) in loader]
    sizes = np.asarray(sizes)
    assert sizes.size == 1500
    assert binomial_gof_pvalue(sizes, n, q) > 1e-3
    assert binomial_gof_pvalue(sizes, n, 1.2 * q) < 1e-8
    assert binomial_gof_pvalue(sizes, n, 0.8 * q) < 1e-8


def test_each_example_is_included_with_probability_q():
    n, q, steps = 50, 0.1, 4000
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, steps=steps, seed=3)
    counts = np.zeros(n)
    for batch in sampler:
        counts[batch] += 1
        assert batch == sorted(set(batch))
    # per-example inclusion counts ~ Binomial(steps, q): chi-square over examples
    chi2 = np.sum((counts - steps * q) ** 2 / (steps * q * (1 - q)))
    assert stats.chi2.sf(chi2, n) > 1e-3


def test_seeded_batches_are_dpcore_batches():
    dataset = TensorDataset(torch.arange(30))
    loader = DPDataLoader(dataset, sample_rate=0.2, seed=77)
    got = [x.tolist() for (x,) in loader]
    want = [b.tolist() for b in core_sampling.poisson_batches(30, 0.2, 5, 77)]
    assert got == want
    assert len(loader) == 5 == core_sampling.steps_per_epoch(0.2)


def test_torch_generator_gives_a_reproducible_plan():
    dataset = tensor_dataset()

    def plan(seed):
        g = torch.Generator().manual_seed(seed)
        loader = DPDataLoader(dataset, sample_rate=0.25, generator=g)
        return [y.tolist() for _, y in loader]

    assert plan(1) == plan(1)
    assert plan(1) != plan(2)


def test_epochs_continue_the_stream_and_state_dict_resumes():
    sampler = UniformWithReplacementSampler(num_samples=25, sample_rate=0.2, seed=8)
    epoch_one = list(sampler)
    it = iter(sampler)
    first = [next(it), next(it)]
    state = json.loads(json.dumps(sampler.state_dict()))
    rest = list(it)
    clone = UniformWithReplacementSampler(num_samples=25, sample_rate=0.2, seed=999)
    clone.load_state_dict(state)
    assert list(clone) == rest
    assert first + rest != epoch_one


def test_secure_mode_sampling():
    sampler = UniformWithReplacementSampler(num_samples=100, sample_rate=0.1, secure_mode=True)
    sizes = [len(b) for b in sampler for _ in range(1)]
    assert len(sizes) == 10 and all(0 <= s <= 100 for s in sizes)
    with pytest.raises(ValueError, match="secure_mode"):
        UniformWithReplacementSampler(num_samples=10, sample_rate=0.1, seed=1, secure_mode=True)
    with pytest.raises(ValueError, match="secure_mode"):
        DPDataLoader(tensor_dataset(), sample_rate=0.1, secure_mode=True,
                     generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not both"):
        UniformWithReplacementSampler(num_samples=10, sample_rate=0.1, seed=1,
                                      generator=torch.Generator())


# --------------------------------------------------------------------------- empty batches


class DictDataset(Dataset):
    def __init__(self, n: int = 12):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {
            "pixels": torch.full((2, 5), float(i), dtype=torch.float16),
            "mask": torch.tensor([True, False, i % 2 == 0]),
            "label": i,
            "name": f"example-{i}",
        }


Pair = collections.namedtuple("Pair", ["x", "y"])


class NamedTupleDataset(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return Pair(np.full((3,), i, dtype=np.float64), torch.tensor(i, dtype=torch.int32))


def empty_batches(loader, want=3):
    out = []
    for _ in range(50):
        for b in loader:
            leaves = b if isinstance(b, (list, tuple)) else list(b.values())
            if len(leaves[0]) == 0:
                out.append(b)
        if len(out) >= want:
            return out
    raise AssertionError("no empty batch drawn")


def test_empty_batches_of_tuples_have_right_shapes_and_dtypes():
    loader = DPDataLoader(tensor_dataset(20), sample_rate=0.05, seed=1)
    for x, y in empty_batches(loader):
        assert x.shape == (0, 3, 4) and x.dtype == torch.float32
        assert y.shape == (0,) and y.dtype == torch.int64


def test_empty_batches_of_dicts_keep_every_field():
    loader = DPDataLoader(DictDataset(), sample_rate=0.05, seed=4)
    for b in empty_batches(loader):
        assert set(b) == {"pixels", "mask", "label", "name"}
        assert b["pixels"].shape == (0, 2, 5) and b["pixels"].dtype == torch.float16
        assert b["mask"].shape == (0, 3) and b["mask"].dtype == torch.bool
        assert b["label"].shape == (0,) and b["label"].dtype == torch.int64
        assert b["name"] == []


def test_empty_batches_of_namedtuples_and_empty_first_batch():
    collate = CollateFnWithEmpty(
        torch.utils.data.default_collate, example=NamedTupleDataset()[0]
    )
    first = collate([])  # before any non-empty batch: learnt from the example
    assert isinstance(first, Pair)
    assert first.x.shape == (0, 3) and first.x.dtype == torch.float64
    assert first.y.shape == (0,) and first.y.dtype == torch.int32
    full = collate([NamedTupleDataset()[i] for i in range(4)])
    assert full.x.shape == (4, 3)
    # no example: the structure is learnt from the first non-empty batch
    learner = CollateFnWithEmpty(torch.utils.data.default_collate)
    learner([NamedTupleDataset()[1]])
    again = learner([])
    assert again.x.shape == (0, 3) and isinstance(again, Pair)


def test_batch_first_false_and_rand_on_empty():
    collate = CollateFnWithEmpty(
        torch.utils.data.default_collate, batch_first=False, example=(torch.zeros(7, 2), 3)
    )
    x, y = collate([])
    assert x.shape == (1, 0, 2) and y.shape == (0,)
    rand = CollateFnWithEmpty(torch.utils.data.default_collate, rand_on_empty=True,
                              example=(torch.zeros(4), 1))
    x, y = rand([])
    assert x.shape == (1, 4) and set(x.unique().tolist()) <= {0.0, 1.0}


def test_unsupported_collate_output_is_refused_on_empty():
    collate = CollateFnWithEmpty(lambda batch: object(), example=1)
    with pytest.raises(TypeError, match="Unsupported batch type"):
        collate([])


# --------------------------------------------------------------------------- construction


def _init_fn(worker_id):  # module level: picklable
    return None


def _collate(batch):
    return torch.utils.data.default_collate(batch)


def test_from_data_loader_keeps_settings():
    dataset = tensor_dataset(40)
    g = torch.Generator().manual_seed(0)
    original = DataLoader(
        dataset, batch_size=8, num_workers=2, collate_fn=_collate, pin_memory=False,
        timeout=5.0, worker_init_fn=_init_fn, multiprocessing_context="spawn",
        prefetch_factor=3, persistent_workers=True, generator=g,
    )
    dp = DPDataLoader.from_data_loader(original)
    assert dp.sample_rate == 1 / len(original) == 0.2
    assert isinstance(dp.batch_sampler, UniformWithReplacementSampler)
    assert dp.batch_sampler.num_samples == 40
    assert dp.batch_sampler.generator is g
    assert dp.generator is g
    for name in ("num_workers", "pin_memory", "timeout", "worker_init_fn",
                 "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order"):
        assert getattr(dp, name) == getattr(original, name), name
    assert type(dp.multiprocessing_context) is type(original.multiprocessing_context)
    assert isinstance(dp.collate_fn, CollateFnWithEmpty)
    assert dp.collate_fn.wrapped_collator_fn is _collate
    # wrapping a DPDataLoader again does not double-wrap the collate function
    again = DPDataLoader.from_data_loader(dp, seed=1)
    assert again.collate_fn.wrapped_collator_fn is _collate


def test_from_data_loader_iterates_with_inherited_settings():
    original = DataLoader(tensor_dataset(30), batch_size=10, drop_last=True)
    dp = DPDataLoader.from_data_loader(original, seed=5)
    assert dp.sample_rate == pytest.approx(1 / 3)
    batches = list(dp)
    assert len(batches) == 3
    assert all(x.shape[1:] == (3, 4) for x, _ in batches)


def test_invalid_loader_arguments():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    with pytest.raises(ValueError, match="IterableDataset"):
        DPDataLoader(Stream(), sample_rate=0.1)
    with pytest.raises(ValueError, match="IterableDataset"):
        DPDataLoader.from_data_loader(DataLoader(Stream(), batch_size=2))
    with pytest.raises(ValueError, match="batch_size"):
        DPDataLoader(tensor_dataset(), sample_rate=0.1, batch_size=4)
    with pytest.raises(ValueError, match="sample_rate"):
        DPDataLoader(tensor_dataset(), sample_rate=1.5)
    with pytest.raises(TypeError, match="generator"):
        DPDataLoader(tensor_dataset(), sample_rate=0.1, generator=np.random.default_rng(0))


def test_switch_generator():
    dataset = tensor_dataset(40)
    dp = DPDataLoader(dataset, sample_rate=0.25, seed=0)
    switched = switch_generator(data_loader=dp, generator=torch.Generator().manual_seed(9))
    reference = DPDataLoader(dataset, sample_rate=0.25, generator=torch.Generator().manual_seed(9))
    assert [y.tolist() for _, y in switched] == [y.tolist() for _, y in reference]

    plain = DataLoader(dataset, batch_size=10, shuffle=True)
    g = torch.Generator().manual_seed(3)
    switched_plain = switch_generator(data_loader=plain, generator=g)
    assert isinstance(switched_plain.batch_sampler.sampler, RandomSampler)
    assert switched_plain.batch_sampler.sampler.generator is g
    with pytest.raises(ValueError, match="Non-batch"):
        switch_generator(data_loader=DataLoader(dataset, batch_size=None), generator=g)


# --------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("shuffle", [False, True])
def test_distributed_sampler_union_is_the_global_poisson_batch(shuffle):
    n, q, world = 23, 0.3, 3
    samplers = [
        DistributedUniformWithReplacementSampler(
            total_size=n, sample_rate=q, seed=42, rank=r, world_size=world, shuffle=shuffle
        )
        for r in range(world)
    ]
    assert [s.num_samples for s in samplers] == [8, 8, 7]
    per_rank = [list(s) for s in samplers]
    assert all(len(b) == len(samplers[0]) == 3 for b in per_rank)  # empty batches kept
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)) if shuffle else None
    for step, global_batch in enumerate(core_sampling.poisson_batches(n, q, 3, 42)):
        union = sorted(i for b in per_rank for i in b[step])
        want = global_batch.tolist() if perm is None else sorted(perm[global_batch].tolist())
        assert union == want
        assert sum(len(b[step]) for b in per_rank) == len(set(union))


def test_distributed_sampler_needs_rank_and_state_round_trip():
    with pytest.raises(ValueError, match="rank"):
        DistributedUniformWithReplacementSampler(total_size=10, sample_rate=0.5)
    s = DistributedUniformWithReplacementSampler(total_size=10, sample_rate=0.5, seed=1,
                                                 rank=1, world_size=2)
    s.set_epoch(4)
    it = iter(s)
    next(it)
    state = s.state_dict()
    rest = list(it)
    t = DistributedUniformWithReplacementSampler(total_size=10, sample_rate=0.5, seed=2,
                                                 rank=1, world_size=2)
    t.load_state_dict(state)
    assert t.epoch == 4 and list(t) == rest


def test_collate_wrapper_survives_pickling_for_worker_processes():
    import pickle

    collate = CollateFnWithEmpty(torch.utils.data.default_collate, example=tensor_dataset()[0])
    clone = pickle.loads(pickle.dumps(collate))
    x, y = clone([])
    assert x.shape == (0, 3, 4) and y.shape == (0,)
    learner = pickle.loads(pickle.dumps(CollateFnWithEmpty(torch.utils.data.default_collate)))
    learner([tensor_dataset()[0]])
    assert learner([])[0].shape == (0, 3, 4)


def test_worker_processes_produce_empty_batches():
    # spawn, not fork: the suite also loads JAX, whose threads make fork unsafe (and warn)
    loader = DPDataLoader(tensor_dataset(20), sample_rate=0.05, seed=1, num_workers=1,
                          multiprocessing_context="spawn")
    shapes = [tuple(x.shape) for x, _ in loader]
    want = [(len(b), 3, 4) for b in core_sampling.poisson_batches(20, 0.05, 20, 1)]
    assert shapes == want and (0, 3, 4) in shapes
