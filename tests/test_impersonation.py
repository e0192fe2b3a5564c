"""Impersonation: kernels run as their user (KERNEL_USERNAME), never as root or a prohibited user.

Local kernels run as that OS user (uid, gid, the user's own groups, HOME); ssh kernels log in as the user. The
module creates two test users (``egdalice``, allowed; ``egdbob``, whose uid is prohibited) and deletes them at
the end. Their kernels run Debian's /usr/bin/python3 with python3-ipykernel (the tests' interpreter usually
lives under /root, which other users cannot enter): ``tests/services/install-impersonation.sh`` installs it
when missing. Needs root.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egd.drivertools import DEFAULT_LAUNCHER, LAUNCHER_FILES
from tests import conftest
from tests.client import GatewayClient
from tests.conftest import GatewayProcess, processes_mentioning
from tests.sshhosts import SshHost, SshLab
from tests.test_lifecycle import interrupt_sleep

pytestmark = pytest.mark.security

INSTALLER = Path(__file__).resolve().parent / "services" / "install-impersonation.sh"
PYTHON = "/usr/bin/python3"
ALICE, BOB = "egdalice", "egdbob"
#: GECOS of the users this module creates; a later run deletes such users left by a crashed one.
USER_MARKER = "egd impersonation test user"
WHO = ("import json, os, pwd, getpass; print(json.dumps({'uid': os.getuid(), 'euid': os.geteuid(), "
       "'gid': os.getgid(), 'groups': os.getgroups(), 'user': getpass.getuser(), "
       "'name': pwd.getpwuid(os.getuid()).pw_name, 'home': os.environ.get('HOME'), 'cwd': os.getcwd(), "
       "'pid': os.getpid()}))")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def _kill_user_processes(uid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), sig)
            except OSError:
                pass
        time.sleep(0.2)


def _delete_user(name: str) -> None:
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    _kill_user_processes(uid)
    proc = _run(["userdel", "-r", "-f", name])
    assert proc.returncode in (0, 12), f"userdel {name}: {proc.stderr}"  # 12: no mail spool to remove


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, pwd.struct_passwd]]:
    """``egdalice`` and ``egdbob``, created (useradd -m) for this module and deleted after it."""
    if os.geteuid() != 0:
        pytest.skip("impersonation needs egd to run as root")
    proc = _run(["sh", str(INSTALLER)])
    assert proc.returncode == 0, f"{INSTALLER} failed:\n{proc.stdout}\n{proc.stderr}"
    for entry in pwd.getpwall():  # left by a run that crashed
        if entry.pw_gecos == USER_MARKER:
            _delete_user(entry.pw_name)
    created = []
    try:
        for name in (ALICE, BOB):
            try:
                pwd.getpwnam(name)
            except KeyError:
                proc = _run(["useradd", "-m", "-s", "/bin/bash", "-c", USER_MARKER, name])
                assert proc.returncode == 0, f"useradd {name}: {proc.stderr}"
                created.append(name)
        # Kernels of these users must reach their connection files under the session's test root (0700 from
        # mkdtemp): let others pass through it, not list it, as egd's own runtime directory does.
        os.chmod(conftest._ROOT, 0o711)
        yield {name: pwd.getpwnam(name) for name in (ALICE, BOB)}
    finally:
        for name in created:
            _delete_user(name)


def write_spec(root: Path, name: str, argv: list[str], driver: str = "local") -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "display_name": name, "language": "python", "metadata": {"egd": {"driver": driver}}}
    (root / name / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def gw(users: dict[str, pwd.struct_passwd], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with impersonating local kernels; bob's uid is prohibited."""
    specs = tmp_path_factory.mktemp("impspecs")
    write_spec(specs, "user_python", [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    gateway = GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(specs)], "default_kernel_name": "user_python"},
        "drivers": {"local": {"impersonation": True, "prohibited_uids": [0, users[BOB].pw_uid]}},
    })
    yield gateway
    assert gateway.client.request("GET", "/api/kernels").json == [], "kernels left on the gateway"
    assert gateway.stop() == 0, gateway.log()
    assert not gateway.kernel_processes()


def who(client: GatewayClient, kernel_id: str) -> dict[str, Any]:
    """What the kernel says about the user it runs as."""
    sock = client.connect(kernel_id)
    try:
        return dict(json.loads(sock.execute(WHO).stdout))
    finally:
        sock.close()


def test_local_kernel_runs_as_its_user(gw: GatewayProcess, users: dict[str, pwd.struct_passwd]) -> None:
    """uid, gid, groups (none of root's), HOME and working directory are alice's; only she can read the key."""
    alice = users[ALICE]
    kernel_id = gw.client.start_kernel("user_python", env={"KERNEL_USERNAME": ALICE})
    try:
        me = who(gw.client, kernel_id)
        assert (me["uid"], me["euid"], me["gid"], me["name"]) == (alice.pw_uid, alice.pw_uid, alice.pw_gid, ALICE)
        assert 0 not in me["groups"] and set(me["groups"]) <= set(os.getgrouplist(ALICE, alice.pw_gid))
        assert me["home"] == alice.pw_dir and me["cwd"] == alice.pw_dir and me["user"] == ALICE
        # The process as the system sees it: every uid and gid (real, effective, saved, fs) is alice's.
        status = Path(f"/proc/{me['pid']}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert fields["Uid"].split() == [str(alice.pw_uid)] * 4 and fields["Gid"].split() == [str(alice.pw_gid)] * 4
        assert "0" not in fields["Groups"].split()
        # Its connection file: in a directory of its own, both alice's and private; the runtime dir is 0711.
        (path,) = {arg for _, cmd in gw.kernel_processes() for arg in cmd.split() if arg.endswith(".json")}
        # (ipykernel, rewriting the file with the ports, sets the sticky bit of its directory.)
        for item, mode in ((path, 0o600), (os.path.dirname(path), 0o700)):
            info = os.stat(item)
            assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (alice.pw_uid, alice.pw_gid, mode)
        assert stat.S_IMODE(os.stat(gw.runtime_dir).st_mode) == 0o711
        sock = gw.client.connect(kernel_id)
        denied = sock.execute(f"import os\ntry:\n    os.listdir({gw.runtime_dir!r})\nexcept PermissionError:\n"
                              f"    print('denied')").stdout
        sock.close()
        assert denied.strip() == "denied"
    finally:
        assert gw.client.delete_kernel(kernel_id) == 204
    assert not processes_mentioning(kernel_id)
    assert not os.path.exists(os.path.dirname(path))


def test_interrupt_restart_delete(gw: GatewayProcess, users: dict[str, pwd.struct_passwd]) -> None:
    """egd (root) still interrupts, restarts and ends alice's kernel; nothing of it is left."""
    alice = users[ALICE]
    client = gw.client
    kernel_id = client.start_kernel("user_python", env={"KERNEL_USERNAME": ALICE,
                                                        "KERNEL_WORKING_DIR": "/root"})
    try:
        # A working directory alice cannot enter is not used: her home is.
        before = who(client, kernel_id)
        assert before["cwd"] == alice.pw_dir
        interrupt_sleep(client, kernel_id)
        resp = client.request("POST", f"/api/kernels/{kernel_id}/restart", {})
        assert resp.status == 200 and resp.json["id"] == kernel_id
        after = who(client, kernel_id)
        assert after["uid"] == alice.pw_uid and after["pid"] != before["pid"]
        assert not os.path.exists(f"/proc/{before['pid']}") or _zombie(before["pid"])
        assert len(gw.kernel_processes()) >= 1
    finally:
        assert client.delete_kernel(kernel_id) == 204
    assert not processes_mentioning(kernel_id)
    assert not [e for e in os.listdir(gw.runtime_dir) if kernel_id in e]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


@pytest.mark.parametrize(("username", "why"), [
    ("root", "root"), (BOB, "prohibited uid"), ("egdnosuchuser", "unknown user"), ("Bad User", "not a user name"),
])
def test_refused_users_start_nothing(gw: GatewayProcess, username: str, why: str) -> None:
    """root, a prohibited uid, an unknown user, a malformed name: 403, and no process is started."""
    before = gw.kernel_processes()
    resp = gw.client.request("POST", "/api/kernels", {"name": "user_python", "env": {"KERNEL_USERNAME": username}})
    assert resp.status == 403, (why, resp.status, resp.body)
    assert "cannot run as user" in resp.json["message"], resp.body
    assert gw.kernel_processes() == before
    assert gw.client.request("GET", "/api/kernels").json == []


def test_impersonation_needs_root(users: dict[str, pwd.struct_passwd], tmp_path: Path) -> None:
    """egd that cannot switch users refuses to start with impersonation on (check-config says why)."""
    config = tmp_path / "egd.yaml"
    config.write_text("drivers: {local: {impersonation: true}}\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(config, 0o644)
    # The tests' interpreter may be unreadable for alice, and Debian's cannot import egd: run the check as
    # root without any capability instead (setpriv, util-linux).
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is missing")
    proc = subprocess.run([setpriv, "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "egd",
                           "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "impersonation needs root" in proc.stderr


# ---------------------------------------------------------------------- ssh

@pytest.fixture(scope="module")
def ssh_gw(ssh_lab: SshLab, users: dict[str, pwd.struct_passwd]) -> Iterator[GatewayProcess]:
    """egd whose ssh driver logs in as the kernel's user; the launcher and its logs where users can reach them."""
    ssh_lab.ensure_user(ALICE)  # the lab's key opens alice's account on every host
    shared = Path(tempfile.mkdtemp(prefix="egd-impersonation-"))
    try:
        shared.chmod(0o755)
        for name in LAUNCHER_FILES:  # a copy of the launcher: its files side by side
            shutil.copyfile(Path(DEFAULT_LAUNCHER).parent / name, shared / name)
            (shared / name).chmod(0o644)
        launcher = shared / "kernel_launcher.py"
        logs = shared / "logs"
        logs.mkdir()
        logs.chmod(0o1777)
        specs = shared / "specs"
        write_spec(specs, "ssh_user_python", [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "ssh")
        gateway = GatewayProcess({
            "kernels": {"kernelspec_dirs": [str(specs)], "default_kernel_name": "ssh_user_python"},
            "drivers": {"local": {}, "ssh": {
                "hosts": [h.name for h in ssh_lab.hosts], "ssh_config": str(ssh_lab.ssh_config_path),
                "callback_host": ssh_lab.gateway_ip, "connect_timeout": 3, "impersonation": True,
                "prohibited_users": [BOB], "python": PYTHON, "launcher_path": str(launcher), "log_dir": str(logs)}},
        })
        yield gateway
        assert gateway.stop() == 0, gateway.log()
        for host in ssh_lab.hosts:
            assert not host.processes_matching("kernel_launcher"), "launchers left on a host"
        assert not processes_mentioning(gateway.runtime_dir), "ssh connections left behind"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.ssh
def test_ssh_kernel_logs_in_as_its_user(ssh_gw: GatewayProcess, ssh_hosts: list[SshHost],
                                        users: dict[str, pwd.struct_passwd]) -> None:
    """An ssh kernel of alice runs as alice on its host; root and prohibited users are refused with 403."""
    alice = users[ALICE]
    kernel_id = ssh_gw.client.start_kernel("ssh_user_python", env={"KERNEL_USERNAME": ALICE})
    try:
        me = who(ssh_gw.client, kernel_id)
        assert (me["user"], me["uid"], me["euid"]) == (ALICE, alice.pw_uid, alice.pw_uid)
        assert 0 not in me["groups"] and me["home"] == alice.pw_dir
        hosts = [h for h in ssh_hosts if me["pid"] in h.pids()]
        assert len(hosts) == 1
        assert os.stat(f"/proc/{me['pid']}").st_uid == alice.pw_uid
    finally:
        assert ssh_gw.client.delete_kernel(kernel_id) == 204
    for username in ("root", BOB):
        resp = ssh_gw.client.request("POST", "/api/kernels",
                                     {"name": "ssh_user_python", "env": {"KERNEL_USERNAME": username}})
        assert resp.status == 403, (username, resp.status, resp.body)
    assert ssh_gw.client.request("GET", "/api/kernels").json == []
