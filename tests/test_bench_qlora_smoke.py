"""`bench_qlora.py --smoke` runs every section end to end on tiny shapes and writes its files.

Its figures mean nothing at these shapes; only what must hold exactly is checked (the frozen
Linear4bit saves no activation; the dense merge matches the adapter model)."""

from __future__ import annotations

import json

import torch

from tests.helpers import load_benchmark


def test_bench_qlora_smoke_run_writes_every_output(tmp_path):
    bench = load_benchmark("bench_qlora")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; two threads on a shared CPU wait on each other
    try:
        assert bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    stem = tmp_path / "qlora_bench_cpu_smoke"
    for suffix in (".csv", ".json", ".md"):
        assert stem.with_suffix(suffix).stat().st_size > 0
    doc = json.loads(stem.with_suffix(".json").read_text())
    rows = doc["rows"]
    assert {r["section"] for r in rows} == {"layer_saved", "layer_time", "train_step", "merge"}
    frozen = [r for r in rows if r["section"] == "layer_saved" and r["candidate"] == "Linear4bit"]
    assert frozen and all(r["value"] == 0 for r in frozen)
    ours = [r for r in rows if r["section"] == "layer_saved" and r["candidate"] == "lora_layers"]
    assert all(r["value"] > 0 for r in ours)
    merge = {r["candidate"]: r["value"] for r in rows if r["metric"] == "logits_max_abs_dev"}
    assert merge["lora_layers"] < 1e-4 < merge["peft"]
    assert [t["number"] for t in doc["targets"]] == [1, 2, 3, 4, 5, 6]
