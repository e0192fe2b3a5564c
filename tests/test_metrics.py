"""Observability: /metrics in the Prometheus text format (read with prometheus_client's own parser), /healthz
and /readyz, on real gateways with real kernels."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from egd.auth import token_digest
from tests.client import GatewayClient, KernelSocket
from tests.conftest import GatewayProcess, wait_until

pytestmark = pytest.mark.ops

TOKEN = "metrics-test-token-0123456789"
USER_TOKEN = "metrics-user-token-0123456789"
ADMIN_TOKEN = "metrics-admin-token-0123456789"

#: sample name -> {frozenset of label items: value}
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(client: GatewayClient) -> tuple[Samples, set[str]]:
    """GET /metrics parsed by prometheus_client: every sample by name and labels, and the family names."""
    resp = client.request("GET", "/metrics")
    assert resp.status == 200, resp.body
    assert resp.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    families = set()
    for family in text_string_to_metric_families(resp.body.decode()):
        families.add(family.name)
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name`` with exactly ``labels`` (None when there is none)."""
    return samples.get(name, {}).get(frozenset(labels.items()))


def kernel_pid(sock: KernelSocket) -> int:
    """The kernel's process id, as the kernel reports it."""
    return int(sock.execute("import os; print(os.getpid())").stdout)


def test_metrics_after_a_known_sequence(make_gateway: Any) -> None:
    """Refusals, a failed and a timed-out launch, two starts, a user and an automatic restart, one WebSocket with
    three executes: each shows up with exactly its count; the kernels gauge follows the kernel table."""
    gw = make_gateway({"auth": {"token": TOKEN}, "kernels": {"max_kernels": 2}})
    client = gw.client
    samples, families = scrape(client)
    assert {"egd_kernels", "egd_kernel_launch_duration_seconds", "egd_kernel_launch_failures",
            "egd_kernel_start_refusals", "egd_kernel_restarts", "egd_kernel_culls", "egd_websocket_connections",
            "egd_websocket_connections_open", "egd_relayed_messages", "egd_relayed_bytes"} <= families
    assert not samples.get("egd_kernels")

    # Refused before any launch: bob may not use only_alice.
    resp = client.request("POST", "/api/kernels", {"name": "only_alice", "env": {"KERNEL_USERNAME": "bob"}})
    assert resp.status == 403, resp.body
    # Launched and failed: the kernel exits at once.
    resp = client.request("POST", "/api/kernels", {"name": "fail_fast"})
    assert resp.status == 500, resp.body
    # Launched and timed out; meanwhile the gauge shows it starting.
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("resp", client.request(
        "POST", "/api/kernels", {"name": "never_ready", "env": {"KERNEL_LAUNCH_TIMEOUT": "3",
                                                                "KERNEL_USERNAME": "dave"}})))
    thread.start()
    wait_until(lambda: value(scrape(client)[0], "egd_kernels", state="starting", spec="never_ready", driver="local",
                             user="dave") == 1, 10, what="the starting kernel in egd_kernels")
    thread.join(30)
    assert result["resp"].status == 503, result["resp"].body

    alice = client.start_kernel("python3", {"KERNEL_USERNAME": "alice"})
    carol = client.start_kernel("python3", {"KERNEL_USERNAME": "carol"})
    # Refused by max_kernels: 2.
    resp = client.request("POST", "/api/kernels", {"name": "python3"})
    assert resp.status == 403 and "max kernels" in resp.json["message"], resp.body

    assert client.request("POST", f"/api/kernels/{alice}/restart", {}).status == 200

    sock = client.connect(carol)
    samples, _ = scrape(client)
    assert value(samples, "egd_websocket_connections_open") == 1
    assert value(samples, "egd_websocket_connections_total") == 1
    assert sock.execute("1 + 1").result == "2"
    assert sock.execute("print('hello')").stdout == "hello\n"
    pid = kernel_pid(sock)
    sock.close()
    wait_until(lambda: value(scrape(client)[0], "egd_websocket_connections_open") == 0, 10,
               what="the closed WebSocket to leave the gauge")
    # Killed behind egd's back: restarted automatically.
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (value(scrape(client)[0], "egd_kernel_restarts_total", spec="python3", kind="automatic") == 1
                        and client.kernel(carol).json["execution_state"] == "idle"), 30,
               what="the automatic restart")

    samples, _ = scrape(client)
    running = {labels: v for labels, v in samples["egd_kernels"].items()}
    assert running == {
        frozenset({"state": "running", "spec": "python3", "driver": "local", "user": "alice"}.items()): 1,
        frozenset({"state": "running", "spec": "python3", "driver": "local", "user": "carol"}.items()): 1,
    }
    # Successful starts only: two. Restarts and failed launches are not observed.
    assert value(samples, "egd_kernel_launch_duration_seconds_count", driver="local") == 2
    assert value(samples, "egd_kernel_launch_duration_seconds_bucket", driver="local", le="+Inf") == 2
    launch_sum = value(samples, "egd_kernel_launch_duration_seconds_sum", driver="local")
    assert launch_sum is not None and 0 < launch_sum < 120
    assert value(samples, "egd_kernel_launch_duration_seconds_bucket", driver="local", le="0.1") == 0
    assert samples["egd_kernel_launch_failures_total"] == {
        frozenset({"driver": "local", "reason": "failed"}.items()): 1,
        frozenset({"driver": "local", "reason": "timeout"}.items()): 1,
    }
    assert samples["egd_kernel_start_refusals_total"] == {
        frozenset({"reason": "unauthorized"}.items()): 1,
        frozenset({"reason": "limit"}.items()): 1,
    }
    assert samples["egd_kernel_restarts_total"] == {
        frozenset({"spec": "python3", "kind": "user"}.items()): 1,
        frozenset({"spec": "python3", "kind": "automatic"}.items()): 1,
    }
    assert not samples.get("egd_kernel_culls_total")
    assert value(samples, "egd_websocket_connections_total") == 1
    # Three execute_requests went in; each brought back at least busy, its reply and idle.
    assert value(samples, "egd_relayed_messages_total", direction="client_to_kernel") == 3
    to_client = value(samples, "egd_relayed_messages_total", direction="kernel_to_client")
    assert to_client is not None and to_client >= 9
    bytes_in = value(samples, "egd_relayed_bytes_total", direction="client_to_kernel")
    bytes_out = value(samples, "egd_relayed_bytes_total", direction="kernel_to_client")
    assert bytes_in is not None and bytes_in > 3 * 200  # each request is a JSON message of a few hundred bytes
    assert bytes_out is not None and bytes_out > to_client * 100

    for kernel_id in (alice, carol):
        assert client.delete_kernel(kernel_id) == 204
    samples, _ = scrape(client)
    assert not samples.get("egd_kernels")  # computed from the kernel table: nothing left over
    assert value(samples, "egd_kernel_launch_duration_seconds_count", driver="local") == 2


def test_probes_need_no_credentials_but_metrics_do(make_gateway: Any) -> None:
    """/healthz and /readyz answer without a token (below the base URL); /metrics needs one; a user-bound
    caller needs to be an admin for it."""
    gw = make_gateway({"server": {"base_url": "/gw/"}, "auth": {
        "token": TOKEN, "users_trust_each_other": True, "users": {"ursula": {"token_sha256": token_digest(USER_TOKEN)},
                                  "adam": {"token_sha256": token_digest(ADMIN_TOKEN), "admin": True}}}})
    anonymous = GatewayClient(gw.url)
    resp = anonymous.request("GET", "/healthz")
    assert resp.status == 200 and resp.json == {"status": "ok"}
    resp = anonymous.request("GET", "/readyz")
    assert resp.status == 200 and resp.json == {"status": "ready",
                                                "checks": {"drivers": "ok", "kernels": "ok", "store": "ok"}}
    assert anonymous.request("GET", "/metrics").status == 401
    # Probes answer every method without credentials: another method gets 405 naming the allowed ones.
    wrong = anonymous.request("POST", "/healthz", {})
    assert wrong.status == 405 and "GET" in wrong.headers["allow"]
    assert anonymous.request("GET", "/api/kernels").status == 401
    assert GatewayClient(gw.url, USER_TOKEN).request("GET", "/metrics").status == 403
    assert GatewayClient(gw.url, ADMIN_TOKEN).request("GET", "/metrics").status == 200
    scrape(gw.client)


def test_metrics_public(make_gateway: Any) -> None:
    """server.metrics_public: Prometheus may scrape without a token; the API still needs one."""
    gw = make_gateway({"server": {"metrics_public": True}, "auth": {"token": TOKEN}})
    anonymous = GatewayClient(gw.url)
    _, families = scrape(anonymous)
    assert "egd_kernels" in families
    assert anonymous.request("GET", "/api/kernels").status == 401


def test_readyz_is_503_while_stopping(make_gateway: Any) -> None:
    """After SIGTERM the kernel manager takes no new kernels: /readyz says 503 and why, on a connection opened
    before (the listener is already closed), while egd waits for a launch in flight."""
    gw: GatewayProcess = make_gateway()
    result: dict[str, Any] = {}

    def post() -> None:
        try:
            result["resp"] = gw.client.request("POST", "/api/kernels", {
                "name": "never_ready", "env": {"KERNEL_LAUNCH_TIMEOUT": "8"}})
        except OSError as exc:  # the stopping reactor may drop the connection before the answer is written
            result["error"] = exc

    thread = threading.Thread(target=post)
    thread.start()
    wait_until(lambda: gw.client.request("GET", "/api/kernels").json, 10, what="the starting kernel")
    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)  # kept alive across the SIGTERM

    def readyz() -> tuple[int, Any]:
        connection.request("GET", "/readyz")
        resp = connection.getresponse()
        return resp.status, json.loads(resp.read())

    try:
        assert readyz()[0] == 200
        gw.proc.send_signal(signal.SIGTERM)
        status, body = wait_until(lambda: (lambda answer: answer if answer[0] != 200 else None)(readyz()), 5,
                                  what="/readyz to turn 503")
        assert status == 503
        assert body == {"status": "not ready", "checks": {"drivers": "ok", "kernels": "the gateway is shutting down",
                                                          "store": "ok"}}
        assert gw.proc.poll() is None, "egd should still be waiting for the launch in flight"
    finally:
        connection.close()
        thread.join(30)
    assert gw.proc.wait(60) == 0  # it ends on the first SIGTERM (a second one could come too late to be handled)
    gw.stop()
    assert "error" in result or result["resp"].status == 503, result


def test_culls_are_counted(make_gateway: Any) -> None:
    """A kernel culled for idleness: egd_kernel_culls_total{spec, reason="idle"} counts it; the gauge drops it."""
    gw = make_gateway({"kernels": {"cull_idle_timeout": 1, "cull_interval": 0.5}})
    kernel_id = gw.client.start_kernel("python3")
    wait_until(lambda: gw.client.kernel(kernel_id).status == 404, 20, what="the idle kernel to be culled")
    samples, _ = scrape(gw.client)
    assert samples["egd_kernel_culls_total"] == {frozenset({"spec": "python3", "reason": "idle"}.items()): 1}
    assert not samples.get("egd_kernels")
