"""The engine's side of the server: requests from the HTTP front (`front.py`, its own process)
come in over the socket pair, are checked (prompt, chat template, sampling parameters), tokenized
and handed to the Batcher; each turn's new tokens go back as text (decoded here, stop sequences
held back and enforced here) in one message for every stream. Also /health's and /metrics'
answers. Runs in the engine process's main thread, beside the batcher's.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
from collections import deque
from dataclasses import dataclass

from ..demo.settings import CHAT_TEMPLATE as FALLBACK_CHAT_TEMPLATE  # for a tokenizer without its own
from ..engine import Engine, encode_text
from ..tokenizer import FastTokenizer
from .batcher import Batcher, QueueFull, Request
from .metrics import Metrics
from .wire import APIError, Frames, bad, expect, frame

log = logging.getLogger(__name__)

MAX_STOP = 4  # stop sequences per request, as OpenAI allows
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class Limits:
    """What the engine's side checks (the front checks the body's size and the deadline)."""

    max_prompt_tokens: int | None = None  # None: the model's context - 1
    max_tokens: int = 1024  # the most a request may ask for


class Bridge:
    """The engine process's end of the wire: requests in, each turn's text out."""

    def __init__(self, engine: Engine, batcher: Batcher, *, model_id: str, limits: Limits | None = None,
                 metrics: Metrics | None = None) -> None:
        self.engine, self.batcher = engine, batcher
        self.model_id = model_id
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        context = getattr(engine.model.config, "max_position_embeddings", None)
        if self.limits.max_prompt_tokens is None:
            self.limits.max_prompt_tokens = (context - 1) if context else 1 << 20
        self.context = context
        tok = engine.tokenizer
        self.chat_template = (getattr(tok, "chat_template", None) or FALLBACK_CHAT_TEMPLATE) if tok is not None else None
        if isinstance(tok, FastTokenizer):  # chat templates render through transformers' tokenizer: loaded now, not
            tok.transformers_tokenizer()  # in the first chat request (as the engine loaded it before)
        self.streams: dict[int, TextStream] = {}  # request id -> its stream
        self.outbox: deque = deque()  # (stream, token, finish) from the batcher's thread
        self.wire: socket.socket | None = None
        self._frames = Frames()
        self._wake_r, self._wake_w = os.pipe()
        self._woken = threading.Event()
        batcher.on_turn = self._turned

    # --- the batcher's thread -----------------------------------------------------------------
    def _turned(self) -> None:
        """After each turn: one wake-up for the turn's tokens, not one a token."""
        if self.outbox and not self._woken.is_set():
            self._woken.set()
            try:
                os.write(self._wake_w, b"x")
            except OSError:  # closed: the server is stopping
                pass

    # --- the loop -----------------------------------------------------------------------------
    def handshake(self, wire: socket.socket, conf: dict, timeout: float = 120.0) -> list:
        """Sends the front its settings and waits until it listens; returns the messages that
        came with its answer."""
        wire.sendall(frame(conf))
        pending: list = []
        expect(wire, self._frames, pending, "ready", timeout)
        return pending

    def serve(self, wire: socket.socket, pending: list = ()) -> None:
        """Until the front closes its end (it drained after SIGTERM, or it died)."""
        self.wire = wire
        for message in pending:
            self._handle(message)
        sel = selectors.DefaultSelector()
        sel.register(wire, selectors.EVENT_READ, "wire")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "wake":
                        os.read(self._wake_r, 4096)
                        self._woken.clear()
                        self._flush()
                        continue
                    try:
                        data = wire.recv(1 << 16)
                    except ConnectionError:
                        data = b""
                    if not data:
                        return
                    for message in self._frames.feed(data):
                        self._handle(message)
        finally:
            sel.close()
            for ts in list(self.streams.values()):  # the front is gone: nobody reads these
                self.batcher.cancel(ts.req)
                ts.end("disconnected")

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _send(self, *message) -> None:
        try:
            self.wire.sendall(frame(message))
        except OSError:  # the front went away: serve() sees its end closed
            log.debug("send to the front failed", exc_info=True)

    def _flush(self) -> None:
        events: list = []
        while self.outbox:
            ts, token, finish = self.outbox.popleft()
            try:
                ts.take(token, finish, events)
            except Exception as e:  # a tokenizer that fails on these ids ends this stream, not the server
                log.exception("turning tokens into text failed")
                if not ts.done:
                    self.batcher.cancel(ts.req)
                    ts.close(f"error: {e}", events)
        if events:
            self._send("turn", events)

    def _handle(self, message: tuple) -> None:
        try:
            self._dispatch(message)
        except Exception as e:  # a bug or a failing tokenizer answers 500 for this ask, not the server
            log.exception("handling %r failed", message[0])
            if message[0] in ("submit", "health", "metrics"):
                self._error(message[1], APIError(500, f"the server failed: {e}", type_="server_error"))

    def _error(self, rid: int, e: APIError) -> None:
        self._send("error", rid, e.status, e.error())

    def _dispatch(self, message: tuple) -> None:
        op = message[0]
        if op == "submit":
            _, rid, chat, body = message
            try:
                self._submit(rid, chat, body)
            except APIError as e:
                self._error(rid, e)
        elif op == "cancel":
            _, rid, reason = message
            ts = self.streams.get(rid)
            if ts is not None:
                self.batcher.cancel(ts.req)
                ts.end(reason)
        elif op == "count":
            self.metrics.request(message[1], message[2])
        elif op == "health":
            if self.batcher.error is not None:
                self._send("reply", message[1], 503, {"status": "error", "error": str(self.batcher.error)})
            else:
                self._send("reply", message[1], 200, {"status": "ok", "model": self.model_id, **self.batcher.depth()})
        elif op == "metrics":
            s = self.engine.stats_
            stats = {"hits": s.hits, "misses": s.misses, "bytes_read": s.bytes_read, "stall_seconds": s.stall_seconds}
            depth = {**self.batcher.depth(), "kv_bytes": self.batcher.kv_bytes()}
            self._send("reply", message[1], 200, self.metrics.render(depth, stats))
        else:
            log.warning("the front sent an unknown message %r", op)

    def _submit(self, rid: int, chat: bool, body: dict) -> None:
        prompt = self._chat_prompt(body) if chat else self._completion_prompt(body)
        p = self._sampling(body, prompt, chat)
        if self.batcher.error is not None:
            raise APIError(503, f"the engine stopped: {self.batcher.error}", type_="server_error")
        ts = TextStream(self, rid, p["stop"])
        ts.req = Request(prompt=prompt, max_tokens=p["max_tokens"], emit=ts.emit, temperature=p["temperature"],
                         top_p=p["top_p"], seed=p["seed"])
        self.streams[rid] = ts  # before the batcher can emit to it
        try:
            self.batcher.submit(ts.req)
        except QueueFull as e:
            del self.streams[rid]
            raise APIError(429, f"the server is busy: {e}; retry later", type_="rate_limit_error", code="queue_full") from None
        self._send("accepted", rid, len(prompt))

    # --- requests -----------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if self.engine.tokenizer is None:
            raise bad("this model has no tokenizer: send the prompt as a list of token ids", "prompt")
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
                raise bad(f"token ids must be in 0..{vocab - 1}", "prompt")
            ids = list(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise bad("one prompt per request: send several requests (the server batches them)", "prompt")
        else:
            raise bad("prompt must be a non-empty string or a list of token ids", "prompt")
        return self._bounded(ids)

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages must be a non-empty list of {role, content}", "messages")
        turns = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad("each message needs a role and a content", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: their text
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise bad("only text content parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise bad("each message's content must be text", "messages")
            turns.append({"role": m["role"], "content": content})
        if self.engine.tokenizer is None:
            raise bad("this model has no tokenizer, so no chat template: use /v1/completions with token ids", "messages")
        try:
            text = self.engine.tokenizer.apply_chat_template(turns, chat_template=self.chat_template, tokenize=False,
                                                             add_generation_prompt=True)
        except Exception as e:  # a template that rejects these turns (roles out of order, ...)
            raise bad(f"the chat template rejected these messages: {e}", "messages") from None
        return self._bounded(self._encode(text))

    def _bounded(self, ids: list[int]) -> list[int]:
        if not ids:
            raise bad("the prompt is empty", "prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise bad(f"the prompt has {len(ids)} tokens, this server takes {self.limits.max_prompt_tokens} at most", "prompt")
        return ids

    def _sampling(self, body: dict, prompt: list[int], chat: bool) -> dict:
        def number(name, default, lo, hi, *, whole=False, lo_open=False):
            v = body.get(name, default)
            if v is None:
                v = default
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not whole or float(v).is_integer())
            if not ok or v < lo or (lo_open and v == lo) or v > hi:
                span = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise bad(f"{name} must be {'a whole number' if whole else 'a number'} in {span}, got {v!r}", name)
            return int(v) if whole else float(v)

        max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        cap = self.limits.max_tokens
        max_tokens = number(max_key, cap if chat else min(DEFAULT_MAX_TOKENS, cap), 1, cap, whole=True)
        if self.context is not None and len(prompt) + 1 > self.context:
            raise bad(f"the prompt has {len(prompt)} tokens, this model's context is {self.context}", "prompt")
        if self.context is not None:
            max_tokens = min(max_tokens, self.context - len(prompt))
        temperature = number("temperature", 1.0, 0.0, 2.0)
        top_p = number("top_p", 1.0, 0.0, 1.0, lo_open=True)
        number("n", 1, 1, 1, whole=True)  # one choice per request
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise bad(f"seed must be a whole number, got {seed!r}", "seed")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise bad(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
        for name in ("echo", "logprobs", "best_of", "suffix", "tools", "functions", "logit_bias"):
            v = body.get(name)
            if v not in (None, False, {}, []) and not (name == "best_of" and v == 1):
                raise bad(f"{name} is not supported by this server", name)
        return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop}


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


class TextStream:
    """One request's tokens as they come, as text: stop sequences held back until they cannot
    begin one, and enforced (the request is cancelled where one appears)."""

    def __init__(self, bridge: Bridge, rid: int, stop: list[str]) -> None:
        self.bridge, self.rid, self.stop = bridge, rid, stop
        self.req: Request | None = None
        self.tokens: list[int] = []  # generated, without the end-of-text token
        self.text = Detokenizer(bridge.engine.tokenizer)
        self.count = 0  # tokens generated (usage)
        self.sent = 0  # characters of the text given out so far
        self.done = False

    def emit(self, token, finish) -> None:  # the batcher's thread
        self.bridge.outbox.append((self, token, finish))

    def close(self, finish: str, events: list) -> None:
        """Ends the stream here and tells the front."""
        events.append((self.rid, "end", finish, self.count))
        self.end(finish)

    def end(self, finish: str) -> None:
        """The stream is over with `finish` (stop, length, cancelled, disconnected, error: ...), counted once."""
        if self.done:
            return
        self.done = True
        self.bridge.streams.pop(self.rid, None)
        self.bridge.metrics.done(self.req, finish)

    def take(self, token, finish, events: list) -> None:
        """The batcher's next token (or its end): the text it adds, as events for the front."""
        if self.done:  # ended here already (a stop sequence, the client gone): the rest is moot
            return
        if token is not None:
            self.count += 1
            if token in self.bridge.batcher.eos:  # the end-of-text token ends the text; it is not part of it
                return
            self.tokens.append(token)
            text = self.text.decode(self.tokens)
            for s in self.stop:
                at = text.find(s, max(0, self.sent - len(s) + 1))
                if at >= 0:
                    self.bridge.batcher.cancel(self.req)
                    if at > self.sent:
                        events.append((self.rid, "piece", text[self.sent : at]))
                    self.sent = at
                    self.close("stop", events)
                    return
            safe = len(text) - max((len(s) - 1 for s in self.stop), default=0)  # may yet begin a stop sequence
            while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete character
                safe -= 1
            if safe > self.sent:
                events.append((self.rid, "piece", text[self.sent : safe]))
                self.sent = safe
            return
        if finish is not None:
            text = self.text.decode(self.tokens)
            if finish in ("stop", "length") and len(text) > self.sent:
                events.append((self.rid, "piece", text[self.sent :]))
                self.sent = len(text)
            self.close(finish, events)

