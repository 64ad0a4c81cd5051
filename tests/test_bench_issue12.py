"""Smoke tests of bench/batch_invariance.py, bench/threads.py and bench/kernel_tuner.py: they run and print their
tables with numbers in them. The figures themselves are not checked here (they are in BENCHMARKS.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_batch_invariance_quick_prints_kernels_model_and_cost():
    proc = run(str(BENCH / "batch_invariance.py"), "--quick", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("## Batch invariance on ") and "- Command: `python bench/batch_invariance.py" in out
    rows = [line for line in out.splitlines() if line.startswith("| oneDNN") or line.startswith("| gptcli.kernels.decode")]
    assert len(rows) == 4 * 5 * 2  # plain oneDNN and the 3 eager kernels, five shapes, two dtypes
    assert all(line.split("|")[4].strip() == "yes" for line in rows if "kernels onednn" in line)  # lone row as two
    assert re.search(r"model \(tiny, float32\): 56/56 row logits bit-identical", out)  # what the code promises
    for label in ("(a) the matrices", "(b) attention", "(c) tiny float32"):
        assert label in out
    assert re.search(r"exact, packed weights \(the default kernel\): batch 1 \d+\.\d tok/s, batch 8 \d+\.\d tok/s", out)
    assert re.search(r"exact, tuned kernels \(generate now: [a-z, -]+\): batch 1 \d+\.\d tok/s", out)


def test_threads_bench_prints_a_row_per_setting():
    proc = run(str(BENCH / "threads.py"), "--size", "tiny", "--rounds", "1", "--new-tokens", "4", "--max-busy", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "- Machine: " in out and "cores in the affinity mask" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert "1 thread" in rows and any(name.endswith("OMP_WAIT_POLICY=PASSIVE") for name in rows)
    assert re.search(r"\| 1 thread \| \d+\.\d \(", rows["1 thread"])
    assert re.search(r"\| \d+ \|$", rows["`configure_threads(None)` chose (each round)"])


def test_kernel_tuner_prints_each_candidate_and_the_tuning_time():
    proc = run(str(BENCH / "kernel_tuner.py"), "--dtypes", "bfloat16", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("## Kernel tuning on ")
    assert re.search(r"### bfloat16: first run \d+\.\d\d s \(measured\), cached run \d+\.\d ms \(cache\)", proc.stdout)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "bfloat16" in line]
    assert len(rows) == 5 * 3  # 124M's five weight shapes, three candidates each
    assert sum("**" in line.split("|")[6] for line in rows) == 5  # one eager choice per shape
