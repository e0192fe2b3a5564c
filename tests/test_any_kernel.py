"""Any kernelspec's kernel on every driver (issue 12), not only ipykernel's.

Two kernels that are not built on ipykernel, installed and registered as a user would by
``tests/services/install-kernels.sh``: IRkernel (R, Debian's ``r-cran-irkernel``, kernelspec ``ir``) and Deno's
built-in kernel (Rust, the npm package ``deno``, kernelspec ``deno``). Each runs through egd end to end: a cell,
an interrupted long cell, a restart, a delete that leaves nothing behind; locally, on the ssh hosts
(tests/sshhosts.py) and, for R, as a plain YARN kernel (tests/yarncluster.py). The launcher's own tests: its
retry with fresh ports when a port it chose is taken, and its ``--exec`` mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egd.launchers import kernel_launcher
from tests.client import GatewayClient
from tests.conftest import KERNELSPECS, GatewayProcess, processes_mentioning, wait_until
from tests.procs import alive
from tests.sshhosts import SshHost, SshLab
from tests.test_launcher_hostile import SECRET, CallbackServer

INSTALLER = Path(__file__).resolve().parent / "services" / "install-kernels.sh"
#: The kernels' settings in every gateway of this module: a quick heartbeat, which each of these kernels answers
#: in its own way (IRkernel's heartbeat is a REP socket).
KERNEL_SETTINGS: dict[str, Any] = {"heartbeat_interval": 1, "heartbeat_misses": 3}


@dataclass(frozen=True)
class Language:
    """What a test needs to drive one kernel: code in its language."""

    spec: str  #: the kernelspec install-kernels.sh registers
    assign: str  #: sets x to 42
    show: str  #: prints x
    long: str  #: a cell that runs for a minute unless interrupted
    where: str  #: prints the host name


LANGUAGES = {
    "ir": Language("ir", "x <- 6 * 7", "cat(x)", "Sys.sleep(60)", 'cat(Sys.info()[["nodename"]])'),
    "deno": Language("deno", "globalThis.x = 6 * 7", "console.log(x)",
                     "const end = Date.now() + 60000; while (Date.now() < end) {}", "console.log(Deno.hostname())"),
}


@pytest.fixture(scope="session")
def kernelspecs() -> dict[str, dict[str, Any]]:
    """The registered kernelspecs of the kernels above (``jupyter kernelspec list`` finds them), installed by
    tests/services/install-kernels.sh when missing."""
    proc = subprocess.run(["sh", str(INSTALLER)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{INSTALLER} failed:\n{proc.stdout}\n{proc.stderr}"
    from jupyter_client.kernelspec import KernelSpecManager

    found = KernelSpecManager().find_kernel_specs()
    specs = {}
    for name in LANGUAGES:
        assert name in found, f"{INSTALLER} did not register the kernelspec {name}: {found}"
        specs[name] = json.loads((Path(found[name]) / "kernel.json").read_text())
    return specs


def write_spec(root: Path, name: str, base: dict[str, Any], driver: str, **egd: Any) -> None:
    """The registered kernelspec ``base`` for ``driver``, its command by absolute path (a host or a YARN
    container need not have the gateway's PATH)."""
    argv = list(base["argv"])
    argv[0] = shutil.which(argv[0]) or argv[0]
    spec = {**base, "argv": argv, "display_name": name,
            "metadata": {"egd": {"driver": driver, **egd}}}
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "kernel.json").write_text(json.dumps(spec))


def exercise(client: GatewayClient, spec: str, language: Language) -> tuple[str, str]:
    """Start a kernel of ``spec``; run a cell, interrupt a long one (state survives), restart (state is gone);
    (kernel id, host name the kernel reported after its restart). The caller deletes the kernel."""
    kernel_id = client.start_kernel(spec)
    try:
        sock = client.connect(kernel_id)
        try:
            assert sock.execute(language.assign).reply["content"]["status"] == "ok"
            assert sock.execute(language.show).stdout.strip() == "42"

            msg = sock.request("execute_request", {"code": language.long, "silent": False, "store_history": True,
                                                   "user_expressions": {}, "allow_stdin": False})
            wait_until(lambda: client.kernel(kernel_id).json["execution_state"] == "busy", 20, what="busy")
            time.sleep(0.5)  # inside the long cell, not before it
            started = time.monotonic()
            assert client.request("POST", f"/api/kernels/{kernel_id}/interrupt", {}).status == 204
            reply = sock.wait_for(msg, 20).reply["content"]
            assert time.monotonic() - started < 10
            assert reply["status"] in ("error", "abort"), reply  # IRkernel answers abort, Deno an error
            assert sock.execute(language.show).stdout.strip() == "42", "the interrupt restarted the kernel"

            resp = client.request("POST", f"/api/kernels/{kernel_id}/restart", {})
            assert resp.status == 200 and resp.json["id"] == kernel_id
            assert sock.execute(language.show).reply["content"]["status"] == "error", "state survived a restart"
            assert sock.execute(language.assign).reply["content"]["status"] == "ok"
            host = sock.execute(language.where).stdout.strip()
        finally:
            sock.close()
    except BaseException:
        client.delete_kernel(kernel_id)
        raise
    return kernel_id, host


# -- locally ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_local(name: str, kernelspecs: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """The registered kernelspec, unchanged, on the local driver."""
    gw = GatewayProcess({"kernels": {"kernelspec_dirs": [str(KERNELSPECS)], **KERNEL_SETTINGS}})
    try:
        kernel_id, _ = exercise(gw.client, name, LANGUAGES[name])
        assert gw.kernel_processes(), "the kernel's processes name their connection file"
        assert gw.client.delete_kernel(kernel_id) == 204
        wait_until(lambda: not gw.kernel_processes(), 10, what="no process of the kernel left")
    finally:
        gw.stop()


# -- on the ssh hosts -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ssh_gw(ssh_lab: SshLab, kernelspecs: dict[str, dict[str, Any]],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the ssh driver and ``ssh_<name>`` kernelspecs; no launcher may be left on a host at its end."""
    tmp = tmp_path_factory.mktemp("anyssh")
    for name, spec in kernelspecs.items():
        write_spec(tmp / "specs", f"ssh_{name}", spec, "ssh")
    # python: the launcher's interpreter; the ssh driver takes an absolute argv[0] for one otherwise.
    settings = {"hosts": [h.name for h in ssh_lab.hosts], "ssh_config": str(ssh_lab.ssh_config_path),
                "callback_host": ssh_lab.gateway_ip, "log_dir": str(tmp / "hostlogs"), "connect_timeout": 3,
                "python": ssh_lab.python}
    gw = GatewayProcess({"kernels": {"kernelspec_dirs": [str(tmp / "specs")], **KERNEL_SETTINGS},
                         "drivers": {"local": {}, "ssh": settings}})
    try:
        yield gw
    finally:
        gw.stop()
    for host in ssh_lab.hosts:
        assert not host.processes_matching("kernel_launcher"), "launchers left on a host"


@pytest.mark.ssh
@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_ssh(name: str, ssh_gw: GatewayProcess, ssh_hosts: list[SshHost]) -> None:
    """The kernel runs on an ssh host (it says so itself) beside egd's launcher, and leaves nothing there."""
    kernel_id, host = exercise(ssh_gw.client, f"ssh_{name}", LANGUAGES[name])
    try:
        assert host in {h.name for h in ssh_hosts}
        on_host = next(h for h in ssh_hosts if h.name == host)
        assert any("kernel_launcher" in cmd for _, cmd in on_host.processes_matching(kernel_id))
    finally:
        assert ssh_gw.client.delete_kernel(kernel_id) == 204
    wait_until(lambda: not any(h.processes_matching(kernel_id) for h in ssh_hosts), 10,
               what="no process of the kernel on any host")


# -- as a plain YARN kernel -------------------------------------------------------------------------------

@pytest.mark.yarn
def test_yarn_plain_r_kernel(yarn_cluster: Any, kernelspecs: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """IRkernel as a plain (non-Spark) YARN application: it runs in a YARN container, and DELETE leaves the
    application final and no process behind."""
    from tests.test_yarn import FINAL, app_of, yarn_settings

    write_spec(tmp_path / "specs", "yarn_ir", kernelspecs["ir"], "yarn", launch_timeout=120,
               config={"mode": "python", "memory": "256m"})
    gw = GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(tmp_path / "specs")], "launch_timeout": 120,
                    "max_launch_timeout": 300, **KERNEL_SETTINGS},
        "drivers": {"local": {}, "yarn": yarn_settings(yarn_cluster, tmp_path)},
    })
    try:
        kernel_id, _ = exercise(gw.client, "yarn_ir", LANGUAGES["ir"])
        try:
            app_id = app_of(gw.client, kernel_id)
            assert yarn_cluster.app(app_id)["state"] == "RUNNING"
            sock = gw.client.connect(kernel_id)
            assert sock.execute('cat(Sys.getenv("CONTAINER_ID"))').stdout.startswith("container_")
            sock.close()
        finally:
            assert gw.client.delete_kernel(kernel_id) == 204
        assert yarn_cluster.app(app_id)["state"] in FINAL
        wait_until(lambda: not processes_mentioning(kernel_id), 15, what="no process of the kernel left")
    finally:
        gw.stop()


# -- the launcher: fresh ports when one is taken; --exec ------------------------------------------------------

#: Runs as the kernel's command. On its first run only (``squat``), before it becomes the real kernel, another
#: program (a process outside the kernel's process tree) starts listening on the heartbeat port the launcher
#: chose: this injects the pick-then-release race, too rare to wait for, where someone else binds a port
#: between the launcher's check that it is free and the kernel's bind. ``say``: the first run only writes what a
#: kernel that lost that race writes (ZeroMQ's EADDRINUSE) and exits, as if the other program had let go of
#: the port since (the launcher cannot see it then; it has the kernel's word).
FIRST_RUN = r"""
import json, os, subprocess, sys
mode, connection_file, record, *kernel = sys.argv[1:]
if not os.path.exists(record) and mode == "say":
    port = json.load(open(connection_file))["hb_port"]
    json.dump({"pid": 0, "port": port}, open(record, "w"))
    sys.exit(f"zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:{port}')")
if not os.path.exists(record):
    port = json.load(open(connection_file))["hb_port"]
    squatter = ("import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); "
                "s.listen(); print('listening', flush=True); time.sleep(300)")
    # Started by a child that exits at once: the squatter is no descendant of the kernel.
    middle = ("import json, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]],"
              " stdout=subprocess.PIPE, start_new_session=True); p.stdout.readline(); "
              "json.dump({'pid': p.pid, 'port': int(sys.argv[2])}, open(sys.argv[3], 'w'))")
    subprocess.run([sys.executable, "-c", middle, squatter, str(port), record], check=True)
os.execvp(kernel[0], kernel)
"""


def run_launcher(tmp: Path, callback: str | None, kernel: list[str], *options: str,
                 env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """Start the launcher as the ssh driver does (secrets on stdin, it detaches); (its run, the kernel's key)."""
    key = uuid.uuid4().hex
    argv = [sys.executable, kernel_launcher.__file__, "--kernel-id", str(uuid.uuid4()), "--bind-ip", "127.0.0.1",
            "--log-dir", str(tmp), "--startup-timeout", "60", *options]
    if callback:
        argv += ["--callback", callback]
    line = json.dumps({"secret": SECRET, "key": key, "env": env or {}}).encode() + b"\n"
    return subprocess.run([*argv, "--", *kernel], input=line, capture_output=True, timeout=30), key


@pytest.mark.parametrize("name,mode,why", [
    ("ir", "squat", "another program listens on port"),
    ("python", "squat", "another program listens on port"),
    ("ir", "say", "a port was taken before the kernel bound it (Address already in use)")])
def test_taken_port_starts_the_kernel_again_with_fresh_ports(name: str, mode: str, why: str,
                                                             kernelspecs: dict[str, dict[str, Any]],
                                                             tmp_path: Path) -> None:
    """Another program takes a port the launcher chose before the kernel binds it (injected, see ``FIRST_RUN``):
    the launcher notices (another process listens on the port, or the kernel says ``Address already in use``),
    logs the attempt, and starts the kernel again with fresh ports; the kernel it reports ready answers on
    them."""
    from jupyter_client import BlockingKernelClient

    kernel = ([sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"] if name == "python"
              else [shutil.which(kernelspecs[name]["argv"][0]) or "R", *kernelspecs[name]["argv"][1:]])
    record = tmp_path / "squatter.json"
    callback = CallbackServer()
    launcher_pid = kernel_pid = 0
    try:
        run, key = run_launcher(tmp_path, callback.address,
                                [sys.executable, "-c", FIRST_RUN, mode, "{connection_file}", str(record), *kernel])
        launcher_pid = int(json.loads(run.stdout)["launcher_pid"])
        report = wait_until(lambda: next((m for m in callback.messages if m["type"] in ("ready", "failed")), None),
                            60, what="the launcher's report")
        log = next(tmp_path.glob("egd-kernel-*.log")).read_text()
        assert report["type"] == "ready", f"{report}\n{log}"
        squatted = json.loads(record.read_text())
        info = report["info"]
        kernel_pid = int(info["pid"])
        assert squatted["port"] not in [info[p] for p in kernel_launcher.PORT_NAMES]
        assert f"attempt 1 of {kernel_launcher.PORT_ATTEMPTS}: {why}" in log and "again with fresh ports" in log, log
        assert log.count("starting kernel:") == 2, log

        client = BlockingKernelClient()
        client.load_connection_info({**{p: info[p] for p in kernel_launcher.PORT_NAMES}, "ip": "127.0.0.1",
                                     "key": key, "transport": "tcp", "signature_scheme": "hmac-sha256"})
        client.start_channels()
        try:
            assert client.kernel_info(reply=True, timeout=30)["content"]["status"] == "ok"
        finally:
            client.stop_channels()
    finally:
        for pid in (launcher_pid, kernel_pid):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if record.exists() and json.loads(record.read_text())["pid"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
        callback.close()


def test_failing_kernel_is_not_retried(kernelspecs: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """An R kernel that fails for another reason than a port is reported ``failed`` at once with its output,
    started only once."""
    callback = CallbackServer()
    try:
        started = time.monotonic()
        run, _ = run_launcher(tmp_path, callback.address,
                              [shutil.which("R") or "R", "--slave", "-e", "cat('no such kernel\\n'); quit(status=4)",
                               "--args", "{connection_file}"])
        assert run.returncode == 0, run.stderr
        report = wait_until(lambda: next((m for m in callback.messages if m["type"] in ("ready", "failed")), None),
                            30, what="the launcher's report")
        assert report["type"] == "failed" and time.monotonic() - started < 15
        assert "exited with code 4" in report["reason"] and "no such kernel" in report["reason"]
        assert next(tmp_path.glob("egd-kernel-*.log")).read_text().count("starting kernel:") == 1
    finally:
        callback.close()


EXEC_REPORT = ("import json, os, sys, time; print(json.dumps({'pid': os.getpid(), 'pgid': os.getpgid(0), "
               "'sid': os.getsid(0), 'cwd': os.getcwd(), 'x': os.environ.get('KERNEL_X')}), flush=True); "
               "time.sleep(60)")


def test_exec_becomes_the_command(tmp_path: Path) -> None:
    """--exec: the launcher detaches, prints its one line, and becomes the command (the printed pid is the
    command's process and process group), with the environment from stdin, in the working directory; no
    callback, connection file or control port."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    run, _ = run_launcher(tmp_path, None, [sys.executable, "-c", EXEC_REPORT], "--exec", "--working-dir",
                          str(workdir), env={"KERNEL_X": "from stdin; not a shell's $(touch x)"})
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    pid = int(printed["launcher_pid"])
    try:
        assert printed["started"] is True
        log = Path(printed["log"])
        seen = wait_until(lambda: [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")],
                          10, what="the command's output in the log")[0]
        assert seen == {"pid": pid, "pgid": pid, "sid": pid, "cwd": str(workdir),
                        "x": "from stdin; not a shell's $(touch x)"}
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            assert b"kernel_launcher" not in handle.read()
        assert os.listdir(workdir) == []
        assert not [c for c in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{c}").startswith("socket")]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 5, what="the command to end")


def test_exec_of_a_missing_command_is_not_started(tmp_path: Path) -> None:
    """--exec of a command that does not exist: ``started`` is false, the launcher exits 1, the log says why."""
    run, _ = run_launcher(tmp_path, None, ["/nonexistent/kernel", "--flag"], "--exec")
    assert run.returncode == 1
    printed = json.loads(run.stdout)
    assert printed["started"] is False
    assert "cannot exec /nonexistent/kernel" in Path(printed["log"]).read_text()
