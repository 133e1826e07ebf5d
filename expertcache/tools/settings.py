"""Settings and defaults of the offline jobs, torch-free so the command line reads them at once:
predictor training, adaptive-gating calibration, the trade-off sweep and predictor evaluation."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TARGET_DROP = 0.25  # calibrate: share of activations dropped when neither a target drop nor a perplexity budget is given
TRADEOFF_POLICIES = ("exact", "adaptive-gating", "cache-aware", "cache-aware-max-rank", "speculative")
TRADEOFF_OPTIONAL = ("pregate", "miss-copy")  # swept only when named (or, miss-copy, when --miss-copy is given): pregate needs the
# model's pre-gate file (refactor --pregate, train-predictor), miss-copy a quantized copy (--miss-copy DIR)
DROPS = (0.1, 0.2, 0.3)  # tradeoff, adaptive gating: target shares of activations dropped
LAMBDAS = (0.1, 0.2, 0.4, 0.8)  # tradeoff, cache-aware: bias toward resident experts
RANKS = (3, 4)  # tradeoff, cache-aware-max-rank: how far down the ranking a resident expert may come from
DEFAULT_PREDICTORS = ("next-gate", "default-vector", "estimator", "learned", "history", "pregate")  # eval-predictors


@dataclass(frozen=True)
class TrainSettings:
    """How a learned predictor is trained (defaults suit a model of a few hundred hidden units)."""

    width: int = 128  # hidden units of each MLP: small next to the model, cheap per token
    steps: int = 1000  # optimiser steps per (layer, distance) net
    batch: int = 512  # token pairs per step
    lr: float = 1e-3  # Adam learning rate of the MLP part
    skip_lr: float = 1e-3  # of the linear part (it starts at the router)
    hard_weight: float = 0.0  # target = this share on the routed set (uniform) + the rest on the true router's
    # softmax (distillation: the whole ranking, not just the top-k, measured best); traces without logits use the set
    val_fraction: float = 0.1  # pairs held out to pick the best checkpoint
    eval_every: int = 50  # steps between validation checks
    seed: int = 0
    attn: int = 0  # pregate: width of its causal attention over the context (0: none; README measures it)
