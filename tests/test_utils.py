"""Model-wide helpers: selection by layer type (never by name), bias modes, adapter state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_layers
from tests.helpers import fill_lora_


class Net(nn.Module):
    """Names chosen to trap substring matching: loralib's 'lora_' in name / 'bias' in name."""

    def __init__(self):
        super().__init__()
        self.emb = lora_layers.Embedding(10, 8, r=2)
        self.q_proj = lora_layers.Linear(8, 8, r=2)
        self.flora_proj = nn.Linear(8, 8)  # "lora_" in its name, but a plain layer
        self.unbiased = nn.Linear(8, 8, bias=False)  # "unbiased.weight" contains "bias"
        self.plain = lora_layers.Linear(8, 8, r=0)  # r=0: a plain layer, no LoRA
        self.qkv = lora_layers.MergedLinear(8, 24, r=2, enable_lora=(True, False, True))
        self.off = lora_layers.MergedLinear(8, 24, r=2, enable_lora=(False, False, False))
        self.norm = nn.LayerNorm(8)
        self.conv = lora_layers.Conv1d(8, 8, 3, r=2)


LORA = {f"{m}.lora_{ab}" for m in ("emb", "q_proj", "qkv", "conv") for ab in "AB"}
LORA_BIASES = {"q_proj.bias", "qkv.bias", "conv.bias"}
ALL_BIASES = LORA_BIASES | {"flora_proj.bias", "plain.bias", "off.bias", "norm.bias"}
EXPECTED = {"none": LORA, "lora_only": LORA | LORA_BIASES, "all": LORA | ALL_BIASES}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_mark_only_lora_as_trainable_selects_by_type(bias):
    model = Net()
    assert lora_layers.mark_only_lora_as_trainable(model, bias=bias) is model
    assert trainable(model) == EXPECTED[bias]
    assert not model.flora_proj.weight.requires_grad
    assert not model.unbiased.weight.requires_grad


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_lora_state_dict_keys_and_storage(bias):
    model = Net()
    for _, m in lora_layers.lora_modules(model):
        fill_lora_(m)
    sd = lora_layers.lora_state_dict(model, bias=bias)
    assert set(sd) == EXPECTED[bias]
    params = dict(model.named_parameters())
    for k, v in sd.items():
        assert v.data_ptr() == params[k].data_ptr() and not v.requires_grad
    # Round trip into a fresh model with strict=False: the adapter comes back exactly.
    fresh = Net()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and not set(missing) & set(sd)
    for k in sd:
        assert torch.equal(dict(fresh.named_parameters())[k], params[k])


def test_selection_matches_loralib_on_unambiguous_names():
    import loralib

    def build(lib):
        torch.manual_seed(0)
        return nn.Sequential(
            lib.Embedding(10, 8, r=2), lib.Linear(8, 8, r=2), nn.LayerNorm(8), nn.Linear(8, 4)
        )

    for bias in ("none", "all", "lora_only"):
        ours, theirs = build(lora_layers), build(loralib)
        lora_layers.mark_only_lora_as_trainable(ours, bias=bias)
        loralib.mark_only_lora_as_trainable(theirs, bias=bias)
        assert trainable(ours) == trainable(theirs), bias
        assert set(lora_layers.lora_state_dict(ours, bias=bias)) == set(
            loralib.lora_state_dict(theirs, bias=bias)
        )


@pytest.mark.parametrize(
    "fn", [lora_layers.mark_only_lora_as_trainable, lora_layers.lora_state_dict]
)
@pytest.mark.parametrize("mode", ["some", "None", None, "LORA_ONLY"])
def test_unknown_bias_mode_raises_and_changes_nothing(fn, mode):
    model = Net()
    before = trainable(model)
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\)"):
        fn(model, bias=mode)
    assert trainable(model) == before


def test_lora_modules_lists_active_lora_layers_in_order():
    model = Net()
    names = [n for n, _ in lora_layers.lora_modules(model)]
    assert names == ["emb", "q_proj", "qkv", "conv"]
    layer = lora_layers.Linear(4, 4, r=1)
    assert list(lora_layers.lora_modules(layer)) == [("", layer)]
    lora_layers.mark_only_lora_as_trainable(layer, bias="all")
    assert trainable(layer) == {"lora_A", "lora_B", "bias"}
    assert set(lora_layers.lora_state_dict(layer, bias="lora_only")) == {"lora_A", "lora_B", "bias"}


def test_disable_adapters_restores_each_previous_setting():
    model = Net()
    for _, m in lora_layers.lora_modules(model):
        fill_lora_(m)
    model.q_proj.disable_adapters = True  # already off: must stay off afterwards
    x = torch.randn(2, 8)
    with torch.no_grad():
        with_lora = model.qkv(x)
        with lora_layers.disable_adapters(model) as same:
            assert same is model
            assert all(
                m.disable_adapters for m in model.modules() if isinstance(m, lora_layers.LoRALayer)
            )
            assert torch.equal(
                model.qkv(x), nn.functional.linear(x, model.qkv.weight, model.qkv.bias)
            )
        assert torch.equal(model.qkv(x), with_lora)
    assert model.q_proj.disable_adapters and not model.qkv.disable_adapters
    with pytest.raises(RuntimeError, match="boom"), lora_layers.disable_adapters(model):
        raise RuntimeError("boom")
    assert not model.emb.disable_adapters and model.q_proj.disable_adapters
