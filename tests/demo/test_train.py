"""Demo training through `expertcache train-demo`'s flags: a few steps of a tiny model, resume,
export, and the corpus split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from expertcache.cli import demo as train_demo_cli
from expertcache.demo import corpus
from expertcache.demo import training as train
from expertcache.demo.training import DemoTrainingSettings
from expertcache.errors import ExpertCacheError

STORY = (
    "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog. "
    "One day the dog ran after a red ball and Lily laughed. They went home and had a nap.\n"
)


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    text = tmp_path / "stories.txt"
    if not text.exists():
        text.write_text(f"\n{corpus.SEPARATOR}\n".join(STORY * (i % 3 + 1) for i in range(30)), encoding="utf-8")
    parser = argparse.ArgumentParser()
    train_demo_cli.add_arguments(parser)
    return parser.parse_args(
        [
            "--out-dir", str(tmp_path / "run"), "--train-text", str(text), "--vocab-size", "300",
            "--hidden", "32", "--layers", "2", "--intermediate", "64", "--heads", "4", "--kv-heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--warmup-steps", "2", "--eval-items", "0", "--threads", "1",
            *extra,
        ]
    )


def test_dense_family_trains_resumes_and_exports_with_a_given_tokenizer(tmp_path: Path) -> None:
    """--family llama: a dense parent for `expertcache refactor`, reusing another run's tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert train_demo_cli.run(_args(tmp_path, "--max-steps", "2")) == 0  # an MoE run: its tokenizer is reused
    tok_dir = tmp_path / "run" / "tokenizer"
    args = _args(tmp_path, "--max-steps", "2", "--family", "llama", "--tokenizer", str(tok_dir))
    args.out_dir = tmp_path / "dense"
    assert train_demo_cli.run(args) == 0
    args.max_steps, args.resume = 3, True
    assert train_demo_cli.run(args) == 0
    ckpt = tmp_path / "dense" / "ckpt"
    assert torch.load(ckpt / train.STATE_FILE, weights_only=False)["step"] == 3
    train.export(ckpt, tmp_path / "out")
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.config.intermediate_size == 64 and not any(".experts." in n for n, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab() == AutoTokenizer.from_pretrained(str(tok_dir)).get_vocab()


def test_train_resume_and_export(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, MixtralForCausalLM

    assert train_demo_cli.run(_args(tmp_path, "--max-steps", "3")) == 0
    ckpt = tmp_path / "run" / "ckpt"
    state = torch.load(ckpt / train.STATE_FILE, weights_only=False)
    assert state["step"] == 3 and state["tokens_seen"] == 3 * 2 * 32 and "optimizer" in state

    assert train_demo_cli.run(_args(tmp_path, "--max-steps", "5", "--resume")) == 0
    assert torch.load(ckpt / train.STATE_FILE, weights_only=False)["step"] == 5

    out = tmp_path / "shipped"
    parser = argparse.ArgumentParser()
    train_demo_cli.add_arguments(parser)
    assert train_demo_cli.run(parser.parse_args(["--export", str(ckpt), "--out", str(out)])) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 8
    model = MixtralForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("Lily and her dog", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)


def test_batches_are_a_function_of_step() -> None:
    sources = [train.Source("a", torch.arange(1000, dtype=torch.int32), 0.7), train.Source("b", torch.arange(500, dtype=torch.int32), 0.3)]
    first = train.sample_batch(sources, step=7, seed=1, batch=4, seq_len=16)
    assert torch.equal(first, train.sample_batch(sources, step=7, seed=1, batch=4, seq_len=16))
    assert not torch.equal(first, train.sample_batch(sources, step=8, seed=1, batch=4, seq_len=16))
    assert first.shape == (4, 17)


def test_lr_schedule_warms_up_and_decays() -> None:
    settings = DemoTrainingSettings(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert train.lr_at(settings, 0, 0.0) == pytest.approx(1e-4)
    assert train.lr_at(settings, 50, 0.0) == pytest.approx(1e-3)
    assert train.lr_at(settings, 50, 1.0) == pytest.approx(1e-4)


def test_a_run_needs_an_end(tmp_path: Path) -> None:
    with pytest.raises(ExpertCacheError, match="give --max-steps or --end-at"):
        train.train_demo(DemoTrainingSettings(out_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_split_point_prefers_document_boundary() -> None:
    docs = [f"document {i} " + "word " * 50 for i in range(40)]
    text = "".join(d + f"\n{corpus.SEPARATOR}\n" for d in docs)
    cut = corpus.split_point(text)
    assert text[cut - len(corpus.SEPARATOR) - 1 : cut] == corpus.SEPARATOR + "\n"
    assert 0.025 <= 1 - cut / len(text) <= 0.1
    single = "line of text\n" * 1000
    cut = corpus.split_point(single)
    assert single[cut - 1] == "\n" and abs((1 - cut / len(single)) - 0.05) < 0.01


@pytest.mark.skipif(corpus.data_dir() is None, reason="reference corpus not found (set EXPERTCACHE_DATA)")
def test_heldout_tails_are_disjoint_from_training_text() -> None:
    files = corpus.public_domain_files()
    assert files, "no public-domain files in the corpus"
    for path in files:
        head, tail = corpus.train_head(path), corpus.heldout_tail(path)
        assert head + tail == path.read_text(encoding="utf-8")
        assert 0.02 < len(tail) / (len(head) + len(tail)) < 0.11


def test_train_demo_without_the_corpus_says_where_and_creates_nothing(tmp_path, monkeypatch, capsys):
    from expertcache.cli import main

    monkeypatch.setenv("EXPERTCACHE_DATA", str(tmp_path / "nowhere"))
    out = tmp_path / "run"
    assert main(["train-demo", "--out-dir", str(out), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "EXPERTCACHE_DATA" in err and "internal error" not in err, err
    assert not out.exists(), "a failed run left its output folder behind"
