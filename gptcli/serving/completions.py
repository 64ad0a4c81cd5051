"""OpenAI's legacy completions API (``/v1/completions``) as data: checking a request's JSON and turning
it into ``gptcli.serving.engine.RowRequest``s, and turning the engine's events into OpenAI's response and
stream chunks. No web code and no model here (``gptcli.serving.server`` serves it). Never prints.

What a request gets, field by field, follows OpenAI's reference; where gptcli differs, the README's
``gptcli serve`` section says so. Every mistake is an ``ApiError``: a 4xx and OpenAI's error object
(``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from gptcli.errors import UserError
from gptcli.serving.fields import ApiError, bad, boolean, integer, is_number, number, type_name
from gptcli.decoding.generate import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP, MAX_LOGIT_BIAS, MAX_PENALTY, MAX_SEED,
                                      SamplingOptions, prompt_ids)

if TYPE_CHECKING:
    from gptcli.serving.engine import RowEvent, RowRequest
    from gptcli.decoding.logprobs import TokenLogprob
    from gptcli.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: clients that send none expect sampling
MAX_TEMPERATURE = 2.0  # OpenAI's range is 0-2
MAX_LOGPROBS = 5  # OpenAI's legacy API takes 0-5
MAX_STOP = 4  # stop strings, as OpenAI
MAX_STOP_CHARS = 256
# OpenAI's finish reasons: the model's own end of text is "stop" too.
FINISH_REASONS = {FINISH_EOS: "stop", FINISH_STOP: "stop", FINISH_LENGTH: "length"}

# Fields OpenAI's completions take that gptcli has no use for: accepted only with the value that changes nothing.
NEUTRAL = {
    "best_of": lambda v, n: v is None or v == n,
    "suffix": lambda v, n: v is None or v == "",
}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "echo", "logprobs", "stream",
         "stream_options", "user", "frequency_penalty", "presence_penalty", "logit_bias", *NEUTRAL,
         # vLLM's extra fields, under vLLM's names
         "top_k", "ignore_eos", "return_token_ids"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the server's own bounds on top of the model's."""

    context_length: int
    vocab_size: int
    max_tokens: int = 1024
    max_n: int = 16
    max_prompts: int = 32
    max_rows: int = 64  # prompts x n


@dataclass(frozen=True)
class CompletionRequest:
    """A checked ``/v1/completions`` request: the prompts as ids, and how each of their ``n`` choices samples."""

    model: str
    prompts: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str, ...]  # each prompt as text: what echo returns, where text_offset starts
    n: int
    options: tuple[SamplingOptions, ...]  # one per choice of a prompt: seeds seed, seed+1, ...
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool

    @property
    def max_tokens(self) -> int:
        return self.options[0].max_new_tokens

    def rows(self) -> list["RowRequest"]:
        """One RowRequest per choice, in OpenAI's order: choice ``i * n + j`` is prompt i's j-th."""
        from gptcli.serving.engine import RowRequest

        return [RowRequest(prompt, self.options[j], self.logprobs) for prompt in self.prompts for j in range(self.n)]

    def prompt_of(self, choice: int) -> int:
        return choice // self.n


# ---------------------------------------------------------------------------------------------
# Checking a request


def plural(count: int, noun: str) -> str:
    return noun if count == 1 else noun + "s"


def parse_stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", "stop", "invalid_value")
    if any(s == "" for s in stops):
        raise bad("'stop' strings must not be empty", "stop", "invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"'stop' strings must be at most {MAX_STOP_CHARS} characters", "stop", "invalid_value")
    return tuple(stops)


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: an object from token id (a JSON key, so a string) to a bias in [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad(f"'logit_bias' must be an object from token ids to numbers, got {type_name(value)}", "logit_bias",
                  "invalid_type")
    pairs = []
    for key, bias in value.items():
        if not re.fullmatch(r"-?[0-9]{1,12}", key):
            raise bad(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias", "invalid_value")
        token_id = int(key)
        if not 0 <= token_id < vocab_size:
            raise bad(f"'logit_bias': token id {token_id} is not in the vocabulary (0-{vocab_size - 1})", "logit_bias",
                      "invalid_value")
        if not is_number(bias):
            raise bad(f"'logit_bias' values must be numbers, got {type_name(bias)} for token {token_id}",
                      "logit_bias", "invalid_type")
        if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise bad(f"'logit_bias' values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias:g} for "
                      f"token {token_id}", "logit_bias", "invalid_value")
        pairs.append((token_id, float(bias)))
    if len({t for t, _ in pairs}) < len(pairs):  # "7" and "07" name one token
        raise bad("'logit_bias' names a token id twice", "logit_bias", "invalid_value")
    return tuple(pairs)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def encode_text(text: str, encode: Callable[[str], list[int]], param: str = "prompt") -> list[int]:
    """A request's text as ids; a 400 naming what the tokenizer cannot take (a lone surrogate, which
    is not Unicode text, or characters a character-level vocabulary lacks)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(f"'{param}' is not valid Unicode: it holds a lone surrogate {text[exc.start]!r} at character "
                  f"{exc.start}", param, "invalid_value") from None
    try:
        return encode(text)
    except UserError as exc:
        raise bad(str(exc), param, "invalid_value") from None


def _prompts(body: dict, tokenizer: "Tokenizer", limits: Limits) -> tuple[list[list[int]], list[str]]:
    """The prompts as ids and as text: a string, an array of strings, an array of ids or of id arrays."""
    value = body.get("prompt")
    if value is None:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(value, str):
        texts = [value]
        ids = [encode_text(value, lambda t: prompt_ids(t, tokenizer))]
    elif _is_ids(value):
        ids, texts = [value], None
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        texts = list(value)
        ids = None
    elif isinstance(value, list) and value and all(_is_ids(p) for p in value):
        ids, texts = list(value), None
    else:
        raise bad("'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of "
                  "token ids (none of them empty)", "prompt", "invalid_type")
    count = len(texts) if texts is not None else len(ids)
    if count > limits.max_prompts:
        raise bad(f"'prompt' may hold at most {limits.max_prompts} prompts, got {count}", "prompt", "invalid_value")
    if ids is None:
        ids = [encode_text(t, lambda t: prompt_ids(t, tokenizer)) for t in texts]
    else:
        for p in ids:
            wrong = next((t for t in p if not 0 <= t < limits.vocab_size), None)
            if wrong is not None:
                raise bad(f"token id {wrong} is not in the vocabulary (0-{limits.vocab_size - 1})", "prompt",
                          "invalid_value")
        texts = [tokenizer.decode(list(p)) for p in ids]
    for p in ids:
        if len(p) > limits.context_length:
            raise bad(f"This model's maximum context length is {limits.context_length} tokens, however you "
                      f"requested {len(p)} tokens in the prompt. Please shorten the prompt.", "prompt",
                      "context_length_exceeded")
    return ids, texts


def check_request(body: Any, known: set[str], neutral: dict[str, Callable[[Any, int], bool]], model_id: str,
                  limits: Limits) -> tuple[str, int]:
    """What every generating endpoint checks first: a JSON object of known fields, naming the served
    model; fields gptcli has no use for only with a value that changes nothing. Returns (model, n)."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type_name(body)}")
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("'model' is required: a string, the id GET /v1/models lists", "model",
                  "missing_required_parameter" if model is None else "invalid_type")
    if model != model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'", param="model",
                       code="model_not_found")
    n = integer(body, "n", 1, 1, limits.max_n)
    for name, is_neutral in neutral.items():
        if not is_neutral(body.get(name), n):
            raise bad(f"'{name}' is not supported by this server (gptcli serve); leave it out", name, "unsupported_parameter")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("'user' must be a string", "user", "invalid_type")
    return model, n


def parse_sampling(body: dict, limits: Limits, n: int, max_tokens: int,
                   stops: tuple[str, ...]) -> tuple[SamplingOptions, ...]:
    """How each of the ``n`` choices samples (the fields completions and chat share): choice j gets
    ``seed + j``, and a request without a seed a random one."""
    temperature = number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, MAX_TEMPERATURE)
    top_p = number(body, "top_p", None, 0.0, 1.0, low_open=True)
    top_k = integer(body, "top_k", None, -1, limits.vocab_size)
    if top_k is not None and top_k <= 0:  # vLLM's -1 (and 0): no top-k
        top_k = None
    frequency_penalty = number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY)
    presence_penalty = number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY)
    logit_bias = _logit_bias(body, limits.vocab_size)
    seed = integer(body, "seed", None, 0, MAX_SEED)  # the range gptcli generate --seed takes
    if seed is not None and seed + n - 1 > MAX_SEED:
        raise bad(f"'seed' {seed} with n={n} seeds the last choice {seed + n - 1} (choice i gets seed + i), past the "
                  f"largest seed, 2**64 - 1: use a seed of at most {MAX_SEED - n + 1}", "seed", "invalid_value")
    ignore_eos = boolean(body, "ignore_eos", False)
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - limits.max_n)
    return tuple(SamplingOptions(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed + j, stop=stops, ignore_eos=ignore_eos,
                                 frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                 logit_bias=logit_bias) for j in range(n))


def parse_streaming(body: dict) -> tuple[bool, bool, bool]:
    """(stream, stream_options.include_usage, vLLM's return_token_ids)."""
    stream = boolean(body, "stream", False)
    return stream, _stream_options(body, stream), boolean(body, "return_token_ids", False)


def check_rows(prompts: int, n: int, limits: Limits) -> None:
    if prompts * n > limits.max_rows:
        raise bad(f"this request asks for {prompts * n} completions ({prompts} {plural(prompts, 'prompt')} x n={n}); "
                  f"a request may ask for at most {limits.max_rows}", "n", "invalid_value")


def parse_completion(body: Any, tokenizer: "Tokenizer", limits: Limits, model_id: str) -> CompletionRequest:
    """Check a ``/v1/completions`` body (parsed JSON); ApiError for anything wrong with it."""
    model, n = check_request(body, KNOWN, NEUTRAL, model_id, limits)
    max_tokens = integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, limits.max_tokens)
    logprobs = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = boolean(body, "echo", False)
    stream, include_usage, return_token_ids = parse_streaming(body)
    options = parse_sampling(body, limits, n, max_tokens, parse_stops(body))
    ids, texts = _prompts(body, tokenizer, limits)
    check_rows(len(ids), n, limits)
    return CompletionRequest(model=model, prompts=tuple(tuple(p) for p in ids), prompt_texts=tuple(texts), n=n,
                             options=options, logprobs=logprobs, echo=echo, stream=stream,
                             include_usage=include_usage, return_token_ids=return_token_ids)


def _stream_options(body: dict, stream: bool) -> bool:
    value = body.get("stream_options")
    if value is None:
        return False
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise bad("'stream_options' must be an object with 'include_usage'", "stream_options", "invalid_type")
    return boolean(value, "include_usage", False)


def parse_tokenize(body: Any, tokenizer: "Tokenizer", model_id: str) -> list[int]:
    """``POST /tokenize`` (vLLM's shape): ``{"prompt": "text"}``, ``model`` optional; the text's ids."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type_name(body)}")
    unknown = sorted(set(body) - {"model", "prompt", "add_special_tokens"})
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    _check_optional_model(body, model_id)
    if not isinstance(body.get("prompt"), str):
        raise bad("'prompt' must be a string", "prompt", "invalid_type")
    return encode_text(body["prompt"], tokenizer.encode)


def parse_detokenize(body: Any, model_id: str, vocab_size: int) -> list[int]:
    """``POST /detokenize``: ``{"tokens": [ids]}``, ``model`` optional; the ids."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type_name(body)}")
    unknown = sorted(set(body) - {"model", "tokens"})
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    _check_optional_model(body, model_id)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("'tokens' must be an array of token ids", "tokens", "invalid_type")
    wrong = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if wrong is not None:
        raise bad(f"token id {wrong} is not in the vocabulary (0-{vocab_size - 1})", "tokens", "invalid_value")
    return tokens


def _check_optional_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'", param="model",
                       code="model_not_found")


# ---------------------------------------------------------------------------------------------
# From engine events to OpenAI's objects


@dataclass
class Choice:
    """One choice as it is decoded: text, ids, log-probabilities and where each token starts."""

    index: int
    token_bytes: Callable[[int], bytes]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    entries: list["TokenLogprob"] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each generated token's text_offset
    finish_reason: str | None = None
    error: str | None = None
    _offsets: Any = None  # gptcli.decoding.logprobs.TextOffsets: characters of the prompt and the tokens so far

    def __post_init__(self) -> None:
        from gptcli.decoding.logprobs import TextOffsets

        self._offsets = TextOffsets()

    def start(self, prompt_text: str, echo: bool, prompt_entries: Sequence["TokenLogprob"] | None) -> None:
        """Before the first token. ``text_offset`` counts characters from the start of the prompt, as
        OpenAI's API does (the first new token's offset is the prompt's length; ``gptcli generate
        --logprobs`` counts the same way); with echo the text starts with the prompt (and its
        log-probabilities)."""
        if echo:
            self.text = prompt_text
        if prompt_entries is not None:
            for entry in prompt_entries:
                self._advance(entry)
        else:
            self._offsets.chars = len(prompt_text)

    def _advance(self, entry: "TokenLogprob") -> None:
        self.entries.append(entry)
        self.offsets.append(self._offsets.advance(self.token_bytes(entry.token_id)))

    def add(self, event: "RowEvent") -> None:
        if event.finish_reason == "error":
            self.error = event.message or "the row could not be decoded"
            self.finish_reason = "error"
            return
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
            if event.logprob is not None:
                self._advance(event.logprob)
        self.text += event.text
        if event.finish_reason is not None:
            self.finish_reason = FINISH_REASONS.get(event.finish_reason, event.finish_reason)

    def logprobs_object(self, entries: Sequence["TokenLogprob"], offsets: Sequence[int]) -> dict:
        from gptcli.decoding.logprobs import openai_logprobs

        out = openai_logprobs(entries, self.token_bytes)
        out["text_offset"] = list(offsets)
        return out

    def to_dict(self, with_logprobs: bool, with_ids: bool, prompt_ids: Sequence[int] | None) -> dict:
        out: dict[str, Any] = {"text": self.text, "index": self.index,
                               "logprobs": self.logprobs_object(self.entries, self.offsets) if with_logprobs else None,
                               "finish_reason": self.finish_reason}
        if with_ids:
            out["prompt_token_ids"] = list(prompt_ids or [])
            out["token_ids"] = list(self.token_ids)
        return out


def new_completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(request: CompletionRequest, choices: Sequence[Choice]) -> dict:
    prompt_tokens = sum(len(p) for p in request.prompts)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(request: CompletionRequest, choices: Sequence[Choice], completion_id: str, created: int) -> dict:
    return {
        "id": completion_id, "object": "text_completion", "created": created, "model": request.model,
        "choices": [c.to_dict(request.logprobs is not None, request.return_token_ids,
                              request.prompts[request.prompt_of(c.index)]) for c in choices],
        "usage": usage(request, choices),
    }


def stream_chunk(request: CompletionRequest, completion_id: str, created: int, index: int, text: str,
                 logprobs: dict | None, finish_reason: str | None, token_ids: Sequence[int] | None = None) -> dict:
    choice: dict[str, Any] = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    chunk = {"id": completion_id, "object": "text_completion", "created": created, "model": request.model,
             "choices": [choice]}
    if request.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(request: CompletionRequest, choices: Sequence[Choice], completion_id: str, created: int) -> dict:
    return {"id": completion_id, "object": "text_completion", "created": created, "model": request.model,
            "choices": [], "usage": usage(request, choices)}


class CompletionFormat:
    """How ``/v1/completions`` writes a request's choices: the whole response, and the stream's chunks.
    ``gptcli.serving.chat.ChatFormat`` writes the same choices as ``/v1/chat/completions`` does."""

    def __init__(self, request: CompletionRequest, created: int | None = None, completion_id: str | None = None):
        self.request = request
        self.id = completion_id or new_completion_id()
        self.created = created if created is not None else now()

    def response(self, choices: Sequence[Choice]) -> dict:
        return completion_response(self.request, choices, self.id, self.created)

    def opening(self, choices: Sequence[Choice]) -> list[dict]:
        """Chunks before any token: with echo, each choice's prompt (and its log-probabilities)."""
        req = self.request
        if not req.echo:
            return []
        return [stream_chunk(req, self.id, self.created, c.index, c.text,
                             c.logprobs_object(c.entries, c.offsets) if req.logprobs is not None else None, None)
                for c in choices]

    def chunks(self, choice: Choice, event: "RowEvent", before: int) -> list[dict]:
        """The chunks one engine event makes (``before``: the choice's log-probability entries before it);
        a chunk per piece of text (per token with logprobs), finish_reason on the choice's last."""
        req = self.request
        logprobs = None
        if req.logprobs is not None and len(choice.entries) > before:
            logprobs = choice.logprobs_object(choice.entries[before:], choice.offsets[before:])
        if not (event.text or logprobs is not None or event.finish_reason is not None or req.return_token_ids):
            return []
        ids = ([event.token_id] if event.token_id is not None else []) if req.return_token_ids else None
        finish = choice.finish_reason if event.finish_reason is not None else None
        return [stream_chunk(req, self.id, self.created, choice.index, event.text, logprobs, finish, ids)]

    def usage_chunk(self, choices: Sequence[Choice]) -> dict:
        return usage_chunk(self.request, choices, self.id, self.created)
