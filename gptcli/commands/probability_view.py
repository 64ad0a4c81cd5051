"""Text coloured by the probability the model gave each token: ``generate --show-probs``, ``score
--show`` and the interactive session. Rendering only; the log-probabilities come from gptcli.decoding.logprobs.

Colours are shown only where stdout gets Rich output (a terminal, or FORCE_COLOR; see
``stdout_styled``) and NO_COLOR is not set (non-empty, as Rich reads it). Otherwise nothing here
writes: stdout is exactly what it is without the option, and there is no legend.
"""

from __future__ import annotations

import codecs
import math
import sys
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

if TYPE_CHECKING:
    from gptcli.decoding.logprobs import TokenLogprob

# (lowest probability, Rich colour, label), likeliest band first. Surprisal is -log2 of the probability:
# the bands are 1, 3.3 and 6.6 bits.
BANDS = (
    (0.5, "green", "50% or more"),
    (0.1, "yellow", "10-50%"),
    (0.01, "dark_orange", "1-10%"),
    (0.0, "red", "under 1%"),
)


def colour_for(prob: float | None) -> str | None:
    """The band colour of a probability; None for a token nothing predicted (a text's first)."""
    if prob is None:
        return None
    return next(colour for lowest, colour, _ in BANDS if prob >= lowest)


def colours_wanted() -> bool:
    """Whether to colour by probability: Rich output on stdout, and no NO_COLOR."""
    import os

    from gptcli.commands.common import stdout_styled

    return stdout_styled() and os.environ.get("NO_COLOR", "") == ""


def probability(entry: "TokenLogprob | None") -> float | None:
    return None if entry is None or entry.logprob is None else math.exp(entry.logprob)


def _console(stderr: bool = False):
    from rich.console import Console

    # soft_wrap: no line breaks of Rich's own; no markup, emoji codes or highlighting: text as the model wrote it.
    return Console(file=sys.stderr if stderr else sys.stdout, soft_wrap=True, markup=False, emoji=False,
                   highlight=False)


class ColouredOutput:
    """Writes pieces of text to stdout, each in the colour of its probability, flushed per piece."""

    def __init__(self) -> None:
        self.console = _console()

    def write(self, text: str, prob: float | None) -> None:
        from rich.text import Text

        if text:
            self.console.print(Text(text, style=colour_for(prob) or ""), end="")
            sys.stdout.flush()


def print_legend(what: str = "each token") -> None:
    """One line on stderr naming the colours (coloured where stderr is a terminal)."""
    from rich.text import Text

    line = Text(f"colours: the probability the model gave {what}: ")
    for n, (_, colour, label) in enumerate(BANDS):
        line.append("; " if n else "")
        line.append(label, style=colour)
    _console(stderr=True).print(line)


def coloured_chunks(entries: Sequence["TokenLogprob"], token_bytes: Callable[[int], bytes]
                    ) -> Iterable[tuple[str, float | None]]:
    """A whole text's tokens as printable (text, probability) chunks: a character split across tokens
    comes out once, in the colour of the least likely of them."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending: float | None = None  # the least probability among the tokens of the chunk being built
    for entry in entries:
        prob = probability(entry)
        if prob is not None:
            pending = prob if pending is None else min(pending, prob)
        text = utf8.decode(token_bytes(entry.token_id))
        if text:
            yield text, pending
            pending = None
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail, pending


def check_view_options(logprobs: str | None, *, show_probs: bool, json_output: bool, each_line: bool,
                       interactive: bool) -> int | None:
    """``generate``'s --logprobs K (None when not given), after checking it goes with the other options."""
    from gptcli.commands.common import parse_number
    from gptcli.errors import UserError
    from gptcli.decoding.logprobs import MAX_LOGPROBS

    if interactive and (json_output or each_line):
        raise UserError("--interactive is a session on a terminal; not with --json or --each-line")
    k = None
    if logprobs is not None:
        k = int(parse_number("--logprobs", logprobs, int))
        if not 0 <= k <= MAX_LOGPROBS:
            raise UserError(f"--logprobs must be 0 to {MAX_LOGPROBS} (alternatives per token), got {k}")
        if not json_output:
            raise UserError("--logprobs adds log-probabilities to --json's output; add --json (--show-probs shows "
                            "them as colours)")
    if show_probs and json_output:
        raise UserError("--show-probs colours streamed text, and --json streams none; --logprobs K adds the "
                        "numbers to the JSON")
    if show_probs and each_line:
        raise UserError("--show-probs colours one streamed continuation; not with --each-line")
    return k


class StreamView:
    """What ``--logprobs`` and ``--show-probs`` need from one streamed generation: a Recorder to pass
    as ``Generation(observe=...)``, colours for its pieces, and the JSON ``logprobs`` object."""

    def __init__(self, logprobs_k: int | None, show_probs: bool, legend: bool = True):
        from gptcli.decoding.logprobs import Recorder

        self.k = logprobs_k
        self.colours = ColouredOutput() if show_probs and colours_wanted() else None
        self.recorder = Recorder(logprobs_k or 0) if logprobs_k is not None or self.colours is not None else None
        if self.colours is not None and legend:
            print_legend()

    def write(self, piece: str) -> bool:
        """Write ``piece`` in the colour of the token that completed it; False when not colouring."""
        if self.colours is None or self.recorder is None:
            return False
        self.colours.write(piece, probability(self.recorder.last))
        return True

    def json(self, tokenizer, start_offset: int = 0) -> dict:
        """``{"logprobs": ...}`` in OpenAI's format with --logprobs, else nothing."""
        from gptcli.decoding.logprobs import openai_logprobs

        if self.k is None or self.recorder is None:
            return {}
        return {"logprobs": openai_logprobs(self.recorder.entries[0], tokenizer.token_bytes, start_offset)}
