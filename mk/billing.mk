# Billing: a PostgreSQL server for the billing tests, and the billing benchmark.
#   make postgres-server   install Debian's postgresql when no server binaries exist (root only; else a no-op)
#   make bench-billing     bench/results/billing.json + billing.png, and billing-reports.json (report latency
#                          at 1 M and 10 M events; BENCH_BILLING_SKIP_10M=1 skips the 10 M load)
.PHONY: postgres-server bench-billing

PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb) $(shell command -v initdb 2>/dev/null))

postgres-server:
ifeq ($(PG_INITDB),)
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing postgresql for the billing tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else \
		echo "postgres-server: no PostgreSQL binaries and not root; the PostgreSQL billing tests will skip (fail with AUTOGLM_REQUIRE_REAL_SERVICES=1, as .ci/run sets)"; \
	fi
else
	@true
endif

TEST_PREREQS += postgres-server

bench-billing: $(VENV)/.installed postgres-server
	$(PY) -m bench.billing.run --out bench/results/billing.json --plot bench/results/billing.png
	$(PY) -m bench.billing.reports --out bench/results/billing-reports.json
