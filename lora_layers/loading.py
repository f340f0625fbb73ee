"""Loading an adapter into a model: validate everything, then change everything.

Loading checks the file against its own metadata, the metadata against the model's layers,
and the model's LoRA layers against the file, and computes every merge it will do, before
changing anything. Every problem found (missing key, unexpected key, shape mismatch, config
mismatch) is reported in one :class:`AdapterLoadError`; in non-strict mode the same
:class:`LoadReport` is returned (and warned about) and only the modules without problems are
loaded.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter_format import (
    DTYPE_NAMES,
    DTYPES,
    Adapter,
    AdapterError,
    LayerSpec,
    dtype_name,
    shape_of,
)
from .adapter_io import PICKLE_SUFFIXES, load_pickle, read_adapter
from .base import LoRALayer
from .keys import (
    ADAPTER_LEAVES,
    LORA_LEAVES,
    MAGNITUDE_LEAF,
    join_key,
    layer_leaves,
    module_aliases,
    module_index,
    split_key,
)
from .kinds import LAYER_KINDS, is_hf_conv1d
from .load_report import AdapterLoadError, LoadReport, refuse_load
from .quantized import dense_weight_shape
from .wrapping import replace_module, wrap_module

__all__ = [
    "AdapterLoadError",
    "LoadReport",
    "load_lora",
    "load_lora_state_dict",
    "refuse_load",
]


# --------------------------------------------------------------------------- loading
@dataclass
class _ModulePlan:
    name: str  # normalised, as in the file
    raw_name: str  # in the model
    module: nn.Module  # the LoRA layer, or the plain layer to wrap
    spec: LayerSpec | None  # the file's spec (None for bare state dicts)
    inject: bool
    raw_names: tuple[str, ...] = ()  # every name the module has in the model (aliases)
    # requires_grad the wrapped module's Parameters get once the new layer is swapped in
    requires_grad: tuple[tuple[nn.Parameter, bool], ...] = ()


def _check_tensor(report: LoadReport, key: str, t: torch.Tensor) -> bool:
    if t.dtype not in DTYPES:
        report.errors.append(
            f"{key}: dtype {dtype_name(t.dtype)} is not supported (adapter tensors must be "
            f"{DTYPE_NAMES})"
        )
        return False
    if t.device.type != "meta" and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        report.errors.append(f"{key}: holds {bad} NaN/Inf values")
        return False
    return True


def _peft_hint(key: str) -> str:
    name, leaf = split_key(key)
    if leaf == "weight" and split_key(name)[1] in LORA_LEAVES or "lora_embedding_" in leaf:
        return "looks like a PEFT key; load PEFT adapters with import_peft"
    return ""


def _check_file_tensors(
    report: LoadReport, adapter: Adapter, name: str, spec: LayerSpec | None, claimed: set[str]
) -> bool:
    """Check a module's ``lora_A`` / ``lora_B`` (/ ``lora_magnitude``) against its metadata."""
    ok = True
    shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(LORA_LEAVES)
    magnitude = join_key(name, MAGNITUDE_LEAF)
    if spec is not None:
        shapes = dict(spec.tensor_shapes())
        if not spec.use_dora and magnitude in adapter.tensors:
            why = f"the file's metadata says {name!r} is not a DoRA layer (use_dora false)"
            report.add("unexpected_keys", magnitude, why)
            claimed.add(magnitude)
            ok = False
    elif magnitude in adapter.tensors:  # a bare state dict: checked against the model's layer
        shapes[MAGNITUDE_LEAF] = None
    for leaf, shape in shapes.items():
        key = join_key(name, leaf)
        if key not in adapter.tensors:
            report.add("missing_keys", key, "described in the file's metadata but not stored")
            ok = False
            continue
        claimed.add(key)
        t = adapter.tensors[key]
        if shape is not None and shape_of(t) != shape:
            implied = f"r={spec.r}" if leaf in LORA_LEAVES else "its output size"
            why = f"file {shape_of(t)}, metadata ({implied}) implies {shape}"
            report.add("shape_mismatches", key, why)
            ok = False
        if spec is not None and dtype_name(t.dtype) != spec.dtype:
            why = f"tensor dtype {t.dtype}, metadata says {spec.dtype}"
            report.add("config_mismatches", key, why)
            ok = False
        ok = _check_tensor(report, key, t) and ok
    return ok


def _check_lora_layer(
    report: LoadReport, adapter: Adapter, name: str, spec: LayerSpec | None, layer: LoRALayer
) -> bool:
    """Check the file's adapter against a LoRA layer the model already has."""
    if layer.r == 0:
        why = f"the model's {type(layer).__name__} has r=0 (no LoRA parameters)"
        report.add("config_mismatches", name, why)
        return False
    ok = True
    if spec is not None:
        for diff in spec.differences(LayerSpec.from_layer(layer)):
            if diff.startswith("use_dora:"):
                diff += f" ({_DORA_HINT})"
            report.add("config_mismatches", name, diff)
            ok = False
    else:
        ok = _check_bare_magnitude(report, adapter, name, layer) and ok
    for leaf in layer_leaves(layer):
        key, param = join_key(name, leaf), getattr(layer, leaf)
        t = adapter.tensors.get(key)
        if t is not None and shape_of(t) != shape_of(param) and key not in report.shape_mismatches:
            report.add("shape_mismatches", key, f"file {shape_of(t)}, model {shape_of(param)}")
            ok = False
    return ok


_DORA_HINT = (
    "a DoRA adapter loads into DoRA layers (inject_lora(..., use_dora=True)) or a plain model, "
    "a plain LoRA adapter into plain LoRA layers"
)


def _check_bare_magnitude(
    report: LoadReport, adapter: Adapter, name: str, layer: LoRALayer
) -> bool:
    """Check a bare state dict's magnitude (or its absence) against the model's layer."""
    key = join_key(name, MAGNITUDE_LEAF)
    dora = MAGNITUDE_LEAF in layer_leaves(layer)
    if key in adapter.tensors and not dora:
        why = f"the model's layer {name!r} is not a DoRA layer (use_dora=False); {_DORA_HINT}"
        report.add("unexpected_keys", key, why)
        return False
    if key not in adapter.tensors and dora:
        why = f"the model's layer {name!r} is a DoRA layer; the state dict has no magnitude"
        report.add("missing_keys", key, why)
        return False
    return True


def _injection_problem(spec: LayerSpec, module: nn.Module, raw_name: str) -> str | None:
    """Why the layer ``spec`` describes cannot be injected around ``module`` (None: it can)."""
    base_cls = LAYER_KINDS[spec.layer][1]
    kind = type(module).__name__
    if base_cls is nn.Linear and is_hf_conv1d(module):
        # transformers' Conv1D (GPT-2) is a linear layer storing its weight (in, out).
        if not spec.fan_in_fan_out:
            return (
                f"the model's module is a transformers Conv1D (weight stored (in, out)), but the "
                f"file's {spec.layer} adapter has fan_in_fan_out=False"
            )
    elif not isinstance(module, base_cls):
        return f"the file has a {spec.layer} adapter but the model's module is a {kind}"
    elif spec.fan_in_fan_out:
        return "fan_in_fan_out=True adapters cannot be injected into a plain nn.Linear"
    if not raw_name:
        return "cannot replace the root module itself"
    return None


def _plan_module(
    report: LoadReport,
    adapter: Adapter,
    index: dict[str, tuple[str, nn.Module]],
    name: str,
    spec: LayerSpec | None,
    inject: bool,
    claimed: set[str],
    model_name: str,
) -> _ModulePlan | None:
    """Check one adapter module against the file and the model; return a plan when loadable.

    ``name`` is the module's name in the file, ``model_name`` its name in ``index`` (they
    differ when the file names a second name of a module registered twice). Problems go
    into ``report``; the module's keys found in the file go into ``claimed``.
    """
    ok = _check_file_tensors(report, adapter, name, spec, claimed)
    present = [k for k in (join_key(name, x) for x in ADAPTER_LEAVES) if k in adapter.tensors]
    entry = index.get(model_name)
    if entry is None:
        for key in present:
            report.add("unexpected_keys", key, f"the model has no module named {name!r}")
        return None
    raw_name, module = entry
    if isinstance(module, LoRALayer):
        ok = _check_lora_layer(report, adapter, name, spec, module) and ok
        return _ModulePlan(name, raw_name, module, spec, inject=False) if ok else None
    # A plain module: wrap it from the metadata.
    kind = type(module).__name__
    if spec is None:
        for key in present:
            report.add(
                "unexpected_keys",
                key,
                f"{name!r} is a plain {kind}; a state dict without lora_layers metadata only "
                "loads into existing LoRA layers (inject them first, or use a save_lora file)",
            )
        return None
    if not inject:
        why = f"is a plain {kind} and inject=False; the file has LoRA"
        report.add("config_mismatches", name, why)
        return None
    problem = _injection_problem(spec, module, raw_name)
    if problem is not None:
        report.add("config_mismatches", name, problem)
        return None
    if dense_weight_shape(module) != spec.weight_shape:
        report.add(
            "shape_mismatches",
            join_key(name, "weight"),
            f"model base weight {dense_weight_shape(module)}, the adapter was made for "
            f"{spec.weight_shape} (a file from another model?)",
        )
        return None
    return _ModulePlan(name, raw_name, module, spec, inject=True) if ok else None


def _same_adapter(adapter: Adapter, name: str, other: str) -> bool:
    """Whether the file gives modules ``name`` and ``other`` identical adapters."""
    specs = adapter.modules or {}
    if specs.get(name) != specs.get(other):
        return False
    for leaf in ADAPTER_LEAVES:
        a, b = adapter.tensors.get(join_key(name, leaf)), adapter.tensors.get(join_key(other, leaf))
        if a is None and b is None and leaf == MAGNITUDE_LEAF:
            continue
        if a is None or b is None or a.dtype != b.dtype or not torch.equal(a, b):
            return False
    return True


# (key, the model's parameter or buffer, the file's tensor, the module holding it)
_ParamLoad = tuple[str, torch.Tensor, torch.Tensor, nn.Module]


def _adapter_modules(adapter: Adapter) -> dict[str, LayerSpec | None]:
    """Module name -> the file's spec; None for every module of a bare state dict."""
    if adapter.modules is not None:
        return dict(adapter.modules)
    names: dict[str, LayerSpec | None] = {}
    for key in adapter.tensors:
        name, leaf = split_key(key)
        if leaf in ADAPTER_LEAVES:
            names.setdefault(name, None)
    return names


def _plan_modules(
    report: LoadReport, adapter: Adapter, model: nn.Module, inject: bool, claimed: set[str]
) -> list[_ModulePlan]:
    """A plan per loadable adapter module; LoRA layers the file does not cover are reported."""
    index, collisions = module_index(model)
    report.errors += collisions
    aliases, raw_names = module_aliases(model, index)
    plans: list[_ModulePlan] = []
    first_name: dict[str, str] = {}  # model name -> the file name that claimed it
    for name, spec in _adapter_modules(adapter).items():
        model_name = aliases.get(name, name)
        if model_name in first_name:
            # Two names of one module (model.a is model.b): one adapter, loaded once.
            other = first_name[model_name]
            claimed.update(join_key(name, leaf) for leaf in ADAPTER_LEAVES)
            if not _same_adapter(adapter, name, other):
                report.add(
                    "config_mismatches",
                    name,
                    f"{name!r} and {other!r} are one module in the model (registered under both "
                    "names), but the file gives them different adapters",
                )
            continue
        first_name[model_name] = name
        plan = _plan_module(report, adapter, index, name, spec, inject, claimed, model_name)
        if plan is not None:
            plan.raw_names = tuple(raw_names.get(id(plan.module), [plan.raw_name]))
            plans.append(plan)
    for name in adapter.invalid_modules:
        claimed.update(join_key(name, leaf) for leaf in ADAPTER_LEAVES)
    covered = set(first_name) | {aliases.get(n, n) for n in adapter.invalid_modules}
    # LoRA layers of the model the file says nothing about.
    for norm, (_, module) in index.items():
        if isinstance(module, LoRALayer) and module.r > 0 and norm not in covered:
            for leaf in layer_leaves(module):
                report.add(
                    "missing_keys",
                    join_key(norm, leaf),
                    "the model has a LoRA layer here but the file has no adapter for it",
                )
    return plans


def _param_target(
    report: LoadReport, key: str, t: torch.Tensor, module: nn.Module | None, leaf: str
) -> torch.Tensor | None:
    """The model's parameter (or loralib's bias buffer) the file's ``key`` loads into."""
    param = module._parameters.get(leaf) if module is not None else None
    if param is None and module is not None and leaf == "bias":
        # loralib's lora_state_dict(bias="all") keeps every key containing "bias",
        # e.g. the causal-mask buffer ``attn.bias`` of its GPT-2 example.
        buffer = module._buffers.get(leaf)
        if buffer is not None and leaf not in module._non_persistent_buffers_set:
            if shape_of(t) == shape_of(buffer) and t.dtype == buffer.dtype:
                return buffer
            why = f"file {shape_of(t)} {t.dtype}, model buffer {shape_of(buffer)} {buffer.dtype}"
            report.add("shape_mismatches", key, why)
            return None
    if param is None:
        report.add("unexpected_keys", key, f"the model has no parameter {key!r}")
    elif shape_of(t) != shape_of(param):
        report.add("shape_mismatches", key, f"file {shape_of(t)}, model {shape_of(param)}")
    elif _check_tensor(report, key, t):
        return param
    return None


def _plan_params(
    report: LoadReport, adapter: Adapter, model: nn.Module, claimed: set[str]
) -> list[_ParamLoad]:
    """The biases and base weights the file stores, with the model tensors they load into."""
    index, _ = module_index(model)
    aliases, _ = module_aliases(model, index)
    params: list[_ParamLoad] = []
    for leaf, names in (("bias", adapter.biases), ("weight", adapter.base_weights)):
        for name in names:
            key = join_key(name, leaf)
            if key not in adapter.tensors:
                report.add("missing_keys", key, "listed in the file's metadata but not stored")
                continue
            claimed.add(key)
            t = adapter.tensors[key]
            entry = index.get(aliases.get(name, name))
            module = entry[1] if entry is not None else None
            target = _param_target(report, key, t, module, leaf)
            if target is not None:
                params.append((key, target, t, module))
    return params


def _validate(
    model: nn.Module, adapter: Adapter, inject: bool
) -> tuple[LoadReport, list[_ModulePlan], list[_ParamLoad]]:
    report = LoadReport(source=adapter.source)
    report.errors += adapter.problems
    claimed: set[str] = set()
    plans = _plan_modules(report, adapter, model, inject, claimed)
    params = _plan_params(report, adapter, model, claimed)
    for key in adapter.tensors:
        if key not in claimed:
            why = (
                "not described by the file's metadata"
                if adapter.modules is not None
                else "the model has no LoRA parameter or bias with this name"
            )
            hint = _peft_hint(key)
            report.add("unexpected_keys", key, f"{why}; {hint}" if hint else why)
    return report, plans, params


def _merged_after_load(layer: LoRALayer, new: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``layer.get_merged_weight()`` as it will be once loaded, without changing ``layer``.

    A shallow copy of the layer whose Parameters listed in ``new`` (by ``id``) are replaced
    by the values to be loaded, cast as ``copy_`` will cast them, computes the merge.
    """
    probe = copy.copy(layer)
    parameters = {}
    for leaf, p in layer._parameters.items():
        if p is not None and id(p) in new and p.device.type != "meta":
            p = nn.Parameter(new[id(p)].to(device=p.device, dtype=p.dtype), requires_grad=False)
        parameters[leaf] = p
    probe.__dict__["_parameters"] = parameters
    probe.__dict__["_buffers"] = dict(layer._buffers)
    return probe.get_merged_weight()


def _prepare(
    report: LoadReport, adapter: Adapter, plans: list[_ModulePlan], params: list[_ParamLoad]
) -> tuple[list[_ModulePlan], list[LoRALayer], list[_ParamLoad]]:
    """Build the new layers and compute every merge the load will do, changing nothing.

    A module that cannot be wrapped, or whose merged weight would hold NaN/Inf once the file's
    tensors are in (e.g. overflow in fp16), goes into the report and is dropped.

    Returns:
        The plans still loadable, their layers (new ones for injected modules) and the
        parameter loads still applicable.
    """
    kept: list[tuple[_ModulePlan, LoRALayer]] = []
    for plan in plans:
        layer = plan.module
        if plan.inject:
            # Wrapping freezes the shared base weight; keep the model as it is until _apply.
            flags = [(p, p.requires_grad) for p in plan.module.parameters()]
            try:
                layer = wrap_module(plan.module, plan.spec.to_config())
            except (TypeError, ValueError) as exc:
                report.add("config_mismatches", plan.name, f"cannot wrap it: {exc}")
                continue
            finally:
                plan.requires_grad = tuple((p, p.requires_grad) for p, _ in flags)
                for p, flag in flags:
                    p.requires_grad_(flag)
        kept.append((plan, layer))
    new: dict[int, torch.Tensor] = {}
    for plan, layer in kept:
        for leaf in layer_leaves(layer):
            new[id(getattr(layer, leaf))] = adapter.tensors[join_key(plan.name, leaf)]
    for _, param, t, _ in params:
        new[id(param)] = t
    # Every layer the load will (re-)merge: merged ones, injected eval-mode ones with
    # merge_weights (merged as eval() would), and merged ones whose base weight is loaded.
    to_merge: dict[int, tuple[str, LoRALayer]] = {}
    for plan, layer in kept:
        if layer.merged or (plan.inject and not layer.training and layer.merge_weights):
            to_merge[id(layer)] = (plan.name, layer)
    for key, _, _, module in params:
        if isinstance(module, LoRALayer) and module.merged:
            to_merge.setdefault(id(module), (split_key(key)[0], module))
    failed: set[int] = set()
    with torch.no_grad():
        for name, layer in to_merge.values():
            try:
                _merged_after_load(layer, new)
            except ValueError as exc:
                report.add("config_mismatches", name, f"cannot merge the file's update: {exc}")
                failed.add(id(layer))
    failed_params = {
        id(p) for _, layer in to_merge.values() if id(layer) in failed for p in layer.parameters()
    }
    kept = [(plan, layer) for plan, layer in kept if id(layer) not in failed]
    params = [item for item in params if id(item[1]) not in failed_params]
    return [plan for plan, _ in kept], [layer for _, layer in kept], params


def _apply(
    model: nn.Module,
    report: LoadReport,
    adapter: Adapter,
    plans: list[_ModulePlan],
    layers: list[LoRALayer],
    params: list[_ParamLoad],
) -> None:
    with torch.no_grad():
        for plan, layer in zip(plans, layers, strict=True):
            if plan.inject:
                for raw_name in plan.raw_names or (plan.raw_name,):  # every name of the module
                    replace_module(model, raw_name, layer)
                for p, flag in plan.requires_grad:
                    p.requires_grad_(flag)
                report.injected_modules.append(plan.name)
            for leaf in layer_leaves(layer):
                key = join_key(plan.name, leaf)
                getattr(layer, leaf).copy_(adapter.tensors[key])
                report.loaded_keys.append(key)
        for key, param, t, _ in params:
            param.copy_(t)
            report.loaded_keys.append(key)
        for plan, layer in zip(plans, layers, strict=True):
            # A merged layer holds the old update; an injected eval-mode layer merges as eval() would.
            if layer.merged or (plan.inject and not layer.training and layer.merge_weights):
                layer.merge()
        for *_, module in params:
            if isinstance(module, LoRALayer) and module.merged:
                module.merge()


def load_lora(
    model: nn.Module,
    source: str | os.PathLike | Adapter | Mapping[str, torch.Tensor],
    strict: bool = True,
    inject: bool = True,
    allow_pickle: bool = False,
) -> LoadReport:
    """Load an adapter into ``model``, validating everything before changing anything.

    ``model`` may already hold LoRA layers (their config must match the file's metadata), or
    be a plain base model: each module the metadata describes is then wrapped with the layer
    it names (``from_module``, sharing the base Parameters) and loaded. A module registered
    under several names (``model.a is model.b``) is replaced under every name, as
    :func:`~lora_layers.inject_lora` does. Merged layers are re-merged, and injected layers
    in eval mode are merged as ``eval()`` would, so outputs match the saved model's exactly;
    every such merge is computed (and checked for NaN/Inf) before anything is changed.

    Args:
        model: The model to load into (a compiled or DDP-wrapped model is fine).
        source: A path (``.safetensors``; ``.pt``/``.bin`` only with ``allow_pickle``), an
            :class:`Adapter`, or a bare state dict (e.g. ``loralib.lora_state_dict``).
        strict: Raise on any problem (default). With False, load only the modules without
            problems, warn, and return the report.
        inject: Wrap plain modules the metadata describes (default True).
        allow_pickle: Allow pickle files, read with ``torch.load(weights_only=True)``.

    Returns:
        A :class:`LoadReport` (``report.ok`` is False only in non-strict mode).

    Raises:
        AdapterLoadError: In strict mode, one error listing every missing key, unexpected
            key, shape mismatch, config mismatch and other problem (unsupported dtype,
            NaN/Inf, a merge that would overflow, ...). The model is unchanged. Also for a
            pickle file without ``allow_pickle`` (in non-strict mode too).
        FileNotFoundError: If the file does not exist.
    """
    if isinstance(source, Adapter):
        adapter = source
    elif isinstance(source, Mapping):
        adapter = Adapter.from_state_dict(source)
    else:
        path = Path(source)
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            try:
                load_pickle(path, allow_pickle=False)
            except AdapterError as exc:  # the refusal raises in non-strict mode too
                refuse_load(str(path), exc.problems, True, exc)
        try:
            adapter = read_adapter(path, allow_pickle=allow_pickle)
        except AdapterError as exc:
            return refuse_load(str(path), exc.problems, strict, exc)
    report, plans, params = _validate(model, adapter, inject)
    plans, layers, params = _prepare(report, adapter, plans, params)
    if not report.ok:
        if strict:
            raise AdapterLoadError(report)
        warnings.warn(
            f"loading adapter {report.source} partially (strict=False):\n{report.format()}",
            stacklevel=2,
        )
    _apply(model, report, adapter, plans, layers, params)
    return report


def load_lora_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> LoadReport:
    """Load a bare adapter state dict, e.g. ``loralib.lora_state_dict(model)``.

    The model must already have its LoRA layers (a state dict has no metadata to inject from).
    Keys are normalised and checked as :func:`load_lora` checks files: every key must be a
    LoRA parameter (or bias) of the model with the same shape, and every LoRA layer of the
    model must be covered.

    Args:
        model: A model with lora_layers layers.
        state_dict: ``<module>.lora_A`` / ``<module>.lora_B`` (/ ``<module>.bias``) tensors.
        strict: As :func:`load_lora`.

    Returns:
        The :class:`LoadReport`.

    Raises:
        AdapterLoadError: In strict mode, listing every problem; the model is unchanged.
    """
    return load_lora(model, Adapter.from_state_dict(state_dict), strict=strict, inject=False)
