"""The model itself: the book's seeded result, its building blocks, and the KV cache."""

import math

import pytest
import torch

from gptcli.config import load_config_file, shipped_config
from gptcli.model.kv_cache import KVCache
from gptcli.model.gpt import GELU, GPTModel, LayerNorm, build_model
from helpers import generate_text_simple

HELLO_I_AM = [15496, 11, 314, 716]
BOOK_CONTINUATION = [27018, 24086, 47843, 30961, 42348, 7267]  # " Featureiman Byeswickattribute argue"


def test_book_seed_123_reproduces_featureiman():
    cfg = shipped_config("book")
    torch.manual_seed(123)
    model = GPTModel(cfg).eval()
    out = generate_text_simple(model, torch.tensor([HELLO_I_AM]), 6, cfg.context_length)
    assert out[0, 4:].tolist() == BOOK_CONTINUATION


def test_layernorm_uses_biased_variance_and_eps_1e5():
    x = torch.randn(3, 7, 10)
    ln = LayerNorm(10)
    with torch.no_grad():
        ln.scale.uniform_()
        ln.shift.uniform_()
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * ln.scale + ln.shift
    torch.testing.assert_close(ln(x), expected)


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-5, 5, 101)
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(GELU()(x), expected)


def test_tied_head_shares_the_embedding(tiny_config_file):
    model = GPTModel(load_config_file(tiny_config_file(tie_weights=True)))
    assert model.out_head.weight is model.tok_emb.weight
    untied = GPTModel(load_config_file(tiny_config_file(tie_weights=False)))
    assert untied.out_head.weight is not untied.tok_emb.weight


def test_meta_build_allocates_nothing():
    model = build_model(shipped_config("1558M"))
    assert all(p.is_meta for p in model.parameters())


def test_output_shape(tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=97))
    model = GPTModel(cfg).eval()
    assert model(torch.randint(0, 97, (2, 5))).shape == (2, 5, 97)


def test_longer_than_context_is_refused(tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=97, context_length=8))
    with pytest.raises(ValueError, match="exceeds context_length"):
        GPTModel(cfg)(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_cached_forward_equals_full_forward(tiny_config_file, qkv_bias):
    cfg = load_config_file(tiny_config_file(vocab_size=97, context_length=16, qkv_bias=qkv_bias))
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(cfg, batch_size=2, max_len=16, device="cpu", dtype=torch.float32)
        pieces = [model(ids[:, :5], cache)]  # prefill
        pieces.append(model(ids[:, 5:8], cache))  # several new tokens after a prefix
        for t in range(8, 12):  # one at a time
            pieces.append(model(ids[:, t : t + 1], cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_static_step_equals_dynamic_cache(tiny_config_file):
    """The compile-friendly path (write at input_pos, attend over the whole masked cache) gives the same logits."""
    cfg = load_config_file(tiny_config_file(vocab_size=97, context_length=16))
    torch.manual_seed(1)
    model = GPTModel(cfg).eval()
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(cfg, batch_size=1, max_len=16, device="cpu", dtype=torch.float32)
        pieces = [model(ids[:, :4], cache)]
        for t in range(4, 10):
            pieces.append(model(ids[:, t : t + 1], cache, input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_equal_unpadded_rows(tiny_config_file):
    """Padding changes nothing for the real tokens: prefill and cached steps, row by row."""
    cfg = load_config_file(tiny_config_file(vocab_size=97, context_length=16))
    torch.manual_seed(2)
    model = GPTModel(cfg).eval()
    rows = [torch.randint(0, 97, (n,)) for n in (6, 3, 5)]
    longest = max(len(r) for r in rows)
    pad = torch.tensor([longest - len(r) for r in rows])
    batch = torch.stack([torch.cat([torch.zeros(longest - len(r), dtype=torch.long), r]) for r in rows])  # (3, 6)
    steps = torch.randint(0, 97, (3, 4))
    with torch.no_grad():
        cache = KVCache.empty(cfg, batch_size=3, max_len=16, device="cpu", dtype=torch.float32)
        out = [model(batch, cache, pad=pad)[:, -1]]
        for t in range(4):
            out.append(model(steps[:, t : t + 1], cache, pad=pad)[:, -1])
        batched = torch.stack(out, dim=1)  # (3, 5, V)
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, steps[i]])[None])[0, len(r) - 1 :]  # (5, V)
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()
