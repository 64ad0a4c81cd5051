"""What the benchmarks print: progress lines on stderr, the load average, figures and markdown tables, and the
lines about the machine, the software, the date and the command that head a report."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from gptcli.devices import cpu_model

REPO = Path(__file__).resolve().parent.parent


def logger(tag: str = "", clock: bool = False) -> Callable[[str], None]:
    """A ``log(message)`` that writes one line to stderr: ``[tag] message``, ``[HH:MM:SS] message`` with
    ``clock``, or the message alone."""

    def log(message: str) -> None:
        prefix = f"[{time.strftime('%H:%M:%S')}] " if clock else f"[{tag}] " if tag else ""
        print(prefix + message, file=sys.stderr, flush=True)

    return log


def load_average(sep: str = " ", unknown: str = "unknown") -> str:
    """The 1, 5 and 15 minute load averages, two decimals each, joined by ``sep``."""
    try:
        return sep.join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return unknown


def fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """``value * scale`` formatted by ``spec`` then ``suffix``; a dash for a missing value."""
    return "—" if value is None else f"{value * scale:{spec}}{suffix}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,)) -> str:
    """Numbers right-aligned, the ``text_columns`` left-aligned."""
    align = ["---" if i in text_columns else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def versions(packages: Sequence[str]) -> str:
    """``torch 2.x, transformers 4.y``: the installed versions of ``packages``."""
    return ", ".join(f"{p} {metadata.version(p)}" for p in packages)


def git_commit() -> str:
    """This checkout's short commit, or ``unknown``."""
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return git.stdout.strip() or "unknown"


def utc_date(when: datetime | None = None) -> str:
    return (when or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")


def invocation(script: str) -> str:
    """The command line that ran ``script`` (``bench/decode.py``), quoted for a shell."""
    return shlex.join(["python", script, *sys.argv[1:]])


def machine_line(threads: int, packages: Sequence[str]) -> str:
    return (f"- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {threads} torch threads; "
            f"{versions(packages)}, Python {sys.version.split()[0]}")


def date_line() -> str:
    return f"- Date: {utc_date()}; gptcli commit {git_commit()}"


def command_line(script: str) -> str:
    return f"- Command: `{invocation(script)}`"
