"""Driver settings are checked with the rest of the config: every problem at once, with its path (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egd.config import ConfigError, parse_config
from egd.drivers.ssh import SshSettings
from egd.drivers.yarn import YarnSettings
from tests.test_config import egd

#: Each bad value of issue 11 that ``egd check-config`` used to accept, and what it now says about it.
BAD_EXAMPLES = """\
kernels:
  default_kernel_name: nosuchspec
drivers:
  nosuch: {}
  local: {ip: 999.1.1.1}
  ssh:
    hosts: goodhost
    callback_port: 99999
    port_range: "5..6"
    connect_timeout: -1
    multiplex: "yes please"
    user: 42
    ssh_config: /does/not/exist
  yarn:
    resource_managers: [http://rm1.example.org:8088]
    poll_interval: 0
"""
EXPECTED = [
    "drivers.nosuch: no such driver installed",
    "drivers.local.ip: not an IP address: '999.1.1.1'",
    "drivers.ssh.hosts: expected a list of host names, got a string",
    "drivers.ssh.callback_port: must be between 0 and 65535, got 99999",
    "drivers.ssh.port_range: needs 1024 <= low < high <= 65535",
    "drivers.ssh.connect_timeout: must be between 1 and 3600, got -1",
    "drivers.ssh.multiplex: must be true or false, got 'yes please'",
    "drivers.ssh.user: must be a non-empty string, got int 42",
    "drivers.ssh.ssh_config: not a readable file: '/does/not/exist'",
    "drivers.yarn.poll_interval: must be a positive number of seconds",
    "kernels.default_kernel_name: no kernelspec 'nosuchspec' is offered",
]


def test_check_config_reports_every_bad_driver_setting(tmp_path: Path) -> None:
    """One file with every bad example: check-config exits 1 and names each with its path; an unknown driver
    hides none of the other drivers' problems."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_EXAMPLES)
    result = egd("check-config", str(bad))
    assert result.returncode == 1, result.stdout
    missing = [line for line in EXPECTED if line not in result.stderr]
    assert not missing, result.stderr
    assert f"has {len(EXPECTED)} problem(s)" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("line", EXPECTED[1:-1])
def test_each_bad_setting_alone_fails_check_config(tmp_path: Path, line: str) -> None:
    """Each example is refused on its own too (beside a valid ssh driver), not only in company."""
    key, _, _ = line.partition(":")
    _, driver, setting = key.split(".")
    values = {"local.ip": "999.1.1.1", "ssh.hosts": "goodhost", "ssh.callback_port": "99999",
              "ssh.port_range": '"5..6"', "ssh.connect_timeout": "-1", "ssh.multiplex": '"yes please"',
              "ssh.user": "42", "ssh.ssh_config": "/does/not/exist", "yarn.poll_interval": "0"}
    base = {"local": {}, "ssh": {"hosts": "[a]"}, "yarn": {"resource_managers": "[http://rm:8088]"}}[driver]
    settings = {**base, setting: values[f"{driver}.{setting}"]}
    body = ", ".join(f"{k}: {v}" for k, v in settings.items())
    config = tmp_path / "one.yaml"
    config.write_text(f"drivers:\n  local: {{}}\n  {driver}: {{{body}}}\n" if driver != "local"
                      else f"drivers:\n  local: {{{body}}}\n")
    result = egd("check-config", str(config))
    assert result.returncode == 1 and line in result.stderr and "has 1 problem(s)" in result.stderr, result.stderr


def test_check_config_needs_the_default_kernelspecs_driver(tmp_path: Path) -> None:
    """The default kernelspec (python3, a local one) with a driver list that lacks ``local``: refused."""
    config = tmp_path / "ssh-only.yaml"
    config.write_text("kernels: {default_kernel_name: python3}\ndrivers:\n  ssh: {hosts: [a]}\n")
    result = egd("check-config", str(config))
    assert result.returncode == 1
    assert ("kernels.default_kernel_name: kernelspec 'python3' needs the 'local' driver, which is not in drivers "
            "(configured: ssh)") in result.stderr


def test_check_config_needs_every_offered_kernelspecs_driver(tmp_path: Path) -> None:
    """A kernelspec offered whose driver is not configured would be listed and fail at every start: refused,
    unless kernels.allowed_kernelspecs leaves it out; an allowed name that does not exist is refused too."""
    spec = tmp_path / "specs" / "on_yarn"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "On YARN",
        "language": "python", "metadata": {"egd": {"driver": "yarn"}}}))
    config = tmp_path / "local.yaml"
    config.write_text(f"kernels: {{kernelspec_dirs: [{tmp_path / 'specs'}]}}\n")
    result = egd("check-config", str(config))
    assert result.returncode == 1
    assert "kernels: kernelspec 'on_yarn' needs the 'yarn' driver, which is not in drivers (configured: local)" \
        in result.stderr
    config.write_text(f"kernels: {{kernelspec_dirs: [{tmp_path / 'specs'}], allowed_kernelspecs: [python3]}}\n")
    assert egd("check-config", str(config)).returncode == 0
    config.write_text(f"kernels: {{kernelspec_dirs: [{tmp_path / 'specs'}], allowed_kernelspecs: [python3, nope]}}\n")
    result = egd("check-config", str(config))
    assert result.returncode == 1 and "kernels.allowed_kernelspecs[1]: no kernelspec 'nope' is offered" in result.stderr


def test_run_refuses_bad_driver_settings_like_check_config(tmp_path: Path) -> None:
    """``egd run`` reports the same problems and does not start (callback_port: 99999 used to end in an
    OverflowError traceback, then "ready")."""
    config = tmp_path / "bad.yaml"
    config.write_text("drivers:\n  local: {}\n  ssh: {hosts: [a], callback_port: 99999}\n")
    result = egd("run", "--config", str(config), "--port", "0")
    assert result.returncode == 1
    assert "drivers.ssh.callback_port: must be between 0 and 65535, got 99999" in result.stderr
    assert "Traceback" not in result.stderr and "ready" not in result.stderr


def test_run_does_not_start_when_a_launch_listener_cannot_listen(tmp_path: Path) -> None:
    """A driver's launch listener that cannot bind its address (192.0.2.1 is no address of this host) stops egd
    at start with the reason; egd used to start and answer every launch with a 500."""
    config = tmp_path / "unbindable.yaml"
    config.write_text("drivers:\n  local: {}\n  ssh: {hosts: [a], callback_host: 192.0.2.1}\n")
    result = egd("run", "--config", str(config), "--port", "0")
    assert result.returncode != 0
    assert "192.0.2.1" in result.stderr and "ready" not in result.stderr, result.stderr[-2000:]


def test_driver_settings_are_frozen_dataclasses() -> None:
    """The config holds each driver's settings as its frozen dataclass, defaults filled in."""
    config = parse_config("drivers:\n  ssh: {hosts: [a, b], port_range: 40000..40100}\n"
                          "  yarn: {resource_managers: http://rm:8088}\n", environ={})
    ssh = config.drivers["ssh"]
    assert isinstance(ssh, SshSettings) and ssh.hosts == ("a", "b") and ssh.port_range == (40000, 40100)
    assert ssh.connect_timeout == 5 and ssh.multiplex is True and ssh.callback_port == 0
    yarn = config.drivers["yarn"]
    assert isinstance(yarn, YarnSettings) and yarn.resource_managers == ("http://rm:8088",)
    assert yarn.distributed_shell.am_memory_mb == 256
    with pytest.raises(AttributeError):
        ssh.hosts = ("c",)  # type: ignore[misc]


def test_nested_and_required_driver_settings() -> None:
    """A required setting left out, and a nested section's bad key, are named with their full paths."""
    with pytest.raises(ConfigError) as caught:
        parse_config("drivers:\n  ssh: {}\n  yarn: {resource_managers: [http://rm:8088], "
                     "distributed_shell: {am_memory_mb: 1, nosuch: 2}}\n", environ={})
    problems = caught.value.problems
    assert "drivers.ssh.hosts: required" in problems
    assert any(p.startswith("drivers.yarn.distributed_shell.am_memory_mb: must be between 32") for p in problems)
    assert any(p.startswith("drivers.yarn.distributed_shell.nosuch: unknown setting") for p in problems)


def test_hostile_driver_settings_are_refused_without_echoing_secrets() -> None:
    """A host that would read as an ssh option, booleans where numbers belong, a nested list where a mapping
    belongs: each refused with its path; yarn's env values (may be secrets) are not echoed."""
    with pytest.raises(ConfigError) as caught:
        parse_config("drivers:\n  ssh: {hosts: [-oProxyCommand=touch /tmp/x, ''], callback_port: true,\n"
                     "        ssh_options: -F /etc/x, prohibited_users: [root, 7]}\n"
                     "  yarn: {resource_managers: [rm1:8088], env: [SECRET=hunter2], kill_timeout: .inf}\n",
                     environ={})
    problems = caught.value.problems
    for expected in ("drivers.ssh.hosts[0]: not a host name", "drivers.ssh.hosts[1]: not a host name",
                     "drivers.ssh.callback_port: must be a whole number, got bool",
                     "drivers.ssh.ssh_options: must be a list of strings",
                     "drivers.ssh.prohibited_users[1]: must be a non-empty string",
                     "drivers.yarn.resource_managers: list the web addresses",
                     "drivers.yarn.env: must be a mapping of names to values",
                     "drivers.yarn.kill_timeout: must be a positive number of seconds"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    assert not any("hunter2" in p for p in problems)


def test_container_drivers_refuse_the_account_settings_they_cannot_honour() -> None:
    """``user`` and ``impersonation: true`` mean an account of the host elsewhere; a container kernel runs as a
    uid, so the docker and kubernetes drivers refuse them with why, instead of ignoring them. ``impersonation:
    false`` is what they do anyway and passes."""
    with pytest.raises(ConfigError) as caught:
        parse_config("drivers:\n  local: {}\n  docker: {user: jovyan, impersonation: true}\n"
                     "  kubernetes: {impersonation: true}\n", environ={})
    problems = caught.value.problems
    for expected in ("drivers.docker.user: not used by container kernels: they run as uid and gid",
                     "drivers.docker.impersonation: not used by container kernels",
                     "drivers.kubernetes.impersonation: not used by container kernels"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    parse_config("drivers:\n  local: {}\n  docker: {impersonation: false}\n", environ={})
