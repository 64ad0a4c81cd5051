"""gptcli.serving.engine without HTTP: rows submitted while others run get their lone ids; cancel, queue and drain."""

from __future__ import annotations

import threading
import time

import torch

from gptcli.serving.engine import Engine, EngineClosed, QueueFull, RowRequest
from gptcli.decoding.generate import Decoder, Generation, SamplingOptions
from gptcli.runtime import Runtime
from helpers import lively_model

CPU = torch.device("cpu")


class FakeTokenizer:
    eot_id = None

    @staticmethod
    def token_bytes(token_id: int) -> bytes:
        return f"<{token_id}>".encode()


def runtime(seed: int = 3) -> Runtime:
    model = lively_model(seed)
    return Runtime(model=model, cfg=model.cfg, tokenizer=FakeTokenizer(), device=CPU, dtype=torch.float32,
                   source="test", checkpoint=None, load_seconds=0.0)


class Collector:
    """A sink: every event of a ticket, and an Event set once all its rows have finished."""

    def __init__(self, rows: int):
        self.events = []
        self.open = rows
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.open -= 1
            if self.open == 0:
                self.done.set()

    def ids(self, row: int = 0) -> list[int]:
        return [e.token_id for e in self.events if e.row == row and e.token_id is not None]


def test_rows_submitted_while_others_run_get_their_lone_ids():
    rt = runtime()
    engine = Engine(rt, max_batch=4, max_queue=32).start()
    try:
        jobs = [([1 + i, 2, 3][: 1 + i % 3] * (1 + i % 5), SamplingOptions(max_new_tokens=4 + 3 * i,
                 temperature=0.0 if i % 2 else 1.0, seed=i, ignore_eos=True)) for i in range(10)]
        sinks = []
        for i, (prompt, options) in enumerate(jobs):
            sinks.append(Collector(1))
            engine.submit([RowRequest(tuple(prompt), options)], sinks[-1])
            time.sleep(0.002 * (i % 3))  # some arrive while others run
        for sink in sinks:
            assert sink.done.wait(60)
        assert engine.load()["peak_rows"] == 4 and engine.load()["joined"] > 0
        for (prompt, options), sink in zip(jobs, sinks):
            alone = Generation(Decoder(rt.model, CPU, torch.float32), prompt, options, eos_id=None,
                               token_bytes=FakeTokenizer.token_bytes).run()
            assert sink.ids() == alone.token_ids
            assert "".join(e.text for e in sink.events) == alone.text
            assert sink.events[-1].finish_reason == "length"
    finally:
        engine.close(timeout=10)


def test_cancel_frees_the_rows_at_the_next_step():
    engine = Engine(runtime(), max_batch=2, max_queue=2).start()
    try:
        sink = Collector(2)
        long = RowRequest((1, 2), SamplingOptions(max_new_tokens=100_000, temperature=1.0, ignore_eos=True))
        ticket = engine.submit([long, long], sink)
        deadline = time.monotonic() + 30
        while len(sink.events) < 6 and time.monotonic() < deadline:
            time.sleep(0.001)
        ticket.cancel()
        while engine.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.load()["running"] == 0 and len(sink.events) < 100_000
    finally:
        engine.close(timeout=10)


def test_a_full_queue_refuses_and_draining_refuses_what_waits():
    engine = Engine(runtime(), max_batch=1, max_queue=1).start()
    try:
        long = RowRequest((1,), SamplingOptions(max_new_tokens=400, temperature=0.0, ignore_eos=True))
        running, waiting = Collector(1), Collector(1)
        engine.submit([long], running)
        deadline = time.monotonic() + 30
        while engine.load()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.submit([long], waiting)
        try:
            engine.submit([long], Collector(1))
            raise AssertionError("a third row fitted in a queue of one")
        except QueueFull:
            pass
        engine.drain()
        assert waiting.done.wait(10) and waiting.events[-1].finish_reason == "error"
        assert "shutting down" in waiting.events[-1].message
        try:
            engine.submit([long], Collector(1))
            raise AssertionError("a draining engine took new work")
        except EngineClosed:
            pass
        assert running.done.wait(60) and len(running.ids()) == 400  # what ran went on to its end
    finally:
        engine.close(timeout=10)


def test_rows_being_admitted_hold_their_places():
    """--max-batch 1 --max-queue 0: while the first row is prefilled (in neither the queue nor the batch),
    a second request is refused, as the help promises, rather than waiting."""
    engine = Engine(runtime(), max_batch=1, max_queue=0)
    decoder_admit, entered, release = engine._loop.decoder.admit, threading.Event(), threading.Event()

    def slow_admit(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return decoder_admit(*args, **kwargs)

    engine._loop.decoder.admit = slow_admit
    engine.start()
    try:
        first = Collector(1)
        engine.submit([RowRequest((1,), SamplingOptions(max_new_tokens=3, temperature=0.0))], first)
        assert entered.wait(30)
        try:
            engine.submit([RowRequest((2,), SamplingOptions(max_new_tokens=3, temperature=0.0))], Collector(1))
            raise AssertionError("a row waited in a queue of 0 while the batch of 1 was being filled")
        except QueueFull:
            pass
        release.set()
        assert first.done.wait(30) and len(first.ids()) == 3
        second = Collector(1)  # once the first has finished, there is room again
        deadline = time.monotonic() + 30
        while engine.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.submit([RowRequest((2,), SamplingOptions(max_new_tokens=3, temperature=0.0))], second)
        assert second.done.wait(30) and len(second.ids()) == 3
    finally:
        release.set()
        engine.close(timeout=10)


def test_max_tokens_zero_runs_nothing():
    engine = Engine(runtime(), max_batch=2).start()
    try:
        sink = Collector(1)
        engine.submit([RowRequest((5, 6), SamplingOptions(max_new_tokens=0))], sink)
        assert sink.done.wait(10)
        assert [(e.token_id, e.finish_reason) for e in sink.events] == [(None, "length")]
        assert engine.load()["admitted"] == 0
    finally:
        engine.close(timeout=10)
