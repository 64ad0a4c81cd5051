"""--threads and the default thread count (gptcli.devices.configure_threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from gptcli import devices
from gptcli.cli import app
from gptcli.devices import CpuSample, busy_cores_of_others, configure_threads, parse_proc_stat, threads_for
from gptcli.errors import UserError

runner = CliRunner()

PROC_STAT = """cpu  900 0 300 5000 100 0 0 0 0 0
cpu0 400 0 100 2000 50 0 0 0 0 0
cpu1 300 0 100 2500 50 0 0 0 0 0
cpu2 200 0 100 500 0 0 0 100 0 0
intr 12345
ctxt 999
"""


def test_threads_for_leaves_the_cores_others_keep_busy():
    assert threads_for(2, 0.0) == 2
    assert threads_for(2, 0.4) == 2  # a core half used or less still counts as ours
    assert threads_for(2, 0.6) == 1
    assert threads_for(2, 2.0) == 1 and threads_for(1, 5.0) == 1  # never fewer than one
    assert threads_for(16, 3.2) == 13


def test_proc_stat_counts_the_cpus_in_the_mask():
    # busy = user + nice + system + irq + softirq + steal; idle and iowait are not busy.
    busy, total = parse_proc_stat(PROC_STAT, {0, 1})
    assert (busy, total) == (400 + 100 + 300 + 100, 2550 + 2950)
    busy, total = parse_proc_stat(PROC_STAT, {2})
    assert (busy, total) == (200 + 100 + 100, 900)  # steal is busy: the core went to someone else
    assert parse_proc_stat(PROC_STAT, None)[1] == 2550 + 2950 + 900  # the "cpu " total line is skipped


def test_busy_cores_of_others_subtracts_our_own_cpu_time(monkeypatch):
    monkeypatch.setattr(devices, "available_cores", lambda: 2)
    start = CpuSample(wall=0.0, busy=0, total=0, own=0.0)
    # Over 1 s both cores were busy 75% of the time (1.5 cores), 0.5 s of which was us.
    end = CpuSample(wall=1.0, busy=150, total=200, own=0.5)
    assert busy_cores_of_others(start, end) == pytest.approx(1.0)
    assert busy_cores_of_others(start, CpuSample(1.0, 10, 200, 0.5)) == 0.0  # never below zero


@pytest.mark.skipif(devices.cpu_sample() is None, reason="needs /proc/stat")
def test_a_busy_process_is_seen():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        start = devices.cpu_sample()
        time.sleep(0.5)
        seen = busy_cores_of_others(start, devices.cpu_sample())
    finally:
        busy.kill()
        busy.wait()
    assert seen >= 0.5  # at least our busy child (other load only adds to it)


def test_configure_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads(None) == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(devices, "available_cores", lambda: 4)
        monkeypatch.setattr(devices, "_busy_others_now", lambda: 1.0)
        assert configure_threads(None) == 3  # one core of four is taken
        monkeypatch.setattr(devices, "_busy_others_now", lambda: 0.0)
        assert configure_threads(None) == 4
        with pytest.raises(UserError, match="--threads must be 1 or more"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_generate_threads_option_reaches_torch(tiny_config_file):
    args = ["generate", "Hi", "--config", str(tiny_config_file()), "--weights", "random", "-n", "3", "--stats"]
    result = runner.invoke(app, [*args, "--threads", "2"])
    assert result.exit_code == 0, result.stderr
    assert "float32 on cpu with 2 threads" in result.stderr
    result = runner.invoke(app, args)  # the test environment sets OMP_NUM_THREADS=1
    assert "float32 on cpu with 1 thread," in result.stderr


def test_inspect_prompt_takes_threads(tiny_config_file):
    before = torch.get_num_threads()
    try:
        result = runner.invoke(app, ["inspect", "--config", str(tiny_config_file()), "--prompt", "Hi", "--threads", "2",
                                     "--json"])
        assert result.exit_code == 0, result.stderr
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "two"])
def test_bad_threads_is_one_error_line(value):
    proc = subprocess.run([sys.executable, "-m", "gptcli", "generate", "Hi", "--threads", value],
                          capture_output=True, text=True, timeout=60, env={**os.environ})
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--threads" in lines[0], proc.stderr
