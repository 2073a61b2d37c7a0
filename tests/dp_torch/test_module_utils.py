"""``dp_torch.utils.module_utils``: which modules and parameters a DP wrapper sees."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from dp_torch.utils.module_utils import (
    are_state_dict_equal,
    clone_module,
    get_submodule,
    has_trainable_params,
    parametrized_modules,
    requires_grad,
    trainable_modules,
    trainable_parameters,
)


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)))
    model[2][1].weight.requires_grad_(False)
    model[2][1].bias.requires_grad_(False)
    return model


def test_module_and_parameter_walks() -> None:
    model = _model()
    assert [n for n, _ in parametrized_modules(model)] == ["0", "2.0", "2.1"]
    assert [n for n, _ in trainable_modules(model)] == ["0", "2.0"]
    assert [n for n, _ in trainable_parameters(model)] == ["0.weight", "0.bias", "2.0.weight", "2.0.bias"]
    assert has_trainable_params(model[0]) and not has_trainable_params(model[2][1])
    assert not has_trainable_params(model)  # the container owns no parameter itself
    assert not requires_grad(model) and requires_grad(model, recurse=True)
    assert not requires_grad(model[2][1], recurse=True)


def test_clone_module_is_independent_and_equal() -> None:
    model = _model()
    copy = clone_module(model)
    assert copy is not model and are_state_dict_equal(copy.state_dict(), model.state_dict())
    with torch.no_grad():
        copy[0].weight.add_(1.0)
    assert not torch.equal(copy[0].weight, model[0].weight)
    assert not copy[2][1].weight.requires_grad


def test_clone_module_falls_back_when_deepcopy_refuses() -> None:
    model = nn.Linear(2, 2)
    model.cached = model.weight * 2  # a non-leaf tensor: deepcopy raises
    copy = clone_module(model)
    assert torch.equal(copy.weight, model.weight) and copy.weight is not model.weight
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        clone_module("model")


def test_get_submodule() -> None:
    model = _model()
    assert get_submodule(model, "") is model
    assert get_submodule(model, "2.1") is model[2][1]
    with pytest.raises(AttributeError, match=r"has no attribute '5'.*target='2.5'"):
        get_submodule(model, "2.5")
    with pytest.raises(AttributeError, match=r"'0.weight' is a Parameter, not an nn.Module"):
        get_submodule(model, "0.weight")


def test_are_state_dict_equal(caplog: pytest.LogCaptureFixture) -> None:
    a = nn.Linear(2, 2).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert are_state_dict_equal(a, b)
    b["bias"] = b["bias"] + 1e-12  # within torch.allclose's tolerance
    assert are_state_dict_equal(a, b)
    b["bias"] = b["bias"] + 1.0
    with caplog.at_level(logging.INFO, logger="dp_torch.utils.module_utils"):
        assert not are_state_dict_equal(a, b)
    assert "'bias'" in caplog.text
    assert not are_state_dict_equal(a, {"weight": a["weight"]})
    assert not are_state_dict_equal(a, {**a, "bias": a["bias"].view(1, 2)})
