"""OpenAI's chat completions API (``/v1/chat/completions``) as data, for a model whose checkpoint names a
prompt template (``gptcli.templates``: an instruction-tuned run records ``gptcli.template`` in its
metadata). No web code and no model here; never prints.

A chat request is a completion request in disguise: its messages become one prompt through the
template (``chat_prompt``), the template's ``CHAT_STOP`` (the next section's header) joins the
request's stop strings, and ``<|endoftext|>`` ends it as in completions. So the checking, the
sampling (``parse_sampling``), the engine's rows and the choices are the completions' own; only the
fields around them and the output's shape (``ChatFormat``) differ.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from gptcli.errors import UserError
from gptcli.serving.fields import ApiError, bad, boolean, integer, type_name
from gptcli.serving.completions import (
    DEFAULT_MAX_TOKENS,
    Choice,
    CompletionFormat,
    CompletionRequest,
    Limits,
    check_request,
    check_rows,
    encode_text,
    parse_sampling,
    parse_stops,
    parse_streaming,
    usage,
)
from gptcli.decoding.generate import prompt_ids
from gptcli.templates import CHAT_STOP, TEMPLATE_METADATA_KEY, chat_prompt, check_template

if TYPE_CHECKING:
    from gptcli.decoding.logprobs import TokenLogprob
    from gptcli.serving.engine import RowEvent
    from gptcli.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20  # OpenAI's chat API takes 0-20

# Chat fields OpenAI's clients may send that gptcli has no use for: accepted with the value that changes nothing.
CHAT_NEUTRAL = {
    "tools": lambda v, n: v is None or v == [],
    "tool_choice": lambda v, n: v is None or v == "none",
    "parallel_tool_calls": lambda v, n: v is None or isinstance(v, bool),
    "response_format": lambda v, n: v is None or v == {"type": "text"},
    "store": lambda v, n: v is None or v is False,
}
CHAT_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", "stop",
              "stream", "stream_options", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty",
              "logit_bias", "user", *CHAT_NEUTRAL,
              # vLLM's extra fields, under vLLM's names
              "top_k", "ignore_eos", "return_token_ids"}


def checkpoint_template(checkpoint: Path | None) -> str | None:
    """The prompt template a checkpoint's metadata names (``gptcli.template``), or None: no chat format.
    UserError when it names a template gptcli does not know."""
    if checkpoint is None:
        return None
    from gptcli.checkpoint import read_header

    name = read_header(checkpoint).metadata.get(TEMPLATE_METADATA_KEY)
    if name is None:
        return None
    try:
        return check_template(name)
    except UserError as exc:
        raise UserError(f"{checkpoint}: metadata {TEMPLATE_METADATA_KEY!r}: {exc}") from None


def no_template_error() -> ApiError:
    return ApiError(400, "this model has no chat format (its checkpoint names no prompt template, as a run trained "
                    "with `gptcli train --task instruct` does), so this server has no chat endpoint: send the text "
                    "to continue to POST /v1/completions (OpenAI's client: client.completions.create(model=..., "
                    "prompt=...))", code="unsupported_endpoint")


def _messages(body: dict, template: str) -> str:
    """The prompt the messages make; a 400 for anything chat_prompt or OpenAI's shape refuses."""
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required: an array of {role, content} objects", "messages",
                  "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad(f"'messages' must be a non-empty array of {{role, content}} objects, got "
                  f"{'an empty array' if messages == [] else type_name(messages)}", "messages", "invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content', got {type_name(message)}",
                      "messages", "invalid_type")
    try:
        return chat_prompt(messages, template)
    except UserError as exc:
        raise bad(str(exc), "messages", "invalid_value") from None


def _max_tokens(body: dict, limits: Limits) -> int:
    """``max_completion_tokens`` (OpenAI's current name) or ``max_tokens`` (its older one); both must agree."""
    newer = integer(body, "max_completion_tokens", None, 0, limits.max_tokens)
    older = integer(body, "max_tokens", None, 0, limits.max_tokens)
    if newer is not None and older is not None and newer != older:
        raise bad(f"'max_tokens' ({older}) and 'max_completion_tokens' ({newer}) disagree: send one of them",
                  "max_completion_tokens", "invalid_value")
    return newer if newer is not None else older if older is not None else DEFAULT_MAX_TOKENS


def _chat_logprobs(body: dict) -> int | None:
    """OpenAI's chat fields: ``logprobs`` (a boolean) and ``top_logprobs`` (0-20, only with logprobs)."""
    wanted = boolean(body, "logprobs", False)
    top = integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return (top or 0) if wanted else None


def parse_chat(body: Any, tokenizer: "Tokenizer", limits: Limits, model_id: str, template: str) -> CompletionRequest:
    """Check a ``/v1/chat/completions`` body; the completion request it makes (one prompt, ``n`` choices).
    The template's stop string is added to the request's own (up to 4, as OpenAI)."""
    model, n = check_request(body, CHAT_KNOWN, CHAT_NEUTRAL, model_id, limits)
    max_tokens = _max_tokens(body, limits)
    logprobs = _chat_logprobs(body)
    stream, include_usage, return_token_ids = parse_streaming(body)
    stops = parse_stops(body)
    options = parse_sampling(body, limits, n, max_tokens, stops + tuple(s for s in (CHAT_STOP,) if s not in stops))
    prompt = _messages(body, template)
    ids = encode_text(prompt, lambda t: prompt_ids(t, tokenizer), "messages")
    if len(ids) > limits.context_length:
        raise bad(f"This model's maximum context length is {limits.context_length} tokens, however your messages "
                  f"resulted in {len(ids)} tokens. Please reduce the length of the messages.", "messages",
                  "context_length_exceeded")
    check_rows(1, n, limits)
    return CompletionRequest(model=model, prompts=(tuple(ids),), prompt_texts=(prompt,), n=n, options=options,
                             logprobs=logprobs, echo=False, stream=stream, include_usage=include_usage,
                             return_token_ids=return_token_ids)


# ---------------------------------------------------------------------------------------------
# From choices to OpenAI's chat objects


def _token(token_id: int, logprob: float | None, token_bytes) -> dict:
    from gptcli.decoding.logprobs import token_text

    raw = token_bytes(token_id)
    return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(entries: Sequence["TokenLogprob"], token_bytes, k: int) -> dict:
    """OpenAI's chat ``logprobs``: ``content``, one entry per generated token with its text, the model's own
    log-probability, its bytes and the ``k`` likeliest tokens at that step (as completions: before
    temperature, top-p, the penalties and logit_bias)."""
    content = []
    for entry in entries:
        item = _token(entry.token_id, entry.logprob, token_bytes)
        item["top_logprobs"] = [_token(t, lp, token_bytes) for t, lp in entry.top[:k]]
        content.append(item)
    return {"content": content, "refusal": None}


class ChatFormat(CompletionFormat):
    """``/v1/chat/completions``' shapes for the choices of a request ``parse_chat`` made: ``chat.completion``
    with a message per choice, or ``chat.completion.chunk``s: the role first, then the content as it
    comes, then the finish reason, each choice on its own."""

    def __init__(self, request: CompletionRequest, created: int | None = None):
        super().__init__(request, created, "chatcmpl-" + uuid.uuid4().hex)

    def _logprobs(self, choice: Choice, entries: Sequence["TokenLogprob"]) -> dict | None:
        k = self.request.logprobs
        return None if k is None else chat_logprobs(entries, choice.token_bytes, k)

    def response(self, choices: Sequence[Choice]) -> dict:
        req = self.request
        out: dict[str, Any] = {"id": self.id, "object": "chat.completion", "created": self.created, "model": req.model,
                               "choices": []}
        for c in choices:
            choice: dict[str, Any] = {"index": c.index,
                                      "message": {"role": "assistant", "content": c.text, "refusal": None},
                                      "logprobs": self._logprobs(c, c.entries), "finish_reason": c.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = list(c.token_ids)
            out["choices"].append(choice)
        if req.return_token_ids:
            out["prompt_token_ids"] = list(req.prompts[0])
        out["usage"] = usage(req, choices)
        return out

    def _chunk(self, index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None,
               token_ids: Sequence[int] | None = None) -> dict:
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = list(token_ids)
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.request.model, "choices": [choice]}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self, choices: Sequence[Choice]) -> list[dict]:
        return [self._chunk(c.index, {"role": "assistant", "content": ""}) for c in choices]

    def chunks(self, choice: Choice, event: "RowEvent", before: int) -> list[dict]:
        req = self.request
        out = []
        entries = choice.entries[before:]
        if event.text or entries or (req.return_token_ids and event.token_id is not None):
            ids = ([event.token_id] if event.token_id is not None else []) if req.return_token_ids else None
            out.append(self._chunk(choice.index, {"content": event.text}, self._logprobs(choice, entries), None, ids))
        if event.finish_reason is not None:
            out.append(self._chunk(choice.index, {}, None, choice.finish_reason))
        return out
