"""lora_layers: correct, fast, memory-lean LoRA layers for PyTorch.

A drop-in replacement for ``nn.Linear`` and Microsoft's ``loralib``: the same constructor
arguments and state-dict keys, exact merge math, and helpers to put LoRA into any model.
"""

from .base import LoRALayer
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear
from .merged import MergedLinear
from .utils import disable_adapters, lora_modules, lora_state_dict, mark_only_lora_as_trainable

__version__ = "0.1.0"

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "LoRALayer",
    "Linear",
    "MergedLinear",
    "disable_adapters",
    "lora_modules",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
]
