"""gptcli.scoring: the per-token cross-entropy, the sliding windows and the batched scoring behind `gptcli score`.

The reference here is the plainest computation: each window run alone through the full model
(every position's logits) and F.cross_entropy over the tokens it scores. transformers' method is the
oracle in test_cli_score.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptcli.errors import UserError
from gptcli.scoring import (
    Score,
    check_stride,
    count_predictions,
    encode_texts,
    score_ids,
    sliding_windows,
    token_nll,
    total,
)
from gptcli.tokenizer import EOT_ID, CharTokenizer, gpt2
from helpers import lively_model

CONTEXT = 16  # lively_model's


def random_ids(n: int, seed: int = 1, vocab: int = 300) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def windows_one_by_one(model, ids: list[int], stride: int) -> tuple[int, float]:
    """(predictions, total nats): every window through the whole model, full logits, one at a time."""
    count, nats = 0, 0.0
    prev_end = 0
    for start in range(0, len(ids), stride):
        end = min(start + CONTEXT, len(ids))
        first = max(prev_end, start + 1)
        x = torch.tensor([ids[start:end]])
        with torch.no_grad():
            logits = model(x)[0]  # (L, V)
        k = first - start  # targets from window position k on, predicted by the position before
        if k < end - start:
            nats += F.cross_entropy(logits[k - 1 : -1], x[0, k:], reduction="sum").item()
            count += end - first
        prev_end = end
        if end == len(ids):
            break
    return count, nats


# ---------------------------------------------------------------------------------------------
# token_nll


def test_token_nll_is_cross_entropy_per_token_in_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4  # (B, T, V)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    nll = token_nll(logits, targets)
    assert nll.shape == (3, 5) and nll.dtype == torch.float32
    torch.testing.assert_close(nll.mean(), F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    by_hand = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(nll, by_hand)
    half = token_nll(logits.bfloat16(), targets)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, token_nll(logits.bfloat16().float(), targets))


# ---------------------------------------------------------------------------------------------
# Windows, as the issue defines them


@pytest.mark.parametrize("n,stride", [(2, 8), (16, 8), (17, 8), (40, 1), (40, 5), (40, 15), (100, 7), (33, 12)])
def test_windows_below_the_context_score_every_token_after_the_first_once(n, stride):
    windows = sliding_windows(n, CONTEXT, stride)
    assert [w.start for w in windows] == [k * stride for k in range(len(windows))]
    assert windows[-1].end == n
    assert all(w.end == min(w.start + CONTEXT, n) for w in windows)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert scored == list(range(1, n))
    assert all(w.first_target > w.start for w in windows)  # each target has context inside its window
    assert count_predictions(n, CONTEXT, stride) == n - 1


@pytest.mark.parametrize("n", [16, 17, 32, 40])
def test_disjoint_windows_leave_each_window_first_token_unscored(n):
    windows = sliding_windows(n, CONTEXT, CONTEXT)
    starts = list(range(0, n, CONTEXT))
    unscored = {0} | set(starts)
    assert [t for w in windows for t in range(w.first_target, w.end)] == [t for t in range(n) if t not in unscored]
    assert all(w.first_target == w.start + 1 for w in windows)


def test_short_texts_have_nothing_to_score():
    assert sliding_windows(0, CONTEXT, 8) == [] and sliding_windows(1, CONTEXT, 8) == []
    assert sliding_windows(CONTEXT + 1, CONTEXT, CONTEXT)[-1].end == CONTEXT  # a lone last token is not a window


@pytest.mark.parametrize("stride,message", [(0, "1 or more, got 0"), (-2, "1 or more, got -2"),
                                            (17, "above the model's context of 16 tokens")])
def test_bad_strides(stride, message):
    with pytest.raises(UserError, match=message):
        check_stride(stride, CONTEXT)
    with pytest.raises(UserError, match=message):
        sliding_windows(40, CONTEXT, stride)


# ---------------------------------------------------------------------------------------------
# Batched scoring equals one window at a time


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return lively_model(0)


@pytest.mark.parametrize("stride", [1, 5, 8, 15, 16])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_windows_equal_one_window_at_a_time(model, stride, batch_size):
    ids = random_ids(90)
    expected_count, expected_nats = windows_one_by_one(model, ids, stride)
    [(count, nats)] = score_ids(model, [ids], stride=stride, batch_size=batch_size)
    assert count == expected_count
    assert nats == pytest.approx(expected_nats, rel=1e-5)


def test_texts_of_many_lengths_scored_together_equal_each_alone(model):
    texts = [random_ids(n, seed=n) for n in (0, 1, 2, 5, 15, 16, 17, 40, 3)]
    together = score_ids(model, texts, batch_size=4)  # padded batches of mixed widths
    for ids, (count, nats) in zip(texts, together):
        [(alone_count, alone_nats)] = score_ids(model, [ids], batch_size=1)
        assert count == alone_count == max(len(ids) - 1, 0)
        assert nats == pytest.approx(alone_nats, rel=1e-5, abs=1e-6)


def test_the_default_stride_is_half_the_context(model):
    ids = random_ids(50)
    assert score_ids(model, [ids]) == score_ids(model, [ids], stride=CONTEXT // 2)


def test_the_head_is_chunked_without_changing_the_result(model, monkeypatch):
    ids = random_ids(60)
    whole = score_ids(model, [ids], stride=4)
    monkeypatch.setattr("gptcli.scoring.HEAD_CHUNK_ELEMENTS", 300 * 7)  # 7 positions per chunk
    [(count, nats)] = score_ids(model, [ids], stride=4)
    assert count == whole[0][0] and nats == pytest.approx(whole[0][1], rel=1e-6)


def test_progress_reports_every_batch_up_to_the_total(model):
    calls = []
    texts = [random_ids(60), random_ids(7)]
    results = score_ids(model, texts, stride=4, batch_size=2, progress=lambda done, goal: calls.append((done, goal)))
    goal = sum(count for count, _ in results)
    assert calls[0] == (0, goal) and calls[-1] == (goal, goal)
    assert all(g == goal for _, g in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) > 3


def test_bfloat16_model_scores_close_to_float32():
    model = lively_model(0)
    ids = random_ids(50)
    [(count, nats)] = score_ids(model, [ids])
    [(half_count, half_nats)] = score_ids(model.to(torch.bfloat16), [ids])
    assert half_count == count and half_nats == pytest.approx(nats, rel=2e-2)


# ---------------------------------------------------------------------------------------------
# Scores and encoding


def test_score_fields():
    s = Score(tokens=4, nll=8.0, bytes=10)
    assert s.loss == 2.0 and s.perplexity == pytest.approx(math.exp(2.0))
    assert s.bits_per_byte == pytest.approx(8.0 / math.log(2) / 10)
    empty = Score(tokens=0, nll=0.0, bytes=3)
    assert empty.loss is None and empty.perplexity is None and empty.bits_per_byte is None
    assert Score(tokens=1, nll=800.0, bytes=1).perplexity == math.inf


def test_total_weights_by_tokens():
    both = total([Score(1, 10.0, 5), Score(3, 6.0, 7), Score()])
    assert (both.tokens, both.nll, both.bytes) == (4, 16.0, 12)
    assert both.loss == 4.0  # not the mean of 10 and 2


def test_bos_prepends_endoftext_for_gpt2_only():
    assert encode_texts(gpt2(), ["Hello", ""], bos=True) == [[EOT_ID, 15496], [EOT_ID]]
    assert encode_texts(gpt2(), ["Hello world"]) == [[15496, 995]]
    with pytest.raises(UserError, match="--bos .* char tokenizer"):
        encode_texts(CharTokenizer("abc"), ["abc"], bos=True)


def test_a_character_outside_the_vocabulary_names_its_text():
    with pytest.raises(UserError, match="vocabulary of 3 .*: notes.txt: 'z'$"):
        encode_texts(CharTokenizer("abc"), ["ab", "abz"], names=["a.txt", "notes.txt"])
    with pytest.raises(UserError, match="vocabulary of 3 .*: a.txt: 'x'; notes.txt: 'y', 'z'$"):
        encode_texts(CharTokenizer("abc"), ["abx", "zyz"], names=["a.txt", "notes.txt"])
