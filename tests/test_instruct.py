"""`gptcli train DATA.json --task instruct`: the book's chapter 7 on tiny models and generated pairs.

The collate function against the book's own (copied below) and a hand-checked batch, the loss left
unmoved by the masked positions (padding; the prompt with --mask-prompt) through both loss routes of the
training loop, the response loss going down, the template in the checkpoints, resume bit for bit, the
book-ch07 recipe at a small size (its data served on 127.0.0.1), and bad input as one error line."""

from __future__ import annotations

import functools
import http.server
import json
import random
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.templates import ALPACA, TEMPLATE_METADATA_KEY, format_input
from gptcli.training import instruct

runner = CliRunner()
PAD = 50256
WORDS = "red green blue cat dog tree house river stone light cold warm king queen road door".split()
TINY_CONFIG = ("vocab_size: 50257\ncontext_length: 96\nemb_dim: 32\nn_heads: 2\nn_layers: 2\ndrop_rate: 0.0\n"
               "qkv_bias: false\ntie_weights: true\n")


def make_pairs(n: int = 60, seed: int = 0) -> list[dict]:
    """Instruction/response pairs a tiny model can learn a little of: reverse three words (some without
    an input field, as the book's data has)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 3)
        if i % 4 == 3:
            out.append({"instruction": f"Name the colour of {words[0]}.", "output": "It is red."})
        else:
            out.append({"instruction": "Repeat the words in reverse order.", "input": " ".join(words),
                        "output": " ".join(reversed(words))})
    return out


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(make_pairs()), encoding="utf-8")
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


def train(*args: str):
    return runner.invoke(app, ["train", *args])


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# Collate: the book's


def book_custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None,
                           instruction_lengths=None):
    """The book's ch07 ``custom_collate_fn`` (exercise 7.2's prompt mask when ``instruction_lengths``), verbatim
    but for taking the lengths beside the items."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for k, item in enumerate(batch):
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if instruction_lengths is not None:
            targets[:instruction_lengths[k] - 1] = -100
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def test_collate_pads_with_end_tokens_and_masks_all_but_the_first():
    # The book's own example (section 7.3): three sequences of 5, 2 and 3 tokens.
    batch = [instruct.Example((0, 1, 2, 3, 4), 2), instruct.Example((5, 6), 1), instruct.Example((7, 8, 9), 2)]
    inputs, targets = instruct.collate(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
    assert targets.tolist() == [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100], [8, 9, PAD, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.int64
    # --mask-prompt: the targets that are prompt tokens (prompt length - 1 of them) are masked too.
    _, masked = instruct.collate(batch, mask_prompt=True)
    assert masked.tolist() == [[-100, 2, 3, 4, PAD], [6, PAD, -100, -100, -100], [-100, 9, PAD, -100, -100]]
    # --max-length: rows cut after padding and masking, as the book does.
    cut_inputs, cut_targets = instruct.collate(batch, max_length=3)
    assert cut_inputs.tolist() == [[0, 1, 2], [5, 6, PAD], [7, 8, 9]]
    assert cut_targets.tolist() == [[1, 2, 3], [6, PAD, -100], [8, 9, PAD]]


@pytest.mark.parametrize("mask_prompt", [False, True])
@pytest.mark.parametrize("max_length", [None, 7])
def test_collate_equals_the_books_on_random_batches(mask_prompt, max_length):
    rng = random.Random(1)
    for _ in range(50):
        batch = []
        for _ in range(rng.randint(1, 5)):
            ids = tuple(rng.randrange(50000) for _ in range(rng.randint(2, 12)))
            batch.append(instruct.Example(ids, rng.randint(1, len(ids))))
        ours = instruct.collate(batch, max_length=max_length, mask_prompt=mask_prompt)
        book = book_custom_collate_fn([list(ex.ids) for ex in batch], allowed_max_length=max_length,
                                      instruction_lengths=[ex.prompt_len for ex in batch] if mask_prompt else None)
        assert torch.equal(ours[0], book[0]) and torch.equal(ours[1], book[1])


def test_examples_are_the_books_prompt_and_response():
    from gptcli.tokenizer import gpt2

    entries = [instruct.Entry("Rewrite the sentence using a simile.", "The car is very fast.",
                              "The car is as fast as lightning."),
               instruct.Entry("Name the author of 'Pride and Prejudice'.", "", "Jane Austen.")]
    tok = gpt2()
    examples = instruct.encode_examples(entries, tok)
    book_prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\nThe car is "
                   "very fast.")
    assert tok.decode(list(examples[0].ids)) == book_prompt + "\n\n### Response:\nThe car is as fast as lightning."
    assert examples[0].prompt_len == len(tok.encode(book_prompt))
    assert tok.decode(list(examples[1].ids)).endswith("### Instruction:\nName the author of 'Pride and Prejudice'."
                                                      "\n\n### Response:\nJane Austen.")
    assert "### Input" not in tok.decode(list(examples[1].ids))  # an empty input has no section


def test_the_split_is_the_books():
    entries = [instruct.Entry(str(i), "", str(i)) for i in range(1100)]
    train, val, test = instruct.split_entries(entries)
    assert (len(train), len(test), len(val)) == (935, 110, 55)  # the book's figures for its 1,100 entries
    assert train[-1].instruction == "934" and test[0].instruction == "935" and val[0].instruction == "1045"


# --------------------------------------------------------------------------------------------
# The loss: masked positions do not move it


def tiny_model(seed: int = 0):
    from gptcli.config import GPTConfig
    from gptcli.model.gpt import GPTModel

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=50257, context_length=96, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_weights=True, name="tiny")
    return GPTModel(cfg)


def a_batch(mask_prompt: bool):
    from gptcli.tokenizer import gpt2

    entries = [instruct.Entry(**{"input": "", **e}) for e in make_pairs(4, seed=3)]
    return instruct.collate(instruct.encode_examples(entries, gpt2()), mask_prompt=mask_prompt)


def loss_and_hidden_grad(model, x, y, plan):
    """batch_loss (the training loop's) and the gradient it sends to the final norm's output, per position."""
    from gptcli.training.loop import batch_loss

    captured = {}

    def keep(module, args, output):
        output.register_hook(lambda g: captured.setdefault("grad", g.detach().clone()))

    handle = model.final_norm.register_forward_hook(keep)
    try:
        model.zero_grad(set_to_none=True)
        loss = batch_loss(model, x, y, device=torch.device("cpu"), dtype="float32", plan=plan,
                          head_weight=model.out_head.weight)
        loss.backward()
    finally:
        handle.remove()
    return loss, captured["grad"]


@pytest.mark.parametrize("route", ["cross_entropy", "head_loss"])
@pytest.mark.parametrize("mask_prompt", [False, True])
def test_masked_positions_get_no_gradient_and_the_loss_is_the_responses(route, mask_prompt):
    from gptcli.kernels import train as train_kernels

    model = tiny_model()
    plan = None
    if route == "head_loss":  # the CPU training route: the head and cross-entropy in one chunked function
        plan = train_kernels.TrainPlan(linear="torch", head_loss=True, fused_adamw=False, attention=False)
        train_kernels.prepare(model, plan)
    x, y = a_batch(mask_prompt)
    masked = y == -100
    assert masked.any() and (~masked).any()
    loss, grad = loss_and_hidden_grad(model, x, y, plan)
    assert torch.count_nonzero(grad[masked]) == 0  # not one masked position moves the loss
    assert (grad[~masked].abs().sum(dim=-1) > 0).all()  # every other one does
    with torch.no_grad():
        logits = model(x)
    kept = ~masked
    expected = torch.nn.functional.cross_entropy(logits[kept], y[kept])  # the mean over unmasked targets only
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_the_padding_inputs_change_nothing():
    """What follows an example's end token (padding in, -100 out) is invisible to the loss and every gradient."""
    model = tiny_model()
    x, y = a_batch(mask_prompt=False)
    loss, _ = loss_and_hidden_grad(model, x, y, None)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # Each padding input after the one whose target is the end token: the target there is -100.
    after_end = torch.zeros_like(y, dtype=torch.bool)
    after_end[:, 1:] = y[:, :-1] == -100
    after_end |= y == -100
    assert after_end.any()
    noisy = x.clone()
    noisy[after_end] = torch.randint(0, 50000, (int(after_end.sum()),))
    loss2, _ = loss_and_hidden_grad(model, noisy, y, None)
    assert torch.equal(loss, loss2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=0, rtol=0, msg=n)


def test_prompt_targets_do_not_count_with_mask_prompt():
    """With --mask-prompt, what the prompt's targets were makes no difference to the loss: only the
    response's targets are compared."""
    from gptcli.training.loop import batch_loss

    model = tiny_model().eval()
    x, y_masked = a_batch(mask_prompt=True)
    _, y_full = a_batch(mask_prompt=False)
    prompt = (y_masked == -100) & (y_full != -100)
    assert prompt.any()
    changed = y_full.clone()
    changed[prompt] = (changed[prompt] + 1) % 50000  # other prompt targets: the full loss moves...
    kwargs = dict(device=torch.device("cpu"), dtype="float32")
    with torch.no_grad():
        assert batch_loss(model, x, changed, **kwargs) != batch_loss(model, x, y_full, **kwargs)
        masked_changed = changed.clone()
        masked_changed[prompt] = -100  # ...the response-only loss cannot
        assert torch.equal(batch_loss(model, x, masked_changed, **kwargs), batch_loss(model, x, y_masked, **kwargs))


def response_loss(model, data: "instruct.InstructData") -> float:
    """Mean cross-entropy over the response tokens (and end token) of the training examples."""
    import torch.nn.functional as F

    x, y = instruct.collate(data.train, mask_prompt=True)
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x).flatten(0, 1), y.flatten()).item()


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_instruction_training_lowers_the_response_loss(tmp_path, pairs, tiny, mask_prompt):
    from gptcli import training

    settings = {"task": "instruct", "epochs": 2, "batch_size": 4, "lr": 3e-3, "sample_every": 0, "eval_every": 100,
                "mask_prompt": mask_prompt}
    run = training.prepare_run(training.RunRequest(data=(str(pairs),), out=tmp_path / "run", config=str(tiny),
                                                   settings=settings))
    before = response_loss(run.model, run.task_data)
    trainer = training.Trainer(run)
    evs = list(trainer.events())
    after = response_loss(run.model, run.task_data)
    assert after < before - 2.0, (before, after)
    evals = [e for e in evs if e["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0
    start = evs[0]
    assert start["examples"] == {"train": 51, "val": 3, "test": 6} and start["mask_prompt"] is mask_prompt
    assert start["settings"]["task"] == "instruct" and start["max_length"] == 96


# --------------------------------------------------------------------------------------------
# The command


def test_cli_run_records_the_template_and_keeps_the_split(tmp_path, pairs, tiny):
    from gptcli.checkpoint import read_header

    out = tmp_path / "run"
    result = train(str(pairs), "--task", "instruct", "--config", str(tiny), "--out", str(out), "--epochs", "1",
                   "--batch-size", "8", "--sample-tokens", "4", "--json")
    assert result.exit_code == 0, result.stderr
    for path in (out / "model.safetensors", out / "best" / "model.safetensors"):
        meta = read_header(path).metadata
        assert meta[TEMPLATE_METADATA_KEY] == ALPACA == "alpaca" and meta["gptcli.task"] == "instruct"
    evs = events(result.stdout)
    start = evs[0]
    assert start["examples"] == {"train": 51, "val": 3, "test": 6}
    steps = [e for e in evs if e["event"] == "eval"]
    assert steps[-1]["step"] == 51 // 8 - 1  # drop_last: 6 steps in the epoch
    # tokens_seen counts the padded inputs, as the book's input_batch.numel()
    assert all(e["tokens_seen"] > 0 for e in steps)
    sample = next(e for e in evs if e["event"] == "sample")
    data = make_pairs()
    val_first = data[51 + 6]  # the book's split: 85% train, 10% test, then validation
    assert sample["prompt"] == format_input(val_first["instruction"], val_first.get("input", ""))
    saved = json.loads((out / "data" / "instruct.json").read_text())
    assert [instruct.Entry(**e) for e in saved["test"]] == [instruct.Entry(**{"input": "", **e})
                                                            for e in data[51:57]]
    assert "51 training, 3 validation and 6 test examples" in result.stderr
    assert "generate --interactive --weights" in result.stderr


def test_max_length_cuts_with_a_note(tmp_path, pairs, tiny):
    result = train(str(pairs), "--task", "instruct", "--config", str(tiny), "--out", str(tmp_path / "run"),
                   "--max-steps", "1", "--batch-size", "4", "--max-length", "40", "--sample-every", "0", "--json")
    assert result.exit_code == 0, result.stderr
    from gptcli.templates import format_example
    from gptcli.tokenizer import gpt2

    kept = make_pairs()[:51] + make_pairs()[57:]  # train and validation
    lengths = [len(gpt2().encode("".join(format_example(e["instruction"], e.get("input", ""), e["output"]))))
               for e in kept]
    long = sum(n > 40 for n in lengths)
    assert 0 < long < 54
    verb, ends = ("is", "its end is") if long == 1 else ("are", "their ends are")
    assert f"note: {long} of 54 training and validation examples {verb} longer than --max-length 40 tokens " \
        f"(the longest: {max(lengths)}); {ends} cut off" in result.stderr
    assert events(result.stdout)[0]["truncated"] == long
    line = one_error_line(train(str(pairs), "--task", "instruct", "--config", str(tiny), "--out",
                                str(tmp_path / "r2"), "--max-steps", "1", "--max-length", "97"))
    assert line == "error: --max-length 97 is longer than the model's context of 96 tokens"


def test_resume_is_bit_exact(tmp_path, pairs, tiny):
    from safetensors.torch import load_file

    common = [str(pairs), "--task", "instruct", "--config", str(tiny), "--batch-size", "4", "--sample-every", "0",
              "--eval-every", "4", "--mask-prompt", "--drop-rate", "0.1"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(*common, "--max-steps", "17", "--out", str(whole)).exit_code == 0  # 12 steps an epoch
    assert train(*common, "--max-steps", "5", "--out", str(parts)).exit_code == 0
    resumed = runner.invoke(app, ["train", "--resume", str(parts), "--max-steps", "17"])
    assert resumed.exit_code == 0, resumed.stderr
    a, b = load_file(whole / "state.safetensors"), load_file(parts / "state.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_recipe_book_ch07_at_a_small_size_with_its_data_served(tmp_path, tiny, monkeypatch):
    """--recipe book-ch07 with no DATA downloads its file (here from 127.0.0.1, a stand-in checked against
    its own sha256) and fine-tunes as the book: AdamW 5e-5, weight decay 0.1, batch 8, seed 123."""
    import hashlib

    from gptcli.training import downloads

    www = tmp_path / "www"
    www.mkdir()
    body = json.dumps(make_pairs(80)).encode()
    (www / "instruction-data.json").write_bytes(body)
    real = downloads.DATASETS["instruction-data"]
    monkeypatch.setitem(downloads.DATASETS, "instruction-data", downloads.Dataset(
        real.name, real.title, real.file, real.url, hashlib.sha256(body).hexdigest(), len(body)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}), directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GPTCLI_DATA_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        out = tmp_path / "run"
        result = train("--recipe", "book-ch07", "--weights", "random", "--config", str(tiny), "--out", str(out),
                       "--epochs", "1", "--json")
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.stderr
    start = events(result.stdout)[0]
    s = start["settings"]
    assert (s["task"], s["lr"], s["weight_decay"], s["batch_size"], s["seed"], s["epochs"]) == \
        ("instruct", 5e-5, 0.1, 8, 123, 1)
    assert start["examples"] == {"train": 68, "val": 4, "test": 8} and start["config"]["drop_rate"] == 0.0
    # The book's load_weights_into_gpt gives the head its own copy of the token embedding: it trains apart.
    assert start["config"]["tie_weights"] is False
    from safetensors.torch import load_file

    state = load_file(out / "state.safetensors")
    head, emb = state["model.out_head.weight"], state["model.tok_emb.weight"]
    assert head.shape == emb.shape and not torch.equal(head, emb)
    assert "downloading the book's instruction data" in result.stderr


def test_the_recipe_ships():
    from gptcli.training import TrainSettings, load_recipe
    from gptcli.training.downloads import dataset

    recipe = load_recipe("book-ch07")
    s = TrainSettings(**recipe.settings).validate()
    assert (recipe.size, recipe.weights, recipe.data, recipe.model) == ("355M", "auto", "instruction-data",
                                                                        {"drop_rate": 0.0, "tie_weights": False})
    assert (s.task, s.lr, s.weight_decay, s.epochs, s.batch_size, s.seed, s.mask_prompt) == \
        ("instruct", 5e-5, 0.1, 2, 8, 123, False)
    d = dataset("instruction-data")
    assert d.url == ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                     "instruction-data.json")
    assert (len(d.sha256), d.size) == (64, 203_524)


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "x", "output": "y"}', "pairs.json: expected a JSON list of {instruction, input, output} "
     "objects, got an object"),
    ("[]", "pairs.json: the list is empty; there is nothing to train on"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
     "pairs.json: entry 1 has no 'output' (each entry needs 'instruction' and 'output'; 'input' may be empty or "
     "left out)"),
    ('[{"input": "a", "output": "b"}]', "pairs.json: entry 0 has no 'instruction'"),
    ('[{"instruction": "a", "output": 3}]', "pairs.json: entry 0: 'output' must be a string, got a number"),
    ('[{"instruction": "a", "input": null, "output": "b"}]', "pairs.json: entry 0: 'input' must be a string, got null"),
    ('[{"instruction": ["a"], "output": "b"}]', "pairs.json: entry 0: 'instruction' must be a string, got a list"),
    ('["a"]', "pairs.json: entry 0 is a string, not an object with instruction, input and output"),
    ('[{"instruction": "a",', "pairs.json: not valid JSON: "),
    ('[{"instruction": "a", "output": "b"}]', "the training split has 0 of the 1 examples (the book's split: the "
     "first 85% train, the next 10% test, the last 5% validate), fewer than one step (batch size 2 x 1 "
     "accumulation)"),
])
def test_bad_data_is_one_line_and_nothing_is_written(tmp_path, tiny, content, message):
    data = tmp_path / "pairs.json"
    data.write_text(content)
    out = tmp_path / "run"
    line = one_error_line(train(str(data), "--task", "instruct", "--config", str(tiny), "--out", str(out),
                                "--max-steps", "1"))
    assert message in line
    assert not out.exists()


def test_bad_options(tmp_path, pairs, tiny):
    out = str(tmp_path / "run")
    assert one_error_line(train(str(pairs), "--task", "chat", "--max-steps", "1", "--out", out)) == \
        "error: unknown task 'chat'; choose lm, classify or instruct"
    assert one_error_line(train(str(pairs), "--mask-prompt", "--max-steps", "1", "--out", out)) == \
        "error: --mask-prompt is for --task instruct"
    assert "needs GPT-2's BPE" in one_error_line(train(str(pairs), "--task", "instruct", "--tokenizer", "char",
                                                       "--max-steps", "1", "--out", out))
    assert "one JSON file" in one_error_line(train(str(pairs), str(pairs), "--task", "instruct", "--config", str(tiny),
                                                   "--max-steps", "1", "--out", out))
    assert "fewer than one step" in one_error_line(train(str(pairs), "--task", "instruct", "--config", str(tiny),
                                                         "--batch-size", "64", "--max-steps", "1", "--out", out))


def test_the_memory_check_counts_the_longest_example_not_the_context(tmp_path, pairs, monkeypatch):
    """Padded batches are as long as their longest example (about 50 tokens here), not the context (1024):
    with memory between the two estimates, instruction training runs and windows of the context do not."""
    from gptcli import training
    from gptcli.config import resolve_config
    from gptcli.training.setup import estimate_memory

    cfg = resolve_config("124M", None).replace(n_layers=1)
    short = estimate_memory(cfg.replace(context_length=64), 2, False)["total"]
    full = estimate_memory(cfg, 2, False)["total"]
    assert full > 1.5 * short
    monkeypatch.setattr(training.setup, "available_memory", lambda device: (short + full) // 2)
    common = [str(pairs), "--size", "124M", "--n-layers", "1", "--max-steps", "1", "--sample-every", "0",
              "--eval-batches", "1"]
    assert train(*common, "--task", "instruct", "--out", str(tmp_path / "a")).exit_code == 0
    assert "needs about" in one_error_line(train(*common, "--out", str(tmp_path / "b")))  # the same text as windows


def test_export_keeps_the_prompt_template(tmp_path):
    """An exported instruct run still chats: its template goes into the exported file's metadata."""
    from gptcli.checkpoint import read_header
    from gptcli.export import export_weights
    from gptcli.templates import ALPACA, TEMPLATE_METADATA_KEY
    from helpers import lively_model, save_checkpoint

    path = save_checkpoint(lively_model(4, vocab_size=50257), tmp_path / "run", metadata={TEMPLATE_METADATA_KEY: ALPACA})
    written = export_weights(str(path), tmp_path / "out")
    assert written["template"] == ALPACA
    assert read_header(tmp_path / "out" / "model.safetensors").metadata[TEMPLATE_METADATA_KEY] == ALPACA
    plain = save_checkpoint(lively_model(4, vocab_size=50257), tmp_path / "plain")
    assert export_weights(str(plain), tmp_path / "out2")["template"] is None
    assert TEMPLATE_METADATA_KEY not in read_header(tmp_path / "out2" / "model.safetensors").metadata
