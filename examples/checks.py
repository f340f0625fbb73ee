"""The fine-tune's input checks: everything the user gave, checked before anything is written.

Each check raises :class:`finetune_config.UserError` with a one-line message (``file:line:
what was expected`` for data), which ``finetune_phi3.main`` prints before exiting with
code 2. All of them run before the output folder is touched and before the model is loaded.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import run_files
from finetune_config import RunConfig, TrainingConfig, UserError, resume_differences

EXAMPLES_DIR = Path(__file__).resolve().parent
DATA_DIR = EXAMPLES_DIR / "data"
DEFAULT_TRAIN_DATA = DATA_DIR / "toy_chat_train.jsonl"
DEFAULT_EVAL_DATA = DATA_DIR / "toy_chat_test.jsonl"

logger = logging.getLogger("finetune_phi3")


def check_output_dir(cfg: RunConfig, out_dir: Path) -> tuple[Path | None, dict | None]:
    """What ``--output-dir`` and ``--resume`` allow, decided before anything is written.

    Returns:
        ``(checkpoint, its trainer state)`` for a resumed run, else ``(None, None)``.

    Raises:
        UserError: If the folder holds an earlier run and neither ``--overwrite`` nor
            ``--resume`` was given, if ``--resume`` names no checkpoint (the message lists
            those that exist), or if a setting differs from the checkpoint's run.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output-dir {str(out_dir)!r} is a file, not a folder")
    tc = cfg.training
    checkpoint = run_files.find_checkpoint(tc.resume, out_dir) if tc.resume else None
    earlier = run_files.earlier_run(out_dir)
    inside = checkpoint is not None and checkpoint.resolve().parent.parent == out_dir.resolve()
    if earlier and not inside and not cfg.overwrite:
        raise UserError(
            f"{out_dir} holds an earlier run ({', '.join(earlier)}); pass --overwrite to "
            "replace it, --resume latest to continue it, or choose another --output-dir"
        )
    if checkpoint is None:
        if tc.resume:
            logger.info("--resume %s: no run in %s yet; starting fresh", tc.resume, out_dir)
        return None, None
    resumed = run_files.read_checkpoint(checkpoint)
    diffs = resume_differences(resumed["config"], cfg)
    if diffs:
        raise UserError(
            f"cannot resume {checkpoint} exactly, these settings differ from its run: "
            + "; ".join(diffs)
            + f" (pass the same options, or --config {out_dir / 'config.json'})"
        )
    return checkpoint, resumed


def load_conversations(cfg: TrainingConfig) -> tuple[list, list, str]:
    """The training and held-out conversations per ``--data`` / ``--eval-data``.

    Returns:
        ``(train, held_out, description)``.

    Raises:
        UserError: If a file is missing or malformed (``file:line: what was expected``), or
            a split would leave either side empty.
    """
    import chat_data

    train_path = Path(cfg.data) if cfg.data else DEFAULT_TRAIN_DATA
    eval_path = Path(cfg.eval_data) if cfg.eval_data else None
    if eval_path is None and cfg.data is None:
        eval_path = DEFAULT_EVAL_DATA
    try:
        train = chat_data.read_jsonl(train_path)
        held_out = chat_data.read_jsonl(eval_path) if eval_path is not None else None
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from None
    if held_out is not None:
        desc = f"{train_path} | held out: {eval_path}"
    else:
        import torch

        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
        n_eval = round(len(train) * cfg.eval_fraction)
        if not 0 < n_eval < len(train):
            raise UserError(
                f"--eval-fraction {cfg.eval_fraction} of the {len(train)} conversations in "
                f"{train_path} leaves no held-out or no training data; change it or pass "
                "--eval-data"
            )
        held_out = [train[i] for i in order[:n_eval].tolist()]
        train = [train[i] for i in order[n_eval:].tolist()]
        desc = f"{train_path} ({n_eval} held out, seed {cfg.seed})"
    if cfg.eval_samples:
        held_out = held_out[: cfg.eval_samples]
    return train, held_out, desc


def load_tokenizer(model_dir: Path) -> Any:
    """The model folder's tokenizer (a fast one: loss masking reads character offsets).

    Raises:
        UserError: If ``model_dir`` is not a local checkpoint folder with a tokenizer.
    """
    from transformers import AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise UserError(
            f"--model {str(model_dir)!r} is not a local checkpoint folder (no config.json); "
            "download one first, e.g. `huggingface-cli download microsoft/Phi-3-mini-4k-instruct "
            "--local-dir DIR`, and pass DIR"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {str(model_dir)!r}: cannot load its tokenizer ({err})") from None
    if not tokenizer.is_fast:
        raise UserError(f"--model {str(model_dir)!r}: needs a fast tokenizer (tokenizer.json)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def warn_unknown_characters(tokenizer: Any, conversations: list) -> None:
    """Warns (count and examples) about characters the tokenizer turns into its unknown token."""
    import chat_data

    unknown = chat_data.unknown_characters(tokenizer, conversations)
    if unknown:
        common = sorted(unknown.items(), key=lambda item: -item[1])[:8]
        examples = ", ".join(f"{char!r} x{count}" for char, count in common)
        logger.warning(
            "%d characters of the data (%d distinct) have no token and become %s: %s",
            sum(unknown.values()),
            len(unknown),
            tokenizer.unk_token,
            examples,
        )


def encode_all(tokenizer: Any, conversations: list, max_seq_len: int, what: str) -> list:
    """Tokenizes conversations, dropping those with no target token left after truncation.

    Raises:
        UserError: If none is left.
    """
    import chat_data

    examples = [chat_data.encode(tokenizer, c, max_seq_len) for c in conversations]
    kept = [e for e in examples if e.num_target_tokens > 0]
    if len(kept) < len(examples):
        logger.warning(
            "%d %s conversations have no assistant token within --max-seq-len %d; skipped",
            len(examples) - len(kept),
            what,
            max_seq_len,
        )
    if not kept:
        raise UserError(f"no usable {what} conversations within --max-seq-len {max_seq_len}")
    return kept


def count_steps(cfg: TrainingConfig, num_examples: int, resumed: dict | None) -> int:
    """Optimizer steps of the run: ``--max-steps``, or ``--num-train-epochs`` over the data.

    Raises:
        UserError: If a resumed checkpoint is already past that many steps.
    """
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    total = cfg.max_steps or math.ceil(cfg.num_train_epochs * num_examples / per_step)
    if resumed is not None and total < resumed["step"]:
        raise UserError(
            f"--resume: the checkpoint is at step {resumed['step']}, past this run's end "
            f"({total} steps); raise --max-steps to train longer"
        )
    return total


def matplotlib_available() -> bool:
    """Whether the loss plot can be drawn; warns now, not after training, when it cannot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: no loss_curve.png (pip install matplotlib)")
        return False
    return True
