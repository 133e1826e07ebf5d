"""Engine: the composition root. Builds everything an EngineConfig names, and generates.

The transformers model is built on the meta device with experts_implementation="expertcache";
its experts modules lose their weight tensors (the cache serves them), only then is the model
allocated and its dense tensors read. Hooks for tools and the simulator are context managers:
observe(), routing_override(), prefetch_paused(), observers_paused().
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from . import experts, gemm, lean, native
from .architectures import build_model, child, shared_expert_output
from .cache import ExpertCache
from .checkpoint import Checkpoint
from .config import (DEMO_DIR, RESERVE_CONTEXT, RESERVE_WORKSPACE, EngineConfig, demo_model_dir,  # noqa: F401  (DEMO_DIR re-exported)
                     parse_budget, parse_size)
from .decoding import LEAN_ATTR, Decoding
from .errors import BudgetError, CheckpointError, ExpertCacheError
from .experts import ExpertsRuntime, GuessObserver, RouteObserver
from .memlimit import MemoryPlan, plan
from .policies import EvictionPolicy, make_policy
from .quant import NATIVE, QuantLinear, kernel_for
from .predictors import NoPredictor, make_predictor
from .routing import RoutingPolicy, make_routing
from .stats import Stats, current_rss_bytes, peak_rss_bytes
from .store import ExpertStore, _round_up
from .tokenizer import load as load_plain_tokenizer

log = logging.getLogger(__name__)



@dataclass
class GenerationResult:
    text: str | None
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


def _kept_in_float32(model: nn.Module, name: str, dtype: torch.dtype) -> bool:
    """Whether from_pretrained would load tensor `name` in float32 in a `dtype` model: the model
    class's keep-in-float32 patterns (the strict ones for float16 and bfloat16, the others for
    float16 only), matched anywhere in the name."""
    patterns = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return any(re.search(re.escape(p).replace(r"\*", ".*"), name) for p in patterns)


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes over all layers (keys and values of each attention layer;
    MLA's per-head key and value widths where the family has them). An estimate for sizing."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(c, "num_attention_heads", 1) or 1
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or getattr(c, "hidden_size", 0) // heads
    if getattr(c, "qk_nope_head_dim", None) is not None:  # MLA: transformers caches per-head keys and values
        per_layer = heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    else:
        per_layer = 2 * kv_heads * head_dim
    return per_layer * getattr(c, "num_hidden_layers", 1) * dtype.itemsize


def _build_model(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    if not isinstance(ckpt.config, native.NativeConfig):
        experts.register()
    model = build_model(ckpt.config, dtype=dtype, experts_implementation=experts.IMPLEMENTATION, family=ckpt.family)
    for site in ckpt.sites.values():  # the cache serves these: never allocated
        module = model.get_submodule(site.path)
        for name in site.weights:
            module.register_parameter(name, None)
    # each tensor in the dtype its module builds it in, as from_pretrained loads it (a router some
    # families keep in float32 in a bf16 model: Hunyuan's wg, Ernie's gate)
    built = {n: t.dtype for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point()}
    for n in [n for n in built if _kept_in_float32(model, n, dtype)]:  # DeepSeek-V3's score-correction bias
        built[n] = torch.float32
    packed = {n for n, q in (ckpt.dense_quantized or {}).items()
              if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.Linear) and kernel_for(q.scheme, q.shape) == NATIVE}
    for name in packed:  # dense weights kept quantized (quantize --dense int8): never allocated in the dtype
        model.get_submodule(name.rsplit(".", 1)[0]).register_parameter("weight", None)
    model = _empty_on_cpu(model)
    dense = ckpt.load_dense(packed=packed)
    for name in packed:
        path = name.rsplit(".", 1)[0]
        q = ckpt.dense_quantized[name]
        bias = dense.pop(path + ".bias", None)
        model.set_submodule(path, QuantLinear(dense.pop(name + "_parts"), q.scheme, q.shape,
                                              None if bias is None else bias.to(dtype)))
    state = {k: v.to(built.get(k, dtype)) if v.is_floating_point() else v for k, v in dense.items()}
    result = model.load_state_dict(state, strict=False, assign=True)  # Checkpoint.open checked names and shapes
    if result.unexpected_keys:
        log.warning("ignoring %d unexpected tensors, e.g. %s", len(result.unexpected_keys), result.unexpected_keys[0])
    if getattr(ckpt.config, "tie_word_embeddings", False):
        model.tie_weights()
    # non-persistent buffers (rotary inverse frequencies) are not in the checkpoint: build them anew
    for name, module in list(model.named_modules()):
        if module._non_persistent_buffers_set:
            if not hasattr(module, "config"):
                raise CheckpointError(f"{ckpt.model_dir}: cannot initialise the buffers of {name} ({type(module).__name__})")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(module)(config=module.config))
    model.eval()
    model.requires_grad_(False)
    return model


def _empty_on_cpu(model: nn.Module) -> nn.Module:
    """The model's meta tensors made empty CPU ones, as to_empty(device="cpu") does, by torch.empty
    of each shape (to_empty's empty_like on the meta device runs torch's Python reference, which
    imports sympy: docs/memory.md)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return model


class Engine:
    """A loaded model whose experts live in a bounded cache fed from disk."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_num_threads(config.threads())
        t0 = time.perf_counter()
        model_dir = Path(config.model) if config.model is not None else demo_model_dir()
        self.checkpoint = ckpt = Checkpoint.open(model_dir, native=config.model_build == "native" and config.decode_step == "lean")
        dtype = _dtype(config.dtype) if config.dtype else ckpt.dtype
        self.budget_bytes = parse_budget(config.expert_budget, ckpt.total_expert_bytes)
        limit = None if config.memory_limit in (None, "auto") else parse_size(config.memory_limit, "memory limit")
        reserve = (parse_size(config.memory_reserve, "memory reserve") if config.memory_reserve is not None
                   else RESERVE_CONTEXT * _kv_bytes_per_token(ckpt.config, dtype) + RESERVE_WORKSPACE)
        try:
            policy, partitioned = make_policy(config.cache_policy)
        except ValueError as e:
            raise ExpertCacheError(str(e)) from None
        self.stats_ = Stats()
        # which kernels compute quantized experts is decided (and expertcache's built) here, not in a reader thread
        prepare = ckpt.quant.prepare if ckpt.quant is not None and ckpt.quant.repacks else None
        self.miss_copy = _miss_copy(ckpt, dtype, config.miss_copy) if config.miss_copy is not None else None
        self.store = ExpertStore(ckpt.experts, io=config.io)
        low_store = ExpertStore(self.miss_copy.experts, io=config.io) if self.miss_copy is not None else None
        self.memory_plan: MemoryPlan | None = None
        try:
            self.model = _build_model(ckpt, dtype)
            if config.memory_limit is not None:  # the dense part is in memory: what is left is the experts'
                self.memory_plan = plan(limit, reserve)
                self.budget_bytes = self._budget_within(self.memory_plan)
            self.cache = ExpertCache(
                store=self.store, budget_bytes=self.budget_bytes, expert_bytes=ckpt.expert_bytes, top_k=ckpt.top_k,
                policy=policy, partitioned=partitioned, layers=ckpt.sparse_layers, io_threads=config.io_threads,
                stats=self.stats_, prepare=prepare, quant=ckpt.quant, low_store=low_store,
                low_quant=self.miss_copy and self.miss_copy.quant, low_expert_bytes=self.miss_copy and self.miss_copy.expert_bytes,
            )  # fmt: skip
        except BaseException as e:
            self.store.close()
            if low_store is not None:
                low_store.close()
            if isinstance(e, ValueError):
                raise ExpertCacheError(str(e)) from None
            raise
        try:
            upcast = config.half_matmul == "float32"
            gemm.install_dense(self.model, upcast=upcast)  # half-precision products through the exact kernel (or float32)
            if upcast:
                gemm.install_attention(self.model)
            self.runtime = ExpertsRuntime(cache=self.cache, routing=self._routing(model_dir), predictor=NoPredictor(),
                                          num_experts=ckpt.num_experts, top_k=ckpt.top_k, upcast=upcast)
            self.cache.core.upgrade_after = config.miss_copy_upgrade
            self.cache.core.low_guesses = config.miss_copy_reads == "all"
            self.runtime.bind(self.model, ckpt.sites, ckpt.family)
            self.runtime.predictor = self._predictor(model_dir)
            self.runtime.prefetch_enabled = config.prefetch != "none"
            self.runtime.min_precision, self.runtime.prefetch_depth = config.prefetch_min_precision, config.prefetch_depth
            why = "asked for" if config.decode_step != "lean" else lean.why_not(self.model, upcast)
            if why is None:
                self.model.__dict__[LEAN_ATTR] = lean.LeanDecoder(self.model, self.runtime)
            self.decode_step = "lean" if why is None else f"transformers ({why})"  # stats: which code runs a decode step
        except ValueError as e:
            self.cache.close()
            raise ExpertCacheError(str(e)) from None
        except BaseException:
            self.cache.close()  # a failed load leaves no reader threads or open files behind
            raise
        self.tokenizer = _load_tokenizer(model_dir)
        self.generation_config = getattr(self.model, "generation_config", None)
        self.load_seconds = time.perf_counter() - t0
        self._timing: dict[str, float | int | None] = {"ttft_seconds": None, "tpot_seconds": None, "tokens": 0}

    def _budget_within(self, mp: MemoryPlan) -> int:
        """The expert budget a memory plan leaves, in whole slots (a slot is an expert rounded up
        to the read alignment), or a one-line error saying what the limit lacks."""
        ckpt = self.checkpoint
        slots = min(max(mp.budget_bytes, 0) // _round_up(self.store.slot_bytes), ckpt.num_experts * len(ckpt.sparse_layers))
        if slots < ckpt.top_k:
            need = mp.in_use_bytes + mp.reserve_bytes + ckpt.top_k * _round_up(self.store.slot_bytes)
            raise BudgetError(
                f"memory limit {mp.limit_bytes / 2**20:.0f} MiB ({mp.source}) is too small: {mp.in_use_bytes / 2**20:.0f} MiB "
                f"are in use ({mp.in_use_by}) and {mp.reserve_bytes / 2**20:.0f} MiB are reserved (KV cache, "
                f"activations); the experts need at least {ckpt.top_k} slots: give at least {need / 2**20:.0f} MiB "
                "or a smaller --memory-reserve")
        log.info("%s: %d expert slots", mp.describe(), slots)
        return slots * ckpt.expert_bytes

    def _routing(self, model_dir: Path) -> RoutingPolicy:
        c, ckpt = self.config, self.checkpoint
        if c.routing == "pregate" and c.prefetch != "pregate":
            raise ValueError("routing 'pregate' routes by the pre-gate's choices: give --prefetch pregate too")
        return make_routing(
            c.routing, rule=ckpt.family.weight_rule(ckpt.config), top_k=ckpt.top_k, layers=ckpt.sparse_layers,
            model_dir=model_dir, calibration=c.calibration,
            resident=self.cache.holding,  # read when a layer routes
            predicted=lambda layer: self.runtime.predictions.get(layer, []),
            pregated=lambda layer: getattr(self.runtime.predictor, "routes", {}).get(layer),
            cache_lambda=c.cache_lambda, cache_protect_top=c.cache_protect_top, cache_max_rank=c.cache_max_rank,
            applies_to=c.routing_applies_to,
        )  # fmt: skip

    def _predictor(self, model_dir: Path):
        c = self.config
        predictor = make_predictor(
            c.prefetch, routers=self.routers(), norms=self.norms(), top_k=self.checkpoint.top_k, depth=c.prefetch_depth,
            max_per_layer=c.prefetch_max, model_dir=model_dir, path=c.predictor,
        )  # fmt: skip
        observe = getattr(predictor, "observe", None)
        if observe is not None:  # predictors that learn from what each layer routed (history, default-vector)
            self.runtime.observers.append(observe)
        return predictor

    # --- the model's parts, by sparse layer ---------------------------------------------------------
    def block(self, layer: int) -> nn.Module:
        """The MoE block of a sparse layer (transformers' own module)."""
        return self.model.get_submodule(self.checkpoint.sites[layer].block)

    def routers(self) -> dict[int, torch.Tensor]:
        """Each sparse layer's router weight [E, H]."""
        family = self.checkpoint.family
        return {l: getattr(self.block(l), family.router).get_parameter(family.router_weight) for l in self.checkpoint.sparse_layers}

    def norms(self) -> dict[int, nn.Module | None]:
        """Each sparse layer's norm in front of its MoE block (None where the family has none)."""
        ckpt = self.checkpoint
        return {l: child(self.model.get_submodule(s.decoder_layer), ckpt.family.norm) for l, s in ckpt.sites.items()}

    def shared_output(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' contribution of a sparse layer on x [n, H] (None: it has none)."""
        return shared_expert_output(self.block(layer), x)

    def run_expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's output on x [n, H], its weights read through the cache."""
        return self.runtime.run_expert(layer, expert, x)

    # --- hooks -------------------------------------------------------------------------------------
    @property
    def prefetching(self) -> bool:
        """Whether the predictor's guesses are requested (prefetch is not "none" and not paused)."""
        return self.runtime.prefetch_enabled

    @contextmanager
    def observe(self, on_route: RouteObserver | None = None, on_guess: GuessObserver | None = None) -> Iterator[None]:
        """Call on_route(layer, x, logits, weights, ids) for every layer call (after routing) and
        on_guess(layer, [(target, experts)]) for every guess requested, while inside."""
        rt = self.runtime
        added = [(lst, fn) for lst, fn in ((rt.observers, on_route), (rt.guess_observers, on_guess)) if fn is not None]
        for lst, fn in added:
            lst.append(fn)
        try:
            yield
        finally:
            for lst, fn in added:
                if fn in lst:
                    lst.remove(fn)

    @contextmanager
    def observers_paused(self) -> Iterator[None]:
        """No observer added through observe() sees the calls made inside (the predictor's own do)."""
        rt = self.runtime
        keep = [o for o in rt.observers if o is getattr(rt.predictor, "observe", None)]
        saved = (list(rt.observers), list(rt.guess_observers))
        rt.observers[:], rt.guess_observers[:] = keep, []
        try:
            yield
        finally:
            rt.observers[:], rt.guess_observers[:] = saved

    @contextmanager
    def routing_override(self, policy: RoutingPolicy) -> Iterator[None]:
        """Route with `policy` while inside."""
        saved, self.runtime.routing = self.runtime.routing, policy
        try:
            yield
        finally:
            self.runtime.routing = saved

    @contextmanager
    def prefetch_paused(self) -> Iterator[None]:
        """No guesses while inside (demand loads only)."""
        saved, self.runtime.prefetch_enabled = self.runtime.prefetch_enabled, False
        try:
            yield
        finally:
            self.runtime.prefetch_enabled = saved

    def reset_cache(self, policy: EvictionPolicy | None = None) -> None:
        """Empty the cache (waiting for loads in flight), optionally under a new eviction policy."""
        core = self.cache.core
        core.clear()
        if policy is not None:
            core.policy = policy
        core.now = -1
        self.runtime.predictions.clear()

    # --- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.stats_.to_dict()
        layers = s.pop("layers")
        s.update(self._timing)
        s["hit_rate"] = s["hits"] / s["lookups"] if s["lookups"] else None
        s["peak_rss_bytes"] = peak_rss_bytes()
        s["rss_bytes"] = current_rss_bytes()
        s["budget_bytes"] = self.budget_bytes
        s["memory_plan"] = None if self.memory_plan is None else asdict(self.memory_plan)
        s["expert_bytes"] = self.checkpoint.expert_bytes
        s["cache_slots"] = self.cache.capacity
        s["max_slots_used"] = self.cache.core.max_occupancy
        s["io"] = self.store.io_effective
        s["miss_copy"] = None if self.miss_copy is None else {
            "model": str(self.miss_copy.model_dir), "precision": self.miss_copy.precision, "expert_bytes": self.miss_copy.expert_bytes}
        s["cache_policy"] = self.config.cache_policy
        s["prefetch"] = self.config.prefetch
        s["routing"] = self.config.routing
        s["half_matmul"] = self.config.half_matmul
        s["half_kernel"] = gemm.kernel_name(self.model.dtype)  # which code computes bf16/fp16 products
        s["decode_step"] = self.decode_step
        s["model_build"] = "native" if isinstance(self.checkpoint.config, native.NativeConfig) else "transformers"
        s["load_seconds"] = self.load_seconds
        s["layers"] = layers
        return s

    def reset_stats(self) -> None:
        """Zero the counters (the cache's contents stay)."""
        self.stats_.reset()
        self.cache.loader.bytes_read = 0
        self.cache.core.max_occupancy = len(self.cache.core.entries)
        self._timing = {"ttft_seconds": None, "tpot_seconds": None, "tokens": 0}

    # --- generation --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ExpertCacheError("this checkpoint has no tokenizer: pass token ids instead of text")
            return encode_text(self.tokenizer, prompt)
        bad = [t for t in prompt if not _whole(t)]
        if bad:
            raise ExpertCacheError(f"token ids must be whole numbers, got {bad[0]!r}")
        ids = [int(t) for t in prompt]
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ExpertCacheError(f"token id {bad[0]} is out of range: this model's vocabulary has ids 0..{vocab - 1}")
        return ids

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | list[int],
        *,
        max_new_tokens: int = 64,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` after `prompt` with the transformers KV cache; greedy, or
        sampling at `temperature` (0: greedy) from the top-p mass, seeded by `seed`. Generation
        stops at the model's context (max_position_embeddings), with a warning."""
        check_sampling(temperature=temperature, top_p=top_p, seed=seed)
        ids = self.encode(prompt)
        if not ids:
            raise ExpertCacheError("the prompt is empty")
        if max_new_tokens < 1:
            raise ExpertCacheError("max_new_tokens must be at least 1")
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None and len(ids) >= context:
            raise ExpertCacheError(f"the prompt has {len(ids)} tokens, this model's context is {context}: shorten it")
        if context is not None and len(ids) + max_new_tokens > context:
            log.warning("stopping at the model's context: %d new tokens at most after a %d-token prompt", context - len(ids), len(ids))
            max_new_tokens = context - len(ids)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = _eos_ids(self.generation_config, self.model.config) if stop_at_eos else set()
        decoding = Decoding(self.model)
        out_ids: list[int] = []
        step_times: list[float] = []
        t0 = time.perf_counter()
        inputs = list(ids)
        for step in range(max_new_tokens):
            ts = time.perf_counter()
            logits = decoding.feed(inputs)[-1]
            nxt = _pick(logits, greedy=greedy, temperature=temperature, top_p=top_p, generator=gen)
            if step == 0:
                self._timing["ttft_seconds"] = time.perf_counter() - t0
            else:
                step_times.append(time.perf_counter() - ts)
            out_ids.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if nxt in eos:
                break
            inputs = [nxt]
        self._timing["tokens"] = len(out_ids)
        self._timing["tpot_seconds"] = sorted(step_times)[len(step_times) // 2] if step_times else None
        self._timing["tpot_mean_seconds"] = sum(step_times) / len(step_times) if step_times else None
        text = self.tokenizer.decode(out_ids) if self.tokenizer is not None else None
        return GenerationResult(text=text, token_ids=out_ids, stats=self.stats())

    def close(self) -> None:
        self.runtime.unbind()
        self.cache.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _miss_copy(ckpt: Checkpoint, dtype: torch.dtype, path: str) -> Checkpoint:
    """The --miss-copy checkpoint, checked to be a smaller copy of `ckpt`'s experts, or a one-line error."""
    low = Checkpoint.open(path, native=isinstance(ckpt.config, native.NativeConfig))  # read as the model was
    where = f"--miss-copy {path}"
    for what, mine, theirs in (("model type", ckpt.config.model_type, low.config.model_type),
                               ("sparse layers", ckpt.sparse_layers, low.sparse_layers),
                               ("experts per layer", ckpt.num_experts, low.num_experts),
                               ("hidden size", getattr(ckpt.config, "hidden_size", None), getattr(low.config, "hidden_size", None))):
        if mine != theirs:
            raise ExpertCacheError(f"{where}: its {what} ({theirs}) differs from the model's ({mine}): "
                                   "quantize the same model (expertcache quantize MODEL --bits 4 --out DIR)")
    if low.quant is None or low.expert_bytes >= ckpt.expert_bytes:
        raise ExpertCacheError(f"{where}: its experts ({low.precision}, {low.expert_bytes} bytes) are not smaller than "
                               f"the model's ({ckpt.precision}, {ckpt.expert_bytes} bytes): quantize to fewer bits "
                               "(expertcache quantize MODEL --bits 4 --out DIR)")
    if low.dtype != dtype:
        raise ExpertCacheError(f"{where}: it computes in {str(low.dtype).removeprefix('torch.')}, the model in "
                               f"{str(dtype).removeprefix('torch.')}: quantize the same checkpoint, or pass --dtype to match")
    return low


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ExpertCacheError(f"unknown dtype {name!r}: use e.g. float32, bfloat16 or float16")
    return dtype


def _whole(t) -> bool:
    try:
        return not isinstance(t, bool) and float(t).is_integer()
    except (TypeError, ValueError):
        return False


def check_sampling(*, temperature: float, top_p: float, seed: int | None) -> None:
    """The sampling rules, one line each: 0 <= temperature < inf, 0 < top_p <= 1, an integer seed."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise ExpertCacheError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ExpertCacheError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ExpertCacheError(f"seed must be a whole number, got {seed!r}")


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the model saw documents in training: after the tokenizer's BOS
    token when it defines one (a byte-level BPE tokenizer does not add it on its own). Long texts
    are the caller's to check against the context (no tokenizer length warning)."""
    try:
        ids = list(tokenizer.encode(text, verbose=False))
    except TypeError:  # a tokenizer without transformers' `verbose` (nothing to silence)
        ids = list(tokenizer.encode(text))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def _eos_ids(generation_config, config) -> set[int]:
    for src in (generation_config, config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is not None:
            return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
    return set()


def _pick(logits: torch.Tensor, *, greedy: bool, temperature: float, top_p: float, generator) -> int:
    """The next token: the most likely one, or a draw from softmax(logits / temperature) cut to
    the top_p nucleus, by inverse CDF: one uniform number a token (torch.multinomial draws one
    per vocabulary entry: 10x the time at a 8k vocabulary)."""
    if greedy or temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    cdf = torch.cumsum(probs, 0)
    u = torch.rand((), generator=generator) * cdf[-1]  # in [0, total): a zero-probability token is never the first above it
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[0] - 1)


def _load_tokenizer(model_dir: Path):
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        return None
    plain = load_plain_tokenizer(model_dir)  # a plain fast tokenizer: the tokenizers library, no transformers import
    if plain is not None:
        return plain
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # a broken tokenizer should not stop id-based use
        log.warning("could not load the tokenizer in %s: %s", model_dir, e)
        return None


CONFIG_FIELDS = frozenset(f.name for f in fields(EngineConfig))


def load(model: str | Path | None = None, **options) -> Engine:
    """Load a checkpoint (None = the bundled demo model) with its experts behind a cache.
    `options` are EngineConfig fields (expert_budget, cache_policy, prefetch, io, ...) and their defaults."""
    unknown = sorted(set(options) - CONFIG_FIELDS)
    if unknown:
        raise ExpertCacheError(f"unknown option {unknown[0]!r}: load() takes {', '.join(sorted(CONFIG_FIELDS - {'model'}))}")
    return Engine(EngineConfig(model=str(model) if model is not None else None, **options))
