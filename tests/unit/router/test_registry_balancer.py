"""Registry splits, promotion and rollback; canary auto-rollback; least-outstanding balancing and ejection."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from services.router.balancer import Balancer
from services.router.canary import CanaryMonitor
from services.router.registry import CanaryPolicy, Registry


def test_first_version_is_stable_and_split_is_weighted(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db", rng=random.Random(7))
    registry.register("m", "v1", ("127.0.0.1:1",))
    registry.register("m", "v2", ("127.0.0.1:2",))
    assert registry.get("m").version("v2").weight_permille == 0
    registry.set_split("m", {"v1": 900, "v2": 100})
    picks = Counter(registry.pick_version("m").version for _ in range(5000))
    assert 400 < picks["v2"] < 600
    assert registry.pick_version("m", "v2").version == "v2"
    with pytest.raises(InvalidInput, match="sum to 1000"):
        registry.set_split("m", {"v1": 500})
    with pytest.raises(NotFound):
        registry.pick_version("nope")
    # Persisted: a new registry over the same file sees the split.
    assert Registry(tmp_path / "r.db").get("m").version("v2").weight_permille == 100


async def test_canary_breaking_its_error_limit_is_rolled_back_with_an_audit_event(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    registry.register("m", "v1", ("127.0.0.1:1",))
    registry.register("m", "v2", ("127.0.0.1:2",), canary=CanaryPolicy(min_requests=20, window_s=60))
    registry.set_split("m", {"v1": 900, "v2": 100})
    now = [0.0]
    monitor = CanaryMonitor(registry, clock=lambda: now[0])
    rolled = [await monitor.record("m", "v2", ok=(i % 5 != 0), latency_s=0.01) for i in range(20)]
    assert rolled[-1] and not any(rolled[:-1])
    model = registry.get("m")
    assert model.version("v1").weight_permille == 1000 and model.version("v2").weight_permille == 0
    [event] = registry.audit_events("model.rollback")
    assert "error ratio 20.0%" in str(event.details["reason"]) and event.actor == "router.canary"
    with pytest.raises(FailedPrecondition):
        registry.rollback("m", "again")


def test_audit_log_pages_newest_first_and_refuses_foreign_tokens(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    registry.register("m", "v1", ("127.0.0.1:1",))
    registry.register("m", "v2", ("127.0.0.1:2",))
    registry.set_split("m", {"v1": 900, "v2": 100})
    registry.promote("m", "v2")
    first, token = registry.audit_page("", 2, "")
    assert [e.action for e in first] == ["model.promote", "model.split"] and token
    rest, last = registry.audit_page("", 2, token)
    assert [(e.action, e.target) for e in rest] == [("model.register", "model/m@v2"), ("model.register", "model/m@v1")]
    assert last == "" and first[0].sequence > first[1].sequence > rest[0].sequence > rest[1].sequence
    assert [e.target for e in registry.audit_page("model.register", 0, "")[0]] == ["model/m@v2", "model/m@v1"]
    for foreign in ("not-a-token", "0", "²", "9" * 30):
        with pytest.raises(InvalidInput, match="next_page_token"):
            registry.audit_page("", 2, foreign)
    with pytest.raises(InvalidInput, match="page_size"):
        registry.audit_page("", -1, "")


async def test_slow_canary_is_rolled_back_and_healthy_one_is_not(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    registry.register("m", "v1", ("127.0.0.1:1",))
    registry.register("m", "v2", ("127.0.0.1:2",), canary=CanaryPolicy(min_requests=10))
    registry.set_split("m", {"v1": 500, "v2": 500})
    monitor = CanaryMonitor(registry, clock=lambda: 0.0)
    assert not any([await monitor.record("m", "v2", True, 0.05) for _ in range(50)])
    assert any([await monitor.record("m", "v2", True, 2.0) for _ in range(10)])
    assert "p99" in str(registry.audit_events("model.rollback")[0].details["reason"])


def test_least_outstanding_and_ejection_after_three_failed_checks() -> None:
    balancer = Balancer(rng=random.Random(1))
    replicas = ("a:1", "b:2")
    with balancer.track("a:1"):
        assert balancer.pick(replicas) == "b:2"
    balancer.report_load("b:2", queued=3, active=2, ready=True)
    assert balancer.pick(replicas) == "a:1"
    for _ in range(2):
        balancer.health_check("a:1", ok=False)
    assert balancer.pick(replicas) == "a:1"  # two failures: still in
    balancer.health_check("a:1", ok=False)
    assert balancer.pick(replicas) == "b:2"
    balancer.health_check("b:2", ok=False)
    balancer.health_check("b:2", ok=False)
    balancer.health_check("b:2", ok=False)
    with pytest.raises(Unavailable):
        balancer.pick(replicas)
    balancer.health_check("a:1", ok=True)
    assert balancer.pick(replicas) == "a:1"
