"""LoRA ``Linear``: a drop-in replacement for ``nn.Linear`` and ``loralib.Linear``."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoRALayer
from .config import SliceLayout
from .functional import lora_linear

__all__ = ["Linear"]

_NO_DROPOUT = nn.Identity()  # the dropout DoRA's dropped branch passes on (already applied)


class Linear(LoRALayer, nn.Linear):
    r"""``nn.Linear`` with a trainable low-rank update.

    .. math::

        y = x W^\top + b + \frac{\alpha}{r} \, \mathrm{dropout}(x) A^\top B^\top

    with ``A`` of shape ``(r, in_features)`` (kaiming-uniform, ``a=sqrt(5)``) and ``B`` of shape
    ``(out_features, r)`` (zeros), so the output at initialisation equals the base output.

    Args:
        in_features (int): Size of each input sample.
        out_features (int): Size of each output sample.
        r (int): Rank of the update; 0 gives a plain ``nn.Linear`` with no LoRA parameters.
        lora_alpha (float): Scaling numerator; ``scaling = lora_alpha / r``.
        lora_dropout (float): Dropout probability on the LoRA branch's input, in ``[0, 1)``.
        fan_in_fan_out (bool): Store ``weight`` as ``(in, out)``, as GPT-2's ``Conv1D`` does.
        merge_weights (bool): Merge on ``eval()`` and unmerge on ``train()``.
        bias (bool): Whether the layer has a bias.
        use_rslora (bool): Use ``scaling = lora_alpha / sqrt(r)`` (rank-stabilised LoRA).
        use_dora (bool): DoRA: a trainable magnitude ``lora_magnitude`` ``(out_features,)``
            rescales each output row by ``m / ||W + s B A||`` (see :mod:`lora_layers.dora`).
        device (torch.device | str | None): Device of the parameters.
        dtype (torch.dtype | None): Dtype of the parameters.
        slice_layout (SliceLayout | None): The output slices that get LoRA (default: one
            slice over every output); :class:`~lora_layers.MergedLinear` passes its own.

    Raises:
        TypeError: If ``r`` is not an int, ``lora_alpha``/``lora_dropout`` not numbers, or
            ``use_dora`` not a bool.
        ValueError: If ``r < 0``, ``lora_alpha <= 0`` with ``r > 0``, ``lora_dropout``
            outside ``[0, 1)``, ``slice_layout`` is for another output size, or
            ``use_dora=True`` with ``r=0``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        bias: bool = True,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        slice_layout: SliceLayout | None = None,
        use_dora: bool = False,
    ) -> None:
        layout = slice_layout or SliceLayout.whole(out_features)
        if layout.out_features != out_features:
            raise ValueError(f"{layout} is for {layout.out_features} outputs, not {out_features}")
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        if self.fan_in_fan_out:
            # Same values and init as nn.Linear, stored transposed: (in, out).
            self.weight = nn.Parameter(self.weight.detach().t().contiguous())
        self.slice_layout = layout  # output rows with LoRA; their blocks of lora_A / lora_B
        active = bool(layout.out_slices)
        self._setup_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora, active, use_dora)
        layout.blocks(self.r)  # computed now: forwards (and torch.compile traces) only read it
        self._init_lora_parameters(self.weight.device, self.weight.dtype)

    wraps = nn.Linear

    def lora_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``lora_A``: ``(r * n_slices, in_features)``; ``lora_B``: ``(slice rows, r)``.

        One slice (a plain ``Linear``): ``(r, in_features)`` and ``(out_features, r)``.
        """
        return self.slice_layout.lora_shapes(self.r, self.in_features)

    def reset_parameters(self) -> None:
        """Re-initialise ``weight``/``bias`` as ``nn.Linear`` does and ``lora_A``/``lora_B``.

        With ``fan_in_fan_out`` the ``(in, out)`` weight gets ``nn.Linear``'s distribution
        (fan-in ``in_features``). ``lora_B`` becomes zero again, as in loralib.
        """
        if not getattr(self, "fan_in_fan_out", False):  # unset while nn.Linear builds
            super().reset_parameters()
            return
        out_in = torch.empty_like(self.weight.t(), memory_format=torch.contiguous_format)
        nn.init.kaiming_uniform_(out_in, a=math.sqrt(5))  # nn.Linear's values, then stored
        with torch.no_grad():
            self.weight.copy_(out_in.t())
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    @classmethod
    def module_args(cls, module: nn.Linear) -> dict[str, Any]:
        """``in_features``, ``out_features`` and ``bias`` of an ``nn.Linear``."""
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }

    def plain_module(self) -> nn.Module:
        """As :meth:`LoRALayer.plain_module`; transformers' ``Conv1D`` with ``fan_in_fan_out``."""
        if not self.fan_in_fan_out:
            return super().plain_module()
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError as err:  # pragma: no cover - transformers is installed
            raise TypeError("unloading a fan_in_fan_out Linear needs transformers' Conv1D") from err
        with torch.device("meta"):
            plain = Conv1D(self.out_features, self.in_features)
        plain._parameters.update(weight=None, bias=None)
        return plain

    def _dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.fan_in_fan_out else weight  # (out, in)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32 (fp64 for fp64 layers), shape ``(out, in)``.

        Per slice: ``scaling * B_i @ A_i`` in its rows, zeros elsewhere, so rows without LoRA
        merge to ``W`` bit for bit.

        Returns:
            The update, transposed to ``(in, out)`` with ``fan_in_fan_out``.
        """
        layout, dtype = self.slice_layout, self._merge_dtype()
        delta = layout.delta_weight(self.lora_A, self.lora_B, self.scaling, dtype)  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._prepare_forward()
        if self._use_merged():
            weight = self.merged_weight
        elif self._lora_active():
            if self.use_dora:
                return self._dora_forward(x)
            return lora_linear(
                x,
                self.weight,
                self.bias,
                self.lora_A,
                self.lora_B,
                self.scaling,
                self.lora_dropout,
                self.fan_in_fan_out,
                self.slice_layout,
            )
        else:
            weight = self.weight
        return F.linear(x, weight.t() if self.fan_in_fan_out else weight, self.bias)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA on the LoRA output (see :mod:`lora_layers.dora`), PEFT's way under dropout."""
        args = (self.lora_A, self.lora_B, self.scaling)
        layout = (self.fan_in_fan_out, self.slice_layout)
        if not (self.training and self.dropout_p > 0):
            out = lora_linear(x, self.weight, self.bias, *args, self.lora_dropout, *layout)
            return self.dora_combine(out, self.bias)
        # As PEFT: the base product of the undropped input, and DoRA's terms on the dropped one.
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        x_d = self.lora_dropout(x)
        dropped = lora_linear(x_d, self.weight, None, *args, _NO_DROPOUT, *layout)
        return self.dora_combine_dropout(F.linear(x, w, self.bias), dropped, F.linear(x_d, w))

    def extra_repr(self) -> str:
        text = super().extra_repr() + ", " + self.lora_extra_repr()
        return text + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
