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

import torch
from torch import nn

from .base import LoRALayer, check_wrappable

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


class _ConvLoRA(LoRALayer):
    """Shared LoRA logic for ``Conv1d``/``Conv2d``/``Conv3d`` (mixed into ``nn.ConvNd``)."""

    _torch_conv: type[nn.Module]

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
    ) -> None:
        if fan_in_fan_out:
            raise ValueError(
                f"fan_in_fan_out=True makes no sense for {type(self).__name__}; drop the argument"
            )
        self._torch_conv.__init__(
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
        self._setup_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self._init_lora_parameters(self.weight.device, self.weight.dtype)

    def _init_lora_parameters(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.r == 0:
            return
        kw = {"device": device, "dtype": dtype}
        fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
        self.lora_A = nn.Parameter(torch.empty(self.r, fan_in, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_channels, self.r, **kw))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform (a=sqrt(5)) as torch initialises conv kernels; B zeros."""
        if self.r == 0:
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.unmerge()

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
    ):
        """Wrap an existing convolution, sharing (not copying) its ``weight`` and ``bias``.

        Args:
            module (nn.Conv1d | nn.Conv2d | nn.Conv3d): The layer to wrap (the matching
                dimensionality). Works on meta-device layers.
            r (int): Rank of the update.
            lora_alpha (float): Scaling numerator.
            lora_dropout (float): Dropout probability on the LoRA branch's input.
            merge_weights (bool): Merge on ``eval()`` and unmerge on ``train()``.
            use_rslora (bool): Rank-stabilised scaling.
            lora_dtype (torch.dtype | None): Dtype of the LoRA parameters (default: weight's).

        Returns:
            The new layer, whose ``weight``/``bias`` are the module's own Parameters.

        Raises:
            TypeError: If ``module`` is not the matching ``nn.ConvNd``.
            AlreadyWrappedError: If ``module`` already has LoRA.
        """
        check_wrappable(module, cls._torch_conv)
        with torch.device("meta"):
            layer = cls(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                r=r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                merge_weights=merge_weights,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
                use_rslora=use_rslora,
            )
        layer.adopt(module, lora_dtype)
        return layer

    def delta_weight(self) -> torch.Tensor:
        """``scaling * (B @ A).view(weight.shape)`` in fp32."""
        return (self.scaling * (self.lora_B.float() @ self.lora_A.float())).view(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_merged():
            return self._conv_forward(x, self.merged_weight, self.bias)
        if not self._lora_active():
            return self._conv_forward(x, self.weight, self.bias)
        # (out, in/groups * prod(k)) -> (out, in/groups, *k)
        delta = (self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling
        delta = delta.to(self.weight.dtype)
        if self.training and self.dropout_p > 0:
            out = self._conv_forward(x, self.weight, self.bias)
            return out + self._conv_forward(self.lora_dropout(x), delta, None)
        return self._conv_forward(x, self.weight + delta, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.lora_extra_repr()


class Conv1d(_ConvLoRA, nn.Conv1d):
    r"""``nn.Conv1d`` with a rank-``r`` update of its kernel.

    .. math:: y = \mathrm{conv1d}(x, W + \tfrac{\alpha}{r} (B A)_{\text{as kernel}}) + b

    Args and Raises: see :class:`Conv2d`.
    """

    _torch_conv = nn.Conv1d


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
        fan_in_fan_out (bool): Not meaningful for a convolution; must be False.
        device (torch.device | str | None): Device of the parameters.
        dtype (torch.dtype | None): Dtype of the parameters.

    Raises:
        ValueError: If ``fan_in_fan_out`` is True or LoRA hyper-parameters are invalid.
        TypeError: If ``r`` or ``lora_alpha`` have the wrong type.
    """

    _torch_conv = nn.Conv2d


class Conv3d(_ConvLoRA, nn.Conv3d):
    r"""``nn.Conv3d`` with a rank-``r`` update of its kernel.

    .. math:: y = \mathrm{conv3d}(x, W + \tfrac{\alpha}{r} (B A)_{\text{as kernel}}) + b

    Args and Raises: see :class:`Conv2d`.
    """

    _torch_conv = nn.Conv3d
