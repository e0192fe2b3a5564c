"""Kernelspecs, found by jupyter_client, read in a worker thread (directory scans are file I/O).

A spec names its driver in ``metadata.egd.driver``; Enterprise Gateway specs name a process proxy class in
``metadata.process_proxy.class_name``, which maps to the equivalent egd driver. No driver means ``local``.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from egd.config import KernelsConfig
from egd.egspecs import eg_spark_opts_variable, uses_eg_protocol
from egd.errors import KernelSpecNotFound

#: Enterprise Gateway process proxies and the egd driver that does the same job.
_EG_PROCESS_PROXIES = {
    "LocalProcessProxy": "local",
    "DistributedProcessProxy": "ssh",
    "YarnClusterProcessProxy": "yarn",
    "KubernetesProcessProxy": "kubernetes",
    "DockerProcessProxy": "docker",
    "DockerSwarmProcessProxy": "docker",
}
#: The EG scripts that create a container for the kernel from the gateway; egd's container drivers create it.
_EG_CONTAINER_LAUNCHERS = ("launch_kubernetes.py", "launch_docker.py")
_RESOURCE_FILES = ("kernel.js", "kernel.css")
#: What ipykernel is told so that a kernel keeps its history to itself (``kernels.ipython_history: kernel``).
HISTORY_OF_ITS_OWN = "--HistoryManager.hist_file=:memory:"


@dataclass(frozen=True)
class CullOverrides:
    """A kernelspec's own culling settings (``metadata.egd.cull``); None: the gateway's ``kernels.cull_*``."""

    idle_timeout: float | None = None
    busy_timeout: float | None = None
    connected: bool | None = None


@dataclass(frozen=True)
class KernelSpecInfo:
    """One kernelspec as egd uses it."""

    name: str
    argv: tuple[str, ...]
    display_name: str
    language: str
    interrupt_mode: str
    env: Mapping[str, str]
    metadata: Mapping[str, Any]
    resource_dir: str
    resources: Mapping[str, str] = field(default_factory=dict)

    @property
    def driver(self) -> str:
        """The name of the driver that launches kernels of this spec."""
        egd_meta = self.metadata.get("egd")
        if isinstance(egd_meta, dict) and isinstance(egd_meta.get("driver"), str):
            return str(egd_meta["driver"])
        proxy = self.metadata.get("process_proxy")
        if isinstance(proxy, dict) and isinstance(proxy.get("class_name"), str):
            short = proxy["class_name"].rsplit(".", 1)[-1]
            return _EG_PROCESS_PROXIES.get(short, short)
        return "local"

    @property
    def uses_eg_protocol(self) -> bool:
        """Whether this spec starts one of Enterprise Gateway's launchers, which report back by EG's protocol."""
        return uses_eg_protocol(self.argv)

    @property
    def launch_timeout(self) -> float | None:
        """This spec's default launch timeout (``metadata.egd.launch_timeout``), if it sets one."""
        egd_meta = self.metadata.get("egd")
        value = egd_meta.get("launch_timeout") if isinstance(egd_meta, dict) else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None

    @property
    def cull(self) -> CullOverrides:
        """This spec's culling overrides (``metadata.egd.cull``); invalid values are ignored, as for
        ``launch_timeout``, so that a typo in a spec falls back to the gateway's setting."""
        egd_meta = self.metadata.get("egd")
        raw = egd_meta.get("cull") if isinstance(egd_meta, dict) else None
        raw = raw if isinstance(raw, dict) else {}

        def seconds(key: str) -> float | None:
            value = raw.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                return float(value)
            return None

        connected = raw.get("connected")
        return CullOverrides(seconds("idle_timeout"), seconds("busy_timeout"),
                             connected if isinstance(connected, bool) else None)

    @property
    def driver_config(self) -> Mapping[str, Any]:
        """Per-spec driver settings (``metadata.egd.config`` or EG's ``metadata.process_proxy.config``)."""
        for key in ("egd", "process_proxy"):
            section = self.metadata.get(key)
            if isinstance(section, dict) and isinstance(section.get("config"), dict):
                return dict(section["config"])
        return {}

    def user_lists(self) -> tuple[frozenset[str], frozenset[str]]:
        """``(authorized, unauthorized)`` users of this spec (lists, or EG's comma-separated strings)."""
        config = self.driver_config

        def names(key: str) -> frozenset[str]:
            value = config.get(key) or []
            items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else []
            return frozenset(str(item).strip() for item in items if str(item).strip())

        return names("authorized_users"), names("unauthorized_users")

    def allows(self, user: str, authorized: tuple[str, ...], unauthorized: tuple[str, ...],
               groups: frozenset[str] = frozenset()) -> bool:
        """Whether ``user`` (a member of ``groups``) may use this spec: exact names, ``@group`` for a group's
        members; the spec's lists, then the gateway's (EG's rules, without EG's substring matching)."""
        spec_authorized, spec_unauthorized = self.user_lists()
        me = {user, *(f"@{group}" for group in groups)}

        def listed(names: Any) -> bool:
            return bool(me & set(names))

        if listed(spec_unauthorized) or listed(unauthorized):
            return False
        if spec_authorized:
            return listed(spec_authorized)
        return not authorized or listed(authorized)

    def model(self, base_url: str, full: bool = True) -> dict[str, Any]:
        """The ``/api/kernelspecs`` model (Jupyter Server's shape). Without ``full`` (for callers who are not
        admins) the command line, environment and driver configuration are left out: they can carry paths,
        hosts and credentials that are the operator's business."""
        metadata = dict(self.metadata)
        if not full:
            metadata = {k: v for k, v in metadata.items() if k not in ("egd", "process_proxy")}
        spec = {
            "argv": list(self.argv) if full else [],
            "env": dict(self.env) if full else {},
            "display_name": self.display_name,
            "language": self.language,
            "interrupt_mode": self.interrupt_mode,
            "metadata": metadata,
        }
        resources = {key: f"{base_url}kernelspecs/{self.name}/{filename}" for key, filename in self.resources.items()}
        return {"name": self.name, "spec": spec, "resources": resources}


#: ``metadata.process_proxy.config`` keys egd reads from EG's kernelspecs (besides the user lists).
_EG_CONFIG_KEYS = frozenset({"remote_hosts", "port_range", "authorized_users", "unauthorized_users", "yarn_endpoint",
                             "alt_yarn_endpoint", "yarn_endpoint_security_enabled"})


def _rm_address(url: str) -> str:
    """A ResourceManager's address as egd's ``drivers.yarn.resource_managers`` lists it (EG's end in /ws/v1/cluster)."""
    url = url.strip().rstrip("/")
    return url[: -len("/ws/v1/cluster")] if url.endswith("/ws/v1/cluster") else url


def eg_spec_problems(spec: KernelSpecInfo, driver_settings: Mapping[str, Any]) -> list[str]:
    """What in an EG kernelspec's ``process_proxy`` egd cannot honour (``driver_settings``: each configured
    driver's settings object, by driver name). Empty for egd's own kernelspecs."""
    proxy = spec.metadata.get("process_proxy")
    if not isinstance(proxy, dict) or "egd" in spec.metadata:
        return []
    raw = proxy.get("config")
    config: dict[str, Any] = raw if isinstance(raw, dict) else {}
    where = f"kernelspec {spec.name!r}: metadata.process_proxy.config"
    problems = [f"{where}.{key}: not a setting egd reads (it reads {', '.join(sorted(_EG_CONFIG_KEYS))})"
                for key in sorted(config) if key not in _EG_CONFIG_KEYS and spec.driver in ("local", "ssh", "yarn")]
    if str(config.get("yarn_endpoint_security_enabled", "")).lower() in ("true", "1", "yes"):
        problems.append(f"{where}.yarn_endpoint_security_enabled: Kerberos (SPNEGO) to the ResourceManager is not "
                        "supported yet")
    known = {_rm_address(str(u)) for u in getattr(driver_settings.get("yarn"), "resource_managers", ())}
    for key in ("yarn_endpoint", "alt_yarn_endpoint"):
        if config.get(key) and _rm_address(str(config[key])) not in known:
            problems.append(f"{where}.{key}: {config[key]} is not one of drivers.yarn.resource_managers "
                            f"({', '.join(sorted(known)) or 'no yarn driver'}); egd's yarn driver submits to those")
    port_range = config.get("port_range")
    if port_range not in (None, "", "0..0") and not re.fullmatch(r"\d{4,5}\.\.\d{4,5}", str(port_range)):
        problems.append(f"{where}.port_range: {port_range!r} is not lo..hi")
    if spec.driver == "yarn" and spec.uses_eg_protocol and eg_spark_opts_variable(spec.env) is None:
        problems.append(f"kernelspec {spec.name!r}: egd finds an EG kernelspec's YARN application by the tags it adds "
                        "to SPARK_OPTS, and this one submits without SPARK_OPTS (dask-yarn is not supported)")
    if spec.driver in ("kubernetes", "docker") and not any(os.path.basename(a) in _EG_CONTAINER_LAUNCHERS
                                                          for a in spec.argv):
        problems.append(f"kernelspec {spec.name!r}: egd's {spec.driver} driver runs EG's kernelspecs whose pod or "
                        f"container EG's {' or '.join(_EG_CONTAINER_LAUNCHERS)} creates; this one runs "
                        f"{os.path.basename(spec.argv[0]) if spec.argv else 'nothing'} (Spark on Kubernetes through "
                        "spark-submit, or Spark operators, are not supported)")
    if spec.driver == "local" and spec.uses_eg_protocol:
        problems.append(f"kernelspec {spec.name!r}: its argv starts an EG launcher ({{response_address}}), which "
                        "only EG's remote process proxies (DistributedProcessProxy, YarnClusterProcessProxy) run")
    return problems


def _resources(resource_dir: str) -> dict[str, str]:
    try:
        names = sorted(os.listdir(resource_dir))
    except OSError:
        return {}
    found = {}
    for filename in names:
        if filename in _RESOURCE_FILES:
            found[filename] = filename
        elif filename.startswith("logo-"):
            found[os.path.splitext(filename)[0]] = filename
    return found


def runs_ipykernel(argv: tuple[str, ...]) -> bool:
    """Whether ``argv`` starts ipykernel itself (``python -m ipykernel_launcher`` or ``-m ipykernel``), so that
    it takes ipykernel's command-line settings (a wrapper script, an EG launcher or another kernel may not)."""
    return any(flag == "-m" and module in ("ipykernel_launcher", "ipykernel")
               for flag, module in itertools.pairwise(argv))


def with_history_choice(argv: tuple[str, ...], ipython_history: str) -> tuple[str, ...]:
    """``argv`` with the history setting of ``kernels.ipython_history`` added where it applies.

    ``kernel`` keeps each ipykernel's history in memory: kernels that run as one account otherwise all write
    every cell to its one ``history.sqlite``. That file mixes their users' cells (JupyterLab's console recalls
    them with the up arrow), makes busy kernels wait for each other's writes (the whole p99 of many busy kernels
    in egdbench), and is a known source of "database is locked" on NFS home directories. A kernelspec that
    sets any ``HistoryManager`` option itself is left as it is."""
    if (ipython_history != "kernel" or not runs_ipykernel(argv)
            or any(arg.startswith("--HistoryManager.") for arg in argv)):
        return argv
    return (*argv, HISTORY_OF_ITS_OWN)


def _info(name: str, resource_dir: str, spec: Mapping[str, Any], ipython_history: str) -> KernelSpecInfo:
    return KernelSpecInfo(
        name=name,
        argv=with_history_choice(tuple(str(a) for a in spec.get("argv", [])), ipython_history),
        display_name=str(spec.get("display_name", name)),
        language=str(spec.get("language", "")),
        interrupt_mode=str(spec.get("interrupt_mode", "signal")),
        env={str(k): str(v) for k, v in (spec.get("env") or {}).items()},
        metadata=dict(spec.get("metadata") or {}),
        resource_dir=resource_dir,
        resources=_resources(resource_dir),
    )


class KernelSpecStore:
    """Reads kernelspecs through jupyter_client, off the reactor thread."""

    def __init__(self, config: KernelsConfig, reactor: IReactorFromThreads, threadpool: ThreadPool) -> None:
        self._config = config
        self._reactor = reactor
        self._threadpool = threadpool

    def _manager(self) -> KernelSpecManager:
        manager = KernelSpecManager()
        if self._config.kernelspec_dirs:
            manager.kernel_dirs = [*self._config.kernelspec_dirs, *manager.kernel_dirs]
        if self._config.allowed_kernelspecs:
            manager.allowed_kernelspecs = set(self._config.allowed_kernelspecs)
        return manager

    def _read_all(self) -> dict[str, KernelSpecInfo]:
        found = self._manager().get_all_specs()
        return {name: _info(name, entry["resource_dir"], entry["spec"], self._config.ipython_history)
                for name, entry in sorted(found.items())}

    def _read_one(self, name: str, offered_only: bool) -> KernelSpecInfo:
        manager = self._manager()
        if not offered_only:
            manager.allowed_kernelspecs = set()
        # jupyter_client finds a spec under any case of its name and applies allowed_kernelspecs to listings
        # only: a spec is found here under the exact name the listing gives it (the directory's name in lower
        # case), and only if the listing has it, so that what cannot be listed cannot be started either.
        if name not in manager.find_kernel_specs():
            raise KernelSpecNotFound(name)
        try:
            spec = manager.get_kernel_spec(name)
        except (NoSuchKernel, ValueError):
            raise KernelSpecNotFound(name) from None
        return _info(name, spec.resource_dir, spec.to_dict(), self._config.ipython_history)

    def read_all_blocking(self) -> dict[str, KernelSpecInfo]:
        """Every kernelspec, read on the calling thread (for the CLI, never for the reactor thread)."""
        return self._read_all()

    async def all(self) -> dict[str, KernelSpecInfo]:
        """Every kernelspec egd offers, by name."""
        result: dict[str, KernelSpecInfo] = await deferToThreadPool(self._reactor, self._threadpool, self._read_all)
        return result

    async def get(self, name: str, offered_only: bool = True) -> KernelSpecInfo:
        """One kernelspec egd offers (listed, within ``kernels.allowed_kernelspecs``), by its exact name;
        :class:`KernelSpecNotFound` if there is none: the same answer for a spec that exists but is not offered.
        ``offered_only=False`` finds any installed spec (for kernels that already run, such as re-attached ones).
        """
        if not name or "/" in name or name.startswith("."):
            raise KernelSpecNotFound(name)
        result: KernelSpecInfo = await deferToThreadPool(self._reactor, self._threadpool, self._read_one, name,
                                                         offered_only)
        return result
