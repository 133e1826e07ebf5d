"""Quantized experts: `expertcache quantize` writes compressed-tensors' pack-quantized format, and
the engine computes on those bytes what transformers' own model computes on the same checkpoint.

The reference: transformers loading the quantized directory itself (with compressed-tensors) for
the families it loads that way; for the others, transformers loading a copy whose weights
compressed-tensors' own unpacking dequantized. Logits match at the kernels' tolerance and the 32
greedy tokens are the same at the minimum budget, 50% and 100%. Bad quantized checkpoints are one
line each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import expertcache
from expertcache.checkpoint import Checkpoint
from expertcache.errors import ExpertCacheError
from expertcache.qformat import Scheme, SchemeError, read_schemes
from expertcache import kernels
from expertcache.quant import DEQUANT, INT4_TILES, INT8_CHANNEL, NATIVE, QuantExperts, dequantize, kernel_for, pack, quantize, unpack
from expertcache.tools.quantize import quantize_checkpoint

from helpers.checkpoints import FAMILY_CASES
from helpers.compare import NEW_TOKENS, PROMPT, run_and_compare
from helpers.reference import reference_model, reference_outputs
from helpers.invariants import LoadRecorder, check_engine_invariants, check_io_mode, min_budget

ct = pytest.importorskip("compressed_tensors", reason="the reference unpacks with compressed-tensors (pip install .[test])")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# families transformers loads a pack-quantized checkpoint of itself (5.23 with compressed-tensors
# 0.20); for the others (dense leading layers, Mamba layers) it fails inside compressed-tensors
DIRECT = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FAMILIES = (*DIRECT, "deepseek_v3", "jamba", "minimax")
SCHEMES = {"int8": (8, 0), "int4-g32": (4, 32), "int4-g64": (4, 64)}


def _source(checkpoint, family: str, **kw) -> Path:
    case = {**FAMILY_CASES[family], "expert_intermediate": 64, **kw}  # every group size divides 64; 64 rows tile by 32
    return checkpoint(family, **case)


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    made: dict[tuple, Path] = {}

    def get(family: str, scheme: str, dense: str = "keep", **kw) -> Path:
        key = (family, scheme, dense, tuple(sorted(kw.items())))
        if key not in made:
            bits, g = SCHEMES[scheme]
            out = tmp_path_factory.mktemp("quantized") / f"{family}-{scheme}-{dense}"
            quantize_checkpoint(_source(checkpoint, family, **kw), out, bits=bits, group_size=g, dense=dense, progress=False)
            made[key] = out
        return made[key]

    return get


def dequantized_copy(qdir: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """The checkpoint with every packed weight dequantized by compressed-tensors' own unpacking
    (value * scale in the scale's dtype, as its decompressor computes), saved unquantized; with
    `dtype`, every floating tensor is cast to it and the product taken in it."""
    from safetensors.torch import load_file, save_file

    config = json.loads((qdir / "config.json").read_text())
    config.pop("quantization_config")
    tensors = load_file(qdir / "model.safetensors")
    plain = {}
    for name, t in tensors.items():
        if name.endswith(".weight_packed"):
            base = name[: -len("_packed")]
            shape = torch.Size(tensors[base + "_shape"].tolist())
            scale = tensors[base + "_scale"]
            bits = 4 if t.shape[1] == -(-shape[1] * 4 // 32) else 8  # experts and dense weights may differ
            q = unpack_from_int32(t, bits, shape)
            g = shape[1] // scale.shape[1]
            scale = scale.to(dtype or scale.dtype)
            q = q.to(scale.dtype)
            if base + "_zero_point" in tensors:
                zp = unpack_from_int32(tensors[base + "_zero_point"], bits, torch.Size((shape[0], scale.shape[1])), packed_dim=0)
                q = q - zp.to(scale.dtype).repeat_interleave(g, dim=1)
            plain[base] = q * scale.repeat_interleave(g, dim=1)
        elif not name.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
            plain[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    out.mkdir()
    for p in qdir.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != "config.json":
            shutil.copy2(p, out / p.name)
    (out / "config.json").write_text(json.dumps(config))
    save_file(plain, out / "model.safetensors", metadata={"format": "pt"})
    return out


# --- the format and the kernels ------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("width", [64, 62, 30, 7])
def test_packing_is_compressed_tensors_packing(bits, width):
    q = torch.randint(-(1 << bits - 1), 1 << bits - 1, (5, width), dtype=torch.int8)
    packed = pack(q, bits)
    assert torch.equal(packed, pack_to_int32(q, bits))
    assert torch.equal(unpack(packed, bits, width).to(torch.int8), unpack_from_int32(packed, bits, torch.Size((5, width))))


KERNEL_CASES = [  # (scheme, [out, in], kernel, whether expertcache's own kernel may run)
    (Scheme(8, None), (64, 128), INT8_CHANNEL, False), (Scheme(4, 32), (64, 128), INT4_TILES, False),
    (Scheme(4, 128), (32, 256), INT4_TILES, False), (Scheme(8, 32), (64, 128), DEQUANT, False),
    (Scheme(4, 64), (48, 128), DEQUANT, False), (Scheme(4, None), (64, 128), DEQUANT, False),
    (Scheme(8, None), (64, 128), NATIVE, True), (Scheme(8, 32), (48, 96), NATIVE, True), (Scheme(4, 32), (40, 128), NATIVE, True),
    (Scheme(4, 64), (64, 192), NATIVE, True), (Scheme(4, None), (33, 80), NATIVE, True), (Scheme(8, None), (16, 34), DEQUANT, True),
]


@pytest.mark.parametrize("scheme,shape,kernel,native", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_compute_the_dequantized_linear(scheme, shape, kernel, native, dtype):
    if native and not kernels.available():
        pytest.skip("expertcache's CPU kernels did not build here (no compiler, or not x86-64 AVX2)")
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    packed, scale = quantize(w, scheme, dtype)
    weight = dequantize(packed, scale, scheme, shape)
    rel = float((weight.float() - w).norm() / w.norm())
    assert rel < (0.01 if scheme.bits == 8 else 0.12)  # a quantization, not noise
    q = QuantExperts(scheme, (shape,), native=native)
    assert q.kernels == (kernel,) and kernel_for(scheme, shape, native=native) == kernel
    parts = (packed.view(torch.uint8).view(shape[0], -1).clone(), scale)
    q.prepare(parts)
    x = torch.randn(7, shape[1], dtype=dtype)  # a block of four tokens and three more (qmm.cpp)
    want = torch.nn.functional.linear(x, weight.to(dtype))
    torch.testing.assert_close(q.linear(x, parts, 0), want, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))


def test_bf16_products_of_up_to_32_rows_stay_in_qmm_where_it_takes_the_tiles():
    """Where qmm multiplies on AMX tiles (a symmetric scheme, groups of 32 inputs or more), a quantized
    expert's bf16 product of 16 to 32 rows stays in qmm (the tiles' cost hardly grows with the rows:
    ~2.5x faster than dequantizing for torch's GEMM at 16 rows), zero points or not; more rows,
    float32 or no tiles (the kernels' switch off) go to dq and torch's GEMM, as before."""
    if not kernels.available() or not torch.ops.expertcache.qmm_tile_rows(4, 256, 64):
        pytest.skip("no AMX tiles here (or no kernels): from 16 rows a product is dequantized")
    shapes = ((128, 256), (128, 256), (256, 128))
    tiled = QuantExperts(Scheme(4, 64), shapes)
    assert tiled.tile_rows == (32, 32, 32)
    rows = lambda n: torch.zeros(n, 256, dtype=torch.bfloat16)  # noqa: E731
    assert not tiled._dense(rows(16), 0) and not tiled._dense(rows(32), 0)
    assert tiled._dense(rows(33), 0)
    assert tiled._dense(torch.zeros(48, 256), 0)  # float32: its own threshold, no tiles
    assert QuantExperts(Scheme(4, 32), shapes).tile_rows == (32, 32, 32)  # int4 groups of 32: chunks of 16 bytes
    asym = QuantExperts(Scheme(4, 64, symmetric=False), shapes)
    assert asym.tile_rows == (32, 32, 32) and not asym._dense(rows(16), 0)  # zero points: each row's own offsets
    was = torch.ops.expertcache.qmm_tiles(0)
    try:
        assert QuantExperts(Scheme(8, None), shapes).tile_rows == (0, 0, 0)
    finally:
        torch.ops.expertcache.qmm_tiles(was)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 64, True), (4, 32, True), (8, None, True), (4, 32, False), (8, None, False)])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_glu_expert_is_the_experts_chain_bit_for_bit(bits, group, symmetric, tokens):
    """glu_expert (a silu-gated expert in one kernel call) gives the bits of the chain expert_output
    runs otherwise: qmm on gate and up, silu(gate) * up, qmm on down; and expert_output takes it for
    a decode step's rows."""
    if not kernels.available():
        pytest.skip("no kernels here: experts take torch's products")
    from torch import nn
    from transformers.integrations.moe import _default_apply_gate

    from expertcache import experts

    torch.manual_seed(5)
    H, I = 256, 192
    shapes = ((I, H), (I, H), (H, I))
    parts = []
    for out, inner in shapes:
        _, scale, packed, zeros, _ = _random_packed(out, inner, bits, group, symmetric, torch.bfloat16, 0.02)
        parts += [packed, scale, *zeros]
    quant = QuantExperts(Scheme(bits, group, symmetric=symmetric), shapes)
    x = torch.randn(tokens, H).bfloat16()
    g = group or H
    z = (lambda i: [parts[3 * i + 2]]) if not symmetric else (lambda i: [])
    per = 2 if symmetric else 3
    gu = torch.ops.expertcache.qmm(x, [parts[0], parts[per]], [parts[1], parts[per + 1]], z(0) + z(1), bits, g)
    gate, up = gu.chunk(2, dim=-1)
    want = torch.ops.expertcache.qmm(torch.nn.functional.silu(gate) * up, [parts[2 * per]], [parts[2 * per + 1]], z(2), bits,
                                     group or I)
    got = torch.ops.expertcache.glu_expert(x, parts, bits, group or 0)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))

    class Experts(nn.Module):  # what expert_output reads of an experts module: transformers' default gate, a plain SiLU
        _apply_gate = _default_apply_gate
        has_post_expert_norm, is_transposed, has_bias = False, False, False
        act_fn = nn.SiLU()

    seen = []
    real = torch.ops.expertcache.glu_expert
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experts.torch.ops.expertcache, "glu_expert", lambda *a: seen.append(1) or real(*a))
        y = experts.expert_output(Experts(), x, tuple(parts), 0, quant)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)) and seen == [1]


def test_bf16_glu_expert_is_the_experts_chain_bit_for_bit():
    """The bf16 form (amm on gate and up, silu(gate) * up, amm on down) gives expert_output's bits."""
    if not kernels.available() or not torch.ops.expertcache.amx():
        pytest.skip("no AMX here: bf16 experts take torch's products")
    from expertcache import gemm

    torch.manual_seed(6)
    gate, up, down = (torch.randn(192, 256) * 0.05).bfloat16(), (torch.randn(192, 256) * 0.05).bfloat16(), (torch.randn(256, 192) * 0.05).bfloat16()
    for tokens in (1, 4):
        x = torch.randn(tokens, 256).bfloat16()
        assert gemm.amm_expert(x, gate, up, down)
        g, u = gemm.linear_pair(x, gate, up)
        want = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, down)
        got = torch.ops.expertcache.glu_expert(x, [gate, up, down], 16, 0)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert not gemm.amm_expert(torch.randn(1, 256).bfloat16(), gate, up, down.float())


def test_quantized_weights_are_nearer_than_plain_rounding():
    """The scale search beats absmax scaling in squared error (int4, where it matters)."""
    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.02
    w[0, 0] = 0.3  # an outlier, as trained weights have
    s = Scheme(4, 64)
    packed, scale = quantize(w, s, torch.float32)
    err = (dequantize(packed, scale, s, w.shape) - w).pow(2).sum()
    top = w.view(64, 4, 64).abs().amax(-1, keepdim=True) / 7
    plain = (torch.clamp(torch.round(w.view(64, 4, 64) / top), -8, 7) * top).view_as(w)
    assert err < 0.95 * (plain - w).pow(2).sum()


# --- the engine against transformers --------------------------------------------------------------
@pytest.mark.parametrize("budget", ["min", "50%", "100%"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_checkpoint_matches_transformers(family, scheme, budget, quantized, tmp_path, direct_io_works):
    qdir = quantized(family, scheme)
    ref_dir = qdir if family in DIRECT else dequantized_copy(qdir, tmp_path / "dequantized")
    ref = _reference(ref_dir)
    stats = run_and_compare(qdir, ref, budget=budget, prefetch="next-gate", io="direct", direct_io_works=direct_io_works)
    assert stats["expert_bytes"] == Checkpoint.open(qdir).expert_bytes


@pytest.mark.parametrize("family,dense", [("mixtral", "int8"), ("qwen2_moe", "int8"), ("deepseek_v3", "int8"), ("mixtral", "int4"),
                                          ("qwen2_moe", "int4")])
def test_dense_quantized_matches_transformers(family, dense, quantized, tmp_path, direct_io_works):
    """quantize --dense int8 / int4: attention, shared experts, dense MLP layers and the head int8
    (or int4 in the experts' groups of 64, one config group with them) too, kept packed in memory and
    computed by the kernel (routers kept)."""
    qdir = quantized(family, "int4-g64", dense=dense)
    ckpt = Checkpoint.open(qdir)
    names = set(ckpt.dense_quantized)
    want = Scheme(8, None) if dense == "int8" else Scheme(4, 64)
    assert {q.scheme for q in ckpt.dense_quantized.values()} == {want}
    groups = json.loads((qdir / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == (2 if dense == "int8" else 1)
    assert "lm_head.weight" in names and any("self_attn" in n for n in names)
    assert not any(n.endswith(".mlp.gate.weight") for n in names)  # routers stay as saved
    if family == "qwen2_moe":
        assert any(".shared_expert." in n for n in names)
    ref_dir = qdir if family in DIRECT else dequantized_copy(qdir, tmp_path / "dequantized")
    run_and_compare(qdir, _reference(ref_dir), budget="50%", prefetch="next-gate", io="direct", direct_io_works=direct_io_works)
    if kernels.available():
        from expertcache.quant import QuantLinear

        with expertcache.load(qdir, expert_budget="100%") as eng:
            assert isinstance(eng.model.lm_head, QuantLinear)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_torch_kernels_match_transformers_too(scheme, quantized, monkeypatch, direct_io_works):
    """Without expertcache's own kernel (no compiler): torch's int8 / int4 kernels on the bytes
    repacked at load."""
    monkeypatch.setattr(kernels, "available", lambda: False)
    qdir = quantized("qwen3_moe", scheme)
    with expertcache.load(qdir, expert_budget="100%") as eng:
        assert set(eng.checkpoint.quant.kernels) == {INT8_CHANNEL if scheme == "int8" else INT4_TILES}
    run_and_compare(qdir, _reference(qdir), budget="50%", prefetch="next-gate", io="direct", direct_io_works=direct_io_works)


_REFS: dict[str, object] = {}


def _reference(model_dir: Path):
    if str(model_dir) not in _REFS:
        _REFS[str(model_dir)] = reference_outputs(model_dir, PROMPT, NEW_TOKENS)
    return _REFS[str(model_dir)]


@torch.no_grad()
def test_bf16_quantized_is_as_near_the_exact_model_as_transformers(quantized, tmp_path):
    """bf16: the kernels multiply value by scale in float32 where transformers rounds each
    dequantized weight to bf16 first, so the two differ by bf16 rounding, which 72 positions of
    attention in bf16 amplify. Against the exact model (the same quantized weights, dequantized and
    run in float32), the engine's logits over the reference's own greedy tokens are at least as
    near as transformers' bf16 model's are."""
    for scheme in ("int8", "int4-g64"):
        qdir = quantized("qwen3_moe", scheme, dtype=torch.bfloat16)
        ids = torch.tensor([PROMPT + _reference(qdir).generated])
        want = reference_model(qdir)(input_ids=ids).logits[0].float()
        exact = dequantized_copy(qdir, tmp_path / scheme, dtype=torch.float32)
        truth = reference_model(exact)(input_ids=ids).logits[0]
        with expertcache.load(qdir, expert_budget="50%", prefetch="next-gate") as eng:
            got = eng.model(input_ids=ids).logits[0].float()
        ours, theirs = (got - truth).abs().mean(), (want - truth).abs().mean()
        assert ours <= 1.25 * theirs, (scheme, float(ours), float(theirs))
        assert (got.argmax(-1) == truth.argmax(-1)).float().mean() >= (want.argmax(-1) == truth.argmax(-1)).float().mean() - 0.03


def test_quantize_shrinks_experts_and_keeps_the_rest(checkpoint, quantized):
    src = _source(checkpoint, "mixtral")
    before = Checkpoint.open(src)
    assert before.expert_bytes == 3 * 64 * 64 * 4  # float32, three 64 x 64 weights
    for scheme in ("int8", "int4-g32"):
        bits, g = SCHEMES[scheme]
        after = Checkpoint.open(quantized("mixtral", scheme))
        assert after.quant is not None and after.quant.scheme.bits == bits
        assert after.expert_bytes == 3 * (64 * 64 * bits // 8 + 64 * (64 // g if g else 1) * 4)  # values, float32 scales
        assert after.dense.keys() == before.dense.keys()
        assert (src / "tokenizer.json").exists() == (after.model_dir / "tokenizer.json").exists()
    assert not any(p.name.endswith(".partial") for p in src.parent.iterdir())


# --- bad input ------------------------------------------------------------------------------------
def _broken(qdir: Path, tmp_path: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    out = tmp_path / "broken"
    shutil.copytree(qdir, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _one_expert_tensor(tensors, suffix):
    return next(n for n in tensors if ".experts.1." in n and n.endswith(suffix))


@pytest.mark.parametrize("case,match", [
    ("scale missing", "missing tensor .*weight_scale"),
    ("scale shape", "weight_scale has shape"),
    ("packed shape", "weight_packed is"),
])
def test_broken_quantized_checkpoints_are_one_line(case, match, quantized, tmp_path):
    qdir = quantized("mixtral", "int4-g32")

    def edit(t):
        if case == "scale missing":
            del t[_one_expert_tensor(t, "weight_scale")]
        elif case == "scale shape":
            n = _one_expert_tensor(t, "weight_scale")
            t[n] = t[n][:, :1].contiguous()
        else:
            n = _one_expert_tensor(t, "weight_packed")
            t[n] = t[n][:-1].contiguous()

    with pytest.raises(ExpertCacheError, match=match) as e:
        Checkpoint.open(_broken(qdir, tmp_path, edit))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("weights,match", [
    ({"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}, "3-bit weights"),
    ({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}, "needs zero points"),
    ({"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": 32}, "float weights"),
    ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "tensor"}, "strategy 'tensor'"),
])
def test_unsupported_schemes_are_one_line(weights, match, quantized, tmp_path):
    qdir = quantized("mixtral", "int4-g32")
    out = tmp_path / "scheme"
    shutil.copytree(qdir, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"] = weights
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExpertCacheError, match=match) as e:
        Checkpoint.open(out)
    assert "\n" not in str(e.value)


def test_unknown_methods_and_formats_are_refused():
    with pytest.raises(SchemeError, match="'gptq' is not supported"):
        read_schemes({"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(SchemeError, match="format 'float-quantized'"):
        read_schemes({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                             "config_groups": {"g": {"weights": {"num_bits": 8}}}}})
    assert read_schemes({}) == () == read_schemes({"quantization_config": {"quant_method": "mxfp4"}})


def test_quantize_refuses_what_it_cannot_write(checkpoint, quantized, tmp_path):
    src = _source(checkpoint, "mixtral")
    with pytest.raises(ExpertCacheError, match="--bits 3"):
        quantize_checkpoint(src, tmp_path / "a", bits=3, progress=False)
    with pytest.raises(ExpertCacheError, match="--group-size 48"):
        quantize_checkpoint(src, tmp_path / "b", bits=4, group_size=48, progress=False)
    with pytest.raises(ExpertCacheError, match="outside the source"):
        quantize_checkpoint(src, src / "q", bits=4, progress=False)
    with pytest.raises(ExpertCacheError, match="quantized already"):
        quantize_checkpoint(quantized("mixtral", "int8"), tmp_path / "c", bits=4, progress=False)
    with pytest.raises(ExpertCacheError, match="does not divide"):
        quantize_checkpoint(_source(checkpoint, "mixtral", expert_intermediate=48), tmp_path / "d", bits=4, group_size=32,
                            progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ExpertCacheError, match="not an empty directory"):
        quantize_checkpoint(src, tmp_path / "full", bits=4, progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep"


# --- the simulator prices bytes at the stored precision ---------------------------------------------
def test_traces_carry_the_precision_and_simulate_reprices_it(quantized, tmp_path):
    from expertcache.sim.measure import get_hardware
    from expertcache.sim.recorder import Recorder
    from expertcache.sim.simulate import simulate
    from expertcache.sim.trace import Trace

    qdir = quantized("mixtral", "int4-g32")
    with expertcache.load(qdir, expert_budget="50%", prefetch="none") as eng:
        with Recorder(eng) as rec:
            eng.generate(PROMPT[:12], max_new_tokens=6, stop_at_eos=False)
        eb = eng.checkpoint.expert_bytes
    trace = rec.trace
    assert trace.meta["precision"] == "int4-g32" and set(trace.shape.expert_bytes.values()) == {eb}
    trace.save(tmp_path / "t.npz")
    again = Trace.load(tmp_path / "t.npz")
    wide = again.at_precision("bfloat16")
    assert set(wide.shape.expert_bytes.values()) == {round(eb * 2 / (0.5 + 2 / 32))}
    budget = 4 * eb
    hw = get_hardware("nvme4")
    small = simulate(again, [budget], ["lru"], hardware=hw)["results"][0]
    big = simulate(wide, [budget], ["lru"], hardware=hw)["results"][0]
    assert small["hit_pct"] > big["hit_pct"]  # the same bytes hold more int4 experts
    with pytest.raises(ValueError, match="unknown precision"):
        again.at_precision("int3")


def test_quantize_writes_shards_with_an_index(checkpoint, tmp_path):
    """A checkpoint larger than --shard size goes to several files and an index, as save_pretrained
    writes them; both transformers and the engine read it."""
    src = _source(checkpoint, "qwen3_moe")
    out = tmp_path / "sharded"
    r = quantize_checkpoint(src, out, bits=4, group_size=32, progress=False, shard_bytes=40_000)
    assert r.files > 2 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {p.name for p in out.glob("*.safetensors")} == set(index["weight_map"].values())
    ref = reference_outputs(out, PROMPT[:16], 4)
    with expertcache.load(out, expert_budget="50%") as eng:
        torch.testing.assert_close(eng.model(input_ids=torch.tensor([PROMPT[:16]])).logits[0], ref.logits)
        assert eng.generate(PROMPT[:16], max_new_tokens=4, stop_at_eos=False).token_ids == ref.generated


# --- asymmetric (zero-point) checkpoints, as AWQ-style conversions publish them ----------------------
def asymmetric_copy(qdir: Path, out: Path) -> Path:
    """The quantized checkpoint's weights re-quantized with zero points (min/max per group), packed by
    compressed-tensors' own pack_to_int32 (values; zero points along the output dimension)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((qdir / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["symmetric"] = False
    tensors = load_file(qdir / "model.safetensors")
    new = {}
    for name, t in tensors.items():
        if not name.endswith(".weight_packed"):
            if not name.endswith(".weight_scale"):
                new[name] = t
            continue
        base = name[: -len("_packed")]
        shape = torch.Size(tensors[base + "_shape"].tolist())
        scale = tensors[base + "_scale"]
        bits = 4 if t.shape[1] == -(-shape[1] * 4 // 32) else 8
        g = shape[1] // scale.shape[1]
        w = (unpack_from_int32(t, bits, shape).float() * scale.float().repeat_interleave(g, dim=1)).view(shape[0], -1, g)
        lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
        qmax, qmin = (1 << bits - 1) - 1, -(1 << bits - 1)
        s = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8).to(scale.dtype).float()
        zp = torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
        q = torch.clamp(torch.round(w / s) + zp, qmin, qmax).view(shape).to(torch.int8)
        new[name] = pack_to_int32(q, bits)
        new[base + "_scale"] = s.view(shape[0], -1).to(scale.dtype)
        new[base + "_zero_point"] = pack_to_int32(zp.view(shape[0], -1).to(torch.int8), bits, packed_dim=0)
    shutil.copytree(qdir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("scheme", ["int4-g32", "int8"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_asymmetric_checkpoint_matches_transformers(family, scheme, quantized, tmp_path, direct_io_works):
    """transformers 5.23 does not carry zero points into fused experts (its conversion fails), so the
    reference is the copy compressed-tensors' unpacking dequantizes, zero points included."""
    adir = asymmetric_copy(quantized(family, scheme, dense="int8"), tmp_path / "asym")
    ck = Checkpoint.open(adir)
    assert not ck.quant.scheme.symmetric and ck.quant.scheme.name.endswith("-asym")
    assert all(not q.scheme.symmetric for q in ck.dense_quantized.values())
    ref = reference_outputs(dequantized_copy(adir, tmp_path / "dequantized"), PROMPT, NEW_TOKENS)
    run_and_compare(adir, ref, budget="50%", prefetch="next-gate", io="direct", direct_io_works=direct_io_works)


def test_asymmetric_without_zero_points_is_one_line(quantized, tmp_path):
    adir = asymmetric_copy(quantized("mixtral", "int4-g32"), tmp_path / "asym")
    broken = _broken(adir, tmp_path, lambda t: t.pop(_one_expert_tensor(t, "weight_zero_point")))
    with pytest.raises(ExpertCacheError, match="needs zero points") as e:
        Checkpoint.open(broken)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 32), (8, None), (4, None)])
def test_zero_point_kernels_compute_the_dequantized_linear(bits, group, native):
    if native and not kernels.available():
        pytest.skip("expertcache's CPU kernels did not build here")
    torch.manual_seed(2)
    out, inner = 48, 128
    g = group or inner
    q = torch.randint(-(1 << bits - 1), 1 << bits - 1, (out, inner), dtype=torch.int8)
    zp = torch.randint(-(1 << bits - 1), 1 << bits - 1, (out, inner // g), dtype=torch.int8)
    scale = torch.rand(out, inner // g) * 0.01
    scheme = Scheme(bits, group, symmetric=False)
    packed, zero = pack_to_int32(q, bits), pack_to_int32(zp, bits, packed_dim=0)
    parts = (packed.view(torch.uint8).view(out, -1), scale, zero.flatten().view(torch.uint8).view(zero.shape[0], -1))
    want_w = (q.float() - zp.float().repeat_interleave(g, dim=1)) * scale.repeat_interleave(g, dim=1)
    torch.testing.assert_close(dequantize(*parts[:2], scheme, (out, inner), zero=parts[2]), want_w)
    qe = QuantExperts(scheme, ((out, inner),), native=native)
    assert qe.kernels == ((NATIVE,) if native else (DEQUANT,))
    x = torch.randn(5, inner)
    torch.testing.assert_close(qe.linear(x, parts, 0), torch.nn.functional.linear(x, want_w))


def _random_packed(out: int, inner: int, bits: int, group: int | None, symmetric: bool, scale_dtype: torch.dtype, span: float):
    """Random stored values of a (out, inner) weight packed as compressed-tensors packs them:
    (values [out, inner] int8, scale [out, groups], packed uint8 rows, zero points [] or [the stored
    int32 words as bytes], zero points [out, groups] as float, 0 when symmetric)."""
    g = group or inner
    q = torch.randint(-(1 << bits - 1), 1 << bits - 1, (out, inner), dtype=torch.int8)
    scale = (torch.rand(out, inner // g) * span + 1e-3).to(scale_dtype)
    packed = pack_to_int32(q, bits).view(torch.uint8).view(out, -1)
    if symmetric:
        return q, scale, packed, [], torch.zeros(out, inner // g)
    z = torch.randint(-(1 << bits - 1), 1 << bits - 1, (out, inner // g), dtype=torch.int8)
    zw = pack_to_int32(z, bits, packed_dim=0)
    return q, scale, packed, [zw.flatten().view(torch.uint8).view(zw.shape[0], -1)], z.float()


@pytest.mark.parametrize("bits,group,symmetric,inner", [(4, 32, True, 256), (4, 64, True, 256), (4, None, True, 256), (8, None, True, 256),
                                                         (8, 64, True, 256), (4, 32, False, 256), (8, None, False, 256),
                                                         (4, 128, True, 384), (4, 64, True, 320), (8, 32, True, 320), (4, 256, True, 512)])
@pytest.mark.parametrize("scale_dtype,tokens", [(torch.bfloat16, 1), (torch.float32, 3), (torch.float16, 1), (torch.bfloat16, 7),
                                                (torch.bfloat16, 15), (torch.float16, 4), (torch.bfloat16, 16), (torch.float32, 21),
                                                (torch.bfloat16, 32)])
def test_few_token_avx512_bf16_path_computes_the_dequantized_linear(bits, group, symmetric, inner, scale_dtype, tokens):
    """A decode step's product (1 to 15 bf16 rows) on a CPU with AVX512-BF16 takes qmm's VDPBF16PS
    paths (stored values as bf16 128 + u, offsets taken off per group or step, four tokens a pass):
    rows of whole 64-byte steps the step-wide one (groups smaller than, equal to and larger than a
    step; zero points per lane), int4 rows of 320 inputs (two and a half steps) the 16-byte one;
    from three tokens, with AMX, the tiles for blocks of 16 output rows (the rest as above; zero
    points taken off per row and group), 17 to 32 tokens in two passes. Each stays within bf16
    rounding of the dequantized reference and of the AVX2 path, for symmetric and zero-point schemes,
    every scale dtype, two weights side by side, and row counts that leave a single row."""
    if not kernels.available() or not torch.ops.expertcache.qmm_fast(True):
        pytest.skip("no AVX512-BF16 here (or no kernels): one-token products take the AVX2 path")
    torch.manual_seed(3)
    out = 67
    g = group or inner
    q, scale, packed, zeros, zp = _random_packed(out, inner, bits, group, symmetric, scale_dtype, 0.01)
    want_w = (q.float() - zp.repeat_interleave(g, dim=1)) * scale.float().repeat_interleave(g, dim=1)
    x = torch.randn(tokens, inner).bfloat16()
    want = torch.nn.functional.linear(x.float(), want_w)
    if symmetric:  # two weights side by side (zero points are packed along the outputs: one weight)
        fast = torch.ops.expertcache.qmm(x, [packed[:40], packed[40:]], [scale[:40], scale[40:]], [], bits, g)
    else:
        fast = torch.ops.expertcache.qmm(x, [packed], [scale], zeros, bits, g)
    was = torch.ops.expertcache.qmm_tiles(0)
    try:
        untiled = torch.ops.expertcache.qmm(x, [packed], [scale], zeros, bits, g)
        assert not torch.ops.expertcache.qmm_wide(False)
        narrow = torch.ops.expertcache.qmm(x, [packed], [scale], zeros, bits, g)
        assert not torch.ops.expertcache.qmm_fast(False)
        slow = torch.ops.expertcache.qmm(x, [packed], [scale], zeros, bits, g)
    finally:
        torch.ops.expertcache.qmm_fast(True)
        torch.ops.expertcache.qmm_wide(True)
        torch.ops.expertcache.qmm_tiles(was)
    assert fast.dtype == narrow.dtype == untiled.dtype == torch.bfloat16 and fast.shape == narrow.shape == untiled.shape == (tokens, out)
    for got in (fast, untiled, narrow):
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got.float(), slow.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bits,group,symmetric,inner", [(4, 64, True, 256), (4, 32, True, 256), (4, None, True, 256), (4, 256, True, 512),
                                                         (4, None, True, 1280),
                                                         (8, None, True, 320), (8, 64, True, 256), (8, 32, True, 192),
                                                         (4, 64, False, 256), (8, None, False, 256)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_token_products_on_int8_slices_of_x(bits, group, symmetric, inner, scale_dtype):
    """One token on a CPU with VPDPBUSD: qmm splits x into three 7-bit slices a group (steps S0,
    S0/128, S0/2^14, powers of two), multiplies them by the stored bytes in int32 and scales in float32.
    Inputs 2^13 times smaller than their group's largest still count in full: rows that weight only
    those (the largest multiplies a zero) give the dequantized product at bf16 rounding, which a
    missing third slice (~20 % off) or a missing offset fails, and so does the step-wide path here in
    half the cases (its "128 + u" float32 sums cancel 7 bits: up to ~35 % off a small output). A
    non-finite input takes the step-wide path (its inf and nan); int4 blocks of over 1,024 inputs
    convert each slice's sums apart."""
    if not kernels.available() or not torch.ops.expertcache.qmm_slices(True):
        pytest.skip("no AVX512-VNNI with AVX512-BF16 here (or no kernels): one-token products take the step-wide path")
    torch.manual_seed(7)
    out, g = 35, group or inner
    q, scale, packed, zeros, zp = _random_packed(out, inner, bits, group, symmetric, scale_dtype, 0.01)
    if symmetric:  # an input the rows ignore: stored values of 2^(bits-1) (zero) at input 0
        q[:, 0] = 0
        packed = pack_to_int32(q, bits).view(torch.uint8).view(out, -1)
    else:
        zq = torch.round(zp).to(torch.int8)
        q[:, 0] = zq[:, 0]
        packed = pack_to_int32(q, bits).view(torch.uint8).view(out, -1)
    want_w = (q.float() - zp.repeat_interleave(g, dim=1)) * scale.float().repeat_interleave(g, dim=1)
    x = (torch.rand(1, inner) * 0.012 + 0.008).bfloat16()  # 2^-13.6 to 2^-12.3 of the largest: their lowest bit is S2
    x[0, 0] = 100.0
    x[0, 1::7] *= -1
    want = torch.nn.functional.linear(x.double(), want_w.double())
    got = torch.ops.expertcache.qmm(x, [packed], [scale], zeros, bits, g)
    assert not torch.ops.expertcache.qmm_slices(False)
    try:
        wide = torch.ops.expertcache.qmm(x, [packed], [scale], zeros, bits, g)
        bad = x.clone()
        bad[0, 3] = float("inf")
        wide_bad = torch.ops.expertcache.qmm(bad, [packed], [scale], zeros, bits, g)
    finally:
        torch.ops.expertcache.qmm_slices(True)
    torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-6)  # bf16's rounding of the exact sums
    torch.testing.assert_close(got.double(), wide.double(), rtol=0.5, atol=1e-4)  # (the step-wide path: its "128 + u" sums cancel bits)
    got_bad = torch.ops.expertcache.qmm(bad, [packed], [scale], zeros, bits, g)
    assert torch.equal(got_bad.isnan(), wide_bad.isnan()) and torch.equal(got_bad.nan_to_num(), wide_bad.nan_to_num())


# --- mixed precision on miss (--miss-copy) -----------------------------------------------------------
@torch.no_grad()
def _decode(model, prompt: list[int], steps: int, *, before_decode=None, decode_model=None) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy: the prompt in one forward of `model`, then `steps` one-token forwards of
    `decode_model` (default `model`) over its KV cache; the logits of each and the tokens."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    logits, tokens = [out.logits[0, -1]], []
    if before_decode is not None:
        before_decode()
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        out = (decode_model or model)(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[0, -1])
    return logits, tokens


@pytest.mark.parametrize("budget", ["min", "50%"])
@pytest.mark.parametrize("prefetch,reads", [("none", "misses"), ("next-gate", "all")])
def test_miss_copy_decode_computes_misses_on_the_small_copy(budget, prefetch, reads, quantized, direct_io_works):
    """--miss-copy, never upgraded, the cache emptied after the prompt: every expert a decode step
    needs is a miss first (read from the int4 copy) and a hit on that copy after (or, with
    --miss-copy-reads all, a guess read from it), so each step equals transformers running the
    int4 checkpoint over the KV cache its int8 model made of the prompt (logits at the kernels'
    tolerance, the same greedy tokens)."""
    q8, q4 = quantized("qwen3_moe", "int8"), quantized("qwen3_moe", "int4-g64")
    want, want_tokens = _decode(reference_model(q8), PROMPT, 16, decode_model=reference_model(q4))
    expert_budget = min_budget(q8) if budget == "min" else budget
    with expertcache.load(q8, expert_budget=expert_budget, prefetch=prefetch, miss_copy=str(q4), miss_copy_upgrade=0,
                          miss_copy_reads=reads) as eng:
        recorders = []

        def empty():  # the prompt's (full-precision) loads are over: count the decode steps alone
            eng.reset_cache()
            eng.reset_stats()
            recorders.append(LoadRecorder(eng))

        got, tokens = _decode(eng.model, PROMPT, 16, before_decode=empty)
        s = eng.stats()
        assert s["low_loads"] == s["misses"] + s["prefetch_issued"] and s["low_loads"] > 0 and s["upgrades"] == 0
        assert (s["prefetch_issued"] > 0) == (prefetch != "none")
        assert s["low_uses"] == s["lookups"]  # every expert call of the steps on the small copy
        if prefetch == "none":
            assert (s["hits"] > 0) == (budget == "50%")  # at 50%, hits on it too (the minimum budget misses every lookup)
        assert all(e.low for e in eng.cache.core.entries.values())
        check_engine_invariants(eng, recorders[0])
        check_io_mode(eng, "direct", direct_io_works)
    torch.testing.assert_close(torch.stack(got), torch.stack(want))
    assert tokens == want_tokens


@torch.no_grad()
def test_miss_copy_upgrades_land_the_full_copy(quantized):
    """Upgraded after one use, the int8 copies read over the int4 ones at the lowest priority:
    once the reads are over every resident expert is the model's own again, and a forward over
    the whole sequence (hits on the upgraded slots) equals transformers' int8 model; bytes read
    add up per copy, exactly."""
    q8, q4 = quantized("qwen3_moe", "int8"), quantized("qwen3_moe", "int4-g64")
    ref = reference_model(q8)
    with expertcache.load(q8, expert_budget="50%", prefetch="next-gate", miss_copy=str(q4), miss_copy_upgrade=1,
                          miss_copy_reads="misses") as eng:
        recorder = LoadRecorder(eng)
        _, tokens = _decode(eng.model, PROMPT, 12, before_decode=eng.reset_cache)
        recorder.drain()
        core = eng.cache.core
        for eid in list(core.entries):
            core.ready(eid)  # settle the upgrades that have landed
        s = eng.stats()
        assert s["low_loads"] > 0 and s["upgrades"] > 0
        assert not any(e.low for e in core.entries.values())
        upgraded = set(core.entries)
        hits_before = s["hits"]
        ids = torch.tensor([PROMPT + tokens])
        got = eng.model(input_ids=ids).logits[0]
        assert eng.stats()["hits"] > hits_before and upgraded
        check_engine_invariants(eng, recorder)
    torch.testing.assert_close(got, ref(input_ids=ids).logits[0])


class _Load:
    def __init__(self, priority: int, copy: int):
        from expertcache.ids import QUEUED

        self.priority, self.copy, self.state, self.err = priority, copy, QUEUED, None


class _HandReader:
    """A Reader (cache.py) whose loads the test starts, ends or fails by hand: a load waited for
    that has not failed is done."""

    def __init__(self):
        self.loads: list[_Load] = []

    def submit_many(self, loads, priority, copy=0):
        new = [_Load(priority, copy) for _ in loads]
        self.loads += new
        return new

    def promote(self, load):
        from expertcache.ids import DEMAND

        load.priority = DEMAND

    def cancel(self, load):
        from expertcache.ids import CANCELLED, QUEUED

        if load.state != QUEUED:
            return False
        load.state = CANCELLED
        return True

    def state(self, load):
        return load.state

    def error(self, load):
        return load.err

    def wait(self, load):
        from expertcache.ids import DONE, QUEUED, RUNNING

        if load.state in (QUEUED, RUNNING):
            load.state = DONE
        return 0.0

    def arrival(self, load):
        return (0,)


def _core_with_a_miss_copy():
    """A CacheCore of 2 slots over one 4-expert layer whose experts are 100 bytes, 25 in the miss copy."""
    from expertcache.cache import CacheCore
    from expertcache.policies import make_policy
    from expertcache.stats import Stats

    reader, stats = _HandReader(), Stats()
    core = CacheCore(capacity=2, policy=make_policy("lru")[0], reader=reader, stats=stats, expert_bytes={0: 100},
                     layers=[0], experts_per_layer=4, low_bytes={0: 25})
    return core, reader, stats


def test_miss_copy_rules_on_ids():
    """The cache's rules for a miss copy (a reader whose loads the test starts and ends): a decode
    miss reads the small copy; its second use queues the full read at the lowest priority; a call
    that needs the expert before that read starts cancels it and computes on the small copy; once
    started, the read is promoted and waited for; bytes are counted per copy; a prompt's misses
    read the full copy."""
    from expertcache.ids import CANCELLED, DEMAND, DONE, RUNNING, UPGRADE

    core, reader, stats = _core_with_a_miss_copy()

    def call(*experts):
        list(core.stream(0, list(experts)))
        assert len(core.entries) <= core.capacity

    core.miss_low = True
    call(1)
    assert [(l.copy, l.priority) for l in reader.loads] == [(1, DEMAND)] and core.entries[(0, 1)].low
    assert stats.bytes_read == 25 and stats.low_loads == 1 and stats.upgrades == 0  # one use: no full read yet
    call(1)  # used again: the full copy is queued behind everything else
    up = reader.loads[-1]
    assert (up.copy, up.priority) == (0, UPGRADE) and not core.entries[(0, 1)].ready
    assert stats.bytes_read == 125 and stats.upgrades == 1
    call(1)  # needed before a byte of it is read: cancelled, the small copy serves, then queued again
    assert up.state == CANCELLED and stats.upgrades_cancelled == 1 and stats.hits == 2
    assert core.entries[(0, 1)].low and stats.bytes_read == 125  # 25 + the new upgrade's 100
    again = reader.loads[-1]
    assert again is not up and again.priority == UPGRADE
    again.state = RUNNING  # a reader thread has started it
    call(1)  # needed now: promoted, waited for; the full copy computes
    assert again.priority == DEMAND and again.state == DONE
    ent = core.entries[(0, 1)]
    assert ent.ready and not ent.low and ent.upgrade_from is None
    assert stats.low_uses == 3  # the calls that computed on the small copy
    assert stats.bytes_read == 125 and stats.upgrades == 1 and stats.upgrades_cancelled == 1
    core.miss_low = False  # a prompt: misses read the model's own experts
    call(2, 3)
    assert [l.copy for l in reader.loads[-2:]] == [0, 0] and stats.bytes_read == 325
    assert not any(e.low for e in core.entries.values())


def test_miss_copy_refuses_what_is_not_a_smaller_copy(checkpoint, quantized, tmp_path):
    """--miss-copy must be the same model's experts, quantized smaller: one line otherwise."""
    q8 = quantized("qwen3_moe", "int8")
    other = quantized("qwen3_moe", "int4-g64", num_experts=8)
    cases = [
        (str(quantized("qwen3_moe", "int4-g64")), q8, None),  # the good case: loads
        (str(other), q8, "experts per layer"),
        (str(q8), q8, "not smaller"),  # the same precision
        (str(_source(checkpoint, "qwen3_moe")), q8, "not smaller"),  # the unquantized model
        (str(tmp_path / "missing"), q8, "missing|not found|no such|does not exist"),
    ]
    for copy, model, match in cases:
        if match is None:
            with expertcache.load(model, expert_budget="50%", miss_copy=copy) as eng:
                assert eng.stats()["miss_copy"]["precision"] == "int4-g64"
            continue
        with pytest.raises(ExpertCacheError, match=match) as err:
            expertcache.load(model, expert_budget="50%", miss_copy=copy)
        assert "\n" not in str(err.value)


# --- many rows: dequantized by the kernel, multiplied by torch's GEMM ---------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 32, True), (4, 64, True), (8, 16, False), (4, 32, False)])
def test_dq_kernel_is_compressed_tensors_dequantization_bit_for_bit(dtype, bits, group, symmetric):
    """dq writes (value - zero point) * scale in the scale's dtype, rounded as torch rounds it:
    the very weight transformers' compressed-tensors path multiplies by (dequantize)."""
    if not kernels.available():
        pytest.skip("expertcache's CPU kernels did not build here")
    torch.manual_seed(3)
    out, inner = 96, 256
    g = group or inner
    _, scale, packed, zeros, _ = _random_packed(out, inner, bits, group, symmetric, dtype, 0.02)
    zero = zeros[0] if zeros else None
    want = dequantize(packed, scale, Scheme(bits, group, symmetric), (out, inner), zero=zero)
    got = torch.ops.expertcache.dq(packed, scale, zeros, bits, g, inner)
    assert got.dtype == dtype and torch.equal(got, want)
    buf = torch.empty_like(want)
    assert torch.ops.expertcache.dq(packed, scale, zeros, bits, g, inner, buf).data_ptr() == buf.data_ptr() and torch.equal(buf, want)


def test_many_rows_take_the_dequantized_gemm_and_equal_it(monkeypatch):
    """A product of DENSE_ROWS_F32 rows or more (float32) is torch's GEMM on the dequantized weight,
    bit for bit; fewer rows stay in qmm (the same values within float32 rounding)."""
    if not kernels.available():
        pytest.skip("expertcache's CPU kernels did not build here")
    import expertcache.quant as quant

    torch.manual_seed(4)
    scheme, shape = Scheme(4, 32), (64, 128)
    packed, scale = quantize(torch.randn(shape) * 0.05, scheme, torch.float32)
    parts = (packed.view(torch.uint8).view(shape[0], -1).clone(), scale)
    q = QuantExperts(scheme, (shape,))
    weight = dequantize(packed, scale, scheme, shape)
    calls = []
    monkeypatch.setattr(quant, "_workspace", lambda *a: calls.append(a) or torch.empty(a[1], dtype=a[2]))
    many = torch.randn(quant.DENSE_ROWS_F32, shape[1])
    assert torch.equal(q.linear(many, parts, 0), torch.nn.functional.linear(many, weight)) and len(calls) == 1
    few = many[: quant.DENSE_ROWS_F32 - 1]
    torch.testing.assert_close(q.linear(few, parts, 0), torch.nn.functional.linear(few, weight))
    assert len(calls) == 1


def test_quantized_dense_linears_take_the_dequantized_gemm_for_many_rows(monkeypatch):
    """A QuantLinear (`--dense int8`) multiplies a prompt's rows as quantized experts do: from
    DENSE_ROWS_F32 rows (float32) torch's GEMM on the dequantized weight, bit for bit, its bias added;
    fewer rows (a decode step's) stay in qmm."""
    if not kernels.available():
        pytest.skip("expertcache's CPU kernels did not build here")
    import expertcache.quant as quant
    from expertcache.quant import QuantLinear

    torch.manual_seed(7)
    scheme, shape = Scheme(8, None), (96, 128)
    packed, scale = quantize(torch.randn(shape) * 0.05, scheme, torch.float32)
    bias = torch.randn(shape[0])
    lin = QuantLinear((packed.view(torch.uint8).view(shape[0], -1).clone(), scale), scheme, shape, bias)
    weight = dequantize(packed, scale, scheme, shape)
    calls = []
    monkeypatch.setattr(quant, "_workspace", lambda *a: calls.append(a) or torch.empty(a[1], dtype=a[2]))
    many = torch.randn(1, quant.DENSE_ROWS_F32, shape[1])
    assert torch.equal(lin(many), torch.nn.functional.linear(many, weight) + bias) and len(calls) == 1
    few = many[:, :3]
    torch.testing.assert_close(lin(few), torch.nn.functional.linear(few, weight, bias))
    assert len(calls) == 1


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_quantized_checkpoint_on_the_dequantized_gemm_matches_transformers(scheme, quantized, monkeypatch, direct_io_works):
    """Every product of one row or more through dq and torch's GEMM (the threshold lowered to 1):
    prompt and 32 greedy tokens equal transformers' on the quantized checkpoint, at 50 %."""
    if not kernels.available():
        pytest.skip("expertcache's CPU kernels did not build here")
    import expertcache.quant as quant

    monkeypatch.setattr(quant, "DENSE_ROWS_F32", 1)
    qdir = quantized("qwen3_moe", scheme)
    run_and_compare(qdir, _reference(qdir), budget="50%", prefetch="next-gate", io="direct", direct_io_works=direct_io_works)


def test_a_failed_upgrade_is_a_miss_and_counts_add_up():
    """An upgrade read that fails leaves no entry behind (its slot was half written): the next call
    that needs the expert misses and reads it again; an upgrade cancelled to free its slot for a
    demand load counts as cancelled, its bytes taken back."""
    from expertcache.ids import CANCELLED, FAILED, UPGRADE

    core, reader, stats = _core_with_a_miss_copy()
    core.miss_low, core.upgrade_after = True, 1
    list(core.stream(0, [1]))  # small copy read, then its upgrade queued
    up = reader.loads[-1]
    assert up.priority == UPGRADE and stats.upgrades == 1 and stats.bytes_read == 125
    up.state, up.err = FAILED, OSError("disk")
    list(core.stream(0, [1]))  # the failed upgrade is gone: a miss, the small copy read again
    assert stats.misses == 2 and stats.low_loads == 2 and core.entries[(0, 1)].low
    up2 = reader.loads[-1]
    assert up2.priority == UPGRADE and up2 is not up
    core.miss_low = False
    list(core.stream(0, [2, 3]))  # two demand loads need both slots: the queued upgrade is cancelled, its entry gone
    assert up2.state == CANCELLED and (0, 1) not in core.entries
    assert stats.upgrades_cancelled == 1 and stats.upgrades == 1  # issued and not cancelled: the failed one
    assert stats.bytes_read == 25 + 100 + 25 + 200  # small, failed upgrade, small again, two demand loads
