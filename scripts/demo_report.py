"""Measure the bundled demo model for its model card: held-out perplexities, last-word accuracy,
per-layer routing balance and entropy, next-gate recall per layer, and samples.

    python scripts/demo_report.py [--model expertcache/demo] [--max-tokens 40000] [--out results/demo_report.json]

Runs through the offloaded engine at a 100% budget (exact, so the figures are the model's own).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import expertcache
from expertcache.demo import corpus
from expertcache.tools.quality import evaluate

PROMPTS = ["Once upon a time", "The little dog", "One day, Lily went to the park and", "It was a dark and stormy night"]


class RoutingRecorder:
    """Per layer: routed counts per expert, and next-gate hits (layer l+1's router on layer l's input)."""

    def __init__(self, routers: dict[int, torch.Tensor], num_experts: int, top_k: int) -> None:
        self.layers = sorted(routers)
        self.k = top_k
        self.counts = {l: torch.zeros(num_experts, dtype=torch.long) for l in self.layers}
        self.routers = routers
        self.pending: dict[int, torch.Tensor] = {}
        self.hit = {l: 0 for l in self.layers}
        self.total = {l: 0 for l in self.layers}

    def __call__(self, layer, x, logits, weights, ids) -> None:
        self.counts[layer] += torch.bincount(ids.flatten(), minlength=self.counts[layer].numel())
        guess = self.pending.pop(layer, None)
        if guess is not None:
            self.hit[layer] += int((guess.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).sum())
            self.total[layer] += ids.numel()
        i = self.layers.index(layer)
        if i + 1 < len(self.layers):
            nxt = self.layers[i + 1]
            w = self.routers[nxt]
            self.pending[nxt] = torch.nn.functional.linear(x.to(w.dtype), w).topk(self.k, dim=-1).indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=40000, help="tokens scored per text file")
    ap.add_argument("--mc-limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("results/demo_report.json"))
    args = ap.parse_args()
    report: dict = {"max_tokens_per_file": args.max_tokens}
    t0 = time.time()
    with expertcache.load(args.model, expert_budget="100%", prefetch="none", io="buffered", num_threads=2) as eng:
        ck = eng.checkpoint
        texts = {"tinystories_valid": corpus.corpus_path(corpus.TINYSTORIES_VALID)}
        tails = Path("results/heldout")
        tails.mkdir(parents=True, exist_ok=True)
        for p in corpus.public_domain_files():
            tail = tails / p.name
            tail.write_text(corpus.heldout_tail(p), encoding="utf-8")
            texts[p.stem + " (held-out tail)"] = tail
        texts["wikitext2 test (out of domain)"] = corpus.corpus_path("wikitext2/wiki.test.raw")
        report["perplexity"] = {}
        rec = RoutingRecorder(eng.routers(), ck.num_experts, ck.top_k)
        for name, path in texts.items():
            with eng.observe(on_route=rec if name == "tinystories_valid" else None):  # routing: TinyStories only
                res = evaluate(eng, text=path, window=256, stride=128, max_tokens=args.max_tokens)
            report["perplexity"][name] = {"perplexity": res.perplexity, "tokens": res.tokens}
            print(f"{name:<45} ppl {res.perplexity:8.2f} over {res.tokens} tokens", flush=True)
        mc = evaluate(eng, mc=corpus.corpus_path(corpus.LASTWORD_MC), limit=args.mc_limit, progress=True)
        report["lastword_mc"] = {"accuracy": mc.accuracy, "items": mc.items}
        print(f"last-word MC accuracy {100 * mc.accuracy:.1f}% over {mc.items} items", flush=True)
        routing = []
        for l in ck.sparse_layers:
            c = rec.counts[l].double()
            share = c / c.sum()
            entropy = float(-(share * share.clamp_min(1e-12).log()).sum() / math.log(len(share)))
            recall = rec.hit[l] / rec.total[l] if rec.total[l] else None
            routing.append({"layer": l, "share_min": float(share.min()), "share_max": float(share.max()),
                            "shares": [round(float(s), 4) for s in share], "entropy_normalised": entropy,
                            "next_gate_recall": recall})
        report["routing"] = routing
        report["samples"] = {}
        for p in PROMPTS:
            out = eng.generate(p, max_new_tokens=48, seed=0, greedy=False, temperature=0.8, top_p=0.95)
            report["samples"][p] = p + out.text
    report["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n| layer | min share | max share | routing entropy (normalised) | next-gate recall |\n|---|---|---|---|---|")
    for r in report["routing"]:
        rc = "-" if r["next_gate_recall"] is None else f"{100 * r['next_gate_recall']:.1f}%"
        print(f"| {r['layer']} | {100 * r['share_min']:.1f}% | {100 * r['share_max']:.1f}% | {r['entropy_normalised']:.3f} | {rc} |")
    for p, s in report["samples"].items():
        print(f"\n> {s!r}")


if __name__ == "__main__":
    main()
