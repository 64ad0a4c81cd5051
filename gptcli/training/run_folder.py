"""The run folder ``gptcli train`` writes, and the checks before writing into one.

- ``model.safetensors`` + ``config.json``: the last weights, Hugging Face layout (``--weights DIR``);
- ``best/``: the same for the best validation loss so far;
- ``state.safetensors``: everything to resume bit for bit (``gptcli.training.state``);
- ``data/train.bin``, ``data/val.bin``: the token ids (memory-mapped);
- ``train.jsonl`` (events) and ``loss.png`` (the book's loss plot).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from gptcli.errors import UserError
from gptcli.training.state import STATE_FILE

if TYPE_CHECKING:
    import numpy as np

LOG_FILE = "train.jsonl"
PLOT_FILE = "loss.png"
BEST_DIR = "best"
DATA_DIR = "data"
RUN_MARKERS = (STATE_FILE, LOG_FILE)  # a folder holding one of these is a training run


def check_out_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to write into a folder that holds something else: another run (unless --force) or files."""
    if resume:
        if not out.is_dir():
            raise UserError(f"--resume {out}: no such folder")
        return
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return
    is_run = any(m in entries for m in RUN_MARKERS)
    if is_run and not force:
        if STATE_FILE not in entries:
            raise UserError(f"--out {out}: holds a training run that saved no checkpoint (nothing to resume); pass "
                            "--force to replace it, or another --out")
        raise UserError(f"--out {out}: holds another training run; pass --resume {out} to continue it, "
                        "--force to replace it, or another --out")
    if not is_run:
        raise UserError(f"--out {out}: the folder is not empty and is not a training run; choose an empty or new "
                        "folder")


def clear_run(out: Path) -> None:
    """--force: remove the files of the run in ``out`` (only those a run writes)."""
    import shutil

    for name in (STATE_FILE, LOG_FILE, PLOT_FILE, "model.safetensors", "config.json"):
        (out / name).unlink(missing_ok=True)
    for name in (BEST_DIR, DATA_DIR):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def store_data(train: "np.ndarray", val: "np.ndarray", out: Path, vocab_size: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Write the ids under ``out/data`` and map them back from there (they leave memory)."""
    from gptcli import data

    folder = out / DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    data.save_ids(train, folder / "train.bin")
    data.save_ids(val, folder / "val.bin")
    return data.load_ids(folder / "train.bin", vocab_size), data.load_ids(folder / "val.bin", vocab_size)


def rewrite_log(out: Path, up_to_step: int) -> None:
    """Drop logged events after ``up_to_step`` (and old ``end``/``start`` lines): a resumed run logs them anew."""
    from gptcli.export import atomic_write

    log = out / LOG_FILE
    if not log.exists():
        return
    kept = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") in ("end",):
            continue
        if ev.get("event") != "start" and ev.get("step", -1) >= up_to_step:
            continue
        kept.append(line)
    atomic_write(log, lambda tmp: tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8"))


class RunLog:
    """train.jsonl and loss.png in the run folder: every event but progress ticks, and the plot redrawn at each eval."""

    def __init__(self, out: Path, plot: bool = True):
        self.out = out
        self.plot = plot
        self.evals: list[dict] = []
        log = out / LOG_FILE
        if log.exists():
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "eval":
                    self.evals.append(ev)

    def record(self, event: dict) -> None:
        if event["event"] == "step":
            return
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, ensure_ascii=False) + "\n")
        if event["event"] == "eval":
            self.evals.append(event)
            if self.plot:
                from gptcli.plot import plot_losses

                plot_losses(self.evals, self.out / PLOT_FILE)
