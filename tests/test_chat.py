"""Chat in `gptcli generate --interactive` for a model whose checkpoint names a prompt template.

Library level: each turn's prompt is templates.chat_prompt over the conversation so far, the answer ends at
templates.CHAT_STOP or <|endoftext|>, and greedy answers equal plain decoding of that prompt (the cache
reused between turns). In a pseudo-terminal (pexpect): the chat start line, two turns, /settings, /text,
/reset and Ctrl-D; a model without a template stays a plain session.

A scripted model (helpers.scripted_model: its next token depends only on the position) makes the answers
known in advance, so where they stop is tested exactly."""

from __future__ import annotations


import pexpect
import pytest
import torch

from gptcli.decoding.generate import Decoder, Generation, SamplingOptions, prompt_ids
from gptcli.decoding.session import Session, checkpoint_template
from gptcli.errors import UserError
from gptcli.runtime import Runtime
from gptcli.templates import ALPACA, CHAT_STOP, TEMPLATE_METADATA_KEY, chat_prompt
from gptcli.tokenizer import EOT_ID, gpt2
from helpers import InteractiveTerminal, save_checkpoint, scripted_model

CPU = torch.device("cpu")
FIRST, SECOND = "Name a colour.", "And another?"
ANSWER1, ANSWER2 = "Blue, like the sky.", " Red"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def script() -> list[int | None]:
    """Position by position: turn 1 answers ANSWER1 and then starts a new section ("\\n\\n### Instruction"),
    turn 2 answers ANSWER2 and ends with <|endoftext|>. Positions are where each turn's prompt ends."""
    tok = gpt2()
    first = len(tok.encode(chat_prompt([user(FIRST)])))
    second = len(tok.encode(chat_prompt([user(FIRST), assistant(ANSWER1), user(SECOND)])))
    out: list[int | None] = [None] * 128
    turn1 = tok.encode(ANSWER1) + tok.encode("\n\n### Instruction:")
    turn2 = tok.encode(ANSWER2) + [EOT_ID]
    assert first - 1 + len(turn1) <= second - 1 and second - 1 + len(turn2) <= 128
    out[first - 1:first - 1 + len(turn1)] = turn1  # the logits at the prompt's last token pick the first
    out[second - 1:second - 1 + len(turn2)] = turn2
    return out


def scripted_runtime(checkpoint=None) -> Runtime:
    model = scripted_model(script(), default=tok_id(" la"))
    return Runtime(model=model, cfg=model.cfg, tokenizer=gpt2(), device=CPU, dtype=torch.float32, source="scripted",
                   checkpoint=checkpoint, load_seconds=0.0)


def tok_id(text: str) -> int:
    ids = gpt2().encode(text)
    assert len(ids) == 1
    return ids[0]


def test_turns_are_the_template_over_the_conversation_and_stop_where_the_answer_ends():
    session = Session(scripted_runtime(), SamplingOptions(max_new_tokens=30), template=ALPACA)
    assert session.chat
    prompt1 = chat_prompt([user(FIRST)])
    assert session.prompt(FIRST) == prompt1
    assert "".join(session.turn(FIRST)) == ANSWER1  # not a character of "\n\n### Instruction:"
    assert session.generation.finish_reason == "stop"
    assert session.messages == [user(FIRST), assistant(ANSWER1)]
    assert session.text == prompt1 + ANSWER1
    prompt2 = chat_prompt([user(FIRST), assistant(ANSWER1), user(SECOND)])
    assert prompt2.startswith(session.text) and session.prompt(SECOND) == prompt2
    assert "".join(session.turn(SECOND)) == ANSWER2
    assert session.generation.finish_reason == "eos"
    assert session.messages == [user(FIRST), assistant(ANSWER1), user(SECOND), assistant(ANSWER2)]
    assert session.text == prompt2 + ANSWER2
    turn = session.stats()
    # The first turn's transcript came from the cache; only what follows it (and the last token picked) ran.
    assert turn.reused_tokens >= len(gpt2().encode(prompt1)) and turn.prefill_tokens < 20
    session.reset()
    assert session.messages == [] and session.text == ""
    assert "".join(session.turn(FIRST)) == ANSWER1  # a new conversation is turn 1 again


def test_an_interrupted_answer_stays_in_the_conversation():
    """Ctrl-C mid-answer: what was written is the answer the next turn's prompt carries."""
    session = Session(scripted_runtime(), SamplingOptions(max_new_tokens=30), template=ALPACA)
    pieces = session.turn(FIRST)
    written = next(pieces) + next(pieces)
    session.interrupt()  # the terminal stops reading: the generator is left where it was
    assert written and ANSWER1.startswith(written) and written != ANSWER1
    assert session.messages == [user(FIRST), assistant(written)]
    assert session.prompt(SECOND) == chat_prompt([user(FIRST), assistant(written), user(SECOND)])
    assert session.stats().finish_reason == "interrupted"


def plain_continuation(rt: Runtime, text: str, n: int, stop: tuple[str, ...]) -> str:
    """What `gptcli generate TEXT -n N --stop ...` prints (greedy), with a fresh decoder."""
    g = Generation(Decoder(rt.model, CPU, torch.float32), prompt_ids(text, rt.tokenizer),
                   SamplingOptions(max_new_tokens=n, stop=stop), eos_id=rt.tokenizer.eot_id,
                   token_bytes=rt.tokenizer.token_bytes, context_length=rt.cfg.context_length)
    return g.run().text


def test_greedy_answers_are_generate_on_the_templated_prompt():
    from gptcli.weights import random_model
    from gptcli.config import GPTConfig

    cfg = GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_weights=True, name="tiny")
    model = random_model(cfg, seed=4).eval()
    with torch.no_grad():  # small embeddings: the other weights matter, so the text varies
        model.tok_emb.weight.mul_(0.05)
    rt = Runtime(model=model, cfg=cfg, tokenizer=gpt2(), device=CPU, dtype=torch.float32, source="t",
                 checkpoint=None, load_seconds=0.0)
    session = Session(rt, SamplingOptions(max_new_tokens=12, stop=("zebra",)), template=ALPACA)
    messages = []
    for message in ("Hello there.", "Tell me more.", "Thanks!"):
        answer = "".join(session.turn(message))
        messages += [user(message)]
        assert answer == plain_continuation(rt, chat_prompt(messages), 12, ("zebra", CHAT_STOP))
        messages += [assistant(answer)]
    assert session.messages == messages


def test_a_checkpoint_names_its_template(tmp_path):
    model = scripted_model([], default=0, context_length=16)
    with_template = save_checkpoint(model, tmp_path / "a", metadata={TEMPLATE_METADATA_KEY: ALPACA})
    without = save_checkpoint(model, tmp_path / "b")
    unknown = save_checkpoint(model, tmp_path / "c", metadata={TEMPLATE_METADATA_KEY: "chatml"})

    def rt(path):
        return Runtime(model=model, cfg=model.cfg, tokenizer=gpt2(), device=CPU, dtype=torch.float32, source="x",
                       checkpoint=path, load_seconds=0.0)

    assert checkpoint_template(rt(with_template)) == ALPACA
    assert checkpoint_template(rt(without)) is None and checkpoint_template(rt(None)) is None
    with pytest.raises(UserError, match="unknown prompt template 'chatml'"):
        checkpoint_template(rt(unknown))
    plain = Session(rt(without), SamplingOptions(max_new_tokens=2))
    assert not plain.chat and plain.messages == []


# --------------------------------------------------------------------------------------------
# In a terminal


class Terminal(InteractiveTerminal):
    def __init__(self, checkpoint, tmp_path):
        super().__init__(checkpoint, tmp_path, "-n", "30", env={"GPTCLI_CACHE_DIR": str(tmp_path / "cache")})

    def reply(self, line: str) -> str:
        """What followed the typed line, up to the next prompt."""
        return self.send(line).split(line + "\n", 1)[1]


def test_chat_in_a_terminal(tmp_path):
    checkpoint = save_checkpoint(scripted_runtime().model, tmp_path / "chat",
                                 metadata={TEMPLATE_METADATA_KEY: ALPACA})
    t = Terminal(checkpoint, tmp_path)
    assert "chat with" in t.start and "in its alpaca prompt template: type a message" in t.start
    assert t.reply(FIRST) == ANSWER1 + "\n"
    assert t.reply("") == ""  # an empty line sends nothing
    assert t.reply(SECOND) == ANSWER2 + "\n"
    settings = t.reply("/settings")
    assert "chat in the alpaca template" in settings and "temperature 0 (greedy)" in settings
    text = t.reply("/text")
    assert text == chat_prompt([user(FIRST), assistant(ANSWER1), user(SECOND)]) + ANSWER2 + "\n"
    assert "a new conversation" in t.reply("/reset")
    assert t.reply(FIRST) == ANSWER1 + "\n"
    t.child.sendeof()
    t.child.expect(pexpect.EOF)
    t.child.close()
    assert t.child.exitstatus == 0


def test_a_model_without_a_template_continues_text_as_before(tmp_path):
    checkpoint = save_checkpoint(scripted_runtime().model, tmp_path / "plain")
    t = Terminal(checkpoint, tmp_path)
    assert "interactive session with" in t.start and "chat" not in t.start
    assert t.reply(FIRST).startswith(" la la")  # the text continued: no template, so the scripted answer is never reached
    assert "chat" not in t.reply("/settings")
    assert t.reply("/text").startswith(FIRST + " la la")
    t.child.sendeof()
    t.child.expect(pexpect.EOF)
