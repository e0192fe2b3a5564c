"""State that survives the gateway: kernels keep running when egd is killed (-9) or stopped (SIGTERM with
``state.on_stop: keep``), and the next egd with the same state re-attaches to them under the same ids, with
their variables; a kernel that died meanwhile is cleaned up. Secrets are not in the store in the clear."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.client import GatewayClient
from tests.conftest import GatewayProcess, wait_until
from tests.procs import alive

pytestmark = pytest.mark.ops


def persistent(runtime: Path, **overrides: Any) -> GatewayProcess:
    """A gateway whose state (and connection files) live in ``runtime``, which keeps kernels when it stops."""
    return GatewayProcess({"kernels": {"runtime_dir": str(runtime)}, "state": {"on_stop": "keep"}, **overrides})


def pid_of(client: GatewayClient, kernel_id: str, code: str = "") -> int:
    """Run ``code`` in the kernel, then return its pid."""
    sock = client.connect(kernel_id)
    pid = int(sock.execute(f"{code}\nimport os; print(os.getpid())").stdout.split()[-1])
    sock.close()
    return pid


def test_kill_9_then_restart_reattaches_and_cleans_up(tmp_path: Path) -> None:
    """egd is SIGKILLed with two kernels running; one of them dies while no gateway runs. The next egd lists
    the survivor under the same id, with its variable, interrupts and deletes it; the dead one is gone from
    the list and from the store."""
    runtime = tmp_path / "runtime"
    first = persistent(runtime)
    survivor = first.client.start_kernel()
    victim = first.client.start_kernel()
    survivor_pid = pid_of(first.client, survivor, "x = 'set before the crash'")
    victim_pid = pid_of(first.client, victim)
    first.proc.kill()
    first.proc.wait(10)
    first.stop()
    assert alive(survivor_pid) and alive(victim_pid), "kernels must outlive their gateway"
    os.killpg(victim_pid, signal.SIGKILL)
    wait_until(lambda: not alive(victim_pid), 10, what="the victim to die")

    second = persistent(runtime)
    try:
        assert [k["id"] for k in second.client.request("GET", "/api/kernels").json] == [survivor]
        sock = second.client.connect(survivor)
        assert sock.execute("print(x)").stdout.strip() == "set before the crash"
        sock.close()
        assert f"kernel {victim}" in second.log() and "forgotten" in second.log()
        assert second.client.request("POST", f"/api/kernels/{survivor}/interrupt", {}).status == 204
        assert second.client.delete_kernel(survivor) == 204
        wait_until(lambda: not alive(survivor_pid), 10, what="the survivor to be stopped")
    finally:
        second.stop()
    third = persistent(runtime)
    try:
        assert third.client.request("GET", "/api/kernels").json == []
    finally:
        third.stop()


def test_sigterm_keeps_kernels_and_shutdown_policy_stops_them(tmp_path: Path) -> None:
    """SIGTERM with ``on_stop: keep``: the kernel runs on and the next gateway adopts it, restart included;
    with ``on_stop: shutdown`` the gateway stops it."""
    runtime = tmp_path / "runtime"
    first = persistent(runtime)
    kernel_id = first.client.start_kernel()
    pid = pid_of(first.client, kernel_id, "y = 7")
    assert first.stop() == 0
    assert alive(pid)
    assert "1 kernel(s) keep running" in first.log()

    second = persistent(runtime)
    sock = second.client.connect(kernel_id)
    assert sock.execute("print(y * 6)").stdout.strip() == "42"
    sock.close()
    assert second.client.request("POST", f"/api/kernels/{kernel_id}/restart", {}).status == 200
    new_pid = pid_of(second.client, kernel_id)
    assert new_pid != pid
    assert second.stop() == 0
    assert alive(new_pid)

    third = GatewayProcess({"kernels": {"runtime_dir": str(runtime)}, "state": {"on_stop": "shutdown"}})
    assert [k["id"] for k in third.client.request("GET", "/api/kernels").json] == [kernel_id]
    third.stop()
    wait_until(lambda: not alive(new_pid), 10, what="the kernel to be stopped with its gateway")


def test_store_keeps_no_secret_in_the_clear(tmp_path: Path) -> None:
    """The kernel's message key is in the store only encrypted; the store and its key file are private."""
    runtime = tmp_path / "runtime"
    gw = persistent(runtime)
    kernel_id = gw.client.start_kernel()
    try:
        connection_file = next(runtime.glob(f"kernel-{kernel_id}*.json"))
        key = __import__("json").loads(connection_file.read_text())["key"]
        store = runtime / "egd-state.sqlite"
        wait_until(lambda: store.exists() and kernel_id.encode() in store.read_bytes(), 10, what="the record")
        assert key.encode() not in store.read_bytes()
        assert store.stat().st_mode & 0o077 == 0
        assert (runtime / "egd-state.sqlite.key").stat().st_mode & 0o077 == 0
    finally:
        gw.client.delete_kernel(kernel_id)
        gw.stop()


@pytest.mark.ssh
def test_kill_9_with_an_ssh_kernel(tmp_path: Path, ssh_lab: Any) -> None:
    """An ssh kernel outlives its SIGKILLed gateway; the next gateway finds its launcher again (signed ping
    with the launch secret from the encrypted store) and drives the same kernel, state included."""
    from tests.conftest import KERNELSPECS
    from tests.test_ssh import write_spec

    specs = tmp_path / "specs"
    write_spec(specs, "ssh_python", [ssh_lab.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    config = {
        "kernels": {"kernelspec_dirs": [str(KERNELSPECS), str(specs)], "runtime_dir": str(tmp_path / "runtime")},
        "state": {"on_stop": "keep"},
        "drivers": {"local": {}, "ssh": {"hosts": [h.name for h in ssh_lab.hosts],
                                         "ssh_config": str(ssh_lab.ssh_config_path),
                                         "callback_host": ssh_lab.gateway_ip, "log_dir": str(tmp_path / "logs")}},
    }
    first = GatewayProcess(config)
    kernel_id = first.client.start_kernel("ssh_python")
    sock = first.client.connect(kernel_id)
    host = sock.execute("z = 'remote state'\nimport socket; print(socket.gethostname())").stdout.strip()
    sock.close()
    first.proc.kill()
    first.proc.wait(10)
    first.stop()
    second = GatewayProcess({**config, "state": {"on_stop": "shutdown"}})
    try:
        assert [k["id"] for k in second.client.request("GET", "/api/kernels").json] == [kernel_id]
        sock = second.client.connect(kernel_id)
        run = sock.execute("import socket; print(z, socket.gethostname())")
        sock.close()
        assert run.stdout.strip() == f"remote state {host}"
        assert second.client.delete_kernel(kernel_id) == 204
    finally:
        second.stop()
    for lab_host in ssh_lab.hosts:
        assert not lab_host.processes_matching("kernel_launcher"), "a launcher was left on a host"


def test_store_of_an_earlier_version_is_brought_up_to_date(tmp_path: Path) -> None:
    """A state store without the columns later versions added (gateway, epoch) is extended at start, not
    refused."""
    import sqlite3

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    with sqlite3.connect(runtime / "egd-state.sqlite") as db:
        db.execute("CREATE TABLE kernels (kernel_id TEXT PRIMARY KEY, username TEXT NOT NULL, spec TEXT NOT NULL, "
                   "driver TEXT NOT NULL, updated REAL NOT NULL, sealed BLOB NOT NULL)")
    gw = persistent(runtime)
    try:
        assert gw.client.request("GET", "/readyz").json["checks"]["store"] == "ok"
        assert "adding column gateway" in gw.log() and "adding column epoch" in gw.log()
        kernel_id = gw.client.start_kernel()
        assert gw.client.delete_kernel(kernel_id) == 204
    finally:
        gw.stop()
