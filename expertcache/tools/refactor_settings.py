"""The settings of `expertcache refactor` (tools/refactor.py), readable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RefactorSettings:
    experts: int = 8
    top_k: int = 2
    shared_fraction: float = 0.0  # share of each layer's neurons kept as an always-on shared expert
    calibration: tuple[Path, ...] = ()  # text files (documents split by lines "<|endoftext|>" where present)
    calibration_tokens: int = 16384  # tokens recorded for clustering and the router fit
    seq_len: int = 256
    logit_scale: float = 0.1  # std of the fitted routers' logits: small, so the k weights start near 1/k
    ridge: float = 1e-2
    kmeans_iters: int = 25
    finetune_tokens: int = 0  # distillation fine-tune length (0: none)
    finetune_text: tuple[Path, ...] | None = None  # default: the calibration text
    lr: float = 5e-4
    batch_size: int = 8
    aux_coef: float = 0.01  # per-layer load-balancing loss while fine-tuning
    pregate: bool = False  # fine-tune routing by a pre-gate trained jointly (Read-ME), saved as predictor-pregate.pt
    pregate_lr: float = 1e-3
    align_coef: float = 1.0  # pulls each router's logits toward the pre-gate's choice, so its own routing agrees
    pregate_balance: float = 1.0  # balance of the dispatch the pre-gate makes (refactor.dispatch_balance): keeps a
    #   layer from collapsing onto a few experts (README: the figures at 0.1, 0.3 and 1.0)
    pregate_attn: int = 0  # width of the pre-gate's causal attention over the context (0: window and moving averages only)
    seed: int = 0
    threads: int = 2
    save_every_min: float = 10.0
    resume: bool = False
