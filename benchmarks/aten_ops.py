"""ATen op counts: one forward+backward at the tiny shape, and merged inference.

Counted two ways (`utils.count_profiled_aten_ops`, the issue's count of every ``aten::``
dispatcher round trip, and `utils.count_dispatched_ops`, the kernels that run); each row's
note lists the ops by frequency.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import utils as U
from benchmarks.candidates import (
    build_linear_candidates,
    frozen_linear,
    fwd_bwd_call,
    inference_call,
    lora_layers_module,
    make_inputs,
)
from benchmarks.records import Results, add_missing, progress
from benchmarks.settings import DROPOUTS, Config

__all__ = ["bench_ops", "count_merged_ops", "count_ops", "top_ops"]


def top_ops(ops: collections.Counter[str], n: int | None = None) -> str:
    """The `n` most frequent ops (default: all) as "name:count" words, "aten" prefix dropped."""
    return " ".join(
        f"{k.removeprefix('aten::').removeprefix('aten.')}:{v}" for k, v in ops.most_common(n)
    )


def count_ops(
    fn: Callable[[], Any], res: Results, section: str, case: str, name: str, prefix: str, **row: Any
) -> collections.Counter[str]:
    """Count ``fn``'s ATen ops both ways; add one row per count; return the dispatched ops."""
    prof, disp = U.count_profiled_aten_ops(fn), U.count_dispatched_ops(fn)
    for metric, ops in ((f"{prefix}_profiler", prof), (f"{prefix}_dispatch", disp)):
        total = sum(ops.values())
        res.add(U.Row(section, case, name, metric, total, "ops", note=top_ops(ops), **row))
    return disp


def bench_ops(cfg: Config, res: Results) -> None:
    """ATen ops of one forward+backward at the tiny shape (1, 4, 256) -> 256."""
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    n_in, n_out, tokens = cfg.tiny
    case = f"tiny {n_in}->{n_out}"
    base = frozen_linear(n_in, n_out, cfg, gen)
    x, g = make_inputs(n_in, n_out, tokens, cfg, gen)
    for p in DROPOUTS:
        mods, missing = build_linear_candidates(base, p, gen)
        for metric in ("aten_ops_profiler", "aten_ops_dispatch"):
            add_missing(res, missing, "aten_ops", case, metric, "ops", tokens=tokens, dropout=p)
        for name, mod in mods.items():
            fn = fwd_bwd_call(mod, x, g)
            fn()
            fn()
            count_ops(fn, res, "aten_ops", case, name, "aten_ops", tokens=tokens, dropout=p)
    progress("aten ops")


def count_merged_ops(cfg: Config, res: Results, gen: torch.Generator) -> None:
    """ATen ops of one merged inference call at the tiny shape: nn.Linear and lora_layers.

    Rows go to the "merged" section; a note is recorded if the two dispatch different ops.

    Args:
        cfg: The run's settings.
        res: Where the rows go.
        gen: Generator for the input and the LoRA weights.
    """
    n_in, n_out, tokens = cfg.tiny
    case = f"tiny {n_in}->{n_out}"
    if lora_layers_module() is None:
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
    base = frozen_linear(n_in, n_out, cfg, gen)
    mods, _ = build_linear_candidates(base, 0.0, gen)
    x, _ = make_inputs(n_in, n_out, tokens, cfg, gen, grad=False)
    seqs = {}
    for name, m in (("nn.Linear", base), ("lora_layers", mods["lora_layers"].eval())):
        fn = inference_call(m, x)
        fn()
        seqs[name] = count_ops(fn, res, "merged", case, name, "merged_aten_ops", tokens=tokens)
    if seqs["nn.Linear"] != seqs["lora_layers"]:
        res.notes.append(
            f"merged inference dispatches different ops: nn.Linear {dict(seqs['nn.Linear'])} "
            f"vs lora_layers {dict(seqs['lora_layers'])}"
        )
