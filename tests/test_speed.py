"""gptcli.speed: the training kernels compute what the plain torch path computes (their speed is
bench/train.py's business, never a test's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptcli import speed
from gptcli.config import shipped_config
from gptcli.model import GPTModel, Linear

needs_onednn = pytest.mark.skipif(not speed.onednn_available(), reason="this torch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_and_its_gradients(bias):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    g = torch.randn(3, 7, 40)
    inputs = [x, w] + ([b] if bias else [])
    expected = F.linear(x, w, b)
    want = torch.autograd.grad(expected, inputs, g)
    got = speed.onednn_linear(x, w, b)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(torch.autograd.grad(got, inputs, g), want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=needs_onednn)])
@pytest.mark.parametrize("chunk", [5, 64, 1000])
def test_head_loss_equals_cross_entropy_of_the_logits(onednn, chunk):
    """Value and both gradients, in chunks that divide the rows, do not, and exceed them."""
    torch.manual_seed(1)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    y = torch.randint(0, 101, (37,))
    expected = F.cross_entropy(x @ w.t(), y)
    want = torch.autograd.grad(expected * 3.0, (x, w))
    got = speed.head_loss(x, w, y, chunk=chunk, onednn=onednn)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(torch.autograd.grad(got * 3.0, (x, w)), want, strict=True):  # a scaled loss (accumulation)
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_head_loss_in_bfloat16_is_close_to_float32():
    torch.manual_seed(2)
    x = torch.randn(20, 32, requires_grad=True)
    w = (torch.randn(50, 32) * 0.3).requires_grad_()
    y = torch.randint(0, 50, (20,))
    exact = F.cross_entropy(x @ w.t(), y)
    got = speed.head_loss(x, w, y, dtype=torch.bfloat16)
    assert abs(got.item() - exact.item()) < 0.02 * exact.item()
    got.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def tiny_model(**overrides) -> GPTModel:
    cfg = shipped_config("124M").replace(n_layers=2, n_heads=2, emb_dim=32, context_length=16, vocab_size=97,
                                         drop_rate=0.0, **overrides)
    torch.manual_seed(0)
    return GPTModel(cfg)


def test_plan_on_this_cpu_and_prepare_sets_the_linear_kernel():
    cpu = torch.device("cpu")
    plan = speed.plan(cpu)
    assert plan.head_loss
    assert plan.linear == ("onednn" if speed.onednn_available() else "torch")
    model = tiny_model()
    speed.prepare(model, plan)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all((m.train_kernel is not None) == (plan.linear == "onednn") for m in linears)
    speed.prepare(model, speed.Plan("torch", False, False))
    assert all(m.train_kernel is None for m in linears)


def test_a_prepared_model_trains_like_the_plain_one():
    """Logits, loss through head_loss and every gradient match the plain model's (float rounding only)."""
    plain, fast = tiny_model(), tiny_model()
    speed.prepare(fast, speed.plan(torch.device("cpu")))
    x = torch.randint(0, 97, (3, 16))
    y = torch.randint(0, 97, (3, 16))
    loss_plain = F.cross_entropy(plain(x).flatten(0, 1), y.flatten())
    hidden = fast(x, head=False)
    assert hidden.shape == (3, 16, 32)
    loss_fast = speed.head_loss(hidden.flatten(0, 1), fast.out_head.weight, y.flatten())
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=1e-5)
    loss_plain.backward()
    loss_fast.backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # inference keeps its own route
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_fused_adamw_is_found_where_torch_has_it():
    """torch has a fused AdamW for the CPU from 2.4 on."""
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    assert speed.fused_adamw_available(torch.device("cpu")) == ((major, minor) >= (2, 4))


def test_bfloat16_training_tracks_float32(tmp_path):
    """--dtype bfloat16 (autocast, float32 weights and AdamW state) runs whole, evaluations included,
    and its losses stay within a few percent of float32's."""
    import json

    from typer.testing import CliRunner

    from gptcli.cli import app
    from test_train import make_text, no_key_bias_config

    text = tmp_path / "t.txt"
    text.write_text(make_text(3000, seed=3))
    common = [str(text), "--config", str(no_key_bias_config(tmp_path)), "--tokenizer", "char", "--max-steps", "60",
              "--batch-size", "8", "--sampling", "random", "--lr", "3e-3", "--eval-every", "20", "--eval-batches",
              "4", "--sample-every", "30", "--sample-tokens", "5", "--sample-prompt", "The", "--json"]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        result = CliRunner().invoke(app, ["train", *common, "--dtype", dtype, "--out", str(tmp_path / dtype)])
        assert result.exit_code == 0, result.stderr
        evs = [json.loads(line) for line in result.stdout.splitlines()]
        assert evs[0]["settings"]["dtype"] == dtype
        losses[dtype] = [e["val_loss"] for e in evs if e["event"] == "eval"]
    assert len(losses["float32"]) == 4 and losses["float32"][-1] < losses["float32"][0] - 0.5
    for a, b in zip(losses["float32"], losses["bfloat16"], strict=True):
        assert abs(a - b) < 0.03 * a, (losses["float32"], losses["bfloat16"])
