"""Property-based tests (hypothesis) over shapes, ranks, split sizes and dtypes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_layers
from lora_layers.functional import pack_bits, unpack_bits
from tests.helpers import DTYPES, TOLERANCES, assert_close, fill_lora_, up

# Small example counts keep the suite fast; the autouse seed fixture is harmless here
# because every example reseeds torch from a drawn seed.
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)


@st.composite
def merged_configs(draw):
    n = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 8), min_size=n, max_size=n))
    enable = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return {
        "in_features": draw(st.integers(1, 12)),
        "split_sizes": tuple(sizes),
        "enable_lora": tuple(enable),
        "r": draw(st.integers(0, 4)),
        "lora_alpha": draw(st.sampled_from([1, 2.5, 16])),
        "use_rslora": draw(st.booleans()),
        "fan_in_fan_out": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "lead": tuple(draw(st.lists(st.integers(1, 3), max_size=2))),
    }


@SETTINGS
@given(cfg=merged_configs(), dtype=dtypes, seed=seeds)
def test_merged_linear_matches_dense_reference(cfg, dtype, seed):
    torch.manual_seed(seed)
    lead = cfg.pop("lead")
    sizes, enable = cfg["split_sizes"], cfg["enable_lora"]
    layer = lora_layers.MergedLinear(out_features=sum(sizes), dtype=dtype, **cfg)
    active = cfg["r"] > 0 and any(enable)
    assert (layer.r > 0) == active
    if active:
        fill_lora_(layer, std=0.3)
    x = (torch.randn(*lead, cfg["in_features"]) * 0.5).to(dtype)

    W = layer.weight.t() if cfg["fan_in_fan_out"] else layer.weight  # (out, in)
    delta = torch.zeros(sum(sizes), cfg["in_features"], dtype=up(layer.weight).dtype)
    start, k, b_row = 0, 0, 0
    for size, on in zip(sizes, enable, strict=True):
        if on and active:
            a_k = up(layer.lora_A[k * layer.r : (k + 1) * layer.r])
            b_k = up(layer.lora_B[b_row : b_row + size])
            delta[start : start + size] = layer.scaling * (b_k @ a_k)
            k, b_row = k + 1, b_row + size
        start += size
    bias = None if layer.bias is None else up(layer.bias)
    expected = F.linear(up(x), up(W) + delta, bias)

    with torch.no_grad():
        y = layer(x)
        base = F.linear(x, W, layer.bias)
        assert_close(y, expected)
        start = 0
        for size, on in zip(sizes, enable, strict=True):
            if not (on and active):
                assert torch.equal(y[..., start : start + size], base[..., start : start + size])
            start += size
        if active:
            layer.merge()
            merged_delta = delta.t() if cfg["fan_in_fan_out"] else delta
            assert torch.equal(layer.merged_weight, (up(layer.weight) + merged_delta).to(dtype))
            assert_close(layer(x), expected)


@SETTINGS
@given(
    nd=st.integers(1, 3),
    groups=st.sampled_from([1, 2, "depthwise"]),
    kernel=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    r=st.integers(1, 4),
    dilation=st.integers(1, 2),
    dtype=dtypes,
    seed=seeds,
)
def test_conv_merge_is_exact_and_rank_is_r(nd, groups, kernel, r, dilation, dtype, seed):
    torch.manual_seed(seed)
    cls = (lora_layers.Conv1d, lora_layers.Conv2d, lora_layers.Conv3d)[nd - 1]
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    cin, cout = (4, 8) if groups == "depthwise" else (4, 6)
    g = cin if groups == "depthwise" else groups
    k = tuple(kernel[:nd])
    layer = fill_lora_(
        cls(cin, cout, k, r=r, lora_alpha=2, groups=g, dilation=dilation, dtype=dtype)
    )
    fan_in = cin // g * math.prod(k)
    delta = layer.delta_weight()
    assert torch.linalg.matrix_rank(delta.reshape(cout, fan_in)) <= min(r, cout, fan_in)
    expected_delta = (layer.scaling * (up(layer.lora_B) @ up(layer.lora_A))).view(
        layer.weight.shape
    )
    assert torch.equal(delta, expected_delta)
    layer.merge()
    assert torch.equal(layer.merged_weight, (up(layer.weight) + expected_delta).to(dtype))

    x = (torch.randn(1, cin, *(7,) * nd) * 0.5).to(dtype)
    expected = conv(up(x), up(layer.weight) + expected_delta, up(layer.bias), 1, 0, dilation, g)
    with torch.no_grad():
        assert_close(layer(x), expected)  # merged
        layer.unmerge()
        # Unmerged, the base conv and the LoRA branch are each rounded to dtype before they
        # are added, so the error bound is relative to each term, not to their sum (which
        # can cancel to near zero in bf16).
        base = conv(up(x), up(layer.weight), up(layer.bias), 1, 0, dilation, g)
        branch = conv(up(x), expected_delta, None, 1, 0, dilation, g)
        rtol, atol = TOLERANCES[dtype]
        err = (up(layer(x)) - expected).abs()
        assert (err <= atol + rtol * (base.abs() + branch.abs())).all(), err.max()


@SETTINGS
@given(
    num=st.integers(1, 30),
    dim=st.integers(1, 10),
    r=st.integers(1, 5),
    dtype=dtypes,
    seed=seeds,
)
def test_embedding_merge_is_exact(num, dim, r, dtype, seed):
    torch.manual_seed(seed)
    layer = fill_lora_(lora_layers.Embedding(num, dim, r=r, lora_alpha=3, dtype=dtype), std=0.3)
    table = up(layer.weight) + layer.scaling * (up(layer.lora_B) @ up(layer.lora_A)).t()
    idx = torch.randint(0, num, (2, 3))
    with torch.no_grad():
        assert_close(layer(idx), table[idx])
        layer.merge()
        assert torch.equal(layer.merged_weight, table.to(dtype))
        assert torch.equal(layer(idx), table.to(dtype)[idx])


@SETTINGS
@given(
    r=st.integers(1, 64),
    alpha=st.floats(0.01, 512, allow_nan=False),
    use_rslora=st.booleans(),
)
def test_scaling_formula(r, alpha, use_rslora):
    layer = lora_layers.Linear(2, 2, r=r, lora_alpha=alpha, use_rslora=use_rslora)
    assert layer.scaling == alpha / (math.sqrt(r) if use_rslora else r)


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    p=st.floats(0, 1),
    seed=seeds,
)
def test_pack_bits_round_trip(shape, p, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < p
    packed = pack_bits(mask)
    assert packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)
