"""Every layer type in every dtype (fp64, fp32, bf16, fp16) against a dense reference written here.

Hypothesis draws the layer (``Linear`` with and without ``fan_in_fan_out``, ``MergedLinear``
with unequal and disabled slices, ``Embedding``, ``Conv1d/2d/3d`` with groups, stride,
padding and dilation), its rank, alpha and dtype, and checks with B non-zero:

- the unmerged forward and its first derivatives (x, A, B, bias) against autograd through
  ``W + scaling * B @ A`` computed in the reference precision (fp64 for fp64, else fp32);
- the merged weight bit for bit against ``(W + delta).to(dtype)`` summed in that precision,
  and merged outputs against the reference and the unmerged outputs;
- merge/unmerge cycles restoring the weight and the outputs bit for bit;
- with ``B = 0``: the merged weight and merged outputs bit-identical to the base layer's;
- ``MergedLinear``'s disabled slices bit-identical to the base output, merged or not.

Tolerances come from the one table in ``tests/helpers.py``. Second derivatives and
``torch.func`` transforms are tested with the fast path in ``tests/test_functional.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_layers
from tests.helpers import DTYPES, TOLERANCES, fill_lora_, up

# Every (kind, dtype) pair runs in every test; hypothesis draws the rest (a few examples each).
SETTINGS = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
KIND_NAMES = (
    "Linear",
    "Linear_fan_in_fan_out",
    "MergedLinear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
)
CONVS = {"Conv1d": (1, F.conv1d), "Conv2d": (2, F.conv2d), "Conv3d": (3, F.conv3d)}


@dataclass
class Case:
    """One drawn layer: its kind, dtype, constructor kwargs and input shape."""

    kind: str
    dtype: torch.dtype
    seed: int
    kwargs: dict = field(default_factory=dict)
    input_shape: tuple = ()

    def build(self):
        torch.manual_seed(self.seed)
        kw = dict(self.kwargs, dtype=self.dtype)
        if self.kind.startswith("Linear"):
            layer = lora_layers.Linear(**kw)
        elif self.kind == "MergedLinear":
            layer = lora_layers.MergedLinear(**kw)
        elif self.kind == "Embedding":
            layer = lora_layers.Embedding(**kw)
        else:
            layer = getattr(lora_layers, self.kind)(**kw)
        fill_lora_(layer, std=0.4)
        if self.kind == "Embedding" and layer.padding_idx is not None:
            with torch.no_grad():  # as in training: the padding column of A never moves from 0
                layer.lora_A[:, layer.padding_idx] = 0
        return layer

    def make_input(self) -> torch.Tensor:
        if self.kind == "Embedding":
            return torch.randint(0, self.kwargs["num_embeddings"], self.input_shape)
        return (torch.randn(self.input_shape) * 0.5).to(self.dtype)


@st.composite
def cases(draw, kind: str, dtype: torch.dtype) -> Case:
    case = Case(kind, dtype, draw(st.integers(0, 2**31 - 1)))
    kw = {
        "r": draw(st.integers(1, 3)),
        "lora_alpha": draw(st.sampled_from([1, 2.5, 16])),
        "use_rslora": draw(st.booleans()),
    }
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    if kind.startswith("Linear") or kind == "MergedLinear":
        kw["in_features"] = draw(st.integers(1, 6))
        kw["bias"] = draw(st.booleans())
        kw["fan_in_fan_out"] = kind == "Linear_fan_in_fan_out" or (
            kind == "MergedLinear" and draw(st.booleans())
        )
        if kind == "MergedLinear":
            n = draw(st.integers(1, 3))
            kw["split_sizes"] = tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
            enable = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
            kw["enable_lora"] = tuple(enable)
            kw["out_features"] = sum(kw["split_sizes"])
        else:
            kw["out_features"] = draw(st.integers(1, 6))
        case.input_shape = (*lead, kw["in_features"])
    elif kind == "Embedding":
        kw["num_embeddings"] = draw(st.integers(1, 12))
        kw["embedding_dim"] = draw(st.integers(1, 6))
        kw["padding_idx"] = draw(st.sampled_from([None, 0]))
        case.input_shape = (*lead, draw(st.integers(1, 6)))
    else:
        nd = CONVS[kind][0]
        groups = draw(st.sampled_from([1, 2]))
        kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
        dilation = draw(st.integers(1, 2))
        padding = draw(st.integers(0, 1))
        kw.update(
            in_channels=2 * groups,
            out_channels=2 * draw(st.integers(1, 2)),
            kernel_size=kernel,
            groups=groups,
            stride=draw(st.integers(1, 2)),
            padding=padding,
            dilation=dilation,
            bias=draw(st.booleans()),
        )
        spatial = tuple(dilation * (k - 1) + 1 + draw(st.integers(0, 2)) for k in kernel)
        case.input_shape = (draw(st.integers(1, 2)), kw["in_channels"], *spatial)
    case.kwargs = kw
    return case


# ---------------------------------------------------------------- the dense reference
def dense_delta(layer, A, B) -> torch.Tensor:
    """``scaling * B @ A`` laid out as ``layer.weight``, written independently of the library."""
    s = layer.scaling
    if isinstance(layer, lora_layers.MergedLinear):
        r, rows, b_row, k = layer.r, [], 0, 0
        for size, on in zip(layer.split_sizes, layer.enable_lora, strict=True):
            if on:
                rows.append(s * (B[b_row : b_row + size] @ A[k * r : (k + 1) * r]))
                b_row, k = b_row + size, k + 1
            else:
                rows.append(torch.zeros(size, A.shape[1], dtype=A.dtype))
        delta = torch.cat(rows)  # (out, in)
        return delta.t() if layer.fan_in_fan_out else delta
    if isinstance(layer, lora_layers.Linear):
        return (s * (B @ A)).t() if layer.fan_in_fan_out else s * (B @ A)
    if isinstance(layer, lora_layers.Embedding):
        return (s * (B @ A)).t()  # (num, dim)
    return (s * (B @ A)).view(layer.weight.shape)


def forward_with(layer, x, W, b) -> torch.Tensor:
    """The torch layer's forward with weight ``W`` (stored as the layer stores it)."""
    if isinstance(layer, lora_layers.Linear):
        return F.linear(x, W.t() if layer.fan_in_fan_out else W, b)
    if isinstance(layer, lora_layers.Embedding):
        return F.embedding(x, W, layer.padding_idx)
    conv = CONVS[type(layer).__name__][1]
    return conv(x, W, b, layer.stride, layer.padding, layer.dilation, layer.groups)


def assert_within(actual, expected, magnitude, what="output") -> None:
    """``|actual - expected| <= atol + rtol * magnitude`` with the dtype's (rtol, atol) from
    the one tolerance table: rounding error scales with the size of the summed terms, not of
    their (possibly cancelling) sum."""
    rtol, atol = TOLERANCES[actual.dtype]
    err = (up(actual) - expected).abs()
    bound = atol + rtol * magnitude
    worst = (err - bound).argmax() if err.numel() else None
    assert (err <= bound).all(), (
        f"{what}: |error| {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
        f"({actual.dtype}, index {worst.item()})"
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern (torch.equal treats -0.0 == 0.0; this does not)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(ints[t.element_size()])


def disabled_columns(layer) -> list[tuple[int, int]]:
    if not isinstance(layer, lora_layers.MergedLinear):
        return []
    bounds, start = [], 0
    for size, on in zip(layer.split_sizes, layer.enable_lora, strict=True):
        if not on:
            bounds.append((start, start + size))
        start += size
    return bounds


# ---------------------------------------------------------------- properties
def every_kind_and_dtype(test):
    """Run ``test(kind, dtype, data)`` for every layer kind and dtype, hypothesis drawing cases."""
    test = SETTINGS(given(data=st.data())(test))
    return pytest.mark.parametrize("dtype", DTYPES, ids=str)(
        pytest.mark.parametrize("kind", KIND_NAMES)(test)
    )


@every_kind_and_dtype
def test_forward_and_first_derivatives_match_dense_reference(kind, dtype, data):
    case = data.draw(cases(kind, dtype))
    layer = case.build()
    x = case.make_input()
    floating = x.is_floating_point()
    if floating:
        x.requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape).to(y.dtype)
    y.backward(g)

    def reference(transform):
        """Autograd through the dense reference on transform(x, W, b, A, B) and transform(g)."""

        def leaf(t):
            return None if t is None else transform(up(t.detach())).requires_grad_()

        A, B, b = leaf(layer.lora_A), leaf(layer.lora_B), leaf(layer.bias)
        x_ref = leaf(x) if floating else x
        W = transform(up(layer.weight.detach()))
        y_ref = forward_with(layer, x_ref, W + dense_delta(layer, A, B), b)
        y_ref.backward(transform(up(g)))
        grads = {"A": A.grad, "B": B.grad}
        if floating:
            grads["x"] = x_ref.grad
        if b is not None:
            grads["bias"] = b.grad
        return y_ref.detach(), grads

    y_ref, grads = reference(lambda t: t)
    # The same reference on absolute values: for every entry, the sum of the magnitudes of the
    # terms it adds up, which bounds the rounding error of any summation order.
    y_mag, grad_mags = reference(torch.abs)
    assert y.shape == y_ref.shape and y.dtype == case.dtype
    assert_within(y, y_ref, y_mag)
    ours = {"A": layer.lora_A.grad, "B": layer.lora_B.grad}
    if floating:
        ours["x"] = x.grad
    if layer.bias is not None:
        ours["bias"] = layer.bias.grad
    assert ours.keys() == grads.keys()
    for name, grad in ours.items():
        assert_within(grad, grads[name], grad_mags[name], name)
    assert layer.weight.grad is None  # frozen


@every_kind_and_dtype
def test_merged_weight_is_exact_and_merged_equals_unmerged(kind, dtype, data):
    case = data.draw(cases(kind, dtype))
    layer = case.build()
    x = case.make_input()
    W = layer.weight
    delta = dense_delta(layer, up(layer.lora_A.detach()), up(layer.lora_B.detach()))
    with torch.no_grad():
        unmerged = layer(x)
        base = forward_with(layer, x, W, layer.bias)
        layer.eval()
        assert layer.merged
        assert torch.equal(bits(layer.merged_weight), bits((up(W) + delta).to(W.dtype)))
        merged = layer(x)
        x_ref = up(x) if x.is_floating_point() else x
        b_ref = None if layer.bias is None else up(layer.bias)
        expected = forward_with(layer, x_ref, up(W) + delta, b_ref)
        magnitude = forward_with(  # the sum of |terms| of every output (see assert_within)
            layer,
            x_ref.abs() if x.is_floating_point() else x,
            up(W).abs() + delta.abs(),
            None if b_ref is None else b_ref.abs(),
        )
    assert_within(merged, expected, magnitude)
    assert_within(unmerged, expected, magnitude)
    assert_within(merged, up(unmerged), 2 * magnitude)
    for start, stop in disabled_columns(layer):
        assert torch.equal(bits(unmerged[..., start:stop]), bits(base[..., start:stop]))
        assert torch.equal(bits(merged[..., start:stop]), bits(base[..., start:stop]))
        rows = layer.merged_weight.t() if layer.fan_in_fan_out else layer.merged_weight
        base_rows = W.t() if layer.fan_in_fan_out else W
        assert torch.equal(bits(rows[start:stop]), bits(base_rows[start:stop]))


@every_kind_and_dtype
def test_merge_unmerge_cycles_restore_weight_and_outputs_bit_for_bit(kind, dtype, data):
    case = data.draw(cases(kind, dtype))
    cycles = data.draw(st.integers(1, 4))
    layer = case.build()
    x = case.make_input()
    weight = bits(layer.weight).clone()
    with torch.no_grad():
        before = layer(x)
        for i in range(cycles):
            if i % 2:
                layer.eval()
                layer(x)
                layer.train()
            else:
                layer.merge()
                layer.unmerge()
        assert not layer.merged
        assert torch.equal(bits(layer.weight), weight)
        assert torch.equal(bits(layer(x)), bits(before))


@every_kind_and_dtype
def test_b_zero_merges_to_the_base_layer_bit_for_bit(kind, dtype, data):
    case = data.draw(cases(kind, dtype))
    layer = case.build()
    with torch.no_grad():
        layer.lora_B.zero_()  # A stays non-zero
    x = case.make_input()
    with torch.no_grad():
        base = forward_with(layer, x, layer.weight, layer.bias)
        layer.merge()
        assert torch.equal(bits(layer.merged_weight), bits(layer.weight))
        assert torch.equal(bits(layer(x)), bits(base))
