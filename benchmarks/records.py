"""The rows a run of `bench_lora.py` collects, and the progress clock on stderr."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks import utils as U

__all__ = ["Results", "add_missing", "add_timings", "elapsed_s", "progress"]


@dataclass
class Results:
    """Rows collected so far, with lookup helpers for the target checks.

    Attributes:
        rows: All measured rows, in measurement order.
        notes: Warnings to print at the end (mismatches, errors).
    """

    rows: list[U.Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: U.Row) -> None:
        """Appends one row."""
        self.rows.append(row)

    def find(self, **match: Any) -> list[U.Row]:
        """Rows whose fields equal every given keyword."""
        return [r for r in self.rows if all(getattr(r, k) == v for k, v in match.items())]

    def one(self, **match: Any) -> U.Row | None:
        """The single row matching, or None."""
        found = self.find(**match)
        return found[0] if len(found) == 1 else None


def add_missing(
    res: Results, missing: dict[str, str], section: str, case: str, metric: str, unit: str, **kw
) -> None:
    """Adds a value-less row per unavailable candidate, noting why it is missing.

    Args:
        res: Where the rows go.
        missing: Candidate name -> reason it is unavailable.
        section: Row section.
        case: Row case.
        metric: Row metric.
        unit: Row unit.
        **kw: Further `Row` fields (tokens, dropout).
    """
    for name, why in missing.items():
        res.add(U.Row(section, case, name, metric, None, unit, note=why, **kw))


def add_timings(
    res: Results,
    timings: dict[str, U.Timing],
    section: str,
    case: str,
    metric: str,
    reference: str,
    **kw: Any,
) -> None:
    """Adds one millisecond row per timed candidate, with its paired ratio to `reference`.

    Args:
        res: Where the rows go.
        timings: Candidate name -> timings, all from one `interleaved_timings` call.
        section: Row section.
        case: Row case.
        metric: Row metric.
        reference: The candidate in `timings` the ratios divide by.
        **kw: Further `Row` fields (tokens, dropout).
    """
    ref = timings[reference]
    for name, t in timings.items():
        res.add(
            U.Row(
                section,
                case,
                name,
                metric,
                t.median * 1e3,
                "ms",
                ratio=U.paired_ratio(t, ref),
                reference=reference,
                spread=t.spread,
                rounds=len(t.seconds),
                **kw,
            )
        )


_T0 = time.perf_counter()


def elapsed_s() -> float:
    """Seconds since the benchmark modules were imported."""
    return time.perf_counter() - _T0


def progress(msg: str) -> None:
    """Prints `msg` to stderr, stamped with the seconds elapsed."""
    print(f"[{elapsed_s():6.1f}s] {msg}", file=sys.stderr, flush=True)
