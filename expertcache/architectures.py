"""Where a transformers model keeps its experts (the family rows themselves are families.py).

transformers routes each MoE family's experts through its experts interface: the family's experts
module is decorated with `use_experts_implementation`, which marks every instance (has_gate,
is_transposed, ...). `experts_sites` finds those modules on a model built on the meta device, with
their layer and per-expert shapes; `build_model` swaps in a stand-in where a family's experts
module stands outside the interface (STAND_INS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointError
from .families import FAMILIES, GRANITE_RENAMES, TEXT_MODELS, Family  # noqa: F401  (re-exported)

_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")  # decoder layers: model.layers.N, DBRX's transformer.blocks.N


class _StandIn(nn.Module):
    """An experts module swapped in for one transformers 5.23 keeps outside its experts interface:
    it carries the interface's marks and 3-D weights of the interface's shapes (what experts_sites
    reads; the engine never allocates them), and its calls go to the engine."""

    has_gate, is_concatenated, has_bias, has_post_expert_norm = True, True, False, False

    def _binding(self):
        binding = self.__dict__.get("_expertcache")
        if binding is None:
            raise RuntimeError("these experts belong to no expertcache engine: load the model with expertcache.load()")
        return binding


class ScaledRowsExperts(_StandIn):
    """Llama 4's experts: its block hands them one row per (expert, token) of inputs already scaled
    by the router (rows [E*T, H], every expert on every token, unselected rows zero) and sums their
    outputs itself. The engine computes only the selected rows (ExpertsRuntime.forward_rows)."""

    is_transposed = True

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.num_experts = original.num_experts
        self.gate_up_proj = original.gate_up_proj  # [E, H, 2I]: gate then up
        self.down_proj = original.down_proj  # [E, I, H]
        self.act_fn = original.act_fn

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return up * self.act_fn(gate)  # as Llama4TextExperts computes it

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        runtime, layer = self._binding()
        return runtime.forward_rows(self, layer, rows)


class RowBlockExperts(_StandIn):
    """DBRX's experts: w1, v1, w2 as [E*I, H] tensors, expert e the rows [e*I, (e+1)*I) of each
    (Family.row_blocks); gate = x W1^T, up = x V1^T, out = (act(gate) * up) W2. Each expert runs
    on its blocks as saved, with DBRX's own operations (expert_from_parts)."""

    is_transposed = False

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        n, inter, hidden = original.num_experts, original.ffn_hidden_size, original.hidden_size
        like = dict(device=original.mlp.w1.device, dtype=original.mlp.w1.dtype)
        self.num_experts, self.hidden_size = n, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden, **like), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter, **like), requires_grad=False)
        self.act_fn = original.mlp.activation_fn

    def expert_from_parts(self, x: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        w1, v1, w2 = parts  # [I, H] each, as saved
        return (self.act_fn(x.matmul(w1.T)) * x.matmul(v1.T)).matmul(w2)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        runtime, layer = self._binding()
        x = hidden_states.reshape(-1, self.hidden_size)  # DBRX hands its experts [B, S, H]
        return runtime.forward(self, layer, x, top_k_index, top_k_weights).view(hidden_states.shape[0], -1, self.hidden_size)


STAND_INS: dict[str, type[nn.Module]] = {"Llama4TextExperts": ScaledRowsExperts, "DbrxExperts": RowBlockExperts}


def child(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path, or None."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


@dataclass(frozen=True)
class ExpertsSite:
    """One experts module of a model: where it is and the shapes of one expert's weights."""

    layer: int  # decoder layer index
    path: str  # module name, e.g. "model.layers.3.mlp.experts"
    num_experts: int
    weights: tuple[str, ...]  # its expert weight parameters: ("gate_up_proj" | "up_proj", "down_proj")
    shapes: tuple[tuple[int, ...], ...]  # one expert's slice of each, in memory
    has_gate: bool
    transposed: bool  # weights are [in, out] (x @ W) instead of [out, in]

    @property
    def block(self) -> str:
        """The MoE block holding it."""
        return self.path.rsplit(".", 1)[0]

    @property
    def decoder_layer(self) -> str:
        m = _LAYER.search(self.path + ".")
        return self.path[: m.end() - 1]


def family_for(config) -> Family:
    """The row for a transformers config, or a one-line error saying what is missing."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise unsupported(model_type, why_unsupported(config))
    return FAMILIES[model_type]


def unsupported(model_type, why: str | None) -> CheckpointError:
    why = f" ({why})" if why else ""
    return CheckpointError(f"unsupported architecture {model_type!r}{why}: expertcache supports {', '.join(sorted(FAMILIES))}")


def why_unsupported(config) -> str | None:
    """The one thing that keeps a model of `config` from running here, read off its model."""
    text = getattr(config, "text_config", None)
    if getattr(text, "model_type", None) in FAMILIES:
        return (f"a multimodal checkpoint whose text model {text.model_type!r} is supported; expertcache reads text "
                f"models out of {', '.join(TEXT_MODELS)} checkpoints only")
    try:
        model = build_model(config, family=FAMILIES.get(config.model_type))
    except CheckpointError as e:
        return str(e)
    try:
        sites = experts_sites(model)
    except CheckpointError as e:
        return str(e)
    if sites and config.model_type not in FAMILIES:
        return "its experts go through transformers' experts interface, but no row describes how its checkpoints name them on disk"
    if not sites:
        unrouted = next((m for n, m in model.named_modules() if n.endswith(".experts")), None)
        if unrouted is not None:
            return f"its experts module {type(unrouted).__name__} is not routed through transformers' experts interface"
        return "a dense model: it has no experts"
    return None


def is_experts_module(module: nn.Module) -> bool:
    """Whether transformers dispatches this module's forward through its experts interface."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated"))


def experts_sites(model: nn.Module) -> dict[int, ExpertsSite]:
    """Every experts module of `model` (built on any device, meta included), by decoder layer."""
    sites: dict[int, ExpertsSite] = {}
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        m = _LAYER.search(name + ".")
        if m is None:
            raise CheckpointError(f"experts module {name} sits outside the decoder layers: not supported")
        names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
        params = [getattr(module, n, None) for n in names]
        if any(not isinstance(p, torch.Tensor) or p.dim() != 3 for p in params):
            raise CheckpointError(f"experts module {name} does not keep its weights as [experts, ...] tensors {names}")
        layer = int(m.group(1))
        sites[layer] = ExpertsSite(
            layer=layer, path=name, num_experts=int(params[0].shape[0]), weights=names,
            shapes=tuple(tuple(p.shape[1:]) for p in params), has_gate=bool(module.has_gate),
            transposed=bool(module.is_transposed),
        )
    return dict(sorted(sites.items()))


def shared_expert_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """What a MoE block's shared experts add on x [n, H] (None: the block has none): Qwen2-MoE's
    sigmoid-gated shared_expert, DeepSeek-style shared_experts, Hunyuan's shared_mlp."""
    for name in ("shared_expert", "shared_experts", "shared_mlp"):
        shared = getattr(block, name, None)
        if shared is not None:
            gate = getattr(block, name + "_gate", None)
            y = shared(x)
            return torch.sigmoid(gate(x)) * y if gate is not None else y
    return None


def build_model(config, *, dtype: torch.dtype | None = None, experts_implementation: str | None = None,
                family: Family | None = None) -> nn.Module:
    """The transformers causal LM of `config` on the meta device: modules and shapes, no memory.
    A family whose experts stand outside the interface gets its stand-in (STAND_INS). A config
    the engine read itself (native.NativeConfig) builds the engine's own model (native.py)."""
    from . import native

    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    try:
        with torch.device("meta"):
            if isinstance(config, native.NativeConfig):
                return native.build(config, dtype)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    except Exception as e:  # a config transformers accepted but cannot build from (unknown activation, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot build the model from its config.json ({first})") from None
    if family is not None and family.stand_in is not None:
        for name, module in list(model.named_modules()):
            if type(module).__name__ == family.stand_in:
                model.set_submodule(name, STAND_INS[family.stand_in](module))
    return model
