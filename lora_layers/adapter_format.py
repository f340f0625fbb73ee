"""The adapter file format: what describes one layer (:class:`LayerSpec`) and an adapter.

An adapter file is one safetensors file holding the LoRA tensors (``<module>.lora_A``,
``<module>.lora_B`` and optionally ``<module>.bias``) and, in the header metadata under
:data:`METADATA_KEY`, a versioned JSON description of every adapted layer (layer type, rank,
alpha, rsLoRA, fan_in_fan_out, dropout, fused-slice layout, base weight shape, dtype). The
format is specified in ``docs/adapters.md``; reading and writing files is
:mod:`lora_layers.adapter_io`, loading into a model :mod:`lora_layers.loading`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import check_lora_args, lora_scaling
from .config import FusedSpec, LoRAConfig, SliceLayout, check_slices, is_int
from .keys import join_key, normalize_name, normalized_tensors, split_key
from .kinds import CONV_DIMS, LAYER_KINDS, layer_kind, layer_sizes
from .modules_to_save import parse_saved_metadata, saved_state
from .quantized import dense_weight_shape
from .utils import BIAS_MODES, lora_modules, lora_state_dict

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "Adapter",
    "AdapterError",
    "LayerSpec",
    "adapter_from_model",
    "dtype_from_name",
    "dtype_name",
    "full_tensor",
    "shape_of",
]

FORMAT_VERSION = 1
METADATA_KEY = "lora_layers.adapter"
# The dtypes an adapter tensor may have (float8 and friends have no LoRA arithmetic here).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)


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
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

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
            layout = SliceLayout.of(self.split_sizes, self.enable_lora)
            n_enabled = len(layout.out_slices)
            return (self.r * n_enabled, self.in_features), (layout.b_rows, self.r)
        if self.layer in CONV_DIMS:
            return (self.r, math.prod(self.weight_shape[1:])), (self.out_features, self.r)
        return (self.r, self.in_features), (self.out_features, self.r)

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
        merged = kind == "MergedLinear"
        return cls(
            layer=kind,
            r=layer.r,
            lora_alpha=layer.lora_alpha,
            in_features=in_f,
            out_features=out_f,
            weight_shape=dense_weight_shape(layer),
            dtype=dtype_name(layer.lora_A.dtype if layer.r > 0 else layer.weight.dtype),
            use_rslora=layer.use_rslora,
            lora_dropout=layer.dropout_p,
            fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
            merge_weights=layer.merge_weights,
            enable_lora=tuple(layer.enable_lora) if merged else None,
            split_sizes=tuple(layer.split_sizes) if merged else None,
        )

    def to_config(self) -> LoRAConfig:
        """The :class:`~lora_layers.LoRAConfig` that rebuilds this layer around its base."""
        fused = None
        if self.layer == "MergedLinear":
            fused = FusedSpec(tuple(self.split_sizes), tuple(self.enable_lora))
        dtype = dtype_from_name(self.dtype)
        settings = (self.lora_dropout, self.use_rslora, self.merge_weights, dtype, fused)
        return LoRAConfig(self.r, self.lora_alpha, *settings)

    def problems(self) -> list[str]:
        """Everything wrong with this spec (empty when it is valid)."""
        out: list[str] = []
        if self.layer not in LAYER_KINDS:
            return [f"unknown layer type {self.layer!r}; known: {sorted(LAYER_KINDS)}"]
        if not is_int(self.r) or self.r <= 0:
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
            if not is_int(value) or value <= 0:
                out.append(f"{name} must be a positive int, got {value!r}")
        for name in ("use_rslora", "fan_in_fan_out", "merge_weights"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if dtype_from_name(self.dtype) is None:
            out.append(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        shape = self.weight_shape
        if not isinstance(shape, tuple) or not all(is_int(s) and s > 0 for s in shape):
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
            dims = CONV_DIMS[self.layer]
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
                    check_slices(o, self.enable_lora, self.split_sizes)
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
        modules_to_save: Module name -> the state keys stored for it (``<module>.<key>``):
            modules trained whole (see :func:`~lora_layers.inject_lora`).
        problems: Problems found while reading (reported when loading).
        invalid_modules: Modules whose metadata was invalid (their keys are not reported twice).
        source: Where the adapter came from, for messages.
    """

    tensors: dict[str, torch.Tensor]
    modules: dict[str, LayerSpec] | None = None
    biases: tuple[str, ...] = ()
    base_weights: tuple[str, ...] = ()
    bias: str = "none"
    modules_to_save: dict[str, tuple[str, ...]] = field(default_factory=dict)
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
        tensors, problems = normalized_tensors(state_dict)
        biases = tuple(split_key(k)[0] for k in tensors if split_key(k)[1] == "bias")
        return cls(tensors=tensors, modules=None, biases=biases, problems=problems, source=source)

    @classmethod
    def from_metadata(
        cls, raw: Mapping[str, torch.Tensor], text: str, source: str = "<memory>"
    ) -> Adapter:
        """The adapter a file's tensors and its :data:`METADATA_KEY` metadata describe.

        The inverse of :meth:`metadata`. Problems that do not stop reading (a spec with a bad
        field, keys colliding after normalisation) are kept in ``problems``.

        Args:
            raw: The file's tensors, by key as stored.
            text: The JSON metadata.
            source: Where it came from, for messages.

        Returns:
            Adapter: With specs for every module the metadata describes.

        Raises:
            AdapterError: For unparsable metadata or a newer format version.
        """
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AdapterError(
                f"{source}: the {METADATA_KEY} metadata is not valid JSON: {exc}"
            ) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("modules"), dict):
            raise AdapterError(f"{source}: the {METADATA_KEY} metadata has no 'modules' object")
        version = doc.get("format_version")
        if not is_int(version) or version < 1:
            raise AdapterError(f"{source}: bad format_version {version!r}")
        if version > FORMAT_VERSION:
            raise AdapterError(
                f"{source}: written in adapter format {version}, this lora_layers reads up to "
                f"{FORMAT_VERSION}; upgrade lora_layers"
            )
        tensors, problems = normalized_tensors(raw)
        modules: dict[str, LayerSpec] = {}
        invalid: set[str] = set()
        for raw_name, data in doc["modules"].items():
            name = normalize_name(raw_name)
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
            lists[field_name] = tuple(normalize_name(b) for b in names)
        saved, bad = parse_saved_metadata(doc.get("modules_to_save"))
        problems += bad
        bias_mode = doc.get("bias", "none")
        if bias_mode not in BIAS_MODES:
            problems.append(f"metadata 'bias' must be one of {BIAS_MODES}, got {bias_mode!r}")
        return cls(
            tensors=tensors,
            modules=modules,
            biases=lists["biases"],
            base_weights=lists["base_weights"],
            bias=bias_mode if bias_mode in BIAS_MODES else "none",
            modules_to_save=saved,
            problems=problems,
            invalid_modules=invalid,
            source=source,
        )

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
        if self.modules_to_save:
            doc["modules_to_save"] = {n: list(k) for n, k in sorted(self.modules_to_save.items())}
        return {"format": "pt", METADATA_KEY: json.dumps(doc, sort_keys=True)}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
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
        name = normalize_name(raw)
        if name in modules:
            raise AdapterError(f"two LoRA layers normalise to the module name {name!r}")
        modules[name] = LayerSpec.from_layer(layer)
        tensors[join_key(name, "lora_A")] = full_tensor(layer.lora_A.detach())
        tensors[join_key(name, "lora_B")] = full_tensor(layer.lora_B.detach())
    if not modules:
        raise AdapterError("the model has no LoRA layer with r > 0; nothing to save")
    saved = saved_state(model)
    for name, state in saved.items():
        tensors.update({join_key(name, k): full_tensor(t) for k, t in state.items()})
    biases = []
    for key, value in lora_state_dict(model, bias=bias).items():
        name, leaf = split_key(key)
        if leaf == "bias" and join_key(normalize_name(name), leaf) not in tensors:
            name = normalize_name(name)
            biases.append(name)
            tensors[join_key(name, "bias")] = full_tensor(value.detach())
    saved_keys = {name: tuple(state) for name, state in saved.items()}
    return Adapter(tensors, modules, tuple(biases), bias=bias, modules_to_save=saved_keys)
