"""Writes the shipped chat-instruction dataset (examples/data/toy_chat_{train,test}.jsonl).

Each line is one conversation in the format the fine-tune reads::

    {"messages": [{"role": "user", "content": "Add 7 and 8."},
                  {"role": "assistant", "content": "15"}], "task": "add"}

The facts come from :mod:`toy_tasks` (single-digit addition and subtraction; the letter
after / before a letter; a letter's capital). A seeded fifth of each task's facts is held out: the
test file asks about those facts only, in every instruction phrasing, and the training file
asks about the others, in every phrasing. The output is deterministic; ``--check`` verifies
that the shipped files match this script.

    python examples/make_dataset.py            # (re)write the files
    python examples/make_dataset.py --check    # exit 1 if the shipped files are stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import toy_tasks

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = "toy_chat_train.jsonl"
TEST_FILE = "toy_chat_test.jsonl"


def split_facts(seed: int, held_out_fraction: float) -> tuple[list, list]:
    """Splits every task's facts into training and held-out facts.

    Args:
        seed: Seed of the split.
        held_out_fraction: Share of each task's facts held out (rounded, at least one).

    Returns:
        ``(train, held_out)``: lists of ``(task, operands)``.

    Raises:
        ValueError: If the fraction is not in (0, 1).
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    rng = random.Random(seed)
    train, held_out = [], []
    for task in toy_tasks.TASKS:
        operands = list(task.operands)
        rng.shuffle(operands)
        n_held = max(1, round(held_out_fraction * len(operands)))
        held_out += [(task, ops) for ops in operands[:n_held]]
        train += [(task, ops) for ops in operands[n_held:]]
    return train, held_out


def conversations(facts: list, seed: int) -> list[dict]:
    """One record per fact and instruction phrasing, in a seeded random order.

    Args:
        facts: ``(task, operands)`` pairs.
        seed: Seed of the order.

    Returns:
        JSON-ready records with ``messages`` and ``task``.
    """
    records = [
        {
            "messages": [
                {"role": "user", "content": template.format(**toy_tasks._named(ops))},
                {"role": "assistant", "content": task.answer(*ops)},
            ],
            "task": task.name,
        }
        for task, ops in facts
        for template in task.instructions
    ]
    random.Random(seed).shuffle(records)
    return records


def render(records: list[dict]) -> str:
    """The JSONL text of ``records``."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def build(seed: int = 0, held_out_fraction: float = 0.2) -> dict[str, str]:
    """The two files' contents, by file name."""
    train, held_out = split_facts(seed, held_out_fraction)
    return {
        TRAIN_FILE: render(conversations(train, seed + 1)),
        TEST_FILE: render(conversations(held_out, seed + 2)),
    }


def main(argv: list[str] | None = None) -> int:
    """Writes (or with ``--check`` verifies) the dataset files. Returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="where the files go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and order")
    parser.add_argument(
        "--held-out-fraction", type=float, default=0.2, help="share of each task's facts held out"
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the files instead of writing them"
    )
    args = parser.parse_args(argv)
    files = build(args.seed, args.held_out_fraction)
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (args.out_dir / name).is_file()
            or (args.out_dir / name).read_text(encoding="utf-8") != text
        ]
        for name in stale:
            print(f"{args.out_dir / name} is missing or stale; run examples/make_dataset.py")
        return 1 if stale else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out_dir / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out_dir / name}: {text.count(chr(10))} conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
