"""Batch invariance: does a row's result depend on what else is in the batch, and what does making it not cost?

    python bench/batch_invariance.py                 # 124M shapes, 2 threads (about 2 minutes)
    python bench/batch_invariance.py --threads 1 --rounds 5
    python bench/batch_invariance.py --quick         # a smoke run: small shapes, few rounds

``generate --each-line`` promises each line the ids it gets alone. That needs every kernel to give a
row the same bits whatever the batch around it. This script prints, for this CPU:

1. **Kernels.** For 124M's weight shapes and each Linear route (oneDNN's ``_linear_pointwise`` on
   plain weights, the untuned inference path, and every eager candidate of ``gptcli.kernels.decode``:
   ``onednn`` packed, ``blas`` = ``F.linear``, ``blas-t`` = ``x @ W`` with W stored (in, out),
   called as ``generate`` calls them), whether row 0 computed alone
   (1 row) equals row 0 inside 2..8 rows, and whether row 0 among 2 rows equals row 0 among 3..8, 64
   and 512 rows (a decode step and a prefill). Then attention: one ``scaled_dot_product_attention``
   call over a left-padded batch under a mask against each row's lone call (what gptcli used to do),
   and the per-row calls gptcli makes now (``gptcli.model.attention.attend_rows``).
2. **Model.** Logits of every row of a left-padded batch of 8 (``BatchDecoder``) against the same
   prompt decoded alone (``Decoder``), prefill and 6 steps, bit for bit, 124M shapes, random weights.
3. **Cost.** (a) the matrices of one 124M decode step (4 per block and the head) with one row,
   as before, against two rows (what ``onednn.InferenceLinear`` now runs for a lone row); (b) one decode step's
   attention for 8 rows (12 layers) as one masked call against 8 per-row calls, at a few cache
   lengths; (c) end to end, 124M float32: batch-1 decode tok/s and the aggregate tok/s of 8 prompts
   through ``generate_batch``, and their ratio. Timings are medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.workers import cpu_model  # noqa: E402 - shared by the benchmarks

REPO = Path(__file__).resolve().parent.parent


def onednn(x, w, b):
    import torch

    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")


def kernel_table(shapes: list[tuple[int, int]], dtypes: list[str]) -> list[str]:
    import torch

    rows = ["| route | dtype | weight (out, in) | 1 row = row in 2..8 | 2 rows = row in 3..8, 64, 512 (head: 3..8, 64) "
            "| 8 rows = oneDNN's with plain weights |",
            "|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for out_f, in_f in shapes:
            w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype)
            b = (torch.randn(out_f, generator=g) * 0.02).to(dtype)
            x = torch.randn(512, in_f, generator=g).to(dtype)
            from gptcli.kernels import decode as kernels

            routes = [("oneDNN, plain weights", onednn)]
            for kernel_name in kernels.candidates(w):
                kernel = kernels.KERNELS[kernel_name](w).prepare()
                routes.append((f"gptcli.kernels.decode {kernel_name}", lambda x_, w_, b_, k=kernel: k(x_, b_)))
            for name, fn in routes:
                with torch.inference_mode():
                    alone = fn(x[:1], w, b)
                    pair = fn(x[:2], w, b)[:1]
                    one = [m for m in range(2, 9) if not torch.equal(fn(x[:m], w, b)[:1], alone)]
                    many = (3, 4, 5, 6, 7, 8, 64) + ((512,) if out_f < 10_000 else ())  # the head: decode sizes
                    two = [m for m in many if not torch.equal(fn(x[:m], w, b)[:1], pair)]
                    same_as_plain = torch.equal(fn(x[:8], w, b), onednn(x[:8], w, b))
                rows.append(f"| {name} | {dtype_name} | ({out_f}, {in_f}) | "
                            f"{'yes' if not one else 'no (differs at ' + ','.join(map(str, one)) + ')'} | "
                            f"{'yes' if not two else 'no (differs at ' + ','.join(map(str, two)) + ')'} | "
                            f"{'yes' if same_as_plain else 'no'} |")
    return rows


def attention_check(heads: int, head_dim: int, dtypes: list[str]) -> list[str]:
    """One masked call over a left-padded batch vs per-row calls, each against the lone row's call."""
    import torch
    import torch.nn.functional as F

    from gptcli.model.attention import attend_rows

    lines = []
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 12, 3, 7, 20, 2, 9]
    width = max(lengths)
    pad = [width - n for n in lengths]
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        B, L = len(lengths), width + 6  # a decode step 6 tokens after the prefill
        q = torch.randn(B, heads, 1, head_dim, generator=g).to(dtype)
        k = torch.randn(B, heads, L, head_dim, generator=g).to(dtype)
        v = torch.randn(B, heads, L, head_dim, generator=g).to(dtype)
        with torch.inference_mode():
            masked = one_masked_call(q, k, v, pad, L - 1, 0.0)
            rows = attend_rows(q, k, v, pad, L - 1, 0.0)
            alone = [F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, p:], v[i:i + 1, :, p:])
                     for i, p in enumerate(pad)]
        same_masked = sum(torch.equal(masked[i:i + 1], a) for i, a in enumerate(alone))
        same_rows = sum(torch.equal(rows[i:i + 1], a) for i, a in enumerate(alone))
        lines.append(f"- attention, {dtype_name}, {B} left-padded rows, one step at {L} positions: one masked call "
                     f"equals the lone call for {same_masked}/{B} rows; per-row calls for {same_rows}/{B}")
    return lines


def model_check(cfg, dtype_name: str, steps: int = 6) -> str:
    import torch

    from gptcli.decoding.batch import BatchDecoder
    from gptcli.decoding.generate import Decoder
    from gptcli.weights import random_model

    dtype = getattr(torch, dtype_name)
    cpu = torch.device("cpu")
    model = random_model(cfg, 123).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 1, 12, 3, 7, 20, 2, 9)]
    feed = [torch.randint(0, cfg.vocab_size, (len(prompts),), generator=g).tolist() for _ in range(steps)]
    batch = BatchDecoder(model, cpu, dtype)
    batched = [batch.prefill(prompts, steps + 1)] + [batch.step(ids) for ids in feed]
    equal = total = 0
    worst = 0.0
    for row, prompt in enumerate(prompts):
        alone = Decoder(model, cpu, dtype)
        single = [alone.prefill(prompt, steps + 1)] + [alone.step(ids[row]) for ids in feed]
        for s, b in zip(single, batched):
            equal += torch.equal(s[0], b[row])
            worst = max(worst, (s[0].float() - b[row].float()).abs().max().item())
            total += 1
    return (f"- model ({cfg.name}, {dtype_name}): {equal}/{total} row logits bit-identical to the lone run "
            f"(8 rows of 1..20 tokens, prefill + {steps} steps); largest difference {worst:.3g}")


def interleaved(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, calling them in turn, ``rounds`` times, after one warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def linear_cost(cfg, rounds: int) -> list[str]:
    """The matrices of one decode step: plain weights with 1, 2 and 8 rows against packed ones with 2 and 8."""
    import torch

    from gptcli.kernels.decode import BATCH_ROWS

    d, V = cfg.emb_dim, cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(o, i, generator=g) * 0.02 for o, i in [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]]
    plain = [(w, torch.zeros(w.shape[0])) for _ in range(cfg.n_layers) for w in mats]
    plain.append((torch.randn(V, d, generator=g) * 0.02, None))
    packed = [(torch.ops.mkldnn._reorder_linear_weight(w, BATCH_ROWS), b) for w, b in plain]
    widths = [w.shape[1] for w, _ in plain]

    def run(weights, rows: int) -> Callable[[], None]:
        x = {n: torch.randn(rows, n) for n in (d, 4 * d)}

        def step() -> None:
            with torch.inference_mode():
                for (w, b), n in zip(weights, widths):
                    onednn(x[n], w, b)
        return step

    t = interleaved({"plain 1 row (before)": run(plain, 1), "plain 2 rows": run(plain, 2),
                     "packed 2 rows (now)": run(packed, 2), "plain 8 rows (before)": run(plain, 8),
                     "packed 8 rows (now)": run(packed, 8)}, rounds)
    return [f"- (a) the matrices of one {cfg.name} decode step (4 per block and the head), float32, oneDNN: "
            + ", ".join(f"{name} {sec * 1e3:.2f} ms" for name, sec in t.items())]


def attention_cost(cfg, lengths: list[int], rounds: int) -> list[str]:
    import torch

    lines = []
    B, H, hs = 8, cfg.n_heads, cfg.head_dim
    for L in lengths:
        pad = [i % 4 for i in range(B)]
        q = torch.randn(B, H, 1, hs)
        k, v = torch.randn(B, H, L, hs), torch.randn(B, H, L, hs)

        def masked() -> None:
            with torch.inference_mode():
                for _ in range(cfg.n_layers):
                    one_masked_call(q, k, v, pad, L - 1, 0.0)

        def per_row() -> None:
            from gptcli.model.attention import attend_rows

            with torch.inference_mode():
                for _ in range(cfg.n_layers):
                    attend_rows(q, k, v, pad, L - 1, 0.0)

        t = interleaved({"masked": masked, "rows": per_row}, rounds)
        lines.append(f"- (b) attention of one decode step, 8 rows, {cfg.n_layers} layers, {L} cached positions: "
                     f"one masked call (before) {t['masked'] * 1e3:.2f} ms, per-row calls (now) {t['rows'] * 1e3:.2f} ms")
    return lines


def one_masked_call(q, k, v, pad_rows, past, dropout_p):
    """What gptcli did before: the whole left-padded batch in one call, under the padding mask."""
    import torch
    import torch.nn.functional as F

    from gptcli.model.gpt import _padded_positions_and_mask

    T = q.shape[2]
    _, mask = _padded_positions_and_mask(torch.arange(past, past + T), torch.tensor(pad_rows), past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def one_row_as_is(x, weight, bias, out_features):
    """What gptcli did before: oneDNN's linear on the rows as they come, one row included."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def end_to_end(cfg, new_tokens: int, rounds: int) -> list[str]:
    """Batch-1 and batch-8 decode tok/s: before (emulated), exact with plain weights, exact and packed (now)."""
    import torch

    import gptcli.kernels.decode as kernels_module
    import gptcli.kernels.onednn as onednn
    from gptcli.model.attention import row_invariant
    from gptcli.decoding.batch import BatchDecoder, generate_batch
    from gptcli.model.gpt import causal_attention
    from gptcli.decoding.generate import Decoder, Generation, SamplingOptions
    from gptcli.weights import random_model

    cpu = torch.device("cpu")
    plain = random_model(cfg, 0).eval()
    packed = random_model(cfg, 0).eval()
    kernels_module.apply(packed, kernels_module.DecodePlan(kernels_module.EAGER, {}))  # every layer on the default, oneDNN packed
    tuned = random_model(cfg, 0).eval()
    plan = kernels_module.tune(tuned)
    kernels_module.apply(tuned, plan)
    prompt = [15496, 11, 314, 716, 257, 3303, 2746, 11]  # "Hello, I am a language model,"
    prompts = [prompt[i % 4:] for i in range(8)]  # 8, 7, 6, 5 tokens, twice: left-padded
    options = SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True)
    exact = (onednn.linear, row_invariant)
    setups = {"before: one-row products, one masked attention call": (plain, (one_row_as_is, causal_attention)),
              "exact, plain weights": (plain, exact),
              "exact, packed weights (the default kernel)": (packed, exact),
              f"exact, tuned kernels (generate now: {', '.join(sorted(set(plan.summary().values())))})": (tuned, exact)}
    rates: dict[tuple[str, int], list[float]] = {}

    def measure(name: str, batch: int) -> Callable[[], None]:
        model, (linear, attend) = setups[name]

        def run() -> None:
            onednn.linear = linear  # InferenceLinear and decode_kernels call it through the module
            try:
                decoder = Decoder(model, cpu, torch.float32) if batch == 1 else BatchDecoder(model, cpu, torch.float32)
                decoder.attention = attend  # the attention the decoder passes to the model
                if batch == 1:
                    t = Generation(decoder, prompt, options, token_bytes=lambda i: b"").run().timings
                else:
                    _, t = generate_batch(decoder, prompts, options, token_bytes=lambda i: b"")
            finally:
                onednn.linear = exact[0]
            rates.setdefault((name, batch), []).append(t.decode_tokens_per_s)
        return run

    interleaved({f"{n}/{b}": measure(n, b) for n in setups for b in (1, 8)}, rounds)
    lines = []
    for name in setups:
        r1 = statistics.median(rates[(name, 1)][1:])
        r8 = statistics.median(rates[(name, 8)][1:])
        lines.append(f"- (c) {cfg.name} float32, {new_tokens} new tokens, {name}: batch 1 {r1:.1f} tok/s, "
                     f"batch 8 {r8:.1f} tok/s aggregate = {r8 / r1:.2f}x batch 1")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int, help="timing rounds (default 9; --quick 2)")
    p.add_argument("--new-tokens", type=int, help="new tokens end to end (default 64; --quick 4)")
    p.add_argument("--quick", action="store_true", help="small shapes and few rounds: a smoke run")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 9)
    new_tokens = args.new_tokens or (4 if args.quick else 64)

    import torch

    from gptcli.config import GPTConfig, shipped_config

    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                        qkv_bias=True, tie_weights=True, name="tiny")
    else:
        cfg = shipped_config("124M")
    d = cfg.emb_dim
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (cfg.vocab_size, d)]
    out = [
        f"## Batch invariance on {cpu_model()}",
        "",
        f"- torch {torch.__version__}, {args.threads} threads, oneDNN linear available: "
        f"{hasattr(torch.ops.mkldnn, '_linear_pointwise') and torch.backends.mkldnn.is_available()}",
        f"- Command: `python bench/batch_invariance.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip(),
        "",
        "Kernels (bit-identical row 0?):",
        "",
        *kernel_table(shapes, ["float32", "bfloat16"]),
        "",
        *attention_check(cfg.n_heads, cfg.head_dim, ["float32", "bfloat16"]),
        model_check(cfg, "float32"),
        model_check(cfg, "bfloat16"),
        "",
        "Cost:",
        "",
        *linear_cost(cfg, rounds),
        *attention_cost(cfg, [32, 256] if args.quick else [64, 256, 1024], rounds),
        *end_to_end(cfg, new_tokens, max(3, rounds // 2)),
    ]
    print("\n".join(out))


if __name__ == "__main__":
    main()
