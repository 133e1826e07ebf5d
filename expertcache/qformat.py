"""Weight-only integer experts as compressed-tensors' "pack-quantized" format stores them (what
llm-compressor writes and vLLM and transformers read), readable without torch.

A quantized Linear `X` keeps `X.weight_packed` (int32 [out, in*bits/32]: element i of a row at bit
i*bits, little-endian, stored as value + 2^(bits-1)), `X.weight_scale` ([out, in/group], or
[out, 1] for one scale per row, in the model's dtype) and `X.weight_shape` ([out, in]); its weight is
value * scale, or, asymmetric, (value - zero point) * scale with `X.weight_zero_point` packed the
same way along the output dimension (int32 [out*bits/32, groups]). config.json's
`quantization_config` names the schemes, one per config group. expertcache reads int4 and int8,
symmetric or not, by group or by output row, with no activation quantization; it writes symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
GROUP_SIZES = (32, 64, 128, 256)  # what `quantize` writes (torch's CPU int4 kernel takes these)


class SchemeError(ValueError):
    """A quantization_config expertcache cannot run (its message is one line)."""


@dataclass(frozen=True)
class Scheme:
    """One weight quantization: `bits` (4 or 8), one scale (and, not `symmetric`, one zero point) per
    `group_size` inputs of a row (None: one per row)."""

    bits: int
    group_size: int | None
    symmetric: bool = True

    @property
    def name(self) -> str:
        return f"int{self.bits}-" + (f"g{self.group_size}" if self.group_size else "channel") + ("" if self.symmetric else "-asym")

    def zero_point_shape(self, out: int, inner: int) -> tuple[int, int]:
        """weight_zero_point's shape: packed along the output dimension."""
        return (-(-out * self.bits // 32), self.scale_shape(out, inner)[1])

    def packed_shape(self, out: int, inner: int) -> tuple[int, int]:
        """weight_packed's shape: int32 words, a row's values at `bits` each."""
        return (out, -(-inner * self.bits // 32))

    def scale_shape(self, out: int, inner: int) -> tuple[int, int]:
        return (out, -(-inner // self.group_size) if self.group_size else 1)

    def group(self, targets: list[str]) -> dict:
        """A config group of quantization_config: this scheme on the Linear modules `targets` names."""
        strategy = {"strategy": "group", "group_size": self.group_size} if self.group_size else {"strategy": "channel"}
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "dynamic": False, "actorder": None,
                   "observer": "mse", **strategy}
        return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
                "format": "pack-quantized"}


def quantization_config(groups: list[tuple[Scheme, list[str]]], ignore: list[str]) -> dict:
    """config.json's quantization_config: each (scheme, targets) a config group."""
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {f"group_{i}": s.group(t) for i, (s, t) in enumerate(groups)},
            "ignore": ignore, "kv_cache_scheme": None}


def read_schemes(config_json: dict) -> tuple[Scheme, ...]:
    """The weight schemes of a checkpoint's config.json, one per config group (experts in one, dense
    weights in another); () for an unquantized checkpoint or an MXFP4 one (read by its tensors).
    SchemeError for what expertcache cannot run, with the reason."""
    qc = config_json.get("quantization_config")
    if qc is None:
        return ()
    if not isinstance(qc, dict):
        raise SchemeError("quantization_config is not an object")
    method = qc.get("quant_method")
    if method == "mxfp4":
        return ()
    if method != "compressed-tensors":
        raise SchemeError(f"quantization method {method!r} is not supported (expertcache reads compressed-tensors "
                          "pack-quantized int4/int8 and MXFP4)")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise SchemeError("compressed-tensors quantization_config has no config_groups")
    schemes: list[Scheme] = []
    for name, group in groups.items():
        fmt = group.get("format") or qc.get("format")
        if fmt != "pack-quantized":
            raise SchemeError(f"compressed-tensors format {fmt!r} is not supported (expertcache reads pack-quantized)")
        if group.get("input_activations") or group.get("output_activations"):
            raise SchemeError(f"config group {name!r} quantizes activations; expertcache runs weight-only schemes (W4A16, W8A16)")
        scheme = _weights_scheme(name, group.get("weights"))
        if scheme not in schemes:
            schemes.append(scheme)
    return tuple(schemes)


def _weights_scheme(name: str, w) -> Scheme:
    if not isinstance(w, dict):
        raise SchemeError(f"config group {name!r} has no weights scheme")
    bits, kind = w.get("num_bits"), w.get("type", "int")
    if kind != "int":
        raise SchemeError(f"{kind} weights are not supported (expertcache reads int4 and int8 weights)")
    if bits not in (4, 8):
        raise SchemeError(f"{bits}-bit weights are not supported (expertcache runs 4 and 8 bits)")
    symmetric = bool(w.get("symmetric", True))
    if w.get("dynamic"):
        raise SchemeError("dynamic weight quantization is not a stored format")
    if w.get("actorder") == "group":
        raise SchemeError("activation-ordered groups (actorder: group, weight_g_idx) are not supported; "
                          "use actorder static or none")
    strategy = w.get("strategy")
    if strategy == "channel":
        return Scheme(bits, None, symmetric)
    if strategy == "group":
        g = w.get("group_size")
        if not isinstance(g, int) or g <= 0:
            raise SchemeError(f"group strategy with group_size {g!r}")
        return Scheme(bits, g, symmetric)
    raise SchemeError(f"weight strategy {strategy!r} is not supported (group or channel)")


PLAIN_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}


def bytes_per_weight(precision: str) -> float:
    """Stored bytes per expert weight of a precision: a dtype name, or a scheme's name
    (int8-channel, int4-g64 ...; 16-bit scales; mxfp4: 4 bits and one byte per 32)."""
    if precision in PLAIN_BYTES:
        return PLAIN_BYTES[precision]
    if precision == "mxfp4":
        return 0.5 + 1 / 32
    if precision.endswith("-asym"):  # a zero point of `bits` per group besides the scale
        base = precision.removesuffix("-asym")
        group = int(base.split("-g")[1]) if "-g" in base and base.split("-g")[1].isdigit() else None
        return bytes_per_weight(base) + (int(base[3]) / 8 / group if group else 0)
    for bits in (4, 8):
        if precision == f"int{bits}-channel":
            return bits / 8
        if precision.startswith(f"int{bits}-g") and precision[len(f"int{bits}-g"):].isdigit():
            return bits / 8 + 2 / int(precision[len(f"int{bits}-g"):])
    raise ValueError(f"unknown precision {precision!r}: a dtype (bfloat16, float16, float32), mxfp4, int8-channel "
                     "or int4-g32/g64/g128/g256")
