# Router benchmark: overhead vs inference, cache hits, single-flight, tokens/min accuracy.
.PHONY: bench-router

# Then the PostgreSQL store against SQLite and 3 routers against 1 (ROUTER_REPLICAS_ARGS="--rounds 20 --seconds 5"
# for a short run).
bench-router: $(VENV)/.installed
	$(PY) -m bench.router.bench_router
	$(PY) -m bench.router.bench_replicas $(ROUTER_REPLICAS_ARGS)

# Billing leases against the per-request path: billing RPCs per 1,000 requests, added p50 over a bare relay,
# and the 1,000-request budget probe (bench/results/router-leases.json).
.PHONY: bench-router-leases
bench-router-leases: $(VENV)/.installed
	$(PY) -m bench.router.bench_leases
