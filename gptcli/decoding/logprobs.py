"""Log-probabilities of tokens, in OpenAI's legacy completions format. Never prints.

They come from the model's own distribution: the log-softmax of the raw logits, in float32, before
temperature, top-k or top-p change what is sampled (what vLLM reports by default). So the same text
gets the same log-probabilities however it was generated, and they agree with ``gptcli score``.

OpenAI's format (``/v1/completions`` with ``logprobs``) is four parallel lists: ``tokens`` (each
token's text), ``token_logprobs`` (the chosen token's log-probability; None for a first prompt
token, which nothing predicts), ``top_logprobs`` (the K likeliest tokens at that step, token text to
log-probability, plus the chosen token when it is not among them; None where there is no prediction) and ``text_offset`` (where each token starts in
the text, in characters). A token that is part of a UTF-8 character has no text of its own: it is
written ``bytes:\\xe2\\x80`` as OpenAI writes such tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

MAX_LOGPROBS = 20  # OpenAI's legacy API takes 0-5; gptcli generate up to 20


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``k`` likeliest at its step (sorted, likeliest first)."""

    token_id: int
    logprob: float | None  # None: nothing predicted it (the first token of a text)
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: "torch.Tensor") -> "torch.Tensor":
    """Log-probabilities (..., V) in float32 from logits of any dtype."""
    import torch

    return torch.log_softmax(logits.detach().float(), dim=-1)


def step_logprobs(logits: "torch.Tensor", chosen: Sequence[int], k: int) -> list[TokenLogprob]:
    """For logits (B, V) of one step and the ids chosen for each row: each row's TokenLogprob."""
    import torch

    logp = log_softmax(logits)  # (B, V)
    picked = logp.gather(-1, torch.tensor(list(chosen), device=logp.device).view(-1, 1)).squeeze(-1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(picked)
    if k > 0:
        values, index = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)  # (B, k), sorted descending
        tops = [tuple(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
    return [TokenLogprob(int(t), p, top) for t, p, top in zip(chosen, picked, tops)]


def sequence_logprobs(logits: "torch.Tensor", ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """For a text's ids (T,) and the model's logits at each of its positions (T, V): every token's
    TokenLogprob, the first with none (nothing predicts it)."""
    entries = [TokenLogprob(int(ids[0]), None)] if len(ids) else []
    if len(ids) > 1:
        entries += step_logprobs(logits[:-1], ids[1:], k)
    return entries


def token_text(token_bytes: bytes) -> str:
    """A token's text, or ``bytes:\\xNN...`` when its bytes are not whole UTF-8 characters."""
    try:
        return token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token_bytes)


class TextOffsets:
    """Where each token starts in the decoded text, in characters from ``start``: a token that ends
    inside a UTF-8 character moves the offset only once the character is complete."""

    def __init__(self, start: int = 0):
        import codecs

        self.chars = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token_bytes: bytes) -> int:
        """This token's offset; the count moves past its complete characters."""
        offset = self.chars
        self.chars += len(self._utf8.decode(token_bytes))
        return offset


def openai_logprobs(entries: Sequence[TokenLogprob], token_bytes: Callable[[int], bytes],
                    start_offset: int = 0) -> dict:
    """OpenAI's ``logprobs`` object for these tokens; offsets count characters from ``start_offset``.

    A token that ends inside a UTF-8 character moves the offset only when the character is complete,
    so ``text_offset`` always points into the decoded text.
    """
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    counter = TextOffsets(start_offset)
    for entry in entries:
        raw = token_bytes(entry.token_id)
        tokens.append(token_text(raw))
        token_logprobs.append(entry.logprob)
        top_logprobs.append(None if entry.logprob is None else _top_dict(entry, token_bytes))
        offsets.append(counter.advance(raw))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def _top_dict(entry: TokenLogprob, token_bytes: Callable[[int], bytes]) -> dict[str, float]:
    """Token text to log-probability, likeliest first; two ids with the same text keep the likelier.
    As in OpenAI's API, the chosen token is there too, last, when it is not among the K likeliest
    (up to K + 1 entries)."""
    out: dict[str, float] = {}
    top = entry.top
    if top and entry.token_id not in {token_id for token_id, _ in top}:
        top = (*top, (entry.token_id, entry.logprob))
    for token_id, logprob in top:
        out.setdefault(token_text(token_bytes(token_id)), logprob)
    return out


class Recorder:
    """Collects every step's TokenLogprob, row by row: the ``observe`` hook of ``Generation`` (a step's
    logits (1, V) and the id chosen), and ``row(b)`` the hook of a batch's row b (``generate_batch``)."""

    def __init__(self, k: int = 0, rows: int = 1):
        self.k = k
        self.entries: list[list[TokenLogprob]] = [[] for _ in range(rows)]

    def __call__(self, logits: "torch.Tensor", chosen: Sequence[int], row: int = 0) -> None:
        self.entries[row] += step_logprobs(logits, chosen, self.k)

    def row(self, b: int) -> Callable[["torch.Tensor", Sequence[int]], None]:
        return lambda logits, chosen: self(logits, chosen, b)

    @property
    def last(self) -> TokenLogprob | None:
        """The latest entry of row 0 (a single sequence's last chosen token)."""
        return self.entries[0][-1] if self.entries[0] else None


def least_likely(entries: Sequence[TokenLogprob], n: int) -> list[int]:
    """Positions of the ``n`` least likely scored tokens, most surprising first (ties: the earlier first)."""
    scored = [i for i, e in enumerate(entries) if e.logprob is not None]
    return sorted(scored, key=lambda i: (entries[i].logprob, i))[:n]
