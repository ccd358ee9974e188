# Inference engine benchmark (writes bench/results/inference.json and .png).
.PHONY: bench-inference bench-inference-deps

# The llama.cpp anchor is a bench-only install (compiles llama.cpp, about 8 minutes, once).
bench-inference-deps: $(VENV)/.installed
	@$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(VENV)/bin/pip install "llama-cpp-python>=0.3,<0.4"

bench-inference: bench-inference-deps
	$(PY) -m bench.inference.bench_inference
