# Router benchmark: overhead vs inference, cache hits, single-flight, tokens/min accuracy.
.PHONY: bench-router

bench-router: $(VENV)/.installed
	$(PY) -m bench.router.bench_router
