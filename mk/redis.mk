# Router rate limits: a redis-server binary for the Redis rate-limit backend tests.
#   make redis-server   install Debian's redis-server when it is missing (root only; else a no-op)
.PHONY: redis-server

redis-server:
	@if command -v redis-server >/dev/null 2>&1; then \
		true; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing redis-server for the router rate-limit tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	else \
		echo "redis-server: not installed and not root; the Redis rate-limit tests will skip (fail with AUTOGLM_REQUIRE_REAL_SERVICES=1, as .ci/run sets)"; \
	fi

TEST_PREREQS += redis-server
