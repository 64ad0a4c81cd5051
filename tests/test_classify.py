"""gptcli train --task classify (the book's chapter 6) and gptcli classify, on tiny random models and
texts the tests make: learning a separable task, frozen weights untouched, the command's output,
resume bit for bit, the book's balance and split, the recipe offline, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from helpers import train_until_first_checkpoint

runner = CliRunner()

FRUIT = "apple banana cherry grape lemon mango peach pear plum melon kiwi lime".split()
CARS = "engine wheel brake clutch piston gear axle valve spark pedal tyre bumper".split()
TINY = ["--weights", "random", "--size", "124M", "--n-layers", "2", "--n-heads", "2", "--emb-dim", "32",
        "--context-length", "32"]


def make_rows(n: int = 240, seed: int = 0) -> list[tuple[str, str]]:
    """Texts from two disjoint word sets: a task any working classifier separates."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("fruit", "car")[i % 2]
        words = FRUIT if label == "fruit" else CARS
        rows.append((" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))), label))
    return rows


def write_tsv(path: Path, rows, header: str | None = "text\tlabel") -> Path:
    lines = ([header] if header else []) + [f"{t}\t{lab}" for t, lab in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A classifier trained on the separable task (every weight trains: a random model's frozen
    blocks carry little), with a 20% test split."""
    tmp = tmp_path_factory.mktemp("classify")
    data = write_tsv(tmp / "data.tsv", make_rows())
    out = tmp / "run"
    result = invoke("train", str(data), "--task", "classify", *TINY, "--trainable", "all", "--epochs", "4",
                    "--batch-size", "8", "--lr", "1e-3", "--eval-every", "10", "--eval-batches", "2",
                    "--test-fraction", "0.2", "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    (out / "stdout.jsonl").write_text(result.stdout)
    return out


def test_a_classifier_learns_a_separable_task(trained):
    evs = events((trained / "stdout.jsonl").read_text())
    start, end = evs[0], evs[-1]
    assert start["task"] == "classify" and start["labels"] == ["car", "fruit"]  # read from the data, sorted
    assert start["rows"] == {"train": 168, "val": 24, "test": 48}  # the book's split: int(n*0.7), int(n*0.1)
    evals = [e for e in evs if e["event"] == "eval"]
    assert evals and all({"train_loss", "val_loss", "train_acc", "val_acc"} <= set(e) for e in evals)
    accuracy = [e for e in evs if e["event"] == "accuracy"]
    assert [e["epoch"] for e in accuracy] == [1, 2, 3, 4]  # the book's line after each epoch
    assert end["reason"] == "done" and end["accuracy"]["test"] >= 0.95, end
    # Held out, through the command: the run keeps its test rows.
    result = invoke("classify", "--weights", str(trained), "--eval", str(trained / "data" / "test.tsv"), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows"] == 48 and report["accuracy"] >= 0.95
    assert report["accuracy"] == pytest.approx(end["accuracy"]["test"])
    assert [e["label"] for e in report["labels"]] == ["car", "fruit"]
    assert sum(e["rows"] for e in report["labels"]) == 48
    meta = json.loads(__import__("safetensors").safe_open(str(trained / "classifier.safetensors"), "pt")
                      .metadata()["gptcli.classifier"])
    assert meta["labels"] == ["car", "fruit"] and meta["label_token"] == "last"


def test_the_classify_commands_output(trained):
    one = invoke("classify", "--weights", str(trained), "peach plum\tkiwi")
    assert one.exit_code == 0, one.stderr
    label, prob, text = one.stdout.rstrip("\n").split("\t")
    assert label == "fruit" and 0.5 < float(prob) <= 1 and text == "peach plum\\tkiwi"
    lines = "gear axle brake\nlemon lime\n\nspark\n"
    plain = invoke("classify", "--weights", str(trained), input=lines)
    assert plain.exit_code == 0, plain.stderr
    out = plain.stdout.splitlines()
    assert len(out) == 4  # line N answers line N, the empty one too
    assert [o.split("\t")[0] for o in (out[0], out[1], out[3])] == ["car", "fruit", "car"]
    js = invoke("classify", "--weights", str(trained), "--json", "-", input=lines)
    rows = events(js.stdout)
    assert [r["text"] for r in rows] == ["gear axle brake", "lemon lime", "", "spark"]
    for r in rows:
        assert set(r) == {"text", "label", "probability", "probabilities", "tokens", "truncated"}
        assert set(r["probabilities"]) == {"car", "fruit"}
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["probability"] == max(r["probabilities"].values()) == r["probabilities"][r["label"]]
    assert [r["label"] for r in rows] == [o.split("\t")[0] for o in out]
    assert rows[0]["tokens"] == 3 and rows[2]["tokens"] == 0


def test_a_long_text_is_cut_as_in_training_with_a_note(trained):
    long = " ".join(["engine"] * 200)
    result = invoke("classify", "--weights", str(trained), "--json", long)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["truncated"] is True and "cut" in result.stderr


def test_the_frozen_weights_are_bit_identical_after_training(tmp_path):
    """The book's default: only the last block, the final LayerNorm and the new head train."""
    from safetensors.torch import load_file

    from gptcli.config import resolve_config
    from gptcli.weights import random_model

    data = write_tsv(tmp_path / "d.tsv", make_rows(80))
    out = tmp_path / "run"
    result = invoke("train", str(data), "--task", "classify", *TINY, "--epochs", "2", "--batch-size", "8",
                    "--lr", "1e-2", "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    base = random_model(resolve_config("124M", None).replace(n_layers=2, n_heads=2, emb_dim=32, context_length=32), 123)
    before = {k: v for k, v in base.state_dict().items() if k != "out_head.weight"}
    after = load_file(out / "classifier.safetensors")
    assert set(after) == set(before) | {"out_head.weight", "out_head.bias"}
    assert after["out_head.weight"].shape == (2, 32)
    trainable = ("trf_blocks.1.", "final_norm.", "out_head.")
    for name, tensor in before.items():
        if name.startswith(trainable):
            assert not torch.equal(tensor, after[name]), name
        else:
            assert torch.equal(tensor, after[name]), name
    assert events(result.stdout)[0]["trainable_params"] == sum(
        t.numel() for n, t in after.items() if n.startswith(trainable))


@pytest.mark.parametrize("extra", [[], ["--lora", "4", "--label-token", "last-real"]], ids=["book", "lora"])
def test_resume_is_bit_exact(tmp_path, extra):
    from safetensors.torch import load_file

    data = write_tsv(tmp_path / "d.tsv", make_rows(64))
    common = [str(data), "--task", "classify", *TINY, "--epochs", "3", "--batch-size", "4", "--lr", "1e-3",
              "--eval-every", "3", "--eval-batches", "2", "--save-every", "5", "--drop-rate", "0.1", *extra]
    assert invoke("train", *common, "--out", str(tmp_path / "full")).exit_code == 0
    killed = tmp_path / "killed"
    assert train_until_first_checkpoint(*common, "--out", str(killed)).exit_code == 0
    resumed = invoke("train", "--resume", str(killed))
    assert resumed.exit_code == 0, resumed.stderr
    a, b = load_file(tmp_path / "full" / "state.safetensors"), load_file(killed / "state.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    logged = [events((f / "train.jsonl").read_text()) for f in (tmp_path / "full", killed)]
    assert [e for e in logged[0] if e["event"] == "accuracy"] == [e for e in logged[1] if e["event"] == "accuracy"]


def test_the_books_balance_and_split():
    """create_balanced_dataset and random_split as numpy draws them for pandas' random_state=123."""
    import numpy as np

    from gptcli.classify import Labelled
    from gptcli.training.classify import balance_rows, split_rows

    # pandas' sample(n, random_state=s) is RandomState(s).choice(len, n, replace=False): a permutation's head.
    assert (np.random.RandomState(123).choice(50, 7, replace=False) ==
            np.random.RandomState(123).permutation(50)[:7]).all()
    rows = Labelled("x", [f"t{i}" for i in range(30)], ["ham"] * 24 + ["spam"] * 6, list(range(1, 31)))
    balanced = balance_rows(rows, 123)
    ham = [f"t{int(i)}" for i in np.random.RandomState(123).permutation(24)[:6]]
    assert balanced.texts == ham + [f"t{i}" for i in range(24, 30)]  # the sampled ham, then the spam
    splits = split_rows(balanced, 0.1, 0.2, 123)
    order = [balanced.texts[int(i)] for i in np.random.RandomState(123).permutation(12)]
    assert splits["train"].texts == order[:8] and splits["val"].texts == order[8:9] and splits["test"].texts == order[9:]


def test_the_book_ch06_recipe_runs_on_local_data(tmp_path):
    """The recipe on a file in the SMS Spam Collection's format (label<TAB>text, no header), small."""
    rng = random.Random(1)
    lines = [f"ham\t{' '.join(rng.choice(FRUIT) for _ in range(5))}" for _ in range(60)]
    lines += [f"spam\t{' '.join(rng.choice(CARS) for _ in range(5))}" for _ in range(20)]
    rng.shuffle(lines)
    data = tmp_path / "SMSSpamCollection"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "spam"
    result = invoke("train", str(data), "--recipe", "book-ch06", *TINY, "--epochs", "1", "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    start = events(result.stdout)[0]
    assert start["labels"] == ["ham", "spam"] and start["rows"] == {"train": 28, "val": 4, "test": 8}  # 40 balanced
    s = start["settings"]
    assert (s["batch_size"], s["lr"], s["weight_decay"], s["epochs"], s["eval_every"], s["eval_batches"],
            s["seed"], s["balance"]) == (8, 5e-5, 0.1, 1, 50, 5, 123, True)
    assert start["config"]["drop_rate"] == 0.0 and start["trainable"] == "last-block"
    assert "the book's" in result.stderr  # 60/20 rows, not the collection's counts


def test_the_recipe_offline_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCLI_DATA_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("GPTCLI_CACHE_DIR", str(tmp_path / "cache"))
    result = invoke("train", "--recipe", "book-ch06", *TINY, "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot download the SMS Spam Collection") and "SMSSpamCollection" in lines[-1]
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("content,args,message", [
    ("text\tlabel\na b\tham\nc d\tham\n", [], "every row has the label 'ham'"),
    ("text\tlabel\na b\tham\nc d\tspam\n", ["--label-column", "category"], "no column 'category'"),
    ("", [], "the file is empty"),
    ("  \n\n", [], "the file is empty"),
    ("text\tlabel\na b\tham\nc d\n", [], "line 3: no label"),
    ("text\tlabel\na b\tham\nc d\t\n", [], "line 3: no label"),
    ("text\tlabel\na b\tham\nc d\tspam\n", ["--label-column", "text"], "the text and the label are the same column (1)"),
])
def test_bad_data_is_one_error_line(tmp_path, content, args, message):
    data = tmp_path / "bad.tsv"
    data.write_text(content)
    result = invoke("train", str(data), "--task", "classify", *TINY, "--epochs", "1", *args,
                    "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_columns_by_name_and_number(tmp_path):
    from gptcli.classify import read_labelled

    csv_path = tmp_path / "d.csv"
    csv_path.write_text('id,category,body\n1,a,"hello, world"\n2,b,"x ""y"""\n')
    rows = read_labelled(csv_path, "body", "category")
    assert rows.texts == ["hello, world", 'x "y"'] and rows.labels == ["a", "b"] and rows.lines == [2, 3]
    numbered = tmp_path / "n.csv"
    numbered.write_text('1,a,"hello, world"\n2,b,"x ""y"""\n')  # no header: columns by number
    assert read_labelled(numbered, "3", "2").labels == ["a", "b"]
    plain = tmp_path / "p.tsv"
    plain.write_text("spam\tWin now\nham\tSee you\nham\tOk then\n")  # the SMS collection's order, no header
    rows = read_labelled(plain)
    assert rows.labels == ["spam", "ham", "ham"] and rows.texts[0] == "Win now"


def test_classify_refuses_what_is_not_a_classifier(tmp_path, trained):
    from helpers import hf_tiny_gpt2

    hf_tiny_gpt2(tmp_path / "lm")
    result = invoke("classify", "--weights", str(tmp_path / "lm"), "hello")
    assert result.exit_code == 2 and "not a classifier" in result.stderr
    assert invoke("classify", "hello").exit_code == 2  # no --weights
    both = invoke("classify", "--weights", str(trained), "--eval", "x.tsv", "hello")
    assert both.exit_code == 2 and "--eval" in both.stderr
    lm = invoke("generate", "--weights", str(trained), "hi")
    assert lm.exit_code == 2 and "gptcli classify" in lm.stderr
