"""Gradient checkpointing on an injected model: every LoRA layer gets exact, non-zero gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_layers import enable_input_require_grads, inject_lora, lora_modules, unload
from tests.helpers import lora_grads, lora_tiny_phi3, phi3_ids, tiny_phi3


def lora_model(seed: int = 0, **kwargs) -> nn.Module:
    """A tiny Phi-3 with LoRA on every linear layer but the head, A and B random, in train mode."""
    targets = kwargs.pop("target_modules", "all-linear")
    return lora_tiny_phi3(
        targets, seed=seed, std=0.1, train=True, fused={"qkv_proj": "qv"}, **kwargs
    )


def enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames the method
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
        )


def lm_loss(model: nn.Module) -> torch.Tensor:
    x = phi3_ids(seed=1)
    return model(input_ids=x, labels=x).loss


@pytest.mark.parametrize("lora_dropout", [0.0, 0.05], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_step_gives_exact_nonzero_grads(use_reentrant, lora_dropout):
    reference = lora_grads(lora_model(lora_dropout=lora_dropout), lm_loss)
    model = lora_model(lora_dropout=lora_dropout)
    enable_checkpointing(model, use_reentrant)
    embed = model.get_input_embeddings()
    assert not embed.weight.requires_grad  # frozen embeddings
    grads = lora_grads(model, lm_loss)
    assert embed.weight.grad is None
    assert len(grads) == 2 * 4 * 2  # A and B of 4 layers in each of 2 blocks
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6)


def test_reentrant_without_input_grads_raises_and_our_hook_fixes_it():
    # transformers installs its own embedding hook in gradient_checkpointing_enable. Without
    # it and without ours, reentrant checkpointing would give the blocks' LoRA no gradients;
    # the layers raise instead of training silently with none.
    bare = lora_model(input_require_grads=False, target_modules=["all-linear", "lm_head"])
    enable_checkpointing(bare, use_reentrant=True)
    bare.disable_input_require_grads()
    with (
        warnings.catch_warnings(),
        pytest.raises(RuntimeError, match=r"use_reentrant=True\) whose inputs do not require"),
    ):
        warnings.simplefilter("ignore", UserWarning)  # torch: "None of the inputs have ..."
        lora_grads(bare, lm_loss)

    model = lora_model(target_modules=["all-linear", "lm_head"])  # our hook is on by default
    enable_checkpointing(model, use_reentrant=True)
    model.disable_input_require_grads()
    grads = lora_grads(model, lm_loss)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


class Net(nn.Module):
    """A plain (non-transformers) model that checkpoints its blocks with use_reentrant=True."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(2)
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + checkpoint(block, h, use_reentrant=True)
        return h


def test_plain_model_with_reentrant_checkpoint_trains_lora():
    torch.manual_seed(0)
    net = inject_lora(Net(), "all-linear", r=2)
    for _, layer in lora_modules(net):
        nn.init.normal_(layer.lora_B)
    net(torch.arange(6)).square().sum().backward()
    for name, layer in lora_modules(net):
        assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0, name
    assert net.embed.weight.grad is None
    unload(net)
    assert not net.embed._forward_hooks  # unload removes the hook


def test_enable_input_require_grads_is_idempotent_and_follows_replaced_embeddings():
    model = tiny_phi3()
    first = enable_input_require_grads(model)
    assert enable_input_require_grads(model) is first
    assert len(model.model.embed_tokens._forward_hooks) == 1
    inject_lora(model, "embed_tokens", r=2)  # replaces the hooked layer: the hook moves along
    assert len(model.model.embed_tokens._forward_hooks) == 1
    assert enable_input_require_grads(nn.Linear(2, 2)) is None  # no input embeddings
    with torch.no_grad():
        assert not model.model.embed_tokens(phi3_ids()).requires_grad  # inactive without grad
