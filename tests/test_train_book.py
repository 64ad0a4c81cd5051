"""Chapter 5 of the book, exactly: `gptcli train the-verdict.txt --recipe book-ch05` prints the book's
figures. Needs ../shared/data (GPTCLI_DATA_DIR, which .ci/run sets).

The figures below are the book's own (chapter 5, listing 5.3's output). They hold on an Intel Xeon
(checked when the issue was filed) and on this project's AMD EPYC CI machine, with one or two torch
threads: MKL's float32 GEMM gives the same sums for these shapes on both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptcli.cli import app

DATA = os.environ.get("GPTCLI_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA, reason="GPTCLI_DATA_DIR is unset: it names the folder holding "
                                "the-verdict.txt (../shared/data; .ci/run sets it)")

BOOK_LINES = [
    "Ep 1 (Step 000000): Train loss 9.781, Val loss 9.933",
    "Ep 1 (Step 000005): Train loss 8.111, Val loss 8.339",
    "Ep 2 (Step 000010): Train loss 6.661, Val loss 7.048",
    "Ep 2 (Step 000015): Train loss 5.961, Val loss 6.616",
]
# "Every effort moves you,,,,,,,,,,,,." then newlines (the book prints them as spaces).
FIRST_SAMPLE = [11] * 12 + [13] + [198] * 37
# "Every effort moves you, and, and, ... and,, and, and,"
SECOND_SAMPLE = [11, 290] * 22 + [11, 11, 290, 11, 290, 11]


def test_book_ch05_prints_the_books_figures_through_epoch_2(tmp_path):
    """The terminal's lines (--plain: what a terminal shows, in a pipe) are the book's, in the book's
    order: evaluations every 5 steps and a greedy sample after each epoch. The evaluation after the
    last step (17, off the schedule) is in the JSON log and the summary, not between the book's lines."""
    from gptcli.commands.train import book_line, sample_line
    from gptcli.tokenizer import decode, encode

    verdict = Path(DATA) / "the-verdict.txt"
    out = tmp_path / "v"
    result = CliRunner().invoke(app, ["train", str(verdict), "--recipe", "book-ch05", "--out", str(out),
                                      "--max-steps", "18", "--plain"])
    assert result.exit_code == 0, result.stderr
    prompt = encode("Every effort moves you")
    first, second = (decode(prompt + ids).replace("\n", " ") for ids in (FIRST_SAMPLE, SECOND_SAMPLE))
    assert result.stdout.splitlines() == [*BOOK_LINES[:2], first, *BOOK_LINES[2:], second]
    assert first == "Every effort moves you,,,,,,,,,,,,." + " " * 37
    assert "note: sample after step 8 (greedy):" in result.stderr  # the label is a note, off the book's lines
    assert "; final train loss " in result.stderr

    events = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    start = events[0]
    assert (start["train_tokens"], start["val_tokens"], start["steps_per_epoch"]) == (4612, 534, 9)
    assert start["params"] == 162_419_712  # GPT_CONFIG_124M at context 256: 163,009,536 - 768 * 768
    evals = [e for e in events if e["event"] == "eval"]
    assert [book_line(e) for e in evals if not e["final"]] == BOOK_LINES
    assert [e["step"] for e in evals if e["final"]] == [17]
    samples = [e for e in events if e["event"] == "sample"]
    assert [s["token_ids"] for s in samples] == [FIRST_SAMPLE, SECOND_SAMPLE]
    assert [sample_line(s, "gpt2") for s in samples] == [first, second]
    assert [s["step"] for s in samples] == [8, 17]  # after each epoch of 9 steps
