"""Module surgery: put LoRA into any ``nn.Module`` in place, and take it out again.

One call replaces the targeted layers of a model (a ``transformers`` model included) with
:mod:`lora_layers` layers that share the original Parameters, so nothing is copied and a
model built on the meta device stays on meta::

    inject_lora(model, "all-linear", r=16, lora_alpha=32, lora_dropout=0.05)
    inject_lora(model, fused={"qkv_proj": "qv"}, r=16, lora_alpha=32)  # q and v of Phi-3's qkv

Targets are exact dotted names or name suffixes (``"qkv_proj"`` matches
``model.layers.0.self_attn.qkv_proj``), full-match regular expressions (any string with a
regex metacharacter, or a compiled ``re.Pattern``), module types, or ``"all-linear"``.
A fused projection (Phi-3's ``qkv_proj`` and ``gate_up_proj``) can get LoRA on some of its
output slices only; the slice sizes come from the model's config (see :func:`resolve_fused`).

:func:`unload` puts back plain torch layers holding the original Parameters (the very same
objects); :func:`merge_and_unload` puts back plain layers holding merged weights;
:func:`merge_lora` / :func:`unmerge_lora` merge or unmerge every LoRA layer of a model.

The building blocks are public so other code can drive them: :func:`plan_lora` (which modules
would get which :class:`InjectSpec`, without touching the model), :func:`wrap_module` (one
layer), :func:`replace_module` (swap a submodule by dotted name) and :func:`resolve_fused`
(slice sizes of a fused projection).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import numbers
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import LoRALayer, check_lora_args
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear
from .merged import MergedLinear
from .quantized import QuantizedLoRALinear, find_quantized_lora_class, quantized_lora_class
from .utils import lora_modules, mark_only_lora_as_trainable

__all__ = [
    "ALL_LINEAR",
    "FUSED_LAYOUTS",
    "FusedSpec",
    "InjectSpec",
    "count_parameters",
    "enable_input_require_grads",
    "inject_lora",
    "lora_module_names",
    "merge_and_unload",
    "merge_lora",
    "plan_lora",
    "qkv_split_sizes",
    "replace_module",
    "resolve_fused",
    "unload",
    "unmerge_lora",
    "wrap_module",
]

ALL_LINEAR = "all-linear"

# One target key: a name / suffix / regex string, a compiled regex, or a module type.
TargetKey = str | re.Pattern | type
Targets = TargetKey | Iterable[TargetKey]

_NAME_KEY = re.compile(r"[\w.\-]+")  # plain dotted names; anything else is a regex
_SLICE_SEPARATORS = re.compile(r"[\s,+/|]+")
_SUPPORTED = "nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d and transformers' Conv1D"
_SHELL = "_lora_base_shell"  # attribute of a LoRA layer: the replaced module, minus its params
_HOOK = "_lora_input_grads_hook"  # attribute of a model: our input-embeddings forward hook


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class FusedSpec:
    """Output slices of a fused projection and which of them get LoRA.

    Attributes:
        split_sizes: Size of each output slice, in order; they sum to ``out_features``.
        enable_lora: One flag per slice; True slices get their own LoRA update.

    Raises:
        ValueError: If the two tuples differ in length, a size is not a positive int, or no
            slice is enabled.
    """

    split_sizes: tuple[int, ...]
    enable_lora: tuple[bool, ...]

    def __post_init__(self) -> None:
        sizes, enable = tuple(self.split_sizes), tuple(bool(e) for e in self.enable_lora)
        if len(sizes) != len(enable) or not sizes:
            raise ValueError(
                f"FusedSpec needs one enable flag per slice, got split_sizes={sizes} "
                f"and enable_lora={enable}"
            )
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0 for s in sizes):
            raise ValueError(f"split_sizes must be positive ints, got {sizes}")
        if not any(enable):
            raise ValueError(f"enable_lora={enable} enables no slice; leave the module untargeted")
        object.__setattr__(self, "split_sizes", tuple(int(s) for s in sizes))
        object.__setattr__(self, "enable_lora", enable)


@dataclass(frozen=True)
class InjectSpec:
    """Everything needed to wrap one layer: what :func:`plan_lora` decides per module.

    Attributes:
        r: Rank (per enabled slice for a fused projection).
        lora_alpha: Scaling numerator.
        lora_dropout: Dropout on the LoRA branch's input (ignored by embeddings).
        use_rslora: Scale by ``lora_alpha / sqrt(r)``.
        merge_weights: Merge on ``eval()`` / unmerge on ``train()`` (loralib's contract).
        lora_dtype: Dtype of ``lora_A`` / ``lora_B`` (None: the base weight's).
        fused: Slices of a fused projection (None: one update over the whole output).

    Raises:
        TypeError, ValueError: For invalid ``r`` / ``lora_alpha`` / ``lora_dropout``.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    merge_weights: bool = False
    lora_dtype: torch.dtype | None = None
    fused: FusedSpec | None = None

    def __post_init__(self) -> None:
        check_lora_args(self.r, self.lora_alpha, self.lora_dropout)
        if self.lora_dtype is not None and not isinstance(self.lora_dtype, torch.dtype):
            raise TypeError(f"lora_dtype must be a torch.dtype or None, got {self.lora_dtype!r}")

    @classmethod
    def from_layer(cls, layer: LoRALayer) -> InjectSpec:
        """The spec that rebuilds ``layer``'s LoRA configuration (for saving metadata).

        Args:
            layer: A lora_layers layer.

        Returns:
            InjectSpec: Its rank, alpha, dropout, rsLoRA flag, merge mode, LoRA dtype and slices.
        """
        fused = None
        if getattr(layer, "enable_lora", None) is not None:  # MergedLinear, fused quantized
            fused = FusedSpec(layer.split_sizes, layer.enable_lora)
        lora_dtype = layer.lora_A.dtype if layer.r > 0 else None
        return cls(
            r=layer.r,
            lora_alpha=layer.lora_alpha,
            lora_dropout=layer.dropout_p,
            use_rslora=layer.use_rslora,
            merge_weights=layer.merge_weights,
            lora_dtype=None if lora_dtype == layer.weight.dtype else lora_dtype,
            fused=fused,
        )


# --------------------------------------------------------------------------- fused layouts
def _config_value(config: Any, key: str) -> Any:
    return getattr(config, key, None)


def qkv_split_sizes(config: Any) -> tuple[int, int, int]:
    """q/k/v output sizes of a fused ``qkv_proj`` under (grouped-query) attention.

    Args:
        config: A config with ``num_attention_heads``, optional ``num_key_value_heads``
            (default: the head count) and ``head_dim`` (default: ``hidden_size // heads``).

    Returns:
        ``(heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)``.
    """
    heads = _config_value(config, "num_attention_heads")
    kv_heads = _config_value(config, "num_key_value_heads") or heads
    head_dim = _config_value(config, "head_dim") or _config_value(config, "hidden_size") // heads
    return (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)


def _qkv_layout(name: str, out_features: int, config: Any) -> tuple[int, ...]:
    """q/k/v sizes of a Phi-3 style ``qkv_proj``: q heads, then k and v kv-heads, contiguous."""
    if config is None or not _config_value(config, "num_attention_heads"):
        raise ValueError(
            f"cannot tell the q/k/v sizes of {name!r}: the model has no config with "
            "num_attention_heads; pass config=... to inject_lora, or give the sizes with "
            "FusedSpec(split_sizes=(q, k, v), enable_lora=(True, False, True))"
        )
    sizes = qkv_split_sizes(config)
    if sum(sizes) != out_features:
        raise ValueError(
            f"the config gives q/k/v sizes {sizes} (num_attention_heads="
            f"{config.num_attention_heads}), summing to {sum(sizes)}, but {name!r} has "
            f"out_features={out_features}; pass FusedSpec(split_sizes=..., enable_lora=...)"
        )
    return sizes


def _halves_layout(name: str, out_features: int, config: Any) -> tuple[int, ...]:
    """gate/up halves of a Phi-3 style ``gate_up_proj`` (the forward does ``chunk(2)``)."""
    if out_features % 2:
        raise ValueError(f"{name!r} has odd out_features={out_features}; cannot split in halves")
    return (out_features // 2,) * 2


def _thirds_layout(name: str, out_features: int, config: Any) -> tuple[int, ...]:
    """q/k/v thirds of GPT-2's ``c_attn`` (always multi-head attention)."""
    if out_features % 3:
        raise ValueError(f"{name!r} has out_features={out_features}, not divisible into q/k/v")
    return (out_features // 3,) * 3


#: Known fused projections, by the last component of the module name: the slice names a
#: user may write (``fused={"qkv_proj": "qv"}``) and a function
#: ``(module_name, out_features, config) -> split_sizes``. Add an entry to teach
#: :func:`resolve_fused` a new layout.
FUSED_LAYOUTS: dict[str, tuple[tuple[str, ...], Callable[[str, int, Any], tuple[int, ...]]]] = {
    "qkv_proj": (("q", "k", "v"), _qkv_layout),
    "gate_up_proj": (("gate", "up"), _halves_layout),
    "c_attn": (("q", "k", "v"), _thirds_layout),
}


def _parse_slice_names(value: str | Sequence[str], names: tuple[str, ...], where: str) -> set:
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


def _out_features(module: nn.Module) -> int:
    if _is_hf_conv1d(module):
        return module.weight.shape[1]
    return module.out_features


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
    out = _out_features(module)
    if isinstance(config, Mapping):
        config = SimpleNamespace(**config)
    if isinstance(slices, FusedSpec):
        if sum(slices.split_sizes) != out:
            raise ValueError(
                f"FusedSpec split_sizes={slices.split_sizes} sum to {sum(slices.split_sizes)}, "
                f"but {name!r} has out_features={out}"
            )
        return slices
    leaf = name.rpartition(".")[2]
    layout = FUSED_LAYOUTS.get(leaf)
    if isinstance(slices, Sequence) and slices and all(isinstance(s, bool) for s in slices):
        enable = tuple(slices)
        if layout is not None and len(layout[0]) == len(enable):
            return FusedSpec(layout[1](name, out, config), enable)
        if out % len(enable):
            raise ValueError(
                f"{len(enable)} slices do not divide out_features={out} of {name!r}; "
                "give the sizes with FusedSpec(split_sizes=..., enable_lora=...)"
            )
        return FusedSpec((out // len(enable),) * len(enable), enable)
    if layout is None:
        raise ValueError(
            f"no known slice layout for {name!r} (known: {', '.join(FUSED_LAYOUTS)}); "
            "give the sizes with FusedSpec(split_sizes=..., enable_lora=...)"
        )
    names, sizes_fn = layout
    chosen = _parse_slice_names(slices, names, repr(name))
    return FusedSpec(sizes_fn(name, out, config), tuple(n in chosen for n in names))


# --------------------------------------------------------------------------- matching
class _Patterns:
    """Compiled target keys: exact names / suffixes (a set lookup), full-match regexes, types.

    Compiled once per call, so matching a model costs one set lookup per name suffix plus
    one ``fullmatch`` per regex key, never a recompile.
    """

    def __init__(self, keys: Targets | None, arg: str, allow_all_linear: bool = False) -> None:
        if keys is None:
            keys = []
        elif isinstance(keys, (str, re.Pattern, type)):
            keys = [keys]
        self.arg = arg
        try:
            self.keys: list = list(dict.fromkeys(keys))  # a repeated key is one key
        except TypeError:
            raise TypeError(
                f"{arg} must be a name, regex or module type, or a list of them; got {keys!r}"
            ) from None
        self.names: dict[str, int] = {}
        self.regexes: list[tuple[int, re.Pattern]] = []
        self.types: list[tuple[int, type]] = []
        self.all_linear: int | None = None
        for i, key in enumerate(self.keys):
            if isinstance(key, str) and key.lower() == ALL_LINEAR:
                if not allow_all_linear:
                    raise ValueError(f"{arg}: {ALL_LINEAR!r} is only allowed in target_modules")
                self.all_linear = i
            elif isinstance(key, str) and _NAME_KEY.fullmatch(key):
                self.names.setdefault(key, i)
            elif isinstance(key, (str, re.Pattern)):
                try:
                    self.regexes.append((i, re.compile(key)))
                except re.error as err:
                    raise ValueError(f"{arg}: {key!r} is not a valid regex ({err})") from None
            elif isinstance(key, type) and issubclass(key, nn.Module):
                self.types.append((i, key))
            else:
                raise TypeError(f"{arg}: {key!r} is not a module name, regex or nn.Module subclass")
        self.hit = [False] * len(self.keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def match(self, name: str, suffixes: tuple[str, ...], module: nn.Module) -> int | None:
        """Index of the first key (in the caller's order) matching this module, else None."""
        best = None
        if self.names:
            for s in suffixes:
                i = self.names.get(s)
                if i is not None and (best is None or i < best):
                    best = i
        for i, rx in self.regexes:
            if (best is None or i < best) and rx.fullmatch(name):
                best = i
        for i, t in self.types:
            if (best is None or i < best) and isinstance(module, t):
                best = i
        if best is not None:
            self.hit[best] = True
        return best

    def is_type(self, i: int) -> bool:
        """Whether key ``i`` is a module type (a broad key, like ``"all-linear"``)."""
        return any(j == i for j, _ in self.types)

    def unmatched(self) -> list:
        return [k for k, h in zip(self.keys, self.hit, strict=True) if not h]


def _suffixes(name: str) -> tuple[str, ...]:
    parts = name.split(".")
    return tuple(".".join(parts[i:]) for i in range(len(parts)))


def _match_names(
    patterns: _Patterns, names: Sequence[str], module: nn.Module, need_suffixes: bool
) -> int | None:
    """The first key matching any of the names a module is registered under, else None."""
    best = None
    for name in names:
        i = patterns.match(name, _suffixes(name) if need_suffixes else (name,), module)
        if i is not None and (best is None or i < best):
            best = i
    return best


def _excluded_names(model: nn.Module, excludes: _Patterns, need_suffixes: bool) -> set[str]:
    """Every module name an exclude key matches, container or leaf, under any of its names."""
    if not excludes:
        return set()
    return {
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if name and _match_names(excludes, (name,), module, need_suffixes) is not None
    }


def _is_excluded(names: Sequence[str], excluded: set[str]) -> bool:
    """Whether a module, or a container holding it, is excluded under any of its names."""
    for name in names:
        parts = name.split(".")
        if any(".".join(parts[:i]) in excluded for i in range(1, len(parts) + 1)):
            return True
    return False


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def _wrappable_kind(module: nn.Module) -> type | None:
    """The torch base type lora_layers can wrap ``module`` as, or None."""
    if _is_hf_conv1d(module):
        return type(module)
    for base in (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, base):
            return base
    return None


def _check_wrappable(name: str, module: nn.Module) -> type:
    if isinstance(module, LoRALayer):
        raise ValueError(
            f"{name!r} already has LoRA ({type(module).__name__}); "
            "call unload(model) or merge_and_unload(model) before injecting again"
        )
    if quantized_lora_class(module, name) is not None:  # raises for unsupported quantized kinds
        return nn.Linear
    base = _wrappable_kind(module)
    if base is None:
        children = [n for n, m in module.named_modules() if n and _wrappable_kind(m)]
        hint = f"; target its layers instead, e.g. {name}.{children[0]}" if children else ""
        raise TypeError(
            f"cannot put LoRA on {name!r}: {type(module).__name__} is not supported "
            f"(supported: {_SUPPORTED}){hint}"
        )
    extra = set(module._parameters) - {"weight", "bias"}
    if type(module).forward is not base.forward or extra or module._buffers or module._modules:
        raise TypeError(
            f"cannot put LoRA on {name!r}: {type(module).__name__} subclasses "
            f"{base.__name__} but changes its forward or adds parameters, buffers or children"
        )
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise TypeError(f"{name!r} ({type(module).__name__}) is uninitialised; run a forward first")
    return base


def _no_match_message(what: str, key: Any, modules: dict[str, nn.Module]) -> str:
    """``"<what> <key> matched no module; did you mean ...? Layers LoRA can wrap here: ..."``"""
    names = [n for n, m in modules.items() if n and _wrappable_kind(m)]
    leaves = list(dict.fromkeys(n.rpartition(".")[2] for n in names))
    text = f"{what} {key!r} matched no module"
    if isinstance(key, str):
        close = [leaf for leaf in leaves if key in leaf]
        close += difflib.get_close_matches(key, leaves + names, n=3, cutoff=0.6)
        close = list(dict.fromkeys(close))[:3]
        if close:
            text += f"; did you mean {', '.join(map(repr, close))}?"
    if names:
        example = next((n for n in names if isinstance(modules[n], nn.Linear)), names[0])
        text += "" if text.endswith("?") else "."
        text += f" Layers LoRA can wrap here: {', '.join(leaves[:10])} (e.g. {example!r})"
    return text


# --------------------------------------------------------------------------- planning
def _model_config(model: nn.Module, config: Any) -> Any:
    if config is None:
        config = getattr(model, "config", None)
        get_text = getattr(config, "get_text_config", None)
        if callable(get_text):
            with contextlib.suppress(TypeError, ValueError):
                config = get_text(decoder=True)
    if isinstance(config, Mapping):
        config = SimpleNamespace(**config)
    return config


def _walk(model: nn.Module) -> tuple[dict[str, nn.Module], dict[int, list[str]]]:
    """One walk of the tree: canonical name -> module, and every name a module appears under."""
    modules: dict[str, nn.Module] = {}
    names_of: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        seen = names_of.setdefault(id(module), [])
        if not seen:
            modules[name] = module
        seen.append(name)
    return modules, names_of


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def _plan(
    model: nn.Module,
    target_modules: Targets | None,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    fused: Mapping | None,
    exclude_modules: Targets | None,
    rank_pattern: Mapping | None,
    alpha_pattern: Mapping | None,
    use_rslora: bool,
    lora_dtype: torch.dtype | None,
    merge_weights: bool,
    config: Any,
) -> tuple[dict[str, InjectSpec], dict[str, nn.Module], dict[int, list[str]]]:
    if target_modules is None and not fused:
        raise ValueError("give target_modules (names, regexes, types or 'all-linear') or fused")
    InjectSpec(r, lora_alpha, lora_dropout, use_rslora, merge_weights, lora_dtype)  # validate
    targets = _Patterns(target_modules, "target_modules", allow_all_linear=True)
    excludes = _Patterns(exclude_modules, "exclude_modules")
    fused = dict(fused or {})
    fused_keys = _Patterns(list(fused), "fused")
    ranks = _Patterns(list(rank_pattern or {}), "rank_pattern")
    alphas = _Patterns(list(alpha_pattern or {}), "alpha_pattern")
    rank_values = list((rank_pattern or {}).values())
    alpha_values = list((alpha_pattern or {}).values())
    fused_values = list(fused.values())

    modules, names_of = _walk(model)
    head = _output_head(model) if targets.all_linear is not None else None
    mha_children = {
        id(child)
        for m in modules.values()
        if isinstance(m, nn.MultiheadAttention)
        for child in m.children()
    }
    config = _model_config(model, config)
    need_suffixes = bool(targets.names or excludes.names or fused_keys.names)
    need_suffixes |= bool(ranks.names or alphas.names)

    # A module registered under several names (model.a is model.b) is one module: it is a
    # target if any of its names matches, excluded if any of its names or a container holding
    # it is excluded, and is replaced under every name.
    excluded = _excluded_names(model, excludes, need_suffixes)
    chosen: list[tuple[str, nn.Module, int | None]] = []
    for name, module in modules.items():
        if not name:
            continue  # the root cannot be replaced in place
        names = names_of[id(module)]
        hit = _match_names(targets, names, module, need_suffixes)
        fused_at = _match_names(fused_keys, names, module, need_suffixes) if fused_keys else None
        is_target = hit is not None
        broad = is_target and targets.is_type(hit)  # matched by a module type only
        if not is_target and targets.all_linear is not None and module is not head:
            is_target = broad = isinstance(module, nn.Linear) or _is_hf_conv1d(module)
            is_target = broad = is_target or find_quantized_lora_class(module) is not None
            if is_target:
                targets.hit[targets.all_linear] = True
        if not (is_target or fused_at is not None):
            continue
        if _is_excluded(names, excluded):
            continue
        if id(module) in mha_children:
            if broad and fused_at is None:
                continue  # nn.MultiheadAttention reads these weights directly, not via forward
            raise ValueError(
                f"cannot put LoRA on {name!r}: nn.MultiheadAttention uses its projection "
                "weights directly, never calling this layer, so LoRA there would have no effect"
            )
        _check_wrappable(name, module)
        chosen.append((name, module, fused_at))

    for patterns, what in ((targets, "target"), (fused_keys, "fused key")):
        missing = patterns.unmatched()
        if missing:
            raise ValueError(_no_match_message(what, missing[0], modules))
    if excludes.unmatched():
        raise ValueError(
            _no_match_message("exclude_modules entry", excludes.unmatched()[0], modules)
        )
    if not chosen:
        raise ValueError(
            f"no module left to wrap: every target is excluded by exclude_modules={exclude_modules!r}"
        )

    plan: dict[str, InjectSpec] = {}
    cache: dict[tuple, InjectSpec] = {}
    for name, module, fused_at in chosen:
        names = names_of[id(module)]
        ri = _match_names(ranks, names, module, need_suffixes) if ranks else None
        ai = _match_names(alphas, names, module, need_suffixes) if alphas else None
        r_i = r if ri is None else rank_values[ri]
        alpha_i = lora_alpha if ai is None else alpha_values[ai]
        spec_fused = None
        if fused_at is not None:
            if _wrappable_kind(module) not in (nn.Linear,) and not _is_hf_conv1d(module):
                raise ValueError(
                    f"fused slices only apply to linear layers; {name!r} is {type(module).__name__}"
                )
            spec_fused = resolve_fused(name, module, fused_values[fused_at], config)
        key = (r_i, alpha_i, spec_fused)
        spec = cache.get(key)
        if spec is None:
            spec = InjectSpec(
                r_i, alpha_i, lora_dropout, use_rslora, merge_weights, lora_dtype, spec_fused
            )
            cache[key] = spec
        if spec.r > 0:
            plan[name] = spec
    for patterns, arg in ((ranks, "rank_pattern"), (alphas, "alpha_pattern")):
        if patterns.unmatched():
            raise ValueError(
                f"{arg} key {patterns.unmatched()[0]!r} matched none of the targeted modules"
            )
    return plan, modules, names_of


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
    config: Any = None,
) -> dict[str, InjectSpec]:
    """Decide which modules :func:`inject_lora` would wrap, and how, without changing anything.

    Takes the same arguments as :func:`inject_lora` (minus the ones that act on the model).

    Returns:
        dict[str, InjectSpec]: Dotted module name -> spec, in ``named_modules`` order. Modules
        whose rank resolves to 0 (via ``rank_pattern``) are left out.

    Raises:
        ValueError, TypeError: As :func:`inject_lora`.
    """
    plan, _, _ = _plan(
        model,
        target_modules,
        r,
        lora_alpha,
        lora_dropout,
        fused,
        exclude_modules,
        rank_pattern,
        alpha_pattern,
        use_rslora,
        lora_dtype,
        merge_weights,
        config,
    )
    return plan


# --------------------------------------------------------------------------- wrapping
def _remember_base(layer: LoRALayer, module: nn.Module) -> None:
    """Keep a parameter-less shallow copy of the replaced module on the LoRA layer.

    :func:`unload` restores it (same class, attributes and hooks as the original) with the
    layer's current ``weight``/``bias``. It holds no tensors, so it costs no memory and is
    untouched by ``.to()``; it lives in ``__dict__``, so it is not a submodule.
    """
    if _SHELL in layer.__dict__:
        return
    shell = copy.copy(module)
    shell.__dict__["_parameters"] = dict.fromkeys(module._parameters)
    layer.__dict__[_SHELL] = shell


def wrap_module(module: nn.Module, spec: InjectSpec, name: str = "module") -> LoRALayer:
    """Build the LoRA layer for one torch layer, sharing its ``weight``/``bias`` Parameters.

    ``nn.Linear`` becomes :class:`~lora_layers.Linear` (or :class:`~lora_layers.MergedLinear`
    when ``spec.fused`` is set), transformers' ``Conv1D`` a ``fan_in_fan_out`` Linear,
    ``nn.Embedding`` :class:`~lora_layers.Embedding`, ``nn.ConvNd`` the matching ``ConvNd``.
    Works on meta-device modules (the LoRA parameters are created on the weight's device).

    Args:
        module: The layer to wrap.
        spec: Rank, alpha, dropout, slices, ... (see :class:`InjectSpec`).
        name: The module's name, for error messages.

    Returns:
        LoRALayer: The new layer (not yet placed in any model; see :func:`replace_module`).

    Raises:
        ValueError: If ``module`` already has LoRA, or ``spec.fused`` is set on a non-linear
            layer.
        TypeError: If the module type is not supported (the message names the type).
    """
    base = _check_wrappable(name, module)
    common = dict(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        merge_weights=spec.merge_weights,
        use_rslora=spec.use_rslora,
    )
    is_linear = base is nn.Linear or _is_hf_conv1d(module)
    if spec.fused is not None and not is_linear:
        raise ValueError(f"fused slices only apply to linear layers; {name!r} is {base.__name__}")
    slices = {}
    if spec.fused is not None:
        slices = dict(enable_lora=spec.fused.enable_lora, split_sizes=spec.fused.split_sizes)
    quantized = quantized_lora_class(module, name)
    if quantized is not None:  # a registered quantized linear: see lora_layers.quantized
        return quantized.from_module(
            module, lora_dropout=spec.lora_dropout, lora_dtype=spec.lora_dtype, **common, **slices
        )
    if _is_hf_conv1d(module):
        # transformers' Conv1D is a linear layer storing its weight as (in, out).
        in_features, out_features = module.weight.shape
        cls = MergedLinear if slices else Linear
        with torch.device("meta"):
            layer = cls(
                in_features,
                out_features,
                lora_dropout=spec.lora_dropout,
                fan_in_fan_out=True,
                bias=module.bias is not None,
                **common,
                **slices,
            )
        layer._adopt(module, spec.lora_dtype)
    elif base is nn.Linear:
        cls = MergedLinear if slices else Linear
        layer = cls.from_module(
            module, lora_dropout=spec.lora_dropout, lora_dtype=spec.lora_dtype, **common, **slices
        )
    elif base is nn.Embedding:
        layer = Embedding.from_module(module, lora_dtype=spec.lora_dtype, **common)
    else:
        cls = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}[base]
        layer = cls.from_module(
            module, lora_dropout=spec.lora_dropout, lora_dtype=spec.lora_dtype, **common
        )
    _remember_base(layer, module)
    return layer


def _set_child(model: nn.Module, modules: dict[str, nn.Module] | None, name: str, new: nn.Module):
    parent_name, _, leaf = name.rpartition(".")
    parent = modules.get(parent_name) if modules is not None else None
    if parent is None:
        parent = model.get_submodule(parent_name)
    setattr(parent, leaf, new)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``name`` in ``model`` and return the module that was there.

    Works through ``nn.ModuleList`` / ``nn.Sequential`` indices (``"layers.3.mlp"``). If
    ``new`` is a LoRA layer sharing the old module's ``weight`` (built with ``from_module``),
    it remembers the old module so :func:`unload` restores its exact class and attributes.
    Other places holding the same old module object are not changed.

    Args:
        model: The root module.
        name: Dotted name of an existing submodule (not ``""``, the root itself).
        new: The replacement.

    Returns:
        nn.Module: The module previously at ``name``.

    Raises:
        ValueError: If ``name`` is empty.
        AttributeError: If ``name`` does not exist in ``model``.
    """
    if not name:
        raise ValueError("cannot replace the root module in place; use the new module directly")
    old = model.get_submodule(name)
    if (
        isinstance(new, LoRALayer)
        and not isinstance(old, LoRALayer)
        and getattr(old, "weight", None) is new.weight
    ):
        _remember_base(new, old)
    _set_child(model, None, name, new)
    return old


# --------------------------------------------------------------------------- inject
def _make_output_require_grad(module: nn.Module, inputs: Any, output: Any) -> None:
    # Skipped under torch.compile, where dynamo cannot return an intermediate marked with
    # requires_grad_(): compiled models should use non-reentrant checkpointing.
    if (
        torch.is_tensor(output)
        and torch.is_grad_enabled()
        and not output.requires_grad
        and not torch.compiler.is_compiling()
    ):
        output.requires_grad_(True)


def enable_input_require_grads(
    model: nn.Module, module: nn.Module | None = None
) -> RemovableHandle | None:
    """Make the input embeddings' output require grad, so LoRA trains under reentrant checkpointing.

    ``torch.utils.checkpoint(..., use_reentrant=True)`` gives its wrapped block no gradient
    (so its LoRA layers get ``None`` grads) when none of the block's tensor inputs requires
    grad, which is the case when the embeddings are frozen. A forward hook on the embedding
    layer makes its output require grad (as PEFT and ``transformers`` do). Only active while
    grad mode is on and, in models whose modules carry transformers' ``gradient_checkpointing``
    flag, while checkpointing is enabled; it then costs the backward of the first block's
    input. Idempotent;
    :func:`unload` and :func:`merge_and_unload` remove it.

    Args:
        model: The model; the handle is kept on it.
        module: The layer whose output to hook (default: ``model.get_input_embeddings()``).

    Returns:
        RemovableHandle | None: The hook handle, or None if there is no such layer.
    """
    if module is None:
        get = getattr(model, "get_input_embeddings", None)
        try:
            module = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            module = None
    if not isinstance(module, nn.Module):
        return None
    handle = model.__dict__.get(_HOOK)
    if handle is not None:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks and hooks is module._forward_hooks:
            return handle
        handle.remove()
    # transformers marks the modules it can checkpoint with a bool `gradient_checkpointing`;
    # where such flags exist, the hook acts only while one is on, so training without
    # checkpointing pays nothing. Elsewhere it always acts.
    flags = [
        m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)
    ]
    hook = _make_output_require_grad
    if flags:

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if any(m.gradient_checkpointing for m in flags):
                _make_output_require_grad(module, inputs, output)

    handle = module.register_forward_hook(hook)
    model.__dict__[_HOOK] = handle
    return handle


def _remove_input_hook(model: nn.Module) -> None:
    handle = model.__dict__.pop(_HOOK, None)
    if handle is not None:
        handle.remove()


def inject_lora(
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
    freeze_base: bool = True,
    bias: str = "none",
    input_require_grads: bool = True,
    config: Any = None,
) -> nn.Module:
    """Replace the targeted layers of ``model`` in place with LoRA layers; return ``model``.

    The new layers share the original ``weight``/``bias`` Parameters (same objects: no copy,
    no new memory for the base, works on meta-device models) and keep their device and dtype.
    The model keeps its class, so ``generate()``, ``save_pretrained`` and
    ``gradient_checkpointing_enable()`` of a ``transformers`` model keep working.
    ``lora_module_names(model)`` lists the replaced modules; :func:`plan_lora` previews them.

    Matching: each target key is an exact dotted name or a name suffix (``"qkv_proj"`` matches
    ``model.layers.0.self_attn.qkv_proj``), a regex that must match the whole dotted name (any
    string with a regex metacharacter such as ``*``, ``(``, ``|``, or an ``re.Pattern``), a
    module type (``nn.Linear``), or ``"all-linear"``: every ``nn.Linear`` (and transformers
    ``Conv1D``) except the output head ``model.get_output_embeddings()``, as PEFT counts it.
    A module registered under several names (``model.a is model.b``) is targeted when any of
    its names matches, excluded when any is, and replaced under every name.

    Args:
        model: The model to modify in place.
        target_modules: A key or a list of keys, as above. May be omitted when ``fused`` is
            given. Every key must match at least one module.
        r: Rank (per enabled slice for fused projections).
        lora_alpha: Scaling numerator; ``scaling = lora_alpha / r``.
        lora_dropout: Dropout on the LoRA branch's input (embeddings ignore it).
        fused: ``{key: slices}`` for fused projections, e.g. ``{"qkv_proj": "qv"}`` (q and v
            of every ``qkv_proj``, sizes from the model config) or
            ``{"gate_up_proj": "up"}``; values as in :func:`resolve_fused`. Matched modules
            are targets too; the first matching key wins.
        exclude_modules: Keys (as targets) of modules never to wrap; a key naming a container
            (``"encoder"``) excludes every layer inside it. Each key must match some module.
        rank_pattern: ``{key: r}`` overrides of the rank; the first matching key wins;
            ``r=0`` leaves a module out.
        alpha_pattern: ``{key: lora_alpha}`` overrides of alpha; the first matching key wins.
        use_rslora: Scale by ``lora_alpha / sqrt(r)``.
        lora_dtype: Dtype of the LoRA parameters, e.g. ``torch.float32`` on a bf16 base.
        merge_weights: If True, ``model.eval()`` merges every layer and ``model.train()``
            unmerges (loralib's contract). Default False: ``eval()`` inside a training loop
            would otherwise allocate a merged copy of every wrapped weight; call
            :func:`merge_lora` for fast inference instead.
        freeze_base: Freeze every parameter except the LoRA ones (and biases per ``bias``).
        bias: ``"none"``, ``"all"`` or ``"lora_only"``: which biases train with ``freeze_base``.
        input_require_grads: Hook ``model.get_input_embeddings()`` (if the model has it) so
            reentrant gradient checkpointing trains LoRA with frozen embeddings; see
            :func:`enable_input_require_grads`.
        config: Where fused q/k/v sizes come from (default: ``model.config``); an object or a
            mapping with ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` or
            ``hidden_size``.

    Returns:
        nn.Module: ``model`` itself.

    Raises:
        ValueError: If a target / fused / exclude / pattern key matches no module (the message
            lists candidate names), a targeted layer already has LoRA, fused slices are
            unknown or inconsistent with the config, or hyper-parameters are invalid.
        TypeError: If a targeted module's type is not supported (the message names it).
    """
    plan, modules, names_of = _plan(
        model,
        target_modules,
        r,
        lora_alpha,
        lora_dropout,
        fused,
        exclude_modules,
        rank_pattern,
        alpha_pattern,
        use_rslora,
        lora_dtype,
        merge_weights,
        config,
    )
    for name, spec in plan.items():
        module = modules[name]
        layer = wrap_module(module, spec, name)
        for alias in names_of[id(module)]:  # the same module object under several names
            _set_child(model, modules, alias, layer)
    if freeze_base:
        mark_only_lora_as_trainable(model, bias=bias)
    if input_require_grads:
        enable_input_require_grads(model)
    return model


def lora_module_names(model: nn.Module) -> list[str]:
    """Dotted names of the LoRA layers (``r > 0``) in ``model``, in ``named_modules`` order."""
    return [name for name, _ in lora_modules(model)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts (tied parameters counted once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# --------------------------------------------------------------------------- merge / unload
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer of ``model`` (each keeps a merged weight; fast inference).

    The base weights are never modified; :func:`unmerge_lora` drops the merged copies.
    A training forward that needs LoRA gradients still runs the exact unmerged path.

    Returns:
        nn.Module: ``model``.

    Raises:
        ValueError: If a merged weight would hold NaN/Inf (that layer is left unmerged).
    """
    for _, layer in lora_modules(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Drop the merged weight of every LoRA layer of ``model``; exact (nothing was modified).

    Returns:
        nn.Module: ``model``.
    """
    for module in model.modules():
        if isinstance(module, LoRALayer):
            module.unmerge()
    return model


def _rebuild_plain(layer: LoRALayer) -> nn.Module:
    """A parameter-less torch layer matching ``layer``, for layers built without a shell."""
    with torch.device("meta"):
        if isinstance(layer, Linear):
            if layer.fan_in_fan_out:
                try:
                    from transformers.pytorch_utils import Conv1D
                except ImportError as err:  # pragma: no cover - transformers is installed
                    raise TypeError(
                        "unloading a fan_in_fan_out Linear needs transformers' Conv1D"
                    ) from err
                plain = Conv1D(layer.out_features, layer.in_features)
            else:
                plain = nn.Linear(layer.in_features, layer.out_features, bias=False)
        elif isinstance(layer, Embedding):
            plain = nn.Embedding(
                layer.num_embeddings,
                layer.embedding_dim,
                padding_idx=layer.padding_idx,
                max_norm=layer.max_norm,
                norm_type=layer.norm_type,
                scale_grad_by_freq=layer.scale_grad_by_freq,
                sparse=layer.sparse,
            )
        elif isinstance(layer, (Conv1d, Conv2d, Conv3d)):
            plain = layer._torch_conv(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=layer.groups,
                bias=False,
                padding_mode=layer.padding_mode,
            )
        else:  # pragma: no cover - every LoRALayer subclass is handled above
            raise TypeError(f"do not know how to unload {type(layer).__name__}")
    if not isinstance(layer, Embedding):
        plain._parameters["bias"] = None
    return plain


def _plain_layer(layer: LoRALayer, weight: nn.Parameter) -> nn.Module:
    if isinstance(layer, QuantizedLoRALinear):  # its quantized base, or a dense nn.Linear
        return layer.plain_layer(weight)
    shell = layer.__dict__.get(_SHELL)
    plain = copy.copy(shell) if shell is not None else _rebuild_plain(layer)
    plain.__dict__["_parameters"] = dict(plain._parameters)
    plain.weight = weight
    if "bias" in plain._parameters:
        plain.bias = layer.bias
    nn.Module.train(plain, layer.training)
    return plain


def _replace_lora_layers(model: nn.Module, make_weight: Callable) -> nn.Module:
    if isinstance(model, LoRALayer):
        raise ValueError("the model itself is a LoRA layer; unload its parent model instead")
    modules, names_of = _walk(model)
    for name, module in modules.items():
        if isinstance(module, LoRALayer):
            plain = _plain_layer(module, make_weight(name, module))
            for alias in names_of[id(module)]:
                _set_child(model, modules, alias, plain)
            modules[name] = plain  # drop our reference: a replaced weight is freed right away
    _remove_input_hook(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer with a plain torch layer holding the original weights.

    The plain layers get the very same ``weight``/``bias`` Parameter objects (bit-identical,
    never modified), and layers injected by :func:`inject_lora` come back as their original
    class. LoRA parameters are dropped. ``requires_grad`` is left as it is (the base stays
    frozen); call ``model.requires_grad_(True)`` to train the whole model again.

    Returns:
        nn.Module: ``model``, whose ``state_dict()`` has the original keys and values.
    """
    return _replace_lora_layers(model, lambda name, layer: layer.weight)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer with a plain torch layer holding its merged weight.

    The merged weight ``(W + delta).to(W.dtype)``, computed in fp32 (fp64 for fp64 layers),
    becomes the layer's only weight, a new Parameter (the original one is freed unless
    referenced elsewhere), so ``state_dict()``
    has exactly the original model's keys and shapes and ``save_pretrained`` writes a normal
    checkpoint. A weight tied to another module (e.g. embeddings tied to the output head)
    is untied, keeping the model's outputs; a warning says so. A LoRA layer on a quantized
    base (:mod:`lora_layers.quantized`) becomes a dense ``nn.Linear`` holding
    ``dequantize(W) + delta`` rounded once (see ``docs/qlora.md``).

    Returns:
        nn.Module: ``model``.

    Raises:
        ValueError: If a merged weight would hold NaN/Inf (every layer is checked before any
            is replaced, so the model is then left unchanged).
    """
    # Uses by distinct modules: a module registered under two names is one user, not a tie.
    uses = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer) and m.r > 0]
    for name, layer in layers:  # check every layer first, one merged weight alive at a time
        layer.get_merged_weight()
        if uses[id(layer.weight)] > 1:
            warnings.warn(
                f"{name}.weight is shared with another module (tied weights); "
                "merge_and_unload gives the merged weight to this layer only",
                stacklevel=2,
            )
    del layers

    def merged_weight(name: str, layer: LoRALayer) -> nn.Parameter:
        if layer.r == 0:
            return layer.weight
        return nn.Parameter(layer.get_merged_weight(), layer.weight.requires_grad)

    return _replace_lora_layers(model, merged_weight)
