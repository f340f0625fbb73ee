"""Issue 14's structure figures: file sizes, function lengths, private imports across modules.

    python .ci/structure.py            # print the figures; exit 1 if a limit is broken

Limits: a module of ``lora_layers/`` at most 600 lines, a file of ``examples/`` or
``benchmarks/`` at most 800, a function body at most 80 lines (its docstring excluded), and
no ``from .x import _name`` inside the package.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"lora_layers": 600, "examples": 800, "benchmarks": 800}
BODY_LIMIT = 80


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = node.body
    first = body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if docstring and isinstance(first.value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def main() -> int:
    broken = []
    functions = []
    for folder, limit in LIMITS.items():
        sizes = []
        for path in sorted((ROOT / folder).glob("*.py")):
            text = path.read_text()
            sizes.append((text.count("\n"), path.relative_to(ROOT)))
            tree = ast.parse(text)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                    functions.append((body_lines(node), where))
                private = isinstance(node, ast.ImportFrom) and node.level > 0
                for alias in node.names if private else ():
                    if alias.name.startswith("_"):
                        broken.append(
                            f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}"
                        )
        lines, largest = max(sizes)
        print(f"{folder}/: {len(sizes)} files, largest {largest} ({lines} lines; limit {limit})")
        broken += [f"{p} has {n} lines (limit {limit})" for n, p in sizes if n > limit]
    functions.sort(reverse=True)
    print(f"longest function bodies (limit {BODY_LIMIT}):")
    for n, where in functions[:5]:
        print(f"  {n:3d}  {where}")
    broken += [f"{w}: body of {n} lines" for n, w in functions if n > BODY_LIMIT]
    print("limits broken:" if broken else "every limit holds", *broken, sep="\n  ")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
