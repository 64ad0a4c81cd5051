"""Peak memory (RSS) of loading GPT-2 XL (1558M) at float32 through gptcli.weights.load_model.

Writes a checkpoint of random numbers in the Hugging Face layout the Hub serves (unprefixed names,
Conv1D weights stored (in, out), plus the float32 attn.bias mask buffers the release files carry),
streamed tensor by tensor so the writer itself never holds the model. Then, in a fresh interpreter,
loads it and reports peak RSS (VmHWM) against the weights' size. The target is under 1.3x.

    python bench/load_rss.py                       # writes ~6.4 GB under a temp folder, deletes it after
    python bench/load_rss.py --keep --dir /data    # keep the file for another run
    python bench/load_rss.py --size 124M           # quicker
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package


def hf_shapes(size: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Tensor name -> (shape, is_weight) for a released GPT-2 size, in the order the release files use."""
    from gptcli.checkpoint import HF, expected_tensors
    from gptcli.config import shipped_config

    cfg = shipped_config(size)
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for name, shape in expected_tensors(cfg, HF).items():
        out[name] = (shape, True)
        if name.endswith("ln_1.bias"):  # the causal-mask buffer sits with each block's attention
            out[name.replace("ln_1.bias", "attn.bias")] = ((1, 1, cfg.context_length, cfg.context_length), False)
    return out


def write_checkpoint(path: Path, size: str) -> int:
    """Stream a random float32 checkpoint to ``path``; return the weights' bytes (mask buffers excluded)."""
    import torch

    shapes = hf_shapes(size)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, _) in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
    weights = 0
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, is_weight) in shapes.items():
            if is_weight:
                t = torch.randn(shape, generator=gen) * 0.02
                weights += t.numel() * 4
            else:
                t = torch.ones(shape).tril()
            f.write(t.numpy().tobytes())
            del t
    return weights


MEASURE = r"""
import json, resource, sys, time
import torch
from gptcli.weights import load_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

before = status("VmRSS")
start = time.perf_counter()
loaded = load_model(size=None, config=None, weights=sys.argv[1], device=torch.device("cpu"), dtype=torch.float32)
seconds = time.perf_counter() - start
params = sum(p.numel() for p in loaded.model.parameters())
print(json.dumps({"rss_before": before, "peak_rss": status("VmHWM"), "rss_after": status("VmRSS"),
                  "seconds": seconds, "params": params, "config": loaded.cfg.name}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1558M")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="gptcli-rss-", dir=args.dir))
    path = folder / "model.safetensors"
    try:
        start = time.perf_counter()
        weights = write_checkpoint(path, args.size)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, weights {weights / 1e9:.2f} GB) "
              f"in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        m = json.loads(proc.stdout)
        gib = 1024**3
        print(f"config {m['config']}: {m['params']:,} parameters, float32 weights {weights / gib:.2f} GiB")
        print(f"RSS before loading (python + torch): {m['rss_before'] / gib:.2f} GiB")
        print(f"peak RSS while loading:              {m['peak_rss'] / gib:.2f} GiB "
              f"= {m['peak_rss'] / weights:.3f}x the weights (target < 1.3x)")
        print(f"RSS after loading:                   {m['rss_after'] / gib:.2f} GiB")
        print(f"peak above the interpreter:          {(m['peak_rss'] - m['rss_before']) / weights:.3f}x the weights")
        print(f"load time:                           {m['seconds']:.1f} s")
    finally:
        if args.keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
