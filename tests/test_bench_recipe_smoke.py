"""Smoke test of bench/shakespeare_recipe.py against a stand-in for nanoGPT: its data is prepared from the
text when missing, both sides run as whole processes, and the table holds both sides' times and final
validation losses (nanoGPT's read from its log, gptcli's from its JSON). The figures are not checked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_bench_smoke import is_number, markdown_tables

BENCH = Path(__file__).resolve().parent.parent / "bench" / "shakespeare_recipe.py"

# nanoGPT's train.py as far as the benchmark sees it: flags in, "step N: ... val loss X" lines out.
FAKE_TRAIN = """
import sys
flag = lambda name, default: int(next((a.split("=")[1] for a in sys.argv if a.startswith(name + "=")), default))
steps, every = flag("--max_iters", 0), flag("--eval_interval", 250)  # nanoGPT's config: every 250 steps
assert "--device=cpu" in sys.argv and "--n_embd=128" in sys.argv and sys.argv[1] == "config/train_shakespeare_char.py"
for step in range(0, steps + 1, every):
    print(f"step {step}: train loss 3.0000, val loss {4.2 - step / 1000:.4f}")
"""
FAKE_PREPARE = """
from pathlib import Path
text = Path("input.txt").read_text()
Path("train.bin").write_bytes(text[:100].encode())
Path("val.bin").write_bytes(text[100:200].encode())
"""


def fake_nanogpt(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in nanoGPT checkout, its data not prepared, and a small text."""
    nano = tmp_path / "nanoGPT"
    (nano / "config").mkdir(parents=True)
    (nano / "data" / "shakespeare_char").mkdir(parents=True)
    (nano / "train.py").write_text(FAKE_TRAIN)
    (nano / "config" / "train_shakespeare_char.py").write_text("")
    (nano / "data" / "shakespeare_char" / "prepare.py").write_text(FAKE_PREPARE)
    text = tmp_path / "tiny.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 300, encoding="utf-8")
    return nano, text


def test_recipe_bench_prepares_nanogpt_and_reports_both_sides(tmp_path: Path) -> None:
    nano, text = fake_nanogpt(tmp_path)
    proc = subprocess.run([sys.executable, str(BENCH), "--nanogpt", str(nano), "--text", str(text), "--rounds", "2",
                           "--max-steps", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (nano / "data" / "shakespeare_char" / "input.txt").read_text() == text.read_text()  # no download
    assert (nano / "data" / "shakespeare_char" / "train.bin").is_file()

    (table,) = markdown_tables(proc.stdout)
    assert table[0] == ["round", "nanoGPT s", "gptcli s", "gptcli ÷ nanoGPT", "nanoGPT val loss", "gptcli val loss"]
    assert [row[0] for row in table[1:]] == ["1 (nanoGPT first)", "2 (gptcli first)", "median"]
    for row in table[1:]:
        assert all(is_number(cell) for cell in row[1:]), row
        assert row[4] == "4.1970"  # nanoGPT's evaluation at the last step (not step 0's), read from its log
        assert 2.0 < float(row[5]) < 5.0  # gptcli's, from a 3-step char model (ln 65 = 4.17)
    assert re.search(r"gptcli's whole run takes \d+\.\d\d× nanoGPT's wall time .*\(the target is for the "
                     r"recipe's 2000 steps\)", proc.stdout)


def test_train_bench_appends_the_recipe_comparison(tmp_path: Path) -> None:
    nano, text = fake_nanogpt(tmp_path)
    proc = subprocess.run([sys.executable, str(BENCH.parent / "train.py"), "--quick", "--threads", "1", "--settings",
                           "shakespeare-char", "--variants", "gptcli-fp32", "--text", str(text), "--nanogpt", str(nano),
                           "--recipe-rounds", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps, tokenizing, recipe = markdown_tables(proc.stdout)
    assert steps[1][:2] == ["shakespeare-char", "gptcli-fp32"]
    assert [row[0] for row in recipe[1:]] == ["1 (nanoGPT first)", "median"]
    assert recipe[1][4] == "4.1800"  # --quick: 20 steps each
    assert "20 steps each" in proc.stdout and "- Command: `python bench/train.py --quick" in proc.stdout


@pytest.mark.parametrize("case", ["not nanoGPT", "100 steps", "no text", "other data"])
def test_recipe_bench_refuses_bad_arguments_before_running(tmp_path: Path, case: str) -> None:
    nano, text = fake_nanogpt(tmp_path)
    args, expected = ["--nanogpt", str(nano), "--text", str(text)], None
    if case == "not nanoGPT":
        args[1], expected = str(tmp_path), f"{tmp_path.resolve()} is not a nanoGPT checkout (no train.py)"
    elif case == "100 steps":
        args += ["--max-steps", "100"]
        expected = "--max-steps 100: nanoGPT's learning-rate schedule divides by zero"
    elif case == "no text":
        args[3], expected = str(tmp_path / "nope.txt"), f"--text {tmp_path / 'nope.txt'}: no such file"
    else:
        (nano / "data" / "shakespeare_char" / "input.txt").write_text("other text\n")
        expected = "input.txt is not the text of --text"
    proc = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and expected in proc.stderr.splitlines()[-1], proc.stderr
    assert not (nano / "data" / "shakespeare_char" / "train.bin").exists()  # nothing prepared, nothing run
