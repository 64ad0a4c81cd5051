"""Speculative decoding (gptcli.decoding.speculative, `generate --draft/--lookup`): a K+1-row check gives each position
the bits a one-token step gives; greedy ids equal plain decoding's for a separate draft, an int8 self-draft and
prompt lookup, past the window too; sampling with a draft has plain sampling's distribution (chi-square against
the exact distribution of the first tokens); prompt lookup's sampled ids are plain sampling's; bad input is one
error line and exit code 2."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import GPTConfig, load_config_file
from gptcli.decoding.generate import Decoder, Generation, SamplingOptions, sampling_probs
from gptcli.kernels.prepare import prepare_model
from gptcli.model.kv_cache import KVCache
from gptcli.model.gpt import GPTModel
from gptcli.decoding.speculative import (
    LookupDrafter,
    ModelDrafter,
    SpeculativeGeneration,
)
from helpers import lively_model

CPU = torch.device("cpu")
runner = CliRunner()


def token_bytes(i: int) -> bytes:
    return bytes([97 + i % 26])


def plain_ids(model, prompt, options, dtype=torch.float32) -> list[int]:
    return Generation(Decoder(model, CPU, dtype), prompt, options, eos_id=None, token_bytes=token_bytes,
                      context_length=model.cfg.context_length).run().token_ids


def speculative(model, drafter, prompt, options, k, dtype=torch.float32) -> SpeculativeGeneration:
    return SpeculativeGeneration(Decoder(model, CPU, dtype), drafter, prompt, options, draft_tokens=k,
                                 draft_name="test", eos_id=None, token_bytes=token_bytes,
                                 context_length=model.cfg.context_length).run()


def model_drafter(model, dtype=torch.float32) -> ModelDrafter:
    return ModelDrafter(Decoder(model, CPU, dtype))


def near_copy(model, scale: float = 0.02, seed: int = 0):
    """A separate draft close to ``model`` (weights jittered), so it guesses right often but not always."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return draft


def int8_copy(model):
    return prepare_model(copy.deepcopy(model), CPU, torch.bfloat16, quantize="int8").model


# ---------------------------------------------------------------------------------------------
# The check pass


def check_rows_and_steps(model, past: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``rows`` tokens after ``past`` cached ones: one forward of all rows, and one step each, with
    the kernels and attention decoders use (gptcli.kernels.onednn.use_for_inference, gptcli.model.attention.invariant_on)."""
    from gptcli.model.attention import invariant_on
    from gptcli.kernels.onednn import use_for_inference

    cfg, attention = model.cfg, invariant_on(CPU)
    use_for_inference(model)
    ids = torch.randint(0, cfg.vocab_size, (1, past + rows), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        one = KVCache.empty(cfg, 1, past + rows, CPU, torch.float32)
        model(ids[:, :past], one, attention=attention)
        steps = torch.cat([model(ids[:, past + i : past + i + 1], one, attention=attention)[0] for i in range(rows)])
        many = KVCache.empty(cfg, 1, past + rows, CPU, torch.float32)
        model(ids[:, :past], many, attention=attention)
        together = model(ids[:, past:], many, attention=attention)[0]
    return together, steps


@pytest.mark.parametrize("past,rows", [(1, 2), (3, 5), (7, 9), (10, 6)])
def test_a_check_pass_gives_each_row_the_bits_of_a_one_token_step(past, rows):
    model = lively_model(0)
    together, steps = check_rows_and_steps(model, past, rows, seed=past)
    assert torch.equal(together, steps)


def test_the_same_with_the_tuned_decode_kernels(tiny_config_file):
    from gptcli.runtime import InferenceOptions, load_for_inference

    runtime = load_for_inference(InferenceOptions(config=str(tiny_config_file(emb_dim=64, n_heads=4)),
                                                  weights="random", tune=False))
    assert runtime.kernel_counts  # the packed oneDNN kernels plain decoding uses
    together, steps = check_rows_and_steps(runtime.model, 4, 5, seed=1)
    assert torch.equal(together, steps)


# ---------------------------------------------------------------------------------------------
# Greedy: the ids of plain decoding


PROMPTS = [[1, 2, 3], [5, 5, 5, 5], list(range(10)), [7], list(range(20, 35))]


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_greedy_ids_equal_plain_decoding_with_a_separate_draft(seed, k):
    target, draft = lively_model(seed), lively_model(seed + 100)
    checks = 0
    for prompt in PROMPTS:
        for n in (1, 6, 40):  # 40 runs far past the 16-token window
            options = SamplingOptions(max_new_tokens=n, ignore_eos=True)
            run = speculative(target, model_drafter(draft), prompt, options, k)
            assert run.token_ids == plain_ids(target, prompt, options), (prompt, n)
            checks += run.stats.checks
    assert checks > 0


@pytest.mark.parametrize("seed", [0, 5])
def test_greedy_ids_equal_plain_float32_with_an_int8_self_draft(seed):
    target = lively_model(seed)
    draft = int8_copy(target)
    accepted = 0
    for prompt in PROMPTS:
        options = SamplingOptions(max_new_tokens=40, ignore_eos=True)
        run = speculative(target, model_drafter(draft, torch.bfloat16), prompt, options, 4)
        assert run.token_ids == plain_ids(target, prompt, options), prompt
        accepted += run.stats.accepted
    assert accepted > 0  # int8 guesses mostly what float32 picks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_ids_equal_plain_decoding_with_prompt_lookup(seed):
    target = lively_model(seed)
    for prompt in PROMPTS:
        for k in (2, 8):
            options = SamplingOptions(max_new_tokens=40, ignore_eos=True)
            run = speculative(target, LookupDrafter(), prompt, options, k)
            assert run.token_ids == plain_ids(target, prompt, options), (prompt, k)


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.3),
                                       dict(frequency_penalty=-0.3, presence_penalty=0.2, logit_bias=((7, 1.5),))],
                         ids=["repetition", "frequency-presence-bias"])
@pytest.mark.parametrize("kind", ["draft", "int8", "lookup"])
def test_greedy_ids_with_penalties_equal_plain_decoding(kind, penalties):
    """Each check row is picked with the ids before it (the kept guesses included, counted as generated
    for the frequency and presence penalties), as plain decoding picks."""
    target = lively_model(3)
    options = SamplingOptions(max_new_tokens=40, ignore_eos=True, **penalties)
    assert plain_ids(target, [5, 5, 5, 5], options) != plain_ids(target, [5, 5, 5, 5], SamplingOptions(
        max_new_tokens=40, ignore_eos=True))
    accepted = 0
    for prompt in PROMPTS:
        drafter = (LookupDrafter() if kind == "lookup" else model_drafter(near_copy(target)) if kind == "draft"
                   else model_drafter(int8_copy(target), torch.bfloat16))
        run = speculative(target, drafter, prompt, options, 4)
        assert run.token_ids == plain_ids(target, prompt, options), prompt
        accepted += run.stats.accepted
    assert accepted > 0  # guesses were checked and kept under the penalty


def test_a_compiled_draft_guesses_and_the_ids_stay_plain_decodings():
    """``--compile --draft``: the draft's one-token steps are one compiled graph; feed and rollback keep
    its cache right (a compiled step writes at its position and masks the later ones)."""
    from gptcli.decoding.generate import CompiledDecoder

    target = lively_model(0, context_length=32)
    drafter = ModelDrafter(CompiledDecoder(near_copy(target), CPU, torch.float32))
    proposed = accepted = 0
    for prompt in PROMPTS:
        options = SamplingOptions(max_new_tokens=30, ignore_eos=True)
        run = speculative(target, drafter, prompt, options, 4)
        assert run.token_ids == plain_ids(target, prompt, options), prompt
        proposed, accepted = proposed + run.stats.proposed, accepted + run.stats.accepted
    assert 0 < accepted < proposed


def test_a_compiled_decoders_feed_and_rollback_give_the_eager_decoders_logits():
    from gptcli.decoding.generate import CompiledDecoder

    model = lively_model(4, context_length=32)
    eager, compiled = Decoder(model, CPU, torch.float32), CompiledDecoder(model, CPU, torch.float32)
    script = [("feed", [3, 4]), ("rollback", 1), ("feed", [9]), ("feed", [1, 2, 3]), ("rollback", 2), ("feed", [7])]
    for decoder in (eager, compiled):
        decoder.prefill([5, 6, 7, 8], max_new_tokens=16)
    for op, arg in script:
        if op == "rollback":
            eager.rollback(arg)
            compiled.rollback(arg)
        else:  # compiled rounds a little differently from eager: close, not equal
            torch.testing.assert_close(compiled.feed(arg), eager.feed(arg), rtol=0, atol=1e-4)
        assert compiled._ids == eager._ids and compiled.room() > 0


def test_greedy_checks_within_the_window_and_falls_back_past_it():
    target = lively_model(0)
    options = SamplingOptions(max_new_tokens=40, ignore_eos=True)
    run = speculative(target, model_drafter(int8_copy(target), torch.bfloat16), [1, 2, 3], options, 4)
    stats = run.stats
    assert stats.checks > 0 and stats.steps >= 40 - 16  # positions past the window are plain steps
    assert stats.model_forwards < 40 - 1  # fewer forwards than tokens: the checks paid
    assert run.timings.decode_tokens == 39 and stats.tokens_per_forward(39) > 1


def test_stop_strings_and_max_tokens_end_a_speculative_run_where_plain_ends():
    target = lively_model(0)
    plain = Generation(Decoder(target, CPU, torch.float32), [1, 2, 3], SamplingOptions(max_new_tokens=12),
                       eos_id=None, token_bytes=token_bytes).run()
    stop = plain.text[5:7]
    for options in (SamplingOptions(max_new_tokens=12, stop=(stop,)), SamplingOptions(max_new_tokens=7)):
        want = Generation(Decoder(target, CPU, torch.float32), [1, 2, 3], options, eos_id=None,
                          token_bytes=token_bytes).run()
        got = speculative(target, LookupDrafter(), [1, 2, 3], options, 8)
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)


# ---------------------------------------------------------------------------------------------
# Prompt lookup's guesses and its switch


def test_lookup_guesses_what_followed_the_latest_match_and_runs_into_loops():
    drafter = LookupDrafter()
    options = SamplingOptions()
    drafter.start([1, 2, 3, 4, 1, 2], 10)
    assert drafter.propose(3, 4, options, None).tokens == [4, 1, 2, 3]
    drafter.accepted(4, 9)
    assert drafter.ids == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]  # the kept guesses joined the text
    drafter.start([8, 5, 6], 10)
    assert drafter.propose(5, 5, options, None).tokens == [6, 5, 6, 5, 6]  # a loop of two goes on
    drafter.start([1, 2, 3], 10)
    assert drafter.propose(4, 3, options, None) is None  # nothing repeats


def test_lookup_switches_itself_off_while_it_keeps_missing():
    drafter = LookupDrafter(patience=2, backoff=4)
    options = SamplingOptions()
    drafter.start([1, 1, 1, 1], 100)
    pattern = []
    for _ in range(30):
        proposal = drafter.propose(1, 3, options, None)
        pattern.append(proposal is not None)
        drafter.accepted(0, 1)  # every guess missed
    # two misses, a pause of 4, two misses, a pause of 8, two misses, a pause of 16
    assert pattern == [True] * 2 + [False] * 4 + [True] * 2 + [False] * 8 + [True] * 2 + [False] * 12
    assert drafter.pauses == 3
    drafter.start([1, 1, 1, 1], 100)
    drafter.propose(1, 3, options, None)
    drafter.accepted(1, 1)  # a hit resets the count
    assert drafter.propose(1, 3, options, None) is not None


# ---------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("penalties", [dict(), dict(repetition_penalty=1.5),
                                       dict(frequency_penalty=0.5, presence_penalty=-0.3, logit_bias=((5, -2.0),))])
def test_prompt_lookup_samples_the_ids_plain_sampling_samples(penalties):
    target = lively_model(2)
    for seed in range(4):
        options = SamplingOptions(max_new_tokens=30, temperature=0.8, top_k=20, seed=seed, ignore_eos=True,
                                  **penalties)
        run = speculative(target, LookupDrafter(), [5, 5, 5, 5, 6, 5, 5, 5], options, 6)
        assert run.token_ids == plain_ids(target, [5, 5, 5, 5, 6, 5, 5, 5], options)


def four_token_model(seed: int) -> GPTModel:
    """Vocabulary 4, so the first tokens have few outcomes; a larger head makes the distributions uneven."""
    cfg = GPTConfig(vocab_size=4, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0,
                    qkv_bias=True, tie_weights=False, name="v4")
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(3.0)
    return model


def exact_distribution(model, prompt: list[int], n: int, options: SamplingOptions) -> dict[tuple[int, ...], float]:
    """P(first n ids) under plain sampling with ``options``, by enumerating every prefix."""
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, p in out.items():
            with torch.inference_mode():
                history = [prompt + list(seq)]  # for the repetition penalty
                probs = sampling_probs(model(torch.tensor(history))[0, -1:], options, history)[0]
            for token, q in enumerate(probs.tolist()):
                if q > 0:
                    nxt[seq + (token,)] = p * q
        out = nxt
    return out


def chi_square_p_value(counts: dict, expected_probs: dict, draws: int) -> float:
    """Pearson's chi-square test of ``counts`` against ``expected_probs``; outcomes expected fewer than 5
    times are pooled into one cell. Returns the p-value (the upper tail of chi-square with k-1 df)."""
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for outcome, p in expected_probs.items():
        e, o = p * draws, counts.get(outcome, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
        else:
            cells.append((o, e))
    assert all(outcome in expected_probs for outcome in counts), "a draw the distribution says is impossible"
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return upper_gamma_regularized((len(cells) - 1) / 2, stat / 2)


def upper_gamma_regularized(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a): a series below a + 1, Lentz's continued fraction above (Numerical Recipes)."""
    if x <= 0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        for n in range(1, 1000):
            term *= x / (a + n)
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return 1.0 - total * math.exp(log_front)
    tiny = 1e-300
    b, c, d = x + 1 - a, 1 / tiny, 1 / (x + 1 - a)
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def test_the_p_value_function_matches_known_values():
    # chi-square upper tails: df 1 at 3.841 -> 0.05, df 10 at 23.209 -> 0.01, df 4 at 1.0 -> 0.9098
    assert upper_gamma_regularized(0.5, 3.841 / 2) == pytest.approx(0.05, abs=1e-4)
    assert upper_gamma_regularized(5, 23.209 / 2) == pytest.approx(0.01, abs=1e-4)
    assert upper_gamma_regularized(2, 0.5) == pytest.approx(0.9098, abs=1e-4)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=3, top_p=0.9),
                                      dict(temperature=1.0, repetition_penalty=2.0)])
def test_sampling_with_a_draft_has_the_distribution_of_plain_sampling(sampling):
    target, draft = four_token_model(0), four_token_model(1)
    prompt, n, draws = [1, 2], 4, 800
    base = SamplingOptions(max_new_tokens=n, ignore_eos=True, **sampling)
    want = exact_distribution(target, prompt, n, base)
    drafts = exact_distribution(draft, prompt, n, base)
    counts: dict[tuple[int, ...], int] = {}
    proposed = accepted = 0
    for seed in range(draws):
        options = SamplingOptions(max_new_tokens=n, ignore_eos=True, seed=seed, **sampling)
        run = speculative(target, model_drafter(draft), prompt, options, 3)
        counts[tuple(run.token_ids)] = counts.get(tuple(run.token_ids), 0) + 1
        proposed, accepted = proposed + run.stats.proposed, accepted + run.stats.accepted
    assert 0 < accepted < proposed  # guesses were both kept and rejected: the rule did its work
    assert chi_square_p_value(counts, want, draws) > 0.001
    # The test can tell: the same draws against the draft's own distribution fail it.
    drafted = {k: v for k, v in counts.items() if k in drafts}
    assert chi_square_p_value(drafted, drafts, sum(drafted.values())) < 1e-6


# ---------------------------------------------------------------------------------------------
# The command


def gen(*args, input=None):
    return runner.invoke(app, ["generate", *args], input=input)


def gen_json(*args) -> dict:
    result = gen(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_draft_and_lookup_print_the_plain_ids(tiny_config_file, tmp_path):
    from gptcli.weights import random_model
    from helpers import save_checkpoint

    config = tiny_config_file(drop_rate=0.0)
    tiny = ["--config", str(config), "--weights", "random", "-n", "30", "--ignore-eos"]
    plain = gen_json("Hello there, friend", *tiny)
    assert "speculative" not in plain
    draft_file = save_checkpoint(random_model(load_config_file(config), seed=7), tmp_path / "draft")
    for extra in (["--draft", "int8"], ["--draft", str(draft_file), "--draft-tokens", "3"], ["--lookup"]):
        data = gen_json("Hello there, friend", *tiny, *extra)
        assert data["token_ids"] == plain["token_ids"], extra
        spec = data["speculative"]
        assert spec["draft"] == extra[1] if extra[0] == "--draft" else spec["draft"] == "lookup"
        if extra == ["--draft", "int8"]:
            assert spec["draft_tokens"] == 12  # a self-draft keeps nearly every guess: it guesses further
        assert spec["model_forwards"] == spec["checks"] + spec["steps"] > 0
        assert spec["tokens_per_model_forward"] == pytest.approx(29 / spec["model_forwards"], abs=1e-3)
        assert 0 <= spec["draft_share"] < 1
    assert data["speculative"]["draft_tokens"] == 8  # --lookup's default


@pytest.mark.parametrize("draft", [["--lookup"], ["--draft", "int8"]])
def test_logprobs_with_a_draft_are_plain_decodings(tiny, draft):
    """--logprobs reads the model's logits at each position, from the check that kept the token."""
    args = ["Hello there", *tiny, "-n", "14", "--ignore-eos", "--logprobs", "3"]
    plain, fast = gen_json(*args), gen_json(*args, *draft)
    assert fast["speculative"]["model_forwards"] < 13 or draft == ["--lookup"]
    assert fast["token_ids"] == plain["token_ids"] and fast["logprobs"] == plain["logprobs"]
    assert len(fast["logprobs"]["tokens"]) == 14


def test_interactive_session_with_a_draft_prints_the_plain_sessions_text(tiny):
    lines = "Hello\n and more\n\n"
    plain = gen(*tiny, "--interactive", "-n", "10", "--ignore-eos", input=lines)
    fast = gen(*tiny, "--interactive", "-n", "10", "--ignore-eos", "--draft", "int8", "--stats", input=lines)
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.stderr
    assert fast.stdout == plain.stdout and fast.stdout.count("\n") == 3
    spec = [x for x in fast.stderr.splitlines() if x.startswith("speculative: draft int8, K 12")]
    assert len(spec) == 3  # one per turn, after the turn's stats line


def test_stats_report_acceptance_tokens_per_forward_and_the_drafts_share(tiny):
    result = gen("Hello", *tiny, "-n", "12", "--draft", "int8", "--stats")
    assert result.exit_code == 0, result.stderr
    line = [x for x in result.stderr.splitlines() if x.startswith("speculative: ")]
    assert len(line) == 1 and "draft int8, K 12: acceptance " in line[0]
    assert "tokens per model forward" in line[0] and "of the decode time" in line[0]


def test_a_draft_with_another_tokenizer_or_vocabulary_is_one_error(tiny_config_file, tmp_path):
    from gptcli.tokenizer import CharTokenizer, to_metadata
    from gptcli.weights import random_model
    from helpers import save_checkpoint

    def char_model(chars: str, name: str):
        cfg = load_config_file(tiny_config_file(vocab_size=len(chars)))
        return save_checkpoint(random_model(cfg, seed=1), tmp_path / name, metadata=to_metadata(CharTokenizer(chars)))

    abc, xyz = char_model("abcdef", "abc"), char_model("uvwxyz", "xyz")
    cases = [
        ["--config", str(tiny_config_file()), "--weights", "random", "--draft", str(abc)],  # gpt2 vs char
        ["--weights", str(abc), "--draft", str(xyz)],  # same size, other characters
    ]
    for args in cases:
        result = gen("abc", *args, "-n", "3")
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: --draft ") and "same tokenizer and vocabulary" in lines[-1]
        assert not [x for x in lines if x.startswith("error") or "Traceback" in x][:-1]
        assert result.stdout == ""


@pytest.mark.parametrize("args,message", [
    (["--draft-tokens", "0", "--lookup"], "--draft-tokens must be 1 to 16, got 0"),
    (["--draft-tokens", "17", "--draft", "int8"], "--draft-tokens must be 1 to 16, got 17"),
    (["--draft-tokens", "two", "--lookup"], "--draft-tokens expects a whole number"),
    (["--draft-tokens", "4"], "add --draft SOURCE or --lookup"),
    (["--draft", "int8", "--lookup"], "choose one"),
    (["--lookup", "--compile"], "drop --compile"),
    (["--draft", "int4", "--quantize", "int4"], "already --quantize int4"),
    (["--draft", "int8", "--interactive", "--compile"], "--compile works one prompt at a time"),
])
def test_bad_speculative_options_are_one_error_line(tiny, args, message):
    result = gen("Hi", *tiny, "-n", "3", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
    assert message in result.stderr


@pytest.mark.parametrize("flag", [["--draft", "int8"], ["--lookup"]])
def test_each_line_keeps_plain_decoding_and_refuses_a_draft(tiny, flag):
    result = gen("--each-line", *tiny, "-n", "3", *flag, input="a\nb\n")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: --each-line uses plain decoding; drop {flag[0]}"]


def test_help_says_each_line_uses_plain_decoding():
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "300"})
    text = " ".join(result.stdout.split())
    assert "Plain decoding only (no --draft, --lookup)" in text
    assert "--draft" in text and "--lookup" in text and "--draft-tokens" in text


def test_the_draft_loads_through_the_front_door_with_the_models_own_options():
    from gptcli.runtime import InferenceOptions
    from gptcli.decoding.speculative import SpeculativeOptions, draft_inference_options

    target = InferenceOptions(size="124M", weights="auto", device="cpu", dtype="float32", seed=9, threads=1)
    own = draft_inference_options(SpeculativeOptions(draft="INT8"), target)
    assert (own.size, own.weights, own.seed, own.threads, own.quantize, own.dtype) == ("124M", "auto", 9, 1, "int8",
                                                                                         "auto")  # bfloat16 on the CPU
    half = draft_inference_options(SpeculativeOptions(draft="int4"), InferenceOptions(size="124M", dtype="bfloat16"))
    assert (half.quantize, half.dtype) == ("int4", "bfloat16")
    other = draft_inference_options(SpeculativeOptions(draft=" gpt2 "), target)
    assert (other.size, other.config, other.weights, other.quantize, other.dtype) == (None, None, "gpt2", None,
                                                                                     "float32")
