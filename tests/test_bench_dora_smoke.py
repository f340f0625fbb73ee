"""`bench_dora.py --smoke` runs end to end on tiny shapes and writes its files.

Its timings mean nothing at these shapes; only what must hold exactly is checked: our DoRA
agrees with PEFT's, every candidate is measured at every shape, and DoRA saves more than
plain LoRA (the LoRA output kept for the magnitude's gradient) but no weight-sized tensor.
"""

from __future__ import annotations

from tests.helpers import run_benchmark_smoke


def test_bench_dora_smoke_run_writes_every_output(tmp_path):
    doc = run_benchmark_smoke("bench_dora", tmp_path, "dora_cpu_smoke")
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
