"""The HTTP skin: OpenAI-compatible routes over one engine loop (FastAPI).

The engine never sees HTTP: a handler validates the body, tokenizes, checks that the request can
ever fit the pool, posts it to the loop and turns the loop's events into a JSON response or a
stream of server-sent events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LoadedModel
from ..engine import Engine
from ..paged.cache import PagedConfig
from ..sampling import SamplingParams
from . import protocol as P
from .loop import EngineLoop, Submission
from .metrics import ServerMetrics

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # at most; less when the context or the pool allows less


@dataclass(slots=True)
class ServeConfig:
    """Settings of one server. ``kv_memory_bytes`` sizes the page pool (None: the engine's
    default); ``max_waiting`` sequences may wait beyond the ``max_seqs`` running ones before the
    server answers 503; ``max_body_bytes`` bounds a request body; ``defer_budget``: deferred
    eviction (``PagedConfig.defer_budget``, tokens per layer and KV head; 0: DMS's minimum)."""

    model_name: str
    max_seqs: int = 16
    kv_memory_bytes: int | None = None
    page_size: int = 16
    max_model_len: int | None = None
    prefill_chunk: int = 512
    api_key: str | None = None
    max_waiting: int = 64
    max_body_bytes: int = 1 << 20
    defer_budget: int = 0

    def __post_init__(self):
        for name in ("max_seqs", "page_size", "prefill_chunk", "max_body_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        for name in ("max_waiting", "defer_budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        for name in ("kv_memory_bytes", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected None or an int >= 1, got {v!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key: expected a non-empty string or None")


class Server:
    """The engine, its loop and what the handlers need to know about the model."""

    def __init__(self, lm: LoadedModel, cfg: ServeConfig):
        if lm.tokenizer is None:
            raise ValueError(f"model: {lm.name!r} has no tokenizer; the server needs one to read and write text")
        self.lm, self.cfg = lm, cfg
        paged = PagedConfig(page_size=cfg.page_size, max_seqs=cfg.max_seqs, kv_memory_bytes=cfg.kv_memory_bytes,
                            max_model_len=cfg.max_model_len, prefill_chunk=cfg.prefill_chunk,
                            defer_budget=cfg.defer_budget)
        self.engine = Engine(lm.model, paged, eos_ids=lm.eos_ids, tokenizer=lm.tokenizer)
        cache = self.engine.cache
        self.metrics = ServerMetrics(cfg.model_name, cache.ps, cache.P)
        self.loop = EngineLoop(self.engine, self.metrics, max_waiting=cfg.max_waiting)
        self.context = cache.max_model_len
        self.fit = self._largest_fitting_total()
        self.created = P.now()
        mc = lm.config
        self.eviction = mc.dms_active
        self.window = mc.dms.window_size if mc.dms_active else None

    def _largest_fitting_total(self) -> int:
        """The longest sequence (prompt + max_tokens) that fits the pool with nothing evicted."""
        cap = self.engine.cache.P
        lo, hi = 0, self.context
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.engine.cache.budget.worst_case_pages(mid) <= cap:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # ------------------------------------------------------------------ request checks

    def check_auth(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), key.encode()):
            what = "no Authorization header" if not got else "a wrong API key"
            raise P.APIError(401, f"Authorization: expected 'Bearer <api key>' with this server's key, got {what}",
                             code="invalid_api_key", type="authentication_error")

    async def read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise P.APIError(400, f"Content-Length: expected a number of bytes, got {length!r}")
            if int(length) > limit:
                raise P.APIError(413, f"body: expected at most {limit} bytes, got {length}", code="body_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise P.APIError(413, f"body: expected at most {limit} bytes, got more", code="body_too_large")
        return bytes(body)

    def check_model(self, name: str) -> None:
        if name not in (self.cfg.model_name, self.lm.name):
            raise P.APIError(404, f"model: expected {self.cfg.model_name!r} (the model this server runs), got {name!r}",
                             param="model", code="model_not_found")

    def token_ids(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.lm.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            vocab = self.lm.config.vocab_size
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise P.APIError(400, f"{param}: token ids must lie in [0, {vocab}), got {bad[:4]}", param=param,
                                 code="invalid_value")
        if not ids:
            raise P.APIError(400, f"{param}: expected a non-empty prompt, got one with no tokens", param=param,
                             code="invalid_value")
        return ids

    def chat_ids(self, req: P.ChatCompletionRequest) -> list[int]:
        tok = self.lm.tokenizer
        if not tok.chat_template:
            raise P.APIError(400, f"messages: {self.cfg.model_name!r} has no chat template; use /v1/completions",
                             param="messages", code="invalid_value")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.token_ids(tok(text, add_special_tokens=False)["input_ids"], "messages")

    def sampling(self, req: P._Sampling, prompts: list[list[int]], prompt_param: str, default: int) -> SamplingParams:
        longest = max(map(len, prompts))
        limit = min(self.context, self.fit)
        if longest >= limit:
            raise P.APIError(400, f"{prompt_param}: {longest} tokens; expected at most {limit - 1} (the context is "
                                  f"{self.context} tokens and the KV pool fits {self.fit} with nothing evicted)",
                             param=prompt_param, code="context_length_exceeded")
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = min(default, limit - longest)
        elif longest + max_tokens > limit:
            why = (f"the model's context of {self.context} tokens" if longest + max_tokens > self.context else
                   f"the KV pool: {self.engine.cache.P} pages of {self.engine.cache.ps} tokens hold at most "
                   f"{self.fit} tokens of one sequence with nothing evicted (give the server more --kv-memory)")
            raise P.APIError(400, f"{name}: {longest} prompt tokens + {name}={max_tokens} exceed {why}; expected "
                                  f"{name} <= {limit - longest}", param=name, code="context_length_exceeded")
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                                  top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                                  stop=req.stops, ignore_eos=req.ignore_eos)
        except ValueError as e:
            raise P.APIError(400, str(e), param=str(e).split(":")[0], code="invalid_value") from None


class _TextStream:
    """Token ids -> text pieces: never a broken UTF-8 character, never the start of a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.ids, self.sent = tokenizer, [], ""
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        safe = len(text) - self.hold
        if safe <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):safe], text[:safe]
        return piece

    def finish(self, final: str | None) -> str:
        if final is None or not final.startswith(self.sent):
            return ""
        piece, self.sent = final[len(self.sent):], final
        return piece


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(lm: LoadedModel, cfg: ServeConfig) -> FastAPI:
    server = Server(lm, cfg)

    @asynccontextmanager
    async def lifespan(app):
        server.loop.start()
        yield
        server.loop.stop()

    app = FastAPI(title="dms", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(P.APIError)
    async def _api_error(request, exc: P.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"route: {request.method} {request.url.path} does not exist; expected /v1/models, " \
                  "/v1/completions, /v1/chat/completions, /health or /metrics"
        elif exc.status_code == 405:
            msg = f"method: {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return JSONResponse(P.error_body(msg, code="not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            return JSONResponse({"status": "error", "error": repr(server.loop.failure)}, status_code=503)
        return {"status": "ok", "model": cfg.model_name, **server.loop.occupancy()}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": server.created,
                                            "owned_by": "dms", "max_model_len": server.context}]}

    async def parse(request: Request, model_cls):
        server.check_auth(request)
        body = await server.read_body(request)
        try:
            req = model_cls.model_validate_json(body)
        except ValidationError as e:
            raise P.validation_error(e) from None
        req.unsupported()
        server.check_model(req.model)
        return req

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: P.CompletionRequest = await parse(request, P.CompletionRequest)
        prompts = req.prompts()
        ids = [server.token_ids(p, "prompt" if len(prompts) == 1 else f"prompt[{i}]") for i, p in enumerate(prompts)]
        params = server.sampling(req, ids, "prompt", DEFAULT_COMPLETION_TOKENS)
        return await _run(request, req, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: P.ChatCompletionRequest = await parse(request, P.ChatCompletionRequest)
        ids = [server.chat_ids(req)]
        params = server.sampling(req, ids, "messages", DEFAULT_CHAT_TOKENS)
        return await _run(request, req, ids, params, chat=True)

    async def _run(request: Request, req, prompts: list[list[int]], params: SamplingParams, chat: bool):
        loop = server.loop
        size = len(prompts) * req.n
        if not loop.alive:
            raise P.APIError(503, "server: the engine loop has stopped", type="server_error", code="engine_dead")
        if loop.in_flight + size > loop.capacity:
            server.metrics.rejected.labels(reason="queue_full").inc()
            raise P.APIError(503, f"server: the waiting queue is full ({loop.in_flight} sequences in flight, "
                                  f"capacity {loop.capacity}); retry later", type="server_error",
                             code="queue_full", headers={"Retry-After": "1"})
        loop.in_flight += size
        handed_over = False
        try:
            try:
                sub = await loop.submit(prompts, params, req.n)
            except ValueError as e:
                server.metrics.rejected.labels(reason="invalid").inc()
                raise P.APIError(400, str(e), code="invalid_value") from None
            server.metrics.prompt_tokens.inc(sum(map(len, prompts)))
            meta = {"id": P.new_id("chatcmpl" if chat else "cmpl"), "created": P.now(), "model": cfg.model_name}
            if req.stream:
                handed_over = True
                return StreamingResponse(_stream(sub, req, prompts, meta, chat), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await _collect(request, sub, req, prompts, meta, chat)
        finally:
            if not handed_over:
                loop.in_flight -= size

    def _dms(live: int, dense: int) -> dict:
        return {"kv_live_tokens": live, "kv_dense_tokens": dense,
                "compression_ratio": round(dense / live, 4) if live else 1.0,
                "eviction": server.eviction, "window": server.window}

    async def _collect(request: Request, sub: Submission, req, prompts, meta, chat: bool):
        tokens, finals, reasons = [[] for _ in range(sub.size)], [None] * sub.size, [None] * sub.size
        live = dense = 0
        left, error = sub.size, None
        try:
            while left:
                try:
                    ev = await asyncio.wait_for(sub.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if ev.token is not None:
                    tokens[ev.index].append(ev.token)
                if ev.finished:
                    left -= 1
                    finals[ev.index], reasons[ev.index] = ev.text, P.finish_reason(ev.finish_reason)
                    live, dense = live + ev.live_tokens, dense + ev.dense_tokens
                    error = error or ev.error
        finally:
            if left:
                server.loop.abort(sub)
        if error is not None:
            raise P.APIError(500, f"generation failed: {error}", type="server_error", code="generation_error")
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": finals[i]}, "logprobs": None,
                        "finish_reason": reasons[i]} for i in range(sub.size)]
        else:
            choices = [{"index": i, "text": finals[i], "logprobs": None, "finish_reason": reasons[i]}
                       for i in range(sub.size)]
        if req.return_token_ids:
            for c, ids in zip(choices, tokens):
                c["token_ids"] = ids
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": P.usage(sum(map(len, prompts)), sum(map(len, tokens))), "dms": _dms(live, dense)}

    async def _stream(sub: Submission, req, prompts, meta, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        texts = [_TextStream(lm.tokenizer, req.stops) for _ in range(sub.size)]
        counts = [0] * sub.size
        live = dense = 0
        left = sub.size

        def chunk(i, piece, token, reason=None, extra=None):
            if chat:
                choice = {"index": i, "delta": {"content": piece} if piece or reason is None else {},
                          "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": piece, "logprobs": None, "finish_reason": reason}
            if req.return_token_ids:
                choice["token_ids"] = [] if token is None else [token]
            out = {**meta, "object": obj, "choices": [choice]}
            if req.include_usage:
                out["usage"] = None
            if extra:
                out.update(extra)
            return _sse(out)

        try:
            if chat:
                for i in range(sub.size):
                    first = {**meta, "object": obj, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                                "logprobs": None, "finish_reason": None}]}
                    if req.include_usage:
                        first["usage"] = None
                    yield _sse(first)
            while left:
                ev = await sub.queue.get()
                i = ev.index
                piece = ""
                if ev.token is not None:
                    counts[i] += 1
                    if not ev.finished:  # the last piece comes from the final text (stop strings cut)
                        piece = texts[i].push(ev.token)
                if not ev.finished:
                    if piece or req.return_token_ids:
                        yield chunk(i, piece, ev.token)
                    continue
                left -= 1
                if ev.error is not None:
                    yield _sse(P.error_body(f"generation failed: {ev.error}", type="server_error",
                                            code="generation_error"))
                    continue
                piece += texts[i].finish(ev.text)
                live, dense = live + ev.live_tokens, dense + ev.dense_tokens
                yield chunk(i, piece, ev.token, P.finish_reason(ev.finish_reason),
                            {"dms": _dms(ev.live_tokens, ev.dense_tokens)})
            if req.include_usage:
                yield _sse({**meta, "object": obj, "choices": [], "usage": P.usage(sum(map(len, prompts)), sum(counts)),
                            "dms": _dms(live, dense)})
            yield "data: [DONE]\n\n"
        finally:
            if left:  # the client went away (or the response was cancelled): free the pages now
                server.loop.abort(sub)
            server.loop.in_flight -= sub.size

    return app
