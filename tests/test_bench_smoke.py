"""Smoke test of bench/decode.py: ``--quick`` (a tiny GPT-2, a few tokens, two rounds) runs end to end
and prints its tables with numbers in them. The benchmark's figures themselves are not checked here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "decode.py"
VARIANTS = ["hf-fp32", "gptcli-fp32", "gptcli-fp32-batch8"]
NUMBER = re.compile(r"^\d+(\.\d+)?[×%]?$")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table in ``text`` as rows of cells, the alignment row left out."""
    tables: list[list[list[str]]] = []
    previous_was_row = False
    for line in text.splitlines():
        is_row = line.startswith("|")
        if is_row:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not previous_was_row:
                tables.append([])
            if not all(set(c) <= set("-:") for c in cells):
                tables[-1].append(cells)
        previous_was_row = is_row
    return tables


def is_number(cell: str) -> bool:
    return bool(NUMBER.match(cell))


def test_quick_run_prints_the_tables(tmp_path: Path) -> None:
    output = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--variants", ",".join(VARIANTS), "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert output.read_text() == proc.stdout
    assert "- Machine:" in proc.stdout and "- Command:" in proc.stdout
    assert re.search(r"Memory bandwidth .*: \d+\.\d GB/s", proc.stdout)

    variants, processes = markdown_tables(proc.stdout)
    header, rows = variants[0], {row[0]: dict(zip(variants[0], row)) for row in variants[1:]}
    assert header == ["variant", "decode tok/s", "spread", "vs ref", "ref", "% limit", "limit tok/s", "prefill tok/s",
                      "TTFT ms", "load s", "compile s", "peak RSS MiB"]
    assert list(rows) == VARIANTS
    for name, row in rows.items():
        for column in ("decode tok/s", "spread", "% limit", "limit tok/s", "TTFT ms", "load s", "peak RSS MiB"):
            assert is_number(row[column]), (name, column, row[column])
        assert float(row["decode tok/s"]) > 0
    assert rows["gptcli-fp32"]["ref"] == "hf-fp32" and is_number(rows["gptcli-fp32"]["vs ref"])
    assert rows["gptcli-fp32-batch8"]["ref"] == "gptcli-fp32" and is_number(rows["gptcli-fp32-batch8"]["vs ref"])
    assert is_number(rows["gptcli-fp32"]["prefill tok/s"]) and rows["gptcli-fp32-batch8"]["prefill tok/s"] == "—"

    assert processes[0] == ["command", "median s", "min s", "status"]
    commands = [row[0] for row in processes[1:]]
    assert commands[0] == "`gptcli --help`" and commands[1] == "`gptcli params --size xl`"
    assert commands[2].startswith("`gptcli generate -n 1 --weights random")
    for row in processes[1:]:
        assert is_number(row[1]) and row[3] == "ok", row
