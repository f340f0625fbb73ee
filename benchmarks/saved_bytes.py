"""Bytes saved for backward per candidate, relative to the input's bytes.

`utils.saved_activation_bytes` counts every tensor autograd packs during one training
forward (parameters and buffers excluded, each storage once), at the four Phi-3 shapes and
the fused qkv with q and v adapted, at dropout 0 and 0.05.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks import utils as U
from benchmarks.candidates import (
    build_fused_candidates,
    build_linear_candidates,
    frozen_linear,
    make_inputs,
)
from benchmarks.records import Results, add_missing, progress
from benchmarks.settings import DROPOUTS, Config

__all__ = ["bench_bytes"]


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
        base = frozen_linear(n_in, n_out, cfg, gen)
        x, _ = make_inputs(n_in, n_out, tokens, cfg, gen)
        x_bytes = x.numel() * x.element_size()
        for p in DROPOUTS:
            mods, missing = build(base, p, gen)
            add_missing(
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
        progress(f"bytes {case}")
