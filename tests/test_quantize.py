"""int8 and int4 weight-only quantization: the arithmetic of one layer and a whole model's closeness to float."""

import pytest
import torch

from gptcli.config import load_config_file
from gptcli.errors import UserError
from gptcli.model.gpt import GPTModel
from gptcli.kernels.quantize import (
    Int4Linear,
    Int8Linear,
    int4_dequantize,
    int4_group_quantize,
    quantize_int4,
    quantize_int8,
)


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


@pytest.mark.parametrize("scheme,layer_type,max_rel,min_agree", [
    ("int8", Int8Linear, 0.05, 0.9),
    ("int4", Int4Linear, 0.15, 0.75),  # 16 levels a group: looser than int8
])
def test_quantized_model_stays_close_and_replaces_every_linear(tiny_config_file, scheme, layer_type, max_rel,
                                                               min_agree):
    cfg = load_config_file(tiny_config_file(vocab_size=200, emb_dim=64, n_heads=4, tie_weights=True))
    torch.manual_seed(0)
    model = GPTModel(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        reference = model(ids).float()
        if scheme == "int8":
            quantize_int8(model, torch.bfloat16)
        else:
            quantize_int4(model, torch.bfloat16, group_size=32)
        quantized = model(ids).float()
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, layer_type) for m in model.modules()) == 2 * 4 + 1  # qkv, out, 2 MLP a block; head
    assert isinstance(model.out_head, layer_type) and model.out_head.out_features == 200
    assert model.tok_emb.weight.dtype == torch.bfloat16  # the lookup table stays in float
    rel = (quantized - reference).abs().max() / reference.abs().max()
    assert rel < max_rel
    agree = (quantized.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= min_agree


def test_float32_activations_are_refused(tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=50))
    with pytest.raises(UserError, match="needs --dtype bfloat16"):
        quantize_int8(GPTModel(cfg), torch.float32)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_group_quantize_is_within_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(16, 256) * 0.02
    q, sz = int4_group_quantize(w, group_size, torch.bfloat16)
    assert q.dtype == torch.int32 and q.shape == (16, 256) and 0 <= q.min() and q.max() <= 15
    assert sz.shape == (256 // group_size, 16, 2) and sz.dtype == torch.bfloat16
    step = sz[..., 0].float().T.repeat_interleave(group_size, dim=1)  # (N, K): each weight's scale
    # Half a step, and a little more for the zero point's bfloat16 rounding.
    assert ((int4_dequantize(q, sz, group_size) - w).abs() <= step * 0.55).all()
    # Min/max groups: every group spans most of 0..15.
    assert (q.reshape(16, -1, group_size).amax(-1) - q.reshape(16, -1, group_size).amin(-1) >= 14).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_int4_linear_matches_its_dequantized_weights(dtype, cpu_kernel):
    """torch's packed CPU kernel computes x @ W_deq.T for our (q, scale, zero) convention, odd
    out_features (padded to 16 inside) included; so does the plain-nibble path other devices take."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 37)
    layer = Int4Linear.from_linear(linear, dtype, group_size=32, cpu_kernel=cpu_kernel)
    q, sz = int4_group_quantize(linear.weight, 32, dtype)
    dequant = int4_dequantize(q, sz, 32)  # (37, 64)
    x = torch.randn(2, 3, 64).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 37) and y.dtype == dtype
    expected = x.float() @ dequant.T + linear.bias.detach().to(dtype).float()
    torch.testing.assert_close(y.float(), expected, atol=0.02, rtol=0.02)
    # ... and close to the float layer itself.
    torch.testing.assert_close(y.float(), linear(x.float()).detach(), atol=0.1, rtol=0.05)


def test_int4_cpu_kernel_is_exact_with_float32_activations():
    """float32 activations (slow, but exact up to summation order) pin the layout to the last bit."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=False)
    layer = Int4Linear.from_linear(linear, torch.float32, group_size=64)
    q, sz = int4_group_quantize(linear.weight, 64, torch.float32)
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), x @ int4_dequantize(q, sz, 64).T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "emb_dim,group_size,message",
    [
        (64, 48, "group size must be one of 32, 64, 128, 256, got 48"),
        (64, 128, "in_features divisible by the group size 128; got a layer with 64"),
    ],
)
def test_int4_bad_group_size_or_shape_is_refused_and_leaves_the_model_whole(tiny_config_file, emb_dim,
                                                                            group_size, message):
    cfg = load_config_file(tiny_config_file(vocab_size=50, emb_dim=emb_dim))
    model = GPTModel(cfg)
    with pytest.raises(UserError, match=message):
        quantize_int4(model, torch.bfloat16, group_size=group_size)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())


def test_int4_float32_activations_are_refused(tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=50))
    with pytest.raises(UserError, match="--quantize int4 needs --dtype bfloat16"):
        quantize_int4(GPTModel(cfg), torch.float32)
