"""What the test fixtures that build "hosts" as Linux network namespaces on one bridge share: the ssh lab
(tests/sshhosts.py) and the Slurm cluster (tests/slurmcluster.py).

A ``NetLab`` is one such network, described by its names (bridge, namespaces, veths, lock file, temporary
directory prefix, the GECOS marker of its test users), its /24 subnet and the error class its fixture raises. It
holds the lab's lock file, builds and removes the bridge, the veth pairs and the namespaces with their
``/etc/netns`` files, creates and deletes marked test users, and removes what a crashed earlier run of the same
lab left. What runs inside the namespaces (sshd, slurmd...) and how commands enter them stays with each fixture.

Layout of one lab::

    root netns: BRIDGE = SUBNET.1/24 --- veth (root end) --- eth0 = host ip/24 in the host's namespace

There is no default route in the namespaces and ``ip_forward`` is not touched: nothing started on a host can
leave the bridge.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tests.procs import is_zombie_or_gone

#: How to stop processes: SIGTERM, then SIGKILL for what is left.
TERM_THEN_KILL: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL)
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}")


# ---------------------------------------------------------------------- processes, links, files
def cmd(argv: Sequence[str], *, error: type[Exception], timeout: float = 30, check: bool = True,
        **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``argv`` with text output captured; with ``check``, raise ``error`` (the fixture's class) naming the
    command and its output when it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise error(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def exe(pid: int) -> str:
    """The process's executable (``/proc/PID/exe``), "" when it is gone or unreadable."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def all_pids() -> list[int]:
    """Every pid on the machine but this process's."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and int(entry) != os.getpid()]


def uid(pid: int) -> int | None:
    """The process's real uid (the owner of ``/proc/PID``), None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def netns_pids(netns: str) -> list[int]:
    """The processes in a network namespace (``ip netns pids``), this process left out."""
    proc = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def links() -> list[str]:
    """The names of this (root) namespace's network links, without the ``@peer`` suffix."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def kill_all(pids_of: Callable[[], list[int]], timeout: float = 3.0,
             signals: Sequence[signal.Signals] = TERM_THEN_KILL) -> list[int]:
    """Send each of ``signals`` to every pid ``pids_of()`` returns, waiting up to ``timeout`` s after each for
    them to go; the pids still alive at the end. ``pids_of`` is asked again each time: children appear."""
    for sig in signals:
        for pid in pids_of():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(is_zombie_or_gone(pid) for pid in pids_of()):
                return []
            time.sleep(0.02)
    return [pid for pid in pids_of() if not is_zombie_or_gone(pid)]


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` with ``mode`` exactly (not masked by the umask)."""
    path.write_text(text)
    path.chmod(mode)


def spawn_logged(name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a daemon with its output appended to ``log`` after a ``--- starting NAME at HH:MM:SS`` line (a log
    tail from that line shows this run only). A new session: ^C on pytest must not kill it before the teardown."""
    with open(log, "ab") as handle:
        handle.write(f"--- starting {name} at {time.strftime('%H:%M:%S')}\n".encode())
        handle.flush()
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def delete_user(name: str) -> list[str]:
    """Kill the user's processes and delete the user with its home (``userdel -r -f``); the problems, if any."""
    try:
        user_id = pwd.getpwnam(name).pw_uid
    except KeyError:
        return []
    kill_all(lambda: [pid for pid in all_pids() if uid(pid) == user_id])
    proc = subprocess.run(["userdel", "-r", "-f", name], capture_output=True, text=True, timeout=30)
    # userdel -r exits 12 when it could not remove the mail spool, which useradd -m did not create
    if proc.returncode not in (0, 12):
        return [f"userdel {name}: {proc.stderr.strip()}"]
    return []


# ---------------------------------------------------------------------- machine checks, installers
def unavailable_reason(who_needs: str, root_for: str, tools: Sequence[str]) -> str | None:
    """Why this machine cannot build a lab, or None if it can: ``who_needs`` starts each reason ("ssh hosts
    need"), ``root_for`` says what root is needed for, ``tools`` are the commands it runs (iproute2, util-linux)."""
    if sys.platform != "linux":
        return f"{who_needs} Linux network namespaces"
    if os.geteuid() != 0:
        return f"{who_needs} root ({root_for})"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{who_needs} `{tool}` (iproute2, util-linux)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


def run_installer(script: Path, timeout: float, done: Callable[[], bool], error: type[Exception]) -> None:
    """Run an install script of tests/services; raise ``error`` with its output unless it succeeds and ``done()``
    holds afterwards."""
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not done():
        raise error(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def lock_busy(path: str) -> bool:
    """Whether another process holds the lock file ``path`` right now (its lab runs, or is being built)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the flock if it was taken
    return False


# ---------------------------------------------------------------------- the lab
class NetHost(NamedTuple):
    """One namespace "host": its network namespace (also its name in ``/etc/hosts``), the root-namespace end of
    its veth pair, and its address on the bridge."""

    netns: str
    veth: str
    ip: str


class NetLab:
    """The network and host state of one lab; see the module docstring.

    ``what`` names the lab in messages ("ssh lab"); ``error`` is the exception class raised for it;
    ``netns_pattern`` (a regex) matches the names of all its namespaces and ``veth_prefix`` + digits its veths,
    so that the leftovers of a crashed run are found without knowing how many hosts it had. While the lock is
    held, everything that matches is this lab's.
    """

    def __init__(self, *, what: str, error: type[Exception], bridge: str, subnet: str, netns_pattern: str,
                 veth_prefix: str, lock_path: str, tmp_prefix: str, user_marker: str,
                 kill_signals: Sequence[signal.Signals] = TERM_THEN_KILL) -> None:
        self.what = what
        self.error = error
        self.bridge = bridge
        self.subnet = subnet
        self.gateway_ip = f"{subnet}.1"
        self.netns_pattern = netns_pattern
        self.veth_prefix = veth_prefix
        self.lock_path = lock_path
        self.tmp_prefix = tmp_prefix
        self.user_marker = user_marker
        #: How processes left in the namespaces are stopped when they are removed.
        self.kill_signals = tuple(kill_signals)
        self._lock_fd: int | None = None

    def cmd(self, argv: Sequence[str], timeout: float = 30, check: bool = True,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """``cmd()`` raising this lab's error class."""
        return cmd(argv, error=self.error, timeout=timeout, check=check, **kwargs)

    # ------------------------------------------------------------------ lock
    @property
    def held(self) -> bool:
        """Whether this lab holds its lock: from ``lock()`` (the start) until ``unlock()`` (the end of the close)."""
        return self._lock_fd is not None

    def lock(self, timeout: float) -> None:
        """Take the lab's lock file (flock, our pid written in it), waiting up to ``timeout`` s for another
        process on this machine that holds it: two labs with the same names would tear each other down."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 100, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise self.error(f"another {self.what} holds {self.lock_path} (pid {holder or '?'}) "
                                     f"after {timeout}s") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (no-op when not held)."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ bring-up
    def make_dir(self) -> Path:
        """A new temporary directory ``<tmp>/<tmp_prefix>XXXX``, mode 0755: daemons and test users that are not
        root must traverse it."""
        path = Path(tempfile.mkdtemp(prefix=self.tmp_prefix))
        path.chmod(0o755)
        return path

    def check_subnet_free(self) -> None:
        """Raise unless no address of this machine is in the lab's subnet (the leftovers are gone by now: one
        that is left is someone else's)."""
        out = self.cmd(["ip", "-o", "-4", "addr", "show"]).stdout
        for line in out.splitlines():
            if f" {self.subnet}." in line:
                raise self.error(f"{self.subnet}.0/24 is already in use on this machine (not by a previous "
                                 f"{self.what}): {line}")

    def write_names(self, hosts: Sequence[NetHost]) -> None:
        """``/etc/netns/NETNS/hosts`` for every host (``gateway`` and every host by name) and a resolv.conf that
        sends DNS nowhere: name lookups in a namespace never reach the real DNS server."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback", f"{self.gateway_ip} gateway",
                 *(f"{host.ip} {host.netns}" for host in hosts)]
        for host in hosts:
            etc = Path("/etc/netns") / host.netns
            etc.mkdir(parents=True, exist_ok=True)
            write_file(etc / "hosts", "\n".join(lines) + "\n")
            write_file(etc / "resolv.conf", "nameserver 127.0.0.1\n")

    def build(self, hosts: Sequence[NetHost]) -> None:
        """The bridge with the gateway address, and for every host its namespace (lo up) joined to the bridge by a
        veth pair whose namespace end is ``eth0`` with the host's address."""
        self.cmd(["ip", "link", "add", self.bridge, "type", "bridge"])
        self.cmd(["ip", "addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge])
        self.cmd(["ip", "link", "set", self.bridge, "up"])
        for host in hosts:
            ns = host.netns
            self.cmd(["ip", "netns", "add", ns])
            self.cmd(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            self.cmd(["ip", "link", "set", host.veth, "master", self.bridge])
            self.cmd(["ip", "link", "set", host.veth, "up"])
            self.cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            self.cmd(["ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
            self.cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])

    # ------------------------------------------------------------------ users
    def add_user(self, name: str, *useradd_options: str) -> bool:
        """Create the test user ``name`` (``useradd -m``, bash, marked in GECOS, plus ``useradd_options``) unless
        it exists; True if it was created here (then the fixture deletes it again). Needs the lock: the marker
        makes a later lab delete the user if this one crashes."""
        if not _USER_NAME.fullmatch(name) or name == "root":
            raise ValueError(f"bad test user name {name!r}")
        if not self.held:
            raise self.error(f"ensure_user() needs a started {self.what}")
        try:
            pwd.getpwnam(name)
        except KeyError:
            self.cmd(["useradd", *useradd_options, "-m", "-s", "/bin/bash", "-c", self.user_marker, name])
            return True
        return False

    # ------------------------------------------------------------------ teardown
    def _is_netns(self, name: str) -> bool:
        return re.fullmatch(self.netns_pattern, name) is not None

    def _is_link(self, name: str) -> bool:
        return name == self.bridge or re.fullmatch(rf"{re.escape(self.veth_prefix)}\d+", name) is not None

    def _namespaces(self) -> list[str]:
        listed = self.cmd(["ip", "netns", "list"], check=False).stdout.splitlines()
        return [fields[0] for fields in (line.split() for line in listed) if fields and self._is_netns(fields[0])]

    def _etc_netns(self) -> list[str]:
        return [d for d in os.listdir("/etc/netns") if self._is_netns(d)] if os.path.isdir("/etc/netns") else []

    def remove_network(self) -> list[str]:
        """Kill the processes in the lab's namespaces (``kill_signals``), delete the namespaces, their
        ``/etc/netns`` entries, the veths and the bridge; the problems, if any."""
        errors = []
        for ns in sorted({*self._namespaces(), *self._etc_netns()}):
            if os.path.exists(f"/run/netns/{ns}"):
                left = kill_all(functools.partial(netns_pids, ns), signals=self.kill_signals)
                if left:
                    errors.append(f"processes left in {ns}: {left}")
                proc = self.cmd(["ip", "netns", "del", ns], check=False)
                if proc.returncode != 0:
                    errors.append(f"ip netns del {ns}: {proc.stderr.strip()}")
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir("/etc/netns")  # only if empty: other tools may keep entries there
        for link in [link for link in links() if self._is_link(link)]:
            # a veth goes with its namespace, unless a process pinned the namespace; but asynchronously, so
            # "Cannot find device" means it is gone, as wanted
            proc = self.cmd(["ip", "link", "del", link], check=False)
            if proc.returncode != 0 and "Cannot find device" not in proc.stderr:
                errors.append(f"ip link del {link}: {proc.stderr.strip()}")
        return errors

    def tear_down(self, users: list[str], directory: Path) -> list[str]:
        """The common end of a close: ``remove_network()``, delete ``users`` (the ones this lab created; the list
        is emptied) and ``directory``; the problems, if any. The caller unlocks afterwards."""
        errors = self.remove_network()
        for name in users:
            errors += delete_user(name)
        users.clear()
        shutil.rmtree(directory, ignore_errors=True)
        return errors

    def cleanup(self, kill_daemons: Callable[[], list[str]]) -> None:
        """Remove what an earlier run of this lab that crashed (or was killed) left: the network (with every process
        in it), then the lab's daemons outside the namespaces (``kill_daemons()``, returning problems), the marked
        users and the temporary directories. Raises the lab's error if anything is left. Only with the lock."""
        errors = self.remove_network()
        errors += kill_daemons()
        for entry in pwd.getpwall():
            if entry.pw_gecos == self.user_marker:
                errors += delete_user(entry.pw_name)
        for path in Path(tempfile.gettempdir()).glob(f"{self.tmp_prefix}*"):
            shutil.rmtree(path, ignore_errors=True)
        if errors:
            raise self.error(f"could not clean up an earlier {self.what}: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """What of this lab (of any run) is on this machine: namespaces, links, ``/etc/netns`` entries, marked
        users and temporary directories. Processes are the fixture's to look for."""
        found = [f"netns {ns}" for ns in self._namespaces()]
        found += [f"link {link}" for link in links() if self._is_link(link)]
        found += [f"/etc/netns/{d}" for d in self._etc_netns()]
        found += [f"user {e.pw_name}" for e in pwd.getpwall() if e.pw_gecos == self.user_marker]
        found += [f"dir {p}" for p in Path(tempfile.gettempdir()).glob(f"{self.tmp_prefix}*")]
        return found
