"""Batched generation (--each-line) gives every row the ids it gets alone."""

import pytest
import torch

from gptcli.decoding.batch import BatchDecoder, generate_batch
from gptcli.decoding.generate import Decoder, Generation, SamplingOptions
from helpers import lively_model

CPU = torch.device("cpu")


def fake_bytes(token_id: int) -> bytes:
    return f"<{token_id}>".encode()


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13], list(range(20, 40))]  # the last is longer than 16


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_equals_one_by_one_past_the_window(temperature):
    model = lively_model(3)
    options = SamplingOptions(max_new_tokens=25, temperature=temperature, seed=11, ignore_eos=True)
    results, timings = generate_batch(BatchDecoder(model, CPU, torch.float32), PROMPTS, options, token_bytes=fake_bytes)
    for prompt, result in zip(PROMPTS, results):
        alone = Generation(Decoder(model, CPU, torch.float32), prompt, options, token_bytes=fake_bytes).run()
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text
        assert result.finish_reason == alone.finish_reason == "length"
    assert len({t for r in results for t in r.token_ids}) > 10  # lively enough to mean something
    assert timings.decode_tokens == len(PROMPTS) * 24


def test_rows_finish_on_their_own_terms():
    model = lively_model(3, tie=False)
    probe = Generation(Decoder(model, CPU, torch.float32), PROMPTS[0], SamplingOptions(max_new_tokens=6, temperature=1.0, seed=5),
                       token_bytes=fake_bytes).run()
    eos = probe.token_ids[3]  # call the 4th token of row 0 "end of text"
    stop = f"<{probe.token_ids[1]}>"
    options = SamplingOptions(max_new_tokens=6, temperature=1.0, seed=5)
    results, _ = generate_batch(BatchDecoder(model, CPU, torch.float32), PROMPTS[:2], options, eos_id=eos,
                                token_bytes=fake_bytes)
    alone = Generation(Decoder(model, CPU, torch.float32), PROMPTS[0], options, eos_id=eos, token_bytes=fake_bytes).run()
    assert results[0].finish_reason == alone.finish_reason == "eos"
    assert results[0].token_ids == alone.token_ids and len(alone.token_ids) <= 4
    stopped, _ = generate_batch(BatchDecoder(model, CPU, torch.float32), PROMPTS[:1],
                                SamplingOptions(max_new_tokens=6, temperature=1.0, seed=5, stop=(stop,)),
                                token_bytes=fake_bytes)
    assert stopped[0].finish_reason == "stop" and stop not in stopped[0].text


def test_zero_new_tokens():
    results, _ = generate_batch(BatchDecoder(lively_model(3), CPU, torch.float32), PROMPTS, SamplingOptions(max_new_tokens=0))
    assert all(r.token_ids == [] and r.finish_reason == "length" for r in results)


def _logits_alone_and_batched(model, dtype, prompts, feed):
    """Logits (prefill, then one per fed id) of each prompt decoded alone, and of the same rows in one batch."""
    batch = BatchDecoder(model, CPU, dtype)
    batched = [batch.prefill(prompts, len(feed) + 1)] + [batch.step(ids) for ids in feed]
    alone = []
    for row, prompt in enumerate(prompts):
        decoder = Decoder(model, CPU, dtype)
        alone.append([decoder.prefill(prompt, len(feed) + 1)] + [decoder.step(ids[row]) for ids in feed])
    return alone, batched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", ["plain", "tuned", "onednn"])
def test_batch_rows_are_bit_identical_to_lone_rows(dtype, kernels):
    """--each-line's promise at the logits: a row's numbers do not depend on the rest of the batch.

    What it relies on (CPU, eager, float32/bfloat16): oneDNN's linear gives a row the same bits among
    2..N rows, so a lone row is multiplied as two (kernels.onednn_linear); the tuner never picks a
    kernel whose rows change with the batch ("tuned": whichever kernels won on this CPU); attention
    runs each row over its own real keys (model._attend_rows). Checked on an AMD EPYC, where one
    masked attention call or a one-row product moved logits by ~1e-6; python bench/batch_invariance.py
    checks each kernel on another CPU.
    """
    from gptcli.kernels.decode import DecodePlan as Plan, apply, tune

    model = lively_model(4).to(dtype)
    if kernels != "plain":
        plan = tune(model) if kernels == "tuned" else Plan("eager", {})  # an empty plan: the default, oneDNN
        assert sum(apply(model, plan).values()) == 2 * 4 + 1  # 4 Linear per block, 2 blocks, the head
    # Left-padded rows, two of one length (no padding between them), one longer than the context (16).
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 40)), [7, 8, 9]]
    feed = [[(31 * step + 7 * row) % 300 for row in range(len(prompts))] for step in range(14)]  # past the window
    alone, batched = _logits_alone_and_batched(model, dtype, prompts, feed)
    for row in range(len(prompts)):
        for step, logits in enumerate(alone[row]):
            assert torch.equal(logits[0], batched[step][row]), (row, step)


def test_masked_batch_attention_still_matches_lone_rows(monkeypatch):
    """The path a GPU takes (one attention call under the padding mask): equal to the lone rows to rounding,
    including rows that keep their cache while a longer one has outgrown the window."""
    import gptcli.model.attention

    monkeypatch.setattr(gptcli.model.attention, "ROW_ATTENTION_DEVICES", ())
    model = lively_model(6)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [12, 13, 14]]
    feed = [[(31 * step + 7 * row) % 300 for row in range(len(prompts))] for step in range(10)]
    alone, batched = _logits_alone_and_batched(model, torch.float32, prompts, feed)
    for row in range(len(prompts)):
        for step, logits in enumerate(alone[row]):
            torch.testing.assert_close(logits[0], batched[step][row], atol=1e-5, rtol=1e-5)


def _run_continuously(model, jobs, max_rows):
    """Decode ``jobs`` (prompt, options, arrival step) with rows joining and leaving a BatchDecoder
    between steps, at most ``max_rows`` at once; each job's ids, and the most rows seen together."""
    from gptcli.decoding.batch import BatchDecoder
    from gptcli.decoding.generate import Continuation, make_generator, select_next

    decoder = BatchDecoder(model, CPU, torch.float32)
    waiting, active, results, step, peak, joined = list(range(len(jobs))), [], {}, 0, 0, 0

    def pick(row, logits):
        options = jobs[row[0]][1]
        row[3] = int(select_next(logits, options, row[2])[0])
        row[1].accept(row[3])

    def release_finished():
        nonlocal active
        keep = [k for k, row in enumerate(active) if not row[1].done]
        for row in active:
            if row[1].done:
                results[row[0]] = row[1].token_ids
        if len(keep) < len(active):
            decoder.release(keep)
            active = [active[k] for k in keep]

    while waiting or active:
        arrived = [j for j in waiting if jobs[j][2] <= step][: max_rows - len(active)]
        if arrived:
            joined += len(arrived) if active else 0
            for j in arrived:
                waiting.remove(j)
            logits = decoder.admit([jobs[j][0] for j in arrived], [jobs[j][1].max_new_tokens for j in arrived])
            for k, j in enumerate(arrived):
                options = jobs[j][1]
                row = [j, Continuation(options, None, fake_bytes), None if options.greedy else make_generator(options.seed), -1]
                active.append(row)
                pick(row, logits[k : k + 1])
            release_finished()
        peak = max(peak, len(active))
        step += 1
        if active:
            logits = decoder.step([row[3] for row in active])
            for k, row in enumerate(active):
                pick(row, logits[k : k + 1])
            release_finished()
    return results, peak, joined


def test_rows_that_join_and_leave_a_running_batch_get_the_ids_they_get_alone():
    """gptcli serve's continuous batching: rows are prefilled on their own and spliced into the running
    cache, leave it when done, and outgrow the window at their own time; each still gets its lone ids."""
    import random

    model = lively_model(3)
    rng = random.Random(0)
    jobs = []
    for j in range(14):
        prompt = [rng.randrange(300) for _ in range(rng.randint(1, 20))]  # some longer than the window (16)
        options = SamplingOptions(max_new_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 1.0]), seed=j,
                                  ignore_eos=True)
        jobs.append((prompt, options, rng.randint(0, 20)))
    results, peak, joined = _run_continuously(model, jobs, max_rows=4)
    assert peak == 4 and joined > 3  # the batch was full and rows joined it while others ran
    for j, (prompt, options, _) in enumerate(jobs):
        alone = Generation(Decoder(model, CPU, torch.float32), prompt, options, eos_id=None, token_bytes=fake_bytes).run()
        assert results[j] == alone.token_ids, j
