"""Registry splits, promotion and rollback; canary auto-rollback; least-outstanding balancing and ejection;
prefix affinity (rendezvous ranking, the load margin, retries and ejection) and its key."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from services.common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from services.router.balancer import Balancer
from services.router.canary import CanaryMonitor
from services.router.gateway.dispatch import affinity_key
from services.router.gateway.plan import Plan
from services.router.registry import CanaryPolicy, Registry
from services.router.types import ChatMessage, Role


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


REPLICAS = ("10.0.0.1:50071", "10.0.0.2:50071", "10.0.0.3:50071")


def test_an_affinity_key_keeps_its_replica_across_routers_and_replica_order() -> None:
    keys = [f"acme\x00context\x00conversation-{i}" for i in range(60)]
    first = {key: Balancer(rng=random.Random(1)).pick(REPLICAS, affinity=key) for key in keys}
    again = Balancer(rng=random.Random(99))
    for key in keys:
        assert again.pick(tuple(reversed(REPLICAS)), affinity=key) == first[key]
        assert again.pick(REPLICAS, affinity=key) == first[key]
    assert set(first.values()) == set(REPLICAS)  # keys spread over every replica, not piled onto one


def test_the_preferred_replica_is_passed_over_only_when_loaded_past_the_margin() -> None:
    balancer = Balancer(rng=random.Random(1), affinity_margin=4)
    key = "acme\x00context\x00c1"
    preferred = balancer.pick(REPLICAS, affinity=key)
    balancer.report_load(preferred, queued=1, active=3, ready=True)  # 4 more than the idle ones: within the margin
    assert balancer.pick(REPLICAS, affinity=key) == preferred
    with balancer.track(preferred):  # 5 more: past it, so the least-loaded replica takes the request
        assert balancer.pick(REPLICAS, affinity=key) != preferred
    assert balancer.pick(REPLICAS, affinity=key) == preferred  # the load went down: back to the prefix
    others = [a for a in REPLICAS if a != preferred]
    for address in others:
        balancer.report_load(address, queued=0, active=3, ready=True)
    balancer.report_load(preferred, queued=3, active=4, ready=True)  # 4 more than the least loaded
    assert balancer.pick(REPLICAS, affinity=key) == preferred
    assert Balancer(affinity_margin=None).pick(REPLICAS, affinity=key) in REPLICAS  # off: least loaded (all idle)


def test_a_retry_or_an_ejection_moves_the_key_to_the_next_replica_in_rank() -> None:
    balancer = Balancer(rng=random.Random(1))
    key = "acme\x00prompt\x00a shared system prompt"
    preferred = balancer.pick(REPLICAS, affinity=key)
    retry = balancer.pick(REPLICAS, frozenset({preferred}), affinity=key)
    assert retry != preferred
    assert balancer.pick(REPLICAS, frozenset({preferred}), affinity=key) == retry  # the same next one every time
    assert balancer.pick((preferred,), frozenset({preferred}), affinity=key) == preferred  # one replica: retried there
    for _ in range(3):
        balancer.health_check(preferred, ok=False)
    assert balancer.pick(REPLICAS, affinity=key) == retry
    balancer.health_check(preferred, ok=True)
    assert balancer.pick(REPLICAS, affinity=key) == preferred


def test_the_affinity_key_names_the_tenant_and_the_conversation_or_the_prompts_lead() -> None:
    def plan(tenant: str = "acme", context_id: str = "", prompt: str = "", messages: tuple = ()) -> Plan:
        return cast(Plan, SimpleNamespace(tenant_id=tenant, context_id=context_id, raw_prompt=not messages,
                                          prompt=prompt, messages=messages))

    system = ChatMessage(Role.SYSTEM, "You answer questions about the harbour and its boats. " * 4)
    assert affinity_key(plan(context_id="c1")) != affinity_key(plan(tenant="globex", context_id="c1"))
    assert affinity_key(plan(context_id="c1")) != affinity_key(plan(context_id="c2"))
    shared = [affinity_key(plan(messages=(system, ChatMessage(Role.USER, f"Question {i}?")))) for i in range(3)]
    assert shared[0] and len(set(shared)) == 1  # one system prompt, many questions: one key
    turn1 = (ChatMessage(Role.USER, "Tell me about rivers and the towns that grew along them. " * 3),)
    turn2 = (*turn1, ChatMessage(Role.ASSISTANT, "Rivers carried trade."), ChatMessage(Role.USER, "And ports?"))
    assert affinity_key(plan(messages=turn1)) == affinity_key(plan(messages=turn2))  # a resent conversation
    assert affinity_key(plan(prompt="x" * 200)) == affinity_key(plan(prompt="x" * 200 + " more"))
    assert affinity_key(plan(prompt="Name a colour.")) == ""  # too short to hold blocks worth steering for
    assert affinity_key(plan(prompt="x" * 200)) != affinity_key(plan(tenant="globex", prompt="x" * 200))
