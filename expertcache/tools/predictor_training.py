"""Fitting the file a default-vector, estimator or learned predictor reads (train-predictor).

Input is recorded routing with MoE-input hidden states: a trace recorded with hidden states, or
calibration text run through the engine here. Pairs are (a token's MoE input at layer l, the same
token's routing and MoE input at layer l+d), d = 1..depth in sparse layers.
    learned         an ExpertMLP per (l, d), started from layer l+d's router (= next-gate), trained
                    towards layer l+d's router distribution; the best validation recall is kept
    estimator       A, b per (l, d) by ridge least squares: x[l+d] ~ x[l] A + b
    default-vector  per expert, its mean output over the calibration tokens routed to it (plus the
                    mean shared-expert contribution), computed through the engine's cache
    pregate         one PregateNet over the token embeddings (the first decoder layer's input) to
                    every sparse layer's router distribution; trained from text (a trace has no embeddings)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import ExpertCacheError
from ..ids import TRAINED_KINDS
from ..predictors.artefact import Artefact
from ..predictors.learned import DEFAULT_ACTIVATION, ExpertMLP
from ..predictors.pregate import ATTN_HEADS, DEFAULT_DECAYS, DEFAULT_WINDOW, PregateNet, check_attn, net_of
from .settings import TrainSettings
from ..sim.recorder import Recorder
from ..sim.trace import Trace

log = logging.getLogger(__name__)


# --- data ----------------------------------------------------------------------------------------
@dataclass
class LayerData:
    """Every recorded token's view of one sparse layer, rows aligned across layers."""

    hidden: torch.Tensor  # [N, H] MoE input
    ids: torch.Tensor  # [N, k] routed experts (-1: dropped)
    weights: torch.Tensor  # [N, k]
    logits: torch.Tensor | None  # [N, E]


def layer_data(trace: Trace, layers: list[int]) -> dict[int, LayerData]:
    """Stack the trace per layer, keeping only forwards that routed every sparse layer, so row i of
    every layer is the same token."""
    forwards: dict[tuple[int, int], dict[int, object]] = {}
    for r in trace.routes:
        forwards.setdefault((r.turn, r.step), {})[r.layer] = r
    complete = [f for f in forwards.values() if all(l in f for l in layers)]
    if not complete:
        raise ExpertCacheError("the trace has no forward pass that routed every sparse layer")
    if any(f[layers[0]].hidden is None for f in complete):
        raise ExpertCacheError("the trace has no hidden states: record it with `expertcache trace --hidden-states`")
    out = {}
    for l in layers:
        routes = [f[l] for f in complete]
        logits = [r.logits for r in routes]
        out[l] = LayerData(
            hidden=torch.from_numpy(np.concatenate([r.hidden for r in routes])).float(),
            ids=torch.from_numpy(np.concatenate([r.ids for r in routes])).long(),
            weights=torch.from_numpy(np.concatenate([r.weights for r in routes])).float(),
            logits=torch.from_numpy(np.concatenate(logits)).float() if all(g is not None for g in logits) else None,
        )
    return out


def calibration_chunks(documents: list[list[int]], *, max_tokens: int, window: int):
    """The forwards a calibration pass makes: each document in pieces of at most `window` tokens
    (pieces under 2 tokens skipped), `max_tokens` in all."""
    done = 0
    for doc in documents:
        for start in range(0, len(doc), window):
            chunk = doc[start : start + window][: max_tokens - done]
            if len(chunk) < 2:
                continue
            yield chunk
            done += len(chunk)
            if done >= max_tokens:
                return


@torch.inference_mode()
def record_calibration(engine, documents: list[list[int]], *, max_tokens: int, window: int, progress: bool = True) -> Trace:
    """Run token documents through the engine (prefill windows of at most `window` tokens, no KV
    cache kept) and record routing with hidden states and logits."""
    from tqdm.auto import tqdm

    bar = tqdm(total=max_tokens, unit="tok", desc="calibration", disable=not progress)
    done = 0
    with Recorder(engine, logits=True, hidden_states=True) as rec:
        for chunk in calibration_chunks(documents, max_tokens=max_tokens, window=window):
            rec.new_turn()
            engine.model(input_ids=torch.tensor([chunk]), use_cache=False, logits_to_keep=1)
            done += len(chunk)
            bar.update(len(chunk))
    bar.close()
    if done == 0:
        raise ExpertCacheError("the calibration text gave no tokens")
    return rec.trace


@torch.inference_mode()
def record_pregate(engine, documents: list[list[int]], *, max_tokens: int, window: int, progress: bool = True):
    """Run token documents through the engine in forwards of at most `window` tokens and record,
    per forward, the first decoder layer's input [T, H] and every sparse layer's router logits
    [T, E] and routed ids [T, k]. Returns (inputs per forward, {layer: logits}, {layer: ids})."""
    from tqdm.auto import tqdm

    ckpt = engine.checkpoint
    layers = list(ckpt.sparse_layers)
    first = engine.model.get_submodule(ckpt.sites[layers[0]].decoder_layer.rsplit(".", 1)[0])[0]
    inputs: list[torch.Tensor] = []
    logits: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    ids: dict[int, list[torch.Tensor]] = {l: [] for l in layers}

    def on_input(module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden[0].detach().float().clone())

    def on_route(layer, x, lg, weights, routed) -> None:
        logits[layer].append(lg.detach().float().clone())
        ids[layer].append(routed.detach().clone())

    bar = tqdm(total=max_tokens, unit="tok", desc="calibration", disable=not progress)
    done = 0
    hook = first.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        with engine.observe(on_route=on_route):
            for chunk in calibration_chunks(documents, max_tokens=max_tokens, window=window):
                engine.model(input_ids=torch.tensor([chunk]), use_cache=False, logits_to_keep=1)
                done += len(chunk)
                bar.update(len(chunk))
    finally:
        hook.remove()
        bar.close()
    if done == 0:
        raise ExpertCacheError("the calibration text gave no tokens")
    return inputs, {l: torch.cat(v) for l, v in logits.items()}, {l: torch.cat(v) for l, v in ids.items()}


def fit_pregate(inputs: list[torch.Tensor], logits: dict[int, torch.Tensor], ids: dict[int, torch.Tensor], top_k: int,
                settings: TrainSettings = TrainSettings(), *, window: int = DEFAULT_WINDOW,
                decays: tuple[float, ...] = DEFAULT_DECAYS, init: PregateNet | None = None,
                progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train a PregateNet towards every layer's router distribution (the targets of `learned`);
    the best mean validation recall is kept (`init`, when given, is where training starts, and
    what is kept unless a step beats it). Without attention the rows are independent (random
    token batches, random validation tokens); with it a batch is whole forwards, and so is the
    validation split. Returns (tensors, report)."""
    from tqdm.auto import tqdm

    layers = sorted(logits)
    num_experts, hidden = logits[layers[0]].shape[1], inputs[0].shape[-1]
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    net = init.train() if init is not None else PregateNet(hidden, window, len(layers), num_experts, width=settings.width,
                                                           decays=decays, attn=settings.attn)  # fmt: skip
    feats = torch.cat([net.features(x[None])[0] for x in inputs])  # [N, window*H], a window per forward
    targets = torch.stack([_targets(ids[l], logits[l], num_experts, settings.hard_weight) for l in layers], dim=1)  # [N, L, E]
    n = len(feats)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    bar = tqdm(total=settings.steps, unit="step", desc="train pregate", disable=not progress)
    postfix = lambda loss, r: dict(loss=f"{loss:.3f}", val=f"{sum(r) / len(r):.3f}")  # noqa: E731
    if net.attn:
        best, best_state = _fit_pregate_sequences(net, opt, inputs, feats, targets, ids, layers, top_k, settings, gen, bar, postfix)
    else:
        perm = torch.randperm(n, generator=gen)
        n_val = max(1, int(n * settings.val_fraction)) if n > 1 else 0
        val, train = perm[:n_val], (perm[n_val:] if n > n_val else perm)

        def val_recall() -> list[float]:
            with torch.no_grad():
                s = net(feats[val])
                return [recall_at_k(s[:, i], ids[l][val], top_k) for i, l in enumerate(layers)] if n_val else [0.0] * len(layers)

        _, best, best_state = _distil(opt, net, _rows(net, feats, targets, train, settings.batch, gen), settings, val_recall, bar, postfix)
    bar.close()
    report = {f"l{l}": {"val_recall": round(r, 4), "tokens": n} for l, r in zip(layers, best)}
    log.info("pregate: validation recall per layer %s", [round(r, 3) for r in best])
    return best_state, report


def _fit_pregate_sequences(net, opt, inputs, feats, targets, ids, layers, top_k, settings: TrainSettings, gen, bar, postfix):
    """fit_pregate's loop for an attention pre-gate: batches of whole forwards (at least
    settings.batch rows), the validation split by forward too. Returns (best recall, best state)."""
    from ..predictors.pregate import normalise

    starts = np.cumsum([0] + [len(x) for x in inputs])
    rows = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    xs = [normalise(x[None]) for x in inputs]
    perm = torch.randperm(len(inputs), generator=gen).tolist()
    n_val = max(1, int(len(inputs) * settings.val_fraction)) if len(inputs) > 1 else 0
    val, train = perm[:n_val], (perm[n_val:] if len(perm) > n_val else perm)
    per_batch = max(1, round(settings.batch / (len(feats) / len(inputs))))

    def scores(seqs):
        return torch.cat([net(feats[rows[i]], net.context(xs[i])[0]) for i in seqs])

    def val_recall() -> list[float]:
        if not n_val:
            return [0.0] * len(layers)
        with torch.no_grad():
            s = scores(val)
        return [recall_at_k(s[:, j], torch.cat([ids[l][rows[i]] for i in val]), top_k) for j, l in enumerate(layers)]

    def draw():
        seqs = [train[int(i)] for i in torch.randint(len(train), (per_batch,), generator=gen)]
        return scores(seqs).log_softmax(dim=-1), torch.cat([targets[rows[i]] for i in seqs])

    _, best, best_state = _distil(opt, net, draw, settings, val_recall, bar, postfix)
    return best, best_state


# --- fitting -------------------------------------------------------------------------------------
def fit_estimator(data: dict[int, LayerData], layers: list[int], depths: list[int], *, ridge: float = 1e-3) -> dict[str, torch.Tensor]:
    """Ridge least squares per (d, l): [x 1] W = x[l+d], W = (Z^T Z + ridge * n * I)^-1 Z^T Y."""
    tensors = {}
    for d in depths:
        for i, l in enumerate(layers[: len(layers) - d]):
            x = data[l].hidden.double()  # [N, H]
            y = data[layers[i + d]].hidden.double()  # [N, H]
            z = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # [N, H+1]
            gram = z.T @ z + ridge * len(z) * torch.eye(z.shape[1], dtype=z.dtype)  # [H+1, H+1]
            w = torch.linalg.solve(gram, z.T @ y)  # [H+1, H]
            tensors[f"d{d}.l{l}.A"] = w[:-1].float()
            tensors[f"d{d}.l{l}.b"] = w[-1].float()
    return tensors


def _targets(ids: torch.Tensor, logits: torch.Tensor | None, num_experts: int, hard_weight: float) -> torch.Tensor:
    """[N, E] distribution: `hard_weight` spread over the routed experts `ids` [N, k], the rest the
    router's softmax of `logits` [N, E] (None: all on the routed set)."""
    valid = ids >= 0
    hard = torch.zeros(len(ids), num_experts).scatter_add_(1, ids.clamp(min=0), valid.float())
    hard = hard / hard.sum(dim=1, keepdim=True).clamp(min=1)
    if logits is None:
        return hard
    return hard_weight * hard + (1 - hard_weight) * logits.softmax(dim=-1)


def _distil(opt, net, draw, settings: TrainSettings, score, bar, postfix) -> tuple:
    """Cross-entropy of the log-probabilities against the target distributions that `draw()`
    gives for a random batch, for settings.steps Adam steps; every eval_every steps `score()` (a
    recall, or one per layer: summed) picks the best state of `net`. Returns (the score at the
    start, the best score, the best state)."""
    total = lambda r: sum(r) if isinstance(r, list) else r  # noqa: E731
    start = best = score()
    best_state = {k: v.clone() for k, v in net.state_dict().items()}
    for step in range(1, settings.steps + 1):
        logp, targets = draw()  # [B, (L,) E] each
        loss = -(targets * logp).sum(dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
        if step % settings.eval_every == 0 or step == settings.steps:
            r = score()
            if total(r) > total(best):
                best, best_state = r, {k: v.clone() for k, v in net.state_dict().items()}
            bar.set_postfix(**postfix(loss.item(), r))
    return start, best, best_state


def _rows(net, x: torch.Tensor, targets: torch.Tensor, train: torch.Tensor, batch: int, gen):
    """draw() for _distil: a random batch of the rows `train` of x and targets."""

    def draw():
        rows = train[torch.randint(len(train), (min(batch, len(train)),), generator=gen)]
        return net(x[rows]).log_softmax(dim=-1), targets[rows]

    return draw


def recall_at_k(scores: torch.Tensor, ids: torch.Tensor, k: int) -> float:
    """Share of routed (token, expert) slots that are in the top-k of `scores` [N, E]."""
    guess = scores.topk(k, dim=-1).indices  # [N, k]
    valid = ids >= 0
    hit = (ids.unsqueeze(-1) == guess.unsqueeze(1)).any(-1) & valid  # [N, k]
    return float(hit.sum()) / max(1, int(valid.sum()))


def fit_learned(
    data: dict[int, LayerData],
    layers: list[int],
    depths: list[int],
    routers: dict[int, torch.Tensor],
    top_k: int,
    settings: TrainSettings = TrainSettings(),
    *,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(settings.seed)
    jobs = [(d, l, layers[i + d]) for d in depths for i, l in enumerate(layers[: len(layers) - d])]
    tensors: dict[str, torch.Tensor] = {}
    report: dict = {}
    bar = tqdm(total=len(jobs) * settings.steps, unit="step", desc="train learned", disable=not progress)
    for d, src, tgt in jobs:
        torch.manual_seed(settings.seed + 1000 * d + src)
        x_all = data[src].hidden
        ids_all = data[tgt].ids
        y_all = _targets(data[tgt].ids, data[tgt].logits, routers[tgt].shape[0], settings.hard_weight)
        n = len(x_all)
        perm = torch.randperm(n, generator=gen)
        n_val = max(1, int(n * settings.val_fraction)) if n > 1 else 0
        val, train = perm[:n_val], perm[n_val:]
        if len(train) == 0:
            train = perm
        net = ExpertMLP.from_router(routers[tgt], settings.width)
        opt = torch.optim.Adam(
            [
                {"params": net.skip.parameters(), "lr": settings.skip_lr},
                {"params": list(net.fc1.parameters()) + list(net.fc2.parameters()), "lr": settings.lr},
            ]
        )

        def val_recall() -> float:
            with torch.no_grad():
                return recall_at_k(net(x_all[val]), ids_all[val], top_k) if n_val else 0.0

        start, best, best_state = _distil(opt, net, _rows(net, x_all, y_all, train, settings.batch, gen), settings, val_recall, bar,
                                          lambda loss, r: dict(d=d, layer=src, loss=f"{loss:.3f}", val=f"{r:.3f}"))  # fmt: skip
        for k, v in best_state.items():
            tensors[f"d{d}.l{src}.{k}"] = v
        report[f"d{d}.l{src}"] = {"val_recall_next_gate": round(start, 4), "val_recall": round(best, 4), "pairs": n}
        log.info("learned d=%d layer %d -> %d: validation recall %.3f (next-gate start %.3f)", d, src, tgt, best, start)
    bar.close()
    return tensors, report


@torch.inference_mode()
def fit_default_vectors(engine, data: dict[int, LayerData], layers: list[int], *, rows_per_pass: int = 4096) -> dict[str, torch.Tensor]:
    """Each expert's mean output over the calibration tokens routed to it, computed by the
    engine's own expert code with the expert read through its cache (Engine.run_expert)."""
    tensors = {}
    routers = engine.routers()
    for l in layers:
        dtype = routers[l].dtype
        num_experts, hidden = routers[l].shape
        x_all, ids = data[l].hidden, data[l].ids
        vectors = torch.zeros(num_experts, hidden)
        for e in range(num_experts):
            rows = (ids == e).any(dim=1).nonzero().flatten()
            if len(rows) == 0:
                continue
            total = torch.zeros(hidden, dtype=torch.float64)
            for s in range(0, len(rows), rows_per_pass):
                y = engine.run_expert(l, e, x_all[rows[s : s + rows_per_pass]].to(dtype))  # [n, H]
                total += y.double().sum(dim=0)
            vectors[e] = (total / len(rows)).float()
        shared = torch.zeros(hidden)
        total = torch.zeros(hidden, dtype=torch.float64)
        for s in range(0, len(x_all), rows_per_pass):
            y = engine.shared_output(l, x_all[s : s + rows_per_pass].to(dtype))  # [n, H]
            if y is None:  # the block has no shared experts: they add nothing
                break
            total += y.double().sum(dim=0)
        else:
            shared = (total / len(x_all)).float()
        tensors[f"l{l}.vectors"] = vectors
        tensors[f"l{l}.shared"] = shared
    return tensors


def check_inputs(kind: str, *, max_tokens: int, window: int, settings: TrainSettings, init: str | Path | None = None) -> None:
    """Refuse inputs train_predictor cannot use, before any engine is loaded."""
    if kind not in TRAINED_KINDS:
        raise ExpertCacheError(f"unknown predictor kind {kind!r}: choose one of {', '.join(TRAINED_KINDS)}")
    if max_tokens < 2 or window < 2 or settings.steps < 1 or settings.width < 1:
        raise ExpertCacheError("--max-tokens and --window must be at least 2, --steps and --width at least 1")
    if not settings.lr > 0:
        raise ExpertCacheError(f"--lr {settings.lr}: give a positive learning rate")
    check_attn(settings.attn, "--attn")
    if init is not None:
        if kind != "pregate":
            raise ExpertCacheError(f"--init trains on from a pre-gate file: it goes with --kind pregate, not {kind}")
        if not Path(init).is_file():
            raise ExpertCacheError(f"--init {init}: no such file")


def _check_depths(kind: str, layers: list[int], depths: list[int]) -> None:
    if kind == "pregate":  # one net for every layer: no distances to fit
        return
    if len(layers) < 2 and kind != "default-vector":
        raise ExpertCacheError("the model has one sparse layer: there is no later layer to predict")
    if not depths or any(d < 1 or d >= len(layers) for d in depths):
        raise ExpertCacheError(f"--depth must be between 1 and {len(layers) - 1} for this model's {len(layers)} sparse layers")


def fit(kind: str, engine, trace: Trace, *, depths: list[int], settings: TrainSettings = TrainSettings(),
        progress: bool = True) -> Artefact:
    """Fit a predictor file of `kind` for the engine's model from `trace` (recorded with hidden states)."""
    if kind not in TRAINED_KINDS:
        raise ExpertCacheError(f"unknown predictor kind {kind!r}: choose one of {', '.join(TRAINED_KINDS)}")
    ckpt = engine.checkpoint
    layers = list(ckpt.sparse_layers)
    _check_depths(kind, layers, depths)
    routers = {l: w.detach() for l, w in engine.routers().items()}
    num_experts, hidden = routers[layers[0]].shape
    if tuple(trace.shape.sparse_layers) != tuple(layers) or trace.shape.num_experts != num_experts:
        raise ExpertCacheError(
            f"the trace was recorded on another model (sparse layers {list(trace.shape.sparse_layers)}, "
            f"{trace.shape.num_experts} experts; this model {layers}, {num_experts})"
        )
    data = layer_data(trace, layers)
    meta: dict = {"tokens": len(data[layers[0]].hidden)}
    if kind == "estimator":
        tensors = fit_estimator(data, layers, depths)
    elif kind == "learned":
        tensors, meta["validation"] = fit_learned(data, layers, depths, routers, ckpt.top_k, settings, progress=progress)
        meta["activation"] = DEFAULT_ACTIVATION
        meta["settings"] = asdict(settings)
    else:
        tensors = fit_default_vectors(engine, data, layers)
        depths = []
    return Artefact(
        kind=kind,
        model=str(ckpt.model_dir),
        sparse_layers=layers,
        num_experts=int(num_experts),
        hidden_size=int(hidden),
        top_k=ckpt.top_k,
        depths=sorted(depths),
        tensors=tensors,
        meta=meta,
    )


def train_predictor(
    engine,
    kind: str,
    *,
    trace: Trace | str | Path | None = None,
    text: str | Path | None = None,
    max_tokens: int = 20000,
    window: int = 256,
    depths: list[int] = (1,),
    settings: TrainSettings = TrainSettings(),
    init: str | Path | None = None,
    progress: bool = True,
) -> Artefact:
    """A predictor file of `kind` for the engine's model, not yet saved (Artefact.save). Its input:
    `trace` (a Trace or a trace file recorded with hidden states), else the first `max_tokens`
    tokens of the text file `text` (None: TinyStories train), run through the engine in forward
    passes of at most `window` tokens. meta["source"] names the input. `init` (pregate only): a
    pregate file to train on from."""
    depths = list(depths)
    if trace is not None and text is not None:
        raise ExpertCacheError("give a trace or a calibration text, not both")
    check_inputs(kind, max_tokens=max_tokens, window=window, settings=settings, init=init)
    _check_depths(kind, list(engine.checkpoint.sparse_layers), depths)
    if kind == "pregate":
        return _train_pregate(engine, text, max_tokens=max_tokens, window=window, settings=settings, init=init,
                              progress=progress, trace_given=trace is not None)  # fmt: skip
    if isinstance(trace, Trace):
        source = "trace"
    elif trace is not None:
        source, trace = str(trace), Trace.load(trace)
    else:
        source = str(text) if text is not None else "tinystories-train"
        docs = text_documents(engine, text, max_tokens)
        trace = record_calibration(engine, docs, max_tokens=max_tokens, window=window, progress=progress)
    art = fit(kind, engine, trace, depths=depths, settings=settings, progress=progress)
    art.meta["source"] = source
    return art


def _train_pregate(engine, text, *, max_tokens: int, window: int, settings: TrainSettings, init, progress: bool,
                   trace_given: bool) -> Artefact:
    if trace_given:
        raise ExpertCacheError("pregate trains from calibration text (--text): a trace holds no token embeddings")
    art = train_pregate(engine, text_documents(engine, text, max_tokens), max_tokens=max_tokens, window=window,
                        settings=settings, init=init, progress=progress)  # fmt: skip
    art.meta["source"] = str(text) if text is not None else "tinystories-train"
    return art


def train_pregate(engine, documents: list[list[int]], *, max_tokens: int = 20000, window: int = 256,
                  settings: TrainSettings = TrainSettings(), init: str | Path | None = None, progress: bool = True) -> Artefact:
    """A pregate predictor file for the engine's model, fitted on token `documents` run through it;
    `init`: a pregate file for this model to train on from (e.g. the pre-gate `refactor` trained
    jointly with the model), its shape kept."""
    ckpt = engine.checkpoint
    start = None
    if init is not None:
        art = Artefact.load(init)
        router = engine.routers()[ckpt.sparse_layers[0]]  # [E, H]
        art.check(kind="pregate", sparse_layers=list(ckpt.sparse_layers), num_experts=ckpt.num_experts,
                  hidden_size=router.shape[1], depth=0, path=Path(init))  # fmt: skip
        start = net_of(art)
        width = start.fc1.out_features
        if settings.attn not in (0, start.attn) or settings.width not in (TrainSettings.width, width):
            raise ExpertCacheError(f"--init {init} is a pre-gate {width} wide with attention {start.attn or 'none'}: "
                                   "training on keeps its shape, so leave out --width and --attn (or give its own)")
        settings = replace(settings, attn=start.attn, width=width)  # the file's shape, as the file records
    net_window, decays, heads = ((start.window, start.decays, start.heads) if start is not None
                                 else (DEFAULT_WINDOW, DEFAULT_DECAYS, ATTN_HEADS if settings.attn else 0))
    inputs, logits, ids = record_pregate(engine, documents, max_tokens=max_tokens, window=window, progress=progress)
    tensors, report = fit_pregate(inputs, logits, ids, ckpt.top_k, settings, init=start, progress=progress)
    meta = {"tokens": sum(len(x) for x in inputs), "window": net_window, "decays": list(decays), "attn": settings.attn,
            "heads": heads, "validation": report, "settings": asdict(settings)}
    if init is not None:
        meta["init"] = str(init)
    return Artefact(
        kind="pregate", model=str(ckpt.model_dir), sparse_layers=list(ckpt.sparse_layers), num_experts=ckpt.num_experts,
        hidden_size=inputs[0].shape[-1], top_k=ckpt.top_k, depths=[], tensors=tensors, meta=meta,
    )  # fmt: skip


def text_documents(engine, path: str | Path | None, max_tokens: int | None = None) -> list[list[int]]:
    """Token documents of a text file (documents split on <|endoftext|> lines), tokenised only as
    far as `max_tokens` reaches; None = TinyStories train."""
    from ..demo.corpus import TINYSTORIES_TRAIN, corpus_path, split_documents

    if engine.tokenizer is None:
        raise ExpertCacheError("this checkpoint has no tokenizer: record a trace with --hidden-states and pass --trace")
    if path is None:
        try:
            path = corpus_path(TINYSTORIES_TRAIN)
        except ExpertCacheError as e:
            raise ExpertCacheError(f"{e}; or pass --text FILE or --trace FILE") from None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExpertCacheError(f"cannot read --text {path}: {getattr(e, 'strerror', None) or e}") from None
    bos = getattr(engine.tokenizer, "bos_token_id", None)
    docs, total = [], 0
    for doc in split_documents(text):
        ids: list[int] = [] if bos is None else [bos]  # as the engine encodes text (engine.encode_text)
        for para in doc.split("\n\n"):  # paragraph by paragraph: a corpus file may be one long document
            if max_tokens is not None and total >= max_tokens:
                break
            piece = engine.tokenizer.encode(para + "\n\n", add_special_tokens=False, verbose=False)
            ids += piece
            total += len(piece)
        if len(ids) > (bos is not None):
            docs.append(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return docs
