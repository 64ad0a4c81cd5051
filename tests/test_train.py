"""gptcli train on tiny models and generated text: the run folder, the exports (transformers as the
oracle), character models as first-class models, resume bit for bit, atomic saves, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from helpers import train_until_first_checkpoint

runner = CliRunner()

WORDS = ("the a of and to in is was he she it they said time over under house river light dark old new "
         "cold warm king queen stone road tree door window letter morning night").split()


def make_text(n_words: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(6, 12):
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    return "\n".join(lines) + "\n"


TINY = ["--size", "124M", "--n-layers", "2", "--n-heads", "2", "--emb-dim", "32", "--context-length", "16"]


def train(*args: str, input: str | None = None):
    return runner.invoke(app, ["train", *args], input=input)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def test_tiny_gpt2_run_writes_the_run_folder_and_json_events(tmp_path, corpus):
    out = tmp_path / "run"
    result = train(str(corpus), *TINY, "--out", str(out), "--max-steps", "6", "--batch-size", "4",
                   "--eval-every", "3", "--eval-batches", "2", "--sample-every", "3", "--sample-tokens", "5",
                   "--sample-prompt", "The king", "--save-every", "3")
    assert result.exit_code == 0, result.stderr
    evs = events(result.stdout)
    kinds = [e["event"] for e in evs]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert "step" not in kinds  # progress ticks never reach stdout or the log
    evals = [e for e in evs if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 5]  # after the first update, every 3 steps, and at the end
    assert [e["final"] for e in evals] == [False, False, True]  # the last is off the --eval-every schedule
    for e in evals:
        assert set(e) == {"event", "step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr", "final"}
        assert e["tokens_seen"] == (e["step"] + 1) * 4 * 16
    samples = [e for e in evs if e["event"] == "sample"]
    assert samples and all(len(s["token_ids"]) == 5 and s["prompt"] == "The king" for s in samples)
    assert {"step", "path"} <= set(next(e for e in evs if e["event"] == "checkpoint"))
    end = evs[-1]
    assert end["reason"] == "done" and end["step"] == 5 and end["wall_s"] > 0 and end["tokens_per_s"] > 0
    for name in ("model.safetensors", "config.json", "state.safetensors", "train.jsonl", "loss.png",
                 "best/model.safetensors", "best/config.json", "data/train.bin", "data/val.bin"):
        assert (out / name).is_file(), name
    logged = events((out / "train.jsonl").read_text())
    assert logged == [e for e in evs]  # the log holds exactly what --json printed
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "note:" in result.stderr and "error" not in result.stderr


def test_exported_folder_loads_in_transformers_with_the_same_logits(tmp_path, corpus):
    from transformers import GPT2LMHeadModel

    from gptcli.weights import load_model

    out = tmp_path / "run"
    result = train(str(corpus), *TINY, "--out", str(out), "--max-steps", "3", "--batch-size", "2",
                   "--sample-every", "0", "--drop-rate", "0.0")
    assert result.exit_code == 0, result.stderr
    loaded = load_model(size=None, config=None, weights=str(out), device=torch.device("cpu"), dtype=torch.float32)
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor([[464, 3290, 286, 262, 1295, 13, 383]])
    with torch.no_grad():
        ours = loaded.model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # And it generates through the CLI.
    gen = runner.invoke(app, ["generate", "--weights", str(out), "The king", "-n", "4"])
    assert gen.exit_code == 0, gen.stderr


def test_bias_free_model_exports_zero_biases_and_reloads_without_them(tmp_path, corpus):
    from transformers import GPT2LMHeadModel

    from gptcli.params import count_params
    from gptcli.weights import load_model

    out = tmp_path / "run"
    config = tmp_path / "nobias.yaml"
    config.write_text("vocab_size: 50257\ncontext_length: 16\nemb_dim: 32\nn_heads: 2\nn_layers: 2\ndrop_rate: 0.0\n"
                      "qkv_bias: false\ntie_weights: true\nbias: false\n")
    result = train(str(corpus), "--config", str(config), "--out", str(out), "--max-steps", "3", "--sample-every", "0",
                   "--batch-size", "2")
    assert result.exit_code == 0, result.stderr
    loaded = load_model(size=None, config=None, weights=str(out), device=torch.device("cpu"), dtype=torch.float32)
    assert loaded.cfg.bias is False and loaded.cfg.qkv_bias is False
    assert sum(p.numel() for p in loaded.model.parameters()) == count_params(loaded.cfg).total
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor([[464, 3290, 286, 262]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    inspected = runner.invoke(app, ["inspect", "--weights", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["checkpoint"]["ok"] and report["config"]["bias"] is False


def test_char_model_is_first_class(tmp_path, corpus):
    from gptcli.weights import checkpoint_tokenizer

    out = tmp_path / "char"
    result = train(str(corpus), "--tokenizer", "char", *TINY, "--out", str(out), "--max-steps", "4",
                   "--sample-every", "2", "--sample-prompt", "The", "--sample-tokens", "8")
    assert result.exit_code == 0, result.stderr
    evs = events(result.stdout)
    chars = sorted(set(corpus.read_text()))
    assert evs[0]["tokenizer"] == "char" and evs[0]["vocab_size"] == len(chars) == evs[0]["config"]["vocab_size"]
    sample = next(e for e in evs if e["event"] == "sample")
    assert len(sample["text"]) == 8  # one character per token
    tok = checkpoint_tokenizer(out / "model.safetensors")
    assert tok.name == "char" and tok.chars == "".join(chars)
    exported = json.loads((out / "config.json").read_text())  # no end-of-text token: not GPT-2's 50256
    assert exported["bos_token_id"] is None and exported["eos_token_id"] is None
    gen = runner.invoke(app, ["generate", "--weights", str(out), "The", "-n", "12", "--json"])
    assert gen.exit_code == 0, gen.stderr
    record = json.loads(gen.stdout)
    assert len(record["text"]) == 12 and set(record["text"]) <= set(chars)
    assert record["prompt_token_ids"] == [chars.index(c) for c in "The"]
    top = runner.invoke(app, ["inspect", "--weights", str(out), "--prompt", "Th", "--top", "3", "--json"])
    assert top.exit_code == 0, top.stderr
    assert all(len(t["token"]) == 1 for t in json.loads(top.stdout)["next_tokens"])
    bad = runner.invoke(app, ["generate", "--weights", str(out), "Zebra€", "-n", "2"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error:") and "not in this model's vocabulary" in bad.stderr


def test_fine_tuning_a_transformers_checkpoint(tmp_path, corpus):
    from transformers import GPT2LMHeadModel

    from helpers import hf_tiny_gpt2

    base = hf_tiny_gpt2(tmp_path / "base", n_positions=32, n_head=2)
    out = tmp_path / "tuned"
    result = train(str(corpus), "--weights", str(tmp_path / "base"), "--out", str(out), "--max-steps", "3",
                   "--batch-size", "2", "--sample-every", "0", "--lr", "1e-3")
    assert result.exit_code == 0, result.stderr
    start = events(result.stdout)[0]
    assert start["weights"] == str(tmp_path / "base") and start["config"]["context_length"] == 32
    tuned = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor([[464, 3290, 286, 262, 1295]])
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, base(ids).logits)  # it learned something
        from gptcli.weights import load_model

        ours = load_model(size=None, config=None, weights=str(out), device=torch.device("cpu"), dtype=torch.float32)
        torch.testing.assert_close(ours.model(ids), tuned(ids).logits, atol=1e-4, rtol=1e-4)


# --- resume, Ctrl-C, atomic saves ---------------------------------------------------------------


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "state.safetensors")


def _eval_losses(out: Path) -> list[tuple[int, float, float]]:
    return [(e["step"], e["train_loss"], e["val_loss"]) for e in events((out / "train.jsonl").read_text())
            if e["event"] == "eval"]


@pytest.mark.parametrize("mode", [
    ["--epochs", "3", "--batch-size", "4", "--drop-rate", "0.2"],  # the book's way: shuffled windows, dropout
    ["--max-steps", "14", "--batch-size", "4", "--drop-rate", "0.1", "--schedule", "cosine", "--warmup-steps", "3",
     "--grad-clip", "1.0", "--decay", "2d"],  # nanoGPT's way, via a recipe-like set of flags
], ids=["windows", "random"])
def test_resume_after_a_kill_is_bit_exact(tmp_path, mode):
    text = tmp_path / "t.txt"
    text.write_text(make_text(900, seed=3))
    common = [str(text), *TINY, "--eval-every", "2", "--eval-batches", "2", "--save-every", "3", "--sample-every", "0",
              *mode]
    if "--max-steps" in mode:
        common += ["--tokenizer", "char"]
    full = tmp_path / "full"
    assert train(*common, "--out", str(full)).exit_code == 0

    killed = tmp_path / "killed"
    assert train_until_first_checkpoint(*common, "--out", str(killed)).exit_code == 0
    first = events((killed / "train.jsonl").read_text())
    assert first[-1]["event"] == "checkpoint" and first[-1]["step"] == 3

    resumed = train("--resume", str(killed))
    assert resumed.exit_code == 0, resumed.stderr
    assert events(resumed.stdout)[0]["resumed"] is True
    assert _eval_losses(killed) == _eval_losses(full)  # the same floats, not just close
    a, b = _final_state(full), _final_state(killed)
    assert a.keys() == b.keys()
    for name in a:  # weights, AdamW moments, RNG states, bit for bit
        assert torch.equal(a[name], b[name]), name
    assert [e["event"] for e in events((killed / "train.jsonl").read_text())].count("end") == 1


def test_resume_keeps_the_runs_thread_count_and_stays_bit_exact(tmp_path, monkeypatch):
    """The sums' order depends on torch's thread count, and the automatic count on the machine's load:
    a run stopped on 1 thread resumes on 1, though the automatic choice now says 2, and ends bit for
    bit as the uninterrupted 1-thread run. --threads 2 is obeyed, with a note that this is lost."""
    import shutil

    from gptcli import devices

    text = tmp_path / "t.txt"
    text.write_text(make_text(900, seed=3))
    common = [str(text), *TINY, "--max-steps", "8", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2",
              "--save-every", "3", "--sample-every", "0", "--threads", "1"]
    full = tmp_path / "full"
    assert train(*common, "--out", str(full)).exit_code == 0
    killed = tmp_path / "killed"
    assert train_until_first_checkpoint(*common, "--out", str(killed)).exit_code == 0
    overridden = tmp_path / "overridden"
    shutil.copytree(killed, overridden)

    # An idle 2-core machine: the automatic choice (no --threads, no OMP_NUM_THREADS) is 2.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "available_cores", lambda: 2)
    monkeypatch.setattr(devices, "_busy_others_now", lambda: 0.0)
    assert devices.configure_threads(None) == 2
    resumed = train("--resume", str(killed), "--plain")
    assert resumed.exit_code == 0, resumed.stderr
    assert _eval_losses(killed) == _eval_losses(full)  # the same floats, not just close
    a, b = _final_state(full), _final_state(killed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert f"note: resuming {killed} after step 3 on cpu (1 thread)" in resumed.stderr
    assert [e["threads"] for e in events((killed / "train.jsonl").read_text()) if e["event"] == "start"] == [1, 1]

    moved = train("--resume", str(overridden), "--threads", "2")
    assert moved.exit_code == 0, moved.stderr
    assert events(moved.stdout)[0]["threads"] == 2
    assert ("note: --threads 2: the run trained on 1 thread so far, so it will not end bit for bit as an "
            "uninterrupted run would (leave --threads out to keep 1)") in moved.stderr
    from gptcli.training import read_state

    assert read_state(overridden / "state.safetensors").threads == 2  # what a later --resume keeps


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, corpus):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcli", "train", str(corpus), *TINY, "--out", str(out), "--max-steps", "100000",
         "--eval-every", "20", "--eval-batches", "1", "--sample-every", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if '"event": "eval"' in line:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    end = json.loads(stdout.strip().splitlines()[-1])
    assert end["event"] == "end" and end["reason"] == "interrupted"
    assert "--resume" in stderr and "Traceback" not in stderr
    from gptcli.training import read_state

    state = read_state(out / "state.safetensors")
    assert state.position.step == end["step"] + 1 >= 1


def test_a_kill_during_a_save_leaves_the_previous_file_loadable(tmp_path):
    target = tmp_path / "state.safetensors"
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from gptcli.files import save_safetensors\n"
        "target = Path(sys.argv[1])\n"
        "save_safetensors({'x': torch.zeros(4)}, target, {'version': '0'})\n"
        "print('first', flush=True)\n"
        "big = torch.ones(16_000_000)\n"
        "v = 1\n"
        "while True:\n"
        "    save_safetensors({'x': big * v}, target, {'version': str(v)})\n"
        "    v += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first"
    time.sleep(1.5)  # several 64 MB saves, the kill lands in one of them
    proc.kill()
    proc.wait()
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as f:
        version = int(f.metadata()["version"])
        x = f.get_tensor("x")
    assert x.shape == ((4,) if version == 0 else (16_000_000,))
    assert bool((x == (0 if version == 0 else version)).all())


# --- bad input: one line, exit 2, nothing lost ------------------------------------------------------


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


def test_bad_data(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in one_error_line(train(str(empty), *TINY, "--max-steps", "1", "--out", str(tmp_path / "a")))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    line = one_error_line(train(str(latin), *TINY, "--max-steps", "1", "--out", str(tmp_path / "b")))
    assert "latin.txt" in line and "offset 3" in line
    short = tmp_path / "short.txt"
    short.write_text("Just a few words here.\n")
    line = one_error_line(train(str(short), *TINY, "--max-steps", "1", "--out", str(tmp_path / "c")))
    assert "window" in line or "too few" in line
    assert not (tmp_path / "c").exists()  # refused before anything is written
    line = one_error_line(train(str(tmp_path / "missing.txt"), *TINY, "--max-steps", "1"))
    assert "no such file" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, corpus, monkeypatch):
    """Under torchrun --batch-size is the global micro-batch; 12 rows do not split over 5 processes.
    (Checked before the process group is joined, so no other process is needed here.)"""
    monkeypatch.setenv("WORLD_SIZE", "5")
    monkeypatch.setenv("RANK", "0")
    line = one_error_line(train(str(corpus), *TINY, "--max-steps", "1", "--batch-size", "12",
                                "--out", str(tmp_path / "r")))
    assert "--batch-size 12" in line and "5 processes" in line
    assert not (tmp_path / "r").exists()


def test_validation_split_too_small(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(make_text(400))
    line = one_error_line(train(str(text), *TINY, "--epochs", "1", "--val-fraction", "0.01",
                                "--out", str(tmp_path / "r")))
    assert "validation" in line


def test_out_folder_with_another_run_is_refused_and_kept(tmp_path, corpus):
    out = tmp_path / "run"
    assert train(str(corpus), *TINY, "--out", str(out), "--max-steps", "2", "--sample-every", "0").exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = one_error_line(train(str(corpus), *TINY, "--out", str(out), "--max-steps", "2"))
    assert "--resume" in line and "--force" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("mine")
    assert "not empty" in one_error_line(train(str(corpus), *TINY, "--out", str(other), "--max-steps", "1"))
    assert (other / "notes.md").read_text() == "mine"
    forced = train(str(corpus), *TINY, "--out", str(out), "--max-steps", "1", "--sample-every", "0", "--force")
    assert forced.exit_code == 0, forced.stderr


def test_bad_resume_folders(tmp_path, corpus):
    assert "no such folder" in one_error_line(train("--resume", str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no state.safetensors" in one_error_line(train("--resume", str(empty)))
    out = tmp_path / "run"
    assert train(str(corpus), *TINY, "--out", str(out), "--max-steps", "2", "--sample-every", "0").exit_code == 0
    line = one_error_line(train("--resume", str(out), "--tokenizer", "char"))
    assert "gpt2 tokenizer" in line
    line = one_error_line(train("--resume", str(out), "--lr", "0.1"))
    assert "--lr" in line
    line = one_error_line(train("--resume", str(out)))  # it finished its 2 steps
    assert "already finished its 2 steps" in line and "--max-steps" in line
    state = out / "state.safetensors"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    assert "corrupt" in one_error_line(train("--resume", str(out), "--max-steps", "4"))


def test_memory_estimate_refuses_before_building(tmp_path, corpus, monkeypatch):
    from gptcli import training

    monkeypatch.setattr(training.setup, "available_memory", lambda device: 1 << 30)
    line = one_error_line(train(str(corpus), "--size", "124M", "--max-steps", "1", "--out", str(tmp_path / "r")))
    assert "needs about" in line and "AdamW" in line
    assert not (tmp_path / "r").exists()


def test_estimate_says_xl_fine_tuning_does_not_fit_24_gb():
    from gptcli.config import shipped_config
    from gptcli.training import estimate_memory

    need = estimate_memory(shipped_config("xl"), 1, autocast=False)
    assert need["weights"] + need["gradients"] + need["optimizer"] == 16 * 1_557_611_200
    assert need["total"] > 24 * 2**30


def test_recipes_ship_and_load():
    from gptcli.training import TrainSettings, load_recipe, recipe_names

    assert {"book-ch05", "shakespeare-char"} <= set(recipe_names())
    book = load_recipe("book-ch05")
    s = TrainSettings(**book.settings).validate()
    assert (book.size, book.model, s.lr, s.batch_size, s.epochs, s.eval_every, s.seed) == \
        ("book", {"context_length": 256}, 4e-4, 2, 10, 5, 123)
    sh = TrainSettings(**load_recipe("shakespeare-char").settings).validate()
    assert sh.decay_steps is None  # cosine reaches min_lr at the last step, however many there are
    assert (sh.tokenizer, sh.max_steps, sh.batch_size, sh.betas, sh.decay, sh.grad_clip) == \
        ("char", 2000, 12, (0.9, 0.99), "2d", 1.0)
    assert (s.dtype, sh.dtype) == ("float32", "auto")  # the book's run stays exact; nanoGPT's measures
    nano = load_recipe("shakespeare-char").model  # nanoGPT's baby GPT: no biases, tied head, nn.GELU()
    assert {k: nano[k] for k in ("n_layers", "n_heads", "emb_dim", "context_length", "bias", "tie_weights", "gelu")} \
        == {"n_layers": 4, "n_heads": 4, "emb_dim": 128, "context_length": 64, "bias": False, "tie_weights": True,
            "gelu": "erf"}


def test_dtype_auto_settles_on_a_dtype_says_why_and_records_it(tmp_path, corpus, monkeypatch):
    from gptcli.kernels import train as train_kernels

    monkeypatch.setattr(train_kernels, "measure_linears", lambda shapes, rows: {"onednn": 9.0, "torch": 8.0})
    monkeypatch.setattr(train_kernels, "measure_block", lambda cfg, batch, linear: {"float32": 6.0, "bfloat16": 2.0})
    out = tmp_path / "run"
    result = train(str(corpus), *TINY, "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--dtype", "auto",
                   "--eval-every", "1", "--eval-batches", "1", "--sample-every", "0")
    assert result.exit_code == 0, result.stderr
    assert "--dtype auto: bfloat16: a transformer block of this model trained 3.00x as fast in bfloat16" in result.stderr
    start = events(result.stdout)[0]
    assert start["settings"]["dtype"] == "bfloat16"
    resumed = train("--resume", str(out), "--max-steps", "3")
    assert resumed.exit_code == 0, resumed.stderr
    assert events(resumed.stdout)[0]["settings"]["dtype"] == "bfloat16"  # recorded, not measured again


# Each shipped config (shrunk, keeping its head tying and biases) with no --init, and each recipe.
SHRUNK = {"n_layers": 2, "n_heads": 2, "emb_dim": 32, "context_length": 16}
FIRST_LOSS_CASES = [
    *[pytest.param({"arch": SHRUNK}, id="default")],
    *[pytest.param({"config": str(path), "arch": SHRUNK}, id=path.stem)
      for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))],
    pytest.param({"recipe": "book-ch05", "arch": SHRUNK}, id="book-ch05"),
    pytest.param({"recipe": "shakespeare-char"}, id="shakespeare-char"),  # 0.8M parameters as it is
]


@pytest.mark.parametrize("request_args", FIRST_LOSS_CASES)
def test_a_new_model_starts_near_ln_vocab(tmp_path, corpus, request_args):
    """A fresh model's first loss is near ln(vocab_size), whatever the config: the default init is the
    book's for an untied head and GPT-2's for a tied one (the book's N(0, 1) embeddings as a tied head
    made each token predict itself: 230 on 124M)."""
    import math

    from gptcli import training

    run = training.prepare_run(training.RunRequest(data=(str(corpus),), out=tmp_path / "run",
                                                   settings={"max_steps": 1}, **request_args))
    first = next(ev for ev in training.Trainer(run).events() if ev["event"] == "step")
    expected = math.log(run.tokenizer.vocab_size)
    assert abs(first["loss"] - expected) <= 0.15 * expected, (first["loss"], expected)
    assert run.settings.init == ("gpt2" if run.model.cfg.tie_weights else "book")  # recorded as drawn
    import torch.nn as nn

    from gptcli.model.gpt import GELU

    gelus = {type(m) for m in run.model.modules() if type(m).__name__ == "GELU"}  # nanoGPT's nn.GELU() or the book's
    assert gelus == {nn.GELU if request_args.get("recipe") == "shakespeare-char" else GELU}


def test_the_books_init_with_a_tied_head_is_refused(tmp_path, corpus):
    out = tmp_path / "run"
    line = one_error_line(train(str(corpus), *TINY, "--init", "book", "--out", str(out), "--max-steps", "1"))
    assert line == ("error: init 'book' needs an untied output head, and config '124M' ties it to the token "
                    "embedding (the book's N(0, 1) embeddings as the head start the loss far above ln(50257) = "
                    "10.8); use --init gpt2 (auto's choice here) or a config with tie_weights: false")
    assert not out.exists()


def test_learning_rate_schedule_is_nanogpts():
    from gptcli.training import TrainSettings, learning_rate

    s = TrainSettings(max_steps=2000, lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=100, decay_steps=2000)
    assert learning_rate(0, s, 2000) == pytest.approx(1e-3 / 101)
    assert learning_rate(100, s, 2000) == pytest.approx(1e-3)
    assert learning_rate(1050, s, 2000) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert learning_rate(2000, s, 2000) == pytest.approx(1e-4)


def no_key_bias_config(tmp_path: Path) -> Path:
    """A tiny config without QKV bias: the key bias's gradient is zero in exact arithmetic (softmax ignores
    a constant shift), so AdamW would turn its rounding noise into +-lr steps that no comparison survives."""
    path = tmp_path / "tiny.yaml"
    path.write_text("vocab_size: 50257\ncontext_length: 16\nemb_dim: 32\nn_heads: 2\nn_layers: 2\ndrop_rate: 0.0\n"
                    "qkv_bias: false\ntie_weights: true\n")
    return path


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(make_text(1500, seed=5))
    common = [str(text), "--config", str(no_key_bias_config(tmp_path)), "--tokenizer", "char", "--epochs", "1",
              "--eval-every", "2", "--eval-batches", "2", "--sample-every", "0"]
    one = tmp_path / "one"
    accum = tmp_path / "accum"
    assert train(*common, "--batch-size", "12", "--out", str(one)).exit_code == 0
    assert train(*common, "--batch-size", "6", "--grad-accum", "2", "--out", str(accum)).exit_code == 0
    for (s1, t1, v1), (s2, t2, v2) in zip(_eval_losses(one), _eval_losses(accum), strict=True):
        assert s1 == s2 and t1 == pytest.approx(t2, abs=1e-5) and v1 == pytest.approx(v2, abs=1e-5)
    a, b = _final_state(one), _final_state(accum)
    for name in a:
        if name.startswith("model."):
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampling", ["windows", "random"])
def test_two_processes_equal_one_with_the_whole_batch(tmp_path, sampling):
    """torchrun with 2 processes (gloo, CPU) and batch 12 (6 each) trains like 1 process with batch 12."""
    text = tmp_path / "t.txt"
    text.write_text(make_text(4000, seed=7))
    common = [str(text), "--config", str(no_key_bias_config(tmp_path)), "--tokenizer", "char", "--max-steps", "20",
              "--batch-size", "12", "--eval-every", "5", "--eval-batches", "2", "--sample-every", "0", "--json",
              "--sampling", sampling]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "gptcli", "train", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "gptcli", "train", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    ev_one, ev_two = events(one.stdout), events(two.stdout)  # only rank 0 prints
    assert ev_two[0]["world_size"] == 2 and [e["event"] for e in ev_one] == [e["event"] for e in ev_two]
    for a, b in zip(_eval_losses(tmp_path / "one"), _eval_losses(tmp_path / "two"), strict=True):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], abs=1e-5) and a[2] == pytest.approx(b[2], abs=1e-5)
    s1, s2 = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    for name in s1:
        if name.startswith("model."):
            torch.testing.assert_close(s1[name], s2[name], atol=1e-5, rtol=1e-5)


def test_data_from_stdin_and_folders(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(make_text(600, seed=1))
    (folder / "b.txt").write_text(make_text(600, seed=2))
    (folder / "skip.md").write_text("not a text file of the corpus")
    out = tmp_path / "folder-run"
    result = train(str(folder), *TINY, "--max-steps", "1", "--sample-every", "0", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    from gptcli.training.data import Text, join_texts, read_texts

    texts = read_texts([str(folder)])
    assert [Path(t.name).name for t in texts] == ["a.txt", "b.txt"]
    assert "<|endoftext|>" in join_texts(texts, "gpt2")  # documents separated as GPT-2 was trained
    assert join_texts([Text("x", "ab"), Text("y", "cd")], "char") == "abcd"
    piped = train("-", *TINY, "--max-steps", "1", "--sample-every", "0", "--out", str(tmp_path / "stdin-run"),
                  input=make_text(600, seed=1))
    assert piped.exit_code == 0, piped.stderr
    assert events(piped.stdout)[0]["train_tokens"] > 0


def test_chunked_bpe_equals_whole_text(monkeypatch):
    """Large texts are tokenized in pieces on tiktoken's threads; the pieces end where GPT-2's
    pre-tokenizer splits anyway, so the ids are those of the whole text."""
    from gptcli.training import data
    from gptcli.tokenizer import gpt2

    text = make_text(4000, seed=9).replace(".\nThe", ".\n\n  The")  # blank lines and indents near the cuts
    whole = data.encode(text, gpt2())
    monkeypatch.setattr(data, "CHUNK_CHARS", 500)
    assert len(data._chunks(text, 500)) > 10
    assert data.encode(text, gpt2()).tolist() == whole.tolist()


def test_json_goes_to_stdout_while_the_bar_draws_on_a_terminal_stderr(tmp_path, corpus):
    """`gptcli train --json > file` on a terminal: the bar on stderr must not capture stdout."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gptcli", "train", str(corpus), *TINY, "--out", str(tmp_path / "r"), "--max-steps",
             "3", "--sample-every", "0", "--json"],
            stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert [e["event"] for e in events(proc.stdout)][0] == "start" and events(proc.stdout)[-1]["event"] == "end"


def test_a_run_without_a_checkpoint_is_replaced_not_a_blocker(tmp_path):
    """A folder holding only what a run writes, and no checkpoint (a run that failed or was killed
    first), is replaced by the next run (True: clear it); anything else stays refused."""
    from gptcli.errors import UserError
    from gptcli.training import LOG_FILE, check_out_dir

    (tmp_path / LOG_FILE).write_text("")
    (tmp_path / "data").mkdir()
    (tmp_path / ".state.safetensors.tmp-123").write_text("")  # a save cut short
    assert check_out_dir(tmp_path, resume=False, force=False) is True
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="saved no checkpoint .* and other files; pass --force"):
        check_out_dir(tmp_path, resume=False, force=False)


def test_weights_random_takes_the_architecture_flags_and_a_checkpoint_refuses_them(tmp_path, corpus):
    result = train(str(corpus), *TINY, "--weights", "random", "--out", str(tmp_path / "r"), "--max-steps", "1",
                   "--batch-size", "2", "--sample-every", "0", "--json")
    assert result.exit_code == 0, result.stderr
    start = events(result.stdout)[0]
    assert start["weights"].startswith("random (seed") and start["config"]["emb_dim"] == 32
    refused = train(str(corpus), "--weights", str(tmp_path / "r"), "--n-layers", "3", "--out", str(tmp_path / "x"),
                    "--max-steps", "1")
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: --weights fine-tunes a model as it is; architecture changes (--context-length, --n-layers, "
        "--n-heads, --emb-dim) need --weights random or a new model (--size/--config)")


def test_a_recipes_model_keys_over_a_given_config_are_named(tmp_path, corpus, tiny_config_file):
    """--config with --recipe: the recipe's model keys still apply (a recipe is a model change plus settings),
    and a note names each one that changed the given config; a flag wins over the recipe."""
    config = tiny_config_file(n_layers=2, gelu="tanh", context_length=16)
    result = train(str(corpus), "--recipe", "shakespeare-char", "--config", str(config), "--n-layers", "1",
                   "--out", str(tmp_path / "run"), "--max-steps", "1", "--sample-every", "0", "--dtype", "float32")
    assert result.exit_code == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("note: recipe shakespeare-char changes"))
    assert "gelu erf (was tanh)" in line and "context_length 64 (was 16)" in line and "n_layers" not in line
    cfg = events(result.stdout)[0]["config"]
    assert (cfg["gelu"], cfg["context_length"], cfg["n_layers"]) == ("erf", 64, 1)
