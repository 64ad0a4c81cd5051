"""Training never loses a run: SIGTERM, a second signal during a save, checks before step 1, a full or
read-only disk, a failed run's folder, resuming with a new length, the recipes' own data and samples.

Tiny character models on generated text, so every run takes a second or two. The real full and
read-only disks are tmpfs mounts in a user namespace (``unshare -rm``); where that is not allowed
those tests skip, and a simulated ENOSPC covers the same path.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from test_train import TINY, _eval_losses, _final_state, events, make_text, train

DATA = os.environ.get("GPTCLI_DATA_DIR")
CHAR = [*TINY, "--tokenizer", "char", "--eval-batches", "1", "--sample-prompt", "The"]


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert not any(line.startswith("error: ") for line in lines[:-1])
    return lines[-1]


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "t.txt"
    path.write_text(make_text(900, seed=3))
    return path


def assert_same_run(a: Path, b: Path) -> None:
    """Same evaluation losses (the same floats) and the same final state, bit for bit."""
    assert _eval_losses(a) == _eval_losses(b)
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# --- SIGTERM ----------------------------------------------------------------------------------------


def test_sigterm_mid_run_saves_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path, text):
    """book-ch05's case: no periodic checkpoints (save_every 0), sampled progress samples; SIGTERM
    after a few steps saves, prints the resume command, exits 143; resuming ends bit for bit where a
    run never stopped ends."""
    common = [str(text), *CHAR, "--max-steps", "300", "--eval-every", "100", "--save-every", "0",
              "--sample-every", "2", "--sample-tokens", "2", "--sample-temperature", "0.8", "--sample-top-k", "5",
              "--batch-size", "4", "--drop-rate", "0.1"]
    full = tmp_path / "full"
    assert train(*common, "--out", str(full)).exit_code == 0

    stopped = tmp_path / "stopped"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", "train", *common, "--out", str(stopped), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # the samples (every 2 steps) show how far it got
        if '"event": "sample"' in line and json.loads(line)["step"] >= 6:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert f"continue with: gptcli train --resume {stopped}" in stderr
    end = json.loads(stdout.strip().splitlines()[-1])
    assert end["event"] == "end" and end["reason"] == "interrupted" and 6 <= end["step"] < 299

    resumed = train("--resume", str(stopped))
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_run(full, stopped)


def test_a_second_signal_during_the_save_lets_it_finish(tmp_path, text, monkeypatch):
    """Two SIGTERMs while the checkpoint is written (here: from inside write_state): the save
    completes, the run exits 143, and the checkpoint resumes to the uninterrupted run's end."""
    from gptcli.training import loop

    common = [str(text), *CHAR, "--max-steps", "9", "--eval-every", "2", "--save-every", "3",
              "--sample-every", "0", "--batch-size", "4"]
    full = tmp_path / "full"
    assert train(*common, "--out", str(full)).exit_code == 0

    original = loop.write_state
    calls = []

    def signalled_write_state(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # stop after this step...
            os.kill(os.getpid(), signal.SIGTERM)  # ...and quit: deferred, the save is under way
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "write_state", signalled_write_state)
    stopped = tmp_path / "stopped"
    result = train(*common, "--out", str(stopped))
    monkeypatch.setattr(loop, "write_state", original)
    assert result.exit_code == 143, result.stderr
    assert "writing the checkpoint; quitting once it is whole" in result.stderr
    assert len(calls) == 1
    from gptcli.training import read_state

    assert read_state(stopped / "state.safetensors").position.step == 4  # the checkpoint after step 3, whole
    assert train("--resume", str(stopped)).exit_code == 0
    assert_same_run(full, stopped)


# --- checks before step 1 ---------------------------------------------------------------------------


def test_a_sample_prompt_the_vocabulary_lacks_skips_samples_and_trains_every_step(tmp_path):
    lower = tmp_path / "lower.txt"
    lower.write_text(make_text(600, seed=1).lower())
    out = tmp_path / "run"
    result = train(str(lower), *TINY, "--tokenizer", "char", "--epochs", "1", "--eval-batches", "1",
                   "--out", str(out))  # the default prompt "Every effort moves you" has an 'E'
    assert result.exit_code == 0, result.stderr
    assert "note: the sample prompt 'Every effort moves you' has 'E', not in the vocabulary" in result.stderr
    evs = events(result.stdout)
    assert "sample" not in [e["event"] for e in evs]
    from gptcli.training import read_state

    assert read_state(out / "state.safetensors").position.step == evs[0]["total_steps"]  # every step kept


@pytest.mark.parametrize("flag", ["--seed", "--sample-seed"])
def test_a_huge_seed_is_one_line_and_leaves_nothing(tmp_path, text, flag):
    out = tmp_path / "run"
    line = one_error_line(train(str(text), *CHAR, "--max-steps", "2", flag, str(2**64), "--out", str(out)))
    assert line == f"error: {flag} must be at most 2**64 - 1 = 18446744073709551615, got {2**64}"
    assert not out.exists()
    assert train(str(text), *CHAR, "--max-steps", "2", flag, str(2**64 - 1), "--out", str(out)).exit_code == 0


def test_a_failed_runs_folder_does_not_block_the_corrected_rerun(tmp_path, text):
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)  # killed while preparing: only the token ids were written
    (out / "data" / "train.bin").write_bytes(b"\0\0")
    result = train(str(text), *CHAR, "--max-steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert f"note: {out} holds a run that saved no checkpoint (nothing to resume); replacing it" in result.stderr
    assert (out / "state.safetensors").is_file()


def test_no_room_for_the_checkpoints_is_refused_before_anything_is_written(tmp_path, text, monkeypatch):
    import shutil as shutil_module

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=100_000))
    out = tmp_path / "run"
    line = one_error_line(train(str(text), *CHAR, "--max-steps", "2", "--out", str(out)))
    assert line.startswith(f"error: --out {out}: the disk has 97.66 KiB free, and this run needs about ")
    assert "while a checkpoint is rewritten" in line
    assert not out.exists()


def test_a_full_disk_mid_run_is_one_line_and_the_last_checkpoint_resumes(tmp_path, text, monkeypatch):
    """ENOSPC (simulated, as safetensors reports it) on the second checkpoint: one line naming the
    last good checkpoint, no temporary file left, and resuming from it ends as a run never stopped."""
    import safetensors.torch
    from safetensors import SafetensorError

    common = [str(text), *CHAR, "--max-steps", "9", "--eval-every", "2", "--save-every", "3",
              "--sample-every", "0", "--batch-size", "4"]
    full = tmp_path / "full"
    assert train(*common, "--out", str(full)).exit_code == 0

    original = safetensors.torch.save_file
    states = []

    def save_file(tensors, filename, metadata=None):
        if ".state.safetensors.tmp-" in str(filename):
            states.append(filename)
            if len(states) == 2:
                Path(filename).write_bytes(b"\0" * 100)  # a partial write, as a disk filling up leaves
                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                      'message: "No space left on device" })')
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    line = one_error_line(train(*common, "--out", str(out)))
    monkeypatch.setattr(safetensors.torch, "save_file", original)
    assert line == (f"error: cannot write the checkpoint in {out}: No space left on device; the last good "
                    f"checkpoint, after step 3, is intact in {out}: free some space, then gptcli train --resume {out}")
    assert not list(out.glob(".*tmp*"))
    resumed = train("--resume", str(out))
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_run(full, out)


def _namespace_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || exit 1"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


needs_namespace = pytest.mark.skipif(not _namespace_ok(), reason="needs `unshare -rm` and tmpfs mounts "
                                     "(user namespaces)")


def _in_tmpfs(tmp_path: Path, options: str, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a fresh tmpfs mounted at $D (``mount -o options``), in a user namespace."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    env = {**os.environ, "D": str(mount_point), "PY": sys.executable}
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs \"$D\" && {script}"],
                          capture_output=True, text=True, timeout=300, env=env)


@needs_namespace
def test_a_read_only_output_folder_is_one_line_before_training(tmp_path, text):
    args = " ".join([str(text), *CHAR, "--max-steps", "2"])
    proc = _in_tmpfs(tmp_path, "ro,size=1m", f'"$PY" -m gptcli train {args} --out "$D/run"')
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0] == (f"error: --out {tmp_path}/mnt/run: cannot write in {tmp_path}/mnt: Read-only file system; "
                        "choose a writable folder with --out")


def _run_to_resume(tmp_path: Path, text: Path) -> Path:
    out = tmp_path / "run"
    result = train(str(text), *CHAR, "--max-steps", "2", "--sample-every", "0", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    return out


@needs_namespace
def test_resuming_a_run_on_a_read_only_disk_names_resume_not_out(tmp_path, text):
    """The run folder bind-mounted read-only: the error names the folder and --resume (the user
    passed no --out), says why it must be writable and what to do, and nothing is changed."""
    out = _run_to_resume(tmp_path, text)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    env = {**os.environ, "D": str(mount_point), "SRC": str(out), "PY": sys.executable}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$SRC" "$D" && mount -o remount,bind,ro "$D" '
                           '&& "$PY" -m gptcli train --resume "$D" --max-steps 4'],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0] == (f"error: --resume {mount_point}: cannot write in the run folder: Read-only file system; a "
                        "resumed run saves its checkpoints there, so copy the folder to a writable place and "
                        "--resume the copy")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_resuming_a_run_in_a_folder_without_write_permission_names_resume(tmp_path, text, monkeypatch):
    """chmod a-w on the run folder. Root may write there all the same (os.access says so); then the
    refusal a user gets (EACCES from the probe file) is made by hand, at the same call."""
    import errno
    import tempfile

    from gptcli.training import run_folder

    out = _run_to_resume(tmp_path, text)
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            real_mkstemp = tempfile.mkstemp

            def refused_mkstemp(*args, **kwargs):
                if Path(kwargs.get("dir", "")) == out:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
                return real_mkstemp(*args, **kwargs)

            monkeypatch.setattr(run_folder.tempfile, "mkstemp", refused_mkstemp)
        line = one_error_line(train("--resume", str(out), "--max-steps", "4"))
    finally:
        out.chmod(0o755)
    assert line == (f"error: --resume {out}: cannot write in the run folder: Permission denied; a resumed run saves "
                    f"its checkpoints there, so make it writable (chmod u+w {out}), or copy the folder to a writable "
                    "place and --resume the copy")


@needs_namespace
def test_a_disk_that_fills_up_mid_run_is_one_line_and_the_checkpoint_resumes(tmp_path, text):
    """A real full disk: a 2 MB tmpfs, filled by another writer once the first checkpoint is there."""
    args = " ".join([str(text), *CHAR, "--max-steps", "3000", "--eval-every", "50", "--save-every", "20",
                     "--sample-every", "0"])
    script = (
        f'"$PY" -m gptcli train {args} --out "$D/run" --json > "$D/../out.jsonl" 2> "$D/../err.txt" & pid=$!; '
        'while [ ! -f "$D/run/state.safetensors" ]; do sleep 0.05; done; '
        'dd if=/dev/zero of="$D/fill" bs=4k 2>/dev/null; '
        'wait $pid; echo "rc=$?"; cat "$D/../err.txt"; '
        '"$PY" -c "from pathlib import Path; import os; from gptcli.training import read_state; '
        's = read_state(Path(os.environ[\'D\']) / \'run\' / \'state.safetensors\'); print(\'state step\', s.position.step)"; '
        'rm "$D/fill"; "$PY" -m gptcli train --resume "$D/run" --max-steps 60 > /dev/null 2>&1; echo "resume=$?"'
    )
    proc = _in_tmpfs(tmp_path, "size=2m", script)
    out = proc.stdout
    assert "rc=2" in out, (out, proc.stderr)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out
    assert "No space left on device" in errors[0] and "is intact in" in errors[0]
    assert "--resume" in errors[0]
    assert "state step" in out and "resume=0" in out


# --- resuming with a new length ---------------------------------------------------------------------


def test_resuming_with_more_steps_keeps_the_decay_it_was_on(tmp_path, text):
    common = [str(text), *CHAR, "--eval-every", "1", "--sample-every", "0", "--schedule", "cosine",
              "--warmup-steps", "2", "--lr", "1e-3", "--min-lr", "1e-4"]
    out = tmp_path / "run"
    assert train(*common, "--max-steps", "8", "--out", str(out)).exit_code == 0
    first = {e["step"]: e["lr"] for e in events((out / "train.jsonl").read_text()) if e["event"] == "eval"}
    assert first[7] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 5 / 6)) * 9e-4)
    resumed = train("--resume", str(out), "--max-steps", "12")
    assert resumed.exit_code == 0, resumed.stderr
    assert "cosine decay to --min-lr at step 8, as before" in resumed.stderr
    lrs = {e["step"]: e["lr"] for e in events((out / "train.jsonl").read_text()) if e["event"] == "eval"}
    assert {s: lrs[s] for s in range(8)} == first  # the steps it had taken are kept
    assert all(lrs[s] == pytest.approx(1e-4) for s in range(8, 12))  # past the decay's end: min_lr, no jump
    other = tmp_path / "other"
    assert train(*common, "--max-steps", "8", "--out", str(other)).exit_code == 0
    moved = train("--resume", str(other), "--max-steps", "12", "--decay-steps", "12")
    assert moved.exit_code == 0, moved.stderr
    lrs = {e["step"]: e["lr"] for e in events((other / "train.jsonl").read_text()) if e["event"] == "eval"}
    assert lrs[8] > 1e-4 * 1.5  # --decay-steps moved the end of the decay


# --- the recipes' data, samples and help ------------------------------------------------------------


@pytest.fixture
def mirror(monkeypatch, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPTCLI_DATA_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.skipif(not DATA, reason="GPTCLI_DATA_DIR is unset (see .ci/run)")
def test_a_recipe_without_data_downloads_its_text_and_samples_as_nanogpt(tmp_path, mirror):
    shutil.copy(Path(DATA) / "tinyshakespeare.txt", mirror / "tinyshakespeare.txt")
    out = tmp_path / "run"
    result = train("--recipe", "shakespeare-char", "--max-steps", "2", "--n-layers", "1", "--emb-dim", "16",
                   "--n-heads", "2", "--context-length", "16", "--eval-batches", "1", "--batch-size", "2",
                   "--sample-tokens", "8", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert "note: downloading Tiny Shakespeare (1.1 MB) from http://127.0.0.1:" in result.stderr
    evs = events(result.stdout)
    assert (evs[0]["train_tokens"], evs[0]["val_tokens"]) == (1_003_854, 111_540)  # nanoGPT's prepare.py split
    [sample] = [e for e in evs if e["event"] == "sample"]
    assert (sample["temperature"], sample["top_k"], sample["seed"]) == (0.8, 200, 1337)
    again = train("--recipe", "shakespeare-char", "--max-steps", "2", "--n-layers", "1", "--emb-dim", "16",
                  "--n-heads", "2", "--context-length", "16", "--eval-batches", "1", "--batch-size", "2",
                  "--sample-tokens", "8", "--out", str(tmp_path / "again"))
    assert again.exit_code == 0 and "downloading" not in again.stderr  # cached
    [same] = [e for e in events(again.stdout) if e["event"] == "sample"]
    assert same["token_ids"] == sample["token_ids"]  # a fixed seed: the same sample from the same weights


def test_a_recipe_without_data_offline_says_where_to_get_it(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GPTCLI_DATA_URL", f"http://127.0.0.1:{port}")
    line = one_error_line(train("--recipe", "book-ch05", "--out", str(tmp_path / "run")))
    assert line.startswith("error: cannot download The Verdict (Edith Wharton, 1908) from ")
    assert "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt" \
        in line
    assert not (tmp_path / "run").exists()


def test_samples_are_labelled_and_the_final_evaluation_is_in_the_summary(tmp_path, text):
    result = train(str(text), *CHAR, "--max-steps", "7", "--eval-every", "3", "--sample-every", "3",
                   "--sample-tokens", "4", "--out", str(tmp_path / "run"), "--plain")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("Ep ")] == [line for line in lines if "(Step 00000" in line]
    assert [line.split(":")[0] for line in lines if line.startswith("Ep ")] == ["Ep 1 (Step 000000)",
                                                                               "Ep 1 (Step 000003)",
                                                                               "Ep 1 (Step 000006)"]
    assert "note: sample after step 3 (greedy):" in result.stderr
    assert "; final train loss " not in result.stderr  # step 6 was on the schedule: no extra evaluation
    off = train(str(text), *CHAR, "--max-steps", "8", "--eval-every", "3", "--sample-every", "0",
                "--out", str(tmp_path / "off"), "--plain")
    assert [line.split(":")[0] for line in off.stdout.splitlines()] == ["Ep 1 (Step 000000)", "Ep 1 (Step 000003)",
                                                                       "Ep 1 (Step 000006)"]
    assert "; final train loss " in off.stderr and ", val loss " in off.stderr
    logged = [e for e in events((tmp_path / "off" / "train.jsonl").read_text()) if e["event"] == "eval"]
    assert [(e["step"], e["final"]) for e in logged] == [(0, False), (3, False), (6, False), (7, True)]


def test_help_shows_the_defaults():
    from typer.testing import CliRunner

    from gptcli.cli import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for shown in ("[default: 0.0004]", "[default: 'constant']", "[default: 123]", "[default: 0.1]",
                  "[default: 'epoch']", "[default: 0.0]", "[default: 0.9]", "[default: 0.999]", "[default: 'auto']"):
        assert shown in text, shown


def test_under_torchrun_only_rank_0_reports_an_error(tmp_path, text, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    result = train(str(text), *CHAR, "--max-steps", "2", "--batch-size", "3", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and result.stderr == "" and result.stdout == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    line = one_error_line(train(str(text), *CHAR, "--max-steps", "2", "--batch-size", "3",
                                "--out", str(tmp_path / "run")))
    assert line == "error: --batch-size 3 does not split evenly over 2 processes; use a multiple of 2"
