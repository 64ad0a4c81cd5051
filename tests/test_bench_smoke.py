"""Smoke tests of bench/decode.py and bench/score.py: ``--quick`` (a tiny GPT-2, a few tokens, two rounds) runs
end to end and prints its tables with numbers in them. The benchmarks' figures themselves are not checked here."""

from __future__ import annotations

import os
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

    variants, targets, processes = markdown_tables(proc.stdout)
    assert targets[0] == ["target", "measured", "status"] and len(targets) == 1 + 7
    statuses = {row[0]: row[2] for row in targets[1:]}
    assert statuses["int4 >= 1.6x the best int8 path"] == "not run"  # --quick runs no int4 variant
    assert statuses["batch 8 >= 4x batch 1"] in ("met", "**not met**")
    header, rows = variants[0], {row[0]: dict(zip(variants[0], row)) for row in variants[1:]}
    assert header == ["variant", "decode tok/s", "spread", "vs ref", "ref", "% limit", "limit tok/s", "prefill tok/s",
                      "TTFT ms", "load s", "tune s", "compile s", "peak RSS MiB"]
    assert list(rows) == VARIANTS
    for name, row in rows.items():
        for column in ("decode tok/s", "spread", "% limit", "limit tok/s", "TTFT ms", "load s", "peak RSS MiB"):
            assert is_number(row[column]), (name, column, row[column])
        assert float(row["decode tok/s"]) > 0
    assert rows["gptcli-fp32"]["ref"] == "hf-fp32" and is_number(rows["gptcli-fp32"]["vs ref"])
    assert rows["gptcli-fp32-batch8"]["ref"] == "gptcli-fp32" and is_number(rows["gptcli-fp32-batch8"]["vs ref"])
    assert is_number(rows["gptcli-fp32"]["prefill tok/s"]) and rows["gptcli-fp32-batch8"]["prefill tok/s"] == "—"
    assert float(rows["gptcli-fp32"]["tune s"]) >= 0 and rows["hf-fp32"]["tune s"] == "—"
    assert "Kernels (Linear layers per kernel, gptcli.kernels.decode): gptcli-fp32: " in proc.stdout

    assert processes[0] == ["command", "median s", "min s", "status"]
    commands = [row[0] for row in processes[1:]]
    assert commands[0] == "`gptcli --help`" and commands[1] == "`gptcli params --size xl`"
    assert commands[2].startswith("`gptcli generate -n 1 --weights random")
    for row in processes[1:]:
        assert is_number(row[1]) and row[3] == "ok", row


def test_first_token_compares_whole_processes_on_the_same_checkpoint() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--variants", "gptcli-fp32", "--no-processes", "--rounds", "1",
         "--first-token"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    first_token = markdown_tables(proc.stdout)[-1]
    assert first_token[0] == ["process", "wall s", "load + first token s", "peak RSS GiB", "peak RSS ÷ weights",
                              "first id"]
    rows = {row[0]: row for row in first_token[1:]}
    assert set(rows) == {"gptcli", "transformers"}
    assert rows["gptcli"][5] == rows["transformers"][5]  # the same greedy first token from the same weights
    assert all(is_number(cell) for row in rows.values() for cell in row[1:4])
    assert re.search(r"gptcli's whole process takes \d+\.\d\d× transformers' wall time", proc.stdout)


SCORE_BENCH = BENCH.parent / "score.py"


def test_score_bench_quick_run_prints_its_table(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more text" for i in range(200)))
    output = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(SCORE_BENCH), "--quick", "--text", str(text), "--tokens", "300", "--rounds", "2",
         "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert output.read_text() == proc.stdout
    assert "- Machine:" in proc.stdout and "- Load average" in proc.stdout and "- Command:" in proc.stdout
    assert "the first 300 tokens of text.txt; windows of 128 tokens, stride 64: 299 tokens scored" in proc.stdout
    [table] = markdown_tables(proc.stdout)
    assert table[0] == ["side", "tokens/s", "median s", "spread", "vs transformers", "loss"]
    assert [row[0] for row in table[1:]] == ["transformers (docs' loop)", "gptcli score (batch 8)"]
    for row in table[1:]:
        assert all(is_number(cell) for cell in row[1:]), row
        assert float(row[1]) > 0
    assert float(table[1][5]) == pytest.approx(float(table[2][5]), rel=1e-2)  # both sides compute the same loss


def test_score_bench_without_a_text_says_where_to_find_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPTCLI_DATA_DIR"}
    proc = subprocess.run([sys.executable, str(SCORE_BENCH), "--quick"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: no text to score: pass --text FILE, or set GPTCLI_DATA_DIR to a folder "
                                   "holding the-verdict.txt (e.g. GPTCLI_DATA_DIR=../shared/data)")


def test_decode_bench_refuses_a_checkpoint_folder_without_a_config(tmp_path) -> None:
    """A --checkpoint that is not a save_pretrained folder is one usage error (exit 2), not a traceback."""
    result = subprocess.run([sys.executable, str(BENCH), "--checkpoint", str(tmp_path / "missing"), "--quick"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert "holds no config.json" in result.stderr and "Traceback" not in result.stderr
