"""egd under systemd, without systemd: a real AF_UNIX datagram socket as NOTIFY_SOCKET receives what egd tells
its service manager (with the sender's pid, as systemd checks it for NotifyAccess=main), and a real listening
socket is passed as systemd passes it (fd 3, LISTEN_PID, LISTEN_FDS) for socket activation.

PID 1 here is not systemd, so the service manager's side is played by these sockets; egd's side is the real
``egd run`` process.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.task import Clock

from egd.config import Config
from egd.systemd import Notifier, Supervisor, config_changes, listen_fds, watchdog_interval
from tests.conftest import KERNELSPECS, GatewayProcess, free_port, wait_until
from tests.test_tls import make_cert

pytestmark = pytest.mark.ops

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifyListener:
    """What systemd listens with: an AF_UNIX datagram socket, each message with its sender's credentials.

    When the first ``READY=1`` arrives it at once asks the gateway named in its ``STATUS`` for ``GET /api``:
    READY must mean the gateway answers.
    """

    def __init__(self, address: str | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="egd-notify-")  # short: AF_UNIX paths are limited to 107 bytes
        self.address = address or os.path.join(self._dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:] if self.address.startswith("@") else self.address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        #: (arrival on time.monotonic, sender pid, the message's assignments)
        self.messages: list[tuple[float, int, dict[str, str]]] = []
        self.ready_answer: int | str | None = None
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next((_UCRED.unpack(d[:_UCRED.size])[0] for level, kind, d in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if fields.get("READY") == "1" and self.ready_answer is None:
                self.ready_answer = self._ask(fields.get("STATUS", ""))
            with self._lock:
                self.messages.append((time.monotonic(), pid, fields))

    @staticmethod
    def _ask(status: str) -> int | str:
        url = next((word for word in status.split() if word.startswith(("http://", "https://"))), None)
        if url is None:
            return f"no URL in STATUS={status!r}"
        try:
            context = ssl._create_unverified_context() if url.startswith("https") else None
            with urllib.request.urlopen(url.rstrip("/") + "/api", timeout=5, context=context) as resp:
                return int(resp.status)
        except OSError as exc:
            return f"{url}: {exc}"

    def received(self, key: str, value: str | None = None,
                 after: float = 0.0) -> list[tuple[float, int, dict[str, str]]]:
        """Messages with ``key`` (equal to ``value`` when given) that arrived after ``after``."""
        with self._lock:
            return [m for m in self.messages if m[0] > after and key in m[2] and value in (None, m[2][key])]

    def wait(self, key: str, value: str | None = None, after: float = 0.0, count: int = 1,
             timeout: float = 30) -> list[tuple[float, int, dict[str, str]]]:
        """Wait for ``count`` such messages."""
        return wait_until(lambda: (found := self.received(key, value, after)) and len(found) >= count and found,
                          timeout, what=f"{count} x {key}={value or '*'} on NOTIFY_SOCKET")

    def close(self) -> None:
        """Stop receiving."""
        self._stop = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    """A NOTIFY_SOCKET listener, closed after the test."""
    notify = NotifyListener()
    yield notify
    notify.close()


def rewrite_config(gw: GatewayProcess, change: Callable[[dict[str, Any]], Any]) -> None:
    """Change the gateway's config file in place (atomically, as an editor or a config manager does)."""
    config = yaml.safe_load(gw.config_path.read_text())
    change(config)
    temporary = gw.config_path.with_suffix(".new")
    temporary.write_text(yaml.safe_dump(config))
    temporary.replace(gw.config_path)


def log_line(gw: GatewayProcess, text: str, after: int) -> str:
    """The first line of the gateway's log, from offset ``after``, containing ``text`` (waits for it)."""
    return str(wait_until(lambda: next((line for line in gw.log()[after:].splitlines() if text in line), None), 15,
                          what=f"{text!r} in the log"))


def test_ready_watchdog_reload_and_stop(listener: NotifyListener) -> None:
    """READY=1 once egd answers, WATCHDOG=1 every WATCHDOG_USEC/2, RELOADING=1 then READY=1 around a SIGHUP
    (a valid file applied where it can be, a broken one refused with the old config kept), STOPPING=1 on
    SIGTERM and exit 0; every message sent by egd's own pid (NotifyAccess=main)."""
    gw = GatewayProcess(env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000"})
    kernel_id = None
    try:
        ready = listener.wait("READY", "1")
        assert ready[0][1] == gw.proc.pid, "READY=1 must come from the main pid"
        assert listener.ready_answer == 200, f"READY=1 before the gateway answered: {listener.ready_answer}"
        assert f"127.0.0.1:{gw.port}" in ready[0][2]["STATUS"]

        # The watchdog: a ping every 0.2 s, from the reactor.
        start = time.monotonic()
        pings = listener.wait("WATCHDOG", "1", after=start, count=5, timeout=10)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(pings)]
        assert 0.15 < sum(gaps) / len(gaps) < 0.3 and max(gaps) < 0.6, gaps  # 0.2 s, with some scheduling slack
        assert {pid for _, pid, _ in pings} == {gw.proc.pid}

        # A valid change: live keys applied (the gateway limit, the log level), a listener key logged as needing
        # a restart.
        kernel_id = gw.client.start_kernel("python3")
        rewrite_config(gw, lambda c: (c["kernels"].update(max_kernels=1), c["server"].update(ws_ping_interval=7),
                                      c["logging"].update(level="info")))
        mark, offset = time.monotonic(), len(gw.log())
        gw.proc.send_signal(signal.SIGHUP)
        reloading = listener.wait("RELOADING", "1", after=mark)[0]
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_usec - int(reloading[2]["MONOTONIC_USEC"]) < 10_000_000  # the same clock as systemd's
        assert listener.wait("READY", "1", after=reloading[0])
        line = log_line(gw, "config reloaded", offset)
        assert "kernels.max_kernels (None -> 1)" in line and "logging.level ('debug' -> 'info')" in line, line
        assert "needs a restart (not applied): server.ws_ping_interval" in line, line
        refused = gw.client.request("POST", "/api/kernels", {"name": "python3"})
        assert refused.status == 403 and "max kernels" in refused.json["message"], refused.body
        assert " debug " not in gw.log()[offset:].split("config reloaded", 1)[1]  # no more access lines (debug)

        # Broken files: refused with every problem on one line; the running config stays (the limit holds).
        good = gw.config_path.read_text()
        gw.config_path.write_text(good + "kernels: [unclosed\n")
        mark, offset = time.monotonic(), len(gw.log())
        gw.proc.send_signal(signal.SIGHUP)
        reloading = listener.wait("RELOADING", "1", after=mark)[0]
        assert listener.wait("READY", "1", after=reloading[0])
        line = log_line(gw, "config reload refused", offset)
        assert "the running configuration stays" in line and "not valid YAML" in line, line
        gw.config_path.write_text(good)
        rewrite_config(gw, lambda c: c["kernels"].update(max_kernels=0, bogus=1))
        offset = len(gw.log())
        gw.proc.send_signal(signal.SIGHUP)
        line = log_line(gw, "config reload refused", offset)
        assert "2 problem(s)" in line and "kernels.max_kernels: must be >= 1" in line and "kernels.bogus" in line
        assert gw.client.request("POST", "/api/kernels", {"name": "python3"}).status == 403
        assert gw.client.request("GET", "/api").status == 200
    finally:
        if kernel_id is not None:
            gw.client.delete_kernel(kernel_id)
        mark = time.monotonic()
        code = gw.stop()
    assert code == 0, gw.log()
    stopping = listener.wait("STOPPING", "1", after=mark, timeout=5)
    assert stopping[0][1] == gw.proc.pid


def spawn_egd(directory: Path, config: dict[str, Any], env: dict[str, str] | None = None,
              passed: socket.socket | None = None, log: Any = None) -> subprocess.Popen[bytes]:
    """``egd run`` with ``config``, its output to ``log`` (default DIR/egd.log). With ``passed``, started as
    systemd starts a socket-activated service: the socket at fd 3, LISTEN_FDS, LISTEN_PID = the service's pid
    (a wrapper sets it, then execs egd in the same process)."""
    config.setdefault("kernels", {}).update(kernelspec_dirs=[str(KERNELSPECS)], runtime_dir=str(directory / "rt"))
    (directory / "egd.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "egd", "run", "--config", str(directory / "egd.yaml")]
    fds: list[int] = []
    if passed is not None:
        wrapper = ("import os, sys; fd = int(sys.argv[1]); fd == 3 or (os.dup2(fd, 3), os.close(fd)); "
                   "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='http'); "
                   "os.execv(sys.argv[2], sys.argv[2:])")
        command = [sys.executable, "-c", wrapper, str(passed.fileno()), *command]
        fds = [passed.fileno()]
    out = log if log is not None else open(directory / "egd.log", "wb")  # closed below, once egd has it
    try:
        return subprocess.Popen(command, pass_fds=fds, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    finally:
        if log is None:
            out.close()


def stop_egd(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as systemd stops a service; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def test_journald_text_and_json_logs(listener: NotifyListener, tmp_path: Path) -> None:
    """On journald's stream (JOURNAL_STREAM = its device:inode) text lines carry the syslog priority and no
    timestamp (journald has both); JSON lines are plain JSON, one per line, with no RFC 7464 separator."""
    log_path = tmp_path / "egd.log"
    with open(log_path, "wb") as log:
        stat = os.fstat(log.fileno())
        proc = spawn_egd(tmp_path, {"server": {"port": 0}}, log=log,
                         env={"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}", "NOTIFY_SOCKET": listener.address})
    try:
        listener.wait("READY", "1")
        (tmp_path / "egd.yaml").write_text("kernels: [\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reload refused" in log_path.read_text(), 15, what="the refusal")
    finally:
        assert stop_egd(proc) == 0, log_path.read_text()
    lines = log_path.read_text().splitlines()
    assert any(line.startswith("<6>info  [egd] egd ") for line in lines), lines
    assert any(line.startswith("<3>error [egd.systemd] config reload refused") for line in lines), lines
    assert not any(line[:4].isdigit() for line in lines), lines  # no timestamps of egd's own

    json_dir = tmp_path / "json"
    json_dir.mkdir()
    mark = time.monotonic()
    proc = spawn_egd(json_dir, {"server": {"port": 0}, "logging": {"format": "json"}},
                     env={"NOTIFY_SOCKET": listener.address})
    try:
        listener.wait("READY", "1", after=mark)
    finally:
        assert stop_egd(proc) == 0
    records = [json.loads(line) for line in (json_dir / "egd.log").read_text().splitlines()]
    assert any("ready" in str(r.get("log_format")) for r in records), records


def test_socket_activation(listener: NotifyListener, tmp_path: Path) -> None:
    """With LISTEN_PID/LISTEN_FDS, egd serves on the socket it was given (fd 3) and binds nothing itself; READY
    names the passed socket's port. The socket is made by this test, listening, as systemd makes it."""
    passed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    passed.bind(("127.0.0.1", 0))
    passed.listen(64)
    port = passed.getsockname()[1]
    configured = free_port()  # what server.port says: egd must not bind it
    proc = spawn_egd(tmp_path, {"server": {"ip": "127.0.0.1", "port": configured}, "logging": {"level": "debug"}},
                     env={"NOTIFY_SOCKET": listener.address}, passed=passed)
    log_path = tmp_path / "egd.log"
    try:
        ready = listener.wait("READY", "1")
        assert ready[0][1] == proc.pid
        assert f"127.0.0.1:{port}" in ready[0][2]["STATUS"]
        assert listener.ready_answer == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=5) as resp:
            assert json.loads(resp.read())["gateway_version"]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", configured), timeout=5).close()
        assert "(socket fd 3 from systemd)" in log_path.read_text()
    finally:
        code = stop_egd(proc)
        passed.close()
    assert code == 0, log_path.read_text()


def test_socket_activation_tls(tmp_path: Path) -> None:
    """A passed socket with server.certfile/keyfile serves HTTPS, as a socket egd binds itself would."""
    make_cert(tmp_path, "server")
    passed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    passed.bind(("127.0.0.1", 0))
    passed.listen(64)
    port = passed.getsockname()[1]
    proc = spawn_egd(tmp_path, {"server": {"certfile": str(tmp_path / "server.pem"),
                                           "keyfile": str(tmp_path / "server.key")}}, passed=passed)
    context = ssl.create_default_context(cafile=str(tmp_path / "server.pem"))

    def answers() -> bool:
        assert proc.poll() is None, (tmp_path / "egd.log").read_text()
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/api", timeout=2, context=context) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        wait_until(answers, 30, what="HTTPS on the passed socket")
    finally:
        code = stop_egd(proc)
        passed.close()
    assert code == 0, (tmp_path / "egd.log").read_text()


def test_notifier_abstract_socket_and_no_listener() -> None:
    """``@name`` is the abstract namespace; an absent listener or no NOTIFY_SOCKET is never an error."""
    abstract = NotifyListener(f"@egd-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        notifier = Notifier(abstract.address)
        assert notifier.ready("up") and notifier.reloading()
        assert abstract.wait("READY", "1")[0][2]["STATUS"] == "up"
        assert abstract.wait("RELOADING", "1")[0][1] == os.getpid()
        notifier.close()
    finally:
        abstract.close()
    assert not Notifier("/nonexistent/notify.sock").ready()  # logged, not raised
    assert not Notifier.from_environ({}).enabled


def test_watchdog_interval_and_listen_fds_environment() -> None:
    """Half of WATCHDOG_USEC, none for another WATCHDOG_PID; LISTEN_* honoured only for this pid, then removed."""
    assert watchdog_interval({"WATCHDOG_USEC": "400000"}, pid=7) == 0.2
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "7"}, pid=7) == 0.2
    assert watchdog_interval({}, pid=7) is None
    assert listen_fds({"LISTEN_PID": "8", "LISTEN_FDS": "1"}, pid=7) == []
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "0"}
    assert listen_fds(env, pid=7) == [] and env == {}


def test_watchdog_pings_on_the_injected_clock(listener: NotifyListener) -> None:
    """The watchdog is a LoopingCall on the clock it is given: one ping at start, then one per interval."""
    clock = Clock()
    supervisor = Supervisor(gateway=None, reactor=None, load=Config, set_level=lambda _: None,
                            notifier=Notifier(listener.address), environ={"WATCHDOG_USEC": "2000000"}, clock=clock)
    supervisor.start_watchdog()
    for _ in range(3):
        clock.advance(1.0)
    assert len(listener.wait("WATCHDOG", "1", count=4)) == 4  # at start, then at 1, 2, 3 s
    supervisor.stop()


def test_config_changes_lists_dotted_keys() -> None:
    """Each changed key by its dotted path, drivers by name."""
    old = Config()
    new = Config(drivers={"local": {}, "ssh": {"hosts": ["a"]}})
    assert config_changes(old, new) == ["drivers.ssh"]
    assert config_changes(old, old) == []
