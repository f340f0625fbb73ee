"""DDP and FSDP2 on two CPU ``gloo`` processes, spawned here, against a single-process run.

Both ranks train the tiny Phi-3 with LoRA (``tests.helpers.lora_phi3``) for a few SGD-with-momentum
steps, each on its half of one global batch; a single process trains the same model on the
whole batch. Gradients are averaged over ranks and every rank sees the same number of tokens,
so the LoRA gradients and updated parameters must match (fp32, 1e-5). One spawn runs every
scenario (process start-up dominates the cost); ``tests/_dist_worker.py`` is the worker side.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp

import lora_layers
from tests import _dist_worker
from tests.helpers import assert_close, lora_phi3

WORLD = 2
TIMEOUT_S = 240
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Spawn the two ranks once; return each rank's ``{scenario: results}``."""
    out = tmp_path_factory.mktemp("dist")
    args = (WORLD, _free_port(), str(out), list(_dist_worker.SCENARIOS))
    context = mp.start_processes(
        _dist_worker.run, args=args, nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):  # raises with the worker's traceback if one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    return [torch.load(out / f"rank{k}.pt", weights_only=True) for k in range(WORLD)]


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process run on the whole global batch."""
    model = lora_phi3(merge_weights=True)
    result = _dist_worker.train(model, _dist_worker.GLOBAL_IDS)
    result["lora"] = {k: v.clone() for k, v in lora_layers.lora_state_dict(model).items()}
    model.eval()
    lora_layers.unmerge_lora(model)  # sharded layers run unmerged: compare like with like
    with torch.no_grad():
        result["eval_logits"] = model(input_ids=_dist_worker.GLOBAL_IDS).logits
    return result


def scenario(ranks: list[dict], name: str) -> list[dict]:
    per_rank = [r[name] for r in ranks]
    for k, r in enumerate(per_rank):
        assert "error" not in r, f"rank {k} failed in {name}:\n{r['error']}"
    return per_rank


def assert_lora_only(result: dict, reference: dict) -> None:
    """Only LoRA parameters got gradients and optimizer state."""
    lora_names = set(reference["lora"])
    assert set(result["first_grads"]) == lora_names
    assert result["frozen_with_grad"] == []
    assert set(result["with_optimizer_state"]) == lora_names


def assert_tensors_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, t in got.items():
        assert t.shape == expected[name].shape, name
        assert_close(t, expected[name])


def test_ddp_matches_single_process(ranks, reference):
    for result in scenario(ranks, "ddp"):
        assert_lora_only(result, reference)
        assert_tensors_close(result["first_grads"], reference["first_grads"])
        assert_tensors_close(result["lora"], reference["lora"])


def test_fsdp2_matches_single_process_and_trains_only_lora(ranks, reference):
    for result in scenario(ranks, "fsdp2"):
        assert_lora_only(result, reference)
        assert_tensors_close(result["first_grads"], reference["first_grads"])
        assert_tensors_close(result["lora"], reference["lora"])


def test_fsdp2_full_adapter_state_dict_has_full_shapes(ranks, reference):
    per_rank = scenario(ranks, "fsdp2")
    # Rank 1 holds an empty shard of the rank-1 layer's lora_A: what naive saving writes.
    key = "model.layers.0.self_attn.o_proj.lora_A"
    assert per_rank[1]["local_shapes"][key][0] == 0
    for result in per_rank:
        assert_tensors_close(result["lora"], reference["lora"])  # DTensor.full_tensor()
        assert_tensors_close(result["dcp_lora"], reference["lora"])  # get_model_state_dict


def test_fsdp2_eval_runs_unmerged_and_merge_raises(ranks, reference):
    for rank, result in enumerate(scenario(ranks, "fsdp2")):
        assert result["merged_after_eval"] is False
        expected = reference["eval_logits"].chunk(WORLD)[rank]
        assert_close(result["eval_logits"], expected)
        assert "sharded" in result["merge_error"]


def test_fsdp2_save_lora_writes_full_shapes(ranks, reference):
    for result in scenario(ranks, "fsdp2"):
        assert "save_lora_error" not in result, result["save_lora_error"]
        saved = safetensors.torch.load_file(result["save_lora"])
        assert_tensors_close(saved, reference["lora"])


def test_fsdp2_bf16_base_with_fp32_lora_trains(ranks, reference):
    for result in scenario(ranks, "fsdp2_bf16_base_fp32_lora"):
        assert_lora_only(result, reference)
        assert result["grad_dtypes"] == ["torch.float32"]
        assert torch.isfinite(result["last_loss"])
        assert all(g.abs().sum() > 0 for g in result["first_grads"].values())


def test_example_runs_under_torchrun_with_fsdp2(tmp_path):
    """The command in docs/distributed.md, for 3 steps; its adapter loads into a fresh model."""
    out = tmp_path / "adapter.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={WORLD}", str(EXAMPLE), "--mode", "fsdp2"]
    command += ["--steps", "3", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step   2" in proc.stdout, proc.stdout

    spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    fresh = example.build_model()
    lora_layers.load_lora(fresh, out)  # validates every key and full shape first
    saved = safetensors.torch.load_file(out)
    assert {k: v.shape for k, v in saved.items()} == {
        k: v.shape for k, v in lora_layers.lora_state_dict(fresh).items()
    }
