"""`gptcli serve` with a character-level model (as `gptcli train --recipe shakespeare-char` makes): a character
the vocabulary lacks is the user's mistake, so every place a prompt enters answers 400 naming the characters,
never a 500, and the server keeps serving (issue 25)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from servers import Server, server_env, sse_events, write_char_checkpoint

CHARS = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXY,.!?'\n")))  # no 'Z', '@', '#'
MODEL = "chars"
UNKNOWN = "characters '#', '@', 'Z' are not in this model's vocabulary of"


@pytest.fixture(scope="module")
def server(tiktoken_cache, tmp_path_factory):
    checkpoint = write_char_checkpoint(tmp_path_factory.mktemp("serve-char") / MODEL, CHARS)
    srv = Server(["--weights", str(checkpoint.parent)], server_env(tiktoken_cache, tmp_path_factory.mktemp("cache")))
    yield srv
    srv.stop()


def error_of(data: bytes) -> dict:
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": MODEL, "prompt": "ZZZ@#", "max_tokens": 3}),
    ("/v1/completions", {"model": MODEL, "prompt": "ZZZ@#", "max_tokens": 3, "stream": True}),
    ("/v1/completions", {"model": MODEL, "prompt": ["hello", "ZZZ@#"], "max_tokens": 3}),
    ("/tokenize", {"prompt": "ZZZ@#"}),
], ids=["completion", "stream", "prompt list", "tokenize"])
def test_unknown_characters_are_a_400_that_names_them(server, path, body):
    status, headers, data = server.request("POST", path, body)
    assert status == 400, data[:300]
    assert headers["content-type"].startswith("application/json")
    error = error_of(data)
    assert UNKNOWN in error["message"] and error["param"] == "prompt"


def test_a_lone_surrogate_is_a_400(server):
    for path, body in [("/v1/completions", {"model": MODEL, "prompt": "a\ud800", "max_tokens": 2}),
                       ("/tokenize", {"prompt": "\ud800"})]:
        status, _, data = server.request("POST", path, body)
        assert status == 400 and "lone surrogate" in error_of(data)["message"], data[:300]


def test_the_openai_client_gets_a_bad_request_and_the_server_goes_on(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=2, timeout=60)
    with pytest.raises(openai.BadRequestError, match="not in this model's vocabulary"):
        client.completions.create(model=MODEL, prompt="ZZZ@#", max_tokens=3)
    # the same keep-alive client goes on: greedy text, streamed or not, from known characters
    whole = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert len(whole.choices[0].text) == 8 and set(whole.choices[0].text) <= set(CHARS)
    status, _, data = server.request("POST", "/v1/completions",
                                     {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True})
    assert status == 200 and sse_events(data)[-1] == "[DONE]"
    _, stderr = server.stop()  # the last test of the module: the log holds no traceback
    assert "Traceback" not in stderr and "internal error" not in stderr

