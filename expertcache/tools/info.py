"""What a checkpoint is, in figures (family, layers, experts, bytes, the minimum budget), and which
families expertcache runs. The figures come from config.json and the safetensors headers alone, in
well under a second; `check=True` (or a checkpoint the headers cannot settle) builds transformers'
model from config.json and checks every tensor against it, as loading does."""

from __future__ import annotations

import re
from pathlib import Path

from ..config import demo_model_dir
from ..errors import CheckpointError
from ..families import FAMILIES, Family, text_prefix
from ..headers import DTYPE_NAMES, TensorEntry, read_config_json, read_tensors
from ..qformat import Scheme, SchemeError, read_schemes

EXPERT_COUNT_KEYS = ("n_routed_experts", "moe_num_experts", "num_local_experts", "num_experts")  # the first present counts
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "moe_top_k")  # config.json's names for top-k (Ernie, Hunyuan, DBRX)
LAYER_KEYS, HIDDEN_KEYS = ("num_hidden_layers", "n_layers"), ("hidden_size", "d_model")  # DBRX: n_layers, d_model
_EXPERT = re.compile(r"^(?P<site>(?:.*\.)?(?:layers|blocks)\.(?P<layer>\d+)\.(?:.*\.)?experts)\.(?P<rest>.+)$")
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")
_FUSED = ("gate_up_proj", "up_proj", "down_proj")
_MXFP4 = re.compile(r"^(gate_up_proj|down_proj)_(blocks|scales)$")
_PER_EXPERT = re.compile(r"^(\d+)\.(\w+)\.weight(?:_packed|_scale|_shape|_zero_point)?$")


def families() -> list[dict]:
    """Every supported family and what is particular to it."""
    return [{"model_type": f.model_type, "quirks": f.quirks, "lossy_routing": f.softmax_router} for f in FAMILIES.values()]


def model_info(model_dir: str | Path | None, *, check: bool = False) -> dict:
    """The figures of a checkpoint directory (None = the bundled demo model)."""
    model_dir = Path(model_dir) if model_dir is not None else demo_model_dir()
    if not check:
        info = _from_headers(model_dir)
        if info is not None:
            return info
    return _from_model(model_dir)


def _figures(model_dir: Path, *, family: str, layers: int, sparse: int, experts: int, top_k: int, renormalize,
             layout: str, dtype: str, expert_bytes: int, dense_bytes: int, checked: str, precision: str | None = None) -> dict:
    return {
        "model": str(model_dir),
        "supported": True,
        "family": family,
        "layers": layers,
        "sparse_layers": sparse,
        "experts_per_layer": experts,
        "top_k": top_k,
        "renormalize": renormalize,
        "expert_layout": layout,
        "dtype": dtype,
        "expert_precision": precision or dtype,  # what an expert's weights are stored as: a dtype, mxfp4, int4-g64 ...
        "bytes_per_expert": expert_bytes,
        "dense_bytes": dense_bytes,
        "total_expert_bytes": sparse * experts * expert_bytes,
        "min_budget_bytes": top_k * expert_bytes,
        "token_cycle_bytes": sparse * top_k * expert_bytes,
        "checked": checked,
    }


def _from_model(model_dir: Path) -> dict:
    """The figures as loading sees them: transformers' model built from config.json (imports torch)."""
    from ..checkpoint import Checkpoint

    ckpt = Checkpoint.open(model_dir)
    rule = ckpt.family.weight_rule(ckpt.config)
    return _figures(
        ckpt.model_dir, family=ckpt.family.model_type, layers=int(ckpt.config.num_hidden_layers),
        sparse=len(ckpt.sparse_layers), experts=ckpt.num_experts, top_k=ckpt.top_k,
        renormalize=rule.renormalize if rule is not None else None,
        layout="fused" if next(iter(ckpt.experts.values())).fused else "per-expert",
        dtype=str(ckpt.dtype).replace("torch.", ""), expert_bytes=ckpt.expert_bytes, dense_bytes=ckpt.dense_bytes,
        checked="model", precision=ckpt.precision,
    )


def _int(raw: dict, key: str) -> int | None:
    value = raw.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _first(raw: dict, keys: tuple[str, ...]) -> int | None:
    """The first of `keys` config.json gives, at the top or in its ffn_config (DBRX)."""
    for where in (raw, raw.get("ffn_config") if isinstance(raw.get("ffn_config"), dict) else {}):
        key = next((k for k in keys if where.get(k) is not None), None)
        if key:
            return _int(where, key)
    return None


def _from_headers(model_dir: Path) -> dict | None:
    """The figures from config.json and the safetensors headers, checked against each other (expert
    counts, top-k, the embedding's shape, uniform experts); None where they cannot settle them
    (an unsupported or unusual config, a layout this reading does not know): the model decides."""
    raw = read_config_json(model_dir)
    try:
        schemes = read_schemes(raw)  # refuses what the engine would refuse
    except SchemeError as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: {e}") from None
    prefix = text_prefix(raw["model_type"])
    if prefix:  # a multimodal checkpoint: its text model runs
        raw = raw.get("text_config")
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            return None
    family = FAMILIES.get(raw["model_type"]) if isinstance(raw["model_type"], str) else None
    layers, top_k, n_cfg = (_first(raw, keys) for keys in (LAYER_KEYS, TOP_K_KEYS, EXPERT_COUNT_KEYS))
    if family is None or layers is None or top_k is None or n_cfg is None:
        return None
    renormalize = None
    if family.softmax_router:
        renormalize = family.renormalize if family.renormalize is not None else raw.get("norm_topk_prob")
        if not isinstance(renormalize, bool):
            return None
    tensors = {family.canonical_name(n[len(prefix):]): e for n, e in read_tensors(model_dir).items() if n.startswith(prefix)}
    sites, dense_bytes = _sites(family, tensors, layers)
    if not sites:
        return None
    config = model_dir / "config.json"
    embed = tensors.get("model.embed_tokens.weight")
    want = (_int(raw, "vocab_size"), _first(raw, HIDDEN_KEYS))
    if embed is not None and None not in want and embed.shape != want:
        raise CheckpointError(f"{model_dir}: tensors do not match config.json (model.embed_tokens.weight: {embed.shape} "
                              f"in the file, config says vocab_size {want[0]}, hidden_size {want[1]})")
    inter = _first(raw, ("ffn_hidden_size",))  # rows per expert of row-block experts (DBRX)
    figures = [_site_figures(model_dir, family, path, parts, n_cfg, inter, want[1], schemes)
               for path, parts in sorted(sites.items())]
    if any(f is None for f in figures) or len({f[0] for f in figures}) != 1:
        return None
    sizes = {f[1] for f in figures}
    if len(sizes) != 1:
        raise CheckpointError(f"{model_dir}: experts differ in size ({sorted(sizes)} bytes); expertcache needs uniform experts")
    if not 1 <= top_k <= n_cfg:
        raise CheckpointError(f"{config}: num_experts_per_tok is {top_k}, must be between 1 and the number of experts ({n_cfg})")
    layout, dtype = figures[0][0], figures[0][2]
    precision = None
    if layout == "mxfp4":
        layout, dtype, precision = "fused", str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"), "mxfp4"
    elif layout.startswith("per-expert "):  # "per-expert <scheme>": pack-quantized experts
        layout, precision = layout.split(" ")
    return _figures(model_dir, family=family.model_type, layers=layers, sparse=len(sites), experts=n_cfg, top_k=top_k,
                    renormalize=renormalize, layout=layout, dtype=dtype, expert_bytes=figures[0][1],
                    dense_bytes=dense_bytes, checked="headers", precision=precision)


def _sites(family: Family, tensors: dict[str, TensorEntry], layers: int) -> tuple[dict[str, dict], int]:
    """Expert tensors grouped by experts module, and the bytes of every other tensor the model has
    (those of layers past num_hidden_layers, e.g. multi-token prediction, stay on disk)."""
    sites: dict[str, dict] = {}
    dense = 0
    for name, entry in tensors.items():
        layer = _LAYER.search(name)
        if layer is not None and int(layer.group(1)) >= layers:
            continue
        m = _EXPERT.match(name)
        rest = m.group("rest") if m else ""
        per = _PER_EXPERT.match(rest)
        if m and (rest in _FUSED or rest in (family.row_blocks or ()) or _MXFP4.match(rest)
                  or (per and per.group(2) in family.per_expert_names)):
            sites.setdefault(m.group("site"), {})[rest] = entry
        elif not name.endswith(("rotary_emb.inv_freq", ".weight_shape")):  # a quantized weight's shape: metadata
            dense += entry.nbytes
    return sites, dense


def _site_figures(model_dir: Path, family: Family, path: str, parts: dict[str, TensorEntry], n_cfg: int, inter: int | None,
                  hidden: int | None = None, schemes: tuple[Scheme, ...] = ()):
    """(layout, bytes per expert, dtype) of one experts module, its expert count checked against
    config.json's; None for a layout this reading does not know."""
    if family.row_blocks is not None:  # [E*I, H] each
        group = [parts.get(w) for w in family.row_blocks]
        if None in group or len(parts) != 3 or not inter or len({e.shape for e in group}) != 1 or group[0].shape[0] % inter:
            return None
        _check_count(model_dir, path, group[0].shape[0] // inter, n_cfg)
        return "fused", sum(e.nbytes // n_cfg for e in group), DTYPE_NAMES[group[0].dtype]
    fused = [parts.get(w) for w in (("gate_up_proj" if "gate_up_proj" in parts else "up_proj"), "down_proj")]
    mx = [parts.get(f"{w}_{kind}") for w in ("gate_up_proj", "down_proj") for kind in ("blocks", "scales")]
    if all(e is not None for e in mx) and len(parts) == 4:
        layout, group = "mxfp4", mx
    elif all(e is not None for e in fused) and len(parts) == 2:
        layout, group = "fused", fused
    elif all(_PER_EXPERT.match(rest) for rest in parts):
        return _per_expert_figures(model_dir, family, path, parts, n_cfg, hidden, schemes)
    else:
        return None
    counts = {e.shape[0] if e.shape else 0 for e in group}
    if len(counts) != 1:
        return None
    _check_count(model_dir, path, counts.pop(), n_cfg)
    return layout, sum(e.nbytes // n_cfg for e in group), DTYPE_NAMES[group[0].dtype]


def _per_expert_figures(model_dir: Path, family: Family, path: str, parts: dict[str, TensorEntry], n_cfg: int,
                        hidden: int | None, schemes: tuple[Scheme, ...]):
    on_disk = {int(_PER_EXPERT.match(rest).group(1)) for rest in parts}
    _check_count(model_dir, path, max(on_disk) + 1, n_cfg)
    quantized = f"0.{family.per_expert_names[0]}.weight_packed" in parts
    kinds = ("weight_packed", "weight_scale") if quantized else ("weight",)
    if quantized and f"0.{family.per_expert_names[0]}.weight_zero_point" in parts:
        kinds += ("weight_zero_point",)
    sizes = set()
    for e in range(n_cfg):
        for role in family.per_expert_names:
            for kind in kinds:
                if f"{e}.{role}.{kind}" not in parts:
                    raise CheckpointError(f"{model_dir}: missing expert tensor {path}.{e}.{role}.{kind} "
                                          f"(checkpoint incomplete or not a {family.model_type} model)")
        sizes.add(sum(parts[f"{e}.{role}.{kind}"].nbytes for role in family.per_expert_names for kind in kinds))
    if len(sizes) != 1:
        raise CheckpointError(f"{model_dir}: experts differ in size ({sorted(sizes)} bytes); expertcache needs uniform experts")
    first = f"0.{family.per_expert_names[0]}"
    if not quantized:
        return "per-expert", sizes.pop(), DTYPE_NAMES[parts[first + ".weight"].dtype]
    packed, scale = parts[first + ".weight_packed"], parts[first + ".weight_scale"]  # the gate's: [I, hidden] weight
    out = packed.shape[0] if packed.shape else 0
    scheme = next((s for s in schemes if hidden and s.symmetric == ("weight_zero_point" not in kinds)
                   and packed.shape == s.packed_shape(out, hidden) and scale.shape == s.scale_shape(out, hidden)),
                  None)
    if scheme is None:
        return None  # the model decides (and says what does not fit)
    return f"per-expert {scheme.name}", sizes.pop(), DTYPE_NAMES[scale.dtype]


def _check_count(model_dir: Path, path: str, on_disk: int, n_cfg: int) -> None:
    if on_disk > n_cfg:
        raise CheckpointError(f"{model_dir}: tensors do not match config.json ({path}: {on_disk} experts on disk, more "
                              f"than the {n_cfg} it gives)")
    if on_disk < n_cfg:
        raise CheckpointError(f"{model_dir}: missing expert tensor(s): config.json gives {n_cfg} experts, {path} has "
                              f"{on_disk} on disk")
