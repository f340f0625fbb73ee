"""Worker side of ``test_distributed.py``: DDP and FSDP2 runs on CPU ``gloo`` processes.

Each rank trains the tiny Phi-3 with LoRA on its half of a fixed global batch and saves what
the test compares against a single-process run (:func:`train`) in ``<out>/rank<k>.pt``.
A failing scenario records its traceback instead of results, so the other scenarios still run.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lora_layers
from tests.helpers import lora_phi3, phi3_ids

STEPS = 3
LR, MOMENTUM = 0.02, 0.9
GLOBAL_IDS = phi3_ids(batch=4, seq=8)  # the whole batch: rank k trains on chunk k


def _unshard(t: torch.Tensor) -> torch.Tensor:
    """The full tensor (a collective for DTensors: every rank must call it)."""
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().clone()


def train(model: nn.Module, ids: torch.Tensor, steps: int = STEPS) -> dict:
    """SGD with momentum over *all* parameters: frozen ones must get neither grads nor state.

    Returns the first step's grads of the trainable parameters, the names of frozen
    parameters that got a grad, the names of parameters with optimizer state, and the
    last loss. ``model`` may be DDP- or FSDP2-wrapped; ``ids`` is this process's batch.
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    names = {p: n for n, p in inner.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    first_grads, frozen_with_grad = {}, set()
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p, name in names.items():
            if not p.requires_grad:
                if p.grad is not None:
                    frozen_with_grad.add(name)
            elif step == 0:
                first_grads[name] = _unshard(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "first_grads": first_grads,
        "frozen_with_grad": sorted(frozen_with_grad),
        "with_optimizer_state": sorted(names[p] for p in opt.state if opt.state[p]),
        "last_loss": loss.detach(),
    }


def _local_batch(rank: int, world: int) -> torch.Tensor:
    return GLOBAL_IDS.chunk(world)[rank]


def ddp(rank: int, world: int, out: Path) -> dict:
    model = lora_phi3()
    wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    result = train(wrapped, _local_batch(rank, world))
    result["lora"] = {k: v.clone() for k, v in lora_layers.lora_state_dict(model).items()}
    return result


def fsdp2(rank: int, world: int, out: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = lora_phi3(merge_weights=True)  # eval() would merge: sharded layers must not
    for layer in model.model.layers:  # one FSDP unit per decoder layer, then the root
        fully_shard(layer)
    fully_shard(model)
    result = train(model, _local_batch(rank, world))

    adapter = lora_layers.lora_state_dict(model)  # DTensors: global shapes, local shards
    result["local_shapes"] = {k: tuple(v.to_local().shape) for k, v in adapter.items()}
    result["lora"] = {k: _unshard(v) for k, v in adapter.items()}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    result["dcp_lora"] = {k: full[k].detach().clone() for k in adapter}

    model.eval()  # stays unmerged while sharded
    result["merged_after_eval"] = any(m.merged for _, m in lora_layers.lora_modules(model))
    with torch.no_grad():
        result["eval_logits"] = model(input_ids=_local_batch(rank, world)).logits.clone()
    try:
        lora_layers.merge_lora(model)
        result["merge_error"] = ""
    except RuntimeError as e:
        result["merge_error"] = str(e)

    try:
        path = lora_layers.save_lora(model, out / f"fsdp2_rank{rank}.safetensors")
        result["save_lora"] = str(path)
    except Exception:
        result["save_lora_error"] = traceback.format_exc()
    return result


def fsdp2_bf16_base_fp32_lora(rank: int, world: int, out: Path) -> dict:
    """A bf16 base with fp32 LoRA in one FSDP2 unit: frozen and trainable dtypes differ."""
    from torch.distributed.fsdp import fully_shard

    model = lora_phi3(dtype=torch.bfloat16, lora_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    result = train(model, _local_batch(rank, world), steps=1)
    result["grad_dtypes"] = sorted({str(g.dtype) for g in result["first_grads"].values()})
    return result


SCENARIOS = {"ddp": ddp, "fsdp2": fsdp2, "fsdp2_bf16_base_fp32_lora": fsdp2_bf16_base_fp32_lora}


def run(rank: int, world: int, port: int, out: str, scenarios: list[str]) -> None:
    """Entry point of one spawned rank (``torch.multiprocessing.start_processes``)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    try:
        for name in scenarios:
            try:
                results[name] = SCENARIOS[name](rank, world, Path(out))
            except Exception:
                results[name] = {"error": traceback.format_exc()}
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()
