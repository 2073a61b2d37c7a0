"""The small Opacus names that complete the public API: each does what its name says."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from dp_torch.grad_sample import GradSampleModuleFastGradientClipping
from dp_torch.grad_sample.conv import compute_conv_grad_sample, convolution2d_backward_as_a_convolution
from dp_torch.grad_sample.functorch import make_functional
from tests.tolerance import assert_close


def test_convolution2d_backward_as_a_convolution_equals_the_loop() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    x, g = torch.randn(5, 3, 9, 9, dtype=torch.float64), torch.randn(5, 4, 5, 5, dtype=torch.float64)
    got = convolution2d_backward_as_a_convolution(conv, [x], g)
    for i in range(5):
        out = conv(x[i : i + 1])
        w, b = torch.autograd.grad((out * g[i : i + 1]).sum(), [conv.weight, conv.bias])
        assert_close(got[conv.weight][i].numpy(), w.numpy(), rtol=1e-10, atol=1e-12)
        assert_close(got[conv.bias][i].numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    default = compute_conv_grad_sample(conv, [x], g)
    assert_close(got[conv.weight].numpy(), default[conv.weight].numpy(), rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="nn.Conv2d"):
        convolution2d_backward_as_a_convolution(nn.Conv1d(3, 4, 3), [x], g)


@pytest.mark.parametrize("detach", [False, True])
def test_make_functional_runs_the_module_with_given_parameters(detach: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3).eval())
    fmodel, params = make_functional(model, disable_autograd_tracking=detach)
    x = torch.randn(2, 4)
    assert torch.equal(fmodel(params, x), model(x))
    doubled = tuple(2 * p for p in params)
    assert not torch.equal(fmodel(doubled, x), model(x))
    assert all(p.requires_grad != detach for p in params)


def test_log_module_gradient_sample_mode_names_each_path(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.PReLU())
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
    with caplog.at_level(logging.INFO):
        gsm.log_module_gradient_sample_mode(model)
    text = caplog.text
    assert "Module name: 0, module type: Linear, under ghost clipping" in text
    assert "Module name: 1, module type: LayerNorm, under ghost clipping" in text
    assert "Module name: 2, module type: PReLU, under fast gradient clipping (torch.func fallback)" in text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        gsm.log_module_gradient_sample_mode(model, use_ghost_clipping=False)
    assert "Module name: 1, module type: LayerNorm, under fast gradient clipping (grad sampler)" in caplog.text
