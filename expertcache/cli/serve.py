"""expertcache serve: an OpenAI-compatible HTTP server with continuous, expert-aware batching."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys

from ..errors import ExpertCacheError
from .flags import add_engine_arguments, engine_config, fmt_bytes

API_KEY_ENV = "EXPERTCACHE_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed at start)")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 and /metrics (default: ${API_KEY_ENV} when set, else none)")
    s.add_argument("--model-id", default=None, help="the model's name in the API (default: the model folder's name)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoding together in one forward (default 8)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for the batch; more get 429 at once (default 64)")
    s.add_argument("--batching", choices=("fcfs", "expert-aware"), default="fcfs",
                   help="which waiting request joins next: first come first served, or the one whose predicted "
                        "experts are resident (bounded wait) (default fcfs)")
    s.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens fed per step while other requests decode (default 128)")
    s.add_argument("--prefill-wait", type=float, default=0.0, metavar="MS",
                   help="while requests decode, how long a new prompt may wait for others to go in with it in one "
                        "forward (one pass over their experts instead of one each): throughput for time to first "
                        "token (default 0: at once)")
    s.add_argument("--kv-budget", default=None,
                   help="KV cache memory for the batch, e.g. 256MB (default: 4096 tokens' worth; with --memory-limit "
                        "it is kept out of the experts' share)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: the model's context - 1)")
    s.add_argument("--max-tokens-limit", type=int, default=1024, help="most tokens a request may ask for (default 1024)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    s.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds after which a request still generating ends with finish_reason length (default 600)")
    s.add_argument("--drain-seconds", type=float, default=10.0,
                   help="on SIGTERM or Ctrl-C, seconds running requests get to finish before they are cancelled (default 10)")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check(args: argparse.Namespace) -> None:
    for name, lo in (("max_batch", 1), ("max_queue", 0), ("prefill_chunk", 1), ("max_tokens_limit", 1), ("max_body_bytes", 1024)):
        if getattr(args, name) < lo:
            raise ExpertCacheError(f"--{name.replace('_', '-')} must be at least {lo}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ExpertCacheError("--max-prompt-tokens must be at least 1")
    if not 0 <= args.port <= 65535:
        raise ExpertCacheError(f"--port must be in 0..65535, got {args.port}")
    if not args.prefill_wait >= 0:
        raise ExpertCacheError("--prefill-wait must be at least 0 (milliseconds)")
    if not args.request_timeout > 0 or args.drain_seconds < 0:
        raise ExpertCacheError("--request-timeout must be positive and --drain-seconds at least 0")


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ExpertCacheError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ExpertCacheError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? try --port 0)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _spawn_front(sock: socket.socket):
    """The HTTP front in its own process (`serve/front.py`), on the listening socket, joined to
    this one by a private socket pair; its own session, so a terminal's Ctrl-C reaches this
    process alone, which passes it on once."""
    ours, theirs = socket.socketpair()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this package's, however it was found
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "expertcache.serve.front", str(sock.fileno()), str(theirs.fileno())],
                            pass_fds=(sock.fileno(), theirs.fileno()), stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    theirs.close()
    return proc, ours


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def _forward_signals(front) -> dict:
    """SIGTERM and SIGINT go on to the front, which drains (a second one: stops draining); when it
    exits, this process stops the batch."""
    def forward(sig, frame) -> None:
        if front.poll() is None:
            front.send_signal(signal.SIGTERM)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore(old: dict) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


def _reap(front, timeout: float = 30.0) -> int:
    try:
        return front.wait(timeout)
    except subprocess.TimeoutExpired:
        front.kill()
        return front.wait()


def run(args: argparse.Namespace) -> int:
    _check(args)
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("starlette") is None:
        raise ExpertCacheError("expertcache serve needs starlette and uvicorn: pip install -e . installs them") from None
    from ..config import RESERVE_CONTEXT, RESERVE_WORKSPACE, parse_size
    from ..engine import Engine
    from ..serve.bridge import Bridge, Limits
    from ..serve.wire import Frames, expect
    from ..serve.batcher import Batcher, batchable
    from ..serve.metrics import Metrics
    from ..serve.scheduler import make_scheduler

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    kv_budget = parse_size(args.kv_budget, "--kv-budget") if args.kv_budget is not None else None
    fixed = {}
    if kv_budget is not None and args.memory_limit is not None and args.memory_reserve is None:
        fixed["memory_reserve"] = str(kv_budget + RESERVE_WORKSPACE)  # the limit keeps the batch's KV out of the experts'
    sock = _bind(args.host, args.port)  # before the model loads: a taken port fails at once
    bound = sock.getsockname()[:2]
    front = wire = None
    try:
        if not _loopback(args.host) and api_key is None:
            print(f"expertcache: warning: listening on {args.host} without --api-key: anyone who reaches this "
                  "address can use the model", file=sys.stderr)
        front, wire = _spawn_front(sock)  # before the model loads: its memory counts against --memory-limit
        try:
            expect(wire, Frames(), [], "imported", 120)
        except (EOFError, OSError) as e:
            raise ExpertCacheError(f"the HTTP front did not start ({e}; its error, if any, is above)") from None
        if args.memory_limit not in (None, "auto"):  # a stated limit covers both processes; auto sees the front's use
            fixed["memory_limit"] = str(parse_size(args.memory_limit, "memory limit") - _rss(front.pid))
        with Engine(engine_config(args, **fixed)) as engine:
            max_batch = args.max_batch
            if max_batch > 1 and not batchable(engine):
                print("expertcache: warning: this model's cache (sliding window or linear attention) cannot be "
                      "batched here: one request runs at a time", file=sys.stderr)
                max_batch = 1
            metrics = Metrics()
            batcher = Batcher(engine, max_batch=max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                              kv_budget_bytes=kv_budget, scheduler=make_scheduler(args.batching), on_step=metrics.on_step,
                              prefill_wait=args.prefill_wait / 1000)
            if kv_budget is None:  # as much as --memory-limit's default reserve keeps for the KV cache
                batcher.kv_budget_bytes = kv_budget = RESERVE_CONTEXT * batcher.kv_per_token
            model_id = args.model_id or (engine.checkpoint.model_dir.name if args.model is not None else "expertcache-demo")
            limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit)
            bridge = Bridge(engine, batcher, model_id=model_id, limits=limits, metrics=metrics)
            batcher.start()
            try:
                pending = bridge.handshake(wire, {
                    "model_id": model_id, "api_key": api_key, "max_body_bytes": args.max_body_bytes,
                    "request_timeout": args.request_timeout, "drain_seconds": args.drain_seconds,
                    "limit_concurrency": args.max_queue + max_batch + 16})
            except (EOFError, OSError) as e:
                raise ExpertCacheError(f"the HTTP front did not start ({e}; its error, if any, is above)") from None
            sock.close()  # the front listens on it now
            host, port = bound
            shown = f"[{host}]" if ":" in host else host
            signals = _forward_signals(front)
            try:
                print(f"[expertcache] serving {model_id} at http://{shown}:{port}/v1 | batch {max_batch}, "
                      f"{args.batching} | experts {fmt_bytes(engine.budget_bytes)}, KV {fmt_bytes(kv_budget)}"
                      + (" | API key required" if api_key else ""), flush=True)
                bridge.serve(wire, pending)  # until the front exits (drained after SIGTERM) or dies
            finally:
                _restore(signals)
                batcher.stop(timeout=30)
                bridge.close()
            code = _reap(front)
            front = None
            if batcher.error is not None:
                raise ExpertCacheError(f"the engine stopped: {batcher.error}")
            if code < 0:
                raise ExpertCacheError(f"the HTTP front was killed (signal {-code}); the server stopped")
            if code > 0:
                raise ExpertCacheError(f"the HTTP front exited with status {code} (its error is above); the server stopped")
    finally:
        sock.close()
        if wire is not None:
            wire.close()
        if front is not None and front.poll() is None:
            front.terminate()
            _reap(front)
    print("[expertcache] server stopped", file=sys.stderr, flush=True)
    return 0
