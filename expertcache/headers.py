"""What a checkpoint directory says before any weight is read, without torch: config.json as JSON
and every safetensors header, each checked as strictly as the format itself (offsets in range,
contiguous, none overlapping; each tensor in exactly one file). checkpoint.py builds on these;
`expertcache info` needs nothing more (tools/info.py)."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit on header size
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # torch's names


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its file's header gives it: absolute byte offset, size, shape, dtype ("BF16")."""

    path: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str


def _fail(path: Path | str, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}")


def read_config_json(model_dir: Path) -> dict:
    """config.json of a checkpoint directory as a dict with a model_type, or a one-line error."""
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir}: no such directory")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory (give the checkpoint's folder)")
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise CheckpointError(f"{model_dir}: permission denied: make the directory readable")
    path = model_dir / "config.json"
    if not path.is_file():
        raise _fail(model_dir, "no config.json: not a Hugging Face checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except PermissionError:
        raise _fail(path, "permission denied: make the file readable") from None
    except (OSError, ValueError) as e:
        raise _fail(path, f"malformed JSON ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise _fail(path, "no model_type: not a transformers model config")
    return raw


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header; returns its tensors by on-disk name."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"not a safetensors file ({size} bytes, too short for a header): re-save or re-download it")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise _fail(path, f"corrupt safetensors header (declares {header_len} header bytes in a {size}-byte file): re-save or re-download it")
            raw = f.read(header_len)
    except PermissionError:
        raise _fail(path, "permission denied: make the file readable") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, expected a safetensors file") from None
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"corrupt safetensors header ({e}): re-save or re-download it") from None
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            itemsize = DTYPE_SIZES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"corrupt safetensors header entry for {name!r}: re-save or re-download it") from None
        expected = math.prod(shape) * itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise _fail(path, f"corrupt safetensors header: {name!r} spans {end - begin} bytes, its shape needs {expected}")
        if end > data_len:
            raise _fail(path, f"truncated: {name!r} ends at byte {data_start + end} but the file has {size}; re-download it")
        tensors[name] = TensorEntry(str(path), data_start + begin, expected, shape, info["dtype"])
    at, last = data_start, None  # as the format demands: tensors follow each other, none overlapping another
    for name, ref in sorted(tensors.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
        if ref.offset != at:
            how = f"overlaps {last!r}" if ref.offset < at else f"leaves a gap after {last!r}" if last else "does not start the data"
            raise _fail(path, f"corrupt safetensors header: {name!r} {how}; re-save or re-download it")
        at, last = ref.offset + ref.nbytes, name
    return tensors


def read_tensors(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by on-disk name, each from exactly one file: a sharded
    checkpoint's index says which; otherwise a name in two files is refused, naming both."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _fail(index, f"malformed shard index ({e})") from None
        files = sorted({model_dir / shard for shard in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise _fail(model_dir, f"shard(s) named in model.safetensors.index.json are missing: {', '.join(missing)}")
    else:
        weight_map = None
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise _fail(model_dir, "no .safetensors files found (expertcache reads safetensors checkpoints only)")
    tensors: dict[str, TensorEntry] = {}
    for f in files:
        for name, ref in read_safetensors_header(f).items():
            if weight_map is not None:
                if weight_map.get(name) != f.name:
                    continue  # the index puts it in another shard (or nowhere)
            elif name in tensors:
                raise _fail(model_dir, f"tensor {name!r} is in both {Path(tensors[name].path).name} and {f.name}: "
                                       "remove the stray file")
            tensors[name] = ref
    if weight_map is not None:
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise _fail(index, f"names {absent[0]!r} in {weight_map[absent[0]]}, which does not hold it")
    return tensors
