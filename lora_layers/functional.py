"""The LoRA branch of ``Linear`` and ``MergedLinear``: a fast path and a plain-ops path.

Both compute, for every enabled output slice ``i`` (``Linear`` has one slice: all outputs)::

    y = x @ W.T + b
    y[..., slice_i] += (scaling * (dropout(x) @ A_i.T) @ B_i.T).to(y.dtype)

where ``A_i`` is rows ``i*r:(i+1)*r`` of ``lora_A`` and ``B_i`` is slice ``i``'s block of rows
of ``lora_B``. Disabled slices are never written, so they are bit-identical to the base output.

Precision: the base product runs in the base dtype (``x``'s and ``W``'s), the LoRA branch in
the LoRA dtype (``lora_A``'s and ``lora_B``'s: the input is cast to it), and the branch is
added into the base output's dtype. Under ``torch.autocast`` both run in the autocast dtype,
as autocast casts every input of ``F.linear`` (float64 tensors are not cast: such a call runs
the plain path, which gives autocast's own answer).

The fast path (:class:`LoRALinearFunction`) covers every one of these settings: it adds the
low-rank product into the base output in place and saves for backward only the input (in the
dtype it arrived in; casts are redone in backward), the small ``(N, R)`` projection
``h = (x * keep) @ A.T`` in the LoRA dtype, and, with dropout, the keep-mask packed at one
bit per element (the scale and dropout's ``1 / (1 - p)`` ride on the alpha of the matmuls).
Under autocast it also keeps the base weight's autocast copy, as ``F.linear`` does.

The plain path composes ordinary differentiable ops. It runs under ``torch.compile`` (the
compiler sees plain ops it can fuse), under ``torch.func`` transforms and forward-mode AD
(which cannot batch or push tangents through the fast path's saved state), and when the
tensors' dtypes disagree in a way ``F.linear`` itself would reject. A backward that builds a
graph (``create_graph=True``: Hessian-vector products, gradient penalties) replays the fast
path's forward with plain ops and the same mask, so second derivatives are exact.

Dropout on the fast path draws 16 random bits per element, four elements per 64-bit draw of
torch's generator, and drops an element when its bits fall below ``round(p * 2**16)``: the
realised drop probability is ``p' = round(p * 2**16) / 2**16`` (within ``2**-17`` of ``p``),
and kept elements are scaled by ``1 / (1 - p')``, so the branch stays unbiased. On the CPU,
numpy (optional: torch ops otherwise, with the same result) thresholds the bits, packs and
unpacks the mask and zeroes the dropped elements (:func:`apply_keep`): vectorised
single-threaded loops, several times faster there than the equivalent tensor ops and
without an OpenMP region each.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

if TYPE_CHECKING:  # config imports base, which imports this module
    from .config import SliceLayout

__all__ = [
    "LoRALinearFunction",
    "apply_keep",
    "dropout_keep_probability",
    "keep_mask",
    "lora_linear",
    "pack_bits",
    "transforms_active",
    "unpack_bits",
]

_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}
_UNPACK_CACHE: dict[torch.device, torch.Tensor] = {}
_ZERO_CACHE: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_LITTLE_ENDIAN = sys.byteorder == "little"
# Multiplying eight 0/1 bytes (one int64 word) by this moves byte i's bit to bit 56 + i and
# nothing else into bits 56..63: the top byte is the eight flags, LSB first. (The partial
# products land on distinct bit positions, so no carry reaches the top byte; bits above 63
# wrap away, as integer multiplication does in torch.)
_PACK_MAGIC = 0x0102040810204080
_RANDOM_BITS = 16  # random bits per dropout decision


def _numpy_for(t: torch.Tensor) -> Any:
    """numpy, if ``t``'s data can be handed to it: a plain CPU tensor, outside a compile trace.

    numpy is optional (torch does not require it); without it, or for any other tensor (CUDA,
    fake, meta, functorch-wrapped), the callers run the equivalent tensor ops instead.
    """
    if type(t) is not torch.Tensor or t.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return None
    return numpy


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def apply_keep(
    t: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.where(keep, t, 0)``: the elements of ``t`` where ``keep`` is True, zeros elsewhere.

    On the CPU (with numpy) the elements are reinterpreted as integers of the same width and
    multiplied by the mask in numpy: bit for bit the same result (every kept element's bits,
    ``+0.0`` elsewhere, non-finite values included), about twice as fast as ``torch.where``
    there (bf16: three times), single-threaded, so no OpenMP region waits on a busy core.

    The numpy route records no autograd history, so a ``t`` that requires grad while grad
    mode is on takes ``torch.where`` (the fast path calls this with grad mode off).

    Args:
        t: A floating-point tensor.
        keep: A bool tensor of ``t``'s shape.
        out: Where to write the result (``t`` itself is allowed); a new tensor if None.

    Returns:
        ``out``, or the new tensor.
    """
    np = _numpy_for(t)
    ints = _SAME_WIDTH_INT.get(t.element_size())
    differentiable = t.requires_grad and torch.is_grad_enabled()
    if np is None or ints is None or _numpy_for(keep) is None or differentiable:
        return torch.where(keep, t, _zero(t), out=out)
    if out is None:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    dst = out.view(ints).numpy()
    np.multiply(t.detach().view(ints).numpy(), keep.numpy(), out=dst)
    return out


def _cached(cache: dict, key: object, like: torch.Tensor, make) -> torch.Tensor:
    """``cache[key]``, made by ``make()`` on first use, for a plain tensor ``like``.

    For any other tensor (a fake, meta or functorch-wrapped one) the constant is made afresh
    and not cached, so a fake-tensor trace never leaves fake state behind and never meets a
    real cached tensor.
    """
    if type(like) is not torch.Tensor or like.device.type == "meta":
        return make()
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
    return value


def _shifts(like: torch.Tensor) -> torch.Tensor:
    return _cached(
        _SHIFTS_CACHE,
        like.device,
        like,
        lambda: torch.arange(8, dtype=torch.uint8, device=like.device),
    )


def _unpack_table(like: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry ``v`` holds bit ``i`` of ``v`` in byte ``i`` (8 bools as a word)."""

    def make() -> torch.Tensor:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # (256, 8)
        return bits.to(torch.uint8).contiguous().view(torch.int64).view(256).to(like.device)

    return _cached(_UNPACK_CACHE, like.device, like, make)


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim zero of ``like``'s dtype and device (``torch.where`` without a cast)."""
    return _cached(
        _ZERO_CACHE,
        (like.dtype, like.device),
        like,
        lambda: torch.zeros((), dtype=like.dtype, device=like.device),
    )


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into a flat uint8 tensor, eight elements per byte, LSB first.

    Args:
        mask: A bool tensor of any shape.

    Returns:
        A 1-D uint8 tensor of ``ceil(mask.numel() / 8)`` bytes; element ``8k + i`` is bit
        ``i`` of byte ``k``.
    """
    np = _numpy_for(mask)
    if np is not None:
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    flat = mask.reshape(-1).view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    if _LITTLE_ENDIAN:
        return _pack_words(flat)
    return (flat.view(-1, 8) << _shifts(mask)).sum(1, dtype=torch.uint8)


def _pack_words(flat: torch.Tensor) -> torch.Tensor:
    """Pack contiguous 0/1 bytes (a multiple of 8) with one multiply per eight flags."""
    words = flat.view(torch.int64)
    return ((words * _PACK_MAGIC) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Invert :func:`pack_bits`.

    Args:
        packed: The uint8 tensor returned by :func:`pack_bits`.
        shape: The shape of the original mask.

    Returns:
        A bool tensor of ``shape``.
    """
    np = _numpy_for(packed)
    if np is not None:
        bits = np.unpackbits(packed.numpy(), count=shape.numel(), bitorder="little")
        return torch.from_numpy(bits).view(torch.bool).view(shape)
    if _LITTLE_ENDIAN:
        words = _unpack_table(packed)[packed.to(torch.int32)]  # (numel/8,) int64
        return words.view(torch.bool)[: shape.numel()].view(shape)
    bits = (packed.unsqueeze(1) >> _shifts(packed)) & 1  # (numel/8, 8)
    return bits.view(-1)[: shape.numel()].view(shape).view(torch.bool)


def dropout_keep_probability(p: float) -> float:
    """The keep probability the fast path's dropout realises for drop probability ``p``.

    Args:
        p: Drop probability in ``[0, 1)``.

    Returns:
        ``1 - round(p * 2**16) / 2**16``: within ``2**-17`` of ``1 - p``.
    """
    return 1.0 - round(p * (1 << _RANDOM_BITS)) / (1 << _RANDOM_BITS)


def _draw_keep(n: int, p: float, device: torch.device) -> torch.Tensor:
    """``ceil(n / 8) * 8`` keep flags (bool, flat): 16 random bits each, thresholded."""
    n_pad = -(-n // 8) * 8
    # 64 uniform random bits per word (random_ from the int64 minimum, no upper bound: every
    # int64 value, no modulo): four decisions each.
    if torch.compiler.is_compiling():
        # dynamo does not trace in-place random_; randint's draw is the same 64 bits with the
        # top one flipped (its range is all int64 values but one, taken modulo 2**64 - 1, so
        # only the draw 2**64 - 1, probability 2**-64, differs): the same mask as eager.
        words = torch.randint(
            -(1 << 63), (1 << 63) - 1, (n_pad // 4,), dtype=torch.int64, device=device
        )
        words = words ^ -(1 << 63)
    else:
        words = torch.empty(n_pad // 4, dtype=torch.int64, device=device)
        words.random_(-(1 << 63), None)
    # int16 values are uniform on [-2**15, 2**15): P(value < t) = round(p * 2**16) / 2**16.
    threshold = round(p * (1 << _RANDOM_BITS)) - (1 << (_RANDOM_BITS - 1))
    np = _numpy_for(words)
    if np is not None:  # the same comparison, ~5x faster on a CPU, and no OpenMP region
        return torch.from_numpy(words.numpy().view(np.int16) >= threshold)
    return words.view(torch.int16) >= threshold


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Draw the fast path's dropout keep-mask from torch's global generator.

    Each element is kept with probability :func:`dropout_keep_probability` ``(p)``,
    independently (16 random bits per element, four elements per 64-bit draw). The fast path
    draws exactly this mask, so a test that seeds torch and calls this function sees it.

    Args:
        shape: Shape of the mask (the input's).
        p: Drop probability in ``[0, 1)``.
        device: Device of the mask.

    Returns:
        A bool tensor of ``shape``: True where the element is kept.
    """
    n = math.prod(shape)
    return _draw_keep(n, p, device)[:n].view(shape)


def transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, jacrev, ...) or forward AD is active.

    :class:`LoRALinearFunction` saves an intermediate and draws its own dropout mask, which
    functorch cannot batch or differentiate forward, so these run the plain path instead.

    Returns:
        True inside a functorch transform or a ``forward_ad.dual_level()``.
    """
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)`` only when it changes the dtype (a no-op ``to`` still dispatches)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    """Base linear plus per-slice LoRA update, with a lean backward.

    Forward arguments (all tensors 2-D):
        x: (N, in) input.
        weight: (out, in), or (in, out) with ``fan_in_fan_out``.
        bias: (out,) or None.
        lora_A: (R, in) with R = r * number of enabled slices.
        lora_B: (sum of enabled slice sizes, r).
        scaling: float.
        p: dropout probability on the LoRA branch's input (0 disables dropout).
        fan_in_fan_out: whether ``weight`` is stored transposed.
        layout: The enabled output slices (:class:`~lora_layers.config.SliceLayout`).
        base_dtype: dtype of the base product and the output (default: ``x``'s).
        lora_dtype: dtype of the LoRA branch (default: ``lora_A``'s).

    Tensors are cast to the compute dtypes inside (forward and, from the saved originals,
    backward); gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        scaling,
        p,
        fan_in_fan_out,
        layout,
        base_dtype=None,
        lora_dtype=None,
    ):
        cd = base_dtype or x.dtype
        ld = lora_dtype or lora_A.dtype
        xc, wc = _cast(x, cd), _cast(weight, cd)
        w_t = wc if fan_in_fan_out else wc.t()  # (in, out)
        out = torch.mm(xc, w_t) if bias is None else torch.addmm(_cast(bias, cd), xc, w_t)
        xl = xc if ld == cd else _cast(x, ld)
        del xc
        a_l, b_l = _cast(lora_A, ld), _cast(lora_B, ld)
        # Inverted dropout's 1 / (1 - p') is folded into the scale of every LoRA product.
        if p > 0:
            alpha = scaling / dropout_keep_probability(p)
            n = x.numel()
            keep_flat = _draw_keep(n, p, x.device)  # padded to a multiple of 8
            keep = keep_flat[:n].view(x.shape)
            h = torch.mm(apply_keep(xl, keep), a_l.t())  # (N, R), no 1 / (1 - p')
            packed = pack_bits(keep_flat)  # the padding flags are packed too, never read
            del keep, keep_flat
        else:
            alpha = scaling
            h = torch.mm(xl, a_l.t())  # (N, R)
            packed = None
        del xl
        if layout.is_whole and ld == cd:
            out.addmm_(h, b_l.t(), alpha=alpha)
        elif layout.is_whole:
            out.add_(torch.addmm(_zero(h), h, b_l.t(), beta=0, alpha=alpha).to(cd))
        else:
            for rows, a_rows, b_rows in layout.blocks(lora_B.shape[1]):
                h_i, b_i = h[:, a_rows], b_l[b_rows]
                if ld == cd:
                    out[:, rows].addmm_(h_i, b_i.t(), alpha=alpha)
                else:
                    delta = torch.addmm(_zero(h), h_i, b_i.t(), beta=0, alpha=alpha)
                    out[:, rows].add_(delta.to(cd))
        # Keep the cast weight (as F.linear under autocast does) unless it must be re-cast
        # for its own gradient; everything else is saved as it came and re-cast in backward.
        keep_cast = wc is not weight and not weight.requires_grad
        ctx.save_for_backward(x, wc if keep_cast else weight, lora_A, lora_B, h, packed)
        ctx.alpha, ctx.scaling, ctx.p = alpha, scaling, p
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.layout = layout
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.dtypes = (cd, ld)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, h, packed = ctx.saved_tensors
        keep = unpack_bits(packed, x.shape) if packed is not None else None
        if torch.is_grad_enabled():
            # create_graph=True (double backward: HVPs, gradient penalties, MAML): replay the
            # forward with plain differentiable ops and the same mask, so the gradients carry
            # their own graph; the saved h has none.
            return _replay_backward(ctx, grad_out, x, weight, lora_A, lora_B, keep)
        if torch.is_autocast_enabled(grad_out.device.type):
            with torch.autocast(grad_out.device.type, enabled=False):
                return _backward(ctx, grad_out, x, weight, lora_A, lora_B, h, keep)
        return _backward(ctx, grad_out, x, weight, lora_A, lora_B, h, keep)


def _backward(ctx, g, x, weight, lora_A, lora_B, h, keep):
    """The lean backward: every matmul on the saved tensors, casts redone where needed."""
    alpha, layout, (cd, ld) = ctx.alpha, ctx.layout, ctx.dtypes
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    single = layout.is_whole
    a_l, b_l = _cast(lora_A, ld), _cast(lora_B, ld)
    g_l = _cast(g, ld)  # (N, out) in the LoRA dtype
    # The scale is applied through the alpha of addmm (beta=0 ignores the input tensor,
    # which only lends its shape), so no extra elementwise op runs for it.
    if single:
        blocks = [(g_l, h, b_l)]
    else:
        blocks = [(g_l[:, o], h[:, a], b_l[b]) for o, a, b in layout.blocks(lora_B.shape[1])]

    grad_B = None
    if need_bb:
        parts = [torch.addmm(b_i, g_i.t(), h_i, beta=0, alpha=alpha) for g_i, h_i, b_i in blocks]
        grad_B = _cast(parts[0] if single else torch.cat(parts, dim=0), lora_B.dtype)

    u = None  # dL/dh without the scale: g_i @ B_i per slice, side by side: (N, R)
    if need_x or need_a:
        parts = [torch.mm(g_i, b_i) for g_i, _, b_i in blocks]
        u = parts[0] if single else torch.cat(parts, dim=1)

    grad_A = spare = None
    if need_a:
        xl = _cast(x, ld)
        xd = xl if keep is None else apply_keep(xl, keep)
        grad_A = _cast(torch.addmm(a_l, u.t(), xd, beta=0, alpha=alpha), lora_A.dtype)  # (R, in)
        if keep is not None:
            spare = xd  # a fresh (N, in) buffer in the LoRA dtype, free from here on
        del xd, xl

    grad_x = None
    if need_x:
        wc = _cast(weight, cd)
        w_g = wc.t() if ctx.fan_in_fan_out else wc  # (out, in)
        if keep is None:
            grad_x = torch.mm(g, w_g)  # (N, in)
            if ld == cd:
                grad_x.addmm_(u, a_l, alpha=alpha)
            else:
                grad_x.add_(torch.mm(u, a_l).to(cd), alpha=alpha)
        else:
            # alpha * (keep * (u @ A)), masked in place; in one dtype the base product then
            # accumulates into it inside the GEMM (beta=1), so no separate add pass runs.
            lora_grad = torch.addmm(_zero(u), u, a_l, beta=0, alpha=alpha, out=spare)
            apply_keep(lora_grad, keep, out=lora_grad)
            if ld == cd:
                grad_x = lora_grad.addmm_(g, w_g)
            else:
                grad_x = torch.mm(g, w_g)
                grad_x.add_(lora_grad.to(cd))
        grad_x = _cast(grad_x, x.dtype)

    grad_w = None
    if need_w:
        xc = _cast(x, cd)
        grad_w = torch.mm(xc.t(), g) if ctx.fan_in_fan_out else torch.mm(g.t(), xc)
        grad_w = _cast(grad_w, weight.dtype)
    grad_bias = _cast(g.sum(0), ctx.bias_dtype) if need_b and ctx.bias_dtype else None
    return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None, None, None, None


def _replay_backward(ctx, g, x, weight, lora_A, lora_B, keep):
    """Gradients with a graph: the forward re-run with plain ops, differentiated by autograd."""
    cd, ld = ctx.dtypes
    flags = ctx.needs_input_grad
    needed = [(i, t) for i, t in ((0, x), (1, weight), (3, lora_A), (4, lora_B)) if flags[i]]
    with torch.autocast(g.device.type, enabled=False):
        xd = _cast(x, ld)
        if keep is not None:
            xd = torch.where(keep, xd, _zero(xd)) / dropout_keep_probability(ctx.p)
        w = _cast(weight, cd)
        out = F.linear(_cast(x, cd), w.t() if ctx.fan_in_fan_out else w)  # bias: g.sum(0)
        h = F.linear(xd, _cast(lora_A, ld))
        out = _add_plain(out, h, _cast(lora_B, ld), ctx.scaling, ctx.layout)
        grads = (
            torch.autograd.grad(out, [t for _, t in needed], g, create_graph=True) if needed else ()
        )
    result: list[torch.Tensor | None] = [None] * 5
    for (i, _), grad_i in zip(needed, grads, strict=True):
        result[i] = grad_i
    if flags[2] and ctx.bias_dtype:
        result[2] = _cast(g.sum(0), ctx.bias_dtype)
    return (*result, None, None, None, None, None, None)


def _plain_dropout(x: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    """``dropout(x)`` with the fast path's mask (same seed, same mask as eager fast path runs),
    except under torch.func transforms, where ``nn.Dropout`` honours vmap's ``randomness``."""
    if not (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0):
        return dropout(x)
    if transforms_active():
        return dropout(x)
    keep = keep_mask(x.shape, dropout.p, x.device)
    return torch.where(keep, x, 0.0) * (1.0 / dropout_keep_probability(dropout.p))


def _add_plain(out, h, lora_B, scaling, layout):
    """``out`` plus each slice's ``scaling * h_i @ B_i.T`` in its columns, with plain ops.

    Out of place (a ``torch.cat`` of the untouched and the updated columns), so autograd,
    ``torch.compile`` and ``torch.func`` see ordinary differentiable ops.
    """
    if layout.is_whole:
        return out + (F.linear(h, lora_B) * scaling).to(out.dtype)
    pieces, pos = [], 0
    for rows, a_rows, b_rows in layout.blocks(lora_B.shape[1]):
        delta = F.linear(h[..., a_rows], lora_B[b_rows]) * scaling
        pieces += [out[..., pos : rows.start], out[..., rows] + delta.to(out.dtype)]
        pos = rows.stop
    return torch.cat([*pieces, out[..., pos:]], dim=-1)


def _plain_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout, fan_in_fan_out, layout):
    w = weight.t() if fan_in_fan_out else weight
    out = F.linear(x, w, bias)  # (..., out)
    h = F.linear(_plain_dropout(x, dropout).to(lora_A.dtype), lora_A)  # (..., R)
    return _add_plain(out, h, lora_B, scaling, layout)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: nn.Module,
    fan_in_fan_out: bool,
    layout: SliceLayout,
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
        layout: The enabled output slices and their blocks of ``lora_A`` / ``lora_B``.

    Returns:
        The output, shape ``(..., out)``.
    """
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    dtypes = _fast_dtypes(x, weight, bias, lora_A, lora_B)
    if dtypes is None or x.dim() < 1 or torch.compiler.is_compiling() or transforms_active():
        return _plain_lora_linear(
            x, weight, bias, lora_A, lora_B, scaling, dropout, fan_in_fan_out, layout
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    out = LoRALinearFunction.apply(
        x2, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out, layout, *dtypes
    )
    return out.view(*lead, out.shape[-1])


def _fast_dtypes(x, weight, bias, lora_A, lora_B) -> tuple[torch.dtype, torch.dtype] | None:
    """(base dtype, LoRA dtype) the fast path computes in, or None to run the plain path.

    Without autocast: the base product in ``x``'s dtype (``W`` and ``b`` must share it, as
    ``F.linear`` requires), the LoRA branch in ``lora_A``'s (``lora_B`` must share it). Under
    autocast: both in the autocast dtype, which autocast casts every float input of
    ``F.linear`` to, float64 excepted (autocast leaves float64 alone: plain path).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        tensors = (x, weight, lora_A, lora_B) if bias is None else (x, weight, bias, lora_A, lora_B)
        if any(not t.is_floating_point() or t.dtype == torch.float64 for t in tensors):
            return None
        dtype = torch.get_autocast_dtype(device_type)
        return dtype, dtype
    if x.dtype != weight.dtype or lora_A.dtype != lora_B.dtype:
        return None
    if bias is not None and bias.dtype != x.dtype:
        return None
    if not (x.is_floating_point() and lora_A.is_floating_point()):
        return None
    return x.dtype, lora_A.dtype
