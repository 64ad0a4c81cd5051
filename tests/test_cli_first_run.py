"""What a new user hits first (issue 12): offline weights, stderr noise, help, completion, configs, colour,
--stats after a closed pipe, --weights paths, params without a value."""

from __future__ import annotations

import json
import os
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
