"""How long `gptcli tokenize` takes as a whole process (start, tokenizer file, answer): the target is
under 0.3 s, without torch. `gptcli params` and `gptcli --help` are measured beside it for scale.

    python bench/tokenize_start.py            # 15 runs of each
    python bench/tokenize_start.py --quick    # 3 runs (a smoke run)

Needs GPT-2's tokenizer file in tiktoken's cache (TIKTOKEN_CACHE_DIR). The load average is printed:
on a busy machine every figure is slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.workers import cpu_model  # noqa: E402

COMMANDS = {
    "tokenize TEXT": ["tokenize", "--count", "Hello, world! How are you today?"],
    "tokenize --json TEXT": ["tokenize", "--json", "naïve café 🫠"],
    "tokenize --decode IDS": ["tokenize", "--decode", "15496", "11", "314"],
    "params --size xl": ["params", "--size", "xl"],
    "--help": ["--help"],
}


def seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gptcli", *args], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 runs of each")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    for argv in COMMANDS.values():
        seconds(argv)  # warm the page cache
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(runs):  # interleaved, so a busy moment hits every command alike
        for name, argv in COMMANDS.items():
            times[name].append(seconds(argv))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end; "
          f"{runs} runs each")
    print("| command | median s | min s | under 0.3 s |")
    print("|---|---:|---:|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| gptcli {name} | {median:.3f} | {min(values):.3f} | {'yes' if median < 0.3 else 'no'} |")


if __name__ == "__main__":
    main()
