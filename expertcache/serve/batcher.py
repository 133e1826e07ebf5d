"""Continuous batching: requests join and leave one running batch at token boundaries.

One worker thread owns the engine. Each turn of its loop:
  1. drops cancelled requests (their batch row and KV cache go at once);
  2. admits waiting requests while the batch has room and the KV budget covers them, in the
     order the scheduler chooses (scheduler.py: FCFS or expert-aware); an admitted request is a
     new row of the batch with nothing in its cache yet;
  3. runs ONE forward for the whole batch: [B, C] tokens, where a decoding row feeds its last
     token and a row whose prompt is still going in feeds its next chunk. While any row decodes,
     the prompts get `prefill_chunk` tokens a turn between them (oldest first), so running
     streams keep their pace; with no row decoding a prompt goes in whole, as Engine.generate
     feeds it. Each row's tokens sit at the right of its C columns, padding at the left; padding
     is masked out of attention (the 2-D attention mask) and routed to no expert (the runtime's
     token mask), and every row has its own positions. The MoE layers compute each expert once
     for all the batch's tokens routed to it: a batch shares its loads;
  4. gives every row whose prompt is in its next token (the last column's logits), ends the rows
     that are done, and compacts the KV cache when padding exceeds a quarter of it (each row's
     real positions moved right, rows left-padded to the longest).

Exactness: a request alone takes the same forwards as Engine.generate (same tokens, bit for bit).
In a batch its rows go through batched kernels and masked attention over padding: its logits
agree with the lone run within the kernels' rounding (float32: ~1e-5 relative; bfloat16: a few
units in the last place), so greedy tokens agree unless two candidates tie within that rounding
(tests/serve/test_batcher.py measures both).

KV memory: a batch of B rows compacted to S positions holds B * S * kv_bytes_per_token. A request
is admitted only when the batch, with it, stays within `kv_budget_bytes` at the longest it can
grow to (every row at the longest prompt + max_tokens among them); one request alone always runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engine import Engine, _eos_ids, _kv_bytes_per_token, _pick

log = logging.getLogger(__name__)

PREFILL_CHUNK = 128  # prompt tokens fed per turn while other requests decode


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
    stop_ids: frozenset[int] = frozenset()
    out: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    skipped: int = 0  # admissions that passed it over (the scheduler's starvation bound)
    generator: torch.Generator | None = None
    fed: int = 0  # prompt tokens fed so far

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def cancel(self) -> None:
        self.cancelled = True


class Batcher:
    """The running batch and the waiting queue; `start()` runs the loop in a worker thread."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = PREFILL_CHUNK,
                 kv_budget_bytes: int | None = None, scheduler=None, on_step: Callable[[dict], None] | None = None) -> None:
        from .scheduler import FCFS

        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be at least 1, max_queue at least 0")
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.kv_per_token = _kv_bytes_per_token(engine.checkpoint.config, next(self.model.parameters()).dtype)
        self.kv_budget_bytes = kv_budget_bytes
        self.scheduler = scheduler or FCFS()
        self.on_step = on_step
        self.eos = _eos_ids(engine.generation_config, self.model.config)
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # the running batch, a row each
        self.past = None  # the batch's KV cache (transformers DynamicCache)
        self.mask: torch.Tensor | None = None  # [B, S] 1 = a real position, 0 = left padding
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.feeding: list[int] | None = None  # the token ids of the running forward, a row each (observers)
        self.feeding_decode = False
        self.scheduler.attach(self)

    # --- from other threads --------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
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
        return {"waiting": len(self.waiting), "running": len(self.rows),
                "prefilling": sum(r.fed < len(r.prompt) for r in self.rows)}

    def kv_bytes(self) -> int:
        """KV cache bytes the batch holds now (padding included)."""
        return (0 if self.mask is None else self.mask.numel()) * self.kv_per_token

    # --- the worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._stop and not (self.waiting or self.rows):
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
                everyone = [*self.waiting, *self.rows]
                self.waiting.clear()
            self.rows, self.past, self.mask = [], None, None
            for r in everyone:
                if r.finish_reason is None:
                    self._finish(r, reason)

    def idle(self) -> bool:
        return not (self.waiting or self.rows)

    def turn(self) -> None:
        """One turn of the loop (tests call it directly)."""
        self._drop_cancelled()
        self._admit()
        if not self.rows:
            return
        t0 = time.perf_counter()
        batch, prefill = self._step()
        if self.on_step is not None:
            self.on_step({"batch": batch, "prefill_tokens": prefill, "seconds": time.perf_counter() - t0})

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason, r.finished = reason, time.perf_counter()
        try:
            r.emit(None, reason)
        except Exception:  # a consumer that went away must not stop the batch
            log.debug("emit failed", exc_info=True)

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._finish(r, "cancelled")
        if any(r.cancelled for r in self.rows):
            for r in self.rows:
                if r.cancelled:
                    self._finish(r, "cancelled")
            self._keep_rows([i for i, r in enumerate(self.rows) if not r.cancelled])

    def _kv_fits(self, extra: Request) -> bool:
        if self.kv_budget_bytes is None or not self.rows:
            return True  # one request alone always runs
        group = [*self.rows, extra]
        worst = len(group) * max(len(r.prompt) + r.max_tokens for r in group) * self.kv_per_token
        return worst <= self.kv_budget_bytes

    def _admit(self) -> None:
        with self._cond:
            while self.waiting and len(self.rows) < self.max_batch:
                r = self.scheduler.pick(self.waiting, self)
                if not self._kv_fits(r):
                    break
                self.waiting.remove(r)
                for other in self.waiting:
                    other.skipped += 1 if other.submitted < r.submitted else 0
                if r.seed is not None:
                    r.generator = torch.Generator().manual_seed(r.seed)
                self._add_row(r)

    def _pick(self, r: Request, logits: torch.Tensor) -> int:
        return _pick(logits, greedy=r.greedy, temperature=r.temperature, top_p=r.top_p, generator=r.generator)

    def _emit(self, r: Request, token: int) -> bool:
        """Give r its next token; True when r is done (stop token, max_tokens, the context, cancelled)."""
        r.out.append(token)
        if r.first_token is None:
            r.first_token = time.perf_counter()
        r.emit(token, None)
        if token in self.eos or token in r.stop_ids:
            self._finish(r, "stop")
        elif len(r.out) >= r.max_tokens or (self.context is not None and len(r.prompt) + len(r.out) >= self.context):
            self._finish(r, "length")
        elif r.cancelled:
            self._finish(r, "cancelled")
        return r.finish_reason is not None

    # --- one forward for the batch --------------------------------------------------------------
    def _inputs(self) -> tuple[list[list[int]], list[int]]:
        """Each row's tokens this turn and the position of its first."""
        budget = self.prefill_chunk if any(r.fed == len(r.prompt) for r in self.rows) else None
        tokens, starts = [], []
        for r in self.rows:
            if r.fed < len(r.prompt):
                n = len(r.prompt) - r.fed if budget is None else min(len(r.prompt) - r.fed, budget)
                if budget is not None:
                    budget -= n
                tokens.append(r.prompt[r.fed : r.fed + n])
                starts.append(r.fed)
            else:
                tokens.append([r.out[-1]])
                starts.append(len(r.prompt) + len(r.out) - 1)
        return tokens, starts

    def _step(self) -> tuple[int, int]:
        rows = self.rows
        tokens, starts = self._inputs()
        width = max(len(t) for t in tokens)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        new = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (t, p) in enumerate(zip(tokens, starts)):
            n = len(t)
            if n:
                ids[i, width - n :] = torch.tensor(t)
                pos[i, width - n :] = torch.arange(p, p + n)
                new[i, width - n :] = 1
        mask = torch.cat([self.mask, new], dim=1) if self.mask is not None else new
        runtime = self.engine.runtime
        self.feeding = [tok if real else -1 for tok, real in zip(ids.flatten().tolist(), new.flatten().tolist())]
        self.feeding_decode = width == 1
        runtime.token_mask = new.flatten().bool() if not bool(new.all()) else None
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.past,
                             use_cache=True, logits_to_keep=1)
        finally:
            self.feeding, runtime.token_mask = None, None
        self.past, self.mask = out.past_key_values, mask
        logits = out.logits[:, -1]  # [B, V]: each row's last real token
        done = []
        prefill = 0
        for i, (r, t) in enumerate(zip(rows, tokens)):
            if r.fed < len(r.prompt):
                r.fed += len(t)
                prefill += len(t)
                if r.fed < len(r.prompt):
                    continue
            if self._emit(r, self._pick(r, logits[i])):
                done.append(i)
        if done:
            self._keep_rows([i for i in range(len(rows)) if i not in done])
        elif self.mask is not None and 4 * int(self.mask.sum()) < 3 * self.mask.numel():
            self._compact()
        return len(rows), prefill

    # --- the batch's cache ----------------------------------------------------------------------
    def _add_row(self, r: Request) -> None:
        """A new row with nothing cached: padding the width of the batch's cache."""
        self.rows.append(r)
        if self.past is None:
            return
        for layer in self.past.layers:
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((1, *layer.keys.shape[1:]))])
            layer.values = torch.cat([layer.values, layer.values.new_zeros((1, *layer.values.shape[1:]))])
        self.mask = torch.cat([self.mask, self.mask.new_zeros((1, self.mask.shape[1]))])

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep the rows `keep`, then compact."""
        if not keep:
            self.rows, self.past, self.mask = [], None, None
            return
        self.rows = [self.rows[i] for i in keep]
        if self.past is None:
            return
        index = torch.tensor(keep)
        for layer in self.past.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.mask = self.mask[index]
        self._compact()

    def _compact(self) -> None:
        """Move each row's cached positions to the right end, in order, and drop the columns no
        row needs: rows left-padded to the longest."""
        mask = self.mask
        real = mask.sum(dim=1)  # [B]
        width = int(real.max())
        if width == 0:  # rows admitted, nothing fed yet
            self.past, self.mask = None, None
            return
        if width == mask.shape[1]:
            return
        # source column of each target column: a row's real columns in order, right-aligned
        order = torch.argsort(mask, dim=1, stable=True)[:, -width:]  # [B, width]: pads first, then real, in order
        self.mask = torch.gather(mask, 1, order)
        for layer in self.past.layers:
            b, h, _, d = layer.keys.shape
            index = order[:, None, :, None].expand(b, h, width, d)
            layer.keys = torch.gather(layer.keys, 2, index)
            layer.values = torch.gather(layer.values, 2, index)


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
    one request at a time."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        layers = DynamicCache(config=engine.model.config).layers
    except Exception:  # a family transformers builds another cache for
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
