"""Small modules that exist at Opacus' paths: samplers of the DP layers and the version."""

from __future__ import annotations

import torch
import torch.nn as nn

import dp_torch
from dp_torch.grad_sample import GradSampleModule
from dp_torch.grad_sample.dp_multihead_attention import compute_sequence_bias_grad_sample
from dp_torch.grad_sample.dp_rnn import compute_rnn_linear_grad_sample
from dp_torch.layers import SequenceBias
from dp_torch.layers.dp_rnn import RNNLinear
from dp_torch.version import __version__

DT = torch.float64


def test_version() -> None:
    assert __version__ == dp_torch.__version__


def _per_example_autograd(module: nn.Module, param: torch.Tensor, x: torch.Tensor, weights: torch.Tensor):
    """Per-example gradients of ``sum(weights_i * out_i)`` by one autograd call per example."""
    return torch.stack([
        torch.autograd.grad((module(x[i:i + 1]) * weights[i:i + 1]).sum(), param)[0] for i in range(len(x))
    ])


def test_rnn_linear_sampler_matches_autograd() -> None:
    layer = RNNLinear(3, 2, dtype=DT)
    x = torch.randn(4, 5, 3, dtype=DT)
    g = torch.randn(4, 5, 2, dtype=DT)
    out = compute_rnn_linear_grad_sample(layer, [x], g)
    assert torch.allclose(out[layer.weight], _per_example_autograd(layer, layer.weight, x, g))
    assert torch.allclose(out[layer.bias], _per_example_autograd(layer, layer.bias, x, g))


def test_sequence_bias_sampler_matches_autograd_and_the_hooks() -> None:
    layer = SequenceBias(4, batch_first=True, dtype=DT)
    x = torch.randn(3, 2, 4, dtype=DT)
    g = torch.randn(3, 3, 4, dtype=DT)
    out = compute_sequence_bias_grad_sample(layer, [x], g)
    weight = layer.proj.weight
    assert torch.allclose(out[weight], _per_example_autograd(layer, weight, x, g))
    gsm = GradSampleModule(layer, loss_reduction="sum")
    (gsm(x) * g).sum().backward()
    assert torch.allclose(weight.grad_sample, out[weight])
    weight.requires_grad_(False)
    assert compute_sequence_bias_grad_sample(layer, [x], g) == {}
