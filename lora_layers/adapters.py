"""Adapter files: safe safetensors save/load with full validation, and loralib state dicts.

An adapter file is one safetensors file holding the LoRA tensors (``<module>.lora_A``,
``<module>.lora_B`` and optionally ``<module>.bias``, the keys of :func:`lora_state_dict`) and,
in the header metadata, a versioned JSON description of every adapted layer (layer type, rank,
alpha, rsLoRA, fan_in_fan_out, dropout, fused-slice layout, base weight shape, dtype). The
format is specified in ``docs/adapters.md``.

Loading validates everything before changing anything: the file against its own metadata,
the metadata against the model's layers, and the model's LoRA layers against the file. Every
problem found (missing key, unexpected key, shape mismatch, config mismatch) is reported in
one :class:`AdapterLoadError`; in non-strict mode the same :class:`LoadReport` is returned
(and warned about) and only the modules without problems are loaded.

No pickle: ``.pt`` / ``.bin`` files are refused unless ``allow_pickle=True``, and then read
with ``torch.load(weights_only=True)`` only. PEFT interop lives in :mod:`lora_layers.peft_interop`
and fused <-> separate conversion in :mod:`lora_layers.fused`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import numbers
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from .base import LoRALayer, check_lora_args
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear
from .merged import MergedLinear, _check_slices
from .quantized import QuantizedLoRALinear, dense_weight_shape
from .surgery import FusedSpec, InjectSpec, _is_hf_conv1d, replace_module, wrap_module
from .utils import BIAS_MODES, lora_modules, lora_state_dict

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "Adapter",
    "AdapterError",
    "AdapterLoadError",
    "LayerSpec",
    "LoadReport",
    "adapter_from_model",
    "load_lora",
    "load_lora_state_dict",
    "normalize_key",
    "read_adapter",
    "save_lora",
]

FORMAT_VERSION = 1
METADATA_KEY = "lora_layers.adapter"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_WEIGHTS_NAME = "adapter_model.bin"

# layer type name -> (lora_layers class, torch class it wraps)
_LAYERS: dict[str, tuple[type, type]] = {
    "Linear": (Linear, nn.Linear),
    "MergedLinear": (MergedLinear, nn.Linear),
    "Embedding": (Embedding, nn.Embedding),
    "Conv1d": (Conv1d, nn.Conv1d),
    "Conv2d": (Conv2d, nn.Conv2d),
    "Conv3d": (Conv3d, nn.Conv3d),
}
_CONV_DIMS = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}
_LORA_LEAVES = ("lora_A", "lora_B")
# The dtypes an adapter tensor may have (float8 and friends have no LoRA arithmetic here).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)


class AdapterError(ValueError):
    """An adapter (file, metadata or conversion request) is invalid.

    Attributes:
        problems: One line per problem found.
    """

    def __init__(self, problems: str | Sequence[str], context: str = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"{context}: " if context else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            message = (
                head
                + f"{len(self.problems)} problems:\n"
                + "\n".join(f"  - {p}" for p in self.problems)
            )
        super().__init__(message)


# --------------------------------------------------------------------------- key names
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


def _key(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


def _split_key(key: str) -> tuple[str, str]:
    """``"a.b.lora_A"`` -> ``("a.b", "lora_A")``; the leaf is the last dotted component."""
    name, _, leaf = key.rpartition(".")
    return name, leaf


def _normalize_name(name: str) -> str:
    return _split_key(normalize_key(_key(name, "lora_A")))[0]


def _holds_weights(module: nn.Module) -> bool:
    return isinstance(module, LoRALayer) or any(p is not None for p in module._parameters.values())


def _module_index(model: nn.Module) -> tuple[dict[str, tuple[str, nn.Module]], list[str]]:
    """Map normalised module names to ``(raw name, module)``; list real name collisions.

    A wrapper and the model it wraps (``""`` and ``"module"`` under DDP, ``""`` and
    ``"_orig_mod"`` when compiled) normalise to the same name; the wrapped one, which holds
    the weights, wins. Two modules that both hold parameters under one name are a collision.
    """
    index: dict[str, tuple[str, nn.Module]] = {}
    collisions = []
    for raw, module in model.named_modules():
        norm = _normalize_name(raw)
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


def _module_aliases(
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
        norm = _normalize_name(raw)
        if norm not in index and id(module) in canonical:
            aliases.setdefault(norm, canonical[id(module)])
    return aliases, raw_names


def _layer_type(module: nn.Module) -> str | None:
    """The lora_layers type name of ``module`` (``"MergedLinear"``, ...), or None."""
    if isinstance(module, QuantizedLoRALinear):  # saved as the dense layer it stands for
        return module.adapter_layer
    if isinstance(module, MergedLinear):
        return "MergedLinear"
    for name in ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d"):
        if isinstance(module, _LAYERS[name][0]):
            return name
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: object) -> torch.dtype | None:
    if not isinstance(name, str):
        return None
    dtype = getattr(torch, name, None)
    return dtype if dtype in _DTYPES else None


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


# --------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class LayerSpec:
    """Everything needed to rebuild one LoRA layer around its base layer.

    Attributes:
        layer: ``"Linear"``, ``"MergedLinear"``, ``"Embedding"``, ``"Conv1d"``, ``"Conv2d"``
            or ``"Conv3d"``.
        r: Rank (per enabled slice for ``MergedLinear``).
        lora_alpha: Scaling numerator.
        in_features: ``in_features`` / ``num_embeddings`` / ``in_channels``.
        out_features: ``out_features`` / ``embedding_dim`` / ``out_channels``.
        weight_shape: Shape of the base layer's ``weight``.
        dtype: Dtype name of ``lora_A`` / ``lora_B`` (``"float32"``, ``"bfloat16"``, ...).
        use_rslora: ``scaling = lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        lora_dropout: Dropout probability of the LoRA branch.
        fan_in_fan_out: Whether the base weight is stored ``(in, out)``.
        merge_weights: The layer's ``merge_weights`` flag.
        enable_lora: ``MergedLinear`` only: which output slices have LoRA.
        split_sizes: ``MergedLinear`` only: output slice sizes.
    """

    layer: str
    r: int
    lora_alpha: float
    in_features: int
    out_features: int
    weight_shape: tuple[int, ...]
    dtype: str = "float32"
    use_rslora: bool = False
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    merge_weights: bool = True
    enable_lora: tuple[bool, ...] | None = None
    split_sizes: tuple[int, ...] | None = None

    @property
    def scaling(self) -> float:
        """``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA), as the layer computes it."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def slice_ranks(self) -> tuple[int, ...]:
        """The rank of each output slice (0 for disabled slices); ``(r,)`` when unfused."""
        if self.enable_lora is None:
            return (self.r,)
        return tuple(self.r if on else 0 for on in self.enable_lora)

    def lora_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of ``lora_A`` and ``lora_B`` implied by this spec."""
        if self.layer == "MergedLinear":
            assert self.enable_lora is not None and self.split_sizes is not None
            n_enabled = sum(self.enable_lora)
            rows = sum(s for s, on in zip(self.split_sizes, self.enable_lora, strict=True) if on)
            return (self.r * n_enabled, self.in_features), (rows, self.r)
        if self.layer in _CONV_DIMS:
            return (self.r, math.prod(self.weight_shape[1:])), (self.out_features, self.r)
        return (self.r, self.in_features), (self.out_features, self.r)

    @classmethod
    def from_layer(cls, layer: nn.Module) -> LayerSpec:
        """Describe an existing lora_layers layer with ``r > 0``.

        Raises:
            TypeError: If ``layer`` is not a lora_layers layer.
        """
        kind = _layer_type(layer)
        if kind is None:
            raise TypeError(f"{type(layer).__name__} is not a lora_layers layer")
        if kind == "Embedding":
            in_f, out_f = layer.num_embeddings, layer.embedding_dim
        elif kind in _CONV_DIMS:
            in_f, out_f = layer.in_channels, layer.out_channels
        else:
            in_f, out_f = layer.in_features, layer.out_features
        merged = kind == "MergedLinear"
        return cls(
            layer=kind,
            r=layer.r,
            lora_alpha=layer.lora_alpha,
            in_features=in_f,
            out_features=out_f,
            weight_shape=dense_weight_shape(layer),
            dtype=_dtype_name(layer.lora_A.dtype if layer.r > 0 else layer.weight.dtype),
            use_rslora=layer.use_rslora,
            lora_dropout=layer.dropout_p,
            fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
            merge_weights=layer.merge_weights,
            enable_lora=tuple(layer.enable_lora) if merged else None,
            split_sizes=tuple(layer.split_sizes) if merged else None,
        )

    def problems(self) -> list[str]:
        """Everything wrong with this spec (empty when it is valid)."""
        out: list[str] = []
        if self.layer not in _LAYERS:
            return [f"unknown layer type {self.layer!r}; known: {sorted(_LAYERS)}"]
        if not _is_int(self.r) or self.r <= 0:
            out.append(f"r must be a positive int, got {self.r!r}")
        else:
            try:
                check_lora_args(self.r, self.lora_alpha, self.lora_dropout)
            except (TypeError, ValueError) as exc:
                out.append(str(exc))
            else:
                if not math.isfinite(self.lora_alpha):
                    out.append(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        for name in ("in_features", "out_features"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                out.append(f"{name} must be a positive int, got {value!r}")
        for name in ("use_rslora", "fan_in_fan_out", "merge_weights"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if _dtype_from_name(self.dtype) is None:
            out.append(f"dtype must be one of {_DTYPE_NAMES}, got {self.dtype!r}")
        shape = self.weight_shape
        if not isinstance(shape, tuple) or not all(_is_int(s) and s > 0 for s in shape):
            out.append(f"weight_shape must be a list of positive ints, got {shape!r}")
        if out:
            return out
        i, o = self.in_features, self.out_features
        if self.layer in ("Linear", "MergedLinear"):
            expected = (i, o) if self.fan_in_fan_out else (o, i)
            if shape != expected:
                out.append(f"weight_shape {list(shape)} does not match in/out features {i}/{o}")
        elif self.layer == "Embedding":
            if shape != (i, o):
                out.append(f"weight_shape {list(shape)} is not (num_embeddings, embedding_dim)")
        else:
            dims = _CONV_DIMS[self.layer]
            if len(shape) != dims + 2 or shape[0] != o or i % shape[1] != 0:
                out.append(
                    f"weight_shape {list(shape)} is not a {self.layer} kernel for "
                    f"{i} -> {o} channels"
                )
        if self.fan_in_fan_out and self.layer not in ("Linear", "MergedLinear"):
            out.append(f"fan_in_fan_out is only valid for Linear layers, not {self.layer}")
        if self.layer == "MergedLinear":
            if self.enable_lora is None or self.split_sizes is None:
                out.append("MergedLinear needs enable_lora and split_sizes")
            else:
                try:
                    _check_slices(o, self.enable_lora, self.split_sizes)
                except (TypeError, ValueError) as exc:
                    out.append(str(exc))
                else:
                    if not all(isinstance(e, bool) for e in self.enable_lora):
                        out.append(f"enable_lora must be booleans, got {list(self.enable_lora)}")
                    elif not any(self.enable_lora):
                        out.append("enable_lora enables no slice")
        elif self.enable_lora is not None or self.split_sizes is not None:
            out.append(
                f"enable_lora / split_sizes are only valid for MergedLinear, not {self.layer}"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the file's metadata for this layer."""
        data: dict[str, Any] = {
            "layer": self.layer,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "lora_dropout": self.lora_dropout,
            "fan_in_fan_out": self.fan_in_fan_out,
            "merge_weights": self.merge_weights,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "weight_shape": list(self.weight_shape),
            "dtype": self.dtype,
        }
        if self.layer == "MergedLinear":
            data["enable_lora"] = list(self.enable_lora or ())
            data["split_sizes"] = list(self.split_sizes or ())
            data["slice_ranks"] = list(self.slice_ranks)
        return data

    @classmethod
    def from_json(cls, data: object) -> LayerSpec:
        """Parse and validate one layer's metadata object.

        Raises:
            AdapterError: Listing every problem with the object.
        """
        if not isinstance(data, dict):
            raise AdapterError(f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} | {"slice_ranks"}
        required = ("layer", "r", "lora_alpha", "in_features", "out_features", "weight_shape")
        problems = [f"unknown field {k!r}" for k in data if k not in known]
        problems += [f"missing field {k!r}" for k in required if k not in data]
        if problems:
            raise AdapterError(problems)
        kwargs = {k: v for k, v in data.items() if k != "slice_ranks"}
        for name in ("weight_shape", "enable_lora", "split_sizes"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        spec = cls(**kwargs)
        problems = spec.problems()
        ranks = data.get("slice_ranks")
        if not problems and ranks is not None and list(ranks) != list(spec.slice_ranks):
            problems.append(f"slice_ranks {ranks} disagree with r and enable_lora")
        if problems:
            raise AdapterError(problems)
        return spec

    def differences(self, other: LayerSpec, mine: str = "file", theirs: str = "model") -> list[str]:
        """The config fields that differ from ``other`` (what makes loading inexact)."""
        fields = ("layer", "r", "lora_alpha", "use_rslora", "fan_in_fan_out")
        fields += ("enable_lora", "split_sizes", "weight_shape")
        return [
            f"{f}: {mine} {getattr(self, f)!r}, {theirs} {getattr(other, f)!r}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]


# --------------------------------------------------------------------------- adapter
@dataclass
class Adapter:
    """An adapter in memory: tensors by key, and (unless it came from a bare state dict) specs.

    Attributes:
        tensors: ``<module>.lora_A`` / ``<module>.lora_B`` / ``<module>.bias`` -> tensor, with
            normalised module names.
        modules: Module name -> :class:`LayerSpec`, or None for a state dict without metadata
            (e.g. loralib's), which can only load into a model that already has LoRA layers.
        biases: Names of modules whose ``bias`` is stored (``<module>.bias``).
        base_weights: Names of modules whose base ``weight`` is stored (``<module>.weight``),
            e.g. the embedding PEFT saves alongside an embedding adapter.
        bias: The ``lora_state_dict`` bias mode the adapter was saved with.
        problems: Problems found while reading (reported when loading).
        invalid_modules: Modules whose metadata was invalid (their keys are not reported twice).
        source: Where the adapter came from, for messages.
    """

    tensors: dict[str, torch.Tensor]
    modules: dict[str, LayerSpec] | None = None
    biases: tuple[str, ...] = ()
    base_weights: tuple[str, ...] = ()
    bias: str = "none"
    problems: list[str] = field(default_factory=list)
    invalid_modules: set[str] = field(default_factory=set)
    source: str = "<memory>"

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>"
    ) -> Adapter:
        """Wrap a bare adapter state dict (ours or ``loralib.lora_state_dict``'s), no metadata.

        Keys are normalised; keys that collide after normalisation are reported on load.
        """
        tensors, problems = _normalized_tensors(state_dict)
        biases = tuple(_split_key(k)[0] for k in tensors if _split_key(k)[1] == "bias")
        return cls(tensors=tensors, modules=None, biases=biases, problems=problems, source=source)

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata for this adapter."""
        if self.modules is None:
            raise AdapterError("this adapter has no layer metadata (a bare state dict)")
        doc = {
            "format_version": FORMAT_VERSION,
            "library": "lora_layers",
            "bias": self.bias,
            "modules": {name: spec.to_json() for name, spec in sorted(self.modules.items())},
            "biases": sorted(self.biases),
            "base_weights": sorted(self.base_weights),
        }
        return {"format": "pt", METADATA_KEY: json.dumps(doc, sort_keys=True)}


def _normalized_tensors(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
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


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (FSDP2); other tensors as they are.

    Gathering is a collective: every rank must call :func:`save_lora` on a sharded model.
    """
    if type(t).__name__ == "DTensor" and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def adapter_from_model(model: nn.Module, bias: str = "none") -> Adapter:
    """Collect a model's adapter: every LoRA layer's spec and tensors (and biases per ``bias``).

    Args:
        model: A model holding lora_layers layers (compiled or DDP-wrapped is fine).
        bias: ``"none"``, ``"all"`` or ``"lora_only"``, as :func:`lora_state_dict`.

    Returns:
        An :class:`Adapter` whose tensors are the model's own (detached, not copied), or
        full gathered copies for FSDP2-sharded (``DTensor``) parameters.

    Raises:
        ValueError: If ``bias`` is unknown, the model has no LoRA layer, or two module names
            collide after prefix normalisation.
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got bias={bias!r}")
    modules: dict[str, LayerSpec] = {}
    tensors: dict[str, torch.Tensor] = {}
    for raw, layer in lora_modules(model):
        name = _normalize_name(raw)
        if name in modules:
            raise AdapterError(f"two LoRA layers normalise to the module name {name!r}")
        modules[name] = LayerSpec.from_layer(layer)
        tensors[_key(name, "lora_A")] = _full_tensor(layer.lora_A.detach())
        tensors[_key(name, "lora_B")] = _full_tensor(layer.lora_B.detach())
    if not modules:
        raise AdapterError("the model has no LoRA layer with r > 0; nothing to save")
    biases = []
    for key, value in lora_state_dict(model, bias=bias).items():
        name, leaf = _split_key(key)
        if leaf == "bias":
            name = _normalize_name(name)
            biases.append(name)
            tensors[_key(name, "bias")] = _full_tensor(value.detach())
    return Adapter(tensors=tensors, modules=modules, biases=tuple(biases), bias=bias)


# --------------------------------------------------------------------------- writing
def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``; on any failure ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing to write {str(path)!r}: {path.suffix} is a pickle suffix, and adapter "
            "files are safetensors; use a .safetensors path"
        )


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]):
    cpu = {}
    for key, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"{key} is on the meta device; materialise the model before saving")
        cpu[key] = t.detach().to("cpu").contiguous()
    # Looked up at call time so the writer can be replaced (e.g. by tests simulating a failure).
    _atomic_write(path, lambda tmp: safetensors.torch.save_file(cpu, str(tmp), metadata=metadata))


def save_lora(model: nn.Module | Adapter, path: str | os.PathLike, bias: str = "none") -> Path:
    """Save a model's LoRA adapter (or an :class:`Adapter`) as one safetensors file.

    The file holds only the adapter tensors (``<module>.lora_A``, ``<module>.lora_B`` and,
    per ``bias``, ``<module>.bias``) and the JSON metadata describing every layer. Module
    names are stored without ``_orig_mod.`` / ``module.`` / ``base_model.model.`` prefixes.
    The write is atomic: a temporary file in the same directory, fsynced, then renamed over
    ``path``, so a failure leaves any previous file intact.

    Args:
        model: A model with lora_layers layers, or an :class:`Adapter` (e.g. from
            :func:`split_fused`).
        path: Destination, normally ``*.safetensors``. Pickle suffixes are refused.
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` (ignored for an :class:`Adapter`).

    Returns:
        The path written.

    Raises:
        ValueError: For a pickle suffix, an unknown ``bias``, a model without LoRA layers or
            tensors on the meta device.
    """
    path = Path(path)
    _check_not_pickle(path)
    adapter = model if isinstance(model, Adapter) else adapter_from_model(model, bias=bias)
    if adapter.problems:
        raise AdapterError(adapter.problems, context="cannot save an adapter with problems")
    _save_tensors(adapter.tensors, path, adapter.metadata())
    return path


# --------------------------------------------------------------------------- reading
def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, Any]:
    if not allow_pickle:
        raise AdapterError(
            f"refusing to read {str(path)!r}: {path.suffix} files are pickles, which can run "
            "code when loaded. Convert it to safetensors, or pass allow_pickle=True if you trust "
            "it (it is then read with torch.load(weights_only=True), never full unpickling)"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise AdapterError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError subclasses
        raise AdapterError(
            f"cannot read {str(path)!r} as safetensors ({type(exc).__name__}: {exc}); the file "
            "is truncated, corrupted or not a safetensors file"
        ) from exc
    return tensors, metadata


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read an adapter file without loading it into anything.

    Safetensors files with lora_layers metadata give an :class:`Adapter` with specs; a
    safetensors file without it, or (with ``allow_pickle``) a ``.pt``/``.bin`` state dict,
    gives a bare adapter that can only load into existing LoRA layers. Keys and module names
    are normalised. Problems that do not stop reading (a spec with a bad field, keys colliding
    after normalisation) are kept in ``Adapter.problems`` and reported by :func:`load_lora`.

    Args:
        path: The file.
        allow_pickle: Allow ``.pt``/``.pth``/``.bin``/``.ckpt`` files, read with
            ``torch.load(weights_only=True)``.

    Returns:
        The adapter.

    Raises:
        FileNotFoundError: If the file does not exist.
        AdapterError: For a pickle file without ``allow_pickle``, an unreadable or truncated
            file, unparsable metadata or a newer format version.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        hint = " (a PEFT adapter: use import_peft)" if (path / PEFT_CONFIG_NAME).exists() else ""
        raise AdapterError(f"{source} is a directory, not an adapter file{hint}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return Adapter.from_state_dict(_load_pickle(path, allow_pickle), source=source)
    raw, metadata = _read_safetensors(path)
    if METADATA_KEY not in metadata:
        return Adapter.from_state_dict(raw, source=source)
    try:
        doc = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise AdapterError(
            f"{source}: the {METADATA_KEY} metadata is not valid JSON: {exc}"
        ) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("modules"), dict):
        raise AdapterError(f"{source}: the {METADATA_KEY} metadata has no 'modules' object")
    version = doc.get("format_version")
    if not _is_int(version) or version < 1:
        raise AdapterError(f"{source}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{source}: written in adapter format {version}, this lora_layers reads up to "
            f"{FORMAT_VERSION}; upgrade lora_layers"
        )
    tensors, problems = _normalized_tensors(raw)
    modules: dict[str, LayerSpec] = {}
    invalid: set[str] = set()
    for raw_name, data in doc["modules"].items():
        name = _normalize_name(raw_name)
        try:
            spec = LayerSpec.from_json(data)
        except AdapterError as exc:
            problems += [f"{name}: invalid metadata: {p}" for p in exc.problems]
            invalid.add(name)
            continue
        if name in modules:
            problems.append(f"two metadata entries normalise to the module name {name!r}")
            continue
        modules[name] = spec
    lists = {}
    for field_name in ("biases", "base_weights"):
        names = doc.get(field_name, [])
        if not isinstance(names, list) or not all(isinstance(b, str) for b in names):
            problems.append(
                f"metadata {field_name!r} must be a list of module names, got {names!r}"
            )
            names = []
        lists[field_name] = tuple(_normalize_name(b) for b in names)
    bias_mode = doc.get("bias", "none")
    if bias_mode not in BIAS_MODES:
        problems.append(f"metadata 'bias' must be one of {BIAS_MODES}, got {bias_mode!r}")
    return Adapter(
        tensors=tensors,
        modules=modules,
        biases=lists["biases"],
        base_weights=lists["base_weights"],
        bias=bias_mode if bias_mode in BIAS_MODES else "none",
        problems=problems,
        invalid_modules=invalid,
        source=source,
    )


# --------------------------------------------------------------------------- report
@dataclass
class LoadReport:
    """What loading an adapter found and did.

    Attributes:
        source: The file or object loaded.
        missing_keys: Keys the model or the file's metadata needs that the file lacks.
        unexpected_keys: Keys in the file that nothing in the model or metadata accounts for.
        shape_mismatches: Keys (or ``<module>.weight`` for base layers) with a wrong shape.
        config_mismatches: Modules whose config (type, rank, alpha, slices, ...) differs.
        errors: Problems not tied to one key (unreadable metadata, non-finite values, ...).
        notes: Key or module -> the reasons it is listed.
        loaded_keys: Keys that were loaded.
        injected_modules: Modules that were turned into LoRA layers from the metadata.
    """

    source: str = "<memory>"
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)
    config_mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    loaded_keys: list[str] = field(default_factory=list)
    injected_modules: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not (
            self.missing_keys
            or self.unexpected_keys
            or self.shape_mismatches
            or self.config_mismatches
            or self.errors
        )

    def _add(self, kind: str, key: str, why: str) -> None:
        items = getattr(self, kind)
        if key not in items:
            items.append(key)
        self.notes.setdefault(key, [])
        if why not in self.notes[key]:
            self.notes[key].append(why)

    def format(self) -> str:
        """A readable multi-line account of every problem."""
        lines = []
        for title, kind in (
            ("missing keys", "missing_keys"),
            ("unexpected keys", "unexpected_keys"),
            ("shape mismatches", "shape_mismatches"),
            ("config mismatches", "config_mismatches"),
        ):
            items = getattr(self, kind)
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {k}: {'; '.join(self.notes.get(k, []))}" for k in items]
        if self.errors:
            lines.append(f"other errors ({len(self.errors)}):")
            lines += [f"  {e}" for e in self.errors]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format() if not self.ok else f"loaded {len(self.loaded_keys)} keys"


class AdapterLoadError(AdapterError):
    """Loading found problems; nothing in the model was changed.

    Attributes:
        report: The :class:`LoadReport` listing every problem.
    """

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        self.problems = report.format().splitlines()
        n = (
            len(report.missing_keys)
            + len(report.unexpected_keys)
            + len(report.shape_mismatches)
            + len(report.config_mismatches)
            + len(report.errors)
        )
        ValueError.__init__(
            self,
            f"cannot load adapter {report.source}: {n} problem(s); the model was not changed.\n"
            + report.format()
            + "\nFix the file or the model, or pass strict=False to load only the parts "
            "without problems (the report is returned).",
        )


# --------------------------------------------------------------------------- loading
@dataclass
class _ModulePlan:
    name: str  # normalised, as in the file
    raw_name: str  # in the model
    module: nn.Module  # the LoRA layer, or the plain layer to wrap
    spec: LayerSpec | None  # the file's spec (None for bare state dicts)
    inject: bool
    raw_names: tuple[str, ...] = ()  # every name the module has in the model (aliases)
    # requires_grad the wrapped module's Parameters get once the new layer is swapped in
    requires_grad: tuple[tuple[nn.Parameter, bool], ...] = ()


def _check_tensor(report: LoadReport, key: str, t: torch.Tensor) -> bool:
    if t.dtype not in _DTYPES:
        report.errors.append(
            f"{key}: dtype {_dtype_name(t.dtype)} is not supported (adapter tensors must be "
            f"{_DTYPE_NAMES})"
        )
        return False
    if t.device.type != "meta" and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        report.errors.append(f"{key}: holds {bad} NaN/Inf values")
        return False
    return True


def _peft_hint(key: str) -> str:
    name, leaf = _split_key(key)
    if leaf == "weight" and _split_key(name)[1] in _LORA_LEAVES or "lora_embedding_" in leaf:
        return "looks like a PEFT key; load PEFT adapters with import_peft"
    return ""


def _plan_module(
    report: LoadReport,
    adapter: Adapter,
    index: dict[str, tuple[str, nn.Module]],
    name: str,
    spec: LayerSpec | None,
    inject: bool,
    claimed: set[str],
    model_name: str,
) -> _ModulePlan | None:
    """Check one adapter module against the file and the model; return a plan when loadable.

    ``name`` is the module's name in the file, ``model_name`` its name in ``index`` (they
    differ when the file names a second name of a module registered twice).
    """
    ok = True
    keys = [_key(name, leaf) for leaf in _LORA_LEAVES]
    shapes = spec.lora_shapes() if spec is not None else (None, None)
    for key, shape in zip(keys, shapes, strict=True):
        if key not in adapter.tensors:
            report._add("missing_keys", key, "described in the file's metadata but not stored")
            ok = False
            continue
        claimed.add(key)
        t = adapter.tensors[key]
        if shape is not None and _shape(t) != shape:
            report._add(
                "shape_mismatches",
                key,
                f"file {_shape(t)}, metadata (r={spec.r}) implies {shape}",
            )
            ok = False
        if spec is not None and _dtype_name(t.dtype) != spec.dtype:
            report._add(
                "config_mismatches", key, f"tensor dtype {t.dtype}, metadata says {spec.dtype}"
            )
            ok = False
        ok = _check_tensor(report, key, t) and ok
    present = [k for k in keys if k in adapter.tensors]
    entry = index.get(model_name)
    if entry is None:
        for key in present:
            report._add("unexpected_keys", key, f"the model has no module named {name!r}")
        return None
    raw_name, module = entry
    if isinstance(module, LoRALayer):
        if module.r == 0:
            report._add(
                "config_mismatches",
                name,
                f"the model's {type(module).__name__} has r=0 (no LoRA parameters)",
            )
            return None
        model_spec = LayerSpec.from_layer(module)
        if spec is not None:
            for diff in spec.differences(model_spec):
                report._add("config_mismatches", name, diff)
                ok = False
        for key, param in zip(keys, (module.lora_A, module.lora_B), strict=True):
            t = adapter.tensors.get(key)
            if t is not None and _shape(t) != _shape(param) and key not in report.shape_mismatches:
                report._add("shape_mismatches", key, f"file {_shape(t)}, model {_shape(param)}")
                ok = False
        return _ModulePlan(name, raw_name, module, spec, inject=False) if ok else None
    # A plain module: wrap it from the metadata.
    kind = type(module).__name__
    if spec is None:
        for key in present:
            report._add(
                "unexpected_keys",
                key,
                f"{name!r} is a plain {kind}; a state dict without lora_layers metadata only "
                "loads into existing LoRA layers (inject them first, or use a save_lora file)",
            )
        return None
    base_cls = _LAYERS[spec.layer][1]
    if not inject:
        report._add(
            "config_mismatches", name, f"is a plain {kind} and inject=False; the file has LoRA"
        )
        return None
    if base_cls is nn.Linear and _is_hf_conv1d(module):
        # transformers' Conv1D (GPT-2) is a linear layer storing its weight (in, out).
        if not spec.fan_in_fan_out:
            report._add(
                "config_mismatches",
                name,
                f"the model's module is a transformers Conv1D (weight stored (in, out)), but the "
                f"file's {spec.layer} adapter has fan_in_fan_out=False",
            )
            return None
    elif not isinstance(module, base_cls):
        report._add(
            "config_mismatches",
            name,
            f"the file has a {spec.layer} adapter but the model's module is a {kind}",
        )
        return None
    elif spec.fan_in_fan_out:
        report._add(
            "config_mismatches",
            name,
            "fan_in_fan_out=True adapters cannot be injected into a plain nn.Linear",
        )
        return None
    if not raw_name:
        report._add("config_mismatches", name, "cannot replace the root module itself")
        return None
    if dense_weight_shape(module) != spec.weight_shape:
        report._add(
            "shape_mismatches",
            _key(name, "weight"),
            f"model base weight {dense_weight_shape(module)}, the adapter was made for "
            f"{spec.weight_shape} (a file from another model?)",
        )
        return None
    return _ModulePlan(name, raw_name, module, spec, inject=True) if ok else None


def _same_adapter(adapter: Adapter, name: str, other: str) -> bool:
    """Whether the file gives modules ``name`` and ``other`` identical adapters."""
    specs = adapter.modules or {}
    if specs.get(name) != specs.get(other):
        return False
    for leaf in _LORA_LEAVES:
        a, b = adapter.tensors.get(_key(name, leaf)), adapter.tensors.get(_key(other, leaf))
        if a is None or b is None or a.dtype != b.dtype or not torch.equal(a, b):
            return False
    return True


# (key, the model's parameter or buffer, the file's tensor, the module holding it)
_ParamLoad = tuple[str, torch.Tensor, torch.Tensor, nn.Module]


def _validate(
    model: nn.Module, adapter: Adapter, inject: bool
) -> tuple[LoadReport, list[_ModulePlan], list[_ParamLoad]]:
    report = LoadReport(source=adapter.source)
    report.errors += adapter.problems
    index, collisions = _module_index(model)
    report.errors += collisions
    aliases, raw_names = _module_aliases(model, index)
    claimed: set[str] = set()
    plans: list[_ModulePlan] = []
    if adapter.modules is not None:
        names: dict[str, LayerSpec | None] = dict(adapter.modules)
    else:
        names = {}
        for key in adapter.tensors:
            name, leaf = _split_key(key)
            if leaf in _LORA_LEAVES:
                names.setdefault(name, None)
    first_name: dict[str, str] = {}  # model name -> the file name that claimed it
    for name, spec in names.items():
        model_name = aliases.get(name, name)
        if model_name in first_name:
            # Two names of one module (model.a is model.b): one adapter, loaded once.
            other = first_name[model_name]
            claimed.update(_key(name, leaf) for leaf in _LORA_LEAVES)
            if not _same_adapter(adapter, name, other):
                report._add(
                    "config_mismatches",
                    name,
                    f"{name!r} and {other!r} are one module in the model (registered under both "
                    "names), but the file gives them different adapters",
                )
            continue
        first_name[model_name] = name
        plan = _plan_module(report, adapter, index, name, spec, inject, claimed, model_name)
        if plan is not None:
            plan.raw_names = tuple(raw_names.get(id(plan.module), [plan.raw_name]))
            plans.append(plan)
    for name in adapter.invalid_modules:
        claimed.update(_key(name, leaf) for leaf in _LORA_LEAVES)
    covered = set(first_name) | {aliases.get(n, n) for n in adapter.invalid_modules}
    # LoRA layers of the model the file says nothing about.
    for norm, (_, module) in index.items():
        if isinstance(module, LoRALayer) and module.r > 0 and norm not in covered:
            for leaf in _LORA_LEAVES:
                report._add(
                    "missing_keys",
                    _key(norm, leaf),
                    "the model has a LoRA layer here but the file has no adapter for it",
                )
    params: list[_ParamLoad] = []
    for leaf, names in (("bias", adapter.biases), ("weight", adapter.base_weights)):
        for name in names:
            key = _key(name, leaf)
            if key not in adapter.tensors:
                report._add("missing_keys", key, "listed in the file's metadata but not stored")
                continue
            claimed.add(key)
            t = adapter.tensors[key]
            entry = index.get(aliases.get(name, name))
            module = entry[1] if entry is not None else None
            param = module._parameters.get(leaf) if module is not None else None
            if param is None and module is not None and leaf == "bias":
                # loralib's lora_state_dict(bias="all") keeps every key containing "bias",
                # e.g. the causal-mask buffer ``attn.bias`` of its GPT-2 example.
                buffer = module._buffers.get(leaf)
                if buffer is not None and leaf not in module._non_persistent_buffers_set:
                    if _shape(t) != _shape(buffer) or t.dtype != buffer.dtype:
                        report._add(
                            "shape_mismatches",
                            key,
                            f"file {_shape(t)} {t.dtype}, model buffer {_shape(buffer)} "
                            f"{buffer.dtype}",
                        )
                    else:
                        params.append((key, buffer, t, module))
                    continue
            if param is None:
                report._add("unexpected_keys", key, f"the model has no parameter {key!r}")
            elif _shape(t) != _shape(param):
                report._add("shape_mismatches", key, f"file {_shape(t)}, model {_shape(param)}")
            elif _check_tensor(report, key, t):
                params.append((key, param, t, module))
    for key in adapter.tensors:
        if key not in claimed:
            why = (
                "not described by the file's metadata"
                if adapter.modules is not None
                else "the model has no LoRA parameter or bias with this name"
            )
            hint = _peft_hint(key)
            report._add("unexpected_keys", key, f"{why}; {hint}" if hint else why)
    return report, plans, params


def _wrap(module: nn.Module, spec: LayerSpec) -> LoRALayer:
    """Build the LoRA layer ``spec`` describes around ``module`` (surgery's one wrapping path)."""
    fused = None
    if spec.layer == "MergedLinear":
        fused = FusedSpec(tuple(spec.split_sizes), tuple(spec.enable_lora))
    inject = InjectSpec(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        use_rslora=spec.use_rslora,
        merge_weights=spec.merge_weights,
        lora_dtype=_dtype_from_name(spec.dtype),
        fused=fused,
    )
    return wrap_module(module, inject)


def _merged_after_load(layer: LoRALayer, new: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``layer.get_merged_weight()`` as it will be once loaded, without changing ``layer``.

    A shallow copy of the layer whose Parameters listed in ``new`` (by ``id``) are replaced
    by the values to be loaded, cast as ``copy_`` will cast them, computes the merge.
    """
    probe = copy.copy(layer)
    parameters = {}
    for leaf, p in layer._parameters.items():
        if p is not None and id(p) in new and p.device.type != "meta":
            p = nn.Parameter(new[id(p)].to(device=p.device, dtype=p.dtype), requires_grad=False)
        parameters[leaf] = p
    probe.__dict__["_parameters"] = parameters
    probe.__dict__["_buffers"] = dict(layer._buffers)
    return probe.get_merged_weight()


def _prepare(
    report: LoadReport, adapter: Adapter, plans: list[_ModulePlan], params: list[_ParamLoad]
) -> tuple[list[_ModulePlan], list[LoRALayer], list[_ParamLoad]]:
    """Build the new layers and compute every merge the load will do, changing nothing.

    A module that cannot be wrapped, or whose merged weight would hold NaN/Inf once the file's
    tensors are in (e.g. overflow in fp16), goes into the report and is dropped.

    Returns:
        The plans still loadable, their layers (new ones for injected modules) and the
        parameter loads still applicable.
    """
    kept: list[tuple[_ModulePlan, LoRALayer]] = []
    for plan in plans:
        layer = plan.module
        if plan.inject:
            # Wrapping freezes the shared base weight; keep the model as it is until _apply.
            flags = [(p, p.requires_grad) for p in plan.module.parameters()]
            try:
                layer = _wrap(plan.module, plan.spec)
            except (TypeError, ValueError) as exc:
                report._add("config_mismatches", plan.name, f"cannot wrap it: {exc}")
                continue
            finally:
                plan.requires_grad = tuple((p, p.requires_grad) for p, _ in flags)
                for p, flag in flags:
                    p.requires_grad_(flag)
        kept.append((plan, layer))
    new: dict[int, torch.Tensor] = {}
    for plan, layer in kept:
        for leaf in _LORA_LEAVES:
            new[id(getattr(layer, leaf))] = adapter.tensors[_key(plan.name, leaf)]
    for _, param, t, _ in params:
        new[id(param)] = t
    # Every layer the load will (re-)merge: merged ones, injected eval-mode ones with
    # merge_weights (merged as eval() would), and merged ones whose base weight is loaded.
    to_merge: dict[int, tuple[str, LoRALayer]] = {}
    for plan, layer in kept:
        if layer.merged or (plan.inject and not layer.training and layer.merge_weights):
            to_merge[id(layer)] = (plan.name, layer)
    for key, _, _, module in params:
        if isinstance(module, LoRALayer) and module.merged:
            to_merge.setdefault(id(module), (_split_key(key)[0], module))
    failed: set[int] = set()
    with torch.no_grad():
        for name, layer in to_merge.values():
            try:
                _merged_after_load(layer, new)
            except ValueError as exc:
                report._add("config_mismatches", name, f"cannot merge the file's update: {exc}")
                failed.add(id(layer))
    failed_params = {
        id(p) for _, layer in to_merge.values() if id(layer) in failed for p in layer.parameters()
    }
    kept = [(plan, layer) for plan, layer in kept if id(layer) not in failed]
    params = [item for item in params if id(item[1]) not in failed_params]
    return [plan for plan, _ in kept], [layer for _, layer in kept], params


def _apply(
    model: nn.Module,
    report: LoadReport,
    adapter: Adapter,
    plans: list[_ModulePlan],
    layers: list[LoRALayer],
    params: list[_ParamLoad],
) -> None:
    with torch.no_grad():
        for plan, layer in zip(plans, layers, strict=True):
            if plan.inject:
                for raw_name in plan.raw_names or (plan.raw_name,):  # every name of the module
                    replace_module(model, raw_name, layer)
                for p, flag in plan.requires_grad:
                    p.requires_grad_(flag)
                report.injected_modules.append(plan.name)
            for leaf in _LORA_LEAVES:
                key = _key(plan.name, leaf)
                getattr(layer, leaf).copy_(adapter.tensors[key])
                report.loaded_keys.append(key)
        for key, param, t, _ in params:
            param.copy_(t)
            report.loaded_keys.append(key)
        for plan, layer in zip(plans, layers, strict=True):
            # A merged layer holds the old update; an injected eval-mode layer merges as eval() would.
            if layer.merged or (plan.inject and not layer.training and layer.merge_weights):
                layer.merge()
        for *_, module in params:
            if isinstance(module, LoRALayer) and module.merged:
                module.merge()


def _refuse(source: str, problems: Sequence[str], strict: bool, cause: Exception) -> LoadReport:
    """An adapter that cannot be read at all: raise (strict) or warn and return the report."""
    report = LoadReport(source=source, errors=list(problems))
    if strict:
        raise AdapterLoadError(report) from cause
    warnings.warn(f"adapter {source} not loaded:\n{report.format()}", stacklevel=3)
    return report


def load_lora(
    model: nn.Module,
    source: str | os.PathLike | Adapter | Mapping[str, torch.Tensor],
    strict: bool = True,
    inject: bool = True,
    allow_pickle: bool = False,
) -> LoadReport:
    """Load an adapter into ``model``, validating everything before changing anything.

    ``model`` may already hold LoRA layers (their config must match the file's metadata), or
    be a plain base model: each module the metadata describes is then wrapped with the layer
    it names (``from_module``, sharing the base Parameters) and loaded. A module registered
    under several names (``model.a is model.b``) is replaced under every name, as
    :func:`~lora_layers.inject_lora` does. Merged layers are re-merged, and injected layers
    in eval mode are merged as ``eval()`` would, so outputs match the saved model's exactly;
    every such merge is computed (and checked for NaN/Inf) before anything is changed.

    Args:
        model: The model to load into (a compiled or DDP-wrapped model is fine).
        source: A path (``.safetensors``; ``.pt``/``.bin`` only with ``allow_pickle``), an
            :class:`Adapter`, or a bare state dict (e.g. ``loralib.lora_state_dict``).
        strict: Raise on any problem (default). With False, load only the modules without
            problems, warn, and return the report.
        inject: Wrap plain modules the metadata describes (default True).
        allow_pickle: Allow pickle files, read with ``torch.load(weights_only=True)``.

    Returns:
        A :class:`LoadReport` (``report.ok`` is False only in non-strict mode).

    Raises:
        AdapterLoadError: In strict mode, one error listing every missing key, unexpected
            key, shape mismatch, config mismatch and other problem (unsupported dtype,
            NaN/Inf, a merge that would overflow, ...). The model is unchanged. Also for a
            pickle file without ``allow_pickle`` (in non-strict mode too).
        FileNotFoundError: If the file does not exist.
    """
    if isinstance(source, Adapter):
        adapter = source
    elif isinstance(source, Mapping):
        adapter = Adapter.from_state_dict(source)
    else:
        path = Path(source)
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            try:
                _load_pickle(path, allow_pickle=False)
            except AdapterError as exc:  # the refusal raises in non-strict mode too
                _refuse(str(path), exc.problems, True, exc)
        try:
            adapter = read_adapter(path, allow_pickle=allow_pickle)
        except AdapterError as exc:
            return _refuse(str(path), exc.problems, strict, exc)
    report, plans, params = _validate(model, adapter, inject)
    plans, layers, params = _prepare(report, adapter, plans, params)
    if not report.ok:
        if strict:
            raise AdapterLoadError(report)
        warnings.warn(
            f"loading adapter {report.source} partially (strict=False):\n{report.format()}",
            stacklevel=2,
        )
    _apply(model, report, adapter, plans, layers, params)
    return report


def load_lora_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> LoadReport:
    """Load a bare adapter state dict, e.g. ``loralib.lora_state_dict(model)``.

    The model must already have its LoRA layers (a state dict has no metadata to inject from).
    Keys are normalised and checked as :func:`load_lora` checks files: every key must be a
    LoRA parameter (or bias) of the model with the same shape, and every LoRA layer of the
    model must be covered.

    Args:
        model: A model with lora_layers layers.
        state_dict: ``<module>.lora_A`` / ``<module>.lora_B`` (/ ``<module>.bias``) tensors.
        strict: As :func:`load_lora`.

    Returns:
        The :class:`LoadReport`.

    Raises:
        AdapterLoadError: In strict mode, listing every problem; the model is unchanged.
    """
    return load_lora(model, Adapter.from_state_dict(state_dict), strict=strict, inject=False)
