"""expertcache refactor (Read-ME, arXiv 2410.19123): a dense Llama/Mistral/Qwen2-family
checkpoint becomes an MoE checkpoint that transformers loads as saved.

Each layer's FFN neurons are recorded on calibration text (|activation| x |down column|, their
contribution); the most active slice is optionally kept as an always-on shared expert; the rest
are split into E equal experts by co-activation (balanced spherical k-means over the neurons'
contribution patterns); each router is fitted by ridge regression to rank its experts by their
contribution. Experts' outputs are scaled by k and router logits kept small, so a token's k
experts start near the dense FFN restricted to their neurons (with k = E and a zero router: the
dense model itself). A distillation fine-tune from the dense model follows (resumable). Written
as Mixtral, or as Qwen2-MoE with a shared slice or attention biases.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..demo.training import param_counts
from ..errors import ExpertCacheError
from .refactor_settings import RefactorSettings

log = logging.getLogger(__name__)

SOURCE_TYPES = ("llama", "mistral", "qwen2")  # dense families whose FFN is SwiGLU gate/up/down without biases
STATE_DIR = "finetune-state"  # inside OUT while a fine-tune runs (removed when it ends)
INFO_FILE = "refactor.json"


@dataclass
class RefactorResult:
    out_dir: str
    model_type: str
    experts: int
    top_k: int
    expert_width: int
    shared_width: int
    calibration_tokens: int
    router_recall: list[float]  # per layer: fitted router's top-k against the contribution top-k (held-out rows)
    ffn_error: list[float]  # per layer: ||MoE FFN - dense FFN|| / ||dense FFN|| on held-out rows, before fine-tuning
    finetune_tokens: int = 0
    finetune_kl: float | None = None  # mean KL(dense || MoE) over the last fine-tune steps
    max_expert_share: list[float] | None = None  # per layer: the busiest expert's share of dispatches (1/E even, 1/k collapsed)
    pregate_agreement: list[float] | None = None  # per layer: the joint pre-gate's top-k against the router's, at the end
    seconds: float = 0.0
    params: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs


def load_dense(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ExpertCacheError(f"{path}: no config.json (give a dense Llama/Mistral/Qwen2-family checkpoint directory)")
    cfg = AutoConfig.from_pretrained(str(path))
    if cfg.model_type not in SOURCE_TYPES:
        raise ExpertCacheError(f"{path}: model_type {cfg.model_type!r} is not a dense family refactor splits "
                               f"({', '.join(SOURCE_TYPES)})")
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
        raise ExpertCacheError(f"{path}: FFN or output-projection biases are not supported")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExpertCacheError(f"{path}: hidden_act {cfg.hidden_act!r}: the MoE families written use SiLU experts")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise ExpertCacheError(f"{path}: no tokenizer that transformers loads ({type(e).__name__}); refactor needs one") from None
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def read_texts(paths: tuple[Path, ...]) -> list[str]:
    """The documents of text files (split on "<|endoftext|>" lines where they have them)."""
    from ..demo.corpus import split_documents

    docs: list[str] = []
    for p in paths:
        if not Path(p).is_file():
            raise ExpertCacheError(f"calibration text {p}: no such file")
        docs += split_documents(Path(p).read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise ExpertCacheError("the calibration text is empty")
    return docs


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """Documents as one stream of ids, each preceded by EOS (or BOS) where the tokenizer has one."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    ids: list[int] = []
    for d in docs:
        if sep is not None:
            ids.append(sep)
        ids += tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, tokens: int, seed: int) -> torch.Tensor:
    """[N, seq_len] windows at random offsets covering `tokens` tokens (the stream tiled if short)."""
    n = max(1, math.ceil(tokens / seq_len))
    if len(stream) < seq_len + 1:
        stream = stream.repeat(math.ceil((seq_len + 1) / max(1, len(stream))))
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(stream) - seq_len) for _ in range(n)]
    return torch.stack([stream[s : s + seq_len] for s in starts])


# ----------------------------------------------------------------------------- recording and clustering


@torch.no_grad()
def record(model, batch: torch.Tensor, progress: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the FFN inputs x [T, H] and the neurons' activations a = act(gate x) * up x [T, I]."""
    from tqdm import tqdm

    layers = model.model.layers
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    acts: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: acts[i].append(a[0].reshape(-1, a[0].shape[-1]))))
    try:
        for row in tqdm(batch.split(4), desc="recording", unit="batch", disable=not progress):
            model(input_ids=row)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(a) for a in acts]


def balanced_kmeans(features: torch.Tensor, clusters: int, iters: int, seed: int) -> list[list[int]]:
    """Split the rows of `features` [N, D] into `clusters` groups of exactly N / clusters rows by
    cosine similarity: each round assigns (row, cluster) pairs greedily by similarity under the
    groups' capacity, then moves each centroid to its members' mean. Groups come back sorted."""
    n = features.shape[0]
    size = n // clusters
    f = F.normalize(features.float(), dim=1).contiguous()
    g = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(n, generator=g)[:clusters]].clone()
    assign: list[int] = []
    for _ in range(iters):
        order = torch.argsort((f @ centroids.T).flatten(), descending=True).tolist()  # (row, cluster) pairs, best first
        new = [-1] * n
        room = [size] * clusters
        left = n
        for flat in order:
            row, c = divmod(flat, clusters)
            if new[row] >= 0 or room[c] == 0:
                continue
            new[row] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
        if new == assign:
            break
        assign = new
        onehot = F.one_hot(torch.tensor(assign), clusters).float().T  # [C, N]
        centroids = F.normalize(onehot @ f, dim=1)
    groups = [[i for i, c in enumerate(assign) if c == k] for k in range(clusters)]
    return sorted(groups, key=lambda grp: grp[0])


def fit_router(x: torch.Tensor, mass: torch.Tensor, ridge: float) -> torch.Tensor:
    """W [E, H] whose logits x W^T rank the experts as their contribution mass [T, E] does:
    ridge regression onto the per-token standardised mass."""
    z = (mass - mass.mean(1, keepdim=True)) / (mass.std(1, keepdim=True) + 1e-6)
    xd = x.double()
    gram = xd.T @ xd + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, xd.T @ z.double()).T.float()


def topk_recall(pred: torch.Tensor, true: torch.Tensor, k: int) -> float:
    p = pred.topk(k, dim=-1).indices
    t = true.topk(k, dim=-1).indices
    return float((p.unsqueeze(-1) == t.unsqueeze(-2)).any(-1).float().mean())


@dataclass
class LayerSplit:
    shared: list[int]
    experts: list[list[int]]
    router: torch.Tensor  # [E, H], scaled
    recall: float
    error: float


def routed_neurons(inter: int, s: RefactorSettings) -> int:
    """How many of an FFN's `inter` neurons go to the routed experts (the rest are shared)."""
    e = s.experts
    routed = inter - round(s.shared_fraction * inter)
    if s.shared_fraction > 0:  # the uneven rest joins the shared slice; experts a multiple of 8 wide where
        step = e * 8 if routed >= e * 8 else e  # that fits (transformers' grouped_mm wants 16-byte strides)
        routed -= routed % step
    if routed < e or routed % e:
        raise ExpertCacheError(f"an FFN of {inter} neurons does not split into {e} equal experts"
                               + ("" if s.shared_fraction > 0 else ": give --shared-fraction to keep the rest shared"))
    return routed


def split_layer(mlp, x: torch.Tensor, a: torch.Tensor, s: RefactorSettings, seed: int) -> LayerSplit:
    """One layer's shared slice, experts and router from its recorded inputs and activations."""
    inter, e = a.shape[1], s.experts
    n_shared = inter - routed_neurons(inter, s)
    down = mlp.down_proj.weight.detach().float()  # [H, I]
    contrib = a.abs() * down.norm(dim=0)  # [T, I]
    order = torch.argsort(contrib.mean(0), descending=True)
    shared = sorted(order[:n_shared].tolist())
    rest = torch.tensor(sorted(order[n_shared:].tolist()))
    groups = balanced_kmeans(contrib[:, rest].T, e, s.kmeans_iters, seed)
    experts = [rest[g].tolist() for g in groups]
    half = len(x) // 2  # fit on the first half of the rows, measure on the second
    mass = torch.stack([contrib[:, idx].sum(1) for idx in experts], dim=1)  # [T, E]
    w = fit_router(x[:half], mass[:half], s.ridge)
    recall = topk_recall(x[half:] @ w.T, mass[half:], s.top_k)
    logits = x @ w.T
    w = w * (s.logit_scale / float(logits.std().clamp_min(1e-12)))
    # the restricted FFN's error on the held-out rows, with the mixing weights the model will use
    xt, at = x[half:], a[half:]
    dense = at @ down.T
    lg = xt @ w.T
    val, ids = lg.topk(s.top_k, dim=-1)
    mix = torch.softmax(val, dim=-1) * s.top_k
    out = (at[:, shared] @ down[:, shared].T) if shared else torch.zeros_like(dense)
    for j in range(s.top_k):
        for ex in range(e):
            rows = (ids[:, j] == ex).nonzero().flatten()
            if len(rows):
                idx = experts[ex]
                out[rows] += mix[rows, j : j + 1] * (at[rows][:, idx] @ down[:, idx].T)
    error = float((out - dense).norm() / dense.norm().clamp_min(1e-12))
    return LayerSplit(shared=shared, experts=experts, router=w, recall=recall, error=error)


# ----------------------------------------------------------------------------- the MoE checkpoint


def moe_config(dense_cfg, s: RefactorSettings, expert_width: int, shared_width: int):
    from transformers import MixtralConfig, Qwen2MoeConfig

    d = dense_cfg
    common = dict(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads, num_key_value_heads=d.num_key_value_heads,
        head_dim=getattr(d, "head_dim", None) or d.hidden_size // d.num_attention_heads,
        max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters) if getattr(d, "rope_parameters", None) else None,
        tie_word_embeddings=d.tie_word_embeddings, bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id, attention_dropout=getattr(d, "attention_dropout", 0.0),
        initializer_range=d.initializer_range, num_experts_per_tok=s.top_k, output_router_logits=False,
        router_aux_loss_coef=s.aux_coef,
    )  # fmt: skip
    if common["rope_parameters"] is None:
        common.pop("rope_parameters")
    qkv_bias = d.model_type == "qwen2"
    if shared_width == 0 and not qkv_bias:
        return MixtralConfig(intermediate_size=expert_width, num_local_experts=s.experts,
                             sliding_window=getattr(d, "sliding_window", None), **common)  # fmt: skip
    return Qwen2MoeConfig(
        intermediate_size=max(shared_width, 1), moe_intermediate_size=expert_width, shared_expert_intermediate_size=shared_width,
        num_experts=s.experts, norm_topk_prob=True, qkv_bias=qkv_bias, decoder_sparse_step=1, mlp_only_layers=[],
        use_sliding_window=False, **common,
    )  # fmt: skip


def build_moe(dense, splits: list[LayerSplit], s: RefactorSettings):
    """The MoE model (float32) holding the dense model's weights split as `splits` say."""
    from transformers import AutoModelForCausalLM

    expert_width = len(splits[0].experts[0])
    shared_width = len(splits[0].shared)
    cfg = moe_config(dense.config, s, expert_width, shared_width)
    moe = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    src = dense.state_dict()
    state = moe.state_dict()
    new: dict[str, torch.Tensor] = {}
    for name in state:
        if ".mlp." not in name and name in src:
            new[name] = src[name].float()
    for i, sp in enumerate(splits):
        mlp = dense.model.layers[i].mlp
        gate, up, down = (getattr(mlp, n).weight.detach().float() for n in ("gate_proj", "up_proj", "down_proj"))
        p = f"model.layers.{i}.mlp."
        new[p + "gate.weight"] = sp.router.clone()
        new[p + "experts.gate_up_proj"] = torch.stack([torch.cat([gate[idx], up[idx]]) for idx in sp.experts])
        new[p + "experts.down_proj"] = torch.stack([down[:, idx] * s.top_k for idx in sp.experts])
        if cfg.model_type == "qwen2_moe":
            sh = sp.shared
            new[p + "shared_expert.gate_proj.weight"] = gate[sh].clone()
            new[p + "shared_expert.up_proj.weight"] = up[sh].clone()
            new[p + "shared_expert.down_proj.weight"] = down[:, sh] * 2.0  # sigmoid(0) = 1/2 halves it
            new[p + "shared_expert_gate.weight"] = torch.zeros(1, cfg.hidden_size)
    for name, t in state.items():
        if name not in new and name.endswith((".bias",)) and "self_attn" in name:
            new[name] = torch.zeros_like(t)  # a Qwen2-MoE attention bias the source has not
    missing = sorted(set(state) - set(new))
    if cfg.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing:
        raise ExpertCacheError(f"refactor: no source for {missing[:3]} (an unsupported layout)")
    moe.load_state_dict(new, strict=False)
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    moe.eval()
    return moe


def save(model, tokenizer, out: Path, dtype: torch.dtype, info: dict) -> None:
    """Write the checkpoint files into `out` in `dtype` (a temporary folder, then moved in). The
    model's weights are rounded to `dtype` in place and kept in float32 after, so a fine-tune
    continues from exactly the weights written."""
    from transformers import GenerationConfig

    tmp = out / ".writing"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype)  # save_pretrained records the dtype of the model's own parameters
    try:
        eos = tokenizer.eos_token_id
        pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos, pad_token_id=pad)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            f.replace(out / f.name)
        tmp.rmdir()
    finally:
        model.float()


# ----------------------------------------------------------------------------- fine-tune


def dispatch_balance(chosen: torch.Tensor, logits: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style balance of the routing that actually happens: the share of tokens dispatched to
    each expert (`chosen` [N, L, k], not differentiable) times the mean softmax mass `logits`
    [N, L, E] puts on it, per layer, averaged: k for an even spread, E when a layer sends every token
    to the same k experts.

    Without it a jointly trained pre-gate and the routers pulled toward it agree most cheaply by
    collapsing each layer onto a few experts (easy to predict, 2 of 8 experts used in a layer):
    the balance loss on each router's own top-k does not see the dispatch, and at 0.01 it is too weak."""
    share = F.one_hot(chosen, num_experts).float().mean(0)  # [L, k, E]
    mass = torch.softmax(logits.float(), dim=-1).mean(0)  # [L, E]
    return num_experts * (share * mass[:, None, :]).sum((-1, -2)).mean()


def expert_shares(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, E]: each expert's share of a layer's dispatched (token, slot) pairs; 1/E when even."""
    return F.one_hot(chosen, num_experts).float().mean((0, 2))


class PregateRouters:
    """While fine-tuning with a pre-gate: every layer's router sends each token to the experts the
    pre-gate chose for it (`chosen` [N, L, k]), weighted by the router's own softmax over them,
    renormalised: what `--routing pregate` computes at inference. Restores the routers on exit."""

    def __init__(self, model) -> None:
        self.routers = [layer.mlp.gate for layer in model.model.layers]
        self.chosen: torch.Tensor | None = None

    def __enter__(self) -> "PregateRouters":
        for i, router in enumerate(self.routers):
            router.forward = self._forward(i, router)
        return self

    def __exit__(self, *exc) -> None:
        for router in self.routers:
            router.__dict__.pop("forward", None)

    def _forward(self, i: int, router):
        def forward(hidden_states: torch.Tensor):
            h = hidden_states.reshape(-1, router.weight.shape[1])
            logits = F.linear(h, router.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            ids = self.chosen[:, i]
            w = probs.gather(1, ids)
            return logits, w / w.sum(dim=-1, keepdim=True), ids

        return forward


def warm_pregate(model, stream: torch.Tensor, s: RefactorSettings, progress: bool) -> dict[str, torch.Tensor]:
    """A pre-gate distilled from the MoE's own routers on calibration windows (as train-predictor
    --kind pregate fits one): the joint fine-tune starts from it, so its first steps route sensibly."""
    from ..predictors.pregate import DEFAULT_WIDTH
    from .predictor_training import fit_pregate
    from .settings import TrainSettings

    cfg = model.config
    batch = windows(stream, s.seq_len, s.calibration_tokens, s.seed + 2)
    inputs, logits = [], {i: [] for i in range(cfg.num_hidden_layers)}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rows in batch.split(8):
            out = model(input_ids=rows, output_router_logits=True)
            inputs += list(model.get_input_embeddings()(rows).float())
            for i, lg in enumerate(out.router_logits):
                logits[i].append(lg.float())
    model.train(was_training)
    logits = {i: torch.cat(v) for i, v in logits.items()}
    ids = {i: v.topk(cfg.num_experts_per_tok, dim=-1).indices for i, v in logits.items()}
    state, _ = fit_pregate(inputs, logits, ids, cfg.num_experts_per_tok,
                           TrainSettings(steps=2000, width=DEFAULT_WIDTH, attn=s.pregate_attn), progress=progress)  # fmt: skip
    return state


def pregate_artefact(net, model, out: Path, tokens: int, agreement: list[float]):
    from ..predictors.artefact import Artefact

    cfg = model.config
    e = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    return Artefact(kind="pregate", model=str(out), sparse_layers=list(range(cfg.num_hidden_layers)), num_experts=int(e),
                    hidden_size=int(cfg.hidden_size), top_k=int(cfg.num_experts_per_tok), depths=[],
                    tensors={k: v.detach().clone() for k, v in net.state_dict().items()},
                    meta={"tokens": tokens, "window": net.window, "decays": list(net.decays), "attn": net.attn, "heads": net.heads, "joint": True,
                          "validation": {f"l{i}": {"val_recall": round(a, 4)} for i, a in enumerate(agreement)}})  # fmt: skip


def finetune(student, teacher, stream: torch.Tensor, s: RefactorSettings, state_dir: Path, progress: bool) -> dict:
    """Distil the dense model into the MoE: KL(teacher || student) on every position plus the
    per-layer balance loss; AdamW, 5% warmup then cosine to 10%; state saved every save_every_min
    minutes to `state_dir` (resumed from there). With s.pregate a PregateNet is trained alongside
    and routes the MoE (PregateRouters): it learns the routers' top-k, each router is pulled toward
    its choice (align_coef), and what it dispatches is balanced (pregate_balance, dispatch_balance).
    Returns {"tokens", "kl", "max_share" (per layer, the busiest expert's share of the dispatches
    over the last 10% of steps)} and, with a pre-gate, "pregate" (the net)
    and "agreement" (per layer, the pre-gate's top-k against the router's over the last 10% of steps)."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from ..demo.training import Source, balance_loss, sample_batch
    from ..predictors.pregate import DEFAULT_DECAYS, DEFAULT_WIDTH, DEFAULT_WINDOW, PregateNet

    per_step = s.batch_size * s.seq_len
    steps = max(1, math.ceil(s.finetune_tokens / per_step))
    cfg = student.config
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    k, layers = cfg.num_experts_per_tok, cfg.num_hidden_layers
    groups = [{"params": list(student.parameters()), "lr": s.lr}]
    net = None
    if s.pregate:
        torch.manual_seed(s.seed)
        net = PregateNet(cfg.hidden_size, DEFAULT_WINDOW, layers, num_experts, width=DEFAULT_WIDTH, decays=DEFAULT_DECAYS,
                         attn=s.pregate_attn)
        groups.append({"params": list(net.parameters()), "lr": s.pregate_lr})
    opt = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, kls, agree, shares = 0, [], [], []
    resuming = (state_dir / "trainer_state.pt").is_file()
    if net is not None and not resuming:  # start from the routers' choices, not at random
        net.load_state_dict(warm_pregate(student, stream, s, progress))
    if resuming:
        saved = torch.load(state_dir / "trainer_state.pt", map_location="cpu", weights_only=False)
        student.load_state_dict(saved["model"])
        if net is not None:
            net.load_state_dict(saved["pregate"])
        opt.load_state_dict(saved["optimizer"])
        step, kls, agree, shares = saved["step"], saved["kls"], saved.get("agree", []), saved.get("shares", [])
        log.info("fine-tune resumed at step %d of %d", step, steps)
    sources = [Source("calibration", stream.to(torch.int32), 1.0)]
    warm = max(1, steps // 20)
    student.train()
    last_save = time.time()
    is_tty = sys.stderr.isatty()
    bar = tqdm(initial=step, total=steps, unit="step", desc="fine-tune", disable=not progress,
               mininterval=1 if is_tty else 30, ascii=not is_tty)  # fmt: skip

    def checkpoint() -> None:
        tmp = state_dir / "trainer_state.pt.tmp"
        body = {"model": student.state_dict(), "optimizer": opt.state_dict(), "step": step, "kls": kls, "agree": agree, "shares": shares}
        if net is not None:
            body["pregate"] = net.state_dict()
        torch.save(body, tmp)
        tmp.replace(state_dir / "trainer_state.pt")

    routers = PregateRouters(student) if net is not None else nullcontext()
    with routers:
        while step < steps:
            frac = step / steps
            factor = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g, base in zip(opt.param_groups, (s.lr, s.pregate_lr)):
                g["lr"] = base * factor
            batch = sample_batch(sources, step, s.seed + 1, s.batch_size, s.seq_len)[:, :-1]
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(input_ids=batch).logits.float(), dim=-1)
            if net is not None:
                scores = net.score(student.get_input_embeddings()(batch).detach())[0]  # [N, L, E]
                routers.chosen = scores.detach().topk(k, dim=-1).indices
            out = student(input_ids=batch, output_router_logits=True)
            in_tail = step >= steps - max(1, steps // 10)  # the last 10% of steps: agreement and shares recorded
            s_logp = F.log_softmax(out.logits.float(), dim=-1)
            kl = F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
            loss = kl + s.aux_coef * balance_loss(out.router_logits, num_experts, k)
            if net is not None:
                r_logits = torch.stack([r.float() for r in out.router_logits], dim=1)  # [N, L, E]
                r_top = r_logits.detach().topk(k, dim=-1).indices
                hard = torch.zeros_like(r_logits).scatter_(-1, r_top, 1.0 / k)  # the routers' own top-k
                pg = -(hard * F.log_softmax(scores, dim=-1)).sum(-1).mean()
                mine = torch.zeros_like(r_logits).scatter_(-1, routers.chosen, 1.0 / k)
                align = -(mine * F.log_softmax(r_logits, dim=-1)).sum(-1).mean()
                spread = dispatch_balance(routers.chosen, scores, num_experts) + dispatch_balance(routers.chosen, r_logits, num_experts)
                loss = loss + pg + s.align_coef * align + s.pregate_balance * spread
                if in_tail:
                    agree.append([float((routers.chosen[:, i, :, None] == r_top[:, i, None, :]).any(-1).float().mean())
                                  for i in range(layers)])  # fmt: skip
            if in_tail:  # who gets the tokens
                dispatched = routers.chosen if net is not None else torch.stack(out.router_logits, 1).topk(k, dim=-1).indices
                shares.append(expert_shares(dispatched, num_experts))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            kls.append(kl.item())
            bar.update(1)
            bar.set_postfix(kl=f"{kl.item():.3f}", lr=f"{s.lr * factor:.2e}", refresh=False)
            if time.time() - last_save >= s.save_every_min * 60:
                checkpoint()
                last_save = time.time()
    bar.close()
    student.eval()
    tail = kls[-max(1, len(kls) // 10) :]
    result = {"tokens": steps * per_step, "kl": sum(tail) / len(tail), "max_share": torch.stack(shares).mean(0).amax(-1).tolist() if shares else []}
    if net is not None:
        result["pregate"] = net.eval()
        result["agreement"] = [sum(a[i] for a in agree) / max(1, len(agree)) for i in range(layers)]
    return result


# ----------------------------------------------------------------------------- the command


def refactor(dense_dir: str | Path, out_dir: str | Path, settings: RefactorSettings, *, progress: bool = True) -> RefactorResult:
    """Split DENSE into an MoE written to OUT (see the module docstring); OUT must be new or empty
    (or hold this refactor's unfinished fine-tune, with settings.resume)."""
    from ..predictors.pregate import check_attn

    s = settings
    t0 = time.perf_counter()
    dense_dir, out = Path(dense_dir), Path(out_dir)
    if s.experts < 2 or not 1 <= s.top_k <= s.experts:
        raise ExpertCacheError(f"--experts {s.experts} --top-k {s.top_k}: need 2 <= experts and 1 <= top-k <= experts")
    if not 0.0 <= s.shared_fraction < 1.0:
        raise ExpertCacheError(f"--shared-fraction {s.shared_fraction}: give a share in [0, 1)")
    check_attn(s.pregate_attn, "--pregate-attn")
    if s.pregate and s.finetune_tokens <= 0:
        raise ExpertCacheError("--pregate trains the pre-gate in the fine-tune: give --finetune-tokens too")
    if not s.calibration:
        raise ExpertCacheError("give --calibration TEXT (a text file the dense model's activations are recorded on)")
    if out.resolve() == dense_dir.resolve():
        raise ExpertCacheError("--out must be a new directory, not the dense checkpoint")
    resuming = s.resume and (out / STATE_DIR / "trainer_state.pt").is_file()
    if out.exists() and any(out.iterdir()) and not resuming:
        raise ExpertCacheError(f"{out} exists and is not empty (give a new --out, or --resume an unfinished fine-tune there)")
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        docs = read_texts(s.calibration)
        ft_docs = read_texts(s.finetune_text) if s.finetune_text and s.finetune_tokens > 0 else None
        dense, tokenizer = load_dense(dense_dir)
        routed_neurons(dense.config.intermediate_size, s)  # refuse an uneven split before any work
        src_dtype = _saved_dtype(dense_dir)
        stream = token_stream(tokenizer, docs)
        batch = windows(stream, s.seq_len, s.calibration_tokens, s.seed)
        xs, acts = record(dense, batch, progress)
        splits = []
        for i, (x, a) in enumerate(zip(xs, acts)):
            splits.append(split_layer(dense.model.layers[i].mlp, x, a, s, s.seed + i))
            log.info("layer %d: router recall %.3f, FFN error %.3f", i, splits[-1].recall, splits[-1].error)
        del xs, acts
        moe = build_moe(dense, splits, s)
        result = RefactorResult(
            out_dir=str(out), model_type=moe.config.model_type, experts=s.experts, top_k=s.top_k,
            expert_width=len(splits[0].experts[0]), shared_width=len(splits[0].shared), calibration_tokens=batch.numel(),
            router_recall=[round(sp.recall, 4) for sp in splits], ffn_error=[round(sp.error, 4) for sp in splits],
            params={k: int(v) for k, v in param_counts(moe).items() if k != "experts_share"},
        )  # fmt: skip
        info = {"source": str(dense_dir), "settings": _plain(asdict(s)), "result": asdict(result),
                "experts": [{"shared": sp.shared, "experts": sp.experts} for sp in splits]}  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            save(moe, tokenizer, out, src_dtype, info)  # a usable checkpoint before any fine-tune
        if s.finetune_tokens > 0:
            state_dir = out / STATE_DIR
            state_dir.mkdir(exist_ok=True)
            ft_stream = token_stream(tokenizer, ft_docs) if ft_docs else stream
            ft = finetune(moe, dense, ft_stream, s, state_dir, progress)
            result.finetune_tokens, result.finetune_kl = ft["tokens"], round(ft["kl"], 4)
            result.max_expert_share = [round(x, 4) for x in ft["max_share"]]
            if "pregate" in ft:
                result.pregate_agreement = [round(a, 4) for a in ft["agreement"]]
                pregate_artefact(ft["pregate"], moe, out, ft["tokens"], ft["agreement"]).save(out / "predictor-pregate.pt")
        result.seconds = time.perf_counter() - t0
        info["result"] = asdict(result)
        if s.finetune_tokens > 0:
            save(moe, tokenizer, out, src_dtype, info)
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        else:
            (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return result
    finally:
        torch.set_num_threads(threads)


def _saved_dtype(path: Path) -> torch.dtype:
    """The dtype the dense checkpoint was saved in (config.json), float32 where it says none."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name, torch.float32) if isinstance(name, str) else torch.float32


def _plain(d: dict) -> dict:
    return {k: ([str(x) for x in v] if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v) for k, v in d.items()}
