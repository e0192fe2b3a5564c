"""The contract between egd and its drivers.

A driver launches kernels on one kind of resource manager and hands back an :class:`ILaunchedKernel`: where
the kernel listens, how to signal and kill it, and a Deferred that fires when it has ended. Drivers know
nothing of HTTP or WebSockets. Third-party drivers register under the ``egd.drivers`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from egd.kernels.specs import KernelSpecInfo


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a driver needs to start one kernel."""

    kernel_id: str
    spec: KernelSpecInfo
    env: Mapping[str, str]
    username: str
    working_dir: str | None
    timeout: float


@dataclass(frozen=True)
class ExitStatus:
    """How a kernel ended: an exit code, a signal number, or neither when unknown."""

    code: int | None = None
    signal: int | None = None

    def describe(self) -> str:
        """Human words for the log and for error messages."""
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        if self.code is not None:
            return f"exited with code {self.code}"
        return "ended"


class ILaunchedKernel(Interface):
    """A kernel a driver has started."""

    connection_info = Attribute("dict: transport, ip, the five ports, key and signature_scheme")
    exited = Attribute("Deferred firing with an ExitStatus when the kernel has ended, whoever ended it")

    def describe() -> str:
        """Where the kernel runs, for logs (for example ``pid 4242`` or ``host-a pid 77``)."""

    def failure_detail() -> str:
        """The last lines the kernel or its launcher wrote to stderr (why a launch failed)."""

    def signal(signum: int) -> Deferred[None]:
        """Deliver ``signum`` to the kernel (its whole process group where the driver can)."""

    def kill() -> Deferred[None]:
        """End the kernel forcefully; fires once it is gone."""

    def cleanup() -> None:
        """Release what the launch held (ports, files). Called once, after the kernel has ended."""


class IKernelDriver(IService):  # type: ignore[misc]
    """A Twisted service that launches kernels of the kernelspecs that name it."""

    def launch(request: LaunchRequest) -> Deferred[ILaunchedKernel]:
        """Start a kernel; fails with ``egd.errors.LaunchFailed`` saying why."""


def driver_settings(settings: Mapping[str, Any], key: str, default: Any) -> Any:
    """A driver's setting from its YAML section, or ``default``."""
    return settings.get(key, default)
