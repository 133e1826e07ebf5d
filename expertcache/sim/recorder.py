"""Recording an engine's routing into a Trace, through the engine's observe() hook."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np

from .trace import ModelShape, Route, Trace


def engine_shape(engine) -> ModelShape:
    ckpt = engine.checkpoint
    return ModelShape(
        model=str(ckpt.model_dir),
        n_layers=int(ckpt.config.num_hidden_layers),
        sparse_layers=tuple(ckpt.sparse_layers),
        num_experts=ckpt.num_experts,
        top_k=ckpt.top_k,
        expert_bytes={l: ckpt.expert_bytes for l in ckpt.sparse_layers},
    )


class Recorder:
    """Records every MoE layer call of an engine into a Trace and, when the engine prefetches,
    the guesses each call requested, so the simulator can replay the prefetching too.

    A forward pass is recognised by the layer order starting over. The first forward after
    attaching, or after `new_turn()`, is a prefill, and so is any forward of more than one token
    (a new prompt); other forwards are decode steps. Call `new_turn()` between generate() calls
    when a prompt can be a single token.

        with Recorder(engine) as rec:
            engine.generate(prompt, max_new_tokens=32)
        rec.trace.save("run.npz")
    """

    def __init__(self, engine, *, logits: bool = False, hidden_states: bool = False) -> None:
        self.engine = engine
        self.logits = logits
        self.hidden_states = hidden_states
        cfg = engine.config
        meta = {"source": "engine", "cache_policy": cfg.cache_policy, "prefetch": cfg.prefetch,
                "budget_bytes": engine.budget_bytes, "precision": engine.checkpoint.precision}
        self.trace = Trace(engine_shape(engine), [], meta)
        self._turn = -1
        self._pos = 0  # position of the current forward's first token
        self._tokens = 0  # tokens of the current forward
        self._phase = "prefill"
        self._last_layer: int | None = None
        self._fresh_turn = True
        self._guesses = engine.prefetching  # routes carry their guesses ([] for none) only then
        self._lead: dict[int, list[int]] = {}  # layer -> experts requested before its next call
        self._stack: ExitStack | None = None

    def new_turn(self) -> None:
        """The next forward starts a new prompt (a fresh KV cache)."""
        self._fresh_turn = True
        self._last_layer = None

    def __enter__(self) -> "Recorder":
        self._stack = ExitStack()
        self._stack.enter_context(self.engine.observe(self._route, self._guess if self._guesses else None))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _guess(self, layer: int, guesses) -> None:
        if any(t == layer for t, _ in guesses):  # requested before the call of `layer` itself
            self._lead[layer] = [int(e) for t, es in guesses for e in es]
            return
        route = self.trace.routes[-1] if self.trace.routes else None
        if route is not None and route.layer == layer and route.guesses is not None:
            route.guesses += [(int(t), [int(e) for e in es]) for t, es in guesses]

    def _route(self, layer: int, x, logits, weights, ids) -> None:
        n = int(ids.shape[0])
        if self._last_layer is None or layer <= self._last_layer:  # a new forward pass
            if self._fresh_turn or n > 1:
                self._turn += 1
                self._pos = 0
                self._phase = "prefill"
                self._fresh_turn = False
            else:
                self._pos += self._tokens
                self._phase = "decode"
            self._tokens = n
        self._last_layer = layer
        guesses = None
        if self._guesses:
            lead = self._lead.pop(layer, None)
            guesses = [(layer, lead)] if lead else []
        self.trace.routes.append(
            Route(
                turn=self._turn,
                step=self._pos,
                phase=self._phase,
                layer=layer,
                ids=ids.detach().to("cpu").numpy().astype(np.int32),
                weights=weights.detach().float().to("cpu").numpy(),
                logits=logits.detach().float().to("cpu").numpy() if self.logits and logits is not None else None,
                hidden=x.detach().float().to("cpu").numpy() if self.hidden_states else None,
                guesses=guesses,
            )
        )
