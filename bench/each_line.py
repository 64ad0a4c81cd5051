"""`gptcli generate --each-line` on a file of lines whose continuations end at different lengths, as whole
processes: how long it takes, and whether every line's ids are the same in each checkout compared.

Before issue 26, each chunk of --batch-size lines ran until its longest row ended, stepping the rows that
had already finished; now a row that ends leaves the batch and the next line joins (continuous batching).
Compare two checkouts of gptcli on the same machine:

    git worktree add /tmp/gptcli-before <commit>
    python bench/each_line.py --repo /tmp/gptcli-before --repo .
    python bench/each_line.py --quick        # a smoke run: this checkout, a small model, one round

The model is a random character-level GPT (so any checkout can load it; the ids are what matter, not the
text), sampled at temperature 1 with a stop string, so each line's continuation ends at its own length.
The load average is printed: on a busy machine every figure is slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.workers import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHARS = "".join(sorted(set(" .,;:!?'\nabcdefghijklmnopqrstuvwxyz")))
STOP = "."


def write_checkpoint(folder: Path, emb_dim: int, n_layers: int, context: int) -> Path:
    """A random character-level GPT close to uniform (N(0, 0.05) weights: each character about as likely, so the stop string comes after a geometric number of tokens), saved as gptcli saves runs."""
    import torch

    from gptcli.config import GPTConfig
    from gptcli.export import save_pretrained
    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import CharTokenizer

    cfg = GPTConfig(vocab_size=len(CHARS), context_length=context, emb_dim=emb_dim, n_heads=4, n_layers=n_layers,
                    drop_rate=0.0, qkv_bias=True, tie_weights=True, name="each-line-bench")
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.05)
    save_pretrained(model, folder, CharTokenizer(CHARS))
    return folder


def write_lines(path: Path, count: int) -> Path:
    """Short and long prompts, alternating."""
    import random

    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz "
    lines = ["".join(rng.choice(letters) for _ in range(5 if i % 2 else 60)).strip() or "a" for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(repo: Path, checkpoint: Path, lines: Path, args: argparse.Namespace) -> tuple[float, list[list[int]]]:
    """Seconds for the whole process, and each line's new ids."""
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "GPTCLI_NO_TUNE": "1"}
    argv = [sys.executable, "-m", "gptcli", "generate", "--each-line", "--weights", str(checkpoint), "-n",
            str(args.tokens), "-t", "1", "--seed", "7", "--stop", STOP, "--batch-size", str(args.batch_size),
            "--threads", str(args.threads), "--device", "cpu", "--dtype", "float32", "--json"]
    start = time.perf_counter()
    with lines.open("rb") as stdin:  # cwd: `python -m` puts it first on sys.path, before PYTHONPATH
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, text=True, env=env, cwd=lines.parent)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{repo}: exit {proc.returncode}\n{proc.stderr}")
    return seconds, [json.loads(line)["token_ids"] for line in proc.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", action="append", type=Path, help="a gptcli checkout to time (repeat to compare; "
                        "default: this one)")
    parser.add_argument("--lines", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=200, help="-n: the most new tokens a line may get")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a small model, 16 lines, one round")
    args = parser.parse_args()
    repos = [r.resolve() for r in (args.repo or [REPO])]
    if args.quick:
        args.lines, args.rounds, args.tokens = 16, 1, 60
    size = (64, 2, 128) if args.quick else (384, 6, 256)
    with tempfile.TemporaryDirectory(prefix="gptcli-bench-each-line-") as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "model", *size)
        lines = write_lines(Path(tmp) / "lines.txt", args.lines)
        times: dict[Path, list[float]] = {r: [] for r in repos}
        ids: dict[Path, list[list[int]]] = {}
        for _ in range(args.rounds):  # interleaved, so a busy moment hits every checkout alike
            for repo in repos:
                seconds, got = run(repo, checkpoint, lines, args)
                times[repo].append(seconds)
                ids.setdefault(repo, got)
    lengths = [len(t) for t in ids[repos[0]]]
    print(f"CPU: {cpu_model()}, {args.threads} threads, load average {os.getloadavg()[0]:.2f} at the end; "
          f"{args.lines} lines, --batch-size {args.batch_size}, -n {args.tokens}, stop {STOP!r}, "
          f"model emb {size[0]} x {size[1]} layers; {args.rounds} rounds, median")
    print(f"New tokens per line: min {min(lengths)}, median {statistics.median(lengths):g}, max {max(lengths)}, "
          f"total {sum(lengths)}")
    print("| checkout | median s | min s | tokens/s | ids as the first checkout's |")
    print("|---|---:|---:|---:|---|")
    for repo in repos:
        median = statistics.median(times[repo])
        same = "yes" if ids[repo] == ids[repos[0]] else "NO"
        print(f"| {repo} | {median:.2f} | {min(times[repo]):.2f} | {sum(lengths) / median:.0f} | {same} |")


if __name__ == "__main__":
    main()
