"""`gptcli generate --interactive`: the terminal side of a session (gptcli.decoding.session): line editing and
history (readline), slash commands, Ctrl-C and Ctrl-D. The model and the running text live in the library."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Iterator

import typer

from gptcli.commands.common import check_tokenizer_early, err, load_for_command, note
from gptcli.errors import UserError

if TYPE_CHECKING:
    from gptcli.decoding.generate import SamplingOptions
    from gptcli.runtime import InferenceOptions
    from gptcli.decoding.session import Session, TurnStats
    from gptcli.decoding.speculative import SpeculativeOptions

PROMPT = "> "
EXIT_INTERRUPTED = 130
HISTORY_LINES = 1000
HELP = """\
Type text and press Enter: it is added to the running text and the model continues it. An empty line
lets the model go on. \\n in what you type is a newline; start a line with // to type a leading /.
  /reset                    start again from an empty text (settings stay)
  /set NAME VALUE           change a setting: temperature 0.8, top_k 50 (or none), top_p 0.95,
                            max_new_tokens 100 (or n 100), seed 7, ignore_eos on, min_p 0.05,
                            repetition_penalty 1.2, frequency_penalty 0.5, presence_penalty 0.5
  /settings                 show the settings
  /tokens                   the running text's tokens: count, cached, the last ones
  /text                     the running text so far
  /help                     this help
  /quit                     end the session (or Ctrl-D)
Ctrl-C stops the model's continuation (what it wrote stays) or clears the line you are typing.
A model trained with a prompt template (gptcli train --task instruct) chats instead: each line is a
message, the model answers it in the template, with the conversation so far before it; /text shows the
whole templated text and /reset starts a new conversation."""


def run_session(prompt: str | None, options: "SamplingOptions", inference: "InferenceOptions", *, stats: bool,
                show_probs: bool, spec: "SpeculativeOptions | None" = None) -> None:
    """Load the model (and a --draft) once, then read lines until Ctrl-D or /quit."""
    from gptcli.decoding.session import Session, checkpoint_template
    from gptcli.decoding.speculative import draft_inference_options

    check_tokenizer_early(inference.weights)
    if options.greedy and (options.top_k is not None or options.top_p is not None):
        note("--top-k and --top-p only apply when sampling (--temperature above 0); decoding greedily")
    try:
        loaded = load_for_command(inference)
        options.check_vocab(loaded.cfg.vocab_size)
        draft = None
        if spec is not None and spec.draft is not None:
            draft = load_for_command(draft_inference_options(spec, inference))
    except KeyboardInterrupt:  # while loading: nothing to keep
        raise typer.Exit(EXIT_INTERRUPTED) from None
    session = Session(loaded, options, spec=spec, draft=draft, template=checkpoint_template(loaded))
    terminal = sys.stdin is not None and sys.stdin.isatty()
    history = _start_readline() if terminal else None
    if session.chat:
        note(f"chat with {loaded.source} ({loaded.cfg.name}, context {loaded.cfg.context_length}) in its "
             f"{session.template} prompt template: type a message and press Enter, the model answers; Ctrl-C stops "
             "it, Ctrl-D ends, /help for more")
    else:
        note(f"interactive session with {loaded.source} ({loaded.cfg.name}, context {loaded.cfg.context_length}): "
             "type text and press Enter, the model continues it; Ctrl-C stops it, Ctrl-D ends, /help for more")
    try:
        if prompt is not None:
            _turn(session, prompt, stats, show_probs)
        while True:
            try:
                line = input(PROMPT if terminal else "")
            except EOFError:
                if terminal:
                    sys.stdout.write("\n")
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                sys.stdout.write("\n")
                sys.stdout.flush()
                continue
            try:
                if line.startswith("/") and not line.startswith("//"):
                    if not _command(session, line):
                        break
                    continue
                if session.chat and not line.strip():
                    continue  # a chat answers messages; there is no text to go on with
                _turn(session, unescape(line.removeprefix("/") if line.startswith("//") else line), stats,
                      show_probs)
            except KeyboardInterrupt:  # between the steps of a turn (a notes line, say): the session goes on
                sys.stdout.write("\n")
                sys.stdout.flush()
            except UserError as exc:  # a character outside a character model's vocabulary, say
                err(f"error: {exc}")
    finally:
        if history is not None:
            _save_history(history)
        sys.stdout.flush()


def unescape(line: str) -> str:
    """What was typed, with \\n as a newline and \\\\ as a backslash."""
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in "n\\":
            out.append("\n" if line[i + 1] == "n" else "\\")
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def _turn(session: "Session", typed: str, stats: bool, show_probs: bool) -> None:
    """One continuation on stdout; Ctrl-C stops it and keeps the session."""
    from gptcli.commands.probability_view import StreamView

    view = StreamView(None, show_probs, legend=session.turns == 0)  # the legend once, with the first turn
    try:
        with _typing_hidden():
            for piece in session.turn(typed, observe=view.recorder):
                if not view.write(piece):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except KeyboardInterrupt:
        session.interrupt()
        sys.stdout.write("\n")
        sys.stdout.flush()
        note("stopped; what was written stays in the text")
    turn = session.stats()
    if turn is not None and turn.dropped_tokens and session.decoder.prefilled:
        note(f"the running text has {turn.dropped_tokens + session.context_length} tokens, more than the context "
             f"of {session.context_length}; the model sees the last {session.context_length}")
    if stats and turn is not None:
        err(stats_line(turn))
        if turn.speculative is not None:
            err(turn.speculative.line(turn.decode_tokens, turn.decode_s))


@contextlib.contextmanager
def _typing_hidden() -> Iterator[None]:
    """While the model writes, keys typed are not echoed into its text; they wait for the next prompt
    (readline shows them there). Ctrl-C still interrupts, and discards them, as in a shell."""
    if sys.stdin is None or not sys.stdin.isatty():
        yield
        return
    import termios

    fd = sys.stdin.fileno()
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def stats_line(turn: "TurnStats") -> str:
    rate = "n/a" if turn.decode_tokens_per_s is None else f"{turn.decode_tokens_per_s:.1f} tok/s"
    return (f"stats: turn {turn.turn}: prefill {_count(turn.prefill_tokens, 'token')} ({turn.reused_tokens} cached) "
            f"in {turn.prefill_s:.3f} s, decode {_count(turn.decode_tokens, 'token')} in {turn.decode_s:.3f} s "
            f"({rate}), {turn.new_tokens} new, finish {turn.finish_reason or 'none'}")


def _command(session: "Session", line: str) -> bool:
    """Run a slash command; False to end the session."""
    name, _, rest = line[1:].strip().partition(" ")
    name, rest = name.lower(), rest.strip()
    if name in {"quit", "exit", "q"}:
        return False
    try:
        if name == "help":
            err(HELP)
        elif name == "reset":
            session.reset()
            note("a new conversation" if session.chat else "the running text is empty again")
        elif name == "set":
            setting, _, value = rest.partition(" ")
            if not setting or not value.strip():
                raise UserError("usage: /set NAME VALUE, e.g. /set temperature 0.8 (/help lists the settings)")
            session.set(setting, value.strip())
            note(_settings(session))
        elif name == "settings":
            note(_settings(session))
        elif name == "tokens":
            note(_tokens(session))
        elif name == "text":
            sys.stdout.write(session.text + "\n")
            sys.stdout.flush()
        else:
            raise UserError(f"unknown command /{name}; /help lists them (// starts a line with a /)")
    except UserError as exc:
        err(f"error: {exc}")
    return True


def _settings(session: "Session") -> str:
    o = session.options
    chat = f"chat in the {session.template} template (an answer ends at the end-of-text token or at \"\\n\\n### \"), " \
        if session.chat else ""
    return (f"{chat}temperature {o.temperature:g}{' (greedy)' if o.greedy else ''}, top_k {_or_none(o.top_k)}, "
            f"top_p {_or_none(o.top_p)}, "
            f"max_new_tokens {o.max_new_tokens}, seed {o.seed}, ignore_eos {'on' if o.ignore_eos else 'off'}"
            + (f", min_p {o.min_p}" if o.min_p is not None else "")
            + (f", repetition_penalty {o.repetition_penalty:g}" if o.repetition_penalty != 1 else "")
            + (f", frequency_penalty {o.frequency_penalty:g}" if o.frequency_penalty else "")
            + (f", presence_penalty {o.presence_penalty:g}" if o.presence_penalty else "")
            + (", logit_bias " + " ".join(f"{t}={b:g}" for t, b in o.logit_bias) if o.logit_bias else ""))


def _or_none(value: object) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _tokens(session: "Session", last: int = 40) -> str:
    from gptcli.token_pieces import pieces

    ids = session.token_ids() if session.text else []
    shown = pieces(session.runtime.tokenizer, ids[-last:])
    tail = "|".join(p.visible for p in shown)
    more = f"the last {len(shown)}: " if len(ids) > last else ""
    return (f"{len(ids)} tokens in the running text (context {session.context_length}, {session.cached_tokens()} "
            f"cached)" + (f"; {more}{tail}" if ids else ""))


def _history_file():
    from gptcli.kernels.decode import cache_path

    return cache_path().parent / "history"


def _start_readline():
    """Line editing and history as in a shell (Python's readline), the history kept between sessions."""
    try:
        import readline
    except ImportError:  # not on every platform; input() still works
        return None
    path = _history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LINES)
    return path


def _save_history(path) -> None:
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass
