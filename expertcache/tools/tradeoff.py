"""Quality against speed for the lossy routing policies (tradeoff -> TradeoffResult; markdown,
plot and write are its views). Each setting (a policy, one value of its knob) runs in its own
engine in decode mode: chunks of `window` tokens, each fed one token at a time with a KV cache,
so misses per token mean what they mean in generation. TPOT is the median wall time of one step.
Settings advance round-robin, chunk by chunk, so a shared machine's changing load falls on all of
them alike. A multiple-choice item is scored like a prompt: the context but its last token in one
prefill, then decode steps. Adaptive gating is calibrated once on text held out from what is scored.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..config import EngineConfig
from ..decoding import Decoding
from ..engine import Engine, demo_model_dir
from ..errors import ExpertCacheError
from .calibration import calibration_record, measure_sensitivity, read_ids, write_calibration
from .quality import ActivationCounter, choice_sequences, read_mc
from .settings import DROPS, LAMBDAS, RANKS, TRADEOFF_OPTIONAL
from .settings import TRADEOFF_POLICIES as POLICIES

log = logging.getLogger(__name__)

WARMUP_STEPS = 32  # decode steps run and discarded before the first measured setting


@dataclass(frozen=True)
class Setting:
    policy: str
    knob: str | None = None  # the swept parameter's name
    value: float | None = None
    protect_top: int | None = None  # cache-aware: J
    overrides: tuple[tuple[str, object], ...] = ()  # EngineConfig fields

    @property
    def label(self) -> str:
        return self.policy + _knob(self.knob, self.value, self.protect_top, " ")

    @property
    def routing(self) -> str:
        """The routing policy its engine runs (a miss copy is a cache option under exact routing)."""
        return "exact" if self.policy == "miss-copy" else self.policy


def _knob(knob: str | None, value: float | None, protect_top: int | None, lead: str = "") -> str:
    text = "" if knob is None else f"{knob}={value:g}"
    if protect_top is not None:
        text += f", J={protect_top}"
    return lead + text if text else ""


@dataclass
class Row:
    policy: str
    knob: str | None
    value: float | None
    protect_top: int | None
    perplexity: float
    accuracy: float | None
    experts_per_token: float  # routed activations per token, all layers
    misses_per_token: float
    bytes_read_per_token: float
    tpot_ms: float  # median wall time of one decode step
    stall_ms_per_token: float
    hit_rate: float | None
    tokens: int  # decode steps of the perplexity run
    mc_items: int
    seconds: float
    low_share: float | None = None  # miss-copy: share of expert lookups computed on the miss copy's (smaller) experts


@dataclass
class TradeoffResult:
    model: str
    expert_budget: str
    cache_policy: str
    prefetch: str
    top_k: int
    protect_tops: list[int]  # cache-aware J values swept
    window: int
    text: str
    mc: str | None
    rows: list[Row] = field(default_factory=list)
    calibration: dict | None = None  # text and tokens the adaptive gating was calibrated on

    def baseline(self) -> Row:
        return next(r for r in self.rows if r.policy == "exact")


# --- decode-mode measurement --------------------------------------------------------------------
def _step(decoding: Decoding, token: int) -> torch.Tensor:
    return decoding.feed([token])[-1].double()  # [V]


def _decode_chunk(model, chunk: list[int]) -> tuple[float, int, list[float]]:
    """Feed chunk[:-1] one decode step at a time on a fresh KV cache; (nll of chunk[1:], tokens, step seconds)."""
    decoding = Decoding(model)
    nll, times = 0.0, []
    for i in range(len(chunk) - 1):
        t0 = time.perf_counter()
        logits = _step(decoding, chunk[i])
        times.append(time.perf_counter() - t0)
        nll -= float(torch.log_softmax(logits, -1)[chunk[i + 1]])
    return nll, len(chunk) - 1, times


def _chunks(ids: list[int], window: int) -> list[list[int]]:
    """Chunks of window + 1 tokens overlapping by one, so ids[1:] are each predicted once."""
    return [ids[b : b + window + 1] for b in range(0, len(ids) - 1, window)]


@torch.inference_mode()
def decode_perplexity(model, ids: list[int], *, window: int) -> tuple[float, int, list[float]]:
    """Perplexity of `ids` scored one decode step at a time: chunks of `window` steps, each on a
    fresh KV cache, predict ids[1:] once each (quality.perplexity with window + 1, stride window).
    Returns (perplexity, tokens scored, seconds per step)."""
    nll, scored, times = 0.0, 0, []
    for chunk in _chunks(ids, window):
        n_nll, n, t = _decode_chunk(model, chunk)
        nll, scored = nll + n_nll, scored + n
        times += t
    return math.exp(nll / scored), scored, times


@torch.inference_mode()
def decode_choice_scores(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Sum of each choice's token log-probabilities after `context`, the way a prompt is answered:
    the context but its last token in one prefill, then decode steps (so a decode-only policy
    routes every position that predicts a choice token)."""
    decoding = Decoding(model)  # its tokens: what the KV cache holds
    scores = []
    for full, start in choice_sequences(tokenizer, context, choices):  # as quality.choice_scores scores them
        keep = 0  # keep the cached prefix this sequence shares, up to its last unscored token
        while keep < min(len(decoding), start - 1) and decoding.tokens[keep] == full[keep]:
            keep += 1
        decoding.crop(keep)
        if start - 1 > keep:  # the context but its last token: one prefill
            decoding.feed(full[keep : start - 1])
        total = 0.0
        for p in range(start, len(full)):  # decode steps: each predicts full[p]
            logits = _step(decoding, full[p - 1])
            total += float(torch.log_softmax(logits, -1)[full[p]])
        scores.append(total)
    return scores


class SettingRun:
    """One setting's engine and running figures. The sweep advances every setting chunk by chunk
    (round-robin), so drifting machine load falls on all settings alike; each engine's cache and
    counters carry on from chunk to chunk exactly as in a run of its own."""

    def __init__(self, setting: Setting, engine) -> None:
        self.setting, self.engine = setting, engine
        self.counter = ActivationCounter()
        self._counting = ExitStack()  # counting activations: until the perplexity pass ends
        self._counting.enter_context(engine.observe(on_route=self.counter))
        engine.reset_stats()
        self.nll, self.scored, self.times = 0.0, 0, []
        self.correct, self.items, self.seconds = 0, 0, 0.0
        self.text_stats: dict | None = None

    @torch.inference_mode()
    def chunk(self, chunk: list[int]) -> None:
        t0 = time.perf_counter()
        nll, n, times = _decode_chunk(self.engine.model, chunk)
        self.nll, self.scored = self.nll + nll, self.scored + n
        self.times += times
        self.seconds += time.perf_counter() - t0

    def end_text(self) -> None:
        """The perplexity pass is over: its counters are the table's cost figures."""
        self._counting.close()
        self.text_stats = self.engine.stats()

    def item(self, item: dict) -> None:
        t0 = time.perf_counter()
        scores = decode_choice_scores(self.engine.model, self.engine.tokenizer, item["context"], item["choices"])
        self.correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
        self.items += 1
        self.seconds += time.perf_counter() - t0

    def row(self) -> Row:
        s, fwd = self.text_stats, max(self.counter.tokens, 1)
        return Row(
            policy=self.setting.policy, knob=self.setting.knob, value=self.setting.value,
            protect_top=self.setting.protect_top,
            perplexity=math.exp(self.nll / self.scored),
            accuracy=self.correct / self.items if self.items else None,
            experts_per_token=self.counter.activations / fwd,
            misses_per_token=s["misses"] / fwd,
            bytes_read_per_token=s["bytes_read"] / fwd,
            tpot_ms=1000 * statistics.median(self.times),
            stall_ms_per_token=1000 * s["stall_seconds"] / fwd,
            hit_rate=s["hit_rate"],
            tokens=self.scored,
            mc_items=self.items,
            seconds=self.seconds,
            low_share=s["low_uses"] / s["lookups"] if s["lookups"] and self.engine.miss_copy is not None else None,
        )


# --- the sweep ------------------------------------------------------------------------------------
def settings(policies: list[str], *, drops: list[float], lambdas: list[float], ranks: list[int],
             protect_tops: list[int], calibrations: dict[float, Path], miss_copy: str | None = None) -> list[Setting]:
    out = [Setting("exact")]
    for p in policies:
        if p == "adaptive-gating":
            out += [Setting(p, "drop", d, None, (("calibration", str(calibrations[d])),)) for d in drops]
        elif p == "cache-aware":
            out += [Setting(p, "lambda", lam, j, (("cache_lambda", lam), ("cache_protect_top", j)))
                    for j in protect_tops for lam in lambdas]
        elif p == "cache-aware-max-rank":
            out += [Setting(p, "max_rank", r, j, (("cache_max_rank", int(r)), ("cache_protect_top", j)))
                    for j in protect_tops for r in ranks]
        elif p == "speculative":
            out.append(Setting(p))
        elif p == "pregate":  # routed by the model's pre-gate, which then also prefetches
            out.append(Setting(p, overrides=(("prefetch", "pregate"),)))
        elif p == "miss-copy":  # exact routing; decode misses read the smaller copy (--miss-copy)
            if miss_copy is None:
                raise ExpertCacheError("--policies miss-copy needs the copy: pass --miss-copy DIR (expertcache quantize MODEL --bits 4 --out DIR)")
            out.append(Setting(p, overrides=(("miss_copy", miss_copy),)))
        elif p != "exact":
            raise ExpertCacheError(f"unknown policy {p!r} in --policies: choose from {', '.join(POLICIES + TRADEOFF_OPTIONAL)}")
    return out


def calibrate_drops(base_config, text_ids: list[int], drops: list[float], out_dir: Path, *, window: int) -> tuple[dict[float, Path], dict]:
    """Measure routing sensitivity once (all experts resident) and write one threshold file per drop."""
    with Engine(replace(base_config, expert_budget="100%", prefetch="none", routing="exact")) as engine:
        sens = measure_sensitivity(engine, text_ids, window=window)
        paths = {}
        for d in drops:
            c = sens.scale_for_drop(d)
            paths[d] = out_dir / f"adaptive-gating-drop{d:g}.json"
            write_calibration(paths[d], calibration_record(engine, sens, c, target_drop=d))
    return paths, {"tokens": sens.tokens, "fisher": sens.fisher}


def run_sweep(base_config, *, text_ids: list[int], calib_ids: list[int], mc_items: list[dict], out_dir: Path,
              policies: list[str], drops: list[float], lambdas: list[float], ranks: list[int],
              window: int, protect_tops: list[int] | None, progress: bool = True, meta: dict,
              miss_copy: str | None = None) -> TradeoffResult:
    model_dir = Path(base_config.model) if base_config.model is not None else demo_model_dir()
    top_k = Checkpoint.open(model_dir).top_k
    if not protect_tops:  # J >= k protects every choice: cache-aware routing would change nothing
        protect_tops = [min(base_config.cache_protect_top, top_k - 1)]
    calibrations, calib_meta = {}, None
    if "adaptive-gating" in policies:
        calibrations, calib_meta = calibrate_drops(base_config, calib_ids, drops, out_dir, window=window)
        calib_meta["text"] = meta.get("calibration_text")
    result = TradeoffResult(
        model=str(model_dir), expert_budget=str(base_config.expert_budget), cache_policy=base_config.cache_policy,
        prefetch=base_config.prefetch, top_k=top_k, protect_tops=protect_tops, window=window, text=meta["text"], mc=meta.get("mc"),
        calibration=calib_meta,
    )
    with Engine(replace(base_config, routing="exact")) as engine:  # warm-up: imports, kernels, file handles
        decode_perplexity(engine.model, text_ids[: WARMUP_STEPS + 1], window=window)
    todo = settings(policies, drops=drops, lambdas=lambdas, ranks=ranks, protect_tops=protect_tops, calibrations=calibrations,
                    miss_copy=miss_copy)
    chunks = _chunks(text_ids, window)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(len(text_ids) - 1 + len(mc_items)) * len(todo), unit="step", desc="tradeoff")
    try:
        with ExitStack() as stack:
            runs = [SettingRun(s, stack.enter_context(Engine(replace(base_config, routing=s.routing, **dict(s.overrides)))))
                    for s in todo]
            for chunk in chunks:
                for r in runs:
                    r.chunk(chunk)
                    if bar is not None:
                        bar.update(len(chunk) - 1)
            for r in runs:
                r.end_text()
            for item in mc_items:
                for r in runs:
                    r.item(item)
                    if bar is not None:
                        bar.update(1)
            result.rows = [r.row() for r in runs]
    finally:
        if bar is not None:
            bar.close()
    return result


def tradeoff(base_config: EngineConfig, *, text: Path, out_dir: Path, mc: Path | None = None, max_tokens: int = 4096,
             limit: int | None = 100, window: int = 256, policies: list[str] | tuple[str, ...] = POLICIES,
             drops: list[float] | tuple[float, ...] = DROPS, lambdas: list[float] | tuple[float, ...] = LAMBDAS,
             ranks: list[int] | tuple[int, ...] = RANKS, protect_tops: list[int] | None = None,
             calibration_text: Path | None = None, calibration_tokens: int = 8192, progress: bool = True) -> TradeoffResult:
    """Sweep `policies` on the first `max_tokens` tokens of `text` (and up to `limit` items of the
    multiple-choice jsonl `mc`), each setting in an engine built from `base_config`. Adaptive
    gating is calibrated on `calibration_tokens` tokens of `calibration_text` (default: the tokens
    of `text` after the scored ones); its threshold files are written to `out_dir`."""
    if window < 2:
        raise ExpertCacheError(f"--window must be at least 2, got {window}")
    miss_copy, base_config = base_config.miss_copy, replace(base_config, miss_copy=None)  # only its own setting reads the copy
    if miss_copy is not None and "miss-copy" not in policies:
        policies = [*policies, "miss-copy"]
    unknown = [p for p in policies if p not in POLICIES + TRADEOFF_OPTIONAL]
    if unknown:
        raise ExpertCacheError(f"unknown policy {unknown[0]!r} in --policies: choose from {', '.join(POLICIES + TRADEOFF_OPTIONAL)}")
    with Engine(replace(base_config, routing="exact", expert_budget="100%")) as engine:  # tokenizer and a cheap load check
        all_ids = read_ids(engine, text, None)
        calib_ids = (read_ids(engine, calibration_text, calibration_tokens) if calibration_text
                     else all_ids[max_tokens : max_tokens + calibration_tokens])
    ids = all_ids[:max_tokens]
    if len(ids) < 2:
        raise ExpertCacheError(f"{text}: fewer than 2 tokens")
    if "adaptive-gating" in policies and len(calib_ids) < 2:
        raise ExpertCacheError("no calibration text left after --max-tokens: pass --calibration-text")
    mc_items = read_mc(mc, limit) if mc is not None else []
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"text": str(text), "mc": str(mc) if mc else None,
            "calibration_text": str(calibration_text or f"{text} (tokens {max_tokens}..)")}
    return run_sweep(base_config, text_ids=ids, calib_ids=calib_ids, mc_items=mc_items, out_dir=out_dir,
                     policies=list(policies), drops=list(drops), lambdas=list(lambdas), ranks=[int(r) for r in ranks],
                     window=window, protect_tops=[int(j) for j in protect_tops] if protect_tops else None,
                     progress=progress, meta=meta, miss_copy=miss_copy)


# --- views ----------------------------------------------------------------------------------------
def _pct(x: float | None, base: float | None) -> str:
    if x is None or base is None or base == 0:
        return "-"
    return f"{100 * (x / base - 1):+.1f}%"


def markdown(result: TradeoffResult) -> str:
    b = result.baseline()
    lines = [
        f"Model `{result.model}`, top-{result.top_k}, expert budget {result.expert_budget}, cache policy "
        f"{result.cache_policy}, prefetch {result.prefetch}, cache-aware J = protected top-J; decode mode, "
        f"chunks of {result.window} tokens, {b.tokens} scored tokens" + (f", {b.mc_items} multiple-choice items" if b.mc_items else "") + ".",
        "",
        "| policy | knob | perplexity | Δ ppl | accuracy | Δ acc (pt) | experts/token | Δ experts | misses/token | Δ misses | MB read/token | TPOT ms | Δ TPOT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    low = [r for r in result.rows if r.low_share is not None]
    for r in result.rows:
        acc = f"{100 * r.accuracy:.1f}%" if r.accuracy is not None else "-"
        dacc = f"{100 * (r.accuracy - b.accuracy):+.1f}" if r.accuracy is not None and b.accuracy is not None else "-"
        knob = _knob(r.knob, r.value, r.protect_top) or "-"
        lines.append(
            f"| {r.policy} | {knob} | {r.perplexity:.3f} | {_pct(r.perplexity, b.perplexity)} | {acc} | {dacc} | "
            f"{r.experts_per_token:.2f} | {_pct(r.experts_per_token, b.experts_per_token)} | {r.misses_per_token:.3f} | "
            f"{_pct(r.misses_per_token, b.misses_per_token)} | {r.bytes_read_per_token / 1e6:.2f} | {r.tpot_ms:.2f} | "
            f"{_pct(r.tpot_ms, b.tpot_ms)} |"
        )
    for r in low:
        lines.append(f"\n{r.policy}: {100 * r.low_share:.1f}% of expert lookups computed on the miss copy's experts.")
    return "\n".join(lines) + "\n"


def plot(result: TradeoffResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = [("perplexity", "perplexity (lower is better)")]
    if result.baseline().accuracy is not None:
        quality.append(("accuracy", "multiple-choice accuracy"))
    cost = [("misses_per_token", "cache misses per token"), ("tpot_ms", "time per output token (ms)")]
    fig, axes = plt.subplots(len(quality), len(cost), figsize=(11, 4.2 * len(quality)), squeeze=False)
    by_policy: dict[str, list[Row]] = {}
    for r in result.rows:
        by_policy.setdefault(r.policy + ("" if r.protect_top is None else f" J={r.protect_top}"), []).append(r)
    for i, (q, qlabel) in enumerate(quality):
        for j, (c, clabel) in enumerate(cost):
            ax = axes[i][j]
            for policy, rows in by_policy.items():
                style = dict(marker="*", markersize=14, linestyle="none") if policy == "exact" else dict(marker="o")
                rows = sorted(rows, key=lambda r: r.value if r.value is not None else 0)
                xs, ys = [getattr(r, c) for r in rows], [getattr(r, q) for r in rows]
                ax.plot(xs, ys, label=policy, **style)
                for r, x, y in zip(rows, xs, ys):
                    if r.knob is not None:
                        ax.annotate(f"{r.value:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xlabel(clabel)
            ax.set_ylabel(qlabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"routing policies: quality vs cost (budget {result.expert_budget}, {result.cache_policy}, prefetch {result.prefetch})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: TradeoffResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "tradeoff.json", "markdown": out_dir / "tradeoff.md", "plot": out_dir / "tradeoff.png"}
    paths["json"].write_text(json.dumps(asdict(result), indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["plot"])
    return paths
