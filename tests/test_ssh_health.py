"""ssh host health: a host that cannot be reached is skipped with backoff until a probe reaches it again; its state
shows in ``/readyz`` and ``/metrics``; every ssh failure is one log line.

The backoff schedule and the readiness and metrics plumbing are checked on a ``task.Clock`` (no marker); the rest on
the ssh lab's real hosts (marker ``ssh``, tests/sshhosts.py).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from egd.drivers.host_health import CHECK_AT_ONCE, FIRST_RETRY, MAX_RETRY, HostHealth, one_line
from egd.metrics import GatewayMetrics, Readiness, services_running
from tests.client import GatewayClient
from tests.conftest import wait_until
from tests.sshhosts import SshHost, SshLab
from tests.test_ssh import ssh_gateway

#: What ssh writes when its proxy command fails, made one line.
TWO_LINES = "kex_exchange_identification: Connection closed by remote host | Connection closed by UNKNOWN port 65535"
#: A line of egd's text log: a timestamp first (anything else is the continuation of an entry over several lines).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


class FakeProbe:
    """A probe that records when it ran and answers what the test says (None: reached)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.answer: str | None = "connection timed out"

    def __call__(self, host: str) -> Deferred[str | None]:
        self.times.append(self.clock.seconds())
        return succeed(self.answer)


def messages(events: list[dict[str, Any]]) -> list[str]:
    """The formatted text of captured log events."""
    from twisted.logger import formatEvent
    return [formatEvent(event) for event in events]


def test_backoff_schedule_until_a_probe_reaches_the_host() -> None:
    """Out at t=0: probes at 1, 3, 7, 15, 31 s (the wait doubles), then every 30 s; the host stays out of placement
    until a probe reaches it; the log says once that it went out and once that it is back, each in one line."""
    clock = Clock()
    probe = FakeProbe(clock)
    health = HostHealth(clock, probe, "ssh host")
    with capturedLogs() as events:
        health.failed("h2", "Warning: something\nssh: connect to host h2 port 22: No route to host\n")
        assert health.describe_out() == \
            "h2 out for 0s: Warning: something | ssh: connect to host h2 port 22: No route to host (next probe in 1s)"
        probe.answer = "ssh: connect to host h2 port 22: Connection timed out"
        assert health.usable(["h1", "h2"]) == ["h1"]
        for _ in range(200):
            clock.advance(0.5)
        assert probe.times == [1, 3, 7, 15, 31, 61, 91]
        assert health.state("h2").failures == 1 + len(probe.times)
        assert "h2 out for 100s: ssh: connect to host h2 port 22: Connection timed out (next probe in 21s)" \
            == health.describe_out()
        probe.answer = None
        clock.advance(21)
        assert health.usable(["h1", "h2"]) == ["h1", "h2"]
        clock.advance(600)
        assert len(probe.times) == 8, "no probe once the host is back"
    texts = messages(events)
    assert len(texts) == 2 and all("\n" not in text for text in texts), texts
    assert texts[0].startswith("ssh host h2 is out: Warning: something | ssh: connect to host h2 port 22: No route")
    assert texts[1] == "ssh host h2 is back after 121s out (ssh: connect to host h2 port 22: Connection timed out)"
    assert (FIRST_RETRY, MAX_RETRY) == (1, 30)


def test_a_launch_that_reaches_the_host_ends_its_outage() -> None:
    """A successful connection (a launch) brings the host back at once and stops its probe; the next outage backs
    off from the start again; a failure while out counts but logs nothing more."""
    clock = Clock()
    probe = FakeProbe(clock)
    health = HostHealth(clock, probe)
    with capturedLogs() as events:
        health.failed("h", "refused")
        clock.advance(1)
        clock.advance(2)
        health.failed("h", "refused again")
        assert health.describe_out() == "h out for 3s: refused again (next probe in 4s)"
        health.succeeded("h")
        clock.advance(100)
        assert probe.times == [1, 3]
        health.failed("h", "refused")
        clock.advance(1)
        assert probe.times == [1, 3, 104]
    assert len(events) == 3
    assert health.report(["h", "other"]) == {
        "h": {"up": False, "failures": 6, "reason": "connection timed out", "out_for": 1.0, "next_probe_in": 2.0},
        "other": {"up": True, "failures": 0}}


def test_stop_cancels_the_probes() -> None:
    """A stopped pool probes nothing more, a probe running then is cancelled; start resumes probing."""
    clock = Clock()
    running: list[Deferred[str | None]] = []

    def probe(host: str) -> Deferred[str | None]:
        running.append(Deferred())
        return running[-1]

    health = HostHealth(clock, probe)
    health.failed("a", "refused")
    health.failed("b", "refused")
    clock.advance(1)
    assert len(running) == 2
    health.failed("c", "refused")
    health.stop()
    assert all(d.called for d in running)
    clock.advance(100)
    assert len(running) == 2 and not clock.getDelayedCalls()
    health.start()
    clock.advance(1)
    assert len(running) == 5


def test_hosts_are_checked_once_at_start() -> None:
    """check(): one probe per host at once; the host it cannot reach goes out (and on the backoff), the others
    stay up with a debug line only; a host already being probed is not probed twice."""
    clock = Clock()
    running: dict[str, Deferred[str | None]] = {}

    def probe(host: str) -> Deferred[str | None]:
        running[host] = Deferred()
        return running[host]

    health = HostHealth(clock, probe, "ssh host")
    with capturedLogs() as events:
        health.check(["a", "b"])
        health.check(["a"])
        assert sorted(running) == ["a", "b"] and health.usable(["a", "b"]) == ["a", "b"]
        first_a = running.pop("a")
        first_a.callback(None)
        running.pop("b").callback("ssh: connect to host b port 22: No route to host")
        assert health.usable(["a", "b"]) == ["a"]
        clock.advance(1)
        assert list(running) == ["b"], "the host found out is probed on the backoff"
    assert messages(events) == ["ssh host a reached",
                                "ssh host b is out: ssh: connect to host b port 22: No route to host; skipped "
                                "until a probe reaches it (first in 1s, then backing off to every 30s)"]
    assert events[0]["log_level"].name == "debug"


def test_the_check_at_start_probes_a_few_hosts_at_a_time() -> None:
    """A pool of 40 hosts: CHECK_AT_ONCE probes run at once, the next starts as one ends; stopping cancels the
    running and the waiting ones alike."""
    clock = Clock()
    running: dict[str, Deferred[str | None]] = {}

    def probe(host: str) -> Deferred[str | None]:
        running[host] = Deferred()
        return running[host]

    health = HostHealth(clock, probe)
    hosts = [f"h{i}" for i in range(40)]
    health.check(hosts)
    assert list(running) == hosts[:CHECK_AT_ONCE]
    running["h0"].callback(None)
    assert len(running) == CHECK_AT_ONCE + 1 and hosts[CHECK_AT_ONCE] in running
    health.stop()
    assert all(d.called for d in running.values())
    assert len(running) == CHECK_AT_ONCE + 1, "no probe starts once stopped"


def test_one_line() -> None:
    """stderr of several lines becomes one line, cut at the front (the error is at the end)."""
    assert one_line("Warning: added\n\n  ssh: connect: refused \n") == "Warning: added | ssh: connect: refused"
    cut = one_line("x" * 500 + "\nthe error", 50)
    assert len(cut) == 50 and cut.startswith("...") and cut.endswith("x | the error")


class PoolDriver:
    """A driver with the optional health hook."""

    running = True

    def __init__(self, ready: bool, detail: str) -> None:
        self.report = {"ready": ready, "detail": detail,
                       "hosts": {"a": {"up": True, "failures": 0}, "b": {"up": ready, "failures": 3}}}

    def health(self) -> dict[str, Any]:
        """What the ssh driver's hook says."""
        return self.report


def test_readiness_and_metrics_show_driver_health() -> None:
    """Ready with a note while a driver's health is ready but has detail, or is not ready while another driver
    is; not ready when no driver can take work; the hosts' states as the egd_driver_host_up gauge and the
    failures counter."""
    drivers: dict[str, Any] = {"local": type("Local", (), {"running": True})(),
                               "ssh": PoolDriver(True, "b out for 3s: refused")}
    readiness = Readiness()
    readiness.add("drivers", services_running(lambda: drivers, "drivers"))
    assert readiness.report() == (True, {"drivers": "ok (ssh: b out for 3s: refused)"})
    drivers["ssh"] = PoolDriver(False, "a out; b out")
    assert readiness.report() == (True, {"drivers": "ok (ssh: a out; b out)"}), "local kernels can still start"
    alone = {"ssh": drivers["ssh"]}
    alone_readiness = Readiness()
    alone_readiness.add("drivers", services_running(lambda: alone, "drivers"))
    assert alone_readiness.report() == (False, {"drivers": "ssh: a out; b out"})
    drivers["ssh"] = PoolDriver(True, "")
    assert readiness.report() == (True, {"drivers": "ok"})
    text = GatewayMetrics(list, lambda: drivers).render().decode()
    assert 'egd_driver_host_up{driver="ssh",host="a"} 1.0' in text
    assert 'egd_driver_host_up{driver="ssh",host="b"} 1.0' in text
    assert 'egd_driver_host_failures_total{driver="ssh",host="b"} 3.0' in text
    drivers["ssh"] = PoolDriver(False, "")
    assert 'egd_driver_host_up{driver="ssh",host="b"} 0.0' in GatewayMetrics(list, lambda: drivers).render().decode()


# -- on the ssh lab's hosts -------------------------------------------------------------------------------------


def timed_start(client: GatewayClient) -> tuple[str, float]:
    """Start an ``ssh_python`` kernel: its id and how many seconds the start took."""
    began = time.monotonic()
    kernel_id = client.start_kernel("ssh_python")
    return kernel_id, time.monotonic() - began


def readyz(client: GatewayClient) -> tuple[int, str]:
    """GET /readyz: the status and the drivers check."""
    resp = client.request("GET", "/readyz")
    return resp.status, resp.json["checks"]["drivers"]


def metric(client: GatewayClient, name: str, host: str) -> float:
    """The value of ``name{driver="ssh",host=...}`` in GET /metrics."""
    text = client.request("GET", "/metrics").body.decode()
    found = re.search(rf'^{name}{{driver="ssh",host="{re.escape(host)}"}} (\S+)$', text, re.M)
    assert found, text
    return float(found.group(1))


@pytest.mark.ssh
def test_a_host_that_is_down_is_skipped_until_it_is_back(ssh_lab: SshLab, ssh_hosts: list[SshHost],
                                                          tmp_path: Path) -> None:
    """One of two hosts off the network: once a start found it out (after connect_timeout), starts no longer wait
    for it; /readyz stays ready and names it, /metrics shows it down; once it is back, a probe notices and starts
    land on it again."""
    timeout = 5
    up, down = ssh_hosts
    gw = ssh_gateway(ssh_lab, tmp_path, connect_timeout=timeout)
    ids: list[str] = []
    down.link_down()
    try:
        first: list[float] = []
        while f"ssh host {down.name} is out" not in gw.log():
            assert len(first) < 2, "two starts in a row, and none tried the host that is down"
            kernel_id, seconds = timed_start(gw.client)
            ids.append(kernel_id)
            first.append(seconds)
        assert max(first) >= timeout
        after = []
        for _ in range(4):
            kernel_id, seconds = timed_start(gw.client)
            ids.append(kernel_id)
            after.append(seconds)
        print(f"starts until the host was found out: {first}; the next four: {after}")
        assert sum(after) < timeout * 1.5, after
        assert f"launcher started on {down.name}" not in gw.log()
        status, drivers = readyz(gw.client)
        assert status == 200 and drivers.startswith(f"ok (ssh: {down.name} out for "), drivers
        assert "Connection timed out" in drivers or "timed out" in drivers, drivers
        assert metric(gw.client, "egd_driver_host_up", down.name) == 0
        assert metric(gw.client, "egd_driver_host_up", up.name) == 1
        assert metric(gw.client, "egd_driver_host_failures_total", down.name) >= 1
        for kernel_id in ids:
            gw.client.delete_kernel(kernel_id)
        ids.clear()

        down.link_up()
        wait_until(lambda: readyz(gw.client) == (200, "ok"), 60, what=f"a probe to bring {down.name} back")
        assert metric(gw.client, "egd_driver_host_up", down.name) == 1
        ids += [gw.client.start_kernel("ssh_python") for _ in range(2)]
        assert f"launcher started on {down.name}" in gw.log()
        log = gw.log()
        assert log.count(f"ssh host {down.name} is out") == 1 and log.count(f"ssh host {down.name} is back") == 1
        assert [line for line in log.splitlines() if not LOG_LINE.match(line)] == []
    finally:
        down.link_up()
        for kernel_id in ids:
            gw.client.delete_kernel(kernel_id)
        gw.stop()


@pytest.mark.ssh
def test_a_host_down_when_egd_starts_is_out_before_any_start(ssh_lab: SshLab, ssh_hosts: list[SshHost],
                                                             tmp_path: Path) -> None:
    """egd probes its hosts as it starts: a host that is down then is out within connect_timeout, and no start
    waits for it; the host that is up is used."""
    timeout = 3
    up, down = ssh_hosts
    down.link_down()
    gw = ssh_gateway(ssh_lab, tmp_path, connect_timeout=timeout)
    kernel_id = None
    try:
        wait_until(lambda: f"ssh host {down.name} is out: " in gw.log(), timeout + 5, 0.1,
                   f"the probe at start to find {down.name} out")
        kernel_id, seconds = timed_start(gw.client)
        assert seconds < timeout, seconds
        assert f"launcher started on {up.name}" in gw.log()
        assert readyz(gw.client)[1].startswith(f"ok (ssh: {down.name} out for "), readyz(gw.client)
    finally:
        down.link_up()
        if kernel_id:
            gw.client.delete_kernel(kernel_id)
        gw.stop()


@pytest.mark.ssh
def test_every_host_out_fails_fast_with_503(ssh_lab: SshLab, tmp_path: Path) -> None:
    """Every host out (here ssh's proxy command fails, and ssh writes two lines of stderr about it): the probes egd
    makes as it starts find each out, so starts fail at once with 503 naming each host and why; /readyz stays
    ready (the gateway's local driver can still start kernels) and says why ssh cannot; every log entry is one
    line."""
    gw = ssh_gateway(ssh_lab, tmp_path, ssh_options=["ProxyCommand=false", "LogLevel=VERBOSE"])
    try:
        wait_until(lambda: all(f"ssh host {host.name} is out: " in gw.log() for host in ssh_lab.hosts), 10, 0.1,
                   "the probes at start to find every host out")
        began = time.monotonic()
        resp = gw.client.request("POST", "/api/kernels", {"name": "ssh_python"})
        assert time.monotonic() - began < 1
        assert resp.status == 503, resp.body
        message = resp.json["message"]
        assert message.startswith("no ssh host is up: "), message
        for host in ssh_lab.hosts:
            assert f"{host.name} out for " in message
        assert f"{TWO_LINES} (next probe in " in message
        status, drivers = readyz(gw.client)
        assert status == 200 and drivers.startswith("ok (ssh: ") and TWO_LINES in drivers, drivers
        metrics = gw.client.request("GET", "/metrics").body.decode()
        assert 'egd_kernel_launch_failures_total{driver="ssh",reason="unavailable"} 1.0' in metrics
        assert 'egd_driver_host_up{driver="ssh",host="egdh1"} 0.0' in metrics
        log = gw.log()
        assert f"ssh host egdh1 is out: {TWO_LINES}; skipped until a probe reaches it" in log
        assert [line for line in log.splitlines() if not LOG_LINE.match(line)] == []
    finally:
        gw.stop()


class Stderr:
    """What the driver reads of a finished ssh: its stderr."""

    def __init__(self, text: str) -> None:
        self.text = text

    def stderr(self) -> str:
        """ssh's stderr."""
        return self.text


def test_what_takes_a_host_out(tmp_path: Path) -> None:
    """Only a connection failure takes a host out: not a refused login (that login's problem), not a problem of
    the gateway's own side, not a remote command's failure (which brings the host back); placement rotates over the
    hosts that are up, and with none up the start is refused at once (503) naming each host and why."""
    from twisted.internet.testing import MemoryReactorClock

    from egd.drivers.ssh import SshDriver
    from egd.errors import ServiceUnavailable

    driver = SshDriver(MemoryReactorClock(), {"hosts": ["a", "b", "c"]}, str(tmp_path), None)
    request: Any = type("Request", (), {"spec": type("Spec", (), {"driver_config": {}})()})()
    driver._observe("a", "alice", 255, Stderr("alice@a: Permission denied (publickey)."))
    driver._observe("b", None, 255, Stderr("unix_listener: path too long for Unix domain socket"))
    assert driver.health() == {"ready": True, "detail": "", "hosts": {
        "a": {"up": True, "failures": 0}, "b": {"up": True, "failures": 0}, "c": {"up": True, "failures": 0}}}
    driver._observe("b", None, 255, Stderr("ssh: connect to host b port 22: Connection refused"))
    assert [driver._candidates(request)[0] for _ in range(4)] == ["a", "c", "a", "c"]
    assert driver.health()["detail"] == "b out for 0s: ssh: connect to host b port 22: Connection refused " \
                                        "(next probe in 1s)"
    driver._observe("b", None, 1, Stderr("the remote command failed"))
    driver._observe("a", None, 255, Stderr("ssh: connect to host a port 22: No route to host"))
    driver._observe("c", None, 255, Stderr("ssh: connect to host c port 22: Connection timed out"))
    assert driver.health()["ready"] is True and driver._candidates(request) == ["b"]
    driver._observe("b", None, 255, Stderr("ssh: connect to host b port 22: Connection refused"))
    assert driver.health()["ready"] is False
    with pytest.raises(ServiceUnavailable) as refused:
        driver._candidates(request)
    assert str(refused.value).startswith("no ssh host is up: a out for 0s: ssh: connect to host a port 22: No route")
    driver._host_health.stop()
