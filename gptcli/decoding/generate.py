"""Decoding: from prompt ids to new token ids, and from token ids to printable text. Never prints.

Three layers, each usable on its own:

- ``Decoder`` runs the model for one sequence, a token at a time, with a key/value cache while the
  sequence fits in the context window (the one place that knows about the window).
- ``select_next`` picks the next id from logits: greedy, or temperature / top-k / top-p / min-p
  sampling with a seeded ``torch.Generator``, after an optional repetition penalty.
- ``TextStream`` turns token ids into text that is safe to print now: whole UTF-8 characters only,
  and nothing that could still turn out to be the start of a stop string.

``Generation`` ties them together: iterate it to get text pieces as they are decoded; afterwards it
holds the ids, the text, the finish reason and the timings. The CLI renders; nothing here writes.

``CompiledDecoder`` (torch.compile'd steps over a static cache) follows the same ``prefill``/``step``
protocol; batches of prompts live in ``gptcli.decoding.batch``.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

from gptcli.errors import UserError
from gptcli.tokenizer import EOT_ID

if TYPE_CHECKING:
    import torch

    from gptcli.model.gpt import GPTModel
    from gptcli.model.kv_cache import KVCache
    from gptcli.tokenizer import Tokenizer

FINISH_EOS = "eos"  # the model produced <|endoftext|>
FINISH_STOP = "stop"  # a --stop string appeared (it is not part of the text)
FINISH_LENGTH = "length"  # --max-new-tokens reached
FINISH_INTERRUPTED = "interrupted"  # Ctrl-C; set by the caller
FINISH_CLOSED = "closed"  # the reader closed stdout (`| head`) before the end; set by the caller

MAX_PENALTY = 2.0  # OpenAI's range for frequency_penalty and presence_penalty: [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit bias: [-100, 100]


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick and when to stop. ``temperature == 0`` is greedy; top_k/top_p then have no effect."""

    max_new_tokens: int = 50
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # CTRL's: > 1 makes ids already in the sequence less likely; 1 is off
    min_p: float | None = None  # sampling keeps ids at least min_p times as likely as the most likely one
    # OpenAI's: logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0), count over the
    # ids generated so far (not the prompt); 0 is off (see ``adjust_logits``)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (id, bias) pairs added to the logits, bias in [-100, 100]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def counts_generated(self) -> bool:
        """Whether picking needs how often each id was generated (the frequency and presence penalties)."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def penalizes(self) -> bool:
        """Whether picking needs the ids seen so far (``select_next``'s ``history``)."""
        return self.repetition_penalty != 1 or self.counts_generated

    @property
    def adjusts_logits(self) -> bool:
        """Whether picking changes the model's logits first (``adjust_logits``): penalties or a bias."""
        return self.penalizes or bool(self.logit_bias)

    def validate(self) -> "SamplingOptions":
        """Raise UserError for values no decoder can use; return self."""
        if self.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be 0 or more, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also catches NaN
            raise UserError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.temperature == float("inf"):
            raise UserError("--temperature must be finite")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be 1 or more, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < float("inf"):  # also catches NaN
            raise UserError(f"--repetition-penalty must be above 0 (1 is off, above 1 penalizes), "
                            f"got {self.repetition_penalty}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise UserError(f"--min-p must be in [0, 1], got {self.min_p}")
        for name, value in (("--frequency-penalty", self.frequency_penalty),
                            ("--presence-penalty", self.presence_penalty)):
            if not -MAX_PENALTY <= value <= MAX_PENALTY:  # also catches NaN
                raise UserError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value:g}")
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise UserError(f"--logit-bias: token id {token_id} is not in the vocabulary")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise UserError(f"--logit-bias {token_id}={bias:g}: the bias must be in [-{MAX_LOGIT_BIAS:g}, "
                                f"{MAX_LOGIT_BIAS:g}]")
        if len({token_id for token_id, _ in self.logit_bias}) < len(self.logit_bias):
            twice = next(t for i, (t, _) in enumerate(self.logit_bias) if t in {u for u, _ in self.logit_bias[:i]})
            raise UserError(f"--logit-bias: token id {twice} is given twice")
        if any(s == "" for s in self.stop):
            raise UserError("--stop must not be empty")
        return self

    def check_vocab(self, vocab_size: int) -> "SamplingOptions":
        """Raise UserError when a ``logit_bias`` id is past a vocabulary of ``vocab_size``; return self."""
        wrong = next((t for t, _ in self.logit_bias if not 0 <= t < vocab_size), None)
        if wrong is not None:
            raise UserError(f"--logit-bias: token id {wrong} is not in the model's vocabulary (0-{vocab_size - 1})")
        return self


def crop_prompt(ids: Sequence[int], context_length: int) -> tuple[list[int], int]:
    """The last ``context_length`` ids and how many were dropped from the left."""
    dropped = max(0, len(ids) - context_length)
    return list(ids[dropped:]), dropped


def prompt_ids(text: str, tokenizer: "Tokenizer | None" = None) -> list[int]:
    """Token ids for a prompt. An empty prompt starts from <|endoftext|>, as GPT-2 was trained; with a
    vocabulary that has none (characters), from a newline, as nanoGPT's sample.py does, else id 0."""
    if tokenizer is None:
        from gptcli.tokenizer import gpt2

        tokenizer = gpt2()
    ids = tokenizer.encode(text)
    if ids:
        return ids
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode("\n")
    except UserError:
        return [0]


# ---------------------------------------------------------------------------------------------
# The model, one step at a time


class StepDecoder(Protocol):
    """What ``Generation`` needs from a decoder; other implementations (compiled, batched) can follow it."""

    def prefill(self, ids: Sequence[int], max_new_tokens: int) -> "torch.Tensor": ...

    def step(self, token_id: int) -> "torch.Tensor": ...


class Decoder:
    """Runs ``model`` for one sequence (batch 1). ``prefill`` and ``step`` return next-token logits, shape (1, V).

    While the sequence fits in ``context_length`` it is fed through a ``KVCache``: the prompt once,
    then one token per step. Past the window the book's ``generate_text_simple`` keeps only the last
    ``context_length`` tokens, so every kept token moves one position to the left each step. GPT-2's
    positions are absolute embeddings added at the input, so every cached key and value (computed at
    the old positions) is then stale: from there on each step recomputes the cropped window, exactly
    as the book does, and the ids stay identical to it.
    """

    def __init__(self, model: "GPTModel", device: "torch.device", dtype: "torch.dtype"):
        import torch

        self.model = model
        self.cfg = model.cfg
        self.device = device
        self.dtype = dtype
        self.context_length = model.cfg.context_length
        self._ids: list[int] = []  # every id fed so far (prompt after cropping, then generated)
        self._cache: KVCache | None = None
        self._use_cache = False
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)  # (1, 1), reused every step
        from gptcli.model.attention import invariant_on
        from gptcli.kernels.onednn import use_for_inference

        self.attention = invariant_on(device)
        use_for_inference(model)

    def _ensure_cache(self, length: int) -> "KVCache":
        """A cache of at least ``length`` positions, allocated once and reused while big enough."""
        from gptcli.model.kv_cache import KVCache

        if self._cache is None or self._cache.max_len < length or self._cache.keys[0].dtype != self.dtype:
            self._cache = KVCache.empty(self.cfg, batch_size=1, max_len=length, device=self.device, dtype=self.dtype)
        self._cache.length = 0
        return self._cache

    def prefill(self, ids: Sequence[int], max_new_tokens: int) -> "torch.Tensor":
        """Start a sequence from ``ids`` (cropped to the window on the left); logits (1, V) for the next token."""
        import torch

        ids, _ = crop_prompt(ids, self.context_length)
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._ids = ids
        # Positions the model will see: the prompt, then every generated token but the last.
        needed = min(self.context_length, len(ids) + max(max_new_tokens - 1, 0))
        self._use_cache = len(ids) < self.context_length and needed > len(ids)
        cache = self._ensure_cache(needed) if self._use_cache else None
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
            return self.model(x, cache, last_only=True, attention=self.attention)[:, -1, :]  # (1, V)

    def step(self, token_id: int) -> "torch.Tensor":
        """Append ``token_id``; logits (1, V) for the token after it."""
        import torch

        self._ids.append(token_id)
        with torch.inference_mode():
            if self._use_cache and self._cache is not None and len(self._ids) <= self._cache.max_len:
                self._token.fill_(token_id)
                return self._cached_step(len(self._ids) - 1)
            # Past the window (or a cache too short): recompute the last context_length tokens.
            self._use_cache = False
            self._cache = None  # stale for good; free its memory
            window = self._ids[-self.context_length :]
            del self._ids[: -self.context_length]  # older ids are never needed again
            x = torch.tensor([window], dtype=torch.long, device=self.device)  # (1, T<=context_length)
            return self.model(x, last_only=True, attention=self.attention)[:, -1, :]  # (1, V)

    def _cached_step(self, position: int) -> "torch.Tensor":
        """Logits (1, V) for ``self._token`` at ``position``, extending the cache."""
        return self.model(self._token, self._cache, attention=self.attention)[:, -1, :]  # (1, V)

    # Speculative decoding (gptcli.decoding.speculative) checks several guessed tokens in one pass and forgets
    # the rejected ones.

    def room(self) -> int:
        """Positions left in the cache: how many tokens ``feed`` takes now (0 once past the window)."""
        if not self._use_cache or self._cache is None:
            return 0
        return self._cache.max_len - len(self._ids)

    def feed(self, tokens: Sequence[int]) -> "torch.Tensor":
        """Append ``tokens`` through the cache in one forward pass; logits (len(tokens), V), row i for
        the token after tokens[i]. Each row is what a one-token ``step`` gives there (on the CPU:
        row-invariant kernels and ``gptcli.model.attention.row_invariant``)."""
        import torch

        self._check_room(tokens)
        self._ids.extend(tokens)
        with torch.inference_mode():
            x = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # (1, T)
            return self.model(x, self._cache, attention=self.attention)[0]  # (T, V)

    def _check_room(self, tokens: Sequence[int]) -> None:
        if not tokens or len(tokens) > self.room():
            raise ValueError(f"feed of {len(tokens)} tokens with room for {self.room()}")

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` tokens fed (their cached keys and values are overwritten later)."""
        if n <= 0:
            return
        assert self._cache is not None and n <= self._cache.length
        del self._ids[-n:]
        self._cache.length -= n


class CompiledDecoder(Decoder):
    """``Decoder`` whose cached steps run one torch.compile'd graph.

    Every step has the same shapes: the cache is allocated once per length bucket, the new key and
    value are written at a position held in a tensor, and attention covers the whole cache under a
    mask. A changing cache length or token stride would make torch.compile recompile (slower and
    dynamic). The prompt's prefill and the steps past the window stay eager.

    Dynamo checks its guards before every call (~0.5 ms of a ~10 ms bfloat16 step). Between the steps
    of one sequence nothing they check can change (same token and position tensors, same cache, same
    model, same grad mode), so only the first step with a given cache object runs the guards; later
    steps with that same object skip them. A new cache (another length) is guarded again and, when
    needed, compiled.
    """

    def __init__(self, model: "GPTModel", device: "torch.device", dtype: "torch.dtype", mode: str | None = None):
        import torch

        super().__init__(model, device, dtype)
        configure_inductor()
        self._position = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        from gptcli.model.attention import for_compiled_step

        self._step_attention = for_compiled_step(device)
        if mode is None:
            # CUDA graphs remove the per-step launch overhead; on the CPU there is nothing to capture.
            mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.mode = mode
        from gptcli.kernels.quantize import compile_options

        options = compile_options(model, device) if mode == "default" else None
        # Inductor settings for this model's graphs only (torch.compile's own options= did not reach
        # freezing here): patched around every call, since any call may compile (a new cache length).
        self._inductor_config = options or {}
        self._compiled = torch.compile(self._static_step, mode=mode, fullgraph=True, dynamic=False)
        self._guarded_cache: KVCache | None = None  # the cache object whose step last passed the guards

    def _static_step(self, token: "torch.Tensor", position: "torch.Tensor") -> "torch.Tensor":
        return self.model(token, self._cache, input_pos=position, attention=self._step_attention)[:, -1, :]  # (1, V)

    def _ensure_cache(self, length: int) -> "KVCache":
        # A few fixed lengths, so one compiled graph serves many prompts. Not always the full context:
        # attention reads the whole cache each step, and at 1024 positions that was 75 MB a token
        # for 124M at float32 (46 tok/s, against 56 with 256 positions).
        return super()._ensure_cache(cache_bucket(length, self.context_length))

    def _cached_step(self, position: int) -> "torch.Tensor":
        import torch

        self._position.fill_(position)
        # Clone: with CUDA graphs the output buffer is reused by the next replay.
        if self._cache is not None and self._cache is self._guarded_cache:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._compiled(self._token, self._position).clone()
        import torch._inductor.config as inductor_config

        with inductor_config.patch(self._inductor_config):  # nothing to patch: a no-op
            logits = self._compiled(self._token, self._position).clone()
        self._guarded_cache = self._cache
        return logits

    def feed(self, tokens: Sequence[int]) -> "torch.Tensor":
        """Append ``tokens`` one compiled step each (a draft's decoder: a compiled graph has one row);
        logits (len(tokens), V)."""
        import torch

        self._check_room(tokens)
        return torch.cat([self.step(token) for token in tokens])  # (T, V)

    def rollback(self, n: int) -> None:
        # A compiled step writes at its own position and masks the later ones: forgetting is enough.
        if n > 0:
            del self._ids[-n:]

    def warm_up(self, positions: int = 3) -> float:
        """Compile now, for the cache a sequence of ``positions`` tokens will use; returns the seconds.

        Each cache length (``cache_bucket``) is its own graph, so warming up the wrong one would
        leave a compile inside the first decode steps.
        """
        import time

        start = time.perf_counter()
        self.prefill([0], max_new_tokens=max(positions, 3))
        self.step(0)
        self.step(0)
        return time.perf_counter() - start


def cache_bucket(length: int, context_length: int, smallest: int = 256) -> int:
    """The cache length for ``length`` positions: a power of two from ``smallest``, at most the context."""
    bucket = smallest
    while bucket < length:
        bucket *= 2
    return min(bucket, context_length)


def make_decoder(model: "GPTModel", device: "torch.device", dtype: "torch.dtype", *, compile: bool = False) -> Decoder:
    """The decoder for one sequence: eager, or with torch.compile'd steps."""
    return CompiledDecoder(model, device, dtype) if compile else Decoder(model, device, dtype)


def configure_inductor() -> None:
    """Inductor settings measured to matter for the decode step on CPU.

    Without a low ``realize_opcount_threshold`` Inductor recomputed the LayerNorm inside every output
    row's reduction of the next matvec instead of storing it once.
    """
    import torch._inductor.config as inductor_config

    inductor_config.realize_opcount_threshold = 4


# ---------------------------------------------------------------------------------------------
# Picking the next token


MAX_SEED = 2**64 - 1  # the largest seed torch's generators take (manual_seed raises past it)


def check_seed(seed: int, option: str = "--seed") -> int:
    """``seed`` if a torch generator takes it; UserError otherwise (not torch's RuntimeError later)."""
    if seed < 0:
        raise UserError(f"{option} must be 0 or more, got {seed}")
    if seed > MAX_SEED:
        raise UserError(f"{option} must be at most 2**64 - 1 = {MAX_SEED}, got {seed}")
    return seed


def make_generator(seed: int) -> "torch.Generator":
    """The sampling RNG. It lives on the CPU, so a seed draws the same way on every device."""
    import torch

    return torch.Generator(device="cpu").manual_seed(seed)


@dataclass(frozen=True)
class Seen:
    """The ids one row has seen, for the penalties: ``ids`` (the prompt, then what was generated), of which
    the first ``prompt_length`` are the prompt. The repetition penalty looks at all of them; the frequency
    and presence penalties count only the generated ones, as OpenAI defines them."""

    ids: Sequence[int]
    prompt_length: int

    @property
    def generated(self) -> Sequence[int]:
        return self.ids[self.prompt_length :]

    def then(self, more: Sequence[int]) -> "Seen":
        """These ids followed by ``more`` generated ones (a speculative check's later rows)."""
        return Seen([*self.ids, *more], self.prompt_length) if more else self


History = Sequence["Seen | Sequence[int]"]  # per row: a Seen, or plain ids (repetition penalty only)


def _ids_of(row: "Seen | Sequence[int]") -> Sequence[int]:
    return row.ids if isinstance(row, Seen) else row


def penalize_repetition(logits: "torch.Tensor", history: History, penalty: float) -> "torch.Tensor":
    """CTRL's repetition penalty (Keskar et al. 2019) as transformers' RepetitionPenaltyLogitsProcessor
    applies it: in row b, the logit of every id in ``history[b]`` is divided by ``penalty`` when
    positive and multiplied by it when negative. Float32 logits (B, V) on the CPU, a new tensor."""
    import torch

    scores = logits.detach().float().cpu().clone()  # (B, V)
    for row, seen in enumerate(history):
        ids = _ids_of(seen)
        if ids:
            index = torch.tensor(sorted(set(ids)), dtype=torch.long)
            seen = scores[row, index]
            scores[row, index] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def adjust_logits(logits: "torch.Tensor", options: SamplingOptions, history: History | None = None) -> "torch.Tensor":
    """The logits picking starts from: the model's (B, V), changed by ``options``' penalties and bias, as a
    new float32 tensor on the CPU. The one place for this maths; greedy argmax and sampling both use it.

    In this order: CTRL's repetition penalty on the raw logits (as transformers applies it), over every
    id of ``history[b]`` (prompt and generated); then OpenAI's frequency and presence penalties,
    ``logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)``, where ``count[j]``
    is how often row b has *generated* id j so far in this sequence (OpenAI's definition: the prompt's
    ids are not counted, so ``history[b]`` must be a ``Seen`` that says where the prompt ends); then
    ``logit_bias`` added to its ids. Penalties need ``history``; without it only the bias applies.
    Each row uses its own logits and ids only, so a row's result does not depend on the batch.
    """
    import torch

    if options.repetition_penalty != 1 and history is not None:
        scores = penalize_repetition(logits, history, options.repetition_penalty)  # (B, V), a copy
    else:
        scores = logits.detach().float().cpu().clone()  # (B, V)
    if options.counts_generated and history is not None:
        for row, seen in enumerate(history):
            if not isinstance(seen, Seen):
                raise TypeError("the frequency and presence penalties need each row's history as a Seen "
                                "(which ids were generated)")
            if len(seen.generated):
                ids, counts = torch.unique(torch.tensor(list(seen.generated), dtype=torch.long), return_counts=True)
                scores[row, ids] -= options.frequency_penalty * counts.float() + options.presence_penalty
    if options.logit_bias:
        index = torch.tensor([t for t, _ in options.logit_bias], dtype=torch.long)
        scores[:, index] += torch.tensor([b for _, b in options.logit_bias], dtype=torch.float32)
    return scores


def keep_for_sampling(logits: "torch.Tensor", options: SamplingOptions) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The candidates sampling draws from: scaled logits (B, k), sorted descending, -inf where
    filtered out, and their ids (B, k). transformers' order: temperature, top-k, top-p, min-p."""
    import torch

    scaled = logits.detach().float().cpu() / options.temperature  # (B, V)
    if options.top_k is not None and options.top_k < scaled.shape[-1]:
        values, index = torch.topk(scaled, options.top_k, dim=-1)  # (B, k), sorted descending
    else:
        values, index = torch.sort(scaled, dim=-1, descending=True)  # (B, V)
    if options.top_p is not None and options.top_p < 1:
        probs = torch.softmax(values, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        values = values.masked_fill(before >= options.top_p, float("-inf"))  # the top token always stays
    if options.min_p:
        probs = torch.softmax(values, dim=-1)  # column 0 is the most likely, so it always stays
        values = values.masked_fill(probs < options.min_p * probs[:, :1], float("-inf"))
    return values, index


def sampling_candidates(logits: "torch.Tensor", options: SamplingOptions) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The distribution ``select_next`` samples from, as numbers (``gptcli.decoding.speculative`` needs them):
    probabilities (B, k) over the ids ``index`` (B, k), most likely first (zeros where filtered out).
    On the CPU in float32, whatever the logits' device and dtype. No penalties or bias: pass logits
    through ``adjust_logits`` first for those."""
    import torch

    values, index = keep_for_sampling(logits, options)
    return torch.softmax(values, dim=-1), index  # (B, k) each


def sampling_probs(logits: "torch.Tensor", options: SamplingOptions,
                   history: History | None = None) -> "torch.Tensor":
    """The distribution (B, V) that ``select_next`` samples from (float32, on the CPU)."""
    import torch

    if options.adjusts_logits:
        logits = adjust_logits(logits, options, history)
    values, index = keep_for_sampling(logits, options)
    return torch.zeros(logits.shape, dtype=torch.float32).scatter_(-1, index, torch.softmax(values, dim=-1))


def select_next(logits: "torch.Tensor", options: SamplingOptions, generator: "torch.Generator | None",
                history: History | None = None) -> "torch.Tensor":
    """Next ids, shape (B,), from logits (B, V). Pure apart from drawing from ``generator``.

    ``history[b]``: the ids row b has seen (a ``Seen``: prompt and generated), for the penalties, which
    apply first with ``logit_bias`` (``adjust_logits``; greedy too). Greedy is argmax (the first
    maximum, like the book). Sampling scales by 1/temperature, keeps the ``top_k`` largest logits, then
    the smallest set whose probability reaches ``top_p``, then those at least ``min_p`` times as likely
    as the top one, and draws.
    """
    import torch

    if options.adjusts_logits:
        logits = adjust_logits(logits, options, history).to(logits.device)
    if options.greedy:
        # Half-precision logits through float32 (exact): torch's CPU argmax over 50257 bfloat16 values
        # took 167 us against 60 with the conversion, 5% of an int4 decode step.
        return torch.argmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)  # (B,)
    # Sample in float32 on the CPU: same draws for a seed on any device and in any model dtype.
    values, index = keep_for_sampling(logits, options)
    probs = torch.softmax(values, dim=-1)  # (B, k)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1), index into the kept tokens
    return index.gather(-1, choice).squeeze(-1).to(logits.device)  # (B,)


# ---------------------------------------------------------------------------------------------
# From ids to printable text


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (so must wait)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Token ids in, text that is safe to print out.

    Bytes go through an incremental UTF-8 decoder, so a character split across tokens comes out whole
    (undecodable bytes become U+FFFD, as ``tokenizer.decode`` does). With stop strings, the tail that
    could still begin one is held back; once one appears, the text before it is released and
    ``stopped`` is set. The pieces returned, joined, are the whole text.
    """

    def __init__(self, stops: Sequence[str] = (), token_bytes: Callable[[int], bytes] | None = None):
        if token_bytes is None:
            from gptcli.tokenizer import token_bytes
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(stops)
        self._pending = ""  # decoded, not yet released
        self.stopped = False

    def _release(self, text: str, final: bool) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        at = find_stop(self._pending, self._stops)
        if at is not None:
            self.stopped = True
            out, self._pending = self._pending[:at], ""
            return out
        keep = 0 if final else stop_holdback(self._pending, self._stops)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def feed(self, token_id: int) -> str:
        """The text that ``token_id`` makes printable (often '', never half a character)."""
        return self._release(self._utf8.decode(self._token_bytes(token_id)), final=False)

    def finish(self) -> str:
        """The rest at the end of generation: held-back text and any incomplete character (as U+FFFD)."""
        return self._release(self._utf8.decode(b"", final=True), final=True)


# ---------------------------------------------------------------------------------------------
# One generation


@dataclass
class Timings:
    prefill_s: float = 0.0  # the prompt's forward pass and picking the first new token
    decode_s: float = 0.0  # every later step: forward of one token (or the window) and picking
    prefill_tokens: int = 0  # prompt tokens the model saw (after cropping)
    decode_tokens: int = 0  # new tokens produced by decode steps (all but the first)

    def add(self, seconds: float, first: bool, tokens: int = 1) -> None:
        """Count a step that picked ``tokens`` new ids: a sequence's first is its prefill's."""
        if first:
            self.prefill_s += seconds
        else:
            self.decode_s += seconds
            self.decode_tokens += tokens

    def add_up(self, other: "Timings") -> None:
        self.prefill_s += other.prefill_s
        self.decode_s += other.decode_s
        self.prefill_tokens += other.prefill_tokens
        self.decode_tokens += other.decode_tokens

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else None

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prefill_tokens / self.prefill_s if self.prefill_tokens and self.prefill_s > 0 else None


class Continuation:
    """One sequence's new ids, turned into printable text and a finish reason.

    The rules every generator shares: <|endoftext|> ends it (finish ``eos``, not printed) unless
    ``ignore_eos``; a stop string ends it (``stop``, the string not printed); otherwise
    ``max_new_tokens`` does (``length``). ``accept`` returns the text each id makes printable, with
    the held-back tail when that id ends the sequence.
    """

    def __init__(self, options: SamplingOptions, eos_id: int | None = EOT_ID,
                 token_bytes: Callable[[int], bytes] | None = None):
        self.options = options
        self.eos_id = eos_id
        self.token_ids: list[int] = []
        self.finish_reason: str | None = FINISH_LENGTH if options.max_new_tokens == 0 else None
        self._pieces: list[str] = []
        self._stream = TextStream(options.stop, token_bytes)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def accept(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        out = ""
        if token_id == self.eos_id and not self.options.ignore_eos:
            self.finish_reason = FINISH_EOS
        else:
            out = self._stream.feed(token_id)
            if self._stream.stopped:
                self.finish_reason = FINISH_STOP
            elif len(self.token_ids) == self.options.max_new_tokens:
                self.finish_reason = FINISH_LENGTH
        if self.finish_reason in (FINISH_EOS, FINISH_LENGTH):
            out += self._stream.finish()
        if out:
            self._pieces.append(out)
        return out


class Continued:
    """What a sequence has produced so far, read from its ``continuation``: ``token_ids``, ``text`` and
    ``finish_reason`` (which a caller sets to FINISH_INTERRUPTED)."""

    continuation: Continuation

    @property
    def token_ids(self) -> list[int]:
        return self.continuation.token_ids

    @property
    def text(self) -> str:
        return self.continuation.text

    @property
    def finish_reason(self) -> str | None:
        return self.continuation.finish_reason

    @finish_reason.setter
    def finish_reason(self, reason: str) -> None:
        self.continuation.finish_reason = reason


class SequenceState(Continued):
    """One sequence being decoded, whatever runs it (``Generation``, ``SpeculativeGeneration``, or a batch
    that rows join and leave: ``gptcli.decoding.batch.decode_rows``, the server's engine): its prompt and
    options, its own sampling generator (seeded ``options.seed``, so its ids do not depend on what runs
    beside it), the ids it has seen (for ``--repetition-penalty``), its continuation (text, stop rule,
    finish reason), an ``observe`` hook and its timings."""

    def __init__(self, prompt_token_ids: Sequence[int], options: SamplingOptions, *, eos_id: int | None = EOT_ID,
                 token_bytes: Callable[[int], bytes] | None = None, context_length: int | None = None,
                 observe: "Callable[[torch.Tensor, list[int]], None] | None" = None):
        self.prompt_token_ids = list(prompt_token_ids)
        self.options = options
        self.continuation = Continuation(options, eos_id, token_bytes)
        self.observe = observe  # sees each step's logits (1, V) and the id picked (gptcli.decoding.logprobs.Recorder)
        self.generator = None if options.greedy else make_generator(options.seed)
        self.history = list(self.prompt_token_ids) if options.penalizes else []  # every id seen, if it matters
        self.prompt_length = len(self.prompt_token_ids)  # history[prompt_length:] is what was generated
        self.timings = Timings()
        n_seen = len(self.prompt_token_ids) if context_length is None else min(len(self.prompt_token_ids), context_length)
        self.timings.prefill_tokens = n_seen if options.max_new_tokens else 0  # -n 0 runs nothing


    @property
    def done(self) -> bool:
        return self.continuation.done

    def seen(self) -> Seen:
        """The ids this sequence has seen (a view: it grows as ids are accepted), for the penalties."""
        return Seen(self.history, self.prompt_length)

    def pick(self, logits: "torch.Tensor") -> int:
        """The next id from this sequence's logits (1, V): its options, its generator, its history."""
        if self.options.penalizes:
            return int(select_next(logits, self.options, self.generator, [self.seen()])[0])
        return int(select_next(logits, self.options, self.generator)[0])  # int() also waits for the device

    def accept(self, token_id: int, logits: "torch.Tensor | None" = None) -> str:
        """Take the next id (``logits`` (1, V): what it was picked from, for ``observe``); the text it makes printable."""
        if self.options.penalizes:
            self.history.append(token_id)
        if self.observe is not None and logits is not None:
            self.observe(logits, [token_id])
        return self.continuation.accept(token_id)


class Generation(Continued):
    """Generate from ``prompt_token_ids``; iterate to receive the text as it becomes printable.

    While and after iterating: ``token_ids`` (every generated id, including a final <|endoftext|>
    or the tokens that made a stop string), ``text`` (the printable continuation, which never holds
    the stop string nor <|endoftext|> unless ``ignore_eos``), ``finish_reason`` (None until it ends)
    and ``timings``. Stopping the iteration early (Ctrl-C) leaves them as far as they got.
    Timings count only the library's own work, not the time the caller spends printing.
    """

    def __init__(
        self,
        decoder: StepDecoder,
        prompt_token_ids: Sequence[int],
        options: SamplingOptions,
        *,
        eos_id: int | None = EOT_ID,
        token_bytes: Callable[[int], bytes] | None = None,
        context_length: int | None = None,
        observe: "Callable[[torch.Tensor, list[int]], None] | None" = None,
    ):
        self.decoder = decoder
        self.sequence = SequenceState(prompt_token_ids, options, eos_id=eos_id, token_bytes=token_bytes,
                                 context_length=context_length, observe=observe)
        self.prompt_token_ids, self.options = self.sequence.prompt_token_ids, options
        self.continuation, self.timings = self.sequence.continuation, self.sequence.timings


    def __iter__(self) -> Iterator[str]:
        """Text pieces as they become printable; the model runs only while the sequence goes on.

        The one loop of single-sequence decoding: ``_first`` and ``_advance`` give the next ids and the
        logits (n, V) each was picked from (one at a time here; several per model pass for
        ``SpeculativeGeneration``)."""
        seq = self.sequence
        if seq.done:
            return
        start = time.perf_counter()
        ids, logits = self._first()
        seq.timings.add(time.perf_counter() - start, first=True)
        first = True
        while True:
            for i, token in enumerate(ids):
                seq.timings.decode_tokens += 0 if first else 1
                first = False
                piece = seq.accept(token, logits[i : i + 1])
                if piece:
                    yield piece
                if seq.done:
                    return
            start = time.perf_counter()
            ids, logits = self._advance(ids[-1])
            seq.timings.add(time.perf_counter() - start, first=False, tokens=0)

    def _first(self) -> tuple[list[int], "torch.Tensor"]:
        """Prefill the prompt; the first id and its logits (1, V)."""
        logits = self.decoder.prefill(self.sequence.prompt_token_ids, self.options.max_new_tokens)  # (1, V)
        return [self.sequence.pick(logits)], logits

    def _advance(self, last: int) -> tuple[list[int], "torch.Tensor"]:
        """One step after ``last``: the next id and its logits (1, V)."""
        logits = self.decoder.step(last)  # (1, V)
        return [self.sequence.pick(logits)], logits

    def run(self) -> "Generation":
        """Generate to the end without streaming; returns self."""
        for _ in self:
            pass
        return self
