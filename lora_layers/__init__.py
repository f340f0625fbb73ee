"""lora_layers: correct, fast, memory-lean LoRA layers for PyTorch.

A drop-in replacement for ``nn.Linear`` and Microsoft's ``loralib``: the same constructor
arguments and state-dict keys, exact merge math, and helpers to put LoRA into any model.
"""

from .adapters import (
    Adapter,
    AdapterError,
    AdapterLoadError,
    LayerSpec,
    LoadReport,
    adapter_from_model,
    load_lora,
    load_lora_state_dict,
    read_adapter,
    save_lora,
)
from .base import LoRALayer
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .fused import fuse_separate, split_fused
from .linear import Linear
from .lora_plus import lora_plus_param_groups
from .memory import MemoryEstimate, estimate_memory
from .merged import MergedLinear
from .peft_interop import export_peft, import_peft
from .quantized import (
    QUANTIZED_LINEARS,
    LoRALinear4bit,
    LoRALinear8bitLt,
    QuantizedLoRALinear,
    register_quantized_linear,
    supported_quantized_kinds,
)
from .surgery import (
    ALL_LINEAR,
    FUSED_LAYOUTS,
    FusedSpec,
    InjectSpec,
    LoRAConfig,
    LoRAPlan,
    count_parameters,
    enable_input_require_grads,
    inject_lora,
    lora_module_names,
    merge_and_unload,
    merge_lora,
    plan_lora,
    replace_module,
    resolve_fused,
    unload,
    unmerge_lora,
    wrap_module,
)
from .utils import disable_adapters, lora_modules, lora_state_dict, mark_only_lora_as_trainable

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "FUSED_LAYOUTS",
    "Adapter",
    "AdapterError",
    "AdapterLoadError",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "FusedSpec",
    "InjectSpec",
    "LayerSpec",
    "Linear",
    "LoRAConfig",
    "LoRALayer",
    "LoRALinear4bit",
    "LoRALinear8bitLt",
    "LoRAPlan",
    "LoadReport",
    "MemoryEstimate",
    "MergedLinear",
    "QUANTIZED_LINEARS",
    "QuantizedLoRALinear",
    "adapter_from_model",
    "count_parameters",
    "disable_adapters",
    "enable_input_require_grads",
    "estimate_memory",
    "export_peft",
    "fuse_separate",
    "import_peft",
    "inject_lora",
    "load_lora",
    "load_lora_state_dict",
    "lora_module_names",
    "lora_plus_param_groups",
    "lora_modules",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_and_unload",
    "merge_lora",
    "plan_lora",
    "read_adapter",
    "register_quantized_linear",
    "replace_module",
    "resolve_fused",
    "save_lora",
    "split_fused",
    "supported_quantized_kinds",
    "unload",
    "unmerge_lora",
    "wrap_module",
]
