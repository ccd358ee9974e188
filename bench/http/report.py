"""The HTTP benchmark's figures and files: raw timings in, bench/results/http.json (`results` + `targets`,
each target {"name", "measured", "target", "better", "anchor"}) and http.png out.

Ratios between ours and an anchor are the median over rounds of the ratio within a round (the two ran back
to back, under the same load); `results.ratios_of_medians` gives the ratios of the medians beside them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# What the issue saw on this machine: LiteLLM added about 20 ms p50; llama.cpp's server, 16 streams: about
# 64 tokens/s in all and a median TTFT about 8 s (it serves one request at a time).
ISSUE_REFERENCE = {"litellm_added_p50_ms": 20.0, "llama_server_16_stream_aggregate_tok_s": 64.0,
                   "llama_server_16_stream_median_ttft_ms": 8000.0}
SERVERS = {"ours": "this mesh (router HTTP)", "llama_cpp_server": "llama.cpp server"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired(ours: list[float], anchor: list[float]) -> float | None:
    pairs = [a / b for a, b in zip(ours, anchor, strict=True) if b]
    return statistics.median(pairs) if pairs else None


def latency_results(latency: dict[str, list[float]]) -> dict[str, Any]:
    p50 = {name: statistics.median(values) for name, values in latency.items()}
    def paired_median(a: str, b: str) -> float:
        return statistics.median(x - y for x, y in zip(latency[a], latency[b], strict=True))

    return {
        "rounds": len(latency["http_router"]),
        "p50_ms": p50,
        "p99_ms": {name: pct(values, 0.99) for name, values in latency.items()},
        "http_added_over_grpc_p50_ms": p50["http_router"] - p50["grpc_router"],
        "http_added_over_grpc_paired_median_ms": paired_median("http_router", "grpc_router"),
        "ours_http_added_over_inference_p50_ms": p50["http_router"] - p50["grpc_direct"],
        "ours_http_added_over_inference_paired_median_ms": paired_median("http_router", "grpc_direct"),
        "ours_grpc_added_over_inference_p50_ms": p50["grpc_router"] - p50["grpc_direct"],
        "litellm_added_over_llama_server_p50_ms": p50["litellm"] - p50["llama_direct"],
        "litellm_added_over_llama_server_paired_median_ms": paired_median("litellm", "llama_direct"),
    }


def stream_results(streams: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for server, by_n in streams.items():
        out[server] = {n: {"aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in rounds),
                           "median_ttft_ms": statistics.median(r["median_ttft_ms"] for r in rounds),
                           "tokens_per_stream": sorted({t for r in rounds for t in r["tokens"]}),
                           "rounds": len(rounds)} for n, rounds in by_n.items()}
    counts = {server: {n: [r["tokens"] for r in rounds] for n, rounds in by_n.items()}
              for server, by_n in streams.items()}
    ours, theirs = counts["ours"], counts["llama_cpp_server"]
    out["token_counts_equal"] = all(sorted(a) == sorted(b) for n in ours for a, b in zip(ours[n], theirs[n],
                                                                                         strict=True))
    return out


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    latency = latency_results(raw["latency_ms"])
    streams = stream_results(raw["streams"])
    ours, llama = raw["streams"]["ours"], raw["streams"]["llama_cpp_server"]
    many = max(ours, key=int)

    def per_round(key: str, n: str) -> float | None:
        return paired([r[key] for r in ours[n]], [r[key] for r in llama[n]])

    paired_ratios = {
        f"aggregate_{many}_streams_ours_over_llama_server": per_round("aggregate_tok_s", many),
        f"median_ttft_{many}_streams_ours_over_llama_server": per_round("median_ttft_ms", many),
        "ttft_1_stream_ours_over_llama_server": per_round("median_ttft_ms", "1"),
        "ours_added_over_litellm_added": _ratio(latency["ours_http_added_over_inference_p50_ms"],
                                                latency["litellm_added_over_llama_server_p50_ms"]),
        "ours_added_over_litellm_added_paired_medians": _ratio(
            latency["ours_http_added_over_inference_paired_median_ms"],
            latency["litellm_added_over_llama_server_paired_median_ms"]),
    }
    of_medians = {
        f"aggregate_{many}_streams_ours_over_llama_server": _ratio(streams["ours"][many]["aggregate_tok_s"],
                                                                   streams["llama_cpp_server"][many]["aggregate_tok_s"]),
        f"median_ttft_{many}_streams_ours_over_llama_server": _ratio(
            streams["ours"][many]["median_ttft_ms"], streams["llama_cpp_server"][many]["median_ttft_ms"]),
        "ttft_1_stream_ours_over_llama_server": _ratio(streams["ours"]["1"]["median_ttft_ms"],
                                                       streams["llama_cpp_server"]["1"]["median_ttft_ms"]),
    }
    return {"latency": latency, "streams": streams, "ratios": paired_ratios, "ratios_of_medians": of_medians,
            "issue_reference_figures": ISSUE_REFERENCE}


def targets(results: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    latency, ratios, streams = results["latency"], results["ratios"], results["streams"]
    many = max(streams["ours"], key=int)
    rounds = f"{latency['rounds']} interleaved rounds in rotating order, same run, {settings['transport']}"
    counts = ("token counts per stream equal" if streams["token_counts_equal"] else
              f"token counts per stream differ (ours {streams['ours'][many]['tokens_per_stream']}, llama.cpp "
              f"server {streams['llama_cpp_server'][many]['tokens_per_stream']}: tokens/s counts what each sent)")
    llama = f"llama.cpp's server (llama-cpp-python {settings['versions'].get('llama_cpp_python')}, same GGUF, " \
            f"{settings['threads']} threads), streamed chat completions, {settings['new_tokens']} new tokens, " \
            f"distinct prompts, greedy, {settings['stream_rounds']} alternating rounds, {counts}"
    return [
        {"name": "HTTP added latency p50 (router HTTP p50 - router gRPC p50), 1-token chat completion",
         "measured": latency["http_added_over_grpc_p50_ms"], "target": 1.0, "better": "lower",
         "anchor": f"the same request by gRPC Complete through the same router, {rounds}; median of the per-round "
                   f"differences {latency['http_added_over_grpc_paired_median_ms']:.2f} ms"},
        {"name": "our HTTP added p50 over inference / LiteLLM's added p50 over its backend",
         "measured": ratios["ours_added_over_litellm_added"], "target": 0.2, "better": "lower",
         "anchor": f"LiteLLM proxy {settings['versions'].get('litellm')} (config file, no database) in front of "
                   f"llama.cpp's server added {latency['litellm_added_over_llama_server_p50_ms']:.2f} ms p50 over "
                   f"calling that server directly; router HTTP added "
                   f"{latency['ours_http_added_over_inference_p50_ms']:.2f} ms over Generate on the inference "
                   f"replica directly; 1-token chat completions, {rounds}; with medians of the per-round "
                   f"differences instead: ours {latency['ours_http_added_over_inference_paired_median_ms']:.2f} ms, "
                   f"LiteLLM {latency['litellm_added_over_llama_server_paired_median_ms']:.2f} ms, ratio "
                   f"{_fmt(ratios['ours_added_over_litellm_added_paired_medians'])}"},
        {"name": f"{many}-stream aggregate tokens/s, ours / llama.cpp server",
         "measured": ratios[f"aggregate_{many}_streams_ours_over_llama_server"], "target": 2.0, "better": "higher",
         "anchor": llama},
        {"name": f"{many}-stream median TTFT, ours / llama.cpp server",
         "measured": ratios[f"median_ttft_{many}_streams_ours_over_llama_server"], "target": 0.25,
         "better": "lower", "anchor": llama},
        {"name": "1-stream TTFT, ours / llama.cpp server", "measured": ratios["ttft_1_stream_ours_over_llama_server"],
         "target": 0.7, "better": "lower", "anchor": llama},
    ]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def write(raw: dict[str, Any], settings: dict[str, Any], machine: dict[str, Any], out: Path,
          name: str = "http") -> dict[str, Any]:
    """Summarise `raw`, write `out/<name>.json` and `out/<name>.png`; returns the document."""
    results = summarise(raw)
    document = _rounded({"machine": machine, "settings": settings, "results": {**results, "raw": raw},
                         "targets": targets(results, settings)})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(results, out / f"{name}.png")
    return document


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.4))
    latency = results["latency"]
    added = {"router HTTP\nover router gRPC": ("http_added_over_grpc_p50_ms", "http_added_over_grpc_paired_median_ms"),
             "router HTTP\nover inference": ("ours_http_added_over_inference_p50_ms",
                                             "ours_http_added_over_inference_paired_median_ms"),
             "LiteLLM over\nllama.cpp server": ("litellm_added_over_llama_server_p50_ms",
                                                "litellm_added_over_llama_server_paired_median_ms")}
    for offset, which, label in ((-0.2, 0, "p50 - p50"), (0.2, 1, "median of per-round differences")):
        left.bar([x + offset for x in range(len(added))], [latency[keys[which]] for keys in added.values()],
                 width=0.4, label=label)
    left.legend()
    left.set_xticks(range(len(added)), list(added))
    left.axhline(0, color="black", linewidth=0.8)
    left.set_ylabel("added p50 (ms), 1-token chat completion")
    left.set_title(f"Added latency, {latency['rounds']} interleaved rounds")
    streams = results["streams"]
    levels = sorted(streams["ours"], key=int)
    xs = range(len(levels))
    for offset, (server, label) in zip((-0.2, 0.2), SERVERS.items(), strict=True):
        middle.bar([x + offset for x in xs], [streams[server][n]["median_ttft_ms"] for n in levels], width=0.4,
                   label=label)
        right.bar([x + offset for x in xs], [streams[server][n]["aggregate_tok_s"] for n in levels], width=0.4,
                  label=label)
    for axis, title, unit in ((middle, "Median TTFT, streamed (log scale)", "ms"),
                              (right, "Aggregate tokens/s, streamed", "tokens/s")):
        axis.set_xticks(list(xs), [f"{n} stream{'s' if n != '1' else ''}" for n in levels])
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.legend()
    middle.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
