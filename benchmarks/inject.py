"""Injection time: lora_layers' `inject_lora` against `peft.get_peft_model`.

Both inject LoRA into every linear layer but the output head ("all-linear", r=16, alpha=32)
of a `Phi3ForCausalLM` skeleton built under ``torch.device("meta")``, a fresh skeleton per
injection (its build is not timed); the libraries alternate, and the median is reported.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks import utils as U
from benchmarks.candidates import lora_layers_module
from benchmarks.records import Results, progress
from benchmarks.settings import ALPHA, RANK, Config

__all__ = ["bench_inject"]


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

    ll = lora_layers_module()
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
    progress("inject")


def _median(v: Sequence[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _kw(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())
