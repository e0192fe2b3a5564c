"""Kernels as containers through the Docker Engine API, on real engines: Debian's dockerd and podman's
Docker-compatible service (tests/containerhosts.py), with the image ``localhost/egd-kernel:test`` (Debian,
python3-ipykernel, tini).

Every test runs on both engines. What the driver created is read back from the engine itself, through its API.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egd.drivers.docker import DockerSettings, bundle_tar, demultiplex, exit_status
from tests import egdist
from tests.client import GatewayClient
from tests.conftest import GatewayProcess, wait_until
from tests.containerhosts import DockerEngine
from tests.test_lifecycle import interrupt_sleep

pytestmark = pytest.mark.docker

IMAGE = "localhost/egd-kernel:test"
LABEL_DRIVER = "egd.jupyter.org/driver"
LABEL_KERNEL = "egd.jupyter.org/kernel-id"
#: An image a kernelspec allows but no engine has.
MISSING_IMAGE = "localhost/egd-missing:none"
#: A gateway with the docker driver, and the engine its kernels run on.
Gateway = tuple[GatewayProcess, DockerEngine]


def kernel_containers(host: DockerEngine, kernel_id: str) -> list[dict[str, Any]]:
    """The containers (any state) of one kernel."""
    return host.containers(f"{LABEL_KERNEL}={kernel_id}")


def driver_containers(host: DockerEngine) -> set[str]:
    """The ids of every container any docker driver created."""
    return {c["Id"] for c in host.containers(LABEL_DRIVER)}


def write_spec(root: Path, name: str, timeout: int = 60, argv: list[str] | None = None, **config: Any) -> None:
    """A kernelspec for the docker driver."""
    (root / name).mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv or ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": name, "language": "python",
            "metadata": {"egd": {"driver": "docker", "launch_timeout": timeout, "config": config}}}
    (root / name / "kernel.json").write_text(json.dumps(spec))


def docker_gateway(host: DockerEngine, tmp: Path, label: str, state: dict[str, Any] | None = None,
                   kernels: dict[str, Any] | None = None, **extra: Any) -> GatewayProcess:
    """egd with the docker driver on ``host`` (an engine fixture) and this module's kernelspecs."""
    specs = tmp / "specs"
    write_spec(specs, "docker_python", image=IMAGE, images=[MISSING_IMAGE])
    write_spec(specs, "docker_volumes", image=IMAGE, volumes=["shared"])
    write_spec(specs, "docker_sleeper", timeout=6, image=IMAGE,
               argv=["python3", "-c", "import time; time.sleep(600)"])
    write_spec(specs, "docker_crasher", image=IMAGE,
               argv=["python3", "-c", "import sys; print('kernel-says-goodbye', file=sys.stderr); sys.exit(3)"])
    (tmp / "shared").mkdir(exist_ok=True)
    (tmp / "shared" / "hello.txt").write_text("from the host")
    settings = {
        "url": f"unix://{host.socket_path}",
        "label": label,
        # the bridge's address on the host: the containers reach egd there (the fixtures keep the bridge up)
        "callback_host": host.bridge_ip,
        "image": IMAGE,
        "volumes": {"shared": {"type": "bind", "source": str(tmp / "shared"), "target": "/mnt/shared",
                               "read_only": True}},
        "stop_timeout": 2,
        **extra,
    }
    return GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(specs)], "launch_timeout": 60, "heartbeat_interval": 1,
                    **(kernels or {})},
        "drivers": {"local": {}, "docker": settings},
        **({"state": state} if state else {}),
    })


@pytest.fixture(scope="module", params=["dockerd", "podman"])
def host(request: pytest.FixtureRequest) -> DockerEngine:
    """Each engine in turn, for a whole module (the engines are session fixtures of tests/containerhosts.py)."""
    found: DockerEngine = request.getfixturevalue("dockerd" if request.param == "dockerd" else "podman_api")
    return found


def unique_label(what: str) -> str:
    """A driver label of its own for one gateway (its containers are then told apart from any other's)."""
    return f"egd-{what}-{int(time.time() * 1000) % 10**8}"


@pytest.fixture(scope="module")
def docker_gw(host: DockerEngine, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Gateway]:
    """egd with the docker driver on one engine, shared by this module's tests on that engine; at the end no
    container of it may be left."""
    label = unique_label("test")
    gw = docker_gateway(host, tmp_path_factory.mktemp("dockergw"), label)
    try:
        yield gw, host
    finally:
        gw.stop()
    left = host.containers(f"{LABEL_DRIVER}={label}")
    for container in left:
        host.api("DELETE", f"/containers/{container['Id']}?force=1")
    assert not left, f"containers left behind: {[c['Names'] for c in left]}"


@pytest.fixture
def client(docker_gw: Gateway) -> GatewayClient:
    """A client of the docker gateway."""
    return docker_gw[0].client


def container_of(host: DockerEngine, kernel_id: str) -> dict[str, Any]:
    """The one container of a kernel."""
    found = kernel_containers(host, kernel_id)
    assert len(found) == 1, found
    return found[0]


def test_execute_interrupt_restart_delete(docker_gw: Gateway) -> None:
    """A kernel runs in a labelled container as uid 1000 under the engine's init; it executes, is interrupted,
    restarts into a new container, and DELETE leaves no container of it."""
    gw, api = docker_gw
    started = time.monotonic()
    kernel_id = gw.client.start_kernel("docker_python")
    took = time.monotonic() - started
    first = container_of(api, kernel_id)
    assert first["State"] == "running" and first["Names"] == [f"/egd-kernel-{kernel_id}"]
    _, details = api.api("GET", f"/containers/{first['Id']}/json")
    assert details["Config"]["User"] == "1000:100"
    assert details["HostConfig"]["Init"] is True
    assert "no-new-privileges" in " ".join(details["HostConfig"]["SecurityOpt"])
    assert not any("secret" in e.lower() for e in details["Config"]["Env"])
    sock = gw.client.connect(kernel_id)
    out = sock.execute("import os, socket; print(os.getuid(), socket.gethostname(), 6 * 7)").stdout.split()
    assert out[0] == "1000" and out[2] == "42" and first["Id"].startswith(out[1]), out
    # The bundle is in place, and the image's /var/run -> /run symlink is still one.
    bundle = sock.execute("import os; print(os.path.islink('/var/run'), sorted(os.listdir('/var/run/egd-launch')))")
    assert bundle.stdout.strip() == "True ['kernel_launcher.py', 'launch.json', 'launcher_protocol.py']", bundle.stdout
    sock.close()
    print(f"{api.name}: start to ready {took:.2f}s")
    interrupt_sleep(gw.client, kernel_id)
    assert gw.client.request("POST", f"/api/kernels/{kernel_id}/restart", {}).status == 200
    second = container_of(api, kernel_id)
    assert second["Id"] != first["Id"]
    sock = gw.client.connect(kernel_id)
    assert sock.execute("print('after restart')").stdout.strip() == "after restart"
    sock.close()
    assert gw.client.delete_kernel(kernel_id) == 204
    assert kernel_containers(api, kernel_id) == []


def test_volume_offered_by_the_kernelspec_is_mounted_read_only(client: GatewayClient) -> None:
    """A kernelspec that names an offered volume gets it, read-only as offered."""
    kernel_id = client.start_kernel("docker_volumes")
    try:
        sock = client.connect(kernel_id)
        assert sock.execute("print(open('/mnt/shared/hello.txt').read())").stdout.strip() == "from the host"
        run = sock.execute("open('/mnt/shared/x', 'w')")
        assert run.reply["content"]["status"] == "error"
        sock.close()
    finally:
        assert client.delete_kernel(kernel_id) == 204


def states_until(sock: Any, wanted: str, timeout: float) -> list[str]:
    """iopub execution states until ``wanted`` (raises on the socket's timeout)."""
    states: list[str] = []
    deadline = time.monotonic() + timeout
    while wanted not in states:
        msg = sock.recv(max(0.1, deadline - time.monotonic()))
        if msg["msg_type"] == "status":
            states.append(msg["content"]["execution_state"])
    return states


@pytest.mark.parametrize("how", ["kill", "rm -f"])
def test_container_ended_from_outside_is_noticed_at_once(docker_gw: Gateway, how: str) -> None:
    """``docker kill`` or ``docker rm -f`` of a kernel's container: the events stream tells egd within a second or
    two; egd announces the restart (Jupyter's automatic restart) and the kernel runs again in a new container,
    with the old one removed."""
    gw, api = docker_gw
    kernel_id = gw.client.start_kernel("docker_python")
    old = container_of(api, kernel_id)
    sock = gw.client.connect(kernel_id)
    sock.execute("1")
    if how == "kill":
        assert api.api("POST", f"/containers/{old['Id']}/kill")[0] == 204
    else:
        assert api.api("DELETE", f"/containers/{old['Id']}?force=1")[0] == 204
    ended = time.monotonic()
    try:
        states_until(sock, "restarting", 10)
        noticed = time.monotonic() - ended
        print(f"{api.name}: {how} -> restarting {noticed:.2f}s")
        assert noticed < 3
        wait_until(lambda: gw.client.kernel(kernel_id).json["execution_state"] == "idle", 60, what="the restart")
    finally:
        sock.close()
    new = container_of(api, kernel_id)
    assert new["Id"] != old["Id"] and new["State"] == "running"
    assert gw.client.delete_kernel(kernel_id) == 204
    assert kernel_containers(api, kernel_id) == []


def test_container_killed_is_declared_dead_without_restarts(host: DockerEngine, tmp_path: Path) -> None:
    """With automatic restarts off (restart_limit 0), a container killed from outside makes the kernel dead within
    seconds: "dead" on iopub, the kernel gone from the list and its container removed."""
    label = unique_label("dead")
    gw = docker_gateway(host, tmp_path, label, kernels={"restart_limit": 0})
    api = host
    try:
        kernel_id = gw.client.start_kernel("docker_python")
        container = container_of(api, kernel_id)
        sock = gw.client.connect(kernel_id)
        sock.execute("1")
        assert api.api("POST", f"/containers/{container['Id']}/kill")[0] == 204
        killed = time.monotonic()
        try:
            states_until(sock, "dead", 10)
        finally:
            sock.close()
        took = time.monotonic() - killed
        print(f"{api.name}: kill -> dead {took:.2f}s")
        assert took < 3
        wait_until(lambda: gw.client.kernel(kernel_id).status == 404, 10, what="the dead kernel to be dropped")
        wait_until(lambda: kernel_containers(api, kernel_id) == [], 10, what="its container to be removed")
    finally:
        gw.stop()


@pytest.mark.parametrize(("env", "status", "fragment"), [
    ({"KERNEL_IMAGE": "docker.io/library/evil:latest"}, 403, "KERNEL_IMAGE"),
    ({"KERNEL_VOLUMES": "etc"}, 403, "KERNEL_VOLUMES"),
    ({"KERNEL_UID": "1234"}, 403, "KERNEL_UID"),
    ({"KERNEL_MEMORY": "lots"}, 400, "KERNEL_MEMORY"),
    ({"KERNEL_CPUS": "64"}, 400, "KERNEL_CPUS"),
    ({"KERNEL_GPUS": "1"}, 400, "KERNEL_GPUS"),
])
def test_bad_input_is_refused_and_nothing_is_created(docker_gw: Gateway, env: dict[str, str],
                                                     status: int, fragment: str) -> None:
    """An image not on the allow-list, a volume not offered, a uid where uids are not honoured, resources out of
    bounds: 400 or 403 naming the variable, and no container."""
    gw, api = docker_gw
    before = driver_containers(api)
    resp = gw.client.request("POST", "/api/kernels", {"name": "docker_python", "env": env})
    assert resp.status == status, resp.body
    assert fragment in resp.json["message"], resp.json
    assert driver_containers(api) == before
    assert gw.client.request("GET", "/api/kernels").json == []


def test_image_the_engine_lacks_fails_the_start_naming_it(docker_gw: Gateway) -> None:
    """An allowed image that is not on the engine (egd pulls nothing): the start fails naming the image, and no
    container is left."""
    gw, api = docker_gw
    before = driver_containers(api)
    resp = gw.client.request("POST", "/api/kernels", {"name": "docker_python", "env": {"KERNEL_IMAGE": MISSING_IMAGE}})
    assert resp.status == 500, resp.body
    assert MISSING_IMAGE in resp.json["message"], resp.json
    assert driver_containers(api) == before


def test_eg_python_docker_spec_runs_unchanged(host: DockerEngine, tmp_path: Path) -> None:
    """EG's own python_docker kernelspec (EG 3.3's sdist; only its image_name set, as EG's docs ask): egd creates
    the container EG's launch_docker.py would, and EG's launcher in it reports over EG's protocol. EG's kernel
    images carry EG's launchers; the test image does not, so the operator's container_template mounts them from
    the host and runs EG's bootstrap-kernel.sh, as EG's image does. Execute, interrupt, restart, delete: no
    container left."""
    specs = egdist.assemble(tmp_path / "eg", ["python_docker"])
    spec = egdist.spec_json(specs, "python_docker")
    spec["metadata"]["process_proxy"]["config"]["image_name"] = IMAGE  # type: ignore[index]
    (specs / "python_docker" / "kernel.json").write_text(json.dumps(spec))
    launchers = egdist.eg_source() / "etc" / "kernel-launchers"
    template = {"Cmd": ["/bin/bash", "/opt/eg/bootstrap/bootstrap-kernel.sh"],
                "Env": ["KERNEL_LAUNCHERS_DIR=/opt/eg", "KERNEL_LANGUAGE=python"],
                "HostConfig": {"Mounts": [{"Type": "bind", "Source": str(launchers), "Target": "/opt/eg",
                                           "ReadOnly": True}]}}
    label = unique_label("eg")
    gw = docker_gateway(host, tmp_path, label, kernels={"kernelspec_dirs": [str(tmp_path / "specs"), str(specs)]},
                        container_template=template)
    try:
        kernel_id = gw.client.start_kernel("python_docker")
        assert "EG launcher" in gw.client.kernel(kernel_id).json["location"]
        first = container_of(host, kernel_id)["Id"]
        sock = gw.client.connect(kernel_id)
        assert sock.execute("import os; print(os.environ['KERNEL_ID'])").stdout.strip() == kernel_id
        sock.close()
        interrupt_sleep(gw.client, kernel_id)
        assert gw.client.request("POST", f"/api/kernels/{kernel_id}/restart", {}).status == 200
        assert container_of(host, kernel_id)["Id"] != first
        sock = gw.client.connect(kernel_id)
        assert sock.execute("print(6 * 7)").stdout.strip() == "42"
        sock.close()
        assert gw.client.delete_kernel(kernel_id) == 204
        assert not kernel_containers(host, kernel_id)
    finally:
        gw.stop()


def test_launch_timeout_is_503_and_removes_the_container(docker_gw: Gateway) -> None:
    """A kernel that never listens: 503 at the launch timeout with the reason, and its container removed."""
    gw, api = docker_gw
    before = driver_containers(api)
    started = time.monotonic()
    resp = gw.client.request("POST", "/api/kernels", {"name": "docker_sleeper"})
    assert resp.status == 503, resp.body
    assert time.monotonic() - started < 30
    assert "container egd-kernel-" in resp.json["message"], resp.json
    assert driver_containers(api) == before


def test_kernel_that_exits_fails_the_start_with_its_log(docker_gw: Gateway) -> None:
    """A kernel that exits at once fails the start at once, with what it wrote; no container is left."""
    gw, api = docker_gw
    before = driver_containers(api)
    started = time.monotonic()
    resp = gw.client.request("POST", "/api/kernels", {"name": "docker_crasher"})
    assert resp.status in (500, 503), resp.body
    assert time.monotonic() - started < 20
    assert "kernel-says-goodbye" in resp.json["message"], resp.json
    assert driver_containers(api) == before


def test_impersonation_through_kernel_uid(host: DockerEngine, tmp_path: Path) -> None:
    """Where allowed, KERNEL_UID/KERNEL_GID choose the kernel's ids; root is refused without allow_root."""
    label = unique_label("uid")
    gw = docker_gateway(host, tmp_path, label, allow_uid=True)
    api = host
    try:
        user = {"KERNEL_USERNAME": "alice"}
        resp = gw.client.request("POST", "/api/kernels", {"name": "docker_python",
                                                          "env": {**user, "KERNEL_UID": "0"}})
        assert resp.status == 403 and "root" in resp.json["message"], resp.body
        assert api.containers(f"{LABEL_DRIVER}={label}") == []
        kernel_id = gw.client.start_kernel("docker_python", {**user, "KERNEL_UID": "1234", "KERNEL_GID": "1234"})
        container = container_of(api, kernel_id)
        assert container["Labels"]["egd.jupyter.org/user"] == "alice"
        sock = gw.client.connect(kernel_id)
        assert sock.execute("import os; print(os.getuid(), os.getgid())").stdout.split() == ["1234", "1234"]
        sock.close()
        assert gw.client.delete_kernel(kernel_id) == 204
        assert kernel_containers(api, kernel_id) == []
    finally:
        gw.stop()


def test_kill_9_then_restart_reattaches_a_container_kernel(host: DockerEngine, tmp_path: Path) -> None:
    """egd is SIGKILLed while a kernel runs; the next egd with the same state finds its container by label and its
    launcher answering, and serves the kernel with its variables; DELETE then removes the container."""
    label = unique_label("re")
    state = {"path": str(tmp_path / "state.sqlite"), "on_stop": "keep"}
    api = host
    first = docker_gateway(host, tmp_path, label, state)
    try:
        kernel_id = first.client.start_kernel("docker_python")
        container = container_of(api, kernel_id)
        sock = first.client.connect(kernel_id)
        sock.execute("w = 'kept in the container'")
        sock.close()
    finally:
        first.proc.kill()
        first.proc.wait(10)
        first.stop()
    second = docker_gateway(host, tmp_path, label, {**state, "on_stop": "shutdown"})
    try:
        assert [k["id"] for k in second.client.request("GET", "/api/kernels").json] == [kernel_id]
        assert container_of(api, kernel_id)["Id"] == container["Id"]
        sock = second.client.connect(kernel_id)
        assert sock.execute("print(w)").stdout.strip() == "kept in the container"
        sock.close()
        assert second.client.delete_kernel(kernel_id) == 204
        assert kernel_containers(api, kernel_id) == []
    finally:
        second.stop()
        for left in api.containers(f"{LABEL_DRIVER}={label}"):
            api.api("DELETE", f"/containers/{left['Id']}?force=1")


def test_container_whose_launcher_does_not_answer_is_removed_on_reattach(host: DockerEngine,
                                                                         tmp_path: Path) -> None:
    """After kill -9 of egd, a kernel's container whose launcher is gone (its kernel process killed inside) is not
    re-attached to: the next egd removes it."""
    label = unique_label("re2")
    state = {"path": str(tmp_path / "state.sqlite"), "on_stop": "keep"}
    api = host
    first = docker_gateway(host, tmp_path, label, state)
    try:
        kernel_id = first.client.start_kernel("docker_python")
        container = container_of(api, kernel_id)
    finally:
        first.proc.kill()
        first.proc.wait(10)
        first.stop()
    # Pause the container: it is there and running to the engine, but its launcher cannot answer.
    assert api.api("POST", f"/containers/{container['Id']}/pause")[0] == 204
    second = docker_gateway(host, tmp_path, label, {**state, "on_stop": "shutdown"})
    try:
        wait_until(lambda: second.client.request("GET", "/api/kernels").json == [], 30,
                   what="the unanswering kernel to be dropped")
        wait_until(lambda: kernel_containers(api, kernel_id) == [], 30, what="its container to be removed")
    finally:
        second.stop()
        for left in api.containers(f"{LABEL_DRIVER}={label}"):
            api.api("DELETE", f"/containers/{left['Id']}?force=1")


def test_log_frames_bundle_and_event_parsing() -> None:
    """The pieces without an engine: a multiplexed log's frame headers go, the bundle tar holds only its directory
    (never ``var`` or ``var/run``), and both engines' ``die``/``destroy``/``remove`` events read as ends."""
    framed = b"\x01\0\0\0\0\0\0\x06hello\n" + b"\x02\0\0\0\0\0\0\x05oops\n"
    assert demultiplex(framed) == "hello\noops\n"
    assert demultiplex(b"plain text\n") == "plain text\n"
    with tarfile.open(fileobj=io.BytesIO(bundle_tar({"a.py": b"x", "launch.json": b"{}"}, 1234, 100))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["var/run/egd-launch", "var/run/egd-launch/a.py", "var/run/egd-launch/launch.json"]
    assert members["var/run/egd-launch/launch.json"].uid == 1234 and members["var/run/egd-launch"].mode == 0o555
    die = {"Action": "die", "Actor": {"Attributes": {"exitCode": "137"}}}
    assert exit_status(die).signal == 9
    assert exit_status({"Action": "die", "Actor": {"Attributes": {"exitCode": "3"}}}).code == 3
    assert "removed" in exit_status({"Action": "remove", "Actor": {"Attributes": {}}}).describe()


def test_settings_problems_name_the_key() -> None:
    """Volume offers of the wrong shape, a bad URL and a lone TLS file are config problems naming the key."""
    settings = DockerSettings(url="ftp://x", tls_cert="/c.pem",
                              volumes={"a": {"type": "nfs", "source": "rel", "target": "t", "mode": "rw"}})
    found = "\n".join(settings.problems())
    for fragment in ("url:", "tls_cert, tls_key", "volumes.a: unknown keys mode", "volumes.a.type", "volumes.a.target"):
        assert fragment in found, found
    assert DockerSettings(volumes={"home": {"type": "bind", "source": "/srv", "target": "/home/k"}}).problems() == []


class SocketRelay:
    """A unix socket that relays every connection to the engine's socket, and can cut them all and refuse new ones
    for a while (the engine restarting, as far as egd can tell)."""

    def __init__(self, path: str, upstream: str) -> None:
        self.path = path
        self._upstream = upstream
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(64)
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.down = False
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self._upstream)
            with self._lock:
                self.accepted += 1
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Close every relayed connection and refuse new ones until :meth:`resume`."""
        self.down = True
        with self._lock:
            for end in self._open:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
            self._open.clear()

    def resume(self) -> None:
        """Relay again."""
        self.down = False

    def close(self) -> None:
        """Stop relaying."""
        self.cut()
        self._server.close()


def test_events_stream_resumes_and_catches_what_happened_meanwhile(host: DockerEngine, tmp_path: Path) -> None:
    """The connection to the engine breaks (every request refused for a while) and a kernel's container is killed
    meanwhile: egd's events stream reconnects and the kernel is reported dead within seconds of the engine being
    back (its ``since`` and the listing after the reconnection)."""
    relay = SocketRelay(str(tmp_path / "relay.sock"), host.socket_path)
    label = unique_label("relay")
    gw = docker_gateway(host, tmp_path, label, kernels={"restart_limit": 0}, url=f"unix://{relay.path}")
    try:
        kernel_id = gw.client.start_kernel("docker_python")
        container = container_of(host, kernel_id)
        sock = gw.client.connect(kernel_id)
        sock.execute("1")
        relay.cut()
        assert host.api("POST", f"/containers/{container['Id']}/kill")[0] == 204
        time.sleep(2)
        assert gw.client.kernel(kernel_id).status == 200  # egd could not know yet
        relay.resume()
        back = time.monotonic()
        try:
            states_until(sock, "dead", 20)
        finally:
            sock.close()
        took = time.monotonic() - back
        print(f"{host.name}: engine back -> dead {took:.2f}s")
        assert took < 8
        wait_until(lambda: kernel_containers(host, kernel_id) == [], 15, what="its container to be removed")
    finally:
        gw.stop()
        relay.close()
        for left in host.containers(f"{LABEL_DRIVER}={label}"):
            host.api("DELETE", f"/containers/{left['Id']}?force=1")


def test_container_of_a_launch_cut_short_is_removed_at_the_next_start(dockerd: DockerEngine, tmp_path: Path) -> None:
    """A kernel container of this driver that no recorded kernel owns and that is older than any launch (what a
    crash of egd mid-launch leaves) is removed when the next egd with the state store starts; a younger one is
    not."""
    label = unique_label("sweep")

    def stray(kernel_id: str) -> str:
        return dockerd.run_container({"Image": IMAGE, "Cmd": ["python3", "-c", "import time; time.sleep(600)"],
                                      "Labels": {LABEL_DRIVER: label, LABEL_KERNEL: kernel_id},
                                      "HostConfig": {"Init": True}})

    old = stray("stray-old")
    time.sleep(12)
    new = stray("stray-new")
    state = {"path": str(tmp_path / "state.sqlite"), "on_stop": "shutdown"}
    gw = docker_gateway(dockerd, tmp_path, label, state=state,
                        kernels={"launch_timeout": 10, "max_launch_timeout": 10})
    try:
        wait_until(lambda: old not in driver_containers(dockerd), 30, 0.5, what="the stray container to go")
        assert "belongs to no kernel egd knows" in gw.log()
        assert new in driver_containers(dockerd)
    finally:
        gw.stop()
        dockerd.api("DELETE", f"/containers/{new}?force=1")
