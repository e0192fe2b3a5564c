"""The ``docker`` driver: each kernel is a container of a Docker Engine API (dockerd, or podman's compatible
service); egd's launcher in it reports back (``docs/docker.rst``).

- **The container** is created from the kernelspec's image (or an allowed ``KERNEL_IMAGE``) with the checked
  resources, user and volumes (:func:`egd.drivers.containers.kernel_container`), labelled with the driver's label,
  the kernel id and the user, under the engine's init (so that a stop is quick) and ``no-new-privileges``. The
  launcher, its protocol module and the launch's secrets are put into it as a tar (``PUT .../archive``) before it
  starts: the image needs only a Python, and no secret is on a command line or in the container's environment.
- **One events stream** (``GET /events`` filtered by the driver's label) follows every kernel container: a
  container that dies or is removed from outside ends its kernel at once. After a disconnect the stream resumes
  from the last event's time, and the containers are listed to catch what happened while it was away.
- **Stopping**: egd asks the launcher to shut the kernel down, then removes the container (``force``, with its
  anonymous volumes).
- **Re-attach** after egd restarts: the container is found by its labels and the launcher must answer a signed
  ping; otherwise the container is removed.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote, urlparse

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from egd.checks import Checker, number, optional, seconds, settings_of, text
from egd.driverapi import ExitStatus, IDriverReactor, LaunchedKernel, LaunchRequest
from egd.drivers.containers import (
    BUNDLE_DIR,
    LABEL_DRIVER,
    LABEL_KERNEL,
    LABEL_USER,
    ContainerDriver,
    ContainerKernel,
    ContainerSettings,
    KernelContainer,
    bundle_files,
    kernel_container,
    launcher_command,
    manifest,
)
from egd.drivers.http_api import ApiError, ApiUnavailable, JsonApi, LineStream, ServerTLS
from egd.egprotocol import EgKernel
from egd.egspecs import uses_eg_protocol
from egd.errors import BadRequest, LaunchFailed, LaunchTimeout, ServiceUnavailable
from egd.remote import Registration, RemoteKernel, await_report, launcher_arguments
from egd.util import describe, shield

log = Logger()

#: Event actions that mean a kernel's container has ended (or is gone): podman says ``remove`` where dockerd says
#: ``destroy``.
_ENDING = ("die", "destroy", "remove", "oom")
_REMOVED = ("destroy", "remove")
_VOLUME_TYPES = ("bind", "volume")


def _volume_offers_ok(offers: Mapping[str, Any]) -> list[str]:
    """``"volumes.<name>: ..."`` for each offer that is not ``{source, target, read_only, type}`` as Docker wants."""
    found = []
    for name, offer in offers.items():
        where = f"volumes.{name}"
        unknown = set(offer) - {"source", "target", "read_only", "type"}
        if unknown:
            found.append(f"{where}: unknown keys {', '.join(sorted(unknown))} (source, target, read_only, type)")
        kind = offer.get("type", "bind")
        if kind not in _VOLUME_TYPES:
            found.append(f"{where}.type: must be bind or volume")
        source, target = offer.get("source"), offer.get("target")
        if not isinstance(source, str) or not source:
            found.append(f"{where}.source: a host path (bind) or a volume name (volume) is required")
        elif kind == "bind" and not os.path.isabs(source):
            found.append(f"{where}.source: a bind mount's source must be an absolute host path")
        if not isinstance(target, str) or not os.path.isabs(target or ""):
            found.append(f"{where}.target: an absolute path in the container is required")
        if not isinstance(offer.get("read_only", False), bool):
            found.append(f"{where}.read_only: must be true or false")
    return found


@dataclass(frozen=True, kw_only=True)
class DockerSettings(ContainerSettings):
    """``drivers.docker`` (documented in ``conf/docker.yaml``)."""

    #: The engine: ``unix:///path/to/socket``, or ``tcp://host:port`` (TLS when ``tls_ca`` is set).
    url: str = "unix:///var/run/docker.sock"
    #: PEM files for TLS to a tcp engine: the CA that signed the engine's certificate, egd's certificate and key.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: The Engine API version every path is prefixed with (1.41: dockerd 20.10, podman 4).
    api_version: str = "1.41"
    #: The containers' NetworkMode (None: the engine's default bridge); the callback host must be reachable
    #: from it, and egd must reach the containers' addresses on it.
    network: str | None = None
    #: A body of ``POST /containers/create`` every kernel container starts from (a kernelspec's own
    #: ``container_template`` replaces it): mounts, network, extra labels, an image's command for EG's images.
    container_template: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds the engine gives a container between SIGTERM and SIGKILL (its StopTimeout).
    stop_timeout: int = 5
    request_timeout: float = 10.0

    schema: ClassVar[Mapping[str, Checker]] = {
        **ContainerSettings.schema,
        "url": text,
        "tls_ca": optional(text),
        "tls_cert": optional(text),
        "tls_key": optional(text),
        "api_version": text,
        "network": optional(text),
        "container_template": manifest("a body of POST /containers/create"),
        "stop_timeout": number(0, 3600, integer=True),
        "request_timeout": seconds,
    }

    def problems(self) -> list[str]:
        """The URL's scheme, TLS files in pairs, the volume offers' shape."""
        found = list(super().problems())
        parsed = urlparse(self.url)
        if parsed.scheme not in ("unix", "tcp", "http", "https") or not (parsed.path if parsed.scheme == "unix"
                                                                          else parsed.hostname):
            found.append(f"url: must be unix:///path/to/docker.sock or tcp://host:port, not {self.url!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            found.append("tls_cert, tls_key: give both or neither")
        if not self.api_version.replace(".", "").isdigit():
            found.append("api_version: a version such as 1.41")
        found += _volume_offers_ok(self.volumes)
        return found


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    """Every request goes to the engine's unix socket (the URL's host is only a name)."""

    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:  # noqa: N802 - Twisted interface
        """The socket."""
        return UNIXClientEndpoint(self._reactor, self._path, timeout=10)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(os.path.expanduser(path), "rb") as handle:
        return handle.read()


class DockerAPI(JsonApi):
    """Calls to a Docker Engine API (``requests`` counts them)."""

    def __init__(self, reactor: IDriverReactor, settings: DockerSettings) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 8
        parsed = urlparse(settings.url)
        agent: Any
        if parsed.scheme == "unix":
            agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(reactor, parsed.path), pool=pool)
            base = "http://docker"
            self.where = parsed.path
        else:
            tls = settings.tls_ca is not None or parsed.scheme == "https"
            scheme = "https" if tls else "http"
            base = f"{scheme}://{parsed.netloc}"
            context = ServerTLS(_read(settings.tls_ca), _read(settings.tls_cert), _read(settings.tls_key))
            agent = Agent(reactor, contextFactory=context, pool=pool, connectTimeout=settings.request_timeout)
            self.where = base
        super().__init__(reactor, f"{base}/v{settings.api_version}", agent, pool, settings.request_timeout,
                         what="Docker Engine API")


def demultiplex(data: bytes) -> str:
    """A container log as text: the 8-byte frame headers of a log without a TTY taken out (stdout and stderr in
    the order written); a log that is not framed is taken as it is."""
    out = bytearray()
    rest = data
    while len(rest) >= 8 and rest[0] in (0, 1, 2) and rest[1:4] == b"\0\0\0":
        size = int.from_bytes(rest[4:8], "big")
        out += rest[8:8 + size]
        rest = rest[8 + size:]
    out += rest
    return out.decode("utf-8", "replace")


def container_name(kernel_id: str) -> str:
    """The container name of a kernel."""
    return f"egd-kernel-{kernel_id}"


def bundle_tar(files: Mapping[str, bytes], uid: int, gid: int) -> bytes:
    """A tar of ``files`` at :data:`BUNDLE_DIR` relative to ``/`` (only the directory itself and its files: an entry
    for ``var`` or ``var/run`` would replace the image's ``/var/run -> /run`` symlink), owned by the kernel's user
    and readable by anyone in the container (the container holds nothing but this kernel)."""
    buffer = io.BytesIO()
    top = BUNDLE_DIR.strip("/")
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entry = tarfile.TarInfo(top)
        entry.type, entry.mode, entry.uid, entry.gid, entry.mtime = tarfile.DIRTYPE, 0o555, uid, gid, now
        tar.addfile(entry)
        for name, data in sorted(files.items()):
            entry = tarfile.TarInfo(f"{top}/{name}")
            entry.size, entry.mode, entry.uid, entry.gid, entry.mtime = len(data), 0o444, uid, gid, now
            tar.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def exit_status(event: Mapping[str, Any]) -> ExitStatus:
    """How a container ended, from a ``die``/``destroy``/``oom`` event (or a container's listing)."""
    action = str(event.get("Action") or event.get("status") or "")
    attributes = (event.get("Actor") or {}).get("Attributes") or {}
    code = attributes.get("exitCode")
    if action in _REMOVED:
        return ExitStatus(detail="its container was removed")
    if action == "oom":
        return ExitStatus(detail="its container ran out of memory")
    if isinstance(code, str) and code.lstrip("-").isdigit():
        number_ = int(code)
        if number_ > 128:
            return ExitStatus(None, number_ - 128, detail="its container died")
        return ExitStatus(number_, detail="its container exited")
    return ExitStatus(detail=f"its container reported {action or 'its end'}")


@dataclass
class ContainerTrack:
    """What the driver knows of one kernel's container, fed by the events stream."""

    kernel_id: str
    name: str
    id: str = ""
    ended: Deferred[ExitStatus] = field(default_factory=Deferred)
    removed: bool = False
    removal: Deferred[None] | None = None
    reason: str = ""

    def end(self, status: ExitStatus) -> None:
        """The container has ended (once)."""
        if not self.ended.called:
            log.info("kernel {kernel_id}: container {name} ended: {how}", kernel_id=self.kernel_id, name=self.name,
                     how=status.describe())
            self.ended.callback(status)


class DockerKernel(ContainerKernel):
    """A kernel in a container (:class:`egd.driverapi.LaunchedKernel`)."""

    def __init__(self, driver: DockerDriver, remote: RemoteKernel | EgKernel, track: ContainerTrack,
                 user: str) -> None:
        super().__init__(remote, track.kernel_id, user)
        self._driver = driver
        self.track = track
        self._finishing: Deferred[None] | None = None
        remote.exited.addCallback(self._ending)
        track.ended.addCallback(self._ending)

    def _ending(self, status: ExitStatus) -> ExitStatus:
        """The kernel ended (its launcher said so, or its container died): the container's last words are kept
        and the container removed before egd hears of the end, so that a restart under the same name, or the
        answer to a DELETE, finds it gone."""
        if self._finishing is None:
            self._finishing = Deferred.fromCoroutine(self._driver.finish(self.track))
            self._finishing.addErrback(lambda f: log.failure("kernel {kernel_id}: removing its container failed", f,
                                                             kernel_id=self.track.kernel_id))
            self._finishing.addBoth(lambda _: self._ended(status))
        return status

    def describe(self) -> str:
        """Container and address."""
        return (f"container {self.track.name} ({self.track.id[:12]}, {self.connection_info['ip']})"
                f"{self.launcher_note()}")

    def failure_detail(self) -> str:
        """What the driver last learnt of the container."""
        return self.track.reason

    def kill(self) -> Deferred[None]:
        """The launcher ends the kernel, then the container is removed."""
        async def kill() -> None:
            await self.remote.kill()
            await self._driver.remove_container(self.track)
            if self._finishing is not None:
                await shield(self._finishing)
            self._ended(ExitStatus(None, 9))

        return Deferred.fromCoroutine(kill())

    def cleanup(self) -> None:
        """Forget the launch; the container goes (in the background)."""
        self.remote.cleanup()
        done = Deferred.fromCoroutine(self._driver.remove(self.track))
        done.addErrback(lambda f: log.failure("kernel {kernel_id}: removing its container failed", f,
                                              kernel_id=self.track.kernel_id))

    def persistent_state(self) -> dict[str, Any]:
        """Which container, and how to reach its launcher."""
        return {"container": self.track.id, "name": self.track.name, "user": self.user,
                "remote": self.remote.persistent_state()}


class EventStream:
    """One ``GET /events`` for every container of the driver's label, resumed after a disconnect; after each
    (re)connection the containers are listed, to catch an end that happened while the stream was away."""

    def __init__(self, reactor: IDriverReactor, api: DockerAPI, label: str, on_event: Any, on_listing: Any,
                 known: Any) -> None:
        self._reactor = reactor
        self._known = known
        self._api = api
        self._filters = json.dumps({"type": ["container"], "label": [f"{LABEL_DRIVER}={label}"]})
        self._listing_filters = json.dumps({"label": [f"{LABEL_DRIVER}={label}"]})
        self._on_event = on_event
        self._on_listing = on_listing
        self._since: str | None = None
        self._running = False
        self._stream: LineStream | None = None
        self._loop: Deferred[None] | None = None
        #: Fires once the stream is open and the first listing is in.
        self.synced: Deferred[None] = Deferred()
        self.connects = 0

    def start(self) -> None:
        """Begin following, until :meth:`stop`."""
        self._running = True
        self._since = f"{self._reactor.seconds():.9f}"
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.failure("docker: the events stream stopped on an error", f))

    def stop(self) -> Deferred[None] | None:
        """Stop following; fires when the loop has ended."""
        self._running = False
        if self._stream is not None:
            self._stream.stop()
        return self._loop

    async def _run(self) -> None:
        failures = 0
        while self._running:
            try:
                params = {"filters": self._filters}
                if self._since:
                    params["since"] = self._since
                self.connects += 1
                stream = await self._api.stream("/events", params, self._event)
                self._stream = stream
                if not self._running:
                    stream.stop()
                    break
                # Only what was known before the listing is judged by it (a container created meanwhile is not in it).
                known = self._known()
                _, listing = await self._api.call("GET", "/containers/json",
                                                  {"all": "1", "filters": self._listing_filters})
                self._on_listing(known, [c for c in listing or [] if isinstance(c, dict)])
                if not self.synced.called:
                    self.synced.callback(None)
                failures = 0
                await stream.done
            except Exception as exc:
                failures += 1
                if self._running:
                    log.warn("docker: following the kernel containers' events failed ({why}); retrying",
                             why=describe(exc))
            finally:
                self._stream = None
            if self._running:
                await deferLater(self._reactor, min(0.25 * 2 ** min(failures, 5), 5.0), lambda: None)

    def _event(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        nanos = event.get("timeNano")
        if isinstance(nanos, int) and nanos > 0:
            # Resume from this event's time: ``since`` is inclusive, so an end may come twice (and counts once).
            self._since = f"{nanos // 1_000_000_000}.{nanos % 1_000_000_000:09d}"
        self._on_event(event)


class DockerDriver(ContainerDriver):
    """Launches kernels as containers of a Docker Engine API and follows them all through one events stream."""

    settings_type = DockerSettings
    settings: DockerSettings
    api: DockerAPI | None

    def __init__(self, reactor: IDriverReactor, settings: DockerSettings | Mapping[str, Any], runtime_dir: str,
                 port_range: tuple[int, int] | None) -> None:
        settings = settings_of(DockerSettings, settings, "drivers.docker")
        super().__init__("docker", reactor, settings, port_range)
        self._label = settings.label
        #: Tracks by container id, and the kernel's current track by kernel id.
        self._by_id: dict[str, ContainerTrack] = {}
        self._tracks: dict[str, ContainerTrack] = {}
        if reactor is not None:
            parsed = urlparse(settings.url)
            if parsed.scheme == "unix" and not os.path.exists(parsed.path):
                raise ValueError(f"drivers.docker.url: no engine socket at {parsed.path}")
            try:
                self.api = DockerAPI(reactor, settings)
            except OSError as exc:
                raise ValueError(f"drivers.docker.tls_*: {exc}") from None
            self.follower = EventStream(reactor, self.api, self._label, self._event, self._listing,
                                        lambda: set(self._by_id))

    def _api(self) -> DockerAPI:
        if self.api is None:
            raise ServiceUnavailable("the docker driver is not running")
        return self.api

    def _event(self, event: dict[str, Any]) -> None:
        actor = event.get("Actor") or {}
        track = self._by_id.get(str(actor.get("ID") or event.get("id") or ""))
        action = str(event.get("Action") or event.get("status") or "")
        if track is None:
            return
        if action in _REMOVED:
            track.removed = True
        # (``kill`` is only a signal, which the container may survive: its ``die`` follows if it does not.)
        if action in _ENDING:
            track.reason = f"container {track.name}: {action}"
            track.end(exit_status(event))

    def _listing(self, known: set[str], containers: list[dict[str, Any]]) -> None:
        """After a (re)connection: tracked containers (of those ``known`` before the listing) that are gone or no
        longer run have ended."""
        states = {str(c.get("Id")): str(c.get("State") or "") for c in containers}
        for container_id in known:
            track = self._by_id.get(container_id)
            if track is None:
                continue
            state = states.get(container_id)
            if state is None:
                track.removed = True
                track.end(ExitStatus(detail="its container was removed"))
            elif state in ("exited", "dead"):
                track.end(ExitStatus(detail=f"its container has {state}"))

    # -- launching --------------------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Create the kernel's container, put the launcher into it, start it, and wait for the launcher."""
        return Deferred.fromCoroutine(self._launch(request))

    async def _launch(self, request: LaunchRequest) -> LaunchedKernel:
        api = self._api()
        started = self._reactor.seconds()
        eg = uses_eg_protocol(request.spec.argv)
        user = self._user(request)
        container = kernel_container(request, self.settings, request.spec.driver_config.get("image_name"))
        registration = self.listener.register(request.kernel_id, eg=eg)
        key = uuid.uuid4().hex
        if eg:
            # EG's launch_docker.py would start the image's own command (EG's bootstrap-kernel.sh) with this
            # environment; egd creates that container itself.
            body = self.build_container(request, user, container, None, await self.eg_environment(request, {}))
        else:
            args = launcher_arguments(request, self.listener.address, self._port_range, request.spec.argv,
                                      "--bind-ip", "0.0.0.0")
            body = self.build_container(request, user, container, launcher_command(self.settings, args))
        track = ContainerTrack(request.kernel_id, container_name(request.kernel_id))
        self._tracks[request.kernel_id] = track
        secrets = {"secret": registration.secret.decode(), "key": key, "env": dict(request.env)}
        try:
            request.progress(f"creating container {track.name} from {container.image}")
            await self._create(api, track, body)
            if not eg:
                await self._put_bundle(api, track, bundle_tar(bundle_files(self._launcher, secrets),
                                                              container.uid, container.gid))
            try:
                await api.call("POST", f"/containers/{track.id}/start")
            except ApiError as exc:
                raise LaunchFailed(f"the engine could not start container {track.name}: {exc.message}") from None
            if eg:
                # EG's launcher reports with no signature: its payload is taken only from the container's address.
                registration.expect_peers(await self._addresses(api, track))
            track.reason = f"container {track.name} running; waiting for the kernel to report"
            request.progress(track.reason)
            info = await self._wait_ready(request, registration, track, started)
        except BaseException:
            self.listener.unregister(registration)
            removing = Deferred.fromCoroutine(self.remove(track))
            removing.addErrback(lambda f: log.failure("kernel {kernel_id}: removing a failed launch's container "
                                                      "failed", f, kernel_id=request.kernel_id))
            await removing
            raise
        remote = self.launched(request.kernel_id, registration, info, key, f"container {track.name}")
        kernel = DockerKernel(self, remote, track, user)
        log.info("kernel {kernel_id}: runs in {where}", kernel_id=request.kernel_id, where=kernel.describe())
        return kernel

    async def _addresses(self, api: DockerAPI, track: ContainerTrack) -> frozenset[str]:
        """The container's addresses on its networks (an EG launcher's report may come only from one)."""
        _, data = await api.call("GET", f"/containers/{track.id}/json")
        networks = ((data or {}).get("NetworkSettings") or {}).get("Networks") or {}
        found = {str(n.get("IPAddress")) for n in networks.values() if isinstance(n, dict) and n.get("IPAddress")}
        if not found:
            raise LaunchFailed(f"container {track.name} has no address on a network egd can reach")
        return frozenset(found)

    def build_container(self, request: LaunchRequest, user: str, container: KernelContainer,
                        command: list[str] | None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The body of ``POST /containers/create`` (structured; no client value is parsed as text): the
        kernelspec's or the driver's ``container_template`` with egd's parts set. Without a ``command`` (EG's
        kernel images) the template's or the image's own command runs, with ``env`` added."""
        template = copy.deepcopy(dict(request.spec.driver_config.get("container_template")
                                      or self.settings.container_template))
        host: dict[str, Any] = {**(template.pop("HostConfig", None) or {}), "Init": True,
                                "SecurityOpt": ["no-new-privileges"], "AutoRemove": False}
        cpus = container.cpus_limit or container.cpus
        if cpus:
            host["NanoCpus"] = round(cpus * 1e9)
        if container.cpus_limit and container.cpus and container.cpus_limit < container.cpus:
            raise BadRequest("KERNEL_CPUS_LIMIT must not be less than KERNEL_CPUS")
        if container.memory_limit and container.memory and container.memory_limit < container.memory:
            raise BadRequest("KERNEL_MEMORY_LIMIT must not be less than KERNEL_MEMORY")
        memory = container.memory_limit or container.memory
        if memory:
            host["Memory"] = memory
            if container.memory_limit and container.memory:
                host["MemoryReservation"] = container.memory
        if container.gpus:
            host["DeviceRequests"] = [{"Driver": "", "Count": container.gpus, "Capabilities": [["gpu"]]}]
        network = request.spec.driver_config.get("network") or self.settings.network
        if network:
            host["NetworkMode"] = str(network)
        mounts = list(host.get("Mounts") or [])
        for name in container.volumes:
            offer = self.settings.volumes[name]
            mounts.append({"Type": str(offer.get("type", "bind")), "Source": str(offer["source"]),
                           "Target": str(offer["target"]), "ReadOnly": bool(offer.get("read_only", False))})
        if mounts:
            host["Mounts"] = mounts
        labels = {**(template.get("Labels") or {}), LABEL_DRIVER: self._label, LABEL_KERNEL: request.kernel_id,
                  LABEL_USER: user, "egd.jupyter.org/kernelspec": request.spec.name}
        # No secret in Env: the launch's secrets and the kernel's env travel in the bundle (EG's launcher has none).
        variables = {"HOME": "/tmp", **dict(str(e).split("=", 1) for e in template.get("Env") or [] if "=" in str(e)),
                     **(env or {})}
        body = {**template, "Image": container.image, "User": f"{container.uid}:{container.gid}",
                "Env": [f"{k}={v}" for k, v in variables.items()], "Labels": labels,
                "StopTimeout": self.settings.stop_timeout, "AttachStdin": False, "AttachStdout": False,
                "AttachStderr": False, "Tty": False, "HostConfig": host}
        if command is not None:
            body["Cmd"] = command
            body.pop("Entrypoint", None)
        return body

    async def _create(self, api: DockerAPI, track: ContainerTrack, body: dict[str, Any]) -> None:
        """Create the container; one left behind under the kernel's name by an earlier egd is removed first."""
        for attempt in (1, 2):
            try:
                _, created = await api.call("POST", "/containers/create", {"name": track.name}, body=body)
            except ApiError as exc:
                if exc.code == 409 and attempt == 1 and await self._remove_stale(api, track.name):
                    continue
                if exc.code == 404:
                    raise LaunchFailed(f"image {body['Image']!r} is not on the engine: {exc.message}") from None
                raise LaunchFailed(f"the engine refused container {track.name}: {exc.message}") from None
            track.id = str((created or {}).get("Id") or "")
            if not track.id:
                raise LaunchFailed(f"the engine did not say which container it created for {track.name}")
            self._by_id[track.id] = track
            return

    async def delete_container(self, container_id: str) -> None:
        """``DELETE /containers/{id}?force=1&v=1``, and gone when it returns (also when another removal of it was
        under way: the engine answers 409 then, and the driver waits for it to finish)."""
        api = self._api()
        status, _ = await api.call("DELETE", f"/containers/{container_id}", {"force": "1", "v": "1"}, ok=(404, 409))
        if status != 409:
            return
        deadline = self._reactor.seconds() + self.settings.request_timeout
        while self._reactor.seconds() < deadline:
            status, _ = await api.call("GET", f"/containers/{container_id}/json", ok=(404,))
            if status == 404:
                return
            await deferLater(self._reactor, 0.2, lambda: None)
        raise ServiceUnavailable(f"container {container_id[:12]} was not removed within "
                                 f"{self.settings.request_timeout:g}s")

    async def _remove_stale(self, api: DockerAPI, name: str) -> bool:
        """Remove a container of this driver named ``name`` (left by an egd that died); whether there was one."""
        status, data = await api.call("GET", f"/containers/{quote(name)}/json", ok=(404,))
        labels = ((data or {}).get("Config") or {}).get("Labels") or {}
        if status == 404 or labels.get(LABEL_DRIVER) != self._label:
            return False
        log.warn("removing container {name}, left behind by an earlier gateway", name=name)
        await self.delete_container(str(data["Id"]))
        return True

    async def _put_bundle(self, api: DockerAPI, track: ContainerTrack, tar: bytes) -> None:
        try:
            await api.call("PUT", f"/containers/{track.id}/archive", {"path": "/", "noOverwriteDirNonDir": "1"},
                           raw=tar, content_type="application/x-tar")
        except ApiError as exc:
            raise LaunchFailed(f"the engine could not put the launcher into container {track.name}: "
                               f"{exc.message}") from None

    async def _wait_ready(self, request: LaunchRequest, registration: Registration, track: ContainerTrack,
                          started: float) -> dict[str, Any]:
        """The launcher's connection info, unless the container ends or the launch timeout passes."""
        kind, value = await await_report(self._reactor, registration, track.ended,
                                         request.timeout - (self._reactor.seconds() - started))
        if kind == "ready":
            return dict(value)
        where = f"container {track.name}"
        logs = await self._log_tail(track)
        tail = f"; its log ends: {logs}" if logs else ""
        if kind == "refused":
            raise LaunchFailed(f"the kernel failed to start in {where}: {value}{tail}")
        if kind == "ended":
            raise LaunchFailed(f"{where} ended before the kernel reported ({value.describe()}){tail}")
        raise LaunchTimeout(f"the kernel did not start within {request.timeout:g} seconds in {where}{tail}")

    async def _log_tail(self, track: ContainerTrack) -> str:
        """The last lines the container wrote (why it ended), or nothing."""
        if not track.id:
            return ""
        try:
            data = await self._api().content(f"/containers/{track.id}/logs",
                                             {"stdout": "1", "stderr": "1", "tail": "15"})
        except (ApiError, ApiUnavailable):
            return ""
        return " | ".join(line for line in demultiplex(data).splitlines() if line.strip())[-1500:]

    # -- stopping -------------------------------------------------------------------------------------------

    async def remove_container(self, track: ContainerTrack) -> None:
        """Remove the kernel's container (killing what still runs in it) and its anonymous volumes; one removal
        per container, which every caller (kill, cleanup, a failed launch) awaits."""
        if track.removed or not track.id:
            return
        if track.removal is None:
            track.removal = Deferred.fromCoroutine(self._delete(track))
        try:
            await shield(track.removal)
        except BaseException:
            track.removal = None  # a later caller tries again
            raise

    async def _delete(self, track: ContainerTrack) -> None:
        await self.delete_container(track.id)
        track.removed = True
        track.end(ExitStatus(None, 9, detail="its container was removed"))

    async def finish(self, track: ContainerTrack) -> None:
        """A kernel has ended: keep its container's log tail (its failure detail), then remove the container; within
        the request timeout, whatever the engine does."""
        async def finish() -> None:
            if not track.removed:
                tail = await self._log_tail(track)
                if tail:
                    track.reason = f"container {track.name}: {tail}"
            await self.remove(track)

        finishing = Deferred.fromCoroutine(finish())
        finishing.addTimeout(2 * self.settings.request_timeout, self._reactor)
        try:
            await finishing
        except Exception as exc:
            log.warn("kernel {kernel_id}: container {name} may be left: {why}", kernel_id=track.kernel_id,
                     name=track.name, why=describe(exc))

    async def remove(self, track: ContainerTrack) -> None:
        """Everything of a kernel: its container, and the driver's memory of it."""
        if self._tracks.get(track.kernel_id) is track:
            del self._tracks[track.kernel_id]
        try:
            await self.remove_container(track)
        except (ApiError, ApiUnavailable, ServiceUnavailable) as exc:
            log.warn("kernel {kernel_id}: could not remove container {name}: {why}", kernel_id=track.kernel_id,
                     name=track.name, why=describe(exc))
        finally:
            if track.removed:
                self._by_id.pop(track.id, None)

    async def remove_kernel_of(self, kernel_id: str) -> None:
        """The kernel's container goes."""
        track = self._tracks.get(kernel_id)
        if track is not None:
            await self.remove_container(track)

    # -- re-attaching ---------------------------------------------------------------------------------------

    def sweep_unknown(self, known: frozenset[str], older_than: float) -> Deferred[int]:
        """Remove this driver's kernel containers that belong to no kernel in ``known`` or in progress here and
        were created more than ``older_than`` seconds ago; how many."""
        async def sweep() -> int:
            api = self._api()
            filters = json.dumps({"label": [f"{LABEL_DRIVER}={self._label}"]})
            _, found = await api.call("GET", "/containers/json", {"all": "1", "filters": filters})
            removed = 0
            for container in found or []:
                kernel_id = str((container.get("Labels") or {}).get(LABEL_KERNEL) or "")
                created = container.get("Created")
                age = self._reactor.seconds() - created if isinstance(created, (int, float)) else 0.0
                if kernel_id in known or kernel_id in self._tracks or age < older_than:
                    continue
                log.warn("kernel {kernel_id}: container {name} belongs to no kernel egd knows (a launch cut short); "
                         "removing it", kernel_id=kernel_id, name=(container.get("Names") or ["?"])[0])
                await self.delete_container(str(container.get("Id")))
                removed += 1
            return removed

        return Deferred.fromCoroutine(sweep())


    def reattach(self, kernel_id: str, state: Mapping[str, Any], connection_info: dict[str, Any]) -> Deferred[Any]:
        """The kernel a previous gateway started, found by its labels, if its launcher answers a signed ping;
        ``LookupError`` otherwise (a container left behind is removed)."""
        async def reattach() -> DockerKernel:
            api = self._api()
            filters = json.dumps({"label": [f"{LABEL_DRIVER}={self._label}", f"{LABEL_KERNEL}={kernel_id}"]})
            _, found = await api.call("GET", "/containers/json", {"all": "1", "filters": filters})
            containers = [c for c in found or [] if isinstance(c, dict)]
            track = ContainerTrack(kernel_id, str(state.get("name") or container_name(kernel_id)))
            if not containers:
                raise LookupError(f"its container {track.name} is gone")
            track.id = str(containers[0].get("Id"))
            self._by_id[track.id] = track
            for extra in containers[1:]:
                await self.delete_container(str(extra.get("Id")))
            # A paused container is still there: its launcher's answer (or silence) decides.
            if containers[0].get("State") not in ("running", "paused"):
                how = containers[0].get("Status") or containers[0].get("State")
                await self.remove(track)
                raise LookupError(f"its container {track.name} has ended ({how}); removed")
            self._tracks[kernel_id] = track
            try:
                remote = await self.reattached(kernel_id, state["remote"], str(connection_info["key"]),
                                               f"container {track.name}")
            except LookupError as exc:
                await self.remove(track)
                raise LookupError(f"{exc}; container {track.name} removed") from None
            kernel = DockerKernel(self, remote, track, str(state.get("user") or ""))
            log.info("kernel {kernel_id}: re-attached to {where}", kernel_id=kernel_id, where=kernel.describe())
            return kernel

        return Deferred.fromCoroutine(reattach())
