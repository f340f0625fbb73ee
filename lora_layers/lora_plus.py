"""LoRA+ (Hayou et al. 2024): optimizer parameter groups in which ``B`` learns faster than ``A``.

LoRA+ trains ``lora_B`` with a learning rate ``lr_ratio`` times that of ``lora_A``. The
paper shows that, as the model width grows, one shared learning rate cannot let both ``A``
and ``B`` learn efficiently (``B`` needs a rate that grows with the width relative to
``A``'s); in practice it finds a fixed ratio around 2^4 a good default. Nothing in the
layers changes; only the optimizer sees different learning rates::

    groups = lora_plus_param_groups(model, lr=1e-4, lr_ratio=16.0)
    optimizer = torch.optim.AdamW(groups)

The grouping is PEFT 0.21.2's ``create_loraplus_optimizer``'s, so a recipe tuned with PEFT
keeps its meaning here.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import nn

from .conv import Conv1d, Conv2d, Conv3d
from .dora import MAGNITUDE_LEAF
from .embedding import Embedding

__all__ = ["lora_plus_param_groups"]


def _check_rate(name: str, value: object, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite real number > 0 (>= 0 with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a finite number {bound}, got {value!r} ({type(value).__name__})"
        )
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        raise ValueError(f"{name} must be a finite number {bound}, got {name}={value!r}")


def _in_layer_norm(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether the parameter ``name`` sits inside an ``nn.LayerNorm`` below the root module.

    This is ``transformers``' ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` test, which
    PEFT uses: ``ALL_LAYERNORM_LAYERS`` is ``[nn.LayerNorm]`` (subclasses included), so
    RMSNorm scales are *not* exempt from weight decay, and the root module's own parameters
    never are.
    """
    parts = name.split(".")[:-1]
    return any(
        isinstance(modules.get(".".join(parts[: i + 1])), nn.LayerNorm) for i in range(len(parts))
    )


def lora_plus_param_groups(
    model: nn.Module,
    lr: float,
    lr_ratio: float = 16.0,
    *,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: ``lora_B`` at ``lr * lr_ratio``, ``lora_A`` at ``lr``.

    Every trainable parameter of ``model`` lands in exactly one group; frozen ones in none.
    The groups are those of PEFT 0.21.2's ``create_loraplus_optimizer``, in its order:

    - ``"lora_A"`` at ``lr`` with ``weight_decay``: ``lora_A``, and every other trainable
      parameter of two or more dimensions (a trainable head, a full layer);
    - ``"embedding"`` at ``lr_embedding`` with ``weight_decay``: the trainable parameters of
      a LoRA :class:`~lora_layers.Embedding` (``r > 0``): its ``lora_A`` and ``lora_B``, and
      its table if that is trainable (not its DoRA magnitude: see below);
    - ``"lora_B"`` at ``lr * lr_ratio`` with ``weight_decay``: ``lora_B``, and every 1-D
      parameter (biases, norm scales), except those of the next group;
    - ``"lora_B_no_decay"`` at ``lr * lr_ratio`` with weight decay 0: those of the
      ``"lora_B"`` kind that are named ``bias`` or sit inside an ``nn.LayerNorm``.

    DoRA magnitudes (``lora_magnitude``) go where PEFT's ``lora_magnitude_vector`` goes:
    PEFT stores a convolution's as ``(1, out_channels, 1, ...)``, so it counts as a matrix
    (``"lora_A"``), and every other one (linear, fused, embedding) is 1-D (``"lora_B"``;
    PEFT's embedding test does not reach it, as it sits one dict deeper).

    As in PEFT, every 1-D trainable parameter (a bias, an RMSNorm or LayerNorm scale) learns
    at the ``B`` rate, and ``lr_embedding`` is an absolute learning rate (PEFT's default
    ``1e-6``), not a multiple of ``lr``. Empty groups are left out. Each group carries its own
    ``lr`` and ``weight_decay``, so the optimizer's defaults (AdamW's ``weight_decay=0.01``)
    do not apply: ``torch.optim.AdamW(groups)`` trains exactly as PEFT's optimizer would.

    PEFT recognises its parameters by substrings of their dotted names (``"lora_B"``,
    ``"bias"``); here the parameter's own name decides (``lora_B``, ``bias``), which is the
    same on every model except one whose *module* names contain those words. PEFT's
    embedding test looks for its ``lora.Embedding`` two name levels up (its parameters sit in
    per-adapter dicts); ours owns ``lora_A``/``lora_B`` directly, so the test is on the
    owning module. PEFT also registers 32-bit optimizer state for embeddings when the
    optimizer is a bitsandbytes 8-bit one; this function builds groups only, so do that
    yourself if you use one.

    Args:
        model (nn.Module): The model, with LoRA injected and the base frozen
            (:func:`~lora_layers.inject_lora` does both).
        lr (float): Learning rate of ``A`` (PEFT's ``lr``); finite and > 0.
        lr_ratio (float): ``eta_B / eta_A`` (PEFT's ``loraplus_lr_ratio``); finite and > 0.
            16 (2^4) is the paper's suggested default; PEFT's notes suggest an ``lr`` about
            half the usual LoRA rate with it.
        lr_embedding (float): Learning rate of the embeddings' LoRA (PEFT's
            ``loraplus_lr_embedding``); finite and > 0.
        weight_decay (float): Weight decay of every group but ``"lora_B_no_decay"`` (PEFT's
            ``loraplus_weight_decay``); finite and >= 0.

    Returns:
        list[dict[str, Any]]: Parameter groups, each ``{"name", "params", "lr",
        "weight_decay"}``, ready for ``torch.optim.AdamW(groups)`` or any optimizer that
        takes ``lr`` and ``weight_decay`` per group.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or a rate is not a real number.
        ValueError: If a rate is not finite or out of range, or ``model`` has no trainable
            parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_rate("lr", lr)
    _check_rate("lr_ratio", lr_ratio)
    _check_rate("lr_embedding", lr_embedding)
    _check_rate("weight_decay", weight_decay, allow_zero=True)
    if not math.isfinite(lr * lr_ratio):
        raise ValueError(f"lr * lr_ratio must be finite, got lr={lr!r}, lr_ratio={lr_ratio!r}")

    modules = dict(model.named_modules(remove_duplicate=False))
    groups: dict[str, list[nn.Parameter]] = {
        "lora_A": [],
        "embedding": [],
        "lora_B": [],
        "lora_B_no_decay": [],
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = modules[owner_name]
        if attr == MAGNITUDE_LEAF:  # DoRA: where PEFT's lora_magnitude_vector lands
            conv = isinstance(owner, (Conv1d, Conv2d, Conv3d))
            groups["lora_A" if conv else "lora_B"].append(param)
        elif isinstance(owner, Embedding) and owner.r > 0:
            groups["embedding"].append(param)
        elif attr == "lora_B" or param.ndim == 1:
            no_decay = attr == "bias" or _in_layer_norm(name, modules)
            groups["lora_B_no_decay" if no_decay else "lora_B"].append(param)
        else:
            groups["lora_A"].append(param)

    if not any(groups.values()):
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter: inject LoRA first "
            "(lora_layers.inject_lora freezes the base and leaves lora_A/lora_B trainable)"
        )
    rates = {
        "lora_A": (lr, weight_decay),
        "embedding": (lr_embedding, weight_decay),
        "lora_B": (lr * lr_ratio, weight_decay),
        "lora_B_no_decay": (lr * lr_ratio, 0.0),
    }
    return [
        {"name": key, "params": params, "lr": rates[key][0], "weight_decay": rates[key][1]}
        for key, params in groups.items()
        if params
    ]
