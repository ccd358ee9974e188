"""`make bench-sidecar`: direct vs the Python sidecar vs Envoy, in one run.

Each proxy is its own process in front of the same upstream process, on its inbound mTLS listener
(client certificate: router, upstream service: inference), with its access log on. Measured: unary
calls at concurrency 1 and 32 and streams of 100 messages; latency p50/p99 and, for the proxies, CPU
time per call and per streamed message (all threads' on-CPU time from /proc/<pid>/task/*/schedstat)
before and after each phase; three rounds, medians.
Writes bench/results/sidecar.json and sidecar.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.ports import free_port
from sidecar import certs
from sidecar.envoy_render import EnvoyPorts, render_to_file

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")
STREAM_MESSAGES = 100
ROUNDS = 7  # every figure is the median over rounds; ratios and added latencies are paired within a round


def merge_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per proxy and phase: the median of each figure over the rounds (counts are per round)."""
    merged: dict[str, dict[str, Any]] = {}
    for proxy, phases in rounds[0].items():
        merged[proxy] = {}
        for phase, first in phases.items():
            entry: dict[str, Any] = {}
            for key, value in first.items():
                values = [r[proxy][phase][key] for r in rounds]
                entry[key] = statistics.median(values) if isinstance(value, float) else value
            entry["rounds"] = len(rounds)
            merged[proxy][phase] = entry
    return merged


def cpu_seconds(pid: int) -> float:
    """On-CPU time of every thread of `pid` in nanosecond resolution (schedstat), else utime+stime in ticks
    (a 10 ms tick is ~14 % of Envoy's CPU for a whole stream phase)."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime (fields 14, 15)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start(argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, **kw)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_port(port: int, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


async def phase_unary(stub: pb_grpc.InferenceServiceStub, concurrency: int, calls: int) -> list[float]:
    latencies: list[float] = []
    request = pb.CountTokensRequest(prompt="hello world")

    async def worker(n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            await stub.CountTokens(request, timeout=10)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    return latencies


async def phase_stream(stub: pb_grpc.InferenceServiceStub, streams: int) -> list[float]:
    request = pb.GenerateRequest(prompt="x", sampling=generation_pb2.SamplingParams(max_tokens=STREAM_MESSAGES))
    durations = []
    for _ in range(streams):
        t0 = time.perf_counter()
        got = 0
        async for _message in stub.Generate(request, timeout=30):
            got += 1
        assert got == STREAM_MESSAGES
        durations.append(time.perf_counter() - t0)
    return durations


async def measure(name: str, address: str, credentials: grpc.ChannelCredentials | None, pid: int | None,
                  scale: float, streams: bool = True) -> dict[str, Any]:
    options = [("grpc.ssl_target_name_override", "inference")]
    channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials
               else grpc.aio.insecure_channel(address))
    result: dict[str, Any] = {}
    async with channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await phase_unary(stub, 1, 200)  # warm-up: connections, caches
        if streams:
            await phase_stream(stub, 3)
        phases = [("unary_c1", lambda: phase_unary(stub, 1, int(1500 * scale)), 1),
                  ("unary_c32", lambda: phase_unary(stub, 32, int(3200 * scale)), 1)]
        if streams:
            phases.append(("stream_100", lambda: phase_stream(stub, int(60 * scale)), STREAM_MESSAGES))
        for phase, run, per in phases:
            cpu0 = cpu_seconds(pid) if pid else 0.0
            t0 = time.perf_counter()
            latencies = await run()
            wall = time.perf_counter() - t0
            cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
            units = len(latencies) * per
            result[phase] = {
                "count": len(latencies), "p50_ms": percentile(latencies, 0.5) * 1e3,
                "p99_ms": percentile(latencies, 0.99) * 1e3, "mean_ms": statistics.fmean(latencies) * 1e3,
                "throughput_per_s": units / wall,
                "proxy_cpu_us_per_unit": (cpu / units * 1e6) if pid else None,
                "unit": "message" if per > 1 else "call",
            }
            print(f"{name:>8} {phase:>10}: p50 {result[phase]['p50_ms']:.3f} ms  p99 {result[phase]['p99_ms']:.3f} ms"
                  f"  cpu/{result[phase]['unit']} {result[phase]['proxy_cpu_us_per_unit'] or 0:.1f} us", flush=True)
    return result


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    proxies = ["python", "envoy"]
    colors = {"python": "#3572A5", "envoy": "#AC2B4E"}
    for ax, key, title in ((axes[0], "p50_ms", "added p50 latency (ms)"), (axes[1], "p99_ms", "added p99 latency (ms)")):
        phases = ["unary_c1", "unary_c32", "stream_100"]
        for i, proxy in enumerate(proxies):
            values = [results[proxy][p][key] - results["direct"][p][key] for p in phases]
            ax.bar([x + i * 0.38 for x in range(len(phases))], values, 0.38, label=proxy, color=colors[proxy])
        ax.set_xticks([x + 0.19 for x in range(len(phases))], phases)
        ax.set_title(title)
        ax.legend()
    labels = ["unary c1 /call", "unary c32 /call", "stream /message"]
    for i, proxy in enumerate(proxies):
        values = [results[proxy][p]["proxy_cpu_us_per_unit"] for p in ("unary_c1", "unary_c32", "stream_100")]
        axes[2].bar([x + i * 0.38 for x in range(3)], values, 0.38, label=proxy, color=colors[proxy])
    axes[2].set_xticks([x + 0.19 for x in range(3)], labels)
    axes[2].set_title("proxy CPU (µs)")
    axes[2].legend()
    fig.suptitle("Sidecar overhead: Python sidecar vs Envoy (same run, same upstream, mTLS inbound)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(out: Path, scale: float, only: str = "") -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    pki = work / "certs"
    certs.init_ca(pki)
    for service in ("router", "inference"):
        certs.issue_to(pki, service)
    policy = ROOT / "deploy/policy/mesh-policy.yaml"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upstream = start([sys.executable, "-m", "bench.sidecar.upstream"], work / "upstream.log", cwd=ROOT)
        procs.append(upstream)
        deadline = time.monotonic() + 30
        while not (work / "upstream.log").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)  # noqa: ASYNC251
        upstream_port = int((work / "upstream.log").read_text().split()[0])
        upstream_addr = f"127.0.0.1:{upstream_port}"

        py_port, py_admin = free_port(), free_port()
        python_sidecar = start([sys.executable, "-m", "sidecar", "--policy", str(policy), "--service", "inference",
                                "--certs", str(pki), "--upstream", upstream_addr, "--inbound-port", str(py_port),
                                "--outbound-port", "-1", "--admin-port", str(py_admin), "--metrics-port", "-1"],
                               work / "python-sidecar.log", cwd=ROOT)
        procs.append(python_sidecar)
        floor_port = free_port()
        floor = start([sys.executable, "-m", "bench.sidecar.floor_proxy", str(pki), str(floor_port), upstream_addr],
                      work / "floor-proxy.log", cwd=ROOT)
        procs.append(floor)
        envoy_ports = EnvoyPorts(inbound=free_port(), outbound=None, admin=free_port())
        config = render_to_file(policy, "inference", work / "envoy.yaml", certs_dir=pki, upstream=upstream_addr,
                                peers={}, ports=envoy_ports)
        envoy = start([str(VENV_BIN / "envoy"), "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
                       "-l", "error"], work / "envoy.log")
        procs.append(envoy)
        wait_port(py_port)
        wait_port(floor_port)
        wait_port(envoy_ports.inbound)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{envoy_ports.admin}/ready", timeout=1) as reply:  # noqa: ASYNC210
                    if reply.read().strip() == b"LIVE":
                        break
            except OSError:
                time.sleep(0.05)  # noqa: ASYNC251
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.pem").read_bytes(), private_key=(pki / "router.key").read_bytes(),
            certificate_chain=(pki / "router.pem").read_bytes())
        if only == "python":  # profiling aid: load the Python sidecar only, print its PID, write nothing
            print(f"python sidecar pid {python_sidecar.pid}", flush=True)
            await measure("python", f"127.0.0.1:{py_port}", credentials, python_sidecar.pid, scale)
            return {}
        rounds: list[dict[str, dict[str, Any]]] = []
        for number in range(1, ROUNDS + 1):  # direct, Python, Envoy back to back in every round
            print(f"round {number}/{ROUNDS}", flush=True)
            rounds.append({
                "direct": await measure("direct", upstream_addr, None, None, scale),
                "python": await measure("python", f"127.0.0.1:{py_port}", credentials, python_sidecar.pid, scale),
                "envoy": await measure("envoy", f"127.0.0.1:{envoy_ports.inbound}", credentials, envoy.pid,
                                       scale),
                "floor": await measure("floor", f"127.0.0.1:{floor_port}", credentials, floor.pid, scale,
                                       streams=False),
            })
    finally:
        for proc in reversed(procs):
            stop(proc)

    results = merge_rounds(rounds)
    tick_us = 1e6 / TICK  # /proc CPU times count in ticks: never divide by less than one tick's worth

    def per_round(value: Any) -> float:
        """The median over rounds of a figure computed within each round (paired: same machine state)."""
        return statistics.median(value(r) for r in rounds)

    def added(proxy: str, phase: str, key: str) -> float:
        return per_round(lambda r: r[proxy][phase][key] - r["direct"][phase][key])

    figures: dict[str, Any] = {}
    for proxy in ("python", "envoy"):
        for phase in ("unary_c1", "unary_c32", "stream_100"):
            figures[f"{proxy}_{phase}_added_p50_ms"] = added(proxy, phase, "p50_ms")
            figures[f"{proxy}_{phase}_added_p99_ms"] = added(proxy, phase, "p99_ms")
        figures[f"{proxy}_cpu_us_per_unary_call_c1"] = results[proxy]["unary_c1"]["proxy_cpu_us_per_unit"]
        figures[f"{proxy}_cpu_us_per_unary_call_c32"] = results[proxy]["unary_c32"]["proxy_cpu_us_per_unit"]
        figures[f"{proxy}_cpu_us_per_streamed_message"] = results[proxy]["stream_100"]["proxy_cpu_us_per_unit"]
    figures["floor_unary_c1_added_p50_ms"] = added("floor", "unary_c1", "p50_ms")
    figures["floor_cpu_us_per_unary_call_c32"] = results["floor"]["unary_c32"]["proxy_cpu_us_per_unit"]
    figures["floor_over_envoy_cpu_per_unary_call_c32"] = per_round(
        lambda r: r["floor"]["unary_c32"]["proxy_cpu_us_per_unit"] / r["envoy"]["unary_c32"]["proxy_cpu_us_per_unit"])
    figures["python_over_floor_cpu_per_unary_call_c32"] = per_round(
        lambda r: r["python"]["unary_c32"]["proxy_cpu_us_per_unit"] / r["floor"]["unary_c32"]["proxy_cpu_us_per_unit"])
    cpu_call_ratio = per_round(lambda r: r["python"]["unary_c32"]["proxy_cpu_us_per_unit"] / max(
        r["envoy"]["unary_c32"]["proxy_cpu_us_per_unit"], tick_us / r["envoy"]["unary_c32"]["count"]))
    cpu_msg_ratio = per_round(lambda r: r["python"]["stream_100"]["proxy_cpu_us_per_unit"] / max(
        r["envoy"]["stream_100"]["proxy_cpu_us_per_unit"], tick_us / (r["envoy"]["stream_100"]["count"]
                                                                     * STREAM_MESSAGES)))
    figures["python_over_envoy_cpu_per_unary_call_c32_per_round"] = [
        r["python"]["unary_c32"]["proxy_cpu_us_per_unit"] / r["envoy"]["unary_c32"]["proxy_cpu_us_per_unit"]
        for r in rounds]
    figures["python_over_envoy_cpu_per_streamed_message_per_round"] = [
        r["python"]["stream_100"]["proxy_cpu_us_per_unit"] / r["envoy"]["stream_100"]["proxy_cpu_us_per_unit"]
        for r in rounds]
    doc: dict[str, Any] = {
        "benchmark": "sidecar",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": "client --mTLS--> proxy inbound listener (authz, access log) --plaintext--> upstream process; "
                 "direct = client --plaintext--> upstream. Envoy --concurrency 1. "
                 f"{ROUNDS} rounds of direct, Python, Envoy and the grpc.aio floor back to back; medians over rounds. "
                 "floor = bench/sidecar/floor_proxy.py, a bare grpc.aio forwarder of unary calls (mTLS in, no "
                 "policy, tracing, logging or metrics): what any grpc.aio proxy pays per call.",
        "results": {
            "raw": {proxy: {phase: {k: v for k, v in data.items()} for phase, data in phases.items()}
                    for proxy, phases in results.items()},
            "figures": figures,
            "rounds": rounds,
            "units": {"*_ms": "milliseconds", "*_us_*": "microseconds of proxy CPU (user+system)",
                      "throughput_per_s": "calls or messages per second"},
        },
        "targets": [
            {"name": "python sidecar added p50 latency, unary, concurrency 1 (ms)",
             "measured": figures["python_unary_c1_added_p50_ms"], "target": 0.5, "better": "lower",
             "anchor": f"direct p50 {results['direct']['unary_c1']['p50_ms']:.3f} ms in the same run "
                       f"(median over {ROUNDS} rounds of the per-round difference)"},
            {"name": "python sidecar CPU per unary call as a multiple of Envoy's (concurrency 32)",
             "measured": cpu_call_ratio, "target": 2.0, "better": "lower",
             "anchor": f"Envoy {figures['envoy_cpu_us_per_unary_call_c32']:.1f} us/call in the same run "
                       f"(median over {ROUNDS} rounds of the per-round ratio); a bare grpc.aio forwarder "
                       f"{figures['floor_cpu_us_per_unary_call_c32']:.1f} us/call = "
                       f"{figures['floor_over_envoy_cpu_per_unary_call_c32']:.2f}x Envoy"},
            {"name": "python sidecar CPU per streamed message as a multiple of Envoy's",
             "measured": cpu_msg_ratio, "target": 3.0, "better": "lower",
             "anchor": f"Envoy {figures['envoy_cpu_us_per_streamed_message']:.1f} us/message in the same run "
                       f"(median over {ROUNDS} rounds of the per-round ratio)"},
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")  # noqa: ASYNC240
    plot(results, out.with_suffix(".png"))
    for target in doc["targets"]:
        verdict = "met" if target["measured"] <= target["target"] else "MISSED"
        print(f"{target['name']}: {target['measured']:.3f} (target {target['target']}) {verdict}")
    return doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/sidecar.json")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of calls (0.1 for a smoke run)")
    parser.add_argument("--only", choices=["python"], default="",
                        help="load only the Python sidecar and write no results (for profiling it)")
    args = parser.parse_args()
    asyncio.run(run(args.out, args.scale, args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
