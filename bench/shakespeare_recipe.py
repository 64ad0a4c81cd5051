"""nanoGPT's Shakespeare recipe as whole processes: nanoGPT's own ``train.py`` against ``gptcli train
--recipe shakespeare-char``, rounds interleaved (the order alternating), on an idle machine.

    python bench/shakespeare_recipe.py --nanogpt ~/src/nanoGPT             # 3 rounds, ~5 minutes
    python bench/shakespeare_recipe.py --nanogpt ~/src/nanoGPT --rounds 5

nanoGPT is not a dependency: give a checkout of karpathy/nanoGPT (measured at 3adf61e). Its
``data/shakespeare_char`` is prepared offline when it has no ``train.bin``: the text is copied to
``input.txt`` there (so ``prepare.py`` downloads nothing) and ``prepare.py`` is run.

The two commands, each in a fresh process with ``OMP_NUM_THREADS`` = ``--threads``:

- ``python train.py config/train_shakespeare_char.py`` with the CPU settings of nanoGPT's README
  (``--device=cpu --compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4
  --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``), here with
  ``--log_interval=100`` rather than 1 (fewer lines; nanoGPT's loss is read at every logged step);
- ``gptcli train TEXT --recipe shakespeare-char --out DIR --json``: the same model, data split,
  batches, schedule and evaluations, plus gptcli's samples, checkpoints and loss plot.

Reported: each process's wall time (interpreter start to exit), the final validation loss of each,
their medians and gptcli's time as a fraction of nanoGPT's. ``--max-steps`` other than the recipe's
2000 is for trying the script: the target is not judged then, and nanoGPT is told to evaluate at the
last step too, so both losses are of that step (100 is refused: nanoGPT divides by zero there).
Before the rounds each side runs 20 steps unmeasured, so the page cache is warm for both and
gptcli's kernel measurements (``--dtype auto``) are cached, as on a user's second run (the first
run's measuring takes about a second).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.report import command_line, date_line, load_average, logger, machine_line, markdown_table  # noqa: E402
from bench.workers import gptcli_command, shared_text  # noqa: E402

log = logger("recipe bench")

NANOGPT_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=100", "--block_size=64",
                 "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]
NANOGPT_EVAL_EVERY = 250  # config/train_shakespeare_char.py's eval_interval
NANOGPT_WARMUP = 100  # and its warmup_iters: max_iters equal to it divides by zero in nanoGPT's get_lr
RECIPE_STEPS = 2000
TARGET_RATIO = 0.8  # issue 29: gptcli's wall time at most 0.8x nanoGPT's
TARGET_VAL = 1.95  # with a final validation loss at most this
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", re.M)
NANOGPT_FILES = ("train.py", "config/train_shakespeare_char.py", "data/shakespeare_char/prepare.py")


def prepare_nanogpt(repo: Path, text: Path) -> None:
    """nanoGPT's shakespeare_char data, prepared from ``text`` without a download, if not there yet
    (``parse_args`` has checked that an input.txt already there is ``text``)."""
    data = repo / "data" / "shakespeare_char"
    if (data / "train.bin").is_file() and (data / "val.bin").is_file():
        if not (data / "input.txt").is_file():
            log(f"note: {data} has train.bin and val.bin but no input.txt: they are taken as prepared from the text")
        return
    if not (data / "input.txt").is_file():
        shutil.copyfile(text, data / "input.txt")
    log(f"preparing {data} (nanoGPT's prepare.py)")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)


def nanogpt_argv(steps: int, out: Path) -> list[str]:
    # nanoGPT evaluates every 250 steps (from step 0); a run of other length also evaluates at its last
    # step, where gptcli's final evaluation is, so the two validation losses are of the same step.
    every = [] if steps % NANOGPT_EVAL_EVERY == 0 else [f"--eval_interval={steps}"]
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_FLAGS,
            f"--max_iters={steps}", f"--lr_decay_iters={steps}", *every, f"--out_dir={out}"]


def gptcli_argv(text: Path, steps: int, out: Path) -> list[str]:
    return gptcli_command() + ["train", str(text), "--recipe", "shakespeare-char", "--out", str(out), "--json",
                               *(["--max-steps", str(steps)] if steps != RECIPE_STEPS else [])]


def run_side(name: str, argv: list[str], cwd: Path | None, env: dict[str, str]) -> dict:
    """One whole process: its wall time and final validation loss."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"error: {name} failed ({proc.returncode}):\n{(proc.stderr or proc.stdout)[-2000:]}")
    if name == "nanoGPT":
        evals = NANOGPT_EVAL.findall(proc.stdout + proc.stderr)
        if not evals:
            raise SystemExit(f"error: no evaluation line in nanoGPT's output:\n{proc.stdout[-2000:]}")
        val = float(evals[-1][2])
    else:
        evals = [e for e in map(json.loads, proc.stdout.splitlines()) if e.get("event") == "eval"]
        val = evals[-1]["val_loss"]
    return {"wall": wall, "val": val}


def compare(repo: Path, text: Path, rounds: int, threads: int, steps: int, scratch: Path,
            script: str = "bench/shakespeare_recipe.py") -> list[str]:
    """Warm both sides up, run ``rounds`` interleaved rounds of whole processes; the markdown report."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GPTCLI_CACHE_DIR": str(scratch / "gptcli-cache")}
    runs = 0

    def side(name: str, n: int) -> dict:
        nonlocal runs
        runs += 1
        out = scratch / f"out-{runs}"
        try:
            if name == "nanoGPT":
                return run_side(name, nanogpt_argv(n, out), repo, env)
            return run_side(name, gptcli_argv(text, n, out), None, env)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    for name in ("nanoGPT", "gptcli"):
        warm = side(name, 20)
        log(f"warm-up {name} (20 steps): {warm['wall']:.1f} s")
    samples: dict[str, list[dict]] = {"nanoGPT": [], "gptcli": []}
    rows = []
    load_before = load_average()
    for r in range(rounds):
        order = ["nanoGPT", "gptcli"] if r % 2 == 0 else ["gptcli", "nanoGPT"]
        for name in order:
            samples[name].append(side(name, steps))
            log(f"round {r + 1} {name}: {samples[name][-1]['wall']:.2f} s, val loss {samples[name][-1]['val']:.4f}; "
                f"load {load_average()}")
        nano, ours = samples["nanoGPT"][-1], samples["gptcli"][-1]
        rows.append([f"{r + 1} ({order[0]} first)", f"{nano['wall']:.2f}", f"{ours['wall']:.2f}",
                     f"{ours['wall'] / nano['wall']:.2f}×", f"{nano['val']:.4f}", f"{ours['val']:.4f}"])

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    ratio = med("gptcli", "wall") / med("nanoGPT", "wall")
    val = max(s["val"] for s in samples["gptcli"])
    rows.append(["median", f"{med('nanoGPT', 'wall'):.2f}", f"{med('gptcli', 'wall'):.2f}", f"{ratio:.2f}×",
                 f"{med('nanoGPT', 'val'):.4f}", f"{med('gptcli', 'val'):.4f}"])
    met = ratio <= TARGET_RATIO and val <= TARGET_VAL
    verdict = (f"{'met' if met else 'not met'}: target ≤ {TARGET_RATIO}× with val ≤ {TARGET_VAL}"
               if steps == RECIPE_STEPS else f"the target is for the recipe's {RECIPE_STEPS} steps")
    lines = [
        "## nanoGPT's Shakespeare recipe, whole processes: nanoGPT's train.py against gptcli train",
        "",
        machine_line(threads, ("torch",)),
        date_line(),
        command_line(script),
        f"- {steps} steps each; load average before the rounds {load_before}, after {load_average()}",
        "",
        markdown_table(["round", "nanoGPT s", "gptcli s", "gptcli ÷ nanoGPT", "nanoGPT val loss", "gptcli val loss"],
                       rows),
        "",
        f"gptcli's whole run takes {ratio:.2f}× nanoGPT's wall time (medians), its final validation loss at most "
        f"{val:.4f} ({verdict}).",
    ]
    return lines


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    p.add_argument("--text", type=Path, help="tinyshakespeare.txt (default: $GPTCLI_DATA_DIR or ../shared/data)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both (default 2)")
    p.add_argument("--max-steps", type=int, default=2000, help="steps of each run (default 2000, the recipe's)")
    args = p.parse_args(argv)
    given = args.text
    args.text = shared_text("tinyshakespeare.txt", given)
    if args.text is None:
        p.error("no tinyshakespeare.txt: pass --text FILE or set GPTCLI_DATA_DIR")
    if not args.text.is_file():
        p.error(f"--text {given}: no such file")
    if args.rounds < 1 or args.threads < 1 or args.max_steps < 1:
        p.error("--rounds, --threads and --max-steps must be positive")
    if args.max_steps == NANOGPT_WARMUP:
        p.error(f"--max-steps {NANOGPT_WARMUP}: nanoGPT's learning-rate schedule divides by zero when max_iters "
                f"equals its {NANOGPT_WARMUP} warm-up steps; take another count")
    args.nanogpt = args.nanogpt.expanduser().resolve()
    missing = [f for f in NANOGPT_FILES if not (args.nanogpt / f).is_file()]
    if missing:
        p.error(f"{args.nanogpt} is not a nanoGPT checkout (no {missing[0]})")
    prepared_from = args.nanogpt / "data" / "shakespeare_char" / "input.txt"
    if prepared_from.is_file() and prepared_from.read_bytes() != args.text.read_bytes():
        p.error(f"{prepared_from} is not the text of --text {args.text}: nanoGPT would train on other data "
                "(remove its input.txt, train.bin and val.bin to prepare them from --text)")
    return args


def run(args: argparse.Namespace, script: str = "bench/shakespeare_recipe.py") -> list[str]:
    """Prepare nanoGPT's data if needed, then ``compare``: the report's lines (``bench/train.py --nanogpt`` too,
    as its ``script``)."""
    prepare_nanogpt(args.nanogpt, args.text)
    scratch = Path(tempfile.mkdtemp(prefix="gptcli-recipe-"))
    try:
        return compare(args.nanogpt, args.text.resolve(), args.rounds, args.threads, args.max_steps, scratch, script)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    print("\n".join(run(parse_args(argv))))


if __name__ == "__main__":
    main()
