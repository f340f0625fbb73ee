"""The seven targets of the performance issue (issue 5), checked against the measured rows.

Each `_target_N` reads the rows of `records.Results` and returns one `utils.TargetResult`
(N/A where a section did not run or lora_layers is absent).
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import utils as U
from benchmarks.records import Results
from benchmarks.settings import NO_INPUT_GRAD, TRAIN_DROPOUT, Config

__all__ = ["evaluate_targets"]


def _fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}x"


def _worst(rows: Sequence[U.Row]) -> U.Row | None:
    got = [r for r in rows if r.ratio is not None]
    return max(got, key=lambda r: r.ratio) if got else None


def _n(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _where(r: U.Row) -> str:
    p = "" if r.dropout is None else f", p={r.dropout:g}"
    return f"{r.case.split(' ')[0]}{p}"


def evaluate_targets(cfg: Config, res: Results) -> list[U.TargetResult]:
    """Checks the seven targets of the performance issue against the measured rows.

    Args:
        cfg: The run's settings.
        res: All measured rows.

    Returns:
        One TargetResult per target (N/A where a section did not run or lora_layers is absent).
    """
    return [check(cfg, res) for check in _TARGETS]


def _at(cfg: Config) -> str:
    """Where the time targets are checked, e.g. "1024 tokens" or "256 tokens, quick"."""
    return f"{cfg.max_tokens} tokens" + (f", {cfg.mode}" if cfg.mode != "full" else "")


def _target_1(cfg: Config, res: Results) -> U.TargetResult:
    """1. Linear fwd+bwd / frozen <= 1.05 at every shape, never slower than loralib or PEFT."""
    tok = cfg.max_tokens
    at = _at(cfg)
    rows = res.find(section="linear", metric="fwd_bwd_ms", tokens=tok)
    ll = [r for r in rows if r.candidate == "lora_layers"]
    worst = _worst(ll)
    others = ", ".join(
        f"{c} max {_fmt_ratio(w.ratio)}"
        for c in ("loralib", "peft", "minimal")
        if (w := _worst([r for r in rows if r.candidate == c]))
    )
    if worst is None:
        return U.TargetResult(
            1,
            "Linear fwd+bwd / frozen nn.Linear",
            f"<= 1.05 ({at})",
            "n/a",
            others,
            None,
            "lora_layers not measured",
        )
    peers = [
        (r.ratio, r.reference, r.case, r.dropout)
        for c in ("loralib", "peft")
        for r in res.find(section="linear", metric=f"fwd_bwd_ms_vs_{c}", tokens=tok)
    ]
    peer_worst = max(peers) if peers else None
    ok = worst.ratio <= 1.05 and (peer_worst is None or peer_worst[0] <= 1.0)
    detail = f"worst vs frozen at {_where(worst)}"
    if peer_worst:
        detail += (
            f"; worst vs peers {peer_worst[0]:.3f}x of {peer_worst[1]} at "
            f"{peer_worst[2].split(' ')[0]}, p={peer_worst[3]:g}"
        )
    return U.TargetResult(
        1,
        "Linear fwd+bwd / frozen nn.Linear, and <= loralib, PEFT",
        f"<= 1.05 ({at}); peers <= 1.00",
        f"max {_fmt_ratio(worst.ratio)}; vs peers max "
        f"{_fmt_ratio(peer_worst[0] if peer_worst else None)}",
        others,
        ok,
        detail,
    )


def _target_2(cfg: Config, res: Results) -> U.TargetResult:
    """2. Bytes saved: <= 1.01x input at p=0, <= 1.07x at p=0.05."""
    rows = [
        r
        for r in res.find(section="saved_bytes", metric="saved_bytes")
        if not r.case.startswith("fused")
    ]
    verdicts, meas, oth = [], [], []
    for p, lim in ((0.0, 1.01), (0.05, 1.07)):
        w = _worst([r for r in rows if r.candidate == "lora_layers" and r.dropout == p])
        if w is not None:
            verdicts.append(w.ratio <= lim)
            meas.append(f"p={p:g}: {_fmt_ratio(w.ratio)}")
        for c in ("loralib", "peft"):
            wc = _worst([r for r in rows if r.candidate == c and r.dropout == p])
            if wc:
                oth.append(f"{c} p={p:g}: {_fmt_ratio(wc.ratio)}")
    return U.TargetResult(
        2,
        "Linear bytes saved for backward / input",
        "<= 1.01 (p=0); <= 1.07 (p=0.05)",
        "; ".join(meas) or "n/a",
        "; ".join(oth),
        all(verdicts) if len(verdicts) == 2 else None,
    )


def _target_3(cfg: Config, res: Results) -> U.TargetResult:
    """3. Fused qkv (q, v): fwd+bwd <= 1.05x frozen, bytes <= 1.02x input (p=0)."""
    tok = cfg.max_tokens
    at = _at(cfg)
    t_rows = res.find(section="fused_qkv", metric="fwd_bwd_ms", tokens=tok)
    b_rows = res.find(section="saved_bytes", metric="saved_bytes", dropout=0.0)
    b_rows = [r for r in b_rows if r.case.startswith("fused")]
    wt = _worst([r for r in t_rows if r.candidate == "lora_layers"])
    wb = _worst([r for r in b_rows if r.candidate == "lora_layers"])
    oth = []
    for c in ("loralib", "peft"):
        a = _worst([r for r in t_rows if r.candidate == c])
        b = _worst([r for r in b_rows if r.candidate == c])
        oth.append(
            f"{c}: {_fmt_ratio(a.ratio if a else None)} time, "
            f"{_fmt_ratio(b.ratio if b else None)} bytes"
        )
    ok = None if wt is None or wb is None else (wt.ratio <= 1.05 and wb.ratio <= 1.02)
    return U.TargetResult(
        3,
        "Fused qkv (q,v) fwd+bwd / frozen; bytes / input",
        f"<= 1.05 ({at}); <= 1.02 (p=0)",
        f"{_fmt_ratio(wt.ratio if wt else None)} time (worst {_where(wt) if wt else '-'}); "
        f"{_fmt_ratio(wb.ratio if wb else None)} bytes",
        "; ".join(oth),
        ok,
    )


def _target_4(cfg: Config, res: Results) -> U.TargetResult:
    """4. Merged inference: same ATen op count as nn.Linear, time ratio <= 1.02."""
    tok = cfg.max_tokens
    at = _at(cfg)
    t_rows = res.find(section="merged", metric="merged_fwd_ms", tokens=tok, candidate="lora_layers")
    wt = _worst(t_rows)
    counts = {}
    for metric in ("merged_aten_ops_profiler", "merged_aten_ops_dispatch"):
        for c in ("nn.Linear", "lora_layers"):
            r = res.one(section="merged", metric=metric, candidate=c)
            counts[(metric, c)] = None if r is None else r.value
    same = all(
        counts[(m, "lora_layers")] is not None
        and counts[(m, "lora_layers")] == counts[(m, "nn.Linear")]
        for m in ("merged_aten_ops_profiler", "merged_aten_ops_dispatch")
    )
    ok = (
        None
        if wt is None or counts[("merged_aten_ops_profiler", "lora_layers")] is None
        else (same and wt.ratio <= 1.02)
    )
    return U.TargetResult(
        4,
        "Merged inference vs nn.Linear",
        f"same op count; time <= 1.02 ({at})",
        f"ops {counts[('merged_aten_ops_profiler', 'lora_layers')]}/"
        f"{counts[('merged_aten_ops_dispatch', 'lora_layers')]} (profiler/dispatch); "
        f"time max {_fmt_ratio(wt.ratio if wt else None)}",
        f"nn.Linear ops {counts[('merged_aten_ops_profiler', 'nn.Linear')]}/"
        f"{counts[('merged_aten_ops_dispatch', 'nn.Linear')]}",
        ok,
        f"worst at {_where(wt)}" if wt else "",
    )


def _target_5(cfg: Config, res: Results) -> U.TargetResult:
    """5. Tiny-shape fwd+bwd ATen ops (profiler count, the issue's) <= 62."""
    rows = res.find(section="aten_ops", metric="aten_ops_profiler", dropout=0.0)
    v = {r.candidate: r.value for r in rows}
    vd = {
        r.candidate: r.value
        for r in res.find(section="aten_ops", metric="aten_ops_profiler", dropout=0.05)
    }
    mine = v.get("lora_layers")
    return U.TargetResult(
        5,
        "Tiny fwd+bwd ATen ops (256->256, 4 tokens, p=0)",
        "<= 62",
        f"{_n(mine)} (p=0.05: {_n(vd.get('lora_layers'))})",
        ", ".join(f"{c} {_n(v.get(c))}" for c in ("loralib", "peft", "minimal")),
        None if mine is None else mine <= 62,
    )


def _target_6(cfg: Config, res: Results) -> U.TargetResult:
    """6. Injection into the meta Phi-3-mini skeleton <= 0.1 s."""
    r = res.one(section="inject", candidate="lora_layers")
    rp = res.one(section="inject", candidate="peft")
    return U.TargetResult(
        6,
        "inject_lora into meta Phi-3-mini (all-linear)",
        "<= 0.1 s",
        "n/a (not available)" if r is None or r.value is None else f"{r.value:.3f} s",
        f"peft {rp.value:.3f} s" if rp is not None and rp.value is not None else "peft n/a",
        None if r is None or r.value is None else r.value <= 0.1,
        "" if r is None or r.value is not None else r.note,
    )


def _target_7(cfg: Config, res: Results) -> U.TargetResult:
    """7. Training step: lower peak than PEFT and loralib; step time <= PEFT's."""
    pk = {r.candidate: r.value for r in res.find(section="train_step", metric="peak_bytes")}
    sp = {r.candidate: r.value for r in res.find(section="train_step", metric="step_peak_bytes")}
    st = {r.candidate: r for r in res.find(section="train_step", metric="step_ms")}

    def mem_time(c: str) -> str:
        return (
            f"{pk[c] / 2**20:.0f} MiB (step +{sp[c] / 2**20:.0f}), {_fmt_ratio(st[c].ratio)} time"
        )

    mine, mt = pk.get("lora_layers"), st.get("lora_layers")
    ok = None
    if mine is not None and mt is not None and mt.value is not None:
        ok = (
            all(mine < pk[c] for c in ("peft", "loralib") if pk.get(c) is not None)
            and mt.ratio <= 1.0
        )
    detail = ""
    if pk.get(NO_INPUT_GRAD) is not None:
        detail = f"{NO_INPUT_GRAD}: {mem_time(NO_INPUT_GRAD)}"
    return U.TargetResult(
        7,
        f"Train step ({cfg.train_tokens} tokens, p={TRAIN_DROPOUT:g}): peak mem, time vs PEFT",
        "peak < PEFT, loralib; time <= 1.00x PEFT",
        "n/a" if mine is None or mt is None else mem_time("lora_layers"),
        ", ".join(
            f"{c} {mem_time(c)}" for c in ("peft", "loralib", "minimal") if pk.get(c) is not None
        ),
        ok,
        detail,
    )


_TARGETS = (_target_1, _target_2, _target_3, _target_4, _target_5, _target_6, _target_7)
