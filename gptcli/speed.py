"""Training speed, beside the model: kernels the training loop selects at run time.

``gptcli.model`` reads like the book; this module makes its training steps faster without changing
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
- **Fused AdamW** (``torch.optim.AdamW(fused=True)``, one pass over each tensor) on the CPU as on
  GPUs, where this torch has it.

Off the CPU, without oneDNN or with an older torch the plain torch path is used; the results are the
same up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPTModel

# Rows of logits that head_loss computes at once: 1024 x 50257 float32 is 206 MB. Smaller chunks
# add a pass over the (vocab, emb) weight gradient each; 1024 was the fastest of 512-2048 here.
HEAD_CHUNK_ROWS = 1024


def onednn_available() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(a: "torch.Tensor", b: "torch.Tensor", bias: "torch.Tensor | None" = None) -> "torch.Tensor":
    """a @ b.T (+ bias) through oneDNN: a (..., k), b (n, k) -> (..., n). Strided (transposed) inputs
    are fine. Under torch.compile it is an opaque custom op (Inductor cannot lower oneDNN's linear in
    a training graph), called as an external kernel."""
    import torch

    if torch.compiler.is_compiling():
        return torch.ops.gptcli.onednn_linear(a, b, bias)  # registered by prepare(), before any tracing
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _onednn_mm_t(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    return _onednn_linear(a, b)


def _torch_mm_t(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    return a @ b.t()


_FUNCTIONS: dict[str, type] = {}


def _functions() -> dict[str, type]:
    """The autograd Functions, defined on first use so that importing this module needs no torch."""
    if _FUNCTIONS:
        return _FUNCTIONS
    import torch

    @torch.library.custom_op("gptcli::onednn_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    def onednn_linear_op(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

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

    _FUNCTIONS.update(OneDNNLinear=OneDNNLinear, HeadLoss=HeadLoss)
    return _FUNCTIONS


def onednn_linear(x: "torch.Tensor", weight: "torch.Tensor", bias: "torch.Tensor | None") -> "torch.Tensor":
    """F.linear(x, weight, bias) with oneDNN doing the forward and backward matmuls (CPU, float32)."""
    return _functions()["OneDNNLinear"].apply(x, weight, bias)


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
class Plan:
    """The kernels a training run uses (in its start event)."""

    linear: str  # "onednn": float32 Linear layers through OneDNNLinear; "torch": F.linear
    head_loss: bool  # the output head and cross-entropy through head_loss
    fused_adamw: bool

    def to_dict(self) -> dict:
        return {"linear": self.linear, "head_loss": self.head_loss, "fused_adamw": self.fused_adamw}


def fused_adamw_available(device: "torch.device") -> bool:
    """Whether this torch has a fused AdamW kernel for ``device`` (CPU: torch 2.4 and later)."""
    import torch

    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def plan(device: "torch.device") -> Plan:
    onednn = device.type == "cpu" and onednn_available()
    return Plan(linear="onednn" if onednn else "torch", head_loss=device.type == "cpu",
                fused_adamw=fused_adamw_available(device))


def prepare(model: "GPTModel", chosen: Plan) -> None:
    """Point the model's Linear layers at the plan's training kernel (the model's maths is unchanged)."""
    from gptcli.model import Linear

    kernel = onednn_linear if chosen.linear == "onednn" else None
    if kernel is not None:
        _functions()  # define the Functions and the custom op now: torch.compile cannot trace that
    for m in model.modules():
        if isinstance(m, Linear):
            m.train_kernel = kernel


def compile_for_training(model: "GPTModel") -> "torch.nn.Module":
    """``torch.compile(model)`` for the training loop.

    Dropout keeps eager's random numbers (Inductor's ``fallback_random``): the same masks as an eager
    run draws from the same seed, and on the CPU faster than Inductor's own generator (whose dropout
    made the book's 124M step ~12% slower compiled than eager here). The oneDNN Linear kernel
    appears in the graph as the opaque custom op ``gptcli::onednn_linear``.
    """
    import torch

    if model.cfg.drop_rate > 0:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    return torch.compile(model)

