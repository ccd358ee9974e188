# Model build: the bundled SmolLM2 chat model as an INT8 ONNX causal LM with KV-cache.
# Included by the top Makefile, which defines VENV, PY and the $(VENV)/.installed target.
# The result lives in the model cache ($(AUTOGLM_MODEL_CACHE) or ~/.cache/autoglm/models),
# never in the repository; a cached build whose manifest verifies is reused.

MODEL_SOURCE ?=
MODEL_BUILD_FLAGS ?=

.PHONY: model model-rebuild

model: $(VENV)/.installed
	$(PY) -m services.inference.modelbuild $(MODEL_SOURCE) $(MODEL_BUILD_FLAGS)

model-rebuild: $(VENV)/.installed
	$(PY) -m services.inference.modelbuild $(MODEL_SOURCE) $(MODEL_BUILD_FLAGS) --force

# `make test` and `make run` need the model in the cache first.
TEST_PREREQS += model
RUN_PREREQS += model
