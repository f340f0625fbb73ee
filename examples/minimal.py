"""A LoRA fine-tune of Phi-3 at its simplest: the file to copy into your project.

    python examples/minimal.py                  # the shipped tiny Phi-3, a few seconds on CPU
    python examples/minimal.py --model DIR      # a local Phi-3 checkpoint, e.g. Phi-3-mini

Load a Phi-3, put LoRA on it, train on a few chat examples, save the adapter, merge.
examples/finetune_phi3.py is the full recipe (data files, evaluation, checkpoints, resume).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora_layers

TINY_PHI3 = Path(__file__).resolve().parent / "tiny-phi3-base"
CHATS = [("What is 2 + 3?", "5"), ("Add 4 and 4.", "8"), ("Which letter comes after c?", "d")]


def encode(tokenizer, question: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3's chat format; the loss covers only the answer and its closing <|end|>."""
    chat = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + "<|end|>", add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + answer_ids  # -100: no loss on the prompt
    return torch.tensor([prompt_ids + answer_ids]), torch.tensor([labels])


def main(argv: list[str] | None = None) -> list[float]:
    """Trains, saves and merges; returns the mean loss of every step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TINY_PHI3, help="local Phi-3 folder")
    parser.add_argument("--steps", type=int, default=30, help="passes over the examples")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/minimal"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # LoRA on every linear layer but the head; every other parameter is frozen.
    lora_layers.inject_lora(model, "all-linear", r=16, lora_alpha=32, lora_dropout=0.05)
    print("trainable, total parameters:", lora_layers.count_parameters(model))
    data = [encode(tokenizer, q, a) for q, a in CHATS]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    losses = []
    for step in range(args.steps):
        total = 0.0
        for input_ids, labels in data:  # one conversation per batch: no padding needed
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / len(data))
        print(f"step {step + 1}: loss {losses[-1]:.4f}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    lora_layers.save_lora(model, args.out_dir / "adapter.safetensors")  # the adapter alone
    model = lora_layers.merge_and_unload(model).eval()  # plain Phi-3, LoRA merged in
    model.save_pretrained(args.out_dir / "merged")
    tokenizer.save_pretrained(args.out_dir / "merged")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHATS[0][0]}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    reply = model.generate(**inputs, max_new_tokens=8, do_sample=False)  # stops at <|end|>
    print(CHATS[0][0], "->", tokenizer.decode(reply[0, inputs["input_ids"].shape[1] :]))
    return losses


if __name__ == "__main__":
    main()
