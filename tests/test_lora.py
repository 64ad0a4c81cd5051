"""LoRA (the book's appendix E): the layers' maths and init, training only the adapters (every base
weight bit for bit as it was), the run saving the adapters alone, --weights RUN loading base plus
adapters, and gptcli export merging them for transformers (the oracle), to 1e-4. Bad ranks."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from helpers import hf_tiny_gpt2

runner = CliRunner()
WORDS = "the a of and to in is was he she it they said time over under house river light dark old new".split()


def make_text(n_words: int = 1500, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_lora_layer_is_the_books():
    """A (in, rank) drawn as the book draws it, B zeros, forward linear(x) + alpha * (x @ A @ B); the
    fused W_qkv's adapter is three of the book's, one per third of the outputs."""
    from gptcli.model.lora import LinearWithLoRA

    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    torch.manual_seed(1)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=3.0)
    torch.manual_seed(1)
    book_a = torch.empty(8, 2)
    torch.nn.init.kaiming_uniform_(book_a, a=math.sqrt(5))
    assert torch.equal(wrapped.lora.A[0], book_a) and not wrapped.lora.B.any()
    x = torch.randn(4, 8)
    assert torch.equal(wrapped(x), linear(x))  # a new adapter changes nothing
    with torch.no_grad():
        wrapped.lora.B.normal_()
    expected = linear(x) + 3.0 * (x @ wrapped.lora.A[0] @ wrapped.lora.B[0])
    assert torch.allclose(wrapped(x), expected, atol=1e-6)

    fused = LinearWithLoRA(torch.nn.Linear(8, 9), rank=2, alpha=0.5, parts=3)
    with torch.no_grad():
        fused.lora.B.normal_()
    thirds = [0.5 * (x @ fused.lora.A[i] @ fused.lora.B[i]) for i in range(3)]
    assert torch.allclose(fused(x), fused.linear(x) + torch.cat(thirds, dim=-1), atol=1e-6)
    merged = fused.linear.weight + fused.lora.delta()
    assert torch.allclose(x @ merged.t() + fused.linear.bias, fused(x), atol=1e-5)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny transformers GPT-2 (the base), fine-tuned on text with --lora 4."""
    tmp = tmp_path_factory.mktemp("lora")
    base = tmp / "base"
    hf_tiny_gpt2(base, jitter=0.02)
    text = tmp / "t.txt"
    text.write_text(make_text())
    out = tmp / "run"
    result = invoke("train", str(text), "--weights", str(base), "--lora", "4", "--lora-alpha", "2", "--max-steps", "12",
                    "--batch-size", "4", "--lr", "1e-2", "--eval-every", "4", "--eval-batches", "1", "--sample-every",
                    "0", "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    return base, out, [json.loads(line) for line in result.stdout.splitlines()]


def test_only_the_adapters_train_and_the_run_saves_them_alone(lora_run):
    from safetensors.torch import load_file

    from gptcli.weights import load_model

    base, out, evs = lora_run
    start = evs[0]
    # 2 layers x (qkv: 3 x 4 x (32 + 32), out_proj 4 x 64, fc 4 x 160, proj 4 x 160)
    assert start["trainable_params"] == 2 * (3 * 4 * 64 + 4 * 64 + 4 * 160 + 4 * 160)
    original = load_model(size=None, config=None, weights=str(base), device=torch.device("cpu"),
                          dtype=torch.float32).model.state_dict()
    state = {k[len("model."):]: v for k, v in load_file(out / "state.safetensors").items() if k.startswith("model.")}
    base_names = [k for k in state if ".lora." not in k]
    assert len(base_names) == len([k for k in original if k != "out_head.weight"])
    for name in base_names:  # every base weight, bit for bit
        assert torch.equal(state[name], original[name.replace(".linear.", ".")]), name
    adapters = load_file(out / "adapters.safetensors")
    assert set(adapters) == {k for k in state if ".lora." in k}
    assert any(t.any() for n, t in adapters.items() if n.endswith(".B"))  # they did train
    assert not (out / "model.safetensors").exists()
    assert (out / "adapters.safetensors").stat().st_size < 0.1 * (out / "state.safetensors").stat().st_size
    with __import__("safetensors").safe_open(str(out / "adapters.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["gptcli.lora"]) == {"rank": 4, "alpha": 2.0}
    assert json.loads(meta["gptcli.base"])["weights"] == str(base.resolve())


def _adapted_logits(base: Path, out: Path, ids: torch.Tensor) -> torch.Tensor:
    """Base plus adapters, unmerged: the wrapped model as it trained."""
    from gptcli.adapters import attach_adapters, read_weights_file
    from gptcli.weights import load_model

    model = load_model(size=None, config=None, weights=str(base), device=torch.device("cpu"),
                       dtype=torch.float32).model
    attach_adapters(model, read_weights_file(out / "adapters.safetensors"))
    with torch.no_grad():
        return model(ids)


def test_weights_run_loads_base_plus_adapters(lora_run):
    from gptcli.weights import load_model

    base, out, _ = lora_run
    ids = torch.tensor([[464, 3290, 373, 257, 1468, 286, 262, 1110, 11, 290]])
    loaded = load_model(size=None, config=None, weights=str(out), device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        merged = loaded.model(ids)
    reference = _adapted_logits(base, out, ids)
    plain = load_model(size=None, config=None, weights=str(base), device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(plain.model(ids), reference, atol=1e-3)  # the adapters matter
    assert torch.allclose(merged, reference, atol=1e-4)
    result = invoke("generate", "--weights", str(out), "the river", "-n", "3")
    assert result.exit_code == 0, result.stderr


def test_export_merges_the_adapters_for_transformers(lora_run, tmp_path):
    """transformers loads the export; its logits equal base + adapters to 1e-4, and equal transformers'
    own base with each adapter's W + alpha * (A @ B)^T applied by hand."""
    import transformers
    from safetensors.torch import load_file

    base, out, _ = lora_run
    folder = tmp_path / "exported"
    result = invoke("export", str(out), str(folder))
    assert result.exit_code == 0, result.stderr
    ids = torch.tensor([[464, 3290, 373, 257, 1468, 286, 262, 1110, 11, 290]])
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        exported = hf(ids).logits
    assert torch.allclose(exported, _adapted_logits(base, out, ids), atol=1e-4)

    by_hand = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    adapters = load_file(out / "adapters.safetensors")
    names = {"att.W_qkv": "attn.c_attn", "att.out_proj": "attn.c_proj", "ff.layers.0": "mlp.c_fc",
             "ff.layers.2": "mlp.c_proj"}
    with torch.no_grad():
        for layer in range(2):
            for ours, theirs in names.items():
                a, b = adapters[f"trf_blocks.{layer}.{ours}.lora.A"], adapters[f"trf_blocks.{layer}.{ours}.lora.B"]
                delta = torch.cat([2.0 * (a[i] @ b[i]) for i in range(a.shape[0])], dim=1)  # Conv1D: (in, out)
                by_hand.get_submodule(f"transformer.h.{layer}.{theirs}").weight.add_(delta)
        assert torch.allclose(by_hand(ids).logits, exported, atol=1e-4)


def test_a_lora_classifier_trains_adapters_and_head_only(tmp_path):
    from safetensors.torch import load_file

    from gptcli.classify import classify_texts, load_classifier

    rng = random.Random(0)
    rows = [(" ".join(rng.choice(WORDS[:10] if i % 2 else WORDS[10:]) for _ in range(5)), "ab"[i % 2])
            for i in range(48)]
    data = tmp_path / "d.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    out = tmp_path / "run"
    tiny = ["--weights", "random", "--size", "124M", "--n-layers", "2", "--n-heads", "2", "--emb-dim", "32",
            "--context-length", "16"]
    result = invoke("train", str(data), "--task", "classify", *tiny, "--lora", "4", "--epochs", "2", "--batch-size",
                    "4", "--lr", "1e-2", "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    adapters = load_file(out / "adapters.safetensors")
    assert {"out_head.weight", "out_head.bias"} <= set(adapters)
    assert all(".lora." in n or n.startswith("out_head.") for n in adapters)
    state = {k[len("model."):]: v for k, v in load_file(out / "state.safetensors").items() if k.startswith("model.")}
    from gptcli.config import resolve_config
    from gptcli.weights import random_model

    base = random_model(resolve_config("124M", None).replace(n_layers=2, n_heads=2, emb_dim=32, context_length=16),
                        123).state_dict()
    for name, tensor in state.items():
        if ".lora." not in name and not name.startswith("out_head."):
            assert torch.equal(tensor, base[name.replace(".linear.", ".")]), name
    clf = load_classifier(str(out))
    assert clf.info.labels == ["a", "b"]
    predictions = classify_texts(clf, [rows[0][0], rows[1][0]])
    assert all(p.label in ("a", "b") for p in predictions)
    assert invoke("export", str(out), str(tmp_path / "x")).exit_code == 2  # a classifier is no language model


@pytest.mark.parametrize("args,message", [
    (["--lora", "0"], "--lora RANK must be a whole number of 1 or more"),
    (["--lora", "33"], "the rank must be 1 to the layer width 32"),
    (["--lora", "4", "--trainable", "all", "--task", "classify"], "leave out --trainable"),
])
def test_bad_lora_ranks_are_one_error_line(tmp_path, args, message):
    text = tmp_path / "t.txt"
    text.write_text(make_text(400))
    result = invoke("train", str(text), "--weights", "random", "--config", _tiny_config(tmp_path), "--max-steps", "2",
                    *args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2, result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "run").exists()


def test_lora_needs_weights_to_adapt(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(make_text(400))
    result = invoke("train", str(text), "--config", _tiny_config(tmp_path), "--max-steps", "2", "--lora", "4",
                    "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "--lora adapts existing weights" in result.stderr


def _tiny_config(tmp_path: Path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text("vocab_size: 50257\ncontext_length: 16\nemb_dim: 32\nn_heads: 2\nn_layers: 2\ndrop_rate: 0.0\n"
                    "qkv_bias: true\ntie_weights: true\n")
    return str(path)
