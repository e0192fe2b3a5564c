"""The ``slurm`` driver: each kernel is a batch job on a Slurm cluster, inside the allocation its user asks for.

The job's script runs egd's launcher in the foreground (the job lives as long as the kernel); the launcher starts
the kernel on the node Slurm chose and reports its ports back over the authenticated launcher protocol
(``docs/launcher-protocol.rst``), as on the other drivers. The launch secrets travel inside the script, on the
launcher's stdin from a quoted here-document: never on a command line, readable only by the job's owner and
Slurm's administrators.

Slurm is reached through slurmrestd (``mode: rest``, JWT) or its commands (``mode: cli``; :mod:`.slurm_api`).
One listing of the jobs per interval watches every kernel (:mod:`.slurm_watch`): while a job is PENDING its
kernel's progress shows Slurm's reason; at the launch timeout the job is cancelled and the start fails (503)
with that reason. A job ended from outside (``scancel``, its time limit, a failed node) ends its kernel within
an interval. A shutdown goes through the launcher, then the job is cancelled; nothing is left in ``squeue``.

Resources come from the request's ``KERNEL_*`` variables, each within what the kernelspec allows
(:func:`job_resources`); kernels run as their users (``impersonation``), never as root.
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
import re
import shlex
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from egd.checks import Checker, choice, optional, seconds, settings_of, string_map, text
from egd.driverapi import ExitStatus, IDriverReactor, LaunchedKernel, LaunchRequest
from egd.drivers.polling import PollingDriver
from egd.drivers.slurm_api import (
    CliSlurm,
    JobRequest,
    RestSlurm,
    SlurmClient,
    SlurmError,
    SlurmJob,
    SlurmUnavailable,
)
from egd.drivers.slurm_watch import JobWatch, JobWatcher
from egd.drivertools import LauncherSettings, impersonated_user, parse_memory_mb, positive_int
from egd.errors import BadRequest, Forbidden, LaunchFailed, LaunchTimeout, ServiceUnavailable
from egd.remote import LaunchListener, Registration, RemoteKernel, await_report, launcher_arguments, reattach_remote
from egd.util import wait_for

log = Logger()

#: Partition, account, QOS and constraint names a request may carry (then checked against the kernelspec's lists).
_NAME = re.compile(r"^[A-Za-z0-9_.:+-]{1,128}\Z")
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.:|&*\[\]-]{1,256}\Z")
#: Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(?:(\d{1,3})-)?(\d{1,5})(?::(\d{1,2}))?(?::(\d{1,2}))?\Z")
_GPU_TYPE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


def parse_time_limit(value: str, what: str) -> int:
    """A Slurm time limit (``"90"`` minutes, ``"1:30:00"``, ``"2-00:00"``...) in whole minutes, rounded up as
    Slurm does; :class:`BadRequest` naming ``what`` otherwise."""
    match = _TIME.match(value.strip())
    if not match:
        raise BadRequest(f"{what} must be a Slurm time limit such as 60, 1:30:00 or 2-00:00:00")
    days, first, second, third = match.groups()
    parts = [int(p) for p in (first, second, third) if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        seconds_ = int(days) * 86400 + parts[0] * 3600 + (parts[1] * 60 if len(parts) > 1 else 0) + \
            (parts[2] if len(parts) > 2 else 0)
    elif len(parts) == 1:  # minutes
        seconds_ = parts[0] * 60
    elif len(parts) == 2:  # MM:SS
        seconds_ = parts[0] * 60 + parts[1]
    else:  # HH:MM:SS
        seconds_ = parts[0] * 3600 + parts[1] * 60 + parts[2]
    minutes = -(-seconds_ // 60)
    if minutes < 1:
        raise BadRequest(f"{what} must be at least one minute")
    return minutes


@dataclass(frozen=True)
class Resources:
    """What one kernel's job asks Slurm for, checked against its kernelspec."""

    partition: str | None
    account: str | None
    qos: str | None
    time_limit: int
    cpus: int
    memory_mb: int
    gpus: int
    gpu_type: str | None
    nodes: int
    constraint: str | None

    @property
    def gres(self) -> str | None:
        """``gpu:N`` or ``gpu:TYPE:N``; None without GPUs."""
        if not self.gpus:
            return None
        return f"gpu:{self.gpu_type}:{self.gpus}" if self.gpu_type else f"gpu:{self.gpus}"


def _choose(env: Mapping[str, str], name: str, allowed: list[str], default: str | None, what: str) -> str | None:
    """The value of ``name``: one of ``allowed`` (empty: only the default), else the default."""
    value = env.get(name)
    if not value:
        return default
    if not _NAME.match(value) or value not in allowed:
        offered = ", ".join(allowed) if allowed else f"none (this kernelspec sets the {what})"
        raise BadRequest(f"{name} must be one of the {what}s this kernelspec allows: {offered}")
    return value


def job_resources(env: Mapping[str, str], config: Mapping[str, Any], default_partition: str | None) -> Resources:
    """The resources of a kernel's job: its ``KERNEL_*`` requests within what the kernelspec allows.

    Requests: ``KERNEL_PARTITION``, ``KERNEL_ACCOUNT``, ``KERNEL_QOS`` (each one of the spec's ``partitions``,
    ``accounts``, ``qos`` lists, whose first entry is the default), ``KERNEL_TIME_LIMIT`` (up to
    ``max_time_limit``), ``KERNEL_CPUS``, ``KERNEL_MEMORY``, ``KERNEL_GPUS``, ``KERNEL_NODES`` (up to
    ``max_cpus``, ``max_memory``, ``max_gpus``, ``max_nodes``) and ``KERNEL_CONSTRAINT`` (one of
    ``constraints``). Defaults: the spec's ``time_limit``, ``cpus``, ``memory``, ``gpus``, ``nodes``. Anything
    outside is a :class:`BadRequest` naming the variable.
    """
    def names(key: str) -> list[str]:
        value = config.get(key) or []
        return [str(v) for v in ([value] if isinstance(value, str) else value)]

    partitions = names("partitions")
    partition = _choose(env, "KERNEL_PARTITION", partitions,
                        partitions[0] if partitions else default_partition, "partition")
    accounts, qos_names, constraints = names("accounts"), names("qos"), names("constraints")
    account = _choose(env, "KERNEL_ACCOUNT", accounts, accounts[0] if accounts else None, "account")
    qos = _choose(env, "KERNEL_QOS", qos_names, qos_names[0] if qos_names else None, "QOS")
    constraint = env.get("KERNEL_CONSTRAINT") or (constraints[0] if constraints else None)
    if env.get("KERNEL_CONSTRAINT") and (not _CONSTRAINT.match(env["KERNEL_CONSTRAINT"])
                                         or env["KERNEL_CONSTRAINT"] not in constraints):
        raise BadRequest("KERNEL_CONSTRAINT must be one of the constraints this kernelspec allows: "
                         f"{', '.join(constraints) or 'none'}")

    default_time = str(config.get("time_limit", "8:00:00"))
    max_time = parse_time_limit(str(config.get("max_time_limit", default_time)), "max_time_limit")
    time_limit = parse_time_limit(env.get("KERNEL_TIME_LIMIT") or default_time, "KERNEL_TIME_LIMIT")
    if time_limit > max_time:
        raise BadRequest(f"KERNEL_TIME_LIMIT must be at most {_minutes_text(max_time)} for this kernelspec")

    def count(name: str, key: str, default: int, maximum_default: int, zero: bool = False) -> int:
        raw = env.get(name) or str(config.get(key, default))
        value = 0 if zero and raw.strip() == "0" else positive_int(raw, name)
        maximum = int(config.get(f"max_{key}", maximum_default))
        if value > maximum:
            raise BadRequest(f"{name} must be at most {maximum} for this kernelspec")
        return value

    max_memory = parse_memory_mb(str(config.get("max_memory", "8g")), "max_memory")
    memory = parse_memory_mb(env.get("KERNEL_MEMORY") or str(config.get("memory", "1g")), "KERNEL_MEMORY")
    if memory > max_memory:
        raise BadRequest(f"KERNEL_MEMORY must be at most {max_memory}m for this kernelspec")
    gpu_type = config.get("gpu_type")
    if gpu_type is not None and not _GPU_TYPE.match(str(gpu_type)):
        raise BadRequest("the kernelspec's gpu_type is not a GRES type name")
    return Resources(partition=partition, account=account, qos=qos, time_limit=time_limit,
                     cpus=count("KERNEL_CPUS", "cpus", 1, 4), memory_mb=memory,
                     gpus=count("KERNEL_GPUS", "gpus", 0, 0, zero=True),
                     gpu_type=str(gpu_type) if gpu_type else None,
                     nodes=count("KERNEL_NODES", "nodes", 1, 1), constraint=constraint)


def _minutes_text(minutes: int) -> str:
    days, rest = divmod(minutes, 1440)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00" if days else f"{rest // 60}:{rest % 60:02d}:00"


@dataclass(frozen=True, kw_only=True)
class SlurmSettings(LauncherSettings):
    """``drivers.slurm`` (documented in ``conf/slurm-cluster.yaml``)."""

    #: ``rest``: slurmrestd; ``cli``: sbatch, squeue and scancel.
    mode: str = "rest"
    rest_url: str | None = None
    rest_api_version: str = "v0.0.38"
    #: The cluster's JWT key (``AuthAltParameters=jwt_key=``): egd signs each user's tokens (impersonation).
    jwt_key_file: str | None = None
    #: A fixed token of ``user`` (without the key: no impersonation). ``SLURM_JWT`` in egd's environment also works.
    token_file: str | None = None
    #: Where sbatch, squeue and scancel are (None: on PATH), and the slurm.conf they read (None: their default).
    bin_dir: str | None = None
    slurm_conf: str | None = None
    request_timeout: float = 10.0
    poll_interval: float = 5.0
    fast_poll_interval: float = 0.5
    #: Jobs are named ``<job_tag>-<kernel id>``.
    job_tag: str = "egd"
    #: The partition of kernelspecs that name none (None: Slurm's default partition).
    partition: str | None = None
    #: The job's working directory and its output file (``{user}`` and ``{kernel_id}`` are filled in; Slurm's
    #: ``%j`` is the job id). The output file holds the launcher's and the kernel's log.
    workdir: str = "/tmp"
    output: str = "/dev/null"
    #: Environment of every job (for example PATH), and shell lines run before the launcher (``module load``).
    env: Mapping[str, str] = field(default_factory=dict)
    prologue: str = ""
    kill_timeout: float = 30.0

    schema: ClassVar[Mapping[str, Checker]] = {
        **LauncherSettings.schema,
        "mode": choice("rest", "cli"),
        "rest_url": optional(text),
        "rest_api_version": text,
        "jwt_key_file": optional(text),
        "token_file": optional(text),
        "bin_dir": optional(text),
        "slurm_conf": optional(text),
        "request_timeout": seconds,
        "poll_interval": seconds,
        "fast_poll_interval": seconds,
        "job_tag": text,
        "partition": optional(text),
        "workdir": text,
        "output": text,
        "env": string_map,
        "prologue": text,
        "kill_timeout": seconds,
    }


class SlurmKernel:
    """A kernel running in a Slurm job (:class:`egd.driverapi.LaunchedKernel`)."""

    def __init__(self, driver: SlurmDriver, remote: RemoteKernel, watch: JobWatch) -> None:
        self._driver = driver
        self.remote = remote
        self.watch = watch
        self.user = watch.user
        self.connection_info = remote.connection_info
        self.exited: Deferred[ExitStatus] = Deferred()
        self._code: int | None = None
        #: egd itself is ending the job (a shutdown or restart the client asked for).
        self._ending = False
        #: Why egd cancelled the job when nobody asked it to (its launcher stopped answering).
        self._cancelled_because = ""
        remote.exited.addCallback(self._kernel_ended)
        watch.ended.addCallback(self._job_ended)
        watch.urgent = False

    def persistent_state(self) -> dict[str, Any]:
        """What a restarted gateway needs to find this kernel again: its job and its launcher."""
        return {"job_id": self.watch.job_id, "user": self.user, "remote": self.remote.persistent_state()}

    def _kernel_ended(self, status: ExitStatus) -> ExitStatus:
        # The launcher saw the kernel end; its job ends right after: watch it closely.
        self._code = status.code
        self.watch.urgent = True
        self._driver.watcher.hurry()
        return status

    def _job_ended(self, job: SlurmJob) -> SlurmJob:
        if not self.exited.called:
            # Ended by Slurm (an operator's scancel, its time limit, a failed node): a restart would only queue a
            # new job, so the kernel is dead with Slurm's words. A kernel that exited by itself (COMPLETED,
            # FAILED) is restarted, as on every driver.
            final = job.state not in ("COMPLETED", "FAILED") and not self._ending
            detail = f"{job.describe()}; {self._cancelled_because}" if self._cancelled_because else job.describe()
            self.exited.callback(ExitStatus(self._code, final=final, detail=detail))
        return job

    def describe(self) -> str:
        """The job, its node and the kernel's pid."""
        return f"Slurm job {self.watch.job_id} on {self.remote.info.get('hostname', '?')} " \
               f"({self.remote.info.get('ip')}) pid {self.remote.info.get('pid')}"

    def failure_detail(self) -> str:
        """What Slurm says about the job."""
        return self.watch.describe() if self.watch.report else ""

    def signal(self, signum: int) -> Deferred[None]:
        """Through the launcher beside the kernel."""
        return self.remote.signal(signum)

    def kill(self) -> Deferred[None]:
        """Stop the kernel through its launcher, then cancel the job and wait until Slurm says it has ended."""
        if self.exited.called:
            return succeed(None)

        async def kill() -> None:
            if not self._ending:
                # Not a shutdown: egd gave up on a kernel whose launcher does not answer (its node may be dying).
                self._cancelled_because = f"egd cancelled it: its launcher on {self.remote.info.get('hostname')} " \
                                          "stopped answering"
            if not self.remote.exited.called:
                await wait_for(self.remote.kill(), 10.0, self._driver.clock)
            await self._driver.end_job(self.watch)

        return Deferred.fromCoroutine(kill())

    def shutdown_requested(self) -> None:
        """egd asked the kernel to shut down (a DELETE or a restart): its job's end is no accident."""
        self._ending = True

    def cleanup(self) -> None:
        """Forget the launch and the watch."""
        self._driver.forget(self)


class SlurmDriver(PollingDriver):
    """Launches kernels as Slurm batch jobs and watches them all with one request per interval."""

    settings_type = SlurmSettings

    def __init__(self, reactor: IDriverReactor, settings: SlurmSettings | Mapping[str, Any], runtime_dir: str,
                 port_range: tuple[int, int] | None) -> None:
        super().__init__()
        self.name = "slurm"
        self.settings = settings = settings_of(SlurmSettings, settings, "drivers.slurm")
        self.clock = self._reactor = reactor
        self._prohibited = set(settings.prohibited_users) | {"root"}
        self._user = settings.user or getpass.getuser()
        if not settings.impersonation and self._user == "root":
            raise ValueError("drivers.slurm.user: kernels would run as root; name the account they run as "
                             "(or set impersonation: true)")
        self._python = settings.python or sys.executable
        self._port_range = settings.port_range or port_range
        self.slurm = self._client(settings)
        self.watcher = JobWatcher(reactor, self.slurm, settings.poll_interval, settings.fast_poll_interval)
        self.listener = LaunchListener(reactor, settings.callback_host, settings.callback_port)
        self.listener.setServiceParent(self)
        self._kernels: dict[str, SlurmKernel] = {}
        self._launching: set[str] = set()

    def _client(self, settings: SlurmSettings) -> SlurmClient:
        """The REST or command client the settings ask for (checked here: a clear error at start)."""
        if settings.mode == "cli":
            if settings.impersonation and os.geteuid() != 0:
                raise ValueError("drivers.slurm.impersonation with mode cli needs egd to run as root (sbatch --uid)")
            env = {"SLURM_CONF": settings.slurm_conf} if settings.slurm_conf else {}
            return CliSlurm(self._reactor, settings.bin_dir, env, self._user, settings.request_timeout)
        if not settings.rest_url or not re.match(r"^https?://[^/\s]+/?\Z", settings.rest_url):
            raise ValueError("drivers.slurm.rest_url: slurmrestd's address (http://host:port) is needed with "
                             f"mode rest, got {settings.rest_url!r}")
        if not (settings.jwt_key_file or settings.token_file or os.environ.get("SLURM_JWT")):
            raise ValueError("drivers.slurm: mode rest needs jwt_key_file (egd signs each user's token) or "
                             "token_file / SLURM_JWT (one user's token)")
        if settings.impersonation and not settings.jwt_key_file:
            raise ValueError("drivers.slurm.impersonation needs jwt_key_file: with one token egd can act as its "
                             "user only")
        return RestSlurm(self._reactor, settings.rest_url, settings.rest_api_version, self._user,
                         settings.request_timeout)

    def _credentials(self) -> None:
        """Read the JWT key or token (at start: egd does not start without them; a new key takes a restart)."""
        settings = self.settings
        if not isinstance(self.slurm, RestSlurm):
            return
        if settings.jwt_key_file:
            self.slurm.use(key=_read_file(settings.jwt_key_file, "jwt_key_file"))
        elif settings.token_file:
            self.slurm.use(token=_read_file(settings.token_file, "token_file").decode().strip())
        else:
            self.slurm.use(token=os.environ.get("SLURM_JWT", ""))

    # -- service --------------------------------------------------------------------------------------------

    @property
    def api_requests(self) -> int:
        """Requests made to Slurm so far (``egd_driver_api_requests_total``)."""
        return self.slurm.requests

    @property
    def impersonates(self) -> bool:
        """Whether kernels run as their users."""
        return bool(self.settings.impersonation)

    def startService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Read Slurm's credentials and start the listener (egd does not start without either), then watching."""
        try:
            self._credentials()
        except ValueError as exc:
            return fail(exc)
        return super().startService()

    async def close_api(self) -> None:
        """Close slurmrestd's connections (the jobs keep running)."""
        await self.slurm.close()

    # -- launching --------------------------------------------------------------------------------------

    def job_user(self, request: LaunchRequest) -> str:
        """The account the kernel's job runs as: its own user when impersonating (checked), else the driver's."""
        if not self.settings.impersonation:
            return self._user
        return impersonated_user(request.username, self._prohibited)

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Submit the kernel's job and wait for its launcher to report."""
        return Deferred.fromCoroutine(self._launch(request))

    async def _launch(self, request: LaunchRequest) -> LaunchedKernel:
        config = request.spec.driver_config
        resources = job_resources(request.env, config, self.settings.partition)
        user = self.job_user(request)
        account = await self._account(user)
        started = self._reactor.seconds()
        registration = self.listener.register(request.kernel_id)
        key = uuid.uuid4().hex
        secrets = json.dumps({"secret": registration.secret.decode(), "key": key, "env": dict(request.env)})
        script = self.launch_script(request, self.listener.address, secrets)
        job = self.job_request(request, resources, user, account, script)
        request.progress(f"submitting to Slurm partition {resources.partition or '(default)'} as {user}")
        self._launching.add(request.kernel_id)
        watch: JobWatch | None = None
        try:
            try:
                job_id = await self.slurm.submit(job)
            except SlurmError as exc:
                raise LaunchFailed(f"Slurm refused the kernel's job: {exc}") from None
            except SlurmUnavailable as exc:
                raise ServiceUnavailable(f"Slurm did not take the kernel's job: {exc}") from None
            log.info("kernel {kernel_id}: submitted Slurm job {job} to partition {partition} as {user}",
                     kernel_id=request.kernel_id, job=job_id, partition=resources.partition or "(default)",
                     user=user)

            def progress(report: SlurmJob) -> None:
                log.info("kernel {kernel_id}: {text}", kernel_id=request.kernel_id, text=report.describe())
                request.progress(report.describe())

            watch = self.watcher.watch(JobWatch(request.kernel_id, job_id, user, progress))
            info = await self._wait_ready(request, registration, watch, started)
        except BaseException:
            self.listener.unregister(registration)
            if watch is None:
                # The submission was cut short (the launch abandoned, or no answer came): it may have reached
                # Slurm all the same. One look by the job's name, so that nothing is left queued.
                watch = await self._submitted_after_all(job, request.kernel_id)
            if watch is not None:
                await self.end_job(watch)
            raise
        finally:
            self._launching.discard(request.kernel_id)
        remote = RemoteKernel(self._reactor, registration, info, key, f"Slurm job {watch.job_id}",
                              self._unregister, self._cancel_for)
        kernel = SlurmKernel(self, remote, watch)
        self._kernels[request.kernel_id] = kernel
        log.info("kernel {kernel_id}: Slurm job {job} runs it on {host}", kernel_id=request.kernel_id,
                 job=watch.job_id, host=info.get("hostname"))
        return kernel

    async def _submitted_after_all(self, job: JobRequest, kernel_id: str) -> JobWatch | None:
        """The watch of ``job`` if Slurm has it although its submission did not return its id."""
        try:
            found = [j for j in await self.slurm.jobs() if j.name == job.name and not j.final]
        except (SlurmError, SlurmUnavailable) as exc:
            log.warn("kernel {kernel_id}: cannot check whether its job reached Slurm: {why}", kernel_id=kernel_id,
                     why=str(exc))
            return None
        if not found:
            return None
        log.warn("kernel {kernel_id}: {job} was submitted after all; cancelling it", kernel_id=kernel_id,
                 job=found[0].describe())
        return JobWatch(kernel_id, found[0].job_id, job.user, lambda _: None, report=found[0])

    async def _wait_ready(self, request: LaunchRequest, registration: Registration, watch: JobWatch,
                          started: float) -> dict[str, Any]:
        """The launcher's connection info, unless the job ends first or the launch timeout passes."""
        kind, value = await await_report(self._reactor, registration, watch.ended,
                                         request.timeout - (self._reactor.seconds() - started))
        if kind == "ready":
            return dict(value)
        if kind == "refused":
            raise LaunchFailed(f"the kernel failed to start in {watch.describe()}: {value}")
        if kind == "ended":
            raise LaunchFailed(f"{value.describe()} before the kernel reported{self._output_hint(request, watch)}")
        raise LaunchTimeout(f"the kernel did not start within {request.timeout:g} seconds: {watch.describe()}; "
                            "the job is cancelled")

    def _output_hint(self, request: LaunchRequest, watch: JobWatch) -> str:
        if self.settings.output == "/dev/null":
            return ""
        path = self._fill(self.settings.output, watch.user, request.kernel_id).replace("%j", watch.job_id)
        return f" (its output: {path})"

    async def _account(self, user: str) -> pwd.struct_passwd | None:
        """The user's account on this host, looked up off the reactor (NSS may ask a directory server); a user
        that sbatch would have to run as (mode cli) must exist here (403 otherwise)."""
        pool = self._reactor.getThreadPool()
        try:
            return await deferToThreadPool(self._reactor, pool, pwd.getpwnam, user)
        except KeyError:
            if self.settings.mode == "cli" and self.settings.impersonation:
                raise Forbidden(f"kernels cannot run as user {user[:40]!r} here: no such user") from None
            return None

    def _fill(self, template: str, user: str, kernel_id: str) -> str:
        return template.replace("{user}", user).replace("{kernel_id}", kernel_id)

    def job_request(self, request: LaunchRequest, resources: Resources, user: str,
                    account: pwd.struct_passwd | None, script: str) -> JobRequest:
        """The job of a kernel: named ``<tag>-<kernel id>``, in its user's name, with its resources."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "USER": user, "LOGNAME": user}
        if account is not None:
            env["HOME"] = account.pw_dir
        env.update(self.settings.env)
        return JobRequest(
            name=f"{self.settings.job_tag}-{request.kernel_id}",
            comment=f"Jupyter kernel {request.kernel_id} ({request.spec.name}) of {request.username}"[:250],
            script=script, user=user, workdir=self._fill(self.settings.workdir, user, request.kernel_id),
            output=self._fill(self.settings.output, user, request.kernel_id), environment=env,
            partition=resources.partition, account=resources.account, qos=resources.qos,
            time_limit=resources.time_limit, cpus=resources.cpus, memory_mb=resources.memory_mb,
            gres=resources.gres, nodes=resources.nodes, constraint=resources.constraint)

    def launch_script(self, request: LaunchRequest, callback: tuple[str, int], secrets: str) -> str:
        """The job's script: the operator's and the kernelspec's prologue, then ``exec`` of the launcher with the
        secrets on its stdin from a quoted here-document (one JSON line: it cannot end the document early, and
        nothing in it is expanded)."""
        argv = [self._python, self.settings.launcher_path,
                *launcher_arguments(request, callback, self._port_range, request.spec.argv,
                                    "--foreground")]
        prologue = "\n".join(p for p in (self.settings.prologue.strip(),
                                         str(request.spec.driver_config.get("prologue") or "").strip()) if p)
        return ("#!/bin/sh\n# egd kernel launch; generated, do not edit\n"
                + (f"{prologue}\n" if prologue else "")
                + f"exec {' '.join(shlex.quote(a) for a in argv)} <<'EGD_LAUNCH_SECRETS'\n"
                f"{secrets}\nEGD_LAUNCH_SECRETS\n")

    # -- ending --------------------------------------------------------------------------------------------

    async def end_job(self, watch: JobWatch) -> None:
        """Cancel the job (as its user) unless it has ended, and wait until Slurm says it has, asking again every
        few seconds; after ``kill_timeout`` the job counts as lost."""
        if watch.ended.called:
            self.watcher.forget(watch)
            return
        watch.urgent = True
        if not self.watcher.watching(watch):
            self.watcher.watch(watch)
        deadline = self._reactor.seconds() + self.settings.kill_timeout
        last = ""
        while not watch.ended.called and self._reactor.seconds() < deadline:
            try:
                await self.slurm.cancel(watch.job_id, watch.user)
            except (SlurmError, SlurmUnavailable) as exc:
                last = str(exc)
            self.watcher.hurry()
            await wait_for(watch.ended, min(5.0, max(0.1, deadline - self._reactor.seconds())), self._reactor)
        if watch.ended.called:
            log.info("kernel {kernel_id}: {job}", kernel_id=watch.kernel_id, job=watch.describe())
            return
        log.error("kernel {kernel_id}: Slurm did not end job {job} within {timeout:g}s (last: {last})",
                  kernel_id=watch.kernel_id, job=watch.job_id, timeout=self.settings.kill_timeout,
                  last=last or watch.describe())
        self.watcher.forget(watch)
        kernel = self._kernels.get(watch.kernel_id)
        if kernel is not None and kernel.watch is watch and not kernel.exited.called:
            kernel.exited.callback(ExitStatus(lost=True, detail=f"{watch.describe()}: not confirmed ended"))

    async def _cancel_for(self, remote: RemoteKernel) -> None:
        """The launcher does not answer: cancel its job instead."""
        kernel = self._kernels.get(remote.registration.kernel_id)
        if kernel is None or kernel.remote is not remote:
            raise LaunchFailed("no Slurm job is known for this kernel")
        await self.slurm.cancel(kernel.watch.job_id, kernel.user)

    def forget(self, kernel: SlurmKernel) -> None:
        """A kernel has ended: drop its launch registration and its watch."""
        kernel.remote.cleanup()
        self.watcher.forget(kernel.watch)
        if self._kernels.get(kernel.watch.kernel_id) is kernel:
            del self._kernels[kernel.watch.kernel_id]

    def _unregister(self, remote: RemoteKernel) -> None:
        self.listener.unregister(remote.registration)

    # -- after a restart of egd -------------------------------------------------------------------------------

    def reattach(self, kernel_id: str, state: Mapping[str, Any], connection_info: dict[str, Any]) -> Deferred[Any]:
        """The kernel a previous gateway started, if its job still runs and its launcher answers a signed ping;
        ``LookupError`` otherwise (a job left running is cancelled)."""
        async def reattach() -> SlurmKernel:
            job_id, user = str(state["job_id"]), str(state["user"])
            job = await self.slurm.job(job_id)
            watch = JobWatch(kernel_id, job_id, user, lambda _: None, report=job)
            if job is None or job.state != "RUNNING":
                if job is not None and not job.final:
                    await self.end_job(watch)
                raise LookupError(job.describe() if job else f"Slurm no longer knows job {job_id}")
            try:
                remote = await reattach_remote(self._reactor, self.listener, kernel_id, state["remote"],
                                               str(connection_info["key"]), self._unregister, self._cancel_for)
            except LookupError as exc:
                await self.end_job(watch)
                raise LookupError(f"{exc}; Slurm job {job_id} cancelled") from None
            self.watcher.watch(watch)
            kernel = SlurmKernel(self, remote, watch)
            self._kernels[kernel_id] = kernel
            log.info("kernel {kernel_id}: re-attached to {where}", kernel_id=kernel_id, where=kernel.describe())
            return kernel

        return Deferred.fromCoroutine(reattach())

    def sweep_unknown(self, known: frozenset[str], older_than: float) -> Deferred[int]:
        """Cancel this driver's jobs (named ``<tag>-<kernel id>``) that belong to no kernel in ``known`` or in
        progress here and were submitted more than ``older_than`` seconds ago; how many."""
        async def sweep() -> int:
            prefix = f"{self.settings.job_tag}-"
            now = self._reactor.seconds()
            removed = 0
            for job in await self.slurm.jobs():
                kernel_id = job.name[len(prefix):] if job.name.startswith(prefix) else ""
                if not kernel_id or job.final or kernel_id in known or kernel_id in self._kernels \
                        or kernel_id in self._launching or (job.submitted and now - job.submitted < older_than):
                    continue
                log.warn("kernel {kernel_id}: {job} belongs to no kernel egd knows (a launch cut short); "
                         "cancelling it", kernel_id=kernel_id, job=job.describe())
                await self.end_job(JobWatch(kernel_id, job.job_id, job.user or self._user, lambda _: None,
                                            report=job))
                removed += 1
            return removed

        return Deferred.fromCoroutine(sweep())


def _read_file(path: str, what: str) -> bytes:
    """A small secret file, read when the driver is built (not on the reactor while it serves)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(64 * 1024)
    except OSError as exc:
        raise ValueError(f"drivers.slurm.{what}: cannot read {path}: {exc.strerror}") from None
