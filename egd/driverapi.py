"""The contract between egd and its drivers (``docs/writing-a-driver.rst``).

A driver launches kernels on one kind of resource manager and hands back a :class:`LaunchedKernel`: where
the kernel listens, how to signal and kill it, a Deferred that fires when it has ended, and what to record so
that a restarted gateway can re-attach to it. Drivers know nothing of HTTP or WebSockets. Third-party drivers
register a class under the ``egd.drivers`` entry-point group; :func:`contract_problems` verifies it when it is
loaded (``egd check-config`` and ``egd run``), before anything is started.

This module is a leaf: it imports nothing of egd, so that egd's parts and the drivers both depend on it and it
on neither. What drivers share beyond the contract is the toolkit: :mod:`egd.checks` (settings),
:mod:`egd.drivertools`, :mod:`egd.kernels.ports`, :mod:`egd.remote` (the launcher client) and
``egd.drivers.process``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet, IReactorProcess, IReactorTCP, IReactorThreads, IReactorTime


class IDriverReactor(IReactorTime, IReactorProcess, IReactorTCP, IReactorThreads, IReactorFDSet):
    """The reactor a driver is built with (the ``reactor`` keyword): time (deadlines, polls), processes (the
    kernel or its submitter), TCP (launcher callbacks, REST clients), threads (blocking look-ups) and file
    descriptors (process watchers). ``egd check-config`` builds drivers with None: a constructor only keeps it."""


class KernelSpecView(Protocol):
    """What a driver may read of the kernelspec of a launch (egd's ``KernelSpecInfo`` provides it)."""

    @property
    def name(self) -> str:
        """The kernelspec's name (for messages and application names)."""

    @property
    def argv(self) -> tuple[str, ...]:
        """The kernel's command line, with ``{connection_file}`` and the like not yet substituted."""

    @property
    def resource_dir(self) -> str:
        """The kernelspec's directory (``{resource_dir}`` in ``argv``)."""

    @property
    def env(self) -> Mapping[str, str]:
        """The kernelspec's own ``env`` (already merged into the request's ``env``, which wins)."""

    @property
    def driver_config(self) -> Mapping[str, Any]:
        """This kernelspec's own settings for its driver (``metadata.egd.config``)."""


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a driver needs to start one kernel (read-only)."""

    kernel_id: str
    spec: KernelSpecView
    env: Mapping[str, str]
    username: str
    working_dir: str | None
    timeout: float
    #: Where a driver reports what the launch is waiting for (for example a queue); shown in the kernel model.
    progress: Callable[[str], None] = lambda _: None


@dataclass(frozen=True)
class ExitStatus:
    """How a kernel ended: an exit code, a signal number, or neither when unknown; ``lost`` when its host could
    not be reached (the kernel may even still run there, cut off); ``final`` when its resource manager ended it
    for a reason a restart would not cure (a job cancelled by an operator, out of its time limit, on a failed
    node): egd then declares the kernel dead with ``detail`` instead of restarting it."""

    code: int | None = None
    signal: int | None = None
    lost: bool = False
    final: bool = False
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
    """A kernel a driver has started (or re-attached to).

    Optional: a class attribute ``observes_exit = True`` says that ``exited`` fires the moment the kernel's process
    ends (the local driver watches its children and, after a restart of egd, a pidfd): egd then does not ping the
    kernel's heartbeat, which could tell it nothing more.

    Optional: a handle may define ``shutdown_requested() -> None``, called right after egd sent the kernel its
    ``shutdown_request`` (for launchers that must be told as well, such as Enterprise Gateway's)."""

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

    def persistent_state(self) -> Mapping[str, Any] | None:
        """What a restarted gateway passes to the driver's ``reattach`` to find this kernel again (JSON; secrets
        in it are stored encrypted), or None when the kernel cannot be re-attached to."""


class DriverSettings(Protocol):
    """A driver's settings: a frozen dataclass whose ``schema`` maps each key to an :mod:`egd.checks` checker
    (subclass ``egd.checks.Settings``). egd builds it from ``drivers.<name>`` when it reads the config."""

    schema: ClassVar[Mapping[str, Callable[[Any, str, list[str]], Any]]]

    def problems(self) -> list[str]:
        """``"key: what is wrong"`` for the checks that span several keys."""


@runtime_checkable
class KernelDriver(Protocol):
    """A driver: a Twisted service (``IService``) that launches kernels of the kernelspecs that name it.

    It is built as ``cls(reactor=..., settings=..., runtime_dir=..., port_range=...)`` (see
    :data:`CONSTRUCTOR_KEYWORDS`), with ``settings`` an instance of its ``settings_type``; the constructor
    checks what only the running host can tell (a ``ValueError`` naming the setting) and starts nothing.

    Optional: ``sweep_unknown(known, older_than) -> Deferred[int]``, called once after a restarted gateway has
    re-attached its recorded kernels (only with a state store): remove the driver's kernels that no record knows
    (``known``: the ids of every recorded kernel, of every gateway sharing the store) and that are older than
    ``older_than`` seconds (the longest a launch may take): the launches a crash of egd cut short. Drivers that
    can list their kernels by a label (``kubernetes``, ``docker``) have it.

    Optional: a class attribute ``kernels_apart = True`` says that each kernel runs apart from the others (a
    container or pod of its own), so that kernels cannot read each other's files even when they run as one
    account; users are then apart without impersonation (``egd.tenancy``).

    Optional: ``health() -> Mapping[str, Any]`` for a driver with hosts that can be out (``ssh``):
    ``ready`` (False when the driver can take no work now, and ``/readyz`` is then not ready), ``detail`` (one
    line, shown in ``/readyz`` as ``ok (...)`` even while ready, and on the status page) and ``hosts``
    (``{host: {"up": bool, "failures": int, ...}}``, exported as ``egd_driver_host_up`` and
    ``egd_driver_host_failures_total``); see :func:`egd.metrics.driver_health`.
    """

    name: str
    #: The frozen dataclass of its settings (see :class:`DriverSettings`).
    settings_type: ClassVar[type]

    @property
    def impersonates(self) -> bool:
        """Whether kernels run as their users (then a pre-started kernel cannot serve just anyone)."""

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Start a kernel; fails with ``egd.errors.LaunchFailed`` saying why."""

    def reattach(self, kernel_id: str, state: Mapping[str, Any],
                 connection_info: dict[str, Any]) -> Deferred[LaunchedKernel]:
        """The kernel a previous gateway launched, from what its :meth:`LaunchedKernel.persistent_state` said;
        fails with ``LookupError`` when it is gone (and then leaves nothing of it running)."""

    def startService(self) -> Any:  # noqa: N802 - Twisted's IService
        """Start the driver's own machinery (pollers, pools, listeners)."""

    def stopService(self) -> Any:  # noqa: N802 - Twisted's IService
        """Stop it; kernels are stopped by the kernel manager before this is called."""


#: The keywords a driver class is constructed with.
CONSTRUCTOR_KEYWORDS = ("reactor", "settings", "runtime_dir", "port_range")
#: The methods of the contract and the positional arguments each is called with (besides ``self``).
_METHODS: dict[str, int] = {"launch": 1, "reattach": 3, "startService": 0, "stopService": 0}


def _accepts(function: Any, positional: int = 0, keywords: tuple[str, ...] = ()) -> bool:
    """Whether ``function`` can be called with ``positional`` arguments and ``keywords`` (nothing else)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(*([None] * positional), **dict.fromkeys(keywords))
    except TypeError:
        return False
    return True


def contract_problems(cls: Any) -> list[str]:
    """What ``cls`` (a driver class an entry point names) lacks of the contract; empty when it fits.

    Checked without building it: the constructor's keywords, each method's signature, ``impersonates`` and a
    ``settings_type`` that is a dataclass with a ``schema``. (That it is a Twisted service is checked when built.)
    """
    if not inspect.isclass(cls):
        return [f"{cls!r} is not a class"]
    problems = []
    if not _accepts(cls, keywords=CONSTRUCTOR_KEYWORDS):
        problems.append(f"its constructor does not take the keywords {', '.join(CONSTRUCTOR_KEYWORDS)}")
    for method, positional in _METHODS.items():
        function = getattr(cls, method, None)
        if not callable(function):
            problems.append(f"it has no method {method}")
        elif not _accepts(function, positional + 1):
            problems.append(f"its {method} does not take {positional} argument(s)")
    if not hasattr(cls, "impersonates"):
        problems.append("it does not say whether it impersonates (impersonates)")
    settings_type = getattr(cls, "settings_type", None)
    if not (inspect.isclass(settings_type) and dataclasses.is_dataclass(settings_type)
            and isinstance(getattr(settings_type, "schema", None), Mapping)):
        problems.append("its settings_type is not a dataclass with a schema (see egd.checks.Settings)")
    return problems
