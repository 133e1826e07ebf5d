"""Routing traces: what every MoE layer call routed, recorded from an engine or imported.

A Trace holds the model's shape and one Route per MoE layer call, in call order; `batches()`
turns it into the access stream the simulator replays. Traces are one `.npz` file (numpy, no
pickle; the format, version 1, is in docs/formats.md), and the reference `route.csv` format of
the shared Qwen3 trace is read into the same object. `expertcache trace` records one.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ExpertCacheError
from ..ids import DROPPED, PHASES

log = logging.getLogger(__name__)

FORMAT = "expertcache-trace"
VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """What the simulator needs to know of the model."""

    model: str  # checkpoint path or name, for the record
    n_layers: int  # all transformer layers
    sparse_layers: tuple[int, ...]  # layers with a routed MoE block, in order
    num_experts: int  # routed experts per sparse layer
    top_k: int  # experts per token
    expert_bytes: dict[int, int]  # bytes of one expert, per sparse layer

    @property
    def max_expert_bytes(self) -> int:
        return max(self.expert_bytes.values())

    @property
    def total_expert_bytes(self) -> int:
        return self.num_experts * sum(self.expert_bytes[l] for l in self.sparse_layers)


@dataclass
class Route:
    """One MoE layer call: T tokens of one layer."""

    turn: int  # conversation turn (a fresh KV cache)
    step: int  # sequence position of the call's first token
    phase: str  # "prefill" or "decode"
    layer: int
    ids: np.ndarray  # [T, k] int32, DROPPED for dropped slots
    weights: np.ndarray  # [T, k] float32
    logits: np.ndarray | None = None  # [T, E] float32
    hidden: np.ndarray | None = None  # [T, H] float32
    guesses: list[tuple[int, list[int]]] | None = None  # prefetch requested in this call: [(target layer, experts)]

    @property
    def decode(self) -> bool:
        return self.phase == "decode"


@dataclass(frozen=True)
class Batch:
    """One step of the access stream: the experts one layer call looks up."""

    decode: bool
    layer: int
    ids: tuple[int, ...]  # routed experts, token-major, dropped slots left out


@dataclass
class Trace:
    shape: ModelShape
    routes: list[Route] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # free-form: source, engine settings, run counters

    def batches(self) -> list[Batch]:
        """The access stream: one batch per layer call, in call order. A prefill
        call holds every prompt token's ids, token-major; a decode call one token's ids. Routes
        of the reference CSV are ordered so decode comes token by token, layer-major."""
        out = []
        for r in self.routes:
            out.append(Batch(r.decode, r.layer, tuple(e for e in r.ids.reshape(-1).tolist() if e >= 0)))
        return out

    def at_precision(self, precision: str) -> "Trace":
        """The same routing with experts stored at `precision` (qformat.bytes_per_weight): each
        layer's expert bytes scaled from the precision the trace was recorded at (meta
        "precision"; a trace without it is taken as 16-bit, as the reference traces are)."""
        from dataclasses import replace

        from ..qformat import bytes_per_weight

        ratio = bytes_per_weight(precision) / bytes_per_weight(self.meta.get("precision", "bfloat16"))
        shape = replace(self.shape, expert_bytes={l: max(1, round(b * ratio)) for l, b in self.shape.expert_bytes.items()})
        return Trace(shape, self.routes, {**self.meta, "precision": precision, "recorded_precision": self.meta.get("precision", "bfloat16")})

    @property
    def decode_tokens(self) -> int:
        """Tokens routed in decode calls (the denominator of a time per output token)."""
        first = self.shape.sparse_layers[0] if self.shape.sparse_layers else 0
        return sum(r.ids.shape[0] for r in self.routes if r.decode and r.layer == first)

    # --- file format -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the trace as a version-1 `.npz` file (see the module docstring)."""
        path = Path(path)
        s = self.shape
        header = {
            "format": FORMAT,
            "version": VERSION,
            "model": s.model,
            "n_layers": s.n_layers,
            "sparse_layers": list(s.sparse_layers),
            "num_experts": s.num_experts,
            "top_k": s.top_k,
            "expert_bytes": {str(l): b for l, b in s.expert_bytes.items()},
            "meta": self.meta,
        }
        k = max((r.ids.shape[1] for r in self.routes), default=s.top_k)
        arrays = {
            "header": np.array(json.dumps(header)),
            "routes": np.array(
                [(r.turn, r.step, PHASES.index(r.phase), r.layer, r.ids.shape[0]) for r in self.routes], dtype=np.int64
            ).reshape(-1, 5),
            "ids": _stack([_pad(r.ids, k, DROPPED) for r in self.routes], (0, k), np.int32),
            "weights": _stack([_pad(r.weights, k, 0.0) for r in self.routes], (0, k), np.float32),
        }
        for name in ("logits", "hidden"):
            parts = [getattr(r, name) for r in self.routes]
            if parts and all(p is not None for p in parts):
                arrays[name] = _stack(parts, (0, 0), np.float32)
        if any(r.guesses is not None for r in self.routes):
            rows = [(i, t, e) for i, r in enumerate(self.routes) for t, es in (r.guesses or []) for e in es]
            arrays["guesses"] = np.array(rows, dtype=np.int32).reshape(-1, 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """Read a trace written by `save` (or a reference route.csv, by its content)."""
        path = Path(path)
        if not path.is_file():
            raise ExpertCacheError(f"trace {path} not found")
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic != b"PK":
            return read_route_csv(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                if header.get("format") != FORMAT:
                    raise ExpertCacheError(f"{path} is not an expertcache trace (format {header.get('format')!r})")
                if header.get("version") != VERSION:
                    raise ExpertCacheError(
                        f"{path}: trace format version {header.get('version')} is not supported (this expertcache reads {VERSION})"
                    )
                index, ids, weights = z["routes"], z["ids"], z["weights"]
                logits = z["logits"] if "logits" in z.files else None
                hidden = z["hidden"] if "hidden" in z.files else None
                guess_rows = z["guesses"].tolist() if "guesses" in z.files else None
        except ExpertCacheError:
            raise
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, json.JSONDecodeError) as e:
            raise ExpertCacheError(f"{path} is not a readable expertcache trace: {e}") from None
        shape = ModelShape(
            model=header["model"],
            n_layers=int(header["n_layers"]),
            sparse_layers=tuple(int(l) for l in header["sparse_layers"]),
            num_experts=int(header["num_experts"]),
            top_k=int(header["top_k"]),
            expert_bytes={int(l): int(b) for l, b in header["expert_bytes"].items()},
        )
        if (int(index[:, 4].sum()) if len(index) else 0) != ids.shape[0] or weights.shape != ids.shape:
            raise ExpertCacheError(f"{path}: the route table and the id array disagree (truncated file?)")
        routes, row = [], 0
        for turn, step, phase, layer, n in index.tolist():
            sl = slice(row, row + n)
            routes.append(
                Route(
                    turn, step, PHASES[phase], layer, ids[sl], weights[sl],
                    logits=logits[sl] if logits is not None else None,
                    hidden=hidden[sl] if hidden is not None else None,
                )
            )
            row += n
        if guess_rows is not None:
            if any(not 0 <= row[0] < len(routes) for row in guess_rows):
                raise ExpertCacheError(f"{path}: a prefetch guess names a route the trace does not have")
            for r in routes:
                r.guesses = []
            for i, target, e in guess_rows:
                g = routes[i].guesses
                if not g or g[-1][0] != target:
                    g.append((target, []))
                g[-1][1].append(e)
        return cls(shape, routes, dict(header.get("meta") or {}))


def _pad(a: np.ndarray, k: int, fill) -> np.ndarray:
    if a.shape[1] == k:
        return a
    out = np.full((a.shape[0], k), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _stack(parts: list[np.ndarray], empty: tuple[int, int], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty, dtype=dtype)


load_trace = Trace.load


# --- the reference route.csv ----------------------------------------------------------------------
CSV_COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight", "residency", "expert_bytes")


def read_route_csv(path: str | Path) -> Trace:
    """Import a reference `route.csv` (docs/techniques.md, "The reference replay"): `#` lines give the model shape
    (n_layer, n_expert, n_expert_used) and per-layer expert_bytes; each row is one routed slot
    (turn, phase 0 prefill / 1 decode, step = token position, layer, slot, expert, weight). The
    recording device's own residency / bytes columns are not needed for a replay and are dropped.
    Prefill rows of one layer become one Route (all tokens, in position order); decode rows one
    Route per (token, layer)."""
    path = Path(path)
    shape_kv: dict[str, str] = {}
    expert_bytes: dict[int, int] = {}
    cells: dict[tuple[int, int, int, int], dict[int, tuple[int, float]]] = {}  # (turn, phase, step, layer) -> slot -> (e, w)
    header_seen = False
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if line.startswith("#"):
                    kv = dict(t.split("=", 1) for t in line[1:].split() if "=" in t)
                    if "layer" in kv and "expert_bytes" in kv:
                        expert_bytes[int(kv["layer"])] = int(kv["expert_bytes"])
                    else:
                        shape_kv.update(kv)
                    continue
                if not header_seen:
                    if tuple(c.strip() for c in line.split(",")) != CSV_COLUMNS:
                        raise ExpertCacheError(f"{path}:{lineno}: expected the route.csv header {','.join(CSV_COLUMNS)}")
                    header_seen = True
                    continue
                f_ = line.split(",")
                turn, phase, step, layer, slot, expert = (int(x) for x in f_[:6])
                cells.setdefault((turn, phase, step, layer), {})[slot] = (expert, float(f_[6]))
    except (ValueError, IndexError) as e:
        raise ExpertCacheError(f"{path}: not a route.csv trace ({e})") from None
    except UnicodeDecodeError:
        raise ExpertCacheError(f"{path}: neither an expertcache .npz trace nor a route.csv") from None
    try:
        n_layers, n_experts, top_k = (int(shape_kv[k]) for k in ("n_layer", "n_expert", "n_expert_used"))
    except (KeyError, ValueError):
        raise ExpertCacheError(f"{path}: the '#' header lacks n_layer / n_expert / n_expert_used") from None
    if not header_seen:
        raise ExpertCacheError(f"{path}: no route.csv header line ({','.join(CSV_COLUMNS)})")
    sparse = tuple(sorted(expert_bytes)) or tuple(range(n_layers))
    if set(expert_bytes) != set(sparse) or not expert_bytes:
        raise ExpertCacheError(f"{path}: the '#' header gives no per-layer expert_bytes")
    shape = ModelShape(shape_kv.get("model", str(path)), n_layers, sparse, n_experts, top_k, expert_bytes)

    def token(key):
        slots = cells[key]
        return [slots[s] for s in sorted(slots)]

    routes: list[Route] = []
    keys = sorted(cells)
    for turn in sorted({k[0] for k in keys}):
        prefill = [k for k in keys if k[0] == turn and k[1] == 0]
        for layer in sorted({k[3] for k in prefill}):  # one call per layer, tokens in position order
            toks = sorted((k for k in prefill if k[3] == layer), key=lambda k: k[2])
            routes.append(_route(turn, toks[0][2], "prefill", layer, [token(k) for k in toks], top_k))
        decode = sorted((k for k in keys if k[0] == turn and k[1] == 1), key=lambda k: (k[2], k[3]))
        for k in decode:  # token by token, layer-major
            routes.append(_route(turn, k[2], "decode", k[3], [token(k)], top_k))
    return Trace(shape, routes, {"source": str(path), "format": "route.csv"})


def _route(turn: int, step: int, phase: str, layer: int, tokens: list[list[tuple[int, float]]], top_k: int) -> Route:
    k = max(top_k, max(len(t) for t in tokens))
    ids = np.full((len(tokens), k), DROPPED, dtype=np.int32)
    weights = np.zeros((len(tokens), k), dtype=np.float32)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = [e for e, _ in t]
        weights[i, : len(t)] = [w for _, w in t]
    return Route(turn, step, phase, layer, ids, weights)
