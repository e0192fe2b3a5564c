"""A real PostgreSQL server for the tests that share a state store between gateways.

The fixture installs Debian's postgresql when missing (``tests/services/install-postgres.sh``, as root),
initialises a throw-away cluster in a temporary directory owned by the ``postgres`` user, starts ``postgres``
on 127.0.0.1 and a free port with trust authentication for loopback, and stops it at the end of the session.
Each test gets a database of its own (:meth:`PostgresServer.new_database`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALLER = Path(__file__).resolve().parent / "services" / "install-postgres.sh"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster run by the tests."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        if not found:
            raise RuntimeError("postgresql is not installed")
        self.bin = Path(found[-1]).parent
        self.user = pwd.getpwnam("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="egd-pg-"))
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _as_postgres(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True,
                              timeout=120, **kwargs)  # type: ignore[call-overload]

    def start(self) -> None:
        """initdb, then postgres on 127.0.0.1:port; returns once it accepts connections."""
        data = self.dir / "data"
        self._as_postgres([str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "egd", "--no-sync"])
        self.proc = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(self.bin / "postgres"), "-D", str(data), "-h", "127.0.0.1",
             "-p", str(self.port), "-k", str(self.dir), "-c", "fsync=off"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "postgres.log", "wb"), start_new_session=True)
        deadline = time.monotonic() + 60
        while subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not start: " + (self.dir / "postgres.log").read_text()[-2000:])
            time.sleep(0.1)

    def new_database(self) -> str:
        """A fresh database; its libpq connection string."""
        import psycopg2

        name = f"egd_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(self.dsn("postgres"))
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        conn.close()
        return self.dsn(name)

    def dsn(self, database: str) -> str:
        """The connection string of ``database``."""
        return f"host=127.0.0.1 port={self.port} user=egd dbname={database}"

    def stop(self) -> None:
        """Fast shutdown, then remove the cluster."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (installed first when missing; root needed then)."""
    if not glob.glob("/usr/lib/postgresql/*/bin/postgres"):
        if os.geteuid() != 0:
            pytest.skip("PostgreSQL is not installed and installing it needs root")
        subprocess.run(["sh", str(INSTALLER)], check=True, timeout=600)
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
