# Inference engine benchmark (writes bench/results/inference.json and .png).
.PHONY: bench-inference bench-inference-deps bench-inference-kv-rss bench-inference-chat bench-inference-quality

# The anchors are bench-only installs: llama-cpp-python compiles llama.cpp (about 8 minutes, once);
# onnxruntime-genai's INT8 and INT4 models are built on first use from the GGUF into ~/.cache/autoglm/bench.
bench-inference-deps: $(VENV)/.installed
	@$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(VENV)/bin/pip install "llama-cpp-python>=0.3,<0.4"
	@$(PY) -c "import onnxruntime_genai" 2>/dev/null || $(VENV)/bin/pip install "onnxruntime-genai>=0.18,<1"

# BENCH_ARGS=--quick: one round of ours and every anchor, into the temp folder (a smoke test).
bench-inference: bench-inference-deps
	$(PY) -m bench.inference.bench_inference $(BENCH_ARGS)

# Just the KV-memory figure (no anchors): peak RSS with 1 prompt of 7,000 tokens beside 15 of 100.
bench-inference-kv-rss: $(VENV)/.installed
	$(PY) -m bench.inference.bench_inference --only kv-rss

# Just the chat figures: TTFT by turn of a 10-turn conversation through the router with and without the
# prefix cache, llama.cpp with its prompt cache on the same conversation, and the prefill tokens of 16
# requests sharing a 500-token system prompt. BENCH_ARGS=--quick: a 3-turn smoke test into the temp folder.
bench-inference-chat: $(VENV)/.installed
	@$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(VENV)/bin/pip install "llama-cpp-python>=0.3,<0.4"
	$(PY) -m bench.inference.bench_inference --only chat $(BENCH_ARGS)

# Just the quality figures: perplexity and top-1 agreement on tests/data/prose.txt of both builds and of
# onnxruntime-genai's INT8 and INT4 builds of the same GGUF (is each speed ratio between equal models?).
bench-inference-quality: bench-inference-deps
	$(PY) -m bench.inference.bench_inference --only quality
