"""loralib as the oracle: the same weights give the same outputs (fp32, 1e-6), both ways.

loralib is a test dependency; these tests must run, never skip.
"""

from __future__ import annotations

import loralib
import pytest
import torch
from torch import nn

import lora_layers
from tests.helpers import fill_lora_

TOL = {"rtol": 1e-6, "atol": 1e-6}


def outputs(layer, x):
    """(train-mode output, eval-mode output) of a layer, both without grad."""
    with torch.no_grad():
        layer.train()
        train_out = layer(x)
        layer.eval()
        eval_out = layer(x)
        layer.train()
    return train_out, eval_out


def assert_same_outputs(ours, theirs, x):
    for a, b in zip(outputs(ours, x), outputs(theirs, x), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def round_trip(theirs, ours, x, rename=None):
    """loralib -> ours and ours -> a fresh loralib layer, comparing outputs each time."""
    fill_lora_(theirs)
    sd = theirs.state_dict()
    if rename:
        sd = {rename.get(k, k): v for k, v in sd.items()}
    ours.load_state_dict(sd)  # strict: identical keys and shapes
    assert_same_outputs(ours, theirs, x)
    return ours


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear(fan_in_fan_out, bias):
    kw = dict(r=4, lora_alpha=8, fan_in_fan_out=fan_in_fan_out, bias=bias)
    theirs = loralib.Linear(16, 12, **kw)
    ours = round_trip(theirs, lora_layers.Linear(16, 12, **kw), torch.randn(3, 5, 16))
    back = loralib.Linear(16, 12, **kw)
    back.load_state_dict(ours.state_dict())
    assert_same_outputs(ours, back, torch.randn(4, 16))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding(padding_idx):
    kw = dict(r=4, lora_alpha=8, padding_idx=padding_idx)
    theirs = loralib.Embedding(20, 8, **kw)
    x = torch.randint(0, 20, (3, 6))
    ours = round_trip(theirs, lora_layers.Embedding(20, 8, **kw), x)
    back = loralib.Embedding(20, 8, **kw)
    back.load_state_dict(ours.state_dict())
    assert_same_outputs(ours, back, x)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_scale_grad_by_freq_gradients(padding_idx):
    """loralib passes scale_grad_by_freq to its LoRA lookup: lora_A's gradient is divided by
    each token's count (issue 12, item 4)."""
    kw = dict(r=4, lora_alpha=8, padding_idx=padding_idx, scale_grad_by_freq=True)
    theirs = fill_lora_(loralib.Embedding(20, 8, **kw))
    ours = lora_layers.Embedding(20, 8, **kw)
    ours.load_state_dict(theirs.state_dict())
    x = torch.tensor([[1, 1, 1, 2], [0, 3, 3, 1]])
    g = torch.randn(2, 4, 8)
    ours(x).backward(g)
    theirs(x).backward(g)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A.grad, **TOL)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B.grad, **TOL)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("enable", [[True, False, True], [False, True, False], [True, True, True]])
def test_merged_linear_equal_splits(enable, fan_in_fan_out):
    kw = dict(r=2, lora_alpha=4, enable_lora=enable, fan_in_fan_out=fan_in_fan_out)
    theirs = loralib.MergedLinear(16, 24, **kw)
    x = torch.randn(2, 3, 16)
    ours = round_trip(theirs, lora_layers.MergedLinear(16, 24, **kw), x)
    back = loralib.MergedLinear(16, 24, **kw)
    back.load_state_dict(ours.state_dict())
    assert_same_outputs(ours, back, x)


def test_conv2d_kernel_1():
    theirs = loralib.Conv2d(4, 6, 1, r=2, lora_alpha=4)
    x = torch.randn(2, 4, 5, 5)
    rename = {"conv.weight": "weight", "conv.bias": "bias"}
    ours = round_trip(theirs, lora_layers.Conv2d(4, 6, 1, r=2, lora_alpha=4), x, rename)
    back = loralib.Conv2d(4, 6, 1, r=2, lora_alpha=4)
    back.load_state_dict(
        {{v: k for k, v in rename.items()}.get(k, k): v for k, v in ours.state_dict().items()}
    )
    assert_same_outputs(ours, back, x)


def test_conv2d_kernel_3_mapped_to_true_rank_layout():
    """loralib's r=2 with kernel 3 is a rank-6 update; ours holds it exactly with r=6."""
    theirs = fill_lora_(loralib.Conv2d(4, 6, 3, r=2, lora_alpha=4, padding=1))
    assert theirs.lora_A.shape == (6, 12) and theirs.lora_B.shape == (18, 6)
    delta = (theirs.lora_B @ theirs.lora_A).view(6, 36) * theirs.scaling  # (out, in * k * k)
    ours = lora_layers.Conv2d(4, 6, 3, r=6, lora_alpha=6, padding=1)  # scaling 1
    with torch.no_grad():
        ours.weight.copy_(theirs.conv.weight)
        ours.bias.copy_(theirs.conv.bias)
        ours.lora_B.copy_(torch.eye(6))
        ours.lora_A.copy_(delta)
    assert torch.linalg.matrix_rank(delta) == 6
    assert_same_outputs(ours, theirs, torch.randn(2, 4, 7, 7))


def test_lora_state_dicts_load_both_ways():
    def build(lib):
        return nn.Sequential(
            lib.Embedding(20, 8, r=2, lora_alpha=4),
            lib.Linear(8, 12, r=2, lora_alpha=4),
            lib.MergedLinear(12, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        )

    theirs, ours, back = build(loralib), build(lora_layers), build(loralib)
    base = {k: v for k, v in theirs.state_dict().items() if "lora" not in k}
    for model in (ours, back):  # the same frozen base weights everywhere
        model.load_state_dict(base, strict=False)
    for m in theirs:
        fill_lora_(m)
    x = torch.randint(0, 20, (2, 5))

    sd = loralib.lora_state_dict(theirs)
    assert set(lora_layers.lora_state_dict(ours)) == set(sd)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == set(base)
    assert_same_outputs(ours, theirs, x)

    missing, unexpected = back.load_state_dict(lora_layers.lora_state_dict(ours), strict=False)
    assert not unexpected and set(missing) == set(base)
    assert_same_outputs(ours, back, x)


def test_loralib_drifts_in_bf16_where_we_do_not():
    """Why the drift test exists: loralib's in-place merge changes a bf16 weight."""
    theirs = fill_lora_(loralib.Linear(32, 32, r=4, lora_alpha=8, dtype=torch.bfloat16))
    ours = fill_lora_(lora_layers.Linear(32, 32, r=4, lora_alpha=8, dtype=torch.bfloat16))
    originals = theirs.weight.detach().clone(), ours.weight.detach().clone()
    for _ in range(50):
        for layer in (theirs, ours):
            with torch.no_grad():
                layer.lora_B.add_(torch.randn(32, 4).to(torch.bfloat16), alpha=0.01)
            layer.eval()
            layer.train()
    changed = (theirs.weight != originals[0]).float().mean().item()
    assert changed > 0.1
    assert torch.equal(ours.weight, originals[1])
