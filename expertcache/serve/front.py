"""The server's HTTP front: its own process (Starlette on uvicorn), apart from the engine's.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events
in OpenAI's chunk format, or whole), GET /health, GET /metrics. Every error is OpenAI's error
object {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status. This process parses
HTTP and JSON, checks the API key and the body's size, and writes the responses; the engine's
process (`bridge.py`) checks prompts and parameters, runs the batch and sends each turn's text
back in one message. The two share no GIL: the event loop's Python no longer holds up the
engine's thread. A client that disconnects, or a request past its deadline, is cancelled there:
its batch row and KV cache go at the next token boundary.

Run by `cli/serve.py` as `python -m expertcache.serve.front LISTEN_FD WIRE_FD`; no torch here.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import socket
import sys
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .wire import APIError, Frames, bad, frame, recv_one


class Front:
    """The HTTP side: requests go to the engine's process as messages; its replies and each turn's
    text come back on the same socket and are handed to the waiting handlers."""

    def __init__(self, conf: dict, wire: socket.socket) -> None:
        self.model_id, self.api_key = conf["model_id"], conf["api_key"]
        self.max_body_bytes, self.request_timeout = conf["max_body_bytes"], conf["request_timeout"]
        self.created = int(time.time())
        self.wire = wire
        self._ids = itertools.count(1)
        self.inbox: dict[int, asyncio.Queue] = {}  # request id -> what the engine sends about it
        self.transport = None
        self.server = None  # uvicorn's, to stop when the engine goes away
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # --- the wire -----------------------------------------------------------------------------
    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        front = self

        class Wire(asyncio.Protocol):
            def __init__(self) -> None:
                self.frames = Frames()

            def data_received(self, data: bytes) -> None:
                for message in self.frames.feed(data):
                    front._deliver(message)

            def connection_lost(self, exc) -> None:
                front._engine_gone()

        self.transport, _ = await loop.connect_accepted_socket(Wire, sock=self.wire)

    def send(self, *message) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(message))

    def _deliver(self, message: tuple) -> None:
        if message[0] == "turn":  # [(id, event...), ...]: one turn's text for every stream
            for rid, *event in message[1]:
                # an ended request leaves the inbox at once (its stream holds the queue), so one
                # whose response never started (the client left first) leaves nothing behind
                q = self.inbox.pop(rid, None) if event[0] == "end" else self.inbox.get(rid)
                if q is not None:
                    q.put_nowait(tuple(event))
            return
        q = self.inbox.get(message[1])  # ("reply" | "accepted" | "error", id, ...)
        if q is not None:
            q.put_nowait((message[0], *message[2:]))

    def _engine_gone(self) -> None:
        self.transport = None
        for q in self.inbox.values():
            q.put_nowait(("end", "error: the engine's process went away", 0))
        if self.server is not None:
            self.server.should_exit = True

    async def call(self, op: str, *args) -> tuple:
        """Ask the engine's process: (the ask's id, the reply, the queue where what follows about
        it arrives: an accepted request's text)."""
        rid = next(self._ids)
        self.inbox[rid] = q = asyncio.Queue()
        keep = False
        try:
            if self.transport is None:
                raise APIError(503, "the engine's process went away", type_="server_error")
            self.send(op, rid, *args)
            reply = await q.get()
            if reply[0] == "end":  # the engine went away meanwhile
                raise APIError(503, "the engine's process went away", type_="server_error")
            if reply[0] == "error" and op != "submit":  # the engine's side failed to answer
                raise APIError.of(reply[1], reply[2])
            keep = op == "submit" and reply[0] == "accepted"  # the request's text comes to the same queue
            return rid, reply, q
        finally:
            if not keep:
                self.inbox.pop(rid, None)

    # --- plumbing -----------------------------------------------------------------------------
    async def _not_found(self, request, exc):
        return JSONResponse(APIError(404, f"no route {request.url.path}: see /v1/models, /v1/completions, /v1/chat/completions",
                                     type_="not_found_error").body(), 404)

    async def _not_allowed(self, request, exc):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(), 405)

    def _authorize(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>", type_="authentication_error",
                           code="invalid_api_key")

    async def _body(self, request) -> dict:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise bad(f"the request body has {declared} bytes, more than this server takes ({limit})")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise bad(f"the request body is larger than this server takes ({limit} bytes)")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        return body

    async def _guard(self, endpoint: str, request, handler):
        try:
            self._authorize(request)
            response = await handler(request)
        except APIError as e:
            response = JSONResponse(e.body(), e.status)
        except ClientDisconnect:
            response = Response(status_code=499)
        self.send("count", endpoint, response.status_code)
        return response

    # --- endpoints ----------------------------------------------------------------------------
    async def health(self, request):
        try:
            _, (_, status, payload), _ = await self.call("health")
        except APIError as e:
            return JSONResponse({"status": "error", "error": e.message}, 503)
        return JSONResponse(payload, status)

    async def metrics(self, request):
        async def render(request):
            _, (_, _, text), _ = await self.call("metrics")
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

        return await self._guard("/metrics", request, render)

    async def models(self, request):
        async def listing(request):
            return JSONResponse({"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "expertcache"}]})

        return await self._guard("/v1/models", request, listing)

    async def completions(self, request):
        return await self._generation("/v1/completions", request, chat=False)

    async def chat(self, request):
        return await self._generation("/v1/chat/completions", request, chat=True)

    async def _generation(self, endpoint: str, request, *, chat: bool):
        async def handle(request):
            body = await self._body(request)
            if body.get("stream") not in (None, True, False):
                raise bad("stream must be true or false", "stream")
            rid, reply, events = await self.call("submit", chat, body)
            if reply[0] == "error":  # the prompt or a parameter was refused, or the queue is full
                raise APIError.of(reply[1], reply[2])
            stream = Stream(self, rid, events, prompt_tokens=reply[1], chat=chat)
            if body.get("stream"):
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
                return StreamingResponse(stream.sse(include_usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await stream.whole(request)

        return await self._guard(endpoint, request, handle)


class Stream:
    """One request's text as the engine sends it, in OpenAI's shapes."""

    def __init__(self, front: Front, rid: int, events: asyncio.Queue, *, prompt_tokens: int, chat: bool) -> None:
        self.front, self.rid, self.chat = front, rid, chat
        self.events = events
        self.prompt_tokens = prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.deadline = time.monotonic() + front.request_timeout
        self.count = 0  # tokens generated (usage)
        self.finish: str | None = None

    def _close(self, reason: str | None = None) -> None:
        """Done with this request; `reason`: it did not end by itself (the engine cancels it)."""
        if self.front.inbox.pop(self.rid, None) is not None and reason is not None:
            self.front.send("cancel", self.rid, reason)

    async def deltas(self):
        """Yields text pieces; sets self.finish at the end."""
        while True:
            left = self.deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=max(left, 0.001))
            except TimeoutError:  # the server's deadline: ended like max_tokens
                self.finish = "length"
                self._close("length")
                return
            if event[0] == "piece":
                yield event[1]
            else:  # ("end", finish, tokens)
                self.finish, self.count = event[1], event[2]
                self._close()
                return

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.count,
                "total_tokens": self.prompt_tokens + self.count}

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
        return {"id": self.id, "object": obj, "created": self.created, "model": self.front.model_id, "choices": [choice]}

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
            self._close("disconnected")

    async def whole(self, http):
        pieces: list[str] = []
        gen = self.deltas()
        watcher = asyncio.ensure_future(_disconnected(http))
        try:
            while True:
                nxt = asyncio.ensure_future(anext(gen))
                await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # the client went away
                    nxt.cancel()
                    self._close("disconnected")
                    return Response(status_code=499)
                try:
                    pieces.append(nxt.result())
                except StopAsyncIteration:
                    break
        finally:
            watcher.cancel()
            self._close("disconnected")
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
        return JSONResponse({"id": self.id, "object": obj, "created": self.created, "model": self.front.model_id,
                            "choices": [choice], "usage": self.usage()})


async def _disconnected(http) -> None:
    """Returns when the client disconnects."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose SIGTERM/SIGINT drain and return instead of re-raising the signal
        (the engine's process then stops the batch: a clean exit, status 0)."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                self.force_exit = True  # a second signal: stop draining
            self.should_exit = True

    return Server


def main(argv: list[str]) -> int:
    listen_fd, wire_fd = int(argv[0]), int(argv[1])
    import uvicorn  # with starlette above: everything this process will hold, before it says so

    wire = socket.socket(fileno=wire_fd)
    wire.sendall(frame(("imported",)))  # the engine's process counts this process's memory now, then loads
    frames, pending = Frames(), []
    try:
        conf = recv_one(wire, frames, pending)
    except (EOFError, OSError):  # the engine's process stopped while it loaded: nothing to serve
        return 1
    if pending:
        raise SystemExit("expertcache serve: the engine's process sent more than its settings at start")
    listen = socket.socket(fileno=listen_fd)
    front = Front(conf, wire)
    config = uvicorn.Config(front.app, log_level="warning", timeout_graceful_shutdown=conf["drain_seconds"],
                            limit_concurrency=conf["limit_concurrency"], lifespan="off", access_log=False)
    server = front.server = _uvicorn_server()(config)

    async def run() -> None:
        await front.connect()
        front.send("ready")
        await server.serve(sockets=[listen])

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:  # uvloop where installed
        runner.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
