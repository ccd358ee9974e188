# The operator console's browser tests (tests/e2e/test_console.py): headless Chromium and its WebDriver.
#   make chromium   install Debian's chromium and chromium-driver when missing (root only; else a no-op)
.PHONY: chromium

chromium:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		true; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the console's browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "chromium: not installed and not root; the console's browser tests will skip (fail with AUTOGLM_REQUIRE_REAL_SERVICES=1, as .ci/run sets)"; \
	fi

TEST_PREREQS += chromium

# Console page latency (bench/results/console.json + console.png): every page and JSON endpoint with
# 10,000 usage events in the ledger, against the 300 ms target.
.PHONY: bench-console
bench-console: $(VENV)/.installed
	$(PY) -m bench.console.bench_console
