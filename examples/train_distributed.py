"""Train LoRA on a tiny Phi-3 with DDP or FSDP2, launched by ``torchrun`` (CPU or GPU).

    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --mode ddp
    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --mode fsdp2
    python examples/train_distributed.py               # one process, no wrapper

The model is a randomly initialised Phi-3 (same architecture as Phi-3-mini: fused
``qkv_proj`` and ``gate_up_proj``; just narrow and shallow) with LoRA on q and v of every
``qkv_proj``, both halves of every ``gate_up_proj``, ``o_proj``, ``down_proj`` and the output
head. It learns a
counting task (each next token follows from the current one), so the loss falls within a
few dozen steps. Every rank draws the same global batch and trains on its own slice. The adapter is
gathered on every rank (a collective under FSDP2) and written by rank 0 with ``save_lora``.
See ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM

import lora_layers

VOCAB = 128


def build_model() -> nn.Module:
    """A seeded tiny Phi-3 (identical on every rank) with LoRA injected and the base frozen."""
    config = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    lora_layers.inject_lora(
        model,
        ["o_proj", "down_proj", "lm_head"],
        r=8,
        lora_alpha=16,
        fused={"qkv_proj": "qv", "gate_up_proj": "all"},
    )
    return model


def counting_batch(step: int, batch: int, seq: int, cycle: int = 16) -> torch.Tensor:
    """The global batch of ``step``: ``(batch, seq)`` ids, each row counting around a cycle.

    Row ``i`` is ``3 + (start_i + t) % cycle`` for ``t = 0..seq-1``: every next token follows
    from the current one, which LoRA on a frozen random base learns in a few dozen steps.
    """
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, cycle, (batch, 1), generator=g)
    return 3 + (start + torch.arange(seq)) % cycle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8, help="global batch size")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default="adapter.safetensors", help="'' to skip saving")
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    device = torch.device("cpu")
    if distributed:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the world size {world}")

    model = build_model().to(device).train()
    inner = model
    if distributed and args.mode == "ddp":
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    elif distributed and args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in inner.model.layers:  # one unit per decoder layer, then the root
            fully_shard(layer)
        fully_shard(inner)

    trainable = [p for p in model.parameters() if p.requires_grad]  # the LoRA parameters
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    for step in range(args.steps):
        ids = counting_batch(step, args.batch, args.seq).chunk(world)[rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  (rank 0's slice)", flush=True)

    if args.out:
        adapter = lora_layers.adapter_from_model(inner)  # every rank: gathers FSDP2 shards
        if rank == 0:
            lora_layers.save_lora(adapter, args.out)
            shapes = {k: tuple(v.shape) for k, v in list(adapter.tensors.items())[:2]}
            print(f"saved {len(adapter.tensors)} tensors to {args.out}, e.g. {shapes}")
    if distributed:
        dist.barrier()  # every rank waits for rank 0's save, then all shut gloo down together
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
