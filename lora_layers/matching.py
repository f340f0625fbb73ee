"""Target matching: which modules of a model a list of target keys names.

A key is an exact dotted name or a name suffix (a set lookup), a full-match regular
expression (any string with a regex metacharacter, or a compiled ``re.Pattern``), a module
type, or ``"all-linear"``. A module registered under several names matches when any of its
names does.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .kinds import wrappable_kind

__all__ = [
    "ALL_LINEAR",
    "TargetKey",
    "TargetPatterns",
    "Targets",
    "excluded_names",
    "first_match",
    "is_excluded",
    "name_suffixes",
    "no_match_message",
    "walk_modules",
]

ALL_LINEAR = "all-linear"

# One target key: a name / suffix / regex string, a compiled regex, or a module type.
TargetKey = str | re.Pattern | type
Targets = TargetKey | Iterable[TargetKey]

_NAME_KEY = re.compile(r"[\w.\-]+")  # plain dotted names; anything else is a regex


class TargetPatterns:
    """Compiled target keys: exact names / suffixes (a set lookup), full-match regexes, types.

    Compiled once per call, so matching a model costs one set lookup per name suffix plus
    one ``fullmatch`` per regex key, never a recompile. ``hit[i]`` records whether key ``i``
    matched anything.

    Args:
        keys: One key or a list of keys (None: none).
        arg: The argument name, for messages.
        allow_all_linear: Whether ``"all-linear"`` is allowed.

    Raises:
        TypeError: If a key is not a name, regex or module type.
        ValueError: If a regex does not compile, or ``"all-linear"`` is not allowed here.
    """

    def __init__(self, keys: Targets | None, arg: str, allow_all_linear: bool = False) -> None:
        if keys is None:
            keys = []
        elif isinstance(keys, (str, re.Pattern, type)):
            keys = [keys]
        self.arg = arg
        try:
            self.keys: list = list(dict.fromkeys(keys))  # a repeated key is one key
        except TypeError:
            raise TypeError(
                f"{arg} must be a name, regex or module type, or a list of them; got {keys!r}"
            ) from None
        self.names: dict[str, int] = {}
        self.regexes: list[tuple[int, re.Pattern]] = []
        self.types: list[tuple[int, type]] = []
        self.all_linear: int | None = None
        for i, key in enumerate(self.keys):
            self._add(i, key, allow_all_linear)
        self.hit = [False] * len(self.keys)

    def _add(self, i: int, key: Any, allow_all_linear: bool) -> None:
        if isinstance(key, str) and key.lower() == ALL_LINEAR:
            if not allow_all_linear:
                raise ValueError(f"{self.arg}: {ALL_LINEAR!r} is only allowed in target_modules")
            self.all_linear = i
        elif isinstance(key, str) and _NAME_KEY.fullmatch(key):
            self.names.setdefault(key, i)
        elif isinstance(key, (str, re.Pattern)):
            try:
                self.regexes.append((i, re.compile(key)))
            except re.error as err:
                raise ValueError(f"{self.arg}: {key!r} is not a valid regex ({err})") from None
        elif isinstance(key, type) and issubclass(key, nn.Module):
            self.types.append((i, key))
        else:
            raise TypeError(
                f"{self.arg}: {key!r} is not a module name, regex or nn.Module subclass"
            )

    def __bool__(self) -> bool:
        return bool(self.keys)

    def match(self, name: str, suffixes: tuple[str, ...], module: nn.Module) -> int | None:
        """Index of the first key (in the caller's order) matching this module, else None."""
        best = None
        if self.names:
            for s in suffixes:
                i = self.names.get(s)
                if i is not None and (best is None or i < best):
                    best = i
        for i, rx in self.regexes:
            if (best is None or i < best) and rx.fullmatch(name):
                best = i
        for i, t in self.types:
            if (best is None or i < best) and isinstance(module, t):
                best = i
        if best is not None:
            self.hit[best] = True
        return best

    def is_type(self, i: int) -> bool:
        """Whether key ``i`` is a module type (a broad key, like ``"all-linear"``)."""
        return any(j == i for j, _ in self.types)

    def unmatched(self) -> list:
        """The keys that matched no module so far."""
        return [k for k, h in zip(self.keys, self.hit, strict=True) if not h]


def name_suffixes(name: str) -> tuple[str, ...]:
    """``"a.b.c"`` -> ``("a.b.c", "b.c", "c")``."""
    parts = name.split(".")
    return tuple(".".join(parts[i:]) for i in range(len(parts)))


def first_match(
    patterns: TargetPatterns, names: Sequence[str], module: nn.Module, need_suffixes: bool
) -> int | None:
    """The first key matching any of the names a module is registered under, else None."""
    best = None
    for name in names:
        i = patterns.match(name, name_suffixes(name) if need_suffixes else (name,), module)
        if i is not None and (best is None or i < best):
            best = i
    return best


def excluded_names(model: nn.Module, excludes: TargetPatterns, need_suffixes: bool) -> set[str]:
    """Every module name an exclude key matches, container or leaf, under any of its names."""
    if not excludes:
        return set()
    return {
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if name and first_match(excludes, (name,), module, need_suffixes) is not None
    }


def is_excluded(names: Sequence[str], excluded: set[str]) -> bool:
    """Whether a module, or a container holding it, is excluded under any of its names."""
    for name in names:
        parts = name.split(".")
        if any(".".join(parts[:i]) in excluded for i in range(1, len(parts) + 1)):
            return True
    return False


def walk_modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[int, list[str]]]:
    """One walk of the tree: canonical name -> module, and every name a module appears under."""
    modules: dict[str, nn.Module] = {}
    names_of: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        seen = names_of.setdefault(id(module), [])
        if not seen:
            modules[name] = module
        seen.append(name)
    return modules, names_of


def no_match_message(what: str, key: Any, modules: dict[str, nn.Module]) -> str:
    """``"<what> <key> matched no module; did you mean ...? Layers LoRA can wrap here: ..."``"""
    names = [n for n, m in modules.items() if n and wrappable_kind(m)]
    leaves = list(dict.fromkeys(n.rpartition(".")[2] for n in names))
    text = f"{what} {key!r} matched no module"
    if isinstance(key, str):
        close = [leaf for leaf in leaves if key in leaf]
        close += difflib.get_close_matches(key, leaves + names, n=3, cutoff=0.6)
        close = list(dict.fromkeys(close))[:3]
        if close:
            text += f"; did you mean {', '.join(map(repr, close))}?"
    if names:
        example = next((n for n in names if isinstance(modules[n], nn.Linear)), names[0])
        text += "" if text.endswith("?") else "."
        text += f" Layers LoRA can wrap here: {', '.join(leaves[:10])} (e.g. {example!r})"
    return text
