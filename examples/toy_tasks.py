"""Small arithmetic and alphabet facts behind the shipped chat dataset and the tiny base.

Every fact has one exact answer (``7 plus 8`` -> ``15``, the letter after ``k`` -> ``l``), so a
model's reply is scored by exact match. The facts are single-digit addition and subtraction
(with a non-negative result), the letter after / before a letter, and a letter's capital.
Each fact appears in two kinds of surface form:

* plain sentences (``"7 plus 8 is 15."``, ``"the sum of 7 and 8 is 15."``, ...) in the
  pretraining text that gives the tiny Phi-3 its starting point, and
* chat instructions (``"Add 7 and 8."`` -> ``"15"``) in the shipped fine-tuning data,
  phrased differently and wrapped in Phi-3's chat template.

The pretrained base knows every fact but has never seen an instruction or a chat marker; the
LoRA fine-tune teaches it to answer instructions. The facts of the held-out split are never
in the fine-tuning data, so the held-out metric measures whether the fine-tuned model answers
new questions from what the base knows, not whether it memorised the training answers.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

DIGITS = tuple(range(10))
LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Task:
    """One family of facts.

    Attributes:
        name: Short task name, stored with every generated example.
        operands: Every operand tuple of the family.
        answer: ``operands -> answer`` (a string).
        sentences: Plain-text templates for pretraining, formatted with ``a``, ``b`` (the
            operands; a one-operand task uses ``a`` only) and ``c`` (the answer).
        instructions: Chat instruction templates, formatted with ``a`` and ``b``.
    """

    name: str
    operands: tuple[tuple, ...]
    answer: Callable[..., str]
    sentences: tuple[str, ...]
    instructions: tuple[str, ...]

    def sentence(self, rng: random.Random, ops: tuple) -> str:
        """A random pretraining sentence stating the fact ``ops``."""
        return rng.choice(self.sentences).format(*ops, c=self.answer(*ops), **_named(ops))

    def instruction(self, rng: random.Random, ops: tuple) -> str:
        """A random chat instruction asking for the fact ``ops``."""
        return rng.choice(self.instructions).format(**_named(ops))


def _named(ops: tuple) -> dict[str, object]:
    return dict(zip("ab", ops, strict=False))


_PAIRS = tuple((a, b) for a in DIGITS for b in DIGITS)

TASKS: tuple[Task, ...] = (
    Task(
        name="add",
        operands=_PAIRS,
        answer=lambda a, b: str(a + b),
        sentences=(
            "{a} plus {b} is {c}.",
            "what is {a} plus {b}? it is {c}.",
            "{a} + {b} = {c}",
            "the sum of {a} and {b} is {c}.",
            "adding {b} to {a} gives {c}.",
        ),
        instructions=("What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."),
    ),
    Task(
        name="subtract",
        operands=tuple((a, b) for a, b in _PAIRS if a >= b),
        answer=lambda a, b: str(a - b),
        sentences=(
            "{a} minus {b} is {c}.",
            "what is {a} minus {b}? it is {c}.",
            "{a} - {b} = {c}",
            "the difference of {a} and {b} is {c}.",
            "taking {b} from {a} leaves {c}.",
        ),
        instructions=("What is {a} - {b}?", "Subtract {b} from {a}.", "Take {b} away from {a}."),
    ),
    Task(
        name="next_letter",
        operands=tuple((x,) for x in LETTERS[:-1]),
        answer=lambda a: LETTERS[LETTERS.index(a) + 1],
        sentences=(
            "the letter after {a} is {c}.",
            "{a} is followed by {c}.",
            "after {a} comes {c}.",
        ),
        instructions=(
            "Which letter comes after {a}?",
            "Name the letter that follows {a} in the alphabet.",
        ),
    ),
    Task(
        name="previous_letter",
        operands=tuple((x,) for x in LETTERS[1:]),
        answer=lambda a: LETTERS[LETTERS.index(a) - 1],
        sentences=(
            "the letter before {a} is {c}.",
            "{a} follows {c}.",
            "before {a} comes {c}.",
        ),
        instructions=(
            "Which letter comes before {a}?",
            "Name the letter that precedes {a} in the alphabet.",
        ),
    ),
    Task(
        name="uppercase",
        operands=tuple((x,) for x in LETTERS),
        answer=lambda a: a.upper(),
        sentences=(
            "the capital of {a} is {c}.",
            "{a} in upper case is {c}.",
            "big {a} is {c}.",
        ),
        instructions=("Write {a} as a capital letter.", "What is the uppercase form of {a}?"),
    ),
)
"""The shipped tasks, in a fixed order (the order is part of the generated data)."""

TASKS_BY_NAME: dict[str, Task] = {task.name: task for task in TASKS}


def all_facts() -> list[tuple[str, tuple]]:
    """Every ``(task name, operands)`` pair, in a fixed order."""
    return [(task.name, ops) for task in TASKS for ops in task.operands]


def pretraining_sentences(seed: int) -> Iterator[str]:
    """Yields an endless stream of plain-text fact sentences for pretraining the tiny base.

    Args:
        seed: Seed of the stream; the same seed gives the same text.

    Yields:
        One sentence at a time, e.g. ``"7 plus 8 is 15."``.
    """
    rng = random.Random(seed)
    while True:
        task = rng.choice(TASKS)  # tasks equally often, however many facts each has
        yield task.sentence(rng, rng.choice(task.operands))
