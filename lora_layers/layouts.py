"""Fused projections: the one table of known layouts, and how slice sizes come from a config.

:data:`FUSED_LAYOUTS` is keyed by a module's last name component (Phi-3 ``qkv_proj`` /
``gate_up_proj``, GPT-2 ``c_attn``). Each :class:`FusedLayout` names its output slices (what a
user writes in ``fused={"qkv_proj": "qv"}``), says how their sizes follow from the layer and
the model config, and names the separate projections it stands for (what
:func:`~lora_layers.split_fused` produces). Add an entry to teach every path a new layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple

from torch import nn

from .config import FusedSpec
from .kinds import out_features

__all__ = [
    "FUSED_LAYOUTS",
    "PHI3_FUSED",
    "FusedLayout",
    "as_config",
    "parse_slice_names",
    "phi3_split_sizes",
    "qkv_split_sizes",
    "resolve_fused",
]

_SLICE_SEPARATORS = re.compile(r"[\s,+/|]+")


def as_config(config: Any) -> Any:
    """A config object from an object or a mapping (a mapping's keys become attributes)."""
    return SimpleNamespace(**config) if isinstance(config, Mapping) else config


def qkv_split_sizes(config: Any) -> tuple[int, int, int]:
    """q/k/v output sizes of a fused ``qkv_proj`` under (grouped-query) attention.

    Args:
        config: A config with ``num_attention_heads``, optional ``num_key_value_heads``
            (default: the head count) and ``head_dim`` (default: ``hidden_size // heads``).

    Returns:
        ``(heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)``.
    """
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", None) // heads
    return (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)


def _qkv_layout(name: str, out: int, config: Any) -> tuple[int, ...]:
    """q/k/v sizes of a Phi-3 style ``qkv_proj``: q heads, then k and v kv-heads, contiguous."""
    if config is None or not getattr(config, "num_attention_heads", None):
        raise ValueError(
            f"cannot tell the q/k/v sizes of {name!r}: the model has no config with "
            "num_attention_heads; pass config=... to inject_lora, or give the sizes with "
            "FusedSpec(split_sizes=(q, k, v), enable_lora=(True, False, True))"
        )
    sizes = qkv_split_sizes(config)
    if sum(sizes) != out:
        raise ValueError(
            f"the config gives q/k/v sizes {sizes} (num_attention_heads="
            f"{config.num_attention_heads}), summing to {sum(sizes)}, but {name!r} has "
            f"out_features={out}; pass FusedSpec(split_sizes=..., enable_lora=...)"
        )
    return sizes


def _halves_layout(name: str, out: int, config: Any) -> tuple[int, ...]:
    """gate/up halves of a Phi-3 style ``gate_up_proj`` (the forward does ``chunk(2)``)."""
    if out % 2:
        raise ValueError(f"{name!r} has odd out_features={out}; cannot split in halves")
    return (out // 2,) * 2


def _thirds_layout(name: str, out: int, config: Any) -> tuple[int, ...]:
    """q/k/v thirds of GPT-2's ``c_attn`` (always multi-head attention)."""
    if out % 3:
        raise ValueError(f"{name!r} has out_features={out}, not divisible into q/k/v")
    return (out // 3,) * 3


class FusedLayout(NamedTuple):
    """One known fused projection.

    Attributes:
        slices: The slice names a user may write, in output order (``("q", "k", "v")``).
        sizes: ``(module_name, out_features, config) -> split_sizes``.
        parts: Leaf names of the separate projections it fuses, in output order (``()``:
            none known, so :func:`~lora_layers.split_fused` does not split it by default).
        config_sizes: ``config -> split_sizes`` without a layer at hand (None: unknown).
    """

    slices: tuple[str, ...]
    sizes: Callable[[str, int, Any], tuple[int, ...]]
    parts: tuple[str, ...] = ()
    config_sizes: Callable[[Any], tuple[int, ...]] | None = None


#: Known fused projections, by the last component of the module name. A plain
#: ``(slice names, sizes function)`` pair is accepted too.
FUSED_LAYOUTS: dict[str, FusedLayout] = {
    "qkv_proj": FusedLayout(
        ("q", "k", "v"), _qkv_layout, ("q_proj", "k_proj", "v_proj"), qkv_split_sizes
    ),
    "gate_up_proj": FusedLayout(
        ("gate", "up"),
        _halves_layout,
        ("gate_proj", "up_proj"),
        lambda config: (config.intermediate_size,) * 2,
    ),
    "c_attn": FusedLayout(("q", "k", "v"), _thirds_layout),
}

#: Phi-3's fused projections and the separate projections they stand for, in output order.
PHI3_FUSED: dict[str, tuple[str, ...]] = {
    leaf: FUSED_LAYOUTS[leaf].parts for leaf in ("qkv_proj", "gate_up_proj")
}


def phi3_split_sizes(config: Any) -> dict[str, tuple[int, ...]]:
    """Output slice sizes of Phi-3's fused projections, from a ``Phi3Config``.

    Returns:
        ``{"qkv_proj": (q, k, v), "gate_up_proj": (intermediate, intermediate)}`` where
        ``q = num_attention_heads * head_dim`` and ``k = v = num_key_value_heads * head_dim``.
    """
    config = as_config(config)
    return {leaf: tuple(FUSED_LAYOUTS[leaf].config_sizes(config)) for leaf in PHI3_FUSED}


def parse_slice_names(value: str | Sequence[str], names: tuple[str, ...], where: str) -> set:
    """The slice names chosen by ``value`` (``"qv"``, ``"q,v"``, ``["gate"]``, ``"all"``).

    Raises:
        ValueError: If a name is unknown or none is given.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return set(names)
        tokens = [t for t in _SLICE_SEPARATORS.split(text) if t]
        if len(tokens) == 1 and tokens[0] not in names and all(len(n) == 1 for n in names):
            tokens = list(tokens[0])  # "qv" -> ["q", "v"]
    else:
        tokens = [str(t).lower() for t in value]
    unknown = [t for t in tokens if t not in names]
    if unknown or not tokens:
        example = "".join(names[::2]) if all(len(n) == 1 for n in names) else names[-1]
        raise ValueError(
            f"fused slices {value!r} for {where}: unknown slice name(s) {unknown}; "
            f"the slices are {names}; write e.g. {example!r} or 'all'"
        )
    return set(tokens)


def _from_flags(name: str, out: int, enable: tuple[bool, ...], layout: Any, config: Any):
    if layout is not None and len(layout[0]) == len(enable):
        return FusedSpec(layout[1](name, out, config), enable)
    if out % len(enable):
        raise ValueError(
            f"{len(enable)} slices do not divide out_features={out} of {name!r}; "
            "give the sizes with FusedSpec(split_sizes=..., enable_lora=...)"
        )
    return FusedSpec((out // len(enable),) * len(enable), enable)


def resolve_fused(
    name: str,
    module: nn.Module,
    slices: str | Sequence[str] | Sequence[bool] | FusedSpec,
    config: Any = None,
) -> FusedSpec:
    """Turn a short slice choice for a fused projection into sizes and enable flags.

    The layout is looked up in :data:`FUSED_LAYOUTS` by the last component of ``name``:
    ``qkv_proj`` -> slices ``q, k, v`` sized from ``config`` (``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim`` or ``hidden_size // num_attention_heads``), so both
    Phi-3-mini (32/32 heads: equal thirds) and Phi-3-medium (40/10 heads: 5120/1280/1280) work;
    ``gate_up_proj`` -> halves ``gate, up``; ``c_attn`` (GPT-2) -> equal thirds ``q, k, v``.

    Args:
        name: Dotted module name (its last component picks the layout).
        module: The fused ``nn.Linear`` (or transformers ``Conv1D``).
        slices: Which slices get LoRA: slice names (``"qv"``, ``"q,v"``, ``["gate"]``,
            ``"all"``), one bool per slice (sizes from the layout, or equal), or a
            :class:`FusedSpec` with explicit sizes (any module name).
        config: The model config (``model.config`` of a transformers model); an object or a
            mapping with the attributes above.

    Returns:
        FusedSpec: The slice sizes and enable flags.

    Raises:
        ValueError: If the layout is unknown for slice names, the config is missing or does
            not match ``out_features``, or a slice name is unknown.
    """
    out = out_features(module)
    config = as_config(config)
    if isinstance(slices, FusedSpec):
        if sum(slices.split_sizes) != out:
            raise ValueError(
                f"FusedSpec split_sizes={slices.split_sizes} sum to {sum(slices.split_sizes)}, "
                f"but {name!r} has out_features={out}"
            )
        return slices
    layout = FUSED_LAYOUTS.get(name.rpartition(".")[2])
    if isinstance(slices, Sequence) and slices and all(isinstance(s, bool) for s in slices):
        return _from_flags(name, out, tuple(slices), layout, config)
    if layout is None:
        raise ValueError(
            f"no known slice layout for {name!r} (known: {', '.join(FUSED_LAYOUTS)}); "
            "give the sizes with FusedSpec(split_sizes=..., enable_lora=...)"
        )
    names, sizes_fn = layout[0], layout[1]
    chosen = parse_slice_names(slices, names, repr(name))
    return FusedSpec(sizes_fn(name, out, config), tuple(n in chosen for n in names))
