"""Budget changes pushed to the routers' lease books: a change waits for every watching router's answer
(up to its deadline) with no lease granted meanwhile, and then yields what each router consumed."""

from __future__ import annotations

import asyncio

from services.billing.lease_watch import Watchers
from services.billing.model import Scope, ScopeKind

TENANT = Scope(ScopeKind.TENANT, tenant_id="acme")


async def test_a_change_waits_for_every_router_and_holds_lease_grants_until_it_commits() -> None:
    watchers = Watchers(ack_timeout_s=30)
    _, one = watchers.subscribe("r1")
    _, two = watchers.subscribe("r2")
    assert one.queue.get_nowait().scope.kind == ScopeKind.UNSPECIFIED  # first: re-learn every caller
    two.queue.get_nowait()
    order: list[str] = []

    async def change() -> None:
        async with watchers.changing(TENANT, "b1") as reported:
            order.append("commit")
            assert reported == {"lease-1": ("r1", 40)}

    async def grant() -> None:
        async with watchers.acquiring():
            order.append("grant")

    changing = asyncio.create_task(change())
    sent = await asyncio.wait_for(one.queue.get(), 5)
    assert (sent.budget_id, sent.ack_wanted) == ("b1", True)
    granting = asyncio.create_task(grant())
    assert watchers.ack("r1", sent.revision, {"lease-1": 40})
    await asyncio.sleep(0)
    assert not changing.done() and order == []  # r2 has not answered: no commit, no grant
    assert watchers.ack("r2", (await two.queue.get()).revision, {})
    await asyncio.wait_for(asyncio.gather(changing, granting), 5)
    assert order == ["commit", "grant"]
    assert not watchers.ack("r2", sent.revision, {})  # late: nobody waits for it


async def test_a_router_that_does_not_answer_delays_a_change_only_until_the_deadline() -> None:
    watchers = Watchers(ack_timeout_s=0.05)
    watchers.subscribe("silent")
    async with asyncio.timeout(5):
        async with watchers.changing(TENANT) as reported:
            assert reported == {}


async def test_a_router_that_hangs_up_is_not_waited_for() -> None:
    watchers = Watchers(ack_timeout_s=30)
    handle, gone = watchers.subscribe("gone")
    gone.queue.get_nowait()

    async def change() -> None:
        async with watchers.changing(TENANT):
            pass

    changing = asyncio.create_task(change())
    assert (await asyncio.wait_for(gone.queue.get(), 5)).ack_wanted  # the change now waits for it
    watchers.unsubscribe(handle)
    await asyncio.wait_for(changing, 5)
