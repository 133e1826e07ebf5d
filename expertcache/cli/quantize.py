"""expertcache quantize: write a copy of a checkpoint whose experts are int8 or int4 (pack-quantized)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .flags import fmt_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--bits", type=int, choices=(4, 8), required=True, help="bits per expert weight")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights sharing one scale along a row: 32, 64, 128 or 256, or 0 for one scale per row "
                        "(default: 64 for 4 bits, one per row for 8 bits: the layouts torch's CPU kernels compute on)")
    p.add_argument("--dense", choices=("keep", "int8", "int4"), default="keep",
                   help="the dense Linear weights (attention, shared experts, the head): keep them as saved (default), "
                        "int8 with one scale per row, or int4 in groups (the experts' size when they are int4, else 64; "
                        "llama.cpp's q4_0 quantizes these too); routers and a tied head are always kept")
    p.add_argument("--out", required=True, help="new directory to write (must not exist or be empty); the source is only read")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from ..config import demo_model_dir
    from ..tools.quantize import quantize_checkpoint

    model = args.model if args.model is not None else demo_model_dir()
    r = quantize_checkpoint(model, args.out, bits=args.bits, group_size=args.group_size, dense=args.dense, progress=not args.json)
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
        return 0
    dense = f"; {r.dense_weights} dense weights as {r.dense}" if r.dense != "keep" else ""
    print(f"wrote {r.out_dir}: {r.experts} experts as {r.scheme}, {fmt_bytes(r.expert_bytes)} each "
          f"(from {fmt_bytes(r.source_expert_bytes)}, {r.source_expert_bytes / r.expert_bytes:.2f}x smaller), "
          f"weight error {100 * r.relative_error:.2f}% (relative L2){dense}, {r.seconds:.1f} s")
    return 0
