"""Fixtures over tests/helpers: tiny checkpoints and transformers references built once per
session, one torch thread per module, and whether O_DIRECT works where tests write files."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers.checkpoints import checkpoint_key, make_checkpoint, o_direct_supported
from helpers.reference import Reference, reference_outputs


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (its module fixtures too), restored after: tiny matmuls on a shared 2-core machine only
    spin and contend with more. Test files take it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """checkpoint(family, **make_checkpoint kwargs) -> Path, built once per session per arguments."""
    root = tmp_path_factory.mktemp("ckpts")
    made: dict[str, Path] = {}
    lock = threading.Lock()

    def get(family: str, **kw) -> Path:
        key = checkpoint_key(family, **kw)
        with lock:
            if key not in made:
                made[key] = make_checkpoint(root / key, family, **kw)
            return made[key]

    return get


@pytest.fixture(scope="session")
def reference(checkpoint) -> Callable[..., Reference]:
    """reference(model_dir, prompt, max_new_tokens=32) -> Reference, computed once per session."""
    done: dict[tuple, Reference] = {}

    def get(model_dir: Path, prompt: list[int], max_new_tokens: int = 32) -> Reference:
        key = (str(model_dir), tuple(prompt), max_new_tokens)
        if key not in done:
            done[key] = reference_outputs(model_dir, prompt, max_new_tokens)
        return done[key]

    return get


@pytest.fixture(scope="session")
def direct_io_works(tmp_path_factory) -> bool:
    return o_direct_supported(tmp_path_factory.mktemp("odirect"))
