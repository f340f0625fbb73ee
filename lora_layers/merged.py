"""LoRA ``MergedLinear``: per-slice LoRA on a fused projection (Phi-3 ``qkv_proj``, ``gate_up_proj``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import SliceLayout, check_slices
from .linear import Linear

__all__ = ["MergedLinear"]


class MergedLinear(Linear):
    r"""A fused linear layer whose output slices each get their own low-rank update.

    The output is split into slices (equal, or ``split_sizes``); every enabled slice ``i``
    gets its own update:

    .. math::

        y_{[s_i:e_i]} = x W_{[s_i:e_i]}^\top + b_{[s_i:e_i]}
            + \frac{\alpha}{r} \, \mathrm{dropout}(x) A_i^\top B_i^\top

    ``lora_A`` has shape ``(r * n_enabled, in_features)``; slice ``i`` uses rows
    ``i*r:(i+1)*r`` (counting enabled slices only). ``lora_B`` has shape
    ``(sum of enabled slice sizes, r)``; slice ``i`` uses its own block of rows. This is
    loralib's layout, so loralib state dicts load unchanged. The update is computed low-rank
    (never a dense ``out x in`` delta in forward); disabled slices own no parameters and their
    output is bit-identical to the base layer's.

    Args:
        in_features (int): Size of each input sample.
        out_features (int): Size of each output sample (all slices together).
        r (int): Rank of each slice's update; 0 gives a plain linear layer.
        lora_alpha (float): Scaling numerator; ``scaling = lora_alpha / r``.
        lora_dropout (float): Dropout probability on the LoRA branch's input, in ``[0, 1)``.
        enable_lora (Sequence[bool]): Which slices get LoRA, e.g. ``(True, False, True)`` for
            q and v of a fused qkv. All False means no LoRA parameters at all.
        fan_in_fan_out (bool): Store ``weight`` as ``(in, out)``.
        merge_weights (bool): Merge on ``eval()`` and unmerge on ``train()``.
        split_sizes (Sequence[int] | None): Slice sizes, e.g. ``(q, k, v)`` sizes under
            grouped-query attention. Default: ``out_features`` split equally.
        bias (bool): Whether the layer has a bias.
        use_rslora (bool): Use ``scaling = lora_alpha / sqrt(r)``.
        use_dora (bool): DoRA on the enabled slices: ``lora_magnitude`` has one entry per
            enabled row (enabled slices in output order); disabled rows stay the base's.
        device (torch.device | str | None): Device of the parameters.
        dtype (torch.dtype | None): Dtype of the parameters.

    Raises:
        TypeError: If ``enable_lora`` is not a sequence, or ``r``/``lora_alpha`` have bad types.
        ValueError: If ``len(enable_lora)`` does not divide ``out_features`` (without
            ``split_sizes``), ``split_sizes`` do not sum to ``out_features`` or differ in
            length from ``enable_lora``, or ``r``/``lora_alpha``/``lora_dropout`` are invalid.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        split_sizes: Sequence[int] | None = None,
        bias: bool = True,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        enable_lora, split_sizes = check_slices(out_features, enable_lora, split_sizes)
        super().__init__(  # no enabled slice: no LoRA at all (r is still validated)
            in_features,
            out_features,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            fan_in_fan_out=fan_in_fan_out,
            merge_weights=merge_weights,
            bias=bias,
            use_rslora=use_rslora,
            device=device,
            dtype=dtype,
            slice_layout=SliceLayout.of(split_sizes, enable_lora),
            use_dora=use_dora,
        )
        self.enable_lora, self.split_sizes = enable_lora, split_sizes

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", enable_lora={self.enable_lora}, split_sizes={self.split_sizes}"
        )
