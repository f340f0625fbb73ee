"""Benchmarks lora_layers against a frozen nn.Linear, loralib, PEFT and a minimal LoRA.

One command measures everything the performance issue (issue 5) asks for and checks its
seven targets:

    python benchmarks/bench_lora.py --quick     # < 2 minutes on a 2-core CPU
    python benchmarks/bench_lora.py             # full grid, the figures the README quotes

Candidates (every LoRA one uses r=16, alpha=32, the same frozen base weight, and the same
non-zero A and B, since B = 0 lets libraries skip work):

* ``nn.Linear``: the frozen base layer alone, the floor.
* ``lora_layers``: ``lora_layers.Linear.from_module`` / ``MergedLinear.from_module``.
* ``loralib``: ``loralib.Linear`` / ``loralib.MergedLinear`` on the shared weight.
* ``peft``: PEFT's LoRA layer, injected by ``peft.inject_adapter_in_model`` around the
  ``nn.Linear`` (for the fused qkv: one LoRA over the whole 3072 -> 9216 projection, which is
  what PEFT users write).
* ``minimal``: `MinimalLoRALinear` below, the LoRA equation in three plain ops.

What is measured, at the four Phi-3-mini projections (qkv 3072->9216, o 3072->3072,
gate_up 3072->16384, down 8192->3072), batch 1, 256 and 1024 tokens, dropout 0 and 0.05:

* training forward and forward+backward time, and the ratio to the frozen ``nn.Linear``.
  The input requires grad: the mid-network case, where backward computes the input's
  gradient through the frozen base as well (a first layer fed by a frozen embedding would
  skip it; every other LoRA layer in a model is mid-network);
* bytes saved for backward, relative to the input's bytes (`utils.saved_activation_bytes`);
* merged inference (``eval()``, ``torch.inference_mode``) against ``nn.Linear``: time ratio
  and ATen op counts;
* the fused qkv with q and v adapted (``enable_lora=(True, False, True)``);
* ATen ops of one forward+backward at the tiny shape 256 -> 256, 4 tokens, counted two ways
  (`utils.count_profiled_aten_ops` is the issue's count; `utils.count_dispatched_ops` lists
  the kernels);
* injection time of ``lora_layers.inject_lora(model, target_modules="all-linear", r=16,
  lora_alpha=32)`` against ``peft.get_peft_model`` on a ``Phi3ForCausalLM(Phi3Config())``
  skeleton built under ``torch.device("meta")`` (skeleton build not timed);
* one training step (forward, causal-LM loss, backward, AdamW step) of a 2-layer model with
  Phi-3-mini's widths (hidden 3072, intermediate 8192, vocab 32064), LoRA on every linear
  layer except ``lm_head`` ("all-linear"), dropout 0.05: step time and peak memory. All
  variants share one copy of the frozen weights. ``lora_layers`` is injected with
  ``inject_lora`` as a user would (by default it hooks the embeddings so their output
  requires grad, for reentrant checkpointing; the full run also times
  ``input_require_grads=False``, which PEFT's default matches); PEFT with
  ``get_peft_model``; loralib and the minimal module by replacing each ``nn.Linear``.
  Peak memory = bytes live when the step starts (parameters, buffers, optimizer state,
  input; each storage once) + the peak of what the step allocates on top. On CUDA the
  latter is ``torch.cuda.max_memory_allocated``. On CPU it is replayed from the PyTorch
  profiler's memory events (``profile_memory=True``): the c10 CPU allocator reports each
  allocation and free with its size, so the peak is exact, deterministic and unaffected by
  other processes on a shared machine. A subprocess per variant with a ``ru_maxrss`` delta
  was rejected: RSS includes allocator caching, fragmentation and library pages, needs the
  1.7 GB of weights rebuilt per process, and drifts with what else runs.

Timing: `utils.interleaved_timings` (``torch.utils.benchmark.Timer`` with all intra-op
threads unless ``--threads``) runs the candidates of one measurement in rotating interleaved
rounds; a time is the median over rounds, a ratio the median of per-round ratios. The
spread column ((max - min) / median over rounds) tells how noisy a figure is. On a machine
shared with other jobs, two OpenMP threads wait on each other at every parallel region, so
small ops cost milliseconds and the LoRA ratios inflate; ``--threads 1`` gives steadier
ratios there (its files get a ``_1thread`` suffix).

``--quick`` (under 2 minutes on an idle 2-core CPU) times forward+backward only, at dropout
0.05 (the harder case), 256 tokens, 3 rounds, for nn.Linear, lora_layers, loralib and PEFT
(bytes and op counts still cover every candidate and both dropouts), and a 64-token
training step of lora_layers, PEFT and loralib. Targets stated at 1024 tokens are then
checked at 256 tokens (stricter: fixed per-call costs weigh more) and the table says so.
``--smoke`` runs every section on tiny shapes in seconds (for CI; its figures mean nothing).

Outputs go to ``--out`` (default ``benchmarks/results``): ``lora_bench_<device>_<dtype>
[_quick].{csv,json,md,png}``: every row, the target verdicts, a markdown target table and a
chart.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import importlib.metadata
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import utils as U  # noqa: E402

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


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    """Settings of one benchmark run.

    Attributes:
        mode: "full", "quick" (reduced grid, see module docstring) or "smoke" (tiny shapes and
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
        p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


# ----------------------------------------------------------------------------- candidates


class MinimalLoRALinear(nn.Module):
    """The LoRA equation in three plain ops, as a reference point.

    y = x W^T + b + scaling * dropout(x) A^T B^T, with the low-rank term added in place
    into the base output (which autograd allows: the frozen matmul does not save its
    output).

    Args:
        base: The frozen layer whose weight and bias are shared.
        r: Rank.
        lora_alpha: Alpha; scaling = lora_alpha / r.
        lora_dropout: Dropout probability on the LoRA branch input.
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))  # (out, r)
        self.scaling = lora_alpha / r
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        low = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return y.add_(low, alpha=self.scaling)


def _lora_layers() -> ModuleType | None:
    """lora_layers if its layers are importable, else None."""
    try:
        import lora_layers

        lora_layers.Linear  # noqa: B018 - the probe
    except (ImportError, AttributeError):
        return None
    return lora_layers


def _random_ab(
    n_a: int, n_in: int, n_b: int, r: int, gen: torch.Generator, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaiming-like A (n_a, n_in) and a non-zero B (n_b, r) of the base weight's dtype."""
    a = (torch.rand(n_a, n_in, generator=gen) * 2 - 1) / math.sqrt(n_in)
    b = torch.randn(n_b, r, generator=gen) * 0.02
    return a.to(like.device, like.dtype), b.to(like.device, like.dtype)


def _lora_params(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (A, B) parameters of a candidate module, in (r, in) / (out, r) layout."""
    if name.startswith("peft"):
        return module.lora_A["default"].weight, module.lora_B["default"].weight
    return module.lora_A, module.lora_B


def _set_ab(name: str, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    pa, pb = _lora_params(name, module)
    with torch.no_grad():
        pa.copy_(a)
        pb.copy_(b)


def _peft_wrap(base: nn.Linear, dropout: float, target: str = "lin") -> nn.Module:
    import peft

    holder = nn.Module()
    setattr(holder, target, base)
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        target_modules=[target],
        init_lora_weights=False,
    )
    peft.inject_adapter_in_model(config, holder)
    return getattr(holder, target)


def _loralib_linear(base: nn.Linear, dropout: float) -> nn.Module:
    import loralib

    m = loralib.Linear(
        base.in_features,
        base.out_features,
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        bias=base.bias is not None,
        device="meta",
    )
    return _materialize_loralib(m, base)


def _materialize_loralib(m: nn.Module, base: nn.Linear) -> nn.Module:
    """Points a meta-built loralib layer at the shared base weight and real A/B tensors."""
    m.weight = base.weight
    if base.bias is not None:
        m.bias = base.bias
    kw = {"device": base.weight.device, "dtype": base.weight.dtype}
    m.lora_A = nn.Parameter(torch.zeros(m.lora_A.shape, **kw))
    m.lora_B = nn.Parameter(torch.zeros(m.lora_B.shape, **kw))
    if hasattr(m, "lora_ind"):  # MergedLinear's output-row mask, built on meta above
        m.lora_ind = _loralib_ind(m, base.weight.device)
    return m


def _loralib_ind(m: nn.Module, device: torch.device) -> torch.Tensor:
    ind = torch.zeros(m.out_features, dtype=torch.bool, device=device).view(len(m.enable_lora), -1)
    ind[list(m.enable_lora), :] = True
    return ind.view(-1)


def build_linear_candidates(
    base: nn.Linear, dropout: float, gen: torch.Generator
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Builds every candidate around one frozen `base`, all with the same non-zero A and B.

    Args:
        base: Frozen nn.Linear (shared, never modified).
        dropout: LoRA dropout probability.
        gen: Generator for A and B.

    Returns:
        (name -> module in train mode, name -> reason it is unavailable).
    """
    a, b = _random_ab(RANK, base.in_features, base.out_features, RANK, gen, base.weight)
    builders: dict[str, Callable[[], nn.Module]] = {
        "lora_layers": lambda: _lora_layers_linear(base, dropout),
        "loralib": lambda: _loralib_linear(base, dropout),
        "peft": lambda: _peft_wrap(base, dropout),
        "minimal": lambda: MinimalLoRALinear(base, RANK, ALPHA, dropout),
    }
    mods: dict[str, nn.Module] = {"nn.Linear": base}
    missing: dict[str, str] = {}
    for name, build in builders.items():
        try:
            mod = build()
        except _Unavailable as e:
            missing[name] = str(e)
            continue
        except Exception as e:  # a bug in a candidate must not hide the others' figures
            traceback.print_exc()
            missing[name] = f"error: {type(e).__name__}: {e}"
            continue
        _set_ab(name, mod, a, b)
        mod.train()  # loralib's train() returns None
        mods[name] = mod
    return mods, missing


class _Unavailable(Exception):
    """A candidate's library or API is not there (yet)."""


def _lora_layers_linear(base: nn.Linear, dropout: float) -> nn.Module:
    ll = _lora_layers()
    if ll is None:
        raise _Unavailable("n/a (not available)")
    return ll.Linear.from_module(base, r=RANK, lora_alpha=ALPHA, lora_dropout=dropout)


def build_fused_candidates(
    base: nn.Linear, dropout: float, gen: torch.Generator
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Fused-qkv candidates with q and v adapted (PEFT: one LoRA on the whole qkv).

    Args:
        base: Frozen qkv nn.Linear (3 equal slices).
        dropout: LoRA dropout probability.
        gen: Generator for A and B.

    Returns:
        (name -> module in train mode, name -> reason it is unavailable).
    """
    import loralib

    n_on = sum(QKV_ENABLE)
    slice_out = base.out_features // len(QKV_ENABLE)
    a, b = _random_ab(RANK * n_on, base.in_features, slice_out * n_on, RANK, gen, base.weight)
    mods: dict[str, nn.Module] = {"nn.Linear": base}
    missing: dict[str, str] = {}
    ll = _lora_layers()
    if ll is None or not hasattr(ll, "MergedLinear"):
        missing["lora_layers"] = "n/a (not available)"
    else:
        try:
            m = ll.MergedLinear.from_module(
                base, r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, enable_lora=QKV_ENABLE
            )
            _set_ab("lora_layers", m, a, b)
            m.train()
            mods["lora_layers"] = m
        except Exception as e:
            traceback.print_exc()
            missing["lora_layers"] = f"error: {type(e).__name__}: {e}"
    lm = loralib.MergedLinear(
        base.in_features,
        base.out_features,
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        enable_lora=list(QKV_ENABLE),
        bias=base.bias is not None,
        device="meta",
    )
    lm = _materialize_loralib(lm, base)
    _set_ab("loralib", lm, a, b)
    lm.train()  # returns None in loralib
    mods["loralib"] = lm
    pm = _peft_wrap(base, dropout)
    pa, pb = _random_ab(RANK, base.in_features, base.out_features, RANK, gen, base.weight)
    _set_ab("peft", pm, pa, pb)
    pm.train()
    mods["peft"] = pm
    return mods, missing


def _frozen_linear(n_in: int, n_out: int, cfg: Config, gen: torch.Generator) -> nn.Linear:
    """A bias-free (as in Phi-3) frozen nn.Linear around the shared weight of this shape."""
    del gen  # the weight comes from its own seeded generator, see _base_weight
    lin = nn.Linear(n_in, n_out, bias=False, device="meta")
    lin.weight = _base_weight(n_in, n_out, cfg.device, cfg.dtype, cfg.seed)
    return lin


@functools.cache
def _base_weight(
    n_in: int, n_out: int, device: torch.device, dtype: torch.dtype, seed: int
) -> nn.Parameter:
    """One frozen random weight per shape, reused by every benchmark (never modified)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n_in * 7 + n_out)
    w = (torch.rand(n_out, n_in, generator=gen) * 2 - 1) / math.sqrt(n_in)
    return nn.Parameter(w.to(device, dtype), requires_grad=False)


def _inputs(
    n_in: int, n_out: int, tokens: int, cfg: Config, gen: torch.Generator, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(1, tokens, n_in, generator=gen).to(cfg.device, cfg.dtype)
    g = torch.randn(1, tokens, n_out, generator=gen).to(cfg.device, cfg.dtype)
    return x.requires_grad_(grad), g


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> None:
        module(x)

    return run


def _fwd_bwd(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], Any]:
    params = _trainable(module)

    def run() -> None:
        module(x).backward(g)
        x.grad = None
        for p in params:
            p.grad = None

    return run


# ----------------------------------------------------------------------------- results


@dataclass
class Results:
    """Rows collected so far, with lookup helpers for the target checks.

    Attributes:
        rows: All measured rows, in measurement order.
        notes: Warnings to print at the end (mismatches, errors).
    """

    rows: list[U.Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: U.Row) -> None:
        """Appends one row."""
        self.rows.append(row)

    def find(self, **match: Any) -> list[U.Row]:
        """Rows whose fields equal every given keyword."""
        return [r for r in self.rows if all(getattr(r, k) == v for k, v in match.items())]

    def one(self, **match: Any) -> U.Row | None:
        """The single row matching, or None."""
        found = self.find(**match)
        return found[0] if len(found) == 1 else None


def _add_missing(
    res: Results, missing: dict[str, str], section: str, case: str, metric: str, unit: str, **kw
) -> None:
    for name, why in missing.items():
        res.add(U.Row(section, case, name, metric, None, unit, note=why, **kw))


def _add_timings(
    res: Results,
    timings: dict[str, U.Timing],
    section: str,
    case: str,
    metric: str,
    reference: str,
    **kw: Any,
) -> None:
    ref = timings[reference]
    for name, t in timings.items():
        res.add(
            U.Row(
                section,
                case,
                name,
                metric,
                t.median * 1e3,
                "ms",
                ratio=U.paired_ratio(t, ref),
                reference=reference,
                spread=t.spread,
                rounds=len(t.seconds),
                **kw,
            )
        )


# ----------------------------------------------------------------------------- benchmarks


def bench_check(cfg: Config, res: Results) -> None:
    """Checks every candidate computes the same output and gradients (dropout 0, tiny shape).

    A benchmark of wrong code is worthless, so mismatches are printed and recorded.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    n_in, n_out, tokens = cfg.tiny
    tol = 1e-4 if cfg.dtype == torch.float32 else 3e-2
    cases = {
        f"linear {n_in}->{n_out}": (build_linear_candidates, n_out),
        f"fused qkv {n_in}->{3 * n_out}": (build_fused_candidates, 3 * n_out),
    }
    for case, (build, out) in cases.items():
        base = _frozen_linear(n_in, out, cfg, gen)
        mods, missing = build(base, 0.0, gen)
        _add_missing(res, missing, "check", case, "max_rel_err", "", tokens=tokens, dropout=0.0)
        x, g = _inputs(n_in, out, tokens, cfg, gen)
        ref_name = "minimal" if "minimal" in mods else "loralib"
        results = {}
        for name, mod in mods.items():
            if name in ("nn.Linear",) or (case.startswith("fused") and name == "peft"):
                continue
            y = mod(x)
            y.backward(g)
            results[name] = (y.detach().float(), x.grad.float(), *_grads_ab(name, mod))
            x.grad = None
        ref = results[ref_name]
        for name, got in results.items():
            err = max(
                ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                for a, b in zip(got, ref, strict=True)
            )
            ok = err <= tol
            res.add(
                U.Row(
                    "check",
                    case,
                    name,
                    "max_rel_err",
                    err,
                    "",
                    tokens=tokens,
                    dropout=0.0,
                    reference=ref_name,
                    note="" if ok else f"MISMATCH (> {tol})",
                )
            )
            if not ok:
                res.notes.append(f"{case}: {name} differs from {ref_name}: max rel err {err:.3g}")


def _grads_ab(name: str, mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _lora_params(name, mod)
    return a.grad.float(), b.grad.float()


def bench_linear(cfg: Config, res: Results) -> None:
    """Training forward and forward+backward of every candidate at the four shapes."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for shape, (n_in, n_out) in cfg.shapes.items():
        case = f"{shape} {n_in}->{n_out}"
        base = _frozen_linear(n_in, n_out, cfg, gen)
        for tokens in cfg.tokens:
            _time_layer(cfg, res, "linear", case, base, build_linear_candidates, tokens, gen)
            _progress(f"linear {case} tokens={tokens}")


def _time_layer(
    cfg: Config,
    res: Results,
    section: str,
    case: str,
    base: nn.Linear,
    build: Callable[..., tuple[dict[str, nn.Module], dict[str, str]]],
    tokens: int,
    gen: torch.Generator,
) -> None:
    """Times the frozen base and the candidates around it, all dropouts in one interleaving."""
    x, g = _inputs(base.in_features, base.out_features, tokens, cfg, gen)
    fns: dict[str, dict[str, Callable[[], Any]]] = {
        "fwd_ms": {"nn.Linear": _fwd(base, x)},
        "fwd_bwd_ms": {"nn.Linear": _fwd_bwd(base, x, g)},
    }
    for p in cfg.timing_dropouts:
        mods, missing = build(base, p, gen)
        missing = {k: v for k, v in missing.items() if k in cfg.timed_candidates}
        for metric in cfg.timed_metrics:
            _add_missing(res, missing, section, case, metric, "ms", tokens=tokens, dropout=p)
        for name, mod in mods.items():
            if name in cfg.timed_candidates:
                fns["fwd_ms"][f"{name}@{p}"] = _fwd(mod, x)
                fns["fwd_bwd_ms"][f"{name}@{p}"] = _fwd_bwd(mod, x, g)
    for metric in cfg.timed_metrics:
        t = U.interleaved_timings(
            fns[metric],
            rounds=cfg.rounds,
            round_time_s=cfg.round_time_s,
            num_threads=cfg.num_threads,
        )
        _add_split_timings(res, t, section, case, metric, tokens)


def _add_split_timings(
    res: Results, t: dict[str, U.Timing], section: str, case: str, metric: str, tokens: int
) -> None:
    """Adds timings keyed "name@dropout" (plus the dropout-free reference) as rows."""
    ref = t["nn.Linear"]
    dropouts = sorted({float(k.split("@")[1]) for k in t if "@" in k})
    for p in dropouts:
        group = {"nn.Linear": ref} | {
            k.split("@")[0]: v for k, v in t.items() if k.endswith(f"@{p}")
        }
        _add_timings(res, group, section, case, metric, "nn.Linear", tokens=tokens, dropout=p)
        if "lora_layers" not in group:
            continue
        for peer in ("loralib", "peft"):  # paired per round, so drift cancels
            if peer in group:
                r = U.paired_ratio(group["lora_layers"], group[peer])
                res.add(
                    U.Row(
                        section,
                        case,
                        "lora_layers",
                        f"{metric}_vs_{peer}",
                        r,
                        "x",
                        tokens=tokens,
                        dropout=p,
                        ratio=r,
                        reference=peer,
                        rounds=len(ref.seconds),
                    )
                )


def bench_fused(cfg: Config, res: Results) -> None:
    """Fused qkv 3072 -> 9216 with q and v adapted, against the frozen base."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    n_in, n_out = cfg.shapes["qkv"]
    case = f"fused qkv {n_in}->{n_out} (q,v)"
    base = _frozen_linear(n_in, n_out, cfg, gen)
    for tokens in cfg.tokens:
        _time_layer(cfg, res, "fused_qkv", case, base, build_fused_candidates, tokens, gen)
        _progress(f"fused qkv tokens={tokens}")


def bench_merged(cfg: Config, res: Results) -> None:
    """Merged inference: lora_layers in eval() (merged) against nn.Linear."""
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    ll = _lora_layers()
    for shape, (n_in, n_out) in cfg.shapes.items():
        case = f"{shape} {n_in}->{n_out}"
        base = _frozen_linear(n_in, n_out, cfg, gen)
        for tokens in cfg.tokens:
            if ll is None:
                res.add(
                    U.Row(
                        "merged",
                        case,
                        "lora_layers",
                        "merged_fwd_ms",
                        None,
                        "ms",
                        tokens=tokens,
                        note="n/a (not available)",
                    )
                )
                continue
            mods, _ = build_linear_candidates(base, 0.0, gen)
            merged = mods["lora_layers"].eval()
            x, _ = _inputs(n_in, n_out, tokens, cfg, gen, grad=False)
            fns = {
                name: _inference(m, x) for name, m in (("nn.Linear", base), ("lora_layers", merged))
            }
            t = U.interleaved_timings(
                fns, rounds=cfg.rounds, round_time_s=cfg.round_time_s, num_threads=cfg.num_threads
            )
            _add_timings(res, t, "merged", case, "merged_fwd_ms", "nn.Linear", tokens=tokens)
        _progress(f"merged {case}")
    # op counts at the tiny shape, both counting methods
    n_in, n_out, tokens = cfg.tiny
    case = f"tiny {n_in}->{n_out}"
    if ll is None:
        for metric in ("merged_aten_ops_profiler", "merged_aten_ops_dispatch"):
            res.add(
                U.Row(
                    "merged",
                    case,
                    "lora_layers",
                    metric,
                    None,
                    "ops",
                    tokens=tokens,
                    note="n/a (not available)",
                )
            )
        return
    base = _frozen_linear(n_in, n_out, cfg, gen)
    mods, _ = build_linear_candidates(base, 0.0, gen)
    x, _ = _inputs(n_in, n_out, tokens, cfg, gen, grad=False)
    seqs = {}
    for name, m in (("nn.Linear", base), ("lora_layers", mods["lora_layers"].eval())):
        fn = _inference(m, x)
        fn()
        prof = U.count_profiled_aten_ops(fn)
        disp = U.count_dispatched_ops(fn)
        seqs[name] = disp
        res.add(
            U.Row(
                "merged",
                case,
                name,
                "merged_aten_ops_profiler",
                sum(prof.values()),
                "ops",
                tokens=tokens,
                note=_top_ops(prof),
            )
        )
        res.add(
            U.Row(
                "merged",
                case,
                name,
                "merged_aten_ops_dispatch",
                sum(disp.values()),
                "ops",
                tokens=tokens,
                note=_top_ops(disp),
            )
        )
    if seqs["nn.Linear"] != seqs["lora_layers"]:
        res.notes.append(
            f"merged inference dispatches different ops: nn.Linear {dict(seqs['nn.Linear'])} "
            f"vs lora_layers {dict(seqs['lora_layers'])}"
        )


def _inference(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> None:
        with torch.inference_mode():
            module(x)

    return run


def _top_ops(ops: collections.Counter[str], n: int | None = None) -> str:
    return " ".join(
        f"{k.removeprefix('aten::').removeprefix('aten.')}:{v}" for k, v in ops.most_common(n)
    )


def bench_bytes(cfg: Config, res: Results) -> None:
    """Bytes saved for backward per candidate (linear shapes and fused qkv), both dropouts."""
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    tokens = min(cfg.tokens)
    cases: list[tuple[str, str, int, int, Callable]] = [
        ("saved_bytes", f"{s} {i}->{o}", i, o, build_linear_candidates)
        for s, (i, o) in cfg.shapes.items()
    ]
    i, o = cfg.shapes["qkv"]
    cases.append(("saved_bytes", f"fused qkv {i}->{o} (q,v)", i, o, build_fused_candidates))
    for section, case, n_in, n_out, build in cases:
        base = _frozen_linear(n_in, n_out, cfg, gen)
        x, _ = _inputs(n_in, n_out, tokens, cfg, gen)
        x_bytes = x.numel() * x.element_size()
        for p in DROPOUTS:
            mods, missing = build(base, p, gen)
            _add_missing(
                res, missing, section, case, "saved_bytes", "bytes", tokens=tokens, dropout=p
            )
            for name, mod in mods.items():
                exclude = [*mod.parameters(), *mod.buffers()]
                sb = U.saved_activation_bytes(lambda mod=mod, x=x: mod(x), exclude=exclude)
                detail = " ".join(f"{k}:{v}" for k, v in sorted(sb.by_shape.items()))
                res.add(
                    U.Row(
                        section,
                        case,
                        name,
                        "saved_bytes",
                        sb.total,
                        "bytes",
                        tokens=tokens,
                        dropout=p,
                        ratio=sb.total / x_bytes,
                        reference="input",
                        note=f"{sb.tensors} tensors; {detail}",
                    )
                )
        _progress(f"bytes {case}")


def bench_ops(cfg: Config, res: Results) -> None:
    """ATen ops of one forward+backward at the tiny shape (1, 4, 256) -> 256."""
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    n_in, n_out, tokens = cfg.tiny
    case = f"tiny {n_in}->{n_out}"
    base = _frozen_linear(n_in, n_out, cfg, gen)
    x, g = _inputs(n_in, n_out, tokens, cfg, gen)
    for p in DROPOUTS:
        mods, missing = build_linear_candidates(base, p, gen)
        for metric in ("aten_ops_profiler", "aten_ops_dispatch"):
            _add_missing(res, missing, "aten_ops", case, metric, "ops", tokens=tokens, dropout=p)
        for name, mod in mods.items():
            fn = _fwd_bwd(mod, x, g)
            fn()
            fn()
            prof = U.count_profiled_aten_ops(fn)
            disp = U.count_dispatched_ops(fn)
            for metric, ops in (("aten_ops_profiler", prof), ("aten_ops_dispatch", disp)):
                res.add(
                    U.Row(
                        "aten_ops",
                        case,
                        name,
                        metric,
                        sum(ops.values()),
                        "ops",
                        tokens=tokens,
                        dropout=p,
                        note=_top_ops(ops),
                    )
                )
    _progress("aten ops")


def bench_inject(cfg: Config, res: Results) -> None:
    """Injection time into a meta-device Phi-3-mini skeleton: lora_layers vs PEFT."""
    import peft
    from transformers import Phi3Config, Phi3ForCausalLM

    overrides = dict(cfg.model_overrides)
    case = f"meta Phi3ForCausalLM(Phi3Config({_kw(overrides)}))"

    def skeleton() -> nn.Module:
        with torch.device("meta"):
            return Phi3ForCausalLM(Phi3Config(**overrides))

    def run_peft(model: nn.Module) -> None:
        config = peft.LoraConfig(target_modules="all-linear", r=RANK, lora_alpha=ALPHA)
        peft.get_peft_model(model, config)

    ll = _lora_layers()
    inject = getattr(ll, "inject_lora", None) if ll is not None else None

    def run_ll(model: nn.Module) -> None:
        inject(model, target_modules="all-linear", r=RANK, lora_alpha=ALPHA)

    runners = {"peft": run_peft} | ({"lora_layers": run_ll} if inject is not None else {})
    secs: dict[str, list[float]] = {k: [] for k in runners}
    errors: dict[str, str] = {}
    for _ in range(cfg.inject_reps):  # interleaved, a fresh skeleton each time
        for name, run in runners.items():
            if name in errors:
                continue
            model = skeleton()
            t0 = time.perf_counter()
            try:
                run(model)
            except Exception as e:
                traceback.print_exc()
                errors[name] = f"error: {type(e).__name__}: {e}"
                continue
            secs[name].append(time.perf_counter() - t0)
            del model
    peft_s = _median(secs["peft"])
    for name in ("lora_layers", "peft"):
        s = secs.get(name)
        if not s:
            why = errors.get(name, "n/a (not available)")
            res.add(U.Row("inject", case, name, "inject_s", None, "s", note=why))
            continue
        v = _median(s)
        res.add(
            U.Row(
                "inject",
                case,
                name,
                "inject_s",
                v,
                "s",
                ratio=v / peft_s,
                reference="peft",
                spread=(max(s) - min(s)) / v,
                rounds=len(s),
            )
        )
    _progress("inject")


def _median(v: Sequence[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# ----------------------------------------------------------------------------- training step


def _kw(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _small_phi3(cfg: Config) -> nn.Module:
    """A frozen Phi-3-mini-width model with `cfg.train_layers` decoder layers.

    Built on meta and filled with small uniform values (fast; values do not change the cost),
    then the rotary buffers are rebuilt for real.
    """
    from transformers import Phi3Config, Phi3ForCausalLM
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    overrides = {**cfg.model_overrides, "num_hidden_layers": cfg.train_layers}
    config = Phi3Config(use_cache=False, **overrides)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.to_empty(device=cfg.device)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 6)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.uniform_(-0.02, 0.02, generator=gen)
        model.model.rotary_emb = Phi3RotaryEmbedding(config=config).to(cfg.device)
    return model.to(cfg.dtype).requires_grad_(False)


def _target_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear but the output head ("all-linear")."""
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not head:
                yield parent, attr, child


def _share_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are the same objects."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for parent, attr, lin in list(_target_linears(model)):
        setattr(parent, attr, make(lin))
    return model


def _fill_lora(model: nn.Module, name: str, seed: int) -> None:
    """Gives every LoRA module of `model` the same non-zero A, B for the same module order."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if (
            name.startswith("peft")
            and hasattr(mod, "lora_A")
            and isinstance(mod.lora_A, nn.ModuleDict)
        ):
            if "default" not in mod.lora_A:
                continue
        elif not isinstance(getattr(mod, "lora_A", None), nn.Parameter):
            continue
        pa, pb = _lora_params(name, mod)
        a, b = _random_ab(pa.shape[0], pa.shape[1], pb.shape[0], pb.shape[1], gen, pa)
        _set_ab(name, mod, a, b)


def _train_variants(cfg: Config, base: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    import loralib
    import peft

    p = TRAIN_DROPOUT
    builders: dict[str, Callable[[], nn.Module]] = {
        "peft": lambda: peft.get_peft_model(
            _share_copy(base),
            peft.LoraConfig(
                target_modules="all-linear",
                r=RANK,
                lora_alpha=ALPHA,
                lora_dropout=p,
                init_lora_weights=False,
            ),
        ),
        "loralib": lambda: _replace_linears(_share_copy(base), lambda lin: _loralib_linear(lin, p)),
        "minimal": lambda: _replace_linears(
            _share_copy(base), lambda lin: MinimalLoRALinear(lin, RANK, ALPHA, p)
        ),
    }
    ll = _lora_layers()
    missing: dict[str, str] = {}
    inject = getattr(ll, "inject_lora", None)
    if ll is None:
        missing["lora_layers"] = "n/a (not available)"
    elif inject is None:  # surgery not there yet: the same modules by hand
        builders["lora_layers"] = lambda: _replace_linears(
            _share_copy(base),
            lambda lin: ll.Linear.from_module(lin, r=RANK, lora_alpha=ALPHA, lora_dropout=p),
        )
    else:
        kw = {"target_modules": "all-linear", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": p}
        builders["lora_layers"] = lambda: inject(_share_copy(base), **kw)
        # inject_lora hooks the embeddings so their output requires grad (for reentrant
        # checkpointing); that adds the first block's input backward, which PEFT skips
        builders[NO_INPUT_GRAD] = lambda: inject(_share_copy(base), input_require_grads=False, **kw)
    builders = {k: builders[k] for k in cfg.train_variants if k in builders}
    variants: dict[str, nn.Module] = {}
    for name, build in builders.items():
        try:
            model = build()
        except Exception as e:
            traceback.print_exc()
            missing[name] = f"error: {type(e).__name__}: {e}"
            continue
        if name == "loralib":
            loralib.mark_only_lora_as_trainable(model)
        _fill_lora(model, name, cfg.seed + 7)
        model.train()
        variants[name] = model
    return variants, missing


def bench_train(cfg: Config, res: Results) -> None:
    """Step time and peak memory of a LoRA training step on a 2-layer Phi-3-mini-width model."""
    base = _small_phi3(cfg)
    c = base.config
    case = (
        f"Phi3 {c.hidden_size}/{c.intermediate_size}/vocab {c.vocab_size}, "
        f"{cfg.train_layers} layers, {cfg.train_tokens} tokens, all-linear r={RANK}, "
        f"dropout {TRAIN_DROPOUT}"
    )
    variants, missing = _train_variants(cfg, base)
    for metric, unit in (("step_ms", "ms"), ("peak_bytes", "bytes"), ("trainable_params", "")):
        _add_missing(
            res,
            missing,
            "train_step",
            case,
            metric,
            unit,
            tokens=cfg.train_tokens,
            dropout=TRAIN_DROPOUT,
        )
    gen = torch.Generator().manual_seed(cfg.seed + 8)
    ids = torch.randint(0, base.config.vocab_size, (1, cfg.train_tokens), generator=gen)
    ids = ids.to(cfg.device)
    steps: dict[str, Callable[[], Any]] = {}
    static: dict[str, int] = {}
    for name, model in variants.items():
        params = _trainable(model)
        opt = torch.optim.AdamW(params, lr=1e-4)
        steps[name] = _train_step(model, opt, ids)
        steps[name]()  # creates the optimizer state
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        static[name] = U.storage_bytes([*model.parameters(), *model.buffers(), *state, ids])
        res.add(
            U.Row(
                "train_step",
                case,
                name,
                "trainable_params",
                sum(p.numel() for p in params),
                "",
                tokens=cfg.train_tokens,
                dropout=TRAIN_DROPOUT,
            )
        )
    peaks = {
        name: static[name] + U.peak_memory_delta(step, cfg.device) for name, step in steps.items()
    }
    _progress("train step peak memory")
    # every step ran twice already (optimizer state, peak memory): no more warm-up
    t = U.interleaved_timings(
        steps,
        rounds=cfg.train_rounds,
        round_time_s=0.0,
        num_threads=cfg.num_threads,
        warmup=0,
        number=1,
    )
    ref = "peft"
    for name in steps:
        r = U.paired_ratio(t[name], t[ref])
        res.add(
            U.Row(
                "train_step",
                case,
                name,
                "step_ms",
                t[name].median * 1e3,
                "ms",
                tokens=cfg.train_tokens,
                dropout=TRAIN_DROPOUT,
                ratio=r,
                reference=ref,
                spread=t[name].spread,
                rounds=len(t[name].seconds),
            )
        )
        res.add(
            U.Row(
                "train_step",
                case,
                name,
                "peak_bytes",
                peaks[name],
                "bytes",
                tokens=cfg.train_tokens,
                dropout=TRAIN_DROPOUT,
                ratio=peaks[name] / peaks[ref],
                reference=ref,
                note=f"static {static[name]} + step peak {peaks[name] - static[name]}",
            )
        )
        step_peak = peaks[name] - static[name]
        res.add(
            U.Row(
                "train_step",
                case,
                name,
                "step_peak_bytes",
                step_peak,
                "bytes",
                tokens=cfg.train_tokens,
                dropout=TRAIN_DROPOUT,
                ratio=step_peak / (peaks[ref] - static[ref]),
                reference=ref,
                note="allocated during the step above what was live at its start",
            )
        )
    _progress("train step time")


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> Callable:
    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ----------------------------------------------------------------------------- targets


def _fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}x"


def _worst(rows: Sequence[U.Row]) -> U.Row | None:
    got = [r for r in rows if r.ratio is not None]
    return max(got, key=lambda r: r.ratio) if got else None


def _where(r: U.Row) -> str:
    p = "" if r.dropout is None else f", p={r.dropout:g}"
    return f"{r.case.split(' ')[0]}{p}"


def evaluate_targets(cfg: Config, res: Results) -> list[U.TargetResult]:
    """Checks the seven targets of the performance issue against the measured rows.

    Args:
        cfg: The run's settings.
        res: All measured rows.

    Returns:
        One TargetResult per target (N/A where a section did not run or lora_layers is absent).
    """
    out = []
    tok = cfg.max_tokens
    at = f"{tok} tokens" + (f", {cfg.mode}" if cfg.mode != "full" else "")

    # 1. Linear fwd+bwd / frozen <= 1.05 at every shape, never slower than loralib or PEFT.
    rows = res.find(section="linear", metric="fwd_bwd_ms", tokens=tok)
    ll = [r for r in rows if r.candidate == "lora_layers"]
    worst = _worst(ll)
    others = ", ".join(
        f"{c} max {_fmt_ratio(w.ratio)}"
        for c in ("loralib", "peft", "minimal")
        if (w := _worst([r for r in rows if r.candidate == c]))
    )
    if worst is None:
        out.append(
            U.TargetResult(
                1,
                "Linear fwd+bwd / frozen nn.Linear",
                f"<= 1.05 ({at})",
                "n/a",
                others,
                None,
                "lora_layers not measured",
            )
        )
    else:
        peers = [
            (r.ratio, r.reference, r.case, r.dropout)
            for c in ("loralib", "peft")
            for r in res.find(section="linear", metric=f"fwd_bwd_ms_vs_{c}", tokens=tok)
        ]
        peer_worst = max(peers) if peers else None
        ok = worst.ratio <= 1.05 and (peer_worst is None or peer_worst[0] <= 1.0)
        detail = f"worst vs frozen at {_where(worst)}"
        if peer_worst:
            detail += (
                f"; worst vs peers {peer_worst[0]:.3f}x of {peer_worst[1]} at "
                f"{peer_worst[2].split(' ')[0]}, p={peer_worst[3]:g}"
            )
        out.append(
            U.TargetResult(
                1,
                "Linear fwd+bwd / frozen nn.Linear, and <= loralib, PEFT",
                f"<= 1.05 ({at}); peers <= 1.00",
                f"max {_fmt_ratio(worst.ratio)}; vs peers max "
                f"{_fmt_ratio(peer_worst[0] if peer_worst else None)}",
                others,
                ok,
                detail,
            )
        )

    # 2. Bytes saved: <= 1.01x input at p=0, <= 1.07x at p=0.05.
    rows = [
        r
        for r in res.find(section="saved_bytes", metric="saved_bytes")
        if not r.case.startswith("fused")
    ]
    verdicts, meas, oth = [], [], []
    for p, lim in ((0.0, 1.01), (0.05, 1.07)):
        w = _worst([r for r in rows if r.candidate == "lora_layers" and r.dropout == p])
        if w is not None:
            verdicts.append(w.ratio <= lim)
            meas.append(f"p={p:g}: {_fmt_ratio(w.ratio)}")
        for c in ("loralib", "peft"):
            wc = _worst([r for r in rows if r.candidate == c and r.dropout == p])
            if wc:
                oth.append(f"{c} p={p:g}: {_fmt_ratio(wc.ratio)}")
    out.append(
        U.TargetResult(
            2,
            "Linear bytes saved for backward / input",
            "<= 1.01 (p=0); <= 1.07 (p=0.05)",
            "; ".join(meas) or "n/a",
            "; ".join(oth),
            all(verdicts) if len(verdicts) == 2 else None,
        )
    )

    # 3. Fused qkv (q, v): fwd+bwd <= 1.05x frozen, bytes <= 1.02x input (p=0).
    t_rows = res.find(section="fused_qkv", metric="fwd_bwd_ms", tokens=tok)
    b_rows = res.find(section="saved_bytes", metric="saved_bytes", dropout=0.0)
    b_rows = [r for r in b_rows if r.case.startswith("fused")]
    wt = _worst([r for r in t_rows if r.candidate == "lora_layers"])
    wb = _worst([r for r in b_rows if r.candidate == "lora_layers"])
    oth = []
    for c in ("loralib", "peft"):
        a = _worst([r for r in t_rows if r.candidate == c])
        b = _worst([r for r in b_rows if r.candidate == c])
        oth.append(
            f"{c}: {_fmt_ratio(a.ratio if a else None)} time, "
            f"{_fmt_ratio(b.ratio if b else None)} bytes"
        )
    ok = None if wt is None or wb is None else (wt.ratio <= 1.05 and wb.ratio <= 1.02)
    out.append(
        U.TargetResult(
            3,
            "Fused qkv (q,v) fwd+bwd / frozen; bytes / input",
            f"<= 1.05 ({at}); <= 1.02 (p=0)",
            f"{_fmt_ratio(wt.ratio if wt else None)} time (worst {_where(wt) if wt else '-'}); "
            f"{_fmt_ratio(wb.ratio if wb else None)} bytes",
            "; ".join(oth),
            ok,
        )
    )

    # 4. Merged inference: same ATen op count as nn.Linear, time ratio <= 1.02.
    t_rows = res.find(section="merged", metric="merged_fwd_ms", tokens=tok, candidate="lora_layers")
    wt = _worst(t_rows)
    counts = {}
    for metric in ("merged_aten_ops_profiler", "merged_aten_ops_dispatch"):
        for c in ("nn.Linear", "lora_layers"):
            r = res.one(section="merged", metric=metric, candidate=c)
            counts[(metric, c)] = None if r is None else r.value
    same = all(
        counts[(m, "lora_layers")] is not None
        and counts[(m, "lora_layers")] == counts[(m, "nn.Linear")]
        for m in ("merged_aten_ops_profiler", "merged_aten_ops_dispatch")
    )
    ok = (
        None
        if wt is None or counts[("merged_aten_ops_profiler", "lora_layers")] is None
        else (same and wt.ratio <= 1.02)
    )
    out.append(
        U.TargetResult(
            4,
            "Merged inference vs nn.Linear",
            f"same op count; time <= 1.02 ({at})",
            f"ops {counts[('merged_aten_ops_profiler', 'lora_layers')]}/"
            f"{counts[('merged_aten_ops_dispatch', 'lora_layers')]} (profiler/dispatch); "
            f"time max {_fmt_ratio(wt.ratio if wt else None)}",
            f"nn.Linear ops {counts[('merged_aten_ops_profiler', 'nn.Linear')]}/"
            f"{counts[('merged_aten_ops_dispatch', 'nn.Linear')]}",
            ok,
            f"worst at {_where(wt)}" if wt else "",
        )
    )

    # 5. Tiny-shape fwd+bwd ATen ops (profiler count, the issue's) <= 62.
    rows = res.find(section="aten_ops", metric="aten_ops_profiler", dropout=0.0)
    v = {r.candidate: r.value for r in rows}
    vd = {
        r.candidate: r.value
        for r in res.find(section="aten_ops", metric="aten_ops_profiler", dropout=0.05)
    }
    mine = v.get("lora_layers")
    out.append(
        U.TargetResult(
            5,
            "Tiny fwd+bwd ATen ops (256->256, 4 tokens, p=0)",
            "<= 62",
            f"{_n(mine)} (p=0.05: {_n(vd.get('lora_layers'))})",
            ", ".join(f"{c} {_n(v.get(c))}" for c in ("loralib", "peft", "minimal")),
            None if mine is None else mine <= 62,
        )
    )

    # 6. Injection into the meta Phi-3-mini skeleton <= 0.1 s.
    r = res.one(section="inject", candidate="lora_layers")
    rp = res.one(section="inject", candidate="peft")
    out.append(
        U.TargetResult(
            6,
            "inject_lora into meta Phi-3-mini (all-linear)",
            "<= 0.1 s",
            "n/a (not available)" if r is None or r.value is None else f"{r.value:.3f} s",
            f"peft {rp.value:.3f} s" if rp is not None and rp.value is not None else "peft n/a",
            None if r is None or r.value is None else r.value <= 0.1,
            "" if r is None or r.value is not None else r.note,
        )
    )

    # 7. Training step: lower peak than PEFT and loralib; step time <= PEFT's.
    pk = {r.candidate: r.value for r in res.find(section="train_step", metric="peak_bytes")}
    sp = {r.candidate: r.value for r in res.find(section="train_step", metric="step_peak_bytes")}
    st = {r.candidate: r for r in res.find(section="train_step", metric="step_ms")}

    def mem_time(c: str) -> str:
        return (
            f"{pk[c] / 2**20:.0f} MiB (step +{sp[c] / 2**20:.0f}), {_fmt_ratio(st[c].ratio)} time"
        )

    mine, mt = pk.get("lora_layers"), st.get("lora_layers")
    ok = None
    if mine is not None and mt is not None and mt.value is not None:
        ok = (
            all(mine < pk[c] for c in ("peft", "loralib") if pk.get(c) is not None)
            and mt.ratio <= 1.0
        )
    detail = ""
    if pk.get(NO_INPUT_GRAD) is not None:
        detail = f"{NO_INPUT_GRAD}: {mem_time(NO_INPUT_GRAD)}"
    out.append(
        U.TargetResult(
            7,
            f"Train step ({cfg.train_tokens} tokens, p={TRAIN_DROPOUT:g}): peak mem, time vs PEFT",
            "peak < PEFT, loralib; time <= 1.00x PEFT",
            "n/a" if mine is None or mt is None else mem_time("lora_layers"),
            ", ".join(
                f"{c} {mem_time(c)}"
                for c in ("peft", "loralib", "minimal")
                if pk.get(c) is not None
            ),
            ok,
            detail,
        )
    )
    return out


def _n(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


# ----------------------------------------------------------------------------- output


def print_rows(res: Results) -> None:
    """Prints every section as a compact table."""
    sections = list(dict.fromkeys(r.section for r in res.rows))
    for section in sections:
        rows = res.find(section=section)
        print(f"\n== {section}")
        print(
            U.format_table(
                [
                    "case",
                    "tok",
                    "p",
                    "candidate",
                    "metric",
                    "value",
                    "unit",
                    "ratio",
                    "vs",
                    "spread",
                    "note",
                ],
                [
                    [
                        r.case,
                        r.tokens,
                        r.dropout,
                        r.candidate,
                        r.metric,
                        _human(r.value, r.unit),
                        _unit(r.unit),
                        r.ratio,
                        r.reference,
                        r.spread,
                        r.note[:70],
                    ]
                    for r in rows
                ],
            )
        )


def _human(v: float | None, unit: str) -> float | None:
    if v is None:
        return None
    return v / 2**20 if unit == "bytes" else v


def _unit(unit: str) -> str:
    return "MiB" if unit == "bytes" else unit


def print_targets(targets: Sequence[U.TargetResult]) -> None:
    """Prints the target table."""
    print("\n== targets (issue 5)")
    print(
        U.format_table(
            ["#", "target", "threshold", "lora_layers", "others", "status"],
            [[t.number, t.name, t.threshold, t.measured, t.others, t.status] for t in targets],
        )
    )
    for t in targets:
        if t.detail:
            print(f"  {t.number}: {t.detail}")


def draw_chart(path: Path, cfg: Config, res: Results, targets: Sequence[U.TargetResult]) -> None:
    """Draws a 2x2 PNG: layer time ratios, bytes saved, tiny op counts, training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "nn.Linear": "#888888",
        "lora_layers": "#1f77b4",
        "loralib": "#ff7f0e",
        "peft": "#2ca02c",
        "minimal": "#9467bd",
    }
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    tok = cfg.max_tokens
    p = max(cfg.timing_dropouts)

    def bars(ax, groups, series, get, ylabel, title, line=None, log=False):
        series = [s for s in series if any(get(g, s) is not None for g in groups)]
        width = 0.8 / max(len(series), 1)
        for i, s in enumerate(series):
            vals = [get(g, s) for g in groups]
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(
                xs, [v if v is not None else 0 for v in vals], width, label=s, color=colors.get(s)
            )
            for x, v in zip(xs, vals, strict=True):
                if v is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if line is not None:
            ax.axhline(line, color="red", ls="--", lw=1)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.5)
        ax.legend(fontsize=7)

    def ratio(section, metric, case, cand, dropout):
        r = res.one(
            section=section, metric=metric, case=case, candidate=cand, tokens=tok, dropout=dropout
        )
        return None if r is None else r.ratio

    cases = [f"{s} {i}->{o}" for s, (i, o) in cfg.shapes.items()]
    fused = f"fused qkv {cfg.shapes['qkv'][0]}->{cfg.shapes['qkv'][1]} (q,v)"
    cands = ["lora_layers", "loralib", "peft", "minimal"]
    bars(
        axes[0, 0],
        [c.split(" ")[0] for c in cases] + ["fused qkv"],
        cands,
        lambda g, s: ratio(
            "fused_qkv" if g == "fused qkv" else "linear",
            "fwd_bwd_ms",
            fused if g == "fused qkv" else cases[[c.split(" ")[0] for c in cases].index(g)],
            s,
            p,
        ),
        "time / frozen nn.Linear",
        f"forward+backward, {tok} tokens, dropout {p:g}",
        line=1.05,
    )
    bars(
        axes[0, 1],
        ["o p=0", "o p=0.05", "fused p=0", "fused p=0.05"],
        cands,
        lambda g, s: _bytes_ratio(cfg, res, g, s),
        "bytes saved / input bytes",
        f"saved for backward, {min(cfg.tokens)} tokens (log scale)",
        line=1.0,
        log=True,
    )
    bars(
        axes[1, 0],
        ["p=0", "p=0.05"],
        ["nn.Linear", *cands],
        lambda g, s: _value(
            res.one(
                section="aten_ops", metric="aten_ops_profiler", candidate=s, dropout=float(g[2:])
            )
        ),
        "aten:: ops (profiler)",
        f"tiny {cfg.tiny[0]}->{cfg.tiny[1]}, {cfg.tiny[2]} tokens: fwd+bwd ops",
        line=62,
    )
    ax = axes[1, 1]
    names = [r.candidate for r in res.find(section="train_step", metric="peak_bytes")]
    mib = 2**20
    steps = [
        (_value(res.one(section="train_step", metric="step_peak_bytes", candidate=n)) or 0) / mib
        for n in names
    ]
    peaks = [
        (_value(res.one(section="train_step", metric="peak_bytes", candidate=n)) or 0) / mib
        for n in names
    ]
    times = [_value(res.one(section="train_step", metric="step_ms", candidate=n)) for n in names]
    ax.bar(names, steps, color=[colors.get(n, "#17becf") for n in names])
    for i, t in enumerate(times):
        label = f"peak {peaks[i]:.0f} MiB" + ("" if t is None else f"\n{t / 1e3:.2f} s/step")
        ax.text(i, steps[i], label, ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylim(top=max(steps, default=1) * 1.25)
    ax.set_ylabel("MiB allocated during the step")
    ax.set_title(
        f"training step, {cfg.train_layers}-layer Phi3 "
        f"{cfg.model_overrides.get('hidden_size', 3072)} wide, "
        f"{cfg.train_tokens} tokens, p={TRAIN_DROPOUT:g}",
        fontsize=10,
    )
    status = " ".join(f"T{t.number}:{t.status}" for t in targets)
    fig.suptitle(
        f"lora_layers benchmarks ({cfg.device.type}, {str(cfg.dtype)[6:]}"
        f"{'' if cfg.mode == 'full' else ', ' + cfg.mode}) - {status}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _value(r: U.Row | None) -> float | None:
    return None if r is None else r.value


def _bytes_ratio(cfg: Config, res: Results, group: str, cand: str) -> float | None:
    shape, p = group.split(" p=")
    qi, qo = cfg.shapes["qkv"]
    oi, oo = cfg.shapes["o"]
    case = f"fused qkv {qi}->{qo} (q,v)" if shape == "fused" else f"o {oi}->{oo}"
    r = res.one(section="saved_bytes", case=case, candidate=cand, dropout=float(p))
    return None if r is None else r.ratio


def machine_description(cfg: Config) -> str:
    """CPU model and core count, or the GPU name."""
    if cfg.device.type == "cuda":
        return torch.cuda.get_device_name(cfg.device)
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {cfg.num_threads} threads"


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for dist in ("peft", "loralib", "transformers", "lora_layers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    if _lora_layers() is None:
        out["lora_layers"] += " (layers not importable)"
    return out


_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmarks and writes the result files.

    Args:
        argv: Command-line arguments (default: sys.argv[1:]).

    Returns:
        Exit status: 0 (a failed target is a finding, not an error).
    """
    cfg = Config.from_args(argv)
    torch.manual_seed(cfg.seed)
    load_before = os.getloadavg()
    res = Results()
    runners = {
        "check": bench_check,
        "linear": bench_linear,
        "fused": bench_fused,
        "merged": bench_merged,
        "bytes": bench_bytes,
        "ops": bench_ops,
        "inject": bench_inject,
        "train": bench_train,
    }
    with torch.random.fork_rng(devices=[]):
        for name in cfg.sections:
            runners[name](cfg, res)
    elapsed = time.perf_counter() - _T0
    targets = evaluate_targets(cfg, res)
    meta: dict[str, Any] = {
        "command": " ".join(["python benchmarks/bench_lora.py", *(argv or sys.argv[1:])]),
        "machine": machine_description(cfg),
        "device": cfg.device.type,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "mode": cfg.mode,
        "tokens": list(cfg.tokens),
        "timing_dropouts": list(cfg.timing_dropouts),
        "rounds": cfg.rounds,
        "train_tokens": cfg.train_tokens,
        "sections": list(cfg.sections),
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "elapsed_s": round(elapsed, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **_versions(),
    }
    print_rows(res)
    print_targets(targets)
    for note in res.notes:
        print(f"WARNING: {note}")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg.out_dir / cfg.stem
    U.write_csv(stem.with_suffix(".csv"), res.rows)
    U.write_json(stem.with_suffix(".json"), meta, res.rows, targets)
    U.write_markdown(stem.with_suffix(".md"), meta, targets)
    draw_chart(stem.with_suffix(".png"), cfg, res, targets)
    print(
        f"\nwrote {stem}.{{csv,json,md,png}} in {elapsed:.0f} s "
        f"(load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
