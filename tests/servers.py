"""Running `gptcli serve` in tests: a tiny checkpoint, a server subprocess on 127.0.0.1, raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONTEXT = 16


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny GPT-2-vocabulary model (context 16) whose greedy and sampled text varies, saved as
    ``folder/model.safetensors``; GPT-2's small embedding scale keeps it from echoing its input."""
    from helpers import lively_model, save_checkpoint

    model = lively_model(seed, vocab_size=50257, emb_dim=32, context_length=CONTEXT)
    return save_checkpoint(model, folder)


def write_char_checkpoint(folder: Path, chars: str, seed: int = 0) -> Path:
    """A tiny character-level model (context 48) over ``chars``, its vocabulary in the checkpoint's
    metadata as ``gptcli train`` writes it, saved as ``folder/model.safetensors``."""
    from helpers import lively_char_model, save_checkpoint

    from gptcli.tokenizer import CharTokenizer, to_metadata

    return save_checkpoint(lively_char_model(chars, seed=seed), folder, metadata=to_metadata(CharTokenizer(chars)))


CHAT_CONTEXT = 128  # room for the Alpaca template's preamble and headers (about 40 tokens) and an answer


def write_chat_checkpoint(folder: Path, seed: int = 0, template: str = "alpaca") -> Path:
    """A tiny GPT-2-vocabulary model (context 128) whose checkpoint names a prompt template, as `gptcli train
    --task instruct` records it (metadata ``gptcli.template``), saved as ``folder/model.safetensors``."""
    from helpers import lively_model, save_checkpoint

    from gptcli.templates import TEMPLATE_METADATA_KEY

    model = lively_model(seed, vocab_size=50257, emb_dim=32, context_length=CHAT_CONTEXT)
    return save_checkpoint(model, folder, metadata={TEMPLATE_METADATA_KEY: template})


def server_env(tiktoken_cache: Path | None, cache_dir: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1",
           "GPTCLI_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    if tiktoken_cache is not None:
        env["TIKTOKEN_CACHE_DIR"] = str(tiktoken_cache)
    env.pop("GPTCLI_API_KEY", None)
    return env


class Server:
    """`gptcli serve ARGS --port 0` in a subprocess; ``port`` is read from its 'serving ... at URL' note."""

    def __init__(self, args: list[str], env: dict[str, str], timeout: float = 120):
        self.proc = subprocess.Popen([sys.executable, "-m", "gptcli", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr_lines: list[str] = []
        deadline = time.monotonic() + timeout
        self.port = None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_lines.append(line)
            if line.startswith("note: serving "):
                self.port = int(line.split(" at http://127.0.0.1:")[1].split("/")[0])
                break
        if self.port is None:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.stderr_lines) + self.proc.stderr.read())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, **kwargs) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, **kwargs)
        return status, json.loads(data)

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        """SIGTERM; the exit code and the rest of stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, "".join(self.stderr_lines) + err


def health(server: Server) -> dict:
    status, body = server.json("GET", "/health")
    assert status == 200
    return body


def wait_idle(server: Server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = health(server)
        if state["running"] == 0 and state["waiting"] == 0:
            return state
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {health(server)}")


def open_stream(server: Server, body: dict, key: str | None = None) -> socket.socket:
    """A streamed completion on a raw socket, returned once its first chunks have arrived: a row that
    keeps a batch under way while other requests join it (close the socket to end it)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"{auth}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(4096)
    return sock


def sse_events(data: bytes) -> list[str]:
    """The ``data:`` payloads of a server-sent-events body, checking its framing on the way."""
    text = data.decode()
    assert text.endswith("\n\n"), text[-100:]
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]
