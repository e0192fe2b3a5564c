"""Several gateways sharing one PostgreSQL state store: any of them serves any kernel, REST and WebSocket,
without sticky sessions. A kernel started through A is executed, interrupted, restarted and deleted through B;
with one gateway stopped, the other still serves it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tests.conftest import GatewayProcess, wait_until
from tests.pgserver import PostgresServer
from tests.test_lifecycle import interrupt_sleep
from tests.test_persistence import alive, pid_of

pytestmark = pytest.mark.ops


def shared_config(postgres: PostgresServer, tmp_path: Path) -> dict[str, Any]:
    """The state section every gateway of the test gets: one database, one key."""
    key = tmp_path / "state.key"
    key.write_bytes(Fernet.generate_key())
    key.chmod(0o600)
    return {"state": {"store": "postgresql", "dsn": postgres.new_database(), "secret_key_file": str(key),
                      "on_stop": "keep"}}


def listed(gw: GatewayProcess) -> list[str]:
    """The kernel ids ``gw`` lists."""
    return [k["id"] for k in gw.client.request("GET", "/api/kernels").json]


def test_a_kernel_started_through_one_gateway_is_used_through_the_other(postgres: PostgresServer,
                                                                       tmp_path: Path) -> None:
    """Start through A; list, read, execute, interrupt, restart through B; stop B and A still serves it;
    delete through A. Exactly one gateway runs the kernel at a time (the other lets go)."""
    config = shared_config(postgres, tmp_path)
    a = GatewayProcess(config)
    b = GatewayProcess(config)
    try:
        kernel_id = a.client.start_kernel()
        first_pid = pid_of(a.client, kernel_id, "v = 'set through A'")
        wait_until(lambda: kernel_id in listed(b), 10, 0.2, what="B to list the kernel")
        assert b.client.kernel(kernel_id).status == 200
        sock = b.client.connect(kernel_id)
        assert sock.execute("print(v)").stdout.strip() == "set through A"
        sock.close()
        wait_until(lambda: "letting go" in a.log(), 10, 0.2, what="A to let go of the kernel B took over")
        interrupt_sleep(b.client, kernel_id)
        assert b.client.request("POST", f"/api/kernels/{kernel_id}/restart", {}).status == 200
        second_pid = pid_of(b.client, kernel_id)
        assert second_pid != first_pid
        wait_until(lambda: not alive(first_pid), 10, what="the kernel before the restart to end")
        assert listed(a) == [kernel_id] and listed(b) == [kernel_id]
        assert b.stop() == 0
        assert alive(second_pid), "B keeps its kernels running when it stops (state.on_stop: keep)"
        sock = a.client.connect(kernel_id)
        assert sock.execute("print(v)").reply["content"]["ename"] == "NameError"  # restarted through B
        sock.close()
        assert a.client.delete_kernel(kernel_id) == 204
        wait_until(lambda: not alive(second_pid), 10, what="the kernel to end after DELETE")
        assert listed(a) == []
    finally:
        a.stop()
        b.stop()


def test_exactly_one_gateway_culls_a_kernel(postgres: PostgresServer, tmp_path: Path) -> None:
    """Both gateways cull idle kernels; the kernel moved from A to B; only B culls it, once."""
    config = shared_config(postgres, tmp_path)
    config["kernels"] = {"cull_idle_timeout": 3, "cull_interval": 0.5}
    a = GatewayProcess(config)
    b = GatewayProcess(config)
    try:
        kernel_id = a.client.start_kernel()
        pid = pid_of(b.client, kernel_id)  # through B: B runs it now
        wait_until(lambda: "letting go" in a.log(), 10, 0.2, what="A to let go")
        wait_until(lambda: not alive(pid), 30, 0.2, what="the idle kernel to be culled")
        wait_until(lambda: kernel_id not in listed(a) and kernel_id not in listed(b), 10, 0.5,
                   what="both gateways to forget the kernel")
        culls = [line for gw in (a, b) for line in gw.log().splitlines() if f"kernel {kernel_id} culled" in line]
        assert len(culls) == 1 and f"kernel {kernel_id} culled" in b.log(), culls
    finally:
        a.stop()
        b.stop()
