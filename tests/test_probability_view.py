"""commands/probability_view.py: bands, and whole characters from tokens that split them."""

from __future__ import annotations

import math

from gptcli.commands.probability_view import BANDS, coloured_chunks, colour_for
from gptcli.decoding.logprobs import TokenLogprob


def test_bands_cover_every_probability():
    assert [colour_for(p) for p in (1.0, 0.5, 0.3, 0.1, 0.05, 0.01, 0.001, 0.0)] == \
        ["green", "green", "yellow", "yellow", "dark_orange", "dark_orange", "red", "red"]
    assert colour_for(None) is None
    assert [b[0] for b in BANDS] == sorted((b[0] for b in BANDS), reverse=True)


def test_a_split_character_comes_out_once_in_the_colour_of_its_least_likely_token():
    pieces = {0: b"Hi", 1: b" \xe2", 2: b"\x82", 3: b"\xac", 4: b"!"}  # " €" over three tokens
    entries = [TokenLogprob(0, None), TokenLogprob(1, math.log(0.9)), TokenLogprob(2, math.log(0.02)),
               TokenLogprob(3, math.log(0.6)), TokenLogprob(4, math.log(0.3))]
    chunks = list(coloured_chunks(entries, pieces.__getitem__))
    assert [text for text, _ in chunks] == ["Hi", " ", "€", "!"]
    assert chunks[0][1] is None  # nothing predicts a text's first token
    assert math.isclose(chunks[1][1], 0.9) and math.isclose(chunks[2][1], 0.02) and math.isclose(chunks[3][1], 0.3)
    # An unfinished character at the end still comes out (as U+FFFD), in its tokens' colour.
    tail = list(coloured_chunks([TokenLogprob(2, math.log(0.5))], pieces.__getitem__))
    assert tail == [("\ufffd", tail[0][1])] and math.isclose(tail[0][1], 0.5)
