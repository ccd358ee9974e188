"""Billing test fixtures: a real PostgreSQL for the session, and a billing server per database kind.

PostgreSQL comes from Debian's `postgresql` package (`make postgres-server` installs it). The fixture runs
`initdb` in a temp dir as the `postgres` (or `nobody`) user when the tests run as root, starts the server
on a unix socket in that dir with TCP disabled, and stops it by PID at the end of the session. When no
PostgreSQL binaries can be found the PostgreSQL cases skip with the reason, or fail when
AUTOGLM_REQUIRE_REAL_SERVICES=1 (as in CI: see `require_real_component`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer
from tests.conftest import require_real_component
from tests.integration.billing.helpers import OPERATOR_TOKEN
from tests.waiting import wait_until_blocking


def _pg_bin() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


@dataclass
class PgServer:
    socket_dir: str
    user: str

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}"

    def create_database(self) -> str:
        name = "billing_" + uuid.uuid4().hex[:10]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


@contextlib.contextmanager
def throwaway_postgres(root: Path, bindir: Path) -> Iterator[PgServer]:
    """A PostgreSQL cluster initialised under `root`, on a unix socket there with TCP off, stopped by PID.

    As root, the cluster runs as `postgres` (or `nobody`): PostgreSQL refuses to run as root."""
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    runas: list[str] = []
    user = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        user = "postgres" if _user_exists("postgres") else "nobody"
        entry = pwd.getpwnam(user)
        for path in (root, sock):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        runas = ["runuser", "-u", user, "--"]
    subprocess.run([*runas, str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True)
    proc = subprocess.Popen(
        [*runas, str(bindir / "postgres"), "-D", str(data), "-k", str(sock), "-c", "listen_addresses=",
         "-c", "max_connections=200", "-c", "fsync=on", "-c", "shared_buffers=64MB"],
        stdout=subprocess.DEVNULL, stderr=(root / "postgres.log").open("wb"), start_new_session=True)
    server = PgServer(str(sock), user)
    try:
        _wait_ready(server, proc, root)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGQUIT)  # immediate shutdown: a throwaway cluster
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    bindir = _pg_bin()
    require_real_component(bindir is not None, "PostgreSQL server binaries",
                           "install Debian's `postgresql`: make postgres-server")
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="billing-pg-"))
    try:
        with throwaway_postgres(root, bindir) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _wait_ready(server: PgServer, proc: subprocess.Popen[bytes], root: Path) -> None:
    def accepting() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited: {(root / 'postgres.log').read_text()[-2000:]}")
        try:
            psycopg.connect(server.dsn(), connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    wait_until_blocking(accepting, 30, "postgres to accept connections", interval=0.1)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    server: PgServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
async def billing(serve, database: str) -> AsyncIterator[RunningServer]:
    yield await serve(build_server(BillingConfig(server=ServerSettings(port=0), database=database,
                                                 operator_token=OPERATOR_TOKEN)))
