"""LoRA ``Conv1d`` / ``Conv2d`` / ``Conv3d``: drop-in replacements for ``nn.ConvNd``.

Here ``r`` is the true rank of the update. View the kernel as a matrix of shape
``(out_channels, in_channels // groups * prod(kernel_size))``; then

    delta_W = scaling * (B @ A).view(weight.shape)

with ``A`` of shape ``(r, in_channels // groups * prod(kernel_size))`` and ``B`` of shape
``(out_channels, r)``. loralib's ``ConvLoRA`` instead shapes ``A`` as
``(r * k, in_channels * k)`` and ``B`` as ``(out_channels // groups * k, r * k)``, so its
``r`` is not the rank (the rank is up to ``r * k``), and its Conv1d/Conv3d crash for kernel
sizes above 1. Convolution weights are small next to their activations, so the update is
applied by convolving once with ``W + delta_W`` (as loralib does); with dropout, the LoRA
branch is a second convolution of the dropped-out input with ``delta_W``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import LoRALayer, refuse_fan_in_fan_out

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


class _ConvLoRA(LoRALayer):
    """Shared LoRA logic for ``Conv1d``/``Conv2d``/``Conv3d`` (mixed into ``nn.ConvNd``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        refuse_fan_in_fan_out(fan_in_fan_out, type(self).__name__)
        self.wraps.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._setup_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora, True, use_dora)
        self._init_lora_parameters(self.weight.device, self.weight.dtype)

    def lora_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``lora_A``: ``(r, in_channels // groups * prod(kernel_size))``; ``lora_B``: ``(out, r)``."""
        fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
        return (self.r, fan_in), (self.out_channels, self.r)

    @classmethod
    def module_args(cls, module: nn.Module) -> dict[str, Any]:
        """The sizes and settings of an ``nn.ConvNd``."""
        names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
        names += ("groups", "padding_mode")
        return {name: getattr(module, name) for name in names} | {"bias": module.bias is not None}

    def _dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)  # (out, in / groups * prod(k))

    def _dora_view(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.view(-1, *(1,) * len(self.kernel_size))  # channels first: (out, 1, ...)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * (B @ A).view(weight.shape)`` in fp32 (fp64 for fp64 layers)."""
        dtype = self._merge_dtype()
        delta = self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
        return delta.view(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._prepare_forward()
        if self._use_merged():
            return self._conv_forward(x, self.merged_weight, self.bias)
        if not self._lora_active():
            return self._conv_forward(x, self.weight, self.bias)
        # (out, in/groups * prod(k)) -> (out, in/groups, *k)
        delta = (self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling
        delta = delta.to(self.weight.dtype)
        if self.training and self.dropout_p > 0:
            out = self._conv_forward(x, self.weight, self.bias)
            x_d = self.lora_dropout(x)
            if self.use_dora:  # as PEFT: DoRA's terms on the dropped input
                dropped_base = self._conv_forward(x_d, self.weight, None)
                lora = self._conv_forward(x_d, delta, None)
                return self.dora_combine_dropout(out, dropped_base + lora, dropped_base)
            return out + self._conv_forward(x_d, delta, None)
        out = self._conv_forward(x, self.weight + delta, self.bias)
        return self.dora_combine(out, self.bias) if self.use_dora else out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.lora_extra_repr()


class Conv1d(_ConvLoRA, nn.Conv1d):
    r"""``nn.Conv1d`` with a rank-``r`` update of its kernel.

    .. math:: y = \mathrm{conv1d}(x, W + \tfrac{\alpha}{r} (B A)_{\text{as kernel}}) + b

    Args and Raises: see :class:`Conv2d`.
    """

    wraps = nn.Conv1d


class Conv2d(_ConvLoRA, nn.Conv2d):
    r"""``nn.Conv2d`` with a rank-``r`` update of its kernel.

    .. math:: y = \mathrm{conv2d}(x, W + \tfrac{\alpha}{r} (B A)_{\text{as kernel}}) + b

    ``A``: ``(r, in_channels // groups * kh * kw)`` kaiming-uniform; ``B``:
    ``(out_channels, r)`` zeros, so the output starts equal to the base output.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int | tuple[int, ...]): Kernel size.
        r (int): Rank of the kernel update viewed as a matrix; 0 gives a plain convolution.
        lora_alpha (float): Scaling numerator; ``scaling = lora_alpha / r``.
        lora_dropout (float): Dropout probability on the LoRA branch's input.
        merge_weights (bool): Merge on ``eval()`` and unmerge on ``train()``.
        stride, padding, dilation, groups, bias, padding_mode: As ``nn.Conv2d``.
        use_rslora (bool): Use ``scaling = lora_alpha / sqrt(r)``.
        use_dora (bool): DoRA: ``lora_magnitude`` ``(out_channels,)`` rescales each output
            channel by ``m / ||W + s B A||`` (norm over all kernel dims but the output).
        fan_in_fan_out (bool): Not meaningful for a convolution; must be False.
        device (torch.device | str | None): Device of the parameters.
        dtype (torch.dtype | None): Dtype of the parameters.

    Raises:
        ValueError: If ``fan_in_fan_out`` is True or LoRA hyper-parameters are invalid.
        TypeError: If ``r``, ``lora_alpha`` or ``use_dora`` have the wrong type.
    """

    wraps = nn.Conv2d


class Conv3d(_ConvLoRA, nn.Conv3d):
    r"""``nn.Conv3d`` with a rank-``r`` update of its kernel.

    .. math:: y = \mathrm{conv3d}(x, W + \tfrac{\alpha}{r} (B A)_{\text{as kernel}}) + b

    Args and Raises: see :class:`Conv2d`.
    """

    wraps = nn.Conv3d
