"""Conv1d/Conv2d/Conv3d against ``F.convNd(x, W + scaling * (B @ A).view(W.shape))``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_layers
from tests.helpers import DTYPES, assert_close, fill_lora_, up

# (layer class, torch class, functional conv, tuple kernel, input spatial size)
DIMS = {
    1: (lora_layers.Conv1d, nn.Conv1d, F.conv1d, (3,), (11,)),
    2: (lora_layers.Conv2d, nn.Conv2d, F.conv2d, (3, 2), (9, 8)),
    3: (lora_layers.Conv3d, nn.Conv3d, F.conv3d, (3, 1, 2), (7, 5, 6)),
}
# groups -> (in_channels, out_channels)
GROUPS = {1: (4, 6), 2: (4, 6), "depthwise": (4, 8)}
R, ALPHA = 2, 4


def make(nd, groups=1, dtype=torch.float32, bias=True, **kw):
    cls, _, _, kernel, _ = DIMS[nd]
    cin, cout = GROUPS[groups]
    kw.setdefault("r", R)
    kw.setdefault("lora_alpha", ALPHA)
    layer = cls(
        cin,
        cout,
        kernel,
        groups=cin if groups == "depthwise" else groups,
        dilation=2,
        padding=1,
        bias=bias,
        dtype=dtype,
        **kw,
    )
    if layer.r:
        fill_lora_(layer)
    return layer


def make_input(nd, batch=True, dtype=torch.float32):
    cin = 4
    shape = (2, cin, *DIMS[nd][4]) if batch else (cin, *DIMS[nd][4])
    return (torch.randn(shape) * 0.5).to(dtype)


def dense_conv(layer, nd, x, A, B, W, b):
    """F.convNd with the dense kernel W + scaling * (B @ A).view(W.shape)."""
    conv = DIMS[nd][2]
    w = W + layer.scaling * (B @ A).view(W.shape)
    return conv(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("groups", list(GROUPS), ids=str)
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_acceptance_merged_unmerged_and_dense_reference(nd, groups):
    layer = make(nd, groups)
    x = make_input(nd).requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    x_ref, A, B = (t.detach().requires_grad_() for t in (x, layer.lora_A, layer.lora_B))
    y_ref = dense_conv(layer, nd, x_ref, A, B, layer.weight, layer.bias)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)
    base = DIMS[nd][2](
        x.detach(), layer.weight, layer.bias, layer.stride, layer.padding, 2, layer.groups
    )
    assert (y - base).abs().max() > 0.1  # the update is really there

    with torch.no_grad():
        merged = layer.eval()(x)
    assert layer.merged
    torch.testing.assert_close(merged, y.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_r_is_the_true_rank(nd):
    layer = make(nd, groups=1, r=3)
    delta = layer.delta_weight()
    fan_in = 4 * math.prod(DIMS[nd][3])
    assert layer.lora_A.shape == (3, fan_in) and layer.lora_B.shape == (6, 3)
    assert delta.shape == layer.weight.shape
    assert torch.linalg.matrix_rank(delta.reshape(6, fan_in)) == 3


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv2d_dtypes_grads_and_merged_weight_bit_exact(dtype, bias):
    layer = make(2, groups=2, dtype=dtype, bias=bias)
    x = make_input(2, dtype=dtype).requires_grad_()
    y = layer(x)
    g = (torch.randn(y.shape) * 0.1).to(dtype)  # grads sum ~60 positions: keep them of order 1
    y.backward(g)

    W = layer.weight
    x_ref, A, B = (up(t.detach()).requires_grad_() for t in (x, layer.lora_A, layer.lora_B))
    b = None if layer.bias is None else up(layer.bias)
    y_ref = dense_conv(layer, 2, x_ref, A, B, up(W), b)
    y_ref.backward(up(g))
    assert y.dtype == dtype
    assert_close(y, y_ref)
    assert_close(x.grad, x_ref.grad)
    assert_close(layer.lora_A.grad, A.grad)
    assert_close(layer.lora_B.grad, B.grad)

    A, B = layer.lora_A, layer.lora_B
    expected_weight = (up(W) + (layer.scaling * (up(B) @ up(A))).view(W.shape)).to(W.dtype)
    with torch.no_grad():
        merged = layer.eval()(x)
    assert torch.equal(layer.merged_weight, expected_weight)
    assert merged.dtype == dtype
    assert_close(merged, y_ref)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_unbatched_input(nd):
    layer = make(nd, groups=2)
    x = make_input(nd, batch=False)
    expected = dense_conv(layer, nd, x, layer.lora_A, layer.lora_B, layer.weight, layer.bias)
    assert_close(layer(x), expected)


def test_dropout_branch_convolves_dropped_input_with_delta():
    layer = make(2, groups=1, lora_dropout=0.4)
    x = make_input(2)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    x_drop = F.dropout(x, 0.4, training=True)  # the same mask, drawn from the same state
    delta = layer.scaling * (layer.lora_B @ layer.lora_A).view(layer.weight.shape)
    expected = F.conv2d(x, layer.weight, layer.bias, 1, 1, 2, 1) + F.conv2d(
        x_drop, delta, None, 1, 1, 2, 1
    )
    assert_close(y, expected)
    with torch.no_grad():
        eval_out = layer.eval()(x)
    assert_close(
        eval_out, dense_conv(layer, 2, x, layer.lora_A, layer.lora_B, layer.weight, layer.bias)
    )


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_init_kaiming_zeros_output_equals_base(nd):
    cls, torch_cls, _, kernel, _ = DIMS[nd]
    torch.manual_seed(9)
    layer = cls(4, 6, kernel, r=R, groups=2, stride=2, padding_mode="reflect", padding=1)
    torch.manual_seed(9)
    base = torch_cls(4, 6, kernel, groups=2, stride=2, padding_mode="reflect", padding=1)
    fan_in = 2 * math.prod(kernel)
    expected_A = torch.empty(R, fan_in)
    nn.init.kaiming_uniform_(expected_A, a=math.sqrt(5))
    assert torch.equal(layer.weight, base.weight)
    assert torch.equal(layer.lora_A, expected_A)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = make_input(nd)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_from_module_shares_parameters_and_meta(nd):
    cls, torch_cls, _, kernel, _ = DIMS[nd]
    base = torch_cls(4, 8, kernel, groups=4, dilation=2, padding="same")
    layer = cls.from_module(base, r=R)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.groups, layer.dilation, layer.padding) == (4, base.dilation, "same")
    x = make_input(nd)
    assert torch.equal(layer(x), base(x))
    with torch.device("meta"):
        meta = torch_cls(4, 6, kernel)
    layer = cls.from_module(meta, r=R)
    assert layer.weight is meta.weight and layer.lora_A.is_meta


def test_r0_is_plain_conv():
    torch.manual_seed(6)
    layer = lora_layers.Conv2d(4, 6, 3, r=0)
    torch.manual_seed(6)
    base = nn.Conv2d(4, 6, 3)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    x = make_input(2)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("cls", [lora_layers.Conv1d, lora_layers.Conv2d, lora_layers.Conv3d])
def test_fan_in_fan_out_raises(cls):
    with pytest.raises(ValueError, match=f"fan_in_fan_out=True makes no sense for {cls.__name__}"):
        cls(4, 6, 1, r=2, fan_in_fan_out=True)
