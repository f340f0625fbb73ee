"""`bench_qlora.py --smoke` runs every section end to end on tiny shapes and writes its files.

Its figures mean nothing at these shapes; only what must hold exactly is checked (the frozen
Linear4bit saves no activation; the dense merge matches the adapter model)."""

from __future__ import annotations

from tests.helpers import run_benchmark_smoke


def test_bench_qlora_smoke_run_writes_every_output(tmp_path):
    doc = run_benchmark_smoke("bench_qlora", tmp_path, "qlora_bench_cpu_smoke")
    rows = doc["rows"]
    assert {r["section"] for r in rows} == {"layer_saved", "layer_time", "train_step", "merge"}
    frozen = [r for r in rows if r["section"] == "layer_saved" and r["candidate"] == "Linear4bit"]
    assert frozen and all(r["value"] == 0 for r in frozen)
    ours = [r for r in rows if r["section"] == "layer_saved" and r["candidate"] == "lora_layers"]
    assert all(r["value"] > 0 for r in ours)
    merge = {r["candidate"]: r["value"] for r in rows if r["metric"] == "logits_max_abs_dev"}
    assert merge["lora_layers"] < 1e-4 < merge["peft"]
    assert [t["number"] for t in doc["targets"]] == [1, 2, 3, 4, 5, 6]
