"""``GET /metrics`` for ``gptcli serve``: counters, gauges and histograms in Prometheus' text exposition
format (version 0.0.4), written here rather than with prometheus_client (a dependency for ~100 lines).
No web code; ``gptcli.serving.server`` records into a ``ServerMetrics`` and serves ``render()``. Never prints.

The format, as Prometheus documents it: for each metric family a ``# HELP name text`` and a
``# TYPE name counter|gauge|histogram`` line, then one ``name{label="value",...} number`` line per
series. A histogram is cumulative ``name_bucket{le="..."}`` series (each bucket counts every
observation at most its bound, so they never decrease), ending with ``le="+Inf"``, which equals
``name_count``, and ``name_sum``. Updates come from the event loop and the engine's thread, so each
metric holds a lock.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from typing import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. A request runs from a few milliseconds (a refusal, /health) to minutes (1024 tokens at a
# few tokens a second under load); the first token comes after the queue wait and one prefill.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    """A label value as the format writes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = (*labels, *extra)
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


class Counter:
    """A count that only goes up, one series per label values."""

    kind = "counter"

    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(label_names)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(str(labels[n]) for n in self.label_names), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return [f"{self.name}{_labels(tuple(zip(self.label_names, key)))} {_number(v)}" for key, v in items]


class Gauge:
    """A value read when scraped (``read`` returns it)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(self.read())}"]


class Histogram:
    """Observations counted into buckets by upper bound, one series set per label values."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], label_names: Sequence[str] = ()):
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("buckets must be increasing")
        self.name, self.help, self.label_names = name, help, tuple(label_names)
        self.bounds = tuple(float(b) for b in buckets)
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # (bucket counts, [sum])
        self._lock = threading.Lock()

    def touch(self, **labels: str) -> None:
        """Create these labels' series with no observations, so it is scraped (as zeros) before any."""
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self._series.setdefault(key, ([0] * (len(self.bounds) + 1), [0.0]))

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        index = bisect_left(self.bounds, value)  # the first bound >= value; len(bounds) is +Inf only
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.bounds) + 1), [0.0]))
            counts[index] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(tuple(str(labels[n]) for n in self.label_names))
            return sum(series[0]) if series else 0

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._series.items())
        if not items and not self.label_names:
            items = [((), ([0] * (len(self.bounds) + 1), 0.0))]
        lines = []
        for key, (counts, total) in items:
            labels = tuple(zip(self.label_names, key))
            running = 0
            for bound, n in zip((*self.bounds, math.inf), counts):
                running += n  # cumulative: every observation at most this bound
                lines.append(f"{self.name}_bucket{_labels(labels, (('le', _number(bound)),))} {running}")
            lines.append(f"{self.name}_sum{_labels(labels)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(labels)} {running}")
        return lines


Metric = Counter | Gauge | Histogram


def render(metrics: Iterable[Metric]) -> str:
    """The exposition text of ``metrics``: HELP, TYPE and samples for each, ending in a newline."""
    lines = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        lines += metric.samples()
    return "\n".join(lines) + "\n"


# The endpoints a series may name; anything else is "other", so a scan of random paths cannot grow
# the number of series without bound.
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
             "/detokenize")


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class ServerMetrics:
    """What ``gptcli serve`` reports at /metrics. ``load`` reads the engine's rows running and waiting."""

    def __init__(self, load: Callable[[], dict[str, int]]):
        self.requests = Counter("gptcli_requests_total", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter("gptcli_prompt_tokens_total",
                                     "Prompt tokens of the completions answered (usage.prompt_tokens).")
        self.completion_tokens = Counter("gptcli_completion_tokens_total",
                                         "Tokens generated for the completions answered (usage.completion_tokens).")
        self.queue = Gauge("gptcli_queue_rows", "Rows (choices) waiting for a place in the batch.",
                           lambda: load()["waiting"])
        self.rows = Gauge("gptcli_batch_rows", "Rows (choices) being decoded together now.",
                          lambda: load()["running"])
        self.latency = Histogram("gptcli_request_duration_seconds", "Seconds from a request's arrival to the end "
                                 "of its response (a stream's last byte), by endpoint.", LATENCY_BUCKETS,
                                 ("endpoint",))
        self.ttft = Histogram("gptcli_time_to_first_token_seconds", "Seconds from a completion request's arrival "
                              "to its first generated token, by endpoint.", TTFT_BUCKETS, ("endpoint",))
        for endpoint in ("/v1/completions", "/v1/chat/completions"):  # there from the first scrape
            self.latency.touch(endpoint=endpoint)
            self.ttft.touch(endpoint=endpoint)

    def all(self) -> tuple[Metric, ...]:
        return (self.requests, self.prompt_tokens, self.completion_tokens, self.queue, self.rows, self.latency,
                self.ttft)

    def render(self) -> str:
        return render(self.all())

    def count_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)


class MetricsMiddleware:
    """Plain ASGI, outermost: counts every HTTP response by endpoint and status, and times it from the
    request's arrival to its last body byte (streams included), without touching what passes through."""

    def __init__(self, app, metrics: ServerMetrics, clock: Callable[[], float]):
        self.app = app
        self.metrics = metrics
        self.clock = clock

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = self.clock()
        endpoint = endpoint_label(scope["path"])
        state = {"status": None, "done": False}

        def record() -> None:
            if not state["done"]:
                state["done"] = True
                status = state["status"] if state["status"] is not None else 500
                self.metrics.requests.inc(endpoint=endpoint, status=str(status))
                self.metrics.latency.observe(self.clock() - start, endpoint=endpoint)

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, counting_send)
        finally:
            record()  # a stream whose client went away ends without a last body message
