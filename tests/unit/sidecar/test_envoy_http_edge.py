"""The router's Envoy in front of its OpenAI-compatible HTTP API, as rendered: TLS from the router's file
SDS, no client certificate, plain HTTP/1.1 to the router, nothing that buffers a stream or cuts a long
generation, and the bearer check on `/v1/` only (health stays open)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.envoy_render import HTTP_STREAM_IDLE_TIMEOUT_S, EnvoyPorts, render_bootstrap
from sidecar.policy import load_policy

POLICY = Path(__file__).resolve().parents[3] / "deploy/policy/mesh-policy.yaml"


def bootstrap(**ports: Any) -> dict[str, Any]:
    return render_bootstrap(load_policy(POLICY), "router", certs_dir=Path("/certs"), upstream="127.0.0.1:50051",
                            peers={"billing": ["127.0.0.1:15061"]}, ports=EnvoyPorts(15051, 15001, 15000, **ports),
                            http_upstream="127.0.0.1:18080" if ports else "")


def http_parts(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    listener = next(x for x in doc["static_resources"]["listeners"] if x["name"] == "http")
    return listener, listener["filter_chains"][0]["filters"][0]["typed_config"]


def test_the_http_listener_terminates_tls_with_the_routers_sds_certificate_and_no_client_certificate() -> None:
    listener, _ = http_parts(bootstrap(http=18443))
    assert listener["address"]["socket_address"]["port_value"] == 18443
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is False
    common = tls["common_tls_context"]
    assert "validation_context" not in common
    assert common["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]["path"] == \
        "/certs/router.sds.yaml"
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"


def test_streams_pass_unbuffered_without_a_route_timeout_and_with_a_long_idle_timeout() -> None:
    _, manager = http_parts(bootstrap(http=18443))
    assert [f["name"] for f in manager["http_filters"]] == ["envoy.filters.http.router"]  # no buffer, no gzip
    assert manager["stream_idle_timeout"] == f"{int(HTTP_STREAM_IDLE_TIMEOUT_S)}s" and HTTP_STREAM_IDLE_TIMEOUT_S >= 600
    assert manager["request_timeout"] == "0s"
    assert manager["preserve_external_request_id"] is True
    forward = manager["route_config"]["virtual_hosts"][0]["routes"][-1]
    assert forward["match"] == {"prefix": "/"} and forward["route"] == {"cluster": "local_http", "timeout": "0s"}
    doc = bootstrap(http=18443)
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "local_http")
    assert "typed_extension_protocol_options" not in cluster and "transport_socket" not in cluster  # plain HTTP/1.1


def test_a_v1_call_without_a_bearer_token_is_refused_by_envoy_and_health_stays_open() -> None:
    _, manager = http_parts(bootstrap(http=18443))
    refusal = manager["route_config"]["virtual_hosts"][0]["routes"][0]
    assert refusal["match"]["prefix"] == "/v1/" and refusal["match"]["headers"][0]["invert_match"] is True
    assert refusal["direct_response"]["status"] == 401
    assert '"code": "invalid_api_key"' in refusal["direct_response"]["body"]["inline_string"]


def test_without_an_http_port_there_is_no_http_listener_and_half_a_setting_is_refused() -> None:
    doc = bootstrap()
    assert [x["name"] for x in doc["static_resources"]["listeners"]] == ["inbound", "outbound"]
    with pytest.raises(ValueError, match="http_upstream"):
        render_bootstrap(load_policy(POLICY), "router", certs_dir=Path("/certs"), upstream="127.0.0.1:50051",
                         peers={}, ports=EnvoyPorts(15051, None, 15000, http=18443))
