"""`bench_dora.py --smoke` runs end to end on tiny shapes and writes its files.

Its timings mean nothing at these shapes; only what must hold exactly is checked: our DoRA
agrees with PEFT's, every candidate is measured at every shape, and DoRA saves more than
plain LoRA (the LoRA output kept for the magnitude's gradient) but no weight-sized tensor.
"""

from __future__ import annotations

import json

import torch

from tests.helpers import load_benchmark


def test_bench_dora_smoke_run_writes_every_output(tmp_path):
    bench = load_benchmark("bench_dora")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; two threads on a shared CPU wait on each other
    try:
        assert bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    stem = tmp_path / "dora_cpu_smoke"
    for suffix in (".csv", ".json", ".md"):
        assert stem.with_suffix(suffix).stat().st_size > 0
    doc = json.loads(stem.with_suffix(".json").read_text())
    rows = doc["rows"]
    check = [r for r in rows if r["section"] == "check"]
    assert len(check) == 1 and check[0]["value"] < 1e-4
    times = {(r["case"], r["candidate"], r["reference"]) for r in rows if r["section"] == "time"}
    assert len(times) == 4 * 4 + 2  # 4 shapes x (3 vs lora + dora vs peft), fused: lora, dora
    saved = {(r["case"], r["candidate"]): r["value"] for r in rows if r["metric"] == "saved_bytes"}
    for case in {c for c, _ in saved}:
        assert saved[(case, "dora")] > saved[(case, "lora")], case
    assert [t["number"] for t in doc["targets"]] == [1, 2, 3, 4]
    assert all(t["status"] == "PASS" for t in doc["targets"][2:])  # the bytes targets
