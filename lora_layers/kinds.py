"""The one table of layer kinds: which layer class gets which LoRA class, and back.

:data:`LORA_CLASSES` maps a layer class to the LoRA class that wraps it; a subclass uses its
nearest listed ancestor's entry. Every other module asks this table: surgery
(:func:`check_target`, :func:`build_layer`), adapter files (:func:`layer_kind`,
:func:`layer_sizes`), PEFT interop and the memory estimate. Adding a layer kind is one class
plus one entry: a line here, or, for a quantized linear, one
:func:`~lora_layers.register_quantized_linear` call (:mod:`lora_layers.quantized` registers
bitsandbytes' two). A class from a package lora_layers does not import is entered under its
dotted import path (``"bitsandbytes.nn.Linear4bit"``) and resolved the first time a layer from
that package is looked up, so ``import lora_layers`` never imports the package.
transformers' ``Conv1D`` (GPT-2) is a linear layer storing its weight ``(in, out)``: it gets a
``fan_in_fan_out`` :class:`~lora_layers.Linear`.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .base import LoRALayer, check_wrappable
from .config import LoRAConfig
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear
from .merged import MergedLinear

__all__ = [
    "CONV_DIMS",
    "LAYER_KINDS",
    "LORA_CLASSES",
    "QUANTIZATION_PACKAGES",
    "SUPPORTED",
    "build_layer",
    "check_target",
    "class_name",
    "is_hf_conv1d",
    "is_linear",
    "layer_kind",
    "layer_sizes",
    "lora_class_of",
    "out_features",
    "quantized_lora_class_of",
    "resolve_class",
    "supported_quantized_kinds",
    "wrappable_kind",
]

#: Layer class (or the dotted import path of one not imported yet) -> its LoRA class.
LORA_CLASSES: dict[type | str, type[nn.Module]] = {
    nn.Linear: Linear,
    nn.Embedding: Embedding,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
}
# The dense torch classes and their LoRA classes: every later entry is a quantized linear.
_DENSE = dict(LORA_CLASSES)
#: Adapter-file layer name -> (LoRA class, torch class it replaces): the dense kinds, and
#: ``MergedLinear``, the per-slice LoRA of a fused ``nn.Linear``. Quantized layers are saved
#: as the dense layer they stand for.
LAYER_KINDS: dict[str, tuple[type[LoRALayer], type[nn.Module]]] = {
    lora.__name__: (lora, base) for base, lora in _DENSE.items()
} | {"MergedLinear": (MergedLinear, nn.Linear)}
#: Spatial dimensions of the convolution kinds.
CONV_DIMS = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}
SUPPORTED = ", ".join(f"nn.{base.__name__}" for base in _DENSE) + " and transformers' Conv1D"
_NAME_OF = {lora: name for name, (lora, _) in LAYER_KINDS.items()}

#: Top-level packages whose layers are quantized: a targeted layer from one of them that has
#: no quantized entry in :data:`LORA_CLASSES` is refused with a TypeError (never wrapped as a
#: plain linear).
QUANTIZATION_PACKAGES = frozenset(
    {
        "bitsandbytes",
        "torchao",
        "hqq",
        "auto_gptq",
        "gptqmodel",
        "awq",
        "optimum",
        "quanto",
        "eetq",
        "aqlm",
        "compressed_tensors",
        "fbgemm_gpu",
        "vptq",
    }
)


def class_name(cls: type) -> str:
    """``module.qualname`` of a class, as messages and :func:`supported_quantized_kinds` name it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_class(path: str) -> type:
    """The class at dotted import path ``path`` (``"bitsandbytes.nn.Linear4bit"``)."""
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _resolve_pending(cls: type) -> None:
    """Replace the dotted-path entries of the packages ``cls`` and its bases come from."""
    pending = [key for key in LORA_CLASSES if isinstance(key, str)]
    if not pending:
        return
    packages = {klass.__module__.partition(".")[0] for klass in cls.__mro__}
    for key in pending:
        if key.partition(".")[0] in packages:
            lora = LORA_CLASSES.pop(key)
            LORA_CLASSES.setdefault(resolve_class(key), lora)


def lora_class_of(module: nn.Module) -> type[nn.Module] | None:
    """The LoRA class :data:`LORA_CLASSES` gives ``module``'s class, or None.

    Raises:
        ImportError, AttributeError: Only if a dotted path registered for ``module``'s package
            names no class.
    """
    cls = type(module)
    _resolve_pending(cls)
    return next((LORA_CLASSES[k] for k in cls.__mro__ if k in LORA_CLASSES), None)


def quantized_lora_class_of(module: nn.Module) -> type[nn.Module] | None:
    """The LoRA class of ``module`` if it is a registered quantized kind, else None (as
    :func:`lora_class_of`)."""
    found = lora_class_of(module)
    return None if found is None or found in _NAME_OF else found


def supported_quantized_kinds() -> list[str]:
    """Names of the quantized layer classes that can get LoRA (registered or pending)."""
    return sorted(
        key if isinstance(key, str) else class_name(key)
        for key, lora in LORA_CLASSES.items()
        if lora not in _NAME_OF
    )


def _looks_quantized(module: nn.Module) -> bool:
    if type(module).__module__.partition(".")[0] in QUANTIZATION_PACKAGES:
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.is_floating_point()


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (checked by name: no import)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def wrappable_kind(module: nn.Module) -> type | None:
    """The torch base type lora_layers can wrap ``module`` as, or None."""
    if is_hf_conv1d(module):
        return type(module)
    return next((base for base in _DENSE if isinstance(module, base)), None)


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer LoRA can wrap: what ``"all-linear"`` selects."""
    linear = isinstance(module, nn.Linear) or is_hf_conv1d(module)
    return linear or quantized_lora_class_of(module) is not None


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
        TypeError: If its type is not supported (a quantized kind without an entry included:
            the message lists the supported ones), it subclasses a supported type but changes
            its forward or adds parameters, buffers or children, or it is uninitialised.
    """
    base = wrappable_kind(module)
    check_wrappable(module, base or nn.Module, name)
    if quantized_lora_class_of(module) is not None:
        return nn.Linear
    if _looks_quantized(module):
        raise TypeError(
            f"cannot put LoRA on {name!r}: {class_name(type(module))} is a quantized layer kind "
            "lora_layers does not support (supported: "
            f"{', '.join(supported_quantized_kinds())}); add one with "
            "lora_layers.register_quantized_linear (see docs/qlora.md)"
        )
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
    cls = lora_class_of(module) or Linear  # transformers' Conv1D: a fan_in_fan_out Linear
    if config.fused is not None:
        cls = MergedLinear if cls is Linear else cls  # a quantized class takes the slices too
        kwargs.update(enable_lora=config.fused.enable_lora, split_sizes=config.fused.split_sizes)
    if cls is not Embedding:
        kwargs["lora_dropout"] = config.lora_dropout
    if cls not in _NAME_OF and kwargs.pop("use_dora"):  # a registered quantized class
        raise ValueError(
            f"use_dora=True is not supported on the quantized {name!r} "
            f"({type(module).__name__}); use DoRA on float layers only"
        )
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

    A LoRA layer on a quantized base is saved as the dense layer it stands for (its
    ``adapter_layer``).
    """
    name = next((_NAME_OF[c] for c in type(layer).__mro__ if c in _NAME_OF), None)
    return name or getattr(layer, "adapter_layer", None)


def layer_sizes(layer: LoRALayer) -> tuple[int, int]:
    """``(in, out)``: in/out features, (num_embeddings, embedding_dim) or in/out channels."""
    if isinstance(layer, Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if isinstance(layer, (Conv1d, Conv2d, Conv3d)):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features
