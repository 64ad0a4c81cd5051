"""Training kernels, beside the model: what the training loop selects at run time.

``gptcli.model.gpt`` reads like the book; this module makes its training steps faster without changing
their maths. ``plan(device)`` says what the machine supports, ``prepare(model, plan)`` applies it:

- **oneDNN matmuls for float32 Linear layers on the CPU.** torch's float32 ``F.linear`` on the CPU
  calls MKL, whose sgemm on a CPU that is not Intel's runs at about half the speed of oneDNN's (on
  this project's AMD EPYC: ~100 against ~210 GFLOP/s a core). ``OneDNNLinear`` does the forward and
  both backward matmuls through oneDNN (``torch.ops.mkldnn._linear_pointwise``). bfloat16 autocast
  needs nothing: torch already sends bfloat16 matmuls to oneDNN.
- **The output head and its cross-entropy in one function** (``head_loss``): the logits of a chunk
  of rows are computed, turned into their gradient in place (softmax minus one-hot, over the number
  of rows) and multiplied out at once, so the whole (rows, vocab) float32 logits, their log-softmax
  and their gradient never exist: one chunk's buffer instead of three or four of the batch's.
- **Causal attention in blocks** (``causal_attention``, from ATTENTION_MIN_T tokens on): blocks of
  query rows against the keys up to the block, so the masked triangle is mostly skipped, and the
  weights recomputed in backward rather than stored; dropout draws the mask torch's attention would.
- **Fused AdamW** (``torch.optim.AdamW(fused=True)``, one pass over each tensor) on the CPU as on
  GPUs, where this torch has it.
- **Freed memory kept for the next step** (``gptcli.kernels.allocator``): glibc's malloc settings
  that stop each step from faulting its activations' pages in again.

``prepare`` swaps the model's ``nn.Linear`` layers for ``TrainLinear`` (same parameters), and the
training loop passes ``training_attention`` to the model (``GPTModel.forward(attention=...)``); both
act only with gradients on (training), never in evaluation or generation. Off the CPU, without
oneDNN or with an older torch the plain torch path is used; the results are the same up to float
rounding (the book's chapter-5 figures are unchanged). ``bench/train.py`` measures every part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from gptcli.config import GPTConfig
    from gptcli.model.gpt import GPTModel

# Rows of logits that head_loss computes at once: 1024 x 50257 float32 is 206 MB. Smaller chunks
# add a pass over the (vocab, emb) weight gradient each; 1024 was the fastest of 512-2048 here.
HEAD_CHUNK_ROWS = 1024


def onednn_available() -> bool:
    from gptcli.kernels import onednn

    return onednn.AVAILABLE


def _onednn_linear(a: "torch.Tensor", b: "torch.Tensor", bias: "torch.Tensor | None" = None) -> "torch.Tensor":
    """a @ b.T (+ bias) through oneDNN: a (..., k), b (n, k) -> (..., n). Strided (transposed) inputs
    are fine. Under torch.compile it is an opaque custom op (Inductor cannot lower oneDNN's linear in
    a training graph), called as an external kernel."""
    import torch

    if torch.compiler.is_compiling():
        return torch.ops.gptcli.onednn_linear(a, b, bias)  # registered by prepare(), before any tracing
    from gptcli.kernels import onednn

    return onednn.linear_pointwise(a, b, bias)


def _onednn_mm_t(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    return _onednn_linear(a, b)


def _torch_mm_t(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    return a @ b.t()


_FUNCTIONS: dict[str, type] = {}


def _functions() -> dict[str, type]:
    """The autograd Functions, defined on first use so that importing this module needs no torch."""
    if not _FUNCTIONS:
        _FUNCTIONS.update(OneDNNLinear=_define_onednn_linear(), HeadLoss=_define_head_loss(),
                          CausalAttention=_define_causal_attention(), TrainLinear=_define_train_linear())
    return _FUNCTIONS


def _define_train_linear() -> type:
    """TrainLinear: the model's Linear layers in training (``prepare`` swaps them in)."""
    import torch

    from gptcli.kernels.onednn import InferenceLinear

    class TrainLinear(InferenceLinear):
        """nn.Linear (same parameters and state_dict) whose float32 training matmuls go through
        ``train_kernel`` (x, weight, bias) when set; inference as ``InferenceLinear``."""

        train_kernel = None

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            if (self.train_kernel is not None and torch.is_grad_enabled() and x.dtype == torch.float32
                    and not torch.is_autocast_enabled(x.device.type)):
                return self.train_kernel(x, self.weight, self.bias)
            return super().forward(x)

    return TrainLinear


def _define_onednn_linear() -> type:
    """The custom op a compiled graph calls, and OneDNNLinear over it."""
    import torch

    @torch.library.custom_op("gptcli::onednn_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    def onednn_linear_op(x, weight, bias):
        from gptcli.kernels import onednn

        return onednn.linear_pointwise(x, weight, bias)

    @onednn_linear_op.register_fake
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    class OneDNNLinear(torch.autograd.Function):
        """y = x W^T + b with every matmul (forward, input and weight gradients) in oneDNN."""

        @staticmethod
        def forward(ctx, x, weight, bias):
            x = x.contiguous()
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
            return _onednn_linear(x, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            grad = grad.contiguous()
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = _onednn_mm_t(grad, weight.t())  # (..., in)
            rows = grad.reshape(-1, grad.shape[-1])  # (N, out)
            if ctx.needs_input_grad[1]:
                grad_w = _onednn_mm_t(rows.t(), x.reshape(-1, x.shape[-1]).t())  # (out, in)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = rows.sum(0)
            return grad_x, grad_w, grad_b

    return OneDNNLinear


def _define_head_loss() -> type:
    import torch

    class HeadLoss(torch.autograd.Function):
        """Mean cross-entropy of the logits x W^T against targets; the gradients are computed in the
        forward pass, a chunk of rows at a time, and only scaled in backward."""

        @staticmethod
        def forward(ctx, x, weight, targets, chunk, onednn, dtype):
            mm_t = _onednn_mm_t if onednn else _torch_mm_t
            n = x.shape[0]
            w = weight.to(dtype)  # the matmul dtype: float32, or bfloat16 as autocast would use
            grad_x = torch.empty(x.shape, dtype=dtype, device=x.device)
            grad_w = None
            total = torch.zeros((), dtype=torch.float64, device=x.device)
            for start in range(0, n, chunk):
                xs, ys = x[start : start + chunk].to(dtype), targets[start : start + chunk, None]  # (c, d), (c, 1)
                logits = mm_t(xs, w).float()  # (c, V)
                picked = logits.gather(1, ys)  # (c, 1)
                top = logits.amax(dim=1, keepdim=True)  # (c, 1)
                probs = logits.sub_(top).exp_()  # unnormalised softmax, in the logits' buffer
                sums = probs.sum(dim=1, keepdim=True)  # (c, 1)
                total += (sums.log() + top - picked).sum(dtype=torch.float64)  # log-sum-exp - target logit
                # d(mean loss)/d(logits) = (softmax - one_hot) / n
                grad = probs.mul_(1.0 / (sums * n))
                grad.scatter_add_(1, ys, torch.full(ys.shape, -1.0 / n, dtype=grad.dtype, device=grad.device))
                grad = grad.to(dtype)
                grad_x[start : start + chunk] = mm_t(grad, w.t())  # (c, d)
                if ctx.needs_input_grad[1]:
                    part = mm_t(grad.t(), xs.t()).float()  # (V, d)
                    grad_w = part if grad_w is None else grad_w.add_(part)
            ctx.save_for_backward(grad_x, grad_w)
            return (total / n).float()

        @staticmethod
        def backward(ctx, grad_loss):
            grad_x, grad_w = ctx.saved_tensors
            if grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:  # scale in place (used once)
                grad_x.mul_(grad_loss)
                if grad_w is not None:
                    grad_w.mul_(grad_loss)
            return grad_x, grad_w, None, None, None, None

    return HeadLoss


def _define_causal_attention() -> type:
    import torch

    class CausalAttention(torch.autograd.Function):
        """softmax(q k^T / sqrt(hs) + causal mask) v, with dropout on the attention weights, for training.

        Blocks of query rows at a time, each against the keys up to its last row, so the masked upper
        triangle is mostly never computed; the weights are recomputed in backward from the saved
        log-sum-exp of each row (as flash attention does), so memory stays O(T) per row.

        Dropout draws one mask for the whole (B, nh, T, T) weights with ``bernoulli_``, as the
        unfused attention of ``F.scaled_dot_product_attention`` (and the book's ``nn.Dropout``)
        does: the same seed gives the same mask.
        """

        @staticmethod
        def forward(ctx, q, k, v, dropout_p, block):
            B, H, T, hs = q.shape
            dt = q.dtype
            q3 = (q * (1.0 / math.sqrt(hs))).reshape(B * H, T, hs)  # scaled once, not each score
            k3, v3 = k.reshape(B * H, T, hs), v.reshape(B * H, T, hs)  # (BH, T, hs)
            keep = None
            if dropout_p > 0:
                noise = torch.empty((B, H, T, T), dtype=dt, device=q.device).bernoulli_(1 - dropout_p)
                keep = noise.view(B * H, T, T).bool()
                del noise
            out = torch.empty(B * H, T, hs, dtype=dt, device=q.device)
            lse = torch.empty(B * H, T, dtype=_accumulate(dt), device=q.device)
            for i0 in range(0, T, block):
                i1 = min(T, i0 + block)
                p, rows_lse = _block_weights(q3, k3, i0, i1)  # (BH, b, i1) unnormalised, (BH, b)
                total = p.sum(dim=-1, keepdim=True)  # (BH, b, 1)
                lse[:, i0:i1] = rows_lse + total.squeeze(-1).log()
                if keep is not None:
                    p.mul_(keep[:, i0:i1, :i1])
                    total = total * (1 - dropout_p)
                o = torch.bmm(p.to(dt), v3[:, :i1])  # (BH, b, hs)
                out[:, i0:i1] = (o.to(total.dtype) / total).to(dt)
            ctx.save_for_backward(q3, k3, v3, out, lse, keep)
            ctx.dims, ctx.dropout_p, ctx.block = (B, H, T, hs), dropout_p, block
            return out.view(B, H, T, hs)

        @staticmethod
        def backward(ctx, grad):
            q3, k3, v3, out, lse, keep = ctx.saved_tensors
            B, H, T, hs = ctx.dims
            dt, scale, block, dropout_p = q3.dtype, 1.0 / math.sqrt(hs), ctx.block, ctx.dropout_p  # q3 is scaled
            g3 = grad.reshape(B * H, T, hs)
            acc = _accumulate(dt)
            row_dot = (g3.to(acc) * out.to(acc)).sum(dim=-1)  # (BH, T): rowsum(dP * P) = dO . O
            dq = torch.empty(B * H, T, hs, dtype=dt, device=q3.device)
            dk = torch.zeros(B * H, T, hs, dtype=_accumulate(dt), device=q3.device)
            dv = torch.zeros(B * H, T, hs, dtype=_accumulate(dt), device=q3.device)
            for i0 in range(0, T, block):
                i1 = min(T, i0 + block)
                p, _ = _block_weights(q3, k3, i0, i1, lse[:, i0:i1])  # normalised weights (BH, b, i1)
                go = g3[:, i0:i1]  # (BH, b, hs)
                dp = torch.bmm(go, v3[:, :i1].transpose(1, 2)).to(acc)  # (BH, b, i1)
                if keep is not None:
                    kept = keep[:, i0:i1, :i1]
                    dv[:, :i1] += torch.bmm((p * kept).to(dt).transpose(1, 2), go).to(acc) / (1 - dropout_p)
                    dp.mul_(kept).div_(1 - dropout_p)
                else:
                    dv[:, :i1] += torch.bmm(p.to(dt).transpose(1, 2), go).to(acc)
                ds = p.mul_(dp.sub_(row_dot[:, i0:i1, None])).to(dt)  # d(loss)/d(scores) (BH, b, i1)
                dq[:, i0:i1] = torch.bmm(ds, k3[:, :i1]).mul_(scale)
                dk[:, :i1] += torch.bmm(ds.transpose(1, 2), q3[:, i0:i1]).to(acc)  # q3 carries the scale
            shape = (B, H, T, hs)
            return dq.view(shape), dk.to(dt).view(shape), dv.to(dt).view(shape), None, None

    return CausalAttention


def _accumulate(dtype: "torch.dtype") -> "torch.dtype":
    """float32 for the softmax and the sums of lower-precision attention; float64 stays float64."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_weights(q3, k3, i0: int, i1: int, lse=None):
    """Attention weights of (scaled) query rows [i0, i1) over keys [0, i1), float32, causal-masked:
    unnormalised (exp(s - row max), and the row max) or, given the rows' log-sum-exp, normalised."""
    import torch

    s = torch.bmm(q3[:, i0:i1], k3[:, :i1].transpose(1, 2)).to(_accumulate(q3.dtype))  # (BH, b, i1)
    diagonal = s[:, :, i0:i1]  # query i0+r may see keys up to i0+r
    diagonal.masked_fill_(torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=s.device).triu_(1), float("-inf"))
    if lse is not None:
        return s.sub_(lse[:, :, None]).exp_(), lse
    top = s.amax(dim=-1, keepdim=True)  # (BH, b, 1)
    return s.sub_(top).exp_(), top.squeeze(-1)


def onednn_linear(x: "torch.Tensor", weight: "torch.Tensor", bias: "torch.Tensor | None") -> "torch.Tensor":
    """F.linear(x, weight, bias) with oneDNN doing the forward and backward matmuls (CPU, float32)."""
    return _functions()["OneDNNLinear"].apply(x, weight, bias)


# Query rows per block of causal_attention (see CausalAttention): 64 was the fastest of 32-256 here
# for context 256 and 1024, float32 and bfloat16. Below ATTENTION_MIN_T tokens torch's fused kernel
# is faster (context 64: 1.4 against 2.5 ms a layer, forward and backward).
ATTENTION_BLOCK = 64
ATTENTION_MIN_T = 128


def causal_attention(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", dropout_p: float = 0.0, *,
                     block: int = ATTENTION_BLOCK) -> "torch.Tensor":
    """``F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)`` for training on
    the CPU: q, k, v (B, nh, T, hs) -> (B, nh, T, hs)."""
    return _functions()["CausalAttention"].apply(q, k, v, dropout_p, block)


def attention_kernel(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", dropout_p: float) -> "torch.Tensor":
    """The training attention ``prepare`` installs: ``causal_attention`` from ATTENTION_MIN_T tokens
    on, torch's ``scaled_dot_product_attention`` below that and under torch.compile (Inductor
    handles its own)."""
    import torch
    import torch.nn.functional as F

    if torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if q.shape[-2] < ATTENTION_MIN_T:
        if q.dtype != torch.bfloat16 or q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        # torch's bfloat16 flash attention backward on the CPU took 9x its float32 one (shakespeare-char,
        # Intel Xeon: 5.6 against 0.65 ms a layer), so short contexts attend in float32 (autocast off,
        # or it would cast them back).
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, is_causal=True)
        return out.to(q.dtype)
    return causal_attention(q, k, v, dropout_p)


def training_attention(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", ctx, dropout_p: float) -> "torch.Tensor":
    """The attention the training loop passes to the model (an ``gptcli.model.gpt.Attention``):
    ``attention_kernel`` for a training step's causal self-attention with gradients on, the model's
    own ``causal_attention`` for anything else."""
    import torch

    from gptcli.model.gpt import causal_attention

    if ctx.mask is None and ctx.cache is None and torch.is_grad_enabled():
        return attention_kernel(q, k, v, dropout_p)
    return causal_attention(q, k, v, ctx, dropout_p)


def head_loss(x: "torch.Tensor", weight: "torch.Tensor", targets: "torch.Tensor", *,
              chunk: int = HEAD_CHUNK_ROWS, onednn: bool | None = None,
              dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """``F.cross_entropy(x @ weight.T, targets)`` (the mean over rows), float32, never holding the
    whole logits.

    x (N, d), weight (V, d) float32, targets (N,) int64; gradients flow to ``x`` and ``weight``.
    ``dtype``: the matmuls' dtype (bfloat16 mirrors autocast: bfloat16 logits, float32 softmax).
    """
    import torch

    if onednn is None:
        onednn = x.device.type == "cpu" and onednn_available()
    dtype = dtype or torch.float32
    return _functions()["HeadLoss"].apply(x.contiguous(), weight, targets.contiguous(), chunk, onednn, dtype)


@dataclass(frozen=True)
class TrainPlan:
    """The kernels a training run uses (in its start event)."""

    linear: str  # "onednn": float32 Linear layers through OneDNNLinear; "torch": F.linear
    head_loss: bool  # the output head and cross-entropy through head_loss
    fused_adamw: bool
    attention: bool = False  # causal attention through attention_kernel
    heap: bool = False  # freed memory kept in glibc's heap (gptcli.kernels.allocator)
    # What ``measure_linears`` timed (ms of forward and backward over the model's Linear layers), when
    # the linear kernel was chosen by measuring; None for the default.
    measured: dict | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        out = {"linear": self.linear, "head_loss": self.head_loss, "fused_adamw": self.fused_adamw,
               "attention": self.attention, "heap": self.heap}
        if self.measured is not None:
            out["measured_ms"] = dict(self.measured)
        return out


def fused_adamw_available(device: "torch.device") -> bool:
    """Whether this torch has a fused AdamW kernel for ``device`` (CPU: torch 2.4 and later)."""
    import torch

    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def plan(device: "torch.device", model: "GPTModel | None" = None, rows: int | None = None) -> TrainPlan:
    """The training kernels for ``device``. On the CPU, given the model and the rows of a micro-batch,
    the float32 Linear kernel is the faster of oneDNN and torch's (MKL) for this model's shapes,
    measured once per machine (``measure_linears``): oneDNN won on the AMD EPYC measured, MKL on the
    Intel Xeon (book-ch05, 1 thread: 4.97 against 4.20 s a step with nothing else of the plan)."""
    onednn = device.type == "cpu" and onednn_available()
    cpu = device.type == "cpu"
    linear, measured = ("onednn" if onednn else "torch"), None
    if onednn and model is not None and rows:
        measured = measure_linears(linear_shapes(model), rows)
        if measured:
            linear = min(LINEAR_KERNELS, key=lambda k: measured[k])
    from gptcli.kernels import allocator

    return TrainPlan(linear=linear, head_loss=cpu, fused_adamw=fused_adamw_available(device), attention=cpu,
                     heap=cpu and allocator.available(), measured=measured)


# --- Choosing by measuring -----------------------------------------------------------------------
# Like the decode kernels (gptcli.kernels.decode), measured on the CPU at hand and cached in the same
# file under this machine's key, one entry per weight shape and row count.

LINEAR_KERNELS = ("onednn", "torch")  # float32
# --dtype auto takes bfloat16 autocast when one of the model's transformer blocks, forward and backward
# with everything around the matmuls (casts, GELU, LayerNorm, attention), measured this much faster
# than in float32: the precision it costs must buy a clear gain. On the Intel Xeon (AMX) nanoGPT's
# shakespeare-char block measured 1.28-1.37x (whole steps 1.28x), book-ch05's 1.9-2.1x.
BF16_MIN_GAIN = 1.15
# Rows a block is measured at, at most (fewer sequences of the same length): the ratio is what counts.
BLOCK_MAX_ROWS = 2048
BLOCK_DTYPES = ("float32", "bfloat16")
TRAIN_REPEATS = 3


def linear_shapes(model: "GPTModel") -> dict[tuple[int, int], int]:
    """(out, in) -> how many of the model's Linear layers have it (the head, which ``head_loss`` runs, too)."""
    import torch.nn as nn

    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            shapes[tuple(m.weight.shape)] = shapes.get(tuple(m.weight.shape), 0) + 1
    return shapes


def _time_linear(kernel: str, out_f: int, in_f: int, rows: int) -> float:
    """Milliseconds for one Linear layer's forward and backward (three matmuls) with ``kernel``."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_f, generator=gen, requires_grad=True)
    w = torch.randn(out_f, in_f, generator=gen, requires_grad=True)
    g = torch.randn(rows, out_f, generator=gen)

    def step() -> None:
        if kernel == "onednn":
            y = onednn_linear(x, w, None)
        else:
            y = F.linear(x, w)
        y.backward(g)
        x.grad = w.grad = None

    return _best_time(step) * 1e3


def _complete(entry: object, keys) -> bool:
    """Whether a cached entry holds a time for each of ``keys``."""
    return isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) for k in keys)


def measure_linears(shapes: dict[tuple[int, int], int], rows: int) -> dict[str, float] | None:
    """Milliseconds of forward and backward over every Linear layer of ``shapes`` at ``rows`` rows, per
    candidate of ``LINEAR_KERNELS``: from the cache, else measured now and cached.
    None when tuning is off (``GPTCLI_NO_TUNE``)."""
    from gptcli.kernels import decode

    if decode.tuning_disabled():
        return None
    known = decode.cached_measurements()
    totals = dict.fromkeys(LINEAR_KERNELS, 0.0)
    fresh: dict[str, dict[str, float]] = {}
    for (out_f, in_f), count in shapes.items():
        key = f"train {out_f}x{in_f} rows {rows}"
        entry = known.get(key)
        if not _complete(entry, totals):
            entry = fresh[key] = {k: round(_time_linear(k, out_f, in_f, rows), 3) for k in totals}
        for k in totals:
            totals[k] += entry[k] * count
    if fresh:
        decode.cache_measurements(fresh)
    return {k: round(v, 2) for k, v in totals.items()}


def _time_block(cfg: "GPTConfig", batch: int, dtype: str, linear: str) -> float:
    """Milliseconds for one of ``cfg``'s transformer blocks, forward and backward, on ``batch`` sequences
    of ``cfg.context_length`` tokens: float32 through ``linear``, or bfloat16 autocast; the training
    attention either way. The global random state is left as it was (the run's init draws from it)."""
    import torch

    from gptcli.model.gpt import Context, TransformerBlock

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = TransformerBlock(cfg).train()
        for layer in swap_linears_for_training(block):
            layer.train_kernel = onednn_linear if linear == "onednn" else None
        x = torch.randn(batch, cfg.context_length, cfg.emb_dim, requires_grad=True)
        ctx = Context(attend=training_attention)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                y = block(x, ctx)
            y.float().sum().backward()
            x.grad = None
            block.zero_grad(set_to_none=True)

        return _best_time(step) * 1e3


def _best_time(step, budget_s: float = 0.25) -> float:
    """The fastest of several calls of ``step`` after two warm-ups: at least TRAIN_REPEATS, more while
    they fit in ``budget_s`` (a few-millisecond step is noisy), at most 20."""
    import time

    times = []
    for _ in range(2 + 20):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if len(times) - 2 >= TRAIN_REPEATS and sum(times) >= budget_s:
            break
    return min(times[2:])


def measure_block(cfg: "GPTConfig", batch: int, linear: str) -> dict[str, float] | None:
    """Milliseconds of one transformer block's forward and backward in float32 (``linear``'s kernel) and
    bfloat16, at the run's sequence length and up to ``BLOCK_MAX_ROWS`` rows: from the cache, else
    measured now and cached. None when tuning is off."""
    from gptcli.kernels import decode

    if decode.tuning_disabled():
        return None
    batch = max(1, min(batch, BLOCK_MAX_ROWS // cfg.context_length))
    key = (f"train block emb {cfg.emb_dim} heads {cfg.n_heads} bias {cfg.bias} qkv {cfg.qkv_bias} "
           f"drop {cfg.drop_rate} gelu {cfg.gelu} T {cfg.context_length} batch {batch} {linear}")
    entry = decode.cached_measurements().get(key)
    if not _complete(entry, BLOCK_DTYPES):
        from gptcli.kernels import allocator

        allocator.keep_freed_memory()  # as the training steps will run (prepare)
        entry = {k: round(_time_block(cfg, batch, k, linear), 3) for k in BLOCK_DTYPES}
        decode.cache_measurements({key: entry})
    return entry


def choose_dtype(model: "GPTModel", rows: int) -> tuple[str, str]:
    """``--dtype auto`` on the CPU: bfloat16 autocast when a transformer block of this model measured
    ``BF16_MIN_GAIN`` times faster in bfloat16 than in float32 (its float32 matmuls on the faster
    measured kernel), else float32; and why. ``rows``: a micro-batch's, of whole sequences."""
    measured = measure_linears(linear_shapes(model), rows)
    if not measured:
        return "float32", "not measured (tuning is off)"
    linear = min(LINEAR_KERNELS, key=lambda k: measured[k])
    block = measure_block(model.cfg, max(1, rows // model.cfg.context_length), linear)
    gain = block["float32"] / max(block["bfloat16"], 1e-9)
    dtype = "bfloat16" if gain >= BF16_MIN_GAIN else "float32"
    return dtype, (f"a transformer block of this model trained {gain:.2f}x as fast in bfloat16 as in float32 "
                   f"here; bfloat16 from {BF16_MIN_GAIN}x")


def prepare(model: "GPTModel", chosen: TrainPlan) -> None:
    """Swap the model's Linear layers for TrainLinear with the plan's kernel (the model's maths is
    unchanged) and, when the plan says so, keep freed memory in the heap (process-wide); the loop passes
    ``attention_for(chosen)`` to the model's forward."""
    from gptcli.kernels import allocator

    if chosen.heap:
        allocator.keep_freed_memory()

    for layer in swap_linears_for_training(model):
        layer.train_kernel = onednn_linear if chosen.linear == "onednn" else None


def swap_linears_for_training(module: "torch.nn.Module") -> list:
    """Make ``module``'s Linear layers TrainLinear (no kernel set yet); returns them."""
    from gptcli.kernels.onednn import swap_linears

    # _functions() also defines the custom op now: torch.compile cannot trace its definition
    return swap_linears(module, _functions()["TrainLinear"])


def attention_for(chosen: TrainPlan):
    """The attention a training step passes to the model: ``training_attention``, or None for the model's own."""
    return training_attention if chosen.attention else None


def compile_for_training(model: "GPTModel") -> "torch.nn.Module":
    """``torch.compile(model)`` for the training loop.

    Dropout keeps eager's random numbers (Inductor's ``fallback_random``): the same masks as an eager
    run draws from the same seed, and on the CPU faster than Inductor's own generator (whose dropout
    made the book's 124M step 11-13% slower compiled than eager here). The oneDNN Linear kernel
    appears in the graph as the opaque custom op ``gptcli::onednn_linear``.
    """
    import torch

    if model.cfg.drop_rate > 0:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    return torch.compile(model)

