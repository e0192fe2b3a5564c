"""The YARN test cluster itself (tests/yarncluster.py): a real ResourceManager and NodeManager, and the two ways the
yarn driver runs kernels on it, a DistributedShell ApplicationMaster submitted through the RM REST API and
``spark-submit --deploy-mode cluster``, each taken to RUNNING and killed."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.procs import cmdline
from tests.yarncluster import (
    MAX_ALLOCATION_MB,
    YarnCluster,
    ds_submission,
    spark_home,
    spark_submit,
)

pytestmark = pytest.mark.yarn


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    """conftest's wait_until, polling every 0.2 s."""
    return wait_until(predicate, timeout, 0.2, what)


def _script(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "launch.sh"  # .sh: the DS AM renames any other name in place
    path.write_text(text)
    return path


def test_cluster_answers(yarn_cluster: YarnCluster) -> None:
    info = yarn_cluster.info()
    assert info["state"] == "STARTED"
    assert info["hadoopVersion"] == "3.4.1"
    metrics = yarn_cluster.metrics()
    assert metrics["activeNodes"] == 1
    assert metrics["unhealthyNodes"] == 0
    assert metrics["totalMB"] == 12288
    assert (yarn_cluster.conf_dir / "yarn-site.xml").is_file()
    assert (yarn_cluster.conf_dir / "core-site.xml").is_file()
    # nothing matches: an empty object, not null and not a list
    assert yarn_cluster.get("/ws/v1/cluster/apps", applicationTags="no-such-tag") == {"apps": {}}
    assert yarn_cluster.apps(applicationTags="no-such-tag") == []


def test_distributed_shell_app_runs_and_is_killed(yarn_cluster: YarnCluster) -> None:
    work = yarn_cluster.work_dir / "ds-sleep"
    marker = work / "started"
    script = _script(work, f"#!/usr/bin/env bash\nenv > {work}/env.txt\ntouch {marker}\nexec sleep 600\n")
    app_id = yarn_cluster.new_application(user="root")
    yarn_cluster.submit(ds_submission(yarn_cluster, app_id, "kernel-DS-1", script, tags=["kernel-DS-1", "egd"]),
                        user="root")
    app = yarn_cluster.wait_for_state(app_id, {"RUNNING"}, timeout=60)
    assert app["applicationType"] == "JUPYTER"
    assert sorted(app["applicationTags"].split(",")) == ["egd", "kernel-ds-1"]  # lower-cased, one string
    assert [a["id"] for a in yarn_cluster.apps(applicationTags="kernel-ds-1")] == [app_id]
    assert [a["id"] for a in yarn_cluster.apps(applicationTags="KERNEL-DS-1")] == [app_id]  # case-insensitive
    assert yarn_cluster.apps(applicationTags="kernel-ds") == []  # exact tags only
    assert script.exists(), "the DS AM must not rename a .sh script"

    wait_for(marker.exists, 30, "the DS container to start the script")
    sleeps = wait_for(lambda: [p for p in yarn_cluster.container_processes() if cmdline(p).startswith("sleep 600")],
                   10, "the sleep process")
    env = dict(line.split("=", 1) for line in (work / "env.txt").read_text().splitlines() if "=" in line)
    assert env["JAVA_HOME"] == str(yarn_cluster.java_home)
    assert "SPARK_LOCAL_IP" not in env  # containers get a cleared environment

    statuses = yarn_cluster.kill(app_id, user="root")
    assert statuses[-1] == 200
    app = yarn_cluster.app(app_id)
    assert (app["state"], app["finalStatus"]) == ("KILLED", "KILLED")
    assert "killed by user root" in app["diagnostics"]
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and cmdline(p) for p in sleeps), 10,
          "the killed app's sleep process to end")


def test_app_that_does_not_fit_waits_in_accepted(yarn_cluster: YarnCluster) -> None:
    # more than the largest container: refused at submission
    app_id = yarn_cluster.new_application()
    too_big = {"application-id": app_id, "application-name": "too-big", "application-type": "TEST",
               "resource": {"memory": MAX_ALLOCATION_MB * 2, "vCores": 1},
               "am-container-spec": {"commands": {"command": "exec sleep 600"}}}
    status, body = yarn_cluster.request("POST", "/ws/v1/cluster/apps", too_big)
    assert status == 400
    assert "Requested more memory than configured max" in body["RemoteException"]["message"]
    assert yarn_cluster.request("GET", f"/ws/v1/cluster/apps/{app_id}")[0] == 404

    # fits one container but not the free capacity: two 4 GB bare AMs fill most of the default queue (90 % of
    # the 12 GB node), a third waits
    def bare(name: str, mb: int) -> str:
        app = yarn_cluster.new_application()
        yarn_cluster.submit({"application-id": app, "application-name": name, "application-type": "TEST",
                             "max-app-attempts": 1, "resource": {"memory": mb, "vCores": 1},
                             "am-container-spec": {"commands": {"command": "exec sleep 600"}}})
        return app

    fillers = [bare(f"filler-{i}", MAX_ALLOCATION_MB) for i in range(2)]
    try:
        for app in fillers:  # a bare command never registers: ACCEPTED, launched, "waiting ... to Register"
            wait_for(lambda app=app: "waiting for AM container to Register" in yarn_cluster.app(app)["diagnostics"],
                  30, f"{app} to be launched")
        waiting = bare("waiting", MAX_ALLOCATION_MB)
        fillers.append(waiting)
        # "Queue's" or "User's" AM resource limit, depending on whether the user's share is reached first
        app = wait_for(lambda: (lambda a: a if "AM resource limit exceeded" in a["diagnostics"] else None)(
            yarn_cluster.app(waiting)), 15, "the diagnostics of the waiting app")
        assert app["state"] == "ACCEPTED"
        assert app["allocatedMB"] == 0
        time.sleep(2)
        assert yarn_cluster.app(waiting)["state"] == "ACCEPTED"
    finally:
        for app in fillers:
            assert yarn_cluster.kill(app)[-1] == 200
    assert yarn_cluster.app(waiting)["state"] == "KILLED"
    wait_for(lambda: not yarn_cluster.container_processes(), 15, "the fillers' processes to end")


SPARK_PROGRAM = """\
import os, sys, time
from pyspark.sql import SparkSession
spark = SparkSession.builder.getOrCreate()
print("SPARK READY", spark.version, os.environ.get("SPARK_LOCAL_IP"), flush=True)
with open(sys.argv[1], "w") as handle:
    handle.write(spark.sparkContext.applicationId)
time.sleep(600)
"""


@pytest.mark.skipif(spark_home() is None, reason="pyspark is not installed")
def test_spark_cluster_mode_app_runs_and_is_killed(yarn_cluster: YarnCluster) -> None:
    work = yarn_cluster.work_dir / "spark-sleep"
    work.mkdir()
    program = work / "sleeper.py"
    program.write_text(SPARK_PROGRAM)
    marker = work / "app-id"
    argv, env = spark_submit(yarn_cluster, program, "kernel-Spark-1", tags=["kernel-Spark-1"], args=[str(marker)])
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    apps = wait_for(lambda: yarn_cluster.apps(applicationTags="kernel-spark-1"), 10, "the Spark app")
    assert len(apps) == 1
    app_id = apps[0]["id"]
    assert apps[0]["applicationType"] == "SPARK"
    app = yarn_cluster.wait_for_state(app_id, {"RUNNING"}, timeout=150)
    print(f"spark app {app_id} RUNNING {time.monotonic() - started:.1f}s after spark-submit started")
    # the program creates the file, then writes: wait for what it wrote, not for the file
    wait_for(lambda: marker.exists() and marker.read_text(), 30, "the program to write its marker")
    assert marker.read_text() == app_id
    logs = yarn_cluster.app_logs(app_id)
    assert "SPARK READY" in logs
    assert "127.0.0.1" in logs.split("SPARK READY", 1)[1].splitlines()[0]
    assert "InaccessibleObjectException" not in logs
    assert app["applicationTags"] == "kernel-spark-1"
    cmdlines = [cmdline(p) for p in yarn_cluster.container_processes()]
    print("\n".join(c[:300] for c in cmdlines))
    assert any("sleeper.py" in c for c in cmdlines), cmdlines

    assert yarn_cluster.kill(app_id)[-1] == 200
    assert yarn_cluster.app(app_id)["state"] == "KILLED"
    wait_for(lambda: not yarn_cluster.container_processes(), 15, "the Spark AM and its Python to end")
