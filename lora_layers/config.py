"""LoRA settings: one frozen config per layer, its validation, and the one scaling formula.

:class:`LoRAConfig` is what :func:`~lora_layers.plan_lora` decides per module, what
:func:`~lora_layers.wrap_module` builds a layer from, and what a layer reads back with
:meth:`LoRAConfig.from_layer`. :func:`lora_scaling` is the only place the scaling
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) is computed.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import check_lora_args, lora_scaling

__all__ = [
    "FusedSpec",
    "InjectSpec",
    "LoRAConfig",
    "SliceLayout",
    "check_slices",
    "is_int",
]


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_slices(
    out_features: int, enable_lora: Sequence[bool], split_sizes: Sequence[int] | None
) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """Validate the output slices of a fused projection and return them as tuples.

    Args:
        out_features: Output size of the whole projection.
        enable_lora: One flag per slice.
        split_sizes: Size of each slice (None: equal slices).

    Returns:
        ``(enable_lora, split_sizes)`` as tuples of bools and ints.

    Raises:
        TypeError: If ``enable_lora`` is not a sequence.
        ValueError: If the slices are empty, differ in number, are not positive ints, or do
            not add up to ``out_features``.
    """
    if isinstance(enable_lora, (str, bytes)) or not isinstance(enable_lora, Sequence):
        raise TypeError(f"enable_lora must be a sequence of bools, got {enable_lora!r}")
    if len(enable_lora) == 0:
        raise ValueError("enable_lora must name at least one slice, got an empty sequence")
    enable = tuple(bool(e) for e in enable_lora)
    n = len(enable)
    if split_sizes is None:
        if out_features % n != 0:
            raise ValueError(
                f"len(enable_lora)={n} does not divide out_features={out_features}; "
                "pass split_sizes for unequal slices"
            )
        return enable, (out_features // n,) * n
    sizes = tuple(split_sizes)
    if len(sizes) != n:
        raise ValueError(
            f"split_sizes={sizes} has {len(sizes)} entries but enable_lora={enable} has {n}"
        )
    if not all(is_int(s) and s > 0 for s in sizes):
        raise ValueError(f"split_sizes must be positive ints, got split_sizes={sizes}")
    if sum(sizes) != out_features:
        raise ValueError(
            f"split_sizes={sizes} sum to {sum(sizes)}, but out_features={out_features}"
        )
    return enable, tuple(int(s) for s in sizes)


@dataclass(frozen=True)
class SliceLayout:
    """Where each enabled output slice of a projection keeps its update, computed once.

    ``lora_A`` stacks one ``(r, in)`` block per enabled slice; ``lora_B`` stacks one
    ``(size_i, r)`` block per enabled slice (loralib's layout). A plain ``Linear`` has one
    slice over every output (:meth:`whole`). Every path that walks the slices (the fast and
    plain forward and backward, the layers' delta weight, the PEFT export, fused <-> separate
    conversion) reads them from here; the walk itself is :meth:`blocks`.

    Attributes:
        out_slices: ``((start, stop), ...)``: the output rows of each enabled slice.
        out_features: Output size of the whole projection.
        is_whole: Whether the one slice covers every output (the paths' shortcut).
    """

    out_slices: tuple[tuple[int, int], ...]
    out_features: int
    is_whole: bool = field(init=False, repr=False, compare=False)
    _by_rank: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_whole", self.out_slices == ((0, self.out_features),))

    @classmethod
    def of(cls, split_sizes: Sequence[int], enable_lora: Sequence[bool]) -> SliceLayout:
        """The layout of slices ``split_sizes`` of which ``enable_lora`` have LoRA."""
        out, start = [], 0
        for size, on in zip(split_sizes, enable_lora, strict=True):
            if on:
                out.append((start, start + size))
            start += size
        return cls(tuple(out), start)

    @classmethod
    def whole(cls, out_features: int) -> SliceLayout:
        """One slice over all ``out_features`` outputs: a plain ``Linear``'s layout."""
        return cls(((0, out_features),), out_features)

    @property
    def b_rows(self) -> int:
        """Rows of ``lora_B``: the enabled slices' sizes added up."""
        return sum(stop - start for start, stop in self.out_slices)

    def lora_shapes(self, r: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``lora_A``: ``(r * n_enabled, in_features)``; ``lora_B``: ``(b_rows, r)``."""
        return (r * len(self.out_slices), in_features), (self.b_rows, r)

    def blocks(self, r: int) -> tuple[tuple[slice, slice, slice], ...]:
        """Per enabled slice: ``(its output rows, its rows of lora_A, its rows of lora_B)``.

        Computed once per rank and kept: layers ask for theirs when they are built, so
        forwards (and ``torch.compile`` traces) only read it.
        """
        found = self._by_rank.get(r)
        if found is None:
            found, b_row = [], 0
            for i, (start, stop) in enumerate(self.out_slices):
                size = stop - start
                found.append(
                    (slice(start, stop), slice(i * r, (i + 1) * r), slice(b_row, b_row + size))
                )
                b_row += size
            found = self._by_rank[r] = tuple(found)
        return found

    def delta_weight(
        self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype
    ) -> torch.Tensor:
        """``scaling * B_i @ A_i`` of every enabled slice in its rows, zeros elsewhere.

        Args:
            lora_A: ``(r * n_enabled, in)``.
            lora_B: ``(b_rows, r)``.
            scaling: The LoRA scaling.
            dtype: The dtype of the arithmetic and the result.

        Returns:
            An ``(out_features, in)`` tensor; disabled slices' rows are exactly zero.
        """
        if self.is_whole:
            return scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
        delta = lora_A.new_zeros(self.out_features, lora_A.shape[1], dtype=dtype)
        for out, a_rows, b_rows in self.blocks(lora_B.shape[1]):
            delta[out] = scaling * (lora_B[b_rows].to(dtype) @ lora_A[a_rows].to(dtype))
        return delta


@dataclass(frozen=True)
class FusedSpec:
    """Output slices of a fused projection and which of them get LoRA.

    Attributes:
        split_sizes: Size of each output slice, in order; they sum to ``out_features``.
        enable_lora: One flag per slice; True slices get their own LoRA update.

    Raises:
        ValueError: If the two tuples differ in length, a size is not a positive int, or no
            slice is enabled.
    """

    split_sizes: tuple[int, ...]
    enable_lora: tuple[bool, ...]

    def __post_init__(self) -> None:
        sizes, enable = tuple(self.split_sizes), tuple(bool(e) for e in self.enable_lora)
        if len(sizes) != len(enable) or not sizes:
            raise ValueError(
                f"FusedSpec needs one enable flag per slice, got split_sizes={sizes} "
                f"and enable_lora={enable}"
            )
        if not all(is_int(s) and s > 0 for s in sizes):
            raise ValueError(f"split_sizes must be positive ints, got {sizes}")
        if not any(enable):
            raise ValueError(f"enable_lora={enable} enables no slice; leave the module untargeted")
        object.__setattr__(self, "split_sizes", tuple(int(s) for s in sizes))
        object.__setattr__(self, "enable_lora", enable)


@dataclass(frozen=True)
class LoRAConfig:
    """Everything needed to wrap one layer: what :func:`plan_lora` decides per module.

    ``InjectSpec`` is the same class under its earlier name.

    Attributes:
        r: Rank (per enabled slice for a fused projection).
        lora_alpha: Scaling numerator.
        lora_dropout: Dropout on the LoRA branch's input (ignored by embeddings).
        use_rslora: Scale by ``lora_alpha / sqrt(r)``.
        merge_weights: Merge on ``eval()`` / unmerge on ``train()`` (loralib's contract).
        lora_dtype: Dtype of ``lora_A`` / ``lora_B`` (None: the base weight's).
        fused: Slices of a fused projection (None: one update over the whole output).
        use_dora: DoRA: a trainable per-row magnitude (see :mod:`lora_layers.dora`).

    Raises:
        TypeError, ValueError: For invalid ``r`` / ``lora_alpha`` / ``lora_dropout`` /
            ``lora_dtype``.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    merge_weights: bool = False
    lora_dtype: torch.dtype | None = None
    fused: FusedSpec | None = None
    use_dora: bool = False

    def __post_init__(self) -> None:
        check_lora_args(self.r, self.lora_alpha, self.lora_dropout)
        if self.lora_dtype is not None and not isinstance(self.lora_dtype, torch.dtype):
            raise TypeError(f"lora_dtype must be a torch.dtype or None, got {self.lora_dtype!r}")
        if self.fused is not None and not isinstance(self.fused, FusedSpec):
            raise TypeError(f"fused must be a FusedSpec or None, got {self.fused!r}")
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {self.use_dora!r}")

    @property
    def scaling(self) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA): see :func:`lora_scaling`."""
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def layer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every layer's ``from_module`` takes for this config."""
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "merge_weights": self.merge_weights,
            "use_rslora": self.use_rslora,
            "lora_dtype": self.lora_dtype,
            "use_dora": self.use_dora,
        }

    @classmethod
    def from_layer(cls, layer: Any) -> LoRAConfig:
        """The config that rebuilds ``layer``'s LoRA settings (for saving metadata).

        Args:
            layer: A lora_layers layer.

        Returns:
            LoRAConfig: Its rank, alpha, dropout, rsLoRA flag, merge mode, LoRA dtype and slices.
        """
        fused = None
        if getattr(layer, "split_sizes", None) is not None:
            fused = FusedSpec(layer.split_sizes, layer.enable_lora)
        lora_dtype = layer.lora_A.dtype if layer.r > 0 else None
        return cls(
            r=layer.r,
            lora_alpha=layer.lora_alpha,
            lora_dropout=layer.dropout_p,
            use_rslora=layer.use_rslora,
            merge_weights=layer.merge_weights,
            lora_dtype=None if lora_dtype == layer.weight.dtype else lora_dtype,
            fused=fused,
            use_dora=bool(getattr(layer, "use_dora", False)),
        )


#: The earlier name of :class:`LoRAConfig`.
InjectSpec = LoRAConfig
