"""MergedLinear: per-slice LoRA on fused projections, against a dense reference written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_layers
from tests.helpers import DTYPES, assert_close, fill_lora_, saved_tensor_bytes, up

SHAPES = [(64,), (3, 64), (2, 5, 64)]


def make(
    enable=(True, False, True),
    split_sizes=(64, 16, 16),
    dtype=torch.float32,
    bias=True,
    fan_in_fan_out=False,
    **kw,
):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    out = sum(split_sizes) if split_sizes else 96
    layer = lora_layers.MergedLinear(
        64,
        out,
        enable_lora=enable,
        split_sizes=split_sizes,
        bias=bias,
        fan_in_fan_out=fan_in_fan_out,
        dtype=dtype,
        **kw,
    )
    if layer.r:
        fill_lora_(layer, std=0.3)
    return layer


def slice_bounds(sizes):
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    return list(zip(starts[:-1], starts[1:], strict=True))


def dense_delta(layer, A, B) -> torch.Tensor:
    """The (out, in) delta: scaling * B_i @ A_i placed in each enabled slice's rows."""
    delta = torch.zeros(layer.out_features, layer.in_features, dtype=A.dtype)
    r, k, b_row = layer.r, 0, 0
    for on, (start, stop) in zip(layer.enable_lora, slice_bounds(layer.split_sizes), strict=True):
        if on:
            a_k = A[k * r : (k + 1) * r]
            b_k = B[b_row : b_row + stop - start]
            delta[start:stop] = layer.scaling * (b_k @ a_k)
            k, b_row = k + 1, b_row + stop - start
    return delta


def base_weight(layer) -> torch.Tensor:
    return layer.weight.t() if layer.fan_in_fan_out else layer.weight


def test_acceptance_qkv_gqa_slices():
    """MergedLinear(64, 96, r=4, enable_lora=(T, F, T), split_sizes=(64, 16, 16))."""
    layer = lora_layers.MergedLinear(
        64, 96, r=4, lora_alpha=8, enable_lora=(True, False, True), split_sizes=(64, 16, 16)
    )
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (80, 4)
    fill_lora_(layer, std=0.3)
    x = torch.randn(4, 8, 64, requires_grad=True)

    y = layer(x)
    base = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(y[..., 64:80], base[..., 64:80])  # k: bit-identical to the base

    A = layer.lora_A.detach().requires_grad_()
    B = layer.lora_B.detach().requires_grad_()
    x_ref = x.detach().requires_grad_()
    y_ref = F.linear(x_ref, layer.weight + dense_delta(layer, A, B), layer.bias)
    torch.testing.assert_close(y[..., :64], y_ref[..., :64], rtol=1e-5, atol=1e-5)  # q
    torch.testing.assert_close(y[..., 80:], y_ref[..., 80:], rtol=1e-5, atol=1e-5)  # v
    assert (y[..., :64] - base[..., :64]).abs().max() > 0.1  # q really has an update

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x_ref.grad)
    assert_close(layer.lora_A.grad, A.grad)
    assert_close(layer.lora_B.grad, B.grad)


def test_acceptance_saved_bytes_under_twice_the_input():
    layer = lora_layers.MergedLinear(
        64, 96, r=4, lora_alpha=8, enable_lora=(True, False, True), split_sizes=(64, 16, 16)
    )
    fill_lora_(layer)
    x = torch.randn(4, 8, 64, requires_grad=True)
    saved = saved_tensor_bytes(lambda: layer(x), exclude=list(layer.parameters()))
    x_bytes = x.numel() * x.element_size()
    assert x_bytes <= saved < 2 * x_bytes  # x itself plus the small (N, 8) projection


def test_saved_bytes_measure_catches_a_dense_delta():
    """The same measure flags loralib's MergedLinear, which saves a dense out x in delta."""
    import loralib

    layer = loralib.MergedLinear(64, 96, r=4, lora_alpha=8, enable_lora=[True, False, True])
    x = torch.randn(4, 8, 64, requires_grad=True)
    saved = saved_tensor_bytes(lambda: layer(x), exclude=list(layer.parameters()))
    assert saved > 2 * x.numel() * x.element_size()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_and_grads_match_dense_reference(dtype, bias, shape, fan_in_fan_out):
    layer = make(dtype=dtype, bias=bias, fan_in_fan_out=fan_in_fan_out)
    x = (torch.randn(shape) * 0.5).to(dtype).requires_grad_()
    g = (torch.randn(*shape[:-1], 96) * 0.25).to(dtype)  # keeps grads of order 1 for bf16
    y = layer(x)
    y.backward(g)

    x_ref, A, B = (up(t.detach()).requires_grad_() for t in (x, layer.lora_A, layer.lora_B))
    b = None if layer.bias is None else up(layer.bias.detach()).requires_grad_()
    y_ref = F.linear(x_ref, up(base_weight(layer)) + dense_delta(layer, A, B), b)
    y_ref.backward(up(g))

    assert y.shape == (*shape[:-1], 96) and y.dtype == dtype
    assert_close(y, y_ref)
    base = F.linear(x.detach(), base_weight(layer), layer.bias)
    assert torch.equal(y[..., 64:80], base[..., 64:80])
    assert_close(x.grad, x_ref.grad)
    assert_close(layer.lora_A.grad, A.grad)
    assert_close(layer.lora_B.grad, B.grad)
    if bias:
        assert_close(layer.bias.grad, b.grad)


@pytest.mark.parametrize(
    "enable, split_sizes",
    [
        ((True, True, True), None),
        ((False, True), None),
        ((True, False, False, True), (8, 40, 24, 24)),
        ((False, True, False), (64, 16, 16)),
    ],
)
def test_other_slice_layouts_match_dense_reference(enable, split_sizes):
    layer = make(enable=enable, split_sizes=split_sizes)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        y = layer(x)
        merged = layer.eval()(x)
    expected = F.linear(
        x, layer.weight + dense_delta(layer, layer.lora_A, layer.lora_B), layer.bias
    )
    assert_close(y, expected)
    assert_close(merged, expected)
    base = F.linear(x, layer.weight, layer.bias)
    for on, (start, stop) in zip(enable, slice_bounds(layer.split_sizes), strict=True):
        if not on:
            assert torch.equal(y[..., start:stop], base[..., start:stop])
            assert torch.equal(merged[..., start:stop], base[..., start:stop])


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_equals_unmerged(dtype, fan_in_fan_out):
    layer = make(dtype=dtype, fan_in_fan_out=fan_in_fan_out)
    x = (torch.randn(3, 64) * 0.5).to(dtype)
    with torch.no_grad():
        unmerged = layer(x)
        merged = layer.eval()(x)
    assert layer.merged
    assert_close(merged, up(unmerged))
    # The k slice has no update: merged rows are the base rows exactly, so outputs agree too.
    assert torch.equal(merged[..., 64:80], unmerged[..., 64:80])


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_weight_bit_exact_with_slice_placement(dtype, fan_in_fan_out):
    layer = make(dtype=dtype, fan_in_fan_out=fan_in_fan_out)
    W = layer.weight
    delta = torch.zeros(96, 64, dtype=up(W).dtype)
    A, B = up(layer.lora_A), up(layer.lora_B)
    delta[0:64] = layer.scaling * (B[0:64] @ A[0:4])  # q: A rows 0:4, B rows 0:64
    delta[80:96] = layer.scaling * (B[64:80] @ A[4:8])  # v: A rows 4:8, B rows 64:80
    if fan_in_fan_out:
        delta = delta.t()
    expected = (up(W) + delta).to(W.dtype)
    layer.merge()
    assert torch.equal(layer.merged_weight, expected)
    assert torch.equal(layer.delta_weight(), delta)
    rows = layer.merged_weight.t() if fan_in_fan_out else layer.merged_weight
    assert torch.equal(rows[64:80], base_weight(layer)[64:80])


def test_all_slices_disabled_is_a_plain_layer():
    torch.manual_seed(2)
    layer = lora_layers.MergedLinear(64, 96, r=4, enable_lora=(False, False, False))
    torch.manual_seed(2)
    base = nn.Linear(64, 96)
    assert layer.r == 0 and not hasattr(layer, "lora_A")
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight.requires_grad
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), base(x))
    layer.eval()
    assert not layer.merged and torch.equal(layer(x), base(x))
    assert list(lora_layers.lora_modules(layer)) == []


def test_init_each_block_kaiming_b_zeros_output_equals_base():
    torch.manual_seed(5)
    layer = lora_layers.MergedLinear(
        64, 96, r=4, enable_lora=(True, False, True), split_sizes=(64, 16, 16)
    )
    torch.manual_seed(5)
    base = nn.Linear(64, 96)
    expected_A = torch.empty(8, 64)
    for block in expected_A.split(4):
        nn.init.kaiming_uniform_(block, a=math.sqrt(5))
    assert torch.equal(layer.lora_A, expected_A)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(64)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), base(x))


def test_equal_default_split():
    layer = lora_layers.MergedLinear(8, 12, r=2, enable_lora=(True, False, True))
    assert layer.split_sizes == (4, 4, 4)
    assert layer.lora_A.shape == (4, 8) and layer.lora_B.shape == (8, 2)  # loralib's layout


def test_from_module_with_split_sizes_shares_parameters():
    base = nn.Linear(64, 96)
    layer = lora_layers.MergedLinear.from_module(
        base, r=4, lora_alpha=8, enable_lora=(True, False, True), split_sizes=(64, 16, 16)
    )
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_B.shape == (80, 4)
    with torch.device("meta"):
        meta = nn.Linear(64, 96)
    layer = lora_layers.MergedLinear.from_module(
        meta, r=4, enable_lora=(True, False, True), split_sizes=(64, 16, 16)
    )
    assert layer.weight is meta.weight and layer.lora_A.is_meta


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"enable_lora": (True,) * 5}, ValueError, r"len\(enable_lora\)=5 does not divide"),
        (
            {"enable_lora": (True, True), "split_sizes": (60, 30)},
            ValueError,
            r"split_sizes=\(60, 30\) sum to 90",
        ),
        (
            {"enable_lora": (True, True), "split_sizes": (64, 16, 16)},
            ValueError,
            r"split_sizes=\(64, 16, 16\) has 3 entries",
        ),
        (
            {"enable_lora": (True, True), "split_sizes": (100, -4)},
            ValueError,
            r"positive ints.*-4",
        ),
        ({"enable_lora": ()}, ValueError, "at least one slice"),
        ({"enable_lora": True}, TypeError, "enable_lora must be a sequence of bools, got True"),
    ],
)
def test_bad_slices_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        lora_layers.MergedLinear(64, 96, r=4, **kwargs)
