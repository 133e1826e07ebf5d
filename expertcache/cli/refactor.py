"""expertcache refactor: split a dense Llama/Mistral/Qwen2-family checkpoint into an MoE (Read-ME)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..tools.refactor_settings import RefactorSettings

D = RefactorSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense", type=Path, help="dense checkpoint directory (Llama, Mistral or Qwen2 family, with its tokenizer)")
    p.add_argument("--experts", type=int, default=D.experts, help=f"experts per layer (default {D.experts})")
    p.add_argument("--top-k", type=int, default=D.top_k, help=f"experts per token (default {D.top_k})")
    p.add_argument("--shared-fraction", type=float, default=D.shared_fraction,
                   help="share of each FFN's neurons kept as an always-on shared expert (default 0: Mixtral; "
                        "above 0: Qwen2-MoE)")
    p.add_argument("--calibration", type=Path, nargs="+", required=True, metavar="TEXT",
                   help="text file(s) the dense model's FFN activations are recorded on")
    p.add_argument("--calibration-tokens", type=int, default=D.calibration_tokens,
                   help=f"tokens recorded (default {D.calibration_tokens})")
    p.add_argument("--finetune-tokens", type=int, default=D.finetune_tokens,
                   help="tokens of distillation fine-tune from the dense model (default 0: none)")
    p.add_argument("--finetune-text", type=Path, nargs="+", default=None, metavar="TEXT",
                   help="fine-tune on these files (default: the calibration text)")
    p.add_argument("--pregate", action="store_true",
                   help="train a pre-gate jointly in the fine-tune, routing the MoE while it trains (Read-ME); saved as "
                        "OUT/predictor-pregate.pt for --prefetch pregate --routing pregate")
    p.add_argument("--align-coef", type=float, default=D.align_coef,
                   help=f"with --pregate: how hard each router is pulled toward the pre-gate's choice (default {D.align_coef})")
    p.add_argument("--pregate-attn", type=int, default=D.pregate_attn, metavar="W",
                   help=f"with --pregate: width of the pre-gate's causal attention over the context, a multiple of 4 "
                        f"(0: the last tokens and moving averages only; default {D.pregate_attn})")
    p.add_argument("--pregate-balance", type=float, default=D.pregate_balance,
                   help=f"with --pregate: weight of the load balance of the pre-gate's dispatch, which keeps a layer from "
                        f"collapsing onto a few experts (default {D.pregate_balance})")
    p.add_argument("--lr", type=float, default=D.lr, help=f"fine-tune peak learning rate (default {D.lr})")
    p.add_argument("--batch-size", type=int, default=D.batch_size)
    p.add_argument("--seq-len", type=int, default=D.seq_len)
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--threads", type=int, default=D.threads, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue an unfinished fine-tune in OUT")
    p.add_argument("--out", type=Path, required=True, help="new directory for the MoE checkpoint (the source is only read)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


COLLAPSING = 2.5  # the busiest expert's share over an even one (1/E) above which the CLI warns


def run(args: argparse.Namespace) -> int:
    from ..tools.refactor import refactor

    settings = RefactorSettings(
        experts=args.experts, top_k=args.top_k, shared_fraction=args.shared_fraction, calibration=tuple(args.calibration),
        calibration_tokens=args.calibration_tokens, finetune_tokens=args.finetune_tokens,
        finetune_text=tuple(args.finetune_text) if args.finetune_text else None, lr=args.lr, batch_size=args.batch_size,
        seq_len=args.seq_len, seed=args.seed, threads=args.threads, resume=args.resume, pregate=args.pregate,
        align_coef=args.align_coef, pregate_balance=args.pregate_balance, pregate_attn=args.pregate_attn,
    )  # fmt: skip
    r = refactor(args.dense, args.out, settings, progress=not args.json)
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
        return 0
    shared = f" + a shared expert of {r.shared_width}" if r.shared_width else ""
    print(f"wrote {r.out_dir}: {r.model_type}, {r.experts} experts of {r.expert_width} neurons{shared}, top-{r.top_k}; "
          f"{r.params['active'] / 1e6:.2f}M of {r.params['total'] / 1e6:.2f}M parameters active per token")
    print("router recall per layer: " + " ".join(f"{x:.2f}" for x in r.router_recall))
    print("FFN error per layer before fine-tuning: " + " ".join(f"{x:.2f}" for x in r.ffn_error))
    if r.finetune_tokens:
        print(f"fine-tuned on {r.finetune_tokens} tokens: KL(dense || MoE) {r.finetune_kl:.4f} at the end")
    if r.max_expert_share:
        print(f"busiest expert's share of each layer's dispatches (even: {1 / r.experts:.3f}): "
              + " ".join(f"{x:.3f}" for x in r.max_expert_share))
        crowded = [i for i, x in enumerate(r.max_expert_share) if x > COLLAPSING / r.experts]
        if crowded:
            fix = "raise --pregate-balance" if args.pregate else "fine-tune longer or on more varied text"
            which = f"layers {', '.join(map(str, crowded))} send" if len(crowded) > 1 else f"layer {crowded[0]} sends"
            print(f"warning: {which} {COLLAPSING:g}x an even share or more to one expert: "
                  f"their routing is collapsing onto a few experts ({fix})")
    if r.pregate_agreement:
        print("pre-gate agreement with each router's top-k: " + " ".join(f"{x:.2f}" for x in r.pregate_agreement))
        print(f"to train the pre-gate on with the model frozen (README, Read-ME: about +0.3 points of recall): expertcache "
              f"train-predictor --model {r.out_dir} --kind pregate --init {Path(r.out_dir) / 'predictor-pregate.pt'} "
              f"--max-tokens 300000 --steps 8000 --lr 3e-4 --out PATH")
    print(f"{r.seconds:.0f} s")
    return 0
