"""eval: perplexity equals a direct computation with transformers; accuracy equals a hand score."""

import json
import math

import pytest
import torch
from helpers.checkpoints import WORDS, make_word_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import expertcache
from expertcache.cli import main
from expertcache.tools.quality import evaluate, perplexity

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_word_model(tmp_path_factory.mktemp("tiny-tok"))


def _direct_nll(ref, ids, window, stride):
    """The same windows, computed with plain transformers and an explicit loop over positions."""
    nll, n, done, begin = 0.0, 0, 1, 0
    while done < len(ids):
        end = min(begin + window, len(ids))
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        for pos in range(max(done, begin + 1), end):
            nll -= float(logp[pos - begin - 1, ids[pos]])
            n += 1
        done = end
        begin = end - max(window - stride, 1)
    return nll, n


@pytest.mark.parametrize("window,stride", [(8, 4), (8, 8), (16, 5), (64, 32)])
def test_perplexity_equals_direct_transformers(model_dir, window, stride):
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = [int(x) for x in torch.randint(1, len(WORDS) + 1, (37,), generator=torch.Generator().manual_seed(1))]
    nll, n = _direct_nll(ref, ids, window, stride)
    with expertcache.load(model_dir, expert_budget="50%") as eng:
        ppl, scored = perplexity(eng.model, ids, window=window, stride=stride)
    assert scored == n == len(ids) - 1
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_accuracy_equals_hand_computed_score(model_dir, tmp_path):
    items = [
        {"context": "the cat sat on the", "choices": ["mat", "dog", "red"], "label": 0},
        {"context": "a big dog", "choices": ["ran", "blue"], "label": 1},
        {"context": "it was", "choices": ["happy", "sad", "small", "the"], "label": 2},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    correct = 0
    for item in items:
        ctx = tok.encode(item["context"])
        scores = []
        for c in item["choices"]:
            full = ctx + tok.encode(" " + c)
            with torch.no_grad():
                logp = torch.log_softmax(ref(torch.tensor([full])).logits[0].double(), -1)
            scores.append(sum(float(logp[p - 1, full[p]]) for p in range(len(ctx), len(full))))
        correct += scores.index(max(scores)) == item["label"]
    with expertcache.load(model_dir, expert_budget="50%", prefetch="none") as eng:  # every read a miss (guesses
        res = evaluate(eng, mc=path)  # load ahead, whose early reads count as hits)
        expert_bytes = eng.checkpoint.expert_bytes
    assert res.items == 3
    assert res.accuracy == pytest.approx(correct / 3)
    assert res.experts_per_token == pytest.approx(2 * 2)  # top-2 in each of 2 layers
    assert res.misses_per_token > 0 and res.bytes_read_per_token == pytest.approx(res.misses_per_token * expert_bytes)


def test_eval_cli_json(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS * 4))
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--window", "16", "--stride", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("perplexity", "tokens", "accuracy", "experts_per_token", "misses_per_token", "bytes_read_per_token"):
        assert key in out
    assert out["accuracy"] is None and out["perplexity"] > 1 and out["tokens"] == 4 * len(WORDS) - 1
    assert len(out["busiest_expert_share"]) == 2 and all(1 / 4 <= x <= 1 / 2 for x in out["busiest_expert_share"])


def test_activation_counter_measures_each_layers_busiest_expert():
    """The share eval reports: 1/E for a layer that spreads its tokens, 1/k for one that sends every
    token to the same k experts; slots routing dropped (id -1) are not activations."""
    from expertcache.tools.quality import ActivationCounter

    c = ActivationCounter()
    spread = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    c(0, None, None, None, spread)
    c(1, None, None, None, torch.tensor([[1, 2], [1, 2], [1, -1], [2, 1]]))
    c(1, None, None, None, torch.tensor([[2, 1]]))
    assert c.busiest_share() == pytest.approx([1 / 4, 5 / 9])  # layer 1: expert 1 five of nine activations
    assert c.activations == 8 + 7 + 2 and c.tokens == 5  # layer 1 saw five tokens


class _MergingTokenizer:
    """Character tokenizer with one merge, "n m" -> a single token: a context ending in "n" and a
    choice starting with "m" tokenise differently whole and in pieces."""

    bos_token_id = 0

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("n m", i):
                ids.append(1)
                i += 3
            else:
                ids.append(2 + ord(text[i]) % 50)
                i += 1
        return ids


def test_choice_sequences_score_a_merge_across_the_boundary():
    from expertcache.tools.quality import choice_sequences

    tok = _MergingTokenizer()
    (plain, p_start), (merged, m_start) = choice_sequences(tok, "sat on", ["the", "mat"])
    ctx = [0] + tok.encode("sat on")
    assert plain == ctx + tok.encode(" the") and p_start == len(ctx)
    # "sat on mat": "n m" is one token, so the continuation starts one token into the context
    assert merged == [0] + tok.encode("sat o") + [1] + tok.encode("at") and m_start == len(ctx) - 1


def test_batched_and_decode_choice_scores_equal_one_forward_per_choice(model_dir):
    """quality.choice_scores (choices batched, right-padded) and tradeoff.decode_choice_scores
    (KV cache, decode steps) both equal scoring each whole sequence alone with transformers."""
    from expertcache.tools.quality import choice_scores, choice_sequences
    from expertcache.tools.tradeoff import decode_choice_scores

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    context, choices = "the cat sat on the", ["mat", "big red dog", "it"]
    want = []
    for full, start in choice_sequences(tok, context, choices):
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([full])).logits[0].double(), -1)
        want.append(sum(float(logp[p - 1, full[p]]) for p in range(start, len(full))))
    with expertcache.load(model_dir, expert_budget="50%") as eng:
        batched = choice_scores(eng.model, eng.tokenizer, context, choices)
        decoded = decode_choice_scores(eng.model, eng.tokenizer, context, choices)
    assert batched == pytest.approx(want, rel=1e-5)
    assert decoded == pytest.approx(want, rel=1e-5)
