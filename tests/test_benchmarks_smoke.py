"""The benchmark code runs and measures what it says: tiny shapes, no timing assertions.

The measuring helpers are checked on cases whose answer is known exactly (bytes a matmul
saves, bytes a step allocates, op counts that must agree), and `bench_lora.py --smoke` runs
every section end to end on tiny shapes and a tiny Phi-3, writing all its output files.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.helpers import load_benchmark

U = load_benchmark("utils")


def test_saved_bytes_counts_input_once_and_skips_parameters():
    x = torch.randn(8, 32, requires_grad=True)
    a = nn.Parameter(torch.randn(4, 32))
    b = nn.Parameter(torch.randn(16, 4))
    # x @ A.T saves x (and A: excluded); (xA^T) @ B.T saves xA^T (and B: excluded)
    saved = U.saved_activation_bytes(lambda: (x @ a.t()) @ b.t(), exclude=[a, b])
    assert saved.total == x.numel() * 4 + 8 * 4 * 4
    assert saved.storages == 2


def test_saved_bytes_dedupes_views_of_one_storage():
    x = torch.randn(8, 32, requires_grad=True)
    w = nn.Parameter(torch.randn(32, 32))
    # both matmuls save a view of x's storage: counted once
    saved = U.saved_activation_bytes(lambda: x[:4] @ w + x[4:] @ w, exclude=[w])
    assert saved.total == x.numel() * 4
    assert saved.tensors == 2 and saved.storages == 1


def test_frozen_linear_saves_nothing():
    lin = nn.Linear(16, 16).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    assert U.saved_activation_bytes(lambda: lin(x), exclude=list(lin.parameters())).total == 0


def test_peak_memory_delta_cpu_sees_a_transient_allocation():
    def fn():
        t = torch.empty(1 << 20, dtype=torch.uint8)  # 1 MiB, freed on return
        t.fill_(1)
        u = torch.empty(1 << 19, dtype=torch.uint8)  # 0.5 MiB, live together with t
        del t, u

    peak = U.peak_memory_delta(fn, torch.device("cpu"))
    assert (1 << 20) + (1 << 19) <= peak < (1 << 20) + (1 << 19) + (1 << 16)


def test_op_counters_agree_on_a_matmul():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    dispatched = U.count_dispatched_ops(lambda: x @ w)
    profiled = U.count_profiled_aten_ops(lambda: x @ w)
    assert dispatched["aten.mm"] == 1
    assert profiled["aten::mm"] == 1
    assert sum(profiled.values()) >= sum(dispatched.values())


def test_interleaved_timings_rounds_and_paired_ratio():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1

        return fn

    t = U.interleaved_timings(
        {"a": make("a"), "b": make("b")}, rounds=3, round_time_s=0.0, num_threads=1
    )
    assert [len(t[k].seconds) for k in "ab"] == [3, 3]
    assert calls == {"a": 5, "b": 5}  # one warm-up, one probe, one per round
    fixed = U.interleaved_timings(
        {"a": make("a")}, rounds=2, round_time_s=0.0, num_threads=1, warmup=0, number=3
    )
    assert calls["a"] == 5 + 6 and fixed["a"].number == 3
    assert U.paired_ratio(t["a"], t["a"]) == 1.0
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        U.interleaved_timings({"a": make("a")}, rounds=0, round_time_s=0.0, num_threads=1)


def test_tables_and_files(tmp_path):
    rows = [U.Row("s", "c", "x", "m", 1.5, "ms", ratio=1.0, reference="x")]
    targets = [
        U.TargetResult(1, "t", "<= 1", "1", "-", True),
        U.TargetResult(2, "u", "", "", "", None),
    ]
    assert "1.5" in U.format_table(["a", "b"], [["x", 1.5]])
    U.write_csv(tmp_path / "r.csv", rows)
    U.write_json(tmp_path / "r.json", {"k": 1}, rows, targets)
    U.write_markdown(tmp_path / "r.md", {}, targets)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [t["status"] for t in doc["targets"]] == ["PASS", "N/A"]
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("section,case,candidate")


def test_bench_lora_smoke_run_writes_every_output(tmp_path, capsys):
    for mod in ("peft", "loralib", "transformers", "matplotlib"):
        pytest.importorskip(mod)
    bench = load_benchmark("bench_lora")
    assert bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    stem = tmp_path / "lora_bench_cpu_float32_smoke"
    for ext in ("csv", "json", "md", "png"):
        assert stem.with_suffix(f".{ext}").stat().st_size > 0
    doc = json.loads(stem.with_suffix(".json").read_text())
    assert [t["number"] for t in doc["targets"]] == [1, 2, 3, 4, 5, 6, 7]
    assert "== targets" in capsys.readouterr().out
    rows = doc["rows"]
    sections = {r["section"] for r in rows}
    assert {
        "check",
        "linear",
        "fused_qkv",
        "saved_bytes",
        "aten_ops",
        "inject",
        "train_step",
    } <= sections

    def value(**match):
        (row,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
        return row

    # the reference libraries are always there, so their rows always hold real values
    for cand in ("nn.Linear", "loralib", "peft", "minimal"):
        assert (
            value(
                section="linear", case="o 64->64", candidate=cand, metric="fwd_bwd_ms", dropout=0.05
            )["value"]
            > 0
        )
    # known memory facts the benchmark must reproduce: a frozen layer saves nothing, CPU
    # dropout makes loralib save one more input-sized tensor, loralib's fused qkv saves a
    # dense (out, in) delta
    bytes_of = {
        (r["case"], r["candidate"], r["dropout"]): r["ratio"]
        for r in rows
        if r["section"] == "saved_bytes"
    }
    assert bytes_of[("o 64->64", "nn.Linear", 0.0)] == 0
    extra = bytes_of[("o 64->64", "loralib", 0.05)] - bytes_of[("o 64->64", "loralib", 0.0)]
    assert extra == pytest.approx(1.0, abs=1e-6)
    assert bytes_of[("fused qkv 64->192 (q,v)", "loralib", 0.0)] > 2
    peft_peak = value(section="train_step", candidate="peft", metric="peak_bytes")["value"]
    assert peft_peak > 0
