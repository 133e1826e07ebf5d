"""expertcache serve, started for real on 127.0.0.1 (a free port) with the demo model, and talked
to with the official `openai` client and raw HTTP: listing, completions and chat (streamed and
whole), greedy output equal to `expertcache generate`, the API key, bad input, a client that
disconnects mid-stream, 32 concurrent streams, a full queue, and a clean SIGTERM."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai", reason="the server tests talk through the openai client: pip install -e '.[test]'")

KEY = "sk-expertcache-test"
PROMPT = "Once upon a time"
STARTUP_SECONDS = 120


class Running:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port
        self.base = f"http://127.0.0.1:{port}/v1"

    def client(self, key: str | None = KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base, api_key=key or "none", max_retries=0, timeout=120, **kw)

    def http(self, method: str, path: str, body=None, headers: dict | None = None, *, auth: bool = True):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {KEY}"} if auth else {}), **(headers or {})}
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, (json.loads(raw) if raw and resp.getheader("content-type", "").startswith("application/json") else raw.decode())

    def health(self) -> dict:
        return self.http("GET", "/health", auth=False)[1]

    def pids(self) -> list[int]:
        """The server's processes: the engine's and its HTTP front."""
        pid = self.proc.pid
        children = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                    for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
        return [pid, *children]

    def threads_and_fds(self) -> tuple[int, int]:
        pids = self.pids()
        assert len(pids) == 2, pids  # the engine's process and the HTTP front's
        return (sum(len(os.listdir(f"/proc/{p}/task")) for p in pids), sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids))


def start(*flags: str) -> Running:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "expertcache", "serve", "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + STARTUP_SECONDS
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "serving" in line or not line:
            break
    if "serving" not in line:
        proc.kill()
        raise AssertionError(f"the server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    port = int(line.split("127.0.0.1:")[1].split("/")[0])
    return Running(proc, port)


def stop(server: Running) -> tuple[int, str]:
    server.proc.send_signal(signal.SIGTERM)
    try:
        _, err = server.proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise
    return server.proc.returncode, err


@pytest.fixture(scope="module")
def server():
    s = start("--api-key", KEY, "--max-batch", "8", "--max-queue", "48", "--max-tokens-limit", "64",
              "--max-prompt-tokens", "200", "--max-body-bytes", "65536", "--drain-seconds", "5")
    yield s
    rc, err = stop(s)
    assert rc == 0, err[-2000:]
    assert "server stopped" in err


def generate_cli(prompt: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "expertcache", "generate", "--prompt", prompt, "--max-new-tokens", str(tokens),
                          "--json"], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["expertcache-demo"]
    h = server.health()
    assert h["status"] == "ok" and h["running"] == 0


def test_greedy_completion_equals_generate(server):
    want = generate_cli(PROMPT, 24)
    c = server.client().completions.create(model="expertcache-demo", prompt=PROMPT, max_tokens=24, temperature=0)
    eos_text = "<|endoftext|>"
    assert c.choices[0].text == want["text"].split(eos_text)[0]
    assert c.usage.completion_tokens == len(want["token_ids"]) and c.usage.prompt_tokens > 0
    assert c.choices[0].finish_reason == ("stop" if eos_text in want["text"] else "length")


def test_streaming_equals_whole_for_completions_and_chat(server):
    client = server.client()
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0)
    pieces = [ch.choices[0].text for ch in client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0, stream=True)
              if ch.choices]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"


def test_sampling_parameters(server):
    client = server.client()
    a = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9, seed=5)
    b = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9, seed=5)
    assert a.choices[0].text == b.choices[0].text  # seeded: repeatable
    greedy = client.completions.create(model="m", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = greedy.strip().split()[2]
    stopped = _finished(server, "stop")
    c = client.completions.create(model="m", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert c.choices[0].finish_reason == "stop" and stop not in c.choices[0].text
    assert greedy.startswith(c.choices[0].text)
    assert _finished(server, "stop") == stopped + 1  # a stop sequence's end is counted in /metrics


def _finished(server: Running, reason: str) -> int:
    _, text = server.http("GET", "/metrics")
    line = f'expertcache_finished_total{{reason="{reason}"}} '
    return next((int(l.split()[-1]) for l in text.splitlines() if l.startswith(line)), 0)


def test_api_key_is_enforced(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key=None).models.list()
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-wrong").completions.create(model="m", prompt=PROMPT, max_tokens=2)
    status, body = server.http("GET", "/metrics", auth=False)
    assert status == 401
    status, body = server.http("GET", "/metrics")
    assert status == 200 and "expertcache_requests_total" in body and "expertcache_ttft_seconds_bucket" in body


@pytest.mark.parametrize("body,param", [
    ({"prompt": "word " * 400, "max_tokens": 4}, "prompt"),  # over --max-prompt-tokens 200
    ({"prompt": PROMPT, "max_tokens": 65}, "max_tokens"),  # over --max-tokens-limit 64
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "n": 2}, "n"),
    ({"prompt": PROMPT, "seed": "x"}, "seed"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": PROMPT, "logprobs": 3}, "logprobs"),
])
def test_bad_parameters_get_400_with_an_error_object(server, body, param):
    status, reply = server.http("POST", "/v1/completions", body)
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]


def test_bad_bodies_get_400(server):
    status, reply = server.http("POST", "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in reply["error"]["message"]
    status, reply = server.http("POST", "/v1/completions", {"prompt": "x" * 70000})
    assert status == 400 and "body" in reply["error"]["message"]
    status, reply = server.http("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert status == 400 and reply["error"]["param"] == "messages"
    status, reply = server.http("GET", "/v1/nothing")
    assert status == 404 and "error" in reply
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="m", prompt=PROMPT, max_tokens=10_000)


def _stream_then_hang_up(port: int, tokens: int) -> int:
    """Start a streaming completion, read a few events, close the socket; returns events read."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    body = json.dumps({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 3:
        chunk = s.recv(65536)
        assert chunk, "the server closed the stream early"
        got += chunk
    s.close()
    return got.count(b"data: ")


def _settled(server: Running, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        h = server.health()
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"requests still held: {h}")


def _kv_bytes(server: Running) -> int:
    _, text = server.http("GET", "/metrics")
    return int(next(l for l in text.splitlines() if l.startswith("expertcache_kv_cache_bytes ")).split()[1])


def _rss(server: Running) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))


def test_a_disconnect_mid_stream_frees_the_slot(server):
    server.client().completions.create(model="m", prompt=PROMPT, max_tokens=64, temperature=0)  # the same work, to the end
    _settled(server)
    before = _rss(server)
    for _ in range(3):
        assert _stream_then_hang_up(server.port, 64) >= 3
        _settled(server)
    assert _kv_bytes(server) == 0
    assert _rss(server) < before + (16 << 20)  # memory back to its level (allocator slack aside)
    _, text = server.http("GET", "/metrics")
    assert 'expertcache_finished_total{reason="disconnected"}' in text
    c = server.client().completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
    assert c.usage.completion_tokens == 8 or c.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_finish_without_leaks(server):
    client = server.client()
    client.completions.create(model="m", prompt=PROMPT, max_tokens=4)  # warm: the server's own threads exist
    _settled(server)
    threads0, fds0 = server.threads_and_fds()
    prompts = [f"{PROMPT} there was a {w}" for w in ("cat", "dog", "king", "ship", "tree", "girl", "boy", "bird")]

    def one(i: int) -> tuple[int, str | None, int]:
        stream = client.completions.create(model="m", prompt=prompts[i % 8], max_tokens=16 + i % 5, temperature=0.7, seed=i,
                                           stream=True, stream_options={"include_usage": True})
        finish, usage, pieces = None, None, 0
        for ch in stream:
            if ch.choices:
                pieces += 1
                finish = ch.choices[0].finish_reason or finish
            if ch.usage is not None:
                usage = ch.usage.completion_tokens
        return i, finish, usage

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, finish, usage in results:
        assert finish in ("length", "stop")
        assert usage == 16 + i % 5 if finish == "length" else 1 <= usage <= 16 + i % 5
    _settled(server)
    assert _kv_bytes(server) == 0
    deadline = time.monotonic() + 10
    while server.threads_and_fds() > (threads0, fds0) and time.monotonic() < deadline:
        time.sleep(0.1)  # keep-alive connections close on their timeout
    threads, fds = server.threads_and_fds()
    assert threads <= threads0 and fds <= fds0, ((threads0, fds0), (threads, fds))
    _, text = server.http("GET", "/metrics")
    batch = {l.split('le="')[1].split('"')[0]: float(l.split()[-1]) for l in text.splitlines()
             if l.startswith("expertcache_batch_size_bucket")}
    assert batch["4"] < batch["+Inf"]  # steps ran with more than 4 rows: they were batched


def test_a_full_queue_answers_429_at_once():
    """One request running, one waiting (--max-batch 1, --max-queue 1): a third gets 429 at once.
    The running one ends by itself (the demo's story stops after ~160 tokens, about a second): if it
    ends between the check that one waits and the third request, the queue was not full when the
    third came, so the attempt proves nothing and runs again (a server that never answers 429 fails
    every attempt)."""
    s = start("--max-batch", "1", "--max-queue", "1", "--max-tokens-limit", "256")
    try:
        c = openai.OpenAI(base_url=s.base, api_key="none", max_retries=0, timeout=60)
        refused = 0
        for _ in range(3):
            with cf.ThreadPoolExecutor(2) as pool:
                long = [pool.submit(c.completions.create, model="m", prompt=PROMPT, max_tokens=256, temperature=0) for _ in range(2)]
                deadline = time.monotonic() + 30
                while s.health()["waiting"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                t0 = time.monotonic()
                try:
                    c.completions.create(model="m", prompt=PROMPT, max_tokens=4)
                except openai.RateLimitError:
                    assert time.monotonic() - t0 < 5
                    refused += 1
                for f in long:
                    assert f.result().usage.completion_tokens >= 1
            if refused:
                break
        assert refused == 1
    finally:
        rc, err = stop(s)
    assert rc == 0, err


def test_sigterm_drains_a_running_stream():
    s = start("--drain-seconds", "30")
    stream = openai.OpenAI(base_url=s.base, api_key="none", max_retries=0, timeout=60).completions.create(
        model="m", prompt=PROMPT, max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))
    s.proc.send_signal(signal.SIGTERM)
    got = [first, *stream]
    rc, err = s.proc.wait(timeout=60), s.proc.stderr.read()
    assert rc == 0, err
    assert got[-1].choices[0].finish_reason in ("length", "stop")


def test_the_front_is_its_own_process_without_torch():
    """The HTTP front runs apart from the engine (the event loop's Python does not hold the engine
    thread's GIL) and imports no torch; killing it ends the engine's process with one line."""
    s = start()
    try:
        engine, front = s.pids()
        with open(f"/proc/{front}/maps") as f:
            assert "libtorch" not in f.read()
        with open(f"/proc/{engine}/maps") as f:
            assert "libtorch" in f.read()
        assert s.health()["status"] == "ok"  # the front answers from the engine's side
        os.kill(front, signal.SIGKILL)
        rc, err = s.proc.wait(timeout=60), s.proc.stderr.read()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    assert rc == 1 and "HTTP front was killed" in err and err.count("\n") == 1, err


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_front_exits_when_the_engine_dies():
    s = start()
    engine, front = s.pids()
    os.kill(engine, signal.SIGKILL)
    s.proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _running(front) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(front), "the front outlived the engine's process"


def test_a_taken_port_is_one_line():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "expertcache", "serve", "--port", str(port)], capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "cannot listen" in out.stderr


@pytest.mark.parametrize("flags,message", [(["--prefill-wait", "-5"], "--prefill-wait"), (["--max-batch", "0"], "--max-batch")])
def test_bad_flags_are_one_line(flags, message):
    out = subprocess.run([sys.executable, "-m", "expertcache", "serve", "--port", "0", *flags], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
