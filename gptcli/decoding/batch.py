"""Many sequences at once (``generate --each-line``, ``gptcli serve``): left-padded batches on the device,
which rows join and leave between decode steps (continuous batching). Never prints.

Each row gets the ids it would get alone: padding tokens take no position (a row's first real token
is at position 0) and no real token attends to them (see ``GPTModel.forward``'s ``pad``). Sampling
draws from one generator per row (``SequenceState``), seeded like a single run, so sampled rows match too.

Each row is cached while it fits in the context window and recomputed from its own last
``context_length`` tokens once it has outgrown it, as ``Decoder`` does for one sequence.
``BatchLoop`` runs sequences on a ``BatchDecoder``: ``decode_rows`` (``--each-line``) and
``gptcli.serving.engine`` (the server) both drive it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from gptcli.decoding.generate import SamplingOptions, SequenceState, Timings, crop_prompt
from gptcli.tokenizer import EOT_ID

if TYPE_CHECKING:
    import torch

    from gptcli.model.kv_cache import KVCache
    from gptcli.model.gpt import GPTModel


class BatchDecoder:
    """Runs ``model`` for several sequences at once; ``prefill`` and ``step`` return logits (B, V).

    Each row follows ``Decoder``'s rule for one sequence: its keys and values are cached while it
    fits in the context window, and once it has outgrown the window it is recomputed from its own
    last ``context_length`` ids every step. A row leaves the shared cache when it, not the longest
    row, outgrows the window. Recomputing a row that still fits would round differently from the
    cached step it takes alone, and ``--each-line`` promises each row the ids it gets alone.

    Rows join (``admit``) and leave (``release``) between steps. Newcomers are prefilled in a forward
    call of their own (as a batch of their own) and their keys and values spliced into the running
    cache; every row's cached positions end at the cache's length, so a shorter row simply has more
    padding on the left. Padding is masked out and takes no position, so adding some does not change
    a row's numbers. The cache's common left padding is cut off whenever the rows that needed it have
    left, so its length stays at the longest cached row's, within the window, however long it runs.
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
        from gptcli.model.attention import invariant_on
        from gptcli.kernels.onednn import use_for_inference

        self.attention = invariant_on(device)
        use_for_inference(model)

    def _padded(self, rows: Sequence[Sequence[int]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Left-padded ids (B, T) and the padding per row (B,).

        The padding goes to the model even when it is all zeros: with it every row attends on its
        own, as it would alone (``gptcli.model.attention.row_invariant``); one attention call for rows of equal length
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
        return self.model(ids, pad=pad, last_only=True, attention=self.attention)[:, -1, :]

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

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int]) -> "torch.Tensor":
        """Start the batch; ``max_new_tokens``: one count for every row, or one per row."""
        import torch

        from gptcli.model.kv_cache import KVCache

        ctx = self.context_length
        self._rows = [crop_prompt(p, ctx)[0] for p in prompts]
        news = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        # Decoder's rule: a cache when the prompt leaves room in the window and a step will follow.
        self._cached = [i for i, r in enumerate(self._rows) if len(r) < ctx and news[i] > 1]
        self._cache = self._pad = None
        parts = []
        with torch.inference_mode():
            if self._cached:
                rows = [self._rows[i] for i in self._cached]
                ids, self._pad = self._padded(rows)
                width = ids.shape[1]
                # Room for each row's own steps while it fits: its padding plus what it would cache alone.
                room = max(width - len(self._rows[i]) + min(ctx, len(self._rows[i]) + news[i] - 1)
                           for i in self._cached)
                self._cache = KVCache.empty(self.cfg, batch_size=len(rows), max_len=room, device=self.device,
                                            dtype=self.dtype)
                parts.append((self._cached, self.model(ids, self._cache, pad=self._pad, last_only=True,
                                                         attention=self.attention)[:, -1, :]))
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
            self._fit_cache()
            parts = []
            if self._cached:
                x = torch.tensor([[token_ids[i]] for i in self._cached], dtype=torch.long, device=self.device)
                parts.append((self._cached, self.model(x, self._cache, pad=self._pad, last_only=True,
                                                         attention=self.attention)[:, -1, :]))
            windowed = [i for i in range(len(self._rows)) if i not in self._cached]
            if windowed:
                parts.append((windowed, self._windows(windowed)))
            return self._merge(parts)  # (B, V)


    @property
    def size(self) -> int:
        """How many rows are in the batch."""
        return len(self._rows)

    def admit(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> "torch.Tensor":
        """Add rows at the end of the batch; logits (len(prompts), V) for each one's first new token.

        The running rows' last ids are not fed here: the next ``step`` takes one id for every row.
        """
        if not self._rows:
            return self.prefill(prompts, max_new_tokens)
        newcomers = BatchDecoder(self.model, self.device, self.dtype, self.pad_id)  # prefilled on their own
        logits = newcomers.prefill(prompts, max_new_tokens)
        offset = len(self._rows)
        self._rows += newcomers._rows
        self._splice(newcomers, [offset + i for i in newcomers._cached])
        return logits

    def _splice(self, newcomers: BatchDecoder, rows: list[int]) -> None:
        """Append ``newcomers``' cache rows (batch rows ``rows``) to the cache, both right-aligned."""
        import torch

        from gptcli.model.kv_cache import KVCache

        if not rows:
            return
        if self._cache is None:
            self._cache, self._pad, self._cached = newcomers._cache, newcomers._pad, rows
            return
        old, new = self._cache, newcomers._cache
        length = max(old.length, new.length)
        headroom = max(old.max_len - old.length, new.max_len - new.length, 1)
        room = max(length, min(self.context_length, length + headroom))
        cache = KVCache.empty(self.cfg, batch_size=len(self._cached) + len(rows), max_len=room, device=self.device,
                              dtype=self.dtype)
        split = len(self._cached)
        for layer in range(self.cfg.n_layers):
            for dst, a, b in ((cache.keys[layer], old.keys[layer], new.keys[layer]),
                              (cache.values[layer], old.values[layer], new.values[layer])):
                dst[:split, :, length - old.length : length] = a[:, :, : old.length]
                dst[split:, :, length - new.length : length] = b[:, :, : new.length]
        cache.length = length
        self._pad = torch.cat([self._pad + (length - old.length), newcomers._pad + (length - new.length)])
        self._cache = cache
        self._cached = self._cached + rows

    def release(self, keep: Sequence[int]) -> None:
        """Keep only these rows (indices into the batch, in order); the others leave it now."""
        position = {row: k for k, row in enumerate(keep)}
        self._rows = [self._rows[i] for i in keep]
        if self._cache is not None:
            still = [k for k, i in enumerate(self._cached) if i in position]
            renumbered = [position[self._cached[k]] for k in still]
            if len(still) != len(self._cached):
                self._drop_from_cache(still)
            if self._cache is not None:
                self._cached = renumbered
                self._trim()

    def _trim(self) -> None:
        """Cut the padding every cached row has on the left: those positions belong to no row now."""
        cut = int(self._pad.min())
        if cut > 0:
            cache = self._cache
            cache.keys = [k[:, :, cut:] for k in cache.keys]
            cache.values = [v[:, :, cut:] for v in cache.values]
            cache.length -= cut
            self._pad = self._pad - cut

    def _fit_cache(self) -> None:
        """Before a step: rows that outgrew the window leave the cache, its common padding goes,
        and a full cache grows (never dropped: recomputing a row that fits would change its numbers)."""
        from gptcli.model.kv_cache import KVCache

        if self._cache is None:
            return
        fits = [k for k, i in enumerate(self._cached) if len(self._rows[i]) <= self.context_length]
        if len(fits) < len(self._cached):
            self._drop_from_cache(fits)
        if self._cache is None:
            return
        self._trim()
        cache = self._cache
        if cache.length < cache.max_len:
            return
        # Only the longest row, at most context_length - 1 positions, is cached in full.
        room = min(self.context_length, max(cache.length + 1, 2 * cache.max_len))
        grown = KVCache.empty(self.cfg, batch_size=len(self._cached), max_len=room, device=self.device,
                              dtype=self.dtype)
        for layer in range(self.cfg.n_layers):
            grown.keys[layer][:, :, : cache.length] = cache.keys[layer][:, :, : cache.length]
            grown.values[layer][:, :, : cache.length] = cache.values[layer][:, :, : cache.length]
        grown.length = cache.length
        self._cache = grown


@dataclass
class RowResult:
    """One prompt's continuation; the same fields a single ``Generation`` ends with."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class BatchLoop:
    """Sequences decoded together on a ``BatchDecoder``: ``admit`` some (prefilled on their own, each
    picks its first id), ``step`` every running one a token, ``release`` the finished ones, which leave
    at once. Each picks with its own ``SequenceState`` (generator, history, stop rule), so on the CPU
    its ids are the ones it gets alone. ``--each-line`` (``decode_rows``) and ``gptcli serve``'s engine
    both run on it. Returns, per step, each sequence's (id, logits (1, V) it was picked from, text)."""

    def __init__(self, decoder: BatchDecoder):
        self.decoder = decoder
        self.running: list[SequenceState] = []  # in the decoder's row order

    def admit(self, sequences: Sequence[SequenceState]) -> list[tuple[SequenceState, int, "torch.Tensor", str]]:
        starting = [s for s in sequences if not s.done]  # max_new_tokens 0 runs nothing
        if not starting:
            return []
        logits = self.decoder.admit([s.prompt_token_ids for s in starting],
                                    [s.options.max_new_tokens for s in starting])  # (k, V)
        self.running += starting
        return [self._accept(s, logits[k : k + 1]) for k, s in enumerate(starting)]

    def step(self) -> list[tuple[SequenceState, int, "torch.Tensor", str]]:
        logits = self.decoder.step([s.token_ids[-1] for s in self.running])  # (B, V)
        return [self._accept(s, logits[k : k + 1]) for k, s in enumerate(self.running)]

    @staticmethod
    def _accept(seq: SequenceState, logits: "torch.Tensor") -> tuple[SequenceState, int, "torch.Tensor", str]:
        token_id = seq.pick(logits)
        return seq, token_id, logits, seq.accept(token_id, logits)

    def release(self, leaving: Callable[[SequenceState], bool] = lambda s: False) -> None:
        """Rows that finished, or that ``leaving`` says go (a client went away), leave the batch."""
        keep = [k for k, s in enumerate(self.running) if not s.done and not leaving(s)]
        if len(keep) < len(self.running):
            self.decoder.release(keep)
            self.running = [self.running[k] for k in keep]


def decode_rows(decoder: BatchDecoder, sequences: Sequence[SequenceState], max_rows: int,
                timings: Timings | None = None) -> Iterator[int]:
    """Decode ``sequences`` at most ``max_rows`` at a time, a waiting one joining as soon as a row
    finishes (continuous batching); yields each one's index as it finishes. ``timings`` gathers the
    batch's: admissions as prefill, steps as decode (``decode_tokens``: every row's ids after its first)."""
    import collections

    timings = timings if timings is not None else Timings()
    loop = BatchLoop(decoder)
    index = {id(s): i for i, s in enumerate(sequences)}
    waiting = collections.deque(sequences)
    while waiting or loop.running:
        joining = []
        while waiting and len(loop.running) + len(joining) < max_rows:
            seq = waiting.popleft()
            if seq.done:  # nothing to decode (max_new_tokens 0)
                yield index[id(seq)]
            else:
                joining.append(seq)
        if joining:
            start = time.perf_counter()
            loop.admit(joining)
            timings.add(time.perf_counter() - start, first=True)
            timings.prefill_tokens += sum(s.timings.prefill_tokens for s in joining)
        elif loop.running:
            start = time.perf_counter()
            events = loop.step()
            timings.add(time.perf_counter() - start, first=False, tokens=len(events))
        finished = [s for s in loop.running if s.done]
        loop.release()
        for s in finished:
            yield index[id(s)]


def decode_rows_in_order(decoder: BatchDecoder, sequences: Sequence[SequenceState], max_rows: int,
                         timings: Timings | None = None) -> Iterator[int]:
    """``decode_rows``, yielding each index in input order, as soon as it and every one before it finished."""
    finished: set[int] = set()
    following = 0
    for i in decode_rows(decoder, sequences, max_rows, timings):
        finished.add(i)
        while following in finished:
            finished.discard(following)
            yield following
            following += 1


def generate_batch(
    decoder: BatchDecoder,
    prompts: Sequence[Sequence[int]],
    options: SamplingOptions,
    *,
    eos_id: int | None = EOT_ID,
    token_bytes: Callable[[int], bytes] | None = None,
    seeds: Sequence[int] | None = None,
    observe: "Callable[[int], Callable[[torch.Tensor, list[int]], None]] | None" = None,
    max_rows: int | None = None,
) -> tuple[list[RowResult], Timings]:
    """Continue every prompt (``decode_rows``, at most ``max_rows`` at once, all by default); results in
    input order, and the batch's timings.

    ``seeds[b]``: row b's sampling seed (``--num-samples``); by default every row has ``options.seed``.
    ``observe(b)``: row b's hook, which sees each of its steps' logits (1, V) and id (gptcli.decoding.logprobs.Recorder.row).
    """
    seeds = [options.seed] * len(prompts) if seeds is None else list(seeds)
    sequences = [
        SequenceState(p, replace(options, seed=seed), eos_id=eos_id, token_bytes=token_bytes,
                      context_length=decoder.context_length,
                      observe=None if observe is None else observe(b))
        for b, (p, seed) in enumerate(zip(prompts, seeds))
    ]
    timings = Timings()
    for _ in decode_rows(decoder, sequences, max_rows or max(1, len(prompts)), timings):
        pass
    return [RowResult(list(p), s.token_ids, s.text, s.finish_reason) for p, s in zip(prompts, sequences)], timings

