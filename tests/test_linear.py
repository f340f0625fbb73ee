"""lora_layers.Linear against a dense reference ``W + scaling * B @ A`` written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_layers
from tests.helpers import DTYPES, assert_close, fill_lora_, up

IN, OUT, R, ALPHA = 16, 12, 4, 8
SHAPES = [(IN,), (3, IN), (2, 3, IN)]


def make(dtype=torch.float32, bias=True, fan_in_fan_out=False, **kw):
    kw.setdefault("r", R)
    kw.setdefault("lora_alpha", ALPHA)
    layer = lora_layers.Linear(IN, OUT, bias=bias, fan_in_fan_out=fan_in_fan_out, dtype=dtype, **kw)
    if layer.r:
        fill_lora_(layer)
    return layer


def dense_weight(layer) -> torch.Tensor:
    """The effective (out, in) weight in fp32: W + scaling * B @ A."""
    w = up(layer.weight)
    w = w.t() if layer.fan_in_fan_out else w
    return w + layer.scaling * (up(layer.lora_B) @ up(layer.lora_A))


def dense_forward(layer, x, A, B, W, b):
    """Reference forward from fp32 leaf tensors (W stored as the layer stores it)."""
    w = W.t() if layer.fan_in_fan_out else W
    return F.linear(x, w + layer.scaling * (B @ A), b)


def leaves(layer, x):
    """fp32 copies of x, A, B, W, b that require grad, for the reference."""

    def leaf(t):
        return None if t is None else up(t.detach()).requires_grad_()

    return leaf(x), leaf(layer.lora_A), leaf(layer.lora_B), leaf(layer.weight), leaf(layer.bias)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_and_grads_match_dense_reference(dtype, bias, shape, fan_in_fan_out):
    layer = make(dtype, bias, fan_in_fan_out)
    x = torch.randn(shape).to(dtype).requires_grad_()
    grad_out = torch.randn(*shape[:-1], OUT).to(dtype)

    y = layer(x)
    y.backward(grad_out)

    x_ref, A_ref, B_ref, W_ref, b_ref = leaves(layer, x)
    y_ref = dense_forward(layer, x_ref, A_ref, B_ref, W_ref, b_ref)
    y_ref.backward(up(grad_out))

    assert y.shape == (*shape[:-1], OUT) and y.dtype == dtype
    assert_close(y, y_ref)
    assert_close(x.grad, x_ref.grad)
    assert_close(layer.lora_A.grad, A_ref.grad)
    assert_close(layer.lora_B.grad, B_ref.grad)
    assert layer.weight.grad is None  # frozen, as in loralib
    if bias:
        assert_close(layer.bias.grad, b_ref.grad)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_equals_unmerged_and_dense(dtype, fan_in_fan_out):
    layer = make(dtype, fan_in_fan_out=fan_in_fan_out)
    x = torch.randn(2, 3, IN).to(dtype)
    with torch.no_grad():
        unmerged = layer.train()(x)
        assert not layer.merged
        merged = layer.eval()(x)
        assert layer.merged
    expected = F.linear(up(x), dense_weight(layer), up(layer.bias))
    assert_close(merged, expected)
    assert_close(unmerged, expected)
    assert_close(merged, up(unmerged))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_weight_is_delta_rounded_once(dtype, fan_in_fan_out):
    layer = make(dtype, fan_in_fan_out=fan_in_fan_out)
    W, A, B = layer.weight, layer.lora_A, layer.lora_B
    delta = layer.scaling * (up(B) @ up(A))  # (out, in)
    if fan_in_fan_out:
        delta = delta.t()
    expected = (up(W) + delta).to(W.dtype)
    layer.merge()
    assert torch.equal(layer.merged_weight, expected)
    assert torch.equal(layer.get_merged_weight(), expected)
    assert layer.delta_weight().dtype == up(W).dtype  # fp64 layers merge in fp64
    assert torch.equal(layer.delta_weight(), delta)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fan_in_fan_out_stores_weight_in_out(fan_in_fan_out):
    torch.manual_seed(3)
    layer = lora_layers.Linear(IN, OUT, r=R, fan_in_fan_out=fan_in_fan_out)
    torch.manual_seed(3)
    ref = nn.Linear(IN, OUT)
    expected = ref.weight.t() if fan_in_fan_out else ref.weight
    assert torch.equal(layer.weight, expected)  # same values and init, transposed
    assert layer.merged_weight is None
    layer.merge()
    assert layer.merged_weight.shape == layer.weight.shape


def test_init_output_equals_base_and_matches_kaiming_zeros():
    torch.manual_seed(7)
    layer = lora_layers.Linear(IN, OUT, r=R, lora_alpha=ALPHA)
    torch.manual_seed(7)
    base = nn.Linear(IN, OUT)  # same draws for weight and bias first ...
    expected_A = torch.empty(R, IN)
    nn.init.kaiming_uniform_(expected_A, a=math.sqrt(5))  # ... then A, like nn.Linear's weight
    assert torch.equal(layer.weight, base.weight) and torch.equal(layer.bias, base.bias)
    assert torch.equal(layer.lora_A, expected_A)
    assert torch.count_nonzero(layer.lora_A) == R * IN
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(IN)  # kaiming_uniform(a=sqrt(5)) bound
    assert torch.equal(layer.lora_B, torch.zeros(OUT, R))
    x = torch.randn(5, IN)
    assert torch.equal(layer(x), base(x))


def test_reset_lora_parameters_restores_init_and_unmerges():
    layer = make()
    layer.eval()
    layer.reset_lora_parameters()
    assert not layer.merged
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) == R * IN


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_plain_and_rslora(use_rslora):
    layer = make(r=4, lora_alpha=6, use_rslora=use_rslora)
    expected = 6 / math.sqrt(4) if use_rslora else 6 / 4
    assert layer.scaling == expected
    x = torch.randn(3, IN)
    W, b, A, B = layer.weight, layer.bias, layer.lora_A, layer.lora_B
    assert_close(layer(x), x @ (W + expected * B @ A).T + b)


def test_r0_is_plain_linear():
    torch.manual_seed(1)
    layer = lora_layers.Linear(IN, OUT, r=0, lora_alpha=0)
    torch.manual_seed(1)
    base = nn.Linear(IN, OUT)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert not hasattr(layer, "lora_A")
    assert layer.weight.requires_grad and layer.scaling == 0.0
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, IN)
    assert torch.equal(layer(x), base(x))
    assert layer.eval() is layer and not layer.merged
    layer.merge()
    assert not layer.merged
    assert torch.equal(layer(x), base(x))


def test_eval_and_train_return_the_module():
    layer = make()
    assert layer.eval() is layer
    assert layer.train() is layer
    assert layer.train(False) is layer and layer.merged


def test_merge_weights_false_never_merges():
    layer = make(merge_weights=False)
    layer.eval()
    assert not layer.merged
    layer.merge()  # by hand still works
    assert layer.merged
    layer.train()
    assert layer.merged  # train() only unmerges with merge_weights=True
    layer.unmerge()
    assert not layer.merged


def test_dropout_only_in_training():
    layer = make(lora_dropout=0.5)
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.dropout_p == 0.5
    x = torch.randn(64, IN)
    with torch.no_grad():
        a, b = layer(x), layer(x)
        assert not torch.equal(a, b)  # fresh masks each call
        layer.eval()
        expected = F.linear(x, dense_weight(layer), layer.bias)
        assert_close(layer(x), expected)
        layer.unmerge()  # the unmerged eval path must not drop either
        assert_close(layer(x), expected)
    assert isinstance(make(lora_dropout=0.0).lora_dropout, nn.Identity)


def test_lora_dtype_fp32_on_bf16_base():
    base = nn.Linear(IN, OUT, dtype=torch.bfloat16)
    layer = lora_layers.Linear.from_module(base, r=R, lora_alpha=ALPHA, lora_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    fill_lora_(layer, std=0.25)  # outputs of order 1: bf16 rounds base and update separately
    x = torch.randn(4, IN, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    up(y).sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    expected = F.linear(up(x), dense_weight(layer), up(layer.bias))
    assert_close(y, expected)
    with torch.no_grad():
        assert_close(layer.eval()(x), expected)


def test_from_module_shares_parameters():
    base = nn.Linear(IN, OUT)
    layer = lora_layers.Linear.from_module(base, r=R, lora_alpha=ALPHA)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert (layer.in_features, layer.out_features, layer.r) == (IN, OUT, R)
    x = torch.randn(3, IN)
    assert torch.equal(layer(x), base(x))  # B = 0 at init


def test_from_module_keeps_eval_mode_without_merging():
    base = nn.Linear(IN, OUT).eval()
    layer = lora_layers.Linear.from_module(base, r=R)
    assert not layer.training and not layer.merged
