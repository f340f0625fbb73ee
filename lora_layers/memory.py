"""A memory planner for LoRA and QLoRA fine-tuning: base, adapter, gradient and optimizer bytes.

:func:`estimate_memory` counts, for a model or a ``transformers`` config (built on the meta
device: no memory, no download), what the weights of a LoRA fine-tune occupy:

* the frozen base: every linear layer quantized as transformers' ``BitsAndBytesConfig``
  stores it (4-bit: packed weight, per-block ``absmax``, the 16-entry code, and with double
  quantisation the 8-bit ``absmax`` with its own fp32 scales and 256-entry code; 8-bit: int8
  weight and one fp32 scale per row), the output head and every other parameter in ``dtype``;
* the LoRA parameters (per :func:`~lora_layers.plan_lora`, so targets, fused slices and rank
  patterns count exactly as :func:`~lora_layers.inject_lora` would create them);
* their gradients (same dtype) and the optimizer state (AdamW: two moments in the parameter
  dtype plus a 4-byte step per tensor, as ``torch.optim.AdamW`` keeps them).

Activations are not included: they depend on batch, sequence length and checkpointing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .quantized import dense_weight_shape, find_quantized_lora_class
from .surgery import Targets, plan_lora

__all__ = ["QUANTIZE_MODES", "MemoryEstimate", "estimate_memory"]

QUANTIZE_MODES = (None, "4bit", "8bit")
_OPTIMIZERS = {"adamw": 2, "adam": 2, "sgd": 0, None: 0}
_GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of a LoRA fine-tune's weights, gradients and optimizer state.

    Attributes:
        base_bytes: The frozen base model (quantized linears as stored, the rest in ``dtype``).
        adapter_bytes: The LoRA parameters.
        gradient_bytes: Their gradients.
        optimizer_bytes: The optimizer state for the LoRA parameters.
        base_params: Parameters of the dense base model.
        quantized_params: How many of them are stored quantized.
        lora_params: LoRA parameters.
        quantize: ``None``, ``"4bit"`` or ``"8bit"``.
    """

    base_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    base_params: int
    quantized_params: int
    lora_params: int
    quantize: str | None

    @property
    def total_bytes(self) -> int:
        """Everything above together."""
        return self.base_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes

    def gib(self) -> dict[str, float]:
        """The byte counts in GiB, rounded to 2 decimals."""
        fields = ("base_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes")
        out = {f.removesuffix("_bytes"): round(getattr(self, f) / _GIB, 2) for f in fields}
        out["total"] = round(self.total_bytes / _GIB, 2)
        return out


def _quantized_linear_bytes(
    out_features: int, in_features: int, quantize: str, double_quant: bool, blocksize: int
) -> int:
    n = out_features * in_features
    if quantize == "8bit":
        return n + 4 * out_features  # int8 weight + one fp32 scale (SCB) per row
    blocks = math.ceil(n / blocksize)
    size = math.ceil(n / 2) + 16 * 4  # two 4-bit codes per byte + the fp32 16-entry code
    if double_quant:  # uint8 absmax, its fp32 scales per 256 blocks, a 256-entry code, offset
        return size + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4
    return size + 4 * blocks  # fp32 absmax per block


def _meta_model(config: Any) -> nn.Module:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:  # pragma: no cover - transformers is a test dependency
        raise TypeError("estimate_memory(config) needs transformers to build the model") from err
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def estimate_memory(
    model_or_config: nn.Module | Any,
    r: int = 16,
    target_modules: Targets | None = "all-linear",
    *,
    quantize: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    lora_dtype: torch.dtype | None = None,
    fused: Mapping | None = None,
    rank_pattern: Mapping | None = None,
    exclude_modules: Targets | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    optimizer: str | None = "adamw",
) -> MemoryEstimate:
    """Estimate the weight, gradient and optimizer memory of a LoRA / QLoRA fine-tune.

    Args:
        model_or_config: A dense model (any device, meta included), or a ``transformers``
            config (the causal-LM model is built on the meta device).
        r: LoRA rank (as :func:`~lora_layers.inject_lora`).
        target_modules: Targets (as :func:`~lora_layers.inject_lora`; default all linears).
        quantize: ``None`` (dense), ``"4bit"`` (NF4/FP4) or ``"8bit"`` (LLM.int8()): every
            linear layer except the output head is quantized, as transformers does.
        dtype: Dtype of the unquantized parameters (and of a dense base).
        lora_dtype: Dtype of the LoRA parameters (default fp32 when quantized, else ``dtype``).
        fused: Fused per-slice targets, e.g. ``{"qkv_proj": "qv"}``.
        rank_pattern: Per-module rank overrides.
        exclude_modules: Modules never to wrap.
        double_quant: 4-bit only: quantize the block scales too (``bnb_4bit_use_double_quant``).
        blocksize: 4-bit only: elements per quantization block (bitsandbytes' default 64).
        optimizer: ``"adamw"`` / ``"adam"`` (two moments), ``"sgd"`` or None (no state).

    Returns:
        MemoryEstimate: The byte counts.

    Raises:
        ValueError: For an unknown ``quantize`` or ``optimizer``, or targets that match nothing.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got quantize={quantize!r}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {sorted(map(str, _OPTIMIZERS))}, got {optimizer!r}"
        )
    model = (
        model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    )
    if lora_dtype is None:
        lora_dtype = torch.float32 if quantize else dtype
    plan = plan_lora(
        model,
        target_modules,
        r=r,
        fused=fused,
        rank_pattern=rank_pattern,
        exclude_modules=exclude_modules,
        lora_dtype=lora_dtype,
    )
    head = _output_head(model)
    width = torch.empty((), dtype=dtype).element_size()
    base_bytes = base_params = quantized_params = 0
    counted: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in own)
        is_linear = isinstance(module, nn.Linear) or find_quantized_lora_class(module) is not None
        if quantize and is_linear and module is not head:
            out_f, in_f = dense_weight_shape(module)
            base_bytes += _quantized_linear_bytes(out_f, in_f, quantize, double_quant, blocksize)
            base_params += out_f * in_f
            quantized_params += out_f * in_f
            own = [p for p in own if p is not getattr(module, "weight", None)]
        elif find_quantized_lora_class(module) is not None:
            out_f, in_f = dense_weight_shape(module)
            base_params += out_f * in_f
            base_bytes += out_f * in_f * width
            own = [p for p in own if p is not module.weight]
        for p in own:
            base_params += p.numel()
            base_bytes += p.numel() * width

    lora_params = tensors = 0
    modules = dict(model.named_modules())
    for name, spec in plan.items():
        out_f, in_f = dense_weight_shape(modules[name])
        if spec.fused is None:
            lora_params += spec.r * (in_f + out_f)
        else:
            enabled = [
                s
                for s, on in zip(spec.fused.split_sizes, spec.fused.enable_lora, strict=True)
                if on
            ]
            lora_params += spec.r * len(enabled) * in_f + sum(enabled) * spec.r
        tensors += 2
    lora_width = torch.empty((), dtype=lora_dtype).element_size()
    adapter_bytes = lora_params * lora_width
    moments = _OPTIMIZERS[optimizer]
    optimizer_bytes = moments * adapter_bytes + (4 * tensors if moments else 0)
    return MemoryEstimate(
        base_bytes=base_bytes,
        adapter_bytes=adapter_bytes,
        gradient_bytes=adapter_bytes,
        optimizer_bytes=optimizer_bytes,
        base_params=base_params,
        quantized_params=quantized_params,
        lora_params=lora_params,
        quantize=quantize,
    )
