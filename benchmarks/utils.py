"""Shared measuring helpers for the lora_layers benchmarks.

Everything a benchmark script needs besides building its candidates lives here:

* timing: `interleaved_timings` runs every candidate once per round, rotating the order
  each round, with `torch.utils.benchmark.Timer`; results are per-round seconds per call,
  summarised by medians, and ratios are medians of *per-round paired* ratios, so slow
  drift from other processes on a shared machine cancels instead of biasing one candidate.
* bytes saved for backward (`saved_activation_bytes`): `saved_tensors_hooks` sees every
  tensor autograd packs; parameters and buffers are excluded and storages are counted once.
* ATen op counts: `count_dispatched_ops` (a `TorchDispatchMode`: the kernels that really
  run, below autograd and after composite ops decompose) and `count_profiled_aten_ops`
  (every `aten::` event of the profiler, composite ops included: each one is a dispatcher
  round trip, so this count tracks per-call overhead).
* peak memory of a step (`peak_memory_delta`): on CUDA `torch.cuda.max_memory_allocated`;
  on CPU the allocation and free events that the PyTorch profiler records from the c10 CPU
  allocator (``profile_memory=True``), replayed in time order. Exact bytes, deterministic and
  blind to other processes, unlike a resident-set-size delta.
* output: a row dataclass, fixed-width tables, CSV, JSON and markdown writers.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Timer

__all__ = [
    "Row",
    "SavedBytes",
    "TargetResult",
    "Timing",
    "count_dispatched_ops",
    "count_profiled_aten_ops",
    "format_table",
    "interleaved_timings",
    "paired_ratio",
    "peak_memory_delta",
    "saved_activation_bytes",
    "storage_bytes",
    "write_csv",
    "write_json",
    "write_markdown",
]


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Row:
    """One measured value, in long format (one row per candidate and metric).

    Attributes:
        section: Which benchmark produced it ("linear", "fused_qkv", "merged", "saved_bytes",
            "aten_ops", "inject", "train_step").
        case: The shape or model, e.g. "qkv 3072->9216".
        candidate: The implementation measured, e.g. "lora_layers", "peft".
        metric: What was measured, e.g. "fwd_bwd_ms".
        value: The measured value, or None when the candidate is not available.
        unit: Unit of `value` ("ms", "s", "bytes", "ops", ...).
        tokens: Tokens per call (batch 1), when it applies.
        dropout: LoRA dropout probability, when it applies.
        ratio: `value` relative to `reference` (for timings: median of per-round ratios).
        reference: What `ratio` divides by ("nn.Linear", "input", "peft", ...).
        spread: For timings, (max - min) / median over the rounds: a noise indicator.
        rounds: Number of timing rounds behind `value`.
        note: Free text, e.g. "n/a (not available)".
    """

    section: str
    case: str
    candidate: str
    metric: str
    value: float | None
    unit: str
    tokens: int | None = None
    dropout: float | None = None
    ratio: float | None = None
    reference: str | None = None
    spread: float | None = None
    rounds: int | None = None
    note: str = ""


@dataclass(frozen=True)
class TargetResult:
    """The verdict on one numbered target of the performance issue.

    Attributes:
        number: Target number in the issue (1-7).
        name: Short description of the target.
        threshold: The condition, as text.
        measured: The lora_layers figure(s) that decide it.
        others: The same figure for the other libraries, for context.
        passed: True / False, or None when it could not be measured.
        detail: Where it failed or why it is n/a.
    """

    number: int
    name: str
    threshold: str
    measured: str
    others: str
    passed: bool | None
    detail: str = ""

    @property
    def status(self) -> str:
        """PASS, FAIL or N/A."""
        if self.passed is None:
            return "N/A"
        return "PASS" if self.passed else "FAIL"


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Per-round timings of one candidate.

    Attributes:
        name: Candidate name.
        seconds: Seconds per call, one entry per round.
        number: Calls per round.
    """

    name: str
    seconds: tuple[float, ...]
    number: int

    @property
    def median(self) -> float:
        """Median seconds per call over the rounds."""
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median over the rounds."""
        return (max(self.seconds) - min(self.seconds)) / self.median


def interleaved_timings(
    fns: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    round_time_s: float,
    num_threads: int,
    warmup: int = 1,
    number: int | None = None,
) -> dict[str, Timing]:
    """Times every candidate in interleaved rounds with `torch.utils.benchmark.Timer`.

    Each candidate runs `warmup` untimed calls; then, unless `number` fixes the calls per
    round, one timed probe call sets it so that one round of the candidate takes about
    `round_time_s` (at least one call). Then `rounds` rounds run. Within a round every
    candidate runs once; the order rotates by one position each round, so no candidate always
    runs first or right after the same neighbour. The rotation is deterministic, so runs are
    reproducible.

    Args:
        fns: Candidate name -> zero-argument callable doing one complete call.
        rounds: Number of rounds (>= 1).
        round_time_s: Target seconds per candidate per round.
        num_threads: Intra-op threads for the timed calls (`Timer` defaults to 1).
        warmup: Untimed calls per candidate before anything is timed.
        number: Calls per round for every candidate (default: from the probe).

    Returns:
        Candidate name -> Timing, in the order of `fns`.

    Raises:
        ValueError: If `rounds` < 1 or `fns` is empty.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not fns:
        raise ValueError("fns is empty: nothing to time")
    names = list(fns)
    timers = {
        name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=num_threads, label=name)
        for name, fn in fns.items()
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        numbers: dict[str, int] = {}
        for name in names:
            for _ in range(warmup):
                fns[name]()
            if number is None:
                one = _time_calls(timers[name], 1)
                numbers[name] = max(1, int(round_time_s / one))
            else:
                numbers[name] = number
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                seconds[name].append(_time_calls(timers[name], numbers[name]))
    finally:
        torch.set_num_threads(threads)
    return {name: Timing(name, tuple(seconds[name]), numbers[name]) for name in names}


def _time_calls(timer: Timer, number: int) -> float:
    """Seconds per call of `number` back-to-back calls, with no extra warm-up.

    `Timer.timeit` runs max(number // 100, 2) warm-up calls before timing, which triples a
    round of one 0.3 s call; the candidates are warm already, so this uses the Timer's timing
    core (`_timeit`, which also synchronizes CUDA) directly when it exists.
    """
    core = getattr(timer, "_timeit", None)
    if core is None:  # a future torch without it: fall back to the public call
        return timer.timeit(number).mean
    return core(number) / number


def paired_ratio(num: Timing, den: Timing) -> float:
    """Median over rounds of num / den, pairing the two timings round by round.

    Args:
        num: Numerator timings.
        den: Denominator timings, from the same `interleaved_timings` call.

    Returns:
        The median per-round ratio.

    Raises:
        ValueError: If the two have a different number of rounds.
    """
    if len(num.seconds) != len(den.seconds):
        raise ValueError(
            f"cannot pair {len(num.seconds)} rounds of {num.name} with "
            f"{len(den.seconds)} rounds of {den.name}: time them in one call"
        )
    return statistics.median(a / b for a, b in zip(num.seconds, den.seconds, strict=True))


# ----------------------------------------------------------------------------- memory


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (each storage counted once).

    Args:
        tensors: Any tensors; views of one storage count once, with the whole storage.

    Returns:
        Total bytes.
    """
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class SavedBytes:
    """What autograd kept for backward during one forward.

    Attributes:
        total: Bytes of distinct non-parameter storages saved.
        tensors: Number of saved tensors (before de-duplication, parameters excluded).
        storages: Number of distinct storages counted.
        by_shape: "dtype[shape]" -> bytes, one entry per distinct storage, for diagnosis.
    """

    total: int
    tensors: int
    storages: int
    by_shape: dict[str, int] = field(default_factory=dict)


def saved_activation_bytes(
    forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> SavedBytes:
    """Bytes of activations autograd saves for backward while `forward` runs.

    Uses `torch.autograd.graph.saved_tensors_hooks`: the pack hook sees every tensor an
    autograd node or a custom Function saves with `save_for_backward`. A tensor whose storage
    belongs to `exclude` (pass the modules' parameters and buffers: they live anyway) is not
    counted; every other storage is counted once, whole, since a saved view keeps its whole
    storage alive. Tensors a custom Function hides on `ctx` as plain attributes are invisible
    here; the training-step peak memory catches those.

    Args:
        forward: Runs one forward pass (its outputs are kept until counting ends).
        exclude: Tensors whose storages are not activations (parameters, buffers).

    Returns:
        SavedBytes.
    """
    excluded = {(str(t.device), t.untyped_storage().data_ptr()) for t in exclude}
    seen: dict[tuple[str, int], tuple[int, str]] = {}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in excluded:
            return t
        count += 1
        if key not in seen:
            seen[key] = (t.untyped_storage().nbytes(), f"{t.dtype}{list(t.shape)}")
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    by_shape: dict[str, int] = collections.defaultdict(int)
    for nbytes, shape in seen.values():
        by_shape[shape] += nbytes
    return SavedBytes(
        total=sum(n for n, _ in seen.values()),
        tensors=count,
        storages=len(seen),
        by_shape=dict(by_shape),
    )


def peak_memory_delta(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by `fn` above what was allocated when it started.

    CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus
    `memory_allocated()` at the start.

    CPU: PyTorch has no CPU allocator statistics, so this replays the profiler's memory
    events: with ``profile_memory=True`` the c10 CPU allocator reports every allocation and
    free (with its size) to the profiler; summing them in time order gives the live bytes
    allocated since the start, and its maximum is the peak. This counts exactly what PyTorch
    tensors hold, whatever else runs on the machine. It does not see memory that is not
    allocated through c10 (oneDNN/MKL scratch, Python objects), the same for every candidate.
    Frees of tensors allocated before the profiler started are not reported, so the result
    is an upper bound when `fn` frees older tensors; a training step that starts with
    gradients set to None frees none that matter.

    Args:
        fn: The work to measure (e.g. one training step).
        device: Where `fn` allocates.

    Returns:
        Peak extra bytes (>= 0).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # (time, position, +/- bytes): position keeps same-timestamp events in recorded order.
    events = [
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]"
    ]
    live = peak = 0
    for _, _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------- op counts


class _OpCounter(TorchDispatchMode):
    """Counts every ATen op that reaches the Python dispatch mode."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_dispatched_ops(fn: Callable[[], Any]) -> collections.Counter[str]:
    """ATen ops dispatched by one call of `fn`, seen by a `TorchDispatchMode`.

    These are the ops below autograd after CompositeImplicit ops (``linear``, ``matmul``,
    ``dropout``...) decompose: the kernels that run, including the backward's when `fn`
    calls backward (the autograd engine carries the mode into its worker threads with the
    rest of the thread-local state).

    Args:
        fn: The work to count (call it once beforehand to warm up lazy state).

    Returns:
        Op name -> count.
    """
    counter = _OpCounter()
    with counter:
        fn()
    return counter.ops


def count_profiled_aten_ops(fn: Callable[[], Any]) -> collections.Counter[str]:
    """ATen ops in one call of `fn`, as the profiler records them (``aten::`` events).

    Unlike `count_dispatched_ops` this includes composite ops and their children
    (``aten::linear`` -> ``aten::t`` -> ``aten::transpose`` -> ``aten::as_strided``...),
    each a trip through the dispatcher, so it tracks per-call overhead. This is the count the
    performance issue quotes (loralib 99, PEFT 106 at 256 -> 256, 4 tokens).

    Args:
        fn: The work to count (call it once beforehand to warm up lazy state).

    Returns:
        Op name -> count.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


# ----------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Formats rows as a fixed-width text table.

    Args:
        headers: Column titles.
        rows: One sequence of cells per row; floats are shortened, None prints "n/a".

    Returns:
        The table as one string (no trailing newline).
    """
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, sep, *body])


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """Writes rows as CSV with one column per `Row` field.

    Args:
        path: Output file.
        rows: Rows to write.
    """
    names = [f.name for f in dataclasses.fields(Row)]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if v is None else v) for k, v in dataclasses.asdict(row).items()}
            )


def write_json(
    path: Path, meta: Mapping[str, Any], rows: Sequence[Row], targets: Sequence[TargetResult]
) -> None:
    """Writes metadata, rows and target verdicts as one JSON document.

    Args:
        path: Output file.
        meta: Machine, versions and arguments of the run.
        rows: All measured rows.
        targets: Target verdicts.
    """
    head = {
        "meta": dict(meta),
        "targets": [{**dataclasses.asdict(t), "status": t.status} for t in targets],
    }
    # one row per line: compact, and a re-run diffs line by line
    body = ",\n  ".join(json.dumps(dataclasses.asdict(r)) for r in rows)
    text = json.dumps(head, indent=1)[:-2] + f',\n "rows": [\n  {body}\n ]\n}}\n'
    json.loads(text)  # the hand-joined document must still parse
    path.write_text(text)


def write_markdown(path: Path, meta: Mapping[str, Any], targets: Sequence[TargetResult]) -> None:
    """Writes the target table as markdown, ready to paste into the README.

    Args:
        path: Output file.
        meta: Run metadata ("machine", "command" and "torch" are printed).
        targets: Target verdicts.
    """
    lines = [
        f"Machine: {meta.get('machine', '?')}; torch {meta.get('torch', '?')}; "
        f"{meta.get('device', '?')} {meta.get('dtype', '?')}; command `{meta.get('command', '?')}`.",
        "",
        "| # | target | threshold | lora_layers | loralib / PEFT / minimal | status |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        lines.append(
            f"| {t.number} | {t.name} | {t.threshold} | {t.measured} | {t.others} | {t.status} |"
        )
    path.write_text("\n".join(lines) + "\n")
