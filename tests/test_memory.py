"""The memory planner against real counts: a meta-device Phi-3-mini, and a tiny Phi-3 really
loaded in 4-bit and 8-bit by transformers (every packed weight and quant-state tensor summed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Phi3Config, Phi3ForCausalLM

import lora_layers
from lora_layers import estimate_memory
from tests.helpers import tiny_phi3, tiny_phi3_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_phi3_mini_counts_match_a_meta_device_model():
    config = Phi3Config()  # Phi-3-mini's shape: 32 layers, hidden 3072, vocab 32064
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Linear) and m is not model.lm_head
    )
    dense = estimate_memory(config, r=16, quantize=None, dtype=torch.bfloat16)
    four = estimate_memory(config, r=16, quantize="4bit")
    lora_layers.inject_lora(model, "all-linear", r=16, fused={"qkv_proj": "qv"})
    trainable, _ = lora_layers.count_parameters(model)

    assert params == dense.base_params == four.base_params == 3_821_079_552
    assert dense.base_bytes == 2 * params
    assert four.quantized_params == linear
    assert four.base_bytes < 0.3 * dense.base_bytes
    fused = estimate_memory(config, r=16, fused={"qkv_proj": "qv"}, quantize="4bit")
    assert fused.lora_params == trainable
    assert dense.lora_params == 25_165_824  # 32 x 16 x (in + out) of qkv, o, gate_up, down
    assert four.adapter_bytes == 4 * four.lora_params  # fp32 LoRA on a quantized base
    assert dense.adapter_bytes == 2 * dense.lora_params  # the base dtype on a dense base
    assert four.optimizer_bytes == 2 * four.adapter_bytes + 4 * 2 * 32 * 4  # + a step per tensor


def _real_base_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and quantization-state tensor, as they sit in memory."""
    total = 0
    for p in model.parameters():
        total += p.data.numel() * p.data.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            total += sum(t.numel() * t.element_size() for t in tensors)
        scb = getattr(p, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


@pytest.mark.parametrize(
    "quantize, kwargs",
    [
        ("4bit", {"bnb_4bit_use_double_quant": True}),
        ("4bit", {"bnb_4bit_use_double_quant": False}),
        ("8bit", {}),
    ],
    ids=["4bit-dq", "4bit", "8bit"],
)
def test_estimate_equals_a_real_quantized_tiny_phi3(tmp_path, quantize, kwargs):
    tiny_phi3().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(
        load_in_4bit=quantize == "4bit", load_in_8bit=quantize == "8bit", **kwargs
    )
    model = Phi3ForCausalLM.from_pretrained(
        tmp_path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    estimate = estimate_memory(
        tiny_phi3_config(),
        r=4,
        quantize=quantize,
        dtype=torch.float32,
        double_quant=kwargs.get("bnb_4bit_use_double_quant", False),
    )
    assert estimate.base_bytes == _real_base_bytes(model)

    lora_layers.inject_lora(model, "all-linear", r=4)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(3, 128, (1, 6))
    model(ids, labels=ids).loss.backward()
    opt.step()
    lora = [p for _, m in lora_layers.lora_modules(model) for p in (m.lora_A, m.lora_B)]
    assert estimate.adapter_bytes == sum(p.numel() * p.element_size() for p in lora)
    assert estimate.gradient_bytes == sum(p.grad.numel() * p.grad.element_size() for p in lora)
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert estimate.optimizer_bytes == state_bytes


def test_estimate_of_a_model_object_leaves_it_unchanged():
    model = tiny_phi3()
    estimate = estimate_memory(model, r=2, target_modules=["o_proj"], dtype=torch.float32)
    assert not lora_layers.lora_module_names(model)
    assert estimate.lora_params == 2 * 2 * (64 + 64)
    assert estimate.total_bytes == sum(
        (
            estimate.base_bytes,
            estimate.adapter_bytes,
            estimate.gradient_bytes,
            estimate.optimizer_bytes,
        )
    )


def test_bad_quantize_and_optimizer_name_the_value():
    with pytest.raises(ValueError, match="quantize=.*'3bit'"):
        estimate_memory(tiny_phi3(), quantize="3bit")
    with pytest.raises(ValueError, match="'lion'"):
        estimate_memory(tiny_phi3(), optimizer="lion")
