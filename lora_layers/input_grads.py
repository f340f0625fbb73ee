"""The input-gradient hook that lets reentrant gradient checkpointing train LoRA.

``torch.utils.checkpoint(..., use_reentrant=True)`` gives its wrapped block no gradient when
none of the block's tensor inputs requires grad, which is the case when the embeddings are
frozen. :func:`enable_input_require_grads` hooks the input embeddings so their output
requires grad, as PEFT and ``transformers`` do; :func:`~lora_layers.inject_lora` installs it
and :func:`~lora_layers.unload` removes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["enable_input_require_grads", "remove_input_require_grads"]

_HOOK = "_lora_input_grads_hook"  # attribute of a model: our input-embeddings forward hook


def _make_output_require_grad(module: nn.Module, inputs: Any, output: Any) -> None:
    # Skipped under torch.compile, where dynamo cannot return an intermediate marked with
    # requires_grad_(): compiled models should use non-reentrant checkpointing.
    if (
        torch.is_tensor(output)
        and torch.is_grad_enabled()
        and not output.requires_grad
        and not torch.compiler.is_compiling()
    ):
        output.requires_grad_(True)


def enable_input_require_grads(
    model: nn.Module, module: nn.Module | None = None
) -> RemovableHandle | None:
    """Make the input embeddings' output require grad, so LoRA trains under reentrant checkpointing.

    ``torch.utils.checkpoint(..., use_reentrant=True)`` gives its wrapped block no gradient
    (so its LoRA layers get ``None`` grads) when none of the block's tensor inputs requires
    grad, which is the case when the embeddings are frozen. A forward hook on the embedding
    layer makes its output require grad (as PEFT and ``transformers`` do). Only active while
    grad mode is on and, in models whose modules carry transformers' ``gradient_checkpointing``
    flag, while checkpointing is enabled; it then costs the backward of the first block's
    input. Idempotent;
    :func:`unload` and :func:`merge_and_unload` remove it.

    Args:
        model: The model; the handle is kept on it.
        module: The layer whose output to hook (default: ``model.get_input_embeddings()``).

    Returns:
        RemovableHandle | None: The hook handle, or None if there is no such layer.
    """
    if module is None:
        get = getattr(model, "get_input_embeddings", None)
        try:
            module = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            module = None
    if not isinstance(module, nn.Module):
        return None
    handle = model.__dict__.get(_HOOK)
    if handle is not None:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks and hooks is module._forward_hooks:
            return handle
        handle.remove()
    # transformers marks the modules it can checkpoint with a bool `gradient_checkpointing`;
    # where such flags exist, the hook acts only while one is on, so training without
    # checkpointing pays nothing. Elsewhere it always acts.
    flags = [
        m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)
    ]
    hook = _make_output_require_grad
    if flags:

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if any(m.gradient_checkpointing for m in flags):
                _make_output_require_grad(module, inputs, output)

    handle = module.register_forward_hook(hook)
    model.__dict__[_HOOK] = handle
    return handle


def remove_input_require_grads(model: nn.Module) -> None:
    """Remove the hook :func:`enable_input_require_grads` put on ``model`` (if any)."""
    handle = model.__dict__.pop(_HOOK, None)
    if handle is not None:
        handle.remove()
