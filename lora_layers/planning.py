"""Planning: decide which modules get LoRA and with which :class:`LoRAConfig`, changing nothing.

:func:`plan_lora` matches the target, fused, exclude and pattern keys against a model and
returns a :class:`LoRAPlan` (module name -> config) that :func:`~lora_layers.inject_lora`
consumes as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from .config import LoRAConfig
from .kinds import check_target, is_hf_conv1d, is_linear, wrappable_kind
from .layouts import as_config, resolve_fused
from .matching import (
    TargetPatterns,
    Targets,
    excluded_names,
    first_match,
    is_excluded,
    no_match_message,
    walk_modules,
)

__all__ = ["LoRAPlan", "plan_lora"]


class LoRAPlan(dict):
    """What :func:`plan_lora` decided: dotted module name -> :class:`LoRAConfig`.

    A plain ``dict`` in ``named_modules`` order (each module under its first name), plus what
    :func:`~lora_layers.inject_lora` needs to carry it out.

    Attributes:
        modules: Name -> the module planned for, as it was when planned.
        names: Name -> every name the module is registered under (``model.a is model.b``).
    """

    def __init__(
        self,
        configs: Mapping[str, LoRAConfig],
        modules: Mapping[str, nn.Module],
        names: Mapping[str, tuple[str, ...]],
    ) -> None:
        super().__init__(configs)
        self.modules = dict(modules)
        self.names = dict(names)


class _Keys:
    """Every key argument of :func:`plan_lora`, compiled, with the values keyed by index."""

    def __init__(
        self,
        target_modules: Targets | None,
        fused: Mapping | None,
        exclude_modules: Targets | None,
        rank_pattern: Mapping | None,
        alpha_pattern: Mapping | None,
    ) -> None:
        if target_modules is None and not fused:
            raise ValueError("give target_modules (names, regexes, types or 'all-linear') or fused")
        self.exclude_arg = exclude_modules
        self.targets = TargetPatterns(target_modules, "target_modules", allow_all_linear=True)
        self.excludes = TargetPatterns(exclude_modules, "exclude_modules")
        self.fused = TargetPatterns(list(fused or {}), "fused")
        self.ranks = TargetPatterns(list(rank_pattern or {}), "rank_pattern")
        self.alphas = TargetPatterns(list(alpha_pattern or {}), "alpha_pattern")
        self.fused_values = list((fused or {}).values())
        self.rank_values = list((rank_pattern or {}).values())
        self.alpha_values = list((alpha_pattern or {}).values())
        self.need_suffixes = any(
            p.names for p in (self.targets, self.excludes, self.fused, self.ranks, self.alphas)
        )

    def match(self, patterns: TargetPatterns, names: list[str], module: nn.Module) -> int | None:
        """The first key of ``patterns`` matching the module under any of its names."""
        return first_match(patterns, names, module, self.need_suffixes) if patterns else None

    def check_matched(self, modules: dict[str, nn.Module]) -> None:
        """Raise for the first target, fused or exclude key that matched no module."""
        for patterns, what in (
            (self.targets, "target"),
            (self.fused, "fused key"),
            (self.excludes, "exclude_modules entry"),
        ):
            missing = patterns.unmatched()
            if missing:
                raise ValueError(no_match_message(what, missing[0], modules))


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def _model_config(model: nn.Module, config: Any) -> Any:
    if config is None:
        config = getattr(model, "config", None)
        get_text = getattr(config, "get_text_config", None)
        if callable(get_text):
            with contextlib.suppress(TypeError, ValueError):
                config = get_text(decoder=True)
    return as_config(config)


def _is_target(keys: _Keys, names: list[str], module: nn.Module, head: Any) -> tuple[bool, bool]:
    """``(is a target, matched by a broad key only: a module type or "all-linear")``."""
    targets = keys.targets
    hit = keys.match(targets, names, module)
    if hit is not None:
        return True, targets.is_type(hit)
    if targets.all_linear is None or module is head:
        return False, False
    linear = is_linear(module)
    if linear:
        targets.hit[targets.all_linear] = True
    return linear, linear


def _choose(model: nn.Module, keys: _Keys, modules: dict, names_of: dict) -> list[tuple]:
    """``(name, module, index of its fused key or None)`` for every module to wrap."""
    head = _output_head(model) if keys.targets.all_linear is not None else None
    mha_children = {
        id(child)
        for m in modules.values()
        if isinstance(m, nn.MultiheadAttention)
        for child in m.children()
    }
    # A module registered under several names (model.a is model.b) is one module: it is a
    # target if any of its names matches, excluded if any of its names or a container holding
    # it is excluded, and is replaced under every name.
    excluded = excluded_names(model, keys.excludes, keys.need_suffixes)
    chosen = []
    for name, module in modules.items():
        if not name:
            continue  # the root cannot be replaced in place
        names = names_of[id(module)]
        is_target, broad = _is_target(keys, names, module, head)
        fused_at = keys.match(keys.fused, names, module)
        if not (is_target or fused_at is not None) or is_excluded(names, excluded):
            continue
        if id(module) in mha_children:
            if broad and fused_at is None:
                continue  # nn.MultiheadAttention reads these weights directly, not via forward
            raise ValueError(
                f"cannot put LoRA on {name!r}: nn.MultiheadAttention uses its projection "
                "weights directly, never calling this layer, so LoRA there would have no effect"
            )
        check_target(name, module)
        chosen.append((name, module, fused_at))
    keys.check_matched(modules)
    if not chosen:
        raise ValueError(
            "no module left to wrap: every target is excluded by "
            f"exclude_modules={keys.exclude_arg!r}"
        )
    return chosen


def _assign(keys: _Keys, chosen: list, names_of: dict, base: LoRAConfig, config: Any) -> dict:
    """The config of every chosen module (rank/alpha overrides and fused slices applied)."""
    plan: dict[str, LoRAConfig] = {}
    cache: dict[tuple, LoRAConfig] = {}
    for name, module, fused_at in chosen:
        names = names_of[id(module)]
        ri, ai = keys.match(keys.ranks, names, module), keys.match(keys.alphas, names, module)
        r = base.r if ri is None else keys.rank_values[ri]
        alpha = base.lora_alpha if ai is None else keys.alpha_values[ai]
        fused = None
        if fused_at is not None:
            if wrappable_kind(module) is not nn.Linear and not is_hf_conv1d(module):
                raise ValueError(
                    f"fused slices only apply to linear layers; {name!r} is {type(module).__name__}"
                )
            fused = resolve_fused(name, module, keys.fused_values[fused_at], config)
        key = (r, alpha, fused)
        if key not in cache:
            cache[key] = dataclasses.replace(base, r=r, lora_alpha=alpha, fused=fused)
        if cache[key].r > 0:
            plan[name] = cache[key]
    for patterns, arg in ((keys.ranks, "rank_pattern"), (keys.alphas, "alpha_pattern")):
        if patterns.unmatched():
            raise ValueError(
                f"{arg} key {patterns.unmatched()[0]!r} matched none of the targeted modules"
            )
    return plan


def _base_config(lora_config: LoRAConfig | None, given: dict[str, Any]) -> LoRAConfig:
    if lora_config is None:
        return LoRAConfig(**given)
    if not isinstance(lora_config, LoRAConfig):
        raise TypeError(f"lora_config must be a LoRAConfig, got {lora_config!r}")
    defaults = {f.name: f.default for f in fields(LoRAConfig)}
    changed = [k for k, v in given.items() if v != defaults[k]]
    if changed:
        raise ValueError(
            f"pass the settings either in lora_config or as arguments, not both (got {changed})"
        )
    return lora_config


def plan_lora(
    model: nn.Module,
    target_modules: Targets | None = None,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    *,
    fused: Mapping | None = None,
    exclude_modules: Targets | None = None,
    rank_pattern: Mapping | None = None,
    alpha_pattern: Mapping | None = None,
    use_rslora: bool = False,
    lora_dtype: torch.dtype | None = None,
    merge_weights: bool = False,
    use_dora: bool = False,
    config: Any = None,
    lora_config: LoRAConfig | None = None,
) -> LoRAPlan:
    """Decide which modules :func:`inject_lora` would wrap, and how, without changing anything.

    Takes the same arguments as :func:`inject_lora` (minus the ones that act on the model);
    ``inject_lora(model, plan=plan_lora(model, ...))`` carries the plan out.

    Args:
        lora_config: The settings every module gets (before ``rank_pattern`` /
            ``alpha_pattern`` / ``fused``), instead of ``r``, ``lora_alpha``,
            ``lora_dropout``, ``use_rslora``, ``lora_dtype`` and ``merge_weights``.

    Returns:
        LoRAPlan: Dotted module name -> :class:`LoRAConfig`, in ``named_modules`` order.
        Modules whose rank resolves to 0 (via ``rank_pattern``) are left out.

    Raises:
        ValueError, TypeError: As :func:`inject_lora`.
    """
    given = {
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "use_rslora": use_rslora,
        "merge_weights": merge_weights,
        "lora_dtype": lora_dtype,
        "use_dora": use_dora,
    }
    base = _base_config(lora_config, given)
    keys = _Keys(target_modules, fused, exclude_modules, rank_pattern, alpha_pattern)
    modules, names_of = walk_modules(model)
    chosen = _choose(model, keys, modules, names_of)
    configs = _assign(keys, chosen, names_of, base, _model_config(model, config))
    names = {name: tuple(names_of[id(modules[name])]) for name in configs}
    return LoRAPlan(configs, {name: modules[name] for name in configs}, names)
