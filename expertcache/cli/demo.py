"""expertcache train-demo: train (or resume) a run of the bundled demo model's recipe, or export
a checkpoint of it as the shipped files (--export CKPT --out DIR)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..demo.settings import EXPERTS_IMPLS, FAMILIES, DemoTrainingSettings
from ..errors import ExpertCacheError

D = DemoTrainingSettings  # every default is the settings' own


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--out-dir", type=Path, default=D.out_dir, help="run folder (checkpoints, log, tokens)")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt")
    g.add_argument("--seed", type=int, default=D.seed)
    g.add_argument("--threads", type=int, default=D.threads, help="torch CPU threads")
    g.add_argument("--max-steps", type=int, default=D.max_steps, help="step budget (schedule by steps)")
    g.add_argument("--end-at", default=D.end_at, help="UTC wall-clock end 'HH:MM' or ISO time (schedule by time)")
    g.add_argument("--save-every-min", type=float, default=D.save_every_min, help="checkpoint period in minutes")
    g.add_argument("--eval-items", type=int, default=D.eval_items, help="last-word MC items scored at each checkpoint (0: off)")
    g.add_argument("--export-to", type=Path, default=D.export_to, help="also export the first and the final checkpoint here")
    g.add_argument("--export", type=Path, default=None, metavar="CKPT", help="export mode: checkpoint folder to export")
    g.add_argument("--out", type=Path, default=None, help="export mode: destination folder")

    d = parser.add_argument_group("data")
    d.add_argument("--train-text", type=Path, nargs="*", default=D.train_text, help="train on these files instead of the corpus")
    d.add_argument("--no-extra-lowercase", action="store_true", help="skip tinystories_train_extra_lowercase.txt")
    d.add_argument("--tinystories-share", type=float, default=D.tinystories_share, help="token share of cased TinyStories")
    d.add_argument("--lowercase-share", type=float, default=D.lowercase_share, help="token share of lowercase TinyStories")
    d.add_argument("--seq-len", type=int, default=D.seq_len)
    d.add_argument("--batch-size", type=int, default=D.batch_size)

    m = parser.add_argument_group("model")
    m.add_argument("--family", default=D.family, choices=FAMILIES,
                   help="mixtral: the demo MoE; llama: a dense model (the parent `expertcache refactor` splits)")
    m.add_argument("--tokenizer", type=Path, default=D.tokenizer, help="reuse this tokenizer folder instead of training one")
    m.add_argument("--vocab-size", type=int, default=D.vocab_size)
    m.add_argument("--hidden", type=int, default=D.hidden)
    m.add_argument("--layers", type=int, default=D.layers)
    m.add_argument("--intermediate", type=int, default=D.intermediate, help="FFN width: per expert (mixtral), whole FFN (llama)")
    m.add_argument("--experts", type=int, default=D.experts)
    m.add_argument("--top-k", type=int, default=D.top_k)
    m.add_argument("--heads", type=int, default=D.heads)
    m.add_argument("--kv-heads", type=int, default=D.kv_heads)
    m.add_argument("--tie-embeddings", action="store_true")
    m.add_argument("--experts-impl", default=D.experts_impl, choices=EXPERTS_IMPLS)

    o = parser.add_argument_group("optimiser")
    o.add_argument("--lr", type=float, default=D.lr)
    o.add_argument("--min-lr-ratio", type=float, default=D.min_lr_ratio)
    o.add_argument("--warmup-steps", type=int, default=D.warmup_steps)
    o.add_argument("--weight-decay", type=float, default=D.weight_decay)
    o.add_argument("--aux-coef", type=float, default=D.aux_coef, help="router load-balancing loss coefficient")
    o.add_argument("--grad-clip", type=float, default=D.grad_clip)
    o.add_argument("--bf16", action="store_true", help="bf16 autocast (measured no faster on the 2-core CPU)")


def settings_of(args: argparse.Namespace) -> DemoTrainingSettings:
    """The training settings the flags give."""
    names = DemoTrainingSettings.__dataclass_fields__
    kw = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if kw.get("train_text") is not None:
        kw["train_text"] = tuple(kw["train_text"])
    return DemoTrainingSettings(**kw)


def run(args: argparse.Namespace) -> int:
    from ..demo import training

    _show_progress_logs()
    if args.export is not None:
        if args.out is None:
            raise ExpertCacheError("--export needs --out")
        training.export(args.export, args.out)
        return 0
    training.train_demo(settings_of(args))
    return 0


def _show_progress_logs() -> None:
    """The run logs its steps, checkpoints and evaluations at INFO: shown (on stderr) unless --debug shows more."""
    log = logging.getLogger("expertcache.demo.training")
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
