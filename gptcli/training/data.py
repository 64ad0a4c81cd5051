"""Training data: text files to token ids to batches. Never prints; progress goes through a callback.

- ``read_texts`` reads DATA arguments (files, folders of ``*.txt``, ``-`` for stdin) as UTF-8.
- ``split_text`` cuts the text into training and validation parts at a fraction of its characters,
  as the book (chapter 5) and nanoGPT's ``shakespeare_char`` do, before tokenizing.
- ``encode`` tokenizes on threads; ``save_ids`` writes the ids as a flat uint16 (or uint32) array,
  and ``load_ids`` maps it back without reading it into memory.
- Two ways to make batches, behind one small interface (``Batches``: ``next``, ``epoch_done``,
  ``evaluation``): ``WindowBatches`` (the book's GPTDatasetV1: windows at a fixed stride, fed through
  torch's DataLoader, shuffled each epoch) and ``RandomBatches`` (nanoGPT's ``get_batch``: windows at
  random offsets). ``make_batches`` picks one for a run's ``sampling``.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

from gptcli.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gptcli.tokenizer import Tokenizer

Progress = Callable[[int, int], None]  # (done, total) in characters


def _ignore(done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class Text:
    name: str  # the path as given, or "<stdin>"
    text: str


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); convert it "
                        "first, e.g. with iconv -t UTF-8") from None


def read_texts(specs: Sequence[str], stdin=None, note: Callable[[str], None] = lambda _: None) -> list[Text]:
    """The texts DATA names, in order: a file, every ``*.txt`` in a folder (sorted), or ``-`` for stdin.

    A folder is read one level deep; what it holds besides ``*.txt`` files (subfolders included) is
    skipped, and ``note`` says so."""
    if not specs:
        raise UserError("no training data: pass one or more text files, folders of *.txt, or - for stdin")
    out: list[Text] = []
    for spec in specs:
        if spec == "-":
            stream = stdin if stdin is not None else sys.stdin
            raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
            out.append(Text("<stdin>", _decode(raw, "<stdin>")))
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.glob("*.txt") if p.is_file())
            skipped = sorted(p.name + "/" * p.is_dir() for p in path.iterdir()
                             if p not in files and not p.name.startswith("."))
            if not files:
                raise UserError(f"{spec}: no *.txt files in this folder" + (
                    f" (subfolders are not read; it holds {', '.join(skipped[:3])}{', ...' * (len(skipped) > 3)})"
                    if skipped else ""))
            if skipped:
                note(f"{spec}: read {len(files)} *.txt file{'s' * (len(files) != 1)}; skipped {len(skipped)} other "
                     f"entr{'ies' if len(skipped) != 1 else 'y'} (subfolders are not read): "
                     f"{', '.join(skipped[:3])}{', ...' * (len(skipped) > 3)}")
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"{spec}: no such file or folder")
        for file in files:
            try:
                raw = file.read_bytes()
            except OSError as exc:
                raise UserError(f"{file}: cannot read: {exc.strerror or exc}") from None
            out.append(Text(str(file), _decode(raw, str(file))))
    for t in out:
        if not t.text.strip():
            raise UserError(f"{t.name}: the file is empty; there is nothing to train on")
    return out


def digest(texts: Sequence[Text]) -> str:
    """sha256 of the texts as trained on, to recognise the same data when a run resumes."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.text.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def join_texts(texts: Sequence[Text], tokenizer_name: str) -> str:
    """One training text. Documents are separated by <|endoftext|> for GPT-2's BPE, as GPT-2 was
    trained; with characters, by nothing (a character model has no such token)."""
    from gptcli.tokenizer import EOT_TOKEN

    sep = EOT_TOKEN if tokenizer_name == "gpt2" else ""
    return sep.join(t.text for t in texts)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, validation): the validation part is the last ``val_fraction`` of the characters."""
    cut = int((1 - val_fraction) * len(text))
    return text[:cut], text[cut:]


def id_dtype(vocab_size: int) -> "np.dtype":
    import numpy as np

    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# Texts above this are tokenized in chunks on tiktoken's threads; below it, in one call.
CHUNK_CHARS = 1 << 20


def _chunks(text: str, size: int) -> list[str]:
    """Pieces of about ``size`` characters, each cut just after a newline that precedes a non-space
    character. GPT-2's pre-tokenizer always splits there, so the ids equal those of the whole text."""
    pieces, start = [], 0
    while start < len(text):
        end = start + size
        if end >= len(text):
            pieces.append(text[start:])
            break
        cut = end
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    return pieces


def encode(text: str, tokenizer: "Tokenizer", progress: Progress = _ignore, threads: int = 2) -> "np.ndarray":
    """The ids of ``text`` as a compact numpy array. GPT-2's BPE allows <|endoftext|> in the text, as
    the book's data loader does; characters map through one lookup table (no Python per character)."""
    import numpy as np

    dtype = id_dtype(tokenizer.vocab_size)
    total = len(text)
    if tokenizer.name == "char":
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(max(map(ord, tokenizer.chars)), int(codes.max(initial=0))) + 1, -1, dtype=np.int64)
        for i, c in enumerate(tokenizer.chars):
            table[ord(c)] = i
        ids = table[codes]
        if (ids < 0).any():
            bad = chr(int(codes[np.argmax(ids < 0)]))
            raise UserError(f"character {bad!r} is not in the model's vocabulary of {tokenizer.vocab_size} characters")
        progress(total, total)
        return ids.astype(dtype)
    pieces = _chunks(text, CHUNK_CHARS) if total > CHUNK_CHARS else [text]
    out: list[np.ndarray] = []
    done = 0
    batch = max(1, threads) * 4
    for first in range(0, len(pieces), batch):
        group = pieces[first : first + batch]
        if hasattr(tokenizer, "encode_arrays"):
            out.extend(tokenizer.encode_arrays(group, allow_eot=True, threads=threads, dtype=dtype.name))
        else:
            out.extend(np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(group, allow_eot=True,
                                                                                      threads=threads))
        done += sum(len(p) for p in group)
        progress(done, total)
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def save_ids(ids: "np.ndarray", path: Path) -> None:
    """Write ids as a flat binary array (nanoGPT's train.bin), atomically."""
    from gptcli.files import atomic_write

    atomic_write(path, ids.tofile)


def load_ids(path: Path, vocab_size: int) -> "np.ndarray":
    """The ids of a file written by ``save_ids``, memory-mapped (a corpus larger than RAM stays on disk)."""
    import numpy as np

    if path.stat().st_size == 0:
        return np.zeros(0, dtype=id_dtype(vocab_size))
    return np.memmap(path, dtype=id_dtype(vocab_size), mode="r")


def n_windows(n_ids: int, length: int, stride: int) -> int:
    """How many windows the book's GPTDatasetV1 makes: starts 0, stride, ... below ``n_ids - length``."""
    return len(range(0, n_ids - length, stride))


class WindowDataset:
    """The book's GPTDatasetV1 over an id array: input ``ids[s : s+length]``, target shifted by one,
    for s = 0, stride, 2*stride, ... while the target fits. Items are int64 tensors, as the book's."""

    def __init__(self, ids: "np.ndarray", length: int, stride: int):
        self.ids = ids
        self.length = length
        self.stride = stride
        self._n = n_windows(len(ids), length, stride)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        import numpy as np
        import torch

        s = i * self.stride
        chunk = torch.from_numpy(np.asarray(self.ids[s : s + self.length + 1], dtype=np.int64))  # (length+1,)
        return chunk[:-1], chunk[1:]


class RankBatches:
    """A batch sampler's batches, cut to one process's share: rows [rank*b, (rank+1)*b) of each.

    Every process draws the same global batches (same seed), so together they cover each batch
    once; with one process it is the batch sampler itself.
    """

    def __init__(self, batches, rank: int, world: int):
        self.batches = batches
        self.rank = rank
        self.world = world

    def __iter__(self):
        for batch in self.batches:
            share = len(batch) // self.world
            yield batch[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.batches)


def window_loader(dataset: WindowDataset, batch_size: int, *, shuffle: bool, drop_last: bool, rank: int = 0,
                  world: int = 1):
    """A torch DataLoader over ``dataset``, as the book builds it (shuffle and drop_last for training).

    ``batch_size`` is the global batch; each process gets its ``batch_size // world`` rows. With one
    process this is exactly ``DataLoader(dataset, batch_size, shuffle=..., drop_last=...)``, which
    draws its shuffle seed from the global RNG each time iteration starts: the book's figures
    depend on that.
    """
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size, drop_last)
    return DataLoader(dataset, batch_sampler=RankBatches(batches, rank, world), num_workers=0)


def random_batch(ids: "np.ndarray", length: int, batch_size: int, generator: "torch.Generator", *, rank: int = 0,
                 world: int = 1) -> tuple["torch.Tensor", "torch.Tensor"]:
    """nanoGPT's get_batch: ``batch_size`` windows at random offsets (global batch; this process's rows)."""
    import numpy as np
    import torch

    starts = torch.randint(len(ids) - length, (batch_size,), generator=generator).numpy()  # (B,)
    share = batch_size // world
    starts = starts[rank * share : (rank + 1) * share]
    index = starts[:, None] + np.arange(length + 1)[None, :]  # (b, length+1)
    chunk = torch.from_numpy(np.asarray(ids[index], dtype=np.int64))  # (b, length+1)
    return chunk[:, :-1], chunk[:, 1:]


# --------------------------------------------------------------------------------------------
# Batches for a training run: one interface, two sampling modes

Batch = tuple["torch.Tensor", "torch.Tensor"]  # inputs (b, T) and targets (b, T)


class Batches(Protocol):
    """Where a training loop gets its micro-batches and its evaluation batches.

    ``next()``: this process's rows of the next micro-batch. ``epoch_done()``: whether the last one
    ended an epoch (then the next starts the next epoch). ``evaluation(split, n)``: up to ``n``
    batches of ``"train"`` or ``"val"``, each an optimizer step's rows, the same in every process.
    ``generator`` draws random batches; ``batch_in_epoch`` and ``epoch_rng`` place the run in its
    epoch. These three are what a checkpoint stores to resume bit for bit.
    """

    generator: "torch.Generator"
    batch_in_epoch: int
    epoch_rng: "torch.Tensor | None"

    def next(self) -> Batch: ...

    def epoch_done(self) -> bool: ...

    def evaluation(self, split: str, n: int) -> Iterator[Batch]: ...


class WindowBatches:
    """The book's batches: fixed windows through torch's DataLoader, reshuffled each epoch.

    Each pass draws its shuffle seed from the global RNG when it starts, so the RNG state from just
    before is kept (``epoch_rng``): a resumed run redraws the same order and skips the batches done.
    Evaluation sees whole batches in every process (the same ones), so every process computes the
    losses one process would, with no communication.
    """

    def __init__(self, train_ids: "np.ndarray", val_ids: "np.ndarray", length: int, stride: int, batch_size: int,
                 grad_accum: int, generator: "torch.Generator", *, rank: int = 0, world: int = 1):
        train_set = WindowDataset(train_ids, length, stride)
        val_set = WindowDataset(val_ids, length, stride)
        self.train_loader = window_loader(train_set, batch_size, shuffle=True, drop_last=True, rank=rank,
                                          world=world)
        eval_rows = batch_size * grad_accum  # an optimizer step's rows
        self.eval_loaders = {"train": window_loader(train_set, eval_rows, shuffle=True, drop_last=True),
                             "val": window_loader(val_set, eval_rows, shuffle=False, drop_last=False)}
        # Micro-batches in an epoch: whole optimizer steps of the loader's batches (drop_last).
        self.per_epoch = (len(train_set) // batch_size) // grad_accum * grad_accum
        self.generator = generator
        self.batch_in_epoch = 0  # micro-batches of this epoch already consumed
        self.epoch_rng: "torch.Tensor | None" = None
        self._batches: Iterator | None = None

    def next(self) -> Batch:
        import torch

        if self._batches is None:
            if self.batch_in_epoch == 0 or self.epoch_rng is None:
                self.epoch_rng = torch.get_rng_state()
                self._batches = iter(self.train_loader)
            else:  # resuming mid-epoch: the same shuffle, then skip what was done
                now = torch.get_rng_state()
                torch.set_rng_state(self.epoch_rng)
                self._batches = iter(self.train_loader)
                for _ in range(self.batch_in_epoch):
                    next(self._batches)
                torch.set_rng_state(now)
        self.batch_in_epoch += 1
        return next(self._batches)

    def epoch_done(self) -> bool:
        if self.batch_in_epoch < self.per_epoch:
            return False
        self.batch_in_epoch, self._batches = 0, None
        return True

    def evaluation(self, split: str, n: int) -> Iterator[Batch]:
        # The book's calc_loss_loader: iterate afresh (so the training loader reshuffles).
        loader = self.eval_loaders[split]
        for i, batch in enumerate(loader):
            if i >= min(n, len(loader)):
                break
            yield batch


class RandomBatches:
    """nanoGPT's batches: windows at random offsets, drawn from the run's own generator. No epochs."""

    def __init__(self, train_ids: "np.ndarray", val_ids: "np.ndarray", length: int, batch_size: int,
                 grad_accum: int, generator: "torch.Generator", *, rank: int = 0, world: int = 1):
        self.ids = {"train": train_ids, "val": val_ids}
        self.length, self.batch_size, self.grad_accum = length, batch_size, grad_accum
        self.rank, self.world = rank, world
        self.generator = generator
        self.batch_in_epoch = 0
        self.epoch_rng = None

    def next(self) -> Batch:
        return random_batch(self.ids["train"], self.length, self.batch_size, self.generator, rank=self.rank,
                            world=self.world)

    def epoch_done(self) -> bool:
        return False

    def evaluation(self, split: str, n: int) -> Iterator[Batch]:
        for _ in range(n):  # an optimizer step's rows, all of them in every process
            yield random_batch(self.ids[split], self.length, self.batch_size * self.grad_accum, self.generator)


def make_batches(sampling: str, train_ids: "np.ndarray", val_ids: "np.ndarray", *, length: int, stride: int,
                 batch_size: int, grad_accum: int, seed: int, rank: int = 0, world: int = 1) -> Batches:
    """``"windows"`` (the book's) or ``"random"`` (nanoGPT's) batches; ``seed`` seeds the batch generator."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if sampling == "windows":
        return WindowBatches(train_ids, val_ids, length, stride, batch_size, grad_accum, generator, rank=rank,
                             world=world)
    return RandomBatches(train_ids, val_ids, length, batch_size, grad_accum, generator, rank=rank, world=world)
