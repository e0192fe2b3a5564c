"""The ``local`` driver: kernels as processes on the gateway host, started with ``spawnProcess``.

Each kernel starts in a session of its own (``setsid``), so a signal sent to egd's terminal or process group
does not reach it, an interrupt reaches the kernel's whole process group, and (for later persistence) it can
outlive its gateway.

Impersonation (``impersonation: true``, egd running as root): each kernel runs as its user (``KERNEL_USERNAME``),
with that user's uid, primary gid and supplementary groups (Twisted's child calls ``initgroups`` before
``setuid``, so none of root's groups remain), ``HOME``/``USER``/``LOGNAME`` of the user and the user's home as
working directory unless the request names a ``KERNEL_WORKING_DIR`` the user can enter. Root, the uids in
``prohibited_uids``, the names in ``prohibited_users``, users whose primary group is root's and users unknown
to the host are refused with 403, before anything is started. The connection file of such a kernel lives in
a directory of its own under the runtime directory, created by root and handed to the user (both 0700/0600,
owned by the user): only the kernel's user and root can read its key. The runtime directory itself becomes
0711 (others may pass through, not list it), and every directory above it must let others pass.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import sys
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypedDict

from twisted.application.service import Service
from twisted.internet import error, protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from egd import checks
from egd.checks import Checker, Settings, boolean, settings_of, strings, whole_numbers
from egd.driverapi import ExitStatus, IDriverReactor, LaunchedKernel, LaunchRequest
from egd.drivertools import fill_placeholders, impersonated_user
from egd.errors import Forbidden, LaunchFailed, LaunchTimeout
from egd.kernels.ports import PortAllocator, bound_by

log = Logger()

_PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
_STDERR_TAIL_BYTES = 8192
#: Starts of one kernel with fresh ports when another program took one of its reserved ports meanwhile.
_BIND_ATTEMPTS = 3
#: How often a starting kernel's ports are checked (seconds).
_BIND_POLL = 0.05
#: strerror(EADDRINUSE), as a kernel that failed to bind writes it (ZeroMQ, Python and most runtimes).
_ADDRESS_IN_USE = b"Address already in use"
_SETSID = shutil.which("setsid")
#: Capabilities a non-root egd would need to impersonate (bits of CapEff): chown, dac_override, kill, setgid,
#: setuid. Twisted's child calls setuid(0) before switching, so in practice this means root.
_IMPERSONATION_CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}


@dataclass(frozen=True)
class Account:
    """The OS user an impersonated kernel runs as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _lookup_account(name: str) -> Account | None:
    """The user's passwd entry and groups (blocking: NSS may ask a directory server), None if unknown."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def _missing_capabilities() -> list[str]:
    """The capabilities impersonation needs that this process lacks (none when it is root with all of them)."""
    try:
        with open("/proc/self/status") as handle:
            effective = next((int(line.split()[1], 16) for line in handle if line.startswith("CapEff:")), None)
    except (OSError, ValueError):
        effective = None
    if effective is None:  # no /proc: only root will do
        return [] if os.geteuid() == 0 else ["root"]
    return [name for name, bit in _IMPERSONATION_CAPS.items() if not effective >> bit & 1]


def _enterable(path: str, account: Account) -> bool:
    """Whether ``account`` may reach ``path`` as a directory (search permission on it and every parent).

    Mode bits only (ACLs are not consulted), so the answer errs on the side of "no".
    """
    current = "/"
    for part in [p for p in os.path.realpath(path).split("/") if p] + [""]:
        try:
            info = os.stat(current)
        except OSError:
            return False
        if not stat.S_ISDIR(info.st_mode):
            return False
        if info.st_uid == account.uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in account.groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return False
        current = os.path.join(current, part)
    return True


def _others_may_pass(path: str) -> str | None:
    """The first existing directory on the way to ``path`` that others cannot pass through, if any."""
    current = os.path.abspath(path)
    chain = []
    while True:
        chain.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(chain[1:]):  # the runtime directory itself is made 0711 at start
        try:
            mode = os.stat(directory).st_mode
        except OSError:
            return None  # does not exist yet: checked again once startService has created it
        if not mode & stat.S_IXOTH:
            return directory
    return None


def kernel_argv(argv: tuple[str, ...], values: Mapping[str, str]) -> list[str]:
    """The kernelspec's argv with ``{connection_file}``-style placeholders filled (unknown ones kept)."""
    filled = fill_placeholders(argv, values)
    if filled and filled[0] in _PYTHON_NAMES:
        filled[0] = sys.executable  # jupyter_client's rule: "python" means the gateway's interpreter
    return filled


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if it is gone or a zombie: with the pid, it
    names one process for good (pids are reused, start times with them are not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class _Ids(TypedDict, total=False):
    """The user and group a kernel runs as (spawnProcess keywords), none when it runs as egd."""

    uid: int
    gid: int


@implementer(IReadDescriptor)
class _PidWatcher:
    """Calls ``on_exit`` once the process ends, through a pidfd the reactor watches (Linux 5.3+)."""

    def __init__(self, reactor: IReactorFDSet, pid: int, on_exit: Any) -> None:
        self._reactor = reactor
        self._fd = os.pidfd_open(pid)
        self._on_exit = on_exit
        reactor.addReader(self)

    def fileno(self) -> int:
        """The pidfd."""
        return self._fd

    def doRead(self) -> None:  # noqa: N802 - IReadDescriptor
        """Readable: the process has ended."""
        self._reactor.removeReader(self)
        os.close(self._fd)
        self._on_exit()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - IReadDescriptor
        """Removed by the reactor at shutdown: nothing to do."""

    def logPrefix(self) -> str:  # noqa: N802 - ILoggingContext
        """For Twisted's logs."""
        return "pidfd"


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

    #: Its end is seen at once (SIGCHLD, or a pidfd after a restart of egd): egd needs no heartbeat for it.
    observes_exit = True

    def __init__(self, driver: LocalDriver, pid: int, ended: Deferred[ExitStatus], tail: deque[bytes] | None,
                 connection_info: dict[str, Any], connection_file: str, ports: list[int],
                 private_dir: str | None = None, user: str | None = None) -> None:
        self._driver = driver
        self._private_dir = private_dir
        self.user = user
        self._tail = tail
        self.connection_info = connection_info
        self.connection_file = connection_file
        self._ports = ports
        self.pid = pid
        self.start_time = _start_time(pid)
        self.exited: Deferred[ExitStatus] = Deferred()
        self._ended = False
        ended.addCallback(self._on_exit)

    def _on_exit(self, status: ExitStatus) -> ExitStatus:
        self._ended = True
        self.exited.callback(status)
        return status

    @property
    def ports(self) -> list[int]:
        """The ports reserved for this kernel."""
        return list(self._ports)

    @property
    def ended(self) -> bool:
        """Whether the process has ended."""
        return self._ended

    def output_tail(self) -> bytes:
        """The last bytes the kernel wrote (empty for a re-attached kernel)."""
        return b"".join(self._tail or ())

    def describe(self) -> str:
        """The kernel's pid (and its user when impersonated)."""
        return f"pid {self.pid} as {self.user}" if self.user else f"pid {self.pid}"

    def failure_detail(self) -> str:
        """The tail of what the kernel wrote (nothing for a kernel re-attached after a gateway restart)."""
        text = b"".join(self._tail or ()).decode("utf-8", "replace").strip()
        return "\n".join(text.splitlines()[-15:])

    def persistent_state(self) -> dict[str, Any]:
        """What a restarted gateway needs to find this kernel again (see :meth:`LocalDriver.reattach`)."""
        return {"pid": self.pid, "start_time": self.start_time, "connection_file": self.connection_file,
                "ports": list(self._ports), "private_dir": self._private_dir, "user": self.user}

    def signal(self, signum: int) -> Deferred[None]:
        """Signal the kernel's process group (its own session when ``setsid`` exists, else the process)."""
        if not self._ended:
            try:
                if _SETSID:
                    try:
                        os.killpg(self.pid, signum)
                    except ProcessLookupError:
                        # Right after spawn, setsid may not have made the group yet: the process itself.
                        os.kill(self.pid, signum)
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
        if self._private_dir:
            # Owned by the kernel's user, who may have put anything there: rmtree never follows symlinks.
            shutil.rmtree(self._private_dir, ignore_errors=True)
            return
        try:
            os.unlink(self.connection_file)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class LocalSettings(Settings):
    """``drivers.local`` (documented in ``conf/egd.yaml``)."""

    #: The address kernels listen on.
    ip: str = "127.0.0.1"
    #: Run each kernel as its user (egd must be root); root and these uids and users are always refused.
    impersonation: bool = False
    prohibited_uids: tuple[int, ...] = (0,)
    prohibited_users: tuple[str, ...] = ("root",)

    schema: ClassVar[Mapping[str, Checker]] = {
        "ip": checks.ip,  # the module's: the field shadows the name here
        "impersonation": boolean,
        "prohibited_uids": whole_numbers,
        "prohibited_users": strings,
    }


class LocalDriver(Service):
    """Launches kernels as child processes of the gateway."""

    settings_type = LocalSettings

    def __init__(self, reactor: IDriverReactor, settings: LocalSettings | Mapping[str, Any], runtime_dir: str,
                 port_range: tuple[int, int] | None) -> None:
        self.name = "local"
        self.settings = settings = settings_of(LocalSettings, settings, "drivers.local")
        self._reactor = reactor
        self._runtime_dir = runtime_dir
        self.ports = PortAllocator(self.settings.ip, port_range)
        self._prohibited_uids = frozenset({0, *settings.prohibited_uids})
        self._prohibited_users = frozenset({"root", *settings.prohibited_users})
        if self.settings.impersonation:
            missing = _missing_capabilities()
            if missing:
                raise ValueError(f"drivers.local.impersonation needs root: egd runs as uid {os.geteuid()} "
                                 f"without {', '.join(missing)}")
            self._check_reachable()

    def _check_reachable(self) -> None:
        closed = _others_may_pass(self._runtime_dir)
        if closed:
            raise ValueError(f"drivers.local.impersonation: the kernels' users must reach the runtime directory "
                             f"{self._runtime_dir}, but {closed} does not let others pass (chmod o+x, or set "
                             f"kernels.runtime_dir to a directory such as /run/egd)")

    @property
    def impersonates(self) -> bool:
        """Whether kernels run as their users (then a pre-started kernel cannot serve just anyone)."""
        return bool(self.settings.impersonation)

    def startService(self) -> None:  # noqa: N802 - Twisted hook
        """Make sure the runtime directory for connection files exists and is private (0700, also when it
        existed before with a looser mode).

        When impersonating, others may pass through it (0711) to the directory of their own kernel, not list it.
        """
        os.makedirs(self._runtime_dir, mode=0o700, exist_ok=True)
        if self.settings.impersonation:
            self._check_reachable()  # parents makedirs created just now (umask) may be closed
            os.chmod(self._runtime_dir, 0o711)
        else:
            os.chmod(self._runtime_dir, 0o700)
        super().startService()

    def _write_connection_file(self, kernel_id: str, info: dict[str, Any]) -> str:
        """A fresh owner-only file: a stale one (or a link planted in its place) is removed, never written
        through, and an existing file's looser mode is never inherited."""
        path = os.path.join(self._runtime_dir, f"kernel-{kernel_id}.json")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
        return path

    def _write_private_connection_file(self, kernel_id: str, info: dict[str, Any], account: Account) -> str:
        """A fresh directory for this incarnation, with the connection file, both then handed to the user.

        Everything is created by root in a directory the user cannot write to before the directory becomes
        the user's, so no link the user could plant is ever followed.
        """
        directory = os.path.join(self._runtime_dir, f"kernel-{kernel_id}.{uuid.uuid4().hex[:8]}")
        os.mkdir(directory, 0o700)
        try:
            path = os.path.join(directory, f"kernel-{kernel_id}.json")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as handle:
                os.fchown(handle.fileno(), account.uid, account.gid)
                json.dump(info, handle)
            os.chown(directory, account.uid, account.gid)
        except OSError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return path

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Allocate ports, write the connection file, spawn the kernel in its own session (as its user when
        impersonating; a user that may not run kernels here is refused with 403), and wait until it listens on
        its ports. A port another program took since it was reserved (``EADDRINUSE`` in the kernel's output)
        stops that kernel at once; it starts again with fresh ports, up to ``_BIND_ATTEMPTS`` times. Every
        failure releases what the launch took (ports, connection file, process)."""
        return Deferred.fromCoroutine(self._launch(request))

    async def _launch(self, request: LaunchRequest) -> LaunchedKernel:
        account = await self._account(request) if self.settings.impersonation else None
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            kernel = self._spawn(request, account)
            try:
                taken = await self._wait_bound(kernel, request)
            except BaseException:
                await self._abandon(kernel)
                raise
            if not taken:
                return kernel
            log.warn("kernel {kernel_id}: a port was taken between its reservation and the kernel's bind "
                     "(attempt {attempt} of {attempts}, ports {ports}){again}", kernel_id=request.kernel_id,
                     attempt=attempt, attempts=_BIND_ATTEMPTS, ports=kernel.ports,
                     again="; starting it again with fresh ports" if attempt < _BIND_ATTEMPTS else "")
            await self._abandon(kernel)
        raise LaunchFailed(f"the kernel could not bind its ports in {_BIND_ATTEMPTS} attempts: other programs "
                           f"took them (Address already in use)")

    async def _abandon(self, kernel: LocalKernel) -> None:
        """Stop a kernel that will not be handed out, and free what it held."""
        await kernel.kill()
        kernel.cleanup()

    async def _wait_bound(self, kernel: LocalKernel, request: LaunchRequest) -> bool:
        """Until the kernel's processes listen on all its ports (False: bound) or its output says a port was
        taken (True). A kernel that ends, or a host where this cannot be seen, is handed over as it is (the
        kernel manager reports its end with its output); past the launch timeout, :class:`LaunchTimeout`."""
        pool = self._reactor.getThreadPool()
        deadline = self._reactor.seconds() + request.timeout
        request.progress("waiting for the kernel to bind its ports")
        while True:
            if _ADDRESS_IN_USE in kernel.output_tail():
                return True
            if kernel.ended:
                return False
            bound = await deferToThreadPool(self._reactor, pool, bound_by, kernel.pid, kernel.ports)
            if bound is None or bound:
                return False
            if self._reactor.seconds() >= deadline:
                detail = kernel.failure_detail()
                raise LaunchTimeout(f"Kernel {request.kernel_id} ({request.spec.name}) did not become ready within "
                                    f"{request.timeout:g} seconds: it did not listen on its ports"
                                    + (f": {detail}" if detail else ""))
            await deferLater(self._reactor, _BIND_POLL, lambda: None)

    async def _account(self, request: LaunchRequest) -> Account:
        """The account the kernel runs as; :class:`Forbidden` (403) when it may not run kernels here."""
        name = impersonated_user(request.username, self._prohibited_users)
        account = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _lookup_account, name)
        if account is None:
            log.warn("kernel {kernel_id} refused: no user {user} on this host", kernel_id=request.kernel_id,
                     user=name)
            raise Forbidden(f"kernels cannot run as user {name!r} here: no such user on the gateway host")
        why = ("its uid is prohibited" if account.uid in self._prohibited_uids
               else "its primary group is root's" if account.gid == 0 else None)
        if why:
            log.warn("kernel {kernel_id} refused: user {user} (uid {uid}): {why}", kernel_id=request.kernel_id,
                     user=name, uid=account.uid, why=why)
            raise Forbidden(f"kernels cannot run as user {name!r} here")
        return account

    def _spawn(self, request: LaunchRequest, account: Account | None) -> LocalKernel:
        """Reserve ports, write the connection file and start the process. Whatever fails on the way gives back
        all it had taken (ports, connection file) before it is reported as :class:`LaunchFailed`."""
        try:
            ports = self.ports.allocate(5)
        except OSError as exc:
            raise LaunchFailed(str(exc)) from None
        info: dict[str, Any] = {
            "transport": "tcp", "ip": self.settings.ip, "key": uuid.uuid4().hex, "signature_scheme": "hmac-sha256",
            "kernel_name": request.spec.name,
            **dict(zip(("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"), ports, strict=False)),
        }
        connection_file: str | None = None
        private_dir: str | None = None
        try:
            connection_file, private_dir = self._connection_file(request, info, account)
            argv, env, cwd, ids = self._command(request, account, connection_file)
            proto = _KernelProcess(request.kernel_id)
            process = self._start_process(proto, argv, env, cwd, ids)
        except BaseException:
            self._discard(ports, connection_file, private_dir)
            raise
        kernel = LocalKernel(self, process.pid, proto.exited, proto.tail, info, connection_file, ports, private_dir,
                             account.name if account else None)
        log.info("kernel {kernel_id} ({spec}) started as {where}", kernel_id=request.kernel_id,
                 spec=request.spec.name, where=kernel.describe())
        return kernel

    def _connection_file(self, request: LaunchRequest, info: dict[str, Any],
                         account: Account | None) -> tuple[str, str | None]:
        """The kernel's connection file, and the private directory it is in when impersonating."""
        try:
            if account is None:
                return self._write_connection_file(request.kernel_id, info), None
            connection_file = self._write_private_connection_file(request.kernel_id, info, account)
        except OSError as exc:
            raise LaunchFailed(f"cannot write the connection file: {exc.strerror}") from None
        return connection_file, os.path.dirname(connection_file)

    @staticmethod
    def _command(request: LaunchRequest, account: Account | None,
                 connection_file: str) -> tuple[list[str], dict[str, str], str | None, _Ids]:
        """The kernel's argv (in a session of its own), environment, working directory, and uid and gid when
        it runs as its user."""
        argv = kernel_argv(request.spec.argv, {
            "connection_file": connection_file, "kernel_id": request.kernel_id,
            "resource_dir": request.spec.resource_dir, "prefix": sys.prefix,
        })
        if not argv:
            raise LaunchFailed(f"kernelspec {request.spec.name} has an empty argv")
        if _SETSID:
            argv = [_SETSID, *argv]
        env = dict(request.env)
        if account is None:
            cwd = request.working_dir if request.working_dir and os.path.isdir(request.working_dir) else None
            return argv, env, cwd, {}
        env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
        # The child chdirs as root, before it switches user: only a directory the user may enter will do.
        cwd = next((d for d in (request.working_dir, account.home) if d and _enterable(d, account)), "/")
        return argv, env, cwd, {"uid": account.uid, "gid": account.gid}

    def _start_process(self, proto: _KernelProcess, argv: list[str], env: dict[str, str], cwd: str | None,
                       ids: _Ids) -> Any:
        """``spawnProcess``; what it refuses is a :class:`LaunchFailed`."""
        try:
            return self._reactor.spawnProcess(proto, argv[0], argv, env=env, path=cwd, **ids)
        except OSError as exc:
            raise LaunchFailed(f"cannot start {argv[0]}: {exc.strerror}") from None
        except (UnicodeError, ValueError, TypeError) as exc:  # an argument or variable that cannot be encoded
            raise LaunchFailed(f"cannot start the kernel: its command line or environment cannot be passed "
                               f"to a process ({type(exc).__name__})") from None

    def reattach(self, kernel_id: str, state: Mapping[str, Any], connection_info: dict[str, Any]) -> Deferred[Any]:
        """The kernel a previous gateway started, if its process still runs (same pid *and* start time, so a
        reused pid is never mistaken for it); ``LookupError`` otherwise. Its end is noticed through a pidfd
        (it is not this process's child any more, so there is no exit status)."""
        pid = int(state.get("pid") or 0)
        if pid <= 1 or _start_time(pid) is None or _start_time(pid) != state.get("start_time"):
            raise LookupError(f"process {pid} is gone")
        ended: Deferred[ExitStatus] = Deferred()
        try:
            _PidWatcher(self._reactor, pid, lambda: ended.callback(ExitStatus()))
        except OSError as exc:
            raise LookupError(f"cannot watch process {pid}: {exc.strerror}") from None
        ports = [int(p) for p in state.get("ports") or []]
        self.ports.hold(ports)
        kernel = LocalKernel(self, pid, ended, None, connection_info, str(state.get("connection_file") or ""),
                             ports, state.get("private_dir"), state.get("user"))
        log.info("kernel {kernel_id}: re-attached to {where}", kernel_id=kernel_id, where=kernel.describe())
        return succeed(kernel)

    def _discard(self, ports: list[int], connection_file: str | None, private_dir: str | None) -> None:
        """Give back what a launch that failed before its process started had taken."""
        self.ports.release(ports)
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
        elif connection_file:
            try:
                os.unlink(connection_file)
            except FileNotFoundError:
                pass
