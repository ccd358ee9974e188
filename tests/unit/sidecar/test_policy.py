"""The policy file: the shipped one loads, errors name the YAML path, routes and authorization resolve."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.policy import PolicyError, PolicyWatcher, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[3]
MINIMAL = """
services:
  router: {grpc_services: [autoglm.router.v1.RouterService]}
  inference: {grpc_services: [autoglm.inference.v1.InferenceService]}
"""


def test_shipped_policy_allows_only_router_to_inference_and_billing() -> None:
    policy = load_policy(ROOT / "deploy/policy/mesh-policy.yaml")
    generate = "/autoglm.inference.v1.InferenceService/Generate"
    reserve = "/autoglm.billing.v1.BillingService/Reserve"
    assert policy.allowed("router", "inference", generate)
    assert policy.allowed("router", "billing", reserve)
    assert not policy.allowed("billing", "inference", generate)
    assert not policy.allowed("inference", "billing", reserve)
    assert not policy.allowed(None, "inference", generate)
    assert policy.route_for(generate).name == "inference-generate"
    assert policy.route_for("/autoglm.inference.v1.InferenceService/CountTokens").name == "inference"
    assert policy.cluster_for(reserve) == "billing"


@pytest.mark.parametrize(("snippet", "message"), [
    ("routes:\n  - {match: [a.B/*], retries: {max_attempts: two}}",
     "routes[0].retries.max_attempts: expected an integer"),
    ("routes:\n  - {match: [a.B/*], timeout_s: -1}", "routes[0].timeout_s: must be > 0"),
    ("routes:\n  - {match: [NoSlash]}", "routes[0].match[0]: expected 'package.Service/Method'"),
    ("routes:\n  - {match: [a.B/*], retries: {retry_on: [NOPE]}}", "routes[0].retries.retry_on[0]: 'NOPE'"),
    ("authorization:\n  allow:\n    - {from: ghost, to: inference}", "authorization.allow[0].from: unknown service"),
    ("routes:\n  - {match: [a.B/*], colour: red}", "routes[0]: unknown key(s) colour"),
])
def test_invalid_policies_name_the_yaml_path(snippet: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(MINIMAL + snippet)
    assert message in str(err.value)


def test_retry_budget_ratio_above_one_is_refused() -> None:
    text = MINIMAL.replace("inference: {grpc_services: [autoglm.inference.v1.InferenceService]}",
                           "inference: {grpc_services: [x.Y], retry_budget: {ratio: 1.5}}")
    with pytest.raises(PolicyError, match=r"services.inference.retry_budget.ratio: must be >= 0.0 and <= 1.0"):
        parse_policy(text)


@pytest.mark.parametrize(("versions", "message"), [
    ("{v1: 90, v2: 20}", "services.inference.versions: the weights must add up to 100, got 110"),
    ("{v1: ninety, v2: 10}", "services.inference.versions.v1: expected a percent 0..100"),
    ("{V_1: 100}", "services.inference.versions: version label 'V_1' must be a DNS label"),
])
def test_canary_versions_must_be_labels_with_weights_adding_to_100(versions: str, message: str) -> None:
    text = MINIMAL.replace("inference: {grpc_services: [autoglm.inference.v1.InferenceService]}",
                           f"inference: {{grpc_services: [x.Y], versions: {versions}}}")
    with pytest.raises(PolicyError) as err:
        parse_policy(text)
    assert message in str(err.value)


def test_versions_default_to_one_stable_version_and_the_shipped_policy_has_a_canary() -> None:
    assert parse_policy(MINIMAL).services["router"].versions == (("v1", 100),)
    assert load_policy(ROOT / "deploy/policy/mesh-policy.yaml").services["inference"].versions == (("v1", 90), ("v2", 10))


def test_the_watcher_reloads_on_a_content_change_even_when_the_mtime_is_the_same(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL)
    seen: list[str] = []
    watcher = PolicyWatcher(path, on_change=lambda p: seen.append(p.sha256))
    stamp = path.stat().st_mtime_ns
    path.write_text(MINIMAL.replace("router: {grpc_services", "router: {public: true, grpc_services"))
    os.utime(path, ns=(stamp, stamp))
    assert path.stat().st_mtime_ns == stamp
    assert watcher.check()
    assert watcher.policy.services["router"].public and seen == [watcher.policy.sha256]
    assert not watcher.check()  # same content: nothing to do


def test_an_invalid_edit_is_reported_once_and_the_policy_in_force_stays(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL)
    errors: list[str] = []
    watcher = PolicyWatcher(path, on_error=lambda exc: errors.append(str(exc)))
    before = watcher.policy
    path.write_text(MINIMAL + "routes:\n  - {match: [a.B/*], timeout_s: soon}\n")
    assert not watcher.check() and not watcher.check()
    assert watcher.policy is before
    assert errors == [f"{path}: routes[0].timeout_s: expected a number, got 'soon'"]


@pytest.mark.parametrize(("snippet", "message"), [
    ("routes: {a: 1}", "routes: expected a list, got dict"),
    ("routes:\n  - [1]", "routes[0]: expected a mapping, got list"),
    ("routes:\n  - {name: x}", "routes[0].match: required"),
    ("routes:\n  - {match: [a.B/*], rate_limit: {rps: 0}}", "routes[0].rate_limit.rps: must be > 0.0, got 0"),
    ("routes:\n  - {match: [a.B/*], rate_limit: {rps: 5, max_callers: 0}}",
     "routes[0].rate_limit.max_callers: must be >= 1, got 0"),
    ("routes:\n  - {match: [a.B/*], retries: {backoff: {base_s: 1, max_s: 0.5}}}",
     "routes[0].retries.backoff.max_s: must be >= base_s (1.0), got 0.5"),
    ("routes:\n  - {match: [a.B/*], retries: {max_attempts: '3'}}",
     "routes[0].retries.max_attempts: expected an integer, got '3'"),
    ("authorization: {default: allow}", "authorization.default: only 'deny' is supported"),
    ("version: 2", "version: only version 1 is understood"),
    ("trust_domain: ''", "trust_domain: expected a non-empty string, got ''"),
    ("colour: red", "<root>: unknown key(s) colour; expected some of version, trust_domain"),
])
def test_more_invalid_policies_name_the_yaml_path(snippet: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(MINIMAL + snippet)
    assert message in str(err.value)


def test_rate_limits_are_per_caller_with_a_bounded_table_and_burst_defaults_to_rps() -> None:
    policy = parse_policy(MINIMAL + "routes:\n  - {match: [a.B/*], rate_limit: {rps: 7.5}}\n")
    limit = policy.routes[0].rate_limit
    assert limit is not None and (limit.rps, limit.burst, limit.max_callers) == (7.5, 7, 10_000)
    assert policy.routes[0].name == "route-0" and policy.routes[0].retries.max_attempts == 1
