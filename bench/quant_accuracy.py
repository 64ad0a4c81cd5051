"""How close int8, int4 (and bfloat16) decoding stays to float32, on a fixed set of prompts.

    python bench/quant_accuracy.py                      # 124M, random GPT-2-style weights
    python bench/quant_accuracy.py --weights DIR        # any checkpoint --weights accepts (real GPT-2 when cached)
    python bench/quant_accuracy.py --variants int8,int4-g32,int4-g64,int4-g128,int4-g32-head8

Variants: ``bfloat16``/``float16`` (the whole model in that dtype), any ``--quantize`` value
(``int8``, ``int4``, ``int4-gN``: int4 in groups of N inputs), and ``int4-gN-head8`` (int4 blocks
with an int8 output head). The quantized variants run with bfloat16 activations.

For each prompt it reports, against float32 on the same weights:
- the largest absolute logit error on the prompt's positions, and that error relative to the
  largest float32 logit;
- top-1 agreement over the prompt's positions (teacher-forced: every variant sees the same tokens);
- greedy agreement: the share of ``--new-tokens`` greedy ids equal to float32's, counted up to the
  first difference (after a difference the continuations are different texts).

Without ``--weights`` it uses random weights drawn the way transformers initialises GPT-2 (normal,
std 0.02), which behave more like a trained model's than the book's N(0, 1) embeddings. Real weights
are the better test; this machine has none (no network), so the README quotes this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package

PROMPTS = [
    "Hello, I am a language model,",
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning is a field of study that",
    "Q: What is the boiling point of water?\nA:",
    "Breaking news: scientists have discovered",
    "import numpy as np\nimport torch\n",
]


def gpt2_style_random(cfg, seed: int):
    """GPTModel with transformers' GPT-2 init: weights N(0, 0.02), biases 0, norms 1/0."""
    import torch

    from gptcli.model.gpt import GPTModel

    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("scale",)):
                p.fill_(1.0)
            elif name.endswith(("bias", "shift")):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model


def variants(base, dtypes: list[str]):
    """(name, model) for float32 and each requested variant, all with base's weights."""
    import copy

    import torch

    from gptcli.kernels.prepare import prepare_model
    from gptcli.kernels.quantize import Int8Linear

    out = [("float32", base)]
    for name in dtypes:
        model = copy.deepcopy(base)
        if name.startswith("int"):
            scheme, head8, _ = name.partition("-head8")
            model = model.to(torch.bfloat16)
            if head8:
                model.out_head = Int8Linear.from_linear(model.out_head, torch.bfloat16)  # int4 skips it: not nn.Linear
            model = prepare_model(model, torch.device("cpu"), torch.bfloat16, quantize=scheme).model
        else:
            model = model.to(getattr(torch, name))
        out.append((name, model))
    return out


def greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    import torch

    from gptcli.decoding.generate import Decoder, Generation, SamplingOptions

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    decoder = Decoder(model, torch.device("cpu"), dtype)
    options = SamplingOptions(max_new_tokens=n, ignore_eos=True)
    return Generation(decoder, prompt, options, token_bytes=lambda i: b"").run().token_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="a checkpoint (FILE|DIR|HUB_ID); default: GPT-2-style random 124M")
    parser.add_argument("--size", default="124M")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--variants", default="bfloat16,int8,int4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from gptcli.config import shipped_config
    from gptcli.decoding.session import shared_prefix
    from gptcli.tokenizer import encode

    start = time.perf_counter()
    if args.weights:
        from gptcli.weights import load_model

        loaded = load_model(size=None, config=None, weights=args.weights, device=torch.device("cpu"),
                            dtype=torch.float32, seed=args.seed, note=lambda m: print(f"note: {m}", file=sys.stderr))
        base, source = loaded.model, loaded.source
    else:
        base, source = gpt2_style_random(shipped_config(args.size), args.seed), f"random GPT-2-style {args.size}"
    models = variants(base, [v for v in args.variants.split(",") if v])
    prompts = [encode(p) for p in PROMPTS]
    rows: dict[str, dict[str, list[float]]] = {name: {"abs": [], "rel": [], "top1": [], "greedy": []} for name, _ in models[1:]}
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            reference = models[0][1](x).float()[0]  # (T, V)
            ref_greedy = greedy_ids(models[0][1], ids, args.new_tokens)
            for name, model in models[1:]:
                logits = model(x).float()[0]
                err = (logits - reference).abs().max().item()
                rows[name]["abs"].append(err)
                rows[name]["rel"].append(err / reference.abs().max().item())
                rows[name]["top1"].append((logits.argmax(-1) == reference.argmax(-1)).float().mean().item())
                rows[name]["greedy"].append(shared_prefix(greedy_ids(model, ids, args.new_tokens), ref_greedy) / args.new_tokens)
    print(f"## Accuracy against float32: {source}, {len(PROMPTS)} prompts, {args.new_tokens} greedy tokens each\n")
    print("| variant | max abs logit error | relative to max logit | top-1 agreement (prompt positions) "
          "| greedy ids equal to float32 (median prompt) | prompts fully equal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        full = sum(1 for g in r["greedy"] if g == 1.0)
        print(f"| {name} | {max(r['abs']):.4f} | {max(r['rel']):.2%} | {statistics.mean(r['top1']):.1%} "
              f"| {statistics.median(r['greedy']):.0%} | {full}/{len(PROMPTS)} |")
    print(f"\n({time.perf_counter() - start:.0f} s; `python bench/quant_accuracy.py {' '.join(argv or sys.argv[1:])}`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
