"""QLoRA: LoRA on bitsandbytes 4-bit / 8-bit bases, as transformers loads them (CPU backend).

The oracles are a dense reference written here (``dequantize(W)`` and ``W + s * B @ A``) and
PEFT's own QLoRA on an identically loaded model, with identical non-zero A and B.
"""

from __future__ import annotations

import subprocess
import sys

import bitsandbytes as bnb
import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BitsAndBytesConfig, Phi3ForCausalLM

import lora_layers
from lora_layers import (
    LoRALinear4bit,
    LoRALinear8bitLt,
    QuantizedLoRALinear,
    export_peft,
    import_peft,
    inject_lora,
    load_lora,
    lora_modules,
    merge_and_unload,
    save_lora,
)
from lora_layers.functional import dropout_keep_probability
from lora_layers.quantized import keep_mask
from tests.helpers import (
    LoRARowInt8,
    RowInt8Linear,
    assert_close,
    fill_all_,
    saved_tensor_bytes,
    tiny_phi3,
)

TOL = {"rtol": 1e-4, "atol": 1e-4}
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny fp32 Phi-3 saved once; every quantized model here is loaded from it."""
    directory = tmp_path_factory.mktemp("tiny_phi3")
    tiny_phi3().save_pretrained(directory)
    return directory


def load(base_dir, bits: int = 4, dtype=torch.float32, quant_type="nf4", double_quant=True):
    """The tiny Phi-3 loaded by transformers in 4-bit or 8-bit on the CPU, in train mode."""
    if bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = Phi3ForCausalLM.from_pretrained(
        base_dir, quantization_config=config, device_map="cpu", dtype=dtype
    )
    return model.train()


def load_dense(base_dir, dtype=torch.float32):
    return Phi3ForCausalLM.from_pretrained(base_dir, dtype=dtype).train()


def peft_model(model, **kwargs):
    config = peft.LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **kwargs})
    return peft.get_peft_model(model, config)


def copy_from_peft(ours: nn.Module, theirs: peft.PeftModel) -> None:
    """Give our LoRA layers PEFT's (random, non-zero) A and B."""
    for name, layer in lora_modules(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def loss_backward(model: nn.Module) -> torch.Tensor:
    out = model(IDS).logits
    out.square().mean().backward()
    return out.detach()


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor of the state dict (packed weights and quant states included)."""
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in model.state_dict().items()
        if ".lora_" not in k
    }


def dequantized(layer: QuantizedLoRALinear) -> torch.Tensor:
    w = layer.weight
    if isinstance(layer, LoRALinear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return w.data.float() * (layer.base_layer.state.SCB.float().unsqueeze(1) / 127.0)


# --------------------------------------------------------------------------- dependency
def test_import_lora_layers_does_not_import_bitsandbytes():
    code = (
        "import sys, lora_layers; "
        "bad = {'bitsandbytes', 'transformers', 'peft'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- injection
@pytest.mark.parametrize(
    "quant_type, double_quant", [("nf4", True), ("fp4", False)], ids=["nf4-dq", "fp4"]
)
def test_all_linear_4bit_matches_peft_qlora_logits_and_grads(base_dir, quant_type, double_quant):
    ours = inject_lora(
        load(base_dir, quant_type=quant_type, double_quant=double_quant),
        "all-linear",
        r=4,
        lora_alpha=8,
    )
    theirs = peft_model(
        load(base_dir, quant_type=quant_type, double_quant=double_quant),
        target_modules="all-linear",
    )
    peft_names = [n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert lora_layers.lora_module_names(ours) == peft_names and len(peft_names) == 8
    trainable_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert lora_layers.count_parameters(ours)[0] == trainable_peft
    layer = ours.model.layers[0].self_attn.o_proj
    assert isinstance(layer, LoRALinear4bit) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.lora_A.dtype == torch.float32  # the QLoRA default
    copy_from_peft(ours, theirs)

    torch.testing.assert_close(loss_backward(ours), loss_backward(theirs), **TOL)
    for name, layer in lora_modules(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, **TOL
        )
        torch.testing.assert_close(
            layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, **TOL
        )
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_bf16_compute_with_fp32_lora_matches_peft(base_dir):
    ours = inject_lora(load(base_dir, dtype=torch.bfloat16), "all-linear", r=4, lora_alpha=8)
    theirs = peft_model(load(base_dir, dtype=torch.bfloat16), target_modules="all-linear")
    copy_from_peft(ours, theirs)
    layer = ours.model.layers[0].mlp.down_proj
    assert layer.lora_A.dtype == torch.float32 and layer.base_dtype() == torch.bfloat16
    assert_close(loss_backward(ours), loss_backward(theirs))
    for name, layer in lora_modules(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert layer.lora_B.grad.dtype == torch.float32
        assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, torch.bfloat16)


def test_lora_dtype_overrides_the_fp32_default(base_dir):
    model = inject_lora(load(base_dir, dtype=torch.bfloat16), ["o_proj"], lora_dtype=torch.bfloat16)
    assert model.model.layers[1].self_attn.o_proj.lora_B.dtype == torch.bfloat16


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_layer_matches_dense_reference_forward_and_backward(base_dir, p):
    layer = inject_lora(
        load(base_dir), ["layers.0.mlp.down_proj"], r=4, lora_alpha=8, lora_dropout=p
    )
    layer = fill_all_(layer).model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, 96, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)  # the same draw as the layer's keep-mask
    keep = keep_mask(torch.Size((10, 96)), p, x.device).view(2, 5, 96) if p else 1.0
    xr = x.detach().clone().requires_grad_(True)
    a, b = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B))
    w = dequantized(layer)
    q = dropout_keep_probability(p)  # 1 - p to 2**-17: the mask's realised keep rate
    ref = F.linear(xr, w) + layer.scaling * F.linear(F.linear(xr * keep / q, a), b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    y.backward(grad)
    ref.backward(grad)
    for got, want in ((x.grad, xr.grad), (layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_lora_branch_saves_only_the_input_h_and_the_mask(base_dir, p):
    layer = inject_lora(load(base_dir), ["layers.0.mlp.down_proj"], lora_dropout=p)
    layer = layer.model.layers[0].mlp.down_proj
    frozen = layer.base_layer
    x = torch.randn(64, 96, requires_grad=True)
    params = [t for t in (*layer.parameters(), *layer.buffers())]
    base_bytes = saved_tensor_bytes(lambda: frozen(x), exclude=params)
    ours = saved_tensor_bytes(lambda: layer(x), exclude=params)
    n, r = x.shape[0], layer.r
    expected = x.numel() * 4 + n * r * 4 + (x.numel() // 8 if p else 0)  # x, h, 1-bit mask
    assert base_bytes == 0  # bitsandbytes keeps only a reference to the packed weight
    assert ours == expected


def test_adamw_steps_change_only_lora_and_never_the_quantized_bytes(base_dir):
    model = inject_lora(load(base_dir), "all-linear", r=4, lora_alpha=8, lora_dropout=0.05)
    before = quantized_state(model)
    lora_before = {k: v.clone() for k, v in lora_layers.lora_state_dict(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {
        id(p) for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)
    }
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    after = quantized_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    states = [m.weight.quant_state for _, m in lora_modules(model)]
    assert all(s.absmax.dtype == torch.uint8 and s.nested for s in states)  # still double-quant
    changed = [
        not torch.equal(v, lora_before[k]) for k, v in lora_layers.lora_state_dict(model).items()
    ]
    assert all(changed)


def test_fused_q_and_v_on_4bit_qkv_leaves_k_bit_identical(base_dir):
    model = inject_lora(load(base_dir), fused={"qkv_proj": "qv"}, r=4, lora_alpha=8)
    layer = fill_all_(model).model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, LoRALinear4bit) and layer.split_sizes == (64, 16, 16)
    spec = lora_layers.InjectSpec.from_layer(layer)
    assert spec.fused == lora_layers.FusedSpec((64, 16, 16), (True, False, True))
    assert spec.lora_dtype == torch.float32
    x = torch.randn(3, 64)
    y = layer(x)
    base = layer.base_layer(x)
    assert torch.equal(y[:, 64:80], base[:, 64:80])  # k: bit-identical to the 4-bit output
    a_q, a_v = layer.lora_A.split(4)
    b_q, b_v = layer.lora_B[:64], layer.lora_B[64:]
    w = dequantized(layer)
    ref = F.linear(x, w)
    ref[:, :64] += layer.scaling * x @ a_q.T @ b_q.T
    ref[:, 80:] += layer.scaling * x @ a_v.T @ b_v.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y[:, 80:], base[:, 80:])  # the update matters


# --------------------------------------------------------------------------- files
def test_adapter_moves_between_4bit_and_dense_bases_both_ways(base_dir, tmp_path):
    quant = fill_all_(
        inject_lora(load(base_dir), ["o_proj"], fused={"qkv_proj": "qv"}, r=4, lora_alpha=8)
    )
    save_lora(quant, tmp_path / "from4bit.safetensors")
    dense = load_dense(base_dir)
    report = load_lora(dense, tmp_path / "from4bit.safetensors")
    assert report.ok and len(report.injected_modules) == 4
    assert type(dense.model.layers[0].self_attn.qkv_proj) is lora_layers.MergedLinear
    assert type(dense.model.layers[0].self_attn.o_proj) is lora_layers.Linear
    ours, theirs = lora_layers.adapter_from_model(quant), lora_layers.adapter_from_model(dense)
    assert ours.modules == theirs.modules
    assert all(torch.equal(ours.tensors[k], theirs.tensors[k]) for k in ours.tensors)

    save_lora(dense, tmp_path / "fromdense.safetensors")  # and back onto a fresh 4-bit base
    fresh = load(base_dir)
    assert load_lora(fresh, tmp_path / "fromdense.safetensors").ok
    assert isinstance(fresh.model.layers[1].self_attn.qkv_proj, LoRALinear4bit)
    torch.testing.assert_close(logits(fresh), logits(quant), rtol=0, atol=0)


def test_peft_loads_our_4bit_export_and_we_import_peft_qlora(base_dir, tmp_path):
    ours = fill_all_(inject_lora(load(base_dir), "all-linear", r=4, lora_alpha=8))
    export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load(base_dir), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(theirs), logits(ours), **TOL)

    qlora = peft_model(load(base_dir), target_modules=["qkv_proj", "down_proj"], r=2, lora_alpha=4)
    qlora.save_pretrained(tmp_path / "peft")
    fresh = load(base_dir)
    report = import_peft(fresh, tmp_path / "peft")
    assert report.ok and len(report.injected_modules) == 4
    assert isinstance(fresh.model.layers[0].mlp.down_proj, LoRALinear4bit)
    torch.testing.assert_close(logits(fresh), logits(qlora), **TOL)


def test_fused_4bit_export_loads_in_peft(base_dir, tmp_path):
    ours = fill_all_(inject_lora(load(base_dir), fused={"qkv_proj": "qv"}, r=4, lora_alpha=8))
    export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(load(base_dir), str(tmp_path))
    torch.testing.assert_close(logits(theirs), logits(ours), **TOL)


# --------------------------------------------------------------------------- merging
def test_merge_and_unload_gives_dense_linears_equal_to_the_adapter_model(base_dir):
    model = fill_all_(inject_lora(load(base_dir), "all-linear", fused={"qkv_proj": "qv"}))
    model.eval()
    expected = logits(model)
    layer = model.model.layers[0].mlp.gate_up_proj
    want = (dequantized(layer) + layer.delta_weight()).to(torch.float32)
    merge_and_unload(model)
    merged = model.model.layers[0].mlp.gate_up_proj
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert torch.equal(merged.weight, want)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, QuantizedLoRALinear)) for m in model.modules())
    torch.testing.assert_close(logits(model), expected, **TOL)


def test_requantizing_the_merge_loses_the_update(base_dir):
    """What PEFT's merge into a 4-bit base does: dequantize, add, quantize again."""
    model = fill_all_(inject_lora(load(base_dir), "all-linear"), std=0.05)
    for _, layer in lora_modules(model):
        w, state = layer.weight, layer.weight.quant_state
        dense = dequantized(layer)
        delta = layer.delta_weight()
        packed, new_state = bnb.functional.quantize_4bit(
            dense + delta, blocksize=state.blocksize, quant_type=state.quant_type
        )
        requant = bnb.functional.dequantize_4bit(packed, new_state)
        lost = (requant - dense - delta).norm() / delta.norm()
        ours = (layer.get_merged_weight() - dense - delta).norm() / delta.norm()
        assert lost > 0.1 and ours < 1e-6, (lost, ours)
        assert w.quant_state is state  # nothing in the layer was touched


def test_merge_lora_in_place_on_4bit_raises_and_unload_restores_the_base(base_dir):
    model = load(base_dir)
    keys = list(model.state_dict())
    original = model.model.layers[0].self_attn.o_proj
    inject_lora(model, "all-linear")
    with pytest.raises(
        RuntimeError, match="cannot merge LoRA in place into a quantized Linear4bit"
    ):
        lora_layers.merge_lora(model)
    lora_layers.unload(model)
    assert model.model.layers[0].self_attn.o_proj is original
    assert list(model.state_dict()) == keys


def test_merge_weights_true_is_ignored_with_a_warning(base_dir):
    with pytest.warns(UserWarning, match="merge_weights=True is ignored on a quantized Linear4bit"):
        model = inject_lora(load(base_dir), ["o_proj"], merge_weights=True)
    fill_all_(model)
    before = logits(model.train())
    model.eval()
    assert not model.model.layers[0].self_attn.o_proj.merged
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_disable_adapters_gives_the_4bit_base_output(base_dir):
    model = fill_all_(inject_lora(load(base_dir), "all-linear"))
    with lora_layers.disable_adapters(model):
        off = logits(model)
    torch.testing.assert_close(off, logits(load(base_dir)), rtol=0, atol=0)


# --------------------------------------------------------------------------- 8-bit
def test_8bit_matches_peft_merges_exactly_and_never_changes_int8(base_dir):
    ours = inject_lora(load(base_dir, bits=8), "all-linear", r=4, lora_alpha=8)
    theirs = peft_model(load(base_dir, bits=8), target_modules="all-linear")
    assert lora_layers.lora_module_names(ours) == [
        n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")
    ]
    layer = ours.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, LoRALinear8bitLt) and layer.weight.dtype == torch.int8
    copy_from_peft(ours, theirs)
    before = quantized_state(ours)
    torch.testing.assert_close(loss_backward(ours), loss_backward(theirs), **TOL)
    for name, layer in lora_modules(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, **TOL
        )
    torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad]).step()
    after = quantized_state(ours)
    assert all(torch.equal(after[k], v) for k, v in before.items())

    # In eval mode bitsandbytes' int8 matmul also rounds the activations to int8; in train
    # mode (no grad here) it computes with CB * SCB / 127, which the dense merge reproduces.
    expected = logits(ours)
    merge_and_unload(ours)
    assert type(ours.model.layers[0].self_attn.qkv_proj) is nn.Linear
    torch.testing.assert_close(logits(ours), expected, **TOL)


# --------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_lora_grads(base_dir, reentrant):
    grads = []
    for checkpointing in (False, True):
        model = inject_lora(load(base_dir), "all-linear", r=4, lora_alpha=8, lora_dropout=0.1)
        torch.manual_seed(3)
        fill_all_(model)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        torch.manual_seed(4)
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- kinds
def test_unsupported_quantized_kind_is_a_type_error_listing_supported_kinds():
    model = nn.Sequential(nn.Linear(8, 8), bnb.nn.OutlierAwareLinear(8, 8))
    with pytest.raises(
        TypeError,
        match=r"'1'.*OutlierAwareLinear is a quantized layer kind.*"
        r"bitsandbytes\.nn\.modules\.Linear4bit",
    ):
        inject_lora(model, "all-linear")


def test_int_weight_linear_is_refused_not_wrapped_as_float():
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="Linear is a quantized layer kind lora_layers does not"):
        inject_lora(nn.Sequential(layer), ["0"])


def test_unquantized_linear4bit_and_fp16_weight_8bit_are_refused():
    with pytest.raises(TypeError, match="Linear4bit is not quantized yet"):
        inject_lora(nn.Sequential(bnb.nn.Linear4bit(64, 64)), ["0"])
    with pytest.raises(TypeError, match="has_fp16_weights=True"):
        inject_lora(nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True)), ["0"])


def test_a_new_quantized_kind_is_one_class_and_one_registry_entry(monkeypatch):
    monkeypatch.setitem(lora_layers.QUANTIZED_LINEARS, RowInt8Linear, LoRARowInt8)
    w = torch.randn(6, 8)
    model = nn.Sequential(RowInt8Linear(w))
    inject_lora(model, "all-linear", r=2, lora_alpha=4)
    layer = fill_all_(model)[0]
    assert isinstance(layer, LoRARowInt8)
    x = torch.randn(3, 8)
    ref = F.linear(x, layer.dequantize() + layer.delta_weight())
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    merge_and_unload(model)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_a_quantized_kind_registered_by_dotted_path_resolves_on_first_lookup():
    """The lazy form bitsandbytes is registered with: one table entry, resolved on use."""
    table, path = lora_layers.QUANTIZED_LINEARS, f"{RowInt8Linear.__module__}.RowInt8Linear"
    saved = dict(table)
    try:
        lora_layers.register_quantized_linear(path, LoRARowInt8)
        assert path in lora_layers.supported_quantized_kinds() and RowInt8Linear not in table
        model = inject_lora(nn.Sequential(RowInt8Linear(torch.randn(6, 8))), "all-linear", r=2)
        assert isinstance(model[0], LoRARowInt8)
        assert table[RowInt8Linear] is LoRARowInt8 and path not in table
    finally:
        table.clear()
        table.update(saved)


@pytest.mark.parametrize("base", ["RowInt8Linear", 3], ids=["undotted", "int"])
def test_register_refuses_a_base_that_is_neither_class_nor_dotted_path(base):
    with pytest.raises(TypeError, match=f"class or a dotted import path, got {base!r}"):
        lora_layers.register_quantized_linear(base, LoRARowInt8)
