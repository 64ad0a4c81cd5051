"""Smoke test of bench/speculative.py: ``--quick`` trains two tiny models for a few steps with ``gptcli train``,
measures every kind of draft against plain decoding and prints its tables with numbers in them. The figures
themselves are not checked here, but every row's ids must be plain decoding's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_bench_smoke import is_number, markdown_tables

BENCH = Path(__file__).resolve().parent.parent / "bench" / "speculative.py"


def test_quick_run_prints_the_tables(tmp_path: Path) -> None:
    data = os.environ.get("GPTCLI_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    verdict = Path(data) / "the-verdict.txt"
    if not verdict.is_file():
        pytest.skip("the-verdict.txt not found (set GPTCLI_DATA_DIR)")
    output = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--text", str(verdict), "--cache", str(tmp_path / "models"),
         "--output", str(output)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(BENCH.parent.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert output.read_text() == proc.stdout
    assert "- Machine:" in proc.stdout and "- Command:" in proc.stdout and "load average" in proc.stdout
    assert (tmp_path / "models" / "quick" / "target" / "model.safetensors").is_file()  # trained and cached

    main, costs, loop, repeating, non_repeating, xl_costs, predicted, targets = markdown_tables(proc.stdout)
    assert costs[0] == ["forward", "ms", "× best plain step"]
    assert [row[0] for row in costs[1:]][:2] == ["model float32, 1 row (eager)", "model float32, K+1 = 3 rows (eager: a check)"]
    assert all(re.match(r"^\d+\.\d+$", row[1]) for row in costs[1:]) and costs[1][2] == "1.00×"
    header = ["variant", "draft", "K", "acceptance", "tokens/forward", "tok/s", "× plain", "× best plain",
              "draft share", "ids identical"]
    for table in (main, loop, repeating, non_repeating):
        assert table[0] == header
        rows = {row[0]: dict(zip(header, row)) for row in table[1:]}
        assert "plain" in rows
        for name, row in rows.items():
            assert is_number(row["tok/s"]) and float(row["tok/s"]) > 0, (name, row)
            assert row["ids identical"] == "yes", (name, row)
            if name != "plain":
                assert is_number(row["tokens/forward"]) and row["× plain"].endswith("×"), (name, row)
    names = [row[0] for row in main[1:]]
    assert names == ["plain", "pair-k2", "pair-k2-c0.0", "pair-k2-bf16", "int8-k2", "int4-k2"]
    assert [row[0] for row in repeating[1:]] == ["plain", "lookup-k2", "lookup-k8"]
    assert len(xl_costs) == 4 and all(re.match(r"^\d+\.\d+$", row[1]) for row in xl_costs[1:])
    assert [row[0] for row in predicted[1:]] == ["0.6", "0.7", "0.8"]
    assert targets[0] == ["target", "measured", "status"] and len(targets) == 1 + 6
    assert targets[-1][1:] == ["yes", "met"]  # greedy ids identical everywhere
