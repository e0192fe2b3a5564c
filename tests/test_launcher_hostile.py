"""Hostile peers of a launcher's control port, and a launcher that dies (issue 10, items 4 and 11).

The launcher (``launchers/kernel_launcher.py``) runs here as a real process beside a real ipykernel, exactly as
the ssh driver starts it on a host; the test plays the gateway's side of the protocol (its callback listener
and signed control requests) with the launch secret it handed over, so every request is as real as egd's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egd.launchers import kernel_launcher
from egd.launchers.launcher_protocol import NonceCache, sign, verify
from tests.conftest import wait_until
from tests.peers import dripping_peer
from tests.procs import alive

pytestmark = pytest.mark.security

SECRET = "a" * 64


class CallbackServer:
    """The gateway's callback listener, reduced to its essence: every message it receives, answered ok."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, Any]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """HOST:PORT for ``--callback``."""
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                line = conn.makefile("rb").readline()
                if line:
                    self.messages.append(json.loads(line))
                    conn.sendall(b'{"ok": true}\n')

    def close(self) -> None:
        """Stop serving."""
        self._stop = True
        self._thread.join(5)
        self.sock.close()


class RunningLauncher:
    """A launcher with its kernel, started as the ssh driver starts one (secrets on stdin, detached)."""

    def __init__(self, tmp: Path, callback: CallbackServer,
                 kernel: tuple[str, ...] = ("-m", "ipykernel_launcher", "-f", "{connection_file}")) -> None:
        self.kernel_id = str(uuid.uuid4())
        self.secret = SECRET.encode()
        self.tmp = tmp
        #: The launcher's temporary directory (TMPDIR): where it keeps the kernel's connection file.
        self.workdirs = tmp / "work"
        self.workdirs.mkdir()
        argv = [sys.executable, kernel_launcher.__file__, "--kernel-id", self.kernel_id, "--callback",
                callback.address, "--bind-ip", "127.0.0.1", "--log-dir", str(tmp), "--startup-timeout", "30",
                "--", sys.executable, *kernel]
        line = json.dumps({"secret": SECRET, "key": uuid.uuid4().hex, "env": {}}).encode() + b"\n"
        started = subprocess.run(argv, input=line, capture_output=True, timeout=30, check=True,
                                 env={**os.environ, "TMPDIR": str(self.workdirs)})
        self.launcher_pid = int(json.loads(started.stdout.splitlines()[-1])["launcher_pid"])
        reported = wait_until(lambda: next((m for m in callback.messages if m.get("type") in ("ready", "failed")),
                                           None), 30, what=f"the launcher's first report (log: {self.log_path})")
        if reported["type"] == "failed":
            self.info = {"launcher_port": 0, "pid": 0}
            self.failure = str(reported["reason"])
            return
        self.info = reported["info"]
        self.address = ("127.0.0.1", int(self.info["launcher_port"]))
        self.kernel_pid = int(self.info["pid"])

    @property
    def log_path(self) -> Path:
        """The launcher's (and its kernel's) log on the host."""
        return self.tmp / f"egd-kernel-{self.kernel_id}.log"

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """A signed control request, as egd sends it; the launcher's answer."""
        return send_line(self.address, sign({"kernel_id": self.kernel_id, "op": op, **fields}, self.secret))

    def stop(self) -> None:
        """Stop the launcher and its kernel, whatever state the test left them in."""
        for pid in (self.launcher_pid, self.kernel_pid):
            if pid > 1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def send_line(address: tuple[str, int], message: Any, raw: bytes | None = None, timeout: float = 10) -> dict[str, Any]:
    """Send one line (``message`` as JSON, or ``raw``), read the one-line answer."""
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(raw if raw is not None else json.dumps(message).encode() + b"\n")
        return dict(json.loads(conn.makefile("rb").readline()))


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[RunningLauncher]:
    """A running launcher and kernel; both are gone after the test."""
    callback = CallbackServer()
    running = RunningLauncher(tmp_path, callback)
    try:
        yield running
    finally:
        running.stop()
        callback.close()


def test_deep_nesting_is_refused_and_the_launcher_lives(launcher: RunningLauncher) -> None:
    """JSON nested deeper than Python's recursion limit is refused; the launcher keeps serving its kernel."""
    for raw in (b"[" * 60000 + b"\n", b'{"a":' * 12000 + b"\n"):
        assert send_line(launcher.address, None, raw)["ok"] is False
    assert alive(launcher.launcher_pid)
    assert launcher.request("ping")["alive"] is True
    assert "Traceback" not in launcher.log_path.read_text()


@pytest.mark.parametrize("fields", [
    {"op": "signal", "signum": "x"},
    {"op": "signal", "signum": 10 ** 30},
    {"op": "signal", "signum": 2.5},
    {"op": "signal", "signum": True},
    {"op": ["ping"]},
    {"op": {"a": 1}},
], ids=["signum-str", "signum-huge", "signum-float", "signum-bool", "op-list", "op-dict"])
def test_wrong_types_are_refused(launcher: RunningLauncher, fields: dict[str, Any]) -> None:
    """Signed requests with fields of the wrong type are answered with a refusal, not obeyed, not fatal."""
    assert launcher.request(**fields)["ok"] is False
    assert alive(launcher.launcher_pid) and alive(launcher.kernel_pid)
    assert launcher.request("ping")["alive"] is True


def test_garbage_is_refused(launcher: RunningLauncher) -> None:
    """Not JSON, not an object, invalid UTF-8, NaN: each is refused and the launcher keeps serving."""
    for raw in (b"not json\n", b"[]\n", b"42\n", b"\xff\xfe\n", b'{"ts": NaN}\n', b"\n"):
        assert send_line(launcher.address, None, raw)["ok"] is False
    assert launcher.request("ping")["alive"] is True


def test_non_finite_timestamp_is_refused(launcher: RunningLauncher) -> None:
    """A correctly signed request whose ``ts`` is NaN or infinite is refused (NaN passed the freshness check:
    ``abs(now - nan) > MAX_SKEW`` is false), by the launcher and by the shared ``verify`` egd uses."""
    for stamp in (math.nan, math.inf, -math.inf, 10 ** 400):
        message = {"kernel_id": launcher.kernel_id, "op": "ping", "v": 1, "nonce": uuid.uuid4().hex, "ts": stamp}
        message["mac"] = sign_with(message, launcher.secret)
        assert verify(message, launcher.secret, NonceCache()) is not None
        raw = json.dumps(message).encode() + b"\n"  # Python writes NaN and Infinity, as a forger would
        assert send_line(launcher.address, None, raw)["ok"] is False
    assert launcher.request("ping")["ok"] is True


def sign_with(message: dict[str, Any], secret: bytes) -> str:
    """The MAC of ``message`` exactly as ``sign`` computes it, for a message ``sign`` would not make."""
    import hashlib
    import hmac
    body = json.dumps({k: v for k, v in message.items() if k != "mac"}, sort_keys=True,
                      separators=(",", ":")).encode()
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_slow_peer_does_not_hold_the_control_loop(launcher: RunningLauncher) -> None:
    """A peer sending one byte a second (the old deadline was per recv, so it held the single-threaded loop for
    as long as it liked) delays no request: a signed ping and a signal are answered at once, and the slow peer
    is dropped at its total deadline."""
    connected = time.monotonic()
    with dripping_peer(launcher.address) as slow:
        time.sleep(0.5)
        began = time.monotonic()
        assert launcher.request("ping")["alive"] is True
        assert launcher.request("signal", signum=0)["delivered"] is True
        assert time.monotonic() - began < 1.5
        slow.settimeout(10)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while slow.recv(1):
                pass
        assert time.monotonic() - connected < 4, "the slow peer was not dropped at its total deadline"
    assert "dropped a control connection from 127.0.0.1: no complete request within 2s" in \
        launcher.log_path.read_text()


def test_crowd_of_silent_peers_delays_no_request(launcher: RunningLauncher) -> None:
    """More silent connections than the launcher serves at once: the oldest are dropped, a signed request is
    answered at once, and the launcher's log does not grow with every connection."""
    silent = [socket.create_connection(launcher.address, timeout=5) for _ in range(150)]
    try:
        began = time.monotonic()
        assert launcher.request("ping")["alive"] is True
        assert time.monotonic() - began < 1.5
    finally:
        for conn in silent:
            conn.close()
    assert launcher.log_path.read_text().count("dropped a control connection") <= 20


def test_oversized_request_is_dropped(launcher: RunningLauncher) -> None:
    """A request longer than the line limit is dropped; the launcher keeps serving."""
    with socket.create_connection(launcher.address, timeout=10) as conn:
        with contextlib.suppress(OSError):
            conn.sendall(b"x" * (200 * 1024))
            assert conn.recv(1) == b""
    assert launcher.request("ping")["alive"] is True


def test_killed_launcher_takes_its_kernel(launcher: RunningLauncher) -> None:
    """kill -9 of the launcher: its kernel dies with it (no orphan that answers heartbeats but that no one can
    interrupt or stop)."""
    assert alive(launcher.kernel_pid)
    os.kill(launcher.launcher_pid, signal.SIGKILL)
    wait_until(lambda: not alive(launcher.kernel_pid), 5, what="the kernel to die with its launcher")


def test_terminated_launcher_leaves_no_files(launcher: RunningLauncher) -> None:
    """SIGTERM (how the gateway stops a launch that timed out): the kernel is killed and the private directory
    with its connection file (the kernel's key) is removed; it used to stay."""
    assert list(launcher.workdirs.iterdir())
    os.kill(launcher.launcher_pid, signal.SIGTERM)
    wait_until(lambda: not alive(launcher.kernel_pid) and not alive(launcher.launcher_pid), 5,
               what="the launcher and its kernel to end")
    assert list(launcher.workdirs.iterdir()) == []


def test_failed_kernel_leaves_no_files(tmp_path: Path) -> None:
    """A kernel that exits at once is reported as failed, with its output, and leaves no file behind."""
    callback = CallbackServer()
    try:
        failed = RunningLauncher(tmp_path, callback, ("-c", "import sys; print('boom'); sys.exit(3)",
                                                      "{connection_file}"))
        assert "exited with code 3" in failed.failure and "boom" in failed.failure
        wait_until(lambda: not alive(failed.launcher_pid), 5, what="the launcher to end")
        assert list(failed.workdirs.iterdir()) == []
    finally:
        callback.close()
