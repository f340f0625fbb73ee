"""Layer timings: training forward(+backward) at the Phi-3 shapes, fused qkv, merged inference.

`bench_linear` and `bench_fused` time every candidate against the frozen `nn.Linear` with
`utils.interleaved_timings`, all dropouts of one shape and token count in one interleaving;
`bench_merged` times lora_layers merged in `eval()` against `nn.Linear` and counts the ATen
ops of both (`aten_ops.count_merged_ops`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks import utils as U
from benchmarks.aten_ops import count_merged_ops
from benchmarks.candidates import (
    build_fused_candidates,
    build_linear_candidates,
    frozen_linear,
    fwd_bwd_call,
    fwd_call,
    inference_call,
    lora_layers_module,
    make_inputs,
)
from benchmarks.records import Results, add_missing, add_timings, progress
from benchmarks.settings import Config

__all__ = ["bench_fused", "bench_linear", "bench_merged"]


def bench_linear(cfg: Config, res: Results) -> None:
    """Training forward and forward+backward of every candidate at the four shapes."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for shape, (n_in, n_out) in cfg.shapes.items():
        case = f"{shape} {n_in}->{n_out}"
        base = frozen_linear(n_in, n_out, cfg, gen)
        for tokens in cfg.tokens:
            _time_layer(cfg, res, "linear", case, base, build_linear_candidates, tokens, gen)
            progress(f"linear {case} tokens={tokens}")


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
    x, g = make_inputs(base.in_features, base.out_features, tokens, cfg, gen)
    fns: dict[str, dict[str, Callable[[], Any]]] = {
        "fwd_ms": {"nn.Linear": fwd_call(base, x)},
        "fwd_bwd_ms": {"nn.Linear": fwd_bwd_call(base, x, g)},
    }
    for p in cfg.timing_dropouts:
        mods, missing = build(base, p, gen)
        missing = {k: v for k, v in missing.items() if k in cfg.timed_candidates}
        for metric in cfg.timed_metrics:
            add_missing(res, missing, section, case, metric, "ms", tokens=tokens, dropout=p)
        for name, mod in mods.items():
            if name in cfg.timed_candidates:
                fns["fwd_ms"][f"{name}@{p}"] = fwd_call(mod, x)
                fns["fwd_bwd_ms"][f"{name}@{p}"] = fwd_bwd_call(mod, x, g)
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
        add_timings(res, group, section, case, metric, "nn.Linear", tokens=tokens, dropout=p)
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
    base = frozen_linear(n_in, n_out, cfg, gen)
    for tokens in cfg.tokens:
        _time_layer(cfg, res, "fused_qkv", case, base, build_fused_candidates, tokens, gen)
        progress(f"fused qkv tokens={tokens}")


def bench_merged(cfg: Config, res: Results) -> None:
    """Merged inference: lora_layers in eval() (merged) against nn.Linear."""
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    ll = lora_layers_module()
    for shape, (n_in, n_out) in cfg.shapes.items():
        case = f"{shape} {n_in}->{n_out}"
        base = frozen_linear(n_in, n_out, cfg, gen)
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
            x, _ = make_inputs(n_in, n_out, tokens, cfg, gen, grad=False)
            fns = {
                name: inference_call(m, x)
                for name, m in (("nn.Linear", base), ("lora_layers", merged))
            }
            t = U.interleaved_timings(
                fns, rounds=cfg.rounds, round_time_s=cfg.round_time_s, num_threads=cfg.num_threads
            )
            add_timings(res, t, "merged", case, "merged_fwd_ms", "nn.Linear", tokens=tokens)
        progress(f"merged {case}")
    count_merged_ops(cfg, res, gen)
