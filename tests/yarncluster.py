"""A real Hadoop YARN cluster for the tests: one JVM with a ResourceManager and a NodeManager (``MiniYARNCluster``).

What runs (see ``tests/yarn/``)::

    java @tests/yarn/jvm.flags -cp "<cache>/lib/*" tests/yarn/MiniYarn.java <work>/conf \
         yarn.resourcemanager.<5 addresses>=127.0.0.1:<port>
        cwd <work>/run (MiniYARNCluster wipes ./target), stdin a pipe from this process (EOF stops the cluster)

* The jars (an unshaded Hadoop 3.4.1 MiniYARNCluster, and the DistributedShell ApplicationMaster's closure) come
  from Maven Central through ``tests/services/install-yarn.sh`` into ``$EGD_YARN_CACHE`` (default
  ``~/.cache/egd-yarn/3.4.1``), once; ``start()`` runs it when the cache is incomplete. Without Maven Central the
  ``yarn_cluster`` fixture skips, unless ``YARN_IT=1`` is set (CI), where that is an error.
* Everything listens on loopback: the five RM ports are chosen free here and passed in, so a stale cluster or a
  second test run cannot collide; the NodeManager takes ephemeral ports under ``localhost``.
* ``conf_dir`` is a complete ``HADOOP_CONF_DIR`` (``yarn-site.xml`` is the whole effective configuration, 1600
  keys, ``core-site.xml`` sets ``fs.defaultFS=file:///``): give it to ``spark-submit`` and DistributedShell.
* The RM REST API answers at ``rm_url`` in the documented JSON shapes (``{"apps": {"app": [...]}}``,
  ``application-id``...). The NodeManager's own web UI/REST API is *not* usable (both webapps share Guice's static
  filter pipeline; MiniYarn.java points it at the RM's), so read container logs from disk: ``app_log_dir()``.
* Containers run as the user running the tests (DefaultContainerExecutor), with a **cleared environment**: only
  ``JAVA_HOME`` (and the few other ``yarn.nodemanager.env-whitelist`` variables bash does not set itself) comes
  from the cluster; ``PATH`` is bash's built-in default (``/usr/local/bin:...:.``), not ours. Name interpreters
  by absolute path and pass any other variable explicitly (DS: in the script or ``--shell_env``; Spark:
  ``spark.yarn.appMasterEnv.*``).
* ``stop()`` closes the pipe and SIGTERMs the JVM (its shutdown hook stops the NM, which kills its containers),
  waits 30 s, then SIGKILLs it and sweeps any container process left, found by ``/proc/<pid>/cwd`` under the
  work directory.

Usage::

    def test_something(yarn_cluster):
        app_id = yarn_cluster.new_application()
        yarn_cluster.submit(ds_submission(yarn_cluster, app_id, "kernel-x", script))
        yarn_cluster.wait_for_state(app_id, {"RUNNING"})
        yarn_cluster.kill(app_id)
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import is_zombie_or_gone

HERE = Path(__file__).resolve().parent
YARN_DIR = HERE / "yarn"
INSTALLER = HERE / "services" / "install-yarn.sh"
DEFAULT_CACHE = Path.home() / ".cache" / "egd-yarn" / "3.4.1"
#: The five RM addresses MiniYarn.java is given (each ``127.0.0.1:<free port>``); the web one is ``rm_url``.
RM_PORT_KEYS = (
    "yarn.resourcemanager.address",
    "yarn.resourcemanager.scheduler.address",
    "yarn.resourcemanager.resource-tracker.address",
    "yarn.resourcemanager.admin.address",
    "yarn.resourcemanager.webapp.address",
)
FINAL_STATES = frozenset({"FINISHED", "FAILED", "KILLED"})
#: The NM's logical capacity and the largest container, as MiniYarn.java configures them.
NM_MEMORY_MB = 12288
MAX_ALLOCATION_MB = 4096


class YarnClusterError(RuntimeError):
    """The cluster could not be installed, started or stopped."""


def cache_dir() -> Path:
    return Path(os.environ.get("EGD_YARN_CACHE") or DEFAULT_CACHE)


def cache_complete(cache: Path | None = None) -> bool:
    cache = cache or cache_dir()
    return (cache / ".complete").is_file() and (cache / "lib").is_dir() and (cache / "lib-ds").is_dir()


def install(timeout: float = 900) -> None:
    """Run ``tests/services/install-yarn.sh`` (fetch the jars; make the host name resolve to loopback)."""
    try:
        proc = subprocess.run(["sh", str(INSTALLER)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise YarnClusterError(f"{INSTALLER} did not finish within {timeout}s") from e
    if proc.returncode != 0:
        raise YarnClusterError(f"{INSTALLER} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def find_java_home() -> Path | None:
    """``$JAVA_HOME``, else the JDK of the ``java`` on PATH (symlinks resolved); None without Java."""
    env = os.environ.get("JAVA_HOME")
    if env and os.access(os.path.join(env, "bin", "java"), os.X_OK):
        return Path(env)
    java = shutil.which("java")
    if java is None:
        return None
    return Path(os.path.realpath(java)).parent.parent


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster at all (before any download), or None."""
    if sys.platform != "linux":
        return "the YARN test cluster needs Linux (/proc)"
    if os.geteuid() == 0:
        return None  # tests/services/install-yarn.sh installs Java and Maven when they are missing
    if find_java_home() is None:
        return "the YARN test cluster needs Java 17 (`java` on PATH or JAVA_HOME), or root to install it"
    if not cache_complete() and shutil.which("mvn") is None:
        return "the YARN test cluster needs Maven (`mvn`) to fetch its jars, or root to install it"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pids_with_cwd_under(directory: Path | str) -> list[int]:
    """Processes whose current directory is ``directory`` or below it."""
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if (cwd.rstrip("/") + "/").startswith(prefix) and not is_zombie_or_gone(int(entry)):
            found.append(int(entry))
    return found


class YarnCluster:
    """One MiniYARNCluster (1 RM + 1 NM) in its own JVM, on loopback; see the module docstring."""

    def __init__(self, root: Path | str, cache: Path | None = None) -> None:
        self.cache = Path(cache) if cache else cache_dir()
        self.lib = self.cache / "lib"
        #: The DistributedShell ApplicationMaster's classpath (``<lib_ds>/*``).
        self.lib_ds = self.cache / "lib-ds"
        self.work_dir = Path(tempfile.mkdtemp(prefix="yarn-", dir=str(root)))
        #: HADOOP_CONF_DIR / YARN_CONF_DIR for clients (written by the cluster once it runs).
        self.conf_dir = self.work_dir / "conf"
        self.run_dir = self.work_dir / "run"
        self.log_path = self.work_dir / "miniyarn.log"
        self.log4j_properties = YARN_DIR / "log4j.properties"
        java_home = find_java_home()
        if java_home is None:
            raise YarnClusterError("no Java: set JAVA_HOME or put java on PATH")
        self.java_home = java_home
        self.ports: dict[str, int] = {}
        self.rm_url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 120) -> None:
        if not cache_complete(self.cache):
            install()
        for attempt in range(2):  # a port taken between choosing and binding: once more with new ones
            try:
                self._start_once(timeout)
                return
            except YarnClusterError as e:
                self._kill_jvm()
                if attempt == 0 and "Address already in use" in str(e):
                    continue
                raise

    def _start_once(self, timeout: float) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.conf_dir, ignore_errors=True)
        ports = _free_ports(len(RM_PORT_KEYS))
        taken = [p for p in ports if not _port_free(p)]
        if taken:
            raise YarnClusterError(f"ports {taken} are taken (Address already in use)")
        self.ports = dict(zip(RM_PORT_KEYS, ports, strict=True))
        self.rm_url = f"http://127.0.0.1:{self.ports['yarn.resourcemanager.webapp.address']}"
        argv = [
            str(self.java_home / "bin" / "java"),
            f"@{YARN_DIR / 'jvm.flags'}",
            f"-Dlog4j.configuration=file:{self.log4j_properties}",
            "-cp", f"{self.lib}/*",
            str(YARN_DIR / "MiniYarn.java"),
            str(self.conf_dir),
            *(f"{key}=127.0.0.1:{port}" for key, port in self.ports.items()),
        ]
        env = dict(os.environ)
        env["JAVA_HOME"] = str(self.java_home)
        env["SPARK_LOCAL_IP"] = "127.0.0.1"
        # Only reaches containers through launch_container.sh's ${PATH:-...}, which bash's default PATH wins.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", os.defpath)])
        if self._log is None:
            self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=self.run_dir, env=env, stdin=subprocess.PIPE, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        ready = self.conf_dir / "READY"
        while True:
            if self.proc.poll() is not None:
                raise YarnClusterError(f"the YARN cluster exited with {self.proc.returncode}:\n{self.log_tail()}")
            if ready.exists():
                try:
                    metrics = self.get("/ws/v1/cluster/metrics")["clusterMetrics"]
                except (OSError, ValueError, KeyError):
                    metrics = {}
                if metrics.get("activeNodes") == 1:
                    return
            if time.monotonic() > deadline:
                raise YarnClusterError(f"the YARN cluster was not ready within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 30) -> None:
        """Stop the JVM (its NM kills the containers); SIGKILL it and sweep containers if it does not stop."""
        problems = []
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"the YARN cluster did not stop within {timeout}s of SIGTERM")
        self._kill_jvm()
        left = self.sweep()
        if left:
            problems.append(f"container processes left after the cluster stopped: {left}")
        if self._log is not None:
            self._log.close()
            self._log = None
        if problems:
            raise YarnClusterError("; ".join(problems))

    def _kill_jvm(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def sweep(self, timeout: float = 5) -> list[int]:
        """SIGKILL every process running inside the work directory (containers of a killed cluster)."""
        for _ in range(3):  # a dying process group may still fork
            pids = pids_with_cwd_under(self.work_dir)
            if not pids:
                return []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not all(is_zombie_or_gone(p) for p in pids):
                time.sleep(0.05)
        return pids_with_cwd_under(self.work_dir)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ processes and files
    def nm_dirs(self) -> list[Path]:
        """The NodeManager's local (container working directories) and log directories."""
        return [Path(p) for p in sorted(glob.glob(str(self.run_dir / "target" / "test" / "data" / "miniyarn" / "*"
                                                      / "miniyarn-*Dir-nm-*")))]

    def container_processes(self) -> list[int]:
        """Pids of the processes running in a container (their cwd is inside the NM's directories)."""
        return pids_with_cwd_under(self.run_dir / "target")

    def app_log_dir(self, app_id: str) -> Path | None:
        """``.../miniyarn-logDir-nm-0_0/<app_id>``: one directory per container (stdout, stderr, launch script)."""
        found = glob.glob(str(self.run_dir / "target" / "test" / "data" / "miniyarn" / "*" / "miniyarn-logDir-nm-*"
                              / app_id))
        return Path(found[0]) if found else None

    def app_logs(self, app_id: str) -> str:
        """Every container log file of an app, concatenated with headers (for assertion messages)."""
        base = self.app_log_dir(app_id)
        if base is None:
            return f"(no logs for {app_id})"
        parts = []
        for path in sorted(base.glob("*/*")):
            if path.is_file() and path.name not in ("launch_container.sh", "directory.info"):
                parts.append(f"==> {path.relative_to(base)} <==\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ RM REST (blocking; tests only)
    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
                timeout: float = 15) -> tuple[int, Any]:
        """``(status, parsed JSON body or None)``; HTTP errors are returned, not raised."""
        url = self.rm_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Accept": "application/json", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, (json.loads(raw) if raw else None)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, **params: Any) -> Any:
        status, body = self.request("GET", path, params=params or None)
        if status != 200:
            raise YarnClusterError(f"GET {path} answered {status}: {body}")
        return body

    def info(self) -> dict[str, Any]:
        return self.get("/ws/v1/cluster/info")["clusterInfo"]

    def metrics(self) -> dict[str, Any]:
        return self.get("/ws/v1/cluster/metrics")["clusterMetrics"]

    def apps(self, **params: Any) -> list[dict[str, Any]]:
        """``GET /ws/v1/cluster/apps`` with query parameters (``applicationTags=``, ``states=``...)."""
        body = self.get("/ws/v1/cluster/apps", **params)
        return list((body.get("apps") or {}).get("app") or [])  # {"apps": {}} when nothing matches

    def app(self, app_id: str) -> dict[str, Any]:
        return self.get(f"/ws/v1/cluster/apps/{app_id}")["app"]

    def new_application(self, user: str | None = None) -> str:
        status, body = self.request("POST", "/ws/v1/cluster/apps/new-application", params=_user(user))
        if status != 200:
            raise YarnClusterError(f"new-application answered {status}: {body}")
        return str(body["application-id"])

    def submit(self, body: dict[str, Any], user: str | None = None) -> None:
        status, answer = self.request("POST", "/ws/v1/cluster/apps", body, params=_user(user))
        if status != 202:
            raise YarnClusterError(f"submitting {body.get('application-id')} answered {status}: {answer}")

    def wait_for_state(self, app_id: str, states: Iterable[str], timeout: float = 120,
                       interval: float = 0.25) -> dict[str, Any]:
        """Poll the app until its state is in ``states``; fail early (with its logs) if it ends otherwise."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            app = self.app(app_id)
            if app["state"] in wanted:
                return app
            if app["state"] in FINAL_STATES:
                raise YarnClusterError(f"{app_id} ended {app['state']}/{app.get('finalStatus')}: "
                                       f"{app.get('diagnostics')}\n{self.app_logs(app_id)}")
            if time.monotonic() > deadline:
                raise YarnClusterError(f"{app_id} still {app['state']} after {timeout}s: {app.get('diagnostics')}\n"
                                       f"{self.app_logs(app_id)}")
            time.sleep(interval)

    def kill(self, app_id: str, user: str | None = None, timeout: float = 30) -> list[int]:
        """``PUT .../state {"state": "KILLED"}`` until the RM answers 200; the HTTP statuses seen, in order."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            status, body = self.request("PUT", f"/ws/v1/cluster/apps/{app_id}/state", {"state": "KILLED"},
                                        params=_user(user))
            seen.append(status)
            if status == 200:
                return seen
            if status != 202:
                raise YarnClusterError(f"killing {app_id} answered {status}: {body}")
            if time.monotonic() > deadline:
                raise YarnClusterError(f"{app_id} not killed after {timeout}s: {body}")
            time.sleep(0.25)


def _user(user: str | None) -> dict[str, str] | None:
    return {"user.name": user} if user else None


# ---------------------------------------------------------------------- submissions (test-side helpers)
DS_AM_CLASS = "org.apache.hadoop.yarn.applications.distributedshell.ApplicationMaster"


def ds_submission(cluster: YarnCluster, app_id: str, name: str, script: Path | str, tags: Iterable[str] = (),
                  am_mb: int = 256, container_mb: int = 512, shell_env: dict[str, str] | None = None,
                  application_type: str = "JUPYTER") -> dict[str, Any]:
    """The RM REST body that runs ``script`` (``bash script``) in one container under a DistributedShell AM.

    ``script`` should end in ``.sh``: the DS AM renames a script without that suffix *in place* (its source file).
    """
    script = Path(script).resolve()
    st = script.stat()
    shell_env_args = "".join(f" --shell_env {k}={v}" for k, v in (shell_env or {}).items())
    command = (
        "{{JAVA_HOME}}/bin/java -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
        " --add-opens=java.base/java.lang=ALL-UNNAMED"
        " --add-exports=java.base/sun.net.dns=ALL-UNNAMED --add-exports=java.base/sun.net.util=ALL-UNNAMED"
        f" -Dlog4j.configuration=file:{cluster.log4j_properties}"
        f" {DS_AM_CLASS}"
        f" --container_memory {container_mb} --container_vcores 1 --num_containers 1 --priority 0{shell_env_args}"
        " 1><LOG_DIR>/AppMaster.stdout 2><LOG_DIR>/AppMaster.stderr"
    )
    env = {
        "CLASSPATH": f"{cluster.conf_dir}<CPS>{cluster.lib_ds}/*",
        "DISTRIBUTEDSHELLSCRIPTLOCATION": f"file://{script}",
        "DISTRIBUTEDSHELLSCRIPTTIMESTAMP": str(st.st_mtime_ns // 1_000_000),
        "DISTRIBUTEDSHELLSCRIPTLEN": str(st.st_size),
    }
    return {
        "application-id": app_id,
        "application-name": name,
        "application-type": application_type,
        "queue": "default",
        "max-app-attempts": 1,
        "unmanaged-AM": False,
        "keep-containers-across-application-attempts": False,
        "resource": {"memory": am_mb, "vCores": 1},
        "application-tags": {"tag": [t.lower() for t in tags]},
        "am-container-spec": {
            "commands": {"command": command},
            "environment": {"entry": [{"key": k, "value": v} for k, v in env.items()]},
        },
    }


def spark_home() -> Path | None:
    """The pip-installed pyspark's SPARK_HOME (``jars/``, ``bin/spark-submit``), or None."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent


def spark_submit(cluster: YarnCluster, program: Path | str, name: str, tags: Iterable[str] = (),
                 args: Iterable[str] = (), executors: int = 0, python: str | None = None,
                 extra_conf: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` of ``spark-submit --master yarn --deploy-mode cluster`` for a Python program."""
    home = spark_home()
    if home is None:
        raise YarnClusterError("pyspark is not installed")
    python = python or sys.executable
    staging = cluster.work_dir / "spark-staging"
    staging.mkdir(exist_ok=True)
    conf = {
        "spark.yarn.tags": ",".join(t.lower() for t in tags),
        "spark.yarn.submit.waitAppCompletion": "false",
        "spark.yarn.maxAppAttempts": "1",
        "spark.yarn.jars": f"local:{home}/jars/*",
        "spark.yarn.stagingDir": f"file://{staging}",
        "spark.yarn.am.waitTime": "300s",
        "spark.yarn.appMasterEnv.PYSPARK_PYTHON": python,
        "spark.yarn.appMasterEnv.PYSPARK_DRIVER_PYTHON": python,
        "spark.yarn.appMasterEnv.SPARK_LOCAL_IP": "127.0.0.1",
        "spark.yarn.appMasterEnv.SPARK_LOCAL_HOSTNAME": "localhost",
        "spark.yarn.appMasterEnv.JAVA_HOME": str(cluster.java_home),
        "spark.executorEnv.PYSPARK_PYTHON": python,
        "spark.executorEnv.SPARK_LOCAL_IP": "127.0.0.1",
        "spark.driver.memory": "512m",
        "spark.executor.memory": "512m",
        "spark.ui.enabled": "false",
        **(extra_conf or {}),
    }
    if executors:
        conf.setdefault("spark.executor.instances", str(executors))
    else:
        # spark-submit refuses spark.executor.instances=0 ("Number of executors must be a positive number"):
        # start none and let dynamic allocation add them when a job runs
        conf.setdefault("spark.dynamicAllocation.enabled", "true")
        conf.setdefault("spark.dynamicAllocation.shuffleTracking.enabled", "true")
        conf.setdefault("spark.dynamicAllocation.minExecutors", "0")
        conf.setdefault("spark.dynamicAllocation.initialExecutors", "0")
        conf.setdefault("spark.dynamicAllocation.maxExecutors", "1")
    argv = [str(home / "bin" / "spark-submit"), "--master", "yarn", "--deploy-mode", "cluster", "--name", name]
    for key, value in conf.items():
        argv += ["--conf", f"{key}={value}"]
    argv += [str(program), *args]
    env = dict(os.environ)
    env.update({
        "JAVA_HOME": str(cluster.java_home),
        "HADOOP_CONF_DIR": str(cluster.conf_dir),
        "YARN_CONF_DIR": str(cluster.conf_dir),
        "SPARK_HOME": str(home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": python,
        # the two zips as local: URIs, so nothing of pyspark is copied per app
        "PYSPARK_ARCHIVES_PATH": ",".join(f"local:{p}" for p in sorted(glob.glob(str(home / "python/lib/*.zip")))),
    })
    return argv, env


# ---------------------------------------------------------------------- fixture
# Registered both here and (re-exported) in conftest: share one cluster through a reference count.
_shared: YarnCluster | None = None
_users = 0


def _session_root() -> Path:
    """The test session's temporary root (conftest's), so its leak check covers the cluster's processes."""
    conftest = sys.modules.get("tests.conftest")
    root = getattr(conftest, "_ROOT", None)
    return Path(root) if root else Path(tempfile.mkdtemp(prefix="egd-tests-yarn-"))


@pytest.fixture(scope="session")
def yarn_cluster() -> Iterator[YarnCluster]:
    """One MiniYARNCluster for the whole session; fetches its jars first if needed (skips without Maven
    Central, unless ``YARN_IT=1``)."""
    global _shared, _users
    strict = os.environ.get("YARN_IT") == "1"
    if _shared is None:
        reason = unavailable_reason()
        if reason:
            if strict:
                pytest.fail(f"YARN_IT=1 but {reason}")
            pytest.skip(reason)
        if not cache_complete() or find_java_home() is None:
            try:
                install()
            except YarnClusterError as e:
                if strict:
                    raise
                pytest.skip(f"could not fetch the YARN test cluster's jars: {e}")
        cluster = YarnCluster(_session_root())
        try:
            cluster.start()
        except BaseException:
            with contextlib.suppress(YarnClusterError):
                cluster.stop()
            raise
        _shared = cluster
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            cluster, _shared = _shared, None
            cluster.stop()
