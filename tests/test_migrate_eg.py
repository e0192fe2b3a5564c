"""``egd migrate-eg`` on Enterprise Gateway's own kernelspecs (EG 3.3's sdist, ``tests/egdist.py``) and an EG
configuration spread over an env file, a config file and the command line, as a deployment has it.

Everything runs the real command (``python -m egd``) as a subprocess: the migration, then ``egd check-config`` and
``egd kernelspecs`` on what it wrote. The lists of EG's settings the coverage tests use are read from EG's source
(its ``EG_*`` variable names and its configurable traits), not written out here, so an EG setting the migration
does not know shows up as a failure.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import egdist

pytestmark = pytest.mark.eg

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "migrating-from-eg.rst"
#: EG's modules whose configurable traits an operator sets (the app, its mixin, the managers it configures).
TRAIT_MODULES = ("mixins.py", "services/kernelspecs/kernelspec_cache.py", "services/sessions/kernelsessionmanager.py")


def egd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``egd`` command."""
    return subprocess.run([sys.executable, "-m", "egd", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def eg_variables() -> set[str]:
    """Every ``EG_*`` and ``KG_*`` name EG 3.3's code reads (its tests left out)."""
    package = egdist.eg_source() / "enterprise_gateway"
    names: set[str] = set()
    for path in package.rglob("*.py"):
        if "tests" not in path.relative_to(package).parts:
            names.update(re.findall(r"[\"']((?:EG|KG)_[A-Z0-9_]+)[\"']", path.read_text()))
    names.discard("EG_COMM")  # a key of the launcher's connection info, not a variable
    return names


def eg_traits() -> dict[str, str]:
    """EG's configurable traits (``config=True``) of the classes an operator configures: ``Class.trait`` -> the
    trait type's name."""
    package = egdist.eg_source() / "enterprise_gateway"
    traits: dict[str, str] = {}
    for module in TRAIT_MODULES:
        tree = ast.parse((package / module).read_text())
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            owner = "EnterpriseGatewayApp" if cls.name == "EnterpriseGatewayConfigMixin" else cls.name
            for statement in cls.body:
                if (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call)
                        and any(k.arg == "config" for k in statement.value.keywords)):
                    func = statement.value.func
                    kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                    traits[f"{owner}.{ast.unparse(statement.targets[0])}"] = kind
    assert "EnterpriseGatewayApp.remote_hosts" in traits and len(traits) > 40, traits
    return traits


def report_of(out: Path) -> str:
    return (out / "migration-report.txt").read_text()


def not_carried(report: str) -> str:
    """The report's "Not carried over" section."""
    return report.split("Not carried over", 1)[1].split("\nCarried over", 1)[0]


def carried(report: str) -> str:
    return report.split("\nCarried over", 1)[1]


@pytest.fixture(scope="module")
def eg_kernels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EG's kernelspecs as its Makefile assembles them, as an operator edited some of them: per-spec hosts and
    users on python_distributed, resources and Spark settings in spark_python_yarn_cluster's SPARK_OPTS, users,
    a port range and a Spark executor image on python_tf_kubernetes."""
    dest = egdist.assemble(tmp_path_factory.mktemp("eg") / "kernels")
    distributed = dest / "python_distributed" / "kernel.json"
    spec = json.loads(distributed.read_text())
    spec["metadata"]["process_proxy"]["config"] = {"remote_hosts": "node7,node8", "authorized_users": "alice,bob",
                                                   "port_range": "41000..41100", "mystery": 1}
    distributed.write_text(json.dumps(spec))
    r_cluster = dest / "spark_R_yarn_cluster" / "kernel.json"
    spec = json.loads(r_cluster.read_text())
    spec["metadata"]["process_proxy"]["config"] = {"yarn_endpoint": "http://rm3.example.org:8088/ws/v1/cluster",
                                                   "image_name": "elyra/kernel-r"}
    r_cluster.write_text(json.dumps(spec))
    cluster = dest / "spark_python_yarn_cluster" / "kernel.json"
    spec = json.loads(cluster.read_text())
    spec["env"]["SPARK_OPTS"] += (" --queue analytics --driver-memory 6g --num-executors 3"
                                  " --conf spark.executor.memoryOverhead=1g --conf spark.sql.shuffle.partitions=64"
                                  " --archives env.zip")
    cluster.write_text(json.dumps(spec))
    tf_kubernetes = dest / "python_tf_kubernetes" / "kernel.json"
    spec = json.loads(tf_kubernetes.read_text())
    spec["metadata"]["process_proxy"]["config"].update({"authorized_users": "alice", "port_range": "42000..42100",
                                                        "executor_image_name": "elyra/kernel-spark-py:3.3.0"})
    tf_kubernetes.write_text(json.dumps(spec))
    return dest


@pytest.fixture(scope="module")
def migrated(eg_kernels: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One EG deployment that uses every kind of setting egd maps, migrated by the real command."""
    base = tmp_path_factory.mktemp("deployment")
    env_file = base / "enterprise-gateway.env"
    env_file.write_text("\n".join([
        "# systemd EnvironmentFile of the EG service",
        "EG_IP=0.0.0.0",
        "EG_PORT=7000",  # the config file and the command line beat it
        'EG_AUTH_TOKEN="s3cret-token-of-32-characters-xx"',
        "EG_REMOTE_HOSTS=node1,node2",
        "EG_LOAD_BALANCING_ALGORITHM=least-connection",
        "EG_YARN_ENDPOINT=http://rm1.example.org:8088/ws/v1/cluster",
        "EG_ALT_YARN_ENDPOINT=http://rm2.example.org:8088/ws/v1/cluster",
        "EG_IMPERSONATION_ENABLED=True",
        "EG_PORT_RANGE=40000..41000",
        "EG_RESPONSE_IP=10.0.0.1",
        "EG_RESPONSE_PORT=8877",
        "EG_NAMESPACE=eg-kernels",
        "EG_SHARED_NAMESPACE=True",
        "EG_DEFAULT_KERNEL_SERVICE_ACCOUNT_NAME=kernel-sa",
        "EG_KERNEL_CLUSTER_ROLE=kernel-controller",
        "EG_POD_TEMPLATE_DIR=/etc/eg/templates",
        "EG_KERNEL_IMAGE=elyra/kernel-py:3.3.0",
        "EG_KERNEL_EXECUTOR_IMAGE=elyra/kernel-spark-py:3.3.0",
        "EG_MIRROR_WORKING_DIRS=true",
        "EG_PROHIBITED_UIDS=0,65534",
        "EG_PROHIBITED_GIDS=0",
        "EG_DOCKER_NETWORK=eg-net",
        "EG_DOCKER_MODE=swarm",
        "EG_REMOVE_CONTAINER=True",
        "EG_KUBERNETES_LOG_LEVEL=DEBUG",
        "EG_SSH_PORT=2222",
        "EG_REMOTE_USER=jupyter",
        "EG_KERNEL_LOG_DIR=/var/log/eg-kernels",
        "EG_KERNEL_LAUNCH_TIMEOUT=90",
        "EG_YARN_SHUTDOWN_WAIT_TIME=20",
        "EG_ENABLE_TUNNELING=true",
        "EG_MAX_KERNELS_PER_USER=3",
        "EG_UNAUTHORIZED_USERS=root,hdfs",
        "EG_WS_PING_INTERVAL_SECS=25",
        "export EG_LIST_KERNELS=true",
        "KG_IP=192.0.2.1",  # EG_IP wins
        "HADOOP_CONF_DIR=/etc/hadoop/conf",
        "SOME_VARIABLE=1",
    ]) + "\n")
    config_file = base / "jupyter_enterprise_gateway_config.py"
    config_file.write_text("\n".join([
        "c = get_config()",
        "import os",
        "c.EnterpriseGatewayApp.port = 7001",
        "c.EnterpriseGatewayApp.max_kernels = 20",
        "c.EnterpriseGatewayApp.client_envs = ['SPARK_OPTS_EXTRA', 'MY_VAR']",
        "c.EnterpriseGatewayApp.inherited_envs = ['JAVA_HOME']",
        "c.EnterpriseGatewayApp.authorized_users = {'alice', 'bob', 'carol'}",
        "c.EnterpriseGatewayApp.allow_origin = 'https://lab.example.org'",
        "c.EnterpriseGatewayApp.dynamic_config_interval = 30",
        "c.EnterpriseGatewayApp.default_kernel_name = 'python_distributed'",
        "c.EnterpriseGatewayApp.availability_mode = 'standalone'",
        "c.MappingKernelManager.cull_idle_timeout = 3600",
        "c.MappingKernelManager.cull_interval = 120",
        "c.MappingKernelManager.cull_connected = True",
        "c.MappingKernelManager.cull_busy = True",
        "c.KernelManager.shutdown_wait_time = 7.5",
        "c.EnterpriseGatewayApp.certfile = os.environ['EG_CERT']",
        "if True:",
        "    c.EnterpriseGatewayApp.max_kernels = 99",
    ]) + "\n")
    out = base / "out"
    result = egd("migrate-eg", "--output", str(out), "--env-file", str(env_file), "--config-file", str(config_file),
                 "--kernelspec-dir", str(eg_kernels), "--", "jupyter", "enterprisegateway", "--port=8889",
                 "--EnterpriseGatewayApp.ws_ping_interval=15", "--log-level", "DEBUG", "--port_retries", "5",
                 "--RemoteMappingKernelManager.kernel_info_timeout=90")
    return out, result


def test_migrated_config_passes_check_config(migrated: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """The written config is accepted by the real ``egd check-config``, with the drivers EG's specs need."""
    out, result = migrated
    assert result.returncode == 0, result.stderr
    checked = egd("check-config", str(out / "egd.yaml"))
    assert checked.returncode == 0, checked.stderr
    assert "drivers: local, ssh, yarn, kubernetes, docker" in checked.stdout
    assert "listening on 0.0.0.0:8889" in checked.stdout


def test_settings_land_where_egd_has_them(migrated: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """Each EG setting is in its egd key, with EG's precedence (command line > config file > environment)."""
    out, _ = migrated
    config: dict[str, Any] = yaml.safe_load((out / "egd.yaml").read_text())
    assert config["server"] == {"ip": "0.0.0.0", "port": 8889, "ws_ping_interval": 15, "list_kernels": True,
                                "allow_origin": ["https://lab.example.org"]}
    kernels = config["kernels"]
    assert kernels["port_range"] == "40000..41000"
    assert kernels["max_kernels"] == 20  # the assignment inside `if True:` is not run
    assert kernels["max_kernels_per_user"] == 3
    assert kernels["client_envs"] == ["SPARK_OPTS_EXTRA", "MY_VAR"]
    assert kernels["inherited_envs"][-1] == "JAVA_HOME" and "PATH" in kernels["inherited_envs"]
    assert sorted(kernels["authorized_users"]) == ["alice", "bob", "carol"]
    assert kernels["unauthorized_users"] == ["root", "hdfs"]
    assert kernels["default_kernel_name"] == "python_distributed"
    assert (kernels["launch_timeout"], kernels["shutdown_wait"]) == (90.0, 7.5)
    assert (kernels["cull_idle_timeout"], kernels["cull_interval"], kernels["cull_connected"],
            kernels["cull_busy_timeout"]) == (3600.0, 120.0, True, 3600.0)
    assert kernels["kernelspec_dirs"] == [str((out / "kernelspecs").resolve())]
    assert config["logging"] == {"level": "debug"}
    assert config["state"] == {"store": "sqlite"}
    ssh = config["drivers"]["ssh"]
    assert ssh["hosts"] == ["node1", "node2"] and ssh["placement"] == "least-connection"
    assert ssh["impersonation"] is True and ssh["user"] == "jupyter" and ssh["log_dir"] == "/var/log/eg-kernels"
    # EG had one response port; each egd driver listens on its own: EG's, then the next ones.
    assert (ssh["callback_host"], ssh["callback_port"]) == ("10.0.0.1", 8877)
    assert ssh["ssh_options"] == ["Port=2222"]
    yarn = config["drivers"]["yarn"]
    assert yarn["resource_managers"] == ["http://rm1.example.org:8088", "http://rm2.example.org:8088",
                                         "http://rm3.example.org:8088"]
    assert yarn["impersonation"] is True and yarn["kill_timeout"] == 20.0
    assert (yarn["callback_host"], yarn["callback_port"]) == ("10.0.0.1", 8878)
    assert yarn["hadoop_conf_dir"] == "/etc/hadoop/conf"
    assert yarn["spark_home"] == "/usr/hdp/current/spark2-client" and yarn["python"] == "/opt/conda/bin/python"
    assert config["drivers"]["kubernetes"] == {
        "callback_host": "10.0.0.1", "namespace": "eg-kernels", "namespace_mode": "shared",
        "service_account": "kernel-sa", "image": "elyra/kernel-py:3.3.0", "callback_port": 8879}
    assert config["drivers"]["docker"] == {"callback_host": "10.0.0.1", "image": "elyra/kernel-py:3.3.0",
                                           "network": "eg-net", "callback_port": 8880}
    # The token is not in the YAML but in an env file only its owner reads.
    assert "s3cret" not in (out / "egd.yaml").read_text()
    assert (out / "egd.env").read_text().splitlines()[-1] == "EGD_AUTH_TOKEN=s3cret-token-of-32-characters-xx"
    assert (out / "egd.env").stat().st_mode & 0o777 == 0o600


def test_kernelspecs_are_listed_with_their_drivers(migrated: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """``egd kernelspecs`` on the written config lists EG's specs that egd can run, each with its driver; the ones
    whose process proxy has no egd driver, and Spark on Kubernetes, are not written."""
    out, _ = migrated
    listed = egd("kernelspecs", "--config", str(out / "egd.yaml"), "--json")
    assert listed.returncode == 0, listed.stderr
    specs = json.loads(listed.stdout)
    drivers = {name: specs[name]["driver"] for name in specs if specs[name]["resource_dir"].startswith(str(out))}
    assert drivers == {
        "python_distributed": "ssh", "spark_python_yarn_cluster": "yarn",  # native egd kernelspecs
        "spark_python_yarn_client": "ssh", "spark_r_yarn_client": "ssh", "spark_scala_yarn_client": "ssh",
        "spark_r_yarn_cluster": "yarn", "spark_scala_yarn_cluster": "yarn",
        # EG's Kubernetes, Docker and DockerSwarm kernelspecs, kept as EG's
        "python_kubernetes": "kubernetes", "python_tf_kubernetes": "kubernetes",
        "python_tf_gpu_kubernetes": "kubernetes", "r_kubernetes": "kubernetes", "scala_kubernetes": "kubernetes",
        "python_docker": "docker", "python_tf_docker": "docker", "python_tf_gpu_docker": "docker",
        "r_docker": "docker", "scala_docker": "docker",
    }
    assert not any((name.startswith("spark_") and name.endswith("_kubernetes")) or "conductor" in name
                   or "operator" in name for name in specs)


def test_native_kernelspecs(migrated: tuple[Path, subprocess.CompletedProcess[str]], eg_kernels: Path) -> None:
    """python_distributed becomes an ssh spec running ipykernel through egd's launcher; spark_python_yarn_cluster a
    yarn spec in mode spark whose Spark settings and resources come from SPARK_OPTS, and whose SparkSession is
    built as EG's spark-context-initialization-mode said (lazy)."""
    out, _ = migrated
    distributed = json.loads((out / "kernelspecs" / "python_distributed" / "kernel.json").read_text())
    assert distributed["argv"] == ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert distributed["metadata"]["egd"] == {"driver": "ssh", "config": {
        "hosts": ["node7", "node8"], "authorized_users": ["alice", "bob"], "port_range": "41000..41100"}}
    assert "process_proxy" not in distributed["metadata"] and distributed["metadata"]["debugger"] is True
    assert (out / "kernelspecs" / "python_distributed" / "logo-64x64.png").is_file()
    assert not (out / "kernelspecs" / "python_distributed" / "scripts").exists()  # EG's launcher is not needed

    cluster = json.loads((out / "kernelspecs" / "spark_python_yarn_cluster" / "kernel.json").read_text())
    assert cluster["argv"] == ["/opt/conda/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert "env" not in cluster
    assert cluster["metadata"]["egd"] == {"driver": "yarn", "config": {
        "mode": "spark", "queues": ["analytics"], "driver_memory": "6g", "num_executors": 3, "max_memory": "6144m",
        "max_executors": 3, "spark_session": "lazy",
        "spark_conf": {"spark.executor.memoryOverhead": "1g", "spark.sql.shuffle.partitions": "64"}}}

    # What egd cannot run natively stays EG's kernelspec, whole, for egd's EG support.
    kept = json.loads((out / "kernelspecs" / "spark_R_yarn_cluster" / "kernel.json").read_text())
    assert kept["metadata"]["process_proxy"]["class_name"].endswith("YarnClusterProcessProxy")
    # Only the process_proxy.config keys egd honours are kept (the rest is reported).
    assert kept["metadata"]["process_proxy"]["config"] == {
        "yarn_endpoint": "http://rm3.example.org:8088/ws/v1/cluster"}
    assert kept["argv"] == json.loads((eg_kernels / "spark_R_yarn_cluster" / "kernel.json").read_text())["argv"]
    assert (out / "kernelspecs" / "spark_R_yarn_cluster" / "bin" / "run.sh").is_file()


def test_container_kernelspecs_are_kept_as_eg_kernelspecs(
        migrated: tuple[Path, subprocess.CompletedProcess[str]], eg_kernels: Path) -> None:
    """EG's python_kubernetes and python_docker (DockerSwarmProcessProxy) are copied whole as EG's kernelspecs, for
    egd's kubernetes and docker drivers: argv unchanged, ``image_name`` kept; of the rest of
    ``process_proxy.config`` only what egd honours (``authorized_users``) stays."""
    out, _ = migrated
    for name, proxy in (("python_kubernetes", "KubernetesProcessProxy"), ("python_docker", "DockerSwarmProcessProxy")):
        original = json.loads((eg_kernels / name / "kernel.json").read_text())
        kept = json.loads((out / "kernelspecs" / name / "kernel.json").read_text())
        assert kept["metadata"]["process_proxy"]["class_name"].endswith(proxy)
        assert kept["metadata"]["process_proxy"]["config"] == {"image_name": "elyra/kernel-py:VERSION"}
        assert kept["argv"] == original["argv"] and "egd" not in kept["metadata"]
    tf = json.loads((out / "kernelspecs" / "python_tf_kubernetes" / "kernel.json").read_text())
    assert tf["metadata"]["process_proxy"]["config"] == {"image_name": "elyra/kernel-tf-py:VERSION",
                                                         "authorized_users": "alice"}
    assert not (out / "kernelspecs" / "spark_python_kubernetes").exists()
    listed = egd("kernelspecs", "--config", str(out / "egd.yaml"))
    line = next(li for li in listed.stdout.splitlines() if li.startswith("python_kubernetes "))
    assert "kubernetes" in line and "cannot start" not in line


def test_kubernetes_only_deployment(eg_kernels: Path, tmp_path: Path) -> None:
    """An EG deployment on Kubernetes (the Helm chart's variables, EG_SHARED_NAMESPACE unset): the kubernetes driver
    is written with EG's default, a namespace per kernel; EG_NAMESPACE and the service account land in it; a
    namespace egd refuses is reported with egd's message; Spark on Kubernetes is left out with its reason; the
    written file passes ``egd check-config``."""
    specs = tmp_path / "kernels"
    for name in ("python_kubernetes", "spark_python_kubernetes", "python_docker"):
        shutil.copytree(eg_kernels / name, specs / name)
    env_file = tmp_path / "eg.env"
    env_file.write_text("EG_NAMESPACE=enterprise-gateway\nEG_DEFAULT_KERNEL_SERVICE_ACCOUNT_NAME=default\n"
                        "EG_KERNEL_CLUSTER_ROLE=cluster-admin\nEG_RESPONSE_PORT=8877\nEG_DOCKER_NETWORK=bridge\n"
                        "EG_SSH_PORT=2222\n")
    out = tmp_path / "out"
    result = egd("migrate-eg", "-o", str(out), "--env-file", str(env_file), "--kernelspec-dir", str(specs))
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((out / "egd.yaml").read_text())
    assert config["drivers"]["kubernetes"] == {"namespace": "enterprise-gateway", "service_account": "default",
                                               "callback_port": 8877, "namespace_mode": "per-kernel"}
    assert config["drivers"]["docker"] == {"network": "bridge", "callback_port": 8878}
    assert "ssh" not in config["drivers"]
    report = report_of(out)
    assert "EG's default of EG_SHARED_NAMESPACE (false: a namespace per kernel) -> drivers.kubernetes.namespace_mode" \
        in carried(report)
    missing = not_carried(report)
    assert "EG_SSH_PORT: no kernelspec needs the ssh driver, so it is not configured" in missing
    assert re.search(r"kernelspec spark_python_kubernetes: its argv runs run\.sh, .*Spark on Kubernetes .*not "
                     r"supported by egd; kernelspec not written", missing)
    assert "rbac-namespaces.yaml (namespace_mode per-kernel creates namespaces)" in report
    assert "set drivers.kubernetes.callback_host" in report and "set drivers.docker.callback_host" in report
    checked = egd("check-config", str(out / "egd.yaml"))
    assert checked.returncode == 0, checked.stderr
    assert "drivers: local, kubernetes, docker" in checked.stdout
    listed = json.loads(egd("kernelspecs", "--config", str(out / "egd.yaml"), "--json").stdout)
    assert (listed["python_kubernetes"]["driver"], listed["python_docker"]["driver"]) == ("kubernetes", "docker")

    env_file.write_text("EG_NAMESPACE=Not_A_Namespace\nEG_SHARED_NAMESPACE=true\n")
    result = egd("migrate-eg", "-o", str(out), "--force", "--env-file", str(env_file), "--kernelspec-dir", str(specs))
    assert result.returncode == 0, result.stderr
    assert "EG_NAMESPACE: egd refuses the value: drivers.kubernetes.namespace 'Not_A_Namespace': not a valid " \
        "namespace name" in not_carried(report_of(out))
    assert yaml.safe_load((out / "egd.yaml").read_text())["drivers"]["kubernetes"] == {"namespace_mode": "shared"}
    assert egd("check-config", str(out / "egd.yaml")).returncode == 0


def test_report_names_what_was_not_carried_over(migrated: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """Printed and written: every setting that could not be carried over, with the reason; never a secret."""
    out, result = migrated
    report = report_of(out)
    assert result.stdout == report
    missing = not_carried(report)
    expected = [
        ("jupyter_enterprise_gateway_config.py:17 c.EnterpriseGatewayApp.certfile", "not a literal"),
        ("jupyter_enterprise_gateway_config.py:18 `if True:`", "not a c.Class.trait = <literal> assignment"),
        ("jupyter_enterprise_gateway_config.py:2 `import os`", "never runs the file"),
        ("EG_PORT: overridden by jupyter_enterprise_gateway_config.py:3", "precedence"),
        ("jupyter_enterprise_gateway_config.py:3 c.EnterpriseGatewayApp.port: overridden by command line --port", ""),
        ("EG_ENABLE_TUNNELING", "does not tunnel"),
        ("KG_IP", "EG uses EG_IP instead"),
        ("SOME_VARIABLE", "kernels.inherited_envs"),
        ("c.EnterpriseGatewayApp.dynamic_config_interval", "SIGHUP"),
        ("command line --port_retries", "never tries the next port"),
        ("command line --RemoteMappingKernelManager.kernel_info_timeout", "no equivalent"),
        ("kernelspec spark_python_kubernetes", "argv runs run.sh, not EG's launch_kubernetes.py or launch_docker.py: "
                                               "Spark on Kubernetes (spark-submit to the API server) is not supported"),
        ("python_tf_kubernetes: metadata.process_proxy.config.executor_image_name", "Spark on Kubernetes"),
        ("python_tf_kubernetes: metadata.process_proxy.config.port_range", "drivers.kubernetes.port_range"),
        ("EG_KERNEL_CLUSTER_ROLE", "egd binds no role in kernel namespaces"),
        ("EG_POD_TEMPLATE_DIR", "never from a Jinja template"),
        ("EG_KERNEL_EXECUTOR_IMAGE", "Spark on Kubernetes"),
        ("EG_MIRROR_WORKING_DIRS", "KERNEL_WORKING_DIR"),
        ("EG_PROHIBITED_UIDS", "65534 would not be refused"),
        ("EG_DOCKER_MODE", "egd creates no Swarm services"),
        ("EG_KUBERNETES_LOG_LEVEL", "logging.level"),
        ("kernelspec spark_python_conductor_cluster", "ConductorClusterProcessProxy has no egd driver"),
        ("kernelspec spark_python_operator", "SparkOperatorProcessProxy has no egd driver"),
        ("python_distributed: metadata.process_proxy.config.mystery", "no egd equivalent"),
        ("spark_python_yarn_cluster: SPARK_OPTS ${KERNEL_EXTRA_SPARK_OPTS}", "refuses KERNEL_EXTRA_SPARK_OPTS"),
        ("SPARK_OPTS --conf spark.yarn.appMasterEnv.PATH=/opt/conda/bin:$PATH", "refers to a variable"),
        ("SPARK_OPTS --conf spark.yarn.maxAppAttempts=1", "egd sets this Spark setting itself"),
        ("SPARK_OPTS --archives env.zip", "spark-submit option egd does not pass"),
        ("spark_python_yarn_cluster: env.PYTHONPATH", "drivers.yarn.env"),
        ("spark_r_yarn_cluster: metadata.process_proxy.config.image_name", "left out of the copied kernel.json"),
    ]
    for what, why in expected:
        lines = [line for line in missing.splitlines() if what in line]
        assert lines and why in lines[0], (what, why, missing)
    assert "s3cret" not in report and "s3cret" not in result.stderr
    assert "EG_AUTH_TOKEN (value not shown) -> EGD_AUTH_TOKEN in egd.env" in carried(report)
    done = carried(report)
    for line in ("EG_NAMESPACE -> drivers.kubernetes.namespace",
                 "EG_SHARED_NAMESPACE -> drivers.kubernetes.namespace_mode",
                 "EG_DEFAULT_KERNEL_SERVICE_ACCOUNT_NAME -> drivers.kubernetes.service_account",
                 "EG_KERNEL_IMAGE -> drivers.kubernetes.image", "EG_KERNEL_IMAGE -> drivers.docker.image",
                 "EG_DOCKER_NETWORK -> drivers.docker.network", "EG_RESPONSE_IP -> drivers.docker.callback_host",
                 "EG_RESPONSE_PORT -> drivers.kubernetes.callback_port",
                 "EG_PROHIBITED_GIDS -> nothing (egd refuses KERNEL_GID 0 (root) unless",
                 "EG_REMOVE_CONTAINER -> nothing (true: egd always removes"):
        assert line in done, (line, done)
    assert "8877 and the next ones, to 8880, are drivers.ssh/yarn/kubernetes/docker.callback_port" in report


def test_values_egd_refuses_are_reported_and_left_out(eg_kernels: Path, tmp_path: Path) -> None:
    """A value EG took but egd's checks refuse (a port range of 10 ports, a short token, an address that is a
    host name) is left out and reported with egd's own message, so the written file still passes check-config;
    without a driver for them, kernelspecs found in the kernel directories are left out with allowed_kernelspecs."""
    env_file = tmp_path / "eg.env"
    env_file.write_text("EG_PORT_RANGE=40000..40010\nEG_AUTH_TOKEN=short\nEG_IP=gateway.example.org\n"
                        "EG_IMPERSONATION_ENABLED=1\nEG_SSH_PORT=2222\n")
    out = tmp_path / "out"
    result = egd("migrate-eg", "-o", str(out), "--env-file", str(env_file),
                 "--kernelspec-dir", str(eg_kernels / "spark_python_conductor_cluster"),
                 "--kernelspec-dir", str(eg_kernels / "spark_python_yarn_cluster"))
    assert result.returncode == 0, result.stderr
    missing = not_carried(report_of(out))
    assert re.search(r"EG_PORT_RANGE: egd refuses the value: kernels.port_range: needs .* at least 20 ports", missing)
    assert "EG_AUTH_TOKEN (value not shown): not carried over: egd needs a token of at least 16 characters" in missing
    assert "EG_IP: egd refuses the value: server.ip: not an IP address" in missing
    assert "EG_IMPERSONATION_ENABLED: not carried over: must be true or false, got '1'" in missing
    assert "EG_SSH_PORT: no kernelspec needs the ssh driver" in missing
    assert ("kernelspec spark_python_conductor_cluster: its process proxy ConductorClusterProcessProxy has no egd "
            "driver") in missing
    # No YARN endpoint: the yarn spec is written, but left out until drivers.yarn is configured.
    assert re.search(r"kernelspec spark_python_yarn_cluster \(.*\): needs the 'yarn' driver, which is not configured",
                     missing)
    assert "configure drivers.yarn.resource_managers" in report_of(out)
    config = yaml.safe_load((out / "egd.yaml").read_text())
    assert "spark_python_yarn_cluster" not in config["kernels"]["allowed_kernelspecs"]
    assert "port_range" not in config["kernels"] and "server" not in config
    assert egd("check-config", str(out / "egd.yaml")).returncode == 0


def test_environment_is_read_without_env_file(tmp_path: Path) -> None:
    """Without --env-file, EG_* and KG_* variables of the command's own environment are EG's environment; EG's
    command line may come as one string (a systemd ExecStart=)."""
    out = tmp_path / "out"
    empty = tmp_path / "kernels"
    empty.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "EG_PORT": "9100", "KG_BASE_URL": "/gw/",
           "EG_REMOTE_PWD": "hunter2-password"}
    result = egd("migrate-eg", "-o", str(out), "--kernelspec-dir", str(empty), "--eg-command",
                 "/usr/bin/jupyter enterprisegateway --EnterpriseGatewayApp.list_kernels=False --ip '::1'", env=env)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((out / "egd.yaml").read_text())
    assert config["server"] == {"port": 9100, "base_url": "/gw/", "list_kernels": False, "ip": "::1"}
    assert "environment EG_REMOTE_PWD (value not shown): egd logs in to ssh hosts with keys" in result.stdout
    assert "hunter2" not in result.stdout


def test_config_file_named_on_eg_command_line(tmp_path: Path) -> None:
    """EG's own ``--config FILE`` is read when no --config-file is given; a JSON config file is read too."""
    empty = tmp_path / "kernels"
    empty.mkdir()
    py_config = _write(tmp_path / "eg_config.py", "c.EnterpriseGatewayApp.max_kernels = 5\n")
    out = tmp_path / "out"
    result = egd("migrate-eg", "-o", str(out), "--kernelspec-dir", str(empty), "--", f"--config={py_config}")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((out / "egd.yaml").read_text())["kernels"]["max_kernels"] == 5
    assert "command line --config -> read as EG's config file" in result.stdout
    json_config = _write(tmp_path / "eg_config.json", json.dumps({"EnterpriseGatewayApp": {"max_kernels": 6}}))
    out = tmp_path / "out2"
    result = egd("migrate-eg", "-o", str(out), "--kernelspec-dir", str(empty), "--config-file", json_config,
                 "--", f"--config={py_config}")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((out / "egd.yaml").read_text())["kernels"]["max_kernels"] == 6
    assert "command line --config: not read: --config-file names EG's config files" in result.stdout


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: ["--env-file", str(d / "missing.env")], "cannot read the env file"),
    (lambda d: ["--env-file", _write(d / "bad.env", "EG_PORT=1\nthis is not a line\n")], "bad.env:2: not a KEY=VALUE"),
    (lambda d: ["--config-file", _write(d / "c.py", "c.EnterpriseGatewayApp.port = (\n")], "c.py:1: not valid Python"),
    (lambda d: ["--", "--portt=1"], "'--portt=1' is not an option Enterprise Gateway accepts"),
    (lambda d: ["--", "--port"], "--port needs a value"),
    (lambda d: ["--kernelspec-dir", str(d / "nowhere")], "not a directory of kernelspecs"),
    (lambda d: ["--eg-command", "jupyter enterprisegateway --ip='0.0.0.0"], "--eg-command: No closing quotation"),
])
def test_bad_input_exits_2(tmp_path: Path, setup: Any, message: str) -> None:
    """Bad input: exit 2, one clear line on stderr, nothing written."""
    out = tmp_path / "out"
    result = egd("migrate-eg", "-o", str(out), *setup(tmp_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("egd migrate-eg: ") and message in result.stderr, result.stderr
    assert not out.exists()


def test_output_directory_is_not_overwritten_without_force(tmp_path: Path) -> None:
    """An output directory with files in it is refused (exit 2) unless --force; with it, the migration is
    written again."""
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    refused = egd("migrate-eg", "-o", str(out), "--kernelspec-dir", str(kernels))
    assert refused.returncode == 2 and "is not empty (--force" in refused.stderr
    assert egd("migrate-eg", "-o", str(out), "--kernelspec-dir", str(kernels), "--force").returncode == 0
    assert (out / "mine.txt").read_text() == "keep me" and (out / "egd.yaml").is_file()


def test_help_explains_the_command() -> None:
    """``egd migrate-eg --help`` says what is read, what is written and the exit codes."""
    result = egd("migrate-eg", "--help")
    assert result.returncode == 0
    for words in ("--env-file", "--config-file", "--kernelspec-dir", "--eg-command", "egd check-config",
                  "migration-report.txt", "2 on bad input", "command line, then config file, then environment"):
        assert words in result.stdout, words
    assert "migrate-eg" in egd("--help").stdout


def test_every_eg_variable_is_accounted_for(tmp_path: Path) -> None:
    """Every EG_*/KG_* variable EG's code reads, set in an env file, is either carried over or reported: none is
    dropped silently. The list comes from EG's source."""
    names = sorted(eg_variables())
    env_file = tmp_path / "all.env"
    env_file.write_text("".join(f"{name}=1\n" for name in names))
    empty = tmp_path / "kernels"
    empty.mkdir()
    out = tmp_path / "out"
    result = egd("migrate-eg", "-o", str(out), "--env-file", str(env_file), "--kernelspec-dir", str(empty))
    assert result.returncode == 0, result.stderr
    report = report_of(out)
    unaccounted = [name for name in names if not re.search(rf"all\.env:\d+ {name}\b", report)]
    assert not unaccounted, unaccounted
    assert egd("check-config", str(out / "egd.yaml")).returncode == 0


def test_every_eg_trait_is_accounted_for(tmp_path: Path) -> None:
    """Every configurable trait of EG's app and managers, set in a config file, is carried over or reported."""
    values = {"Integer": "1", "Bool": "True", "CBool": "True", "Unicode": "'x'", "ListTrait": "['a']",
              "SetTrait": "{'a'}", "Type": "'some.Class'", "CaselessStrEnum": "'standalone'"}
    traits = eg_traits()
    config_file = tmp_path / "jupyter_enterprise_gateway_config.py"
    config_file.write_text("".join(f"c.{name} = {values.get(kind, '1')}\n" for name, kind in traits.items()))
    empty = tmp_path / "kernels"
    empty.mkdir()
    out = tmp_path / "out"
    result = egd("migrate-eg", "-o", str(out), "--config-file", str(config_file), "--kernelspec-dir", str(empty))
    assert result.returncode == 0, result.stderr
    report = report_of(out)
    unaccounted = [name for name in traits if not re.search(rf":\d+ c\.{re.escape(name)}\b", report)]
    assert not unaccounted, unaccounted


def test_the_guide_covers_every_eg_setting() -> None:
    """docs/migrating-from-eg.rst names every EG variable and configurable trait (EG's source is the list)."""
    text = DOC.read_text()
    missing = [name for name in sorted(eg_variables()) if name not in text]
    missing += [name.split(".", 1)[1] for name in eg_traits() if name.split(".", 1)[1] not in text]
    assert not missing, missing


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)
