"""The fast path in every precision setting, its dropout mask, its saved bytes and op count.

Settings (issue 11): (a) a bf16/fp16 base with same-dtype LoRA; (b) a bf16/fp16 base with
fp32 LoRA; (c) an fp32 model under ``torch.autocast`` (CPU bf16; CUDA runs the same code).
Each runs the fast path (the plain path is patched away) and is compared with the plain path
and with a dense float64 reference ``W + scaling * B @ A`` built from the values the layer
computes with (B non-zero), with and without dropout, for Linear and MergedLinear slices.
"""

from __future__ import annotations

import collections
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev
from torch.profiler import ProfilerActivity, profile

import lora_layers
import lora_layers.functional as lf
from lora_layers.config import SliceLayout
from tests.helpers import TOLERANCES, fill_lora_, saved_tensor_bytes

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
# name -> (base dtype, LoRA dtype, autocast dtype or None)
SETTINGS = {
    "a-bf16": (BF16, BF16, None),
    "a-fp16": (F16, F16, None),
    "b-bf16-fp32": (BF16, F32, None),
    "b-fp16-fp32": (F16, F32, None),
    "c-autocast-bf16": (F32, F32, BF16),
}
SEED = 77


def make(kind: str, setting: str, p: float):
    """A layer in ``setting`` (train mode, A and B random non-zero) and an input."""
    base, lora, _ = SETTINGS[setting]
    torch.manual_seed(0)
    if kind == "linear":
        lin = nn.Linear(24, 10, dtype=base)
        layer = lora_layers.Linear.from_module(
            lin, r=3, lora_alpha=6, lora_dropout=p, lora_dtype=lora
        )
    else:
        lin = nn.Linear(24, 12, dtype=base)
        layer = lora_layers.MergedLinear.from_module(
            lin,
            r=3,
            lora_alpha=6,
            lora_dropout=p,
            enable_lora=(True, False, True),
            split_sizes=(6, 2, 4),
            lora_dtype=lora,
        )
    fill_lora_(layer.train())
    x = torch.randn(2, 5, 24, dtype=base)
    return layer, x


def autocast_ctx(setting: str):
    dtype = SETTINGS[setting][2]
    return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()


def compute_dtypes(setting: str) -> tuple[torch.dtype, torch.dtype]:
    base, lora, auto = SETTINGS[setting]
    return (auto, auto) if auto else (base, lora)


def tolerance(setting: str) -> tuple[float, float]:
    cd, ld = compute_dtypes(setting)
    return max(TOLERANCES[cd], TOLERANCES[ld])


def dense(layer, x, A, B, setting: str, keep: torch.Tensor | None):
    """Float64 ``x @ (W + delta).T + b`` (dropout on the delta's input) from the values the
    layer computes with: each tensor rounded to its compute dtype first."""
    cd, ld = compute_dtypes(setting)

    def as64(t, dtype):
        return t.to(dtype).double()

    xb, W = as64(x, cd), as64(layer.weight, cd)
    b = as64(layer.bias, cd)
    xl, A, B = as64(x, ld), as64(A, ld), as64(B, ld)
    sizes = getattr(layer, "split_sizes", (layer.out_features,))
    enable = getattr(layer, "enable_lora", (True,))
    blocks, i, row = [], 0, 0
    for size, on in zip(sizes, enable, strict=True):
        if on:
            blocks.append(layer.scaling * B[row : row + size] @ A[i * 3 : (i + 1) * 3])
            i, row = i + 1, row + size
        else:
            blocks.append(torch.zeros(size, layer.in_features, dtype=F64))
    if keep is not None:
        xl = xl * keep / lf.dropout_keep_probability(layer.dropout_p)
    return F.linear(xb, W, b) + F.linear(xl, torch.cat(blocks))


def run(layer, x, setting):
    torch.manual_seed(SEED)
    with autocast_ctx(setting):
        return layer(x)


def seeded_keep(layer, x) -> torch.Tensor | None:
    if not layer.dropout_p:
        return None
    torch.manual_seed(SEED)
    return lf.keep_mask((x[..., 0].numel(), x.shape[-1]), layer.dropout_p, x.device).view(x.shape)


@pytest.fixture
def no_plain_path(monkeypatch):
    monkeypatch.setattr(lf, "_plain_lora_linear", None)  # calling it would raise TypeError


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["linear", "merged"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fast_path_matches_dense_reference(setting, kind, p, no_plain_path):
    layer, x = make(kind, setting, p)
    x.requires_grad_()
    y = run(layer, x, setting)
    assert y.dtype == compute_dtypes(setting)[0]
    leaves = [x, layer.lora_A, layer.lora_B, layer.bias]
    g = torch.randn_like(y, dtype=F32)
    got = torch.autograd.grad(y, leaves, g.to(y.dtype))
    assert [t.dtype for t in got] == [t.dtype for t in leaves]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    keep = seeded_keep(layer, x)
    x64, A64, B64, b64 = leaves64
    with torch.no_grad():
        layer.bias.copy_(b64)  # same values; the reference reads layer.bias
    ref_layer = _Swap(layer, b64)
    want_y = dense(ref_layer, x64, A64, B64, setting, keep)
    want = torch.autograd.grad(want_y, leaves64, g.double())
    rtol, atol = tolerance(setting)
    torch.testing.assert_close(y.double(), want_y.detach(), rtol=rtol, atol=atol)
    for a, b in zip(got, want, strict=True):
        # gradients sum over tokens and features: scale the tolerance with their size
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * scale)


class _Swap:
    """``layer``'s attributes, with ``bias`` replaced (so the reference differentiates it)."""

    def __init__(self, layer, bias):
        self._layer, self.bias = layer, bias

    def __getattr__(self, name):
        return getattr(self._layer, name)


@pytest.mark.parametrize("kind", ["linear", "merged"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fast_path_equals_plain_path(setting, kind):
    """Without dropout the two paths compute the same thing in the same dtypes."""
    layer, x = make(kind, setting, 0.0)
    x.requires_grad_()
    leaves = [x, layer.lora_A, layer.lora_B, layer.bias]
    y = run(layer, x, setting)
    g = torch.randn_like(y)
    fast = [y, *torch.autograd.grad(y, leaves, g)]
    with autocast_ctx(setting):
        y = lf._plain_lora_linear(
            x,
            layer.weight,
            layer.bias,
            layer.lora_A,
            layer.lora_B,
            layer.scaling,
            nn.Identity(),
            False,
            layer.slice_layout,
        )
    plain = [y, *torch.autograd.grad(y, leaves, g)]
    rtol, atol = tolerance(setting)
    for a, b in zip(fast, plain, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_hessian_vector_product_matches_dense_reference(setting, p):
    """Double backward on the fast path of every setting (the backward replays plain ops)."""
    layer, x = make("merged", setting, p)
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    keep = seeded_keep(layer, x)

    def got_f(A, B):
        torch.manual_seed(SEED)
        with autocast_ctx(setting):
            return torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (x,)).double()

    def ref_f(A, B):
        return dense(layer, x, A, B, setting, keep)

    v = [torch.randn_like(A), torch.randn_like(B)]
    results = []
    for f, leaves in (
        (got_f, (A, B)),
        (ref_f, tuple(t.detach().double().requires_grad_() for t in (A, B))),
    ):
        y = f(*leaves)
        grads = torch.autograd.grad((y**2).sum(), leaves, create_graph=True)
        dot = sum((gi * vi.to(gi.dtype)).sum() for gi, vi in zip(grads, v, strict=True))
        results.append(torch.autograd.grad(dot, leaves))
    rtol, atol = tolerance(setting)
    for a, b in zip(*results, strict=True):
        scale = b.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_jacrev_in_every_setting(setting):
    """torch.func runs the plain path in every setting; its Jacobian matches the dense one."""
    layer, x = make("linear", setting, 0.0)
    A = layer.lora_A.detach().clone()

    def f(A):
        with autocast_ctx(setting):
            return torch.func.functional_call(layer, {"lora_A": A}, (x,)).double()

    got = jacrev(f)(A)
    want = torch.autograd.functional.jacobian(
        lambda A: dense(layer, x, A, layer.lora_B, setting, None), A.double()
    )
    rtol, atol = tolerance(setting)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * want.abs().max().item())


def test_backward_inside_autocast_matches_backward_outside():
    layer, x = make("linear", "c-autocast-bf16", 0.0)
    x.requires_grad_()
    grads = []
    for inside in (False, True):
        with torch.autocast("cpu", dtype=BF16):
            y = layer(x)
            if inside:
                y.sum().backward()
        if not inside:
            y.sum().backward()
        grads.append([t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)])
        for t in (x, layer.lora_A, layer.lora_B):
            t.grad = None
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_float64_under_autocast_runs_plain_path(monkeypatch):
    """Autocast leaves float64 alone; the plain path gives autocast's own answer."""
    layer = lora_layers.Linear(8, 4, r=2, dtype=F64)
    fill_lora_(layer.train())
    monkeypatch.setattr(lf, "LoRALinearFunction", None)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(torch.randn(3, 8, dtype=F64))
    assert y.dtype == F64


# ----------------------------------------------------------------------------- saved bytes

N, IN, OUT, R = 64, 128, 96, 4


@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_saved_bytes_are_input_once_plus_h_and_bit_mask(setting, p):
    """Saved for backward: the input once, in its own dtype; ``h`` in the compute dtype of the
    LoRA branch; with dropout the 1-bit mask; under autocast also the bf16 weight copy, which
    a frozen ``F.linear`` under autocast saves too. Nothing input-sized in another dtype."""
    base, lora, auto = SETTINGS[setting]
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT, bias=False, dtype=base)
    layer = lora_layers.Linear.from_module(lin, r=R, lora_dropout=p, lora_dtype=lora).train()
    fill_lora_(layer)
    x = torch.randn(N, IN, dtype=base, requires_grad=True)
    params = list(layer.parameters())
    with autocast_ctx(setting):
        saved = saved_tensor_bytes(lambda: layer(x), exclude=params)
        frozen = saved_tensor_bytes(lambda: F.linear(x, lin.weight), exclude=params)
    _, ld = compute_dtypes(setting)
    x_bytes = N * IN * x.element_size()
    h_bytes = N * R * ld.itemsize
    mask_bytes = N * IN // 8 if p else 0
    weight_copy = OUT * IN * auto.itemsize if auto else 0
    assert frozen == weight_copy
    assert saved == x_bytes + h_bytes + mask_bytes + weight_copy


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_saved_bytes_targets_at_phi3_shape(setting):
    """Issue 11's targets at o_proj 3072->3072, 1024 tokens, r=16: extra bytes saved over the
    frozen base in the same setting, beyond the input's own storage, <= 0.02 x the input at
    p=0 and <= 0.08 at p=0.05. The input is a fake tensor (shapes only), so this is cheap."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    base, lora, _ = SETTINGS[setting]
    for p, target in ((0.0, 0.02), (0.05, 0.08)):
        with FakeTensorMode():
            lin = nn.Linear(3072, 3072, bias=False, dtype=base).requires_grad_(False)
            layer = lora_layers.Linear.from_module(lin, r=16, lora_dropout=p, lora_dtype=lora)
            x = torch.randn(1024, 3072, dtype=base, requires_grad=True)
            exclude = [*layer.parameters(), x]
            with autocast_ctx(setting):
                ours = _saved_bytes_by_storage(lambda: layer.train()(x), exclude)  # noqa: B023
                frozen = _saved_bytes_by_storage(lambda: lin(x), exclude)  # noqa: B023
        extra = (ours - frozen) / (x.numel() * x.element_size())
        assert 0 < extra <= target, (p, extra)


def _saved_bytes_by_storage(fn, exclude) -> int:
    """Like ``saved_tensor_bytes``, keyed by storage identity (fake tensors have no data)."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ----------------------------------------------------------------------------- dropout mask


@pytest.fixture(params=["numpy", "torch"])
def mask_ops(request, monkeypatch):
    """Runs a test on the CPU's numpy shortcut and on the tensor ops every other device runs."""
    if request.param == "torch":
        monkeypatch.setattr(lf, "_numpy_for", lambda t: None)
    return request.param


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_keep_mask_statistics(p, mask_ops):
    """Drop rate equals p' = round(p * 2^16) / 2^16 within 5 sigma; neighbours (including the
    four decisions sharing one 64-bit draw) are uncorrelated; every lane of a draw has the
    same rate (the top lane holds the word's sign bit: all 64 bits are random); the
    inverted-dropout factor makes the mean exactly unbiased in expectation."""
    n = 1 << 20
    torch.manual_seed(3)
    keep = lf.keep_mask((n,), p, torch.device("cpu"))
    q = lf.dropout_keep_probability(p)
    assert abs((1 - q) - p) <= 2**-17
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(keep.double().mean().item() - q) < 5 * sigma
    lanes = keep.view(-1, 4).double().mean(0)  # the four 16-bit lanes of each 64-bit draw
    assert (lanes - q).abs().max().item() < 5 * sigma * 2
    k = keep.double() - q
    for lag in (1, 2, 3, 4, 8):
        corr = (k[:-lag] * k[lag:]).mean().item() / (q * (1 - q))
        assert abs(corr) < 5 / math.sqrt(n), lag
    assert abs((keep.double() / q).mean().item() - 1.0) < 5 * sigma / q


def test_keep_mask_is_exact_for_sixteen_bit_probabilities():
    """p = k / 2^16 is realised exactly, and p is never off by more than 2^-17."""
    assert lf.dropout_keep_probability(3277 / 65536) == 1 - 3277 / 65536
    for p in (0.05, 0.1, 1 / 3, 0.999):
        assert abs(1 - lf.dropout_keep_probability(p) - p) <= 2**-17


def test_keep_mask_reproducible_from_the_seed():
    torch.manual_seed(5)
    a = lf.keep_mask((7, 33), 0.3, torch.device("cpu"))
    torch.manual_seed(5)
    b = lf.keep_mask((7, 33), 0.3, torch.device("cpu"))
    assert torch.equal(a, b) and a.shape == (7, 33) and a.dtype == torch.bool


def test_keep_mask_sixteen_bit_values_are_uniform():
    """The draw behind the mask: each 16-bit lane of a word is uniform on its 65536 values
    (chi-square over 256 buckets of the top byte and of the low byte, well inside 6 sigma),
    so thresholding at round(p * 2^16) realises p' for every p."""
    torch.manual_seed(11)
    words = torch.empty(1 << 18, dtype=torch.int64).random_(-(1 << 63), None)
    lanes = words.view(torch.int16).view(-1, 4).to(torch.int32) + (1 << 15)  # [0, 65536)
    for lane in range(4):
        for byte in (lanes[:, lane] >> 8, lanes[:, lane] & 255):
            counts = torch.bincount(byte, minlength=256).double()
            expected = byte.numel() / 256
            chi2 = ((counts - expected) ** 2 / expected).sum().item()
            assert abs(chi2 - 255) < 6 * math.sqrt(2 * 255), (lane, chi2)


def test_keep_mask_numpy_and_tensor_ops_agree(monkeypatch):
    """The CPU's numpy shortcut and the tensor ops draw, pack and unpack the same bits."""
    shape = (37, 29)  # 1073 elements: not a multiple of 8
    torch.manual_seed(9)
    keep = lf.keep_mask(shape, 0.2, torch.device("cpu"))
    packed = lf.pack_bits(keep)
    monkeypatch.setattr(lf, "_numpy_for", lambda t: None)
    torch.manual_seed(9)
    assert torch.equal(lf.keep_mask(shape, 0.2, torch.device("cpu")), keep)
    assert torch.equal(lf.pack_bits(keep), packed)
    assert torch.equal(lf.unpack_bits(packed, keep.shape), keep)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
def test_apply_keep_equals_where_bit_for_bit(dtype, mask_ops):
    """``apply_keep`` is ``torch.where(keep, t, 0)`` to the bit: signed zeros, infinities and
    NaN kept where kept, +0.0 where dropped; strided input; in place through ``out``."""
    torch.manual_seed(4)
    t = torch.randn(6, 40, dtype=torch.float32).to(dtype)
    t[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    t[1, :4] = t[0, :4]
    keep = torch.rand(6, 40) > 0.3
    keep[0, :4], keep[1, :4] = True, False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    for src, k in ((t, keep), (t.t(), keep.t())):  # contiguous, then strided
        want = torch.where(k, src, torch.zeros((), dtype=dtype))
        assert torch.equal(lf.apply_keep(src, k).view(ints), want.view(ints))
    inplace = t.clone()
    assert lf.apply_keep(inplace, keep, out=inplace) is inplace
    assert torch.equal(inplace.view(ints), torch.where(keep, t, 0.0).view(ints))
    leaf = torch.randn(6, 40).to(dtype).requires_grad_()  # grad mode on: differentiable
    lf.apply_keep(leaf, keep).sum().backward()
    assert torch.equal(leaf.grad, keep.to(dtype))


def test_quantized_layers_share_the_keep_mask():
    """One keep-mask function for every layer (issue 14): the quantized branch uses it."""
    import lora_layers.quantized as lq
    import lora_layers.quantized_function as lqf

    assert lq.keep_mask is lf.keep_mask and lqf.keep_mask is lf.keep_mask


def test_forward_and_backward_use_the_same_mask(mask_ops):
    """With W = 0 and A = B = I the output is the dropped input; the input gradient of the
    LoRA branch must be zero exactly where the output is (numpy shortcut and tensor ops)."""
    n, d = 512, 16
    eye = torch.eye(d)
    x = torch.ones(n, d, requires_grad=True)
    y = lf.LoRALinearFunction.apply(
        x, torch.zeros(d, d), None, eye, eye, 1.0, 0.25, False, SliceLayout.whole(d)
    )
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(y == 0, gx == 0)
    assert 0 < (y == 0).float().mean().item() < 0.5


# ----------------------------------------------------------------------------- op count


def test_fp32_fwd_bwd_aten_op_count_stays_at_53():
    """Issue 11, target 4: fwd + ``y.backward(g)`` of ``Linear(256, 256, r=16)`` on a
    ``(1, 4, 256)`` input dispatches at most 53 ATen ops (profiler count; the new precision
    paths add none to the fp32 one). loralib takes 99, PEFT 106."""
    torch.manual_seed(0)
    layer = lora_layers.Linear(256, 256, r=16, lora_alpha=32, bias=False)
    fill_lora_(layer.train())
    x = torch.randn(1, 4, 256, requires_grad=True)
    g = torch.randn(1, 4, 256)

    def step():
        layer(x).backward(g)
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    assert sum(ops.values()) <= 53, ops
    assert ops["aten::mm"] + ops["aten::addmm"] + ops["aten::addmm_"] == 8


def test_a_fake_tensor_forward_leaves_no_fake_state_behind():
    """The fast path caches small constants; one made under FakeTensorMode must not leak."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    for setting in ("a-bf16", "b-bf16-fp32"):
        with FakeTensorMode():
            layer, x = make("linear", setting, 0.3)
            layer(x).sum().backward()
        layer, x = make("linear", setting, 0.3)
        x.requires_grad_()
        y = run(layer, x, setting)
        y.sum().backward()
        assert type(y) is torch.Tensor and not isinstance(x.grad, FakeTensor)
        ref = dense(layer, x.detach(), layer.lora_A, layer.lora_B, setting, seeded_keep(layer, x))
        rtol, atol = tolerance(setting)
        torch.testing.assert_close(y.detach().double(), ref.detach(), rtol=rtol, atol=atol)
