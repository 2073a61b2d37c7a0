"""``dp_torch.utils.tensor_utils`` against closed forms and torch's own convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dp_torch.utils.tensor_utils import (
    calc_sample_norms,
    calc_sample_norms_one_layer,
    filter_dilated_rows,
    sum_over_all_but_batch_and_last_n,
    unfold2d,
    unfold3d,
)

DT = torch.float64


def test_sample_norms_closed_form() -> None:
    a = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    b = torch.tensor([[[12.0]], [[0.0]]])
    per_layer = calc_sample_norms([("a", a), ("b", b)], flat=False)
    assert torch.equal(per_layer[0], torch.tensor([5.0, 1.0]))
    assert torch.equal(per_layer[1], torch.tensor([12.0, 0.0]))
    (flat,) = calc_sample_norms([("a", a), ("b", b)])
    assert torch.equal(flat, torch.tensor([13.0, 1.0]))
    assert torch.equal(calc_sample_norms_one_layer(a), torch.tensor([5.0, 1.0]))


def test_sample_norms_are_at_least_float32() -> None:
    g = torch.full((2, 300), 300.0, dtype=torch.float16)  # squares overflow float16
    norms = calc_sample_norms_one_layer(g)
    assert norms.dtype == torch.float32
    assert torch.allclose(norms, torch.full((2,), 300.0 * 300**0.5))


def test_sample_norms_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="named_params is empty"):
        calc_sample_norms([])
    with pytest.raises(ValueError, match="different batch sizes"):
        calc_sample_norms([("a", torch.ones(2, 3)), ("b", torch.ones(3, 3))])


def test_sum_over_all_but_batch_and_last_n() -> None:
    t = torch.arange(2 * 3 * 4 * 5, dtype=DT).view(2, 3, 4, 5)
    assert torch.equal(sum_over_all_but_batch_and_last_n(t, 1), t.sum(dim=(1, 2)))
    assert torch.equal(sum_over_all_but_batch_and_last_n(t, 2), t.sum(dim=1))
    assert sum_over_all_but_batch_and_last_n(t, 3) is t
    with pytest.raises(ValueError, match="n_dims must be"):
        sum_over_all_but_batch_and_last_n(t, 4)


@pytest.mark.parametrize(
    ("kernel", "padding", "stride", "dilation"),
    [((3, 2), (1, 0), (2, 1), (1, 2)), (3, 0, 1, 1), ((2, 3), (0, 2), (1, 3), (2, 1))],
)
def test_unfold2d_equals_torch_unfold(kernel, padding, stride, dilation) -> None:
    x = torch.randn(2, 3, 9, 8, dtype=DT)
    ours = unfold2d(x, kernel_size=kernel, padding=padding, stride=stride, dilation=dilation)
    ref = F.unfold(x, kernel_size=kernel, padding=padding, stride=stride, dilation=dilation)
    assert torch.equal(ours, ref)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("dilation", [1, 2])
def test_unfold2d_string_padding_reproduces_conv2d(padding, dilation) -> None:
    x = torch.randn(2, 3, 8, 7, dtype=DT)
    w = torch.randn(4, 3, 2, 3, dtype=DT)  # even kernel: "same" pads asymmetrically
    ref = F.conv2d(x, w, padding=padding, dilation=dilation)
    cols = unfold2d(x, kernel_size=(2, 3), padding=padding, stride=(1, 1), dilation=(dilation, dilation))
    out = (w.view(4, -1) @ cols).view(ref.shape)
    assert torch.allclose(out, ref)


@pytest.mark.parametrize(
    ("kernel", "padding", "stride", "dilation"),
    [(2, 0, 1, 1), ((3, 2, 2), (1, 0, 1), (2, 1, 1), (1, 2, 1)), (3, "same", 1, 2), ((2, 1, 3), "valid", 1, 1)],
)
def test_unfold3d_reproduces_conv3d(kernel, padding, stride, dilation) -> None:
    x = torch.randn(2, 3, 7, 6, 5, dtype=DT)
    k = (kernel,) * 3 if isinstance(kernel, int) else kernel
    w = torch.randn(4, 3, *k, dtype=DT)
    ref = F.conv3d(x, w, padding=padding, stride=stride, dilation=dilation)
    cols = unfold3d(x, kernel_size=kernel, padding=padding, stride=stride, dilation=dilation)
    assert cols.shape == (2, 3 * w[0, 0].numel(), ref[0, 0].numel())
    assert torch.allclose((w.view(4, -1) @ cols).view(ref.shape), ref)


def test_unfold_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        unfold3d(torch.zeros(1, 2, 3, 4), kernel_size=2)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        unfold2d(torch.zeros(1, 2, 3), kernel_size=2, padding=0, stride=1, dilation=1)
    with pytest.raises(ValueError, match="padding must be"):
        unfold3d(torch.zeros(1, 1, 3, 3, 3), kernel_size=2, padding="full")


def test_filter_dilated_rows_keeps_every_dilation_th_element() -> None:
    t = torch.arange(5 * 3, dtype=DT).view(1, 5, 3).expand(2, 5, 3)
    out = filter_dilated_rows(t, (2, 1), (5, 3), (3, 3))
    assert torch.equal(out, t[:, ::2, :])
    with pytest.raises(ValueError, match="dilated_kernel_size"):
        filter_dilated_rows(t, (2, 1), (4, 3), (2, 3))
