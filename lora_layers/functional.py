"""The LoRA branch of ``Linear`` and ``MergedLinear``: a fast path and a plain-ops path.

Both compute, for every enabled output slice ``i`` (``Linear`` has one slice: all outputs)::

    y = x @ W.T + b
    y[..., slice_i] += scaling * (dropout(x) @ A_i.T) @ B_i.T

where ``A_i`` is rows ``i*r:(i+1)*r`` of ``lora_A`` and ``B_i`` is slice ``i``'s block of rows
of ``lora_B``. Disabled slices are never written, so they are bit-identical to the base output.

The fast path (:class:`LoRALinearFunction`) adds the low-rank product into the base output in
place and saves for backward only the input, the small ``(N, R)`` projection
``h = dropout(x) @ A.T`` and, with dropout, the keep-mask packed at one bit per element. The
plain path composes ordinary differentiable ops; it is used under ``torch.compile`` (so the
compiler sees plain ops it can fuse), under autocast and when dtypes differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinearFunction", "lora_linear", "pack_bits", "unpack_bits"]

_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS_CACHE.get(device)
    if shifts is None:
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        _SHIFTS_CACHE[device] = shifts
    return shifts


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into a flat uint8 tensor, eight elements per byte.

    Args:
        mask: A bool tensor of any shape.

    Returns:
        A 1-D uint8 tensor of ``ceil(mask.numel() / 8)`` bytes.
    """
    flat = mask.reshape(-1).view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    return (flat.view(-1, 8) << _shifts(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Invert :func:`pack_bits`.

    Args:
        packed: The uint8 tensor returned by :func:`pack_bits`.
        shape: The shape of the original mask.

    Returns:
        A bool tensor of ``shape``.
    """
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1  # (numel/8, 8)
    return bits.view(-1)[: shape.numel()].view(shape).view(torch.bool)


class LoRALinearFunction(torch.autograd.Function):
    """Base linear plus per-slice LoRA update, with a lean backward.

    Forward arguments (all tensors 2-D, dtypes equal):
        x: (N, in) input.
        weight: (out, in), or (in, out) with ``fan_in_fan_out``.
        bias: (out,) or None.
        lora_A: (R, in) with R = r * number of enabled slices.
        lora_B: (sum of enabled slice sizes, r).
        scaling: float.
        p: dropout probability on the LoRA branch's input (0 disables dropout).
        fan_in_fan_out: whether ``weight`` is stored transposed.
        slices: ((start, stop), ...) output columns of each enabled slice.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out, slices):
        w = weight.t() if fan_in_fan_out else weight  # (out, in)
        out = F.linear(x, w, bias)  # (N, out)
        if p > 0:
            keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
            h = torch.mm(x * keep, lora_A.t()).mul_(1.0 / (1.0 - p))  # (N, R)
            packed = pack_bits(keep)
            del keep
        else:
            h = torch.mm(x, lora_A.t())  # (N, R)
            packed = None
        r = lora_B.shape[1]
        if len(slices) == 1 and slices[0] == (0, out.shape[1]):
            out.addmm_(h, lora_B.t(), alpha=scaling)
        else:
            b_row = 0
            for i, (start, stop) in enumerate(slices):
                b_i = lora_B[b_row : b_row + stop - start]  # (size_i, r)
                out[:, start:stop].addmm_(h[:, i * r : (i + 1) * r], b_i.t(), alpha=scaling)
                b_row += stop - start
        ctx.save_for_backward(x, weight, lora_A, lora_B, h, packed)
        ctx.scaling = scaling
        ctx.p = p
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.slices = slices
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, h, packed = ctx.saved_tensors
        scaling, p, slices = ctx.scaling, ctx.p, ctx.slices
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g = grad_out  # (N, out)
        r = lora_B.shape[1]
        single = len(slices) == 1 and slices[0] == (0, g.shape[1])

        # gh = dL/dh = scaling * g_i @ B_i for each slice, concatenated: (N, R)
        if single:
            g_slices = [g]
            b_blocks = [lora_B]
        else:
            g_slices, b_blocks, b_row = [], [], 0
            for start, stop in slices:
                g_slices.append(g[:, start:stop])
                b_blocks.append(lora_B[b_row : b_row + stop - start])
                b_row += stop - start
        gh = None
        if need_x or need_a:
            parts = [torch.mm(g_i, b_i) for g_i, b_i in zip(g_slices, b_blocks, strict=True)]
            gh = (parts[0] if single else torch.cat(parts, dim=1)).mul_(scaling)

        grad_B = None
        if need_bb:
            parts = [torch.mm(g_i.t(), h[:, i * r : (i + 1) * r]) for i, g_i in enumerate(g_slices)]
            grad_B = (parts[0] if single else torch.cat(parts, dim=0)).mul_(scaling)

        keep = unpack_bits(packed, x.shape) if packed is not None else None
        grad_A = None
        if need_a:
            xd = x * keep if keep is not None else x
            grad_A = torch.mm(gh.t(), xd)  # (R, in)
            if keep is not None:
                grad_A.mul_(1.0 / (1.0 - p))

        grad_x = None
        if need_x:
            w = weight.t() if ctx.fan_in_fan_out else weight  # (out, in)
            grad_x = torch.mm(g, w)
            if keep is None:
                grad_x.addmm_(gh, lora_A)
            else:
                grad_x.add_(torch.mm(gh, lora_A).mul_(keep), alpha=1.0 / (1.0 - p))

        grad_w = None
        if need_w:
            grad_w = torch.mm(g.t(), x)  # (out, in)
            if ctx.fan_in_fan_out:
                grad_w = grad_w.t()
        grad_bias = g.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None, None


def _plain_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout, fan_in_fan_out, slices):
    w = weight.t() if fan_in_fan_out else weight
    out = F.linear(x, w, bias)  # (..., out)
    h = F.linear(dropout(x).to(lora_A.dtype), lora_A)  # (..., R)
    out_features = out.shape[-1]
    r = lora_B.shape[1]
    if len(slices) == 1 and slices[0] == (0, out_features):
        return out + (F.linear(h, lora_B) * scaling).to(out.dtype)
    pieces, pos, b_row = [], 0, 0
    for i, (start, stop) in enumerate(slices):
        if start > pos:
            pieces.append(out[..., pos:start])
        b_i = lora_B[b_row : b_row + stop - start]  # (size_i, r)
        delta = F.linear(h[..., i * r : (i + 1) * r], b_i) * scaling
        pieces.append(out[..., start:stop] + delta.to(out.dtype))
        pos, b_row = stop, b_row + stop - start
    if pos < out_features:
        pieces.append(out[..., pos:])
    return torch.cat(pieces, dim=-1)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: nn.Module,
    fan_in_fan_out: bool,
    slices: tuple[tuple[int, int], ...],
) -> torch.Tensor:
    """Compute ``x @ W.T + b`` plus the LoRA update of each enabled output slice.

    Args:
        x: Input of shape ``(..., in)``.
        weight: Base weight ``(out, in)``, or ``(in, out)`` with ``fan_in_fan_out``.
        bias: Base bias ``(out,)`` or None.
        lora_A: ``(r * n_slices, in)``.
        lora_B: ``(sum of slice sizes, r)``.
        scaling: The LoRA scaling factor.
        dropout: The layer's LoRA dropout module (``nn.Dropout`` or ``nn.Identity``).
        fan_in_fan_out: Whether ``weight`` is stored as ``(in, out)``.
        slices: ``(start, stop)`` output columns of each enabled slice, ascending.

    Returns:
        The output, shape ``(..., out)``.
    """
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    fast = (
        not torch.compiler.is_compiling()
        and x.dtype == weight.dtype == lora_A.dtype == lora_B.dtype
        and not torch.is_autocast_enabled(x.device.type)
        and x.dim() >= 1
    )
    if not fast:
        return _plain_lora_linear(
            x, weight, bias, lora_A, lora_B, scaling, dropout, fan_in_fan_out, slices
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    out = LoRALinearFunction.apply(
        x2, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out, slices
    )
    return out.view(*lead, out.shape[-1])
