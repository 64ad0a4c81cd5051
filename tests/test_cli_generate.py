"""`gptcli generate` as users run it: CliRunner for options and output, subprocesses for pipes, head, stdin, ttys and Ctrl-C."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.tokenizer import EOT_ID, encode
from helpers import read_all, subprocess_env

runner = CliRunner()
BOOK_IDS = [27018, 24086, 47843, 30961, 42348, 7267]


def gen(*args, input=None):
    return runner.invoke(app, ["generate", *args], input=input)


def gen_json(*args, input=None) -> dict:
    result = gen(*args, "--json", input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def gptcli(*args) -> list[str]:
    return [sys.executable, "-m", "gptcli", "generate", *args]


# ---------------------------------------------------------------------------------------------
# The book


def test_book_line_reproduces():
    args = ["Hello, I am", "--config", "configs/book-124M.yaml", "--weights", "random", "--seed", "123", "-n", "6"]
    result = gen(*args, "--stats")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == " Featureiman Byeswickattribute argue\n"
    stats = [line for line in result.stderr.splitlines() if line.startswith("stats: ")]
    assert len(stats) == 1 and "prefill 4 tokens" in stats[0] and "decode 5 tokens" in stats[0]


def test_book_line_json():
    data = gen_json("Hello, I am", "--size", "book", "--weights", "random", "--seed", "123", "-n", "6")
    assert data["token_ids"] == BOOK_IDS
    assert data["text"] == " Featureiman Byeswickattribute argue"
    assert data["prompt"] == "Hello, I am" and data["prompt_token_ids"] == [15496, 11, 314, 716]
    assert data["finish_reason"] == "length"
    assert (data["device"], data["dtype"], data["config"]) == ("cpu", "float32", "book")
    assert data["weights"].startswith("random")
    timings = data["timings"]
    assert set(timings) >= {"load_s", "prefill_s", "decode_s", "decode_tokens_per_s"}
    assert timings["decode_tokens"] == 5 and timings["decode_tokens_per_s"] > 0


# ---------------------------------------------------------------------------------------------
# Output contract


def test_pipe_output_is_exactly_the_continuation_and_a_newline(tiny):
    data = gen_json("Once upon a time", *tiny, "-n", "12")
    result = gen("Once upon a time", *tiny, "-n", "12")
    assert result.exit_code == 0
    assert result.stdout == data["text"] + "\n"
    assert "\x1b" not in result.stdout


def test_echo_puts_the_prompt_first(tiny):
    text = gen_json("Once upon a time", *tiny, "-n", "12")["text"]
    assert gen("Once upon a time", *tiny, "-n", "12", "--echo").stdout == "Once upon a time" + text + "\n"
    assert gen("Once upon a time", *tiny, "-n", "12", "--no-echo").stdout == text + "\n"


TRICKY = "Hi 😀 日本語のテキスト, 👍🏽 and 🇫🇷 — naïve café ✓"


@pytest.fixture
def forced_tokens(monkeypatch):
    """Make the model "choose" the tokens of a given text, to drive the real command's streaming path."""

    def force(text: str) -> list[int]:
        ids = encode(text)
        script = iter(ids)
        monkeypatch.setattr("gptcli.decoding.generate.select_next", lambda logits, options, generator: torch.tensor([next(script)]))
        return ids

    return force


def test_streamed_emoji_and_cjk_equal_the_json_text(tiny, forced_tokens):
    ids = forced_tokens(TRICKY)
    streamed = gen("Hello", *tiny, "-n", str(len(ids)))
    assert streamed.exit_code == 0, streamed.stderr
    assert streamed.stdout == TRICKY + "\n"
    ids = forced_tokens(TRICKY)
    data = gen_json("Hello", *tiny, "-n", str(len(ids)))
    assert data["text"] == TRICKY and data["token_ids"] == ids


def test_a_stop_string_in_cjk_is_cut_in_the_stream(tiny, forced_tokens):
    ids = forced_tokens(TRICKY)
    result = gen("Hello", *tiny, "-n", str(len(ids)), "--stop", "のテ")
    assert result.stdout == "Hi 😀 日本語\n"


@pytest.mark.parametrize("seed", ["1", "2"])
def test_streamed_text_equals_json_text_when_sampling_wildly(tiny, seed):
    # A high temperature on a random model draws all over the vocabulary, byte tokens included,
    # so characters split across tokens and invalid byte runs both happen.
    args = ["Hi 😀 日本語", *tiny, "-n", "60", "-t", "50", "--seed", seed, "--ignore-eos"]
    data = gen_json(*args)
    streamed = gen(*args)
    assert streamed.stdout == data["text"] + "\n"
    assert len(data["token_ids"]) == 60


def test_notes_and_stats_go_to_stderr_only(tiny):
    result = gen("Hello", *tiny, "-n", "3", "--stats", "--top-k", "5")
    assert result.exit_code == 0
    assert result.stdout.count("\n") == 1 and "stats" not in result.stdout and "note" not in result.stdout
    assert "note: --top-k and --top-p only apply when sampling" in result.stderr
    assert "stats: load" in result.stderr and "decode 2 tokens" in result.stderr


def test_sampling_is_reproducible_and_seed_dependent(tiny):
    run = lambda seed: gen_json("Hello", *tiny, "-n", "10", "-t", "1.0", "--top-p", "0.9", "--seed", seed)["token_ids"]
    assert run("5") == run("5")
    assert run("5") != run("6")


def test_top_k_1_equals_greedy(tiny):
    greedy = gen_json("Hello", *tiny, "-n", "10")["token_ids"]
    assert gen_json("Hello", *tiny, "-n", "10", "-t", "0.7", "--top-k", "1")["token_ids"] == greedy


def test_stop_string_is_not_printed_and_is_the_finish_reason(tiny):
    full = gen_json("Hello", *tiny, "-n", "20", "--ignore-eos")
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    data = gen_json("Hello", *tiny, "-n", "20", "--ignore-eos", "--stop", stop, "--stop", "never-appears")
    assert data["finish_reason"] == "stop" and data["text"] == cut and data["stop"] == [stop, "never-appears"]
    assert gen("Hello", *tiny, "-n", "20", "--ignore-eos", "--stop", stop).stdout == cut + "\n"


def test_zero_new_tokens(tiny):
    data = gen_json("Hello", *tiny, "-n", "0")
    assert (data["token_ids"], data["text"], data["finish_reason"]) == ([], "", "length")
    assert data["timings"]["decode_tokens_per_s"] is None


# ---------------------------------------------------------------------------------------------
# Prompts


def test_empty_prompt_starts_from_endoftext(tiny):
    assert gen_json("", *tiny, "-n", "2")["prompt_token_ids"] == [EOT_ID]


def test_endoftext_in_the_prompt_is_text(tiny):
    data = gen_json("a <|endoftext|> b", *tiny, "-n", "2")
    assert data["prompt_token_ids"] == encode("a <|endoftext|> b") and EOT_ID not in data["prompt_token_ids"]


@pytest.mark.parametrize("arg", [[], ["-"]])
def test_prompt_from_stdin_drops_one_trailing_newline(tiny, arg):
    expected = gen_json("Once upon a time", *tiny, "-n", "5")
    data = gen_json(*arg, *tiny, "-n", "5", input="Once upon a time\n")
    assert data["prompt"] == "Once upon a time" and data["token_ids"] == expected["token_ids"]


def test_long_prompt_is_cropped_on_the_left_with_a_note(tiny):
    prompt = " ".join(["word"] * 30)  # 30 tokens, context 16
    result = gen(prompt, *tiny, "-n", "3", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["prompt_tokens_dropped"] == 14 and len(data["prompt_token_ids"]) == 30
    assert "note: the prompt has 30 tokens, more than the context of 16; dropped the first 14" in result.stderr
    assert data["timings"]["prefill_tokens"] == 16


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing on stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["-n", "-1"], "--max-new-tokens must be 0 or more, got -1"),
        (["-n", "ten"], "--max-new-tokens expects a whole number, got 'ten'"),
        (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or more, got -0.5"),
        (["-t", "hot"], "--temperature expects a number, got 'hot'"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--top-k", "0"], "--top-k must be 1 or more, got 0"),
        (["--top-k", "2.5"], "--top-k expects a whole number, got '2.5'"),
        (["--seed", "-3"], "--seed must be 0 or more"),
        (["--stop", ""], "--stop must not be empty"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--size", "huge"], "unknown size 'huge'"),
    ],
)
def test_bad_values_are_one_line_errors(tiny, args, message):
    result = gen("Hello", *args, *(tiny if "--size" not in args else []))
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_a_clean_error(tiny):
    result = gen("Hello", *tiny, "--device", "cuda")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --device cuda: CUDA is not available") and result.stderr.count("\n") == 1


def test_non_utf8_stdin_is_an_error(tiny):
    result = gen(*tiny, input=b"caf\xe9 au lait\n")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == "error: stdin is not valid UTF-8 (byte 0xe9 at offset 3); convert it first, e.g. with iconv -t UTF-8\n"


def test_help_teaches_with_pipeline_examples():
    result = runner.invoke(app, ["generate", "--help"])
    assert result.exit_code == 0
    for example in ['echo "Once upon a time" | gptcli generate -n 20', "| jq -r .text", "--stop", "--echo"]:
        assert example in result.stdout


# ---------------------------------------------------------------------------------------------
# Real processes: pipes, head, stdin, terminals, Ctrl-C


def test_stdin_pipe_in_a_real_process(tiny):
    expected = gen_json("Once upon a time", *tiny, "-n", "8")["text"]
    proc = subprocess.run(gptcli(*tiny, "-n", "8"), input=b"Once upon a time\n", capture_output=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode("utf-8") == expected + "\n"
    assert b"\x1b" not in proc.stdout and proc.stderr == b""


def test_head_closing_the_pipe_ends_quietly(tiny):
    cmd = " ".join(f"'{a}'" for a in gptcli("Hello", *tiny, "-n", "100000", "--ignore-eos")) + " | head -c 5"
    start = time.monotonic()
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, env=subprocess_env(), timeout=120)
    assert len(proc.stdout) == 5
    assert proc.stderr == b"", proc.stderr.decode()  # no traceback, no "Exception ignored"
    assert time.monotonic() - start < 60  # it stopped at the broken pipe, not after 100000 tokens


def test_ctrl_c_keeps_the_output_and_exits_130(tiny):
    proc = subprocess.Popen(
        gptcli("Hello", *tiny, "-n", "100000", "--ignore-eos"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=subprocess_env(),
        # A shell that starts jobs in the background makes them ignore SIGINT; undo that for the child.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        first = proc.stdout.read1(64)  # generation has started once text arrives
        assert first
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert (first + rest).endswith(b"\n") and len(first + rest) > 1
    assert b"Traceback" not in stderr and b"Aborted" not in stderr
    assert b"interrupted after" in stderr


def test_no_prompt_and_a_terminal_on_stdin_prints_usage_instead_of_waiting(tiny):
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(gptcli(*tiny), stdin=terminal, capture_output=True, env=subprocess_env(), timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == 2 and proc.stdout == b""
    assert b"Usage:" in proc.stderr and b"No prompt" in proc.stderr


def test_terminal_shows_the_prompt_dimmed_then_the_continuation(tiny):
    text = gen_json("Hello there", *tiny, "-n", "6")["text"]
    out = _generate_on_a_terminal(tiny, no_color=False)
    assert "\x1b[2mHello there\x1b[0m" in out
    assert out.endswith(text + "\n")


def _generate_on_a_terminal(tiny, *, no_color: bool) -> str:
    """``gptcli generate "Hello there" -n 6`` with stdout on a pseudo-terminal; what it wrote there."""
    controller, terminal = pty.openpty()
    env = {**subprocess_env(), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    if no_color:
        env["NO_COLOR"] = "1"
    proc = subprocess.Popen(gptcli("Hello there", *tiny, "-n", "6"), stdin=subprocess.DEVNULL, stdout=terminal,
                            stderr=subprocess.PIPE, env=env)
    os.close(terminal)
    out = read_all(controller).decode("utf-8").replace("\r\n", "\n")
    os.close(controller)
    assert proc.wait(timeout=60) == 0
    return out


def test_no_color_on_a_terminal_echoes_the_prompt_plain(tiny):
    """NO_COLOR (no-color.org) asks for no styling: the echoed prompt is not dimmed either."""
    text = gen_json("Hello there", *tiny, "-n", "6")["text"]
    out = _generate_on_a_terminal(tiny, no_color=True)
    assert "\x1b[" not in out
    assert out == "Hello there" + text + "\n"


@pytest.fixture
def interrupt_after(monkeypatch):
    """Raise KeyboardInterrupt (what Ctrl-C does) when the command asks for token number n+1."""

    def arm(ids: list[int], n: int) -> None:
        script = iter(ids[:n])

        def select(logits, options, generator):
            for token in script:
                return torch.tensor([token])
            raise KeyboardInterrupt

        monkeypatch.setattr("gptcli.decoding.generate.select_next", select)

    return arm


def test_interrupt_keeps_the_streamed_text(tiny, interrupt_after):
    interrupt_after(encode(" one two three four"), 2)
    result = gen("Hello", *tiny, "-n", "50")
    assert result.exit_code == 130
    assert result.stdout == " one two\n"
    assert "note: interrupted after 2 new tokens" in result.stderr


def test_interrupt_with_json_reports_what_was_generated(tiny, interrupt_after):
    interrupt_after(encode(" one two three four"), 3)
    result = gen("Hello", *tiny, "-n", "50", "--json")
    assert result.exit_code == 130
    data = json.loads(result.stdout)
    assert data["finish_reason"] == "interrupted"
    assert data["token_ids"] == encode(" one two three") and data["text"] == " one two three"


def test_stats_survive_a_closed_pipe(tiny_config_file):
    cmd = " ".join(gptcli("Hello", "-n", "300", "--ignore-eos", "--stats", "--config", str(tiny_config_file()),
                          "--weights", "random"))
    proc = subprocess.run(f"{cmd} | head -c 5", shell=True, capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0 and len(proc.stdout) <= 5
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert sum(line.startswith("stats: ") for line in proc.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--bogus", "x"], "error: No such option: --bogus"),
        (["params", "--size"], "error: Option '--size' requires an argument."),
        (["inspect", "--top", "abc"], "error: Invalid value for '--top'"),
    ],
)
def test_option_parsing_errors_are_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True, text=True, timeout=60,
                          env=subprocess_env())
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_tables_end_quietly_in_a_closed_pipe():
    proc = subprocess.run(f"{sys.executable} -m gptcli inspect --size xl | head -n 1", shell=True,
                          capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert proc.stdout.startswith("Modules of 1558M") and len(proc.stdout.splitlines()) == 1
    assert proc.stderr == ""
