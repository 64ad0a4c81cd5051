"""The decoding library: KV cache vs the book's loop, sampling, the streaming text layer, finish reasons, devices."""

from __future__ import annotations

import pytest
import torch

from gptcli.config import load_config_file
from gptcli.devices import check_device_name, check_dtype_name, resolve_device, resolve_dtype
from gptcli.errors import UserError
from gptcli.decoding.generate import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Decoder,
    Generation,
    SamplingOptions,
    TextStream,
    crop_prompt,
    find_stop,
    prompt_ids,
    select_next,
    stop_holdback,
)
from gptcli.model.gpt import GPTModel
from gptcli.tokenizer import EOT_ID, VOCAB_SIZE, decode, encode, token_bytes
from helpers import generate_text_simple, lively_model

CPU = torch.device("cpu")


def tiny_model(tiny_config_file, seed: int, **overrides) -> GPTModel:
    cfg = load_config_file(tiny_config_file(**overrides))
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # GPT-2's own init scale; the default N(0, 1) makes each token echo itself
        model.tok_emb.weight.mul_(0.05)
        model.pos_emb.weight.mul_(0.05)
    return model


def greedy(max_new_tokens: int, **kw) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=max_new_tokens, ignore_eos=True, **kw)


# ---------------------------------------------------------------------------------------------
# KV cache: identical ids to the book's loop, inside and past the context window


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prompt_len", [1, 5, 15, 16, 23])  # 16 fills the window; 23 is cropped
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_cached_decoding_equals_generate_text_simple(tiny_config_file, seed, prompt_len, qkv_bias):
    model = tiny_model(tiny_config_file, seed, context_length=16, qkv_bias=qkv_bias)
    prompt = torch.randint(0, VOCAB_SIZE, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    expected = generate_text_simple(model, prompt, 40, 16)[0, prompt_len:].tolist()
    got = Generation(Decoder(model, CPU, torch.float32), prompt[0].tolist(), greedy(40), context_length=16).run()
    assert got.token_ids == expected
    assert got.finish_reason == FINISH_LENGTH


def test_decoder_feeds_one_token_per_step_inside_the_window_then_the_whole_window(tiny_config_file):
    model = tiny_model(tiny_config_file, 0, context_length=16)
    fed: list[tuple[int, bool]] = []  # (tokens fed, with a cache)
    model.register_forward_pre_hook(lambda m, args: fed.append((args[0].shape[1], len(args) > 1 and args[1] is not None)))
    Generation(Decoder(model, CPU, torch.float32), list(range(5)), greedy(20)).run()
    # prefill 5 with a cache; then 1 token per step while positions 6..16 fit; then the 16-token window
    assert fed[0] == (5, True)
    assert fed[1:12] == [(1, True)] * 11
    assert fed[12:] == [(16, False)] * 8
    assert len(fed) == 20  # the last new token needs no forward pass


def test_decoder_allocates_the_cache_once_and_reuses_it(tiny_config_file):
    model = tiny_model(tiny_config_file, 0, context_length=16)
    decoder = Decoder(model, CPU, torch.float32)
    first = Generation(decoder, [1, 2, 3], greedy(8)).run().token_ids
    cache = decoder._cache
    again = Generation(decoder, [1, 2, 3], greedy(8)).run().token_ids
    assert decoder._cache is cache and cache.max_len == 3 + 8 - 1
    assert again == first


def test_book_line_through_the_library():
    from gptcli.config import shipped_config

    cfg = shipped_config("book")
    torch.manual_seed(123)
    model = GPTModel(cfg).eval()
    ids = prompt_ids("Hello, I am")
    gen = Generation(Decoder(model, CPU, torch.float32), ids, SamplingOptions(max_new_tokens=6)).run()
    assert ids == [15496, 11, 314, 716]
    assert gen.token_ids == [27018, 24086, 47843, 30961, 42348, 7267]
    assert gen.text == " Featureiman Byeswickattribute argue"


# ---------------------------------------------------------------------------------------------
# Picking the next token


def test_greedy_is_argmax_and_first_maximum_wins():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    assert select_next(logits, SamplingOptions(), None).tolist() == [1, 0]


def sample_many(logits, n=400, **kw) -> set[int]:
    options = SamplingOptions(**kw)
    gen = torch.Generator().manual_seed(0)
    return {int(select_next(logits, options, gen)[0]) for _ in range(n)}


def test_top_k_keeps_only_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 3.5, 0.0]])
    assert sample_many(logits, temperature=5.0, top_k=3) == {1, 2, 4}
    assert sample_many(logits, temperature=1.0, top_k=1) == {1}


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    assert sample_many(logits, temperature=1.0, top_p=0.5) == {1}
    assert sample_many(logits, temperature=1.0, top_p=0.8) == {1, 3}
    assert sample_many(logits, temperature=1.0, top_p=0.81) == {1, 2, 3}
    assert sample_many(logits, temperature=1.0, top_p=1.0) == {0, 1, 2, 3}
    assert sample_many(logits, temperature=1.0, top_k=2, top_p=0.9) == {1, 3}


def test_sampling_is_reproducible_for_a_seed(tiny_config_file):
    model = tiny_model(tiny_config_file, 0)
    options = SamplingOptions(max_new_tokens=12, temperature=1.5, seed=7, ignore_eos=True)
    a = Generation(Decoder(model, CPU, torch.float32), [1, 2, 3], options).run().token_ids
    b = Generation(Decoder(model, CPU, torch.float32), [1, 2, 3], options).run().token_ids
    other = SamplingOptions(max_new_tokens=12, temperature=1.5, seed=8, ignore_eos=True)
    c = Generation(Decoder(model, CPU, torch.float32), [1, 2, 3], other).run().token_ids
    assert a == b and a != c


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"max_new_tokens": -1}, "--max-new-tokens must be 0 or more"),
        ({"temperature": -0.1}, "--temperature must be 0"),
        ({"temperature": float("nan")}, "--temperature must be 0"),
        ({"top_k": 0}, "--top-k must be 1 or more"),
        ({"top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
        ({"top_p": 1.01}, r"--top-p must be in \(0, 1\]"),
        ({"stop": ("",)}, "--stop must not be empty"),
    ],
)
def test_bad_options_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message):
        SamplingOptions(**kw).validate()


# ---------------------------------------------------------------------------------------------
# The streaming text layer

TRICKY = "Hi 😀 日本語のテキスト, 👍🏽 and 🇫🇷 — naïve café ✓"


def stream_pieces(ids, stops=()) -> tuple[list[str], TextStream]:
    stream = TextStream(stops)
    pieces = [stream.feed(i) for i in ids]
    if not stream.stopped:
        pieces.append(stream.finish())
    return pieces, stream


def test_emoji_and_cjk_stream_whole_characters_and_join_to_the_text():
    ids = encode(TRICKY)
    assert any("\ufffd" in token_bytes(i).decode("utf-8", errors="replace") for i in ids), \
        "the sample should split characters across tokens"
    pieces, _ = stream_pieces(ids)
    assert "".join(pieces) == TRICKY == decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert "" in pieces  # some tokens carry only part of a character, so they release nothing yet


def test_an_unfinished_character_at_the_end_becomes_a_replacement_character():
    ids = encode("日")
    assert len(ids) > 1
    pieces, _ = stream_pieces(ids[:-1])
    assert "".join(pieces) == "\ufffd" == decode(ids[:-1])


def test_stop_string_is_cut_and_nothing_after_it_is_released():
    text = "The cat sat. The end. More text here"
    pieces, stream = stream_pieces(encode(text), stops=(" end",))
    assert stream.stopped
    assert "".join(pieces) == "The cat sat. The"


def test_stop_string_inside_multibyte_text():
    pieces, stream = stream_pieces(encode(TRICKY), stops=("のテ",))
    assert stream.stopped and "".join(pieces) == "Hi 😀 日本語"


def test_only_a_possible_start_of_a_stop_string_is_held_back():
    stream = TextStream(stops=("STOP",), token_bytes=lambda i: [b"abc S", b"T", b"x", b"ST"][i])
    assert stream.feed(0) == "abc "  # "S" could start "STOP"
    assert stream.feed(1) == ""  # "ST" too
    assert stream.feed(2) == "STx"  # "STx" cannot: released
    assert stream.feed(3) == ""
    assert stream.finish() == "ST"  # the end: nothing can follow, release it
    assert not stream.stopped


def test_earliest_stop_wins():
    assert find_stop("a b c d", ["d", "b"]) == 2
    assert find_stop("abc", ["x"]) is None
    assert stop_holdback("hello wor", ["world", "or"]) == 3
    assert stop_holdback("hello", ["world"]) == 0


# ---------------------------------------------------------------------------------------------
# Finish reasons, with a scripted decoder (no model)


class ScriptedDecoder:
    """Returns logits that make ``script[i]`` the argmax at step i."""

    def __init__(self, script: list[int]):
        self.script = script
        self.calls = 0

    def _logits(self):
        logits = torch.zeros(1, VOCAB_SIZE)
        logits[0, self.script[self.calls]] = 10.0
        self.calls += 1
        return logits

    def prefill(self, ids, max_new_tokens):
        return self._logits()

    def step(self, token_id):
        return self._logits()


def test_eos_ends_generation_and_is_not_in_the_text():
    script = encode(" one two") + [EOT_ID] + encode(" three")
    gen = Generation(ScriptedDecoder(script), [1], SamplingOptions(max_new_tokens=20))
    pieces = list(gen)
    assert gen.finish_reason == FINISH_EOS
    assert gen.token_ids == encode(" one two") + [EOT_ID]
    assert gen.text == "".join(pieces) == " one two"


def test_ignore_eos_prints_it_as_text():
    script = encode(" one") + [EOT_ID] + encode(" two")
    gen = Generation(ScriptedDecoder(script), [1], SamplingOptions(max_new_tokens=len(script), ignore_eos=True)).run()
    assert gen.finish_reason == FINISH_LENGTH
    assert gen.text == " one<|endoftext|> two"


def test_stop_reason_and_ids_include_the_stop_tokens():
    script = encode(" Answer: 4\nQ: next")
    gen = Generation(ScriptedDecoder(script), [1], SamplingOptions(max_new_tokens=50, stop=("\nQ:",))).run()
    assert gen.finish_reason == FINISH_STOP
    assert gen.text == " Answer: 4"
    assert decode(gen.token_ids).startswith(" Answer: 4\nQ:")


def test_zero_new_tokens_runs_nothing():
    decoder = ScriptedDecoder([5])
    gen = Generation(decoder, [1], SamplingOptions(max_new_tokens=0)).run()
    assert (gen.token_ids, gen.text, gen.finish_reason, decoder.calls) == ([], "", FINISH_LENGTH, 0)


def test_timings_count_prompt_and_new_tokens_separately():
    gen = Generation(ScriptedDecoder(list(range(100, 110))), [1, 2, 3], SamplingOptions(max_new_tokens=10)).run()
    t = gen.timings
    assert (t.prefill_tokens, t.decode_tokens) == (3, 9)
    assert t.prefill_s > 0 and t.decode_s > 0 and t.decode_tokens_per_s == pytest.approx(9 / t.decode_s)


# ---------------------------------------------------------------------------------------------
# Prompts


def test_empty_prompt_starts_from_endoftext():
    assert prompt_ids("") == [EOT_ID]


def test_endoftext_in_a_prompt_is_ordinary_text():
    ids = prompt_ids("a <|endoftext|> b")
    assert EOT_ID not in ids and decode(ids) == "a <|endoftext|> b"


def test_crop_prompt_keeps_the_end():
    assert crop_prompt([1, 2, 3, 4, 5], 3) == ([3, 4, 5], 2)
    assert crop_prompt([1, 2], 3) == ([1, 2], 0)


# ---------------------------------------------------------------------------------------------
# Devices and dtypes


def test_auto_device_here_is_what_torch_has():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("CPU") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_missing_cuda_is_a_user_error(name):
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device(name)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_missing_mps_is_a_user_error():
    with pytest.raises(UserError, match="MPS backend is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", ""])
def test_unknown_device_names_the_choices(name):
    with pytest.raises(UserError, match="unknown device .*auto, cpu, cuda, mps"):
        check_device_name(name)


def test_dtypes():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    with pytest.raises(UserError, match="unknown dtype 'int4'; choose one of auto, float32, bfloat16, float16"):
        check_dtype_name("int4")


# --- speed paths: prepared models and the compiled decoder give the eager ids -----------------


def _greedy_ids(decoder, prompt, n, temperature=0.0):
    from gptcli.decoding.generate import Generation, SamplingOptions

    options = SamplingOptions(max_new_tokens=n, ignore_eos=True, temperature=temperature, seed=7)
    return Generation(decoder, prompt, options, token_bytes=lambda i: b"x").run().token_ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_cpu_linear_equals_f_linear(dtype):
    """The Linear layers' inference kernel (onednn.InferenceLinear: oneDNN on CPU) computes what F.linear computes;
    training keeps autograd."""
    import torch.nn.functional as F

    from gptcli.kernels import onednn

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    layer = onednn.use_for_inference(torch.nn.Linear(48, 80)).to(dt)
    assert type(layer) is onednn.InferenceLinear
    x = torch.randn(3, 7, 48, dtype=dt)
    tol = dict(atol=1e-5, rtol=1e-5) if dt == torch.float32 else dict(atol=0.05, rtol=0.02)
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), expected, **tol)
        torch.testing.assert_close(layer(x[:, -1:]), expected[:, -1:], **tol)  # a non-contiguous slice
    assert onednn.AVAILABLE  # the official CPU wheels have it; this test is about that path
    y = layer(x.float().to(dt).requires_grad_())
    y.float().sum().backward()
    assert layer.weight.grad is not None


def test_cache_bucket():
    from gptcli.decoding.generate import cache_bucket

    assert [cache_bucket(n, 1024) for n in (1, 256, 257, 600, 1024)] == [256, 256, 512, 1024, 1024]
    assert cache_bucket(40, 16) == 16


def test_compiled_decoder_gives_the_eager_ids_past_the_window():
    import torch

    from gptcli.decoding.generate import CompiledDecoder, Decoder

    model = lively_model(1)
    cpu = torch.device("cpu")
    expected = _greedy_ids(Decoder(model, cpu, torch.float32), [5, 6, 7], 30, temperature=1.0)  # 33 > context 16
    assert len(set(expected)) > 10
    assert _greedy_ids(CompiledDecoder(model, cpu, torch.float32), [5, 6, 7], 30, temperature=1.0) == expected


def test_compiled_decoder_switches_cache_length_safely():
    """Guards are skipped only for the cache the last guarded step used: a longer run after a short one
    (another cache bucket, another graph) and a short one after it give the eager ids."""
    from gptcli.config import GPTConfig
    from gptcli.decoding.generate import CompiledDecoder, Decoder

    cfg = GPTConfig(vocab_size=300, context_length=600, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0,
                    qkv_bias=True, tie_weights=True, name="long")
    torch.manual_seed(4)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(0.05)
        model.pos_emb.weight.mul_(0.05)
    compiled = CompiledDecoder(model, CPU, torch.float32)
    compiled.warm_up(10)
    for prompt, n in (([1, 2, 3], 20), ([4, 5], 300), ([6], 20)):  # buckets 256, 512, then 512 reused
        expected = _greedy_ids(Decoder(model, CPU, torch.float32), prompt, n, temperature=1.0)
        assert len(set(expected)) > 10  # lively enough for equality to mean something
        assert _greedy_ids(compiled, prompt, n, temperature=1.0) == expected


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="the C++ GEMM template serves CPUs with AMX")
def test_an_int8_compiled_decoder_freezes_its_weights_and_tracks_eager_int8():
    """int8 on the CPU compiles with frozen weights and Inductor's C++ GEMM template (quantize's
    COMPILE_OPTIONS), patched in around its calls only. Its logits follow eager int8's, step by step
    over the same tokens across two cache lengths, to bfloat16 rounding (neither int8 path gives the
    other's bits: both sum the int8 products in their own order)."""
    import torch._inductor.config as inductor_config

    from gptcli.decoding.generate import CompiledDecoder, Decoder
    from gptcli.kernels.quantize import COMPILE_OPTIONS, quantize_int8

    model = quantize_int8(lively_model(4, context_length=600).to(torch.bfloat16), torch.bfloat16)
    compiled, eager = CompiledDecoder(model, CPU, torch.bfloat16), Decoder(model, CPU, torch.bfloat16)
    assert compiled._inductor_config == COMPILE_OPTIONS
    before = {k: getattr(inductor_config, k) for k in COMPILE_OPTIONS}
    for prompt, n in (([1, 2, 3], 20), ([4, 5], 300)):  # cache buckets 256, then 512
        ids = _greedy_ids(eager, prompt, n, temperature=1.0)
        assert len(set(ids)) > 10
        want, got = eager.prefill(prompt, n), compiled.prefill(prompt, n)
        for token in ids:
            torch.testing.assert_close(got.float(), want.float(), rtol=0.03, atol=0.03)
            want, got = eager.step(token), compiled.step(token)
    assert {k: getattr(inductor_config, k) for k in COMPILE_OPTIONS} == before


def test_int8_compiles_with_the_gemm_template_only_on_cpus_with_amx(monkeypatch):
    from gptcli.kernels import quantize

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    model = quantize.quantize_int8(lively_model(0).to(torch.bfloat16), torch.bfloat16)
    assert quantize.compile_options(model, CPU) == quantize.COMPILE_OPTIONS
    assert quantize.compile_options(lively_model(0), CPU) is None  # no int8 layers
    assert quantize.compile_options(model, torch.device("cuda")) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # the AMD EPYC
    model = quantize.quantize_int8(lively_model(0).to(torch.bfloat16), torch.bfloat16)
    assert quantize.compile_options(model, CPU) is None
