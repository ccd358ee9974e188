"""`GET /ready` is what a Kubernetes readiness probe asks (deploy/k8s: the router Deployment): a router whose
PostgreSQL store cannot be reached says 503, so the Service sends its traffic to the replicas that can, and
ready again once the database is back. Real PostgreSQL, billing, inference replica and router."""

from __future__ import annotations

from pathlib import Path

import httpx
import psycopg

from services.common.ports import free_port
from services.inference.engine.model import LoadedModel
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL
from tests.integration.router.conftest import start_mesh
from tests.waiting import wait_until


def _allow_connections(server: PgServer, dsn: str, allow: bool) -> None:
    name = dsn.split("@/", 1)[1].split("?", 1)[0]
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {'true' if allow else 'false'}")
        if not allow:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


async def test_a_router_whose_database_is_away_is_not_ready_and_is_again_once_it_returns(
    serve, tmp_path: Path, loaded_model: LoadedModel, postgres: PgServer,  # noqa: F811
) -> None:
    dsn = postgres.create_database()
    port = free_port()
    mesh = await start_mesh(serve, tmp_path, loaded_model, database=dsn, http_port=port,
                            key_pepper_path=str(tmp_path / "pepper"))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            async def status() -> int:
                return (await http.get("/ready")).status_code

            await wait_until(lambda: _is(status, 200), 30, "the router to be ready")
            _allow_connections(postgres, dsn, False)
            try:
                await wait_until(lambda: _is(status, 503), 10, "the router to report its database away")
                body = (await http.get("/ready")).json()
                assert body["error"]["message"] == "the router's database cannot be reached"
                assert (await http.get("/health")).status_code == 200  # alive: a restart would not help
            finally:
                _allow_connections(postgres, dsn, True)
            await wait_until(lambda: _is(status, 200), 10, "the router to be ready again")
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()


async def _is(status, code: int) -> bool:  # type: ignore[no-untyped-def]
    return await status() == code
