"""The run folder ``gptcli train`` writes, and the checks before writing into one.

- ``model.safetensors`` + ``config.json``: the last weights, Hugging Face layout (``--weights DIR``);
- ``best/``: the same for the best validation loss so far;
- ``state.safetensors``: everything to resume bit for bit (``gptcli.training.state``);
- ``data/train.bin``, ``data/val.bin``: the token ids (memory-mapped);
- ``train.jsonl`` (events) and ``loss.png`` (the book's loss plot).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from gptcli.errors import UserError
from gptcli.run_layout import (  # noqa: F401 - the run's names, for this package's modules
    ADAPTERS_FILE,
    BEST_DIR,
    CLASSIFIER_FILE,
    DATA_DIR,
    LOG_FILE,
    MODEL_FILE,
    PLOT_FILE,
    RUN_ENTRIES,
    RUN_MARKERS,
    STATE_FILE,
)

if TYPE_CHECKING:
    import numpy as np


def _run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or (name.startswith(".") and ".tmp-" in name)


def unfinished_run(out: Path) -> bool:
    """Whether ``out`` holds only what a run writes, and no checkpoint: the leftovers of a run that
    failed or was killed before it saved anything (nothing to resume), which a new run replaces."""
    try:
        entries = [p.name for p in out.iterdir()]
    except OSError:
        return False
    return bool(entries) and all(_run_entry(n) for n in entries) and STATE_FILE not in entries \
        and not {MODEL_FILE, ADAPTERS_FILE, CLASSIFIER_FILE} & set(entries)


def check_out_dir(out: Path, *, resume: bool, force: bool) -> bool:
    """Refuse to write into a folder that holds something else: another run (unless --force) or files.

    True when ``out`` must be cleared first: --force, or the leftovers of a run that saved no
    checkpoint (``unfinished_run``), so a failed run never blocks the corrected one."""
    if resume:
        if not out.is_dir():
            raise UserError(f"--resume {out}: no such folder")
        return False
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return False
    if unfinished_run(out):
        return True
    is_run = any(m in entries for m in RUN_MARKERS)
    if is_run and not force:
        if STATE_FILE not in entries:
            raise UserError(f"--out {out}: holds a training run that saved no checkpoint (nothing to resume) and "
                            "other files; pass --force to replace the run's files, or another --out")
        raise UserError(f"--out {out}: holds another training run; pass --resume {out} to continue it, "
                        "--force to replace it, or another --out")
    if not is_run:
        raise UserError(f"--out {out}: the folder is not empty and is not a training run; choose an empty or new "
                        "folder")
    return True


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a new folder would be made)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path, *, resume: bool = False) -> None:
    """Make and remove a file where the run will write (a read-only disk or folder is refused now,
    not after the first steps). The message names the flag that chose the folder: --out, or
    --resume, whose folder cannot move (the run's checkpoints are rewritten in place)."""
    where = existing_parent(out)
    try:
        fd, probe = tempfile.mkstemp(prefix=".gptcli-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or exc
        if resume:
            copy = "copy the folder to a writable place and --resume the copy"
            fix = copy if exc.errno == errno.EROFS else f"make it writable (chmod u+w {out}), or {copy}"
            raise UserError(f"--resume {out}: cannot write in the run folder: {reason}; a resumed run saves its "
                            f"checkpoints there, so {fix}") from None
        raise UserError(f"--out {out}: cannot write in {where}: {reason}; choose a writable folder "
                        "with --out") from None


def folder_bytes(n_params: int, n_tokens: int, token_bytes: int) -> dict[str, int]:
    """What a run folder holds, in bytes (float32): state.safetensors (weights and AdamW's two moments,
    12 per parameter), model.safetensors and best/ (4 each), data/, and the room a checkpoint needs
    while it is rewritten (its new state file beside the old one)."""
    sizes = {"state": 12 * n_params, "weights": 4 * n_params, "best": 4 * n_params, "data": n_tokens * token_bytes}
    sizes["rewrite"] = sizes["state"] + sizes["weights"]
    sizes["total"] = sum(sizes.values())
    return sizes


def check_room(out: Path, need: dict[str, int], already: int = 0, resume: bool = False) -> None:
    """Refuse a run whose checkpoints will not fit on ``out``'s disk (``already``: bytes it holds now;
    ``resume``: the folder came from --resume, so only freeing space helps)."""
    from gptcli.params import human_bytes

    where = existing_parent(out)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if need["total"] - already > free:
        fix = "free some space, or copy the folder to a larger disk and --resume the copy" if resume else \
            "free some space or choose another --out"
        raise UserError(
            f"{'--resume' if resume else '--out'} {out}: the disk has {human_bytes(free)} free, and this run needs "
            f"about {human_bytes(need['total'] - already)} (state {human_bytes(need['state'])}, weights "
            f"{human_bytes(need['weights'])}, best/ {human_bytes(need['best'])}, data {human_bytes(need['data'])}, "
            f"{human_bytes(need['rewrite'])} while a checkpoint is rewritten); {fix}")


def last_checkpoint(out: Path) -> int | None:
    """The step (0-based) of the checkpoint in ``out``, from its state file's header; None if there is none."""
    from safetensors import safe_open

    try:
        with safe_open(str(out / STATE_FILE), framework="pt", device="cpu") as f:
            return int(json.loads((f.metadata() or {})["gptcli.position"])["step"]) - 1
    except Exception:  # noqa: BLE001 - missing or unreadable: no good checkpoint to name
        return None


def failure_reason(exc: BaseException) -> str:
    """``No space left on device`` from an OSError, or from safetensors' wrapped one (``Os { code: 28, ...``)."""
    import re

    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    code = re.search(r"code: (\d+)", str(exc))
    if code:
        return os.strerror(int(code.group(1)))
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_failure(out: Path, what: str, exc: BaseException) -> UserError:
    """One line for a write that failed after training started: what, why, and the last good checkpoint."""
    reason = failure_reason(exc)
    step = last_checkpoint(out)
    if step is None:
        rest = (f"no checkpoint was saved, so there is nothing to resume; rerun the same command once there is "
                f"room (it replaces {out})")
    else:
        rest = (f"the last good checkpoint, after step {step}, is intact in {out}: free some space, then "
                f"gptcli train --resume {out}")
    return UserError(f"cannot write {what} in {out}: {reason}; {rest}")


@contextlib.contextmanager
def writing(out: Path, what: str) -> Iterator[None]:
    """Turn a failed write (OSError, or safetensors' own error for one) into ``write_failure``."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        raise write_failure(out, what, exc) from None


def clear_run(out: Path) -> None:
    """--force: remove the files of the run in ``out`` (only those a run writes)."""
    for name in (STATE_FILE, LOG_FILE, PLOT_FILE, MODEL_FILE, ADAPTERS_FILE, CLASSIFIER_FILE, "config.json"):
        (out / name).unlink(missing_ok=True)
    for leftover in out.glob(".*.tmp-*"):  # an atomic write cut short by a kill
        if leftover.is_file():
            leftover.unlink()
    for name in (BEST_DIR, DATA_DIR):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def store_data(train: "np.ndarray", val: "np.ndarray", out: Path, vocab_size: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Write the ids under ``out/data`` and map them back from there (they leave memory)."""
    from gptcli.training import data

    folder = out / DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    data.save_ids(train, folder / "train.bin")
    data.save_ids(val, folder / "val.bin")
    return data.load_ids(folder / "train.bin", vocab_size), data.load_ids(folder / "val.bin", vocab_size)


def rewrite_log(out: Path, up_to_step: int) -> None:
    """Drop logged events after ``up_to_step`` (and old ``end``/``start`` lines): a resumed run logs them anew."""
    from gptcli.files import atomic_write

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


# loss.png is redrawn at an evaluation at most this often (and always at the last one, the run's end and
# close): drawing it took 0.1 s, 2% of nanoGPT's shakespeare-char recipe when drawn at every evaluation.
PLOT_EVERY_S = 10.0


class RunLog:
    """train.jsonl and loss.png in the run folder: every event but progress ticks, and the plot redrawn
    with the evaluations (at most every ``PLOT_EVERY_S`` seconds; ``close`` draws what is left)."""

    def __init__(self, out: Path, plot: bool = True):
        self.out = out
        self.plot = plot
        self.evals: list[dict] = []
        self._drawn_at: float | None = None  # time.monotonic() of the last drawing
        self._stale = False  # evaluations the plot does not show yet
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
        with writing(self.out, LOG_FILE):
            with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(event, ensure_ascii=False) + "\n")
        if event["event"] == "eval":
            self.evals.append(event)
            self._stale = True
            due = self._drawn_at is None or time.monotonic() - self._drawn_at >= PLOT_EVERY_S
            if due or event.get("final"):
                self.draw()
        elif event["event"] == "end":
            self.close()

    def draw(self) -> None:
        """Redraw loss.png from the evaluations so far (nothing when plotting is off or none came)."""
        self._stale = False
        if not (self.plot and self.evals):
            return
        from gptcli.plot import plot_losses

        with writing(self.out, PLOT_FILE):
            plot_losses(self.evals, self.out / PLOT_FILE)
        self._drawn_at = time.monotonic()

    def close(self) -> None:
        """Draw the evaluations the plot does not show yet."""
        if self._stale:
            self.draw()
