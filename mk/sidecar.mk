# Sidecar: Envoy configs rendered from the mesh policy, and the sidecar benchmark.
.PHONY: envoy-configs bench-sidecar

SIDECAR_POLICY := deploy/policy/mesh-policy.yaml
ENVOY_CERTS := .autoglm/certs

envoy-configs: $(VENV)/.installed
	$(PY) -m services.cli.sidecar_commands render-envoy --policy $(SIDECAR_POLICY) --service router -o deploy/envoy/router.yaml \
		--certs $(ENVOY_CERTS) --upstream 127.0.0.1:50051 --inbound-port 15051 --outbound-port 15001 --admin-port 15000 \
		--peer inference=127.0.0.1:15071 --peer billing=127.0.0.1:15061 --http-port 18443 --http-upstream 127.0.0.1:8080
	$(PY) -m services.cli.sidecar_commands render-envoy --policy $(SIDECAR_POLICY) --service inference -o deploy/envoy/inference.yaml \
		--certs $(ENVOY_CERTS) --upstream 127.0.0.1:50071 --inbound-port 15071 --outbound-port 15011 --admin-port 15002 \
		--peer billing=127.0.0.1:15061
	$(PY) -m services.cli.sidecar_commands render-envoy --policy $(SIDECAR_POLICY) --service billing -o deploy/envoy/billing.yaml \
		--certs $(ENVOY_CERTS) --upstream 127.0.0.1:50061 --inbound-port 15061 --outbound-port -1 --admin-port 15003

bench-sidecar: $(VENV)/.installed
	$(PY) -m bench.sidecar.run --out bench/results/sidecar.json

# Kubernetes + Istio manifests rendered from the policy (tests/e2e/test_deploy_manifests.py fails on drift).
.PHONY: deploy-manifests
deploy-manifests: $(VENV)/.installed
	$(PY) -m sidecar.deploy_render --policy $(SIDECAR_POLICY) --k8s deploy/k8s --istio deploy/istio
