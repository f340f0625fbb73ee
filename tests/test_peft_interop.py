"""PEFT interop both ways, with PEFT itself as the oracle: PEFT loads our exports and we load
PEFT's adapters, with identical logits (fp32, 1e-5). peft is a test dependency: never skipped."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lora_layers
from lora_layers import AdapterError, AdapterLoadError, export_peft, import_peft
from tests.helpers import (
    assert_unchanged,
    fill_all_,
    logits,
    phi3_q_and_v,
    snapshot,
    tiny_phi3,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


def peft_logits(directory) -> torch.Tensor:
    base = tiny_phi3()
    return logits(peft.PeftModel.from_pretrained(base, str(directory)).eval())


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_peft_loads_export_of_fused_q_and_v_with_identical_logits(tmp_path, gqa):
    model = phi3_q_and_v(gqa=gqa)
    config = export_peft(model, tmp_path)

    theirs = logits(peft.PeftModel.from_pretrained(tiny_phi3(gqa=gqa), str(tmp_path)).eval())

    torch.testing.assert_close(theirs, logits(model), **TOL)
    assert not torch.allclose(theirs, logits(tiny_phi3(gqa=gqa)), **TOL)  # the adapter matters
    # q and v of rank 4 -> one rank-8 LoRA on the fused matrix with alpha 16: scaling 8/4 = 16/8
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert config["rank_pattern"] == {"o_proj": 2}
    assert config["alpha_pattern"] == {"o_proj": 8}
    assert config["target_modules"] == ["gate_up_proj", "o_proj", "qkv_proj"]
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk == config and peft.LoraConfig.from_pretrained(str(tmp_path)).r == 8


def test_export_keys_and_block_layout(tmp_path):
    model = phi3_q_and_v()
    export_peft(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight")
    assert len(keys) == 12 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys} == {"lora_A", "lora_B"}
    layer = model.model.layers[0].self_attn.qkv_proj
    assert torch.equal(a, layer.lora_A)  # A: the slices' A, stacked
    assert b.shape == (96, 8)  # B: q rows use columns 0:4, v rows 4:8, k rows are zero
    assert torch.equal(b[:64, :4], layer.lora_B[:64]) and not b[:64, 4:].any()
    assert not b[64:80].any()
    assert torch.equal(b[80:, 4:], layer.lora_B[64:]) and not b[80:, :4].any()


@pytest.mark.parametrize("mode", ["rslora", "mixed"])
def test_peft_loads_rslora_exports(tmp_path, mode):
    model = tiny_phi3()
    lora_layers.inject_lora(model, fused={"qkv_proj": "qv"}, r=4, lora_alpha=8, use_rslora=True)
    lora_layers.inject_lora(
        model, ["o_proj", "down_proj"], r=3, lora_alpha=5, use_rslora=mode == "rslora"
    )
    fill_all_(model).eval()
    config = export_peft(model, tmp_path)

    assert config["use_rslora"] is (mode == "rslora")
    torch.testing.assert_close(peft_logits(tmp_path), logits(model), **TOL)


class Mixed(nn.Module):
    """Embedding, Conv1d, Conv2d and Linear layers in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv1d(6, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, tokens, image):
        h = self.conv(self.emb(tokens).transpose(1, 2)).mean(-1)  # (B, 8)
        return torch.cat([self.fc(h), self.conv2(image).flatten(1)], dim=-1)


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_embedding_and_conv_round_trip_through_peft(tmp_path, bias):
    torch.manual_seed(0)
    base_state = Mixed().state_dict()
    model = Mixed()
    model.load_state_dict(base_state)
    lora_layers.inject_lora(model, ["emb", "conv", "conv2", "fc"], r=2, lora_alpha=4, bias=bias)
    fill_all_(model).eval()
    if bias != "none":  # trained biases travel with the adapter
        with torch.no_grad():
            for name in ("conv", "conv2", "fc"):
                getattr(model, name).bias.add_(0.5)
    tokens, image = torch.randint(0, 20, (3, 5)), torch.randn(3, 2, 7, 7)
    with torch.no_grad():
        ours = model(tokens, image)
    config = export_peft(model, tmp_path, bias=bias)
    assert config["bias"] == bias

    base = Mixed()
    base.load_state_dict(base_state)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()(tokens, image)
    torch.testing.assert_close(theirs, ours, **TOL)

    back = Mixed()
    back.load_state_dict(base_state)
    report = import_peft(back.eval(), tmp_path)
    assert sorted(report.injected_modules) == ["conv", "conv2", "emb", "fc"]
    with torch.no_grad():
        assert torch.equal(back(tokens, image), ours)


def test_export_refuses_what_peft_cannot_represent(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, dilation=2))
    lora_layers.inject_lora(model, ["0"], r=2)
    with pytest.raises(AdapterError, match="groups=2, dilation=\\(2, 2\\)"):
        export_peft(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- import
def make_peft_adapter(directory, use_rslora=False, **overrides):
    """Save an adapter made by PEFT itself (random non-zero B) and return PEFT's logits."""
    torch.manual_seed(3)
    kwargs = dict(
        r=4,
        lora_alpha=8,
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"down_proj": 3},
        init_lora_weights=False,
        use_rslora=use_rslora,
    )
    kwargs.update(overrides)
    model = peft.get_peft_model(tiny_phi3(), peft.LoraConfig(**kwargs)).eval()
    model.save_pretrained(str(directory))
    return logits(model)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_import_peft_made_adapter_gives_peft_logits(tmp_path, use_rslora):
    theirs = make_peft_adapter(tmp_path, use_rslora=use_rslora)
    model = tiny_phi3()

    report = import_peft(model, tmp_path)

    assert report.ok and len(report.injected_modules) == 9  # 4 per layer + embed_tokens
    o_proj = model.model.layers[0].self_attn.o_proj
    down = model.model.layers[0].mlp.down_proj
    assert (o_proj.r, o_proj.lora_alpha, o_proj.use_rslora) == (2, 8, use_rslora)
    assert (down.r, down.lora_alpha) == (4, 3)
    assert isinstance(model.model.embed_tokens, lora_layers.Embedding)
    torch.testing.assert_close(logits(model), theirs, **TOL)
    assert not torch.allclose(theirs, logits(tiny_phi3()), **TOL)


def test_import_of_our_export_keeps_logits(tmp_path):
    model = phi3_q_and_v()
    export_peft(model, tmp_path)
    fresh = tiny_phi3()
    import_peft(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), **TOL)


def test_import_into_the_wrong_model_raises_and_changes_nothing(tmp_path):
    make_peft_adapter(tmp_path)
    other = tiny_phi3(hidden_size=32, intermediate_size=48)
    before = snapshot(other)

    with pytest.raises(AdapterLoadError) as info:
        import_peft(other, tmp_path)

    assert len(info.value.report.shape_mismatches) == 9
    assert "model.embed_tokens.weight" in str(info.value)
    assert_unchanged(other, before)


def test_import_reports_renamed_and_missing_peft_keys(tmp_path):
    make_peft_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    prefix = "base_model.model.model.layers.1."
    tensors[prefix + "self_attn.o_proj.lora_A.wieght"] = tensors.pop(
        prefix + "self_attn.o_proj.lora_A.weight"
    )
    tensors.pop(prefix + "mlp.down_proj.lora_B.weight")
    save_file(tensors, str(path))
    model = tiny_phi3()
    before = snapshot(model)

    with pytest.raises(AdapterLoadError) as info:
        import_peft(model, tmp_path)

    message = str(info.value)
    assert "model.layers.1.self_attn.o_proj.lora_A.wieght" in message
    assert "model.layers.1.self_attn.o_proj" in message
    assert "model.layers.1.mlp.down_proj" in message
    assert_unchanged(model, before)


def test_import_refuses_pickled_weights_unless_allowed(tmp_path):
    # (DoRA adapters import since DoRA landed: tests/test_dora_interop.py.)
    theirs = make_peft_adapter(tmp_path / "bin")
    tensors = load_file(str(tmp_path / "bin" / "adapter_model.safetensors"))
    torch.save(tensors, tmp_path / "bin" / "adapter_model.bin")
    (tmp_path / "bin" / "adapter_model.safetensors").unlink()
    model = tiny_phi3()
    with pytest.raises(AdapterError, match="allow_pickle=True"):
        import_peft(model, tmp_path / "bin")
    import_peft(model, tmp_path / "bin", allow_pickle=True)
    torch.testing.assert_close(logits(model), theirs, **TOL)


# --------------------------------------------------------------------------- pattern order
class SameLeaf(nn.Module):
    """A top-level ``fc`` and a nested ``z.fc``: PEFT's pattern ``fc`` matches both."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.z = nn.Module()
        self.z.fc = nn.Linear(6, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        return self.b(self.a(self.z.fc(self.fc(x))))


@pytest.mark.parametrize("differ", ["alpha", "rank"])
def test_export_patterns_for_fc_and_nested_z_fc_give_peft_our_outputs(tmp_path, differ):
    # PEFT takes the first matching pattern key in file order, so the file must keep the
    # order the patterns were checked in (z\.fc before fc), not sorted keys.
    torch.manual_seed(0)
    base_state = SameLeaf().state_dict()
    model = SameLeaf()
    model.load_state_dict(base_state)
    pattern = {"z.fc": 8, "fc": 3} if differ == "rank" else {"z.fc": 16, "fc": 8}
    kwargs = {"rank_pattern" if differ == "rank" else "alpha_pattern": pattern}
    lora_layers.inject_lora(model, ["fc", "a", "b"], r=2, lora_alpha=4, **kwargs)
    fill_all_(model).eval()
    x = torch.randn(3, 6)
    config = export_peft(model, tmp_path)

    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    key = "rank_pattern" if differ == "rank" else "alpha_pattern"
    assert list(on_disk[key]) == list(config[key])  # the checked order is the written order
    base = SameLeaf()
    base.load_state_dict(base_state)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()(x)
        torch.testing.assert_close(theirs, model(x), **TOL)


# --------------------------------------------------------------------------- GPT-2 (Conv1D)
GPT2_IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0
    )
    config.eos_token_id = 0
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def gpt2_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(GPT2_IDS).logits


def test_gpt2_conv1d_save_lora_loads_into_a_fresh_gpt2(tmp_path):
    model = tiny_gpt2()
    lora_layers.inject_lora(model, ["c_proj", "c_fc"], r=2, lora_alpha=4, fused={"c_attn": "qv"})
    fill_all_(model)
    path = lora_layers.save_lora(model, tmp_path / "gpt2.safetensors")
    fresh = tiny_gpt2()

    report = lora_layers.load_lora(fresh, path)

    assert report.ok and len(report.injected_modules) == 8  # 4 per block
    attn = fresh.transformer.h[0].attn.c_attn
    assert isinstance(attn, lora_layers.MergedLinear) and attn.fan_in_fan_out
    assert torch.equal(gpt2_logits(fresh), gpt2_logits(model))
    assert not torch.allclose(gpt2_logits(fresh), gpt2_logits(tiny_gpt2()), **TOL)


def test_import_peft_gpt2_adapter_gives_peft_logits(tmp_path):
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny_gpt2(), config).eval()
    theirs.save_pretrained(str(tmp_path))
    fresh = tiny_gpt2()

    report = import_peft(fresh, tmp_path)

    assert report.ok and len(report.injected_modules) == 8  # 4 per block
    assert fresh.transformer.h[1].mlp.c_fc.fan_in_fan_out
    torch.testing.assert_close(gpt2_logits(fresh), gpt2_logits(theirs), **TOL)
    assert not torch.allclose(gpt2_logits(fresh), gpt2_logits(tiny_gpt2()), **TOL)
