"""A Scala kernel (Apache Toree) as a plain kernel of egd's yarn driver, on the real MiniYARNCluster.

Toree's newest release (``toree`` 0.5.0 on PyPI, ``toree-assembly-0.5.0-incubating.jar``) is built for Scala 2.12 /
Spark 3.x; the test environment's pyspark 4 is Scala 2.13, which Toree cannot run on. So
``tests/services/install-toree.sh`` puts a Spark that Toree supports (pyspark 3.5.9: Spark 3.5.9, Scala 2.12) and
Toree into a virtualenv of their own under ``~/.cache`` (once; never into the tox environment).

The kernel runs as egd runs any non-Python kernel on YARN: DistributedShell's ApplicationMaster starts egd's
launcher in a container, the launcher chooses the five ports, writes the connection file and starts the
kernelspec's argv, here Spark 3.5's ``spark-submit`` of ``org.apache.toree.Main``, the Spark driver in that
container. Spark runs in local mode there (``toree_yarn``), or in YARN client mode (``toree_yarn_client``): its
executors are then a second YARN application on the same cluster, which Spark (not egd) submits and ends. Nothing
in the container's environment is inherited from here (YARN clears it): the kernelspec's ``env`` carries
``SPARK_HOME``, ``HADOOP_CONF_DIR`` and the loopback settings.

The SparkContext is created before the kernel reports ready (Toree's ``--spark-context-initialization-mode
eager``): Toree's SIGINT handler cancels Spark jobs first, and on a lazily started kernel whose SparkContext does not
exist yet that handler fails (``NoClassDefFoundError: org.apache.spark.package$`` in the "SIGINT handler" thread)
and the cell is not interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.client import Execution, GatewayClient, KernelSocket
from tests.conftest import GatewayProcess, processes_mentioning, wait_until
from tests.test_yarn import FINAL, app_of, tags, yarn_settings
from tests.yarncluster import YarnCluster

pytestmark = pytest.mark.yarn

INSTALLER = Path(__file__).resolve().parent / "services" / "install-toree.sh"
DEFAULT_CACHE = Path.home() / ".cache" / "egd-toree" / "spark-3.5.9-toree-0.5.0"
TOREE_JAR = "toree-assembly-0.5.0-incubating.jar"
SPEC = "toree_yarn"
SPEC_CLIENT = "toree_yarn_client"
#: The tag of the YARN application Toree's Spark (client mode) runs its executors in.
EXECUTORS_TAG = "egd-toree-executors"
#: How long a Toree kernel may take to start in a container (DS AM + spark-submit + SparkContext + Scala REPL),
#: on a 2-core box: measured 20-40 s, with room for a loaded CI machine.
LAUNCH_TIMEOUT = 240


@dataclass(frozen=True)
class Toree:
    """Where the cached Spark 3.5 and Toree are."""

    spark_home: Path
    jar: Path


def install_toree(timeout: float = 900) -> Toree:
    """Run ``tests/services/install-toree.sh`` (a no-op once the cache is complete); what it installed."""
    cache = Path(os.environ.get("EGD_TOREE_CACHE") or DEFAULT_CACHE)
    try:
        proc = subprocess.run(["sh", str(INSTALLER)], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "EGD_TOREE_CACHE": str(cache)})
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{INSTALLER} did not finish within {timeout}s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{INSTALLER} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    site = next((cache / "venv" / "lib").glob("python*/site-packages"))
    return Toree(site / "pyspark", site / "toree" / "lib" / TOREE_JAR)


@pytest.fixture(scope="module")
def toree(yarn_cluster: YarnCluster) -> Toree:
    """Spark 3.5 and Toree from the cache, installed first if needed. Without PyPI this skips, unless
    ``YARN_IT=1`` (tox, CI), where it is an error, as the YARN cluster's own fixture does."""
    try:
        return install_toree()
    except RuntimeError as e:
        if os.environ.get("YARN_IT") == "1":
            raise
        pytest.skip(f"could not install Spark 3.5 and Apache Toree: {e}")


def write_toree_spec(root: Path, name: str, toree: Toree, master: str, conf: dict[str, str] | None = None,
                     env: dict[str, str] | None = None) -> None:
    """A kernelspec: Toree through Spark 3.5's spark-submit (its driver in the container), on the yarn driver as a
    plain kernel (``mode: python``, i.e. DistributedShell, not a Spark cluster-mode driver)."""
    conf = {"spark.ui.enabled": "false", **(conf or {})}
    # java.io.tmpdir: the container's own tmp (relative to the kernel's working directory, the container's), so
    # what Spark and Toree leave there when YARN kills the JVM (spark-*, toree-tmp-dir*, native libraries) goes
    # with the container's directory rather than piling up in /tmp.
    argv = [str(toree.spark_home / "bin" / "spark-submit"), "--master", master, "--name", f"egd-{name}",
            "--driver-memory", "512m", "--driver-java-options", "-Djava.io.tmpdir=tmp"]
    for key, value in conf.items():
        argv += ["--conf", f"{key}={value}"]
    argv += ["--class", "org.apache.toree.Main", str(toree.jar),
             "--spark-context-initialization-mode", "eager", "--profile", "{connection_file}"]
    spec: dict[str, Any] = {
        "argv": argv, "display_name": f"Scala (Apache Toree, Spark {master}) on YARN", "language": "scala",
        "interrupt_mode": "signal",
        "env": {"SPARK_HOME": str(toree.spark_home), "SPARK_LOCAL_IP": "127.0.0.1",
                "SPARK_LOCAL_HOSTNAME": "localhost", **(env or {})},
        "metadata": {"egd": {"driver": "yarn", "launch_timeout": LAUNCH_TIMEOUT,
                             "config": {"mode": "python", "memory": "1g"}}},
    }
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "kernel.json").write_text(json.dumps(spec, indent=1))


@pytest.fixture(scope="module")
def toree_gw(yarn_cluster: YarnCluster, toree: Toree,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the yarn driver and the Toree kernelspec; at the end no application of it may still run."""
    tmp = tmp_path_factory.mktemp("toreegw")
    write_toree_spec(tmp / "specs", SPEC, toree, "local[2]")
    write_toree_spec(tmp / "specs", SPEC_CLIENT, toree, "yarn", conf={
        "spark.submit.deployMode": "client",
        "spark.yarn.jars": f"local:{toree.spark_home}/jars/*",
        "spark.yarn.stagingDir": f"file://{tmp}/spark-staging",
        "spark.yarn.tags": EXECUTORS_TAG,
        "spark.yarn.am.memory": "256m",
        "spark.executor.instances": "1",
        "spark.executor.memory": "512m",
        "spark.yarn.appMasterEnv.SPARK_LOCAL_IP": "127.0.0.1",
        "spark.executorEnv.SPARK_LOCAL_IP": "127.0.0.1",
        "spark.yarn.appMasterEnv.JAVA_HOME": str(yarn_cluster.java_home),
        "spark.executorEnv.JAVA_HOME": str(yarn_cluster.java_home),
    }, env={"HADOOP_CONF_DIR": str(yarn_cluster.conf_dir), "YARN_CONF_DIR": str(yarn_cluster.conf_dir)})
    gw = GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(tmp / "specs")], "launch_timeout": LAUNCH_TIMEOUT,
                    "max_launch_timeout": 300, "heartbeat_interval": 1},
        "drivers": {"yarn": yarn_settings(yarn_cluster, tmp)},
    })
    yield gw
    gw.stop()
    live = [a["id"] for a in yarn_cluster.apps(applicationTags="egd") if a["state"] not in FINAL]
    assert not live, f"applications left running: {live}"


def execute(sock: KernelSocket, code: str, timeout: float = 120) -> Execution:
    """Run a cell that has output, and wait for that output too: Toree publishes a cell's execute_result and
    stream output from another thread than its status messages, so they may come after the ``idle`` that ends
    :meth:`KernelSocket.execute` (seen here: ``sc.master`` answered with ``idle`` and no result)."""
    msg = sock.request("execute_request", {"code": code, "silent": False, "store_history": True,
                                           "user_expressions": {}, "allow_stdin": False})
    run = sock.wait_for(msg, timeout)
    deadline = time.monotonic() + 10
    while run.reply["content"]["status"] == "ok" and run.result is None and not run.stdout:
        m = sock.recv(max(0.1, deadline - time.monotonic()))
        if m.get("parent_header", {}).get("msg_id") == msg["header"]["msg_id"] and m["channel"] == "iopub":
            run.messages.append(m)
    return run


def where(sock: KernelSocket) -> tuple[str, int]:
    """The YARN container the kernel's JVM runs in, and that JVM's pid (asked in Scala)."""
    run = execute(sock, 'println(sys.env.getOrElse("CONTAINER_ID", "none") + " " + ProcessHandle.current.pid)')
    assert run.reply["content"]["status"] == "ok", run.reply["content"]
    container, pid = run.stdout.split()
    return container, int(pid)


def gone(pid: int) -> bool:
    """Whether a process has ended (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_toree_scala_kernel_on_yarn(toree_gw: GatewayProcess, yarn_cluster: YarnCluster, toree: Toree) -> None:
    """A Toree kernel is a YARN application tagged with egd's tag and the kernel id; it answers kernel_info, runs
    Scala and a Spark job in its container; an interrupt stops a long cell and keeps its state; a restart runs it
    in a new application (old one final, old JVM gone, state gone); DELETE leaves no application and no process."""
    client: GatewayClient = toree_gw.client
    kernel_id = client.start_kernel(SPEC)
    apps: list[str] = []
    pids: list[int] = []
    try:
        first = app_of(client, kernel_id)
        apps.append(first)
        app = yarn_cluster.app(first)
        assert app["state"] == "RUNNING" and tags(app) == {"egd", kernel_id}, app
        sock = client.connect(kernel_id)
        info = sock.wait_for(sock.request("kernel_info_request", {}), timeout=30).reply["content"]
        assert info["language_info"]["name"] == "scala", info
        assert execute(sock, "1+1").result == "2"
        assert execute(sock, "sc.parallelize(1 to 10).sum", timeout=120).result == "55.0"
        assert execute(sock, "sc.master").result == "local[2]"
        assert (execute(sock, "util.Properties.versionNumberString").result or "").startswith("2.12.")
        container, pid = where(sock)
        pids.append(pid)
        assert container.startswith("container_") and first.split("_", 1)[1] in container, container

        # interrupt (SIGINT through the launcher): the sleeping cell ends at once, the REPL's state survives
        assert sock.execute("val survivor = 41").reply["content"]["status"] == "ok"
        msg = sock.request("execute_request", {"code": "Thread.sleep(120000); 0", "silent": False,
                                               "store_history": True, "user_expressions": {}, "allow_stdin": False})
        wait_until(lambda: client.kernel(kernel_id).json["execution_state"] == "busy", 20, what="busy")
        time.sleep(0.5)  # the cell is running in the REPL, not only received
        started = time.monotonic()
        assert client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {}).status == 204
        # Under load the REPL may not have begun the cell when the first interrupt lands (it is then lost, as in
        # Jupyter with Toree anywhere): interrupt again every 10 s, as a user would, until the cell ends.
        stop = threading.Event()

        def interrupt_again() -> None:
            while not stop.wait(10):
                client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {})

        again = threading.Thread(target=interrupt_again)
        again.start()
        try:
            run = sock.wait_for(msg, timeout=60)
        finally:
            stop.set()
            again.join()
        assert time.monotonic() - started < 40
        assert run.reply["content"]["status"] == "error", run.reply["content"]
        assert "InterruptedException" in run.reply["content"]["ename"] + run.reply["content"].get("evalue", "")
        assert execute(sock, "survivor + 1").result == "42"
        sock.close()

        # restart: a new application, the old one final and its JVM gone, the REPL's state gone
        assert client.request("POST", f"/api/kernels/{kernel_id}/restart", {}).status == 200
        second = app_of(client, kernel_id)
        apps.append(second)
        assert second != first
        assert yarn_cluster.app(first)["state"] in FINAL
        wait_until(lambda: gone(pids[0]), 30, what=f"the first kernel's JVM {pids[0]} to be gone")
        sock = client.connect(kernel_id)
        lost = sock.execute("survivor")
        assert lost.reply["content"]["status"] == "error", lost.reply["content"]
        assert execute(sock, "sc.parallelize(1 to 4).map(_ * 2).collect.sum", timeout=120).result == "20"
        container, pid = where(sock)
        pids.append(pid)
        assert second.split("_", 1)[1] in container, container
        sock.close()
    except BaseException:
        for app_id in apps:
            print(f"--- {app_id}: {yarn_cluster.app(app_id).get('state')}\n{yarn_cluster.app_logs(app_id)}")
        raise
    finally:
        status = client.delete_kernel(kernel_id)
    assert status == 204
    for app_id in apps:
        assert yarn_cluster.app(app_id)["state"] in FINAL
    for pid in pids:
        wait_until(lambda p=pid: gone(p), 30, what=f"kernel JVM {pid} to be gone")
    wait_until(lambda: not processes_mentioning(kernel_id), 30, what=f"no process of kernel {kernel_id}")
    wait_until(lambda: not processes_mentioning(str(toree.jar)), 30, what="no Toree JVM")
    assert not [a for a in yarn_cluster.apps(applicationTags=kernel_id) if a["state"] not in FINAL]


def test_toree_with_spark_executors_on_yarn(toree_gw: GatewayProcess, yarn_cluster: YarnCluster) -> None:
    """Toree's Spark in YARN client mode: the driver in the kernel's container, its executors in a YARN
    application of their own on the same cluster (Spark 3.5's Hadoop 3.3.4 client against the cluster's 3.4.1).
    egd does not own that application (it carries no kernel id, Spark submits it), so after DELETE it must end by
    itself when Toree stops its SparkContext; then nothing of the kernel is left."""
    client: GatewayClient = toree_gw.client
    kernel_id = client.start_kernel(SPEC_CLIENT)
    apps: list[str] = []
    try:
        apps.append(app_of(client, kernel_id))
        sock = client.connect(kernel_id)
        assert execute(sock, "sc.master").result == "yarn"
        executors = [a for a in yarn_cluster.apps(applicationTags=EXECUTORS_TAG) if a["state"] == "RUNNING"]
        assert len(executors) == 1, executors
        apps.append(executors[0]["id"])
        # Where the tasks ran: the container ids the executors see, all of the executors' application.
        ran = execute(sock, 'sc.parallelize(1 to 8, 2).map(_ => sys.env.getOrElse("CONTAINER_ID", "none"))'
                            '.collect.distinct.mkString(" ")', timeout=180).result or ""
        assert ran and all(apps[1].split("_", 1)[1] in c for c in ran.split()), (ran, apps)
        sock.close()
    except BaseException:
        for app_id in apps:
            print(f"--- {app_id}: {yarn_cluster.app(app_id).get('state')}\n{yarn_cluster.app_logs(app_id)}")
        raise
    finally:
        status = client.delete_kernel(kernel_id)
    assert status == 204
    for app_id in apps:
        wait_until(lambda a=app_id: yarn_cluster.app(a)["state"] in FINAL, 60, 0.5,
                   what=f"{app_id} to end")
    wait_until(lambda: not processes_mentioning(kernel_id), 30, what=f"no process of kernel {kernel_id}")
    # The executors' and Spark AM's JVMs name their application on their command lines.
    wait_until(lambda: not any(processes_mentioning(a) for a in apps), 30, what=f"no process of {apps}")
