"""Decode speed by torch thread count, on an idle CPU and beside busy processes.

    python bench/threads.py                    # 124M float32, 24 new tokens, 3 rounds (about 3 minutes)
    python bench/threads.py --size tiny --rounds 1 --new-tokens 8     # a smoke run

Why: OpenMP threads spin while they wait for each other, so when another process holds a core, a
thread that loses its core stalls every parallel region of every decode step. The issue this came
from measured 2.0 tok/s with torch's default of 2 threads beside a busy process on a 2-core Intel
Xeon, and 20.9 tok/s with one thread.

How: one worker process per setting (``--threads N``, and the same with ``OMP_WAIT_POLICY=PASSIVE``),
each loading the model once the way ``gptcli generate`` does (``gptcli.devices.configure_threads``,
``prepare_model(kernels="eager")``), then decoding greedily from an 8-token prompt on request. The parent
starts 0, 1, ... up to as many busy processes as there are cores in the affinity mask (each a
Python ``while True: pass``), asks every worker in turn for one measurement, then stops them; the
rounds repeat that, so the machine's own drift hits every setting alike. Figures are medians over
the rounds of decode tok/s (new tokens after the first, as ``--stats`` reports them). The last
column is what ``configure_threads(None)`` chose while those busy processes ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.workers import cpu_model  # noqa: E402 - shared by the benchmarks

REPO = Path(__file__).resolve().parent.parent
PROMPT = [15496, 11, 314, 716, 257, 3303, 2746, 11]  # "Hello, I am a language model," in GPT-2's tokens
BUSY = "while True: pass"


def worker(threads: int | None, size: str, new_tokens: int) -> None:
    """Load once, then one JSON line per 'measure' on stdin: decode tok/s and the thread count in use."""
    channel, sys.stdout = sys.stdout, sys.stderr
    import torch

    from gptcli.config import GPTConfig, shipped_config
    from gptcli.devices import configure_threads
    from gptcli.decoding.generate import Decoder, Generation, SamplingOptions
    from gptcli.kernels.prepare import prepare_model
    from gptcli.weights import random_model

    used = configure_threads(threads)
    if size == "tiny":
        cfg = GPTConfig(vocab_size=50257, context_length=256, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                        qkv_bias=True, tie_weights=True, name="tiny")
    else:
        cfg = shipped_config(size)
    cpu = torch.device("cpu")
    model = prepare_model(random_model(cfg, 0).eval(), cpu, torch.float32, kernels="eager").model
    options = SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True)

    def measure() -> float:
        decoder = Decoder(model, cpu, torch.float32)
        return Generation(decoder, PROMPT, options, token_bytes=lambda i: b"").run().timings.decode_tokens_per_s

    measure()  # warm-up
    channel.write(json.dumps({"ready": True, "threads": used}) + "\n")
    channel.flush()
    for line in sys.stdin:
        if line.strip() == "measure":
            channel.write(json.dumps({"tok_s": measure(), "threads": torch.get_num_threads()}) + "\n")
            channel.flush()


def chosen_threads() -> int:
    """What configure_threads(None) picks right now, in a fresh process (it reads the load at that moment)."""
    code = "from gptcli.devices import configure_threads; print(configure_threads(None))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="124M", help="124M (default) or another shipped size, or tiny")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-busy", type=int, help="busy processes up to this many (default: the cores)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.threads, args.size, args.new_tokens)
        return

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    max_busy = cores if args.max_busy is None else args.max_busy
    settings: dict[str, tuple[int, dict[str, str]]] = {}
    for n in range(1, cores + 1):
        settings[f"{n} thread{'s' * (n > 1)}"] = (n, {})
    settings[f"{cores} threads, OMP_WAIT_POLICY=PASSIVE"] = (cores, {"OMP_WAIT_POLICY": "PASSIVE"})
    workers: dict[str, subprocess.Popen] = {}
    busy: list[subprocess.Popen] = []
    results: dict[tuple[str, int], list[float]] = {}
    chosen: dict[int, list[int]] = {}
    load_before = os.getloadavg()
    try:
        for name, (n, extra) in settings.items():
            env = {**os.environ, **extra}
            env.pop("OMP_NUM_THREADS", None)
            argv_w = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(n),
                      "--size", args.size, "--new-tokens", str(args.new_tokens)]
            workers[name] = subprocess.Popen(argv_w, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                             bufsize=1, env=env)
            json.loads(workers[name].stdout.readline())  # ready
        for round_ in range(args.rounds):
            for competitors in range(max_busy + 1):
                busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
                time.sleep(0.5)  # let them get going
                chosen.setdefault(competitors, []).append(chosen_threads())
                order = list(settings)
                order = order[round_ % len(order):] + order[: round_ % len(order)]
                for name in order:
                    w = workers[name]
                    w.stdin.write("measure\n")
                    w.stdin.flush()
                    sample: dict[str, Any] = json.loads(w.stdout.readline())
                    results.setdefault((name, competitors), []).append(sample["tok_s"])
                for proc in busy:
                    proc.kill()
                    proc.wait()
                busy = []
                print(f"[threads bench] round {round_ + 1}/{args.rounds}, {competitors} busy: done", file=sys.stderr)
    finally:
        for proc in busy:
            proc.kill()
        for w in workers.values():
            w.stdin.close()
            w.wait(timeout=30)
    load_after = os.getloadavg()

    import torch

    header = ["setting"] + [f"{c} busy process{'es' * (c != 1)}" for c in range(max_busy + 1)]
    lines = [
        f"## Decode tok/s by thread count, {args.size} float32 (eager, packed weights)",
        "",
        f"- Machine: {cpu_model()}, {cores} cores in the affinity mask; torch {torch.__version__}",
        f"- Greedy, batch 1, {len(PROMPT)}-token prompt, {args.new_tokens} new tokens; medians of {args.rounds} "
        f"interleaved rounds; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}",
        f"- Command: `python bench/threads.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip(),
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (max_busy + 1) + "|",
    ]
    for name in settings:
        cells = []
        for c in range(max_busy + 1):
            values = results[(name, c)]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    picks = ["/".join(str(v) for v in chosen[c]) for c in range(max_busy + 1)]
    lines.append("| `configure_threads(None)` chose (each round) | " + " | ".join(picks) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
