"""A Hugging Face checkpoint directory: its config, the tensors of its safetensors files, and
where each expert's bytes lie.

Safetensors headers are parsed and checked against the file size here, so a corrupt or truncated
file is refused with one line before anything is read. Dense tensors are read into memory; experts
are only located (file, offset, shape, dtype) for the ExpertStore to read on demand, from either
on-disk layout: one tensor per expert (save_pretrained's default) or fused [E, ...] tensors.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import FAMILIES, ExpertsSite, Family, build_model, experts_sites, family_for, unsupported
from . import headers
from .errors import CheckpointError
from .families import text_prefix
from .ids import ExpertId
from .native import read_config as read_native_config
from .qformat import SUFFIXES, Scheme, SchemeError, read_schemes
from .quant import QuantExperts, dequantize

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie: absolute byte offset in a file, with its shape and dtype."""

    path: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class ExpertParts:
    """The tensors that make one expert: (gate, up, down) one per expert on disk, slices of the
    fused tensors in the experts module's own layout ((gate_up | up, down)), or, MXFP4, slices of
    (gate_up blocks, scales, down blocks, scales) as saved (mxfp4.py), or, quantized (quant.py),
    (gate packed, scale, up packed, scale, down packed, scale)."""

    parts: tuple[TensorRef, ...]
    fused: bool
    mxfp4: bool = False
    quantized: bool = False

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def _fail(path: Path | str, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}")


def read_tensors(model_dir: Path) -> dict[str, TensorRef]:
    """Every tensor of the checkpoint by on-disk name (headers.read_tensors), with torch dtypes."""
    return {name: TensorRef(e.path, e.offset, e.nbytes, e.shape, DTYPES[e.dtype]) for name, e in headers.read_tensors(model_dir).items()}


def load_config(model_dir: Path, native: bool = False):
    """The transformers config of a checkpoint directory, or a one-line error; `native`: the
    engine's own reading of it where the engine builds the model itself (native.py)."""
    if native and (config := read_native_config(model_dir)) is not None:
        return config
    from transformers import AutoConfig

    model_type = headers.read_config_json(model_dir)["model_type"]
    if not isinstance(model_type, str):
        raise unsupported(model_type, "model_type is not a name")
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config; the user needs one line
        if model_type not in FAMILIES:
            raise unsupported(model_type, "transformers does not know this model type") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(model_dir / "config.json", f"invalid config ({first})") from None
    if text_prefix(model_type):  # a multimodal checkpoint: its text model runs
        config = config.text_config
    family_for(config)  # refuses an unsupported family, with the one thing missing
    return config


@dataclass
class Checkpoint:
    """An opened checkpoint: config, family, where each layer's experts module is, dense tensors
    by in-memory name, and each expert's parts."""

    model_dir: Path
    config: object
    family: Family
    sites: dict[int, ExpertsSite]  # sparse layer -> its experts module
    dense: dict[str, TensorRef]
    experts: dict[ExpertId, ExpertParts]
    quant: QuantExperts | None = None  # how quantized experts compute; None: experts as saved, dequantized or not
    dense_quantized: dict[str, QuantizedWeight] | None = None  # dense weights stored quantized, by weight name

    @classmethod
    def open(cls, model_dir: str | os.PathLike, native: bool = False) -> "Checkpoint":
        """`native`: the model is the engine's own where native.py writes its family out (the
        config read without transformers), else transformers'."""
        model_dir = Path(model_dir)
        config = load_config(model_dir, native)
        family = family_for(config)
        try:
            model = build_model(config, family=family)
            sites = experts_sites(model)
        except CheckpointError as e:
            raise _fail(model_dir / "config.json", str(e)) from None
        if not sites:
            raise _fail(model_dir, "no sparse-MoE layers found in the config")
        try:
            k = family.top_k(config)
        except (TypeError, ValueError, AttributeError):
            raise _fail(model_dir / "config.json", "no valid num_experts_per_tok") from None
        n_exp = next(iter(sites.values())).num_experts
        if not 1 <= k <= n_exp:
            raise _fail(model_dir / "config.json", f"num_experts_per_tok is {k}, must be between 1 and the number of experts ({n_exp})")
        raw = headers.read_config_json(model_dir)
        try:
            schemes = read_schemes(raw)
        except SchemeError as e:
            raise _fail(model_dir / "config.json", str(e)) from None
        prefix = text_prefix(raw["model_type"])
        tensors = {family.canonical_name(name[len(prefix):]): ref for name, ref in read_tensors(model_dir).items()
                   if name.startswith(prefix)}  # a multimodal checkpoint's other tensors stay on disk
        experts, expert_names, quant = _locate_experts(model_dir, family, sites, tensors, schemes)
        rest = {n: r for n, r in tensors.items() if n not in expert_names}
        packed = _dense_quantized(model_dir, model, rest, schemes)
        dense = _dense(model_dir, config, model, sites, {n: r for n, r in rest.items() if n not in packed.names},
                       quantized=set(packed.weights))
        return cls(model_dir, config, family, sites, dense, experts, quant, packed.weights or None)

    @property
    def sparse_layers(self) -> list[int]:
        return list(self.sites)

    @property
    def num_experts(self) -> int:
        return next(iter(self.sites.values())).num_experts

    @property
    def top_k(self) -> int:
        return self.family.top_k(self.config)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all experts of a supported model have the same size)."""
        return next(iter(self.experts.values())).nbytes

    @property
    def total_expert_bytes(self) -> int:
        return sum(p.nbytes for p in self.experts.values())

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dense tensors as stored (quantized ones packed)."""
        packed = sum(r.nbytes for q in (self.dense_quantized or {}).values() for r in q.parts)
        return sum(r.nbytes for r in self.dense.values()) + packed

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in: its experts', or config.json's for MXFP4 experts."""
        first = next(iter(self.experts.values()))
        if first.quantized:
            return first.parts[1].dtype  # the scales'
        if not first.mxfp4:
            return first.parts[0].dtype
        dtype = getattr(self.config, "dtype", None) or torch.bfloat16
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype

    @property
    def precision(self) -> str:
        """How expert weights are stored: a scheme's name (int4-g64 ...), mxfp4, or the dtype's name."""
        if self.quant is not None:
            return self.quant.scheme.name
        return "mxfp4" if next(iter(self.experts.values())).mxfp4 else str(self.dtype).removeprefix("torch.")

    def load_dense(self, *, packed: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Read every non-expert tensor into memory, keyed by its in-memory name; a quantized dense
        weight is dequantized into its scale's dtype, but those named in `packed`, which come as
        `name` + "_parts": (packed uint8 [out, bytes], scale[, zero point])."""
        out = _read_all(self.dense)
        for name, q in (self.dense_quantized or {}).items():
            got = _read_all({str(i): ref for i, ref in enumerate(q.parts)})
            parts = tuple(got[str(i)] for i in range(len(q.parts)))
            if name in packed:
                out[name + "_parts"] = parts
            else:
                out[name] = dequantize(*parts[:2], q.scheme, q.shape, zero=parts[2] if len(parts) > 2 else None)
        return out


def _read_all(refs: dict[str, TensorRef]) -> dict[str, torch.Tensor]:
    """Tensors by name, read file by file in offset order."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[tuple[str, TensorRef]]] = {}
    for name, ref in refs.items():
        by_file.setdefault(ref.path, []).append((name, ref))
    for path, items in by_file.items():
        try:
            with open(path, "rb", buffering=0) as f:
                for name, ref in sorted(items, key=lambda it: it[1].offset):
                    buf = bytearray(ref.nbytes)
                    f.seek(ref.offset)
                    if f.readinto(memoryview(buf)) != ref.nbytes:
                        raise _fail(path, f"truncated while reading {name!r}")
                    if ref.nbytes and hasattr(os, "posix_fadvise"):
                        # the tensor now lives in process memory: drop its file pages, which would
                        # otherwise sit in the page cache (charged to a memory limit) for nothing
                        os.posix_fadvise(f.fileno(), ref.offset, ref.nbytes, os.POSIX_FADV_DONTNEED)
                    t = torch.frombuffer(buf, dtype=ref.dtype) if ref.nbytes else torch.empty(0, dtype=ref.dtype)
                    out[name] = t.reshape(ref.shape)
        except OSError as e:
            raise _fail(path, f"cannot read ({e.strerror or e})") from None
    return out


@dataclass(frozen=True)
class QuantizedWeight:
    """A dense Linear weight stored pack-quantized: (packed, scale[, zero point]), its scheme and [out, in]."""

    parts: tuple[TensorRef, ...]
    scheme: Scheme
    shape: tuple[int, int]


@dataclass
class _DenseQuantized:
    weights: dict[str, QuantizedWeight]
    names: set[str]  # the on-disk tensors they take


def _quantized_pair(model_dir: Path, base: str, tensors: dict[str, TensorRef], schemes: tuple[Scheme, ...],
                    shape: tuple[int, int]) -> tuple[tuple[TensorRef, ...], Scheme]:
    """`base`.weight_packed, .weight_scale (and, asymmetric, .weight_zero_point), as read into a slot
    (packed values and zero points as bytes), and the scheme of config.json's whose shapes they
    have for a [out, in] weight."""
    if not schemes:
        raise _fail(model_dir, f"{base}.weight_packed is quantized but config.json has no quantization_config")
    packed, scale = tensors.get(base + ".weight_packed"), tensors.get(base + ".weight_scale")
    if packed is None or scale is None:
        what = "weight_scale" if packed is not None else "weight_packed"
        raise _fail(model_dir, f"missing tensor {base}.{what} (a quantized weight needs packed values and scales)")
    for scheme in schemes:
        want_p = scheme.packed_shape(*shape)
        want_s = scheme.scale_shape(*shape)
        if packed.shape == want_p and scale.shape == want_s:
            break
    names = "/".join(s.name for s in schemes)
    if packed.shape != want_p or packed.dtype != torch.int32:
        raise _fail(model_dir, f"{base}.weight_packed is {packed.shape} {str(packed.dtype)[6:]}, {names} of a "
                               f"{list(shape)} weight is {want_p} int32")
    if scale.shape != want_s or not scale.dtype.is_floating_point:
        raise _fail(model_dir, f"{base}.weight_scale has shape {scale.shape} ({str(scale.dtype)[6:]}), {names} of a "
                               f"{list(shape)} weight needs {want_s} floats")
    refs = (TensorRef(packed.path, packed.offset, packed.nbytes, (shape[0], packed.nbytes // shape[0]), torch.uint8), scale)
    if scheme.symmetric:
        return refs, scheme
    zero = tensors.get(base + ".weight_zero_point")
    want_z = scheme.zero_point_shape(*shape)
    if zero is None:
        raise _fail(model_dir, f"missing tensor {base}.weight_zero_point ({scheme.name} is asymmetric: it needs zero points)")
    if zero.shape != want_z or zero.dtype != torch.int32:
        raise _fail(model_dir, f"{base}.weight_zero_point is {zero.shape} {str(zero.dtype)[6:]}, {scheme.name} of a "
                               f"{list(shape)} weight needs {want_z} int32")
    return (*refs, TensorRef(zero.path, zero.offset, zero.nbytes, (want_z[0], want_z[1] * 4), torch.uint8)), scheme


def _dense_quantized(model_dir: Path, model, tensors: dict[str, TensorRef], schemes: tuple[Scheme, ...]) -> _DenseQuantized:
    """The dense Linear weights a checkpoint keeps quantized (a published one may quantize attention too)."""
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    out = _DenseQuantized({}, set())
    for name in tensors:
        if not name.endswith(".weight_packed"):
            continue
        base = name[: -len("_packed")]
        shape = shapes.get(base)
        if shape is None or len(shape) != 2:
            raise _fail(model_dir, f"{name}: the model has no 2-D weight {base} to dequantize it into")
        refs, scheme = _quantized_pair(model_dir, base[: -len(".weight")], tensors, schemes, shape)
        out.weights[base] = QuantizedWeight(refs, scheme, shape)
        out.names |= {f"{base[: -len('weight')]}{suffix}" for suffix in SUFFIXES}
    return out


def _locate_mxfp4(model_dir: Path, layer: int, site: ExpertsSite, tensors: dict[str, TensorRef],
                  experts: dict[ExpertId, ExpertParts], names: set[str]) -> None:
    """One layer's MXFP4 experts: `<weight>_blocks` [E, out, in/32, 16] and `_scales` [E, out, in/32]."""
    n, refs = site.num_experts, []
    for w, shape in zip(site.weights, site.shapes):
        out, inner = (shape[1], shape[0]) if site.transposed else shape
        want = ((n, out, inner // 32, 16), (n, out, inner // 32))
        pair = [tensors.get(f"{site.path}.{w}_{kind}") for kind in ("blocks", "scales")]
        if any(r is None for r in pair):
            raise _fail(model_dir, f"missing expert tensor {site.path}.{w}_scales (an MXFP4 checkpoint needs blocks and scales)")
        if tuple(r.shape for r in pair) != want or any(r.dtype != torch.uint8 for r in pair):
            raise _fail(model_dir, f"layer {layer}: MXFP4 {w} blocks/scales are {pair[0].shape}/{pair[1].shape}, config says {want[0]}/{want[1]}")
        refs += [_slices(r, n) for r in pair]
        names.update(f"{site.path}.{w}_{kind}" for kind in ("blocks", "scales"))
    for e, parts in enumerate(zip(*refs)):
        experts[(layer, e)] = ExpertParts(parts, fused=True, mxfp4=True)


def _dense(model_dir: Path, config, model, sites: dict[int, ExpertsSite], dense: dict[str, TensorRef], *,
           quantized: set[str] = frozenset()) -> dict[str, TensorRef]:
    """The non-expert tensors the model has, checked as loading them would check (so `info`
    refuses what `generate` would): none missing, each of its parameter's shape, no expert beyond
    the count config.json gives. Others (e.g. multi-token-prediction layers transformers does not
    build) are left on disk, never read."""
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    served = {f"{s.path}.{w}" for s in sites.values() for w in s.weights}
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    for name, ref in dense.items():
        if name in want and ref.shape != want[name]:
            raise _fail(model_dir, f"tensors do not match config.json ({name}: {ref.shape} in the file, {want[name]} in the model)")
        site = next((s for s in sites.values() if name.startswith(s.path + ".")), None)
        if site is not None and name not in want:
            raise _fail(model_dir, f"tensors do not match config.json ({name}: more experts than the {site.num_experts} it gives)")
    missing = [n for n in want if n not in dense and n not in served and n not in tied and n not in quantized]
    if missing:
        raise _fail(model_dir, f"missing tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    unknown = [n for n in dense if n not in want]
    if unknown:
        log.info("%s: leaving %d tensors the model does not use on disk, e.g. %s", model_dir, len(unknown), unknown[0])
    return {n: r for n, r in dense.items() if n in want}


def _locate_row_blocks(model_dir: Path, family: Family, layer: int, site: ExpertsSite, tensors: dict[str, TensorRef],
                       experts: dict[ExpertId, ExpertParts], names: set[str]) -> None:
    """One layer's experts kept as row blocks (Family.row_blocks): (gate, up, down) [E*I, H] each,
    expert e the rows [e*I, (e+1)*I), read as saved ([I, H] each; the stand-in applies down as h @ W)."""
    n, ((two_inter, hidden), _) = site.num_experts, site.shapes
    want = (n * (two_inter // 2), hidden)
    refs = []
    for w in family.row_blocks:
        ref = tensors.get(f"{site.path}.{w}")
        if ref is None:
            raise _fail(model_dir, f"missing expert tensor {site.path}.{w} (checkpoint incomplete or not a {family.model_type} model)")
        if ref.shape != want:
            raise _fail(model_dir, f"layer {layer}: {site.path}.{w} has shape {ref.shape}, config says {want}")
        refs.append(_slices(ref, n, rows=True))
        names.add(f"{site.path}.{w}")
    for e, parts in enumerate(zip(*refs)):
        experts[(layer, e)] = ExpertParts(parts, fused=True)


def _slices(ref: TensorRef, n: int, *, rows: bool = False) -> list[TensorRef]:
    """The n per-expert slices of a fused [n, ...] tensor, or with `rows` of a [n*r, ...] one (each
    contiguous on disk)."""
    size = ref.nbytes // n
    shape = (ref.shape[0] // n, *ref.shape[1:]) if rows else ref.shape[1:]
    return [TensorRef(ref.path, ref.offset + e * size, size, shape, ref.dtype) for e in range(n)]


def _locate_quantized(model_dir: Path, family: Family, layer: int, site: ExpertsSite, tensors: dict[str, TensorRef],
                      schemes: tuple[Scheme, ...], experts: dict[ExpertId, ExpertParts], names: set[str]) -> QuantExperts:
    """One layer's pack-quantized experts, one (gate, up, down) Linear each: their (packed, scale)
    pairs in that order, all of one scheme; returns how they compute."""
    (two_inter, hidden), down = site.shapes
    shapes = ((two_inter // 2, hidden), (two_inter // 2, hidden), down)
    found: set[Scheme] = set()
    for e in range(site.num_experts):
        refs = []
        for role, shape in zip(family.per_expert_names, shapes):
            base = f"{site.path}.{e}.{role}"
            pair, scheme = _quantized_pair(model_dir, base, tensors, schemes, shape)
            refs += pair
            found.add(scheme)
            names.update(f"{base}.{suffix}" for suffix in SUFFIXES)
        experts[(layer, e)] = ExpertParts(tuple(refs), fused=False, quantized=True)
    if len(found) != 1:
        raise _fail(model_dir, f"layer {layer}: experts quantized in several schemes ({', '.join(sorted(s.name for s in found))}); "
                               "expertcache needs one")
    return QuantExperts(found.pop(), shapes)


def _locate_experts(
    model_dir: Path, family: Family, sites: dict[int, ExpertsSite], tensors: dict[str, TensorRef], schemes: tuple[Scheme, ...]
) -> tuple[dict[ExpertId, ExpertParts], set[str], QuantExperts | None]:
    experts: dict[ExpertId, ExpertParts] = {}
    names: set[str] = set()
    quant: QuantExperts | None = None
    for layer, site in sites.items():
        n, prefix = site.num_experts, site.path + "."
        if f"{prefix}0.{family.per_expert_names[0]}.weight_packed" in tensors and site.has_gate and not site.transposed:
            layer_quant = _locate_quantized(model_dir, family, layer, site, tensors, schemes, experts, names)
            if quant is not None and layer_quant != quant:
                raise _fail(model_dir, f"layer {layer}: experts quantized as {layer_quant.scheme.name}, earlier layers as "
                                       f"{quant.scheme.name}; expertcache needs one scheme")
            quant = layer_quant
            continue
        if family.row_blocks is not None:
            _locate_row_blocks(model_dir, family, layer, site, tensors, experts, names)
            continue
        if prefix + site.weights[0] + "_blocks" in tensors:
            _locate_mxfp4(model_dir, layer, site, tensors, experts, names)
            continue
        fused = [tensors.get(prefix + w) for w in site.weights]
        if all(ref is not None for ref in fused):
            want = [(n, *shape) for shape in site.shapes]
            if [ref.shape for ref in fused] != want:
                got = "/".join(str(ref.shape) for ref in fused)
                raise _fail(model_dir, f"layer {layer}: fused expert shapes {got}, config says {'/'.join(map(str, want))}")
            names.update(prefix + w for w in site.weights)
            for e, parts in enumerate(zip(*(_slices(ref, n) for ref in fused))):
                experts[(layer, e)] = ExpertParts(parts, fused=True)
            continue
        if not site.has_gate or site.transposed:  # one tensor per expert is written for [gate; up] layouts only
            raise _fail(model_dir, f"missing expert tensor {prefix}{site.weights[0]} (checkpoint incomplete or not a {family.model_type} model)")
        (two_inter, hidden), down = site.shapes
        shapes = ((two_inter // 2, hidden), (two_inter // 2, hidden), down)
        for e in range(n):
            refs = []
            for role, shape in zip(family.per_expert_names, shapes):
                name = f"{prefix}{e}.{role}.weight"
                ref = tensors.get(name)
                if ref is None:
                    raise _fail(model_dir, f"missing expert tensor {name} (checkpoint incomplete or not a {family.model_type} model)")
                if ref.shape != shape:
                    raise _fail(model_dir, f"{name} has shape {ref.shape}, config says {shape}")
                refs.append(ref)
                names.add(name)
            experts[(layer, e)] = ExpertParts(tuple(refs), fused=False)
    sizes = {p.nbytes for p in experts.values()}
    if len(sizes) != 1:
        raise _fail(model_dir, f"experts differ in size ({sorted(sizes)} bytes); expertcache needs uniform experts")
    if quant is not None and not all(p.quantized for p in experts.values()):
        raise _fail(model_dir, "some layers' experts are quantized and others are not; expertcache needs one format")
    return experts, names, quant
