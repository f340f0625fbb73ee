"""modules_to_save in adapter files: validating and loading them, and PEFT's key format.

An adapter stores a saved module's whole state as ``<module>.<key>`` (``score.weight``,
``score.bias``; every parameter and persistent buffer), listed in the metadata under
``modules_to_save`` (``{"score": ["bias", "weight"]}``). PEFT stores the same keys under
``base_model.model.`` and lists the module names (matched as name endings) in
``adapter_config.json``'s ``modules_to_save``. The model side is
:mod:`lora_layers.modules_to_save`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .adapter_format import DTYPE_NAMES, DTYPES, Adapter, dtype_name, full_tensor, shape_of
from .base import LoRALayer
from .keys import join_key, module_aliases, module_index, normalize_name
from .load_report import LoadReport
from .modules_to_save import ORIGINAL_ATTR, save_module, saved_modules, saved_state

__all__ = [
    "SavedLoad",
    "apply_saved_loads",
    "peft_saved_modules",
    "peft_saved_tensors",
    "plan_saved_loads",
]


@dataclass
class SavedLoad:
    """One saved module to load: its names, the module, and the file's tensors by state key."""

    name: str  # normalised, as in the file
    raw_names: tuple[str, ...]  # every name the module has in the model
    module: nn.Module  # the trained copy, or the plain module to copy (inject)
    inject: bool
    tensors: dict[str, torch.Tensor]


def _tensor_problem(t: torch.Tensor, target: torch.Tensor) -> tuple[str, str] | None:
    """``(report list, why)`` the file's ``t`` cannot load into the model's ``target``."""
    if shape_of(t) != shape_of(target):
        return "shape_mismatches", f"file {shape_of(t)}, model {shape_of(target)}"
    if not target.is_floating_point():
        if t.dtype != target.dtype:
            why = f"file dtype {dtype_name(t.dtype)}, model {dtype_name(target.dtype)}"
            return "config_mismatches", why
        return None
    if t.dtype not in DTYPES:
        why = f"dtype {dtype_name(t.dtype)} is not supported (floating tensors: {DTYPE_NAMES})"
        return "config_mismatches", why
    if t.device.type != "meta" and not torch.isfinite(t).all():
        return "errors", f"holds {int((~torch.isfinite(t)).sum())} NaN/Inf values"
    return None


def _check_module(
    report: LoadReport, name: str, module: nn.Module, found: dict[str, torch.Tensor], inject: bool
) -> bool:
    """Check the file's state of one saved module against the model's module."""
    if ORIGINAL_ATTR not in module.__dict__:
        kind = type(module).__name__
        if not inject:
            why = f"is a plain {kind} and inject=False; the file trains it whole (modules_to_save)"
            report.add("config_mismatches", name, why)
            return False
        if any(isinstance(m, LoRALayer) for m in module.modules()):
            why = "the file trains it whole (modules_to_save) but the model has LoRA in it"
            report.add("config_mismatches", name, why)
            return False
    expected = module.state_dict(keep_vars=True)
    ok = True
    for key in expected:
        if key not in found:
            why = "the model's module has it; the file's modules_to_save entry does not"
            report.add("missing_keys", join_key(name, key), why)
            ok = False
    for key, t in found.items():
        full = join_key(name, key)
        if key not in expected:
            why = f"the model's {name!r} has no parameter or persistent buffer {key!r}"
            report.add("unexpected_keys", full, why)
            ok = False
            continue
        problem = _tensor_problem(t, expected[key])
        if problem is not None:
            kind, why = problem
            if kind == "errors":
                report.errors.append(f"{full}: {why}")
            else:
                report.add(kind, full, why)
            ok = False
    return ok


def _wanted(adapter: Adapter, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Saved module -> its state keys, from the metadata; a bare state dict uses the model's."""
    wanted = dict(adapter.modules_to_save)
    if adapter.modules is None:
        for raw, module in saved_modules(model):
            wanted.setdefault(normalize_name(raw), tuple(module.state_dict(keep_vars=True)))
    return wanted


def plan_saved_loads(
    report: LoadReport, adapter: Adapter, model: nn.Module, inject: bool, claimed: set[str]
) -> list[SavedLoad]:
    """Check the adapter's modules_to_save against the model; the loads without problems.

    Keys found go into ``claimed``; problems into ``report``. A saved module of the model the
    adapter does not store is reported as missing keys.
    """
    index, _ = module_index(model)
    aliases, raw_names = module_aliases(model, index)
    loads: list[SavedLoad] = []
    covered: set[int] = set()
    for name, keys in _wanted(adapter, model).items():
        found = {}
        for key in keys:
            full = join_key(name, key)
            if full in adapter.tensors:
                found[key] = adapter.tensors[full]
                claimed.add(full)
            elif adapter.modules is not None:
                report.add("missing_keys", full, "listed in the file's metadata but not stored")
        entry = index.get(aliases.get(name, name))
        if entry is None:
            for key in found:
                why = f"the model has no module named {name!r}"
                report.add("unexpected_keys", join_key(name, key), why)
            continue
        raw, module = entry
        covered.add(id(module))
        if _check_module(report, name, module, found, inject) and len(found) == len(keys):
            names = tuple(raw_names.get(id(module), [raw]))
            inject_it = ORIGINAL_ATTR not in module.__dict__
            loads.append(SavedLoad(name, names, module, inject_it, found))
    for raw, module in saved_modules(model):
        if id(module) not in covered:
            for key in module.state_dict(keep_vars=True):
                why = "the model trains this module whole (modules_to_save); the file lacks it"
                report.add("missing_keys", join_key(normalize_name(raw), key), why)
    return loads


def apply_saved_loads(model: nn.Module, report: LoadReport, loads: Iterable[SavedLoad]) -> None:
    """Load checked :class:`SavedLoad` s: copy plain modules first (inject), then the tensors."""
    with torch.no_grad():
        for load in loads:
            module = load.module
            if load.inject:
                module = save_module(model, module, load.raw_names, freeze_original=True)
                report.injected_modules.append(load.name)
            state = module.state_dict(keep_vars=True)
            for key, t in load.tensors.items():
                state[key].copy_(t)
                report.loaded_keys.append(join_key(load.name, key))


# --------------------------------------------------------------------------- PEFT
def peft_saved_modules(
    patterns: Iterable[str] | None, keys: Iterable[str], skip: Iterable[str] = ()
) -> dict[str, tuple[str, ...]]:
    """The saved modules a PEFT file holds: ``{module: state keys}``.

    PEFT saves a ``modules_to_save`` module's state under its own name (the
    ``modules_to_save.<adapter>`` level removed) and matches the config's names as name
    endings (``name.endswith(entry)``, its ``_set_trainable``). A key belongs to the
    shortest dotted prefix of it that ends with an entry; ``skip`` lists keys already
    accounted for (LoRA tensors).
    """
    patterns = [p for p in (patterns or ()) if isinstance(p, str) and p]
    skip = set(skip)
    out: dict[str, list[str]] = {}
    for key in keys:
        if key in skip:
            continue
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if any(prefix.endswith(p) for p in patterns):
                out.setdefault(prefix, []).append(".".join(parts[i:]))
                break
    return {name: tuple(keys) for name, keys in out.items()}


def peft_saved_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """``(PEFT file tensors, modules_to_save names, problems)`` of the model's saved modules.

    A name is a problem when PEFT, matching name endings, would also pick another module.
    """
    saved = saved_state(model)
    tensors = {
        f"base_model.model.{join_key(name, key)}": full_tensor(t)
        for name, state in saved.items()
        for key, t in state.items()
    }
    index, _ = module_index(model)
    problems = []
    for name in saved:
        others = [n for n in index if n != name and n.endswith(name) and n not in saved]
        if others:
            problems.append(
                f"modules_to_save {name!r}: PEFT matches names by their ending and would also "
                f"train {others[0]!r}"
            )
    return tensors, sorted(saved), problems
