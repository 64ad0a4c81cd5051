"""How well a model predicts a text: cross-entropy per token, perplexity and bits per byte.

``token_nll`` is the one per-token cross-entropy of the project (``gptcli score`` and training share it).

Texts longer than the context are scored with sliding windows, as transformers' "Perplexity of
fixed-length models" describes. Windows of ``context_length`` tokens start at 0, stride, 2·stride, ...
and end at min(start + context_length, n), the last one at n. Each window scores the tokens it newly
covers (from the previous window's end to its own), each predicted from the tokens before it inside
that window. A window's first token has no context inside it and is never scored there: a text's
first token is not scored (prepend ``<|endoftext|>`` to score it), and with disjoint windows
(stride == context) neither is each window's first token, as in transformers' method. With a stride
below the context every token from the second on is scored exactly once. The loss is the exact mean
over the scored tokens (transformers' documented loop weights each window by its count minus one).

Speed: windows go through the model in batches (no Python per token), and the output head, the
largest matrix, is applied only to the positions that are scored. A window's model input is
``tokens[start:end-1]``; its last ``n_targets`` positions predict ``tokens[first_target:end]``.

Library code: never prints; progress is reported through a callback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from gptcli.errors import UserError

if TYPE_CHECKING:
    import torch

    from gptcli.decoding.logprobs import TokenLogprob
    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer

LN2 = math.log(2)
# Logits computed at once by the head: 2**24 float32 = 64 MiB (333 positions of GPT-2's vocabulary).
HEAD_CHUNK_ELEMENTS = 1 << 24
DEFAULT_BATCH_SIZE = 8

Progress = Callable[[int, int], None]  # (predictions scored so far, predictions to score)


def token_nll(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """Cross-entropy of each target under its logits, in nats, as float32: (..., V), (...) -> (...).

    E.g. logits (B, T, V) and targets (B, T) give (B, T); ``.mean()`` of that is the book's
    ``calc_loss_batch``. The softmax runs in float32 whatever the logits' dtype. A target of -100
    (PyTorch's ``ignore_index``) gets 0.
    """
    import torch.nn.functional as F

    flat = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    return F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)  # (...)


# --- Windows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) of a text, of which [first_target, end) are scored."""

    start: int
    end: int
    first_target: int

    @property
    def width(self) -> int:
        """Length of the model input, ``tokens[start:end-1]`` (the last token is only a target)."""
        return self.end - 1 - self.start

    @property
    def n_targets(self) -> int:
        return self.end - self.first_target


def default_stride(context_length: int) -> int:
    return max(1, context_length // 2)


def check_stride(stride: int, context_length: int) -> int:
    """``stride`` if 1 <= stride <= context_length; else UserError."""
    if stride < 1:
        raise UserError(f"--stride must be 1 or more, got {stride}")
    if stride > context_length:
        raise UserError(f"--stride {stride} is above the model's context of {context_length} tokens; use at most "
                        f"{context_length} (which gives disjoint windows)")
    return stride


def sliding_windows(n_tokens: int, context_length: int, stride: int) -> list[Window]:
    """The windows that score a text of ``n_tokens`` tokens; windows that score nothing are left out."""
    check_stride(stride, context_length)
    windows: list[Window] = []
    prev_end = 0
    for start in range(0, n_tokens, stride):
        end = min(start + context_length, n_tokens)
        first = max(prev_end, start + 1)  # a window's first token has no context inside it
        if first < end:
            windows.append(Window(start, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def count_predictions(n_tokens: int, context_length: int, stride: int) -> int:
    """How many tokens of an ``n_tokens``-token text are scored."""
    return sum(w.n_targets for w in sliding_windows(n_tokens, context_length, stride))


# --- Results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """A text's score: ``tokens`` predictions with ``nll`` nats in all, over ``bytes`` UTF-8 bytes."""

    tokens: int = 0
    nll: float = 0.0
    bytes: int = 0

    @property
    def loss(self) -> float | None:
        """Mean cross-entropy in nats per scored token; None when nothing was scored."""
        return self.nll / self.tokens if self.tokens else None

    @property
    def perplexity(self) -> float | None:
        loss = self.loss
        if loss is None:
            return None
        return math.exp(loss) if loss < 709.0 else math.inf  # exp overflows a double past ~709.78

    @property
    def bits_per_byte(self) -> float | None:
        """Total nats / ln 2 / UTF-8 bytes: comparable across tokenizers. None when nothing was scored."""
        if not self.tokens or not self.bytes:
            return None
        return self.nll / LN2 / self.bytes

    def __add__(self, other: "Score") -> "Score":
        return Score(self.tokens + other.tokens, self.nll + other.nll, self.bytes + other.bytes)


def total(scores: Sequence[Score]) -> Score:
    """All texts together: nats and bytes add up, so the loss is weighted by tokens."""
    return sum(scores, Score())


# --- Encoding ------------------------------------------------------------------------------------------


def encode_texts(tokenizer: "Tokenizer", texts: Sequence[str], *, bos: bool = False,
                 names: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each text, ``<|endoftext|>`` first with ``bos``.

    ``names`` label each text in errors. A char-level vocabulary's missing characters are reported for
    every text at once, so one run shows everything there is to fix.
    """
    if bos and tokenizer.eot_id is None:
        raise UserError(f"--bos prepends <|endoftext|>, which this model's {tokenizer.name} tokenizer does not "
                        "have (GPT-2's BPE only)")
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None and len(texts) > 1:
        encoded = batch(list(texts))
    else:
        unknown = getattr(tokenizer, "unknown", None)
        if unknown is not None:
            missing = [(names[i] if names is not None else f"text {i + 1}", chars)
                       for i, text in enumerate(texts) if (chars := unknown(text))]
            if missing:
                shown = "; ".join(f"{name}: {', '.join(map(repr, chars[:8]))}{', ...' if len(chars) > 8 else ''}"
                                  for name, chars in missing[:5])
                more = f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise UserError(f"characters not in this model's vocabulary of {tokenizer.vocab_size} (a character "
                                f"model reads only the characters it was trained on): {shown}{more}")
        encoded = []
        for i, text in enumerate(texts):
            try:
                encoded.append(tokenizer.encode(text))
            except UserError as exc:
                raise UserError(f"{names[i]}: {exc}" if names is not None else str(exc)) from None
    if bos:
        return [[tokenizer.eot_id, *ids] for ids in encoded]  # type: ignore[list-item]
    return [list(ids) for ids in encoded]


# --- Running windows through the model -----------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    text: int  # which text the window belongs to
    tokens: "torch.Tensor"  # (n,) the whole text's ids, on the CPU
    window: Window


def _batches(jobs: Sequence[_Job], batch_size: int) -> Iterator[list[_Job]]:
    """Widest first, so that windows of one width (a long text's) share a batch and need no padding,
    and lines of similar lengths are padded little."""
    ordered = sorted(jobs, key=lambda j: -j.window.width)
    for first in range(0, len(ordered), batch_size):
        yield ordered[first : first + batch_size]


def _head_nll(model: "GPTModel", hidden: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """Apply the output head to ``hidden`` (N, emb_dim) a chunk at a time; cross-entropy (N,) float32."""
    import torch

    rows = max(1, HEAD_CHUNK_ELEMENTS // model.cfg.vocab_size)
    parts = [
        token_nll(model.out_head(hidden[i : i + rows]), targets[i : i + rows])  # (rows, V) -> (rows,)
        for i in range(0, hidden.shape[0], rows)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _run_batch(model: "GPTModel", jobs: Sequence[_Job], device: "torch.device") -> "torch.Tensor":
    """Total nats of each job's targets: (B,) float64 on the CPU. Rows of different widths are left-padded."""
    import torch

    from gptcli.model.attention import invariant_on

    widths = [j.window.width for j in jobs]
    width = max(widths)
    inputs = [j.tokens[j.window.start : j.window.end - 1] for j in jobs]  # each (width_b,)
    pad = None
    if all(w == width for w in widths):
        ids = torch.stack(inputs)  # (B, W)
    else:
        ids = torch.zeros(len(jobs), width, dtype=torch.long)  # (B, W); padding is masked, any id will do
        for b, row in enumerate(inputs):
            ids[b, width - widths[b] :] = row
        pad = torch.tensor([width - w for w in widths], device=device)  # (B,)
    n_targets = torch.tensor([j.window.n_targets for j in jobs])  # (B,)
    scored = torch.arange(width)[None, :] >= (width - n_targets)[:, None]  # (B, W): each row's last n_targets
    targets = torch.cat([j.tokens[j.window.first_target : j.window.end] for j in jobs])  # (N,)

    hidden = model(ids.to(device), pad=pad, head=False, attention=invariant_on(device))  # (B, W, emb_dim)
    nll = _head_nll(model, hidden[scored.to(device)], targets.to(device))  # (N,), row after row
    row_of = torch.repeat_interleave(torch.arange(len(jobs)), n_targets)  # (N,)
    return torch.zeros(len(jobs), dtype=torch.float64).index_add_(0, row_of, nll.cpu().double())  # (B,)


def score_ids(
    model: "GPTModel",
    texts: Sequence[Sequence[int]],
    *,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> list[tuple[int, float]]:
    """(predictions, total nats) for each token sequence, with sliding windows past the context.

    ``stride`` defaults to context_length // 2. Up to ``batch_size`` windows (of any of the texts) run
    through the model at once; windows of different widths are left-padded and masked. ``progress``
    is called before the first batch and after each with (predictions scored so far, predictions in all).
    """
    import torch

    context = model.cfg.context_length
    stride = check_stride(default_stride(context) if stride is None else stride, context)
    if batch_size < 1:
        raise UserError(f"--batch-size must be 1 or more, got {batch_size}")
    device = next(model.parameters()).device
    jobs: list[_Job] = []
    for index, ids in enumerate(texts):
        tokens = torch.as_tensor(list(ids), dtype=torch.long)  # (n,)
        jobs += [_Job(index, tokens, w) for w in sliding_windows(len(tokens), context, stride)]

    counts = [0] * len(texts)
    nll = [0.0] * len(texts)
    for job in jobs:
        counts[job.text] += job.window.n_targets
    goal, done = sum(counts), 0
    if progress is not None:
        progress(0, goal)
    with torch.inference_mode():
        for batch in _batches(jobs, batch_size):
            sums = _run_batch(model, batch, device).tolist()
            for job, value in zip(batch, sums):
                nll[job.text] += value
                done += job.window.n_targets
            if progress is not None:
                progress(done, goal)
    return list(zip(counts, nll))


def score_texts(
    model: "GPTModel",
    tokenizer: "Tokenizer",
    texts: Sequence[str],
    *,
    stride: int | None = None,
    bos: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    names: Sequence[str] | None = None,
) -> list[Score]:
    """Score each text on its own (see ``score_ids``); bytes are the texts' UTF-8 bytes."""
    ids = encode_texts(tokenizer, texts, bos=bos, names=names)
    results = score_ids(model, ids, stride=stride, batch_size=batch_size, progress=progress)
    return [Score(n, value, len(text.encode("utf-8"))) for (n, value), text in zip(results, texts)]


# ---------------------------------------------------------------------------------------------
# Each token's log-probability (gptcli score --tokens)


def text_logprobs(model, ids: Sequence[int], *, stride: int | None = None, k: int = 0) -> list["TokenLogprob"]:
    """Every token of a text with its log-probability under ``model``, in the windows ``gptcli score``
    uses (``sliding_windows``), so the mean of the negated values is its loss. The
    tokens no window scores (the first) get None."""
    import torch

    from gptcli.decoding.logprobs import TokenLogprob, step_logprobs

    context = model.cfg.context_length
    stride = check_stride(default_stride(context) if stride is None else stride, context)
    entries = [TokenLogprob(int(t), None) for t in ids]
    device = next(model.parameters()).device
    tokens = torch.as_tensor(list(ids), dtype=torch.long)
    rows = max(1, HEAD_CHUNK_ELEMENTS // model.cfg.vocab_size)
    with torch.inference_mode():
        for window in sliding_windows(len(ids), context, stride):
            x = tokens[window.start : window.end - 1].view(1, -1).to(device)  # (1, W)
            hidden = model(x, head=False)[0, -window.n_targets :]  # (n_targets, emb_dim)
            for first in range(0, window.n_targets, rows):
                logits = model.out_head(hidden[first : first + rows])  # (rows, V)
                at = window.first_target + first
                targets = [int(t) for t in ids[at : at + logits.shape[0]]]
                entries[at : at + len(targets)] = step_logprobs(logits, targets, k)
    return entries


def score_tokens(model, tokenizer, texts: Sequence[str], *, stride: int | None = None, bos: bool = False,
                 names: Sequence[str] | None = None, k: int = 1) -> list[list["TokenLogprob"]]:
    """Each text's tokens with their log-probabilities (``text_logprobs``), encoded as ``gptcli score``
    encodes them (``<|endoftext|>`` first with ``bos``)."""
    return [text_logprobs(model, ids, stride=stride, k=k)
            for ids in encode_texts(tokenizer, texts, bos=bos, names=names)]
