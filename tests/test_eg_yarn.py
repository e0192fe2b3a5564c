"""Enterprise Gateway's ``spark_python_yarn_cluster`` kernelspec on egd's yarn driver, on the real MiniYARNCluster.

EG's files as EG's Makefile assembles them (tests/egdist.py: ``kernel.json``, ``bin/run.sh``, EG's
``launch_ipykernel.py``); the test makes only the edit EG's documentation asks every operator to make in
``kernel.json``: ``SPARK_HOME`` and ``PYSPARK_PYTHON`` to where this machine has them. egd runs EG's ``run.sh`` (its
``spark-submit --deploy-mode cluster``), finds the application by the tags it adds, takes EG's payload from the
application master's host, interrupts through EG's comm port and kills through YARN.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import egdist
from tests.conftest import GatewayProcess, wait_until
from tests.test_yarn import FINAL, app_of, tags, yarn_settings
from tests.yarncluster import YarnCluster, spark_home

pytestmark = [pytest.mark.yarn, pytest.mark.eg]


def operator_edit(specs: Path, name: str, python: str) -> None:
    """What EG's docs tell an operator to change in a YARN kernelspec: where Spark and the kernels' Python are."""
    path = specs / name / "kernel.json"
    spec = json.loads(path.read_text())
    spec["env"].update(SPARK_HOME=str(spark_home()), PYSPARK_PYTHON=python)
    path.write_text(json.dumps(spec, indent=2))


@pytest.fixture(scope="module")
def eg_yarn_gw(yarn_cluster: YarnCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the yarn driver and EG's spark_python_yarn_cluster kernelspec."""
    import sys

    tmp = tmp_path_factory.mktemp("egyarn")
    specs = egdist.assemble(tmp / "kernels", ["spark_python_yarn_cluster"])
    operator_edit(specs, "spark_python_yarn_cluster", sys.executable)
    gw = GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(specs)], "default_kernel_name": "spark_python_yarn_cluster",
                    "launch_timeout": 240, "max_launch_timeout": 300, "heartbeat_interval": 1},
        "drivers": {"yarn": yarn_settings(yarn_cluster, tmp)},
    })
    yield gw
    gw.stop()
    live = [a["id"] for a in yarn_cluster.apps(applicationTags="egd") if a["state"] not in FINAL]
    assert not live, f"applications left running: {live}"


def test_spark_python_yarn_cluster_runs_unchanged(eg_yarn_gw: GatewayProcess, yarn_cluster: YarnCluster) -> None:
    """The kernel is a Spark driver in a YARN application named after the kernel id (EG's run.sh) and tagged by
    egd; Spark works (the session EG's launcher made); an interrupt through EG's comm port stops a cell; restart gives a
    new application; DELETE leaves every application final."""
    client = eg_yarn_gw.client
    kernel_id = client.start_kernel("spark_python_yarn_cluster")
    first_app = app_of(client, kernel_id)
    app = yarn_cluster.app(first_app)
    assert app["name"] == kernel_id and {"egd", kernel_id} <= tags(app)
    sock = client.connect(kernel_id)
    try:
        # EG 3.3's launcher builds its lazy `spark` with SparkSession._wrapped, which Spark 3.4 removed: with the
        # test's Spark 4 that variable fails (as it does under EG itself), but the session it made is there.
        counted = sock.execute("from pyspark.sql import SparkSession\n"
                               "print(SparkSession.builder.getOrCreate().range(10).count())", timeout=180)
        assert counted.stdout.strip() == "10", counted.reply["content"]
        msg = sock.request("execute_request", {"code": "import time; time.sleep(60)", "silent": False,
                                               "store_history": True, "user_expressions": {}, "allow_stdin": False})
        wait_until(lambda: client.kernel(kernel_id).json["execution_state"] == "busy", 20, what="busy")
        assert client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {}).status == 204
        assert sock.wait_for(msg, 30).reply["content"]["ename"] == "KeyboardInterrupt"
        resp = client.request("POST", f"/api/kernels/{kernel_id}/restart", {})
        assert resp.status == 200
        second_app = app_of(client, kernel_id)
        assert second_app != first_app and yarn_cluster.app(first_app)["state"] in FINAL
        assert sock.execute("print(1 + 1)", timeout=120).stdout.strip() == "2"
    finally:
        sock.close()
        assert client.delete_kernel(kernel_id) == 204
    wait_until(lambda: all(a["state"] in FINAL for a in yarn_cluster.apps(applicationTags=kernel_id)), 30,
               what="the kernel's applications to end")
    assert "EG payload for kernel" in eg_yarn_gw.log()


def test_extra_spark_opts_and_unsafe_values_are_refused(eg_yarn_gw: GatewayProcess,
                                                        yarn_cluster: YarnCluster) -> None:
    """EG's run.sh passes SPARK_OPTS through ``eval``: a client's KERNEL_EXTRA_SPARK_OPTS, or a KERNEL_USERNAME
    that word splitting would turn into more spark-submit options, is a 400 naming the variable; nothing is
    submitted."""
    before = {a["id"] for a in yarn_cluster.apps()}
    for env, name in (({"KERNEL_EXTRA_SPARK_OPTS": "--conf spark.x=1"}, "KERNEL_EXTRA_SPARK_OPTS"),
                      ({"KERNEL_USERNAME": "alice --conf spark.driver.memory=64g"}, "KERNEL_USERNAME")):
        resp = eg_yarn_gw.client.request("POST", "/api/kernels", {"name": "spark_python_yarn_cluster", "env": env})
        assert resp.status == 400, resp.json
        assert name in resp.json["message"]
    assert {a["id"] for a in yarn_cluster.apps()} == before
