"""Continuous batching: requests join and leave one running batch at token boundaries.

One worker thread owns the engine. Each turn: drop cancelled requests, admit waiting ones (the
scheduler's order, within the KV budget), run ONE forward for every running row ([B, 1] over a
KV cache whose rows are left-padded, per-row positions, an attention mask over the padding) with
the admitted prompts' next tokens beside them (lean.mixed: each prompt's attention on its own
cache, every expert computed and loaded once for all the tokens routed to it), and join a prompt
to the batch once it is in. With nothing decoding, fresh prompts go in together in one padded
forward (padding routed to no expert); where the decode step cannot take prompts (_mixes), they
go in after it, in a forward of their own (a long one in chunks of the turn's budget). A request
alone takes Engine.generate's own forwards; in a batch its logits agree within the batched
kernels' rounding. docs/ARCHITECTURE.md ("Serving") has the design and its measurements.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import native
from ..decoding import LEAN_ATTR, Decoding
from ..lean import ROOM_ATTR, ROOM_LIMIT_ATTR, Chunk, room_positions
from ..engine import Engine, _eos_ids, _kv_bytes_per_token, _pick

log = logging.getLogger(__name__)

PREFILL_CHUNK = 128  # prompt tokens fed per turn while other requests decode
GROUP_TOKENS = 2048  # with no row decoding, whole prompts fed together in one forward, up to this many tokens


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


@dataclass(eq=False)
class Request:
    """One generation request's state while the batcher holds it. `emit(token, finish)` is called
    from the worker thread for each new token (finish None) and once at the end with token None
    and the finish reason ("stop", "length", "cancelled", "error: ...")."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[int | None, str | None], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    out: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    skipped: int = 0  # admissions that passed it over (the scheduler's starvation bound)
    generator: torch.Generator | None = None
    decoding: Decoding | None = None  # its own cache while its prompt goes in
    fed: int = 0  # prompt tokens fed so far
    admitted: float | None = None  # when it left the waiting queue

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def cancel(self) -> None:
        self.cancelled = True


class Batcher:
    """The running batch and the waiting queue; `start()` runs the loop in a worker thread."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = PREFILL_CHUNK,
                 kv_budget_bytes: int | None = None, scheduler=None, on_step: Callable[[dict], None] | None = None,
                 prefill_wait: float = 0.0) -> None:
        from .scheduler import FCFS

        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or prefill_wait < 0:
            raise ValueError("max_batch and prefill_chunk must be at least 1, max_queue and prefill_wait at least 0")
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_wait = prefill_wait  # seconds a fresh prompt may wait for others while rows decode
        self.kv_per_token = _kv_bytes_per_token(engine.checkpoint.config, next(self.model.parameters()).dtype)
        self.kv_budget_bytes = kv_budget_bytes
        self.scheduler = scheduler or FCFS()
        self.on_step = on_step
        self.on_turn: Callable[[], None] | None = None  # after each turn and at the end (the bridge's wake-up)
        self.eos = _eos_ids(engine.generation_config, self.model.config)
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.waiting: deque[Request] = deque()
        self.admitting: deque[Request] = deque()  # admitted, prompt going in (oldest first)
        self.rows: list[Request] = []  # the running batch, a row each
        self.past = None  # the batch's KV cache (transformers' DynamicCache or native.KVCache)
        self.mask: torch.Tensor | None = None  # [B, S] 1 = a real position, 0 = left padding
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.feeding: list[int] | None = None  # the token ids of the running forward, a row each (observers)
        self.scheduler.attach(self)

    # --- from other threads --------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            free = max(0, self.max_batch - len(self.rows) - len(self.admitting))  # rows the next turn fills
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue {self.max_queue})")
            self.waiting.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        with self._cond:
            req.cancel()
            self._cond.notify()

    def start(self) -> "Batcher":
        self._thread = threading.Thread(target=self._loop, name="expertcache-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything still held and end the loop."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def depth(self) -> dict[str, int]:
        return {"waiting": len(self.waiting), "running": len(self.rows) + len(self.admitting),
                "prefilling": len(self.admitting)}

    def kv_bytes(self) -> int:
        """KV cache bytes the batch and the prompts going in hold now (padding included), and the
        room the lean decode steps keep beyond the rows' cache (lean.KV_ROOM positions a row at most)."""
        mask, past = self.mask, self.past
        return ((0 if mask is None else mask.numel()) + self._fed() + room_positions(past)) * self.kv_per_token

    def _fed(self) -> int:
        """Prompt positions the requests going in hold now."""
        with self._cond:  # the worker changes `admitting` under this lock
            return sum(r.fed for r in self.admitting)

    # --- the worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._stop and self.idle():
                            self._cond.wait()
                        if self._stop:
                            break
                    self.turn()
        except BaseException as e:  # a failed forward ends every request with the error, never a hang
            log.exception("the batcher stopped")
            self.error = e
        finally:
            reason = "cancelled" if self.error is None else f"error: {self.error}"
            with self._cond:
                self._stop = True
                everyone = [*self.waiting, *self.admitting, *self.rows]
                self.waiting.clear()
                self.admitting.clear()
            self.rows, self.past, self.mask = [], None, None
            for r in everyone:
                if r.finish_reason is None:
                    self._finish(r, reason)
            if self.on_turn is not None:
                self.on_turn()

    def idle(self) -> bool:
        return not (self.waiting or self.admitting or self.rows)

    def turn(self) -> None:
        """One turn of the loop (tests call it directly)."""
        self._drop_cancelled()
        self._admit()
        t0 = time.perf_counter()
        batch = len(self.rows)
        due = bool(self.admitting) and self._prefill_due()
        prefill = 0
        if self.rows and due and self._mixes():  # the prompts' next tokens go through the rows' step
            prefill = self._decode_step(self._chunks())
        else:
            if self.rows:
                self._decode_step()
            prefill = self._prefill() if due else 0
        if self.on_step is not None and (batch or prefill):
            self.on_step({"batch": batch, "prefill_tokens": prefill, "seconds": time.perf_counter() - t0})
        if self.on_turn is not None:
            self.on_turn()

    def _bind(self, rows: list[Request] | None, mask: torch.Tensor | None = None) -> None:
        """Tell a pre-gate (Read-ME) which request each row of the next forward continues, so each
        keeps its own context; other predictors have none to keep."""
        bind = getattr(self.engine.runtime.predictor, "bind", None)
        if bind is not None:
            bind(rows, mask)

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason, r.finished = reason, time.perf_counter()
        r.decoding = None
        forget = getattr(self.engine.runtime.predictor, "forget", None)
        if forget is not None:
            forget(r)
        try:
            r.emit(None, reason)
        except Exception:  # a consumer that went away must not stop the batch
            log.debug("emit failed", exc_info=True)

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in (*self.waiting, *self.admitting) if r.cancelled]
            for r in gone:
                (self.waiting if r in self.waiting else self.admitting).remove(r)
        for r in gone:
            self._finish(r, "cancelled")
        if any(r.cancelled for r in self.rows):
            for r in self.rows:
                if r.cancelled:
                    self._finish(r, "cancelled")
            self._keep_rows([i for i, r in enumerate(self.rows) if not r.cancelled])

    def _kv_fits(self, extra: Request) -> bool:
        held = [*self.rows, *self.admitting]
        if self.kv_budget_bytes is None or not held:
            return True  # one request alone always runs
        group = [*held, extra]
        worst = len(group) * max(len(r.prompt) + r.max_tokens for r in group)
        return worst * self.kv_per_token <= self.kv_budget_bytes  # the rows' room gives way (_let_room_go)

    def _let_room_go(self) -> None:
        """The rows' room beyond their cache (lean._room, what the budget left) is let go, their keys
        and values copied out of it, when a request is admitted: its KV cache takes that share."""
        for layer in self.past.layers if self.past is not None else ():
            if layer.__dict__.pop(ROOM_ATTR, None) is not None:
                layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()

    def _admit(self) -> None:
        with self._cond:
            if not self.waiting or not self.scheduler.ready(self):
                return
            while self.waiting and len(self.rows) + len(self.admitting) < self.max_batch:
                r = self.scheduler.pick(self.waiting, self)
                if not self._kv_fits(r):
                    break
                self.waiting.remove(r)
                for other in self.waiting:
                    other.skipped += 1 if other.submitted < r.submitted else 0
                if r.seed is not None:
                    r.generator = torch.Generator().manual_seed(r.seed)
                r.decoding = Decoding(self.model)
                r.admitted = time.perf_counter()
                self.admitting.append(r)
                self._let_room_go()

    def _pick(self, r: Request, logits: torch.Tensor) -> int:
        return _pick(logits, greedy=r.greedy, temperature=r.temperature, top_p=r.top_p, generator=r.generator)

    def _emit(self, r: Request, token: int) -> bool:
        """Give r its next token; True when r is done (stop token, max_tokens, the context, cancelled)."""
        r.out.append(token)
        if r.first_token is None:
            r.first_token = time.perf_counter()
        r.emit(token, None)
        if token in self.eos:
            self._finish(r, "stop")
        elif len(r.out) >= r.max_tokens or (self.context is not None and len(r.prompt) + len(r.out) >= self.context):
            self._finish(r, "length")
        elif r.cancelled:
            self._finish(r, "cancelled")
        return r.finish_reason is not None

    # --- prompts ---------------------------------------------------------------------------------
    def _prefill_due(self) -> bool:
        """Whether admitted prompts go in this turn. While rows decode, a fresh prompt waits up to
        prefill_wait for others, so several share one forward (one pass over their experts,
        not one each); it goes at once when nothing decodes, when a turn's worth of prompt
        tokens is waiting, when no one else can join the batch, or when it is part-fed."""
        if not self.rows or self.prefill_wait <= 0:
            return True
        head = self.admitting[0]
        if head.fed or len(self.rows) + len(self.admitting) >= self.max_batch:
            return True
        if sum(len(r.prompt) for r in self.admitting) >= self.prefill_chunk:
            return True
        return time.perf_counter() - head.admitted >= self.prefill_wait

    def _prefill(self) -> int:
        """Feed admitted prompts, oldest first, within this turn's prompt-token budget; returns the
        tokens fed. Fresh prompts that fit the budget whole go in together, one padded forward
        (their loads shared); a prompt longer than what is left goes in alone, in chunks."""
        budget = self.prefill_chunk if self.rows else None  # none decoding: prompts go in whole
        group, total = [], 0
        for r in self.admitting:
            if r.fed or (budget is not None and total + len(r.prompt) > budget) or (budget is None and group and total + len(r.prompt) > GROUP_TOKENS):
                break
            group.append(r)
            total += len(r.prompt)
        if len(group) > 1:
            self._prefill_group(group)
            return total
        r = self.admitting[0]
        left = len(r.prompt) - r.fed
        n = left if budget is None else min(left, budget)
        self.feeding = r.prompt[r.fed : r.fed + n]
        self._bind([r])
        try:
            logits = r.decoding.feed(self.feeding)[-1]
        finally:
            self.feeding = None
            self._bind(None)
        r.fed += n
        if r.fed == len(r.prompt):
            with self._cond:
                self.admitting.popleft()
            if not self._emit(r, self._pick(r, logits)):
                self._merge(r.decoding.past, torch.ones((1, len(r.prompt)), dtype=torch.long), [r])
            r.decoding = None
        return n

    def _prefill_group(self, group: list[Request]) -> None:
        """Several whole prompts in one forward: left-padded to the longest, padding masked out of
        attention and routed to no expert; the rows still going join the batch."""
        width = max(len(r.prompt) for r in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        pos = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, r in enumerate(group):
            n = len(r.prompt)
            ids[i, width - n :], pos[i, width - n :], mask[i, width - n :] = torch.tensor(r.prompt), torch.arange(n), 1
        runtime = self.engine.runtime
        self.feeding = [t if m else -1 for t, m in zip(ids.flatten().tolist(), mask.flatten().tolist())]
        runtime.token_mask, runtime.row_blocks = mask.flatten().bool(), True
        self._bind(group, mask)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        finally:
            self.feeding, runtime.token_mask, runtime.row_blocks = None, None, False
            self._bind(None)
        with self._cond:
            for r in group:
                self.admitting.remove(r)
        keep = []
        for i, r in enumerate(group):
            r.fed, r.decoding = len(r.prompt), None
            if not self._emit(r, self._pick(r, out.logits[i, -1])):
                keep.append(i)
        if keep:
            past = out.past_key_values
            self._merge(past, _select_rows(past, mask, keep), [group[i] for i in keep])

    # --- the batch --------------------------------------------------------------------------------
    def _mixes(self) -> bool:
        """Whether prompts may go in beside the rows' decode step, in one forward (lean.mixed):
        the lean step runs on the batch's cache, and nothing the engine does depends on which
        phase a token is in (the routing runs in both phases or neither, no --miss-copy for
        decode misses) or on each row being one sequence (a pre-gate bound to its rows)."""
        lean = self.model.__dict__.get(LEAN_ATTR)
        runtime = self.engine.runtime
        phases = set(getattr(runtime.routing, "applies_to", ()))
        return (lean is not None and lean.usable(self.past) and getattr(runtime.predictor, "bind", None) is None
                and runtime.cache.low_store is None and ("prefill" in phases) == ("decode" in phases))

    def _chunks(self) -> list[tuple[Request, int]]:
        """The admitted prompts' next tokens for this turn, oldest first, prefill_chunk tokens in
        all: (request, how many of its tokens)."""
        chunks, left = [], self.prefill_chunk
        for r in self.admitting:
            n = min(len(r.prompt) - r.fed, left)
            if n <= 0:
                break
            chunks.append((r, n))
            left -= n
        return chunks

    def _decode_step(self, chunks: list[tuple[Request, int]] = ()) -> int:
        """One forward for every running row, with `chunks` (admitted prompts' next tokens, only
        where _mixes) in it; returns the prompt tokens fed."""
        rows = self.rows
        ids = torch.tensor([[r.out[-1]] for r in rows])
        pos = torch.tensor([[len(r.prompt) + len(r.out) - 1] for r in rows])
        mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        lean = self.model.__dict__.get(LEAN_ATTR)
        parts = [Chunk(r.prompt[r.fed : r.fed + n], r.fed, r.decoding.past if r.decoding.past is not None
                       else lean.new_cache(), r.fed + n == len(r.prompt)) for r, n in chunks]
        self.feeding = [r.out[-1] for r in rows] + [t for c in parts for t in c.tokens]
        self._bind(rows)
        self.engine.runtime.row_blocks = len(rows) + len(parts) > 1  # several requests: a batch's rounding
        ends: list[torch.Tensor | None] = []  # the chunks' last logits (lean.mixed)
        try:
            if parts or (lean is not None and lean.usable(self.past)):  # without transformers' module calls (chunks: _mixes)
                if self.kv_budget_bytes is not None:  # the rows' room (lean._room) within the budget's rest
                    spare = self.kv_budget_bytes // self.kv_per_token - mask.numel() - self._fed() - sum(n for _, n in chunks)
                    for layer in self.past.layers:
                        layer.__dict__[ROOM_LIMIT_ATTR] = spare
                logits, ends = lean.mixed(self.feeding[: len(rows)], pos[:, 0].tolist(), self.past, mask, parts)  # [B, V]
            else:
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.past,
                                 use_cache=True, logits_to_keep=1)
                self.past, logits = out.past_key_values, out.logits[:, -1]  # [B, V]
        finally:
            self.feeding, self.engine.runtime.row_blocks = None, False
            self._bind(None)
        self.mask = mask
        done = [self._emit(r, self._pick(r, logits[i])) for i, r in enumerate(rows)]
        if any(done):
            self._keep_rows([i for i, d in enumerate(done) if not d])
        for (r, n), c, end in zip(chunks, parts, ends):
            r.decoding.past = c.past
            r.decoding.tokens += c.tokens
            r.fed += n
            if end is not None:  # the prompt is in: its first token, and its row joins the batch
                with self._cond:
                    self.admitting.remove(r)
                if not self._emit(r, self._pick(r, end)):
                    self._merge(c.past, torch.ones((1, len(r.prompt)), dtype=torch.long), [r])
                r.decoding = None
        return sum(n for _, n in chunks)

    def _merge(self, past, mask: torch.Tensor, rows: list[Request]) -> None:
        """Add rows (their cache `past` and mask [n, S]) to the batch, the shorter side padded on the left."""
        if self.past is None:
            self.past, self.mask, self.rows = past, mask, list(rows)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.past.layers, past.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
            mine.__dict__.pop(ROOM_ATTR, None)  # the keys are new tensors: the old room goes
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.rows.extend(rows)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep the rows `keep`; drop the padding columns no remaining row needs."""
        if not keep:
            self.rows, self.past, self.mask = [], None, None
            return
        self.rows = [self.rows[i] for i in keep]
        self.mask = _select_rows(self.past, self.mask, keep)


def _select_rows(past, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep rows `keep` of a cache and its mask [B, S], in place for the cache, without the
    columns left of the first that any kept row uses (padding in every row); returns the mask."""
    index = torch.tensor(keep)
    mask = mask[index]
    first = int(mask.any(dim=0).long().argmax())
    for layer in past.layers:
        layer.keys = layer.keys[index, :, first:].contiguous()
        layer.values = layer.values[index, :, first:].contiguous()
        layer.__dict__.pop(ROOM_ATTR, None)  # the keys are new tensors: the old room goes
    return mask[:, first:].contiguous()


def _pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """t with zeros in front along `dim` up to `width`."""
    short = width - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def batchable(engine: Engine) -> bool:
    """Whether the model's KV cache is plain per-layer keys and values (transformers' DynamicLayer)
    that rows can be padded and stacked in; other caches (sliding windows, linear attention) run
    one request at a time. The engine's own models (native.py) keep such a cache."""
    if isinstance(engine.model, native.CausalLM):
        return True
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        layers = DynamicCache(config=engine.model.config).layers
    except Exception:  # a family transformers builds another cache for
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
