# Full-mesh load benchmark (200 streaming clients for 60 s, then the inference-only anchor).
.PHONY: bench-mesh
bench-mesh: install model
	$(PY) -m bench.mesh.run --clients 200 --duration 60 --up-args "$(MESH_BENCH_UP_ARGS)"

MESH_BENCH_UP_ARGS ?=
