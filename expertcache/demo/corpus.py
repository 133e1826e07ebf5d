"""Where the reference corpus lives and how it is split into train / held-out text.

Owns the location of the shared data (env EXPERTCACHE_DATA, else ``shared/`` beside the
checkout), document reading (separator line ``<|endoftext|>``) and the one rule that decides
which tail of each public-domain file is held out, so training and evaluation agree on it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ExpertCacheError

SEPARATOR = "<|endoftext|>"
HELDOUT_FRACTION = 0.05

TINYSTORIES_TRAIN = "tinystories/tinystories_train_cased.txt"
TINYSTORIES_EXTRA_LOWER = "tinystories/tinystories_train_extra_lowercase.txt"
TINYSTORIES_VALID = "tinystories/tinystories_valid_cased.txt"
LASTWORD_MC = "eval/tinystories_valid_lastword_mc.jsonl"


def data_dir() -> Path | None:
    """The folder holding ``corpus/`` (and ``traces/``), or None when it is not available.

    EXPERTCACHE_DATA wins; it may name the shared folder itself or its ``corpus/``.
    """
    env = os.environ.get("EXPERTCACHE_DATA")
    if env:
        path = Path(env).expanduser().resolve()
        if path.name == "corpus" and not (path / "corpus").is_dir():
            path = path.parent
        return path if path.is_dir() else None
    path = Path(__file__).resolve().parents[3] / "shared"  # expertcache/demo/corpus.py -> beside the checkout
    return path if path.is_dir() else None


def corpus_path(relative: str) -> Path:
    """Absolute path of a corpus file such as ``tinystories/tinystories_train_cased.txt``."""
    root = data_dir()
    if root is None:
        raise ExpertCacheError("the shared corpus is not here: set EXPERTCACHE_DATA to the folder holding corpus/ "
                               "(default: shared/ beside the checkout)")
    path = root / "corpus" / relative
    if not path.is_file():
        raise ExpertCacheError(f"corpus file missing: {path} (EXPERTCACHE_DATA names the folder holding corpus/)")
    return path


def public_domain_files() -> list[Path]:
    """The public-domain training/evaluation files, sorted by name."""
    root = data_dir()
    if root is None:
        return []
    return sorted((root / "corpus" / "public_domain").glob("*.txt"))


def split_documents(text: str) -> list[str]:
    """Split text on separator lines; documents are stripped and empty ones dropped."""
    docs: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.strip() == SEPARATOR:
            docs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current))
    return [d.strip() for d in docs if d.strip()]


def split_point(text: str, fraction: float = HELDOUT_FRACTION) -> int:
    """Character index where the held-out tail of ``text`` starts.

    The tail is about ``fraction`` of the text. A document boundary (just after a separator
    line) is used when one lies between 0.5x and 2x the target tail size; otherwise (a single
    document, or documents too coarse) the cut is at the first line break after the target.
    """
    n = len(text)
    target = int(n * (1.0 - fraction))
    lo, hi = int(n * (1.0 - 2 * fraction)), int(n * (1.0 - fraction / 2))
    best: int | None = None
    start = 0
    marker = SEPARATOR + "\n"
    while (idx := text.find(marker, start)) != -1:
        boundary = idx + len(marker)
        if lo <= boundary <= hi and (best is None or abs(boundary - target) < abs(best - target)):
            best = boundary
        start = boundary
    if best is not None:
        return best
    newline = text.find("\n", target)
    return n if newline == -1 else newline + 1


def _read(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8")


def train_head(path: Path, fraction: float = HELDOUT_FRACTION) -> str:
    """The training part of a public-domain file: everything before its held-out tail."""
    text = _read(path)
    return text[: split_point(text, fraction)]


def heldout_tail(path: Path, fraction: float = HELDOUT_FRACTION) -> str:
    """The held-out tail (about `fraction`) of a public-domain file; never used for training."""
    text = _read(path)
    return text[split_point(text, fraction) :]


def read_documents(path: Path) -> list[str]:
    """All documents of a corpus file."""
    return split_documents(_read(path))
