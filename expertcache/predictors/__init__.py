"""Predictors: which experts later layers will need, guessed while the current layer runs (only
speed depends on them, never exactness). Registered by name in PREDICTORS: none, next-gate
(AdapMoE), estimator, default-vector (speculating experts), learned (ProMoE), history, pregate
(Read-ME); docs/techniques.md describes each. default-vector, estimator, learned and pregate read
a file from `expertcache train-predictor`.
"""

from __future__ import annotations

from collections.abc import Callable
import torch

from .artefact import Artefact, default_path, find
from .base import CappedPredictor, Lookahead, Prediction, Predictor, rank
from .default_vector import DefaultVectorPredictor
from .gate import EstimatorPredictor, NextGatePredictor, NoPredictor
from .history import HistoryPredictor
from .learned import ExpertMLP, LearnedPredictor
from .pregate import PregateNet, PregatePredictor, net_of

__all__ = [
    "Artefact", "CappedPredictor", "DefaultVectorPredictor", "EstimatorPredictor", "ExpertMLP", "HistoryPredictor",
    "LearnedPredictor", "Lookahead", "NextGatePredictor", "NoPredictor", "PREDICTORS", "Prediction", "Predictor",
    "PregateNet", "PregatePredictor",
    "default_path", "make_predictor", "rank",
]


def _shape(routers: dict[int, torch.Tensor]) -> tuple[list[int], int, int]:
    layers = sorted(routers)
    num_experts, hidden = routers[layers[0]].shape
    return layers, int(num_experts), int(hidden)


def _artefact(kind: str, kw: dict) -> Artefact:
    art, path = find(kind, kw.get("path"), kw.get("model_dir"))
    layers, num_experts, hidden = _shape(kw["routers"])
    art.check(kind=kind, sparse_layers=layers, num_experts=num_experts, hidden_size=hidden, depth=kw["depth"], path=path)
    return art


def _estimator(**kw) -> EstimatorPredictor:
    art = _artefact("estimator", kw)
    layers, depth = sorted(kw["routers"]), kw["depth"]
    maps = {
        (d, l): (art.tensors[f"d{d}.l{l}.A"], art.tensors[f"d{d}.l{l}.b"])
        for d in range(1, depth + 1)
        for l in layers[: len(layers) - d]
    }
    return EstimatorPredictor(routers=kw["routers"], maps=maps, top_k=kw["top_k"], depth=depth)


def _learned(**kw) -> LearnedPredictor:
    art = _artefact("learned", kw)
    layers, num_experts, hidden = _shape(kw["routers"])
    depth = kw["depth"]
    nets = {}
    for d in range(1, depth + 1):
        for l in layers[: len(layers) - d]:
            prefix = f"d{d}.l{l}."
            state = {k[len(prefix) :]: v for k, v in art.tensors.items() if k.startswith(prefix)}
            # files from before the activation was recorded were trained with GELU
            net = ExpertMLP(hidden, num_experts, width=state["fc1.weight"].shape[0], activation=art.meta.get("activation", "gelu"))
            net.load_state_dict(state)
            nets[(d, l)] = net
    return LearnedPredictor(nets=nets, layers=layers, top_k=kw["top_k"], depth=depth)


def _default_vector(**kw) -> DefaultVectorPredictor:
    art = _artefact("default-vector", kw)
    layers = sorted(kw["routers"])
    return DefaultVectorPredictor(
        norms=kw["norms"],
        routers=kw["routers"],
        vectors={l: art.tensors[f"l{l}.vectors"] for l in layers},
        shared={l: art.tensors[f"l{l}.shared"] for l in layers},
        top_k=kw["top_k"],
        depth=kw["depth"],
    )


def _pregate(**kw) -> PregatePredictor:
    art = _artefact("pregate", kw)
    return PregatePredictor(net_of(art), sorted(kw["routers"]), top_k=kw["top_k"], depth=kw["depth"])


PREDICTORS: dict[str, Callable[..., Predictor]] = {
    "none": lambda **kw: NoPredictor(),
    "next-gate": lambda **kw: NextGatePredictor(routers=kw["routers"], top_k=kw["top_k"], depth=kw["depth"]),
    "default-vector": _default_vector,
    "estimator": _estimator,
    "learned": _learned,
    "history": lambda **kw: HistoryPredictor(layers=sorted(kw["routers"]), top_k=kw["top_k"], depth=kw["depth"]),
    "pregate": _pregate,
}


def make_predictor(name: str, *, max_per_layer: int | None = None, **kwargs) -> Predictor:
    """Build predictor `name`. kwargs: routers {layer: [E, H]}, top_k, depth, and where needed
    norms {layer: the norm in front of its MoE block}, model_dir and path (a train-predictor file;
    None = beside the model). max_per_layer caps decode guesses per target layer."""
    if name not in PREDICTORS:
        raise ValueError(f"unknown prefetch predictor {name!r}: choose one of {', '.join(PREDICTORS)}")
    predictor = PREDICTORS[name](**kwargs)
    if max_per_layer is not None and name != "none":
        predictor = CappedPredictor(predictor, max_per_layer)
    return predictor

