"""--repetition-penalty, --min-p, --frequency-penalty, --presence-penalty, --logit-bias and --num-samples.

transformers' own logits processors (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, MinPLogitsWarper) are the oracle: on random logits, and step by step on a tiny
transformers GPT-2 checkpoint that gptcli loads. Batches keep each row's ids equal to a lone run.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from gptcli.decoding.batch import BatchDecoder, generate_batch  # noqa: E402
from gptcli.cli import app  # noqa: E402
from gptcli.decoding.generate import (  # noqa: E402
    Decoder,
    Generation,
    SamplingOptions,
    Seen,
    adjust_logits,
    penalize_repetition,
    sampling_probs,
    select_next,
)
from gptcli.tokenizer import encode  # noqa: E402
from gptcli.weights import load_model  # noqa: E402
from helpers import lively_model  # noqa: E402
from test_hf_oracle import hf_model, save  # noqa: E402

CPU = torch.device("cpu")
runner = CliRunner()


def hf_chain(penalty: float | None, temperature: float | None, top_k: int | None, min_p: float | None):
    """transformers' processors in the order its generate() builds them."""
    chain = LogitsProcessorList()
    if penalty is not None:
        chain.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature is not None:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        chain.append(TopKLogitsWarper(top_k))
    if min_p is not None:
        chain.append(MinPLogitsWarper(min_p))
    return chain


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_is_transformers(penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g) * 4  # positive and negative logits
    history = [[1, 5, 5, 7, 499], [0], list(range(0, 500, 3))]
    ours = penalize_repetition(logits, history, penalty)
    for row, ids in enumerate(history):  # rows of different lengths, one at a time for transformers
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], expected, rtol=0, atol=0)
    assert not torch.equal(ours, logits)  # it did something


@pytest.mark.parametrize("temperature,top_k,min_p", [(1.0, None, 0.1), (0.7, None, 0.05), (1.3, 40, 0.2),
                                                     (0.8, None, 1.0), (1.0, None, 0.0)])
def test_min_p_distribution_is_transformers(temperature, top_k, min_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 300, generator=g) * 3
    history = [[3, 4, 5], [9, 9, 1]]
    options = SamplingOptions(temperature=temperature, top_k=top_k, min_p=min_p, repetition_penalty=1.2)
    ours = sampling_probs(logits, options, history)
    for row in range(2):
        scores = hf_chain(1.2, temperature, top_k, min_p)(torch.tensor([history[row]]), logits[row : row + 1].clone())
        expected = torch.softmax(scores, dim=-1)
        assert torch.equal(ours[row] > 0, expected[0] > 0)  # the same tokens kept
        torch.testing.assert_close(ours[row], expected[0], rtol=1e-5, atol=1e-7)
    if min_p == 0.1:
        assert 1 < int((ours[0] > 0).sum()) < 300  # min-p cut some, kept more than one


def test_min_p_draws_only_kept_tokens():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -2.0]])
    options = SamplingOptions(temperature=1.0, min_p=0.3, seed=3)
    kept = sampling_probs(logits, options) > 0
    assert kept[0].tolist() == [True, True, False, False, False]  # e^-1 = 0.37 >= 0.3; e^-4 < 0.3
    g = torch.Generator().manual_seed(3)
    assert {int(select_next(logits, options, g)[0]) for _ in range(200)} == {0, 1}


def test_greedy_with_penalty_on_a_checkpoint_is_transformers_generate(tmp_path):
    """gptcli generate --repetition-penalty on a transformers checkpoint: the ids of transformers' generate()."""
    reference = hf_model(tie=True, seed=5)
    folder = save(reference, tmp_path / "ckpt", prefixed=True)
    prompt = encode("the the the cat sat on the")
    new = 16  # prompt + new stays inside n_positions (32): transformers would not crop
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    with torch.no_grad():
        plain = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new)[0, len(prompt):]
        expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new,
                                      repetition_penalty=1.8)[0, len(prompt):].tolist()
    assert plain.tolist() != expected  # the penalty changes this sequence
    assert len(set(expected)) == len(expected) > 10  # 1.8 makes a random model avoid every repeat here
    result = runner.invoke(app, ["generate", "the the the cat sat on the", "-w", str(folder), "-n", str(new),
                                 "--repetition-penalty", "1.8", "--ignore-eos", "--device", "cpu",
                                 "--dtype", "float32", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["token_ids"] == expected
    assert data["sampling"]["repetition_penalty"] == 1.8


def test_sampling_distribution_on_a_checkpoint_is_transformers(tmp_path):
    """Each step of a sampled gptcli run with penalty, temperature and min-p: transformers' processors, on
    transformers' own logits for the same ids, give the distribution gptcli drew from."""
    reference = hf_model(tie=False, seed=9)
    folder = save(reference, tmp_path / "ckpt", prefixed=False)
    model = load_model(size=None, config=None, weights=str(folder), device=CPU, dtype=torch.float32).model
    prompt = encode("Once upon a time there was")
    options = SamplingOptions(max_new_tokens=12, temperature=0.9, min_p=0.08, repetition_penalty=1.3, seed=4,
                              ignore_eos=True)
    generated = Generation(Decoder(model, CPU, torch.float32), prompt, options).run().token_ids
    chain = hf_chain(1.3, 0.9, None, 0.08)
    for step in range(len(generated)):
        ids = prompt + generated[:step]
        with torch.no_grad():
            hf_logits = reference(torch.tensor([ids]), use_cache=False).logits[:, -1]
            our_logits = model(torch.tensor([ids]))[:, -1]
        expected = torch.softmax(chain(torch.tensor([ids]), hf_logits.clone()), dim=-1)[0]
        ours = sampling_probs(our_logits, options, [ids])[0]
        assert expected[generated[step]] > 0  # gptcli drew a token transformers keeps
        assert torch.equal(ours > 0, expected > 0)
        torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-6)


def openai_penalties(logits: torch.Tensor, generated: list[int], frequency: float, presence: float,
                     bias: dict[int, float]) -> torch.Tensor:
    """OpenAI's formula for one row, written out id by id: mu[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j]."""
    out = logits.clone()
    for j in range(out.shape[-1]):
        c = generated.count(j)
        out[j] = out[j] - c * frequency - float(c > 0) * presence + bias.get(j, 0.0)
    return out


@pytest.mark.parametrize("frequency,presence", [(0.5, 0.0), (0.0, 1.5), (-0.7, 2.0), (2.0, -2.0)])
def test_frequency_and_presence_penalties_and_logit_bias_are_openais_formula(frequency, presence):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 60, generator=g) * 3
    prompts = [[1, 2, 2], [], [9] * 5]
    generated = [[2, 2, 2, 5, 7, 5], [0, 59], []]
    bias = {3: -100.0, 7: 4.5, 59: 0.25}
    options = SamplingOptions(frequency_penalty=frequency, presence_penalty=presence, logit_bias=tuple(bias.items()))
    history = [Seen(p + gen, len(p)) for p, gen in zip(prompts, generated)]
    ours = adjust_logits(logits, options, history)
    for row in range(3):  # the prompt's ids are not counted: only what was generated
        torch.testing.assert_close(ours[row], openai_penalties(logits[row], generated[row], frequency, presence, bias),
                                   rtol=0, atol=1e-5)
    assert not torch.equal(ours[2] - logits[2], torch.zeros(60)) and ours[2, 9] == logits[2, 9] + 0  # bias only
    # Greedy picks from the adjusted logits; the logits themselves are untouched.
    assert select_next(logits, options, None, history).tolist() == ours.argmax(-1).tolist()
    with pytest.raises(TypeError, match="Seen"):  # plain ids cannot say which were generated
        adjust_logits(logits, options, [p + gen for p, gen in zip(prompts, generated)])


def test_the_repetition_penalty_applies_first_then_the_rest():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    options = SamplingOptions(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                              logit_bias=((3, -1.0),))
    ours = adjust_logits(logits, options, [Seen([0, 1, 1], 1)])  # prompt [0], generated [1, 1]
    # 0: 2 / 2 (seen in the prompt: repetition only); 1: -1 * 2 - 2 * 0.5 - 0.25; 2: untouched; 3: + bias
    assert ours.tolist() == [[1.0, -3.25, 0.5, 2.0]]


def test_a_logit_bias_bans_and_forces_when_sampling_too():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -2.0]])
    ban = SamplingOptions(temperature=1.0, logit_bias=((0, -100.0), (1, -100.0)))
    force = SamplingOptions(temperature=1.5, logit_bias=((4, 100.0),))
    g = torch.Generator().manual_seed(0)
    assert {int(select_next(logits, ban, g)[0]) for _ in range(300)} == {2, 3, 4}
    assert {int(select_next(logits, force, g)[0]) for _ in range(100)} == {4}
    assert torch.equal(sampling_probs(logits, force)[0] > 0.999, torch.tensor([False] * 4 + [True]))


@pytest.mark.parametrize("field,value,message", [
    ("frequency_penalty", 2.5, "--frequency-penalty must be in [-2, 2], got 2.5"),
    ("presence_penalty", float("nan"), "--presence-penalty must be in [-2, 2], got nan"),
    ("logit_bias", ((5, 100.5),), "--logit-bias 5=100.5: the bias must be in [-100, 100]"),
    ("logit_bias", ((-1, 1.0),), "--logit-bias: token id -1 is not in the vocabulary"),
    ("logit_bias", ((4, 1.0), (4, 2.0)), "--logit-bias: token id 4 is given twice"),
])
def test_bad_penalty_and_bias_values(field, value, message):
    from gptcli.errors import UserError

    with pytest.raises(UserError) as info:
        SamplingOptions(**{field: value}).validate()
    assert str(info.value) == message
    with pytest.raises(UserError, match=r"token id 300 is not in the model's vocabulary \(0-299\)"):
        SamplingOptions(logit_bias=((300, 1.0),)).check_vocab(300)


PROMPTS = [[1, 2, 3, 1, 2], [4], [5, 6, 7, 8, 9, 10, 11], list(range(20, 40))]  # the last is past the window


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.4, min_p=0.05),
                                       dict(frequency_penalty=0.9, presence_penalty=0.3, logit_bias=((4, 2.0),)),
                                       dict(repetition_penalty=1.2, frequency_penalty=-0.5, presence_penalty=1.0)],
                         ids=["repetition-min-p", "frequency-presence-bias", "all-penalties"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_rows_equal_lone_runs_with_penalties(temperature, penalties):
    model = lively_model(3)
    options = SamplingOptions(max_new_tokens=20, temperature=temperature, seed=11, ignore_eos=True, **penalties)
    seeds = [11, 12, 13, 14]
    results, _ = generate_batch(BatchDecoder(model, CPU, torch.float32), PROMPTS, options, seeds=seeds)
    for prompt, seed, result in zip(PROMPTS, seeds, results):
        alone_options = SamplingOptions(**{**options.__dict__, "seed": seed})
        alone = Generation(Decoder(model, CPU, torch.float32), prompt, alone_options).run()
        assert result.token_ids == alone.token_ids
    without = Generation(Decoder(model, CPU, torch.float32), PROMPTS[0],
                         SamplingOptions(max_new_tokens=20, temperature=temperature, seed=11, ignore_eos=True)).run()
    assert without.token_ids != results[0].token_ids  # the penalty mattered


# --- the command line ---------------------------------------------------------------------------------


def gen(*args: str):
    return runner.invoke(app, ["generate", *args])


@pytest.fixture
def weights(tmp_path) -> list[str]:
    """A checkpoint file: unlike --weights random, its weights do not change with --seed."""
    return ["-w", str(save(hf_model(tie=True, seed=2), tmp_path / "ckpt", prefixed=True)), "--device", "cpu"]


def test_num_samples_are_seeded_in_turn_and_labelled(weights):
    tiny = weights
    args = ["Hello", *tiny, "-n", "6", "-t", "1.0", "--seed", "7"]
    result = gen(*args, "--num-samples", "3", "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["sample"], r["num_samples"], r["seed"]) for r in records] == [(1, 3, 7), (2, 3, 8), (3, 3, 9)]
    for r in records:
        alone = json.loads(gen("Hello", *tiny, "-n", "6", "-t", "1.0", "--seed", str(r["seed"]), "--json").stdout)
        assert r["token_ids"] == alone["token_ids"]
    assert len({tuple(r["token_ids"]) for r in records}) > 1  # seeds differ, so do samples
    plain = gen(*args, "--num-samples", "3")
    assert plain.exit_code == 0
    lines = plain.stdout.splitlines()
    assert lines[0::2] == [f"--- sample {i} of 3 (seed {6 + i}) ---" for i in (1, 2, 3)]
    assert lines[1::2] == [r["text"] for r in records]


def test_num_samples_with_each_line(weights):
    tiny = weights
    result = runner.invoke(app, ["generate", "--each-line", *tiny, "-n", "5", "-t", "1.0", "--seed", "3",
                                 "--num-samples", "2", "--json", "-b", "3"], input="Hello\nThe sky\n")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["line"], r["sample"], r["seed"]) for r in records] == [(1, 1, 3), (1, 2, 4), (2, 1, 3), (2, 2, 4)]
    for r in records:
        alone = json.loads(gen(r["prompt"], *tiny, "-n", "5", "-t", "1.0", "--seed", str(r["seed"]), "--json").stdout)
        assert r["token_ids"] == alone["token_ids"]


@pytest.mark.parametrize("args,message", [
    (["--repetition-penalty", "0"], "error: --repetition-penalty must be above 0"),
    (["--repetition-penalty", "nan"], "error: --repetition-penalty must be above 0"),
    (["--min-p", "1.5"], "error: --min-p must be in [0, 1], got 1.5"),
    (["--num-samples", "0"], "error: --num-samples must be 1 or more, got 0"),
    (["--seed", str(2**64)], "error: --seed must be at most 2**64 - 1 = 18446744073709551615, got 18446744073709551616"),
    (["--seed", str(2**64 - 1), "--num-samples", "2"], "error: --num-samples 2 from --seed 18446744073709551615"),
])
def test_bad_sampling_options_are_one_line(tiny, args, message):
    result = gen("Hello", *tiny, *args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_generate_frequency_penalty_and_logit_bias(weights):
    def ids(*args: str) -> list[int]:
        result = gen("the the the cat", *weights, "-n", "24", "--ignore-eos", "--json", *args)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["token_ids"]

    plain = ids()
    assert len(set(plain)) < len(set(ids("--frequency-penalty", "1.5")))  # fewer repeats
    assert len(set(plain)) < len(set(ids("--presence-penalty", "1.5")))
    banned = ids(*[a for t in set(plain) for a in ("--logit-bias", f"{t}=-100")])
    assert not set(banned) & set(plain)
    assert ids("--logit-bias", "42=100") == [42] * 24
    record = json.loads(gen("Hi", *weights, "-n", "2", "--json", "--frequency-penalty", "0.5", "--presence-penalty",
                            "-0.25", "--logit-bias", "42=3", "--logit-bias", "7=-1.5").stdout)
    assert record["sampling"]["frequency_penalty"] == 0.5 and record["sampling"]["presence_penalty"] == -0.25
    assert record["sampling"]["logit_bias"] == {"42": 3.0, "7": -1.5}
    # --each-line batches keep every row's ids with these options too
    lines = runner.invoke(app, ["generate", "--each-line", *weights, "-n", "24", "--ignore-eos", "--json",
                                "--frequency-penalty", "1.5"], input="the the the cat\nHello\n")
    assert lines.exit_code == 0, lines.stderr
    assert json.loads(lines.stdout.splitlines()[0])["token_ids"] == ids("--frequency-penalty", "1.5")


@pytest.mark.parametrize("args,message", [
    (["--frequency-penalty", "3"], "error: --frequency-penalty must be in [-2, 2], got 3"),
    (["--presence-penalty", "x"], "error: --presence-penalty expects a number, got 'x'"),
    (["--logit-bias", "42"], "error: --logit-bias expects ID=BIAS (a token id and a number, e.g. 198=-100), got '42'"),
    (["--logit-bias", "a=1"], "error: --logit-bias expects ID=BIAS"),
    (["--logit-bias", "42=200"], "error: --logit-bias 42=200: the bias must be in [-100, 100]"),
    (["--logit-bias", "50257=1"], "error: --logit-bias: token id 50257 is not in the model's vocabulary (0-50256)"),
])
def test_bad_penalty_and_bias_options_are_one_line(tiny, args, message):
    result = gen("Hello", *tiny, *args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_min_p_when_greedy_is_noted(tiny):
    result = gen("Hello", *tiny, "-n", "2", "--min-p", "0.1", "--top-k", "5")
    assert result.exit_code == 0
    assert "note: --top-k, --top-p and --min-p only apply when sampling" in result.stderr
