"""The fine-tune's output folder: what an earlier run left there, atomic writes, checkpoints, logs.

The rules that keep a user's files safe live here:

* :func:`earlier_run` says whether ``--output-dir`` holds a run; a new run into it is
  refused unless ``--overwrite`` (or ``--resume``) says otherwise;
* every file is written under a temporary name and renamed (:func:`write_text`,
  :func:`write_file`, :func:`write_dir`), so an interrupted run never leaves half a file
  and a failed run never changes a finished one;
* :class:`RunLog` keeps the log lines in memory until the run has claimed the folder, then
  writes them (and every later line) to ``train.log``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_config import UserError

CHECKPOINTS = "checkpoints"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"
TRAINER_JSON = "trainer_state.json"
LOG_FILE = "train.log"
RUN_OUTPUTS = ("config.json", "metrics.json", "loss_curve.png", "adapter", "merged", CHECKPOINTS)
"""What a run writes besides ``train.log``; any of them means the folder holds a run."""

logger = logging.getLogger("finetune_phi3")


# --------------------------------------------------------------------------- atomic writes
def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_file(path: Path, write: Callable[[Path], Any]) -> Path:
    """Calls ``write(tmp)`` and renames ``tmp`` to ``path``: the file is whole or not there."""
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> Path:
    """Writes ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=1) + "\n")


def write_dir(path: Path, write: Callable[[Path], Any]) -> Path:
    """Calls ``write(tmp_dir)`` and swaps ``tmp_dir`` in for ``path``.

    The old folder is renamed away before the new one is renamed in and removed after, so at
    every moment ``path`` is either the old complete folder or the new complete one (or, for
    an instant between the two renames, absent).
    """
    tmp, old = _tmp(path), path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- the folder
def earlier_run(out_dir: Path) -> list[str]:
    """The outputs of an earlier run in ``out_dir`` (names from :data:`RUN_OUTPUTS`)."""
    return [name for name in RUN_OUTPUTS if (out_dir / name).exists()]


def remove_earlier_run(out_dir: Path) -> None:
    """Deletes an earlier run's outputs (``--overwrite``); other files in the folder stay."""
    for name in earlier_run(out_dir):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# --------------------------------------------------------------------------- checkpoints
def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / TRAINER_JSON).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: a directory, or ``latest`` in ``out_dir``.

    Returns:
        The checkpoint folder; ``None`` for ``latest`` when ``out_dir`` holds no run yet
        (the run then starts fresh, so ``--resume latest`` can always be passed).

    Raises:
        UserError: If a named directory is not a checkpoint, or ``latest`` finds none in a
            folder that holds a run; the message lists the checkpoints that exist.
    """
    found = list_checkpoints(out_dir)
    existing = ", ".join(str(p) for p in found) or f"none in {out_dir / CHECKPOINTS}"
    if resume == "latest":
        if found:
            return found[-1]
        if earlier_run(out_dir):
            raise UserError(
                f"--resume latest: {out_dir} holds a run but no checkpoint to resume from "
                "(pass --overwrite to start again)"
            )
        return None
    path = Path(resume).expanduser()
    if not (path / TRAINER_JSON).is_file():
        raise UserError(
            f"--resume {resume!r} is not a checkpoint directory; checkpoints: {existing}"
        )
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (step, history, before-metrics, config)."""
    return json.loads((path / TRAINER_JSON).read_text(encoding="utf-8"))


def save_checkpoint(out_dir: Path, step: int, write: Callable[[Path], Any], keep: int) -> Path:
    """Writes checkpoint ``out_dir/checkpoints/step-NNNNNN`` atomically, keeps the newest ``keep``.

    Args:
        out_dir: The run's output directory.
        step: Optimizer steps done.
        write: Writes the checkpoint's files into the folder it is given.
        keep: Keep only this many newest checkpoints (0: all).

    Returns:
        The checkpoint directory.
    """
    (out_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    final = write_dir(out_dir / CHECKPOINTS / f"step-{step:06d}", write)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- logging
class RunLog:
    """The run's log: printed at once, written to ``train.log`` once the folder is claimed.

    Until :meth:`attach` the lines wait in memory, so a run that fails before it may touch
    the output folder writes nothing there.
    """

    def __init__(self) -> None:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        self.console = logging.StreamHandler(sys.stdout)
        self.memory = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=100)
        self.file: logging.FileHandler | None = None
        self._formatter = formatter
        for handler in (self.console, self.memory):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

    def attach(self, path: Path, append: bool) -> None:
        """Starts writing to ``path``: first the lines so far, then every new one."""
        self.file = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
        self.file.setFormatter(self._formatter)
        self.memory.setTarget(self.file)
        self.memory.flush()
        logger.removeHandler(self.memory)
        logger.addHandler(self.file)

    def error_to_file(self, message: str, out_dir: Path) -> None:
        """Writes a user error to ``train.log``, unless that would change an earlier run.

        Before the run has claimed ``out_dir``, the log (with the error) is written there
        only if the folder holds no earlier run; a folder with one is left untouched.
        """
        if self.file is None:
            if not out_dir.is_dir() and out_dir.exists() or earlier_run(out_dir):
                return
            out_dir.mkdir(parents=True, exist_ok=True)
            self.attach(out_dir / LOG_FILE, append=False)
        assert self.file is not None
        self.file.handle(logger.makeRecord(logger.name, logging.ERROR, "", 0, message, (), None))

    def close(self) -> None:
        """Detaches every handler (``main`` may run in-process, as in the tests)."""
        for handler in (self.console, self.memory, self.file):
            if handler is not None:
                logger.removeHandler(handler)
                handler.close()


# --------------------------------------------------------------------------- outputs
def plot_curves(history: dict[str, list], before: dict[str, Any], path: Path) -> None:
    """Saves the training/held-out loss and the held-out exact match over steps as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history["train"]]
    losses = [row["loss"] for row in history["train"]]
    window = max(1, len(losses) // 30)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    eval_steps = [0] + [row["step"] for row in history["eval"]]
    eval_losses = [before["loss"]] + [row["loss"] for row in history["eval"]]
    ems = [100 * before["exact_match"]] + [100 * row["exact_match"] for row in history["eval"]]

    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (step)")
    ax_loss.plot(steps, smooth, color="tab:blue", label=f"train (mean of {window})")
    ax_loss.plot(eval_steps, eval_losses, "o-", color="tab:orange", label="held-out")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss per assistant token")
    ax_loss.set_yscale("log")
    ax_loss.set_title("LoRA fine-tune loss")
    ax_loss.legend()
    ax_em.plot(eval_steps, ems, "o-", color="tab:green")
    ax_em.set_ylim(-2, 102)
    ax_em.set_xlabel("optimizer step")
    ax_em.set_ylabel("held-out exact match (%)")
    ax_em.set_title("held-out exact match (step 0 = base model)")
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
