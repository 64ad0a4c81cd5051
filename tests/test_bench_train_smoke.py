"""Smoke test of bench/train.py: ``--quick`` (tiny shapes, two rounds) runs end to end and prints its
tables with numbers in them. The benchmark's figures themselves are not checked here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_bench_smoke import is_number, markdown_tables

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train.py"
VARIANTS = ["hf-fp32", "gptcli-fp32", "gptcli-bf16"]


def test_quick_run_prints_the_tables(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200, encoding="utf-8")
    output = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--threads", "1", "--settings", "book-ch05",
         "--variants", ",".join(VARIANTS), "--text", str(text), "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert output.read_text() == proc.stdout
    assert re.search(r"- Machine: .*AMX: (yes|no); AVX-512 BF16: (yes|no)", proc.stdout)
    assert re.search(r"load average \(1, 5, 15 min\) at the start: [\d.]+ [\d.]+ [\d.]+", proc.stdout)
    assert re.search(r"Matmul peak .*float32 \d+ GFLOP/s.*bfloat16 \d+ GFLOP/s", proc.stdout)

    steps, tokenizing = markdown_tables(proc.stdout)
    header = steps[0]
    assert header == ["setting", "variant", "tokens/s", "ms/step", "spread", "× hf fp32", "× hf same dtype", "MFU",
                      "compile s", "peak RSS MiB"]
    rows = {row[1]: dict(zip(header, row)) for row in steps[1:]}
    assert list(rows) == VARIANTS and all(r["setting"] == "book-ch05" for r in rows.values())
    for name, row in rows.items():
        for column in ("tokens/s", "ms/step", "spread", "MFU", "peak RSS MiB"):
            assert is_number(row[column].replace(",", "")), (name, column, row[column])
    assert is_number(rows["gptcli-fp32"]["× hf fp32"]) and is_number(rows["gptcli-bf16"]["× hf fp32"])
    assert rows["hf-fp32"]["× hf fp32"] == "—"

    assert tokenizing[0] == ["tokenizer", "MB/s", "spread", "tokens"]
    assert [r[0] for r in tokenizing[1:]] == ["gpt2", "char"]
    assert all(is_number(r[1]) for r in tokenizing[1:])
