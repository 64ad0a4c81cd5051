"""gptcli's cache folder: kernel choices (``kernels.json``) and downloaded texts (``data/``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$GPTCLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/gptcli`` (default ``~/.cache/gptcli``)."""
    root = os.environ.get("GPTCLI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "gptcli")
    return Path(root).expanduser()
