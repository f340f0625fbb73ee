"""What every LoRA layer shares: argument checks, merge state, exact merges, drift, state dicts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_layers
from lora_layers.base import check_lora_args
from tests.helpers import DTYPES, assert_close, fill_lora_

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
    return t.detach().view({2: torch.int16, 4: torch.int32}[t.element_size()]).clone()


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
    expected = (W.float() + layer.delta_weight()).to(W.dtype)
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
