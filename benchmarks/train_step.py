"""Training-step benchmark: step time and peak memory of LoRA fine-tuning a small Phi-3.

One step (forward, causal-LM loss, backward, AdamW step) of a 2-layer model with Phi-3-mini's
widths, LoRA on every linear layer but ``lm_head``, dropout 0.05; all variants share one copy
of the frozen weights. Peak memory = bytes live when the step starts + the peak of what the
step allocates on top (`utils.peak_memory_delta`).
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from benchmarks import utils as U
from benchmarks.candidates import (
    MinimalLoRALinear,
    lora_layers_module,
    lora_params,
    loralib_linear,
    random_ab,
    set_ab,
    trainable,
)
from benchmarks.records import Results, add_missing, progress
from benchmarks.settings import ALPHA, NO_INPUT_GRAD, RANK, TRAIN_DROPOUT, Config

__all__ = ["bench_train"]


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
    """Replaces every target linear of `model` by `make(linear)`, in place."""
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
        pa, pb = lora_params(name, mod)
        a, b = random_ab(pa.shape[0], pa.shape[1], pb.shape[0], pb.shape[1], gen, pa)
        set_ab(name, mod, a, b)


def _train_variants(cfg: Config, base: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The LoRA variants of `base` in `cfg.train_variants`, sharing its frozen weights.

    Returns:
        (name -> model in train mode with non-zero A and B, name -> reason it is unavailable).
    """
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
        "loralib": lambda: _replace_linears(_share_copy(base), lambda lin: loralib_linear(lin, p)),
        "minimal": lambda: _replace_linears(
            _share_copy(base), lambda lin: MinimalLoRALinear(lin, RANK, ALPHA, p)
        ),
    }
    ll = lora_layers_module()
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
        add_missing(
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
    steps, static = _prepare_steps(cfg, res, case, variants, ids)
    peaks = {
        name: static[name] + U.peak_memory_delta(step, cfg.device) for name, step in steps.items()
    }
    progress("train step peak memory")
    # every step ran twice already (optimizer state, peak memory): no more warm-up
    t = U.interleaved_timings(
        steps,
        rounds=cfg.train_rounds,
        round_time_s=0.0,
        num_threads=cfg.num_threads,
        warmup=0,
        number=1,
    )
    _add_step_rows(cfg, res, case, t, peaks, static)
    progress("train step time")


def _prepare_steps(
    cfg: Config, res: Results, case: str, variants: dict[str, nn.Module], ids: torch.Tensor
) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """One training step per variant, run once to create the optimizer state.

    Adds a "trainable_params" row per variant.

    Returns:
        (name -> step callable, name -> bytes live when a step starts: parameters, buffers,
        optimizer state and input, each storage once).
    """
    steps: dict[str, Callable[[], Any]] = {}
    static: dict[str, int] = {}
    for name, model in variants.items():
        params = trainable(model)
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
    return steps, static


def _add_step_rows(
    cfg: Config,
    res: Results,
    case: str,
    t: dict[str, U.Timing],
    peaks: dict[str, int],
    static: dict[str, int],
) -> None:
    """Adds step time, peak bytes and step-peak bytes per variant, each relative to PEFT."""
    ref = "peft"
    for name in t:
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


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> Callable:
    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
