"""What a new user hits first (issue 12): offline weights, stderr noise, help, completion, configs, colour,
--stats after a closed pipe, --weights paths, params without a value."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gptcli.cli import app

runner = CliRunner()


def cli(*args: str, env: dict | None = None, input: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`gptcli ARGS` in a fresh process, as a user runs it (the console script's main())."""
    return subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True, text=True, input=input,
                          timeout=timeout, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------
# Offline, --weights auto is an error, not silent noise


@pytest.fixture
def no_model_built(monkeypatch):
    import gptcli.weights as weights_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(weights_module, "random_model", refuse)
    monkeypatch.setattr(weights_module, "load_checkpoint", refuse)


@pytest.mark.parametrize("command", [
    ["generate", "Hello, I am"],
    ["generate", "Hello, I am", "--size", "xl"],
    ["inspect", "--prompt", "Hello, I am"],
])
def test_auto_offline_with_nothing_cached_exits_2_before_building_a_model(command, no_model_built):
    result = runner.invoke(app, command)  # the tests run with HF_HUB_OFFLINE=1 and an empty cache
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no GPT-2 "), result.stderr
    assert "--weights PATH" in lines[0] and "--weights random" in lines[0] and "gptcli train" in lines[0]


def test_configs_without_a_release_still_run_random_with_a_note(tiny_config_file):
    result = runner.invoke(app, ["generate", "Hi", "--config", str(tiny_config_file()), "-n", "2"])
    assert result.exit_code == 0, result.stderr
    assert "note: no released weights for config 'tiny-0': using untrained random weights" in result.stderr


# ---------------------------------------------------------------------------------------------
# stderr holds our own lines only; the tokenizer error says what to fetch


def test_numpy_is_a_dependency():
    from importlib.metadata import requires

    assert any(r.split(">")[0].split("=")[0].strip().lower() == "numpy" for r in requires("gptcli"))


def test_a_generate_run_writes_only_our_lines_on_stderr(tiny_config_file):
    proc = cli("generate", "Hello", "--config", str(tiny_config_file()), "-n", "3", "--stats", "--top-k", "5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith(("note: ", "stats: ")) for line in lines), proc.stderr  # no torch warning


def test_missing_tokenizer_names_the_file_and_how_to_get_it(monkeypatch, tmp_path):
    import tiktoken.load
    import tiktoken.registry

    from gptcli.tokenizer import CACHE_FILE, get_tokenizer

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # tiktoken's own in-process cache
    get_tokenizer.cache_clear()
    try:
        result = runner.invoke(app, ["generate", "Hi", "--weights", "random"])
    finally:
        get_tokenizer.cache_clear()
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load GPT-2's tokenizer (r50k_base)")
    assert f"{CACHE_FILE} (835,554 bytes)" in lines[0] and str(tmp_path / "empty") in lines[0]
    assert "python -c \"import tiktoken; tiktoken.get_encoding('r50k_base')\"" in lines[0]


# ---------------------------------------------------------------------------------------------
# inspect --prompt: the answer first


def test_inspect_prompt_prints_the_next_token_table_alone(tiny_config_file):
    config = str(tiny_config_file())
    result = runner.invoke(app, ["inspect", "--config", config, "--prompt", "Hello", "--top", "3"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("Next token after 'Hello' (1 tokens")
    assert len(lines) == 1 + 2 + 3  # title, header and rule, 3 rows
    assert "Modules of" not in result.stdout and "FLOPs" not in result.stdout


@pytest.mark.parametrize("ask", [["--details"], ["--depth", "1"]])
def test_inspect_prompt_with_details_puts_the_table_first(tiny_config_file, ask):
    result = runner.invoke(app, ["inspect", "--config", str(tiny_config_file()), "--prompt", "Hello", "--top", "3", *ask])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Next token after 'Hello'")
    assert result.stdout.index("Next token after") < result.stdout.index("Modules of") < result.stdout.index("FLOPs")


# ---------------------------------------------------------------------------------------------
# Configs: the book's 7 keys, an empty file


BOOK_KEYS = ("vocab_size: 50257\ncontext_length: 1024\nemb_dim: 768\nn_heads: 12\nn_layers: 12\n"
             "drop_rate: 0.1\nqkv_bias: false\n")


def test_a_config_with_the_books_seven_keys_has_an_untied_head(tmp_path):
    path = tmp_path / "book.yaml"
    path.write_text(BOOK_KEYS)
    result = runner.invoke(app, ["params", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tie_weights"] is False and data["total"] == 163_009_536  # the book's count


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_config_file_says_so(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["params", "--config", str(path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: {path}: the file is empty (no config keys); see configs/ for examples\n"


# ---------------------------------------------------------------------------------------------
# FORCE_COLOR in a pipe, as Rich reads it


def colour_env(**values: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return {**env, **values}


def run_env(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True, text=True, timeout=120, env=env)


def test_force_color_styles_tables_in_a_pipe():
    plain = run_env(["params", "--size", "xl"], colour_env())
    forced = run_env(["params", "--size", "xl"], colour_env(FORCE_COLOR="1"))
    assert plain.returncode == forced.returncode == 0
    assert "\x1b[" not in plain.stdout and "┃" not in plain.stdout
    assert "\x1b[" in forced.stdout and "┃" in forced.stdout  # Rich's colours and table, as on a terminal
    empty = run_env(["params", "--size", "xl"], colour_env(FORCE_COLOR=""))  # set but empty: not forced
    assert empty.stdout == plain.stdout
    colour = re.compile(r"\x1b\[[0-9;]*3[0-9]m")  # an SGR foreground colour
    tree = ["inspect", "--size", "small", "--depth", "1"]
    assert colour.search(run_env(tree, colour_env(FORCE_COLOR="1")).stdout)  # the tree's cyan and green
    no_color = run_env(tree, colour_env(FORCE_COLOR="1", NO_COLOR="1")).stdout
    assert "└── " in no_color and "┃" in no_color and not colour.search(no_color)  # Rich's layout, no colours


def test_force_color_dims_an_echoed_prompt_but_does_not_add_one(tiny_config_file):
    args = ["generate", "Hello", "--config", str(tiny_config_file()), "--weights", "random", "-n", "2"]
    forced = run_env(args, colour_env(FORCE_COLOR="1"))
    plain = run_env(args, colour_env())
    assert forced.stdout == plain.stdout and not forced.stdout.startswith("Hello")  # pipe content unchanged
    echoed = run_env([*args, "--echo"], colour_env(FORCE_COLOR="1"))
    assert echoed.stdout.startswith("\x1b[2mHello\x1b[0m")


# ---------------------------------------------------------------------------------------------
# --stats after `| head` names why generation ended


def shell(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120, env={**os.environ})


def test_stats_after_a_closed_pipe_say_closed(tiny_config_file):
    gptcli = f"{sys.executable} -m gptcli generate Hello --config {tiny_config_file()} --weights random"
    proc = shell(f"{gptcli} -n 3000 --ignore-eos --stats | head -c 5")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    stats = [line for line in proc.stderr.splitlines() if line.startswith("stats: ")]
    assert len(stats) == 1 and stats[0].endswith(", finish closed"), proc.stderr


def test_each_line_stats_after_a_closed_pipe(tiny_config_file):
    gptcli = f"{sys.executable} -m gptcli generate --each-line --config {tiny_config_file()} --weights random"
    proc = shell(f"seq 1 400 | {gptcli} -n 5 --batch-size 1 --stats | head -n 1")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr
    stats = [line for line in proc.stderr.splitlines() if line.startswith("stats: ")]
    assert len(stats) == 1 and re.search(r"finish closed \(stdout closed after \d+ of 400 prompts\)$", stats[0]), \
        proc.stderr


# ---------------------------------------------------------------------------------------------
# --weights PATH that is not there: the path as typed, folder or Hub id


@pytest.mark.parametrize("spec,expected", [
    ("./my-gpt2", "./my-gpt2: no such file or folder"),
    ("./my-gpt2/", "./my-gpt2/: no such folder"),
    ("./my-gpt2/model.safetensors", "./my-gpt2/model.safetensors: no such file"),
    ("my-gpt2", "my-gpt2: no such file or folder, and not a Hugging Face Hub id (those have the form owner/name, "
                "e.g. openai-community/gpt2)"),
])
def test_missing_weights_path_is_reported_as_typed(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["generate", "Hi"], ["inspect"]):
        result = runner.invoke(app, [*command, "--weights", spec])
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr == f"error: {expected}\n"


def test_a_missing_folder_shaped_like_a_hub_id_says_neither_was_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", "Hi", "--weights", "runs/x"])  # offline in the tests
    assert result.exit_code == 2
    assert result.stderr.startswith("error: runs/x: no such local file or folder; as a Hugging Face Hub id, runs/x is "
                                    "not in the Hugging Face cache")


# ---------------------------------------------------------------------------------------------
# Help: no <bool>/<str> after flags, examples on one line each, one command's help pinned


PARAMS_HELP = """\
Usage: gptcli params [OPTIONS]

  Count a model's parameters and weight memory, exactly and instantly.

  Pure arithmetic on the config: no model is built and torch is not imported.

  Examples:

    gptcli params --size xl
    gptcli params --config configs/book-124M.yaml   # the book's 163,009,536
    gptcli params --all --json | jq '.[] | {config, total}'

Options:
  -s, --size SIZE    Model size: 124M/small, 355M/medium, 774M/large, 1558M/xl
                     (case-insensitive), or 'book' for the book's
                     GPT_CONFIG_124M. Default 124M.
  -c, --config FILE  Your own YAML config with the book's keys (vocab_size,
                     context_length, emb_dim, n_heads, n_layers, drop_rate,
                     qkv_bias) plus tie_weights (default false: the book's
                     separate output head), bias (default true) and gelu
                     (tanh, the default, or erf: nanoGPT's exact GELU). Not
                     with --size.
  --all              One table for every shipped config.
  --json             Print one JSON object on stdout instead of tables.
  -h, --help         Show this message and exit.
"""


def test_params_help_is_pinned():
    proc = cli("params", "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == PARAMS_HELP


def _example_lines(command) -> list[str]:
    doc = command.__doc__
    return [line.strip() for line in doc[doc.index("Examples:"):].splitlines()
            if line.strip().startswith(("gptcli ", "echo ", "printf "))]


@pytest.mark.parametrize("name", ["generate", "inspect", "params", "train", "score"])
def test_help_shows_no_python_types_and_keeps_each_example_on_one_line(name):
    import gptcli.commands.generate
    import gptcli.commands.inspect
    import gptcli.commands.params
    import gptcli.commands.score
    import gptcli.commands.train

    command = getattr(getattr(gptcli.commands, name), name)
    for columns in ("60", "200"):
        proc = cli(name, "--help", env={"COLUMNS": columns})
        assert proc.returncode == 0
        assert not re.search(r"<(bool|str|int|float|path)>", proc.stdout), proc.stdout
        lines = [line.strip() for line in proc.stdout.splitlines()]
        examples = _example_lines(command)
        assert len(examples) >= 3
        for example in examples:
            assert example.replace("\\\\", "\\") in lines, (columns, example)  # printed whole, never wrapped


def test_a_missing_option_value_points_at_the_commands_help():
    proc = cli("params", "--size")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: Option '--size' requires an argument. (see 'gptcli params --help')\n"


def test_help_piped_into_head_ends_quietly():
    proc = shell(f"{sys.executable} -m gptcli | head -c 10")
    assert proc.returncode == 0 and proc.stdout == "Usage: gpt" and proc.stderr == ""


# ---------------------------------------------------------------------------------------------
# Shell completion


def complete(shell_name: str, words: str) -> list[str]:
    env = {"_GPTCLI_COMPLETE": f"complete_{shell_name}"}
    if shell_name == "bash":
        env.update(COMP_WORDS=words, COMP_CWORD=str(len(words.split(" ")) - 1))
    else:
        env.update(_TYPER_COMPLETE_ARGS=words)
        if shell_name == "fish":
            env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"
    proc = cli(env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("shell_name", ["bash", "zsh", "fish"])
def test_completion_of_sizes_devices_and_dtypes(shell_name):
    sizes = complete(shell_name, "gptcli generate --size ")
    for size in ("124M", "small", "355M", "774M", "1558M", "xl", "book"):
        assert size in sizes
    assert "bfloat16" in complete(shell_name, "gptcli generate --dtype b")
    assert "float32" not in complete(shell_name, "gptcli generate --dtype b")
    devices = complete(shell_name, "gptcli inspect --device c")
    assert "cpu" in devices and "cuda" in devices and "mps" not in devices
    assert "generate" in complete(shell_name, "gptcli gen")


def test_show_completion_prints_a_script_for_the_shell():
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m gptcli --show-completion"], capture_output=True,
                          text=True, timeout=60)  # run from bash: bash's script (the shell is detected)
    assert proc.returncode == 0, proc.stderr
    assert "_GPTCLI_COMPLETE=complete_bash" in proc.stdout and "complete -o default -F" in proc.stdout
