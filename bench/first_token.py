"""Load plus first token, as whole processes: ``gptcli generate`` against transformers'
``from_pretrained`` + ``generate``, on one Hugging Face-layout checkpoint (default GPT-2 XL, 1558M).

    python bench/first_token.py                     # writes ~6.4 GB of random float32 weights, deletes them after
    python bench/first_token.py --dir /data --keep  # keep the folder (then --checkpoint DIR next time)
    python bench/first_token.py --size 124M --rounds 5

Each round runs, one after the other (rounds interleaved, the order alternating):

- ``gptcli generate --weights DIR --dtype float32 --device cpu -n 1 --json PROMPT``, the venv's
  ``gptcli`` with ``OMP_NUM_THREADS`` = ``--threads``;
- ``python -c ...``: ``import torch, transformers``, ``GPT2LMHeadModel.from_pretrained(DIR)``,
  ``generate(max_new_tokens=1)`` on the same prompt's ids, with ``torch.set_num_threads``.

Reported per side: the wall time of the whole process (interpreter start, imports, load, first
token, exit), the time inside it from before the load to the first token (gptcli: its JSON's
``load_s + prefill_s``; transformers: timed in the script), and the peak RSS (the child's
``ru_maxrss``) against the weights' size. Before the rounds each side runs once unmeasured, so the
file is in the page cache for both and gptcli's kernel choice is cached (that first run's tuning time
is printed: a user pays it once). The checkpoint is streamed to disk tensor by tensor
(``bench/load_rss.py``'s writer, plus a config.json), so writing it needs no model in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.load_rss import write_checkpoint  # noqa: E402 - a sibling script
from bench.workers import cpu_model, gptcli_command  # noqa: E402

PROMPT = "Hello, I am a language model,"
PROMPT_IDS = [15496, 11, 314, 716, 257, 3303, 2746, 11]

HF_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
transformers.logging.set_verbosity_error()
torch.set_num_threads(int(sys.argv[2]))
t1 = time.perf_counter()
model = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
t2 = time.perf_counter()
ids = torch.tensor([json.loads(sys.argv[3])])
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                         pad_token_id=50256)
t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2, "id": int(out[0, -1])}))
"""


MEASURE_CHILD = r"""
import json, os, resource, subprocess, sys, time
argv, env = json.loads(sys.argv[1]), json.loads(sys.argv[2])
start = time.perf_counter()
proc = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "stdout": proc.stdout, "stderr": proc.stderr, "returncode": proc.returncode}))
"""


def measure(argv: list[str], env: dict[str, str]) -> dict:
    """Run ``argv`` under a fresh helper process, so the peak RSS read is this run's alone."""
    proc = subprocess.run([sys.executable, "-c", MEASURE_CHILD, json.dumps(argv), json.dumps(env)],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    if result["returncode"]:
        raise SystemExit(f"{argv[0]} failed ({result['returncode']}):\n{result['stderr'][-2000:]}")
    return result


def gptcli_argv(folder: Path) -> list[str]:
    return gptcli_command() + ["generate", "--weights", str(folder), "--dtype", "float32", "--device", "cpu", "-n", "1",
                   "--json", PROMPT]


def hf_argv(folder: Path, threads: int) -> list[str]:
    return [sys.executable, "-c", HF_SCRIPT, str(folder), str(threads), json.dumps(PROMPT_IDS)]


def write_folder(folder: Path, size: str) -> int:
    """model.safetensors (random float32, HF layout) and config.json; returns the weights' bytes."""
    from gptcli.config import shipped_config

    folder.mkdir(parents=True, exist_ok=True)
    weights = write_checkpoint(folder / "model.safetensors", size)
    cfg = shipped_config(size)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "activation_function": "gelu_new",
        "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256,
    }))
    return weights


def weights_bytes(folder: Path) -> int:
    from gptcli.checkpoint import read_header

    header = read_header(folder / "model.safetensors")
    return sum(t.nbytes for name, t in header.tensors.items() if not name.endswith("attn.bias"))


@dataclass
class Comparison:
    """Medians of interleaved whole-process runs: wall, load + first token, peak RSS, per side."""

    lines: list[str]  # the markdown report
    wall_ratio: float  # gptcli's wall time / transformers'
    rss_ratio: float  # gptcli's peak RSS / the weights' bytes


def compare(folder: Path, rounds: int, threads: int, scratch: Path, command: str) -> Comparison:
    """Run both sides once unmeasured, then ``rounds`` interleaved rounds; ``scratch`` holds the caches."""
    weights = weights_bytes(folder)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GPTCLI_CACHE_DIR": str(scratch / "first-token-cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(scratch / "first-token-inductor")}
    sides = {"gptcli": gptcli_argv(folder), "transformers": hf_argv(folder, threads)}
    first = {}
    for name, argv in sides.items():  # page cache and gptcli's kernel cache warm for both
        first[name] = measure(argv, env)
        print(f"warm-up {name}: {first[name]['wall_s']:.1f} s", file=sys.stderr)
    tune_s = json.loads(first["gptcli"]["stdout"])["timings"].get("tune_s")
    samples: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            result = measure(sides[name], env)
            out = json.loads(result["stdout"])
            if name == "gptcli":
                inside, token = out["timings"]["load_s"] + out["timings"]["prefill_s"], out["token_ids"][0]
            else:
                inside, token = out["load_s"] + out["first_token_s"], out["id"]
            samples[name].append({"wall": result["wall_s"], "inside": inside, "rss": result["peak_rss"],
                                  "token": token})
            print(f"round {r + 1} {name}: {result['wall_s']:.2f} s wall, load + first token {inside:.2f} s, "
                  f"peak RSS {result['peak_rss'] / 2**30:.2f} GiB", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    ratio = med("gptcli", "wall") / med("transformers", "wall")
    lines = [
        "## Load plus first token, whole processes: gptcli generate against transformers",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {threads} threads; checkpoint {folder}, "
        f"weights {weights / 1e9:.2f} GB; medians of {rounds} interleaved rounds, page cache warm",
        f"- Command: `{command}`",
        f"- gptcli's first run measured its kernels in {'—' if tune_s is None else f'{tune_s:.2f}'} s (once per "
        f"machine; later runs read the cache); warm-up walls: gptcli {first['gptcli']['wall_s']:.1f} s, "
        f"transformers {first['transformers']['wall_s']:.1f} s",
        "",
        "| process | wall s | load + first token s | peak RSS GiB | peak RSS ÷ weights | first id |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {name} | {med(name, 'wall'):.2f} | {med(name, 'inside'):.2f} | {med(name, 'rss') / 2**30:.2f} | "
          f"{med(name, 'rss') / weights:.2f}× | {samples[name][0]['token']} |" for name in sides],
        "",
        f"gptcli's whole process takes {ratio:.2f}× transformers' wall time "
        f"({'met' if ratio <= 1 else 'not met'}: target ≤ 1×).",
    ]
    return Comparison(lines, ratio, med("gptcli", "rss") / weights)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1558M")
    p.add_argument("--checkpoint", type=Path, help="reuse a folder written by --keep")
    p.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a temp folder)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="gptcli-ttft-", dir=args.dir))
    folder = args.checkpoint or scratch / "checkpoint"
    try:
        if args.checkpoint is None:
            start = time.perf_counter()
            write_folder(folder, args.size)
            print(f"wrote {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        result = compare(folder, args.rounds, args.threads, scratch,
                         " ".join(["python", "bench/first_token.py", *sys.argv[1:]]))
        print("\n".join(result.lines))
    finally:
        if args.keep and args.checkpoint is None:
            print(f"kept {folder}", file=sys.stderr)
            for path in scratch.iterdir():
                if path != folder:
                    shutil.rmtree(path, ignore_errors=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
