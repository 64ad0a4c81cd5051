"""`gptcli score --tokens / --worst N / --show`: a text token by token, its most surprising tokens, and
the text coloured by probability. Rendering only; the numbers come from gptcli.decoding.logprobs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from gptcli.commands.common import print_table, stdout_styled

if TYPE_CHECKING:
    from gptcli.decoding.logprobs import TokenLogprob
    from gptcli.tokenizer import Tokenizer

BEFORE = 24  # characters of context shown before a surprising token


def percent(prob: float) -> str:
    """A probability as a percentage with three significant digits: 12.3%, 0.0261%."""
    return f"{prob * 100:.3g}%"


def _offsets(entries: Sequence["TokenLogprob"], tokenizer: "Tokenizer") -> tuple[list[int], str]:
    from gptcli.token_pieces import pieces

    found = pieces(tokenizer, [e.token_id for e in entries])
    return [p.start for p in found], tokenizer.decode([e.token_id for e in entries])


def _top(entry: "TokenLogprob", tokenizer: "Tokenizer") -> str:
    from gptcli.token_pieces import visible

    if not entry.top:
        return "-"
    token_id, logprob = entry.top[0]
    return f"{visible(tokenizer.token_bytes(token_id))} ({percent(math.exp(logprob))})"


def _row(index: int, offset: int, entry: "TokenLogprob", tokenizer: "Tokenizer") -> list[str]:
    from gptcli.token_pieces import visible

    token = visible(tokenizer.token_bytes(entry.token_id))
    if entry.logprob is None:
        return [str(index), str(offset), str(entry.token_id), token, "-", "-", "-"]
    return [str(index), str(offset), str(entry.token_id), token, f"{entry.logprob:.4f}",
            percent(math.exp(entry.logprob)), _top(entry, tokenizer)]


COLUMNS = ["#", "offset", "id", "token", "logprob", "prob", "likeliest"]


def render_tokens(name: str, entries: Sequence["TokenLogprob"], tokenizer: "Tokenizer") -> None:
    offsets, _ = _offsets(entries, tokenizer)
    rows = [_row(i, offsets[i], e, tokenizer) for i, e in enumerate(entries)]
    print_table(f"{name}: {len(entries):,} tokens, each with its log-probability (natural log) and the model's "
                "likeliest token there", COLUMNS, rows, right_align=[0, 1, 2, 4, 5])


def render_worst(name: str, entries: Sequence["TokenLogprob"], tokenizer: "Tokenizer", n: int) -> None:
    from gptcli.decoding.logprobs import least_likely
    from gptcli.token_pieces import visible

    offsets, text = _offsets(entries, tokenizer)
    rows = []
    for i in least_likely(entries, n):
        before = visible(text[max(0, offsets[i] - BEFORE):offsets[i]].encode("utf-8"))
        rows.append([*_row(i, offsets[i], entries[i], tokenizer), before])
    print_table(f"{name}: the {len(rows)} least likely tokens, most surprising first", [*COLUMNS, "before it"], rows,
                right_align=[0, 1, 2, 4, 5])


def render_show(entries: Sequence["TokenLogprob"], tokenizer: "Tokenizer") -> None:
    """The text coloured by probability, then a blank line; only on a terminal (Rich output), and
    plain with NO_COLOR."""
    import sys

    from gptcli.commands.probability_view import ColouredOutput, coloured_chunks, colours_wanted

    if not stdout_styled():
        return
    if colours_wanted():
        out = ColouredOutput()
        for text, prob in coloured_chunks(entries, tokenizer.token_bytes):
            out.write(text, prob)
    else:
        sys.stdout.write(tokenizer.decode([e.token_id for e in entries]))
    sys.stdout.write("\n\n")
    sys.stdout.flush()


def json_fields(entries: Sequence["TokenLogprob"], tokenizer: "Tokenizer", *, tokens: bool, worst: int | None
                ) -> dict:
    """``logprobs`` (OpenAI's format) with --tokens, ``worst`` with --worst N."""
    from gptcli.decoding.logprobs import least_likely, openai_logprobs, token_text

    out: dict = {}
    if tokens:
        out["logprobs"] = openai_logprobs(entries, tokenizer.token_bytes)
    if worst is not None:
        offsets, _ = _offsets(entries, tokenizer)
        out["worst"] = [{"index": i, "token_id": entries[i].token_id,
                         "token": token_text(tokenizer.token_bytes(entries[i].token_id)),
                         "logprob": entries[i].logprob, "text_offset": offsets[i]}
                        for i in least_likely(entries, worst)]
    return out


class TokenViews:
    """--tokens, --worst and --show: each text's token log-probabilities and what to render of them."""

    def __init__(self, entries: list, tokenizer, tokens: bool, worst: int | None, show: bool):
        self.entries, self.tokenizer, self.tokens, self.worst, self.show = entries, tokenizer, tokens, worst, show

    def json(self, n: int) -> dict:
        return json_fields(self.entries[n], self.tokenizer, tokens=self.tokens, worst=self.worst)

    def render(self, names: list[str]) -> None:
        from gptcli.commands.probability_view import colours_wanted, print_legend

        if self.show and colours_wanted():
            print_legend()
        for name, entries in zip(names, self.entries):
            if self.show:
                render_show(entries, self.tokenizer)
            if self.tokens:
                render_tokens(name, entries, self.tokenizer)
            if self.worst is not None:
                render_worst(name, entries, self.tokenizer, self.worst)
