"""Log-probabilities: `generate --logprobs K`, `score --tokens`, `score --worst N`.

transformers' GPT2LMHeadModel is the oracle: tiny random checkpoints written by its save_pretrained,
its log-softmax over the ids gptcli generated. A character-level checkpoint (gptcli's tokenizer
metadata added to transformers' file) makes `score --tokens` of prompt + continuation see exactly
the ids `generate` produced, so the two commands can be compared token for token.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from gptcli.cli import app  # noqa: E402
from gptcli.tokenizer import CharTokenizer, to_metadata  # noqa: E402
from helpers import hf_tiny_gpt2  # noqa: E402

runner = CliRunner()
FAST = ["--device", "cpu", "--dtype", "float32", "--no-tune"]
CHARS = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz .,\n")))


def hf_checkpoint(folder, vocab_size: int = 50257, seed: int = 0, tokenizer: CharTokenizer | None = None):
    """A tiny random GPT-2 saved by transformers (context 32); with ``tokenizer``, its metadata added."""
    model = hf_tiny_gpt2(folder, seed=seed, vocab_size=vocab_size, n_positions=32, initializer_range=0.2,
                         attn_implementation="eager")
    if tokenizer is not None:
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", **to_metadata(tokenizer)})
    return model


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of ``ids``: (T, V), row t predicting ids[t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0].float(), dim=-1)


def run_json(*args, input=None) -> dict:
    result = runner.invoke(app, [*args, "--json"], input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def check_against(logp: torch.Tensor, first: int, token_ids: list[int], logprobs: dict, k: int) -> None:
    """``logprobs`` (OpenAI's format) of tokens ``token_ids``, the first predicted by row ``first`` of ``logp``."""
    assert len(logprobs["token_logprobs"]) == len(token_ids) == len(logprobs["top_logprobs"])
    for n, token_id in enumerate(token_ids):
        row = logp[first + n]
        assert abs(logprobs["token_logprobs"][n] - row[token_id].item()) < 1e-4
        top = logprobs["top_logprobs"][n]
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        expected = torch.topk(row, k).values.tolist()
        assert all(abs(a - b) < 1e-4 for a, b in zip(values[:k], expected))
        # As OpenAI's: the chosen token is there too, one entry more when it is not among the K likeliest.
        chosen_in_top = token_id in torch.topk(row, k).indices.tolist()
        assert len(top) == (k if chosen_in_top else k + 1)
        assert abs(top[logprobs["tokens"][n]] - logprobs["token_logprobs"][n]) < 1e-6


@pytest.mark.parametrize("temperature", ["0", "3"])
def test_generate_logprobs_agree_with_transformers(tmp_path, temperature):
    """Greedy and sampled at temperature 3: the model's own distribution either way (before temperature)."""
    model = hf_checkpoint(tmp_path / "gpt2", seed=1)
    data = run_json("generate", "The quick brown fox", "--weights", str(tmp_path / "gpt2"), "-n", "8",
                    "--ignore-eos", "-t", temperature, "--top-k", "50", "--logprobs", "5", *FAST)
    ids = data["prompt_token_ids"] + data["token_ids"]
    logp = hf_logprobs(model, ids)
    lp = data["logprobs"]
    check_against(logp, len(data["prompt_token_ids"]) - 1, data["token_ids"], lp, k=5)
    if temperature == "0":  # greedy: the chosen token is the likeliest
        assert all(lp["token_logprobs"][n] == max(lp["top_logprobs"][n].values()) for n in range(8))
    assert "".join(lp["tokens"]) == data["text"]
    # Offsets count from the start of the prompt, as OpenAI's do.
    full = data["prompt"] + data["text"]
    assert [full[o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]


def test_generate_and_score_tokens_agree_with_each_other_and_transformers(tmp_path):
    tokenizer = CharTokenizer(CHARS)
    model = hf_checkpoint(tmp_path / "char", vocab_size=len(CHARS), seed=2, tokenizer=tokenizer)
    weights = ["--weights", str(tmp_path / "char")]
    gen = run_json("generate", "hello there", *weights, "-n", "12", "--logprobs", "3", *FAST)
    prompt, text = gen["prompt"], gen["text"]
    assert len(prompt + text) <= 32  # one window: both commands see the same context
    (tmp_path / "t.txt").write_text(prompt + text)
    score = run_json("score", str(tmp_path / "t.txt"), *weights, "--tokens", "--worst", "4", *FAST)
    [result] = score["results"]
    scored = result["logprobs"]
    ids = tokenizer.encode(prompt + text)
    assert ids == gen["prompt_token_ids"] + gen["token_ids"]
    assert scored["tokens"] == list(prompt + text) and scored["token_logprobs"][0] is None
    new = scored["token_logprobs"][len(prompt):]
    assert all(abs(a - b) < 1e-4 for a, b in zip(new, gen["logprobs"]["token_logprobs"]))
    logp = hf_logprobs(model, ids)
    assert all(abs(scored["token_logprobs"][t] - logp[t - 1, ids[t]].item()) < 1e-4 for t in range(1, len(ids)))
    # The loss is the mean of the tokens' negated log-probabilities.
    assert abs(-sum(scored["token_logprobs"][1:]) / result["tokens"] - result["loss"]) < 1e-4
    # --worst: the 4 smallest, most surprising first.
    values = scored["token_logprobs"]
    smallest = sorted(range(1, len(values)), key=lambda i: values[i])[:4]
    assert [w["index"] for w in result["worst"]] == smallest
    assert [w["logprob"] for w in result["worst"]] == [values[i] for i in smallest]
    assert all(w["token"] == (prompt + text)[w["index"]] == (prompt + text)[w["text_offset"]] for w in result["worst"])


def test_each_line_logprobs_equal_single_runs(tmp_path):
    hf_checkpoint(tmp_path / "gpt2", seed=3)
    weights = ["--weights", str(tmp_path / "gpt2"), "-n", "5", "--ignore-eos", "--logprobs", "2", *FAST]
    result = runner.invoke(app, ["generate", "--each-line", "--json", *weights], input="Hello there\nA\n")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    for line in lines:
        alone = run_json("generate", line["prompt"], *weights)
        assert line["token_ids"] == alone["token_ids"]
        assert line["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
        assert line["logprobs"]["text_offset"] == alone["logprobs"]["text_offset"]
        assert all(abs(a - b) < 1e-4 for a, b in zip(line["logprobs"]["token_logprobs"],
                                                       alone["logprobs"]["token_logprobs"]))


def test_score_tokens_and_worst_tables(tmp_path, tiny):
    (tmp_path / "t.txt").write_text("The cat sat on the mat. 🫠")
    result = runner.invoke(app, ["score", str(tmp_path / "t.txt"), *tiny, "--tokens", "--worst", "2", *FAST])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "t.txt: 10 tokens, each with its log-probability" in out
    assert "␣cat" in out and "<0xF0><0x9F>" in out
    assert "the 2 least likely tokens, most surprising first" in out
    assert out.rstrip().splitlines()[-1].split()[1:3] == ["9", "28"]  # the score table still ends it


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--logprobs", "21", "--json"], "error: --logprobs must be 0 to 20"),
    (["generate", "hi", "--logprobs", "2"], "error: --logprobs adds log-probabilities to --json's output"),
    (["generate", "hi", "--show-probs", "--json"], "error: --show-probs colours streamed text"),
    (["generate", "--each-line", "--show-probs"], "error: --show-probs colours one streamed continuation"),
    (["score", "--each-line", "--tokens"], "error: --tokens, --worst and --show look at whole texts"),
    (["score", "x.txt", "--worst", "0"], "error: --worst must be 1 or more, got 0"),
])
def test_bad_combinations_are_one_line_and_exit_2(args, message):
    result = runner.invoke(app, args, input="a\n")
    assert result.exit_code == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
