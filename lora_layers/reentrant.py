"""Whether code runs inside a reentrant gradient checkpoint whose inputs need no grad.

The one place lora_layers looks at torch internals: ``torch.utils.checkpoint(...,
use_reentrant=True)`` runs its block without grad and replays it in backward only if one of
its tensor inputs requires grad, so LoRA layers inside a block with frozen inputs would
silently get no gradient. :class:`~lora_layers.LoRALayer` asks
:func:`reentrant_checkpoint_inputs_need_grad` (only on the rare path of a training-mode
forward with grad disabled) and raises a clear error instead.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["reentrant_checkpoint_inputs_need_grad"]


def reentrant_checkpoint_inputs_need_grad() -> bool | None:
    """Inside ``torch.utils.checkpoint(..., use_reentrant=True)``: does any input need grad?

    Returns whether any tensor input of the outermost enclosing reentrant checkpoint requires
    grad, or None when the caller runs inside no reentrant checkpoint. Only called on the rare
    path of a training-mode forward with grad disabled, so walking the stack costs nothing in
    ordinary training.

    torch has no public way to ask "am I inside a reentrant checkpoint, and do its inputs
    need grad?", so this reads the frame of torch's private ``CheckpointFunction.forward``.
    It stays here, alone, and fails safe: if torch renames or restructures that function it
    returns None and the guard does not fire (nothing else depends on it).
    """
    checkpoint = sys.modules.get("torch.utils.checkpoint")
    function = getattr(checkpoint, "CheckpointFunction", None)
    if function is None:
        return None
    code = getattr(getattr(function, "forward", None), "__code__", None)
    if code is None:
        return None
    outermost = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            outermost = frame
        frame = frame.f_back
    if outermost is None:
        return None
    args = outermost.f_locals.get("args", ())
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
