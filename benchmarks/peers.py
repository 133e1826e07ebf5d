#!/usr/bin/env python
"""Peers: expertcache against llama.cpp and accelerate on the same weights, at the same memory.

    python benchmarks/peers.py --setup                  # once: build llama.cpp, convert the GGUFs
    python benchmarks/peers.py [--quick] [--limits none,60,35] [--tools a,b] [--rounds R] [--tokens N]

Set-up (everything under results/peers/, gitignored; never part of the default install or CI)
----------------------------------------------------------------------------------------------
- llama-cpp-python 0.3.36 built from its sdist (`pip download --no-binary :all: --no-deps
  llama-cpp-python==0.3.36`, then `pip install --no-deps --target results/peers/site SDIST`:
  ~7-10 min on 2 cores, GGML_NATIVE so AVX2/FMA; `--sdist FILE` reuses a downloaded one), with
  sentencepiece, accelerate and diskcache installed beside it (`--no-deps`: torch, numpy, safetensors are the
  environment's own).
- The checkpoint as llama.cpp reads it: llama.cpp's own `vendor/llama.cpp/convert_hf_to_gguf.py`
  (from the same sdist, with its conversion/ package and gguf-py) on a folder of links to the
  checkpoint's files plus a tokenizer of the checkpoint's vocabulary size trained on
  ../shared/corpus/tinystories (the converter needs one; the benchmark feeds token ids): for the
  Mixtral-shaped checkpoint a SentencePiece unigram model; for the Qwen3-MoE-shaped one (`--fine`)
  a byte-level BPE tokenizer.json, whose new pre-tokenizer the converter is told to call "qwen2"
  (it names the regex llama.cpp would split text with; no text is split here). Written as bf16 and
  q8_0 (`--outtype`), then q4_0 by llama.cpp's own quantizer (`llama_model_quantize`) from the
  bf16 file. The checkpoint itself is only read.

The measurement
---------------
Each run is one subprocess in a memory cgroup of its own (expertcache.memlimit.MemoryCgroup:
cgroup v1 `memory.limit_in_bytes` or v2 `memory.max`, page cache counted, so mmap and buffered
reads pay for the memory they take) with the model files dropped from the page cache first (every
run starts cold), 1 compute thread. It feeds the same 512 token ids as a prompt (TTFT) and then the
same `--tokens` ids one at a time (teacher-forced: every tool computes the very same sequence, so
routing and the experts touched are the same), timing every step; TPOT is the median step after
the first 4. A run killed by the cgroup's OOM killer or over 10 minutes is recorded as such.
Limits: none, and fractions of the bf16 GGUF's size plus llama.cpp's measured runtime (~90 MiB),
where llama.cpp's bf16 file does not fit. Tools:
- expertcache (bf16, and int8 / int4-g64 copies made by `expertcache quantize` when present, with
  bf16 dense weights and with `--dense int8`, as llama.cpp's q8_0 / q4_0 quantize them too):
  `memory_limit="auto"` (the engine sizes its expert budget from the cgroup; `memory_reserve`
  160 MiB), prefetch none and next-gate (the default); no limit: every expert resident; where the
  limit leaves less than one layer's top-k experts beside the runtime, "TOO SMALL"; and bf16 with
  `half_matmul="float32"` (opt-in: prefill products through float32, rounding unlike transformers');
- llama.cpp bf16, q8_0, q4_0 through mmap (its default), n_batch 512;
- accelerate's big-model inference as transformers users reach it (`from_pretrained(device_map=
  "auto", max_memory={"cpu": limit - 450 MiB}, offload_folder=...)`: what does not fit is offloaded
  to disk); no limit: plain CPU.
Rounds interleave the tools (order reversed every other round); figures are medians over rounds
with the spread (min-max). Writes peers.json, peers.md and peers.png (TPOT against the memory
limit, one line per tool) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic checkpoint's builder lives with the tests
sys.path.append(str(REPO))  # this checkout's engine unless PYTHONPATH names another copy

from helpers.synthetic import FINE_SPEC, CkptSpec, build_checkpoint, prompt_ids  # noqa: E402

ROOT = REPO / "results" / "peers"
SITE = ROOT / "site"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CORPUS = "corpus/tinystories"
PROMPT_TOKENS = 512
SKIP_STEPS = 4  # decode steps left out of the median (the first ones page in what the prompt did not)
TIMEOUT = 600
MiB = 2**20
RESERVE = "160MiB"  # expertcache's --memory-reserve here (--reserve): the KV cache of ~550 tokens, the rest a 512-token prefill's transient (docs/memory.md)
LLAMA_RUNTIME = 90 * MiB  # llama.cpp's own memory beside its weights (n_ctx 1024), measured: see docs


# ------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------
def _sh(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _data_dir() -> Path:
    d = Path(os.environ.get("EXPERTCACHE_DATA") or REPO.parent / "shared")
    if not (d / CORPUS).is_dir():
        sys.exit(f"peers.py: the SentencePiece tokenizer is trained on {d / CORPUS}, which is missing: set EXPERTCACHE_DATA")
    return d


CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"


def install(sdist: str | None, cmake_args: str = CMAKE_ARGS) -> Path:
    """llama-cpp-python built from its sdist, sentencepiece and accelerate, into SITE; returns the
    extracted llama.cpp sources (convert script, gguf-py)."""
    src = ROOT / "llama.cpp"
    if not (SITE / "llama_cpp").is_dir():
        if sdist is None:
            dl = ROOT / "dl"
            dl.mkdir(parents=True, exist_ok=True)
            _sh([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", LLAMA_CPP_PYTHON, "-d", dl])
            sdist = str(next(dl.glob("llama_cpp_python-*.tar.gz")))
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2),
                   CMAKE_ARGS=cmake_args)
        _sh([sys.executable, "-m", "pip", "install", "--no-deps", "--target", SITE, sdist], env=env)
    extra = [m for m in ("sentencepiece", "accelerate", "diskcache") if not (SITE / m).is_dir()]
    if extra:  # diskcache: llama_cpp imports it
        _sh([sys.executable, "-m", "pip", "install", "--no-deps", "--target", SITE, *extra])
    if not (src / "conversion").is_dir():
        sdist = sdist or str(next((ROOT / "dl").glob("llama_cpp_python-*.tar.gz")))
        with tarfile.open(sdist) as tf:
            prefix = tf.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in tf.getmembers() if m.name.startswith(prefix) and
                       (m.name.startswith((prefix + "gguf-py/", prefix + "conversion/")) or m.name == prefix + "convert_hf_to_gguf.py")]
            for m in members:
                m.name = m.name[len(prefix):]
            tf.extractall(src, members=members, filter="data")
    return src


def convert(ckpt: Path, src: Path) -> dict[str, Path]:
    """bf16, q8_0 and q4_0 GGUFs of `ckpt` (made once)."""
    out = ROOT / "gguf" / ckpt.name
    files = {q: out / f"{q}.gguf" for q in ("bf16", "q8_0", "q4_0")}
    if all(f.is_file() for f in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    hf = ROOT / "hf" / ckpt.name  # the checkpoint's files linked, plus a tokenizer: nothing written into it
    hf.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "config.json" and not (hf / f.name).exists():
            (hf / f.name).symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text())  # the converter picks its class by "architectures"
    cfg.setdefault("architectures", [{"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[cfg["model_type"]]])
    (hf / "config.json").unlink(missing_ok=True)
    (hf / "config.json").write_text(json.dumps(cfg, indent=1))
    text = sorted((_data_dir() / CORPUS).glob("*"))
    bpe = cfg["model_type"] == "qwen3_moe"  # the converter reads Qwen's vocabulary as a BPE tokenizer.json
    if not (hf / ("tokenizer.json" if bpe else "tokenizer.model")).is_file():
        if bpe:
            code = ("import sys; from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers; "
                    "from transformers import PreTrainedTokenizerFast; "
                    "t = Tokenizer(models.BPE()); t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); "
                    "t.decoder = decoders.ByteLevel(); "
                    f"t.train({list(map(str, text))!r}, trainers.BpeTrainer(vocab_size={cfg['vocab_size']}, "
                    "special_tokens=['<unk>', '<s>', '</s>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())); "
                    f"PreTrainedTokenizerFast(tokenizer_object=t, bos_token='<s>', eos_token='</s>').save_pretrained({str(hf)!r})")
        else:
            code = (f"import sentencepiece as spm; spm.SentencePieceTrainer.train(input={','.join(map(str, text))!r}, "
                    f"model_prefix={str(hf / 'tokenizer')!r}, vocab_size={cfg['vocab_size']}, model_type='unigram', "
                    "input_sentence_size=200000, shuffle_input_sentence=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)")
        _sh([sys.executable, "-c", code], env=_env())
    env = _env(extra=[src / "gguf-py", src])
    # a BPE vocabulary's pre-tokenizer is recognised by hashing how it tokenizes a test text; this one
    # is new to llama.cpp, so it is named "qwen2" (the regex llama.cpp would split *text* with: the
    # benchmark feeds token ids, so it never does)
    convert_py = ("import runpy, sys; import conversion.base as b; "
                  + ("b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'; " if bpe else "")
                  + "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    for q in ("bf16", "q8_0"):
        if not files[q].is_file():
            _sh([sys.executable, "-c", convert_py, src / "convert_hf_to_gguf.py", hf, "--outtype", q, "--outfile", files[q]], env=env)
    if not files["q4_0"].is_file():
        code = ("import llama_cpp as L, sys; p = L.llama_model_quantize_default_params(); p.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_0; "
                "p.nthread = 2; sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
        _sh([sys.executable, "-c", code, files["bf16"], files["q4_0"]], env=env)
    return files


def _env(extra: list[Path] = ()) -> dict:
    path = [*map(str, extra), str(SITE), os.environ.get("PYTHONPATH", ""), str(REPO)]
    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(p for p in path if p))


# ------------------------------------------------------------------------------------------------
# one run (a subprocess)
# ------------------------------------------------------------------------------------------------
def _timed_feed(feed, prompt: list[int], forced: list[int]) -> dict:
    t0 = time.perf_counter()
    feed(prompt)
    ttft = time.perf_counter() - t0
    steps = []
    for tok in forced:
        t = time.perf_counter()
        feed([tok])
        steps.append(time.perf_counter() - t)
    return {"ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * statistics.median(steps[SKIP_STEPS:] or steps)}


def worker(job: dict) -> dict:
    from expertcache.stats import peak_rss_bytes

    prompt, forced = job["prompt"], job["forced"]
    if job["tool"] == "expertcache":
        import torch

        torch.set_num_threads(1)
        import expertcache
        from expertcache.decoding import Decoding

        eng = expertcache.load(job["model"], expert_budget="100%", memory_limit="auto" if job["limited"] else None,
                               memory_reserve=job.get("reserve", RESERVE), prefetch=job["prefetch"], io="direct", num_threads=1,
                               half_matmul=job.get("half_matmul", "exact"))
        dec = Decoding(eng.model)
        with torch.inference_mode():
            out = _timed_feed(dec.feed, prompt, forced)
        out["budget_bytes"] = eng.budget_bytes
        out["stall_seconds"] = eng.stats()["stall_seconds"]
    elif job["tool"] == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(model_path=job["model"], n_ctx=PROMPT_TOKENS + len(forced) + 16, n_batch=PROMPT_TOKENS,
                    n_ubatch=PROMPT_TOKENS, n_threads=1, n_threads_batch=1, use_mmap=True, verbose=False)
        out = _timed_feed(llm.eval, prompt, forced)
    elif job["tool"] == "accelerate":
        import torch

        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM

        # transformers' own loading with accelerate's device map: the checkpoint's per-expert tensors
        # become the fused experts transformers computes, and what does not fit in max_memory is
        # offloaded to disk (offload_folder), as a user of from_pretrained(device_map="auto") gets
        mem = {"cpu": job["cpu_bytes"]} if job.get("cpu_bytes") else None
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.bfloat16, device_map="auto" if mem else "cpu",
                                                     max_memory=mem, offload_folder=job["offload"])
        model.eval()
        from expertcache.decoding import Decoding

        dec = Decoding(model)
        with torch.inference_mode():
            out = _timed_feed(dec.feed, prompt, forced)
    else:
        raise ValueError(job["tool"])
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _drop_cache(paths: list[Path]) -> None:
    for p in paths:
        for f in [p] if p.is_file() else sorted(p.rglob("*")):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def run_one(job: dict, limit: int | None, files: list[Path]) -> dict:
    from expertcache.memlimit import MemoryCgroup

    _drop_cache(files)
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    t0 = time.perf_counter()
    with MemoryCgroup(limit) as cg:
        try:
            p = cg.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
            out, err = p.stdout, p.stderr
            status = "ok" if p.returncode == 0 else ("oom" if cg.oom_kills else "too small" if "is too small" in err else "failed")
        except subprocess.TimeoutExpired:
            out, err, status = "", "", "timeout"
        fig = cg.figures()
    res = {"status": status, "wall_s": time.perf_counter() - t0, "cgroup_peak_bytes": fig["peak_bytes"],
           "failcnt": fig["failcnt"]}
    if status == "ok":
        res.update(json.loads(out.strip().splitlines()[-1]))
    elif status in ("failed", "too small"):
        res["error"] = err.strip().splitlines()[-1][-300:] if err.strip() else f"exit {p.returncode}"
    return res


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def tools(ckpt: Path, ggufs: dict[str, Path], quick: bool) -> dict[str, dict]:
    """name -> job template and the files it reads."""
    out = {}
    variants = [("bf16", ckpt)] + [(q, ckpt.with_name(ckpt.name + s)) for q, s in (
        ("int8", "-int8"), ("int4", "-int4-g64"),  # experts quantized, dense weights bf16
        ("int8+dense8", "-int8+dense-int8"), ("int4+dense8", "-int4-g64+dense-int8"),  # dense weights int8 too, as q8_0's
        ("int4+dense4", "-int4-g64+dense-int4"))]  # and int4, as q4_0's
    for prec, d in variants:
        if not (d / "config.json").is_file():
            continue
        for pf in ("none", "next-gate") if not quick else ("next-gate",):
            out[f"expertcache {prec} {pf}"] = {"job": {"tool": "expertcache", "model": str(d), "prefetch": pf}, "files": [d]}
    out["expertcache bf16 next-gate, half_matmul=float32"] = {
        "job": {"tool": "expertcache", "model": str(ckpt), "prefetch": "next-gate", "half_matmul": "float32"}, "files": [ckpt]}
    for q, f in ggufs.items():
        out[f"llama.cpp {q} mmap"] = {"job": {"tool": "llama.cpp", "model": str(f)}, "files": [f]}
    if not quick:
        out["accelerate bf16"] = {"job": {"tool": "accelerate", "model": str(ckpt), "offload": str(ROOT / "offload")}, "files": [ckpt]}
    return out


def limits(fractions: list[str], ggufs: dict[str, Path]) -> dict[str, int | None]:
    size = ggufs["bf16"].stat().st_size
    out = {}
    for f in fractions:
        out[f if f == "none" else f"{f}%"] = None if f == "none" else int(size * int(f) / 100) + LLAMA_RUNTIME
    return out


def markdown(rep: dict) -> str:
    lims = list(rep["limits"])
    lines = [f"Peers on {rep['checkpoint']}: {PROMPT_TOKENS}-token prompt, then {rep['tokens']} teacher-forced decode steps; "
             f"1 thread; each run cold (model files dropped from the page cache) in a memory cgroup counting the page cache; "
             f"{rep['rounds']} round(s), median (min-max). Limits: % of the bf16 GGUF ({rep['gguf_bf16_bytes'] / MiB:.0f} MiB) "
             f"+ {LLAMA_RUNTIME // MiB} MiB.", "",
             "TPOT (ms):", "",
             "| tool | " + " | ".join(f"{l} ({'-' if v is None else f'{v / MiB:.0f} MiB'})" for l, v in rep["limits"].items()) + " |",
             "|---|" + "---:|" * len(lims)]
    for name in rep["tools"]:
        cells = [_cell(rep["results"].get(f"{name} @ {l}", []), "tpot_ms") for l in lims]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"TTFT, {PROMPT_TOKENS}-token prompt (ms):", "", "| tool | " + " | ".join(lims) + " |", "|---|" + "---:|" * len(lims)]
    for name in rep["tools"]:
        lines.append(f"| {name} | " + " | ".join(_cell(rep["results"].get(f"{name} @ {l}", []), "ttft_ms") for l in lims) + " |")
    lines += ["", "Peak memory (cgroup: RSS + page cache, MiB):", "", "| tool | " + " | ".join(lims) + " |", "|---|" + "---:|" * len(lims)]
    for name in rep["tools"]:
        lines.append(f"| {name} | " + " | ".join(
            _cell(rep["results"].get(f"{name} @ {l}", []), "cgroup_peak_bytes", scale=1 / MiB, fmt=".0f") for l in lims) + " |")
    return "\n".join(lines) + "\n"


def _cell(runs: list[dict], key: str, scale: float = 1.0, fmt: str = ".1f") -> str:
    if not runs:
        return "-"
    bad = [r["status"] for r in runs if r["status"] != "ok"]
    xs = [r[key] * scale for r in runs if r["status"] == "ok" and r.get(key) is not None]
    if not xs:
        return "/".join(sorted(set(bad))).upper() or "-"
    s = format(statistics.median(xs), fmt)
    if len(xs) > 1:
        s += f" ({format(min(xs), fmt)}-{format(max(xs), fmt)})"
    return s + (f" +{len(bad)} {'/'.join(sorted(set(bad)))}" if bad else "")


def plot(rep: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    fig, ax = plt.subplots(figsize=(9, 4.8))
    limited = [v for v in rep["limits"].values() if v]
    none_x = max(limited) * 1.25 / MiB if limited else 1.0  # --limits none alone: one column
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(rep["tools"]):
        xs, ys = [], []
        for l, v in rep["limits"].items():
            runs = [r for r in rep["results"].get(f"{name} @ {l}", []) if r["status"] == "ok"]
            if runs:
                xs.append(none_x if v is None else v / MiB)
                ys.append(statistics.median(r["tpot_ms"] for r in runs))
        if xs:
            style = "-" if name.startswith("expertcache") else "--" if name.startswith("llama.cpp") else ":"
            ax.plot(xs, ys, style, marker="o", color=colors[i % len(colors)], label=name)
    ticks = [v / MiB for v in rep["limits"].values() if v] + [none_x]
    ax.set_xticks(ticks, [f"{t:.0f}" for t in ticks[:-1]] + ["no limit"])
    ax.set_xlabel("memory limit (MiB, page cache counted)")
    ax.set_ylabel("TPOT (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title("Decode TPOT against the memory limit (no point: does not start)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", action="store_true", help="build llama-cpp-python from its sdist and convert the GGUFs, then stop")
    ap.add_argument("--sdist", help="a downloaded llama-cpp-python sdist (default: pip download it)")
    ap.add_argument("--cmake-args", default=CMAKE_ARGS,
                    help=f"llama.cpp's build options (default {CMAKE_ARGS!r}; on a VM whose AMX int8 faults, add -DGGML_NATIVE=OFF "
                         "and the AVX-512 flags without AMX: README, Benchmarks)")
    ap.add_argument("--out", default=str(REPO / "results" / "peers"))
    ap.add_argument("--limits", default="none,60,35", help="none and percentages of the bf16 GGUF's size (+ llama.cpp's runtime)")
    ap.add_argument("--tools", default=None, help="comma-separated substrings of tool names to keep")
    ap.add_argument("--tokens", type=int, default=None, help="decode steps per run (default 32; 16 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; 1 with --quick)")
    ap.add_argument("--fine", action="store_true", help="the fine-grained Qwen3-MoE-shaped checkpoint (decode.py --fine) instead of the 1 GB one")
    ap.add_argument("--quick", action="store_true", help="1 round, 16 tokens, next-gate only, no accelerate")
    ap.add_argument("--reserve", default=RESERVE, help=f"expertcache's --memory-reserve under a limit (default {RESERVE}; the fine "
                                                       "checkpoint's 512-token prompt needs more: docs/memory.md)")
    ap.add_argument("--report-only", action="store_true", help="write peers.md and peers.png again from --out's peers.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    out = Path(args.out)
    if args.report_only:  # tables and plot again from peers.json
        rep = json.loads((out / "peers.json").read_text())
        (out / "peers.md").write_text(markdown(rep))
        plot(rep, out / "peers.png")
        print(markdown(rep))
        return 0
    from expertcache.memlimit import available

    why = available()
    if why is not None:
        print(f"peers.py: the runs need a writable memory cgroup: {why}", file=sys.stderr)
        return 2
    spec = FINE_SPEC if args.fine else CkptSpec()
    ckpt = build_checkpoint(None, spec)
    src = install(args.sdist, args.cmake_args)
    ggufs = convert(ckpt, src)
    if args.setup:
        return 0
    tokens = args.tokens or (16 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 2)
    ts = tools(ckpt, ggufs, args.quick)
    if args.tools:
        keep = [k.strip() for k in args.tools.split(",")]
        ts = {n: t for n, t in ts.items() if any(k in n for k in keep)}
    lims = limits(args.limits.split(","), ggufs)
    ids = prompt_ids(spec, PROMPT_TOKENS + tokens, seed=4321)
    rep = {"checkpoint": str(ckpt), "gguf_bf16_bytes": ggufs["bf16"].stat().st_size, "tokens": tokens, "rounds": rounds, "reserve": args.reserve,
           "limits": lims, "tools": list(ts), "results": {}, "when": time.strftime("%Y-%m-%d %H:%M"),
           "machine": {"cpus": os.cpu_count()}}
    out.mkdir(parents=True, exist_ok=True)
    if any(t["job"]["tool"] == "expertcache" for t in ts.values()):  # built here once, not by a worker in its cgroup
        from expertcache import kernels

        kernels.available()
    order = [(n, l) for l in lims for n in ts]
    for rnd in range(rounds):
        for name, lim in order if rnd % 2 == 0 else order[::-1]:
            job = dict(ts[name]["job"], prompt=ids[:PROMPT_TOKENS], forced=ids[PROMPT_TOKENS:], limited=lims[lim] is not None,
                       reserve=args.reserve)
            if job["tool"] == "accelerate" and lims[lim] is not None:
                job["cpu_bytes"] = max(lims[lim] - 450 * MiB, 64 * MiB)  # what the limit leaves beside torch and transformers
            r = run_one(job, lims[lim], ts[name]["files"])
            rep["results"].setdefault(f"{name} @ {lim}", []).append(r)
            what = (f"TPOT {r['tpot_ms']:.1f} ms, TTFT {r['ttft_ms']:.0f} ms" if r["status"] == "ok" else r["status"].upper()
                    + (f" ({r.get('error')})" if r.get("error") else ""))
            print(f"round {rnd} {name:>28} @ {lim:>4}: {what}, cgroup peak {r['cgroup_peak_bytes'] / MiB:.0f} MiB, "
                  f"{r['wall_s']:.0f} s", flush=True)
            (out / "peers.json").write_text(json.dumps(rep, indent=1))
    md = markdown(rep)
    (out / "peers.md").write_text(md)
    plot(rep, out / "peers.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
