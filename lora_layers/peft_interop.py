"""PEFT interop: export lora_layers adapters in PEFT's format, and import PEFT's adapters.

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
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_format import (
    Adapter,
    AdapterError,
    LayerSpec,
    dtype_name,
    full_tensor,
    shape_of,
)
from .adapter_io import (
    PEFT_CONFIG_NAME,
    PEFT_PICKLE_WEIGHTS_NAME,
    PEFT_WEIGHTS_NAME,
    atomic_write,
    load_pickle,
    read_safetensors,
    save_tensors,
)
from .keys import (
    join_key,
    module_aliases,
    module_index,
    normalize_name,
    normalized_tensors,
    split_key,
)
from .kinds import CONV_DIMS, is_hf_conv1d, layer_kind
from .linear import Linear
from .loading import LoadReport, load_lora, refuse_load
from .utils import BIAS_MODES, lora_modules, lora_state_dict

__all__ = ["export_peft", "import_peft", "read_peft"]


def _peft_pattern_key(patterns: Iterable[str], name: str) -> str | None:
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
    return all(pattern.get(_peft_pattern_key(pattern, n), default) == v for n, v in values.items())


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
    common ones go into ``rank_pattern`` / ``alpha_pattern``. PEFT has one ``lora_dropout``
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
            dilation or non-zero padding modes) or a model without LoRA layers.
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got bias={bias!r}")
    entries = []  # (name, layer, PEFT rank, number of fused slices, {key: tensor})
    problems = []
    index, _ = module_index(model)
    for raw, layer in lora_modules(model):
        name = normalize_name(raw)
        kind = layer_kind(layer)
        a, b = full_tensor(layer.lora_A.detach()), full_tensor(layer.lora_B.detach())
        n_slices = 1
        if kind == "MergedLinear":
            slices = layer._slices
            n_slices = len(slices)
            r = layer.r
            b_full = b.new_zeros(layer.out_features, r * n_slices)
            row = 0
            for i, (start, stop) in enumerate(slices):
                b_full[start:stop, i * r : (i + 1) * r] = b[row : row + stop - start]
                row += stop - start
            b = b_full
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
        prefix = f"base_model.model.{name}"
        if kind == "Embedding":
            tensors = {f"{prefix}.lora_embedding_A": a, f"{prefix}.lora_embedding_B": b}
        else:
            tensors = {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}
        rank = layer.r * n_slices
        entries.append((name, layer, rank, n_slices, tensors))
    if not entries:
        raise AdapterError("the model has no LoRA layer with r > 0; nothing to export")
    if problems:
        raise AdapterError(problems, context="cannot export to PEFT")

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

    # target_modules: readable leaf names when they select exactly our modules, else a regex.
    targets = set(ranks)
    lora_children = {n for n in index for t in targets if n.startswith(t + ".") or (not t and n)}
    candidates = [n for n in index if n and n not in lora_children]
    leaves = sorted({split_key(n)[1] for n in targets})
    selected = {n for n in candidates if any(n == lf or n.endswith("." + lf) for lf in leaves)}
    target_modules: list[str] | str
    if selected == targets:
        target_modules = leaves
    else:
        target_modules = "|".join(re.escape(n) for n in sorted(targets))

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
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
    }
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


_PEFT_UNSUPPORTED = (
    "use_dora",
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
    for name in ("use_rslora", "fan_in_fan_out"):
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

    Raises:
        AdapterError: For a non-LoRA or DoRA/variant adapter, an invalid
            ``adapter_config.json`` (not JSON, not an object, or a field of the wrong type or
            range: every such field is listed), no weights file, a pickle weights file
            without ``allow_pickle``, or an unreadable weights file.
        FileNotFoundError: If ``directory`` does not exist.
    """
    directory = Path(directory)
    config = _read_peft_config(directory)
    raw = _read_peft_weights(directory, allow_pickle)
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    index, aliases = {}, {}
    if model is not None:
        index = module_index(model)[0]
        aliases = module_aliases(model, index)[0]

    tensors, problems = normalized_tensors(raw)
    found: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    biases, base_weights = [], []
    invalid: set[str] = set()
    suffixes = {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_embedding_A": "EA",
        ".lora_embedding_B": "EB",
    }
    for key, t in tensors.items():
        for suffix, slot in suffixes.items():
            if key.endswith(suffix):
                found.setdefault(key[: -len(suffix)], {})[slot] = t
                break
        else:
            if key.endswith(".base_layer.weight"):  # PEFT saves targeted embeddings' weights
                name = key.removesuffix(".base_layer.weight")
                base_weights.append(name)
                out[join_key(name, "weight")] = t
                continue
            key = (
                key.replace(".base_layer.bias", ".bias")
                if key.endswith(".base_layer.bias")
                else key
            )
            if split_key(key)[1] == "bias":
                biases.append(split_key(key)[0])
            out[key] = t  # biases load as-is; anything else is reported as unexpected
    modules: dict[str, LayerSpec] = {}
    for name, parts in found.items():
        emb = "EA" in parts or "EB" in parts
        a, b = (parts.get("EA"), parts.get("EB")) if emb else (parts.get("A"), parts.get("B"))
        if a is None or b is None or (emb and ("A" in parts or "B" in parts)):
            problems.append(f"{name}: expected one lora_A and one lora_B, got {sorted(parts)}")
            for slot, t in parts.items():
                out[f"{name}.{slot}"] = t
            continue
        r = int(a.shape[0])
        rank_key = _peft_pattern_key(rank_pattern, name)
        expected_r = rank_pattern.get(rank_key, r_default)
        alpha = alpha_pattern.get(_peft_pattern_key(alpha_pattern, name), alpha_default)
        if r != expected_r:
            field = "r" if rank_key is None else f"rank_pattern[{rank_key!r}]"
            problems.append(
                f"{name}: lora_A has rank {r} but {PEFT_CONFIG_NAME} says {field}={expected_r}"
            )
        existing = index.get(aliases.get(name, name), ("", None))[1]
        fif = False
        if emb:
            kind, in_f, out_f = "Embedding", int(a.shape[1]), int(b.shape[0])
            weight_shape: tuple[int, ...] = (in_f, out_f)
        elif a.dim() == 2:
            kind, in_f, out_f = "Linear", int(a.shape[1]), int(b.shape[0])
            if isinstance(existing, Linear):
                fif = existing.fan_in_fan_out
            elif is_hf_conv1d(existing):
                fif = True  # PEFT always uses fan_in_fan_out for transformers' Conv1D
            elif existing is not None and not isinstance(existing, nn.Linear):
                fif = fan_in_fan_out
            weight_shape = (in_f, out_f) if fif else (out_f, in_f)
        elif a.dim() in (3, 4, 5):
            kind, in_f, out_f = f"Conv{a.dim() - 2}d", int(a.shape[1]), int(b.shape[0])
            weight_shape = (out_f, *(int(s) for s in a.shape[1:]))
            if b.dim() != a.dim() or any(s != 1 for s in b.shape[2:]) or b.shape[1] != r:
                problems.append(f"{name}: lora_B {shape_of(b)} is not a 1x1 conv of rank {r}")
                continue
            a, b = a.reshape(r, -1), b.reshape(out_f, r)
            padding_mode = getattr(existing, "padding_mode", "zeros")
            if padding_mode != "zeros":
                problems.append(
                    f"{name}: the model's {type(existing).__name__} has "
                    f"padding_mode={padding_mode!r}, but PEFT's conv LoRA pads with zeros, so "
                    "this adapter cannot reproduce PEFT's outputs (export_peft refuses it too)"
                )
                invalid.add(name)
        else:
            problems.append(f"{name}: lora_A has {a.dim()} dims; not a LoRA layer lora_layers has")
            continue
        spec = LayerSpec(
            layer=kind,
            r=r,
            lora_alpha=alpha,
            in_features=in_f,
            out_features=out_f,
            weight_shape=weight_shape,
            dtype=dtype_name(a.dtype),
            use_rslora=use_rslora,
            lora_dropout=0.0 if emb else dropout,
            fan_in_fan_out=fif,
            merge_weights=False,  # as inject_lora: eval() does not merge; use merge_lora()
        )
        bad = spec.problems()
        problems += [f"{name}: {p}" for p in bad]
        if bad:
            invalid.add(name)
        if name not in invalid:
            modules[name] = spec
        out[join_key(name, "lora_A")] = a
        out[join_key(name, "lora_B")] = b
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
    from ``lora_alpha`` / ``alpha_pattern``, then loads through :func:`load_lora` with the same
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
