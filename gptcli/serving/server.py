"""``gptcli serve``'s HTTP layer: OpenAI's API over FastAPI and uvicorn, on top of ``gptcli.serving.engine``.

Imported only by ``gptcli.commands.serve`` (FastAPI and uvicorn are loaded by ``serve`` alone). This
module translates: HTTP and JSON in, ``gptcli.serving.completions`` to check them, the engine to decode,
JSON or server-sent events out. Every refusal is OpenAI's error object with a 4xx (``ApiError``);
nothing here prints (uvicorn's own log is kept at warnings).

``GET /`` is the playground page (``gptcli.serving.playground``); it needs no key, the API calls it makes do.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptcli.serving.chat import ChatFormat, no_template_error, parse_chat
from gptcli.serving.completions import (
    Choice,
    CompletionFormat,
    CompletionRequest,
    Limits,
    now,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from gptcli.serving.fields import ApiError, bad
from gptcli.serving.engine import Engine, EngineClosed, QueueFull, RowEvent, Ticket
from gptcli.errors import UserError
from gptcli.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, MetricsMiddleware, ServerMetrics
from gptcli.serving.playground import HEADERS as PAGE_HEADERS, playground_html

if TYPE_CHECKING:
    from gptcli.runtime import Runtime

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a context window of text is far less
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25  # how often a waiting (not streaming) request checks that its client is still there
PUBLIC_PATHS = ("/health", "/")  # "/" is the playground page, which asks for the key itself


@dataclass(frozen=True)
class ServeSettings:
    """How ``serve`` runs; what a request may ask for is in ``limits``."""

    model_id: str
    limits: Limits
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = MAX_BODY_BYTES
    graceful_shutdown_s: float = 30.0
    created: int = field(default_factory=now)
    template: str | None = None  # the checkpoint's prompt template: chat is served only with one


def default_model_id(runtime: "Runtime") -> str:
    """The id /v1/models lists: the hub id, a local checkpoint's folder (or file) name, or random-SIZE."""
    from pathlib import Path

    if runtime.checkpoint is None:
        return f"random-{runtime.cfg.name}"
    source = Path(runtime.source).expanduser()
    if source.exists():
        if source.is_file() and source.name == "model.safetensors":
            return source.parent.name
        return source.stem if source.is_file() else source.name
    return runtime.source


def overloaded(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="server_overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class _KeyCheck:
    """With ``--api-key`` every endpoint but /health wants ``Authorization: Bearer KEY``, compared in
    constant time. Plain ASGI, so streamed responses pass through untouched."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                message = ("Incorrect API key provided." if header else
                           "You didn't provide an API key: send 'Authorization: Bearer KEY'.")
                error = ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 above ``limit`` bytes (counted as they arrive), 400 for anything not JSON."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise bad("Content-Length must be a number")
        if int(length) > limit:
            raise ApiError(413, f"the request body is {int(length)} bytes; at most {limit} are accepted",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad("the request body is empty; send a JSON object")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise bad(f"the request body is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise bad("the request body is nested too deeply") from None
    except ValueError as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, runtime: "Runtime", settings: ServeSettings) -> FastAPI:
    """The FastAPI app: /health, /metrics, /v1/models, /v1/completions, /v1/chat/completions (for a model with a
    template; refused otherwise), /tokenize, /detokenize."""
    app = FastAPI(title="gptcli serve", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = runtime.tokenizer
    limits = settings.limits

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(ApiError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(UserError)
    async def user_error(_request: Request, exc: UserError) -> JSONResponse:
        return _error_response(ApiError(400, str(exc)))  # a mistake in the request that no parser caught

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    if settings.api_key is not None:
        app.add_middleware(_KeyCheck, api_key=settings.api_key)
    metrics = ServerMetrics(engine.load)
    app.state.metrics = metrics
    # Added last, so outermost: it counts the key check's 401s too, and times whole streams.
    app.add_middleware(MetricsMiddleware, metrics=metrics, clock=time.perf_counter)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(playground_html(), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.load()}

    @app.get("/metrics")
    async def metrics_page() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    def model_card() -> dict:
        # chat_template (gptcli's own field): the prompt template chat applies, null when there is no chat
        return {"id": settings.model_id, "object": "model", "created": settings.created, "owned_by": "gptcli",
                "max_model_len": limits.context_length, "chat_template": settings.template}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != settings.model_id:
            raise ApiError(404, f"The model '{model_id}' does not exist; this server serves '{settings.model_id}'",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        arrived = time.perf_counter()
        if settings.template is None:
            raise no_template_error()
        req = parse_chat(await read_json(request, settings.max_body_bytes), tokenizer, limits, settings.model_id,
                         settings.template)
        return await _answer(request, engine, req, ChatFormat(req), metrics, "/v1/chat/completions", arrived)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        tokens = parse_tokenize(await read_json(request, settings.max_body_bytes), tokenizer, settings.model_id)
        return {"count": len(tokens), "max_model_len": limits.context_length, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        ids = parse_detokenize(await read_json(request, settings.max_body_bytes), settings.model_id,
                               limits.vocab_size)
        return {"prompt": tokenizer.decode(ids)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrived = time.perf_counter()
        req = parse_completion(await read_json(request, settings.max_body_bytes), tokenizer, limits,
                               settings.model_id)
        prompt_entries = await _prompt_logprobs(engine, req) if req.echo and req.logprobs is not None else None
        return await _answer(request, engine, req, CompletionFormat(req), metrics, "/v1/completions", arrived,
                             prompt_entries)

    return app


async def _answer(request: Request, engine: Engine, req: CompletionRequest, fmt: CompletionFormat,
                  metrics: ServerMetrics, endpoint: str, arrived: float, prompt_entries: list | None = None) -> Response:
    """Run a checked request's rows on the engine and answer in ``fmt``'s shapes: streamed (server-sent
    events) or whole. Completions and chat share it; they differ in what they check and how they write."""
    ticket, events = _submit(engine, req, _first_token_timer(metrics, endpoint, arrived))
    choices = [Choice(i, engine.token_bytes) for i in range(len(ticket.rows))]
    for choice in choices:
        p = req.prompt_of(choice.index)
        choice.start(req.prompt_texts[p], req.echo, prompt_entries[p] if prompt_entries is not None else None)
    if req.stream:
        return StreamingResponse(_stream(req, fmt, choices, events, ticket,
                                         on_end=lambda: _count_usage(metrics, req, choices)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collected = await _collect(request, choices, events, ticket)
    _count_usage(metrics, req, choices)
    if not collected:
        return Response(status_code=499)  # the client went away; nobody reads this
    failed = next((c.error for c in choices if c.error), None)
    if failed:
        raise ApiError(503 if "shutting down" in failed else 500, failed, type="server_error")
    return JSONResponse(fmt.response(choices))


def _first_token_timer(metrics: ServerMetrics, endpoint: str, arrived: float) -> Callable[[], None]:
    """A callback for the request's first generated token: observes its time to first token, once."""
    seen = []

    def first_token() -> None:
        if not seen:
            seen.append(True)
            metrics.ttft.observe(time.perf_counter() - arrived, endpoint=endpoint)

    return first_token


def _count_usage(metrics: ServerMetrics, req: CompletionRequest, choices: list[Choice]) -> None:
    """Add a request's tokens (its usage: the prompts once, every choice's generated ids) to the counters."""
    metrics.count_usage(sum(len(p) for p in req.prompts), sum(len(c.token_ids) for c in choices))


def _submit(engine: Engine, req: CompletionRequest,
            first_token: Callable[[], None] | None = None) -> tuple[Ticket, "asyncio.Queue[RowEvent]"]:
    """Queue the request's rows; their events arrive on the returned asyncio queue (503 when full).
    ``first_token`` is called (in the engine's thread) when any of its rows has produced a token."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[RowEvent] = asyncio.Queue()

    def sink(event: RowEvent) -> None:  # called in the engine's thread
        if first_token is not None and event.token_id is not None:
            first_token()
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    try:
        return engine.submit(req.rows(), sink), events
    except QueueFull:
        raise overloaded(f"the server is busy ({engine.max_batch} rows running, the queue is full); "
                         f"retry after {RETRY_AFTER_S} s") from None
    except EngineClosed as exc:
        raise overloaded(str(exc)) from None


async def _collect(request: Request, choices: list[Choice], events: "asyncio.Queue[RowEvent]", ticket: Ticket) -> bool:
    """Gather every row's events into ``choices``; False when the client went away first (its rows are freed)."""
    try:
        open_rows = len(choices)
        while open_rows:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return False
                continue
            choices[event.row].add(event)
            if event.finish_reason is not None:
                open_rows -= 1
        return True
    finally:
        ticket.cancel()  # frees what still runs; nothing once every row has finished


async def _prompt_logprobs(engine: Engine, req: CompletionRequest) -> list:
    try:
        futures = [engine.prompt_logprobs(p, req.logprobs) for p in req.prompts]
    except QueueFull:
        raise overloaded("the server is busy; retry later") from None
    except EngineClosed as exc:
        raise overloaded(str(exc)) from None
    return [await asyncio.wrap_future(f) for f in futures]


async def _stream(req: CompletionRequest, fmt: CompletionFormat, choices: list[Choice],
                  events: "asyncio.Queue[RowEvent]", ticket: Ticket,
                  on_end: Callable[[], None] | None = None) -> AsyncIterator[str]:
    """Server-sent events: ``fmt``'s opening chunks, its chunks for each event as it arrives (finish_reason
    on each choice's last), usage with stream_options.include_usage, then ``data: [DONE]``."""
    try:
        for chunk in fmt.opening(choices):
            yield _sse(chunk)
        open_rows = len(choices)
        while open_rows:
            event = await events.get()
            choice = choices[event.row]
            before = len(choice.entries)
            choice.add(event)
            if choice.error:
                yield _sse(ApiError(500, choice.error, type="server_error").body())
                break
            if event.finish_reason is not None:
                open_rows -= 1
            for chunk in fmt.chunks(choice, event, before):
                yield _sse(chunk)
        else:
            if req.include_usage:
                yield _sse(fmt.usage_chunk(choices))
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # a client that went away frees its rows at the next step
        if on_end is not None:
            on_end()


class _Server(uvicorn.Server):
    """uvicorn's server; on SIGINT/SIGTERM the engine also stops taking work (running rows finish)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, on_ready: Callable[[str], None]):
        super().__init__(config)
        self.engine = engine
        self.on_ready = on_ready

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down, which kills the process before the
        # command can say it stopped; the shutdown was clean, so the exit is 0.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            self.on_ready(f"http://{shown}:{port}")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run_server(runtime: "Runtime", settings: ServeSettings, sock: socket.socket, *,
               on_ready: Callable[[str], None]) -> None:
    """Serve on ``sock`` until SIGINT/SIGTERM; then take no new work, let running requests end, and return.

    ``on_ready`` gets the base URL once the server accepts connections (with port 0, the port the system chose).
    """
    engine = Engine(runtime, max_batch=settings.max_batch, max_queue=settings.max_queue).start()
    try:
        app = create_app(engine, runtime, settings)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="warning", access_log=False, lifespan="off",
            # Bounded: connections beyond these get uvicorn's 503; a stream outlives shutdown by at most this.
            limit_concurrency=settings.max_queue + settings.max_batch + 64,
            timeout_graceful_shutdown=settings.graceful_shutdown_s, timeout_keep_alive=5,
        )
        _Server(config, engine, on_ready).run(sockets=[sock])
    finally:
        engine.close(timeout=10)
        sock.close()
