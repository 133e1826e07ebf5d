"""Python code run in a fresh interpreter (what a process imports starts from nothing there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def printed_words(code: str, timeout: float = 300) -> list[str]:
    """What `code`, run by a new interpreter with this checkout importable, prints, split into words;
    it must exit 0."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()
