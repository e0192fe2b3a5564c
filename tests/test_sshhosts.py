"""The ssh test hosts themselves (tests/sshhosts.py): names, addresses, reachability, failures, processes."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests import sshhosts
from tests.conftest import wait_until
from tests.sshhosts import SshHost, SshLab

# The fixtures, usable here without a conftest. If a conftest registers them too, both share one lab.
ssh_lab = sshhosts.ssh_lab
ssh_hosts = sshhosts.ssh_hosts

pytestmark = pytest.mark.ssh

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__, exc.errno)
"""


def ssh_cfg(lab: SshLab, host: str, command: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-F", str(lab.ssh_config_path), host, command], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_ssh_config_alias_hostname_and_connection(ssh_lab: SshLab, ssh_hosts: list[SshHost]) -> None:
    """ssh through the lab ssh_config reaches each host by alias; it reports its own name and address."""
    assert [h.name for h in ssh_hosts] == ["egdh1", "egdh2"]
    for host in ssh_hosts:
        proc = ssh_cfg(ssh_lab, host.name, 'hostname; echo "$SSH_CONNECTION"; id -un')
        assert proc.returncode == 0, proc.stderr
        hostname, connection, user = proc.stdout.splitlines()
        assert hostname == host.name
        client_ip, _, server_ip, server_port = connection.split()
        assert (client_ip, server_ip, server_port) == (ssh_lab.gateway_ip, host.ip, "22")
        assert user == ssh_lab.user == host.user == "root"
        # the same through the explicit argv (no ssh_config), pinned to the lab's known_hosts
        proc = host.ssh("hostname")
        assert (proc.returncode, proc.stdout.strip()) == (0, host.name), proc.stderr


def test_hosts_are_distinct(ssh_lab: SshLab, ssh_hosts: list[SshHost]) -> None:
    """Each host has its own network namespace and address."""
    ips = [h.ip for h in ssh_hosts]
    assert len(set(ips)) == len(ips)
    assert ssh_lab.gateway_ip not in ips
    for host in ssh_hosts:
        addrs = host.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert f" {host.ip}/24 " in addrs
        assert host.run(["hostname"]).stdout.strip() == host.name
        assert host.run(["ip", "route", "show", "default"]).stdout.strip() == ""  # nothing leaves the bridge
    # host to host over ssh, by name (the hosts resolve each other) with the shared ssh_config
    h1, h2 = ssh_hosts[:2]
    proc = h1.ssh(f"ssh -F {ssh_lab.ssh_config_path} {h2.name} hostname; getent hosts gateway {h2.name}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == h2.name
    assert lines[1].split() == [ssh_lab.gateway_ip, "gateway"]
    assert lines[2].split() == [h2.ip, h2.name]


def test_known_hosts_are_pinned(ssh_lab: SshLab, ssh_hosts: list[SshHost]) -> None:
    """Host keys are pinned: a client with the lab known_hosts connects with strict checking."""
    text = ssh_lab.known_hosts_path.read_text()
    for host in ssh_hosts:
        assert f"{host.name},{host.ip} ssh-ed25519 " in text
    argv = ssh_hosts[0].ssh_argv()
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=yes" in argv and "ConnectTimeout=5" in argv
    assert "KexAlgorithms=curve25519-sha256" in argv and f"UserKnownHostsFile={ssh_lab.known_hosts_path}" in argv
    # a host key that is not in the lab's known_hosts is refused, not prompted for
    h1 = ssh_hosts[0]
    wrong = [a.replace(str(ssh_lab.known_hosts_path), "/dev/null") for a in h1.ssh_argv()]
    proc = subprocess.run([*wrong, "true"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=20)
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr


def test_gateway_ip_reachable_from_hosts_but_not_loopback(ssh_lab: SshLab, ssh_hosts: list[SshHost]) -> None:
    """Hosts reach the gateway address, not the machine loopback, and nothing outside the bridge."""
    with socket.socket() as on_gateway, socket.socket() as on_loopback:
        on_gateway.bind((ssh_lab.gateway_ip, 0))
        on_gateway.listen()
        on_loopback.bind(("127.0.0.1", 0))
        on_loopback.listen()
        for host in ssh_hosts:
            for (addr, port), expected in [(on_gateway.getsockname(), "connected"),
                                           (on_loopback.getsockname(), "ConnectionRefusedError 111"),
                                           (("192.0.2.2", 80), "OSError 101")]:  # this machine's eth0: ENETUNREACH
                proc = host.run([ssh_lab.python, "-c", CONNECT, addr, str(port)])
                assert proc.stdout.strip() == expected, (host.name, addr, proc.stdout, proc.stderr)
        # and over ssh, from the shell a kernel launch would use
        addr, port = on_gateway.getsockname()
        proc = ssh_hosts[0].ssh(f"{ssh_lab.python} -c '{CONNECT}' {addr} {port}")
        assert proc.stdout.strip() == "connected", proc.stderr


def test_root_bashrc_is_not_read_over_ssh(ssh_lab: SshLab, ssh_hosts: list[SshHost]) -> None:
    """Commands over ssh do not pay for root's .bashrc (pyenv init)."""
    proc = ssh_hosts[0].ssh('echo "PYENV_ROOT=${PYENV_ROOT-}"; echo "$PATH"; command -v python3')
    assert proc.returncode == 0, proc.stderr
    pyenv, path, python3 = proc.stdout.splitlines()
    assert pyenv == "PYENV_ROOT="
    assert ".pyenv" not in path and python3 == "/usr/bin/python3"
    proc = ssh_hosts[0].ssh(f"{ssh_lab.python} -c 'import sys; print(sys.executable)'")
    assert proc.stdout.strip() == ssh_lab.python


def test_link_down_and_up(ssh_lab: SshLab, ssh_hosts: list[SshHost]) -> None:
    """link_down makes a host unreachable within the connect timeout; link_up brings it back."""
    host = ssh_hosts[1]
    assert host.ssh("true").returncode == 0
    host.link_down()
    try:
        start = time.monotonic()
        proc = host.ssh("true")
        elapsed = time.monotonic() - start
        assert proc.returncode == 255, proc
        assert elapsed < 6.5, elapsed  # ConnectTimeout 5 (or no ARP answer: "No route to host" after ~3 s)
        assert ssh_hosts[0].ssh("true").returncode == 0  # the other host is unaffected
    finally:
        host.link_up()
    proc = wait_until(lambda: host.ssh("hostname", timeout=10), 10, what="ssh after link_up")
    assert proc.stdout.strip() == host.name


def test_stop_and_start_sshd(ssh_lab: SshLab, ssh_hosts: list[SshHost]) -> None:
    """stop_sshd refuses new connections; start_sshd serves them again."""
    host = ssh_hosts[0]
    old_pid = host.sshd_pid
    host.stop_sshd()
    try:
        assert host.sshd_pid is None
        start = time.monotonic()
        proc = host.ssh("true")
        assert proc.returncode == 255 and "Connection refused" in proc.stderr, proc
        assert time.monotonic() - start < 2
    finally:
        host.start_sshd()
    assert host.sshd_pid not in (None, old_pid)
    proc = host.ssh("hostname")
    assert (proc.returncode, proc.stdout.strip()) == (0, host.name)


def test_pids_show_background_process_until_killed(ssh_lab: SshLab, ssh_hosts: list[SshHost]) -> None:
    """pids() lists a detached process started over ssh until it is killed."""
    h1, h2 = ssh_hosts[:2]
    assert h1.pids() == [] and h2.pids() == []  # sshd itself is not listed
    start = time.monotonic()
    proc = h1.ssh("nohup sleep 30 >/dev/null 2>&1 </dev/null & echo $!")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 3  # with all three redirections ssh does not wait for the background job
    pid = int(proc.stdout)
    assert h1.pids() == [pid]
    assert h1.processes_matching("sleep 30") == [(pid, "sleep 30")]
    assert h2.pids() == [] and h2.processes_matching("sleep 30") == []
    assert h1.ssh(f"kill {pid}").returncode == 0
    wait_until(lambda: h1.pids() == [], 5, what="the killed sleep to go")
    assert h1.processes_matching("sleep 30") == []


def test_ensure_user(ssh_lab: SshLab, ssh_hosts: list[SshHost]) -> None:
    """ensure_user creates a login-able test user, idempotently."""
    entry = ssh_lab.ensure_user("egdtest1")
    assert ssh_lab.ensure_user("egdtest1") == entry  # idempotent
    for host in ssh_hosts:
        proc = host.ssh("id -un; echo $HOME", user="egdtest1")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["egdtest1", entry.pw_dir]
