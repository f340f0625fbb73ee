"""The tiny Phi-3 with LoRA that the compile and distributed tests share.

LoRA on q and v of every fused ``qkv_proj``, both halves of every ``gate_up_proj``, and on
``o_proj`` / ``down_proj``; layer 0's ``o_proj`` has rank 1, so under FSDP2 on two ranks its
``lora_A`` (shape ``(1, hidden)``) has an empty local shard on rank 1: the case where naive
adapter saving writes shape-``[0]`` tensors. Every ``lora_A`` / ``lora_B`` is random and
non-zero (B = 0 would hide every bug).
"""

from __future__ import annotations

import torch
from torch import nn

import lora_layers
from tests.helpers import fill_lora_, tiny_phi3

VOCAB = 128  # tiny_phi3_config's vocab_size


def lora_phi3(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lora_dtype: torch.dtype | None = None,
    **inject_kwargs,
) -> nn.Module:
    """A seeded tiny ``Phi3ForCausalLM`` with LoRA injected, in training mode."""
    model = tiny_phi3(seed=seed, dtype=dtype)
    lora_layers.inject_lora(
        model,
        ["o_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        fused={"qkv_proj": "qv", "gate_up_proj": "all"},
        rank_pattern={"layers.0.self_attn.o_proj": 1},
        lora_dtype=lora_dtype,
        **inject_kwargs,
    )
    torch.manual_seed(seed + 1)
    for _, layer in lora_layers.lora_modules(model):
        fill_lora_(layer, std=0.1)
    return model.train()


def global_batch(seed: int = 0, batch: int = 4, seq: int = 8) -> torch.Tensor:
    """Token ids ``(batch, seq)`` without special tokens (no padding: every token counts)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)
