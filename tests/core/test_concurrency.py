"""One engine shared by several threads: forwards take turns (one at a time runs its layers), so
every thread gets the tokens a lone run gets, at a budget far below the working set of all of
them together, and the engine works afterwards; a failed forward leaves it usable too."""

from __future__ import annotations

import threading

import pytest
from helpers.checkpoints import prompt_ids

import expertcache

THREADS, ROUNDS, TOKENS = 4, 5, 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("qwen3_moe", num_experts=16, top_k=3, norm_topk_prob=True, expert_intermediate=16, num_layers=4)


def test_threads_sharing_an_engine_get_a_lone_runs_tokens(model_dir):
    prompts = [prompt_ids(10, seed=s) for s in range(THREADS)]
    with expertcache.load(model_dir, expert_budget="25%", prefetch="next-gate") as eng:
        alone = [eng.generate(p, max_new_tokens=TOKENS, stop_at_eos=False).token_ids for p in prompts]
        got: dict[tuple[int, int], list[int]] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for r in range(ROUNDS):
                    got[(i, r)] = eng.generate(prompts[i], max_new_tokens=TOKENS, stop_at_eos=False).token_ids
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a thread never finished"
        assert not errors, errors
        assert all(got[(i, r)] == alone[i] for i in range(THREADS) for r in range(ROUNDS))
        assert all(e.pins == 0 for e in eng.cache.core.entries.values())
        assert eng.generate(prompts[0], max_new_tokens=TOKENS, stop_at_eos=False).token_ids == alone[0]


def test_a_failed_forward_leaves_the_engine_usable(model_dir):
    with expertcache.load(model_dir, expert_budget="25%", prefetch="next-gate") as eng:
        want = eng.generate(prompt_ids(10), max_new_tokens=TOKENS, stop_at_eos=False).token_ids

        def boom(layer, x, logits, weights, ids):
            raise RuntimeError("an observer failed")

        with eng.observe(boom), pytest.raises(RuntimeError, match="an observer failed"):
            eng.generate(prompt_ids(10), max_new_tokens=TOKENS, stop_at_eos=False)
        assert all(e.pins == 0 for e in eng.cache.core.entries.values())
        done = []
        t = threading.Thread(target=lambda: done.append(eng.generate(prompt_ids(10), max_new_tokens=TOKENS, stop_at_eos=False)))
        t.start()
        t.join(timeout=60)
        assert done and done[0].token_ids == want, "another thread could not run after the failure"
