"""GPT-2's byte-pair encoding through tiktoken.

``r50k_base`` has the same ranks, split pattern and ``<|endoftext|>`` (50256) as ``gpt2``.
tiktoken downloads its file once and caches it (``TIKTOKEN_CACHE_DIR`` picks the folder).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from gptcli.errors import UserError

if TYPE_CHECKING:
    import tiktoken

ENCODING_NAME = "r50k_base"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257


@lru_cache(maxsize=1)
def get_tokenizer() -> "tiktoken.Encoding":
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as exc:  # tiktoken raises requests/urllib errors, ValueError on bad hashes, ...
        raise UserError(
            f"cannot load GPT-2's tokenizer ({ENCODING_NAME}): {type(exc).__name__}. "
            "Run gptcli once with network access so tiktoken can cache it, "
            "or set TIKTOKEN_CACHE_DIR to a folder that holds its cached file"
        ) from None


def encode(text: str) -> list[int]:
    """Token ids for ``text``. ``<|endoftext|>`` in the text is ordinary text, not the special token."""
    return get_tokenizer().encode(text, disallowed_special=())


def token_bytes(token_id: int) -> bytes:
    """The raw bytes of one token; may be part of a UTF-8 character."""
    return get_tokenizer().decode_single_token_bytes(token_id)


def decode(ids: list[int]) -> str:
    return get_tokenizer().decode(ids, errors="replace")
