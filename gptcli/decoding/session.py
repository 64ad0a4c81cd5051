"""An interactive session: a running text that grows by what the user types and what the model
continues, with the keys and values of the text so far kept between turns. Never prints.

Each turn appends the typed text to the running text, tokenizes the whole of it, and runs only the
tokens after the longest prefix whose keys and values are cached: usually just what was typed (and
the last generated token, which was picked but never fed). Tokenizing the whole text, rather than
appending the typed text's own tokens, keeps a turn exactly what ``gptcli generate`` does with the
concatenated text as its prompt, even where BPE merges across the boundary.

A model whose checkpoint names a prompt template (an instruction-tuned run: ``checkpoint_template``) chats
instead: each turn is the user's message, the running text is ``templates.chat_prompt`` over the
conversation so far (the user's messages and the model's answers), and an answer ends at <|endoftext|> or
``templates.CHAT_STOP`` (the next section's header). The cache works the same way: the transcript of one
turn is the start of the next one's.

Past the context window the rule of ``gptcli.decoding.generate.Decoder`` holds: the last context_length
tokens are recomputed each step (cached keys are stale once positions move). A Ctrl-C between two
steps (or inside one) leaves the cache consistent: ``KVCache.length`` is updated only after a
forward pass completes, and only that prefix is ever reused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from gptcli.errors import UserError
from gptcli.templates import CHAT_STOP, TEMPLATE_METADATA_KEY, chat_prompt, check_template
from gptcli.decoding.generate import (FINISH_INTERRUPTED, Decoder, Generation, SamplingOptions, check_seed, crop_prompt,
                             prompt_ids)
from gptcli.decoding.speculative import SpeculativeOptions, SpeculativeStats, Speculator

if TYPE_CHECKING:
    import torch

    from gptcli.runtime import Runtime


class SessionDecoder(Decoder):
    """A ``Decoder`` whose cache outlives one generation: ``prefill`` reuses the longest cached prefix
    of the ids it is given. ``reused`` and ``prefilled`` say what the last prefill did."""

    def __init__(self, model, device, dtype):
        super().__init__(model, device, dtype)
        self.reused = 0  # tokens of the last prefill whose keys and values came from the cache
        self.prefilled = 0  # tokens the last prefill ran through the model

    def cached_ids(self) -> list[int]:
        """The ids whose keys and values are in the cache, in order from position 0."""
        if not self._use_cache or self._cache is None:
            return []
        return self._ids[: self._cache.length]

    def forget(self) -> None:
        """Drop the cached keys and values (they are recomputed on the next prefill)."""
        if self._cache is not None:
            self._cache.length = 0

    def prefill(self, ids: Sequence[int], max_new_tokens: int) -> "torch.Tensor":
        import torch

        from gptcli.model.kv_cache import KVCache

        ids = list(ids)
        if not ids:
            raise ValueError("prefill needs at least one token")
        if len(ids) >= self.context_length:  # past the window: generate's rule, no cache
            self.reused, self.prefilled = 0, min(len(ids), self.context_length)
            return super().prefill(ids, max_new_tokens)
        common = shared_prefix(self.cached_ids(), ids[:-1])  # feed at least one token, for its logits
        if self._cache is None:
            # The whole window, once: every later turn writes into it while the text fits.
            self._cache = KVCache.empty(self.cfg, batch_size=1, max_len=self.context_length, device=self.device,
                                        dtype=self.dtype)
            common = 0
        self._cache.length = common
        self._ids = ids
        self._use_cache = True
        self.reused, self.prefilled = common, len(ids) - common
        with torch.inference_mode():
            x = torch.tensor([ids[common:]], dtype=torch.long, device=self.device)  # (1, T)
            return self.model(x, self._cache, last_only=True, attention=self.attention)[:, -1, :]  # (1, V)


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class TurnStats:
    """What one turn did: the tokens it ran before the first new one, those it reused, its timings."""

    turn: int
    prefill_tokens: int
    reused_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    decode_tokens: int
    finish_reason: str | None
    dropped_tokens: int  # running-text tokens left of the context window
    speculative: SpeculativeStats | None = None  # with a draft (--draft, --lookup)

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else None


def checkpoint_template(runtime: "Runtime") -> str | None:
    """The prompt template the model's checkpoint names in its metadata (``gptcli train --task instruct``
    records one); None for random weights or a checkpoint without one. UserError for a name this
    gptcli does not know."""
    if runtime.checkpoint is None:
        return None
    from gptcli.checkpoint import read_header

    name = read_header(runtime.checkpoint).metadata.get(TEMPLATE_METADATA_KEY)
    return check_template(name) if name else None


# /set NAME VALUE: the SamplingOptions field each name sets, and how its value is read.
SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {}


def _optional(kind: Callable[[str], object]) -> Callable[[str], object]:
    return lambda value: None if value.lower() in {"none", "off"} else kind(value)


def _flag(value: str) -> bool:
    if value.lower() in {"on", "true", "yes", "1"}:
        return True
    if value.lower() in {"off", "false", "no", "0"}:
        return False
    raise ValueError(value)


for _names, _field, _kind in (
    (("temperature", "t"), "temperature", float),
    (("top_k", "top-k"), "top_k", _optional(int)),
    (("top_p", "top-p"), "top_p", _optional(float)),
    (("max_new_tokens", "max-new-tokens", "n", "max_tokens"), "max_new_tokens", int),
    (("seed",), "seed", int),
    (("ignore_eos", "ignore-eos"), "ignore_eos", _flag),
    (("min_p", "min-p"), "min_p", _optional(float)),
    (("repetition_penalty", "repetition-penalty"), "repetition_penalty", float),
    (("frequency_penalty", "frequency-penalty"), "frequency_penalty", float),
    (("presence_penalty", "presence-penalty"), "presence_penalty", float),
):
    for _name in _names:
        SETTINGS[_name] = (_field, _kind)


def apply_setting(options: SamplingOptions, name: str, value: str) -> SamplingOptions:
    """``options`` with one setting changed (``/set temperature 0.8``); UserError for a bad name or value."""
    if name.lower() not in SETTINGS:
        raise UserError(f"unknown setting {name!r}; the settings are temperature, top_k, top_p, min_p, "
                        "repetition_penalty, frequency_penalty, presence_penalty, max_new_tokens (n), seed and "
                        "ignore_eos")
    field, kind = SETTINGS[name.lower()]
    try:
        parsed = kind(value)
    except ValueError:
        raise UserError(f"{field} cannot be {value!r}") from None
    if field == "seed":
        check_seed(parsed, "seed")  # type: ignore[arg-type]
    return dataclasses.replace(options, **{field: parsed}).validate()


class Session:
    """The running text and a decoder that keeps its cache. ``turn(typed)`` yields the continuation's
    pieces as they are decoded, adding each to ``text``; stopping early (Ctrl-C) keeps what came.

    ``spec`` (``--draft``/``--lookup``) makes every turn speculative (gptcli.decoding.speculative), the same
    ids as without it; ``draft`` is the loaded draft model (None for lookup), whose cache is kept
    between turns too.

    ``template`` (``checkpoint_template``): chat in it. ``turn(message)`` then answers the message, and
    ``messages`` is the conversation (the answer being written is the last one, whole or cut by Ctrl-C).
    """

    def __init__(self, runtime: "Runtime", options: SamplingOptions, *, spec: SpeculativeOptions | None = None,
                 draft: "Runtime | None" = None, template: str | None = None):
        self.runtime = runtime
        self.options = options.validate()
        self.template = None if template is None else check_template(template)
        self.messages: list[dict[str, str]] = []  # chat: {"role": "user"|"assistant", "content": ...}
        self.text = ""
        self.decoder = SessionDecoder(runtime.model, runtime.device, runtime.dtype)
        self.speculator: Speculator | None = None
        self._draft_decoder: SessionDecoder | None = None  # a draft model's, kept between turns too
        if spec is not None and spec.enabled:
            if draft is not None:
                self._draft_decoder = SessionDecoder(draft.model, draft.device, draft.dtype)
            self.speculator = Speculator(spec, runtime, draft, decoder=self.decoder, draft_decoder=self._draft_decoder)
        self.turns = 0
        self.generation: Generation | None = None  # the last turn's
        self._dropped = 0
        self._prefill: tuple[int, int] | None = None  # the last turn's (prefilled, reused), at its first token

    @property
    def context_length(self) -> int:
        return self.runtime.cfg.context_length

    def token_ids(self) -> list[int]:
        """The running text's ids, as a prompt of it would be tokenized."""
        return prompt_ids(self.text, self.runtime.tokenizer)

    def cached_tokens(self) -> int:
        return len(self.decoder.cached_ids())

    @property
    def chat(self) -> bool:
        return self.template is not None

    def reset(self) -> None:
        """An empty running text, and conversation (settings stay)."""
        self.text = ""
        self.messages = []
        self.decoder.forget()
        if self._draft_decoder is not None:
            self._draft_decoder.forget()

    def set(self, name: str, value: str) -> SamplingOptions:
        self.options = apply_setting(self.options, name, value)
        return self.options

    def turn(self, typed: str, observe: Callable | None = None) -> Iterator[str]:
        """Append ``typed`` and continue the running text; yields the new text as it becomes printable.
        A text the tokenizer cannot encode raises UserError (on the first ``next``) and changes nothing.

        In a chat (``template``), ``typed`` is the user's message and the pieces are the model's answer.

        ``observe`` is ``Generation``'s hook (gptcli.decoding.logprobs.Recorder). Each turn samples with seed
        ``seed + turn``, so a seeded session repeats and its turns differ.
        """
        if self.chat:
            yield from self._chat_turn(typed, observe)
            return
        ids = prompt_ids(self.text + typed, self.runtime.tokenizer)  # UserError (a character not in the vocabulary)
        self.text += typed
        yield from self._continue(ids, self.options, observe)

    def prompt(self, message: str) -> str:
        """Chat: the text the model continues to answer ``message`` after the conversation so far."""
        return chat_prompt([*self.messages, {"role": "user", "content": message}], self.template or "")

    def _chat_turn(self, message: str, observe: Callable | None) -> Iterator[str]:
        text = self.prompt(message)
        ids = prompt_ids(text, self.runtime.tokenizer)  # UserError: nothing changes
        answer = {"role": "assistant", "content": ""}
        self.messages += [{"role": "user", "content": message}, answer]
        self.text = text
        # An answer ends at <|endoftext|> or where the model starts the next section ("### Instruction:").
        options = dataclasses.replace(self.options, stop=(*self.options.stop, CHAT_STOP))
        for piece in self._continue(ids, options, observe):
            answer["content"] += piece  # as it comes: a Ctrl-C keeps what was written
            yield piece

    def _continue(self, ids: list[int], options: SamplingOptions, observe: Callable | None) -> Iterator[str]:
        """Continue ``ids`` (the running text's), adding each printable piece to ``text``."""
        tokenizer = self.runtime.tokenizer
        self._dropped = crop_prompt(ids, self.context_length)[1]
        self.turns += 1
        options = dataclasses.replace(options, seed=self.options.seed + self.turns - 1)
        if self.speculator is not None:
            self.generation = self.speculator.generation(ids, options, observe=observe)
        else:
            self.generation = Generation(self.decoder, ids, options, eos_id=tokenizer.eot_id,
                                         token_bytes=tokenizer.token_bytes, context_length=self.context_length,
                                         observe=observe)
        self._prefill = None
        for piece in self.generation:
            if self._prefill is None:  # before a slide past the window prefills again mid-turn
                self._prefill = (self.decoder.prefilled, self.decoder.reused)
            self.text += piece
            yield piece

    def interrupt(self) -> None:
        """The running turn was stopped (Ctrl-C): what it wrote stays; its finish reason says so."""
        if self.generation is not None and self.generation.finish_reason is None:
            self.generation.finish_reason = FINISH_INTERRUPTED

    def stats(self) -> TurnStats | None:
        """The last turn's figures (also after a Ctrl-C)."""
        g = self.generation
        if g is None:
            return None
        prefilled, reused = (0, 0) if not g.token_ids else self._prefill or (self.decoder.prefilled, self.decoder.reused)
        return TurnStats(turn=self.turns, prefill_tokens=prefilled, reused_tokens=reused, new_tokens=len(g.token_ids),
                         prefill_s=g.timings.prefill_s, decode_s=g.timings.decode_s,
                         decode_tokens=g.timings.decode_tokens, finish_reason=g.finish_reason,
                         dropped_tokens=self._dropped, speculative=getattr(g, "stats", None))
