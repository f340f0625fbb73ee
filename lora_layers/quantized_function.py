"""The autograd function of LoRA on quantized bases: the update added in place, lean saves.

Used by :mod:`lora_layers.quantized`. Dropout draws, applies and packs the keep-mask with
:mod:`lora_layers.functional`'s functions (one mask for every layer: 16 random bits per
element, keep probability :func:`~lora_layers.functional.dropout_keep_probability`).
"""

from __future__ import annotations

import torch

from .functional import apply_keep, dropout_keep_probability, keep_mask, pack_bits, unpack_bits

__all__ = ["QuantizedLoRAFunction", "keep_mask"]  # keep_mask: functional's, re-exported


# --------------------------------------------------------------------------- autograd
class QuantizedLoRAFunction(torch.autograd.Function):
    """Add the per-slice LoRA update into a quantized layer's output, in place.

    Forward arguments:
        out: The base layer's output ``(..., out_features)``; modified in place and returned.
        x: The layer's input ``(..., in_features)``, any float dtype.
        lora_A: ``(R, in_features)``, R = r * number of enabled slices.
        lora_B: ``(sum of enabled slice sizes, r)``.
        scaling: The LoRA scaling.
        p: Dropout probability on the LoRA branch's input (0: no dropout).
        layout: The enabled output slices (:class:`~lora_layers.config.SliceLayout`).

    Saved for backward: the input in its own dtype (``x`` itself, or with dropout the dropped
    input ``x * keep`` in its place), ``h = dropout(x) @ A.T`` ``(N, R)`` in the LoRA dtype
    and, with dropout, the keep-mask packed at one bit per element. The gradient of ``out``
    passes through unchanged (the base layer's own backward handles its part of ``x``'s
    gradient); the update is computed in the LoRA dtype and added with one rounding.
    """

    @staticmethod
    def forward(ctx, out, x, lora_A, lora_B, scaling, p, layout):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        out2 = out.view(-1, out.shape[-1])  # (N, out)
        packed = None
        if p > 0:
            keep = keep_mask(x2.shape, p, x2.device)
            x2 = apply_keep(x2, keep)  # the dropped input, x's dtype
            packed = pack_bits(keep)
            del keep
        xl = x2 if x2.dtype == lora_A.dtype else x2.to(lora_A.dtype)  # a temporary copy
        h = torch.mm(xl, lora_A.t())  # (N, R)
        del xl
        alpha = scaling / dropout_keep_probability(p)  # inverted dropout's 1 / (1 - p')
        for rows, a_rows, b_rows in layout.blocks(lora_B.shape[1]):
            h_i, b_i = h[:, a_rows], lora_B[b_rows]
            if out2.dtype == h.dtype:
                out2[:, rows].addmm_(h_i, b_i.t(), alpha=alpha)
            else:  # e.g. bf16 output, fp32 LoRA: the sum is formed in fp32, rounded once
                out2[:, rows].add_(torch.mm(h_i, b_i.t()), alpha=alpha)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x if packed is None else x2, lora_A, lora_B, h, packed)
        ctx.alpha, ctx.layout, ctx.x_shape = alpha, layout, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xd, lora_A, lora_B, h, packed = ctx.saved_tensors  # xd: x, or x * keep with dropout
        _, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        alpha, layout = ctx.alpha, ctx.layout
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        dtype = lora_A.dtype
        blocks = []  # per slice: its gradient columns (LoRA dtype), h columns, B rows
        for rows, a_rows, b_rows in layout.blocks(lora_B.shape[1]):
            g_i = g if layout.is_whole else g[:, rows]
            blocks.append(
                (g_i if g_i.dtype == dtype else g_i.to(dtype), h[:, a_rows], lora_B[b_rows])
            )
        grad_A = grad_B = grad_x = None
        if need_b:
            parts = [torch.mm(g_i.t(), h_i).mul_(alpha) for g_i, h_i, _ in blocks]
            grad_B = torch.cat(parts) if len(parts) > 1 else parts[0]  # (rows, r)
        if need_x or need_a:
            parts = [torch.mm(g_i, b_i) for g_i, _, b_i in blocks]
            u = (torch.cat(parts, 1) if len(parts) > 1 else parts[0]).mul_(alpha)  # (N, R)
            if need_a:
                x2 = xd.reshape(-1, xd.shape[-1])
                grad_A = torch.mm(u.t(), x2 if x2.dtype == dtype else x2.to(dtype))  # (R, in)
            if need_x:
                lora_grad = torch.mm(u, lora_A)  # (N, in)
                if packed is not None:
                    apply_keep(lora_grad, unpack_bits(packed, lora_grad.shape), out=lora_grad)
                grad_x = lora_grad.to(xd.dtype).view(ctx.x_shape)
        return grad_out, grad_x, grad_A, grad_B, None, None, None
