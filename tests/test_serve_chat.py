"""`gptcli serve`'s /v1/chat/completions for a model whose checkpoint names a prompt template (the book's
chapter 7 Alpaca prompt, as `gptcli train --task instruct` records it), driven by the real `openai` client:
the greedy text is `gptcli generate`'s on chat_prompt(messages), streaming equals not streaming, chat rows
are batch-invariant like completions, and bad messages are 400s that leave the server serving."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from servers import (  # noqa: E402
    CHAT_CONTEXT, Server, health, open_stream, server_env, sse_events, wait_idle, write_chat_checkpoint,
)

from gptcli.templates import CHAT_STOP, chat_prompt  # noqa: E402

MODEL = "instruct"
ASK = [{"role": "user", "content": "Name three colours."}]
TALK = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Rewrite: the cat sat."},
        {"role": "assistant", "content": "A cat sat."},
        {"role": "user", "content": "Again, shorter?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_chat_checkpoint(tmp_path_factory.mktemp("serve-chat") / MODEL)


@pytest.fixture(scope="module")
def env(tiktoken_cache, tmp_path_factory) -> dict[str, str]:
    return server_env(tiktoken_cache, tmp_path_factory.mktemp("gptcli-cache"))


@pytest.fixture(scope="module")
def server(checkpoint, env):
    srv = Server(["--weights", str(checkpoint.parent), "--max-batch", "8"], env)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


def ids_of(obj) -> list[int]:
    return obj.model_dump()["token_ids"]


# `gptcli generate ARGS` for each argument list, in one child process with the server's environment
# (same threads, same kernels), each run's stdout as JSON.
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
    outputs.append(json.loads(out.getvalue()))
print(json.dumps(outputs))
"""


def generate_cli(env: dict, arg_lists: list[list[str]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, json.dumps(arg_lists)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# What chat answers


def test_models_say_the_model_chats_with_its_template(server, client):
    status, body = server.json("GET", "/v1/models")
    assert status == 200 and body["data"][0]["chat_template"] == "alpaca"
    assert body["data"][0]["max_model_len"] == CHAT_CONTEXT
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_chat_is_generates_text_on_the_templated_prompt(client, checkpoint, env):
    """The promise: a chat is `gptcli generate` on chat_prompt(messages), stopping at the template's next
    header (CHAT_STOP) or <|endoftext|>."""
    answers = [client.chat.completions.create(model=MODEL, messages=m, max_tokens=24, temperature=0,
                                              extra_body={"return_token_ids": True}) for m in (ASK, TALK)]
    sampled = client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=20, temperature=0.9,
                                             seed=11, frequency_penalty=0.5, extra_body={"return_token_ids": True})
    runs = generate_cli(env, [
        ["generate", chat_prompt(ASK), "--weights", str(checkpoint), "-n", "24", "--stop", CHAT_STOP, "--json"],
        ["generate", chat_prompt(TALK), "--weights", str(checkpoint), "-n", "24", "--stop", CHAT_STOP, "--json"],
        ["generate", chat_prompt(ASK), "--weights", str(checkpoint), "-n", "20", "--stop", CHAT_STOP, "--json", "-t", "0.9",
         "--seed", "11", "--frequency-penalty", "0.5"]])
    for answer, run in zip([*answers, sampled], runs):
        choice = answer.choices[0]
        assert answer.object == "chat.completion" and answer.model == MODEL and answer.id.startswith("chatcmpl-")
        assert choice.message.role == "assistant" and choice.message.content == run["text"]
        assert ids_of(choice) == run["token_ids"] and answer.model_dump()["prompt_token_ids"] == run["prompt_token_ids"]
        assert choice.finish_reason == {"eos": "stop"}.get(run["finish_reason"], run["finish_reason"])
        assert answer.usage.prompt_tokens == len(run["prompt_token_ids"])
        assert answer.usage.completion_tokens == len(run["token_ids"])
    assert answers[0].choices[0].message.content and answers[0].choices[0].finish_reason == "length"
    assert answers[0].choices[0].message.content != answers[1].choices[0].message.content
    # OpenAI's content parts are the same text as a string
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
             for m in ASK]
    in_parts = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=24, temperature=0)
    assert in_parts.choices[0].message.content == answers[0].choices[0].message.content


def chunks_of(client, **fields) -> list:
    return list(client.chat.completions.create(model=MODEL, stream=True, **fields))


@pytest.mark.parametrize("fields", [dict(temperature=0), dict(temperature=1.1, seed=4, top_p=0.95),
                                    dict(temperature=0.8, seed=9, n=3)], ids=["greedy", "sampled", "n=3"])
def test_streaming_equals_not_streaming(client, fields):
    whole = client.chat.completions.create(model=MODEL, messages=TALK, max_tokens=16, logprobs=True, top_logprobs=2,
                                           **fields)
    chunks = chunks_of(client, messages=TALK, max_tokens=16, logprobs=True, top_logprobs=2,
                       stream_options={"include_usage": True}, **fields)
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == choice.index]
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks[:-1])
        # the role first, then the content as it comes, then the finish reason on its own
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert all(m.delta.role is None for m in mine[1:])
        assert [m.finish_reason for m in mine] == [None] * (len(mine) - 1) + [choice.finish_reason]
        assert mine[-1].delta.content is None
        assert "".join(m.delta.content or "" for m in mine) == choice.message.content
        streamed = [t for m in mine if m.logprobs for t in m.logprobs.content]
        assert [t.model_dump() for t in streamed] == [t.model_dump() for t in choice.logprobs.content]
    assert len({c.message.content for c in whole.choices}) == len(whole.choices)  # n choices differ


def test_the_wire_format_of_a_chat_stream(server):
    status, headers, data = server.request("POST", "/v1/chat/completions", {
        "model": MODEL, "messages": ASK, "max_tokens": 3, "temperature": 0, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage, as OpenAI


def test_logprobs_are_openais_chat_shape_and_the_models_own(client, server):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and t.logprob == tops[0]  # greedy: the likeliest
        assert t.top_logprobs[0].token == t.token
    # The same numbers /v1/completions gives for the templated prompt: the model's log-softmax.
    status, body = server.json("POST", "/v1/completions", {"model": MODEL, "prompt": chat_prompt(ASK), "max_tokens": 8,
                                                           "temperature": 0, "logprobs": 3, "stop": [CHAT_STOP]})
    assert status == 200
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [t.logprob for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    no_alternatives = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0,
                                                     logprobs=True)
    assert all(t.top_logprobs == [] for t in no_alternatives.choices[0].logprobs.content)


def test_n_choices_are_seed_seed_plus_one_and_stop_ends_them(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=1.0, seed=30, n=3,
                                       extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for j, choice in enumerate(r.choices):
        alone = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=1.0,
                                               seed=30 + j, extra_body={"return_token_ids": True})
        assert ids_of(choice) == ids_of(alone.choices[0]) and choice.message.content == alone.choices[0].message.content
    assert r.usage.completion_tokens == 30
    varied = dict(temperature=0, frequency_penalty=1.0)  # the tiny model loops greedily; this varies the text
    full = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, **varied)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and text.index(stop) > 0
    stopped = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, stop=[stop], **varied)
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == text[: text.index(stop)]
    # <|endoftext|> ends a chat as "stop", and is not in the text
    eos = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0,
                                         logit_bias={"50256": 100})
    assert eos.choices[0].finish_reason == "stop" and eos.choices[0].message.content == ""
    assert eos.usage.completion_tokens == 1


def test_the_template_stop_is_added_to_the_requests_own():
    from gptcli.serving.chat import parse_chat
    from gptcli.serving.completions import Limits
    from gptcli.tokenizer import gpt2

    limits = Limits(context_length=CHAT_CONTEXT, vocab_size=50257)
    body = {"model": MODEL, "messages": TALK, "stop": ["a", "b", "c", "d"], "seed": 1, "n": 2}
    req = parse_chat(body, gpt2(), limits, MODEL, "alpaca")
    assert [o.stop for o in req.options] == [("a", "b", "c", "d", CHAT_STOP)] * 2
    assert [o.seed for o in req.options] == [1, 2] and req.prompt_texts == (chat_prompt(TALK),)
    assert parse_chat({"model": MODEL, "messages": ASK}, gpt2(), limits, MODEL, "alpaca").options[0].stop == (CHAT_STOP,)
    assert parse_chat({"model": MODEL, "messages": ASK, "max_tokens": 5}, gpt2(), limits, MODEL,
                      "alpaca").options[0].max_new_tokens == 5


# ---------------------------------------------------------------------------------------------
# Invariance under load


LOAD = [
    {"messages": ASK, "max_tokens": 20, "temperature": 0},
    {"messages": TALK, "max_tokens": 12, "temperature": 1.0, "seed": 5},
    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 25, "temperature": 0.7, "seed": 8,
     "frequency_penalty": 0.6, "top_p": 0.9},
    {"messages": TALK[1:], "max_tokens": 7, "temperature": 0, "presence_penalty": 1.2, "logit_bias": {"13": -100}},
    {"messages": ASK, "max_tokens": 16, "temperature": 1.3, "seed": 2, "n": 2},
]


def _chat(base_url: str, spec: dict, barrier: threading.Barrier | None = None) -> list:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    if barrier is not None:
        barrier.wait()
    r = client.chat.completions.create(model=MODEL, logprobs=True, top_logprobs=2,
                                       extra_body={"return_token_ids": True}, **spec)
    return [(c.message.content, ids_of(c), c.finish_reason, [t.model_dump() for t in c.logprobs.content])
            for c in r.choices]


def test_chat_requests_at_once_get_what_each_gets_alone(server):
    """Chat rows run in the same batches as completions: each gets, bit for bit, what it gets alone
    (text, ids and every log-probability), with completions running beside them. A long stream runs
    first, so every request joins a batch under way (released together, they could otherwise all
    start in one step and none join)."""
    alone = [_chat(server.base_url, spec) for spec in LOAD]
    before = wait_idle(server)
    carrier = open_stream(server, {"model": MODEL, "prompt": "Hello", "max_tokens": 1000, "temperature": 1.0,
                                   "stream": True, "ignore_eos": True})
    barrier = threading.Barrier(len(LOAD) + 1)
    together: list = [None] * len(LOAD)

    def send(i: int) -> None:
        together[i] = _chat(server.base_url, LOAD[i], barrier)

    beside: list = []

    def completion() -> None:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)
        barrier.wait()
        beside.append(client.completions.create(model=MODEL, prompt="Hello", max_tokens=60, temperature=1.0, seed=1,
                                                extra_body={"ignore_eos": True}).choices[0].text)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(LOAD))]
    threads.append(threading.Thread(target=completion))
    most_running = 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        most_running = max(most_running, health(server)["running"])
    for t in threads:
        t.join(120)
    after = health(server)
    carrier.close()
    wait_idle(server)
    # Every chat row (n of each request) and the completion beside them joined the carrier's batch.
    rows = sum(spec.get("n", 1) for spec in LOAD) + 1
    assert after["joined"] - before["joined"] == rows and most_running >= 3, (most_running, before, after)
    for spec, one, loaded in zip(LOAD, alone, together):
        assert loaded == one, spec
    assert beside and len({tuple(ids) for choices in alone for _, ids, _, _ in choices}) == len(LOAD) + 1


# ---------------------------------------------------------------------------------------------
# Bad requests


TOO_LONG = [{"role": "user", "content": "word " * 200}]
BAD = [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "messages[0]: unknown role 'robot'"),
    ({"messages": [{"role": "system", "content": "be nice"}]}, "messages", "no user turn"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     "messages[0]: only text content parts are supported"),
    ({"messages": [{"role": "user"}]}, "messages", "'content' must be a string or a list of text parts"),
    ({"messages": "hi"}, "messages", "'messages' must be a non-empty array"),
    ({"messages": []}, "messages", "got an empty array"),
    ({"messages": ["hi"]}, "messages", "messages[0] must be an object"),
    ({}, "messages", "'messages' is required"),
    ({"messages": TOO_LONG}, "messages", "maximum context length is 128 tokens"),
    ({"messages": ASK, "top_logprobs": 2}, "top_logprobs", "needs 'logprobs': true"),
    ({"messages": ASK, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"messages": ASK, "max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "disagree"),
    ({"messages": ASK, "frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
    ({"messages": ASK, "logit_bias": {"99999": 1}}, "logit_bias", "not in the vocabulary"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"messages": ASK, "echo": True}, "echo", "Unrecognized request argument"),
    ({"messages": ASK, "n": 0}, "n", "between"),
]


@pytest.mark.parametrize("fields,param,words", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_chat_requests_are_400s(server, fields, param, words):
    status, _, data = server.request("POST", "/v1/chat/completions", {"model": MODEL, **fields})
    assert status == 400, data[:300]
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"] and error["param"] == param, error


def test_the_client_gets_bad_request_and_the_server_goes_on(client):
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=ASK)
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_an_unknown_template_in_the_checkpoint_is_one_error_line(tmp_path, env):
    checkpoint = write_chat_checkpoint(tmp_path / "odd", template="chatml")
    proc = subprocess.run([sys.executable, "-m", "gptcli", "serve", "--weights", str(checkpoint), "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown prompt template 'chatml'" in proc.stderr and "gptcli.template" in proc.stderr
