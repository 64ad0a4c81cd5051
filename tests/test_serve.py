"""`gptcli serve` as clients use it: a server subprocess on 127.0.0.1 with a tiny checkpoint, driven by
the real `openai` client, raw HTTP for the wire format and the error objects, and signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from helpers import imported_modules  # noqa: E402
from test_metrics import parse_exposition, value_of  # noqa: E402
from servers import (  # noqa: E402
    CONTEXT, Server, health, open_stream, server_env, sse_events, wait_idle, write_tiny_checkpoint,
)

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"  # the checkpoint's folder name: the id /v1/models lists


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def env(tiktoken_cache, tmp_path_factory) -> dict[str, str]:
    return server_env(tiktoken_cache, tmp_path_factory.mktemp("gptcli-cache"))


@pytest.fixture(scope="module")
def server(checkpoint, env):
    srv = Server(["--weights", str(checkpoint), "--api-key", KEY, "--max-batch", "8", "--max-queue", "16"], env)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


def extra(obj, name):
    """A field the openai client keeps as an extra (vLLM's return_token_ids)."""
    return obj.model_dump()[name]


# ---------------------------------------------------------------------------------------------
# Endpoints


def test_health_models_tokenize_and_detokenize(server):
    assert health(server)["status"] == "ok"
    status, body = server.json("GET", "/v1/models", headers=AUTH)
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL] and body["data"][0]["max_model_len"] == CONTEXT
    from gptcli.tokenizer import encode

    status, body = server.json("POST", "/tokenize", {"prompt": "Hello, world"}, headers=AUTH)
    assert status == 200 and body["tokens"] == encode("Hello, world") and body["count"] == len(body["tokens"])
    status, body = server.json("POST", "/detokenize", {"tokens": encode("Hello, world")}, headers=AUTH)
    assert status == 200 and body == {"prompt": "Hello, world"}


def test_the_openai_client_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_completion_and_finish_reason_length(client):
    r = client.completions.create(model=MODEL, prompt="Hello, I am", max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL and choice.index == 0
    assert choice.finish_reason == "length" and choice.text
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 6 and r.usage.total_tokens == 10
    again = client.completions.create(model=MODEL, prompt="Hello, I am", max_tokens=6, temperature=0)
    assert again.choices[0].text == choice.text


def test_streaming_gives_the_same_text_in_pieces(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0.9,
                                      seed=4)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0.9,
                                            seed=4, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    with_ids = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0.9,
                                         seed=4, extra_body={"return_token_ids": True})
    streamed_ids = [t for c in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                                         temperature=0.9, seed=4, stream=True,
                                                         extra_body={"return_token_ids": True})
                    for t in extra(c.choices[0], "token_ids")]
    assert streamed_ids == extra(with_ids.choices[0], "token_ids") and len(streamed_ids) == 12


def test_n_choices_are_seed_seed_plus_one_and_so_on(client):
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=1.0, seed=40, n=3,
                                  extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for j, choice in enumerate(r.choices):
        alone = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=1.0,
                                          seed=40 + j, extra_body={"return_token_ids": True})
        assert extra(choice, "token_ids") == extra(alone.choices[0], "token_ids")
        assert choice.text == alone.choices[0].text
    assert len({c.text for c in r.choices}) == 3
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == 3


def test_a_list_of_prompts_gives_prompt_major_choices(client):
    r = client.completions.create(model=MODEL, prompt=["Hello", "Hello,"], max_tokens=3, temperature=0, n=2)
    assert len(r.choices) == 4
    first = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0).choices[0].text
    second = client.completions.create(model=MODEL, prompt="Hello,", max_tokens=3, temperature=0).choices[0].text
    assert [c.text for c in r.choices] == [first, first, second, second] and first != second
    by_ids = client.completions.create(model=MODEL, prompt=[[15496], [15496, 11]], max_tokens=3, temperature=0)
    assert [c.text for c in by_ids.choices] == [first, second]
    one_id_list = client.completions.create(model=MODEL, prompt=[15496, 11], max_tokens=3, temperature=0)
    assert [c.text for c in one_id_list.choices] == [second]


def test_stop_strings_end_the_text_and_are_not_in_it(client):
    full = client.completions.create(model=MODEL, prompt="Hi", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and full.index(stop) > 0
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=12, temperature=0, stop=[stop, "never!"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt="Hi", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_logprobs_are_the_models_own(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    # counted from the start of the prompt, as OpenAI's API (and gptcli generate --logprobs) count
    assert lp.text_offset == [len("Hello there") + sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == logprob == top[token]  # greedy: the likeliest
        assert list(top.values()) == sorted(top.values(), reverse=True)
    # echo with max_tokens 0: the prompt's own log-probabilities, the first with none (perplexity)
    echoed = client.completions.create(model=MODEL, prompt="Hello there" + r.choices[0].text, max_tokens=0,
                                       echo=True, logprobs=1)
    choice = echoed.choices[0]
    assert choice.text == "Hello there" + r.choices[0].text and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert echoed.usage.completion_tokens == 0
    # the generated tokens' log-probabilities, scored as one text: the same numbers
    assert choice.logprobs.token_logprobs[-5:] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_top_logprobs_hold_the_sampled_token_as_openais_do(client):
    """OpenAI returns up to logprobs + 1 entries: the K likeliest, and the sampled token when it is not among them."""
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=10, temperature=2, seed=5,
                                  logprobs=1, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    outside = 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob
        likeliest = max(top.values())
        assert len(top) == (1 if logprob == likeliest else 2)
        outside += len(top) == 2
    assert outside >= 3  # at temperature 2 over 50257 tokens, most draws are not the likeliest

    # Seeds span what gptcli generate takes: up to 2**64 - 1.
    last = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=1, seed=2**64 - 1)
    assert last.choices[0].finish_reason == "length"


def test_echo_puts_the_prompt_first_and_streams_it_first(client):
    r = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, temperature=0, echo=True, logprobs=0)
    plain = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, temperature=0)
    assert r.choices[0].text == "Echo me" + plain.choices[0].text
    from gptcli.tokenizer import encode

    lp, prompt_tokens = r.choices[0].logprobs, len(encode("Echo me"))
    assert "".join(lp.tokens[:prompt_tokens]) == "Echo me" and len(lp.tokens) == prompt_tokens + 3
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1] is not None
    assert lp.text_offset[prompt_tokens] == len("Echo me")
    chunks = list(client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == "Echo me"
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_streaming_with_logprobs_has_one_token_per_chunk(client):
    """What a playground page needs: /v1/completions streamed, with each token's log-probabilities."""
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, stream=True,
                                            logprobs=2))
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=2)
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == whole.choices[0].logprobs.tokens
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == whole.choices[0].logprobs.text_offset
    assert [p for c in chunks for p in c.choices[0].logprobs.token_logprobs] == whole.choices[0].logprobs.token_logprobs


def test_sse_framing_on_the_wire(server):
    status, headers, data = server.request("POST", "/v1/completions", {
        "model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}, headers=AUTH)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_the_chat_endpoint_says_to_use_completions(client, server):
    """A model whose checkpoint names no template (tests/test_serve_chat.py has one that does) has no chat."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in info.value.body["message"] and "no chat format" in info.value.body["message"]
    assert info.value.body["code"] == "unsupported_endpoint"
    status, body = server.json("GET", "/v1/models", headers=AUTH)
    assert status == 200 and body["data"][0]["chat_template"] is None


# ---------------------------------------------------------------------------------------------
# OpenAI's logit_bias, frequency_penalty and presence_penalty


def _ids(client, **fields) -> list[int]:
    body = {"prompt": "Hello", "max_tokens": 10, "temperature": 0, **fields}
    r = client.completions.create(model=MODEL, extra_body={"return_token_ids": True, "ignore_eos": True}, **body)
    return extra(r.choices[0], "token_ids")


def test_a_strongly_negative_logit_bias_bans_the_greedy_tokens(client):
    plain = _ids(client)
    banned = {str(t): -100 for t in set(plain)}
    biased = _ids(client, logit_bias=banned)
    assert biased != plain and not set(biased) & set(plain)  # no banned id ever appears
    first_only = _ids(client, logit_bias={str(plain[0]): -100})
    assert first_only[0] != plain[0] and plain[0] not in first_only
    sampled = _ids(client, logit_bias=banned, temperature=1.0, seed=3, max_tokens=30)
    assert not set(sampled) & set(plain)


def test_a_positive_logit_bias_forces_an_id_and_logprobs_stay_the_models(client):
    forced = 464  # "The": nothing the tiny model picks greedily after "Hello"
    assert forced not in _ids(client)
    assert _ids(client, logit_bias={str(forced): 100}) == [forced] * 10
    assert _ids(client, logit_bias={str(forced): 100}, temperature=1.0, seed=5) == [forced] * 10
    # The log-probabilities are the model's own, before the bias (as before temperature): the forced
    # token's are what scoring the same text gives, and the likeliest token is another one.
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
                                  logit_bias={str(forced): 100})
    lp = r.choices[0].logprobs
    assert lp.tokens == ["The"] * 4
    assert all(max(top.values()) > logprob for top, logprob in zip(lp.top_logprobs, lp.token_logprobs))
    scored = client.completions.create(model=MODEL, prompt="Hello" + r.choices[0].text, max_tokens=0, echo=True,
                                       logprobs=0)
    assert scored.choices[0].logprobs.token_logprobs[-4:] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_frequency_and_presence_penalties_reduce_repetition(client):
    plain = _ids(client, max_tokens=40)
    assert len(set(plain)) <= 10  # the tiny model loops greedily
    for fields in ({"frequency_penalty": 1.0}, {"presence_penalty": 1.0}, {"frequency_penalty": 0.3}):
        penalized = _ids(client, max_tokens=40, **fields)
        assert len(set(penalized)) > 2 * len(set(plain)), fields
    # a negative frequency penalty rewards repeats: fewer distinct ids than with a positive one
    assert len(set(_ids(client, max_tokens=40, frequency_penalty=-1.0))) < len(set(_ids(client, max_tokens=40,
                                                                                          frequency_penalty=1.0)))
    # Only generated ids are counted (OpenAI's definition): a prompt full of the greedy token does not stop it.
    first = plain[0]
    repeated_prompt = client.completions.create(model=MODEL, prompt=[first] * 8, max_tokens=1, temperature=0,
                                                extra_body={"return_token_ids": True})
    penalized_prompt = client.completions.create(model=MODEL, prompt=[first] * 8, max_tokens=1, temperature=0,
                                                 presence_penalty=2, frequency_penalty=2,
                                                 extra_body={"return_token_ids": True})
    assert extra(repeated_prompt.choices[0], "token_ids") == extra(penalized_prompt.choices[0], "token_ids")


def test_bad_penalties_and_biases_are_400s_and_the_client_goes_on(client):
    for fields, words in [({"frequency_penalty": 2.5}, "'frequency_penalty' must be in [-2, 2], got 2.5"),
                          ({"presence_penalty": -3}, "'presence_penalty' must be in [-2, 2], got -3"),
                          ({"logit_bias": {"50257": 5}}, "token id 50257 is not in the vocabulary (0-50256)"),
                          ({"logit_bias": {"-1": 5}}, "token id -1 is not in the vocabulary"),
                          ({"logit_bias": {"11": 101}}, "values must be in [-100, 100], got 101 for token 11"),
                          ({"logit_bias": {"hello": 1}}, "keys must be token ids, got 'hello'")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **fields)
        assert words in info.value.body["message"], (fields, info.value.body)
        assert info.value.body["param"] == next(iter(fields))
    assert _ids(client, max_tokens=3, logit_bias={"11": 100}) == [11, 11, 11]


# ---------------------------------------------------------------------------------------------
# /metrics


def scrape(server, headers=AUTH) -> dict:
    status, response_headers, data = server.request("GET", "/metrics", headers=headers)
    assert status == 200, data[:300]
    assert response_headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_exposition(data.decode())


def test_metrics_count_requests_tokens_and_time_them(server, client):
    wait_idle(server)
    before = scrape(server)
    usages = []
    for i in range(3):
        usages.append(client.completions.create(model=MODEL, prompt="Hello there" * (i + 1), max_tokens=4,
                                                temperature=0).usage)
    for _ in range(2):
        chunks = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        usages.append(chunks[-1].usage)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, frequency_penalty=9)
    assert server.request("GET", "/metrics")[0] == 401  # the key guards it, as every endpoint but /health
    after = scrape(server)

    def grew(family, sample=None, **labels):
        return value_of(after, family, sample, **labels) - value_of(before, family, sample, **labels)

    completions = "/v1/completions"
    assert grew("gptcli_requests_total", endpoint=completions, status="200") == 5
    assert grew("gptcli_requests_total", endpoint=completions, status="400") == 1
    assert grew("gptcli_requests_total", endpoint="/metrics", status="401") == 1
    assert grew("gptcli_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert grew("gptcli_prompt_tokens_total") == sum(u.prompt_tokens for u in usages) > 0
    assert grew("gptcli_completion_tokens_total") == sum(u.completion_tokens for u in usages) == 3 * 4 + 2 * 5
    latency, ttft = "gptcli_request_duration_seconds", "gptcli_time_to_first_token_seconds"
    assert grew(latency, latency + "_count", endpoint=completions) == 6  # the refused one too
    assert grew(ttft, ttft + "_count", endpoint=completions) == 5  # one per request that generated
    assert grew(ttft, ttft + "_sum", endpoint=completions) > 0
    assert grew(latency, latency + "_sum", endpoint=completions) >= grew(ttft, ttft + "_sum", endpoint=completions)
    for family, kind in [("gptcli_queue_rows", "gauge"), ("gptcli_batch_rows", "gauge"), (latency, "histogram"),
                         (ttft, "histogram"), ("gptcli_requests_total", "counter")]:
        assert after[family]["type"] == kind
    assert value_of(after, "gptcli_batch_rows") == value_of(after, "gptcli_queue_rows") == 0
    # While a stream runs, the gauge shows its row.
    sock = open_stream(server, ok_body(max_tokens=1000, temperature=1.0, stream=True, ignore_eos=True), KEY)
    try:
        assert value_of(scrape(server), "gptcli_batch_rows") == 1
    finally:
        sock.close()
    wait_idle(server)


# ---------------------------------------------------------------------------------------------
# Invariance under load


# Different prompt lengths, max_tokens (past the 16-token window for some) and sampling settings, so
# rows join and leave the running batch mid-run and some are recomputed from their window.
LOAD = [
    {"prompt": "Hello", "max_tokens": 30, "temperature": 0},
    {"prompt": "Once upon a time there was a", "max_tokens": 9, "temperature": 0},
    {"prompt": "The meaning of life is", "max_tokens": 22, "temperature": 1.0, "seed": 7, "frequency_penalty": 0.8},
    {"prompt": "A", "max_tokens": 5, "temperature": 0.8, "seed": 1, "top_k": 40},
    {"prompt": "In the beginning God created the heaven and the", "max_tokens": 14, "temperature": 0,
     "presence_penalty": 1.5, "logit_bias": {"11": 2.5, "13": -100}},
    {"prompt": "My name is", "max_tokens": 26, "temperature": 1.2, "seed": 99, "top_p": 0.9,
     "frequency_penalty": -0.5, "presence_penalty": 0.7},
    {"prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0, "frequency_penalty": 2, "logit_bias": {"604": 1.5}},
    {"prompt": "The quick brown fox jumps over", "max_tokens": 18, "temperature": 0.7, "seed": 123, "top_k": 100,
     "top_p": 0.95},
]


def _complete(base_url: str, spec: dict, logprobs: int | None = None, barrier: threading.Barrier | None = None) -> tuple:
    """(text, token ids, finish reason), and with ``logprobs`` the log-probabilities too; with a
    barrier, the request is sent once every thread is ready."""
    client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)
    body = dict(spec)
    extras = {"return_token_ids": True, **({"top_k": body.pop("top_k")} if "top_k" in body else {})}
    if logprobs is not None:
        body["logprobs"] = logprobs
    if barrier is not None:
        barrier.wait()
    r = client.completions.create(model=MODEL, extra_body=extras, **body)
    choice = r.choices[0]
    result = (choice.text, extra(choice, "token_ids"), choice.finish_reason)
    if logprobs is None:
        return result
    return result + ((choice.logprobs.token_logprobs, choice.logprobs.top_logprobs),)


def _generate_args(checkpoint: Path, spec: dict) -> list[str]:
    args = ["generate", spec["prompt"], "--weights", str(checkpoint), "--json", "-n", str(spec["max_tokens"]),
            "-t", str(spec["temperature"]), "--seed", str(spec.get("seed", 123))]
    for key, option in (("top_k", "--top-k"), ("top_p", "--top-p"), ("frequency_penalty", "--frequency-penalty"),
                        ("presence_penalty", "--presence-penalty")):
        if key in spec:
            args += [option, str(spec[key])]
    for token_id, bias in spec.get("logit_bias", {}).items():
        args += ["--logit-bias", f"{token_id}={bias}"]
    return args


# `gptcli ARGS` for each argument list of argv[1] (JSON), through the console script's main() in one
# process (eight interpreters importing torch took 50 s on this busy machine); each run's stdout, as JSON.
RUN_CLI = """
import contextlib, io, json, sys
from gptcli.cli import main
outputs = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["gptcli", *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
    outputs.append(out.getvalue())
print(json.dumps(outputs))
"""


def _generate_cli(checkpoint: Path, env: dict, specs: list[dict]) -> subprocess.Popen:
    runs = json.dumps([_generate_args(checkpoint, spec) for spec in specs])
    return subprocess.Popen([sys.executable, "-c", RUN_CLI, runs], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_eight_requests_at_once_get_what_each_gets_alone_and_what_generate_prints(server, checkpoint, env):
    """The server's promise: a request's text and ids do not depend on what else runs.

    What it relies on (CPU, eager kernels, float32): oneDNN's linear gives a row the same bits among
    2..8 rows and a lone row is multiplied as two (gptcli.kernels.onednn.linear); attention runs row by row over
    each row's own keys (model._attend_rows); a row is cached until it, not the longest row, outgrows
    the window, and newcomers are prefilled in a call of their own and spliced into the cache
    (gptcli.decoding.batch.BatchDecoder); every row samples from its own generator seeded like
    `gptcli generate --seed`. The log-probabilities are compared exactly too: they are the logits'
    log-softmax, so a change in a logit's last bit shows there even when no id changes (running
    attention as one masked call for the batch, for one, fails this test here).

    The load: a long sampled stream runs first, then the 8 requests leave a barrier together, so each
    joins a batch under way, and their different lengths make rows leave it mid-run.
    """
    alone = [_complete(server.base_url, spec, logprobs=2) for spec in LOAD]
    before = wait_idle(server)
    # A long stream already running, so that every request joins a batch under way; it leaves at the end.
    carrier = open_stream(server, ok_body(max_tokens=1000, temperature=1.0, stream=True, ignore_eos=True), KEY)
    barrier = threading.Barrier(len(LOAD))
    together: list = [None] * len(LOAD)

    def send(i: int) -> None:
        together[i] = _complete(server.base_url, LOAD[i], logprobs=2, barrier=barrier)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(LOAD))]
    cli = _generate_cli(checkpoint, env, LOAD)
    for t in threads:
        t.start()
    most_running = 0  # rows running at once, as /health saw them while the requests ran
    while any(t.is_alive() for t in threads):
        most_running = max(most_running, health(server)["running"])
    for t in threads:
        t.join(120)
    after = health(server)
    carrier.close()
    wait_idle(server)
    out, err = cli.communicate(timeout=180)
    assert cli.returncode == 0, err
    printed = [json.loads(o) for o in json.loads(out)]
    # Each joined a batch under way, and several of them ran at once beside the long stream.
    assert after["joined"] - before["joined"] == len(LOAD) and most_running >= 4, (before, after, most_running)
    for spec, one, loaded, cli_result in zip(LOAD, alone, together, printed):
        assert loaded == one, spec  # text, ids, finish reason and every log-probability, bit for bit
        text, ids, finish, _ = one
        assert (text, ids) == (cli_result["text"], cli_result["token_ids"]), spec
        assert finish == {"eos": "stop"}.get(cli_result["finish_reason"], cli_result["finish_reason"])
    assert len({tuple(ids) for _, ids, _, _ in alone}) == len(LOAD)


# ---------------------------------------------------------------------------------------------
# Bad input: each gets the right 4xx and OpenAI's error object; the server keeps serving


def ok_body(**changes) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0, **changes}


BAD = [
    # (what, method, path, body (dict) or raw bytes, headers, status, param, words in the message)
    ("invalid JSON", "POST", "/v1/completions", b'{"model": "tiny", "prompt": ', AUTH, 400, None, "not valid JSON"),
    ("an array body", "POST", "/v1/completions", b"[1, 2]", AUTH, 400, None, "JSON object"),
    ("an empty body", "POST", "/v1/completions", b"", AUTH, 400, None, "empty"),
    ("not UTF-8", "POST", "/v1/completions", b'{"prompt": "caf\xe9"}', AUTH, 400, None, "UTF-8"),
    ("NaN temperature", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', AUTH, 400,
     None, "NaN"),
    ("nested a million deep", "POST", "/v1/completions", b"[" * 500_000 + b"]" * 500_000, AUTH, 400, None, "nested"),
    ("no prompt", "POST", "/v1/completions", {"model": MODEL}, AUTH, 400, "prompt", "required"),
    ("no model", "POST", "/v1/completions", {"prompt": "x"}, AUTH, 400, "model", "required"),
    ("another model", "POST", "/v1/completions", ok_body(model="gpt-4"), AUTH, 404, "model", "does not exist"),
    ("a number as prompt", "POST", "/v1/completions", ok_body(prompt=5), AUTH, 400, "prompt", "must be a string"),
    ("an empty prompt list", "POST", "/v1/completions", ok_body(prompt=[]), AUTH, 400, "prompt", "must be"),
    ("mixed prompt list", "POST", "/v1/completions", ok_body(prompt=["a", 1]), AUTH, 400, "prompt", "must be"),
    ("a token id past the vocabulary", "POST", "/v1/completions", ok_body(prompt=[50257]), AUTH, 400, "prompt",
     "vocabulary"),
    ("a negative token id", "POST", "/v1/completions", ok_body(prompt=[-1]), AUTH, 400, "prompt", "vocabulary"),
    ("a prompt longer than the context", "POST", "/v1/completions", ok_body(prompt=list(range(CONTEXT + 1))), AUTH,
     400, "prompt", "maximum context length is 16"),
    ("negative max_tokens", "POST", "/v1/completions", ok_body(max_tokens=-1), AUTH, 400, "max_tokens", "between"),
    ("huge max_tokens", "POST", "/v1/completions", ok_body(max_tokens=10**15), AUTH, 400, "max_tokens", "between"),
    ("max_tokens as a string", "POST", "/v1/completions", ok_body(max_tokens="5"), AUTH, 400, "max_tokens",
     "integer"),
    ("max_tokens as a boolean", "POST", "/v1/completions", ok_body(max_tokens=True), AUTH, 400, "max_tokens",
     "integer"),
    ("temperature 5", "POST", "/v1/completions", ok_body(temperature=5), AUTH, 400, "temperature", "[0, 2]"),
    ("top_p 0", "POST", "/v1/completions", ok_body(top_p=0), AUTH, 400, "top_p", "(0, 1]"),
    ("n 0", "POST", "/v1/completions", ok_body(n=0), AUTH, 400, "n", "between"),
    ("n 1000", "POST", "/v1/completions", ok_body(n=1000), AUTH, 400, "n", "between"),
    ("more completions than the queue holds", "POST", "/v1/completions", ok_body(prompt=["a", "b"], n=16), AUTH, 400,
     "n", "this request asks for 32 completions (2 prompts x n=16); a request may ask for at most 16"),
    ("logprobs 6", "POST", "/v1/completions", ok_body(logprobs=6), AUTH, 400, "logprobs", "between 0 and 5"),
    ("a negative seed", "POST", "/v1/completions", ok_body(seed=-3), AUTH, 400, "seed", "between"),
    ("a seed past 2**64 - 1", "POST", "/v1/completions", ok_body(seed=2**64), AUTH, 400, "seed",
     "between 0 and 18446744073709551615"),
    ("the second choice's seed past 2**64 - 1", "POST", "/v1/completions", ok_body(seed=2**64 - 1, n=2), AUTH, 400,
     "seed", "use a seed of at most 18446744073709551614"),
    ("a lone surrogate in the prompt", "POST", "/v1/completions", ok_body(prompt="a\ud800"), AUTH, 400, "prompt",
     "lone surrogate '\\ud800'"),
    ("a lone surrogate in a prompt list", "POST", "/v1/completions", ok_body(prompt=["ok", "\udfff"]), AUTH, 400,
     "prompt", "lone surrogate"),
    ("tokenize a lone surrogate", "POST", "/tokenize", {"prompt": "\ud800"}, AUTH, 400, "prompt", "lone surrogate"),
    ("five stop strings", "POST", "/v1/completions", ok_body(stop=list("abcde")), AUTH, 400, "stop", "at most 4"),
    ("an empty stop string", "POST", "/v1/completions", ok_body(stop=""), AUTH, 400, "stop", "empty"),
    ("echo as 1", "POST", "/v1/completions", ok_body(echo=1), AUTH, 400, "echo", "boolean"),
    ("stream as 'yes'", "POST", "/v1/completions", ok_body(stream="yes"), AUTH, 400, "stream", "boolean"),
    ("stream_options without stream", "POST", "/v1/completions", ok_body(stream_options={"include_usage": True}),
     AUTH, 400, "stream_options", "only allowed"),
    ("an unknown field", "POST", "/v1/completions", ok_body(temprature=0.5), AUTH, 400, "temprature",
     "Unrecognized"),
    ("best_of 3 (unsupported)", "POST", "/v1/completions", ok_body(best_of=3), AUTH, 400, "best_of",
     "not supported"),
    ("frequency_penalty as a string", "POST", "/v1/completions", ok_body(frequency_penalty="1"), AUTH, 400,
     "frequency_penalty", "must be a number"),
    ("presence_penalty NaN", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "x", "presence_penalty": NaN}',
     AUTH, 400, None, "NaN"),
    ("logit_bias as an array", "POST", "/v1/completions", ok_body(logit_bias=[1, 2]), AUTH, 400, "logit_bias",
     "must be an object"),
    ("a logit_bias value as a string", "POST", "/v1/completions", ok_body(logit_bias={"11": "5"}), AUTH, 400,
     "logit_bias", "values must be numbers"),
    ("a logit_bias id twice", "POST", "/v1/completions", ok_body(logit_bias={"11": 1, "011": 2}), AUTH, 400,
     "logit_bias", "twice"),
    ("a body over 1 MiB", "POST", "/v1/completions", ok_body(prompt="x" * (1 << 20)), AUTH, 413, None, "bytes"),
    ("no API key", "POST", "/v1/completions", ok_body(), {}, 401, None, "API key"),
    ("a wrong API key", "POST", "/v1/completions", ok_body(), {"Authorization": "Bearer nope"}, 401, None,
     "Incorrect API key"),
    ("a key in the wrong scheme", "GET", "/v1/models", None, {"Authorization": f"Basic {KEY}"}, 401, None, "API key"),
    ("GET on completions", "GET", "/v1/completions", None, AUTH, 405, None, "not allowed"),
    ("an unknown endpoint", "POST", "/v1/edits", ok_body(), AUTH, 404, None, "no such endpoint"),
    ("detokenize with text", "POST", "/detokenize", {"tokens": ["a"]}, AUTH, 400, "tokens", "token ids"),
    ("tokenize a number", "POST", "/tokenize", {"prompt": 3}, AUTH, 400, "prompt", "string"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_get_a_4xx_and_openais_error_object(server, case):
    _, method, path, body, headers, status, param, words = case
    raw = body if isinstance(body, bytes) else None
    got, response_headers, data = server.request(method, path, None if raw is not None else body, raw=raw,
                                                 headers=headers)
    assert got == status, data[:300]
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if status == 401:
        assert response_headers["www-authenticate"] == "Bearer"
    if status == 405:
        assert response_headers["allow"] == "POST"


def test_after_all_the_bad_requests_a_good_one_is_still_right(server, client):
    for case in BAD[:6]:
        server.request(case[1], case[2], raw=case[3], headers=case[4])
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                  extra_body={"return_token_ids": True})
    text, ids, _ = _complete(server.base_url, {"prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert (r.choices[0].text, extra(r.choices[0], "token_ids")) == (text, ids)
    assert health(server)["status"] == "ok"


def test_health_needs_no_key_and_the_client_reports_401(server):
    assert server.request("GET", "/health")[0] == 200
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    wait_idle(server)
    steps_before = health(server)["steps"]
    sock = open_stream(server, ok_body(max_tokens=1000, temperature=1.0, stream=True, ignore_eos=True), KEY)
    assert health(server)["running"] == 1
    sock.close()
    state = wait_idle(server)
    assert state["steps"] - steps_before < 1000  # it was cut short, not run to its 1000 tokens


# ---------------------------------------------------------------------------------------------
# Queue limits and shutdown: servers of their own


def test_a_flood_past_the_queue_gets_503_with_retry_after_and_then_service(checkpoint, env):
    srv = Server(["--weights", str(checkpoint), "--max-batch", "1", "--max-queue", "1", "--max-tokens-cap", "100000"],
                 env)
    try:
        long_request = json.dumps(ok_body(max_tokens=100000, ignore_eos=True, stream=True)).encode()
        holders = []
        for _ in range(2):  # one runs, one waits: the queue is full
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(long_request)}\r\n\r\n".encode() + long_request)
            holders.append(sock)
        deadline = time.monotonic() + 30
        while (health(srv)["running"], health(srv)["waiting"]) != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        state = health(srv)
        assert (state["running"], state["waiting"]) == (1, 1), state
        statuses = []
        for _ in range(5):
            status, headers, data = srv.request("POST", "/v1/completions", ok_body())
            statuses.append(status)
            if status == 503:
                assert headers["retry-after"] == "1"
                error = json.loads(data)["error"]
                assert error["code"] == "server_overloaded" and "busy" in error["message"]
        assert statuses.count(503) == 5
        for sock in holders:
            sock.close()
        wait_idle(srv)
        status, body = srv.json("POST", "/v1/completions", ok_body())
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    finally:
        srv.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_lets_the_running_stream_end_and_exits_cleanly(checkpoint, env, sig):
    srv = Server(["--weights", str(checkpoint), "--max-tokens-cap", "200"], env)
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    body = json.dumps(ok_body(max_tokens=200, temperature=1.0, stream=True, ignore_eos=True,
                              stream_options={"include_usage": True})).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    srv.proc.send_signal(sig)
    while chunk := sock.recv(65536):  # the server closes the connection once the stream has ended
        received += chunk
    sock.close()
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), received[-200:]
    assert b'"finish_reason": "length"' in received
    assert b'"completion_tokens": 200' in received  # it ran to its end
    code, stderr = srv.stop(timeout=60)
    assert code == 0, stderr
    assert "note: stopped" in stderr and "Traceback" not in stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()


# ---------------------------------------------------------------------------------------------
# The command


def test_help_and_params_do_not_load_the_web_stack_or_torch():
    for args in (["--help"], ["params", "--size", "124M"], ["serve", "--help"]):
        stdout, modules = imported_modules(*args)
        assert stdout
        assert not {"fastapi", "uvicorn", "torch", "starlette"} & modules, args


@pytest.mark.parametrize("args, message", [
    (["--compile"], "No such option: --compile"),  # compiled steps decode one sequence; serve decodes batches
    (["--api-key", " "], "--api-key (or GPTCLI_API_KEY) must not be empty"),
    (["--quantize", "int3"], "unknown --quantize"),
])
def test_bad_options_are_one_line_errors(args, message, env):
    proc = subprocess.run([sys.executable, "-m", "gptcli", "serve", *args], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_a_one_line_error_before_loading(env, checkpoint):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gptcli", "serve", "--weights", str(checkpoint), "--port",
                               str(port)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_only_loopback_addresses_count_as_private():
    from gptcli.commands.serve import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))


def test_another_address_without_a_key_warns_before_anything_else(env, tmp_path):
    """The warning comes before the model loads (here, a missing tokenizer stops it before binding)."""
    no_tokenizer = {**env, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")}
    proc = subprocess.run([sys.executable, "-m", "gptcli", "serve", "--host", "0.0.0.0", "--weights", "random"],
                          capture_output=True, text=True, env=no_tokenizer, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[0].startswith("warning: listening on 0.0.0.0 with no --api-key")
    assert lines[1].startswith("error: ")
    keyed = subprocess.run([sys.executable, "-m", "gptcli", "serve", "--host", "0.0.0.0", "--weights", "random"],
                           capture_output=True, text=True, env={**no_tokenizer, "GPTCLI_API_KEY": "k"}, timeout=60)
    assert keyed.returncode == 2 and "warning" not in keyed.stderr


def test_the_checked_batch_sizes_are_the_kernel_checks():
    from gptcli.commands.serve import CHECKED_BATCH_ROWS
    from gptcli.kernels.decode import BATCH_ROWS

    assert CHECKED_BATCH_ROWS == BATCH_ROWS
