"""The key vocabulary of adapters: state-dict keys, module names and their normal form.

An adapter key is ``<module>.<leaf>`` with leaf ``lora_A`` / ``lora_B`` (:data:`LORA_LEAVES`),
``lora_magnitude`` (DoRA layers, :data:`MAGNITUDE_LEAF`), ``bias`` or ``weight``. Module names are compared in normal form: without the prefixes that
``torch.compile`` (``_orig_mod.``), DDP (``module.``) and PEFT (``base_model.model.``) add.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .base import LoRALayer
from .dora import MAGNITUDE_LEAF  # the leaf of a DoRA layer's magnitude, re-exported here

__all__ = [
    "ADAPTER_LEAVES",
    "LORA_LEAVES",
    "MAGNITUDE_LEAF",
    "layer_leaves",
    "join_key",
    "module_aliases",
    "module_index",
    "normalize_key",
    "normalize_name",
    "normalized_tensors",
    "split_key",
]

LORA_LEAVES = ("lora_A", "lora_B")
#: Every per-layer adapter leaf a file may hold.
ADAPTER_LEAVES = (*LORA_LEAVES, MAGNITUDE_LEAF)


def layer_leaves(layer: LoRALayer) -> tuple[str, ...]:
    """The adapter leaves ``layer`` holds: ``lora_A``, ``lora_B`` and, with DoRA, the magnitude."""
    if getattr(layer, "use_dora", False) and layer.r > 0:
        return ADAPTER_LEAVES
    return LORA_LEAVES


def normalize_key(key: str) -> str:
    """Strip wrapper prefixes from a state-dict key or module name.

    ``_orig_mod`` path components (``torch.compile``) are dropped wherever they appear, and
    leading ``module.`` (DDP / DataParallel) and ``base_model.model.`` (PEFT) prefixes are
    dropped, repeatedly. Only whole dotted components are matched, so names such as
    ``weight_proj``, ``lora_bias`` or ``my_module`` are never changed.

    Args:
        key: A dotted key such as ``"_orig_mod.module.fc.lora_A"``.

    Returns:
        The key without wrapper prefixes, e.g. ``"fc.lora_A"``.
    """
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    changed = True
    while changed:
        changed = False
        for prefix in (("module",), ("base_model", "model")):
            n = len(prefix)
            if len(parts) > n and tuple(parts[:n]) == prefix:
                parts = parts[n:]
                changed = True
    return ".".join(parts)


def join_key(name: str, leaf: str) -> str:
    """``("a.b", "lora_A")`` -> ``"a.b.lora_A"`` (just the leaf for the root, ``""``)."""
    return f"{name}.{leaf}" if name else leaf


def split_key(key: str) -> tuple[str, str]:
    """``"a.b.lora_A"`` -> ``("a.b", "lora_A")``; the leaf is the last dotted component."""
    name, _, leaf = key.rpartition(".")
    return name, leaf


def normalize_name(name: str) -> str:
    """A module name without wrapper prefixes (as :func:`normalize_key` for a key)."""
    return split_key(normalize_key(join_key(name, "lora_A")))[0]


def _holds_weights(module: nn.Module) -> bool:
    return isinstance(module, LoRALayer) or any(p is not None for p in module._parameters.values())


def module_index(model: nn.Module) -> tuple[dict[str, tuple[str, nn.Module]], list[str]]:
    """Map normalised module names to ``(raw name, module)``; list real name collisions.

    Returns:
        ``({normalised name: (raw name, module)}, [collision messages])``.

    A wrapper and the model it wraps (``""`` and ``"module"`` under DDP, ``""`` and
    ``"_orig_mod"`` when compiled) normalise to the same name; the wrapped one, which holds
    the weights, wins. Two modules that both hold parameters under one name are a collision.
    """
    index: dict[str, tuple[str, nn.Module]] = {}
    collisions = []
    for raw, module in model.named_modules():
        norm = normalize_name(raw)
        if norm not in index:
            index[norm] = (raw, module)
            continue
        old_raw, old = index[norm]
        if _holds_weights(old) and _holds_weights(module):
            collisions.append(
                f"modules {old_raw!r} and {raw!r} both normalise to {norm!r} "
                "(wrapper prefixes _orig_mod./module./base_model.model. are stripped)"
            )
        elif _holds_weights(module) or (not _holds_weights(old) and len(raw) > len(old_raw)):
            index[norm] = (raw, module)
    return index, collisions


def module_aliases(
    model: nn.Module, index: Mapping[str, tuple[str, nn.Module]]
) -> tuple[dict[str, str], dict[int, list[str]]]:
    """Names of modules registered more than once (``model.a is model.b``).

    Returns:
        ``{alias: name}`` mapping every further normalised name of a module to the name it
        has in ``index`` (its first, in ``named_modules`` order), and ``{id(module): raw
        names}`` listing every dotted path a module is reachable under.
    """
    canonical: dict[int, str] = {}
    for norm, (_, module) in index.items():
        canonical.setdefault(id(module), norm)
    aliases: dict[str, str] = {}
    raw_names: dict[int, list[str]] = {}
    for raw, module in model.named_modules(remove_duplicate=False):
        raw_names.setdefault(id(module), []).append(raw)
        norm = normalize_name(raw)
        if norm not in index and id(module) in canonical:
            aliases.setdefault(norm, canonical[id(module)])
    return aliases, raw_names


def normalized_tensors(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors keyed by their normalised keys, and the problems (non-tensors, collisions)."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    problems = []
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            problems.append(f"entry {key!r} is not a (str, Tensor) pair")
            continue
        norm = normalize_key(key)
        if norm in tensors:
            problems.append(f"keys {origin[norm]!r} and {key!r} both normalise to {norm!r}")
            continue
        tensors[norm] = value
        origin[norm] = key
    return tensors, problems
