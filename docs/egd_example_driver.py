"""A minimal egd driver: each kernel a plain child process of the gateway (``docs/writing-a-driver.rst``).

It shows the whole contract of :mod:`egd.driverapi` and nothing more: no sessions of their own, no
impersonation, no re-attaching after a gateway restart (egd's ``local`` driver does all of that). Install it
with an entry point in the ``egd.drivers`` group::

    [options.entry_points]
    egd.drivers =
        example = egd_example_driver:ExampleDriver

then name it in the config (``drivers: {example: {ip: 127.0.0.1}}``) and in a kernelspec
(``"metadata": {"egd": {"driver": "example"}}``). The tests load this very file through such an entry point.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from egd import checks
from egd.driverapi import ExitStatus, LaunchedKernel, LaunchRequest
from egd.errors import LaunchFailed
from egd.kernels.ports import PortAllocator

_CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


@dataclass(frozen=True)
class ExampleSettings(checks.Settings):
    """``drivers.example``: egd checks the YAML against ``schema`` when it reads the config."""

    #: The address the kernels listen on.
    ip: str = "127.0.0.1"

    schema: ClassVar[Mapping[str, checks.Checker]] = {"ip": checks.ip}


class _Process(protocol.ProcessProtocol):
    """Keeps the tail of the kernel's stderr and says how it ended."""

    def __init__(self) -> None:
        self.ended: Deferred[ExitStatus] = Deferred()
        self.stderr = b""

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted hook
        """The last 4 kB: why a kernel failed to start."""
        self.stderr = (self.stderr + data)[-4096:]

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted hook
        """Exit code or signal, as egd reports them."""
        self.ended.callback(ExitStatus(getattr(reason.value, "exitCode", None),
                                       getattr(reason.value, "signal", None)))


class ExampleKernel:
    """One kernel process (an :class:`egd.driverapi.LaunchedKernel`)."""

    def __init__(self, process: Any, proto: _Process, connection_info: dict[str, Any], path: str,
                 ports: list[int], allocator: PortAllocator) -> None:
        self._process = process
        self._proto = proto
        self._path = path
        self._ports = ports
        self._allocator = allocator
        self._waiting: list[Deferred[None]] = []
        self.connection_info = connection_info
        self.exited: Deferred[ExitStatus] = Deferred()
        proto.ended.addCallback(self._ended)

    def _ended(self, status: ExitStatus) -> None:
        self.exited.callback(status)
        for waiter in self._waiting:
            waiter.callback(None)

    def describe(self) -> str:
        """Where it runs, for the log."""
        return f"pid {self._process.pid}"

    def failure_detail(self) -> str:
        """What it wrote to stderr last."""
        return self._proto.stderr.decode("utf-8", "replace").strip()

    def signal(self, signum: int) -> Deferred[None]:
        """Deliver ``signum`` to the process (egd interrupts kernels with SIGINT)."""
        if not self.exited.called:
            self._process.signalProcess(signum)
        return succeed(None)

    def kill(self) -> Deferred[None]:
        """SIGKILL; fires once the process has been reaped."""
        if self.exited.called:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._waiting.append(done)
        self._process.signalProcess(signal.SIGKILL)
        return done

    def cleanup(self) -> None:
        """The kernel has ended: free its ports and remove its connection file."""
        self._allocator.release(self._ports)
        if os.path.exists(self._path):
            os.unlink(self._path)

    def persistent_state(self) -> Mapping[str, Any] | None:
        """Nothing: a restarted gateway does not re-attach to these kernels."""
        return None


class ExampleDriver(Service):
    """Launches each kernel as a child process of the gateway (an :class:`egd.driverapi.KernelDriver`)."""

    settings_type = ExampleSettings
    #: Kernels run as egd's own OS user.
    impersonates = False

    def __init__(self, reactor: Any, settings: ExampleSettings, runtime_dir: str,
                 port_range: tuple[int, int] | None) -> None:
        self.name = "example"
        self._reactor = reactor
        self._settings = settings
        self._runtime_dir = runtime_dir
        self._ports = PortAllocator(settings.ip, port_range)

    def startService(self) -> None:  # noqa: N802 - Twisted hook
        """The connection files' directory, private."""
        os.makedirs(self._runtime_dir, mode=0o700, exist_ok=True)
        super().startService()

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Start the kernel; egd then waits for it to answer on its ports (within ``request.timeout``).
        A failure is a failed Deferred (never an exception) carrying an ``egd.errors`` error."""
        try:
            return succeed(self._start(request))
        except OSError as exc:
            return fail(LaunchFailed(f"cannot start kernel {request.kernel_id}: {exc.strerror or exc}"))

    def _start(self, request: LaunchRequest) -> ExampleKernel:
        """Write a connection file with five fresh ports, then run the kernelspec's command line."""
        ports = self._ports.allocate(len(_CHANNELS))
        info: dict[str, Any] = {"transport": "tcp", "ip": self._settings.ip, "key": uuid.uuid4().hex,
                                "signature_scheme": "hmac-sha256", **dict(zip(_CHANNELS, ports, strict=True))}
        path = os.path.join(self._runtime_dir, f"example-{request.kernel_id}.json")
        argv = [arg.replace("{connection_file}", path).replace("{resource_dir}", request.spec.resource_dir)
                for arg in request.spec.argv]
        proto = _Process()
        try:
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
                json.dump(info, handle)
            process = self._reactor.spawnProcess(proto, argv[0], argv, env=dict(request.env),
                                                 path=request.working_dir)
        except OSError:
            self._ports.release(ports)  # leave nothing behind
            if os.path.exists(path):
                os.unlink(path)
            raise
        return ExampleKernel(process, proto, info, path, ports, self._ports)

    def reattach(self, kernel_id: str, state: Mapping[str, Any],
                 connection_info: dict[str, Any]) -> Deferred[LaunchedKernel]:
        """Never called for these kernels (they persist nothing); the contract still asks for it."""
        return fail(LookupError("the example driver does not re-attach to kernels"))
