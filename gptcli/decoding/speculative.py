"""Speculative decoding: a cheap draft guesses the next K tokens, the model checks them all in one
forward pass of K+1 rows and keeps the longest agreeing prefix plus one token of its own. Never prints.

Decoding one sequence reads every weight once per token; checking K+1 tokens reads them once too,
so each accepted guess is a token for (nearly) nothing. Three kinds of draft:

- ``ModelDrafter``: another model with the same tokenizer (``--draft gpt2`` for ``--size xl``, a run
  folder), or the model's own int8/int4 copy (``--draft int8``: self-speculation), decoding with its
  own key/value cache that is rolled back after each check.
- ``LookupDrafter``: prompt lookup, no model at all: the tokens that followed the latest earlier
  occurrence of the text's last few tokens (``--lookup``). It switches itself off while it keeps missing.

Greedy decoding keeps a draft token while it equals the model's argmax, so the ids are plain
decoding's, bit for bit: the model's logits for a position in a K+1-row check are the ones a
one-token step gives there (row-invariant linear kernels, and ``gptcli.model.attention.row_invariant`` gives each
new query the very attention call a one-token step makes). Sampling with a model draft follows
Leviathan et al. (2023) / Chen et al. (2023): accept draft token d with probability min(1, p(d)/q(d)),
at the first rejection draw from norm(max(0, p - q)), and draw a bonus token from p when all K are
accepted; p and q are the model's and the draft's distributions after the same temperature/top-k/
top-p (``gptcli.decoding.generate.sampling_candidates``), so the output has plain sampling's distribution.
Prompt lookup has no q: it draws each position from the model, exactly as plain sampling does with
the same generator, and keeps going while the draw equals the guess, so its sampled ids too are
plain decoding's for the seed.

Past the context window plain decoding recomputes the whole window every step (``Decoder``); there
is no cache to check guesses against, so from the point where K+1 more positions no longer fit,
generation falls back to plain one-token steps (same ids, no speed-up).

``SpeculativeGeneration`` is a ``gptcli.decoding.generate.Generation``: the same text pieces, stop strings,
finish reasons and timings, plus ``stats`` (acceptance, tokens per model forward, the draft's time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from gptcli.errors import UserError
from gptcli.decoding.generate import (CompiledDecoder, Decoder, Generation, SamplingOptions, Seen, crop_prompt,
                                      sampling_probs, select_next)
from gptcli.kernels.prepare import QUANTIZE_SCHEMES
from gptcli.tokenizer import EOT_ID

if TYPE_CHECKING:
    import torch

    from gptcli.runtime import InferenceOptions, Runtime

SELF_DRAFTS = QUANTIZE_SCHEMES  # --draft that quantizes the model
MIN_DRAFT_TOKENS, MAX_DRAFT_TOKENS = 1, 16
DEFAULT_DRAFT_TOKENS = 6  # bench/speculative.py: the trained pair gained most at K 6 (with DRAFT_CONFIDENCE)
# The model's own int8/int4 copy keeps nearly every guess (acceptance 0.99-1.00), so it guesses further:
# compiled int8 drafting made book-ch05 1.77x the best plain step at K 12 against 1.53x at K 6 (Intel Xeon).
DEFAULT_SELF_DRAFT_TOKENS = 12
DRAFT_CONFIDENCE = 0.3  # a model draft stops guessing after a guess it gives less probability (0: never)
DEFAULT_LOOKUP_TOKENS = 8  # a repeating text accepts long runs; a miss costs the same few rows


def check_draft_tokens(k: int) -> int:
    if not MIN_DRAFT_TOKENS <= k <= MAX_DRAFT_TOKENS:
        raise UserError(f"--draft-tokens must be {MIN_DRAFT_TOKENS} to {MAX_DRAFT_TOKENS}, got {k}")
    return k


# ---------------------------------------------------------------------------------------------
# Drafts


@dataclass
class Proposal:
    """K guessed ids and, for sampling with a model draft, the distributions they were drawn from."""

    tokens: list[int]
    probs: "torch.Tensor | None" = None  # (K, V) the draft's q for each guess; None: greedy or lookup


class Drafter(Protocol):
    """What ``SpeculativeGeneration`` needs from a draft."""

    exact_draws: bool  # guesses are checked by drawing from the model and comparing (no q needed)

    def start(self, ids: Sequence[int], max_new_tokens: int) -> None: ...

    def propose(self, last: int, k: int, options: SamplingOptions, generator: "torch.Generator | None",
                history: Seen | None = None) -> Proposal | None:
        """Up to ``k`` guesses for the tokens after ``last`` (the newest id, not yet seen); None for none.
        ``history``: every id so far, ``last`` included, for the penalties."""

    def accepted(self, n: int, next_id: int) -> None:
        """The model kept ``n`` guesses of the last proposal, then chose ``next_id`` (or, with no
        proposal, ``next_id`` followed ``last``)."""


class ModelDrafter:
    """Guesses from a draft model (same tokenizer), decoding with its own cache, rolled back after each check.

    The draft's cache holds the accepted ids it has seen; ``pending`` are accepted ids it has not
    seen yet (the model's own next id, and the last guess when all were kept), fed at the start of
    the next proposal in one forward pass.
    """

    exact_draws = False

    def __init__(self, decoder: Decoder, confidence: float = 0.0):
        self.decoder = decoder
        self.confidence = confidence  # stop guessing after a guess the draft gives less than this probability
        self._pending: list[int] = []
        self._guesses: list[int] = []  # the last proposal's, all but the last of them fed

    def start(self, ids: Sequence[int], max_new_tokens: int) -> None:
        self.decoder.prefill(ids, max_new_tokens)
        self._pending, self._guesses = [], []

    def propose(self, last: int, k: int, options: SamplingOptions, generator: "torch.Generator | None",
                history: Seen | None = None) -> Proposal | None:
        import torch

        self._pending.append(last)
        self._guesses = []
        k = min(k, self.decoder.room() - len(self._pending) + 1)  # room for the pending ids and k - 1 guesses
        if k < 1:
            return None  # past the draft's cache: ``last`` stays pending
        logits = self.decoder.feed(self._pending)[-1:]  # (1, V)
        self._pending = []
        probs = []
        for i in range(k):
            rows_seen = [_seen(history).then(self._guesses)] if options.penalizes else None  # the model's penalties
            token = int(select_next(logits, options, generator, rows_seen)[0])
            if not options.greedy:
                probs.append(sampling_probs(logits, options, rows_seen)[0])
            self._guesses.append(token)
            if i == k - 1 or (self.confidence > 0 and self._doubtful(logits, token, probs)):
                break
            logits = self.decoder.feed([token])  # (1, V)
        return Proposal(list(self._guesses), torch.stack(probs) if probs else None)

    def _doubtful(self, logits: "torch.Tensor", token: int, probs: list) -> bool:
        """Whether the draft gave its guess less than ``confidence``: later guesses would likely be wasted.
        It depends on the draft alone, so the sampling rule stays exact."""
        import torch

        q = probs[-1] if probs else torch.softmax(logits[0].float(), dim=-1)
        return float(q[token]) < self.confidence

    def accepted(self, n: int, next_id: int) -> None:
        if not self._guesses:
            return  # nothing proposed: ``next_id`` comes as the next ``last``
        fed = len(self._guesses) - 1
        self.decoder.rollback(fed - min(n, fed))
        if n == len(self._guesses):  # all kept: the last guess was never fed
            self._pending = [self._guesses[-1]]
        self._guesses = []


class LookupDrafter:
    """Prompt lookup (Saxena, 2023): the ids that followed the latest earlier occurrence of the
    sequence's last ``n`` ids, longest ``n`` first (``max_ngram`` down to ``min_ngram``).

    The guess may run into the text it copies (a loop repeats itself), so it is read from the
    sequence as extended by the guess. No model, so no q: guesses are checked by drawing each
    position from the model (``exact_draws``).

    It switches itself off while it keeps missing: after ``patience`` checks in a row that kept
    nothing, it proposes nothing for ``backoff`` tokens (plain steps, which cost what plain decoding
    costs), doubling the pause each time that happens again (up to ``max_backoff``) and resetting it
    when a check keeps a guess. A wasted check costs about what the extra rows cost (a few percent
    of a step each on a CPU), so text that never repeats pays a few checks per pause.
    """

    exact_draws = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, patience: int = 2, backoff: int = 8,
                 max_backoff: int = 256):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.patience, self.first_backoff, self.max_backoff = patience, backoff, max_backoff
        self.ids: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> position after its latest earlier end
        self._indexed = 0  # ids[:_indexed] have their n-grams in the index
        self._misses = 0
        self._backoff = backoff
        self._paused = 0  # tokens left to go without proposing
        self.pauses = 0  # how many times it switched itself off
        self._guesses: list[int] = []  # the last proposal

    def start(self, ids: Sequence[int], max_new_tokens: int) -> None:
        self.ids = list(ids)
        self._index = {}
        self._indexed = 0
        self._misses, self._backoff, self._paused, self.pauses = 0, self.first_backoff, 0, 0

    def _update_index(self) -> None:
        # An n-gram enters the index once a token follows it, so the current suffix finds only
        # earlier occurrences.
        ids = self.ids
        for end in range(max(self._indexed, 1), len(ids)):  # n-grams ending at end - 1, followed by ids[end]
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self._index[tuple(ids[end - n : end])] = end
        self._indexed = max(self._indexed, len(ids))

    def propose(self, last: int, k: int, options: SamplingOptions, generator: "torch.Generator | None",
                history: Seen | None = None) -> Proposal | None:
        self.ids.append(last)
        self._guesses = []
        if self._paused > 0:
            self._paused -= 1
            return None
        self._update_index()
        ids = self.ids
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            start = self._index.get(tuple(ids[-n:]))
            if start is not None:
                seq = ids[start:]
                while len(seq) < k:  # the guess runs into itself: a loop goes on
                    seq.append(seq[len(seq) - (len(ids) - start)])
                self._guesses = seq[:k]
                return Proposal(list(self._guesses))
        return None

    def accepted(self, n: int, next_id: int) -> None:
        if not self._guesses:
            return  # nothing proposed: ``next_id`` comes as the next ``last``
        self.ids.extend(self._guesses[:n])
        self._guesses = []
        if n > 0:
            self._misses, self._backoff = 0, self.first_backoff
            return
        self._misses += 1
        if self._misses >= self.patience:
            self._misses = 0
            self._paused = self._backoff
            self._backoff = min(2 * self._backoff, self.max_backoff)
            self.pauses += 1


# ---------------------------------------------------------------------------------------------
# Checking guesses


def _seen(seen: Seen | None) -> Seen:
    return Seen([], 0) if seen is None else seen


def row_histories(seen: Seen | None, guesses: Sequence[int], options: SamplingOptions) -> list[Seen] | None:
    """Each check row's ids so far (row i: ``seen`` and the first i guesses, generated ids), for the
    penalties; None when there are none."""
    if not options.penalizes:
        return None
    return [_seen(seen).then(guesses[:i]) for i in range(len(guesses) + 1)]


def check_by_drawing(rows: "torch.Tensor", guesses: Sequence[int], options: SamplingOptions,
                     generator: "torch.Generator | None", seen: Seen | None = None) -> tuple[int, int]:
    """(guesses kept, the model's next id): each position's id is drawn from the model (argmax when
    greedy), exactly as plain decoding draws it, and the guess is kept while it equals the draw.
    ``seen``: every id before the check's first row, for the penalties."""
    histories = row_histories(seen, guesses, options)

    def draw(i: int) -> int:
        return int(select_next(rows[i : i + 1], options, generator, None if histories is None else [histories[i]])[0])

    for i, guess in enumerate(guesses):
        token = draw(i)
        if token != guess:
            return i, token
    return len(guesses), draw(len(guesses))


def check_by_rejection(rows: "torch.Tensor", proposal: Proposal, options: SamplingOptions,
                       generator: "torch.Generator", seen: Seen | None = None) -> tuple[int, int]:
    """(guesses kept, the model's next id) by the speculative sampling rule: keep guess d with
    probability min(1, p(d)/q(d)); at the first rejection draw from norm(max(0, p - q)); when all
    are kept, draw a bonus id from p. The ids then have the model's own distribution."""
    import torch

    assert proposal.probs is not None
    p_all = sampling_probs(rows, options, row_histories(seen, proposal.tokens, options)).double()  # (K+1, V)
    q_all = proposal.probs.double()  # (K, V)
    for i, guess in enumerate(proposal.tokens):
        p, q = p_all[i], q_all[i]
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        if u * float(q[guess]) < float(p[guess]):  # u < p/q, without dividing (q[guess] > 0: it was drawn)
            continue
        residual = (p - q).clamp(min=0)
        total = float(residual.sum())
        if total <= 0:  # p == q up to rounding: nothing to correct, draw from p
            residual, total = p, float(p.sum())
        return i, int(torch.multinomial((residual / total).float(), 1, generator=generator))
    return len(proposal.tokens), int(torch.multinomial(p_all[-1].float(), 1, generator=generator))


# ---------------------------------------------------------------------------------------------
# One generation


@dataclass
class SpeculativeStats:
    """What speculation did in one generation."""

    draft: str  # what drafted: "int8", a path, "lookup"
    draft_tokens: int  # K
    proposed: int = 0  # guesses checked
    accepted: int = 0  # guesses kept
    checks: int = 0  # forward passes of the model with guesses (K+1 rows or fewer)
    steps: int = 0  # one-token forward passes of the model (no guess: a miss, paused lookup, past the window)
    draft_s: float = 0.0  # time spent drafting, after the prefill
    draft_prefill_s: float = 0.0  # the draft's own prefill of the prompt (part of timings.prefill_s)
    pauses: int = 0  # prompt lookup: times it switched itself off

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def model_forwards(self) -> int:
        return self.checks + self.steps

    def tokens_per_forward(self, decode_tokens: int) -> float | None:
        """New ids per forward pass of the model after the prefill (1.0: no gain)."""
        return decode_tokens / self.model_forwards if self.model_forwards else None

    def to_json(self, decode_tokens: int, decode_s: float) -> dict:
        rate, per = self.acceptance_rate, self.tokens_per_forward(decode_tokens)
        return {
            "draft": self.draft, "draft_tokens": self.draft_tokens, "proposed": self.proposed,
            "accepted": self.accepted, "acceptance_rate": None if rate is None else round(rate, 4),
            "model_forwards": self.model_forwards, "checks": self.checks, "steps": self.steps,
            "tokens_per_model_forward": None if per is None else round(per, 4),
            "draft_s": round(self.draft_s, 6), "draft_prefill_s": round(self.draft_prefill_s, 6),
            "draft_share": round(self.draft_s / decode_s, 4) if decode_s > 0 else None,
            "lookup_pauses": self.pauses if self.draft == "lookup" else None,
        }

    def line(self, decode_tokens: int, decode_s: float) -> str:
        """One human line for ``--stats``."""
        rate, per = self.acceptance_rate, self.tokens_per_forward(decode_tokens)
        accept = "no guesses checked" if rate is None else f"acceptance {rate:.2f} ({self.accepted}/{self.proposed})"
        share = f"{100 * self.draft_s / decode_s:.0f}%" if decode_s > 0 else "n/a"
        paused = f", switched off {self.pauses}x" if self.draft == "lookup" and self.pauses else ""
        per_text = "n/a" if per is None else f"{per:.2f}"
        return (f"speculative: draft {self.draft}, K {self.draft_tokens}: {accept}, {per_text} tokens per model "
                f"forward ({self.checks} checks, {self.steps} plain steps), draft {share} of the decode time{paused}")


class SpeculativeGeneration(Generation):
    """``Generation`` with a draft: iterate for text pieces; ``token_ids``, ``text``, ``finish_reason``,
    ``timings`` and the ``observe`` hook as Generation's (each id with the model's logits for its
    position: the ones plain decoding computes there), and ``stats``. Greedy ids equal plain decoding's."""

    def __init__(self, decoder: Decoder, drafter: Drafter, prompt_token_ids: Sequence[int],
                 options: SamplingOptions, *, draft_tokens: int, draft_name: str, eos_id: int | None = EOT_ID,
                 token_bytes: Callable[[int], bytes] | None = None, context_length: int | None = None,
                 observe: "Callable[[torch.Tensor, list[int]], None] | None" = None):
        super().__init__(decoder, prompt_token_ids, options, eos_id=eos_id, token_bytes=token_bytes,
                         context_length=context_length, observe=observe)
        self.decoder: Decoder = decoder
        self.drafter = drafter
        self.draft_tokens = check_draft_tokens(draft_tokens)
        self.stats = SpeculativeStats(draft=draft_name, draft_tokens=draft_tokens)

    def _next_ids(self, last: int, generator: "torch.Generator | None") -> tuple[list[int], "torch.Tensor"]:
        """One forward pass of the model: the ids that follow ``last`` (one to K+1 of them) and the
        model's logits (n, V) they were picked from."""
        opts, stats = self.options, self.stats
        remaining = opts.max_new_tokens - len(self.token_ids)
        k = min(self.draft_tokens, remaining - 1, self.decoder.room() - 1)
        seq = self.sequence
        seen = Seen(list(seq.history), seq.prompt_length)  # plain decoding's history for the penalties (empty without)
        start = time.perf_counter()
        proposal = self.drafter.propose(last, k, opts, generator, seen) if k > 0 else None
        stats.draft_s += time.perf_counter() - start
        if proposal is None or not proposal.tokens:
            logits = self.decoder.step(last)  # (1, V)
            token = int(select_next(logits, opts, generator, [seen] if opts.penalizes else None)[0])
            stats.steps += 1
            self._accepted(0, token)
            return [token], logits
        guesses = proposal.tokens
        rows = self.decoder.feed([last, *guesses])  # (K+1, V)
        if opts.greedy or self.drafter.exact_draws or proposal.probs is None:
            kept, token = check_by_drawing(rows, guesses, opts, generator, seen)
        else:
            kept, token = check_by_rejection(rows, proposal, opts, generator, seen)
        self.decoder.rollback(len(guesses) - kept)
        stats.checks += 1
        stats.proposed += len(guesses)
        stats.accepted += kept
        self._accepted(kept, token)
        return [*guesses[:kept], token], rows[: kept + 1]

    def _accepted(self, kept: int, token: int) -> None:
        start = time.perf_counter()
        self.drafter.accepted(kept, token)
        self.stats.draft_s += time.perf_counter() - start
        self.stats.pauses = getattr(self.drafter, "pauses", 0)

    def _first(self) -> tuple[list[int], "torch.Tensor"]:
        """Prefill the model and start the draft; the first id and its logits (1, V)."""
        seq = self.sequence
        logits = self.decoder.prefill(seq.prompt_token_ids, self.options.max_new_tokens)  # (1, V)
        start = time.perf_counter()
        self.drafter.start(crop_prompt(seq.prompt_token_ids, self.decoder.context_length)[0],
                           self.options.max_new_tokens)
        self.stats.draft_prefill_s = time.perf_counter() - start
        return [seq.pick(logits)], logits

    def _advance(self, last: int) -> tuple[list[int], "torch.Tensor"]:
        return self._next_ids(last, self.sequence.generator)


# ---------------------------------------------------------------------------------------------
# From the command's options to a generation


@dataclass(frozen=True)
class SpeculativeOptions:
    """``--draft SOURCE`` (a model, or int8/int4 for the model's own quantized copy), ``--lookup``, ``--draft-tokens``."""

    draft: str | None = None
    lookup: bool = False
    draft_tokens: int | None = None  # None: the default for the kind of draft

    @property
    def enabled(self) -> bool:
        return self.draft is not None or self.lookup

    @property
    def self_draft(self) -> str | None:
        """The quantization scheme when the draft is the model's own copy, else None."""
        if self.draft is not None and self.draft.strip().lower() in SELF_DRAFTS:
            return self.draft.strip().lower()
        return None

    @property
    def tokens(self) -> int:
        if self.draft_tokens is not None:
            return self.draft_tokens
        if self.lookup:
            return DEFAULT_LOOKUP_TOKENS
        return DEFAULT_SELF_DRAFT_TOKENS if self.self_draft is not None else DEFAULT_DRAFT_TOKENS

    def validate(self, quantize: str | None = None) -> "SpeculativeOptions":
        """Raise UserError for combinations no decoder runs; ``quantize`` is the model's --quantize."""
        if self.draft is not None and self.lookup:
            raise UserError("--draft and --lookup are two kinds of draft; choose one")
        if self.draft is not None and not self.draft.strip():
            raise UserError("--draft needs a model (a path, a Hub id) or int8/int4")
        if self.draft_tokens is not None:
            if not self.enabled:
                raise UserError("--draft-tokens sets how many tokens a draft guesses; add --draft SOURCE or --lookup")
            check_draft_tokens(self.draft_tokens)
        if self.self_draft is not None and quantize is not None and self.self_draft == quantize:
            raise UserError(f"--draft {self.self_draft} drafts with the {self.self_draft} copy of the model, which is "
                            f"already --quantize {quantize}: nothing to gain; drop one")
        return self


def draft_inference_options(spec: SpeculativeOptions, target: "InferenceOptions", *,
                            compile: bool = False) -> "InferenceOptions":
    """How to load the draft through ``gptcli.runtime.load_for_inference``: the model's own weights
    quantized (half-precision activations, as the quantized kernels want), or another model on the
    same device, in the model's dtype; ``compile``: kernels for compiled one-token steps."""
    kernels = "compiled" if compile else "eager"
    scheme = spec.self_draft
    if scheme is not None:
        dtype = target.dtype if target.dtype in ("bfloat16", "float16") else "auto"
        return replace(target, quantize=scheme, dtype=dtype, kernels=kernels)
    assert spec.draft is not None
    return replace(target, size=None, config=None, weights=spec.draft.strip(), quantize=None, kernels=kernels)


def check_same_vocabulary(target: "Runtime", draft: "Runtime", source: str) -> None:
    """UserError unless the draft speaks the model's tokenizer with the model's vocabulary."""
    mine, theirs = target.tokenizer, draft.tokenizer
    if mine.to_metadata() != theirs.to_metadata() or target.cfg.vocab_size != draft.cfg.vocab_size:
        raise UserError(f"--draft {source}: its tokenizer ({theirs.name}, vocab_size {draft.cfg.vocab_size}) is not "
                        f"the model's ({mine.name}, vocab_size {target.cfg.vocab_size}); a draft must have the same "
                        "tokenizer and vocabulary")


class Speculator:
    """The model and its draft, set up once for speculative generations one after another
    (``generate --num-samples``, the turns of a session): the decoders, their caches and a compiled
    draft step are kept between them.

    ``compile``: the draft model's one-token steps run one torch.compile'd graph (``generate
    --compile --draft``); the model's checks stay eager, so the ids stay plain eager decoding's.
    ``decoder`` / ``draft_decoder``: decoders to use instead of new ones (a session's, which keep
    their cache between turns). ``confidence``: a model draft stops guessing after a guess it gives
    less probability (default ``DRAFT_CONFIDENCE``).
    """

    def __init__(self, spec: SpeculativeOptions, target: "Runtime", draft: "Runtime | None", *,
                 compile: bool = False, decoder: Decoder | None = None, draft_decoder: Decoder | None = None,
                 confidence: float | None = None):
        if not spec.enabled:
            raise ValueError("Speculator needs --draft or --lookup")
        self.spec, self.target = spec, target
        self.decoder = decoder or Decoder(target.model, target.device, target.dtype)
        self.drafter: Drafter
        if spec.lookup:
            self.drafter, self.name = LookupDrafter(), "lookup"
        else:
            assert draft is not None and spec.draft is not None
            check_same_vocabulary(target, draft, spec.draft)
            if draft_decoder is None:
                kind = CompiledDecoder if compile else Decoder
                draft_decoder = kind(draft.model, draft.device, draft.dtype)
            self.drafter = ModelDrafter(draft_decoder, DRAFT_CONFIDENCE if confidence is None else confidence)
            self.name = spec.draft

    def warm_up(self, positions: int) -> float | None:
        """Compile the draft's step now, for sequences of ``positions`` tokens; the seconds (None: nothing to compile)."""
        draft_decoder = getattr(self.drafter, "decoder", None)
        return draft_decoder.warm_up(positions) if isinstance(draft_decoder, CompiledDecoder) else None

    def generation(self, prompt_token_ids: Sequence[int], options: SamplingOptions, *,
                   observe: "Callable[[torch.Tensor, list[int]], None] | None" = None) -> SpeculativeGeneration:
        """A generation from ``prompt_token_ids`` (``observe``: ``Generation``'s hook, e.g. a logprobs Recorder)."""
        tokenizer = self.target.tokenizer
        return SpeculativeGeneration(self.decoder, self.drafter, prompt_token_ids, options,
                                     draft_tokens=self.spec.tokens, draft_name=self.name, eos_id=tokenizer.eot_id,
                                     token_bytes=tokenizer.token_bytes,
                                     context_length=self.target.cfg.context_length, observe=observe)
