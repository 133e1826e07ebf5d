"""Decoding: a sequence fed across forwards gives the logits of one forward over it, and cropping
then feeding equals feeding the kept tokens fresh, for caches that can drop positions and for
those that cannot (MiniMax's lightning attention, Qwen3-Next's and Jamba's recurrent states). The
tools that decode step by step (tradeoff, predictor evaluation, hardware measurement) run on it."""

import pytest
import torch
from helpers.checkpoints import FAMILY_CASES, prompt_ids

import expertcache
from expertcache.decoding import Decoding
from expertcache.tools.quality import perplexity
from expertcache.tools.tradeoff import decode_perplexity

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAMILIES = ("mixtral", "minimax", "qwen3_next", "jamba")


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_feeding_in_steps_and_cropping_give_one_forwards_logits(family, checkpoint):
    ids = prompt_ids(20)
    with expertcache.load(checkpoint(family, **FAMILY_CASES[family]), expert_budget="100%", prefetch="none") as eng:
        whole = eng.model(input_ids=torch.tensor([ids])).logits[0]
        d = Decoding(eng.model)
        steps = [d.feed(ids[:12])[-1]] + [d.feed([t])[-1] for t in ids[12:]]
        torch.testing.assert_close(torch.stack(steps), whole[11:], rtol=1e-4, atol=1e-4)
        d.crop(15)
        assert d.tokens == ids[:15]
        torch.testing.assert_close(d.feed(ids[15:18])[-1], whole[17], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_decode_perplexity_runs_on_a_model_with_a_cache_of_its_own(checkpoint):
    """MiniMax refuses a DynamicCache made outside it: the tools let it make its own."""
    ids = prompt_ids(33)
    with expertcache.load(checkpoint("minimax", **FAMILY_CASES["minimax"]), expert_budget="100%", prefetch="none") as eng:
        ppl, scored, _ = decode_perplexity(eng.model, ids, window=16)
        want, n = perplexity(eng.model, ids, window=17, stride=16)
    assert scored == n and ppl == pytest.approx(want, rel=1e-4)


def test_sampling_draws_from_the_tempered_nucleus():
    """Engine sampling (inverse CDF, one uniform a token): frequencies match softmax(logits / T)
    within sampling error, a token outside the top_p nucleus is never drawn, the same seed gives
    the same draws, and greedy takes the argmax."""
    from expertcache.engine import _pick

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).bfloat16()
    want = torch.softmax(logits.float() / 0.8, dim=-1)
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([_pick(logits, greedy=False, temperature=0.8, top_p=1.0, generator=g) for _ in range(n)]), minlength=5)
    sigma = (want * (1 - want) / n).sqrt()
    assert ((counts / n - want).abs() <= 5 * sigma + 1e-4).all(), (counts / n, want)
    top = [_pick(logits, greedy=False, temperature=1.0, top_p=0.7, generator=g) for _ in range(2000)]
    assert set(top) == {0, 1}  # p = 0.64, 0.24, 0.09, ...: the nucleus of 0.7 is the first two
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = [_pick(logits, greedy=False, temperature=1.0, top_p=1.0, generator=ga) for _ in range(20)]
    b = [_pick(logits, greedy=False, temperature=1.0, top_p=1.0, generator=gb) for _ in range(20)]
    assert a == b and len(set(a)) > 1
    assert _pick(logits, greedy=True, temperature=1.0, top_p=1.0, generator=None) == 0
