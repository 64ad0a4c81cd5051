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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptcli.serving.completions import (
    ApiError,
    Choice,
    CompletionRequest,
    Limits,
    bad,
    completion_response,
    new_completion_id,
    now,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
    stream_chunk,
    usage_chunk,
)
from gptcli.serving.engine import Engine, EngineClosed, QueueFull, RowEvent, Ticket
from gptcli.errors import UserError
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
    """The FastAPI app: /health, /v1/models, /v1/completions, /v1/chat/completions (refused), /tokenize, /detokenize."""
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

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(playground_html(), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.load()}

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": settings.created, "owned_by": "gptcli",
                "max_model_len": limits.context_length}

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
    async def chat(_request: Request) -> Response:
        raise ApiError(400, "GPT-2 has no chat format, so this server has no chat endpoint: send the text to continue "
                       "to POST /v1/completions (OpenAI's client: client.completions.create(model=..., prompt=...))",
                       code="unsupported_endpoint")

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
        req = parse_completion(await read_json(request, settings.max_body_bytes), tokenizer, limits,
                               settings.model_id)
        prompt_entries = await _prompt_logprobs(engine, req) if req.echo and req.logprobs is not None else None
        ticket, events = _submit(engine, req)
        choices = [Choice(i, tokenizer.token_bytes) for i in range(len(ticket.rows))]
        for choice in choices:
            p = req.prompt_of(choice.index)
            choice.start(req.prompt_texts[p], req.echo, prompt_entries[p] if prompt_entries is not None else None)
        completion_id, created = new_completion_id(), now()
        if req.stream:
            return StreamingResponse(_stream(req, choices, events, ticket, completion_id, created),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if not await _collect(request, choices, events, ticket):
            return Response(status_code=499)  # the client went away; nobody reads this
        failed = next((c.error for c in choices if c.error), None)
        if failed:
            raise ApiError(503 if "shutting down" in failed else 500, failed, type="server_error")
        return JSONResponse(completion_response(req, choices, completion_id, created))

    return app


def _submit(engine: Engine, req: CompletionRequest) -> tuple[Ticket, "asyncio.Queue[RowEvent]"]:
    """Queue the request's rows; their events arrive on the returned asyncio queue (503 when full)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[RowEvent] = asyncio.Queue()

    def sink(event: RowEvent) -> None:  # called in the engine's thread
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


async def _stream(req: CompletionRequest, choices: list[Choice], events: "asyncio.Queue[RowEvent]", ticket: Ticket,
                  completion_id: str, created: int) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text (per token with logprobs), finish_reason on each
    choice's last, usage with stream_options.include_usage, then ``data: [DONE]``."""
    with_logprobs = req.logprobs is not None
    try:
        if req.echo:
            for choice in choices:
                logprobs = choice.logprobs_object(choice.entries, choice.offsets) if with_logprobs else None
                yield _sse(stream_chunk(req, completion_id, created, choice.index, choice.text, logprobs, None))
        open_rows = len(choices)
        while open_rows:
            event = await events.get()
            choice = choices[event.row]
            before = len(choice.entries)
            choice.add(event)
            if choice.error:
                yield _sse(ApiError(500, choice.error, type="server_error").body())
                break
            logprobs = None
            if with_logprobs and len(choice.entries) > before:
                logprobs = choice.logprobs_object(choice.entries[before:], choice.offsets[before:])
            if event.finish_reason is not None:
                open_rows -= 1
            if event.text or logprobs is not None or event.finish_reason is not None or req.return_token_ids:
                ids = ([event.token_id] if event.token_id is not None else []) if req.return_token_ids else None
                yield _sse(stream_chunk(req, completion_id, created, choice.index, event.text, logprobs,
                                        choice.finish_reason if event.finish_reason is not None else None, ids))
        else:
            if req.include_usage:
                yield _sse(usage_chunk(req, choices, completion_id, created))
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # a client that went away frees its rows at the next step


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
