"""QLoRA benchmarks: LoRA on a bitsandbytes 4-bit base, lora_layers against PEFT's QLoRA.

    python benchmarks/bench_qlora.py --quick    # a few minutes on a 2-core CPU
    python benchmarks/bench_qlora.py            # the figures the README quotes

Sections (every LoRA candidate: r=16, alpha=32, fp32 LoRA parameters, the same non-zero A
and B, the same quantized weight):

* ``layer``: one ``bnb.nn.Linear4bit`` (NF4, double quantisation) at Phi-3-mini widths
  (o 3072->3072, down 8192->3072), compute fp32 at 1024 tokens and compute bf16 at 16 tokens
  (the frozen layer's bf16 backward matmul runs at ~0.5 s per token row on a CPU without
  AVX512-BF16, the same for every candidate: the time *ratios* are what count; bf16 is timed
  at dropout 0.05 only), dropout 0 and 0.05, input requiring grad (a mid-network layer). Candidates: the
  frozen ``Linear4bit`` alone, ``lora_layers`` (``inject_lora``: :class:`LoRALinear4bit`) and
  PEFT (``lora.bnb.Linear4bit``). Measured: bytes autograd saves for backward beyond the
  frozen layer, as a multiple of the input's bytes (`utils.saved_activation_bytes`; the
  frozen layer saves no activation, bitsandbytes keeps only a reference to the packed
  weight), and forward+backward time (`utils.interleaved_timings`).
* ``train_step``: a 2-decoder-layer model at Phi-3-mini width (hidden 3072, intermediate
  8192, vocab 32064) whose linear layers (all but ``lm_head``) are NF4 ``Linear4bit`` as
  transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)``
  builds them, compute fp32, LoRA on every linear layer, dropout 0.05, AdamW: step time and
  peak memory (bytes live at the step's start + the peak the step allocates, from the
  profiler's allocator events: `utils.peak_memory_delta`), ours vs PEFT.
* ``merge``: the tiny test Phi-3 in 4-bit with an adapter trained for 20 AdamW steps:
  how much of the update PEFT's merge (dequantize -> add -> re-quantize to 4-bit) loses,
  ``||requant(W + dW) - (W + dW)|| / ||dW||`` per layer, and the logits' max deviation from
  the adapter model after our dense ``merge_and_unload`` and after PEFT's.

``--quick`` runs fewer tokens and rounds; ``--smoke`` runs every section on tiny shapes in
seconds (CI; its figures mean nothing). Outputs: ``benchmarks/results/qlora_bench_cpu
[_quick|_smoke].{csv,json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lora_layers  # noqa: E402
from benchmarks import utils as U  # noqa: E402

RANK, ALPHA = 16, 32
DROPOUTS = (0.0, 0.05)
TRAIN_DROPOUT = 0.05
MINI = dict(hidden_size=3072, intermediate_size=8192, vocab_size=32064, num_attention_heads=32)


@dataclass(frozen=True)
class Config:
    """Settings of one run."""

    mode: str  # "full", "quick" or "smoke"
    shapes: dict[str, tuple[int, int]]  # name -> (in, out)
    tokens: dict[torch.dtype, int]  # compute dtype -> tokens per layer call
    bf16_shapes: tuple[str, ...]  # the shapes timed in bf16
    rounds: int
    step_tokens: int
    step_model: dict
    threads: int


def make_config(mode: str, threads: int) -> Config:
    """The grid of one mode: ``"full"``, ``"quick"`` or ``"smoke"``."""
    if mode == "smoke":
        tiny = dict(hidden_size=64, intermediate_size=128, vocab_size=128, num_attention_heads=4,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
        shapes = {"o": (64, 64), "down": (128, 64)}
        return Config(
            mode, shapes, {torch.float32: 16, torch.bfloat16: 8}, ("o",), 1, 16, tiny, threads
        )
    shapes = {"o": (3072, 3072), "down": (8192, 3072)}
    # bf16: the CPU's bf16 matmul in the frozen layer's backward (grad @ W) takes ~0.5 s per
    # token row at these widths on a CPU without AVX512-BF16, the same for every candidate.
    if mode == "quick":
        return Config(
            mode, shapes, {torch.float32: 256, torch.bfloat16: 8}, ("o",), 2, 256, MINI, threads
        )
    return Config(
        mode,
        shapes,
        {torch.float32: 1024, torch.bfloat16: 16},
        ("o", "down"),
        4,
        1024,
        MINI,
        threads,
    )


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ----------------------------------------------------------------------------- building
def quantized_linear(
    weight: torch.Tensor, compute_dtype: torch.dtype, bias: torch.Tensor | None = None
) -> nn.Module:
    """An NF4, double-quantised ``bnb.nn.Linear4bit`` holding ``weight``, as transformers builds it."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach(), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer.to("cpu")  # quantizes the weight


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every ``nn.Linear`` but the output head by an NF4 ``Linear4bit``, in place."""
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    for name in names:
        old = model.get_submodule(name)
        lora_layers.replace_module(
            model, name, quantized_linear(old.weight, compute_dtype, old.bias)
        )
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its bitsandbytes LoRA layer
    return model


class Holder(nn.Module):
    """One quantized layer as a model (``base``), for PEFT and inject_lora alike."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.is_loaded_in_4bit = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)


def peft_wrap(model: nn.Module, targets, dropout: float) -> nn.Module:
    """PEFT's LoRA (its bitsandbytes layers) on ``model``, LoRA parameters in fp32."""
    import peft

    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=False,
    )
    model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()
    return model


def share_lora(ours: nn.Module, theirs: nn.Module) -> None:
    """Give our LoRA layers PEFT's (random, non-zero) A and B."""
    for name, layer in lora_layers.lora_modules(ours):
        other = theirs.get_submodule(name)
        with torch.no_grad():
            layer.lora_A.copy_(other.lora_A["default"].weight)
            layer.lora_B.copy_(other.lora_B["default"].weight)


def lora_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- sections
def bench_layer(cfg: Config, rows: list[U.Row]) -> None:
    for dtype, tokens in cfg.tokens.items():
        dname = str(dtype).removeprefix("torch.")
        for shape_name, (in_f, out_f) in cfg.shapes.items():
            timed = dtype == torch.float32 or shape_name in cfg.bf16_shapes
            case = f"{shape_name} {in_f}->{out_f} {dname}"
            torch.manual_seed(0)
            weight = (torch.randn(out_f, in_f) / in_f**0.5).to(dtype)
            x = torch.randn(tokens, in_f, dtype=dtype, requires_grad=True)
            grad = torch.randn(tokens, out_f, dtype=dtype)
            input_bytes = x.numel() * x.element_size()
            for p in DROPOUTS:
                frozen = quantized_linear(weight, dtype).train()
                theirs = peft_wrap(Holder(copy.deepcopy(frozen)), ["base"], p).train()
                ours = lora_layers.inject_lora(
                    Holder(copy.deepcopy(frozen)),
                    ["base"],
                    r=RANK,
                    lora_alpha=ALPHA,
                    lora_dropout=p,
                ).train()
                share_lora(ours, theirs)
                cands = {"Linear4bit": frozen, "lora_layers": ours, "peft": theirs}
                for name, module in cands.items():
                    keep = [*module.parameters(), *module.buffers()]
                    saved = U.saved_activation_bytes(lambda m=module, x=x: m(x), exclude=keep)
                    rows.append(
                        U.Row("layer_saved", case, name, "saved_bytes", saved.total, "bytes",
                              tokens, p, saved.total / input_bytes, "input")
                    )  # fmt: skip

                def fwd_bwd(module: nn.Module, x=x, grad=grad) -> Callable[[], None]:
                    inputs = [x, *lora_params(module)]
                    return lambda: torch.autograd.grad(module(x), inputs, grad)

                if not timed or (dtype != torch.float32 and p == 0):
                    continue  # bf16 times only the harder case, p=0.05
                times = U.interleaved_timings(
                    {n: fwd_bwd(m) for n, m in cands.items()},
                    rounds=cfg.rounds,
                    round_time_s=0.0,
                    num_threads=cfg.threads,
                    number=1,  # every call takes long enough to time alone
                )
                for name, t in times.items():
                    rows.append(
                        U.Row("layer_time", case, name, "fwd_bwd_ms", t.median * 1e3, "ms", tokens,
                              p, U.paired_ratio(t, times["peft"]), "peft", t.spread, cfg.rounds)
                    )  # fmt: skip
                _progress(
                    f"layer {case} p={p}: "
                    + ", ".join(f"{n} {t.median * 1e3:.1f} ms" for n, t in times.items())
                )


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> int:
    tensors = [*model.parameters(), *model.buffers(), ids]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return U.storage_bytes(tensors)


def bench_train_step(cfg: Config, rows: list[U.Row]) -> None:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(num_hidden_layers=2, attn_implementation="eager", **cfg.step_model)
    torch.manual_seed(0)
    base = quantize_linears(Phi3ForCausalLM(config), torch.float32).train()
    theirs = peft_wrap(
        copy.deepcopy(base), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], TRAIN_DROPOUT
    )
    ours = lora_layers.inject_lora(
        base, "all-linear", r=RANK, lora_alpha=ALPHA, lora_dropout=TRAIN_DROPOUT
    )
    share_lora(ours, theirs)
    ids = torch.randint(3, config.vocab_size, (1, cfg.step_tokens))
    steps = {}
    for name, model in (("lora_layers", ours), ("peft", theirs)):
        opt = torch.optim.AdamW(lora_params(model), lr=1e-4)

        def step(model=model, opt=opt) -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # creates the optimizer state
        static = _state_bytes(model, opt, ids)
        peak = U.peak_memory_delta(step, torch.device("cpu"))
        steps[name] = step
        case = f"2 layers, hidden {config.hidden_size}, {cfg.step_tokens} tokens"
        rows.append(U.Row("train_step", case, name, "peak_bytes", static + peak, "bytes",
                          cfg.step_tokens, TRAIN_DROPOUT))  # fmt: skip
        rows.append(U.Row("train_step", case, name, "step_alloc_peak_bytes", peak, "bytes",
                          cfg.step_tokens, TRAIN_DROPOUT))  # fmt: skip
        _progress(
            f"train step {name}: static {static / 2**20:.0f} MiB + peak {peak / 2**20:.0f} MiB"
        )
    times = U.interleaved_timings(
        steps, rounds=max(2, cfg.rounds - 1), round_time_s=0.0, num_threads=cfg.threads, number=1
    )
    for name, t in times.items():
        rows.append(
            U.Row("train_step", case, name, "step_ms", t.median * 1e3, "ms", cfg.step_tokens,
                  TRAIN_DROPOUT, U.paired_ratio(t, times["peft"]), "peft", t.spread, len(t.seconds))
        )  # fmt: skip
    _progress("train step: " + ", ".join(f"{n} {t.median * 1e3:.0f} ms" for n, t in times.items()))


def bench_merge(cfg: Config, rows: list[U.Row]) -> None:
    import bitsandbytes as bnb
    import peft
    from transformers import BitsAndBytesConfig, Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        Phi3ForCausalLM(config).save_pretrained(tmp)
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip

        def load() -> nn.Module:
            return Phi3ForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map="cpu")

        ours = lora_layers.inject_lora(load(), "all-linear", r=RANK, lora_alpha=ALPHA).train()
        opt = torch.optim.AdamW(lora_params(ours), lr=1e-3)
        data = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))
        steps = 5 if cfg.mode == "smoke" else 20
        for _ in range(steps):
            ours(data, labels=data).loss.backward()
            opt.step()
            opt.zero_grad()
        ours.eval()
        theirs = peft.get_peft_model(
            load(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear")
        ).eval()
        for name, layer in lora_layers.lora_modules(ours):  # PEFT gets our trained A and B
            other = theirs.base_model.model.get_submodule(name)
            with torch.no_grad():
                other.lora_A["default"].weight.copy_(layer.lora_A)
                other.lora_B["default"].weight.copy_(layer.lora_B)
        ids = data[:2]
        with torch.no_grad():
            want = ours(ids).logits
            assert torch.allclose(theirs(ids).logits, want, atol=1e-4)
        lost = []
        for _, layer in lora_layers.lora_modules(ours):
            dense, delta = layer.dequantize().float(), layer.delta_weight()
            state = layer.weight.quant_state
            packed, qs = bnb.functional.quantize_4bit(
                dense + delta, blocksize=state.blocksize, quant_type=state.quant_type
            )
            requant = bnb.functional.dequantize_4bit(packed, qs)
            lost.append(float((requant - dense - delta).norm() / delta.norm()))
        lora_layers.merge_and_unload(ours)
        merged_peft = theirs.merge_and_unload()
        with torch.no_grad():
            ours_dev = float((ours(ids).logits - want).abs().max())
            peft_dev = float((merged_peft(ids).logits - want).abs().max())
    case = f"tiny Phi-3 4-bit, r={RANK}, {steps} AdamW steps"
    rows.append(U.Row("merge", case, "requantize", "update_lost_mean", sum(lost) / len(lost), "ratio",
                      note=f"||requant(W+dW)-(W+dW)||/||dW||, max {max(lost):.3f}"))  # fmt: skip
    rows.append(U.Row("merge", case, "lora_layers", "logits_max_abs_dev", ours_dev, "abs",
                      note="dense merge_and_unload vs the adapter model"))  # fmt: skip
    rows.append(U.Row("merge", case, "peft", "logits_max_abs_dev", peft_dev, "abs",
                      note="PEFT merge_and_unload (re-quantized) vs the adapter model"))  # fmt: skip
    _progress(
        f"merge: re-quantizing loses {sum(lost) / len(lost):.1%} of the update (mean over layers); "
        f"logits max dev: ours {ours_dev:.2e}, PEFT {peft_dev:.2e}"
    )


# ----------------------------------------------------------------------------- targets
def evaluate(cfg: Config, rows: Sequence[U.Row]) -> list[U.TargetResult]:
    """The issue's targets, checked on the measured rows (N/A where a section did not run)."""
    out = []

    def find(**kw) -> list[U.Row]:
        return [r for r in rows if all(getattr(r, k) == v for k, v in kw.items())]

    def na(number: int, name: str, threshold: str) -> U.TargetResult:
        return U.TargetResult(number, name, threshold, "n/a", "", None, "section not run")

    for number, p, limit in ((1, 0.0, 1.02), (2, 0.05, 1.08)):
        name = f"saved bytes beyond Linear4bit / input bytes, p={p}"
        ours = find(section="layer_saved", candidate="lora_layers", dropout=p)
        if not ours:
            out.append(na(number, name, f"<= {limit}"))
            continue
        frozen = {
            r.case: r.value for r in find(section="layer_saved", candidate="Linear4bit", dropout=p)
        }
        peft = find(section="layer_saved", candidate="peft", dropout=p)
        extra = [(r.value - frozen[r.case]) / (r.value / r.ratio) for r in ours]
        theirs = [(r.value - frozen[r.case]) / (r.value / r.ratio) for r in peft]
        out.append(
            U.TargetResult(
                number, name, f"<= {limit}", f"max {max(extra):.3f}",
                f"PEFT max {max(theirs):.3f}", max(extra) <= limit,
            )
        )  # fmt: skip
    times = find(section="layer_time", candidate="lora_layers")
    name = "layer fwd+bwd time / PEFT, every shape and dtype"
    if times:
        worst = max(times, key=lambda r: r.ratio)
        frozen = find(section="layer_time", candidate="Linear4bit")
        out.append(
            U.TargetResult(
                3, name, "<= 1.0", f"max {worst.ratio:.3f} ({worst.case}, p={worst.dropout})",
                f"frozen Linear4bit / PEFT: {min(r.ratio for r in frozen):.3f}.."
                f"{max(r.ratio for r in frozen):.3f}", worst.ratio <= 1.0,
            )
        )  # fmt: skip
    else:
        out.append(na(3, name, "<= 1.0"))
    peaks = {r.candidate: r.value for r in find(section="train_step", metric="peak_bytes")}
    steps = find(section="train_step", metric="step_ms", candidate="lora_layers")
    if peaks and steps:
        out.append(
            U.TargetResult(
                4, "2-layer 4-bit step peak memory / PEFT", "<= 1.0",
                f"{peaks['lora_layers'] / peaks['peft']:.3f} ({peaks['lora_layers'] / 2**20:.0f} MiB)",
                f"PEFT {peaks['peft'] / 2**20:.0f} MiB", peaks["lora_layers"] <= peaks["peft"],
            )
        )  # fmt: skip
        out.append(
            U.TargetResult(5, "2-layer 4-bit step time / PEFT", "<= 1.0", f"{steps[0].ratio:.3f}",
                           "", steps[0].ratio <= 1.0)
        )  # fmt: skip
    else:
        out.append(na(4, "2-layer 4-bit step peak memory / PEFT", "<= 1.0"))
        out.append(na(5, "2-layer 4-bit step time / PEFT", "<= 1.0"))
    dev = {r.candidate: r.value for r in find(section="merge", metric="logits_max_abs_dev")}
    name = "merge_and_unload logits vs adapter model (fp32)"
    if dev:
        out.append(
            U.TargetResult(
                6, name, "<= 1e-4", f"{dev['lora_layers']:.2e}",
                f"PEFT re-quantized {dev['peft']:.2e}", dev["lora_layers"] <= 1e-4,
            )
        )  # fmt: skip
    else:
        out.append(na(6, name, "<= 1e-4"))
    return out


SECTIONS: dict[str, Callable[[Config, list[U.Row]], None]] = {
    "layer": bench_layer,
    "train_step": bench_train_step,
    "merge": bench_merge,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes: checks the code runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], help="layer dtypes")
    parser.add_argument("--rounds", type=int, help="override the timing rounds")
    args = parser.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    """The mode's config with ``--dtypes`` / ``--rounds`` applied."""
    cfg = make_config(args.mode, args.threads)
    if args.dtypes:
        tokens = {
            d: n for d, n in cfg.tokens.items() if str(d).removeprefix("torch.") in args.dtypes
        }
        cfg = dataclasses.replace(cfg, tokens=tokens)
    if args.rounds:
        cfg = dataclasses.replace(cfg, rounds=args.rounds)
    return cfg


def print_results(rows: Sequence[U.Row], targets: Sequence[U.TargetResult]) -> None:
    headers = ["section", "case", "candidate", "metric", "value", "unit", "tokens", "p"]
    print(
        U.format_table(
            [*headers, "ratio", "vs"],
            [
                (r.section, r.case, r.candidate, r.metric, r.value, r.unit, r.tokens, r.dropout)
                + (r.ratio, r.reference)
                for r in rows
            ],
        )
    )
    print()
    print(
        U.format_table(
            ["#", "target", "threshold", "lora_layers", "others", "status"],
            [(t.number, t.name, t.threshold, t.measured, t.others, t.status) for t in targets],
        )
    )


def write_results(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    seconds: float,
    rows: Sequence[U.Row],
    targets: Sequence[U.TargetResult],
) -> None:
    """``qlora_bench_cpu[_mode][_sections][_dtypes][_1thread].{csv,json,md}`` under ``--out``."""
    name = args.mode
    machine = f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()}"
    meta = {
        "machine": f"{machine} threads".strip(),
        "torch": torch.__version__,
        "bitsandbytes": importlib.metadata.version("bitsandbytes"),
        "peft": importlib.metadata.version("peft"),
        "device": "cpu",
        "dtype": "nf4 base, fp32 LoRA",
        "mode": name,
        "command": " ".join(
            ["python benchmarks/bench_qlora.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "seconds": round(seconds, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if name == "full" else f"_{name}"
    if args.only:
        suffix += "_" + "_".join(args.only)
    if args.dtypes:
        suffix += "_" + "_".join(args.dtypes)
    if args.threads == 1 and name != "smoke":
        suffix += "_1thread"
    stem = args.out / ("qlora_bench_cpu" + suffix)
    U.write_csv(stem.with_suffix(".csv"), rows)
    U.write_json(stem.with_suffix(".json"), meta, rows, targets)
    U.write_markdown(stem.with_suffix(".md"), meta, targets)
    _progress(f"wrote {stem}.{{csv,json,md}} in {meta['seconds']} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    rows: list[U.Row] = []
    start = time.time()
    for section in args.only or SECTIONS:
        SECTIONS[section](cfg, rows)
    targets = evaluate(cfg, rows)
    print_results(rows, targets)
    write_results(args, argv, time.time() - start, rows, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
