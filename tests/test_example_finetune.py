"""Tests of examples/finetune_phi3.py (the main job), examples/minimal.py and the shipped base.

The fine-tune runs in-process through ``finetune_phi3.main(argv)`` on a very small base that
``make_base.py`` writes into a temporary folder (8 pretraining steps), for a few LoRA steps,
so each run takes a second or two. What the default run learns is checked by running it
(docs/finetune-phi3.md quotes the figures), not here.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import lora_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import chat_data  # noqa: E402
import checks  # noqa: E402
import finetune_config  # noqa: E402
import finetune_phi3  # noqa: E402
import make_base  # noqa: E402
import make_dataset  # noqa: E402
import minimal  # noqa: E402
import run_files  # noqa: E402
import training  # noqa: E402

TINY_BASE = make_base.TinyBaseConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    pretrain_steps=8,
    pretrain_batch_size=8,
    pretrain_seq_len=32,
)
FAST_ARGS = [
    "--batch-size=4",
    "--eval-samples=8",
    "--eval-batch-size=8",
    "--max-new-tokens=4",
    "--logging-steps=1",
    "--show-samples=2",
    "--no-progress",
]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base.make_base(TINY_BASE, tmp_path_factory.mktemp("base") / "tiny", progress=False)


def run(out_dir: Path, base: Path, *args: str) -> int:
    return finetune_phi3.main([f"--model={base}", *FAST_ARGS, f"--output-dir={out_dir}", *args])


def metrics_of(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def history_of(checkpoint: Path) -> list[dict]:
    return run_files.read_checkpoint(checkpoint)["history"]["train"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> Path:
    """One uninterrupted 6-step run, checkpointing every 3 steps."""
    out = tmp_path_factory.mktemp("six_steps") / "run"
    assert run(out, base_dir, "--max-steps=6", "--save-steps=3", "--eval-steps=3") == 0
    return out


@pytest.fixture
def earlier_run(six_steps: Path, tmp_path: Path) -> Path:
    """A copy of a finished run's folder, to run into again."""
    out = tmp_path / "earlier"
    shutil.copytree(six_steps, out)
    return out


# --------------------------------------------------------------------------- end to end
def test_smoke_run_writes_every_output(six_steps: Path) -> None:
    out = six_steps
    for name in ("config.json", "train.log", "metrics.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert (out / "merged" / "tokenizer.json").is_file()
    assert [p.name for p in run_files.list_checkpoints(out)] == ["step-000003", "step-000006"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".old" in p.name]
    metrics = metrics_of(out)
    assert metrics["steps"] == 6
    assert 0.0 <= metrics["before"]["exact_match"] <= 1.0
    assert metrics["held_out_conversations"] == 8
    assert all(set(s) == {"prompt", "expected", "before", "after"} for s in metrics["samples"])
    log = (out / "train.log").read_text()
    assert "tokens/s" in log and "held-out exact match: before" in log
    # The final lines name every output.
    tail = log[log.index("outputs:") :]
    for path in (
        out / "adapter" / "adapter.safetensors",
        out / "merged",
        out / "metrics.json",
        out / "loss_curve.png",
        out / "train.log",
    ):
        assert str(path) in tail
    history = history_of(out / "checkpoints" / "step-000006")
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_files_present_and_loadable(six_steps: Path) -> None:
    ckpt = six_steps / "checkpoints" / "step-000003"
    assert {p.name for p in ckpt.iterdir()} == {
        run_files.ADAPTER_FILE,
        run_files.STATE_FILE,
        run_files.TRAINER_JSON,
    }
    state = torch.load(ckpt / run_files.STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 3 and state["scheduler"]["last_epoch"] == 3
    assert state["optimizer"]["state"], "AdamW moments are saved"
    assert {"torch", "python"} <= set(state["rng"])
    adapter = lora_layers.read_adapter(ckpt / run_files.ADAPTER_FILE)
    assert any(key.endswith("qkv_proj.lora_A") for key in adapter.tensors)


def test_resume_continues_with_the_same_losses(six_steps: Path, tmp_path: Path, base_dir) -> None:
    shutil.copytree(
        six_steps / "checkpoints" / "step-000003", tmp_path / "checkpoints" / "step-000003"
    )
    args = ("--max-steps=6", "--save-steps=3", "--eval-steps=3", "--resume=latest")
    assert run(tmp_path, base_dir, *args) == 0
    uninterrupted = history_of(six_steps / "checkpoints" / "step-000006")
    resumed = history_of(tmp_path / "checkpoints" / "step-000006")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert b["lr"] == a["lr"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    final_a = lora_layers.read_adapter(six_steps / "adapter" / "adapter.safetensors").tensors
    final_b = lora_layers.read_adapter(tmp_path / "adapter" / "adapter.safetensors").tensors
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=1e-6)


def test_resume_latest_with_more_steps_trains_on(tmp_path: Path, base_dir: Path) -> None:
    out = tmp_path / "run"
    assert run(out, base_dir, "--max-steps=3", "--save-steps=3", "--eval-steps=0") == 0
    assert (
        run(out, base_dir, "--max-steps=5", "--save-steps=3", "--eval-steps=0", "--resume=latest")
        == 0
    )
    history = history_of(out / "checkpoints" / "step-000005")
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5]
    # Steps 4 and 5 follow the schedule stretched to the new end (warmup: 10% of 5 steps).
    schedule = training.WarmupCosine(total_steps=5, warmup_steps=round(0.1 * 5), min_ratio=0.0)
    for row in history[3:]:
        assert row["lr"] == pytest.approx(2e-3 * schedule(row["step"] - 1))
    assert metrics_of(out)["steps"] == 5
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "training 3 steps" in log  # appended, not replaced


def test_resume_latest_in_an_empty_folder_starts_fresh(tmp_path: Path, base_dir: Path) -> None:
    assert (
        run(tmp_path / "new", base_dir, "--max-steps=1", "--eval-steps=0", "--resume=latest") == 0
    )
    assert metrics_of(tmp_path / "new")["steps"] == 1


def test_overwrite_replaces_an_earlier_run(earlier_run: Path, base_dir: Path) -> None:
    (earlier_run / "notes.txt").write_text("mine")
    assert (
        run(
            earlier_run,
            base_dir,
            "--max-steps=2",
            "--save-steps=1",
            "--eval-steps=0",
            "--overwrite",
        )
        == 0
    )
    assert [p.name for p in run_files.list_checkpoints(earlier_run)] == [
        "step-000001",
        "step-000002",
    ]
    assert metrics_of(earlier_run)["steps"] == 2
    assert (earlier_run / "notes.txt").read_text() == "mine"  # not a run output: kept
    assert "--overwrite: removed" in (earlier_run / "train.log").read_text()


# --------------------------------------------------------------------------- user errors
def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


ERRORS = {
    # name: (arguments, given a scratch folder; what the one line must say)
    "earlier run": (lambda d: [], r"holds an earlier run .*--overwrite"),
    "empty data": (
        lambda d: [f"--data={_write(d / 'e.jsonl', '')}"],
        r"e\.jsonl: no conversations",
    ),
    "bad json": (
        lambda d: [
            f"--data={_write(d / 'b.jsonl', json.dumps(GOOD) + chr(10) + '{oops' + chr(10))}"
        ],
        r"b\.jsonl:2: not valid JSON",
    ),
    "missing key": (
        lambda d: [f"--data={_write(d / 'k.jsonl', json.dumps({'text': 'hi'}) + chr(10))}"],
        r'k\.jsonl:1: expected \{"messages"',
    ),
    "no assistant": (
        lambda d: [
            f"--data={_write(d / 'a.jsonl', json.dumps({'messages': [GOOD['messages'][0]]}))}"
        ],
        r"a\.jsonl:1: .*no assistant message",
    ),
    "missing file": (lambda d: [f"--data={d / 'nope.jsonl'}"], r"nope\.jsonl' does not exist"),
    "bad setting": (lambda d: ["--learning-rate=-1"], r"learning_rate must be positive, got -1"),
    "bad config file": (
        lambda d: [f"--config={_write(d / 'c.json', '{' + chr(10) + '  max_steps: 3}')}"],
        r"c\.json:2: not valid JSON",
    ),
    "missing model": (
        lambda d: [f"--model={d / 'no-model'}"],
        r"no-model' is not a local checkpoint",
    ),
    "missing checkpoint": (
        lambda d: ["--resume=checkpoints/step-000200"],
        r"not a checkpoint directory; checkpoints: .*step-000003, .*step-000006",
    ),
    "changed setting": (
        lambda d: ["--resume=latest", "--learning-rate=0.01"],
        r"cannot resume .*training\.learning_rate: checkpoint 0\.002, now 0\.01",
    ),
    "resume past the end": (lambda d: ["--resume=latest", "--max-steps=4"], r"past this run's end"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_user_error_is_one_line_exit_2_and_changes_nothing(
    name: str, earlier_run: Path, base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_args, message = ERRORS[name]
    args = [a.replace("checkpoints/", f"{earlier_run}/checkpoints/") for a in make_args(tmp_path)]
    if name not in ("earlier run", "missing checkpoint", "changed setting", "resume past the end"):
        args.append("--overwrite")  # a bad input must stop even a run allowed to overwrite
    before = snapshot(earlier_run)
    capsys.readouterr()
    code = run(earlier_run, base_dir, "--max-steps=6", "--save-steps=3", "--eval-steps=3", *args)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("finetune_phi3.py: error: ")
    assert re.search(message, err), err
    assert snapshot(earlier_run) == before  # every file of the earlier run byte-identical


def test_user_error_in_a_new_folder_goes_to_train_log(tmp_path: Path, base_dir: Path) -> None:
    empty = _write(tmp_path / "empty.jsonl", "")
    assert run(tmp_path / "new", base_dir, f"--data={empty}") == 2
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["train.log"]
    assert "ERROR error: " in (tmp_path / "new" / "train.log").read_text()


def test_debug_shows_the_traceback(tmp_path: Path, base_dir: Path) -> None:
    with pytest.raises(finetune_config.UserError, match="does not exist"):
        run(tmp_path / "new", base_dir, f"--data={tmp_path / 'nope.jsonl'}", "--debug")


def test_cli_failed_run_leaves_the_earlier_run_byte_identical(
    earlier_run: Path, tmp_path: Path
) -> None:
    # The acceptance check, as a user runs it: a second run with an empty data file.
    empty = _write(tmp_path / "empty.jsonl", "")
    before = snapshot(earlier_run)
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "finetune_phi3.py"),
            f"--data={empty}",
            f"--output-dir={earlier_run}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(earlier_run) == before


def test_help_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import finetune_phi3\n"
        "try:\n    finetune_phi3.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted({'torch', 'transformers', 'lora_layers'} & set(sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "--resume DIR|latest" in proc.stdout and "--overwrite" in proc.stdout


# --------------------------------------------------------------------------- warnings and extras
def test_missing_matplotlib_warns_at_start_and_skips_the_plot(
    tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert run(tmp_path, base_dir, "--max-steps=1", "--eval-steps=0") == 0
    log = (tmp_path / "train.log").read_text()
    assert log.index("matplotlib is not installed") < log.index("evaluating the base model")
    assert not (tmp_path / "loss_curve.png").exists()
    assert (tmp_path / "metrics.json").is_file()


def test_unknown_characters_are_counted_with_examples(tmp_path: Path, base_dir: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"caf\u00e9 {i} \u2192"},
                {"role": "assistant", "content": "\u00e9"},
            ]
        }
        for i in range(10)
    ]
    data = _write(tmp_path / "u.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert run(tmp_path / "out", base_dir, f"--data={data}", "--max-steps=1", "--eval-steps=0") == 0
    log = (tmp_path / "out" / "train.log").read_text()
    assert "30 characters of the data (2 distinct) have no token and become <unk>" in log
    assert "'\u00e9' x20" in log and "'\u2192' x10" in log


def test_no_progress_silences_every_bar(
    tmp_path: Path, base_dir: Path, capfd: pytest.CaptureFixture
) -> None:
    assert run(tmp_path, base_dir, "--max-steps=1", "--eval-steps=0") == 0
    out, err = capfd.readouterr()
    assert "it/s" not in out + err and "%|" not in out + err


def test_generate_stops_at_end_for_adapter_and_merged_models(
    six_steps: Path, base_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(six_steps / "merged")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    adapter_model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora_layers.load_lora(adapter_model, six_steps / "adapter" / "adapter.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(six_steps / "merged")
    prompt = tokenizer("<|user|>\nWhat is 2 + 3?<|end|>\n<|assistant|>\n", return_tensors="pt")
    for model in (adapter_model, merged):
        assert end in model.generation_config.eos_token_id
        # A head that always prefers <|end|>: generation must stop after one token.
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)
        torch.nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.zero_()[end] = 10.0
        model.lm_head = head
        out = model.eval().generate(**prompt, max_new_tokens=5, do_sample=False)
        assert out[0, prompt["input_ids"].shape[1] :].tolist() == [end]


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path, base_dir: Path) -> None:
    # Micro-batch k holds examples k*B ... (k+1)*B-1 of the data order, so 2 x 4 covers the
    # same 8 conversations as 1 x 8; the loss is normalised by the whole step's targets.
    common = ("--max-steps=2", "--eval-steps=0", "--save-steps=0", "--lora-dropout=0")
    assert run(tmp_path / "big", base_dir, *common, "--batch-size=8") == 0
    acc = ("--batch-size=4", "--gradient-accumulation-steps=2")
    assert run(tmp_path / "acc", base_dir, *common, *acc) == 0
    big, accumulated = metrics_of(tmp_path / "big"), metrics_of(tmp_path / "acc")
    assert accumulated["after"]["loss"] == pytest.approx(big["after"]["loss"], rel=1e-5)
    a = lora_layers.read_adapter(tmp_path / "big" / "adapter" / "adapter.safetensors").tensors
    b = lora_layers.read_adapter(tmp_path / "acc" / "adapter" / "adapter.safetensors").tensors
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_merged_model_logits_equal_adapter_model(six_steps: Path, base_dir: Path) -> None:
    assert metrics_of(six_steps)["merged_max_abs_logit_diff"] < 1e-5
    # Independently, from the files: the base plus the saved adapter vs the saved merged model.
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    lora_layers.load_lora(base, six_steps / "adapter" / "adapter.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(six_steps / "merged").eval()
    assert not any(isinstance(m, lora_layers.LoRALayer) for m in merged.modules())
    conversations = chat_data.read_jsonl(checks.DEFAULT_EVAL_DATA)[:4]
    batch = chat_data.collate(
        [chat_data.encode(tokenizer, c, 512) for c in conversations], tokenizer.pad_token_id
    )
    with torch.no_grad():
        adapter_logits = base(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged_logits = merged(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(merged_logits[mask], adapter_logits[mask], rtol=0, atol=1e-5)


def test_own_data_with_a_system_prompt_and_a_split(tmp_path: Path, base_dir: Path) -> None:
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
    data = _write(tmp_path / "chats.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert run(out, base_dir, f"--data={data}", "--max-steps=2", "--eval-steps=0") == 0
    metrics = metrics_of(out)
    assert metrics["held_out_conversations"] == 2  # --eval-fraction 0.1 of 20
    assert metrics["merged_max_abs_logit_diff"] < 1e-5
    assert json.loads((out / "config.json").read_text())["training"]["model"] == str(base_dir)


def test_qv_only_puts_lora_on_q_and_v_slices_of_qkv(tmp_path: Path, base_dir: Path) -> None:
    assert run(tmp_path, base_dir, "--qv-only", "--max-steps=1", "--eval-steps=0") == 0
    adapter = lora_layers.read_adapter(tmp_path / "adapter" / "adapter.safetensors")
    assert {key.rsplit(".", 1)[0] for key in adapter.tensors} == {
        f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)
    }
    # q is 4 heads x 8, v is 2 kv-heads x 8: two rank-16 blocks of A, B rows for q and v only.
    assert adapter.tensors["model.layers.0.self_attn.qkv_proj.lora_A"].shape == (2 * 16, 32)
    assert adapter.tensors["model.layers.0.self_attn.qkv_proj.lora_B"].shape == (32 + 16, 16)


# --------------------------------------------------------------------------- minimal.py, the base
def test_minimal_example_trains_saves_and_merges(tmp_path: Path) -> None:
    assert len((EXAMPLES / "minimal.py").read_text().splitlines()) <= 80
    losses = minimal.main(["--steps=4", f"--out-dir={tmp_path}"])
    assert losses[-1] < losses[0]
    adapter = lora_layers.read_adapter(tmp_path / "adapter.safetensors")
    assert any(key.endswith("gate_up_proj.lora_B") for key in adapter.tensors)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, lora_layers.LoRALayer) for m in merged.modules())


def test_shipped_base_is_small_and_stops_at_end() -> None:
    base = finetune_config.BASE_MODEL_DIR
    size = sum(p.stat().st_size for p in base.iterdir())
    assert size < 5_000_000
    info = json.loads((base / "make_base.json").read_text())
    assert info["config"] == dataclasses.asdict(make_base.TinyBaseConfig())
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.config.model_type == "phi3"
    assert set(model.generation_config.eos_token_id) == {
        tokenizer.convert_tokens_to_ids("<|end|>"),
        tokenizer.eos_token_id,
    }


def test_make_base_is_deterministic(base_dir: Path, tmp_path: Path) -> None:
    again = make_base.make_base(TINY_BASE, tmp_path / "again", progress=False)
    assert (again / "model.safetensors").read_bytes() == (
        base_dir / "model.safetensors"
    ).read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (base_dir / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------- pieces
def test_tokenizer_round_trips_and_knows_the_chat_markers(tmp_path: Path) -> None:
    tokenizer = make_base.build_tokenizer()
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
    rows = make_base._pretraining_rows(tokenizer, num_rows=3, seq_len=40, seed=0)
    for row in rows.tolist():
        assert loaded(loaded.decode(row), add_special_tokens=False)["input_ids"] == row


def test_rendering_matches_the_phi3_chat_template() -> None:
    tokenizer = make_base.build_tokenizer()
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
    tokenizer = make_base.build_tokenizer()
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


def test_shipped_dataset_is_current_and_held_out_facts_are_unseen() -> None:
    assert make_dataset.main(["--check"]) == 0
    train = chat_data.read_jsonl(checks.DEFAULT_TRAIN_DATA)
    test = chat_data.read_jsonl(checks.DEFAULT_EVAL_DATA)
    assert len(train) >= 400 and len(test) >= 100
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in test}


def test_help_documents_every_option() -> None:
    text = finetune_config.build_parser().format_help()
    for section, cls in finetune_config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert finetune_config._flag(section, f) in text
            assert f.metadata.get("help"), f"{section}.{f.name} has no help"


def test_config_file_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps({"training": {"max_steps": 7, "learning_rate": 0.01}, "lora": {"r": 4}})
    )
    cfg = finetune_config.parse_args([f"--config={path}", "--learning-rate=0.02", "--qv-only"])
    assert cfg.training.max_steps == 7 and cfg.training.learning_rate == 0.02
    assert cfg.lora.r == 4 and cfg.lora.qv_only and cfg.lora.lora_alpha == 32
    again = tmp_path / "again.json"
    again.write_text(json.dumps(cfg.to_dict()))
    assert finetune_config.parse_args([f"--config={again}"]) == cfg
    path.write_text(json.dumps({"training": {"max_step": 7}}))
    with pytest.raises(finetune_config.UserError, match="max_step"):
        finetune_config.parse_args([f"--config={path}"])


def test_examples_stay_readable() -> None:
    # No file over 800 lines, no function body over 80 (docstring excluded).
    for path in EXAMPLES.glob("*.py"):
        source = path.read_text()
        assert len(source.splitlines()) <= 800, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                length = body[-1].end_lineno - body[0].lineno + 1
                assert length <= 80, f"{path.name}:{node.lineno} {node.name}: {length} lines"
