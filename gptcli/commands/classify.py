"""`gptcli classify`: the label of each text under a classifier `gptcli train --task classify` made, or
its accuracy on a labelled file. Parsing and rendering only: ``gptcli.classify`` does the work."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from gptcli.commands.common import DeviceOption, escape_line, note, print_json, print_table, read_stdin, \
    split_lines, user_errors
from gptcli.errors import UserError


@user_errors
def classify(
    text: Annotated[Optional[str], typer.Argument(metavar="TEXT | -", show_default=False, help="The text to "
                    "classify; omitted or '-': stdin, one text per line.")] = None,
    weights: Annotated[str, typer.Option("--weights", "-w", metavar="RUN", help="The classifier: a run folder "
                       "of gptcli train --task classify (with or without --lora), or its weights file.")] = "",
    evaluate: Annotated[Optional[str], typer.Option("--eval", metavar="FILE", show_default=False, help="Instead "
                        "of classifying: the accuracy, per label and overall, on a labelled TSV/CSV (as train "
                        "reads it; a run's data/test.tsv works).")] = None,
    text_column: Annotated[Optional[str], typer.Option("--text-column", metavar="NAME|N", show_default=False,
                           help="--eval: the column of the texts.")] = None,
    label_column: Annotated[Optional[str], typer.Option("--label-column", metavar="NAME|N", show_default=False,
                            help="--eval: the column of the labels.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", metavar="N", min=1, help="Texts per forward "
                          "pass.")] = 8,
    device: DeviceOption = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per text (JSON Lines): text, label, "
                           "probability, probabilities (every label's), tokens, truncated; with --eval one object "
                           "with the accuracies.")] = False,
) -> None:
    """Classify texts with a classifier trained by gptcli train --task classify (the book's chapter 6).

    Prints, for each text, the label and its probability (the softmax of the head's logits), then the
    text: label<TAB>probability<TAB>text, one line per input line (a newline or tab inside a text is
    written \\n, \\t). A text longer than the training's longest is cut as in training, with a note.

    Examples:

    \b
      gptcli train --recipe book-ch06 --out runs/spam
      gptcli classify --weights runs/spam "You are a winner! Call now to claim your prize"
      cut -f2 messages.tsv | gptcli classify --weights runs/spam --json | jq -r .label
      gptcli classify --weights runs/spam --eval runs/spam/data/test.tsv
    """
    from gptcli import classify as lib

    if not weights:
        raise UserError("--weights RUN is required: the folder of a gptcli train --task classify run")
    if evaluate is not None and text is not None:
        raise UserError("--eval FILE measures a labelled file; give no TEXT with it")
    if evaluate is None and (text_column or label_column):
        raise UserError("--text-column and --label-column are for --eval FILE")
    if evaluate is not None:
        rows = lib.read_labelled(evaluate, text_column, label_column)
        clf = lib.load_classifier(weights, device, note=note)
        _render_eval(lib.evaluate_rows(clf, rows, batch_size), clf.info.labels, json_output)
        return
    if text is None or text == "-":
        if sys.stdin is not None and sys.stdin.isatty():
            raise UserError("no text: give one as an argument, or pipe texts in, one per line")
        texts = split_lines(read_stdin(strip_newline=False))
        if not texts:
            raise UserError("no text on stdin: pipe texts in, one per line")
    else:
        texts = [text]
    clf = lib.load_classifier(weights, device, note=note)
    predictions = lib.classify_texts(clf, texts, batch_size)
    cut = sum(p.truncated for p in predictions)
    if cut:
        note(f"{cut} text{'s' * (cut != 1)} longer than {clf.info.max_length} tokens (the longest training text) "
             "cut to that length, as in training")
    for p in predictions:
        if json_output:
            line = json.dumps({"text": p.text, "label": p.label, "probability": p.probability,
                               "probabilities": p.probabilities, "tokens": p.tokens, "truncated": p.truncated},
                              ensure_ascii=False)
        else:
            line = f"{p.label}\t{p.probability:.4f}\t{escape_line(p.text).replace(chr(9), chr(92) + 't')}"
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _render_eval(result: dict, labels: list[str], json_output: bool) -> None:
    if json_output:
        print_json(result)
        return
    rows = [[e["label"], str(e["rows"]), str(e["correct"]), f"{e['accuracy'] * 100:.2f}%"] for e in result["labels"]]
    rows.append(["overall", str(result["rows"]), str(result["correct"]), f"{result['accuracy'] * 100:.2f}%"])
    print_table(f"{result['file']}: accuracy (labels {', '.join(labels)})", ["label", "rows", "correct", "accuracy"],
                rows, right_align=(1, 2, 3), footer_rows=1)
    if result["unknown_labels"]:
        note(f"labels the classifier does not know (always wrong): {', '.join(result['unknown_labels'])}")
