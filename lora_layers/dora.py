r"""DoRA (Liu et al. 2024, weight-decomposed LoRA) for every LoRA layer, with a lean norm.

DoRA splits the adapted weight into a direction and a trainable magnitude ``m``, one entry
per output row (``lora_magnitude``)::

    W' = m / ||W + s B A||_row  *  (W + s B A)

The row norm is *detached* (treated as a constant in backward, the paper's section 4.3 and
PEFT), so with ``scale = m / ||W + s B A||`` a layer computes, exactly as PEFT 0.21.2's
``use_dora=True``::

    y = scale * (x W^T + s x A^T B^T) + b                       (no dropout, or eval)
    y = x W^T + b + (scale - 1) * (x_d W^T) + scale * s x_d A^T B^T    (training, dropout)

where ``x_d = dropout(x)``: with dropout active PEFT recomputes the base product on the
dropped input, and so does this module. The magnitude starts at the row norm of the current
``W + s B A`` (``||W||`` with ``B = 0``), so a fresh DoRA layer's output is the base output.

**The lean norm.** PEFT materialises the dense ``W + s B A`` (``out x in``) on every forward
to take its row norms. They do not need it::

    ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T

``||W_i||^2`` is cached for the frozen ``W`` (recomputed when ``W`` is replaced or changed in
place: its identity, version counter and storage are checked), ``W A^T`` is an ``out x r``
product and ``A A^T`` is ``r x r``. Everything is computed without grad in float32 (float64
when ``W``, ``A``, ``B`` or ``m`` are float64), a ``W`` in a lower precision is cast in row
chunks of about a million elements, never whole, and the squared norm is clamped at 0 against
rounding. Caveat: for a row where ``W_i + s (B A)_i`` nearly cancels to zero the three terms
cancel too, and the lean norm loses relative precision that the dense one keeps.

**Layers.** A layer says only how its weight is seen as rows (:meth:`DoRAMixin._dora_rows`:
``nn.Linear``'s ``(out, in)``, a convolution's ``(out, in / groups * prod(k))``, an
embedding's *transposed* table ``(embedding_dim, num_embeddings)``, as PEFT) and which rows
have LoRA (a fused projection's enabled slices; disabled slices have no magnitude and stay
bit-identical to the base). ``lora_magnitude`` has one entry per LoRA row: ``(out_features,)``
(enabled slices' rows in output order for ``MergedLinear``), ``(out_channels,)`` for a
convolution (PEFT stores ``(1, out_channels, 1, ...)``) and ``(embedding_dim,)`` for an
embedding, in the LoRA dtype.

**Meta device.** A magnitude created while ``W`` is on the meta device, or materialised by
``to_empty()`` (``W`` is then uninitialised memory), is *pending*: it is computed from ``W``
on first use (a forward, a merge, :meth:`DoRAMixin.dora_weight_norm`), unless something
wrote it first (``load_state_dict``, ``copy_``), which is then kept. Call
:meth:`DoRAMixin.reset_dora_magnitude` to set it from the current ``W`` explicitly, e.g.
before saving an adapter that was never run.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .functional import transforms_active

__all__ = [
    "MAGNITUDE_LEAF",
    "DoRAMixin",
    "check_use_dora",
    "lean_row_norms",
    "row_norms_squared",
]

#: The state-dict leaf of the DoRA magnitude: ``<module>.lora_magnitude``.
MAGNITUDE_LEAF = "lora_magnitude"
_CHUNK = 1 << 20  # elements of W cast at a time when W is below the norm's precision


def check_use_dora(use_dora: object, r: object) -> None:
    """Validate ``use_dora`` for a layer of rank ``r``.

    Raises:
        TypeError: If ``use_dora`` is not a bool.
        ValueError: If ``use_dora`` is True and ``r == 0`` (DoRA needs a LoRA update).
    """
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {use_dora!r} ({type(use_dora).__name__})")
    if use_dora and r == 0:
        raise ValueError(f"use_dora=True needs a LoRA update (r > 0), got r={r}")


def _row_chunks(rows: torch.Tensor, dtype: torch.dtype):
    """``rows`` in ``dtype``: whole when it already is, else in chunks of ~``_CHUNK`` elements."""
    if rows.dtype == dtype:
        yield rows
        return
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    for chunk in rows.split(step):
        yield chunk.to(dtype)


def row_norms_squared(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||rows_i||^2`` for every row of a 2-D tensor, computed in ``dtype``.

    Args:
        rows: ``(n, k)``, any strides.
        dtype: float32 or float64.

    Returns:
        ``(n,)`` in ``dtype``.
    """
    parts = [torch.linalg.vector_norm(c, dim=1).square() for c in _row_chunks(rows, dtype)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def lean_row_norms(
    rows: torch.Tensor,
    rows_sq: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``||W_i + s (B A)_i||`` per row without forming ``W + s B A``.

    Args:
        rows: ``W`` as ``(n, k)`` rows (any dtype and strides).
        rows_sq: ``||W_i||^2``, ``(n,)``, in the compute dtype.
        lora_A: ``(r, k)``.
        lora_B: ``(n, r)``.
        scaling: ``s``.

    Returns:
        ``(n,)`` norms in ``rows_sq``'s dtype (no grad).
    """
    dtype = rows_sq.dtype
    a, b = lora_A.detach().to(dtype), lora_B.detach().to(dtype)
    w_at = [torch.mm(c, a.t()) for c in _row_chunks(rows.detach(), dtype)]
    w_at = w_at[0] if len(w_at) == 1 else torch.cat(w_at)  # (n, r)
    # (n, r): 2 s W A^T + s^2 B (A A^T); then row i of B dotted with row i of it, plus ||W_i||^2.
    inner = torch.addmm(w_at, b, torch.mm(a, a.t()), beta=2.0 * scaling, alpha=scaling * scaling)
    squared = torch.baddbmm(rows_sq.view(-1, 1, 1), b.unsqueeze(1), inner.unsqueeze(2))
    return squared.view(-1).clamp_min_(0.0).sqrt_()


class DoRAMixin:
    """DoRA's magnitude, its lean norm, its forward combination and its merge, for LoRALayer.

    A layer overrides :meth:`_dora_rows` (how its weight is seen as output rows) and, for a
    layer whose output dimension is not the last, :meth:`_dora_view`.
    """

    #: Whether the layer uses DoRA (a class default so every LoRA layer answers).
    use_dora: bool = False
    _dora_pending: int | None = None
    _dora_cache: tuple | None = None

    # ------------------------------------------------------------------ per-layer hooks
    def _dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (or a tensor of its layout) seen as ``(output rows, k)``, sharing memory."""
        raise NotImplementedError

    def _dora_view(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-output vector shaped to broadcast against the layer's output."""
        return vector

    # ------------------------------------------------------------------ set-up
    def _setup_dora(self, use_dora: object, r: object) -> None:
        check_use_dora(use_dora, r)
        self.use_dora = use_dora
        self._dora_pending = None
        self._dora_cache = None

    def _has_dora(self) -> bool:
        return self.use_dora and self.r > 0

    def _dora_parameters(self) -> tuple[nn.Parameter, ...]:
        return (self.lora_magnitude,) if self._has_dora() else ()

    def _dora_blocks(self) -> tuple[tuple[slice, slice, slice], ...]:
        """Per LoRA slice: its output rows, its rows of ``lora_A`` and of ``lora_B``.

        A layer with a ``slice_layout`` (``Linear`` / ``MergedLinear``) reads it there; any
        other layer has one slice: all its rows.
        """
        layout = getattr(self, "slice_layout", None)
        if layout is not None:
            return layout.blocks(self.r)
        rows = self.lora_B.shape[0]
        return ((slice(0, rows), slice(0, self.r), slice(0, rows)),)

    def _dora_is_whole(self) -> bool:
        """Whether every output row has LoRA (no disabled slice)."""
        layout = getattr(self, "slice_layout", None)
        return layout is None or layout.is_whole

    def _init_dora_magnitude(self, device: torch.device, dtype: torch.dtype) -> None:
        """Create ``lora_magnitude`` (set by the following ``reset_lora_parameters``)."""
        if self._has_dora():
            rows = self.lora_B.shape[0]
            self.lora_magnitude = nn.Parameter(torch.empty(rows, device=device, dtype=dtype))

    def reset_dora_magnitude(self) -> None:
        """Set ``lora_magnitude`` to the row norms of the current ``W + s B A`` (PEFT's init).

        With ``W`` on the meta device the magnitude becomes pending instead (see the module
        docstring). Does nothing on a layer without DoRA.
        """
        if not self._has_dora():
            return
        if self.weight.is_meta or self.lora_magnitude.is_meta:
            self._defer_dora_magnitude()
            return
        self._dora_pending = None
        with torch.no_grad():
            self.lora_magnitude.copy_(self._dora_norm(use_cache=False))

    def _defer_dora_magnitude(self) -> None:
        """Mark the magnitude pending: computed from ``W`` on first use unless written first."""
        if self._has_dora():
            self._dora_pending = self.lora_magnitude._version
            self._dora_cache = None

    def _settle_dora_magnitude(self) -> None:
        """Compute a pending magnitude now, unless something wrote it since it became pending."""
        if self._dora_pending is None:
            return
        if self.lora_magnitude._version != self._dora_pending:
            self._dora_pending = None  # loaded or set by the user: keep it
        elif not self.weight.is_meta:
            self.reset_dora_magnitude()

    # ------------------------------------------------------------------ the norm
    def _dora_dtype(self) -> torch.dtype:
        params = (self.weight, self.lora_A, self.lora_B, self.lora_magnitude)
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    def _weight_rows_squared(self, rows: torch.Tensor, dtype: torch.dtype, use_cache: bool):
        """``||W_i||^2`` of every row, cached while ``W`` is the same unchanged tensor."""
        weight = self.weight
        cacheable = (
            use_cache
            and type(weight.data) is torch.Tensor
            and not weight.is_inference()
            and not torch.is_inference_mode_enabled()  # its result would be an inference tensor
            and not torch.compiler.is_compiling()
            and not transforms_active()
        )
        if not cacheable:
            return row_norms_squared(rows, dtype)
        key = (weight._version, weight.data_ptr(), weight.shape, weight.dtype, dtype)
        cache = self._dora_cache
        if cache is not None and cache[0]() is weight and cache[1] == key:
            return cache[2]
        value = row_norms_squared(rows, dtype)
        self._dora_cache = (weakref.ref(weight), key, value)
        return value

    def _dora_norm(self, use_cache: bool = True) -> torch.Tensor:
        """``||W + s B A||`` of every LoRA row (in ``lora_magnitude``'s order), detached."""
        dtype = self._dora_dtype()
        with torch.no_grad():
            rows = self._dora_rows(self.weight.detach())
            rows_sq = self._weight_rows_squared(rows, dtype, use_cache)
            parts = [
                lean_row_norms(
                    rows[out], rows_sq[out], self.lora_A[a], self.lora_B[b], self.scaling
                )
                for out, a, b in self._dora_blocks()
            ]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

    def dora_weight_norm(self) -> torch.Tensor:
        """The detached row norms ``||W + s B A||`` DoRA divides by (lean, see the module doc).

        Returns:
            ``(rows with LoRA,)`` in float32 (float64 for float64 layers).

        Raises:
            ValueError: If the layer has no DoRA.
        """
        if not self._has_dora():
            raise ValueError(f"{type(self).__name__} has no DoRA (use_dora=False or r=0)")
        self._settle_dora_magnitude()
        return self._dora_norm()

    def _dora_factor(self, dtype: torch.dtype, minus_one: bool) -> torch.Tensor:
        """Per output row in ``dtype``: ``scale = m / ||W + s B A||``, or ``scale - 1``.

        Rows without LoRA get exactly 1 (0 with ``minus_one``). Differentiable in
        ``lora_magnitude`` only (the norm is detached).
        """
        self._settle_dora_magnitude()
        norm = self._dora_norm()
        magnitude = self.lora_magnitude.to(norm.dtype)
        if minus_one:
            start = torch.full((), -1.0, dtype=norm.dtype, device=norm.device)
            factor = torch.addcdiv(start, magnitude, norm)  # m / n - 1 in one op
        else:
            factor = magnitude / norm
        if not self._dora_is_whole():  # rows without LoRA: exactly 1 (0 with minus_one)
            n_rows = self._dora_rows(self.weight).shape[0]
            fill = factor.new_full((), 0.0 if minus_one else 1.0)
            pieces, pos = [], 0
            for out, _, b in self._dora_blocks():
                pieces += [fill.expand(out.start - pos), factor[b]]
                pos = out.stop
            factor = torch.cat([*pieces, fill.expand(n_rows - pos)])
        return self._dora_view(factor.to(dtype))

    # ------------------------------------------------------------------ forward pieces
    def dora_combine(self, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """DoRA's output ``scale * (out - b) + b`` from the plain LoRA output ``out``.

        ``out = x W^T + s x A^T B^T + b``. In float32 / float64 this is
        ``out * scale + b * (1 - scale)``: one pass over ``out`` forward, one (plus the
        magnitude's reduction) backward. In lower precisions ``scale`` itself would be
        rounded (bfloat16 keeps 8 bits: steps of 0.4 % near 1), so there it is
        ``out + (out - b) * (scale - 1)``, which keeps ``scale - 1`` at full relative
        precision. Either way rows without LoRA are bit-identical to ``out`` (their scale is
        exactly 1).
        """
        if out.dtype in (torch.float32, torch.float64):
            scale = self._dora_factor(out.dtype, minus_one=False)
            if bias is None:
                return out * scale
            b = self._dora_view(bias.to(out.dtype))
            return torch.addcmul(torch.addcmul(b, b, scale, value=-1.0), out, scale)
        delta = self._dora_factor(out.dtype, minus_one=True)
        unbiased = out if bias is None else out - self._dora_view(bias.to(out.dtype))
        return torch.addcmul(out, unbiased, delta)

    def dora_combine_dropout(
        self, base: torch.Tensor, dropped: torch.Tensor, dropped_base: torch.Tensor
    ) -> torch.Tensor:
        """DoRA's output in training with dropout, as PEFT computes it.

        Args:
            base: ``x W^T + b`` (the undropped input).
            dropped: ``x_d W^T + s x_d A^T B^T`` (no bias).
            dropped_base: ``x_d W^T`` (no bias).

        Returns:
            ``base + (scale - 1) x_d W^T + scale s x_d A^T B^T``, computed as
            ``base + (dropped - dropped_base) + (scale - 1) * dropped``.
        """
        delta = self._dora_factor(dropped.dtype, minus_one=True)
        return torch.addcmul(base + (dropped - dropped_base), dropped, delta)

    # ------------------------------------------------------------------ merge
    def _dora_rescale_(self, merged: torch.Tensor) -> None:
        """Scale the rows of the merged ``W + s B A`` (in place) by ``m / ||W + s B A||``.

        The norm is taken from ``merged`` itself (dense, it exists anyway), in its dtype.
        Rows without LoRA are left untouched.
        """
        if not self._has_dora():
            return
        self._settle_dora_magnitude()
        rows = self._dora_rows(merged)
        magnitude = self.lora_magnitude.detach().to(merged.dtype)
        for out, _, b in self._dora_blocks():
            block = rows[out]
            norm = torch.linalg.vector_norm(block, dim=1, keepdim=True)
            block.mul_(magnitude[b].unsqueeze(1) / norm)
