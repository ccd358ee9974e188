# HTTP API benchmark (writes bench/results/http.json and .png): added latency over gRPC, beside LiteLLM's
# proxy and llama.cpp's OpenAI server. `make bench-http BENCH_HTTP_ARGS=--quick` is a smoke test.
.PHONY: bench-http bench-http-deps
LITELLM_VENV := bench/http/.venv-litellm
BENCH_HTTP_ARGS ?=

# Bench-only installs: llama-cpp-python with its server (compiles llama.cpp, about 8 minutes, once; the
# same package bench-inference-deps installs), and LiteLLM's proxy in a venv of its own so that its pins
# never touch the project's.
bench-http-deps: $(VENV)/.installed
	@$(PY) -c "import llama_cpp.server.app" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(VENV)/bin/pip install "llama-cpp-python[server]>=0.3,<0.4"
	@test -x $(LITELLM_VENV)/bin/litellm || { $(PYTHON) -m venv $(LITELLM_VENV) && \
		$(LITELLM_VENV)/bin/pip install -q --disable-pip-version-check 'litellm[proxy]>=1.50,<2'; }

bench-http: bench-http-deps
	$(PY) -m bench.http.bench_http $(BENCH_HTTP_ARGS)
