"""Which waiting request joins the batch next: FCFS, or expert-aware (after Read-ME).

Where prompts cannot go in through the rows' decode step (Batcher._mixes: then each prompt is a
forward of its own), expert-aware admission waits, while rows run, until a quarter of the batch is
free (or a free row has waited MAX_HOLD s), so the prompts admitted together go in as one forward:
one pass over the experts instead of one per prompt. Where they can, it admits at once: a prompt
going in shares the rows' pass over the experts already, and a row held free is only lost
tokens. Among the waiting it prefers those whose predicted experts
(the model's pre-gate over the prompt's last WINDOW tokens when the engine runs one, else a
lookahead table of each token id's last routing) are resident or in use. A request passed over
MAX_SKIPS times or waiting MAX_WAIT s goes first.
"""

from __future__ import annotations

import time
from collections import deque

import torch

WINDOW = 16  # prompt tokens whose routing predicts a waiting request's footprint
MAX_SKIPS = 8  # admissions that may pass a request over before it goes first
MAX_WAIT = 30.0  # seconds a request may wait before it goes first
MAX_HOLD = 2.0  # seconds admission may wait for a group of free rows


class FCFS:
    name = "fcfs"

    def ready(self, batcher) -> bool:
        """Whether to admit waiting requests this turn (FCFS: whenever the batch has room)."""
        return True

    def pick(self, waiting: deque, batcher) -> object:
        return waiting[0]

    def attach(self, batcher) -> None:
        pass


class ExpertAware:
    name = "expert-aware"

    def __init__(self, *, window: int = WINDOW, max_skips: int = MAX_SKIPS, max_wait: float = MAX_WAIT,
                 group: int | None = None, max_hold: float = MAX_HOLD) -> None:
        self.window, self.max_skips, self.max_wait = window, max_skips, max_wait
        self.group, self.max_hold = group, max_hold
        self._held: float | None = None  # since when a free row waits for a group
        self.table: dict[int, dict[int, tuple[int, ...]]] = {}  # token -> layer -> experts it routed to
        self.recent: dict[int, set[int]] = {}  # layer -> experts the running batch used at its last step
        self._pregated: dict[tuple[int, ...], dict[int, set[int]]] = {}  # prompt tail -> the pre-gate's routing of it
        self.batcher = None

    def attach(self, batcher) -> None:
        """Learn from every routing decision of the batcher's engine."""
        self.batcher = batcher
        batcher.engine.runtime.observers.append(self._observe)

    def _observe(self, layer: int, x: torch.Tensor, logits, weights, ids: torch.Tensor) -> None:
        feeding = getattr(self.batcher, "feeding", None)
        if feeding is None or len(feeding) != ids.shape[0]:
            return
        rows = ids.tolist()
        for token, experts in zip(feeding, rows):
            if token >= 0:  # -1: padding
                self.table.setdefault(token, {})[layer] = tuple(e for e in experts if e >= 0)
        if self.batcher.engine.runtime.phase == "decode":  # the running batch's step
            self.recent[layer] = {e for row in rows for e in row if e >= 0}

    def footprint(self, prompt: list[int]) -> dict[int, set[int]]:
        """{layer: experts} the prompt's last `window` tokens will route to, as far as known ahead."""
        tail = tuple(prompt[-self.window :])
        engine = self.batcher.engine if self.batcher is not None else None
        routes_of = getattr(engine.runtime.predictor, "routes_of", None) if engine is not None else None
        if routes_of is not None:  # a pre-gate: the routing itself, before the request runs
            if tail not in self._pregated:
                if len(self._pregated) > 4096:
                    self._pregated.clear()
                with torch.no_grad():
                    self._pregated[tail] = routes_of(engine.model.get_input_embeddings()(torch.tensor([tail])))
            return self._pregated[tail]
        out: dict[int, set[int]] = {}
        for token in tail:
            for layer, experts in self.table.get(token, {}).items():
                out.setdefault(layer, set()).update(experts)
        return out

    def score(self, req, holding) -> float:
        """The share of req's predicted (layer, expert) pairs that are resident or in use (0..1)."""
        total = hot = 0
        for layer, experts in self.footprint(req.prompt).items():
            warm = holding(layer) | self.recent.get(layer, set())
            total += len(experts)
            hot += len(experts & warm)
        return hot / total if total else 0.0

    def ready(self, batcher) -> bool:
        """Admit when the batch is empty, when prompts go in through the rows' decode step (they
        share its pass over the experts), when `group` rows are free (their prompts then go in
        together, one sweep over the experts instead of one each), or when a free row has waited
        max_hold seconds for the others."""
        free = batcher.max_batch - len(batcher.rows) - len(batcher.admitting)
        if free <= 0:
            self._held = None
            return False
        now = time.perf_counter()
        if self._held is None:
            self._held = now
        group = self.group if self.group is not None else max(1, batcher.max_batch // 4)
        if (not batcher.rows or batcher._mixes() or free >= min(group, len(batcher.waiting))
                or now - self._held >= self.max_hold):
            self._held = None
            return True
        return False

    def pick(self, waiting: deque, batcher) -> object:
        now = time.perf_counter()
        overdue = [r for r in waiting if r.skipped >= self.max_skips or now - r.submitted >= self.max_wait]
        if overdue:
            return min(overdue, key=lambda r: r.submitted)
        holding = batcher.engine.cache.holding
        return max(waiting, key=lambda r: (self.score(r, holding), -r.submitted))


def make_scheduler(name: str):
    if name == "fcfs":
        return FCFS()
    if name == "expert-aware":
        return ExpertAware()
    raise ValueError(f"unknown batching {name!r}: use fcfs or expert-aware")
