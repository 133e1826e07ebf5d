"""Messages between the server's two processes (the HTTP front and the engine) over the private
socket pair `cli/serve.py` makes: each a pickled tuple after its length (4 bytes, big-endian).
Only the two processes hold the pair's ends, so pickle reads nothing a stranger wrote. No torch
here: the front imports this."""

from __future__ import annotations

import pickle
import struct

HEADER = struct.Struct("!I")


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
