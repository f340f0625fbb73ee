"""LoRA on quantized linear layers (QLoRA): bitsandbytes 4-bit and 8-bit, and a registry for more.

A quantized base layer stays exactly as the quantization library built it: the LoRA layer
holds it as its ``base_layer`` child, calls its own ``forward`` for the base output and adds
the low-rank update of every enabled output slice on top::

    y = base_layer(x)
    y[..., slice_i] += scaling * (dropout(x) @ A_i.T) @ B_i.T

No dequantized copy of the weight is kept or saved for backward, the packed weight and its
quantization state are never written, and only ``lora_A`` / ``lora_B`` train (fp32 by
default: the QLoRA recipe; ``lora_dtype`` overrides). The LoRA branch saves for backward the
input (in its own dtype: the very tensor the layer received), the small ``(N, R)`` projection
``h`` and, with dropout, the keep-mask at one bit per element.

Quantized kinds are entries of the one table of layer kinds,
:data:`~lora_layers.kinds.LORA_CLASSES` (:data:`QUANTIZED_LINEARS` is the same table under its
earlier name); :func:`~lora_layers.inject_lora` consults it for every targeted module.
bitsandbytes stays optional: ``import lora_layers`` never imports it; its two classes are
entered under their dotted import paths and resolved the first time a model holding one of its
layers is looked up. Another quantized linear (torchao, HQQ, ...) is one small
:class:`QuantizedLoRALinear` subclass (``dense_shape`` and ``dequantize``) plus one
:func:`register_quantized_linear` call; ``docs/qlora.md`` shows how.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .base import LoRALayer, check_lora_args
from .config import SliceLayout, check_slices
from .kinds import (
    LORA_CLASSES,
    QUANTIZATION_PACKAGES,
    class_name,
    quantized_lora_class_of,
    resolve_class,
    supported_quantized_kinds,
)
from .quantized_function import QuantizedLoRAFunction, keep_mask

__all__ = [
    "QUANTIZATION_PACKAGES",
    "QUANTIZED_LINEARS",
    "LoRALinear4bit",
    "LoRALinear8bitLt",
    "QuantizedLoRALinear",
    "dense_weight_shape",
    "find_quantized_lora_class",
    "keep_mask",
    "register_quantized_linear",
    "supported_quantized_kinds",
]

#: The one table of layer kinds (:data:`lora_layers.kinds.LORA_CLASSES`) under the name it had
#: when it held quantized kinds only: layer class -> LoRA class.
QUANTIZED_LINEARS = LORA_CLASSES
#: The registered LoRA class of a quantized layer, or None (its earlier name).
find_quantized_lora_class = quantized_lora_class_of


# --------------------------------------------------------------------------- layers
class QuantizedLoRALinear(LoRALayer, nn.Module):
    r"""LoRA on a quantized linear layer, which stays untouched as ``base_layer``.

    .. math::

        y = \mathrm{base}(x) + \frac{\alpha}{r} \, \mathrm{dropout}(x) A^\top B^\top

    per enabled output slice (one slice, all outputs, unless ``enable_lora`` is given, as in
    :class:`~lora_layers.MergedLinear`, whose ``lora_A`` / ``lora_B`` layout it shares; disabled
    slices stay bit-identical to the base output). ``A`` is kaiming-uniform, ``B`` zeros.

    A subclass per quantized kind says how big the dense weight is (:meth:`dense_shape`), how
    to dequantize it (:meth:`dequantize`), and optionally what it refuses (:meth:`check_base`)
    and which dtype a dense copy should have (:meth:`base_dtype`); register it with
    :func:`register_quantized_linear`.

    In-place merging is refused (adding the update into a 4-bit weight would round it away);
    :func:`~lora_layers.merge_and_unload` replaces the layer with a dense ``nn.Linear`` holding
    ``dequantize(W) + scaling * B @ A`` rounded once, and :func:`~lora_layers.unload` puts
    the original quantized layer back.

    Args:
        base_layer (nn.Module): The quantized layer (kept as the ``base_layer`` child).
        r (int): Rank of each enabled slice's update.
        lora_alpha (float): Scaling numerator; ``scaling = lora_alpha / r``.
        lora_dropout (float): Dropout probability on the LoRA branch's input, in ``[0, 1)``.
        enable_lora (Sequence[bool] | None): Which output slices get LoRA (None: one update
            over the whole output).
        split_sizes (Sequence[int] | None): Slice sizes (default: equal slices).
        use_rslora (bool): Use ``scaling = lora_alpha / sqrt(r)``.
        lora_dtype (torch.dtype | None): Dtype of ``lora_A`` / ``lora_B`` (default fp32).
        merge_weights (bool): Ignored with a warning when True: a quantized layer never
            merges in place (``eval()`` keeps the exact unmerged path).

    Raises:
        TypeError: If ``base_layer`` is not the quantized kind this class wraps, or is in a
            state it does not support (the message says why).
        ValueError: For invalid slices or LoRA hyper-parameters.
    """

    #: The quantized layer class this LoRA class wraps, or its dotted import path (set by
    #: subclasses; None: any).
    base_class: type | str | None = None
    fan_in_fan_out = False

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] | None = None,
        split_sizes: Sequence[int] | None = None,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        merge_weights: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        check_lora_args(r, lora_alpha, lora_dropout)
        if merge_weights:
            warnings.warn(
                f"merge_weights=True is ignored on a quantized {type(base_layer).__name__}: "
                "merging in place would round the update onto the quantization grid, so eval() "
                "keeps the exact unmerged path; merge_and_unload(model) gives dense merged layers",
                stacklevel=3,
            )
        if lora_dtype is not None and not (
            isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point
        ):
            raise TypeError(
                f"lora_dtype must be a floating torch.dtype or None, got {lora_dtype!r}"
            )
        self.check_base(base_layer)
        self.base_layer = base_layer
        self.out_features, self.in_features = self.dense_shape(base_layer)
        if enable_lora is None:
            if split_sizes is not None:
                raise ValueError("split_sizes needs enable_lora (one flag per slice)")
            self.enable_lora = self.split_sizes = None
            self.slice_layout = SliceLayout.whole(self.out_features)
        else:
            self.enable_lora, self.split_sizes = check_slices(
                self.out_features, enable_lora, split_sizes
            )
            self.slice_layout = SliceLayout.of(self.split_sizes, self.enable_lora)
        self._dense_dtype: torch.dtype | None = None
        active = bool(self.slice_layout.out_slices)
        self._setup_lora(r, lora_alpha, lora_dropout, False, use_rslora, active)
        self.slice_layout.blocks(self.r)  # computed now: forwards only read it
        self._init_lora_parameters(self.weight.device, lora_dtype or torch.float32)
        nn.Module.train(self, base_layer.training)

    # ------------------------------------------------------------------ per-kind hooks
    @classmethod
    def check_base(cls, module: nn.Module) -> None:
        """Raise TypeError if ``module`` is in a state this class cannot wrap."""
        base = cls.base_class
        base = resolve_class(base) if isinstance(base, str) else base
        if base is not None and not isinstance(module, base):
            raise TypeError(f"{cls.__name__} wraps {class_name(base)}, got {type(module).__name__}")

    @staticmethod
    def dense_shape(module: nn.Module) -> tuple[int, int]:
        """``(out_features, in_features)`` of the dense weight ``module`` stands for."""
        return int(module.out_features), int(module.in_features)

    def dequantize(self) -> torch.Tensor:
        """The base weight, dequantized: ``(out_features, in_features)``, float dtype."""
        raise NotImplementedError

    def base_dtype(self) -> torch.dtype:
        """The dtype a dense replacement of the base layer should have (its activations').

        Default: the dtype of the first input seen in forward, else the bias's, else fp32.
        """
        bias = self.bias
        return self._dense_dtype or (bias.dtype if bias is not None else torch.float32)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] | None = None,
        split_sizes: Sequence[int] | None = None,
        merge_weights: bool = False,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
    ) -> QuantizedLoRALinear:
        """Wrap a quantized layer (kept as ``base_layer``, never copied or modified).

        Args:
            module (nn.Module): The quantized layer.
            r (int): Rank of each enabled slice's update.
            lora_alpha (float): Scaling numerator.
            lora_dropout (float): Dropout probability on the LoRA branch's input.
            enable_lora (Sequence[bool] | None): Which output slices get LoRA (None: all).
            split_sizes (Sequence[int] | None): Slice sizes (default: equal).
            merge_weights (bool): Ignored with a warning when True (no in-place merging).
            use_rslora (bool): Rank-stabilised scaling.
            lora_dtype (torch.dtype | None): Dtype of the LoRA parameters (default fp32).

        Returns:
            QuantizedLoRALinear: The new layer.

        Raises:
            TypeError, ValueError: As the constructor.
        """
        return cls(
            module,
            r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            enable_lora=enable_lora,
            split_sizes=split_sizes,
            use_rslora=use_rslora,
            lora_dtype=lora_dtype,
            merge_weights=merge_weights,
        )

    # ------------------------------------------------------------------ views of the base
    @property
    def weight(self) -> nn.Parameter:
        """The base layer's (quantized) weight Parameter."""
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The base layer's bias, or None."""
        return getattr(self.base_layer, "bias", None)

    @property
    def fused(self) -> bool:
        """Whether the update is per output slice (``enable_lora`` given)."""
        return self.enable_lora is not None

    @property
    def adapter_layer(self) -> str:
        """The dense layer type its adapter is saved as: ``"Linear"`` or ``"MergedLinear"``."""
        return "MergedLinear" if self.fused else "Linear"

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._prepare_forward()  # the reentrant-checkpoint guard (it never merges in place)
        if self._dense_dtype is None and x.is_floating_point():
            self._dense_dtype = x.dtype
        out = self.base_layer(x)
        if not self._lora_active():
            return out
        p = (
            self.lora_dropout.p
            if isinstance(self.lora_dropout, nn.Dropout) and self.training
            else 0.0
        )
        return QuantizedLoRAFunction.apply(
            out, x, self.lora_A, self.lora_B, self.scaling, p, self.slice_layout
        )

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> torch.Tensor:
        """Per-slice ``scaling * B_i @ A_i`` in its rows, zeros elsewhere: fp32 ``(out, in)``."""
        return self.slice_layout.delta_weight(self.lora_A, self.lora_B, self.scaling, torch.float32)

    def lora_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``lora_A``: ``(r * n_slices, in_features)``; ``lora_B``: ``(slice rows, r)``."""
        return self.slice_layout.lora_shapes(self.r, self.in_features)

    def get_merged_weight(self) -> torch.Tensor:
        """``(dequantize(W).float() + delta_weight()).to(base_dtype())``: dense, rounded once.

        Returns:
            A new dense ``(out_features, in_features)`` tensor; nothing is changed.

        Raises:
            ValueError: If the merged weight would hold NaN or Inf.
        """
        dense = self.dequantize().detach().float()
        if self.r > 0:
            dense = dense + self.delta_weight().detach()
        merged = dense.to(self.base_dtype())
        if not torch.isfinite(merged).all():
            bad = int((~torch.isfinite(merged)).sum())
            raise ValueError(
                f"merging the LoRA update into {type(self).__name__} would produce {bad} "
                "non-finite (NaN/Inf) weight elements; check lora_A / lora_B"
            )
        return merged

    def merge(self) -> None:
        """Refused: an in-place merge would round the update onto the quantization grid.

        Raises:
            RuntimeError: Always (for ``r > 0``), naming the alternatives.
        """
        if self.r == 0:
            return
        raise RuntimeError(
            f"cannot merge LoRA in place into a quantized {type(self.base_layer).__name__}: "
            "the update would be rounded onto the quantization grid and mostly lost. Use "
            "lora_layers.merge_and_unload(model) (dense nn.Linear layers holding "
            "dequantize(W) + scaling * B @ A, rounded once), or keep the adapter unmerged"
        )

    def plain_layer(self, weight: torch.Tensor) -> nn.Module:
        """What :func:`~lora_layers.unload` / :func:`~lora_layers.merge_and_unload` put back.

        Args:
            weight: ``self.weight`` (unload: the quantized layer itself comes back) or a dense
                merged weight (a new ``nn.Linear`` holding it and the base bias).

        Returns:
            nn.Module: The quantized base layer, or a dense ``nn.Linear``.
        """
        if weight is self.weight:
            nn.Module.train(self.base_layer, self.training)
            return self.base_layer
        with torch.device("meta"):
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, False)
        if self.bias is not None:
            bias = self.bias
            if bias.dtype != weight.dtype:
                bias = nn.Parameter(bias.detach().to(weight.dtype), bias.requires_grad)
            dense.bias = bias
        return nn.Module.train(dense, self.training)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, "
        text += self.lora_extra_repr()
        if self.fused:
            text += f", enable_lora={self.enable_lora}, split_sizes={self.split_sizes}"
        return text


class LoRALinear4bit(QuantizedLoRALinear):
    """LoRA on ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4, with or without double quantisation).

    The base output is ``Linear4bit.forward`` itself (bitsandbytes' ``matmul_4bit``, which
    keeps only a reference to the packed weight for backward).
    """

    base_class = "bitsandbytes.nn.Linear4bit"

    @classmethod
    def check_base(cls, module: nn.Module) -> None:
        super().check_base(module)
        if getattr(module.weight, "quant_state", None) is None:
            raise TypeError(
                f"{type(module).__name__} is not quantized yet (weight.quant_state is None); "
                "load the model with BitsAndBytesConfig or move the layer to its device first"
            )

    @staticmethod
    def dense_shape(module: nn.Module) -> tuple[int, int]:
        out_f, in_f = module.weight.quant_state.shape
        return int(out_f), int(in_f)

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        data, state = self.weight.data, self.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for CPU inference
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), state)
        return bnbf.dequantize_4bit(data, state)

    def base_dtype(self) -> torch.dtype:
        """The dtype the weight was loaded in (``quant_state.dtype``): the model's dtype."""
        return self.weight.quant_state.dtype


class LoRALinear8bitLt(QuantizedLoRALinear):
    """LoRA on ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(), int8 weights, ``has_fp16_weights=False``).

    The base output is ``Linear8bitLt.forward`` itself. The dense dtype for merging is the
    dtype of the inputs it has seen (else its bias's, else fp32).
    """

    base_class = "bitsandbytes.nn.Linear8bitLt"

    @classmethod
    def check_base(cls, module: nn.Module) -> None:
        super().check_base(module)
        if module.state.has_fp16_weights:
            raise TypeError(
                "Linear8bitLt with has_fp16_weights=True trains its own fp16 weight and is not "
                "a quantized base; load it with BitsAndBytesConfig(load_in_8bit=True)"
            )
        if module.weight.dtype != torch.int8:
            raise TypeError(
                f"Linear8bitLt is not quantized yet (weight dtype {module.weight.dtype}); "
                "load the model with BitsAndBytesConfig or move the layer to its device first"
            )

    def dequantize(self) -> torch.Tensor:
        scb = self.weight.SCB if getattr(self.weight, "SCB", None) is not None else None
        if scb is None:
            scb = self.base_layer.state.SCB
        # As bitsandbytes' own CPU matmul: CB * (SCB / 127), row-wise.
        return self.weight.data.float() * (scb.float().unsqueeze(1) * (1.0 / 127.0))


# --------------------------------------------------------------------------- registry
def register_quantized_linear(
    base_class: type | str, lora_class: type[QuantizedLoRALinear]
) -> None:
    """Teach :func:`~lora_layers.inject_lora` a quantized linear kind: one table entry.

    Args:
        base_class: The quantized layer class (its subclasses use the same entry), or its
            dotted import path (``"bitsandbytes.nn.Linear4bit"``), resolved the first time a
            layer from that package is looked up, so registering imports nothing.
        lora_class: A :class:`QuantizedLoRALinear` subclass wrapping it.

    Raises:
        TypeError: If ``lora_class`` is not a :class:`QuantizedLoRALinear` subclass or
            ``base_class`` is neither a class nor a dotted path.
    """
    if not (isinstance(lora_class, type) and issubclass(lora_class, QuantizedLoRALinear)):
        raise TypeError(f"lora_class must subclass QuantizedLoRALinear, got {lora_class!r}")
    if not (isinstance(base_class, type) or (isinstance(base_class, str) and "." in base_class)):
        raise TypeError(f"base_class must be a class or a dotted import path, got {base_class!r}")
    LORA_CLASSES[base_class] = lora_class


register_quantized_linear(LoRALinear4bit.base_class, LoRALinear4bit)
register_quantized_linear(LoRALinear8bitLt.base_class, LoRALinear8bitLt)


def dense_weight_shape(module: nn.Module) -> tuple[int, ...]:
    """Shape of the dense weight a layer stands for: ``(out, in)`` for quantized linears.

    Adapter files record this shape, so they do not depend on quantization.
    """
    if isinstance(module, QuantizedLoRALinear):
        return (module.out_features, module.in_features)
    found = quantized_lora_class_of(module)
    if found is not None:
        return tuple(found.dense_shape(module))
    return tuple(int(s) for s in module.weight.shape)
