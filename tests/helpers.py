"""Shared test helpers: the dtype tolerance table, the tiny Phi-3 (plain and with LoRA), its
token ids and logits, random non-zero LoRA weights, gradients and state snapshots."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from lora_layers import QuantizedLoRALinear

# One dtype -> (rtol, atol) table for every comparison against a dense reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),  # tighter than one fp32 rounding: catches fp32 detours
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
DTYPES = tuple(TOLERANCES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: actual's)."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision references and merges are computed in: fp64 stays fp64, every
    other dtype goes to fp32 (``.float()`` would round an fp64 reference to fp32)."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


PHI3_VOCAB = 128  # the tiny Phi-3's vocabulary; ids 0-2 are its pad, bos and eos tokens


def tiny_phi3_config(gqa: bool = True, **overrides):
    """A small ``Phi3Config``: hidden 64, 2 layers, 8 heads (2 kv heads with ``gqa``)."""
    from transformers import Phi3Config

    kwargs = dict(
        vocab_size=PHI3_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2 if gqa else 8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return Phi3Config(**kwargs)


def tiny_phi3(seed: int = 0, gqa: bool = True, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded, randomly initialised ``Phi3ForCausalLM`` in eval mode."""
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(tiny_phi3_config(gqa=gqa, **overrides)).to(dtype)
    return model.eval()


def fill_lora_(layer, std: float = 0.5):
    """Give ``lora_A`` and ``lora_B`` random non-zero values (B = 0 would hide every bug).

    Values are drawn in fp32 from torch's global generator and cast to each parameter's
    dtype. A merged layer is re-merged so its merged weight matches the new values.
    """
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape) * std)
    if layer.merged:
        layer.merge()
    return layer


def saved_tensor_bytes(fn, exclude=()) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs, excluding ``exclude``'s storages.

    Every saved tensor is counted once per storage (a view of the input counts as the input),
    so the result is the real extra memory the graph keeps alive besides the parameters.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def fill_all_(model, std: float = 0.3):
    """:func:`fill_lora_` on every LoRA layer of ``model``; returns the model."""
    import lora_layers

    for _, layer in lora_layers.lora_modules(model):
        fill_lora_(layer, std=std)
    return model


def lora_tiny_phi3(
    targets,
    *,
    seed: int = 0,
    gqa: bool = True,
    dtype: torch.dtype = torch.float32,
    std: float = 0.3,
    fill_seed: int | None = None,
    train: bool = False,
    **inject_kwargs,
) -> nn.Module:
    """The one tiny-Phi-3-with-LoRA builder: every A and B random and non-zero.

    Args:
        targets: ``target_modules`` of ``inject_lora``.
        seed: Seed of the base model's weights (:func:`tiny_phi3`).
        gqa: Two key/value heads instead of eight.
        dtype: Dtype of the base model.
        std: Standard deviation of the LoRA weights (:func:`fill_all_`).
        fill_seed: Global seed set before filling them (default ``seed + 100``).
        train: Return the model in training mode instead of eval mode.
        **inject_kwargs: Further ``inject_lora`` arguments (default ``r=4, lora_alpha=8``).

    Returns:
        The model.
    """
    import lora_layers

    model = tiny_phi3(seed, gqa=gqa, dtype=dtype)
    lora_layers.inject_lora(model, targets, **{"r": 4, "lora_alpha": 8, **inject_kwargs})
    torch.manual_seed(seed + 100 if fill_seed is None else fill_seed)
    return fill_all_(model, std=std).train(train)


def phi3_q_and_v(seed: int = 0, gqa: bool = True, **inject_kwargs):
    """A tiny Phi-3 (eval mode) with LoRA on q and v of ``qkv_proj``, both halves of
    ``gate_up_proj`` and a rank-2 ``o_proj``, every A and B random and non-zero."""
    return lora_tiny_phi3(
        ["o_proj"],
        seed=seed,
        gqa=gqa,
        fused={"qkv_proj": "qv", "gate_up_proj": "gate,up"},
        rank_pattern={"o_proj": 2},
        **inject_kwargs,
    )


def lora_phi3(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lora_dtype: torch.dtype | None = None,
    **inject_kwargs,
) -> nn.Module:
    """The tiny Phi-3 with LoRA that the compile and distributed tests share, in training mode.

    LoRA on q and v of every fused ``qkv_proj``, both halves of every ``gate_up_proj``, and on
    ``o_proj`` / ``down_proj``; layer 0's ``o_proj`` has rank 1, so under FSDP2 on two ranks its
    ``lora_A`` (shape ``(1, hidden)``) has an empty local shard on rank 1: the case where naive
    adapter saving writes shape-``[0]`` tensors.
    """
    return lora_tiny_phi3(
        ["o_proj", "down_proj"],
        seed=seed,
        dtype=dtype,
        std=0.1,
        fill_seed=seed + 1,
        train=True,
        fused={"qkv_proj": "qv", "gate_up_proj": "all"},
        rank_pattern={"layers.0.self_attn.o_proj": 1},
        lora_dtype=lora_dtype,
        **inject_kwargs,
    )


def phi3_ids(batch: int = 2, seq: int = 9, seed: int = 0) -> torch.Tensor:
    """Seeded token ids ``(batch, seq)`` for the tiny Phi-3, without its special tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, PHI3_VOCAB, (batch, seq), generator=g)


PHI3_IDS = phi3_ids()


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits for ``ids`` (default :data:`PHI3_IDS`), computed without autograd."""
    with torch.no_grad():
        return model(input_ids=PHI3_IDS if ids is None else ids).logits


def lora_grads(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], seed: int = 0
) -> dict[str, torch.Tensor | None]:
    """Every LoRA parameter's gradient of ``loss_fn(model)``, by parameter name.

    The global seed is set to ``seed`` first, so dropout draws the same masks in every call;
    the model's gradients are cleared (set to None) afterwards.
    """
    import lora_layers

    torch.manual_seed(seed)
    loss_fn(model).backward()
    grads = {
        f"{name}.{p}": getattr(layer, p).grad
        for name, layer in lora_layers.lora_modules(model)
        for p in ("lora_A", "lora_B")
    }
    model.zero_grad(set_to_none=True)
    return grads


def snapshot(model: nn.Module) -> dict[str, object]:
    """Every module (type, identity, merged state) and every parameter and buffer, by bytes.

    Names come from ``remove_duplicate=False`` walks, so a module or tensor reachable under
    two names is checked under both, and so is the object identity of every tensor.
    """
    out: dict[str, object] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        out[f"module {name!r}"] = (type(module), id(module), getattr(module, "merged", None))
    tensors = itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    )
    for name, t in tensors:
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = (id(t), t.dtype, tuple(t.shape), t.requires_grad, data)
    return out


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    """Asserts ``model`` is exactly as :func:`snapshot` saw it (modules, tensors, bytes)."""
    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if after[k] != before[k]]
    assert not changed, f"changed: {changed}"


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as ``benchmarks.<name>`` (benchmarks/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(
        f"benchmarks.{name}", root / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_benchmark_smoke(name: str, out_dir, stem: str) -> dict:
    """Run ``benchmarks/<name>.py --smoke --threads 1 --out out_dir`` on one intra-op thread,
    check it wrote ``<stem>.csv/.json/.md`` (non-empty), and return the parsed JSON."""
    import json
    from pathlib import Path

    bench = load_benchmark(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; two threads on a shared CPU wait on each other
    try:
        assert bench.main(["--smoke", "--threads", "1", "--out", str(out_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    path = Path(out_dir) / stem
    for suffix in (".csv", ".json", ".md"):
        assert path.with_suffix(suffix).stat().st_size > 0
    return json.loads(path.with_suffix(".json").read_text())


class RowInt8Linear(nn.Module):
    """A toy quantized linear (int8 rows with one fp32 scale each), standing in for torchao/HQQ."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.weight = self.qweight  # what LoRA layers read for device and requires_grad

    def forward(self, x):
        return torch.nn.functional.linear(x, self.qweight.float() * self.scale)


class LoRARowInt8(QuantizedLoRALinear):
    """The LoRA class for :class:`RowInt8Linear`: it only says how to dequantize."""

    def dequantize(self):
        return self.base_layer.qweight.float() * self.base_layer.scale
