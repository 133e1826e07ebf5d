"""A plain fast tokenizer through the tokenizers library (expertcache/tokenizer.py) gives what
transformers' AutoTokenizer gives: ids, text, special tokens, the chat template; anything
transformers would apply in Python sends the folder to transformers' tokenizer instead."""

from __future__ import annotations

import json
from pathlib import Path
import random
import shutil

import pytest

from expertcache import tokenizer
from expertcache.config import DEMO_DIR
from helpers.checkpoints import make_word_model
from helpers.fresh import printed_words

TEXTS = ["Once upon a time, there was a little girl.", "", " leading and  double  spaces ", "line\nbreaks\n\n",
         "unicode: café, naïve, 日本語, emoji 🙂", "the cat sat on the mat", "<|endoftext|>inline<|endoftext|> special",
         "THE Cat SAT", "tabs\tand\rreturns", "numbers 12345 67.89"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    words = make_word_model(tmp_path_factory.mktemp("words"))
    demo = tmp_path_factory.mktemp("demo")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEMO_DIR / name, demo / name)
    return {"demo": demo, "words": words}


@pytest.mark.parametrize("which", ["demo", "words"])
def test_plain_tokenizer_is_transformers_own(which, folders):
    from transformers import AutoTokenizer

    folder = folders[which]
    mine, theirs = tokenizer.load(folder), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert mine is not None, "a plain fast tokenizer must load without transformers"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "bos_token", "eos_token"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert mine.chat_template == theirs.chat_template
    for text in TEXTS:
        for special in (True, False):
            assert mine.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special), text
    rng = random.Random(0)
    vocab = theirs.backend_tokenizer.get_vocab_size()
    specials = [t for t in (theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id) if t is not None]
    for n in (1, 2, 5, 40):
        for _ in range(20):
            ids = [rng.randrange(vocab) for _ in range(n)] + rng.sample(specials, k=min(1, len(specials)))
            rng.shuffle(ids)
            for skip in (False, True):
                assert mine.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), ids
    if mine.chat_template is not None:  # rendered by transformers' own tokenizer, loaded on first use
        turns = [{"role": "user", "content": "hi <|endoftext|>"}]
        assert (mine.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
                == theirs.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))


@pytest.mark.parametrize("change", [{"add_bos_token": True}, {"add_prefix_space": True}, {"clean_up_tokenization_spaces": True},
                                    {"tokenizer_class": "LlamaTokenizer"}, {"added_tokens_decoder": {}}])
def test_what_transformers_applies_in_python_goes_to_transformers(change, folders, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folders["demo"] / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
    assert tokenizer.load(tmp_path) is None
    assert tokenizer.load(folders["demo"]) is not None


def test_a_broken_or_missing_tokenizer_is_none(tmp_path):
    assert tokenizer.load(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert tokenizer.load(tmp_path) is None


def test_the_demo_runs_from_text_without_transformers():
    """The main job, `expertcache generate` on the demo model with a text prompt: no transformers import."""
    code = ("import sys, expertcache\n"
            "eng = expertcache.load(expert_budget='50%')\n"
            "out = eng.generate('Once upon a time', max_new_tokens=6)\n"
            "print(type(eng.tokenizer).__name__, bool(out.text), 'transformers' in sys.modules)\n")
    assert printed_words(code) == ["FastTokenizer", "True", "False"]
