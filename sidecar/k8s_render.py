"""Render the Kubernetes manifests of the three services from the mesh policy (`make deploy-manifests`).

Per service: a ServiceAccount (its mesh identity `sa/<service>`), a Service whose port is named `grpc`
with `appProtocol: grpc`, per `versions` entry a Deployment (labels `app`/`version`, gRPC health probes on
the service port, Istio sidecar injection) and a HorizontalPodAutoscaler. Plus a ConfigMap holding the
policy file itself, mounted read-only at /etc/autoglm/policy in every pod.

Every service scales: billing keeps its ledger in PostgreSQL, inference keeps nothing, and the router keeps
keys, policies, the registry and audit log, conversations and batch jobs in one PostgreSQL shared by its
replicas (`--database`, from the Secret `router-database`), its rate-limit buckets in Redis (the Secret
`router-redis`), and the key pepper and admin token every replica must share in the Secret
`router-secrets`, mounted as files. A router replica is ready (`GET /ready` on its HTTP port) only while
its database answers, so a Service never sends traffic to a replica that cannot check a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from sidecar.policy import Policy

IMAGE = "open-autoglm:0.1.0"
DATA_GROUP = 10001
POLICY_CONFIGMAP = "autoglm-mesh-policy"
POLICY_MOUNT = "/etc/autoglm/policy"
SECRETS_MOUNT = "/etc/autoglm/secrets"
HEADER = ("# Rendered from {policy} by `make deploy-manifests` (sidecar/k8s_render.py): do not edit by hand.\n"
          "# {intent}\n")


@dataclass(frozen=True)
class Workload:
    """How one service runs in a pod: its port (the same as deploy/local/mesh.yaml), arguments, sizing."""

    port: int
    metrics_port: int
    args: tuple[str, ...]
    cpu: str
    memory: str
    min_replicas: int
    max_replicas: int
    startup_s: int  # how long the first health check may take (model load)
    env: tuple[dict[str, Any], ...] = ()
    # A Secret mounted read-only as files at SECRETS_MOUNT (the router's key pepper and admin token).
    secret_volume: str = ""
    # The OpenAI-compatible HTTP API (router only): plain HTTP in the pod, the Istio sidecar does mTLS and
    # an ingress gateway terminates the clients' TLS, as for the gRPC port.
    http_port: int = 0


WORKLOADS = {
    "router": Workload(
        port=50051, metrics_port=9101, cpu="500m", memory="512Mi", min_replicas=2, max_replicas=10, startup_s=30,
        http_port=8080,
        # The data dir holds only the usage spool and settlement journal (events on their way to billing).
        args=("--inference", "inference.{namespace}.svc.cluster.local:50071",
              "--billing", "billing.{namespace}.svc.cluster.local:50061", "--data-dir", "/var/lib/autoglm/router",
              "--database", "$(ROUTER_DATABASE_URL)", "--rate-limit-redis-url", "$(ROUTER_REDIS_URL)",
              "--key-pepper-path", SECRETS_MOUNT + "/key_pepper", "--admin-token-path", SECRETS_MOUNT + "/admin_token"),
        env=({"name": "ROUTER_DATABASE_URL",
              "valueFrom": {"secretKeyRef": {"name": "router-database", "key": "url"}}},
             {"name": "ROUTER_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "router-redis", "key": "url"}}}),
        secret_volume="router-secrets"),
    "inference": Workload(
        port=50071, metrics_port=9110, cpu="2", memory="3Gi", min_replicas=1, max_replicas=8, startup_s=300,
        # The image carries a built model in its model cache (`make model`); finished sequences are
        # reported to billing (engine-side metering; the policy allows ReportEngineUsage only).
        args=("--billing", "billing.{namespace}.svc.cluster.local:50061")),
    "billing": Workload(
        port=50061, metrics_port=9102, cpu="500m", memory="512Mi", min_replicas=2, max_replicas=6, startup_s=30,
        # Several replicas share one ledger: PostgreSQL, its URL from the Secret `billing-database`.
        args=("--database", "$(BILLING_DATABASE_URL)"),
        env=({"name": "BILLING_DATABASE_URL",
              "valueFrom": {"secretKeyRef": {"name": "billing-database", "key": "url"}}},)),
}


def _labels(service: str, version: str | None = None) -> dict[str, str]:
    labels = {"app": service}
    if version is not None:
        labels["version"] = version
    return labels


def service_account(policy: Policy, service: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": service, "namespace": policy.namespace, "labels": _labels(service)}}


def service(policy: Policy, name: str) -> dict[str, Any]:
    w = WORKLOADS[name]
    ports = [{"name": "grpc", "appProtocol": "grpc", "port": w.port, "targetPort": "grpc", "protocol": "TCP"}]
    if w.http_port:
        ports.append({"name": "http", "appProtocol": "http", "port": w.http_port, "targetPort": "http",
                      "protocol": "TCP"})
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": policy.namespace, "labels": _labels(name)},
        "spec": {"selector": _labels(name), "ports": ports},
    }


def _probe(port: int, period: int, failures: int) -> dict[str, Any]:
    return {"grpc": {"port": port}, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 2}


def deployment(policy: Policy, name: str, version: str) -> dict[str, Any]:
    w = WORKLOADS[name]
    labels = _labels(name, version)
    args = ["--host=0.0.0.0", f"--port={w.port}", f"--metrics-port={w.metrics_port}",
            *([f"--http-port={w.http_port}"] if w.http_port else []),
            *(a.format(namespace=policy.namespace) for a in w.args)]
    container: dict[str, Any] = {
        "name": name, "image": IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", f"services.{name}"], "args": args,
        "ports": [{"name": "grpc", "containerPort": w.port, "protocol": "TCP"},
                  *([{"name": "http", "containerPort": w.http_port, "protocol": "TCP"}] if w.http_port else []),
                  {"name": "metrics", "containerPort": w.metrics_port, "protocol": "TCP"}],
        "env": [{"name": "AUTOGLM_LOG_LEVEL", "value": "INFO"}, *w.env],
        "resources": {"requests": {"cpu": w.cpu, "memory": w.memory}, "limits": {"memory": w.memory}},
        "startupProbe": _probe(w.port, 5, max(1, w.startup_s // 5)),
        # The router is ready only while its store answers (GET /ready), alive while it serves gRPC health.
        "readinessProbe": ({"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3,
                            "timeoutSeconds": 2} if w.http_port else _probe(w.port, 5, 3)),
        "livenessProbe": _probe(w.port, 10, 3),
        "volumeMounts": [{"name": "policy", "mountPath": POLICY_MOUNT, "readOnly": True},
                         {"name": "data", "mountPath": "/var/lib/autoglm"}],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }
    volumes: list[dict[str, Any]] = [{"name": "policy", "configMap": {"name": POLICY_CONFIGMAP}},
                                     {"name": "data", "emptyDir": {}}]
    if w.secret_volume:
        container["volumeMounts"].append({"name": "secrets", "mountPath": SECRETS_MOUNT, "readOnly": True})
        volumes.append({"name": "secrets", "secret": {"secretName": w.secret_volume, "defaultMode": 0o440}})
    spec: dict[str, Any] = {"replicas": w.min_replicas, "selector": {"matchLabels": labels}}
    spec["template"] = {
        "metadata": {"labels": {**labels, "sidecar.istio.io/inject": "true"},
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(w.metrics_port)}},
        "spec": {"serviceAccountName": name, "terminationGracePeriodSeconds": 30, "containers": [container],
                 "volumes": volumes},
    }
    if w.secret_volume:
        # The mounted secret files are group-readable by this group, which every container of the pod is given.
        spec["template"]["spec"]["securityContext"] = {"fsGroup": DATA_GROUP}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{name}-{version}", "namespace": policy.namespace, "labels": labels},
        "spec": spec,
    }


def autoscaler(policy: Policy, name: str, version: str) -> dict[str, Any]:
    w = WORKLOADS[name]
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"{name}-{version}", "namespace": policy.namespace, "labels": _labels(name, version)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{name}-{version}"},
            "minReplicas": w.min_replicas, "maxReplicas": w.max_replicas,
            "metrics": [{"type": "Resource",
                         "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}],
        },
    }


def policy_configmap(policy: Policy) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": POLICY_CONFIGMAP, "namespace": policy.namespace},
            "data": {"mesh-policy.yaml": policy.source_yaml}}


def render(policy: Policy) -> dict[str, list[dict[str, Any]]]:
    files: dict[str, list[dict[str, Any]]] = {"policy-configmap.yaml": [policy_configmap(policy)]}
    for name in WORKLOADS:
        if name not in policy.services:
            raise ValueError(f"the mesh policy has no service {name!r}")
        docs = [service_account(policy, name), service(policy, name)]
        for version, _weight in policy.services[name].versions:
            docs.append(deployment(policy, name, version))
            docs.append(autoscaler(policy, name, version))
        files[f"{name}.yaml"] = docs
    return files


def render_files(policy: Policy, policy_label: str) -> dict[str, str]:
    out = {}
    for file_name, docs in render(policy).items():
        service_name = file_name[:-5]
        if file_name == "policy-configmap.yaml":
            intent = "The mesh policy file, mounted in every pod."
        else:
            intent = f"The {service_name} service: ServiceAccount, Service, Deployment and HPA per version."
        out[file_name] = HEADER.format(policy=policy_label, intent=intent) + dump_documents(docs)
    return out


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the policy file in the ConfigMap) as readable `|` blocks; no YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def dump_documents(docs: list[dict[str, Any]]) -> str:
    return "".join("---\n" + yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=120, allow_unicode=True) for doc in docs)
