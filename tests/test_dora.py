"""DoRA layers: against a dense reference written here, against PEFT 0.21.2's DoRA layers,
their merge, their lean norm, their gradients and their errors.

The dense reference of every kind: view the weight as output rows ``W`` (an embedding's
table transposed, as PEFT), ``V = W + s B A``, and the DoRA weight is
``V * (m / ||V||_row)``; every layer must compute ``x`` through it (plus the bias). B is
non-zero and ``m`` is moved off ``||V||`` first, so the update and the rescaling both show.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_layers
from lora_layers import dora
from tests.helpers import (
    LoRARowInt8,
    RowInt8Linear,
    assert_close,
    fill_lora_,
    saved_tensor_bytes,
    up,
)

FLOATS = (torch.float64, torch.float32, torch.bfloat16)


def perturb_(layer, std: float = 0.3):
    """Non-zero A and B, and a magnitude off the norm by up to +-30 % per row."""
    fill_lora_(layer, std=std)
    with torch.no_grad():
        m = layer.lora_magnitude
        m.copy_(up(m) * (1 + 0.3 * (2 * torch.rand(m.shape, dtype=up(m).dtype) - 1)))
    return layer


def rows_of(layer, weight):
    """The output rows of ``weight`` as the reference sees them: (rows, k)."""
    if isinstance(layer, lora_layers.Embedding):
        return weight.t()
    if isinstance(layer, (lora_layers.Conv1d, lora_layers.Conv2d, lora_layers.Conv3d)):
        return weight.reshape(weight.shape[0], -1)
    return weight.t() if layer.fan_in_fan_out else weight


def dora_rows(layer) -> torch.Tensor:
    """The dense DoRA weight as rows, in fp32 (fp64 for fp64), written out in full."""
    w = up(rows_of(layer, layer.weight.detach()))
    a, b, m = up(layer.lora_A.detach()), up(layer.lora_B.detach()), up(layer.lora_magnitude)
    slices = layer.slice_layout.out_slices if hasattr(layer, "slice_layout") else ((0, len(w)),)
    out, r, b_row = w.clone(), layer.r, 0
    for i, (start, stop) in enumerate(slices):
        v = w[start:stop] + layer.scaling * (
            b[b_row : b_row + stop - start] @ a[i * r : (i + 1) * r]
        )
        norm = torch.linalg.norm(v, dim=1, keepdim=True)
        out[start:stop] = v * (m[b_row : b_row + stop - start].detach().unsqueeze(1) / norm)
        b_row += stop - start
    return out


def dense_weight(layer) -> torch.Tensor:
    """The DoRA weight in the layout of ``layer.weight``."""
    rows = dora_rows(layer)
    if isinstance(layer, lora_layers.Embedding):
        return rows.t()
    if isinstance(layer, (lora_layers.Conv1d, lora_layers.Conv2d, lora_layers.Conv3d)):
        return rows.view(layer.weight.shape)
    return rows.t() if layer.fan_in_fan_out else rows


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    w = dense_weight(layer)
    bias = None if layer.bias is None else up(layer.bias.detach())
    if isinstance(layer, lora_layers.Embedding):
        return F.embedding(x, w)
    if isinstance(layer, lora_layers.Linear):
        return F.linear(up(x), w.t() if layer.fan_in_fan_out else w, bias)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(layer.kernel_size)]
    return conv(up(x), w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def make(kind: str, dtype=torch.float32, bias=True, fan_in_fan_out=False, **kw):
    kw = {"r": 3, "lora_alpha": 6, "use_dora": True, "dtype": dtype, **kw}
    if kind == "linear":
        layer = lora_layers.Linear(12, 10, bias=bias, fan_in_fan_out=fan_in_fan_out, **kw)
        x = torch.randn(2, 5, 12)
    elif kind == "merged":
        layer = lora_layers.MergedLinear(
            12,
            14,
            enable_lora=(True, False, True),
            split_sizes=(6, 3, 5),
            bias=bias,
            fan_in_fan_out=fan_in_fan_out,
            **kw,
        )
        x = torch.randn(2, 5, 12)
    elif kind == "embedding":
        layer = lora_layers.Embedding(20, 6, **kw)
        return perturb_(layer), torch.randint(0, 20, (3, 4))
    else:
        dims = int(kind[-2])
        cls = {1: lora_layers.Conv1d, 2: lora_layers.Conv2d, 3: lora_layers.Conv3d}[dims]
        layer = cls(4, 5, 3, padding=1, bias=bias, **kw)
        x = torch.randn(2, 4, *(5,) * dims)
    return perturb_(layer), x.to(dtype)


KINDS = ["linear", "merged", "embedding", "conv1d", "conv2d", "conv3d"]


# --------------------------------------------------------------------------- dense reference
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_dense_reference(kind, dtype):
    layer, x = make(kind, dtype)
    for training in (True, False):
        layer.train(training)
        assert_close(layer(x), reference(layer, x), dtype)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_linear_bias_and_fan_in_fan_out_equal_dense_reference(kind, bias, fan_in_fan_out):
    layer, x = make(kind, torch.float64, bias=bias, fan_in_fan_out=fan_in_fan_out)
    assert_close(layer(x.double()), reference(layer, x.double()))


@pytest.mark.parametrize("dtype", FLOATS)
def test_merged_linear_disabled_slice_bit_identical_to_base(dtype):
    layer, x = make("merged", dtype)
    base = F.linear(x, layer.weight, layer.bias)
    assert layer.lora_magnitude.shape == (11,)  # the enabled slices' rows: 6 + 5
    for dropout in (0.0, 0.4):
        layer.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        out = layer.train()(x)
        assert torch.equal(out[..., 6:9], base[..., 6:9])
    layer.eval()
    with torch.no_grad():
        layer.merge()
        assert torch.equal(layer.merged_weight[6:9], layer.weight[6:9])
        assert torch.equal(layer(x)[..., 6:9], base[..., 6:9])


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_dora_layer_is_the_base_layer(kind):
    layer, x = make(kind, torch.float64)
    layer.reset_lora_parameters()  # B (A for the embedding) zero, m = ||W||
    norms = torch.linalg.norm(rows_of(layer, layer.weight.detach()), dim=1)
    if kind == "merged":
        norms = torch.cat([norms[:6], norms[9:]])  # the enabled slices' rows
    torch.testing.assert_close(layer.lora_magnitude.detach(), norms, rtol=1e-14, atol=0)
    layer.disable_adapters = True
    base = layer(x)
    layer.disable_adapters = False
    assert_close(layer(x), base)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("linear", (10,)), ("merged", (11,)), ("embedding", (6,)), ("conv2d", (5,))],
)
def test_magnitude_shape_dtype_and_key(kind, shape):
    layer, _ = make(kind, torch.bfloat16)
    assert layer.use_dora is True
    assert layer.lora_magnitude.shape == shape
    assert layer.lora_magnitude.dtype == layer.lora_A.dtype == torch.bfloat16
    assert "lora_magnitude" in layer.state_dict()
    assert "use_dora=True" in repr(layer)


# --------------------------------------------------------------------------- PEFT's layers
class Toy(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 10, bias=bias)
        self.conv1 = nn.Conv1d(4, 5, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=bias)
        self.conv3 = nn.Conv3d(4, 5, 3, padding=1, bias=bias)
        self.emb = nn.Embedding(20, 6)


INPUTS = {
    "fc": lambda: torch.randn(3, 12, dtype=torch.float64),
    "conv1": lambda: torch.randn(2, 4, 6, dtype=torch.float64),
    "conv2": lambda: torch.randn(2, 4, 5, 5, dtype=torch.float64),
    "conv3": lambda: torch.randn(2, 4, 4, 4, 4, dtype=torch.float64),
    "emb": lambda: torch.randint(0, 20, (3, 4)),
}


def peft_and_ours(name: str, bias: bool = True, dropout: float = 0.0):
    """PEFT's DoRA layer ``name`` of a fp64 Toy (B non-zero, m moved off the norm), and ours
    built from the same base layer with PEFT's A, B and m copied in."""
    base = Toy(bias).double()
    config = peft.LoraConfig(
        r=3,
        lora_alpha=6,
        lora_dropout=dropout,
        target_modules=[name],
        use_dora=True,
        init_lora_weights=False,
    )
    theirs = getattr(peft.get_peft_model(copy.deepcopy(base), config).base_model.model, name)
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.mul_(1.2).add_(0.1)
    if name == "emb":
        a, b = theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"]
    else:
        a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    kw = {} if name == "emb" else {"lora_dropout": dropout}
    cls = type(getattr(base, name))
    cls = {nn.Linear: lora_layers.Linear, nn.Embedding: lora_layers.Embedding}.get(
        cls, getattr(lora_layers, cls.__name__)
    )
    ours = cls.from_module(getattr(base, name), r=3, lora_alpha=6, use_dora=True, **kw)
    with torch.no_grad():
        ours.lora_A.copy_(a.reshape(ours.lora_A.shape))
        ours.lora_B.copy_(b.reshape(ours.lora_B.shape))
        ours.lora_magnitude.copy_(theirs.lora_magnitude_vector["default"].weight.reshape(-1))
    return theirs, ours


def outputs_and_grads(layer, x, params, seed: int = 0):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(x.is_floating_point())
    out = layer(x)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum()
    wrt = [*params, *([x] if x.requires_grad else [])]
    return out.detach(), torch.autograd.grad(loss, wrt)


def peft_params(theirs, name):
    if name == "emb":
        ab = [theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"]]
    else:
        ab = [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight]
    return [*ab, theirs.lora_magnitude_vector["default"].weight]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(INPUTS))
def test_output_and_gradients_equal_peft_dora_layer(name, bias):
    theirs, ours = peft_and_ours(name, bias)
    x = INPUTS[name]()
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        out_p, grads_p = outputs_and_grads(theirs, x, peft_params(theirs, name))
        out_o, grads_o = outputs_and_grads(ours, x, [ours.lora_A, ours.lora_B, ours.lora_magnitude])
        assert_close(out_o, out_p)
        for g_o, g_p in zip(grads_o, grads_p, strict=True):  # A, B, m (and x)
            assert_close(g_o, g_p.reshape(g_o.shape))


@pytest.mark.parametrize("name", ["fc", "conv2"])
def test_training_with_dropout_equals_peft_seeded_alike(name):
    # Both draw their mask with nn.Dropout on the same input after the same seed.
    theirs, ours = peft_and_ours(name, dropout=0.5)
    theirs.train()
    ours.train()
    x = INPUTS[name]()
    out_p, grads_p = outputs_and_grads(theirs, x, peft_params(theirs, name), seed=7)
    out_o, grads_o = outputs_and_grads(
        ours, x, [ours.lora_A, ours.lora_B, ours.lora_magnitude], seed=7
    )
    assert_close(out_o, out_p)
    for g_o, g_p in zip(grads_o, grads_p, strict=True):
        assert_close(g_o, g_p.reshape(g_o.shape))


def test_gpt2_conv1d_fan_in_fan_out_equals_peft():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(10, 12)).double()  # weight (in, out) = (12, 10)
    config = peft.LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["0"],
        use_dora=True,
        init_lora_weights=False,
        fan_in_fan_out=True,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config).base_model.model[0]
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.mul_(0.9)
    lora_layers.inject_lora(base, ["0"], r=3, lora_alpha=6, use_dora=True)
    ours = base[0]
    assert ours.fan_in_fan_out
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        ours.lora_magnitude.copy_(theirs.lora_magnitude_vector["default"].weight)
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    out_p, grads_p = outputs_and_grads(theirs.train(), x, peft_params(theirs, "fc"))
    out_o, grads_o = outputs_and_grads(
        ours.train(), x, [ours.lora_A, ours.lora_B, ours.lora_magnitude]
    )
    assert_close(out_o, out_p)
    for g_o, g_p in zip(grads_o, grads_p, strict=True):
        assert_close(g_o, g_p)


def test_dropout_formula_against_a_hand_reference_with_its_mask():
    layer, x = make("linear", torch.float64, lora_dropout=0.5)
    x = x.double()
    torch.manual_seed(3)
    keep = F.dropout(torch.ones_like(x), 0.5)  # nn.Dropout's mask and 1 / (1 - p) for seed 3
    torch.manual_seed(3)
    out = layer.train()(x)
    w, a, b, m, s = layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling
    scale = m / torch.linalg.norm(w + s * b @ a, dim=1)
    x_d = x * keep
    expected = (
        x @ w.t() + layer.bias + (scale - 1) * (x_d @ w.t()) + scale * s * (x_d @ a.t() @ b.t())
    )
    assert_close(out, expected)


# --------------------------------------------------------------------------- merge
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_the_dense_dora_weight_rounded_once_and_unmerge_exact(kind, dtype):
    layer, x = make(kind, dtype)
    original = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.merged_weight, dense_weight(layer).to(dtype))
    with torch.no_grad():
        merged_out = layer.eval()(x)
    layer.unmerge()
    assert torch.equal(layer.weight, original)
    with torch.no_grad():
        assert_close(merged_out, layer(x), dtype)


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding", "conv2d"])
def test_merge_and_unload_folds_dora_into_the_plain_layer(kind):
    layer, x = make(kind, torch.float64)
    model = nn.Sequential(layer).eval()
    with torch.no_grad():
        expected = model(x)
    lora_layers.merge_and_unload(model)
    assert type(model[0]) is layer.wraps
    with torch.no_grad():
        assert_close(model(x), expected)


def test_unload_drops_dora_keeping_the_original_weight():
    layer, x = make("linear", torch.float32)
    weight = layer.weight
    model = lora_layers.unload(nn.Sequential(layer))
    assert model[0].weight is weight and type(model[0]) is nn.Linear


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_non_finite_merge_raises_and_leaves_weight_untouched(kind):
    layer, _ = make(kind, torch.float32)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_magnitude[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, original)


def test_merge_goes_stale_when_the_magnitude_changes():
    layer, x = make("linear", torch.float32)
    layer.eval()
    layer.merge()
    with torch.no_grad():
        layer.lora_magnitude.mul_(1.5)
        assert_close(layer(x), reference(layer, x))  # re-merged from the new magnitude


# --------------------------------------------------------------------------- the lean norm
@pytest.mark.parametrize("kind", KINDS)
def test_lean_norm_equals_dense_norm_fp64(kind):
    layer, _ = make(kind, torch.float64)
    w = rows_of(layer, layer.weight.detach())
    slices = layer.slice_layout.out_slices if hasattr(layer, "slice_layout") else ((0, len(w)),)
    dense, r, b_row = [], layer.r, 0
    for i, (start, stop) in enumerate(slices):
        b_i = layer.lora_B[b_row : b_row + stop - start]
        v = w[start:stop] + layer.scaling * b_i @ layer.lora_A[i * r : (i + 1) * r]
        dense.append(torch.linalg.norm(v, dim=1))
        b_row += stop - start
    torch.testing.assert_close(
        layer.dora_weight_norm(), torch.cat(dense).detach(), rtol=1e-13, atol=0
    )


def test_lean_norm_of_a_bf16_weight_cast_in_chunks_equals_fp32_dense(monkeypatch):
    monkeypatch.setattr(dora, "_CHUNK", 40)  # a few rows per chunk: the chunking is exercised
    w = torch.randn(17, 9).to(torch.bfloat16)
    a, b = torch.randn(3, 9), torch.randn(17, 3)
    lean = dora.lean_row_norms(w, dora.row_norms_squared(w, torch.float32), a, b, 0.7)
    dense = torch.linalg.norm(w.float() + 0.7 * b @ a, dim=1)
    torch.testing.assert_close(lean, dense, rtol=1e-5, atol=1e-6)


def test_negative_rounding_is_clamped_to_zero():
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    a, b = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[-1.0]])
    norms = dora.lean_row_norms(w, torch.tensor([5.0 - 1e-12], dtype=torch.float64), a, b, 1.0)
    assert norms.item() == 0.0  # the squared norm rounds to -1e-12: clamped, no NaN


def test_norm_cache_follows_changes_to_the_weight():
    layer, x = make("linear", torch.float64)
    layer(x.double())
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: the version counter moves
    assert_close(layer(x.double()), reference(layer, x.double()))
    layer.weight = nn.Parameter(torch.randn_like(layer.weight), requires_grad=False)  # replaced
    assert_close(layer(x.double()), reference(layer, x.double()))
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
    assert_close(layer.dora_weight_norm(), torch.linalg.norm(dora_rows_raw(layer), dim=1))


def dora_rows_raw(layer):
    return layer.weight + layer.scaling * layer.lora_B @ layer.lora_A


# --------------------------------------------------------------------------- gradients
def test_gradcheck_and_gradgradcheck_fp64_in_input_and_magnitude():
    # The norm is detached (PEFT, paper section 4.3), so finite differences in A or B would
    # see it move; x and m leave it fixed and are checked to second order here. A and B's
    # gradients are checked against PEFT's above.
    layer, _ = make("merged", torch.float64, lora_dropout=0.0)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    names = {"lora_magnitude": layer.lora_magnitude}

    def f(x, m):
        return torch.func.functional_call(layer, {"lora_magnitude": m}, (x,))

    m = names["lora_magnitude"].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, m))
    assert torch.autograd.gradgradcheck(f, (x, m))


def test_torch_func_grad_equals_backward():
    layer, x = make("linear", torch.float64)
    x = x.double()
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}

    def loss(p):
        return torch.func.functional_call(layer, p, (x,)).square().sum()

    got = torch.func.grad(loss)(params)
    layer.zero_grad()
    layer(x).square().sum().backward()
    for k, v in got.items():
        assert_close(v, getattr(layer, k).grad)
    assert set(got) == {"bias", "lora_A", "lora_B", "lora_magnitude"}


def test_saved_tensors_hold_no_weight_sized_tensor():
    layer = lora_layers.Linear(256, 192, r=4, use_dora=True)
    perturb_(layer)
    x = torch.randn(8, 256, requires_grad=True)  # activations far smaller than W
    sizes = []
    weight_storage = layer.weight.untyped_storage().data_ptr()

    def pack(t):  # the frozen weight itself is saved by reference (as by F.linear): no memory
        if t.untyped_storage().data_ptr() != weight_storage:
            sizes.append(t.numel())
        return t

    params = [layer.weight]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert max(sizes) < layer.weight.numel() / 4, sizes
    out.sum().backward()
    dora_bytes = saved_tensor_bytes(lambda: layer(x), exclude=params)
    layer.use_dora = False
    lora_bytes = saved_tensor_bytes(lambda: layer(x), exclude=params)
    # DoRA keeps the (N, out) LoRA output for m's gradient, and its small vectors.
    assert dora_bytes - lora_bytes <= 8 * 192 * 4 + 4 * 192 * 4


# --------------------------------------------------------------------------- meta, errors
def test_meta_device_magnitude_is_set_from_the_loaded_weight_on_first_use():
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(12, 10))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(12, 10))
    lora_layers.inject_lora(model, ["0"], r=2, use_dora=True)
    assert model[0].lora_magnitude.is_meta
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict(), strict=False)  # the base only
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), real(x), rtol=1e-6, atol=1e-6)  # B = 0, m = ||W||
    torch.testing.assert_close(
        model[0].lora_magnitude.detach(), torch.linalg.norm(real[0].weight.detach(), dim=1)
    )


def test_meta_device_magnitude_loaded_with_the_adapter_is_kept():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(12, 10))
    lora_layers.inject_lora(model, ["0"], r=2, use_dora=True)
    model.to_empty(device="cpu")
    state = {"0.weight": torch.randn(10, 12), "0.bias": torch.zeros(10)}
    state |= {"0.lora_magnitude": torch.full((10,), 2.0), "0.lora_A": torch.randn(2, 12)}
    model.load_state_dict(state | {"0.lora_B": torch.zeros(10, 2)})
    model(torch.randn(1, 12))
    assert torch.equal(model[0].lora_magnitude.detach(), torch.full((10,), 2.0))


def test_inject_plan_trainable_and_state_dict_carry_the_magnitude():
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    plan = lora_layers.plan_lora(model, ["0", "2"], use_dora=True)
    assert all(spec.use_dora for spec in plan.values())
    lora_layers.inject_lora(model, plan=plan)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.lora_{k}" for i in (0, 2) for k in ("A", "B", "magnitude")}
    assert set(lora_layers.lora_state_dict(model)) == trainable
    assert lora_layers.LoRAConfig.from_layer(model[0]).use_dora is True
    assert lora_layers.LoRAConfig().use_dora is False


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_non_bool_use_dora_is_a_type_error_naming_it(bad):
    with pytest.raises(TypeError, match=f"use_dora must be a bool, got {bad!r}"):
        lora_layers.Linear(4, 4, r=2, use_dora=bad)
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        lora_layers.LoRAConfig(use_dora=bad)


def test_use_dora_without_rank_is_a_value_error():
    with pytest.raises(ValueError, match=r"use_dora=True needs a LoRA update \(r > 0\), got r=0"):
        lora_layers.Conv2d(2, 2, 1, r=0, use_dora=True)


def test_dora_weight_norm_of_a_layer_without_dora_raises():
    with pytest.raises(ValueError, match="has no DoRA"):
        lora_layers.Linear(4, 4, r=2).dora_weight_norm()


def test_use_dora_on_a_quantized_base_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(lora_layers.QUANTIZED_LINEARS, RowInt8Linear, LoRARowInt8)
    model = nn.Sequential(RowInt8Linear(torch.randn(6, 8)))
    with pytest.raises(ValueError, match="use_dora=True is not supported on the quantized '0'"):
        lora_layers.inject_lora(model, "all-linear", r=2, use_dora=True)
    lora_layers.inject_lora(model, "all-linear", r=2)  # plain LoRA still works
    assert model[0].use_dora is False
