"""The speed options as users run them: --each-line, --quantize int8/int4, --compile."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app

runner = CliRunner()
PROMPTS = ["The sky is", "My name is Ada and", "", "Once upon a time, in a land far away, there lived"]


@pytest.fixture
def tiny(tiny_config_file) -> list[str]:
    # Context 16: the 20 new tokens below run past the window for every prompt.
    return ["--config", str(tiny_config_file()), "--weights", "random", "--ignore-eos"]


def gen(*args, input=None):
    return runner.invoke(app, ["generate", *args], input=input)


def test_each_line_equals_one_by_one(tiny):
    """Exact equality of ids. It relies on batch-invariant CPU kernels in float32 (eager, oneDNN):
    oneDNN's linear gives a row the same bits among 2..N rows, and a lone row is multiplied as two
    (kernels.onednn_linear); attention runs each row over its own keys with the call a lone sequence
    makes (model._attend_rows); each row keeps its own cache until it outgrows the window
    (batch.BatchDecoder). test_batch.py checks the logits bit for bit; bench/batch_invariance.py
    checks each kernel on a given CPU. With one masked attention call for the batch this test failed.
    """
    # Sampled: random tiny weights decoded greedily tend to repeat one token, which proves little.
    sampling = ["-n", "20", "--temperature", "2", "--seed", "9"]
    result = gen(*tiny, "--each-line", *sampling, "--json", "--batch-size", "3", input="\n".join(PROMPTS) + "\n")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert [r["prompt"] for r in rows] == PROMPTS
    for prompt, row in zip(PROMPTS, rows):
        alone = gen(*tiny, prompt, *sampling, "--json")
        assert alone.exit_code == 0, alone.stderr
        single = json.loads(alone.stdout)
        assert row["token_ids"] == single["token_ids"]
        assert row["text"] == single["text"]
        assert row["finish_reason"] == single["finish_reason"]
    assert len({t for r in rows for t in r["token_ids"]}) > 20


def test_each_line_plain_writes_one_line_per_prompt(tiny):
    result = gen(*tiny, "--each-line", "-n", "5", input="\n".join(PROMPTS) + "\n")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(PROMPTS)
    assert result.stdout.endswith("\n") and "\x1b[" not in result.stdout


def test_escape_line_keeps_one_line_and_is_reversible():
    from gptcli.commands.generate import escape_line

    text = 'a\\nb\nc\r\nd'
    escaped = escape_line(text)
    assert "\n" not in escaped and "\r" not in escaped
    assert escaped == 'a\\\\nb\\nc\\r\\nd'


def test_quantize_int8_runs_in_bfloat16(tiny):
    result = gen(*tiny, "Hello", "-n", "5", "--quantize", "int8", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["dtype"] == "bfloat16" and len(data["token_ids"]) == 5


def test_quantize_int4_runs_in_bfloat16_eager_and_compiled(tiny):
    eager = gen(*tiny, "Hello", "-n", "5", "--quantize", "INT4", "--json")
    assert eager.exit_code == 0, eager.stderr
    data = json.loads(eager.stdout)
    assert data["dtype"] == "bfloat16" and len(data["token_ids"]) == 5
    compiled = gen(*tiny, "Hello", "-n", "5", "--quantize", "int4", "--compile", "--json")
    assert compiled.exit_code == 0, compiled.stderr
    assert json.loads(compiled.stdout)["token_ids"] == data["token_ids"]


def test_quantize_schemes_are_what_prepare_model_takes():
    from gptcli.kernels.prepare import QUANTIZE_SCHEMES
    from gptcli.kernels.quantize import INT4_DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, int4_group_size

    assert QUANTIZE_SCHEMES == ("int8", "int4", *(f"int4-g{g}" for g in INT4_GROUP_SIZES))
    assert int4_group_size("int4") == INT4_DEFAULT_GROUP_SIZE and int4_group_size("int4-g128") == 128
    assert int4_group_size("int4-g48") is None and int4_group_size("int8") is None


def test_quantize_int4_with_each_line(tiny):
    result = gen(*tiny, "--each-line", "-n", "3", "--quantize", "int4-g32", "--json", input="a\nbb\n")
    assert result.exit_code == 0, result.stderr
    assert [len(json.loads(line)["token_ids"]) for line in result.stdout.splitlines()] == [3, 3]


@pytest.mark.parametrize(
    "args,message",
    [
        (["Hello", "--quantize", "int3"], "unknown --quantize 'int3'; the schemes are int8 and int4"),
        (["Hello", "--quantize", "int4-g48"], "unknown --quantize 'int4-g48'"),
        (["Hello", "--quantize", "int4-g64"], "in_features divisible by the group size 64; got a layer with 32"),
        (["Hello", "--quantize", "int8", "--dtype", "float32"], "--quantize int8 needs --dtype bfloat16"),
        (["Hello", "--quantize", "int4", "--dtype", "float32"], "--quantize int4 needs --dtype bfloat16"),
        (["--each-line", "--batch-size", "0"], "--batch-size must be 1 or more"),
        (["--each-line", "--compile"], "--compile works one prompt at a time"),
        (["Hello", "--each-line"], "don't pass a PROMPT"),
    ],
)
def test_bad_speed_options(tiny, args, message):
    result = gen(*tiny, *args, input="x\n")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def test_compile_gives_the_eager_ids_and_reports_compile_time(tiny):
    eager = json.loads(gen(*tiny, "Hello there", "-n", "20", "--json").stdout)
    result = gen(*tiny, "Hello there", "-n", "20", "--json", "--compile")
    assert result.exit_code == 0, result.stderr
    compiled = json.loads(result.stdout)
    assert compiled["token_ids"] == eager["token_ids"]
    assert compiled["timings"]["compile_s"] > 0 and eager["timings"]["compile_s"] is None
    assert "compiling the decode step" in result.stderr


def test_each_line_json_has_the_single_run_fields_and_one_line_per_input_line(tiny):
    result = gen(*tiny, "--each-line", "-n", "3", "--json", "--stop", "zzz", input="\n")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "" and rows[0]["prompt_token_ids"] == [50256]
    single = json.loads(gen(*tiny, "", "-n", "3", "--json", "--stop", "zzz").stdout)
    assert set(rows[0]) == (set(single) - {"timings"}) | {"line"}
    assert rows[0]["stop"] == ["zzz"] and rows[0]["sampling"]["temperature"] == 0.0


def test_split_prompt_lines():
    from gptcli.commands.common import split_lines as split_prompt_lines

    assert split_prompt_lines("") == []
    assert split_prompt_lines("\n") == [""]
    assert split_prompt_lines("\n\n") == ["", ""]
    assert split_prompt_lines("a\r\nb") == ["a", "b"]
    assert split_prompt_lines("a\nb\n") == ["a", "b"]


def test_compile_warm_up_builds_the_cache_the_run_will_use():
    from gptcli.config import shipped_config
    from gptcli.decoding.generate import CompiledDecoder, Generation, SamplingOptions
    from gptcli.model.gpt import build_model

    cfg = shipped_config("124M")
    decoder = CompiledDecoder(build_model(cfg, "meta"), torch.device("cpu"), torch.float32)
    decoder._compiled = lambda token, position: torch.zeros(1, cfg.vocab_size)  # no real compile: shapes only
    decoder.model = lambda *a, **k: torch.zeros(1, 1, cfg.vocab_size)
    decoder.warm_up(10 + 300)
    warmed = decoder._cache
    assert warmed.max_len == 512
    Generation(decoder, list(range(10)), SamplingOptions(max_new_tokens=300, ignore_eos=True),
               token_bytes=lambda i: b"").run()
    assert decoder._cache is warmed  # same length, so the graph compiled in warm_up serves the run


def test_config_with_another_vocabulary_is_refused(tiny_config_file):
    path = tiny_config_file(vocab_size=1000)
    result = gen("--config", str(path), "--weights", "random", "Hello", "-n", "3")
    assert result.exit_code == 2 and result.stdout == ""
    assert "vocab_size 1000 does not match GPT-2's tokenizer (50257 tokens)" in result.stderr
