"""Downloading the recipes' texts: from a server on 127.0.0.1 (GPTCLI_DATA_URL), verified, cached.

The texts come from ../shared/data (GPTCLI_DATA_DIR, which .ci/run sets); tests skip without them.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from gptcli.training import downloads as datasets
from gptcli.errors import UserError

DATA = os.environ.get("GPTCLI_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA, reason="GPTCLI_DATA_DIR is unset: it names the folder holding the "
                                "shared texts (see .ci/run)")


class Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:  # no access log on stderr
        pass

    def do_GET(self) -> None:
        Quiet.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """Serve a folder on 127.0.0.1 (a free port) and point GPTCLI_DATA_URL at it; yields the folder."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Quiet.requests = []
    monkeypatch.setenv("GPTCLI_DATA_URL", f"http://127.0.0.1:{server.server_address[1]}/mirror")
    (root / "mirror").mkdir()
    try:
        yield root / "mirror"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@needs_data
@pytest.mark.parametrize("name", ["tinyshakespeare", "the-verdict"])
def test_download_verifies_and_caches(serve, name, tmp_path):
    d = datasets.dataset(name)
    shutil.copy(Path(DATA) / d.file, serve / d.file)
    notes: list[str] = []
    path = datasets.fetch(name, note=notes.append)
    assert path == Path(os.environ["GPTCLI_CACHE_DIR"]) / "data" / d.file
    assert path.read_bytes() == (Path(DATA) / d.file).read_bytes()
    assert notes == [f"downloading {d.title} ({d.size / 1e6:.1f} MB) from {os.environ['GPTCLI_DATA_URL']}/{d.file}"]
    assert Quiet.requests == [f"/mirror/{d.file}"]
    (serve / d.file).unlink()  # the server no longer has it: the cached copy answers, with no request
    assert datasets.fetch(name) == path and Quiet.requests == [f"/mirror/{d.file}"]
    assert [p.name for p in path.parent.iterdir()] == [d.file]  # no partial file left


def test_the_instruction_data_is_the_books_file(serve):
    """The pinned sha256 of the book's instruction-data.json was computed from the repository's git blob,
    not a download (this project's machines have no network): put the downloaded file in GPTCLI_DATA_DIR
    and this checks it against the pin, through the same download path."""
    d = datasets.dataset("instruction-data")
    local = Path(DATA or "/nonexistent") / d.file
    if not local.is_file():
        pytest.skip(f"{d.file} is not in GPTCLI_DATA_DIR; download it from {d.url} to check the pinned sha256")
    shutil.copy(local, serve / d.file)
    path = datasets.fetch("instruction-data")
    assert datasets.sha256_of(path) == d.sha256 and path.stat().st_size == d.size


@needs_data
def test_a_damaged_cache_is_downloaded_again(serve):
    d = datasets.dataset("the-verdict")
    shutil.copy(Path(DATA) / d.file, serve / d.file)
    path = datasets.fetch("the-verdict")
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    assert datasets.fetch("the-verdict") == path and len(Quiet.requests) == 2
    assert datasets.sha256_of(path) == d.sha256


def test_a_wrong_checksum_is_refused_and_nothing_kept(serve):
    d = datasets.dataset("the-verdict")
    (serve / d.file).write_text("I HAD always thought Jack Gisburn rather a cheap genius--" * 10)
    with pytest.raises(UserError) as info:
        datasets.fetch("the-verdict")
    message = str(info.value)
    assert "the download's sha256 is" in message and d.sha256 in message and "nothing was kept" in message
    assert d.url in message and "\n" not in message
    assert not (datasets.data_dir() / d.file).exists()
    assert list(datasets.data_dir().iterdir()) == []


def test_offline_with_nothing_cached_says_where_to_get_it(monkeypatch):
    # A port nothing listens on: connection refused, as offline.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GPTCLI_DATA_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError) as info:
        datasets.fetch("tinyshakespeare")
    message = str(info.value)
    assert message.startswith(f"cannot download Tiny Shakespeare from http://127.0.0.1:{port}/tinyshakespeare.txt (")
    assert "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt" in message
    assert "\n" not in message
    assert list(datasets.data_dir().iterdir()) == []


def test_a_missing_file_on_the_server_is_one_line(serve):
    with pytest.raises(UserError, match=r"cannot download The Verdict .*\(HTTP 404 "):
        datasets.fetch("the-verdict")


def test_canonical_sources():
    assert datasets.dataset("tinyshakespeare").url == (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
    assert datasets.dataset("the-verdict").url == ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                                                   "ch02/01_main-chapter-code/the-verdict.txt")
    assert datasets.dataset("instruction-data").url == (
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json")
    with pytest.raises(UserError, match="unknown dataset 'x'; the known ones are tinyshakespeare, the-verdict, "
                       "sms-spam, instruction-data"):
        datasets.dataset("x")


def test_the_sms_spam_zip_is_downloaded_unzipped_and_its_sha256_reported(serve):
    """Chapter 6's data comes as a zip whose sha256 is not pinned (unknown on the machine this was
    written on): the member is kept, the archive is not, and a note gives the digest to pin."""
    import hashlib
    import zipfile

    d = datasets.dataset("sms-spam")
    assert d.sha256 is None  # said in the code and the README: not known here
    body = "ham\tOk lar...\nspam\tWINNER!! Claim your prize\n"
    with zipfile.ZipFile(serve / d.archive, "w") as z:
        z.writestr("readme", "the UCI readme")
        z.writestr(d.member, body)
    notes: list[str] = []
    path = datasets.fetch("sms-spam", note=notes.append)
    assert path.name == d.file and path.read_text() == body
    assert [p.name for p in path.parent.iterdir()] == [d.file]  # the zip is not kept
    digest = hashlib.sha256((serve / d.archive).read_bytes()).hexdigest()
    assert notes[-1].startswith(f"{d.title}: sha256 {digest}") and "not pinned" in notes[-1]
    assert Quiet.requests == [f"/mirror/{d.archive}"]
    assert datasets.fetch("sms-spam") == path and len(Quiet.requests) == 1  # cached


def test_a_download_that_is_not_a_zip_keeps_nothing(serve):
    d = datasets.dataset("sms-spam")
    (serve / d.archive).write_text("<html>not found</html>")
    with pytest.raises(UserError, match="not the expected zip"):
        datasets.fetch("sms-spam")
    assert not any((Path(os.environ["GPTCLI_CACHE_DIR"]) / "data").iterdir())
