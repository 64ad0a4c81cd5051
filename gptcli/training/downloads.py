"""Texts to train on, downloaded once from their canonical sources, verified and cached. Never prints.

- Tiny Shakespeare: karpathy's char-rnn repository, the URL nanoGPT's
  ``data/shakespeare_char/prepare.py`` downloads (1,115,394 characters).
- The Verdict: the book's repository, ``rasbt/LLMs-from-scratch``, the file chapter 2 downloads
  (20,479 characters).
- The SMS Spam Collection (UCI), the zip chapter 6 downloads, and its ``SMSSpamCollection`` file
  (label<TAB>text). Its sha256 is NOT pinned: this code was written on a machine without network
  access, so the file's digest could not be taken; the download is used as it comes, and its sha256
  is reported in a note so that it can be pinned here (``Dataset.sha256``) once known.
- The book's instruction data (chapter 7, ``--recipe book-ch07``): 1,100 ``{instruction, input, output}``
  entries, ``ch07/01_main-chapter-code/instruction-data.json`` in the same repository. This machine could
  not download it; its sha256 was computed from the file's blob in a snapshot of the repository
  (``git show HEAD:ch07/01_main-chapter-code/instruction-data.json | sha256sum``; the file has had one
  version, commit 4ac480c of June 2024), the way The Verdict's pinned sha256 checks out from the same
  snapshot. Not yet checked against a download from raw.githubusercontent.com.

Each download with a pinned sha256 is checked against it before it is used, and kept in the cache
(``$GPTCLI_CACHE_DIR/data``, else ``$XDG_CACHE_HOME/gptcli/data``, default ``~/.cache/gptcli/data``),
so later runs work offline. ``GPTCLI_DATA_URL`` replaces the sources by one base URL serving the
files under their cached names (``$GPTCLI_DATA_URL/tinyshakespeare.txt``): a mirror, or a folder
served with ``python -m http.server``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gptcli.cache import cache_root
from gptcli.errors import UserError
from gptcli.files import atomic_write

BASE_URL_ENV = "GPTCLI_DATA_URL"
DOWNLOAD_TIMEOUT_S = 30  # per blocking read, not for the whole file
CHUNK = 1 << 16


@dataclass(frozen=True)
class Dataset:
    name: str  # what recipes call it
    title: str  # for people
    file: str  # the cached file's name, and its name under GPTCLI_DATA_URL
    url: str  # the canonical source
    sha256: str | None  # of the file downloaded (the archive, if any); None: not known, not checked
    size: int | None  # bytes of the file kept; None: not known
    archive: str | None = None  # the download is this zip (its name under GPTCLI_DATA_URL) ...
    member: str | None = None  # ... and the file kept is this member of it

    def source(self) -> str:
        """Where to download it from now: under ``$GPTCLI_DATA_URL`` when set, else the canonical URL."""
        base = os.environ.get(BASE_URL_ENV, "").strip()
        return f"{base.rstrip('/')}/{self.archive or self.file}" if base else self.url


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("tinyshakespeare", "Tiny Shakespeare", "tinyshakespeare.txt",
                "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394),
        Dataset("the-verdict", "The Verdict (Edith Wharton, 1908)", "the-verdict.txt",
                "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/"
                "the-verdict.txt",
                "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f", 20_479),
        # Not pinned (None): unknown here, see the module's docstring.
        Dataset("sms-spam", "the SMS Spam Collection (UCI)", "SMSSpamCollection.tsv",
                "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip", None, None,
                archive="sms+spam+collection.zip", member="SMSSpamCollection"),
        Dataset("instruction-data", "the book's instruction data (chapter 7)", "instruction-data.json",
                "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                "instruction-data.json",
                # From the repository's git blob, not a download (see above): this machine has no network.
                "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", 203_524),
    )
}
MAX_UNKNOWN_BYTES = 64 << 20  # a download of unknown size stops here (the SMS zip is about 0.2 MB)


def data_dir() -> Path:
    """Where downloaded texts are kept."""
    return cache_root() / "data"


def dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; the known ones are {', '.join(DATASETS)}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached(d: Dataset) -> Path | None:
    """The cached copy when it is there and intact (its sha256 checked: 1 MB hashes in milliseconds)."""
    path = data_dir() / d.file
    try:
        if d.archive is not None or d.sha256 is None:  # checked when downloaded (or not known)
            return path if path.is_file() and path.stat().st_size > 0 else None
        return path if path.is_file() and path.stat().st_size == d.size and sha256_of(path) == d.sha256 else None
    except OSError:
        return None


def fetch(name: str, note: Callable[[str], None] = lambda _: None) -> Path:
    """The local path of dataset ``name``: the cached copy, else downloaded, verified and cached.

    UserError (one line) when it cannot be had: no network (saying where to get it by hand), a
    download whose sha256 is not the expected one (nothing is kept), or a cache that cannot be written.
    """
    d = dataset(name)
    path = cached(d)
    if path is not None:
        return path
    url = d.source()
    note(f"downloading {d.title}{f' ({d.size / 1e6:.1f} MB)' if d.size else ''} from {url}")
    folder = data_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the data cache {folder}: {exc.strerror or exc}; set GPTCLI_CACHE_DIR to a "
                        "writable folder, or download the text yourself and pass it as DATA") from None
    target = folder / d.file
    if d.archive is None:
        atomic_write(target, lambda tmp: _download(url, tmp, d))  # a failure keeps nothing
        return target
    archive = folder / d.archive
    digest = [""]
    atomic_write(archive, lambda tmp: digest.__setitem__(0, _download(url, tmp, d)))
    try:
        atomic_write(target, lambda tmp: _extract(archive, d, tmp))
    finally:
        archive.unlink(missing_ok=True)
    if d.sha256 is None:
        note(f"{d.title}: sha256 {digest[0]} (not pinned in gptcli: it was unknown when this recipe was written)")
    return target


def _extract(archive: Path, d: Dataset, out: Path) -> None:
    """``d.member`` of the zip ``archive``, written to ``out``."""
    import zipfile

    try:
        with zipfile.ZipFile(archive) as z:
            out.write_bytes(z.read(d.member))
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise UserError(f"{d.url}: the download is not the expected zip holding {d.member} ({exc}); get it by "
                        f"hand, unzip it and pass {d.member} as DATA") from None


def _download(url: str, path: Path, d: Dataset) -> str:
    """Stream ``url`` into ``path``, then check its sha256 when ``d`` pins one (UserError when it is not
    ``d``'s); the sha256."""
    import urllib.error
    import urllib.request

    digest = hashlib.sha256()
    got = 0
    try:
        with open(path, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "gptcli"})
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    got += len(chunk)
                    if got > (4 * d.size + CHUNK if d.size else MAX_UNKNOWN_BYTES):  # not the file we want
                        break
                    digest.update(chunk)
                    out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        what = f"unzip it and pass {d.member}" if d.member else "pass the file"
        raise UserError(f"cannot download {d.title} from {url} ({reason}); offline, get it from {d.url} (or set "
                        f"{BASE_URL_ENV} to a mirror), {what} as DATA, or put it at "
                        f"{path.parent / d.file}") from None
    if d.sha256 is not None and digest.hexdigest() != d.sha256:
        raise UserError(f"{url}: the download's sha256 is {digest.hexdigest()} ({got:,} bytes), not {d.title}'s "
                        f"{d.sha256} ({d.size:,} bytes); nothing was kept. A changed or damaged file: get it from "
                        f"{d.url} and pass it as DATA")
    return digest.hexdigest()
