"""Many prompts at once (``generate --each-line``): left-padded batches on the device.

Each row gets the ids it would get alone: padding tokens take no position (a row's first real token
is at position 0) and no real token attends to them (see ``GPTModel.forward``'s ``pad``). Sampling
draws from one generator per row, seeded like a single run, so sampled rows match too.

Each row is cached while it fits in the context window and recomputed from its own last
``context_length`` tokens once it has outgrown it, as ``Decoder`` does for one sequence.
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
    """Runs ``model`` for several sequences at once; ``prefill`` and ``step`` return logits (B, V).

    Each row follows ``Decoder``'s rule for one sequence: its keys and values are cached while it
    fits in the context window, and once it has outgrown the window it is recomputed from its own
    last ``context_length`` ids every step. A row leaves the shared cache when it, not the longest
    row, outgrows the window. Recomputing a row that still fits would round differently from the
    cached step it takes alone, and ``--each-line`` promises each row the ids it gets alone.
    """

    def __init__(self, model: "GPTModel", device: "torch.device", dtype: "torch.dtype", pad_id: int = 0):
        # Padding is masked out, so any id in the vocabulary will do; 0 exists in every vocabulary.
        self.model = model
        self.cfg = model.cfg
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.context_length = model.cfg.context_length
        self._rows: list[list[int]] = []  # each row's real ids so far (cropped prompt, then generated)
        self._cached: list[int] = []  # the rows whose keys and values are in the cache, in the cache's order
        self._pad: "torch.Tensor | None" = None  # (len(_cached),) left padding of the cached rows
        self._cache: KVCache | None = None

    def _padded(self, rows: Sequence[Sequence[int]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Left-padded ids (B, T) and the padding per row (B,).

        The padding goes to the model even when it is all zeros: with it every row attends on its
        own, as it would alone (``model._attend_rows``); one attention call for rows of equal length
        rounded differently from a lone row's.
        """
        import torch

        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long,
                           device=self.device)  # (B, T)
        return ids, torch.tensor([width - len(r) for r in rows], device=self.device)

    def _windows(self, rows: list[int]) -> "torch.Tensor":
        """Logits (len(rows), V) of these rows, each recomputed from its last context_length ids."""
        for i in rows:
            del self._rows[i][: -self.context_length]
        ids, pad = self._padded([self._rows[i] for i in rows])
        return self.model(ids, pad=pad, last_only=True)[:, -1, :]

    def _merge(self, parts: list[tuple[list[int], "torch.Tensor"]]) -> "torch.Tensor":
        """Logits (B, V) in row order from (rows, logits) pieces."""
        import torch

        if len(parts) == 1 and parts[0][0] == list(range(len(self._rows))):
            return parts[0][1]
        first = parts[0][1]
        out = torch.empty((len(self._rows), first.shape[-1]), dtype=first.dtype, device=first.device)
        for rows, logits in parts:
            out[torch.tensor(rows, device=first.device)] = logits
        return out

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> "torch.Tensor":
        import torch

        from gptcli.model import KVCache

        ctx = self.context_length
        self._rows = [crop_prompt(p, ctx)[0] for p in prompts]
        # Decoder's rule: a cache when the prompt leaves room in the window and a step will follow.
        self._cached = [i for i, r in enumerate(self._rows) if len(r) < ctx and max_new_tokens > 1]
        self._cache = self._pad = None
        parts = []
        with torch.inference_mode():
            if self._cached:
                rows = [self._rows[i] for i in self._cached]
                ids, self._pad = self._padded(rows)
                width = ids.shape[1]
                # Room for each row's own steps while it fits: its padding plus what it would cache alone.
                room = max(width - len(r) + min(ctx, len(r) + max_new_tokens - 1) for r in rows)
                self._cache = KVCache.empty(self.cfg, batch_size=len(rows), max_len=room, device=self.device,
                                            dtype=self.dtype)
                parts.append((self._cached, self.model(ids, self._cache, pad=self._pad, last_only=True)[:, -1, :]))
            windowed = [i for i in range(len(self._rows)) if i not in self._cached]
            if windowed:
                parts.append((windowed, self._windows(windowed)))
            return self._merge(parts)  # (B, V)

    def _drop_from_cache(self, keep: list[int]) -> None:
        """Keep only these positions of ``_cached`` in the cache (the others outgrew the window)."""
        import torch

        if not keep:
            self._cached, self._cache, self._pad = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        cache = self._cache
        cache.keys = [k.index_select(0, index) for k in cache.keys]
        cache.values = [v.index_select(0, index) for v in cache.values]
        self._pad = self._pad.index_select(0, index)
        self._cached = [self._cached[k] for k in keep]

    def step(self, token_ids: Sequence[int]) -> "torch.Tensor":
        import torch

        for row, token_id in zip(self._rows, token_ids):
            row.append(token_id)
        with torch.inference_mode():
            if self._cache is not None:
                if self._cache.length >= self._cache.max_len:  # more steps than prefill was told: recompute
                    self._drop_from_cache([])
                else:
                    self._drop_from_cache([k for k, i in enumerate(self._cached)
                                           if len(self._rows[i]) <= self.context_length])
            parts = []
            if self._cached:
                x = torch.tensor([[token_ids[i]] for i in self._cached], dtype=torch.long, device=self.device)
                parts.append((self._cached, self.model(x, self._cache, pad=self._pad, last_only=True)[:, -1, :]))
            windowed = [i for i in range(len(self._rows)) if i not in self._cached]
            if windowed:
                parts.append((windowed, self._windows(windowed)))
            return self._merge(parts)  # (B, V)


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
    seeds: Sequence[int] | None = None,
    observe: "Callable[[torch.Tensor, list[int], list[int]], None] | None" = None,
) -> tuple[list[RowResult], Timings]:
    """Continue every prompt; results in input order, and the batch's timings.

    ``seeds[b]``: row b's sampling seed (``--num-samples``); by default every row has ``options.seed``.

    ``timings.decode_tokens`` counts the new tokens of all rows (after each row's first), so
    ``decode_tokens_per_s`` is the aggregate rate. ``observe`` sees each step's logits (B, V), the ids
    picked and the rows still going (gptcli.logprobs.Recorder).
    """
    rows = [Continuation(options, eos_id, token_bytes) for _ in prompts]

    def results() -> list[RowResult]:
        return [RowResult(list(p), row.token_ids, row.text, row.finish_reason) for p, row in zip(prompts, rows)]

    if options.max_new_tokens == 0 or not rows:
        return results(), Timings()
    timings = Timings(prefill_tokens=sum(min(len(p), decoder.context_length) for p in prompts))
    if seeds is None:
        seeds = [options.seed] * len(rows)
    generators = None if options.greedy else [make_generator(seed) for seed in seeds]
    # Each row's whole prompt and new ids, for --repetition-penalty (as a lone Generation keeps them).
    seen = [list(p) for p in prompts] if options.penalizes else None
    start = time.perf_counter()
    logits = decoder.prefill(prompts, options.max_new_tokens)  # (B, V)
    for i in range(options.max_new_tokens):
        if generators is None:
            next_ids = select_next(logits, options, None, seen).tolist()
        else:
            next_ids = [int(select_next(logits[b : b + 1], options, g, None if seen is None else [seen[b]])[0])
                        for b, g in enumerate(generators)]
        if seen is not None:
            for history, token_id in zip(seen, next_ids):
                history.append(token_id)
        elapsed = time.perf_counter() - start
        live = [row for row in rows if not row.done]
        if observe is not None:
            observe(logits, next_ids, [b for b, row in enumerate(rows) if not row.done])
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
