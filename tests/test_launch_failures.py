"""Failed launches leave nothing behind; a port taken before the kernel binds it is retried at once; connection
files are private (issue 10, items 7, 16 and 2).

Every gateway here has a port range of 21 ports: room for four kernels. A failure that kept its five reserved
ports would make every start fail after four failures, so "N failures, then a start that works" shows that
each failure gave its ports back; the runtime directory shows that it removed its connection file.
"""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import conftest
from tests.conftest import KERNELSPECS, GatewayProcess, wait_until

pytestmark = pytest.mark.security


def free_port_range(size: int = 21) -> str:
    """``LOW..HIGH`` of ``size`` ports free on loopback now, outside Linux's ephemeral range."""
    for _ in range(200):
        low = random.randint(20000, 32000 - size)
        socks = []
        try:
            for port in range(low, low + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return f"{low}..{low + size - 1}"
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no free port range")


def write_spec(root: Path, name: str, argv: list[str]) -> None:
    """A local kernelspec."""
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))


def connection_files(gw: GatewayProcess) -> list[str]:
    """The kernel connection files in the gateway's runtime directory (and in private subdirectories)."""
    return [str(p) for p in Path(gw.runtime_dir).rglob("kernel-*.json")]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with room for four kernels and kernelspecs that fail in each way."""
    specs = tmp_path_factory.mktemp("failspecs")
    write_spec(specs, "missing_executable", ["/nonexistent/kernel", "-f", "{connection_file}"])
    gateway = GatewayProcess({"kernels": {"kernelspec_dirs": [str(KERNELSPECS), str(specs)],
                                          "port_range": free_port_range()}})
    yield gateway
    assert gateway.stop() == 0, gateway.log()


def works(gw: GatewayProcess) -> None:
    """A kernel starts, runs code and is deleted."""
    kernel_id = gw.client.start_kernel("python3")
    sock = gw.client.connect(kernel_id)
    assert sock.execute("1 + 1").result == "2"
    sock.close()
    assert gw.client.delete_kernel(kernel_id) == 204


FAILURES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "exits-at-once": ({"name": "fail_fast"}, (500,)),
    "missing-executable": ({"name": "missing_executable"}, (500,)),
    "timeout": ({"name": "never_ready", "env": {"KERNEL_LAUNCH_TIMEOUT": "2"}}, (503,)),
    # A lone surrogate cannot be encoded for the process's environment: 400 where the API refuses it first,
    # else the driver's 500; either way nothing may stay reserved.
    "surrogate-env": ({"name": "python3", "env": {"KERNEL_X": "\ud800"}}, (400, 500)),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_failed_launches_leave_nothing(gw: GatewayProcess, kind: str) -> None:
    """Five failed starts of one kind (more than the range holds kernels), then a start that works; no
    connection file stays, no kernel is listed, the error is JSON."""
    body, statuses = FAILURES[kind]
    for _ in range(5):
        resp = gw.client.request("POST", "/api/kernels", body)
        assert resp.status in statuses, (resp.status, resp.body)
        assert {"reason", "message"} <= set(resp.json)
        assert "Traceback" not in resp.body.decode()
        assert connection_files(gw) == []
    assert gw.client.request("GET", "/api/kernels").json == []
    works(gw)
    assert connection_files(gw) == []


def test_refused_impersonation_leaves_nothing(tmp_path: Path) -> None:
    """A user impersonation refuses (root, unknown): 403, and nothing was taken, as the starts after show."""
    os.chmod(conftest._ROOT, 0o711)  # kernels of other users pass through the test root (as test_impersonation)
    gateway = GatewayProcess({"kernels": {"port_range": free_port_range(), "default_kernel_name": "python3"},
                              "drivers": {"local": {"impersonation": True}}})
    try:
        for _ in range(5):
            for user in ("root", "egdnosuchuser"):
                resp = gateway.client.request("POST", "/api/kernels",
                                              {"name": "python3", "env": {"KERNEL_USERNAME": user}})
                assert resp.status == 403, resp.body
        assert connection_files(gateway) == []
    finally:
        assert gateway.stop() == 0, gateway.log()


@pytest.mark.parametrize("which", ["iopub", "all"])
def test_taken_port_is_retried_with_fresh_ports(which: str) -> None:
    """Another program binds a kernel's reserved ports after egd wrote them into the connection file and before
    the kernel binds them (the real race, won by watching the runtime directory). The kernel fails with
    EADDRINUSE: with only iopub taken it does not even exit, it hangs (the start used to wait out the whole
    launch timeout); with all taken it exits. egd sees it at once, stops it and starts it again with fresh
    ports, and the start succeeds well within the launch timeout."""
    gateway = GatewayProcess({"kernels": {"port_range": free_port_range(), "launch_timeout": 15}})
    taken: list[socket.socket] = []
    seen: dict[str, list[int]] = {}
    stop = threading.Event()

    def squat() -> None:
        runtime = Path(gateway.runtime_dir)
        while not stop.is_set() and not seen:
            for path in runtime.glob("kernel-*.json"):
                try:
                    info = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                ports = [info[n] for n in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]
                # iopub first: a kernel whose iopub bind fails does not exit, it hangs (the launch-timeout case)
                for port in (ports[1], ports[4], ports[0], ports[2], ports[3])[:1 if which == "iopub" else 5]:
                    sock = socket.socket()
                    try:
                        sock.bind(("127.0.0.1", port))
                        sock.listen()
                        taken.append(sock)
                    except OSError:
                        sock.close()
                seen[path.name] = ports
                return
            time.sleep(0.001)

    squatter = threading.Thread(target=squat, daemon=True)
    squatter.start()
    try:
        started = time.monotonic()
        kernel_id = gateway.client.start_kernel("python3")
        elapsed = time.monotonic() - started
        assert taken, "the test did not manage to take a port before the kernel"
        assert elapsed < 10, elapsed
        info = json.loads(Path(gateway.runtime_dir, f"kernel-{kernel_id}.json").read_text())
        now = {info[n] for n in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")}
        assert not now & {s.getsockname()[1] for s in taken}
        assert "a port was taken between its reservation and the kernel's bind" in gateway.log()
        sock = gateway.client.connect(kernel_id)
        assert sock.execute("6 * 7").result == "42"
        sock.close()
        gateway.client.delete_kernel(kernel_id)
    finally:
        stop.set()
        squatter.join(5)
        for sock in taken:
            sock.close()
        assert gateway.stop() == 0, gateway.log()


def test_connection_files_are_private(tmp_path: Path) -> None:
    """The runtime directory is 0700 even when it existed with a looser mode; connection files are 0600."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o755)
    os.chmod(runtime, 0o755)
    gateway = GatewayProcess({"kernels": {"runtime_dir": str(runtime)}})
    try:
        kernel_id = gateway.client.start_kernel("python3")
        assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
        path = runtime / f"kernel-{kernel_id}.json"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert os.stat(path).st_uid == os.geteuid()
        gateway.client.delete_kernel(kernel_id)
        wait_until(lambda: not path.exists(), 5, what="the connection file to be removed")
    finally:
        assert gateway.stop() == 0, gateway.log()
