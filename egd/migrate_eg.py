"""``egd migrate-eg``: an Enterprise Gateway deployment's configuration turned into egd's.

It reads what configures an Enterprise Gateway (EG) 3.x: its ``EG_*`` environment variables (this process's
environment, or files of ``KEY=VALUE`` lines such as a systemd ``EnvironmentFile`` or a docker env file), its
command line (``--EnterpriseGatewayApp.port=8889`` and EG's short aliases such as ``--port``), its
``jupyter_enterprise_gateway_config.py`` (read with :mod:`ast`, never run: only ``c.Class.trait = <literal>``
statements are understood) and its kernelspec directories. It writes an egd YAML config, native egd
kernelspecs and a report. Every setting it reads is either carried over (and the report says where to) or
listed as not carried over, with the reason: nothing is dropped silently.

EG's own precedence is kept: the command line beats the config file, which beats the environment.

This runs as a command-line tool, never inside the gateway's reactor: it blocks on files freely.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import sys
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from egd.config import DEFAULT_INHERITED_ENVS, ConfigError, KernelsConfig, parse_config
from egd.egspecs import eg_spark_opts_variable

#: Exit status of bad input (a file that cannot be read or parsed, an option EG does not accept).
BAD_INPUT = 2
REPORT_NAME = "migration-report.txt"
CONFIG_NAME = "egd.yaml"
ENV_NAME = "egd.env"
SPECS_NAME = "kernelspecs"

_APP = "EnterpriseGatewayApp"
#: Classes whose settings EG's command line and config file may carry, as the canonical name used below.
_CLASS_ALIASES = {
    "EnterpriseGatewayApp": _APP, "EnterpriseGatewayConfigMixin": _APP,
    "Application": "Application", "JupyterApp": "Application",
    "MappingKernelManager": "MappingKernelManager", "RemoteMappingKernelManager": "MappingKernelManager",
    "AsyncMappingKernelManager": "MappingKernelManager",
    "KernelManager": "KernelManager", "RemoteKernelManager": "KernelManager", "AsyncKernelManager": "KernelManager",
    "KernelSpecManager": "KernelSpecManager",
    "KernelSpecCache": "KernelSpecCache",
    "KernelSessionManager": "KernelSessionManager", "FileKernelSessionManager": "KernelSessionManager",
    "WebhookKernelSessionManager": "KernelSessionManager",
}
#: EG's command-line aliases (enterprisegatewayapp.py, plus jupyter_core's base aliases).
_ALIASES = {
    "ip": f"{_APP}.ip", "port": f"{_APP}.port", "port_retries": f"{_APP}.port_retries",
    "keyfile": f"{_APP}.keyfile", "certfile": f"{_APP}.certfile", "client-ca": f"{_APP}.client_ca",
    "ssl_version": f"{_APP}.ssl_version", "log-level": "Application.log_level", "config": "Application.config_file",
}
#: jupyter_core's flags (options without a value).
_FLAGS = {"debug", "show-config", "show-config-json", "generate-config", "y", "answer-yes"}

#: EG_* variables that are the default of a trait (KG_* is EG's fallback for some), by trait.
_ENV_TRAITS = {
    "EG_PORT": "port", "EG_PORT_RETRIES": "port_retries", "EG_IP": "ip", "EG_BASE_URL": "base_url",
    "EG_AUTH_TOKEN": "auth_token", "EG_ALLOW_CREDENTIALS": "allow_credentials", "EG_ALLOW_HEADERS": "allow_headers",
    "EG_ALLOW_METHODS": "allow_methods", "EG_ALLOW_ORIGIN": "allow_origin", "EG_EXPOSE_HEADERS": "expose_headers",
    "EG_TRUST_XHEADERS": "trust_xheaders", "EG_CERTFILE": "certfile", "EG_KEYFILE": "keyfile",
    "EG_CLIENT_CA": "client_ca", "EG_SSL_VERSION": "ssl_version", "EG_MAX_AGE": "max_age",
    "EG_MAX_KERNELS": "max_kernels", "EG_DEFAULT_KERNEL_NAME": "default_kernel_name",
    "EG_LIST_KERNELS": "list_kernels", "EG_CLIENT_ENVS": "client_envs", "EG_INHERITED_ENVS": "inherited_envs",
    "EG_KERNEL_HEADERS": "kernel_headers", "EG_REMOTE_HOSTS": "remote_hosts",
    "EG_LOAD_BALANCING_ALGORITHM": "load_balancing_algorithm", "EG_YARN_ENDPOINT": "yarn_endpoint",
    "EG_ALT_YARN_ENDPOINT": "alt_yarn_endpoint", "EG_YARN_ENDPOINT_SECURITY_ENABLED": "yarn_endpoint_security_enabled",
    "EG_CONDUCTOR_ENDPOINT": "conductor_endpoint", "EG_IMPERSONATION_ENABLED": "impersonation_enabled",
    "EG_UNAUTHORIZED_USERS": "unauthorized_users", "EG_AUTHORIZED_USERS": "authorized_users",
    "EG_AUTHORIZED_ORIGIN": "authorized_origin", "EG_PORT_RANGE": "port_range",
    "EG_MAX_KERNELS_PER_USER": "max_kernels_per_user", "EG_WS_PING_INTERVAL_SECS": "ws_ping_interval",
    "EG_DYNAMIC_CONFIG_INTERVAL": "dynamic_config_interval", "EG_AVAILABILITY_MODE": "availability_mode",
    "EG_AUTHORIZER_CLASS": "authorizer_class",
}
_OTHER_ENV_TRAITS = {
    "EG_KERNELSPEC_CACHE_ENABLED": "KernelSpecCache.cache_enabled",
    "EG_KERNEL_SESSION_PERSISTENCE": "KernelSessionManager.enable_persistence",
    "EG_PERSISTENCE_ROOT": "KernelSessionManager.persistence_root",
    "EG_WEBHOOK_URL": "KernelSessionManager.webhook_url",
    "EG_WEBHOOK_USERNAME": "KernelSessionManager.webhook_username",
    "EG_WEBHOOK_PASSWORD": "KernelSessionManager.webhook_password",
    "EG_AUTH_TYPE": "KernelSessionManager.auth_type",
}
#: EG's fallbacks (used only when the variable they fall back to is not set): Jupyter Kernel Gateway's KG_ names
#: and EG's deprecated names.
_FALLBACKS = {"EG_ENV_WHITELIST": "EG_CLIENT_ENVS", "EG_ENV_PROCESS_WHITELIST": "EG_INHERITED_ENVS"}
_FALLBACKS.update({"KG_" + name[3:]: name for name in (
    "EG_PORT", "EG_PORT_RETRIES", "EG_IP", "EG_BASE_URL", "EG_AUTH_TOKEN", "EG_ALLOW_CREDENTIALS", "EG_ALLOW_HEADERS",
    "EG_ALLOW_METHODS", "EG_ALLOW_ORIGIN", "EG_EXPOSE_HEADERS", "EG_TRUST_XHEADERS", "EG_CERTFILE", "EG_KEYFILE",
    "EG_CLIENT_CA", "EG_SSL_VERSION", "EG_MAX_AGE", "EG_MAX_KERNELS", "EG_DEFAULT_KERNEL_NAME", "EG_LIST_KERNELS")})

#: EG variables read by EG's process proxies and managers (no trait): why egd has no equivalent, or None when
#: one of the handlers below carries them.
_NO_EQUIVALENT = "no egd equivalent"
_ENV_ONLY: dict[str, str | None] = {
    "EG_KERNEL_LAUNCH_TIMEOUT": None, "EG_REMOTE_USER": None, "EG_SSH_PORT": None, "EG_REMOTE_GSS_SSH": None,
    "EG_KERNEL_LOG_DIR": None, "EG_RESPONSE_IP": None, "EG_RESPONSE_PORT": None, "EG_YARN_SHUTDOWN_WAIT_TIME": None,
    "EG_REMOTE_PWD": "egd logs in to ssh hosts with keys (or the ssh_config the operator gives), never a password",
    "EG_ENABLE_TUNNELING": "egd does not tunnel kernel ports over ssh: the gateway connects to the kernels' ports "
                           "(narrow them with port_range for firewalls)",
    "EG_RESPONSE_ADDR_ANY": "egd's launch listener binds drivers.<name>.callback_host itself (the kubernetes and "
                            "docker drivers: callback_bind, 0.0.0.0 for every address)",
    "EG_RESPONSE_PORT_RETRIES": "egd binds callback_port or fails to start (0 picks any free port)",
    "EG_PROHIBITED_LOCAL_IPS": "egd does not guess its own address: drivers.<name>.callback_host names it",
    "EG_MIN_PORT_RANGE_SIZE": "egd needs at least 20 ports in a port_range and binds directly in it",
    "EG_MAX_PORT_RANGE_RETRIES": "egd binds ports directly in the range (no pick-then-bind race to retry)",
    "EG_POLL_INTERVAL": "egd's launches are event driven; YARN polling is drivers.yarn.poll_interval and "
                        "fast_poll_interval",
    "EG_MAX_POLL_ATTEMPTS": "egd stops a kernel with shutdown_request, then SIGTERM, then SIGKILL after "
                            "kernels.shutdown_wait",
    "EG_SOCKET_TIMEOUT": "egd's launcher connections are asynchronous, with their own deadlines",
    "EG_RESTART_STATUS_POLL_INTERVAL": _NO_EQUIVALENT + " (restarts are event driven)",
    "EG_ZMQ_MAX_SOCKETS": _NO_EQUIVALENT + " (egd raises its open-file limit itself; server.max_connections caps "
                                           "connections)",
    "EG_ZMQ_IO_THREADS": _NO_EQUIVALENT,
    "EG_SENSITIVE_ENV_KEYS": "egd never logs kernel environment values, so there is nothing to redact",
    "EG_REDACTION_MASK": "egd never logs kernel environment values, so there is nothing to redact",
    "EG_SSH_LOG_LEVEL": "egd uses no SSH library (it runs the ssh command); logging.level covers egd",
    "EG_YARN_LOG_LEVEL": "egd uses no YARN client library; logging.level covers egd",
    "EG_KUBERNETES_LOG_LEVEL": "egd uses no Kubernetes client library (it calls the API server itself); "
                               "logging.level covers egd",
    "EG_DOCKER_LOG_LEVEL": "egd uses no Docker client library (it calls the Engine API itself); logging.level "
                           "covers egd",
    "EG_YARN_CERT_BUNDLE": _NO_EQUIVALENT + " (the RM addresses are drivers.yarn.resource_managers)",
    "EG_YARN_MUTUAL_AUTHENTICATION": "Kerberos (SPNEGO to the ResourceManager) is not supported by egd yet",
    "EG_NAMESPACE": None, "EG_SHARED_NAMESPACE": None, "EG_DEFAULT_KERNEL_SERVICE_ACCOUNT_NAME": None,
    "EG_KERNEL_CLUSTER_ROLE": "egd binds no role in kernel namespaces (EG bound this one, by default cluster-admin, "
                              "to the kernel's service account): kernel pods get no API token unless their pod "
                              "template sets automountServiceAccountToken, and a role for "
                              "drivers.kubernetes.service_account is the operator's to bind",
    "EG_POD_TEMPLATE_DIR": "egd builds kernel pods from a structured Pod manifest (drivers.kubernetes.pod_template, "
                           "or a kernelspec's pod_template; docs/kubernetes.rst), never from a Jinja template: "
                           "write your template's additions (volumes, node selector, tolerations) as one",
    "EG_KERNEL_IMAGE": None,
    "EG_KERNEL_EXECUTOR_IMAGE": "Spark on Kubernetes (EG's spark_*_kubernetes kernelspecs) is not supported by egd",
    "EG_MIRROR_WORKING_DIRS": None, "EG_PROHIBITED_UIDS": None, "EG_PROHIBITED_GIDS": None,
    "EG_ALTERNATE_SIGINT": "EG reads it from a kernelspec's env, not from its own environment",
    "EG_DOCKER_NETWORK": None, "EG_DOCKER_MODE": None, "EG_REMOVE_CONTAINER": None,
}
#: Variables of EG's environment that are not EG settings but that egd's yarn driver takes as settings.
_YARN_PROCESS_ENV = {"HADOOP_CONF_DIR": "hadoop_conf_dir", "YARN_CONF_DIR": "hadoop_conf_dir",
                     "JAVA_HOME": "java_home", "SPARK_HOME": "spark_home"}

#: EG's default classes: set to these, a class setting changes nothing.
_DEFAULT_CLASSES = {
    "kernel_spec_manager_class": "jupyter_client.kernelspec.KernelSpecManager",
    "kernel_spec_cache_class": "enterprise_gateway.services.kernelspecs.KernelSpecCache",
    "kernel_manager_class": "enterprise_gateway.services.kernels.remotemanager.RemoteMappingKernelManager",
    "kernel_session_manager_class":
        "enterprise_gateway.services.sessions.kernelsessionmanager.FileKernelSessionManager",
    "authorizer_class": "jupyter_server.auth.authorizer.AllowAllAuthorizer",
}
_CLASS_REASONS = {
    "kernel_spec_manager_class": "egd finds kernelspecs with jupyter_client's KernelSpecManager only",
    "kernel_spec_cache_class": "egd has no kernelspec cache class",
    "kernel_manager_class": "egd's kernel manager is not pluggable; drivers are (docs/writing-a-driver.rst)",
    "kernel_session_manager_class": "egd's state store is state.store (sqlite, postgresql or none)",
    "authorizer_class": "egd's authorization is auth.* and kernels.authorized_users (docs/security.rst)",
}

#: EG process proxies and the egd driver of each; others have no egd driver.
_PROXY_DRIVERS = {"LocalProcessProxy": "local", "DistributedProcessProxy": "ssh", "YarnClusterProcessProxy": "yarn",
                  "KubernetesProcessProxy": "kubernetes", "DockerProcessProxy": "docker",
                  "DockerSwarmProcessProxy": "docker"}
#: The drivers whose settings EG's settings may give, in the order their sections are written (and their
#: callback ports given out).
_REMOTE_DRIVERS = ("ssh", "yarn", "kubernetes", "docker")
#: EG's scripts that create a kernel's pod or container from the gateway: egd's container drivers create it
#: instead, for EG's kernelspecs whose argv runs one of them (the others run spark-submit: Spark on Kubernetes).
_EG_CONTAINER_LAUNCHERS = ("launch_kubernetes.py", "launch_docker.py")
#: EG's process_proxy.config keys egd's container drivers honour in an EG kernelspec.
_CONTAINER_SPEC_KEYS = ("image_name", "authorized_users", "unauthorized_users")
#: Spark settings egd's yarn driver sets itself (its own win over a kernelspec's spark_conf).
_EGD_SPARK_CONF = {
    "spark.yarn.submit.waitAppCompletion", "spark.yarn.maxAppAttempts", "spark.yarn.am.waitTime", "spark.yarn.tags",
    "spark.yarn.appMasterEnv.PYSPARK_PYTHON", "spark.yarn.appMasterEnv.PYSPARK_DRIVER_PYTHON",
    "spark.executorEnv.PYSPARK_PYTHON", "spark.app.name", "spark.submit.deployMode", "spark.master",
    "spark.yarn.queue",
}
#: Spark settings that are resources egd asks for from the kernelspec's config (and the client's KERNEL_*).
_SPARK_RESOURCES = {"spark.driver.memory": "driver_memory", "spark.driver.cores": "driver_cores",
                    "spark.executor.memory": "executor_memory", "spark.executor.cores": "executor_cores",
                    "spark.executor.instances": "num_executors"}
_SPARK_OPTION_RESOURCES = {"--driver-memory": "driver_memory", "--driver-cores": "driver_cores",
                           "--executor-memory": "executor_memory", "--executor-cores": "executor_cores",
                           "--num-executors": "num_executors"}
_SPARK_OPTION_CONF = {"--jars": "spark.jars", "--packages": "spark.jars.packages",
                      "--repositories": "spark.jars.repositories", "--exclude-packages": "spark.jars.excludes",
                      "--driver-java-options": "spark.driver.extraJavaOptions",
                      "--driver-library-path": "spark.driver.extraLibraryPath",
                      "--driver-class-path": "spark.driver.extraClassPath"}
#: The path EG's YARN endpoints end with (egd's RM addresses are without it).
_RM_PATH = "/ws/v1/cluster"
_SECRET_WORDS = ("TOKEN", "PWD", "PASSWORD", "SECRET")


class BadInput(Exception):
    """The input cannot be read as an EG configuration; the message says what and where."""


@dataclass
class Value:
    """One setting as EG would see it: its value and where it came from (``env``, ``file`` or ``flag``)."""

    value: Any
    origin: str
    source: str


@dataclass
class Report:
    """What was carried over where, what was not and why, and what the operator still has to do."""

    carried: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    def carry(self, source: str, target: str) -> None:
        """``source`` is carried over to ``target``."""
        self.carried.append(f"{source} -> {target}")

    def drop(self, source: str, why: str) -> None:
        """``source`` is not carried over, because ``why``."""
        self.not_carried.append(f"{source}: {why}")

    def text(self, written: list[str]) -> str:
        """The report, as printed and written to the report file."""
        lines = ["egd migrate-eg report", "", "Written:", *(f"  {w}" for w in written), "",
                 f"Not carried over ({len(self.not_carried)}):"]
        lines += [f"  {item}" for item in self.not_carried] or ["  (nothing)"]
        lines += ["", f"Carried over ({len(self.carried)}):"]
        lines += [f"  {item}" for item in self.carried] or ["  (nothing)"]
        if self.next_steps:
            lines += ["", "Notes and next steps:", *(f"  - {step}" for step in self.next_steps)]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Reading EG's configuration
# ---------------------------------------------------------------------------------------------------------

_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$")


def read_env_file(path: str) -> list[tuple[str, str | None, str]]:
    """``(name, value, source)`` of each ``KEY=VALUE`` line of a systemd EnvironmentFile or docker env file
    (``#`` and ``;`` comments, an optional ``export``, values in matching quotes unquoted). A docker-style
    ``KEY`` alone has no value (None). :class:`BadInput` on a line that is neither."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read the env file {path}: {exc}") from None
    found: list[tuple[str, str | None, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        match = _ENV_LINE.match(stripped)
        if not match:
            raise BadInput(f"{path}:{number}: not a KEY=VALUE line")
        value = match.group(2)
        if value is not None:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
        found.append((match.group(1), value, f"{path}:{number} {match.group(1)}"))
    return found


def _literal_target(node: ast.expr) -> tuple[str, str] | None:
    """``(Class, trait)`` of ``c.Class.trait``; None for any other target."""
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "c"):
        return node.value.attr, node.attr
    return None


def read_config_file(path: str, report: Report) -> list[tuple[str, str, Value]]:
    """``(Class, trait, value)`` of each ``c.Class.trait = <literal>`` of an EG config file (``.py``, parsed and
    never run; or ``.json``). Anything else in a ``.py`` file is reported with its line, not carried over."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read the config file {path}: {exc}") from None
    name = os.path.basename(path)
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BadInput(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise BadInput(f"{path}: must map class names to their settings")
        return [(cls, trait, Value(value, "file", f"{name} {cls}.{trait}"))
                for cls, traits in data.items() for trait, value in traits.items()]
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        raise BadInput(f"{path}:{exc.lineno}: not valid Python: {exc.msg}") from None
    found = []
    for statement in tree.body:
        where = f"{name}:{statement.lineno}"
        code = (ast.get_source_segment(text, statement) or "").splitlines()[0][:120]
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring or bare constant: no effect
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name) and statement.targets[0].id == "c"
                and isinstance(statement.value, ast.Call) and isinstance(statement.value.func, ast.Name)
                and statement.value.func.id == "get_config"):
            continue  # c = get_config(): the standard first line
        target: tuple[str, str] | None = None
        value_node: ast.expr | None = None
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value_node = _literal_target(statement.targets[0]), statement.value
        elif isinstance(statement, ast.AnnAssign):
            target, value_node = _literal_target(statement.target), statement.value
        if target is None or value_node is None:
            report.drop(f"{where} `{code}`", "not a c.Class.trait = <literal> assignment; egd migrate-eg never "
                        "runs the file, so this statement has no effect on the migration")
            continue
        try:
            value = ast.literal_eval(value_node)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            shown = "code not shown: it sets a secret" if _secret(target[1]) else f"`{code}`"
            report.drop(f"{where} c.{target[0]}.{target[1]}", f"not a literal ({shown}); egd migrate-eg never runs "
                        "the file: put the value itself in egd's config")
            continue
        found.append((target[0], target[1], Value(value, "file", f"{where} c.{target[0]}.{target[1]}")))
    return found


def read_command_line(argv: list[str]) -> tuple[list[tuple[str, str, Value]], list[str]]:
    """``(Class, trait, value)`` of EG's command-line options, and its flags (``--debug``, ...). Leading words
    that are not options (``jupyter enterprisegateway``) are skipped. :class:`BadInput` for an option EG does
    not accept."""
    tokens = list(argv)
    while tokens and not tokens[0].startswith("-"):
        tokens.pop(0)
    found: list[tuple[str, str, Value]] = []
    flags: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("-") or token in ("-", "--"):
            raise BadInput(f"EG command line: unexpected argument {token!r} (EG takes only options)")
        name, has_value, value = token.lstrip("-").partition("=")
        if name in _FLAGS and not has_value:
            flags.append(name)
            continue
        if "." in name:
            cls, _, trait = name.partition(".")
            trait = trait.replace("-", "_")
        elif name in _ALIASES or name.replace("_", "-") in _ALIASES:
            cls, _, trait = _ALIASES.get(name, _ALIASES.get(name.replace("_", "-"), "")).partition(".")
        else:
            raise BadInput(f"EG command line: {token!r} is not an option Enterprise Gateway accepts "
                           f"(its aliases: {', '.join('--' + a for a in sorted(_ALIASES))}; or --Class.trait=value)")
        if not has_value:
            if i >= len(tokens):
                raise BadInput(f"EG command line: {token} needs a value")
            value = tokens[i]
            i += 1
        found.append((cls, trait, Value(value, "flag", f"command line --{cls}.{trait}" if "." in name
                                        else f"command line --{name}")))
    return found, flags


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------

def _text(v: Value) -> str:
    if isinstance(v.value, str):
        return v.value
    if v.origin == "file" and v.value is not None and not isinstance(v.value, (list, tuple, set, dict)):
        return str(v.value)
    raise ValueError(f"must be a string, got {type(v.value).__name__}")


def _int(v: Value) -> int:
    if isinstance(v.value, bool):
        raise ValueError("must be a whole number")
    if isinstance(v.value, int):
        return v.value
    try:
        return int(str(v.value).strip())
    except ValueError:
        raise ValueError(f"must be a whole number, got {v.value!r}") from None


def _float(v: Value) -> float:
    if isinstance(v.value, bool):
        raise ValueError("must be a number")
    try:
        return float(v.value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, got {v.value!r}") from None


def _bool(v: Value) -> bool:
    if isinstance(v.value, bool):
        return v.value
    text = str(v.value).strip().lower()
    if text == "true" or (v.origin == "flag" and text in ("1", "yes", "on")):
        return True
    if text in ("false", "") or (v.origin == "flag" and text in ("0", "no", "off")):
        return False
    # EG reads most of its variables as `value.lower() == "true"`: anything else is false there, and guessing
    # would switch on what EG had off.
    raise ValueError(f"must be true or false, got {v.value!r}")


def _list(v: Value) -> list[str]:
    """A list: EG's environment variables are comma-separated, a Python literal list on the command line is
    taken as one (traitlets' form), repeated command-line options were gathered in a list already."""
    value = v.value
    if isinstance(value, str):
        if v.origin == "flag" and value.strip().startswith("["):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ValueError(f"not a list: {value!r}") from None
        elif v.origin == "flag":
            value = [value]
        else:
            value = value.split(",")
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"must be a list, got {type(value).__name__}")
    return [str(item).strip() for item in value if str(item).strip()]


def _comma_list(v: Value) -> list[str]:
    """EG's CORS settings: one string, comma-separated, wherever it comes from."""
    if isinstance(v.value, (list, tuple)):
        return [str(i).strip() for i in v.value if str(i).strip()]
    return [s.strip() for s in _text(v).split(",") if s.strip()]


def _rm_address(url: str) -> str:
    """EG's YARN endpoint (``http://rm:8088/ws/v1/cluster``) as egd's RM address (``http://rm:8088``)."""
    url = url.strip().rstrip("/")
    return url[: -len(_RM_PATH)] if url.endswith(_RM_PATH) else url


def _secret(name: str) -> bool:
    return any(word in name.upper() for word in _SECRET_WORDS)


# ---------------------------------------------------------------------------------------------------------
# The migration
# ---------------------------------------------------------------------------------------------------------

class Migration:
    """One run of ``egd migrate-eg``: settings in, egd's config, kernelspecs and report out."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.report = Report()
        self.raw: dict[str, Any] = {}
        #: Where each written key came from, for a key egd's checks refuse.
        self.sources: dict[str, list[str]] = {}
        #: Driver settings, written for the drivers the kernelspecs (or EG's global settings) need.
        self.ssh: dict[str, Any] = {}
        self.yarn: dict[str, Any] = {}
        self.kubernetes: dict[str, Any] = {}
        self.docker: dict[str, Any] = {}
        self.rms: list[tuple[str, str]] = []
        self.wants_ssh = False
        self.wants_yarn = False
        self.wants_kubernetes = False
        self.wants_docker = False
        #: EG_RESPONSE_PORT and its source: each egd driver listens on a port of its own, given out in finish().
        self.response_port: tuple[int, str] | None = None
        self.token: tuple[str, str] | None = None
        self.written_specs: dict[str, str] = {}
        #: Whether EG's config files were named with --config-file (then EG's own --config is not read).
        self.config_file_options = False
        #: EG's cull_busy and its source: a busy timeout needs cull_idle_timeout, known only at the end.
        self.cull_busy: tuple[bool, str] | None = None

    # -- writing keys ------------------------------------------------------------------------------------

    def put(self, path: str, value: Any, source: str) -> None:
        """Set ``path`` (``section.key``) of the config to ``value``, carried over from ``source``."""
        section, key = path.split(".", 1)
        self.raw.setdefault(section, {})[key] = value
        self.sources.setdefault(path, []).append(source)
        self.report.carry(source, path)

    def put_driver(self, driver: str, key: str, value: Any, source: str) -> None:
        """Set a setting of ``drivers.<driver>`` (written if the driver is configured)."""
        settings: dict[str, Any] = getattr(self, driver)
        previous = settings.get(key)
        if previous is not None and previous[0] == value:
            previous[1].append(source)
            return
        if previous is not None:  # one value per driver: the later source wins, the earlier ones are reported
            for earlier in previous[1]:
                self.report.drop(earlier, f"drivers.{driver}.{key.split(':')[0]} takes the value of {source} "
                                 "(egd has one value for the driver)")
        settings[key] = (value, [source])

    # -- EG's settings ----------------------------------------------------------------------------------

    def apply(self, cls: str, trait: str, v: Value) -> None:
        """Carry over one EG setting (``Class.trait``), or report why not."""
        canonical = _CLASS_ALIASES.get(cls)
        if canonical is None:
            self.report.drop(v.source, f"{cls} is not a class Enterprise Gateway configures; nothing carried")
            return
        handler = getattr(self, f"_{canonical}_{trait}", None)
        try:
            if handler is None:
                self.report.drop(v.source, self._unknown_trait(canonical, trait))
            else:
                handler(v)
        except ValueError as exc:
            self.report.drop(v.source, f"not carried over: {exc}")

    def _unknown_trait(self, canonical: str, trait: str) -> str:
        reasons = {
            "MappingKernelManager": "egd has no equivalent of this kernel manager setting",
            "KernelManager": "egd has no equivalent of this kernel manager setting",
            "KernelSpecManager": "egd has no equivalent of this kernelspec manager setting",
            "Application": "egd has no equivalent (its logging is logging.level and logging.format)",
        }
        return reasons.get(canonical, f"{trait} is not an Enterprise Gateway 3.3 setting egd migrate-eg knows")

    # EnterpriseGatewayApp: server
    def _EnterpriseGatewayApp_ip(self, v: Value) -> None:  # noqa: N802 - named after EG's class and trait
        self.put("server.ip", _text(v), v.source)

    def _EnterpriseGatewayApp_port(self, v: Value) -> None:  # noqa: N802
        self.put("server.port", _int(v), v.source)

    def _EnterpriseGatewayApp_port_retries(self, v: Value) -> None:  # noqa: N802
        self.report.drop(v.source, "egd listens on server.port or fails to start; it never tries the next port")

    def _EnterpriseGatewayApp_base_url(self, v: Value) -> None:  # noqa: N802
        self.put("server.base_url", _text(v), v.source)

    def _EnterpriseGatewayApp_auth_token(self, v: Value) -> None:  # noqa: N802
        token = _text(v)
        if not token:
            self.report.carry(v.source, "nothing (empty: no token, as in EG)")
            return
        if len(token) < 16 or any(c.isspace() for c in token):
            raise ValueError("egd needs a token of at least 16 characters without spaces; make a new one "
                             "(`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`) and give it to "
                             "the clients and to egd as EGD_AUTH_TOKEN")
        self.token = (token, v.source)

    def _EnterpriseGatewayApp_allow_credentials(self, v: Value) -> None:  # noqa: N802
        self.put("server.allow_credentials", _bool(v), v.source)

    def _EnterpriseGatewayApp_allow_headers(self, v: Value) -> None:  # noqa: N802
        self.put("server.allow_headers", _comma_list(v), v.source)

    def _EnterpriseGatewayApp_allow_methods(self, v: Value) -> None:  # noqa: N802
        self.put("server.allow_methods", _comma_list(v), v.source)

    def _EnterpriseGatewayApp_allow_origin(self, v: Value) -> None:  # noqa: N802
        self.put("server.allow_origin", _comma_list(v), v.source)

    def _EnterpriseGatewayApp_expose_headers(self, v: Value) -> None:  # noqa: N802
        self.report.drop(v.source, "egd sends no Access-Control-Expose-Headers (its API needs none)")

    def _EnterpriseGatewayApp_max_age(self, v: Value) -> None:  # noqa: N802
        self.put("server.cors_max_age", _int(v), v.source)

    def _EnterpriseGatewayApp_trust_xheaders(self, v: Value) -> None:  # noqa: N802
        if not _bool(v):
            self.report.carry(v.source, "nothing (false: egd does not trust X-Forwarded-* headers either)")
            return
        self.report.drop(v.source, "egd does not take client addresses or schemes from X-Forwarded-* / X-Real-Ip "
                         "headers")

    def _EnterpriseGatewayApp_certfile(self, v: Value) -> None:  # noqa: N802
        self.put("server.certfile", _text(v), v.source)

    def _EnterpriseGatewayApp_keyfile(self, v: Value) -> None:  # noqa: N802
        self.put("server.keyfile", _text(v), v.source)

    def _EnterpriseGatewayApp_client_ca(self, v: Value) -> None:  # noqa: N802
        self.put("server.client_ca", _text(v), v.source)

    def _EnterpriseGatewayApp_ssl_version(self, v: Value) -> None:  # noqa: N802
        self.report.drop(v.source, "egd has no TLS protocol version setting: Twisted's TLS defaults apply")

    def _EnterpriseGatewayApp_max_kernels(self, v: Value) -> None:  # noqa: N802
        self.put("kernels.max_kernels", _int(v), v.source)

    def _EnterpriseGatewayApp_max_kernels_per_user(self, v: Value) -> None:  # noqa: N802
        value = _int(v)
        if value < 0:
            self.report.carry(v.source, "nothing (-1: no limit, egd's default)")
            return
        self.put("kernels.max_kernels_per_user", value, v.source)

    def _EnterpriseGatewayApp_default_kernel_name(self, v: Value) -> None:  # noqa: N802
        name = _text(v)
        if name:
            self.put("kernels.default_kernel_name", name, v.source)
        else:
            self.report.carry(v.source, "nothing (empty: jupyter's default, python3, as egd's)")

    def _EnterpriseGatewayApp_list_kernels(self, v: Value) -> None:  # noqa: N802
        self.put("server.list_kernels", _bool(v), v.source)

    def _EnterpriseGatewayApp_client_envs(self, v: Value) -> None:  # noqa: N802
        self.put("kernels.client_envs", _list(v), v.source)

    _EnterpriseGatewayApp_env_whitelist = _EnterpriseGatewayApp_client_envs

    def _EnterpriseGatewayApp_inherited_envs(self, v: Value) -> None:  # noqa: N802
        names = _list(v)
        # egd's defaults stay: without PATH and HOME the kernels egd starts would not find their programs.
        merged = [*DEFAULT_INHERITED_ENVS, *(n for n in names if n not in DEFAULT_INHERITED_ENVS)]
        self.put("kernels.inherited_envs", merged, v.source)
        self.report.next_steps.append(f"kernels.inherited_envs has EG's list plus egd's defaults "
                                      f"({', '.join(DEFAULT_INHERITED_ENVS)}); remove any you do not want")

    _EnterpriseGatewayApp_env_process_whitelist = _EnterpriseGatewayApp_inherited_envs

    def _EnterpriseGatewayApp_kernel_headers(self, v: Value) -> None:  # noqa: N802
        if not _list(v):
            self.report.carry(v.source, "nothing (empty)")
            return
        self.report.drop(v.source, "egd passes no request headers to kernel launches")

    def _EnterpriseGatewayApp_remote_hosts(self, v: Value) -> None:  # noqa: N802
        hosts = _list(v)
        if not hosts:
            raise ValueError("no host listed")
        self.put_driver("ssh", "hosts", hosts, v.source)
        self.wants_ssh = True

    def _EnterpriseGatewayApp_load_balancing_algorithm(self, v: Value) -> None:  # noqa: N802
        algorithm = _text(v).strip().lower()
        if algorithm not in ("round-robin", "least-connection"):
            raise ValueError(f"EG knows round-robin and least-connection, not {algorithm!r}")
        self.put_driver("ssh", "placement", algorithm, v.source)

    def _EnterpriseGatewayApp_yarn_endpoint(self, v: Value) -> None:  # noqa: N802
        if _text(v):
            self.rms.append((_rm_address(_text(v)), v.source))
            self.wants_yarn = True

    _EnterpriseGatewayApp_alt_yarn_endpoint = _EnterpriseGatewayApp_yarn_endpoint

    def _EnterpriseGatewayApp_yarn_endpoint_security_enabled(self, v: Value) -> None:  # noqa: N802
        if _bool(v):
            self.report.drop(v.source, "Kerberos (SPNEGO to the ResourceManager, keytabs for spark-submit) is not "
                             "supported by egd yet")
        else:
            self.report.carry(v.source, "nothing (false: no Kerberos, as egd)")

    def _EnterpriseGatewayApp_conductor_endpoint(self, v: Value) -> None:  # noqa: N802
        if _text(v):
            self.report.drop(v.source, "egd has no driver for IBM Spectrum Conductor")

    def _EnterpriseGatewayApp_impersonation_enabled(self, v: Value) -> None:  # noqa: N802
        enabled = _bool(v)
        self.put_driver("ssh", "impersonation", enabled, v.source)
        self.put_driver("yarn", "impersonation", enabled, v.source)

    def _EnterpriseGatewayApp_unauthorized_users(self, v: Value) -> None:  # noqa: N802
        self.put("kernels.unauthorized_users", _list(v), v.source)

    def _EnterpriseGatewayApp_authorized_users(self, v: Value) -> None:  # noqa: N802
        self.put("kernels.authorized_users", _list(v), v.source)

    def _EnterpriseGatewayApp_authorized_origin(self, v: Value) -> None:  # noqa: N802
        if _text(v):
            self.report.drop(v.source, "egd does not match client certificates' host names; server.client_ca "
                             "requires a certificate signed by that CA")

    def _EnterpriseGatewayApp_port_range(self, v: Value) -> None:  # noqa: N802
        text = _text(v).strip()
        if text in ("", "0..0"):
            self.report.carry(v.source, "nothing (0..0: any port, egd's default)")
            return
        self.put("kernels.port_range", text, v.source)

    def _EnterpriseGatewayApp_ws_ping_interval(self, v: Value) -> None:  # noqa: N802
        self.put("server.ws_ping_interval", _int(v), v.source)

    def _EnterpriseGatewayApp_dynamic_config_interval(self, v: Value) -> None:  # noqa: N802
        if _int(v) <= 0:
            self.report.carry(v.source, "nothing (0: off)")
            return
        self.report.drop(v.source, "egd does not poll its config file: it re-reads it on SIGHUP "
                         "(systemctl reload egd)")

    def _EnterpriseGatewayApp_availability_mode(self, v: Value) -> None:  # noqa: N802
        mode = (_text(v) if v.value is not None else "").lower()
        if mode in ("", "none"):
            self.report.carry(v.source, "nothing (not set)")
        elif mode == "standalone":
            self.put("state.store", "sqlite", v.source)
        elif mode == "replication":
            self.report.drop(v.source, "several gateways share their kernels through state.store: postgresql, "
                             "which needs state.dsn and state.secret_key_file (`egd state-key`); set them")
        else:
            raise ValueError(f"EG knows standalone and replication, not {mode!r}")

    def _class_setting(self, trait: str, v: Value) -> None:
        name = _text(v)
        if name == _DEFAULT_CLASSES[trait]:
            self.report.carry(v.source, "nothing (EG's default class)")
        else:
            self.report.drop(v.source, _CLASS_REASONS[trait])

    def _EnterpriseGatewayApp_kernel_spec_manager_class(self, v: Value) -> None:  # noqa: N802
        self._class_setting("kernel_spec_manager_class", v)

    def _EnterpriseGatewayApp_kernel_spec_cache_class(self, v: Value) -> None:  # noqa: N802
        self._class_setting("kernel_spec_cache_class", v)

    def _EnterpriseGatewayApp_kernel_manager_class(self, v: Value) -> None:  # noqa: N802
        self._class_setting("kernel_manager_class", v)

    def _EnterpriseGatewayApp_kernel_session_manager_class(self, v: Value) -> None:  # noqa: N802
        self._class_setting("kernel_session_manager_class", v)

    def _EnterpriseGatewayApp_authorizer_class(self, v: Value) -> None:  # noqa: N802
        self._class_setting("authorizer_class", v)

    def _EnterpriseGatewayApp_log_level(self, v: Value) -> None:  # noqa: N802
        self._Application_log_level(v)

    # Application (jupyter_core): logging, config file
    def _Application_log_level(self, v: Value) -> None:  # noqa: N802
        levels = {"10": "debug", "20": "info", "30": "warn", "40": "error", "50": "critical", "debug": "debug",
                  "info": "info", "warn": "warn", "warning": "warn", "error": "error", "critical": "critical"}
        level = levels.get(str(v.value).strip().lower())
        if level is None:
            raise ValueError(f"not a log level: {v.value!r}")
        self.put("logging.level", level, v.source)

    def _Application_config_file(self, v: Value) -> None:  # noqa: N802
        if self.config_file_options:
            self.report.drop(v.source, "not read: --config-file names EG's config files")
        else:
            self.report.carry(v.source, "read as EG's config file")

    # The kernel manager (culling, shutdown)
    def _MappingKernelManager_cull_idle_timeout(self, v: Value) -> None:  # noqa: N802
        self.put("kernels.cull_idle_timeout", _float(v), v.source)

    def _MappingKernelManager_cull_interval(self, v: Value) -> None:  # noqa: N802
        self.put("kernels.cull_interval", _float(v), v.source)

    def _MappingKernelManager_cull_connected(self, v: Value) -> None:  # noqa: N802
        self.put("kernels.cull_connected", _bool(v), v.source)

    def _MappingKernelManager_cull_busy(self, v: Value) -> None:  # noqa: N802
        self.cull_busy = _bool(v), v.source  # needs cull_idle_timeout: resolved in finish()

    def _KernelManager_shutdown_wait_time(self, v: Value) -> None:  # noqa: N802
        self.put("kernels.shutdown_wait", _float(v), v.source)

    # Kernelspecs
    def _KernelSpecManager_allowed_kernelspecs(self, v: Value) -> None:  # noqa: N802
        names = _list(v)
        if names:
            self.put("kernels.allowed_kernelspecs", names, v.source)
        else:
            self.report.carry(v.source, "nothing (empty: every kernelspec)")

    _KernelSpecManager_whitelist = _KernelSpecManager_allowed_kernelspecs

    def _KernelSpecManager_ensure_native_kernel(self, v: Value) -> None:  # noqa: N802
        self.report.drop(v.source, "egd offers the kernelspecs jupyter_client finds (python3 when ipykernel is "
                         "installed), nothing more")

    def _KernelSpecCache_cache_enabled(self, v: Value) -> None:  # noqa: N802
        self.report.drop(v.source, "egd has no kernelspec cache: it reads kernelspecs when asked, off its event "
                         "loop")

    # Kernel sessions (persistence)
    def _KernelSessionManager_enable_persistence(self, v: Value) -> None:  # noqa: N802
        if _bool(v):
            self.put("state.store", "sqlite", v.source)
        else:
            self.report.drop(v.source, "egd records its kernels by default (state.store: sqlite) and re-attaches "
                             "to them after a restart; set state.store: none to turn that off")

    def _KernelSessionManager_persistence_root(self, v: Value) -> None:  # noqa: N802
        root = _text(v)
        if root:
            self.put("state.path", os.path.join(root, "egd-state.sqlite"), v.source)

    def _KernelSessionManager_webhook_url(self, v: Value) -> None:  # noqa: N802
        self.report.drop(v.source, "egd has no webhook store; several gateways share kernels through "
                         "state.store: postgresql")

    _KernelSessionManager_webhook_username = _KernelSessionManager_webhook_url
    _KernelSessionManager_webhook_password = _KernelSessionManager_webhook_url
    _KernelSessionManager_auth_type = _KernelSessionManager_webhook_url

    # -- EG variables that are not traits -----------------------------------------------------------------

    def apply_env_only(self, name: str, v: Value) -> None:
        """An EG variable read by EG's process proxies or managers (not a trait)."""
        try:
            self._env_only(name, v)
        except ValueError as exc:
            self.report.drop(v.source, f"not carried over: {exc}")

    def _env_only(self, name: str, v: Value) -> None:
        reason = _ENV_ONLY.get(name)
        if reason is not None:
            self.report.drop(v.source, reason)
        elif name == "EG_KERNEL_LAUNCH_TIMEOUT":
            seconds = _float(v)
            self.put("kernels.launch_timeout", seconds, v.source)
            if seconds > 300:
                self.put("kernels.max_launch_timeout", seconds, v.source)
        elif name == "EG_REMOTE_USER":
            self.put_driver("ssh", "user", _text(v), v.source)
        elif name == "EG_SSH_PORT":
            self.put_driver("ssh", "ssh_options:Port", f"Port={_int(v)}", v.source)
        elif name == "EG_REMOTE_GSS_SSH":
            if _bool(v):
                self.put_driver("ssh", "ssh_options:GSSAPIAuthentication", "GSSAPIAuthentication=yes", v.source)
                self.report.next_steps.append("GSSAPI ssh logins need a Kerberos ticket for egd's user; egd does "
                                              "not obtain or renew one")
            else:
                self.report.carry(v.source, "nothing (false)")
        elif name == "EG_KERNEL_LOG_DIR":
            self.put_driver("ssh", "log_dir", _text(v), v.source)
        elif name == "EG_RESPONSE_IP":
            for driver in _REMOTE_DRIVERS:
                self.put_driver(driver, "callback_host", _text(v), v.source)
        elif name == "EG_RESPONSE_PORT":
            port = _int(v)
            if not 0 <= port <= 65535:
                raise ValueError(f"not a port: {port}")
            self.response_port = port, v.source
        elif name == "EG_YARN_SHUTDOWN_WAIT_TIME":
            self.put_driver("yarn", "kill_timeout", _float(v), v.source)
        else:
            self._container_env(name, v)

    def _container_env(self, name: str, v: Value) -> None:
        """EG's variables for its Kubernetes and Docker process proxies (EG 3.3's k8s.py, container.py,
        docker_swarm.py and launch_docker.py)."""
        if name == "EG_NAMESPACE":
            self.put_driver("kubernetes", "namespace", _text(v).strip(), v.source)
        elif name == "EG_SHARED_NAMESPACE":
            # EG's default (false) creates a namespace for each kernel; true puts every kernel in EG_NAMESPACE.
            self.put_driver("kubernetes", "namespace_mode", "shared" if _bool(v) else "per-kernel", v.source)
        elif name == "EG_DEFAULT_KERNEL_SERVICE_ACCOUNT_NAME":
            self.put_driver("kubernetes", "service_account", _text(v).strip(), v.source)
        elif name == "EG_KERNEL_IMAGE":
            # EG's image for a kernelspec without image_name: the drivers' default image.
            for driver in ("kubernetes", "docker"):
                self.put_driver(driver, "image", _text(v).strip(), v.source)
        elif name == "EG_DOCKER_NETWORK":
            self.put_driver("docker", "network", _text(v).strip(), v.source)
        elif name == "EG_MIRROR_WORKING_DIRS":
            if not _bool(v):
                self.report.carry(v.source, "nothing (false, EG's default: EG did not give kernels "
                                  "KERNEL_WORKING_DIR)")
                return
            self.report.drop(v.source, "egd has no such setting: a kernel always gets the client's "
                             "KERNEL_WORKING_DIR, and egd's launcher changes to it when that directory exists in the "
                             "container (egd's own kernelspecs); EG's images start where their image says. Mount "
                             "the directories with the pod or container template (volumes) and set workingDir "
                             "there")
        elif name in ("EG_PROHIBITED_UIDS", "EG_PROHIBITED_GIDS"):
            kind = name[len("EG_PROHIBITED_"):-1]  # UID or GID
            ids = _list(v)
            if not all(i.lstrip("-").isdigit() for i in ids):
                raise ValueError(f"not a list of numeric ids: {v.value!r}")
            others = sorted({int(i) for i in ids} - {0})
            root = f"egd refuses KERNEL_{kind} 0 (root) unless drivers.kubernetes/docker.allow_root"
            if not others:
                self.report.carry(v.source, f"nothing ({root}; KERNEL_{kind} is honoured only with allow_uid)")
                return
            self.report.drop(v.source, f"egd has no list of prohibited ids: {root}, and honours KERNEL_{kind} only "
                             f"with drivers.kubernetes/docker.allow_uid (off), then any id but 0; "
                             f"{', '.join(map(str, others))} would not be refused")
        elif name == "EG_DOCKER_MODE":
            if _text(v).strip().lower() == "docker":
                self.report.carry(v.source, "nothing (docker: egd creates plain containers)")
                return
            self.report.drop(v.source, "egd creates no Swarm services: every kernel, also of a DockerSwarmProcessProxy "
                             "kernelspec, is a plain container of the engine at drivers.docker.url")
        elif name == "EG_REMOVE_CONTAINER":
            if _bool(v):
                self.report.carry(v.source, "nothing (true: egd always removes a kernel's container)")
                return
            self.report.drop(v.source, "egd always removes a kernel's container when the kernel ends (keeping its "
                             "log's last lines as the failure detail)")
        else:  # pragma: no cover - every name of _ENV_ONLY is handled above
            self.report.drop(v.source, _NO_EQUIVALENT)

    def apply_process_env(self, name: str, v: Value) -> None:
        """A variable of EG's environment (from an env file) that is not an EG setting."""
        if name in _YARN_PROCESS_ENV:
            self.put_driver("yarn", _YARN_PROCESS_ENV[name], _text(v), v.source)
        elif name.startswith("EG_") or name.startswith("KG_"):
            self.report.drop(v.source, "not an Enterprise Gateway 3.3 setting egd migrate-eg knows")
        else:
            self.report.drop(v.source, "not an EG setting: EG's kernels saw it through inherited_envs; egd gives a "
                             "kernel only kernels.inherited_envs of its own environment (add the name there, and "
                             "set the variable in egd's environment)")

    # -- kernelspecs ------------------------------------------------------------------------------------

    def migrate_specs(self, directories: list[Path]) -> None:
        """Every kernelspec of ``directories`` (each a kernelspec, or a directory of them; the first of a name
        wins, as in jupyter_client) as an egd kernelspec under the output directory, or reported."""
        seen: dict[str, Path] = {}
        for directory in directories:
            candidates = [directory] if (directory / "kernel.json").is_file() else sorted(directory.iterdir())
            for spec_dir in candidates:
                if not (spec_dir / "kernel.json").is_file():
                    continue
                name = spec_dir.name.lower()
                if name in seen:
                    self.report.drop(f"kernelspec {spec_dir}", f"shadowed by {seen[name]} (the first of a name wins, "
                                     "as in jupyter_client)")
                    continue
                seen[name] = spec_dir
                self._migrate_spec(name, spec_dir)

    def _migrate_spec(self, name: str, spec_dir: Path) -> None:
        where = f"kernelspec {name}"
        try:
            spec = json.loads((spec_dir / "kernel.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.report.drop(where, f"{spec_dir / 'kernel.json'} cannot be read: {exc}")
            return
        if not isinstance(spec, dict) or not isinstance(spec.get("argv"), list):
            self.report.drop(where, "kernel.json has no argv list")
            return
        metadata = dict(spec.get("metadata") or {})
        proxy = metadata.get("process_proxy")
        if isinstance(metadata.get("egd"), dict) or not isinstance(proxy, dict) or "class_name" not in proxy:
            self._write_spec(name, spec_dir, spec, "copied unchanged (local driver)" if not isinstance(
                metadata.get("egd"), dict) else "copied unchanged (already an egd kernelspec)")
            return
        class_name = str(proxy["class_name"]).rsplit(".", 1)[-1]
        driver = _PROXY_DRIVERS.get(class_name)
        if driver is None:
            self.report.drop(where, f"its process proxy {class_name} has no egd driver (egd has local, ssh, yarn, "
                             "kubernetes and docker); kernelspec not written")
            return
        if driver in ("kubernetes", "docker"):
            self._container_spec(name, spec_dir, spec, proxy, driver)
            return
        proxy_config = dict(proxy.get("config") or {})
        if str(proxy_config.get("yarn_endpoint_security_enabled", "")).lower() == "true":
            self.report.drop(where, "yarn_endpoint_security_enabled: Kerberos is not supported by egd yet; "
                             "kernelspec not written")
            return
        if driver == "yarn" and eg_spark_opts_variable(dict(spec.get("env") or {})) is None:
            self.report.drop(where, "it submits without SPARK_OPTS (dask-yarn), and egd finds an EG kernelspec's YARN "
                             "application by the tags it adds to SPARK_OPTS; kernelspec not written")
            return
        metadata.pop("process_proxy")
        native: dict[str, Any] | None
        if driver == "local":
            config = self._spec_config(name, driver, proxy_config)
            native = self._native(spec, metadata, "local", config, list(spec["argv"]), dict(spec.get("env") or {}))
            how = "native egd kernelspec (local driver)"
        elif driver == "ssh":
            native = self._native_ssh(name, spec, metadata, proxy_config)
            how = "native egd kernelspec (ssh driver, egd's launcher; EG's launcher scripts not copied)"
            self.wants_ssh = True
        else:
            native = self._native_yarn(name, spec_dir, spec, metadata, proxy_config)
            how = "native egd kernelspec (yarn driver, mode spark, egd's launcher; EG's scripts not copied)"
            self.wants_yarn = True
        if native is None:  # egd runs it as EG's kernelspec: copied with EG's process_proxy kept
            self._keep_eg_spec(name, spec_dir, spec, proxy, driver)
            return
        self._write_spec(name, spec_dir, native, how)

    def _container_spec(self, name: str, spec_dir: Path, spec: dict[str, Any], proxy: dict[str, Any],
                        driver: str) -> None:
        """An EG Kubernetes or Docker kernelspec: kept as EG's (egd's driver creates the pod or container EG's
        launch script would, from ``image_name``), or not written when it runs Spark on Kubernetes."""
        argv = [str(a) for a in spec["argv"]]
        if not any(os.path.basename(a) in _EG_CONTAINER_LAUNCHERS for a in argv):
            self.report.drop(f"kernelspec {name}", f"its argv runs {os.path.basename(argv[0]) if argv else 'nothing'}, "
                             f"not EG's {' or '.join(_EG_CONTAINER_LAUNCHERS)}: Spark on Kubernetes (spark-submit to "
                             "the API server) is not supported by egd; kernelspec not written")
            return
        setattr(self, f"wants_{driver}", True)
        self._keep_eg_spec(name, spec_dir, spec, proxy, driver)

    def _spec_config(self, name: str, driver: str, proxy_config: dict[str, Any]) -> dict[str, Any]:
        """EG's ``process_proxy.config`` as egd's ``metadata.egd.config`` keys; the rest reported."""
        where = f"kernelspec {name}: metadata.process_proxy.config"
        config: dict[str, Any] = {}
        for key, value in proxy_config.items():
            items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
            if key in ("authorized_users", "unauthorized_users") and items is not None:
                config[key] = [str(i).strip() for i in items if str(i).strip()]
                self.report.carry(f"{where}.{key}", f"metadata.egd.config.{key}")
            elif key == "remote_hosts" and driver == "ssh" and items is not None:
                config["hosts"] = [str(i).strip() for i in items if str(i).strip()]
                self.report.carry(f"{where}.{key}", "metadata.egd.config.hosts")
            elif key in ("yarn_endpoint", "alt_yarn_endpoint") and driver == "yarn" and isinstance(value, str):
                self.rms.append((_rm_address(value), f"{where}.{key}"))
            elif key == "yarn_endpoint_security_enabled":
                self.report.carry(f"{where}.{key}", "nothing (false)")
            elif key == "port_range" and driver == "ssh" and isinstance(value, str):
                config["port_range"] = value
                self.report.carry(f"{where}.{key}", "metadata.egd.config.port_range")
            elif key == "port_range":
                self.report.drop(f"{where}.{key}", "for this driver egd's port ranges are per driver "
                                 f"(drivers.{driver}.port_range) or gateway-wide (kernels.port_range)")
            else:
                self.report.drop(f"{where}.{key}", f"no egd equivalent for the {driver} driver")
        return config

    @staticmethod
    def _native(spec: Mapping[str, Any], metadata: dict[str, Any], driver: str, config: dict[str, Any],
                argv: list[str], env: dict[str, Any]) -> dict[str, Any]:
        native: dict[str, Any] = {"display_name": spec.get("display_name", ""), "language": spec.get("language", ""),
                                  "argv": argv}
        if env:
            native["env"] = env
        if "interrupt_mode" in spec:
            native["interrupt_mode"] = spec["interrupt_mode"]
        egd_meta: dict[str, Any] = {"driver": driver}
        if config:
            egd_meta["config"] = config
        native["metadata"] = {"egd": egd_meta, **metadata}
        return native

    @staticmethod
    def _launcher_option(argv: list[str], option: str) -> str | None:
        for i, item in enumerate(argv[:-1]):
            if item == f"--RemoteProcessProxy.{option}":
                return argv[i + 1]
        return None

    def _native_ssh(self, name: str, spec: Mapping[str, Any], metadata: dict[str, Any],
                    proxy_config: dict[str, Any]) -> dict[str, Any] | None:
        """EG's python_distributed shape (``python .../launch_ipykernel.py ...``, no Spark context) as an ssh
        kernelspec running ipykernel; None for anything else (run as EG's kernelspec)."""
        argv = [str(a) for a in spec["argv"]]
        if len(argv) < 2 or not argv[1].endswith("launch_ipykernel.py"):
            return None
        if (self._launcher_option(argv, "spark-context-initialization-mode") or "none") != "none":
            return None
        config = self._spec_config(name, "ssh", proxy_config)
        python = argv[0]
        if not os.path.isabs(python):
            # EG ran `python` from the host's PATH; egd runs its launcher with drivers.ssh.python.
            self.put_driver("ssh", "python", python, f"kernelspec {name}: argv[0]")
        self._ignored_launcher_options(name, argv, {"kernel-id", "response-address", "public-key", "port-range",
                                                    "spark-context-initialization-mode"})
        return self._native(spec, metadata, "ssh", config, [python, "-m", "ipykernel_launcher", "-f",
                                                            "{connection_file}"], dict(spec.get("env") or {}))

    def _ignored_launcher_options(self, name: str, argv: list[str], known: set[str]) -> None:
        for item in argv:
            if item.startswith("--RemoteProcessProxy.") and item.split(".", 1)[1] not in known:
                self.report.drop(f"kernelspec {name}: argv {item}", "an EG launcher option egd's launcher does not "
                                 "have")

    def _native_yarn(self, name: str, spec_dir: Path, spec: Mapping[str, Any], metadata: dict[str, Any],
                     proxy_config: dict[str, Any]) -> dict[str, Any] | None:
        """EG's spark_python_yarn_cluster shape (``bin/run.sh`` running spark-submit in cluster mode with EG's
        Python launcher) as a yarn kernelspec in mode spark; None for anything else (R, Scala, Dask: run as
        EG's kernelspec)."""
        argv = [str(a) for a in spec["argv"]]
        run_sh = Path(argv[0]) if argv else Path()
        try:
            script = run_sh.read_text(encoding="utf-8") if run_sh.name == "run.sh" else ""
        except (OSError, UnicodeDecodeError):
            script = ""
        if not script:  # the kernelspec's own copy, when the argv names where it will be installed
            local = spec_dir / "bin" / "run.sh"
            script = local.read_text(encoding="utf-8", errors="replace") if local.is_file() else ""
        env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
        if ("spark-submit" not in script or "launch_ipykernel.py" not in script
                or "--deploy-mode cluster" not in env.get("SPARK_OPTS", "")):
            return None
        where = f"kernelspec {name}"
        config = self._spec_config(name, "yarn", proxy_config)
        spark_conf, resources = self._spark_opts(where, env.pop("SPARK_OPTS"))
        config.update({"mode": "spark", **resources})
        if spark_conf:
            config["spark_conf"] = spark_conf
        python = env.pop("PYSPARK_PYTHON", "python")
        if "PYSPARK_PYTHON" in (spec.get("env") or {}):
            self.put_driver("yarn", "python", python, f"{where}: env.PYSPARK_PYTHON")
        if "SPARK_HOME" in env:
            self.put_driver("yarn", "spark_home", env.pop("SPARK_HOME"), f"{where}: env.SPARK_HOME")
        launch_opts = env.pop("LAUNCH_OPTS", "")
        if launch_opts.strip():
            self.report.drop(f"{where}: env.LAUNCH_OPTS", "options of EG's launcher; egd's launcher has none of them")
        elif "LAUNCH_OPTS" in (spec.get("env") or {}):
            self.report.carry(f"{where}: env.LAUNCH_OPTS", "nothing (empty)")
        for key in sorted(env):
            self.report.drop(f"{where}: env.{key}", "EG gave it to spark-submit on the gateway host; egd's "
                             "spark-submit gets drivers.yarn.env (gateway-wide), a Spark kernel gets "
                             "spark.yarn.appMasterEnv.* in spark_conf")
        mode = self._launcher_option(argv, "spark-context-initialization-mode")
        if mode in ("lazy", "eager", "none"):
            # EG's three modes are egd's: lazy (ready at once, the session built behind the first cells), eager
            # (ready with the session), none (no session).
            config["spark_session"] = mode
            self.report.carry(f"{where}: --RemoteProcessProxy.spark-context-initialization-mode {mode}",
                              f"metadata.egd.config.spark_session: {mode}")
        self._ignored_launcher_options(name, argv, {"kernel-id", "response-address", "public-key", "port-range",
                                                    "spark-context-initialization-mode"})
        return self._native(spec, metadata, "yarn", config, [python, "-m", "ipykernel_launcher", "-f",
                                                             "{connection_file}"], {})

    def _spark_opts(self, where: str, opts: str) -> tuple[dict[str, str], dict[str, Any]]:
        """EG's ``SPARK_OPTS`` as egd's ``spark_conf`` and resource settings; the rest reported."""
        source = f"{where}: SPARK_OPTS"
        try:
            tokens = shlex.split(opts)
        except ValueError as exc:
            self.report.drop(source, f"cannot be split into words: {exc}")
            return {}, {}
        conf: dict[str, str] = {}
        resources: dict[str, Any] = {}
        i = 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            option, has_value, value = token.partition("=") if token.startswith("--") else (token, "", "")
            if not has_value and option.startswith("--") and i < len(tokens):
                value = tokens[i]
                i += 1
            if not option.startswith("--"):
                if "KERNEL_EXTRA_SPARK_OPTS" in token:
                    self.report.drop(f"{source} {token}", "egd refuses KERNEL_EXTRA_SPARK_OPTS: a client must not "
                                     "choose Spark options (resources come from KERNEL_DRIVER_MEMORY and the like, "
                                     "within the kernelspec's limits)")
                else:
                    self.report.drop(f"{source} {token}", "not a spark-submit option egd can carry over")
                continue
            self._spark_option(source, option, value, conf, resources)
        self._resource_limits(resources)
        return conf, resources

    def _spark_option(self, source: str, option: str, value: str, conf: dict[str, str],
                      resources: dict[str, Any]) -> None:
        what = f"{source} {option} {value}"
        if option == "--master":
            self.report.carry(what, "nothing (egd submits to YARN)")
        elif option == "--deploy-mode":
            self.report.carry(what, "nothing (egd submits in cluster mode)")
        elif option == "--name":
            self.report.carry(what, "nothing (egd names the application egd-<kernelspec>-<kernel id> and tags it "
                              "with the kernel id)")
        elif option == "--queue":
            resources["queues"] = [value]
            self.report.carry(what, "metadata.egd.config.queues")
        elif option == "--proxy-user":
            self.report.drop(what, "egd impersonates with drivers.yarn.impersonation")
        elif option in _SPARK_OPTION_RESOURCES:
            self._spark_resource(what, _SPARK_OPTION_RESOURCES[option], value, resources)
        elif option in _SPARK_OPTION_CONF and "$" not in value:
            conf[_SPARK_OPTION_CONF[option]] = value
            self.report.carry(what, f"metadata.egd.config.spark_conf.{_SPARK_OPTION_CONF[option]}")
        elif option == "--conf":
            key, equals, setting = value.partition("=")
            if not equals:
                self.report.drop(what, "not a key=value Spark setting")
            elif key in _EGD_SPARK_CONF:
                self.report.drop(what, "egd sets this Spark setting itself")
            elif key in _SPARK_RESOURCES:
                self._spark_resource(what, _SPARK_RESOURCES[key], setting, resources)
            elif "$" in setting:
                self.report.drop(what, "refers to a variable that EG's run.sh expanded; egd passes Spark settings "
                                 "as they are (no shell): write the value out in spark_conf")
            else:
                conf[key] = setting
                self.report.carry(what, f"metadata.egd.config.spark_conf.{key}")
        elif "$" in value:
            self.report.drop(what, "refers to a variable that EG's run.sh expanded; egd runs no shell")
        else:
            self.report.drop(what, "a spark-submit option egd does not pass (egd gives spark-submit its own --files "
                             "and --py-files; Spark settings go in spark_conf)")

    def _spark_resource(self, what: str, key: str, value: str, resources: dict[str, Any]) -> None:
        if "$" in value:
            self.report.drop(what, "refers to a variable; egd takes resources from the kernelspec and the "
                             "client's KERNEL_* requests")
            return
        resources[key] = int(value) if key in ("driver_cores", "executor_cores", "num_executors") and \
            value.isdigit() else value
        self.report.carry(what, f"metadata.egd.config.{key}")

    @staticmethod
    def _resource_limits(resources: dict[str, Any]) -> None:
        """Raise the kernelspec's limits (egd's defaults: 4g, 4 cores, 2 executors) to what EG gave it."""
        def megabytes(text: Any) -> int:
            match = re.match(r"^(\d+)([mMgG]?)$", str(text))
            if not match:
                return 0
            return int(match.group(1)) * (1024 if match.group(2).lower() == "g" else 1)

        memory = max([megabytes(resources[k]) for k in ("driver_memory", "executor_memory") if k in resources] or [0])
        if memory > 4096:
            resources["max_memory"] = f"{memory}m"
        cores = max([int(resources[k]) for k in ("driver_cores", "executor_cores")
                     if isinstance(resources.get(k), int)] or [0])
        if cores > 4:
            resources["max_cores"] = cores
        executors = resources.get("num_executors")
        if isinstance(executors, int) and executors > 2:
            resources["max_executors"] = executors

    def _keep_eg_spec(self, name: str, spec_dir: Path, spec: dict[str, Any], proxy: dict[str, Any],
                      driver: str) -> None:
        """A kernelspec egd runs as EG's (through EG's launcher protocol): copied, with process_proxy.config
        reduced to the keys egd honours."""
        kept = {}
        where = f"kernelspec {name}: metadata.process_proxy.config"
        containers = driver in ("kubernetes", "docker")
        for key, value in (proxy.get("config") or {}).items():
            if containers and key in _CONTAINER_SPEC_KEYS:
                kept[key] = value
                self.report.carry(f"{where}.{key}", f"kept in {SPECS_NAME}/{spec_dir.name}/kernel.json")
            elif containers and key == "executor_image_name":
                self.report.drop(f"{where}.{key}", "Spark on Kubernetes (Spark executors in pods) is not supported "
                                 "by egd; left out of the copied kernel.json")
            elif containers and key == "port_range":
                self.report.drop(f"{where}.{key}", f"egd's {driver} driver gives EG's launcher its own port range "
                                 f"(drivers.{driver}.port_range, else kernels.port_range); left out of the copied "
                                 "kernel.json")
            elif containers:
                self.report.drop(f"{where}.{key}", f"not a process_proxy.config key egd's {driver} driver honours; "
                                 "left out of the copied kernel.json")
            elif key in ("remote_hosts", "port_range", "authorized_users", "unauthorized_users", "yarn_endpoint",
                         "alt_yarn_endpoint"):
                kept[key] = value
                self.report.carry(f"{where}.{key}", f"kept in {SPECS_NAME}/{spec_dir.name}/kernel.json")
                if key in ("yarn_endpoint", "alt_yarn_endpoint") and isinstance(value, str):
                    self.rms.append((_rm_address(value), f"{where}.{key}"))
            elif key == "yarn_endpoint_security_enabled":
                self.report.carry(f"{where}.{key}", "nothing (false)")
            else:
                self.report.drop(f"{where}.{key}", "not a process_proxy.config key egd honours; left out of the "
                                 "copied kernel.json")
        copy = json.loads(json.dumps(spec))
        copy["metadata"]["process_proxy"] = {"class_name": proxy["class_name"], **({"config": kept} if kept else {})}
        if driver == "ssh" and spec.get("argv"):
            self.report.next_steps.append(f"kernelspec {name} runs on the ssh hosts as EG ran it: "
                                          f"{spec['argv'][0]} must exist on every host, as with EG")
        if "KERNEL_EXTRA_SPARK_OPTS" in json.dumps(spec.get("env") or {}):
            self.report.next_steps.append(f"kernelspec {name}: its env names KERNEL_EXTRA_SPARK_OPTS; egd refuses that "
                                          "variable from clients, so Spark options come from the kernelspec only")
        if containers:
            image = f"image_name {kept['image_name']}" if kept.get("image_name") else f"drivers.{driver}.image"
            what, script = ("pod", "launch_kubernetes.py") if driver == "kubernetes" else ("container",
                                                                                          "launch_docker.py")
            self._write_spec(name, spec_dir, copy, f"kept as an EG kernelspec ({driver} driver, EG's launcher "
                             f"protocol); egd creates the {what} EG's {script} would, from {image}", whole=True)
            return
        self._write_spec(name, spec_dir, copy, f"kept as an EG kernelspec ({driver} driver, EG's launcher protocol); "
                         "egd runs its argv unchanged", whole=True)

    def _write_spec(self, name: str, spec_dir: Path, spec: Mapping[str, Any], how: str, whole: bool = False) -> None:
        target = self.output / SPECS_NAME / spec_dir.name  # the directory's own name, as jupyter_client lists it
        if whole:
            shutil.copytree(spec_dir, target, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            for item in spec_dir.iterdir():  # logos, kernel.js, kernel.css: EG's scripts are not needed
                if item.is_file() and item.name != "kernel.json" and (
                        item.name.startswith("logo-") or item.name in ("kernel.js", "kernel.css")):
                    shutil.copy2(item, target / item.name)
        (target / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        driver = spec.get("metadata", {}).get("egd", {}).get("driver") if isinstance(
            spec.get("metadata", {}).get("egd"), dict) else None
        proxy = spec.get("metadata", {}).get("process_proxy")
        if driver is None and isinstance(proxy, dict):
            driver = _PROXY_DRIVERS.get(str(proxy.get("class_name", "")).rsplit(".", 1)[-1])
        self.written_specs[name] = str(driver or "local")
        self.report.carry(f"kernelspec {name} ({spec_dir})", f"{SPECS_NAME}/{name}: {how}")

    # -- assembling -------------------------------------------------------------------------------------

    def finish(self) -> None:
        """The drivers and the settings that depend on several inputs, then egd's own checks: a value egd
        refuses is taken out and reported, so that the written file passes ``egd check-config``."""
        if self.cull_busy is not None:
            busy, source = self.cull_busy
            idle = self.raw.get("kernels", {}).get("cull_idle_timeout")
            if not busy:
                self.report.carry(source, "nothing (false: busy kernels are not culled, egd's default)")
            elif idle:
                self.put("kernels.cull_busy_timeout", idle, source)
            else:
                self.report.drop(source, "without cull_idle_timeout there is no timeout for busy kernels; set "
                                 "kernels.cull_busy_timeout")
        self.raw["kernels"] = {**self.raw.get("kernels", {}),
                               "kernelspec_dirs": [str((self.output / SPECS_NAME).resolve())]}
        self._response_port()
        drivers: dict[str, Any] = {"local": {}}
        if self.wants_ssh:
            drivers["ssh"] = self._driver_settings("ssh", self.ssh)
            drivers["ssh"].setdefault("hosts", ["localhost"])
            if "hosts" not in self.ssh:
                self.report.next_steps.append("drivers.ssh.hosts is EG's default, [localhost]: list your hosts")
        if self.wants_yarn and self.rms:
            drivers["yarn"] = self._driver_settings("yarn", self.yarn)
            addresses = list(dict.fromkeys(address for address, _ in self.rms))
            drivers["yarn"]["resource_managers"] = addresses
            for address, source in self.rms:
                self.report.carry(source, f"drivers.yarn.resource_managers ({address})")
            self.sources["drivers.yarn.resource_managers"] = [source for _, source in self.rms]
        elif self.wants_yarn:
            self.report.next_steps.append("no YARN endpoint was given (EG_YARN_ENDPOINT or yarn_endpoint): "
                                          "configure drivers.yarn.resource_managers to offer the yarn "
                                          "kernelspecs")
        if self.wants_kubernetes:
            if "namespace_mode" not in self.kubernetes:
                # EG_SHARED_NAMESPACE unset: EG's default, a namespace for each kernel (egd's default is shared).
                self.kubernetes["namespace_mode"] = ("per-kernel", ["EG's default of EG_SHARED_NAMESPACE (false: a "
                                                                    "namespace per kernel)"])
            drivers["kubernetes"] = self._driver_settings("kubernetes", self.kubernetes)
        if self.wants_docker:
            drivers["docker"] = self._driver_settings("docker", self.docker)
        self._unused_drivers(drivers)
        self.raw["drivers"] = drivers
        self._prune()
        self._driver_next_steps()

    def _response_port(self) -> None:
        """EG_RESPONSE_PORT: EG had one response port for every process proxy; each egd driver listens on a port
        of its own, so the first driver written gets EG's port and each next one the port after."""
        if self.response_port is None:
            return
        port, source = self.response_port
        wanted = [d for d in _REMOTE_DRIVERS if getattr(self, f"wants_{d}") and (d != "yarn" or self.rms)]
        for driver in wanted or list(_REMOTE_DRIVERS):  # none written: reported as not needed
            self.put_driver(driver, "callback_port", port, source)
            if port:  # 0: each driver picks a free port
                port += 1
        if len(wanted) > 1 and self.response_port[0]:
            last = self.response_port[0] + len(wanted) - 1
            self.report.next_steps.append(f"each egd driver listens on a callback port of its own: EG_RESPONSE_PORT "
                                          f"{self.response_port[0]} and the next ones, to {last}, are "
                                          f"drivers.{'/'.join(wanted)}.callback_port; open them for the kernels "
                                          "as EG's was")

    def _driver_next_steps(self) -> None:
        """What the operator still has to do for each driver written."""
        drivers = self.raw["drivers"]
        for name, where in (("ssh", "every ssh host"), ("yarn", "the cluster's nodes")):
            if name not in drivers:
                continue
            self.report.next_steps.append(f"copy egd's launcher (kernel_launcher.py and launcher_protocol.py, in one "
                                          f"directory) to drivers.{name}.launcher_path on {where}")
            if "callback_host" not in drivers[name]:
                self.report.next_steps.append(f"set drivers.{name}.callback_host to an address of this gateway that "
                                              f"{where} can reach (EG found one itself; egd's default is 127.0.0.1)")
        if "kubernetes" in drivers:
            settings = drivers["kubernetes"]
            if "callback_host" not in settings:
                self.report.next_steps.append('set drivers.kubernetes.callback_host to an address of this gateway the '
                                              'kernel pods reach: "${POD_IP}" when egd runs in the cluster with the '
                                              "Deployment of conf/kubernetes/ (EG used its pod's address; egd's "
                                              "default is 127.0.0.1)")
            self.report.next_steps.append("drivers.kubernetes.kubeconfig is null: inside a pod egd uses its service "
                                          "account, elsewhere $KUBECONFIG or ~/.kube/config; give egd's account the "
                                          "RBAC of conf/kubernetes/rbac.yaml"
                                          + ("" if settings.get("namespace_mode") == "shared" else
                                             " and rbac-namespaces.yaml (namespace_mode "
                                             f"{settings.get('namespace_mode')} creates namespaces)"))
            self.report.next_steps.append("EG let clients name any existing namespace with KERNEL_NAMESPACE; egd only "
                                          "those of drivers.kubernetes.allowed_namespaces (none by default)")
        for name in ("kubernetes", "docker"):
            if name not in drivers:
                continue
            if name == "docker" and "callback_host" not in drivers[name]:
                self.report.next_steps.append("set drivers.docker.callback_host to an address of this gateway the "
                                              "containers reach (the bridge's, often 172.17.0.1 on docker0; egd's "
                                              "default is 127.0.0.1)")
            self.report.next_steps.append(f"EG let clients choose any image with KERNEL_IMAGE and honoured KERNEL_UID "
                                          f"and KERNEL_GID; egd's {name} driver allows only the kernelspec's "
                                          f"image_name and drivers.{name}.image and images, and KERNEL_UID/GID only "
                                          f"with drivers.{name}.allow_uid (docs/{name}.rst)")

    def _driver_settings(self, driver: str, settings: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, (value, sources) in settings.items():
            for source in sources:
                if key.startswith("ssh_options:"):
                    self.sources.setdefault(f"drivers.{driver}.ssh_options", []).append(source)
                    self.report.carry(source, f"drivers.{driver}.ssh_options ({value})")
                else:
                    self.sources.setdefault(f"drivers.{driver}.{key}", []).append(source)
                    self.report.carry(source, f"drivers.{driver}.{key}")
            if key.startswith("ssh_options:"):
                result.setdefault("ssh_options", []).append(value)
            else:
                result[key] = value
        return result

    def _unused_drivers(self, written: Mapping[str, Any]) -> None:
        """Settings of the drivers not written are reported (once per source), unless the same source went to a
        driver written too (EG's one EG_RESPONSE_IP for every process proxy, say)."""
        used = {source for name in written if name in _REMOTE_DRIVERS
                for _value, sources in getattr(self, name).values() for source in sources}
        unused: dict[str, list[str]] = {}
        for name in _REMOTE_DRIVERS:
            if name in written:
                continue
            for _value, sources in getattr(self, name).values():
                for source in sources:
                    if source not in used and name not in unused.setdefault(source, []):
                        unused[source].append(name)
        for source, names in unused.items():
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            self.report.drop(source, f"no kernelspec needs the {listed} driver, so "
                             + ("it is" if len(names) == 1 else "they are") + " not configured")

    def _prune(self) -> None:
        """Take out (and report) every value egd's own checks refuse, until the config is valid."""
        for _ in range(50):
            try:
                parse_config(yaml.safe_dump(self.raw), "the migrated config", environ={})
                return
            except ConfigError as exc:
                problems = exc.problems
            removed = False
            for problem in problems:
                path = problem.split(":", 1)[0]
                parts = path.split(".")
                if parts[0] == "drivers" and len(parts) == 3 and problem.endswith(": required") \
                        and parts[1] in self.raw["drivers"]:
                    self._drop_driver(parts[1], problem)
                    removed = True
                    break
                key = self._written_key(path)
                if key is None:
                    continue
                self._remove(key)
                self._withdraw(key, f"egd refuses the value: {problem}")
                removed = True
                break
            if not removed:
                raise BadInput("the migrated config does not pass egd's checks: " + "; ".join(problems))

    def _drop_driver(self, driver: str, problem: str) -> None:
        """A driver that cannot be configured (a setting it requires was refused): left out, its settings
        reported; the kernelspecs that need it are then left out by :meth:`offered_specs`."""
        self.raw["drivers"].pop(driver)
        for key in sorted(self.sources):
            if key.startswith(f"drivers.{driver}."):
                self._withdraw(key, f"the {driver} driver is not configured ({problem})")
        self.report.next_steps.append(f"configure drivers.{driver} ({problem}) to offer its kernelspecs")

    def _withdraw(self, key: str, why: str) -> None:
        """``key`` is not written after all: each of its sources is reported as not carried over instead."""
        for source in self.sources.pop(key, [key]):
            self.report.carried = [c for c in self.report.carried if not c.startswith(f"{source} -> {key}")]
            self.report.drop(source, why)

    def _written_key(self, path: str) -> str | None:
        """The written key (``section.key`` or ``drivers.name.key``) a problem's path is about."""
        path = re.sub(r"\[\d+\]$", "", path.split(" ", 1)[0])  # "drivers.kubernetes.namespace 'x'": the key
        parts = path.split(".")
        key = ".".join(parts[:3] if parts[0] == "drivers" else parts[:2])
        section = self.raw.get(parts[0])
        if parts[0] == "drivers" and len(parts) >= 3:
            return key if isinstance(section, dict) and parts[2] in section.get(parts[1], {}) else None
        return key if isinstance(section, dict) and len(parts) >= 2 and parts[1] in section else None

    def _remove(self, key: str) -> None:
        parts = key.split(".")
        container = self.raw
        for part in parts[:-1]:
            container = container[part]
        container.pop(parts[-1], None)
        if len(parts) == 2 and not container:  # a section left empty says nothing
            self.raw.pop(parts[0], None)

    def offered_specs(self) -> None:
        """Kernelspecs egd would offer that need a driver not configured are left out with
        ``kernels.allowed_kernelspecs``; a default kernel egd would not offer is replaced. Both reported."""
        from twisted.internet.interfaces import IReactorFromThreads
        from twisted.python.threadpool import ThreadPool

        from egd.kernels.specs import KernelSpecStore

        config = parse_config(yaml.safe_dump(self.raw), "the migrated config", environ={})
        no_reactor = cast(IReactorFromThreads, None)  # read_all_blocking never goes through the reactor
        specs = KernelSpecStore(config.kernels, no_reactor, ThreadPool()).read_all_blocking()
        drivers = self.raw["drivers"]
        usable = [name for name, spec in specs.items() if spec.driver in drivers]
        unusable = {name: spec.driver for name, spec in specs.items() if spec.driver not in drivers}
        kernels = self.raw.setdefault("kernels", {})
        named = kernels.get("allowed_kernelspecs")
        if named:  # EG's allowed list: only what the migrated config offers can stay in it
            source = " and ".join(self.sources.get("kernels.allowed_kernelspecs", ["kernels.allowed_kernelspecs"]))
            for name in named:
                if name not in usable:
                    self.report.drop(f"{source} ({name})", "no such kernelspec with a configured driver in the "
                                     "migrated config; left out of kernels.allowed_kernelspecs")
            kernels["allowed_kernelspecs"] = [n for n in named if n in usable]
        if unusable:
            allowed = kernels.get("allowed_kernelspecs") or usable
            kernels["allowed_kernelspecs"] = [n for n in allowed if n in usable]
            if not kernels["allowed_kernelspecs"]:  # an empty list would mean every kernelspec
                self.report.next_steps.append("no kernelspec found can run with the configured drivers, and an "
                                              "empty kernels.allowed_kernelspecs means all: configure a driver "
                                              "or add kernelspecs before starting egd")
            for name, driver in sorted(unusable.items()):
                where = f"kernelspec {name} ({specs[name].resource_dir})"
                self.report.drop(where, f"needs the {driver!r} driver, which is not configured: left out with "
                                 "kernels.allowed_kernelspecs")
        offered = [n for n in (kernels.get("allowed_kernelspecs") or usable) if n in usable]
        default = kernels.get("default_kernel_name", KernelsConfig.default_kernel_name)
        if default not in offered and offered:
            source = " and ".join(self.sources.get("kernels.default_kernel_name",
                                                   ["egd's default default_kernel_name (python3)"]))
            replacement = "python3" if "python3" in offered else offered[0]
            self.report.drop(source, f"kernelspec {default!r} is not offered by the migrated config; "
                             f"kernels.default_kernel_name is {replacement!r} instead")
            kernels["default_kernel_name"] = replacement
        if not offered:
            self.report.next_steps.append("no kernelspec is offered: add kernelspecs (kernels.kernelspec_dirs)")

    def write(self) -> list[str]:
        """Write egd.yaml (and egd.env with the token); the paths written."""
        written = [str(self.output / SPECS_NAME) + f"/ ({len(self.written_specs)} kernelspecs: "
                   + ", ".join(f"{n} [{d}]" for n, d in sorted(self.written_specs.items())) + ")"]
        header = ("# egd configuration written by `egd migrate-eg` from an Enterprise Gateway deployment.\n"
                  f"# What could not be carried over, and why: {REPORT_NAME} beside this file.\n"
                  "# Every key is documented in egd's conf/egd.yaml. Check it with `egd check-config FILE`.\n")
        if self.token is not None:
            env_path = self.output / ENV_NAME
            fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(f"# EG's auth_token, for egd (systemd EnvironmentFile=, mode 0600)\n"
                             f"EGD_AUTH_TOKEN={self.token[0]}\n")
            os.chmod(env_path, 0o600)
            self.report.carry(self.token[1], f"EGD_AUTH_TOKEN in {ENV_NAME} (mode 0600; give it to egd's "
                              "environment, e.g. systemd's EnvironmentFile=)")
            header += f"# The shared token is in {ENV_NAME} (EGD_AUTH_TOKEN), not in this file.\n"
            written.append(str(env_path))
            self.report.next_steps.append(f"give egd the token: EnvironmentFile={(self.output / ENV_NAME).resolve()}"
                                          " in its systemd unit (or export EGD_AUTH_TOKEN)")
        else:
            if (self.output / ENV_NAME).exists():  # an earlier run's token, which this configuration does not have
                (self.output / ENV_NAME).unlink()
            if self.raw.get("server", {}).get("ip") not in (None, "127.0.0.1", "::1"):
                self.report.next_steps.append("without a credential (EGD_AUTH_TOKEN or auth.*) egd serves 127.0.0.1 "
                                              "only, whatever server.ip says (docs/security.rst)")
        (self.output / CONFIG_NAME).write_text(header + yaml.safe_dump(self.raw, sort_keys=False), encoding="utf-8")
        written.insert(0, str(self.output / CONFIG_NAME))
        written.append(str(self.output / REPORT_NAME))
        return written


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------

def _resolve(settings: Iterable[tuple[str, str, Value]], report: Report) -> dict[tuple[str, str], Value]:
    """One value per ``(canonical class, trait)`` by EG's precedence (flag > file > env; within one kind the
    last wins, except that repeated command-line options of a list gather); the others reported."""
    rank = {"env": 0, "file": 1, "flag": 2}
    chosen: dict[tuple[str, str], Value] = {}
    for cls, trait, value in settings:
        key = (_CLASS_ALIASES.get(cls, cls), {"env_whitelist": "client_envs",
                                              "env_process_whitelist": "inherited_envs",
                                              "whitelist": "allowed_kernelspecs"}.get(trait, trait))
        previous = chosen.get(key)
        if previous is not None and previous.origin == "flag" == value.origin and key[1] in (
                "client_envs", "inherited_envs", "kernel_headers", "remote_hosts", "authorized_users",
                "unauthorized_users", "allowed_kernelspecs"):
            merged = (previous.value if isinstance(previous.value, list) else [previous.value]) + [value.value]
            chosen[key] = Value(merged, "flag", previous.source)
            continue
        if previous is not None and rank[previous.origin] > rank[value.origin]:
            report.drop(value.source, f"overridden by {previous.source} (EG's precedence: command line, config "
                        "file, environment)")
            continue
        if previous is not None:
            report.drop(previous.source, f"overridden by {value.source} (EG's precedence: command line, config "
                        "file, environment)")
        chosen[key] = value
    return chosen


def _environment(env_files: list[str]) -> list[tuple[str, str | None, str]]:
    """EG's environment: the env files' lines, or (without files) the EG_ and KG_ variables of this process."""
    if env_files:
        return [entry for path in env_files for entry in read_env_file(path)]
    return [(name, value, f"environment {name}") for name, value in sorted(os.environ.items())
            if name.startswith(("EG_", "KG_"))]


def migrate(output: str, env_files: list[str], config_files: list[str], kernelspec_dirs: list[str],
            eg_args: list[str], force: bool = False) -> tuple[Report, list[str]]:
    """Run the migration; the report and the paths written. :class:`BadInput` on bad input."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{output} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BadInput(f"{output} is not empty (--force writes into it, replacing {CONFIG_NAME}, {ENV_NAME}, "
                       f"{REPORT_NAME} and {SPECS_NAME}/)")
    migration = Migration(out)
    report = migration.report
    flags_found, flags = read_command_line(eg_args)
    migration.config_file_options = bool(config_files)
    config_files = list(config_files)
    for cls, trait, value in flags_found:
        if _CLASS_ALIASES.get(cls) == "Application" and trait == "config_file" and not config_files:
            config_files.append(str(value.value))
    settings: list[tuple[str, str, Value]] = []
    env_only: list[tuple[str, Value]] = []
    process_env: list[tuple[str, Value]] = []
    environment = _environment(env_files)
    defined = {name for name, _, _ in environment}
    for name, raw_value, source in environment:
        if raw_value is None:
            report.drop(source, "no value in the file (docker passes the variable from its own environment); "
                        "give it a value")
            continue
        value = Value(raw_value, "env", source + ("" if not _secret(name) else " (value not shown)"))
        if name in _FALLBACKS and _FALLBACKS[name] in defined:
            report.drop(source, f"EG uses {_FALLBACKS[name]} instead ({name} is its fallback)")
        elif name in _ENV_TRAITS or name in _FALLBACKS:
            settings.append((_APP, _ENV_TRAITS[_FALLBACKS.get(name, name)], value))
        elif name in _OTHER_ENV_TRAITS:
            cls, _, trait = _OTHER_ENV_TRAITS[name].partition(".")
            settings.append((cls, trait, value))
        elif name in _ENV_ONLY:
            env_only.append((name, value))
        else:
            process_env.append((name, value))
    for path in config_files:
        settings.extend(read_config_file(path, report))
    settings.extend(flags_found)
    for flag in flags:
        if flag == "debug":
            settings.append(("Application", "log_level", Value("debug", "flag", "command line --debug")))
        else:
            report.drop(f"command line --{flag}", "an action of EG's command, not a setting")
    for (cls, trait), value in _resolve(settings, report).items():
        migration.apply(cls, trait, value)
    for name, value in env_only:
        migration.apply_env_only(name, value)
    for name, value in process_env:
        migration.apply_process_env(name, value)
    directories = [Path(d) for d in kernelspec_dirs] or _jupyter_kernel_dirs()
    for directory in directories:
        if not directory.is_dir():
            raise BadInput(f"{directory}: not a directory of kernelspecs")
    out.mkdir(parents=True, exist_ok=True)
    if (out / SPECS_NAME).is_dir():
        shutil.rmtree(out / SPECS_NAME)
    (out / SPECS_NAME).mkdir()
    migration.migrate_specs(directories)
    migration.finish()
    migration.offered_specs()
    written = migration.write()
    (out / REPORT_NAME).write_text(report.text(written), encoding="utf-8")
    return report, written


def _jupyter_kernel_dirs() -> list[Path]:
    from jupyter_client.kernelspec import KernelSpecManager

    return [Path(d) for d in KernelSpecManager().kernel_dirs if os.path.isdir(d)]


def add_parser(commands: Any) -> None:
    """The ``migrate-eg`` subcommand of the ``egd`` command."""
    parser = commands.add_parser(
        "migrate-eg", help="turn an Enterprise Gateway deployment's configuration into egd's",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Read an Enterprise Gateway (EG) deployment's configuration - its EG_* environment variables, its command "
            "line, its jupyter_enterprise_gateway_config.py (parsed, never run) and its kernelspecs - and write, to an "
            "output directory, an egd config (egd.yaml, which passes egd check-config), native egd kernelspecs "
            f"(kernelspecs/) and a report ({REPORT_NAME}). Every setting that cannot be carried over is printed with "
            "the reason.", 100),
        epilog="EG's precedence is kept: command line, then config file, then environment.\n"
               "Without --env-file, the EG_* and KG_* variables of this environment are read.\n"
               "Without --kernelspec-dir, jupyter's kernel directories are read.\n"
               "EG's own command line goes after --, e.g.\n"
               "  egd migrate-eg -o /etc/egd/migrated --env-file /etc/default/enterprise-gateway \\\n"
               "      --config-file /etc/jupyter/jupyter_enterprise_gateway_config.py \\\n"
               "      --kernelspec-dir /usr/local/share/jupyter/kernels -- --ip=0.0.0.0 --port 8889\n"
               "Then: egd check-config DIR/egd.yaml; egd kernelspecs --config DIR/egd.yaml.\n"
               "Exit status: 0 when written (even with settings not carried over), 2 on bad input.")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="directory to write egd.yaml, kernelspecs/ and the report to (new or empty)")
    parser.add_argument("--env-file", action="append", default=[], metavar="FILE",
                        help="EG's environment as KEY=VALUE lines (systemd EnvironmentFile, docker --env-file); "
                             "repeatable, later files win")
    parser.add_argument("--config-file", action="append", default=[], metavar="FILE",
                        help="EG's jupyter_enterprise_gateway_config.py (or .json); repeatable, later files win")
    parser.add_argument("--kernelspec-dir", action="append", default=[], metavar="DIR",
                        help="a directory of EG kernelspecs (or one kernelspec); repeatable, the first of a name "
                             "wins")
    parser.add_argument("--eg-command", metavar="COMMAND",
                        help="EG's command line as one string, e.g. the ExecStart= of its systemd unit")
    parser.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    parser.add_argument("eg_args", nargs=argparse.REMAINDER, metavar="-- EG-OPTIONS",
                        help="EG's command-line options, after --")


def run(args: argparse.Namespace) -> int:
    """``egd migrate-eg``: 0 when written, 2 on bad input."""
    eg_args = list(args.eg_args or [])
    if eg_args and eg_args[0] == "--":
        eg_args = eg_args[1:]
    try:
        if args.eg_command:
            try:
                eg_args = shlex.split(args.eg_command) + eg_args
            except ValueError as exc:
                raise BadInput(f"--eg-command: {exc}") from None
        report, written = migrate(args.output, args.env_file, args.config_file, args.kernelspec_dir, eg_args,
                                  args.force)
    except BadInput as exc:
        print(f"egd migrate-eg: {exc}", file=sys.stderr)
        return BAD_INPUT
    print(report.text(written), end="")
    return 0

