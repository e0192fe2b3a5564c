"""Remote kernels over ssh on real hosts: network namespaces, each with its own sshd and address (tests/sshhosts.py).

egd runs in the root namespace with the ssh driver; its launch listener binds the bridge address the hosts can
reach. Kernels report their own host name and address, so every test checks where a kernel really runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egd.launchers.launcher_protocol import NonceCache, sign, verify
from tests.client import BackgroundStart, GatewayClient, KernelSocket
from tests.conftest import KERNELSPECS, GatewayProcess, wait_until
from tests.sshhosts import SshHost, SshLab

pytestmark = pytest.mark.ssh

WHERE = "import os, socket; print(socket.gethostname(), os.environ.get('SSH_CONNECTION', '').split()[2:3], os.getpid())"


def write_spec(root: Path, name: str, argv: list[str], **metadata: Any) -> None:
    """A kernelspec for the ssh driver."""
    (root / name).mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "display_name": name, "language": "python",
            "metadata": {"egd": {"driver": "ssh", **metadata}}}
    (root / name / "kernel.json").write_text(json.dumps(spec))


def ssh_gateway(lab: SshLab, tmp: Path, kernels: dict[str, Any] | None = None, **ssh_settings: Any) -> GatewayProcess:
    """An egd whose ssh driver uses the lab's hosts (``kernels``: more of the kernels section, e.g. pools)."""
    specs = tmp / "specs"
    python = lab.python
    write_spec(specs, "ssh_python", [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    write_spec(specs, "ssh_no_python", ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    write_spec(specs, "ssh_exploding", [python, "-c", "import sys; sys.stderr.write('remote kernel exploded\\n');"
                                        " sys.exit(3)", "{connection_file}"])
    settings = {"hosts": [h.name for h in lab.hosts], "ssh_config": str(lab.ssh_config_path),
                "callback_host": lab.gateway_ip, "log_dir": str(tmp / "hostlogs"), "connect_timeout": 3,
                **ssh_settings}
    gw = GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(KERNELSPECS), str(specs)], "heartbeat_interval": 1,
                    "heartbeat_misses": 3, **(kernels or {})},
        "drivers": {"local": {}, "ssh": settings},
    })
    gw.host_log_dir = tmp / "hostlogs"  # type: ignore[attr-defined]
    return gw


@contextlib.contextmanager
def shared_ssh_gateway(lab: SshLab, tmp: Path) -> Iterator[GatewayProcess]:
    """An :func:`ssh_gateway` for a whole module: when it stops, no launcher may be left on any host."""
    gw = ssh_gateway(lab, tmp)
    try:
        yield gw
    finally:
        gw.stop()
    for host in lab.hosts:
        assert not host.processes_matching("kernel_launcher"), "launchers left on a host"


@pytest.fixture(scope="module")
def ssh_gw(ssh_lab: SshLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the ssh driver (round-robin), shared by this module."""
    with shared_ssh_gateway(ssh_lab, tmp_path_factory.mktemp("sshgw")) as gw:
        yield gw


@pytest.fixture
def client(ssh_gw: GatewayProcess) -> GatewayClient:
    """A client of the ssh gateway."""
    return ssh_gw.client


def where(sock: KernelSocket) -> tuple[str, str, int]:
    """(hostname, address the kernel was reached at, pid) as the kernel itself reports them."""
    host, addr, pid = sock.execute(WHERE).stdout.split()
    return host, addr.strip("[]'"), int(pid)


def test_round_robin_lands_on_each_host(client: GatewayClient, ssh_hosts: list[SshHost]) -> None:
    """Two kernels in a row land on the two hosts; each reports its own host name and address."""
    ids = [client.start_kernel("ssh_python") for _ in range(2)]
    try:
        seen = {}
        for kernel_id in ids:
            sock = client.connect(kernel_id)
            host, _, pid = where(sock)
            seen[host] = pid
            ip = sock.execute("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                              " s.connect(('10.200.0.1', 9)); print(s.getsockname()[0])").stdout.strip()
            assert ip == {h.name: h.ip for h in ssh_hosts}[host]
            sock.close()
        assert set(seen) == {h.name for h in ssh_hosts}
        for host in ssh_hosts:
            assert seen[host.name] in host.pids()
    finally:
        for kernel_id in ids:
            client.delete_kernel(kernel_id)


def test_least_connection_placement(ssh_lab: SshLab, tmp_path: Path) -> None:
    """least-connection puts a new kernel on the host with the fewest kernels of this gateway."""
    gw = ssh_gateway(ssh_lab, tmp_path, placement="least-connection")
    try:
        first, second = gw.client.start_kernel("ssh_python"), gw.client.start_kernel("ssh_python")
        hosts = {}
        for kernel_id in (first, second):
            sock = gw.client.connect(kernel_id)
            hosts[kernel_id] = where(sock)[0]
            sock.close()
        assert hosts[first] != hosts[second]
        gw.client.delete_kernel(first)
        third = gw.client.start_kernel("ssh_python")
        sock = gw.client.connect(third)
        assert where(sock)[0] == hosts[first]
        sock.close()
        gw.client.delete_kernel(second)
        gw.client.delete_kernel(third)
    finally:
        gw.stop()


def test_interrupt_restart_and_automatic_restart(client: GatewayClient, ssh_hosts: list[SshHost]) -> None:
    """Interrupt a sleep; restart keeps the id and loses state; a kernel killed on its host is restarted."""
    kernel_id = client.start_kernel("ssh_python")
    sock = client.connect(kernel_id)
    try:
        sock.execute("kept = 1")
        msg = sock.request("execute_request", {"code": "import time; time.sleep(60)", "silent": False,
                                               "store_history": True, "user_expressions": {}, "allow_stdin": False})
        wait_until(lambda: client.kernel(kernel_id).json["execution_state"] == "busy", 10, what="busy")
        assert client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {}).status == 204
        assert sock.wait_for(msg, 15).reply["content"]["ename"] == "KeyboardInterrupt"
        assert sock.execute("kept").result == "1"

        resp = client.request("POST", f"/api/kernels/{kernel_id}/restart", {})
        assert resp.status == 200 and resp.json["id"] == kernel_id
        assert sock.execute("kept").reply["content"]["ename"] == "NameError"

        _, _, pid = where(sock)
        os.kill(pid, signal.SIGKILL)  # the hosts share this machine's pid space
        while True:
            msg = sock.recv(30)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "restarting":
                break
        wait_until(lambda: client.kernel(kernel_id).json["execution_state"] == "idle", 60, what="restart")
        assert where(sock)[2] != pid
    finally:
        sock.close()
        client.delete_kernel(kernel_id)
    wait_until(lambda: not any(h.processes_matching(kernel_id) for h in ssh_hosts), 10,
               what="no process of the kernel on any host")


def test_host_down_at_launch_uses_the_next(client: GatewayClient, ssh_gw: GatewayProcess,
                                           ssh_hosts: list[SshHost]) -> None:
    """With one host off the network, kernels still start, on the other host, within seconds; the log names
    the skipped host. (egd keeps one ssh connection per host: it notices the dead one by its keepalives.)"""
    down, up = ssh_hosts
    down.link_down()
    ids = []
    try:
        for _ in range(2):
            started = time.monotonic()
            ids.append(client.start_kernel("ssh_python"))
            assert time.monotonic() - started < 20
            sock = client.connect(ids[-1])
            assert where(sock)[0] == up.name
            sock.close()
        assert f"host {down.name} unreachable, trying the next one" in ssh_gw.log()
    finally:
        down.link_up()
        for kernel_id in ids:
            client.delete_kernel(kernel_id)


def test_no_host_reachable_names_every_try(ssh_lab: SshLab, tmp_path: Path) -> None:
    """Every host goes down after egd found them up (its probes at start): the start that finds them down fails
    with 500 naming each host tried and why; the next one fails at once with 503 naming each host out. No shared
    connection here: one kept open from the probes would still reach a host whose sshd stopped."""
    gw = ssh_gateway(ssh_lab, tmp_path, multiplex=False)
    try:
        wait_until(lambda: all(f"ssh host {h.name} reached" in gw.log() for h in ssh_lab.hosts), 20, 0.1,
                   "the probes at start")
        for host in ssh_lab.hosts:
            host.stop_sshd()
        resp = gw.client.request("POST", "/api/kernels", {"name": "ssh_python"})
        assert resp.status == 500, resp.body
        message = resp.json["message"]
        assert message.startswith("no ssh host could start the kernel: "), message
        assert all(f"{h.name}: " in message for h in ssh_lab.hosts) and "Connection refused" in message, message
        resp = gw.client.request("POST", "/api/kernels", {"name": "ssh_python"})
        assert resp.status == 503, resp.body
        assert all(f"{h.name} out for " in resp.json["message"] for h in ssh_lab.hosts), resp.json
    finally:
        for host in ssh_lab.hosts:
            host.start_sshd()
        gw.stop()


@pytest.mark.parametrize("spec,fragment", [("ssh_no_python", "/nonexistent/python"),
                                           ("ssh_exploding", "remote kernel exploded")])
def test_early_exit_fails_fast(client: GatewayClient, spec: str, fragment: str) -> None:
    """A launcher or kernel that exits at once fails the POST at once, with what it wrote."""
    started = time.monotonic()
    resp = client.request("POST", "/api/kernels", {"name": spec, "env": {"KERNEL_LAUNCH_TIMEOUT": "60"}})
    assert resp.status == 500, resp.body
    assert time.monotonic() - started < 15
    assert fragment in resp.json["message"]


def test_host_vanishing_is_reported_dead(client: GatewayClient, ssh_gw: GatewayProcess,
                                         ssh_hosts: list[SshHost]) -> None:
    """A host whose link goes down: the kernel is reported dead within seconds and egd stays healthy."""
    kernel_id = client.start_kernel("ssh_python")
    sock = client.connect(kernel_id)
    host_name = where(sock)[0]
    host = next(h for h in ssh_hosts if h.name == host_name)
    host.link_down()
    try:
        started = time.monotonic()
        states = []
        while "dead" not in states:
            msg = sock.recv(30)
            if msg["msg_type"] == "status":
                states.append(msg["content"]["execution_state"])
        assert time.monotonic() - started < 20
        assert client.request("GET", "/api").status == 200
        wait_until(lambda: client.kernel(kernel_id).status == 404, 15, what="the dead kernel to be removed")
    finally:
        host.link_up()
        sock.close()
    # The cut-off kernel may still run on its host: it is the operator's to reap; egd reported it.
    for pid, _ in host.processes_matching(kernel_id):
        os.kill(pid, signal.SIGKILL)


def test_hostile_env_executes_nothing(client: GatewayClient, tmp_path: Path) -> None:
    """Shell metacharacters in KERNEL_* values and the working directory reach the kernel as plain text."""
    marker = tmp_path / "pwned"
    evil = f"x'; touch {marker}; echo '"
    kernel_id = client.start_kernel("ssh_python", {"KERNEL_EVIL": evil, "KERNEL_PIPE": f"a | touch {marker}",
                                                   "KERNEL_WORKING_DIR": f"/tmp; touch {marker}"})
    try:
        sock = client.connect(kernel_id)
        assert sock.execute("import os; print(os.environ['KERNEL_EVIL'])").stdout == evil + "\n"
        sock.close()
    finally:
        client.delete_kernel(kernel_id)
    assert not marker.exists()


def test_forged_messages_are_refused(client: GatewayClient, ssh_gw: GatewayProcess, ssh_lab: SshLab) -> None:
    """A forged callback for a running kernel, and unauthenticated or forged control requests, are refused."""
    kernel_id = client.start_kernel("ssh_python")
    try:
        listener = re.search(r"launch listener on ([\d.]+):(\d+)", ssh_gw.log())
        assert listener
        forged = sign({"type": "ready", "kernel_id": kernel_id, "info": {"ip": "10.200.0.99"}}, b"guessed")
        answer = send_line((listener.group(1), int(listener.group(2))), forged)
        assert answer == {"ok": False, "error": "refused"}
        assert f"refused a message for kernel {kernel_id}" in ssh_gw.log()
        assert client.kernel(kernel_id).json["execution_state"] == "idle"

        log_file = ssh_gw.host_log_dir / f"egd-kernel-{kernel_id}.log"  # type: ignore[attr-defined]
        found = re.search(r"ready on ([\d.]+); launcher port (\d+)", log_file.read_text())
        assert found
        address = (found.group(1), int(found.group(2)))
        for request in ({"op": "shutdown", "kernel_id": kernel_id},
                        sign({"op": "shutdown", "kernel_id": kernel_id}, b"guessed")):
            assert send_line(address, request)["ok"] is False
        assert "refused a control request" in log_file.read_text()
        sock = client.connect(kernel_id)
        assert sock.execute("'still running'").result == "'still running'"
        sock.close()
    finally:
        client.delete_kernel(kernel_id)


def send_line(address: tuple[str, int], message: dict[str, Any]) -> dict[str, Any]:
    """Send one JSON line, read one JSON line."""
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(json.dumps(message).encode() + b"\n")
        return dict(json.loads(conn.makefile("rb").readline()))


def test_replayed_and_stale_messages_are_refused() -> None:
    """The signature check refuses a replayed nonce, a stale timestamp and a tampered field."""
    secret = b"s" * 64
    nonces = NonceCache()
    message = sign({"type": "ready", "kernel_id": "k"}, secret)
    assert verify(message, secret, nonces) is None
    assert verify(message, secret, nonces) == "replayed message"
    assert verify(dict(message, kernel_id="other"), secret, NonceCache()) == "bad signature"
    old = sign({"type": "ready"}, secret)
    assert verify(old, secret, NonceCache(), now=old["ts"] + 3600) == "stale message"


def test_shutdown_leaves_nothing_on_the_hosts(client: GatewayClient, ssh_hosts: list[SshHost]) -> None:
    """DELETE ends the kernel and its launcher on the host."""
    kernel_id = client.start_kernel("ssh_python")
    assert any(h.processes_matching(kernel_id) for h in ssh_hosts)
    assert client.delete_kernel(kernel_id) == 204
    wait_until(lambda: not any(h.processes_matching(kernel_id) for h in ssh_hosts), 10,
               what="no process of the kernel on any host")


def test_listener_survives_silent_and_oversized_peers(client: GatewayClient, ssh_gw: GatewayProcess) -> None:
    """Silent and oversized connections to the launch listener delay no launch and are dropped."""
    found = re.search(r"launch listener on ([\d.]+):(\d+)", ssh_gw.log())
    assert found
    address = (found.group(1), int(found.group(2)))
    silent = [socket.create_connection(address, timeout=5) for _ in range(20)]
    flood = socket.create_connection(address, timeout=5)
    try:
        flood.sendall(b"x" * (200 * 1024))
    except OSError:
        pass  # dropped mid-send: that is the point
    try:
        started = time.monotonic()
        kernel_id = client.start_kernel("ssh_python")
        assert time.monotonic() - started < 15
        client.delete_kernel(kernel_id)
        assert "refused an oversized message" in ssh_gw.log()
        silent[0].settimeout(20)
        try:  # dropped by the listener's read deadline (aborted: a reset, or an orderly end)
            assert silent[0].recv(1) == b""
        except ConnectionResetError:
            pass
    finally:
        for conn in [*silent, flood]:
            conn.close()


def test_jupyter_server_drives_an_ssh_kernel(ssh_gw: GatewayProcess, tmp_path: Path,
                                             ssh_hosts: list[SshHost]) -> None:
    """An unchanged Jupyter Server with --gateway-url runs a cell in a kernel on an ssh host."""
    from tests.test_jupyter_server import JupyterServer

    server = JupyterServer(ssh_gw.url, tmp_path)
    try:
        kernel_id = server.start_kernel("ssh_python")
        sock = server.connect(kernel_id)
        assert sock.execute("import socket; print(socket.gethostname())").stdout.strip() in {
            h.name for h in ssh_hosts}
        sock.close()
        assert server.client.request("DELETE", f"/api/kernels/{kernel_id}").status == 204
        assert ssh_gw.client.kernel(kernel_id).status == 404
    finally:
        server.stop()


def test_stop_abandons_a_launch_on_a_host(ssh_lab: SshLab, tmp_path: Path) -> None:
    """SIGTERM while a kernel is launching on a host: egd answers the start with 503, stops the launcher and
    its kernel on the host, and exits within seconds instead of waiting for the launch timeout."""
    gw = ssh_gateway(ssh_lab, tmp_path)
    write_spec(tmp_path / "specs", "ssh_never_ready", [ssh_lab.python, "-c", "import time; time.sleep(600)",
                                                       "{connection_file}"])
    start = BackgroundStart(gw.client, {"name": "ssh_never_ready", "env": {"KERNEL_LAUNCH_TIMEOUT": "120"}})
    wait_until(lambda: any(h.processes_matching("time.sleep(600)") for h in ssh_lab.hosts), 30,
               what="the kernel launching on a host")
    began = time.monotonic()
    assert gw.stop(timeout=30) == 0
    assert time.monotonic() - began < 20
    assert start.response(10).status == 503
    try:
        wait_until(lambda: not any(h.processes_matching("time.sleep(600)") or h.processes_matching("kernel_launcher")
                                   for h in ssh_lab.hosts), 15, what="nothing left on the hosts")
    except AssertionError:
        raise AssertionError(([h.processes_matching("sleep(600)") for h in ssh_lab.hosts], gw.log()[-4000:])) from None
