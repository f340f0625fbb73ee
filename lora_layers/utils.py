"""Model-wide helpers: freezing, adapter state dicts, listing and disabling LoRA layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .base import LoRALayer
from .dora import MAGNITUDE_LEAF

__all__ = [
    "BIAS_MODES",
    "disable_adapters",
    "lora_modules",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
]

BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got bias={bias!r}")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Yield ``(qualified_name, layer)`` for every LoRA layer with ``r > 0`` in ``model``.

    Args:
        model: Any module.

    Yields:
        Pairs of dotted module name and LoRA layer, in ``named_modules`` order.
    """
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) and module.r > 0:
            yield name, module


def _lora_param_names(model: nn.Module, bias: str) -> list[str]:
    """Dotted names of the LoRA parameters (and biases, per ``bias``), chosen by layer type."""
    _check_bias(bias)
    names: list[str] = []
    for name, module in lora_modules(model):
        prefix = f"{name}." if name else ""
        names += [prefix + "lora_A", prefix + "lora_B"]
        if module.use_dora:  # DoRA's magnitude trains and is saved with the adapter
            names.append(prefix + MAGNITUDE_LEAF)
        if bias == "lora_only" and module.bias is not None:
            names.append(prefix + "bias")
    if bias == "all":
        for name, module in model.named_modules():
            if isinstance(module._parameters.get("bias"), nn.Parameter):
                names.append(f"{name}.bias" if name else "bias")
    return list(dict.fromkeys(names))


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but the LoRA parameters (and optionally biases).

    Parameters are chosen by layer type, never by substring: a module named ``flora_proj``
    stays frozen and ``unbiased.weight`` is untouched.

    Args:
        model: The model to modify in place.
        bias: ``"none"`` (no bias trains), ``"all"`` (every module's ``bias`` trains) or
            ``"lora_only"`` (only LoRA layers' biases train), as in loralib.

    Returns:
        The model.

    Raises:
        ValueError: If ``bias`` is not one of ``"none"``, ``"all"``, ``"lora_only"``.
    """
    trainable = set(_lora_param_names(model, bias))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return model


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The adapter part of ``model.state_dict()``, with loralib's key names.

    Keys are ``<module>.lora_A`` / ``<module>.lora_B`` (plus ``<module>.lora_magnitude`` for
    DoRA layers and ``<module>.bias`` per ``bias``), so state dicts from loralib layers load
    into ours and back.

    Args:
        model: A model holding LoRA layers.
        bias: ``"none"``, ``"all"`` or ``"lora_only"``, as in :func:`mark_only_lora_as_trainable`.

    Returns:
        A dict of detached tensors (the model's own storage, not copies).

    Raises:
        ValueError: If ``bias`` is not a known mode.
    """
    wanted = _lora_param_names(model, bias)
    full = model.state_dict()
    return {k: full[k] for k in wanted if k in full}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with every LoRA layer computing its base output only.

    Works on merged layers too (the base weight is never modified). Each layer's previous
    setting is restored on exit.

    Args:
        model: A model holding LoRA layers.

    Yields:
        The model.
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    previous = [m.disable_adapters for m in layers]
    for m in layers:
        m.disable_adapters = True
    try:
        yield model
    finally:
        for m, prev in zip(layers, previous, strict=True):
            m.disable_adapters = prev
