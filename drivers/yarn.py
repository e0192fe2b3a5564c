"""The ``yarn`` driver: kernels as applications on a Hadoop YARN cluster; the ResourceManager places them.

Two kinds of kernel, chosen by the kernelspec (``metadata.egd.config.mode``):

- ``spark``: a Spark driver in cluster mode. egd runs ``spark-submit`` as a process with an argv (no shell, no
  ``eval``), with egd's launcher as the Python application; the launcher starts the kernel in the application
  master's container, where the kernel gets the SparkSession as ``spark`` and ``sc`` as the kernelspec's
  ``spark_session`` says (``launchers/lazy_spark.py``): ``lazy`` (the default) builds it in the background while
  the kernel already answers, ``eager`` before the kernel reports ready, ``none`` not at all.
- ``python``: a plain kernel with no Spark. A kernel cannot be its own ApplicationMaster (YARN fails an AM that
  never registers), so egd submits Hadoop's stock DistributedShell AM through the RM REST API; that AM registers,
  asks for one container and runs egd's launch script there. No project-owned Java, no JVM client per kernel.

Either way the launcher calls back with the kernel's ports (``docs/launcher-protocol.rst``); the launch secret
travels in a file YARN localizes into the application's private directory, never on a command line.

Enterprise Gateway's ``YarnClusterProcessProxy`` kernelspecs run unchanged: egd runs the spec's argv (EG's
``bin/run.sh``, which runs ``spark-submit --deploy-mode cluster`` with EG's launcher) on the gateway host as EG does,
adding only the driver's and the kernel id's tags to ``SPARK_OPTS``; EG's launcher in the application master sends
its encrypted connection info to this driver's listener, which takes it only from the application master's host
(:mod:`egd.egprotocol`). Interrupts go to that launcher's comm port; kills and deaths go through YARN as for the
native kernels. Every
application carries two tags: the driver's (``application_tag``) and the kernel id. One RM request per interval
watches all of them (:mod:`egd.drivers.yarn_watch`); kills go through ``PUT .../state`` as the kernel's user.
"""

from __future__ import annotations

import getpass
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from egd.checks import Checker, Settings, build, number, optional, seconds, settings_of, string_map, text, urls
from egd.driverapi import ExitStatus, IDriverReactor, LaunchedKernel, LaunchRequest
from egd.drivers.polling import PollingDriver
from egd.drivers.process import CapturedProcess
from egd.drivers.yarn_rm import FINAL_STATES, ResourceManager, RMError, RMUnavailable
from egd.drivers.yarn_watch import AppWatch, AppWatcher
from egd.drivertools import (
    DEFAULT_LAUNCHER,
    LauncherSettings,
    fill_placeholders,
    impersonated_user,
    parse_memory_mb,
    positive_int,
    protocol_module_beside,
)
from egd.egprotocol import EgKernel
from egd.egspecs import check_shell_values, eg_port_range, eg_spark_opts_variable, uses_eg_protocol
from egd.errors import BadRequest, LaunchFailed, LaunchTimeout
from egd.remote import (
    LaunchListener,
    Registration,
    RemoteKernel,
    await_report,
    launcher_arguments,
    reattach_remote,
)

log = Logger()

_QUEUE = re.compile(r"^[A-Za-z0-9_.-]{1,100}\Z")
#: ``metadata.egd.config.spark_session``: when a Spark kernel's SparkSession is built (``lazy``: in the background
#: while the kernel already answers; ``eager``: before it reports ready; ``none``: never), the first the default.
SPARK_SESSION_MODES = ("lazy", "eager", "none")
#: EG's launcher option with the same three modes, in EG's Spark kernelspecs' argv.
EG_SPARK_MODE_OPTION = "--RemoteProcessProxy.spark-context-initialization-mode"
#: The module that builds the SparkSession in the kernel; it lies beside the launcher and goes with it.
SPARK_SESSION_MODULE = "lazy_spark.py"
_DS_MAIN = "org.apache.hadoop.yarn.applications.distributedshell.ApplicationMaster"
#: The classpath of a stock Hadoop installation (yarn.application.classpath's default plus the DS jar's folder).
_DEFAULT_DS_CLASSPATH = "<CPS>".join([
    "{{CLASSPATH}}", "./*", "{{HADOOP_CONF_DIR}}",
    "{{HADOOP_COMMON_HOME}}/share/hadoop/common/*", "{{HADOOP_COMMON_HOME}}/share/hadoop/common/lib/*",
    "{{HADOOP_HDFS_HOME}}/share/hadoop/hdfs/*", "{{HADOOP_HDFS_HOME}}/share/hadoop/hdfs/lib/*",
    "{{HADOOP_YARN_HOME}}/share/hadoop/yarn/*", "{{HADOOP_YARN_HOME}}/share/hadoop/yarn/lib/*",
])


@dataclass(frozen=True, kw_only=True)
class DistributedShellSettings(Settings):
    """``drivers.yarn.distributed_shell``: the ApplicationMaster of plain (non-Spark) kernels."""

    classpath: str = _DEFAULT_DS_CLASSPATH
    am_memory_mb: int = 256
    am_java_options: str = "-Xmx128m"

    schema: ClassVar[Mapping[str, Checker]] = {
        "classpath": text,
        "am_memory_mb": number(32, 1024 * 1024, integer=True),
        "am_java_options": text,
    }


def _distributed_shell(value: Any, path: str, problems: list[str]) -> Any:
    return build(DistributedShellSettings, value, path, problems)


@dataclass(frozen=True, kw_only=True)
class YarnSettings(LauncherSettings):
    """``drivers.yarn`` (documented in ``conf/yarn-cluster.yaml``)."""

    #: The RM web addresses; a second one is tried when the first does not answer.
    resource_managers: tuple[str, ...]
    request_timeout: float = 10.0
    poll_interval: float = 2.0
    fast_poll_interval: float = 0.5
    application_tag: str = "egd"
    queue: str = "default"
    staging_dir: str | None = None
    kill_timeout: float = 30.0
    spark_home: str | None = None
    spark_submit: str | None = None
    spark_conf: Mapping[str, str] = field(default_factory=dict)
    hadoop_conf_dir: str | None = None
    java_home: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    distributed_shell: DistributedShellSettings = DistributedShellSettings()

    schema: ClassVar[Mapping[str, Checker]] = {
        **LauncherSettings.schema,
        "resource_managers": urls,
        "request_timeout": seconds,
        "poll_interval": seconds,
        "fast_poll_interval": seconds,
        "application_tag": text,
        "queue": text,
        "staging_dir": optional(text),
        "kill_timeout": seconds,
        "spark_home": optional(text),
        "spark_submit": optional(text),
        "spark_conf": string_map,
        "hadoop_conf_dir": optional(text),
        "java_home": optional(text),
        "env": string_map,
        "distributed_shell": _distributed_shell,
    }


@dataclass(frozen=True)
class Resources:
    """What one kernel asks YARN for, validated against its kernelspec's limits."""

    queue: str
    memory_mb: int
    cores: int
    executors: int = 0
    executor_memory_mb: int = 0
    executor_cores: int = 0
    max_executors: int = 0


def kernel_resources(env: Mapping[str, str], config: Mapping[str, Any], default_queue: str, spark: bool) -> Resources:
    """The queue and resources a kernel gets: its ``KERNEL_*`` requests within what the kernelspec allows.

    Enterprise Gateway's names: ``KERNEL_QUEUE``, ``KERNEL_DRIVER_MEMORY``, ``KERNEL_DRIVER_CORES``,
    ``KERNEL_EXECUTOR_MEMORY``, ``KERNEL_EXECUTOR_CORES``, ``KERNEL_NUM_EXECUTORS`` (Spark), and
    ``KERNEL_MEMORY``, ``KERNEL_CPUS`` for plain kernels. The spec's ``queues`` lists the queues allowed (the first
    is the default); ``max_memory``, ``max_cores``, ``max_executors`` bound the rest.
    """
    queues = [str(q) for q in config.get("queues") or [default_queue]]
    queue = env.get("KERNEL_QUEUE") or queues[0]
    if not _QUEUE.match(queue) or queue not in queues:
        raise BadRequest(f"KERNEL_QUEUE must be one of the queues this kernelspec allows: {', '.join(queues)}")
    max_memory = parse_memory_mb(str(config.get("max_memory", "4g")), "max_memory")
    max_cores = int(config.get("max_cores", 4))

    def memory(name: str, default: str) -> int:
        value = parse_memory_mb(env.get(name) or str(config.get(name.lower()[7:], default)), name)
        if not 1 <= value <= max_memory:
            raise BadRequest(f"{name} must be at most {max_memory}m for this kernelspec")
        return value

    def cores(name: str) -> int:
        value = positive_int(env.get(name) or str(config.get(name.lower()[7:], 1)), name)
        if value > max_cores:
            raise BadRequest(f"{name} must be at most {max_cores} for this kernelspec")
        return value

    if not spark:
        return Resources(queue, memory("KERNEL_MEMORY", "512m"), cores("KERNEL_CPUS"))
    if env.get("KERNEL_EXTRA_SPARK_OPTS"):
        raise BadRequest("KERNEL_EXTRA_SPARK_OPTS is not supported: Spark options come from the kernelspec; ask "
                         "with KERNEL_DRIVER_MEMORY, KERNEL_EXECUTOR_MEMORY, KERNEL_NUM_EXECUTORS and the like")
    executors_text = env.get("KERNEL_NUM_EXECUTORS") or str(config.get("num_executors", 0))
    executors = 0 if executors_text.strip() == "0" else positive_int(executors_text, "KERNEL_NUM_EXECUTORS")
    max_executors = int(config.get("max_executors", 2))
    if executors > max_executors:
        raise BadRequest(f"KERNEL_NUM_EXECUTORS must be at most {max_executors} for this kernelspec")
    return Resources(queue, memory("KERNEL_DRIVER_MEMORY", "512m"), cores("KERNEL_DRIVER_CORES"), executors,
                     memory("KERNEL_EXECUTOR_MEMORY", "512m"), cores("KERNEL_EXECUTOR_CORES"), max_executors)


def spark_session_mode(spec_name: str, config: Mapping[str, Any]) -> str:
    """The kernelspec's ``spark_session`` (``lazy`` when it has none); a bad value is a 400 that says which values
    there are."""
    value = config.get("spark_session", SPARK_SESSION_MODES[0])
    if value not in SPARK_SESSION_MODES:
        raise BadRequest(f"kernelspec {spec_name}: metadata.egd.config.spark_session must be one of "
                         f"{', '.join(SPARK_SESSION_MODES)}, not {str(value)[:40]!r}")
    return str(value)


def with_eg_spark_mode(spec_name: str, argv: list[str], mode: str | None) -> list[str]:
    """An EG kernelspec's argv with its ``spark-context-initialization-mode`` set to ``mode`` (the spec's
    ``spark_session``; None leaves the argv as it is). Both spellings, ``--option value`` and ``--option=value``."""
    if mode is None:
        return argv
    result, found = list(argv), False
    for i, item in enumerate(result):
        if item == EG_SPARK_MODE_OPTION and i + 1 < len(result):
            result[i + 1], found = mode, True
        elif item.startswith(EG_SPARK_MODE_OPTION + "="):
            result[i], found = f"{EG_SPARK_MODE_OPTION}={mode}", True
    if not found:
        raise BadRequest(f"kernelspec {spec_name}: metadata.egd.config.spark_session needs "
                         f"{EG_SPARK_MODE_OPTION} in its argv (EG's launcher carries the mode out)")
    return result


def describe_app(app: Mapping[str, Any]) -> str:
    """``YARN application <id> <STATE> in queue <q>: <diagnostics>``, for the kernel model and errors."""
    text = f"YARN application {app.get('id', '?')} {app.get('state', '?')}"
    if app.get("finalStatus") not in (None, "", "UNDEFINED"):
        text += f"/{app['finalStatus']}"
    if app.get("queue"):
        text += f" in queue {app['queue']}"
    diagnostics = " ".join(str(app.get("diagnostics") or "").split())
    return f"{text}: {diagnostics[:600]}" if diagnostics else text


class YarnKernel:
    """A kernel running in a YARN application (:class:`egd.driverapi.LaunchedKernel`)."""

    def __init__(self, driver: YarnDriver, remote: RemoteKernel | EgKernel, watch: AppWatch, user: str) -> None:
        self._driver = driver
        #: egd's launcher beside the kernel, or EG's (an EG kernelspec).
        self.remote = remote
        self.watch = watch
        self.user = user
        self.connection_info = remote.connection_info
        self.exited: Deferred[ExitStatus] = Deferred()
        self._code: int | None = None
        remote.exited.addCallback(self._kernel_ended)
        watch.ended.addCallback(self._app_ended)
        watch.urgent = False

    def persistent_state(self) -> dict[str, Any]:
        """What a restarted gateway needs to find this kernel again: its application and its launcher."""
        return {"app_id": self.watch.app_id, "user": self.user, "started_ms": self.watch.since_ms,
                "remote": self.remote.persistent_state()}

    def _kernel_ended(self, status: ExitStatus) -> ExitStatus:
        # The launcher saw the kernel end; the application finishes right after: watch it closely.
        self._code = status.code
        self.watch.urgent = True
        self._driver.watcher.hurry()
        return status

    def _app_ended(self, app: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.remote, EgKernel):
            self.remote.ended(ExitStatus(None, detail=describe_app(app)))
        if not self.exited.called:
            self.exited.callback(ExitStatus(self._code, detail=describe_app(app)))
        return app

    def describe(self) -> str:
        """The application, its host and the kernel's pid."""
        return f"YARN application {self.watch.app_id} on {self.remote.info.get('hostname', '?')} " \
               f"({self.remote.info.get('ip')}) pid {self.remote.info.get('pid')}"

    def failure_detail(self) -> str:
        """What YARN says about the application."""
        return describe_app(self.watch.report) if self.watch.report else ""

    def signal(self, signum: int) -> Deferred[None]:
        """Through the launcher beside the kernel (EG's: its comm port, where SIGINT also cancels Spark jobs)."""
        return self.remote.signal(signum)

    def kill(self) -> Deferred[None]:
        """Kill the application through the RM (as the kernel's user) and wait until YARN says it is over."""
        if self.exited.called:
            return succeed(None)
        return Deferred.fromCoroutine(self._driver.kill_app(self.watch, self.user))

    def cleanup(self) -> None:
        """Forget the launch and the watch."""
        self._driver.forget(self)


class YarnDriver(PollingDriver):
    """Launches kernels as YARN applications and watches them all with one RM request per interval."""

    settings_type = YarnSettings

    def __init__(self, reactor: IDriverReactor, settings: YarnSettings | Mapping[str, Any], runtime_dir: str,
                 port_range: tuple[int, int] | None) -> None:
        super().__init__()
        self.name = "yarn"
        self.settings = settings = settings_of(YarnSettings, settings, "drivers.yarn")
        self._reactor = reactor
        self._user = settings.user or getpass.getuser()
        self._prohibited = set(settings.prohibited_users)
        self._tag = settings.application_tag.lower()
        self._python = settings.python or sys.executable
        self._staging = settings.staging_dir or os.path.join(runtime_dir, "yarn")
        self._spark_submit = settings.spark_submit or (
            os.path.join(settings.spark_home, "bin", "spark-submit") if settings.spark_home else "spark-submit")
        self._spark_conf = dict(settings.spark_conf)
        self._extra_env = dict(settings.env)
        self._port_range = settings.port_range or port_range
        self.rm = ResourceManager(reactor, list(settings.resource_managers), settings.request_timeout)
        self.watcher = AppWatcher(reactor, self.rm, self._tag, self._user, settings.poll_interval,
                                  settings.fast_poll_interval)
        self.listener = LaunchListener(reactor, settings.callback_host, settings.callback_port)
        self.listener.setServiceParent(self)
        self._kernels: dict[str, YarnKernel] = {}

    # -- service --------------------------------------------------------------------------------------------

    @property
    def api_requests(self) -> int:
        """Requests made to the ResourceManager so far (``egd_driver_api_requests_total``)."""
        return self.rm.requests

    @property
    def impersonates(self) -> bool:
        """Whether kernels run as their users (then a pre-started kernel cannot serve just anyone)."""
        return bool(self.settings.impersonation)

    def startService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Create the staging directory, start the listener (egd does not start when it cannot listen), then
        watching."""
        os.makedirs(self._staging, mode=0o700, exist_ok=True)
        return super().startService()

    async def close_api(self) -> None:
        """Close the RM connections."""
        await self.rm.close()

    # -- launching --------------------------------------------------------------------------------------

    def _yarn_user(self, request: LaunchRequest) -> str:
        """The YARN user of the kernel: its own user when impersonating (checked), else the driver's."""
        return impersonated_user(request.username, self._prohibited) if self.settings.impersonation else self._user

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Submit the kernel's application and wait for its launcher to report."""
        return Deferred.fromCoroutine(self._launch(request))

    async def _launch(self, request: LaunchRequest) -> LaunchedKernel:
        if uses_eg_protocol(request.spec.argv):
            return await self._launch_eg(request)
        config = request.spec.driver_config
        mode = str(config.get("mode", "spark"))
        if mode not in ("spark", "python"):
            raise LaunchFailed(f"kernelspec {request.spec.name}: metadata.egd.config.mode must be spark or python")
        resources = kernel_resources(request.env, config, self.settings.queue, spark=mode == "spark")
        session = spark_session_mode(request.spec.name, config) if mode == "spark" else "none"
        user = self._yarn_user(request)
        started = self._reactor.seconds()
        registration = self.listener.register(request.kernel_id)
        key = uuid.uuid4().hex
        workdir = os.path.join(self._staging, f"{request.kernel_id}-{uuid.uuid4().hex[:8]}")
        os.makedirs(workdir, mode=0o700)

        watch = AppWatch(request.kernel_id, user, int(started * 1000), partial(_report_progress, request))
        secrets = json.dumps({"secret": registration.secret.decode(), "key": key, "env": dict(request.env)})
        # Until the watcher reports YARN's own view of the application (which then replaces this text).
        request.progress(f"submitting to YARN queue {resources.queue} as {user}")

        async def submit() -> None:
            if mode == "spark":
                self.watcher.watch(watch)
                await self._submit_spark(request, resources, user, workdir, secrets, started, session)
            else:
                watch.app_id = await self._submit_python(request, resources, user, workdir, secrets)
                self.watcher.watch(watch)

        info = await self._submit_and_wait(request, registration, watch, workdir, started, submit)
        remote = RemoteKernel(self._reactor, registration, info, key, str(watch.app_id), self._unregister,
                              self._no_force_kill)
        kernel = YarnKernel(self, remote, watch, user)
        self._kernels[request.kernel_id] = kernel
        log.info("kernel {kernel_id}: {app} runs it on {host}", kernel_id=request.kernel_id, app=watch.app_id,
                 host=info.get("hostname"))
        return kernel

    def reattach(self, kernel_id: str, state: Mapping[str, Any], connection_info: dict[str, Any]) -> Deferred[Any]:
        """The kernel a previous gateway started, if its application still runs and its launcher answers a
        signed ping; ``LookupError`` otherwise (an application left running is killed)."""
        async def reattach() -> YarnKernel:
            app_id, user = str(state["app_id"]), str(state["user"])
            remote_state = state["remote"]
            app = await self.rm.app(app_id, self._user)
            if app is None or app.get("state") != "RUNNING":
                raise LookupError(f"YARN application {app_id} is {app.get('state') if app else 'unknown'}")
            watch = AppWatch(kernel_id, user, int(state.get("started_ms") or 0), lambda _: None, app_id=app_id)
            watch.report = app
            try:
                remote: RemoteKernel | EgKernel
                if remote_state.get("protocol") == "eg":
                    remote = await EgKernel.reattached(self._reactor, kernel_id, remote_state, app_id,
                                                       lambda _: None, self._no_force_kill, poll=False)
                else:
                    remote = await reattach_remote(self._reactor, self.listener, kernel_id, remote_state,
                                                   str(connection_info["key"]), self._unregister,
                                                   self._no_force_kill)
            except LookupError as exc:
                await self.kill_app(watch, user)
                raise LookupError(f"{exc}; YARN application {app_id} killed") from None
            self.watcher.watch(watch)
            kernel = YarnKernel(self, remote, watch, user)
            self._kernels[kernel_id] = kernel
            log.info("kernel {kernel_id}: re-attached to {where}", kernel_id=kernel_id, where=kernel.describe())
            return kernel

        return Deferred.fromCoroutine(reattach())

    async def _no_force_kill(self, kernel: RemoteKernel | EgKernel) -> None:
        raise LaunchFailed("YARN kernels are killed through the ResourceManager")

    def _unregister(self, kernel: RemoteKernel) -> None:
        self.listener.unregister(kernel.registration)

    # -- Enterprise Gateway's kernelspecs -------------------------------------------------------------------

    def eg_environment(self, request: LaunchRequest) -> dict[str, str]:
        """The environment of an EG spec's ``run.sh``: the kernel's, over the driver's process environment, with
        the driver's ``spark_conf`` before the spec's ``SPARK_OPTS`` and this driver's tags after them (how the
        watcher finds the application). ``run.sh`` passes ``SPARK_OPTS`` through ``eval``: a client's value that
        it would split or expand is refused (400)."""
        check_shell_values(request.spec.name, request.spec.env, request.env)
        env = {**self._process_env(), **request.env}
        # The driver's spark_conf first: a later --conf wins, so the spec's own SPARK_OPTS override it; the tags last.
        defaults = " ".join(f"--conf {shlex.quote(f'{name}={value}')}" for name, value in self._spark_conf.items())
        # EG's Toree run.sh reads __TOREE_SPARK_OPTS__ when SPARK_OPTS is empty
        name = eg_spark_opts_variable(request.spec.env) or "SPARK_OPTS"
        env[name] = " ".join(part for part in (
            defaults, env.get(name, ""), f"--conf spark.yarn.tags={self._tag},{request.kernel_id}") if part)
        return env

    def eg_spec_argv(self, request: LaunchRequest) -> list[str]:
        """The EG spec's argv with the spec's ``spark_session`` (if it has one) as EG's Spark context mode."""
        config = request.spec.driver_config
        mode = spark_session_mode(request.spec.name, config) if "spark_session" in config else None
        return with_eg_spark_mode(request.spec.name, list(request.spec.argv), mode)

    def eg_argv(self, request: LaunchRequest, public_key: str) -> list[str]:
        """The EG spec's argv with EG's placeholders filled."""
        callback = self.listener.address
        return fill_placeholders(self.eg_spec_argv(request), {
            "kernel_id": request.kernel_id, "resource_dir": request.spec.resource_dir,
            "response_address": f"{callback[0]}:{callback[1]}", "public_key": public_key,
            "port_range": eg_port_range(self._port_range), "connection_file": "",
        })

    async def _launch_eg(self, request: LaunchRequest) -> LaunchedKernel:
        """An EG ``YarnClusterProcessProxy`` spec: run its argv here (it submits the application), then wait for
        the payload of EG's launcher from the application master's host."""
        env = self.eg_environment(request)
        self.eg_spec_argv(request)  # a bad spark_session is a 400 before anything is submitted
        user = self._yarn_user(request)
        started = self._reactor.seconds()
        registration = self.listener.register(request.kernel_id, eg=True)
        public_key = (await self.listener.eg_key()).public_text
        workdir = os.path.join(self._staging, f"{request.kernel_id}-{uuid.uuid4().hex[:8]}")
        os.makedirs(workdir, mode=0o700)
        resolving: list[str] = []

        def progress(app: dict[str, Any]) -> None:
            _report_progress(request, app)
            host = str(app.get("amHostHttpAddress") or "").rpartition(":")[0]
            if host and not resolving:
                resolving.append(host)
                self._host_addresses(host).addCallbacks(
                    registration.expect_peers,
                    lambda f: log.warn("kernel {kernel_id}: cannot resolve {host}: {why}",
                                       kernel_id=request.kernel_id, host=host, why=f.getErrorMessage()))

        watch = AppWatch(request.kernel_id, user, int(started * 1000), progress)
        request.progress(f"running {os.path.basename(request.spec.argv[0])} (Enterprise Gateway kernelspec)")

        async def submit() -> None:
            self.watcher.watch(watch)
            await self._run_submitter(request, self.eg_argv(request, public_key), env, workdir, started)

        info = await self._submit_and_wait(request, registration, watch, workdir, started, submit)
        self.listener.unregister(registration)  # nothing more comes from an EG launcher
        remote = EgKernel(self._reactor, request.kernel_id, info, str(watch.app_id), lambda _: None,
                          self._no_force_kill, poll=False)
        kernel = YarnKernel(self, remote, watch, user)
        self._kernels[request.kernel_id] = kernel
        log.info("kernel {kernel_id}: {app} runs it on {host} (EG launcher)", kernel_id=request.kernel_id,
                 app=watch.app_id, host=info.get("ip"))
        return kernel

    def _host_addresses(self, host: str) -> Deferred[frozenset[str]]:
        """The addresses a payload from ``host`` may come from: its own, and loopback when it is this machine."""
        def resolve() -> frozenset[str]:
            found = {str(info[4][0]) for info in socket.getaddrinfo(host, None, socket.AF_INET)}
            for address in list(found):
                if ipaddress.ip_address(address).is_loopback or _is_local(address):
                    found.update({"127.0.0.1", address})
            return frozenset(found)

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), resolve)

    async def _run_submitter(self, request: LaunchRequest, argv: list[str], env: dict[str, str], workdir: str,
                             started: float) -> None:
        """Run a command that submits the kernel's application and returns (``spark-submit`` with
        ``waitAppCompletion=false``, or a script around it), within the launch timeout."""
        proto = CapturedProcess(None)
        try:
            process = self._reactor.spawnProcess(proto, argv[0], argv, env=env, path=workdir)
        except OSError as exc:
            raise LaunchFailed(f"cannot run {argv[0]}: {exc}") from None
        remaining = max(1.0, request.timeout - (self._reactor.seconds() - started))
        ended = proto.ended
        ended.addTimeout(remaining, self._reactor, onTimeoutCancel=lambda *_: None)
        try:
            code = await ended
        except CancelledError:  # the launch is abandoned: it must not submit an application after all
            _kill_quietly(process)
            raise
        if code is None:
            _kill_quietly(process)
            raise LaunchTimeout(f"{os.path.basename(argv[0])} did not return within {remaining:.0f} seconds: "
                                f"{proto.stderr(5)}")
        if code != 0:
            raise LaunchFailed(f"{os.path.basename(argv[0])} exited with code {code}: {proto.stderr()}")

    def _launcher_args(self, request: LaunchRequest, callback: tuple[str, int], secrets_file: str | None,
                       spark_session: str | None) -> list[str]:
        options = ["--foreground"]
        if secrets_file:
            options += ["--secrets-file", secrets_file]
        if spark_session:
            options.append(f"--spark-session={spark_session}")
        return launcher_arguments(request, callback, self._port_range, request.spec.argv, *options)

    def _process_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EGD_")}
        conf = self.settings
        for name, value in (("HADOOP_CONF_DIR", conf.hadoop_conf_dir), ("YARN_CONF_DIR", conf.hadoop_conf_dir),
                            ("JAVA_HOME", conf.java_home), ("SPARK_HOME", conf.spark_home)):
            if value:
                env[name] = str(value)
        env.update(self._extra_env)
        return env

    def spark_submit_argv(self, request: LaunchRequest, resources: Resources, user: str,
                          secrets_path: str, spark_session: str = "lazy") -> list[str]:
        """The ``spark-submit`` command line of a Spark kernel (an argv: nothing here is parsed by a shell)."""
        conf: dict[str, str] = {
            "spark.yarn.tags": f"{self._tag},{request.kernel_id}",
            "spark.yarn.submit.waitAppCompletion": "false",
            # A second attempt would start a second launcher with the same one-time secret: never useful.
            "spark.yarn.maxAppAttempts": "1",
            "spark.yarn.am.waitTime": f"{max(100, int(request.timeout) + 30)}s",
            "spark.driver.memory": f"{resources.memory_mb}m",
            "spark.driver.cores": str(resources.cores),
            "spark.executor.memory": f"{resources.executor_memory_mb}m",
            "spark.executor.cores": str(resources.executor_cores),
            "spark.yarn.appMasterEnv.PYSPARK_PYTHON": self._python,
            "spark.yarn.appMasterEnv.PYSPARK_DRIVER_PYTHON": self._python,
            "spark.executorEnv.PYSPARK_PYTHON": self._python,
        }
        if resources.executors:
            conf["spark.executor.instances"] = str(resources.executors)
        else:
            # None at the start (spark-submit refuses 0 instances); dynamic allocation adds them when a job runs.
            conf.update({"spark.dynamicAllocation.enabled": "true",
                         "spark.dynamicAllocation.shuffleTracking.enabled": "true",
                         "spark.dynamicAllocation.minExecutors": "0", "spark.dynamicAllocation.initialExecutors": "0",
                         "spark.dynamicAllocation.maxExecutors": str(max(1, resources.max_executors))})
        for name, value in self._spark_conf.items():
            conf.setdefault(name, value)
        for name, value in (request.spec.driver_config.get("spark_conf") or {}).items():
            conf.setdefault(str(name), str(value))
        argv = [self._spark_submit, "--master", "yarn", "--deploy-mode", "cluster",
                "--name", f"egd-{request.spec.name}-{request.kernel_id}", "--queue", resources.queue]
        for name, value in conf.items():
            argv += ["--conf", f"{name}={value}"]
        if self.settings.impersonation:
            argv += ["--proxy-user", user]
        # The launcher imports its protocol module from beside it, and the kernel the session's module: Spark ships
        # both to the driver's container.
        launcher = self.settings.launcher_path
        py_files = [protocol_module_beside(launcher)]
        if spark_session != "none":
            py_files.append(spark_session_module(launcher))
        argv += ["--files", secrets_path, "--py-files", ",".join(py_files), launcher,
                 *self._launcher_args(request, self.listener.address, os.path.basename(secrets_path),
                                      spark_session)]
        return argv

    async def _submit_spark(self, request: LaunchRequest, resources: Resources, user: str, workdir: str,
                            secrets: str, started: float, spark_session: str) -> None:
        secrets_path = os.path.join(workdir, "egd-launch.json")
        fd = os.open(secrets_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets)
        argv = self.spark_submit_argv(request, resources, user, secrets_path, spark_session)
        await self._run_submitter(request, argv, self._process_env(), workdir, started)

    def python_submission(self, request: LaunchRequest, resources: Resources, app_id: str,
                          script: str) -> dict[str, Any]:
        """The RM REST submission of a plain kernel: DistributedShell's AM, running egd's launch script."""
        stat = os.stat(script)
        command = (f"{{{{JAVA_HOME}}}}/bin/java {self.settings.distributed_shell.am_java_options} {_DS_MAIN}"
                   f" --container_memory {resources.memory_mb} --container_vcores {resources.cores}"
                   " --num_containers 1 --priority 0"
                   " 1><LOG_DIR>/AppMaster.stdout 2><LOG_DIR>/AppMaster.stderr")
        environment = {
            "CLASSPATH": self.settings.distributed_shell.classpath,
            "DISTRIBUTEDSHELLSCRIPTLOCATION": f"file://{os.path.abspath(script)}",
            "DISTRIBUTEDSHELLSCRIPTTIMESTAMP": str(stat.st_mtime_ns // 1_000_000),
            "DISTRIBUTEDSHELLSCRIPTLEN": str(stat.st_size),
        }
        return {
            "application-id": app_id,
            "application-name": f"egd-{request.spec.name}-{request.kernel_id}",
            "application-type": "JUPYTER",
            "queue": resources.queue,
            "max-app-attempts": 1,
            "unmanaged-AM": False,
            "keep-containers-across-application-attempts": False,
            "resource": {"memory": self.settings.distributed_shell.am_memory_mb, "vCores": 1},
            "application-tags": {"tag": [self._tag, request.kernel_id]},
            "am-container-spec": {
                "commands": {"command": command},
                "environment": {"entry": [{"key": k, "value": v} for k, v in environment.items()]},
            },
        }

    def launch_script(self, request: LaunchRequest, callback: tuple[str, int], secrets: str) -> str:
        """The script DistributedShell runs: ``exec`` of the launcher, secrets on its stdin from a quoted
        here-document (one JSON line, so it cannot end the document early; nothing in it is expanded)."""
        argv = [self._python, self.settings.launcher_path, *self._launcher_args(request, callback, None, None)]
        return ("#!/bin/sh\n# egd kernel launch; generated, do not edit\n"
                f"exec {' '.join(shlex.quote(a) for a in argv)} <<'EGD_LAUNCH_SECRETS'\n"
                f"{secrets}\nEGD_LAUNCH_SECRETS\n")

    async def _submit_python(self, request: LaunchRequest, resources: Resources, user: str, workdir: str,
                             secrets: str) -> str:
        script = os.path.join(workdir, "launch.sh")
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.launch_script(request, self.listener.address, secrets))
        try:
            new = await self.rm.new_application(user)
            app_id = str(new["application-id"])
            await self.rm.submit(self.python_submission(request, resources, app_id, script), user)
        except (RMError, RMUnavailable) as exc:
            raise LaunchFailed(f"YARN refused the kernel's application: {exc}") from None
        log.info("kernel {kernel_id}: submitted {app} to queue {queue} as {user}", kernel_id=request.kernel_id,
                 app=app_id, queue=resources.queue, user=user)
        return app_id

    async def _submit_and_wait(self, request: LaunchRequest, registration: Registration, watch: AppWatch,
                               workdir: str, started: float, submit: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        """Submit the kernel's application (``submit``) and wait for its launcher's report; whatever fails,
        nothing is left: the launch forgotten, the application killed, the staging directory removed."""
        try:
            await submit()
            return await self._wait_ready(request, registration, watch, started)
        except BaseException:
            self.listener.unregister(registration)
            await self._abandon(watch, watch.user)
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def _wait_ready(self, request: LaunchRequest, registration: Registration, watch: AppWatch,
                          started: float) -> dict[str, Any]:
        """The launcher's connection info, unless the application ends first or the launch timeout passes."""
        kind, value = await await_report(self._reactor, registration, watch.ended,
                                         request.timeout - (self._reactor.seconds() - started))
        if kind == "ready":
            return dict(value)
        if kind == "refused":
            raise LaunchFailed(f"the kernel failed to start in YARN: {value}")
        if kind == "ended":
            raise LaunchFailed(f"{describe_app(value)} (it ended before the kernel reported)")
        if watch.report:
            raise LaunchTimeout(f"the kernel did not start within {request.timeout:g} seconds: "
                                f"{describe_app(watch.report)}")
        raise LaunchTimeout(f"the kernel did not start within {request.timeout:g} seconds: no YARN application "
                            f"tagged {request.kernel_id} appeared")

    async def _abandon(self, watch: AppWatch, user: str) -> None:
        """A launch failed: kill its application if there is one, leaving nothing behind."""
        if watch.app_id is None:
            # spark-submit may have submitted it after all: one last look, by tag.
            try:
                apps = await self.rm.apps(self._user, [watch.kernel_id], watch.since_ms - 60_000)
            except (RMError, RMUnavailable):
                apps = []
            live = [a for a in apps if a.get("state") not in FINAL_STATES]
            if not live:
                self.watcher.forget(watch)
                return
            watch.app_id = str(live[0].get("id"))
        if watch.state not in FINAL_STATES:
            await self.kill_app(watch, user)
        self.watcher.forget(watch)

    async def kill_app(self, watch: AppWatch, user: str) -> None:
        """``PUT .../state KILLED`` as ``user``, repeated until YARN reports the application final."""
        app_id = watch.app_id
        if app_id is None:
            return
        deadline = self._reactor.seconds() + self.settings.kill_timeout
        last = ""
        asked = 0.0
        while True:
            now = self._reactor.seconds()
            try:
                if now - asked >= 3.0:
                    asked = now
                    state = await self.rm.kill(app_id, user)
                else:
                    app = await self.rm.app(app_id, self._user)
                    state = app.get("state") if app else "KILLED"
                if state in FINAL_STATES:
                    app = await self.rm.app(app_id, self._user)
                    self._finish(watch, app or {"id": app_id, "state": state})
                    log.info("kernel {kernel_id}: {app} is {state}", kernel_id=watch.kernel_id, app=app_id,
                             state=state)
                    return
                last = str(state)
            except (RMError, RMUnavailable) as exc:
                last = str(exc)
            if self._reactor.seconds() >= deadline:
                log.error("kernel {kernel_id}: YARN did not kill {app} within {timeout:g}s (last: {last})",
                          kernel_id=watch.kernel_id, app=app_id, timeout=self.settings.kill_timeout, last=last)
                self._finish(watch, {"id": app_id, "state": "UNKNOWN",
                                     "diagnostics": f"not confirmed killed: {last}"}, lost=True)
                return
            await deferLater(self._reactor, 0.5, lambda: None)

    def _finish(self, watch: AppWatch, app: dict[str, Any], lost: bool = False) -> None:
        """The application is over (or given up on): end the watch and the kernel."""
        self.watcher.forget(watch)
        watch.report = app
        kernel = self._kernels.get(watch.kernel_id)
        if lost and kernel is not None and kernel.watch is watch and not kernel.exited.called:
            kernel.exited.callback(ExitStatus(lost=True, detail=describe_app(app)))
        if not watch.ended.called:
            watch.ended.callback(app)

    def forget(self, kernel: YarnKernel) -> None:
        """A kernel has ended: drop its launch registration and its watch."""
        kernel.remote.cleanup()
        self.watcher.forget(kernel.watch)
        if self._kernels.get(kernel.watch.kernel_id) is kernel:
            del self._kernels[kernel.watch.kernel_id]


def spark_session_module(launcher_path: str) -> str:
    """The SparkSession module for a launcher at ``launcher_path``: the one beside it, else this egd's own (a
    launcher copied before the module existed)."""
    beside = os.path.join(os.path.dirname(launcher_path), SPARK_SESSION_MODULE)
    if os.path.isfile(beside):
        return beside
    return os.path.join(os.path.dirname(DEFAULT_LAUNCHER), SPARK_SESSION_MODULE)


def _report_progress(request: LaunchRequest, app: dict[str, Any]) -> None:
    """YARN's view of a launching kernel's application, in the log and in the kernel's model."""
    text = describe_app(app)
    log.info("kernel {kernel_id}: {text}", kernel_id=request.kernel_id, text=text)
    request.progress(text)


def _kill_quietly(process: Any) -> None:
    """SIGKILL a helper process that may have ended already."""
    try:
        process.signalProcess("KILL")
    except Exception:
        pass


def _is_local(address: str) -> bool:
    """Whether ``address`` belongs to this machine (it can be bound here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True
