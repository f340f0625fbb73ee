"""One module under several names (``model.first is model.second is model.block.inner``)
through every path that replaces modules: inject, load_lora, import_peft, unload and
merge_and_unload, on every layer kind. Each path must treat it as one module and replace it
under every name."""

from __future__ import annotations

import json
import warnings

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import lora_layers
from lora_layers import AdapterLoadError, export_peft, import_peft, load_lora, save_lora
from lora_layers.adapters import METADATA_KEY
from tests._kinds import (
    KINDS,
    base_layer,
    example_input,
    inject,
)
from tests.helpers import assert_close, assert_unchanged, fill_all_, snapshot

NAMES = ("first", "second", "block.inner")


class Aliased(nn.Module):
    """One layer registered under three names, one of them nested."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.first = base_layer(kind)
        self.second = self.first
        self.block = nn.Module()
        self.block.inner = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x) + 2 * self.second(x) + 3 * self.block.inner(x)


def aliased(kind: str, seed: int = 0) -> Aliased:
    torch.manual_seed(seed)
    return Aliased(kind)


def lora_aliased(kind: str, seed: int = 0, target: str = "first") -> Aliased:
    model = inject(aliased(kind, seed), kind, names=(target,))
    torch.manual_seed(seed + 100)
    return fill_all_(model)


def assert_one_module_everywhere(model: Aliased, cls: type) -> nn.Module:
    layers = [model.get_submodule(n) for n in NAMES]
    assert all(layer is layers[0] for layer in layers), [type(m).__name__ for m in layers]
    assert isinstance(layers[0], cls), type(layers[0])
    return layers[0]


def output(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(example_input(kind))


# --------------------------------------------------------------------------- inject
@pytest.mark.parametrize("target", NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_inject_by_any_name_replaces_every_name(kind, target):
    model = lora_aliased(kind, target=target)

    layer = assert_one_module_everywhere(model, lora_layers.LoRALayer)
    assert lora_layers.lora_module_names(model) == ["first"]  # listed once, by its first name
    assert not torch.equal(output(model, kind), output(aliased(kind), kind))  # B is non-zero
    assert layer.r == 2


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_excluding_any_name_excludes_the_module(kind):
    with pytest.raises(ValueError, match="no module left to wrap"):
        inject(aliased(kind), kind, names=("first",), exclude_modules="block.inner")
    model = aliased(kind)
    model.other = base_layer(kind)
    inject(model, kind, names=("first", "other"), exclude_modules="second")
    assert_one_module_everywhere(model, type(base_layer(kind)))
    assert lora_layers.lora_module_names(model) == ["other"]


def test_rank_pattern_matches_any_name():
    model = aliased("linear")
    lora_layers.inject_lora(model, ["first"], r=2, rank_pattern={"inner": 3})
    assert model.second.r == 3


# --------------------------------------------------------------------------- load_lora
@pytest.mark.parametrize("kind", KINDS)
def test_load_lora_replaces_every_name(tmp_path, kind):
    saved = lora_aliased(kind, seed=0)
    path = save_lora(saved, tmp_path / "a.safetensors")
    fresh = aliased(kind, seed=0)

    report = load_lora(fresh, path)

    assert report.ok and report.injected_modules == ["first"]
    assert_one_module_everywhere(fresh, lora_layers.LoRALayer)
    assert torch.equal(output(fresh, kind), output(saved, kind))


def _rename_module(src, dst, old: str, new: str, keep_old: bool = False):
    """Copy an adapter file, storing module ``old`` under ``new`` (and ``old`` if asked)."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    doc = json.loads(meta[METADATA_KEY])
    doc["modules"][new] = doc["modules"][old]
    for leaf in ("lora_A", "lora_B"):
        tensors[f"{new}.{leaf}"] = tensors[f"{old}.{leaf}"].clone()
    if not keep_old:
        del doc["modules"][old]
        for leaf in ("lora_A", "lora_B"):
            del tensors[f"{old}.{leaf}"]
    meta[METADATA_KEY] = json.dumps(doc)
    safetensors.torch.save_file(tensors, str(dst), metadata=meta)
    return tensors


@pytest.mark.parametrize("kind", KINDS)
def test_file_naming_a_second_name_or_both_names_loads_once(tmp_path, kind):
    saved = lora_aliased(kind)
    good = save_lora(saved, tmp_path / "a.safetensors")
    for names, keep in ((("block.inner",), False), (("second", "first"), True)):
        path = tmp_path / f"{'-'.join(names)}.safetensors"
        _rename_module(good, path, "first", names[0], keep_old=keep)
        fresh = aliased(kind)
        report = load_lora(fresh, path)
        assert report.ok, report.format()
        assert_one_module_everywhere(fresh, lora_layers.LoRALayer)
        assert torch.equal(output(fresh, kind), output(saved, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_file_giving_two_names_different_adapters_is_refused(tmp_path, kind):
    good = save_lora(lora_aliased(kind), tmp_path / "a.safetensors")
    path = tmp_path / "two.safetensors"
    tensors = _rename_module(good, path, "first", "second", keep_old=True)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors["second.lora_B"] = tensors["second.lora_B"] + 1
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    for model in (aliased(kind), lora_layers.merge_lora(lora_aliased(kind, seed=1))):
        before = snapshot(model)
        with pytest.raises(AdapterLoadError, match="'second' and 'first' are one module"):
            load_lora(model, path)
        assert_unchanged(model, before)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_with_every_alias_key_loads(kind):
    saved = lora_aliased(kind)
    state = {k: v for k, v in saved.state_dict().items() if "lora_" in k}
    assert {k.rpartition(".")[0] for k in state} == set(NAMES)  # state_dict keeps every name
    model = lora_aliased(kind)
    with torch.no_grad():
        model.first.lora_B.zero_()  # differs from saved until loaded

    report = lora_layers.load_lora_state_dict(model, state)

    assert report.ok
    assert torch.equal(output(model, kind), output(saved, kind))


# --------------------------------------------------------------------------- import_peft
@pytest.mark.parametrize("kind", KINDS)
def test_import_peft_replaces_every_name(tmp_path, kind):
    saved = lora_aliased(kind)
    export_peft(saved, tmp_path)
    fresh = aliased(kind)

    report = import_peft(fresh, tmp_path)

    assert report.ok and report.injected_modules == ["first"]
    assert_one_module_everywhere(fresh, lora_layers.LoRALayer)
    assert_close(output(fresh, kind), output(saved, kind))


# --------------------------------------------------------------------------- unload
@pytest.mark.parametrize("kind", KINDS)
def test_unload_puts_back_one_plain_module_under_every_name(kind):
    model = lora_aliased(kind)
    weight = model.first.weight
    expected = output(aliased(kind), kind)

    lora_layers.unload(model)

    plain = assert_one_module_everywhere(model, type(base_layer(kind)))
    assert not isinstance(plain, lora_layers.LoRALayer)
    assert plain.weight is weight
    assert torch.equal(output(model, kind), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_merges_once_under_every_name_without_a_tie_warning(kind):
    model = lora_aliased(kind)
    expected = output(model, kind)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one module under two names is not a tied weight
        lora_layers.merge_and_unload(model)

    plain = assert_one_module_everywhere(model, type(base_layer(kind)))
    assert not isinstance(plain, lora_layers.LoRALayer)
    assert_close(output(model, kind), expected)
