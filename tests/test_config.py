"""Configuration: YAML validated with every problem reported at once, env overrides, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from egd.config import ConfigError, load_config, parse_config, with_overrides
from egd.drivers.local import LocalSettings

REPO = Path(__file__).resolve().parent.parent


def egd(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the egd command."""
    return subprocess.run([sys.executable, "-m", "egd", *args], capture_output=True, text=True, timeout=60)


def test_defaults_without_a_file() -> None:
    """No file: loopback, port 8888, local driver, python3 by default."""
    config = load_config(None, environ={})
    assert (config.server.ip, config.server.port, config.server.base_url) == ("127.0.0.1", 8888, "/")
    assert list(config.drivers) == ["local"] and config.drivers["local"] == LocalSettings()
    assert config.kernels.default_kernel_name == "python3"


def test_every_problem_reported_with_its_path() -> None:
    """All errors at once, each with its path in the file."""
    text = """
server: {port: 99999, ip: not-an-ip, surprise: 1}
kernels: {launch_timeout: -1, client_envs: [OK_NAME, "bad name"], port_range: "5..6"}
logging: {level: loud}
drivers: {local: [1]}
extra: true
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.yaml", environ={})
    problems = "\n".join(caught.value.problems)
    for fragment in ("server.port: must be between 0 and 65535", "server.ip: not an IP address",
                     "server.surprise: unknown key", "kernels.launch_timeout: must be >= 1",
                     "kernels.client_envs[1]: not an environment variable name", "kernels.port_range: needs",
                     "logging.level: must be one of", "drivers.local: must be a mapping", "extra: unknown section"):
        assert fragment in problems, problems
    assert len(caught.value.problems) == 9


def test_yaml_syntax_error() -> None:
    """Broken YAML is one clear problem, not a traceback."""
    with pytest.raises(ConfigError) as caught:
        parse_config("server: [", "bad.yaml", environ={})
    assert "not valid YAML" in caught.value.problems[0]


def test_env_overrides_beat_the_file() -> None:
    """EGD_PORT and friends override the file's values, and are validated like them."""
    config = parse_config("server: {port: 9000}", environ={"EGD_PORT": "9100", "EGD_BASE_URL": "gw"})
    assert config.server.port == 9100 and config.server.base_url == "/gw/"
    with pytest.raises(ConfigError):
        parse_config("", environ={"EGD_PORT": "many"})


def test_command_line_overrides() -> None:
    """--ip/--port/--base-url replace the file's values and are checked."""
    config = with_overrides(parse_config("", environ={}), ip="::1", port=0, base_url="/x")
    assert (config.server.ip, config.server.port, config.server.base_url) == ("::1", 0, "/x/")
    with pytest.raises(ConfigError):
        with_overrides(config, port=70000)


def test_example_config_is_valid_and_documents_every_key() -> None:
    """conf/egd.yaml is valid and mentions every key egd knows."""
    from dataclasses import fields

    from egd.config import AuthConfig, KernelsConfig, LoggingConfig, ServerConfig, StateConfig
    from egd.drivers.slurm import SlurmSettings
    from egd.drivers.ssh import SshSettings
    from egd.drivers.yarn import DistributedShellSettings, YarnSettings

    text = (REPO / "conf" / "egd.yaml").read_text()
    parse_config(text, "conf/egd.yaml", environ={})
    for cls in (ServerConfig, AuthConfig, LoggingConfig, KernelsConfig, StateConfig, LocalSettings):
        for field in fields(cls):
            assert f"{field.name}:" in text, field.name
    # and the driver examples every setting of their driver
    for name, classes in (("ssh-pool.yaml", (SshSettings,)),
                          ("yarn-cluster.yaml", (YarnSettings, DistributedShellSettings)),
                          ("slurm-cluster.yaml", (SlurmSettings,))):
        example = (REPO / "conf" / name).read_text()
        for cls in classes:
            for field in fields(cls):
                assert f"{field.name}:" in example, (name, field.name)


def test_cli_check_config(tmp_path: Path) -> None:
    """egd check-config: exit 0 and a summary for a good file; exit 1 with every problem for a bad one."""
    good = tmp_path / "good.yaml"
    good.write_text("server: {port: 9999}\n")
    result = egd("check-config", str(good))
    assert result.returncode == 0 and "OK" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: x}\ndrivers: {nosuch: {}}\n")
    result = egd("check-config", str(bad))
    assert result.returncode == 1
    assert "server.port" in result.stderr
    missing = egd("check-config", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    unknown_driver = tmp_path / "driver.yaml"
    unknown_driver.write_text("drivers: {nosuch: {}}\n")
    result = egd("check-config", str(unknown_driver))
    assert result.returncode == 1 and "drivers.nosuch: no such driver installed" in result.stderr


def test_cli_help_version_kernelspecs() -> None:
    """--help explains the commands, --version prints it, kernelspecs lists python3 with its driver."""
    help_text = egd("--help").stdout
    for word in ("run", "check-config", "kernelspecs", "--gateway-url", "EGD_PORT"):
        assert word in help_text
    assert "--port" in egd("run", "--help").stdout
    assert egd("--version").stdout.startswith("egd ")
    listing = egd("kernelspecs")
    assert listing.returncode == 0 and "python3" in listing.stdout and "local" in listing.stdout


def test_cli_port_in_use(tmp_path: Path) -> None:
    """A taken port is a clear error and exit code 1, not a traceback."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = egd("run", "--port", str(port))
    assert result.returncode == 1
    assert "could not start" in result.stderr and "Traceback" not in result.stderr


def test_cli_check_config_checks_driver_settings(tmp_path: Path) -> None:
    """A misspelt driver setting is caught by check-config, not at the first launch; the example is valid."""
    bad = tmp_path / "ssh.yaml"
    bad.write_text("drivers:\n  ssh: {hosts: [a], placment: least-connection}\n")
    result = egd("check-config", str(bad))
    assert result.returncode == 1 and "drivers.ssh.placment: unknown setting" in result.stderr
    for name in ("ssh-pool.yaml", "yarn-cluster.yaml", "slurm-cluster.yaml"):
        example = egd("check-config", str(REPO / "conf" / name))
        assert example.returncode == 0, example.stderr
    bad.write_text("drivers:\n  yarn: {resource_managers: [rm1:8088]}\n")
    result = egd("check-config", str(bad))
    assert result.returncode == 1 and "drivers.yarn.resource_managers: list the web addresses" in result.stderr
