"""Tiny models with two layers of one kind, for tests parametrized over every LoRA layer kind.

Not a test module (the leading underscore keeps pytest away); imported by test_bad_inputs.py
and test_aliases.py.
"""

from __future__ import annotations

import torch
from torch import nn

import lora_layers
from tests.helpers import fill_all_

KINDS = ("linear", "merged", "embedding", "conv1d", "conv2d", "conv3d")
CONV_KINDS = ("conv1d", "conv2d", "conv3d")
FUSED = lora_layers.FusedSpec((4, 4, 4), (True, False, True))  # q and v of a 12-wide qkv


def base_layer(kind: str, **kwargs) -> nn.Module:
    """One small torch layer of ``kind`` (``kwargs`` go to the conv constructors)."""
    if kind == "linear":
        return nn.Linear(8, 6)
    if kind == "merged":
        return nn.Linear(8, 12)
    if kind == "embedding":
        return nn.Embedding(10, 6)
    if kind == "conv1d":
        return nn.Conv1d(4, 6, 3, padding=1, **kwargs)
    if kind == "conv2d":
        return nn.Conv2d(4, 6, 3, padding=1, **kwargs)
    assert kind == "conv3d", kind
    return nn.Conv3d(2, 4, 2, padding=1, **kwargs)


def example_input(kind: str) -> torch.Tensor:
    """A fixed input batch for a layer of ``kind``."""
    g = torch.Generator().manual_seed(0)
    if kind == "embedding":
        return torch.randint(0, 10, (2, 5), generator=g)
    shape = {
        "linear": (2, 8),
        "merged": (2, 8),
        "conv1d": (2, 4, 7),
        "conv2d": (2, 4, 5, 5),
        "conv3d": (2, 2, 3, 3, 3),
    }[kind]
    return torch.randn(shape, generator=g)


class Pair(nn.Module):
    """Two layers of one kind, ``first`` and ``second``, applied to the same input."""

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__()
        self.first = base_layer(kind, **kwargs)
        self.second = base_layer(kind, **kwargs)
        self.register_buffer("offset", torch.arange(3.0))  # a buffer that must stay unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(x).flatten(1), self.second(x).flatten(1)], dim=1)


def pair(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> Pair:
    """A seeded :class:`Pair` of plain layers."""
    torch.manual_seed(seed)
    return Pair(kind, **kwargs).to(dtype)


def inject(model: nn.Module, kind: str, names=("first", "second"), **kwargs) -> nn.Module:
    """LoRA (r=2, alpha=4) on ``names``; q and v slices for ``kind="merged"``."""
    kwargs.setdefault("r", 2)
    kwargs.setdefault("lora_alpha", 4)
    if kind == "merged":
        return lora_layers.inject_lora(model, fused=dict.fromkeys(names, FUSED), **kwargs)
    return lora_layers.inject_lora(model, list(names), **kwargs)


def lora_pair(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> Pair:
    """:func:`pair` with LoRA on both layers, every A and B random and non-zero."""
    model = inject(pair(kind, seed, dtype), kind, **kwargs)
    torch.manual_seed(seed + 100)
    return fill_all_(model)
