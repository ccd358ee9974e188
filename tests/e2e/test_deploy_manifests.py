"""deploy/k8s and deploy/istio: rendered from the mesh policy without drift, valid against the Kubernetes
schemas (kubernetes-validate) and the Istio CRD models (cloudcoil-models-istio), and saying what the
policy says: timeouts, retries, outlier detection, concurrency, canary weights and who may call what."""

from __future__ import annotations

import copy
import datetime as dt
import fnmatch
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.istio.networking import v1 as istio_networking
from cloudcoil.models.istio.security import v1 as istio_security

from sidecar import istio_render, k8s_render
from sidecar.deploy_render import rendered
from sidecar.methods import method_table
from sidecar.policy import Policy, load_policy
from tests.conftest import ROOT

POLICY = ROOT / "deploy/policy/mesh-policy.yaml"
K8S = ROOT / "deploy/k8s"
ISTIO = ROOT / "deploy/istio"
K8S_VERSION = "1.30.0"
ISTIO_MODELS: dict[str, Any] = {
    "DestinationRule": istio_networking.DestinationRule,
    "VirtualService": istio_networking.VirtualService,
    "PeerAuthentication": istio_security.PeerAuthentication,
    "AuthorizationPolicy": istio_security.AuthorizationPolicy,
}


def documents(directory: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(directory.glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(POLICY)


def of_kind(directory: Path, kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in documents(directory) if doc["kind"] == kind}


def seconds(value: str | None) -> float | None:
    if value is None:
        return None
    return float(value[:-2]) / 1000 if value.endswith("ms") else float(value[:-1])


# --- drift and schemas ---------------------------------------------------------------------------

def test_committed_manifests_are_what_the_policy_renders_to() -> None:
    files = rendered(POLICY, K8S, ISTIO, label="deploy/policy/mesh-policy.yaml")
    stale = [str(p.relative_to(ROOT)) for p, text in files.items() if not p.exists() or p.read_text() != text]
    assert not stale, f"out of date with the policy (run `make deploy-manifests`): {stale}"
    extra = {p for d in (K8S, ISTIO) for p in d.glob("*.yaml")} - set(files)
    assert not extra, f"manifests the renderer does not produce: {sorted(map(str, extra))}"


def test_committed_envoy_configs_are_what_make_envoy_configs_renders(tmp_path: Path) -> None:
    """deploy/envoy/*.yaml are examples for operators: re-rendered the way `make envoy-configs` does, they
    must come out byte for byte the same (a new RPC, say, needs its route there too)."""
    makefile = (ROOT / "mk/sidecar.mk").read_text()
    recipe = makefile.split("envoy-configs: $(VENV)/.installed\n", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip() for line in recipe.replace("\\\n", " ").splitlines() if line.strip()]
    assert len(commands) == 3, recipe
    for command in commands:
        args = command.replace("$(PY)", sys.executable).replace("$(SIDECAR_POLICY)", "deploy/policy/mesh-policy.yaml")
        args = args.replace("$(ENVOY_CERTS)", ".autoglm/certs").split()
        committed = ROOT / args[args.index("-o") + 1]
        args[args.index("-o") + 1] = str(tmp_path / committed.name)
        subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
        assert (tmp_path / committed.name).read_text() == committed.read_text(), \
            f"{committed.relative_to(ROOT)} is out of date with the policy and protos: run `make envoy-configs`"


def test_every_kubernetes_manifest_is_valid_against_the_kubernetes_schema() -> None:
    docs = documents(K8S)
    assert {d["kind"] for _, d in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap",
                                            "ServiceAccount"}
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_kubernetes_validator_rejects_a_broken_probe() -> None:
    deployment = next(d for _, d in documents(K8S) if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"] = {"port": "grpc", "svc": "x"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def istio_validate(doc: dict[str, Any]) -> None:
    """Parse with the Istio CRD model, then require that nothing was dropped: pydantic ignores unknown keys,
    so a misspelt field would otherwise pass."""
    model = ISTIO_MODELS[doc["kind"]].model_validate(doc)
    dumped = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["spec"] == doc["spec"], f"{doc['kind']} {doc['metadata']['name']}: fields the schema does not know"


def test_every_istio_manifest_is_valid_against_the_istio_crd_models() -> None:
    docs = documents(ISTIO)
    assert {d["kind"] for _, d in docs} == set(ISTIO_MODELS)
    for _name, doc in docs:
        assert doc["apiVersion"] in ("networking.istio.io/v1", "security.istio.io/v1")
        istio_validate(doc)


def test_the_istio_check_rejects_a_misspelt_or_mistyped_field() -> None:
    rule = next(d for _, d in documents(ISTIO) if d["kind"] == "DestinationRule")
    misspelt = copy.deepcopy(rule)
    misspelt["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxError"] = 5
    with pytest.raises(AssertionError, match="fields the schema does not know"):
        istio_validate(misspelt)
    mistyped = copy.deepcopy(rule)
    mistyped["spec"]["trafficPolicy"]["outlierDetection"]["maxEjectionPercent"] = "half"
    with pytest.raises(ValueError):
        istio_validate(mistyped)


# --- Kubernetes conventions ----------------------------------------------------------------------

def test_services_deployments_and_autoscalers_follow_the_mesh_conventions(policy: Policy) -> None:
    services = of_kind(K8S, "Service")
    workloads = of_kind(K8S, "Deployment")
    autoscalers = of_kind(K8S, "HorizontalPodAutoscaler")
    accounts = of_kind(K8S, "ServiceAccount")
    for name in ("router", "inference", "billing"):
        port = services[name]["spec"]["ports"][0]
        assert port["name"] == "grpc" and port["appProtocol"] == "grpc"
        assert [p["name"] for p in services[name]["spec"]["ports"]] == (["grpc", "http"] if name == "router" else
                                                                        ["grpc"])
        assert name in accounts  # the Istio identity cluster.local/ns/<ns>/sa/<name>
        for version, _weight in policy.services[name].versions:
            deployment = workloads[f"{name}-{version}"]
            template = deployment["spec"]["template"]
            assert template["metadata"]["labels"]["app"] == name
            assert template["metadata"]["labels"]["version"] == version
            assert template["spec"]["serviceAccountName"] == name
            (container,) = template["spec"]["containers"]
            grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if name == "router" and probe == "readinessProbe":
                    continue  # ready only while its store answers: see test_the_router_scales_on_shared_state
                assert container[probe]["grpc"] == {"port": grpc_port}, (name, probe)
            assert services[name]["spec"]["port" + "s"][0]["port"] == grpc_port
            target = autoscalers[f"{name}-{version}"]["spec"]["scaleTargetRef"]
            assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{name}-{version}"}
    configmap = of_kind(K8S, "ConfigMap")["autoglm-mesh-policy"]
    assert configmap["data"]["mesh-policy.yaml"] == POLICY.read_text()


def test_the_router_serves_the_openai_http_api_on_its_service(policy: Policy) -> None:
    """In the cluster the OpenAI-compatible API is the router Service's `http` port, served by the router
    process on all interfaces (the Istio sidecar does mTLS, as for gRPC)."""
    (http,) = [p for p in of_kind(K8S, "Service")["router"]["spec"]["ports"] if p["name"] == "http"]
    assert http["appProtocol"] == "http" and http["targetPort"] == "http"
    for version, _weight in policy.services["router"].versions:
        (container,) = of_kind(K8S, "Deployment")[f"router-{version}"]["spec"]["template"]["spec"]["containers"]
        assert {"name": "http", "containerPort": http["port"], "protocol": "TCP"} in container["ports"]
        assert f"--http-port={http['port']}" in container["args"] and "--host=0.0.0.0" in container["args"]


def test_the_router_scales_on_shared_state_from_secrets(policy: Policy) -> None:
    """Keys, registry, conversations and jobs live in one PostgreSQL and rate limits in one Redis, both named
    by Secrets, with the key pepper and admin token every replica shares mounted from a Secret: so the router
    is a Deployment with an autoscaler from 2 to 10 replicas, ready only while its store answers."""
    for version, _weight in policy.services["router"].versions:
        router = of_kind(K8S, "Deployment")[f"router-{version}"]
        hpa = of_kind(K8S, "HorizontalPodAutoscaler")[f"router-{version}"]["spec"]
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10) and router["spec"]["replicas"] == 2
        pod = router["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args: list[str] = container["args"]
        arg = dict(itertools.pairwise(args)).__getitem__  # the value after a flag

        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert arg("--database") == "$(ROUTER_DATABASE_URL)" and env["ROUTER_DATABASE_URL"]["name"] == "router-database"
        assert arg("--rate-limit-redis-url") == "$(ROUTER_REDIS_URL)" and env["ROUTER_REDIS_URL"]["name"] == "router-redis"
        (secret,) = [v for v in pod["volumes"] if "secret" in v]
        assert secret["secret"]["secretName"] == "router-secrets"
        mount = next(m for m in container["volumeMounts"] if m["name"] == secret["name"])
        assert mount["readOnly"] is True
        assert arg("--key-pepper-path") == mount["mountPath"] + "/key_pepper"
        assert arg("--admin-token-path") == mount["mountPath"] + "/admin_token"
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert pod["securityContext"]["fsGroup"] == container_user_group()


def container_user_group() -> int:
    """The uid/gid the Dockerfile's final stage runs as (the manifests' fsGroup must match it)."""
    final = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    (user,) = [line.split()[1] for line in final.splitlines() if line.startswith("USER ")]
    uid, gid = user.split(":")
    assert uid == gid
    return int(gid)


def test_the_dockerfile_builds_the_image_the_manifests_run_and_passes_hadolint() -> None:
    """The image every manifest names is built by the repository's Dockerfile: multi-stage (the model built in
    the first, only the runtime in the last), a non-root user, and clean under hadolint."""
    dockerfile = ROOT / "Dockerfile"
    images = {c["image"] for _, d in documents(K8S) if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {k8s_render.IMAGE}
    text = dockerfile.read_text()
    assert f"docker build -t {k8s_render.IMAGE} ." in text
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2 and "COPY --from=model /opt/autoglm/models" in text
    assert container_user_group() != 0
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = text.replace("USER 10001:10001\n", "") + "RUN apt-get install curl\n"
    result = subprocess.run([str(hadolint), "--no-color", "-"], input=broken, capture_output=True, text=True)
    assert result.returncode != 0 and "DL3008" in result.stdout  # the linter does look: unpinned apt packages


# --- Istio values equal the policy's -------------------------------------------------------------

def uri_matches(match: dict[str, Any], path: str) -> bool:
    uri = match["uri"]
    return path == uri["exact"] if "exact" in uri else path.startswith(uri["prefix"])


def test_virtual_services_carry_the_policy_timeouts_retries_and_weights(policy: Policy) -> None:
    services = of_kind(ISTIO, "VirtualService")
    for name, service_policy in policy.services.items():
        spec = services[name]["spec"]
        assert spec["hosts"] == [f"{name}.{policy.namespace}.svc.cluster.local"]
        methods = [m for m in method_table() if m.lstrip("/").split("/", 1)[0] in service_policy.grpc_services]
        unknown = [f"/{g}/NotYetAMethod" for g in service_policy.grpc_services]
        for method in [*methods, *unknown]:
            route = policy.route_for(method)
            http = next(h for h in spec["http"] if any(uri_matches(m, method) for m in h["match"]))
            assert seconds(http.get("timeout")) == route.timeout_s, method
            retries = http["retries"]
            assert retries["attempts"] == route.retries.max_attempts - 1, method
            if route.retries.max_attempts > 1:
                assert retries["retryOn"].split(",") == [c.lower().replace("_", "-") for c in route.retries.retry_on]
                assert seconds(retries.get("perTryTimeout")) == route.retries.per_try_timeout_s, method
            weights = {r["destination"]["subset"]: r["weight"] for r in http["route"]}
            assert weights == dict(service_policy.versions), method
    assert dict(policy.services["inference"].versions) == {"v1": 90, "v2": 10}  # the canary split


def test_destination_rules_carry_outlier_detection_and_the_connection_pool(policy: Policy) -> None:
    rules = of_kind(ISTIO, "DestinationRule")
    for name, service_policy in policy.services.items():
        traffic = rules[name]["spec"]["trafficPolicy"]
        outlier = traffic["outlierDetection"]
        assert outlier["consecutive5xxErrors"] == service_policy.outlier.consecutive_failures
        assert seconds(outlier["baseEjectionTime"]) == service_policy.outlier.base_ejection_s
        assert outlier["maxEjectionPercent"] == service_policy.outlier.max_ejection_percent
        assert traffic["connectionPool"]["http"]["http2MaxRequests"] == service_policy.max_concurrent
        assert [s["name"] for s in rules[name]["spec"]["subsets"]] == [v for v, _ in service_policy.versions]


def test_peer_authentication_is_strict() -> None:
    (peer,) = of_kind(ISTIO, "PeerAuthentication").values()
    assert peer["spec"] == {"mtls": {"mode": "STRICT"}}


def istio_allows(policies: dict[str, dict[str, Any]], source: str, target: str, method: str,
                 namespace: str) -> bool:
    """Istio's ALLOW semantics over the rendered policies of the target workload."""
    selected = [p for p in policies.values() if p["spec"]["selector"]["matchLabels"] == {"app": target}]
    if not selected:
        return True  # no policy selects the workload: Istio allows everything
    principal = f"cluster.local/ns/{namespace}/sa/{source}"
    for authz in selected:
        for rule in authz["spec"].get("rules", []):
            principals = [p for f in rule["from"] for p in f["source"]["principals"]]
            paths = [p for t in rule["to"] for p in t["operation"]["paths"]]
            if any(fnmatch.fnmatchcase(principal, p) for p in principals) and any(fnmatch.fnmatchcase(method, p) if p.endswith("*") or
                                               p.startswith("*") else method == p for p in paths):
                return True
    return False


def test_authorization_policies_allow_exactly_what_the_policy_allows(policy: Policy) -> None:
    policies = of_kind(ISTIO, "AuthorizationPolicy")
    identities = [*policy.services, "stranger"]
    checked = 0
    for target, service_policy in policy.services.items():
        if service_policy.public:
            assert f"{target}-allow" not in policies
            continue
        for method in method_table():
            for source in identities:
                expected = policy.allowed(source, target, method)
                assert istio_allows(policies, source, target, method, policy.namespace) == expected, \
                    (source, target, method)
                checked += expected
    assert checked > 0
    assert istio_render.istio_principal(policy, "router") == "cluster.local/ns/default/sa/router"


def test_a_changed_policy_renders_changed_istio_values(tmp_path: Path) -> None:
    text = POLICY.read_text().replace("timeout_s: 5\n", "timeout_s: 7\n").replace("{v1: 90, v2: 10}", "{v1: 50, v2: 50}")
    changed = tmp_path / "policy.yaml"
    changed.write_text(text)
    files = rendered(changed, tmp_path / "k8s", tmp_path / "istio")
    services = {d["metadata"]["name"]: d for d in yaml.safe_load_all(files[tmp_path / "istio/virtual-services.yaml"])
                if d}
    billing = next(h for h in services["billing"]["spec"]["http"] if h["name"] == "billing")
    assert billing["timeout"] == "7s"
    generate = services["inference"]["spec"]["http"][0]
    assert [r["weight"] for r in generate["route"]] == [50, 50]
    assert dt.timedelta(seconds=seconds("25ms") or 0) == dt.timedelta(milliseconds=25)
