"""gptcli.decoding.logprobs: the model's own log-probabilities, in OpenAI's legacy completions format."""

import math

import torch

from gptcli.decoding.logprobs import openai_logprobs, sequence_logprobs, step_logprobs, token_text


def test_step_logprobs_are_the_log_softmax_and_the_top_is_sorted():
    logits = torch.tensor([[2.0, 0.5, -1.0, 3.0], [0.0, 0.0, 1.0, 0.0]])
    entries = step_logprobs(logits, [0, 2], k=3)
    expected = torch.log_softmax(logits, dim=-1)
    assert math.isclose(entries[0].logprob, expected[0, 0].item(), rel_tol=1e-6)
    assert [i for i, _ in entries[0].top] == [3, 0, 1]
    values = [v for _, v in entries[1].top]
    assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-6
    assert step_logprobs(logits.bfloat16(), [0, 2], k=0)[0].top == ()


def test_sequence_logprobs_give_the_first_token_none():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    entries = sequence_logprobs(logits, [4, 1, 2], k=2)
    assert entries[0].logprob is None and entries[0].token_id == 4
    assert math.isclose(entries[2].logprob, torch.log_softmax(logits[1], -1)[2].item(), rel_tol=1e-6)


def test_openai_format_offsets_and_partial_characters():
    pieces = {0: b"Hi", 1: b" \xe2", 2: b"\x82\xac", 3: b"!"}  # " €" split across two tokens
    entries = step_logprobs(torch.zeros(4, 4), [0, 1, 2, 3], k=1)
    out = openai_logprobs(entries, pieces.__getitem__, start_offset=5)
    assert out["tokens"] == ["Hi", "bytes:\\x20\\xe2", "bytes:\\x82\\xac", "!"]
    assert out["text_offset"] == [5, 7, 8, 9]
    assert token_text(b"\xe2\x82\xac") == "\u20ac"
    assert all(token in d and len(d) <= 2 for token, d in zip(out["tokens"], out["top_logprobs"]))


def test_top_logprobs_hold_the_chosen_token_as_openais_do():
    """OpenAI returns up to K + 1 entries: the K likeliest and, when it is not among them, the chosen token."""
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    pieces = {0: b"a", 1: b"b", 2: b"c", 3: b"d"}
    entries = step_logprobs(logits, [3, 1], k=2)  # row 0 chose the least likely, row 1 one of the top 2
    out = openai_logprobs(entries, pieces.__getitem__)
    expected = torch.log_softmax(logits[0], -1).tolist()
    assert list(out["top_logprobs"][0]) == ["a", "b", "d"]
    assert out["top_logprobs"][0]["d"] == out["token_logprobs"][0] == expected[3]
    assert list(out["top_logprobs"][1]) == ["a", "b"]
    assert openai_logprobs(step_logprobs(logits, [3, 1], k=0), pieces.__getitem__)["top_logprobs"] == [{}, {}]
