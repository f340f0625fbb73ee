"""The results writer of `bench_lora.py`: printed tables, the chart and the result files.

`write_results` prints every section's rows and the target table, then writes
``<stem>.csv`` (every row), ``<stem>.json`` (run metadata, target verdicts, rows),
``<stem>.md`` (the target table for the README) and ``<stem>.png`` (a 2x2 chart) into
`Config.out_dir`, with the file writers of `benchmarks.utils`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import utils as U
from benchmarks.candidates import lora_layers_module
from benchmarks.records import Results
from benchmarks.settings import TRAIN_DROPOUT, Config

__all__ = [
    "draw_chart",
    "machine_description",
    "print_rows",
    "print_targets",
    "run_meta",
    "write_results",
]

_COLORS = {
    "nn.Linear": "#888888",
    "lora_layers": "#1f77b4",
    "loralib": "#ff7f0e",
    "peft": "#2ca02c",
    "minimal": "#9467bd",
}
_CANDS = ["lora_layers", "loralib", "peft", "minimal"]


def run_meta(
    cfg: Config, argv: Sequence[str] | None, load_before: tuple[float, ...], elapsed: float
) -> dict[str, Any]:
    """The run's metadata for the JSON file: command, machine, settings, load, versions.

    Args:
        cfg: The run's settings.
        argv: The command-line arguments `main` got (None: sys.argv[1:]).
        load_before: `os.getloadavg()` when the run started.
        elapsed: Seconds the measurements took.

    Returns:
        Metadata, JSON-serialisable.
    """
    return {
        "command": " ".join(["python benchmarks/bench_lora.py", *(argv or sys.argv[1:])]),
        "machine": machine_description(cfg),
        "device": cfg.device.type,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "mode": cfg.mode,
        "tokens": list(cfg.tokens),
        "timing_dropouts": list(cfg.timing_dropouts),
        "rounds": cfg.rounds,
        "train_tokens": cfg.train_tokens,
        "sections": list(cfg.sections),
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "elapsed_s": round(elapsed, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **_versions(),
    }


def write_results(
    cfg: Config, res: Results, targets: Sequence[U.TargetResult], meta: dict[str, Any]
) -> Path:
    """Prints the tables and warnings, and writes the CSV, JSON, markdown and PNG files.

    Args:
        cfg: The run's settings (`out_dir` and `stem` name the files).
        res: All measured rows and notes.
        targets: Target verdicts.
        meta: Run metadata (`run_meta`).

    Returns:
        The files' common path without suffix.
    """
    print_rows(res)
    print_targets(targets)
    for note in res.notes:
        print(f"WARNING: {note}")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg.out_dir / cfg.stem
    U.write_csv(stem.with_suffix(".csv"), res.rows)
    U.write_json(stem.with_suffix(".json"), meta, res.rows, targets)
    U.write_markdown(stem.with_suffix(".md"), meta, targets)
    draw_chart(stem.with_suffix(".png"), cfg, res, targets)
    return stem


def print_rows(res: Results) -> None:
    """Prints every section as a compact table."""
    sections = list(dict.fromkeys(r.section for r in res.rows))
    for section in sections:
        rows = res.find(section=section)
        print(f"\n== {section}")
        print(
            U.format_table(
                [
                    "case",
                    "tok",
                    "p",
                    "candidate",
                    "metric",
                    "value",
                    "unit",
                    "ratio",
                    "vs",
                    "spread",
                    "note",
                ],
                [
                    [
                        r.case,
                        r.tokens,
                        r.dropout,
                        r.candidate,
                        r.metric,
                        _human(r.value, r.unit),
                        _unit(r.unit),
                        r.ratio,
                        r.reference,
                        r.spread,
                        r.note[:70],
                    ]
                    for r in rows
                ],
            )
        )


def _human(v: float | None, unit: str) -> float | None:
    if v is None:
        return None
    return v / 2**20 if unit == "bytes" else v


def _unit(unit: str) -> str:
    return "MiB" if unit == "bytes" else unit


def print_targets(targets: Sequence[U.TargetResult]) -> None:
    """Prints the target table."""
    print("\n== targets (issue 5)")
    print(
        U.format_table(
            ["#", "target", "threshold", "lora_layers", "others", "status"],
            [[t.number, t.name, t.threshold, t.measured, t.others, t.status] for t in targets],
        )
    )
    for t in targets:
        if t.detail:
            print(f"  {t.number}: {t.detail}")


def draw_chart(path: Path, cfg: Config, res: Results, targets: Sequence[U.TargetResult]) -> None:
    """Draws a 2x2 PNG: layer time ratios, bytes saved, tiny op counts, training step.

    Args:
        path: Output file.
        cfg: The run's settings.
        res: All measured rows.
        targets: Target verdicts (their status goes into the title).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    _time_panel(axes[0, 0], cfg, res)
    _bars(
        axes[0, 1],
        ["o p=0", "o p=0.05", "fused p=0", "fused p=0.05"],
        _CANDS,
        lambda g, s: _bytes_ratio(cfg, res, g, s),
        "bytes saved / input bytes",
        f"saved for backward, {min(cfg.tokens)} tokens (log scale)",
        line=1.0,
        log=True,
    )
    _bars(
        axes[1, 0],
        ["p=0", "p=0.05"],
        ["nn.Linear", *_CANDS],
        lambda g, s: _value(
            res.one(
                section="aten_ops", metric="aten_ops_profiler", candidate=s, dropout=float(g[2:])
            )
        ),
        "aten:: ops (profiler)",
        f"tiny {cfg.tiny[0]}->{cfg.tiny[1]}, {cfg.tiny[2]} tokens: fwd+bwd ops",
        line=62,
    )
    _train_panel(axes[1, 1], cfg, res)
    status = " ".join(f"T{t.number}:{t.status}" for t in targets)
    fig.suptitle(
        f"lora_layers benchmarks ({cfg.device.type}, {str(cfg.dtype)[6:]}"
        f"{'' if cfg.mode == 'full' else ', ' + cfg.mode}) - {status}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _bars(
    ax: Any,
    groups: Sequence[str],
    series: Sequence[str],
    get: Callable[[str, str], float | None],
    ylabel: str,
    title: str,
    line: float | None = None,
    log: bool = False,
) -> None:
    """Grouped bars of `get(group, series)`; a missing value is drawn as an "n/a" label."""
    series = [s for s in series if any(get(g, s) is not None for g in groups)]
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        vals = [get(g, s) for g in groups]
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=s, color=_COLORS.get(s))
        for x, v in zip(xs, vals, strict=True):
            if v is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if line is not None:
        ax.axhline(line, color="red", ls="--", lw=1)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
    ax.legend(fontsize=7)


def _time_panel(ax: Any, cfg: Config, res: Results) -> None:
    """Forward+backward time / frozen nn.Linear per shape and the fused qkv."""
    tok = cfg.max_tokens
    p = max(cfg.timing_dropouts)
    cases = [f"{s} {i}->{o}" for s, (i, o) in cfg.shapes.items()]
    short = [c.split(" ")[0] for c in cases]
    fused = f"fused qkv {cfg.shapes['qkv'][0]}->{cfg.shapes['qkv'][1]} (q,v)"

    def ratio(group: str, cand: str) -> float | None:
        is_fused = group == "fused qkv"
        r = res.one(
            section="fused_qkv" if is_fused else "linear",
            metric="fwd_bwd_ms",
            case=fused if is_fused else cases[short.index(group)],
            candidate=cand,
            tokens=tok,
            dropout=p,
        )
        return None if r is None else r.ratio

    _bars(
        ax,
        [*short, "fused qkv"],
        _CANDS,
        ratio,
        "time / frozen nn.Linear",
        f"forward+backward, {tok} tokens, dropout {p:g}",
        line=1.05,
    )


def _train_panel(ax: Any, cfg: Config, res: Results) -> None:
    """Bytes each training-step variant allocates during the step, labelled with peak and time."""
    names = [r.candidate for r in res.find(section="train_step", metric="peak_bytes")]
    mib = 2**20
    steps = [
        (_value(res.one(section="train_step", metric="step_peak_bytes", candidate=n)) or 0) / mib
        for n in names
    ]
    peaks = [
        (_value(res.one(section="train_step", metric="peak_bytes", candidate=n)) or 0) / mib
        for n in names
    ]
    times = [_value(res.one(section="train_step", metric="step_ms", candidate=n)) for n in names]
    ax.bar(names, steps, color=[_COLORS.get(n, "#17becf") for n in names])
    for i, t in enumerate(times):
        label = f"peak {peaks[i]:.0f} MiB" + ("" if t is None else f"\n{t / 1e3:.2f} s/step")
        ax.text(i, steps[i], label, ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylim(top=max(steps, default=1) * 1.25)
    ax.set_ylabel("MiB allocated during the step")
    ax.set_title(
        f"training step, {cfg.train_layers}-layer Phi3 "
        f"{cfg.model_overrides.get('hidden_size', 3072)} wide, "
        f"{cfg.train_tokens} tokens, p={TRAIN_DROPOUT:g}",
        fontsize=10,
    )


def _value(r: U.Row | None) -> float | None:
    return None if r is None else r.value


def _bytes_ratio(cfg: Config, res: Results, group: str, cand: str) -> float | None:
    shape, p = group.split(" p=")
    qi, qo = cfg.shapes["qkv"]
    oi, oo = cfg.shapes["o"]
    case = f"fused qkv {qi}->{qo} (q,v)" if shape == "fused" else f"o {oi}->{oo}"
    r = res.one(section="saved_bytes", case=case, candidate=cand, dropout=float(p))
    return None if r is None else r.ratio


def machine_description(cfg: Config) -> str:
    """CPU model and core count, or the GPU name."""
    if cfg.device.type == "cuda":
        return torch.cuda.get_device_name(cfg.device)
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {cfg.num_threads} threads"


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for dist in ("peft", "loralib", "transformers", "lora_layers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    if lora_layers_module() is None:
        out["lora_layers"] += " (layers not importable)"
    return out
