"""Adapter files: safe safetensors save/load with full validation, and loralib state dicts.

The public face of five modules, one job each (see ``docs/index.md``):
:mod:`lora_layers.keys` (key names and their normal form), :mod:`lora_layers.layer_spec`
(:class:`LayerSpec`: one layer's shape facts and config), :mod:`lora_layers.adapter_format`
(:class:`Adapter`, the metadata), :mod:`lora_layers.adapter_io` (reading
and writing files) and :mod:`lora_layers.loading` (validation and loading). The format is
specified in ``docs/adapters.md``. PEFT interop lives in :mod:`lora_layers.peft_interop` and
fused <-> separate conversion in :mod:`lora_layers.fused`.
"""

from __future__ import annotations

from .adapter_format import (
    FORMAT_VERSION,
    METADATA_KEY,
    Adapter,
    AdapterError,
    LayerSpec,
    adapter_from_model,
)
from .adapter_io import (
    PEFT_CONFIG_NAME,
    PEFT_PICKLE_WEIGHTS_NAME,
    PEFT_WEIGHTS_NAME,
    PICKLE_SUFFIXES,
    read_adapter,
    save_lora,
)
from .keys import normalize_key
from .loading import AdapterLoadError, LoadReport, load_lora, load_lora_state_dict

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "PEFT_CONFIG_NAME",
    "PEFT_PICKLE_WEIGHTS_NAME",
    "PEFT_WEIGHTS_NAME",
    "PICKLE_SUFFIXES",
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
