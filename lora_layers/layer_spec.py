"""What an adapter file says about one layer: its shape facts plus its :class:`LoRAConfig`.

A :class:`LayerSpec` holds what the base layer looks like (layer kind, in/out features, the
base weight's shape, ``fan_in_fan_out``) and the layer's :class:`~lora_layers.LoRAConfig`
(rank, alpha, dropout, rsLoRA, merge mode, LoRA dtype, fused slices, DoRA, and any field
added to the config later). :func:`config_to_json` / :func:`config_from_json` are the one
mapping between a config and the JSON fields of a file, so a new config field reaches files
without a second list. The file format is specified in ``docs/adapters.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import FusedSpec, LoRAConfig, SliceLayout, check_slices, is_int
from .kinds import CONV_DIMS, LAYER_KINDS, layer_kind, layer_sizes
from .quantized import dense_weight_shape

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "FIELD_SINCE",
    "FORMAT_VERSION",
    "AdapterError",
    "LayerSpec",
    "config_from_json",
    "config_to_json",
    "dtype_from_name",
    "dtype_name",
    "shape_of",
]

# The dtypes an adapter tensor may have (float8 and friends have no LoRA arithmetic here).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)

# Per-module JSON fields of format version 1, always written (a plain LoRA file stays v1).
_V1_FIELDS = frozenset(
    {"layer", "r", "lora_alpha", "use_rslora", "lora_dropout", "fan_in_fan_out"}
    | {"merge_weights", "in_features", "out_features", "weight_shape", "dtype"}
    | {"enable_lora", "split_sizes", "slice_ranks"}
)
#: The newest adapter format version this lora_layers writes and reads.
FORMAT_VERSION = 2
#: Format version that introduced each later per-module field. A field is written only when
#: it differs from its default, and a file's version is the highest its fields need; a field
#: missing here counts as needing the current version.
FIELD_SINCE: dict[str, int] = {"use_dora": 2}
# The LayerSpec fields that are not the config (the base layer's shape facts).
_SHAPE_FIELDS = ("layer", "in_features", "out_features", "weight_shape", "fan_in_fan_out")
# Config fields that do not make loading into an existing layer inexact.
_NOT_COMPARED = frozenset({"lora_dropout", "merge_weights", "lora_dtype"})


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


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object) -> torch.dtype | None:
    """The adapter dtype named ``name`` (``"float32"``, ...), or None if it is not one."""
    if not isinstance(name, str):
        return None
    dtype = getattr(torch, name, None)
    return dtype if dtype in DTYPES else None


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    """A tensor's shape as a tuple of ints."""
    return tuple(int(s) for s in t.shape)


def config_to_json(config: LoRAConfig, full: bool = False) -> dict[str, Any]:
    """The per-module JSON fields a :class:`LoRAConfig` is written as.

    Every config field is written under its own name, except ``lora_dtype`` (written as
    ``dtype``, the dtype name of ``lora_A`` / ``lora_B``; it must be set) and ``fused``
    (written as ``enable_lora`` and ``split_sizes``). Fields of format version 1 are always
    written; later fields (``use_dora``, ...) only when they differ from their default, so
    a file without them stays readable by older lora_layers.

    Args:
        config: The layer's config, with ``lora_dtype`` set.
        full: Write every field, defaults included (for comparisons).

    Returns:
        A JSON-ready dict.
    """
    assert config.lora_dtype is not None, "a LayerSpec's config names its LoRA dtype"
    out: dict[str, Any] = {}
    for f in dataclasses.fields(LoRAConfig):
        value = getattr(config, f.name)
        if f.name == "lora_dtype":
            out["dtype"] = dtype_name(value)
        elif f.name == "fused":
            if value is not None:
                out["enable_lora"] = list(value.enable_lora)
                out["split_sizes"] = list(value.split_sizes)
        elif full or f.name in _V1_FIELDS or value != f.default:
            out[f.name] = value
    return out


def _config_json_keys() -> set[str]:
    names = {f.name for f in dataclasses.fields(LoRAConfig)} - {"lora_dtype", "fused"}
    return names | {"dtype", "enable_lora", "split_sizes"}


def _fused_from_json(data: Mapping[str, Any]) -> tuple[FusedSpec | None, list[str]]:
    enable, sizes = data.get("enable_lora"), data.get("split_sizes")
    if enable is None and sizes is None:
        return None, []
    if enable is None or sizes is None:
        return None, ["enable_lora and split_sizes must be given together"]
    if not isinstance(enable, (list, tuple)) or not all(isinstance(e, bool) for e in enable):
        return None, [f"enable_lora must be booleans, got {enable!r}"]
    if not isinstance(sizes, (list, tuple)) or not all(is_int(s) and s > 0 for s in sizes):
        return None, [f"split_sizes must be positive ints, got {sizes!r}"]
    if not any(enable):
        return None, ["enable_lora enables no slice"]
    try:
        return FusedSpec(tuple(sizes), tuple(enable)), []
    except (TypeError, ValueError) as exc:
        return None, [str(exc)]


def config_from_json(data: Mapping[str, Any]) -> tuple[LoRAConfig | None, list[str]]:
    """Parse the config fields of one module's JSON (the inverse of :func:`config_to_json`).

    Args:
        data: The module's JSON object (shape fields are ignored here).

    Returns:
        ``(config, problems)``: the config, or None with every problem found.
    """
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    for f in dataclasses.fields(LoRAConfig):
        if f.name == "lora_dtype":
            name = data.get("dtype", "float32")
            kwargs["lora_dtype"] = dtype_from_name(name)
            if kwargs["lora_dtype"] is None:
                problems.append(f"dtype must be one of {DTYPE_NAMES}, got {name!r}")
        elif f.name == "fused":
            kwargs["fused"], bad = _fused_from_json(data)
            problems += bad
        elif f.name in data:
            value = data[f.name]
            if isinstance(f.default, bool) and not isinstance(value, bool):
                problems.append(f"{f.name} must be true or false, got {value!r}")
            kwargs[f.name] = value
    r = kwargs.get("r")
    if not is_int(r) or r <= 0:
        problems.append(f"r must be a positive int, got {r!r}")
    if problems:
        return None, problems
    try:
        return LoRAConfig(**kwargs), []
    except (TypeError, ValueError) as exc:
        return None, [str(exc)]


def _shape_field_problems(data: Mapping[str, Any]) -> list[str]:
    out = []
    for name in ("in_features", "out_features"):
        value = data.get(name)
        if not is_int(value) or value <= 0:
            out.append(f"{name} must be a positive int, got {value!r}")
    if not isinstance(data.get("fan_in_fan_out", False), bool):
        out.append(f"fan_in_fan_out must be true or false, got {data['fan_in_fan_out']!r}")
    shape = data.get("weight_shape")
    if not isinstance(shape, (list, tuple)) or not all(is_int(s) and s > 0 for s in shape):
        out.append(f"weight_shape must be a list of positive ints, got {shape!r}")
    return out


@dataclass(frozen=True)
class LayerSpec:
    """Everything needed to rebuild one LoRA layer around its base layer.

    The base layer's shape facts plus its :class:`~lora_layers.LoRAConfig`; the config's
    settings read as attributes too (``spec.r``, ``spec.use_dora``, ...).

    Attributes:
        layer: ``"Linear"``, ``"MergedLinear"``, ``"Embedding"``, ``"Conv1d"``, ``"Conv2d"``
            or ``"Conv3d"``.
        in_features: ``in_features`` / ``num_embeddings`` / ``in_channels``.
        out_features: ``out_features`` / ``embedding_dim`` / ``out_channels``.
        weight_shape: Shape of the base layer's ``weight``.
        config: The layer's LoRA settings, ``lora_dtype`` set to the dtype of ``lora_A`` /
            ``lora_B`` and ``fused`` to the slices of a ``MergedLinear``.
        fan_in_fan_out: Whether the base weight is stored ``(in, out)``.
    """

    layer: str
    in_features: int
    out_features: int
    weight_shape: tuple[int, ...]
    config: LoRAConfig
    fan_in_fan_out: bool = False

    r = property(lambda self: self.config.r, doc="Rank (per enabled slice when fused).")
    lora_alpha = property(lambda self: self.config.lora_alpha, doc="Scaling numerator.")
    use_rslora = property(lambda self: self.config.use_rslora, doc="rsLoRA scaling.")
    lora_dropout = property(lambda self: self.config.lora_dropout, doc="Dropout probability.")
    merge_weights = property(lambda self: self.config.merge_weights, doc="merge_weights flag.")
    scaling = property(lambda self: self.config.scaling, doc="The layer's scaling.")

    @property
    def use_dora(self) -> bool:
        """Whether the layer is DoRA (a ``lora_magnitude`` vector is stored)."""
        return self.config.use_dora

    @property
    def dtype(self) -> str:
        """Dtype name of ``lora_A`` / ``lora_B`` (``"float32"``, ``"bfloat16"``, ...)."""
        return dtype_name(self.config.lora_dtype)

    @property
    def enable_lora(self) -> tuple[bool, ...] | None:
        """``MergedLinear`` only: which output slices have LoRA."""
        return None if self.config.fused is None else self.config.fused.enable_lora

    @property
    def split_sizes(self) -> tuple[int, ...] | None:
        """``MergedLinear`` only: output slice sizes."""
        return None if self.config.fused is None else self.config.fused.split_sizes

    @property
    def slice_ranks(self) -> tuple[int, ...]:
        """The rank of each output slice (0 for disabled slices); ``(r,)`` when unfused."""
        if self.enable_lora is None:
            return (self.r,)
        return tuple(self.r if on else 0 for on in self.enable_lora)

    def lora_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of ``lora_A`` and ``lora_B`` implied by this spec."""
        if self.layer == "MergedLinear":
            layout = SliceLayout.of(self.split_sizes, self.enable_lora)
            return layout.lora_shapes(self.r, self.in_features)
        if self.layer in CONV_DIMS:
            return (self.r, math.prod(self.weight_shape[1:])), (self.out_features, self.r)
        return (self.r, self.in_features), (self.out_features, self.r)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Leaf -> shape of every tensor stored for this layer (``lora_magnitude`` with DoRA).

        The magnitude has one entry per adapted output: ``(out_features,)`` (the embedding
        dimension for an ``Embedding``, as PEFT), or the enabled slices' rows of a
        ``MergedLinear`` in output order.
        """
        a, b = self.lora_shapes()
        shapes: dict[str, tuple[int, ...]] = {"lora_A": a, "lora_B": b}
        if self.use_dora:
            shapes["lora_magnitude"] = (b[0],)
        return shapes

    @classmethod
    def from_layer(cls, layer: nn.Module) -> LayerSpec:
        """Describe an existing lora_layers layer with ``r > 0``.

        Raises:
            TypeError: If ``layer`` is not a lora_layers layer.
        """
        kind = layer_kind(layer)
        if kind is None:
            raise TypeError(f"{type(layer).__name__} is not a lora_layers layer")
        in_f, out_f = layer_sizes(layer)
        lora_dtype = layer.lora_A.dtype if layer.r > 0 else layer.weight.dtype
        config = dataclasses.replace(LoRAConfig.from_layer(layer), lora_dtype=lora_dtype)
        return cls(
            layer=kind,
            in_features=in_f,
            out_features=out_f,
            weight_shape=dense_weight_shape(layer),
            config=config,
            fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
        )

    def to_config(self) -> LoRAConfig:
        """The :class:`~lora_layers.LoRAConfig` that rebuilds this layer around its base."""
        return self.config

    def problems(self) -> list[str]:
        """Everything wrong with this spec (empty when it is valid)."""
        if self.layer not in LAYER_KINDS:
            return [f"unknown layer type {self.layer!r}; known: {sorted(LAYER_KINDS)}"]
        out = _shape_field_problems({f: getattr(self, f) for f in _SHAPE_FIELDS})
        if not is_int(self.r) or self.r <= 0:
            out.append(f"r must be a positive int, got {self.r!r}")
        if self.config.lora_dtype not in DTYPES:
            out.append(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if out:
            return out
        return self._consistency_problems()

    def _consistency_problems(self) -> list[str]:
        """Whether the shape facts, the kind and the slices agree with each other."""
        out: list[str] = []
        i, o, shape = self.in_features, self.out_features, tuple(self.weight_shape)
        if self.layer in ("Linear", "MergedLinear"):
            expected = (i, o) if self.fan_in_fan_out else (o, i)
            if shape != expected:
                out.append(f"weight_shape {list(shape)} does not match in/out features {i}/{o}")
        elif self.layer == "Embedding":
            if shape != (i, o):
                out.append(f"weight_shape {list(shape)} is not (num_embeddings, embedding_dim)")
        else:
            dims = CONV_DIMS[self.layer]
            if len(shape) != dims + 2 or shape[0] != o or i % shape[1] != 0:
                out.append(
                    f"weight_shape {list(shape)} is not a {self.layer} kernel for "
                    f"{i} -> {o} channels"
                )
        if self.fan_in_fan_out and self.layer not in ("Linear", "MergedLinear"):
            out.append(f"fan_in_fan_out is only valid for Linear layers, not {self.layer}")
        if self.layer == "MergedLinear":
            if self.config.fused is None:
                out.append("MergedLinear needs enable_lora and split_sizes")
            else:
                try:
                    check_slices(o, self.enable_lora, self.split_sizes)
                except (TypeError, ValueError) as exc:
                    out.append(str(exc))
        elif self.config.fused is not None:
            out.append(
                f"enable_lora / split_sizes are only valid for MergedLinear, not {self.layer}"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the file's metadata for this layer."""
        data: dict[str, Any] = {
            "layer": self.layer,
            "fan_in_fan_out": self.fan_in_fan_out,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "weight_shape": list(self.weight_shape),
        }
        data.update(config_to_json(self.config))
        if self.layer == "MergedLinear":
            data["slice_ranks"] = list(self.slice_ranks)
        return data

    def format_version(self) -> int:
        """The lowest adapter format version that holds this layer's metadata."""
        fields = self.to_json()
        return max(1 if k in _V1_FIELDS else FIELD_SINCE.get(k, FORMAT_VERSION) for k in fields)

    @classmethod
    def from_json(cls, data: object) -> LayerSpec:
        """Parse and validate one layer's metadata object.

        Raises:
            AdapterError: Listing every problem with the object.
        """
        if not isinstance(data, dict):
            raise AdapterError(f"expected a JSON object, got {type(data).__name__}")
        known = set(_SHAPE_FIELDS) | _config_json_keys() | {"slice_ranks"}
        required = ("layer", "r", "lora_alpha", "in_features", "out_features", "weight_shape")
        problems = [f"unknown field {k!r}" for k in data if k not in known]
        problems += [f"missing field {k!r}" for k in required if k not in data]
        if problems:
            raise AdapterError(problems)
        if data["layer"] not in LAYER_KINDS:
            raise AdapterError(
                f"unknown layer type {data['layer']!r}; known: {sorted(LAYER_KINDS)}"
            )
        config, problems = config_from_json(data)
        problems += _shape_field_problems(data)
        if config is None or problems:
            raise AdapterError(problems)
        spec = cls(
            layer=data["layer"],
            in_features=data["in_features"],
            out_features=data["out_features"],
            weight_shape=tuple(data["weight_shape"]),
            config=config,
            fan_in_fan_out=data.get("fan_in_fan_out", False),
        )
        problems = spec.problems()
        ranks = data.get("slice_ranks")
        if not problems and ranks is not None and list(ranks) != list(spec.slice_ranks):
            problems.append(f"slice_ranks {ranks} disagree with r and enable_lora")
        if problems:
            raise AdapterError(problems)
        return spec

    def differences(self, other: LayerSpec, mine: str = "file", theirs: str = "model") -> list[str]:
        """The settings that differ from ``other`` (what makes loading inexact).

        Compared: the shape facts and every config field except dropout, merge mode and
        LoRA dtype (so ``use_dora`` and fields added later are compared too).
        """
        a, b = self._comparable(), other._comparable()
        return [f"{k}: {mine} {a.get(k)!r}, {theirs} {b.get(k)!r}" for k in a if a[k] != b.get(k)]

    def _comparable(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer}
        for f in dataclasses.fields(LoRAConfig):
            if f.name == "fused":
                out["enable_lora"], out["split_sizes"] = self.enable_lora, self.split_sizes
            elif f.name not in _NOT_COMPARED:
                out[f.name] = getattr(self.config, f.name)
        out["fan_in_fan_out"] = self.fan_in_fan_out
        out["weight_shape"] = tuple(self.weight_shape)
        return out
