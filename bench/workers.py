"""What the benchmarks share: a worker process that answers one JSON line per command (``send`` is the
worker's side), the results of one worker over interleaved rounds (medians and spread), the CPU's name, a
process's peak memory, a quiet transformers, how to run gptcli and where the shared texts are. The scripts
import it as ``bench.workers``; what they print is in ``bench.report``."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gptcli.devices import cpu_model, proc_kib  # noqa: F401 - the benchmarks import cpu_model from here


def shared_text(name: str, given: str | Path | None = None) -> Path | None:
    """A corpus the benchmarks read: ``given``, else ``name`` in $GPTCLI_DATA_DIR, else in the checkout's
    ``../shared/data``; None when none of them is a file (``given`` is returned as it is, checked by the caller)."""
    if given:
        return Path(given).expanduser()
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # beside the checkout
    for folder in (os.environ.get("GPTCLI_DATA_DIR"), shared):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def gptcli_command() -> list[str]:
    """How to run gptcli as a whole process: the venv's ``gptcli`` script, else ``python -m gptcli``."""
    exe = Path(sys.executable).with_name("gptcli")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gptcli"]


def peak_rss_bytes() -> int:
    """VmHWM of this process; ru_maxrss (KiB on Linux) where /proc is missing."""
    peak = proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quiet_transformers() -> Any:
    """transformers, without its warnings and progress bars on stderr."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def send(channel: IO[str], message: dict[str, Any]) -> None:
    """The worker's side: one JSON line, flushed."""
    channel.write(json.dumps(message) + "\n")
    channel.flush()


class WorkerFailed(Exception):
    pass


class Worker:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env=env)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
            sys.stderr.write(line)
        raise WorkerFailed(f"worker exited with code {self.proc.wait()} (its error is above)")

    def ask(self, command: str) -> dict[str, Any]:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise WorkerFailed(f"worker gone: {exc}") from None
        return self.read()

    def close(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Outcome:
    """One worker's results: setup info (load_s, compile_s, peak_rss), one sample per round, or an error."""

    info: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def values(self, key: str) -> list[float]:
        return [s[key] for s in self.samples if s.get(key) is not None]

    def median(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.median(values) if values else None

    def spread(self, key: str) -> float | None:
        """(max - min) / median over the rounds: how much the machine moved the figure."""
        values, median = self.values(key), self.median(key)
        return (max(values) - min(values)) / median if len(values) > 1 and median else None
