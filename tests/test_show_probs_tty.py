"""`generate --show-probs` and `score --show` in a real pseudo-terminal (pexpect): the colours appear;
in a pipe stdout is byte-identical to the run without the option; with NO_COLOR the text is unchanged."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import pexpect

# The band colours as Rich writes them on a 256-colour terminal: green, yellow, dark orange, red.
BAND_CODE = re.compile(rb"\x1b\[(32|33|38;5;208|31)m")
ANSI = re.compile(rb"\x1b\[[0-9;]*m")
FAST = ["--device", "cpu", "--dtype", "float32", "--no-tune", "--seed", "7"]


def env(no_color: bool = False) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")}
    out.update(TERM="xterm-256color", COLUMNS="200", OMP_NUM_THREADS="1")
    if no_color:
        out["NO_COLOR"] = "1"
    return out


def in_pty(args: list[str], no_color: bool = False) -> bytes:
    """Everything `gptcli ARGS` writes to its terminal (stdout and stderr), newlines as written."""
    child = pexpect.spawn(sys.executable, ["-m", "gptcli", *args], env=env(no_color), timeout=120,
                          dimensions=(50, 200))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return child.before.replace(b"\r\n", b"\n")


def in_pipe(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def gen_args(tiny):
    return ["generate", "Once upon a time", *tiny, "-n", "12", *FAST]


def test_generate_show_probs_colours_on_a_terminal_only(gen_args):
    coloured = in_pty([*gen_args, "--show-probs"])
    plain = in_pty(gen_args)
    assert BAND_CODE.search(coloured), coloured
    assert not BAND_CODE.search(plain)  # the dimmed prompt is the only style without the option
    assert b"colours: the probability the model gave each token" in ANSI.sub(b"", coloured)
    # Same text once the colours and the legend are taken away.
    text = ANSI.sub(b"", coloured).split(b"\n", 1)[1]
    assert text == ANSI.sub(b"", plain)
    # A pipe: byte for byte what the run without the option prints, and no legend.
    with_option, without = in_pipe([*gen_args, "--show-probs"]), in_pipe(gen_args)
    assert with_option.stdout == without.stdout and b"\x1b" not in with_option.stdout
    assert b"colours:" not in with_option.stderr
    # NO_COLOR: the terminal gets exactly what it gets without the option.
    assert in_pty([*gen_args, "--show-probs"], no_color=True) == in_pty(gen_args, no_color=True)


@pytest.mark.parametrize("draft", [["--lookup"], ["--draft", "int8"]])
def test_generate_show_probs_with_a_draft_colours_exactly_as_plain_decoding(gen_args, draft):
    """Each token is coloured by the model's probability at its position, which the check computed."""
    assert in_pty([*gen_args, "--show-probs", *draft]) == in_pty([*gen_args, "--show-probs"])


def test_score_show_colours_the_text_on_a_terminal(tmp_path, tiny):
    text = "The cat sat on the mat."
    (tmp_path / "t.txt").write_text(text)
    args = ["score", str(tmp_path / "t.txt"), *tiny, *FAST]
    coloured = in_pty([*args, "--show"])
    assert BAND_CODE.search(coloured), coloured
    stripped = ANSI.sub(b"", coloured)
    assert b"colours: the probability the model gave each token" in stripped
    assert text.encode() + b"\n\n" in stripped and b"perplexity" in stripped
    with_option, without = in_pipe([*args, "--show"]), in_pipe(args)
    assert with_option.stdout == without.stdout and text.encode() not in with_option.stdout
    no_color = in_pty([*args, "--show"], no_color=True)
    assert not BAND_CODE.search(no_color) and b"colours:" not in no_color
    assert no_color.startswith(text.encode() + b"\n\n")  # the text, plain, then the table
