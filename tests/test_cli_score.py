"""`gptcli score` as users run it: the two oracles of issue 11 (transformers' sliding-window perplexity and the
book's chapter 5 loss), files, stdin, --each-line, --json, terminals and every bad input."""

from __future__ import annotations

import json
import math
import os
import pty
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.tokenizer import encode
from helpers import read_all, subprocess_env

runner = CliRunner()
WORDS = ("the cat sat on a mat while every dog barked at seven small birds that flew over old red houses "
         "near quiet rivers and green hills , . ; ! ?").split()


def generated_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def run(*args, input=None):
    return runner.invoke(app, ["score", *args], input=input)


def run_json(*args, input=None) -> dict:
    result = run(*args, "--json", input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def each_line_json(*args, input: str) -> list[dict]:
    result = run(*args, "--each-line", "--json", input=input)
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Oracle 1: transformers' sliding-window perplexity ("Perplexity of fixed-length models")

N_POSITIONS = 32


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random GPT2LMHeadModel saved by transformers; gptcli loads the folder with --weights."""
    pytest.importorskip("transformers")
    from helpers import hf_tiny_gpt2

    folder = tmp_path_factory.mktemp("hf-tiny")
    model = hf_tiny_gpt2(folder, jitter=0.1, n_positions=N_POSITIONS, n_embd=64, attn_implementation="eager",
                         initializer_range=0.2)
    return model, folder


def transformers_sliding_window(model, ids: list[int], stride: int) -> tuple[float, int]:
    """transformers' documented loop, with the exact per-token sum: (mean nats, tokens scored)."""
    seq = torch.tensor([ids])
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + N_POSITIONS, len(ids))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits  # (1, L, V)
        labels = target_ids[:, 1:]  # position i predicts token i + 1
        nll_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum").item()
        n_scored += int((labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return (nll_sum / n_scored if n_scored else None), n_scored


@pytest.mark.parametrize("stride", [None, 5, N_POSITIONS])  # default (context / 2), small, disjoint windows
def test_matches_transformers_sliding_window(hf_checkpoint, tmp_path, stride):
    model, folder = hf_checkpoint
    text = generated_text(260)
    ids = encode(text)
    assert len(ids) > 8 * N_POSITIONS
    expected_loss, expected_tokens = transformers_sliding_window(model, ids, stride or N_POSITIONS // 2)
    options = ["--weights", str(folder)] + ([] if stride is None else ["--stride", str(stride)])
    data = run_json(write(tmp_path, "text.txt", text), *options)
    [result] = data["results"]
    assert data["stride"] == (stride or N_POSITIONS // 2) and data["context_length"] == N_POSITIONS
    assert result["tokens"] == expected_tokens
    assert expected_tokens == (len(ids) - 1 if stride != N_POSITIONS else len(ids) - math.ceil(len(ids) / N_POSITIONS))
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(expected_loss * expected_tokens / math.log(2) / len(text), rel=1e-4)
    assert data["total"] == {k: v for k, v in result.items() if k != "file"}


def test_each_line_matches_transformers_per_line(hf_checkpoint):
    model, folder = hf_checkpoint
    lines = [generated_text(n, seed=n) for n in (3, 40, 1, 12)]  # 40 words run past the 32-token context
    rows = each_line_json("--weights", str(folder), input="\n".join(lines) + "\n")
    for line, row in zip(lines, rows):
        expected_loss, expected_tokens = transformers_sliding_window(model, encode(line), N_POSITIONS // 2)
        assert row["tokens"] == expected_tokens
        assert row["loss"] == (None if expected_loss is None else pytest.approx(expected_loss, rel=1e-4))
    assert [row["tokens"] for row in rows][2] == 0 and min(row["tokens"] for row in rows[1:2]) > N_POSITIONS


# ---------------------------------------------------------------------------------------------
# Oracle 2: the book, chapter 5 (GPT_CONFIG_124M at context 256, torch.manual_seed(123), model.eval())

BOOK_LOSS = 10.7940
BOOK_PERPLEXITY = 48725.8


@pytest.fixture
def book_config(tmp_path) -> str:
    keys = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
            "drop_rate": 0.1, "qkv_bias": "false", "tie_weights": "false"}
    path = tmp_path / "gpt-config-124m-256.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in keys.items()))
    return str(path)


def test_the_books_loss_and_perplexity(book_config, tmp_path):
    files = [write(tmp_path, "a.txt", "every effort moves you"), write(tmp_path, "b.txt", "I really like chocolate")]
    data = run_json(*files, "--config", book_config, "--weights", "random", "--seed", "123")
    assert [r["tokens"] for r in data["results"]] == [3, 3]
    assert data["total"]["tokens"] == 6
    assert round(data["total"]["loss"], 4) == BOOK_LOSS
    assert data["total"]["perplexity"] == pytest.approx(BOOK_PERPLEXITY, abs=0.1)
    assert data["stride"] == 128 and data["context_length"] == 256 and data["bos"] is False
    assert data["weights"] == "random (seed 123)" and data["dtype"] == "float32"


# ---------------------------------------------------------------------------------------------
# --each-line


def test_each_line_equals_each_line_alone(tiny, tmp_path):
    lines = ["The sky is blue", "", generated_text(30, seed=3), "x", "   ", "Hi 😀 naïve café"]
    rows = each_line_json(*tiny, "--batch-size", "3", input="\n".join(lines) + "\n")
    assert [r["line"] for r in rows] == list(range(1, len(lines) + 1))
    assert [r["text"] for r in rows] == lines
    for line, row in zip(lines, rows):
        alone = run_json(*tiny, write(tmp_path, "line.txt", line))["results"][0]
        assert (row["tokens"], row["bytes"]) == (alone["tokens"], alone["bytes"]) == (
            max(len(encode(line)) - 1, 0), len(line.encode("utf-8")))
        if row["tokens"]:
            assert row["loss"] == pytest.approx(alone["loss"], rel=1e-5)
            assert row["bits_per_byte"] == pytest.approx(alone["bits_per_byte"], rel=1e-5)


def test_an_empty_line_has_zero_tokens_and_a_null_loss(tiny):
    rows = each_line_json(*tiny, input="Hello there\n\nHi\n")
    assert rows[1] == {"line": 2, "tokens": 0, "bytes": 0, "loss": None, "perplexity": None, "bits_per_byte": None,
                       "text": ""}
    assert rows[0]["tokens"] == len(encode("Hello there")) - 1 and rows[0]["loss"] > 0


def test_each_line_in_a_pipe_writes_one_tab_separated_line_per_input_line(tiny):
    lines = ["The sky is blue", "", "tab\there and a back\\slash"]
    result = run(*tiny, "--each-line", input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.stderr
    out = result.stdout.splitlines()
    assert len(out) == 3 and "\x1b" not in result.stdout
    rows = each_line_json(*tiny, input="\n".join(lines) + "\n")
    for line, row, printed in zip(lines, rows, out):
        fields = printed.split("\t", 6)
        assert fields[0] == str(row["line"]) and fields[1] == str(row["tokens"]) and fields[2] == str(row["bytes"])
        assert fields[3] == ("-" if row["loss"] is None else f"{row['loss']:.4f}")
        assert fields[6] == line.replace("\\", "\\\\")
    assert run(*tiny, "--each-line", input="").stdout == ""


def test_bos_scores_the_first_token_too(tiny):
    plain = each_line_json(*tiny, input="Hello there\n\n")
    bos = each_line_json(*tiny, "--bos", input="Hello there\n\n")
    assert bos[0]["tokens"] == plain[0]["tokens"] + 1 and bos[1]["tokens"] == 0
    assert bos[0]["bytes"] == plain[0]["bytes"]


# ---------------------------------------------------------------------------------------------
# Whole texts: files, stdin, totals, output


def test_files_and_stdin_and_the_token_weighted_total(tiny, tmp_path):
    texts = [generated_text(50, seed=1), generated_text(7, seed=2)]
    a, b = write(tmp_path, "a.txt", texts[0]), write(tmp_path, "b.txt", texts[1])
    data = run_json(a, "-", *tiny, input=texts[1])
    assert [r["file"] for r in data["results"]] == [a, "-"]
    alone = run_json(b, *tiny)["results"][0]
    assert run_json(*tiny, input=texts[1])["results"][0] == {**alone, "file": "-"}  # no FILE: stdin
    assert data["results"][1] == {**alone, "file": "-", "loss": pytest.approx(alone["loss"], rel=1e-6),
                                  "perplexity": pytest.approx(alone["perplexity"], rel=1e-5),
                                  "bits_per_byte": pytest.approx(alone["bits_per_byte"], rel=1e-6)}
    tokens = [r["tokens"] for r in data["results"]]
    assert data["total"]["tokens"] == sum(tokens) and data["total"]["bytes"] == sum(len(t.encode()) for t in texts)
    mean = sum(r["loss"] * r["tokens"] for r in data["results"]) / sum(tokens)
    assert data["total"]["loss"] == pytest.approx(mean, rel=1e-9)
    assert data["total"]["bits_per_byte"] == pytest.approx(mean * sum(tokens) / math.log(2) / data["total"]["bytes"])


def test_stride_and_batch_size_do_not_change_a_short_text(tiny, tmp_path):
    path = write(tmp_path, "t.txt", generated_text(8))  # fits in one window
    losses = {run_json(path, *tiny, *extra)["results"][0]["loss"] for extra in ([], ["--stride", "3"], ["-b", "1"])}
    assert max(losses) == pytest.approx(min(losses), rel=1e-6)


def test_plain_output_says_the_stride_and_where_scoring_starts(tiny, tmp_path):
    a, b = write(tmp_path, "a.txt", generated_text(40)), write(tmp_path, "b.txt", "Hello there")
    result = run(a, b, *tiny, "--stride", "4")
    assert result.exit_code == 0 and result.stderr == ""
    data = run_json(a, b, *tiny, "--stride", "4")
    lines = result.stdout.splitlines()
    assert "stride 4" in lines[1] and "windows of 16 tokens" in lines[1] and "from the second token" in lines[1]
    header = lines[2].split()
    assert header == ["file", "tokens", "bytes", "loss", "perplexity", "bits/byte"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[4:] if line and not line.startswith("-")}
    for r in data["results"]:
        assert rows[r["file"]][:3] == [str(r["tokens"]), str(r["bytes"]), f"{r['loss']:.4f}"]
    assert rows["total"][0] == str(data["total"]["tokens"])
    assert "\x1b" not in result.stdout
    assert "from the first token" in run(a, *tiny, "--bos").stdout


def test_terminal_tables_show_text_as_typed_not_as_rich_markup(monkeypatch, capsys):
    from gptcli.commands import common

    monkeypatch.setattr(common, "stdout_is_terminal", lambda: True)
    common.print_table("under [/x] weights", ["line", "text"], [["1", "a [/x] b"], ["2", "[bold]hi[/bold]"]])
    out = capsys.readouterr().out
    assert "under [/x] weights" in out and "a [/x] b" in out and "[bold]hi[/bold]" in out


def test_char_level_checkpoint_scores_with_its_own_vocabulary(tmp_path):
    from gptcli.config import GPTConfig
    from gptcli.tokenizer import CharTokenizer, to_metadata
    from gptcli.weights import random_model
    from helpers import save_checkpoint

    text = "hello world, hello moon\n"
    tokenizer = CharTokenizer.from_text(text)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, emb_dim=32, n_heads=4, n_layers=2,
                    drop_rate=0.0, qkv_bias=True, tie_weights=True, name="char")
    model = random_model(cfg, seed=5).eval()
    checkpoint = save_checkpoint(model, tmp_path / "char", metadata=to_metadata(tokenizer))
    [result] = run_json(write(tmp_path, "t.txt", text), "--weights", str(checkpoint), "--stride", "8")["results"]
    ids = torch.tensor(tokenizer.encode(text))
    nats, count = 0.0, 0
    for start in range(0, len(ids), 8):  # disjoint windows of 8 characters, by hand
        window = ids[start : start + 8]
        with torch.no_grad():
            logits = model(window[None])[0]
        nats += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    assert result["tokens"] == count == len(text) - 3  # 24 characters, 3 windows
    assert result["loss"] == pytest.approx(nats / count, rel=1e-5)

    result = run(write(tmp_path, "t.txt", text), "--weights", str(checkpoint), "--bos")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("error: --bos prepends <|endoftext|>, which this model's char tokenizer does not have "
                             "(GPT-2's BPE only)\n")
    result = run(write(tmp_path, "z.txt", "hello zoo"), "--weights", str(checkpoint))
    assert result.exit_code == 2 and result.stderr == (
        "error: characters not in this model's vocabulary of 12 (a character model reads only the characters it "
        f"was trained on): {tmp_path / 'z.txt'}: 'z'\n")
    result = run("-", "--weights", str(checkpoint), input="hello zoo")  # standard input is named as such
    assert result.exit_code == 2 and result.stderr.endswith("was trained on): stdin: 'z'\n")
    # Several files: every file's unknown characters in the one line, not just the first file's first.
    files = [write(tmp_path, "ok.txt", text), write(tmp_path, "z.txt", "hello zoo"), write(tmp_path, "q.txt", "QxQ")]
    result = run(*files, "--weights", str(checkpoint))
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.endswith(f"{files[1]}: 'z'; {files[2]}: 'Q', 'x'\n")
    # A one-character text scores nothing; the note does not suggest --bos, which char models refuse.
    result = run(write(tmp_path, "one.txt", "h"), "--weights", str(checkpoint))
    assert result.exit_code == 0 and "note: " in result.stderr and "--bos" not in result.stderr + result.stdout


def test_help_does_not_import_torch():
    from helpers import imported_modules

    stdout, modules = imported_modules("score", "--help")
    assert "Usage: gptcli score" in stdout and "gptcli.commands.score" in modules
    assert "torch" not in modules


def test_help_lists_the_command_and_teaches_with_examples():
    assert "score" in runner.invoke(app, ["--help"]).stdout
    result = runner.invoke(app, ["score", "--help"])
    assert result.exit_code == 0
    for example in ["gptcli score story.txt", "--each-line --json < lines.txt | jq", "--stride", "--bos"]:
        assert example in result.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing on stdout


def test_an_empty_file_is_a_result_with_zero_tokens(tiny, tmp_path):
    empty = write(tmp_path, "empty.txt", "")
    result = run(empty, *tiny)
    assert result.exit_code == 0
    assert result.stderr == f"note: {empty}: 0 tokens scored (it is empty)\n"
    [row] = [line.split() for line in result.stdout.splitlines() if line.startswith(empty)]
    assert row == [empty, "0", "0", "-", "-", "-"]
    data = run_json(empty, *tiny)
    assert data["results"][0] == {"file": empty, "tokens": 0, "bytes": 0, "loss": None, "perplexity": None,
                                  "bits_per_byte": None}
    assert data["total"]["tokens"] == 0 and data["total"]["loss"] is None


@pytest.mark.parametrize(
    "args,message",
    [
        (["--stride", "0"], "error: --stride must be 1 or more, got 0"),
        (["--stride", "-4"], "error: --stride must be 1 or more, got -4"),
        (["--stride", "17"], "error: --stride 17 is above the model's context of 16 tokens; use at most 16"),
        (["--stride", "half"], "error: --stride expects a whole number, got 'half'"),
        (["--batch-size", "0"], "error: --batch-size must be 1 or more, got 0"),
        (["--seed", "-1"], "error: --seed must be 0 or more, got -1"),
        (["--device", "tpu"], "error: unknown device 'tpu'"),
        (["--bos", "--each-line"], "error: --each-line reads the lines from stdin"),
        (["-", "-"], "error: '-' (stdin) can be named once"),
    ],
)
def test_bad_options_are_one_line_errors(tiny, tmp_path, args, message):
    result = run(write(tmp_path, "t.txt", "Hello there"), *args, *tiny, input="Hi")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_bad_files_are_one_line_errors(tiny, tmp_path):
    bad = write(tmp_path, "latin1.txt", b"caf\xc3\xa9 or caf\xe9")
    missing = str(tmp_path / "missing.txt")
    cases = {
        bad: f"error: {bad} is not valid UTF-8 (byte 0xe9 at offset 12); convert it first, e.g. with iconv -t UTF-8",
        missing: f"error: {missing}: no such file",
        str(tmp_path): f"error: {tmp_path}: is a folder, not a file",
    }
    good = write(tmp_path, "good.txt", "Hello")
    for path, message in cases.items():
        result = run(good, path, *tiny)
        assert result.exit_code == 2 and result.stdout == "", path
        assert result.stderr == message + "\n"


def test_non_utf8_stdin_is_one_line(tiny):
    for extra in ([], ["--each-line"]):
        result = run(*tiny, *extra, input=b"ok\ncaf\xe9\n")
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr == ("error: stdin is not valid UTF-8 (byte 0xe9 at offset 6); convert it first, e.g. with "
                                 "iconv -t UTF-8\n")


# ---------------------------------------------------------------------------------------------
# Real processes: pipes and terminals


def gptcli(*args) -> list[str]:
    return [sys.executable, "-m", "gptcli", "score", *args]


def test_a_pipe_gets_plain_columns_and_no_progress_bar(tiny, tmp_path):
    path = write(tmp_path, "long.txt", generated_text(200))
    proc = subprocess.run(gptcli(*tiny), stdin=open(path, "rb"), capture_output=True, env=subprocess_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b"" and b"\x1b" not in proc.stdout
    assert proc.stdout.decode().splitlines()[4].split()[0] == "-"


@pytest.mark.parametrize("words,shows_bar", [(200, True), (3, False)])
def test_progress_bar_on_a_terminal_for_long_inputs_only(tiny, tmp_path, words, shows_bar):
    path = write(tmp_path, "text.txt", generated_text(words))
    controller, terminal = pty.openpty()
    env = {**subprocess_env(), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    try:
        proc = subprocess.Popen(gptcli(path, *tiny, "--json", "-b", "1"), stdout=subprocess.PIPE, stderr=terminal,
                                env=env)
        os.close(terminal)
        stderr = read_all(controller)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        os.close(controller)
    assert proc.returncode == 0
    assert json.loads(stdout)["results"][0]["tokens"] > 0  # stdout stays plain JSON
    assert (b"scoring" in stderr) is shows_bar, stderr


@pytest.mark.parametrize("seed,message", [(str(2**64), "--seed must be at most 2**64 - 1"),
                                          ("-1", "--seed must be 0 or more")])
def test_a_seed_out_of_range_is_one_line(tiny, tmp_path, seed, message):
    result = run(write(tmp_path, "t.txt", "Hello there"), *tiny, "--seed", seed)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
