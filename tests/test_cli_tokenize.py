"""`gptcli tokenize`: pieces, offsets, the --decode round trip for any text, a run's own tokenizer, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.tokenizer import encode
from helpers import imported_modules

runner = CliRunner()

# Emoji (several tokens, the first ending inside the character), a ZWJ family, combining marks,
# a character outside the BMP that BPE splits into single bytes, CRLF, Thai, the special token's text.
HARD_TEXTS = [
    "Hello, world", "🫠", "x 👨‍👩‍👧 y", "e\u0301 n\u0303 a\u0308\u0304", "𠜎𠜱𠝹", "line\r\nnext\n", "ภาษาไทย",
    "<|endoftext|> is text here", "  leading and trailing  ", "tab\there", "",
]


def tok(*args, input=None):
    return runner.invoke(app, ["tokenize", *args], input=input)


def tok_json(*args, input=None) -> dict:
    result = tok("--json", *args, input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def round_trip(text: str) -> None:
    # '-' is stdin, as in every command (and stdin loses one trailing newline): that one goes through stdin.
    data = tok_json("--", text) if text != "-" else tok_json(input="-\n")
    assert data["ids"] == encode(text) and data["count"] == len(data["ids"])
    assert data["characters"] == len(text) and data["bytes"] == len(text.encode("utf-8"))
    tokens = data["tokens"]
    assert b"".join(bytes(t["bytes"]) for t in tokens) == text.encode("utf-8")
    # Offsets tile the text: each token covers the characters it completes.
    assert "".join(text[t["start"]:t["end"]] for t in tokens) == text
    assert all(t["text"] is None or t["text"] == bytes(t["bytes"]).decode() for t in tokens)
    back = tok_json("--decode", json.dumps(data["ids"]))  # a JSON list is fine
    assert back["text"] == text and back["ids"] == data["ids"]
    if data["ids"]:
        plain = tok("--decode", *map(str, data["ids"]))  # ids as words
        assert plain.exit_code == 0 and plain.stdout_bytes == (text + "\n").encode()


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_round_trip_of_hard_texts(text):
    round_trip(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_round_trip_of_any_text(text):
    round_trip(text)


def test_pieces_show_spaces_newlines_and_partial_characters():
    result = tok("Hi there\n🫠")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "6 tokens (gpt2) for 10 characters, 13 bytes"
    rows = [line.split() for line in lines[3:] if line.strip()]
    assert rows[0] == ["0", str(encode("Hi")[0]), "Hi"]
    assert rows[1][2] == "␣there" and rows[2][2] == "\\n"
    assert [r[2] for r in rows[3:]] == ["<0xF0><0x9F>", "<0xAB>", "<0xA0>"]  # one emoji, three tokens, as bytes


def test_stdin_count_and_text_json():
    assert tok("--count", input="Hello, world\n").stdout == "3\n"  # one trailing newline dropped
    data = tok_json("-", input="Hello 🫠")
    assert data["tokens"][-1]["text"] is None and data["tokens"][-1]["end"] == len("Hello 🫠")
    assert data["tokenizer"] == "gpt2"
    counted = tok_json("--count", "-", input="Hello 🫠")  # --count --json: the figures without the tokens
    assert counted == {"count": len(data["ids"]), "characters": 7, "bytes": len("Hello 🫠".encode()), "tokenizer": "gpt2"}


@pytest.mark.parametrize("args, message", [
    (["--decode", "50257"], "error: token id 50257 is outside this vocabulary of 50257 (0 to 50256)\n"),
    (["--decode", "12", "x"], "error: --decode expects token ids (whole numbers), got 'x'\n"),
    (["two", "words"], "error: give the text as one argument (quote it): got 2 arguments\n"),
    (["--weights", "nowhere/model.safetensors", "hi"], "error: nowhere/model.safetensors: no such file\n"),
    (["a\udcffb"], "error: the text is not valid UTF-8 (character 1); convert it first, e.g. with iconv -t UTF-8\n"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = tok(*args)
    assert result.exit_code == 2 and result.stderr == message and result.stdout == ""


@pytest.fixture
def char_run(tmp_path):
    """A run folder of a character model, as `gptcli train --tokenizer char` writes one."""
    from gptcli.config import GPTConfig
    from gptcli.tokenizer import CharTokenizer, to_metadata
    from gptcli.weights import random_model
    from helpers import save_checkpoint

    tokenizer = CharTokenizer.from_text("abc déf\n")
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, emb_dim=16, n_heads=2, n_layers=1,
                    drop_rate=0.0, qkv_bias=True, tie_weights=True, name="char")
    save_checkpoint(random_model(cfg, seed=1), tmp_path / "run", metadata=to_metadata(tokenizer))
    return tmp_path / "run"


def test_a_runs_own_character_tokenizer(char_run):
    data = tok_json("--weights", str(char_run), "déf ab")
    assert data["tokenizer"] == "char" and data["ids"] == [5, 7, 6, 1, 2, 3]  # sorted: \n, space, a, b, c, d, f, é
    assert tok_json("--weights", str(char_run), "--decode", "7 5 4")["text"] == "édc"
    result = tok("--weights", str(char_run), "xyz")
    assert result.exit_code == 2 and "characters 'x', 'y', 'z' are not in this model's vocabulary of 8 characters" in result.stderr
    result = tok("--weights", str(char_run), "--decode", "8")
    assert result.exit_code == 2 and "outside this vocabulary of 8" in result.stderr


@pytest.mark.parametrize("extra", [[], ["--weights", "RUN"], ["--decode", "15496", "11"]])
def test_tokenize_never_imports_torch(extra, char_run):
    args = ["tokenize", *[str(char_run) if a == "RUN" else a for a in extra]]
    if "--decode" not in extra:
        args.append("abc")
    stdout, modules = imported_modules(*args)
    assert stdout.strip(), "tokenize printed nothing"
    assert "torch" not in modules and "numpy" not in modules


def test_console_script_decodes_in_a_pipe():
    proc = subprocess.run([sys.executable, "-m", "gptcli", "tokenize", "--decode", "-"], input="[15496, 11, 314]",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "Hello, I\n", proc.stderr
