"""`gptcli generate`: stream a continuation of a prompt. Parsing and rendering only; decoding is gptcli.decoding.generate."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, List, Optional, Sequence

import typer

from gptcli.commands.common import (
    ConfigOption,
    DeviceOption,
    DtypeOption,
    SizeOption,
    NoTuneOption,
    ThreadsOption,
    WeightsOption,
    check_quantize,
    check_tokenizer_early,
    err,
    escape_line,
    load_for_command,
    note,
    parse_number,
    parse_seed,
    print_json,
    read_stdin,
    silence_stdout,
    split_lines,
    stdout_is_terminal,
    stdout_styled,
    usage_and_exit,
    user_errors,
)
from gptcli.devices import check_device_name, check_dtype_name
from gptcli.devices import dtype_name as name_of
from gptcli.errors import UserError
from gptcli.decoding.generate import FINISH_CLOSED, FINISH_INTERRUPTED, MAX_SEED, SamplingOptions
from gptcli.decoding.speculative import SpeculativeGeneration, SpeculativeOptions, Speculator, draft_inference_options

if TYPE_CHECKING:
    from gptcli.decoding.generate import Generation, Timings
    from gptcli.runtime import InferenceOptions, Runtime

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
NO_PROMPT = "No prompt: give one as an argument, or pipe one in, e.g.  echo 'Once upon a time' | gptcli generate"
STDIN_CLOSED = "no prompt: stdin is closed; give the prompt as an argument"


class TextOutput:
    """Where streamed text goes: plain writes to stdout, flushed per piece, never through Rich's wrapping."""

    def __init__(self, terminal: bool, view=None):
        self.terminal = terminal
        self.view = view  # a probability_view.StreamView that colours pieces (--show-probs), or None

    def prompt(self, text: str) -> None:
        if not text:
            return
        if stdout_styled() and not os.environ.get("NO_COLOR"):
            # NO_COLOR (set and not empty, no-color.org) asks for no styling at all, dimming included.
            # Dimmed via Rich on a terminal (or with FORCE_COLOR); soft_wrap so Rich doesn't insert line breaks,
            # no markup/emoji/highlighting so the prompt shows exactly as typed.
            from rich.console import Console
            from rich.text import Text

            console = Console(file=sys.stdout, soft_wrap=True, markup=False, emoji=False, highlight=False)
            console.print(Text(text, style="dim"), end="")
            sys.stdout.flush()
        else:
            self.write(text)

    def write(self, piece: str) -> None:
        if self.view is not None and self.view.write(piece):
            return
        sys.stdout.write(piece)
        sys.stdout.flush()

    def end(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _fmt_rate(rate: float | None) -> str:
    return f"{rate:.1f} tok/s" if rate is not None else "n/a"


@user_errors
def generate(
    ctx: typer.Context,
    prompt: Annotated[
        Optional[str],
        typer.Argument(
            metavar="PROMPT",
            help="The text to continue. Omit it or pass '-' to read all of stdin (one trailing newline is dropped). "
            "An empty prompt starts from <|endoftext|> (a character model: from a newline, as nanoGPT's sample.py).",
            show_default=False,
        ),
    ] = None,
    size: SizeOption = None,
    config: ConfigOption = None,
    weights: WeightsOption = "auto",
    max_new_tokens: Annotated[
        str, typer.Option("--max-new-tokens", "-n", metavar="N", help="How many new tokens at most (0 or more).")
    ] = "50",
    temperature: Annotated[
        str,
        typer.Option("--temperature", "-t", metavar="T", help="0 picks the most likely token (greedy); above 0 samples, "
                     "higher is more random."),
    ] = "0",
    top_k: Annotated[
        Optional[str],
        typer.Option("--top-k", metavar="K", help="Sample only among the K most likely tokens (K >= 1).",
                     show_default=False),
    ] = None,
    top_p: Annotated[
        Optional[str],
        typer.Option("--top-p", metavar="P", help="Sample only among the most likely tokens whose probabilities add "
                     "up to P, in (0, 1].", show_default=False),
    ] = None,
    min_p: Annotated[
        Optional[str],
        typer.Option("--min-p", metavar="P", help="Sample only among tokens at least P times as likely as the most "
                     "likely one, P in [0, 1] (0.05-0.1 is usual; applied after --top-k and --top-p, as in "
                     "transformers).", show_default=False),
    ] = None,
    repetition_penalty: Annotated[
        str,
        typer.Option("--repetition-penalty", metavar="R", help="Make every token already in the prompt or the text "
                     "less likely: its logit is divided by R if positive, multiplied by R if negative (CTRL's "
                     "penalty, as transformers applies it; greedy too). 1 is off; 1.1-1.3 stops most loops."),
    ] = "1",
    frequency_penalty: Annotated[
        str,
        typer.Option("--frequency-penalty", metavar="F", help="OpenAI's: each new token's logit minus F times how "
                     "often the text generated so far holds it (the prompt is not counted), F in [-2, 2]; "
                     "greedy too. 0 (default) is off."),
    ] = "0",
    presence_penalty: Annotated[
        str,
        typer.Option("--presence-penalty", metavar="P", help="OpenAI's: minus P, once, for every token the text "
                     "generated so far holds (the prompt is not counted), P in [-2, 2]; greedy too. 0 (default) "
                     "is off."),
    ] = "0",
    logit_bias: Annotated[
        Optional[List[str]],
        typer.Option("--logit-bias", metavar="ID=BIAS", help="Add BIAS, in [-100, 100], to token ID's logit before "
                     "picking (greedy too; OpenAI's logit_bias): -100 bans the token, 100 forces it. Repeatable; "
                     "`gptcli tokenize` shows a text's ids.", show_default=False),
    ] = None,
    num_samples: Annotated[
        str,
        typer.Option("--num-samples", metavar="N", help="Generate N samples of the prompt, seeded --seed, --seed+1, "
                     "...; each is labelled (a '--- sample i of N (seed S) ---' line before it; with --json one "
                     "JSON object per line, with \"sample\"). With --each-line, N lines per prompt."),
    ] = "1",
    seed: Annotated[
        str, typer.Option("--seed", metavar="N", help="Seeds random weights and sampling: same seed, same text.")
    ] = "123",
    stop: Annotated[
        Optional[List[str]],
        typer.Option("--stop", metavar="STR", help="Stop before this text; it is not printed. Repeatable.",
                     show_default=False),
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Keep going past <|endoftext|> (printed as text) instead of stopping.")
    ] = False,
    echo: Annotated[
        Optional[bool],
        typer.Option("--echo/--no-echo", help="Print the prompt before the continuation. Default: dimmed on a "
                     "terminal, not in a pipe.", show_default=False),
    ] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object at the end (text, ids, finish reason, timings) "
                           "instead of streaming.")
    ] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print load, prefill and decode timings on stderr.")] = False,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="Compile the decode step with torch.compile, after ~10-30 s of compiling "
                           "(a few seconds once the on-disk cache is warm). Often the fastest float32/bfloat16 path "
                           "on the CPU; pays off from a few hundred tokens (README's Speed section).")
    ] = False,
    quantize: Annotated[
        Optional[str], typer.Option("--quantize", metavar="int8|int4", help="Weight-only quantized Linear layers, "
                                    "run with bfloat16 activations (--dtype auto picks it). int8 (a scale per "
                                    "output channel): a quarter of float32's bytes per token, logits within a few "
                                    "percent. int4 (scale and zero per 32 inputs; fast on CPU only): 0.16 of the "
                                    "bytes and faster again, but logits move much more and greedy text soon "
                                    "differs from float32's; int4-g64/-g128/-g256: larger groups, fewer bytes, "
                                    "less exact. README's Speed section has the measured figures.",
                                    show_default=False)
    ] = None,
    each_line: Annotated[
        bool, typer.Option("--each-line", help="Read one prompt per stdin line and write one completion per line "
                           "(JSON Lines with --json), in input order, decoding up to --batch-size prompts together (a line "
                           "that ends leaves the batch, the next one joins). "
                           "Newlines and backslashes inside a plain-text completion are written as \\n and \\\\. "
                           "Plain decoding only (no --draft, --lookup).")
    ] = False,
    batch_size: Annotated[
        str, typer.Option("--batch-size", "-b", metavar="N", help="Prompts decoded together with --each-line.")
    ] = "8",
    threads: ThreadsOption = None,
    no_tune: NoTuneOption = False,
    logprobs: Annotated[
        Optional[str], typer.Option("--logprobs", metavar="K", show_default=False,
                                    help="With --json: each new token's log-probability and the K likeliest "
                                    "alternatives (0-20), in OpenAI's completions format; the model's own "
                                    "distribution, before temperature, top-k and top-p.")
    ] = None,
    show_probs: Annotated[
        bool, typer.Option("--show-probs", help="On a terminal, colour each token by the probability the model "
                           "gave it (a legend goes to stderr). In a pipe, or with NO_COLOR, the text is unchanged.")
    ] = False,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="A session: type text, the model continues it, type again "
                           "(PROMPT, if given, is the first turn). Ctrl-C stops a continuation, Ctrl-D ends; "
                           "/help lists the commands (/reset, /set temperature 0.8, /tokens). A model trained with "
                           "--task instruct chats: each line is a message, answered in its prompt template.")
    ] = False,
    draft: Annotated[
        Optional[str], typer.Option("--draft", metavar="SOURCE", help="Speculative decoding: a cheap draft guesses "
                                    "--draft-tokens tokens, the model checks them in one pass and keeps the ones it "
                                    "would have chosen, so greedy ids are the plain ones. SOURCE: int8 or int4 (the "
                                    "model's own quantized copy drafts for it: float32's text, faster as far as the quantized step "
                                    "is cheaper; README has the figures), or "
                                    "a smaller model with the same tokenizer (a path, a Hub id: --draft gpt2 for "
                                    "--size xl). With --compile the draft's steps are compiled (the model's checks "
                                    "stay eager). Works with -i, --logprobs, --show-probs, --repetition-penalty.",
                                    show_default=False)
    ] = None,
    lookup: Annotated[
        bool, typer.Option("--lookup", help="Speculative decoding with no draft model: guess the tokens that followed "
                           "the last few tokens where they appeared before (prompt lookup). Pays off where the text "
                           "repeats (code, quotes, greedy loops); switches itself off while it keeps missing.")
    ] = False,
    draft_tokens: Annotated[
        Optional[str], typer.Option("--draft-tokens", metavar="K", help="Tokens the draft guesses per check, 1 to 16 "
                                    "(default 6 with a draft model, 12 with --draft int8/int4, 8 with --lookup).", show_default=False)
    ] = None,
) -> None:
    """Continue a prompt with GPT-2, streaming each token as soon as it is decoded.

    Greedy by default (--temperature 0), so the same command prints the same text; --seed makes sampling repeatable.

    Data goes to stdout; notes, stats and errors go to stderr. In a pipe, stdout is exactly the continuation and a newline (the prompt first only with --echo): no colours, no wrapping.

    Generation ends at <|endoftext|> (finish reason eos), at a --stop string (stop) or after -n tokens (length). Ctrl-C stops, keeps what was printed and exits 130.

    Examples:

    \b
      gptcli generate "Hello, I am" -n 20
      gptcli generate "Hello, I am" -c configs/book-124M.yaml -w random -n 6  # the book's
      gptcli generate "The meaning of life is" -t 0.8 --top-k 50 --top-p 0.95 --seed 7
      gptcli generate "Q: What is 2+2? A:" --stop "Q:" -n 30
      gptcli generate "Once upon a time" -t 0.8 --min-p 0.05 --repetition-penalty 1.2 --num-samples 3
      gptcli generate "Once upon a time" --frequency-penalty 0.5 --logit-bias 198=-100  # no newlines
      echo "Once upon a time" | gptcli generate -n 20
      gptcli generate -n 20 < story.txt > continuation.txt
      gptcli generate --json "Hello" -n 10 | jq -r .text
      gptcli generate "Hello" -n 100 --stats 2> stats.txt | head -c 80
      gptcli generate "Hello" -n 200 --compile --quantize int8 --stats  # fast, close to float32
      printf 'The sky is\\nMy name is\\n' | gptcli generate --each-line -n 10 --json
      gptcli generate "Hello" -n 5 --json --logprobs 3 | jq .logprobs.top_logprobs
      gptcli generate "The capital of France is" --show-probs    # coloured by probability
      gptcli generate --interactive -n 40                         # type, it continues, type again
      gptcli generate "Hello" -n 200 --draft int8 --stats  # float32's ids, drafted by its int8 copy
      gptcli generate "Hello" --size xl --draft gpt2 -n 100  # 124M drafts for 1558M
    """
    options = SamplingOptions(
        max_new_tokens=int(parse_number("--max-new-tokens", max_new_tokens, int)),
        temperature=float(parse_number("--temperature", temperature, float)),
        top_k=None if top_k is None else int(parse_number("--top-k", top_k, int)),
        top_p=None if top_p is None else float(parse_number("--top-p", top_p, float)),
        seed=parse_seed(seed),
        stop=tuple(stop or ()),
        ignore_eos=ignore_eos,
        repetition_penalty=float(parse_number("--repetition-penalty", repetition_penalty, float)),
        min_p=None if min_p is None else float(parse_number("--min-p", min_p, float)),
        frequency_penalty=float(parse_number("--frequency-penalty", frequency_penalty, float)),
        presence_penalty=float(parse_number("--presence-penalty", presence_penalty, float)),
        logit_bias=parse_logit_bias(logit_bias or ()),
    ).validate()
    samples = int(parse_number("--num-samples", num_samples, int))
    if samples < 1:
        raise UserError(f"--num-samples must be 1 or more, got {samples}")
    if options.seed + samples - 1 > MAX_SEED:
        raise UserError(f"--num-samples {samples} from --seed {options.seed} needs seeds up to "
                        f"{options.seed + samples - 1}, past the largest, 2**64 - 1")
    if samples > 1 and options.greedy:
        note("greedy decoding (--temperature 0) gives every sample the same text; add e.g. --temperature 0.8")
    device_name = check_device_name(device)
    dtype_name = check_dtype_name(dtype)
    scheme = check_quantize(quantize, dtype_name)
    speed = SpeedOptions(compile=compile_model, quantize=scheme,
                         batch_size=int(parse_number("--batch-size", batch_size, int)), threads=threads,
                         tune=not no_tune)
    if speed.batch_size < 1:
        raise UserError(f"--batch-size must be 1 or more, got {speed.batch_size}")
    spec = SpeculativeOptions(draft=draft, lookup=lookup, draft_tokens=None if draft_tokens is None else int(
        parse_number("--draft-tokens", draft_tokens, int))).validate(scheme)
    if spec.enabled and each_line:
        raise UserError(f"--each-line uses plain decoding; drop {'--draft' if draft is not None else '--lookup'}")
    if spec.lookup and compile_model:
        raise UserError("--lookup has no draft model to compile (the model's checks stay eager, for plain "
                        "decoding's ids); drop --compile")
    from gptcli.commands.probability_view import check_view_options

    logprobs_k = check_view_options(logprobs, show_probs=show_probs, json_output=json_output, each_line=each_line,
                                    interactive=interactive)
    if interactive:
        from gptcli.commands.interactive import run_session

        if compile_model:
            raise UserError("--compile works one prompt at a time; drop it with --interactive")
        if samples > 1:
            raise UserError("--num-samples works with a PROMPT or --each-line; drop it with --interactive")
        run_session(None if prompt == "-" else prompt, options,
                    speed.inference(size=size, config=config, weights=weights, device=device_name,
                                    dtype=dtype_name, seed=options.seed), stats=stats, show_probs=show_probs,
                    spec=spec)
        return
    if each_line:
        if prompt not in (None, "-"):
            raise UserError("--each-line reads the prompts from stdin; don't pass a PROMPT argument")
        if compile_model:
            raise UserError("--compile works one prompt at a time; drop it with --each-line (batching is the "
                            "faster path there)")
        if sys.stdin is not None and sys.stdin.isatty():
            usage_and_exit(ctx, NO_PROMPT)
        try:
            _run_each_line(read_stdin(strip_newline=False, closed=STDIN_CLOSED), options, speed, size=size,
                           config=config, weights=weights,
                           device_name=device_name, dtype_name=dtype_name, json_output=json_output, stats=stats,
                           echo=bool(echo), samples=samples, logprobs_k=logprobs_k)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            silence_stdout()
            raise typer.Exit(0) from None
        return

    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin is not None and sys.stdin.isatty():
            usage_and_exit(ctx, NO_PROMPT)
        prompt_text = read_stdin(closed=STDIN_CLOSED)
    else:
        prompt_text = prompt

    try:
        _run(prompt_text, options, speed, size=size, config=config, weights=weights, device_name=device_name,
             dtype_name=dtype_name, json_output=json_output, stats=stats, echo=echo, samples=samples,
             logprobs_k=logprobs_k, show_probs=show_probs, spec=spec)
    except KeyboardInterrupt:
        # Ctrl-C before generation started (while loading); nothing to keep.
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader went away (`| head -c 5`): that is how pipelines end, not an error.
        silence_stdout()
        raise typer.Exit(0) from None


@dataclass(frozen=True)
class SpeedOptions:
    compile: bool = False
    quantize: str | None = None  # one of QUANTIZE_SCHEMES
    batch_size: int = 8
    threads: int | None = None  # --threads; None: gptcli.devices.configure_threads decides
    tune: bool = True  # measure this CPU's kernels on first use (--no-tune: the defaults)

    def inference(self, **shared) -> "InferenceOptions":
        """The front door's options: ``shared`` (size, config, weights, device, dtype, seed) and these."""
        from gptcli.runtime import InferenceOptions

        return InferenceOptions(**shared, quantize=self.quantize, threads=self.threads,
                                kernels="compiled" if self.compile else "eager", tune=self.tune)


def _timings_json(load_s: float, t: "Timings", compile_s: float | None, loaded: "Runtime") -> dict:
    return {
        "load_s": round(load_s, 6),
        "tune_s": None if loaded.tune_seconds is None else round(loaded.tune_seconds, 6),
        "kernels": dict(loaded.kernel_counts) or None,
        "kernel_plan": None if loaded.kernel_plan is None else loaded.kernel_plan.to_dict(),
        "compile_s": None if compile_s is None else round(compile_s, 6),
        "prefill_s": round(t.prefill_s, 6),
        "decode_s": round(t.decode_s, 6),
        "prefill_tokens": t.prefill_tokens,
        "decode_tokens": t.decode_tokens,
        "decode_tokens_per_s": None if t.decode_tokens_per_s is None else round(t.decode_tokens_per_s, 3),
    }


def _stats_line(load_s: float, t: "Timings", compile_s: float | None, loaded: "Runtime", finish: str) -> str:

    import torch

    compiled = "" if compile_s is None else f", compile {compile_s:.2f} s"
    if loaded.kernel_plan is not None:
        from gptcli.kernels.decode import describe

        tuned = "" if loaded.tune_seconds is None else f", tuned in {loaded.tune_seconds:.2f} s"
        compiled = f" (kernels {describe(loaded.kernel_counts)}{tuned})" + compiled
    threads = torch.get_num_threads()
    cpu = f" with {threads} thread{'s' * (threads != 1)}" if loaded.device.type == "cpu" else ""
    return (f"stats: load {load_s:.2f} s{compiled}, prefill {t.prefill_tokens} tokens in {t.prefill_s:.3f} s, "
            f"decode {t.decode_tokens} tokens in {t.decode_s:.3f} s ({_fmt_rate(t.decode_tokens_per_s)}), "
            f"{name_of(loaded.dtype)} on {loaded.device}{cpu}, finish {finish}")


def _run(prompt_text: str, options: SamplingOptions, speed: SpeedOptions, *, size, config, weights: str,
         device_name: str, dtype_name: str, json_output: bool, stats: bool, echo: bool | None,
         samples: int = 1, logprobs_k: int | None = None, show_probs: bool = False,
         spec: SpeculativeOptions = SpeculativeOptions()) -> None:
    from gptcli.commands.probability_view import StreamView
    from gptcli.decoding.generate import Generation, crop_prompt, make_decoder, prompt_ids

    check_tokenizer_early(weights)  # its error is quicker than loading a model
    greedy_note(options)
    inference = speed.inference(size=size, config=config, weights=weights, device=device_name, dtype=dtype_name,
                                seed=options.seed)
    if spec.enabled:  # the model checks guesses eagerly, with row-invariant kernels; only a draft compiles
        inference = replace(inference, kernels="eager")
    loaded = load_for_command(inference)
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    options.check_vocab(cfg.vocab_size)
    ids = prompt_ids(prompt_text, tokenizer)
    draft = load_for_command(draft_inference_options(spec, inference, compile=speed.compile)) \
        if spec.draft is not None else None
    positions = min(len(ids), cfg.context_length) + options.max_new_tokens
    speculator = Speculator(spec, loaded, draft, compile=speed.compile) if spec.enabled else None
    decoder = None if speculator else make_decoder(loaded.model, loaded.device, loaded.dtype, compile=speed.compile)
    compile_s = None
    if speed.compile:
        note(f"compiling the {'draft' if speculator else 'decode'} step (torch.compile; cached on disk for the "
             "next run)...")
        compile_s = speculator.warm_up(positions) if speculator else decoder.warm_up(positions)
    _, dropped = crop_prompt(ids, cfg.context_length)
    if dropped:
        note(f"the prompt has {len(ids)} tokens, more than the context of {cfg.context_length}; "
             f"dropped the first {dropped}")

    for sample in range(1, samples + 1):
        sample_options = options if samples == 1 else replace(options, seed=options.seed + sample - 1)
        view = StreamView(logprobs_k, show_probs and not json_output)
        if speculator:  # the same protocol, with a draft (gptcli.decoding.speculative)
            generation = speculator.generation(ids, sample_options, observe=view.recorder)
        else:
            generation = Generation(decoder, ids, sample_options, context_length=cfg.context_length,
                                    eos_id=tokenizer.eot_id, token_bytes=tokenizer.token_bytes,
                                    observe=view.recorder)
        out = TextOutput(terminal=stdout_is_terminal(), view=view)
        label = None if samples == 1 else {"sample": sample, "num_samples": samples}
        _stream_one(generation, prompt_text, ids, dropped, loaded, compile_s, out, view, label,
                    json_output=json_output, stats=stats, echo=echo, draft=draft)


def _stream_one(generation: "Generation", prompt_text: str, ids: list[int], dropped: int, loaded: "Runtime",
                compile_s: float | None, out: TextOutput, view, label: dict | None, *, json_output: bool,
                stats: bool, echo: bool | None, draft: "Runtime | None" = None) -> None:
    """Stream one generation (one of --num-samples when ``label`` is set) and report it; exits on Ctrl-C or
    a closed pipe."""
    options = generation.options
    interrupted = False
    if label is not None and not json_output:  # written as is: not a piece of text for --show-probs to colour
        sys.stdout.write(f"--- sample {label['sample']} of {label['num_samples']} (seed {options.seed}) ---\n")
    if not json_output and (echo or (echo is None and out.terminal)):
        out.prompt(prompt_text)
    pipe_closed = False
    try:
        for piece in generation:
            if not json_output:
                out.write(piece)
        if not json_output:
            out.end()
    except KeyboardInterrupt:
        interrupted = True
        generation.finish_reason = FINISH_INTERRUPTED
        if not json_output:
            out.end()
    except BrokenPipeError:
        # The reader went away (`| head -c 5`): stop generating, but still report on stderr.
        silence_stdout()
        pipe_closed = True
        if generation.finish_reason is None:  # else it had ended already, and that is the reason
            generation.finish_reason = FINISH_CLOSED

    t = generation.timings
    if json_output:
        record = {
            **(label or {}),
            **result_record(prompt_text, ids, dropped, generation.token_ids, generation.text,
                            generation.finish_reason, loaded, options),
            **view.json(loaded.tokenizer, start_offset=len(prompt_text)),
            "timings": _timings_json(loaded.load_seconds, t, compile_s, loaded),
            **_speculative_json(generation, draft),
        }
        if label is None:
            print_json(record)
        else:  # JSON Lines: one object per sample, as --each-line writes one per prompt
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            sys.stdout.flush()
    if stats:
        err(_stats_line(loaded.load_seconds, t, compile_s, loaded, str(generation.finish_reason)))
        if isinstance(generation, SpeculativeGeneration):
            err(generation.stats.line(t.decode_tokens, t.decode_s))
    if pipe_closed:
        raise typer.Exit(0)
    if interrupted:
        note(f"interrupted after {len(generation.token_ids)} new tokens")
        raise typer.Exit(EXIT_INTERRUPTED)


def _speculative_json(generation, draft: "Runtime | None") -> dict:
    """``speculative`` for --json, only with a draft (gptcli.decoding.speculative.SpeculativeStats)."""
    if not isinstance(generation, SpeculativeGeneration):
        return {}
    t = generation.timings
    record = generation.stats.to_json(t.decode_tokens, t.decode_s)
    if draft is not None:
        record.update(draft_weights=draft.source, draft_dtype=name_of(draft.dtype), draft_quantize=draft.quantize,
                      draft_load_s=round(draft.load_seconds, 6))
    return {"speculative": record}


def parse_logit_bias(values: Sequence[str]) -> tuple[tuple[int, float], ...]:
    """``--logit-bias ID=BIAS`` values as (id, bias) pairs; UserError naming a malformed one (the ranges
    are ``SamplingOptions.validate``'s, the vocabulary ``check_vocab``'s)."""
    pairs = []
    for value in values:
        token, sep, bias = value.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(token.strip()), float(bias.strip())))
        except ValueError:
            raise UserError(f"--logit-bias expects ID=BIAS (a token id and a number, e.g. 198=-100), got "
                            f"{value!r}") from None
    return tuple(pairs)


def greedy_note(options: SamplingOptions) -> None:
    """Say so when sampling-only options were given for greedy decoding."""
    if options.greedy and (options.top_k is not None or options.top_p is not None or options.min_p is not None):
        names = "--top-k, --top-p and --min-p" if options.min_p is not None else "--top-k and --top-p"
        note(f"{names} only apply when sampling (--temperature above 0); decoding greedily")


def result_record(prompt: str, prompt_ids: list[int], dropped: int, token_ids: list[int], text: str,
                  finish_reason: str | None, loaded: "Runtime", options: SamplingOptions) -> dict:
    """The JSON fields of one completion, shared by single runs and --each-line."""

    return {
        "prompt": prompt,
        "text": text,
        "prompt_token_ids": prompt_ids,
        "prompt_tokens_dropped": dropped,
        "token_ids": token_ids,
        "finish_reason": finish_reason,
        "config": loaded.cfg.name,
        "weights": loaded.source,
        "device": str(loaded.device),
        "dtype": name_of(loaded.dtype),
        "seed": options.seed,
        "sampling": {"temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
                     "min_p": options.min_p, "repetition_penalty": options.repetition_penalty,
                     "frequency_penalty": options.frequency_penalty, "presence_penalty": options.presence_penalty,
                     "logit_bias": {str(t): b for t, b in options.logit_bias}},
        "stop": list(options.stop),
    }


def _run_each_line(stdin_text: str, options: SamplingOptions, speed: SpeedOptions, *, size, config, weights: str,
                   device_name: str, dtype_name: str, json_output: bool, stats: bool, echo: bool,
                   samples: int = 1, logprobs_k: int | None = None) -> None:
    from gptcli.decoding.generate import Timings, prompt_ids

    prompts = split_lines(stdin_text)
    greedy_note(options)
    check_tokenizer_early(weights)
    loaded = load_for_command(speed.inference(size=size, config=config, weights=weights, device=device_name,
                                              dtype=dtype_name, seed=options.seed))
    options.check_vocab(loaded.cfg.vocab_size)
    encoded = [prompt_ids(p, loaded.tokenizer) for p in prompts]
    total = Timings()
    written = [0]  # prompts whose line is out, for the stats after a closed pipe
    try:
        _each_line_batches(prompts, encoded, options, speed, loaded, json_output, echo, total, written, samples,
                           logprobs_k)
    except BrokenPipeError:
        # The reader went away (`| head -n 3`): stop, but still report on stderr.
        silence_stdout()
        if stats:
            err(_stats_line(loaded.load_seconds, total, None, loaded,
                            f"{FINISH_CLOSED} (stdout closed after {written[0]} of {len(prompts)} prompts)"))
        raise typer.Exit(0) from None
    if stats:
        err(_stats_line(loaded.load_seconds, total, None, loaded, f"{len(prompts)} prompts in batches of "
                        f"{speed.batch_size}"))


def _each_line_batches(prompts: list[str], encoded: list[list[int]], options: SamplingOptions, speed: SpeedOptions,
                       loaded: "Runtime", json_output: bool, echo: bool, total: "Timings",
                       written: list[int], samples: int = 1, logprobs_k: int | None = None) -> None:
    """Generate every line, at most ``--batch-size`` rows at a time (a row that ends leaves, the next line
    joins), and write each in input order as soon as it can, adding to ``total``; ``written[0]`` counts
    the prompts written. With ``samples`` > 1 every prompt is ``samples`` rows, seeded ``options.seed``,
    +1, ..., written in that order."""
    from gptcli.decoding.batch import BatchDecoder, decode_rows_in_order
    from gptcli.decoding.generate import SequenceState, crop_prompt
    from gptcli.decoding.logprobs import Recorder, openai_logprobs

    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    rows = [(index, sample) for index in range(len(prompts)) for sample in range(samples)]
    recorders = [None if logprobs_k is None else Recorder(logprobs_k) for _ in rows]
    sequences = [SequenceState(encoded[index], replace(options, seed=options.seed + sample), eos_id=tokenizer.eot_id,
                               token_bytes=tokenizer.token_bytes, context_length=cfg.context_length, observe=recorder)
                 for (index, sample), recorder in zip(rows, recorders)]
    decoder = BatchDecoder(loaded.model, loaded.device, loaded.dtype)
    for n in decode_rows_in_order(decoder, sequences, speed.batch_size, total):
        (index, sample), seq, recorder = rows[n], sequences[n], recorders[n]
        dropped = crop_prompt(seq.prompt_token_ids, cfg.context_length)[1]
        if dropped and sample == 0:
            note(f"line {index + 1}: the prompt has {len(seq.prompt_token_ids)} tokens, more than the "
                 f"context of {cfg.context_length}; dropped the first {dropped}")
        if json_output:
            label = {} if samples == 1 else {"sample": sample + 1, "num_samples": samples}
            line = json.dumps({"line": index + 1, **label, **result_record(
                prompts[index], seq.prompt_token_ids, dropped, seq.token_ids, seq.text, seq.finish_reason, loaded,
                seq.options), **({} if recorder is None else {"logprobs": openai_logprobs(
                    recorder.entries[0], tokenizer.token_bytes, len(prompts[index]))})}, ensure_ascii=False)
        else:
            line = escape_line((prompts[index] if echo else "") + seq.text)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        written[0] = index + 1 if sample == samples - 1 else index
