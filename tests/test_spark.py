"""Spark kernels' SparkSession (``metadata.egd.config.spark_session``) on the real MiniYARNCluster.

``lazy`` (the default): the kernel answers as soon as its Python driver runs and ``spark``/``sc`` are proxies
whose first use waits for the session being built behind it, printing progress; ``eager``: the kernel answers only
once the session exists. The gateway and the cluster are tests/test_yarn.py's (one cluster per test session).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from drivers.yarn import EG_SPARK_MODE_OPTION, with_eg_spark_mode
from egd.errors import BadRequest
from tests import egdist
from tests.client import GatewayClient, KernelSocket
from tests.conftest import GatewayProcess
from tests.test_eg_yarn import operator_edit
from tests.test_lifecycle import wait_for_output
from tests.test_yarn import FINAL, app_of, stop_leaving_no_application, write_spec, yarn_gateway, yarn_settings
from tests.yarncluster import YarnCluster

pytestmark = pytest.mark.spark

#: Seconds a Spark kernel may take to start on the test cluster (the machine is small and shared).
LAUNCH = 240
#: The Spark job of the issue: it needs an executor.
SUM = "print(spark.range(1000).groupBy().sum('id').first()[0], sc.applicationId)"
#: Where the build's state is kept in the kernel (the module lazy_spark.py is loaded as).
BUILD = "__import__('sys').modules['egd_lazy_spark'].BUILD"


@pytest.fixture(scope="module")
def spark_gw(yarn_cluster: YarnCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the yarn driver and a Spark kernelspec per mode; at the end none of its applications runs."""
    tmp = tmp_path_factory.mktemp("sparkgw")
    specs = tmp / "specs"
    spark = {"mode": "spark", "num_executors": 1, "max_executors": 1}
    write_spec(specs, "spark_lazy", LAUNCH, **spark)  # no spark_session: lazy is the default
    write_spec(specs, "spark_eager", LAUNCH, spark_session="eager", **spark)
    write_spec(specs, "spark_none", LAUNCH, spark_session="none", **spark)
    # Spark's driver cannot load this class: the SparkContext fails, spark-submit (which never loads it) does not
    write_spec(specs, "spark_broken", LAUNCH, spark_conf={"spark.serializer": "no.such.Serializer"}, **spark)
    write_spec(specs, "spark_bad_mode", LAUNCH, spark_session="sometimes", **spark)
    # The small queue (10 % of the node) holds the driver's container but not an executor's as well; Spark gives
    # up waiting for executors after 3 s instead of 30 (the session is built without any)
    write_spec(specs, "spark_starved", LAUNCH, queues=["small"],
               spark_conf={"spark.scheduler.maxRegisteredResourcesWaitingTime": "3s"}, **spark)
    gw = yarn_gateway(yarn_cluster, tmp)  # test_yarn's gateway, with these kernelspecs beside its own
    yield gw
    stop_leaving_no_application(gw, yarn_cluster)


@pytest.fixture
def client(spark_gw: GatewayProcess) -> GatewayClient:
    """A client of the gateway."""
    return spark_gw.client


def first_cell(client: GatewayClient, name: str) -> tuple[str, KernelSocket, float, float]:
    """POST a kernel and run ``import os; 1+1`` in it: its id, the socket, the seconds from the POST to the
    first reply, and when (time.time()) that reply came."""
    began = time.monotonic()
    kernel_id = client.start_kernel(name)
    sock = client.connect(kernel_id)
    run = sock.execute("import os; 1+1", timeout=LAUNCH)
    assert run.result == "2", run.reply
    return kernel_id, sock, time.monotonic() - began, time.time()


def streams(messages: list[dict[str, Any]], name: str) -> str:
    """The text a cell wrote to ``name`` (stdout or stderr)."""
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream"
                   and m["content"]["name"] == name)


def test_lazy_kernel_answers_before_its_session_and_first_use_waits(client: GatewayClient,
                                                                   yarn_cluster: YarnCluster) -> None:
    """The first cell runs while the SparkSession is still being built; an interrupt while a cell waits for it
    returns control and the build goes on; the next use waits with progress in its output, then the job runs,
    ``sc.applicationId`` is the application egd reports, and after that cell ``spark`` is the real object.
    A restart is a new application with the same lazy behaviour."""
    kernel_id, sock, ready, answered = first_cell(client, "spark_lazy")
    apps = [app_of(client, kernel_id)]
    try:
        print(f"\nlazy: POST -> first cell {ready:.1f}s")
        # repr() (what variable inspectors and debuggers call) does not wait for the session
        assert "being built in the background" in sock.execute("print(repr(spark), repr(sc))").stdout
        waiting = sock.request("execute_request", {"code": "spark.range(5).count()", "silent": False,
                                                   "store_history": True, "user_expressions": {},
                                                   "allow_stdin": False})
        wait_for_output(sock, waiting, "waiting for the SparkSession", 60)
        assert client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {}).status == 204
        interrupted = sock.wait_for(waiting, timeout=20)
        assert interrupted.reply["content"]["ename"] == "KeyboardInterrupt", interrupted.reply
        assert "still being built" in streams(interrupted.messages, "stderr")
        began = time.monotonic()
        run = sock.execute(SUM, timeout=180)
        assert run.reply["content"]["status"] == "ok", run.reply
        assert run.stdout.split() == ["499500", apps[0]]  # the progress is on stderr, the cell's stdout its own
        progress = streams(run.messages, "stderr")
        print(f"lazy: first Spark result {time.monotonic() - began:.1f}s after the interrupt; progress:\n{progress}")
        assert f"YARN application {apps[0]}" in progress and "SparkSession ready after" in progress
        finished = float(sock.execute(f"print({BUILD}.finished_at)").stdout)
        assert answered < finished, "the first cell did not run before the session existed"
        assert sock.execute("print(type(spark).__name__, type(sc).__name__)").stdout.split() == [
            "SparkSession", "SparkContext"]
        sock.close()
        assert client.request("POST", f"/api/kernels/{kernel_id}/restart", {}, timeout=300).status == 200
        apps.append(app_of(client, kernel_id))
        assert apps[1] != apps[0] and yarn_cluster.app(apps[0])["state"] in FINAL
        sock = client.connect(kernel_id)
        assert sock.execute("print(type(spark).__name__)", timeout=60).stdout.strip() == "_Proxy"
        assert sock.execute("print(sc.applicationId)", timeout=180).stdout.strip() == apps[1]
    finally:
        sock.close()
        assert client.delete_kernel(kernel_id) == 204
    assert all(yarn_cluster.app(a)["state"] in FINAL for a in apps)


def test_eager_kernel_answers_with_its_session(client: GatewayClient) -> None:
    """``spark_session: eager``: the first cell finds the real SparkSession (the kernel answered only once it
    existed)."""
    kernel_id, sock, ready, answered = first_cell(client, "spark_eager")
    try:
        print(f"\neager: POST -> first cell {ready:.1f}s")
        assert sock.execute("print(type(spark).__name__)").stdout.strip() == "SparkSession"
        finished = float(sock.execute(f"print({BUILD}.finished_at)").stdout)
        assert finished < answered
    finally:
        sock.close()
        assert client.delete_kernel(kernel_id) == 204


def test_failed_build_is_an_error_on_first_use_and_the_kernel_lives(client: GatewayClient) -> None:
    """A SparkSession that cannot be built: the first use is an error with Spark's message and the YARN
    application; the kernel goes on running cells."""
    kernel_id, sock, _, _ = first_cell(client, "spark_broken")
    try:
        run = sock.execute("spark.range(3).count()", timeout=180)
        content = run.reply["content"]
        assert content["ename"] == "SparkSessionUnavailable", content
        print(f"\nfailed build, first use: {content['ename']}: {content['evalue']}")
        assert "ClassNotFoundException: no.such.Serializer" in content["evalue"]
        assert "YARN application application_" in content["evalue"]
        assert sock.execute("print('still here')").stdout.strip() == "still here"
        assert sock.execute("sc.version").reply["content"]["ename"] == "SparkSessionUnavailable"
    finally:
        sock.close()
        assert client.delete_kernel(kernel_id) == 204


def test_bad_spark_session_value_is_a_400(client: GatewayClient, yarn_cluster: YarnCluster) -> None:
    """A kernelspec whose spark_session is none of lazy, eager, none: 400 saying so; nothing is submitted."""
    since = int(time.time() * 1000)
    resp = client.request("POST", "/api/kernels", {"name": "spark_bad_mode"})
    assert resp.status == 400, resp.json
    assert "spark_session must be one of lazy, eager, none" in resp.json["message"]
    assert not [a for a in yarn_cluster.apps(startedTimeBegin=since) if "spark_bad_mode" in a.get("name", "")]


def test_session_without_executors_is_reported_on_first_use(client: GatewayClient) -> None:
    """The queue holds the driver but no executor: the first use says that none of the executors asked for has
    registered, with YARN's queue; what needs no executor still works."""
    kernel_id, sock, _, _ = first_cell(client, "spark_starved")
    try:
        run = sock.execute("print(spark.version)", timeout=180)
        assert run.reply["content"]["status"] == "ok", run.reply
        assert run.stdout.strip().split(".")[0] in ("3", "4")
        warning = streams(run.messages, "stderr")
        print(f"\nstarved, first use: {warning.strip()}")
        assert "none of the 1 executors requested has registered" in warning
        assert "in queue root.small" in warning
        assert "RuntimeWarning" not in warning  # pyspark's about egd's own --py-files is filtered out
    finally:
        sock.close()
        assert client.delete_kernel(kernel_id) == 204


def test_none_mode_leaves_the_session_to_the_user(client: GatewayClient) -> None:
    """``spark_session: none``: no ``spark`` or ``sc``; the user's own SparkSession is the application's."""
    kernel_id, sock, _, _ = first_cell(client, "spark_none")
    try:
        assert sock.execute("print('spark' in dir(), 'sc' in dir())").stdout.split() == ["False", "False"]
        run = sock.execute("from pyspark.sql import SparkSession\n"
                           "print(SparkSession.builder.getOrCreate().sparkContext.applicationId)", timeout=180)
        assert run.stdout.strip() == app_of(client, kernel_id)
    finally:
        sock.close()
        assert client.delete_kernel(kernel_id) == 204


def test_eg_spark_mode_option_takes_the_kernelspec_setting() -> None:
    """An EG kernelspec's ``spark_session`` replaces the mode in its argv, in either spelling; without the option
    in the argv it is a 400; without the setting the argv stays as it is."""
    argv = ["run.sh", EG_SPARK_MODE_OPTION, "lazy", "--RemoteProcessProxy.kernel-id", "{kernel_id}"]
    assert with_eg_spark_mode("s", argv, "none") == ["run.sh", EG_SPARK_MODE_OPTION, "none",
                                                     "--RemoteProcessProxy.kernel-id", "{kernel_id}"]
    assert with_eg_spark_mode("s", [f"{EG_SPARK_MODE_OPTION}=lazy"], "eager") == [f"{EG_SPARK_MODE_OPTION}=eager"]
    assert with_eg_spark_mode("s", argv, None) == argv
    with pytest.raises(BadRequest, match=f"needs {re.escape(EG_SPARK_MODE_OPTION)}"):
        with_eg_spark_mode("s", ["run.sh"], "lazy")


@pytest.mark.eg
def test_eg_kernelspec_runs_with_the_egd_setting(yarn_cluster: YarnCluster,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """EG's spark_python_yarn_cluster (its argv says lazy) with ``spark_session: none`` in egd's metadata: EG's
    launcher is given none and defines no ``spark``."""
    tmp = tmp_path_factory.mktemp("egspark")
    specs = egdist.assemble(tmp / "kernels", ["spark_python_yarn_cluster"])
    operator_edit(specs, "spark_python_yarn_cluster", sys.executable)
    path = specs / "spark_python_yarn_cluster" / "kernel.json"
    spec = json.loads(path.read_text())
    assert spec["argv"][spec["argv"].index(EG_SPARK_MODE_OPTION) + 1] == "lazy"
    spec.setdefault("metadata", {}).setdefault("egd", {}).setdefault("config", {})["spark_session"] = "none"
    path.write_text(json.dumps(spec))
    gw = GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(specs)], "launch_timeout": 240, "max_launch_timeout": 300,
                    "heartbeat_interval": 1},
        "drivers": {"yarn": yarn_settings(yarn_cluster, tmp)},
    })
    try:
        kernel_id = gw.client.start_kernel("spark_python_yarn_cluster")
        sock = gw.client.connect(kernel_id)
        try:
            assert sock.execute("print('spark' in dir(), 'sc' in dir())", timeout=120).stdout.split() == [
                "False", "False"]
        finally:
            sock.close()
            assert gw.client.delete_kernel(kernel_id) == 204
    finally:
        gw.stop()
