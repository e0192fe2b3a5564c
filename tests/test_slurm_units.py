"""The slurm driver's pieces that need no cluster: checking a launch's KERNEL_* requests against the kernelspec,
Slurm's time formats, the JWT egd signs, what a job looks like from REST and from squeue, the job script, the
settings' checks, and the watcher's schedule (on a task.Clock). What Slurm itself does with all of it is in
tests/test_slurm.py, on a real cluster."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any, ClassVar

import pytest
from twisted.internet.task import Clock

from egd.driverapi import LaunchRequest
from egd.drivers.slurm import SlurmDriver, job_resources, parse_time_limit
from egd.drivers.slurm_api import JobRequest, SlurmJob, _job_of_squeue, hs256_token, job_of_rest, rest_submission
from egd.drivers.slurm_watch import JobWatch, JobWatcher
from egd.errors import BadRequest, Forbidden

SPEC = {"partitions": ["debug", "tiny"], "accounts": ["physics"], "qos": ["normal", "high"],
        "time_limit": "1:00:00", "max_time_limit": "4:00:00", "cpus": 1, "max_cpus": 8, "memory": "1g",
        "max_memory": "16g", "max_gpus": 2, "gpu_type": "a100", "constraints": ["avx512"]}


def test_defaults_come_from_the_kernelspec() -> None:
    r = job_resources({}, SPEC, None)
    assert (r.partition, r.account, r.qos, r.time_limit, r.cpus, r.memory_mb, r.gpus, r.nodes) == \
        ("debug", "physics", "normal", 60, 1, 1024, 0, 1)
    assert r.gres is None and r.constraint == "avx512"


def test_requests_within_the_kernelspec_are_taken() -> None:
    r = job_resources({"KERNEL_PARTITION": "tiny", "KERNEL_QOS": "high", "KERNEL_TIME_LIMIT": "2:30:00",
                       "KERNEL_CPUS": "4", "KERNEL_MEMORY": "8g", "KERNEL_GPUS": "2"}, SPEC, None)
    assert (r.partition, r.qos, r.time_limit, r.cpus, r.memory_mb, r.gres) == ("tiny", "high", 150, 4, 8192,
                                                                                "gpu:a100:2")


@pytest.mark.parametrize(("name", "value", "words"), [
    ("KERNEL_PARTITION", "gpu", "partitions this kernelspec allows: debug, tiny"),
    ("KERNEL_PARTITION", "debug;rm", "partitions this kernelspec allows"),
    ("KERNEL_ACCOUNT", "chemistry", "accounts this kernelspec allows: physics"),
    ("KERNEL_QOS", "urgent", "QOSs this kernelspec allows"),
    ("KERNEL_TIME_LIMIT", "5:00:00", "at most 4:00:00"),
    ("KERNEL_TIME_LIMIT", "soon", "Slurm time limit"),
    ("KERNEL_CPUS", "9", "at most 8"),
    ("KERNEL_CPUS", "-1", "positive whole number"),
    ("KERNEL_MEMORY", "17g", "at most 16384m"),
    ("KERNEL_MEMORY", "lots", "size such as"),
    ("KERNEL_GPUS", "3", "at most 2"),
    ("KERNEL_NODES", "2", "at most 1"),
    ("KERNEL_CONSTRAINT", "gpu", "constraints this kernelspec allows: avx512"),
])
def test_anything_else_is_refused_naming_the_variable(name: str, value: str, words: str) -> None:
    with pytest.raises(BadRequest) as caught:
        job_resources({name: value}, SPEC, None)
    assert name in str(caught.value) and words in str(caught.value)


def test_without_lists_only_the_defaults_are_allowed() -> None:
    r = job_resources({}, {}, "batch")
    assert (r.partition, r.account, r.qos, r.gpus, r.cpus) == ("batch", None, None, 0, 1)
    with pytest.raises(BadRequest, match=r"KERNEL_ACCOUNT.*none"):
        job_resources({"KERNEL_ACCOUNT": "x"}, {}, None)
    with pytest.raises(BadRequest, match="KERNEL_GPUS must be at most 0"):
        job_resources({"KERNEL_GPUS": "1"}, {}, None)


@pytest.mark.parametrize(("text", "minutes"), [
    ("90", 90), ("1:30", 2), ("0:20", 1), ("1:30:00", 90), ("2-00", 2880), ("1-01:30", 1530),
    ("1-00:00:01", 1441)])
def test_slurm_time_formats(text: str, minutes: int) -> None:
    assert parse_time_limit(text, "t") == minutes


@pytest.mark.parametrize("text", ["", "0", "1:2:3:4", "a", "-5", "1-", "1.5"])
def test_bad_time_limits(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_time_limit(text, "t")


def test_the_token_is_an_hs256_jwt_over_the_key() -> None:
    key = os.urandom(32)
    token = hs256_token(key, "alice", 1000.0, lifespan=600)
    header, claims, signature = token.split(".")

    def decode(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    assert json.loads(decode(header)) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(decode(claims)) == {"exp": 1600, "iat": 1000, "sun": "alice"}
    assert decode(signature) == hmac.new(key, f"{header}.{claims}".encode(), hashlib.sha256).digest()


def test_a_job_from_rest_and_from_squeue() -> None:
    rest = job_of_rest({"job_id": 12, "name": "egd-k1", "user_name": "alice", "job_state": "PENDING",
                        "state_reason": "Resources", "partition": "tiny", "nodes": "", "submit_time": 1700000000,
                        "exit_code": 0})
    assert rest.describe() == "Slurm job 12 PENDING (Resources) in partition tiny"
    assert not rest.final and rest.submitted == 1700000000
    line = "\x1f".join(["13", "egd-k2", "bob", "RUNNING", "None", "debug", "egd-sn1", "egd-sn1",
                        "2026-12-07T05:10:31", "Jupyter kernel k2"])
    cli = _job_of_squeue(line)
    assert cli is not None and cli.describe() == "Slurm job 13 RUNNING on egd-sn1 in partition debug"
    assert cli.submitted == time.mktime(time.strptime("2026-12-07T05:10:31", "%Y-%m-%dT%H:%M:%S"))
    assert _job_of_squeue("garbage") is None
    assert SlurmJob("14", "n", "u", "NODE_FAIL", "NodeDown").final


def test_the_rest_submission_carries_the_resources() -> None:
    job = JobRequest(name="egd-k", comment="c", script="#!/bin/sh\n", user="alice", workdir="/tmp",
                     output="/dev/null", environment={"PATH": "/bin"}, partition="debug", time_limit=60,
                     cpus=2, memory_mb=512, gres="gpu:1")
    body = rest_submission(job)
    assert body["script"].startswith("#!")
    assert {k: body["job"][k] for k in ("name", "partition", "time_limit", "cpus_per_task", "memory_per_node", "gres",
                                        "environment")} == {
        "name": "egd-k", "partition": "debug", "time_limit": 60, "cpus_per_task": 2, "memory_per_node": 512,
        "gres": "gpu:1", "environment": {"PATH": "/bin"}}
    assert "account" not in body["job"] and "qos" not in body["job"]


class _Spec:
    name = "python_slurm"
    argv = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")
    resource_dir = "/tmp"
    env: ClassVar[dict[str, str]] = {}
    driver_config: ClassVar[dict[str, Any]] = {"prologue": "module load python"}


def _driver(tmp_path: Any, **settings: Any) -> SlurmDriver:
    key = tmp_path / "jwt.key"
    key.write_bytes(os.urandom(32))
    return SlurmDriver(reactor=Clock(), settings={"rest_url": "http://127.0.0.1:1", "jwt_key_file": str(key),
                                                  "user": "egd", **settings},
                       runtime_dir=str(tmp_path), port_range=None)


def test_the_job_script_keeps_the_secrets_off_the_command_line(tmp_path: Any) -> None:
    driver = _driver(tmp_path, prologue="export OMP_NUM_THREADS=1")
    request = LaunchRequest("k1", _Spec(), {}, "alice", None, 30.0)
    secrets = json.dumps({"secret": "s' $(rm -rf /)", "key": "k", "env": {"A": "`x`"}})
    script = driver.launch_script(request, ("10.0.0.1", 4000), secrets)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert "export OMP_NUM_THREADS=1" in lines and "module load python" in lines
    exec_line = next(line for line in lines if line.startswith("exec "))
    assert exec_line.endswith("<<'EGD_LAUNCH_SECRETS'") and "s'" not in exec_line
    assert "--callback 10.0.0.1:4000" in exec_line and "--foreground" in exec_line
    assert lines[-2:] == [secrets, "EGD_LAUNCH_SECRETS"]


def test_kernels_never_run_as_root(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="run as root"):
        _driver(tmp_path, user="root")
    driver = _driver(tmp_path, impersonation=True, prohibited_users=["mallory"])
    for refused in ("root", "mallory", "-rf", "Alice Smith"):
        with pytest.raises(Forbidden):
            driver.job_user(LaunchRequest("k", _Spec(), {}, refused, None, 30.0))
    assert driver.job_user(LaunchRequest("k", _Spec(), {}, "alice", None, 30.0)) == "alice"


def test_settings_problems_are_named(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="rest_url"):
        SlurmDriver(reactor=Clock(), settings={"user": "egd"}, runtime_dir=str(tmp_path), port_range=None)
    with pytest.raises(ValueError, match="jwt_key_file"):
        SlurmDriver(reactor=Clock(), settings={"rest_url": "http://127.0.0.1:1", "user": "egd",
                                               "impersonation": True, "token_file": __file__},
                    runtime_dir=str(tmp_path), port_range=None)
    with pytest.raises(ValueError, match="mode"):
        SlurmDriver(reactor=Clock(), settings={"mode": "pbs", "user": "egd"}, runtime_dir=str(tmp_path),
                    port_range=None)


class _CountingSlurm:
    """Counts listings; answers with the jobs it was given. (Only the watcher's schedule is under test here;
    the real listing is tested against Slurm in tests/test_slurm.py.)"""

    def __init__(self) -> None:
        self.requests = 0
        self.listing: list[SlurmJob] = []

    async def jobs(self) -> list[SlurmJob]:
        self.requests += 1
        return list(self.listing)

    async def job(self, job_id: str) -> SlurmJob | None:
        self.requests += 1
        return None


def test_one_listing_per_interval_for_all_jobs_and_faster_while_someone_waits() -> None:
    clock, slurm = Clock(), _CountingSlurm()
    watcher = JobWatcher(clock, slurm, interval=5.0, fast_interval=0.5)  # type: ignore[arg-type]
    watcher.start()
    reports: list[str] = []
    watches = [watcher.watch(JobWatch(f"k{i}", str(i), "alice", lambda j: reports.append(j.describe())))
               for i in range(10)]
    slurm.listing = [SlurmJob(str(i), f"egd-k{i}", "alice", "PENDING", "Priority") for i in range(10)]
    clock.advance(0.5)
    assert slurm.requests == 1 and len(reports) == 10  # urgent (launching): the fast interval
    for w in watches:
        w.urgent = False
    clock.advance(0.5)
    clock.advance(4.0)
    assert slurm.requests == 2  # nothing urgent: the slow interval, still one listing for ten jobs
    slurm.listing[3] = SlurmJob("3", "egd-k3", "alice", "TIMEOUT", "TimeLimit")
    clock.advance(5.0)
    assert watches[3].ended.called and not watcher.watching(watches[3])
    assert "TIMEOUT (TimeLimit)" in reports[-1]


def test_a_job_slurm_forgot_ends_after_a_few_rounds() -> None:
    clock, slurm = Clock(), _CountingSlurm()
    watcher = JobWatcher(clock, slurm, interval=1.0, fast_interval=1.0)  # type: ignore[arg-type]
    watcher.start()
    watch = watcher.watch(JobWatch("k", "77", "alice", lambda _: None))
    for _ in range(3):
        clock.advance(1.0)
    assert watch.ended.called and watch.report is not None and watch.report.state == "CANCELLED"
    assert slurm.requests == 4  # three listings, then one question by id
