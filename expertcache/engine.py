"""Engine: the composition root. Builds everything an EngineConfig names and runs generation.

Loading never materialises the experts: the transformers model is built on the meta device, each
sparse-MoE block is replaced by an OffloadedMoE (keeping the model's own router and shared expert),
only then is the model allocated, and the dense tensors are read from the checkpoint. Experts are
read on demand (and ahead of time) by the ExpertCache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .cache import ExpertCache
from .checkpoint import Checkpoint
from .config import EngineConfig, parse_budget
from .errors import CheckpointError, ExpertCacheError
from .moe_block import BlockContext, FirstLayerPrefetch, OffloadedMoE
from .oracle import NAME as BELADY
from .oracle import BeladyOracle, NoFuture
from .policies import make_policy
from .predictors import make_predictor
from .routing import WeightRule, make_routing
from .stats import Stats, current_rss_bytes, peak_rss_bytes
from .store import ExpertStore

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"


def demo_model_dir() -> Path:
    """The bundled demo model's directory (shipped inside the package)."""
    if not (DEMO_DIR / "config.json").is_file():
        raise CheckpointError(f"the bundled demo model is missing from {DEMO_DIR}: pass --model DIR")
    return DEMO_DIR


@dataclass
class GenerationResult:
    text: str | None
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


def _build_model(ckpt: Checkpoint, context: BlockContext, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.activations import ACT2FN

    config = ckpt.config
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # a config transformers accepted but cannot build from (unknown activation, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt.model_dir / 'config.json'}: cannot build the model ({first})") from None
    for layer in ckpt.sparse_layers:
        block = model.model.layers[layer].mlp
        fused = next(p for (l, _), p in ckpt.experts.items() if l == layer).fused
        model.model.layers[layer].mlp = OffloadedMoE(
            layer=layer,
            gate=block.gate,
            act_fn=ACT2FN[config.hidden_act],
            fused=fused,
            context=context,
            shared_expert=getattr(block, "shared_expert", None),
            shared_expert_gate=getattr(block, "shared_expert_gate", None),
        )
    model = model.to_empty(device="cpu")
    state = ckpt.load_dense()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches: the tensors do not match config.json
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{ckpt.model_dir}: tensors do not match config.json ({detail})") from None
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise CheckpointError(f"{ckpt.model_dir}: missing tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if result.unexpected_keys:
        log.warning("ignoring %d unexpected tensors, e.g. %s", len(result.unexpected_keys), result.unexpected_keys[0])
    if tied:
        model.tie_weights()
    # non-persistent buffers (rotary inverse frequencies) were left uninitialised by to_empty
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            fresh = type(module)(config=config)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], fresh)
    model.eval()
    model.requires_grad_(False)
    return model


class Engine:
    """A loaded model whose experts live in a bounded cache fed from disk."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        t0 = time.perf_counter()
        model_dir = Path(config.model) if config.model is not None else demo_model_dir()
        self.checkpoint = ckpt = Checkpoint.open(model_dir)
        dtype = getattr(torch, config.dtype) if config.dtype else ckpt.dtype
        self.budget_bytes = parse_budget(config.expert_budget, ckpt.total_expert_bytes)
        try:
            if config.cache_policy == BELADY:  # its future is given once the cache exists (oracle.py)
                policy, partitioned = NoFuture(), False
            else:
                policy, partitioned = make_policy(config.cache_policy)
            if config.future_trace is not None and config.cache_policy != BELADY:
                raise ValueError(f"a future trace is Belady's future: it needs cache policy 'belady', not {config.cache_policy!r}")
            routing = make_routing(
                config.routing,
                rule=WeightRule(renormalize=ckpt.arch.renormalize(ckpt.config), in_logits_dtype=ckpt.arch.weights_in_logits_dtype),
                top_k=ckpt.top_k,
                layers=ckpt.sparse_layers,
                model_dir=model_dir,
                calibration=config.calibration,
                resident=lambda layer: self.cache.holding(layer),  # read when a layer routes, after the cache exists
                predicted=lambda layer: self.context.predictions.get(layer, []),
                cache_lambda=config.cache_lambda,
                cache_protect_top=config.cache_protect_top,
                cache_max_rank=config.cache_max_rank,
                applies_to=config.routing_applies_to,
            )
        except ValueError as e:
            raise ExpertCacheError(str(e)) from None
        self.stats_ = Stats()
        self.store = ExpertStore(ckpt.experts, io=config.io)
        self.cache = ExpertCache(
            store=self.store,
            budget_bytes=self.budget_bytes,
            expert_bytes=ckpt.expert_bytes,
            top_k=ckpt.top_k,
            policy=policy,
            partitioned=partitioned,
            layers=ckpt.sparse_layers,
            io_threads=config.io_threads,
            stats=self.stats_,
        )
        self.context = BlockContext(cache=self.cache, predictor=make_predictor("none"), routing=routing)
        try:
            self.model = _build_model(ckpt, self.context, dtype)
            routers = {l: self.model.model.layers[l].mlp.gate.weight for l in ckpt.sparse_layers}
            try:
                self.context.predictor = make_predictor(
                    config.prefetch,
                    routers=routers,
                    top_k=ckpt.top_k,
                    depth=config.prefetch_depth,
                    max_per_layer=config.prefetch_max,
                    model=self.model,
                    model_dir=model_dir,
                    path=config.predictor,
                )
            except ValueError as e:
                raise ExpertCacheError(str(e)) from None
            observe = getattr(self.context.predictor, "observe", None)
            if observe is not None:  # predictors that learn from what each layer routed (history, default-vector)
                self.context.observers.append(observe)
            self.oracle = BeladyOracle(self, config.future_trace) if config.cache_policy == BELADY else None
        except BaseException:
            self.cache.close()  # a failed load leaves no reader threads or open files behind
            raise
        self.context.prefetch_enabled = config.prefetch != "none"
        if ckpt.sparse_layers:
            lead = ckpt.sparse_layers[0]
            block = next((m for m in self.model.modules() if isinstance(m, OffloadedMoE) and m.layer == lead), None)
            norm = getattr(self.model.model.layers[lead], "post_attention_layernorm", None)
            first = FirstLayerPrefetch(self.context, lead, ckpt.num_experts, ckpt.top_k,
                                       router=block.gate if block is not None else None, norm=norm)
            self.model.model.layers[0].register_forward_pre_hook(first, with_kwargs=True)
        self.tokenizer = _load_tokenizer(model_dir)
        self.generation_config = getattr(self.model, "generation_config", None)
        self.load_seconds = time.perf_counter() - t0
        self._timing: dict[str, float | int | None] = {"ttft_seconds": None, "tpot_seconds": None, "tokens": 0}

    # --- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.stats_.to_dict()
        layers = s.pop("layers")
        s.update(self._timing)
        s["bytes_read"] = self.cache.loader.bytes_read
        s["hit_rate"] = s["hits"] / s["lookups"] if s["lookups"] else None
        s["peak_rss_bytes"] = peak_rss_bytes()
        s["rss_bytes"] = current_rss_bytes()
        s["budget_bytes"] = self.budget_bytes
        s["expert_bytes"] = self.checkpoint.expert_bytes
        s["cache_slots"] = self.cache.capacity
        s["max_slots_used"] = self.cache.max_occupancy
        s["io"] = self.store.io_effective
        s["cache_policy"] = self.config.cache_policy
        s["prefetch"] = self.config.prefetch
        s["routing"] = self.config.routing
        s["load_seconds"] = self.load_seconds
        s["layers"] = layers
        return s

    def reset_stats(self) -> None:
        """Zero the counters (the cache's contents stay)."""
        fresh = Stats()
        for k, v in asdict(fresh).items():
            setattr(self.stats_, k, v if k != "layers" else {})
        self.cache.loader.bytes_read = 0
        self.cache.max_occupancy = len(self.cache.core.entries)
        self._timing = {"ttft_seconds": None, "tpot_seconds": None, "tokens": 0}

    # --- generation ------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ExpertCacheError("this checkpoint has no tokenizer: pass token ids instead of text")
            return encode_text(self.tokenizer, prompt)
        ids = [int(t) for t in prompt]
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ExpertCacheError(f"token id {bad[0]} is out of range: this model's vocabulary has ids 0..{vocab - 1}")
        return ids

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
        """Generate up to `max_new_tokens` after `prompt` with the transformers KV cache.

        Cache policy belady without a future trace runs the generation twice (oracle.py): once
        under LRU to record the access stream, then under Belady; the result is the second run's."""
        kw = dict(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p, seed=seed,
                  stop_at_eos=stop_at_eos, on_token=on_token)
        if self.oracle is not None and not self.oracle.from_trace:
            return self.oracle.generate(self._generate, prompt, **kw)
        return self._generate(prompt, **kw)

    @torch.inference_mode()
    def _generate(
        self,
        prompt: str | list[int],
        *,
        max_new_tokens: int,
        greedy: bool,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop_at_eos: bool,
        on_token: Callable[[int], None] | None,
    ) -> GenerationResult:
        from transformers import DynamicCache

        ids = self.encode(prompt)
        if not ids:
            raise ExpertCacheError("the prompt is empty")
        if max_new_tokens < 1:
            raise ExpertCacheError("max_new_tokens must be at least 1")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = _eos_ids(self.generation_config, self.model.config) if stop_at_eos else set()
        past = DynamicCache(config=self.model.config)
        out_ids: list[int] = []
        step_times: list[float] = []
        t0 = time.perf_counter()
        inputs = torch.tensor([ids])
        for step in range(max_new_tokens):
            ts = time.perf_counter()
            logits = self.model(input_ids=inputs, past_key_values=past, use_cache=True, logits_to_keep=1).logits[0, -1]
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
            inputs = torch.tensor([[nxt]])
        self._timing["tokens"] = len(out_ids)
        self._timing["tpot_seconds"] = sorted(step_times)[len(step_times) // 2] if step_times else None
        self._timing["tpot_mean_seconds"] = sum(step_times) / len(step_times) if step_times else None
        text = self.tokenizer.decode(out_ids) if self.tokenizer is not None else None
        return GenerationResult(text=text, token_ids=out_ids, stats=self.stats())

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the model saw documents in training: after the tokenizer's BOS
    token when it defines one (a byte-level BPE tokenizer does not add it on its own)."""
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
    if greedy or temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _load_tokenizer(model_dir: Path):
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # a broken tokenizer should not stop id-based use
        log.warning("could not load the tokenizer in %s: %s", model_dir, e)
        return None


def load(
    model: str | Path | None = None,
    *,
    expert_budget: str | int = "50%",
    cache_policy: str | None = None,
    prefetch: str = "next-gate",
    io: str = "direct",
    io_threads: int | None = None,
    device: str = "cpu",
    **options,
) -> Engine:
    """Load a checkpoint (None = the bundled demo model) with its experts behind a cache."""
    cfg = EngineConfig(model=str(model) if model is not None else None, expert_budget=expert_budget, prefetch=prefetch, io=io, device=device)
    overrides = {k: v for k, v in {"cache_policy": cache_policy, "io_threads": io_threads}.items() if v is not None}
    cfg = replace(cfg, **overrides, **options)
    return Engine(cfg)
