"""`gptcli serve`: an OpenAI-compatible HTTP server. Parsing and notes only; the server is gptcli.serving.server,
the batching gptcli.serving.engine (both imported when the command runs, so `gptcli --help` loads neither)."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from gptcli.commands.common import (
    ConfigOption,
    DeviceOption,
    DtypeOption,
    NoTuneOption,
    SizeOption,
    ThreadsOption,
    WeightsOption,
    check_quantize,
    check_tokenizer_early,
    err,
    load_for_command,
    note,
    user_errors,
)
from gptcli.devices import check_device_name, check_dtype_name
from gptcli.errors import UserError

API_KEY_ENV = "GPTCLI_API_KEY"
EXIT_INTERRUPTED = 130
CHECKED_BATCH_ROWS = 8  # gptcli.kernels.decode.BATCH_ROWS, the rows its invariance check covers (no torch here)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@user_errors
def serve(
    size: SizeOption = None,
    config: ConfigOption = None,
    weights: WeightsOption = "auto",
    host: Annotated[str, typer.Option("--host", metavar="ADDR", help="Address to listen on. Anything but "
                                      "loopback is reachable from other machines: set --api-key then.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", metavar="N", min=0, max=65535,
                                      help="TCP port (0: any free one; the note says which).")] = 8000,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", metavar="N", min=1, max=64,
        help=f"Rows decoded together (a request with n choices takes n). Rows were checked to give the same "
        f"bits as alone for batches of 1 to {CHECKED_BATCH_ROWS} on this CPU (the kernel choice checks it); "
        f"larger batches run but are not checked.")] = CHECKED_BATCH_ROWS,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", metavar="N", min=0, max=4096,
        help="Rows that may wait for a place in the batch; past it a request gets 503 with Retry-After.")] = 64,
    max_tokens_cap: Annotated[int, typer.Option(
        "--max-tokens-cap", metavar="N", min=1, max=1 << 20,
        help="The largest max_tokens a request may ask for (400 above it).")] = 1024,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", metavar="KEY", envvar=API_KEY_ENV, show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every endpoint but /health (401 otherwise).",
        show_default=False)] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--served-model-name", metavar="ID", help="The model id /v1/models lists and requests name. Default: the "
        "hub id, the checkpoint's folder or file name, or random-SIZE.", show_default=False)] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    quantize: Annotated[Optional[str], typer.Option(
        "--quantize", metavar="int8|int4", help="Weight-only quantized Linear layers, as for generate. Rows are "
        "not checked to be batch-invariant with them.", show_default=False)] = None,
    threads: ThreadsOption = None,
    no_tune: NoTuneOption = False,
) -> None:
    """Serve the model over OpenAI's HTTP API: /v1/completions (streaming, n, stop, logprobs, echo, seed,
    logit_bias, frequency and presence penalties), /v1/chat/completions for a model whose checkpoint names a
    prompt template (a `gptcli train --task instruct` run), /v1/models, /tokenize, /detokenize, /health,
    /metrics (Prometheus), and a playground page at /.

    Requests that arrive while others run join the running batch between decode steps (continuous
    batching), and on the CPU a request's text and token ids are the same whether it runs alone or
    beside others, and the same as `gptcli generate` prints with the same settings and --seed. Plain
    decoding only: generate's speculative --draft/--lookup are not used here.

    Listens on 127.0.0.1 only unless --host says otherwise. Ctrl-C or SIGTERM: stop accepting, let
    the running requests finish (30 s at most) and exit.

    Examples:

    \b
      gptcli serve --size 124M
      curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "openai-community/gpt2", "prompt": "Hello, I am", "max_tokens": 10, "temperature": 0}'
      GPTCLI_API_KEY=secret gptcli serve --weights runs/my-run --host 0.0.0.0
    """
    device_name = check_device_name(device)
    dtype_name = check_dtype_name(dtype)
    scheme = check_quantize(quantize, dtype_name)
    if api_key is not None and not api_key.strip():
        raise UserError(f"--api-key (or {API_KEY_ENV}) must not be empty")
    if not is_loopback(host) and api_key is None:
        err(f"warning: listening on {host} with no --api-key: anyone who can reach this address can use the model")
    if max_batch > CHECKED_BATCH_ROWS:
        err(f"warning: --max-batch {max_batch}: batch invariance was checked for batches of 1 to "
            f"{CHECKED_BATCH_ROWS} rows only")
    check_tokenizer_early(weights)
    try:
        _serve(size=size, config=config, weights=weights, host=host, port=port, max_batch=max_batch,
               max_queue=max_queue, max_tokens_cap=max_tokens_cap, api_key=api_key, model_name=model_name,
               device_name=device_name, dtype_name=dtype_name, scheme=scheme, threads=threads, tune=not no_tune)
    except KeyboardInterrupt:  # Ctrl-C while loading; once serving, Ctrl-C is a clean shutdown
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _serve(*, size: str | None, config, weights: str, host: str, port: int, max_batch: int, max_queue: int,
           max_tokens_cap: int, api_key: str | None, model_name: str | None, device_name: str, dtype_name: str,
           scheme: str | None, threads: int | None, tune: bool) -> None:
    from gptcli.serving.chat import checkpoint_template
    from gptcli.serving.completions import Limits
    from gptcli.runtime import InferenceOptions
    from gptcli.serving.server import ServeSettings, default_model_id, listen, run_server

    sock = listen(host, port)  # before loading: a port in use fails at once
    runtime = load_for_command(InferenceOptions(size=size, config=config, weights=weights, device=device_name,
                                                dtype=dtype_name, quantize=scheme, threads=threads,
                                                kernels="eager", tune=tune))
    if runtime.device.type != "cpu":
        note(f"on {runtime.device.type} a row's numbers can depend on the batch: text may differ under load")
    settings = ServeSettings(
        model_id=model_name or default_model_id(runtime),
        limits=Limits(context_length=runtime.cfg.context_length, vocab_size=runtime.cfg.vocab_size,
                      max_tokens=max_tokens_cap, max_rows=max(max_queue, max_batch)),
        api_key=api_key, host=host, port=port, max_batch=max_batch, max_queue=max_queue,
        template=checkpoint_template(runtime.checkpoint),
    )

    def ready(url: str) -> None:
        chat = f", chat with its {settings.template} template" if settings.template else ""
        note(f"serving {settings.model_id} ({runtime.source}) at {url}/v1{chat} (pid {os.getpid()}); Ctrl-C stops")

    run_server(runtime, settings, sock, on_ready=ready)
    note("stopped")
