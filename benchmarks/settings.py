"""What one run of `bench_lora.py` measures: the shapes, the candidates and the presets.

`Config` holds every setting of a run; `Config.from_args` parses the command line of
`bench_lora.py` and fills the rest from `PRESETS` ("full", "quick" or "smoke").
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ALPHA",
    "DESCRIPTION",
    "DROPOUTS",
    "DTYPES",
    "LORA_CANDIDATES",
    "MODES",
    "NO_INPUT_GRAD",
    "PRESETS",
    "QKV_ENABLE",
    "RANK",
    "SECTIONS",
    "SHAPES",
    "TINY",
    "TRAIN_DROPOUT",
    "Config",
]

DESCRIPTION = "Benchmarks lora_layers against a frozen nn.Linear, loralib, PEFT and a minimal LoRA."
SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (3072, 9216),
    "o": (3072, 3072),
    "gate_up": (3072, 16384),
    "down": (8192, 3072),
}
RANK = 16
ALPHA = 32
DROPOUTS = (0.0, 0.05)
TRAIN_DROPOUT = 0.05
TINY = (256, 256, 4)  # in, out, tokens
QKV_ENABLE = (True, False, True)
LORA_CANDIDATES = ("lora_layers", "loralib", "peft", "minimal")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SECTIONS = ("check", "linear", "fused", "merged", "bytes", "ops", "inject", "train")


@dataclass(frozen=True)
class Config:
    """Settings of one benchmark run.

    Attributes:
        mode: "full", "quick" (reduced grid, see bench_lora.py) or "smoke" (tiny shapes and
            a tiny model, one round: checks the code runs, its figures mean nothing).
        device: Device to run on.
        dtype: Dtype of weights and activations.
        out_dir: Where result files go.
        shapes: Layer name -> (in_features, out_features); "qkv" is also the fused layer.
        tiny: (in, out, tokens) of the op-count shape.
        tokens: Token counts for the layer timings.
        timing_dropouts: Dropout values timed (bytes and op counts always use both).
        timed_metrics: Which of "fwd_ms", "fwd_bwd_ms" the layer benchmarks time.
        timed_candidates: LoRA candidates timed in the layer benchmarks (bytes and op counts
            always cover all).
        rounds: Timing rounds per measurement.
        round_time_s: Target seconds per candidate per round (at least one call).
        num_threads: Intra-op threads for timed calls.
        model_overrides: Phi3Config arguments for the skeleton and the training model
            (empty: Phi-3-mini).
        train_tokens: Tokens in the training-step benchmark.
        train_rounds: Timed training steps per variant (interleaved).
        train_layers: Decoder layers in the training-step model.
        train_variants: Libraries in the training-step benchmark.
        inject_reps: Injections timed per library (median reported).
        sections: Benchmarks to run, a subset of SECTIONS.
        seed: Seed for every random tensor.
    """

    mode: str
    device: torch.device
    dtype: torch.dtype
    out_dir: Path
    shapes: Mapping[str, tuple[int, int]]
    tiny: tuple[int, int, int]
    tokens: tuple[int, ...]
    timing_dropouts: tuple[float, ...]
    timed_metrics: tuple[str, ...]
    timed_candidates: tuple[str, ...]
    rounds: int
    round_time_s: float
    num_threads: int
    model_overrides: Mapping[str, Any]
    train_tokens: int
    train_rounds: int
    train_layers: int
    train_variants: tuple[str, ...]
    inject_reps: int
    sections: tuple[str, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        bad = sorted(set(self.sections) - set(SECTIONS))
        if bad:
            raise ValueError(f"unknown sections {bad}; choose from {list(SECTIONS)}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if "qkv" not in self.shapes or "o" not in self.shapes:
            raise ValueError(f"shapes need 'qkv' and 'o' entries, got {list(self.shapes)}")

    @property
    def quick(self) -> bool:
        """True unless this is the full grid."""
        return self.mode != "full"

    @property
    def max_tokens(self) -> int:
        """The token count the ratio targets are checked at."""
        return max(self.tokens)

    @property
    def stem(self) -> str:
        """File name stem of the outputs."""
        name = str(self.dtype).removeprefix("torch.")
        suffix = "" if self.mode == "full" else f"_{self.mode}"
        if self.num_threads != torch.get_num_threads():
            suffix += f"_{self.num_threads}thread"
        return f"lora_bench_{self.device.type}_{name}{suffix}"

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> Config:
        """Parses the command line.

        Args:
            argv: Arguments (default: sys.argv[1:]).

        Returns:
            The Config.
        """
        p = argparse.ArgumentParser(description=DESCRIPTION)
        g = p.add_mutually_exclusive_group()
        g.add_argument("--quick", action="store_true", help="reduced grid, < 2 min on 2 cores")
        g.add_argument("--smoke", action="store_true", help="tiny shapes: checks the code runs")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
        p.add_argument("--tokens", type=int, nargs="+", help="override the layer token counts")
        p.add_argument("--rounds", type=int, help="override the timing rounds")
        p.add_argument("--threads", type=int, default=torch.get_num_threads())
        p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
        p.add_argument("--seed", type=int, default=0)
        a = p.parse_args(argv)
        mode = "smoke" if a.smoke else "quick" if a.quick else "full"
        preset = PRESETS[mode]
        return cls(
            mode=mode,
            device=torch.device(a.device),
            dtype=DTYPES[a.dtype],
            out_dir=a.out,
            tokens=tuple(a.tokens) if a.tokens else preset["tokens"],
            rounds=a.rounds or preset["rounds"],
            num_threads=a.threads,
            sections=tuple(a.only) if a.only else SECTIONS,
            seed=a.seed,
            **{k: v for k, v in preset.items() if k not in ("tokens", "rounds")},
        )


MODES = ("full", "quick", "smoke")
NO_INPUT_GRAD = "lora_layers/no-input-grad"
_ALL_TRAIN = ("lora_layers", NO_INPUT_GRAD, "peft", "loralib", "minimal")
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "shapes": SHAPES,
        "tiny": TINY,
        "tokens": (256, 1024),
        "timing_dropouts": DROPOUTS,
        "timed_metrics": ("fwd_ms", "fwd_bwd_ms"),
        "timed_candidates": LORA_CANDIDATES,
        "rounds": 5,
        "round_time_s": 0.3,
        "model_overrides": {},
        "train_tokens": 1024,
        "train_rounds": 3,
        "train_layers": 2,
        "train_variants": _ALL_TRAIN,
        "inject_reps": 5,
    },
    "quick": {
        "shapes": SHAPES,
        "tiny": TINY,
        "tokens": (256,),
        "timing_dropouts": (0.05,),
        "timed_metrics": ("fwd_bwd_ms",),
        "timed_candidates": ("lora_layers", "loralib", "peft"),
        "rounds": 3,
        "round_time_s": 0.1,
        "model_overrides": {},
        "train_tokens": 64,
        "train_rounds": 3,
        "train_layers": 2,
        "train_variants": ("lora_layers", "peft", "loralib"),
        "inject_reps": 2,
    },
    "smoke": {
        "shapes": {"qkv": (64, 192), "o": (64, 64), "gate_up": (64, 256), "down": (128, 64)},
        "tiny": TINY,
        "tokens": (8,),
        "timing_dropouts": DROPOUTS,
        "timed_metrics": ("fwd_ms", "fwd_bwd_ms"),
        "timed_candidates": LORA_CANDIDATES,
        "rounds": 1,
        "round_time_s": 0.0,
        "model_overrides": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 256,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "num_hidden_layers": 2,
        },
        "train_tokens": 16,
        "train_rounds": 1,
        "train_layers": 2,
        "train_variants": _ALL_TRAIN,
        "inject_reps": 1,
    },
}
