"""The issue's budget probe (smaller) with `billing_leases` on: holds bound the prompt exactly and the lease
room too small for a request (or not yet usable: no price known to the router) goes back when a Reserve
at the edge is refused, so the budget is spent in full with no overshoot."""

from __future__ import annotations

from pathlib import Path

from services.inference.engine.model import LoadedModel
from tests.integration.router.conftest import start_mesh
from tests.integration.router.test_router_budget_storm import (
    test_chat_holds_bound_the_prompt_exactly_so_the_budget_is_spent_in_full as probe,
)


async def test_with_leases_the_probe_spends_the_whole_budget_and_never_more(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, billing_leases=True)
    try:
        await probe(mesh, loaded_model)  # 300 concurrent against 30 worst cases: exactly 30 served, >= 95 % spent
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
