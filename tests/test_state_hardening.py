"""The state store as a fault and a second gateway would meet it.

- A store that cannot be written is refused at start (a read-only file system for SQLite, a database user
  with SELECT rights only for PostgreSQL), with a clear message and a non-zero exit;
- a store that stops accepting writes at run time (rights revoked) turns ``/readyz`` to 503 (check ``store``)
  within one check interval, logged once, and back to 200 when writes work again (logged once too); a kernel
  started meanwhile is recorded then, so a gateway after a kill -9 re-attaches it;
- an SQLite store belongs to one gateway: a second egd on the same store exits non-zero naming the holder; after
  the holder is killed (-9) the next egd starts and re-attaches its kernels.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet

from tests.conftest import GatewayProcess, free_port, wait_until
from tests.pgserver import PostgresServer
from tests.test_persistence import alive, persistent, pid_of

pytestmark = pytest.mark.security


def run_again(gw: GatewayProcess, timeout: float = 60, **changes: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``egd run`` with ``gw``'s configuration (another port, ``changes`` per section), to its end."""
    config = yaml.safe_load(gw.config_path.read_text())
    config["server"]["port"] = free_port()
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path = gw.dir / f"again-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "egd", "run", "--config", str(path)], capture_output=True,
                          text=True, timeout=timeout)


def _kill(pid: int | None) -> None:
    """End a kernel a failed test would otherwise leave (its runtime directory is not the session's)."""
    if pid is not None and alive(pid):
        os.killpg(pid, signal.SIGKILL)


def test_a_second_gateway_on_one_sqlite_store_is_refused(tmp_path: Path) -> None:
    """Two egd on one runtime directory (one SQLite store): the second exits non-zero, naming the first (pid,
    host, start time) and leaving its kernels alone. After the first is killed -9, a new one starts and
    re-attaches the kernel (the dead gateway's lock went with it, the kernel kept none)."""
    runtime = tmp_path / "runtime"
    first = persistent(runtime)
    pid = None
    try:
        kernel_id = first.client.start_kernel()
        pid = pid_of(first.client, kernel_id, "x = 'first'")
        second = run_again(first)
        assert second.returncode != 0
        output = second.stdout + second.stderr
        assert f"is in use by another egd (pid {first.proc.pid} on host {socket.gethostname()}, started " in output
        assert "PostgreSQL" in output
        assert "re-attach" not in output and alive(pid)
        assert first.client.request("GET", f"/api/kernels/{kernel_id}").status == 200
        first.proc.kill()
        first.proc.wait(10)
        first.stop()
        third = persistent(runtime, state={"on_stop": "shutdown"})
        try:
            assert [k["id"] for k in third.client.request("GET", "/api/kernels").json] == [kernel_id]
            sock = third.client.connect(kernel_id)
            assert sock.execute("print(x)").stdout.strip() == "first"
            sock.close()
            assert third.client.delete_kernel(kernel_id) == 204
            wait_until(lambda: not alive(pid), 10, what="the kernel to end")
        finally:
            third.stop()
    finally:
        first.stop()
        _kill(pid)


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted at a fresh directory (mount needs root: chmod does not stop root, a read-only file
    system does); :func:`remount` turns it read-only. Unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    where = tmp_path / "mnt"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(where)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    """Remount ``where`` read-only (``ro``) or writable (``rw``)."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def test_an_sqlite_store_that_cannot_be_written_is_refused_at_start(read_only_mount: Path) -> None:
    """A store on a file system that went read-only: egd exits non-zero at once with a message that names the
    store and says it cannot be written; it does not serve."""
    store = read_only_mount / "state.sqlite"
    gw = persistent(read_only_mount.parent / "runtime", state={"path": str(store), "on_stop": "shutdown"})
    assert gw.stop() == 0
    assert store.exists()
    remount(read_only_mount, "ro")
    run = run_again(gw)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert f"the state store {store} cannot be written" in output, output
    assert "egd is listening" not in output


def test_an_immutable_sqlite_store_is_refused_at_start(tmp_path: Path) -> None:
    """The store file itself cannot be written (chattr +i: root is stopped too), its directory can: SQLite opens
    it read-only and the write check is what refuses it, naming SQLite's reason."""
    runtime = tmp_path / "runtime"
    gw = persistent(runtime, state={"on_stop": "shutdown"})
    assert gw.stop() == 0
    store = runtime / "egd-state.sqlite"
    if subprocess.run(["chattr", "+i", str(store)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        run = run_again(gw)
    finally:
        subprocess.run(["chattr", "-i", str(store)], check=True)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert f"the state store SQLite {store} cannot be written (attempt to write a readonly database)" in output, \
        output
    assert "egd is listening" not in output


def _role(postgres: PostgresServer, dsn: str, grants: list[str]) -> str:
    """A new role of ``postgres`` (not a superuser: rights apply to it) with ``grants`` in the database of ``dsn``;
    the connection string of that database as the role."""
    import psycopg2

    role = f"egd_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role} LOGIN")
        for grant in grants:
            cursor.execute(grant.format(role=role))
    conn.close()
    return dsn.replace("user=egd", f"user={role}")


def _sql(dsn: str, statement: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(statement)
    conn.close()


def _pg_state(tmp_path: Path, dsn: str) -> dict[str, Any]:
    key = tmp_path / "state.key"
    if not key.exists():
        key.write_bytes(Fernet.generate_key())
        key.chmod(0o600)
    return {"store": "postgresql", "dsn": dsn, "secret_key_file": str(key), "on_stop": "keep"}


@pytest.mark.ops
def test_a_postgresql_store_with_select_rights_only_is_refused_at_start(postgres: PostgresServer,
                                                                        tmp_path: Path) -> None:
    """The table exists, the gateway's database user may read it but not write: egd exits non-zero."""
    dsn = postgres.new_database()
    first = GatewayProcess({"state": _pg_state(tmp_path, dsn)})  # creates the table
    assert first.stop() == 0
    reader = _role(postgres, dsn, ["GRANT USAGE, CREATE ON SCHEMA public TO {role}",
                                   "GRANT SELECT ON kernels TO {role}"])
    run = run_again(first, state=_pg_state(tmp_path, reader))
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "cannot be written (permission denied for table kernels)" in output, output
    assert "egd is listening" not in output


def _store_check(gw: GatewayProcess) -> tuple[int, str]:
    resp = gw.client.request("GET", "/readyz")
    return resp.status, str((resp.json or {}).get("checks", {}).get("store"))


@pytest.mark.ops
def test_writes_failing_at_run_time_make_the_gateway_not_ready(postgres: PostgresServer, tmp_path: Path) -> None:
    """Rights revoked while egd runs: within one write-check interval /readyz is 503 with check store saying
    why, logged once however long it lasts; a kernel started meanwhile works. Rights back: /readyz 200, one
    recovery line, and the kernel is recorded: after a kill -9 the next gateway re-attaches it."""
    dsn = postgres.new_database()
    owner = _role(postgres, dsn, ["GRANT ALL ON SCHEMA public TO {role}"])
    role = owner.split("user=")[1].split()[0]
    state = _pg_state(tmp_path, owner)
    gw = GatewayProcess({"state": state})
    pid = None
    try:
        assert _store_check(gw) == (200, "ok")
        _sql(dsn, f"REVOKE INSERT, UPDATE, DELETE ON kernels FROM {role}")
        wait_until(lambda: _store_check(gw)[0] == 503, 25, 0.2, what="/readyz to report the store")
        why = _store_check(gw)[1]
        assert "the state store cannot be written" in why and "permission denied" in why
        kernel_id = gw.client.start_kernel()  # serving goes on; its record cannot be written now
        pid = pid_of(gw.client, kernel_id, "x = 'while the store failed'")
        assert _store_check(gw)[0] == 503
        _sql(dsn, f"GRANT INSERT, UPDATE, DELETE ON kernels TO {role}")
        wait_until(lambda: _store_check(gw) == (200, "ok"), 25, 0.2, what="/readyz to recover")
        log = gw.log()
        assert log.count("writing: permission denied for table kernels") == 1, log
        assert log.count("writing: works again") == 1, log
        assert "Traceback" not in log
        gw.proc.kill()
        gw.proc.wait(10)
        gw.stop()
        again = GatewayProcess({"state": {**state, "on_stop": "shutdown"}})
        try:
            assert [k["id"] for k in again.client.request("GET", "/api/kernels").json] == [kernel_id]
            sock = again.client.connect(kernel_id)
            assert sock.execute("print(x)").stdout.strip() == "while the store failed"
            sock.close()
        finally:
            again.stop()
        wait_until(lambda: not alive(pid), 10, what="the kernel to stop with the gateway")
    finally:
        gw.stop()
        _kill(pid)


@pytest.mark.ops
def test_the_store_sync_survives_a_database_outage(postgres: PostgresServer, tmp_path: Path) -> None:
    """With a shared store the sync with the other gateways runs every 2 s; its failures (rights revoked on
    reads too) are logged once and it goes on: a kernel another gateway starts after the outage is listed."""
    dsn = postgres.new_database()
    owner = _role(postgres, dsn, ["GRANT ALL ON SCHEMA public TO {role}"])
    role = owner.split("user=")[1].split()[0]
    state = _pg_state(tmp_path, owner)
    a = GatewayProcess({"state": {**state, "on_stop": "shutdown"}})
    b = GatewayProcess({"state": {**state, "on_stop": "shutdown"}})
    try:
        _sql(dsn, f"REVOKE ALL ON kernels FROM {role}")
        wait_until(lambda: "sync with the other gateways: " in a.log(), 15, 0.2, what="the sync to fail")
        _sql(dsn, f"GRANT ALL ON kernels TO {role}")
        kernel_id = b.client.start_kernel()
        wait_until(lambda: kernel_id in [k["id"] for k in a.client.request("GET", "/api/kernels").json], 15, 0.2,
                   what="A to list B's kernel after the outage")
        assert a.log().count("sync with the other gateways: permission denied") == 1, a.log()
        assert b.client.delete_kernel(kernel_id) == 204
    finally:
        a.stop()
        b.stop()


def test_the_culler_survives_a_failing_pass() -> None:
    """The culler's pass fails three times in a row (its kernel table cannot be read: a fault only a fake can
    inject, here a callable that raises); the loop goes on, logs the failure once and its end once, and the
    fourth pass runs. A plain LoopingCall ends for good at the first failure."""
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    from egd.config import KernelsConfig
    from egd.kernels.culler import KernelCuller

    clock = Clock()
    passes: list[float] = []
    lines: list[str] = []

    def kernels() -> list[Any]:
        passes.append(clock.seconds())
        if len(passes) <= 3:
            raise RuntimeError("the kernel table is away")
        return []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") != LogLevel.debug:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        service = KernelCuller(KernelsConfig(cull_interval=1.0), kernels, clock)
        service.startService()
        for _ in range(5):
            clock.advance(1.0)
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert passes == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [line for line in lines if "kernel culler" in line] == [
        "kernel culler: the kernel table is away (logged once until it works again)", "kernel culler: works again"]
