"""Predictor files: what `expertcache train-predictor` writes and `--predictor PATH` loads, one
per predictor kind (default-vector, estimator, learned): plain values and tensors written with
torch.save and read with torch.load(weights_only=True). The format is in docs/formats.md; the
default place is beside the model, MODEL/predictor-{kind}.pt.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ExpertCacheError

FORMAT = "expertcache-predictor"
VERSION = 1


def default_path(model_dir: str | Path, kind: str) -> Path:
    return Path(model_dir) / f"predictor-{kind}.pt"


@dataclass
class Artefact:
    kind: str
    model: str
    sparse_layers: list[int]
    num_experts: int
    hidden_size: int
    top_k: int
    depths: list[int] = field(default_factory=list)  # distances fitted (default-vector chains: [])
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "model": self.model,
            "sparse_layers": list(self.sparse_layers),
            "num_experts": self.num_experts,
            "hidden_size": self.hidden_size,
            "top_k": self.top_k,
            "depths": list(self.depths),
            "meta": self.meta,
            "tensors": {k: v.detach().float().contiguous() for k, v in self.tensors.items()},
        }
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save(body, tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed save leaves no partial file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Artefact":
        path = Path(path)
        if not path.is_file():
            raise ExpertCacheError(f"predictor file {path} not found")
        try:
            body = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # not a torch file, or one holding objects (code) beyond tensors
            raise ExpertCacheError(f"{path} is not a readable predictor file: not a torch file of tensors (expertcache loads "
                                   "no code from predictor files); rerun expertcache train-predictor to make one") from None
        except Exception as e:  # truncated, damaged, unreadable
            first = str(e).splitlines()[0] if str(e) else repr(e)
            raise ExpertCacheError(f"{path} is not a readable predictor file ({first[:120]}): truncated or damaged? "
                                   "rerun expertcache train-predictor") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ExpertCacheError(f"{path} is not an expertcache predictor file")
        if body.get("version") != VERSION:
            raise ExpertCacheError(f"{path}: predictor format version {body.get('version')} is not supported (this expertcache reads {VERSION})")
        return cls(
            kind=body["kind"],
            model=body["model"],
            sparse_layers=[int(l) for l in body["sparse_layers"]],
            num_experts=int(body["num_experts"]),
            hidden_size=int(body["hidden_size"]),
            top_k=int(body["top_k"]),
            depths=[int(d) for d in body["depths"]],
            tensors=dict(body["tensors"]),
            meta=dict(body.get("meta") or {}),
        )

    def check(self, *, kind: str, sparse_layers: list[int], num_experts: int, hidden_size: int, depth: int, path: Path) -> None:
        """Refuse a file made for another predictor kind, another model shape, or too few distances."""
        if self.kind != kind:
            raise ExpertCacheError(f"{path} holds a {self.kind!r} predictor, not {kind!r}")
        mine = (list(self.sparse_layers), self.num_experts, self.hidden_size)
        theirs = (list(sparse_layers), num_experts, hidden_size)
        if mine != theirs:
            raise ExpertCacheError(
                f"{path} was trained for another model (sparse layers, experts, hidden size {mine}; this model {theirs}): "
                f"rerun expertcache train-predictor --kind {kind}"
            )
        missing = [d for d in range(1, depth + 1) if self.depths and d not in self.depths]
        if missing:
            raise ExpertCacheError(
                f"{path} has no {kind} maps for distance(s) {missing} (it has {self.depths}): "
                f"retrain with --depth {','.join(str(d) for d in range(1, depth + 1))} or lower --prefetch-depth"
            )


def find(kind: str, path: str | Path | None, model_dir: str | Path | None) -> tuple[Artefact, Path]:
    """The predictor file for `kind`: `path` if given, else the one beside the model."""
    if path is None:
        if model_dir is None:
            raise ExpertCacheError(f"prefetch {kind!r} needs a predictor file: pass --predictor PATH")
        path = default_path(model_dir, kind)
        if not path.is_file():
            raise ExpertCacheError(
                f"prefetch {kind!r} needs a predictor file and {path} does not exist: run "
                f"`expertcache train-predictor --kind {kind} --model {model_dir} --out FILE` and pass --predictor FILE"
            )
    path = Path(path)
    return Artefact.load(path), path
