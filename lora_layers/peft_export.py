"""PEFT export: write a lora_layers model's adapter in PEFT's format, exactly.

:func:`export_peft` writes ``adapter_model.safetensors`` and ``adapter_config.json`` that
``peft.PeftModel.from_pretrained`` loads with identical outputs; per-slice fused adapters
become one exact LoRA on the fused matrix (A stacked, B block-placed, rank and alpha chosen
so the scaling is identical).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_format import (
    AdapterError,
    dora_magnitude,
    full_tensor,
)
from .adapter_io import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    atomic_write,
    save_tensors,
)
from .keys import (
    MAGNITUDE_LEAF,
    layer_leaves,
    module_index,
    normalize_name,
    split_key,
)
from .kinds import CONV_DIMS, layer_kind
from .utils import BIAS_MODES, lora_modules, lora_state_dict

__all__ = ["export_peft", "peft_pattern_key"]


def peft_pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching ``name`` as a dotted suffix."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", name):
            return pattern
    return None


def _peft_exact(name: str) -> str:
    """A readable PEFT pattern for ``name``: dots stay unescaped, other specials are escaped.

    ``export_peft`` checks every module resolves to its own entry and otherwise falls back to
    fully escaped patterns.
    """
    return re.escape(name) if re.search(r"[^A-Za-z0-9_.]", name) else name


def _peft_resolves(pattern: Mapping[str, Any], values: Mapping[str, Any], default: Any) -> bool:
    return all(pattern.get(peft_pattern_key(pattern, n), default) == v for n, v in values.items())


def _peft_patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """The most readable ``rank_pattern`` / ``alpha_pattern`` giving every module its value.

    Tries leaf names (``{"o_proj": 4}``) where all modules with that leaf agree, then full
    module names, then every module escaped and longest first; each attempt is checked with
    PEFT's own matching rule, so the result is exact.
    """
    by_leaf: dict[str, set] = {}
    for name, value in values.items():
        by_leaf.setdefault(split_key(name)[1], set()).add(value)
    full = {_peft_exact(n): v for n, v in values.items() if v != default}
    mixed = {
        _peft_exact(n): v
        for n, v in values.items()
        if len(by_leaf[split_key(n)[1]]) > 1 and v != default
    }
    leaves = {
        leaf: next(iter(vs))
        for leaf, vs in sorted(by_leaf.items())
        if len(vs) == 1 and next(iter(vs)) != default
    }
    for attempt in ({**mixed, **leaves}, full):
        if _peft_resolves(attempt, values, default):
            return attempt
    order = sorted(values, key=len, reverse=True)
    return {re.escape(n): values[n] for n in order}


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as PEFT's DoRA sees it: ``(out, in)``, dequantized if quantized."""
    weight = layer.dequantize() if hasattr(layer, "dequantize") else layer.weight
    weight = full_tensor(weight.detach())
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def _peft_magnitude(layer: nn.Module, m: torch.Tensor) -> torch.Tensor:
    """A fused layer's magnitude over all its rows, as PEFT's whole-matrix DoRA needs it.

    PEFT's DoRA scales every row of the fused matrix by ``m / ||W + s B A||``. A disabled
    slice's rows have zero ``B``, so their norm is ``||W_row||`` exactly; giving them
    ``m = ||W_row||``, computed as PEFT computes it, makes the factor exactly 1 and their
    output the base output, as in the lora_layers layer. PEFT computes that norm in the
    adapter's dtype, which its default loading (``autocast_adapter_dtype``) makes float32
    for float16 / bfloat16 adapters, so the vector is written in float32 (float64 for a
    float64 adapter): a rounded ``||W_row||`` would not divide to exactly 1.
    """
    dtype = torch.promote_types(m.dtype, torch.float32)
    weight = _dense_weight(layer).to(dtype)
    full = torch.linalg.norm(weight, dim=1).to(dtype)
    for out, _, b_rows in layer.slice_layout.blocks(layer.r):
        full[out] = m[b_rows].to(dtype)
    return full


def _peft_tensors(name: str, layer: nn.Module) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """One layer's PEFT tensors, its number of fused slices, and why PEFT cannot hold it."""
    kind = layer_kind(layer)
    a, b = full_tensor(layer.lora_A.detach()), full_tensor(layer.lora_B.detach())
    m = dora_magnitude(layer) if MAGNITUDE_LEAF in layer_leaves(layer) else None
    n_slices, problems = 1, []
    if kind == "MergedLinear":
        blocks = layer.slice_layout.blocks(layer.r)
        n_slices = len(blocks)
        b_full = b.new_zeros(layer.out_features, layer.r * n_slices)
        for out, a_rows, b_rows in blocks:  # slice i's B in its rows and its own r columns
            b_full[out, a_rows] = b[b_rows]
        b = b_full
        if m is not None:
            m = _peft_magnitude(layer, m)
    elif kind in CONV_DIMS:
        if layer.groups != 1 or any(d != 1 for d in layer.dilation):
            problems.append(
                f"{name}: PEFT's conv LoRA has no groups/dilation; "
                f"groups={layer.groups}, dilation={layer.dilation} cannot be exported exactly"
            )
        if layer.padding_mode != "zeros":
            problems.append(f"{name}: padding_mode={layer.padding_mode!r} (PEFT uses zeros)")
        a = a.reshape(layer.r, *layer.weight.shape[1:])
        b = b.reshape(layer.out_channels, layer.r, *([1] * CONV_DIMS[kind]))
        if m is not None:  # PEFT keeps a conv's magnitude as (1, out_channels, 1, ...)
            m = m.reshape(1, layer.out_channels, *([1] * CONV_DIMS[kind]))
    prefix = f"base_model.model.{name}"
    if kind == "Embedding":
        tensors = {f"{prefix}.lora_embedding_A": a, f"{prefix}.lora_embedding_B": b}
    else:
        tensors = {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}
    if m is not None:
        tensors[f"{prefix}.lora_magnitude_vector"] = m
    return tensors, n_slices, problems


def _dora_mix_problems(entries: list) -> list[str]:
    """PEFT has one ``use_dora`` for every layer: refuse a model mixing DoRA and plain LoRA."""
    dora = [name for name, layer, *_ in entries if MAGNITUDE_LEAF in layer_leaves(layer)]
    if not dora or len(dora) == len(entries):
        return []
    plain = [name for name, *_ in entries if name not in dora]
    return [
        f"PEFT's use_dora is one setting for all layers, but {dora} use DoRA and {plain} "
        "do not; export them as two adapters or give every layer the same use_dora"
    ]


def _peft_target_modules(index: Mapping[str, Any], targets: set[str]) -> list[str] | str:
    """Readable leaf names when they select exactly ``targets`` in the model, else a regex."""
    lora_children = {n for n in index for t in targets if n.startswith(t + ".") or (not t and n)}
    candidates = [n for n in index if n and n not in lora_children]
    leaves = sorted({split_key(n)[1] for n in targets})
    selected = {n for n in candidates if any(n == lf or n.endswith("." + lf) for lf in leaves)}
    if selected == targets:
        return leaves
    return "|".join(re.escape(n) for n in sorted(targets))


def _peft_config(
    entries: list, index: Mapping[str, Any], base_model_name_or_path: str | None, bias: str
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the exported layers."""
    use_rslora = all(layer.use_rslora for _, layer, *_ in entries)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, layer, rank, n_slices, _ in entries:
        ranks[name] = rank
        if layer.use_rslora == use_rslora:
            # alpha/r == (alpha*n)/(r*n) and alpha/sqrt(r) == (alpha*sqrt(n))/sqrt(r*n)
            factor = (math.sqrt(n_slices) if use_rslora else n_slices) if n_slices > 1 else 1
            alphas[name] = layer.lora_alpha * factor
        else:  # mixed scaling modes: express this layer's scaling under the global mode
            alphas[name] = layer.scaling * (math.sqrt(rank) if use_rslora else rank)
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(alphas.values()).most_common(1)[0][0]
    rank_pattern = _peft_patterns(ranks, r_default)
    alpha_pattern = _peft_patterns(alphas, alpha_default)

    target_modules = _peft_target_modules(index, set(ranks))

    dropouts = Counter(layer.dropout_p for _, layer, *_ in entries)
    if len(dropouts) > 1:
        warnings.warn(
            f"PEFT has one lora_dropout; the layers use {sorted(dropouts)} and "
            f"{dropouts.most_common(1)[0][0]} is written (inference is unaffected)",
            stacklevel=2,
        )
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_default,
        "lora_alpha": alpha_default,
        "lora_dropout": dropouts.most_common(1)[0][0],
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for _, layer, *_ in entries),
        "bias": bias,
        "use_dora": all(MAGNITUDE_LEAF in layer_leaves(layer) for _, layer, *_ in entries),
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
    }
    return config


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    bias: str = "none",
) -> dict[str, Any]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` that PEFT loads exactly.

    Every LoRA layer becomes one PEFT LoRA with the same update. A ``MergedLinear`` with
    ``n`` enabled slices of rank ``r`` becomes one rank ``n*r`` LoRA on the whole fused matrix
    (``lora_A`` is already the stack of the slices' A; ``lora_B`` places each slice's B in its
    rows and its own ``r`` columns, zeros elsewhere) with alpha ``alpha*n`` (``alpha*sqrt(n)``
    with rsLoRA), so the scaling is unchanged. Ranks and alphas that differ from the most
    common ones go into ``rank_pattern`` / ``alpha_pattern``. DoRA layers export their
    ``lora_magnitude`` as PEFT's ``lora_magnitude_vector`` with ``use_dora: true`` (every
    layer must then be DoRA: PEFT has one ``use_dora``); a fused layer's disabled slices get
    the magnitude ``||W_row||``, which makes PEFT's whole-matrix DoRA leave their rows exactly
    as the base (see :func:`_peft_magnitude`). PEFT has one ``lora_dropout``
    for all layers: the most common one is written, with a warning when they differ (dropout
    only affects training).

    Args:
        model: A model with lora_layers layers.
        directory: Output directory (created if needed).
        base_model_name_or_path: Stored in the config, for PEFT's ``from_pretrained`` niceties.
        bias: ``"none"``, ``"all"`` or ``"lora_only"``: which biases to write, as
            :func:`lora_state_dict` and PEFT's ``bias`` option (PEFT loads them too).

    Returns:
        The config dict written to ``adapter_config.json``.

    Raises:
        AdapterError: For layers PEFT cannot represent exactly (convolutions with groups,
            dilation or non-zero padding modes, DoRA layers mixed with plain LoRA layers) or
            a model without LoRA layers.
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got bias={bias!r}")
    entries = []  # (name, layer, PEFT rank, number of fused slices, {key: tensor})
    problems = []
    for raw, layer in lora_modules(model):
        name = normalize_name(raw)
        tensors, n_slices, bad = _peft_tensors(name, layer)
        problems += bad
        entries.append((name, layer, layer.r * n_slices, n_slices, tensors))
    if not entries:
        raise AdapterError("the model has no LoRA layer with r > 0; nothing to export")
    problems += _dora_mix_problems(entries)
    if problems:
        raise AdapterError(problems, context="cannot export to PEFT")
    config = _peft_config(entries, module_index(model)[0], base_model_name_or_path, bias)
    targets = {name for name, *_ in entries}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for *_, t in entries for k, v in t.items()}
    for key, value in lora_state_dict(model, bias=bias).items():
        name, leaf = split_key(key)
        if leaf == "bias":  # PEFT wraps LoRA layers: their bias is ``base_layer.bias``
            name = normalize_name(name)
            where = f"{name}.base_layer" if name in targets else name
            tensors[f"base_model.model.{where}.bias"] = value.detach()
    save_tensors(tensors, directory / PEFT_WEIGHTS_NAME, {"format": "pt"})
    # Top-level keys sorted; rank_pattern / alpha_pattern keep their order, which is the order
    # they were checked in: PEFT uses the first matching key in file order.
    text = json.dumps({k: config[k] for k in sorted(config)}, indent=2) + "\n"
    atomic_write(directory / PEFT_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return config
