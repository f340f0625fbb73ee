"""LoRA ``Embedding``: a drop-in replacement for ``nn.Embedding`` and ``loralib.Embedding``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoRALayer, refuse_fan_in_fan_out

__all__ = ["Embedding"]


class Embedding(LoRALayer, nn.Embedding):
    r"""``nn.Embedding`` with a trainable low-rank update of the embedding table.

    .. math::

        y = W[x] + \frac{\alpha}{r} \, A^\top[x] \, B^\top, \qquad
        \Delta W = \frac{\alpha}{r} (B A)^\top

    with ``A`` of shape ``(r, num_embeddings)`` (zeros) and ``B`` of shape
    ``(embedding_dim, r)`` (standard normal), as in loralib, so the output at initialisation
    equals the base output. ``max_norm`` renormalises the base table only, as
    ``nn.Embedding`` does; ``lora_A`` is never modified in place (loralib renormalises it).
    With ``max_norm`` set the layer never merges and forwards always run unmerged, since
    renormalising a merged table would give a different result; ``merge_and_unload`` refuses
    such a layer with a ``ValueError``. ``scale_grad_by_freq`` scales the gradient of
    ``lora_A`` as well as the base table's, as loralib and PEFT do.

    Args:
        num_embeddings (int): Size of the vocabulary.
        embedding_dim (int): Size of each embedding vector.
        r (int): Rank of the update; 0 gives a plain ``nn.Embedding``.
        lora_alpha (float): Scaling numerator; ``scaling = lora_alpha / r``.
        merge_weights (bool): Merge on ``eval()`` and unmerge on ``train()``.
        padding_idx (int | None): As ``nn.Embedding``.
        max_norm (float | None): As ``nn.Embedding`` (applies to the base table only).
        norm_type (float): As ``nn.Embedding``.
        scale_grad_by_freq (bool): As ``nn.Embedding``.
        sparse (bool): As ``nn.Embedding`` (the base table's gradient).
        use_rslora (bool): Use ``scaling = lora_alpha / sqrt(r)``.
        use_dora (bool): DoRA as PEFT has it for embeddings: ``lora_magnitude``
            ``(embedding_dim,)`` rescales each embedding *dimension* by ``m / ||W + delta||``,
            the norm over the vocabulary (a column of the table).
        fan_in_fan_out (bool): Not meaningful for an embedding; must be False.
        device (torch.device | str | None): Device of the parameters.
        dtype (torch.dtype | None): Dtype of the parameters.

    Raises:
        ValueError: If ``fan_in_fan_out`` is True, or ``r``/``lora_alpha`` are invalid.
        TypeError: If ``r``, ``lora_alpha`` or ``use_dora`` have the wrong type.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        why = " (its table is already (num_embeddings, embedding_dim))"
        refuse_fan_in_fan_out(fan_in_fan_out, "Embedding", why)
        nn.Embedding.__init__(
            self,
            num_embeddings,
            embedding_dim,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse,
            device=device,
            dtype=dtype,
        )
        self._setup_lora(r, lora_alpha, 0.0, merge_weights, use_rslora, True, use_dora)
        self._init_lora_parameters(self.weight.device, self.weight.dtype)

    wraps = nn.Embedding

    def lora_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``lora_A``: ``(r, num_embeddings)``; ``lora_B``: ``(embedding_dim, r)``."""
        return (self.r, self.num_embeddings), (self.embedding_dim, self.r)

    def reset_lora_parameters(self) -> None:
        """A zeros and B standard normal, as loralib: the update starts at exactly zero."""
        if self.r == 0:
            return
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)
        self.reset_dora_magnitude()
        self.unmerge()

    @classmethod
    def module_args(cls, module: nn.Embedding) -> dict[str, Any]:
        """The sizes and settings of an ``nn.Embedding``."""
        names = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type")
        names += ("scale_grad_by_freq", "sparse")
        return {name: getattr(module, name) for name in names}

    @property
    def bias(self) -> None:
        """Embeddings have no bias (lets the shared helpers treat every layer alike)."""
        return None

    @bias.setter
    def bias(self, value: None) -> None:
        if value is not None:
            raise ValueError("Embedding has no bias")

    def _dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()  # (embedding_dim, num_embeddings): PEFT's DoRA rows

    def delta_weight(self) -> torch.Tensor:
        """``(scaling * B @ A).T`` in fp32 (fp64 for fp64 layers), shape ``(num, dim)``."""
        dtype = self._merge_dtype()
        return (self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))).t()

    def get_merged_weight(self) -> torch.Tensor:
        """The merged table ``W + delta_weight()``, as :meth:`LoRALayer.get_merged_weight`.

        Returns:
            A new tensor with ``weight``'s shape, dtype and device.

        Raises:
            ValueError: If ``max_norm`` is set (no plain table gives this layer's outputs:
                ``nn.Embedding`` would renormalise the merged rows, while this layer
                renormalises the base rows and then adds the update), or if the merged
                table would hold NaN or Inf.
        """
        if self.max_norm is not None:
            raise ValueError(
                f"cannot merge the LoRA update of Embedding(max_norm={self.max_norm}): a plain "
                "nn.Embedding with max_norm renormalises the merged rows, while this layer "
                "renormalises the base rows only and then adds the update, so a merged table "
                "would give different outputs. Keep the LoRA layer (its forwards run "
                "unmerged), or use unload() to get the base layer back."
            )
        return super().get_merged_weight()

    def merge(self) -> None:
        """Merge as :meth:`LoRALayer.merge`; with ``max_norm`` set this does nothing.

        A merged table cannot reproduce ``max_norm`` (see :meth:`get_merged_weight`), so an
        Embedding with ``max_norm`` never merges (``eval()`` included) and always runs the
        exact unmerged path.
        """
        if self.max_norm is None:
            super().merge()

    def _use_merged(self) -> bool:
        return super()._use_merged() and self.max_norm is None

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            x,
            weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._prepare_forward()
        if self._use_merged():
            return self._embed(x, self.merged_weight)
        out = self._embed(x, self.weight)
        if not self._lora_active():
            return out
        # The LoRA table is looked up without max_norm, so lora_A is never renormalised;
        # scale_grad_by_freq scales lora_A's gradient as loralib's and PEFT's lookups do.
        after_a = F.embedding(
            x, self.lora_A.t(), self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq
        )  # (..., r)
        out = out + (F.linear(after_a, self.lora_B) * self.scaling).to(out.dtype)
        return self.dora_combine(out, None) if self.use_dora else out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.lora_extra_repr()
