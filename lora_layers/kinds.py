"""The one table of layer kinds: which torch layers get which LoRA layer, and back.

:data:`LAYER_KINDS` maps the name a layer has in adapter files to its LoRA class and the torch
class it replaces. Every other module asks this one: surgery (:func:`check_target`,
:func:`build_layer`), adapter files (:func:`layer_kind`,
:func:`layer_sizes`) and PEFT interop. Adding a layer kind is one class plus one entry here.
transformers' ``Conv1D`` (GPT-2) is a linear layer storing its weight ``(in, out)``: it gets a
``fan_in_fan_out`` :class:`~lora_layers.Linear`.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LoRALayer, check_wrappable
from .config import LoRAConfig
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear
from .merged import MergedLinear
from .quantized import QuantizedLoRALinear, find_quantized_lora_class, quantized_lora_class

__all__ = [
    "CONV_DIMS",
    "LAYER_KINDS",
    "SUPPORTED",
    "build_layer",
    "check_target",
    "is_hf_conv1d",
    "is_linear",
    "layer_kind",
    "layer_sizes",
    "out_features",
    "wrappable_kind",
]

#: Adapter-file layer name -> (LoRA class, torch class it replaces). ``MergedLinear`` is the
#: per-slice LoRA of a fused ``nn.Linear``.
LAYER_KINDS: dict[str, tuple[type[LoRALayer], type[nn.Module]]] = {
    "Linear": (Linear, nn.Linear),
    "MergedLinear": (MergedLinear, nn.Linear),
    "Embedding": (Embedding, nn.Embedding),
    "Conv1d": (Conv1d, nn.Conv1d),
    "Conv2d": (Conv2d, nn.Conv2d),
    "Conv3d": (Conv3d, nn.Conv3d),
}
#: Spatial dimensions of the convolution kinds.
CONV_DIMS = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}
SUPPORTED = "nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d and transformers' Conv1D"

# torch class -> the LoRA class that wraps it whole (MergedLinear only with slices).
_WRAPS = {
    torch_cls: lora for name, (lora, torch_cls) in LAYER_KINDS.items() if name != "MergedLinear"
}
_NAME_OF = {lora: name for name, (lora, _) in LAYER_KINDS.items()}


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (checked by name: no import)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def wrappable_kind(module: nn.Module) -> type | None:
    """The torch base type lora_layers can wrap ``module`` as, or None."""
    if is_hf_conv1d(module):
        return type(module)
    return next((base for base in _WRAPS if isinstance(module, base)), None)


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer LoRA can wrap: what ``"all-linear"`` selects."""
    linear = isinstance(module, nn.Linear) or is_hf_conv1d(module)
    return linear or find_quantized_lora_class(module) is not None


def out_features(module: nn.Module) -> int:
    """Output size of a linear layer (``nn.Linear`` or transformers ``Conv1D``)."""
    return module.weight.shape[1] if is_hf_conv1d(module) else module.out_features


def check_target(name: str, module: nn.Module) -> type:
    """Check that surgery can wrap ``module`` and return the torch type it is wrapped as.

    Args:
        name: Dotted module name, for messages.
        module: The layer.

    Returns:
        type: Its torch base type (``nn.Linear``, ...; transformers ``Conv1D`` itself).

    Raises:
        AlreadyWrappedError: If it already has LoRA.
        TypeError: If its type is not supported, it subclasses a supported type but changes
            its forward or adds parameters, buffers or children, or it is uninitialised.
    """
    base = wrappable_kind(module)
    check_wrappable(module, base or nn.Module, name)
    if quantized_lora_class(module, name) is not None:  # raises for unsupported quantized kinds
        return nn.Linear
    if base is None:
        children = [n for n, m in module.named_modules() if n and wrappable_kind(m)]
        hint = f"; target its layers instead, e.g. {name}.{children[0]}" if children else ""
        raise TypeError(
            f"cannot put LoRA on {name!r}: {type(module).__name__} is not supported "
            f"(supported: {SUPPORTED}){hint}"
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


def build_layer(module: nn.Module, config: LoRAConfig, name: str = "module") -> LoRALayer:
    """The LoRA layer ``config`` describes around ``module``, sharing its Parameters.

    Args:
        module: A layer :func:`check_target` accepts.
        config: Rank, alpha, dropout, slices, ...
        name: Dotted module name, for messages.

    Returns:
        LoRALayer: The new layer.

    Raises:
        ValueError: If ``config.fused`` is set on a non-linear layer.
        TypeError: As :func:`check_target`.
    """
    base = check_target(name, module)
    kwargs = config.layer_kwargs()
    linear = base is nn.Linear or is_hf_conv1d(module)
    if config.fused is not None and not linear:
        raise ValueError(f"fused slices only apply to linear layers; {name!r} is {base.__name__}")
    cls = _WRAPS.get(base, Linear)
    if config.fused is not None:
        cls = MergedLinear
        kwargs.update(enable_lora=config.fused.enable_lora, split_sizes=config.fused.split_sizes)
    if cls is not Embedding:
        kwargs["lora_dropout"] = config.lora_dropout
    quantized = quantized_lora_class(module, name)
    if quantized is not None:  # a registered quantized linear: see lora_layers.quantized
        if kwargs.pop("use_dora"):
            raise ValueError(
                f"use_dora=True is not supported on the quantized {name!r} "
                f"({type(module).__name__}); use DoRA on float layers only"
            )
        return quantized.from_module(module, **kwargs)
    if not is_hf_conv1d(module):
        return cls.from_module(module, **kwargs)
    in_features, out_size = module.weight.shape  # Conv1D stores its weight (in, out)
    lora_dtype = kwargs.pop("lora_dtype")
    with torch.device("meta"):
        layer = cls(
            in_features, out_size, fan_in_fan_out=True, bias=module.bias is not None, **kwargs
        )
    layer.adopt(module, lora_dtype)
    return layer


def layer_kind(layer: nn.Module) -> str | None:
    """The adapter-file name of a LoRA layer's kind (``"MergedLinear"``, ...), or None.

    A LoRA layer on a quantized base is saved as the dense layer it stands for.
    """
    if isinstance(layer, QuantizedLoRALinear):
        return layer.adapter_layer
    return next((_NAME_OF[c] for c in type(layer).__mro__ if c in _NAME_OF), None)


def layer_sizes(layer: LoRALayer) -> tuple[int, int]:
    """``(in, out)``: in/out features, (num_embeddings, embedding_dim) or in/out channels."""
    if isinstance(layer, Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if isinstance(layer, (Conv1d, Conv2d, Conv3d)):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features
