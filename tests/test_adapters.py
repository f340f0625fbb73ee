"""Adapter files: bit-exact round trips, one error for every corruption, no pickle, atomic writes."""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import loralib
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import lora_layers
from lora_layers import (
    AdapterError,
    AdapterLoadError,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    read_adapter,
    save_lora,
)
from lora_layers.adapters import FORMAT_VERSION, METADATA_KEY, normalize_key
from tests.helpers import (
    assert_close,
    assert_unchanged,
    fill_all_,
    fill_lora_,
    logits,
    phi3_q_and_v,
    snapshot,
    tiny_phi3,
)

PACKAGE = Path(lora_layers.__file__).parent


# --------------------------------------------------------------------------- helpers
def rewrite(src: Path, dst: Path, tensors=None, metadata=None) -> Path:
    """Copy an adapter file, editing its tensors and/or its metadata JSON on the way."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if tensors is not None:
        data = tensors(data)
    doc = json.loads(meta[METADATA_KEY])
    if metadata is not None:
        doc = metadata(doc)
    meta[METADATA_KEY] = json.dumps(doc)
    safetensors.torch.save_file(data, str(dst), metadata=meta)
    return dst


class Net(nn.Module):
    """A small model with every layer type lora_layers has."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv1 = nn.Conv1d(12, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.qkv = nn.Linear(12, 24)
        self.out = nn.Linear(24 + 4 + 2, 6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)  # (B, T, 12)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)  # (B, T, 12)
        q = self.qkv(h).mean(1)  # (B, 24)
        img = h[:, :4, :9].reshape(-1, 1, 6, 6)  # (B*2, 1, 6, 6)
        c2 = self.conv2(img).mean((2, 3)).view(h.shape[0], -1, 4).mean(1)  # (B, 4)
        vol = h[:, :4, :8].reshape(-1, 1, 2, 4, 4)  # (B, 1, 2, 4, 4)
        c3 = self.conv3(vol).mean((2, 3, 4))  # (B, 2)
        return self.out(torch.cat([q, c2, c3], dim=-1))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def lora_net(seed: int = 0, **kw) -> Net:
    """``net(seed)`` with LoRA on every layer (q and v slices of ``qkv``), random A and B."""
    model = net(seed)
    fused = {"qkv": lora_layers.FusedSpec((8, 8, 8), (True, False, True))}
    lora_layers.inject_lora(
        model, ["emb", "conv1", "conv2", "conv3", "out"], r=2, lora_alpha=4, fused=fused, **kw
    )
    torch.manual_seed(seed + 100)
    return fill_all_(model)


TOKENS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- round trips
LAYER_CASES = {
    "linear": lambda: nn.Linear(16, 8),
    "merged": lambda: nn.Linear(16, 20),
    "embedding": lambda: nn.Embedding(30, 8, padding_idx=0),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1),
    "conv2d": lambda: nn.Conv2d(4, 6, (3, 2), stride=2, groups=2),
    "conv3d": lambda: nn.Conv3d(2, 4, 2),
}
INPUTS = {
    "linear": lambda: torch.randn(3, 16),
    "merged": lambda: torch.randn(3, 16),
    "embedding": lambda: torch.randint(0, 30, (3, 5)),
    "conv1d": lambda: torch.randn(2, 4, 7),
    "conv2d": lambda: torch.randn(2, 4, 6, 6),
    "conv3d": lambda: torch.randn(2, 2, 4, 4, 4),
}


def wrap(kind: str, base: nn.Module, **kw) -> lora_layers.LoRALayer:
    if kind == "merged":
        kw.update(enable_lora=(True, False, True), split_sizes=(8, 4, 8))
        return lora_layers.MergedLinear.from_module(base, **kw)
    cls = {"linear": lora_layers.Linear, "embedding": lora_layers.Embedding}.get(kind)
    cls = cls or {"conv1d": lora_layers.Conv1d, "conv2d": lora_layers.Conv2d}.get(kind)
    return (cls or lora_layers.Conv3d).from_module(base, **kw)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_rslora": True, "lora_alpha": 3},
        {"lora_dtype": torch.bfloat16},
        {"merge_weights": False, "lora_alpha": 2.5},
    ],
    ids=["plain", "rslora", "bf16_lora", "no_merge"],
)
@pytest.mark.parametrize("kind", sorted(LAYER_CASES))
def test_round_trip_bit_exact_every_layer_type(tmp_path, kind, options, mode):
    torch.manual_seed(0)
    base = LAYER_CASES[kind]()
    fresh = nn.Sequential(LAYER_CASES[kind]())
    fresh.load_state_dict({f"0.{k}": v for k, v in base.state_dict().items()})
    model = nn.Sequential(fill_lora_(wrap(kind, base, r=3, **options)))
    getattr(model, mode)()
    getattr(fresh, mode)()
    x = INPUTS[kind]()
    save_lora(model, tmp_path / "a.safetensors")

    report = load_lora(fresh, tmp_path / "a.safetensors")

    assert report.ok and report.injected_modules == ["0"]
    assert type(fresh[0]) is type(model[0])
    assert fresh[0].merged == model[0].merged
    for name in ("lora_A", "lora_B"):
        got, want = getattr(fresh[0], name), getattr(model[0], name)
        assert got.dtype == want.dtype and torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_round_trip_into_existing_lora_layers_remerges(tmp_path):
    """fan_in_fan_out layers (built by the constructor) load into matching layers; merged
    layers are re-merged, so eval outputs are bit-exact too."""
    torch.manual_seed(0)
    kw = dict(r=4, lora_alpha=8, fan_in_fan_out=True)
    model = nn.Sequential(fill_lora_(lora_layers.Linear(16, 8, **kw))).eval()
    target = nn.Sequential(lora_layers.Linear(16, 8, **kw)).eval()
    target[0].weight.data.copy_(model[0].weight)
    target[0].bias.data.copy_(model[0].bias)
    assert target[0].merged
    save_lora(model, tmp_path / "a.safetensors")

    load_lora(target, tmp_path / "a.safetensors")

    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(target(x), model(x))


def test_round_trip_every_layer_type_in_one_model(tmp_path):
    model = lora_net().eval()
    save_lora(model, tmp_path / "a.safetensors")
    fresh = net().eval()

    report = load_lora(fresh, tmp_path / "a.safetensors")

    assert sorted(report.injected_modules) == ["conv1", "conv2", "conv3", "emb", "out", "qkv"]
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS), model(TOKENS))


@pytest.mark.parametrize("into", ["plain", "lora"])
def test_round_trip_tiny_phi3_bit_exact(tmp_path, into):
    model = phi3_q_and_v()
    save_lora(model, tmp_path / "phi3.safetensors")
    fresh = tiny_phi3() if into == "plain" else phi3_q_and_v(seed=0).eval()
    if into == "lora":  # same layers, different adapter values
        torch.manual_seed(7)
        fill_all_(fresh)
        assert not torch.equal(logits(fresh), logits(model))

    report = load_lora(fresh, tmp_path / "phi3.safetensors")

    assert report.ok
    assert len(report.injected_modules) == (6 if into == "plain" else 0)
    assert torch.equal(logits(fresh), logits(model))
    assert lora_state_dict(fresh).keys() == lora_state_dict(model).keys()
    if into == "plain":  # injected layers unload to the original modules
        plain = lora_layers.unload(fresh)
        assert plain.state_dict().keys() == tiny_phi3().state_dict().keys()
        assert torch.equal(logits(plain), logits(tiny_phi3()))


def test_file_holds_adapter_tensors_only_and_full_metadata(tmp_path):
    model = phi3_q_and_v(use_rslora=True)
    path = save_lora(model, tmp_path / "phi3.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        doc = json.loads(f.metadata()[METADATA_KEY])

    assert keys == set(lora_state_dict(model))
    assert doc["format_version"] == 1 and doc["bias"] == "none" and doc["biases"] == []
    qkv = doc["modules"]["model.layers.0.self_attn.qkv_proj"]
    assert qkv == {
        "layer": "MergedLinear",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "merge_weights": False,
        "in_features": 64,
        "out_features": 96,
        "weight_shape": [96, 64],
        "dtype": "float32",
        "enable_lora": [True, False, True],
        "split_sizes": [64, 16, 16],
        "slice_ranks": [4, 0, 4],
    }
    assert doc["modules"]["model.layers.1.self_attn.o_proj"]["r"] == 2
    assert doc["modules"]["model.layers.1.mlp.gate_up_proj"]["split_sizes"] == [96, 96]


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_modes_save_and_restore_biases(tmp_path, bias):
    model = lora_net(bias=bias)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(1.0)
    save_lora(model, tmp_path / "a.safetensors", bias=bias)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(lora_state_dict(model, bias=bias))
    fresh = net()

    load_lora(fresh, tmp_path / "a.safetensors")

    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS), model(TOKENS))


# --------------------------------------------------------------------------- corruptions
def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _rename(old, new):
    return lambda d: {(new if k == old else k): v for k, v in d.items()}


def _add(key, shape):
    return lambda d: {**d, key: torch.zeros(shape)}


def _reshape(key, shape):
    return lambda d: {**d, key: torch.zeros(shape)}


def _set_rank(module, r):
    def edit(doc):
        doc["modules"][module]["r"] = r
        return doc

    return edit


CORRUPTIONS = {
    # name: (tensor edit, metadata edit, keys/modules the error must name)
    "renamed_key": (_rename("qkv.lora_B", "qkv.lora_b"), None, ["qkv.lora_B", "qkv.lora_b"]),
    "missing_key": (_drop("conv2.lora_A"), None, ["conv2.lora_A"]),
    "extra_key": (_add("head.lora_A", (2, 4)), None, ["head.lora_A"]),
    "wrong_shape": (_reshape("out.lora_B", (6, 3)), None, ["out.lora_B"]),
    "wrong_rank_in_metadata": (None, _set_rank("emb", 3), ["emb.lora_A", "emb.lora_B"]),
    "everything_at_once": (
        lambda d: _add("head.lora_A", (2, 4))(
            _reshape("out.lora_B", (6, 3))(_drop("conv2.lora_A")(d))
        ),
        _set_rank("emb", 3),
        ["head.lora_A", "out.lora_B", "conv2.lora_A", "emb.lora_A", "emb.lora_B"],
    ),
}


@pytest.mark.parametrize("target", ["plain", "lora"])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_raises_one_error_naming_every_key_and_changes_nothing(tmp_path, case, target):
    tensors, metadata, offending = CORRUPTIONS[case]
    good = save_lora(lora_net(), tmp_path / "good.safetensors")
    bad = rewrite(good, tmp_path / "bad.safetensors", tensors, metadata)
    model = net(seed=1) if target == "plain" else lora_net(seed=1)
    before = snapshot(model)

    with pytest.raises(AdapterLoadError) as info:
        load_lora(model, bad)

    message = str(info.value)
    for key in offending:
        assert key in message, (key, message)
    assert "was not changed" in message
    assert_unchanged(model, before)


def test_renamed_key_is_listed_as_missing_and_unexpected(tmp_path):
    good = save_lora(lora_net(), tmp_path / "good.safetensors")
    bad = rewrite(good, tmp_path / "bad.safetensors", _rename("qkv.lora_B", "qkv.lora_b"))

    with pytest.raises(AdapterLoadError) as info:
        load_lora(lora_net(seed=1), bad)

    report = info.value.report
    assert report.missing_keys == ["qkv.lora_B"]
    assert report.unexpected_keys == ["qkv.lora_b"]


def test_config_mismatch_with_existing_layers_is_reported(tmp_path):
    """Same shapes, different alpha and rsLoRA: loading would silently change the scaling."""
    path = save_lora(lora_net(), tmp_path / "a.safetensors")
    model = lora_net(seed=1, use_rslora=True)
    before = snapshot(model)

    with pytest.raises(AdapterLoadError) as info:
        load_lora(model, path)

    report = info.value.report
    assert set(report.config_mismatches) == {"emb", "conv1", "conv2", "conv3", "qkv", "out"}
    assert "use_rslora: file False, model True" in str(info.value)
    assert_unchanged(model, before)


def test_model_lora_layer_without_adapter_is_a_missing_key(tmp_path):
    path = save_lora(lora_net(), tmp_path / "a.safetensors")
    target = lora_net(seed=1)
    target.extra = lora_layers.Linear(6, 3, r=2)
    before = snapshot(target)

    with pytest.raises(AdapterLoadError) as info:
        load_lora(target, path)

    report = info.value.report
    assert report.missing_keys == ["extra.lora_A", "extra.lora_B"]
    assert report.unexpected_keys == [] and report.config_mismatches == []
    assert_unchanged(target, before)


@pytest.mark.parametrize("cut", [10, 200, -40])
def test_truncated_file_raises_and_changes_nothing(tmp_path, cut):
    data = save_lora(lora_net(), tmp_path / "a.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut])
    model = net(seed=1)
    before = snapshot(model)

    with pytest.raises(AdapterLoadError, match="truncated, corrupted or not a safetensors"):
        load_lora(model, bad)

    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="not loaded"):
        report = load_lora(model, bad, strict=False)
    assert not report.ok and report.errors
    assert_unchanged(model, before)


def test_file_from_another_model_names_every_module(tmp_path):
    """A tiny-Phi-3 adapter loaded into a differently sized Phi-3 (hidden 32)."""
    path = save_lora(phi3_q_and_v(), tmp_path / "phi3.safetensors")
    other = tiny_phi3(hidden_size=32, intermediate_size=48)
    before = snapshot(other)

    with pytest.raises(AdapterLoadError) as info:
        load_lora(other, path)

    report = info.value.report
    names = [n for n in json.loads(_meta(path))["modules"]]
    assert len(names) == 6
    assert sorted(report.shape_mismatches) == sorted(f"{n}.weight" for n in names)
    assert_unchanged(other, before)


def _meta(path: Path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()[METADATA_KEY]


def test_file_from_an_unrelated_model_lists_unexpected_and_missing(tmp_path):
    path = save_lora(lora_net(), tmp_path / "a.safetensors")
    model = phi3_q_and_v(seed=1)
    before = snapshot(model)

    with pytest.raises(AdapterLoadError) as info:
        load_lora(model, path)

    report = info.value.report
    assert len(report.unexpected_keys) == 12 and len(report.missing_keys) == 12
    assert "the model has no module named 'qkv'" in str(info.value)
    assert_unchanged(model, before)


def test_nan_in_adapter_is_refused(tmp_path):
    def poison(d):
        d["out.lora_A"][0, 0] = float("nan")
        return d

    bad = rewrite(
        save_lora(lora_net(), tmp_path / "a.safetensors"), tmp_path / "b.safetensors", poison
    )
    with pytest.raises(AdapterLoadError, match=r"out\.lora_A: holds 1 NaN/Inf"):
        load_lora(net(), bad)


def test_invalid_metadata_is_reported_with_the_rest(tmp_path):
    def edit(doc):
        doc["modules"]["conv1"]["layer"] = "Conv9d"
        doc["modules"]["qkv"]["split_sizes"] = [8, 8, 9]
        return doc

    bad = rewrite(
        save_lora(lora_net(), tmp_path / "a.safetensors"),
        tmp_path / "b.safetensors",
        _drop("out.lora_B"),
        edit,
    )
    model = net()
    before = snapshot(model)
    with pytest.raises(AdapterLoadError) as info:
        load_lora(model, bad)
    message = str(info.value)
    assert "unknown layer type 'Conv9d'" in message and "split_sizes" in message
    assert "out.lora_B" in message
    assert_unchanged(model, before)


def test_newer_format_version_is_refused(tmp_path):
    def edit(doc):
        doc["format_version"] = FORMAT_VERSION + 1
        return doc

    bad = rewrite(
        save_lora(lora_net(), tmp_path / "a.safetensors"), tmp_path / "b.safetensors", None, edit
    )
    with pytest.raises(AdapterLoadError, match=f"format {FORMAT_VERSION + 1}.*upgrade lora_layers"):
        load_lora(net(), bad)


def test_non_strict_returns_the_report_loads_the_rest_and_warns(tmp_path):
    model = lora_net()
    good = save_lora(model, tmp_path / "good.safetensors")
    bad = rewrite(good, tmp_path / "bad.safetensors", _drop("conv2.lora_A"))
    fresh = net()

    with pytest.warns(UserWarning, match="conv2.lora_A"):
        report = load_lora(fresh, bad, strict=False)

    assert not report.ok and report.missing_keys == ["conv2.lora_A"]
    assert isinstance(fresh.conv2, nn.Conv2d) and not isinstance(fresh.conv2, lora_layers.Conv2d)
    assert sorted(report.injected_modules) == ["conv1", "conv3", "emb", "out", "qkv"]
    assert torch.equal(fresh.out.lora_B, model.out.lora_B)


# --------------------------------------------------------------------------- key prefixes
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("_orig_mod.fc.lora_A", "fc.lora_A"),
        ("module.fc.lora_A", "fc.lora_A"),
        ("module._orig_mod.fc.lora_A", "fc.lora_A"),
        ("_orig_mod.module.fc.lora_A", "fc.lora_A"),
        ("base_model.model.model.layers.0.fc.lora_B", "model.layers.0.fc.lora_B"),
        ("blocks.0._orig_mod.fc.lora_A", "blocks.0.fc.lora_A"),
        ("weight.lora_A", "weight.lora_A"),
        ("lora_B.lora_B", "lora_B.lora_B"),
        ("my_module.module_list.fc.lora_A", "my_module.module_list.fc.lora_A"),
        ("encoder.module.fc.lora_A", "encoder.module.fc.lora_A"),
        ("base_model.fc.lora_A", "base_model.fc.lora_A"),
        ("bias_proj.weight_norm.bias", "bias_proj.weight_norm.bias"),
    ],
)
def test_normalize_key(key, expected):
    assert normalize_key(key) == expected


class DDPLike(nn.Module):
    """What ``DistributedDataParallel`` looks like to state dicts: the model under ``module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_compiled_and_ddp_models_save_and_load_clean_keys(tmp_path):
    model = lora_net().eval()
    compiled = torch.compile(model)  # not run: only its names matter here
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    path = save_lora(compiled, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(lora_state_dict(model))

    for wrapped in (DDPLike(net().eval()), torch.compile(DDPLike(net().eval()))):
        load_lora(wrapped, path)
        inner = wrapped._orig_mod.module if hasattr(wrapped, "_orig_mod") else wrapped.module
        with torch.no_grad():
            assert torch.equal(inner(TOKENS), model(TOKENS))


@pytest.mark.parametrize(
    "prefix", ["_orig_mod.", "module.", "module._orig_mod.", "base_model.model."]
)
def test_prefixed_files_load(tmp_path, prefix):
    model = lora_net().eval()
    good = save_lora(model, tmp_path / "a.safetensors")

    def add_prefix(doc):
        doc["modules"] = {prefix + k: v for k, v in doc["modules"].items()}
        return doc

    bad = rewrite(
        good,
        tmp_path / "b.safetensors",
        lambda d: {prefix + k: v for k, v in d.items()},
        add_prefix,
    )
    fresh = net().eval()
    load_lora(fresh, bad)
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS), model(TOKENS))

    broken = rewrite(bad, tmp_path / "c.safetensors", _drop(prefix + "conv2.lora_A"))
    with pytest.raises(AdapterLoadError) as info:
        load_lora(net(), broken)
    assert info.value.report.missing_keys == ["conv2.lora_A"]


class Awkward(nn.Module):
    """Module names a string-replacing loader would mangle."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.ModuleDict({"lora": nn.Linear(6, 6), "bias": nn.Linear(6, 6)})
        self.lora_B = nn.Linear(6, 6)
        self.my_module = nn.ModuleDict({"weight_proj": nn.Linear(6, 6)})
        self.flora_A_bias = nn.Linear(6, 4)

    def forward(self, x):
        h = self.weight["bias"](self.weight["lora"](x))
        return self.flora_A_bias(self.my_module["weight_proj"](self.lora_B(h)))


def awkward_lora(seed: int) -> Awkward:
    torch.manual_seed(seed)
    model = Awkward()
    targets = ["weight.lora", "weight.bias", "lora_B", "my_module.weight_proj", "flora_A_bias"]
    lora_layers.inject_lora(model, targets, r=2, lora_alpha=4)
    return fill_all_(model)


def test_module_names_with_weight_bias_lora_round_trip_unchanged(tmp_path):
    model = awkward_lora(0).eval()
    path = save_lora(model, tmp_path / "a.safetensors", bias="lora_only")
    expected = {
        "weight.lora.lora_A",
        "weight.bias.lora_A",
        "lora_B.lora_A",
        "lora_B.lora_B",
        "my_module.weight_proj.lora_B",
        "flora_A_bias.bias",
        "weight.bias.bias",
    }
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(lora_state_dict(model, bias="lora_only")) and expected <= keys

    torch.manual_seed(0)
    fresh = Awkward().eval()
    load_lora(fresh, path)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))

    broken = rewrite(path, tmp_path / "b.safetensors", _drop("weight.bias.lora_B"))
    with pytest.raises(AdapterLoadError) as info:
        load_lora(awkward_lora(1), broken)
    assert info.value.report.missing_keys == ["weight.bias.lora_B"]


# --------------------------------------------------------------------------- pickle
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_pickle_files_are_refused_by_default(tmp_path, suffix):
    model = lora_net()
    path = tmp_path / f"adapter{suffix}"
    torch.save(lora_state_dict(model), path)
    target = lora_net(seed=1)
    before = snapshot(target)

    for strict in (True, False):
        with pytest.raises(AdapterError, match="allow_pickle=True"):
            load_lora(target, path, strict=strict)
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(path)
    assert_unchanged(target, before)

    load_lora(target, path, allow_pickle=True)  # opt-in: weights_only=True, existing layers
    assert torch.equal(target.qkv.lora_B, model.qkv.lora_B)


_PWNED = []


class _Payload:
    def __reduce__(self):
        return (_PWNED.append, ("code ran",))


def test_opt_in_pickle_never_runs_code(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"fc.lora_A": torch.zeros(2, 2), "x": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_lora(lora_net(), path, allow_pickle=True)
    assert _PWNED == []


def test_save_refuses_pickle_suffix(tmp_path):
    with pytest.raises(ValueError, match="pickle suffix"):
        save_lora(lora_net(), tmp_path / "adapter.bin")
    assert list(tmp_path.iterdir()) == []


def _torch_load_calls(tree: ast.AST):
    """Calls of ``torch.load`` or of a ``load`` imported from torch, in a parsed module."""
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "torch"
        for alias in node.names
        if alias.name == "load"
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and isinstance(func.value, ast.Name)
            and func.value.id == "torch"
        ) or (isinstance(func, ast.Name) and func.id in aliases):
            yield node


def test_no_torch_load_without_weights_only():
    """Every ``torch.load`` call in the package passes ``weights_only=True`` literally."""
    offenders, calls = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in _torch_load_calls(ast.parse(path.read_text(), filename=str(path))):
            calls += 1
            if not any(
                kw.arg == "weights_only"
                and isinstance(kw.value, ast.Constant)
                and kw.value.value is True
                for kw in node.keywords
            ):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert calls >= 1  # the opt-in path in adapters.py is found and checked
    assert offenders == []


# --------------------------------------------------------------------------- atomic write
def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = save_lora(lora_net(seed=0), tmp_path / "a.safetensors")
    previous = path.read_bytes()

    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial garbage")  # a half-written file...
        raise OSError("disk full")  # ...then the failure

    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_lora(lora_net(seed=1), path)

    assert path.read_bytes() == previous
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temporary file left behind
    monkeypatch.undo()
    fresh = net()
    load_lora(fresh, path)
    assert torch.equal(fresh.qkv.lora_B, lora_net(seed=0).qkv.lora_B)


# --------------------------------------------------------------------------- loralib
class LoralibNet(nn.Module):
    """The same small model built from loralib's layers or ours."""

    def __init__(self, lib) -> None:
        super().__init__()
        self.emb = lib.Embedding(20, 12, r=2, lora_alpha=4)
        self.qkv = lib.MergedLinear(12, 24, r=2, lora_alpha=4, enable_lora=[True, False, True])
        self.out = lib.Linear(24, 6, r=3, lora_alpha=6)

    def forward(self, tokens):
        return self.out(self.qkv(self.emb(tokens)))


def test_loralib_state_dict_loads_with_the_same_validation():
    theirs = LoralibNet(loralib)
    torch.manual_seed(1)
    for m in (theirs.emb, theirs.qkv, theirs.out):
        fill_lora_(m)
    ours = LoralibNet(lora_layers)
    ours.load_state_dict(
        {k: v for k, v in theirs.state_dict().items() if "lora_" not in k}, strict=False
    )
    sd = loralib.lora_state_dict(theirs)
    bad = {("out.lora_b" if k == "out.lora_B" else k): v for k, v in sd.items()}
    bad["qkv.lora_A"] = torch.zeros(3, 12)
    before = snapshot(ours)

    with pytest.raises(AdapterLoadError) as info:
        load_lora_state_dict(ours, bad)
    assert set(info.value.report.missing_keys) == {"out.lora_B"}
    assert set(info.value.report.unexpected_keys) == {"out.lora_b"}
    assert info.value.report.shape_mismatches == ["qkv.lora_A"]
    assert_unchanged(ours, before)

    report = load_lora_state_dict(ours, sd)

    assert report.ok and sorted(report.loaded_keys) == sorted(sd)
    theirs.train(), ours.train()  # loralib merges into its weights in eval mode
    with torch.no_grad():
        assert_close(ours(TOKENS), theirs(TOKENS))


class MSAttention(nn.Module):
    """The attention of Microsoft's LoRA GPT-2 example (examples/NLG/src/model.py), in short:
    a fused ``c_attn`` with LoRA on q and v, and the causal mask as a buffer named ``bias``."""

    def __init__(self, lib, n: int = 12, ctx: int = 8) -> None:
        super().__init__()
        self.c_attn = lib.MergedLinear(
            n, 3 * n, r=2, lora_alpha=4, enable_lora=[True, False, True], fan_in_fan_out=True,
            merge_weights=False,
        )  # fmt: skip
        self.register_buffer("bias", torch.tril(torch.ones(ctx, ctx)).view(1, 1, ctx, ctx))

    def forward(self, x):
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=-1)  # (B, T, n) each
        t = x.shape[1]
        att = (q @ k.transpose(-1, -2)).unsqueeze(1)  # (B, 1, T, T)
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, -1e4).softmax(-1)
        return (att.squeeze(1) @ v) + x


class MSGPT2(nn.Module):
    def __init__(self, lib) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 12)
        self.h = nn.ModuleList(nn.ModuleDict({"ln_1": nn.LayerNorm(12)}) for _ in range(2))
        for block in self.h:
            block["attn"] = MSAttention(lib)
        self.ln_f = nn.LayerNorm(12)

    def forward(self, tokens):
        x = self.wte(tokens)
        for block in self.h:
            x = block["attn"](block["ln_1"](x))
        return self.ln_f(x)


def test_loralib_bias_all_state_dict_with_mask_buffers_loads():
    # loralib.lora_state_dict(model, bias="all") keeps every key containing "bias": the
    # LayerNorm and c_attn biases, and the attention-mask buffers h.*.attn.bias.
    torch.manual_seed(0)
    theirs = MSGPT2(loralib)
    torch.manual_seed(1)
    for module in theirs.modules():
        if isinstance(module, loralib.LoRALayer) and hasattr(module, "lora_A"):
            fill_lora_(module)
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.bias)
    ours = MSGPT2(lora_layers)
    ours.load_state_dict(
        {k: v for k, v in theirs.state_dict().items() if "lora_" not in k and "bias" not in k},
        strict=False,
    )
    state = loralib.lora_state_dict(theirs, bias="all")
    assert "h.0.attn.bias" in state and "h.1.ln_1.bias" in state

    report = load_lora_state_dict(ours, state)

    assert report.ok and sorted(report.loaded_keys) == sorted(state)
    theirs.train(), ours.train()
    with torch.no_grad():
        assert_close(ours(TOKENS), theirs(TOKENS))
    bad = {**state, "h.1.attn.bias": torch.ones(1, 1, 4, 4)}  # a mask of the wrong shape
    with pytest.raises(AdapterLoadError, match="h.1.attn.bias"):
        load_lora_state_dict(ours, bad)


def test_bare_state_dict_cannot_inject_and_says_so():
    sd = lora_state_dict(lora_net())
    with pytest.raises(AdapterLoadError, match="without lora_layers metadata only loads"):
        load_lora_state_dict(net(), sd)
