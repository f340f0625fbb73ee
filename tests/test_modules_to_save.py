"""modules_to_save (whole modules trained beside LoRA), with PEFT 0.21.2 as the oracle.

Tiny sequence-classification models (Llama, Phi-3) built from configs: a PEFT ``SEQ_CLS``
adapter (LoRA + its trained ``score`` head) imports with PEFT's logits and head; ours exports
and loads in PEFT; the files round-trip bit-identically; unload / merge_and_unload /
disable_adapters behave as documented in docs/variants.md. Every model is trained a few
AdamW steps first, so B and the head are non-zero / changed.
"""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lora_layers
from lora_layers import (
    AdapterLoadError,
    count_parameters,
    disable_adapters,
    export_peft,
    import_peft,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_and_unload,
    plan_lora,
    save_lora,
    unload,
)
from lora_layers.modules_to_save import original_of
from tests.helpers import TOLERANCES, assert_unchanged, snapshot

RTOL, ATOL = TOLERANCES[torch.float32]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7, 8]])
LABELS = torch.tensor([1, 2])
TARGETS = {"llama": ["q_proj", "v_proj"], "phi3": ["qkv_proj", "o_proj"]}


def tiny_classifier(arch: str = "llama", seed: int = 0) -> nn.Module:
    """A seeded, random ``*ForSequenceClassification`` (3 labels) in eval mode."""
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        Phi3Config,
        Phi3ForSequenceClassification,
    )

    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForSequenceClassification(LlamaConfig(**common)).eval()
    return Phi3ForSequenceClassification(Phi3Config(**common)).eval()


def train_steps(model: nn.Module, steps: int = 3) -> nn.Module:
    """A few AdamW steps on a classification loss (moves B off zero and the head)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=LABELS).loss.backward()
        optimizer.step()
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def ours_trained(arch: str = "llama", **kwargs) -> nn.Module:
    model = tiny_classifier(arch)
    inject_lora(model, TARGETS[arch], r=4, lora_alpha=8, modules_to_save=["score"], **kwargs)
    return train_steps(model)


def peft_trained(arch: str, directory) -> nn.Module:
    """A PEFT SEQ_CLS adapter (score in modules_to_save), trained, saved to ``directory``."""
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS[arch])
    model = train_steps(peft.get_peft_model(tiny_classifier(arch), config))
    model.save_pretrained(str(directory))
    return model


# --------------------------------------------------------------------------- PEFT interop
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_peft_seq_cls_adapter_imports_with_equal_logits_and_trained_head(tmp_path, arch):
    theirs = peft_trained(arch, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and set(config["modules_to_save"]) >= {"score"}
    model = tiny_classifier(arch)
    original = model.score.weight.detach().clone()

    report = import_peft(model, tmp_path)

    assert report.ok and "score" in report.injected_modules
    trained_head = theirs.base_model.model.score.modules_to_save.default.weight
    assert torch.equal(model.score.weight, trained_head)
    assert not torch.equal(model.score.weight, original)  # the head did train
    assert all(layer.lora_B.abs().sum() > 0 for _, layer in lora_layers.lora_modules(model))
    torch.testing.assert_close(logits(model), logits(theirs), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_our_export_loads_in_peft_with_equal_logits_and_head(tmp_path, arch):
    model = ours_trained(arch)

    config = export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_classifier(arch), str(tmp_path)).eval()

    assert config["modules_to_save"] == ["score"]
    assert "base_model.model.score.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(
        theirs.base_model.model.score.modules_to_save.default.weight, model.score.weight
    )
    torch.testing.assert_close(logits(theirs), logits(model), rtol=RTOL, atol=ATOL)
    assert not torch.allclose(logits(theirs), logits(tiny_classifier(arch)), rtol=RTOL, atol=ATOL)


def test_peft_counts_the_same_trainable_parameters():
    ours = inject_lora(tiny_classifier(), TARGETS["llama"], r=4, modules_to_save=["score"])
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=TARGETS["llama"])
    theirs = peft.get_peft_model(tiny_classifier(), config)

    trainable, total = count_parameters(ours)
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert trainable == peft_trainable == 4 * 32 * 2 + 4 * 32 + 4 * 16 + 3 * 32
    # PEFT counts the frozen original head too; ours is kept outside the model.
    assert peft_total - total == ours.score.weight.numel()


def lora_plus_rates(theirs: nn.Module, model: nn.Module) -> tuple[dict, dict]:
    """``({our name: (lr, wd)}`` from PEFT's optimizer on ``theirs``, the same from ours)."""
    kw = dict(lr=1e-3, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.1)
    peft_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, **kw)
    peft_rates = {
        id(p): (g["lr"], g["weight_decay"]) for g in peft_opt.param_groups for p in g["params"]
    }
    groups = lora_layers.lora_plus_param_groups(model, 1e-3, 8.0, weight_decay=0.1)
    our_rates = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}

    def ours_name(name: str) -> str:
        name = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
        name = name.replace(".base_layer.", ".")
        return re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1", name)

    expected = {
        ours_name(n): peft_rates[id(p)] for n, p in theirs.named_parameters() if p.requires_grad
    }
    got = {n: our_rates[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    return got, expected


def test_lora_plus_groups_put_the_head_where_peft_does(tmp_path):
    theirs = peft_trained("llama", tmp_path)
    model = tiny_classifier()
    import_peft(model, tmp_path)
    lora_layers.mark_only_lora_as_trainable(model)  # loading keeps requires_grad as it was

    got, expected = lora_plus_rates(theirs, model)

    assert got == expected and got["score.weight"] == (1e-3, 0.1)  # with A: 2-D, not LoRA


# --------------------------------------------------------------------------- files
class BatchNormHead(nn.Module):
    """A toy whose saved head has a bias and buffers (running stats, an int64 counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x))


def toy_base() -> BatchNormHead:
    torch.manual_seed(1)
    return BatchNormHead().eval()


def train_toy(model: nn.Module) -> nn.Module:
    """Three AdamW steps on random batches (trains LoRA and the saved head); returns ``model``."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 8)).square().mean().backward()
        optimizer.step()
    return model


def trained_toy() -> BatchNormHead:
    model = inject_lora(toy_base(), ["proj"], r=2, modules_to_save=["head"])
    return train_toy(model).eval()


def test_save_load_round_trip_is_bit_identical_with_buffers(tmp_path):
    model = trained_toy()
    path = save_lora(model, tmp_path / "a.safetensors")
    stored = load_file(str(path))
    saved_keys = {k for k in stored if k.startswith("head.")}
    assert saved_keys == {f"head.{k}" for k in model.head.state_dict()}  # buffers included
    assert stored["head.0.num_batches_tracked"].item() == 3
    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()["lora_layers.adapter"])
    assert doc["format_version"] == 2  # version 1 readers refuse it: they would drop the head
    assert doc["modules_to_save"]["head"] == list(model.head.state_dict())

    fresh = toy_base()
    report = load_lora(fresh, path)

    assert report.ok and report.injected_modules == ["proj", "head"]
    for key, value in lora_state_dict(model).items():
        got = fresh.state_dict()[key]
        assert got.dtype == value.dtype and torch.equal(got, value), key
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), model(x))
    assert original_of(fresh.head) is not None and original_of(fresh.head) is not fresh.head
    assert all(p.requires_grad for p in fresh.head.parameters())


def test_state_dict_round_trip_without_metadata():
    model = trained_toy()
    other = inject_lora(BatchNormHead(), ["proj"], r=2, modules_to_save=["head"])
    state = lora_state_dict(model)
    assert "head.0.running_mean" in state and "head.1.weight" in state

    report = load_lora_state_dict(other, state)

    assert report.ok
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


def test_load_names_every_bad_saved_tensor_and_changes_nothing(tmp_path):
    path = save_lora(trained_toy(), tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors["head.1.weight"] = torch.zeros(3, 9)  # shape
    tensors["head.1.bias"] = tensors["head.1.bias"].to(torch.int32)  # dtype
    tensors["head.0.num_batches_tracked"] = torch.tensor(3.0)  # int buffer stored as float
    del tensors["head.0.running_var"]  # missing
    tensors["head.0.extra"] = torch.ones(8)  # not in the model
    doc = json.loads(metadata["lora_layers.adapter"])
    doc["modules_to_save"]["head"].append("extra")
    metadata["lora_layers.adapter"] = json.dumps(doc)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    fresh = BatchNormHead()
    before = snapshot(fresh)

    with pytest.raises(
        AdapterLoadError, match=r"head\.1\.weight: file \(3, 9\), model \(3, 8\)"
    ) as info:
        load_lora(fresh, tmp_path / "bad.safetensors")

    report = info.value.report
    assert report.shape_mismatches == ["head.1.weight"]
    assert set(report.config_mismatches) == {"head.1.bias", "head.0.num_batches_tracked"}
    assert "head.0.running_var" in report.missing_keys
    assert report.unexpected_keys == ["head.0.extra"]
    assert_unchanged(fresh, before)
    assert isinstance(fresh.proj, nn.Linear) and not isinstance(fresh.proj, lora_layers.Linear)


def test_load_refuses_a_model_without_the_module_or_without_inject(tmp_path):
    path = save_lora(trained_toy(), tmp_path / "a.safetensors")

    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

    with pytest.raises(
        AdapterLoadError, match=r"head\.1\.weight: the model has no module named 'head'"
    ):
        load_lora(NoHead(), path)
    model = inject_lora(BatchNormHead(), ["proj"], r=2)  # LoRA, but no saved head
    with pytest.raises(
        AdapterLoadError,
        match=r"head: is a plain Sequential and inject=False; the file trains it whole",
    ):
        load_lora(model, path, inject=False)
    saved = inject_lora(BatchNormHead(), ["proj"], r=2, modules_to_save=["head"])
    lora_only = lora_layers.adapter_from_model(trained_toy())
    lora_only.modules_to_save = {}
    lora_only.tensors = {k: v for k, v in lora_only.tensors.items() if not k.startswith("head.")}
    with pytest.raises(
        AdapterLoadError, match=r"head\.1\.weight: the model trains this module whole"
    ):
        load_lora(saved, lora_only)


# --------------------------------------------------------------------------- injection
def test_freeze_base_trains_every_parameter_of_the_saved_module_only():
    model = inject_lora(BatchNormHead(), ["proj"], r=2, modules_to_save=["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "proj.lora_A",
        "proj.lora_B",
        "head.0.weight",
        "head.0.bias",
        "head.1.weight",
        "head.1.bias",
    }
    original = original_of(model.head)
    assert original is not None and not any(p.requires_grad for p in original.parameters())
    lora_layers.mark_only_lora_as_trainable(model)  # keeps the saved module trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    free = inject_lora(BatchNormHead(), ["proj"], r=2, freeze_base=False, modules_to_save=["head"])
    assert all(p.requires_grad for p in free.head.parameters())
    assert all(p.requires_grad for p in original_of(free.head).parameters())  # not frozen


def test_plan_carries_modules_to_save_and_inject_carries_it_out():
    model = BatchNormHead()
    plan = plan_lora(model, ["proj"], r=2, modules_to_save="head")
    assert list(plan) == ["proj"] and list(plan.modules_to_save) == ["head"]
    assert model.head is plan.modules_to_save["head"][0]  # planning changes nothing
    inject_lora(model, plan=plan)
    assert original_of(model.head) is plan.modules_to_save["head"][0]


def test_unmatched_key_raises_with_candidates():
    with pytest.raises(
        ValueError, match=r"modules_to_save entry 'haed' matched no module; did you mean 'head'"
    ):
        inject_lora(BatchNormHead(), ["proj"], modules_to_save=["head", "haed"])


def test_a_module_cannot_be_both_target_and_saved():
    with pytest.raises(
        ValueError, match=r"'head\.1' is both a LoRA target and in \(or inside\) a modules_to_save"
    ):
        inject_lora(BatchNormHead(), ["proj", "head.1"], modules_to_save=["head"])
    with pytest.raises(ValueError, match=r"'head\.1' is inside 'head', which is also saved whole"):
        inject_lora(BatchNormHead(), ["proj"], modules_to_save=["head", "1"])
    # A broad key skips it, as PEFT does:
    model = inject_lora(tiny_classifier(), "all-linear", modules_to_save=["score"])
    assert type(model.score) is nn.Linear and model.score.weight.requires_grad
    assert "score" not in lora_layers.lora_module_names(model)


def test_unload_gives_back_the_original_head_merge_keeps_the_trained_one():
    base_logits = logits(tiny_classifier())
    model = ours_trained()
    head = model.score
    original = original_of(head)
    before = original.weight.detach().clone()
    keys = set(tiny_classifier().state_dict())
    assert set(model.state_dict()) - keys == {n for n in lora_state_dict(model) if "lora_" in n}
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), base_logits, rtol=0, atol=0)
    assert model.score is head  # put back on exit

    merged = merge_and_unload(ours_trained())
    assert set(merged.state_dict()) == keys
    assert original_of(merged.score) is None
    assert torch.equal(merged.score.weight, head.weight)  # the trained head stays

    unload(model)
    assert model.score is original and torch.equal(model.score.weight, before)
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(logits(model), base_logits, rtol=0, atol=0)


def peft_toy(directory) -> nn.Module:
    """PEFT's own adapter on the toy: LoRA on ``proj``, the BatchNorm head saved whole."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], modules_to_save=["head"])
    model = train_toy(peft.get_peft_model(toy_base(), config))
    model.eval().save_pretrained(str(directory))
    return model


def test_peft_toy_with_buffers_imports_and_our_export_loads_in_peft(tmp_path):
    theirs = peft_toy(tmp_path / "peft")
    x = torch.randn(4, 8)
    model = toy_base()

    assert import_peft(model, tmp_path / "peft").ok

    assert torch.equal(
        model.head[0].running_var,
        theirs.base_model.model.head.modules_to_save.default[0].running_var,
    )
    assert model.head[0].num_batches_tracked.item() == 3
    torch.testing.assert_close(model(x), theirs(x), rtol=RTOL, atol=ATOL)
    export_peft(model, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(toy_base(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(again(x), model(x), rtol=RTOL, atol=ATOL)
    assert again.base_model.model.head.modules_to_save.default[0].num_batches_tracked.item() == 3
    lora_layers.mark_only_lora_as_trainable(model)
    got, expected = lora_plus_rates(theirs, model)  # LoRA+: the head's biases too
    assert got == expected and got["head.1.bias"] == (8e-3, 0.0)
    assert got["head.0.weight"] == (8e-3, 0.1) and got["head.1.weight"] == (1e-3, 0.1)


def test_export_refuses_a_name_peft_would_match_twice(tmp_path):
    class Heads(BatchNormHead):
        def __init__(self) -> None:
            super().__init__()
            self.prehead = nn.Linear(3, 3)

    model = inject_lora(Heads(), ["proj"], r=2, modules_to_save=["head"])
    with pytest.raises(
        lora_layers.AdapterError,
        match=r"'head': PEFT matches names by their ending and would also train 'prehead'",
    ):
        export_peft(model, tmp_path)


def test_non_strict_load_skips_only_the_bad_saved_module(tmp_path):
    path = save_lora(trained_toy(), tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors["head.1.bias"] = torch.full_like(tensors["head.1.bias"], float("nan"))
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    fresh = toy_base()

    with pytest.warns(UserWarning, match=r"head\.1\.bias: holds 3 NaN/Inf values"):
        report = load_lora(fresh, tmp_path / "nan.safetensors", strict=False)

    assert report.injected_modules == ["proj"] and original_of(fresh.head) is None
    assert isinstance(fresh.proj, lora_layers.Linear)


def test_split_fused_keeps_the_saved_head(tmp_path):
    model = tiny_classifier("phi3")
    inject_lora(model, fused={"qkv_proj": "qv"}, r=2, modules_to_save=["score"])
    adapter = lora_layers.adapter_from_model(model)

    split = lora_layers.split_fused(adapter)
    sizes = lora_layers.fused.phi3_split_sizes(model.config)
    fused = lora_layers.fuse_separate(split, split_sizes=sizes)

    assert "model.layers.0.self_attn.q_proj" in split.modules
    for converted in (split, fused):
        assert converted.modules_to_save == {"score": ("weight",)}
        assert torch.equal(converted.tensors["score.weight"], model.score.weight)


def test_saving_a_tied_module_warns_that_the_copy_is_untied():
    class Tied(BatchNormHead):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(8, 8)
            self.out.weight = self.proj.weight

    with pytest.warns(UserWarning, match=r"'out' shares a parameter with 'proj' \(tied weights\)"):
        model = inject_lora(Tied(), ["head.1"], r=2, modules_to_save=["out"])
    assert model.out.weight is not model.proj.weight


def test_a_second_injection_leaves_saved_modules_alone():
    model = inject_lora(tiny_classifier(), ["q_proj"], modules_to_save=["score"])
    inject_lora(model, "all-linear", exclude_modules=["q_proj"])
    assert type(model.score) is nn.Linear and original_of(model.score) is not None
    with pytest.raises(ValueError, match=r"'score' is both a LoRA target and in \(or inside\)"):
        inject_lora(model, ["score"])
    with pytest.raises(ValueError, match=r"modules_to_save: 'score' is already in modules_to_save"):
        inject_lora(model, ["k_proj"], modules_to_save=["score"])
    toy = inject_lora(toy_base(), ["proj"], modules_to_save=["head"])
    with pytest.raises(ValueError, match=r"'head\.1' is inside 'head', which is also saved whole"):
        inject_lora(toy, ["proj"], exclude_modules=["proj"], modules_to_save=["head.1"])


def test_the_original_follows_the_model_dtype_when_put_back():
    model = ours_trained()
    model.to(torch.float64)
    expected = logits(tiny_classifier().to(torch.float64))
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    unload(model)
    assert model.score.weight.dtype == torch.float64
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_import_refuses_a_modules_to_save_that_is_not_a_list(tmp_path):
    peft_trained("llama", tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = "score"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    with pytest.raises(
        AdapterLoadError, match=r"modules_to_save must be a list of module names, got 'score'"
    ):
        import_peft(tiny_classifier(), tmp_path)


def test_the_original_follows_the_model_device_when_put_back():
    # No accelerator here: the meta device stands in for "the model moved after injection".
    model = inject_lora(toy_base(), ["proj"], r=2, modules_to_save=["head"])
    original = original_of(model.head)
    model.to("meta")
    assert original[1].weight.device.type == "cpu"  # kept outside the model: .to() skips it

    unload(model)

    assert model.head is original
    assert {t.device.type for t in model.head.state_dict().values()} == {"meta"}
