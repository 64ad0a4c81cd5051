"""Prompt templates: the text an instruction-tuned run expects (the book's chapter 7 Alpaca-style
prompt), and how chat messages become that text. Torch-free, so the server and `generate` share it.

A run trained with ``--task instruct`` records its template's name in its checkpoint metadata under
``TEMPLATE_METADATA_KEY``; a model without one has no chat format.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from gptcli.errors import UserError

TEMPLATE_METADATA_KEY = "gptcli.template"
ALPACA = "alpaca"
TEMPLATES = (ALPACA,)

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"
# Where a chat answer ends when the model does not emit <|endoftext|>: the next section's header.
CHAT_STOP = "\n\n### "
CHAT_ROLES = ("system", "developer", "user", "assistant")


def format_input(instruction: str, input: str = "") -> str:
    """The book's ``format_input``: preamble, instruction, and the input section only when there is one."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    return text + (f"\n\n### Input:\n{input}" if input else "")


def format_example(instruction: str, input: str, output: str) -> tuple[str, str]:
    """One training example as (prompt, response): the loss may be masked on the prompt."""
    return format_input(instruction, input), f"{RESPONSE_HEADER}{output}"


def check_template(name: str) -> str:
    if name not in TEMPLATES:
        raise UserError(f"unknown prompt template {name!r}: known are {', '.join(TEMPLATES)}")
    return name


def _text_of(content: object, i: int) -> str:
    """A message's text: a string, or OpenAI's list of content parts of type "text" (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(part, Mapping) for part in content):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UserError(f"messages[{i}]: only text content parts are supported ({{\"type\": \"text\", "
                                f"\"text\": ...}}), got type {part.get('type')!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise UserError(f"messages[{i}]: 'content' must be a string or a list of text parts")


def chat_prompt(messages: Sequence[Mapping[str, object]], template: str = ALPACA) -> str:
    """The prompt a chat's messages make under ``template``, ending where the assistant's answer begins.

    A system (or developer) message replaces the preamble; each user turn is an instruction and each
    assistant turn a response, in order. Content is a string or a list of text parts (joined).
    Raises UserError for an unknown role, content that is not text, or no user turn.
    """
    check_template(template)
    preamble, turns, users = PREAMBLE, [], 0
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise UserError(f"messages[{i}]: unknown role {role!r}: use one of {', '.join(CHAT_ROLES)}")
        content = _text_of(content, i)
        if role in ("system", "developer"):
            preamble = content
        elif role == "user":
            users += 1
            turns.append(f"### Instruction:\n{content}")
        else:
            turns.append(f"### Response:\n{content}")
    if not users:
        raise UserError("messages hold no user turn: a chat needs at least one message with role 'user'")
    return "\n\n".join([preamble, *turns]) + RESPONSE_HEADER
