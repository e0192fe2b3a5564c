"""Kernels as YARN applications on a real MiniYARNCluster (tests/yarncluster.py): plain kernels through
DistributedShell's AM and Spark drivers in cluster mode through spark-submit.

egd's yarn driver is configured with a dead ResourceManager first and the real one second, so every test here
also goes through the high-availability failover. Application states are read back from the RM itself.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client import BackgroundStart, GatewayClient, start_concurrently
from tests.conftest import KERNELSPECS, GatewayProcess, free_port, wait_until
from tests.test_lifecycle import interrupt_sleep, statuses_until
from tests.yarncluster import YarnCluster, spark_home

pytestmark = pytest.mark.yarn

FINAL = {"FINISHED", "FAILED", "KILLED"}
#: The DistributedShell AM's JVM on Java 17 with little CPU (flags from tests/yarn/jvm.flags' reasoning).
DS_AM_JAVA_OPTIONS = " ".join([
    "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-exports=java.base/sun.net.dns=ALL-UNNAMED", "--add-exports=java.base/sun.net.util=ALL-UNNAMED"])
APP_ID = re.compile(r"YARN application (application_\d+_\d+)")


def write_spec(root: Path, name: str, timeout: int, **config: Any) -> None:
    """A kernelspec for the yarn driver."""
    (root / name).mkdir(parents=True, exist_ok=True)
    spec = {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": name,
            "language": "python",
            "metadata": {"egd": {"driver": "yarn", "launch_timeout": timeout, "config": config}}}
    (root / name / "kernel.json").write_text(json.dumps(spec))


def yarn_settings(cluster: YarnCluster, tmp: Path, **extra: Any) -> dict[str, Any]:
    """The yarn driver's settings for the test cluster (everything on loopback, Spark from the pyspark wheel)."""
    home = spark_home()
    assert home is not None, "pyspark is not installed"
    dead_rm = f"http://127.0.0.1:{free_port()}"
    return {
        "resource_managers": [dead_rm, cluster.rm_url],
        "request_timeout": 5,
        "poll_interval": 1.0,
        "fast_poll_interval": 0.25,
        "callback_host": "127.0.0.1",
        "staging_dir": str(tmp / "staging"),
        "spark_home": str(home),
        "hadoop_conf_dir": str(cluster.conf_dir),
        "java_home": str(cluster.java_home),
        "env": {"SPARK_LOCAL_IP": "127.0.0.1",
                # pyspark's two zips as local: URIs, so nothing of pyspark is copied per application
                "PYSPARK_ARCHIVES_PATH": ",".join(f"local:{p}" for p in sorted(home.glob("python/lib/*.zip")))},
        "spark_conf": {
            "spark.yarn.jars": f"local:{home}/jars/*",
            "spark.yarn.stagingDir": f"file://{tmp}/spark-staging",
            "spark.ui.enabled": "false",
            "spark.yarn.appMasterEnv.SPARK_LOCAL_IP": "127.0.0.1",
            "spark.yarn.appMasterEnv.JAVA_HOME": str(cluster.java_home),
            "spark.executorEnv.SPARK_LOCAL_IP": "127.0.0.1",
            "spark.yarn.appMasterEnv.SPARK_LOCAL_HOSTNAME": "localhost",
        },
        "distributed_shell": {"classpath": f"{cluster.conf_dir}<CPS>{cluster.lib_ds}/*",
                              "am_java_options": f"{DS_AM_JAVA_OPTIONS} "
                                                 f"-Dlog4j.configuration=file:{cluster.log4j_properties}"},
        **extra,
    }


def yarn_gateway(cluster: YarnCluster, tmp: Path, state: dict[str, Any] | None = None,
                 **extra: Any) -> GatewayProcess:
    """egd with the yarn driver and this module's kernelspecs (``state``: its state section)."""
    specs = tmp / "specs"
    write_spec(specs, "yarn_python", 120, mode="python", memory="256m")
    write_spec(specs, "yarn_spark", 240, mode="spark", num_executors=1, max_executors=1)
    write_spec(specs, "yarn_spark_small", 240, mode="spark", queues=["small"], max_memory="4g")
    return GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(KERNELSPECS), str(specs)], "launch_timeout": 120,
                    "heartbeat_interval": 1, "max_launch_timeout": 300},
        "drivers": {"local": {}, "yarn": yarn_settings(cluster, tmp, **extra)},
        **({"state": state} if state else {}),
    })


@pytest.fixture(scope="module")
def yarn_gw(yarn_cluster: YarnCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the yarn driver, shared by this module; at the end no application of it may still run."""
    gw = yarn_gateway(yarn_cluster, tmp_path_factory.mktemp("yarngw"))
    yield gw
    stop_leaving_no_application(gw, yarn_cluster)


def stop_leaving_no_application(gw: GatewayProcess, cluster: YarnCluster) -> None:
    """Stop ``gw``; then no application egd submitted may still run on ``cluster``."""
    gw.stop()
    live = [a["id"] for a in cluster.apps(applicationTags="egd") if a["state"] not in FINAL]
    assert not live, f"applications left running: {live}"


@pytest.fixture
def client(yarn_gw: GatewayProcess) -> GatewayClient:
    """A client of the yarn gateway."""
    return yarn_gw.client


def app_of(client: GatewayClient, kernel_id: str) -> str:
    """The application egd reports for a kernel (its model's ``location``)."""
    model = client.kernel(kernel_id).json
    match = APP_ID.search(model.get("location", ""))
    assert match, model
    return match.group(1)


def tags(app: dict[str, Any]) -> set[str]:
    """An application's tags."""
    return set(str(app.get("applicationTags") or "").split(","))


def test_plain_kernel_runs_code_reports_host_and_is_killed_on_delete(client: GatewayClient,
                                                                    yarn_cluster: YarnCluster,
                                                                    yarn_gw: GatewayProcess) -> None:
    """A plain kernel is a YARN application tagged with egd's tag and the kernel id; it runs code in a YARN
    container; DELETE leaves the application final and no process behind."""
    kernel_id = client.start_kernel("yarn_python")
    app_id = app_of(client, kernel_id)
    app = yarn_cluster.app(app_id)
    assert app["state"] == "RUNNING" and tags(app) == {"egd", kernel_id}
    sock = client.connect(kernel_id)
    out = sock.execute("import os, socket; print(socket.gethostname(), os.environ['CONTAINER_ID'], "
                       "os.getpid())").stdout.split()
    sock.close()
    host, container, pid = out[0], out[1], int(out[2])
    assert container.startswith("container_") and app_id.split("_", 1)[1] in container
    assert host in client.kernel(kernel_id).json["location"]
    assert "failed over" in yarn_gw.log()  # the dead first RM was skipped
    assert client.delete_kernel(kernel_id) == 204
    assert yarn_cluster.app(app_id)["state"] in FINAL
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, what=f"kernel pid {pid} to be gone")


def test_interrupt_and_restart(client: GatewayClient, yarn_cluster: YarnCluster) -> None:
    """Interrupt stops a long cell; restart keeps the kernel id and runs it in a new application."""
    kernel_id = client.start_kernel("yarn_python")
    first = app_of(client, kernel_id)
    try:
        interrupt_sleep(client, kernel_id)
        assert client.request("POST", f"/api/kernels/{kernel_id}/restart", {}).status == 200
        second = app_of(client, kernel_id)
        assert second != first
        assert yarn_cluster.app(first)["state"] in FINAL
        sock = client.connect(kernel_id)
        assert sock.execute("survivor").reply["content"]["ename"] == "NameError"
        sock.close()
    finally:
        client.delete_kernel(kernel_id)


def test_application_killed_from_outside_is_noticed(client: GatewayClient, yarn_cluster: YarnCluster) -> None:
    """YARN kills the application (an operator's PUT .../state): the clients hear ``restarting`` within the
    poll interval and the kernel comes back in a new application."""
    kernel_id = client.start_kernel("yarn_python")
    first = app_of(client, kernel_id)
    try:
        sock = client.connect(kernel_id)
        killed_at = time.monotonic()
        yarn_cluster.kill(first)
        assert "restarting" in statuses_until(sock, "restarting", 30)
        noticed = time.monotonic() - killed_at
        assert noticed < 10, f"noticed after {noticed:.1f}s"
        sock.close()
        wait_until(lambda: client.kernel(kernel_id).json.get("location"), 120, 0.5, what="the restarted kernel")
        assert app_of(client, kernel_id) != first
        sock = client.connect(kernel_id)
        assert sock.execute("print(6 * 7)").stdout.strip() == "42"
        sock.close()
    finally:
        client.delete_kernel(kernel_id)


def test_two_kernels_at_once(client: GatewayClient, yarn_cluster: YarnCluster) -> None:
    """Two concurrent POSTs: two applications, two kernels that each run code."""
    ids, errors = start_concurrently(client, "yarn_python", 2, 180)
    try:
        assert not errors and len(ids) == 2
        assert len({app_of(client, k) for k in ids}) == 2
        for kernel_id in ids:
            sock = client.connect(kernel_id)
            assert sock.execute(f"print('{kernel_id[:8]}')").stdout.strip() == kernel_id[:8]
            sock.close()
    finally:
        for kernel_id in ids:
            client.delete_kernel(kernel_id)


def test_kernel_waiting_in_queue_fails_at_timeout_with_diagnostics(client: GatewayClient,
                                                                   yarn_cluster: YarnCluster) -> None:
    """Asked beyond its queue's capacity, the kernel's model shows YARN's waiting diagnostics; at the launch
    timeout the POST is a 503 carrying them, and the application is killed, not left behind."""
    result: dict[str, Any] = {}

    def start() -> None:
        result["resp"] = client.request("POST", "/api/kernels", {
            "name": "yarn_spark_small", "env": {"KERNEL_DRIVER_MEMORY": "3g", "KERNEL_LAUNCH_TIMEOUT": "45"}},
            timeout=120)

    thread = threading.Thread(target=start)
    thread.start()

    def waiting() -> dict[str, Any] | None:
        for model in client.request("GET", "/api/kernels").json:
            if model["name"] == "yarn_spark_small" and "ACCEPTED" in model.get("reason", ""):
                return dict(model)
        return None

    model = wait_until(waiting, 90, 0.5, what="the kernel model to show the ACCEPTED state")
    thread.join(120)
    resp = result["resp"]
    assert resp.status == 503, resp.json
    assert "ACCEPTED in queue root.small" in resp.json["message"]
    assert "waiting for resources to be assigned for AM" in resp.json["message"]  # YARN's own words
    apps = yarn_cluster.apps(applicationTags=model["id"])
    assert apps and all(a["state"] in FINAL for a in apps), apps
    assert client.kernel(model["id"]).status == 404


def test_spark_kernel_in_cluster_mode(client: GatewayClient, yarn_cluster: YarnCluster) -> None:
    """A Spark driver in cluster mode: ``spark`` and ``sc`` are ready, a job runs on an executor, and
    ``sc.applicationId`` is the application egd reports; a restart finds its new application by tag."""
    kernel_id = client.start_kernel("yarn_spark")
    apps = []
    try:
        apps.append(app_of(client, kernel_id))
        sock = client.connect(kernel_id)
        run = sock.execute("print(spark.range(1000).groupBy().sum('id').first()[0], sc.applicationId)",
                           timeout=180)
        sock.close()
        total, reported = run.stdout.split()
        assert total == "499500" and reported == apps[0]
        assert tags(yarn_cluster.app(apps[0])) == {"egd", kernel_id}
        assert client.request("POST", f"/api/kernels/{kernel_id}/restart", {}, timeout=300).status == 200
        apps.append(app_of(client, kernel_id))
        assert apps[1] != apps[0] and yarn_cluster.app(apps[0])["state"] in FINAL
        sock = client.connect(kernel_id)
        assert sock.execute("print(sc.applicationId)", timeout=60).stdout.strip() == apps[1]
        sock.close()
    finally:
        assert client.delete_kernel(kernel_id) == 204
    assert all(yarn_cluster.app(a)["state"] in FINAL for a in apps)


def test_jupyter_server_drives_a_yarn_kernel(yarn_gw: GatewayProcess, yarn_cluster: YarnCluster,
                                             tmp_path: Path) -> None:
    """An unchanged Jupyter Server with --gateway-url runs a cell in a kernel that is a YARN application."""
    from tests.test_jupyter_server import JupyterServer

    server = JupyterServer(yarn_gw.url, tmp_path)
    try:
        kernel_id = server.start_kernel("yarn_python")
        sock = server.connect(kernel_id)
        assert sock.execute("import os; print(os.environ['CONTAINER_ID'][:10])").stdout.strip() == "container_"
        sock.close()
        app_id = app_of(yarn_gw.client, kernel_id)
        assert server.client.request("DELETE", f"/api/kernels/{kernel_id}").status == 204
        assert yarn_gw.client.kernel(kernel_id).status == 404
        assert yarn_cluster.app(app_id)["state"] in FINAL
    finally:
        server.stop()


def test_impersonation_runs_the_application_as_the_kernel_user(yarn_cluster: YarnCluster, tmp_path: Path) -> None:
    """With impersonation, the application's YARN user is the kernel's user (the kernel sees it as USER);
    root and prohibited users are refused with 403 and nothing is submitted."""
    gw = yarn_gateway(yarn_cluster, tmp_path, impersonation=True, prohibited_users=["hdfs"])
    try:
        client = gw.client
        kernel_id = client.start_kernel("yarn_python", env={"KERNEL_USERNAME": "alice"})
        app_id = app_of(client, kernel_id)
        assert yarn_cluster.app(app_id)["user"] == "alice"
        sock = client.connect(kernel_id)
        assert sock.execute("import os; print(os.environ['USER'])").stdout.strip() == "alice"
        sock.close()
        assert client.delete_kernel(kernel_id) == 204
        spark_id = client.start_kernel("yarn_spark", env={"KERNEL_USERNAME": "alice"})  # spark-submit --proxy-user
        assert yarn_cluster.app(app_of(client, spark_id))["user"] == "alice"
        sock = client.connect(spark_id)
        assert sock.execute("print(sc.sparkUser())", timeout=120).stdout.strip() == "alice"
        sock.close()
        assert client.delete_kernel(spark_id) == 204
        since = int(time.time() * 1000)
        for user in ("root", "hdfs", "-oProxyCommand=x", "Alice Smith"):
            resp = client.request("POST", "/api/kernels", {"name": "yarn_python", "env": {"KERNEL_USERNAME": user}})
            assert resp.status == 403, (user, resp.json)
            assert "cannot run as user" in resp.json["message"]
        assert not yarn_cluster.apps(startedTimeBegin=since), "an application was submitted for a refused user"
    finally:
        gw.stop()


def test_kill_9_then_restart_reattaches_a_yarn_kernel(yarn_cluster: YarnCluster, tmp_path: Path) -> None:
    """egd is SIGKILLed while a YARN kernel runs; the next egd with the same state finds the same application
    running (RM) and its launcher answering (signed ping), and serves the kernel with its variables; DELETE
    then ends the application."""
    state = {"path": str(tmp_path / "state.sqlite"), "on_stop": "keep"}
    first = yarn_gateway(yarn_cluster, tmp_path, state)
    kernel_id = first.client.start_kernel("yarn_python")
    app_id = app_of(first.client, kernel_id)
    sock = first.client.connect(kernel_id)
    sock.execute("w = 'kept in YARN'")
    sock.close()
    first.proc.kill()
    first.proc.wait(10)
    first.stop()
    second = yarn_gateway(yarn_cluster, tmp_path, {**state, "on_stop": "shutdown"})
    try:
        assert [k["id"] for k in second.client.request("GET", "/api/kernels").json] == [kernel_id]
        assert app_of(second.client, kernel_id) == app_id
        sock = second.client.connect(kernel_id)
        assert sock.execute("print(w)").stdout.strip() == "kept in YARN"
        sock.close()
        assert second.client.delete_kernel(kernel_id) == 204
        assert yarn_cluster.app(app_id)["state"] in FINAL
    finally:
        second.stop()


def test_stop_abandons_a_launch_in_yarn(yarn_cluster: YarnCluster, tmp_path: Path) -> None:
    """SIGTERM while a Spark kernel is being submitted or starting in YARN: the client gets a 503, egd exits
    without waiting for the launch timeout, and no application of that kernel is left running."""
    gw = yarn_gateway(yarn_cluster, tmp_path)
    start = BackgroundStart(gw.client, {"name": "yarn_spark"})
    kernel_id = wait_until(lambda: next((k["id"] for k in gw.client.request("GET", "/api/kernels").json), None),
                           30, what="the starting kernel")
    wait_until(lambda: yarn_cluster.apps(applicationTags=kernel_id), 120, what="the kernel's application")
    began = time.monotonic()
    assert gw.stop(timeout=60) == 0
    assert time.monotonic() - began < 45
    assert start.response(10).status == 503
    wait_until(lambda: all(a["state"] in FINAL for a in yarn_cluster.apps(applicationTags=kernel_id)), 30,
               what="the kernel's application to end")
