"""transformers' GPT2LMHeadModel as an independent oracle for loading Hugging Face checkpoints.

Tiny random GPT-2s are built and saved by transformers itself (``save_pretrained``, safetensors),
then loaded by gptcli from the folder. Logits must match to 1e-4, and greedy decoding of 40 new
tokens, running past n_positions, must give transformers' ids when transformers' side crops the
context the way the book's ``generate_text_simple`` does. Covered: names with the ``transformer.``
prefix (as GPT2LMHeadModel saves them) and without (as the Hub's GPT-2 releases store them, mask
buffers included), tied and untied heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from gptcli.cli import app  # noqa: E402
from helpers import hf_tiny_gpt2, network_tests_enabled  # noqa: E402
from gptcli.tokenizer import encode  # noqa: E402
from gptcli.weights import HUB_IDS, load_model  # noqa: E402

N_POSITIONS = 32
NEW_TOKENS = 40
PROMPT = "The quick brown fox jumps over the lazy dog, said the"  # 12 tokens: 12 + 40 > 32
CPU = torch.device("cpu")


def hf_model(tie: bool, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4):
    """A tiny random GPT2LMHeadModel whose biases and norms are non-trivial (so a mix-up would show)."""
    # GPT-2's initializer_range 0.02 makes a tiny model repeat one token; 0.2 varies.
    return hf_tiny_gpt2(seed=seed, jitter=0.1, n_positions=N_POSITIONS, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        tie_word_embeddings=tie, attn_implementation="eager", initializer_range=0.2)


def save(model, folder: Path, prefixed: bool) -> Path:
    """``save_pretrained``; without the prefix, rewrite the file the way the Hub's GPT-2 releases look."""
    model.save_pretrained(folder)  # model.safetensors + config.json
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(n.startswith("transformer.") for n in names)
    assert ("lm_head.weight" in names) is (not model.config.tie_word_embeddings)
    if not prefixed:
        from safetensors.torch import load_file, save_file

        state = {n.removeprefix("transformer."): t for n, t in load_file(folder / "model.safetensors").items()}
        mask = torch.ones(N_POSITIONS, N_POSITIONS).tril().view(1, 1, N_POSITIONS, N_POSITIONS)
        for i in range(model.config.n_layer):  # the causal-mask buffers old exports carry
            state[f"h.{i}.attn.bias"] = mask.clone()
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """The book's generate_text_simple, with transformers' model: crop to n_positions, no cache."""
    idx = torch.tensor([ids])
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -N_POSITIONS:], use_cache=False).logits
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(ids):].tolist()


def gptcli_greedy_plain(model, ids: list[int], new_tokens: int) -> list[int]:
    """The same loop over gptcli's model."""
    idx = torch.tensor([ids])
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -model.cfg.context_length:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(ids):].tolist()


def gptcli_greedy_library(model, ids: list[int], new_tokens: int) -> list[int]:
    """gptcli's own decoding (KV cache while the sequence fits, cropped recompute past the window)."""
    from gptcli.decoding.generate import Decoder, Generation, SamplingOptions

    options = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    generation = Generation(Decoder(model, CPU, torch.float32), ids, options, context_length=model.cfg.context_length)
    return list(generation.run().token_ids)


@pytest.mark.parametrize("prefixed", [True, False], ids=["prefixed", "unprefixed"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gptcli_matches_transformers(tmp_path, prefixed, tie):
    reference = hf_model(tie, seed=1 + 2 * prefixed + tie)
    folder = save(reference, tmp_path / "ckpt", prefixed)

    notes: list[str] = []
    loaded = load_model(size=None, config=None, weights=str(folder), device=CPU, dtype=torch.float32,
                        note=notes.append)
    assert notes == []
    cfg = loaded.cfg
    assert (cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.context_length, cfg.vocab_size) == (64, 4, 2, 32, 50257)
    assert cfg.tie_weights is tie and cfg.qkv_bias
    model = loaded.model
    assert (model.out_head.weight is model.tok_emb.weight) is tie

    ids = torch.randint(0, 50257, (2, N_POSITIONS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)

    prompt = encode(PROMPT)
    assert len(prompt) + NEW_TOKENS > N_POSITIONS
    expected = hf_greedy(reference, prompt, NEW_TOKENS)
    assert len(set(expected)) > 10  # a real sequence, not one token repeated
    assert gptcli_greedy_plain(model, prompt, NEW_TOKENS) == expected
    assert gptcli_greedy_library(model, prompt, NEW_TOKENS) == expected

    result = CliRunner().invoke(app, ["generate", PROMPT, "--weights", str(folder), "-n", str(NEW_TOKENS),
                                      "--ignore-eos", "--device", "cpu", "--dtype", "float32", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["prompt_token_ids"] == prompt
    assert data["token_ids"] == expected
    assert data["weights"] == str(folder)


def test_half_precision_checkpoint_matches_transformers_in_float32(tmp_path):
    """A bf16 save loads into float32 and gives the logits of transformers' model upcast from the same numbers."""
    reference = hf_model(tie=True, seed=7).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "bf16")
    reference = reference.float()
    model = load_model(size=None, config=None, weights=str(tmp_path / "bf16"), device=CPU,
                       dtype=torch.float32).model
    ids = torch.randint(0, 50257, (1, N_POSITIONS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids, use_cache=False).logits, rtol=0, atol=1e-4)


# --- the real release, when the Hub is reachable ------------------------------------------------------


@pytest.mark.network
def test_auto_downloads_gpt2_and_matches_transformers(monkeypatch):
    """``--weights auto`` for 124M downloads openai-community/gpt2 (~550 MB) into the (temporary) cache."""
    if not network_tests_enabled():
        pytest.skip("set GPTCLI_NETWORK_TESTS=1 to run tests that reach the Hugging Face Hub")
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    notes: list[str] = []
    loaded = load_model(size="124M", config=None, weights="auto", device=CPU, dtype=torch.float32, note=notes.append)
    assert loaded.source == HUB_IDS["124M"] and loaded.checkpoint is not None
    assert any(n.startswith("downloading openai-community/gpt2") for n in notes)
    reference = transformers.GPT2LMHeadModel.from_pretrained(loaded.checkpoint.parent).eval()
    prompt = encode("Hello, I'm a language model,")
    idx = torch.tensor([prompt])
    for _ in range(10):
        with torch.no_grad():
            idx = torch.cat([idx, reference(idx, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert gptcli_greedy_library(loaded.model, prompt, 10) == idx[0, len(prompt):].tolist()
    # Offline afterwards, auto finds the cached copy without a note.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notes.clear()
    again = load_model(size="124M", config=None, weights="auto", device=CPU, dtype=torch.float32, note=notes.append)
    assert again.source == HUB_IDS["124M"] and notes == []


def test_exact_gelu_checkpoints_load_and_export_both_ways(tmp_path):
    """transformers' ``activation_function: gelu`` (the exact erf GELU of nanoGPT's nn.GELU()) loads as
    ``gelu: erf`` and runs that GELU, not the tanh one; gptcli's export of such a model says ``gelu`` in
    config.json, so transformers runs it the same."""
    from gptcli.export import save_pretrained
    from gptcli.tokenizer import gpt2

    reference = hf_model(tie=True, seed=7)
    reference.config.activation_function = "gelu"
    exact = transformers.GPT2LMHeadModel(reference.config).eval()
    exact.load_state_dict(reference.state_dict())
    folder = save(exact, tmp_path / "exact", prefixed=True)
    assert json.loads((folder / "config.json").read_text())["activation_function"] == "gelu"

    loaded = load_model(size=None, config=None, weights=str(folder), device=CPU, dtype=torch.float32)
    assert loaded.cfg.gelu == "erf"
    ids = torch.randint(0, 50257, (2, N_POSITIONS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs, tanh = loaded.model(ids), exact(ids, use_cache=False).logits, reference(ids, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (theirs - tanh).abs().max() > 1e-3  # the two GELUs differ enough for a mix-up to show

    out = save_pretrained(loaded.model, tmp_path / "export", gpt2())
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu"
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, use_cache=False).logits, theirs, rtol=0, atol=1e-5)
    assert load_model(size=None, config=None, weights=str(out), device=CPU, dtype=torch.float32).cfg.gelu == "erf"
