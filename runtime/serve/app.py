"""The OpenAI-compatible HTTP API over one :class:`~qcn.runtime.serve.scheduler.Scheduler`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus). Streaming responses are server-sent events,
one ``data: {json}`` per chunk, ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from ..errors import QcnError
from ..generate import Generator, load
from ..sampling import SamplingParams
from .chat_template import ChatTemplate, ChatTemplateError
from .config import ServeConfig
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from .scheduler import Event, QueueFullError, Request, Scheduler
from .tool_parser import ParseDelta, Qwen3CoderToolParser, collect

__all__ = ["Server", "create_app"]

log = logging.getLogger(__name__)

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_TERMINAL = ("done", "cancelled", "error")
_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class Server:
    """The model loaded once, its scheduler, metrics and chat template."""

    def __init__(self, config: ServeConfig, generator: Generator | None = None):
        self.config = config
        self.generator = generator or load(
            config.artifact, threads=config.threads, verify_hashes=config.verify_hashes, max_batch=config.max_batch, max_context=config.max_context
        )
        self.manifest = self.generator.manifest
        self.tokenizer = self.generator.tokenizer
        self.session = self.generator.session
        self.template = ChatTemplate.from_artifact(self.manifest.artifact_dir)
        self.metrics = Metrics()
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes > 0 else None
        self.scheduler = Scheduler(self.session, self.tokenizer, queue_size=config.queue_size, metrics=self.metrics, prefix_cache=self.prefix_cache)
        self.model_name = config.served_name
        self.created = int(time.time())

    def close(self) -> None:
        self.scheduler.stop()
        self.generator.close()

    # -- request checks ----------------------------------------------------------------
    def authorize(self, request: HTTPRequest) -> None:
        key = self.config.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key the server was started with", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r} (see /v1/models)", param="model", code="model_not_found")

    def params(self, req, n_prompt: int, prompt_field: str) -> SamplingParams:
        room = self.session.max_context - n_prompt
        if room < 1:
            raise APIError(400, f"{prompt_field}: the prompt has {n_prompt} tokens; the model's context is {self.session.max_context} tokens", param=prompt_field, code="context_length_exceeded")
        max_new = req.max_new_tokens
        if max_new is not None and max_new > room:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
            raise APIError(
                400,
                f"{name}: {n_prompt} prompt tokens + {max_new} = {n_prompt + max_new} exceeds the model's context of {self.session.max_context} tokens (at most {room})",
                param=name, code="context_length_exceeded",
            )
        top_k = req.top_k
        if top_k == -1:
            top_k = 0
        return SamplingParams.from_manifest(
            self.manifest, temperature=req.temperature, top_p=req.top_p, top_k=top_k, seed=req.seed, max_new_tokens=max_new or room, stop=req.stops
        )

    def submit(self, ids: list[int], params: SamplingParams, ignore_eos: bool) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(ev: Event) -> None:  # scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, ev)

        req = Request(ids, params, sink, ignore_eos=ignore_eos)
        try:
            self.scheduler.submit(req)
        except QueueFullError as e:
            raise APIError(429, str(e), code="queue_full") from None
        return req, queue

    def usage(self, req: Request) -> dict:
        return {
            "prompt_tokens": req.prompt_tokens,
            "completion_tokens": req.completion_tokens,
            "total_tokens": req.prompt_tokens + req.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
        }


async def _json_body(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _validate(model, body: dict):
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    req.check()
    return req


async def _events(queue: asyncio.Queue, request: HTTPRequest | None) -> AsyncIterator[Event]:
    """The request's events up to and including the terminal one. With ``request`` (non-streaming),
    a client that went away ends the iteration (the caller cancels)."""
    while True:
        if request is None:
            ev = await queue.get()
        else:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
        yield ev
        if ev.kind in _TERMINAL:
            return


async def _final_event(server: Server, job: Request, queue: asyncio.Queue, request: HTTPRequest) -> Event | None:
    """A non-streaming request's terminal event: its "done" event, or None when the client went
    away (or the server is stopping); an "error" event becomes HTTP 500. The job is cancelled in
    every case, so its slot is free when this returns."""
    try:
        final = None
        async for ev in _events(queue, request):
            final = ev
    finally:
        server.scheduler.cancel(job)
    if final is not None and final.kind == "error":
        raise APIError(500, final.text)
    return final if final is not None and final.kind == "done" else None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


_DONE = "data: [DONE]\n\n"


def _finish_reason(reason: str | None, parser: Qwen3CoderToolParser | None) -> str:
    r = _FINISH.get(reason or "length", "stop")
    if parser is not None and parser.called and r != "length":
        return "tool_calls"
    return r


def _tool_call_json(tc) -> dict:
    d: dict = {"index": tc.index}
    if tc.id is not None:
        d.update(id=tc.id, type="function", function={"name": tc.name, "arguments": tc.arguments})
    else:
        d["function"] = {"arguments": tc.arguments}
    return d


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.stop()

    app = FastAPI(title="qcn-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(QcnError)
    async def _qcn_error(_request, e: QcnError):  # a runtime check that the request tripped
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.get("/health")
    async def health():
        sch = server.scheduler
        return {"status": "ok", "model": server.model_name, "running": sch.running, "waiting": sch.queue_depth, "background": sch.background,
                "kept_states": len(server.prefix_cache) if server.prefix_cache is not None else 0}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        server.authorize(request)
        return {
            "object": "list",
            "data": [{"id": server.model_name, "object": "model", "created": server.created, "owned_by": "qcn", "max_model_len": server.session.max_context}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        server.authorize(request)
        req = _validate(ChatCompletionRequest, await _json_body(request))
        server.check_model(req.model)
        if server.template is None:
            raise APIError(400, "this model's artifact has no chat_template (tokenizer_config.json); use /v1/completions with a raw prompt", param="messages")
        tools = req.tool_dicts
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            prompt = server.template.render(messages, tools)
        except ChatTemplateError as e:
            raise APIError(400, f"{e.param}: {e}" if e.param else str(e), param=e.param) from None
        ids = server.tokenizer.encode(prompt)
        params = server.params(req, len(ids), "messages")
        job, queue = server.submit(ids, params, req.ignore_eos)
        parser = Qwen3CoderToolParser(tools) if tools else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": server.model_name}
        if req.stream:
            return StreamingResponse(_chat_stream(server, job, queue, parser, head, req.include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        final = await _final_event(server, job, queue, request)
        if final is None:  # the client went away (or the server is stopping)
            return Response(status_code=499)
        if parser is not None:
            msg = collect([parser.feed(final.text), parser.finish()])
            message = {"role": "assistant", "content": msg.content or None}
            if msg.tool_calls:
                message["tool_calls"] = msg.tool_calls
        else:
            message = {"role": "assistant", "content": final.text}
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(final.finish_reason, parser)}],
            "usage": server.usage(job),
        }

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        server.authorize(request)
        req = _validate(CompletionRequest, await _json_body(request))
        server.check_model(req.model)
        if isinstance(req.prompt, str):
            ids = server.tokenizer.encode(req.prompt)
            if not ids:
                raise APIError(400, "prompt: encodes to 0 tokens", param="prompt")
        else:
            ids = list(req.prompt)
            bad = [t for t in ids if not 0 <= t < server.manifest.model.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary 0..{server.manifest.model.vocab_size - 1}", param="prompt")
        params = server.params(req, len(ids), "prompt")
        job, queue = server.submit(ids, params, req.ignore_eos)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
        if req.stream:
            return StreamingResponse(_completion_stream(server, job, queue, head, req.include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        final = await _final_event(server, job, queue, request)
        if final is None:  # the client went away (or the server is stopping)
            return Response(status_code=499)
        return {
            **head,
            "choices": [{"index": 0, "text": final.text, "logprobs": None, "finish_reason": _finish_reason(final.finish_reason, None)}],
            "usage": server.usage(job),
        }

    return app


async def _chat_stream(server: Server, job: Request, queue: asyncio.Queue, parser, head: dict, include_usage: bool) -> AsyncIterator[str]:
    base = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    def pieces(d: ParseDelta):
        if d.content:
            yield chunk({"content": d.content})
        for tc in d.tool_calls:
            yield chunk({"tool_calls": [_tool_call_json(tc)]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in _events(queue, None):
            if ev.kind == "delta":
                for s in pieces(parser.feed(ev.text) if parser is not None else ParseDelta(content=ev.text)):
                    yield s
            elif ev.kind == "done":
                if parser is not None:
                    for s in pieces(parser.finish()):
                        yield s
                yield chunk({}, _finish_reason(ev.finish_reason, parser))
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": server.usage(job)})
                yield _DONE
            elif ev.kind == "error":
                yield _sse(APIError(500, ev.text).body())
                yield _DONE
    finally:
        server.scheduler.cancel(job)


async def _completion_stream(server: Server, job: Request, queue: asyncio.Queue, head: dict, include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra})

    try:
        async for ev in _events(queue, None):
            if ev.kind == "delta":
                yield chunk(ev.text)
            elif ev.kind == "done":
                yield chunk("", _finish_reason(ev.finish_reason, None))
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": server.usage(job)})
                yield _DONE
            elif ev.kind == "error":
                yield _sse(APIError(500, ev.text).body())
                yield _DONE
    finally:
        server.scheduler.cancel(job)
