"""gptcli.decoding.session: turns reuse the cache (only unseen tokens are run), greedy text equals `generate` on
the concatenated text, past the window included, and an interrupted turn leaves the session usable."""

from __future__ import annotations

import pytest
import torch

from gptcli.config import GPTConfig
from gptcli.errors import UserError
from gptcli.decoding.generate import Decoder, Generation, SamplingOptions, prompt_ids
from gptcli.runtime import Runtime
from gptcli.decoding.session import Session, apply_setting
from gptcli.tokenizer import CharTokenizer, gpt2
from helpers import lively_char_model

CPU = torch.device("cpu")
CHARS = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz .,")))


def runtime(model, tokenizer) -> Runtime:
    return Runtime(model=model, cfg=model.cfg, tokenizer=tokenizer, device=CPU, dtype=torch.float32, source="test",
                   checkpoint=None, load_seconds=0.0)


def char_runtime(context: int = 24) -> Runtime:
    return runtime(lively_char_model(CHARS, context), CharTokenizer(CHARS))


def generate_text(rt: Runtime, text: str, n: int) -> str:
    """What `gptcli generate TEXT -n N` continues with (greedy)."""
    options = SamplingOptions(max_new_tokens=n, ignore_eos=True)
    ids = prompt_ids(text, rt.tokenizer)
    g = Generation(Decoder(rt.model, CPU, torch.float32), ids, options, eos_id=rt.tokenizer.eot_id,
                   token_bytes=rt.tokenizer.token_bytes, context_length=rt.cfg.context_length)
    return g.run().text


def test_turns_prefill_only_unseen_tokens_and_match_generate():
    rt = char_runtime(context=48)
    session = Session(rt, SamplingOptions(max_new_tokens=6))
    first = "".join(session.turn("hello"))
    assert first == generate_text(rt, "hello", 6)
    s1 = session.stats()
    assert (s1.prefill_tokens, s1.reused_tokens, s1.new_tokens) == (5, 0, 6)
    before = session.text
    second = "".join(session.turn(" and then"))
    assert second == generate_text(rt, before + " and then", 6)
    s2 = session.stats()
    # What was typed (9 characters) and the last token picked in turn 1, which was never fed.
    assert (s2.prefill_tokens, s2.reused_tokens) == (9 + 1, len(before) - 1)
    assert session.text == before + " and then" + second


def test_decoder_reuses_the_longest_cached_prefix_when_bpe_merges_across_the_boundary():
    """"The cat" then "s": " cats" is one token, so only "The" is reused and the logits are a fresh prefill's."""
    from gptcli.decoding.session import SessionDecoder
    from gptcli.weights import random_model

    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_weights=True, name="tiny")
    model = random_model(cfg, seed=2).eval()
    tokenizer = gpt2()
    decoder = SessionDecoder(model, CPU, torch.float32)
    decoder.prefill(tokenizer.encode("The cat"), 4)
    assert (decoder.reused, decoder.prefilled) == (0, 2)
    ids = tokenizer.encode("The cats")
    assert len(ids) == 2 and ids[1] != tokenizer.encode("The cat")[1]
    logits = decoder.prefill(ids, 4)
    assert (decoder.reused, decoder.prefilled) == (1, 1)
    fresh = Decoder(model, CPU, torch.float32).prefill(ids, 4)
    torch.testing.assert_close(logits, fresh, rtol=0, atol=1e-5)
    step, fresh_step = decoder.step(11), Decoder(model, CPU, torch.float32)
    fresh_step.prefill(ids, 4)
    torch.testing.assert_close(step, fresh_step.step(11), rtol=0, atol=1e-5)


def test_past_the_window_and_back_after_reset():
    rt = char_runtime(context=16)
    session = Session(rt, SamplingOptions(max_new_tokens=10))
    "".join(session.turn("abcdefgh"))
    text = session.text + " xyz"
    assert len(text) > 16
    out = "".join(session.turn(" xyz"))
    assert out == generate_text(rt, text, 10)
    stats = session.stats()
    assert stats.prefill_tokens == 16 and stats.reused_tokens == 0 and stats.dropped_tokens == len(text) - 16
    session.reset()
    assert session.text == "" and session.cached_tokens() == 0
    assert "".join(session.turn("abc")) == generate_text(rt, "abc", 10)


def interrupted_turn(session: Session, typed: str, after: int) -> None:
    """A turn stopped by Ctrl-C (KeyboardInterrupt) as its ``after``-th token is picked."""
    picked = []

    def interrupt(logits, chosen):
        picked.append(chosen)
        if len(picked) == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for _ in session.turn(typed, observe=interrupt):
            pass


def test_an_interrupted_turn_keeps_a_consistent_session():
    rt = char_runtime(context=48)
    session = Session(rt, SamplingOptions(max_new_tokens=20))
    interrupted_turn(session, "hello", after=5)
    assert session.text.startswith("hello") and session.cached_tokens() <= len(session.text)
    text = session.text + " ok"
    assert "".join(session.turn(" ok")) == generate_text(rt, text, 20)


def test_text_the_tokenizer_cannot_encode_changes_nothing():
    rt = char_runtime(context=48)
    session = Session(rt, SamplingOptions(max_new_tokens=4))
    "".join(session.turn("hello"))
    before = session.text
    with pytest.raises(UserError, match="character 'X' is not in this model's vocabulary"):
        "".join(session.turn(" X"))
    assert session.text == before
    assert "".join(session.turn(" ok")) == generate_text(rt, before + " ok", 4)


def test_settings():
    options = SamplingOptions()
    assert apply_setting(options, "temperature", "0.8").temperature == 0.8
    assert apply_setting(options, "top-k", "50").top_k == 50
    assert apply_setting(apply_setting(options, "top_k", "5"), "top_k", "none").top_k is None
    assert apply_setting(options, "n", "7").max_new_tokens == 7
    assert apply_setting(options, "ignore_eos", "on").ignore_eos is True
    assert apply_setting(options, "min-p", "0.05").min_p == 0.05
    assert apply_setting(options, "repetition_penalty", "1.2").repetition_penalty == 1.2
    for name, value in [("temperature", "-1"), ("top_p", "2"), ("top_k", "x"), ("colour", "red"), ("seed", "-3"),
                        ("seed", str(2**64)), ("min_p", "1.5"), ("repetition_penalty", "0")]:
        with pytest.raises(UserError):
            apply_setting(options, name, value)


# ---------------------------------------------------------------------------------------------
# A session with a draft (--interactive --draft / --lookup)


def speculative_session(rt: Runtime, options: SamplingOptions, kind: str, draft_seed: int = 1) -> Session:
    from gptcli.decoding.speculative import SpeculativeOptions

    if kind == "lookup":
        return Session(rt, options, spec=SpeculativeOptions(lookup=True, draft_tokens=4))
    draft = runtime(lively_char_model(CHARS, rt.cfg.context_length, seed=draft_seed), CharTokenizer(CHARS))
    return Session(rt, options, spec=SpeculativeOptions(draft="test-draft", draft_tokens=3), draft=draft)


# Greedy, with or without the penalty, for both kinds; sampling for lookup, whose draws are plain sampling's
# (a model draft's sampled ids follow the rejection rule: the same distribution, not the same ids; see
# test_speculative's chi-square test).
@pytest.mark.parametrize("kind,sampling", [
    ("lookup", dict()), ("model", dict()), ("lookup", dict(repetition_penalty=1.4)),
    ("model", dict(repetition_penalty=1.4)), ("lookup", dict(temperature=0.9, top_k=8, seed=4)),
])
def test_a_session_with_a_draft_writes_the_plain_sessions_text_turn_by_turn(kind, sampling):
    rt = char_runtime(context=24)
    options = SamplingOptions(max_new_tokens=9, ignore_eos=True, **sampling)
    plain, fast = Session(rt, options), speculative_session(rt, options, kind)
    checks = 0
    for typed in ("hello", " and", "", " then some more words"):  # the last turns run past the 24-token window
        assert "".join(fast.turn(typed)) == "".join(plain.turn(typed)), typed
        assert fast.text == plain.text
        turn = fast.stats()
        assert turn.speculative is not None and turn.speculative.draft == ("lookup" if kind == "lookup" else
                                                                           "test-draft")
        checks += turn.speculative.checks
    if kind == "model" and not sampling:
        assert checks > 0  # the draft guessed, and the model checked, inside the window


def test_a_session_draft_keeps_its_cache_between_turns_and_an_interrupt_leaves_both_consistent():
    rt = char_runtime(context=48)
    options = SamplingOptions(max_new_tokens=12, ignore_eos=True)
    fast = speculative_session(rt, options, "model")
    draft_decoder = fast.speculator.drafter.decoder
    "".join(fast.turn("hello"))
    "".join(fast.turn(" there"))
    assert draft_decoder.reused > 0  # the draft's prefill of turn 2 ran only the unseen tokens
    interrupted_turn(fast, " ab", after=4)
    assert fast.cached_tokens() <= len(fast.text) and draft_decoder.cached_ids() == \
        draft_decoder._ids[: len(draft_decoder.cached_ids())]
    text = fast.text + " ok"
    assert "".join(fast.turn(" ok")) == generate_text(rt, text, 12)
    fast.reset()
    assert draft_decoder.cached_ids() == [] and "".join(fast.turn("abc")) == generate_text(rt, "abc", 12)
