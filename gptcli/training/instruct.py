"""Instruction fine-tuning, as the book's chapter 7 does it (``gptcli train DATA.json --task instruct``).
Never prints; notes go through a callback.

- ``read_entries``: the book's ``instruction-data.json`` format, a JSON list of ``{instruction, input,
  output}`` objects (``input`` may be empty or left out), checked entry by entry.
- ``split_entries``: the book's split: the first 85% train, the next 10% test, the last 5% validate.
- ``encode_example``: the book's ``InstructionDataset``: prompt (``templates.format_input``) plus
  ``"\\n\\n### Response:\\n" + output``, tokenized as one text; the prompt's own token count is kept
  for ``--mask-prompt`` (the book's exercise 7.2 counts it the same way, tokenized alone).
- ``collate``: the book's ``custom_collate_fn``: each example gets one <|endoftext|> (50256), the
  batch is padded with it to its longest example, targets are the inputs shifted by one, every
  padding target after the first end token is -100 (the first stays: the model learns to stop),
  ``mask_prompt`` sets the targets of the prompt to -100 too, and rows are cut to ``max_length``.
- ``InstructData``: the encoded splits of a run; it plans the steps, makes the batches (the book's
  DataLoaders: shuffled each epoch, ``drop_last``), and is stored in the run folder so --resume works.

The cross-entropy of ``gptcli.training.loop.batch_loss`` leaves the -100 targets out of the mean
(PyTorch's ``ignore_index``), so masked positions do not move the loss or its gradient.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from gptcli.errors import UserError
from gptcli.templates import ALPACA, TEMPLATE_METADATA_KEY, format_example, format_input
from gptcli.training.data import RankBatches, WindowBatches

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gptcli.tokenizer import Tokenizer
    from gptcli.training.data import Text
    from gptcli.training.settings import TrainSettings

PAD_ID = 50256  # <|endoftext|>: the end of every example and the padding after it
IGNORE_INDEX = -100  # PyTorch cross-entropy's default ignore_index
TRAIN_FRACTION, TEST_FRACTION = 0.85, 0.10  # the book's split; validation is the rest (5%)
SPLITS_FILE = "instruct.json"  # in the run's data/ folder, beside train.bin and val.bin
FIELDS = ("instruction", "input", "output")


def metadata() -> dict[str, str]:
    """What an instruction-tuned run records in its checkpoints: the template its prompts follow."""
    return {TEMPLATE_METADATA_KEY: ALPACA, "gptcli.task": "instruct"}


# --------------------------------------------------------------------------------------------
# Reading and splitting the data


@dataclass(frozen=True)
class Entry:
    instruction: str
    input: str
    output: str

    def to_dict(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def parse_entries(text: str, source: str) -> list[Entry]:
    """The entries of a JSON list of ``{instruction, input, output}``; UserError naming the bad entry
    (0-based index, as in Python and jq)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}); "
                        "--task instruct reads a JSON list of {instruction, input, output} objects") from None
    if not isinstance(raw, list):
        raise UserError(f"{source}: expected a JSON list of {{instruction, input, output}} objects, got {_kind(raw)}")
    if not raw:
        raise UserError(f"{source}: the list is empty; there is nothing to train on")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise UserError(f"{source}: entry {i} is {_kind(item)}, not an object with instruction, input and output")
        for key in ("instruction", "output"):
            if key not in item:
                raise UserError(f"{source}: entry {i} has no {key!r} (each entry needs 'instruction' and 'output'; "
                                "'input' may be empty or left out)")
        for key in FIELDS:
            if key in item and not isinstance(item[key], str):
                raise UserError(f"{source}: entry {i}: {key!r} must be a string, got {_kind(item[key])}"
                                + (" (leave 'input' out, or \"\", for none)" if key == "input" else ""))
        entries.append(Entry(item["instruction"], item.get("input", ""), item["output"]))
    return entries


def read_entries(texts: "Sequence[Text]") -> list[Entry]:
    """The entries of the one JSON file (or stdin) ``--task instruct`` trains on."""
    if len(texts) != 1:
        raise UserError(f"--task instruct trains on one JSON file (a list of {{instruction, input, output}}), got "
                        f"{len(texts)} files")
    return parse_entries(texts[0].text, texts[0].name)


def split_entries(entries: Sequence[Entry]) -> tuple[list[Entry], list[Entry], list[Entry]]:
    """(train, validation, test), as the book cuts them: train the first 85%, test the next 10%,
    validation the rest (5%), in the file's order (the book does not shuffle before splitting)."""
    n_train = int(len(entries) * TRAIN_FRACTION)
    n_test = int(len(entries) * TEST_FRACTION)
    train = list(entries[:n_train])
    test = list(entries[n_train:n_train + n_test])
    val = list(entries[n_train + n_test:])
    return train, val, test


def sample_prompt(val: Sequence[Entry]) -> str:
    """The prompt of the progress samples: the first validation entry's, as the book's
    ``start_context=format_input(val_data[0])``."""
    return format_input(val[0].instruction, val[0].input) if val else ""


# --------------------------------------------------------------------------------------------
# Tokens and batches


@dataclass(frozen=True)
class Example:
    """One tokenized example: the prompt and response's ids (no end token yet), and how many of them
    the prompt alone tokenizes to."""

    ids: tuple[int, ...]
    prompt_len: int


def encode_examples(entries: Sequence[Entry], tokenizer: "Tokenizer") -> list[Example]:
    """The book's InstructionDataset: ``format_input + "\\n\\n### Response:\\n" + output``, tokenized
    as one text; the prompt tokenized alone for its length (exercise 7.2)."""
    prompts, fulls = [], []
    for e in entries:
        prompt, response = format_example(e.instruction, e.input, e.output)
        prompts.append(prompt)
        fulls.append(prompt + response)
    full_ids = tokenizer.encode_batch(fulls) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(t) for t in fulls]
    prompt_ids = tokenizer.encode_batch(prompts) if hasattr(tokenizer, "encode_batch") else \
        [tokenizer.encode(t) for t in prompts]
    return [Example(tuple(ids), len(p)) for ids, p in zip(full_ids, prompt_ids)]


def collate(batch: Sequence[Example], *, pad_id: int = PAD_ID, ignore_index: int = IGNORE_INDEX,
            max_length: int | None = None, mask_prompt: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The book's ``custom_collate_fn`` (and exercise 7.2's prompt mask): (inputs, targets), (B, T) int64."""
    import torch

    longest = max(len(ex.ids) + 1 for ex in batch)
    inputs_list, targets_list = [], []
    for ex in batch:
        item = list(ex.ids) + [pad_id]  # the end token
        padded = item + [pad_id] * (longest - len(item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        ends = torch.nonzero(targets == pad_id).squeeze(1)
        if ends.numel() > 1:
            targets[ends[1:]] = ignore_index  # padding; the first end token stays a target
        if mask_prompt:
            targets[: ex.prompt_len - 1] = ignore_index  # the targets that are prompt tokens
        if max_length is not None:
            inputs, targets = inputs[:max_length], targets[:max_length]
        inputs_list.append(inputs)
        targets_list.append(targets)
    return torch.stack(inputs_list), torch.stack(targets_list)


class ExampleDataset:
    """A map-style dataset of examples (what torch's DataLoader indexes)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def example_loader(examples: Sequence[Example], batch_size: int, collate_fn: Callable, *, shuffle: bool,
                   drop_last: bool, rank: int = 0, world: int = 1):
    """The book's DataLoader over examples (``collate_fn``), each process taking its share of a batch
    (``RankBatches``, as the windows do). Shuffling draws its seed from the global RNG each pass."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    dataset = ExampleDataset(examples)
    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size, drop_last)
    return DataLoader(dataset, batch_sampler=RankBatches(batches, rank, world), collate_fn=collate_fn, num_workers=0)


class InstructBatches(WindowBatches):
    """The book's chapter-7 loaders behind the Batches interface: shuffled, ``drop_last`` training
    batches, validation in order. Epochs, evaluation and resuming mid-epoch work as for the windows
    (``WindowBatches``, whose methods these are); only the loaders differ."""

    def __init__(self, data: "InstructData", batch_size: int, grad_accum: int, generator: "torch.Generator", *,
                 rank: int = 0, world: int = 1):
        collate_fn = data.collate_fn()
        self.train_loader = example_loader(data.train, batch_size, collate_fn, shuffle=True, drop_last=True,
                                           rank=rank, world=world)
        eval_rows = batch_size * grad_accum
        self.eval_loaders = {
            "train": example_loader(data.train, eval_rows, collate_fn, shuffle=True, drop_last=True),
            "val": example_loader(data.val, eval_rows, collate_fn, shuffle=False, drop_last=False)}
        self.per_epoch = (len(data.train) // batch_size) // grad_accum * grad_accum
        self.generator = generator
        self.batch_in_epoch = 0
        self.epoch_rng = None
        self._batches = None


@dataclass
class InstructData:
    """A run's tokenized splits and how its batches are made."""

    train: list[Example]
    val: list[Example]
    test: list[Entry] = field(default_factory=list)  # held out, kept in the run folder for evaluation
    max_length: int = 1024
    mask_prompt: bool = False
    truncated: int = 0  # train and validation examples longer than max_length (cut)
    dropped: int = 0  # examples left out: with --mask-prompt, a prompt that fills max_length leaves no target

    def collate_fn(self) -> Callable:
        from functools import partial

        return partial(collate, max_length=self.max_length, mask_prompt=self.mask_prompt)

    def plan_steps(self, s: "TrainSettings") -> tuple[int, int]:
        """(total optimizer steps, steps per epoch); UserError when the splits are too small."""
        total = len(self.train) + len(self.val) + len(self.test) + self.dropped
        split = "the book's split: the first 85% train, the next 10% test, the last 5% validate"
        per_epoch = (len(self.train) // s.batch_size) // s.grad_accum
        if per_epoch == 0:
            raise UserError(f"the training split has {len(self.train)} of the {total} examples ({split}), fewer than "
                            f"one step (batch size {s.batch_size} x {s.grad_accum} accumulation); use more examples or "
                            "a smaller --batch-size")
        if not self.val:
            raise UserError(f"the validation split of the {total} examples is empty ({split}); use more examples")
        totals = [s.epochs * per_epoch] if s.epochs is not None else []
        if s.max_steps is not None:
            totals.append(s.max_steps)
        return min(totals), per_epoch

    def batches(self, s: "TrainSettings", generator: "torch.Generator", *, rank: int = 0,
                world: int = 1) -> InstructBatches:
        return InstructBatches(self, s.batch_size, s.grad_accum, generator, rank=rank, world=world)

    def longest_row(self) -> int:
        """A bound on a batch's row length (for the memory check): the longest example and its end token,
        cut to max_length."""
        return min(self.max_length, max(len(ex.ids) for ex in self.train + self.val) + 1)

    def flat(self, split: str) -> "np.ndarray":
        """A split's ids end to end (what data/train.bin and data/val.bin hold)."""
        import numpy as np

        from gptcli.training.data import id_dtype

        examples = self.train if split == "train" else self.val
        ids = [i for ex in examples for i in ex.ids]
        return np.asarray(ids, dtype=id_dtype(PAD_ID + 1))

    def save(self, folder: Path) -> None:
        """``folder/instruct.json``: each example's length and prompt length (the ids are in train.bin and
        val.bin), and the test entries."""
        from gptcli.files import atomic_write

        doc = {"format": 1, "template": ALPACA, "max_length": self.max_length, "mask_prompt": self.mask_prompt,
               **{split: {"lengths": [len(ex.ids) for ex in examples],
                          "prompt_lengths": [ex.prompt_len for ex in examples]}
                  for split, examples in (("train", self.train), ("val", self.val))},
               "test": [e.to_dict() for e in self.test]}
        text = json.dumps(doc, ensure_ascii=False)
        atomic_write(folder / SPLITS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load(folder: Path, train_ids: "np.ndarray", val_ids: "np.ndarray") -> InstructData:
    """The splits a run stored in ``folder`` (its data/), to resume it."""
    try:
        doc = json.loads((folder / SPLITS_FILE).read_text(encoding="utf-8"))
        splits = {}
        for split, ids in (("train", train_ids), ("val", val_ids)):
            lengths, prompts = doc[split]["lengths"], doc[split]["prompt_lengths"]
            if sum(lengths) != len(ids) or len(lengths) != len(prompts):
                raise ValueError(f"{split} lengths do not match {split}.bin")
            out, start = [], 0
            for n, p in zip(lengths, prompts):
                out.append(Example(tuple(int(i) for i in ids[start:start + n]), int(p)))
                start += n
            splits[split] = out
        test = [Entry(**e) for e in doc.get("test", [])]
        return InstructData(splits["train"], splits["val"], test, max_length=int(doc["max_length"]),
                            mask_prompt=bool(doc["mask_prompt"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder}: the instruction data of this run ({SPLITS_FILE}) is missing or damaged "
                        f"({exc}); the run cannot continue") from None


def prepare(entries: Sequence[Entry], tokenizer: "Tokenizer", *, max_length: int, mask_prompt: bool,
            note: Callable[[str], None] = lambda _: None) -> InstructData:
    """Split, tokenize and check the entries of a new run; notes say what ``max_length`` cut."""
    train_entries, val_entries, test = split_entries(entries)
    train, val = encode_examples(train_entries, tokenizer), encode_examples(val_entries, tokenizer)
    truncated = sum(len(ex.ids) > max_length for ex in train + val)
    if truncated:
        longest = max(len(ex.ids) for ex in train + val)
        total = len(train) + len(val)
        note(f"{truncated} of {total} training and validation example{'s' * (total != 1)} "
             f"{'is' if truncated == 1 else 'are'} longer than --max-length {max_length} tokens (the longest: "
             f"{longest}); {'its end is' if truncated == 1 else 'their ends are'} cut off")
    dropped = 0
    if mask_prompt:
        # Every target of such an example is masked: it has nothing to learn from and would make a
        # batch of only masked targets (a NaN loss).
        keep_train = [ex for ex in train if ex.prompt_len <= max_length]
        keep_val = [ex for ex in val if ex.prompt_len <= max_length]
        dropped = len(train) - len(keep_train) + len(val) - len(keep_val)
        if dropped:
            note(f"{dropped} example{'s' * (dropped != 1)} left out: with --mask-prompt "
                 f"{'its' if dropped == 1 else 'their'} prompt alone fills --max-length {max_length}, so no "
                 "response token is left to learn from")
        train, val = keep_train, keep_val
    return InstructData(train, val, test, max_length=max_length, mask_prompt=mask_prompt, truncated=truncated,
                        dropped=dropped)
