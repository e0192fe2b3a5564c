"""A kernel's life through egd: interrupt, restart, automatic restart, heartbeat, failed launches, shutdown."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from tests.client import BackgroundStart, GatewayClient, KernelSocket, start_concurrently
from tests.conftest import processes_mentioning, wait_until


def statuses_until(sock: KernelSocket, wanted: str, timeout: float = 60) -> list[str]:
    """iopub execution states seen until ``wanted`` arrives."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        msg = sock.recv(max(0.1, deadline - time.monotonic()))
        if msg["msg_type"] == "status":
            seen.append(msg["content"]["execution_state"])
    return seen


def kernel_pid(sock: KernelSocket) -> int:
    """The kernel's process id, as the kernel reports it."""
    return int(sock.execute("import os; print(os.getpid())").stdout)


def wait_for_output(sock: KernelSocket, msg: dict[str, Any], text: str, timeout: float = 30) -> None:
    """Until the cell of ``msg`` has printed ``text``: it is running user code then. (A signal sent when the kernel
    merely says ``busy``, or even at its ``execute_input``, may hit the kernel's own code before the cell, where
    ipykernel swallows the KeyboardInterrupt with the request; a slow kernel shows it.)"""
    deadline = time.monotonic() + timeout
    while True:
        message = sock.recv(max(0.1, deadline - time.monotonic()))
        if (message["msg_type"] == "stream" and text in message["content"].get("text", "")
                and message.get("parent_header", {}).get("msg_id") == msg["header"]["msg_id"]):
            return


def interrupt_sleep(client: GatewayClient, kernel_id: str) -> None:
    """Interrupt a ``time.sleep(60)``: KeyboardInterrupt comes back quickly and state survives."""
    sock = client.connect(kernel_id)
    sock.execute("survivor = 'still here'")
    msg = sock.request("execute_request", {"code": "import time; print('sleeping', flush=True); time.sleep(60)",
                                           "silent": False, "store_history": True, "user_expressions": {},
                                           "allow_stdin": False})
    wait_for_output(sock, msg, "sleeping")
    started = time.monotonic()
    assert client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {}).status == 204
    run = sock.wait_for(msg, timeout=20)
    assert time.monotonic() - started < 10
    assert run.reply["content"]["status"] == "error" and run.reply["content"]["ename"] == "KeyboardInterrupt"
    assert sock.execute("survivor").result == "'still here'"
    sock.close()


def test_interrupt_by_signal(client: GatewayClient, kernel: str) -> None:
    """interrupt_mode signal: SIGINT to the kernel's process group."""
    interrupt_sleep(client, kernel)


def test_interrupt_by_message(client: GatewayClient) -> None:
    """interrupt_mode message: an interrupt_request on the control channel."""
    kernel_id = client.start_kernel("msg_interrupt")
    try:
        interrupt_sleep(client, kernel_id)
    finally:
        client.delete_kernel(kernel_id)


def test_restart_keeps_id_and_loses_state(client: GatewayClient, kernel: str) -> None:
    """Restart: 200 with the same id; the client's socket stays open and is not told "restarting" (Jupyter
    clients take that for an automatic restart of a dead kernel); the old process is gone; state is lost."""
    sock = client.connect(kernel)
    sock.execute("lost = 1")
    old_pid = kernel_pid(sock)
    resp = client.request("POST", f"/api/kernels/{kernel}/restart", {})
    assert resp.status == 200 and resp.json["id"] == kernel
    probe = sock.request("execute_request", {"code": "lost", "silent": False, "store_history": True,
                                             "user_expressions": {}, "allow_stdin": False})
    seen: list[dict[str, Any]] = []
    while not any(m.get("parent_header", {}).get("msg_id") == probe["header"]["msg_id"]
                  and m["msg_type"] == "execute_reply" for m in seen):
        seen.append(sock.recv(30))
    assert not [m for m in seen if m["msg_type"] == "status" and m["content"]["execution_state"] == "restarting"]
    run = sock.execute("lost")
    assert run.reply["content"]["ename"] == "NameError"
    assert kernel_pid(sock) != old_pid
    wait_until(lambda: not os.path.exists(f"/proc/{old_pid}"), 10, what="old kernel process to end")
    sock.close()


def test_killed_kernel_is_restarted(client: GatewayClient, kernel: str) -> None:
    """A kernel killed behind egd's back is restarted under the same id; clients see 'restarting'."""
    sock = client.connect(kernel)
    pid = kernel_pid(sock)
    os.kill(pid, signal.SIGKILL)
    assert "restarting" in statuses_until(sock, "restarting", 30)
    wait_until(lambda: client.kernel(kernel).json["execution_state"] == "idle", 60, what="restarted kernel")
    assert sock.execute("'alive again'").result == "'alive again'"
    assert kernel_pid(sock) != pid
    sock.close()


def test_restart_limit_then_dead(make_gateway: Any) -> None:
    """A kernel that keeps dying right after start is declared dead: clients see 'dead', the id is gone."""
    gw = make_gateway({"kernels": {"restart_limit": 1, "stable_start_seconds": 60}})
    kernel_id = gw.client.start_kernel()
    sock = gw.client.connect(kernel_id)
    os.kill(kernel_pid(sock), signal.SIGKILL)
    statuses_until(sock, "restarting", 30)
    wait_until(lambda: gw.client.kernel(kernel_id).json["execution_state"] == "idle", 60, what="restart")
    os.kill(kernel_pid(sock), signal.SIGKILL)
    assert "dead" in statuses_until(sock, "dead", 30)
    wait_until(lambda: gw.client.kernel(kernel_id).status == 404, 10, what="dead kernel to be removed")
    assert not gw.kernel_processes()
    sock.close()


def test_silent_but_alive_local_kernel_is_left_alone(make_gateway: Any) -> None:
    """A local kernel whose process stops answering (SIGSTOP here; IRkernel in a long cell) is busy, not dead: egd
    watches the process itself, so it sends it no heartbeats at all (they could tell it nothing more) and leaves it
    running; after SIGCONT it answers as before, same process. (Jupyter's own restarter likewise acts on a
    process's end, not on heartbeats.) The heartbeat of remote kernels: tests/test_launcher_gateway.py."""
    gw = make_gateway({"kernels": {"heartbeat_interval": 0.5, "heartbeat_misses": 3}})
    kernel_id = gw.client.start_kernel()
    sock = gw.client.connect(kernel_id)
    pid = kernel_pid(sock)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(4)  # several heartbeat windows
        assert os.path.exists(f"/proc/{pid}")
        assert gw.client.kernel(kernel_id).json["execution_state"] != "dead"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert kernel_pid(sock) == pid
    assert "no heartbeat" not in gw.log() and "killing it" not in gw.log()
    sock.close()
    gw.client.delete_kernel(kernel_id)
    # ...and the end of its process is seen at once all the same
    other = gw.client.start_kernel()
    sock = gw.client.connect(other)
    os.kill(kernel_pid(sock), signal.SIGKILL)
    assert "restarting" in statuses_until(sock, "restarting", 5)
    sock.close()
    gw.client.delete_kernel(other)


def test_launch_fails_fast_with_stderr(gateway: Any) -> None:
    """A kernel that exits at once fails the POST at once (not at the timeout), with its stderr."""
    started = time.monotonic()
    resp = gateway.client.request("POST", "/api/kernels", {"name": "fail_fast",
                                                           "env": {"KERNEL_LAUNCH_TIMEOUT": "60"}})
    assert resp.status == 500, resp.body
    assert time.monotonic() - started < 10
    body = resp.json
    assert "exited with code 3" in body["message"] and "kernel exploded on purpose" in body["message"]
    assert "Traceback" not in resp.body.decode()
    assert not any("fail_fast" in k["name"] for k in gateway.client.request("GET", "/api/kernels").json)


def test_launch_timeout_kills_the_kernel(gateway: Any) -> None:
    """A kernel that never answers: the model says starting meanwhile; 503 at the client's timeout; killed."""
    result: dict[str, Any] = {}

    def post() -> None:
        result["resp"] = gateway.client.request("POST", "/api/kernels", {
            "name": "never_ready", "env": {"KERNEL_LAUNCH_TIMEOUT": "4"}})

    thread = threading.Thread(target=post)
    started = time.monotonic()
    thread.start()
    starting = wait_until(lambda: [k for k in gateway.client.request("GET", "/api/kernels").json
                                   if k["name"] == "never_ready"], 5, what="the starting kernel in the list")
    assert starting[0]["execution_state"] == "starting"
    thread.join(30)
    resp = result["resp"]
    assert resp.status == 503, resp.body
    assert 3.5 < time.monotonic() - started < 15
    assert "did not become ready within 4 seconds" in resp.json["message"]
    kernel_id = starting[0]["id"]
    assert gateway.client.kernel(kernel_id).status == 404
    wait_until(lambda: not processes_mentioning(kernel_id), 10, what="the kernel process to be killed")


def test_concurrent_starts_never_collide(client: GatewayClient) -> None:
    """Eight kernels started at once all come up and work (no port collisions)."""
    ids, errors = start_concurrently(client, "python3", 8, 120)
    try:
        assert not errors and len(set(ids)) == 8
        for kernel_id in ids:
            sock = client.connect(kernel_id)
            assert sock.execute(f"'{kernel_id}'").result == f"'{kernel_id}'"
            sock.close()
    finally:
        for kernel_id in ids:
            client.delete_kernel(kernel_id)


def test_delete_leaves_no_process(gateway: Any) -> None:
    """DELETE ends the kernel process and its connection file."""
    kernel_id = gateway.client.start_kernel()
    assert processes_mentioning(kernel_id)
    assert gateway.client.delete_kernel(kernel_id) == 204
    assert not processes_mentioning(kernel_id)
    assert not os.path.exists(os.path.join(gateway.runtime_dir, f"kernel-{kernel_id}.json"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_gateway_stop_stops_kernels(make_gateway: Any, sig: int) -> None:
    """SIGTERM or Ctrl-C: egd shuts every kernel down and exits 0."""
    gw = make_gateway()
    for _ in range(2):
        gw.client.start_kernel()
    assert len(gw.kernel_processes()) == 2
    assert gw.stop(sig) == 0
    assert not gw.kernel_processes()
    assert "stopping 2 kernel(s)" in gw.log()


def test_spec_launch_timeout_and_client_override(gateway: Any) -> None:
    """A kernelspec's launch timeout applies by default; a client's KERNEL_LAUNCH_TIMEOUT overrides it."""
    started = time.monotonic()
    resp = gateway.client.request("POST", "/api/kernels", {"name": "never_ready_spec_timeout"})
    assert resp.status == 503 and "within 3 seconds" in resp.json["message"]
    assert time.monotonic() - started < 10
    resp = gateway.client.request("POST", "/api/kernels", {"name": "never_ready_spec_timeout",
                                                           "env": {"KERNEL_LAUNCH_TIMEOUT": "1.5"}})
    assert resp.status == 503 and "within 1.5 seconds" in resp.json["message"]


def test_stop_abandons_launches_in_flight(make_gateway: Any) -> None:
    """SIGTERM while a kernel is still launching (here one that never answers, with a long launch timeout): egd
    does not wait for the timeout; the launch is abandoned, its process stopped, the client answered 503, and
    egd exits 0 within seconds."""
    gw = make_gateway()
    start = BackgroundStart(gw.client, {"name": "never_ready", "env": {"KERNEL_LAUNCH_TIMEOUT": "120"}})
    wait_until(lambda: any("time.sleep(600)" in cmd for _, cmd in gw.kernel_processes()), 20,
               what="the launching kernel's process")
    began = time.monotonic()
    assert gw.stop(timeout=20) == 0
    assert time.monotonic() - began < 15
    response = start.response(10)
    assert response.status == 503
    assert "shutting down" in response.json["message"]
    assert not gw.kernel_processes()
