"""What every LoRA layer shares: argument checks, merge state, exact merges, drift, state dicts."""

from __future__ import annotations

import copy
import math
import pickle

import loralib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_layers
from lora_layers.base import check_lora_args
from tests.helpers import DTYPES, assert_close, fill_lora_, up

# kind -> (constructor taking **kwargs, input maker, base forward that ignores LoRA)
KINDS = {
    "linear": (
        lambda **kw: lora_layers.Linear(8, 6, **kw),
        lambda dtype: torch.randn(3, 8).to(dtype),
        lambda m, x: F.linear(x, m.weight, m.bias),
    ),
    "linear_fan_in_fan_out": (
        lambda **kw: lora_layers.Linear(8, 6, fan_in_fan_out=True, **kw),
        lambda dtype: torch.randn(3, 8).to(dtype),
        lambda m, x: F.linear(x, m.weight.t(), m.bias),
    ),
    "merged": (
        lambda **kw: lora_layers.MergedLinear(
            8, 12, enable_lora=(True, False, True), split_sizes=(6, 3, 3), **kw
        ),
        lambda dtype: torch.randn(3, 8).to(dtype),
        lambda m, x: F.linear(x, m.weight, m.bias),
    ),
    "embedding": (
        lambda **kw: lora_layers.Embedding(10, 6, **kw),
        lambda dtype: torch.randint(0, 10, (3, 4)),
        lambda m, x: F.embedding(x, m.weight),
    ),
    "conv2d": (
        lambda **kw: lora_layers.Conv2d(4, 6, (3, 2), groups=2, **kw),
        lambda dtype: torch.randn(2, 4, 5, 5).to(dtype),
        lambda m, x: F.conv2d(x, m.weight, m.bias, groups=2),
    ),
}
LAYER_CLASSES = [
    lambda **kw: lora_layers.Linear(8, 6, **kw),
    lambda **kw: lora_layers.MergedLinear(8, 6, enable_lora=(True, False), **kw),
    lambda **kw: lora_layers.Embedding(
        10, 6, **{k: v for k, v in kw.items() if k != "lora_dropout"}
    ),
    lambda **kw: lora_layers.Conv1d(4, 6, 3, **kw),
    lambda **kw: lora_layers.Conv2d(4, 6, 3, **kw),
    lambda **kw: lora_layers.Conv3d(4, 6, 3, **kw),
]
LAYER_IDS = ["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d"]


def make(kind, dtype=torch.float32, **kw):
    kw.setdefault("r", 2)
    kw.setdefault("lora_alpha", 4)
    layer = KINDS[kind][0](dtype=dtype, **kw)
    fill_lora_(layer)
    return layer


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern (torch.equal treats -0.0 == 0.0; this does not)."""
    return (
        t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()
    )


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("ctor", LAYER_CLASSES, ids=LAYER_IDS)
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"r": -1}, ValueError, "r must be a non-negative int, got r=-1"),
        ({"r": 2.0}, TypeError, r"r must be a non-negative int, got 2\.0 \(float\)"),
        ({"r": True}, TypeError, r"r must be a non-negative int, got True \(bool\)"),
        ({"r": "4"}, TypeError, "r must be a non-negative int, got '4'"),
        (
            {"r": 2, "lora_alpha": 0},
            ValueError,
            "lora_alpha must be > 0 when r > 0, got lora_alpha=0",
        ),
        ({"r": 2, "lora_alpha": -1.5}, ValueError, "lora_alpha=-1.5"),
        ({"r": 2, "lora_alpha": "8"}, TypeError, "lora_alpha must be a positive number, got '8'"),
        (
            {"r": 2, "lora_alpha": math.inf},
            ValueError,
            "must be a finite number, got lora_alpha=inf",
        ),
        ({"r": 2, "lora_alpha": -math.inf}, ValueError, "finite number, got lora_alpha=-inf"),
        ({"r": 2, "lora_alpha": math.nan}, ValueError, "finite number, got lora_alpha=nan"),
        ({"r": 0, "lora_alpha": math.inf}, ValueError, "finite number, got lora_alpha=inf"),
        (
            {"r": 2, "lora_alpha": 10**400},
            ValueError,
            "must be a finite number, got lora_alpha=1000",
        ),
    ],
)
def test_bad_lora_arguments_raise(ctor, kwargs, error, match):
    with pytest.raises(error, match=match):
        ctor(**kwargs)


@pytest.mark.parametrize(
    "ctor",
    [c for i, c in zip(LAYER_IDS, LAYER_CLASSES, strict=True) if i != "Embedding"],
    ids=[i for i in LAYER_IDS if i != "Embedding"],
)
@pytest.mark.parametrize(
    "p, error, match",
    [
        (1.0, ValueError, r"lora_dropout must be in \[0, 1\), got lora_dropout=1.0"),
        (-0.1, ValueError, "got lora_dropout=-0.1"),
        ("0.1", TypeError, "lora_dropout must be a float in"),
    ],
)
def test_bad_dropout_raises(ctor, p, error, match):
    with pytest.raises(error, match=match):
        ctor(r=2, lora_dropout=p)


def test_check_lora_args_accepts_valid_values():
    check_lora_args(0, 0, 0.0)  # r=0 ignores alpha
    check_lora_args(4, 16, 0.5)
    with pytest.raises(ValueError, match="lora_alpha=nan"):
        check_lora_args(4, float("nan"), 0.0)


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, math.nan])
def test_check_lora_args_rejects_non_finite_alpha(alpha):
    """One public check: the constructors, inject_lora and the adapter loaders all call it."""
    with pytest.raises(
        ValueError, match=f"lora_alpha must be a finite number, got lora_alpha={alpha}"
    ):
        check_lora_args(4, alpha, 0.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: lora_layers.Linear.from_module(nn.Conv2d(2, 2, 1), r=2),
            "expects Linear, got Conv2d",
        ),
        (
            lambda: lora_layers.Conv2d.from_module(nn.Conv1d(2, 2, 1), r=2),
            "expects Conv2d, got Conv1d",
        ),
        (
            lambda: lora_layers.Conv1d.from_module(nn.Linear(2, 2), r=2),
            "expects Conv1d, got Linear",
        ),
        (
            lambda: lora_layers.Embedding.from_module(nn.Linear(2, 2), r=2),
            "expects Embedding, got Linear",
        ),
        (lambda: lora_layers.MergedLinear.from_module(nn.Embedding(2, 2), r=2), "got Embedding"),
        (lambda: lora_layers.Linear.from_module(nn.LSTM(2, 2), r=2), "got LSTM"),
        (
            lambda: lora_layers.Linear.from_module(lora_layers.Linear(2, 2, r=1), r=2),
            "Linear already has LoRA; unload it",
        ),
    ],
)
def test_from_module_on_unsupported_layer_raises(call, match):
    with pytest.raises(TypeError, match=match):
        call()


# ---------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize("ctor", LAYER_CLASSES, ids=LAYER_IDS)
def test_scaling_plain_and_rslora_and_frozen_weight(ctor):
    plain = ctor(r=4, lora_alpha=6)
    rs = ctor(r=4, lora_alpha=6, use_rslora=True)
    assert plain.scaling == 6 / 4 and rs.scaling == 6 / math.sqrt(4)
    assert (plain.r, plain.lora_alpha, plain.use_rslora, rs.use_rslora) == (4, 6, False, True)
    assert not plain.weight.requires_grad and plain.lora_A.requires_grad
    assert "r=4" in repr(plain) and "use_rslora=True" in repr(rs)
    assert ctor(r=0).eval() is not None


@pytest.mark.parametrize("ctor", LAYER_CLASSES, ids=LAYER_IDS)
def test_eval_train_return_module(ctor):
    for r in (0, 2):
        layer = ctor(r=r)
        assert hasattr(layer, "lora_A") == (r > 0) and hasattr(layer, "lora_B") == (r > 0)
        assert layer.eval() is layer and not layer.training
        assert layer.merged == (r > 0)
        assert layer.train() is layer and layer.training and not layer.merged


# ---------------------------------------------------------------- drift
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
def test_1000_merge_cycles_leave_base_weight_bit_identical(kind, dtype):
    layer = make(kind, dtype=dtype)
    original = bits(layer.weight)
    for i in range(1000):
        with torch.no_grad():
            layer.lora_B.add_(torch.randn(layer.lora_B.shape).to(dtype), alpha=0.01)
        if i % 2:
            layer.eval()
            assert layer.merged
            layer.train()
        else:
            layer.merge()
            layer.unmerge()
        assert not layer.merged
    assert torch.equal(bits(layer.weight), original)
    layer.eval()
    W = layer.weight
    expected = (up(W) + layer.delta_weight()).to(W.dtype)
    assert torch.equal(bits(layer.merged_weight), bits(expected))
    assert torch.equal(bits(layer.weight), original)
    assert layer.delta_weight().abs().max() > 0  # the cycles merged a real update
    assert not torch.equal(layer.merged_weight, W)


# ---------------------------------------------------------------- non-finite merges
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", list(KINDS))
def test_non_finite_merge_raises_and_changes_nothing(kind, bad):
    layer = make(kind)
    layer.merge()
    good_merged = layer.merged_weight.clone()
    weight = bits(layer.weight)
    with torch.no_grad():
        layer.lora_B[0, 0] = bad
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    with pytest.raises(ValueError, match=r"would produce \d+ non-finite .* left unchanged"):
        layer.merge()
    assert torch.equal(layer.merged_weight, good_merged)  # still the last good merge
    assert torch.equal(bits(layer.weight), weight)
    assert torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B.isnan(), B.isnan())
    layer.unmerge()
    with pytest.warns(RuntimeWarning, match="non-finite .* stays unmerged"):
        layer.eval()  # eval() switches the mode, warns and merges nothing
    assert not layer.training and not layer.merged
    assert torch.equal(bits(layer.weight), weight)


def test_fp16_overflow_on_merge_raises():
    layer = lora_layers.Linear(4, 3, r=2, lora_alpha=4, dtype=torch.float16)
    with torch.no_grad():
        layer.lora_A.fill_(200.0)
        layer.lora_B.fill_(200.0)  # finite factors, but 2 * 2 * 200 * 200 > 65504
    with pytest.raises(ValueError, match="12 non-finite"):
        layer.merge()
    assert not layer.merged


# ---------------------------------------------------------------- training while merged
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_with_grad_while_merged_trains_lora(kind):
    layer = make(kind)
    x = KINDS[kind][1](torch.float32)
    layer(x).square().sum().backward()
    expected = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad()

    layer.eval()
    assert layer.merged
    out = layer(x)
    out.square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert torch.equal(layer.lora_A.grad, expected[0])
    assert torch.equal(layer.lora_B.grad, expected[1])
    assert layer.lora_B.grad.abs().max() > 0
    assert layer.merged  # still merged for the no-grad forwards
    with torch.no_grad():
        assert_close(layer(x), out.detach())


def test_trainable_base_weight_while_merged_gets_its_gradient():
    layer = make("linear")
    layer.weight.requires_grad_(True)
    for p in (layer.lora_A, layer.lora_B):
        p.requires_grad_(False)
    layer.eval()
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, 6).t() @ x)


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_grad_eval_uses_merged_weight(kind):
    layer = make(kind)
    layer.eval()
    x = KINDS[kind][1](torch.float32)
    with torch.no_grad():
        merged_out = layer(x)
        layer.merged_weight = layer.merged_weight * 0  # proves the merged weight is what runs
        assert not torch.equal(layer(x), merged_out)


# ---------------------------------------------------------------- disabling
@pytest.mark.parametrize("kind", list(KINDS))
def test_disable_adapters_flag_and_context_manager(kind):
    layer = make(kind)
    base_forward = KINDS[kind][2]
    x = KINDS[kind][1](torch.float32)
    with torch.no_grad():
        base = base_forward(layer, x)
        with_lora = layer(x)
        assert not torch.equal(with_lora, base)
        layer.disable_adapters = True
        assert torch.equal(layer(x), base)
        layer.eval()  # merged: still the base output
        assert layer.merged and torch.equal(layer(x), base)
        layer.disable_adapters = False
        assert_close(layer(x), with_lora)
        with lora_layers.disable_adapters(layer) as same:
            assert same is layer and torch.equal(layer(x), base)
        assert not layer.disable_adapters
        assert_close(layer(x), with_lora)


# ---------------------------------------------------------------- from_module
@pytest.mark.parametrize(
    "cls, module",
    [
        (lora_layers.Linear, lambda: nn.Linear(4, 3)),
        (lora_layers.Linear, lambda: nn.Linear(4, 3, bias=False)),
        (lora_layers.Embedding, lambda: nn.Embedding(5, 3)),
        (lora_layers.Conv1d, lambda: nn.Conv1d(2, 4, 3)),
        (lora_layers.Conv2d, lambda: nn.Conv2d(2, 4, (3, 1))),
        (lora_layers.Conv3d, lambda: nn.Conv3d(2, 4, 1, bias=False)),
    ],
)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_from_module_shares_the_same_parameter_objects(cls, module, device):
    with torch.device(device):
        base = module()
    layer = cls.from_module(base, r=2, lora_alpha=4)
    assert layer.weight is base.weight
    assert layer.bias is getattr(base, "bias", None)
    assert layer.lora_A.device.type == device and layer.lora_B.device.type == device
    assert not base.weight.requires_grad  # frozen in place: it is the same Parameter
    params = {id(p) for p in layer.parameters()}
    assert id(base.weight) in params
    plain = cls.from_module(module(), r=0)
    assert plain.r == 0 and not hasattr(plain, "lora_A")


# ---------------------------------------------------------------- state dicts
def build_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        lora_layers.Embedding(10, 8, r=2, lora_alpha=4),
        lora_layers.Linear(8, 12, r=2, lora_alpha=4),
        lora_layers.MergedLinear(12, 12, r=2, lora_alpha=4, enable_lora=(True, False, True)),
        nn.Linear(12, 4),
    )
    for m in model.modules():
        if isinstance(m, lora_layers.LoRALayer):
            fill_lora_(m)
    return model


def test_state_dict_of_merged_model_holds_original_weights_and_reloads():
    model = build_model(0)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 10, (2, 5))
    model.eval()
    assert all(m.merged for _, m in lora_layers.lora_modules(model))
    with torch.no_grad():
        expected = model(x)
    sd = model.state_dict()
    assert set(sd) == set(originals) and not any("merged" in k for k in sd)
    for k, v in sd.items():
        assert torch.equal(bits(v), bits(originals[k])), k

    fresh = build_model(1)  # different values everywhere
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)

    fresh_eval = build_model(2).eval()  # merged before loading: the load must re-merge
    fresh_eval.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh_eval(x), expected)
        fresh_eval.train()
        torch.testing.assert_close(fresh_eval(x), expected, rtol=1e-5, atol=1e-5)


def test_conv_state_dict_keys_are_torch_keys():
    layer = make("conv2d")
    layer.eval()
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    base = nn.Conv2d(4, 6, (3, 2), groups=2)
    base.load_state_dict({k: v for k, v in layer.state_dict().items() if "lora" not in k})
    assert torch.equal(base.weight, layer.weight)


def test_merged_weight_refreshes_after_in_place_update_in_eval_mode():
    # Training in eval mode (grad on: unmerged path), then a no-grad forward: the merged
    # weight made before the optimizer step must not be used stale.
    layer = lora_layers.Linear(12, 6, r=3, lora_alpha=6)
    fill_lora_(layer)
    layer.eval()
    assert layer.merged
    x = torch.randn(4, 12)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        out = layer(x)
    delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    expected = F.linear(x, layer.weight + delta, layer.bias)
    assert_close(out, expected)


# ---------------------------------------------------------------- fp64 merges (issue 12, item 5)
@pytest.mark.parametrize("kind", list(KINDS))
def test_fp64_merge_with_b_zero_is_bit_identical_to_base(kind):
    layer = KINDS[kind][0](r=2, lora_alpha=4, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.zero_()
    layer.merge()
    assert torch.equal(bits(layer.merged_weight), bits(layer.weight))
    x = KINDS[kind][1](torch.float64)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), KINDS[kind][2](layer, x))


@pytest.mark.parametrize("kind", list(KINDS))
def test_fp64_merge_is_computed_in_fp64(kind):
    layer = make(kind, dtype=torch.float64)
    A, B, W = layer.lora_A, layer.lora_B, layer.weight
    assert layer.delta_weight().dtype == torch.float64
    layer.merge()
    # The merged weight is within fp64 rounding of the fp64 dense sum (fp32 would be ~1e-8 off).
    delta = layer.delta_weight()
    torch.testing.assert_close(layer.merged_weight, W + delta, rtol=1e-15, atol=1e-15)
    if kind == "merged":  # disabled slice (rows 6:9) merges to W bit for bit
        assert torch.equal(bits(layer.merged_weight[6:9]), bits(W[6:9]))
    assert torch.equal(layer.merged_weight, (W + delta).to(W.dtype))
    assert A.dtype == B.dtype == torch.float64


def test_merge_and_unload_keeps_fp64_precision():
    model = nn.Sequential(
        lora_layers.Linear(8, 6, r=2, lora_alpha=4, dtype=torch.float64),
        lora_layers.MergedLinear(
            6, 6, r=2, enable_lora=(True, False), lora_alpha=4, dtype=torch.float64
        ),
    )
    fill_lora_(model[0])
    with torch.no_grad():
        model[1].lora_A.normal_()
        model[1].lora_B.zero_()  # B = 0: the merged weight must be W itself
    expected0 = model[0].weight + model[0].delta_weight()
    w1 = model[1].weight.detach().clone()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    lora_layers.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float64
    assert torch.equal(model[0].weight, expected0)
    assert torch.equal(bits(model[1].weight), bits(w1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- stale merges (item 6)
@pytest.mark.parametrize("kind", list(KINDS))
def test_replacing_a_lora_parameter_while_merged_refreshes_the_merge(kind):
    """Swapping in another adapter's lora_B (same version counter) must not use a stale merge."""
    layer, other = make(kind), make(kind)
    x = KINDS[kind][1](torch.float32)
    layer.eval()
    assert layer.merged
    assert layer.lora_B._version == other.lora_B._version  # the version check alone misses it
    layer.lora_B = other.lora_B
    with torch.no_grad():
        merged_out = layer(x)
        layer.train()
        assert_close(merged_out, layer(x))
        assert not torch.allclose(merged_out, make(kind)(x))  # a real change


@pytest.mark.parametrize("kind", list(KINDS))
def test_what_triggers_a_remerge(kind):
    """docs/migrating-from-loralib.md states exactly this list."""
    layer = make(kind)
    x = KINDS[kind][1](torch.float32)

    def unmerged_output():
        twin = copy.deepcopy(layer).train()  # same parameters, unmerged
        assert not twin.merged
        with torch.no_grad():
            return twin(x)

    def merged_output():
        with torch.no_grad():
            return layer(x)

    layer.eval()
    # 1. in place on the Parameter (optimizer step, copy_ under no_grad): re-merged
    with torch.no_grad():
        layer.lora_B.mul_(2)
    assert_close(merged_output(), unmerged_output())
    # 2. a new Parameter object: re-merged
    layer.lora_A = nn.Parameter(layer.lora_A.detach() * 0.5)
    assert_close(merged_output(), unmerged_output())
    # 3. new .data assigned: re-merged
    layer.lora_B.data = layer.lora_B.detach() + 1.0
    assert_close(merged_output(), unmerged_output())
    # 4. a changed scaling: re-merged
    layer.scaling = layer.scaling * 3
    assert_close(merged_output(), unmerged_output())
    # 5. writing through .data bypasses the version counter: NOT seen, merge() fixes it
    stale = merged_output()
    layer.lora_B.data.mul_(-1)
    assert torch.equal(merged_output(), stale)
    layer.merge()
    assert_close(merged_output(), unmerged_output())


def test_merged_layer_pickles_and_deep_copies():
    layer = make("linear").eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = layer(x)
    for copy_ in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        with torch.no_grad():
            assert torch.equal(copy_(x), expected)
        with torch.no_grad():
            copy_.lora_B.mul_(2)  # the copy's merge tracks the copy's parameters
            assert not torch.equal(copy_(x), expected)


# ---------------------------------------------------------------- inference mode (item 11)
@pytest.mark.parametrize("kind", list(KINDS))
def test_model_built_in_inference_mode_switches_modes(kind):
    with torch.inference_mode():
        layer = make(kind)
        x = KINDS[kind][1](torch.float32)
        expected = layer(x)
    layer.eval()  # used to raise "Inference tensors do not track version counter"
    assert layer.merged
    with torch.no_grad():
        assert_close(layer(x), expected)
    with torch.inference_mode():
        assert_close(layer(x), expected)
    layer.train()
    with torch.inference_mode():
        assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", list(KINDS))
def test_weight_merged_in_inference_mode_is_reused_with_grad(kind):
    layer = make(kind)
    layer.requires_grad_(False)  # a frozen model: merged forwards even with grad enabled
    x = KINDS[kind][1](torch.float32)
    with torch.inference_mode():
        layer.eval()
        expected = layer(x)
    assert layer.merged and not layer.merged_weight.is_inference()
    if x.is_floating_point():
        x.requires_grad_()
    out = layer(x)
    assert_close(out.detach(), expected)
    if x.is_floating_point():
        out.sum().backward()  # used to raise "Inference tensors cannot be saved for backward"
        assert x.grad is not None


# ---------------------------------------------------------------- eval() is all or nothing (16)
def test_eval_with_a_non_finite_layer_switches_the_whole_model():
    model = nn.Sequential(
        lora_layers.Linear(8, 6, r=2, lora_alpha=4),
        lora_layers.MergedLinear(6, 12, r=2, enable_lora=(True, False), lora_alpha=4),
        lora_layers.Linear(12, 5, r=2, lora_alpha=4),
    )
    for layer in model:
        fill_lora_(layer)
    with torch.no_grad():
        model[1].lora_B[0, 0] = float("nan")
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(RuntimeWarning, match=r"MergedLinear would produce 6 non-finite.*unmerged"):
        model.eval()  # used to raise with model[0] merged and model[2] still training
    assert not any(m.training for m in model.modules())
    assert model[0].merged and not model[1].merged and model[2].merged
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    model.train()
    assert all(m.training for m in model.modules()) and not any(m.merged for m in model)


def test_stale_merge_that_turns_non_finite_falls_back_to_unmerged():
    layer = make("linear").eval()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
        with pytest.warns(RuntimeWarning, match="non-finite"):
            out = layer(torch.randn(3, 8))
    assert not layer.merged and out.isinf().any()  # the exact unmerged result


# ---------------------------------------------------------------- reset_parameters (item 18)
@pytest.mark.parametrize(
    "ctor",
    LAYER_CLASSES + [KINDS["linear_fan_in_fan_out"][0]],
    ids=LAYER_IDS + ["Linear_fan_in_fan_out"],
)
def test_reset_parameters_reinitialises_lora_like_loralib(ctor):
    layer = ctor(r=2, lora_alpha=4)
    fill_lora_(layer)
    layer.eval()
    assert layer.merged
    weight = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not layer.merged
    zero, nonzero = (
        (layer.lora_A, layer.lora_B)
        if isinstance(layer, lora_layers.Embedding)
        else (layer.lora_B, layer.lora_A)
    )
    assert torch.count_nonzero(zero) == 0 and torch.count_nonzero(nonzero) == nonzero.numel()
    assert not torch.equal(layer.weight, weight)  # the base is re-initialised too, as loralib


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            lambda: lora_layers.Linear(8, 6, r=2, lora_alpha=4),
            lambda: loralib.Linear(8, 6, r=2, lora_alpha=4),
        ),
        (
            lambda: lora_layers.Embedding(10, 6, r=2, padding_idx=1),
            lambda: loralib.Embedding(10, 6, r=2, padding_idx=1),
        ),
    ],
    ids=["Linear", "Embedding"],
)
def test_reset_parameters_matches_loralib_bit_for_bit(ours, theirs):
    a, b = ours(), theirs()
    torch.manual_seed(5)
    a.reset_parameters()
    torch.manual_seed(5)
    b.reset_parameters()
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_fan_in_fan_out_reset_uses_in_features_as_fan_in():
    torch.manual_seed(2)
    ref = nn.Linear(40, 3)
    layer = lora_layers.Linear(40, 3, r=2, fan_in_fan_out=True)
    torch.manual_seed(2)
    layer.reset_parameters()
    assert torch.equal(layer.weight, ref.weight.t()) and torch.equal(layer.bias, ref.bias)


def test_model_init_weights_calling_reset_parameters_gives_a_zero_update():
    """Microsoft's NLU RoBERTa calls reset_parameters() from _init_weights: B is zero again."""
    model = nn.Sequential(
        lora_layers.Linear(8, 6, r=2, lora_alpha=4),
        lora_layers.MergedLinear(6, 12, r=2, enable_lora=(True, False), lora_alpha=4),
    )
    for layer in model:
        fill_lora_(layer)
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    x = torch.randn(3, 8)
    with torch.no_grad(), lora_layers.disable_adapters(model):
        base = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), base)


# ---------------------------------------------------------------- meta + to_empty (item 20)
@pytest.mark.parametrize("ctor", LAYER_CLASSES, ids=LAYER_IDS)
def test_to_empty_after_meta_initialises_lora_parameters(ctor):
    with torch.device("meta"):
        layer = ctor(r=2, lora_alpha=4)
    assert layer.lora_A.is_meta
    layer.to_empty(device="cpu")
    zero, nonzero = (
        (layer.lora_A, layer.lora_B)
        if isinstance(layer, lora_layers.Embedding)
        else (layer.lora_B, layer.lora_A)
    )
    assert torch.count_nonzero(zero) == 0  # was uninitialised memory: a garbage update
    assert torch.count_nonzero(nonzero) == nonzero.numel() and torch.isfinite(nonzero).all()
    layer.to(torch.float64)  # later moves leave the (now real) adapter alone
    assert torch.count_nonzero(zero) == 0


def test_inject_on_meta_then_to_empty_and_load_gives_the_base_model():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    lora_layers.inject_lora(model, ["0", "1"], r=2)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    model.load_state_dict(base.state_dict(), strict=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_merge_and_unload_inside_inference_mode_gives_a_trainable_model():
    model = nn.Sequential(make("linear"), nn.ReLU())
    with torch.inference_mode():
        lora_layers.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and not model[0].weight.is_inference()
    model[0].weight.requires_grad_(True)
    model(torch.randn(3, 8)).sum().backward()  # an inference tensor could not be trained
    assert model[0].weight.grad is not None
