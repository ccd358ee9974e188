"""The engine's usage reporter with a fake billing port: batches are dropped only once billing took them,
an outage keeps them (bounded: the oldest go first, counted), refused records are not resent, and a
request without a tenant is not reported."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY

from services.common.errors import PeerUnreachable
from services.common.usage import UsageStatus
from services.inference.engine.types import FinishedSequence, GenerationRequest
from services.inference.usage_reporter import UsageReporter
from tests.waiting import wait_until


class FakeBilling:
    def __init__(self) -> None:
        self.down = False
        self.refuse: set[str] = set()
        self.batches: list[list[str]] = []

    async def report(self, records: Sequence[FinishedSequence]) -> list[tuple[int, str]]:
        if self.down:
            raise PeerUnreachable("billing is unreachable")
        self.batches.append([r.request.request_id for r in records])
        return [(i, "INVALID_ARGUMENT: no") for i, r in enumerate(records) if r.request.request_id in self.refuse]

    async def close(self) -> None:
        pass


def finished(request_id: str, tenant: str = "acme") -> FinishedSequence:
    return FinishedSequence(GenerationRequest(request_id=request_id, tenant_id=tenant), "r-test", 10, 3,
                            UsageStatus.CANCELLED, 1, 2)


def count(replica: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("autoglm_inference_usage_records_total",
                                     {"replica": replica, "outcome": outcome}) or 0.0


async def test_batches_are_sent_in_order_and_dropped_once_billing_answered() -> None:
    billing = FakeBilling()
    reporter = UsageReporter(billing, "r-batches", capacity=100, batch=2)
    for i in range(5):
        reporter.add(finished(f"q{i}"))
    assert reporter.buffered == 5
    while reporter.buffered:
        assert await reporter.send_batch()
    assert billing.batches == [["q0", "q1"], ["q2", "q3"], ["q4"]]
    assert count("r-batches", "reported") == 5


async def test_an_outage_keeps_the_records_and_a_full_buffer_drops_the_oldest_counted() -> None:
    billing = FakeBilling()
    billing.down = True
    reporter = UsageReporter(billing, "r-outage", capacity=3, batch=2)
    for i in range(3):
        reporter.add(finished(f"q{i}"))
    assert await reporter.send_batch() is False
    assert reporter.buffered == 3  # nothing lost by the failed send
    reporter.add(finished("q3"))  # full: q0 goes
    assert count("r-outage", "dropped") == 1
    assert REGISTRY.get_sample_value("autoglm_inference_usage_report_failures_total", {"replica": "r-outage"}) == 1
    assert REGISTRY.get_sample_value("autoglm_inference_usage_records_buffered", {"replica": "r-outage"}) == 3
    billing.down = False
    while reporter.buffered:
        assert await reporter.send_batch()
    assert billing.batches == [["q1", "q2"], ["q3"]]


async def test_refused_records_are_counted_and_not_sent_again_and_tenantless_ones_are_skipped() -> None:
    billing = FakeBilling()
    billing.refuse = {"bad"}
    reporter = UsageReporter(billing, "r-refused", capacity=10, batch=10)
    reporter.add(finished("bad"))
    reporter.add(finished("good"))
    reporter.add(finished("direct", tenant=""))
    assert await reporter.send_batch()
    assert reporter.buffered == 0
    assert (count("r-refused", "rejected"), count("r-refused", "reported"), count("r-refused", "unreported")) == \
        (1, 1, 1)


async def test_the_background_task_reports_what_is_added_and_stop_flushes_the_rest() -> None:
    billing = FakeBilling()
    reporter = UsageReporter(billing, "r-task", capacity=10, batch=1, flush_s=0)
    reporter.start()
    reporter.add(finished("a"))
    await wait_until(lambda: billing.batches, 10, "the background task to send the record")
    reporter.add(finished("b"))
    await reporter.stop(flush_timeout_s=5)
    assert [r for batch in billing.batches for r in batch] == ["a", "b"]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="batch"):
        UsageReporter(FakeBilling(), "r-bad", batch=0)
