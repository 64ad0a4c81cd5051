"""Smoke test of bench/serve.py: ``--quick`` (a tiny GPT-2, a few tokens) starts the server, drives it over
HTTP and prints its tables with numbers in them. The figures themselves are not checked here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_bench_smoke import is_number, markdown_tables

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "serve.py"


def test_quick_run_prints_the_table_and_the_target(tmp_path: Path) -> None:
    output = tmp_path / "report.md"
    env = {**os.environ, "GPTCLI_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--streams", "1,8", "--output", str(output)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert output.read_text() == proc.stdout
    assert "- Machine:" in proc.stdout and "- Load average" in proc.stdout
    phases, targets = markdown_tables(proc.stdout)
    assert phases[0] == ["setup", "requests", "aggregate tok/s", "vs 1 stream", "TTFT p50 ms", "TTFT p99 ms", "errors"]
    rows = {row[0]: row for row in phases[1:]}
    assert list(rows) == ["gptcli serve, 1 stream", "gptcli serve, 8 streams", "transformers generate, 1 at a time"]
    assert rows["gptcli serve, 8 streams"][1] == "16"  # 8 streams x 2 requests
    for row in rows.values():
        assert all(is_number(cell.rstrip("×")) for cell in row[2:6]), row
        assert row[6] == "—"
    assert targets[1][0] == "8 streams >= 4x the aggregate tok/s of 1" and targets[1][2] in ("met", "**not met**")
