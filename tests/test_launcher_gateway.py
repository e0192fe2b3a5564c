"""egd and a launcher under attack or dying, over ssh on the lab's hosts (issue 10, items 4, 11 and 15).

What a client sees: an interrupt is delivered despite a hostile peer on the launcher's control port, or it is
an error (never a 204 for nothing); a launcher killed with SIGKILL is noticed and its kernel restarted; the
gateway's launch listener refuses deeply nested JSON without a traceback; ssh kernels start for a gateway
whose HOME is long, and a failure of ssh's own socket names its cause.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client import GatewayClient, KernelSocket
from tests.conftest import GatewayProcess, wait_until
from tests.peers import dripping_peer
from tests.sshhosts import SshHost, SshLab
from tests.test_ssh import shared_ssh_gateway, ssh_gateway, where, write_spec

pytestmark = [pytest.mark.ssh, pytest.mark.security]

SLEEP = {"code": "import time; time.sleep(60)", "silent": False, "store_history": True, "user_expressions": {},
         "allow_stdin": False}


@pytest.fixture(scope="module")
def gw(ssh_lab: SshLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the ssh driver on the lab's hosts."""
    with shared_ssh_gateway(ssh_lab, tmp_path_factory.mktemp("launchergw")) as gateway:
        yield gateway


@pytest.fixture
def running(gw: GatewayProcess) -> Iterator[tuple[str, KernelSocket]]:
    """A kernel on an ssh host and a WebSocket to it; deleted after the test."""
    kernel_id = gw.client.start_kernel("ssh_python")
    sock = gw.client.connect(kernel_id)
    try:
        yield kernel_id, sock
    finally:
        sock.close()
        gw.client.delete_kernel(kernel_id)


def launcher_of(gw: GatewayProcess, kernel_id: str) -> tuple[int, tuple[str, int]]:
    """The launcher's pid and control address, from its log on the host (the hosts share this machine's pids)."""
    log_file = gw.host_log_dir / f"egd-kernel-{kernel_id}.log"  # type: ignore[attr-defined]
    found = re.findall(r"egd-launcher\[(\d+)\]: kernel pid \d+ ready on ([\d.]+); launcher port (\d+)",
                       log_file.read_text())
    assert found, log_file.read_text()
    pid, ip, port = found[-1]
    return int(pid), (ip, int(port))


def busy(client: GatewayClient, kernel_id: str, sock: KernelSocket) -> dict:
    """Start a 60-second cell and wait until the kernel is busy with it."""
    msg = sock.request("execute_request", SLEEP)
    wait_until(lambda: client.kernel(kernel_id).json["execution_state"] == "busy", 10, what="busy")
    return msg


def test_interrupt_is_delivered_despite_a_slow_peer(gw: GatewayProcess, running: tuple[str, KernelSocket]) -> None:
    """A peer that sends one byte a second to the launcher's control port held its single-threaded loop (the
    deadline was per recv): the interrupt was not delivered and still answered 204. Now it is delivered."""
    kernel_id, sock = running
    _, address = launcher_of(gw, kernel_id)
    with dripping_peer(address):
        msg = busy(gw.client, kernel_id, sock)
        resp = gw.client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {})
        assert resp.status == 204, resp.body
        assert sock.wait_for(msg, 15).reply["content"]["ename"] == "KeyboardInterrupt"


def test_undelivered_interrupt_is_an_error(gw: GatewayProcess, running: tuple[str, KernelSocket]) -> None:
    """A launcher that does not answer (stopped with SIGSTOP): the interrupt is a 503 with a JSON reason, not a
    204; once the launcher runs again, interrupts work."""
    kernel_id, sock = running
    pid, _ = launcher_of(gw, kernel_id)
    msg = busy(gw.client, kernel_id, sock)
    os.kill(pid, signal.SIGSTOP)
    try:
        resp = gw.client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {}, timeout=30)
        assert resp.status == 503, resp.body
        assert resp.json["reason"] == "Service Unavailable"
        assert "not delivered" in resp.json["message"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert gw.client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {}).status == 204
    assert sock.wait_for(msg, 15).reply["content"]["ename"] == "KeyboardInterrupt"


def test_silent_but_alive_remote_kernel_is_not_killed(gw: GatewayProcess, running: tuple[str, KernelSocket]) -> None:
    """A remote kernel that stops answering its heartbeat while its process lives (SIGSTOP here; IRkernel in a long
    cell): egd asks its launcher, finds it alive, logs "busy, not dead" once and leaves it running; after SIGCONT
    it answers as before, same process."""
    kernel_id, sock = running
    _, _, kernel_pid = where(sock)
    before = gw.log().count("busy, not dead")
    os.kill(kernel_pid, signal.SIGSTOP)
    try:
        wait_until(lambda: gw.log().count("busy, not dead") > before, 20, what="the silence to be noticed")
        time.sleep(4)  # several more heartbeat windows
        assert gw.client.kernel(kernel_id).json["execution_state"] != "dead"
    finally:
        os.kill(kernel_pid, signal.SIGCONT)
    assert where(sock)[2] == kernel_pid
    assert gw.log().count("busy, not dead") == before + 1
    assert not [line for line in gw.log().splitlines() if kernel_id in line and "killing it" in line]


def test_killed_launcher_is_noticed(gw: GatewayProcess, running: tuple[str, KernelSocket],
                                    ssh_hosts: list[SshHost]) -> None:
    """kill -9 of a kernel's launcher: the kernel used to run on as an orphan egd could neither interrupt nor
    stop, reported as running. Now the kernel dies with its launcher, egd's heartbeat notices, and the kernel
    is restarted (a new launcher and process; clients see "restarting")."""
    kernel_id, sock = running
    _, _, kernel_pid = where(sock)
    launcher_pid, _ = launcher_of(gw, kernel_id)
    os.kill(launcher_pid, signal.SIGKILL)
    states: list[str] = []
    while "restarting" not in states:
        msg = sock.recv(30)
        if msg["msg_type"] == "status":
            states.append(msg["content"]["execution_state"])
    wait_until(lambda: gw.client.kernel(kernel_id).json["execution_state"] == "idle", 60, what="the restart")
    assert where(sock)[2] != kernel_pid
    assert not any(pid == kernel_pid for h in ssh_hosts for pid in h.pids())


def test_launch_listener_refuses_deep_nesting(gw: GatewayProcess) -> None:
    """Deeply nested JSON to the launch listener (RecursionError in ``json``) is refused with an answer and a
    log line, no traceback, and launches go on."""
    found = re.search(r"launch listener on ([\d.]+):(\d+)", gw.log())
    assert found
    address = (found.group(1), int(found.group(2)))
    for raw in (b"[" * 60000 + b"\n", b'{"kernel_id": ' * 4000 + b"\n"):
        assert send_raw(address, raw) == {"ok": False, "error": "refused"}
    assert "Traceback" not in gw.log() and "RecursionError" not in gw.log()
    kernel_id = gw.client.start_kernel("ssh_python")
    gw.client.delete_kernel(kernel_id)


def send_raw(address: tuple[str, int], raw: bytes) -> object:
    """Send raw bytes, read the JSON answer line."""
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(raw)
        return json.loads(conn.makefile("rb").readline())



def test_long_home_starts_ssh_kernels(ssh_lab: SshLab, tmp_path: Path) -> None:
    """egd's default runtime directory is under HOME; with a HOME of 20 characters the shared ssh connection's
    socket path passed the 108-byte unix socket limit (ssh binds ``<ControlPath>.<16 characters>`` first), and
    every ssh start was a 500 blaming the host. Now socket paths are short for any home; the kernel starts."""
    home = tempfile.mkdtemp(prefix="egdhome", dir="/tmp")  # /tmp/egdhomeXXXXXXXX
    try:
        write_spec(tmp_path / "specs", "ssh_python",
                   [ssh_lab.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"])
        settings = {"hosts": [h.name for h in ssh_lab.hosts], "ssh_config": str(ssh_lab.ssh_config_path),
                    "callback_host": ssh_lab.gateway_ip, "log_dir": str(tmp_path / "hostlogs"),
                    "connect_timeout": 3}
        gateway = GatewayProcess({"kernels": {"kernelspec_dirs": [str(tmp_path / "specs")], "runtime_dir": None},
                                  "drivers": {"local": {}, "ssh": settings}}, env={"HOME": home})
        try:
            resp = gateway.client.request("POST", "/api/kernels", {"name": "ssh_python"})
            assert resp.status == 201, resp.body
            gateway.client.delete_kernel(resp.json["id"])
            assert "unreachable" not in gateway.log()
        finally:
            assert gateway.stop() == 0, gateway.log()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_ssh_socket_problem_names_its_cause(ssh_lab: SshLab, tmp_path: Path) -> None:
    """When ssh cannot make its shared connection's socket (here: its directory was removed under the running
    gateway), the error says it is the gateway's side, not the host's, and no other host is blamed or tried."""
    gateway = ssh_gateway(ssh_lab, tmp_path)
    try:
        shutil.rmtree(Path(gateway.runtime_dir) / "ssh")
        resp = gateway.client.request("POST", "/api/kernels", {"name": "ssh_python"})
        assert resp.status == 500, resp.body
        assert "a local problem, not host" in resp.json["message"], resp.body
        assert "unreachable" not in gateway.log()
    finally:
        assert gateway.stop() == 0, gateway.log()
