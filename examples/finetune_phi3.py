"""Fine-tune Phi-3 with LoRA on a chat-instruction dataset, in a plain PyTorch loop.

The classic Phi-3 LoRA recipe (a training config and a LoRA config; load the model and its
tokenizer; fine-tune on chat data; monitor; evaluate; save checkpoints) on lora_layers, with
no Trainer::

    python examples/finetune_phi3.py                       # the shipped tiny Phi-3, ~1 min on CPU
    python examples/finetune_phi3.py --config run.json     # a saved config (see config.json)
    python examples/finetune_phi3.py --model ~/models/Phi-3-mini-4k-instruct --data chats.jsonl
    python examples/finetune_phi3.py --resume latest       # continue the run in --output-dir

With no arguments it fine-tunes the small pretrained Phi-3 shipped in examples/tiny-phi3-base
(written by make_base.py; it knows the facts of examples/toy_tasks.py but has never seen a
chat instruction) to answer the shipped chat instructions (examples/data/), and prints the
held-out exact-match accuracy before and after. See docs/finetune-phi3.md; ``--help`` lists
every option.

The recipe is :func:`fine_tune`, read top to bottom. The settings are in finetune_config.py,
the chat format and data handling in chat_data.py, the loop's pieces in training.py, the
output folder (atomic writes, checkpoints, train.log) in run_files.py. Only a few lines call
lora_layers: ``inject_lora``, ``save_lora`` / ``load_lora`` and ``merge_and_unload``.

torch, transformers and lora_layers are imported inside the functions that use them, so
``--help`` and a mistyped flag answer at once.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import run_files
from checks import (
    check_output_dir,
    count_steps,
    encode_all,
    load_conversations,
    load_tokenizer,
    matplotlib_available,
    warn_unknown_characters,
)
from finetune_config import (
    BASE_MODEL_DIR,
    LoRAConfig,
    RunConfig,
    TrainingConfig,
    UserError,
    parse_args,
)
from run_files import ADAPTER_FILE, LOG_FILE, STATE_FILE

logger = logging.getLogger("finetune_phi3")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; also callable in-process (the tests do).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 for a user error (bad settings, data, folders), which is
        reported in one line. Bugs raise with their traceback.
    """
    try:
        cfg = parse_args(argv)
    except UserError as err:
        print(f"finetune_phi3.py: error: {err}", file=sys.stderr)
        return 2
    log = run_files.RunLog()
    try:
        with process_settings(cfg.training):
            fine_tune(cfg, log)
        return 0
    except UserError as err:
        if cfg.debug:
            raise
        print(f"finetune_phi3.py: error: {err}", file=sys.stderr)
        log.error_to_file(f"error: {err}", Path(cfg.training.output_dir))
        return 2
    finally:
        log.close()


# --------------------------------------------------------------------------- the recipe
@dataclass
class Run:
    """What the steps of one fine-tuning run share."""

    cfg: RunConfig
    out_dir: Path
    model: Any
    tokenizer: Any
    eval_convs: list
    train_set: list
    eval_set: list
    total_steps: int
    autocast: Any
    plot: bool
    before: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=lambda: {"train": [], "eval": []})
    start_step: int = 0
    started: float = field(default_factory=time.perf_counter)

    def evaluate(self) -> dict[str, Any]:
        """Held-out loss and exact match of the model as it is now."""
        import training

        tc = self.cfg.training
        return training.evaluate(
            self.model,
            self.tokenizer,
            self.eval_convs,
            self.eval_set,
            tc.max_new_tokens,
            tc.eval_batch_size,
            self.autocast,
        )


def fine_tune(cfg: RunConfig, log: run_files.RunLog) -> dict[str, Any]:
    """The whole fine-tune: check, load, evaluate the base, add LoRA, train, save, report.

    Returns:
        The metrics written to ``OUTPUT_DIR/metrics.json``.

    Raises:
        UserError: For bad data, model folder, ``--resume`` or output folder; all of these
            are found before the output folder is touched.
    """
    import chat_data
    import torch
    import training

    tc = cfg.training
    out_dir = Path(tc.output_dir)

    # 1. Check everything the user gave before the output folder is touched.
    checkpoint, resumed = check_output_dir(cfg, out_dir)
    train_convs, eval_convs, data_desc = load_conversations(tc)
    model_dir = Path(tc.model).expanduser() if tc.model else BASE_MODEL_DIR
    tokenizer = load_tokenizer(model_dir)
    warn_unknown_characters(tokenizer, train_convs + eval_convs)
    train_set = encode_all(tokenizer, train_convs, tc.max_seq_len, "training")
    eval_set = encode_all(tokenizer, eval_convs, tc.max_seq_len, "held-out")
    total_steps = count_steps(tc, len(train_set), resumed)
    logger.info("data: %s: %d training, %d held out", data_desc, len(train_set), len(eval_set))
    plot = matplotlib_available()

    # 2. The model (the tiny base is shipped in the repository, nothing is downloaded).
    device = training.resolve_device(tc.device)
    model = load_model(model_dir, tc, device)
    chat_data.set_stop_tokens(model, tokenizer)  # generate() stops at <|end|>
    logger.info("model: %s on %s, %s", model_dir, device, next(model.parameters()).dtype)
    run = Run(
        cfg=cfg,
        out_dir=out_dir,
        model=model,
        tokenizer=tokenizer,
        eval_convs=eval_convs,
        train_set=train_set,
        eval_set=eval_set,
        total_steps=total_steps,
        autocast=training.autocast_context(tc.autocast, device),
        plot=plot,
    )

    # 3. Everything loaded: from here on the run writes to the output folder.
    claim_output_dir(cfg, out_dir, log, resuming=checkpoint is not None)

    # 4. The base model's held-out score, then LoRA on the frozen base.
    if resumed is None:
        logger.info("evaluating the base model before fine-tuning ...")
        run.before = run.evaluate()
        before = run.before
        logger.info(
            "before: held-out loss %.4f, exact match %.1f%%",
            before["loss"],
            100 * before["exact_match"],
        )
    else:
        run.before = resumed["before"]
    torch.manual_seed(tc.seed)
    add_lora(model, cfg.lora)  # inject_lora freezes every other parameter
    if tc.gradient_checkpointing:
        enable_checkpointing(model)
    optimizer, scheduler = make_optimizer(run, checkpoint, resumed)

    # 5. Train, then save the adapter and the merged model, and report.
    after = train_loop(run, optimizer, scheduler)
    return finish(run, after)


# --------------------------------------------------------------------------- 2. model, 3. folder
def load_model(model_dir: Path, cfg: TrainingConfig, device: Any) -> Any:
    """Loads the causal LM in ``model_dir`` onto ``device``, in eval mode.

    The one place that knows how the base is loaded (dtype, attention kernel); a quantized
    base would be one more ``from_pretrained`` argument here.
    """
    import torch
    import training
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else torch.float32
    if cfg.dtype == "auto" and model_dir != BASE_MODEL_DIR and training.bf16_supported(device):
        dtype = torch.bfloat16
    # transformers >= 4.56 calls the dtype argument `dtype`, older versions `torch_dtype`.
    major_minor = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        attn_implementation=cfg.attn_implementation,
        local_files_only=True,
        **{dtype_key: dtype},
    )
    if getattr(model.config, "model_type", None) != "phi3":
        logger.warning(
            "%s is a %r model, not phi3: the chat format and --qv-only assume Phi-3",
            model_dir,
            model.config.model_type,
        )
    return model.to(device).eval()


def claim_output_dir(cfg: RunConfig, out_dir: Path, log: run_files.RunLog, resuming: bool) -> None:
    """Takes over ``out_dir``: removes an earlier run if ``--overwrite``, starts train.log.

    Only called once the settings, data, checkpoint and model have all loaded.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = run_files.earlier_run(out_dir)
    if earlier and not resuming:  # check_output_dir allowed this only with --overwrite
        run_files.remove_earlier_run(out_dir)
        logger.warning("--overwrite: removed the earlier run's %s", ", ".join(earlier))
    log.attach(out_dir / LOG_FILE, append=resuming)
    run_files.write_json(out_dir / "config.json", cfg.to_dict())


def add_lora(model: Any, cfg: LoRAConfig) -> None:
    """Puts LoRA into ``model`` per ``cfg``; ``inject_lora`` also freezes everything else."""
    import torch

    import lora_layers

    common = {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "use_rslora": cfg.use_rslora,
        "lora_dtype": getattr(torch, cfg.lora_dtype),
    }
    if cfg.qv_only:
        lora_layers.inject_lora(model, fused={"qkv_proj": "qv"}, **common)
    else:
        lora_layers.inject_lora(model, target_modules=cfg.targets(), **common)
    trainable, total = lora_layers.count_parameters(model)
    logger.info(
        "LoRA on %d modules: %s trainable of %s parameters (%.2f%%)",
        len(lora_layers.lora_module_names(model)),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )


def enable_checkpointing(model: Any) -> None:
    """Activation (gradient) checkpointing, non-reentrant, without the KV cache."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def make_optimizer(run: Run, checkpoint: Path | None, resumed: dict | None) -> tuple[Any, Any]:
    """AdamW over the trainable (LoRA) parameters and the warmup-cosine schedule.

    A resumed run restores the adapter and AdamW's moments from the checkpoint. The learning
    rate is a function of the step, so the schedule is rebuilt at the resumed step rather than
    restored: the same schedule, or one stretched to a larger ``--max-steps``.
    """
    import torch
    import training

    tc = run.cfg.training
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    if checkpoint is not None:
        restore_checkpoint(run, checkpoint, resumed, optimizer)
    warmup = round(tc.warmup_ratio * run.total_steps)
    schedule = training.WarmupCosine(run.total_steps, warmup, tc.min_lr_ratio)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", tc.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule, last_epoch=run.start_step - 1
    )
    logger.info(
        "training %d steps (%d to go): batch %d x %d accumulation, lr %g, warmup %d steps",
        run.total_steps,
        run.total_steps - run.start_step,
        tc.batch_size,
        tc.gradient_accumulation_steps,
        tc.learning_rate,
        warmup,
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------- 4. checkpoints
def save_checkpoint(run: Run, step: int, optimizer: Any, scheduler: Any) -> Path:
    """A resumable checkpoint: the adapter, optimizer/scheduler/RNG states, trainer state.

    ``training_state.pt`` holds only tensors and plain containers (read back with
    ``weights_only=True``); the folder is written under a temporary name and renamed.
    """
    import torch
    import training

    import lora_layers

    def write(folder: Path) -> None:
        lora_layers.save_lora(run.model, folder / ADAPTER_FILE)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": training.rng_state(),
        }
        torch.save(state, folder / STATE_FILE)
        trainer_state = {
            "step": step,
            "total_steps": run.total_steps,
            "before": run.before,
            "history": run.history,
            "config": run.cfg.to_dict(),
        }
        run_files.write_json(folder / run_files.TRAINER_JSON, trainer_state)

    keep = run.cfg.training.save_total_limit
    return run_files.save_checkpoint(run.out_dir, step, write, keep)


def restore_checkpoint(run: Run, checkpoint: Path, resumed: dict, optimizer: Any) -> None:
    """Loads the adapter, the optimizer and RNG states and the history of a checkpoint."""
    import torch
    import training

    import lora_layers

    lora_layers.load_lora(run.model, checkpoint / ADAPTER_FILE)
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    training.set_rng_state(state["rng"])
    run.start_step = state["step"]
    run.history = resumed["history"]
    logger.info("resumed from %s at step %d", checkpoint, run.start_step)


# --------------------------------------------------------------------------- 5. loop and outputs
def train_loop(run: Run, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Trains from ``run.start_step`` to the end, logging, evaluating and checkpointing.

    Returns:
        The last evaluation (held-out loss, exact match, replies).
    """
    import chat_data
    import training
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    tc = run.cfg.training
    order = training.DataOrder(len(run.train_set), tc.batch_size, tc.seed)
    device = next(run.model.parameters()).device
    run.model.train()
    window_tokens, window_seconds = 0, 0.0  # training time only, not eval or saving
    last_eval = None
    with logging_redirect_tqdm(loggers=[logger]):
        bar = tqdm(
            range(run.start_step, run.total_steps),
            initial=run.start_step,
            total=run.total_steps,
            desc="LoRA fine-tune",
            disable=not tc.progress,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        for step in bar:
            step_start = time.perf_counter()
            micro = [
                chat_data.collate(
                    [run.train_set[i] for i in order.micro_batch(k)],
                    run.tokenizer.pad_token_id,
                    device,
                )
                for k in range(
                    step * tc.gradient_accumulation_steps,
                    (step + 1) * tc.gradient_accumulation_steps,
                )
            ]
            result = training.train_step(
                run.model, micro, optimizer, scheduler, tc.max_grad_norm, run.autocast
            )
            window_seconds += time.perf_counter() - step_start
            window_tokens += result["tokens"]
            done = step + 1
            run.history["train"].append({"step": done, "loss": result["loss"], "lr": result["lr"]})
            bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}")
            last = done == run.total_steps
            if done % tc.logging_steps == 0 or last:
                recent = run.history["train"][-tc.logging_steps :]
                logger.info(
                    "step %d/%d  loss %.4f  lr %.2e  grad-norm %.3f  %.0f tokens/s",
                    done,
                    run.total_steps,
                    sum(r["loss"] for r in recent) / len(recent),
                    result["lr"],
                    result["grad_norm"],
                    window_tokens / max(window_seconds, 1e-9),
                )
                window_tokens, window_seconds = 0, 0.0
            if (tc.eval_steps and done % tc.eval_steps == 0) or last:
                last_eval = run.evaluate()
                run.history["eval"].append(
                    {
                        "step": done,
                        "loss": last_eval["loss"],
                        "exact_match": last_eval["exact_match"],
                    }
                )
                logger.info(
                    "eval at step %d: held-out loss %.4f, exact match %.1f%%",
                    done,
                    last_eval["loss"],
                    100 * last_eval["exact_match"],
                )
            if tc.save_steps and (done % tc.save_steps == 0 or last):
                logger.info("saved checkpoint %s", save_checkpoint(run, done, optimizer, scheduler))
        bar.close()
    return last_eval if last_eval is not None else run.evaluate()  # None: resumed at the end


def finish(run: Run, after: dict[str, Any]) -> dict[str, Any]:
    """Saves the adapter and the merged model (checking they agree), the plot and metrics.

    Returns:
        The metrics written to ``metrics.json``.
    """
    import lora_layers

    tc, out = run.cfg.training, run.out_dir

    def write_adapter(folder: Path) -> None:
        lora_layers.save_lora(run.model, folder / ADAPTER_FILE)
        lora_config = dataclasses.asdict(run.cfg.lora)
        run_files.write_json(folder / "lora_config.json", lora_config)

    run_files.write_dir(out / "adapter", write_adapter)
    trainable, total = lora_layers.count_parameters(run.model)
    merged, merge_diff, scale = merge_and_check(run)
    if tc.save_merged:
        run_files.write_dir(
            out / "merged", lambda folder: save_pretrained(merged, run.tokenizer, folder)
        )
    if run.plot:
        run_files.plot_curves(run.history, run.before, out / "loss_curve.png")
    samples = [
        {
            "prompt": c[-2]["content"] if len(c) > 1 else "",
            "expected": c[-1]["content"],
            "before": b,
            "after": a,
        }
        for c, b, a in zip(run.eval_convs, run.before["replies"], after["replies"], strict=True)
    ]
    seconds = time.perf_counter() - run.started
    metrics = {
        "before": {"loss": run.before["loss"], "exact_match": run.before["exact_match"]},
        "after": {"loss": after["loss"], "exact_match": after["exact_match"]},
        "merged_max_abs_logit_diff": merge_diff,
        "max_abs_logit": scale,
        "steps": run.total_steps,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "held_out_conversations": len(run.eval_convs),
        "seconds": round(seconds, 1),
        "samples": samples,
    }
    run_files.write_json(out / "metrics.json", metrics)
    report(run, metrics)
    return metrics


def merge_and_check(run: Run) -> tuple[Any, float, float]:
    """``merge_and_unload``, and the largest logit difference to the adapter model.

    Returns:
        ``(merged model, max |logit difference|, max |logit|)`` on a batch of held-out data.
    """
    import chat_data
    import torch

    import lora_layers

    run.model.eval()
    device = next(run.model.parameters()).device
    probe = chat_data.collate(
        run.eval_set[: run.cfg.training.eval_batch_size], run.tokenizer.pad_token_id, device
    )
    inputs = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
    with torch.no_grad(), run.autocast():
        adapter_logits = run.model(**inputs).logits.float()
        merged = lora_layers.merge_and_unload(run.model)
        merged_logits = merged(**inputs).logits.float()
    mask = probe["attention_mask"].bool()
    diff = (adapter_logits[mask] - merged_logits[mask]).abs().max().item()
    scale = adapter_logits[mask].abs().max().item()
    logger.info(
        "merged vs adapter model: max |logit difference| %.2e (logits up to %.1f)", diff, scale
    )
    return merged, diff, scale


def save_pretrained(model: Any, tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` of the model (with its stop tokens) and the tokenizer."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def report(run: Run, metrics: dict[str, Any]) -> None:
    """Logs the before/after sample table, the headline figures and every output's path."""
    import chat_data

    tc, out = run.cfg.training, run.out_dir
    lines = []
    for row in metrics["samples"][: tc.show_samples]:
        ok = chat_data.normalize_answer(row["after"]) == chat_data.normalize_answer(row["expected"])
        lines.append(
            f"  {row['prompt']!r}\n      expected {row['expected']!r}  before {row['before']!r}"
            f"  after {row['after']!r}  [{'ok' if ok else 'wrong'}]"
        )
    logger.info(
        "before/after on %d held-out questions (first %d):\n%s",
        len(metrics["samples"]),
        min(tc.show_samples, len(metrics["samples"])),
        "\n".join(lines),
    )
    before, after = metrics["before"], metrics["after"]
    logger.info(
        "held-out exact match: before %.1f%% -> after %.1f%%  (loss %.4f -> %.4f) in %.0f s",
        100 * before["exact_match"],
        100 * after["exact_match"],
        before["loss"],
        after["loss"],
        metrics["seconds"],
    )
    outputs = {
        "adapter": out / "adapter" / ADAPTER_FILE,
        "merged model": out / "merged" if tc.save_merged else None,
        "metrics": out / "metrics.json",
        "loss plot": out / "loss_curve.png" if run.plot else None,
        "log": out / LOG_FILE,
    }
    logger.info(
        "outputs:\n%s",
        "\n".join(f"  {name:<13}{path}" for name, path in outputs.items() if path is not None),
    )


@contextmanager
def process_settings(cfg: TrainingConfig):
    """Sets torch's threads and transformers' progress bars for the run, and restores them."""
    import torch
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif cfg.model is None and cfg.device in ("auto", "cpu") and not torch.cuda.is_available():
        torch.set_num_threads(1)  # the tiny base's small matrices gain little from more
    if not cfg.progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
