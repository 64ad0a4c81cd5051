"""What ``gptcli.kernels.decode.tune`` measures on this CPU, and how long it takes.

    python bench/kernel_tuner.py                 # 124M, float32 and bfloat16, 2 threads
    python bench/kernel_tuner.py --size 1558M --dtypes float32 --checkpoint DIR   # a checkpoint's own layout
    python bench/kernel_tuner.py --threads 1

For each dtype it builds the model (random weights, or ``--checkpoint`` loaded memory-mapped as
``gptcli generate`` loads it, so a Hugging Face file's Conv1D weights keep their (in, out) layout),
runs ``tune`` against an empty cache in a temporary folder (the cost a user's first run pays), then
again (the cached run), and prints per weight shape every candidate's time for one row and for 8
rows (microseconds per call, the best of the timed sweeps over layers of that shape), whether each
row is the same alone and among 2 to 8 rows (checked only for kernels row-invariant by construction:
the others can't serve eager decoding; `bench/batch_invariance.py` shows them), and which kernel
eager and compiled decoding get.
The issue's budget for the first run's tuning is 3 s for 124M.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.workers import cpu_model  # noqa: E402 - shared by the benchmarks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="124M")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", help="a checkpoint to load (memory-mapped) instead of random weights")
    args = p.parse_args()

    import torch

    from gptcli.kernels import decode as kernels
    from gptcli.config import shipped_config
    from gptcli.weights import load_model, random_model

    torch.set_num_threads(args.threads)
    print(f"## Kernel tuning on {cpu_model()}\n")
    print(f"- torch {torch.__version__}, {args.threads} threads; {args.size}"
          f"{', ' + args.checkpoint if args.checkpoint else ', random weights'}")
    print(f"- Command: `python bench/kernel_tuner.py {' '.join(sys.argv[1:])}`".rstrip())
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        with tempfile.TemporaryDirectory() as cache:
            os.environ["GPTCLI_CACHE_DIR"] = cache
            if args.checkpoint:
                model = load_model(size=None, config=None, weights=args.checkpoint, device=torch.device("cpu"),
                                   dtype=dtype, mapped=True).model
            else:
                model = random_model(shipped_config(args.size), 0).to(dtype).eval()
            start = time.perf_counter()
            first = kernels.tune(model)
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            again = kernels.tune(model)
            again_s = time.perf_counter() - start
            compiled = kernels.tune(model, kernels.COMPILED)
        print(f"\n### {dtype_name}: first run {first_s:.2f} s ({first.source}), "
              f"cached run {again_s * 1e3:.1f} ms ({again.source})\n")
        print("| weight (out x in, dtype, stored) | kernel | 1 row µs | 8 rows µs | row-invariant | eager gets | "
              "compiled gets |")
        print("|---|---|---:|---:|---|---|---|")
        for key, choice in first.choices.items():
            for name, m in choice.measured.items():
                print(f"| {key} | {name} | {m['one']:.1f} | {m['batch']:.1f} | {('yes' if m['invariant'] else 'no') if kernels.KERNELS[name].row_invariant else 'not by construction'} | "
                      f"{'**' + name + '**' if name == choice.kernel else ''} | "
                      f"{'**' + name + '**' if name == compiled.choices[key].kernel else ''} |")


if __name__ == "__main__":
    main()
