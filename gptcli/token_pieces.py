"""Tokens as people read them: each id with its bytes, its text, where it sits in the text, and a
visible form. Torch-free (``gptcli tokenize`` answers without importing torch). Never prints.

A byte-level BPE token need not be whole UTF-8 characters: an emoji is often two or three tokens,
the first ending inside the character. Such a token has no text of its own. Offsets count
characters of the decoded text: a token's ``start`` is how many characters the tokens before it
completed, its ``end`` how many it completes itself, so ``text[start:end]`` is the characters that
this token finishes (empty for a token that only begins a character).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from gptcli.errors import UserError

if TYPE_CHECKING:
    from gptcli.tokenizer import Tokenizer

# How whitespace and control characters are drawn in the visible form.
_VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


@dataclass(frozen=True)
class Piece:
    """One token of a text."""

    id: int
    bytes: bytes
    text: str | None  # None when the bytes are not whole UTF-8 characters
    start: int  # character offsets into the decoded text (see the module's docstring)
    end: int

    @property
    def visible(self) -> str:
        return visible(self.bytes)

    def record(self) -> dict:
        return {"id": self.id, "text": self.text, "bytes": list(self.bytes), "start": self.start, "end": self.end}


def visible(raw: bytes) -> str:
    """A token's bytes for the eye: spaces as ␣, newlines and tabs as \\n and \\t, other control
    characters and bytes that are not whole UTF-8 characters as <0xE2>."""
    out = []
    for ch in raw.decode("utf-8", errors="surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte surrogateescape could not decode
            out.append(f"<0x{code - 0xDC00:02X}>")
        elif ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"<0x{code:02X}>")
        else:
            out.append(ch)
    return "".join(out)


def whole_text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def pieces(tokenizer: "Tokenizer", ids: Sequence[int]) -> list[Piece]:
    """Every id of ``ids`` as a Piece, with offsets into ``tokenizer.decode(ids)``."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, offset = [], 0
    for token_id in ids:
        raw = tokenizer.token_bytes(token_id)
        end = offset + len(utf8.decode(raw))
        out.append(Piece(int(token_id), raw, whole_text(raw), offset, end))
        offset = end
    return out


def check_text(text: str, what: str = "the text") -> str:
    """``text`` if it can be written as UTF-8 (an argument with undecodable bytes cannot); else UserError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{what} is not valid UTF-8 (character {exc.start}); convert it first, e.g. with "
                        "iconv -t UTF-8") from None
    return text


def encode(tokenizer: "Tokenizer", text: str) -> list[Piece]:
    """``text`` as tokens; ``<|endoftext|>`` written in a text is ordinary text, as in every command."""
    return pieces(tokenizer, tokenizer.encode(check_text(text)))


def parse_ids(words: Sequence[str], vocab_size: int) -> list[int]:
    """Token ids from words such as ``15496 11 314`` or a JSON list ``[15496, 11, 314]``; UserError
    for anything else or an id outside the vocabulary."""
    ids = []
    for word in " ".join(words).replace(",", " ").replace("[", " ").replace("]", " ").split():
        try:
            token_id = int(word)
        except ValueError:
            raise UserError(f"--decode expects token ids (whole numbers), got {word!r}") from None
        if not 0 <= token_id < vocab_size:
            raise UserError(f"token id {token_id} is outside this vocabulary of {vocab_size} (0 to {vocab_size - 1})")
        ids.append(token_id)
    return ids
