"""Batched generation (--each-line) gives every row the ids it gets alone."""

import pytest
import torch

from gptcli.batch import BatchDecoder, generate_batch
from gptcli.generate import Decoder, Generation, SamplingOptions
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
