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
