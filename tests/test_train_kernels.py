"""gptcli.kernels.train: the training kernels compute what the plain torch path computes (their speed is
bench/train.py's business, never a test's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptcli.kernels import train as speed
from gptcli.config import shipped_config
from gptcli.model.gpt import GPTModel

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


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape,block", [((2, 3, 37, 8), 16), ((1, 2, 130, 16), 64), ((1, 1, 20, 4), 256)])
def test_causal_attention_equals_sdpa(shape, block, dropout_p):
    """Output and gradients of scaled_dot_product_attention(is_causal=True), in blocks that divide T,
    do not, and exceed it. With dropout, the same seed draws the same mask as torch's attention and
    leaves the generator in the same state."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
    g = torch.randn(*shape)
    torch.manual_seed(7)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    after_expected = torch.rand(3)
    want = torch.autograd.grad(expected, (q, k, v), g)
    torch.manual_seed(7)
    got = speed.causal_attention(q, k, v, dropout_p, block=block)
    assert torch.equal(torch.rand(3), after_expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(torch.autograd.grad(got, (q, k, v), g), want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_causal_attention_in_bfloat16_is_close_to_float32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 150, 16) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = speed.causal_attention(*(t.bfloat16() for t in (q, k, v)))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact, rtol=0.02, atol=0.02)


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
    cfg = shipped_config("124M").replace(**{"n_layers": 2, "n_heads": 2, "emb_dim": 32, "context_length": 16,
                                            "vocab_size": 97, "drop_rate": 0.0, **overrides})
    torch.manual_seed(0)
    return GPTModel(cfg)


def test_plan_on_this_cpu_and_prepare_sets_the_linear_kernel():
    cpu = torch.device("cpu")
    plan = speed.plan(cpu)
    assert plan.head_loss
    assert plan.linear == ("onednn" if speed.onednn_available() else "torch")
    assert plan.attention
    model = tiny_model()
    names = [name for name, _ in model.named_parameters()]
    speed.prepare(model, plan)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m).__name__ == "TrainLinear" for m in linears)  # swapped from outside
    assert [name for name, _ in model.named_parameters()] == names  # the same parameters, the same names
    assert all((m.train_kernel is not None) == (plan.linear == "onednn") for m in linears)
    assert speed.attention_for(plan) is speed.training_attention
    off = speed.TrainPlan("torch", False, False, False)
    speed.prepare(model, off)
    assert all(m.train_kernel is None for m in linears) and speed.attention_for(off) is None


@pytest.mark.parametrize("context,drop_rate", [(16, 0.0), (160, 0.0), (160, 0.1)])
def test_a_prepared_model_trains_like_the_plain_one(context, drop_rate):
    """Loss through head_loss and every gradient match the plain model's (float rounding only); with
    dropout, from the same seed (the same masks). Context 160 takes causal_attention, 16 torch's."""
    plain = tiny_model(context_length=context, drop_rate=drop_rate).train()
    fast = tiny_model(context_length=context, drop_rate=drop_rate).train()
    plan = speed.plan(torch.device("cpu"))
    speed.prepare(fast, plan)
    x = torch.randint(0, 97, (3, context))
    y = torch.randint(0, 97, (3, context))
    torch.manual_seed(11)
    loss_plain = F.cross_entropy(plain(x).flatten(0, 1), y.flatten())
    torch.manual_seed(11)
    hidden = fast(x, head=False, attention=speed.attention_for(plan))
    assert hidden.shape == (3, context, 32)
    loss_fast = speed.head_loss(hidden.flatten(0, 1), fast.out_head.weight, y.flatten())
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=1e-5)
    loss_plain.backward()
    loss_fast.backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    plain.eval(), fast.eval()
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


def test_compiled_training_matches_eager_dropout_masks_included():
    """--compile: the oneDNN Linear kernel as a custom op in the graph, and dropout drawn from torch's
    generator (Inductor's fallback_random), so a seeded compiled run gives eager's losses."""
    from gptcli import training

    x = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(2))

    def losses(compiled: bool) -> list[float]:
        model = tiny_model(context_length=32, drop_rate=0.2).train()
        plan = speed.plan(torch.device("cpu"))
        speed.prepare(model, plan)
        run = speed.compile_for_training(model) if compiled else model
        torch.manual_seed(5)
        out = []
        for _ in range(3):
            loss = training.batch_loss(run, x, y, device=torch.device("cpu"), dtype="float32", plan=plan,
                                       head_weight=model.out_head.weight)
            loss.backward()
            out.append(loss.item())
        return out

    assert losses(True) == pytest.approx(losses(False), abs=1e-5)


# --- Chosen per CPU by measuring ------------------------------------------------------------------


def _tiny_model() -> GPTModel:
    from gptcli.config import GPTConfig

    cfg = GPTConfig(vocab_size=65, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                    qkv_bias=False, bias=False, tie_weights=True, name="tiny")
    return GPTModel(cfg)


@needs_onednn
def test_the_linear_kernel_is_the_faster_measured_and_measured_once(monkeypatch):
    model = _tiny_model()
    chosen = speed.plan(torch.device("cpu"), model, rows=48)
    assert set(chosen.measured) == {"onednn", "torch"}
    assert chosen.linear == min(speed.LINEAR_KERNELS, key=lambda k: chosen.measured[k])
    assert chosen.to_dict()["measured_ms"] == chosen.measured  # in the start event

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(speed, "_time_linear", no_measuring)
    assert speed.plan(torch.device("cpu"), model, rows=48).measured == chosen.measured  # from the cache
    monkeypatch.setenv("GPTCLI_NO_TUNE", "1")
    off = speed.plan(torch.device("cpu"), model, rows=48)
    assert off.measured is None and off.linear == "onednn"


@pytest.mark.parametrize("bf16_ms, expected", [(10.0, "bfloat16"), (20.0, "float32")])
def test_dtype_auto_takes_bfloat16_only_when_a_block_measured_well_ahead(monkeypatch, bf16_ms, expected):
    monkeypatch.setattr(speed, "measure_linears", lambda shapes, rows: {"onednn": 30.0, "torch": 25.0})
    asked = []

    def block(cfg, batch, linear):
        asked.append((batch, linear))
        return {"float32": 22.0, "bfloat16": bf16_ms}

    monkeypatch.setattr(speed, "measure_block", block)
    dtype, why = speed.choose_dtype(_tiny_model(), 48)
    assert dtype == expected and f"{22.0 / bf16_ms:.2f}x" in why
    assert asked == [(3, "torch")]  # 48 rows of context 16; float32 on the faster measured kernel


def test_a_block_is_measured_once_without_touching_the_global_random_state(monkeypatch):
    cfg = _tiny_model().cfg
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = speed.measure_block(cfg, 3, "torch")
    assert set(first) == {"float32", "bfloat16"} and all(v > 0 for v in first.values())
    assert torch.equal(torch.get_rng_state(), state)  # the run's init draws next, as without measuring

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(speed, "_time_block", no_measuring)
    assert speed.measure_block(cfg, 3, "torch") == first  # from the cache
    monkeypatch.setenv("GPTCLI_NO_TUNE", "1")
    assert speed.measure_block(cfg, 3, "torch") is None
    assert speed.choose_dtype(_tiny_model(), 48) == ("float32", "not measured (tuning is off)")


def test_short_bfloat16_contexts_attend_in_float32_under_autocast():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 16, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = speed.attention_kernel(q, k, v, 0.0)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
