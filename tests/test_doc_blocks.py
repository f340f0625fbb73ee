"""Every ```python block of README.md and docs/*.md runs as written; the quick start matches CI.

Blocks are collected automatically, so a new page in docs/ is covered the moment it exists.
Each block runs on its own — its own imports, nothing carried over from the block before — in
a fresh temporary working directory, and must print no warning. The documented setup, the
only changes made to a block before it runs:

* ``/tmp/`` becomes the test's temporary directory;
* a quoted path ``"examples/...`` is taken from the repository root (the docs' commands
  run from there);
* the Hugging Face id ``microsoft/Phi-3-mini-4k-instruct`` becomes ``examples/tiny-phi3-base``,
  the small pretrained Phi-3 shipped with the repository (the same architecture, no
  download), so a block written for the real model runs here as it would there.

A fragment that cannot run on its own (a signature, a piece of a launcher script) is not a
```python fence but ```text.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)
HUB_MODEL = "microsoft/Phi-3-mini-4k-instruct"
TINY_PHI3 = ROOT / "examples" / "tiny-phi3-base"


def python_blocks(page: Path) -> list[str]:
    """The page's ```python blocks, dedented (a block may sit inside a list item)."""
    blocks = []
    for match in FENCE.finditer(page.read_text(encoding="utf-8")):
        indent = len(match["indent"])
        blocks.append("".join(line[indent:] for line in match["code"].splitlines(keepends=True)))
    return blocks


def prepared(code: str, tmp: Path) -> str:
    """A block with the documented setup applied (see the module docstring)."""
    code = code.replace("/tmp/", f"{tmp}/").replace('"examples/', f'"{ROOT}/examples/')
    return code.replace(HUB_MODEL, str(TINY_PHI3))


BLOCKS = [
    pytest.param(page, i, code, id=f"{page.relative_to(ROOT)}-{i}")
    for page in PAGES
    for i, code in enumerate(python_blocks(page))
]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_every_page_with_code_is_collected() -> None:
    assert len(BLOCKS) >= 10
    assert {p.name for p in PAGES} >= {"README.md", "surgery.md", "phi3.md", "finetune-phi3.md"}


@pytest.mark.parametrize(("page", "index", "code"), BLOCKS)
def test_python_block_runs_without_warnings(
    page: Path, index: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    logged = _Records()
    for name in ("transformers", "lora_layers", ""):
        logging.getLogger(name).addHandler(logged)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(prepared(code, tmp_path), f"{page.name} block {index}", "exec"), {})
    finally:
        for name in ("transformers", "lora_layers", ""):
            logging.getLogger(name).removeHandler(logged)
    shown = [
        w
        for w in caught
        if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)
    ]
    assert not shown, [f"{w.category.__name__}: {w.message}" for w in shown]
    assert not logged.records, [r.getMessage() for r in logged.records]


def test_readme_blocks_print_nothing_on_stderr_in_a_fresh_process(tmp_path: Path) -> None:
    # A fresh interpreter: transformers logs some warnings only once per process.
    blocks = [prepared(code, tmp_path / str(i)) for i, code in enumerate(python_blocks(PAGES[0]))]
    script = (
        "import json, os, sys\n"
        "for i, code in enumerate(json.loads(sys.argv[1])):\n"
        "    os.makedirs(sys.argv[2] + f'/{i}', exist_ok=True); os.chdir(sys.argv[2] + f'/{i}')\n"
        "    exec(compile(code, f'README block {i}', 'exec'), {})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(blocks), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_ci_runs_the_readme_test_command() -> None:
    readme = PAGES[0].read_text()
    quick_start = re.search(r"^## Quick start\n(.*?)(?=^## )", readme, re.S | re.M)[1]
    bash = re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)
    assert len(bash) == 2, "the quick start is exactly two commands"
    test_command = bash[1].strip().rsplit("&& ", 1)[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
    assert "pip install torch==2.13.0" in bash[0] and "pip install torch==2.13.0" in bash[1]
    assert "examples/finetune_phi3.py" in bash[0]
