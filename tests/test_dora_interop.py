"""DoRA in adapter files and PEFT interop, with PEFT 0.21.2 itself as the oracle (fp32, 1e-5).

A tiny Llama (q/k/v separate) and a tiny Phi-3 (fused ``qkv_proj``) with random weights: PEFT's
trained DoRA adapters import with PEFT's logits; identical SGD steps on both sides end in equal
A, B and magnitudes; our exports load in PEFT with our logits; ``merge_and_unload`` equals the
adapter model; ``save_lora`` / ``load_lora`` round trips are bit-identical; and every malformed
DoRA file is refused with each offender named. Per-slice DoRA on Phi-3's q and v has no PEFT
twin on Phi-3 (PEFT's DoRA spans the whole ``qkv_proj``), so it is trained against PEFT on the
Llama with the same weights (q/k/v split out of ``qkv_proj``), via ``split_fused``.
"""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lora_layers
from lora_layers import (
    AdapterError,
    AdapterLoadError,
    FusedSpec,
    LayerSpec,
    LoRAConfig,
    adapter_from_model,
    export_peft,
    fuse_separate,
    import_peft,
    inject_lora,
    load_lora,
    save_lora,
    split_fused,
)
from lora_layers.adapters import METADATA_KEY
from lora_layers.layer_spec import config_from_json, config_to_json
from lora_layers.peft_interop import read_peft
from tests.helpers import (
    TOLERANCES,
    fill_all_,
    lora_tiny_phi3,
    phi3_ids,
    tiny_phi3,
    tiny_phi3_config,
)

RTOL, ATOL = TOLERANCES[torch.float32]
TOL = {"rtol": RTOL, "atol": ATOL}
IDS = phi3_ids()
TRAIN_IDS = phi3_ids(batch=2, seq=9, seed=1)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: threads only wait here
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


# --------------------------------------------------------------------------- models
def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with the tiny Phi-3's sizes, seeded, in eval mode."""
    c = tiny_phi3_config()
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def llama_like_phi3() -> LlamaForCausalLM:
    """The tiny Llama holding :func:`tiny_phi3`'s weights: ``qkv_proj`` / ``gate_up_proj`` split."""
    phi3, llama = tiny_phi3(), tiny_llama()
    c = phi3.config
    head = c.hidden_size // c.num_attention_heads
    sizes = [c.num_attention_heads * head, c.num_key_value_heads * head] + [
        c.num_key_value_heads * head
    ]
    state = {}
    for key, value in phi3.state_dict().items():
        if key.endswith("qkv_proj.weight"):
            for part, t in zip("qkv", value.split(sizes), strict=True):
                state[key.replace("qkv_proj", f"{part}_proj")] = t
        elif key.endswith("gate_up_proj.weight"):
            gate, up = value.chunk(2)
            state[key.replace("gate_up_proj", "gate_proj")] = gate
            state[key.replace("gate_up_proj", "up_proj")] = up
        else:
            state[key] = value
    llama.load_state_dict(state)
    return llama


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb_magnitudes_(model, seed: int = 7):
    """Move every magnitude off ``||W||`` (its value at injection), so it matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers.lora_modules(model):
            m = layer.lora_magnitude
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
    return model


def dora_llama():
    model = inject_lora(tiny_llama(), LLAMA_TARGETS, r=4, lora_alpha=8, use_dora=True)
    torch.manual_seed(100)
    return perturb_magnitudes_(fill_all_(model))


def dora_phi3(fused: bool = True):
    if fused:  # per-slice DoRA on q and v of qkv_proj
        model = lora_tiny_phi3(["o_proj", "down_proj"], fused={"qkv_proj": "qv"}, use_dora=True)
    else:  # DoRA over the whole fused matrices, as PEFT has it
        model = lora_tiny_phi3(PHI3_TARGETS, use_dora=True)
    return perturb_magnitudes_(model)


MODELS = {"llama": (dora_llama, tiny_llama), "phi3_qv": (dora_phi3, tiny_phi3)}


def sgd_steps(model, steps: int = 3, optimizer: str = "sgd") -> None:
    """``steps`` SGD (lr 0.5) or AdamW (lr 1e-3) steps on the LM loss of :data:`TRAIN_IDS`."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=TRAIN_IDS, labels=TRAIN_IDS).loss.backward()
        opt.step()
    model.eval()


def peft_weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    assert any(k.endswith("lora_magnitude_vector") for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], **TOL, msg=key)


# --------------------------------------------------------------------------- (a) import
def train_peft_dora(base, targets, directory, steps: int = 3):
    """A PEFT DoRA adapter (random non-zero B) trained ``steps`` AdamW steps, then saved."""
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False
    )
    model = peft.get_peft_model(base, config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=TRAIN_IDS, labels=TRAIN_IDS).loss.backward()
        opt.step()
    model.save_pretrained(str(directory))
    return model


@pytest.mark.parametrize(
    ("build", "targets"),
    [(tiny_llama, LLAMA_TARGETS), (tiny_phi3, PHI3_TARGETS)],
    ids=["llama", "phi3"],
)
def test_peft_trained_dora_adapter_imports_with_peft_logits(tmp_path, build, targets):
    theirs = train_peft_dora(build(), targets, tmp_path)
    ours = build()

    report = import_peft(ours, tmp_path)

    assert report.ok and all(layer.use_dora for _, layer in lora_layers.lora_modules(ours))
    saved = peft_weights(tmp_path)
    key = next(k for k in saved if k.endswith("lora_B.weight"))
    assert saved[key].abs().min() > 0  # B non-zero everywhere
    for mode in ("train", "eval"):  # dropout is 0: both modes must agree exactly
        getattr(ours, mode)(), getattr(theirs, mode)()
        torch.testing.assert_close(logits(ours), logits(theirs), **TOL)
    # The magnitudes matter: with them at ||W + sBA|| the logits differ.
    for _, layer in lora_layers.lora_modules(ours):
        layer.reset_dora_magnitude()
    assert not torch.allclose(logits(ours), logits(theirs), **TOL)


def test_peft_q_and_v_dora_adapter_loads_into_phi3_fused_qkv_with_peft_logits(tmp_path):
    """PEFT's DoRA on a Llama's q_proj / v_proj becomes per-slice DoRA on Phi-3's qkv_proj."""
    theirs = train_peft_dora(llama_like_phi3(), ["q_proj", "v_proj", "o_proj"], tmp_path)
    separate = read_peft(tmp_path)
    fused = fuse_separate(separate, split_sizes={"qkv_proj": (64, 16, 16)})
    ours = tiny_phi3()

    load_lora(ours, fused)

    qkv = ours.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, lora_layers.MergedLinear) and qkv.use_dora
    assert qkv.enable_lora == (True, False, True) and qkv.lora_magnitude.shape == (80,)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        torch.testing.assert_close(logits(ours), logits(theirs), **TOL)


# --------------------------------------------------------------------------- (b) training
@pytest.mark.parametrize(
    ("kind", "optimizer"),
    [("llama", "sgd"), ("llama", "adamw"), ("phi3_whole_matrix", "sgd")],
)
def test_identical_optimizer_steps_end_in_peft_tensors(tmp_path, kind, optimizer):
    if kind == "llama":
        ours, base = dora_llama(), tiny_llama()
    else:
        ours, base = dora_phi3(fused=False), tiny_phi3()
    export_peft(ours, tmp_path / "start")
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "start"), is_trainable=True)

    sgd_steps(ours, optimizer=optimizer)
    sgd_steps(theirs, optimizer=optimizer)

    export_peft(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert_same_tensors(peft_weights(tmp_path / "ours"), peft_weights(tmp_path / "theirs"))
    start, end = peft_weights(tmp_path / "start"), peft_weights(tmp_path / "ours")
    for key in start:  # every tensor, magnitudes included, was trained
        assert not torch.allclose(start[key], end[key], **TOL), key


def test_fused_q_and_v_sgd_steps_match_peft_on_the_same_weights_unfused(tmp_path):
    """Per-slice DoRA on Phi-3's q and v trains as PEFT's DoRA on a Llama's q_proj and v_proj."""
    ours = dora_phi3(fused=True)
    split = split_fused(adapter_from_model(ours), split_sizes={"qkv_proj": (64, 16, 16)})
    twin = llama_like_phi3()
    load_lora(twin, split)
    torch.testing.assert_close(logits(twin), logits(ours), **TOL)
    export_peft(twin, tmp_path / "start")
    theirs = peft.PeftModel.from_pretrained(
        llama_like_phi3(), str(tmp_path / "start"), is_trainable=True
    )

    sgd_steps(ours)
    sgd_steps(theirs)

    trained = llama_like_phi3()
    load_lora(trained, split_fused(adapter_from_model(ours)))
    export_peft(trained, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert_same_tensors(peft_weights(tmp_path / "ours"), peft_weights(tmp_path / "theirs"))
    torch.testing.assert_close(logits(ours), logits(theirs), **TOL)
    qkv = ours.model.layers[0].self_attn.qkv_proj
    assert qkv.lora_magnitude.shape == (64 + 16,)  # q and v rows only


# --------------------------------------------------------------------------- (c) export
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_dora_exports_load_in_peft_with_our_logits(tmp_path, kind):
    build, base = MODELS[kind]
    ours = build()

    config = export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path))

    assert config["use_dora"] is True
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        torch.testing.assert_close(logits(theirs), logits(ours), **TOL)
    assert not torch.allclose(logits(ours), logits(base()), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_export_gives_disabled_rows_their_weight_norm(tmp_path, dtype):
    ours = perturb_magnitudes_(
        lora_tiny_phi3(["o_proj"], fused={"qkv_proj": "qv"}, use_dora=True, dtype=dtype)
    )
    export_peft(ours, tmp_path)
    qkv = ours.model.layers[0].self_attn.qkv_proj
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_magnitude_vector"
    m = peft_weights(tmp_path)[key]

    # float32 even for a bf16 adapter: PEFT takes the norm in float32 (autocast_adapter_dtype)
    assert m.shape == (96,) and m.dtype == torch.float32
    assert torch.equal(m[:64], qkv.lora_magnitude[:64].float())
    assert torch.equal(m[80:], qkv.lora_magnitude[64:].float())
    assert torch.equal(m[64:80], torch.linalg.norm(qkv.weight[64:80].float(), dim=1))
    # PEFT's k rows are exactly the base's k rows (factor m / ||W_k|| == 1), as ours are.
    x = torch.randn(3, 64, dtype=dtype)
    theirs = peft.PeftModel.from_pretrained(tiny_phi3(dtype=dtype), str(tmp_path))
    peft_qkv = theirs.base_model.model.model.layers[0].self_attn.qkv_proj
    with torch.no_grad():
        base_k = torch.nn.functional.linear(x, qkv.weight)[:, 64:80]
        assert torch.equal(peft_qkv(x)[:, 64:80], base_k)
        assert torch.equal(qkv(x)[:, 64:80], base_k)


class SmallNet(torch.nn.Module):
    """An embedding, a conv and a linear: DoRA on every kind PEFT has it for."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(12, 6)
        self.conv = torch.nn.Conv1d(6, 5, 3, padding=1)
        self.fc = torch.nn.Linear(5, 4)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.fc(torch.relu(h))


def test_embedding_and_conv_dora_round_trip_through_peft(tmp_path):
    ours = inject_lora(SmallNet(), ["emb", "conv", "fc"], r=2, lora_alpha=4, use_dora=True)
    torch.manual_seed(1)
    perturb_magnitudes_(fill_all_(ours))
    ids = torch.randint(0, 12, (2, 7))
    export_peft(ours, tmp_path)
    assert peft_weights(tmp_path)["base_model.model.conv.lora_magnitude_vector"].shape == (1, 5, 1)

    theirs = peft.PeftModel.from_pretrained(SmallNet(), str(tmp_path)).eval()
    back = SmallNet()
    import_peft(back, tmp_path)

    with torch.no_grad():
        torch.testing.assert_close(theirs(ids), ours(ids), **TOL)
        assert torch.equal(back(ids), ours(ids))


def tiny_gpt2():
    """A seeded GPT-2: its ``Conv1D`` layers store weights ``(in, out)`` (``fan_in_fan_out``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    config.bos_token_id = config.eos_token_id = 0
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("fused", [True, False], ids=["c_attn_qv", "c_attn_whole"])
def test_gpt2_conv1d_dora_round_trips_through_peft(tmp_path, fused):
    layout = {"fused": {"c_attn": "qv"}} if fused else {}
    targets = ["c_proj"] if fused else ["c_attn", "c_proj"]
    ours = inject_lora(tiny_gpt2(), targets, r=2, lora_alpha=4, use_dora=True, **layout)
    torch.manual_seed(1)
    perturb_magnitudes_(fill_all_(ours))
    ids = torch.randint(0, 64, (2, 8))

    export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    back = tiny_gpt2()
    import_peft(back, tmp_path)

    want = logits(ours, ids)
    torch.testing.assert_close(logits(theirs, ids), want, **TOL)
    torch.testing.assert_close(logits(back, ids), want, **TOL)
    assert not torch.allclose(logits(tiny_gpt2(), ids), want, **TOL)


# --------------------------------------------------------------------------- (d) merge
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_merge_and_unload_equals_the_dora_model(kind):
    build, _ = MODELS[kind]
    model = build()
    want = logits(model)

    merged = lora_layers.merge_and_unload(model)

    assert not list(lora_layers.lora_modules(merged))
    torch.testing.assert_close(logits(merged), want, **TOL)


# --------------------------------------------------------------------------- (e) files
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_save_load_round_trip_is_bit_identical(tmp_path, kind):
    build, base = MODELS[kind]
    ours = build()
    path = save_lora(ours, tmp_path / "a.safetensors")

    plain = base()
    report = load_lora(plain, path)  # DoRA layers injected from the metadata
    existing = build()  # already DoRA layers, other values
    perturb_magnitudes_(existing, seed=11)
    load_lora(existing, path, inject=False)

    want = logits(ours)
    assert report.ok and report.injected_modules
    for model in (plain, existing):
        assert torch.equal(logits(model), want)
        for (name, layer), (_, orig) in zip(
            lora_layers.lora_modules(model), lora_layers.lora_modules(ours), strict=True
        ):
            assert layer.use_dora, name
            for leaf in ("lora_A", "lora_B", "lora_magnitude"):
                assert torch.equal(getattr(layer, leaf), getattr(orig, leaf)), (name, leaf)


def test_metadata_carries_use_dora_and_the_format_version(tmp_path):
    dora = save_lora(dora_llama(), tmp_path / "dora.safetensors")
    plain = save_lora(inject_lora(tiny_llama(), LLAMA_TARGETS, r=4), tmp_path / "plain.safetensors")
    with safe_open(str(dora), framework="pt") as f:
        doc = json.loads(f.metadata()[METADATA_KEY])
        keys = set(f.keys())
    assert doc["format_version"] == 2
    assert all(spec["use_dora"] is True for spec in doc["modules"].values())
    assert "model.layers.0.self_attn.q_proj.lora_magnitude" in keys
    with safe_open(str(plain), framework="pt") as f:
        doc = json.loads(f.metadata()[METADATA_KEY])
    # A plain LoRA file is format 1, field for field: older readers still read it.
    assert doc["format_version"] == 1
    assert all("use_dora" not in spec for spec in doc["modules"].values())
    spec = lora_layers.read_adapter(dora).modules["model.layers.0.self_attn.q_proj"]
    assert (
        spec.use_dora and spec.config.use_dora and spec.tensor_shapes()["lora_magnitude"] == (64,)
    )


def test_a_meta_initialised_dora_model_saved_before_any_forward_stores_real_magnitudes(
    tmp_path,
):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    inject_lora(model, ["0"], r=2, use_dora=True)
    model.to_empty(device="cpu")  # W and the magnitude are uninitialised memory now
    torch.manual_seed(0)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(6, 8))
        model[0].bias.zero_()
    want = torch.linalg.norm(model[0].weight, dim=1)  # B = 0: what a first forward would use

    saved = lora_layers.read_adapter(save_lora(model, tmp_path / "a.safetensors"))
    export_peft(model, tmp_path / "peft")

    torch.testing.assert_close(saved.tensors["0.lora_magnitude"], want, **TOL)
    peft_m = peft_weights(tmp_path / "peft")["base_model.model.0.lora_magnitude_vector"]
    torch.testing.assert_close(peft_m, want, **TOL)


def test_every_lora_config_field_round_trips_through_the_metadata():
    """One mapping config <-> JSON: every field (the later ones too) set off its default."""
    config = LoRAConfig(
        r=3,
        lora_alpha=5,
        lora_dropout=0.25,
        use_rslora=True,
        merge_weights=True,
        lora_dtype=torch.bfloat16,
        fused=FusedSpec((4, 2), (True, False)),
        use_dora=True,
    )
    off_default = {
        f.name for f in dataclasses.fields(LoRAConfig) if getattr(config, f.name) != f.default
    }
    assert off_default == {f.name for f in dataclasses.fields(LoRAConfig)}
    data = json.loads(json.dumps(config_to_json(config)))

    assert config_from_json(data) == (config, [])
    spec = LayerSpec("MergedLinear", 8, 6, (6, 8), config)
    assert LayerSpec.from_json(spec.to_json()) == spec
    other = dataclasses.replace(spec, config=dataclasses.replace(config, use_dora=False))
    assert spec.differences(other) == ["use_dora: file True, model False"]


def test_a_format_1_file_from_the_previous_version_still_loads(tmp_path):
    """A file exactly as the previous lora_layers wrote it (fields listed by hand)."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    doc = {
        "format_version": 1,
        "library": "lora_layers",
        "bias": "none",
        "biases": [],
        "base_weights": [],
        "modules": {
            "0": {
                "layer": "Linear", "r": 2, "lora_alpha": 4, "use_rslora": False,
                "lora_dropout": 0.0, "fan_in_fan_out": False, "merge_weights": False,
                "in_features": 8, "out_features": 6, "weight_shape": [6, 8], "dtype": "float32",
            }
        },
    }  # fmt: skip
    path = tmp_path / "v1.safetensors"
    meta = {"format": "pt", METADATA_KEY: json.dumps(doc, sort_keys=True)}
    save_file({"0.lora_A": a, "0.lora_B": b}, str(path), metadata=meta)

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    load_lora(model, path)

    layer = model[0]
    assert isinstance(layer, lora_layers.Linear) and not layer.use_dora
    assert (layer.r, layer.scaling) == (2, 2.0)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.weight + 2.0 * b @ a).T + layer.bias)


# --------------------------------------------------------------------------- validation
def edit_file(src, dst, tensors_edit=None, doc_edit=None):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if tensors_edit:
        tensors_edit(tensors)
    if doc_edit:
        doc = json.loads(meta[METADATA_KEY])
        doc_edit(doc)
        meta[METADATA_KEY] = json.dumps(doc)
    save_file(tensors, str(dst), metadata=meta)
    return dst


Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def test_dora_file_onto_plain_lora_layers_and_back_names_every_module(tmp_path):
    dora = save_lora(dora_llama(), tmp_path / "dora.safetensors")
    plain_model = inject_lora(tiny_llama(), LLAMA_TARGETS, r=4, lora_alpha=8)
    plain = save_lora(plain_model, tmp_path / "plain.safetensors")

    with pytest.raises(AdapterLoadError, match="use_dora: file True, model False") as info:
        load_lora(plain_model, dora)
    assert Q0 in str(info.value) and V1 in str(info.value)
    assert "inject_lora(..., use_dora=True)" in str(info.value)
    with pytest.raises(AdapterLoadError, match="use_dora: file False, model True") as info:
        load_lora(dora_llama(), plain)
    assert Q0 in str(info.value) and V1 in str(info.value)


def test_missing_misshapen_and_non_finite_magnitudes_are_named_in_one_error(tmp_path):
    good = save_lora(dora_llama(), tmp_path / "good.safetensors")

    def edit(tensors):
        del tensors[f"{Q0}.lora_magnitude"]
        tensors[f"{V1}.lora_magnitude"] = torch.ones(3)
        tensors["model.layers.1.mlp.down_proj.lora_magnitude"][0] = float("nan")

    bad = edit_file(good, tmp_path / "bad.safetensors", tensors_edit=edit)
    model = tiny_llama()
    with pytest.raises(AdapterLoadError) as info:
        load_lora(model, bad)
    message = str(info.value)
    assert f"{Q0}.lora_magnitude" in message and "described in the file's metadata" in message
    assert f"{V1}.lora_magnitude" in message and "file (3,), metadata" in message
    assert "down_proj.lora_magnitude: holds 1 NaN/Inf" in message
    assert not list(lora_layers.lora_modules(model))  # nothing injected


def test_magnitude_in_a_file_whose_metadata_is_not_dora_is_refused(tmp_path):
    good = save_lora(dora_llama(), tmp_path / "good.safetensors")

    def not_dora(doc):
        for spec in doc["modules"].values():
            spec.pop("use_dora")

    bad = edit_file(good, tmp_path / "bad.safetensors", doc_edit=not_dora)
    with pytest.raises(AdapterLoadError, match=f"{Q0}.lora_magnitude.*is not a DoRA layer"):
        load_lora(tiny_llama(), bad)


def test_bad_use_dora_value_in_metadata_is_refused(tmp_path):
    good = save_lora(dora_llama(), tmp_path / "good.safetensors")

    def yes(doc):
        doc["modules"][Q0]["use_dora"] = "yes"

    bad = edit_file(good, tmp_path / "bad.safetensors", doc_edit=yes)
    with pytest.raises(AdapterLoadError, match="use_dora must be true or false, got 'yes'"):
        load_lora(tiny_llama(), bad)


def test_bare_state_dict_magnitudes_are_checked_against_the_layers():
    source = dora_llama()
    dora = lora_layers.lora_state_dict(source)
    target = perturb_magnitudes_(dora_llama(), seed=5)
    lora_layers.load_lora_state_dict(target, dora)  # DoRA layers: magnitudes load too
    assert torch.equal(logits(target), logits(source))
    plain_model = inject_lora(tiny_llama(), LLAMA_TARGETS, r=4, lora_alpha=8)
    with pytest.raises(AdapterLoadError, match=f"{Q0}.*is not a DoRA layer"):
        lora_layers.load_lora_state_dict(plain_model, dora)
    without = {k: v for k, v in dora.items() if not k.endswith("lora_magnitude")}
    with pytest.raises(AdapterLoadError, match=f"{Q0}.lora_magnitude.*has no magnitude"):
        lora_layers.load_lora_state_dict(dora_llama(), without)


def test_peft_magnitudes_without_use_dora_are_refused(tmp_path):
    export_peft(dora_llama(), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        AdapterLoadError, match="lora_magnitude_vector but adapter_config.json"
    ) as info:
        import_peft(tiny_llama(), tmp_path)
    assert Q0 in str(info.value) and V1 in str(info.value)


def test_export_refuses_dora_mixed_with_plain_lora(tmp_path):
    model = inject_lora(tiny_llama(), ["q_proj"], r=4, use_dora=True)
    inject_lora(model, ["v_proj"], r=4)
    with pytest.raises(AdapterError, match="use_dora is one setting for all layers"):
        export_peft(model, tmp_path)
