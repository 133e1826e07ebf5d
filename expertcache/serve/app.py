"""The OpenAI-compatible HTTP API over a Batcher (Starlette; uvicorn runs it: cli/serve.py).

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events
in OpenAI's chunk format, or whole), GET /health, GET /metrics (Prometheus text). Every error is
OpenAI's error object {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status.
Bounds: body bytes, prompt tokens, max_tokens, waiting requests (429 at once when full) and a
per-request deadline. A client that disconnects cancels its request: its batch row and KV cache
are freed at the next token boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..demo.settings import CHAT_TEMPLATE as FALLBACK_CHAT_TEMPLATE  # for a tokenizer without its own
from ..engine import Engine, encode_text
from .batcher import Batcher, QueueFull, Request
from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_STOP = 4  # stop sequences per request, as OpenAI allows
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's context - 1
    max_tokens: int = 1024  # the most a request may ask for
    request_timeout: float = 600.0  # seconds; a request still generating then ends with finish_reason "length"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
                            status_code=self.status)


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


class Server:
    """The application's state: engine, batcher, limits, metrics."""

    def __init__(self, engine: Engine, batcher: Batcher, *, model_id: str, api_key: str | None = None,
                 limits: Limits | None = None, metrics: Metrics | None = None) -> None:
        self.engine, self.batcher = engine, batcher
        self.model_id = model_id
        self.api_key = api_key
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.created = int(time.time())
        context = getattr(engine.model.config, "max_position_embeddings", None)
        if self.limits.max_prompt_tokens is None:
            self.limits.max_prompt_tokens = (context - 1) if context else 1 << 20
        self.context = context
        tok = engine.tokenizer
        self.chat_template = (getattr(tok, "chat_template", None) or FALLBACK_CHAT_TEMPLATE) if tok is not None else None
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # --- plumbing -----------------------------------------------------------------------------
    async def _not_found(self, request: HTTPRequest, exc) -> Response:
        return APIError(404, f"no route {request.url.path}: see /v1/models, /v1/completions, /v1/chat/completions",
                        type_="not_found_error").response()

    async def _not_allowed(self, request: HTTPRequest, exc) -> Response:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}", type_="invalid_request_error").response()

    def _authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>", type_="authentication_error",
                           code="invalid_api_key")

    async def _body(self, request: HTTPRequest) -> dict:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _bad(f"the request body has {declared} bytes, more than this server takes ({limit})")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _bad(f"the request body is larger than this server takes ({limit} bytes)")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise _bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    async def _guard(self, endpoint: str, request: HTTPRequest, handler) -> Response:
        try:
            self._authorize(request)
            response = await handler(request)
        except APIError as e:
            response = e.response()
        except ClientDisconnect:
            response = Response(status_code=499)
        self.metrics.request(endpoint, response.status_code)
        return response

    # --- endpoints ----------------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> Response:
        if self.batcher.error is not None:
            return JSONResponse({"status": "error", "error": str(self.batcher.error)}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id, **self.batcher.depth()})

    async def metrics_text(self, request: HTTPRequest) -> Response:
        async def render(request):
            s = self.engine.stats_
            stats = {"hits": s.hits, "misses": s.misses, "bytes_read": s.bytes_read, "stall_seconds": s.stall_seconds}
            depth = {**self.batcher.depth(), "kv_bytes": self.batcher.kv_bytes()}
            return PlainTextResponse(self.metrics.render(depth, stats), media_type="text/plain; version=0.0.4")

        return await self._guard("/metrics", request, render)

    async def models(self, request: HTTPRequest) -> Response:
        async def listing(request):
            return JSONResponse({"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "expertcache"}]})

        return await self._guard("/v1/models", request, listing)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generation("/v1/completions", request, self._completion_prompt, chat=False)

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._generation("/v1/chat/completions", request, self._chat_prompt, chat=True)

    async def _generation(self, endpoint: str, request: HTTPRequest, prompt_of, *, chat: bool) -> Response:
        async def handle(request):
            body = await self._body(request)
            return await self._generate(request, body, prompt_of(body), chat=chat)

        return await self._guard(endpoint, request, handle)

    # --- requests -----------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if self.engine.tokenizer is None:
            raise _bad("this model has no tokenizer: send the prompt as a list of token ids", "prompt")
        return encode_text(self.engine.tokenizer, text)

    def _completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self._encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.engine.model.get_input_embeddings().num_embeddings
            if not all(0 <= t < vocab for t in prompt):
                raise _bad(f"token ids must be in 0..{vocab - 1}", "prompt")
            ids = list(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise _bad("one prompt per request: send several requests (the server batches them)", "prompt")
        else:
            raise _bad("prompt must be a non-empty string or a list of token ids", "prompt")
        return self._bounded(ids)

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages must be a non-empty list of {role, content}", "messages")
        turns = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad("each message needs a role and a content", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: their text
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise _bad("only text content parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise _bad("each message's content must be text", "messages")
            turns.append({"role": m["role"], "content": content})
        if self.engine.tokenizer is None:
            raise _bad("this model has no tokenizer, so no chat template: use /v1/completions with token ids", "messages")
        try:
            text = self.engine.tokenizer.apply_chat_template(turns, chat_template=self.chat_template, tokenize=False,
                                                             add_generation_prompt=True)
        except Exception as e:  # a template that rejects these turns (roles out of order, ...)
            raise _bad(f"the chat template rejected these messages: {e}", "messages") from None
        return self._bounded(self._encode(text))

    def _bounded(self, ids: list[int]) -> list[int]:
        if not ids:
            raise _bad("the prompt is empty", "prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise _bad(f"the prompt has {len(ids)} tokens, this server takes {self.limits.max_prompt_tokens} at most", "prompt")
        return ids

    def _sampling(self, body: dict, prompt: list[int], chat: bool) -> dict:
        def number(name, default, lo, hi, *, whole=False, lo_open=False):
            v = body.get(name, default)
            if v is None:
                v = default
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not whole or float(v).is_integer())
            if not ok or v < lo or (lo_open and v == lo) or v > hi:
                span = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise _bad(f"{name} must be {'a whole number' if whole else 'a number'} in {span}, got {v!r}", name)
            return int(v) if whole else float(v)

        max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        cap = self.limits.max_tokens
        max_tokens = number(max_key, cap if chat else min(DEFAULT_MAX_TOKENS, cap), 1, cap, whole=True)
        if self.context is not None and len(prompt) + 1 > self.context:
            raise _bad(f"the prompt has {len(prompt)} tokens, this model's context is {self.context}", "prompt")
        if self.context is not None:
            max_tokens = min(max_tokens, self.context - len(prompt))
        temperature = number("temperature", 1.0, 0.0, 2.0)
        top_p = number("top_p", 1.0, 0.0, 1.0, lo_open=True)
        number("n", 1, 1, 1, whole=True)  # one choice per request
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _bad(f"seed must be a whole number, got {seed!r}", "seed")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise _bad(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
        for name in ("echo", "logprobs", "best_of", "suffix", "tools", "functions", "logit_bias"):
            v = body.get(name)
            if v not in (None, False, {}, []) and not (name == "best_of" and v == 1):
                raise _bad(f"{name} is not supported by this server", name)
        if body.get("stream") not in (None, True, False):
            raise _bad("stream must be true or false", "stream")
        return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop}

    async def _generate(self, http: HTTPRequest, body: dict, prompt: list[int], *, chat: bool) -> Response:
        p = self._sampling(body, prompt, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(token, finish):  # the batcher's thread
            loop.call_soon_threadsafe(events.put_nowait, (token, finish))

        req = Request(prompt=prompt, max_tokens=p["max_tokens"], emit=emit, temperature=p["temperature"],
                      top_p=p["top_p"], seed=p["seed"])
        if self.batcher.error is not None:
            raise APIError(503, f"the engine stopped: {self.batcher.error}", type_="server_error")
        try:
            self.batcher.submit(req)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type_="rate_limit_error", code="queue_full") from None
        stream = Stream(self, req, events, p["stop"], chat=chat)
        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return StreamingResponse(stream.sse(include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await stream.whole(http)


class Detokenizer:
    """The text of a growing list of tokens, decoding only what came since the last complete
    character (after the tokens before it, as context: a tokenizer may drop a leading space at
    the start of what it decodes), so a long stream costs linear time, not quadratic. Without a
    tokenizer, the ids space-separated."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.stable = ""  # the text of tokens[:read]
        self.prefix = self.read = 0  # tokens[prefix:read] are the context decoded again each time

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, tokens))
        before = self.tokenizer.decode(tokens[self.prefix : self.read])
        now = self.tokenizer.decode(tokens[self.prefix :])
        new = now[len(before) :] if now.startswith(before) else None
        if new is None:  # the context decodes differently with what follows: the whole text, decoded again
            self.stable, self.prefix, self.read = self.tokenizer.decode(tokens), len(tokens), len(tokens)
            return self.stable
        if new and not new.endswith("\ufffd"):  # complete characters: they stay as they are
            self.stable += new
            self.prefix, self.read = self.read, len(tokens)
            return self.stable
        return self.stable + new


class Stream:
    """One request's tokens as they come: text with stop sequences held back, then OpenAI's shapes."""

    def __init__(self, server: Server, req: Request, events: asyncio.Queue, stop: list[str], *, chat: bool) -> None:
        self.server, self.req, self.events, self.stop, self.chat = server, req, events, stop, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.deadline = time.monotonic() + server.limits.request_timeout
        self.tokens: list[int] = []  # generated, without the end-of-text token
        self.text = Detokenizer(server.engine.tokenizer)
        self.count = 0  # tokens generated (usage)
        self.sent = 0  # characters of the text given out so far
        self.finish: str | None = None
        self._done = False

    def _text(self) -> str:
        return self.text.decode(self.tokens)

    def _end(self, finish: str) -> None:
        """The stream is over with `finish` (stop, length, cancelled, error: ...), counted once."""
        self.finish, self._done = finish, True
        self.server.metrics.done(self.req, finish)

    def _abandon(self) -> None:
        """The client went away: free its row, count it as disconnected."""
        self.server.batcher.cancel(self.req)
        if not self._done:
            self._end("disconnected")

    async def _next(self) -> tuple[int | None, str | None]:
        left = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.events.get(), timeout=max(left, 0.001))
        except TimeoutError:
            self.server.batcher.cancel(self.req)
            return None, "length"  # the server's deadline: ended like max_tokens

    async def deltas(self):
        """Yields text pieces; sets self.finish at the end."""
        while True:
            token, finish = await self._next()
            if token is not None:
                self.count += 1
                if token in self.server.batcher.eos:  # the end-of-text token ends the text; it is not part of it
                    continue
                self.tokens.append(token)
                text = self._text()
                for s in self.stop:
                    at = text.find(s, max(0, self.sent - len(s) + 1))
                    if at >= 0:
                        self.server.batcher.cancel(self.req)
                        if at > self.sent:
                            yield text[self.sent : at]
                        self.sent = at
                        self._end("stop")
                        return
                safe = len(text) - max((len(s) - 1 for s in self.stop), default=0)  # may yet begin a stop sequence
                while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete character
                    safe -= 1
                if safe > self.sent:
                    yield text[self.sent : safe]
                    self.sent = safe
                continue
            if finish is not None:
                text = self._text()
                if finish in ("stop", "length") and len(text) > self.sent:
                    yield text[self.sent :]
                    self.sent = len(text)
                self._end(finish)
                return

    def usage(self) -> dict:
        p = len(self.req.prompt)
        return {"prompt_tokens": p, "completion_tokens": self.count, "total_tokens": p + self.count}

    def _reason(self) -> str:
        if self.finish and self.finish.startswith("error"):
            raise APIError(500, f"generation failed: {self.finish[len('error: '):]}", type_="server_error")
        return "stop" if self.finish == "stop" else "length"

    def _chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_id, "choices": [choice]}

    async def sse(self, include_usage: bool):
        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if self.chat:
                yield event(self._chunk("", None, first=True))
            async for piece in self.deltas():
                yield event(self._chunk(piece, None))
            if self.finish and self.finish.startswith("error"):
                yield event({"error": {"message": f"generation failed: {self.finish}", "type": "server_error",
                                       "param": None, "code": None}})
            elif self.finish != "cancelled":
                yield event(self._chunk(None, self._reason()))
                if include_usage:
                    yield event({**self._chunk(None, None), "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free its row
            if not self._done:
                self._abandon()

    async def whole(self, http: HTTPRequest) -> Response:
        pieces: list[str] = []
        gen = self.deltas()
        watcher = asyncio.ensure_future(_disconnected(http))
        try:
            while True:
                nxt = asyncio.ensure_future(anext(gen))
                await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # the client went away
                    nxt.cancel()
                    self._abandon()
                    return Response(status_code=499)
                try:
                    pieces.append(nxt.result())
                except StopAsyncIteration:
                    break
        finally:
            watcher.cancel()
            if not self._done:
                self._abandon()
        if self.finish == "cancelled":
            raise APIError(503, "the request was cancelled (the server is shutting down)", type_="server_error")
        reason = self._reason()
        text = "".join(pieces)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return JSONResponse({"id": self.id, "object": obj, "created": self.created, "model": self.server.model_id,
                             "choices": [choice], "usage": self.usage()})


async def _disconnected(http: HTTPRequest) -> None:
    """Returns when the client disconnects."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return
