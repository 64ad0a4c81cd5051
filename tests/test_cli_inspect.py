"""`gptcli inspect`: tree and figures, checkpoints (transformers' and a sparse 6 GB xl file), next tokens,
--json, bad input, and no torch import where none is needed."""

from __future__ import annotations

import builtins
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptcli.checkpoint import HF, expected_tensors
from gptcli.cli import app
from gptcli.config import shipped_config
from helpers import imported_modules

runner = CliRunner()
HELLO_I_AM = [15496, 11, 314, 716]


def run(*args):
    return runner.invoke(app, ["inspect", *map(str, args)])


def run_json(*args) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2 saved by transformers' save_pretrained: model.safetensors + config.json."""
    import torch

    from helpers import hf_tiny_gpt2

    folder = tmp_path_factory.mktemp("hf-tiny")
    model = hf_tiny_gpt2(folder)
    with torch.no_grad():  # transformers' own next-token distribution after "Hello, I am"
        probs = torch.softmax(model(torch.tensor([HELLO_I_AM])).logits[0, -1], dim=-1)
    (folder / "expected-top.json").write_text(json.dumps(probs.topk(3).indices.tolist()))
    return folder


def write_sparse_checkpoint(path: Path, size: str = "1558M", with_mask_buffers: bool = True) -> int:
    """A safetensors file shaped like the Hub's gpt2-xl (float32, Hugging Face names, attn.bias masks),
    with a real header and a data section that is a hole: truncate() sets the size, no data is written.
    Returns the data section's offset."""
    cfg = shipped_config(size)
    tensors = {name: shape for name, shape in expected_tensors(cfg, HF).items()}
    if with_mask_buffers:
        for i in range(cfg.n_layers):
            tensors[f"h.{i}.attn.bias"] = (1, 1, cfg.context_length, cfg.context_length)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in sorted(tensors.items()):
        n = 4
        for dim in shape:
            n *= dim
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)
    return 8 + len(raw)


@pytest.fixture
def sparse_xl(tmp_path) -> tuple[Path, int]:
    path = tmp_path / "gpt2-xl" / "model.safetensors"
    path.parent.mkdir()
    return path, write_sparse_checkpoint(path)


@pytest.fixture
def count_reads(monkeypatch):
    """Record, for every open() of a given file, the furthest byte any read reached."""
    furthest: dict[str, int] = {}
    real_open = builtins.open

    class Tracked:
        def __init__(self, f, key):
            self._f, self._key = f, key

        def __getattr__(self, name):
            attr = getattr(self._f, name)
            if name in ("read", "readinto", "readline", "readlines", "read1", "readinto1"):
                def wrapped(*a, **k):
                    out = attr(*a, **k)
                    furthest[self._key] = max(furthest.get(self._key, 0), self._f.tell())
                    return out
                return wrapped
            return attr

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def __iter__(self):
            raise AssertionError("the checkpoint must not be read line by line")

    def tracking_open(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        if str(file).endswith(".safetensors"):
            furthest.setdefault(str(file), 0)
            return Tracked(f, str(file))
        return f

    monkeypatch.setattr(builtins, "open", tracking_open)
    return furthest


# ------------------------------------------------------------------ the tree and the figures


def test_xl_shows_collapsed_tree_and_figures():
    result = run("--size", "xl")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "48 × TransformerBlock" in out and "0–47" in out
    assert out.count("TransformerBlock") == 1  # one expanded example, not 48
    assert "W_qkv: Linear  weight [4800, 1600], bias [4800]" in out
    assert "out_head: Linear  weight [50257, 1600] = tok_emb.weight (tied)" in out
    assert "1,557,611,200" in out and "1,638,022,400" in out  # as `params`
    assert "2·N + 2·n_layers·n_ctx·emb_dim" in out  # the formula is printed with the figure
    assert "600.00 MiB" in out  # float32 KV cache at 1024 tokens: 2·48·1600·4·1024
    assert "\x1b[" not in out
    assert result.stderr == ""


def test_depth_limits_the_printed_tree():
    out = run("--size", "small", "--depth", "1").stdout
    assert "trf_blocks: Sequential  (1 submodule hidden by --depth)" in out
    assert "TransformerBlock" not in out and "W_qkv" not in out
    assert "124,439,808" in out
    assert "GPTModel  (6 submodules hidden by --depth)" in run("--size", "small", "--depth", "0").stdout


def test_json_keys_and_parameters_equal_params():
    data = run_json("--size", "xl")
    assert set(data) >= {"config", "parameters", "memory_bytes", "tree", "flops_per_token", "kv_cache_bytes",
                         "checkpoint", "prompt", "next_tokens"}
    params = json.loads(runner.invoke(app, ["params", "--size", "xl", "--json"]).stdout)
    assert {k: data["parameters"][k] for k in ("total", "tied", "untied")} == \
        {k: params[k] for k in ("total", "tied", "untied")}
    assert data["memory_bytes"] == params["memory_bytes"]
    assert data["tree"]["params"] == params["total"]
    block = data["tree"]["children"][3]["children"][0]
    assert (block["type"], block["repeat"], block["params"]) == ("TransformerBlock", 48, 48 * block["params_each"])
    assert data["flops_per_token"]["total"] == 2 * params["non_embedding"] + 2 * 48 * 1024 * 1600
    assert data["kv_cache_bytes"]["per_token"]["bfloat16"] == 2 * 48 * 1600 * 2
    assert data["checkpoint"] is None and data["next_tokens"] is None and data["prompt"] is None


def test_json_tree_follows_depth(tiny_config_file):
    tree = run_json("--config", tiny_config_file(), "--depth", "1")["tree"]
    assert all(c["children"] == [] for c in tree["children"])
    assert tree["children"][3]["children_hidden"] == 1


def test_rich_output_on_a_terminal(monkeypatch, tiny_config_file):
    import gptcli.commands.common as common

    monkeypatch.setattr(common, "stdout_is_terminal", lambda: True)  # stdout_styled falls back to it
    result = run("--config", tiny_config_file(), "--prompt", "Hello", "--top", "3", "--device", "cpu", "--details")
    assert result.exit_code == 0, result.stderr
    assert "└── " in result.stdout and "2 × TransformerBlock" in result.stdout
    assert "┃" in result.stdout  # Rich tables
    assert "█" in result.stdout or "▏" in result.stdout or "▎" in result.stdout  # the bars


# ------------------------------------------------------------------ checkpoints


def test_transformers_checkpoint_is_huggingface_tied_and_complete(hf_checkpoint):
    result = run("--weights", hf_checkpoint, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    c = data["checkpoint"]
    assert (c["layout"], c["tied"]) == ("huggingface", True)
    assert c["missing"] == c["unexpected"] == c["mismatched"] == []
    assert {t["name"] for t in c["tensors"]} >= {"transformer.wte.weight", "transformer.h.1.mlp.c_proj.bias"}
    assert all(set(t) == {"name", "dtype", "shape", "bytes"} for t in c["tensors"])
    wte = next(t for t in c["tensors"] if t["name"] == "transformer.wte.weight")
    assert (wte["dtype"], wte["shape"], wte["bytes"]) == ("F32", [50257, 32], 50257 * 32 * 4)
    assert c["architecture"]["n_layers"] == 2 and c["architecture"]["emb_dim"] == 32
    # The config came from config.json beside it (n_heads cannot be read from shapes).
    assert (data["config"]["n_heads"], data["config"]["emb_dim"], data["config"]["context_length"]) == (4, 32, 16)
    assert "config.json" in result.stderr


def test_transformers_checkpoint_as_a_table(hf_checkpoint):
    result = run("--weights", hf_checkpoint / "model.safetensors")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "huggingface" in out and "tied to the token embedding" in out
    assert re.search(r"transformer\.h\.0\.attn\.c_attn\.weight +F32 +\[32, 96\] +12,288", out)
    assert "Verdict against hf-tiny" in out and "ok, every tensor matches" in out


def test_checkpoint_against_another_config_lists_mismatches(hf_checkpoint):
    result = run("--weights", hf_checkpoint, "--size", "small")
    assert result.exit_code == 0, result.stderr  # a verdict is a report, not an error
    assert re.search(r"mismatched +wte\.weight +checkpoint \[50257, 32\] vs config \[50257, 768\]", result.stdout)
    assert re.search(r"missing +h\.2\.", result.stdout)  # 124M has 12 blocks, the file 2
    data = run_json("--weights", hf_checkpoint, "--size", "small")["checkpoint"]
    assert "wte.weight" in data["mismatched"] and "h.11.ln_1.weight" in data["missing"] and not data["unexpected"]


def test_a_config_whose_shapes_fit_but_whose_maths_differs_is_not_ok(hf_checkpoint, tmp_path):
    """Same shapes, another GELU (or bias setting): generate would refuse the pair, so the verdict says so."""
    config = tmp_path / "erf.yaml"
    config.write_text("vocab_size: 50257\ncontext_length: 16\nemb_dim: 32\nn_heads: 4\nn_layers: 2\n"
                      "drop_rate: 0.0\nqkv_bias: true\ntie_weights: true\ngelu: erf\n")
    result = run("--weights", hf_checkpoint, "--config", config)
    assert result.exit_code == 0, result.stderr
    assert "ok, every tensor matches" not in result.stdout
    assert re.search(r"architecture +gelu +checkpoint tanh vs config erf", result.stdout)
    c = run_json("--weights", hf_checkpoint, "--config", config)["checkpoint"]
    assert not c["ok"] and c["config_differences"] == [{"key": "gelu", "config": "erf", "checkpoint": "tanh"}]
    assert c["verdict"] == "gelu (config erf, checkpoint tanh)" and c["missing"] == c["mismatched"] == []


def test_sparse_xl_header_reads_fast_and_never_touches_data(sparse_xl, count_reads):
    path, data_offset = sparse_xl
    assert path.stat().st_size > 6 * 10**9  # as big as the real file, but a hole on disk
    start = time.perf_counter()
    result = run("--weights", path, "--json")
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.stderr
    c = json.loads(result.stdout)["checkpoint"]
    assert (c["layout"], c["tied"], c["n_tensors"]) == ("huggingface", True, 48 * 12 + 4 + 48)
    assert c["missing"] == c["mismatched"] == c["unexpected"] == []  # masks are buffers, not weights
    assert c["architecture"] == {"vocab_size": 50257, "context_length": 1024, "emb_dim": 1600, "n_heads": 25,
                                 "n_layers": 48, "qkv_bias": True, "tie_weights": True, "bias": True}
    assert c["file_bytes"] == path.stat().st_size and c["header_bytes"] == data_offset
    assert count_reads == {str(path): data_offset}  # read exactly the header, not one byte of data
    assert elapsed < 1.0, f"inspect --weights took {elapsed:.2f}s"


def test_sparse_xl_table_lists_every_tensor(sparse_xl):
    path, _ = sparse_xl
    result = run("--weights", path)
    assert result.exit_code == 0, result.stderr
    assert "h.47.mlp.c_fc.weight" in result.stdout and "[1600, 6400]" in result.stdout
    assert "Verdict against 1558M: ok" in result.stdout  # shapes of a released size keep its name
    assert "config from tensor shapes" in result.stderr  # no config.json beside it


# ------------------------------------------------------------------ next tokens


def test_next_tokens_on_random_weights(tiny_config_file):
    data = run_json("--config", tiny_config_file(), "--prompt", "Hello, I am", "--top", "5", "--device", "cpu")
    rows = data["next_tokens"]
    assert len(rows) == 5 and all(set(r) == {"id", "token", "prob"} for r in rows)
    probs = [r["prob"] for r in rows]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert data["prompt"]["token_ids"] == HELLO_I_AM
    assert data["prompt"]["weights"].startswith("random") and data["prompt"]["dtype"] == "float32"


def test_next_tokens_from_a_checkpoint_match_transformers(hf_checkpoint):
    data = run_json("--weights", hf_checkpoint, "--prompt", "Hello, I am", "--top", "3")
    assert [r["id"] for r in data["next_tokens"]] == json.loads((hf_checkpoint / "expected-top.json").read_text())
    assert data["prompt"]["weights"] == str(hf_checkpoint)


def test_next_tokens_table(tiny_config_file):
    config = tiny_config_file()
    result = run("--config", config, "--prompt", "Hi\n", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("Next token after 'Hi\\n' (2 tokens"))
    table = lines[title + 1:]
    assert table[0].split() == ["#", "id", "token", "prob"]
    assert len(table) == 2 + 10  # header, rule, the default top 10
    assert "random weights" in result.stderr  # load_model's note, on stderr
    # Same seed, same prediction.
    again = run("--config", config, "--prompt", "Hi\n", "--device", "cpu")
    assert again.stdout == result.stdout


# ------------------------------------------------------------------ bad input


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "nope.safetensors"}
    files["garbage"] = tmp_path / "garbage.safetensors"
    files["garbage"].write_bytes(b"\xff" * 64)  # a header length far beyond the file
    files["tiny"] = tmp_path / "tiny.safetensors"
    files["tiny"].write_bytes(b"abc")
    files["text"] = tmp_path / "text.safetensors"
    files["text"].write_bytes(struct.pack("<Q", 9) + b"not json!")
    files["truncated"] = tmp_path / "truncated.safetensors"
    header = json.dumps({"wte.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}}).encode()
    files["truncated"].write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    files["unknown"] = tmp_path / "bert.safetensors"
    header = json.dumps({"bert.pooler.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    files["unknown"].write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    files["pickle"] = tmp_path / "pytorch_model.bin"
    files["pickle"].write_bytes(b"\x80\x04")
    return files


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing", "no such file"),
        ("garbage", "not a safetensors file"),
        ("tiny", "not a safetensors file"),
        ("text", "not valid JSON"),
        ("truncated", "truncated file"),
        ("unknown", "unrecognised checkpoint layout"),
        ("pickle", "pickled checkpoints are refused"),
    ],
)
def test_bad_checkpoint_is_one_line_and_exit_2(tmp_path, kind, message):
    result = run("--weights", _bad_files(tmp_path)[kind])
    _assert_one_line_error(result, message)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--size", "huge"], "unknown size 'huge'"),
        (["--depth", "-1"], "--depth must be 0 or more, got -1"),
        (["--prompt", "hi", "--top", "0"], "--top must be 1 or more"),
        (["--size", "xl", "--config", "x.yaml"], "mutually exclusive"),
        (["--config", "/nonexistent/c.yaml"], "config file not found"),
        (["--prompt", "", "--size", "small"], "--prompt is empty"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args, message):
    _assert_one_line_error(run(*args), message)


def _assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


# ------------------------------------------------------------------ no torch


def test_inspect_without_prompt_never_imports_torch(sparse_xl):
    path, _ = sparse_xl
    for args in (["inspect", "--size", "xl"], ["inspect", "--weights", str(path), "--json"]):
        stdout, modules = imported_modules(*args)
        assert "1,557,611,200" in stdout or '"layout": "huggingface"' in stdout
        assert "gptcli.inspection" in modules
        assert "torch" not in modules, args


# ------------------------------------------------------------------ a training run's folder


def test_a_run_folder_shows_its_own_architecture_tokenizer_steps_and_best_loss(tmp_path):
    """A run's weights (Hugging Face layout, zero qkv biases, n_heads not a GPT-2 size): the architecture
    row agrees with the header line, and the run's tokenizer, steps and best validation loss are shown."""
    import torch

    from gptcli.config import GPTConfig
    from gptcli.export import save_pretrained
    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import CharTokenizer

    cfg = GPTConfig(vocab_size=12, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0,
                    qkv_bias=False, tie_weights=True, name="run")
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    save_pretrained(GPTModel(cfg), run_dir, CharTokenizer("abcdefghijkl"))
    events = [{"event": "start", "step": 0}, {"event": "eval", "step": 0, "val_loss": 2.5},
              {"event": "eval", "step": 5, "val_loss": 2.25}, {"event": "checkpoint", "step": 5},
              {"event": "eval", "step": 10, "val_loss": 2.375}, {"event": "checkpoint", "step": 10}]
    (run_dir / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    result = run("--weights", str(run_dir))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "n_heads 2, context 16, vocab 12, qkv_bias False" in out
    assert "n_heads ?" not in out and "qkv_bias True" not in out
    assert re.search(r"architecture \(from metadata\)\s+emb_dim 32, n_layers 1, n_heads 2", out)
    assert re.search(r"tokenizer\s+char \(12 characters\)", out)
    assert re.search(r"training run\s+11 steps trained, best validation loss 2\.250", out)
    c = run_json("--weights", str(run_dir))["checkpoint"]
    assert c["run"] == {"folder": str(run_dir), "steps": 11, "best_val_loss": 2.25}
    assert c["tokenizer"] == "char (12 characters)" and c["architecture"]["qkv_bias"] is False


@pytest.mark.parametrize("args", [["--top", "3"], ["--details"], ["--top", "3", "--details"]])
def test_top_and_details_without_prompt_are_refused(args):
    result = run("--size", "small", *args)
    _assert_one_line_error(result, "only apply" if len(args) == 3 else "only applies")
    assert "with --prompt TEXT" in result.stderr


def test_a_huge_seed_is_one_line():
    _assert_one_line_error(run("--size", "small", "--prompt", "hi", "--seed", str(2**64)),
                           "--seed must be at most 2**64 - 1")
