"""Writes the shipped pretrained tiny Phi-3 (examples/tiny-phi3-base/): deterministic.

The default fine-tune needs a base model that already knows something, without downloading
one; this script made the one in the repository (a few MB), so the fine-tune is the whole
default run. It builds

* a character-level ``PreTrainedTokenizerFast`` (printable ASCII plus Phi-3's special tokens
  ``<|endoftext|>``, ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``, with Phi-3's
  chat template), which ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip;
* a ``Phi3ForCausalLM`` from a small ``Phi3Config`` (same architecture as Phi-3-mini: fused
  ``qkv_proj`` and ``gate_up_proj``, RoPE, RMSNorm, SwiGLU; just narrower and shallower);
* a full-parameter pretraining run on plain fact sentences from :mod:`toy_tasks`, never on
  chat-formatted text, so the base learns the facts but not to follow instructions.

and saves the model and tokenizer with ``save_pretrained``, plus ``make_base.json`` (the
settings, the final pretraining loss, the versions used). The run is seeded and uses one CPU
thread, so on one machine it writes the same weights every time; other CPUs or library
versions may round differently, which is why the result is shipped rather than rebuilt::

    python examples/make_base.py                    # rewrite examples/tiny-phi3-base (~2 min idle)
    python examples/make_base.py --out-dir /tmp/b   # somewhere else
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import toy_tasks
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

OUT_DIR = Path(__file__).resolve().parent / "tiny-phi3-base"

#: Phi-3-mini-4k-instruct's chat template (system, user and assistant turns).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

UNK_TOKEN = "<unk>"
EOS_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (UNK_TOKEN, EOS_TOKEN, *CHAT_TOKENS)
CHARACTERS = tuple(sorted(set(string.printable) - set("\t\r\x0b\x0c")))
"""Every printable ASCII character, newline and space included: one token each."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Builds the character-level tokenizer with Phi-3's special tokens and chat template.

    Special tokens come first (ids 0-5: ``<unk>``, ``<|endoftext|>``, then the chat markers),
    then one token per printable ASCII character. ``<|endoftext|>`` is the eos and pad token,
    as in Phi-3. Unknown characters map to ``<unk>``.

    Returns:
        A tokenizer that ``save_pretrained`` writes and ``AutoTokenizer`` reads back.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS),
    )
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class TinyBaseConfig:
    """Size of the tiny Phi-3 and its pretraining run.

    Attributes:
        hidden_size: Model width.
        num_hidden_layers: Decoder layers.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (fewer than query heads = grouped-query attention).
        intermediate_size: MLP width (``gate_up_proj`` outputs twice this).
        pretrain_steps: Full-parameter optimizer steps on the plain fact sentences.
        pretrain_batch_size: Rows per pretraining step.
        pretrain_seq_len: Tokens per pretraining row.
        pretrain_lr: Peak AdamW learning rate (warmup, then cosine to 10%).
        seed: Seed of the initial weights and of the pretraining text.
    """

    hidden_size: int = field(default=128, metadata={"help": "model width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "query heads"})
    num_key_value_heads: int = field(
        default=4, metadata={"help": "key/value heads (fewer = grouped-query)"}
    )
    intermediate_size: int = field(default=256, metadata={"help": "MLP width"})
    pretrain_steps: int = field(default=1000, metadata={"help": "pretraining optimizer steps"})
    pretrain_batch_size: int = field(default=32, metadata={"help": "pretraining rows"})
    pretrain_seq_len: int = field(default=64, metadata={"help": "tokens per row"})
    pretrain_lr: float = field(default=2e-3, metadata={"help": "peak pretraining lr"})
    seed: int = field(default=0, metadata={"help": "seed of weights and text"})

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "pretrain_batch_size",
            "pretrain_seq_len",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"tiny base {name} must be positive, got {getattr(self, name)}")
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be >= 0, got {self.pretrain_steps}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.pretrain_lr <= 0:
            raise ValueError(f"pretrain_lr must be positive, got {self.pretrain_lr}")


def phi3_config(cfg: TinyBaseConfig, tokenizer: PreTrainedTokenizerBase) -> Phi3Config:
    """The ``Phi3Config`` of the tiny base.

    Args:
        cfg: Sizes.
        tokenizer: The tokenizer from :func:`build_tokenizer` (vocabulary and special ids).

    Returns:
        A Phi-3 config with Phi-3-mini's architecture and the tiny sizes.
    """
    return Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _pretraining_rows(
    tokenizer: PreTrainedTokenizerBase, num_rows: int, seq_len: int, seed: int
) -> torch.Tensor:
    """Rows of ``seq_len`` tokens, each starting at a sentence start (sentences end in ``\\n``).

    The tokenizer is character-level (one token per character, see :func:`build_tokenizer`),
    so the sentences are mapped character by character: the same ids as calling the
    tokenizer, ten times faster.
    """
    vocab = tokenizer.get_vocab()
    sentences = toy_tasks.pretraining_sentences(seed)
    rows = []
    for _ in range(num_rows):
        ids: list[int] = []
        while len(ids) < seq_len:
            ids.extend(vocab[char] for char in next(sentences) + "\n")
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


def pretrain(
    model: Phi3ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TinyBaseConfig,
    progress: bool = True,
) -> list[float]:
    """Trains every parameter of ``model`` on the plain fact sentences (next-token loss).

    AdamW (betas 0.9/0.95, weight decay 0.1), linear warmup over 5% of the steps, cosine decay
    to 10% of ``cfg.pretrain_lr``, gradient clipping at 1.0. CPU-friendly fp32.

    Args:
        model: The freshly initialised tiny Phi-3, modified in place.
        tokenizer: Its tokenizer.
        cfg: Steps, batch shape, learning rate and seed.
        progress: Show a tqdm progress bar.

    Returns:
        The training loss of every step.
    """
    from tqdm.auto import tqdm

    steps = cfg.pretrain_steps
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress_frac))

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rows = _pretraining_rows(
        tokenizer, steps * cfg.pretrain_batch_size, cfg.pretrain_seq_len, cfg.seed
    )
    device = next(model.parameters()).device
    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(
        range(steps), desc="pretrain tiny base", disable=not progress, leave=False, mininterval=1.0
    )
    for step in bar:
        batch = rows[step * cfg.pretrain_batch_size : (step + 1) * cfg.pretrain_batch_size]
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % 250 == 0 or step == steps - 1:
            mean = sum(losses[-50:]) / len(losses[-50:])
            print(
                f"step {step + 1}/{steps}  loss {mean:.4f}  ({time.perf_counter() - start:.0f} s)"
            )
    model.eval()
    return losses


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``<|end|>`` (the end of every chat turn) and ``<|endoftext|>``: where generation stops."""
    return [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]


def make_base(cfg: TinyBaseConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Builds, pretrains and saves the tiny base (one CPU thread, seeded).

    The folder is written under a temporary name and renamed, so it is never half written.
    Its ``generation_config.json`` stops generation at ``<|end|>`` as well as at the eos, as
    Phi-3-mini-4k-instruct's does.

    Args:
        cfg: Sizes and pretraining settings.
        out_dir: The folder to (re)write.
        progress: Show a progress bar.

    Returns:
        The folder: a ``save_pretrained`` checkpoint ``from_pretrained`` loads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every run
    try:
        tokenizer = build_tokenizer()
        torch.manual_seed(cfg.seed)
        model = Phi3ForCausalLM(phi3_config(cfg, tokenizer))
        start = time.perf_counter()
        losses = pretrain(model, tokenizer, cfg, progress=progress)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    import transformers

    summary = {
        "config": dataclasses.asdict(cfg),
        "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (tmp / "make_base.json").write_text(json.dumps(summary, indent=2) + "\n")
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--out-dir`` and one flag per :class:`TinyBaseConfig` field."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="folder to write")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TinyBaseConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f.metadata["help"],
        )
    args = vars(parser.parse_args(argv))
    out_dir, progress = args.pop("out_dir"), not args.pop("no_progress")
    try:
        cfg = TinyBaseConfig(**args)
    except ValueError as err:
        parser.error(str(err))
    path = make_base(cfg, out_dir, progress=progress)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
