"""Fixtures: real egd processes (as users run them), real ipykernel kernels, and a leak check.

Every gateway a test starts gets its own runtime directory under the session's temporary root; each kernel's
command line names its connection file there. At the end of the session no process may mention that root:
a kernel or launcher left behind fails the run.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import containerhosts, kubecluster, pgserver, slurmcluster, sshhosts, yarncluster
from tests.client import GatewayClient

# Remote hosts for the ssh tests (network namespaces with their own sshd), built once per session when asked.
ssh_lab = sshhosts.ssh_lab
#: A PostgreSQL server for the tests of several gateways sharing a state store.
postgres = pgserver.postgres
ssh_hosts = sshhosts.ssh_hosts
yarn_cluster = yarncluster.yarn_cluster
#: A real Kubernetes cluster (control plane, a kubelet with containerd, kwok) for the kubernetes tests.
kube_cluster = kubecluster.kube_cluster
#: Container engines for the docker tests: Debian's dockerd, podman's Docker-compatible service, and both.
dockerd = containerhosts.dockerd
podman_api = containerhosts.podman_api
#: A real Slurm cluster (slurmctld, three slurmd nodes in network namespaces, slurmrestd, munge) for the slurm tests.
slurm_cluster = slurmcluster.slurm_cluster
engine = containerhosts.engine

#: Areas whose session fixtures start a Slurm cluster, container engines or a Kubernetes node (daemons that keep
#: running and change host networking until the session ends): their tests run last, in this order.
_LAST_AREAS = ("slurm", "docker", "kubernetes")
_FIRST_IN_GROUP = ("tests/test_slurmcluster.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the Slurm, container and Kubernetes tests after all others (stable order within each group)."""
    def group(item: pytest.Item) -> tuple[int, int]:
        # Within its group, the Slurm fixture's own tests come first: one of them needs the cluster's lock,
        # which the session's cluster holds once a driver test has started it.
        first = 0 if item.nodeid.startswith(_FIRST_IN_GROUP) else 1
        for index, marker in enumerate(_LAST_AREAS, start=1):
            if item.get_closest_marker(marker) is not None:
                return index, first
        return 0, first

    items.sort(key=group)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Install the Kubernetes cluster's tools before the first test when a selected test needs the cluster: a
    first build takes longer than one test's timeout."""
    if session.config.option.collectonly:
        return
    if any("kube_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        kubecluster.install_before_tests(
            lambda line: reporter.write_line(f"egd tests: {line}") if reporter is not None else None)


HERE = Path(__file__).resolve().parent
KERNELSPECS = HERE / "kernelspecs"
#: A secret in the gateway's environment that must never reach a kernel.
GATEWAY_SECRET = ("EGD_TEST_GATEWAY_SECRET", "s3cr3t-of-the-gateway")

_ROOT = Path(tempfile.mkdtemp(prefix="egd-tests-"))


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """``(pid, cmdline)`` of every process whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline and int(entry) != os.getpid():
            found.append((int(entry), cmdline.strip()))
    return found


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class GatewayProcess:
    """An ``egd run`` subprocess with its config, log file and client."""

    _count = 0

    def __init__(self, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 args: list[str] | None = None, https: bool = False, cafile: str | None = None,
                 client_cert: tuple[str, str] | None = None, prefix: list[str] | None = None) -> None:
        GatewayProcess._count += 1
        self.dir = _ROOT / f"gateway-{GatewayProcess._count}"
        self.dir.mkdir()
        self.port = free_port()
        config: dict[str, Any] = {
            "server": {"ip": "127.0.0.1", "port": self.port},
            "logging": {"level": "debug"},
            "kernels": {"kernelspec_dirs": [str(KERNELSPECS)], "runtime_dir": str(self.dir / "runtime"),
                        "launch_timeout": 60},
            # Test gateways stop their kernels when they stop (the persistence tests ask for "keep").
            "state": {"on_stop": "shutdown"},
        }
        for section, values in (overrides or {}).items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        self.base_url = config["server"].get("base_url", "/").rstrip("/")
        self.config_path = self.dir / "egd.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "egd.log"
        full_env = {**os.environ, GATEWAY_SECRET[0]: GATEWAY_SECRET[1], **(env or {})}
        full_env.pop("EGD_PORT", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            # ``prefix``: a command egd runs under (prlimit, for one)
            [*(prefix or []), sys.executable, "-m", "egd", "run", "--config", str(self.config_path), *(args or [])],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        self.url = f"{'https' if https else 'http'}://127.0.0.1:{self.port}{self.base_url}"
        context = None
        if https:
            context = ssl.create_default_context(cafile=cafile)
            if client_cert:
                context.load_cert_chain(*client_cert)
        self.client = GatewayClient(self.url, full_env.get("EGD_AUTH_TOKEN") or config.get("auth", {}).get("token"),
                                    context)
        try:
            wait_until(self._answers, 30, 0.05, f"egd on port {self.port} to answer (log: {self.log_path})")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"egd exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.client.request("GET", "/api", timeout=2).status in (200, 401)
        except OSError:
            return False

    @property
    def runtime_dir(self) -> str:
        """Where this gateway's kernels' connection files live (their command lines name it)."""
        return str(self.dir / "runtime")

    def kernel_processes(self) -> list[tuple[int, str]]:
        """Processes started for this gateway's kernels."""
        return processes_mentioning(self.runtime_dir)

    def log(self) -> str:
        """Everything the gateway logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the gateway and wait for it; kill it if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"egd did not stop within {timeout}s after signal {sig}; its log ends:\n"
                                     f"{self.log()[-4000:]}") from None
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail the run if any kernel process of any test gateway outlives the session."""
    yield
    leftovers = wait_until_gone(str(_ROOT), 10)
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftovers, f"processes left behind: {leftovers}"


def wait_until_gone(text: str, timeout: float) -> list[tuple[int, str]]:
    """Wait for processes mentioning ``text`` to end; those still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_mentioning(text)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="session")
def gateway() -> Iterator[GatewayProcess]:
    """One egd shared by the tests that do not change its configuration."""
    process = GatewayProcess()
    yield process
    left = process.client.request("GET", "/api/kernels").json
    assert left == [], f"tests left kernels on the shared gateway: {left}"
    code = process.stop()
    assert code == 0, process.log()
    assert not wait_until_gone(process.runtime_dir, 10), "kernels left after egd stopped"


@pytest.fixture
def make_gateway() -> Iterator[Callable[..., GatewayProcess]]:
    """A factory for gateways with their own configuration; each is stopped after the test."""
    started: list[GatewayProcess] = []

    def make(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None,
             args: list[str] | None = None, **tls: Any) -> GatewayProcess:
        process = GatewayProcess(overrides, env, args, **tls)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()
        assert not wait_until_gone(process.runtime_dir, 10), "kernels left after egd stopped"


@pytest.fixture
def client(gateway: GatewayProcess) -> GatewayClient:
    """A REST client of the shared gateway."""
    return gateway.client


@pytest.fixture
def kernel(client: GatewayClient) -> Iterator[str]:
    """A fresh python3 kernel on the shared gateway, deleted after the test."""
    kernel_id = client.start_kernel("python3")
    yield kernel_id
    client.delete_kernel(kernel_id)
