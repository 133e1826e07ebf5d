"""expertcache refactor (Read-ME): a dense Llama checkpoint split into an MoE that transformers
loads as saved and the engine runs exactly; with every expert on and a zero router the MoE is the
dense model; the clustering is balanced; the fine-tune resumes where it stopped; bad input is one
line and leaves the source untouched."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from expertcache.cli import main
from expertcache.tools import refactor as rf
from expertcache.tools.refactor import RefactorSettings, balanced_kmeans, refactor

from helpers.compare import NEW_TOKENS, PROMPT, run_and_compare

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = [f"w{i}" for i in range(125)]


def _tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]").save_pretrained(directory)


def _dense_model(root, family: str = "llama"):
    """A tiny random dense model of `family` (2 layers, FFN 96 wide) with a word tokenizer."""
    import transformers

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)  # fmt: skip
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    if family == "qwen2":  # random attention biases (Qwen2's q/k/v have them), so a dropped bias would show
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(root / family)
    _tokenizer(root / family)
    return root / family


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny random Llama and a calibration text."""
    root = tmp_path_factory.mktemp("refactor")
    g = torch.Generator().manual_seed(5)
    text = root / "cal.txt"
    docs = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (200,), generator=g).tolist()) for _ in range(6)]
    text.write_text("\n<|endoftext|>\n".join(docs))
    return _dense_model(root), text


def _settings(text, **kw) -> RefactorSettings:
    base = dict(experts=4, top_k=2, calibration=(text,), calibration_tokens=512, seq_len=64, threads=1)
    return RefactorSettings(**{**base, **kw})


@pytest.mark.parametrize("source,shared,family", [("llama", 0.0, "mixtral"), ("llama", 0.25, "qwen2_moe"),
                                                  ("mistral", 0.0, "mixtral"), ("qwen2", 0.0, "qwen2_moe")])
def test_every_expert_and_a_zero_router_give_the_dense_model(dense, tmp_path, source, shared, family):
    """k = E with equal weights 1/E (a zero router) and down projections scaled by k: each token sums
    every neuron once, so the MoE computes the dense FFN (to float rounding). Wrong slicing fails.
    A Qwen2 parent keeps its attention biases (Qwen2-MoE), a Llama or Mistral one becomes Mixtral."""
    from transformers import AutoModelForCausalLM

    src, text = dense
    if source != "llama":
        src = _dense_model(tmp_path, source)
    r = refactor(src, tmp_path / "moe", _settings(text, top_k=4, shared_fraction=shared, logit_scale=0.0), progress=False)
    assert r.model_type == family
    moe = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    info = json.loads((tmp_path / "moe" / rf.INFO_FILE).read_text())
    for layer in info["experts"]:  # every neuron exactly once: shared or one expert, experts equal in size
        flat = sorted(layer["shared"] + [n for e in layer["experts"] for n in e])
        assert flat == list(range(96))
        assert len({len(e) for e in layer["experts"]}) == 1
    assert r.shared_width == (32 if shared else 0) and r.expert_width == (96 - r.shared_width) // 4  # 8-aligned widths


@pytest.fixture(scope="module")
def moe(dense, tmp_path_factory):
    src, text = dense
    out = tmp_path_factory.mktemp("moe") / "moe"
    refactor(src, out, _settings(text), progress=False)
    return out


@pytest.mark.parametrize("budget", ["min", "50%", "100%"])
def test_refactored_checkpoint_runs_exactly_in_the_engine(moe, budget, reference, direct_io_works):
    ref = reference(moe, PROMPT, NEW_TOKENS)
    run_and_compare(moe, ref, budget=budget, prefetch="next-gate", io="buffered", direct_io_works=direct_io_works)


def test_top2_moe_is_near_but_not_the_dense_model(dense, moe):
    """Two of four experts per token: fewer neurons, so not the dense output, but its routers pick
    better than chance (recall above 2/4) on the calibration rows they were not fitted on."""
    info = json.loads((moe / rf.INFO_FILE).read_text())["result"]
    assert all(0.5 < r <= 1.0 for r in info["router_recall"])
    assert all(0.0 < e < 1.0 for e in info["ffn_error"])
    assert info["params"]["active"] < info["params"]["total"]


def test_balanced_kmeans_recovers_planted_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    rows = torch.cat([centres[c] + 0.05 * torch.randn(5, 16, generator=g) for c in (2, 0, 3, 1)])  # groups of 5
    groups = balanced_kmeans(rows, 4, iters=20, seed=1)
    assert sorted(map(tuple, groups)) == [tuple(range(i, i + 5)) for i in (0, 5, 10, 15)]


def test_finetune_reduces_kl_and_resumes_to_the_same_weights(dense, tmp_path, monkeypatch):
    """An interrupted fine-tune, resumed with --resume, ends with the weights of an uninterrupted one."""
    src, text = dense
    s = _settings(text, finetune_tokens=6 * 2 * 64, batch_size=2, save_every_min=0.0)
    whole = refactor(src, tmp_path / "whole", s, progress=False)
    assert whole.finetune_tokens == 768 and whole.finetune_kl is not None
    assert not (tmp_path / "whole" / rf.STATE_DIR).exists()

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def failing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        refactor(src, tmp_path / "cut", s, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / "cut" / rf.STATE_DIR / "trainer_state.pt").is_file()
    with pytest.raises(Exception, match="not empty"):
        refactor(src, tmp_path / "cut", s, progress=False)  # without --resume: refused, nothing overwritten
    refactor(src, tmp_path / "cut", RefactorSettings(**{**s.__dict__, "resume": True}), progress=False)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_input_is_one_line_and_the_source_is_untouched(dense, tmp_path, capsys, checkpoint):
    src, text = dense
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    cases = [
        ([str(src), "--calibration", str(text), "--experts", "5", "--out", str(tmp_path / "a")], "does not split"),
        ([str(src), "--calibration", str(tmp_path / "none.txt"), "--out", str(tmp_path / "b")], "no such file"),
        ([str(src), "--calibration", str(text), "--out", str(src)], "new directory"),
        ([str(checkpoint("mixtral")), "--calibration", str(text), "--out", str(tmp_path / "c")], "not a dense family"),
        ([str(src), "--calibration", str(text), "--top-k", "9", "--out", str(tmp_path / "d")], "top-k"),
        ([str(src), "--calibration", str(text), "--finetune-tokens", "64", "--pregate", "--pregate-attn", "6",
          "--out", str(tmp_path / "e")], "multiple of 4"),
    ]
    for argv, message in cases:
        assert main(["refactor", *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("attn", [0, 8])
def test_joint_pregate_routes_the_model_as_the_engine_does(dense, tmp_path, attn):
    """--pregate: the pre-gate trained in the fine-tune (with or without causal attention) is saved
    beside the model; the engine with --prefetch pregate --routing pregate computes what the
    fine-tune's forward computed (the saved MoE routed by that pre-gate), at a 50% budget, and the
    pre-gate agrees with the routers."""
    from transformers import AutoModelForCausalLM

    import expertcache
    from expertcache.predictors import Artefact
    from expertcache.predictors.pregate import PregateNet

    src, text = dense
    r = refactor(src, tmp_path / "moe", _settings(text, finetune_tokens=16 * 2 * 64, batch_size=2, pregate=True, pregate_attn=attn), progress=False)
    assert len(r.pregate_agreement) == 2 and all(0.0 <= a <= 1.0 for a in r.pregate_agreement)
    assert len(r.max_expert_share) == 2 and all(1 / 4 <= x <= 1 / 2 for x in r.max_expert_share)  # 4 experts, top-2
    art = Artefact.load(tmp_path / "moe" / "predictor-pregate.pt")
    assert art.kind == "pregate" and art.meta["joint"] and art.meta["attn"] == attn
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32).eval()
    net = PregateNet(32, art.meta["window"], 2, 4, width=art.tensors["fc1.weight"].shape[0], decays=tuple(art.meta["decays"]),
                     attn=attn)
    net.load_state_dict(art.tensors)
    ids = torch.tensor([PROMPT])
    with torch.no_grad(), rf.PregateRouters(model) as routers:
        routers.chosen = net.score(model.get_input_embeddings()(ids))[0].topk(2, dim=-1).indices
        want = model(ids).logits[0]
    native = model(ids).logits[0]  # the routers restored: transformers' own routing
    assert not torch.allclose(native, want)  # the pre-gate's routing is not the routers' on this untrained model
    with expertcache.load(tmp_path / "moe", expert_budget="50%", prefetch="pregate", routing="pregate", io="buffered") as eng:
        with torch.no_grad():
            got = eng.model(input_ids=ids).logits[0]
    torch.testing.assert_close(got, want)


def test_dispatch_balance_and_shares_tell_an_even_layer_from_a_collapsed_one():
    """The joint fine-tune's balance term is k for a layer that spreads its tokens evenly and E for
    one that sends every token to the same k experts; the reported share of the busiest expert is
    1/E and 1/k. Its gradient reaches the logits (it can pull a collapsing layer apart)."""
    n, e, k = 64, 8, 2
    even = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=-1)[:, None, :]  # [N, 1 layer, k]
    collapsed = torch.tensor([[0, 1]]).expand(n, 1, k)
    flat = torch.zeros(n, 1, e, requires_grad=True)
    assert rf.dispatch_balance(even, flat, e).item() == pytest.approx(k)
    peaked = torch.full((n, 1, e), -30.0)
    peaked[..., :2] = 0.0
    assert rf.dispatch_balance(collapsed, peaked, e).item() == pytest.approx(e, rel=1e-4)
    assert rf.expert_shares(even, e).max().item() == pytest.approx(1 / e)
    assert rf.expert_shares(collapsed, e).max().item() == pytest.approx(1 / k)
    rf.dispatch_balance(collapsed, flat, e).backward()
    g = flat.grad[0, 0]
    assert (g[:2] > 0).all() and (g[2:] < 0).all()  # descending moves mass off the overused experts



def test_the_cli_warns_when_a_layer_collapses(monkeypatch, tmp_path, capsys):
    """A layer whose busiest expert takes 2.5x an even share or more is named, with what to do."""
    def fake(dense, out, settings, progress):
        return rf.RefactorResult(out_dir=str(out), model_type="mixtral", experts=8, top_k=2, expert_width=8, shared_width=0,
                                 calibration_tokens=64, router_recall=[0.8, 0.8], ffn_error=[0.4, 0.4], finetune_tokens=64,
                                 finetune_kl=0.1, max_expert_share=[0.15, 0.5], params={"active": 1, "total": 2})  # fmt: skip

    monkeypatch.setattr(rf, "refactor", fake)
    argv = ["refactor", str(tmp_path / "dense"), "--experts", "8", "--top-k", "2", "--calibration", str(tmp_path / "c.txt"),
            "--finetune-tokens", "64", "--pregate", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warning: layer 1 sends 2.5x" in out and "--pregate-balance" in out
    fake_even = lambda *a, **k: dataclasses.replace(fake(*a, **k), max_expert_share=[0.15, 0.2])  # noqa: E731
    monkeypatch.setattr(rf, "refactor", fake_even)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "--init" not in out  # no pre-gate agreement reported: no pre-gate to train on
    with_pregate = lambda *a, **k: dataclasses.replace(fake_even(*a, **k), pregate_agreement=[0.99, 0.98])  # noqa: E731
    monkeypatch.setattr(rf, "refactor", with_pregate)
    assert main(argv) == 0
    out = capsys.readouterr().out
    hint = next(line for line in out.splitlines() if "--init" in line)
    assert f"--model {tmp_path / 'out'} --kind pregate --init {tmp_path / 'out' / 'predictor-pregate.pt'}" in hint
