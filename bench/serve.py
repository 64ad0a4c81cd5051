"""Serving speed: `gptcli serve` under 1, 2, 4 and 8 concurrent streams, against transformers one request at a time.

    python bench/serve.py                      # 124M float32, 1/2/4/8 streams, 64 new tokens, 4 requests a stream
    python bench/serve.py --quick              # a tiny GPT-2 and a few tokens: a smoke run
    python bench/serve.py --output report.md   # also write the report to a file

The report (markdown) goes to stdout, progress to stderr; the exit status is 1 when something failed.

Setup
-----
One checkpoint serves both sides: random GPT-2 weights drawn by transformers (seed 0) and written with
``save_pretrained`` to a temporary folder (``bench/decode.py``'s ``write_checkpoint``; ``--checkpoint DIR``
reuses such a folder). The server is ``python -m gptcli serve --weights DIR --port 0`` in a subprocess
with ``--threads`` threads; the clients are threads of this process speaking HTTP/1.1 on loopback
(``http.client``), one connection per stream. Each stream sends ``--requests`` streamed completions one
after another (greedy, ``ignore_eos``, ``max_tokens`` new tokens, each stream its own prompt), all
streams starting together. Aggregate tok/s = every completion token of the phase ÷ the phase's wall
time (first request sent to last ``[DONE]``); TTFT = from sending a request to its first text chunk.
One warm-up request runs first.

The reference is what a user would otherwise script: transformers' ``GPT2LMHeadModel.generate`` on the
same checkpoint in float32, one request at a time, in this process with the same thread count (the
server is stopped first); its TTFT is to the first step's logits.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.decode import EOS_ID, StepClock, model_shape, write_checkpoint  # noqa: E402
from bench.report import command_line, date_line, fmt, load_average, logger, machine_line  # noqa: E402
from bench.workers import quiet_transformers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Hello, I am a language model,", "The meaning of life is", "Once upon a time, in a land far away,",
    "The quick brown fox jumps over the lazy dog because", "In the beginning", "My favourite food is",
    "The stock market today", "Scientists have discovered that",
]
TARGET_RATIO = 4.0  # issue 18: 8 streams >= 4x the aggregate tok/s of 1


log = logger()


@dataclass
class Phase:
    """One concurrency level: every request's TTFT and tokens, and the wall time."""

    streams: int
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def tok_s(self) -> float | None:
        return self.tokens / self.wall_s if self.wall_s > 0 and self.tokens else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (p99 of 32 values is the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------------------------
# The server and its clients


class ServerProcess:
    def __init__(self, checkpoint: Path, threads: int, max_tokens: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        env.pop("GPTCLI_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptcli", "serve", "--weights", str(checkpoint), "--port", "0", "--threads",
             str(threads), "--max-batch", "8", "--max-tokens-cap", str(max(max_tokens, 16))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.port = None
        for line in self.proc.stderr:
            if line.startswith("note: serving "):
                self.port = int(line.split(" at http://127.0.0.1:")[1].split("/")[0])
                self.model = line.split()[2]
                break
            log(line.rstrip())
        if self.port is None:
            raise RuntimeError(f"the server exited with code {self.proc.wait()}")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            log("server: " + line.rstrip())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stream_completion(conn: http.client.HTTPConnection, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One streamed completion: (seconds to the first text chunk, completion tokens)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    ttft, tokens = None, 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        payload = line[len(b"data: "):]
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
            ttft = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    response.read()
    return (ttft if ttft is not None else time.perf_counter() - start), tokens


def run_phase(server: ServerProcess, streams: int, requests: int, max_tokens: int) -> Phase:
    phase = Phase(streams)
    lock = threading.Lock()
    barrier = threading.Barrier(streams + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        barrier.wait()
        try:
            for _ in range(requests):
                ttft, tokens = stream_completion(conn, server.model, PROMPTS[i % len(PROMPTS)], max_tokens)
                with lock:
                    phase.ttft_s.append(ttft)
                    phase.tokens += tokens
        except Exception as exc:  # noqa: BLE001 - reported in the table
            with lock:
                phase.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    phase.wall_s = time.perf_counter() - start
    return phase


# ---------------------------------------------------------------------------------------------
# The reference: transformers, one request at a time


def run_transformers(checkpoint: Path, threads: int, requests: int, max_tokens: int) -> Phase:
    import torch

    torch.set_num_threads(threads)
    transformers = quiet_transformers()
    from transformers import LogitsProcessorList

    model = transformers.GPT2LMHeadModel.from_pretrained(checkpoint, **{
        ("dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"): torch.float32}).eval()
    tokenizer_ids = _encoder()
    phase = Phase(1)

    def one(prompt: str) -> tuple[float, int]:
        ids = torch.tensor([tokenizer_ids(prompt)])
        clock = StepClock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=EOS_ID,
                                 logits_processor=LogitsProcessorList([clock]))
        return clock.times[0] - start, out.shape[1] - ids.shape[1]

    one(PROMPTS[0])  # warm-up
    start = time.perf_counter()
    for i in range(requests):
        ttft, tokens = one(PROMPTS[i % len(PROMPTS)])
        phase.ttft_s.append(ttft)
        phase.tokens += tokens
    phase.wall_s = time.perf_counter() - start
    return phase


def _encoder():
    from gptcli.tokenizer import encode

    return encode


# ---------------------------------------------------------------------------------------------
# The report


def report(args: argparse.Namespace, shape_name: str, phases: list[Phase], hf: Phase | None,
           load_before: str, load_after: str) -> str:
    one = next((p.tok_s for p in phases if p.streams == 1), None)
    rows = []
    for p in phases:
        ratio = p.tok_s / one if p.tok_s and one else None
        rows.append([f"gptcli serve, {p.streams} stream{'s' * (p.streams > 1)}", str(len(p.ttft_s)),
                     fmt(p.tok_s, ".1f"), fmt(ratio, ".2f") + ("×" if ratio else ""),
                     fmt(percentile(p.ttft_s, 50), ".0f", 1000), fmt(percentile(p.ttft_s, 99), ".0f", 1000),
                     "; ".join(sorted(set(p.errors)))[:80] or "—"])
    if hf is not None:
        ratio = hf.tok_s / one if hf.tok_s and one else None
        rows.append(["transformers generate, 1 at a time", str(len(hf.ttft_s)), fmt(hf.tok_s, ".1f"),
                     fmt(ratio, ".2f") + ("×" if ratio else ""), fmt(percentile(hf.ttft_s, 50), ".0f", 1000),
                     fmt(percentile(hf.ttft_s, 99), ".0f", 1000), "—"])
    header = ["setup", "requests", "aggregate tok/s", "vs 1 stream", "TTFT p50 ms", "TTFT p99 ms", "errors"]
    table = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 5 + ["---"]) + "|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    eight = next((p.tok_s for p in phases if p.streams == 8), None)
    ratio = eight / one if eight and one else None
    status = "not run" if ratio is None else ("met" if ratio >= TARGET_RATIO else "**not met**")
    lines = [
        f"## Serving GPT-2 {shape_name} on the CPU: gptcli serve under load",
        "",
        machine_line(args.threads, ("torch", "transformers", "fastapi", "uvicorn")),
        f"- Load average (1, 5, 15 min): {load_before} before, {load_after} after",
        date_line(),
        command_line("bench/serve.py"),
        f"- Setup: random GPT-2 weights (transformers, seed 0), float32; each stream sends {args.requests} streamed "
        f"greedy requests of {args.new_tokens} new tokens (EOS ignored) one after another, over HTTP on loopback; "
        "`--max-batch 8`.",
        "",
        *table,
        "",
        "aggregate tok/s = completion tokens of all streams ÷ wall time of the phase; TTFT = request sent to the "
        "first text chunk (transformers: to the first step's logits, no HTTP).",
        "",
        "| target | measured | status |",
        "|---|---|---|",
        f"| 8 streams >= {TARGET_RATIO:g}x the aggregate tok/s of 1 | {fmt(ratio, '.2f')}{'×' if ratio else ''} "
        f"| {status} |",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", help="concurrency levels, comma-separated (default 1,2,4,8)", default="1,2,4,8")
    p.add_argument("--requests", type=int, help="requests per stream (default 4; --quick 2)")
    p.add_argument("--new-tokens", type=int, help="new tokens per request (default 64; --quick 8)")
    p.add_argument("--size", help="124M (default) or tiny (the --quick default)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server and of transformers (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, few tokens")
    p.add_argument("--checkpoint", type=Path, help="reuse a save_pretrained folder instead of writing one")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers reference")
    p.add_argument("--output", type=Path, help="also write the report to this file")
    args = p.parse_args(argv)
    for key, full, small in (("requests", 4, 2), ("new_tokens", 64, 8), ("size", "124M", "tiny")):
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
    try:
        args.stream_counts = [int(s) for s in args.streams.split(",") if s.strip()]
    except ValueError:
        p.error("--streams takes whole numbers, e.g. 1,2,4,8")
    if not args.stream_counts or min(args.stream_counts) < 1 or max(args.stream_counts) > 64:
        p.error("--streams takes numbers from 1 to 64")
    if args.requests < 1 or args.new_tokens < 1:
        p.error("--requests and --new-tokens must be 1 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = load_average(", ")
    with tempfile.TemporaryDirectory(prefix="gptcli-bench-serve-") as scratch:
        checkpoint = args.checkpoint
        shape = model_shape(args.size)
        if checkpoint is None:
            checkpoint = Path(scratch) / "checkpoint"
            log(f"writing a random {shape.name} checkpoint to {checkpoint}")
            write_checkpoint(checkpoint, shape)
        log("starting gptcli serve")
        server = ServerProcess(checkpoint, args.threads, args.new_tokens)
        phases = []
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
            stream_completion(conn, server.model, PROMPTS[0], args.new_tokens)  # warm-up
            conn.close()
            for streams in args.stream_counts:
                log(f"{streams} concurrent stream(s)")
                phases.append(run_phase(server, streams, args.requests, args.new_tokens))
        finally:
            server.stop()
        hf = None
        if not args.no_transformers:
            log("transformers, one request at a time")
            hf = run_transformers(checkpoint, args.threads, args.requests, args.new_tokens)
    text = report(args, shape.name, phases, hf, load_before, load_average(", "))
    sys.stdout.write(text)
    if args.output:
        args.output.write_text(text)
    return 1 if any(p.errors or not p.tokens for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
