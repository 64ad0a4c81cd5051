"""`gptcli score`: how well a model predicts a text. Parsing and rendering only; the maths is gptcli.scoring."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from gptcli.commands.common import (
    ConfigOption,
    DeviceOption,
    DtypeOption,
    SizeOption,
    NoTuneOption,
    ThreadsOption,
    WeightsOption,
    check_tokenizer_early,
    escape_line,
    load_for_command,
    note,
    parse_number,
    parse_seed,
    print_json,
    print_table,
    read_stdin,
    read_text_file,
    split_lines,
    stdout_is_terminal,
    usage_and_exit,
    user_errors,
)
from gptcli.devices import check_device_name, check_dtype_name
from gptcli.devices import dtype_name as name_of
from gptcli.errors import UserError
from gptcli.runtime import InferenceOptions

if TYPE_CHECKING:
    from gptcli.commands.score_tokens import TokenViews
    from gptcli.scoring import Score
    from gptcli.runtime import Runtime

EXIT_INTERRUPTED = 130
STDIN = "-"
NO_TEXT = "No text: name a FILE, or pipe one in, e.g.  gptcli score < story.txt"
COLUMNS = ["tokens", "bytes", "loss", "perplexity", "bits/byte"]


@user_errors
def score(
    ctx: typer.Context,
    files: Annotated[
        Optional[List[str]],
        typer.Argument(metavar="FILE", help="Texts to score, each on its own; '-' or none reads stdin.",
                       show_default=False),
    ] = None,
    size: SizeOption = None,
    config: ConfigOption = None,
    weights: WeightsOption = "auto",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    seed: Annotated[str, typer.Option("--seed", metavar="N", help="Seeds random weights.")] = "123",
    stride: Annotated[
        Optional[str],
        typer.Option("--stride", metavar="N", show_default=False,
                     help="Texts longer than the context are scored in windows of context_length tokens that move "
                     "by N (1 to context_length; default context_length / 2). N = context_length gives disjoint "
                     "windows, whose first tokens are not scored."),
    ] = None,
    bos: Annotated[
        bool, typer.Option("--bos", help="Prepend <|endoftext|> so that the first token is scored too (GPT-2 BPE "
                           "only). Without it scoring starts at the second token.")
    ] = False,
    each_line: Annotated[
        bool, typer.Option("--each-line", help="Score every stdin line on its own; one result per input line, in "
                           "order (JSON Lines with --json). An empty line scores zero tokens.")
    ] = False,
    batch_size: Annotated[
        str, typer.Option("--batch-size", "-b", metavar="N", help="Windows (or lines) run through the model at once.")
    ] = "8",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (JSON Lines with --each-line) instead of a table.")
    ] = False,
    threads: ThreadsOption = None,
    no_tune: NoTuneOption = False,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="List every token with its log-probability and the model's likeliest "
                           "token there (--json: a logprobs object in OpenAI's format per file).")
    ] = False,
    worst: Annotated[
        Optional[str], typer.Option("--worst", metavar="N", show_default=False,
                                    help="List the N least likely tokens, most surprising first, with what came "
                                    "before them.")
    ] = None,
    show: Annotated[
        bool, typer.Option("--show", help="On a terminal, print the text coloured by the probability of each token "
                           "(a legend goes to stderr). In a pipe, or with NO_COLOR, the output is unchanged.")
    ] = False,
) -> None:
    """Score texts with a model: loss (mean nats per token), perplexity and bits per byte.

    Each FILE is scored on its own, then all together (weighted by tokens). Bits per byte (total nats / ln 2 / UTF-8 bytes) compares models with different tokenizers. The model and its tokenizer load as in generate.

    Data goes to stdout (a table on a terminal, plain columns in a pipe, JSON with --json); notes, progress and errors go to stderr.

    Examples:

    \b
      gptcli score story.txt                           # perplexity under GPT-2 124M
      gptcli score --size xl --stride 256 story.txt    # more context per token, slower
      gptcli score --weights ./my-gpt2 --json story.txt | jq .total.perplexity
      gptcli score --each-line --json < lines.txt | jq -s -r 'sort_by(.loss) | reverse | .[] | "\\(.loss)\\t\\(.text)"'
      gptcli score --worst 10 story.txt                 # the 10 most surprising tokens
      gptcli score --show story.txt                     # the text coloured by probability
      gptcli score --tokens --json story.txt | jq '.results[0].logprobs.token_logprobs'
    """
    seed_value = parse_seed(seed)
    stride_value = None if stride is None else int(parse_number("--stride", stride, int))
    if stride_value is not None and stride_value < 1:
        raise UserError(f"--stride must be 1 or more, got {stride_value}")
    batch = int(parse_number("--batch-size", batch_size, int))
    if batch < 1:
        raise UserError(f"--batch-size must be 1 or more, got {batch}")
    device_name, dtype_name = check_device_name(device), check_dtype_name(dtype)
    worst_n = None if worst is None else int(parse_number("--worst", worst, int))
    if worst_n is not None and worst_n < 1:
        raise UserError(f"--worst must be 1 or more, got {worst_n}")
    per_token = tokens or worst_n is not None or show
    if per_token and each_line:
        raise UserError("--tokens, --worst and --show look at whole texts; not with --each-line")

    names = list(files or [])
    if each_line and names and names != [STDIN]:
        raise UserError("--each-line reads the lines from stdin; redirect a file instead: gptcli score --each-line "
                        "< FILE")
    if (not names or STDIN in names) and sys.stdin is not None and sys.stdin.isatty():
        usage_and_exit(ctx, NO_TEXT)
    if names.count(STDIN) > 1:
        raise UserError("'-' (stdin) can be named once")
    stdin_text = read_stdin(strip_newline=False) if not names or STDIN in names else None
    if each_line:
        texts = split_lines(stdin_text or "")
        names = [f"line {i + 1}" for i in range(len(texts))]
    else:
        names = names or [STDIN]
        texts = [stdin_text if name == STDIN else read_text_file(name) for name in names]  # type: ignore[misc]

    check_tokenizer_early(weights)
    loaded = load_for_command(InferenceOptions(size=size, config=config, weights=weights, device=device_name,
                                               dtype=dtype_name, seed=seed_value, threads=threads,
                                               tune=not no_tune))
    from gptcli.scoring import check_stride, default_stride, score_texts

    context = loaded.cfg.context_length
    used_stride = check_stride(default_stride(context) if stride_value is None else stride_value, context)
    labels = ["stdin" if name == STDIN else name for name in names]  # what errors call each text
    try:
        with _ProgressBar(threshold=2 * context) as progress:
            scores = score_texts(loaded.model, loaded.tokenizer, texts, stride=used_stride, bos=bos,
                                 batch_size=batch, progress=progress, names=labels)
        entries = None
        if per_token:
            from gptcli.scoring import score_tokens

            entries = score_tokens(loaded.model, loaded.tokenizer, texts, stride=used_stride, bos=bos, names=labels)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None

    if each_line:
        _render_lines(texts, scores, json_output)
        return
    for name, text, s in zip(names, texts, scores):
        if s.tokens == 0:
            why = ("it is empty" if not text else "its one token has no prediction"
                   + ("; --bos scores it" if loaded.tokenizer.eot_id is not None else ""))
            note(f"{name}: 0 tokens scored ({why})")
    from gptcli.commands.score_tokens import TokenViews

    views = None if entries is None else TokenViews(entries, loaded.tokenizer, tokens, worst_n, show)
    _render_texts(names, scores, loaded, used_stride, bos, json_output, views)


# --- Rendering -----------------------------------------------------------------------------------------


def _finite(value: float | None) -> float | None:
    """JSON has no inf or NaN: those become null."""
    return value if value is not None and math.isfinite(value) else None


def score_record(s: "Score") -> dict:
    return {"tokens": s.tokens, "bytes": s.bytes, "loss": _finite(s.loss), "perplexity": _finite(s.perplexity),
            "bits_per_byte": _finite(s.bits_per_byte)}


def _cells(s: "Score") -> list[str]:
    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    perplexity = s.perplexity
    ppl_spec = ".2f" if perplexity is not None and perplexity < 1e7 else ".4g"
    return [str(s.tokens), str(s.bytes), num(s.loss, ".4f"), num(perplexity, ppl_spec), num(s.bits_per_byte, ".4f")]


def _render_texts(names: list[str], scores: list["Score"], loaded: "Runtime", stride: int, bos: bool,
                  json_output: bool, views: "TokenViews | None" = None) -> None:
    from gptcli.scoring import total

    overall = total(scores)
    if json_output:
        print_json({
            "results": [{"file": name, **score_record(s), **(views.json(n) if views else {})}
                        for n, (name, s) in enumerate(zip(names, scores))],
            "total": score_record(overall),
            "stride": stride,
            "context_length": loaded.cfg.context_length,
            "bos": bos,
            "weights": loaded.source,
            "config": loaded.cfg.name,
            "device": str(loaded.device),
            "dtype": name_of(loaded.dtype),
        })
        return
    if views is not None:
        views.render(names)
    start = ("from the first token (after <|endoftext|>, --bos)" if bos
             else "from the second token (--bos scores the first)" if loaded.tokenizer.eot_id is not None
             else "from the second token (the first has no context)")
    title = (f"Scores: weights {loaded.source}, config {loaded.cfg.name}, {name_of(loaded.dtype)} on {loaded.device}\n"
             f"windows of {loaded.cfg.context_length} tokens, stride {stride}; each text scored {start}")
    rows = [[name, *_cells(s)] for name, s in zip(names, scores)]
    if len(scores) > 1:
        rows.append(["total", *_cells(overall)])
    print_table(title, ["file", *COLUMNS], rows, right_align=range(1, 6), footer_rows=int(len(scores) > 1))


def _render_lines(texts: list[str], scores: list["Score"], json_output: bool) -> None:
    if json_output:
        for n, (text, s) in enumerate(zip(texts, scores), start=1):
            sys.stdout.write(json.dumps({"line": n, **score_record(s), "text": text}, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    if stdout_is_terminal():
        rows = [[str(n), *_cells(s), text] for n, (text, s) in enumerate(zip(texts, scores), start=1)]
        print_table(None, ["line", *COLUMNS, "text"], rows, right_align=range(0, 6))
        return
    # One tab-separated line per input line, no header: line N answers line N (sort, cut and paste work).
    out = ["\t".join([str(n), *_cells(s), escape_line(text)]) for n, (text, s) in enumerate(zip(texts, scores), 1)]
    sys.stdout.write("".join(line + "\n" for line in out))
    sys.stdout.flush()


class _ProgressBar:
    """A Rich progress bar on stderr, for inputs of more than ``threshold`` predictions, when stderr is a terminal."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.bar = None
        self.task = None

    def __enter__(self) -> "_ProgressBar":
        return self

    def __call__(self, done: int, goal: int) -> None:
        if self.bar is None:
            if goal <= self.threshold or not sys.stderr.isatty():
                return
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("scoring", total=goal)
        self.bar.update(self.task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
