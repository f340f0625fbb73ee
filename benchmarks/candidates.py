"""The LoRA implementations `bench_lora.py` compares, built around one shared frozen layer.

Every LoRA candidate uses r=16, alpha=32, the same frozen base weight and the same non-zero
A and B (B = 0 would let libraries skip work). `bench_check` verifies that they compute the
same outputs and gradients before anything is timed. The call builders (`fwd_call`,
`fwd_bwd_call`, `inference_call`) wrap one module and its input into the zero-argument
callables the measuring helpers in `benchmarks.utils` take.
"""

from __future__ import annotations

import functools
import math
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import utils as U
from benchmarks.records import Results, add_missing
from benchmarks.settings import ALPHA, QKV_ENABLE, RANK, Config

__all__ = [
    "MinimalLoRALinear",
    "bench_check",
    "build_fused_candidates",
    "build_linear_candidates",
    "frozen_linear",
    "fwd_bwd_call",
    "fwd_call",
    "inference_call",
    "lora_layers_module",
    "lora_params",
    "loralib_linear",
    "make_inputs",
    "peft_wrap",
    "random_ab",
    "set_ab",
    "trainable",
]


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


def lora_layers_module() -> ModuleType | None:
    """lora_layers if its layers are importable, else None."""
    try:
        import lora_layers

        lora_layers.Linear  # noqa: B018 - the probe
    except (ImportError, AttributeError):
        return None
    return lora_layers


def random_ab(
    n_a: int, n_in: int, n_b: int, r: int, gen: torch.Generator, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaiming-like A (n_a, n_in) and a non-zero B (n_b, r) of the base weight's dtype."""
    a = (torch.rand(n_a, n_in, generator=gen) * 2 - 1) / math.sqrt(n_in)
    b = torch.randn(n_b, r, generator=gen) * 0.02
    return a.to(like.device, like.dtype), b.to(like.device, like.dtype)


def lora_params(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (A, B) parameters of a candidate module, in (r, in) / (out, r) layout."""
    if name.startswith("peft"):
        return module.lora_A["default"].weight, module.lora_B["default"].weight
    return module.lora_A, module.lora_B


def set_ab(name: str, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """Copies `a` and `b` into the LoRA parameters of candidate `name`'s `module`."""
    pa, pb = lora_params(name, module)
    with torch.no_grad():
        pa.copy_(a)
        pb.copy_(b)


def peft_wrap(base: nn.Linear, dropout: float, target: str = "lin") -> nn.Module:
    """PEFT's LoRA layer around `base`, injected by `peft.inject_adapter_in_model`."""
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


def loralib_linear(base: nn.Linear, dropout: float, enable_lora: Sequence[bool] = ()) -> nn.Module:
    """A `loralib.Linear` on `base`'s weight and bias (built on meta, then pointed at them).

    With ``enable_lora``, a `loralib.MergedLinear` with those slices enabled.
    """
    import loralib

    merged = {"enable_lora": list(enable_lora)} if enable_lora else {}
    m = (loralib.MergedLinear if enable_lora else loralib.Linear)(
        base.in_features,
        base.out_features,
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        bias=base.bias is not None,
        device="meta",
        **merged,
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
    a, b = random_ab(RANK, base.in_features, base.out_features, RANK, gen, base.weight)
    builders: dict[str, Callable[[], nn.Module]] = {
        "lora_layers": lambda: _lora_layers_linear(base, dropout),
        "loralib": lambda: loralib_linear(base, dropout),
        "peft": lambda: peft_wrap(base, dropout),
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
        set_ab(name, mod, a, b)
        mod.train()  # loralib's train() returns None
        mods[name] = mod
    return mods, missing


class _Unavailable(Exception):
    """A candidate's library or API is not there (yet)."""


def _lora_layers_linear(base: nn.Linear, dropout: float) -> nn.Module:
    ll = lora_layers_module()
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
    n_on = sum(QKV_ENABLE)
    slice_out = base.out_features // len(QKV_ENABLE)
    a, b = random_ab(RANK * n_on, base.in_features, slice_out * n_on, RANK, gen, base.weight)
    mods: dict[str, nn.Module] = {"nn.Linear": base}
    missing: dict[str, str] = {}
    ll = lora_layers_module()
    if ll is None or not hasattr(ll, "MergedLinear"):
        missing["lora_layers"] = "n/a (not available)"
    else:
        try:
            m = ll.MergedLinear.from_module(
                base, r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, enable_lora=QKV_ENABLE
            )
            set_ab("lora_layers", m, a, b)
            m.train()
            mods["lora_layers"] = m
        except Exception as e:
            traceback.print_exc()
            missing["lora_layers"] = f"error: {type(e).__name__}: {e}"
    lm = loralib_linear(base, dropout, enable_lora=QKV_ENABLE)
    set_ab("loralib", lm, a, b)
    lm.train()  # returns None in loralib
    mods["loralib"] = lm
    pm = peft_wrap(base, dropout)
    pa, pb = random_ab(RANK, base.in_features, base.out_features, RANK, gen, base.weight)
    set_ab("peft", pm, pa, pb)
    pm.train()
    mods["peft"] = pm
    return mods, missing


def frozen_linear(n_in: int, n_out: int, cfg: Config, gen: torch.Generator) -> nn.Linear:
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


def make_inputs(
    n_in: int, n_out: int, tokens: int, cfg: Config, gen: torch.Generator, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random input (1, tokens, n_in), requiring grad if `grad`, and an output gradient."""
    x = torch.randn(1, tokens, n_in, generator=gen).to(cfg.device, cfg.dtype)
    g = torch.randn(1, tokens, n_out, generator=gen).to(cfg.device, cfg.dtype)
    return x.requires_grad_(grad), g


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that require grad."""
    return [p for p in module.parameters() if p.requires_grad]


def fwd_call(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """A callable running one training forward of `module` on `x`."""

    def run() -> None:
        module(x)

    return run


def fwd_bwd_call(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], Any]:
    """A callable running forward and backward (output gradient `g`), then clearing grads."""
    params = trainable(module)

    def run() -> None:
        module(x).backward(g)
        x.grad = None
        for p in params:
            p.grad = None

    return run


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
        base = frozen_linear(n_in, out, cfg, gen)
        mods, missing = build(base, 0.0, gen)
        add_missing(res, missing, "check", case, "max_rel_err", "", tokens=tokens, dropout=0.0)
        x, g = make_inputs(n_in, out, tokens, cfg, gen)
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
    a, b = lora_params(name, mod)
    return a.grad.float(), b.grad.float()


def inference_call(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """A callable running one forward of `module` on `x` under `torch.inference_mode`."""

    def run() -> None:
        with torch.inference_mode():
            module(x)

    return run
