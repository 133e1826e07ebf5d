"""Shared test helpers: tiny random MoE checkpoints of every supported family, the transformers
reference outputs for them, and checks of the cache's invariants after a run.

Checkpoints are written with transformers' own save_pretrained (so the on-disk layout is exactly
what a user has) and built once per session: the `checkpoint` fixture caches them by their
arguments under tmp_path_factory. The plain functions below (make_checkpoint, tiny_config,
reference_outputs, LoadRecorder, check_engine_invariants, ...) can be imported by other test files
(`from conftest import make_checkpoint`); the fixtures hand out the same things.

Everything is seeded: the same arguments give the same weights bit for bit.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

BOS, EOS, PAD = 1, 2, 0  # special ids of every tiny checkpoint (inside the tiny vocabulary)


# --------------------------------------------------------------------------------------------------
# tiny checkpoints
# --------------------------------------------------------------------------------------------------
WORDS = "the a cat dog sat ran on mat big small red blue and it was happy sad".split()


def make_word_model(directory: Path, *, num_layers: int = 2, num_experts: int = 4) -> Path:
    """A tiny top-2 Mixtral (hidden 32, seed 0) with a word-level tokenizer over WORDS ([UNK] is
    id 0, word i is id i + 1): text in, text out, for the commands that read text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    cfg = MixtralConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=16, num_hidden_layers=num_layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts, num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(directory)
    return directory


def tiny_config(
    family: str,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    norm_topk_prob: bool | None = None,
    num_layers: int = 2,
    hidden_size: int = 64,
    expert_intermediate: int = 32,
    vocab_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    decoder_sparse_step: int | None = None,
    mlp_only_layers: list[int] | None = None,
    initializer_range: float = 0.1,
    **extra,
):
    """A tiny transformers config of `family` (fp32). `norm_topk_prob=None` keeps the family's
    default; Mixtral has no such flag (it always renormalises) and refuses an explicit one.
    `decoder_sparse_step` / `mlp_only_layers` exist for the Qwen families only (dense layers)."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        num_experts_per_tok=top_k,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    qwen_dense = {}
    if decoder_sparse_step is not None:
        qwen_dense["decoder_sparse_step"] = decoder_sparse_step
    if mlp_only_layers is not None:
        qwen_dense["mlp_only_layers"] = list(mlp_only_layers)
    if qwen_dense and family not in ("qwen2_moe", "qwen3_moe"):
        raise ValueError(f"{family} has no dense MLP layers (decoder_sparse_step / mlp_only_layers are Qwen options)")
    norm = {} if norm_topk_prob is None else {"norm_topk_prob": bool(norm_topk_prob)}
    if family == "mixtral":
        if norm:
            raise ValueError("Mixtral always renormalises its top-k weights: leave norm_topk_prob=None")
        cfg = MixtralConfig(**common, intermediate_size=expert_intermediate, num_local_experts=num_experts, **extra)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **common,
            intermediate_size=3 * expert_intermediate,  # the dense layers' MLP
            moe_intermediate_size=expert_intermediate,
            shared_expert_intermediate_size=2 * expert_intermediate,
            num_experts=num_experts,
            **norm,
            **qwen_dense,
            **extra,
        )
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **common,
            head_dim=hidden_size // num_heads,
            intermediate_size=3 * expert_intermediate,
            moe_intermediate_size=expert_intermediate,
            num_experts=num_experts,
            **norm,
            **qwen_dense,
            **extra,
        )
    elif family == "olmoe":
        cfg = OlmoeConfig(**common, intermediate_size=expert_intermediate, num_experts=num_experts, **norm, **extra)
    else:
        raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")
    return cfg


def make_checkpoint(
    tmp_dir: str | os.PathLike,
    family: str,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    norm_topk_prob: bool | None = None,
    fused: bool = False,
    dtype: torch.dtype = torch.float32,
    shards: int | None = None,
    seed: int = 0,
    eos_unreachable: bool = True,
    **config_kw,
) -> Path:
    """Write a tiny random checkpoint of `family` into `tmp_dir` (created) and return it.

    fused=False: save_pretrained's default, one tensor per expert (w1/w3/w2 for Mixtral under
    block_sparse_moe, gate/up/down_proj otherwise); fused=True: transformers 5's own
    [E, 2I, H] gate_up_proj / [E, H, I] down_proj (save_original_format=False).
    shards=N: split into about N safetensors files with a model.safetensors.index.json.
    eos_unreachable: zero the EOS row of the LM head so greedy decoding never picks EOS (its logit
    is exactly 0 while the max of the other 127 random logits is positive), so a 32-token greedy
    run is the same whether or not a generator stops at EOS. config_kw go to tiny_config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(family, num_experts=num_experts, top_k=top_k, norm_topk_prob=norm_topk_prob, **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # exercise the QK-norm / RMSNorm weights too: their init (ones) would hide a missing tensor
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        if eos_unreachable:
            model.get_output_embeddings().weight[EOS].zero_()
    model = model.to(dtype)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    kwargs = {"save_original_format": not fused}
    if shards is not None and shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        kwargs["max_shard_size"] = max(1, math.ceil(total / shards))
    model.save_pretrained(out, **kwargs)
    if shards is not None and shards > 1:
        assert (out / "model.safetensors.index.json").is_file(), "save_pretrained wrote no shard index"
    return out


def checkpoint_key(family: str, **kw) -> str:
    """A directory name that identifies a make_checkpoint call."""
    parts = [family] + [f"{k}={_short(v)}" for k, v in sorted(kw.items())]
    return "-".join(parts).replace("/", "_").replace(" ", "")


def _short(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, (list, tuple)):
        return "_".join(map(str, v)) or "none"
    return str(v)


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")


def prompt_ids(n: int, *, vocab_size: int = 128, seed: int = 1234) -> list[int]:
    """A fixed random prompt of n ids, special ids excluded."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(3, vocab_size, (n,), generator=g)).tolist()


def o_direct_supported(directory: Path) -> bool:
    """Whether files under `directory` can be opened and read with O_DIRECT (ext4: yes; tmpfs: no)."""
    probe = Path(directory) / ".o_direct_probe"
    probe.write_bytes(b"\0" * 8192)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        try:
            os.preadv(fd, [buf], 0)
            return True
        except OSError:
            return False
        finally:
            buf.close()
    finally:
        os.close(fd)
        probe.unlink()


# --------------------------------------------------------------------------------------------------
# transformers reference
# --------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """What transformers' own model computes for one checkpoint and prompt."""

    logits: torch.Tensor  # [T, V] for the prompt
    generated: list[int]  # greedy continuation
    dtype: torch.dtype


def reference_model(model_dir: Path):
    """transformers.AutoModelForCausalLM.from_pretrained(dir), checked to run in the checkpoint's dtype."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    ref.eval()
    want = checkpoint_dtype(model_dir)
    assert ref.dtype == want, f"reference loaded in {ref.dtype}, checkpoint is {want}"
    return ref


@torch.no_grad()
def reference_outputs(model_dir: Path, prompt: list[int], max_new_tokens: int = 32) -> Reference:
    ref = reference_model(model_dir)
    ids = torch.tensor([prompt])
    logits = ref(input_ids=ids).logits[0]
    out = ref.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=PAD,
    )
    generated = out[0, len(prompt) :].tolist()
    assert len(generated) == max_new_tokens
    return Reference(logits=logits, generated=generated, dtype=ref.dtype)


# --------------------------------------------------------------------------------------------------
# engine checks
# --------------------------------------------------------------------------------------------------
@dataclass
class _Record:
    task: object
    priority: int  # at submit time (a prefetch may be promoted later)
    chunks: list[int] = field(default_factory=list)  # chunk indices read, in order


class LoadRecorder:
    """Records every load task an engine's loader is given and every chunk it reads, so the
    bytes-read accounting can be checked exactly. Install before running the engine."""

    def __init__(self, engine) -> None:
        self.engine = engine
        loader = engine.cache.loader
        self.records: dict[int, _Record] = {}
        self._lock = threading.Lock()
        submit_many = loader.submit_many  # loader.submit goes through it too

        def recording_submit_many(loads, priority):
            tasks = submit_many(loads, priority)
            with self._lock:
                for task in tasks:
                    self.records.setdefault(id(task), _Record(task, priority))
            return tasks

        def on_chunk(task, i):  # runs on an I/O thread, under the loader's lock
            with self._lock:
                self.records.setdefault(id(task), _Record(task, task.priority)).chunks.append(i)

        loader.submit_many = recording_submit_many
        loader.on_chunk = on_chunk

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every recorded task is finished (done, failed or cancelled)."""
        for rec in list(self.records.values()):
            assert rec.task.event.wait(timeout), f"load of {rec.task.eid} never finished"

    def check_bytes(self) -> None:
        """bytes_read == (misses + prefetch_issued - prefetch_cancelled) * expert_bytes, exactly.

        Every demand load and every prefetch reads all its chunks once, except a cancelled one,
        which reads none: Loader.cancel only succeeds on a task that has not read a chunk (a
        prefetch that yielded to a demand read between chunks is back in the queue, but cancel
        refuses it and it is read to the end). Were cancel ever to accept such a task again, its
        partial chunks would be read but its expert not; `partial` below is that excess, reported
        in the failure message."""
        from expertcache.loader import CANCELLED, DEMAND, DONE, PREFETCH

        self.drain()
        eng = self.engine
        s = eng.stats()
        store = eng.store
        recs = list(self.records.values())
        demand = [r for r in recs if r.priority == DEMAND]
        prefetch = [r for r in recs if r.priority == PREFETCH]
        cancelled = [r for r in recs if r.task.state == CANCELLED]
        assert len(demand) == s["misses"], (len(demand), s["misses"])
        assert len(prefetch) == s["prefetch_issued"], (len(prefetch), s["prefetch_issued"])
        assert len(cancelled) == s["prefetch_cancelled"], (len(cancelled), s["prefetch_cancelled"])
        assert all(r.priority == PREFETCH for r in cancelled), "a demand load was cancelled"
        partial = 0
        for r in recs:
            n_chunks = len(store.plan(r.task.eid).chunks)
            assert len(r.chunks) == len(set(r.chunks)), f"{r.task.eid}: a chunk was read twice"
            if r.task.state == DONE:
                # every chunk once; I/O threads read one expert's chunks side by side, so in any order
                assert sorted(r.chunks) == list(range(n_chunks)), f"{r.task.eid}: chunks read {r.chunks}"
            else:
                assert r.task.state == CANCELLED, f"{r.task.eid}: load ended {r.task.state}"
                partial += sum(store.plan(r.task.eid).chunks[i].payload for i in r.chunks)
        expert_bytes = eng.checkpoint.expert_bytes
        expected = (s["misses"] + s["prefetch_issued"] - s["prefetch_cancelled"]) * expert_bytes
        assert s["bytes_read"] == expected, (
            f"bytes_read {s['bytes_read']} != {expected} = (misses {s['misses']} + prefetch_issued "
            f"{s['prefetch_issued']} - prefetch_cancelled {s['prefetch_cancelled']}) * {expert_bytes}; "
            f"cancelled loads had read {partial} bytes"
        )


def check_engine_invariants(engine, recorder: LoadRecorder | None = None) -> None:
    """After a run: the cache never held more slots than it has; bytes read add up exactly; each
    cached expert is either ready or its load is accounted for."""
    cache = engine.cache
    assert cache.max_occupancy <= cache.capacity, (cache.max_occupancy, cache.capacity)
    assert len(cache.core.entries) + len(cache.core.free) == cache.capacity
    assert all(e.pins == 0 for e in cache.core.entries.values()), "an expert stayed pinned after the run"
    s = engine.stats()
    assert s["hits"] + s["misses"] == s["lookups"]
    assert s["max_slots_used"] <= s["cache_slots"]
    if recorder is not None:
        recorder.check_bytes()


def fd_flags(fd: int) -> int:
    """The open-file flags of a descriptor of this process, as the kernel reports them."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags in /proc/self/fdinfo/{fd}")


def check_io_mode(engine, io: str, direct_supported: bool) -> None:
    """io="direct" really reads through O_DIRECT descriptors where the filesystem allows it (the
    descriptors the store read with carry the flag); io="buffered" never does. Call after a run,
    before close (the store opens its files on first read)."""
    store = engine.store
    fds = list(store._fds.values())
    assert fds, "the store never opened a checkpoint file"
    if io == "direct" and direct_supported:
        assert store.io_effective == "direct"
        assert all(fd_flags(fd) & os.O_DIRECT for fd in fds), "io='direct' but a descriptor lacks O_DIRECT"
    elif io == "buffered":
        assert store.io_effective == "buffered"
        assert not any(fd_flags(fd) & os.O_DIRECT for fd in fds)


def min_budget(model_dir: Path) -> int:
    """The smallest budget the engine accepts: one layer's top-k experts."""
    from expertcache.checkpoint import Checkpoint

    ck = Checkpoint.open(model_dir)
    return ck.top_k * ck.expert_bytes


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (its module fixtures too), restored after: tiny matmuls on a shared 2-core machine only
    spin and contend with more. Test files take it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """checkpoint(family, **make_checkpoint kwargs) -> Path, built once per session per arguments."""
    root = tmp_path_factory.mktemp("ckpts")
    made: dict[str, Path] = {}
    lock = threading.Lock()

    def get(family: str, **kw) -> Path:
        key = checkpoint_key(family, **kw)
        with lock:
            if key not in made:
                made[key] = make_checkpoint(root / key, family, **kw)
            return made[key]

    return get


@pytest.fixture(scope="session")
def reference(checkpoint) -> Callable[..., Reference]:
    """reference(model_dir, prompt, max_new_tokens=32) -> Reference, computed once per session."""
    done: dict[tuple, Reference] = {}

    def get(model_dir: Path, prompt: list[int], max_new_tokens: int = 32) -> Reference:
        key = (str(model_dir), tuple(prompt), max_new_tokens)
        if key not in done:
            done[key] = reference_outputs(model_dir, prompt, max_new_tokens)
        return done[key]

    return get


@pytest.fixture(scope="session")
def direct_io_works(tmp_path_factory) -> bool:
    return o_direct_supported(tmp_path_factory.mktemp("odirect"))


GATE_TIMEOUT = 5.0  # seconds a gated read may wait before the test calls it a hang


class ReadGate:
    """Wraps store.read_chunk: each read takes a permit and blocks until one is given (release)
    or the gate is opened for good; `started` lists the reads begun, in order."""

    def __init__(self, store) -> None:
        self._real = store.read_chunk
        self._cv = threading.Condition()
        self._permits = 0
        self._open = False
        self.started: list[tuple] = []
        self.fail: dict[tuple, BaseException] = {}  # eid -> exception its reads raise
        store.read_chunk = self.read_chunk

    def read_chunk(self, eid, chunk, slot):
        with self._cv:
            self.started.append(eid)
            self._cv.notify_all()
            assert self._cv.wait_for(lambda: self._open or self._permits > 0, GATE_TIMEOUT), "read held forever"
            if not self._open:
                self._permits -= 1
        if eid in self.fail:
            raise self.fail[eid]
        self._real(eid, chunk, slot)

    def wait_started(self, n: int) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.started) >= n, GATE_TIMEOUT), f"{n} reads never started"

    def release(self, n: int = 1) -> None:
        with self._cv:
            self._permits += n
            self._cv.notify_all()

    def open(self) -> None:
        with self._cv:
            self._open = True
            self._cv.notify_all()
