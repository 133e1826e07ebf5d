"""Routing policies: exact routing equals transformers; each lossy policy selects and weights
exactly as its rule says on hand-made logits; the CLI wires them; calibration writes a loadable
file and adaptive gating activates fewer experts; tradeoff writes its table and plot."""

import json
import math

import pytest
import torch
from helpers.checkpoints import WORDS, make_word_model, prompt_ids

import expertcache
from expertcache.cli import build_parser, main
from expertcache.cli.flags import engine_config
from expertcache.routing import (
    AdaptiveGating,
    CacheAwareRouting,
    CacheMaxRankRouting,
    SpeculativeRouting,
    WeightRule,
    make_routing,
)
from expertcache.tools.quality import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MIXTRAL = WeightRule(renormalize=True, in_logits_dtype=False)
NO_RENORM = WeightRule(renormalize=False, in_logits_dtype=True)  # OLMoE / Qwen2-MoE default


def logits_of(*probs) -> torch.Tensor:
    """Router logits whose softmax is exactly the given rows (log-probabilities)."""
    return torch.tensor(probs, dtype=torch.float32).log()


def exact_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router: top-k of the softmax, renormalised."""
    w, ids = torch.softmax(logits.float(), -1).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


# --- exactness through the engine -----------------------------------------------------------------
@pytest.mark.parametrize("budget", ["25%", "100%"])
def test_exact_routing_equals_transformers(checkpoint, reference, budget):
    model_dir = checkpoint("mixtral")
    prompt = prompt_ids(12)
    ref = reference(model_dir, prompt, max_new_tokens=8)
    with expertcache.load(model_dir, expert_budget=budget, routing="exact") as eng:
        logits = eng.model(input_ids=torch.tensor([prompt])).logits[0]
        out = eng.generate(prompt, max_new_tokens=8)
    torch.testing.assert_close(logits, ref.logits)
    assert out.token_ids == ref.generated


def test_decode_only_policies_leave_prefill_exact_and_lambda_zero_is_bitwise_exact(checkpoint):
    model_dir = checkpoint("mixtral")
    prompt = prompt_ids(12)
    runs = {}
    for name, kw in {"exact": {}, "cache-aware": {}, "speculative": {},
                     "lambda0": {"routing": "cache-aware", "cache_lambda": 0.0, "routing_applies_to": "both"}}.items():
        kw = {"routing": name, **kw} if name != "lambda0" else kw
        with expertcache.load(model_dir, expert_budget="25%", cache_protect_top=1, **kw) as eng:
            eng.generate(prompt, max_new_tokens=6)  # warm the cache so residency is not empty
            runs[name] = eng.model(input_ids=torch.tensor([prompt])).logits
    for name in ("cache-aware", "speculative", "lambda0"):
        assert torch.equal(runs[name], runs["exact"]), name


# --- adaptive gating on hand-made logits ----------------------------------------------------------
def test_adaptive_gating_drops_second_expert_below_layer_threshold():
    # token A: top-2 probabilities .64 (e0), .16 (e1) -> normalised .8/.2 ; token B: .4 (e3), .3 (e1) -> 4/7, 3/7
    logits = logits_of([0.64, 0.16, 0.12, 0.08], [0.1, 0.3, 0.2, 0.4])
    weights, ids = exact_route(logits, 2)
    policy = AdaptiveGating(thresholds={0: 0.3, 1: 0.45}, rule=MIXTRAL)
    w0, i0 = policy.select(0, logits, weights, ids)  # t = 0.3: A drops e1 (.2 < .3), B keeps e1 (.43 >= .3)
    assert i0.tolist() == [[0, -1], [3, 1]]
    torch.testing.assert_close(w0, torch.tensor([[1.0, 0.0], [4 / 7, 3 / 7]]))
    w1, i1 = policy.select(1, logits, weights, ids)  # t = 0.45: both tokens go top-1
    assert i1.tolist() == [[0, -1], [3, -1]]
    torch.testing.assert_close(w1, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_adaptive_gating_keeps_original_probabilities_when_family_does_not_renormalise():
    logits = logits_of([0.64, 0.16, 0.12, 0.08], [0.1, 0.3, 0.2, 0.4])
    weights, ids = torch.softmax(logits, -1).topk(2, dim=-1)  # no renormalisation
    w, i = AdaptiveGating(thresholds={0: 0.3}, rule=NO_RENORM).select(0, logits, weights, ids)
    assert i.tolist() == [[0, -1], [3, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.64, 0.0], [0.4, 0.3]]))


def test_adaptive_gating_top3_drops_each_slot_below_threshold_and_renormalises_the_rest():
    # top-3 .5, .3, .15 (sum .95): normalised .526, .316, .158 ; t = .2 drops only the third
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    weights, ids = exact_route(logits, 3)
    w, i = AdaptiveGating(thresholds={0: 0.2}, rule=MIXTRAL).select(0, logits, weights, ids)
    assert i.tolist() == [[0, 1, -1]]
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375, 0.0]]))


def test_adaptive_gating_never_drops_the_top1():
    logits = logits_of([0.3, 0.3, 0.2, 0.2])
    weights, ids = exact_route(logits, 2)
    w, i = AdaptiveGating(thresholds={0: 0.9}, rule=MIXTRAL).select(0, logits, weights, ids)
    assert (i[:, 0] >= 0).all() and (i[:, 1] == -1).all()
    torch.testing.assert_close(w[:, 0], torch.ones(1))


# --- cache-aware (cache prior) on hand-made logits -----------------------------------------------
def test_cache_prior_biases_resident_and_protected_experts_by_lambda_times_range_ema():
    # token 1: z = [3, 2, 1.5, 0], range 3 seeds D = 3; bonus .5 * 3 = 1.5 to e0 (top-1, protected)
    #   and e2 (resident): z' = [4.5, 2, 3, 0] -> {e0, e2} instead of {e0, e1}
    # token 2: z = [4.505, 5, 3, 0], range 5: D = .99 * 3 + .01 * 5 = 3.02, bonus 1.51 to e1
    #   (protected) and e2 (resident): z' = [4.505, 6.51, 4.51, 0] -> {e1, e2} instead of {e1, e0}
    #   (with D = 3, the previous average, e2 would score 4.5 and lose to e0)
    z = torch.tensor([[3.0, 2.0, 1.5, 0.0], [4.505, 5.0, 3.0, 0.0]])
    weights, ids = exact_route(z, 2)
    policy = CacheAwareRouting(resident=lambda layer: {2}, rule=MIXTRAL, lam=0.5, protect_top=1)
    w, i = policy.select(0, z, weights, ids)
    assert i.tolist() == [[0, 2], [1, 2]]  # in the router's order
    assert policy.range_ema[0] == pytest.approx(3.02)
    e = math.exp
    expected = [[e(3) / (e(3) + e(1.5)), e(1.5) / (e(3) + e(1.5))], [e(5) / (e(5) + e(3)), e(3) / (e(5) + e(3))]]
    torch.testing.assert_close(w, torch.tensor(expected))


def test_cache_prior_protects_top_j_and_uses_original_softmax_without_renormalising_when_family_does_not():
    z = torch.tensor([[3.0, 2.0, 1.5, 0.0]])
    probs = torch.softmax(z, -1)
    weights, ids = probs.topk(2, dim=-1)
    w, i = CacheAwareRouting(resident=lambda layer: {2, 3}, rule=NO_RENORM, lam=0.5, protect_top=1).select(0, z, weights, ids)
    assert i.tolist() == [[0, 2]]  # e0 protected (not resident); e2 (3.0) beats e1 (2.0) and e3 (1.5)
    torch.testing.assert_close(w, probs[:, [0, 2]])
    # J = k: both original choices carry the bonus, nothing can overtake them
    same_w, same_i = CacheAwareRouting(resident=lambda layer: {2, 3}, rule=MIXTRAL, lam=10.0, protect_top=2).select(0, z, weights, ids)
    assert same_i is ids and same_w is weights


def test_cache_prior_with_lambda_zero_returns_the_exact_choice():
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    weights, ids = exact_route(z, 2)
    w, i = CacheAwareRouting(resident=lambda layer: {0, 1, 2}, rule=MIXTRAL, lam=0.0, protect_top=1).select(3, z, weights, ids)
    assert i is ids and w is weights


# --- cache-aware max-rank on hand-made logits -----------------------------------------------------
def test_max_rank_swaps_uncached_unprotected_choice_for_cached_expert_within_rank():
    # token 1: ranks e0..e5 = 0..5, top-2 {e0, e1}; e1 uncached -> best cached expert ranked < 4 is e3
    #   (e5 is cached but ranked 5) -> {e0, e3}
    # token 2: ranks e5 = 0, e4 = 1, e3 = 2; top-2 {e5, e4}; e5 protected; e4 uncached -> e3 -> {e5, e3}
    z = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    weights, ids = exact_route(z, 2)
    policy = CacheMaxRankRouting(resident=lambda layer: {3, 5}, rule=MIXTRAL, max_rank=4, protect_top=1)
    w, i = policy.select(0, z, weights, ids)
    assert i.tolist() == [[0, 3], [5, 3]]
    e = math.exp
    torch.testing.assert_close(w, torch.tensor([[e(6) / (e(6) + e(3)), e(3) / (e(6) + e(3))],
                                                [e(6) / (e(6) + e(4)), e(4) / (e(6) + e(4))]]))
    # max rank 2: no cached expert ranked within it for token 1 (e3 is rank 3) -> unchanged
    w2, i2 = CacheMaxRankRouting(resident=lambda layer: {3, 5}, rule=MIXTRAL, max_rank=2, protect_top=1).select(0, z[:1], weights[:1], ids[:1])
    assert i2.tolist() == [[0, 1]]
    torch.testing.assert_close(w2, weights[:1])


def test_max_rank_keeps_best_ranked_uncached_choice_when_candidates_run_out():
    # top-3 of ranks e0, e1, e2, none cached; J = 1; one cached candidate e4 (rank 4 < 5) -> the
    # worst uncached choice (e2) is swapped, e1 stays
    z = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0]])
    weights, ids = exact_route(z, 3)
    w, i = CacheMaxRankRouting(resident=lambda layer: {4}, rule=MIXTRAL, max_rank=5, protect_top=1).select(0, z, weights, ids)
    assert i.tolist() == [[0, 1, 4]]
    e = math.exp
    s = e(9) + e(8) + e(5)
    torch.testing.assert_close(w, torch.tensor([[e(9) / s, e(8) / s, e(5) / s]]))


# --- speculative on hand-made logits --------------------------------------------------------------
def test_speculative_replaces_missing_routed_expert_by_resident_predicted_one():
    # resident {e0, e2}; the previous layer predicted [e2, e3, e1] for this layer -> usable guess: e2
    # token 1: routed {e0, e1}: e1 would miss -> e2 ; token 2: routed {e2, e3}: e3 would miss, but the
    # only usable guess is already routed -> e3 is loaded ; token 3: routed {e0, e2}, all resident
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0], [2.0, 0.0, 3.0, 1.0]])
    weights, ids = exact_route(z, 2)
    policy = SpeculativeRouting(resident=lambda layer: {0, 2}, predicted=lambda layer: [2, 3, 1], rule=MIXTRAL)
    w, i = policy.select(1, z, weights, ids)
    assert i.tolist() == [[0, 2], [2, 3], [2, 0]]
    e = math.exp
    torch.testing.assert_close(w[0], torch.tensor([e(3) / (e(3) + e(1)), e(1) / (e(3) + e(1))]))
    torch.testing.assert_close(w[1:], weights[1:])


def test_speculative_without_resident_prediction_is_exact():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    weights, ids = exact_route(z, 2)
    for predicted in ([], [1, 3]):  # no guess / guesses that are not resident
        policy = SpeculativeRouting(resident=lambda layer: {0, 2}, predicted=lambda layer: predicted, rule=MIXTRAL)
        w, i = policy.select(1, z, weights, ids)
        assert i is ids and w is weights


def test_weight_rule_reproduces_exact_weights_bit_for_bit():
    z = torch.randn(7, 8, generator=torch.Generator().manual_seed(3))
    weights, ids = exact_route(z, 2)
    assert torch.equal(MIXTRAL.mix(z, ids), weights)


def test_unknown_routing_lists_the_valid_names():
    with pytest.raises(ValueError, match="exact, adaptive-gating, cache-aware, cache-aware-max-rank, speculative"):
        make_routing("fastest")


# --- CLI, calibration, activations ------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    return make_word_model(tmp_path_factory.mktemp("tiny-routing"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (160,), generator=g)]
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(" ".join(words))
    return path


def test_routing_flags_parse_into_the_engine_config():
    argv = ["eval", "--text", "t.txt", "--routing", "cache-aware", "--cache-lambda", "0.4", "--cache-protect-top", "1",
            "--cache-max-rank", "3", "--routing-applies-to", "both", "--routing-config", "c.json"]
    cfg = engine_config(build_parser(["eval"]).parse_args(argv))
    assert (cfg.routing, cfg.cache_lambda, cfg.cache_protect_top, cfg.cache_max_rank) == ("cache-aware", 0.4, 1, 3)
    assert (cfg.routing_applies_to, cfg.calibration) == ("both", "c.json")
    default = engine_config(build_parser(["generate"]).parse_args(["generate"]))
    assert default.routing == "exact" and default.calibration is None


def test_unknown_routing_is_a_one_line_cli_error(tok_model, text_file, capsys):
    assert main(["eval", "--model", str(tok_model), "--text", str(text_file), "--routing", "nope"]) == 1
    assert "unknown routing 'nope'" in capsys.readouterr().err


def test_adaptive_gating_without_calibration_says_how_to_make_one(tok_model, text_file, capsys):
    assert main(["eval", "--model", str(tok_model), "--text", str(text_file), "--routing", "adaptive-gating"]) == 1
    assert "expertcache calibrate" in capsys.readouterr().err


def test_calibrate_writes_loadable_thresholds_and_adaptive_gating_activates_fewer_experts(tok_model, text_file, tmp_path, capsys):
    out = tmp_path / "gating.json"
    argv = ["calibrate", "--model", str(tok_model), "--text", str(text_file), "--target-drop", "30%",
            "--window", "32", "--out", str(out), "--json"]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == record
    assert record["routing"] == "adaptive-gating" and record["top_k"] == 2 and record["target_drop"] == 0.3
    assert sorted(record["layers"]) == ["0", "1"]
    for layer in record["layers"].values():  # t_l = sqrt(c / H_l)
        assert layer["fisher"] > 0
        assert layer["threshold"] == pytest.approx(math.sqrt(record["c"] / layer["fisher"]))
    assert record["expected_drop"] == pytest.approx(0.3, abs=0.02)
    assert 0 < record["measured_drop"] < 0.5
    AdaptiveGating.from_file(out, rule=MIXTRAL, top_k=2, layers=[0, 1])

    with expertcache.load(tok_model, expert_budget="50%") as eng:
        exact = evaluate(eng, text=text_file, window=32, stride=32)
    with expertcache.load(tok_model, expert_budget="50%", routing="adaptive-gating", calibration=str(out)) as eng:
        gated = evaluate(eng, text=text_file, window=32, stride=32)
    assert exact.experts_per_token == pytest.approx(2 * 2)
    assert gated.experts_per_token < 0.85 * exact.experts_per_token  # about 30% fewer
    assert gated.misses_per_token <= exact.misses_per_token
    assert gated.perplexity != exact.perplexity


def test_calibrate_to_a_perplexity_budget_stays_within_it(tok_model, text_file, tmp_path):
    out = tmp_path / "ppl.json"
    argv = ["calibrate", "--model", str(tok_model), "--text", str(text_file), "--max-ppl-increase", "0.02",
            "--window", "32", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["max_ppl_increase"] == 0.02
    assert record["perplexity"] <= record["perplexity_exact"] * 1.02
    assert 0 <= record["target_drop"] < 0.5


def test_calibration_for_another_model_is_refused(tok_model, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"routing": "adaptive-gating", "top_k": 2, "layers": {"0": {"threshold": 0.1}}}))
    with pytest.raises(expertcache.ExpertCacheError, match="calibrated for another model"):
        expertcache.load(tok_model, routing="adaptive-gating", calibration=str(path))


def test_tradeoff_writes_table_json_and_plot(tok_model, text_file, tmp_path, capsys):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "the cat sat on the", "choices": ["mat", "dog"], "label": 0}) + "\n")
    out = tmp_path / "tradeoff"
    argv = ["tradeoff", "--model", str(tok_model), "--text", str(text_file), "--mc", str(mc), "--out", str(out),
            "--max-tokens", "40", "--window", "20", "--drops", "0.3", "--lambdas", "0.5", "--ranks", "3",
            "--expert-budget", "50%", "--json"]
    assert main(argv) == 0
    result = json.loads((out / "tradeoff.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    labels = [(r["policy"], r["value"]) for r in result["rows"]]
    assert labels == [("exact", None), ("adaptive-gating", 0.3), ("cache-aware", 0.5), ("cache-aware-max-rank", 3),
                      ("speculative", None)]
    assert result["protect_tops"] == [1]  # J = 2 would protect both of top-2
    exact, gated = result["rows"][0], result["rows"][1]
    assert exact["tokens"] == 39 and exact["mc_items"] == 1 and exact["experts_per_token"] == pytest.approx(4)
    assert gated["experts_per_token"] < exact["experts_per_token"]
    table = (out / "tradeoff.md").read_text()
    assert table.count("\n| ") == 1 + len(labels)  # header + one row per setting
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_mode_scores_equal_the_prefill_scores_of_quality(tok_model):
    from expertcache.tools.quality import choice_scores, perplexity
    from expertcache.tools.tradeoff import decode_choice_scores, decode_perplexity

    ids = [int(t) for t in torch.randint(1, len(WORDS) + 1, (45,), generator=torch.Generator().manual_seed(2))]
    with expertcache.load(tok_model, expert_budget="50%") as eng:
        ppl, scored, times = decode_perplexity(eng.model, ids, window=16)
        ref, ref_scored = perplexity(eng.model, ids, window=17, stride=16)
        dec = decode_choice_scores(eng.model, eng.tokenizer, "the cat sat on", ["the mat", "a dog ran", "it"])
        pre = choice_scores(eng.model, eng.tokenizer, "the cat sat on", ["the mat", "a dog ran", "it"])
    assert scored == ref_scored == 44 and len(times) == 44
    assert ppl == pytest.approx(ref, rel=1e-5)
    assert dec == pytest.approx(pre, rel=1e-5)


def test_tradeoff_sweeps_routing_by_the_pregate_when_named(tok_model, text_file, tmp_path, capsys):
    """--policies exact,pregate: the pre-gate-routed setting (its file beside the model) is measured
    like every lossy policy; by default it is not swept (most models have no pre-gate)."""
    assert main(["train-predictor", "--kind", "pregate", "--model", str(tok_model), "--text", str(text_file),
                 "--max-tokens", "160", "--steps", "20", "--next-to-model", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "the cat sat on the", "choices": ["mat", "dog"], "label": 0}) + "\n")
    argv = ["tradeoff", "--model", str(tok_model), "--text", str(text_file), "--mc", str(mc), "--out", str(tmp_path / "t"),
            "--max-tokens", "30", "--window", "20", "--expert-budget", "50%", "--policies", "exact,pregate", "--json"]
    assert main(argv) == 0
    rows = {r["policy"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"exact", "pregate"}
    assert rows["pregate"]["tokens"] == rows["exact"]["tokens"] == 29
    assert rows["pregate"]["experts_per_token"] == pytest.approx(4)  # top-2 of 2 layers: routing changed, not dropped
