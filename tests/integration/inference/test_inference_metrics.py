"""`python -m services.inference --metrics-port 0`: the engine's Prometheus metrics move as a user
would see them — tokens, time to first token, batch sizes, active sequences, KV-cache, cancellations."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from tests.conftest import ROOT
from tests.integration.inference.helpers import generate, request
from tests.integration.inference.test_inference_batching import LONG, wait_for_report

REPLICA = "metrics-r1"


def scrape(url: str) -> dict[str, float]:
    """Every sample of this replica, by sample name (e.g. autoglm_inference_tokens_generated_total)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("replica") == REPLICA and "le" not in sample.labels:
                samples[sample.name] = sample.value
    return samples


def launch(processes: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A replica started the way the launcher starts one (stopped by PID when the test ends)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference", "--port", "0", "--metrics-port", "0",
         "--replica-id", REPLICA, "--threads", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    processes.append(proc)
    return proc


async def start_replica(processes: list[subprocess.Popen[bytes]]) -> tuple[str, str]:
    """(gRPC address, metrics URL) read from the replica's start-up lines."""
    proc = await asyncio.to_thread(launch, processes)
    assert proc.stdout is not None
    metrics_url = address = ""
    while not (metrics_url and address):
        line = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 90)).decode()
        assert line, f"the replica exited early with {proc.wait()}"
        if found := re.search(r"metrics on (http://\S+/metrics)", line):
            metrics_url = found.group(1)
        if found := re.search(r"listening on (\S+:\d+)", line):
            address = found.group(1)
    return address, metrics_url


async def test_engine_metrics_follow_generation_and_cancellation(processes) -> None:
    address, url = await start_replica(processes)
    before = await asyncio.to_thread(scrape, url)
    assert before["autoglm_inference_tokens_generated_total"] == 0
    assert before["autoglm_inference_active_sequences"] == 0
    assert before["autoglm_inference_time_to_first_token_seconds_count"] == 0

    async with grpc.aio.insecure_channel(address) as chan:
        stub = pb2_grpc.InferenceServiceStub(chan)
        done = await generate(stub, request("The capital of France is", max_tokens=8))
        after = await asyncio.to_thread(scrape, url)
        tokens = done.last.usage.completion_tokens
        assert after["autoglm_inference_tokens_generated_total"] == tokens > 0
        assert after["autoglm_inference_time_to_first_token_seconds_count"] == 1
        assert 0 < after["autoglm_inference_time_to_first_token_seconds_sum"] < 60
        # one decode step per token after the first, each of batch size 1
        assert after["autoglm_inference_decode_batch_size_count"] == tokens - 1
        assert after["autoglm_inference_decode_batch_size_sum"] == tokens - 1

        call = stub.Generate(request(LONG, max_tokens=4000))
        await call.read()
        await wait_for_report(stub, lambda r: r.active_sequences == 1 and r.kv_cache_tokens > 0)
        busy = await asyncio.to_thread(scrape, url)
        assert busy["autoglm_inference_active_sequences"] == 1
        assert busy["autoglm_inference_kv_cache_tokens"] > 0
        assert busy["autoglm_inference_kv_cache_bytes"] > busy["autoglm_inference_kv_cache_tokens"]
        assert busy["autoglm_inference_cancelled_total"] == 0
        call.cancel()
        await wait_for_report(stub, lambda r: r.cancelled_total == 1 and r.active_sequences == 0)
        freed = await asyncio.to_thread(scrape, url)
        assert freed["autoglm_inference_cancelled_total"] == 1
        assert (freed["autoglm_inference_active_sequences"], freed["autoglm_inference_kv_cache_bytes"]) == (0, 0)
        assert freed["autoglm_inference_tokens_generated_total"] > after["autoglm_inference_tokens_generated_total"]
        assert freed["autoglm_inference_queue_capacity"] > 0 and freed["autoglm_inference_queue_depth"] == 0


async def test_prefix_cache_metrics_count_hits_misses_blocks_and_prefill_tokens(processes) -> None:
    address, url = await start_replica(processes)
    prompt = "Here is a short story about a lighthouse keeper who finds a message in a bottle. " * 3
    async with grpc.aio.insecure_channel(address) as chan:
        stub = pb2_grpc.InferenceServiceStub(chan)
        first = await generate(stub, request(prompt, max_tokens=2))
        cold = await asyncio.to_thread(scrape, url)
        await generate(stub, request(prompt, max_tokens=2))
        warm = await asyncio.to_thread(scrape, url)
    tokens = first.last.usage.prompt_tokens
    blocks = (tokens - 2) // 8
    assert cold["autoglm_inference_prefill_tokens_total"] == tokens
    assert (cold["autoglm_inference_prefix_cache_misses_total"], cold["autoglm_inference_prefix_cache_hits_total"]) == (
        blocks, 0)
    assert cold["autoglm_inference_prefix_cache_blocks"] == blocks > 0
    assert warm["autoglm_inference_prefix_cache_hits_total"] == blocks
    assert warm["autoglm_inference_prefill_tokens_total"] == 2 * tokens - blocks * 8
    assert warm["autoglm_inference_prefix_cache_bytes"] == cold["autoglm_inference_prefix_cache_bytes"] > 0
