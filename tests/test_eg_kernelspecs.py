"""Enterprise Gateway's own kernelspecs and launchers, run by egd unchanged (EG 3.3's sdist, tests/egdist.py).

- EG's launcher protocol on the gateway's side: EG's own ``_encrypt`` (imported from EG's launcher script) against
  egd's decoder, and what the decoder refuses.
- ``python_distributed`` on the ssh hosts (network namespaces with their own sshd): execute, interrupt, restart,
  delete, nothing left; a payload forged from another address is refused, and the launch then times out.
- An EG class egd has no driver for: a clear error at ``egd check-config``, in ``egd kernelspecs``, and 503 at start.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from egd.egprotocol import PayloadRefused, ResponseKey, decode_payload
from tests import egdist
from tests.client import BackgroundStart, GatewayClient
from tests.conftest import KERNELSPECS, GatewayProcess, wait_until
from tests.sshhosts import SshHost, SshLab
from tests.test_lifecycle import interrupt_sleep

pytestmark = pytest.mark.eg

WHERE = "import os, socket; print(socket.gethostname(), os.getpid())"


# -- the payload ------------------------------------------------------------------------------------------------

def _key() -> ResponseKey:
    """A response key made synchronously (the thread pool of the reactor is not running in a unit test)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return ResponseKey(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _eg_launcher() -> ModuleType:
    """EG's ``launch_ipykernel.py``, imported from EG's sdist (its functions only; nothing runs at import)."""
    path = egdist.eg_source() / "etc" / "kernel-launchers" / "python" / "scripts" / "launch_ipykernel.py"
    spec = importlib.util.spec_from_file_location("eg_launch_ipykernel", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONNECTION = {"shell_port": 50001, "iopub_port": 50002, "stdin_port": 50003, "control_port": 50004,
              "hb_port": 50005, "ip": "0.0.0.0", "key": "a0b1", "transport": "tcp", "signature_scheme": "hmac-sha256",
              "kernel_name": "", "pid": 4242, "pgid": 4242, "comm_port": 50006,
              "kernel_id": "8d2b9a60-3c1d-4c7e-9a53-1f1e0d3c2b11"}


def test_eg_launchers_payload_decodes() -> None:
    """What EG's own launcher code sends (its ``_encrypt``, with egd's public key) decodes to the connection info."""
    key = _key()
    payload = _eg_launcher()._encrypt(json.dumps(CONNECTION).encode(), key.public_text)
    assert decode_payload(payload, key) == CONNECTION


def _seal(info: Any, key_text: str, version: int = 1) -> bytes:
    """A payload built as EG's launcher builds it (here with ``cryptography``)."""
    public = serialization.load_der_public_key(base64.b64decode(key_text))
    aes = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(aes), modes.ECB()).encryptor()
    sealed = encryptor.update(padder.update(json.dumps(info).encode()) + padder.finalize()) + encryptor.finalize()
    wrapped = public.encrypt(aes, PKCS1v15())  # type: ignore[union-attr, call-arg]
    outer = {"version": version, "key": base64.b64encode(wrapped).decode(),
             "conn_info": base64.b64encode(sealed).decode()}
    return base64.b64encode(json.dumps(outer).encode())


@pytest.mark.parametrize("why, payload", [
    ("not base64", lambda k: b"{not base64}"),
    ("legacy version 0", lambda k: _seal(CONNECTION, k.public_text, version=0)),
    ("another gateway's key", lambda k: _seal(CONNECTION, _key().public_text)),
    ("missing comm_port", lambda k: _seal({n: v for n, v in CONNECTION.items() if n != "comm_port"}, k.public_text)),
    ("port out of range", lambda k: _seal(dict(CONNECTION, hb_port=70000), k.public_text)),
    ("not an object", lambda k: _seal([1, 2], k.public_text)),
    ("too large", lambda k: b"A" * 20000),
])
def test_bad_payloads_are_refused(why: str, payload: Any) -> None:
    """Each malformed or foreign payload is refused with a reason, never an exception of another kind."""
    key = _key()
    with pytest.raises(PayloadRefused):
        decode_payload(payload(key), key)


# -- python_distributed on the ssh hosts ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eg_specs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EG's kernelspecs as EG's Makefile assembles them."""
    return egdist.assemble(tmp_path_factory.mktemp("eg") / "kernels")


def _ssh_gateway(lab: SshLab, specs: Path, tmp: Path, **kernels: Any) -> GatewayProcess:
    settings = {"hosts": [h.name for h in lab.hosts], "ssh_config": str(lab.ssh_config_path),
                "callback_host": lab.gateway_ip, "log_dir": str(tmp / "hostlogs"), "connect_timeout": 3}
    return GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(KERNELSPECS), str(specs)],
                    "allowed_kernelspecs": ["python3", "python_distributed"], **kernels},
        "drivers": {"local": {}, "ssh": settings},
    })


@pytest.fixture(scope="module")
def eg_gw(ssh_lab: SshLab, eg_specs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the ssh driver and EG's kernelspecs."""
    gw = _ssh_gateway(ssh_lab, eg_specs, tmp_path_factory.mktemp("eggw"))
    try:
        yield gw
    finally:
        gw.stop()
    for host in ssh_lab.hosts:
        assert not host.processes_matching("launch_ipykernel"), "EG launchers left on a host"


def _where(sock: Any) -> tuple[str, int]:
    host, pid = sock.execute(WHERE).stdout.split()
    return host, int(pid)


def test_python_distributed_runs_unchanged(eg_gw: GatewayProcess, ssh_hosts: list[SshHost]) -> None:
    """EG's python_distributed spec, with EG's launch_ipykernel.py: the kernel runs on an ssh host; execute,
    interrupt (through EG's comm port), restart (state lost, same id), delete; nothing left on the hosts."""
    client: GatewayClient = eg_gw.client
    wait_until(lambda: re.search(r"Enterprise Gateway's launcher protocol.*python_distributed", eg_gw.log()), 10,
               what="the start's line naming the specs that use EG's protocol")
    kernel_id = client.start_kernel("python_distributed")
    sock = client.connect(kernel_id)
    try:
        host, pid = _where(sock)
        assert host in {h.name for h in ssh_hosts}
        assert pid in {h.name: h for h in ssh_hosts}[host].pids()
        sock.execute("kept = 41")
        assert sock.execute("kept + 1").result == "42"
        interrupt_sleep(client, kernel_id)
        resp = client.request("POST", f"/api/kernels/{kernel_id}/restart", {})
        assert resp.status == 200 and resp.json["id"] == kernel_id
        assert sock.execute("kept").reply["content"]["ename"] == "NameError"
        assert _where(sock)[1] != pid
    finally:
        sock.close()
        client.delete_kernel(kernel_id)
    try:
        wait_until(lambda: not any(h.processes_matching(kernel_id) for h in ssh_hosts), 15,
                   what="no process of the kernel on any host")
    except AssertionError:
        raise AssertionError([h.processes_matching(kernel_id) for h in ssh_hosts]) from None
    # EG's launcher leaves its connection file (the kernel's key) when its kernel is killed: egd removes it
    assert not list(Path(tempfile.gettempdir()).glob(f"kernel-{kernel_id}_*.json"))


def test_kernel_killed_on_its_host_is_noticed(eg_gw: GatewayProcess, ssh_hosts: list[SshHost]) -> None:
    """An EG kernel killed on its host (the comm port closes with it) is seen within seconds and restarted."""
    client: GatewayClient = eg_gw.client
    kernel_id = client.start_kernel("python_distributed")
    sock = client.connect(kernel_id)
    try:
        _, pid = _where(sock)
        os.killpg(os.getpgid(pid), 9)  # the hosts share this machine's pid space
        states: list[str] = []
        while "restarting" not in states:
            message = sock.recv(30)
            if message["msg_type"] == "status":
                states.append(message["content"]["execution_state"])
        wait_until(lambda: client.kernel(kernel_id).json["execution_state"] == "idle", 60, what="the restart")
        assert _where(sock)[1] != pid
    finally:
        sock.close()
        client.delete_kernel(kernel_id)


def _argv_of(host: SshHost, kernel_id: str, timeout: float = 30) -> list[str]:
    """The command line of the EG launcher of ``kernel_id`` on ``host``, once it runs there."""
    def found() -> list[str] | None:
        for pid, _ in host.processes_matching(kernel_id):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"launch_ipykernel" in a for a in argv):
                return [a.decode() for a in argv if a]
        return None

    return list(wait_until(found, timeout, what="the EG launcher on the host"))


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(f"--RemoteProcessProxy.{name}") + 1]


def test_forged_payload_from_another_address_is_refused(ssh_lab: SshLab, tmp_path: Path) -> None:
    """EG's payload is not authenticated: anyone can encrypt with the public key, which is on the launcher's
    command line. egd takes it only from the host it launched on. Here the launcher never reports (a spec
    whose kernel is ``sleep``), a payload sent from the gateway's own address with the right kernel id and key
    is refused, one from the kernel's host is taken, and the kernel is then "ready" at that host's address."""
    specs = tmp_path / "specs"
    (specs / "eg_silent").mkdir(parents=True)
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "launch_ipykernel", "--RemoteProcessProxy.kernel-id",
            "{kernel_id}", "--RemoteProcessProxy.response-address", "{response_address}",
            "--RemoteProcessProxy.public-key", "{public_key}", "--RemoteProcessProxy.port-range", "{port_range}"]
    (specs / "eg_silent" / "kernel.json").write_text(json.dumps({
        "argv": argv, "display_name": "EG silent", "language": "python",
        "metadata": {"process_proxy": {"class_name": "enterprise_gateway.services.processproxies.distributed."
                                                     "DistributedProcessProxy", "config": {"remote_hosts": "egdh1"}}}}))
    gw = _ssh_gateway(ssh_lab, specs, tmp_path, allowed_kernelspecs=["python3", "eg_silent"])
    host = ssh_lab.host("egdh1")
    try:
        kernel_id = "3f6f3c1e-9d0b-4f57-8a0e-6c5d4b3a2f10"
        start = BackgroundStart(gw.client, {"name": "eg_silent", "env": {"KERNEL_ID": kernel_id,
                                                                          "KERNEL_LAUNCH_TIMEOUT": "25"}})
        launcher_argv = _argv_of(host, kernel_id)
        address = _option(launcher_argv, "response-address")
        public = _option(launcher_argv, "public-key")
        response_ip, _, response_port = address.rpartition(":")
        forged = _seal(dict(CONNECTION, kernel_id=kernel_id), public)
        with socket.create_connection((response_ip, int(response_port)), timeout=5) as conn:
            conn.sendall(forged)
        wait_until(lambda: "not from the kernel's host" in gw.log(), 10, what="the forged payload to be refused")
        # the launch timed out: the forgery was not taken
        assert start.response(40).status in (500, 503, 504)
        assert not host.processes_matching(kernel_id)
    finally:
        gw.stop()


# -- EG classes without an egd driver ---------------------------------------------------------------------------

def test_eg_class_without_driver_is_a_clear_error(eg_specs: Path, tmp_path: Path) -> None:
    """EG's conductor and Spark operator specs name process proxies egd has no driver for: check-config names
    each with the class, ``egd kernelspecs`` marks them, and a start answers 503 naming the class. EG's
    kubernetes and docker specs need egd's ``kubernetes`` and ``docker`` drivers (named when not configured),
    and EG's Spark-on-Kubernetes specs (``run.sh``, not ``launch_kubernetes.py``) are named as not supported."""
    config = tmp_path / "egd.yaml"
    config.write_text(json.dumps({"kernels": {"kernelspec_dirs": [str(eg_specs)]}}))
    done = subprocess.run([sys.executable, "-m", "egd", "check-config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert re.search(r"spark_python_conductor_cluster.*ConductorClusterProcessProxy.*egd has no driver", done.stderr)
    assert re.search(r"spark_python_operator.*SparkOperatorProcessProxy.*egd has no driver", done.stderr)
    assert re.search(r"'python_kubernetes' needs the 'kubernetes' driver, which is not in drivers", done.stderr)
    assert re.search(r"'python_docker' needs the 'docker' driver, which is not in drivers", done.stderr)
    assert not re.search(r"(Kubernetes|Docker|DockerSwarm)ProcessProxy.*egd has no driver", done.stderr)
    assert re.search(r"'spark_python_kubernetes': .*runs run\.sh \(Spark on Kubernetes .*not supported\)",
                     done.stderr)
    assert "Traceback" not in done.stderr
    listed = subprocess.run([sys.executable, "-m", "egd", "kernelspecs", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    lines = {li.split()[0]: li for li in listed.stdout.splitlines() if li.strip()}
    assert lines["python_docker"].split()[1] == "docker"  # EG's DockerSwarmProcessProxy: egd's docker driver
    assert "needs the 'docker' driver" in lines["python_docker"]
    assert lines["python_kubernetes"].split()[1] == "kubernetes"
    assert "ConductorClusterProcessProxy" in lines["spark_python_conductor_cluster"]
    assert "egd has no driver" in lines["spark_python_conductor_cluster"]
    gw = GatewayProcess({"kernels": {"kernelspec_dirs": [str(eg_specs)]}})
    try:
        resp = gw.client.request("POST", "/api/kernels", {"name": "spark_python_conductor_cluster"})
        assert resp.status == 503
        assert "ConductorClusterProcessProxy" in resp.json["message"]
        resp = gw.client.request("POST", "/api/kernels", {"name": "python_kubernetes"})
        assert resp.status == 503
        assert "'kubernetes' driver" in resp.json["message"]
        assert not gw.client.request("GET", "/api/kernels").json
    finally:
        gw.stop()



def test_process_proxy_config_egd_cannot_honour_is_named(eg_specs: Path, tmp_path: Path) -> None:
    """EG's per-spec ``process_proxy.config``: a ``yarn_endpoint`` that is not one of the yarn driver's
    ResourceManagers (EG's ``/ws/v1/cluster`` suffix is understood), Kerberos, a malformed ``port_range`` and an
    unknown key are each named by ``egd check-config`` and refuse the start with a 503 naming them; nothing is
    submitted (no ``run.sh`` runs)."""
    specs = tmp_path / "specs"
    spec = egdist.spec_json(eg_specs, "spark_python_yarn_cluster")
    good = dict(spec, metadata={"process_proxy": dict(spec["metadata"]["process_proxy"],  # type: ignore[index]
                                                      config={"yarn_endpoint": "http://127.0.0.1:9/ws/v1/cluster"})})
    bad = dict(spec, metadata={"process_proxy": dict(spec["metadata"]["process_proxy"],  # type: ignore[index]
                                                     config={"yarn_endpoint": "http://rm.example:8088/ws/v1/cluster",
                                                             "yarn_endpoint_security_enabled": True,
                                                             "port_range": "40000-41000", "image_name": "x"})})
    for name, body in (("eg_good", good), ("eg_bad", bad)):
        (specs / name).mkdir(parents=True)
        (specs / name / "kernel.json").write_text(json.dumps(body))
    config = {"kernels": {"kernelspec_dirs": [str(specs)], "default_kernel_name": "eg_good"},
              "drivers": {"yarn": {"resource_managers": ["http://127.0.0.1:9"], "request_timeout": 1}}}
    path = tmp_path / "egd.yaml"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "egd", "check-config", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "eg_good" not in done.stderr
    for text in ("yarn_endpoint: http://rm.example:8088/ws/v1/cluster is not one of drivers.yarn.resource_managers",
                 "yarn_endpoint_security_enabled: Kerberos", "port_range: '40000-41000' is not lo..hi",
                 "image_name: not a setting egd reads"):
        assert text in done.stderr
    listed = subprocess.run([sys.executable, "-m", "egd", "kernelspecs", "--config", str(path)], capture_output=True,
                            text=True, timeout=60)
    line = next(li for li in listed.stdout.splitlines() if li.startswith("eg_bad "))
    assert "cannot start" in line and "Kerberos" in line
    assert "cannot start" not in next(li for li in listed.stdout.splitlines() if li.startswith("eg_good "))
    gw = GatewayProcess(config)
    try:
        resp = gw.client.request("POST", "/api/kernels", {"name": "eg_bad"})
        assert resp.status == 503 and "Kerberos" in resp.json["message"]
        assert "rm.example" in resp.json["message"]
        assert not gw.kernel_processes()
    finally:
        gw.stop()


def test_process_proxy_remote_hosts_and_port_range(ssh_lab: SshLab, eg_specs: Path, tmp_path: Path) -> None:
    """EG's per-spec ``remote_hosts`` (a comma-separated string) and ``port_range`` are honoured: the kernel runs on
    the named host, and EG's launcher binds its ports (and its comm port) inside the range."""
    specs = tmp_path / "specs"
    spec = egdist.spec_json(eg_specs, "python_distributed")
    proxy = dict(spec["metadata"]["process_proxy"], config={"remote_hosts": "egdh2", "port_range": "41000..42000"})  # type: ignore[index]
    (specs / "eg_ranged").mkdir(parents=True)
    (specs / "eg_ranged" / "kernel.json").write_text(json.dumps(dict(spec, metadata={"process_proxy": proxy})))
    gw = _ssh_gateway(ssh_lab, specs, tmp_path, allowed_kernelspecs=["python3", "eg_ranged"])
    try:
        kernel_id = gw.client.start_kernel("eg_ranged")
        sock = gw.client.connect(kernel_id)
        assert _where(sock)[0] == "egdh2"
        ports = json.loads(sock.execute("import json; from ipykernel.connect import get_connection_info\n"
                                        "print(get_connection_info())").stdout)
        bound = [ports[f"{name}_port"] for name in ("shell", "iopub", "stdin", "control", "hb")]
        assert all(41000 <= port <= 42000 for port in bound), bound
        argv = _argv_of(ssh_lab.host("egdh2"), kernel_id)
        assert _option(argv, "port-range") == "41000..42000"
        sock.close()
        gw.client.delete_kernel(kernel_id)
    finally:
        gw.stop()


def test_eg_launcher_that_fails_fails_the_start_at_once(ssh_lab: SshLab, eg_specs: Path, tmp_path: Path) -> None:
    """EG's launcher reports nothing when it fails (here: a port range EG's launcher itself refuses as too
    small); egd sees its process gone on the host and fails the start at once, with the tail of its log, instead
    of at the launch timeout."""
    specs = tmp_path / "specs"
    spec = egdist.spec_json(eg_specs, "python_distributed")
    proxy = dict(spec["metadata"]["process_proxy"], config={"port_range": "41000..41010"})  # type: ignore[index]
    (specs / "eg_failing").mkdir(parents=True)
    (specs / "eg_failing" / "kernel.json").write_text(json.dumps(dict(spec, metadata={"process_proxy": proxy})))
    gw = _ssh_gateway(ssh_lab, specs, tmp_path, allowed_kernelspecs=["python3", "eg_failing"])
    try:
        began = time.monotonic()
        resp = gw.client.request("POST", "/api/kernels", {"name": "eg_failing",
                                                          "env": {"KERNEL_LAUNCH_TIMEOUT": "60"}})
        assert resp.status == 500, resp.json
        assert time.monotonic() - began < 20
        assert "exited before it reported" in resp.json["message"]
        assert "Range size must be at least 1000" in resp.json["message"]
        assert not any(h.processes_matching("launch_ipykernel") for h in ssh_lab.hosts)
    finally:
        gw.stop()


def test_listener_takes_one_payload_per_launch_from_its_host() -> None:
    """docs/security.rst: an EG payload is taken only for a kernel being launched, once, from its host; one that
    came before the host was known is judged when it is; a late one (the launch is over) is refused."""
    from typing import cast

    from egd.remote import LaunchListener

    listener = LaunchListener(cast(Any, None), "127.0.0.1")  # receive_eg needs no reactor
    key = _key()
    listener._eg_key = key  # as eg_key() leaves it (it makes the key in the reactor's thread pool)
    kernel_id, other_id = CONNECTION["kernel_id"], "1d1c2b3a-4f5e-4a6b-8c7d-9e0f1a2b3c4d"
    taken: list[dict[str, Any]] = []
    registration = listener.register(str(kernel_id), eg=True)
    registration.ready.addCallback(taken.append)
    listener.receive_eg(_seal(dict(CONNECTION, kernel_id=other_id), key.public_text), "10.0.0.5")
    listener.receive_eg(_seal(CONNECTION, key.public_text), "10.0.0.6")  # held: the host is not known yet
    listener.receive_eg(_seal(dict(CONNECTION, hb_port=50099), key.public_text), "10.0.0.5")
    assert taken == []
    registration.expect_peers(frozenset({"10.0.0.5"}))
    assert [t["hb_port"] for t in taken] == [50099] and taken[0]["ip"] == "10.0.0.5"
    listener.receive_eg(_seal(dict(CONNECTION, hb_port=50098), key.public_text), "10.0.0.5")  # a second one
    assert len(taken) == 1 and taken[0]["hb_port"] == 50099
    listener.unregister(registration)
    late = listener.register(str(kernel_id), eg=True)
    late.expect_peers(frozenset({"10.0.0.5"}))
    listener.unregister(late)
    listener.receive_eg(_seal(CONNECTION, key.public_text), "10.0.0.5")  # no launch is expected any more
    assert not late.ready.called
