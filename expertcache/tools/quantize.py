"""expertcache quantize: a new checkpoint directory whose experts are pack-quantized int4 or int8
(compressed-tensors' format, qformat.py), written one expert at a time; the source is only read.

Each expert becomes three Linear weights under the family's per-expert names (Mixtral's w1/w3/w2),
whatever layout the source keeps: `X.weight_packed`, `X.weight_scale`, `X.weight_shape`. An
expert's six data tensors lie side by side (one read), the shape tensors at the end of the file.
Dense tensors are copied as saved; tokenizer and generation files are copied.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import DTYPES, Checkpoint, TensorRef, _read_all, read_tensors
from ..errors import CheckpointError, ExpertCacheError
from ..families import text_prefix
from ..qformat import GROUP_SIZES, Scheme, quantization_config
from ..quant import quantize

ST_DTYPES = {dtype: name for name, dtype in DTYPES.items()}  # torch dtype -> its safetensors name
SHARD_BYTES = 4 << 30


@dataclass
class QuantizeResult:
    out_dir: str
    scheme: str
    experts: int
    source_expert_bytes: int  # one expert, as the source stores it
    expert_bytes: int  # one expert, quantized (packed values and scales)
    relative_error: float  # ||W - dequantized W|| / ||W|| over every expert weight
    files: int
    seconds: float
    dense: str = "keep"  # the dense Linear weights' scheme (--dense), or "keep"
    dense_weights: int = 0  # how many of them were quantized


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def scheme_for(bits: int, group_size: int | None) -> Scheme:
    """The scheme `quantize` writes for --bits/--group-size (defaults: int8 by row, int4 in groups of 64)."""
    if bits not in (4, 8):
        raise ExpertCacheError(f"--bits {bits}: expertcache quantizes to 4 or 8 bits")
    if group_size is None:
        group_size = 64 if bits == 4 else 0
    if group_size and group_size not in GROUP_SIZES:
        raise ExpertCacheError(f"--group-size {group_size}: use one of {', '.join(map(str, GROUP_SIZES))}, or 0 for one scale per row")
    return Scheme(bits, group_size or None)


def _disk_name(ckpt: Checkpoint, name: str) -> str:
    """An in-memory name -> the name the family's checkpoints give it on disk (undoing disk_renames)."""
    for old, new in reversed(ckpt.family.disk_renames):
        name = name.replace(new, old)
    return name


def _check_source(ckpt: Checkpoint, model_dir: Path) -> None:
    first = next(iter(ckpt.experts.values()))
    if ckpt.quant is not None or first.mxfp4:
        raise CheckpointError(f"{model_dir}: its experts are quantized already")
    if ckpt.dense_quantized:
        raise CheckpointError(f"{model_dir}: its dense weights are quantized already")
    site = next(iter(ckpt.sites.values()))
    if ckpt.family.row_blocks is not None or site.transposed or not site.has_gate or text_prefix(ckpt.config.model_type):
        raise CheckpointError(f"{model_dir}: quantize writes one (gate, up, down) Linear per expert; {ckpt.family.model_type} "
                              "checkpoints keep their experts another way")


def _expert_weights(ckpt: Checkpoint, eid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) [out, in] of one expert, read as saved."""
    parts = ckpt.experts[eid]
    t = _read_all({str(i): ref for i, ref in enumerate(parts.parts)})
    if len(t) == 3:
        return t["0"], t["1"], t["2"]
    gate, up = t["0"].chunk(2, dim=0)  # fused [gate; up] rows, as transformers' experts split them
    return gate, up, t["1"]


DENSE_GROUP = 64  # --dense int4's group size where the experts' is not an int4 one


def dense_scheme(dense: str, experts: Scheme) -> Scheme | None:
    """The scheme `--dense` writes the dense Linear weights in: int8 with one scale per row; int4 in
    groups, the experts' size when they are int4 too (one config group for both), else 64; None: keep."""
    if dense == "int8":
        return Scheme(8, None)
    if dense == "int4":
        return Scheme(4, experts.group_size if experts.bits == 4 and experts.group_size else DENSE_GROUP)
    return None


def _dense_targets(ckpt: Checkpoint, scheme: Scheme) -> set[str]:
    """In-memory names of the dense Linear weights `--dense` quantizes: every Linear but the experts,
    the routers, and a head tied to the embeddings; in-features a multiple of 8 (the kernel's) and of
    the scheme's group (the others stay as saved)."""
    from torch import nn

    from ..architectures import build_model

    model = build_model(ckpt.config, family=ckpt.family)
    routers = [f"{s.block}.{ckpt.family.router}" for s in ckpt.sites.values()]
    experts = [s.path for s in ckpt.sites.values()]
    tied = bool(getattr(ckpt.config, "tie_word_embeddings", False))
    out = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.in_features % 8 or module.in_features % (scheme.group_size or 1):
            continue
        if any(name == p or name.startswith(p + ".") for p in routers + experts) or (tied and name == "lm_head"):
            continue
        out.add(name + ".weight")
    return out & set(ckpt.dense)


def quantize_checkpoint(model: str | os.PathLike, out: str | os.PathLike, *, bits: int = 8, group_size: int | None = None,
                        dense: str = "keep", progress: bool = True, shard_bytes: int = SHARD_BYTES) -> QuantizeResult:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    scheme = scheme_for(bits, group_size)
    model_dir, out_dir = Path(model), Path(out)
    ckpt = Checkpoint.open(model_dir)
    _check_source(ckpt, model_dir)
    if out_dir.resolve() == model_dir.resolve() or model_dir.resolve() in out_dir.resolve().parents:
        raise ExpertCacheError(f"--out {out_dir}: write the quantized checkpoint outside the source directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExpertCacheError(f"--out {out_dir}: exists and is not an empty directory")
    if not out_dir.parent.is_dir():
        raise ExpertCacheError(f"--out {out_dir}: the folder {out_dir.parent} does not exist")
    dtype = ckpt.dtype
    if not dtype.is_floating_point:
        raise CheckpointError(f"{model_dir}: experts are {dtype}, not floating point")

    if dense not in ("keep", "int8", "int4"):
        raise ExpertCacheError(f"--dense {dense}: keep, int8 or int4")
    dscheme = dense_scheme(dense, scheme)
    dense_targets = _dense_targets(ckpt, dscheme) if dscheme is not None else set()
    site = next(iter(ckpt.sites.values()))
    (two_inter, hidden), down = site.shapes
    shapes = ((two_inter // 2, hidden), (two_inter // 2, hidden), tuple(down))
    if scheme.group_size and any(inner % scheme.group_size for _, inner in shapes):
        raise ExpertCacheError(f"--group-size {scheme.group_size} does not divide the experts' input widths ({hidden} and "
                               f"{down[1]}): pick one that does, or 0 for one scale per row")

    # what the files hold, as groups of tensors written side by side: dense tensors as saved (or
    # int8), each expert's six tensors, then the shape of every weight written quantized
    bar = tqdm(total=len(ckpt.experts), unit="expert", desc=f"quantize {scheme.name}", disable=not progress)
    error = [0.0, 0.0]  # squared error, squared norm: over every expert weight
    groups: list[tuple[list[_Entry], Callable[[], Iterator[torch.Tensor]]]] = []
    quantized: list[tuple[str, tuple[int, int]]] = []  # (disk name without ".weight", [out, in]), in file order
    site_paths = [s.path + "." for s in ckpt.sites.values()]
    for name, ref in read_tensors(model_dir).items():
        canonical = ckpt.family.canonical_name(name)
        if any(canonical.startswith(p) for p in site_paths):
            continue  # an expert tensor: written below
        if canonical in dense_targets:
            base, shape = name[: -len(".weight")], tuple(ref.shape)
            quantized.append((base, shape))
            groups.append((_quantized_entries(base, dscheme, shape, ref.dtype), _dense_reader(name, ref, dscheme)))
        else:
            groups.append(([_Entry(name, ref.dtype, ref.shape)], _reader(name, ref)))
    for layer, e in ckpt.experts:
        bases = [_disk_name(ckpt, f"{ckpt.sites[layer].path}.{e}.{role}") for role in ckpt.family.per_expert_names]
        quantized += zip(bases, shapes)
        entries = [entry for b, shape in zip(bases, shapes) for entry in _quantized_entries(b, scheme, shape, dtype)]
        groups.append((entries, _expert_reader(ckpt, (layer, e), scheme, dtype, error, bar)))
    expert_bytes = sum(entry.nbytes for entry in entries)
    groups.append(([_Entry(f"{b}.weight_shape", torch.int64, (2,)) for b, _ in quantized],
                   lambda: (torch.tensor(shape, dtype=torch.int64) for _, shape in quantized)))

    # shards: whole groups, a new file past shard_bytes
    shards: list[list[int]] = [[]]
    size = 0
    for i, (entries, _) in enumerate(groups):
        n = sum(entry.nbytes for entry in entries)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                              for i in range(len(shards))]
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    weight_map = {}
    try:
        partial.mkdir()
        for fname, members in zip(names, shards):
            entries = [entry for i in members for entry in groups[i][0]]
            with open(partial / fname, "wb") as f:
                _write_header(f, entries)
                for i in members:
                    for t in groups[i][1]():
                        f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
            weight_map.update({entry.name: fname for entry in entries})
        bar.close()
        _copy_side_files(model_dir, partial, scheme, ckpt, dscheme, sorted(n[: -len(".weight")] for n in dense_targets))
        if len(names) > 1:
            total = sum(entry.nbytes for g, _ in groups for entry in g)
            (partial / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        partial.rename(out_dir)
    except OSError as e:  # a full disk, a folder that takes no files: nothing half-written is left
        raise ExpertCacheError(f"--out {out_dir}: cannot write it ({e.strerror or e})") from None
    finally:
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
    return QuantizeResult(str(out_dir), scheme.name, len(ckpt.experts), ckpt.expert_bytes, expert_bytes,
                          (error[0] / max(error[1], 1e-30)) ** 0.5, len(names), time.perf_counter() - t0,
                          dscheme.name if dscheme is not None else "keep", len(dense_targets))


def _quantized_entries(base: str, scheme: Scheme, shape: tuple[int, int], scale_dtype: torch.dtype) -> list[_Entry]:
    """The packed values and the scales of one weight written quantized."""
    return [_Entry(f"{base}.weight_packed", torch.int32, scheme.packed_shape(*shape)),
            _Entry(f"{base}.weight_scale", scale_dtype, scheme.scale_shape(*shape))]


def _expert_reader(ckpt: Checkpoint, eid, scheme: Scheme, dtype: torch.dtype, error: list[float],
                   bar) -> Callable[[], Iterator[torch.Tensor]]:
    def read() -> Iterator[torch.Tensor]:
        for w in _expert_weights(ckpt, eid):
            yield from quantize(w, scheme, dtype, error)
        bar.update(1)

    return read


def _dense_reader(name: str, ref: TensorRef, scheme: Scheme) -> Callable[[], Iterator[torch.Tensor]]:
    def read() -> Iterator[torch.Tensor]:
        w = _read_all({name: ref})[name]
        yield from quantize(w, scheme, w.dtype)

    return read


def _reader(name: str, ref: TensorRef) -> Callable[[], Iterator[torch.Tensor]]:
    def read() -> Iterator[torch.Tensor]:
        yield _read_all({name: ref})[name]

    return read


def _write_header(f, entries: list[_Entry]) -> None:
    header, pos = {"__metadata__": {"format": "pt", "quantized_by": "expertcache"}}, 0
    for e in entries:
        header[e.name] = {"dtype": ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)) + raw)


def _copy_side_files(model_dir: Path, out: Path, scheme: Scheme, ckpt: Checkpoint, dense: Scheme | None, dense_modules: list[str]) -> None:
    """config.json with the scheme, and every other file but the weights."""
    for p in model_dir.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(p, out / p.name)
    config = json.loads((model_dir / "config.json").read_text())
    roles = "|".join(ckpt.family.per_expert_names)
    experts = [rf"re:.*\.experts\.\d+\.({roles})$"]
    if dense_modules and dense == scheme:  # one config group a scheme
        groups = [(scheme, experts + dense_modules)]
    else:
        groups = [(scheme, experts)] + ([(dense, dense_modules)] if dense_modules else [])
    config["quantization_config"] = quantization_config(groups, ignore=[] if "lm_head" in dense_modules else ["lm_head"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
