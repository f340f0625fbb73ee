"""Adapter file I/O: atomic safetensors writes, safe reads, and no pickle unless asked.

:func:`save_lora` writes one safetensors file (atomically: a temporary file, fsynced, then
renamed); :func:`read_adapter` reads one into an :class:`~lora_layers.Adapter` without
touching any model. ``.pt`` / ``.bin`` files are refused unless ``allow_pickle=True``, and
then read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from .adapter_format import (
    METADATA_KEY,
    Adapter,
    AdapterError,
    adapter_from_model,
)

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_PICKLE_WEIGHTS_NAME",
    "PEFT_WEIGHTS_NAME",
    "PICKLE_SUFFIXES",
    "atomic_write",
    "check_not_pickle",
    "load_pickle",
    "read_adapter",
    "read_safetensors",
    "save_lora",
    "save_tensors",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``; on any failure ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_not_pickle(path: Path) -> None:
    """Refuse a destination with a pickle suffix (adapter files are safetensors).

    Raises:
        ValueError: For ``.pt``, ``.bin``, ... paths.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing to write {str(path)!r}: {path.suffix} is a pickle suffix, and adapter "
            "files are safetensors; use a .safetensors path"
        )


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]):
    """Write ``tensors`` (moved to the CPU) and ``metadata`` to ``path`` atomically.

    Raises:
        ValueError: If a tensor is on the meta device.
    """
    cpu = {}
    for key, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"{key} is on the meta device; materialise the model before saving")
        cpu[key] = t.detach().to("cpu").contiguous()
    # Looked up at call time so the writer can be replaced (e.g. by tests simulating a failure).
    atomic_write(path, lambda tmp: safetensors.torch.save_file(cpu, str(tmp), metadata=metadata))


def save_lora(model: nn.Module | Adapter, path: str | os.PathLike, bias: str = "none") -> Path:
    """Save a model's LoRA adapter (or an :class:`Adapter`) as one safetensors file.

    The file holds only the adapter tensors (``<module>.lora_A``, ``<module>.lora_B``,
    ``<module>.lora_magnitude`` for DoRA layers and, per ``bias``, ``<module>.bias``) and the JSON metadata describing every layer. Module
    names are stored without ``_orig_mod.`` / ``module.`` / ``base_model.model.`` prefixes.
    The write is atomic: a temporary file in the same directory, fsynced, then renamed over
    ``path``, so a failure leaves any previous file intact.

    Args:
        model: A model with lora_layers layers, or an :class:`Adapter` (e.g. from
            :func:`split_fused`).
        path: Destination, normally ``*.safetensors``. Pickle suffixes are refused.
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` (ignored for an :class:`Adapter`).

    Returns:
        The path written.

    Raises:
        ValueError: For a pickle suffix, an unknown ``bias``, a model without LoRA layers or
            tensors on the meta device.
    """
    path = Path(path)
    check_not_pickle(path)
    adapter = model if isinstance(model, Adapter) else adapter_from_model(model, bias=bias)
    if adapter.problems:
        raise AdapterError(adapter.problems, context="cannot save an adapter with problems")
    save_tensors(adapter.tensors, path, adapter.metadata())
    return path


def load_pickle(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """A pickled state dict, read with ``torch.load(weights_only=True)`` if allowed.

    Raises:
        AdapterError: Without ``allow_pickle``, or if the file holds no mapping.
    """
    if not allow_pickle:
        raise AdapterError(
            f"refusing to read {str(path)!r}: {path.suffix} files are pickles, which can run "
            "code when loaded. Convert it to safetensors, or pass allow_pickle=True if you trust "
            "it (it is then read with torch.load(weights_only=True), never full unpickling)"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise AdapterError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, header metadata)`` of a safetensors file, on the CPU.

    Raises:
        AdapterError: If the file is truncated, corrupted or not safetensors.
    """
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError subclasses
        raise AdapterError(
            f"cannot read {str(path)!r} as safetensors ({type(exc).__name__}: {exc}); the file "
            "is truncated, corrupted or not a safetensors file"
        ) from exc
    return tensors, metadata


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read an adapter file without loading it into anything.

    Safetensors files with lora_layers metadata give an :class:`Adapter` with specs; a
    safetensors file without it, or (with ``allow_pickle``) a ``.pt``/``.bin`` state dict,
    gives a bare adapter that can only load into existing LoRA layers. Keys and module names
    are normalised. Problems that do not stop reading (a spec with a bad field, keys colliding
    after normalisation) are kept in ``Adapter.problems`` and reported by :func:`load_lora`.

    Args:
        path: The file.
        allow_pickle: Allow ``.pt``/``.pth``/``.bin``/``.ckpt`` files, read with
            ``torch.load(weights_only=True)``.

    Returns:
        The adapter.

    Raises:
        FileNotFoundError: If the file does not exist.
        AdapterError: For a pickle file without ``allow_pickle``, an unreadable or truncated
            file, unparsable metadata or a newer format version.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        hint = " (a PEFT adapter: use import_peft)" if (path / PEFT_CONFIG_NAME).exists() else ""
        raise AdapterError(f"{source} is a directory, not an adapter file{hint}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return Adapter.from_state_dict(load_pickle(path, allow_pickle), source=source)
    raw, metadata = read_safetensors(path)
    if METADATA_KEY not in metadata:
        return Adapter.from_state_dict(raw, source=source)
    return Adapter.from_metadata(raw, metadata[METADATA_KEY], source)
