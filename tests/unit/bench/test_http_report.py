"""The HTTP benchmark's result writer: `results` + `targets` in the shape every benchmark file here has,
the ratios computed round by round, and a PNG beside the JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bench.http import report

SETTINGS = {"transport": "plaintext", "threads": 2, "new_tokens": 64, "stream_rounds": 2,
            "versions": {"llama_cpp_python": "0.3.16", "litellm": "1.80.0"}}
MACHINE = {"cpus": 2, "load_average_at_start": [1.0, 1.0, 1.0]}


def stream_round(ttft_ms: float, tok_s: float, streams: int, tokens: int = 64) -> dict[str, object]:
    return {"ttft_ms": [ttft_ms] * streams, "tokens": [tokens] * streams, "elapsed_s": 1.0,
            "aggregate_tok_s": tok_s, "median_ttft_ms": ttft_ms}


def raw_timings(llama_tokens: int = 64) -> dict[str, object]:
    return {
        "latency_ms": {"grpc_direct": [100.0, 102.0, 104.0], "grpc_router": [103.0, 105.0, 107.0],
                       "http_router": [103.5, 105.5, 107.5], "llama_direct": [30.0, 31.0, 32.0],
                       "litellm": [50.0, 51.0, 52.0]},
        "streams": {
            "ours": {"1": [stream_round(100, 60, 1), stream_round(120, 50, 1)],
                     "16": [stream_round(400, 300, 16), stream_round(500, 240, 16)]},
            "llama_cpp_server": {"1": [stream_round(200, 80, 1, llama_tokens), stream_round(200, 100, 1, llama_tokens)],
                                 "16": [stream_round(8000, 60, 16, llama_tokens),
                                        stream_round(10000, 60, 16, llama_tokens)]},
        },
    }


def test_writes_results_and_targets_in_the_benchmark_shape(tmp_path: Path) -> None:
    document = report.write(raw_timings(), SETTINGS, MACHINE, tmp_path)

    on_disk = json.loads((tmp_path / "http.json").read_text())
    assert on_disk == document
    assert set(on_disk) >= {"machine", "settings", "results", "targets"}
    names = [t["name"] for t in on_disk["targets"]]
    assert len(names) == 5 and len(set(names)) == 5
    for entry in on_disk["targets"]:
        assert set(entry) == {"name", "measured", "target", "better", "anchor"}
        assert entry["better"] in ("lower", "higher")
        assert isinstance(entry["measured"], float) and isinstance(entry["target"], float)
        assert entry["anchor"]
    assert (tmp_path / "http.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_differences_of_p50s_and_round_by_round_ratios(tmp_path: Path) -> None:
    targets = {t["name"]: t["measured"] for t in report.write(raw_timings(), SETTINGS, MACHINE, tmp_path)["targets"]}

    assert targets["HTTP added latency p50 (router HTTP p50 - router gRPC p50), 1-token chat completion"] == 0.5
    # (105.5 - 102) / (51 - 31)
    assert targets["our HTTP added p50 over inference / LiteLLM's added p50 over its backend"] == 0.175
    # rounds: 300/60 = 5, 240/60 = 4 -> median 4.5; 400/8000, 500/10000 -> 0.05; 100/200, 120/200 -> 0.55
    assert targets["16-stream aggregate tokens/s, ours / llama.cpp server"] == 4.5
    assert targets["16-stream median TTFT, ours / llama.cpp server"] == 0.05
    assert targets["1-stream TTFT, ours / llama.cpp server"] == 0.55


def test_token_counts_are_compared_and_a_difference_is_said(tmp_path: Path) -> None:
    equal = report.write(raw_timings(), SETTINGS, MACHINE, tmp_path)
    unequal = report.write(raw_timings(llama_tokens=40), SETTINGS, MACHINE, tmp_path)

    assert equal["results"]["streams"]["token_counts_equal"] is True
    assert unequal["results"]["streams"]["token_counts_equal"] is False
    assert "differ" in unequal["targets"][2]["anchor"]
