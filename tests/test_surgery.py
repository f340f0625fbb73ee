"""Module surgery: inject_lora on any nn.Module and Phi-3, fused slices, PEFT as oracle, unload."""

from __future__ import annotations

import re
import warnings
import weakref
from pathlib import Path

import peft
import pytest
import torch
import transformers
from torch import nn

import lora_layers
from lora_layers import (
    FusedSpec,
    InjectSpec,
    MergedLinear,
    count_parameters,
    inject_lora,
    lora_module_names,
    lora_modules,
    merge_and_unload,
    merge_lora,
    plan_lora,
    replace_module,
    resolve_fused,
    unload,
    unmerge_lora,
    wrap_module,
)
from tests.helpers import assert_close, logits, tiny_phi3, tiny_phi3_config
from tests.helpers import fill_all_ as randomize_lora
from tests.helpers import phi3_ids as ids

# PEFT calls a transformers method that transformers 5 deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

DOCS = Path(__file__).resolve().parents[1] / "docs"
PHI3_MINI = dict()  # Phi3Config() defaults: hidden 3072, 32 layers, 32 heads, 32 kv heads
PHI3_MEDIUM = dict(
    hidden_size=5120,
    intermediate_size=17920,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=10,
)


# --------------------------------------------------------------------------- helpers
def qkv_sizes(config) -> tuple[int, int, int]:
    head_dim = config.hidden_size // config.num_attention_heads
    return (
        config.num_attention_heads * head_dim,
        config.num_key_value_heads * head_dim,
        config.num_key_value_heads * head_dim,
    )


def meta_phi3(**overrides) -> nn.Module:
    with torch.device("meta"):
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**overrides))


def add_dense_delta(weight: torch.Tensor, rows: slice, a: torch.Tensor, b: torch.Tensor, s: float):
    """The reference: the dense update s * B @ A added to some rows of a copy's weight."""
    with torch.no_grad():
        weight[rows] += s * (b @ a)


# --------------------------------------------------------------------------- fused slices
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_qv_of_qkv_equals_dense_per_slice_delta(gqa):
    base, model, dense = tiny_phi3(gqa=gqa), tiny_phi3(gqa=gqa), tiny_phi3(gqa=gqa)
    inject_lora(model, fused={"qkv_proj": "qv"}, r=4, lora_alpha=8)
    randomize_lora(model)
    q, k, v = qkv_sizes(model.config)
    r, s = 4, 2.0
    for i, layer in enumerate(model.model.layers):
        qkv = layer.self_attn.qkv_proj
        assert isinstance(qkv, MergedLinear) and qkv.split_sizes == (q, k, v)
        w = dense.model.layers[i].self_attn.qkv_proj.weight
        add_dense_delta(w, slice(0, q), qkv.lora_A[:r], qkv.lora_B[:q], s)
        add_dense_delta(w, slice(q + k, q + k + v), qkv.lora_A[r:], qkv.lora_B[q:], s)

    captured = []
    hooks = [
        layer.self_attn.qkv_proj.register_forward_hook(
            lambda m, inp, out: captured.append((inp[0], out))
        )
        for layer in model.model.layers
    ]
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(dense, x), rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()
    assert len(captured) == len(model.model.layers)
    for layer, (inp, out) in zip(base.model.layers, captured, strict=True):
        with torch.no_grad():
            ref = layer.self_attn.qkv_proj(inp)
        assert torch.equal(out[..., q : q + k], ref[..., q : q + k])  # k: bit-identical
        assert not torch.equal(out[..., :q], ref[..., :q])


@pytest.mark.parametrize("half", ["gate", "up"])
def test_gate_up_half_equals_dense_delta_other_half_bit_identical(half):
    base, model, dense = tiny_phi3(), tiny_phi3(), tiny_phi3()
    inject_lora(model, fused={"gate_up_proj": half}, r=4, lora_alpha=4)
    randomize_lora(model)
    n = model.config.intermediate_size
    on, off = (slice(0, n), slice(n, 2 * n)) if half == "gate" else (slice(n, 2 * n), slice(0, n))
    captured = []
    for i, layer in enumerate(model.model.layers):
        proj = layer.mlp.gate_up_proj
        assert proj.split_sizes == (n, n)
        assert proj.enable_lora == ((True, False) if half == "gate" else (False, True))
        w = dense.model.layers[i].mlp.gate_up_proj.weight
        add_dense_delta(w, on, proj.lora_A, proj.lora_B, 1.0)
        proj.register_forward_hook(lambda m, inp, out: captured.append((inp[0], out)))
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(dense, x), rtol=1e-5, atol=1e-5)
    for layer, (inp, out) in zip(base.model.layers, captured, strict=True):
        with torch.no_grad():
            ref = layer.mlp.gate_up_proj(inp)
        assert torch.equal(out[..., off], ref[..., off])


@pytest.mark.parametrize(
    ("overrides", "sizes"),
    [(PHI3_MINI, (3072, 3072, 3072)), (PHI3_MEDIUM, (5120, 1280, 1280))],
    ids=["phi3-mini-mha", "phi3-medium-gqa"],
)
def test_one_line_qv_resolves_sizes_from_config(overrides, sizes):
    model = meta_phi3(**overrides)
    inject_lora(model, fused={"qkv_proj": "qv"}, r=16, lora_alpha=32)
    names = lora_module_names(model)
    assert len(names) == model.config.num_hidden_layers
    assert all(n.endswith("self_attn.qkv_proj") for n in names)
    for _, layer in lora_modules(model):
        assert layer.split_sizes == sizes and layer.enable_lora == (True, False, True)


def test_fused_slice_spellings_and_explicit_spec():
    module = tiny_phi3().model.layers[0].self_attn.qkv_proj  # GQA: q 64, k 16, v 16
    config = tiny_phi3_config()
    want = FusedSpec((64, 16, 16), (True, False, True))
    for value in ("qv", "q,v", "v+q", ["q", "v"], (True, False, True)):
        assert resolve_fused("x.qkv_proj", module, value, config) == want
    assert resolve_fused("qkv_proj", module, "all", config).enable_lora == (True, True, True)
    # A dict config works too, and explicit sizes work on any name.
    cfg = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64}
    assert resolve_fused("qkv_proj", module, "k", cfg).enable_lora == (False, True, False)
    spec = FusedSpec((32, 64), (False, True))
    assert resolve_fused("my_fused", module, spec) == spec


# --------------------------------------------------------------------------- PEFT oracle
def _copy_into_peft(model: nn.Module, peft_model: nn.Module) -> None:
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, layer in lora_modules(model):
            target = inner.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)


@pytest.mark.parametrize("target", ["o_proj", "down_proj", "qkv_proj"])
def test_plain_targets_match_peft(target):
    model, reference = tiny_phi3(), tiny_phi3()
    inject_lora(model, target, r=4, lora_alpha=8)
    randomize_lora(model)
    config = peft.LoraConfig(target_modules=[target], r=4, lora_alpha=8, init_lora_weights=False)
    peft_model = peft.get_peft_model(reference, config).eval()
    _copy_into_peft(model, peft_model)
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(peft_model, x), rtol=1e-6, atol=1e-6)
    assert count_parameters(model)[0] == peft_model.get_nb_trainable_parameters()[0]


def test_all_linear_targets_what_peft_targets():
    model, reference = tiny_phi3(), tiny_phi3()
    inject_lora(model, "all-linear", r=4, lora_alpha=8)
    config = peft.LoraConfig(target_modules="all-linear", r=4, lora_alpha=8)
    peft_model = peft.get_peft_model(reference, config)
    peft_names = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert set(lora_module_names(model)) == peft_names
    assert "lm_head" not in peft_names
    assert count_parameters(model) == peft_model.get_nb_trainable_parameters()


def test_gpt2_conv1d_all_linear_and_fused_c_attn_match_peft():
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32, bos_token_id=1
    )
    config.eos_token_id = 2
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.load_state_dict(model.state_dict())
    inject_lora(model, "all-linear", r=4, lora_alpha=8)
    randomize_lora(model)
    peft_config = peft.LoraConfig(
        target_modules="all-linear", r=4, lora_alpha=8, init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that it sets fan_in_fan_out for Conv1D
        peft_model = peft.get_peft_model(reference, peft_config).eval()
    _copy_into_peft(model, peft_model)
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(peft_model, x), rtol=1e-6, atol=1e-6)
    assert count_parameters(model) == peft_model.get_nb_trainable_parameters()
    # q and v of GPT-2's fused c_attn (equal thirds); unload restores the Conv1D class.
    unload(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    inject_lora(model, fused={"c_attn": "qv"}, r=2, lora_alpha=2)
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.fan_in_fan_out and c_attn.split_sizes == (32, 32, 32)
    model(input_ids=x)


# --------------------------------------------------------------------------- meta skeletons
def test_meta_phi3_mini_all_linear_r16_counts_and_stays_on_meta():
    model = meta_phi3()
    weights = {n: p for n, p in model.named_parameters()}
    inject_lora(model, target_modules="all-linear", r=16, lora_alpha=32)
    assert count_parameters(model)[0] == 25_165_824
    assert len(lora_module_names(model)) == 4 * 32
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    for name, p in model.named_parameters():  # the base Parameters are the same objects
        if name in weights:
            assert p is weights[name]


def qv_formula(config, r: int) -> int:
    """The count docs/phi3.md gives: layers * r * (2 * hidden + q_size + v_size)."""
    q, _, v = qkv_sizes(config)
    return config.num_hidden_layers * r * (2 * config.hidden_size + q + v)


@pytest.mark.parametrize("overrides", [PHI3_MINI, PHI3_MEDIUM], ids=["mini", "medium"])
def test_meta_qv_only_count_equals_docs_formula(overrides):
    model = meta_phi3(**overrides)
    inject_lora(model, fused={"qkv_proj": "qv"}, r=16, lora_alpha=32)
    assert count_parameters(model)[0] == qv_formula(model.config, 16)


def _table_counts() -> dict[tuple[str, str], int]:
    """Parse the trainable-parameter table of docs/phi3.md: (model, setting) -> count."""
    rows = {}
    for line in (DOCS / "phi3.md").read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("Phi-3-") and re.fullmatch(r"[\d,]+", cells[2]):
            rows[(cells[0], cells[1])] = int(cells[2].replace(",", ""))
    return rows


def test_docs_phi3_table_matches_meta_skeletons():
    settings = {
        "all-linear, r=16": dict(target_modules="all-linear", r=16, lora_alpha=32),
        "q,v of qkv_proj, r=16": dict(fused={"qkv_proj": "qv"}, r=16, lora_alpha=32),
        "whole qkv_proj, r=16": dict(target_modules="qkv_proj", r=16, lora_alpha=32),
    }
    table = _table_counts()
    assert len(table) == 6, table
    for model_name, overrides in (("Phi-3-mini", PHI3_MINI), ("Phi-3-medium", PHI3_MEDIUM)):
        config = transformers.Phi3Config(**overrides)
        d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        q, kv, _ = qkv_sizes(config)
        formulas = {  # the per-setting formulas of docs/phi3.md
            "all-linear, r=16": n * 16 * (4 * d + 2 * q + 2 * kv + 3 * f),
            "q,v of qkv_proj, r=16": qv_formula(config, 16),
            "whole qkv_proj, r=16": n * 16 * (d + q + 2 * kv),
        }
        for setting, kwargs in settings.items():
            model = inject_lora(meta_phi3(**overrides), **kwargs)
            count = count_parameters(model)[0]
            assert table[(model_name, setting)] == count == formulas[setting], setting


# --------------------------------------------------------------------------- target forms
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(target_modules="model.layers.1.self_attn.o_proj"), ["1.self_attn.o_proj"]),
        (dict(target_modules=["o_proj", "down_proj"]), ["0.self_attn.o_proj", "0.mlp.down_proj"]),
        (dict(target_modules=r".*\.1\.(self_attn|mlp)\.(o|down)_proj"), ["1.self_attn.o_proj"]),
        (
            dict(target_modules=re.compile(r"model\.layers\.0\.mlp\..*_proj")),
            ["0.mlp.gate_up_proj"],
        ),
        (dict(target_modules=nn.Linear), ["0.self_attn.qkv_proj", "lm_head"]),
        (dict(target_modules=nn.Embedding), ["model.embed_tokens"]),
        (dict(target_modules="all-linear", exclude_modules=["mlp.down_proj", r".*\.0\..*"]), []),
    ],
    ids=["exact", "suffixes", "regex", "compiled-regex", "type", "embedding", "exclude"],
)
def test_target_forms(kwargs, expected):
    model = tiny_phi3()
    inject_lora(model, r=2, **kwargs)
    names = lora_module_names(model)
    for e in expected:
        assert any(n.endswith(e) for n in names), (e, names)
    if "exclude_modules" in kwargs:
        assert names == [
            "model.layers.1.self_attn.o_proj",  # named_modules order
            "model.layers.1.self_attn.qkv_proj",
            "model.layers.1.mlp.gate_up_proj",
        ]


def test_rank_and_alpha_patterns_fused_and_plan():
    model = tiny_phi3()
    kwargs = dict(
        target_modules="all-linear",
        r=8,
        lora_alpha=16,
        fused={"qkv_proj": "qv"},
        rank_pattern={"layers.0.mlp.down_proj": 2, "down_proj": 4, "gate_up_proj": 0},
        alpha_pattern={r".*o_proj": 1},
    )
    plan = plan_lora(model, **kwargs)
    assert not lora_module_names(model)  # planning changes nothing
    inject_lora(model, **kwargs)
    assert list(plan) == lora_module_names(model)
    layers = dict(lora_modules(model))
    assert layers["model.layers.0.mlp.down_proj"].r == 2  # the first matching key wins
    assert layers["model.layers.1.mlp.down_proj"].r == 4
    assert "model.layers.0.mlp.gate_up_proj" not in layers  # r=0 leaves a module out
    assert layers["model.layers.0.self_attn.o_proj"].scaling == 1 / 8
    assert layers["model.layers.0.self_attn.qkv_proj"].enable_lora == (True, False, True)
    for name, layer in layers.items():
        assert InjectSpec.from_layer(layer) == plan[name]


def test_fp32_lora_on_bf16_base():
    model = tiny_phi3(dtype=torch.bfloat16)
    dense = tiny_phi3(dtype=torch.bfloat16)
    inject_lora(model, fused={"qkv_proj": "qv"}, lora_dtype=torch.float32, r=4, lora_alpha=8)
    randomize_lora(model)
    for _, layer in lora_modules(model):
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        assert layer.weight.dtype == torch.bfloat16
    out = logits(model, ids())
    assert out.dtype == torch.bfloat16
    for (_, layer), ref in zip(lora_modules(model), dense.model.layers, strict=True):
        w = ref.self_attn.qkv_proj.weight
        w.data = (w.float() + layer.delta_weight()).to(torch.bfloat16)
    assert_close(out, logits(dense, ids()))
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    for _, layer in lora_modules(model):
        assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    inject_lora(model, "0", r=2)
    assert model[0] is model[2] and isinstance(model[0], lora_layers.Linear)
    unload(model)
    assert model[0] is model[2] and type(model[0]) is nn.Linear and model[0].weight is shared.weight


def test_second_name_of_a_shared_module_is_a_target():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert list(plan_lora(model, "2", r=2)) == ["0"]  # listed under its first name
    inject_lora(model, "2", r=2)
    assert model[0] is model[2] and isinstance(model[0], lora_layers.Linear)


def test_excluding_a_container_excludes_every_layer_inside_it():
    model = tiny_phi3()
    inject_lora(model, "all-linear", exclude_modules="layers.0")
    names = lora_module_names(model)
    assert names and not [n for n in names if n.startswith("model.layers.0.")]
    assert "model.layers.1.self_attn.o_proj" in names
    # a regex naming containers works the same way; so does a module type
    model = inject_lora(tiny_phi3(), "all-linear", exclude_modules=r".*\.mlp")
    assert not [n for n in lora_module_names(model) if ".mlp." in n]
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    with pytest.raises(ValueError, match="no module left to wrap"):
        inject_lora(tiny_phi3(), "all-linear", exclude_modules=Phi3DecoderLayer)


def test_excluding_a_module_no_target_selects_is_allowed():
    # all-linear already leaves out lm_head; excluding it too (a PEFT habit) is not an error
    model = inject_lora(tiny_phi3(), "all-linear", exclude_modules=["lm_head", "embed_tokens"])
    assert "lm_head" not in lora_module_names(model)


def test_embedding_and_conv_injection_and_unload_keep_parameters():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Conv1d(6, 4, 3), nn.Conv2d(1, 2, 3))
    params = dict(model.named_parameters())
    inject_lora(model, [nn.Embedding, nn.Conv1d, nn.Conv2d], r=2, lora_dropout=0.1)
    assert [type(m) for m in model] == [
        lora_layers.Embedding,
        lora_layers.Conv1d,
        lora_layers.Conv2d,
    ]
    assert model[1].dropout_p == 0.1
    unload(model)
    assert [type(m) for m in model] == [nn.Embedding, nn.Conv1d, nn.Conv2d]
    assert all(p is params[n] for n, p in model.named_parameters())


def test_replace_module_and_wrap_module_for_other_callers():
    model = tiny_phi3()
    name = "model.layers.1.mlp.gate_up_proj"
    old = model.get_submodule(name)
    spec = InjectSpec(r=2, lora_alpha=4, fused=resolve_fused(name, old, "up"))
    layer = wrap_module(old, spec, name)
    assert replace_module(model, name, layer) is old
    assert model.get_submodule(name) is layer and layer.weight is old.weight
    assert lora_module_names(model) == [name]
    unload(model)
    assert model.get_submodule(name).weight is old.weight


def test_unload_rebuilds_hand_built_lora_layers():
    model = nn.Sequential(
        lora_layers.Linear(4, 3, r=2, bias=False),
        lora_layers.Embedding(5, 4, r=2, padding_idx=0),
        lora_layers.Conv2d(1, 2, 3, r=1, stride=2),
        lora_layers.Linear(3, 4, r=2, fan_in_fan_out=True),
    )
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in unload(model).state_dict().items()}
    assert [type(m).__name__ for m in model] == ["Linear", "Embedding", "Conv2d", "Conv1D"]
    assert type(model[0]) is nn.Linear and model[0].bias is None
    assert model[1].padding_idx == 0 and model[2].stride == (2, 2)
    assert set(state) == {n for n in params if "lora_" not in n}
    assert all(p is params[n] for n, p in model.named_parameters())


# --------------------------------------------------------------------------- merge / unload
def test_merge_and_unload_keys_shapes_and_outputs():
    original = tiny_phi3()
    model = tiny_phi3()
    keys = {k: v.shape for k, v in original.state_dict().items()}
    inject_lora(model, "all-linear", r=4, lora_alpha=8, fused={"qkv_proj": "qv"})
    randomize_lora(model)
    x = ids()
    expected = logits(model, x)
    merged = merge_and_unload(model)
    assert merged is model and type(model) is type(original)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert not any(isinstance(m, lora_layers.LoRALayer) for m in model.modules())
    assert type(model.model.layers[0].self_attn.qkv_proj) is nn.Linear
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(logits(model, x), logits(original, x))


def test_merge_and_unload_frees_the_replaced_weights():
    model = inject_lora(tiny_phi3(), "all-linear", r=2)
    old = [weakref.ref(layer.weight) for _, layer in lora_modules(model)]
    merge_and_unload(model)
    assert all(ref() is None for ref in old)


def test_unload_restores_original_parameters_bit_identical():
    original = tiny_phi3()
    model = tiny_phi3()
    params = dict(model.named_parameters())
    inject_lora(model, "all-linear", r=4, fused={"gate_up_proj": "gate"})
    randomize_lora(model)
    merge_lora(model)  # unload also drops merged weights
    unload(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    state = model.state_dict()
    assert state.keys() == original.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())
    x = ids()
    assert torch.equal(logits(model, x), logits(original, x))
    assert "_lora_input_grads_hook" not in model.__dict__
    assert not model.model.embed_tokens._forward_hooks


def test_merge_lora_is_explicit_and_eval_does_not_merge_by_default():
    model = tiny_phi3()
    inject_lora(model, "all-linear", r=4)
    randomize_lora(model)
    layers = [m for _, m in lora_modules(model)]
    model.train()
    model.eval()
    assert not any(m.merged for m in layers)  # merge_weights=False by default
    x = ids()
    unmerged = logits(model, x)
    assert merge_lora(model) is model and all(m.merged for m in layers)
    torch.testing.assert_close(logits(model, x), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    assert not any(m.merged for m in layers)
    inject_lora(tiny_phi3(), "o_proj", merge_weights=True).eval()  # loralib's contract on request


def test_generate_and_save_pretrained_keep_working(tmp_path):
    model = tiny_phi3()
    inject_lora(model, "all-linear", r=4, lora_alpha=8, fused={"qkv_proj": "qv"})
    randomize_lora(model)
    assert type(model) is transformers.Phi3ForCausalLM
    x = ids(batch=1, seq=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    tokens = model.generate(x, **kwargs)
    assert tokens.shape == (1, 9)
    model.save_pretrained(tmp_path / "lora")  # the LoRA model itself saves
    assert (tmp_path / "lora" / "model.safetensors").exists()
    expected = logits(model, x)
    merge_and_unload(model)
    assert torch.equal(model.generate(x, **kwargs), tokens)
    model.save_pretrained(tmp_path / "merged")
    loaded, info = transformers.Phi3ForCausalLM.from_pretrained(
        tmp_path / "merged", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(logits(loaded.eval(), x), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_warns_on_tied_weights_and_keeps_outputs():
    model = tiny_phi3(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inject_lora(model, "embed_tokens", r=2)
    randomize_lora(model)
    x = ids()
    expected = logits(model, x)
    with pytest.warns(UserWarning, match="tied"):
        merge_and_unload(model)
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- errors
def test_target_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"'qkv' matched no module.*'qkv_proj'.*o_proj"):
        inject_lora(tiny_phi3(), ["o_proj", "qkv"])
    with pytest.raises(ValueError, match="fused key 'q_proj' matched no module"):
        inject_lora(tiny_phi3(), fused={"q_proj": "qv"})
    with pytest.raises(ValueError, match="exclude_modules entry 'nope' matched no"):
        inject_lora(tiny_phi3(), "all-linear", exclude_modules="nope")
    with pytest.raises(ValueError, match="rank_pattern key 'lm_head' matched none"):
        inject_lora(tiny_phi3(), "o_proj", rank_pattern={"lm_head": 2})
    with pytest.raises(ValueError, match="target 'all-linear' matched no module"):
        inject_lora(nn.Sequential(nn.Embedding(3, 3)), "all-linear")
    with pytest.raises(ValueError, match="give target_modules"):
        inject_lora(tiny_phi3())


def test_double_injection_raises():
    model = inject_lora(tiny_phi3(), "qkv_proj")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.qkv_proj' already has LoRA"):
        inject_lora(model, "all-linear")
    inject_lora(model, "o_proj")  # other layers are fine


def test_unsupported_types_raise_naming_the_type():
    with pytest.raises(TypeError, match=r"Phi3RMSNorm is not supported"):
        inject_lora(tiny_phi3(), "input_layernorm")
    with pytest.raises(
        TypeError, match=r"Phi3Attention is not supported.*target its layers instead"
    ):
        inject_lora(tiny_phi3(), "self_attn")

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="Scaled subclasses Linear but changes its forward"):
        inject_lora(nn.Sequential(Scaled(2, 2)), "0")
    with pytest.raises(ValueError, match="MultiheadAttention uses its projection weights"):
        inject_lora(nn.Sequential(nn.MultiheadAttention(4, 2)), "out_proj")
    mha = nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4))
    assert lora_module_names(inject_lora(mha, "all-linear")) == ["1"]  # out_proj is skipped
    mha = nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4))
    assert lora_module_names(inject_lora(mha, nn.Linear)) == ["1"]


def test_bad_fused_specs_raise():
    with pytest.raises(ValueError, match=r"unknown slice name\(s\) \['x'\].*\('q', 'k', 'v'\)"):
        inject_lora(tiny_phi3(), fused={"qkv_proj": "qx"})
    with pytest.raises(
        ValueError, match="no known slice layout for 'model.layers.0.self_attn.o_proj'"
    ):
        inject_lora(tiny_phi3(), fused={"o_proj": "qv"})
    with pytest.raises(ValueError, match="summing to 96, but .* out_features=192"):
        inject_lora(tiny_phi3(gqa=False), fused={"qkv_proj": "qv"}, config=tiny_phi3_config())
    with pytest.raises(ValueError, match="enables no slice"):
        FusedSpec((2, 2), (False, False))
    block = nn.Module()
    block.qkv_proj = nn.Linear(8, 24)
    with pytest.raises(ValueError, match="no config with num_attention_heads"):
        inject_lora(block, fused={"qkv_proj": "qv"})
    inject_lora(
        block, fused={"qkv_proj": "qv"}, config={"num_attention_heads": 2, "hidden_size": 8}
    )
    assert block.qkv_proj.split_sizes == (8, 8, 8)
    with pytest.raises(ValueError, match="fused slices only apply to linear layers"):
        inject_lora(tiny_phi3(), fused={"embed_tokens": (True, False)})
