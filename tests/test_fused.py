"""Fused <-> separate adapters (``lora_layers.fused``): Phi-3's ``qkv_proj`` / ``gate_up_proj``
adapters split into q/k/v and gate/up layers and fused back, with the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_layers
from lora_layers import AdapterError, fuse_separate, load_lora, read_adapter, save_lora, split_fused
from lora_layers.fused import phi3_split_sizes
from tests.helpers import fill_all_, logits, phi3_q_and_v, tiny_phi3


class SeparateAttnMLP(nn.Module):
    """One Phi-3 layer's projections unfused, as Llama-style servers hold them."""

    def __init__(self, layer: nn.Module, sizes: dict) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        self.self_attn.o_proj = layer.self_attn.o_proj
        for parent, fused, names in (
            (self.self_attn, layer.self_attn.qkv_proj, ("q_proj", "k_proj", "v_proj")),
            (self.mlp, layer.mlp.gate_up_proj, ("gate_proj", "up_proj")),
        ):
            key = "qkv_proj" if parent is self.self_attn else "gate_up_proj"
            for name, w in zip(names, fused.weight.detach().split(sizes[key]), strict=True):
                lin = nn.Linear(fused.in_features, w.shape[0], bias=False)
                lin.weight.data.copy_(w)
                setattr(parent, name, lin)


def separate_phi3(fused_model) -> nn.Module:
    """The plain ``fused_model``'s projections as separate q/k/v and gate/up layers."""
    sizes = phi3_split_sizes(fused_model.config)
    outer = nn.Module()
    outer.model = nn.Module()
    outer.model.layers = nn.ModuleList(
        SeparateAttnMLP(layer, sizes) for layer in fused_model.model.layers
    )
    return outer


def fused_outputs(fused_model, x):
    outs = {}
    for i, layer in enumerate(fused_model.model.layers):
        outs[f"model.layers.{i}.self_attn.qkv_proj"] = layer.self_attn.qkv_proj(x)
        outs[f"model.layers.{i}.mlp.gate_up_proj"] = layer.mlp.gate_up_proj(x)
    return outs


def test_fused_to_separate_and_back_keeps_every_projection(tmp_path):
    model = phi3_q_and_v()
    sizes = phi3_split_sizes(model.config)
    x = torch.randn(3, 64)
    with torch.no_grad():
        reference = fused_outputs(model, x)

    separate = split_fused(lora_layers.adapter_from_model(model))
    assert "model.layers.0.self_attn.k_proj" not in separate.modules  # k had no LoRA
    assert separate.modules["model.layers.0.self_attn.q_proj"].out_features == 64
    path = save_lora(separate, tmp_path / "separate.safetensors")
    target = separate_phi3(tiny_phi3())
    load_lora(target, path)

    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    with torch.no_grad():
        for i, layer in enumerate(target.model.layers):
            for parent, fused in ((layer.self_attn, "qkv_proj"), (layer.mlp, "gate_up_proj")):
                where = "self_attn" if fused == "qkv_proj" else "mlp"
                want = reference[f"model.layers.{i}.{where}.{fused}"].split(sizes[fused], -1)
                for name, w in zip(parts[fused], want, strict=True):
                    torch.testing.assert_close(getattr(parent, name)(x), w, rtol=1e-6, atol=1e-6)

    back = fuse_separate(read_adapter(path), split_sizes=sizes)
    fresh = tiny_phi3()
    load_lora(fresh, back)
    assert torch.equal(logits(fresh), logits(model))


def test_whole_matrix_adapter_splits_with_sizes_and_fuses_back():
    model = tiny_phi3()
    lora_layers.inject_lora(model, ["qkv_proj"], r=4, lora_alpha=8)
    fill_all_(model)
    sizes = phi3_split_sizes(model.config)
    adapter = lora_layers.adapter_from_model(model)

    with pytest.raises(AdapterError, match="needs split_sizes"):
        split_fused(adapter)
    separate = split_fused(adapter, split_sizes=sizes)

    a = adapter.tensors["model.layers.0.self_attn.qkv_proj.lora_A"]
    assert torch.equal(separate.tensors["model.layers.0.self_attn.k_proj.lora_A"], a)
    fused = fuse_separate(separate)  # every part present: sizes come from the parts
    spec = fused.modules["model.layers.0.self_attn.qkv_proj"]
    assert spec.layer == "MergedLinear" and spec.enable_lora == (True, True, True)
    fresh = tiny_phi3()
    load_lora(fresh, fused)
    x = torch.randn(2, 64)
    with torch.no_grad():
        for i in range(2):
            got = fresh.model.layers[i].self_attn.qkv_proj(x)
            want = model.model.layers[i].self_attn.qkv_proj(x)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fuse_needs_sizes_when_a_part_has_no_adapter():
    separate = split_fused(lora_layers.adapter_from_model(phi3_q_and_v()))
    with pytest.raises(AdapterError) as info:
        fuse_separate(separate)
    message = str(info.value)
    assert "model.layers.0.self_attn.qkv_proj" in message
    assert "model.layers.1.self_attn.qkv_proj" in message and "split_sizes" in message
