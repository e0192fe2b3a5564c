"""The ``ssh`` driver: kernels on a pool of hosts, started over ssh beside egd's launcher.

Why the ``ssh`` command through ``spawnProcess`` and not an SSH library: it never blocks the reactor, it reads
the operator's ``ssh_config`` (aliases, keys, jump hosts, ControlMaster) exactly as they use it by hand, host
keys are checked by OpenSSH's own rules, and no password or key material passes through egd's memory.

The remote command is an argv, each element quoted for the remote shell; the kernel's environment and the
launch secrets travel on ssh's stdin as JSON, so no client-controlled value is ever parsed by a shell and
``ps`` on the host shows no secret.

Enterprise Gateway's kernelspecs (``DistributedProcessProxy``, whose argv starts EG's own launcher with
``{response_address}``) run unchanged: egd's launcher starts that argv detached (``--exec``), EG's launcher sends its
encrypted connection info to this driver's listener, which takes it only from the host the kernel was started on
(:mod:`egd.egprotocol`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from egd.checks import Checker, boolean, choice, host_names, number, optional, readable_file, settings_of, strings, text
from egd.driverapi import IDriverReactor, LaunchedKernel, LaunchRequest
from egd.drivers.host_health import HostHealth, one_line
from egd.drivers.process import CapturedProcess
from egd.drivertools import LauncherSettings, fill_placeholders, impersonated_user
from egd.egprotocol import EgKernel
from egd.egspecs import check_shell_values, eg_port_range, uses_eg_protocol
from egd.errors import LaunchFailed, LaunchTimeout, ServiceUnavailable
from egd.remote import (
    LaunchListener,
    LaunchRefused,
    Registration,
    RemoteKernel,
    launcher_arguments,
    reattach_remote,
)
from egd.service import AsyncMultiService
from egd.util import shield, wait_for

log = Logger()

#: sun_path's size on Linux: a unix socket's path must be shorter.
_SOCKET_PATH_MAX = 108
#: The name of one shared connection's socket: hex digits of a hash of login and host (``%C`` would be 40).
_SOCKET_NAME_LENGTH = 16
#: ssh binds the master socket as ``<ControlPath>.<16 random characters>`` and renames it into place: the
#: directory's path may be at most this long (with "/", the name, that suffix and the terminating NUL).
_CONTROL_DIR_MAX = _SOCKET_PATH_MAX - 1 - _SOCKET_NAME_LENGTH - 17 - 1
#: What ssh writes when the problem is on egd's side (its control socket), not the host's.
#: (A master that died mid-request, "mux_client_...: read from master failed", is the host's problem: the
#: connection is then made again, directly.)
_LOCAL_SSH_PROBLEMS = ("too long for Unix domain socket", "unix_listener:", "ControlPath too long")
#: Seconds between checks that an EG launcher still runs while egd waits for its report.
_EG_START_PROBE = 1.0
#: An interpreter's file name that is a Python (python, python3, python3.11).
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?\Z")
#: ssh's own exit status when it could not connect or authenticate (not the remote command's).
SSH_FAILED = 255
#: What ssh writes when it reached the host but the login was refused: a problem of that login (an impersonated
#: user without a key there), not of the host, which stays in placement.
_LOGIN_REFUSED = "Permission denied"
#: Characters of a launcher's log that a failed launch's message gets (in one line, as every log entry).
_LOG_TAIL_LIMIT = 1500
#: Seconds a probe of a host that is out may take beyond ssh's connect timeout (a session that hangs).
_PROBE_GRACE = 10


def _whole_seconds(value: Any, path: str, problems: list[str]) -> Any:
    """ssh's ConnectTimeout takes whole seconds: a fraction is rounded up."""
    checked = number(1, 3600)(value, path, problems)
    return None if checked is None else math.ceil(checked)


@dataclass(frozen=True, kw_only=True)
class SshSettings(LauncherSettings):
    """``drivers.ssh`` (documented in ``conf/ssh-pool.yaml``)."""

    hosts: tuple[str, ...]
    placement: str = "round-robin"
    ssh_command: str = "ssh"
    ssh_config: str | None = None
    ssh_options: tuple[str, ...] = ()
    #: Seconds ssh may take to connect (ssh's ConnectTimeout: whole seconds).
    connect_timeout: int = 5
    #: One ssh connection per host, reused by every launch and signal (OpenSSH's ControlMaster): a launch
    #: then costs a channel (milliseconds), not a handshake (hundreds of milliseconds).
    multiplex: bool = True
    #: Where launchers write their logs on the hosts.
    log_dir: str = "/tmp"

    schema: ClassVar[Mapping[str, Checker]] = {
        **LauncherSettings.schema,
        "hosts": host_names,
        "placement": choice("round-robin", "least-connection"),
        "ssh_command": text,
        "ssh_config": optional(readable_file),
        "ssh_options": strings,
        "connect_timeout": _whole_seconds,
        "multiplex": boolean,
        "log_dir": text,
    }


class SshDriver(AsyncMultiService):
    """Launches kernels on ssh hosts, round-robin or on the host with the fewest kernels."""

    settings_type = SshSettings

    def __init__(self, reactor: IDriverReactor, settings: SshSettings | Mapping[str, Any], runtime_dir: str,
                 port_range: tuple[int, int] | None) -> None:
        super().__init__()
        self.name = "ssh"
        self.settings = settings = settings_of(SshSettings, settings, "drivers.ssh")
        self._reactor = reactor
        self._hosts = list(settings.hosts)
        self._ssh_options = list(settings.ssh_options)
        self._control_dir = os.path.join(runtime_dir, "ssh")
        #: Where a directory of our own is made when the runtime directory's path is too long for the sockets.
        self._short_parent: str | None = None
        if self.settings.multiplex and len(os.fsencode(self._control_dir)) > _CONTROL_DIR_MAX:
            self._short_parent = _short_parent(self._control_dir)
        self._prohibited = set(settings.prohibited_users)
        self._port_range = settings.port_range or port_range
        self._next = 0
        self._running: dict[str, str] = {}  # kernel id -> host, for least-connection
        self._logins: set[tuple[str, str | None]] = set()  # (host, login) of every shared connection opened
        #: Hosts that could not be reached are skipped until a probe (as the login that failed) reaches them.
        self._host_health = HostHealth(reactor, lambda host: Deferred.fromCoroutine(self._probe(host)), "ssh host")
        self._probe_logins: dict[str, str | None] = {}
        self.listener = LaunchListener(reactor, settings.callback_host, settings.callback_port)
        self.listener.setServiceParent(self)

    # -- placement ----------------------------------------------------------------------------------------

    def _candidates(self, request: LaunchRequest) -> list[str]:
        """The hosts to try, in order, leaving out those that are out; ``ServiceUnavailable`` when all are out.

        Failing fast then, rather than trying the host that failed longest ago: each try of a host that is down
        costs the client ``connect_timeout`` seconds only to fail again, while the probes notice a host's return
        within :data:`~egd.drivers.host_health.MAX_RETRY` seconds without making anyone wait; and the 503 names
        every host and why, which is what the operator needs to act."""
        config = request.spec.driver_config
        # EG's process_proxy.config names them remote_hosts, a comma-separated string (or a list)
        hosts = config.get("hosts") or config.get("remote_hosts") or self._hosts
        if isinstance(hosts, str):
            hosts = [h.strip() for h in hosts.split(",") if h.strip()]
        everyone = [str(h) for h in hosts]
        hosts = self._host_health.usable(everyone)
        if not hosts:
            raise ServiceUnavailable(f"no ssh host is up: {self._host_health.describe_out(everyone)}")
        if self.settings.placement == "least-connection":
            load = {h: 0 for h in hosts}
            for host in self._running.values():
                if host in load:
                    load[host] += 1
            return sorted(hosts, key=lambda h: (load[h], hosts.index(h)))
        start = self._next % len(hosts)
        self._next += 1
        return hosts[start:] + hosts[:start]

    # -- ssh ------------------------------------------------------------------------------------------------

    def _login(self, request: LaunchRequest | None) -> str | None:
        """The remote user: the kernel's user when impersonating (checked), else the configured one."""
        if request is None or not self.settings.impersonation:
            return str(self.settings.user) if self.settings.user else None
        return impersonated_user(request.username, self._prohibited)

    def _ssh_argv(self, host: str, remote: list[str], login: str | None = None) -> list[str]:
        argv = [self.settings.ssh_command]
        if self.settings.ssh_config:
            argv += ["-F", str(self.settings.ssh_config)]
        argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.settings.connect_timeout}",
                 "-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=2"]
        if self.settings.multiplex:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control_path(host, login)}",
                     "-o", "ControlPersist=300"]
        for option in self._ssh_options:
            argv += ["-o", option]
        login = login or (str(self.settings.user) if self.settings.user else None)
        if login:
            argv += ["-l", login]
        return [*argv, "--", host, " ".join(shlex.quote(part) for part in remote)]

    def _control_path(self, host: str, login: str | None) -> str:
        """The shared connection's socket for ``host`` as ``login``: short whatever the host name, login and
        directory (ssh's own ``%C`` is 40 characters, and ssh needs 17 more while it binds)."""
        name = hashlib.sha256(f"{login or ''}@{host}".encode()).hexdigest()[:_SOCKET_NAME_LENGTH]
        return os.path.join(self._control_dir, name).replace("%", "%%")  # ssh expands %-tokens in ControlPath

    def _spawn_ssh(self, host: str, remote: list[str], stdin: bytes | None = None,
                   login: str | None = None) -> CapturedProcess:
        proto = CapturedProcess(stdin)
        self._logins.add((host, login))
        argv = self._ssh_argv(host, remote, login)
        self._reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ))
        return proto

    async def _run_ssh(self, host: str, remote: list[str], stdin: bytes | None = None,
                       login: str | None = None) -> tuple[int, CapturedProcess]:
        proto = self._spawn_ssh(host, remote, stdin, login)
        code = await proto.ended
        self._observe(host, login, code, proto)
        return code, proto

    def _observe(self, host: str, login: str | None, code: int, proc: CapturedProcess) -> None:
        """What an ssh run says of ``host``: reached (whatever the remote command did), or out when ssh could not
        connect. A refused login, or a problem of the gateway's own side, says nothing of the host."""
        if code < 0:  # killed (a probe or launch abandoned): it tells nothing
            return
        stderr = proc.stderr()
        if _unreachable(code, stderr):
            self._probe_logins[host] = login
            self._host_health.failed(host, stderr or "ssh failed")
        elif not _local_problem(stderr):
            self._host_health.succeeded(host)

    async def _probe(self, host: str) -> str | None:
        """Reach ``host`` once (ssh ``true``, as the login that last failed there): None when ssh got there
        (a refused login included: the host answers) or failed on the gateway's side (which says nothing of the
        host, and which the next launch reports as such), else why not, in one line."""
        proc = self._spawn_ssh(host, ["true"], login=self._probe_logins.get(host))
        limit = self.settings.connect_timeout + _PROBE_GRACE
        # False too when the driver stops (the probe is cancelled): the ssh is killed either way
        if not await wait_for(proc.ended, limit, self._reactor):
            with contextlib.suppress(Exception):  # it may have ended meanwhile
                proc.transport.signalProcess("KILL")
            return f"the probe did not finish within {limit}s"
        code = await proc.ended
        stderr = proc.stderr()
        return (one_line(stderr) or "ssh failed") if _unreachable(code, stderr) else None

    def _kernel_argv(self, request: LaunchRequest, public_key: str = "") -> list[str]:
        """The kernelspec's argv with the placeholders egd fills on the gateway (``{connection_file}`` is the
        launcher's, on the host), and ``python`` meaning the hosts' Python."""
        callback = self.listener.address
        argv = fill_placeholders(request.spec.argv, {
            "kernel_id": request.kernel_id, "resource_dir": request.spec.resource_dir,
            "response_address": f"{callback[0]}:{callback[1]}", "public_key": public_key,
            "port_range": eg_port_range(self._spec_port_range(request)),
        })
        if argv and argv[0] in ("python", "python3"):
            argv[0] = self._python(request)
        return argv

    def _python(self, request: LaunchRequest) -> str:
        """The Python that runs the launcher on the host: the configured one, else the kernelspec's own when it
        names one by absolute path (a Python kernel's interpreter), else egd's."""
        argv = request.spec.argv
        if self.settings.python:
            return str(self.settings.python)
        own = argv[0] if argv and os.path.isabs(argv[0]) and _PYTHON.match(os.path.basename(argv[0])) else None
        return own or sys.executable

    def _spec_port_range(self, request: LaunchRequest) -> tuple[int, int] | None:
        """The kernelspec's own ``port_range`` (EG's ``process_proxy.config``), else the driver's."""
        own = request.spec.driver_config.get("port_range")
        if isinstance(own, str) and own not in ("", "0..0"):
            low, _, high = own.partition("..")
            return int(low), int(high)
        return self._port_range

    def _remote_command(self, request: LaunchRequest, callback: tuple[str, int], public_key: str = "") -> list[str]:
        argv = self._kernel_argv(request, public_key)
        python = self._python(request)
        if public_key:  # EG's launcher reports by itself: egd's launcher only starts it, detached
            options = ["--exec", "--kernel-id", request.kernel_id, "--callback", f"{callback[0]}:{callback[1]}",
                       "--log-dir", self.settings.log_dir]
            if request.working_dir:
                options += ["--working-dir", request.working_dir]
            return ["exec", python, self.settings.launcher_path, *options, "--", *argv]
        return ["exec", python, self.settings.launcher_path,
                *launcher_arguments(request, callback, self._spec_port_range(request), argv,
                                    "--log-dir", self.settings.log_dir)]

    @property
    def impersonates(self) -> bool:
        """Whether kernels run as their users (then a pre-started kernel cannot serve just anyone)."""
        return bool(self.settings.impersonation)

    def startService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Create the private directory of the shared ssh connections: under the runtime directory when its path
        leaves room for the sockets (a unix socket's path is limited to 107 bytes, and ssh binds at a longer
        temporary name first), else a fresh private directory in the temporary directory or /tmp. A host where
        none fits is a configuration error that names the limit, not an unreachable host at every launch."""
        if self.settings.multiplex:
            if self._short_parent is not None:
                self._control_dir = tempfile.mkdtemp(prefix="egd-ssh-", dir=self._short_parent)
            os.makedirs(self._control_dir, mode=0o700, exist_ok=True)
            os.chmod(self._control_dir, 0o700)
        self._host_health.start()
        self._host_health.check(self._hosts)
        return super().startService()

    def health(self) -> dict[str, Any]:
        """The optional health hook of a driver (``/readyz``, ``/metrics``): ready while at least one of the
        configured hosts is up; ``detail`` names the hosts that are out, why, and when each is probed next;
        ``hosts`` has each host's state (``up``, ``failures``, and while out ``reason``, ``out_for``,
        ``next_probe_in``), kernelspecs' own hosts included once they were tried."""
        hosts = self._host_health.report(self._hosts)
        up = self._host_health.usable(self._hosts)
        detail = self._host_health.describe_out()
        return {"ready": bool(up), "detail": detail, "hosts": hosts}

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Stop probing the hosts that are out, close the shared ssh connections, then stop the launch listener."""
        self._host_health.stop()

        async def stop() -> None:
            if self.settings.multiplex:
                # One shared connection per host and login (impersonated kernels log in as their users).
                for host, login in {*((h, None) for h in self._hosts), *self._logins}:
                    argv = [*self._ssh_argv(host, [], login)[:-3], "-O", "exit", host]
                    proto = CapturedProcess(None)
                    self._reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ))
                    proto.ended.addTimeout(5, self._reactor)
                    try:
                        await proto.ended
                    except Exception:
                        log.warn("could not close the shared ssh connection to {host}", host=host)
                if self._short_parent is not None:
                    shutil.rmtree(self._control_dir, ignore_errors=True)
            await maybeDeferred(super(SshDriver, self).stopService)

        return Deferred.fromCoroutine(stop())

    # -- launching --------------------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Try the hosts in placement order; the first that starts the kernel wins."""
        return Deferred.fromCoroutine(self._launch(request))

    async def _launch(self, request: LaunchRequest) -> LaunchedKernel:
        tried: list[str] = []
        kernel: RemoteKernel | EgKernel | None
        login = self._login(request)
        eg = uses_eg_protocol(request.spec.argv)
        for host in self._candidates(request):
            registration = self.listener.register(request.kernel_id, eg=eg)
            try:
                launch = self._launch_eg_on if eg else self._launch_on
                kernel = await launch(request, host, login, registration, tried)
            except BaseException:
                self.listener.unregister(registration)
                raise
            if kernel is not None:
                self._running[request.kernel_id] = host
                return kernel
            self.listener.unregister(registration)
        raise LaunchFailed("no ssh host could start the kernel: " + "; ".join(tried))

    def _secrets_line(self, request: LaunchRequest, registration: Registration, key: str) -> bytes:
        """What the launcher reads on its stdin: the launch secret, the kernel's key and environment."""
        env = dict(request.env)
        if self.settings.impersonation:  # the login's own HOME, USER and LOGNAME, not those of egd's environment
            for name in ("HOME", "USER", "LOGNAME"):
                env.pop(name, None)
        return json.dumps({"secret": registration.secret.decode(), "key": key, "env": env}).encode() + b"\n"

    async def _start_on(self, request: LaunchRequest, host: str, login: str | None, registration: Registration,
                        tried: list[str], key: str, public_key: str = "") -> tuple[dict[str, Any], str] | None:
        """Run the launcher on ``host``: what it printed when it detached and ssh's stderr; None when ssh cannot
        reach the host (why is appended to ``tried``); ``LaunchFailed`` when the launcher failed there."""
        remote = self._remote_command(request, self.listener.address, public_key)
        proc = self._spawn_ssh(host, remote, self._secrets_line(request, registration, key), login)
        try:
            code = await shield(proc.ended)
        except CancelledError:
            # The launch is abandoned (the gateway stops) while ssh starts the launcher: once it has, stop it.
            if await wait_for(proc.ended, self.settings.connect_timeout + 10, self._reactor):
                await self._kill_launcher(host, _parse_started(proc).get("launcher_pid"), login)
            raise
        stderr = one_line(proc.stderr())
        if code == SSH_FAILED and _local_problem(stderr):
            log.error("kernel {kernel_id}: ssh failed on this gateway's side, not {host}'s: {why}",
                      kernel_id=request.kernel_id, host=host, why=stderr)
            raise LaunchFailed(f"ssh could not set up its shared connection on the gateway (a local problem, "
                               f"not host {host}): {stderr}")
        self._observe(host, login, code, proc)
        if code == SSH_FAILED:
            why = stderr or "ssh failed"
            log.warn("kernel {kernel_id}: host {host} unreachable, trying the next one: {why}",
                     kernel_id=request.kernel_id, host=host, why=why)
            tried.append(f"{host}: {why}")
            return None
        if code != 0:
            raise LaunchFailed(f"the launcher on {host} exited with code {code}: {stderr or 'no output'}")
        started = _parse_started(proc)
        log.info("kernel {kernel_id}: launcher started on {host} (pid {pid})", kernel_id=request.kernel_id,
                 host=host, pid=started.get("launcher_pid"))
        return started, stderr

    async def _launch_on(self, request: LaunchRequest, host: str, login: str | None, registration: Registration,
                         tried: list[str]) -> RemoteKernel | None:
        """The kernel started on ``host``; None when ssh cannot reach the host (why is appended to ``tried``);
        ``LaunchFailed`` or ``LaunchTimeout`` when it was reached but the kernel did not start."""
        key = uuid.uuid4().hex
        result = await self._start_on(request, host, login, registration, tried, key)
        if result is None:
            return None
        started, stderr = result
        info = await self._await_report(request, host, login, registration, started)
        kernel = RemoteKernel(self._reactor, registration, info, key, host, self._forget, self._force_kill)
        kernel.login = login
        kernel.detail = stderr
        return kernel

    async def _launch_eg_on(self, request: LaunchRequest, host: str, login: str | None, registration: Registration,
                            tried: list[str]) -> EgKernel | None:
        """An EG kernelspec's kernel started on ``host``: EG's launcher reports to the listener, which takes its
        payload only from the address the host reaches egd from (as egd's launcher found it)."""
        check_shell_values(request.spec.name, request.spec.env, request.env)
        public_key = (await self.listener.eg_key()).public_text
        result = await self._start_on(request, host, login, registration, tried, "", public_key)
        if result is None:
            return None
        started, stderr = result
        address = started.get("ip")
        registration.expect_peers(frozenset({str(address)}) if address else frozenset())
        # EG's launcher reports nothing when it fails: fail fast when its process group is gone before it reported
        watching = Deferred.fromCoroutine(self._watch_eg_start(host, login, started.get("launcher_pid"), registration))
        watching.addErrback(lambda f: log.failure("kernel {kernel_id}: watching EG's launcher failed", f,
                                                  kernel_id=request.kernel_id))
        info = await self._await_report(request, host, login, registration, started)
        self.listener.unregister(registration)  # nothing more comes from an EG launcher
        info.setdefault("pgid", started.get("launcher_pid"))
        kernel = EgKernel(self._reactor, request.kernel_id, info, host, self._forget_eg, self._force_kill_eg)
        kernel.login = login
        kernel.detail = stderr
        return kernel

    async def _watch_eg_start(self, host: str, login: str | None, pid: Any, registration: Registration) -> None:
        """Until EG's launcher has reported: every :data:`_EG_START_PROBE` seconds, whether its process group
        (the command egd's launcher became) still exists on the host; when it is gone, the launch fails at once."""
        if not isinstance(pid, int) or pid <= 1:
            return
        while not registration.ready.called:
            await deferLater(self._reactor, _EG_START_PROBE, lambda: None)
            if registration.ready.called:
                return
            code, _ = await self._run_ssh(host, ["sh", "-c", 'kill -0 "-$1" 2>/dev/null', "sh", str(pid)],
                                          login=login)
            if code == 1 and not registration.ready.called:
                registration.ready.errback(LaunchRefused("EG's launcher exited before it reported"))

    async def _await_report(self, request: LaunchRequest, host: str, login: str | None,
                            registration: Registration, started: Mapping[str, Any]) -> dict[str, Any]:
        """The launcher's connection info; on a timeout the launcher is killed and its log's tail reported."""
        waiter = registration.ready
        waiter.addTimeout(request.timeout, self._reactor)
        try:
            return await waiter
        except LaunchRefused as exc:
            detail = await self._log_tail(host, str(started.get("log", "")), login) if registration.eg else ""
            raise LaunchFailed(f"the kernel failed to start on {host}: {exc}" + (f": {detail}" if detail else "")
                               ) from None
        except Exception:
            self.listener.unregister(registration)
            await self._kill_launcher(host, started.get("launcher_pid"), login)
            detail = await self._log_tail(host, str(started.get("log", "")), login)
            raise LaunchTimeout(f"the launcher on {host} did not report within {request.timeout:g} seconds"
                                + (f": {detail}" if detail else "")) from None

    def reattach(self, kernel_id: str, state: Mapping[str, Any], connection_info: dict[str, Any]) -> Deferred[Any]:
        """The kernel a previous gateway started on a host, if its launcher still answers (signed ping) and
        says the kernel is alive (an EG launcher: if its comm port still takes requests); ``LookupError``
        otherwise."""
        async def reattach() -> RemoteKernel | EgKernel:
            kernel: RemoteKernel | EgKernel
            if state.get("protocol") == "eg":
                kernel = await EgKernel.reattached(self._reactor, kernel_id, state, str(state["where"]),
                                                   self._forget_eg, self._force_kill_eg)
            else:
                kernel = await reattach_remote(self._reactor, self.listener, kernel_id, state,
                                               str(connection_info["key"]), self._forget, self._force_kill)
            self._running[kernel_id] = kernel.where
            log.info("kernel {kernel_id}: re-attached to {where}", kernel_id=kernel_id, where=kernel.describe())
            return kernel

        return Deferred.fromCoroutine(reattach())

    def _forget_eg(self, kernel: EgKernel) -> None:
        self._running.pop(kernel.kernel_id, None)

    async def _force_kill_eg(self, kernel: EgKernel) -> None:
        """SIGKILL to the EG launcher's process group (its kernel, and its comm-port listener); EG's launcher
        removes its connection file (with the kernel's key) only when the kernel ends normally, so egd does."""
        await self._kill_group(kernel.where, kernel.login, kernel.info.get("pgid"), kernel.kernel_id)

    def _forget(self, kernel: RemoteKernel) -> None:
        self.listener.unregister(kernel.registration)
        self._running.pop(kernel.registration.kernel_id, None)

    async def _force_kill(self, kernel: RemoteKernel) -> None:
        await self._kill_group(kernel.where, kernel.login, kernel.info.get("pid"))

    async def _kill_group(self, host: str, login: str | None, pgid: Any, eg_kernel_id: str = "") -> None:
        """SIGKILL to process group ``pgid`` on ``host`` (gone already is fine); with ``eg_kernel_id``, also EG's
        leftover connection file of that kernel. ``ConnectionError`` when ssh cannot reach the host."""
        if not isinstance(pgid, int) or pgid <= 1:
            raise LaunchFailed("no process group to kill")
        script = 'kill -9 "-$1" 2>/dev/null; [ -z "$2" ] || rm -f -- "${TMPDIR:-/tmp}/kernel-$2_"*.json; exit 0'
        code, proc = await self._run_ssh(host, ["sh", "-c", script, "sh", str(pgid), eg_kernel_id], login=login)
        if code == SSH_FAILED:
            raise ConnectionError(one_line(proc.stderr()) or "ssh failed")

    async def _kill_launcher(self, host: str, pid: Any, login: str | None) -> None:
        if isinstance(pid, int) and pid > 1:
            await self._run_ssh(host, ["kill", f"-{signal.SIGTERM}", "--", f"-{pid}"], login=login)

    async def _log_tail(self, host: str, path: str, login: str | None) -> str:
        if not path:
            return ""
        code, proc = await self._run_ssh(host, ["tail", "-n", "15", "--", path], login=login)
        return one_line(proc.stdout(), _LOG_TAIL_LIMIT) if code == 0 else ""


def _unreachable(code: int, stderr: str) -> bool:
    """Whether an ssh run that ended with ``code`` did not reach its host: ssh's own failure, other than a refused
    login (the host answered; the login is the problem) or a problem on the gateway's side (its shared
    connection's socket: that says nothing of the host)."""
    return code == SSH_FAILED and _LOGIN_REFUSED not in stderr and not _local_problem(stderr)


def _local_problem(stderr: str) -> bool:
    """Whether ssh failed on the gateway's own side (it could not make its shared connection's socket)."""
    return any(problem in stderr for problem in _LOCAL_SSH_PROBLEMS)


def _short_parent(control_dir: str) -> str:
    """A directory short enough to hold the shared connections' sockets (``ValueError`` naming the limit if
    neither the temporary directory nor /tmp is)."""
    for parent in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        # mkdtemp adds "/egd-ssh-" and 8 characters
        if len(os.fsencode(parent)) + 17 <= _CONTROL_DIR_MAX and os.path.isdir(parent):
            return parent
    raise ValueError(f"drivers.ssh.multiplex: no directory for the shared ssh connections' sockets has a path of "
                     f"at most {_CONTROL_DIR_MAX} bytes ({control_dir} and the temporary directory are too long): "
                     f"set kernels.runtime_dir or TMPDIR to a shorter path, or multiplex: false")


def _parse_started(proc: CapturedProcess) -> dict[str, Any]:
    for line in reversed(proc.stdout().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return {}
