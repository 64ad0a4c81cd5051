"""Many prompts at once (``generate --each-line``): left-padded batches on the device.

Each row gets the ids it would get alone: padding tokens take no position (a row's first real token
is at position 0) and no real token attends to them (see ``GPTModel.forward``'s ``pad``). Sampling
draws from one generator per row, seeded like a single run, so sampled rows match too.

Past the context window every row is recomputed from its own last ``context_length`` tokens, as
``Decoder`` does for one sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from gptcli.generate import (
    Continuation,
    SamplingOptions,
    Timings,
    crop_prompt,
    make_generator,
    select_next,
)
from gptcli.tokenizer import EOT_ID

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPTModel, KVCache


class BatchDecoder:
    """Runs ``model`` for several sequences at once; ``prefill`` and ``step`` return logits (B, V)."""

    def __init__(self, model: "GPTModel", device: "torch.device", dtype: "torch.dtype", pad_id: int = 0):
        # Padding is masked out, so any id in the vocabulary will do; 0 exists in every vocabulary.
        self.model = model
        self.cfg = model.cfg
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.context_length = model.cfg.context_length
        self._rows: list[list[int]] = []  # each row's real ids so far (cropped prompt, then generated)
        self._pad: "torch.Tensor | None" = None  # (B,) left padding of the cached batch
        self._cache: KVCache | None = None

    def _padded(self, rows: Sequence[Sequence[int]]) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        """Left-padded ids (B, T) and the padding per row (B,), or None when no row is padded."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long,
                           device=self.device)  # (B, T)
        pad = [width - len(r) for r in rows]
        return ids, (torch.tensor(pad, device=self.device) if any(pad) else None)

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> "torch.Tensor":
        import torch

        from gptcli.model import KVCache

        self._rows = [crop_prompt(p, self.context_length)[0] for p in prompts]
        ids, self._pad = self._padded(self._rows)
        width = ids.shape[1]
        needed = min(self.context_length, width + max(max_new_tokens - 1, 0))
        self._cache = None
        if width < self.context_length and needed > width:
            self._cache = KVCache.empty(self.cfg, batch_size=len(self._rows), max_len=needed, device=self.device,
                                        dtype=self.dtype)
        with torch.inference_mode():
            return self.model(ids, self._cache, pad=self._pad, last_only=True)[:, -1, :]  # (B, V)

    def step(self, token_ids: Sequence[int]) -> "torch.Tensor":
        import torch

        for row, token_id in zip(self._rows, token_ids):
            row.append(token_id)
        with torch.inference_mode():
            if self._cache is not None and self._cache.length < self._cache.max_len:
                x = torch.tensor([[t] for t in token_ids], dtype=torch.long, device=self.device)  # (B, 1)
                return self.model(x, self._cache, pad=self._pad, last_only=True)[:, -1, :]  # (B, V)
            # The padded batch has filled the window: each row from its own last context_length ids.
            self._cache = None
            for row in self._rows:
                del row[: -self.context_length]
            ids, pad = self._padded(self._rows)
            return self.model(ids, pad=pad, last_only=True)[:, -1, :]  # (B, V)


@dataclass
class RowResult:
    """One prompt's continuation; the same fields a single ``Generation`` ends with."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def generate_batch(
    decoder: BatchDecoder,
    prompts: Sequence[Sequence[int]],
    options: SamplingOptions,
    *,
    eos_id: int | None = EOT_ID,
    token_bytes: Callable[[int], bytes] | None = None,
) -> tuple[list[RowResult], Timings]:
    """Continue every prompt; results in input order, and the batch's timings.

    ``timings.decode_tokens`` counts the new tokens of all rows (after each row's first), so
    ``decode_tokens_per_s`` is the aggregate rate.
    """
    rows = [Continuation(options, eos_id, token_bytes) for _ in prompts]

    def results() -> list[RowResult]:
        return [RowResult(list(p), row.token_ids, row.text, row.finish_reason) for p, row in zip(prompts, rows)]

    if options.max_new_tokens == 0 or not rows:
        return results(), Timings()
    timings = Timings(prefill_tokens=sum(min(len(p), decoder.context_length) for p in prompts))
    generators = None if options.greedy else [make_generator(options.seed) for _ in rows]
    start = time.perf_counter()
    logits = decoder.prefill(prompts, options.max_new_tokens)  # (B, V)
    for i in range(options.max_new_tokens):
        if generators is None:
            next_ids = select_next(logits, options, None).tolist()
        else:
            next_ids = [int(select_next(logits[b : b + 1], options, g)[0]) for b, g in enumerate(generators)]
        elapsed = time.perf_counter() - start
        live = [row for row in rows if not row.done]
        if i == 0:
            timings.prefill_s = elapsed
        else:
            timings.decode_s += elapsed
            timings.decode_tokens += len(live)
        for row, token_id in zip(rows, next_ids):
            if not row.done:
                row.accept(token_id)
        if all(row.done for row in rows):
            break
        start = time.perf_counter()
        logits = decoder.step(next_ids)
    return results(), timings
