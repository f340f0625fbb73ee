"""The adapter file format: what describes one layer (:class:`LayerSpec`) and an adapter.

An adapter file is one safetensors file holding the LoRA tensors (``<module>.lora_A``,
``<module>.lora_B``, ``<module>.lora_magnitude`` for DoRA layers, and optionally
``<module>.bias``) and, in the header metadata under :data:`METADATA_KEY`, a versioned JSON
description of every adapted layer (:class:`LayerSpec`: its shape facts and its
:class:`~lora_layers.LoRAConfig`). The
format is specified in ``docs/adapters.md``; reading and writing files is
:mod:`lora_layers.adapter_io`, loading into a model :mod:`lora_layers.loading`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import is_int
from .keys import MAGNITUDE_LEAF, join_key, normalize_name, normalized_tensors, split_key
from .layer_spec import (
    DTYPE_NAMES,
    DTYPES,
    FORMAT_VERSION,
    AdapterError,
    LayerSpec,
    dtype_from_name,
    dtype_name,
    shape_of,
)
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
    "dora_magnitude",
    "dtype_from_name",
    "dtype_name",
    "full_tensor",
    "shape_of",
]

METADATA_KEY = "lora_layers.adapter"


@dataclass
class Adapter:
    """An adapter in memory: tensors by key, and (unless it came from a bare state dict) specs.

    Attributes:
        tensors: ``<module>.lora_A`` / ``lora_B`` / ``lora_magnitude`` (DoRA) / ``bias`` ->
            tensor, with normalised module names.
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
        bias_mode = doc.get("bias", "none")
        if bias_mode not in BIAS_MODES:
            problems.append(f"metadata 'bias' must be one of {BIAS_MODES}, got {bias_mode!r}")
        return cls(
            tensors=tensors,
            modules=modules,
            biases=lists["biases"],
            base_weights=lists["base_weights"],
            bias=bias_mode if bias_mode in BIAS_MODES else "none",
            problems=problems,
            invalid_modules=invalid,
            source=source,
        )

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata for this adapter."""
        if self.modules is None:
            raise AdapterError("this adapter has no layer metadata (a bare state dict)")
        versions = [spec.format_version() for spec in self.modules.values()]
        doc = {
            # The lowest version holding every module: plain LoRA files stay readable by
            # lora_layers versions that read format 1.
            "format_version": max(versions, default=1),
            "library": "lora_layers",
            "bias": self.bias,
            "modules": {name: spec.to_json() for name, spec in sorted(self.modules.items())},
            "biases": sorted(self.biases),
            "base_weights": sorted(self.base_weights),
        }
        return {"format": "pt", METADATA_KEY: json.dumps(doc, sort_keys=True)}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (FSDP2); other tensors as they are.

    Gathering is a collective: every rank must call :func:`save_lora` on a sharded model.
    """
    if type(t).__name__ == "DTensor" and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def dora_magnitude(layer: nn.Module) -> torch.Tensor:
    """A DoRA layer's ``lora_magnitude`` as it will be used, for saving (detached, whole).

    A magnitude still *pending* (created on the meta device and never run or loaded: its
    memory is not yet the norm, see :mod:`lora_layers.dora`) is first computed from ``W``
    exactly as the first forward would (``dora_weight_norm()`` settles it), so a file never
    holds uninitialised memory. Sharded (FSDP2) layers are saved as they are.
    """
    if type(layer.weight).__name__ != "DTensor":
        layer.dora_weight_norm()  # settles a pending magnitude; a no-op otherwise
    return full_tensor(layer.lora_magnitude.detach())


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
        if modules[name].use_dora:
            tensors[join_key(name, MAGNITUDE_LEAF)] = dora_magnitude(layer)
    if not modules:
        raise AdapterError("the model has no LoRA layer with r > 0; nothing to save")
    biases = []
    for key, value in lora_state_dict(model, bias=bias).items():
        name, leaf = split_key(key)
        if leaf == "bias":
            name = normalize_name(name)
            biases.append(name)
            tensors[join_key(name, "bias")] = full_tensor(value.detach())
    return Adapter(tensors=tensors, modules=modules, biases=tuple(biases), bias=bias)
