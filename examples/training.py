"""The fine-tune's training loop pieces: schedule, data order, loss, one step, evaluation.

Nothing here knows about LoRA: the loop trains whatever parameters require grad, which after
``lora_layers.inject_lora`` are exactly the LoRA ones.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import chat_data
import torch
import torch.nn.functional as F
from torch import nn

Autocast = Callable[[], ContextManager]


# --------------------------------------------------------------------------- devices and dtypes
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps if available, else cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` is a GPU with fast bf16."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_context(setting: str, device: torch.device) -> Autocast:
    """A factory of bf16 autocast contexts per ``--autocast`` (auto: on for bf16 GPUs)."""
    if setting == "on" or (setting == "auto" and bf16_supported(device)):
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


# --------------------------------------------------------------------------- schedule, data order
@dataclass(frozen=True)
class WarmupCosine:
    """Learning-rate factor: linear warmup to 1, then cosine decay to ``min_ratio``.

    A callable object (not a lambda) so ``LambdaLR.state_dict()`` records it.
    """

    total_steps: int
    warmup_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, progress)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DataOrder:
    """Which examples make up each micro-batch: a fresh seeded permutation every epoch.

    Micro-batch ``k`` is positions ``k * batch_size ... (k + 1) * batch_size - 1`` of the
    endless concatenation of the epoch permutations, so the order depends only on the seed
    and ``k``: a resumed run sees exactly the batches the uninterrupted run would have.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_examples, generator=generator).tolist()
            # Keep this epoch and the previous one: a micro-batch may straddle the boundary.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm
        return self._perms[epoch]

    def micro_batch(self, k: int) -> list[int]:
        """Example indices of micro-batch ``k``."""
        positions = range(k * self.batch_size, (k + 1) * self.batch_size)
        return [self._perm(p // self.num_examples)[p % self.num_examples] for p in positions]


def rng_state() -> dict[str, Any]:
    """Every RNG state a resumed run must restore (torch, Python, CUDA)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- loss and one step
def loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], autocast: Autocast
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's target tokens, and their number."""
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at position t-1
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=chat_data.IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((targets != chat_data.IGNORE_INDEX).sum())


def train_step(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
    autocast: Autocast,
) -> dict[str, float]:
    """One optimizer step over its micro-batches (gradient accumulation).

    The loss is normalised by the target tokens of the whole step, so accumulating ``k``
    micro-batches of ``B`` equals one batch of ``k * B``.

    Returns:
        ``loss`` (per target token), ``lr`` (the one this step used), ``grad_norm`` (before
        clipping; NaN when not clipping) and ``tokens`` (non-padding tokens seen).
    """
    n_targets = sum(
        int((b["labels"][:, 1:] != chat_data.IGNORE_INDEX).sum()) for b in micro_batches
    )
    loss_total, tokens = 0.0, 0
    for batch in micro_batches:
        loss, _ = loss_sum(model, batch, autocast)
        (loss / max(1, n_targets)).backward()
        loss_total += loss.item()
        tokens += int(batch["attention_mask"].sum())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float("nan")
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss_total / max(1, n_targets),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
    }


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def held_out_loss(
    model: nn.Module,
    examples: list[chat_data.Example],
    pad_token_id: int,
    batch_size: int,
    autocast: Autocast,
) -> float:
    """Mean cross-entropy per target token over ``examples`` (eval mode; mode restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = chat_data.collate(examples[i : i + batch_size], pad_token_id, device)
            loss, n = loss_sum(model, batch, autocast)
            total += loss.item()
            count += n
    finally:
        model.train(was_training)
    return total / max(1, count)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    conversations: list[chat_data.Conversation],
    examples: list[chat_data.Example],
    max_new_tokens: int,
    batch_size: int,
    autocast: Autocast,
) -> dict[str, Any]:
    """Held-out loss, greedy replies and their exact-match accuracy.

    Returns:
        ``{"loss", "exact_match", "replies"}``.
    """
    loss = held_out_loss(model, examples, tokenizer.pad_token_id, batch_size, autocast)
    replies = chat_data.generate_replies(
        model, tokenizer, conversations, max_new_tokens, batch_size, autocast
    )
    references = [chat_data.reference_answer(c) for c in conversations]
    return {
        "loss": loss,
        "exact_match": chat_data.exact_match(replies, references),
        "replies": replies,
    }
