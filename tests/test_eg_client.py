"""Enterprise Gateway's own Python client (``enterprise_gateway.client.gateway_client``) against a real egd.

EG ships this client for its integration tests and for "micro service" programs; it is a second, independent
implementation of the gateway API's client side (``requests`` without a Content-Type, ``websocket-client``, message
headers with an empty session, its own reading of replies). EG itself is installed in its own venv
(``tests/egclient.py``); the driver (``tests/egclient_driver.py``) runs there as a subprocess and reports, and this
module checks the report: start, execute, interrupt of a long cell, restart, shutdown, and that nothing is left.

* ``python3``: a local kernel (the test environment's ipykernel).
* ``python_distributed``: EG's own kernelspec (``tests/egdist.py``, from EG's sdist), run by egd's ssh driver on the
  lab's hosts (``tests/sshhosts.py``) with EG's ``launch_ipykernel.py`` speaking EG's launcher protocol to egd.
"""

from __future__ import annotations

import functools
import json
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import egclient, egdist
from tests.conftest import GatewayProcess, wait_until, wait_until_gone
from tests.procs import alive
from tests.sshhosts import SshHost, SshLab

pytestmark = pytest.mark.eg

WHERE = re.compile(r"where (\S+) (\d+) (\S+) 42")


@pytest.fixture(scope="module")
def eg_python() -> Path:
    """The python of the venv holding EG's client (installed on first use)."""
    return egclient.ensure_client_venv()


def where(report: dict[str, Any], step: str) -> tuple[str, int, str]:
    """(hostname, pid, the program that started the kernel) as the kernel printed them in ``step``."""
    match = WHERE.search(report[step]["result"])
    assert match and not report[step]["has_error"], report[step]
    return match.group(1), int(match.group(2)), match.group(3)


def check_report(report: dict[str, Any], gw: GatewayProcess, program: str) -> list[tuple[str, int]]:
    """Every step of the driver as a working gateway makes it, with kernels started by ``program``;
    [(host, pid) before, and after the restart]."""
    context = f"\n--- EG client stderr:\n{report['stderr']}\n--- egd log tail:\n{gw.log()[-6000:]}"
    assert "error" not in report and report["exit"] == 0, f"{json.dumps(report.get('error'), indent=1)}{context}"
    host, pid, started_by = where(report, "where")
    assert started_by == program, context
    assigned, printed = report["execute"]
    assert not assigned["has_error"] and not printed["has_error"] and printed["result"] == "123\n", context

    # EG's client sends the interrupt from a second thread 3 s into the cell; the cell would sleep 600 s and the
    # client waits 60 s for a message, so only a working interrupt gives KeyboardInterrupt here, and quickly.
    interrupted = report["interrupt"]
    assert interrupted["has_error"] and "KeyboardInterrupt" in interrupted["result"], f"{interrupted}{context}"
    lines = interrupted["result"].splitlines()
    assert lines[0] == "begin" and "end" not in lines, interrupted
    assert interrupted["seconds"] < 30, interrupted
    assert report["after_interrupt"]["result"].strip() == "124", f"{report['after_interrupt']}{context}"

    assert report["restart"]["ok"] is True
    lost = report["after_restart"]
    assert lost["has_error"] and "NameError" in lost["result"], f"{lost}{context}"
    host_after, pid_after, started_by = where(report, "where_after_restart")
    assert started_by == program, context
    assert (host_after, pid_after) != (host, pid), "a restart must start a new kernel process"
    assert report["state"] == "idle"
    assert report["shutdown"]["ok"] is True
    return [(host, pid), (host_after, pid_after)]


def check_no_kernel(gw: GatewayProcess, kernel_id: str) -> None:
    """egd lists no kernel after EG's client shut the kernel down."""
    assert gw.client.request("GET", "/api/kernels").json == []
    assert gw.client.kernel(kernel_id).status == 404


def test_eg_client_drives_a_local_kernel(eg_python: Path, make_gateway: Callable[..., GatewayProcess]) -> None:
    """EG's client starts, executes, interrupts, restarts and shuts down a local python3 kernel on egd."""
    gw = make_gateway()
    report = egclient.run_driver(eg_python, gw.url, "python3")
    kernels = check_report(report, gw, "ipykernel_launcher.py")
    check_no_kernel(gw, report["start"]["kernel_id"])
    # A local kernel's command line names its connection file in the gateway's runtime directory.
    assert not wait_until_gone(gw.runtime_dir, 10), "kernel processes left after DELETE"
    for host, pid in kernels:
        assert host == socket.gethostname()
        assert not alive(pid)


def nothing_mentions(host: SshHost, text: str) -> bool:
    """No process on ``host`` has ``text`` in its command line."""
    return not host.processes_matching(text)


def test_eg_client_drives_eg_python_distributed_over_ssh(eg_python: Path, ssh_lab: SshLab, tmp_path: Path,
                                                         make_gateway: Callable[..., GatewayProcess]) -> None:
    """EG's client drives EG's own ``python_distributed`` kernelspec (EG's launcher, EG's protocol) on egd's ssh
    driver: the kernel runs on a lab host, interrupt and restart reach it there, shutdown leaves nothing on it."""
    # EG's spec unchanged: its argv starts with "python", which egd's ssh driver reads as its `python` setting,
    # here the test environment's interpreter (ipykernel, and pycryptodomex for EG's launcher).
    specs = egdist.assemble(tmp_path / "kernels", ["python_distributed"])
    gw = make_gateway({
        "kernels": {"kernelspec_dirs": [str(specs)], "heartbeat_interval": 1, "heartbeat_misses": 3},
        "drivers": {"local": {}, "ssh": {"hosts": [h.name for h in ssh_lab.hosts],
                                         "ssh_config": str(ssh_lab.ssh_config_path),
                                         "callback_host": ssh_lab.gateway_ip, "python": ssh_lab.python,
                                         "log_dir": str(tmp_path / "hostlogs"), "connect_timeout": 3}},
    })
    report = egclient.run_driver(eg_python, gw.url, "python_distributed")
    kernel_id = report.get("start", {}).get("kernel_id", "")
    try:
        kernels = check_report(report, gw, "launch_ipykernel.py")  # EG's launcher, from EG's spec
        check_no_kernel(gw, kernel_id)  # (egd's shared ssh connections stay until it stops: make_gateway checks)
        hosts = {h.name: h for h in ssh_lab.hosts}
        for host, pid in kernels:
            assert host in hosts, f"the kernel ran on {host!r}, not on a lab host"
            wait_until(functools.partial(nothing_mentions, hosts[host], kernel_id), 15,
                       what=f"EG's launcher and kernel {kernel_id} to end on {host}")
            assert pid not in hosts[host].pids()
    finally:
        # EG's launcher writes its connection file to the host's /tmp and removes it only after ipykernel's start()
        # returns, which a shutdown_request does not bring about (EG leaves these files too); the hosts share this
        # machine's /tmp.
        for path in Path(tempfile.gettempdir()).glob(f"kernel-{kernel_id}_*.json") if kernel_id else []:
            path.unlink(missing_ok=True)
