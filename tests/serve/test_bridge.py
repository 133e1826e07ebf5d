"""The wire between the server's two processes, and the engine's side of it, without a model: messages
survive any split into reads, and an ask that fails inside the engine's side is answered 500 while the
bridge goes on serving."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

from expertcache.serve.bridge import Bridge
from expertcache.serve.wire import Frames, frame


def test_frames_survive_any_split_into_reads():
    messages = [("turn", [(1, "piece", "é" * n)]) for n in range(40)] + [("ready",), ("count", "/v1/models", 200)]
    data = b"".join(frame(m) for m in messages)
    for step in (1, 3, 7, 64, len(data)):
        frames, got = Frames(), []
        for i in range(0, len(data), step):
            got += frames.feed(data[i : i + step])
        assert got == messages


class _Tokenizer:
    chat_template = None
    bos_token_id = None

    def encode(self, text, verbose=False):
        raise RuntimeError("this tokenizer is broken")


def _bridge() -> Bridge:
    engine = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64)),
                             tokenizer=_Tokenizer())
    batcher = SimpleNamespace(error=None, on_turn=None, depth=lambda: {"waiting": 0, "running": 0, "prefilling": 0},
                              cancel=lambda req: None)
    return Bridge(engine, batcher, model_id="m")


def test_a_failing_ask_is_answered_500_and_the_bridge_goes_on():
    bridge = _bridge()
    ours, theirs = socket.socketpair()
    loop = threading.Thread(target=bridge.serve, args=(ours,), daemon=True)
    loop.start()
    theirs.sendall(frame(("submit", 1, False, {"prompt": "hello", "max_tokens": 4})))
    theirs.sendall(frame(("health", 2)))
    frames, got = Frames(), []
    theirs.settimeout(30)
    while len(got) < 2:
        got += frames.feed(theirs.recv(1 << 16))
    theirs.close()  # the front goes away: serve() returns
    loop.join(30)
    assert not loop.is_alive()
    bridge.close()
    (op, rid, status, error), health = got
    assert (op, rid, status, error["type"]) == ("error", 1, 500, "server_error")
    assert "broken" in error["message"]
    assert health[:3] == ("reply", 2, 200) and health[3]["status"] == "ok"
