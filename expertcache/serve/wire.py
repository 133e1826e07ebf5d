"""Messages between the server's two processes (the HTTP front and the engine) over the private
socket pair `cli/serve.py` makes: each a pickled tuple after its length (4 bytes, big-endian).
Only the two processes hold the pair's ends, so pickle reads nothing a stranger wrote. Also the
API's error, which either side may raise and the engine's side sends as its body. No torch or
starlette here: both processes import this."""

from __future__ import annotations

import pickle
import struct

HEADER = struct.Struct("!I")


class APIError(Exception):
    """An OpenAI-style error: a status and {"message", "type", "param", "code"}."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def error(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict:
        return {"error": self.error()}

    @classmethod
    def of(cls, status: int, error: dict) -> "APIError":
        """The error `error()` gave, raised again on the other side."""
        return cls(status, error["message"], type_=error["type"], param=error["param"], code=error["code"])


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def frame(message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


class Frames:
    """Splits received bytes into messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf += data
        out, at, n = [], 0, len(self._buf)
        while n - at >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf, at)
            if n - at - HEADER.size < size:
                break
            out.append(pickle.loads(self._buf[at + HEADER.size : at + HEADER.size + size]))
            at += HEADER.size + size
        del self._buf[:at]
        return out


def recv_one(sock, frames: Frames, pending: list) -> object:
    """The next message, blocking (the start-up handshake); messages that came with it wait in
    `pending` for the caller's loop."""
    while not pending:
        data = sock.recv(1 << 16)
        if not data:
            raise EOFError("the other process closed the connection")
        pending.extend(frames.feed(data))
    return pending.pop(0)


def expect(sock, frames: Frames, pending: list, what: str, timeout: float) -> None:
    """The other side's next message, which must be (what,): start-up's steps."""
    sock.settimeout(timeout)
    try:
        got = recv_one(sock, frames, pending)
    finally:
        sock.settimeout(None)
    if got != (what,):
        raise EOFError(f"the HTTP front said {got!r} instead of {what}")
