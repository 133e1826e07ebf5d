"""What the commands share: engine flags made from EngineConfig's fields (each default and help
written once, there), prompt parsing, and byte formatting."""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path

from ..config import EngineConfig
from ..errors import ExpertCacheError

FULL_BELOW = 1 << 20  # free bytes under which a failed write is put down to a full disk
ROUTING_GROUP = "routing (lossy options trade measured quality for speed; see expertcache tradeoff)"


def add_engine_arguments(p: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None, **defaults) -> None:
    """One flag per EngineConfig field (`only` those named); `defaults` override a field's
    default for this command (calibrate runs at expert_budget="100%", ...)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(EngineConfig):
        meta = f.metadata
        if not meta.get("cli", True) or (only is not None and f.name not in only):
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        kind = meta.get("type") or (type(f.default) if f.default is not None else str)
        shown = f" (default {default})" if default is not None else ""
        target = p
        if meta.get("group") == "routing":
            target = groups.setdefault("routing", p.add_argument_group(ROUTING_GROUP))
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        target.add_argument(
            flag, *meta.get("aliases", ()), dest=f.name, type=kind, default=default, choices=meta.get("choices"),
            metavar=None if meta.get("choices") else flag[2:].replace("-", "_").upper(),
            help=(meta["help"] + shown).replace("%", "%%"),
        )  # fmt: skip


def engine_config(args: argparse.Namespace, **fixed) -> EngineConfig:
    """The EngineConfig of a command's parsed flags (fields it has no flag for keep their default)."""
    given = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**{**given, **fixed})


def add_prompt_arguments(p: argparse.ArgumentParser, *, text: bool = False, default: str | None = None) -> None:
    src = p.add_mutually_exclusive_group(required=default is None)
    if text:
        src.add_argument("--text", default=None, help="file whose text is the prompt")
    src.add_argument("--prompt", default=default, help="text to continue" + (f" (default: {default!r})" if default else ""))
    src.add_argument("--prompt-ids", default=None, help="comma-separated token ids (for checkpoints without a tokenizer)")


def prompt_of(args: argparse.Namespace) -> str | list[int]:
    """The prompt the flags name: --text FILE, --prompt-ids 1,2,3 or --prompt TEXT."""
    if getattr(args, "text", None) is not None:
        try:
            prompt = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ExpertCacheError(f"cannot read --text {args.text}: {getattr(e, 'strerror', None) or e}") from None
        if not prompt.strip():
            raise ExpertCacheError(f"--text {args.text} is empty")
        return prompt
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ExpertCacheError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    return args.prompt


def generate(engine, prompt, future_trace: str | None = None, **kw):
    """engine.generate(), or under Belady's policy through sim.belady when the engine runs it."""
    if engine.config.cache_policy == "belady":
        from ..sim import belady

        return belady.generate(engine, prompt, future_trace=future_trace, **kw)
    if future_trace is not None:
        raise ExpertCacheError("--trace is Belady's future: it needs --cache-policy belady")
    return engine.generate(prompt, **kw)


def parse_depths(text: str, *, expand: bool) -> list[int]:
    """"1,2" -> [1, 2]; a single "D" -> [1..D] when `expand` (what --prefetch-depth D needs)."""
    try:
        values = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ExpertCacheError(f"--depth must be a number or comma-separated numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ExpertCacheError(f"--depth values must be at least 1, got {text!r}")
    if expand and len(values) == 1:
        return list(range(1, values[0] + 1))
    return sorted(set(values))


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def output_path(path: str | os.PathLike, flag: str) -> Path:
    """A file the command will write, checked before the long work starts: not a directory, in a
    folder that exists and takes a new file (a probe file is made and removed)."""
    p = Path(path)
    if p.is_dir():
        raise ExpertCacheError(f"{flag} {p} is a directory: give a file name")
    if not p.parent.is_dir():
        raise ExpertCacheError(f"{flag} {p}: the folder {p.parent} does not exist")
    probe = p.with_name(f".{p.name}.probe-{os.getpid()}")
    try:
        probe.open("wb").close()
    except OSError as e:
        raise ExpertCacheError(f"{flag} {p}: cannot write there ({e.strerror or e})") from None
    probe.unlink(missing_ok=True)
    return p


@contextmanager
def written(path: Path, flag: str) -> Iterator[Path]:
    """Write through a temporary file beside `path`, renamed onto it on success and removed on
    failure: a failed write (a full disk) leaves no partial file, and says so in one line."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its own
        full = shutil.disk_usage(path.parent).free < FULL_BELOW
        reason = "no space left on the device" if full else getattr(e, "strerror", None) or str(e).strip().split("\n")[0]
        raise ExpertCacheError(f"{flag} {path}: cannot write it ({reason})") from None
    finally:
        tmp.unlink(missing_ok=True)
