"""Least surprise at the command line: what Ctrl-C does to kernels, what ``egd --help`` shows, and messages
that name the real cause (the environment variable, the file, the key meant, the kernelspecs there are).

The gateways here are started as a person starts egd, with no test defaults (``GatewayProcess`` chooses
``state.on_stop`` for its tests): ``python -m egd`` with a config file that sets only where to listen and which
kernelspecs to offer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from egd.cli import _COMMANDS
from egd.config import load_config
from tests.client import GatewayClient
from tests.conftest import KERNELSPECS, GatewayProcess, free_port, processes_mentioning, wait_until, wait_until_gone

REPO = Path(__file__).resolve().parent.parent


def egd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the egd command to its end."""
    return subprocess.run([sys.executable, "-m", "egd", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


class Terminal:
    """``egd run --config FILE`` as typed in a terminal: no test defaults beyond the address and kernelspecs."""

    def __init__(self, directory: Path, args: tuple[str, ...] = (),
                 preexec_fn: Callable[[], Any] | None = None) -> None:
        self.runtime_dir = str(directory / "runtime")
        self.port = free_port()
        config = {"server": {"port": self.port},
                  "kernels": {"kernelspec_dirs": [str(KERNELSPECS)], "runtime_dir": self.runtime_dir}}
        (directory / "egd.yaml").write_text(yaml.safe_dump(config))
        self.log_path = directory / "egd.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "egd", "run", "--config", str(directory / "egd.yaml"), *args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec_fn)
        self.client = GatewayClient(f"http://127.0.0.1:{self.port}")
        wait_until(self._answers, 30, what=f"egd on port {self.port} (log: {self.log_path})")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, f"egd exited with {self.proc.returncode}:\n{self.log()}"
        try:
            return self.client.request("GET", "/api", timeout=2).status == 200
        except OSError:
            return False

    def log(self) -> str:
        """What egd wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int) -> int:
        """Send ``sig`` and wait for egd to exit; its exit code."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"egd did not stop on signal {sig}:\n{self.log()[-3000:]}") from None

    def clean_up(self) -> None:
        """Kill this egd and its kernels if a test left them (a failed test must not leak processes)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid, _ in processes_mentioning(self.runtime_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[..., Terminal]]:
    """Start egd as in a terminal; every egd and kernel started is gone after the test."""
    started: list[Terminal] = []

    def start(*args: str, preexec_fn: Callable[[], Any] | None = None) -> Terminal:
        directory = tmp_path / f"egd-{len(started)}"
        directory.mkdir()
        started.append(Terminal(directory, args, preexec_fn))
        return started[-1]

    yield start
    for process in started:
        process.clean_up()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_egd_in_a_terminal_stops_its_kernels(terminal: Callable[..., Terminal], sig: int) -> None:
    """Without ``state.on_stop`` in the config, Ctrl-C (or SIGTERM) stops the kernels with egd, though the
    state store (SQLite, the default) is on: nothing is left running."""
    egd_process = terminal()
    egd_process.client.start_kernel("python3")
    assert processes_mentioning(egd_process.runtime_dir), "the kernel runs"
    assert egd_process.stop(sig) == 0, egd_process.log()
    assert not wait_until_gone(egd_process.runtime_dir, 10), f"kernels left behind:\n{egd_process.log()}"
    log = egd_process.log()
    assert "stopping 1 kernel(s)" in log and "keep running" not in log, log


def test_the_systemd_setup_keeps_kernels() -> None:
    """The embedded default is shutdown; conf/egd.yaml, which conf/egd.service runs egd with, chooses keep."""
    assert load_config(None, environ={}).state.on_stop == "shutdown"
    assert load_config(str(REPO / "conf" / "egd.yaml"), environ={}).state.on_stop == "keep"
    assert "ExecStart=/usr/local/bin/egd run --config /etc/egd/egd.yaml" in (REPO / "conf" / "egd.service").read_text()
    assert "install -m 0640 -g egd conf/egd.yaml /etc/egd/egd.yaml" in (REPO / "conf" / "egd.service").read_text()


def test_help_shows_the_run_flags_and_every_command() -> None:
    """``egd --help`` shows what ``egd run --help`` shows, and names every command with its arguments."""
    shown = egd("--help")
    assert shown.returncode == 0
    for flag in ("--config FILE", "--ip", "--port", "--base-url", "--log-level", "critical"):
        assert flag in shown.stdout, (flag, shown.stdout)
    for command in _COMMANDS:
        assert f"\n    {command} " in shown.stdout, (command, shown.stdout)
    for arguments in ("check-config        FILE", "kernelspecs         [--config FILE] [--json]",
                      "token               USER"):
        assert arguments in shown.stdout, (arguments, shown.stdout)


def test_log_level_critical(terminal: Callable[..., Terminal]) -> None:
    """``--log-level critical`` is accepted (as logging.level and EGD_LOG_LEVEL are): a start and a stop log
    nothing below critical."""
    egd_process = terminal("--log-level", "critical")
    assert egd_process.stop(signal.SIGTERM) == 0
    assert egd_process.log() == ""


def test_a_bad_token_in_the_environment_is_named_as_such(tmp_path: Path) -> None:
    """EGD_AUTH_TOKEN too short: the message names the variable, not the defaults or the file."""
    for args in ((), ("check-config", str(tmp_path / "egd.yaml"))):
        (tmp_path / "egd.yaml").write_text("server: {port: 0}\n")
        result = egd(*args, env={"EGD_AUTH_TOKEN": "short"})
        assert result.returncode == 1, result
        assert ("the environment has 1 problem(s):\n  auth.token (from the environment variable EGD_AUTH_TOKEN): "
                "must be a string of at least 16 characters") in result.stderr, result.stderr
        assert "embedded defaults" not in result.stderr and "egd.yaml" not in result.stderr, result.stderr


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    """Broken YAML is reported with the file's path, line and column, for check-config and run alike."""
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  port: 8888\n  ip: [127.0.0.1\n")
    for args in (("check-config", str(path)), ("run", "--config", str(path))):
        result = egd(*args)
        assert result.returncode == 1, result
        assert f'in "{path}", line ' in result.stderr and "<unicode string>" not in result.stderr, result.stderr


def test_an_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    """A misspelt key, section or driver setting (nested ones too) gets "did you mean ...?" instead of the list of
    every key."""
    path = tmp_path / "typos.yaml"
    path.write_text("stat: {}\nserver: {prot: 9000}\nkernels: {launch_timout: 30}\n"
                    "drivers: {local: {ipp: 1}, yarn: {distributed_shell: {am_memroy_mb: 512}}}\n")
    result = egd("check-config", str(path))
    assert result.returncode == 1
    for problem in ("stat: unknown section (did you mean state?)", "server.prot: unknown key (did you mean port?)",
                    "kernels.launch_timout: unknown key (did you mean launch_timeout?)",
                    "drivers.local.ipp: unknown setting (did you mean ip?)",
                    "drivers.yarn.distributed_shell.am_memroy_mb: unknown setting (did you mean am_memory_mb?)"):
        assert problem in result.stderr, (problem, result.stderr)
    assert "ws_ping_interval" not in result.stderr and "known:" not in result.stderr, result.stderr


def test_an_unknown_kernelspec_404_lists_the_usable_ones(gateway: GatewayProcess) -> None:
    """GET /api/kernelspecs/x, POST /api/kernels and POST /api/sessions naming no kernelspec there answer 404
    naming the kernelspecs the caller may use (for ``?user=bob``: not those bob may not use)."""
    client = gateway.client
    offered = sorted(client.request("GET", "/api/kernelspecs").json["kernelspecs"])
    session = {"path": "a.ipynb", "type": "notebook", "name": "a.ipynb", "kernel": {"name": "nope"}}
    for method, path, body in (("GET", "/api/kernelspecs/nope", None), ("POST", "/api/kernels", {"name": "nope"}),
                               ("POST", "/api/sessions", session)):
        answer = client.request(method, path, body)
        assert answer.status == 404, (path, answer.body)
        assert answer.json == {"reason": "Not Found",
                               "message": f"Kernel spec nope not found; available: {', '.join(offered)}"}, path
    for_bob = client.request("GET", "/api/kernelspecs/nope?user=bob").json["message"]
    assert "python3" in for_bob and "not_bob" not in for_bob and "only_alice" not in for_bob, for_bob
    assert "not_bob" in offered and "only_alice" in offered
    assert client.request("GET", "/api/kernels").json == []


def _ignore_stop_signals() -> None:
    """What a shell does for a background job of a script (SIGINT), and a careless supervisor (SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["kill-int", "kill-term"])
def test_stop_signals_work_when_inherited_ignored(terminal: Callable[..., Terminal], sig: int) -> None:
    """``egd run &`` in a script starts egd with SIGINT ignored: ``kill -INT`` still stops it, and its kernels
    (and so does SIGTERM, had it been ignored too)."""
    egd_process = terminal(preexec_fn=_ignore_stop_signals)
    egd_process.client.start_kernel("python3")
    assert egd_process.stop(sig) == 0, egd_process.log()
    assert f"Received {signal.Signals(sig).name}, shutting down" in egd_process.log()
    assert not wait_until_gone(egd_process.runtime_dir, 10), "kernels left behind"


def test_twisted_chatter_is_debug(terminal: Callable[..., Terminal]) -> None:
    """At info, a start and a stop log egd's own lines (where it listens, that it stopped), not Twisted's
    ("GatewaySite starting on", "(TCP Port Closed)", "Starting factory", "Main loop terminated")."""
    egd_process = terminal("--log-level", "info")
    assert egd_process.stop(signal.SIGTERM) == 0
    log = egd_process.log()
    assert f"egd is listening on http://127.0.0.1:{egd_process.port}/" in log and "egd stopped" in log, log
    for chatter in ("starting on", "Port", "Starting factory", "Stopping factory", "Main loop terminated"):
        assert chatter not in log, (chatter, log)
    # Factories are what drivers' HTTP clients (yarn, kubernetes, slurm, docker) start for every connection.
    code = ("import sys; from twisted.internet.protocol import Factory; from egd.logs import start_logging; "
            "start_logging(sys.argv[1], out=sys.stdout); f = Factory(); f.doStart(); f.doStop()")
    for level, shown in (("info", False), ("debug", True)):
        out = subprocess.run([sys.executable, "-c", code, level], capture_output=True, text=True, timeout=60).stdout
        assert ("Starting factory" in out and "Stopping factory" in out) is shown, (level, out)


_ONE_EVENT = """
import os, sys
from twisted.logger import Logger
from egd.logs import start_logging
if sys.argv[1] == "journal":
    st = os.fstat(sys.stdout.fileno())
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
start_logging("info", out=sys.stdout)
log = Logger(namespace="egd.test")
log.warn("ssh egdh2 failed: {why}", why="ssh: connect to host egdh2 port 22: No route to host\\r\\nsecond line\\n")
try:
    1 / 0
except ZeroDivisionError:
    log.failure("a bug")
"""


@pytest.mark.parametrize("where", ["terminal", "journal"])
def test_one_event_one_line(where: str) -> None:
    """A message with newlines in it (a remote command's stderr) is one line, its newlines as " | "; a
    traceback is indented under its event, and on journald each of its lines carries the event's priority."""
    out = subprocess.run([sys.executable, "-c", _ONE_EVENT, where], capture_output=True, text=True,
                         timeout=60).stdout.splitlines()
    warning = [line for line in out if "egdh2" in line]
    assert len(warning) == 1, out
    assert warning[0].endswith("No route to host | second line"), warning
    bug = out.index(next(line for line in out if line.endswith("a bug")))
    traceback = out[bug + 1:]
    assert traceback and any("ZeroDivisionError" in line for line in traceback), out
    if where == "journal":
        assert warning[0].startswith("<4>warn") and out[bug].startswith("<2>critical"), out  # log.failure: critical
        assert all(line.startswith("<2>    ") for line in traceback), out
    else:
        assert all(line.startswith("    ") for line in traceback), out
