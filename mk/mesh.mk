# Full-mesh load benchmark: 200 streaming clients for 60 s through the mesh and the same load straight at
# the inference replica (the anchor), in 2 interleaved rounds; judged on the rate inside the window.
.PHONY: bench-mesh
bench-mesh: install model
	$(PY) -m bench.mesh.run --clients 200 --duration 60 --rounds 2 --up-args "$(MESH_BENCH_UP_ARGS)"

MESH_BENCH_UP_ARGS ?=
