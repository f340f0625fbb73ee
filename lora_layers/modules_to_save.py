"""modules_to_save: whole modules trained beside the LoRA adapters (PEFT's ``modules_to_save``).

``inject_lora(model, ..., modules_to_save=["score"])`` trains every parameter of the
matched modules (a classification head, say) and the adapter files carry their weights.
Each matched module is replaced by a deep copy of itself, which trains; the original
module object is kept aside, frozen and untouched, so:

- the model keeps its structure, classes and ``state_dict`` keys (``score.weight`` is the
  trained copy's weight), so ``save_pretrained`` and ``transformers`` code keep working;
- :func:`~lora_layers.unload` puts the original object back (the base model as it was);
  :func:`~lora_layers.merge_and_unload` keeps the trained copy;
  :func:`~lora_layers.disable_adapters` runs the original in its place.

The original is not registered in the model: it is not in ``parameters()`` or
``state_dict()`` and ``model.to()`` does not move it. It follows the copy's device and dtype
when it is put back. Memory: one extra copy of each saved module's tensors, as in PEFT, but
where the module was when injected (inject on the CPU, then move the model: the original
stays in host memory).

This module holds the model side (matching, copying, restoring, the state to save); files
and PEFT interop are in :mod:`lora_layers.modules_to_save_io`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .base import LoRALayer
from .keys import normalize_name
from .matching import TargetPatterns, Targets, first_match, walk_modules

__all__ = [
    "ORIGINAL_ATTR",
    "SavePlan",
    "carry_saved",
    "find_modules_to_save",
    "forget_originals",
    "original_of",
    "originals_swapped",
    "parse_saved_metadata",
    "restore_originals",
    "save_module",
    "save_modules",
    "saved_modules",
    "saved_state",
    "saved_state_keys",
]

ORIGINAL_ATTR = "_lora_saved_original"  # in a trained copy's __dict__: the original module

# Dotted name -> (the module as planned, every name it is registered under).
SavePlan = dict[str, tuple[nn.Module, tuple[str, ...]]]


def original_of(module: nn.Module) -> nn.Module | None:
    """The original module a trained copy stands in for (None: ``module`` is not one)."""
    return module.__dict__.get(ORIGINAL_ATTR)


def saved_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, trained copy)`` for every module of ``model`` in modules_to_save."""
    for name, module in model.named_modules():
        if ORIGINAL_ATTR in module.__dict__:
            yield name, module


def saved_state_keys(model: nn.Module) -> list[str]:
    """The ``model.state_dict()`` keys of the saved modules (parameters, persistent buffers)."""
    return [
        f"{name}.{key}" if name else key
        for name, module in saved_modules(model)
        for key in module.state_dict(keep_vars=True)
    ]


def saved_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{normalised module name: {state key: tensor}}`` of every saved module (detached).

    Raises:
        ValueError: If two saved modules normalise to the same name.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for raw, module in saved_modules(model):
        name = normalize_name(raw)
        if name in out:
            raise ValueError(f"two modules_to_save modules normalise to the name {name!r}")
        out[name] = {k: t.detach() for k, t in module.state_dict(keep_vars=True).items()}
    return out


def _no_match(key: Any, modules: Mapping[str, nn.Module]) -> str:
    names = [n for n in modules if n]
    leaves = list(dict.fromkeys(n.rpartition(".")[2] for n in names))
    text = f"modules_to_save entry {key!r} matched no module"
    if isinstance(key, str):
        close = difflib.get_close_matches(key, leaves + names, n=3, cutoff=0.6)
        if close:
            text += f"; did you mean {', '.join(map(repr, close))}?"
    return text + f" Modules here include: {', '.join(leaves[:12])}"


def _check_savable(name: str, module: nn.Module) -> None:
    if ORIGINAL_ATTR in module.__dict__:
        raise ValueError(f"modules_to_save: {name!r} is already in modules_to_save")
    if any(isinstance(m, LoRALayer) for m in module.modules()):
        raise ValueError(
            f"modules_to_save: {name!r} is or holds a LoRA layer; a module trained whole "
            "cannot also have LoRA (unload it first, or leave it out of modules_to_save)"
        )


def find_modules_to_save(model: nn.Module, keys: Targets | None) -> SavePlan:
    """The modules ``keys`` name, matched as LoRA targets are (names, suffixes, regexes, types).

    Args:
        model: The model.
        keys: A key or a list of keys, as ``target_modules`` (no ``"all-linear"``); None: none.

    Returns:
        SavePlan: Name -> ``(module, every name it has)``, in ``named_modules`` order.

    Raises:
        ValueError: If a key matches no module but the root (the message lists
            candidates), or a match is inside another match or a module saved before, holds a
            LoRA layer or is already saved.
        TypeError: If a key is not a name, regex or module type.
    """
    patterns = TargetPatterns(keys, "modules_to_save")
    if not patterns:
        return {}
    modules, names_of = walk_modules(model)
    found: SavePlan = {}
    for name, module in modules.items():
        names = names_of[id(module)]
        if not name or first_match(patterns, names, module, need_suffixes=True) is None:
            continue  # the root cannot be replaced in place
        _check_savable(name, module)
        found[name] = (module, tuple(names))
    missing = patterns.unmatched()
    if missing:
        raise ValueError(_no_match(missing[0], modules))
    all_names = {n for _, names in found.values() for n in names}
    all_names |= {
        n for m in modules.values() if ORIGINAL_ATTR in m.__dict__ for n in names_of[id(m)]
    }
    for name, (_, names) in found.items():
        for n in names:
            parts = n.split(".")
            outer = [".".join(parts[:i]) for i in range(1, len(parts))]
            inside = [o for o in outer if o in all_names]
            if inside:
                raise ValueError(
                    f"modules_to_save: {name!r} is inside {inside[0]!r}, which is also "
                    "saved whole; name only the outer module"
                )
    return found


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def _warn_if_tied(model: nn.Module, name: str, module: nn.Module) -> None:
    inside = {id(m) for m in module.modules()}
    own = {id(p) for p in module.parameters()}
    for other_name, other in model.named_modules():
        if id(other) in inside:
            continue
        if any(p is not None and id(p) in own for p in other._parameters.values()):
            warnings.warn(
                f"modules_to_save: {name!r} shares a parameter with {other_name!r} (tied "
                "weights); the trained copy of it is untied, the other module keeps the original",
                stacklevel=4,
            )
            return


def save_module(
    model: nn.Module, module: nn.Module, names: tuple[str, ...], freeze_original: bool = True
) -> nn.Module:
    """Put a trainable deep copy of ``module`` under each of its ``names``; return the copy.

    The copy's floating-point parameters train (``requires_grad=True``); the original is
    kept on the copy (see :func:`original_of`), frozen when ``freeze_original``.
    """
    _warn_if_tied(model, names[0], module)
    trained = copy.deepcopy(module)
    trained.__dict__[ORIGINAL_ATTR] = module
    for p in trained.parameters():
        if p.is_floating_point() or p.is_complex():
            p.requires_grad_(True)
    if freeze_original:
        module.requires_grad_(False)
    for name in names:
        _set_child(model, name, trained)
    return trained


def save_modules(model: nn.Module, plan: SavePlan, freeze_original: bool = True) -> None:
    """Carry out a :func:`find_modules_to_save` plan on ``model`` (see :func:`save_module`).

    Raises:
        ValueError: If the model changed since the plan was made.
    """
    for name, (module, _) in plan.items():
        if model.get_submodule(name) is not module:
            raise ValueError(f"the plan was made for another model: {name!r} has changed since")
    for module, names in plan.values():
        save_module(model, module, names, freeze_original)


def _follow(original: nn.Module, trained: nn.Module) -> None:
    """Move the original's tensors to the trained copy's device (and float dtype), in place.

    What ``model.to()`` did to the copy, done to the original: a tensor that must move gets
    a new Parameter (or buffer) on its module; the module objects stay the same.
    """
    moved: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for sub_name, sub in original.named_modules():
            for store, get in (
                (sub._parameters, trained.get_parameter),
                (sub._buffers, trained.get_buffer),
            ):
                for leaf, t in list(store.items()):
                    try:
                        ref = get(f"{sub_name}.{leaf}" if sub_name else leaf)
                    except AttributeError:
                        continue
                    if t is None or ref is None:
                        continue
                    floats = t.is_floating_point() and ref.is_floating_point()
                    dtype = ref.dtype if floats else t.dtype
                    if (t.device, t.dtype) == (ref.device, dtype):
                        continue
                    if id(t) not in moved:
                        new = t.to(ref.device, dtype)
                        is_param = isinstance(t, nn.Parameter)
                        moved[id(t)] = nn.Parameter(new, t.requires_grad) if is_param else new
                    store[leaf] = moved[id(t)]


def _swaps(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, trained copy, original)`` for every name of every saved module."""
    modules, names_of = walk_modules(model)
    return [
        (alias, module, module.__dict__[ORIGINAL_ATTR])
        for module in modules.values()
        if ORIGINAL_ATTR in module.__dict__
        for alias in names_of[id(module)]
    ]


def restore_originals(model: nn.Module) -> nn.Module:
    """Put every saved module's original back (moved to the copy's device/dtype); drop the copies."""
    for name, trained, original in _swaps(model):
        _follow(original, trained)
        _set_child(model, name, original)
    return model


def forget_originals(model: nn.Module) -> nn.Module:
    """Keep the trained copies as plain modules; drop the originals they carry."""
    for _, module in list(saved_modules(model)):
        del module.__dict__[ORIGINAL_ATTR]
    return model


@contextlib.contextmanager
def originals_swapped(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with every saved module's original in place of its trained copy."""
    swaps = _swaps(model)
    for name, trained, original in swaps:
        _follow(original, trained)
        _set_child(model, name, original)
    try:
        yield model
    finally:
        for name, trained, _ in swaps:
            _set_child(model, name, trained)


def parse_saved_metadata(value: object) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """The ``modules_to_save`` metadata object ``{module: [state keys]}`` and its problems."""
    if value is None:
        return {}, []
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(s, str) for s in v)
        for k, v in value.items()
    )
    if not ok:
        return {}, [f"metadata 'modules_to_save' must map module names to key lists, got {value!r}"]
    return {normalize_name(k): tuple(v) for k, v in value.items()}, []


def carry_saved(
    saved: Mapping[str, tuple[str, ...]],
    src: Mapping[str, torch.Tensor],
    dst: dict[str, torch.Tensor],
) -> dict[str, tuple[str, ...]]:
    """Copy the modules_to_save tensors ``saved`` lists from ``src`` into ``dst`` (cloned).

    For adapter conversions (:func:`~lora_layers.split_fused`, ...) that keep them as they are.
    """
    for name, keys in saved.items():
        for key in keys:
            full = f"{name}.{key}" if name else key
            if full in src:
                dst[full] = src[full].clone()
    return dict(saved)
