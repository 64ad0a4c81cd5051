"""Continuous batching for ``gptcli serve``: requests join a running batch between decode steps. Never prints.

No web code here: the HTTP layer (``gptcli.serving.server``) turns requests into ``RowRequest``s, ``submit``s
them with a sink, and renders the ``RowEvent``s the sink receives.

One background thread owns the model. Between two decode steps it ends the rows that finished or were
cancelled, admits waiting rows (up to ``max_batch``; they are prefilled in a forward call of their
own and join the batch, see ``gptcli.decoding.batch.BatchLoop``) and runs work that needs the
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

from gptcli.kernels.decode import BATCH_ROWS
from gptcli.decoding.generate import SamplingOptions, SequenceState

if TYPE_CHECKING:
    import torch

    from gptcli.decoding.batch import BatchLoop
    from gptcli.decoding.logprobs import TokenLogprob
    from gptcli.runtime import Runtime

# The batch sizes whose rows gptcli.kernels.decode checks to be invariant on this CPU when it chooses
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


class Engine:
    """Continuous batching over one model; ``start`` it, ``submit`` work, ``close`` it.

    ``max_batch``: rows decoded together; ``max_queue``: rows that may wait for a place (``submit``
    raises QueueFull beyond it). ``eos_id`` and ``token_bytes`` come from the model's tokenizer.
    """

    def __init__(self, runtime: "Runtime", *, max_batch: int = CHECKED_BATCH_ROWS, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be 1 or more and max_queue 0 or more")
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eos_id = runtime.tokenizer.eot_id
        self.token_bytes = runtime.tokenizer.token_bytes
        self._loop = self._new_loop()
        self._owners: dict[int, tuple[Ticket, int]] = {}  # id(sequence) -> (ticket, row index), while it runs
        self._waiting: deque[tuple[Ticket, int]] = deque()  # (ticket, row index) not yet admitted
        self._places = 0  # rows running or being admitted (set by the engine's thread, under the lock)
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
            free = max(0, self.max_batch - self._places)
            if len(self._waiting) + len(rows) > self.max_queue + free:
                raise QueueFull(f"{len(self._waiting)} rows are waiting already")
            self._waiting.extend((ticket, i) for i in range(len(rows)))
            self._lock.notify()
        return ticket

    def prompt_logprobs(self, ids: Sequence[int], k: int) -> "Future[list[TokenLogprob]]":
        """Every token's log-probability under the model (the first has none), and the ``k`` likeliest
        at each position; computed in the engine's thread between steps."""
        from gptcli.decoding.logprobs import sequence_logprobs

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
            return {"running": len(self._loop.running), "waiting": len(self._waiting), "steps": self.steps,
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
                while not (self._closing or self._waiting or self._loop.running or self._calls):
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
                    self._admit(newcomers)
                    self._release_finished()
                if self._loop.running:
                    self.steps += 1
                    self._send(self._loop.step())
                    self._release_finished()
            except Exception as exc:  # noqa: BLE001 - a bug must not take the server down with it
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")
        self._fail_all("the server is shutting down")

    def _take_newcomers(self) -> list[tuple[Ticket, int]]:
        """Waiting rows for the free places, first come first served (called under the lock)."""
        room = self.max_batch - len(self._loop.running)
        taken = []
        while self._waiting and len(taken) < room:
            ticket, index = self._waiting.popleft()
            if ticket.cancelled:
                continue
            taken.append((ticket, index))
        while self._waiting and self._waiting[0][0].cancelled:
            self._waiting.popleft()
        self._places += len(taken)  # they hold their places while they are prefilled
        return taken

    @staticmethod
    def _run_call(fn: Callable[[], object], future: Future) -> None:
        try:
            future.set_result(fn())
        except Exception as exc:  # noqa: BLE001 - the caller gets it
            future.set_exception(exc)

    def _admit(self, newcomers: list[tuple[Ticket, int]]) -> None:
        joining = []
        for ticket, index in newcomers:
            request = ticket.rows[index]
            seq = SequenceState(request.prompt_ids, request.options, eos_id=self.eos_id, token_bytes=self.token_bytes)
            self._owners[id(seq)] = (ticket, index)
            if seq.done:  # max_tokens 0 runs nothing
                self._finish(seq, None, "", None)
            else:
                joining.append(seq)
        with self._lock:
            self._places -= len(newcomers) - len(joining)  # ended at once: they take no place
        running = len(self._loop.running)
        events = self._loop.admit(joining)
        self.admitted += len(joining)
        self.joined += len(joining) if running else 0
        self.peak_rows = max(self.peak_rows, len(self._loop.running))
        self._send(events)

    def _send(self, events: list[tuple[SequenceState, int, "torch.Tensor", str]]) -> None:
        """Each row's new id on to its ticket, with its log-probabilities when the request asked."""
        from gptcli.decoding.logprobs import step_logprobs

        for seq, token_id, logits, text in events:
            k = self._owners[id(seq)][0].rows[self._owners[id(seq)][1]].logprobs
            self._finish(seq, token_id, text, None if k is None else step_logprobs(logits, [token_id], k)[0])

    def _finish(self, seq: SequenceState, token_id: int | None, text: str, logprob: "TokenLogprob | None") -> None:
        """Send a row's event; its last one carries the finish reason."""
        ticket, index = self._owners[id(seq)]
        try:
            ticket.sink(RowEvent(index, token_id, text, logprob, seq.finish_reason))
        except Exception:  # noqa: BLE001 - a sink that fails has nobody listening: free its rows
            ticket.cancel()
        if seq.done:
            del self._owners[id(seq)]

    def _release_finished(self) -> None:
        """Finished rows and those of cancelled tickets leave the batch."""
        before = self._loop.running
        self._loop.release(lambda seq: self._owners[id(seq)][0].cancelled)
        still = {id(seq) for seq in self._loop.running}
        for seq in before:
            if id(seq) not in still:
                self._owners.pop(id(seq), None)
        with self._lock:
            self._places -= len(before) - len(self._loop.running)

    def _emit_error(self, ticket: Ticket, index: int, message: str) -> None:
        try:
            ticket.sink(RowEvent(index, None, "", None, "error", message))
        except Exception:  # noqa: BLE001 - a sink that fails must not stop the others
            pass

    def _fail_all(self, message: str) -> None:
        """End every running and waiting row with an error, and start again from an empty batch."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for seq in self._loop.running:
            if not seq.done and id(seq) in self._owners:
                ticket, index = self._owners[id(seq)]
                self._emit_error(ticket, index, message)
        for ticket, index in waiting:
            self._emit_error(ticket, index, message)
        self._owners.clear()
        self._loop = self._new_loop()
        with self._lock:
            self._places = 0

    def _new_loop(self) -> "BatchLoop":
        from gptcli.decoding.batch import BatchDecoder, BatchLoop

        return BatchLoop(BatchDecoder(self.runtime.model, self.runtime.device, self.runtime.dtype))
