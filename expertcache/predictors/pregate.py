"""pregate (Read-ME): one small network over the token sequence, run before the first decoder
layer, that scores every sparse layer's experts for a token at once, so the whole token's experts
can be requested before its first layer computes. Its input is the first decoder layer's input
(the token embeddings), each RMS-normalised: the last `window` tokens', and exponential moving
averages of all earlier ones (`decays`: the context beyond the window), and optionally (`attn`) a
causal attention over the normalised embeddings of the last ATTN_SPAN tokens, with ALiBi's
per-head recency bias (no position table: a decode step's scores equal the whole sequence's); its
output one [E] score vector per sparse layer. Trained by distillation from the model's own routers
(`expertcache train-predictor --kind pregate`); like every predictor, it only decides what loads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExpertCacheError
from .base import Lookahead, Prediction, rank

DEFAULT_WINDOW = 4  # tokens the pre-gate sees: this one and the 3 before it
DEFAULT_DECAYS = (0.8, 0.95)  # moving averages of the normalised embeddings: the context beyond the window
DEFAULT_WIDTH = 256
ATTN_SPAN = 512  # tokens a causal-attention pre-gate looks back over (this one included)
ATTN_HEADS = 4

State = tuple[torch.Tensor, torch.Tensor]  # (window history [B, window-1, H], moving averages [B, D, H])
# what a running sequence carries between calls: the window state and the attention's (keys, values) or None
RunState = tuple[torch.Tensor, torch.Tensor, "tuple[torch.Tensor, torch.Tensor] | None"]


def normalise(emb: torch.Tensor) -> torch.Tensor:
    x = emb.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def check_attn(width: int, flag: str) -> None:
    """Refuse an attention width the pre-gate cannot split into its heads, in the flag's words."""
    if width < 0 or width % ATTN_HEADS:
        raise ExpertCacheError(f"{flag} {width}: give 0 (no attention) or a positive multiple of {ATTN_HEADS} (its heads)")


class PregateNet(nn.Module):
    """scores [N, L, E] = skip(current token) + fc2(relu(fc1([window of tokens, attention])))."""

    def __init__(self, hidden: int, window: int, layers: int, experts: int, width: int = DEFAULT_WIDTH,
                 decays: tuple[float, ...] = (), attn: int = 0, heads: int = ATTN_HEADS, span: int = ATTN_SPAN) -> None:
        super().__init__()
        self.hidden, self.window, self.layers, self.experts = hidden, window, layers, experts
        self.decays = tuple(float(d) for d in decays)
        self._decay_tensor = torch.tensor(self.decays).view(1, len(self.decays), 1)
        self._keep = 1 - self._decay_tensor  # the new token's share of each moving average
        self.attn, self.heads, self.span = attn, (heads if attn else 0), span
        self._native: bool | None = None  # whether the fused decode step is at hand (_fused)
        if attn:
            if attn % heads:
                raise ValueError(f"attention width {attn} is not a multiple of {heads} heads")
            self.qkv = nn.Linear(hidden, 3 * attn, bias=False)
            # ALiBi: head i's score falls by slope_i per token of distance; from sharp (1/4) to near flat
            self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads), persistent=False)
            # a decode step's bias over the last p positions: recency[..., -p:] (distances span-1 .. 0)
            self.register_buffer("recency", -self.slopes.view(heads, 1, 1) * torch.arange(span - 1, -1, -1.0), persistent=False)
        self.skip = nn.Linear(hidden, layers * experts)
        self.fc1 = nn.Linear((window + len(self.decays)) * hidden + attn, width)
        self.fc2 = nn.Linear(width, layers * experts)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def features(self, emb: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """emb [B, T, H] (the first decoder layer's input) and the state the call before left
        (None: a new sequence) -> (features [B*T, (window + D) * H], newest token first, then the
        moving averages; the new state)."""
        return self._features(normalise(emb), state)

    def _features(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        b, t, h = x.shape
        w, nd = self.window, len(self.decays)
        if t == 1 and state is not None and state[0].shape[0] == b:  # a decode step: the same values in fewer ops
            history, avg = state
            parts = [x.reshape(b, h), history.flip(1).reshape(b, (w - 1) * h)]  # this token, then the window newest first
            if nd:
                avg = self._decay_tensor * avg + self._keep * x
                parts.append(avg.reshape(b, nd * h))
            return torch.cat(parts, dim=-1), (torch.cat([history[:, 1:], x], dim=1) if w > 1 else history, avg)
        if state is None or state[0].shape[0] != b:
            state = (x.new_zeros(b, w - 1, h), x.new_zeros(b, nd, h))
        history, avg = state
        padded = torch.cat([history, x], dim=1)  # [B, w-1+T, H]
        parts = [padded[:, w - 1 - j : w - 1 - j + t] for j in range(w)]  # offset j tokens back
        if nd:
            d = self._decay_tensor
            avgs = []
            for i in range(t):  # avg_i = d * avg_(i-1) + (1 - d) * x_i, for each decay
                avg = d * avg + self._keep * x[:, i : i + 1]
                avgs.append(avg)
            parts.append(torch.stack(avgs, dim=1).reshape(b, t, nd * h))  # [B, T, D*H]
        feats = torch.cat(parts, dim=-1).reshape(b * t, -1)
        return feats, (padded[:, padded.shape[1] - (w - 1) :], avg)

    def context(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, pad: torch.Tensor | None = None):
        """Causal attention of the normalised tokens `x` [B, T, H] over themselves and the cached
        (keys, values) of earlier calls (`pad` [B, P]: True where a row's cache is left padding)
        -> ([B*T, attn], the new cache: the last span - 1 positions')."""
        b, t, _ = x.shape
        h, dh = self.heads, self.attn // self.heads
        q, k, v = self.qkv(x).view(b, t, 3, h, dh).permute(2, 0, 3, 1, 4)  # each [B, h, T, dh]
        if kv is not None:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        p = k.shape[2]
        if t == 1 and p <= self.span:  # a decode step: the precomputed recency bias
            bias = self.recency[..., self.span - p :]
        else:
            dist = (torch.arange(p - t, p).view(t, 1) - torch.arange(p).view(1, p)).float()  # [T, P] query - key position
            bias = (-self.slopes.view(h, 1, 1) * dist).masked_fill((dist < 0) | (dist >= self.span), float("-inf"))
        if pad is not None:  # [B, h, T, P]: no row attends to its padding
            pad = torch.cat([pad, pad.new_zeros(b, t)], dim=1)
            bias = bias.unsqueeze(0).masked_fill(pad[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, h, T, dh]
        keep = self.span - 1
        return out.transpose(1, 2).reshape(b * t, self.attn), (k[:, :, -keep:], v[:, :, -keep:])

    def forward(self, feats: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Scores from `features` rows and, for an attention pre-gate, their `context` rows."""
        inner = feats if ctx is None else torch.cat([feats, ctx], dim=-1)
        hidden = F.relu(F.linear(inner, self.fc1.weight, self.fc1.bias))  # the layers' own products, without module calls
        out = F.linear(feats[:, : self.hidden], self.skip.weight, self.skip.bias) + F.linear(hidden, self.fc2.weight, self.fc2.bias)
        return out.view(-1, self.layers, self.experts)

    def score(self, emb: torch.Tensor, state: RunState | None = None, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, RunState]:
        """emb [B, T, H] and the state the call before left (None, or another batch size: a new
        sequence; `pad` as in `context`) -> (scores [B*T, L, E], the new state)."""
        if state is not None and state[0].shape[0] != emb.shape[0]:
            state = None
        if emb.shape[1] == 1 and state is not None and self._fused():  # a decode step: one native call
            return self._fused_step(emb, state, pad)
        x = normalise(emb)
        feats, (history, avg) = self._features(x, None if state is None else state[:2])
        if not self.attn:
            return self(feats), (history, avg, None)
        ctx, kv = self.context(x, None if state is None else state[2], pad)
        return self(feats, ctx), (history, avg, kv)

    def _fused(self) -> bool:
        """Whether a decode step runs as one native call (kernels.pregate_step): the kernels are
        built, the weights are float32 on the CPU and no gradient is wanted through them."""
        if self._native is None:
            from .. import kernels

            self._native = kernels.available() and hasattr(torch.ops.expertcache, "pregate_step")
        return (self._native and not (torch.is_grad_enabled() and self.fc1.weight.requires_grad)
                and self.fc1.weight.dtype == torch.float32 and self.fc1.weight.device.type == "cpu")

    def _fused_step(self, emb: torch.Tensor, state: RunState, pad: torch.Tensor | None) -> tuple[torch.Tensor, RunState]:
        b = emb.shape[0]
        ctx, kv = self.context(normalise(emb), state[2], pad) if self.attn else (None, None)
        s, history, avg = torch.ops.expertcache.pregate_step(
            emb.reshape(b, self.hidden), state[0], state[1], self._decay_tensor.view(-1), self.fc1.weight, self.fc1.bias,
            self.fc2.weight, self.fc2.bias, self.skip.weight, self.skip.bias, ctx)  # fmt: skip
        return s.view(b, self.layers, self.experts), (history, avg, kv)


def net_of(art) -> PregateNet:
    """The network a pregate predictor file (predictors.artefact.Artefact) holds, its weights loaded."""
    net = PregateNet(art.hidden_size, int(art.meta["window"]), len(art.sparse_layers), art.num_experts,
                     width=art.tensors["fc1.weight"].shape[0], decays=tuple(art.meta.get("decays", ())),
                     attn=int(art.meta.get("attn", 0)), heads=int(art.meta.get("heads") or ATTN_HEADS))  # fmt: skip
    net.load_state_dict(art.tensors)
    return net


class PregatePredictor:
    """At each forward's start (`start`, called by the engine before the first decoder layer) it
    scores every sparse layer for the call's tokens; `predict` then hands out those guesses for the
    layers `depth` ahead, as the other predictors do. A call continues the context of the one
    before it (a decode step, a prompt's next chunk) until `reset`, which the engine calls at every
    forward that begins a sequence (its first position 0). A server batching several
    sequences `bind`s each call's rows to them instead: each keeps its own context (`streams`)
    across prompt chunks and decode steps, whoever else is in the batch, until it is `forget`-ed."""

    name = "pregate"

    def __init__(self, net: PregateNet, layers: list[int], top_k: int, depth: int = 1) -> None:
        self.net = net.eval()
        self.layers = sorted(layers)
        self._ahead = Lookahead(self.layers, depth)
        self._top_k = top_k
        self._state: RunState | None = None
        self.guesses: dict[int, list[int]] = {}
        self.routes: dict[int, torch.Tensor] = {}  # layer -> [T, k] each token's top-k (routing by the pre-gate)
        self.streams: dict[object, RunState] = {}  # a bound sequence's context
        self._keys: list | None = None
        self._mask: torch.Tensor | None = None

    def reset(self) -> None:
        self._state, self.guesses, self.routes = None, {}, {}

    def bind(self, keys: list | None, mask: torch.Tensor | None = None) -> None:
        """The next calls' rows continue the sequences `keys` (one per row; `mask` [B, T]: the real
        tokens of left-padded prompts); None: back to one sequence, as generate runs."""
        self._keys, self._mask = keys, mask

    def forget(self, key) -> None:
        self.streams.pop(key, None)

    @torch.no_grad()
    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B*T, L, E] for the call's tokens; moves the window on."""
        if self._keys is None:
            s, self._state = self.net.score(hidden, self._state)
            return s
        if len(self._keys) != hidden.shape[0]:
            raise RuntimeError(f"the pre-gate was bound to {len(self._keys)} sequences, the call has {hidden.shape[0]} rows")
        if hidden.shape[1] == 1 and len(self._keys) > 1 and all(k in self.streams for k in self._keys):
            return self._decode_rows(hidden)
        b, t, _ = hidden.shape
        out = hidden.new_zeros(b, t, len(self.layers), self.net.experts, dtype=torch.float32)
        for i, key in enumerate(self._keys):  # a prompt (chunk) per row, its padding left out
            real = slice(None) if self._mask is None else self._mask[i].bool()
            out[i, real], self.streams[key] = self.net.score(hidden[i : i + 1, real], self.streams.get(key))
        return out.view(b * t, len(self.layers), self.net.experts)

    def _decode_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """One decode step of several bound sequences in one call: their attention caches, of
        different lengths, left-padded to the longest and the padding masked."""
        states = [self.streams[k] for k in self._keys]
        history, avg = torch.cat([s[0] for s in states]), torch.cat([s[1] for s in states])
        kv, pad, lengths = None, None, [0] * len(states)
        if self.net.attn:
            lengths = [s[2][0].shape[2] for s in states]
            width = max(lengths)
            kv = tuple(torch.cat([F.pad(s[2][j], (0, 0, width - n, 0)) for s, n in zip(states, lengths)]) for j in (0, 1))
            pad = torch.arange(width)[None, :] < torch.tensor([width - n for n in lengths])[:, None]
        s, (history, avg, kv) = self.net.score(hidden, (history, avg, kv), pad)
        keep = self.net.span - 1
        for i, (key, n) in enumerate(zip(self._keys, lengths)):
            own = None if kv is None else tuple(c[i : i + 1, :, c.shape[2] - min(n + 1, keep) :] for c in kv)
            self.streams[key] = (history[i : i + 1], avg[i : i + 1], own)
        return s

    @torch.no_grad()
    def routes_of(self, emb: torch.Tensor) -> dict[int, set[int]]:
        """{layer: experts} the tokens of `emb` [1, T, H] (a new sequence) route to, by the pre-gate,
        without touching the running window: a queued prompt's footprint."""
        top = self.net.score(emb)[0].topk(self._top_k, dim=-1).indices  # [T, L, k]
        return {l: set(top[:, i].flatten().tolist()) for i, l in enumerate(self.layers)}

    def start(self, hidden: torch.Tensor) -> Prediction:
        """Every sparse layer's guess for the call whose first decoder layer receives `hidden`."""
        s = self.scores(hidden)
        top = s.topk(self._top_k, dim=-1).indices  # [T, L, k], best first
        self.routes = dict(zip(self.layers, top.unbind(1)))  # layer -> [T, k], views in one op
        if s.shape[0] == 1:  # a decode step: each layer's own top-k (rank's answer for one token, in one op)
            self.guesses = dict(zip(self.layers, top.tolist()[0]))
        else:
            real = s if self._mask is None or self._mask.numel() != s.shape[0] else s[self._mask.flatten().bool()]  # no padding
            self.guesses = {l: rank(real[:, i], self._top_k) for i, l in enumerate(self.layers)}
        return list(self.guesses.items())

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        return [(t, self.guesses[t]) for _, t in self._ahead.targets(layer) if t in self.guesses]
