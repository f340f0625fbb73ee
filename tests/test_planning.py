"""LoRAConfig, plan_lora's LoRAPlan consumed by inject_lora, and the one wrappable check."""

import math

import pytest
import torch
from torch import nn

import lora_layers
from lora_layers import LoRAConfig, inject_lora, plan_lora
from lora_layers.base import AlreadyWrappedError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def test_config_scaling_is_the_layers_scaling():
    for rslora in (False, True):
        config = LoRAConfig(r=4, lora_alpha=6, use_rslora=rslora)
        layer = lora_layers.wrap_module(nn.Linear(3, 5), config)
        assert config.scaling == layer.scaling == (6 / math.sqrt(4) if rslora else 6 / 4)
        assert LoRAConfig.from_layer(layer) == config
    assert lora_layers.InjectSpec is LoRAConfig


def test_plan_is_consumed_by_inject_lora_as_planned():
    model = _mlp()
    plan = plan_lora(model, "all-linear", r=2, rank_pattern={"2": 3})
    assert dict(plan) == {"0": LoRAConfig(r=2), "2": LoRAConfig(r=3)}
    assert inject_lora(model, plan=plan) is model
    assert (model[0].r, model[2].r) == (2, 3)
    assert not model[0].weight.requires_grad and model[0].lora_A.requires_grad


def test_lora_config_instead_of_arguments():
    a, b = _mlp(), _mlp()
    inject_lora(a, ["0"], lora_config=LoRAConfig(r=3, lora_alpha=9, lora_dropout=0.1))
    inject_lora(b, ["0"], r=3, lora_alpha=9, lora_dropout=0.1)
    assert LoRAConfig.from_layer(a[0]) == LoRAConfig.from_layer(b[0])
    with pytest.raises(ValueError, match=r"either in lora_config or as arguments.*'r'"):
        plan_lora(_mlp(), ["0"], r=5, lora_config=LoRAConfig(r=3))


def test_plan_for_another_model_or_with_targets_is_refused():
    plan = plan_lora(_mlp(), ["0"], r=2)
    with pytest.raises(ValueError, match="the plan was made for another model: '0'"):
        inject_lora(_mlp(), plan=plan)
    with pytest.raises(ValueError, match="either a plan or the targeting arguments"):
        inject_lora(_mlp(), ["0"], plan=plan)


def test_wrapping_a_lora_layer_raises_one_exception_type_everywhere():
    model = inject_lora(_mlp(), ["0"], r=2)
    calls = (
        lambda: inject_lora(model, ["0"], r=2),
        lambda: lora_layers.Linear.from_module(model[0], r=2),
        lambda: lora_layers.wrap_module(model[0], LoRAConfig(r=2), "0"),
    )
    for call in calls:
        with pytest.raises(AlreadyWrappedError, match="already has LoRA"):
            call()


def test_phi3_split_sizes_come_from_the_one_layout_table():
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 16}
    sizes = lora_layers.fused.phi3_split_sizes({**config, "intermediate_size": 24})
    assert sizes == {"qkv_proj": (16, 8, 8), "gate_up_proj": (24, 24)}
    assert lora_layers.fused.PHI3_FUSED["qkv_proj"] == ("q_proj", "k_proj", "v_proj")
