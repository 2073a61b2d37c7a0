"""FSDP2 ghost clipping (``grad_sample_mode="ghost_fsdp"``) on real gloo process groups.

Oracle: one process training on the union of the ranks' Poisson batches by a loop of
batch-size-1 backward passes (flat clipping, the seeded noise drawn parameter by
parameter, mean over the expected batch size). With zero noise the sharded run must
match it to float64 rounding; with the same noise seed it must match too, which holds
only if every coordinate got the noise the unsharded run adds.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from tests.dp_torch import _dist_workers as W  # noqa: E402
from tests.dp_torch import _fsdp_workers as F  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORKERS = "tests.dp_torch._fsdp_workers"
CASES_2 = (F.Case("mlp"), F.Case("transformer"), F.Case("lora"), F.Case("mlp", sigma=F.SIGMA),
           F.Case("lora", sigma=F.SIGMA), F.Case("transformer", max_physical_batch_size=2),
           F.Case("mlp", sigma=F.SIGMA, wrap_model=False))


def _union(results: dict, case: F.Case, world_size: int) -> list[list[int]]:
    per_rank = [results[r][case]["batches"] for r in range(world_size)]
    return [sorted(sum((per_rank[r][k] for r in range(world_size)), [])) for k in range(case.steps)]


def _check_against_oracle(results: dict, case: F.Case, world_size: int) -> None:
    union = _union(results, case, world_size)
    assert all(len(set(batch)) == len(batch) for batch in union)  # no example on two ranks
    expected = F.oracle(case.kind, union, case.sigma)
    for rank in range(world_size):
        got = results[rank][case]
        assert got["steps_recorded"] == case.steps
        for step in range(case.steps):
            for a, b in zip(got["params"][step], expected[step]):
                assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fsdp_two")
    return W.run_group(f"{WORKERS}:train_cases", 2, workdir, timeout=240, cases=list(CASES_2)).results


@pytest.mark.parametrize("case", CASES_2, ids=lambda c: f"{c.kind}-sigma{c.sigma}-bmm{c.max_physical_batch_size}"
                         f"{'' if c.wrap_model else '-hooks'}")
def test_two_ranks_match_one_process_on_the_union(two_ranks, case) -> None:
    _check_against_oracle(two_ranks, case, 2)


def test_parameters_are_sharded_and_ranks_agree(two_ranks) -> None:
    case = F.Case("transformer")
    full = [tuple(p.shape) for p in F.make_model("transformer").parameters()]
    for rank in range(2):
        local = two_ranks[rank][case]["local_shapes"]
        assert all(s[0] == -(-f[0] // 2) or s[0] == f[0] // 2 for s, f in zip(local, full))
        assert sum(s[0] for s in local) < sum(f[0] for f in full)
    assert two_ranks[0][case]["epsilon"] == two_ranks[1][case]["epsilon"] > 0
    for a, b in zip(two_ranks[0][case]["params"][-1], two_ranks[1][case]["params"][-1]):
        assert torch.equal(a, b)


def test_batch_memory_manager_takes_the_same_number_of_chunks_on_every_rank(two_ranks) -> None:
    case = F.Case("transformer", max_physical_batch_size=2)
    assert two_ranks[0][case]["chunks"] == two_ranks[1][case]["chunks"]
    assert max(two_ranks[0][case]["chunks"]) > 1


def test_a_dead_rank_raises_distributed_step_error_with_nothing_applied(tmp_path) -> None:
    run = W.run_group(f"{WORKERS}:die_mid_step", 2, tmp_path, timeout=120, pg_timeout=20,
                      expect_results=[0], abort=True)
    got = run.results[0]
    assert got["step"] == 1 and "Nothing was applied" in got["error"]
    assert got["params_unchanged"] and got["state_unchanged"] and got["steps_unchanged"]
    assert got["grads_cleared"]
    assert run.exitcodes[1] == 17


def test_checkpoint_resumes_on_another_world_size(tmp_path) -> None:
    saved = W.run_group(f"{WORKERS}:save_after_one_step", 2, tmp_path / "two", timeout=120).results[0]
    ckpt = str(tmp_path / "two" / "ckpt")
    loaded = W.run_group(f"{WORKERS}:load_and_report", 1, tmp_path / "one", timeout=120,
                         checkpoint=ckpt).results[0]
    for a, b in zip(saved["params"], loaded["params"]):
        assert torch.equal(a, b)
    for a, b in zip(saved["momentum"], loaded["momentum"]):
        assert torch.equal(a, b)
    assert loaded["history"] == saved["history"] and len(saved["history"]) > 0
    assert torch.equal(loaded["generator"], saved["generator"])
    assert loaded["after_step"] == len(saved["history"]) + 1


def test_a_rank_with_no_examples_takes_part_and_adds_nothing(tmp_path) -> None:
    results = W.run_group(f"{WORKERS}:empty_share", 2, tmp_path, timeout=120).results
    expected = F.oracle("mlp", [list(range(5))], 0.0)[0]
    for rank in range(2):
        assert results[rank]["steps"] == 1
        for a, b in zip(results[rank]["params"], expected):
            assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ranks_whose_backward_passes_differ_are_refused_before_any_reduction(tmp_path) -> None:
    results = W.run_group(f"{WORKERS}:diverging_layers", 2, tmp_path, timeout=120).results
    for rank in range(2):
        assert "different layer calls" in results[rank]["error"]
        assert all(g is None for g in results[rank]["grads"])


def test_secure_mode_noise_is_gaussian_with_the_right_scale_and_independent_across_shards(tmp_path) -> None:
    from scipy import stats

    results = W.run_group(f"{WORKERS}:secure_noise", 2, tmp_path, timeout=120).results
    weight = results[0]["noise"][0]  # [128, 128]: rows 0-63 drawn by rank 0, rows 64-127 by rank 1
    assert torch.equal(weight, results[1]["noise"][0])
    values = torch.cat([n.flatten() for n in results[0]["noise"]]).numpy()
    assert stats.kstest(values, "norm", args=(0.0, 1.0)).pvalue > 1e-3
    assert stats.kstest(values, "norm", args=(0.0, 1.15)).pvalue < 1e-3  # a wrong scale is seen
    halves = weight[:64].flatten().numpy(), weight[64:].flatten().numpy()
    assert abs(stats.pearsonr(*halves)[0]) < 0.1  # the two ranks' draws are independent


def test_gpt2_with_tied_embeddings_matches_single_process_ghost_clipping(tmp_path) -> None:
    """The single-process ghost step (itself checked against the loop of single sequences in
    tests/zoo) on all 8 sequences is the oracle of the 2-rank step."""
    pytest.importorskip("transformers")
    results = W.run_group(f"{WORKERS}:gpt2_tied", 2, tmp_path, timeout=180).results
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = F.make_gpt2()
        wrapped, optimizer, criterion = F.private_lm(model, "ghost")
        optimizer.zero_grad()
        F.lm_loss(criterion, wrapped, F.gpt2_tokens()).backward()
        optimizer.step()
    finally:
        torch.set_default_dtype(default)
    initial = [p.detach() for p in F.make_gpt2().double().parameters()]
    for rank in range(2):
        for a, b, c in zip(results[rank]["params"], model.parameters(), initial):
            assert_close(a, b.detach(), rtol=1e-10, atol=1e-13)
    assert max(float((b.detach() - c).abs().max()) for b, c in zip(model.parameters(), initial)) > 1e-3


def test_generators_in_different_states_on_the_ranks_are_refused(tmp_path) -> None:
    results = W.run_group(f"{WORKERS}:different_generators", 2, tmp_path, timeout=120).results
    for rank in range(2):
        assert "noise_generator is in different states on the ranks" in results[rank]["error"]
        assert results[rank]["steps"] == 0


@pytest.mark.slow
def test_four_ranks_match_one_process_on_the_union(tmp_path) -> None:
    cases = [F.Case("mlp"), F.Case("transformer", sigma=F.SIGMA), F.Case("lora")]
    results = W.run_group(f"{WORKERS}:train_cases", 4, tmp_path, timeout=400, cases=cases).results
    for case in cases:
        _check_against_oracle(results, case, 4)


@pytest.mark.slow
def test_bf16_mixed_precision_policy_is_the_fp32_step_to_bf16_rounding(tmp_path) -> None:
    cases = [F.Case("transformer", bf16=True), F.Case("transformer")]
    results = W.run_group(f"{WORKERS}:train_cases", 2, tmp_path, timeout=240, cases=cases).results
    for a, b in zip(results[0][cases[0]]["params"][-1], results[0][cases[1]]["params"][-1]):
        assert_close(a, b, rtol=3e-2, atol=3e-3)
    init = [p.detach() for p in F.make_model("transformer").parameters()]
    moved = sum(float((a - p).abs().max()) for a, p in zip(results[0][cases[0]]["params"][-1], init))
    assert moved > 1e-3


# --------------------------------------------------------------------------- refusals (one process)


def test_ghost_fsdp_refuses_an_unsharded_model_before_building_anything() -> None:
    from torch.utils.data import DataLoader

    from dp_torch import PrivacyEngine

    net = nn.Linear(3, 2)
    engine = PrivacyEngine()
    with pytest.raises(ValueError, match="grad_sample_mode='ghost_fsdp' needs a model sharded with FSDP2"):
        engine.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                            data_loader=DataLoader(F.make_dataset("mlp"), batch_size=4),
                            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost_fsdp")
    assert not hasattr(net, "autograd_grad_sample_hooks") and len(engine.accountant) == 0
