"""Tokenizers: GPT-2's byte-pair encoding through tiktoken, and nanoGPT's character-level vocabulary.

``r50k_base`` has the same ranks, split pattern and ``<|endoftext|>`` (50256) as ``gpt2``.
tiktoken downloads its file once and caches it (``TIKTOKEN_CACHE_DIR`` picks the folder).

A checkpoint records the tokenizer it was trained with in its safetensors metadata
(``gptcli.tokenizer``); ``from_metadata`` turns that back into a tokenizer. A checkpoint without
it (OpenAI's, transformers') speaks GPT-2's BPE.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from gptcli.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import tiktoken

ENCODING_NAME = "r50k_base"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# The file tiktoken caches for r50k_base: the sha1 of its download URL.
CACHE_FILE = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"
CACHE_FILE_BYTES = 835_554
METADATA_KEY = "gptcli.tokenizer"
KINDS = ("gpt2", "char")


class Tokenizer(Protocol):
    """What the commands need from a tokenizer."""

    name: str  # "gpt2" or "char"
    vocab_size: int
    eot_id: int | None  # <|endoftext|>, where the vocabulary has one

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def to_metadata(self) -> dict: ...


@lru_cache(maxsize=1)
def get_tokenizer() -> "tiktoken.Encoding":
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as exc:  # tiktoken raises requests/urllib errors, ValueError on bad hashes, ...
        raise UserError(
            f"cannot load GPT-2's tokenizer ({ENCODING_NAME}): {type(exc).__name__}. tiktoken needs its file "
            f"{CACHE_FILE} ({CACHE_FILE_BYTES:,} bytes) in its cache folder, here {tiktoken_cache_dir()}. "
            "To get it, run python -c \"import tiktoken; tiktoken.get_encoding('r50k_base')\" on a machine with "
            "network access (TIKTOKEN_CACHE_DIR set to the folder to fill), then copy the file here or point "
            "TIKTOKEN_CACHE_DIR at its folder"
        ) from None


def tiktoken_cache_dir() -> str:
    """The folder tiktoken reads its cached files from, resolved as tiktoken does (and which variable set it)."""
    import os
    import tempfile

    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if name in os.environ:
            return f"{os.environ[name]} ({name})"
    return os.path.join(tempfile.gettempdir(), "data-gym-cache") + " (tiktoken's default; TIKTOKEN_CACHE_DIR sets it)"


class GPT2BPE:
    """GPT-2's byte-pair encoding. ``<|endoftext|>`` typed in a text is ordinary text unless ``allow_eot``."""

    name = "gpt2"
    vocab_size = VOCAB_SIZE
    eot_id: int | None = EOT_ID

    def encode(self, text: str, allow_eot: bool = False) -> list[int]:
        enc = get_tokenizer()
        if allow_eot:
            return enc.encode(text, allowed_special={EOT_TOKEN})
        return enc.encode(text, disallowed_special=())

    def encode_batch(self, texts: list[str], allow_eot: bool = False, threads: int = 2) -> list[list[int]]:
        """Many texts at once on tiktoken's threads (much faster than one call per text)."""
        enc = get_tokenizer()
        if allow_eot:
            return enc.encode_batch(texts, allowed_special={EOT_TOKEN}, num_threads=threads)
        return enc.encode_batch(texts, disallowed_special=(), num_threads=threads)

    def encode_arrays(self, texts: list[str], allow_eot: bool = False, threads: int = 2,
                      dtype: str = "uint16") -> list["np.ndarray"]:
        """Like ``encode_batch``, as numpy arrays of ``dtype``: tiktoken's ``encode_to_numpy`` on our own
        threads, so no Python list of ints is ever built (building one holds the GIL and serialises
        the threads). Older tiktoken without it: ``encode_batch``, then a copy to numpy."""
        import numpy as np

        enc = get_tokenizer()
        special = {"allowed_special": {EOT_TOKEN}} if allow_eot else {"disallowed_special": ()}
        if not hasattr(enc, "encode_to_numpy"):
            return [np.asarray(ids, dtype=dtype) for ids in self.encode_batch(texts, allow_eot, threads)]

        def one(text: str) -> "np.ndarray":
            return enc.encode_to_numpy(text, **special).astype(dtype)

        if threads <= 1 or len(texts) <= 1:
            return [one(t) for t in texts]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, texts))

    def decode(self, ids: list[int]) -> str:
        return get_tokenizer().decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return get_tokenizer().decode_single_token_bytes(token_id)

    def to_metadata(self) -> dict:
        return {"kind": "gpt2"}


MAX_NAMED_CHARS = 20  # an error names at most this many unknown characters


class CharTokenizer:
    """nanoGPT's character-level vocabulary: the sorted set of characters of the training text."""

    name = "char"
    eot_id: int | None = None

    def __init__(self, chars: str):
        if not chars:
            raise UserError("a character vocabulary needs at least one character")
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError("chars must be sorted and distinct")
        self.chars = chars
        self.vocab_size = len(chars)
        self._index = {c: i for i, c in enumerate(chars)}
        self._bytes = [c.encode("utf-8") for c in chars]

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError:
            missing = self.unknown(text)
            shown = ", ".join(repr(c) for c in missing[:MAX_NAMED_CHARS])
            more = f" and {len(missing) - MAX_NAMED_CHARS} more" if len(missing) > MAX_NAMED_CHARS else ""
            noun = "character" if len(missing) == 1 else "characters"
            verb = "is" if len(missing) == 1 else "are"
            raise UserError(f"{noun} {shown}{more} {verb} not in this model's vocabulary of "
                            f"{self.vocab_size} characters") from None

    def unknown(self, text: str) -> list[str]:
        """The characters of ``text`` this vocabulary lacks, sorted."""
        return sorted(set(text) - self._index.keys())

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def to_metadata(self) -> dict:
        return {"kind": "char", "chars": self.chars}


def gpt2() -> GPT2BPE:
    return GPT2BPE()


def from_metadata(metadata: dict[str, str] | None, where: str = "checkpoint") -> Tokenizer:
    """The tokenizer a checkpoint's safetensors metadata names; GPT-2's BPE when it names none."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return gpt2()
    try:
        obj = json.loads(raw)
        kind = obj["kind"]
    except (ValueError, TypeError, KeyError):
        raise UserError(f"{where}: metadata {METADATA_KEY!r} is not a tokenizer description") from None
    if kind == "gpt2":
        return gpt2()
    if kind == "char" and isinstance(obj.get("chars"), str):
        try:
            return CharTokenizer(obj["chars"])
        except ValueError:
            pass
    raise UserError(f"{where}: unknown tokenizer {raw[:60]!r} in its metadata")


def to_metadata(tokenizer: Tokenizer) -> dict[str, str]:
    """The safetensors metadata entry that records ``tokenizer``."""
    return {METADATA_KEY: json.dumps(tokenizer.to_metadata(), ensure_ascii=False)}


# GPT-2's BPE as plain functions, for code that only ever speaks it.


def encode(text: str) -> list[int]:
    """Token ids for ``text``. ``<|endoftext|>`` in the text is ordinary text, not the special token."""
    return get_tokenizer().encode(text, disallowed_special=())


def token_bytes(token_id: int) -> bytes:
    """The raw bytes of one token; may be part of a UTF-8 character."""
    return get_tokenizer().decode_single_token_bytes(token_id)


def decode(ids: list[int]) -> str:
    return get_tokenizer().decode(ids, errors="replace")
