"""`gptcli generate --interactive` in a real pseudo-terminal (pexpect): two turns, the second running
only the unseen tokens (--stats), greedy text equal to `generate` on the concatenated text, a Ctrl-C
mid-continuation that keeps the session, readline history, /set, /reset, /tokens and Ctrl-D.

A character-level checkpoint makes the token counts exact: one character, one token."""

from __future__ import annotations

import json
import re

import pexpect
import pytest
from typer.testing import CliRunner

from gptcli.cli import app
from helpers import InteractiveTerminal, lively_char_model

CHARS = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz .,")))
FAST = ["--device", "cpu", "--dtype", "float32", "--no-tune"]


@pytest.fixture
def char_checkpoint(tmp_path):
    from gptcli.tokenizer import CharTokenizer, to_metadata
    from helpers import save_checkpoint

    return save_checkpoint(lively_char_model(CHARS, 48), tmp_path / "char", metadata=to_metadata(CharTokenizer(CHARS)))


def generated(checkpoint, prompt: str, n: int) -> str:
    result = CliRunner().invoke(app, ["generate", prompt, "--weights", str(checkpoint), "-n", str(n), "--json", *FAST])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["text"]


class Session(InteractiveTerminal):
    def __init__(self, checkpoint, tmp_path):
        super().__init__(checkpoint, tmp_path, "-n", "8", "--stats")

    def text(self) -> str:
        out = self.send("/text")
        return out.split("/text\n", 1)[1].rsplit("\n", 1)[0]

    @staticmethod
    def turn_stats(out: str) -> tuple[int, int]:
        m = re.search(r"stats: turn \d+: prefill (\d+) tokens? \((\d+) cached\)", out)
        assert m, out
        return int(m.group(1)), int(m.group(2))


def test_interactive_session_in_a_terminal(char_checkpoint, tmp_path):
    s = Session(char_checkpoint, tmp_path)
    out = s.send("hello")
    assert s.turn_stats(out) == (5, 0)
    text1 = s.text()
    assert text1 == "hello" + generated(char_checkpoint, "hello", 8)

    out = s.send(" and then")
    # Only what was typed (9 characters) and the last character picked in turn 1, never fed until now.
    assert s.turn_stats(out) == (10, len(text1) - 1)
    text2 = s.text()
    assert text2 == text1 + " and then" + generated(char_checkpoint, text1 + " and then", 8)

    # Ctrl-C in the middle of a long continuation: it stops, the session goes on.
    s.send("/set max_new_tokens 1000000")
    s.child.sendline(" more")
    s.child.expect(r"[a-z .,]{40}")  # the model is writing
    s.child.send("QZ")  # typed while it writes: not echoed into its text (the model writes no capitals)
    s.child.expect(r"[a-z .,]{40}")  # still writing
    s.child.sendintr()
    out = s.prompt()
    assert "stopped; what was written stays in the text" in out
    assert "QZ" not in out and "QZ" not in s.child.before
    # The turn's own prefill (" more" and turn 2's last character), not a later slide past the window.
    assert s.turn_stats(out) == (6, len(text2) - 1) and "finish interrupted" in out
    assert "top_k none, top_p none" in s.send("/settings")
    text3 = s.text()
    assert text3.startswith(text2 + " more") and len(text3) >= len(text2) + 5 + 40  # past the context of 48
    out = s.send("/tokens")
    assert f"{len(text3)} tokens in the running text (context 48" in out

    # History: the up arrow brings back the last line.
    s.child.send("\x1b[A")
    s.child.send("\r")
    assert f"{len(text3)} tokens in the running text" in s.prompt()

    s.send("/set n 8")
    out = s.send("/reset")
    assert "the running text is empty again" in out
    assert "0 tokens in the running text" in s.send("/tokens")
    out = s.send("hello")
    assert s.text() == text1  # greedy: the same first turn again

    assert "unknown command /nope" in s.send("/nope")
    assert "error: character 'X' is not in this model's vocabulary" in s.send("X")
    assert s.text() == text1  # unchanged
    s.child.send("half a line")  # Ctrl-C while typing clears the line, as in a shell
    s.child.expect_exact("half a line")  # readline has it (echoed)
    s.child.sendintr()
    s.prompt()
    assert s.text() == text1
    assert "error: temperature cannot be 'hot'" in s.send("/set temperature hot")
    s.child.sendeof()
    s.child.expect(pexpect.EOF)
    s.child.close()
    assert s.child.exitstatus == 0
