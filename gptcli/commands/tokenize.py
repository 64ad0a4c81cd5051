"""`gptcli tokenize`: a text's tokens (id, piece, offsets), or ids back to text. No torch: the
tokenizer alone, from tiktoken or a checkpoint's safetensors header (gptcli.token_pieces)."""

from __future__ import annotations

import sys
from typing import Annotated, List, Optional

import typer

from gptcli.commands.common import print_json, print_table, read_stdin, usage_and_exit, user_errors
from gptcli.errors import UserError

NO_TEXT = "No text: give one as an argument, or pipe one in, e.g.  echo 'Hello, world' | gptcli tokenize"


@user_errors
def tokenize(
    ctx: typer.Context,
    text: Annotated[
        Optional[List[str]],
        typer.Argument(metavar="TEXT | IDS...", show_default=False,
                       help="The text to split into tokens (omit it or pass '-' to read stdin; one trailing "
                       "newline is dropped). With --decode: token ids, as words or a JSON list."),
    ] = None,
    decode: Annotated[
        bool, typer.Option("--decode", help="The other way: token ids (arguments, or stdin) to text.")
    ] = False,
    weights: Annotated[
        str, typer.Option("--weights", "-w", metavar="SOURCE",
                          help="Whose tokenizer: auto/random (GPT-2's BPE), or a checkpoint file, folder or run "
                          "(its own tokenizer, a character model's too; read from the header only).")
    ] = "auto",
    count: Annotated[bool, typer.Option("--count", help="Print only the number of tokens (with --json: the "
                                        "count, characters, bytes and tokenizer, without the tokens).")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object: ids, and each token's id, text, bytes and character "
                           "offsets (start, end).")
    ] = False,
) -> None:
    """Show how a model's tokenizer splits a text: each token's id and piece, and the count.

    Spaces show as ␣, newlines as \\n, and a token that is part of a UTF-8 character as its bytes (<0xE2>). --decode turns ids back into text (printed as is, then a newline). Torch is not imported.

    Examples:

    \b
      gptcli tokenize "Hello, world"
      echo "naïve café" | gptcli tokenize --json | jq .ids
      gptcli tokenize --decode 15496 11 314
      gptcli tokenize --count < story.txt
      gptcli tokenize --weights runs/shakespeare "ROMEO:"     # a run's own (character) tokenizer
    """
    from gptcli import token_pieces as pieces

    words = list(text or [])
    if not decode and len(words) > 1:
        raise UserError(f"give the text as one argument (quote it): got {len(words)} arguments")
    if not words or words == ["-"]:
        if sys.stdin is not None and sys.stdin.isatty():
            usage_and_exit(ctx, NO_TEXT)
        words = [read_stdin()]
    tokenizer = _tokenizer(weights)
    if decode:
        ids = pieces.parse_ids(words, tokenizer.vocab_size)
        decoded = tokenizer.decode(ids)
        if json_output:
            print_json({"ids": ids, "text": decoded, "tokenizer": tokenizer.name,
                        "tokens": [p.record() for p in pieces.pieces(tokenizer, ids)]})
        else:
            sys.stdout.write(decoded + "\n")
            sys.stdout.flush()
        return
    source = words[0]
    found = pieces.encode(tokenizer, source)
    summary = {"count": len(found), "characters": len(source), "bytes": len(source.encode("utf-8"))}
    if json_output and count:
        print_json({**summary, "tokenizer": tokenizer.name})
    elif json_output:
        print_json({**summary, "tokenizer": tokenizer.name, "ids": [p.id for p in found],
                    "tokens": [p.record() for p in found]})
    elif count:
        sys.stdout.write(f"{len(found)}\n")
        sys.stdout.flush()
    else:
        rows = [(str(n), str(p.id), p.visible) for n, p in enumerate(found)]
        title = (f"{summary['count']:,} tokens ({tokenizer.name}) for {summary['characters']:,} characters, "
                 f"{summary['bytes']:,} bytes")
        print_table(title, ["#", "id", "piece"], rows, right_align=[0, 1])


def _tokenizer(weights: str):
    """GPT-2's BPE for auto/random without importing the weights code (10 ms of a 0.3 s budget)."""
    if weights.strip().lower() in {"auto", "random"}:
        from gptcli.tokenizer import gpt2

        return gpt2()
    from gptcli.weights import tokenizer_for_weights

    return tokenizer_for_weights(weights)
