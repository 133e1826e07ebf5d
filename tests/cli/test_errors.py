"""Bad input never produces a traceback, a hang, or a write into the user's model directory.

Every case goes through `expertcache.cli.main([...])` in-process and checks: a non-zero exit, one
line on stderr that says what is wrong, nothing on stdout, and the model directory byte-for-byte as
it was. One test runs the real `python -m expertcache` in a subprocess to prove the same of the
process (exit status, a single stderr line). The read-error-during-generation cases run under a
timeout, in a thread, so a waiting computation that never wakes fails the test instead of hanging.

The checkpoint is a tiny random Mixtral (2 layers, 4 experts of top-2, hidden 32, expert
intermediate 16, fp32) written once per module by transformers' own save_pretrained; every test
that damages it works on its own copy.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import expertcache

from expertcache.cli import main

# the tiny model's shape, and its sizes computed by hand from it (fp32 = 4 bytes)
V, H, I, L, E, K, HEADS, KV_HEADS = 64, 32, 16, 2, 4, 2, 4, 2
F32 = 4
HEAD_DIM = H // HEADS  # 8
BYTES_PER_EXPERT = 3 * I * H * F32  # w1 [I, H], w3 [I, H], w2 [H, I]: 6144
TOTAL_EXPERT_BYTES = L * E * BYTES_PER_EXPERT  # 49152
DENSE_BYTES = F32 * (
    V * H  # embed_tokens
    + V * H  # lm_head (not tied)
    + H  # final norm
    + L
    * (
        H * H  # q_proj
        + 2 * (KV_HEADS * HEAD_DIM) * H  # k_proj, v_proj
        + H * H  # o_proj
        + E * H  # router
        + 2 * H  # input / post-attention norms
    )
)  # 42624
MIN_BUDGET = K * BYTES_PER_EXPERT  # 12288: one layer's top-k
TOKEN_CYCLE = L * K * BYTES_PER_EXPERT  # 24576

STATS_KEYS = {
    "lookups", "hits", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_cancelled",
    "bytes_read", "stall_seconds", "ttft_seconds", "tpot_seconds", "peak_rss_bytes",
}  # fmt: skip

TIMEOUT = 120  # seconds; a generation on this model takes well under one


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The pristine tiny Mixtral checkpoint (never modified: copy it before damaging it)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, num_local_experts=E, num_experts_per_tok=K,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("errors") / "tiny-mixtral"
    MixtralForCausalLM(cfg).save_pretrained(out)
    assert (out / "model.safetensors").is_file()
    return out


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to damage."""
    return Path(shutil.copytree(tiny, tmp_path / "model"))


def snapshot(directory: Path | None) -> dict:
    """Every entry under `directory` with its kind, size, mode and modification time."""
    if directory is None or not directory.exists():
        return {}
    if directory.is_file():
        st = directory.stat()
        return {".": ("file", st.st_size, st.st_mode, st.st_mtime_ns)}
    out = {}
    for p in sorted(directory.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(directory))] = ("dir" if p.is_dir() else "file", st.st_size, st.st_mode, st.st_mtime_ns)
    return out


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything earlier
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def cli_error(capsys, argv: list[str], model_dir: Path | None = None, *, code: int = 1) -> str:
    """Run the CLI expecting a user error: exit `code`, one line on stderr, no traceback, nothing on
    stdout, and `model_dir` untouched. Returns the error line."""
    before = snapshot(model_dir)
    rc, out, err = run_cli(capsys, argv)
    lines = err.splitlines()
    assert rc == code, f"exit {rc}, stderr: {err!r}"
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    line = lines[0]
    assert "Traceback" not in err and "internal error" not in line, line
    assert line.startswith("expertcache"), line
    assert out == "", f"stdout: {out!r}"
    assert snapshot(model_dir) == before, "the model directory was modified"
    return line


def generate_args(model_dir: Path | str, *extra: str) -> list[str]:
    return ["generate", "--model", str(model_dir), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--json", *extra]


def header(path: Path) -> tuple[int, dict]:
    """(data start, header dict) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def io_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("expertcache-io")}


def in_thread(fn, timeout: float = TIMEOUT):
    """Run fn() in a daemon thread; (returned value, raised exception). Fails if it does not end."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout} s: a hang"
    return box.get("value"), box.get("error")


# --------------------------------------------------------------------------------------------------
# the model directory
# --------------------------------------------------------------------------------------------------
def test_missing_directory(capsys, tmp_path):
    line = cli_error(capsys, generate_args(tmp_path / "nope"))
    assert "no such directory" in line and "nope" in line
    assert not (tmp_path / "nope").exists()


def test_info_missing_directory(capsys, tmp_path):
    line = cli_error(capsys, ["info", str(tmp_path / "nope"), "--json"])
    assert "no such directory" in line


def test_path_is_a_file(capsys, model):
    line = cli_error(capsys, generate_args(model / "config.json"), model)
    assert "not a directory" in line


def test_no_config_json(capsys, model):
    (model / "config.json").unlink()
    line = cli_error(capsys, generate_args(model), model)
    assert "no config.json" in line


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"hidden_size": 32}'], ids=["garbage", "empty", "list", "no-model-type"])
def test_malformed_config_json(capsys, model, text):
    (model / "config.json").write_text(text)
    line = cli_error(capsys, generate_args(model), model)
    assert "config.json" in line
    assert "malformed JSON" in line or "no model_type" in line


def test_unsupported_architecture_lists_families(capsys, model):
    from transformers import LlamaConfig

    from expertcache.architectures import FAMILIES

    (model / "config.json").unlink()
    LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=HEADS).save_pretrained(model)
    line = cli_error(capsys, generate_args(model), model)
    assert "unsupported architecture 'llama'" in line
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        assert family in line
    assert all(f in line for f in FAMILIES)
    cli_error(capsys, ["info", str(model)], model)


@pytest.mark.parametrize(
    "model_type, config, words",
    [
        ("llama", dict(intermediate_size=I), "a dense model: it has no experts"),
        ("longcat_flash", dict(), "its experts module LongcatFlashExperts is not routed through transformers' experts interface"),
        ("afmoe", dict(moe_intermediate_size=16, num_experts=4, num_key_value_heads=2, head_dim=8),
         "its experts go through transformers' experts interface, but no row describes how its checkpoints name them"),
    ],
    ids=["dense", "not-through-the-interface", "no-row"],
)
def test_an_unsupported_directory_gets_the_one_thing_missing(capsys, model, model_type, config, words):
    """`info` (and every command) says why a model cannot run, read off transformers' own model."""
    from transformers import AutoConfig

    (model / "config.json").unlink()
    AutoConfig.for_model(model_type, vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                         **config).save_pretrained(model)
    line = cli_error(capsys, ["info", str(model)], model)
    assert f"unsupported architecture '{model_type}' ({words}" in line, line


def test_a_multimodal_checkpoint_names_its_supported_text_model(capsys, model):
    from transformers import AutoConfig

    (model / "config.json").unlink()
    text = dict(model_type="mixtral", vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                intermediate_size=I, num_key_value_heads=KV_HEADS, num_local_experts=E, num_experts_per_tok=K)
    AutoConfig.for_model("llava", text_config=text).save_pretrained(model)
    line = cli_error(capsys, ["info", str(model)], model)
    assert "unsupported architecture 'llava' (a multimodal checkpoint whose text model 'mixtral' is supported" in line, line


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok is 5"),  # top-k above the expert count
        ({"num_experts_per_tok": 0}, "num_experts_per_tok is 0"),
        ({"num_local_experts": 8}, "missing expert tensor"),  # config names experts the file lacks
        ({"num_local_experts": 2}, "do not match config.json"),  # router shape differs from the file
        ({"vocab_size": 65}, "do not match config.json"),
        ({"hidden_size": 64}, "config says"),
        ({"model_type": ["mixtral"]}, "unsupported architecture"),
        ({"hidden_act": "no-such-activation"}, "cannot build the model"),
    ],
    ids=["top-k>experts", "top-k=0", "more-experts", "fewer-experts", "vocab", "hidden", "model-type-list", "activation"],
)
def test_config_disagrees_with_tensors(capsys, model, change, words):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(change)
    (model / "config.json").write_text(json.dumps(cfg))
    line = cli_error(capsys, generate_args(model), model)
    assert words in line, line
    # info refuses it too: from config.json and the headers, or, for what only transformers' model
    # can tell (an activation it does not know), with --check
    argv = ["info", str(model)] + (["--check"] if "hidden_act" in change else [])
    line = cli_error(capsys, argv, model)
    assert words in line, line


# --------------------------------------------------------------------------------------------------
# the safetensors file
# --------------------------------------------------------------------------------------------------
def test_corrupt_header_garbage_json(capsys, model):
    st = model / "model.safetensors"
    raw = bytearray(st.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 : 8 + n] = b"#" * n  # same length, not JSON
    st.write_bytes(bytes(raw))
    line = cli_error(capsys, generate_args(model), model)
    assert "corrupt safetensors header" in line and "model.safetensors" in line
    cli_error(capsys, ["info", str(model), "--json"], model)


def test_absurd_header_length(capsys, model):
    st = model / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(struct.pack("<Q", 2**60) + raw[8:])
    line = cli_error(capsys, generate_args(model), model)
    assert "corrupt safetensors header" in line and str(2**60) in line


def test_truncated_mid_tensor(capsys, model):
    st = model / "model.safetensors"
    start, hdr = header(st)
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    begin, end = hdr[name]["data_offsets"]
    cut = start + (begin + end) // 2  # inside that expert tensor
    os.truncate(st, cut)
    line = cli_error(capsys, generate_args(model), model)
    assert "truncated" in line and "model.safetensors" in line
    assert f"the file has {cut}" in line


def _rewrite_header(st, edit) -> None:
    """Rewrite a safetensors file's header through `edit(header)`, its data left as it is."""
    start, hdr = header(st)
    data = st.read_bytes()[start:]
    edit(hdr)
    raw = json.dumps(hdr).encode()
    st.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("how", ["overlap", "gap"])
def test_tensors_must_follow_each_other_in_the_data(capsys, model, how):
    """As the safetensors format demands (its own library refuses such files): a tensor whose bytes
    overlap another's would be read as expert weights; a gap means a header that lies."""
    a = "model.layers.1.block_sparse_moe.experts.2.w1.weight"

    def edit(hdr):
        names = sorted((k for k in hdr if k != "__metadata__"), key=lambda k: hdr[k]["data_offsets"][0])
        b = names[names.index(a) + 1]  # the tensor after it
        begin, end = hdr[b]["data_offsets"]
        shift = -8 if how == "overlap" else 8
        hdr[b]["data_offsets"] = [begin + shift, end + shift]

    st = model / "model.safetensors"
    _rewrite_header(st, edit)
    line = cli_error(capsys, generate_args(model), model)
    assert "corrupt safetensors header" in line and ("overlaps" in line if how == "overlap" else "gap" in line), line
    cli_error(capsys, ["info", str(model)], model)


def test_a_tensor_in_two_files_is_refused_naming_both(capsys, model):
    from safetensors.torch import load_file, save_file

    stray = {k: v for k, v in load_file(model / "model.safetensors").items() if ".experts.0." in k}
    save_file(stray, model / "extra.safetensors", metadata={"format": "pt"})
    line = cli_error(capsys, generate_args(model), model)
    assert "extra.safetensors" in line and "model.safetensors" in line and "in both" in line, line
    cli_error(capsys, ["info", str(model)], model)


def test_info_refuses_what_generate_refuses(capsys, model):
    """A config giving fewer experts than the file holds: generate and info both refuse it."""
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_local_experts"] = E - 1
    (model / "config.json").write_text(json.dumps(cfg))
    for argv in (generate_args(model), ["info", str(model)], ["info", str(model), "--json"]):
        assert "do not match config.json" in cli_error(capsys, argv, model)


def test_empty_safetensors(capsys, model):
    (model / "model.safetensors").write_bytes(b"")
    line = cli_error(capsys, generate_args(model), model)
    assert "0 bytes" in line and "not a safetensors file" in line


def test_missing_expert_tensor(capsys, model):
    from safetensors.torch import load_file, save_file

    st = model / "model.safetensors"
    tensors = load_file(st)
    gone = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    del tensors[gone]
    save_file(tensors, st, metadata={"format": "pt"})
    line = cli_error(capsys, generate_args(model), model)
    assert "missing expert tensor" in line
    assert "model.layers.1.mlp.experts.2.w3.weight" in line  # the in-memory name of the deleted tensor


def test_unreadable_file_chmod(capsys, model):
    st = model / "model.safetensors"
    st.chmod(0)
    try:
        try:
            with open(st, "rb"):
                readable = True
        except PermissionError:
            readable = False
        if readable:
            pytest.skip("chmod 000 does not block reads here (running as root / CAP_DAC_OVERRIDE); "
                        "test_unreadable_file_simulated and test_unreadable_file_directory cover the path")  # fmt: skip
        line = cli_error(capsys, generate_args(model), model)
        assert "permission denied" in line
    finally:
        st.chmod(0o644)


def test_unreadable_file_simulated(capsys, model, monkeypatch):
    """What a non-root user gets from a chmod 000 file, simulated so it runs as root too: open()
    of the safetensors file raises PermissionError."""
    import builtins

    import expertcache.checkpoint as checkpoint
    import expertcache.headers as headers

    st = str(model / "model.safetensors")
    real_open = builtins.open

    def denying_open(file, *a, **kw):
        if str(file) == st:
            raise PermissionError(13, "Permission denied", st)
        return real_open(file, *a, **kw)

    monkeypatch.setattr(headers, "open", denying_open, raising=False)
    monkeypatch.setattr(checkpoint, "open", denying_open, raising=False)
    line = cli_error(capsys, generate_args(model), model)
    assert "model.safetensors" in line and "permission denied" in line


def test_unreadable_directory_simulated(capsys, model, monkeypatch):
    """A model directory the user may not list or enter (chmod 000, as a non-root user)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == model else real_access(p, mode, **kw))
    line = cli_error(capsys, generate_args(model), model)
    assert "permission denied" in line and "directory" in line


def test_unreadable_file_directory(capsys, model):
    """A directory where the safetensors file should be: open() fails, as for an unreadable file."""
    st = model / "model.safetensors"
    st.unlink()
    st.mkdir()
    line = cli_error(capsys, generate_args(model), model)
    assert "model.safetensors" in line and "is a directory" in line


# --------------------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv_budget, words",
    [
        (["--expert-budget", "lots"], "cannot parse expert budget 'lots'"),
        (["--expert-budget", "0"], "must be positive"),
        (["--expert-budget", "0%"], "must be a percentage"),
        (["--expert-budget", "-5GB"], "must be positive"),
        (["--expert-budget=-5GB"], "must be positive"),
        (["--expert-budget", "200%"], "must be a percentage"),
        (["--expert-budget", "5 parsecs"], "expert budget"),
    ],
    ids=["lots", "zero", "zero-percent", "negative", "negative-equals", "over-100-percent", "bad-unit"],
)
def test_bad_budget(capsys, model, argv_budget, words):
    line = cli_error(capsys, generate_args(model, *argv_budget), model)
    assert words in line, line


@pytest.mark.parametrize("budget", [str(MIN_BUDGET - 1), "1KiB", "1%"])
def test_budget_below_minimum_gives_minimum_in_bytes(capsys, model, budget):
    line = cli_error(capsys, generate_args(model, "--expert-budget", budget), model)
    assert "below the minimum" in line
    assert f"{MIN_BUDGET} bytes" in line  # 2 experts x 6144 bytes, computed by hand


@pytest.mark.parametrize(
    "argv_limit, words",
    [
        (["--memory-limit", "lots"], "cannot read memory limit 'lots' as a size"),
        (["--memory-limit", "0"], "cannot read memory limit"),
        (["--memory-limit", "1MiB"], "memory limit 1 MiB (stated) is too small"),
        (["--memory-limit", "auto", "--memory-reserve", "-1GB"], "cannot read memory reserve"),
        (["--memory-limit", "auto", "--memory-reserve", "1TiB"], "give at least"),
    ],
    ids=["lots", "zero", "too-small", "negative-reserve", "reserve-over-memory"],
)
def test_bad_memory_limit(capsys, model, argv_limit, words):
    line = cli_error(capsys, generate_args(model, *argv_limit), model)
    assert words in line, line


def test_memory_limit_sizes_the_expert_budget(capsys, model):
    """--memory-limit auto replaces --expert-budget: the plan's leftover, in whole slots, at most every expert."""
    rc, out, err = run_cli(capsys, generate_args(model, "--memory-limit", "auto"))
    assert rc == 0, err
    s = json.loads(out)["stats"]
    plan = s["memory_plan"]
    assert plan["in_use_bytes"] + plan["reserve_bytes"] + plan["budget_bytes"] == plan["limit_bytes"]
    assert s["budget_bytes"] % s["expert_bytes"] == 0 and s["budget_bytes"] <= plan["budget_bytes"]
    assert s["cache_slots"] == s["budget_bytes"] // s["expert_bytes"]


def test_memory_limit_is_in_the_summary_line(capsys, model):
    args = [a for a in generate_args(model, "--memory-limit", "auto") if a != "--json"]
    rc, out, err = run_cli(capsys, args)
    assert rc == 0, err
    assert re.search(r"\| experts [0-9.]+ \w+ of a [0-9.]+ \w+ limit", out + err), out + err


def test_budget_at_minimum_runs(capsys, model):
    rc, out, err = run_cli(capsys, generate_args(model, "--expert-budget", str(MIN_BUDGET)))
    assert rc == 0, err
    assert json.loads(out)["token_ids"]


def test_max_new_tokens_zero(capsys, model):
    args = generate_args(model)
    args[args.index("--max-new-tokens") + 1] = "0"
    line = cli_error(capsys, args, model)
    assert "--max-new-tokens must be at least 1" in line


def test_unknown_cache_policy_lists_names(capsys, model):
    from expertcache.policies import POLICIES

    line = cli_error(capsys, generate_args(model, "--cache-policy", "bogus"), model)
    assert "unknown cache policy 'bogus'" in line
    for name in ("lru", "lfu", "lfru", "layer"):
        assert name in line
    assert all(name in line for name in POLICIES)


def test_unknown_prefetch_lists_names(capsys, model):
    from expertcache.predictors import PREDICTORS

    threads_before = io_threads()
    line = cli_error(capsys, generate_args(model, "--prefetch", "bogus"), model)
    assert "unknown prefetch predictor 'bogus'" in line
    assert "none" in line and "next-gate" in line
    assert all(name in line for name in PREDICTORS)
    assert io_threads() <= threads_before, "the failed load left reader threads behind"


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--prompt-ids", "a,b"], "comma-separated integers"),
        (["--prompt-ids", ","], "prompt is empty"),
        (["--prompt-ids", "1000"], "out of range"),
        (["--prompt-ids", "-1"], "out of range"),
        (["--prompt", "hello"], "no tokenizer"),
        (["--sample", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "nan"], "top_p must be in (0, 1]"),
        (["--temperature", "nan"], "temperature must be a number >= 0"),
        (["--temperature", "-1"], "temperature must be a number >= 0"),
        (["--temperature", "inf"], "temperature must be a number >= 0"),
        (["--io-threads", "0"], "io_threads"),
        (["--prefetch-depth", "0"], "prefetch_depth"),
        (["--threads", "0"], "num_threads must be at least 1"),
        (["--threads", "-3"], "num_threads must be at least 1"),
        (["--miss-copy", "/nonexistent-copy"], "no such directory"),
        (["--miss-copy", "MODEL"], "not smaller than the model's"),
        (["--miss-copy-upgrade", "-1"], "miss_copy_upgrade must be at least 0"),
    ],
    ids=["ids-not-ints", "ids-empty", "id-too-big", "id-negative", "text-without-tokenizer", "top-p-0", "top-p-nan",
         "temperature-nan", "temperature-negative", "temperature-inf", "io-threads-0", "depth-0", "threads-0", "threads-negative",
         "miss-copy-missing", "miss-copy-not-smaller", "miss-copy-upgrade-negative"],
)
def test_other_bad_generate_inputs(capsys, model, extra, words):
    extra = [str(model) if a == "MODEL" else a for a in extra]
    args = ["generate", "--model", str(model), "--max-new-tokens", "2", "--json"]
    if not any(a.startswith("--prompt") for a in extra):
        args += ["--prompt-ids", "1,2,3"]
    line = cli_error(capsys, args + extra, model)
    assert words in line, line


def test_sampling_flags_imply_sampling(capsys, model):
    """--temperature, --top-p or --seed without --sample sample (as --seed always did): two seeds
    at a high temperature give other tokens than greedy decoding, and a seed repeats itself."""
    def tokens(*extra):
        rc, out, _ = run_cli(capsys, ["generate", "--model", str(model), "--prompt-ids", "1,2,3", "--max-new-tokens", "12",
                                      "--json", *extra])
        assert rc == 0
        return json.loads(out)["token_ids"]

    greedy = tokens()
    hot = [tokens("--temperature", "5", "--seed", str(s)) for s in (1, 2, 3)]
    assert any(t != greedy for t in hot)
    assert tokens("--temperature", "5", "--seed", "1") == hot[0]
    assert tokens("--temperature", "0", "--seed", "1") == greedy  # temperature 0 is greedy


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(seed="x"), "seed"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_the_api_applies_the_same_sampling_rules(model, kw, words):
    with expertcache.load(model, expert_budget="100%", prefetch="none") as eng:
        with pytest.raises(expertcache.ExpertCacheError, match=words):
            eng.generate([1, 2, 3], max_new_tokens=2, greedy=False, **kw)


def test_prompt_ids_must_be_whole_and_prompts_fit_the_context(model, monkeypatch):
    with expertcache.load(model, expert_budget="100%", prefetch="none") as eng:
        with pytest.raises(expertcache.ExpertCacheError, match="whole numbers"):
            eng.generate([1, 2.5, 3], max_new_tokens=2)
        for bad in ("x", True, None):
            with pytest.raises(expertcache.ExpertCacheError, match="whole numbers"):
                eng.generate([1, bad], max_new_tokens=2)
        context = 24  # a short context, so the test does not feed the tiny model's 131072 positions
        monkeypatch.setattr(eng.model.config, "max_position_embeddings", context)
        with pytest.raises(expertcache.ExpertCacheError, match=f"context is {context}"):
            eng.generate([3] * context, max_new_tokens=2)
        out = eng.generate([3] * (context - 2), max_new_tokens=10, stop_at_eos=False)  # stops at the context
        assert len(out.token_ids) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["bogus-command"],
        ["generate", "--max-new-tokens", "many"],
        ["generate", "--io", "sideways"],
        ["generate", "--no-such-flag"],
        ["info", "a", "b"],
    ],
    ids=["command", "int-flag", "choice-flag", "unknown-flag", "extra-positional"],
)
def test_usage_errors_are_one_line(capsys, argv):
    line = cli_error(capsys, argv, code=2)
    assert "error:" in line and "--help" in line


# --------------------------------------------------------------------------------------------------
# a read error during generation
# --------------------------------------------------------------------------------------------------
def _truncate_experts(model_dir: Path) -> None:
    """Cut the file inside layer 0's first expert: every expert read now comes up short."""
    st = model_dir / "model.safetensors"
    start, hdr = header(st)
    first = min(v["data_offsets"][0] for k, v in hdr.items() if ".experts." in k)
    os.truncate(st, start + first + 100)


@pytest.mark.parametrize("io", ["direct", "buffered"])
def test_expert_read_error_reaches_the_waiting_computation(model, io):
    import expertcache
    from expertcache.errors import ExpertLoadError

    threads_before = io_threads()
    engine = expertcache.load(model, expert_budget=MIN_BUDGET, io=io)  # opened and validated
    try:
        _truncate_experts(model)
        _, error = in_thread(lambda: engine.generate([1, 2, 3], max_new_tokens=4))
        assert isinstance(error, ExpertLoadError), repr(error)
        msg = str(error)
        assert "reading expert (0, " in msg and "model.safetensors" in msg and "shorter" in msg
        assert len(msg.splitlines()) == 1
        # nothing is left waiting or pinned
        assert all(e.pins == 0 for e in engine.cache.core.entries.values())
    finally:
        _, error = in_thread(engine.close, timeout=30)
        assert error is None
    assert io_threads() <= threads_before, "reader threads outlived engine.close()"


def test_expert_read_error_in_cli(capsys, model, monkeypatch):
    from expertcache.engine import Engine

    real_generate = Engine.generate

    def generate_after_truncation(self, *a, **kw):
        _truncate_experts(model)  # after Checkpoint.open validated the file and the engine loaded
        return real_generate(self, *a, **kw)

    monkeypatch.setattr(Engine, "generate", generate_after_truncation)
    before = snapshot(model)  # (the truncation is ours; the CLI itself must write nothing)
    capsys.readouterr()
    rc, error = in_thread(lambda: main(generate_args(model, "--max-new-tokens", "4")))
    assert error is None, repr(error)
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("expertcache: error: reading expert (0, ") and "shorter" in lines[0], lines[0]
    after = snapshot(model)
    assert set(after) == set(before)  # no file added
    assert after["config.json"] == before["config.json"]


# --------------------------------------------------------------------------------------------------
# what a good run prints
# --------------------------------------------------------------------------------------------------
def test_info_json_matches_hand_computation(capsys, tiny):
    before = snapshot(tiny)
    rc, out, err = run_cli(capsys, ["info", str(tiny), "--json"])
    assert rc == 0 and err == "", err
    info = json.loads(out)
    assert info["family"] == "mixtral"
    assert info["layers"] == L == 2
    assert info["experts_per_layer"] == E == 4
    assert info["top_k"] == K == 2
    assert info["bytes_per_expert"] == BYTES_PER_EXPERT == 6144
    assert info["dense_bytes"] == DENSE_BYTES == 42624
    assert info["total_expert_bytes"] == TOTAL_EXPERT_BYTES == 49152
    assert info["min_budget_bytes"] == MIN_BUDGET == 12288
    assert info["token_cycle_bytes"] == TOKEN_CYCLE == 24576
    # the file holds exactly the dense and expert bytes (plus its header)
    start, _ = header(tiny / "model.safetensors")
    assert (tiny / "model.safetensors").stat().st_size - start == DENSE_BYTES + TOTAL_EXPERT_BYTES
    assert snapshot(tiny) == before


def test_generate_json_structure(capsys, tiny):
    before = snapshot(tiny)
    rc, out, err = run_cli(capsys, ["generate", "--model", str(tiny), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"])
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert {"text", "token_ids", "stats"} <= set(result)
    assert result["text"] is None  # no tokenizer in the checkpoint
    ids = result["token_ids"]
    assert 1 <= len(ids) <= 4 and all(isinstance(t, int) and 0 <= t < V for t in ids)
    stats = result["stats"]
    assert STATS_KEYS <= set(stats), STATS_KEYS - set(stats)
    assert stats["hits"] + stats["misses"] == stats["lookups"] > 0
    for k in STATS_KEYS - {"ttft_seconds", "tpot_seconds", "stall_seconds"}:
        assert isinstance(stats[k], int) and stats[k] >= 0, (k, stats[k])
    assert stats["bytes_read"] >= stats["misses"] * BYTES_PER_EXPERT
    assert stats["bytes_read"] % BYTES_PER_EXPERT == 0 or stats["prefetch_cancelled"] > 0
    assert stats["ttft_seconds"] > 0 and stats["stall_seconds"] >= 0
    assert stats["tpot_seconds"] is None if len(ids) == 1 else stats["tpot_seconds"] > 0
    assert stats["peak_rss_bytes"] > 0
    assert snapshot(tiny) == before


# --------------------------------------------------------------------------------------------------
# the real process
# --------------------------------------------------------------------------------------------------
def test_subprocess_exit_code_and_one_line(model):
    """`python -m expertcache` on an impossible budget: exit 1, one stderr line, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "EXPERTCACHE_DEBUG"}
    env["EXPERTCACHE_THREADS"] = "1"
    before = snapshot(model)
    proc = subprocess.run(
        [sys.executable, "-m", "expertcache", *generate_args(model, "--expert-budget", str(MIN_BUDGET - 1))],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert proc.returncode == 1, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("expertcache: error: expert budget") and f"minimum {MIN_BUDGET} bytes" in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert snapshot(model) == before


# --------------------------------------------------------------------------------------------------
# output files: checked before the work, written whole or not at all
# --------------------------------------------------------------------------------------------------
def _trace_args(model, out, prompt: int = 3) -> list[str]:
    ids = ",".join(str(3 + i % 60) for i in range(prompt))
    return ["trace", "--model", str(model), "--prompt-ids", ids, "--max-new-tokens", "2", "--out", str(out)]


@pytest.mark.parametrize("where", ["directory", "missing-folder", "proc"])
def test_an_unwritable_output_is_refused_before_the_work(capsys, model, tmp_path, monkeypatch, where):
    import expertcache.engine

    out = {"directory": tmp_path, "missing-folder": tmp_path / "no" / "t.npz", "proc": Path("/proc/t.npz")}[where]
    monkeypatch.setattr(expertcache.engine, "Engine", lambda *a, **k: pytest.fail("the engine was loaded before the output was checked"))
    line = cli_error(capsys, _trace_args(model, out), model)
    assert str(out) in line and "--out" in line, line
    assert list(tmp_path.glob(".*")) == []


def test_a_full_disk_leaves_no_partial_file(capsys, model, tmp_path):
    """A tmpfs of a few KiB (root only; skipped elsewhere): the trace does not fit, one line says so."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        line = cli_error(capsys, _trace_args(model, mnt / "t.npz", prompt=120) + ["--hidden-states"], model)  # ~30 KB
        assert "cannot write it" in line and "t.npz" in line, line
        assert list(mnt.iterdir()) == [], "a partial file was left"
        line = cli_error(capsys, ["train-predictor", "--model", str(model), "--kind", "learned", "--steps", "2", "--no-progress", "--trace",
                                  str(_a_trace(capsys, model, tmp_path)), "--out", str(mnt / "p.pt")], model)
        assert "cannot write it (no space left on the device)" in line and "p.pt" in line, line
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _a_trace(capsys, model, tmp_path) -> Path:
    out = tmp_path / "t.npz"
    assert main(_trace_args(model, out, prompt=40) + ["--hidden-states"]) == 0
    capsys.readouterr()
    return out


# --------------------------------------------------------------------------------------------------
# the same defaults for the API and the CLI
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_a_device_other_than_cpu_is_refused_with_the_reason(model, device, capsys):
    with pytest.raises(expertcache.ExpertCacheError, match="computes on the cpu"):
        expertcache.load(model, device=device)


def test_the_api_and_the_cli_use_the_same_compute_threads(model, monkeypatch):
    """load() applies EngineConfig's thread rule, as the CLI does: $EXPERTCACHE_THREADS, else 1."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("EXPERTCACHE_THREADS", raising=False)
        with expertcache.load(model, prefetch="none"):
            assert torch.get_num_threads() == 1
        monkeypatch.setenv("EXPERTCACHE_THREADS", "2")
        with expertcache.load(model, prefetch="none"):
            assert torch.get_num_threads() == 2
        with expertcache.load(model, prefetch="none", num_threads=1):
            assert torch.get_num_threads() == 1
        monkeypatch.setenv("EXPERTCACHE_THREADS", "zero")
        with pytest.raises(expertcache.ExpertCacheError, match="EXPERTCACHE_THREADS"):
            expertcache.load(model, prefetch="none")
    finally:
        torch.set_num_threads(before)


def test_quantize_on_a_full_disk_is_one_line_and_leaves_nothing(capsys, model, tmp_path, monkeypatch):
    import errno

    from expertcache.tools import quantize

    def full(f, entries):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantize, "_write_header", full)
    line = cli_error(capsys, ["quantize", str(model), "--bits", "8", "--out", str(tmp_path / "q"), "--json"], model)
    assert "cannot write it (No space left on device)" in line
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()  # nothing half-written


def test_quantize_writes_a_new_directory_and_refuses_bad_output(capsys, model, tmp_path):
    """quantize reads the model, writes beside it, and refuses with one line what it cannot do;
    the source stays byte for byte as it was."""
    before = snapshot(model)
    out = tmp_path / "q4"
    rc, stdout, _ = run_cli(capsys, ["quantize", str(model), "--bits", "4", "--group-size", "0", "--out", str(out), "--json"])
    assert rc == 0 and json.loads(stdout)["scheme"] == "int4-channel"
    assert json.loads(stdout)["dense"] == "keep" and json.loads(stdout)["dense_weights"] == 0
    assert snapshot(model) == before
    rc, stdout, _ = run_cli(capsys, ["quantize", str(model), "--bits", "8", "--dense", "int8", "--out", str(tmp_path / "d8")])
    assert rc == 0 and "dense weights as int8-channel" in stdout
    rc, stdout, _ = run_cli(capsys, ["generate", "--model", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--json"])
    assert rc == 0 and len(json.loads(stdout)["token_ids"]) == 2
    assert "not an empty directory" in cli_error(capsys, ["quantize", str(model), "--bits", "8", "--out", str(out)], model)
    assert "quantized already" in cli_error(capsys, ["quantize", str(out), "--bits", "8", "--out", str(tmp_path / "b")], model)
    assert "outside the source" in cli_error(capsys, ["quantize", str(model), "--bits", "8", "--out", str(model / "q")], model)
    assert "does not divide" in cli_error(capsys, ["quantize", str(model), "--bits", "4", "--group-size", "64",
                                                   "--out", str(tmp_path / "c")], model)
    assert "does not exist" in cli_error(capsys, ["quantize", str(model), "--bits", "8", "--out", str(tmp_path / "no" / "q")], model)
    assert not (model / "q").exists() and not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_simulate_prices_a_trace_at_another_precision(capsys, model, tmp_path):
    trace = tmp_path / "t.npz"
    assert run_cli(capsys, ["trace", "--model", str(model), "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                            "--out", str(trace)])[0] == 0
    args = ["simulate", "--trace", str(trace), "--budget", str(2 * BYTES_PER_EXPERT), "--policy", "lru", "--json"]
    rc, out, _ = run_cli(capsys, args)
    rc4, out4, _ = run_cli(capsys, [*args, "--precision", "int4-g32"])
    assert rc == rc4 == 0
    plain, small = json.loads(out)["results"][0], json.loads(out4)["results"][0]
    assert small["hit_pct"] > plain["hit_pct"]  # the same bytes hold the float32 experts' int4 copies several times over
    assert "unknown precision 'int3'" in cli_error(capsys, [*args, "--precision", "int3"], model)
