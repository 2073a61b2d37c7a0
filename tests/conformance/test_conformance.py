"""Tests of the conformance suite: it passes on the real backends and fails on injected bugs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import conformance
from conformance import _cases
from dp_torch.optimizers import optimizer as torch_optimizer
from tests.tolerance import assert_close


def _failing_checks(report: conformance.Report) -> set[str]:
    return {r.check for r in report.failures}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mlp_single_batch_checks_pass(dtype):
    results = conformance.run_case(conformance.get_case("mlp"), dtype, trajectory=False)
    assert {r.check for r in results} >= {
        "per_example_grads", "per_example_norms", "clip_factors", "clipped_sum_flat",
        "clipped_sum_per_layer", "noised_update", "batch_indices"}
    assert all(r.passed for r in results), [r.detail for r in results if not r.passed]


def test_perturbed_clip_factor_fails_and_is_named(monkeypatch):
    original = torch_optimizer._clip_factor
    monkeypatch.setattr(torch_optimizer, "_clip_factor",
                        lambda norms, c: original(norms, c) * (1 + 1e-3))
    report = conformance.run_conformance(["mlp"], ["float64"], trajectory=False, ledger=False)
    assert not report.passed
    assert {"clip_factors", "clipped_sum_flat", "noised_update"} <= _failing_checks(report)
    assert "per_example_grads" not in _failing_checks(report)
    table = report.markdown()
    assert "| mlp | clip_factors |" in table and "**FAIL**" in table
    assert "mlp / clip_factors / float64" in table


def test_realised_batch_size_denominator_fails_and_is_named(monkeypatch):
    realised = conformance.Settings().batch  # the realised batch size (expected: 9)
    monkeypatch.setattr(torch_optimizer.DPOptimizer, "_averaging_denominator",
                        lambda self: realised)
    report = conformance.run_conformance(["mlp"], ["float64"], trajectory=False, ledger=False)
    assert _failing_checks(report) == {"noised_update"}
    assert "mlp / noised_update / float64" in report.markdown()


def test_trajectory_agrees_for_the_embedding_bag():
    (result,) = [r for r in conformance.run_case(conformance.get_case("embedding_bag"), "float64")
                 if r.check == "trajectory"]
    assert result.passed, result.detail
    assert result.max_rel < 1e-12  # ulp-level in practice; far inside the tolerance


def test_ledgers_and_epsilon_agree_float64():
    results = conformance.run_ledger_checks("float64", ("rdp", "gdp"))
    assert [r.check for r in results] == ["ledger_rdp", "epsilon_rdp", "ledger_gdp", "epsilon_gdp"]
    assert all(r.passed for r in results), [r.detail for r in results]


@pytest.mark.slow
def test_ledgers_and_epsilon_agree_float32():
    results = conformance.run_ledger_checks("float32", ("rdp",))
    assert all(r.passed for r in results), [r.detail for r in results]


def _cnn_converter(transpose_conv: bool):
    case = conformance.get_case("cnn")

    def convert(state_dict):
        out = case.convert(state_dict)
        if not transpose_conv:  # the classic bug: reshape instead of transpose
            w = state_dict["conv.weight"].detach().numpy()
            out["params"]["conv"]["kernel"] = w.reshape(3, 3, 1, 4)
        return out

    return case, convert


def test_compare_passes_for_a_correct_pair_and_names_the_wrong_parameter():
    case, good = _cnn_converter(True)
    model = case.torch_model("float64")
    x, y = case.make_data(5, np.random.default_rng(0))
    x = x.astype("float64")
    report = conformance.compare(model, case.flax_module, good, (x, y), "cross_entropy",
                                 to_flax_input=case.to_flax_input)
    assert report.passed and report.first_mismatch is None
    assert len(report.leaves) == 6
    _, bad = _cnn_converter(False)
    report = conformance.compare(model, case.flax_module, bad, (x, y), "cross_entropy",
                                 to_flax_input=case.to_flax_input)
    assert not report.passed
    # the wrong kernel changes the forward pass, so the first leaf in flax order
    # (conv/bias) already disagrees; the fc layer after the pooling is unaffected in
    # layout but its gradients change too; what matters is that one is named
    assert report.first_mismatch in ("params/conv/bias", "params/conv/kernel")
    assert f"first parameter that disagrees: {report.first_mismatch}" in str(report)
    assert not [leaf for leaf in report.leaves if leaf.path == "params/conv/kernel"][0].passed


def test_compare_rejects_an_unknown_loss():
    case = conformance.get_case("mlp")
    x, y = case.make_data(3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="loss_fn"):
        conformance.compare(case.torch_model("float32"), case.flax_module, case.convert,
                            (x.astype("float32"), y), "hinge")


def test_layouts_match_a_hand_written_oracle():
    w = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert_close(_cases.conv_layout(w)[1, 2, 0, 1], w[1, 0, 1, 2], rtol=0.0)
    assert_close(_cases.conv_layout(w[None])[0], _cases.conv_layout(w), rtol=0.0)
    assert_close(_cases.linear_layout(w[0, 0]), w[0, 0].T, rtol=0.0)


def test_cli_prints_and_writes_the_table(tmp_path):
    out = tmp_path / "parity.md"
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", "--cases", "embedding_bag", "--dtypes", "float64",
         "--no-trajectory", "--no-ledger", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    assert table.startswith("| case | check |") and "| embedding_bag | noised_update |" in table
    assert table in proc.stdout and "all 7 checks pass" in proc.stdout
