"""Quality through the offloaded engine: sliding-window perplexity of a text and multiple-choice
accuracy over a jsonl set, with the run's cache counters per token (evaluate -> EvalResult), and
the scorers other tools share (perplexity, choice_sequences, choice_scores, ActivationCounter).

Perplexity: windows of `window` tokens advancing by `stride`, each scoring only tokens the previous
one did not, so every token is predicted once with at least `window - stride` tokens of context.
A multiple-choice choice scores the sum of its continuation's token log-probabilities
(choice_sequences says which tokens those are).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine import encode_text
from ..errors import ExpertCacheError


@dataclass
class EvalResult:
    perplexity: float | None
    tokens: int  # tokens scored (perplexity) or forwarded (multiple choice)
    accuracy: float | None
    items: int | None
    experts_per_token: float  # routed expert activations per forwarded token, all layers
    misses_per_token: float
    bytes_read_per_token: float
    forwarded_tokens: int
    window: int | None = None
    stride: int | None = None
    busiest_expert_share: list[float] | None = None  # per sparse layer: the busiest expert's share of its activations


class ActivationCounter:
    """An engine observer counting forwarded tokens, routed (token, expert) activations and, per
    layer, each expert's share of them (a layer that collapsed onto a few experts shows here)."""

    def __init__(self) -> None:
        self.activations = 0
        self.tokens_by_layer: dict[int, int] = {}
        self.per_expert: dict[int, torch.Tensor] = {}  # layer -> activations of each expert

    def __call__(self, layer, x, logits, weights, ids) -> None:
        routed = ids[ids >= 0]
        self.activations += routed.numel()
        self.tokens_by_layer[layer] = self.tokens_by_layer.get(layer, 0) + ids.shape[0]
        mine = self.per_expert.get(layer)
        c = torch.bincount(routed.flatten(), minlength=0 if mine is None else len(mine))  # as long as mine, or longer
        if mine is not None:
            c[: len(mine)] += mine
        self.per_expert[layer] = c

    @property
    def tokens(self) -> int:
        return max(self.tokens_by_layer.values(), default=0)

    def busiest_share(self) -> list[float]:
        """Per sparse layer (in order): the busiest expert's share of the layer's activations
        (1/E when even, 1/k when every token goes to the same k experts)."""
        return [float(c.max() / c.sum()) for _, c in sorted(self.per_expert.items()) if c.sum() > 0]


def _token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, as a float64 tensor [len(ids) - 1]."""
    inp = torch.tensor([ids])
    logits = model(input_ids=inp, use_cache=False).logits[0, :-1].double()  # [n-1, V]
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, inp[0, 1:, None])[:, 0]


@torch.inference_mode()
def perplexity(model, ids: list[int], *, window: int, stride: int, progress: bool = False,
               desc: str = "perplexity") -> tuple[float, int]:
    """Sliding-window perplexity of `ids`; returns (perplexity, tokens scored)."""
    from tqdm.auto import tqdm

    if window < 2 or not 1 <= stride <= window:
        raise ExpertCacheError(f"need window >= 2 and 1 <= stride <= window, got window={window} stride={stride}")
    if len(ids) < 2:
        raise ExpertCacheError("the text has fewer than 2 tokens")
    nll, scored, done = 0.0, 0, 1  # `done`: tokens [0, done) are already predicted (token 0 never is)
    begin = 0
    bar = tqdm(total=len(ids) - 1, unit="tok", desc=desc, disable=not progress)
    while done < len(ids):
        end = min(begin + window, len(ids))
        lp = _token_logprobs(model, ids[begin:end])  # predicts ids[begin+1 : end]
        new = lp[done - begin - 1 :]  # only tokens not yet scored
        nll -= float(new.sum())
        scored += new.numel()
        bar.update(new.numel())
        done = end
        begin = end - max(window - stride, 1)  # keep >= 1 token of context so none goes unscored
    bar.close()
    return math.exp(nll / scored), scored


@torch.inference_mode()
def choice_sequences(tokenizer, context: str, choices: list[str]) -> list[tuple[list[int], int]]:
    """For each choice: the ids of context + " " + choice, tokenised whole (after BOS, as the engine
    encodes text), and where its continuation starts: after the longest prefix it shares with the
    context's own ids (lm-evaluation-harness's rule). Tokenised whole, a merge across the boundary
    is scored as the model would see it; tokenised in pieces, the model is scored on a split it never saw.
    The one definition every multiple-choice score in expertcache uses (eval, tradeoff, train-demo)."""
    ctx = encode_text(tokenizer, context)
    out = []
    for choice in choices:
        full = encode_text(tokenizer, context + " " + choice)
        common = 0
        while common < min(len(ctx), len(full)) and ctx[common] == full[common]:
            common += 1
        out.append((full, max(common, 1)))  # token 0 (BOS) is never scored
    return out


@torch.inference_mode()
def choice_scores(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Sum of each choice's continuation log-probabilities (choice_sequences), all choices in one
    right-padded forward pass: causal attention keeps padding out of every scored position."""
    seqs = choice_sequences(tokenizer, context, choices)
    width = max(len(full) for full, _ in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (full, _) in enumerate(seqs):
        ids[i, : len(full)] = torch.tensor(full)
    logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)  # [C, L, V]
    scores = []
    for i, (full, start) in enumerate(seqs):
        pos = torch.arange(start, len(full))
        scores.append(float(logp[i, pos - 1, ids[i, pos]].sum()))
    return scores


def read_mc(path: Path, limit: int | None = None) -> list[dict]:
    items = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                item = json.loads(line)
                if not isinstance(item.get("choices"), list) or not isinstance(item.get("label"), int) or "context" not in item:
                    raise ExpertCacheError(f"{path}:{n}: each line needs context, choices (list) and label (int)")
                if not 0 <= item["label"] < len(item["choices"]):
                    raise ExpertCacheError(f"{path}:{n}: label {item['label']} is not the index of one of its {len(item['choices'])} choices")
                items.append(item)
                if limit is not None and len(items) >= limit:
                    break
    except OSError as e:
        raise ExpertCacheError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ExpertCacheError(f"{path}: not JSON lines ({e})") from None
    return items


def evaluate(engine, *, text: Path | None = None, mc: Path | None = None, window: int = 256, stride: int = 128,
             max_tokens: int | None = None, limit: int | None = None, progress: bool = False) -> EvalResult:
    """Perplexity of `text` or accuracy on `mc`, through the engine's offloaded model."""
    if (text is None) == (mc is None):
        raise ExpertCacheError("give exactly one of --text FILE or --mc FILE.jsonl")
    if engine.tokenizer is None:
        raise ExpertCacheError("this checkpoint has no tokenizer; eval needs one")
    counter = ActivationCounter()
    engine.reset_stats()
    with engine.observe(on_route=counter):
        ppl = acc = None
        items = None
        if text is not None:
            try:
                raw = Path(text).read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise ExpertCacheError(f"{text}: cannot read ({e.strerror or e})") from None
            ids = engine.encode(raw)
            if max_tokens is not None:
                ids = ids[:max_tokens]
            ppl, scored = perplexity(engine.model, ids, window=window, stride=stride, progress=progress)
        else:
            data = read_mc(Path(mc), limit)
            if not data:
                raise ExpertCacheError(f"{mc}: no items")
            correct = 0
            it = data
            if progress:
                from tqdm import tqdm

                it = tqdm(data, desc="multiple choice", unit="item")
            for item in it:
                scores = choice_scores(engine.model, engine.tokenizer, item["context"], item["choices"])
                correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
            acc, items, scored = correct / len(data), len(data), counter.tokens
    s = engine.stats()
    fwd = max(counter.tokens, 1)
    return EvalResult(
        perplexity=ppl, tokens=scored, accuracy=acc, items=items,
        experts_per_token=counter.activations / fwd, misses_per_token=s["misses"] / fwd,
        bytes_read_per_token=s["bytes_read"] / fwd, forwarded_tokens=counter.tokens,
        window=window if text is not None else None, stride=stride if text is not None else None,
        busiest_expert_share=[round(x, 4) for x in counter.busiest_share()],
    )
