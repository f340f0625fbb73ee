"""Shared test helpers: the dtype tolerance table, seeding, and a tiny Phi-3 builder."""

from __future__ import annotations

import torch

# One dtype -> (rtol, atol) table for every comparison against a dense reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),  # tighter than one fp32 rounding: catches fp32 detours
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
DTYPES = tuple(TOLERANCES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: actual's)."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision references and merges are computed in: fp64 stays fp64, every
    other dtype goes to fp32 (``.float()`` would round an fp64 reference to fp32)."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def tiny_phi3_config(gqa: bool = True, **overrides):
    """A small ``Phi3Config``: hidden 64, 2 layers, 8 heads (2 kv heads with ``gqa``)."""
    from transformers import Phi3Config

    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2 if gqa else 8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return Phi3Config(**kwargs)


def tiny_phi3(seed: int = 0, gqa: bool = True, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded, randomly initialised ``Phi3ForCausalLM`` in eval mode."""
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(tiny_phi3_config(gqa=gqa, **overrides)).to(dtype)
    return model.eval()


def fill_lora_(layer, std: float = 0.5):
    """Give ``lora_A`` and ``lora_B`` random non-zero values (B = 0 would hide every bug).

    Values are drawn in fp32 from torch's global generator and cast to each parameter's
    dtype. A merged layer is re-merged so its merged weight matches the new values.
    """
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape) * std)
    if layer.merged:
        layer.merge()
    return layer


def saved_tensor_bytes(fn, exclude=()) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs, excluding ``exclude``'s storages.

    Every saved tensor is counted once per storage (a view of the input counts as the input),
    so the result is the real extra memory the graph keeps alive besides the parameters.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def fill_all_(model, std: float = 0.3):
    """:func:`fill_lora_` on every LoRA layer of ``model``; returns the model."""
    import lora_layers

    for _, layer in lora_layers.lora_modules(model):
        fill_lora_(layer, std=std)
    return model


def phi3_q_and_v(seed: int = 0, gqa: bool = True, **inject_kwargs):
    """A tiny Phi-3 (eval mode) with LoRA on q and v of ``qkv_proj``, both halves of
    ``gate_up_proj`` and a rank-2 ``o_proj``, every A and B random and non-zero."""
    import lora_layers

    model = tiny_phi3(seed, gqa=gqa)
    lora_layers.inject_lora(
        model,
        ["o_proj"],
        r=4,
        lora_alpha=8,
        fused={"qkv_proj": "qv", "gate_up_proj": "gate,up"},
        rank_pattern={"o_proj": 2},
        **inject_kwargs,
    )
    torch.manual_seed(seed + 100)
    return fill_all_(model).eval()
