"""expertcache: run Mixture-of-Experts models whose experts do not fit in memory.

Experts stay in the checkpoint on disk; a cache holds what the budget allows; the engine loads
the rest on demand and ahead of time. Exact by default: outputs equal transformers' own model.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "Engine", "EngineConfig", "GenerationResult", "ExpertCacheError", "__version__"]


def __getattr__(name: str):
    # heavy imports (torch, transformers) happen on first use, never at import time
    if name in ("load", "Engine", "GenerationResult"):
        from . import engine

        return getattr(engine, name)
    if name == "EngineConfig":
        from .config import EngineConfig

        return EngineConfig
    if name == "ExpertCacheError":
        from .errors import ExpertCacheError

        return ExpertCacheError
    raise AttributeError(f"module 'expertcache' has no attribute {name!r}")
