"""Fused <-> separate adapter layouts (Phi-3 ``qkv_proj`` / ``gate_up_proj``).

:func:`split_fused` turns per-slice adapters on fused projections into adapters on separate
projections (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``) for models and
servers that use unfused layers; :func:`fuse_separate` goes back. Each projection's output is
unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from .adapter_format import Adapter, AdapterError, LayerSpec
from .config import FusedSpec, SliceLayout
from .keys import ADAPTER_LEAVES, LORA_LEAVES, MAGNITUDE_LEAF, join_key, split_key
from .layouts import PHI3_FUSED, phi3_split_sizes

__all__ = ["PHI3_FUSED", "fuse_separate", "phi3_split_sizes", "split_fused"]


def _lookup_sizes(
    split_sizes: Mapping[str, Sequence[int]] | None, name: str, leaf: str
) -> tuple[int, ...] | None:
    if split_sizes is None:
        return None
    sizes = split_sizes.get(name, split_sizes.get(leaf))
    return None if sizes is None else tuple(int(s) for s in sizes)


def _check_convertible(adapter: Adapter, what: str) -> None:
    if adapter.modules is None:
        raise AdapterError(
            f"{what} needs an adapter with lora_layers metadata, not a bare state dict"
        )
    if adapter.problems:
        raise AdapterError(adapter.problems, context=f"cannot {what} an adapter with problems")


def _module_tensors(adapter: Adapter, name: str) -> dict[str, torch.Tensor]:
    """Copies of the adapter tensors of module ``name`` (its magnitude too, with DoRA)."""
    keys = (join_key(name, leaf) for leaf in ADAPTER_LEAVES)
    return {k: adapter.tensors[k].clone() for k in keys if k in adapter.tensors}


def _carry_base_weights(adapter: Adapter, converted: set[str], tensors: dict) -> tuple[str, ...]:
    """Copy stored base weights of modules left as they are; refuse those being converted."""
    bad = sorted(set(adapter.base_weights) & converted)
    if bad:
        raise AdapterError(f"{bad} carry a stored base weight; convert them by hand")
    for name in adapter.base_weights:
        tensors[join_key(name, "weight")] = adapter.tensors[join_key(name, "weight")].clone()
    return adapter.base_weights


def _split_layout(
    adapter: Adapter,
    name: str,
    spec: LayerSpec,
    parts: tuple[str, ...],
    given: tuple[int, ...] | None,
) -> tuple[tuple[int, ...], tuple[bool, ...]] | str:
    """``(sizes, enable)`` to split module ``name`` into ``parts``, or why it cannot be split."""
    if spec.layer == "MergedLinear":
        sizes, enable = spec.split_sizes, spec.enable_lora
        if given is not None and given != sizes:
            return f"{name}: split_sizes {given} differ from the adapter's {sizes}"
    elif spec.layer == "Linear":
        sizes, enable = given, (True,) * len(parts)
        if sizes is None:
            return (
                f"{name}: a whole-matrix Linear adapter needs split_sizes "
                f"(e.g. phi3_split_sizes(model.config)) to split into {parts}"
            )
    else:
        return f"{name}: a {spec.layer} adapter cannot be split"
    if len(sizes) != len(parts) or sum(sizes) != spec.out_features:
        return f"{name}: sizes {sizes} do not split {spec.out_features} outputs into {parts}"
    parent = split_key(name)[0]
    clash = [join_key(parent, p) for p in parts if join_key(parent, p) in adapter.modules]
    if clash:
        return f"{name}: the adapter already has {clash}"
    return tuple(sizes), tuple(enable)


def _split_parts(
    spec: LayerSpec,
    parent: str,
    parts: tuple[str, ...],
    sizes: tuple[int, ...],
    enable: tuple[bool, ...],
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    tensors: dict[str, torch.Tensor],
    modules: dict[str, LayerSpec],
) -> None:
    """Write one ``Linear`` adapter per enabled part into ``tensors`` / ``modules``.

    ``lora`` is ``(lora_A, lora_B, lora_magnitude or None)``; a DoRA magnitude has one entry
    per row of ``lora_B`` and is split with it (DoRA normalises each output row on its own).
    """
    a, b, magnitude = lora
    enabled = [(part, size) for part, size, on in zip(parts, sizes, enable, strict=True) if on]
    blocks = SliceLayout.of(sizes, enable).blocks(spec.r)
    for (part, size), (_, a_rows, b_rows) in zip(enabled, blocks, strict=True):
        pname = join_key(parent, part)
        # A whole-matrix Linear adapter gives every part the shared A.
        a_i = a[a_rows] if spec.layer == "MergedLinear" else a
        tensors[join_key(pname, "lora_A")] = a_i.clone()
        tensors[join_key(pname, "lora_B")] = b[b_rows].clone()
        if magnitude is not None:
            tensors[join_key(pname, MAGNITUDE_LEAF)] = magnitude[b_rows].clone()
        shape = (spec.in_features, size) if spec.fan_in_fan_out else (size, spec.in_features)
        modules[pname] = dataclasses.replace(
            spec,
            layer="Linear",
            out_features=size,
            weight_shape=shape,
            config=dataclasses.replace(spec.config, fused=None),
        )


def split_fused(
    adapter: Adapter,
    fused: Mapping[str, Sequence[str]] = PHI3_FUSED,
    split_sizes: Mapping[str, Sequence[int]] | None = None,
) -> Adapter:
    """Turn adapters on fused projections into adapters on the separate projections.

    ``<parent>.qkv_proj`` becomes ``<parent>.q_proj`` / ``k_proj`` / ``v_proj`` (and
    ``gate_up_proj`` becomes ``gate_proj`` / ``up_proj``), each a ``Linear`` adapter with the
    same rank, alpha and scaling, so every projection's output is unchanged:

    - a ``MergedLinear`` slice ``i`` gives its enabled part ``A_i`` and ``B_i`` (disabled
      slices get no adapter);
    - a ``Linear`` adapter on the whole fused matrix gives every part the shared ``A`` and
      its own rows of ``B`` (needs ``split_sizes``).

    Stored biases of split modules are split too. Other modules are copied unchanged.

    Args:
        adapter: An adapter with metadata (:func:`read_adapter`, :func:`adapter_from_model`).
        fused: Fused module leaf name -> part leaf names in output order (default: Phi-3's).
        split_sizes: Output sizes per fused module, keyed by full name or leaf name, e.g.
            :func:`phi3_split_sizes` ``(model.config)``; needed for whole-matrix ``Linear``
            adapters (``MergedLinear`` carries its own).

    Returns:
        A new :class:`Adapter` (tensors are copies).

    Raises:
        AdapterError: Listing every module that cannot be split.
    """
    _check_convertible(adapter, "split")
    assert adapter.modules is not None
    modules: dict[str, LayerSpec] = {}
    tensors: dict[str, torch.Tensor] = {}
    split_done: dict[str, tuple[str, tuple[int, ...], tuple[str, ...]]] = {}
    problems = []
    for name, spec in adapter.modules.items():
        parent, leaf = split_key(name)
        a, b = (adapter.tensors[join_key(name, x)] for x in LORA_LEAVES)
        magnitude = adapter.tensors.get(join_key(name, MAGNITUDE_LEAF))
        if leaf not in fused:
            modules[name] = spec
            tensors.update(_module_tensors(adapter, name))
            continue
        parts = tuple(fused[leaf])
        found = _split_layout(adapter, name, spec, parts, _lookup_sizes(split_sizes, name, leaf))
        if isinstance(found, str):
            problems.append(found)
            continue
        sizes, enable = found
        _split_parts(spec, parent, parts, sizes, enable, (a, b, magnitude), tensors, modules)
        split_done[name] = (parent, sizes, parts)
    if problems:
        raise AdapterError(problems, context="cannot split the fused adapters")
    biases = []
    for name in adapter.biases:
        bias = adapter.tensors[join_key(name, "bias")]
        if name in split_done:
            parent, sizes, parts = split_done[name]
            for part, piece in zip(parts, bias.split(list(sizes)), strict=True):
                biases.append(join_key(parent, part))
                tensors[join_key(join_key(parent, part), "bias")] = piece.clone()
        else:
            biases.append(name)
            tensors[join_key(name, "bias")] = bias.clone()
    return Adapter(
        tensors=tensors,
        modules=modules,
        biases=tuple(biases),
        base_weights=_carry_base_weights(adapter, set(split_done), tensors),
        bias=adapter.bias,
        source=f"split_fused({adapter.source})",
    )


_SHARED = ("r", "lora_alpha", "use_rslora", "lora_dropout", "fan_in_fan_out")
_SHARED += ("merge_weights", "in_features", "dtype", "use_dora")


def _fuse_problems(
    adapter: Adapter,
    fname: str,
    members: dict[int, str],
    parts: tuple[str, ...],
    sizes: tuple[int, ...] | None,
) -> list[str]:
    """Why the part adapters ``members`` (slice index -> name) cannot become ``fname``."""
    specs = {i: adapter.modules[n] for i, n in members.items()}
    first = specs[min(specs)]
    bad = [f"{members[i]} is a {s.layer}" for i, s in specs.items() if s.layer != "Linear"]
    bad += [
        f"{members[i]} has {f}={getattr(s, f)!r}, {members[min(specs)]} has {getattr(first, f)!r}"
        for i, s in specs.items()
        for f in _SHARED
        if getattr(s, f) != getattr(first, f)
    ]
    if sizes is None:
        bad.append(
            f"pass split_sizes for {split_key(fname)[1]!r}: not every part of {parts} has an adapter"
        )
    elif len(sizes) != len(parts):
        bad.append(f"split_sizes {sizes} do not match the parts {parts}")
    else:
        bad += [
            f"{members[i]} has {s.out_features} outputs, split_sizes say {sizes[i]}"
            for i, s in specs.items()
            if s.out_features != sizes[i]
        ]
    if fname in adapter.modules:
        bad.append(f"the adapter already has {fname}")
    with_bias = [n for n in members.values() if n in adapter.biases]
    if with_bias and len(with_bias) != len(parts):
        bad.append(f"only {with_bias} of {parts} have a stored bias")
    return bad


def fuse_separate(
    adapter: Adapter,
    fused: Mapping[str, Sequence[str]] = PHI3_FUSED,
    split_sizes: Mapping[str, Sequence[int]] | None = None,
) -> Adapter:
    """Turn adapters on separate projections into per-slice adapters on the fused projection.

    The ``Linear`` adapters present among ``<parent>.q_proj`` / ``k_proj`` / ``v_proj`` (or
    ``gate_proj`` / ``up_proj``) become one ``MergedLinear`` adapter on ``<parent>.qkv_proj``
    (``gate_up_proj``) with those slices enabled: ``lora_A`` stacks their A, ``lora_B`` their
    B, so every slice's output is unchanged. The parts must share rank, alpha, rsLoRA,
    dropout, dtype and input size.

    Args:
        adapter: An adapter with metadata.
        fused: Fused module leaf name -> part leaf names in output order (default: Phi-3's).
        split_sizes: Output sizes per fused module (full or leaf name); needed when some part
            has no adapter (e.g. q and v only), otherwise taken from the parts.

    Returns:
        A new :class:`Adapter` (tensors are copies).

    Raises:
        AdapterError: Listing every group that cannot be fused.
    """
    _check_convertible(adapter, "fuse")
    assert adapter.modules is not None
    owner = {part: (fl, i) for fl, parts in fused.items() for i, part in enumerate(parts)}
    groups: dict[str, dict[int, str]] = {}
    for name in adapter.modules:
        parent, leaf = split_key(name)
        if leaf in owner:
            fl, i = owner[leaf]
            groups.setdefault(join_key(parent, fl), {})[i] = name
    grouped = {n for members in groups.values() for n in members.values()}
    modules = {n: s for n, s in adapter.modules.items() if n not in grouped}
    tensors = {k: t for n in modules for k, t in _module_tensors(adapter, n).items()}
    problems = []
    fused_bias: dict[str, list[str]] = {}
    for fname, members in groups.items():
        fl = split_key(fname)[1]
        parts = tuple(fused[fl])
        specs = {i: adapter.modules[n] for i, n in members.items()}
        first = specs[min(specs)]
        sizes = _lookup_sizes(split_sizes, fname, fl)
        if sizes is None and len(specs) == len(parts):
            sizes = tuple(specs[i].out_features for i in range(len(parts)))
        bad = _fuse_problems(adapter, fname, members, parts, sizes)
        with_bias = [n for n in members.values() if n in adapter.biases]
        if bad:
            problems += [f"{fname}: {p}" for p in bad]
            continue
        assert sizes is not None
        order = sorted(members)
        tensors[join_key(fname, "lora_A")] = torch.cat(
            [adapter.tensors[join_key(members[i], "lora_A")] for i in order]
        )
        tensors[join_key(fname, "lora_B")] = torch.cat(
            [adapter.tensors[join_key(members[i], "lora_B")] for i in order]
        )
        if first.use_dora:  # one magnitude entry per row of lora_B, in output order
            tensors[join_key(fname, MAGNITUDE_LEAF)] = torch.cat(
                [adapter.tensors[join_key(members[i], MAGNITUDE_LEAF)] for i in order]
            )
        out_f = sum(sizes)
        in_f = first.in_features
        enable = tuple(i in members for i in range(len(parts)))
        modules[fname] = dataclasses.replace(
            first,
            layer="MergedLinear",
            out_features=out_f,
            weight_shape=(in_f, out_f) if first.fan_in_fan_out else (out_f, in_f),
            config=dataclasses.replace(first.config, fused=FusedSpec(sizes, enable)),
        )
        if with_bias:
            fused_bias[fname] = [members[i] for i in range(len(parts))]
    if problems:
        raise AdapterError(problems, context="cannot fuse the separate adapters")
    biases = []
    for name in adapter.biases:
        if name not in grouped:
            biases.append(name)
            tensors[join_key(name, "bias")] = adapter.tensors[join_key(name, "bias")].clone()
    for fname, members in fused_bias.items():
        biases.append(fname)
        tensors[join_key(fname, "bias")] = torch.cat(
            [adapter.tensors[join_key(n, "bias")] for n in members]
        )
    return Adapter(
        tensors=tensors,
        modules=modules,
        biases=tuple(biases),
        base_weights=_carry_base_weights(adapter, grouped, tensors),
        bias=adapter.bias,
        source=f"fuse_separate({adapter.source})",
    )
