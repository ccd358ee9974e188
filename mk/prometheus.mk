# Observability: a real Prometheus server for the test that proves deploy/grafana/autoglm-mesh.json's queries.
#   make prometheus-server   install Debian's prometheus when it is missing (root only; else a no-op)
.PHONY: prometheus-server

prometheus-server:
	@if command -v prometheus >/dev/null 2>&1; then \
		true; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing prometheus for the dashboard test"; \
		apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive apt-get \
			-o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
		echo "prometheus: not installed and not root; the dashboard test will skip (fail with AUTOGLM_REQUIRE_REAL_SERVICES=1, as .ci/run sets)"; \
	fi

TEST_PREREQS += prometheus-server
