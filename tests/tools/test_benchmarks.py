"""The benchmarks' report logic (the benchmarks themselves run by hand, not timed here):
benchmarks/peers.py's table cells and limits, benchmarks/decode.py's --memory-limit parsing,
benchmarks/serve.py's targets and table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
MiB = 2**20


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def peers():
    return _load("peers")


def test_peer_cells_give_median_spread_and_failures(peers):
    ok = lambda t: {"status": "ok", "tpot_ms": t}  # noqa: E731
    assert peers._cell([], "tpot_ms") == "-"
    assert peers._cell([ok(30.0)], "tpot_ms") == "30.0"
    assert peers._cell([ok(30.0), ok(50.0), ok(34.0)], "tpot_ms") == "34.0 (30.0-50.0)"
    assert peers._cell([{"status": "oom"}, {"status": "oom"}], "tpot_ms") == "OOM"
    assert peers._cell([{"status": "timeout"}, {"status": "oom"}], "tpot_ms") == "OOM/TIMEOUT"
    assert peers._cell([ok(30.0), {"status": "timeout"}], "tpot_ms") == "30.0 +1 timeout"


def test_peer_limits_are_fractions_of_the_bf16_gguf_plus_the_runtime(peers, tmp_path):
    f = tmp_path / "bf16.gguf"
    f.write_bytes(b"\0" * 1000)
    lims = peers.limits(["none", "60", "35"], {"bf16": f})
    assert lims == {"none": None, "60%": 600 + peers.LLAMA_RUNTIME, "35%": 350 + peers.LLAMA_RUNTIME}


def test_peer_markdown_has_a_row_per_tool_and_a_column_per_limit(peers):
    rep = {"checkpoint": "ck", "gguf_bf16_bytes": 1000 * MiB, "tokens": 8, "rounds": 1,
           "limits": {"none": None, "60%": 700 * MiB}, "tools": ["a", "b"],
           "results": {"a @ none": [{"status": "ok", "tpot_ms": 10.0, "ttft_ms": 900.0, "cgroup_peak_bytes": 800 * MiB}],
                       "b @ 60%": [{"status": "oom", "cgroup_peak_bytes": 700 * MiB}]}}
    md = peers.markdown(rep)
    assert "| a | 10.0 | - |" in md and "| b | - | OOM |" in md
    assert "| a | 900.0 | - |" in md  # TTFT table
    assert "| a | 800 | - |" in md  # peak memory table (MiB)


def test_decode_memory_limit_parses_peak_and_sizes():
    decode = _load("decode")
    assert decode.parse_limit("peak") == (True, 0)
    assert decode.parse_limit("peak+64MiB") == (True, 64 * MiB)
    assert decode.parse_limit("900MiB") == (False, 900 * MiB)


def _serve_result(tps: float, bpt: float, ttft99: float) -> dict:
    return {"tokens_per_s": tps, "bytes_per_token": bpt, "ttft_p50_s": ttft99 / 2, "ttft_p99_s": ttft99, "tpot_p50_s": 0.05,
            "tpot_p99_s": 0.06, "mean_batch": 3.0}


def test_serve_targets_judge_throughput_scaling_and_expert_aware_gains():
    serve = _load("serve")
    rep = {"max_batch": 16, "tokens": 32, "requests": 2, "cpus": 2, "server_flags": "", "results": {"m": {"50%": {
        "fcfs": {"1": _serve_result(10, 100e6, 1), "16": _serve_result(45, 30e6, 2), "32": _serve_result(40, 30e6, 4)},
        "expert-aware": {"1": _serve_result(10, 100e6, 1), "16": _serve_result(45, 30e6, 2), "32": _serve_result(41, 23e6, 7)}}}}}
    targets = serve.targets(rep)
    assert [t["met"] for t in targets] == [True, False]  # 4.5x scaling; 23% fewer bytes but p99 TTFT 1.75x
    assert "4.50x" in targets[0]["value"] and "23% fewer" in targets[1]["value"]
    rep["targets"] = targets
    md = serve.markdown(rep)
    assert "| 50% | 32 | 40.0 / 41.0 | 4.00 / 4.10 |" in md and "(NOT met)" in md


def test_serve_rounds_give_median_cells_and_ratios_paired_round_by_round():
    """--rounds: each cell is its rounds' medians; 16 clients over one is the median of the ratios
    of the same round (adjacent in time, so the machine's swings cancel), not the medians' ratio."""
    serve = _load("serve")
    one = serve.median_cell([_serve_result(10, 100e6, 1), _serve_result(14, 90e6, 1), _serve_result(12, 80e6, 1)])
    sixteen = serve.median_cell([_serve_result(40, 30e6, 2), _serve_result(42, 20e6, 2), _serve_result(60, 25e6, 2)])
    assert one["tokens_per_s"] == 12 and one["bytes_per_token"] == 90e6 and one["rounds"] == [10, 14, 12]
    assert serve.paired_ratio(sixteen, one) == (4.0, 3.0, 5.0)  # 4.0, 3.0, 5.0 round by round; 42 / 12 = 3.5
    rep = {"max_batch": 16, "tokens": 32, "requests": 2, "rounds": 3, "cpus": 2, "server_flags": "",
           "results": {"m": {"50%": {"fcfs": {"1": one, "16": sixteen}}}}}
    rep["targets"] = serve.targets(rep)
    assert rep["targets"][0]["met"] and rep["targets"][0]["value"] == "4.00x (3.00-5.00 over 3 rounds)"
    md = serve.markdown(rep)
    assert "the median of 3 interleaved rounds" in md and "| 50% | 16 | 42.0 / - | 4.00 / - |" in md


def test_serve_percentiles():
    serve = _load("serve")
    assert serve.percentile([], 0.5) is None
    assert serve.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and serve.percentile([5.0], 0.99) == 5.0


def test_miss_copy_markdown_has_a_row_per_engine_and_the_quality_against_exact():
    mc = _load("miss_copy")
    eng = {"tpot_ms": 40.0, "ratio_vs_bf16": 0.5, "hit_rate": 0.9, "mb_read_per_token": 60.0, "stall_ms_per_token": 3.0,
           "low_share": 0.7, "upgrades_per_token": 0.5, "cache_slots": 16}
    row = {"perplexity": 10.0, "accuracy": 0.75, "low_share": None, "bytes_read_per_token": 2e6, "tpot_ms": 9.0}
    rep = {"when": "now", "speed": [{"label": "25%", "tokens": 8, "engines": {"bf16": {**eng, "ratio_vs_bf16": 1.0, "low_share": 0.0},
                                                                         "bf16 + int4 miss copy": eng}}],
           "quality": [{"budget": 25, "tokens": 100, "items": 10, "rows": {"exact": row, "exact runs": [10.0, 10.0],
                                                                          "miss copy": {**row, "perplexity": 10.1, "low_share": 0.8}}}]}
    md = mc.markdown(rep)
    assert "| bf16 + int4 miss copy | 16 | 40.0 | 0.50 | 90.0% | 60.0 | 3.0 | 70.0% | 0.50 |" in md
    assert "| miss copy | 10.100 | +1.00% | 75.0% | +0.0 | 80.0% | 2.00 | 9.00 |" in md
    assert "exact runs" not in md.split("exact's perplexity")[0]
