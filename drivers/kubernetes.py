"""The ``kubernetes`` driver: each kernel is a pod; egd's launcher in it reports back (``docs/kubernetes.rst``).

- **The pod** is built from the kernelspec's pod template (``metadata.egd.config.pod_template``: a Pod manifest,
  inline or a YAML file in the kernelspec's directory), as structured data: egd sets the name, the labels
  (driver, kernel id, user), the kernel container's image, command, resources and user, and adds its volumes; no
  text templating ever touches a client's value. The launcher, its protocol module and the launch's secrets are
  a Secret mounted read-only into the pod (owned by the pod, so it goes with it); the image needs only a Python.
- **One watch** per driver follows every kernel pod (the driver's label, in its namespace, or cluster-wide when
  kernels get namespaces of their own): a pending pod's reason (Unschedulable, ErrImagePull, ...) becomes the
  kernel's progress, and a pod that ends, is evicted or is deleted from outside ends its kernel at once.
- **Namespaces** as Enterprise Gateway does them: one shared namespace, or one per kernel (created and deleted
  with it) or per user (created once, kept); ``KERNEL_NAMESPACE`` only from the operator's allow-list.
- **Stopping**: egd asks the launcher to shut the kernel down, then deletes the pod and waits until the API
  server has removed it; then the Secret and a per-kernel namespace go.
- **Re-attach** after egd restarts: the pod is found by its kernel-id label and the launcher must answer a
  signed ping; otherwise the pod is deleted.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

import yaml
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from egd.checks import Checker, number, optional, seconds, settings_of, strings, text
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
from egd.drivers.http_api import ApiError, ApiUnavailable
from egd.drivers.kube_api import KubeAPI, find_credentials
from egd.drivers.kube_watch import PodWatcher
from egd.egprotocol import EgKernel
from egd.egspecs import uses_eg_protocol
from egd.errors import BadRequest, Forbidden, LaunchFailed, LaunchTimeout, ServiceUnavailable
from egd.remote import Registration, RemoteKernel, await_report, launcher_arguments
from egd.util import describe

log = Logger()

LABEL_MANAGED = "app.kubernetes.io/managed-by"
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")
_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9_.-]")

def _namespace_mode(value: Any, path: str, problems: list[str]) -> Any:
    if value not in ("shared", "per-kernel", "per-user"):
        problems.append(f"{path}: must be shared, per-kernel or per-user")
        return None
    return value


@dataclass(frozen=True, kw_only=True)
class KubernetesSettings(ContainerSettings):
    """``drivers.kubernetes`` (documented in ``conf/kubernetes-cluster.yaml``)."""

    #: A kubeconfig (None: the pod's service account inside a cluster, else $KUBECONFIG or ~/.kube/config).
    kubeconfig: str | None = None
    context: str | None = None
    #: The shared namespace (None: the kubeconfig context's, or egd's own pod's).
    namespace: str | None = None
    namespace_mode: str = "shared"
    #: Prefix of the namespaces egd creates (per-kernel, per-user).
    namespace_prefix: str = "egd-"
    #: Namespaces a client may name with KERNEL_NAMESPACE (they must exist; egd never deletes them).
    allowed_namespaces: tuple[str, ...] = ()
    #: The kernels' service account (None: the namespace's ``default``), and those KERNEL_SERVICE_ACCOUNT_NAME
    #: may name.
    service_account: str | None = None
    service_accounts: tuple[str, ...] = ()
    #: The extended resource GPUs are asked as.
    gpu_resource: str = "nvidia.com/gpu"
    #: The kernel pods' grace period: the launcher ends its kernel on SIGTERM well within it.
    termination_grace_seconds: int = 5
    request_timeout: float = 10.0
    #: How long a DELETE waits for the API server to confirm the pod gone.
    delete_timeout: float = 60.0
    #: A Pod manifest every kernel pod starts from (a kernelspec's own template replaces it).
    pod_template: Mapping[str, Any] = field(default_factory=dict)
    #: Where launchers call back: an address the pods can reach (``${POD_IP}``: the environment variable, as set
    #: by the Deployment in conf/kubernetes/).
    callback_host: str = "127.0.0.1"

    schema: ClassVar[Mapping[str, Checker]] = {
        **ContainerSettings.schema,
        "kubeconfig": optional(text),
        "context": optional(text),
        "namespace": optional(text),
        "namespace_mode": _namespace_mode,
        "namespace_prefix": text,
        "allowed_namespaces": strings,
        "service_account": optional(text),
        "service_accounts": strings,
        "gpu_resource": text,
        "termination_grace_seconds": number(0, 3600, integer=True),
        "request_timeout": seconds,
        "delete_timeout": seconds,
        "pod_template": manifest("a Pod manifest"),
    }

    def problems(self) -> list[str]:
        """Namespaces are DNS labels; a prefix leaves room for a name."""
        found = list(super().problems())
        for name in ([self.namespace] if self.namespace else []) + list(self.allowed_namespaces):
            if not _DNS_LABEL.match(name):
                found.append(f"namespace {name!r}: not a valid namespace name")
        if not re.match(r"^[a-z0-9-]{0,40}\Z", self.namespace_prefix):
            found.append("namespace_prefix: at most 40 lowercase letters, digits and '-'")
        return found


def label_value(text_: str) -> str:
    """``text_`` as a label value (63 characters of ``[A-Za-z0-9_.-]``, alphanumeric at both ends); a hash
    stands in for what does not fit."""
    clean = _LABEL_VALUE_BAD.sub("_", text_)[:63].strip("_.-")
    if clean == text_:
        return clean
    digest = hashlib.sha256(text_.encode()).hexdigest()[:10]
    return f"{clean[:50].strip('_.-')}-{digest}".strip("-")


def pod_name(kernel_id: str) -> str:
    """A new pod (and Secret) name for a launch of a kernel: a restart's pod must not wait for the name of the
    previous one, which may still be terminating."""
    return f"kernel-{kernel_id.lower()}-{uuid.uuid4().hex[:5]}"


def _slug(text_: str) -> str:
    """``text_`` as part of a DNS label, with a hash of the original when it had to change."""
    clean = re.sub(r"[^a-z0-9-]", "-", text_.lower()).strip("-")[:40]
    if clean == text_:
        return clean
    return f"{clean[:30]}-{hashlib.sha256(text_.encode()).hexdigest()[:8]}".strip("-")


def pending_reason(pod: Mapping[str, Any]) -> str:
    """Why a pod is not running yet, in Kubernetes' words (empty when there is nothing to say)."""
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason') or 'not scheduled'}: {condition.get('message') or ''}".strip(": ")
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting")
        if waiting:
            text_ = str(waiting.get("reason") or "waiting")
            if waiting.get("message"):
                text_ += f": {waiting['message']}"
            return text_
    return str(status.get("reason") or "")


def termination(pod: Mapping[str, Any]) -> ExitStatus | None:
    """How a pod's kernel ended, if it has: its container's exit, an eviction, or a deletion; None while it runs."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    phase = status.get("phase")
    if phase in ("Succeeded", "Failed"):
        for container in status.get("containerStatuses") or []:
            ended = (container.get("state") or {}).get("terminated")
            if ended:
                code = ended.get("exitCode")
                detail = " ".join(str(x) for x in (ended.get("reason"), ended.get("message")) if x)
                signal = code - 128 if isinstance(code, int) and code > 128 else None
                return ExitStatus(code if signal is None else None, signal, detail=f"pod {phase}: {detail}".strip())
        detail = " ".join(str(x) for x in (status.get("reason"), status.get("message")) if x)
        return ExitStatus(detail=f"pod {phase}{': ' + detail if detail else ''}")
    if meta.get("deletionTimestamp"):
        return ExitStatus(detail="its pod was deleted")
    return None


@dataclass
class PodTrack:
    """What the driver knows of one kernel's pod, fed by the watch."""

    kernel_id: str
    namespace: str
    name: str
    progress: Any = None
    pod: dict[str, Any] = field(default_factory=dict)
    ended: Deferred[ExitStatus] = field(default_factory=Deferred)
    deleted: Deferred[None] = field(default_factory=Deferred)
    reason: str = ""
    #: Called once with the pod's IP when it has one (an EG launch takes its launcher's report only from there).
    on_ip: Any = None
    #: egd is deleting the pod: the kernel ends when the pod is gone, not when its deletion begins.
    deleting: bool = False

    def update(self, kind: str, pod: dict[str, Any]) -> None:
        """Take a new view of the pod."""
        self.pod = pod
        ip = (pod.get("status") or {}).get("podIP")
        if ip and self.on_ip is not None:
            on_ip, self.on_ip = self.on_ip, None
            on_ip(str(ip))
        if kind == "DELETED":
            if not self.ended.called:
                self.ended.callback(termination(pod) or ExitStatus(detail="its pod was deleted"))
            if not self.deleted.called:
                self.deleted.callback(None)
            return
        status = termination(pod)
        if status is not None and not (self.deleting and (pod.get("status") or {}).get("phase") == "Running"):
            if not self.ended.called:
                self.ended.callback(status)
            return
        phase = (pod.get("status") or {}).get("phase")
        reason = pending_reason(pod) if phase == "Pending" else ""
        text_ = f"pod {self.namespace}/{self.name} Pending: {reason}" if reason else ""
        if phase == "Running":
            node = (pod.get("spec") or {}).get("nodeName")
            text_ = f"pod {self.namespace}/{self.name} running on {node}; waiting for the kernel to report"
        if text_ and text_ != self.reason:
            self.reason = text_
            log.info("kernel {kernel_id}: {text}", kernel_id=self.kernel_id, text=text_)
            if self.progress is not None:
                self.progress(text_)


class KubeKernel(ContainerKernel):
    """A kernel in a pod (:class:`egd.driverapi.LaunchedKernel`)."""

    def __init__(self, driver: KubernetesDriver, remote: RemoteKernel | EgKernel, track: PodTrack,
                 created_namespace: bool, user: str) -> None:
        super().__init__(remote, track.kernel_id, user)
        self._driver = driver
        self.track = track
        self.created_namespace = created_namespace
        remote.exited.addCallback(self._kernel_exited)
        track.ended.addCallback(self._pod_ended)

    def _pod_ended(self, status: ExitStatus) -> ExitStatus:
        """The watch says the pod ended: deleted by someone else (the kernel has ended now), or its container
        exited (ended once the pod is gone)."""
        meta = self.track.pod.get("metadata") or {}
        if meta.get("deletionTimestamp") and not self.track.deleting:
            return self._ended(status)
        return self._kernel_exited(status)

    def _kernel_exited(self, status: ExitStatus) -> ExitStatus:
        """The kernel has exited: it has ended once its pod is gone too (so that a DELETE answered leaves
        nothing), whatever happens to the deletion."""
        if self.exited.called:
            return status

        async def remove_pod() -> None:
            try:
                await self._driver.delete_pod(self.track)
            finally:
                self._ended(status)

        Deferred.fromCoroutine(remove_pod()).addErrback(
            lambda f: log.failure("kernel {kernel_id}: deleting its pod failed", f, kernel_id=self.track.kernel_id))
        return status

    def describe(self) -> str:
        """Pod, node and address."""
        node = (self.track.pod.get("spec") or {}).get("nodeName") or "?"
        return (f"pod {self.track.namespace}/{self.track.name} on {node} ({self.connection_info['ip']})"
                f"{self.launcher_note()}")

    def failure_detail(self) -> str:
        """What the pod's status says last."""
        return self.track.reason

    def kill(self) -> Deferred[None]:
        """The launcher ends the kernel, then the pod is deleted (and awaited)."""
        async def kill() -> None:
            await self.remote.kill()
            await self._driver.delete_pod(self.track)
            self._ended(ExitStatus(None, 9))

        return Deferred.fromCoroutine(kill())

    def cleanup(self) -> None:
        """Forget the launch; the pod, its Secret and a per-kernel namespace go (in the background)."""
        self.remote.cleanup()
        done = Deferred.fromCoroutine(self._driver.remove(self.track, self.created_namespace))
        done.addErrback(lambda f: log.failure("kernel {kernel_id}: removing its pod failed", f,
                                              kernel_id=self.track.kernel_id))

    def persistent_state(self) -> dict[str, Any]:
        """Where the pod is, and how to reach its launcher."""
        return {"namespace": self.track.namespace, "pod": self.track.name, "user": self.user,
                "created_namespace": self.created_namespace, "remote": self.remote.persistent_state()}


class KubernetesDriver(ContainerDriver):
    """Launches kernels as pods and follows them all through one watch."""

    settings_type = KubernetesSettings
    settings: KubernetesSettings
    api: KubeAPI | None

    def __init__(self, reactor: IDriverReactor, settings: KubernetesSettings | Mapping[str, Any], runtime_dir: str,
                 port_range: tuple[int, int] | None) -> None:
        settings = settings_of(KubernetesSettings, settings, "drivers.kubernetes")
        super().__init__("kubernetes", reactor, settings, port_range)
        self._label = label_value(settings.label)
        self._namespace = settings.namespace or "default"
        self._tracks: dict[str, PodTrack] = {}
        if reactor is not None:
            credentials = find_credentials(settings.kubeconfig, settings.context)
            self._namespace = settings.namespace or credentials.namespace
            self.api = KubeAPI(reactor, credentials, settings.request_timeout)
            shared = settings.namespace_mode == "shared" and not settings.allowed_namespaces
            self.follower = PodWatcher(reactor, self.api, f"{LABEL_DRIVER}={self._label}",
                                       self._namespace if shared else None, self._pod_event)

    @property
    def impersonates(self) -> bool:
        """Kernels run as a user id their user chose (KERNEL_UID), or in their user's namespace."""
        return bool(self.settings.allow_uid or self.settings.namespace_mode == "per-user")

    def _api(self) -> KubeAPI:
        if self.api is None:
            raise ServiceUnavailable("the kubernetes driver is not running")
        return self.api

    def _pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        track = self._tracks.get(str((meta.get("labels") or {}).get(LABEL_KERNEL)))
        if track is not None and track.namespace == meta.get("namespace") and track.name == meta.get("name"):
            track.update(kind, pod)

    # -- what a launch asks for -----------------------------------------------------------------------------

    def _namespace_of(self, request: LaunchRequest, user: str) -> tuple[str, bool]:
        """The kernel's namespace, and whether egd creates it for this kernel (per-kernel)."""
        asked = request.env.get("KERNEL_NAMESPACE")
        if asked:
            if asked not in self.settings.allowed_namespaces:
                allowed = ", ".join(self.settings.allowed_namespaces) or "none"
                raise Forbidden(f"KERNEL_NAMESPACE {asked[:63]!r} is not allowed here; allowed: {allowed}")
            return asked, False
        mode = self.settings.namespace_mode
        if mode == "per-kernel":
            return f"{self.settings.namespace_prefix}{request.kernel_id.lower()}"[:63].rstrip("-"), True
        if mode == "per-user":
            return f"{self.settings.namespace_prefix}{_slug(user)}"[:63].rstrip("-"), False
        return self._namespace, False

    def _service_account(self, request: LaunchRequest) -> str | None:
        asked = request.env.get("KERNEL_SERVICE_ACCOUNT_NAME")
        if asked:
            allowed = set(self.settings.service_accounts) | {a for a in [self.settings.service_account] if a}
            if asked not in allowed:
                raise Forbidden(f"KERNEL_SERVICE_ACCOUNT_NAME {asked[:63]!r} is not allowed here; allowed: "
                                f"{', '.join(sorted(allowed)) or 'none'}")
            return asked
        config = request.spec.driver_config
        return str(config.get("service_account") or self.settings.service_account or "") or None

    async def _template(self, request: LaunchRequest) -> dict[str, Any]:
        """The kernelspec's pod template (inline, or a YAML file in its directory), else the driver's."""
        template = request.spec.driver_config.get("pod_template")
        if template is None:
            return copy.deepcopy(dict(self.settings.pod_template))
        if isinstance(template, dict):
            return copy.deepcopy(template)
        path = os.path.join(request.spec.resource_dir, str(template))
        if os.path.commonpath([os.path.realpath(path), os.path.realpath(request.spec.resource_dir)]) != \
                os.path.realpath(request.spec.resource_dir):
            raise LaunchFailed(f"kernelspec {request.spec.name}: pod_template must be a file in its directory")

        def read() -> Any:
            with open(path, encoding="utf-8") as handle:
                return yaml.safe_load(handle)

        try:
            loaded = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), read)
        except (OSError, yaml.YAMLError) as exc:
            raise LaunchFailed(f"kernelspec {request.spec.name}: cannot read its pod template: {exc}") from None
        if not isinstance(loaded, dict):
            raise LaunchFailed(f"kernelspec {request.spec.name}: its pod template is not a Pod manifest")
        return loaded

    def build_pod(self, template: dict[str, Any], request: LaunchRequest, namespace: str, user: str,
                  container: KernelContainer, command: list[str] | None, service_account: str | None,
                  env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The kernel's pod: ``template`` with egd's parts set (structured; nothing is parsed from text). With a
        ``command``, egd's launcher runs from the launch Secret; without one (EG's kernel images) the image's
        own command runs, with ``env`` added to the container's environment."""
        name = pod_name(request.kernel_id)
        pod = template
        pod["apiVersion"], pod["kind"] = "v1", "Pod"
        meta = pod.setdefault("metadata", {})
        meta.pop("generateName", None)
        meta["name"], meta["namespace"] = name, namespace
        meta["labels"] = {**(meta.get("labels") or {}), **self._labels(request.kernel_id, user)}
        meta["annotations"] = {**(meta.get("annotations") or {}), "egd.jupyter.org/kernelspec": request.spec.name}
        spec = pod.setdefault("spec", {})
        spec["restartPolicy"] = "Never"  # egd restarts kernels itself; a restarted container would be a stranger
        spec.setdefault("terminationGracePeriodSeconds", self.settings.termination_grace_seconds)
        spec.setdefault("automountServiceAccountToken", False)
        if service_account:
            spec["serviceAccountName"] = service_account
        containers = spec.setdefault("containers", [])
        kernel = next((c for c in containers if c.get("name") == "kernel"), containers[0] if containers else None)
        if kernel is None:
            kernel = {"name": "kernel"}
            containers.append(kernel)
        kernel["image"] = container.image
        if command is not None:
            kernel["command"] = command
            kernel.pop("args", None)
        if env:
            given = [e for e in kernel.get("env") or [] if e.get("name") not in env]
            kernel["env"] = given + [{"name": k, "value": v} for k, v in env.items()]
        kernel.setdefault("imagePullPolicy", "IfNotPresent")
        kernel["resources"] = self._resources(kernel.get("resources") or {}, container)
        kernel["securityContext"] = {**(kernel.get("securityContext") or {}), "runAsUser": container.uid,
                                     "runAsGroup": container.gid, "runAsNonRoot": container.uid != 0,
                                     "allowPrivilegeEscalation": False}
        mounts = [m for m in kernel.get("volumeMounts") or [] if m.get("name") != "egd-launch"]
        volumes = [v for v in spec.get("volumes") or [] if v.get("name") != "egd-launch"]
        if command is not None:
            mounts.append({"name": "egd-launch", "mountPath": BUNDLE_DIR, "readOnly": True})
            volumes.append({"name": "egd-launch", "secret": {"secretName": name, "defaultMode": 0o444}})
        for volume in container.volumes:
            offer = self.settings.volumes[volume]
            volumes.append({"name": volume, **dict(offer.get("volume") or {})})
            mounts.append({"name": volume, "mountPath": str(offer.get("mount_path") or f"/mnt/{volume}"),
                           "readOnly": bool(offer.get("read_only", False))})
        kernel["volumeMounts"], spec["volumes"] = mounts, volumes
        return pod

    def _resources(self, base: Mapping[str, Any], container: KernelContainer) -> dict[str, Any]:
        requests = dict(base.get("requests") or {})
        limits = dict(base.get("limits") or {})
        if container.cpus is not None:
            requests["cpu"] = f"{round(container.cpus * 1000)}m"
        if container.cpus_limit is not None:
            limits["cpu"] = f"{round(container.cpus_limit * 1000)}m"
        if container.memory is not None:
            requests["memory"] = str(container.memory)
        if container.memory_limit is not None:
            limits["memory"] = str(container.memory_limit)
        if container.gpus:
            limits[self.settings.gpu_resource] = str(container.gpus)
        for kind in ("cpu", "memory"):
            if kind in requests and kind in limits and _amount(limits[kind]) < _amount(requests[kind]):
                raise BadRequest(f"KERNEL_{'CPUS' if kind == 'cpu' else 'MEMORY'}_LIMIT must not be less than "
                                 f"KERNEL_{'CPUS' if kind == 'cpu' else 'MEMORY'}")
        return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}

    def _labels(self, kernel_id: str, user: str) -> dict[str, str]:
        return {LABEL_DRIVER: self._label, LABEL_KERNEL: kernel_id, LABEL_USER: label_value(user),
                LABEL_MANAGED: "egd"}

    # -- launching --------------------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Deferred[LaunchedKernel]:
        """Create the kernel's Secret and pod, and wait for its launcher to report."""
        return Deferred.fromCoroutine(self._launch(request))

    async def _launch(self, request: LaunchRequest) -> LaunchedKernel:
        api = self._api()
        started = self._reactor.seconds()
        eg = uses_eg_protocol(request.spec.argv)
        user = self._user(request)
        container = kernel_container(request, self.settings, request.spec.driver_config.get("image_name"))
        namespace, per_kernel = self._namespace_of(request, user)
        service_account = self._service_account(request)
        template = await self._template(request)
        registration = self.listener.register(request.kernel_id, eg=eg)
        key = uuid.uuid4().hex
        files: dict[str, bytes] | None = None
        if eg:
            pod = self.build_pod(template, request, namespace, user, container, None, service_account,
                                 await self.eg_environment(request, {"KERNEL_NAMESPACE": namespace}))
        else:
            args = launcher_arguments(request, self.listener.address, self._port_range, request.spec.argv,
                                      "--bind-ip", "0.0.0.0")
            pod = self.build_pod(template, request, namespace, user, container,
                                 launcher_command(self.settings, args), service_account)
            files = bundle_files(self._launcher, {"secret": registration.secret.decode(), "key": key,
                                                  "env": dict(request.env)})
        track = PodTrack(request.kernel_id, namespace, pod["metadata"]["name"], request.progress)
        if eg:
            # EG's launcher reports its payload with no signature: it is taken only from the pod's address.
            track.on_ip = lambda ip: registration.expect_peers(frozenset({ip}))
        self._tracks[request.kernel_id] = track
        request.progress(f"creating pod {namespace}/{track.name}")
        try:
            await self._prepare_namespace(api, namespace, per_kernel or self.settings.namespace_mode == "per-user",
                                          request, user, service_account)
            await self._create(api, request, track, pod, files)
            info = await self._wait_ready(request, registration, track, started)
        except BaseException:
            self.listener.unregister(registration)
            removing = Deferred.fromCoroutine(self.remove(track, per_kernel))
            removing.addErrback(lambda f: log.failure("kernel {kernel_id}: removing a failed launch's pod failed", f,
                                                      kernel_id=request.kernel_id))
            await removing
            raise
        remote = self.launched(request.kernel_id, registration, info, key, f"pod {namespace}/{track.name}")
        kernel = KubeKernel(self, remote, track, per_kernel, user)
        log.info("kernel {kernel_id}: runs in {where}", kernel_id=request.kernel_id, where=kernel.describe())
        return kernel

    async def _prepare_namespace(self, api: KubeAPI, namespace: str, ensure: bool, request: LaunchRequest, user: str,
                                 service_account: str | None) -> None:
        """Create a namespace egd manages when it is missing, and wait for its service account."""
        if not ensure:
            return
        labels = {LABEL_DRIVER: self._label, LABEL_MANAGED: "egd", LABEL_USER: label_value(user)}
        if self.settings.namespace_mode == "per-kernel":
            labels[LABEL_KERNEL] = request.kernel_id
        try:
            await api.call("POST", "/api/v1/namespaces",
                           body={"apiVersion": "v1", "kind": "Namespace",
                                 "metadata": {"name": namespace, "labels": labels}})
            log.info("kernel {kernel_id}: created namespace {namespace}", kernel_id=request.kernel_id,
                     namespace=namespace)
        except ApiError as exc:
            if exc.code != 409:
                raise _refused(exc, f"namespace {namespace}") from None
        # A pod is refused until its namespace's service account exists (the controller-manager makes ``default``).
        account = service_account or "default"
        deadline = self._reactor.seconds() + request.timeout
        while True:
            status, _ = await api.call("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}", ok=(404,))
            if status != 404:
                return
            if self._reactor.seconds() > deadline:
                raise LaunchTimeout(f"service account {account} did not appear in namespace {namespace}")
            await deferLater(self._reactor, 0.2, lambda: None)

    async def _create(self, api: KubeAPI, request: LaunchRequest, track: PodTrack, pod: dict[str, Any],
                      files: Mapping[str, bytes] | None) -> None:
        """The Secret (the launcher and the launch's secrets, unless EG's launcher in the image runs), the pod,
        then the Secret owned by the pod (so that it goes with the pod whatever happens to egd)."""
        namespace, name = track.namespace, track.name
        labels = pod["metadata"]["labels"]
        try:
            if files is not None:
                secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                          "metadata": {"name": name, "namespace": namespace, "labels": labels},
                          "data": {k: base64.b64encode(v).decode() for k, v in files.items()}}
                await api.call("POST", f"/api/v1/namespaces/{namespace}/secrets", body=secret)
            _, created = await api.call("POST", f"/api/v1/namespaces/{namespace}/pods", body=pod)
        except ApiError as exc:
            raise _refused(exc, f"pod {namespace}/{name}") from None
        track.update("ADDED", created)
        if files is None:
            return
        uid = (created.get("metadata") or {}).get("uid")
        owner = {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]}}
        try:
            await api.call("PATCH", f"/api/v1/namespaces/{namespace}/secrets/{name}", body=owner,
                           content_type="application/merge-patch+json")
        except (ApiError, ApiUnavailable) as exc:
            log.warn("kernel {kernel_id}: could not make pod {name} own its Secret ({why}); egd deletes it",
                     kernel_id=request.kernel_id, name=name, why=describe(exc))

    async def _wait_ready(self, request: LaunchRequest, registration: Registration, track: PodTrack,
                          started: float) -> dict[str, Any]:
        """The launcher's connection info, unless the pod ends or is stuck, or the launch timeout passes."""
        kind, value = await await_report(self._reactor, registration, track.ended,
                                         request.timeout - (self._reactor.seconds() - started))
        if kind == "ready":
            return dict(value)
        where = f"pod {track.namespace}/{track.name}"
        if kind == "refused":
            raise LaunchFailed(f"the kernel failed to start in {where}: {value}")
        if kind == "ended":
            logs = await self._log_tail(track)
            raise LaunchFailed(f"{where} ended before the kernel reported ({value.describe()})"
                               + (f"; its log ends: {logs}" if logs else ""))
        reason = track.reason or f"{where} created"
        raise LaunchTimeout(f"the kernel did not start within {request.timeout:g} seconds: {reason}")

    async def _log_tail(self, track: PodTrack) -> str:
        """The last lines the pod's kernel container wrote (why it ended), or nothing."""
        try:
            text_ = await self._api().text(f"/api/v1/namespaces/{track.namespace}/pods/{track.name}/log",
                                           {"tailLines": "15"})
        except (ApiError, ApiUnavailable):
            return ""
        return " | ".join(line for line in text_.splitlines() if line.strip())[-1500:]

    # -- stopping -------------------------------------------------------------------------------------------

    async def delete_pod(self, track: PodTrack) -> None:
        """Delete the kernel's pod and wait (up to ``delete_timeout``) until the API server has removed it."""
        api = self._api()
        track.deleting = True
        try:
            await api.call("DELETE", f"/api/v1/namespaces/{track.namespace}/pods/{track.name}",
                           body={"gracePeriodSeconds": self.settings.termination_grace_seconds,
                                 "propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.code == 404:
                if not track.deleted.called:
                    track.deleted.callback(None)
                return
            raise
        if track.deleted.called:
            return
        waiting = Deferred.fromCoroutine(self._await_deleted(track))
        waiting.addTimeout(self.settings.delete_timeout, self._reactor)
        try:
            await waiting
        except Exception:
            log.warn("kernel {kernel_id}: pod {namespace}/{name} was not removed within {timeout:g}s",
                     kernel_id=track.kernel_id, namespace=track.namespace, name=track.name,
                     timeout=self.settings.delete_timeout)

    async def _await_deleted(self, track: PodTrack) -> None:
        # The watch reports DELETED; a GET now and then covers a watch that is away just then.
        while not track.deleted.called:
            status, _ = await self._api().call("GET", f"/api/v1/namespaces/{track.namespace}/pods/{track.name}",
                                               ok=(404,))
            if status == 404:
                break
            await deferLater(self._reactor, 1.0, lambda: None)

    async def remove(self, track: PodTrack, per_kernel_namespace: bool) -> None:
        """Everything of a kernel: its pod, its Secret, and the namespace egd created for it."""
        # A restart's new launch may have taken the kernel id's places already: only this pod's are freed.
        if self._tracks.get(track.kernel_id) is track:
            del self._tracks[track.kernel_id]
        api = self._api()
        try:
            if not track.deleted.called:
                await self.delete_pod(track)
            await api.call("DELETE", f"/api/v1/namespaces/{track.namespace}/secrets/{track.name}", ok=(404,))
            if per_kernel_namespace:
                await api.call("DELETE", f"/api/v1/namespaces/{track.namespace}", ok=(404,))
                log.info("kernel {kernel_id}: deleted namespace {namespace}", kernel_id=track.kernel_id,
                         namespace=track.namespace)
        except (ApiError, ApiUnavailable) as exc:
            log.warn("kernel {kernel_id}: could not remove everything of pod {namespace}/{name}: {why}",
                     kernel_id=track.kernel_id, namespace=track.namespace, name=track.name, why=describe(exc))

    async def remove_kernel_of(self, kernel_id: str) -> None:
        """The kernel's pod goes."""
        track = self._tracks.get(kernel_id)
        if track is not None:
            await self.delete_pod(track)

    # -- re-attaching ---------------------------------------------------------------------------------------

    def sweep_unknown(self, known: frozenset[str], older_than: float) -> Deferred[int]:
        """Delete this driver's kernel pods (with their Secrets, and a per-kernel namespace) that belong to no
        kernel in ``known`` or in progress here and are older than ``older_than`` seconds; how many."""
        async def sweep() -> int:
            api = self._api()
            path = f"/api/v1/namespaces/{self._namespace}/pods" if self.settings.namespace_mode == "shared" and \
                not self.settings.allowed_namespaces else "/api/v1/pods"
            _, data = await api.call("GET", path, {"labelSelector": f"{LABEL_DRIVER}={self._label}"})
            removed = 0
            for pod in (data or {}).get("items") or []:
                meta = pod.get("metadata") or {}
                kernel_id = str((meta.get("labels") or {}).get(LABEL_KERNEL) or "")
                if kernel_id in known or kernel_id in self._tracks or _age(meta, self._reactor) < older_than:
                    continue
                log.warn("kernel {kernel_id}: pod {namespace}/{name} belongs to no kernel egd knows (a launch cut "
                         "short); deleting it", kernel_id=kernel_id, namespace=meta.get("namespace"),
                         name=meta.get("name"))
                track = PodTrack(kernel_id, str(meta.get("namespace")), str(meta.get("name")))
                namespace_of_kernel = str(meta.get("namespace")) == f"{self.settings.namespace_prefix}{kernel_id}"
                await self.remove(track, namespace_of_kernel and self.settings.namespace_mode == "per-kernel")
                removed += 1
            return removed

        return Deferred.fromCoroutine(sweep())


    def reattach(self, kernel_id: str, state: Mapping[str, Any], connection_info: dict[str, Any]) -> Deferred[Any]:
        """The kernel a previous gateway started, found by its label, if its launcher answers a signed ping;
        ``LookupError`` otherwise (a pod left behind is deleted)."""
        async def reattach() -> KubeKernel:
            api = self._api()
            namespace = str(state["namespace"])
            _, data = await api.call("GET", f"/api/v1/namespaces/{namespace}/pods",
                                     {"labelSelector": f"{LABEL_DRIVER}={self._label},{LABEL_KERNEL}={kernel_id}"})
            pods = [p for p in (data or {}).get("items") or [] if isinstance(p, dict)]
            track = PodTrack(kernel_id, namespace, str(state["pod"]))
            created = bool(state.get("created_namespace"))
            ours = [p for p in pods if (p.get("metadata") or {}).get("name") == track.name]
            for stray in pods:
                if stray not in ours:  # a pod of an earlier launch of this kernel whose deletion was cut short
                    name = str(stray["metadata"]["name"])
                    gone = Deferred.fromCoroutine(self.remove(PodTrack(kernel_id, namespace, name), False))
                    gone.addErrback(lambda f: log.failure("kernel {kernel_id}: deleting a stray pod failed", f,
                                                          kernel_id=kernel_id))
            if not ours:
                await self.remove(track, created)
                raise LookupError(f"its pod {namespace}/{track.name} is gone")
            track.update("MODIFIED", ours[0])
            if track.ended.called:
                status = track.ended.result if not isinstance(track.ended.result, Exception) else None
                await self.remove(track, created)
                raise LookupError(f"its pod {namespace}/{track.name} has ended "
                                  f"({status.describe() if isinstance(status, ExitStatus) else 'ended'})")
            self._tracks[kernel_id] = track
            try:
                remote = await self.reattached(kernel_id, state["remote"], str(connection_info["key"]),
                                               f"pod {namespace}/{track.name}")
            except LookupError as exc:
                await self.remove(track, created)
                raise LookupError(f"{exc}; pod {namespace}/{track.name} deleted") from None
            kernel = KubeKernel(self, remote, track, created, str(state.get("user") or ""))
            log.info("kernel {kernel_id}: re-attached to {where}", kernel_id=kernel_id, where=kernel.describe())
            return kernel

        return Deferred.fromCoroutine(reattach())


def _age(meta: Mapping[str, Any], clock: IDriverReactor) -> float:
    """Seconds since an object was created (0 when its creation time cannot be read)."""
    try:
        created = datetime.strptime(str(meta.get("creationTimestamp")), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return 0.0
    return clock.seconds() - created.replace(tzinfo=timezone.utc).timestamp()


def _amount(quantity: str) -> float:
    """A resource quantity as a number, for comparing a limit with a request of the same kind."""
    if quantity.endswith("m"):
        return float(quantity[:-1]) / 1000
    return float(quantity)


def _refused(exc: ApiError, what: str) -> Exception:
    """The error of a refused create: a quota or an admission refusal is the cluster's answer for now (503)."""
    if exc.code in (403, 429) or "quota" in exc.message.lower():
        return ServiceUnavailable(f"Kubernetes refused {what}: {exc.message}")
    return LaunchFailed(f"Kubernetes refused {what}: {exc.message}")
