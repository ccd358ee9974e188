"""The policy file: the shipped one loads, errors name the YAML path, routes and authorization resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.policy import PolicyError, load_policy, parse_policy

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
