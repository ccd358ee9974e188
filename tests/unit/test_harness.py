"""The test suite's own helpers: a missing real component skips, or fails when real services are
required; waits fail naming what they waited for; the settle wait sees an event that lands late."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from tests.conftest import REQUIRE_REAL_SERVICES, require_real_component
from tests.settlement import router_backlog, settled_usage
from tests.waiting import WaitTimeout, wait_until, wait_until_blocking

pytest_plugins = ["pytester"]

USES_A_MISSING_COMPONENT = textwrap.dedent("""
    from tests.conftest import require_real_component

    def test_needs_postgres():
        require_real_component(False, "PostgreSQL server binaries", "make postgres-server")
""")


def test_a_missing_component_skips_when_real_services_are_not_required(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_REAL_SERVICES, raising=False)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(USES_A_MISSING_COMPONENT)
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(skipped=1)


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_a_missing_component_fails_instead_of_skipping_when_real_services_are_required(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(REQUIRE_REAL_SERVICES, value)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(USES_A_MISSING_COMPONENT)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*PostgreSQL server binaries not found*AUTOGLM_REQUIRE_REAL_SERVICES=1*"])


def test_an_available_component_neither_skips_nor_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_REAL_SERVICES, "1")
    require_real_component(True, "redis-server", "make redis-server")
    monkeypatch.setenv(REQUIRE_REAL_SERVICES, "0")
    with pytest.raises(pytest.skip.Exception):
        require_real_component(False, "redis-server", "make redis-server")


async def test_wait_until_returns_the_value_and_fails_naming_what_it_waited_for() -> None:
    calls = iter(range(100))

    async def third_call() -> int:
        return max(0, next(calls) - 1)

    assert await wait_until(third_call, 5, "the third call", interval=0) == 1
    with pytest.raises(WaitTimeout, match=r"timed out after 0\.1 s waiting for the flag to rise"):
        await wait_until(lambda: False, 0.1, "the flag to rise")
    with pytest.raises(AssertionError, match="waiting for a file"):
        wait_until_blocking(lambda: None, 0.1, "a file")


async def test_the_settle_wait_sees_an_event_that_lands_after_the_target_count() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def ledger() -> int:  # reaches the expected 2 at once; a duplicate lands 0.3 s later
        return 2 if loop.time() - start < 0.3 else 3

    seen = await settled_usage(ledger, lambda n: n, 2, "a late duplicate", window_s=0.5, timeout_s=5,
                               interval_s=0.02)
    assert seen == 3
    assert loop.time() - start >= 0.8  # the window restarted at the late event


async def test_the_settle_wait_fails_with_what_is_missing() -> None:
    async def ledger() -> int:
        return 1

    with pytest.raises(AssertionError, match="billing holds 1 of 2 expected events"):
        await settled_usage(ledger, lambda n: n, 2, "two events", window_s=0.05, timeout_s=0.3, interval_s=0.02)


def test_router_backlog_refuses_a_path_that_is_not_a_router_data_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AssertionError, match="not a router's data dir"):
        router_backlog(tmp_path)
