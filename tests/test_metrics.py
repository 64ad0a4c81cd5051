"""gptcli.serving.metrics on its own: Prometheus' text exposition format (0.0.4), read back by a strict parser
that the server's /metrics must pass too (tests/test_serve.py)."""

from __future__ import annotations

import math
import re

import pytest

from gptcli.serving.metrics import Counter, Gauge, Histogram, endpoint_label, render

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
VALUE = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|Inf)|NaN"
HELP_LINE = re.compile(rf"# HELP ({NAME}) [^\n]*")
TYPE_LINE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)")
SAMPLE_LINE = re.compile(rf"({NAME})(\{{(?:{LABEL}(?:,{LABEL})*)?\}})? ({VALUE})")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _number(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf, "Inf": math.inf}.get(text, None) or float(text)


def parse_exposition(text: str) -> dict[str, dict]:
    """Prometheus' text format, strictly: every line a HELP, a TYPE or a sample of the family typed just
    before it; histograms checked (cumulative buckets, increasing bounds, +Inf last and equal to _count).
    Returns {family: {"type", "help", "samples": {(name, ((label, value), ...)): number}}}."""
    assert text.endswith("\n") and "\n\n" not in text
    families: dict[str, dict] = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            m = HELP_LINE.fullmatch(line)
            assert m, line
            assert m.group(1) not in families, f"family {m.group(1)} twice"
            current = families[m.group(1)] = {"help": line.split(" ", 3)[3], "type": None, "samples": {}}
            continue
        if line.startswith("# TYPE "):
            m = TYPE_LINE.fullmatch(line)
            assert m and current is not None and families.get(m.group(1)) is current, line
            current["type"] = m.group(2)
            continue
        m = SAMPLE_LINE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        family = next(f for f in families if name == f or (families[f]["type"] == "histogram" and name in (
            f + "_bucket", f + "_sum", f + "_count")))
        assert families[family] is current and current["type"], line  # typed, and under its own HELP/TYPE
        if current["type"] == "counter":
            assert name.endswith("_total")
        key = (name, tuple(LABEL_PAIR.findall(labels)))
        assert key not in current["samples"], f"series twice: {line}"
        current["samples"][key] = _number(value)
    for name, family in families.items():
        if family["type"] == "histogram":
            _check_histogram(name, family["samples"])
    return families


def _check_histogram(name: str, samples: dict) -> None:
    series: dict[tuple, list[tuple[float, float]]] = {}
    for (sample, labels), value in samples.items():
        if sample == name + "_bucket":
            rest = tuple(p for p in labels if p[0] != "le")
            le = dict(labels)["le"]
            series.setdefault(rest, []).append((_number(le), value))
    if not series:  # a labelled family before its first observation: no series at all
        assert not samples, f"{name} has _sum or _count without buckets"
    for rest, buckets in series.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), (name, bounds)  # in order, as written
        assert bounds[-1] == math.inf, f"{name}: the last bucket must be +Inf"
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{name}: buckets are not cumulative: {counts}"
        assert counts[-1] == samples[(name + "_count", rest)], f"{name}: +Inf bucket != _count"
        assert (name + "_sum", rest) in samples


def value_of(families: dict, family: str, sample: str | None = None, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    for (name, got), value in families[family]["samples"].items():
        if name == (sample or family) and tuple(sorted(got)) == want:
            return value
    return 0.0


def test_counters_gauges_and_histograms_render_and_parse():
    requests = Counter("x_requests_total", "Requests.", ("endpoint", "status"))
    requests.inc(endpoint="/v1/completions", status="200")
    requests.inc(2, endpoint="/v1/completions", status="200")
    requests.inc(endpoint='a "quoted"\\path\n', status="404")
    tokens = Counter("x_tokens_total", "Tokens, a line\nbreak in the help.")
    queue = Gauge("x_queue", "Waiting rows.", lambda: 3)
    latency = Histogram("x_seconds", "Latency.", (0.1, 1.0, 10.0), ("endpoint",))
    for v in (0.05, 0.1, 0.5, 2.0, 2.0, 100.0):  # 0.1 falls in le="0.1": a bound is inclusive
        latency.observe(v, endpoint="/v1/completions")
    empty = Histogram("x_ttft_seconds", "Empty.", (0.5, 1.0))
    text = render([requests, tokens, queue, latency, empty])
    families = parse_exposition(text)
    assert value_of(families, "x_requests_total", endpoint="/v1/completions", status="200") == 3
    assert 'endpoint="a \\"quoted\\"\\\\path\\n"' in text  # escaped as the format says
    assert value_of(families, "x_tokens_total") == 0 and value_of(families, "x_queue") == 3
    buckets = [value_of(families, "x_seconds", "x_seconds_bucket", endpoint="/v1/completions", le=le)
               for le in ("0.1", "1", "10", "+Inf")]
    assert buckets == [2, 3, 5, 6]
    assert value_of(families, "x_seconds", "x_seconds_sum", endpoint="/v1/completions") == pytest.approx(104.65)
    assert value_of(families, "x_ttft_seconds", "x_ttft_seconds_bucket", le="+Inf") == 0  # an empty histogram is there
    assert families["x_seconds"]["type"] == "histogram" and families["x_queue"]["type"] == "gauge"


def test_the_parser_refuses_what_prometheus_refuses():
    good = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n"
    parse_exposition(good)
    for bad in ["a_total 1\n",  # no TYPE
                "# HELP a_total A.\n# TYPE a_total counter\na_total one\n",
                "# HELP a_total A.\n# TYPE a_total counter\na_total{x=1} 1\n",  # an unquoted label value
                "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
                "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n"]:
        with pytest.raises((AssertionError, StopIteration)):
            parse_exposition(bad)


def test_unknown_paths_share_one_label():
    assert endpoint_label("/v1/completions") == "/v1/completions"
    assert endpoint_label("/v1/models/tiny") == "/v1/models/{model}"
    assert endpoint_label("/wp-admin/../etc") == endpoint_label("/v1/edits") == "other"
    with pytest.raises(ValueError):
        Histogram("h", "H.", (1.0, 0.5))
    with pytest.raises(ValueError):
        Counter("c_total", "C.").inc(-1)
