"""`python -m gptoss_jax.serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) with
continuous batching.

Endpoints: POST /v1/chat/completions and /v1/responses (streamed as server-sent events with
`"stream": true`), GET /v1/models, /health and /metrics (Prometheus text). `create_app(model,
...)` builds the app for any loaded model; one engine thread runs the model's
`ContinuousBatch`: it admits queued requests into free slots between decode chunks, decodes,
and hands each request's new tokens to the request's handler, which parses them as harmony
(`gptoss_jax.openai_api`) and answers or streams. A client that disconnects cancels its request
and frees its slot; a full queue answers 429.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import hmac
import json
import logging
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

from gptoss_jax.cli import COMPILATION_CACHE_NOTE, add_model_arguments, cli, load_model
from gptoss_jax.engine import DEFAULT_CHUNK, ContinuousBatch, Generation
from gptoss_jax.model import GptOss
from gptoss_jax.openai_api import (
    APIError,
    ChatChunks,
    ChatCompletionRequest,
    HarmonyOutput,
    Prompt,
    ResponseEvents,
    ResponsesRequest,
    Usage,
    chat_completion,
    chat_prompt,
    invalid,
    new_id,
    response,
    responses_prompt,
)

try:
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.exceptions import HTTPException
except ImportError as error:  # the serve extra is not installed
    raise ImportError(f"the server needs FastAPI, uvicorn and prometheus-client ({error}); "
                      "install them with: pip install 'gptoss-jax[serve]'") from None

log = logging.getLogger("gptoss_jax.serve")

DEFAULT_SLOTS = 16
DEFAULT_MAX_CONTEXT = 8192
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_BODY_BYTES = 8 << 20
TOKENS_PER_SECOND_WINDOW = 10.0


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self, slots: int):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("gptoss_queue_depth", "Requests waiting for a batch slot", registry=r)
        Gauge("gptoss_batch_slots", "Slots (rows) of the decode batch", registry=r).set(slots)
        self.occupied = Gauge("gptoss_batch_occupied_slots", "Slots in the decode chunk dispatched last", registry=r)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, slots} & set(range(1, slots + 1)))
        self.occupancy = Histogram("gptoss_batch_occupancy", "Occupied slots per decode chunk", buckets=buckets,
                                   registry=r)
        self.requests = Counter("gptoss_requests", "Finished requests by endpoint and finish reason",
                                ["endpoint", "finish_reason"], registry=r)
        self.rejected = Counter("gptoss_rejected_requests", "Requests refused before generating, by HTTP status",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("gptoss_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("gptoss_generation_tokens", "Tokens generated", registry=r)
        self.recent: collections.deque = collections.deque()  # (time, tokens) of the last window
        self.lock = threading.Lock()
        Gauge("gptoss_generation_tokens_per_second", f"Tokens generated per second over the last "
              f"{TOKENS_PER_SECOND_WINDOW:g} s", registry=r).set_function(self.tokens_per_second)
        latency = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
        self.ttft = Histogram("gptoss_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=latency, registry=r)
        self.inter_token = Histogram("gptoss_inter_token_latency_seconds", "Between a request's tokens",
                                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
                                     registry=r)
        self.duration = Histogram("gptoss_request_duration_seconds", "From a request's arrival to its last token",
                                  buckets=latency + (120, 300), registry=r)

    def generated(self, tokens: int) -> None:
        now = time.monotonic()
        self.generation_tokens.inc(tokens)
        with self.lock:
            self.recent.append((now, tokens))
            self._forget(now)

    def tokens_per_second(self) -> float:
        with self.lock:
            self._forget(time.monotonic())
            return sum(n for _, n in self.recent) / TOKENS_PER_SECOND_WINDOW

    def _forget(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - TOKENS_PER_SECOND_WINDOW:
            self.recent.popleft()


# ----------------------------------------------------------------------------------------
# The engine thread
# ----------------------------------------------------------------------------------------


class Job:
    """A request's generation and the queue its handler reads the engine's updates from:
    (new tokens, finish reason or None, error message or None)."""

    def __init__(self, generation: Generation, loop: asyncio.AbstractEventLoop):
        self.generation, self.loop = generation, loop
        self.updates: asyncio.Queue = asyncio.Queue()
        self.arrived = self.last_token_at = time.monotonic()
        self.first_token_at: float | None = None
        self.received: list[int] = []  # the tokens its handler has read

    def deliver(self, tokens: list[int], finish_reason: str | None, error: str | None = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, (tokens, finish_reason, error))
        except RuntimeError:  # the event loop is closed: nobody is waiting
            pass


class Scheduler:
    """Runs a ContinuousBatch on a thread of its own: admits waiting jobs into free slots
    between decode chunks, applies cancellations, decodes, and delivers tokens."""

    def __init__(self, batch: ContinuousBatch, max_queue: int, metrics: Metrics):
        self.batch, self.max_queue, self.metrics = batch, max_queue, metrics
        self.cond = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.cancelled: list[Job] = []
        self.running: dict[Generation, Job] = {}
        self.stopping = False
        self.failure: str | None = None
        self.thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.failure is not None:
                raise APIError(503, f"the engine failed ({self.failure}); restart the server",
                               type="server_error", code="engine_failed")
            if self.stopping:
                raise APIError(503, "the server is shutting down", type="server_error")
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue); "
                                    "retry later", type="rate_limit_error", code="queue_full")
            self.waiting.append(job)
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """Drops a waiting job, or stops a running one and frees its slot (from any thread)."""
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                self.metrics.queue_depth.set(len(self.waiting))
            else:
                self.cancelled.append(job)
                self.cond.notify()

    @property
    def healthy(self) -> bool:
        return self.failure is None and self.thread.is_alive()

    def _run(self) -> None:
        try:
            while self._round():
                pass
        except Exception as error:  # a failed device call: the batch's state is lost
            log.exception("the engine failed")
            with self.cond:
                self.failure = f"{type(error).__name__}: {error}"
                jobs = list(self.running.values()) + list(self.waiting)
                self.waiting.clear()
            for job in jobs:
                job.deliver([], None, self.failure)

    def _round(self) -> bool:
        batch = self.batch
        with self.cond:
            while not (self.stopping or self.waiting or self.cancelled or batch.busy):
                self.cond.wait()
            if self.stopping:
                return False
            cancelled, self.cancelled = self.cancelled, []
        for job in cancelled:
            batch.cancel(job.generation)
            self.running.pop(job.generation, None)
        with self.cond:
            admitted = [self.waiting.popleft() for _ in range(min(batch.free_slots, len(self.waiting)))]
            self.metrics.queue_depth.set(len(self.waiting))
        valid = []
        for job in admitted:
            try:
                batch.check(job.generation)
            except ValueError as error:  # checked by the handler already; reported all the same
                job.deliver([], None, str(error))
                continue
            valid.append(job)
        if valid:  # prefilled together: one program for every prompt admitted in this round
            batch.add_many([job.generation for job in valid])
        for job in valid:
            self.metrics.prompt_tokens.inc(len(job.generation.prompt))
            if job.generation.finish_reason is not None:
                job.deliver([], job.generation.finish_reason)
            else:
                self.running[job.generation] = job
        results = batch.step()
        if batch.occupancy:
            self.metrics.occupancy.observe(batch.occupancy)
        self.metrics.occupied.set(batch.occupancy)
        now = time.monotonic()
        for generation, tokens in results:
            job = self.running.get(generation)
            if job is None:
                continue
            if tokens:
                self.metrics.generated(len(tokens))
                if job.first_token_at is None:
                    job.first_token_at = now
                    self.metrics.ttft.observe(now - job.arrived)
                else:  # the gap since the last delivery, shared by the tokens this one brought
                    for _ in tokens:
                        self.metrics.inter_token.observe((now - job.last_token_at) / len(tokens))
                job.last_token_at = now
            if generation.finish_reason is not None:
                del self.running[generation]
                self.metrics.duration.observe(now - job.arrived)
            job.deliver(tokens, generation.finish_reason)
        return True


# ----------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------


class ClientGone(Exception):
    pass


class BodyTooLarge(HTTPException):
    def __init__(self):
        super().__init__(413)


class BodyLimit:
    """ASGI middleware refusing request bodies over `limit` bytes (413, as an OpenAI error)
    without reading more than that: at once by Content-Length, else as the bytes arrive."""

    def __init__(self, app, limit: int, refuse):
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse()(scope, receive, send)
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        await self.app(scope, receive_limited, send)


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def updates(job: Job, request: Request):
    """The engine's updates for `job` until it finishes; ClientGone when the client hangs up
    first, APIError when the engine failed."""
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        while True:
            update = asyncio.ensure_future(job.updates.get())
            await asyncio.wait({update, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not update.done():
                update.cancel()
                raise ClientGone
            tokens, finish_reason, error = update.result()
            if error is not None:
                raise APIError(503, f"the request failed in the engine: {error}", type="server_error")
            yield tokens, finish_reason
            if finish_reason is not None:
                return
    finally:
        gone.cancel()


def sse(data: dict, event: str | None = None) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n" if event else f"data: {text}\n\n"


UNION_LABELS = ("body", "str", "int", "float", "bool", "none")


def field_path(location) -> list:
    """Pydantic's error location without "body" and the labels of union members (types such as
    'str' or 'list[...]', model names, the tags of tagged unions)."""
    path, tagged, skip_tag = [], False, False
    for part in location:
        if isinstance(part, int):
            path.append(part)
            skip_tag = tagged
        elif skip_tag:
            skip_tag = tagged = False
        elif "tagged-union[" in part:
            tagged = True
        elif part not in UNION_LABELS and not any(c in part for c in "[]'(),") and not part[:1].isupper():
            path.append(part)
    return path


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """One line for the most specific problem pydantic found: where, what, how to fix."""
    first = max(error.errors(), key=lambda e: len(field_path(e.get("loc", ()))))
    path = field_path(first.get("loc", ()))
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if kind == "extra_forbidden":
        return (f"unknown field '{param}'; this server refuses fields it does not know "
                "(see docs/serving.md for the fields it takes)"), param
    if kind == "missing":
        return f"'{param}' is required", param
    if param is None:
        return f"the request body must be a JSON object: {first.get('msg')}", None
    return f"{param}: {first.get('msg')} (got {json.dumps(first.get('input'), default=str)[:200]})", param


def create_app(model: GptOss, *, model_name: str = "tiny", slots: int = DEFAULT_SLOTS,
               max_context: int = DEFAULT_MAX_CONTEXT, max_queue: int = DEFAULT_MAX_QUEUE, chunk: int = DEFAULT_CHUNK,
               api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               current_date: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` as `model_name`. `slots`: rows of the decode batch
    (requests decoded together); `max_context`: prompt plus completion tokens per request
    (the size of each slot's cache); `max_queue`: requests waiting for a slot before new ones
    get 429; `api_key`: required as a bearer token on /v1 (None: none); `current_date`: the
    date the system message states (None: today's)."""
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    positions = model.config.initial_context_length * model.config.rope_scaling_factor
    if not 2 <= max_context <= positions:
        raise ValueError(f"max_context must be in [2, {positions:g}] (the model's context), got {max_context}")
    batch = ContinuousBatch(model, slots=slots, max_len=max_context, chunk=chunk)
    metrics = Metrics(slots)
    scheduler = Scheduler(batch, max_queue, metrics)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gptoss-jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def error_response(error: APIError) -> JSONResponse:
        metrics.rejected.labels(str(error.status)).inc()
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        message, param = validation_message(error)
        return error_response(invalid(message, param))

    def messages_by_status(status: int, request: Request | None = None) -> str | None:
        if status == 413:
            return f"the request body is larger than {max_body_bytes} bytes (--max-body-bytes)"
        if status == 404:
            return f"no endpoint {request.method} {request.url.path}"
        if status == 405:
            return f"{request.method} is not allowed on {request.url.path}"
        return None

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = messages_by_status(error.status_code, request) or str(error.detail)
        return error_response(APIError(error.status_code, message))

    app.add_middleware(BodyLimit, limit=max_body_bytes,
                       refuse=lambda: error_response(APIError(413, messages_by_status(413))))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {type(error).__name__}", type="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the "
                                "server was started with (--api-key)", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def start(prompt: Prompt, max_tokens: int | None, *, temperature, top_p, top_k, seed) -> Job:
        length = len(prompt.tokens)
        if length >= max_context:
            raise APIError(400, f"the prompt is {length} tokens; this server's context is {max_context} tokens "
                                "(--max-context): shorten the messages", param="messages",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = max_context - length
        elif length + max_tokens > max_context:
            raise APIError(400, f"this server's context is {max_context} tokens (--max-context), but {length + max_tokens} "
                                f"were requested ({length} in the prompt, {max_tokens} to generate): lower the "
                                "maximum tokens or shorten the messages", param="max_tokens",
                           code="context_length_exceeded")
        generation = Generation(prompt.tokens, max_tokens, temperature=1.0 if temperature is None else temperature,
                                top_p=1.0 if top_p is None else top_p, top_k=top_k or 0,
                                seed=secrets.randbits(32) if seed is None else seed)
        job = Job(generation, asyncio.get_running_loop())
        scheduler.submit(job)
        return job

    def date() -> str:
        return current_date or datetime.date.today().isoformat()

    def finished(endpoint: str, output: HarmonyOutput) -> None:
        metrics.requests.labels(endpoint, output.finish_reason).inc()
        if output.error is not None:
            log.warning("a completion broke the harmony format: %s", output.error)


    async def follow(endpoint: str, job: Job, request: Request, output: HarmonyOutput):
        """Yields the events (and the tokens) of each batch of the job's tokens as `output`
        reads them, then the events that finish `output`. Stops the job once `output` needs no
        more tokens (a stop string, a broken format), or when the client hangs up (ClientGone,
        or the response's task cancelled)."""
        reason, hung_up = None, True
        try:
            async with contextlib.aclosing(updates(job, request)) as stream:
                async for tokens, finish_reason in stream:
                    reason = finish_reason
                    job.received.extend(tokens)
                    yield output.feed(tokens), tokens
                    if output.done:
                        break
            hung_up = False
        except APIError:
            hung_up = False
            raise
        finally:
            if reason is None:  # the engine is still generating for it
                scheduler.cancel(job)
            if hung_up:
                metrics.requests.labels(endpoint, "cancelled").inc()
        yield output.finish(reason or "stop"), []

    def usage(job: Job, prompt: Prompt, output: HarmonyOutput) -> Usage:
        return Usage(len(prompt.tokens), len(job.received), output.reasoning_tokens)

    @app.get("/health")
    async def health():
        if not scheduler.healthy:
            return JSONResponse({"status": "failed", "error": scheduler.failure}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    model_card = {"id": model_name, "object": "model", "created": started, "owned_by": "gptoss-jax",
                  "max_model_len": max_context}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def one_model(name: str):
        check_model(name)
        return model_card

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        prompt = chat_prompt(body, date())
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > 4 or any(not stop for stop in stops):
            raise invalid("stop takes at most 4 non-empty strings", "stop")
        job = start(prompt, body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
                    top_p=body.top_p, top_k=body.top_k, seed=body.seed)
        output = HarmonyOutput(prompt.prefix, stops)
        id, created = new_id("chatcmpl"), int(time.time())

        if not body.stream:
            try:
                async for _ in follow("chat", job, request, output):
                    pass
            except ClientGone:
                return Response(status_code=499)  # nobody reads it
            finished("chat", output)
            ids = dict(prompt_token_ids=prompt.tokens, token_ids=job.received) if body.return_token_ids else {}
            return chat_completion(id=id, created=created, model=model_name, output=output,
                                   usage=usage(job, prompt, output), **ids)

        options = body.stream_options or None
        chunks = ChatChunks(id=id, created=created, model=model_name, return_token_ids=body.return_token_ids,
                            include_usage=bool(options and options.include_usage))

        async def stream():
            yield sse(chunks.first(prompt.tokens))
            try:
                async for events, tokens in follow("chat", job, request, output):
                    for chunk in chunks.deltas(events, tokens):
                        yield sse(chunk)
            except ClientGone:
                return
            except APIError as error:
                yield sse(error.body())
                return
            finished("chat", output)
            for chunk in chunks.last(output.finish_reason, usage(job, prompt, output)):
                yield sse(chunk)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/responses", dependencies=[Depends(authorize)])
    async def responses(body: ResponsesRequest, request: Request):
        check_model(body.model)
        prompt = responses_prompt(body, date())
        job = start(prompt, body.max_output_tokens, temperature=body.temperature, top_p=body.top_p, top_k=0, seed=None)
        output = HarmonyOutput(prompt.prefix)
        fields = dict(id=new_id("resp"), created_at=int(time.time()), model=model_name, request=body)

        if not body.stream:
            try:
                async for _ in follow("responses", job, request, output):
                    pass
            except ClientGone:
                return Response(status_code=499)
            finished("responses", output)
            return response(output=output, usage=usage(job, prompt, output), **fields)

        events = ResponseEvents(**fields)

        async def stream():
            for event in events.first():
                yield sse(event, event["type"])
            try:
                async for harmony_events, _ in follow("responses", job, request, output):
                    for event in events.events(harmony_events):
                        yield sse(event, event["type"])
            except ClientGone:
                return
            except APIError as error:
                yield sse(events.event("error", message=error.message, code=error.code, param=None), "error")
                return
            finished("responses", output)
            last = events.last(output, usage(job, prompt, output))
            yield sse(last, last["type"])

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss_jax.serve",
        description="Serve gpt-oss over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/responses, "
                    "/v1/models, /health, /metrics) with continuous batching.",
        epilog=COMPILATION_CACHE_NOTE)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name clients ask for (default: the --checkpoint as given, or 'builtin')")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: no key)")
    parser.add_argument("--slots", type=int, default=DEFAULT_SLOTS,
                        help=f"requests decoded together, each with its own cache rows (default {DEFAULT_SLOTS})")
    parser.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT,
                        help=f"prompt plus completion tokens per request; sizes every slot's cache "
                             f"(default {DEFAULT_MAX_CONTEXT})")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"requests waiting for a slot before new ones get 429 (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                        help=f"tokens decoded per device call; requests join and leave between chunks "
                             f"(default {DEFAULT_CHUNK})")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--current-date", metavar="YYYY-MM-DD",
                        help="the date the system message states (default: today's)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.checkpoint is None:
        return "builtin"
    return args.checkpoint if not Path(args.checkpoint).exists() else Path(args.checkpoint).resolve().name


def run(args) -> int:
    if args.current_date is not None:
        try:
            datetime.date.fromisoformat(args.current_date)
        except ValueError:
            raise ValueError(f"--current-date must be a date as YYYY-MM-DD, got {args.current_date!r}") from None
    for flag, least in (("slots", 1), ("chunk", 1), ("max_body_bytes", 1), ("max_context", 2), ("max_queue", 0)):
        if getattr(args, flag) < least:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    # Bind first: a port in use is one error line, before the model loads.
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as error:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    model = load_model(args)
    app = create_app(model, model_name=served_name(args), slots=args.slots, max_context=args.max_context,
                     max_queue=args.max_queue, chunk=args.chunk, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes, current_date=args.current_date)
    host, port = sock.getsockname()[:2]
    print(f"serving '{served_name(args)}' on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then raises the signal again
        pass
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.coordinator or args.num_processes or args.process_id is not None or args.distributed:
        print("error: the server runs in one process; serve a mesh of this host's devices with --mesh",
              file=sys.stderr)
        return 2
    return cli(run, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
