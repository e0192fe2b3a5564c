"""The Slurm test cluster itself (tests/slurmcluster.py): layout, users, REST with per-user tokens, a full
partition, a dying node, time limits, teardown and the cleanup after a crashed run.

Timings are printed with a ``MEASURE`` prefix (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import slurmcluster
from tests.slurmcluster import API, SlurmCluster

# The fixture, usable here without a conftest. If a conftest registers it too, both share one cluster.
slurm_cluster = slurmcluster.slurm_cluster

pytestmark = pytest.mark.slurm

USER1 = "egdslurm1"
USER2 = "egdslurm2"


def measure(what: str, seconds: float) -> None:
    """Print a timing for the report (``-s``)."""
    print(f"MEASURE {what}: {seconds * 1000:.0f} ms")


def sbatch(cluster: SlurmCluster, *args: str, user: str | None = None) -> int:
    """``sbatch --parsable`` as root, for ``user`` when given (``--uid``/``--gid``); the job id."""
    argv = ["sbatch", "--parsable", "-o", f"{cluster.job_dir}/%j.out"]
    if user is not None:
        entry = cluster.ensure_user(user)
        argv += [f"--uid={entry.pw_uid}", f"--gid={entry.pw_gid}"]
    proc = cluster.run([*argv, *args])
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def output(cluster: SlurmCluster, job_id: int) -> str:
    """The job's output file (``sbatch()``'s ``-o``) so far, "" before it exists."""
    path = cluster.job_dir / f"{job_id}.out"
    return path.read_text() if path.exists() else ""


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session cluster, with no job left active after the test."""
    yield slurm_cluster
    slurm_cluster.heal()  # first: a job on a killed node completes at once when its slurmd is back
    slurm_cluster.cancel_all()


# This test builds its own clusters, so it must run before the session cluster exists (it is first in the file).
def test_crashed_run_is_cleaned_up_and_teardown_leaves_nothing(tmp_path: Path) -> None:
    """A cluster whose test process was SIGKILLed (daemons, a running job, a test user left) is removed by the next
    start; the next close() leaves no namespace, link, /etc/netns entry, daemon, user or directory."""
    if slurmcluster._shared is not None:
        pytest.skip("the session's Slurm cluster is running (this test needs the lock)")
    reason = slurmcluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    if slurmcluster.lock_busy():
        pytest.skip("another test session's Slurm cluster is running (this test needs the lock)")
    if not slurmcluster.installed():
        slurmcluster.install()
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from tests.slurmcluster import SlurmCluster
        c = SlurmCluster().start()
        u = c.ensure_user({USER1!r})
        job = c.run(["sbatch", "--parsable", f"--uid={{u.pw_uid}}", f"--gid={{u.pw_gid}}", "-o", "/dev/null",
                     "--wrap", "exec sleep 300"]).stdout.strip()
        c.wait_job_state(int(job), {{"RUNNING"}}, 30)
        print("READY", flush=True)
        time.sleep(300)
    """))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "READY", child.stderr.read() if child.stderr else ""
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    left = SlurmCluster().leftovers()
    assert any(item.startswith("netns egd-sn") for item in left), left
    assert f"user {USER1}" in left
    assert any("munged" in item for item in left) and any("slurmrestd" in item for item in left), left

    t0 = time.monotonic()
    cluster = SlurmCluster()
    try:
        cluster.start()
        measure("bring-up after a crashed run (cleanup included)", time.monotonic() - t0)
        measure("  of which cleanup", cluster.timings["cleanup"])
        assert cluster.squeue() == []  # a new controller state: the crashed run's job is gone
        cluster.ensure_user(USER2)
    finally:
        cluster.close()
    assert cluster.leftovers() == []
    assert not Path("/etc/netns/egd-sctl").exists()


def test_layout(cluster: SlurmCluster) -> None:
    """Three idle nodes in their own namespaces with their own names and addresses; no way off the bridge."""
    measure("bring-up (session cluster)", cluster.timings["start"])
    assert cluster.nodes == ["egd-sn1", "egd-sn2", "egd-sn3"]
    for node in cluster.nodes:
        assert cluster.node_state(node) == "IDLE"
        info = cluster.node_info(node)
        assert info["NodeAddr"] == cluster.node_ips[node]
        assert cluster.run_on(node, ["hostname"]).stdout.strip() == node
        assert cluster.run_on(node, ["ip", "route", "show", "default"]).stdout.strip() == ""
        hosts = cluster.run_on(node, ["getent", "hosts", "gateway", "egd-sctl"]).stdout.split()
        assert hosts == [cluster.gateway_ip, "gateway", cluster.ctl_ip, "egd-sctl"]
    listen = [line.split()[3] for line in cluster.run_on("egd-sctl", ["ss", "-Hltn"]).stdout.splitlines()]
    assert listen == [f"{cluster.ctl_ip}:6817"]  # NoCtldInAddrAny: no 0.0.0.0 listener
    for node in cluster.nodes:
        listen = [line.split()[3] for line in cluster.run_on(node, ["ss", "-Hltn"]).stdout.splitlines()]
        assert listen == [f"{cluster.node_ips[node]}:6818"]
    parts = cluster.run(["scontrol", "show", "partition", "-o"]).stdout
    assert "PartitionName=debug " in parts and "PartitionName=tiny " in parts and "PartitionName=short " in parts
    assert Path(cluster.env["SLURM_CONF"]) == cluster.conf_path
    assert oct(cluster.job_dir.stat().st_mode & 0o7777) == "0o1777"
    assert oct(cluster.shared_dir.stat().st_mode & 0o777) == "0o755"
    assert cluster.rest_url.startswith("http://127.0.0.1:")


def test_sbatch_as_test_user(cluster: SlurmCluster) -> None:
    """``sbatch --uid --gid`` as root runs the job as the test user, on a node, with Debian's ipykernel."""
    launcher = cluster.shared_dir / "probe.py"
    launcher.write_text("import ipykernel, os, socket; print('ok', socket.gethostname(), os.getcwd())\n")
    launcher.chmod(0o644)
    user = cluster.ensure_user(USER1)
    job = sbatch(cluster, "--wrap", f"id -un; id -u; {cluster.python} {launcher}", user=USER1)
    done = cluster.wait_job_state(job, {"COMPLETED"}, 30)
    assert done["user"] == USER1
    lines = output(cluster, job).split()
    assert lines[:2] == [USER1, str(user.pw_uid)]
    assert lines[2:4] == ["ok", done["node"]] and lines[4] == str(cluster.job_dir)
    assert done["node"] in ("egd-sn1", "egd-sn2")
    # the user's own sbatch (no --uid), as on a login node
    proc = cluster.run(["sbatch", "--parsable", "-o", f"{cluster.job_dir}/%j.out", "--wrap", "id -un"], user=USER1)
    assert proc.returncode == 0, proc.stderr
    own = int(proc.stdout.strip())
    assert cluster.wait_job_state(own, {"COMPLETED"}, 30)["user"] == USER1
    assert output(cluster, own).strip() == USER1

    latencies = []
    for _ in range(3):
        t0 = time.monotonic()
        job = sbatch(cluster, "-p", "debug", "--wrap", "exec sleep 60", user=USER1)
        cluster.wait_job_state(job, {"RUNNING"}, 20, interval=0.02)
        latencies.append(time.monotonic() - t0)
        cluster.run(["scancel", str(job)])
    measure("sbatch -> RUNNING (3 samples, max)", max(latencies))
    print("MEASURE   samples ms:", [round(x * 1000) for x in latencies])


def test_ipykernel_as_test_user(cluster: SlurmCluster) -> None:
    """Debian's ipykernel runs as a test user in a job; a client here reaches it at the node's address."""
    from jupyter_client import BlockingKernelClient

    user = cluster.ensure_user(USER2)
    t0 = time.monotonic()
    job = sbatch(cluster, "--wrap", f"exec {cluster.python} -m ipykernel_launcher --ip=0.0.0.0 "
                 f"-f {cluster.job_dir}/kernel-$SLURM_JOB_ID.json", user=USER2)
    running = cluster.wait_job_state(job, {"RUNNING"}, 20, interval=0.02)
    measure("ipykernel job: submit -> RUNNING", time.monotonic() - t0)
    connection = cluster.job_dir / f"kernel-{job}.json"
    deadline = time.monotonic() + 30
    while not connection.exists() or not connection.read_text().strip().endswith("}"):
        assert time.monotonic() < deadline, output(cluster, job)
        time.sleep(0.02)
    client = BlockingKernelClient()
    client.load_connection_file(str(connection))
    client.ip = cluster.node_ips[running["node"]]
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        measure("ipykernel job: submit -> kernel_info", time.monotonic() - t0)
        printed: list[str] = []

        def on_output(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])

        reply = client.execute_interactive("import os, socket; print(socket.gethostname(), os.getuid())",
                                           timeout=20, output_hook=on_output)
        assert reply["content"]["status"] == "ok"
        assert "".join(printed).split() == [running["node"], str(user.pw_uid)]
    finally:
        client.stop_channels()
    cluster.run(["scancel", str(job)])


def test_rest_submit_with_user_token(cluster: SlurmCluster) -> None:
    """A REST submission with a user's own token runs as that user; the job's JSON carries name and comment."""
    cluster.ensure_user(USER2)
    body = {
        "script": "#!/bin/sh\nid -un\nhostname\nexec sleep 60\n",
        "job": {"name": "egd-rest-probe", "partition": "debug", "comment": "kernel-1234",
                "current_working_directory": str(cluster.job_dir),
                "standard_output": f"{cluster.job_dir}/%j.out",
                "environment": {"PATH": "/usr/bin:/bin"}},
    }
    t0 = time.monotonic()
    status, answer = cluster.rest("POST", f"{API}/job/submit", user=USER2, body=body)
    assert status == 200, answer
    print("SAMPLE submit response:", json.dumps(answer))
    job = int(answer["job_id"])
    running = cluster.wait_job_state(job, {"RUNNING"}, 20, interval=0.02)
    measure("REST submit -> RUNNING", time.monotonic() - t0)
    assert running["user"] == USER2 and running["comment"] == "kernel-1234" and running["name"] == "egd-rest-probe"
    for _ in range(100):
        if output(cluster, job).count("\n") >= 2:
            break
        time.sleep(0.05)
    assert output(cluster, job).split()[:2] == [USER2, running["node"]]

    status, listing = cluster.rest("GET", f"{API}/jobs", user=USER2)
    assert status == 200 and listing["errors"] == [], listing
    mine = [j for j in listing["jobs"] if j["job_id"] == job]
    assert len(mine) == 1
    print("SAMPLE job keys:", sorted(mine[0]))
    print("SAMPLE job:", json.dumps({k: mine[0][k] for k in (
        "job_id", "name", "user_name", "user_id", "group_id", "job_state", "state_reason", "state_description",
        "comment", "partition", "batch_host", "nodes", "time_limit", "start_time", "submit_time", "end_time",
        "exit_code", "standard_output", "current_working_directory", "cpus", "node_count", "batch_flag")
        if k in mine[0]}))
    assert mine[0]["job_state"] == "RUNNING" and mine[0]["user_name"] == USER2

    # someone else's token cannot cancel it; its owner's can
    cluster.ensure_user(USER1)
    status, _ = cluster.rest("DELETE", f"{API}/job/{job}", user=USER1)
    assert status != 200
    status, answer = cluster.rest("DELETE", f"{API}/job/{job}", user=USER2)
    assert status == 200, answer
    cluster.wait_job_state(job, {"CANCELLED"}, 10)
    status, answer = cluster.rest("GET", f"{API}/jobs", user="root")
    assert status == 200
    # a forged token (another key) is refused
    forged = slurmcluster.hs256_token(b"x" * 32, USER2)
    import urllib.error
    import urllib.request
    request = urllib.request.Request(cluster.rest_url + f"{API}/jobs", headers={
        "X-SLURM-USER-NAME": USER2, "X-SLURM-USER-TOKEN": forged})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code in (401, 500)


def test_squeue_json(cluster: SlurmCluster) -> None:
    """What ``squeue --json`` gives in 22.05 (printed for the driver's authors)."""
    job = sbatch(cluster, "-J", "egd-json", "--comment", "kernel-json", "--wrap", "exec sleep 60", user=USER1)
    cluster.wait_job_state(job, {"RUNNING"}, 20)
    proc = cluster.run(["squeue", "--json", "--jobs", str(job)])
    print("MEASURE squeue --json rc:", proc.returncode, proc.stderr.strip()[:200])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    print("SAMPLE squeue --json top keys:", sorted(data))
    # 22.05's squeue --json ignores --jobs (and the other filters): it lists every job, finished ones included
    print("MEASURE squeue --json --jobs N lists jobs:", [j["job_id"] for j in data["jobs"]])
    jobs = [j for j in data["jobs"] if j["job_id"] == job]
    assert len(jobs) == 1
    print("SAMPLE squeue --json job keys == REST job keys:", sorted(jobs[0]) == sorted(
        cluster.rest("GET", f"{API}/job/{job}")[1]["jobs"][0]))
    assert jobs[0]["comment"] == "kernel-json" and jobs[0]["job_state"] == "RUNNING"


def test_tiny_partition_second_job_waits_for_resources(cluster: SlurmCluster) -> None:
    """One single-CPU job fills ``tiny``; a second one stays PENDING with reason Resources, then runs."""
    first = sbatch(cluster, "-p", "tiny", "--wrap", "exec sleep 60", user=USER1)
    cluster.wait_job_state(first, {"RUNNING"}, 20)
    second = sbatch(cluster, "-p", "tiny", "--mem=512M", "--wrap", "exec sleep 60", user=USER2)
    deadline = time.monotonic() + 10
    while True:
        job = cluster.job(second)
        assert job is not None
        if job["state"] == "PENDING" and job["reason"] == "Resources":
            break
        assert job["state"] == "PENDING" and time.monotonic() < deadline, job
        time.sleep(0.1)
    time.sleep(2)
    assert cluster.job(second)["state"] == "PENDING"  # type: ignore[index]
    status, listing = cluster.rest("GET", f"{API}/job/{second}")
    assert status == 200 and listing["jobs"][0]["state_reason"] == "Resources", listing
    print("SAMPLE PENDING job:", json.dumps({k: listing["jobs"][0][k] for k in (
        "job_state", "state_reason", "state_description", "batch_host", "nodes", "time_limit", "start_time")}))
    cluster.run(["scancel", str(first)])
    t0 = time.monotonic()
    cluster.wait_job_state(second, {"RUNNING"}, 30)
    measure("tiny: first cancelled -> second RUNNING", time.monotonic() - t0)


def test_gpu_gres(cluster: SlurmCluster) -> None:
    """One fake GPU on each debug node: two --gres=gpu:1 jobs run (CUDA_VISIBLE_DEVICES=0), a third waits."""
    jobs = [sbatch(cluster, "--gres=gpu:1", "--wrap", "echo CUDA=$CUDA_VISIBLE_DEVICES; exec sleep 60", user=USER1)
            for _ in range(3)]
    running = [cluster.wait_job_state(j, {"RUNNING"}, 20) for j in jobs[:2]]
    assert sorted(j["node"] for j in running) == cluster.gpu_nodes
    time.sleep(1)
    third = cluster.job(jobs[2])
    assert third is not None and (third["state"], third["reason"]) == ("PENDING", "Resources"), third
    status, body = cluster.rest("GET", f"{API}/job/{jobs[0]}")
    assert status == 200 and body["jobs"][0]["tres_per_node"] == "gres:gpu:1", body
    assert output(cluster, jobs[0]).strip() == "CUDA=0"


def test_kill_node_fails_its_job_and_start_node_brings_it_back(cluster: SlurmCluster) -> None:
    """A node whose slurmd and jobs die goes DOWN, its job ends NODE_FAIL; start_node makes it usable again."""
    job = sbatch(cluster, "-w", "egd-sn2", "--wrap", "exec sleep 300", user=USER1)
    cluster.wait_job_state(job, {"RUNNING"}, 20)
    # RUNNING comes before slurmstepd has started the script
    deadline = time.monotonic() + 10
    while not any("sleep 300" in line for _, line in cluster.processes_on("egd-sn2")):
        assert time.monotonic() < deadline, cluster.processes_on("egd-sn2")
        time.sleep(0.05)
    t0 = time.monotonic()
    cluster.kill_node("egd-sn2")
    assert cluster.processes_on("egd-sn2") == [] and cluster.slurmd_pid("egd-sn2") is None
    not_responding = down = None
    while time.monotonic() - t0 < 60:
        state = cluster.node_state("egd-sn2")
        if not_responding is None and "NOT_RESPONDING" in state:
            not_responding = time.monotonic() - t0
        if down is None and state.startswith("DOWN"):
            down = time.monotonic() - t0
        done = cluster.job(job)
        if down is not None and done is not None and done["state"] == "NODE_FAIL":
            break
        time.sleep(0.1)
    failed = time.monotonic() - t0
    assert done is not None and done["state"] == "NODE_FAIL", (done, cluster.node_state("egd-sn2"))
    rest_job = cluster.rest("GET", f"{API}/job/{job}")[1]["jobs"][0]
    print("SAMPLE NODE_FAIL job:", json.dumps({k: rest_job[k] for k in (
        "job_state", "state_reason", "state_description", "exit_code", "batch_host", "nodes", "end_time")}))
    print("SAMPLE node while down:", cluster.node_info("egd-sn2").get("State"),
          cluster.node_info("egd-sn2").get("Reason"))
    measure("kill_node -> NOT_RESPONDING", not_responding or 0)
    measure("kill_node -> node DOWN", down or 0)
    measure("kill_node -> job NODE_FAIL", failed)
    assert failed < 40
    # other nodes are unaffected
    other = sbatch(cluster, "-w", "egd-sn1", "--wrap", "true", user=USER1)
    cluster.wait_job_state(other, {"COMPLETED"}, 20)
    t0 = time.monotonic()
    cluster.start_node("egd-sn2")
    measure("start_node -> usable", time.monotonic() - t0)
    assert cluster.node_state("egd-sn2") == "IDLE"
    again = sbatch(cluster, "-w", "egd-sn2", "--wrap", "hostname", user=USER1)
    cluster.wait_job_state(again, {"COMPLETED"}, 20)
    assert output(cluster, again).strip() == "egd-sn2"
