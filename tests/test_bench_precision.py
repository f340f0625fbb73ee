"""benchmarks/bench_precision.py runs end to end on tiny shapes; its byte counts are exact."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.helpers import load_benchmark


def test_precision_grid_smoke(tmp_path, monkeypatch):
    for mod in ("peft", "loralib"):
        pytest.importorskip(mod)
    bench = load_benchmark("bench_precision")
    tiny = bench._config(["--quick", "--rounds", "1", "--out", str(tmp_path)])
    tiny = dataclasses.replace(
        tiny,
        shapes={"o 64->32": (64, 32)},
        bytes_tokens=16,
        time_tokens=dict.fromkeys(bench.SETTINGS, 4),
        time_cases=dict.fromkeys(bench.SETTINGS, ("o 64->32",)),
    )
    monkeypatch.setattr(bench, "_config", lambda argv: tiny)
    assert bench.main([]) == 0
    doc = json.loads((tmp_path / "precision_cpu_quick.json").read_text())
    assert [t["number"] for t in doc["targets"]] == [1, 1, 2, 3, 4]
    rows = doc["rows"]

    def extra(setting, candidate, p):
        (row,) = [
            r
            for r in rows
            if r["section"] == f"bytes {setting}"
            and r["candidate"] == candidate
            and r["dropout"] == p
        ]
        return row["value"]

    n, n_in, r = 16, 64, bench.RANK
    # ours: h in the LoRA dtype, plus a 1-bit mask with dropout; nothing input-sized
    assert extra("a", "lora_layers", 0.0) == n * r * 2
    assert extra("b", "lora_layers", 0.0) == n * r * 4
    assert extra("c", "lora_layers", 0.0) == n * r * 2
    for s in ("fp32", "a", "b", "c"):
        assert extra(s, "lora_layers", 0.05) - extra(s, "lora_layers", 0.0) == n * n_in // 8
    # PEFT in (b) saves an fp32 cast copy of the input (and A, B casts: constant)
    assert extra("b", "peft", 0.0) >= n * n_in * 4
    assert extra("b", "loralib", 0.0) is None  # loralib cannot run a mixed-dtype layer
    ops = [x for x in rows if x["section"] == "aten_ops" and x["candidate"] == "lora_layers"]
    assert ops[0]["value"] <= 53
    timed = [x for x in rows if x["metric"] == "fwd_bwd_ms" and x["candidate"] == "lora_layers"]
    assert len(timed) == 4 * 2 and all(x["value"] > 0 for x in timed)


def test_settings_option_times_a_subset_into_its_own_files():
    bench = load_benchmark("bench_precision")
    cfg = bench._config(["--settings", "c", "fp32", "--rounds", "7"])
    assert cfg.stem == "precision_cpu_fp32_c"  # the full grid's files stay
    assert cfg.time_cases["a"] == () == cfg.time_cases["b"]
    assert cfg.time_cases["fp32"] == tuple(cfg.shapes) and cfg.rounds["fp32"] == 7
    assert bench._config([]).stem == "precision_cpu"
    assert bench._not_timed(2, "target", "<= 1").status == "N/A"
