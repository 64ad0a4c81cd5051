"""Code several test files share."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """The book's listing 4.8 in behaviour: recompute the cropped context each step, greedily."""
    import torch

    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        idx_next = torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def imported_modules(*args: str) -> tuple[str, set[str]]:
    """Run `gptcli ARGS` in a fresh interpreter; its stdout and the names of every module it imported."""
    code = (
        "import sys, runpy; sys.argv = ['gptcli', *sys.argv[1:]];\n"
        "try:\n    runpy.run_module('gptcli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('\\n'.join(sorted(sys.modules)), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    return proc.stdout, set(proc.stderr.split())


def subprocess_env() -> dict:
    """The environment for a gptcli child process: this one's, with one thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def read_all(fd: int) -> bytes:
    """Everything a child wrote to a pseudo-terminal, read from its controller end ``fd`` until it closes."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO once the child has exited and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def network_tests_enabled() -> bool:
    """Tests that reach the Hugging Face Hub run only when asked: GPTCLI_NETWORK_TESTS=1.

    They never probe the network on their own, so an offline or sandboxed run makes no connection.
    """
    return os.environ.get("GPTCLI_NETWORK_TESTS") == "1"


def lively_model(seed: int = 0, tie: bool = True, *, vocab_size: int = 300, emb_dim: int = 64,
                 context_length: int = 16):
    """A tiny random GPTModel (vocab 300, context 16 unless told) whose sampled output varies.

    The book's N(0, 1) embeddings make a random model echo its input token; GPT-2's own scale
    (small embeddings) lets the other weights matter.
    """
    import torch

    from gptcli.config import GPTConfig
    from gptcli.model.gpt import GPTModel

    cfg = GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim, n_heads=4, n_layers=2,
                    drop_rate=0.0, qkv_bias=True, tie_weights=tie, name="tiny")
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(0.05)
        model.pos_emb.weight.mul_(0.05)
    return model


def save_checkpoint(model, path, *, metadata=None):
    """Write ``model`` as safetensors in gptcli's layout (a tied head stored once, as tok_emb) with its
    config in the header, so loading it back needs no --config. ``path``: a file, or a folder that
    gets model.safetensors. Returns the file written."""
    import json
    from pathlib import Path

    from gptcli.checkpoint import METADATA_CONFIG_KEY
    from gptcli.files import save_safetensors

    path = Path(path).expanduser()
    if path.is_dir() or not path.suffix:
        path = path / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()
               if not (name == "out_head.weight" and model.cfg.tie_weights)}
    return save_safetensors(tensors, path, {"format": "pt", METADATA_CONFIG_KEY: json.dumps(model.cfg.to_dict()),
                                            **(metadata or {})})


def locate_checkpoint(spec, note=lambda _message: None):
    """FILE | DIR | HUB_ID -> the local .safetensors path gptcli.weights.locate finds."""
    from gptcli.weights import locate

    return locate(spec, note).path


def lively_char_model(chars: str, context_length: int = 48, seed: int = 0):
    """A tiny random character-level GPTModel whose greedy text varies (one character, one token).

    N(0, 0.5) weights and jittered biases and norms: the book's init made tiny models repeat one character.
    """
    import torch

    from gptcli.config import GPTConfig
    from gptcli.model.gpt import GPTModel

    cfg = GPTConfig(vocab_size=len(chars), context_length=context_length, emb_dim=32, n_heads=4, n_layers=2,
                    drop_rate=0.0, qkv_bias=True, tie_weights=True, name="char")
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_tiny_gpt2(folder=None, *, seed: int = 0, jitter: float = 0.0, vocab_size: int = 50257, n_positions: int = 16,
                 n_embd: int = 32, n_layer: int = 2, n_head: int = 4, **config):
    """A tiny random transformers ``GPT2LMHeadModel`` (the independent oracle), seeded; ``jitter`` adds
    N(0, jitter) to every bias and norm (so a mix-up would show); saved with ``save_pretrained`` to
    ``folder`` when given. Returns the model (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head, **config)).eval()
    if jitter:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn_like(p) * jitter)
    if folder is not None:
        model.save_pretrained(folder)
    return model


def scripted_model(by_position, default: int, *, context_length: int = 128, n_layers: int = 1):
    """A GPT-2-vocabulary GPTModel whose next token depends only on the position: ``by_position[p]`` at
    position p, ``default`` past the list. Its blocks add nothing (zero output projections), token
    embeddings are zero and position p's embedding is one-hot, so the final norm leaves a vector that
    picks column p of the (untied) head: the scripted token's logit is about sqrt(context_length), every
    other one about 0. For testing what a decoding loop does with known output, such
    as where it stops."""
    import torch

    from gptcli.config import GPTConfig
    from gptcli.model.gpt import GPTModel

    cfg = GPTConfig(vocab_size=50257, context_length=context_length, emb_dim=context_length, n_heads=4,
                    n_layers=n_layers, drop_rate=0.0, qkv_bias=False, tie_weights=False, name="scripted")
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for block in model.trf_blocks:
            for layer in (block.att.out_proj, block.ff.layers[2]):
                layer.weight.zero_()
                layer.bias.zero_()
        model.tok_emb.weight.zero_()
        model.pos_emb.weight.copy_(torch.eye(context_length) * 10)
        # The norm maps 10 * e_p to sqrt(D-1) at p and -1/sqrt(D-1) elsewhere; the shift zeroes the rest.
        model.final_norm.shift.fill_(1 / (context_length - 1) ** 0.5)
        model.out_head.weight.zero_()
        for p in range(context_length):
            token = by_position[p] if p < len(by_position) and by_position[p] is not None else default
            model.out_head.weight[token, p] = 1.0
    return model


class InteractiveTerminal:
    """``gptcli generate --interactive`` in a real pseudo-terminal (pexpect), on the CPU in float32 with
    the default kernels; ``args`` adds to the command line. ``start``: what came before the first prompt."""

    ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")

    def __init__(self, checkpoint, tmp_path, *args: str, env: dict[str, str] | None = None):
        import pexpect

        (tmp_path / "inputrc").write_text("set enable-bracketed-paste off\n")
        env = {**os.environ, "TERM": "xterm-256color", "INPUTRC": str(tmp_path / "inputrc"), "OMP_NUM_THREADS": "1",
               **(env or {})}
        # Ctrl-C must reach the child even where the tests run with SIGINT ignored (a job started in the
        # background by a non-interactive shell): an ignored signal stays ignored across exec.
        self.child = pexpect.spawn(sys.executable, ["-m", "gptcli", "generate", "--interactive", "--weights",
                                                    str(checkpoint), *args, "--device", "cpu", "--dtype", "float32",
                                                    "--no-tune"],
                                   env=env, timeout=120, encoding="utf-8", dimensions=(40, 250),
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.start = self.prompt()

    def prompt(self) -> str:
        """Everything up to the next "> " prompt, colours and terminal codes taken out."""
        self.child.expect_exact("> ")
        return self.ANSI.sub("", self.child.before).replace("\r\n", "\n").replace("\r", "")

    def send(self, line: str) -> str:
        self.child.sendline(line)
        return self.prompt()


def train_until_first_checkpoint(*args: str):
    """``gptcli train ARGS`` (in-process) killed right after its first checkpoint: the loop is not consumed
    past it, as a SIGKILL would leave it."""
    from typer.testing import CliRunner

    from gptcli import training
    from gptcli.cli import app
    from gptcli.commands import train as train_cmd

    original = train_cmd._render

    def render_until_checkpoint(trainer, run, json_mode):
        log = training.RunLog(run.out, plot=False)
        for ev in trainer.events():
            log.record(ev)
            if ev["event"] == "checkpoint":
                return

    train_cmd._render = render_until_checkpoint
    try:
        return CliRunner().invoke(app, ["train", *args])
    finally:
        train_cmd._render = original
