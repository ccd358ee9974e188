"""The KV-cache is bounded in bytes: a long prompt beside short streams keeps the replica's resident
memory (read from /proc) near what their caches need; a request that can never fit its replica's KV
budget is refused naming the numbers; one that cannot fit now waits its turn; length and queue room
are checked before any tokenizing."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from tests.conftest import ROOT
from tests.integration.inference.helpers import generate, request
from tests.integration.inference.test_inference_batching import LONG, wait_for_report

MIB = 1 << 20
SENTENCE = "The history of the river valley shows how farmers, traders and builders shaped the land. "


def text_of(model, tokens: int, salt: int) -> str:
    """A prompt of exactly `tokens` tokens."""
    text = f"Story {salt}. " + SENTENCE * (tokens // 10)
    return model.decode(model.encode(text)[:tokens])


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """The process's peak resident size (VmHWM) restarts from its current size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def launch(processes: list[subprocess.Popen[bytes]], config: Path, settings: dict[str, object]) -> subprocess.Popen[bytes]:
    """A replica started the way the launcher starts one (stopped by PID when the test ends)."""
    config.write_text(yaml.safe_dump({"inference": settings}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference", "--port", "0", "--config", str(config),
         "--replica-id", "kv-memory", "--threads", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    processes.append(proc)
    return proc


async def start_replica(processes: list[subprocess.Popen[bytes]], tmp_path: Path,
                        settings: dict[str, object]) -> tuple[subprocess.Popen[bytes], str]:
    proc = await asyncio.to_thread(launch, processes, tmp_path / "mesh.yaml", settings)
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)).decode()
        assert line, f"the replica exited early with {proc.wait()}"
        if found := re.search(r"listening on (\S+:\d+)", line):
            return proc, found.group(1)


async def test_long_prompt_beside_15_short_streams_keeps_rss_within_the_kv_budget(
        processes, tmp_path, model) -> None:
    budget = 256 * MIB
    proc, address = await start_replica(processes, tmp_path, {"kv_budget_bytes": budget})
    long_prompt, shorts = text_of(model, 1500, 0), [text_of(model, 100, salt) for salt in range(1, 16)]
    async with grpc.aio.insecure_channel(address) as chan:
        stub = pb2_grpc.InferenceServiceStub(chan)
        await generate(stub, request(shorts[0], max_tokens=4))  # warm: first-run allocations
        idle_kib = status_kib(proc.pid, "VmRSS")
        reset_peak(proc.pid)
        results = await asyncio.gather(generate(stub, request(long_prompt, max_tokens=16), timeout=600),
                                       *(generate(stub, request(p, max_tokens=64), timeout=600) for p in shorts))
        peak_kib = status_kib(proc.pid, "VmHWM")
    kv = sum(r.last.usage.total_tokens for r in results) * model.spec.bytes_per_token
    assert results[0].last.usage.prompt_tokens == 1500 and kv <= budget
    grown = (peak_kib - idle_kib) * 1024
    # rows x the longest row would be 16 x 1,500 tokens of cache (> 1 GiB) for these 0.18 GiB of tokens
    assert grown <= 1.5 * budget, f"RSS grew {grown / MIB:.0f} MiB for {kv / MIB:.0f} MiB of KV-cache"


async def test_a_request_that_can_never_fit_the_kv_budget_names_the_numbers(inference, model) -> None:
    budget = model.spec.bytes_for(1000)
    stub = await inference(kv_budget_bytes=budget)
    prompt = text_of(model, 900, 0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, request(prompt, max_tokens=200), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert "prompt (900 tokens) + max_tokens (200)" in details and "KV budget" in details
    assert f"(1000 tokens at {model.spec.bytes_per_token} bytes each)" in details
    fits = await generate(stub, request(prompt, max_tokens=100), timeout=120)
    assert fits.last.usage.total_tokens <= 1000


async def test_a_request_that_cannot_fit_now_waits_in_the_queue_and_then_runs(inference, model) -> None:
    stub = await inference(kv_budget_bytes=model.spec.bytes_for(1200))
    first = stub.Generate(request(LONG, max_tokens=1000))
    await first.read()
    second = asyncio.ensure_future(generate(stub, request(LONG, max_tokens=500)))
    waiting = await wait_for_report(stub, lambda r: r.active_sequences == 1 and r.queue_depth == 1)
    assert waiting.kv_cache_tokens > 0
    first.cancel()
    done = await asyncio.wait_for(second, 300)
    assert done.last.usage.completion_tokens >= 1


async def test_huge_prompt_is_refused_by_its_length_before_tokenizing(inference, model) -> None:
    stub = await inference()
    huge = "word " * 400_000  # 2 MB of text: at least 12,000 tokens
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, request(huge), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(r"the prompt has 2000000 characters, so at least \d+ tokens", err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CountTokens(pb2.CountTokensRequest(prompt=huge), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_full_queue_answers_before_the_prompt_is_even_measured(inference) -> None:
    stub = await inference(max_batch_size=1, queue_capacity=1)
    running = stub.Generate(request(LONG, max_tokens=4000))
    await running.read()
    queued = stub.Generate(request(LONG, max_tokens=4000))
    await wait_for_report(stub, lambda r: r.queue_depth == 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, request("word " * 400_000), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # not the length's INVALID_ARGUMENT
    running.cancel()
    queued.cancel()


async def test_tokenizing_a_large_prompt_does_not_stall_the_event_loop(inference) -> None:
    stub = await inference()
    large = "The history of the river valley shows how farmers shaped the land. " * 17_000  # ~1.1 MB
    gaps: list[float] = []
    loop = asyncio.get_running_loop()

    async def ticker(done: asyncio.Event) -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    done = asyncio.Event()
    ticks = asyncio.ensure_future(ticker(done))
    start = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as err:  # tokenized, then over the context window
        await stub.Generate(request(large)).read()
    took = loop.time() - start
    done.set()
    await ticks
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context window" in err.value.details()
    # the server shares this event loop: had it tokenized there, one gap would span the whole call
    assert max(gaps) < took / 3, f"the event loop stalled {max(gaps):.2f} s of a {took:.2f} s call"
