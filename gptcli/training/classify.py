"""``gptcli train DATA --task classify``: chapter 6 of the book. Never prints.

The data is a TSV or CSV of texts and labels (``gptcli.classify.read_labelled``); the labels are the
sorted set of those in it. The rows are optionally balanced (every label undersampled to the rarest
label's count, as the book's ``create_balanced_dataset``), shuffled and split as the book's
``random_split`` does (``numpy.random.RandomState(seed).permutation``: what pandas'
``df.sample(frac=1, random_state=seed)`` draws), and kept in the run folder as ``data/train.tsv``,
``val.tsv`` and ``test.tsv``. Texts are cut to and padded (with <|endoftext|>) to the longest training
text, at most the context, as the book's ``SpamDataset``.

``ClassifyTrainer`` is the LM trainer with the book's ``train_classifier_simple`` inside: the
cross-entropy of the head's logits at the last token, evaluations with accuracy beside the loss, the
book's accuracy line after each epoch, and the accuracy on every whole split after the last step.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from gptcli.adapters import CLASSIFIER_KEY, ClassifierInfo, base_record, save_adapters, save_classifier
from gptcli.classify import Labelled, classifier_logits, encode_texts, make_classifier, pad_batch, read_labelled
from gptcli.errors import UserError
from gptcli.training import run_folder
from gptcli.training.data import WindowBatches, window_loader
from gptcli.training.loop import Trainer, autocast
from gptcli.training.lora import apply_lora, check_lora, trainable_for
from gptcli.training.settings import TrainSettings, load_recipe
from gptcli.training.setup import (
    Note,
    Run,
    RunRequest,
    _fine_tuned,
    _ignore,
    _new_config,
    _settings,
    check_dtype,
    check_folder_room,
    check_memory,
    choose_init,
    new_model,
    open_new_run,
    open_resumed,
    resolve_dtype,
    resumed_model,
    resumed_base,
    set_dropout,
)

if TYPE_CHECKING:
    import torch

    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer

SPLITS = ("train", "val", "test")
# The SMS Spam Collection as the book reads it with pandas: 4,825 ham and 747 spam messages.
BOOK_SPAM_COUNTS = {"ham": 4825, "spam": 747}


# --------------------------------------------------------------------------------------------
# Rows: balance, shuffle, split, keep


def balance_rows(rows: Labelled, seed: int) -> Labelled:
    """The book's create_balanced_dataset, for any number of labels: each label with more rows than the
    rarest is undersampled to that count (``RandomState(seed).permutation(n)[:count]``, what pandas'
    ``sample(count, random_state=seed)`` draws), those first in label order, then the rarest label's
    rows as they are (the book: the sampled ham, then every spam)."""
    import numpy as np

    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(rows.labels):
        by_label.setdefault(label, []).append(i)
    rarest = min(sorted(by_label), key=lambda k: len(by_label[k]))
    count = len(by_label[rarest])
    order: list[int] = []
    for label in sorted(by_label):
        if label != rarest:
            picked = np.random.RandomState(seed).permutation(len(by_label[label]))[:count]
            order += [by_label[label][int(j)] for j in picked]
    return rows.subset(order + by_label[rarest])


def split_rows(rows: Labelled, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Labelled]:
    """The book's random_split: shuffle (``RandomState(seed).permutation``, as pandas' ``df.sample(frac=1,
    random_state=seed)``), then the first int(n * train) rows train, the next int(n * val) validate,
    the rest test."""
    import numpy as np

    n = len(rows)
    shuffled = rows.subset([int(i) for i in np.random.RandomState(seed).permutation(n)])
    train_end = int(n * round(1 - val_fraction - test_fraction, 12))
    val_end = train_end + int(n * val_fraction)
    if test_fraction == 0:
        val_end = n  # no test split: what is not trained on validates
    return {"train": shuffled.subset(range(train_end)), "val": shuffled.subset(range(train_end, val_end)),
            "test": shuffled.subset(range(val_end, n))}


def write_splits(folder: Path, splits: dict[str, Labelled]) -> None:
    """``folder/{train,val,test}.tsv``: a header, then label<TAB>text (quoted where a text needs it)."""
    from gptcli.files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
        writer.writerow(["label", "text"])
        writer.writerows(zip(rows.labels, rows.texts))
        atomic_write(folder / f"{name}.tsv", lambda tmp, text=buffer.getvalue(): tmp.write_text(text, encoding="utf-8"))


def read_splits(folder: Path) -> dict[str, Labelled]:
    out = {}
    for name in SPLITS:
        path = folder / f"{name}.tsv"
        if not path.is_file():
            raise UserError(f"{folder.parent}: its data/{name}.tsv is missing; the run cannot continue")
        lines = path.read_text(encoding="utf-8").splitlines()
        out[name] = read_labelled(path, "text", "label") if len(lines) > 1 else Labelled(str(path))
    return out


def rows_digest(rows: Labelled) -> str:
    h = hashlib.sha256()
    for text, label in zip(rows.texts, rows.labels):
        h.update(label.encode("utf-8") + b"\x00" + text.encode("utf-8") + b"\x00")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Token ids and batches


@dataclass
class ClassifyData:
    """The splits as padded ids: ``tensors[split]`` is (ids (N, max_length), labels (N,), lengths (N,))."""

    info: ClassifierInfo
    splits: dict[str, Labelled]
    tensors: dict[str, tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]]
    truncated: dict[str, int]  # rows cut to max_length, per split

    @property
    def rows(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.splits.items()}


def build_data(splits: dict[str, Labelled], labels: list[str], tok: "Tokenizer", context_length: int,
               label_token: str, max_length: int | None = None) -> ClassifyData:
    """Tokenize each split; ``max_length``: the longest training text (the book's), at most the context."""
    import torch

    ids = {name: encode_texts(rows.texts, tok) for name, rows in splits.items()}
    if max_length is None:
        max_length = min(max(len(r) for r in ids["train"]), context_length)
    index = {label: i for i, label in enumerate(labels)}
    tensors, truncated = {}, {}
    for name, rows in splits.items():
        unknown = sorted(set(rows.labels) - set(index))
        if unknown:
            raise UserError(f"the {name} rows have labels the training rows do not: {', '.join(map(repr, unknown))}")
        truncated[name] = sum(len(r) > max_length for r in ids[name])
        if ids[name]:
            x, lengths = pad_batch(ids[name], max_length, tok.eot_id, "last")  # one width for every batch
        else:
            x, lengths = torch.zeros(0, max_length, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        tensors[name] = (x, torch.tensor([index[k] for k in rows.labels], dtype=torch.long), lengths)
    return ClassifyData(ClassifierInfo(list(labels), max_length, label_token), splits, tensors, truncated)


class RowsDataset:
    """Padded rows: item i is (ids (L,), label, length), as the book's SpamDataset gives (ids, label)."""

    def __init__(self, tensors: tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[1])

    def __getitem__(self, i: int):
        return tuple(t[i] for t in self.tensors)


class ClassBatches(WindowBatches):
    """The book's loaders over labelled rows: training batches shuffled each epoch (drop_last), the
    evaluations' training batches shuffled afresh and the validation ones in order, exactly as
    ``WindowBatches`` does with windows (so a resumed run continues bit for bit)."""

    def __init__(self, data: ClassifyData, batch_size: int, grad_accum: int, generator: "torch.Generator", *,
                 rank: int = 0, world: int = 1):
        train, val = RowsDataset(data.tensors["train"]), RowsDataset(data.tensors["val"])
        self.train_loader = window_loader(train, batch_size, shuffle=True, drop_last=True, rank=rank, world=world)
        rows = batch_size * grad_accum
        self.eval_loaders = {"train": window_loader(train, rows, shuffle=True, drop_last=True),
                             "val": window_loader(val, rows, shuffle=False, drop_last=False)}
        self.per_epoch = (len(train) // batch_size) // grad_accum * grad_accum
        self.generator = generator
        self.batch_in_epoch = 0
        self.epoch_rng = None
        self._batches = None


# --------------------------------------------------------------------------------------------
# The trainer


class ClassifyTrainer(Trainer):
    """The LM trainer's loop (steps, evaluations, checkpoints, Ctrl-C, resume) around the book's
    classification step."""

    @property
    def data(self) -> ClassifyData:
        return self.run.task_data

    def plan_steps(self) -> tuple[int, int | None]:
        return plan_classify_steps(self.settings, self.data.rows["train"])

    def make_batches(self) -> ClassBatches:
        import torch

        s = self.settings
        return ClassBatches(self.data, s.batch_size, s.grad_accum, torch.Generator().manual_seed(s.seed),
                            rank=self.run.dist.rank, world=self.run.dist.world)

    def tokens_per_row(self) -> int:
        return self.data.info.max_length

    def logits(self, model, x: "torch.Tensor", lengths: "torch.Tensor") -> "torch.Tensor":
        import torch

        from gptcli.kernels.train import attention_for

        attention = attention_for(self.plan) if torch.is_grad_enabled() else None
        with autocast(self.run.device, self.settings.dtype):
            return classifier_logits(model, x.to(self.run.device), lengths, self.data.info.label_token,
                                     attention=attention, head=self.model.out_head).float()

    def loss(self, model, x: "torch.Tensor", y: "torch.Tensor", lengths: "torch.Tensor") -> "torch.Tensor":
        """The book's calc_loss_batch: cross-entropy of the last token's logits against the labels."""
        import torch.nn.functional as F

        return F.cross_entropy(self.logits(model, x, lengths), y.to(self.run.device))

    def _measure(self, batches, want_loss: bool = True) -> tuple[float | None, float]:
        """(mean loss over the batches, accuracy over their rows), no gradients."""
        import torch.nn.functional as F

        losses, correct, rows = [], 0, 0
        for x, y, lengths in batches:
            logits = self.logits(self.model, x, lengths)
            y = y.to(logits.device)
            if want_loss:
                losses.append(F.cross_entropy(logits, y).item())
            correct += int((logits.argmax(dim=-1) == y).sum())
            rows += len(y)
        return (sum(losses) / len(losses) if losses else None), (correct / rows if rows else 0.0)

    def evaluate(self) -> dict[str, float]:
        """The book's evaluate_model over ``eval_batches`` batches of each split, with the accuracy of
        the same batches beside each loss."""
        import torch

        self.model.eval()
        out: dict[str, float] = {}
        with torch.no_grad():
            for split in ("train", "val"):
                loss, acc = self._measure(self.batches.evaluation(split, self.settings.eval_batches))
                out[f"{split}_loss"], out[f"{split}_acc"] = loss, acc
        self.model.train()
        return out

    def epoch_end_events(self, step: int, epoch: int) -> Iterator[dict]:
        """The book's accuracy after each epoch: calc_accuracy_loader over ``eval_batches`` batches."""
        import torch

        self.model.eval()
        with torch.no_grad():
            accs = {f"{split}_acc": self._measure(self.batches.evaluation(split, self.settings.eval_batches),
                                                  want_loss=False)[1] for split in ("train", "val")}
        self.model.train()
        yield {"event": "accuracy", "step": step, "epoch": epoch, **accs}

    def end_metrics(self) -> dict:
        """Accuracy on every row of each split, in order (the book's final figures)."""
        import torch

        size = self.settings.batch_size * self.settings.grad_accum
        self.model.eval()
        out: dict[str, float | None] = {}
        with torch.no_grad():
            for split in SPLITS:
                x, y, lengths = self.data.tensors[split]
                batches = ((x[i:i + size], y[i:i + size], lengths[i:i + size]) for i in range(0, len(y), size))
                out[split] = self._measure(batches, want_loss=False)[1] if len(y) else None
        self.model.train()
        return {"accuracy": out}

    def state_extra(self) -> dict[str, str]:
        return {**super().state_extra(), CLASSIFIER_KEY: self.data.info.to_json()}

    def save_weights(self, folder: Path, metadata: dict[str, str] | None = None) -> None:
        from gptcli.run_layout import ADAPTERS_FILE, CLASSIFIER_FILE

        folder.mkdir(parents=True, exist_ok=True)
        if self.settings.lora:
            save_adapters(self.model, folder / ADAPTERS_FILE, self.run.tokenizer, rank=self.settings.lora,
                          alpha=self.settings.lora_alpha, base=self.run.base, classifier=self.data.info,
                          metadata=metadata)
        else:
            save_classifier(self.model, folder / CLASSIFIER_FILE, self.run.tokenizer, self.data.info, metadata)

    def _save_best(self, step: int, val_loss: float) -> None:
        self.position.best_val = val_loss  # no best/: the book keeps the last weights

    def start_event(self) -> dict:
        data = self.data
        return {**super().start_event(), "train_tokens": data.rows["train"] * data.info.max_length,
                "val_tokens": data.rows["val"] * data.info.max_length, "labels": data.info.labels,
                "rows": data.rows, "max_length": data.info.max_length, "truncated": data.truncated,
                "label_token": data.info.label_token,
                "trainable": "lora" if self.settings.lora else self.settings.trainable or "last-block"}


def plan_classify_steps(s: TrainSettings, n_train: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch): the book's epochs over drop_last batches."""
    per_epoch = (n_train // s.batch_size) // s.grad_accum
    if per_epoch == 0:
        raise UserError(f"{n_train} training row(s), fewer than one step (batch size {s.batch_size} x "
                        f"{s.grad_accum} accumulation); use more rows or a smaller --batch-size")
    totals = [t for t in (s.epochs * per_epoch if s.epochs else None, s.max_steps) if t is not None]
    return min(totals), per_epoch


# --------------------------------------------------------------------------------------------
# New and resumed runs


def _read_rows(request: RunRequest, recipe, settings: TrainSettings, note: Note) -> tuple[Labelled, str]:
    """The labelled rows (DATA, or the recipe's download) and the name of where they came from."""
    data = request.data
    if not data and recipe is not None and recipe.data is not None:
        from gptcli.training.downloads import fetch

        data = (str(fetch(recipe.data, note=note)),)
    if not data:
        raise UserError("no training data: pass a TSV or CSV of texts and labels (--recipe book-ch06 alone "
                        "downloads the SMS Spam Collection)")
    if len(data) != 1:
        raise UserError(f"--task classify reads one labelled file, got {len(data)}")
    rows = read_labelled(data[0], settings.text_column, settings.label_column)
    labels = sorted(set(rows.labels))
    if len(labels) < 2:
        raise UserError(f"{rows.name}: every row has the label {labels[0]!r}; a classifier needs at least two labels")
    if recipe is not None and recipe.data == "sms-spam":
        counts = {k: rows.labels.count(k) for k in labels}
        if counts != BOOK_SPAM_COUNTS:
            note(f"{rows.name}: {counts} rows, not the book's {BOOK_SPAM_COUNTS}; the figures will differ from "
                 "the book's")
    return rows, data[0]


def _base_model(request: RunRequest, recipe, settings: TrainSettings, tok: "Tokenizer",
                note: Note) -> tuple["GPTModel", str, bool]:
    """The model to put a head on (CPU, float32), where it came from, and whether it is existing weights
    (``--weights``, random included: what LoRA can adapt). ``--weights random`` takes the architecture
    flags, as a new model does."""
    from gptcli.weights import random_model

    weights = request.weights or (recipe.weights if recipe else None)
    if weights is not None and weights.strip().lower() != "random":
        if set(request.arch) - {"drop_rate"}:
            raise UserError("--weights fine-tunes a model as it is; architecture changes (--context-length, "
                            "--n-layers, --n-heads, --emb-dim) need --weights random or a new model")
        model, _, source = _fine_tuned(request, weights, settings, tok, note)
        drop = (recipe.model if recipe else {}).get("drop_rate")
        if drop is not None and "drop_rate" not in request.arch:
            set_dropout(model, drop)  # the book fine-tunes GPT-2 with drop_rate 0.0
        return model, source, True
    cfg = _new_config(request, recipe, settings, tok, note)
    if weights is not None:
        return random_model(cfg, settings.seed), f"random (seed {settings.seed})", True
    import torch

    settings.init = choose_init(settings.init, cfg)
    return new_model(cfg, settings, torch.device("cpu")), f"random ({settings.init} init, seed {settings.seed})", False


def new_classify_run(request: RunRequest, *, note: Note = _ignore) -> Run:
    """A new classification run: the rows read, balanced and split, the model with its new head and
    the weights that train, the splits kept in the run folder."""
    import numpy as np
    import torch

    from gptcli.devices import configure_threads
    from gptcli.tokenizer import gpt2

    configure_threads(request.threads)  # first: the automatic count measures the load since startup
    recipe = load_recipe(request.recipe) if request.recipe else None
    settings = _settings(request, dict(recipe.settings) if recipe else {})

    if settings.tokenizer != "gpt2":
        raise UserError("--task classify uses GPT-2's BPE (texts are padded with <|endoftext|>); leave out "
                        "--tokenizer char")
    settings.sample_prompt = None  # a classifier writes no text
    rows, first = _read_rows(request, recipe, settings, note)
    out, device, dist, say, replace = open_new_run(request, recipe, first, settings, note)
    labels = sorted(set(rows.labels))
    digest = rows_digest(rows)
    if settings.balance:
        rows = balance_rows(rows, settings.seed)
    splits = split_rows(rows, settings.val_fraction, settings.test_fraction, settings.seed)
    if not len(splits["val"]):
        raise UserError(f"{len(rows)} rows leave none to validate; use more rows or a larger --val-fraction")
    check_dtype(settings.dtype, device)
    tok = gpt2()
    tok.encode("")  # a missing tokenizer fails before anything is built
    model, source, has_base = _base_model(request, recipe, settings, tok, say)
    check_lora(settings, model.cfg, has_base)
    data = build_data(splits, labels, tok, model.cfg.context_length, settings.label_token)
    plan_classify_steps(settings, len(splits["train"]))
    why = resolve_dtype(settings, model.cfg.replace(context_length=data.info.max_length), device, dist)
    if why:
        say(why)
    check_memory(model.cfg.replace(context_length=data.info.max_length), settings, device, dist)
    check_folder_room(out, model.cfg, 0, tok.vocab_size)
    if dist.main:
        if replace:
            run_folder.clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_splits(out / run_folder.DATA_DIR, splits)
    base = base_record(source, model.cfg, settings.seed) if settings.lora else None
    torch.manual_seed(settings.seed)  # the book seeds, then draws the new head
    make_classifier(model, len(labels))
    if settings.lora:
        apply_lora(model, settings)
    else:
        trainable_for(model, settings)
    torch.manual_seed(settings.seed)  # and seeds again before training
    model = model.to(device).train()
    empty = np.zeros(0, dtype=np.uint16)
    return Run(out=out, settings=settings, model=model, tokenizer=tok, train_ids=empty, val_ids=empty, device=device,
               weights_source=source, data_digest=digest, dist=dist, base=base, task_data=data)


def resume_classify_run(request: RunRequest, *, note: Note = _ignore) -> Run:
    """A classification run from its folder: its state, its kept splits, its labels and padding."""
    import numpy as np

    from gptcli.devices import check_device_name

    folder, state = open_resumed(request, note)
    settings, tok = state.settings, state.tokenizer
    if request.data:
        raise UserError(f"--resume {folder}: a classification run keeps its rows in data/; resume without DATA")
    try:
        info = ClassifierInfo.from_json(state.extra[CLASSIFIER_KEY])
    except (KeyError, ValueError) as exc:
        raise UserError(f"{folder}: corrupt training state (classifier metadata: {exc})") from None
    data = build_data(read_splits(folder / run_folder.DATA_DIR), info.labels, tok, state.cfg.context_length,
                      info.label_token, max_length=info.max_length)
    for key in ("epochs", "max_steps", "decay_steps"):
        if key in request.settings:
            setattr(settings, key, request.settings[key])
    settings.device = check_device_name(request.device) if request.device != "auto" else settings.device
    settings.validate()
    run_folder.check_writable(folder, resume=True)
    model, device, dist = resumed_model(folder, state, settings)
    empty = np.zeros(0, dtype=np.uint16)
    return Run(out=folder, settings=settings, model=model, tokenizer=tok, train_ids=empty, val_ids=empty,
               device=device, weights_source=state.weights_source, data_digest=state.data_digest, dist=dist,
               resume_state=state, base=resumed_base(state), task_data=data)
