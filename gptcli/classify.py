"""Text classification as chapter 6 of the book does it: GPT-2 with its output head replaced by a
Linear(emb_dim, number of labels), deciding from the last token. Never prints.

- ``read_labelled``: a TSV or CSV of text and label (header row optional) into rows, checked.
- ``make_classifier`` / ``set_trainable``: the new head, and which weights train (the book: the last
  block, the final LayerNorm and the head).
- ``pad_batch`` and ``classifier_logits``: texts cut to ``max_length`` tokens and padded with
  <|endoftext|> (50256), as the book's SpamDataset; the logits of the last position (the book's,
  padding included) or of each text's last real token (``label_token: last-real``).
- ``load_classifier``, ``classify_texts``, ``evaluate_rows``: what ``gptcli classify`` runs.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from gptcli.adapters import ClassifierInfo
from gptcli.errors import UserError

if TYPE_CHECKING:
    import torch

    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer

Note = Callable[[str], None]
TRAINABLE = ("last-block", "all", "head")  # the book's choice first
LABEL_TOKENS = ("last", "last-real")
# Header names recognised without --text-column/--label-column (the book's CSVs say "Label,Text").
TEXT_NAMES = ("text", "sms", "message", "sentence", "review")
LABEL_NAMES = ("label", "labels", "class", "category", "target")


def _ignore(_message: str) -> None:
    pass


@dataclass
class Labelled:
    """The rows of a labelled file: texts, their labels, and each row's line number in the file."""

    name: str
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int]) -> "Labelled":
        return Labelled(self.name, [self.texts[i] for i in index], [self.labels[i] for i in index],
                        [self.lines[i] for i in index])


def _delimiter(path: Path, first_line: str) -> str:
    if path.suffix.lower() == ".csv":
        return ","
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    return "\t" if "\t" in first_line else ","


def _column(spec: str, header: list[str] | None, name: str, flag: str) -> int:
    """A column given by name (with a header row) or by number (1 = the first, as cut counts)."""
    if spec.isdigit():
        index = int(spec) - 1
        if index < 0 or (header is not None and index >= len(header)):
            raise UserError(f"{name}: {flag} {spec}: no such column")
        return index
    if header is None:
        raise UserError(f"{name}: {flag} {spec!r} names a column, but the file has no header row")
    lowered = [h.strip().lower() for h in header]
    if spec.strip().lower() not in lowered:
        raise UserError(f"{name}: no column {spec!r} ({flag}); the columns are {', '.join(map(repr, header))}")
    return lowered.index(spec.strip().lower())


def _columns(rows: list[list[str]], name: str, text_column: str | None,
             label_column: str | None) -> tuple[int, int, bool]:
    """(text index, label index, has a header row); UserError when they are the same column."""
    text, label, header = _find_columns(rows, name, text_column, label_column)
    if text == label:
        raise UserError(f"{name}: the text and the label are the same column ({text + 1}); give "
                        "--text-column and --label-column different columns")
    return text, label, header


def _find_columns(rows: list[list[str]], name: str, text_column: str | None,
                  label_column: str | None) -> tuple[int, int, bool]:
    first = [c.strip().lower() for c in rows[0]]
    header = rows[0] if (any(c in TEXT_NAMES for c in first) and any(c in LABEL_NAMES for c in first)) or (
        (text_column and not text_column.isdigit()) or (label_column and not label_column.isdigit())) else None
    if header is not None:
        text = _column(text_column, header, name, "--text-column") if text_column else \
            next((i for i, c in enumerate(first) if c in TEXT_NAMES), None)
        label = _column(label_column, header, name, "--label-column") if label_column else \
            next((i for i, c in enumerate(first) if c in LABEL_NAMES), None)
        if text is None or label is None:
            raise UserError(f"{name}: say which columns hold the text and the label: --text-column and "
                            f"--label-column (the header is {', '.join(map(repr, header))})")
        return text, label, True
    if text_column or label_column:
        text = _column(text_column or "", None, name, "--text-column") if text_column else None
        label = _column(label_column or "", None, name, "--label-column") if label_column else None
        if text is None or label is None:
            width = max(len(r) for r in rows)
            if width != 2:
                raise UserError(f"{name}: give both --text-column and --label-column ({width} columns)")
            text = 1 - label if text is None else text
            label = 1 - text if label is None else label
        return text, label, False
    width = max(len(r) for r in rows)
    if width != 2:
        raise UserError(f"{name}: {width} columns and no header row naming 'text' and 'label'; say which with "
                        "--text-column N --label-column N")
    # Two columns without a header: the label is the one with fewer distinct values (the SMS Spam
    # Collection's label<TAB>text and the usual text,label both work).
    distinct = [len({r[i] for r in rows if len(r) > i}) for i in (0, 1)]
    label = 0 if distinct[0] <= distinct[1] else 1
    return 1 - label, label, False


def read_labelled(path: str | Path, text_column: str | None = None, label_column: str | None = None) -> Labelled:
    """The (text, label) rows of a TSV or CSV file (``-``: stdin); UserError for an empty file, a row
    without a label or text, or a column that is not there."""
    name = str(path)
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UserError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        content = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if not content.strip():
        raise UserError(f"{name}: the file is empty; expected lines of a text and its label (TSV or CSV)")
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(content.splitlines(keepends=True), delimiter=_delimiter(Path(name), content.split("\n", 1)[0]))
    rows, lines = [], []
    for row in reader:
        if row and any(c.strip() for c in row):
            rows.append(row)
            lines.append(reader.line_num)
    text_i, label_i, header = _columns(rows, name, text_column, label_column)
    out = Labelled(name)
    for row, line in zip(rows[1:] if header else rows, lines[1:] if header else lines):
        label = row[label_i].strip() if label_i < len(row) else ""
        text = row[text_i] if text_i < len(row) else ""
        if not label:
            raise UserError(f"{name}, line {line}: no label (expected a text and a label on each line)")
        if not text.strip():
            raise UserError(f"{name}, line {line}: no text (label {label!r})")
        out.texts.append(text)
        out.labels.append(label)
        out.lines.append(line)
    if not out.texts:
        raise UserError(f"{name}: a header row and no data")
    return out


# --------------------------------------------------------------------------------------------
# The model


def make_classifier(model: "GPTModel", num_labels: int) -> "GPTModel":
    """The book's listing 6.x: the output head becomes Linear(emb_dim, num_labels) (drawn from torch's
    global RNG, as the book's); the head no longer shares the token embedding."""
    import dataclasses

    import torch

    device = model.tok_emb.weight.device
    with torch.device(device):
        model.out_head = torch.nn.Linear(model.cfg.emb_dim, num_labels).to(model.tok_emb.weight.dtype)
    model.cfg = dataclasses.replace(model.cfg, tie_weights=False)
    return model


def set_trainable(model: "GPTModel", which: str) -> None:
    """Freeze every weight, then train ``which``: the book's last-block (the last transformer block, the
    final LayerNorm and the head), all, or head."""
    for p in model.parameters():
        p.requires_grad_(which == "all")
    parts = [model.out_head]
    if which == "last-block":
        parts += [model.trf_blocks[-1], model.final_norm]
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(True)


def encode_texts(texts: Sequence[str], tokenizer: "Tokenizer") -> list[list[int]]:
    """Token ids of each text (<|endoftext|> typed in a text is ordinary text, as in every command)."""
    return [list(ids) for ids in tokenizer.encode_batch(list(texts), allow_eot=False)] \
        if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(t) for t in texts]


def pad_batch(rows: Sequence[Sequence[int]], max_length: int, pad_id: int,
              label_token: str = "last") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ids (B, L), lengths (B,)): each row cut to ``max_length`` and padded with ``pad_id`` to
    ``max_length`` (the book: every text as long as the longest training text), or to the longest
    row here for ``last-real`` (padding after the last real token changes nothing it sees)."""
    import torch

    cut = [list(r[:max_length]) for r in rows]
    width = max_length if label_token == "last" else max(len(r) for r in cut)
    ids = torch.full((len(cut), width), pad_id, dtype=torch.long)
    for i, r in enumerate(cut):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in cut], dtype=torch.long)


def classifier_logits(model, x: "torch.Tensor", lengths: "torch.Tensor", label_token: str = "last", *,
                      attention=None, head: "torch.nn.Module | None" = None) -> "torch.Tensor":
    """(B, num_labels): the head on the last position (the book's ``model(x)[:, -1, :]``) or on each
    row's last real token. ``model`` may be wrapped (DDP, compiled); ``head`` is then its out_head."""
    import torch

    hidden = model(x, head=False, attention=attention)  # (B, T, emb_dim), final-normed
    if label_token == "last":
        picked = hidden[:, -1]  # (B, emb_dim)
    else:
        picked = hidden[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]
    return (head or model.out_head)(picked)  # (B, num_labels)


@dataclass
class Classifier:
    model: "GPTModel"
    info: ClassifierInfo
    tokenizer: "Tokenizer"
    source: str
    device: "torch.device"


def _from_file(found, device: "torch.device", note: Note) -> "GPTModel":
    """The model of a classifier file, or of a LoRA classifier's adapters on their base (merged)."""
    import torch

    from gptcli.model.gpt import build_model
    from gptcli.model.lora import merge_lora

    labels = len(found.classifier.labels)
    if found.kind == "classifier":
        model = build_model(found.cfg, "meta")
        with torch.device("meta"):
            model.out_head = torch.nn.Linear(found.cfg.emb_dim, labels)
        try:
            model.load_state_dict(found.tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise UserError(f"{found.path}: the classifier does not fit its config: {str(exc).splitlines()[0]}") \
                from None
        return model.to(device)
    from gptcli.adapters import attach_adapters
    from gptcli.weights import load_base

    model = make_classifier(load_base(found.base or {}, note), labels)
    attach_adapters(model, found)
    return merge_lora(model).to(device)


def load_classifier(spec: str, device: str = "auto", note: Note = _ignore) -> Classifier:
    """A classifier trained by ``gptcli train --task classify`` (a run folder or its weights file),
    float32, in eval mode."""
    from gptcli.adapters import file_kind, read_weights_file
    from gptcli.checkpoint import read_header
    from gptcli.devices import resolve_device
    from gptcli.weights import locate

    located = locate(spec, note)
    header = read_header(located.path)
    if file_kind(header.metadata) is None or "gptcli.classifier" not in header.metadata:
        raise UserError(f"{spec}: not a classifier (a language model's weights); train one with gptcli train "
                        "DATA.tsv --task classify")
    found = read_weights_file(header.path)
    torch_device = resolve_device(device)
    from gptcli.kernels.onednn import use_for_inference

    model = use_for_inference(_from_file(found, torch_device, note)).eval()
    return Classifier(model=model, info=found.classifier, tokenizer=found.tokenizer, source=located.source,
                      device=torch_device)


@dataclass
class Prediction:
    text: str
    label: str
    probability: float
    probabilities: dict[str, float]
    tokens: int  # the text's tokens, before any cut
    truncated: bool  # longer than the classifier's max_length: its end was cut off


def classify_texts(clf: Classifier, texts: Sequence[str], batch_size: int = 8) -> list[Prediction]:
    """Each text's label, its probability (softmax of the head's logits) and every label's, in order."""
    import torch

    info, pad_id = clf.info, clf.tokenizer.eot_id
    ids = encode_texts(texts, clf.tokenizer)
    out: list[Prediction] = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            empty = [i for i, r in enumerate(rows) if not r]
            rows = [r or [pad_id] for r in rows]  # an empty text classifies as padding alone
            x, lengths = pad_batch(rows, info.max_length, pad_id, info.label_token)
            probs = torch.softmax(classifier_logits(clf.model, x.to(clf.device), lengths, info.label_token).float(),
                                  dim=-1).cpu()
            for i, p in enumerate(probs):
                best = int(p.argmax())
                n = 0 if i in empty else len(rows[i])
                out.append(Prediction(texts[start + i], info.labels[best], float(p[best]),
                                      {label: float(p[j]) for j, label in enumerate(info.labels)}, n,
                                      n > info.max_length))
    return out


def evaluate_rows(clf: Classifier, rows: Labelled, batch_size: int = 8) -> dict:
    """Accuracy overall and per true label on labelled rows; labels the classifier does not know count
    as wrong (and are listed)."""
    predictions = classify_texts(clf, rows.texts, batch_size)
    per: dict[str, dict] = {}
    for truth, pred in zip(rows.labels, predictions):
        entry = per.setdefault(truth, {"label": truth, "rows": 0, "correct": 0})
        entry["rows"] += 1
        entry["correct"] += int(pred.label == truth)
    for entry in per.values():
        entry["accuracy"] = entry["correct"] / entry["rows"]
    correct = sum(e["correct"] for e in per.values())
    return {"file": rows.name, "rows": len(rows), "correct": correct, "accuracy": correct / len(rows),
            "labels": [per[k] for k in sorted(per)], "unknown_labels": sorted(set(per) - set(clf.info.labels)),
            "truncated": sum(p.truncated for p in predictions)}
