"""Fixtures that isolate every test from the user's environment.

- tiktoken reads GPT-2's BPE file from a temporary copy of ../shared/tiktoken-cache
  (tiktoken deletes a cached file whose hash does not match, so never point it at the original);
- the Hugging Face cache is a fresh temporary folder and the Hub is offline;
- torch.compile's Inductor cache is one temporary folder for the session.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_TIKTOKEN = REPO.parent / "shared" / "tiktoken-cache"


def _tiktoken_source() -> Path | None:
    for candidate in (os.environ.get("GPTCLI_TEST_TIKTOKEN_SOURCE"), os.environ.get("TIKTOKEN_CACHE_DIR"), SHARED_TIKTOKEN):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).iterdir()):
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """A private copy of GPT-2's BPE file; None when there is none (tokenizer tests then fail loudly)."""
    source = _tiktoken_source()
    if source is None:
        return None
    target = tmp_path_factory.mktemp("tiktoken-cache")
    for f in source.iterdir():
        shutil.copy2(f, target / f.name)
    return target


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Inductor cache folder for the whole session. Today's tests gain no time from it (each compiles a
    graph no other test does, and Inductor keeps kernels in memory within the process); compiles in child
    processes would reuse it. No test measures a cold compile; one that did would need a folder of its own."""
    return tmp_path_factory.mktemp("inductor")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiktoken_cache: Path | None,
                 inductor_cache: Path) -> None:
    if tiktoken_cache is not None:
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
    else:
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-tiktoken-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    monkeypatch.setenv("GPTCLI_CACHE_DIR", str(tmp_path / "gptcli-cache"))  # the kernel choices (gptcli.kernels.decode)
    monkeypatch.delenv("GPTCLI_NO_TUNE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what configure_threads picks in CLI runs (see one_thread)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is many times faster than two busy-waiting ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config_file(tmp_path: Path):
    """Write a small YAML config and return its path; keyword arguments override the defaults."""

    def make(**overrides) -> Path:
        values = {
            "vocab_size": 50257,
            "context_length": 16,
            "emb_dim": 32,
            "n_heads": 4,
            "n_layers": 2,
            "drop_rate": 0.1,
            "qkv_bias": True,
            "tie_weights": True,
        }
        values.update(overrides)
        path = tmp_path / f"tiny-{len(list(tmp_path.glob('tiny-*.yaml')))}.yaml"
        path.write_text("".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in values.items()))
        return path

    return make


@pytest.fixture
def tiny(tiny_config_file) -> list[str]:
    """Options for a tiny random model (context 16), so runs take milliseconds."""
    return ["--config", str(tiny_config_file()), "--weights", "random"]
