"""``dp_torch.utils.per_sample_gradients_utils``: the batch-size-1 loop and the check built on it.

Oracles: the closed-form per-example gradient of a linear layer under an L1 loss, and a
deliberately wrong library answer that the check must reject.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_sequence

import dp_torch.utils.per_sample_gradients_utils as psg
from dp_torch.layers import DPMultiheadAttention
from dp_torch.utils.per_sample_gradients_utils import (
    ModelWithLoss,
    check_per_sample_gradients_are_correct,
    check_torch_version_for_ew_sample,
    compute_grad_samples_microbatch_and_opacus,
    compute_microbatch_grad_sample,
    compute_microbatch_grad_sample_tensor_or_seq,
    compute_opacus_grad_sample,
    get_grad_sample_modes,
    is_batch_empty,
    unpack_packedsequences,
)

DT = torch.float64
MODES = get_grad_sample_modes(use_ew=True)


def test_modes() -> None:
    assert MODES == ["hooks", "functorch", "ew"]
    assert get_grad_sample_modes() == ["hooks", "functorch"]
    assert check_torch_version_for_ew_sample()


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
def test_microbatch_loop_matches_the_linear_closed_form(loss_reduction: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, dtype=DT)
    x = torch.randn(5, 3, dtype=DT)
    grads = compute_microbatch_grad_sample(x, layer, loss_reduction=loss_reduction)
    # L1 loss of one example against zeros: d/dW sum|Wx+b| = sign(Wx+b) x^T (mean: / out features)
    sign = torch.sign(layer(x)).detach() / (2 if loss_reduction == "mean" else 1)
    assert torch.allclose(grads["weight"], sign.unsqueeze(2) * x.unsqueeze(1))
    assert torch.allclose(grads["bias"], sign)


def test_microbatch_loop_batch_second() -> None:
    layer = nn.Linear(3, 2, dtype=DT)
    x = torch.randn(4, 6, 3, dtype=DT)  # [T, B, 3]
    first = compute_microbatch_grad_sample(x.transpose(0, 1), layer)
    second = compute_microbatch_grad_sample(x, layer, batch_first=False)
    assert all(torch.allclose(first[k], second[k]) for k in first)
    assert first["weight"].shape == (6, 2, 3)


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(1)
    return {
        "mlp": (nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(7, 6)),
        "conv": (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Flatten(),
                               nn.Linear(3 * 5 * 5, 2)), torch.randn(4, 2, 5, 5)),
        "embedding": (nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
                      torch.randint(0, 10, (6, 3))),
        "sequence": (nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4)), torch.randn(5, 7, 4)),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(_models()))
def test_library_matches_the_loop(name: str, mode: str) -> None:
    model, x = _models()[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert check_per_sample_gradients_are_correct(x, model, grad_sample_mode=mode)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's random state is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())


def test_multihead_attention_batch_second() -> None:
    torch.manual_seed(2)

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = DPMultiheadAttention(4, 2, add_bias_kv=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    x = torch.randn(5, 3, 4)  # [T, B, E]
    assert check_per_sample_gradients_are_correct(x, SelfAttention(), batch_first=False)


def test_the_check_rejects_a_wrong_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _models()["mlp"]
    real = psg.compute_opacus_grad_sample

    def off_by_a_little(*args, **kwargs):
        result = real(*args, **kwargs)
        result["2.bias"] = result["2.bias"] * 1.01
        return result

    monkeypatch.setattr(psg, "compute_opacus_grad_sample", off_by_a_little)
    assert not check_per_sample_gradients_are_correct(x, model)

    def wrong_shape(*args, **kwargs):
        result = real(*args, **kwargs)
        result["0.weight"] = result["0.weight"][:-1]
        return result

    monkeypatch.setattr(psg, "compute_opacus_grad_sample", wrong_shape)
    assert not check_per_sample_gradients_are_correct(x, model)


def test_tolerances_reach_allclose_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = nn.Linear(2, 1), torch.randn(3, 2)
    real = psg.compute_opacus_grad_sample

    def shifted(*args, **kwargs):
        result = real(*args, **kwargs)
        return {k: v + 1e-3 for k, v in result.items()}

    monkeypatch.setattr(psg, "compute_opacus_grad_sample", shifted)
    assert not check_per_sample_gradients_are_correct(x, model, atol=1e-4, rtol=0.0)
    assert check_per_sample_gradients_are_correct(x, model, atol=1e-2, rtol=0.0)


def test_both_results_cover_the_same_parameters() -> None:
    model, x = _models()["mlp"]
    model[0].weight.requires_grad_(False)
    reference, library = compute_grad_samples_microbatch_and_opacus(x, model, loss_reduction="sum")
    assert list(reference) == list(library) == ["0.bias", "2.weight", "2.bias"]
    assert compute_opacus_grad_sample(x, model, loss_reduction="sum").keys() == reference.keys()


def test_packed_sequences_unpack_in_batch_order() -> None:
    seqs = [torch.randn(n, 2) for n in (2, 4, 1)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    assert all(torch.equal(a, b) for a, b in zip(unpack_packedsequences(packed), seqs))
    layer = nn.Linear(2, 3)
    per_seq = compute_microbatch_grad_sample_tensor_or_seq(packed, layer, loss_reduction="sum")
    for i, s in enumerate(seqs):
        alone = compute_microbatch_grad_sample(s.unsqueeze(0), layer, loss_reduction="sum")
        assert torch.allclose(per_seq["weight"][i], alone["weight"][0])


def test_model_with_loss() -> None:
    layer = nn.Linear(2, 2)
    x = torch.randn(3, 2)
    assert torch.allclose(ModelWithLoss(layer, "sum")(x), layer(x).abs().sum())
    assert torch.allclose(ModelWithLoss(layer)(x), layer(x).abs().mean())
    assert ModelWithLoss.supported_reductions == ["mean", "sum"]
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        ModelWithLoss(layer, "avg")


def test_errors() -> None:
    model, x = _models()["mlp"]
    assert is_batch_empty(x[:0]) and is_batch_empty([x[:0]]) and not is_batch_empty(x)
    with pytest.raises(RuntimeError, match="x is empty"):
        compute_grad_samples_microbatch_and_opacus(x[:0], model)
    for mode in ("ghost", "no_op", "bogus"):
        with pytest.raises(ValueError, match="grad_sample_mode must be one of"):
            check_per_sample_gradients_are_correct(x, model, grad_sample_mode=mode)
    with pytest.raises(NotImplementedError, match="batch_first=True"):
        check_per_sample_gradients_are_correct(x, model, batch_first=False, grad_sample_mode="ew")
