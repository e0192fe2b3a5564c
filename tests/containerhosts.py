"""Real Docker-API container engines for the docker-driver tests: a private dockerd and a podman API service.

Recipe: /work/shared/k8s-container-recipe.md §2 (packages, podman configuration, kernel image, API, networks) and
§5 (host state). Both engines run as root from a temporary directory of their own (storage, run state, socket,
log) and answer within a second; loading the kernel image ``localhost/egd-kernel:test`` (python3 + ipykernel +
tini, 300 MB, built once and cached by tests/services/build-images.sh) then takes 10-25 s on 2 busy cores; the
pause image ``localhost/pause:egd`` (a static /pause) is loaded too::

    def test_something(engine):              # parametrised: once on dockerd, once on podman
        status, body = engine.api("POST", "/containers/create", {"Image": engine.kernel_image, "Cmd": [...]})
        engine.api("POST", f"/containers/{body['Id']}/start")
        ip = engine.container_ip(body["Id"])  # reachable from the host
        # a container reaches the host at engine.bridge_ip

* ``dockerd`` (session): dockerd 20.10 with ``--iptables=false --ip-masq=false --ip-forward=false`` on a bridge
  of its own, ``egd-docker0`` = 10.251.0.1/24 (created by the fixture, so it exists as long as the engine runs);
  containers' cgroups under ``/egd-docker0``. ``engine.env`` (``DOCKER_HOST``) for the docker CLI or docker-py.
* ``podman_api`` (session): ``podman system service`` (Docker-compatible API 1.41) with runtime runc (crun fails
  on this machine's hybrid cgroups) and ulimits the machine allows (recipe pitfall 1), on a netavark network of
  its own, ``egd`` with bridge ``egd-podman0`` = 10.88.0.1/16, made the default network. netavark removes a bridge
  with its last container, so the fixture keeps one small container (pause image, label ``egd.test.keeper``)
  running: ``bridge_ip`` can then be bound on the host at any time (``containers()`` lists the keeper too; filter
  by label).
* ``engine`` (function): both of the above in turn; removes every container the test left (except the keeper).

Each engine records the host state (tests/hoststate.py) before it starts and restores it after it stopped
(containers first, then the daemon, then links, firewall tables, sysctls, mounts, cgroups, paths). A part that
cannot start fails the test with the part, the step and the last 40 lines of its log; without root the tests are
skipped. The bridge names and subnets are fixed, so two test sessions on one machine take turns: a lock file
``/run/egd-containerhosts-<bridge>.lock`` (waits up to LOCK_TIMEOUT). Kernels in containers: PID 1 ipykernel
ignores SIGTERM (recipe pitfall 6), so give containers ``"HostConfig": {"Init": true}`` (or run them under
``tini``) or every stop waits out its timeout.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import pytest

from tests.hoststate import HostState
from tests.procs import cmdline, is_zombie_or_gone

SERVICES = Path(__file__).resolve().parent / "services"
INSTALLER = SERVICES / "install-containers.sh"
IMAGE_BUILDER = SERVICES / "build-images.sh"
KERNEL_IMAGE = "localhost/egd-kernel:test"
PAUSE_IMAGE = "localhost/pause:egd"
API_VERSION = "v1.41"
KEEPER_LABEL = "egd.test.keeper"
#: Seconds an engine may take to answer /_ping after it was started (recipe §6: 10 s for sockets).
READY_TIMEOUT = 15.0
#: Seconds to wait for another test session to release an engine's bridge (the same names and subnets).
LOCK_TIMEOUT = 240.0
#: The engines' binaries; any missing one makes the fixture run INSTALLER.
BINARIES = ("/usr/sbin/dockerd", "podman", "runc", "tini", "/usr/lib/podman/netavark", "/usr/libexec/podman/catatonit")


class EngineError(Exception):
    """A container engine could not be started or used; the message names the part and the step."""

    def __init__(self, part: str, step: str, detail: str = "", log: str = "") -> None:
        self.part, self.step, self.detail, self.log = part, step, detail, log
        text = f"{part}: {step}"
        if detail:
            text += f": {detail}"
        if log:
            text += f"\n--- last lines of the {part} log:\n{log}"
        super().__init__(text)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the engines' API); the host name in requests is ignored."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout, blocksize=1 << 20)  # image tars: 300 MB
        self._socket_path = path

    def connect(self) -> None:
        """Connect to the unix socket instead of a TCP address."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock


class DockerEngine:
    """One Docker-API engine (``name`` "dockerd" or "podman") run from ``work_dir``, with host-state restore.

    ``start()`` records the host state, starts the daemon, waits for ``/_ping`` and loads ``images`` (docker-archive
    tars); ``stop()`` removes all containers, stops the daemon and its helpers and restores the host state. Raises
    EngineError when a step fails (the fixtures turn that into ``pytest.fail``).
    """

    def __init__(
        self,
        name: str,
        work_dir: str | os.PathLike[str],
        images: list[Path],
        bridge_name: str,
        bridge_cidr: str,
        network_name: str = "egd",
    ) -> None:
        if name not in ("dockerd", "podman"):
            raise ValueError(f"unknown engine {name!r}")
        #: "dockerd" or "podman"
        self.name = name
        self.work_dir = Path(work_dir)
        self.images = list(images)
        #: the bridge the containers are attached to, and the host's address on it (containers reach the host there)
        self.bridge_name = bridge_name
        self.bridge_cidr = bridge_cidr
        self.bridge_ip = bridge_cidr.split("/", 1)[0]
        #: podman only: the name of the netavark network (the default network) that owns the bridge
        self.network_name = network_name
        self.kernel_image = KERNEL_IMAGE
        self.pause_image = PAUSE_IMAGE
        self.socket_path = str(self.work_dir / ("docker.sock" if name == "dockerd" else "podman.sock"))
        self.log_path = self.work_dir / f"{name}.log"
        self.host_state: HostState | None = None
        self.process: subprocess.Popen[bytes] | None = None
        #: seconds taken by the last start: "ready" (daemon answers /_ping), "images" (load), "total"
        self.timings: dict[str, float] = {}
        #: what the last stop() could not restore (empty when the host is as it was)
        self.restore_problems: list[str] = []
        self._restored = False
        self._lock_handle: TextIO | None = None

    def __repr__(self) -> str:
        return f"<DockerEngine {self.name} {self.socket_path} bridge {self.bridge_name} {self.bridge_cidr}>"

    # --- for tests --------------------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client (docker CLI, docker-py) of this engine: ``DOCKER_HOST``."""
        return {"DOCKER_HOST": f"unix://{self.socket_path}"}

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs."""
        return self.process.pid if self.process is not None else None

    def api(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
        """One Docker Engine API request over the unix socket: ``(status, decoded JSON body)``.

        ``path`` without a version ("/containers/json") gets ``/v1.41`` in front. ``body``: a dict/list is sent as
        JSON, bytes as they are. The result is the JSON value, or the text when the body is not JSON (logs), or
        None when empty."""
        if not path.startswith("/v1.") and path != "/_ping":
            path = f"/{API_VERSION}{path}"
        headers: dict[str, str] = {}
        payload: bytes | None = None
        if isinstance(body, (bytes, bytearray)):
            payload = bytes(body)
            headers["Content-Type"] = "application/octet-stream"
        elif body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = _UnixHTTPConnection(self.socket_path, timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, _decode(data)
        finally:
            conn.close()

    def containers(self, label: str | None = None, all: bool = True) -> list[dict[str, Any]]:
        """The engine's containers (``GET /containers/json``), all states unless ``all=False``; ``label``:
        only those with that label ("key" or "key=value")."""
        query: dict[str, str] = {"all": "1" if all else "0"}
        if label is not None:
            query["filters"] = json.dumps({"label": [label]})
        status, body = self.api("GET", "/containers/json?" + urllib.parse.urlencode(query))
        if status != 200:
            raise EngineError(self.name, "list containers", f"HTTP {status}: {body}")
        return list(body)

    def run_container(self, config: dict[str, Any], name: str | None = None) -> str:
        """Create and start a container from ``config`` (a ``POST /containers/create`` body); its id."""
        path = "/containers/create" + (f"?name={urllib.parse.quote(name)}" if name else "")
        status, body = self.api("POST", path, config)
        if status != 201:
            raise EngineError(self.name, f"create container {name or ''}".strip(), f"HTTP {status}: {body}")
        cid = str(body["Id"])
        status, body = self.api("POST", f"/containers/{cid}/start")
        if status not in (204, 304):
            raise EngineError(self.name, f"start container {cid[:12]}", f"HTTP {status}: {body}")
        return cid

    def container_ip(self, cid: str) -> str:
        """The container's address on the engine's bridge (reachable from the host)."""
        status, body = self.api("GET", f"/containers/{cid}/json")
        if status != 200:
            raise EngineError(self.name, f"inspect container {cid[:12]}", f"HTTP {status}: {body}")
        settings = body["NetworkSettings"]
        if settings.get("IPAddress"):
            return str(settings["IPAddress"])
        for network in (settings.get("Networks") or {}).values():
            if network.get("IPAddress"):
                return str(network["IPAddress"])
        raise EngineError(self.name, f"container {cid[:12]} has no IP address", json.dumps(settings)[:500])

    def container_logs(self, cid: str) -> str:
        """The container's stdout and stderr so far (stream frame headers removed)."""
        status, body = self.api("GET", f"/containers/{cid}/logs?stdout=1&stderr=1")
        if status != 200:
            raise EngineError(self.name, f"logs of container {cid[:12]}", f"HTTP {status}: {body}")
        return _strip_frames(body if isinstance(body, str) else json.dumps(body))

    def remove_containers(self, keep_keeper: bool = True) -> None:
        """Force-remove every container (those of the keeper too unless ``keep_keeper``)."""
        for container in self.containers():
            if keep_keeper and KEEPER_LABEL in (container.get("Labels") or {}):
                continue
            self.api("DELETE", f"/containers/{container['Id']}?force=1&v=1")

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the daemon's log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(lines[-n:])

    # --- start / stop ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Record the host state, start the daemon, wait until it answers, load the images (EngineError if not)."""
        t0 = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.timings["lock"] = time.monotonic() - t0
        self._wait_bridge_unused()
        if _link_exists(self.bridge_name):
            # we hold the bridge's lock and nothing uses it: left by a crashed earlier run, start afresh
            subprocess.run(["ip", "link", "del", self.bridge_name], capture_output=True)
        self._restored = False
        self.host_state = HostState.record(
            self.work_dir,
            extra_paths=("/etc/docker", "/run/containers/networks"),
            owned_links=(self.bridge_name,),
            owned_cgroups=(self.bridge_name, "libpod_parent") if self.name == "podman" else (self.bridge_name,),
            default_owned=False,
        )
        if self.name == "dockerd":
            argv, env = self._prepare_dockerd()
        else:
            argv, env = self._prepare_podman()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self._wait_ready()
        self.timings["ready"] = time.monotonic() - t0
        t1 = time.monotonic()
        for tar in self.images:
            self._load_image(tar)
        self.timings["images"] = time.monotonic() - t1
        if self.name == "podman":
            self.run_container(
                {"Image": PAUSE_IMAGE, "Labels": {KEEPER_LABEL: "1"}, "HostConfig": {"Init": False}},
                name="egd-bridge-keeper",
            )
        self.timings["total"] = time.monotonic() - t0

    def stop(self) -> list[str]:
        """Remove all containers, stop the daemon and whatever it left running from ``work_dir``, restore the host
        state. Returns what could not be restored (also kept in ``restore_problems``)."""
        problems: list[str] = []
        if self.process is not None and self.process.poll() is None:
            try:
                self.remove_containers(keep_keeper=False)
            except (OSError, EngineError, http.client.HTTPException) as exc:
                problems.append(f"{self.name}: removing containers: {exc}")
        if self.process is not None:
            _stop_process(self.process.pid, problems, self.name)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.name}: pid {self.process.pid} did not exit")
            self.process = None
        # helpers the daemon started from our directories (containerd, shims, conmon) if any outlived it
        for pid in _pids_mentioning(str(self.work_dir)):
            _stop_process(pid, problems, f"{self.name} helper {cmdline(pid)[:80]}")
        if self.host_state is not None and not self._restored:
            problems += self.host_state.restore()
            self._restored = True  # a second stop() must not put back a record that others have moved on from
        self._unlock()
        self.restore_problems = problems
        return problems

    def _lock(self) -> None:
        """Take the bridge name's lock (``/run/egd-containerhosts-<bridge>.lock``): another test session on this
        machine using the same bridge and subnet would break ours. Waits up to LOCK_TIMEOUT for it."""
        path = f"/run/egd-containerhosts-{self.bridge_name}.lock"
        handle = open(path, "a+")  # held until _unlock
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.seek(0)
                    holder = handle.read().strip()
                    handle.close()
                    raise EngineError(
                        self.name,
                        f"bridge {self.bridge_name} in use by another test session for {LOCK_TIMEOUT:.0f} s",
                        f"{path} held by {holder or 'unknown'}",
                    ) from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} {self.work_dir}\n")
        handle.flush()
        self._lock_handle = handle

    def _wait_bridge_unused(self) -> None:
        """Wait (up to LOCK_TIMEOUT) while the bridge has ports or a dockerd names it: a session that does not take
        the lock (older code, a developer's engine) still uses it."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            ports = os.listdir(f"/sys/class/net/{self.bridge_name}/brif") if _link_exists(self.bridge_name) else []
            users = _pids_mentioning(f"--bridge {self.bridge_name}")
            if not ports and not users:
                return
            if time.monotonic() > deadline:
                raise EngineError(
                    self.name,
                    f"bridge {self.bridge_name} in use for {LOCK_TIMEOUT:.0f} s",
                    f"ports {ports}, processes {[(pid, cmdline(pid)[:100]) for pid in users]}",
                )
            time.sleep(0.5)

    def _unlock(self) -> None:
        """Release the bridge's lock (the file stays: removing a lock file races with its next taker)."""
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def _prepare_dockerd(self) -> tuple[list[str], dict[str, str]]:
        """Create the bridge (dockerd's --bridge needs an existing one) and the daemon's command line."""
        for step in (
            ["ip", "link", "add", self.bridge_name, "type", "bridge"],
            ["ip", "addr", "add", self.bridge_cidr, "dev", self.bridge_name],
            ["ip", "link", "set", self.bridge_name, "up"],
        ):
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                raise EngineError(self.name, f"bridge {self.bridge_name}: {' '.join(step)}", result.stderr.strip())
        d = self.work_dir
        (d / "daemon.json").write_text("{}\n")  # so that a host /etc/docker/daemon.json does not apply
        argv = [
            "dockerd",
            "--config-file", str(d / "daemon.json"),
            "--data-root", str(d / "root"),
            "--exec-root", str(d / "exec"),
            "--pidfile", str(d / "dockerd.pid"),
            "-H", f"unix://{self.socket_path}",
            "--bridge", self.bridge_name,
            # keep dockerd out of the firewall and the sysctls; host <-> container needs neither
            "--iptables=false", "--ip-masq=false", "--ip-forward=false",
            # containers' cgroups under /egd-docker0 (not /docker): HostState removes it, a developer's dockerd
            # keeps its own
            "--cgroup-parent", "/" + self.bridge_name,
        ]  # fmt: skip
        return argv, _clean_env()

    def _prepare_podman(self) -> tuple[list[str], dict[str, str]]:
        """Write containers.conf/storage.conf and the network definition; the API service's command line."""
        d = self.work_dir
        for sub in ("storage", "run", "networks"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        nofile, nproc = _ulimits()
        (d / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{d}/run/libpod"\n'
            f'static_dir = "{d}/storage/libpod"\n'
            f'volume_path = "{d}/storage/volumes"\n'
            "[network]\n"
            'network_backend = "netavark"\n'
            f'network_config_dir = "{d}/networks"\n'
            f'default_network = "{self.network_name}"\n'
        )
        (d / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{d}/run/st"\ngraphroot = "{d}/storage"\n'
        )
        # The default network, written out so that its bridge has a name of its own (podman0 otherwise).
        gateway = self.bridge_ip
        prefix = int(self.bridge_cidr.split("/", 1)[1])
        subnet = _network_address(gateway, prefix)
        network = {
            "name": self.network_name,
            "id": hashlib.sha256(self.network_name.encode()).hexdigest(),
            "driver": "bridge",
            "network_interface": self.bridge_name,
            "created": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "subnets": [{"subnet": f"{subnet}/{prefix}", "gateway": gateway}],
            "ipv6_enabled": False,
            "internal": False,
            "dns_enabled": False,
            "ipam_options": {"driver": "host-local"},
        }
        (d / "networks" / f"{self.network_name}.json").write_text(json.dumps(network, indent=1) + "\n")
        env = _clean_env()
        env["CONTAINERS_CONF"] = str(d / "containers.conf")
        env["CONTAINERS_STORAGE_CONF"] = str(d / "storage.conf")
        argv = ["podman", "system", "service", "--time=0", f"unix://{self.socket_path}"]
        return argv, env

    def _wait_ready(self) -> None:
        """Poll /_ping until the daemon answers OK (EngineError after READY_TIMEOUT or when it exits)."""
        deadline = time.monotonic() + READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise EngineError(
                    self.name, f"daemon exited with {self.process.returncode} before answering", log=self.log_tail()
                )
            try:
                status, body = self.api("GET", "/_ping", timeout=2)
                if status == 200 and body == "OK":
                    return
                last = f"HTTP {status} {body}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise EngineError(self.name, f"no answer on {self.socket_path} after {READY_TIMEOUT:.0f} s", last,
                          self.log_tail())  # fmt: skip

    def _load_image(self, tar: Path) -> None:
        """``POST /images/load`` with a docker-archive tar (streamed from disk)."""
        conn = _UnixHTTPConnection(self.socket_path, 300)
        try:
            size = tar.stat().st_size
            with open(tar, "rb") as handle:
                conn.request(
                    "POST",
                    f"/{API_VERSION}/images/load?quiet=1",
                    body=handle,
                    headers={"Content-Type": "application/x-tar", "Content-Length": str(size)},
                )
                response = conn.getresponse()
                text = response.read().decode(errors="replace")
        except OSError as exc:
            raise EngineError(self.name, f"load image {tar}", str(exc), self.log_tail()) from exc
        finally:
            conn.close()
        if response.status != 200 or '"error' in text:
            raise EngineError(self.name, f"load image {tar}", f"HTTP {response.status}: {text[-500:]}",
                              self.log_tail())  # fmt: skip


def _decode(data: bytes) -> Any:
    """A response body: JSON when it parses, else text, None when empty."""
    if not data:
        return None
    text = data.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _strip_frames(text: str) -> str:
    """Remove the 8-byte stream headers of non-TTY container logs (``\\x01\\0\\0\\0`` + length)."""
    raw = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i + 8 <= len(raw) and raw[i] in (0, 1, 2) and raw[i + 1 : i + 4] == b"\0\0\0":
        length = int.from_bytes(raw[i + 4 : i + 8], "big")
        out += raw[i + 8 : i + 8 + length]
        i += 8 + length
    if i == 0:
        return text
    return out.decode("utf-8", "replace")


def _ulimits() -> tuple[int, int]:
    """nofile and nproc for podman's containers: the hard limits root may set (no CAP_SYS_RESOURCE here), nproc at
    most 32768 because podman lowers its own RLIMIT_NPROC to that (recipe pitfall 1)."""
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    if nofile == resource.RLIM_INFINITY:
        nofile = 1048576
    if nproc == resource.RLIM_INFINITY or nproc > 32768:
        nproc = 32768
    return nofile, nproc


def _network_address(ip: str, prefix: int) -> str:
    """The network address of ``ip``/``prefix`` (10.88.0.1/16 -> 10.88.0.0)."""
    value = int.from_bytes(socket.inet_aton(ip), "big") & (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def _clean_env() -> dict[str, str]:
    """The daemons' environment: ours without DOCKER_*/CONTAINERS_* settings that would redirect them."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "CONTAINERS_"))}


def _link_exists(name: str) -> bool:
    """Whether a network link of that name exists."""
    return os.path.exists(f"/sys/class/net/{name}")


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (a fixture's own work dir), except this one."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and text in cmdline(int(entry)):
            found.append(int(entry))
    return found


def _stop_process(pid: int, problems: list[str], what: str) -> None:
    """SIGTERM, up to 20 s, then SIGKILL (recipe §5.2 stop_pidfile), for a process this module started."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not is_zombie_or_gone(pid):
        time.sleep(0.05)
    if not is_zombie_or_gone(pid):
        problems.append(f"{what}: pid {pid} ignored SIGTERM for 20 s, killed")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- fixtures -----------------------------------------------------------------------------------------------------


def _tail(text: str, n: int = 40) -> str:
    """The last ``n`` lines of a command's output."""
    return "\n".join(text.splitlines()[-n:])


def prepare_images() -> tuple[Path, Path]:
    """Install the engines if needed and build (or find cached) the kernel and pause image tars:
    ``(kernel-img.tar, pause-img.tar)``. Fails the test clearly when either script fails."""
    if any(shutil.which(b) is None and not os.access(b, os.X_OK) for b in BINARIES):
        result = subprocess.run(["sh", str(INSTALLER)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(
                f"container engines: {INSTALLER} failed (exit {result.returncode})\n"
                f"{_tail(result.stdout + result.stderr)}",
                pytrace=False,
            )
    result = subprocess.run(["bash", str(IMAGE_BUILDER)], capture_output=True, text=True)
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2:
        pytest.fail(
            f"kernel image: {IMAGE_BUILDER} failed (exit {result.returncode})\n{_tail(result.stderr)}",
            pytrace=False,
        )
    return Path(lines[0]), Path(lines[1])


_image_tars: tuple[Path, Path] | None = None


def _images() -> tuple[Path, Path]:
    """prepare_images(), once per session."""
    global _image_tars
    if _image_tars is None:
        _image_tars = prepare_images()
    return _image_tars


def new_engine(
    name: str, bridge_name: str, bridge_cidr: str, network_name: str = "egd", kernel_image: bool = True
) -> DockerEngine:
    """An engine (not started) in a fresh short temporary directory (podman refuses a runroot > 50 characters),
    with the pause image and (unless ``kernel_image=False``: 300 MB, 3-15 s to load) the kernel image to load.
    Skips the test unless root. Start it with ``start_engine``, stop it with ``stop_engine``."""
    if os.geteuid() != 0:
        pytest.skip("container engines need root")
    kernel_tar, pause_tar = _images()
    work = tempfile.mkdtemp(prefix=f"egd-{'dk' if name == 'dockerd' else 'pm'}.", dir="/tmp")
    images = [kernel_tar, pause_tar] if kernel_image else [pause_tar]
    return DockerEngine(name, work, images, bridge_name, bridge_cidr, network_name)


def start_engine(engine: DockerEngine) -> None:
    """engine.start(), or stop/restore what it started and fail the test naming the part, step and log."""
    try:
        engine.start()
    except (EngineError, OSError, http.client.HTTPException) as exc:
        problems = engine.stop()
        tail = engine.log_tail()
        shutil.rmtree(engine.work_dir, ignore_errors=True)
        message = str(exc) if isinstance(exc, EngineError) and exc.log else f"{exc}\n--- last log lines:\n{tail}"
        if problems:
            message += "\n--- not restored: " + "; ".join(problems)
        pytest.fail(f"{engine.name}: start failed: {message}", pytrace=False)


def stop_engine(engine: DockerEngine) -> None:
    """engine.stop() and remove its directory; report (warn) what could not be restored."""
    problems = engine.stop()
    shutil.rmtree(engine.work_dir, ignore_errors=True)
    if problems:
        import warnings

        warnings.warn(f"{engine.name}: teardown left: {'; '.join(problems)}", stacklevel=1)


@pytest.fixture(scope="session")
def dockerd() -> Iterator[DockerEngine]:
    """A private dockerd (bridge egd-docker0, 10.251.0.1/24) with the kernel and pause images loaded."""
    engine = new_engine("dockerd", "egd-docker0", "10.251.0.1/24")
    start_engine(engine)
    try:
        yield engine
    finally:
        stop_engine(engine)


@pytest.fixture(scope="session")
def podman_api() -> Iterator[DockerEngine]:
    """A podman API service (network egd, bridge egd-podman0, 10.88.0.1/16) with the images loaded."""
    engine = new_engine("podman", "egd-podman0", "10.88.0.1/16")
    start_engine(engine)
    try:
        yield engine
    finally:
        stop_engine(engine)


@pytest.fixture(params=["dockerd", "podman"])
def engine(request: pytest.FixtureRequest) -> Iterator[DockerEngine]:
    """Each engine in turn (``dockerd`` then ``podman_api``); removes the containers the test left."""
    fixture = "dockerd" if request.param == "dockerd" else "podman_api"
    eng: DockerEngine = request.getfixturevalue(fixture)
    yield eng
    if eng.process is not None and eng.process.poll() is None:
        eng.remove_containers(keep_keeper=True)
