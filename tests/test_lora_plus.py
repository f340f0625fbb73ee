"""LoRA+ parameter groups, with PEFT 0.21.2's ``create_loraplus_optimizer`` as the oracle.

Two comparisons, parameter by parameter (each parameter's ``lr`` and ``weight_decay`` in the
optimizer each side builds):

- on a PEFT model: our tiny Phi-3 (fused q&v ``qkv_proj``, an Embedding LoRA, a trainable
  head and norm) is exported with ``export_peft`` and loaded in PEFT; the two optimizers
  are matched through the parameter names (PEFT's ``...qkv_proj.lora_B.default.weight`` is
  our ``...qkv_proj.lora_B``).
- on our model itself: PEFT's function only reads ``named_parameters()``, so it runs on a
  non-PEFT model too, and there it must agree with ours on every parameter except those of
  an Embedding LoRA: PEFT finds those by ``isinstance(module, peft.tuners.lora.Embedding)``,
  which our ``Embedding`` is not, so it files their ``lora_B`` with the ``B`` matrices and
  ``lora_A`` with the ``A`` ones. What PEFT does to its own embeddings (the first
  comparison) is the reference for those.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from torch import nn

import lora_layers
from lora_layers import lora_plus_param_groups
from tests.helpers import fill_all_, lora_tiny_phi3, phi3_ids, tiny_phi3

LR, RATIO, LR_EMB, WD = 1e-3, 8.0, 1e-5, 0.05
PEFT_KW = {
    "lr": LR,
    "loraplus_lr_ratio": RATIO,
    "loraplus_lr_embedding": LR_EMB,
    "loraplus_weight_decay": WD,
}
DOC = Path(__file__).resolve().parents[1] / "docs" / "variants.md"


def phi3_with_lora() -> nn.Module:
    """Tiny Phi-3: LoRA on q&v of ``qkv_proj``, ``o_proj`` and ``embed_tokens``; the final
    norm (a 1-D RMSNorm scale) and ``lm_head`` trainable too; every A and B non-zero."""
    model = lora_tiny_phi3(
        ["o_proj", "embed_tokens"], fused={"qkv_proj": "qv"}, fill_seed=1, train=True
    )
    model.model.norm.weight.requires_grad_(True)
    model.lm_head.weight.requires_grad_(True)
    return model


class Toy(nn.Module):
    """Every kind of parameter PEFT's grouping tells apart: LoRA on an embedding, a fused
    projection, a linear with a trainable bias and a conv; a trainable LayerNorm (its weight
    and bias decay-exempt), a trainable plain head, a root-level 1-D gain, a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.frozen = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32)
        self.gain = nn.Parameter(torch.ones(16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.emb(ids))  # (B, T, 16)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = self.proj(q * k + v)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2) * self.gain
        return self.head(self.frozen(x))  # (B, T, 32)


def toy_with_lora() -> Toy:
    torch.manual_seed(0)
    model = Toy()
    lora_layers.inject_lora(
        model, ["emb", "proj", "conv"], r=2, fused={"qkv": [True, False, True]}, bias="all"
    )
    model.frozen.requires_grad_(False)
    for p in (*model.norm.parameters(), *model.head.parameters(), model.gain):
        p.requires_grad_(True)
    model.emb.weight.requires_grad_(True)  # a trainable table of a LoRA embedding
    return fill_all_(model).train()


def rates(optimizer: torch.optim.Optimizer) -> dict[int, tuple[float, float]]:
    """``{id(param): (lr, weight_decay)}``; a parameter in two groups fails the test."""
    out: dict[int, tuple[float, float]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = (group["lr"], group["weight_decay"])
    return out


def ours(model: nn.Module) -> torch.optim.AdamW:
    groups = lora_plus_param_groups(model, LR, RATIO, lr_embedding=LR_EMB, weight_decay=WD)
    return torch.optim.AdamW(groups)


def our_name(peft_name: str) -> str:
    """PEFT's parameter name -> ours: drop the wrapper prefix, ``base_layer`` and the adapter
    name; ``lora_embedding_A/B`` are our embedding's ``lora_A/B``."""
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return re.sub(r"\.lora_(?:embedding_)?([AB])\.default(?:\.weight)?$", r".lora_\1", name)


# --------------------------------------------------------------------------- PEFT parity
def test_groups_equal_peft_on_exported_phi3_with_embedding_and_fused_qkv(tmp_path):
    model = phi3_with_lora()
    lora_layers.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_phi3(), str(tmp_path), is_trainable=True)
    theirs.base_model.model.model.norm.weight.requires_grad_(True)
    theirs.base_model.model.lm_head.weight.requires_grad_(True)

    peft_rates = rates(create_loraplus_optimizer(theirs, torch.optim.AdamW, **PEFT_KW))
    our_rates = rates(ours(model))

    expected = {
        our_name(n): peft_rates[id(p)] for n, p in theirs.named_parameters() if p.requires_grad
    }
    got = {n: our_rates[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert got == expected
    # The comparison covers every group PEFT has here, fused and embedding LoRA included:
    assert got["model.embed_tokens.lora_B"] == (LR_EMB, WD)
    assert got["model.layers.0.self_attn.qkv_proj.lora_B"] == (LR * RATIO, WD)
    assert got["model.layers.0.self_attn.qkv_proj.lora_A"] == (LR, WD)
    assert got["model.norm.weight"] == (LR * RATIO, WD)  # RMSNorm is not a LayerNorm
    assert got["lm_head.weight"] == (LR, WD)


def test_groups_equal_peft_run_on_our_model_except_embedding_lora():
    model = toy_with_lora()
    peft_rates = rates(create_loraplus_optimizer(model, torch.optim.AdamW, **PEFT_KW))
    our_rates = rates(ours(model))

    embedding = {id(p) for p in model.emb.parameters() if p.requires_grad}
    assert len(embedding) == 3  # lora_A, lora_B and the table
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # PEFT's own Embedding LoRA goes to its "embedding" group (see the test above).
        want = (LR_EMB, WD) if id(p) in embedding else peft_rates[id(p)]
        assert our_rates[id(p)] == want, name
    # Every group of PEFT's is exercised on this model:
    by_name = {n: our_rates[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert by_name["qkv.lora_B"] == by_name["gain"] == (LR * RATIO, WD)
    assert by_name["qkv.bias"] == by_name["norm.weight"] == (LR * RATIO, 0.0)
    assert by_name["conv.lora_A"] == by_name["head.weight"] == (LR, WD)


def test_root_module_parameters_decay_as_in_peft():
    # transformers' LayerNorm test looks at submodules only: a LayerNorm that *is* the model
    # keeps its weight in the decayed group (its bias is exempt by name).
    model = nn.LayerNorm(4)
    peft_rates = rates(create_loraplus_optimizer(model, torch.optim.AdamW, **PEFT_KW))
    assert rates(ours(model)) == peft_rates
    assert peft_rates[id(model.weight)] == (LR * RATIO, WD)


# --------------------------------------------------------------------------- the groups
def test_every_trainable_parameter_exactly_once_frozen_excluded():
    model = toy_with_lora()
    groups = lora_plus_param_groups(model, LR)
    params = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len({id(p) for p in params}) == len(trainable)
    assert {id(p) for p in params} == {id(p) for p in trainable}
    assert not any(p is model.frozen.weight or p is model.qkv.weight for p in params)


def test_defaults_are_ratio_16_embedding_1e6_no_decay():
    model = toy_with_lora()
    groups = {g["name"]: g for g in lora_plus_param_groups(model, 2e-4)}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "lora_A": (2e-4, 0.0),
        "embedding": (1e-6, 0.0),
        "lora_B": (2e-4 * 16, 0.0),
        "lora_B_no_decay": (2e-4 * 16, 0.0),
    }
    assert any(p is model.proj.lora_B for p in groups["lora_B"]["params"])
    assert any(p is model.proj.lora_A for p in groups["lora_A"]["params"])


def test_empty_groups_are_left_out():
    model = nn.Sequential(lora_layers.Linear(8, 8, r=2, bias=False))
    groups = lora_plus_param_groups(model, LR)
    assert [(g["name"], len(g["params"])) for g in groups] == [("lora_A", 1), ("lora_B", 1)]


def test_adamw_step_moves_b_at_lr_times_ratio_and_a_at_lr():
    model = phi3_with_lora()
    optimizer = torch.optim.AdamW(lora_plus_param_groups(model, LR, RATIO))
    layer = model.model.layers[0].self_attn.qkv_proj
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = phi3_ids(seq=8)

    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()

    assert math.isfinite(loss.item())
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in before.items())  # every one trained
    # Adam's first step moves each element by lr * g / (|g| + eps): at most lr, and almost
    # exactly lr for elements with |g| >> eps. With weight_decay 0 that reads off the lr.
    step_b = (layer.lora_B - before["model.layers.0.self_attn.qkv_proj.lora_B"]).abs().max()
    step_a = (layer.lora_A - before["model.layers.0.self_attn.qkv_proj.lora_A"]).abs().max()
    torch.testing.assert_close(step_b.item(), LR * RATIO, rtol=1e-3, atol=0)
    torch.testing.assert_close(step_a.item(), LR, rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("value", [0, -1e-3, math.nan, math.inf])
@pytest.mark.parametrize("arg", ["lr", "lr_ratio", "lr_embedding"])
def test_rejects_bad_rates(arg, value):
    kwargs = {"lr": LR, "lr_ratio": RATIO, "lr_embedding": LR_EMB, arg: value}
    with pytest.raises(ValueError, match=rf"{arg} must be a finite number > 0, got {arg}="):
        lora_plus_param_groups(toy_with_lora(), **kwargs)


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf])
def test_rejects_bad_weight_decay(value):
    with pytest.raises(
        ValueError, match=rf"weight_decay must be .* >= 0, got weight_decay={value}"
    ):
        lora_plus_param_groups(toy_with_lora(), LR, weight_decay=value)


@pytest.mark.parametrize("value", ["1e-3", None, True])
def test_rejects_non_numbers(value):
    with pytest.raises(TypeError, match=rf"lr_ratio must be a finite number > 0, got {value!r}"):
        lora_plus_param_groups(toy_with_lora(), LR, value)


def test_rejects_overflowing_b_rate():
    with pytest.raises(ValueError, match=r"lr \* lr_ratio must be finite, got lr=1e\+200"):
        lora_plus_param_groups(toy_with_lora(), 1e200, 1e200)


def test_rejects_model_without_trainable_parameters():
    model = toy_with_lora().requires_grad_(False)
    with pytest.raises(ValueError, match="Toy has no trainable parameter"):
        lora_plus_param_groups(model, LR)


def test_rejects_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        lora_plus_param_groups([nn.Parameter(torch.ones(2))], LR)


# --------------------------------------------------------------------------- docs
def test_variants_doc_lora_plus_example_runs(tmp_path, monkeypatch):
    text = DOC.read_text()
    section = text.split("## LoRA+", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "docs/variants.md's LoRA+ section has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {"__name__": "__main__"})


def test_groups_equal_peft_on_a_dora_model_magnitudes_included():
    # The same Toy with DoRA on both sides: PEFT's get_peft_model(use_dora=True) and our
    # inject_lora(use_dora=True). PEFT's magnitudes (lora_magnitude_vector) must land in the
    # same groups as ours (lora_magnitude): conv's with the A matrices (PEFT's has shape
    # (1, out, 1) for a Conv1d), linear, fused and embedding ones with the B matrices.
    theirs = peft.get_peft_model(
        Toy(),
        peft.LoraConfig(r=2, target_modules=["emb", "qkv", "proj", "conv"], use_dora=True),
    )
    model = Toy()
    lora_layers.inject_lora(
        model, ["emb", "proj", "conv"], r=2, fused={"qkv": [True, False, True]}, use_dora=True
    )
    for net in (model, theirs.base_model.model):
        for p in (*net.norm.parameters(), *net.head.parameters(), net.gain):
            p.requires_grad_(True)

    peft_rates = rates(create_loraplus_optimizer(theirs, torch.optim.AdamW, **PEFT_KW))
    our_rates = rates(ours(model))

    def name(peft_name: str) -> str:
        return re.sub(r"\.lora_magnitude_vector\.default\.weight$", ".lora_magnitude", peft_name)

    expected = {
        our_name(name(n)): peft_rates[id(p)]
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    got = {n: our_rates[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert got == expected
    assert got["conv.lora_magnitude"] == (LR, WD)
    assert got["proj.lora_magnitude"] == got["qkv.lora_magnitude"] == (LR * RATIO, WD)
    assert got["emb.lora_magnitude"] == (LR * RATIO, WD)
    assert got["emb.lora_A"] == (LR_EMB, WD)
