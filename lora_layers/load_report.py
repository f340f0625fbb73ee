"""What loading an adapter found: :class:`LoadReport`, and :class:`AdapterLoadError` for it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from .adapter_format import AdapterError

__all__ = ["AdapterLoadError", "LoadReport", "refuse_load"]


@dataclass
class LoadReport:
    """What loading an adapter found and did.

    Attributes:
        source: The file or object loaded.
        missing_keys: Keys the model or the file's metadata needs that the file lacks.
        unexpected_keys: Keys in the file that nothing in the model or metadata accounts for.
        shape_mismatches: Keys (or ``<module>.weight`` for base layers) with a wrong shape.
        config_mismatches: Modules whose config (type, rank, alpha, slices, ...) differs.
        errors: Problems not tied to one key (unreadable metadata, non-finite values, ...).
        notes: Key or module -> the reasons it is listed.
        loaded_keys: Keys that were loaded.
        injected_modules: Modules that were turned into LoRA layers from the metadata.
    """

    source: str = "<memory>"
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)
    config_mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    loaded_keys: list[str] = field(default_factory=list)
    injected_modules: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not (
            self.missing_keys
            or self.unexpected_keys
            or self.shape_mismatches
            or self.config_mismatches
            or self.errors
        )

    def add(self, kind: str, key: str, why: str) -> None:
        """Record ``key`` under ``kind`` (``"missing_keys"``, ...) with the reason ``why``."""
        items = getattr(self, kind)
        if key not in items:
            items.append(key)
        self.notes.setdefault(key, [])
        if why not in self.notes[key]:
            self.notes[key].append(why)

    def format(self) -> str:
        """A readable multi-line account of every problem."""
        lines = []
        for title, kind in (
            ("missing keys", "missing_keys"),
            ("unexpected keys", "unexpected_keys"),
            ("shape mismatches", "shape_mismatches"),
            ("config mismatches", "config_mismatches"),
        ):
            items = getattr(self, kind)
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {k}: {'; '.join(self.notes.get(k, []))}" for k in items]
        if self.errors:
            lines.append(f"other errors ({len(self.errors)}):")
            lines += [f"  {e}" for e in self.errors]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format() if not self.ok else f"loaded {len(self.loaded_keys)} keys"


class AdapterLoadError(AdapterError):
    """Loading found problems; nothing in the model was changed.

    Attributes:
        report: The :class:`LoadReport` listing every problem.
    """

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        self.problems = report.format().splitlines()
        n = (
            len(report.missing_keys)
            + len(report.unexpected_keys)
            + len(report.shape_mismatches)
            + len(report.config_mismatches)
            + len(report.errors)
        )
        ValueError.__init__(
            self,
            f"cannot load adapter {report.source}: {n} problem(s); the model was not changed.\n"
            + report.format()
            + "\nFix the file or the model, or pass strict=False to load only the parts "
            "without problems (the report is returned).",
        )


def refuse_load(source: str, problems: Sequence[str], strict: bool, cause: Exception) -> LoadReport:
    """An adapter that cannot be read at all: raise (strict) or warn and return the report."""
    report = LoadReport(source=source, errors=list(problems))
    if strict:
        raise AdapterLoadError(report) from cause
    warnings.warn(f"adapter {source} not loaded:\n{report.format()}", stacklevel=3)
    return report
