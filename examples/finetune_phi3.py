"""Fine-tune Phi-3 with LoRA on a chat-instruction dataset, in a plain PyTorch loop.

The classic Phi-3 LoRA recipe (a training config and a LoRA config; load the model and its
tokenizer; fine-tune on chat data; monitor; evaluate; save checkpoints) on lora_layers, with
no Trainer::

    python examples/finetune_phi3.py                       # everything local, a few minutes on CPU
    python examples/finetune_phi3.py --config run.json     # a saved config (see config.json)
    python examples/finetune_phi3.py --model ~/models/Phi-3-mini-4k-instruct --data chats.jsonl
    python examples/finetune_phi3.py --resume latest       # continue the run in --output-dir

With no arguments it builds a tiny Phi-3 and a character-level tokenizer locally, pretrains
the model briefly on plain arithmetic and alphabet sentences (cached in examples/.cache/),
then freezes it and teaches it, with LoRA, to answer the shipped chat instructions
(examples/data/). It prints the held-out exact-match accuracy before and after. See
docs/finetune-phi3.md for a walkthrough; ``--help`` lists every option.

The settings (``TrainingConfig``, ``LoRAConfig``, the command line) are in finetune_config.py,
the chat format and data handling in chat_data.py, the tiny base in tiny_phi3.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chat_data
import tiny_phi3
import torch
import torch.nn.functional as F
from finetune_config import (
    DTYPES,
    RESUMABLE_CHANGES,
    LoRAConfig,
    RunConfig,
    TrainingConfig,
    parse_args,
)
from torch import nn

import lora_layers

EXAMPLES_DIR = Path(__file__).resolve().parent
DATA_DIR = EXAMPLES_DIR / "data"
DEFAULT_TRAIN_DATA = DATA_DIR / "toy_chat_train.jsonl"
DEFAULT_EVAL_DATA = DATA_DIR / "toy_chat_test.jsonl"

logger = logging.getLogger("finetune_phi3")

CHECKPOINTS = "checkpoints"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"
TRAINER_JSON = "trainer_state.json"


# --------------------------------------------------------------------------- setup helpers
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps if available, else cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype:
    """The base weights' dtype: ``--dtype``, or for ``auto`` bf16 for a real model on a bf16 GPU."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if cfg.model is not None and _bf16_supported(device):
        return torch.bfloat16
    return torch.float32


def autocast_context(cfg: TrainingConfig, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of bf16 autocast contexts per ``--autocast`` (auto: on for bf16 GPUs).

    Returns:
        A callable returning a fresh context manager: ``torch.autocast`` when enabled, else
        ``contextlib.nullcontext``.
    """
    enabled = cfg.autocast == "on" or (cfg.autocast == "auto" and _bf16_supported(device))
    if not enabled:
        return nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def load_model(cfg: RunConfig, device: torch.device) -> tuple[nn.Module, Any, str]:
    """Loads ``--model`` from its local directory, or the cached/pretrained tiny base.

    Args:
        cfg: The run config.
        device: Where the model goes.

    Returns:
        ``(model, tokenizer, source)``; the model is in eval mode, ``source`` names where it
        came from.

    Raises:
        FileNotFoundError: If ``--model`` is not a directory with a ``config.json``.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tc = cfg.training
    dtype = resolve_dtype(tc, device)
    if tc.model is None:
        model, tokenizer, path = tiny_phi3.load_or_pretrain(
            cfg.tiny_base,
            tc.cache_dir,
            device=device,
            progress=tc.progress,
            attn_implementation=tc.attn_implementation,
        )
        return model.to(dtype=dtype).eval(), tokenizer, f"tiny Phi-3 ({path})"

    path = Path(tc.model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {str(path)!r} is not a local checkpoint directory (no config.json); "
            "download one first, e.g. `huggingface-cli download microsoft/Phi-3-mini-4k-instruct "
            "--local-dir DIR`, and pass DIR"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # transformers >= 4.56 calls the dtype argument `dtype`, older versions `torch_dtype`.
    dtype_key = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        attn_implementation=tc.attn_implementation,
        local_files_only=True,
        **{dtype_key: dtype},
    )
    if getattr(model.config, "model_type", None) != "phi3":
        logger.warning(
            "%s is a %r model, not phi3: the chat format and --qv-only assume Phi-3",
            path,
            getattr(model.config, "model_type", None),
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer, str(path)


def load_conversations(
    cfg: TrainingConfig,
) -> tuple[list[chat_data.Conversation], list[chat_data.Conversation], str]:
    """The training and held-out conversations per ``--data`` / ``--eval-data``.

    Returns:
        ``(train, held_out, description)``.

    Raises:
        ValueError: If a split would leave either side empty.
    """
    train_path = Path(cfg.data) if cfg.data else DEFAULT_TRAIN_DATA
    eval_path = Path(cfg.eval_data) if cfg.eval_data else None
    if eval_path is None and cfg.data is None:
        eval_path = DEFAULT_EVAL_DATA
    train = chat_data.read_jsonl(train_path)
    if eval_path is not None:
        return train, chat_data.read_jsonl(eval_path), f"{train_path} | held out: {eval_path}"
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_eval = round(len(train) * cfg.eval_fraction)
    if not 0 < n_eval < len(train):
        raise ValueError(
            f"eval_fraction={cfg.eval_fraction} of {len(train)} conversations in {train_path} "
            "leaves no held-out or no training data; change it or pass --eval-data"
        )
    held_out = [train[i] for i in order[:n_eval]]
    kept = [train[i] for i in order[n_eval:]]
    return kept, held_out, f"{train_path} ({n_eval} held out, seed {cfg.seed})"


def encode_all(
    tokenizer: Any, conversations: list[chat_data.Conversation], max_seq_len: int, what: str
) -> list[chat_data.Example]:
    """Tokenizes conversations, dropping those with no target token left after truncation."""
    examples = [chat_data.encode(tokenizer, c, max_seq_len) for c in conversations]
    kept = [e for e in examples if e.num_target_tokens > 0]
    if len(kept) < len(examples):
        logger.warning(
            "%d %s conversations have no assistant token within max_seq_len=%d and are skipped",
            len(examples) - len(kept),
            what,
            max_seq_len,
        )
    if not kept:
        raise ValueError(f"no usable {what} conversations (raise --max-seq-len?)")
    return kept


def inject(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Puts LoRA into ``model`` per ``cfg`` and freezes everything else."""
    common = {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "use_rslora": cfg.use_rslora,
        "lora_dtype": DTYPES[cfg.lora_dtype],
    }
    if cfg.qv_only:
        lora_layers.inject_lora(model, fused={"qkv_proj": "qv"}, **common)
    else:
        lora_layers.inject_lora(model, target_modules=cfg.targets(), **common)
    lora_layers.mark_only_lora_as_trainable(model)
    return model


# --------------------------------------------------------------------------- schedule and data order
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


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def held_out_loss(
    model: nn.Module,
    examples: list[chat_data.Example],
    pad_token_id: int,
    batch_size: int,
    autocast: Callable[[], ContextManager],
) -> float:
    """Mean cross-entropy per target token over ``examples`` (eval mode; mode restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = chat_data.collate(examples[i : i + batch_size], pad_token_id, device)
            loss_sum, n = _loss_sum(model, batch, autocast)
            total += loss_sum.item()
            count += n
    finally:
        model.train(was_training)
    return total / max(1, count)


def _loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], autocast: Callable[[], ContextManager]
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


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    conversations: list[chat_data.Conversation],
    examples: list[chat_data.Example],
    cfg: TrainingConfig,
    autocast: Callable[[], ContextManager],
) -> dict[str, Any]:
    """Held-out loss, greedy replies and their exact-match accuracy.

    Returns:
        ``{"loss", "exact_match", "replies"}``.
    """
    loss = held_out_loss(model, examples, tokenizer.pad_token_id, cfg.eval_batch_size, autocast)
    replies = chat_data.generate_replies(
        model, tokenizer, conversations, cfg.max_new_tokens, cfg.eval_batch_size, autocast
    )
    references = [chat_data.reference_answer(c) for c in conversations]
    return {
        "loss": loss,
        "exact_match": chat_data.exact_match(replies, references),
        "replies": replies,
    }


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Writes a resumable checkpoint ``out_dir/checkpoints/step-NNNNNN`` atomically.

    It holds the adapter (``save_lora``, safetensors), the optimizer, scheduler and RNG states
    (``training_state.pt``, tensors and plain containers only, read back with
    ``weights_only=True``) and ``trainer_state.json`` (step, history, config). The folder is
    written under a temporary name and renamed, so a crash never leaves a half checkpoint.

    Args:
        out_dir: The run's output directory.
        step: Optimizer steps done.
        model: The model with LoRA layers.
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler.
        trainer_state: JSON-serialisable state (history, before-metrics, config).
        keep: Keep only this many newest checkpoints (0: all).

    Returns:
        The checkpoint directory.
    """
    root = out_dir / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora_layers.save_lora(model, tmp / ADAPTER_FILE)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        },
        tmp / STATE_FILE,
    )
    (tmp / TRAINER_JSON).write_text(json.dumps(trainer_state, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / TRAINER_JSON).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: a directory, or ``latest`` in ``out_dir``.

    Raises:
        FileNotFoundError: If a named directory is not a checkpoint.
    """
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_JSON).is_file():
        raise FileNotFoundError(f"--resume {resume!r} is not a checkpoint directory")
    return path


def check_resumable(saved: dict[str, dict[str, Any]], current: RunConfig) -> None:
    """Raises ValueError listing every setting that differs from the checkpoint's run.

    Only settings in :data:`RESUMABLE_CHANGES` (logging, saving, paths) may change; anything
    else would make the resumed run differ from an uninterrupted one.
    """
    now = current.to_dict()
    diffs = [
        f"{section}.{name}: checkpoint {value!r}, now {now[section].get(name)!r}"
        for section, values in saved.items()
        for name, value in values.items()
        if name not in RESUMABLE_CHANGES and now[section].get(name) != value
    ]
    if diffs:
        raise ValueError(
            "cannot resume exactly: these settings differ from the checkpoint's run:\n  "
            + "\n  ".join(diffs)
            + "\nrun with the checkpoint's settings (--config OUTPUT_DIR/config.json)"
        )


# --------------------------------------------------------------------------- outputs
def plot_curves(history: dict[str, list], before: dict[str, Any], path: Path) -> None:
    """Saves the training/held-out loss and the held-out exact match over steps as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history["train"]]
    losses = [row["loss"] for row in history["train"]]
    window = max(1, len(losses) // 30)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    eval_steps = [0] + [row["step"] for row in history["eval"]]
    eval_losses = [before["loss"]] + [row["loss"] for row in history["eval"]]
    ems = [100 * before["exact_match"]] + [100 * row["exact_match"] for row in history["eval"]]

    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (step)")
    ax_loss.plot(steps, smooth, color="tab:blue", label=f"train (mean of {window})")
    ax_loss.plot(eval_steps, eval_losses, "o-", color="tab:orange", label="held-out")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss per assistant token")
    ax_loss.set_yscale("log")
    ax_loss.set_title("LoRA fine-tune loss")
    ax_loss.legend()
    ax_em.plot(eval_steps, ems, "o-", color="tab:green")
    ax_em.set_ylim(-2, 102)
    ax_em.set_xlabel("optimizer step")
    ax_em.set_ylabel("held-out exact match (%)")
    ax_em.set_title("held-out exact match (step 0 = base model)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _setup_logging(log_file: Path) -> list[logging.Handler]:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stdout),
        logging.FileHandler(log_file, encoding="utf-8"),
    ]
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handlers


def _sample_table(samples: list[dict[str, str]]) -> str:
    lines = []
    for row in samples:
        ok = chat_data.normalize_answer(row["after"]) == chat_data.normalize_answer(row["expected"])
        lines.append(
            f"  {row['prompt']!r}\n      expected {row['expected']!r}  before {row['before']!r}"
            f"  after {row['after']!r}  [{'ok' if ok else 'wrong'}]"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run
@dataclass
class Session:
    """The state of one fine-tuning run, built by :func:`setup` and advanced by the loop."""

    cfg: RunConfig
    out_dir: Path
    device: torch.device
    autocast: Callable[[], ContextManager]
    model: nn.Module
    tokenizer: Any
    eval_convs: list[chat_data.Conversation]
    train_set: list[chat_data.Example]
    eval_set: list[chat_data.Example]
    total_steps: int
    before: dict[str, Any]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    history: dict[str, list] = field(default_factory=lambda: {"train": [], "eval": []})
    start_step: int = 0

    def trainer_state(self, step: int) -> dict[str, Any]:
        """What ``trainer_state.json`` records."""
        return {
            "step": step,
            "total_steps": self.total_steps,
            "before": self.before,
            "history": self.history,
            "config": self.cfg.to_dict(),
        }

    def evaluate(self) -> dict[str, Any]:
        """Held-out loss and exact match of the model as it is now."""
        return evaluate(
            self.model,
            self.tokenizer,
            self.eval_convs,
            self.eval_set,
            self.cfg.training,
            self.autocast,
        )


def setup(cfg: RunConfig) -> Session:
    """Loads model, tokenizer and data, evaluates the base, injects LoRA, builds the optimizer.

    With ``--resume``, also restores the adapter, optimizer, scheduler, RNG states and history
    from the checkpoint (whose settings must match, see :func:`check_resumable`).
    """
    tc = cfg.training
    out_dir = Path(tc.output_dir)
    device = resolve_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    elif tc.model is None and device.type == "cpu":
        torch.set_num_threads(1)
    logger.info("device %s, %d torch threads", device, torch.get_num_threads())
    autocast = autocast_context(tc, device)

    checkpoint = find_checkpoint(tc.resume, out_dir) if tc.resume else None
    resumed: dict[str, Any] | None = None
    if checkpoint is not None:
        resumed = json.loads((checkpoint / TRAINER_JSON).read_text())
        check_resumable(resumed["config"], cfg)
    else:
        if tc.resume:
            logger.info("--resume %s: no checkpoint in %s yet; starting fresh", tc.resume, out_dir)
        stale = list_checkpoints(out_dir)
        if stale:  # from an earlier run into this folder; they would mix with this run's
            logger.warning("fresh run: removing %d checkpoints of an earlier run", len(stale))
            shutil.rmtree(out_dir / CHECKPOINTS)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    _seed_everything(tc.seed)
    model, tokenizer, source = load_model(cfg, device)
    logger.info("model: %s on %s, %s", source, device, next(model.parameters()).dtype)

    train_convs, eval_convs, data_desc = load_conversations(tc)
    if tc.eval_samples:
        eval_convs = eval_convs[: tc.eval_samples]
    train_set = encode_all(tokenizer, train_convs, tc.max_seq_len, "training")
    eval_set = encode_all(tokenizer, eval_convs, tc.max_seq_len, "held-out")
    logger.info(
        "data: %s: %d training and %d held-out conversations",
        data_desc,
        len(train_set),
        len(eval_set),
    )
    per_step = tc.batch_size * tc.gradient_accumulation_steps
    total_steps = tc.max_steps or math.ceil(tc.num_train_epochs * len(train_set) / per_step)

    if resumed is None:
        logger.info("evaluating the base model before fine-tuning ...")
        before = evaluate(model, tokenizer, eval_convs, eval_set, tc, autocast)
        logger.info(
            "before: held-out loss %.4f, exact match %.1f%%",
            before["loss"],
            100 * before["exact_match"],
        )
    else:
        before = resumed["before"]

    # LoRA: the HF sample's recipe (r=16, alpha=32, dropout 0.05, all-linear) by default.
    torch.manual_seed(tc.seed)
    inject(model, cfg.lora)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable, total = lora_layers.count_parameters(model)
    logger.info(
        "LoRA on %d modules: %s trainable of %s parameters (%.2f%%)",
        len(lora_layers.lora_module_names(model)),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    schedule = WarmupCosine(total_steps, round(tc.warmup_ratio * total_steps), tc.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    session = Session(
        cfg=cfg,
        out_dir=out_dir,
        device=device,
        autocast=autocast,
        model=model,
        tokenizer=tokenizer,
        eval_convs=eval_convs,
        train_set=train_set,
        eval_set=eval_set,
        total_steps=total_steps,
        before=before,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    if checkpoint is not None:
        lora_layers.load_lora(model, checkpoint / ADAPTER_FILE)
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        session.start_step = state["step"]
        session.history = resumed["history"]
        logger.info("resumed from %s at step %d", checkpoint, session.start_step)
    logger.info(
        "training %d steps (%d to go): batch %d x %d accumulation, lr %g, warmup %d steps",
        total_steps,
        total_steps - session.start_step,
        tc.batch_size,
        tc.gradient_accumulation_steps,
        tc.learning_rate,
        schedule.warmup_steps,
    )
    return session


def train_step(s: Session, step: int, order: DataOrder) -> dict[str, float]:
    """One optimizer step (all its micro-batches); returns loss, lr, grad norm and tokens."""
    tc = s.cfg.training
    micro = [
        chat_data.collate(
            [s.train_set[i] for i in order.micro_batch(step * tc.gradient_accumulation_steps + j)],
            s.tokenizer.pad_token_id,
            s.device,
        )
        for j in range(tc.gradient_accumulation_steps)
    ]
    # Normalise by the target tokens of the whole step, so accumulation equals one big batch.
    n_targets = sum(int((b["labels"][:, 1:] != chat_data.IGNORE_INDEX).sum()) for b in micro)
    loss_total, tokens = 0.0, 0
    for batch in micro:
        loss_sum, _ = _loss_sum(s.model, batch, s.autocast)
        (loss_sum / max(1, n_targets)).backward()
        loss_total += loss_sum.item()
        tokens += int(batch["attention_mask"].sum())
    grad_norm = float("nan")
    if tc.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(s.params, tc.max_grad_norm).item()
    lr = s.scheduler.get_last_lr()[0]
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss_total / max(1, n_targets),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
    }


def run_loop(s: Session) -> dict[str, Any]:
    """Trains from ``s.start_step`` to the end, logging, evaluating and checkpointing.

    Returns:
        The last evaluation (held-out loss, exact match, replies).
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    tc = s.cfg.training
    order = DataOrder(len(s.train_set), tc.batch_size, tc.seed)
    s.model.train()
    window_tokens, window_seconds = 0, 0.0  # training time only, not eval or saving
    last_eval: dict[str, Any] | None = None
    with logging_redirect_tqdm(loggers=[logger]):
        bar = tqdm(
            range(s.start_step, s.total_steps),
            initial=s.start_step,
            total=s.total_steps,
            desc="LoRA fine-tune",
            disable=not tc.progress,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        for step in bar:
            step_start = time.perf_counter()
            result = train_step(s, step, order)
            window_seconds += time.perf_counter() - step_start
            done = step + 1
            s.history["train"].append({"step": done, "loss": result["loss"], "lr": result["lr"]})
            window_tokens += result["tokens"]
            bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}")
            last = done == s.total_steps

            if done % tc.logging_steps == 0 or last:
                recent = s.history["train"][-tc.logging_steps :]
                logger.info(
                    "step %d/%d  loss %.4f  lr %.2e  grad-norm %.3f  %.0f tokens/s",
                    done,
                    s.total_steps,
                    sum(r["loss"] for r in recent) / len(recent),
                    result["lr"],
                    result["grad_norm"],
                    window_tokens / max(window_seconds, 1e-9),
                )
                window_tokens, window_seconds = 0, 0.0

            if (tc.eval_steps and done % tc.eval_steps == 0) or last:
                last_eval = s.evaluate()
                s.history["eval"].append(
                    {
                        "step": done,
                        "loss": last_eval["loss"],
                        "exact_match": last_eval["exact_match"],
                    }
                )
                logger.info(
                    "eval at step %d: held-out loss %.4f, exact match %.1f%%",
                    done,
                    last_eval["loss"],
                    100 * last_eval["exact_match"],
                )

            if tc.save_steps and (done % tc.save_steps == 0 or last):
                path = save_checkpoint(
                    s.out_dir,
                    done,
                    s.model,
                    s.optimizer,
                    s.scheduler,
                    s.trainer_state(done),
                    tc.save_total_limit,
                )
                logger.info("saved checkpoint %s", path)
        bar.close()
    if last_eval is None:  # resumed at the end: nothing left to train
        last_eval = s.evaluate()
    return last_eval


def finish(s: Session, after: dict[str, Any], seconds_so_far: float) -> dict[str, Any]:
    """Saves the adapter and the merged model, checks the merge, plots, reports.

    Returns:
        The metrics written to ``metrics.json``.
    """
    tc = s.cfg.training
    finish_start = time.perf_counter()
    adapter_dir = s.out_dir / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    lora_layers.save_lora(s.model, adapter_dir / ADAPTER_FILE)
    (adapter_dir / "lora_config.json").write_text(
        json.dumps(dataclasses.asdict(s.cfg.lora), indent=2) + "\n"
    )
    logger.info("saved the adapter to %s", adapter_dir / ADAPTER_FILE)
    trainable, total = lora_layers.count_parameters(s.model)

    # The merged model must compute what the adapter model computes.
    s.model.eval()
    probe = chat_data.collate(s.eval_set[: tc.eval_batch_size], s.tokenizer.pad_token_id, s.device)
    inputs = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
    with torch.no_grad(), s.autocast():
        adapter_logits = s.model(**inputs).logits.float()
        merged = lora_layers.merge_and_unload(s.model)
        merged_logits = merged(**inputs).logits.float()
    mask = probe["attention_mask"].bool()
    merge_diff = (adapter_logits[mask] - merged_logits[mask]).abs().max().item()
    scale = adapter_logits[mask].abs().max().item()
    logger.info(
        "merged model vs adapter model: max |logit difference| %.2e (logits up to %.1f)",
        merge_diff,
        scale,
    )
    if tc.save_merged:
        tiny_phi3.save_pretrained_quietly(merged, s.tokenizer, s.out_dir / "merged")
        logger.info("saved the merged model to %s", s.out_dir / "merged")

    plot_curves(s.history, s.before, s.out_dir / "loss_curve.png")
    samples = [
        {
            "prompt": conv[-2]["content"] if len(conv) > 1 else "",
            "expected": chat_data.reference_answer(conv),
            "before": b,
            "after": a,
        }
        for conv, b, a in zip(s.eval_convs, s.before["replies"], after["replies"], strict=True)
    ]
    seconds = seconds_so_far + time.perf_counter() - finish_start
    metrics = {
        "before": {"loss": s.before["loss"], "exact_match": s.before["exact_match"]},
        "after": {"loss": after["loss"], "exact_match": after["exact_match"]},
        "merged_max_abs_logit_diff": merge_diff,
        "max_abs_logit": scale,
        "steps": s.total_steps,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "held_out_conversations": len(s.eval_convs),
        "seconds": round(seconds, 1),
        "samples": samples,
    }
    (s.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    logger.info(
        "before/after on %d held-out questions (first %d):\n%s",
        len(samples),
        min(tc.show_samples, len(samples)),
        _sample_table(samples[: tc.show_samples]),
    )
    logger.info(
        "held-out exact match: before %.1f%% -> after %.1f%%  (loss %.4f -> %.4f); "
        "outputs in %s (%.0f s)",
        100 * s.before["exact_match"],
        100 * after["exact_match"],
        s.before["loss"],
        after["loss"],
        s.out_dir,
        seconds,
    )
    return metrics


def train(cfg: RunConfig) -> dict[str, Any]:
    """Runs the whole fine-tune (see the module docstring) and returns the final metrics."""
    start = time.perf_counter()
    session = setup(cfg)
    after = run_loop(session)
    return finish(session, after, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; also callable in-process (the tests do).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The final metrics (also written to ``OUTPUT_DIR/metrics.json``).
    """
    cfg = parse_args(argv)
    out_dir = Path(cfg.training.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    handlers = _setup_logging(out_dir / "train.log")
    threads = torch.get_num_threads()
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(threads)  # main() may run in-process (tests): leave no trace
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    main()
