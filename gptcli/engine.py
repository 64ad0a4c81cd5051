"""Continuous batching for ``gptcli serve``: requests join a running batch between decode steps. Never prints.

No web code here: the HTTP layer (``gptcli.server``) turns requests into ``RowRequest``s, ``submit``s
them with a sink, and renders the ``RowEvent``s the sink receives.

One background thread owns the model. Between two decode steps it ends the rows that finished or were
cancelled, admits waiting rows (up to ``max_batch``; they are prefilled in a forward call of their
own and join the batch, see ``gptcli.batch.ContinuousBatchDecoder``) and runs work that needs the
model alone (a prompt's own log-probabilities for ``echo``). Every row samples from its own
generator, seeded as ``gptcli generate --seed`` seeds it, so on the CPU a row's ids are the ones it
gets alone, whatever else runs beside it.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from gptcli.decode_kernels import BATCH_ROWS
from gptcli.generate import Continuation, SamplingOptions, make_generator, select_next

if TYPE_CHECKING:
    import torch

    from gptcli.logprobs import TokenLogprob
    from gptcli.runtime import Runtime

# The batch sizes whose rows gptcli.decode_kernels checks to be invariant on this CPU when it chooses
# the kernels: 2..BATCH_ROWS (one row is multiplied as two). A larger --max-batch runs, unchecked.
CHECKED_BATCH_ROWS = BATCH_ROWS


class QueueFull(Exception):
    """More rows wait than the queue holds: try again later."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new work."""


@dataclass(frozen=True)
class RowRequest:
    """One sequence to continue (one choice of a request): its ids, how to sample, and the number of
    likeliest tokens to report at each step (None: no log-probabilities)."""

    prompt_ids: tuple[int, ...]
    options: SamplingOptions
    logprobs: int | None = None


@dataclass(frozen=True)
class RowEvent:
    """What a row produced in one step: a token and the text it made printable (often '' when the
    token is half a character or could begin a stop string). ``finish_reason`` is set on a row's
    last event: gptcli's ``eos``, ``stop`` or ``length``; ``error`` (with ``message``) when the engine
    could not go on. An error event has no token."""

    row: int
    token_id: int | None
    text: str
    logprob: "TokenLogprob | None" = None
    finish_reason: str | None = None
    message: str | None = None


Sink = Callable[[RowEvent], None]


class Ticket:
    """A submitted request: ``cancel()`` frees its rows at the next step (a client went away)."""

    def __init__(self, rows: Sequence[RowRequest], sink: Sink):
        self.rows = tuple(rows)
        self.sink = sink
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    ticket: Ticket
    index: int
    continuation: Continuation
    generator: "torch.Generator | None"
    last_id: int = -1

    @property
    def request(self) -> RowRequest:
        return self.ticket.rows[self.index]


class Engine:
    """Continuous batching over one model; ``start`` it, ``submit`` work, ``close`` it.

    ``max_batch``: rows decoded together; ``max_queue``: rows that may wait for a place (``submit``
    raises QueueFull beyond it). ``eos_id`` and ``token_bytes`` come from the model's tokenizer.
    """

    def __init__(self, runtime: "Runtime", *, max_batch: int = CHECKED_BATCH_ROWS, max_queue: int = 64):
        from gptcli.batch import ContinuousBatchDecoder

        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be 1 or more and max_queue 0 or more")
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eos_id = runtime.tokenizer.eot_id
        self.token_bytes = runtime.tokenizer.token_bytes
        self._decoder = ContinuousBatchDecoder(runtime.model, runtime.device, runtime.dtype)
        self._active: list[_Row] = []  # in the decoder's row order
        self._waiting: deque[tuple[Ticket, int]] = deque()  # (ticket, row index) not yet admitted
        self._admitting = 0  # rows taken from the queue, being prefilled: in neither list, but holding places
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._lock = threading.Condition()
        self._draining = False  # no new work; what runs finishes
        self._closing = False  # stop now
        self._thread = threading.Thread(target=self._run, name="gptcli-engine", daemon=True)
        # Counts since start, for /health: decode steps, rows admitted, rows that joined a batch
        # already running, and the most rows ever decoded together.
        self.steps = self.admitted = self.joined = self.peak_rows = 0

    # ------------------------------------------------------------------ the caller's side

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, rows: Sequence[RowRequest], sink: Sink) -> Ticket:
        """Queue these rows; ``sink`` receives their events from the engine's thread (keep it quick)."""
        ticket = Ticket(rows, sink)
        with self._lock:
            if self._draining or self._closing:
                raise EngineClosed("the server is shutting down")
            free = max(0, self.max_batch - len(self._active) - self._admitting)
            if len(self._waiting) + len(rows) > self.max_queue + free:
                raise QueueFull(f"{len(self._waiting)} rows are waiting already")
            self._waiting.extend((ticket, i) for i in range(len(rows)))
            self._lock.notify()
        return ticket

    def prompt_logprobs(self, ids: Sequence[int], k: int) -> "Future[list[TokenLogprob]]":
        """Every token's log-probability under the model (the first has none), and the ``k`` likeliest
        at each position; computed in the engine's thread between steps."""
        from gptcli.logprobs import sequence_logprobs

        def run() -> list["TokenLogprob"]:
            import torch

            with torch.inference_mode():
                x = torch.tensor([list(ids)], dtype=torch.long, device=self.runtime.device)  # (1, T)
                logits = self.runtime.model(x)[0]  # (T, V)
            return sequence_logprobs(logits, list(ids), k)

        return self._call(run)

    def _call(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closing or self._draining:
                raise EngineClosed("the server is shutting down")
            if len(self._calls) >= self.max_queue + 1:
                raise QueueFull(f"{len(self._calls)} calls are waiting already")
            self._calls.append((fn, future))
            self._lock.notify()
        return future

    def load(self) -> dict[str, int]:
        """Rows running and waiting now, and the counts since start."""
        with self._lock:
            return {"running": len(self._active), "waiting": len(self._waiting), "steps": self.steps,
                    "admitted": self.admitted, "joined": self.joined, "peak_rows": self.peak_rows}

    def drain(self) -> None:
        """Take no new work; what waits is refused (an ``error`` event), what runs goes on to its end."""
        with self._lock:
            self._draining = True
            refused = list(self._waiting)
            self._waiting.clear()
            calls = list(self._calls)
            self._calls.clear()
            self._lock.notify()
        for ticket, index in refused:
            self._emit_error(ticket, index, "the server is shutting down")
        for _, future in calls:
            future.set_exception(EngineClosed("the server is shutting down"))

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread; rows still running get an ``error`` event."""
        self.drain()
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine's thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._waiting or self._active or self._calls):
                    self._lock.wait()
                if self._closing:
                    break
                calls = list(self._calls)
                self._calls.clear()
                newcomers = self._take_newcomers()
            try:
                for fn, future in calls:
                    self._run_call(fn, future)
                self._release_finished()
                if newcomers:
                    try:
                        self._admit(newcomers)
                    finally:
                        with self._lock:
                            self._admitting = 0
                    self._release_finished()
                if self._active:
                    self._step()
                    self._release_finished()
            except Exception as exc:  # noqa: BLE001 - a bug must not take the server down with it
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")
        self._fail_all("the server is shutting down")

    def _take_newcomers(self) -> list[tuple[Ticket, int]]:
        """Waiting rows for the free places, first come first served (called under the lock)."""
        room = self.max_batch - len(self._active)
        taken = []
        while self._waiting and len(taken) < room:
            ticket, index = self._waiting.popleft()
            if ticket.cancelled:
                continue
            taken.append((ticket, index))
        while self._waiting and self._waiting[0][0].cancelled:
            self._waiting.popleft()
        self._admitting = len(taken)
        return taken

    @staticmethod
    def _run_call(fn: Callable[[], object], future: Future) -> None:
        try:
            future.set_result(fn())
        except Exception as exc:  # noqa: BLE001 - the caller gets it
            future.set_exception(exc)

    def _admit(self, newcomers: list[tuple[Ticket, int]]) -> None:
        rows = []
        for ticket, index in newcomers:
            request = ticket.rows[index]
            continuation = Continuation(request.options, self.eos_id, self.token_bytes)
            generator = None if request.options.greedy else make_generator(request.options.seed)
            rows.append(_Row(ticket, index, continuation, generator))
        starting = [r for r in rows if not r.continuation.done]  # max_tokens 0 runs nothing
        for row in rows:
            if row.continuation.done:
                self._finish(row, None, "", None)
        if not starting:
            return
        logits = self._decoder.admit([r.request.prompt_ids for r in starting],
                                     [r.request.options.max_new_tokens for r in starting])  # (k, V)
        self.admitted += len(starting)
        self.joined += len(starting) if self._active else 0
        with self._lock:  # from "admitting" to active in one move, as submit counts places
            self._active += starting
            self._admitting = 0
        self.peak_rows = max(self.peak_rows, len(self._active))
        for k, row in enumerate(starting):
            self._accept(row, logits[k : k + 1])

    def _step(self) -> None:
        logits = self._decoder.step([row.last_id for row in self._active])  # (B, V)
        self.steps += 1
        for k, row in enumerate(self._active):
            self._accept(row, logits[k : k + 1])

    def _accept(self, row: _Row, logits: "torch.Tensor") -> None:
        """Pick the row's next id from its logits (1, V) and send it on."""
        from gptcli.logprobs import step_logprobs

        request = row.request
        token_id = int(select_next(logits, request.options, row.generator)[0])
        logprob = None if request.logprobs is None else step_logprobs(logits, [token_id], request.logprobs)[0]
        row.last_id = token_id
        text = row.continuation.accept(token_id)
        self._finish(row, token_id, text, logprob)

    def _finish(self, row: _Row, token_id: int | None, text: str, logprob: "TokenLogprob | None") -> None:
        """Send a row's event; its last one carries the finish reason."""
        try:
            row.ticket.sink(RowEvent(row.index, token_id, text, logprob, row.continuation.finish_reason))
        except Exception:  # noqa: BLE001 - a sink that fails has nobody listening: free its rows
            row.ticket.cancel()

    def _release_finished(self) -> None:
        keep = [k for k, row in enumerate(self._active) if not row.continuation.done and not row.ticket.cancelled]
        if len(keep) < len(self._active):
            self._decoder.release(keep)
            self._active = [self._active[k] for k in keep]

    def _emit_error(self, ticket: Ticket, index: int, message: str) -> None:
        try:
            ticket.sink(RowEvent(index, None, "", None, "error", message))
        except Exception:  # noqa: BLE001 - a sink that fails must not stop the others
            pass

    def _fail_all(self, message: str) -> None:
        """End every running and waiting row with an error, and start again from an empty batch."""
        from gptcli.batch import ContinuousBatchDecoder

        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for row in self._active:
            if not row.continuation.done:
                self._emit_error(row.ticket, row.index, message)
        for ticket, index in waiting:
            self._emit_error(ticket, index, message)
        self._active = []
        self._decoder = ContinuousBatchDecoder(self.runtime.model, self.runtime.device, self.runtime.dtype)
