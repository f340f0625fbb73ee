"""Plain ``torch.utils.checkpoint`` (reentrant and not) over blocks made of lora_layers layers.

Every ``lora_B`` gets the same gradient as without checkpointing (dropout on, so the replayed
masks must match too), or the forward raises a clear error: never silent ``None`` gradients
(microsoft/LoRA#120). The ``transformers`` ``gradient_checkpointing_enable()`` path is tested
in ``test_checkpointing.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora_layers
from tests.helpers import assert_close, fill_lora_, lora_grads

VOCAB, DIM = 32, 16


class Block(nn.Module):
    """A residual block holding a fused MergedLinear, a Linear with dropout and a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = lora_layers.MergedLinear(
            DIM, 3 * DIM, r=2, lora_alpha=4, enable_lora=(True, False, True)
        )
        self.proj = lora_layers.Linear(3 * DIM, DIM, r=2, lora_alpha=4, lora_dropout=0.2)
        self.conv = lora_layers.Conv1d(DIM, DIM, 3, padding=1, r=2, lora_alpha=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, DIM)
        h = self.proj(torch.tanh(self.qkv(x)))  # (B, T, DIM)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return x + h


class Net(nn.Module):
    """Frozen embeddings, checkpointable blocks, a LoRA head outside every checkpoint.

    The head keeps the loss differentiable even when the checkpointed blocks are cut off,
    which is exactly the setup where reentrant checkpointing loses gradients silently.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = lora_layers.Linear(DIM, VOCAB, r=2, lora_alpha=4)

    def forward(self, ids: torch.Tensor, use_reentrant: bool | None = None) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, DIM)
        for block in self.blocks:
            if use_reentrant is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=use_reentrant)
        return self.head(h)  # (B, T, VOCAB)


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    for _, layer in lora_layers.lora_modules(net):
        fill_lora_(layer, std=0.3)
    lora_layers.mark_only_lora_as_trainable(net)  # embeddings frozen: block inputs need no grad
    return net.train()


IDS = torch.randint(0, VOCAB, (2, 6))


def ce_loss(use_reentrant: bool | None) -> Callable[[nn.Module], torch.Tensor]:
    """The net's cross-entropy on ``IDS``, blocks checkpointed as asked (None: not at all)."""

    def loss(net: nn.Module) -> torch.Tensor:
        logits = net(IDS, use_reentrant=use_reentrant)
        return F.cross_entropy(logits.flatten(0, 1), IDS.flatten())

    return loss


def test_non_reentrant_checkpoint_matches_no_checkpoint_with_frozen_inputs():
    net = make_net()
    expected = lora_grads(net, ce_loss(None))
    got = lora_grads(net, ce_loss(False))
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert grad is not None, name
        assert_close(grad, expected[name])
        if name.endswith("lora_B"):
            assert grad.abs().sum() > 0, name


def test_reentrant_checkpoint_matches_no_checkpoint_when_input_requires_grad():
    net = make_net()
    expected = lora_grads(net, ce_loss(None))
    lora_layers.enable_input_require_grads(net, module=net.emb)  # the documented fix
    got = lora_grads(net, ce_loss(True))
    for name, grad in got.items():
        assert grad is not None, name
        assert_close(grad, expected[name])
        if name.endswith("lora_B"):
            assert grad.abs().sum() > 0, name


def test_reentrant_checkpoint_with_frozen_inputs_raises_instead_of_dropping_grads():
    net = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "None of the inputs have requires_grad"
        with pytest.raises(RuntimeError, match=r"use_reentrant=False.*enable_input_require_grads"):
            net(IDS, use_reentrant=True)


def test_reentrant_checkpoint_without_trainable_lora_runs():
    """No error where no LoRA gradient is wanted: eval mode, adapters off, frozen adapters."""
    net = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = net.eval()(IDS)
        assert_close(net(IDS, use_reentrant=True), expected)
        net.train()
        with lora_layers.disable_adapters(net), torch.no_grad():
            net(IDS, use_reentrant=True)
        for p in net.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            net(IDS, use_reentrant=True)  # training mode: dropout differs, only check it runs
