"""Wrapping and unwrapping: one layer in, every layer out.

:func:`wrap_module` builds the LoRA layer for one torch layer (sharing its Parameters) and
:func:`replace_module` puts a module at a dotted name. :func:`unload` puts back plain torch
layers holding the original Parameters (the very same objects), :func:`merge_and_unload`
plain layers holding merged weights; :func:`merge_lora` / :func:`unmerge_lora` merge or
unmerge every LoRA layer of a model.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable

from torch import nn

from .base import LoRALayer
from .config import LoRAConfig
from .input_grads import remove_input_require_grads
from .kinds import build_layer
from .matching import walk_modules
from .modules_to_save import forget_originals, restore_originals
from .quantized import QuantizedLoRALinear
from .utils import lora_modules

__all__ = [
    "merge_and_unload",
    "merge_lora",
    "replace_module",
    "set_child",
    "unload",
    "unmerge_lora",
    "wrap_module",
]

_SHELL = "_lora_base_shell"  # attribute of a LoRA layer: the replaced module, minus its params


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


def wrap_module(module: nn.Module, spec: LoRAConfig, name: str = "module") -> LoRALayer:
    """Build the LoRA layer for one torch layer, sharing its ``weight``/``bias`` Parameters.

    ``nn.Linear`` becomes :class:`~lora_layers.Linear` (or :class:`~lora_layers.MergedLinear`
    when ``spec.fused`` is set), transformers' ``Conv1D`` a ``fan_in_fan_out`` Linear,
    ``nn.Embedding`` :class:`~lora_layers.Embedding`, ``nn.ConvNd`` the matching ``ConvNd``.
    Works on meta-device modules (the LoRA parameters are created on the weight's device).

    Args:
        module: The layer to wrap.
        spec: Rank, alpha, dropout, slices, ... (see :class:`LoRAConfig`).
        name: The module's name, for error messages.

    Returns:
        LoRALayer: The new layer (not yet placed in any model; see :func:`replace_module`).

    Raises:
        ValueError: If ``module`` already has LoRA, or ``spec.fused`` is set on a non-linear
            layer.
        TypeError: If the module type is not supported (the message names the type).
    """
    layer = build_layer(module, spec, name)
    _remember_base(layer, module)
    return layer


def set_child(
    model: nn.Module, name: str, new: nn.Module, modules: dict[str, nn.Module] | None = None
) -> None:
    """Put ``new`` at dotted ``name`` (``modules``: a name -> module index to find the parent)."""
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
    set_child(model, name, new)
    return old


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


def _plain_layer(layer: LoRALayer, weight: nn.Parameter) -> nn.Module:
    if isinstance(layer, QuantizedLoRALinear):  # its quantized base, or a dense nn.Linear
        return layer.plain_layer(weight)
    shell = layer.__dict__.get(_SHELL)
    plain = copy.copy(shell) if shell is not None else layer.plain_module()
    plain.__dict__["_parameters"] = dict(plain._parameters)
    plain.weight = weight
    if "bias" in plain._parameters:
        plain.bias = layer.bias
    nn.Module.train(plain, layer.training)
    return plain


def _replace_lora_layers(model: nn.Module, make_weight: Callable) -> nn.Module:
    if isinstance(model, LoRALayer):
        raise ValueError("the model itself is a LoRA layer; unload its parent model instead")
    modules, names_of = walk_modules(model)
    for name, module in modules.items():
        if isinstance(module, LoRALayer):
            plain = _plain_layer(module, make_weight(name, module))
            for alias in names_of[id(module)]:
                set_child(model, alias, plain, modules)
            modules[name] = plain  # drop our reference: a replaced weight is freed right away
    remove_input_require_grads(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer with a plain torch layer holding the original weights.

    The plain layers get the very same ``weight``/``bias`` Parameter objects (bit-identical,
    never modified), and layers injected by :func:`inject_lora` come back as their original
    class. LoRA parameters are dropped. The modules in ``modules_to_save`` get their original
    module objects back (the trained copies are dropped; PEFT's ``unload`` keeps the trained
    copies instead). ``requires_grad`` is left as it is (the base stays
    frozen); call ``model.requires_grad_(True)`` to train the whole model again.

    Returns:
        nn.Module: ``model``, whose ``state_dict()`` has the original keys and values.
    """
    restore_originals(model)
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
    ``dequantize(W) + delta`` rounded once (see ``docs/qlora.md``). The modules in
    ``modules_to_save`` keep their trained weights (as in PEFT) and become plain modules.

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

    _replace_lora_layers(model, merged_weight)
    return forget_originals(model)
