#!/usr/bin/env python
"""Read-ME end to end: a dense model -> `expertcache refactor` -> fine-tune -> pre-gate -> a budget.

    python benchmarks/refactor.py [--dense DIR] [--out results/refactor] [--finetune-tokens N] [--speed-runs N] [--quick]

1. The dense parent: DIR (default: the export of results/readme/dense/ckpt, trained by
   `expertcache train-demo --family llama --tokenizer expertcache/demo --intermediate 2048 ...`,
   the demo's recipe, data and tokenizer with a dense FFN of 2,048).
2. `expertcache refactor` into 8 experts, top-2, on TinyStories train text: without fine-tune
   (moe-init), with a distillation fine-tune of N tokens (moe-ft), and with the same fine-tune
   training a pre-gate jointly that routes the model while it trains (moe-pg, `--pregate`). Each is
   skipped when its output exists (a killed fine-tune resumes with --resume; run them side by side
   with the CLI to use both cores). --align-coef sets moe-pg's (use a new --out for each value).
3. Quality, same run and same token ids: perplexity on TinyStories validation (first 10k tokens,
   window 256, stride 128), last-word multiple-choice accuracy (500 items) and active parameters per
   token: the dense model, moe-init, moe-ft, moe-pg with its own routers and routed by its pre-gate
   (the joint one and the polished one), and the demo MoE.
4. Predictors on moe-pg, trained on TinyStories train (20k tokens): learned (depth 1) and, for
   comparison, a pre-gate distilled after the fact (pregate-distilled); the joint pre-gate trained
   on, the model frozen, on 300k tokens (pregate-polished: `train-predictor --kind pregate --init
   MODEL/predictor-pregate.pt --max-tokens 300000 --steps 8000 --lr 3e-4`), and a learned
   predictor given the same 300k tokens (learned-300k); `eval-predictors` recall
   against the model's routers on 2,000 held-out tokens: next-gate and learned at depth 1, the
   pre-gates for every layer at once, fed in segments of the fine-tune's window (256: where the
   model was trained) and of twice it; then the same against the routing the model runs with when
   its pre-gate routes it (`--routed-by-pregate`), the learned predictor fitted to that routing.
5. Speed: moe-pg at a 50% expert budget, one engine per variant in one process, decode steps in
   turn (benchmarks/decode.py's lockstep): 100% resident, prefetch none, next-gate, learned, pregate,
   and routing by the pre-gate (how it was trained), also at 100% (the same routing with every
   expert resident: what the budget itself costs); the pre-gate variants use the polished pre-gate;
   TPOT medians, hit rates, bytes read; --speed-runs N repeats it and lists every run's ratios.
Writes OUT/refactor.json and OUT/refactor.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VALID = "tinystories/tinystories_valid_cased.txt"
TRAIN = "tinystories/tinystories_train_cased.txt"
MC = "eval/tinystories_valid_lastword_mc.jsonl"
POLISH_TOKENS = 300_000  # calibration tokens the joint pre-gate is trained on with (pregate-polished)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def corpus(rel: str) -> Path:
    from expertcache.demo.corpus import corpus_path

    return corpus_path(rel)


def dense_parent(arg: str | None, out: Path) -> Path:
    if arg:
        return Path(arg)
    target = out / "dense"
    if not (target / "model.safetensors").exists():
        from expertcache.demo.training import export

        export(REPO / "results/readme/dense/ckpt", target)
    return target


def refactored(dense: Path, out: Path, finetune_tokens: int, calibration: Path, align_coef: float) -> dict[str, Path]:
    from expertcache.tools.refactor import STATE_DIR, refactor
    from expertcache.tools.refactor_settings import RefactorSettings

    dirs = {"moe-init": out / "moe-init", "moe-ft": out / "moe-ft", "moe-pg": out / "moe-pg"}
    for name, tokens in (("moe-init", 0), ("moe-ft", finetune_tokens), ("moe-pg", finetune_tokens)):
        d = dirs[name]
        unfinished = (d / STATE_DIR).exists()
        if (d / "refactor.json").exists() and not unfinished:
            continue
        log(f"refactor -> {d} (fine-tune {tokens} tokens)")
        s = RefactorSettings(experts=8, top_k=2, calibration=(calibration,), finetune_tokens=tokens, resume=unfinished,
                             threads=2, save_every_min=5.0, pregate=name == "moe-pg", align_coef=align_coef)  # fmt: skip
        refactor(dense, d, s, progress=True)
    return dirs


def quality(models: dict[str, tuple[Path, dict]], valid_ids: list[int], mc_items: list[dict]) -> dict:
    from contextlib import nullcontext

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import expertcache
    from expertcache.tools.quality import ActivationCounter, choice_scores, perplexity

    out = {}
    for name, (path, opts) in models.items():
        log(f"quality: {name}")
        t0 = time.time()
        if opts.get("dense"):
            from expertcache import gemm

            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
            gemm.install_dense(model)  # the exact kernel the engine gives the MoEs' dense parts: torch's bits, faster
            tok = AutoTokenizer.from_pretrained(str(path))
            total = sum(p.numel() for p in model.parameters())
            params = {"total": total, "active": total}
            close = lambda: None  # noqa: E731
        else:
            eng = expertcache.load(path, expert_budget="100%", io="buffered", **{k: v for k, v in opts.items() if k != "dense"})
            model, tok = eng.model, eng.tokenizer
            cfg = model.config
            e = getattr(cfg, "num_local_experts", None) or cfg.num_experts
            dense_params = sum(p.numel() for p in model.parameters())  # the engine's model holds no expert weights
            expert_params = _expert_params(path)
            params = {"total": dense_params + expert_params, "active": dense_params + expert_params * cfg.num_experts_per_tok // e}
            close = eng.close
        counter = ActivationCounter()  # who gets the tokens: a collapsed layer shows here
        watch = eng.observe(on_route=counter) if not opts.get("dense") else nullcontext()
        with torch.inference_mode(), watch:
            ppl, scored = perplexity(model, valid_ids, window=256, stride=128)
            correct = 0
            for item in mc_items:
                scores = choice_scores(model, tok, item["context"], item["choices"])
                correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
        close()
        out[name] = {"perplexity": ppl, "tokens": scored, "mc_accuracy": correct / len(mc_items), "mc_items": len(mc_items),
                     "params_total": params["total"], "params_active": params["active"], "seconds": time.time() - t0,
                     "busiest_share": counter.busiest_share()}
        log(f"  {out[name]}")
    return out


def _expert_params(path: Path) -> int:
    from expertcache.checkpoint import Checkpoint

    ck = Checkpoint.open(path)
    return len(ck.experts) * ck.expert_bytes // 2  # bf16: two bytes a parameter


def polish(moe: Path, out: Path, cal: Path, quick: bool) -> Path:
    """The joint pre-gate trained on, the model frozen (`train-predictor --init`): OUT/predictor-pregate-polished.pt."""
    import expertcache
    from expertcache.predictors.artefact import default_path
    from expertcache.tools.predictor_training import train_predictor
    from expertcache.tools.settings import TrainSettings

    path = out / "predictor-pregate-polished.pt"
    if not path.exists():
        tokens = 2000 if quick else POLISH_TOKENS
        log(f"train the joint pre-gate on, {tokens} tokens")
        settings = TrainSettings(steps=20 if quick else 8000, width=256, lr=3e-4)
        with expertcache.load(moe, expert_budget="100%", prefetch="none", io="buffered") as eng:
            train_predictor(eng, "pregate", text=cal, max_tokens=tokens, settings=settings, init=default_path(moe, "pregate"),
                            progress=False).save(path)  # fmt: skip
    return path


def predictors(moe: Path, out: Path, cal: Path, held: Path, tokens: int, polished: Path, quick: bool = False) -> dict:
    import expertcache
    from expertcache.predictors.artefact import default_path
    from expertcache.tools.predictor_eval import eval_predictors
    from expertcache.tools.predictor_training import train_predictor
    from expertcache.tools.settings import TrainSettings

    files = {"pregate": str(default_path(moe, "pregate")), "pregate-polished": str(polished)}  # the joint one beside the model
    results = []
    with expertcache.load(moe, expert_budget="100%", prefetch="none", io="buffered") as eng:
        big = 2000 if quick else POLISH_TOKENS
        for kind, steps, name, train_tokens in (("learned", 1000, "learned", 20000), ("pregate", 3000, "pregate-distilled", 20000),
                                                ("learned", 4000, "learned-300k", big)):  # fmt: skip
            path = out / f"predictor-{name}.pt"
            if not path.exists():
                log(f"train {name}")
                settings = TrainSettings(steps=20 if quick else steps, width=256 if kind == "pregate" else 128)
                art = train_predictor(eng, kind, text=cal, max_tokens=train_tokens, depths=[1], settings=settings, progress=False)
                art.save(path)
                if name == "learned":
                    art.save(default_path(moe, kind))
            files[name] = str(path)
        log("eval-predictors")
        trained = json.loads((moe / "refactor.json").read_text())["settings"]["seq_len"]  # the windows it was trained on
        for segment in (trained, 2 * trained):  # within its training length, and half the tokens beyond it
            for label, names, given in (("", ["next-gate", "learned", "pregate"], {k: files[k] for k in ("learned", "pregate")}),
                                        ("-distilled", ["pregate"], {"pregate": files["pregate-distilled"]}),
                                        ("-polished", ["pregate"], {"pregate": files["pregate-polished"]}),
                                        ("-300k", ["learned"], {"learned": files["learned-300k"]})):  # fmt: skip
                rep = eval_predictors(eng, held, names=names, depths=[1], max_tokens=tokens, files=given, segment=segment, progress=False)
                results += [dict(r, predictor=r["predictor"] + label, truth="its routers", segment=segment) for r in rep.results]
    # the routing the model runs with when its pre-gate routes it (how --pregate trained it): a learned
    # predictor fitted to that routing, scored against it with the others
    with expertcache.load(moe, expert_budget="100%", prefetch="pregate", routing="pregate", io="buffered") as eng:
        path = out / "predictor-learned-routed.pt"
        if not path.exists():
            log("train learned on the routing by the pre-gate")
            train_predictor(eng, "learned", text=cal, max_tokens=20000, depths=[1], settings=TrainSettings(steps=1000, width=128),
                            progress=False).save(path)  # fmt: skip
        files["learned-routed"] = str(path)
        log("eval-predictors, routed by the pre-gate")
        rep = eval_predictors(eng, held, names=["next-gate", "learned", "pregate"], depths=[1], max_tokens=tokens,
                              files={"learned": str(path), "pregate": files["pregate"]}, segment=trained, progress=False)  # fmt: skip
        results += [dict(r, truth="routing by the pre-gate", segment=trained) for r in rep.results]
    return {"files": files, "results": results, "tokens": rep.tokens, "sparse_layers": rep.sparse_layers}


def speed(moe: Path, prompt: list[int], tokens: int, budget: str, rounds: int, pregate: Path | None = None) -> dict:
    import torch

    import expertcache
    from decode import drain, step_in_turn

    torch.set_num_threads(1)
    variants = {
        "all-resident": dict(expert_budget="100%", prefetch="none"),
        "none": dict(expert_budget=budget, prefetch="none"),
        "next-gate": dict(expert_budget=budget, prefetch="next-gate"),
        "learned": dict(expert_budget=budget, prefetch="learned"),
        "pregate": dict(expert_budget=budget, prefetch="pregate"),
        "pregate-routing": dict(expert_budget=budget, prefetch="pregate", routing="pregate"),
        "pregate-routing, all resident": dict(expert_budget="100%", prefetch="pregate", routing="pregate"),
    }
    if pregate is not None:  # a pre-gate file other than the one beside the model
        for kw in variants.values():
            if kw.get("prefetch") == "pregate":
                kw["predictor"] = str(pregate)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(rounds):
        engines = {v: expertcache.load(moe, io="direct", num_threads=1, **kw) for v, kw in variants.items()}
        for e in engines.values():
            e.generate(prompt[:8], max_new_tokens=8, stop_at_eos=False)
            drain(e)
            e.reset_stats()
        st = step_in_turn(engines, prompt, tokens, seed=r)
        for v, e in engines.items():
            s = e.stats()
            runs[v].append({"tpot_ms": 1e3 * statistics.median(st[v]["times"]), "hit_rate": s["hits"] / max(1, s["hits"] + s["misses"]),
                            "bytes_read_per_token": s["bytes_read"] / tokens, "stall_s": s.get("stall_seconds", 0.0),
                            "prefetch_issued": s["prefetch_issued"], "prefetch_used": s["prefetch_used"],
                            "ids": st[v]["ids"]})  # fmt: skip
            e.close()
        log(f"speed round {r}: " + ", ".join(f"{v} {runs[v][-1]['tpot_ms']:.2f}" for v in variants))
    base = "all-resident"
    out = {}
    for v, rs in runs.items():
        out[v] = {k: statistics.median(x[k] for x in rs) for k in ("tpot_ms", "hit_rate", "bytes_read_per_token", "stall_s",
                                                                    "prefetch_issued", "prefetch_used")}  # fmt: skip
        out[v]["vs_all_resident"] = statistics.median(x["tpot_ms"] / y["tpot_ms"] for x, y in zip(rs, runs[base]))
        if v.startswith("pregate-routing"):  # against the same routing with every expert resident: the budget's own cost
            out[v]["vs_routed_all_resident"] = statistics.median(
                x["tpot_ms"] / y["tpot_ms"] for x, y in zip(rs, runs["pregate-routing, all resident"]))
        out[v]["same_tokens_as_exact"] = all(x["ids"] == y["ids"] for x, y in zip(rs, runs[base]))
    return {"budget": budget, "tokens": tokens, "rounds": rounds, "variants": out,
            "pregate_file": str(pregate) if pregate is not None else "beside the model"}


def markdown(rep: dict) -> str:
    q = rep.get("quality", {})
    lines = [] if not q else ["## Quality (TinyStories validation perplexity, last-word accuracy; same token ids)", "",
             "| model | perplexity | last-word acc. | params | active / token | busiest expert, worst layer |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in q.items():
        busy = f"{100 * max(r['busiest_share']):.0f}%" if r.get("busiest_share") else "-"
        lines.append(f"| {name} | {r['perplexity']:.2f} | {100 * r['mc_accuracy']:.1f}% | {r['params_total'] / 1e6:.2f} M | "
                     f"{r['params_active'] / 1e6:.2f} M | {busy} |")
    if q:
        lines += ["", "(busiest expert: its share of a layer's dispatches on the validation text; 1/E = 12.5% is even, "
                  "50% means the layer sends every token to the same 2 of 8 experts)"]
    if "dense" in q:
        lines += [""] + [f"{n} perplexity / dense: {q[n]['perplexity'] / q['dense']['perplexity']:.3f}"
                         for n in q if n.startswith("moe")]  # fmt: skip
    ag = rep.get("refactor", {}).get("moe-pg", {}).get("pregate_agreement")
    if ag:
        lines += ["", "moe-pg's pre-gate against its routers' top-k at the end of the fine-tune, per layer: "
                  + " ".join(f"{100 * a:.0f}%" for a in ag)]
    p = rep.get("predictors")
    if p:
        lines += ["", f"## Predictor recall on moe-pg ({p['tokens']} held-out tokens, per sparse layer)", "",
                  "| predictor | depth | recall of | segments (tokens from a fresh cache) | recall | per layer |",
                  "|---|---|---|---:|---:|---|"]
        for r in p["results"]:
            per = " ".join("-" if v is None else f"{100 * v:.0f}" for v in r["per_layer_recall"])
            lines.append(f"| {r['predictor']} | {'all layers at once' if r['depth'] == 0 else r['depth']} | "
                         f"{r.get('truth', 'its routers')} | {r.get('segment', 512)} | {100 * r['recall']:.1f}% | {per} |")
    s = rep.get("speed")
    if s:
        lines += ["", f"## Decode on moe-pg at a {s['budget']} expert budget ({s['tokens']} steps x {s['rounds']} rounds, lockstep)", "",
                  "| variant | TPOT ms | vs all resident | vs all resident routed by the pre-gate | hit rate | KB read / token | same tokens |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for v, r in s["variants"].items():
            routed = f"{r['vs_routed_all_resident']:.3f}" if "vs_routed_all_resident" in r else "-"
            lines.append(f"| {v} | {r['tpot_ms']:.2f} | {r['vs_all_resident']:.3f} | {routed} | {100 * r['hit_rate']:.1f}% | "
                         f"{r['bytes_read_per_token'] / 1e3:.0f} | {'yes' if r['same_tokens_as_exact'] else 'no (lossy)'} |")
        lines += ["", "(all resident: the model's own routing, no prefetch; routed by the pre-gate, its scores cost every step; "
                  f"the pre-gate: {Path(s.get('pregate_file', 'beside the model')).name})"]
        runs = s.get("runs", [])
        if len(runs) > 1:  # the table is the last run; each variant's ratio to all resident in every run
            lines += ["", f"{len(runs)} runs, each variant / all resident (the table shows the last):", ""]
            for v in runs[0]:
                xs = [r[v] for r in runs]
                lines.append(f"- {v}: median {statistics.median(xs):.3f}, range {min(xs):.3f}-{max(xs):.3f} "
                             f"({', '.join(f'{x:.3f}' for x in xs)})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--dense", default=None)
    ap.add_argument("--out", default=str(REPO / "results/refactor"))
    ap.add_argument("--finetune-tokens", type=int, default=1_000_000)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per speed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--speed-runs", type=int, default=1, help="repeat the speed step; the markdown gives every run's ratios")
    ap.add_argument("--align-coef", type=float, default=None, help="moe-pg's --align-coef (default: refactor's own)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: quality, predictors, speed")
    ap.add_argument("--quick", action="store_true", help="small figures to check the script runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    report_path = out / "refactor.json"
    rep = json.loads(report_path.read_text()) if report_path.exists() else {}

    from expertcache.engine import encode_text
    from expertcache.tools.quality import read_mc
    from transformers import AutoTokenizer

    cal = out / "calibration.txt"
    if not cal.exists():
        cal.write_text(corpus(TRAIN).read_text(encoding="utf-8")[:8_000_000], encoding="utf-8")
    dense = dense_parent(args.dense, out)
    ft = 20_000 if args.quick else args.finetune_tokens
    from expertcache.tools.refactor_settings import RefactorSettings

    dirs = refactored(dense, out, ft, cal, RefactorSettings.align_coef if args.align_coef is None else args.align_coef)
    rep["refactor"] = {n: json.loads((d / "refactor.json").read_text())["result"] for n, d in dirs.items()}
    tok = AutoTokenizer.from_pretrained(str(dense))
    valid_ids = encode_text(tok, corpus(VALID).read_text(encoding="utf-8")[:200_000])[: 2000 if args.quick else 10_000]
    polished = polish(dirs["moe-pg"], out, cal, args.quick)
    if "predictors" not in skip:
        held = out / "heldout.txt"
        held.write_text(corpus(VALID).read_text(encoding="utf-8")[-300_000:], encoding="utf-8")
        rep["predictors"] = predictors(dirs["moe-pg"], out, cal, held, 300 if args.quick else 2000, polished, args.quick)
    if "quality" not in skip:
        items = read_mc(corpus(MC), 50 if args.quick else 500)
        models = {"dense": (dense, {"dense": True}), "moe-init": (dirs["moe-init"], {"prefetch": "none"}),
                  "moe-ft": (dirs["moe-ft"], {"prefetch": "none"}),
                  "moe-pg, its routers": (dirs["moe-pg"], {"prefetch": "none"}),
                  "moe-pg, routed by its pre-gate": (dirs["moe-pg"], {"prefetch": "pregate", "routing": "pregate"}),
                  "moe-pg, routed by its polished pre-gate": (dirs["moe-pg"], {"prefetch": "pregate", "routing": "pregate",
                                                                               "predictor": str(polished)}),
                  "demo MoE": (REPO / "expertcache/demo", {"prefetch": "none"})}  # fmt: skip
        rep["quality"] = quality(models, valid_ids, items)
    if "speed" not in skip:
        runs = []
        for i in range(1 if args.quick else args.speed_runs):  # runs minutes apart: the machine's load drifts between them
            runs.append(speed(dirs["moe-pg"], valid_ids[:32], 16 if args.quick else args.tokens, args.budget,
                              1 if args.quick else args.rounds, pregate=polished))
            log(f"speed run {i}: routed {runs[-1]['variants']['pregate-routing']['vs_all_resident']:.3f}x all resident")
        rep["speed"] = dict(runs[-1], runs=[{v: r["vs_all_resident"] for v, r in run["variants"].items()} for run in runs])
    report_path.write_text(json.dumps(rep, indent=2) + "\n")
    (out / "refactor.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
