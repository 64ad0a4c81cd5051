"""int8 weight-only quantization: the arithmetic of one layer and a whole model's closeness to float."""

import pytest
import torch

from gptcli.config import load_config_file
from gptcli.errors import UserError
from gptcli.model import GPTModel
from gptcli.quantize import Int8Linear, quantize_int8


def test_int8_linear_matches_dequantized_float():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(linear, torch.bfloat16)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 64) and q.scales.shape == (48,)
    assert q.weight.abs().max() <= 127
    # Per output channel: each row's largest weight maps to +-127 (give or take the scale's rounding).
    assert (q.weight.abs().amax(dim=1) >= 126).all()
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    dequant = q.weight.float() * q.scales.float()[:, None]
    expected = x.float() @ dequant.T + linear.bias.detach()
    torch.testing.assert_close(q(x).float(), expected, atol=0.05, rtol=0.02)
    # ... and the quantization error itself is at most half a step per weight.
    step = q.scales.float()[:, None]
    assert ((dequant - linear.weight.detach()).abs() <= step * 0.51).all()


def test_quantized_model_stays_close_and_replaces_every_linear(tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=200, emb_dim=64, n_heads=4, tie_weights=True))
    torch.manual_seed(0)
    model = GPTModel(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        reference = model(ids).float()
        quantize_int8(model, torch.bfloat16)
        quantized = model(ids).float()
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.out_head, Int8Linear)
    assert model.tok_emb.weight.dtype == torch.bfloat16  # the lookup table stays in float
    rel = (quantized - reference).abs().max() / reference.abs().max()
    assert rel < 0.05
    agree = (quantized.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= 0.9


def test_float32_activations_are_refused(tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=50))
    with pytest.raises(UserError, match="needs --dtype bfloat16"):
        quantize_int8(GPTModel(cfg), torch.float32)
