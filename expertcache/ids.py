"""Names every part of expertcache shares: expert ids, guesses, phases and load priorities."""

from __future__ import annotations

ExpertId = tuple[int, int]  # (layer, expert)
Prediction = list[tuple[int, list[int]]]  # [(target layer, experts most likely first)]

PHASES = ("prefill", "decode")  # a decode step is a forward of one position
DROPPED = -1  # id of a routing slot a lossy routing policy dropped (its weight is 0)

DEMAND, PREFETCH, UPGRADE = 0, 1, 2  # load priorities: lower is served first (UPGRADE: a full copy over a miss copy's, cache.py)
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"  # a load's states

TRAINED_KINDS = ("default-vector", "estimator", "learned", "pregate")  # predictors fitted into a file by train-predictor
