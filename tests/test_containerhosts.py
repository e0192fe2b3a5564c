"""The container engines the docker-driver tests run against (tests/containerhosts.py), on both dockerd and podman:
a kernel in a container reached from the host, a host service reached from a container, and a clean host after an
engine's stop."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import BlockingKernelClient, write_connection_file

from tests.containerhosts import DockerEngine, new_engine, start_engine, stop_engine

pytestmark = pytest.mark.docker


def _wait_exit(engine: DockerEngine, cid: str, timeout: float = 60) -> int:
    """Wait for the container to exit; its exit code."""
    status, body = engine.api("POST", f"/containers/{cid}/wait", timeout=timeout)
    assert status == 200, (status, body)
    return int(body["StatusCode"])


def test_kernel_in_container_reached_from_host(engine: DockerEngine, tmp_path: Path) -> None:
    """An ipykernel in a container from the kernel image binds 0.0.0.0 on fixed ports in its own network namespace;
    the host connects to the container's IP and runs a cell (recipe §2.8)."""
    conn_dir = engine.work_dir / "conn" / tmp_path.name
    conn_dir.mkdir(parents=True)
    conn_file = conn_dir / "kernel.json"
    write_connection_file(
        str(conn_file), ip="0.0.0.0", shell_port=52001, iopub_port=52002, stdin_port=52003, hb_port=52004,
        control_port=52005,
    )  # fmt: skip
    t0 = time.monotonic()
    cid = engine.run_container(
        {
            "Image": engine.kernel_image,
            "Cmd": ["python3", "-m", "ipykernel_launcher", "-f", "/conn/kernel.json"],
            "Labels": {"egd.test": "kernel"},
            # PID 1 ipykernel ignores SIGTERM (recipe pitfall 6): run it under the engine's init
            "HostConfig": {"Binds": [f"{conn_dir}:/conn"], "Init": True},
        }
    )
    ip = engine.container_ip(cid)
    assert ip.startswith(engine.bridge_ip.rsplit(".", 2)[0]), (ip, engine.bridge_ip)
    assert [c["Id"] for c in engine.containers(label="egd.test=kernel")] == [cid]
    client = BlockingKernelClient()
    info: Any = dict(json.loads(conn_file.read_text()), ip=ip)
    client.load_connection_info(info)
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        msg_id = client.execute("import socket; print(socket.gethostname(), 6*7)")
        output = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = client.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                output += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        elapsed = time.monotonic() - t0
    finally:
        client.stop_channels()
    assert output.strip().endswith(" 42"), output
    assert output.split()[0] == cid[:12], (output, cid)  # the container's hostname: it really ran in there
    t1 = time.monotonic()
    status, _ = engine.api("POST", f"/containers/{cid}/stop?t=10")
    assert status == 204
    assert time.monotonic() - t1 < 5  # tini/catatonit passes SIGTERM on: no wait for the timeout
    print(f"{engine.name}: kernel cell executed {elapsed:.2f} s after create")


@pytest.fixture
def host_service(engine: DockerEngine) -> Iterator[tuple[str, int]]:
    """An HTTP server on the host, bound to the engine's bridge address: ``(ip, port)``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"hello-from-host {engine.name}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((engine.bridge_ip, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield engine.bridge_ip, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_container_reaches_host_on_bridge_ip(engine: DockerEngine, host_service: tuple[str, int]) -> None:
    """A container reaches a service the host runs on ``engine.bridge_ip`` (no firewall or forwarding needed)."""
    ip, port = host_service
    code = f"import urllib.request as u; print(u.urlopen('http://{ip}:{port}/', timeout=10).read().decode().strip())"
    cid = engine.run_container({"Image": engine.kernel_image, "Cmd": ["python3", "-c", code]})
    assert _wait_exit(engine, cid) == 0, engine.container_logs(cid)
    assert engine.container_logs(cid).strip() == f"hello-from-host {engine.name}"


@pytest.mark.parametrize("name", ["dockerd", "podman"])
def test_host_state_restored_after_stop(name: str) -> None:
    """An engine of its own (other bridge and subnet than the session's, so both can run at once) starts, runs a
    container, stops: afterwards the host is as recorded before the start. A second start then works again."""
    if name == "dockerd":
        eng = new_engine(name, "egd-docker9", "10.251.9.1/24", kernel_image=False)
    else:
        eng = new_engine(name, "egd-podman9", "10.89.9.1/24", network_name="egd9", kernel_image=False)
    try:
        for cycle in range(2):
            start_engine(eng)
            cid = eng.run_container({"Image": eng.pause_image, "Labels": {"egd.test": "cycle"}})
            assert eng.container_ip(cid).startswith("10.")
            assert eng.host_state is not None
            assert eng.host_state.differences(owned_only=True), "the engine changed nothing on the host?"
            t0 = time.monotonic()
            problems = eng.stop()
            assert problems == []
            # owned_only: a developer's engine or another fixture may change the host meanwhile (their veths,
            # mounts, cgroups); sysctls, firewall tables/rules, netns and paths are compared in full
            assert eng.host_state.differences(owned_only=True) == [], f"cycle {cycle}"
            print(f"{name}: start {eng.timings['total']:.2f} s, stop + restore {time.monotonic() - t0:.2f} s")
    finally:
        stop_engine(eng)
