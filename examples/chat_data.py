"""Chat data for the Phi-3 fine-tune: reading JSONL, Phi-3's chat format, masking, batching.

A conversation is a list of ``{"role": ..., "content": ...}`` messages (``system``, ``user``,
``assistant``). It is rendered exactly as Phi-3-mini-4k-instruct's chat template renders it::

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n<|endoftext|>

The loss covers the assistant replies and the ``<|end|>`` after each (so the model learns to
stop); every other token (prompts, markers, padding) gets label ``-100``. Which tokens those
are is read from the tokenizer's character offsets, so this works for any fast tokenizer
(the tiny character-level one and Phi-3's SentencePiece one alike).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
END = "<|end|>"
ASSISTANT = "<|assistant|>"

Conversation = list[dict[str, str]]


def read_jsonl(path: str | Path) -> list[Conversation]:
    """Reads chat conversations, one JSON object ``{"messages": [...]}`` per line.

    Blank lines are skipped; other keys of a record (e.g. ``"task"``) are ignored.

    Args:
        path: The JSONL file.

    Returns:
        The conversations, in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If a line is not valid JSON, has no ``messages`` list, has a message with
            an unknown role or non-string content, or has no assistant message, or the file
            holds no conversation. The one-line message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data file {str(path)!r} does not exist")
    if path.suffix == ".json":
        raise ValueError(f"{path}: expected JSON Lines (.jsonl), one conversation per line")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        lineno = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 text ({err.reason})") from None
    conversations = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f'{where}: expected {{"messages": [...]}}, got {line[:80]!r}')
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ValueError(f"{where}: every message needs a role in {ROLES}, got {message!r}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"{where}: message content must be a string: {message!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: the conversation has no assistant message to learn")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise ValueError(f'{path}: no conversations (expected one {{"messages": [...]}} per line)')
    return conversations


def unknown_characters(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation]
) -> dict[str, int]:
    """Characters of the message texts that the tokenizer maps to its unknown token.

    Args:
        tokenizer: A fast tokenizer (it must return offsets).
        conversations: The conversations.

    Returns:
        ``{character: occurrences}``, empty when every character has a token (always so
        for a byte-fallback tokenizer such as Phi-3's).
    """
    unk = tokenizer.unk_token_id
    texts = [m["content"] for c in conversations for m in c]
    if unk is None or not texts:
        return {}
    counts: dict[str, int] = {}
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        for token_id, (start, end) in zip(ids, offsets, strict=True):
            if token_id == unk:
                for char in text[start:end]:
                    counts[char] = counts.get(char, 0) + 1
    return counts


def render_phi3(messages: Sequence[dict[str, str]], eos_token: str) -> tuple[str, list]:
    """Renders a conversation in Phi-3's chat format and finds the spans to train on.

    Args:
        messages: The conversation.
        eos_token: The tokenizer's eos token (``<|endoftext|>`` for Phi-3), which the template
            appends after the last turn.

    Returns:
        ``(text, spans)``: the rendered text and the ``(start, end)`` character spans of every
        assistant reply together with its closing ``<|end|>``.
    """
    text = ""
    spans = []
    for message in messages:
        text += f"<|{message['role']}|>\n"
        if message["role"] == "assistant":
            start = len(text)
            text += message["content"] + END
            spans.append((start, len(text)))
        else:
            text += message["content"] + END
        text += "\n"
    return text + eos_token, spans


def render_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The generation prompt for a conversation's last assistant reply.

    Args:
        messages: A conversation ending with an assistant message.

    Returns:
        Everything before that reply, ending with ``<|assistant|>\\n``, as Phi-3's template
        renders it with ``add_generation_prompt=True``.
    """
    text, _ = render_phi3(messages[:-1], eos_token="")
    return text + f"{ASSISTANT}\n"


def reference_answer(messages: Sequence[dict[str, str]]) -> str:
    """The last assistant reply of a conversation (what exact match compares against)."""
    return messages[-1]["content"]


@dataclass(frozen=True)
class Example:
    """One tokenized conversation.

    Attributes:
        input_ids: Token ids of the rendered conversation.
        labels: Same length; the token id where the loss applies, else ``IGNORE_INDEX``.
    """

    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        """How many tokens carry loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], max_seq_len: int
) -> Example:
    """Tokenizes a conversation with loss only on the assistant replies (and their ``<|end|>``).

    A token is a target if any of its characters lies in an assistant span; tokens the
    tokenizer adds itself (e.g. a bos) have empty offsets and are never targets.

    Args:
        tokenizer: A fast tokenizer (it must return offsets) that knows Phi-3's chat tokens.
        messages: The conversation.
        max_seq_len: Longer conversations are cut to this many tokens.

    Returns:
        The example.

    Raises:
        ValueError: If the tokenizer cannot return character offsets (a slow tokenizer).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; loss masking needs character "
            "offsets, which only fast tokenizers (tokenizer.json) provide"
        )
    text, spans = render_phi3(messages, tokenizer.eos_token or "")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = enc["input_ids"][:max_seq_len]
    labels = []
    for token_id, (start, end) in zip(ids, enc["offset_mapping"], strict=False):
        inside = end > start and any(start < s_end and s_start < end for s_start, s_end in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return Example(input_ids=ids, labels=labels)


def collate(
    examples: Sequence[Example], pad_token_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-pads examples into a batch.

    Args:
        examples: The examples of one micro-batch.
        pad_token_id: Id written into the padding (its labels are ``IGNORE_INDEX``).
        device: Where to put the tensors.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)`` with ``T`` the
        longest example.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


def set_stop_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Makes ``model.generate()`` stop at ``<|end|>`` (and the eos), and saves that with it.

    Phi-3-mini-4k-instruct's generation config already lists ``<|end|>``; a checkpoint whose
    config lists only ``<|endoftext|>`` would otherwise run on past the end of a reply.
    """
    configured = model.generation_config.eos_token_id
    configured = [] if configured is None else configured
    configured = [configured] if isinstance(configured, int) else list(configured)
    missing = [i for i in stop_token_ids(tokenizer) if i not in configured]
    if missing:
        model.generation_config.eos_token_id = configured + missing


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generated reply: ``<|end|>`` and the eos token.

    Raises:
        ValueError: If the tokenizer has no ``<|end|>`` token (not a Phi-3 tokenizer).
    """
    end_id = tokenizer.convert_tokens_to_ids(END)
    if end_id is None or end_id == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer has no {END!r} token; Phi-3's chat format needs <|user|>, "
            "<|assistant|> and <|end|> as special tokens (use a Phi-3 tokenizer)"
        )
    ids = [end_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id != end_id:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation],
    max_new_tokens: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> list[str]:
    """Greedy replies to each conversation's last user turn.

    Args:
        model: A causal LM (in eval mode while this runs; its mode is restored).
        tokenizer: Its tokenizer.
        conversations: Conversations ending with the reference assistant reply, which is
            dropped from the prompt.
        max_new_tokens: Longest reply.
        batch_size: Prompts per ``generate`` call (left-padded).
        autocast: A factory of the context to run under, e.g. a ``torch.autocast`` partial.

    Returns:
        The decoded replies, special tokens removed, stripped of surrounding whitespace.
    """
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies = []
    try:
        for i in range(0, len(conversations), batch_size):
            prompts = [render_prompt(c) for c in conversations[i : i + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            with autocast():
                out = model.generate(**enc, generation_config=config)
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            replies.extend(t.strip() for t in texts)
    finally:
        tokenizer.padding_side = previous_side
        model.train(was_training)
    return replies


def normalize_answer(text: str) -> str:
    """Whitespace-normalized text: what exact match compares."""
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after :func:`normalize_answer`.

    Raises:
        ValueError: If the two sequences differ in length or are empty.
    """
    if len(predictions) != len(references) or not references:
        raise ValueError(
            f"need as many predictions as references (and at least one), got "
            f"{len(predictions)} and {len(references)}"
        )
    hits = sum(
        normalize_answer(p) == normalize_answer(r)
        for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(references)
