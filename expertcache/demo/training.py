"""Train and export the bundled demo model: a small Mixtral-family MoE trained on CPU (or, with
family "llama", a dense model of the same recipe: the parent `expertcache refactor` splits).

Owns the training recipe (tokenizer, data mixture, model shape, AdamW + warmup/cosine schedule,
router load-balancing loss), resumable checkpoints, the in-run evaluation (last-word multiple
choice accuracy, per-expert routing shares) and the export of the shipped bf16 checkpoint.
`train_demo(DemoTrainingSettings(...))` runs it; `expertcache train-demo` builds the settings.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ExpertCacheError
from . import corpus
from .settings import CHAT_TEMPLATE, EXPERTS_IMPLS, FAMILIES, RESUME_OVERRIDES, DemoTrainingSettings

logger = logging.getLogger(__name__)

EOS = corpus.SEPARATOR
STATE_FILE = "trainer_state.pt"


@dataclass
class DemoTrainingResult:
    checkpoint: Path  # out_dir/ckpt, the last checkpoint written
    step: int
    tokens_seen: int
    last_eval: dict  # the final checkpoint's evaluation (mc_acc, heldout_loss, expert shares)
    exported_to: Path | None


# ----------------------------------------------------------------------------- data


@dataclass
class Source:
    """One training stream: token ids with documents joined by EOS, and its sampling share."""

    name: str
    ids: torch.Tensor
    share: float


def training_texts(settings: DemoTrainingSettings) -> list[tuple[str, list[str], float]]:
    """(name, documents, share) for each training source; the held-out tails are excluded."""
    if settings.train_text:
        n = len(settings.train_text)
        return [(p.name, corpus.read_documents(p), 1.0 / n) for p in settings.train_text]
    sources = [("tinystories", corpus.read_documents(corpus.corpus_path(corpus.TINYSTORIES_TRAIN)), settings.tinystories_share)]
    pd_share = 1.0 - settings.tinystories_share
    if not settings.no_extra_lowercase:
        lower = corpus.corpus_path(corpus.TINYSTORIES_EXTRA_LOWER).read_text(encoding="utf-8")
        sources.append(("tinystories_lower", [s for s in lower.split("\n\n") if s.strip()], settings.lowercase_share))
        pd_share -= settings.lowercase_share
    pd = [(p.stem, corpus.split_documents(corpus.train_head(p))) for p in corpus.public_domain_files()]
    sizes = [sum(len(d) for d in docs) for _, docs in pd]
    for (name, docs), size in zip(pd, sizes):
        sources.append((name, docs, pd_share * size / sum(sizes)))
    return sources


def train_tokenizer(texts: list[list[str]], vocab_size: int, out: Path):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator((d for docs in texts for d in docs), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    fast.model_max_length = 1024
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_sources(tokenizer, texts: list[tuple[str, list[str], float]]) -> list[Source]:
    """Tokenise every source into one EOS-joined stream (EOS also before the first document)."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    out = []
    for name, docs, share in texts:
        ids: list[int] = []
        for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
            ids.append(eos)
            ids.extend(enc.ids)
        ids.append(eos)
        out.append(Source(name, torch.tensor(ids, dtype=torch.int32), share))
    total = sum(s.share for s in out)
    for s in out:
        s.share /= total
    return out


def set_shares(sources: list[Source], settings: DemoTrainingSettings) -> None:
    """Sampling shares: the TinyStories shares of the settings, the rest split by token count."""
    if settings.train_text:
        for s in sources:
            s.share = 1.0 / len(sources)
        return
    fixed = {"tinystories": settings.tinystories_share, "tinystories_lower": settings.lowercase_share}
    rest = [s for s in sources if s.name not in fixed]
    left = 1.0 - sum(fixed[s.name] for s in sources if s.name in fixed)
    for s in sources:
        s.share = fixed[s.name] if s.name in fixed else left * len(s.ids) / sum(len(r.ids) for r in rest)


def sample_batch(sources: list[Source], step: int, seed: int, batch: int, seq_len: int) -> torch.Tensor:
    """Batch ``step`` of the run: a pure function of (seed, step), so resuming needs only the step."""
    rng = random.Random(seed * 1_000_003 + step)
    rows = []
    for _ in range(batch):
        src = rng.choices(sources, weights=[s.share for s in sources])[0]
        start = rng.randrange(0, max(1, len(src.ids) - seq_len - 1))
        row = src.ids[start : start + seq_len + 1].long()
        if len(row) < seq_len + 1:  # tiny test texts: tile the stream
            row = src.ids.long().repeat(math.ceil((seq_len + 1) / len(src.ids)))[: seq_len + 1]
        rows.append(row)
    return torch.stack(rows)


# ----------------------------------------------------------------------------- model


def make_config(settings: DemoTrainingSettings, tokenizer):
    """The model's config: Mixtral (the demo MoE) or, with family "llama", the same shape dense."""
    from transformers import LlamaConfig, MixtralConfig

    eos = tokenizer.convert_tokens_to_ids(EOS)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=settings.hidden, intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=settings.tie_embeddings,
        bos_token_id=eos, eos_token_id=eos,
        pad_token_id=None,  # pad = eos lives in generation_config; as padding_idx it would freeze EOS at zero
    )  # fmt: skip
    if settings.family == "llama":
        return LlamaConfig(**common)
    return MixtralConfig(num_local_experts=settings.experts, num_experts_per_tok=settings.top_k, output_router_logits=True,
                         router_aux_loss_coef=settings.aux_coef, **common)  # fmt: skip


def is_moe(model) -> bool:
    return getattr(model.config, "num_local_experts", None) is not None


def set_experts_impl(model, impl: str) -> None:
    if not is_moe(model):
        return
    model.config._experts_implementation = impl
    for module in model.modules():
        if hasattr(module, "config") and module.config is not model.config:
            module.config._experts_implementation = impl


def param_counts(model) -> dict[str, float]:
    """Total, expert and active-per-token parameter counts."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    num_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)  # Mixtral / Qwen2-MoE
    share = cfg.num_experts_per_tok / num_experts if num_experts else 1.0
    active = total - experts + experts * share
    return {"total": total, "experts": experts, "experts_share": experts / total, "active": active}


def balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss computed per layer, then averaged (2.0 = balanced for top-2).

    transformers' Mixtral loss pools all layers' routing before balancing, which lets one layer
    send half its tokens to one expert while another layer compensates; per layer it cannot.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return torch.stack([load_balancing_loss_func((r,), num_experts, top_k) for r in router_logits]).mean()


def lr_at(settings: DemoTrainingSettings, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return settings.lr * warm * (settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cos)


def make_optimizer(model, settings: DemoTrainingSettings) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)


# ----------------------------------------------------------------------------- evaluation


def load_mc_items(limit: int) -> list[dict]:
    """The first ``limit`` items of the last-word multiple-choice set (empty without the corpus)."""
    if limit <= 0 or corpus.data_dir() is None:
        return []
    lines = corpus.corpus_path(corpus.LASTWORD_MC).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit]]


@torch.no_grad()
def mc_accuracy(model, tokenizer, items: list[dict]) -> float:
    """Multiple-choice accuracy with the one scorer every command uses (quality.choice_scores)."""
    from ..tools.quality import choice_scores

    correct = 0
    for item in items:
        scores = choice_scores(model, tokenizer, item["context"], item["choices"])
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    return correct / max(1, len(items))


def heldout_ids(tokenizer, max_tokens: int = 8192) -> torch.Tensor | None:
    """Held-out token stream: TinyStories validation head + each public-domain tail."""
    if corpus.data_dir() is None:
        return None
    eos = tokenizer.convert_tokens_to_ids(EOS)
    per = max_tokens // 6
    texts = [corpus.corpus_path(corpus.TINYSTORIES_VALID).read_text(encoding="utf-8")[:200_000]]
    texts += [corpus.heldout_tail(p) for p in corpus.public_domain_files()]
    ids: list[int] = []
    for text in texts:
        ids += [eos] + tokenizer.backend_tokenizer.encode(text[:100_000], add_special_tokens=False).ids[:per]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_stats(model, ids: torch.Tensor, seq_len: int) -> tuple[float, list[list[float]]]:
    """Held-out loss and, per layer, each expert's share of routed (token, slot) pairs (none: dense)."""
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len + 1]
    inputs, labels = x[:-1].view(n, seq_len), x[1:].reshape(n, seq_len)
    losses, counts = [], None
    for i in range(0, n, 8):
        out = model(input_ids=inputs[i : i + 8], **({"output_router_logits": True} if is_moe(model) else {}))
        losses.append(torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), labels[i : i + 8].flatten()))
        if not is_moe(model):
            continue
        k, e = model.config.num_experts_per_tok, model.config.num_local_experts
        layer_counts = torch.stack(
            [torch.bincount(r.topk(k, dim=-1).indices.flatten(), minlength=e) for r in out.router_logits]
        )
        counts = layer_counts if counts is None else counts + layer_counts
    if counts is None:
        return float(torch.stack(losses).mean()), []
    shares = (counts.float() / counts.sum(dim=1, keepdim=True)).tolist()
    return float(torch.stack(losses).mean()), shares


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, state: dict) -> Path:
    """Write OUT_DIR/ckpt atomically (model, tokenizer, optimizer, step, data position)."""
    final, tmp = run_dir / "ckpt", run_dir / "ckpt.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({**state, "optimizer": optimizer.state_dict()}, tmp / STATE_FILE)
    old = run_dir / "ckpt.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def export(ckpt: Path, out: Path) -> None:
    """Write the shipped files (bf16 safetensors, config, generation config, tokenizer) to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16)
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    eos = tokenizer.convert_tokens_to_ids(EOS)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    state_path = ckpt / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        info = {k: state[k] for k in ("step", "tokens_seen", "train_seconds", "last_eval") if k in state}
        (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600; the file is shipped
    size = (out / "model.safetensors").stat().st_size
    logger.info("exported %s -> %s (model.safetensors %.1f MB)", ckpt, out, size / 1e6)


# ----------------------------------------------------------------------------- training


def parse_end_at(value: str, now: float) -> float:
    """Epoch seconds of a UTC 'HH:MM' (today, or tomorrow if already past) or ISO time."""
    if len(value) <= 5 and ":" in value:
        hh, mm = (int(v) for v in value.split(":"))
        base = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        end = base.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if end.timestamp() <= now:
            end += dt.timedelta(days=1)
        return end.timestamp()
    end = dt.datetime.fromisoformat(value)
    if end.tzinfo is None:
        end = end.replace(tzinfo=dt.timezone.utc)
    return end.timestamp()


def prepare(settings: DemoTrainingSettings, run_dir: Path):
    """Tokenizer and token streams of the run (built once, reused on resume)."""
    tok_dir, cache = run_dir / "tokenizer", run_dir / "tokens.pt"
    texts = None
    if settings.tokenizer is not None and not (tok_dir / "tokenizer.json").exists():
        if not (Path(settings.tokenizer) / "tokenizer.json").exists():
            raise ExpertCacheError(f"--tokenizer {settings.tokenizer}: no tokenizer.json there")
        load_tokenizer(Path(settings.tokenizer)).save_pretrained(tok_dir)
    if not (tok_dir / "tokenizer.json").exists():
        texts = training_texts(settings)
        logger.info("training tokenizer (vocab %d) on %d sources", settings.vocab_size, len(texts))
        train_tokenizer([docs for _, docs, _ in texts], settings.vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    if cache.exists():
        sources = [Source(**s) for s in torch.load(cache, weights_only=False)]
    else:
        texts = texts or training_texts(settings)
        sources = encode_sources(tokenizer, texts)
        torch.save([s.__dict__ for s in sources], cache)
    set_shares(sources, settings)
    for s in sources:
        logger.info("source %-30s %9d tokens  share %.3f", s.name, len(s.ids), s.share)
    return tokenizer, sources


def evaluate(model, tokenizer, items, held, seq_len: int) -> dict:
    model.eval()
    result: dict = {}
    if items:
        result["mc_acc"] = mc_accuracy(model, tokenizer, items)
        result["mc_items"] = len(items)
    if held is not None:
        loss, shares = heldout_stats(model, held, seq_len)
        result["heldout_loss"] = loss
        if shares:
            flat = [s for layer in shares for s in layer]
            result.update(expert_share_min=min(flat), expert_share_max=max(flat))
            result["expert_share_min_max_per_layer"] = [(round(min(x), 3), round(max(x), 3)) for x in shares]
    model.train()
    return result


def train_demo(settings: DemoTrainingSettings) -> DemoTrainingResult:
    """Train (or, with `resume`, continue) the run in settings.out_dir until max_steps or end_at,
    checkpointing every save_every_min minutes and at the end; torch's thread count is restored after."""
    if settings.max_steps is None and settings.end_at is None and not settings.resume:
        raise ExpertCacheError("give --max-steps or --end-at")
    if settings.family not in FAMILIES:
        raise ExpertCacheError(f"unknown family {settings.family!r}: choose one of {', '.join(FAMILIES)}")
    if settings.experts_impl not in EXPERTS_IMPLS:
        raise ExpertCacheError(f"unknown experts implementation {settings.experts_impl!r}: choose one of {', '.join(EXPERTS_IMPLS)}")
    threads = torch.get_num_threads()
    try:
        return _train(settings)
    finally:
        torch.set_num_threads(threads)


def _train(settings: DemoTrainingSettings) -> DemoTrainingResult:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    corpus.corpus_path(corpus.TINYSTORIES_TRAIN)  # no corpus: one line, and nothing created
    run_dir = Path(settings.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "ckpt"
    resuming = settings.resume and (ckpt / STATE_FILE).exists()
    if resuming:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        saved = state.pop("args")
        saved.update({key: getattr(settings, key) for key in RESUME_OVERRIDES})
        settings = DemoTrainingSettings.from_state({**saved, "resume": True, "out_dir": run_dir})
    s = settings
    tokenizer, sources = prepare(s, run_dir)
    if resuming:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
        model.config.pad_token_id = None  # runs started before this fix had pad = eos = padding_idx
        model.model.embed_tokens.padding_idx = None
        optimizer = make_optimizer(model, s)
        optimizer.load_state_dict(state.pop("optimizer"))
        logger.info("resumed at step %d (%d tokens seen)", state["step"], state["tokens_seen"])
    else:
        model = AutoModelForCausalLM.from_config(make_config(s, tokenizer))
        optimizer = make_optimizer(model, s)
        now = time.time()
        end = parse_end_at(s.end_at, now) if s.end_at else None
        state = {"step": 0, "tokens_seen": 0, "train_seconds": 0.0, "start_time": now, "end_time": end}
    if s.end_at and s.resume:
        state["end_time"] = parse_end_at(s.end_at, state["start_time"])
    set_experts_impl(model, s.experts_impl)
    model.train()
    counts = param_counts(model)
    logger.info(
        "model: %.2fM params, experts %.1f%%, active/token %.2fM, bf16 size %.1f MB",
        counts["total"] / 1e6, 100 * counts["experts_share"], counts["active"] / 1e6, counts["total"] * 2 / 1e6,
    )
    items = load_mc_items(s.eval_items)
    held = heldout_ids(tokenizer)

    def progress() -> float:
        if state.get("end_time"):
            return (time.time() - state["start_time"]) / (state["end_time"] - state["start_time"])
        return state["step"] / max(1, s.max_steps)

    def done() -> bool:
        if s.max_steps is not None and state["step"] >= s.max_steps:
            return True
        return bool(state.get("end_time")) and time.time() >= state["end_time"]

    def checkpoint(final: bool) -> Path:
        state["last_eval"] = evaluate(model, tokenizer, items, held, s.seq_len)
        state["saved_at"] = time.time()
        path = save_checkpoint(run_dir, model, tokenizer, optimizer, {**state, "args": s.to_state()})
        logger.info("checkpoint step %d tokens %d: %s", state["step"], state["tokens_seen"], state["last_eval"])
        if s.export_to and (final or not state.get("exported")):
            export(path, s.export_to)
            state["exported"] = True
        return path

    is_tty = sys.stderr.isatty()
    bar = tqdm(initial=state["step"], total=s.max_steps, unit="step", mininterval=1 if is_tty else 30, ascii=not is_tty)
    last_save, tic, window_tokens = time.time(), time.time(), 0
    while not done():
        step = state["step"]
        lr = lr_at(s, step, progress())
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(sources, step, s.seed, s.batch_size, s.seq_len)
        t0 = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16):
            out = model(input_ids=batch[:, :-1], **({"output_router_logits": True} if is_moe(model) else {}))
            lm_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            aux_loss = (balance_loss(out.router_logits, model.config.num_local_experts, model.config.num_experts_per_tok)
                        if is_moe(model) else torch.zeros(()))  # fmt: skip
            loss = lm_loss + s.aux_coef * aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["train_seconds"] += time.time() - t0
        state["step"] += 1
        state["tokens_seen"] += batch[:, :-1].numel()
        window_tokens += batch[:, :-1].numel()
        bar.update(1)
        if state["step"] % 10 == 0 or not is_tty:
            rate = window_tokens / max(1e-9, time.time() - tic)
            lm, aux = lm_loss.item(), aux_loss.item()
            bar.set_postfix(loss=f"{lm:.3f}", aux=f"{aux:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}", refresh=False)
            if state["step"] % 100 == 0:
                logger.info("step %d loss %.3f aux %.3f lr %.2e tok/s %.0f tokens %d progress %.3f",
                            state["step"], lm, aux, lr, rate, state["tokens_seen"], progress())  # fmt: skip
                tic, window_tokens = time.time(), 0
        if time.time() - last_save >= s.save_every_min * 60:
            checkpoint(final=False)
            last_save, tic, window_tokens = time.time(), time.time(), 0
    bar.close()
    path = checkpoint(final=True)
    return DemoTrainingResult(checkpoint=path, step=state["step"], tokens_seen=state["tokens_seen"],
                              last_eval=state["last_eval"], exported_to=s.export_to)  # fmt: skip
