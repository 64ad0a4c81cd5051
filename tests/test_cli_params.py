"""`gptcli params` and `--help`: the stdout/stderr contract, JSON, and no torch import."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptcli.cli import app
from helpers import imported_modules

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_params_json_xl():
    result = run("params", "--size", "xl", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total"] == 1_557_611_200
    assert data["tied"] == 1_557_611_200 and data["untied"] == 1_638_022_400
    assert data["memory_bytes"] == {
        "float32": 6_230_444_800, "bfloat16": 3_115_222_400, "float16": 3_115_222_400, "int8": 1_557_611_200,
    }
    assert result.stderr == ""


def test_params_book_config_by_path():
    from gptcli.config import configs_dir

    result = run("params", "--config", str(configs_dir() / "book-124M.yaml"), "--json")
    data = json.loads(result.stdout)
    assert (data["total"], data["tied"], data["untied"]) == (163_009_536, 124_412_160, 163_009_536)


def test_params_table_is_plain_when_piped():
    result = run("params", "--size", "small")
    assert result.exit_code == 0
    assert "124,439,808" in result.stdout and "163,037,184" in result.stdout
    assert "\x1b[" not in result.stdout
    assert "474.70 MiB" in result.stdout


def test_params_all_lists_every_config():
    result = run("params", "--all", "--json")
    totals = {row["config"]: row["total"] for row in json.loads(result.stdout)}
    assert totals == {"124M": 124_439_808, "355M": 354_823_168, "774M": 774_030_080, "1558M": 1_557_611_200,
                      "book": 163_009_536}
    table = run("params", "--all").stdout
    assert all(name in table for name in totals)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--size", "huge"], "unknown size 'huge'"),
        (["--size", "xl", "--config", "x.yaml"], "mutually exclusive"),
        (["--config", "/nonexistent/c.yaml"], "config file not found"),
        (["--all", "--size", "xl"], "--all shows every shipped config"),
    ],
)
def test_bad_input_is_one_line_on_stderr_with_exit_2(args, message):
    result = run("params", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error: ")


def test_bad_config_file_names_file_and_key(tiny_config_file):
    path = tiny_config_file(emb_dim=30, n_heads=4)
    result = run("params", "--config", str(path))
    assert result.exit_code == 2
    assert str(path) in result.stderr and "emb_dim" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["params", "--size", "xl"], ["params", "--all", "--json"]])
def test_help_and_params_never_import_torch(args):
    stdout, modules = imported_modules(*args)
    assert stdout  # the command did run
    assert "gptcli.config" in modules or args == ["--help"]
    assert "torch" not in modules


def test_python_dash_m_and_console_script_work():
    proc = subprocess.run([sys.executable, "-m", "gptcli", "params", "--size", "xl", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["total"] == 1_557_611_200
    exe = Path(sys.executable).parent / "gptcli"  # the script next to this interpreter, not one on PATH
    assert exe.exists(), "the gptcli console script is not installed"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("gptcli ")
