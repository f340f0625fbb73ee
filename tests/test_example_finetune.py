"""Tests of examples/finetune_phi3.py: the end-to-end Phi-3 LoRA fine-tune, at toy size.

The script runs in-process through ``finetune_phi3.main(argv)`` with a very small tiny base
(a few pretraining steps, cached in a temporary folder) and a few LoRA steps, so the whole
file takes seconds. What the default run learns is checked by running it, not here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from transformers import AutoTokenizer, Phi3ForCausalLM  # noqa: E402

import lora_layers  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import chat_data  # noqa: E402
import finetune_config  # noqa: E402
import finetune_phi3  # noqa: E402
import make_dataset  # noqa: E402
import tiny_phi3  # noqa: E402

TINY_BASE = tiny_phi3.TinyBaseConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    pretrain_steps=8,
    pretrain_batch_size=8,
    pretrain_seq_len=32,
)
TINY_ARGS = [
    "--tiny-hidden-size=32",
    "--tiny-num-hidden-layers=2",
    "--tiny-num-attention-heads=4",
    "--tiny-num-key-value-heads=2",
    "--tiny-intermediate-size=64",
    "--tiny-pretrain-steps=8",
    "--tiny-pretrain-batch-size=8",
    "--tiny-pretrain-seq-len=32",
]
FAST_ARGS = [
    "--batch-size=4",
    "--eval-samples=8",
    "--eval-batch-size=8",
    "--max-new-tokens=4",
    "--logging-steps=1",
    "--show-samples=2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_base_cache")


def run(out_dir: Path, cache_dir: Path, *args: str) -> dict:
    argv = [*TINY_ARGS, *FAST_ARGS, f"--cache-dir={cache_dir}", f"--output-dir={out_dir}"]
    return finetune_phi3.main([*argv, *args])


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, dict]:
    """One uninterrupted 6-step run, checkpointing every 3 steps."""
    out = tmp_path_factory.mktemp("six_steps")
    metrics = run(out, cache_dir, "--max-steps=6", "--save-steps=3", "--eval-steps=3")
    return out, metrics


def _history(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / finetune_phi3.TRAINER_JSON).read_text())["history"]["train"]


# --------------------------------------------------------------------------- end to end
def test_smoke_run_writes_every_output(six_steps: tuple[Path, dict]) -> None:
    out, metrics = six_steps
    for name in ("config.json", "train.log", "metrics.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert (out / "merged" / "tokenizer.json").is_file()
    assert [p.name for p in finetune_phi3.list_checkpoints(out)] == ["step-000003", "step-000006"]
    assert metrics["steps"] == 6
    assert 0.0 <= metrics["before"]["exact_match"] <= 1.0
    assert metrics["held_out_conversations"] == 8
    assert len(metrics["samples"]) == 8
    assert all(set(s) == {"prompt", "expected", "before", "after"} for s in metrics["samples"])
    log = (out / "train.log").read_text()
    assert "tokens/s" in log and "lr" in log and "held-out exact match: before" in log
    history = _history(out / "checkpoints" / "step-000006")
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_checkpoint_files_present_and_loadable(six_steps: tuple[Path, dict]) -> None:
    out, _ = six_steps
    ckpt = out / "checkpoints" / "step-000003"
    assert {p.name for p in ckpt.iterdir()} == {
        finetune_phi3.ADAPTER_FILE,
        finetune_phi3.STATE_FILE,
        finetune_phi3.TRAINER_JSON,
    }
    state = torch.load(ckpt / finetune_phi3.STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 3
    assert state["scheduler"]["last_epoch"] == 3
    assert state["optimizer"]["state"], "AdamW moments are saved"
    assert {"torch", "python"} <= set(state["rng"])
    adapter = lora_layers.read_adapter(ckpt / finetune_phi3.ADAPTER_FILE)
    assert any(key.endswith("qkv_proj.lora_A") for key in adapter.tensors)
    assert json.loads((ckpt / finetune_phi3.TRAINER_JSON).read_text())["step"] == 3


def test_resume_continues_with_the_same_losses(
    six_steps: tuple[Path, dict], tmp_path: Path, cache_dir: Path
) -> None:
    full, _ = six_steps
    shutil.copytree(full / "checkpoints" / "step-000003", tmp_path / "checkpoints" / "step-000003")
    run(tmp_path, cache_dir, "--max-steps=6", "--save-steps=3", "--eval-steps=3", "--resume=latest")
    uninterrupted = _history(full / "checkpoints" / "step-000006")
    resumed = _history(tmp_path / "checkpoints" / "step-000006")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert b["lr"] == a["lr"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    final_a = lora_layers.read_adapter(full / "adapter" / "adapter.safetensors").tensors
    final_b = lora_layers.read_adapter(tmp_path / "adapter" / "adapter.safetensors").tensors
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=1e-6)


def test_resume_refuses_a_changed_setting(
    six_steps: tuple[Path, dict], tmp_path: Path, cache_dir: Path
) -> None:
    full, _ = six_steps
    shutil.copytree(full / "checkpoints" / "step-000003", tmp_path / "checkpoints" / "step-000003")
    with pytest.raises(ValueError, match="learning_rate"):
        run(tmp_path, cache_dir, "--max-steps=6", "--learning-rate=0.01", "--resume=latest")


def test_fresh_run_removes_an_earlier_runs_checkpoints(
    six_steps: tuple[Path, dict], tmp_path: Path, cache_dir: Path
) -> None:
    full, _ = six_steps
    shutil.copytree(full / "checkpoints" / "step-000006", tmp_path / "checkpoints" / "step-000006")
    run(tmp_path, cache_dir, "--max-steps=2", "--save-steps=1", "--eval-steps=0")
    assert [p.name for p in finetune_phi3.list_checkpoints(tmp_path)] == [
        "step-000001",
        "step-000002",
    ]


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path, cache_dir: Path) -> None:
    # Micro-batch k holds examples k*B ... (k+1)*B-1 of the data order, so 2 x 4 covers the
    # same 8 conversations as 1 x 8; the loss is normalised by the whole step's targets.
    common = ("--max-steps=2", "--eval-steps=0", "--save-steps=0", "--lora-dropout=0")
    big = run(tmp_path / "big", cache_dir, *common, "--batch-size=8")
    accumulated = run(
        tmp_path / "acc", cache_dir, *common, "--batch-size=4", "--gradient-accumulation-steps=2"
    )
    assert accumulated["after"]["loss"] == pytest.approx(big["after"]["loss"], rel=1e-5)
    a = lora_layers.read_adapter(tmp_path / "big" / "adapter" / "adapter.safetensors").tensors
    b = lora_layers.read_adapter(tmp_path / "acc" / "adapter" / "adapter.safetensors").tensors
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_merged_model_logits_equal_adapter_model(
    six_steps: tuple[Path, dict], cache_dir: Path
) -> None:
    out, metrics = six_steps
    assert metrics["merged_max_abs_logit_diff"] < 1e-5
    # Independently, from the files: the base plus the saved adapter vs the saved merged model.
    base, tokenizer, _ = tiny_phi3.load_or_pretrain(TINY_BASE, cache_dir)
    lora_layers.load_lora(base, out / "adapter" / "adapter.safetensors")
    merged = Phi3ForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not any(isinstance(m, lora_layers.LoRALayer) for m in merged.modules())
    conversations = chat_data.read_jsonl(finetune_phi3.DEFAULT_EVAL_DATA)[:4]
    batch = chat_data.collate(
        [chat_data.encode(tokenizer, c, 512) for c in conversations], tokenizer.pad_token_id
    )
    with torch.no_grad():
        adapter_logits = base.eval()(
            batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        merged_logits = merged(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(merged_logits[mask], adapter_logits[mask], rtol=0, atol=1e-5)


def _write_tiny_phi3(path: Path) -> None:
    tokenizer = tiny_phi3.build_tokenizer()
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_phi3.phi3_config(TINY_BASE, tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_model_dir_path_trains_from_a_saved_checkpoint(tmp_path: Path, cache_dir: Path) -> None:
    model_dir = tmp_path / "phi3"
    _write_tiny_phi3(model_dir)
    data = tmp_path / "chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"What is {i} + 1?"},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(20)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    metrics = run(
        out, cache_dir, f"--model={model_dir}", f"--data={data}", "--max-steps=2", "--eval-steps=0"
    )
    assert metrics["held_out_conversations"] == 2  # --eval-fraction 0.1 of 20
    assert metrics["merged_max_abs_logit_diff"] < 1e-5
    assert (out / "adapter" / "adapter.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["model"] == str(model_dir)
    assert AutoTokenizer.from_pretrained(out / "merged").convert_tokens_to_ids("<|end|>") == 5


def test_qv_only_puts_lora_on_q_and_v_slices_of_qkv(tmp_path: Path, cache_dir: Path) -> None:
    model_dir = tmp_path / "phi3"
    _write_tiny_phi3(model_dir)
    out = tmp_path / "run"
    run(out, cache_dir, f"--model={model_dir}", "--qv-only", "--max-steps=1", "--eval-steps=0")
    adapter = lora_layers.read_adapter(out / "adapter" / "adapter.safetensors")
    modules = {key.rsplit(".", 1)[0] for key in adapter.tensors}
    assert modules == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)}
    a = adapter.tensors["model.layers.0.self_attn.qkv_proj.lora_A"]
    b = adapter.tensors["model.layers.0.self_attn.qkv_proj.lora_B"]
    # q is 4 heads x 8, v is 2 kv-heads x 8: two rank-16 blocks of A, B rows for q and v only.
    assert a.shape == (2 * 16, 32)
    assert b.shape == (32 + 16, 16)


# --------------------------------------------------------------------------- pieces
def test_tokenizer_round_trips_and_knows_the_chat_markers(tmp_path: Path) -> None:
    tokenizer = tiny_phi3.build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>\nWhat is 7 * 8?<|end|>\n<|assistant|>\n56<|end|>\n<|endoftext|>"
    ids = loaded(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"]
    for marker in ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"):
        assert ids.count(loaded.convert_tokens_to_ids(marker)) >= 1
    assert len(ids) == len("\nWhat is 7 * 8?\n\n56\n") + 5  # 5 markers
    assert loaded.decode(ids) == text
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>"
    # The pretraining rows, mapped character by character, are what the tokenizer gives.
    rows = tiny_phi3._pretraining_rows(tokenizer, num_rows=3, seq_len=40, seed=0)
    for row in rows.tolist():
        assert loaded(loaded.decode(row), add_special_tokens=False)["input_ids"] == row


def test_rendering_matches_the_phi3_chat_template() -> None:
    tokenizer = tiny_phi3.build_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Multiply 2 by 3."},
        {"role": "assistant", "content": "6"},
    ]
    text, spans = chat_data.render_phi3(messages, tokenizer.eos_token)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)
    assert [text[s:e] for s, e in spans] == ["5<|end|>", "6<|end|>"]
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    assert chat_data.render_prompt(messages) == prompt


def test_loss_mask_covers_only_assistant_replies_and_their_end() -> None:
    tokenizer = tiny_phi3.build_tokenizer()
    messages = [
        {"role": "user", "content": "What is 7 * 8?"},
        {"role": "assistant", "content": "56"},
        {"role": "user", "content": "And 2 * 3?"},
        {"role": "assistant", "content": "6"},
    ]
    example = chat_data.encode(tokenizer, messages, max_seq_len=512)
    targets = [t for t in example.labels if t != chat_data.IGNORE_INDEX]
    assert tokenizer.decode(targets) == "56<|end|>6<|end|>"
    truncated = chat_data.encode(tokenizer, messages, max_seq_len=10)
    assert len(truncated.input_ids) == 10 and truncated.num_target_tokens == 0


def test_read_jsonl_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        chat_data.read_jsonl(path)


def test_shipped_dataset_is_current_and_held_out_facts_are_unseen() -> None:
    assert make_dataset.main(["--check"]) == 0
    train = chat_data.read_jsonl(finetune_phi3.DEFAULT_TRAIN_DATA)
    test = chat_data.read_jsonl(finetune_phi3.DEFAULT_EVAL_DATA)
    assert len(train) >= 400 and len(test) >= 100
    train_prompts = {c[0]["content"] for c in train}
    assert not train_prompts & {c[0]["content"] for c in test}
    size = finetune_phi3.DEFAULT_TRAIN_DATA.stat().st_size
    assert size + finetune_phi3.DEFAULT_EVAL_DATA.stat().st_size < 1_000_000


def test_help_documents_every_option() -> None:
    parser = finetune_config.build_parser()
    text = parser.format_help()
    for section, cls in finetune_config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            flag = finetune_config._flag(section, f)
            assert flag in text, flag
            assert f.metadata.get("help"), f"{section}.{f.name} has no help"


def test_config_file_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps({"training": {"max_steps": 7, "learning_rate": 0.01}, "lora": {"r": 4}})
    )
    cfg = finetune_config.parse_args([f"--config={path}", "--learning-rate=0.02", "--qv-only"])
    assert cfg.training.max_steps == 7
    assert cfg.training.learning_rate == 0.02
    assert cfg.lora.r == 4 and cfg.lora.qv_only and cfg.lora.lora_alpha == 32
    again = tmp_path / "again.json"
    again.write_text(json.dumps(cfg.to_dict()))
    assert finetune_config.parse_args([f"--config={again}"]) == cfg
    path.write_text(json.dumps({"training": {"max_step": 7}}))
    with pytest.raises(ValueError, match="max_step"):
        finetune_config.parse_args([f"--config={path}"])


def test_tiny_base_is_cached(cache_dir: Path) -> None:
    first, _, path = tiny_phi3.load_or_pretrain(TINY_BASE, cache_dir)
    second, _, again = tiny_phi3.load_or_pretrain(TINY_BASE, cache_dir)
    assert again == path and (path / "pretrain.json").is_file()
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
