"""PEFT interop: import PEFT's adapters (and, from :mod:`lora_layers.peft_export`, export).

:func:`export_peft` writes ``adapter_model.safetensors`` and ``adapter_config.json`` that
``peft.PeftModel.from_pretrained`` loads with identical outputs; per-slice fused adapters
become one exact LoRA on the fused matrix (A stacked, B block-placed, rank and alpha chosen
so the scaling is identical). :func:`import_peft` reads a PEFT adapter directory and loads it
through :func:`~lora_layers.adapters.load_lora`, with the same validation.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_format import (
    DTYPES,
    Adapter,
    AdapterError,
    LayerSpec,
    shape_of,
)
from .adapter_io import (
    PEFT_CONFIG_NAME,
    PEFT_PICKLE_WEIGHTS_NAME,
    PEFT_WEIGHTS_NAME,
    load_pickle,
    read_safetensors,
)
from .config import LoRAConfig
from .keys import (
    MAGNITUDE_LEAF,
    join_key,
    module_aliases,
    module_index,
    normalized_tensors,
    split_key,
)
from .kinds import CONV_DIMS, is_hf_conv1d
from .linear import Linear
from .loading import LoadReport, load_lora, refuse_load
from .peft_export import export_peft, peft_pattern_key

__all__ = ["export_peft", "import_peft", "read_peft"]


_PEFT_UNSUPPORTED = (
    "lora_bias",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "layer_replication",
    "use_bdlora",
)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bad_rank(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0


def _bad_alpha(value: object) -> bool:
    return not _is_real(value) or not math.isfinite(value) or value <= 0


def _config_problems(config: dict[str, Any]) -> list[str]:
    """Every field of a PEFT ``adapter_config.json`` that lora_layers cannot use, one line each."""
    where = PEFT_CONFIG_NAME
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(
            f"{where}: peft_type is {config.get('peft_type')!r}; only LORA adapters import"
        )
    problems += [
        f"{where}: {k}={config[k]!r} is a PEFT feature lora_layers does not implement"
        for k in _PEFT_UNSUPPORTED
        if config.get(k)
    ]
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if _bad_rank(r):
        problems.append(f"{where}: r must be a positive int, got {r!r}")
    if _bad_alpha(alpha):
        problems.append(f"{where}: lora_alpha must be a positive finite number, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        problems.append(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(config.get(name, False), bool):
            problems.append(f"{where}: {name} must be true or false, got {config[name]!r}")
    for name, bad, what in (
        ("rank_pattern", _bad_rank, "a positive int"),
        ("alpha_pattern", _bad_alpha, "a positive finite number"),
    ):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            problems.append(
                f"{where}: {name} must be an object {{module pattern: value}}, "
                f"got {type(pattern).__name__} {pattern!r}"
            )
            continue
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as exc:
                problems.append(f"{where}: {name} key {key!r} is not a valid regex ({exc})")
            if bad(value):
                problems.append(f"{where}: {name}[{key!r}] must be {what}, got {value!r}")
    return problems


def _read_peft_config(directory: Path) -> dict[str, Any]:
    path = directory / PEFT_CONFIG_NAME
    if not directory.is_dir():
        if not directory.exists():
            raise FileNotFoundError(f"no such PEFT adapter directory: {str(directory)!r}")
        raise AdapterError(f"{str(directory)!r} is a file, not a PEFT adapter directory")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise AdapterError(
            f"{PEFT_CONFIG_NAME} is missing; {str(directory)!r} is not a PEFT adapter directory"
        ) from None
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{PEFT_CONFIG_NAME}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(
            f"{PEFT_CONFIG_NAME}: expected a JSON object, got a JSON {type(config).__name__}"
        )
    problems = _config_problems(config)
    if problems:
        raise AdapterError(problems)
    return config


def _read_peft_weights(directory: Path, allow_pickle: bool) -> dict[str, Any]:
    if (directory / PEFT_WEIGHTS_NAME).exists():
        return read_safetensors(directory / PEFT_WEIGHTS_NAME)[0]
    if (directory / PEFT_PICKLE_WEIGHTS_NAME).exists():
        return load_pickle(directory / PEFT_PICKLE_WEIGHTS_NAME, allow_pickle)
    raise AdapterError(
        f"no weights: neither {PEFT_WEIGHTS_NAME} nor {PEFT_PICKLE_WEIGHTS_NAME} is in "
        f"{str(directory)!r}"
    )


_PEFT_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "EA",
    ".lora_embedding_B": "EB",
    ".lora_magnitude_vector": "M",
}


def _group_peft_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict, list, list]:
    """``(module -> {slot: tensor}, other tensors by our key, bias names, base weight names)``."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    biases, base_weights = [], []
    for key, t in tensors.items():
        suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            found.setdefault(key[: -len(suffix)], {})[_PEFT_SUFFIXES[suffix]] = t
        elif key.endswith(".base_layer.weight"):  # PEFT saves targeted embeddings' weights
            name = key.removesuffix(".base_layer.weight")
            base_weights.append(name)
            out[join_key(name, "weight")] = t
        else:
            key = (
                key.replace(".base_layer.bias", ".bias")
                if key.endswith(".base_layer.bias")
                else key
            )
            if split_key(key)[1] == "bias":
                biases.append(split_key(key)[0])
            out[key] = t  # biases load as-is; anything else is reported as unexpected
    return found, out, biases, base_weights


def _linear_fan_in_fan_out(existing: nn.Module | None, default: bool) -> bool:
    if isinstance(existing, Linear):
        return existing.fan_in_fan_out
    if is_hf_conv1d(existing):
        return True  # PEFT always uses fan_in_fan_out for transformers' Conv1D
    return default if existing is not None and not isinstance(existing, nn.Linear) else False


def _pads_otherwise(existing: nn.Module | None, spec: LayerSpec) -> bool:
    """Whether a conv adapter targets a model conv that does not pad with zeros as PEFT's."""
    return spec.layer in CONV_DIMS and getattr(existing, "padding_mode", "zeros") != "zeros"


def _peft_pair(
    name: str, parts: dict[str, torch.Tensor]
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, list[str]]:
    """``(lora_A, lora_B, is_embedding, problems)`` of one PEFT module's tensors."""
    emb = "EA" in parts or "EB" in parts
    a, b = (parts.get("EA"), parts.get("EB")) if emb else (parts.get("A"), parts.get("B"))
    if a is None or b is None or (emb and ("A" in parts or "B" in parts)):
        pairs = sorted(k for k in parts if k != "M")
        return None, None, emb, [f"{name}: expected one lora_A and one lora_B, got {pairs}"]
    return a, b, emb, []


def _peft_rank_problems(name: str, r: int, config: dict[str, Any]) -> list[str]:
    rank_pattern = config.get("rank_pattern") or {}
    rank_key = peft_pattern_key(rank_pattern, name)
    expected_r = rank_pattern.get(rank_key, config.get("r", 8))
    if r == expected_r:
        return []
    field = "r" if rank_key is None else f"rank_pattern[{rank_key!r}]"
    return [f"{name}: lora_A has rank {r} but {PEFT_CONFIG_NAME} says {field}={expected_r}"]


def _peft_magnitude(
    name: str, parts: dict[str, torch.Tensor], config: dict[str, Any], out_f: int, a_dtype
) -> tuple[torch.Tensor | None, list[str]]:
    """The module's DoRA magnitude as ``(out,)`` (PEFT's conv one is ``(1, out, 1, ...)``)."""
    m, dora = parts.get("M"), bool(config.get("use_dora", False))
    if dora and m is None:
        why = f"{PEFT_CONFIG_NAME} says use_dora=true but the weights have no lora_magnitude_vector"
        return None, [f"{name}: {why}"]
    if m is not None and not dora:
        why = f"has a lora_magnitude_vector but {PEFT_CONFIG_NAME} says use_dora=false"
        return None, [f"{name}: {why}"]
    if m is not None and m.dim() > 1 and m.numel() == out_f and m.shape[1] == out_f:
        m = m.reshape(out_f)  # a convolution's (1, out_channels, 1, ...)
    if m is not None and m.dtype != a_dtype and {m.dtype, a_dtype} <= set(DTYPES):
        m = m.to(a_dtype)  # one LoRA dtype per layer (export_peft writes fused ones in fp32)
    return m, []


def _peft_layer(
    name: str, parts: dict[str, torch.Tensor], config: dict[str, Any], existing: nn.Module | None
) -> tuple[LayerSpec | None, dict[str, torch.Tensor], list[str]]:
    """``(spec, tensors by leaf, problems)`` of one PEFT module (spec None: not loadable)."""
    a, b, emb, problems = _peft_pair(name, parts)
    if a is None or b is None:
        return None, {}, problems
    r = int(a.shape[0])
    problems += _peft_rank_problems(name, r, config)
    fif = False
    in_f, out_f = int(a.shape[1]), int(b.shape[0])
    if emb:
        kind, weight_shape = "Embedding", (in_f, out_f)
    elif a.dim() == 2:
        default_fif = bool(config.get("fan_in_fan_out", False))
        kind, fif = "Linear", _linear_fan_in_fan_out(existing, default_fif)
        weight_shape = (in_f, out_f) if fif else (out_f, in_f)
    elif a.dim() in (3, 4, 5):
        kind, weight_shape = f"Conv{a.dim() - 2}d", (out_f, *(int(s) for s in a.shape[1:]))
        if b.dim() != a.dim() or any(s != 1 for s in b.shape[2:]) or b.shape[1] != r:
            why = f"{name}: lora_B {shape_of(b)} is not a 1x1 conv of rank {r}"
            return None, {"lora_A": a, "lora_B": b}, [*problems, why]
        a, b = a.reshape(r, -1), b.reshape(out_f, r)
        padding_mode = getattr(existing, "padding_mode", "zeros")
        if padding_mode != "zeros":
            problems.append(
                f"{name}: the model's {type(existing).__name__} has "
                f"padding_mode={padding_mode!r}, but PEFT's conv LoRA pads with zeros, so "
                "this adapter cannot reproduce PEFT's outputs (export_peft refuses it too)"
            )
    else:
        why = f"{name}: lora_A has {a.dim()} dims; not a LoRA layer lora_layers has"
        return None, {"lora_A": a, "lora_B": b}, [*problems, why]
    magnitude, bad = _peft_magnitude(name, parts, config, out_f, a.dtype)
    tensors = {"lora_A": a, "lora_B": b}
    if magnitude is not None:
        tensors[MAGNITUDE_LEAF] = magnitude
    if bad:
        return None, tensors, problems + bad
    alpha_pattern = config.get("alpha_pattern") or {}
    lora_config = LoRAConfig(
        r=r,
        lora_alpha=alpha_pattern.get(
            peft_pattern_key(alpha_pattern, name), config.get("lora_alpha", 8)
        ),
        lora_dropout=0.0 if emb else float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)),
        merge_weights=False,  # as inject_lora: eval() does not merge; use merge_lora()
        lora_dtype=a.dtype,
        use_dora=magnitude is not None,
    )
    spec = LayerSpec(kind, in_f, out_f, weight_shape, lora_config, fan_in_fan_out=fif)
    return spec, tensors, problems


def read_peft(
    directory: str | os.PathLike, allow_pickle: bool = False, model: nn.Module | None = None
) -> Adapter:
    """Read a PEFT LoRA adapter directory into an :class:`Adapter` (no model changes).

    Ranks come from the tensors and are checked against ``r`` / ``rank_pattern``; alphas come
    from ``lora_alpha`` / ``alpha_pattern``; ``use_rslora`` and ``lora_dropout`` are global.
    ``model``, if given, supplies ``fan_in_fan_out`` for layers that already have LoRA (and
    for transformers' ``Conv1D``, where PEFT always uses it), and convolutions whose
    ``padding_mode`` is not ``"zeros"`` are reported as problems: PEFT's conv LoRA pads with
    zeros, so such an adapter cannot give PEFT's outputs.

    A DoRA adapter (``use_dora: true``) gives DoRA layers: each module's
    ``lora_magnitude_vector`` becomes its ``lora_magnitude`` (a convolution's
    ``(1, out_channels, 1, ...)`` reshaped to ``(out_channels,)``); a module without one
    (or with one in a non-DoRA adapter) is a problem.

    Raises:
        AdapterError: For a non-LoRA or variant adapter (other than DoRA), an invalid
            ``adapter_config.json`` (not JSON, not an object, or a field of the wrong type or
            range: every such field is listed), no weights file, a pickle weights file
            without ``allow_pickle``, or an unreadable weights file.
        FileNotFoundError: If ``directory`` does not exist.
    """
    directory = Path(directory)
    config = _read_peft_config(directory)
    raw = _read_peft_weights(directory, allow_pickle)
    index, aliases = {}, {}
    if model is not None:
        index = module_index(model)[0]
        aliases = module_aliases(model, index)[0]
    tensors, problems = normalized_tensors(raw)
    found, out, biases, base_weights = _group_peft_tensors(tensors)
    modules: dict[str, LayerSpec] = {}
    invalid: set[str] = set()
    for name, parts in found.items():
        existing = index.get(aliases.get(name, name), ("", None))[1]
        spec, found_tensors, bad = _peft_layer(name, parts, config, existing)
        problems += bad
        if spec is None:
            if not found_tensors:  # not a LoRA pair: keep the tensors, reported as unexpected
                out.update({f"{name}.{slot}": t for slot, t in parts.items()})
            else:  # reported above: not reported again as unexpected keys
                invalid.add(name)
                out.update({join_key(name, leaf): t for leaf, t in found_tensors.items()})
            continue
        bad_spec = [f"{name}: {p}" for p in spec.problems()]
        problems += bad_spec
        if bad_spec or _pads_otherwise(existing, spec):
            invalid.add(name)
        else:
            modules[name] = spec
        out.update({join_key(name, leaf): t for leaf, t in found_tensors.items()})
    return Adapter(
        tensors=out,
        modules=modules,
        biases=tuple(biases),
        base_weights=tuple(base_weights),
        problems=problems,
        invalid_modules=invalid,
        source=str(directory),
    )


def import_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    strict: bool = True,
    inject: bool = True,
    allow_pickle: bool = False,
) -> LoadReport:
    """Load a LoRA adapter saved by PEFT (``save_pretrained``) into ``model``.

    Each ``<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A/B`` for
    embeddings) pair becomes a lora_layers layer with the rank of its tensors and the alpha
    from ``lora_alpha`` / ``alpha_pattern`` (a DoRA layer, with ``use_dora: true``, its
    ``lora_magnitude_vector`` its ``lora_magnitude``), then loads through :func:`load_lora` with the same
    validation (plain modules are injected; existing LoRA layers must match). A module
    registered under several names is replaced under every name (PEFT replaces only the
    first).

    Args:
        model: The base model (plain, or with matching lora_layers layers).
        directory: A PEFT adapter directory (``adapter_config.json`` + weights).
        strict: As :func:`load_lora`.
        inject: As :func:`load_lora`.
        allow_pickle: Allow ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``).

    Returns:
        The :class:`LoadReport`.

    Raises:
        AdapterLoadError: In strict mode, for any problem: an unsupported PEFT feature, an
            invalid ``adapter_config.json`` (each bad field named), missing or unreadable
            weights, a conv with ``padding_mode`` other than ``"zeros"``, and every
            validation problem of :func:`load_lora`; the model is unchanged. Also for
            ``adapter_model.bin`` without ``allow_pickle`` (in non-strict mode too).
        FileNotFoundError: If ``directory`` does not exist.
    """
    directory = Path(directory)
    try:
        adapter = read_peft(directory, allow_pickle=allow_pickle, model=model)
    except AdapterError as exc:
        pickle_refused = not allow_pickle and not (directory / PEFT_WEIGHTS_NAME).exists()
        pickle_refused &= (directory / PEFT_PICKLE_WEIGHTS_NAME).exists()
        return refuse_load(str(directory), exc.problems, strict or pickle_refused, exc)
    return load_lora(model, adapter, strict=strict, inject=inject)
