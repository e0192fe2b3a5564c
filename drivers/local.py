"""The ``local`` driver: kernels as processes on the gateway host, started with ``spawnProcess``.

Each kernel starts in a session of its own (``setsid``), so a signal sent to egd's terminal or process group
does not reach it, an interrupt reaches the kernel's whole process group, and (for later persistence) it can
outlive its gateway.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet import error, protocol
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from egd.driverapi import ExitStatus, LaunchedKernel, LaunchRequest
from egd.errors import LaunchFailed
from egd.kernels.ports import PortAllocator

log = Logger()

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")
_PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
_STDERR_TAIL_BYTES = 8192
_SETSID = shutil.which("setsid")


def kernel_argv(argv: tuple[str, ...], values: Mapping[str, str]) -> list[str]:
    """The kernelspec's argv with ``{connection_file}``-style placeholders filled (unknown ones kept)."""
    filled = [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), arg) for arg in argv]
    if filled and filled[0] in _PYTHON_NAMES:
        filled[0] = sys.executable  # jupyter_client's rule: "python" means the gateway's interpreter
    return filled


class _KernelProcess(protocol.ProcessProtocol):
    """Collects a kernel's output tail and reports its end."""

    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self.exited: Deferred[ExitStatus] = Deferred()
        self.tail: deque[bytes] = deque()
        self._tail_size = 0

    def _keep(self, data: bytes) -> None:
        self.tail.append(data)
        self._tail_size += len(data)
        while self._tail_size > _STDERR_TAIL_BYTES and len(self.tail) > 1:
            self._tail_size -= len(self.tail.popleft())

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted hook
        """Kernel stdout: kept for diagnosis (the kernel's real output goes over ZeroMQ)."""
        self._keep(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted hook
        """Kernel stderr: kept for diagnosis, logged at debug level."""
        self._keep(data)
        log.debug("kernel {kernel_id} stderr: {text}", kernel_id=self.kernel_id,
                  text=data.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted hook
        """Fire :attr:`exited` with how the process ended."""
        value = reason.value
        status = ExitStatus(getattr(value, "exitCode", None), getattr(value, "signal", None))
        if isinstance(value, error.ProcessDone):
            status = ExitStatus(0, None)
        self.exited.callback(status)


class LocalKernel:
    """A kernel process on this host."""

    def __init__(self, driver: LocalDriver, process: Any, proto: _KernelProcess,
                 connection_info: dict[str, Any], connection_file: str, ports: list[int]) -> None:
        self._driver = driver
        self._process = process
        self._proto = proto
        self.connection_info = connection_info
        self.connection_file = connection_file
        self._ports = ports
        self.pid: int = process.pid
        self.exited: Deferred[ExitStatus] = Deferred()
        self._ended = False
        proto.exited.addCallback(self._on_exit)

    def _on_exit(self, status: ExitStatus) -> ExitStatus:
        self._ended = True
        self.exited.callback(status)
        return status

    def describe(self) -> str:
        """The kernel's pid."""
        return f"pid {self.pid}"

    def failure_detail(self) -> str:
        """The tail of what the kernel wrote."""
        text = b"".join(self._proto.tail).decode("utf-8", "replace").strip()
        return "\n".join(text.splitlines()[-15:])

    def signal(self, signum: int) -> Deferred[None]:
        """Signal the kernel's process group (its own session when ``setsid`` exists, else the process)."""
        if not self._ended:
            try:
                if _SETSID:
                    os.killpg(self.pid, signum)
                else:
                    os.kill(self.pid, signum)
            except ProcessLookupError:
                pass
        return succeed(None)

    def kill(self) -> Deferred[None]:
        """SIGKILL the process group; fires when the process has been reaped."""
        self.signal(signal.SIGKILL)
        done: Deferred[None] = Deferred()
        self.exited.addBoth(lambda _: done.callback(None) if not done.called else None)
        if self._ended:
            return succeed(None)
        return done

    def cleanup(self) -> None:
        """Release the ports and remove the connection file."""
        self._driver.ports.release(self._ports)
        self._ports = []
        try:
            os.unlink(self.connection_file)
        except FileNotFoundError:
            pass


class LocalDriver(Service):
    """Launches kernels as child processes of the gateway."""

    def __init__(self, reactor: Any, settings: Mapping[str, Any], runtime_dir: str,
                 port_range: tuple[int, int] | None) -> None:
        self.name = "local"
        unknown = set(settings) - {"ip"}
        if unknown:
            raise ValueError(f"drivers.local: unknown setting(s) {', '.join(sorted(unknown))} (known: ip)")
        self._reactor = reactor
        self._runtime_dir = runtime_dir
        self._ip = str(settings.get("ip", "127.0.0.1"))
        self.ports = PortAllocator(self._ip, port_range)

    def startService(self) -> None:  # noqa: N802 - Twisted hook
        """Make sure the runtime directory for connection files exists and is private."""
        os.makedirs(self._runtime_dir, mode=0o700, exist_ok=True)
        super().startService()

    def _write_connection_file(self, kernel_id: str, info: dict[str, Any]) -> str:
        path = os.path.join(self._runtime_dir, f"kernel-{kernel_id}.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
        return path

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Allocate ports, write the connection file, spawn the kernel in its own session."""
        try:
            ports = self.ports.allocate(5)
        except OSError as exc:
            raise LaunchFailed(str(exc)) from None
        info: dict[str, Any] = {
            "transport": "tcp", "ip": self._ip, "key": uuid.uuid4().hex, "signature_scheme": "hmac-sha256",
            "kernel_name": request.spec.name,
            **dict(zip(("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"), ports, strict=False)),
        }
        try:
            connection_file = self._write_connection_file(request.kernel_id, info)
        except OSError as exc:
            self.ports.release(ports)
            raise LaunchFailed(f"cannot write the connection file: {exc.strerror}") from None
        argv = kernel_argv(request.spec.argv, {
            "connection_file": connection_file, "kernel_id": request.kernel_id,
            "resource_dir": request.spec.resource_dir, "prefix": sys.prefix,
        })
        if not argv:
            self.ports.release(ports)
            raise LaunchFailed(f"kernelspec {request.spec.name} has an empty argv")
        if _SETSID:
            argv = [_SETSID, *argv]
        cwd = request.working_dir if request.working_dir and os.path.isdir(request.working_dir) else None
        proto = _KernelProcess(request.kernel_id)
        try:
            process = self._reactor.spawnProcess(proto, argv[0], argv, env=dict(request.env), path=cwd)
        except OSError as exc:
            self.ports.release(ports)
            os.unlink(connection_file)
            raise LaunchFailed(f"cannot start {argv[0]}: {exc.strerror}") from None
        kernel = LocalKernel(self, process, proto, info, connection_file, ports)
        log.info("kernel {kernel_id} ({spec}) started as pid {pid}", kernel_id=request.kernel_id,
                 spec=request.spec.name, pid=kernel.pid)
        return succeed(kernel)
