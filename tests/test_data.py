"""gptcli.training.data.encode: a text cut into pieces for tiktoken's threads gives the ids of the whole text."""

from __future__ import annotations

import numpy as np
import pytest

from gptcli.training import data
from gptcli.tokenizer import CharTokenizer, GPT2BPE, get_tokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n  indented line\n"
        "All:\nSpeak, speak.<|endoftext|>Second document:\n   trailing spaces   \n\n\n" * 40)


@pytest.mark.parametrize("numpy_path", [True, False])
def test_pieces_on_threads_give_the_ids_of_the_whole_text(monkeypatch, numpy_path):
    monkeypatch.setattr(data, "CHUNK_CHARS", 500)  # many pieces, cut at newlines
    if not numpy_path:
        monkeypatch.delattr(GPT2BPE, "encode_arrays")  # the fallback: encode_batch and a copy
    expected = get_tokenizer().encode(TEXT, allowed_special={"<|endoftext|>"})
    seen = []
    ids = data.encode(TEXT, GPT2BPE(), progress=lambda done, total: seen.append((done, total)), threads=2)
    assert ids.dtype == np.uint16
    assert ids.tolist() == expected
    assert len(seen) > 1 and seen[-1] == (len(TEXT), len(TEXT))


def test_encode_arrays_matches_encode_batch_with_and_without_eot():
    tok = GPT2BPE()
    texts = ["Hello<|endoftext|>world", "ab\ncd", ""]
    for allow in (True, False):
        arrays = tok.encode_arrays(texts, allow_eot=allow, threads=2, dtype="uint32")
        assert [a.tolist() for a in arrays] == tok.encode_batch(texts, allow_eot=allow)
        assert all(a.dtype == np.uint32 for a in arrays)


def test_characters_map_through_the_vocabulary():
    tok = CharTokenizer.from_text(TEXT)
    ids = data.encode(TEXT, tok)
    assert ids.dtype == np.uint16 and ids.tolist() == tok.encode(TEXT)


def test_a_folder_says_what_it_skipped(tmp_path):
    from pathlib import Path

    from gptcli.training.data import read_texts
    from gptcli.errors import UserError

    folder = tmp_path / "docs"
    (folder / "more").mkdir(parents=True)
    (folder / "more" / "c.txt").write_text("in a subfolder")
    (folder / "a.txt").write_text("one")
    (folder / "b.txt").write_text("two")
    (folder / "notes.md").write_text("not a .txt")
    (folder / ".hidden").write_text("dot files are not mentioned")
    notes: list[str] = []
    texts = read_texts([str(folder)], note=notes.append)
    assert [Path(t.name).name for t in texts] == ["a.txt", "b.txt"]
    assert notes == [f"{folder}: read 2 *.txt files; skipped 2 other entries (subfolders are not read): more/, notes.md"]
    notes.clear()
    read_texts([str(folder / "more")], note=notes.append)
    assert notes == []
    (folder / "a.txt").unlink()
    (folder / "b.txt").unlink()
    with pytest.raises(UserError, match=r"no \*\.txt files in this folder \(subfolders are not read; it holds more/, "
                                        r"notes\.md\)$"):
        read_texts([str(folder)])
