"""What the container drivers (``kubernetes``, ``docker``) share: the settings of kernels in containers, the
checking of a launch's ``KERNEL_*`` requests against what the operator allows, and the launcher bundle.

:class:`ContainerDriver` is what both drivers are built on.

A client may ask, with Enterprise Gateway's variables, for an image (``KERNEL_IMAGE``, only from the allow-list),
resources (``KERNEL_CPUS``, ``KERNEL_MEMORY``, ``KERNEL_GPUS`` and their ``*_LIMIT`` forms, within the maxima), a
user id (``KERNEL_UID``/``KERNEL_GID``, only where allowed, root only where root is allowed), and, egd's own,
volumes by name (``KERNEL_VOLUMES``: names the operator offers). Anything outside is refused before anything is
created, with a 400 or 403 that names the variable and what it may be.

The launcher reaches the container as files (the bundle): egd's launcher and its protocol module, and the
launch's secrets. So any image with a Python 3 runs kernels, and the launcher is always this egd's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, maybeDeferred

from egd.checks import Checker, boolean, number, optional, refused, strings, text
from egd.driverapi import ExitStatus, IDriverReactor, LaunchRequest
from egd.drivers.http_api import JsonApi
from egd.drivertools import DEFAULT_LAUNCHER, LAUNCHER_FILES, LauncherSettings, impersonated_user
from egd.egprotocol import EgKernel
from egd.egspecs import eg_port_range
from egd.errors import BadRequest, Forbidden
from egd.remote import LaunchListener, Registration, RemoteKernel, reattach_remote
from egd.service import AsyncMultiService

#: The labels of every kernel's pod or container: the driver's ``label`` setting, the kernel id, its user.
LABEL_DRIVER = "egd.jupyter.org/driver"
LABEL_KERNEL = "egd.jupyter.org/kernel-id"
LABEL_USER = "egd.jupyter.org/user"
#: Where the bundle is in the container.
BUNDLE_DIR = "/var/run/egd-launch"
SECRETS_NAME = "launch.json"
_CPU = re.compile(r"^(\d{1,6}(?:\.\d{1,3})?)(m?)\Z")
_MEMORY = re.compile(r"^(\d{1,15}(?:\.\d{1,3})?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?\Z")
_MEMORY_UNITS = {None: 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
                 "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
_VOLUME_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")


def parse_cpus(value: str, what: str) -> float:
    """``"2"``, ``"0.5"`` or ``"500m"`` as a number of CPUs; :class:`BadRequest` naming ``what`` otherwise."""
    match = _CPU.match(value.strip())
    if not match:
        raise BadRequest(f"{what} must be a number of CPUs such as 2, 0.5 or 500m")
    cpus = float(match.group(1)) / (1000 if match.group(2) else 1)
    if cpus <= 0:
        raise BadRequest(f"{what} must be more than 0")
    return cpus


def parse_memory(value: str, what: str) -> int:
    """A Kubernetes quantity of memory (``512Mi``, ``2Gi``, ``1G``, bytes) in bytes; :class:`BadRequest`
    naming ``what`` otherwise."""
    match = _MEMORY.match(value.strip())
    if not match:
        raise BadRequest(f"{what} must be an amount of memory such as 512Mi, 2Gi or 1G")
    amount = int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])
    if amount < 4 * 1024 * 1024:
        raise BadRequest(f"{what} must be at least 4Mi")
    return amount


def _gpus(value: str, what: str) -> int:
    if not value.strip().isdigit() or len(value.strip()) > 3:
        raise BadRequest(f"{what} must be a whole number of GPUs")
    return int(value)


def manifest(what: str) -> Checker:
    """A checker of a mapping setting that is a template of the engine's own (``what`` says which, for the
    message): a Pod manifest, a container's create body."""
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, dict):
            problems.append(f"{path}: must be a mapping ({what})")
            return None
        return value

    return check


def _volume_offers(value: Any, path: str, problems: list[str]) -> Any:
    """``volumes``: a mapping of names (DNS labels) to what each mounts (the driver checks the inside)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and _VOLUME_NAME.match(k) and isinstance(v, dict)
                                              for k, v in value.items()):
        problems.append(f"{path}: must map volume names (lowercase letters, digits, '-') to their settings")
        return None
    return dict(value)


@dataclass(frozen=True, kw_only=True)
class ContainerSettings(LauncherSettings):
    """Settings shared by the container drivers (on top of the launcher's)."""

    #: The image of kernels whose kernelspec names none.
    image: str | None = None
    #: Images a client may ask for with KERNEL_IMAGE (besides each kernelspec's own image and ``images``).
    images: tuple[str, ...] = ()
    #: The Python that runs the launcher in the image.
    python: str | None = "python3"
    #: ``bundle``: egd puts its launcher into the container with the secrets; ``image``: the image has it at
    #: ``launcher_path``.
    launcher: str = "bundle"
    max_cpus: float = 4.0
    max_memory: str = "8Gi"
    max_gpus: int = 0
    #: Honour KERNEL_UID / KERNEL_GID; root (0) only with ``allow_root``.
    allow_uid: bool = False
    allow_root: bool = False
    #: The user and group kernels run as unless the kernelspec or an allowed KERNEL_UID says otherwise (EG's).
    uid: int = 1000
    gid: int = 100
    #: Volumes a client may ask for by name with KERNEL_VOLUMES (their shape is the driver's).
    volumes: Mapping[str, Any] = field(default_factory=dict)
    #: The label value that marks this gateway's kernels (``egd.jupyter.org/driver``).
    label: str = "egd"
    #: Where egd listens for launchers (None: ``callback_host``): 0.0.0.0 when ``callback_host`` comes and goes (a
    #: container bridge's address) or is the pod's own (``${POD_IP}``, an environment variable).
    callback_bind: str | None = None

    schema: ClassVar[Mapping[str, Checker]] = {
        **LauncherSettings.schema,
        # Every kernel has a container of its own and runs as a uid, never as an account of the gateway's host.
        "user": refused("not used by container kernels: they run as uid and gid (and, with allow_uid, as the "
                        "KERNEL_UID their user asks for); there is no account to name"),
        "impersonation": refused("not used by container kernels: each runs in a container of its own, as uid and "
                                 "gid; allow_uid lets a kernel run as the KERNEL_UID its user asks for",
                                 harmless=(None, False)),
        "image": optional(text),
        "images": strings,
        "launcher": lambda value, path, problems: _choice(value, path, problems, ("bundle", "image")),
        "max_cpus": number(0.001, 1024),
        "max_memory": text,
        "max_gpus": number(0, 64, integer=True),
        "allow_uid": boolean,
        "allow_root": boolean,
        "uid": number(0, 2**31 - 1, integer=True),
        "gid": number(0, 2**31 - 1, integer=True),
        "volumes": _volume_offers,
        "label": text,
        "callback_bind": optional(text),
    }

    def problems(self) -> list[str]:
        """The maxima are sizes, and root is not the default user unless allowed."""
        found = list(super().problems())
        try:
            parse_memory(self.max_memory, "max_memory")
        except BadRequest as exc:
            found.append(f"max_memory: {exc}")
        if self.uid == 0 and not self.allow_root:
            found.append("uid: 0 (root) needs allow_root: true")
        return found


def _choice(value: Any, path: str, problems: list[str], choices: tuple[str, ...]) -> Any:
    if value not in choices:
        problems.append(f"{path}: must be one of {', '.join(choices)}")
        return None
    return value


@dataclass(frozen=True)
class KernelContainer:
    """What one kernel's container is to be, checked: the image, resources, user and volumes."""

    image: str
    cpus: float | None = None
    cpus_limit: float | None = None
    memory: int | None = None
    memory_limit: int | None = None
    gpus: int = 0
    uid: int = 1000
    gid: int = 100
    volumes: tuple[str, ...] = ()


def allowed_images(settings: ContainerSettings, config: Mapping[str, Any]) -> list[str]:
    """The images a kernel of a kernelspec with ``config`` may use: its own, its ``images``, the driver's."""
    found = [str(config["image"])] if config.get("image") else []
    found += [str(i) for i in config.get("images") or []]
    if settings.image:
        found.append(settings.image)
    found += settings.images
    return list(dict.fromkeys(found))


def kernel_container(request: LaunchRequest, settings: ContainerSettings,
                     default_image: str | None = None) -> KernelContainer:
    """The container of ``request``: its ``KERNEL_*`` requests within what the kernelspec's config and the
    driver's settings allow (:class:`BadRequest` or :class:`Forbidden` naming the variable otherwise)."""
    env, config = request.env, request.spec.driver_config
    images = allowed_images(settings, config)
    image = env.get("KERNEL_IMAGE") or str(config.get("image") or default_image or settings.image or "")
    if not image:
        raise BadRequest(f"kernelspec {request.spec.name} names no image, and the driver has no default image")
    if env.get("KERNEL_IMAGE") and image not in images and image != default_image:
        raise Forbidden(f"KERNEL_IMAGE {image[:200]!r} is not allowed here; allowed: {', '.join(images) or 'none'}")
    max_cpus = float(config.get("max_cpus", settings.max_cpus))
    max_memory = parse_memory(str(config.get("max_memory", settings.max_memory)), "max_memory")
    max_gpus = int(config.get("max_gpus", settings.max_gpus))

    def cpus(name: str) -> float | None:
        value = env.get(name) or config.get(name[7:].lower())
        if value in (None, ""):
            return None
        amount = parse_cpus(str(value), name)
        if amount > max_cpus:
            raise BadRequest(f"{name} must be at most {max_cpus:g} for kernelspec {request.spec.name}")
        return amount

    def memory(name: str) -> int | None:
        value = env.get(name) or config.get(name[7:].lower())
        if value in (None, ""):
            return None
        amount = parse_memory(str(value), name)
        if amount > max_memory:
            raise BadRequest(f"{name} must be at most {config.get('max_memory', settings.max_memory)} for "
                             f"kernelspec {request.spec.name}")
        return amount

    gpus = 0
    for name in ("KERNEL_GPUS", "KERNEL_GPUS_LIMIT"):
        value = env.get(name) or config.get(name[7:].lower())
        if value not in (None, ""):
            gpus = max(gpus, _gpus(str(value), name))
            if gpus > max_gpus:
                raise BadRequest(f"{name} must be at most {max_gpus} for kernelspec {request.spec.name}")
    uid, gid = _user(env, config, settings)
    return KernelContainer(image=image, cpus=cpus("KERNEL_CPUS"), cpus_limit=cpus("KERNEL_CPUS_LIMIT"),
                           memory=memory("KERNEL_MEMORY"), memory_limit=memory("KERNEL_MEMORY_LIMIT"), gpus=gpus,
                           uid=uid, gid=gid, volumes=requested_volumes(env, config, settings))


def _user(env: Mapping[str, str], config: Mapping[str, Any], settings: ContainerSettings) -> tuple[int, int]:
    """The uid and gid of the kernel: KERNEL_UID/KERNEL_GID where allowed, else the spec's, else the driver's."""
    ids = []
    for name, default in (("KERNEL_UID", config.get("uid", settings.uid)),
                          ("KERNEL_GID", config.get("gid", settings.gid))):
        value = env.get(name)
        if value is None or value == "":
            ids.append(int(default))
            continue
        if not settings.allow_uid:
            raise Forbidden(f"{name} is not honoured here: kernels run as uid {settings.uid} (ask the operator for "
                            "allow_uid)")
        if not value.isdigit() or len(value) > 10 or int(value) > 2**31 - 1:
            raise BadRequest(f"{name} must be a number")
        ids.append(int(value))
    if 0 in ids and not settings.allow_root:
        raise Forbidden("kernels may not run as root (uid or gid 0) here")
    return ids[0], ids[1]


def requested_volumes(env: Mapping[str, str], config: Mapping[str, Any],
                      settings: ContainerSettings) -> tuple[str, ...]:
    """The volumes of a kernel: the kernelspec's ``volumes`` (names), plus those KERNEL_VOLUMES asks for, each of
    which must be offered by the driver's ``volumes``."""
    names = [str(n) for n in config.get("volumes") or []]
    asked = [n.strip() for n in (env.get("KERNEL_VOLUMES") or "").split(",") if n.strip()]
    for name in asked:
        if name not in settings.volumes:
            raise Forbidden(f"KERNEL_VOLUMES: volume {name[:64]!r} is not offered here; offered: "
                            f"{', '.join(sorted(settings.volumes)) or 'none'}")
    for name in names:
        if name not in settings.volumes:
            raise BadRequest(f"kernelspec volume {name!r} is not among the driver's volumes")
    return tuple(dict.fromkeys(names + asked))


def launcher_files(settings: ContainerSettings) -> dict[str, bytes]:
    """egd's launcher files for the bundle (``launcher: bundle``; none otherwise), read from egd's own
    installation when the driver is built (not per launch)."""
    files = {}
    if settings.launcher == "bundle":
        directory = os.path.dirname(DEFAULT_LAUNCHER)
        for name in LAUNCHER_FILES:
            with open(os.path.join(directory, name), "rb") as handle:
                files[name] = handle.read()
    return files


def bundle_files(launcher: Mapping[str, bytes], secrets: Mapping[str, Any]) -> dict[str, bytes]:
    """The files the launcher needs beside the kernel: the launch's secrets and the ``launcher`` files."""
    return {**launcher, SECRETS_NAME: json.dumps(dict(secrets)).encode()}


def launcher_command(settings: ContainerSettings, args: list[str]) -> list[str]:
    """The container's command: the launcher (from the bundle, or the image's) with ``args``."""
    script = (os.path.join(BUNDLE_DIR, "kernel_launcher.py") if settings.launcher == "bundle"
              else settings.launcher_path)
    return [settings.python or "python3", script, "--foreground", "--secrets-file",
            os.path.join(BUNDLE_DIR, SECRETS_NAME), *args]


class ContainerDriver(AsyncMultiService):
    """What the container drivers share as Twisted services: the launch listener, the API client and the one
    stream that follows every kernel (a watch, an events stream: ``follower``, with ``start()`` and ``stop()``),
    and the kernels' user. Subclasses set ``api`` and ``follower`` when built with a reactor."""

    #: Every kernel has a container of its own: kernels cannot read each other's files, whatever user they run as.
    kernels_apart = True
    settings: ContainerSettings

    def __init__(self, name: str, reactor: IDriverReactor, settings: ContainerSettings,
                 port_range: tuple[int, int] | None) -> None:
        super().__init__()
        self.name = name
        self.settings = settings
        self._reactor = reactor
        self._port_range = settings.port_range or port_range
        self._launcher = launcher_files(settings)
        self.api: JsonApi | None = None
        self.follower: Any = None
        host = settings.callback_host
        reference = _ENV_REFERENCE.match(host)
        if reference:
            host = os.environ.get(reference.group(1), "")
            if not host and reactor is not None:
                raise ValueError(f"drivers.{name}.callback_host: ${{{reference.group(1)}}} is not set")
        self.listener = LaunchListener(reactor, host or "127.0.0.1", settings.callback_port, settings.callback_bind)
        self.listener.setServiceParent(self)

    @property
    def impersonates(self) -> bool:
        """Kernels run as a user id their user chose (KERNEL_UID)."""
        return bool(self.settings.allow_uid)

    @property
    def api_requests(self) -> int:
        """Requests made to the API so far (``egd_driver_api_requests_total``)."""
        return self.api.requests if self.api is not None else 0

    def startService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Start the listener (egd does not start when it cannot listen), then the follower."""
        def follow(_: object) -> None:
            if self.follower is not None:
                self.follower.start()

        return super().startService().addCallback(follow)

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Stop the follower, close the API's connections, stop the listener."""
        async def stop() -> None:
            if self.follower is not None:
                following = self.follower.stop()
                if following is not None:
                    await following
            if self.api is not None:
                await self.api.close()
            await maybeDeferred(super(ContainerDriver, self).stopService)

        return Deferred.fromCoroutine(stop())

    def _user(self, request: LaunchRequest) -> str:
        """The kernel's user, checked like every impersonating driver's when kernels run as their users."""
        if self.impersonates:
            return impersonated_user(request.username, set(self.settings.prohibited_users))
        return request.username

    def _unregister(self, kernel: RemoteKernel) -> None:
        self.listener.unregister(kernel.registration)

    async def remove_kernel_of(self, kernel_id: str) -> None:
        """Remove the container or pod of a kernel (its launcher did not answer, or an EG kernel is stopped)."""
        raise NotImplementedError

    async def _force_kill(self, kernel: RemoteKernel) -> None:
        await self.remove_kernel_of(kernel.registration.kernel_id)

    async def _force_kill_eg(self, kernel: EgKernel) -> None:
        await self.remove_kernel_of(kernel.kernel_id)

    def launched(self, kernel_id: str, registration: Registration, info: dict[str, Any], key: str,
                 where: str) -> RemoteKernel | EgKernel:
        """The handle of a kernel whose launcher reported: egd's launcher (signals and shutdown through its control
        port), or EG's (its comm port; nothing more comes from it, so its registration goes)."""
        if registration.eg:
            self.listener.unregister(registration)
            return EgKernel(self._reactor, kernel_id, info, where, lambda _: None, self._force_kill_eg, poll=False)
        return RemoteKernel(self._reactor, registration, info, key, where, self._unregister, self._force_kill)

    async def reattached(self, kernel_id: str, state: Mapping[str, Any], key: str,
                         where: str) -> RemoteKernel | EgKernel:
        """The handle of a kernel a previous gateway launched (``state``: its handle's persistent state), if its
        launcher answers; ``LookupError`` otherwise."""
        if state.get("protocol") == "eg":
            return await EgKernel.reattached(self._reactor, kernel_id, state, where, lambda _: None,
                                             self._force_kill_eg, poll=False)
        return await reattach_remote(self._reactor, self.listener, kernel_id, state, key, self._unregister,
                                     self._force_kill)

    async def eg_environment(self, request: LaunchRequest, extra: Mapping[str, str]) -> dict[str, str]:
        """The environment of an EG kernel image's ``bootstrap-kernel.sh``, as EG's ``launch_kubernetes.py`` and
        ``launch_docker.py`` give it: the kernel's environment, ``extra``, and where to report
        (``RESPONSE_ADDRESS``, ``PUBLIC_KEY``, ``PORT_RANGE``). EG's protocol has no secret: none is in it."""
        public_key = (await self.listener.eg_key()).public_text
        callback = self.listener.address
        argv = list(request.spec.argv)
        mode = "none"
        if "--RemoteProcessProxy.spark-context-initialization-mode" in argv[:-1]:
            mode = argv[argv.index("--RemoteProcessProxy.spark-context-initialization-mode") + 1]
        return {**request.env, "KERNEL_ID": request.kernel_id, "KERNEL_NAME": request.spec.name, **extra,
                "RESPONSE_ADDRESS": f"{callback[0]}:{callback[1]}", "PUBLIC_KEY": public_key,
                "PORT_RANGE": eg_port_range(self._port_range),
                "KERNEL_SPARK_CONTEXT_INIT_MODE": request.env.get("KERNEL_SPARK_CONTEXT_INIT_MODE", mode)}


class ContainerKernel:
    """What a kernel in a container or pod shares with its kind (:class:`egd.driverapi.LaunchedKernel`): its
    launcher's handle (egd's or EG's), the end, signals through the launcher, and EG's shutdown notice.
    Subclasses say where it runs, how it is killed and removed, and what is recorded."""

    def __init__(self, remote: RemoteKernel | EgKernel, kernel_id: str, user: str) -> None:
        self.remote = remote
        self.kernel_id = kernel_id
        self.user = user
        self.connection_info = remote.connection_info
        self.exited: Deferred[ExitStatus] = Deferred()

    def _ended(self, status: ExitStatus) -> ExitStatus:
        if isinstance(self.remote, EgKernel):
            self.remote.ended(status)
        if not self.exited.called:
            self.exited.callback(status)
        return status

    def shutdown_requested(self) -> None:
        """An EG launcher must be told of the shutdown too (see :class:`egd.egprotocol.EgKernel`)."""
        if isinstance(self.remote, EgKernel):
            self.remote.shutdown_requested()

    def signal(self, signum: int) -> Deferred[None]:
        """Through the launcher beside the kernel (egd's control port, or EG's comm port)."""
        return self.remote.signal(signum)

    def launcher_note(self) -> str:
        """`` (EG launcher)`` for a kernel of EG's launcher (for :meth:`describe`)."""
        return " (EG launcher)" if isinstance(self.remote, EgKernel) else ""
