"""Kernels as batch jobs on a real Slurm cluster (tests/slurmcluster.py: slurmctld, three slurmd nodes in network
namespaces, slurmrestd with JWT, munge), driven through egd's HTTP and WebSocket API and an unchanged Jupyter
Server. Job states are read back from Slurm itself (squeue).

The gateway's callback listener binds the cluster bridge's address, the only one the nodes reach. Kernels run
Debian's /usr/bin/python3 with ipykernel, as the test users (never root), from a copy of the launcher in a
directory every user can read.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import test_any_kernel as any_kernel
from tests.client import BackgroundStart, GatewayClient
from tests.conftest import GatewayProcess, free_port, wait_until
from tests.slurmcluster import SlurmCluster
from tests.test_lifecycle import interrupt_sleep, statuses_until

pytestmark = pytest.mark.slurm
#: The registered kernelspecs of kernels that are not ipykernel (IRkernel), installed when missing.
kernelspecs = any_kernel.kernelspecs

ALICE, BOB = "egdslurm1", "egdslurm2"
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"}
JOB = re.compile(r"Slurm job (\d+)")
LAUNCHER_FILES = ("kernel_launcher.py", "launcher_protocol.py")


def write_spec(root: Path, name: str, python: str, timeout: int, **config: Any) -> None:
    """A kernelspec for the slurm driver (``config``: its ``metadata.egd.config``)."""
    (root / name).mkdir(parents=True, exist_ok=True)
    spec = {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": name,
            "language": "python",
            "metadata": {"egd": {"driver": "slurm", "launch_timeout": timeout, "config": config}}}
    (root / name / "kernel.json").write_text(json.dumps(spec))


def launcher_copy(cluster: SlurmCluster) -> Path:
    """egd's launcher where every user of the cluster can read it (the repository may be under /root)."""
    source = Path(__file__).resolve().parent.parent / "launchers"
    target = cluster.shared_dir / "launcher"
    target.mkdir(exist_ok=True)
    target.chmod(0o755)
    for name in LAUNCHER_FILES:
        shutil.copy(source / name, target / name)
        (target / name).chmod(0o644)
    return target / "kernel_launcher.py"


def slurm_gateway(cluster: SlurmCluster, tmp: Path, mode: str = "rest", state: dict[str, Any] | None = None,
                  kernels: dict[str, Any] | None = None, specs_dirs: tuple[Path, ...] = (),
                  **extra: Any) -> GatewayProcess:
    """egd with the slurm driver in ``mode`` (rest: slurmrestd with the cluster's JWT key; cli: the commands),
    this module's kernelspecs and those in ``specs_dirs``."""
    specs = tmp / f"specs-{mode}"
    write_spec(specs, "slurm_python", cluster.python, 60, partitions=["debug", "short", "tiny"],
               time_limit="30", max_time_limit="1:00:00", memory="256m", max_cpus=2,
               prologue="export EGD_TEST_PROLOGUE=ran")
    write_spec(specs, "slurm_tiny", cluster.python, 60, partitions=["tiny"], time_limit="30", memory="256m")
    settings: dict[str, Any] = {
        "mode": mode, "user": ALICE, "impersonation": True, "prohibited_users": [BOB + "x"],
        "callback_host": cluster.gateway_ip, "python": cluster.python, "launcher_path": str(launcher_copy(cluster)),
        "poll_interval": 1.0, "fast_poll_interval": 0.25, "workdir": str(cluster.job_dir),
        "output": f"{cluster.job_dir}/egd-%j.out", **extra,
    }
    if mode == "rest":
        settings = {"rest_url": cluster.rest_url, "jwt_key_file": str(cluster.jwt_key_path), **settings}
    else:
        settings = {"slurm_conf": str(cluster.conf_path), **settings}
    return GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(specs), *map(str, specs_dirs)], "default_kernel_name": "slurm_python",
                    "launch_timeout": 60,
                    "heartbeat_interval": 1, **(kernels or {})},
        "drivers": {"slurm": settings},
        **({"state": state} if state else {}),
    })


@pytest.fixture(scope="module")
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster with this module's users; every job ended after the module."""
    for user in (ALICE, BOB):
        slurm_cluster.ensure_user(user)
    yield slurm_cluster
    slurm_cluster.cancel_all()


@pytest.fixture(scope="module")
def slurm_gw(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the slurm driver over REST, shared by this module; at the end no job of it may be left."""
    gw = slurm_gateway(cluster, tmp_path_factory.mktemp("slurmgw"))
    yield gw
    gw.stop()
    assert not egd_jobs(cluster, live=True), "jobs left in squeue"


@pytest.fixture
def client(slurm_gw: GatewayProcess) -> GatewayClient:
    """A client of the REST-mode gateway."""
    return slurm_gw.client


def egd_jobs(cluster: SlurmCluster, kernel_id: str = "", live: bool = False) -> list[dict[str, Any]]:
    """The jobs egd submitted (named ``egd-<kernel id>``), of one kernel or all; only live ones if asked."""
    return [j for j in cluster.squeue() if j["name"].startswith(f"egd-{kernel_id}")
            and (not live or j["state"] in LIVE)]


def job_of(client: GatewayClient, kernel_id: str) -> int:
    """The job egd reports for a kernel (its model's ``location``)."""
    model = client.kernel(kernel_id).json
    match = JOB.search(model.get("location", ""))
    assert match, model
    return int(match.group(1))


def run(client: GatewayClient, kernel_id: str, code: str) -> str:
    """Execute ``code`` in the kernel; its stdout."""
    sock = client.connect(kernel_id)
    try:
        return str(sock.execute(code).stdout)
    finally:
        sock.close()


WHO = "import getpass, os, socket; print(socket.gethostname(), getpass.getuser(), os.environ['SLURM_JOB_ID'], " \
      "os.environ.get('EGD_TEST_PROLOGUE'), os.environ.get('KERNEL_USERNAME'))"


@pytest.mark.parametrize("mode", ["rest", "cli"])
def test_kernel_is_a_job_of_its_user_on_a_node_and_delete_leaves_nothing(cluster: SlurmCluster, tmp_path: Path,
                                                                         mode: str) -> None:
    """Through slurmrestd and through sbatch alike: the kernel is a job named egd-<kernel id> that runs as the
    kernel's user on a compute node (after the kernelspec's prologue); it runs code; DELETE shuts it down
    through the launcher and cancels the job: nothing of it is left in squeue or on the node."""
    gw = slurm_gateway(cluster, tmp_path, mode)
    try:
        kernel_id = gw.client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE, "KERNEL_CPUS": "2"})
        job_id = job_of(gw.client, kernel_id)
        host, user, env_job, prologue, username = run(gw.client, kernel_id, WHO).split()
        assert (user, env_job, prologue, username) == (ALICE, str(job_id), "ran", ALICE)
        assert host in cluster.nodes
        job = cluster.job(job_id)
        assert job is not None and (job["name"], job["user"], job["state"], job["node"]) == \
            (f"egd-{kernel_id}", ALICE, "RUNNING", host)
        assert cluster.scontrol_job(job_id).get("NumCPUs") == "2"
        assert host in gw.client.kernel(kernel_id).json["location"]
        assert gw.client.delete_kernel(kernel_id) == 204
        assert cluster.job(job_id)["state"] not in LIVE  # type: ignore[index]
        wait_until(lambda: not [p for p in cluster.processes_on(host) if kernel_id in p[1]], 10,
                   what="the kernel's processes to end on the node")
        if mode == "cli":  # sbatch --uid needs the user on this host: an unknown one is refused, not submitted
            before = {j["id"] for j in cluster.squeue()}
            resp = gw.client.request("POST", "/api/kernels", {"name": "slurm_python",
                                                              "env": {"KERNEL_USERNAME": "nosuchuser42"}})
            assert resp.status == 403 and "no such user" in resp.json["message"], resp.json
            assert {j["id"] for j in cluster.squeue()} == before
    finally:
        gw.stop()
    assert not egd_jobs(cluster, live=True)


def test_interrupt_and_restart(client: GatewayClient, cluster: SlurmCluster) -> None:
    """Interrupt stops a long cell through the launcher; a restart keeps the kernel id and runs it in a new job
    (the old one ends: a restart does not keep the allocation)."""
    kernel_id = client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE})
    first = job_of(client, kernel_id)
    try:
        interrupt_sleep(client, kernel_id)
        assert client.request("POST", f"/api/kernels/{kernel_id}/restart", {}).status == 200
        second = job_of(client, kernel_id)
        assert second != first
        assert cluster.job(first)["state"] not in LIVE  # type: ignore[index]
        assert cluster.job(second)["state"] == "RUNNING"  # type: ignore[index]
        sock = client.connect(kernel_id)
        assert sock.execute("survivor").reply["content"]["ename"] == "NameError"
        sock.close()
    finally:
        client.delete_kernel(kernel_id)


def test_a_job_cancelled_from_outside_is_reported_dead(client: GatewayClient, cluster: SlurmCluster) -> None:
    """An operator's scancel: within the poll interval the clients hear "dead" and the kernel leaves the list
    (Slurm ended it: egd does not queue a new job behind the operator's back)."""
    kernel_id = client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE})
    job_id = job_of(client, kernel_id)
    sock = client.connect(kernel_id)
    try:
        sock.execute("1")
        cancelled = time.monotonic()
        assert cluster.run(["scancel", str(job_id)]).returncode == 0
        statuses_until(sock, "dead", 15)
        took = time.monotonic() - cancelled
    finally:
        sock.close()
    assert took < 5, f"noticed after {took:.1f}s"
    wait_until(lambda: client.kernel(kernel_id).status == 404, 10, what="the dead kernel to leave the list")
    assert not egd_jobs(cluster, kernel_id, live=True)


def test_pending_job_shows_slurms_reason_then_times_out_with_it(client: GatewayClient,
                                                                 cluster: SlurmCluster) -> None:
    """The one-CPU partition is full (another user's job): the kernel's model shows "PENDING (Resources)" while
    it waits; at the launch timeout the POST is a 503 with Slurm's reason, and the job is cancelled."""
    blocker = cluster.run(["sbatch", "--parsable", "--partition=tiny", f"--chdir={cluster.job_dir}",
                           "--output=/dev/null", "--wrap", "sleep 300"], user=BOB)
    assert blocker.returncode == 0, blocker.stderr
    blocker_id = int(blocker.stdout.strip().split(";")[0])
    try:
        cluster.wait_job_state(blocker_id, ["RUNNING"], 20)
        start = BackgroundStart(client, {"name": "slurm_tiny",
                                         "env": {"KERNEL_USERNAME": ALICE, "KERNEL_LAUNCH_TIMEOUT": "8"}})

        def waiting() -> dict[str, Any] | None:
            for model in client.request("GET", "/api/kernels").json:
                if model["name"] == "slurm_tiny" and "PENDING (Resources)" in model.get("reason", ""):
                    return dict(model)
            return None

        model = wait_until(waiting, 20, 0.25, what="the kernel model to show PENDING (Resources)")
        resp = start.response(30)
        assert resp.status == 503, resp.json
        assert re.search(r"Slurm job \d+ PENDING \(Resources\) in partition tiny", resp.json["message"])
        jobs = egd_jobs(cluster, model["id"])
        assert jobs and all(j["state"] == "CANCELLED" for j in jobs), jobs
        assert client.kernel(model["id"]).status == 404
    finally:
        cluster.run(["scancel", str(blocker_id)])


def test_requests_outside_the_kernelspec_are_refused_before_anything_is_submitted(
        client: GatewayClient, cluster: SlurmCluster) -> None:
    """KERNEL_* values the kernelspec does not allow, and refused users: 400 or 403 naming what is wrong, and no
    job reaches Slurm."""
    before = {j["id"] for j in cluster.squeue()}
    for env, status, words in [
        ({"KERNEL_PARTITION": "gpu"}, 400, "KERNEL_PARTITION"),
        ({"KERNEL_CPUS": "64"}, 400, "KERNEL_CPUS must be at most 2"),
        ({"KERNEL_TIME_LIMIT": "2:00:00"}, 400, "KERNEL_TIME_LIMIT must be at most 1:00:00"),
        ({"KERNEL_MEMORY": "1t"}, 400, "KERNEL_MEMORY"),
        ({"KERNEL_GPUS": "1"}, 400, "KERNEL_GPUS"),
        ({"KERNEL_USERNAME": "root"}, 403, "cannot run as user"),
        ({"KERNEL_USERNAME": BOB + "x"}, 403, "cannot run as user"),
        ({"KERNEL_USERNAME": "-uroot"}, 403, "cannot run as user"),
    ]:
        resp = client.request("POST", "/api/kernels", {"name": "slurm_python",
                                                       "env": {"KERNEL_USERNAME": ALICE, **env}})
        assert resp.status == status and words in resp.json["message"], (env, resp.status, resp.json)
    assert {j["id"] for j in cluster.squeue()} == before, "a refused request reached Slurm"


def test_each_user_gets_jobs_of_their_own(client: GatewayClient, cluster: SlurmCluster) -> None:
    """Two users' kernels: each job runs as its own user (squeue and the kernel agree)."""
    ids = {user: client.start_kernel("slurm_python", env={"KERNEL_USERNAME": user}) for user in (ALICE, BOB)}
    try:
        for user, kernel_id in ids.items():
            job = cluster.job(job_of(client, kernel_id))
            assert job is not None and job["user"] == user
            assert run(client, kernel_id, "import getpass; print(getpass.getuser())").strip() == user
    finally:
        for kernel_id in ids.values():
            client.delete_kernel(kernel_id)


def test_a_time_limit_ends_the_kernel_with_slurms_word(client: GatewayClient, cluster: SlurmCluster) -> None:
    """KERNEL_TIME_LIMIT=1 (a minute): when Slurm ends the job at its limit, the clients hear "dead" and the
    kernel's end names TIMEOUT. (Slurm checks limits every 30 s: this takes 60-100 s.)"""
    kernel_id = client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE, "KERNEL_TIME_LIMIT": "1"})
    job_id = job_of(client, kernel_id)
    sock = client.connect(kernel_id)
    try:
        sock.execute("1")
        statuses_until(sock, "dead", 150)
    finally:
        sock.close()
    assert cluster.job(job_id)["state"] == "TIMEOUT"  # type: ignore[index]
    wait_until(lambda: client.kernel(kernel_id).status == 404, 10, what="the dead kernel to leave the list")


def test_a_dead_node_ends_its_kernel(client: GatewayClient, cluster: SlurmCluster, slurm_gw: GatewayProcess) -> None:
    """Every process of the kernel's node is killed (slurmd, slurmstepd, the kernel): the kernel is reported dead,
    not restarted, whichever comes first: Slurm declaring the node down (NODE_FAIL), or egd giving up on the silent
    launcher and cancelling the job (its reason says so). The node then comes back."""
    kernel_id = client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE})
    job_id = job_of(client, kernel_id)
    host = run(client, kernel_id, "import socket; print(socket.gethostname())").strip()
    sock = client.connect(kernel_id)
    try:
        sock.execute("1")
        cluster.kill_node(host)
        statuses_until(sock, "dead", 90)
    finally:
        sock.close()
        cluster.start_node(host)
    state = cluster.job(job_id)["state"]  # type: ignore[index]
    assert state in ("NODE_FAIL", "CANCELLED"), state
    dead = [line for line in slurm_gw.log().splitlines() if kernel_id in line and "is dead" in line]
    assert dead and (f"Slurm job {job_id} NODE_FAIL" in dead[-1]
                     or "egd cancelled it: its launcher on " + host in dead[-1]), dead
    assert "automatic restart" not in "".join(line for line in slurm_gw.log().splitlines() if kernel_id in line)


def test_kill_9_of_egd_then_restart_reattaches_by_job_id(cluster: SlurmCluster, tmp_path: Path) -> None:
    """egd is SIGKILLed while a Slurm kernel runs; the next egd with the same state finds the same job running and
    its launcher answering, and serves the kernel with its variables; DELETE then leaves nothing in squeue."""
    state = {"path": str(tmp_path / "state.sqlite"), "on_stop": "keep"}
    first = slurm_gateway(cluster, tmp_path, state=state)
    kernel_id = first.client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE})
    job_id = job_of(first.client, kernel_id)
    sock = first.client.connect(kernel_id)
    sock.execute("w = 'kept in Slurm'")
    sock.close()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    first.stop()
    second = slurm_gateway(cluster, tmp_path, state={**state, "on_stop": "shutdown"})
    try:
        assert [k["id"] for k in second.client.request("GET", "/api/kernels").json] == [kernel_id]
        assert job_of(second.client, kernel_id) == job_id
        assert run(second.client, kernel_id, "print(w)").strip() == "kept in Slurm"
        assert second.client.delete_kernel(kernel_id) == 204
        assert not egd_jobs(cluster, kernel_id, live=True)
    finally:
        second.stop()


def test_one_listing_per_interval_serves_every_kernel(client: GatewayClient, slurm_gw: GatewayProcess) -> None:
    """Three idle kernels over a few poll intervals (1 s): about one Slurm request per interval, not three."""
    ids = [client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE}) for _ in range(3)]
    try:
        time.sleep(2)  # the launches' fast polling has settled
        before = api_requests(client)
        time.sleep(5)
        made = api_requests(client) - before
        assert 3 <= made <= 7, f"{made} Slurm requests in 5 s with 3 kernels"
    finally:
        for kernel_id in ids:
            client.delete_kernel(kernel_id)


def api_requests(client: GatewayClient) -> float:
    """``egd_driver_api_requests_total{driver="slurm"}`` from /metrics."""
    text = client.request("GET", "/metrics").body.decode()
    match = re.search(r'^egd_driver_api_requests_total\{driver="slurm"\} ([0-9.e+]+)$', text, re.M)
    assert match, text[-2000:]
    return float(match.group(1))


def test_jupyter_server_drives_a_slurm_kernel(slurm_gw: GatewayProcess, cluster: SlurmCluster,
                                              tmp_path: Path) -> None:
    """An unchanged Jupyter Server with --gateway-url runs a cell in a kernel that is a Slurm job (the user is the
    KERNEL_USERNAME Jupyter Server forwards from its environment)."""
    from tests.test_jupyter_server import JupyterServer

    server = JupyterServer(slurm_gw.url, tmp_path, env={"KERNEL_USERNAME": BOB})
    try:
        kernel_id = server.start_kernel("slurm_python")
        sock = server.connect(kernel_id)
        assert sock.execute("import os; print(os.environ['SLURM_JOB_ID'].isdigit())").stdout.strip() == "True"
        sock.close()
        job_id = job_of(slurm_gw.client, kernel_id)
        assert cluster.job(job_id)["user"] == BOB  # type: ignore[index]
        assert server.client.request("DELETE", f"/api/kernels/{kernel_id}").status == 204
        assert slurm_gw.client.kernel(kernel_id).status == 404
        assert cluster.job(job_id)["state"] not in LIVE  # type: ignore[index]
    finally:
        server.stop()


def test_an_r_kernel_runs_as_a_slurm_job(cluster: SlurmCluster, kernelspecs: dict[str, dict[str, Any]],
                                         tmp_path: Path) -> None:
    """IRkernel (not ipykernel) as a Slurm job of the driver's user: a cell, an interrupted long cell, a restart
    in a new job, and a delete that leaves nothing in squeue."""
    any_kernel.write_spec(tmp_path / "any", "slurm_ir", kernelspecs["ir"], "slurm", launch_timeout=60,
                          config={"memory": "256m"})
    gw = slurm_gateway(cluster, tmp_path, specs_dirs=(tmp_path / "any",), impersonation=False,
                       kernels=any_kernel.KERNEL_SETTINGS)
    try:
        kernel_id, host = any_kernel.exercise(gw.client, "slurm_ir", any_kernel.LANGUAGES["ir"])
        assert host in cluster.nodes
        job = cluster.job(job_of(gw.client, kernel_id))
        assert job is not None and job["user"] == ALICE and job["state"] == "RUNNING"
        assert gw.client.delete_kernel(kernel_id) == 204
        assert not egd_jobs(cluster, kernel_id, live=True)
    finally:
        gw.stop()


def test_stop_abandons_a_pending_launch(cluster: SlurmCluster, tmp_path: Path) -> None:
    """SIGTERM while a kernel's job waits PENDING: the client gets a 503 at once, egd exits without waiting for the
    launch timeout, and the job is cancelled, not left queued."""
    blocker = cluster.run(["sbatch", "--parsable", "--partition=tiny", f"--chdir={cluster.job_dir}",
                           "--output=/dev/null", "--wrap", "sleep 300"], user=BOB)
    assert blocker.returncode == 0, blocker.stderr
    blocker_id = int(blocker.stdout.strip().split(";")[0])
    gw = slurm_gateway(cluster, tmp_path)
    try:
        cluster.wait_job_state(blocker_id, ["RUNNING"], 20)
        start = BackgroundStart(gw.client, {"name": "slurm_tiny", "env": {"KERNEL_USERNAME": ALICE}})
        jobs = wait_until(lambda: [j for j in egd_jobs(cluster) if j["state"] == "PENDING"], 20, 0.2,
                          what="the kernel's job to wait in the queue")
        began = time.monotonic()
        assert gw.stop(timeout=30) == 0
        assert time.monotonic() - began < 15
        assert start.response(10).status == 503
        states = {j["id"]: j["state"] for j in cluster.squeue([j["id"] for j in jobs])}
        assert set(states.values()) == {"CANCELLED"}, states
    finally:
        gw.stop()
        cluster.run(["scancel", str(blocker_id)])


def test_slurm_that_does_not_answer_is_a_503(cluster: SlurmCluster, tmp_path: Path) -> None:
    """slurmrestd down (nothing listens at rest_url): a start is a 503 that says Slurm did not answer, quickly, and
    egd serves on."""
    gw = slurm_gateway(cluster, tmp_path, rest_url=f"http://127.0.0.1:{free_port()}", request_timeout=3)
    try:
        began = time.monotonic()
        resp = gw.client.request("POST", "/api/kernels", {"name": "slurm_python",
                                                          "env": {"KERNEL_USERNAME": ALICE}})
        assert resp.status == 503 and "Slurm did not take the kernel's job" in resp.json["message"], resp.json
        assert time.monotonic() - began < 10
        assert gw.client.request("GET", "/api/kernels").status == 200
    finally:
        gw.stop()
