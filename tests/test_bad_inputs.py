"""The bad-input catalogue: every corrupt or unsupported adapter file and PEFT directory.

Each variant, on every layer kind it applies to, must raise one ``AdapterLoadError`` (a
``ValueError``) whose message names the file and every offender, and must leave the model
bit-identical: every module (type, identity, merged state) and every parameter and buffer,
compared by bytes (see ``tests/_kinds.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import lora_layers
from lora_layers import AdapterLoadError, export_peft, import_peft, load_lora, save_lora
from lora_layers.adapters import METADATA_KEY
from tests._kinds import CONV_KINDS, KINDS, lora_pair, pair
from tests.helpers import assert_unchanged, snapshot

MODULES = ("first", "second")


def test_adapter_load_error_is_a_value_error():
    assert issubclass(AdapterLoadError, ValueError)


def assert_refused(load: Callable[[], object], model, source: Path, offenders) -> str:
    """``load()`` raises one AdapterLoadError naming ``source`` and every offender; the model
    is bit-identical afterwards. Returns the message."""
    before = snapshot(model)
    with pytest.raises(AdapterLoadError) as info:
        load()
    message = str(info.value)
    assert str(source) in message, message
    for offender in offenders:
        assert offender in message, (offender, message)
    assert "was not changed" in message
    assert_unchanged(model, before)
    return message


# --------------------------------------------------------------------------- adapter files
def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path, Path], list[str]]:
    def make(good: Path, bad: Path) -> list[str]:
        tensors, metadata = _read(good)
        offenders = edit(tensors)
        _write(bad, tensors, metadata)
        return offenders

    return make


def _edit_modules(field: str, value: object, *offenders: str) -> Callable[[Path, Path], list]:
    """Set ``field`` of both modules' metadata to ``value``."""

    def make(good: Path, bad: Path) -> list[str]:
        tensors, metadata = _read(good)
        doc = json.loads(metadata[METADATA_KEY])
        for name in MODULES:
            doc["modules"][name][field] = value
            if field == "r":  # MergedLinear's slice_ranks would disagree first
                doc["modules"][name].pop("slice_ranks", None)
        metadata[METADATA_KEY] = json.dumps(doc)  # inf/nan are written as Infinity/NaN
        _write(bad, tensors, metadata)
        return [*MODULES, field, *offenders]

    return make


def _bytes(edit: Callable[[bytes], bytes], *offenders: str) -> Callable[[Path, Path], list]:
    def make(good: Path, bad: Path) -> list[str]:
        bad.write_bytes(edit(good.read_bytes()))
        return list(offenders)

    return make


def _metadata_text(text: str) -> Callable[[Path, Path], list]:
    def make(good: Path, bad: Path) -> list[str]:
        tensors, metadata = _read(good)
        metadata[METADATA_KEY] = text
        _write(bad, tensors, metadata)
        return ["not valid JSON"]

    return make


def _drop(tensors):
    del tensors["first.lora_A"], tensors["second.lora_B"]
    return ["first.lora_A", "second.lora_B"]


def _extra(tensors):
    tensors["first.lora_C"] = torch.zeros(2, 2)
    tensors["third.lora_A"] = torch.zeros(2, 2)
    return ["first.lora_C", "third.lora_A"]


def _shapes(tensors):
    tensors["first.lora_A"] = torch.zeros(3, 3)
    tensors["second.lora_B"] = torch.zeros(5, 5)
    return ["first.lora_A", "second.lora_B"]


def _cast(leaf: str, dtype: torch.dtype) -> Callable[[dict], list]:
    def edit(tensors):
        for name in MODULES:
            tensors[f"{name}.{leaf}"] = tensors[f"{name}.{leaf}"].to(dtype)
        return [f"{name}.{leaf}" for name in MODULES] + [str(dtype).removeprefix("torch.")]

    return edit


def _non_finite(tensors):
    tensors["first.lora_B"][0, 0] = math.nan
    tensors["second.lora_A"][0, 0] = math.inf
    return ["first.lora_B", "second.lora_A", "NaN/Inf"]


FILE_CASES: dict[str, Callable[[Path, Path], list[str]]] = {
    "truncated": _bytes(lambda b: b[: len(b) // 2], "truncated"),
    "wrong_header_length": _bytes(lambda b: (2**40).to_bytes(8, "little") + b[8:], "corrupted"),
    "not_safetensors": _bytes(lambda b: b"this is not an adapter\n" * 4, "not a safetensors"),
    "metadata_not_json": _metadata_text("{oops"),
    "metadata_json_list": _edit_modules("r", [2], "r must be a positive int"),
    "missing_keys": _edit_tensors(_drop),
    "extra_keys": _edit_tensors(_extra),
    "wrong_shapes": _edit_tensors(_shapes),
    "int_tensors": _edit_tensors(_cast("lora_A", torch.int32)),
    "float8_tensors": _edit_tensors(_cast("lora_B", torch.float8_e4m3fn)),
    "float8_e5m2_tensors": _edit_tensors(_cast("lora_A", torch.float8_e5m2)),
    "nan_and_inf_tensors": _edit_tensors(_non_finite),
    "float8_metadata_dtype": _edit_modules("dtype", "float8_e4m3fn", "float8_e4m3fn"),
    "alpha_inf": _edit_modules("lora_alpha", math.inf, "inf"),
    "alpha_nan": _edit_modules("lora_alpha", math.nan, "nan"),
    "alpha_zero": _edit_modules("lora_alpha", 0, "lora_alpha=0"),
    "alpha_negative": _edit_modules("lora_alpha", -2.0, "-2.0"),
    "alpha_string": _edit_modules("lora_alpha", "sixteen", "'sixteen'"),
    "dropout_out_of_range": _edit_modules("lora_dropout", 1.5, "1.5"),
    "dropout_nan": _edit_modules("lora_dropout", math.nan, "nan"),
    "wrong_rank_in_metadata": _edit_modules("r", 3, "r=3"),
    "unknown_layer_type": _edit_modules("layer", "Conv4d", "unknown layer type"),
}


# Cases refused before the layers are looked at run on one kind; the others on every kind.
FILE_KIND_FREE = {"truncated", "wrong_header_length", "not_safetensors", "metadata_not_json"}


def _kind_case_pairs(cases, kind_free) -> list[tuple[str, str]]:
    return [(k, c) for c in sorted(cases) for k in KINDS if c not in kind_free or k == "linear"]


@pytest.mark.parametrize("target", ["plain", "merged_lora"])
@pytest.mark.parametrize(("kind", "case"), _kind_case_pairs(FILE_CASES, FILE_KIND_FREE))
def test_bad_adapter_file_is_refused_and_changes_nothing(tmp_path, kind, case, target):
    good = save_lora(lora_pair(kind, seed=1), tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    offenders = FILE_CASES[case](good, bad)
    model = pair(kind) if target == "plain" else lora_layers.merge_lora(lora_pair(kind))

    assert_refused(lambda: load_lora(model, bad), model, bad, offenders)


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_file_is_refused_even_non_strict(tmp_path, kind):
    path = tmp_path / "adapter.bin"
    torch.save(lora_layers.lora_state_dict(lora_pair(kind, seed=1)), path)
    model = lora_pair(kind)
    for strict in (True, False):
        assert_refused(
            lambda s=strict: load_lora(model, path, strict=s), model, path, ["allow_pickle=True"]
        )


@pytest.mark.parametrize("kind", KINDS)
def test_float8_state_dict_is_refused(kind):
    model = lora_pair(kind)
    state = {k: v.to(torch.float8_e4m3fn) for k, v in lora_layers.lora_state_dict(model).items()}
    offenders = [*state, "float8_e4m3fn"]
    assert_refused(
        lambda: lora_layers.load_lora_state_dict(model, state), model, "<state dict>", offenders
    )


# --------------------------------------------------------------------------- fp16 re-merge
def _overflowing_fp16_file(tmp_path: Path, kind: str, **kwargs) -> Path:
    """An fp16 adapter whose merge overflows fp16: |scaling * B @ A| = 2 * 2 * 200 * 200."""
    source = lora_pair(kind, seed=1, dtype=torch.float16, **kwargs)
    with torch.no_grad():
        for _, layer in lora_layers.lora_modules(source):
            layer.lora_A.fill_(200.0)
            layer.lora_B.fill_(200.0)
    return save_lora(source, tmp_path / "fp16.safetensors")


@pytest.mark.parametrize("target", ["merged_lora", "eval_plain"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp16_remerge_overflow_is_refused_before_changing_anything(tmp_path, kind, target):
    if target == "merged_lora":  # layers already merged must be re-merged with the file's values
        path = _overflowing_fp16_file(tmp_path, kind)
        model = lora_layers.merge_lora(lora_pair(kind, dtype=torch.float16))
    else:  # injected eval-mode layers with merge_weights merge as eval() would
        path = _overflowing_fp16_file(tmp_path, kind, merge_weights=True)
        model = pair(kind, dtype=torch.float16).eval()

    message = assert_refused(lambda: load_lora(model, path), model, path, [*MODULES, "merge"])
    assert "NaN/Inf" in message or "non-finite" in message


# --------------------------------------------------------------------------- PEFT directories
def _peft_dir(tmp_path: Path, kind: str) -> Path:
    directory = tmp_path / "peft"
    export_peft(lora_pair(kind, seed=1), directory)
    return directory


def _config(edit: Callable[[dict], None], *offenders: str) -> Callable[[Path], list]:
    def make(directory: Path) -> list[str]:
        path = directory / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
        return ["adapter_config.json", *offenders]

    return make


def _config_text(text: str, *offenders: str) -> Callable[[Path], list]:
    def make(directory: Path) -> list[str]:
        (directory / "adapter_config.json").write_text(text)
        return ["adapter_config.json", *offenders]

    return make


def _set(**changes) -> Callable[[dict], None]:
    return lambda config: config.update(changes)


def _peft_key(tensors: dict, name: str, slot: str) -> str:
    """The PEFT key of module ``name``'s ``lora_A``/``lora_B`` (``lora_embedding_*`` too)."""
    (key,) = [
        k
        for k in tensors
        if f".{name}.lora_" in k and k.split(".lora_")[-1].removesuffix(".weight")[-1] == slot
    ]
    return key


def _weights(edit: Callable[[dict], list]) -> Callable[[Path], list]:
    def make(directory: Path) -> list[str]:
        path = directory / "adapter_model.safetensors"
        tensors = safetensors.torch.load_file(str(path))
        offenders = edit(tensors)
        safetensors.torch.save_file(tensors, str(path))
        return offenders

    return make


def _peft_drop_b(tensors):
    for name in MODULES:
        del tensors[_peft_key(tensors, name, "B")]
    return list(MODULES)


def _peft_extra(tensors):
    tensors["base_model.model.third.lora_A.weight"] = torch.zeros(2, 8)
    tensors["base_model.model.third.lora_B.weight"] = torch.zeros(6, 2)
    return ["third"]


def _peft_shapes(tensors):
    for name in MODULES:
        key = _peft_key(tensors, name, "A")
        t = tensors[key]
        tensors[key] = torch.zeros(t.shape[0], t.shape[1] + 1, *t.shape[2:])
    return list(MODULES)


def _peft_float8(tensors):
    for name in MODULES:
        key = _peft_key(tensors, name, "A")
        tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    return [*MODULES, "float8_e4m3fn"]


def _peft_non_finite(tensors):
    tensors[_peft_key(tensors, "first", "B")].view(-1)[0] = math.nan
    tensors[_peft_key(tensors, "second", "A")].view(-1)[0] = math.inf
    return [*MODULES, "NaN/Inf"]


def _peft_no_weights(directory: Path) -> list[str]:
    (directory / "adapter_model.safetensors").unlink()
    return ["no weights", "adapter_model.safetensors", "adapter_model.bin"]


def _peft_pickle_only(directory: Path) -> list[str]:
    path = directory / "adapter_model.safetensors"
    torch.save(safetensors.torch.load_file(str(path)), directory / "adapter_model.bin")
    path.unlink()
    return ["adapter_model.bin", "allow_pickle=True"]


def _peft_config_missing(directory: Path) -> list[str]:
    (directory / "adapter_config.json").unlink()
    return ["adapter_config.json", "missing"]


def _peft_truncated(directory: Path) -> list[str]:
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return ["adapter_model.safetensors", "truncated"]


PEFT_CASES: dict[str, Callable[[Path], list[str]]] = {
    "config_not_json": _config_text("{oops", "not valid JSON"),
    "config_json_list": _config_text("[1, 2]", "JSON list"),
    "config_missing": _peft_config_missing,
    "rank_pattern_list": _config(_set(rank_pattern=["first"]), "rank_pattern", "list"),
    "rank_pattern_bad_value": _config(_set(rank_pattern={"first": "2"}), "rank_pattern", "'2'"),
    "rank_pattern_bad_regex": _config(_set(rank_pattern={"(": 2}), "rank_pattern", "regex"),
    "alpha_pattern_zero": _config(_set(alpha_pattern={"first": 0}), "alpha_pattern", "first"),
    "alpha_zero": _config(_set(lora_alpha=0), "lora_alpha", "got 0"),
    "alpha_string": _config(_set(lora_alpha="sixteen"), "lora_alpha", "'sixteen'"),
    "alpha_inf": _config(_set(lora_alpha=math.inf), "lora_alpha", "inf"),
    "alpha_nan": _config(_set(lora_alpha=math.nan), "lora_alpha", "nan"),
    "dropout_out_of_range": _config(_set(lora_dropout=1.5), "lora_dropout", "1.5"),
    "r_string": _config(_set(r="8"), "r must be a positive int", "'8'"),
    "several_bad_fields": _config(
        _set(lora_alpha=0, lora_dropout=1.5, use_rslora="yes"),
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
    ),
    "not_lora": _config(_set(peft_type="PREFIX_TUNING"), "peft_type", "PREFIX_TUNING"),
    # A DoRA config whose weights have no magnitudes: every module is named.
    "dora_without_magnitudes": _config(
        _set(use_dora=True), *MODULES, "use_dora=true", "no lora_magnitude_vector"
    ),
    "rank_disagrees_with_config": _config(_set(r=5), *MODULES, "r=5"),
    "no_weights": _peft_no_weights,
    "pickle_bin_only": _peft_pickle_only,
    "truncated_weights": _peft_truncated,
    "missing_lora_B": _weights(_peft_drop_b),
    "extra_module": _weights(_peft_extra),
    "wrong_shapes": _weights(_peft_shapes),
    "float8_tensors": _weights(_peft_float8),
    "nan_and_inf_tensors": _weights(_peft_non_finite),
}


# Directory and config problems are found before any tensor is read: one kind is enough.
PEFT_KIND_FREE = set(PEFT_CASES) - {
    "missing_lora_B",
    "extra_module",
    "wrong_shapes",
    "float8_tensors",
    "nan_and_inf_tensors",
    "rank_disagrees_with_config",
    "dora_without_magnitudes",
}


@pytest.mark.parametrize(("kind", "case"), _kind_case_pairs(PEFT_CASES, PEFT_KIND_FREE))
def test_bad_peft_directory_is_refused_and_changes_nothing(tmp_path, kind, case):
    directory = _peft_dir(tmp_path, kind)
    offenders = PEFT_CASES[case](directory)
    model = pair(kind)

    assert_refused(lambda: import_peft(model, directory), model, directory, offenders)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
@pytest.mark.parametrize("kind", CONV_KINDS)
def test_peft_conv_adapter_onto_non_zero_padding_is_refused(tmp_path, kind, padding_mode):
    # PEFT's conv lora_A pads with zeros whatever the base conv does, so its outputs differ.
    directory = _peft_dir(tmp_path, kind)  # exported from zero-padded convs
    model = pair(kind, padding_mode=padding_mode)

    offenders = [*MODULES, f"padding_mode={padding_mode!r}", "zeros"]
    assert_refused(lambda: import_peft(model, directory), model, directory, offenders)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_non_strict_load_skips_the_overflowing_layer_and_loads_the_rest(tmp_path, kind):
    source = lora_pair(kind, seed=1, dtype=torch.float16)
    with torch.no_grad():
        source.second.lora_A.fill_(200.0)
        source.second.lora_B.fill_(200.0)
    path = save_lora(source, tmp_path / "fp16.safetensors")
    model = lora_layers.merge_lora(lora_pair(kind, dtype=torch.float16))
    second = {k: v.clone() for k, v in model.second.state_dict(keep_vars=True).items()}
    merged_second = model.second.merged_weight.clone()

    with pytest.warns(UserWarning, match="second: cannot merge"):
        report = load_lora(model, path, strict=False)

    assert report.config_mismatches == ["second"] and "first.lora_A" in report.loaded_keys
    assert torch.equal(model.first.lora_B, source.first.lora_B)
    assert torch.equal(model.first.merged_weight, model.first.get_merged_weight())
    assert all(torch.equal(v, model.second.state_dict()[k]) for k, v in second.items())
    assert torch.equal(model.second.merged_weight, merged_second)
