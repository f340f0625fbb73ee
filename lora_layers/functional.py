"""The LoRA branch of ``Linear`` and ``MergedLinear``: a fast path and a plain-ops path.

Both compute, for every enabled output slice ``i`` (``Linear`` has one slice: all outputs)::

    y = x @ W.T + b
    y[..., slice_i] += scaling * (dropout(x) @ A_i.T) @ B_i.T

where ``A_i`` is rows ``i*r:(i+1)*r`` of ``lora_A`` and ``B_i`` is slice ``i``'s block of rows
of ``lora_B``. Disabled slices are never written, so they are bit-identical to the base output.

The fast path (:class:`LoRALinearFunction`) adds the low-rank product into the base output in
place and saves for backward only the input, the small ``(N, R)`` projection
``h = (x * keep) @ A.T`` and, with dropout, the keep-mask packed at one bit per element (the
scale and dropout's ``1 / (1 - p)`` ride on the alpha of the matmuls). The
plain path composes ordinary differentiable ops; it is used under ``torch.compile`` (so the
compiler sees plain ops it can fuse), under autocast and when dtypes differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

__all__ = [
    "LoRALinearFunction",
    "keep_mask",
    "lora_linear",
    "pack_bits",
    "transforms_active",
    "unpack_bits",
]

_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS_CACHE.get(device)
    if shifts is None:
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        _SHIFTS_CACHE[device] = shifts
    return shifts


_ZERO_CACHE: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim zero of ``like``'s dtype and device (``torch.where`` without a cast)."""
    key = (like.dtype, like.device)
    zero = _ZERO_CACHE.get(key)
    if zero is None:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        _ZERO_CACHE[key] = zero
    return zero


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


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Draw the fast path's dropout keep-mask from torch's global generator.

    Args:
        shape: Shape of the mask (the input's).
        p: Drop probability in ``[0, 1)``.
        device: Device of the mask.

    Returns:
        A bool tensor of ``shape``: True where the element is kept (probability ``1 - p``).
    """
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


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
        w_t = weight if fan_in_fan_out else weight.t()  # (in, out)
        out = torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)  # (N, out)
        # Inverted dropout's 1 / (1 - p) is folded into the scale of every LoRA product.
        alpha = scaling / (1.0 - p)
        if p > 0:
            keep = keep_mask(x.shape, p, x.device)
            h = torch.mm(torch.where(keep, x, _zero(x)), lora_A.t())  # (N, R), no 1 / (1 - p)
            packed = pack_bits(keep)
            del keep
        else:
            h = torch.mm(x, lora_A.t())  # (N, R)
            packed = None
        r = lora_B.shape[1]
        if len(slices) == 1 and slices[0] == (0, out.shape[1]):
            out.addmm_(h, lora_B.t(), alpha=alpha)
        else:
            b_row = 0
            for i, (start, stop) in enumerate(slices):
                b_i = lora_B[b_row : b_row + stop - start]  # (size_i, r)
                out[:, start:stop].addmm_(h[:, i * r : (i + 1) * r], b_i.t(), alpha=alpha)
                b_row += stop - start
        ctx.save_for_backward(x, weight, lora_A, lora_B, h, packed)
        ctx.alpha = alpha
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.slices = slices
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, h, packed = ctx.saved_tensors
        alpha, slices = ctx.alpha, ctx.slices
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g = grad_out  # (N, out)
        r = lora_B.shape[1]
        single = len(slices) == 1 and slices[0] == (0, g.shape[1])
        # The scale is applied through the alpha of addmm (beta=0 ignores the input tensor,
        # which only lends its shape), so no extra elementwise op runs for it.
        if single:
            g_slices, b_blocks = [g], [lora_B]
        else:
            g_slices, b_blocks, b_row = [], [], 0
            for start, stop in slices:
                g_slices.append(g[:, start:stop])
                b_blocks.append(lora_B[b_row : b_row + stop - start])
                b_row += stop - start

        keep = unpack_bits(packed, x.shape) if packed is not None else None
        if torch.is_grad_enabled():
            # create_graph=True (double backward: HVPs, gradient penalties, MAML): the saved h
            # has no graph, so grad_B would miss its dependence on x and lora_A. Recompute it
            # from the saved inputs and the same mask, so every op below is recorded.
            h = torch.mm(x if keep is None else torch.where(keep, x, _zero(x)), lora_A.t())

        grad_B = None
        if need_bb:
            parts = [
                torch.addmm(b_i, g_i.t(), h[:, i * r : (i + 1) * r], beta=0, alpha=alpha)
                for i, (g_i, b_i) in enumerate(zip(g_slices, b_blocks, strict=True))
            ]
            grad_B = parts[0] if single else torch.cat(parts, dim=0)  # (sum of sizes, r)

        u = None  # dL/dh without the scale: g_i @ B_i per slice, side by side: (N, R)
        if need_x or need_a:
            parts = [torch.mm(g_i, b_i) for g_i, b_i in zip(g_slices, b_blocks, strict=True)]
            u = parts[0] if single else torch.cat(parts, dim=1)

        grad_A = None
        if need_a:
            xd = x if keep is None else torch.where(keep, x, _zero(x))
            grad_A = torch.addmm(lora_A, u.t(), xd, beta=0, alpha=alpha)  # (R, in)

        grad_x = None
        if need_x:
            grad_x = torch.mm(g, weight.t() if ctx.fan_in_fan_out else weight)  # (N, in)
            if keep is None:
                grad_x.addmm_(u, lora_A, alpha=alpha)
            else:
                lora_grad = torch.mm(u, lora_A).masked_fill_(~keep, 0)  # (N, in)
                grad_x.add_(lora_grad, alpha=alpha)

        grad_w = None
        if need_w:
            grad_w = torch.mm(x.t(), g) if ctx.fan_in_fan_out else torch.mm(g.t(), x)
        grad_bias = g.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None, None


def transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, jacrev, ...) or forward AD is active.

    :class:`LoRALinearFunction` saves an intermediate and draws its own dropout mask, which
    functorch cannot batch or differentiate forward, so these run the plain path instead.
    """
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


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
        and not transforms_active()
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
