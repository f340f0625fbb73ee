"""Settings of the Phi-3 LoRA fine-tune: two config dataclasses and the command line.

``TrainingConfig`` (model, data, optimisation, logging, saving) and ``LoRAConfig`` (rank,
alpha, dropout, targets) are the two sections of a JSON config file. Every field's ``help``
metadata is its ``--help`` text, and every field is a flag: ``learning_rate`` is
``--learning-rate``, ``r`` is ``--lora-r``. Settings resolve as built-in defaults, then
``--config FILE``, then flags. ``--overwrite`` and ``--debug`` say how to run, not what to
train, so they are flags only and never saved.

This module imports neither torch nor transformers, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXAMPLES_DIR = Path(__file__).resolve().parent
BASE_MODEL_DIR = EXAMPLES_DIR / "tiny-phi3-base"
"""The shipped pretrained tiny Phi-3 (written by ``make_base.py``): the default ``--model``."""
DTYPES = ("float32", "bfloat16", "float16")
ALL_LINEAR = "all-linear"


class UserError(Exception):
    """A problem with the user's settings, data or folders (not a bug).

    The script reports it as one line, writes it to ``train.log`` where that is safe, and
    exits with code 2; ``--debug`` shows the traceback instead.
    """


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class TrainingConfig:
    """What to train on, for how long, and what to log and save.

    Field names follow the Hugging Face Phi-3 sample's ``training_config`` where one exists
    (``learning_rate``, ``gradient_accumulation_steps``, ``warmup_ratio``, ``logging_steps``,
    ``save_steps``, ``save_total_limit``, ``gradient_checkpointing``, ``seed``). Each field's
    ``help`` metadata is its ``--help`` text.
    """

    model: str | None = field(
        default=None,
        metadata={
            "metavar": "DIR",
            "help": "local Phi-3 checkpoint directory (config, weights and tokenizer, e.g. a "
            "downloaded microsoft/Phi-3-mini-4k-instruct); nothing is downloaded. Default: the "
            "shipped pretrained tiny Phi-3 in examples/tiny-phi3-base",
        },
    )
    data: str | None = field(
        default=None,
        metadata={
            "metavar": "FILE",
            "help": 'chat JSONL to fine-tune on, one {"messages": [...]} per line. Default: '
            "the shipped examples/data/toy_chat_train.jsonl",
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "metavar": "FILE",
            "help": "held-out chat JSONL. Default: the shipped toy_chat_test.jsonl with the "
            "shipped data, else a random --eval-fraction of --data",
        },
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "share of --data held out when --eval-data is not given"}
    )
    eval_samples: int = field(
        default=200,
        metadata={"help": "held-out conversations used for eval loss and exact match (0: all)"},
    )
    output_dir: str = field(
        default="runs/finetune_phi3",
        metadata={
            "metavar": "DIR",
            "help": "where checkpoints, the adapter, the merged model and plots go",
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the split, data order and LoRA init"})
    max_steps: int = field(
        default=300, metadata={"help": "optimizer steps; 0 means use --num-train-epochs"}
    )
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "epochs over the training data when --max-steps is 0"}
    )
    batch_size: int = field(default=16, metadata={"help": "conversations per micro-batch"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step"}
    )
    learning_rate: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "share of the steps with linear warmup before cosine decay"}
    )
    min_lr_ratio: float = field(
        default=0.0, metadata={"help": "learning rate at the end of the cosine, as a share of peak"}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient clipping norm (0: no clipping)"}
    )
    max_seq_len: int = field(default=512, metadata={"help": "longer conversations are cut"})
    logging_steps: int = field(default=10, metadata={"help": "log loss, lr, tokens/s every N"})
    eval_steps: int = field(
        default=100, metadata={"help": "held-out loss and exact match every N steps (0: end only)"}
    )
    save_steps: int = field(
        default=100, metadata={"help": "save a resumable checkpoint every N steps (0: never)"}
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "keep only the newest N checkpoints (0: keep all)"}
    )
    resume: str | None = field(
        default=None,
        metadata={
            "metavar": "DIR|latest",
            "help": "continue from a checkpoint directory, or 'latest' for the newest one in "
            "--output-dir/checkpoints; --max-steps may be raised to train longer",
        },
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps or auto"})
    dtype: str = field(
        default="auto",
        metadata={
            "choices": ("auto", *DTYPES),
            "help": "dtype of the frozen base weights; auto: bfloat16 for a --model on a GPU "
            "that supports it, else float32",
        },
    )
    autocast: str = field(
        default="auto",
        metadata={
            "choices": ("auto", "on", "off"),
            "help": "bf16 autocast; auto: on where the GPU supports bf16",
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "choices": ("eager", "sdpa", "flash_attention_2"),
            "help": "attention kernel (flash_attention_2 needs flash-attn)",
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward to save memory"}
    )
    max_new_tokens: int = field(default=16, metadata={"help": "longest generated answer"})
    eval_batch_size: int = field(default=64, metadata={"help": "prompts per generate() call"})
    show_samples: int = field(
        default=6, metadata={"help": "held-out questions printed with their before/after answers"}
    )
    save_merged: bool = field(
        default=True, metadata={"help": "save the merged model (merge_and_unload) at the end"}
    )
    progress: bool = field(default=True, metadata={"help": "show tqdm progress bars"})
    threads: int = field(
        default=0,
        metadata={
            "help": "torch CPU threads; 0: auto (1 for the shipped tiny base on CPU, whose small "
            "matrices gain little from more and stall when the CPU is shared; else torch's "
            "default)"
        },
    )

    def __post_init__(self) -> None:
        positive = ("batch_size", "gradient_accumulation_steps", "max_seq_len", "logging_steps")
        positive += ("max_new_tokens", "eval_batch_size", "learning_rate")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        non_negative = ("max_steps", "eval_steps", "save_steps", "save_total_limit", "threads")
        non_negative += ("eval_samples", "show_samples", "weight_decay", "max_grad_norm")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.num_train_epochs <= 0:
            raise ValueError(
                f"with max_steps=0, num_train_epochs must be positive, got {self.num_train_epochs}"
            )
        for name in ("eval_fraction", "warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.autocast not in ("auto", "on", "off"):
            raise ValueError(f"autocast must be auto, on or off, got {self.autocast!r}")
        if self.attn_implementation not in ("eager", "sdpa", "flash_attention_2"):
            raise ValueError(
                "attn_implementation must be eager, sdpa or flash_attention_2, "
                f"got {self.attn_implementation!r}"
            )


@dataclass(frozen=True)
class LoRAConfig:
    """Where LoRA goes and how big it is.

    The defaults are the Hugging Face Phi-3 sample's ``peft_config``: r=16, alpha=32, dropout
    0.05 on every linear layer but the output head. ``qv_only`` is the classic choice from the
    LoRA paper: only the query and value projections, which in Phi-3 are two slices of the
    fused ``qkv_proj``.
    """

    r: int = field(default=16, metadata={"help": "LoRA rank", "flag": "lora-r"})
    lora_alpha: float = field(default=32.0, metadata={"help": "scaling = lora_alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: str = field(
        default="all-linear",
        metadata={
            "metavar": "NAMES",
            "help": "'all-linear' or comma-separated module names/suffixes "
            "(e.g. qkv_proj,o_proj,gate_up_proj,down_proj)",
        },
    )
    qv_only: bool = field(
        default=False,
        metadata={"help": "LoRA on the q and v slices of every qkv_proj only (overrides targets)"},
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rank-stabilised scaling lora_alpha / sqrt(r)"}
    )
    lora_dtype: str = field(
        default="float32",
        metadata={
            "choices": tuple(DTYPES),
            "help": "dtype of the LoRA parameters (float32 keeps them fp32 on a bf16 base)",
        },
    )

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_dtype not in DTYPES:
            raise ValueError(f"lora_dtype must be one of {sorted(DTYPES)}, got {self.lora_dtype!r}")
        if not self.qv_only and not self.targets():
            raise ValueError("target_modules is empty; give 'all-linear' or module names")

    def targets(self) -> str | list[str]:
        """``target_modules`` as :func:`lora_layers.inject_lora` takes it."""
        if self.target_modules.strip() == ALL_LINEAR:
            return ALL_LINEAR
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: the two sections of a config file, and how to run.

    Attributes:
        training: What to train on, for how long, what to save.
        lora: Where LoRA goes and how big it is.
        overwrite: Replace an earlier run in ``output_dir`` (never saved to a config file).
        debug: Show tracebacks for user errors too (never saved to a config file).
    """

    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    overwrite: bool = False
    debug: bool = False

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config file form: ``{"training": {...}, "lora": {...}}``."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type] = {"training": TrainingConfig, "lora": LoRAConfig}

# Fields that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "progress",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "show_samples",
        "output_dir",
        "threads",
        "eval_batch_size",
        "save_merged",
    }
)
# Fields that set the run's length: a resumed run may train longer (the cosine schedule is
# stretched to the new end, as when the Hugging Face Trainer resumes with a larger max_steps).
LENGTH_SETTINGS = frozenset({"max_steps", "num_train_epochs"})


def resume_differences(saved: dict[str, dict[str, Any]], current: RunConfig) -> list[str]:
    """The settings that differ from a checkpoint's run and would change the result.

    Args:
        saved: The checkpoint's config (``to_dict`` form).
        current: This run's config.

    Returns:
        One ``"section.name: checkpoint X, now Y"`` entry per difference, ignoring
        :data:`RESUMABLE_CHANGES` and :data:`LENGTH_SETTINGS`.
    """
    now = current.to_dict()
    return [
        f"{section}.{name}: checkpoint {value!r}, now {now.get(section, {}).get(name)!r}"
        for section, values in saved.items()
        for name, value in values.items()
        if name not in RESUMABLE_CHANGES | LENGTH_SETTINGS
        and now.get(section, {}).get(name) != value
    ]


# --------------------------------------------------------------------------- command line
def _flag(section: str, f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name.replace("_", "-"))


def _parser_type(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: ``--config``, ``--overwrite``, ``--debug``, one flag per field.

    Flags default to "not given", so a config file's values are only overridden by flags the
    user actually passes. Help texts show the built-in defaults.
    """
    parser = argparse.ArgumentParser(
        prog="finetune_phi3.py",
        description=(
            "Fine-tune Phi-3 with LoRA (lora_layers) on chat-instruction data in a plain PyTorch "
            "loop. With no arguments: the shipped pretrained tiny Phi-3 on the shipped dataset, "
            "about a minute on a CPU, no network."
        ),
        epilog=(
            "Settings are resolved as built-in defaults < --config file < flags. The run's "
            "resolved settings are written to OUTPUT_DIR/config.json, which --config accepts. "
            "User errors print one line and exit with code 2."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help='JSON config file: {"training": {...}, "lora": {...}}, keys as the field names '
        "below (dashes become underscores)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --output-dir (without it such a run is refused); its "
        "files are removed only once this run's settings, data and model have loaded",
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback for user errors too")
    titles = {"training": "training (model, data, optimisation, logging, saving)", "lora": "LoRA"}
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(titles[section])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _parser_type(hints[f.name])
            kwargs: dict[str, Any] = {
                "help": f.metadata.get("help", ""),
                "dest": f"{section}.{f.name}",
            }
            if f.default is not None:
                kwargs["help"] += f" (default: {f.default})"
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = kind
                kwargs["metavar"] = f.metadata.get("metavar", kind.__name__.upper())
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
                    kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
            group.add_argument(_flag(section, f), **kwargs)
    return parser


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Reads a JSON config file and checks its sections and keys.

    Args:
        path: The file.

    Returns:
        ``{section: {field: value}}`` with only the keys the file sets.

    Raises:
        UserError: If the file is missing, is not JSON, or has an unknown section or key (the
            message names the file, the line for bad JSON, and the valid names).
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"--config {str(path)!r}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise UserError(f'{path}: expected {{"training": {{...}}, "lora": {{...}}}}')
    unknown_sections = sorted(set(raw) - set(SECTIONS))
    if unknown_sections:
        raise UserError(f"{path}: unknown section(s) {unknown_sections}; valid: {list(SECTIONS)}")
    for section, values in raw.items():
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(
                f"{path}: unknown key(s) {unknown} in {section!r}; valid: {sorted(names)}"
            )
    return raw


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Builds the run config from built-in defaults, an optional config file and flags.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The resolved, validated config.

    Raises:
        UserError: If the config file or a setting is invalid (argparse itself exits with
            code 2 on an unknown flag or a value of the wrong type).
    """
    ns = vars(build_parser().parse_args(argv))
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    if "config" in ns:
        for section, section_values in load_config_file(ns.pop("config")).items():
            values[section].update(section_values)
    overwrite, debug = ns.pop("overwrite", False), ns.pop("debug", False)
    for dest, value in ns.items():
        section, name = dest.split(".", 1)
        values[section][name] = value
    try:
        sections = {section: SECTIONS[section](**values[section]) for section in SECTIONS}
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid setting: {err}") from None
    return RunConfig(**sections, overwrite=overwrite, debug=debug)
