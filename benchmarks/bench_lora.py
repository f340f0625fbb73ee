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

Layout: this file is the entry point; the pieces live next to it in ``benchmarks/``:

* ``settings.py``: `Config`, the presets and the shared constants (rank, shapes, dropouts).
* ``candidates.py``: the candidates above, built around one frozen layer, and the check
  that they agree (section ``check``).
* ``records.py``: the rows a run collects and the progress clock.
* ``layer_time.py``: sections ``linear``, ``fused`` and ``merged``.
* ``saved_bytes.py``: section ``bytes``.
* ``aten_ops.py``: section ``ops`` and the op counts of ``merged``.
* ``inject.py``: section ``inject``.
* ``train_step.py``: section ``train``.
* ``targets.py``: the seven target verdicts.
* ``report.py``: the results writer (printed tables, CSV, JSON, markdown, chart).
* ``utils.py``: the measuring helpers shared with the other benchmark scripts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.aten_ops import bench_ops  # noqa: E402
from benchmarks.candidates import (  # noqa: E402
    MinimalLoRALinear,
    bench_check,
    build_fused_candidates,
    build_linear_candidates,
)
from benchmarks.inject import bench_inject  # noqa: E402
from benchmarks.layer_time import bench_fused, bench_linear, bench_merged  # noqa: E402
from benchmarks.records import Results, elapsed_s  # noqa: E402
from benchmarks.report import (  # noqa: E402
    draw_chart,
    machine_description,
    print_rows,
    print_targets,
    run_meta,
    write_results,
)
from benchmarks.saved_bytes import bench_bytes  # noqa: E402
from benchmarks.settings import SECTIONS, Config  # noqa: E402
from benchmarks.targets import evaluate_targets  # noqa: E402
from benchmarks.train_step import bench_train  # noqa: E402

__all__ = [
    "RUNNERS",
    "Config",
    "MinimalLoRALinear",
    "Results",
    "bench_bytes",
    "bench_check",
    "bench_fused",
    "bench_inject",
    "bench_linear",
    "bench_merged",
    "bench_ops",
    "bench_train",
    "build_fused_candidates",
    "build_linear_candidates",
    "draw_chart",
    "evaluate_targets",
    "machine_description",
    "main",
    "print_rows",
    "print_targets",
]

RUNNERS: dict[str, Callable[[Config, Results], None]] = {
    "check": bench_check,
    "linear": bench_linear,
    "fused": bench_fused,
    "merged": bench_merged,
    "bytes": bench_bytes,
    "ops": bench_ops,
    "inject": bench_inject,
    "train": bench_train,
}
assert tuple(RUNNERS) == SECTIONS


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
    with torch.random.fork_rng(devices=[]):
        for name in cfg.sections:
            RUNNERS[name](cfg, res)
    elapsed = elapsed_s()
    targets = evaluate_targets(cfg, res)
    meta = run_meta(cfg, argv, load_before, elapsed)
    stem = write_results(cfg, res, targets, meta)
    print(
        f"\nwrote {stem}.{{csv,json,md,png}} in {elapsed:.0f} s "
        f"(load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
