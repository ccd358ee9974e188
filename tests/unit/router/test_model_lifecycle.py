"""Model version states: the allowed moves and nothing else, what each state serves, traffic leaving and
joining ACTIVE, the history and audit of every move, a canary rolled back once to PENDING_APPROVAL, and
a store from before states whose versions stay ACTIVE."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, InvalidInput
from services.router.canary import CanaryMonitor
from services.router.lifecycle import MOVES, VersionState, check_move
from services.router.registry import CanaryPolicy, Registry
from services.router.store import open_store
from services.router.store.migrations import REGISTRY

S = VersionState
ALLOWED = {(S.DRAFT, S.PENDING_APPROVAL), (S.DRAFT, S.RETIRED), (S.PENDING_APPROVAL, S.ACTIVE),
           (S.PENDING_APPROVAL, S.DRAFT), (S.PENDING_APPROVAL, S.RETIRED), (S.ACTIVE, S.DEPRECATED),
           (S.ACTIVE, S.PENDING_APPROVAL), (S.DEPRECATED, S.ACTIVE), (S.DEPRECATED, S.RETIRED)}


def test_the_allowed_moves_are_exactly_the_documented_ones() -> None:
    assert {(a, b) for a, targets in MOVES.items() for b in targets} == ALLOWED


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(VersionState, VersionState)))
def test_every_other_move_is_refused_naming_the_current_state(current: VersionState, wanted: VersionState) -> None:
    if (current, wanted) in ALLOWED:
        check_move("m@v", current, wanted)
        return
    with pytest.raises(FailedPrecondition, match=f"m@v is {current.name}: it cannot move to {wanted.name}"):
        check_move("m@v", current, wanted)


def two_versions(tmp_path: Path, **v2: object) -> Registry:
    registry = Registry(tmp_path / "r.db", rng=random.Random(3))
    registry.register("m", "v1", ("127.0.0.1:1",))
    registry.register("m", "v2", ("127.0.0.1:2",), **v2)  # type: ignore[arg-type]
    return registry


def test_registration_is_active_by_default_and_may_start_as_a_draft(tmp_path: Path) -> None:
    registry = two_versions(tmp_path, initial_state=S.DRAFT)
    assert registry.get("m").version("v1").state is S.ACTIVE and registry.get("m").version("v2").state is S.DRAFT
    with pytest.raises(FailedPrecondition, match="m@v2 is DRAFT and serves no requests"):
        registry.pick_version("m", "v2")
    with pytest.raises(InvalidInput, match="initial_state"):
        registry.register("m", "v3", ("127.0.0.1:3",), initial_state=S.RETIRED)
    with pytest.raises(FailedPrecondition, match="already registered and DRAFT"):
        registry.register("m", "v2", ("127.0.0.1:2",), initial_state=S.ACTIVE)
    registry.register("m", "v2", ("127.0.0.1:9",))  # new replicas, same state
    assert registry.get("m").version("v2").state is S.DRAFT


def test_a_draft_first_version_takes_all_traffic_once_active(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    registry.register("m", "v1", ("127.0.0.1:1",), initial_state=S.PENDING_APPROVAL)
    with pytest.raises(FailedPrecondition, match="model 'm' has no ACTIVE version to serve it"):
        registry.pick_version("m")
    registry.set_state("m", "v1", S.ACTIVE, "ops@example", "approved")
    assert registry.pick_version("m").version == "v1" and registry.get("m").version("v1").weight_permille == 1000


def test_only_active_versions_take_a_split_or_a_promotion(tmp_path: Path) -> None:
    registry = two_versions(tmp_path, initial_state=S.PENDING_APPROVAL)
    with pytest.raises(FailedPrecondition, match="m@v2 is PENDING_APPROVAL: only ACTIVE versions take a traffic"):
        registry.set_split("m", {"v1": 900, "v2": 100})
    with pytest.raises(FailedPrecondition, match="m@v2 is PENDING_APPROVAL"):
        registry.promote("m", "v2")
    assert registry.get("m").version("v1").weight_permille == 1000
    registry.set_state("m", "v2", S.ACTIVE, "ops", "approved")
    registry.set_split("m", {"v1": 900, "v2": 100})
    assert registry.get("m").version("v2").weight_permille == 100


def test_a_deprecated_version_serves_only_pinned_requests_with_a_notice_and_a_retired_one_none(
        tmp_path: Path) -> None:
    registry = two_versions(tmp_path)
    registry.set_split("m", {"v1": 500, "v2": 500})
    registry.set_state("m", "v2", S.DEPRECATED, "ops", "superseded by v1")
    model = registry.get("m")
    assert (model.version("v1").weight_permille, model.version("v2").weight_permille) == (1000, 0)
    assert Counter(registry.pick_version("m").version for _ in range(2000)) == {"v1": 2000}
    assert registry.pick_version("m", "v2").version == "v2"
    notice = registry.deprecation("m@v2")
    assert notice is not None and "m@v2 is DEPRECATED since" in notice.notice
    assert registry.deprecation("m@v1") is None and registry.deprecation("m") is None
    with pytest.raises(FailedPrecondition, match="m@v2 is DEPRECATED: it cannot move to PENDING_APPROVAL"):
        registry.set_state("m", "v2", S.PENDING_APPROVAL, "ops", "again")
    registry.set_state("m", "v2", S.RETIRED, "ops", "no callers left")
    with pytest.raises(FailedPrecondition, match="m@v2 is RETIRED and serves no requests") as refused:
        registry.pick_version("m", "v2")
    assert refused.value.reason == "VERSION_RETIRED"
    with pytest.raises(FailedPrecondition, match="RETIRED: it cannot move to ACTIVE"):
        registry.set_state("m", "v2", S.ACTIVE, "ops", "undo")


def test_the_stable_version_leaves_active_only_as_the_last_one(tmp_path: Path) -> None:
    registry = two_versions(tmp_path)
    with pytest.raises(FailedPrecondition, match="stable version of model 'm': promote another ACTIVE version"):
        registry.set_state("m", "v1", S.DEPRECATED, "ops", "old")
    registry.promote("m", "v2")
    registry.set_state("m", "v1", S.DEPRECATED, "ops", "old")
    registry.set_state("m", "v2", S.DEPRECATED, "ops", "sunset of the model")
    with pytest.raises(FailedPrecondition, match="model 'm' has no ACTIVE version"):
        registry.pick_version("m")
    registry.set_state("m", "v1", S.ACTIVE, "ops", "reinstated")
    assert registry.pick_version("m").version == "v1" and registry.get("m").stable.version == "v1"


def test_each_move_is_recorded_with_who_and_why(tmp_path: Path) -> None:
    registry = two_versions(tmp_path, initial_state=S.DRAFT)
    with pytest.raises(InvalidInput, match="operator is required"):
        registry.set_state("m", "v2", S.PENDING_APPROVAL, " ", "ready")
    with pytest.raises(InvalidInput, match="reason is required"):
        registry.set_state("m", "v2", S.PENDING_APPROVAL, "alice", "")
    registry.set_state("m", "v2", S.PENDING_APPROVAL, "alice", "evals passed")
    registry.set_state("m", "v2", S.ACTIVE, "bob", "approved in review 12")
    history = [(c.version, c.from_state, c.to_state, c.actor, c.reason) for c in registry.history("m")]
    assert history == [("v1", None, S.ACTIVE, "admin", "registered"), ("v2", None, S.DRAFT, "admin", "registered"),
                       ("v2", S.DRAFT, S.PENDING_APPROVAL, "alice", "evals passed"),
                       ("v2", S.PENDING_APPROVAL, S.ACTIVE, "bob", "approved in review 12")]
    events = registry.audit_events("model.state")
    assert [(e.actor, e.target, e.details["from"], e.details["to"], e.details["reason"]) for e in events] == [
        ("bob", "model/m@v2", "PENDING_APPROVAL", "ACTIVE", "approved in review 12"),
        ("alice", "model/m@v2", "DRAFT", "PENDING_APPROVAL", "evals passed")]


async def test_a_failing_canary_goes_back_to_pending_approval_once_however_many_registries_decide(tmp_path: Path) -> None:
    registry = two_versions(tmp_path, canary=CanaryPolicy(min_requests=5))
    other = Registry(tmp_path / "r.db")  # a second router on the same store, its memory taken now
    registry.set_split("m", {"v1": 900, "v2": 100})
    other_monitor = CanaryMonitor(Registry(tmp_path / "r.db"), clock=lambda: 0.0)
    monitor = CanaryMonitor(registry, clock=lambda: 0.0)
    assert any([await monitor.record("m", "v2", ok=False, latency_s=0.01) for _ in range(5)])
    # The other router still holds the canary as ACTIVE with traffic: it finds the rollback done.
    assert not any([await other_monitor.record("m", "v2", ok=False, latency_s=0.01) for _ in range(5)])
    assert not other.rollback_canary("m", "v2", "late verdict")
    model = registry.get("m")
    assert model.version("v2").state is S.PENDING_APPROVAL and model.version("v1").weight_permille == 1000
    [event] = registry.audit_events("model.rollback")
    assert event.actor == "router.canary" and event.details["states"] == {"v2": "PENDING_APPROVAL"}
    [change] = [c for c in registry.history("m") if c.to_state is S.PENDING_APPROVAL]
    assert change.actor == "router.canary" and "error ratio 100.0%" in change.reason


def test_versions_stored_before_states_are_active(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'old.db'}")
    store.migrate("registry", REGISTRY[:2])
    old = {"name": "m", "fallback_models": [], "context_window": 0, "versions": [
        {"version": "v1", "replicas": ["127.0.0.1:1"], "weight_permille": 1000, "stable": True,
         "canary": CanaryPolicy().__dict__}]}
    store.write(lambda tx: tx.execute("INSERT INTO models (name, body, version) VALUES (?, ?, 1)",
                                      ("m", json.dumps(old))))
    store.close()
    registry = Registry(tmp_path / "old.db")
    assert registry.get("m").version("v1").state is S.ACTIVE and registry.pick_version("m").version == "v1"
    stored = registry._store.read(lambda tx: tx.one("SELECT body FROM models WHERE name = 'm'"))
    assert stored is not None and json.loads(stored["body"])["versions"][0]["state"] == "ACTIVE"
    registry.set_state("m", "v1", S.DEPRECATED, "ops", "the model is going away")
    assert [c.to_state for c in registry.history("m")] == [S.DEPRECATED]


def test_a_model_without_an_active_version_still_exists_for_its_card_but_a_retired_pin_does_not_pass(
        tmp_path: Path) -> None:
    from services.router.balancer import Balancer
    from services.router.contexts import ContextStore
    from services.router.gateway.plan import Planner
    from services.router.policy import PolicyStore
    from services.router.types import Principal

    registry = Registry(tmp_path / "r.db")
    registry.register("m", "v1", ("127.0.0.1:1",), initial_state=S.DRAFT)
    planner = Planner(registry, Balancer(), None, ContextStore(tmp_path / "c.db"),  # type: ignore[arg-type]
                      PolicyStore(tmp_path / "p.db"), 16)
    caller = Principal(tenant_id="acme", key_id="k")
    planner.check(caller, "m")  # GET /v1/models/m shows it
    with pytest.raises(FailedPrecondition, match="m@v1 is DRAFT"):
        planner.check(caller, "m@v1")  # a batch job pinned to it is refused at submission
