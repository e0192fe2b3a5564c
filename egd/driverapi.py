"""The contract between egd and its drivers.

A driver launches kernels on one kind of resource manager and hands back a :class:`LaunchedKernel`: where
the kernel listens, how to signal and kill it, and a Deferred that fires when it has ended. Drivers know
nothing of HTTP or WebSockets. Third-party drivers register under the ``egd.drivers`` entry-point group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred

from egd.errors import Forbidden
from egd.kernels.specs import KernelSpecInfo

#: A user name a driver may log in or submit as when impersonating (POSIX portable, no leading dash or digit).
_LOGIN_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\Z")


def check_settings(driver: str, settings: Mapping[str, Any], known: frozenset[str]) -> None:
    """``ValueError`` naming the settings of ``drivers.<driver>`` that the driver does not know (typos)."""
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"drivers.{driver}: unknown setting(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(known))})")


def port_range_setting(settings: Mapping[str, Any], default: tuple[int, int] | None) -> tuple[int, int] | None:
    """A driver's own ``port_range`` ("LOW..HIGH"), else the gateway's ``kernels.port_range``."""
    if not settings.get("port_range"):
        return default
    low, _, high = str(settings["port_range"]).partition("..")
    return int(low), int(high)


def impersonated_user(username: str, prohibited: frozenset[str] | set[str] = frozenset({"root"})) -> str:
    """``username`` if a kernel may run as that user; :class:`Forbidden` (403) otherwise."""
    if not _LOGIN_NAME.match(username) or username in prohibited or username == "root":
        raise Forbidden(f"kernels cannot run as user {username[:40]!r} here")
    return username


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a driver needs to start one kernel."""

    kernel_id: str
    spec: KernelSpecInfo
    env: Mapping[str, str]
    username: str
    working_dir: str | None
    timeout: float
    #: Where a driver reports what the launch is waiting for (for example a queue); shown in the kernel model.
    progress: Callable[[str], None] = lambda _: None


@dataclass(frozen=True)
class ExitStatus:
    """How a kernel ended: an exit code, a signal number, or neither when unknown; ``lost`` when its host could
    not be reached (the kernel may even still run there, cut off)."""

    code: int | None = None
    signal: int | None = None
    lost: bool = False
    #: What the resource manager said about the end (for example YARN's diagnostics).
    detail: str = ""

    def describe(self) -> str:
        """Human words for the log and for error messages."""
        if self.lost:
            how = "was lost with its host"
        elif self.signal is not None:
            how = f"killed by signal {self.signal}"
        elif self.code is not None:
            how = f"exited with code {self.code}"
        else:
            how = "ended"
        return f"{how} ({self.detail})" if self.detail else how


@runtime_checkable
class LaunchedKernel(Protocol):
    """A kernel a driver has started."""

    #: transport, ip, the five ports, key and signature_scheme.
    connection_info: dict[str, Any]
    #: Fires with an :class:`ExitStatus` when the kernel has ended, whoever ended it.
    exited: Deferred[ExitStatus]

    def describe(self) -> str:
        """Where the kernel runs, for logs (for example ``pid 4242`` or ``host-a pid 77``)."""

    def failure_detail(self) -> str:
        """The last lines the kernel or its launcher wrote to stderr (why a launch failed)."""

    def signal(self, signum: int) -> Deferred[None]:
        """Deliver ``signum`` to the kernel (its whole process group where the driver can); fails (an
        ``egd.errors.EgdError``, such as ``ServiceUnavailable``) when it could not be delivered."""

    def kill(self) -> Deferred[None]:
        """End the kernel forcefully; fires once it is gone."""

    def cleanup(self) -> None:
        """Release what the launch held (ports, files). Called once, after the kernel has ended."""


@runtime_checkable
class KernelDriver(Protocol):
    """A driver: a Twisted service (``IService``) that launches kernels of the kernelspecs that name it."""

    name: str

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Start a kernel; fails with ``egd.errors.LaunchFailed`` saying why."""

    def startService(self) -> Any:  # noqa: N802 - Twisted's IService
        """Start the driver's own machinery (pollers, pools, listeners)."""

    def stopService(self) -> Any:  # noqa: N802 - Twisted's IService
        """Stop it; kernels are stopped by the kernel manager before this is called."""
