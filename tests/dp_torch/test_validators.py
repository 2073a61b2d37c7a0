"""dp_torch.validators: ModuleValidator, the built-in validators and fixers, the registries.

Oracles: the original module's output (fixers that carry weights must not change the function),
module structure for the others.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from dp_torch.layers import DPGRU, DPLSTM, DPMultiheadAttention, DPRNN, FrozenBatchNorm
from dp_torch.validators import (
    IllegalModuleConfigurationError,
    ModuleValidator,
    ShouldReplaceModuleError,
    UnsupportableModuleError,
    UnsupportedModuleError,
    register_module_fixer,
    register_module_validator,
)
from dp_torch.validators.inplace import INPLACE_MODULES
from tests.tolerance import assert_close

DT = torch.float64


def _names(errors) -> list[str]:
    return [e.module_name for e in errors]


def _state(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- BatchNorm


class _ConvNet(nn.Module):
    def __init__(self, bn: nn.Module):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 48, 3), nn.ReLU(), nn.MaxPool2d(2), bn)


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_batch_norm_error_names_submodule(bn_cls):
    errors = ModuleValidator.validate(_ConvNet(bn_cls(48)))
    assert len(errors) == 1
    error = errors[0]
    assert isinstance(error, ShouldReplaceModuleError)
    assert error.module_name == "features.3" and error.module_type == bn_cls.__name__
    assert str(error).startswith(f"features.3 ({bn_cls.__name__}): ")
    assert "GroupNorm" in str(error) and "ModuleValidator.fix" in str(error)


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm])
def test_batch_norm_fixed_to_group_norm_with_gcd_rule(bn_cls):
    bn = bn_cls(48, eps=1e-3).to(DT)
    fixed = ModuleValidator.fix(_ConvNet(bn))
    group_norm = fixed.features[3]
    assert type(group_norm) is nn.GroupNorm
    assert (group_norm.num_groups, group_norm.num_channels, group_norm.eps) == (16, 48, 1e-3)  # gcd(32, 48)
    assert group_norm.weight.dtype == DT
    assert torch.equal(group_norm.weight, torch.ones(48, dtype=DT))  # fresh affine parameters
    assert torch.equal(group_norm.bias, torch.zeros(48, dtype=DT))
    assert ModuleValidator.is_valid(fixed)


def test_batch_norm_fix_options():
    net = _ConvNet(nn.BatchNorm2d(48))
    assert ModuleValidator.fix(net, num_groups=4).features[3].num_groups == 4
    instance = ModuleValidator.fix(net, replace_bn_with_in=True).features[3]
    assert type(instance) is nn.InstanceNorm2d and instance.affine and not instance.track_running_stats
    with pytest.raises(ValueError, match="mutually exclusive"):
        ModuleValidator.fix(net, num_groups=4, replace_bn_with_in=True)
    with pytest.raises(ValueError, match="num_groups must be a positive int dividing num_features=48, got 5"):
        ModuleValidator.fix(net, num_groups=5)
    with pytest.raises(UnsupportableModuleError, match="SyncBatchNorm has no InstanceNorm"):
        ModuleValidator.fix(_ConvNet(nn.SyncBatchNorm(48)), replace_bn_with_in=True)
    with pytest.raises(ValueError, match="run one forward pass"):
        ModuleValidator.fix(nn.Sequential(nn.LazyBatchNorm1d()))


def test_non_affine_batch_norm_is_reported_and_fixed():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False))
    (error,) = ModuleValidator.validate(model)
    assert error.module_name == "1" and "affine=False" in str(error)
    fixed = ModuleValidator.fix(model)[1]
    assert type(fixed) is nn.GroupNorm and not fixed.affine and fixed.num_groups == 2


def test_frozen_batch_norm_is_reported_and_frozen_for_good():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6).to(DT)
    for _ in range(2):
        bn(torch.randn(8, 6, dtype=DT) + 3)
    bn.requires_grad_(False)
    model = nn.Sequential(nn.Linear(4, 6).to(DT), bn)
    (error,) = ModuleValidator.validate(model)
    assert error.module_name == "1" and "frozen" in str(error) and "FrozenBatchNorm" in str(error)
    fixed = ModuleValidator.fix(model)
    assert isinstance(fixed[1], FrozenBatchNorm)
    assert ModuleValidator.is_valid(fixed)
    x = torch.randn(5, 4, dtype=DT)
    model.eval()
    assert_close(fixed(x).detach(), model(x).detach(), rtol=1e-12)  # fixed is in training mode


# --------------------------------------------------------------------------- InstanceNorm


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_with_running_stats(affine):
    torch.manual_seed(0)
    norm = nn.InstanceNorm1d(3, affine=affine, track_running_stats=True).to(DT)
    if affine:
        nn.init.normal_(norm.weight)
    model = nn.Sequential(nn.Conv1d(2, 3, 1).to(DT), norm)
    (error,) = ModuleValidator.validate(model)
    assert isinstance(error, IllegalModuleConfigurationError)
    assert error.module_name == "1" and "track_running_stats" in str(error)
    fixed = ModuleValidator.fix(model)
    assert not fixed[1].track_running_stats and fixed[1].running_mean is None
    assert "running_mean" not in fixed[1].state_dict()
    x = torch.randn(4, 2, 5, dtype=DT) + 2
    assert_close(fixed(x).detach(), model(x).detach(), rtol=1e-12)  # both use instance statistics
    assert ModuleValidator.validate(fixed) == []
    assert ModuleValidator.validate(nn.InstanceNorm2d(3)) == []


# --------------------------------------------------------------------------- recurrent layers


@pytest.mark.parametrize(
    "ref_cls, dp_cls, kwargs",
    [
        (nn.LSTM, DPLSTM, {"proj_size": 2}),
        (nn.GRU, DPGRU, {}),
        (nn.RNN, DPRNN, {"nonlinearity": "relu"}),
    ],
)
def test_recurrent_layer_fixed_with_weights(ref_cls, dp_cls, kwargs):
    torch.manual_seed(0)
    rnn = ref_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True, dtype=DT, **kwargs)
    rnn.weight_hh_l1.requires_grad_(False)
    model = nn.ModuleDict({"encoder": rnn})
    (error,) = ModuleValidator.validate(model)
    assert error.module_name == "encoder" and f"dp_torch.layers.{dp_cls.__name__}" in str(error)
    fixed = ModuleValidator.fix(model)["encoder"]
    assert type(fixed) is dp_cls and fixed.batch_first and fixed.bidirectional
    x = torch.randn(2, 5, 3, dtype=DT)
    out, out_fixed = rnn(x), fixed(x)
    assert_close(out_fixed[0].detach(), out[0].detach(), rtol=1e-10, atol=1e-12)
    # requires_grad is carried: the frozen weight stays frozen
    flags = {n: p.requires_grad for n, p in fixed.state_dict(keep_vars=True).items()}
    assert flags == {n: p.requires_grad for n, p in rnn.named_parameters()}
    if dp_cls is DPRNN:
        assert fixed.nonlinearity == "relu"


def test_frozen_recurrent_layer_is_accepted_and_kept():
    lstm = nn.LSTM(3, 4).requires_grad_(False)
    model = nn.Sequential(lstm)
    assert ModuleValidator.validate(model) == []
    assert type(ModuleValidator.fix(model)[0]) is nn.LSTM


def test_recurrent_layer_as_root_and_dropout_warning_not_repeated():
    with pytest.warns(UserWarning, match="non-zero dropout"):
        gru = nn.GRU(3, 4, dropout=0.3)
    fixed = ModuleValidator.fix(gru)  # no second warning (filterwarnings=error would raise)
    assert type(fixed) is DPGRU and fixed.dropout == 0.3


# --------------------------------------------------------------------------- multi-head attention


@pytest.mark.parametrize("kwargs", [{}, {"kdim": 5, "vdim": 3, "add_bias_kv": True, "bias": False}])
def test_multihead_attention_fixed_with_weights(kwargs):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=DT, **kwargs)
    model = nn.ModuleList([nn.Linear(8, 8), attn])
    (error,) = ModuleValidator.validate(model)
    assert error.module_name == "1" and "DPMultiheadAttention" in str(error)
    fixed = ModuleValidator.fix(model)[1]
    assert type(fixed) is DPMultiheadAttention and fixed.batch_first
    q = torch.randn(2, 4, 8, dtype=DT)
    k = torch.randn(2, 5, kwargs.get("kdim", 8), dtype=DT)
    v = torch.randn(2, 5, kwargs.get("vdim", 8), dtype=DT)
    expected, got = attn(q, k, v), fixed(q, k, v)
    assert_close([t.detach() for t in got], [t.detach() for t in expected], rtol=1e-10, atol=1e-12)


def test_transformer_encoder_fixed_end_to_end():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=DT)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    assert _names(ModuleValidator.validate(model)) == ["layers.0.self_attn", "layers.1.self_attn"]
    fixed = ModuleValidator.fix_and_validate(model)
    x = torch.randn(3, 4, 8, dtype=DT)
    assert_close(fixed(x).detach(), model(x).detach(), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- in-place activations


def test_inplace_activation_after_hooked_layer_is_reported():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                               nn.ReLU(inplace=True)))
    model.add_module("flat", nn.Flatten())
    model.add_module("classifier", nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Hardtanh(inplace=True),
                                                 nn.Dropout(0.1, inplace=True)))
    errors = ModuleValidator.validate(model)
    # features.3 follows MaxPool (no parameters); classifier.3 follows a Hardtanh
    assert _names(errors) == ["features.1", "classifier.2"]
    assert all(isinstance(e, IllegalModuleConfigurationError) for e in errors)
    assert str(errors[0]).startswith("features.1 (ReLU): runs in place (inplace=True) right after 0 (Conv2d)")
    assert "inplace=False" in str(errors[1])


def test_inplace_checks_across_nested_sequentials_and_views():
    inner = nn.Sequential(nn.Identity(), nn.LeakyReLU(inplace=True))
    model = nn.Sequential(nn.Linear(3, 3), nn.Flatten(), inner)
    (error,) = ModuleValidator.validate(model)
    assert error.module_name == "2.1" and error.module_type == "LeakyReLU"
    frozen = nn.Sequential(nn.Linear(3, 3).requires_grad_(False), nn.ReLU(inplace=True))
    assert ModuleValidator.validate(frozen) == []

    class Custom(nn.Sequential):
        def forward(self, x):
            return x

    assert ModuleValidator.validate(Custom(nn.Linear(3, 3), nn.ReLU(inplace=True))) == []


def test_fix_turns_every_inplace_module_out_of_place():
    class Block(nn.Module):  # custom forward: not reported, still fixed
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU6(inplace=True)

        def forward(self, x):
            return self.act(self.fc(x))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(3, 3), nn.SELU(inplace=True))
    fixed = ModuleValidator.fix(model)
    assert not fixed[0].act.inplace and not fixed[2].inplace
    assert model[0].act.inplace and model[2].inplace
    x = torch.randn(4, 3)
    assert_close(fixed(x).detach(), model(x.clone()).detach(), rtol=0.0)


def test_inplace_module_list_covers_torch():
    import inspect

    modules = [c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, nn.Module)]
    with_inplace = {c for c in modules if "inplace" in inspect.signature(c).parameters}
    assert with_inplace <= set(INPLACE_MODULES)


# --------------------------------------------------------------------------- ModuleValidator


def test_eval_mode_model_is_reported():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()
    errors = ModuleValidator.validate(model)
    assert _names(errors) == ["", "1"]
    assert str(errors[0]).startswith("<root> (Sequential): the model is in eval mode")
    assert "model.train()" in str(errors[0])
    assert ModuleValidator.validate(nn.Linear(2, 2).eval())  # also without any other problem
    with pytest.raises(UnsupportedModuleError, match="eval mode"):
        ModuleValidator.fix_and_validate(model)


def test_strict_raises_with_every_problem():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LSTM(3, 3))
    with pytest.raises(UnsupportedModuleError) as info:
        ModuleValidator.validate(model, strict=True)
    assert "2 problem(s)" in str(info.value)
    assert "0 (BatchNorm1d)" in str(info.value) and "1 (LSTM)" in str(info.value)
    assert _names(info.value.errors) == ["0", "1"]
    assert not ModuleValidator.is_valid(model)
    assert ModuleValidator.is_valid(nn.Sequential(nn.Linear(3, 3), nn.GroupNorm(1, 3)))
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        ModuleValidator.validate("model")


def test_fix_leaves_the_original_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(inplace=True), nn.LSTM(3, 3),
                          nn.InstanceNorm1d(3, track_running_stats=True))
    before_modules = list(model.modules())
    before_types = [type(m) for m in before_modules]
    before_state = _state(model)
    fixed = ModuleValidator.fix(model)
    assert fixed is not model
    assert list(model.modules()) == before_modules and [type(m) for m in model.modules()] == before_types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())
    assert model[2].inplace and model[4].track_running_stats
    assert fixed[0] is not model[0] and torch.equal(fixed[0].weight, model[0].weight)
    clean = nn.Sequential(nn.Linear(3, 3))
    assert ModuleValidator.fix(clean) is not clean


def test_fix_replaces_a_shared_module_everywhere_and_keeps_mode():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.Linear(4, 4), bn)
    model[1].eval()
    fixed = ModuleValidator.fix(model)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1] is fixed[3]
    assert not fixed[1].training and fixed[0].training


def test_fix_carries_dtype():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.MultiheadAttention(4, 2)).to(DT)
    fixed = ModuleValidator.fix(model)
    assert {p.dtype for p in fixed.parameters()} == {DT}


# --------------------------------------------------------------------------- registries


class _Mixer(nn.Module):
    """A layer that averages over the batch (mixes examples)."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class _SubMixer(_Mixer):
    pass


@pytest.fixture
def mixer_registered():
    @register_module_validator(_Mixer)
    def validate(module):
        return [UnsupportableModuleError("averages over the batch; remove it")]

    @register_module_fixer([_Mixer])
    def fix(module, **kwargs):
        return nn.Identity()

    yield
    del ModuleValidator.VALIDATORS[_Mixer]
    del ModuleValidator.FIXERS[_Mixer]


def test_registered_validator_and_fixer_apply_to_subclasses(mixer_registered):
    model = nn.Sequential(nn.Linear(2, 2), _SubMixer(), nn.Sequential(_Mixer()))
    errors = ModuleValidator.validate(model)
    assert [str(e) for e in errors] == [
        "1 (_SubMixer): averages over the batch; remove it",
        "2.0 (_Mixer): averages over the batch; remove it",
    ]
    fixed = ModuleValidator.fix(model)
    assert isinstance(fixed[1], nn.Identity) and isinstance(fixed[2][0], nn.Identity)
    assert ModuleValidator.is_valid(fixed)


def test_registration_rejects_non_classes():
    with pytest.raises(TypeError, match="target_class_or_classes must be a class"):
        register_module_validator(["nn.Linear"])


def test_fix_keeps_device():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    fixed = ModuleValidator.fix(copy.deepcopy(model))
    assert {p.device for p in fixed.parameters()} == {p.device for p in model.parameters()}
