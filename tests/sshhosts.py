"""Real "remote hosts" for the ssh tests: Linux network namespaces on one bridge, each with its own sshd.

Layout (everything local to this machine; needs root, ``ip netns`` and ``unshare``)::

    root netns (the gateway)                       network namespace egdhN ("host" egdhN)
    egdbr0 = 10.200.0.1/24  --- veth egdvN ---  eth0 = 10.200.0.(10+N)/24, lo up, sshd on 0.0.0.0:22
                                                hostname egdhN (own UTS namespace)

* There is no default route in the namespaces and ``ip_forward`` is not touched, so nothing started on a host
  can leave the 10.200.0.0/24 bridge: the only peers are the gateway address 10.200.0.1 and the other hosts.
* **127.0.0.1 inside a host is the host's own loopback.** A gateway listener meant for remote kernels (response
  address, callbacks) must bind ``lab.gateway_ip`` (10.200.0.1), not 127.0.0.1.
* **The hosts share this machine's filesystem, users and Python**: the same /tmp, /root and interpreters. A
  connection file written by the gateway is visible on every host, which real remote hosts would not give you.
  Kernelspecs should name the interpreter by absolute path: ``lab.python`` (the interpreter running the tests,
  absolute but with symlinks kept, so a virtualenv such as tox's stays a virtualenv).
* **Root's ``~/.bashrc`` is not read on the hosts.** bash reads ``~/.bashrc`` for every command sshd runs, and this
  machine's root ``.bashrc`` runs ``pyenv init`` (~130 ms per ssh command, and ``python3`` becomes a pyenv shim).
  Each host's sshd runs in a private mount namespace in which a near-empty lab file is bind-mounted over
  ``~root/.bashrc``; the machine's file is untouched and processes outside the hosts still see it. Commands over
  ssh therefore get sshd's default PATH (``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``), so
  ``python3`` on a host is ``/usr/bin/python3``. Users made by ``lab.ensure_user`` get Debian's skeleton
  ``.bashrc``, which returns at once for non-interactive shells.
* Names resolve inside the hosts (``/etc/netns/egdhN/hosts``: ``gateway``, ``egdh1``...); the root namespace does
  not resolve ``egdhN``: use ``ssh -F lab.ssh_config_path egdhN`` (a ``Host`` alias per host), ``host.ssh_argv()``
  or ``host.ip``.

Usage::

    def test_something(ssh_lab, ssh_hosts):
        h1 = ssh_hosts[0]
        out = subprocess.run([*h1.ssh_argv(), "hostname"], capture_output=True, text=True).stdout  # "egdh1\\n"
        h1.run(["ss", "-ltn"])           # a command inside the host's namespace, without ssh
        h1.link_down(); ...; h1.link_up()  # the host vanishes from / comes back to the network

``SshLab`` cleans up what a crashed earlier run left (namespaces ``egdhN``, the bridge, its sshds, temporary
directories and test users it created) before it builds anything; a lock file (``/run/egd-sshlab.lock``) keeps two
labs on one machine from tearing each other down. The network, the lock, the test users and that cleanup are
shared with the Slurm cluster fixture: tests/netlab.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import netlab
from tests.procs import cmdline, is_zombie_or_gone

SSHD = "/usr/sbin/sshd"
INSTALLER = Path(__file__).resolve().parent / "services" / "install-ssh.sh"
BRIDGE = "egdbr0"
HOST_PREFIX = "egdh"  # hosts and their network namespaces: egdh1, egdh2, ...
VETH_PREFIX = "egdv"  # root-namespace end of each host's veth pair: egdv1, egdv2, ...
SUBNET = "10.200.0"
GATEWAY_IP = f"{SUBNET}.1"
LOCK_PATH = "/run/egd-sshlab.lock"
TMP_PREFIX = "egd-sshlab-"
#: The GECOS field of users ``SshLab.ensure_user`` creates; a later lab deletes such users left by a crashed run.
USER_MARKER = "egd ssh lab test user"
SSH_OPTIONS = {
    "IdentitiesOnly": "yes",
    "BatchMode": "yes",
    "StrictHostKeyChecking": "yes",
    "GlobalKnownHostsFile": "/dev/null",
    "UpdateHostKeys": "no",
    "CheckHostIP": "no",
    "ConnectTimeout": "5",
    "KexAlgorithms": "curve25519-sha256",
    "LogLevel": "ERROR",
}


class LabError(RuntimeError):
    """The lab could not be built, or could not be torn down completely."""


def unavailable_reason() -> str | None:
    """Why this machine cannot run the lab, or None if it can."""
    return netlab.unavailable_reason("ssh hosts need", "network namespaces, a bridge, sshd", ("ip", "unshare"))


def install() -> None:
    """Run tests/services/install-ssh.sh (a no-op when sshd, ssh and ssh-keygen are there)."""
    netlab.run_installer(INSTALLER, 600, lambda: os.access(SSHD, os.X_OK), LabError)


class SshHost:
    """One "remote host": network namespace ``netns`` at ``ip``, reachable over ssh as ``user`` on ``ssh_port``."""

    ssh_port = 22

    def __init__(self, lab: SshLab, index: int) -> None:
        self.lab = lab
        self.index = index
        self.name = f"{HOST_PREFIX}{index}"
        self.netns = self.name
        self.ip = f"{SUBNET}.{10 + index}"
        self.veth = f"{VETH_PREFIX}{index}"
        self.user = lab.user
        self.sshd_config_path = lab.dir / f"sshd_{self.name}.conf"
        self.sshd_log_path = lab.dir / f"sshd_{self.name}.log"
        self.host_key_path = lab.dir / "keys" / f"host_{self.name}_ed25519"
        self._sshd: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<SshHost {self.name} {self.ip} sshd={self.sshd_pid}>"

    # ------------------------------------------------------------------ commands
    def _in_netns(self, argv: Sequence[str]) -> list[str]:
        # ip netns exec: the network namespace (+ /etc/netns/NAME/hosts over /etc/hosts); unshare --uts: the
        # host's hostname, as sshd's children see it.  All of them exec, so the pid is the command's.
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *argv]

    def run(self, argv: Sequence[str], timeout: float = 30, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the host's namespace (no ssh), as root; text output captured unless overridden."""
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("text", True)
        return subprocess.run(self._in_netns(argv), timeout=timeout, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside the host's namespace (no ssh) and return at once."""
        return subprocess.Popen(self._in_netns(argv), **kwargs)

    def ssh_argv(self, user: str | None = None) -> list[str]:
        """The argv prefix that runs a command on this host over ssh with the lab's key, options and known_hosts.

        It does not depend on ``lab.ssh_config_path`` (``-F /dev/null``): append the remote command.
        """
        argv = ["ssh", "-F", "/dev/null", "-i", str(self.lab.key_path),
                "-o", f"UserKnownHostsFile={self.lab.known_hosts_path}"]
        for key, value in SSH_OPTIONS.items():
            argv += ["-o", f"{key}={value}"]
        return [*argv, "-p", str(self.ssh_port), "-l", user or self.user, self.ip]

    def ssh(self, command: str, timeout: float = 30, user: str | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """``ssh_argv(user) + [command]``, output captured as text."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([*self.ssh_argv(user), command], timeout=timeout, **kwargs)

    def ensure_user(self, name: str) -> pwd.struct_passwd:
        """``lab.ensure_user(name)``: users are machine-wide, so the user can log in on every host."""
        return self.lab.ensure_user(name)

    # ------------------------------------------------------------------ processes
    @property
    def sshd_pid(self) -> int | None:
        """The pid of the host's listening sshd, None while it is stopped."""
        if self._sshd is None or self._sshd.poll() is not None:
            return None
        return self._sshd.pid

    def pids(self) -> list[int]:
        """Live processes in the host's network namespace (``ip netns pids``), sshd excluded.

        "sshd" means the listener and its per-connection processes (anything whose executable is sshd); zombies
        are left out too. What remains are the commands run over ssh (their shells and children) and ``run()``'s.
        """
        return [pid for pid in netlab.netns_pids(self.netns) if netlab.exe(pid) != SSHD and not is_zombie_or_gone(pid)]

    def processes_matching(self, text: str) -> list[tuple[int, str]]:
        """``(pid, cmdline)`` of the host's processes (as in ``pids()``) whose command line contains ``text``."""
        found = []
        for pid in self.pids():
            line = cmdline(pid)
            if text in line:
                found.append((pid, line))
        return found

    # ------------------------------------------------------------------ failures
    def link_down(self) -> None:
        """Take the host off the network (its veth link down): connections to it hang or fail, as to a dead host."""
        self.lab._net.cmd(["ip", "link", "set", self.veth, "down"])

    def link_up(self) -> None:
        """Put the host back on the network."""
        self.lab._net.cmd(["ip", "link", "set", self.veth, "up"])

    def stop_sshd(self, timeout: float = 5) -> None:
        """Stop the host's sshd (SIGTERM, then SIGKILL). Sessions already open keep running, as with a real sshd."""
        proc, self._sshd = self._sshd, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def start_sshd(self, timeout: float = 10) -> None:
        """Start the host's sshd (no-op if it runs) and wait until a real ``ssh ... true`` succeeds."""
        self._spawn_sshd()
        self.lab.wait_ready([self], timeout)

    def _spawn_sshd(self) -> None:
        if self.sshd_pid is not None:
            return
        # A private mount namespace for the host, so a lean .bashrc can be bind-mounted over root's (see the
        # module docstring) without any effect outside it; a UTS namespace for the hostname.  ip netns exec,
        # unshare and sh all exec: the Popen pid is sshd's.
        script = ('hostname "$1" && { [ -z "$2" ] || mount --bind "$2" "$3"; } && '
                  'exec "$4" -D -e -f "$5"')
        bashrc_target = self.lab.root_bashrc
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "--propagation", "private",
                "--", "sh", "-c", script, "sh", self.name,
                str(self.lab.host_bashrc_path) if bashrc_target else "", bashrc_target or "",
                SSHD, str(self.sshd_config_path)]
        self._sshd = netlab.spawn_logged("sshd", argv, self.sshd_log_path)


class SshLab:
    """``n_hosts`` hosts ``egdh1..N`` (10.200.0.11...) on bridge ``egdbr0`` (10.200.0.1), each running sshd.

    ``SshLab(2).start()`` ... ``close()``, or ``with SshLab(2) as lab:``. ``close()`` is safe to call after a
    failed ``start()`` and more than once.
    """

    user = "root"
    gateway_ip = GATEWAY_IP
    bridge = BRIDGE

    def __init__(self, n_hosts: int = 2, lock_timeout: float = 60) -> None:
        if not 1 <= n_hosts <= 200:
            raise ValueError("n_hosts must be between 1 and 200")
        self.n_hosts = n_hosts
        self.lock_timeout = lock_timeout
        #: The interpreter running the tests, absolute, symlinks kept (a venv's bin/python stays the venv's).
        self.python = os.path.abspath(sys.executable)
        self.dir = Path(tempfile.gettempdir()) / f"{TMP_PREFIX}unstarted"
        self.hosts: list[SshHost] = []
        self.root_bashrc: str | None = None
        self.created_users: list[str] = []
        self.timings: dict[str, float] = {}
        self._net = netlab.NetLab(what="ssh lab", error=LabError, bridge=BRIDGE, subnet=SUBNET,
                                  netns_pattern=rf"{HOST_PREFIX}\d+", veth_prefix=VETH_PREFIX, lock_path=LOCK_PATH,
                                  tmp_prefix=TMP_PREFIX, user_marker=USER_MARKER)

    # ------------------------------------------------------------------ paths
    @property
    def key_path(self) -> Path:
        """The private key (ed25519, no passphrase) every host accepts for root and for ``ensure_user`` users."""
        return self.dir / "keys" / "id_ed25519"

    @property
    def known_hosts_path(self) -> Path:
        """The host keys of all hosts, under their alias and their IP."""
        return self.dir / "known_hosts"

    @property
    def ssh_config_path(self) -> Path:
        """An ssh client config with a ``Host`` alias per host: ``ssh -F <this> egdh1 hostname`` works."""
        return self.dir / "ssh_config"

    @property
    def host_bashrc_path(self) -> Path:
        """The file that stands for root's ``~/.bashrc`` on the hosts (near empty)."""
        return self.dir / "host-bashrc"

    def host(self, name: str) -> SshHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def __enter__(self) -> SshLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ bring-up
    def start(self, ready_timeout: float = 10) -> SshLab:
        """Clean up leftovers of a crashed run, build the network, write keys and configs, start every sshd."""
        if self._net.held:
            return self
        t0 = time.monotonic()
        self._net.lock(self.lock_timeout)  # from here on close() may tear down: this lab holds the lock
        self.cleanup_leftovers()
        t1 = time.monotonic()
        self.dir = self._net.make_dir()  # 0755: sshd reads authorized_keys as the target user
        self.hosts = [SshHost(self, i) for i in range(1, self.n_hosts + 1)]
        net_hosts = [netlab.NetHost(host.netns, host.veth, host.ip) for host in self.hosts]
        self._net.check_subnet_free()
        self._write_files()
        self._net.write_names(net_hosts)
        self._net.build(net_hosts)
        t2 = time.monotonic()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir (systemd makes it)
        for host in self.hosts:
            host._spawn_sshd()
        self.wait_ready(self.hosts, ready_timeout)
        t3 = time.monotonic()
        self.timings.update(cleanup=t1 - t0, files_and_network=t2 - t1, sshd_ready=t3 - t2, start=t3 - t0)
        return self

    def _write_files(self) -> None:
        keys = self.dir / "keys"
        keys.mkdir(mode=0o700)
        auth = self.dir / "authorized_keys"
        auth.mkdir(mode=0o755)
        self._net.cmd(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "egd-sshlab", "-f", str(self.key_path)])
        pubkey = self.key_path.with_suffix(".pub").read_text()
        netlab.write_file(auth / self.user, pubkey)
        known = []
        for host in self.hosts:
            self._net.cmd(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f",
                           str(host.host_key_path)])
            key_type, key_blob = host.host_key_path.with_suffix(".pub").read_text().split()[:2]
            known.append(f"{host.name},{host.ip} {key_type} {key_blob}\n")
            netlab.write_file(host.sshd_config_path, self._sshd_config(host))
            self._net.cmd([SSHD, "-t", "-f", str(host.sshd_config_path)])
        netlab.write_file(self.known_hosts_path, "".join(known))
        config = [f"Host {host.name}\n  HostName {host.ip}\n" for host in self.hosts]
        patterns = " ".join([*(h.name for h in self.hosts), *(h.ip for h in self.hosts)])
        config.append(f"Host {patterns}\n  User {self.user}\n  Port {SshHost.ssh_port}\n"
                      f"  IdentityFile {self.key_path}\n  UserKnownHostsFile {self.known_hosts_path}\n")
        config += [f"  {key} {value}\n" for key, value in SSH_OPTIONS.items()]
        netlab.write_file(self.ssh_config_path, "".join(config))
        try:
            home = pwd.getpwnam(self.user).pw_dir
        except KeyError:
            home = "/root"
        bashrc = os.path.join(home, ".bashrc")
        self.root_bashrc = bashrc if os.path.isfile(bashrc) and not os.path.islink(bashrc) else None
        netlab.write_file(self.host_bashrc_path,
                          "# egd ssh lab: ~/.bashrc of root on the test hosts (bind-mounted in each host's mount\n"
                          "# namespace). The machine's own one runs pyenv init, ~130 ms for every ssh command.\n")

    def _sshd_config(self, host: SshHost) -> str:
        # No comments at the ends of lines (a config error for sshd). StrictModes no: the files live under /tmp.
        # UsePAM no: no PAM session noise (then locked accounts, '!' in shadow, are refused: ensure_user unlocks).
        return "\n".join([
            f"Port {host.ssh_port}",
            "ListenAddress 0.0.0.0",
            f"HostKey {host.host_key_path}",
            f"AuthorizedKeysFile {self.dir}/authorized_keys/%u",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "PidFile none",
            "AcceptEnv LANG LC_* KERNEL_* JUPYTER_* EG_* EGD_*",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
            "",
        ])

    def wait_ready(self, hosts: Sequence[SshHost], timeout: float = 10) -> None:
        """Wait until every host in ``hosts`` answers a real ``ssh ... true``; LabError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        pending = {host.name: host for host in hosts}
        last_error: dict[str, str] = {}
        while pending:
            for host in list(pending.values()):
                if host.sshd_pid is None:
                    raise LabError(f"sshd on {host.name} exited:\n{self._log_tail(host)}")
            # Do not knock before sshd listens: a connection refused is cheap, but this keeps its log clean.
            probes = {name: subprocess.Popen([*host.ssh_argv(), "true"], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                      for name, host in pending.items() if "Server listening" in self._log_tail(host)}
            for name, probe in probes.items():
                try:
                    _, err = probe.communicate(timeout=max(0.1, deadline - time.monotonic()) + 6)
                except subprocess.TimeoutExpired:
                    probe.kill()
                    _, err = probe.communicate()
                if probe.returncode == 0:
                    del pending[name]
                else:
                    last_error[name] = err.strip()
            if not pending:
                return
            if time.monotonic() > deadline:
                details = "; ".join(f"{n}: {last_error.get(n, 'sshd not listening')}\n{self._log_tail(h)}"
                                    for n, h in pending.items())
                raise LabError(f"ssh hosts not ready after {timeout}s: {details}")
            time.sleep(0.05)

    @staticmethod
    def _log_tail(host: SshHost) -> str:
        try:
            text = host.sshd_log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[text.rfind("--- starting sshd"):][-2000:]

    # ------------------------------------------------------------------ users
    def ensure_user(self, name: str) -> pwd.struct_passwd:
        """A non-root user that can ssh to every host with the lab key (``host.ssh_argv(user=name)``). Idempotent.

        Created (``useradd -m``, bash, marked in GECOS) if missing and then deleted again by ``close()``; an
        existing account is kept, and only unlocked (``usermod -p '*'``) if it is locked, as sshd refuses locked
        accounts when PAM is off.
        """
        if self._net.add_user(name):
            self.created_users.append(name)
        if self._shadow_password(name).startswith("!"):
            self._net.cmd(["usermod", "-p", "*", name])
        netlab.write_file(self.dir / "authorized_keys" / name, self.key_path.with_suffix(".pub").read_text())
        return pwd.getpwnam(name)

    @staticmethod
    def _shadow_password(name: str) -> str:
        with open("/etc/shadow") as handle:
            for line in handle:
                fields = line.split(":")
                if fields[0] == name and len(fields) > 1:
                    return fields[1]
        return ""

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Kill sshd and every process in the hosts, delete namespaces, /etc/netns entries, bridge, created users
        and the temporary directory. Collects errors and raises LabError at the end if anything is left."""
        if not self._net.held:
            return
        errors: list[str] = []
        try:
            for host in self.hosts:
                try:
                    host.stop_sshd(timeout=3)
                except Exception as exc:  # keep tearing down
                    errors.append(f"stopping sshd on {host.name}: {exc!r}")
            errors += self._net.tear_down(self.created_users, self.dir)
        finally:
            self._net.unlock()
        if errors:
            raise LabError("ssh lab teardown incomplete: " + "; ".join(errors))

    def cleanup_leftovers(self) -> None:
        """Remove what an earlier lab that crashed (or was killed) left behind. Call only while holding the lock."""
        self._net.cleanup(_kill_stray_sshds)


def _kill_stray_sshds() -> list[str]:
    # An sshd of a crashed lab that is not in one of its namespaces any more (those die with the namespaces):
    # recognised by its config file under the lab's temporary prefix.
    prefix = os.path.join(tempfile.gettempdir(), TMP_PREFIX)
    strays = [pid for pid in netlab.all_pids() if netlab.exe(pid) == SSHD and prefix in cmdline(pid)]
    left = netlab.kill_all(lambda: [p for p in strays if not is_zombie_or_gone(p)])
    return [f"sshd of an earlier lab left: {left}"] if left else []


# ---------------------------------------------------------------------- fixtures
# Both fixtures may be registered more than once (imported into a conftest and into a test module): every
# registration gets its own fixture instance, so they share one lab through this reference count.
_shared_lab: SshLab | None = None
_shared_users = 0


@pytest.fixture(scope="session")
def ssh_lab() -> Iterator[SshLab]:
    """Two ssh hosts (``egdh1``, ``egdh2``) for the whole session; installs sshd first if it is missing."""
    global _shared_lab, _shared_users
    if _shared_lab is None:
        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
        if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
            install()
        lab = SshLab(n_hosts=2)
        try:
            lab.start()
        except BaseException:
            with contextlib.suppress(LabError):  # the start error matters; the next lab cleans up what is left
                lab.close()
            raise
        _shared_lab = lab
    _shared_users += 1
    try:
        yield _shared_lab
    finally:
        _shared_users -= 1
        if _shared_users == 0:
            lab, _shared_lab = _shared_lab, None
            lab.close()


@pytest.fixture(scope="session")
def ssh_hosts(ssh_lab: SshLab) -> list[SshHost]:
    """The lab's hosts, ``[egdh1, egdh2]``."""
    return ssh_lab.hosts
