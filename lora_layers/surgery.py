"""Module surgery: put LoRA into any ``nn.Module`` in place, and take it out again.

One call replaces the targeted layers of a model (a ``transformers`` model included) with
:mod:`lora_layers` layers that share the original Parameters, so nothing is copied and a
model built on the meta device stays on meta::

    inject_lora(model, "all-linear", r=16, lora_alpha=32, lora_dropout=0.05)
    inject_lora(model, fused={"qkv_proj": "qv"}, r=16, lora_alpha=32)  # q and v of Phi-3's qkv

Targets are exact dotted names or name suffixes (``"qkv_proj"`` matches
``model.layers.0.self_attn.qkv_proj``), full-match regular expressions (any string with a
regex metacharacter, or a compiled ``re.Pattern``), module types, or ``"all-linear"``.
A fused projection (Phi-3's ``qkv_proj`` and ``gate_up_proj``) can get LoRA on some of its
output slices only; the slice sizes come from the model's config (see :func:`resolve_fused`).

:func:`unload` puts back plain torch layers holding the original Parameters (the very same
objects); :func:`merge_and_unload` puts back plain layers holding merged weights;
:func:`merge_lora` / :func:`unmerge_lora` merge or unmerge every LoRA layer of a model.

The building blocks are public so other code can drive them: :func:`plan_lora` (which modules
would get which :class:`LoRAConfig`, without touching the model), :func:`wrap_module` (one
layer), :func:`replace_module` (swap a submodule by dotted name) and :func:`resolve_fused`
(slice sizes of a fused projection). Each job lives in its own module (see ``docs/index.md``):
:mod:`~lora_layers.matching`, :mod:`~lora_layers.planning`, :mod:`~lora_layers.layouts`,
:mod:`~lora_layers.kinds`, :mod:`~lora_layers.wrapping`, :mod:`~lora_layers.input_grads`;
this module puts them together and keeps their names importable from here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import FusedSpec, InjectSpec, LoRAConfig
from .input_grads import enable_input_require_grads
from .layouts import FUSED_LAYOUTS, qkv_split_sizes, resolve_fused
from .matching import ALL_LINEAR, Targets
from .planning import LoRAPlan, plan_lora
from .utils import lora_modules, mark_only_lora_as_trainable
from .wrapping import (
    merge_and_unload,
    merge_lora,
    replace_module,
    set_child,
    unload,
    unmerge_lora,
    wrap_module,
)

__all__ = [
    "ALL_LINEAR",
    "FUSED_LAYOUTS",
    "FusedSpec",
    "InjectSpec",
    "LoRAConfig",
    "LoRAPlan",
    "count_parameters",
    "enable_input_require_grads",
    "inject_lora",
    "lora_module_names",
    "merge_and_unload",
    "merge_lora",
    "plan_lora",
    "qkv_split_sizes",
    "replace_module",
    "resolve_fused",
    "unload",
    "unmerge_lora",
    "wrap_module",
]


def inject_lora(
    model: nn.Module,
    target_modules: Targets | None = None,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    *,
    freeze_base: bool = True,
    bias: str = "none",
    input_require_grads: bool = True,
    plan: LoRAPlan | None = None,
    **options: Any,
) -> nn.Module:
    """Replace the targeted layers of ``model`` in place with LoRA layers; return ``model``.

    The new layers share the original ``weight``/``bias`` Parameters (same objects: no copy,
    no new memory for the base, works on meta-device models) and keep their device and dtype.
    The model keeps its class, so ``generate()``, ``save_pretrained`` and
    ``gradient_checkpointing_enable()`` of a ``transformers`` model keep working.
    ``lora_module_names(model)`` lists the replaced modules; :func:`plan_lora` previews them.

    Matching: each target key is an exact dotted name or a name suffix (``"qkv_proj"`` matches
    ``model.layers.0.self_attn.qkv_proj``), a regex that must match the whole dotted name (any
    string with a regex metacharacter such as ``*``, ``(``, ``|``, or an ``re.Pattern``), a
    module type (``nn.Linear``), or ``"all-linear"``: every ``nn.Linear`` (and transformers
    ``Conv1D``) except the output head ``model.get_output_embeddings()``, as PEFT counts it.
    A module registered under several names (``model.a is model.b``) is targeted when any of
    its names matches, excluded when any is, and replaced under every name.

    Args:
        model: The model to modify in place.
        target_modules: A key or a list of keys, as above. May be omitted when ``fused`` is
            given. Every key must match at least one module.
        r: Rank (per enabled slice for fused projections).
        lora_alpha: Scaling numerator; ``scaling = lora_alpha / r``.
        lora_dropout: Dropout on the LoRA branch's input (embeddings ignore it).
        fused: ``{key: slices}`` for fused projections, e.g. ``{"qkv_proj": "qv"}`` (q and v
            of every ``qkv_proj``, sizes from the model config) or
            ``{"gate_up_proj": "up"}``; values as in :func:`resolve_fused`. Matched modules
            are targets too; the first matching key wins.
        exclude_modules: Keys (as targets) of modules never to wrap; a key naming a container
            (``"encoder"``) excludes every layer inside it. Each key must match some module.
        rank_pattern: ``{key: r}`` overrides of the rank; the first matching key wins;
            ``r=0`` leaves a module out.
        alpha_pattern: ``{key: lora_alpha}`` overrides of alpha; the first matching key wins.
        use_rslora: Scale by ``lora_alpha / sqrt(r)``.
        lora_dtype: Dtype of the LoRA parameters, e.g. ``torch.float32`` on a bf16 base.
        use_dora: DoRA (weight-decomposed LoRA) on every wrapped layer; see
            :mod:`lora_layers.dora` and ``docs/variants.md``.
        merge_weights: If True, ``model.eval()`` merges every layer and ``model.train()``
            unmerges (loralib's contract). Default False: ``eval()`` inside a training loop
            would otherwise allocate a merged copy of every wrapped weight; call
            :func:`merge_lora` for fast inference instead.
        freeze_base: Freeze every parameter except the LoRA ones (and biases per ``bias``).
        bias: ``"none"``, ``"all"`` or ``"lora_only"``: which biases train with ``freeze_base``.
        input_require_grads: Hook ``model.get_input_embeddings()`` (if the model has it) so
            reentrant gradient checkpointing trains LoRA with frozen embeddings; see
            :func:`enable_input_require_grads`.
        config: Where fused q/k/v sizes come from (default: ``model.config``); an object or a
            mapping with ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` or
            ``hidden_size``.
        lora_config: A :class:`LoRAConfig` instead of ``r``, ``lora_alpha``,
            ``lora_dropout``, ``use_rslora``, ``lora_dtype`` and ``merge_weights``.
        plan: A :class:`~lora_layers.planning.LoRAPlan` from :func:`plan_lora` for this model,
            carried out as it is (no targeting or LoRA argument may be given with it).
        **options: The keyword-only planning arguments above (``fused``, ``exclude_modules``,
            ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``use_dora``, ``lora_dtype``,
            ``merge_weights``, ``config``, ``lora_config``), passed to :func:`plan_lora`.

    Returns:
        nn.Module: ``model`` itself.

    Raises:
        ValueError: If a target / fused / exclude / pattern key matches no module (the message
            lists candidate names), a targeted layer already has LoRA, fused slices are
            unknown or inconsistent with the config, or hyper-parameters are invalid.
        TypeError: If a targeted module's type is not supported (the message names it), or
            an unknown keyword argument is given.
    """
    if plan is None:
        plan = plan_lora(model, target_modules, r, lora_alpha, lora_dropout, **options)
    elif target_modules is not None or options:
        raise ValueError("give either a plan or the targeting arguments, not both")
    for name, spec in plan.items():
        module = plan.modules[name]
        if model.get_submodule(name) is not module:
            raise ValueError(f"the plan was made for another model: {name!r} has changed since")
        layer = wrap_module(module, spec, name)
        for alias in plan.names[name]:  # the same module object under several names
            set_child(model, alias, layer)
    if freeze_base:
        mark_only_lora_as_trainable(model, bias=bias)
    if input_require_grads:
        enable_input_require_grads(model)
    return model


def lora_module_names(model: nn.Module) -> list[str]:
    """Dotted names of the LoRA layers (``r > 0``) in ``model``, in ``named_modules`` order."""
    return [name for name, _ in lora_modules(model)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts (tied parameters counted once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
