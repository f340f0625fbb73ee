"""The fast path (LoRALinearFunction) and the plain-ops path against a dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_layers.functional as lf
from lora_layers.config import SliceLayout
from lora_layers.functional import LoRALinearFunction, lora_linear, pack_bits, unpack_bits
from tests.helpers import assert_close, saved_tensor_bytes

IN, R, OUT = 16, 3, 10
SINGLE = SliceLayout.whole(OUT)  # Linear: one slice covering all outputs
QKV = SliceLayout.of((6, 2, 2), (True, False, True))  # MergedLinear: rows 0:6 and 8:10


def b_rows(slices):
    return sum(stop - start for start, stop in slices.out_slices)


def tensors(slices, fan_in_fan_out=False, bias=True, dtype=torch.float32):
    """x, W, b, A, B as fp32 leaves that require grad (W too, to check its gradient)."""
    W = torch.randn(IN, OUT) if fan_in_fan_out else torch.randn(OUT, IN)
    ts = [
        torch.randn(7, IN),
        W * 0.3,
        torch.randn(OUT) if bias else None,
        torch.randn(R * len(slices.out_slices), IN) * 0.5,
        torch.randn(b_rows(slices), R) * 0.5,
    ]
    return [None if t is None else t.to(dtype).requires_grad_() for t in ts]


def keep_mask(shape, p, seed):
    """The mask the Function draws: seed, then ``lora_layers.functional.keep_mask``."""
    torch.manual_seed(seed)
    return lf.keep_mask(shape, p, torch.device("cpu"))


def dense_reference(x, W, b, A, B, scaling, p, fan_in_fan_out, slices, seed):
    """x @ W.T + b + dropout(x) @ delta.T with delta = scaling * B_i @ A_i placed per slice."""
    w = W.t() if fan_in_fan_out else W
    delta = torch.zeros_like(w)
    b_row = 0
    for i, (start, stop) in enumerate(slices.out_slices):
        delta[start:stop] = scaling * (B[b_row : b_row + stop - start] @ A[i * R : (i + 1) * R])
        b_row += stop - start
    xd = x * keep_mask(x.shape, p, seed) / lf.dropout_keep_probability(p) if p > 0 else x
    return F.linear(x, w, b) + F.linear(xd, delta)


def run_fast(x, W, b, A, B, scaling, p, fan_in_fan_out, slices, seed):
    torch.manual_seed(seed)
    return LoRALinearFunction.apply(x, W, b, A, B, scaling, p, fan_in_fan_out, slices)


def grads(y, g, leaves):
    return torch.autograd.grad(y, [t for t in leaves if t is not None], g)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("slices", [SINGLE, QKV], ids=["single", "qkv"])
def test_fast_path_output_and_grads_match_dense_reference(slices, p, fan_in_fan_out, bias):
    leaves = tensors(slices, fan_in_fan_out, bias)
    args = (*leaves, 1.5, p, fan_in_fan_out, slices, 42)
    y = run_fast(*args)
    y_ref = dense_reference(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for got, want in zip(grads(y, g, leaves), grads(y_ref, g, leaves), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_disabled_columns_are_the_base_output_bit_for_bit():
    x, W, b, A, B = tensors(QKV)
    y = run_fast(x, W, b, A, B, 2.0, 0.0, False, QKV, 0)
    base = F.linear(x, W, b)
    assert torch.equal(y[:, 6:8], base[:, 6:8])
    assert not torch.equal(y[:, :6], base[:, :6])


def test_dropout_statistics():
    p, n = 0.25, 2048
    eye = torch.eye(IN)
    x = torch.ones(n, IN)
    # W = 0, A = B = I, scaling 1: the output is exactly dropout(x) = keep / (1 - p).
    y = LoRALinearFunction.apply(
        x, torch.zeros(IN, IN), None, eye, eye, 1.0, p, False, SliceLayout.whole(IN)
    )
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.01  # n * IN = 32768 draws: std of the rate is 0.0024
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.02  # inverted dropout keeps the mean


def test_dropout_is_deterministic_under_a_fixed_seed():
    leaves = tensors(SINGLE)
    g = torch.randn(7, 10)
    a = run_fast(*leaves, 1.0, 0.5, False, SINGLE, 7)
    grads_a = grads(a, g, leaves)
    b = run_fast(*leaves, 1.0, 0.5, False, SINGLE, 7)
    grads_b = grads(b, g, leaves)
    c = run_fast(*leaves, 1.0, 0.5, False, SINGLE, 8)
    assert torch.equal(a, b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.equal(ga, gb)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5, 7), (4, 64)], ids=str)
def test_pack_bits_round_trip(shape):
    mask = torch.rand(shape) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-mask.numel() // 8),)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)
    assert torch.equal(unpack_bits(pack_bits(~mask), mask.shape), ~mask)


def test_pack_bits_packs_eight_per_byte_lsb_first():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b1000_0001, 0b1]


@pytest.mark.parametrize("slices", [SINGLE, QKV], ids=["single", "qkv"])
def test_plain_path_equals_fast_path(slices):
    leaves = tensors(slices)
    g = torch.randn(7, 10)
    fast = run_fast(*leaves, 1.5, 0.0, False, slices, 0)
    plain = lf._plain_lora_linear(*leaves, 1.5, nn.Identity(), False, slices)
    torch.testing.assert_close(plain, fast, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(plain, g, leaves), grads(fast, g, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.fixture
def no_plain_path(monkeypatch):
    monkeypatch.setattr(lf, "_plain_lora_linear", None)  # calling it would raise TypeError


@pytest.mark.parametrize("slices", [SINGLE, QKV], ids=["single", "qkv"])
def test_autocast_takes_fast_path_and_matches_reference(slices, no_plain_path):
    x, W, b, A, B = tensors(slices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, 1.5, nn.Identity(), False, slices)
    assert y.dtype == torch.bfloat16
    assert_close(y, dense_reference(x, W, b, A, B, 1.5, 0.0, False, slices, 0))


@pytest.mark.parametrize("slices", [SINGLE, QKV], ids=["single", "qkv"])
def test_mixed_dtypes_take_fast_path_and_match_reference(slices, no_plain_path):
    x, W, b, A, B = tensors(slices)
    x16, W16, b16 = (t.detach().to(torch.bfloat16) for t in (x, W, b))
    y = lora_linear(x16, W16, b16, A, B, 1.5, nn.Identity(), False, slices)  # fp32 LoRA
    assert y.dtype == torch.bfloat16
    ref = dense_reference(x16.float(), W16.float(), b16.float(), A, B, 1.5, 0.0, False, slices, 0)
    assert_close(y, ref)


def test_same_dtype_takes_fast_path(no_plain_path):
    x, W, b, A, B = tensors(QKV)
    y = lora_linear(x.reshape(7, 1, IN), W, b, A, B, 1.5, nn.Identity(), False, QKV)
    assert y.shape == (7, 1, 10)
    torch.testing.assert_close(
        y.reshape(7, 10), dense_reference(x, W, b, A, B, 1.5, 0.0, False, QKV, 0)
    )


@pytest.mark.parametrize("shape", [(IN,), (4, IN), (2, 3, IN)], ids=str)
def test_lora_linear_keeps_leading_shape(shape):
    _, W, b, A, B = tensors(SINGLE)
    x = torch.randn(shape)
    y = lora_linear(x, W, b, A, B, 1.5, nn.Identity(), False, SINGLE)
    assert y.shape == (*shape[:-1], 10)
    ref = dense_reference(x.reshape(-1, IN), W, b, A, B, 1.5, 0.0, False, SINGLE, 0)
    torch.testing.assert_close(y.reshape(-1, 10), ref)


def test_dropout_module_in_eval_mode_means_no_dropout():
    x, W, b, A, B = tensors(SINGLE)
    drop = nn.Dropout(0.5).eval()
    y = lora_linear(x, W, b, A, B, 1.5, drop, False, SINGLE)
    torch.testing.assert_close(y, dense_reference(x, W, b, A, B, 1.5, 0.0, False, SINGLE, 0))


def test_fast_path_with_dropout_saves_input_projection_and_bit_mask_only():
    _, W, b, A, B = tensors(SINGLE)
    x = torch.randn(64, IN, requires_grad=True)
    drop = nn.Dropout(0.5)
    saved = saved_tensor_bytes(
        lambda: lora_linear(x, W, b, A, B, 1.5, drop, False, SINGLE), exclude=[W, b, A, B]
    )
    x_bytes = x.numel() * 4
    h_bytes = 64 * R * 4
    mask_bytes = x.numel() // 8
    assert saved == x_bytes + h_bytes + mask_bytes
