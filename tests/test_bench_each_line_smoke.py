"""Smoke test of bench/each_line.py: ``--quick`` (a tiny random character model, 16 lines, one round) runs
``gptcli generate --each-line`` as a whole process and prints its table. The figures are not checked here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_bench_smoke import is_number, markdown_tables

BENCH = Path(__file__).resolve().parent.parent / "bench" / "each_line.py"


def test_quick_run_prints_the_table() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("CPU: ") and "New tokens per line: min " in proc.stdout
    (table,) = markdown_tables(proc.stdout)
    assert table[0] == ["checkout", "median s", "min s", "tokens/s", "ids as the first checkout's"]
    assert len(table) == 2 and all(is_number(cell) for cell in table[1][1:4]) and table[1][4] == "yes"
